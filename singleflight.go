package layercache

import (
	"sync"
	"sync/atomic"
)

// flight is one shared load of one key in this process.
type flight[T any] struct {
	done chan struct{} // closed by finish, after val and err are set
	val  T
	err  error
	// stale is set by a write or delete of the key while the load runs: the
	// loaded value may predate that write, so it must not be cached. Callers
	// already waiting still get it (they asked before the write).
	stale atomic.Bool
	// fill is held by the load from its last look at stale until its value
	// is in Redis, and taken by invalidate to set stale. So a Set or Delete
	// either voids the fill before it is written, or waits until it has
	// landed and then writes or deletes after it: never the fill after.
	fill sync.Mutex
}

// flightGroup coalesces concurrent loads of one key: the first caller starts
// the load, later ones wait for the same result. Unlike x/sync/singleflight
// it is typed (no boxing of T), keeps the flight joinable until its result
// is in Redis (so a caller arriving in that window does not load again), and
// refuses new flights once the cache is closing.
type flightGroup[T any] struct {
	mu      sync.Mutex
	m       map[string]*flight[T]
	closing bool
	wg      sync.WaitGroup // running loads; Close waits for them
}

// join returns the flight for key, starting one if none runs. leader is true
// for the caller that must run it (and call finish). ok is false after close.
func (g *flightGroup[T]) join(key string) (f *flight[T], leader, ok bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closing {
		return nil, false, false
	}
	if f, found := g.m[key]; found {
		return f, false, true
	}
	if g.m == nil {
		g.m = make(map[string]*flight[T])
	}
	f = &flight[T]{done: make(chan struct{})}
	g.m[key] = f
	g.wg.Add(1)
	return f, true, true
}

// finish removes f from the group, then releases its waiters. The order
// matters: a caller that joins after the result is stored must start a new
// flight (and will find the value in Redis), never join a finished one.
func (g *flightGroup[T]) finish(key string, f *flight[T]) {
	g.mu.Lock()
	if g.m[key] == f {
		delete(g.m, key)
	}
	g.mu.Unlock()
	close(f.done)
	g.wg.Done()
}

// invalidate detaches the running flight of key, if any: later callers start
// a new load, and the detached one will not write its value.
func (g *flightGroup[T]) invalidate(key string) {
	g.mu.Lock()
	f, found := g.m[key]
	if found {
		delete(g.m, key)
	}
	g.mu.Unlock()
	if found {
		// Outside g.mu: a fill holds f.fill across a Redis round trip.
		f.fill.Lock()
		f.stale.Store(true)
		f.fill.Unlock()
	}
}

// close refuses new flights and waits for running ones to end.
func (g *flightGroup[T]) close() {
	g.mu.Lock()
	g.closing = true
	g.mu.Unlock()
	g.wg.Wait()
}
