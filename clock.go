package layercache

import (
	"context"
	"sync"
	"time"
)

// Clock tells the time and waits. The default is the system clock; tests
// pass a [ManualClock] with [WithClock] so that expiry, early refresh,
// stale windows, lease waits and renewals, Hash sweeps, the migration
// phase follower and rate-limited scans run without sleeping: everything
// the cache waits for, it waits for on its Clock.
//
// (A loader's timeout, [WithLoadTimeout], is a context deadline and runs
// on real time, since the loader's own I/O does.)
type Clock interface {
	// Now returns the current time.
	Now() time.Time
	// NewTimer returns a channel that receives the time once, after d,
	// and a function that stops the timer, reporting whether it stopped
	// it before it fired.
	NewTimer(d time.Duration) (<-chan time.Time, func() bool)
	// NewTicker returns a channel that receives the time every d, and a
	// function that stops the ticker. Ticks that the receiver is not
	// ready for are dropped, as with time.Ticker.
	NewTicker(d time.Duration) (<-chan time.Time, func())
}

type systemClock struct{}

func (systemClock) Now() time.Time { return time.Now() }

func (systemClock) NewTimer(d time.Duration) (<-chan time.Time, func() bool) {
	t := time.NewTimer(d)
	return t.C, t.Stop
}

func (systemClock) NewTicker(d time.Duration) (<-chan time.Time, func()) {
	t := time.NewTicker(d)
	return t.C, t.Stop
}

// sleep waits d on clock; false if ctx ended first.
func sleep(ctx context.Context, clock Clock, d time.Duration) bool {
	c, stop := clock.NewTimer(d)
	defer stop()
	select {
	case <-c:
		return true
	case <-ctx.Done():
		return false
	}
}

// ManualClock is a [Clock] that moves only when told to: its timers and
// tickers fire when [ManualClock.Advance] or [ManualClock.Set] moves it to
// or past their time. It is safe for concurrent use. The zero value starts
// at the Unix epoch; use [NewManualClock] to start elsewhere.
type ManualClock struct {
	mu      sync.Mutex
	now     time.Time
	started bool
	waiters map[*manualTimer]struct{}
}

// manualTimer is a timer or ticker of a ManualClock.
type manualTimer struct {
	c     chan time.Time
	at    time.Time
	every time.Duration // 0 for a timer
}

// NewManualClock returns a ManualClock reading t.
func NewManualClock(t time.Time) *ManualClock {
	return &ManualClock{now: t, started: true}
}

// Now returns the clock's current time.
func (c *ManualClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.nowLocked()
}

func (c *ManualClock) nowLocked() time.Time {
	if !c.started {
		c.now, c.started = time.Unix(0, 0), true
	}
	return c.now
}

// Advance moves the clock forward by d and fires the timers and tickers
// that are due.
func (c *ManualClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.nowLocked().Add(d)
	c.fireLocked()
	c.mu.Unlock()
}

// Set moves the clock to t and fires the timers and tickers that are due.
func (c *ManualClock) Set(t time.Time) {
	c.mu.Lock()
	c.nowLocked()
	c.now = t
	c.fireLocked()
	c.mu.Unlock()
}

// NewTimer returns a timer that fires when the clock reaches now+d (at
// once when d <= 0).
func (c *ManualClock) NewTimer(d time.Duration) (<-chan time.Time, func() bool) {
	t := c.add(d, 0)
	return t.c, func() bool { return c.stop(t) }
}

// NewTicker returns a ticker that fires each time the clock passes another
// multiple of d from now. d must be positive.
func (c *ManualClock) NewTicker(d time.Duration) (<-chan time.Time, func()) {
	t := c.add(max(d, 1), max(d, 1))
	return t.c, func() { c.stop(t) }
}

func (c *ManualClock) add(d, every time.Duration) *manualTimer {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := &manualTimer{c: make(chan time.Time, 1), at: c.nowLocked().Add(d), every: every}
	if c.waiters == nil {
		c.waiters = make(map[*manualTimer]struct{})
	}
	c.waiters[t] = struct{}{}
	c.fireLocked()
	return t
}

func (c *ManualClock) stop(t *manualTimer) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	_, pending := c.waiters[t]
	delete(c.waiters, t)
	return pending
}

// fireLocked sends the current time to every due timer and ticker.
func (c *ManualClock) fireLocked() {
	for t := range c.waiters {
		if t.at.After(c.now) {
			continue
		}
		select {
		case t.c <- c.now:
		default: // a ticker whose last tick was not taken: dropped
		}
		if t.every == 0 {
			delete(c.waiters, t)
			continue
		}
		for !t.at.After(c.now) {
			t.at = t.at.Add(t.every)
		}
	}
}
