package layercache

import (
	"sync"
	"sync/atomic"
)

// flight is one shared read of one key in this process: the Redis read
// and, on a miss, the load. Its callers all get what it found.
type flight[T any] struct {
	// done is closed by finish, after val and err are set. It is made
	// when the first caller needs to wait (under the group's lock): a
	// flight that ends without waiters, as a Redis hit's usually does,
	// costs no channel.
	done chan struct{}
	val  T
	err  error
	// tok is the local tier's fill token, taken before the Redis read:
	// what the flight reads or loads enters the local tier only if no
	// invalidation of the key came since (see localTier).
	tok fillToken
	// stale is set by a write, delete or invalidation of the key while
	// the flight runs: what it loaded may predate that write, so it must
	// not be cached. Callers already waiting still get it (they asked
	// before the write); later callers start a new flight.
	stale atomic.Bool
	// fill is held by an unleased load from its last look at stale until
	// its value is in Redis, and taken by invalidate to set stale. So a
	// Set or Delete in this process either voids the fill before it is
	// written, or waits until it has landed and then writes or deletes
	// after it: never the fill after.
	fill sync.Mutex
	// joined counts the callers that joined after the leader (under the
	// group's lock).
	joined int
}

// flightGroup coalesces concurrent reads of one key: the first caller
// starts the flight, later ones wait for its result. Unlike
// x/sync/singleflight it is typed (no boxing of T), keeps the flight
// joinable until its result is in Redis (so a caller arriving in that
// window does not load again), lets a write detach a running flight, and
// refuses new flights once the cache is closing.
type flightGroup[T any] struct {
	mu      sync.Mutex
	m       map[string]*flight[T]
	closing bool
	wg      sync.WaitGroup // running flights; Close waits for them
}

// join returns the flight for key, starting one if none runs. leader is true
// for the caller that must run it (and call finish); the others get the
// channel that finish closes. ok is false after close.
func (g *flightGroup[T]) join(key string) (f *flight[T], done <-chan struct{}, leader, ok bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closing {
		return nil, nil, false, false
	}
	if f, found := g.m[key]; found {
		f.joined++
		return f, f.doneLocked(), false, true
	}
	if g.m == nil {
		g.m = make(map[string]*flight[T])
	}
	f = &flight[T]{}
	g.m[key] = f
	g.wg.Add(1)
	return f, nil, true, true
}

// wait returns the channel that finish closes, for a leader that waits
// for its own flight's load.
func (g *flightGroup[T]) wait(f *flight[T]) <-chan struct{} {
	g.mu.Lock()
	defer g.mu.Unlock()
	return f.doneLocked()
}

func (f *flight[T]) doneLocked() chan struct{} {
	if f.done == nil {
		f.done = make(chan struct{})
	}
	return f.done
}

// abandon ends the flight of a leader that gave up before it started a
// load, if nobody joined it; it reports whether it did (else the leader
// must see the flight through for those who joined).
func (g *flightGroup[T]) abandon(key string, f *flight[T]) bool {
	g.mu.Lock()
	alone := f.joined == 0
	if alone && g.m[key] == f {
		delete(g.m, key)
	}
	g.mu.Unlock()
	if alone {
		g.wg.Done() // nobody waits: there is no channel to close
	}
	return alone
}

// finish removes f from the group, then releases its callers. The order
// matters: a caller that joins after the result is stored must start a new
// flight (and will find the value in Redis), never join a finished one.
func (g *flightGroup[T]) finish(key string, f *flight[T]) {
	g.mu.Lock()
	if g.m[key] == f {
		delete(g.m, key)
	}
	done := f.done // no caller can join from here on, nor make a channel
	g.mu.Unlock()
	if done != nil {
		close(done)
	}
	g.wg.Done()
}

// invalidate detaches the running flight of key after a write made in
// this process: later callers start a new flight, and the detached one
// will not write its value, or has written it before invalidate returns.
func (g *flightGroup[T]) invalidate(key string) {
	if f := g.remove(key); f != nil {
		// Outside g.mu: a fill holds f.fill across a Redis round trip.
		f.fill.Lock()
		f.stale.Store(true)
		f.fill.Unlock()
	}
}

// detach detaches the running flight of key after news of a write made
// elsewhere (an invalidation from the bus, a lease broken under a load):
// later callers start a new flight, and the detached one will not cache
// its value unless its fill is already on its way. It never blocks: the
// bus's reader calls it.
func (g *flightGroup[T]) detach(key string) {
	if f := g.remove(key); f != nil {
		f.stale.Store(true)
	}
}

// detachFlight takes f out of the group, if it is still key's running
// flight, so that later callers start a new one. It leaves f's fill alone:
// it is for a load whose lease was lost, and the fill's token check already
// refuses it (and wakes the lease's waiters).
func (g *flightGroup[T]) detachFlight(key string, f *flight[T]) {
	g.mu.Lock()
	if g.m[key] == f {
		delete(g.m, key)
	}
	g.mu.Unlock()
}

// detachAll takes every running flight out of the group, so that later
// callers start new ones: a flush, after which anything may have changed
// (invalidations may have been lost). It leaves their fills alone: a lost
// message names no key, and voiding every fill on every reconnect would
// only cost loads.
func (g *flightGroup[T]) detachAll() {
	g.mu.Lock()
	g.m = nil
	g.mu.Unlock()
}

func (g *flightGroup[T]) remove(key string) *flight[T] {
	g.mu.Lock()
	defer g.mu.Unlock()
	f, found := g.m[key]
	if found {
		delete(g.m, key)
	}
	return f
}

// close refuses new flights and waits for running ones to end.
func (g *flightGroup[T]) close() {
	g.mu.Lock()
	g.closing = true
	g.mu.Unlock()
	g.wg.Wait()
}
