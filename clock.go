package layercache

import (
	"sync/atomic"
	"time"
)

// Clock tells the time. The default is the system clock; tests pass a fake
// with [WithClock] so that expiry, early refresh and stale windows are
// exercised without sleeping.
type Clock interface {
	Now() time.Time
}

type systemClock struct{}

func (systemClock) Now() time.Time { return time.Now() }

// ManualClock is a [Clock] that moves only when told to. It is safe for
// concurrent use. The zero value starts at the Unix epoch; use
// [NewManualClock] to start elsewhere.
type ManualClock struct {
	ns atomic.Int64
}

// NewManualClock returns a ManualClock reading t.
func NewManualClock(t time.Time) *ManualClock {
	c := &ManualClock{}
	c.ns.Store(t.UnixNano())
	return c
}

// Now returns the clock's current time.
func (c *ManualClock) Now() time.Time { return time.Unix(0, c.ns.Load()) }

// Advance moves the clock forward by d.
func (c *ManualClock) Advance(d time.Duration) { c.ns.Add(int64(d)) }

// Set moves the clock to t.
func (c *ManualClock) Set(t time.Time) { c.ns.Store(t.UnixNano()) }
