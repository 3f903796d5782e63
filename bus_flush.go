package layercache

import (
	"log/slog"
	"strings"
	"sync"
	"time"
)

// remoteFlushInterval is the least time between two flushes of one route's
// local tiers that messages from other nodes ask for (see
// Bus.remoteFlushLocked). Genuine remote flushes are rare (a node whose
// backlog outgrew its bound, a message this node cannot read), so the
// limit costs nothing in normal operation; it caps what a flood of flush
// messages, forged on a bus without a secret, costs every node: clearing
// a tier of a million entries a thousand times a second would take the
// process's CPU, and the tier would never hold anything.
const remoteFlushInterval = 100 * time.Millisecond

// allRoutes names every route in the flush limiter: what a message this
// node cannot read asks for.
const allRoutes = ""

// flushLimiter spaces out remote flushes per route. A flush asked for
// within remoteFlushInterval of the route's last one is not dropped (the
// message may be genuine, and dropping it could leave stale entries) but
// deferred: one timer applies every deferred flush together, at most once
// per remoteFlushInterval. A deferred flush empties everything stored
// before it is applied, so delaying it only delays it; the flood's extra
// lag is at most remoteFlushInterval.
type flushLimiter struct {
	mu     sync.Mutex
	closed bool
	last   map[string]time.Time // route -> when its last remote flush was applied
	due    map[string]struct{}  // deferred flushes, for the timer
	timer  *time.Timer          // set while deferred flushes wait
	// running counts timers started and not finished (or stopped), so
	// that Close waits for a timer function already under way: one
	// started before Close must not touch the tiers after it.
	running sync.WaitGroup
}

// remoteFlushLocked flushes the local tiers of route (allRoutes: every
// route) for a message from another node, now or, within
// remoteFlushInterval of the route's last remote flush, deferred. Call it
// with b.mu read-locked.
func (b *Bus) remoteFlushLocked(route string) {
	if route != allRoutes && len(b.routes[route]) == 0 {
		// Nothing here to flush, and nothing to remember: state per
		// route that a forger names would grow without bound.
		return
	}
	// The route may be a substring of a 32 KiB payload (see
	// busmsg.DecodeString): the maps below must not keep that alive.
	route = strings.Clone(route)
	f := &b.flushLimit
	now := time.Now()
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		return
	}
	if last, ok := f.last[route]; ok && now.Sub(last) < remoteFlushInterval {
		f.due[route] = struct{}{}
		if f.timer == nil {
			f.running.Add(1)
			f.timer = time.AfterFunc(remoteFlushInterval, b.flushDeferred)
		}
		f.mu.Unlock()
		b.rec.inc(evBusFlushesDeferred)
		b.logFlood.log(b.ctx, b.log, slog.LevelWarn, "layercache: remote flushes arrive faster than one per interval; applying them at most once per interval",
			slog.String("route", route), slog.Duration("interval", remoteFlushInterval))
		return
	}
	if len(f.last) > 64 {
		// Forget routes flushed long enough ago to be allowed anyway, so
		// the map holds about the routes flushed in the last interval.
		for r, t := range f.last {
			if now.Sub(t) >= remoteFlushInterval {
				delete(f.last, r)
			}
		}
	}
	f.last[route] = now
	f.mu.Unlock()
	b.flushLocked(route)
}

// flushDeferred, the limiter's timer function, applies the deferred
// flushes, then sets the timer again if more were deferred meanwhile.
func (b *Bus) flushDeferred() {
	f := &b.flushLimit
	defer f.running.Done()
	f.mu.Lock()
	if f.closed {
		f.timer = nil
		f.mu.Unlock()
		return
	}
	routes := make([]string, 0, len(f.due))
	for r := range f.due {
		routes = append(routes, r)
	}
	clear(f.due)
	f.mu.Unlock()

	now := time.Now()
	b.mu.RLock()
	for _, r := range routes {
		b.flushLocked(r)
	}
	b.mu.RUnlock()

	f.mu.Lock()
	defer f.mu.Unlock()
	for _, r := range routes {
		f.last[r] = now
	}
	f.timer = nil
	// Flushes deferred while these were applied still wait: the timer
	// is cleared only now, so that each run is the only one under way.
	if len(f.due) > 0 && !f.closed {
		f.running.Add(1)
		f.timer = time.AfterFunc(remoteFlushInterval, b.flushDeferred)
	}
}

// close stops the limiter: deferred flushes are dropped (the bus is
// closing, and its tiers are off for good), and a timer function already
// under way is waited for.
func (f *flushLimiter) close() {
	f.mu.Lock()
	f.closed = true
	t := f.timer
	f.mu.Unlock()
	if t != nil && t.Stop() {
		f.running.Done() // it will never run
	}
	f.running.Wait()
}

// flushLocked empties the local tiers of route (allRoutes: of every
// route). Call it with b.mu read-locked.
func (b *Bus) flushLocked(route string) {
	if route != allRoutes {
		for _, t := range b.routes[route] {
			t.flush()
		}
		return
	}
	for _, tiers := range b.routes {
		for _, t := range tiers {
			t.flush()
		}
	}
	b.rec.inc(evBusFlushes)
}
