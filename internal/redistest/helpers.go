package redistest

import (
	"fmt"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// DefaultWait is how long tests should give [Eventually] for things that
// happen "soon" (a published invalidation arriving, a phase followed):
// long enough for a loaded CI machine under -race, and only ever paid
// when the test fails.
const DefaultWait = 10 * time.Second

// maxPoll caps the interval of [Eventually]'s polling: short enough that
// a met condition is seen within a few milliseconds.
const maxPoll = 20 * time.Millisecond

// Eventually polls cond until it returns true, first after 1ms and then at
// a growing interval of at most 20ms, and fails t with what (e.g. "the
// key to be invalidated on node 2") if within passes first. cond is always
// called once more after the last wait, so a condition met just at the
// deadline passes. Call it from the test's goroutine.
func Eventually(t testing.TB, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	wait := time.Millisecond
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("redistest: timed out after %v waiting for %s", within, what)
		}
		time.Sleep(wait)
		wait = min(2*wait, maxPoll)
	}
}

// Clients returns n independent clients for tgt (see [Target.NewClient]),
// each with its own connection pool, as n processes of a service would
// have: "N instances on N clients", so that connection-level effects
// (subscriptions, a killed connection, pool exhaustion) hit one instance
// only. They are closed by t.Cleanup.
func Clients(t testing.TB, tgt *Target, n int) []redis.UniversalClient {
	t.Helper()
	cs := make([]redis.UniversalClient, n)
	for i := range cs {
		cs[i] = tgt.NewClient(t)
	}
	return cs
}

// Hammer runs fn(g) once on each of goroutines goroutines, g = 0..n-1, all
// released at the same moment (for the most contention), and returns when
// every call has returned. fn should report failures with t.Error: a
// panic in fn, or a t.Fatal or t.FailNow in it (which end only the
// goroutine that calls them), fails t with the goroutine number (and the
// stack of a panic) and stops the test once all calls have returned. Call
// Hammer from the test's goroutine.
func Hammer(t testing.TB, goroutines int, fn func(g int)) {
	t.Helper()
	var h hammer
	h.run(goroutines, func(g int) { fn(g) })
	h.report(t)
}

// HammerFor runs fn(g, i), for i = 0, 1, 2, ..., on each of goroutines
// goroutines, all released at the same moment, until d has passed since
// then, and returns the total number of calls. Every goroutine makes at
// least one call. A goroutine stops early when its fn returns false; all
// stop early once t has failed (say, after a t.Error in fn) or any fn
// panicked. Panics fail t as in [Hammer]. Call it from the test's
// goroutine.
func HammerFor(t testing.TB, goroutines int, d time.Duration, fn func(g, i int) bool) int {
	t.Helper()
	var h hammer
	var calls atomic.Int64
	var start time.Time
	h.run(goroutines, func(g int) {
		for i := 0; ; i++ {
			if i > 0 && (time.Since(start) >= d || h.stop.Load() || t.Failed()) {
				return
			}
			calls.Add(1)
			if !fn(g, i) {
				return
			}
		}
	}, func() { start = time.Now() })
	h.report(t)
	return int(calls.Load())
}

// hammer runs functions on goroutines and collects how they ended.
type hammer struct {
	stop     atomic.Bool // set on the first abnormal end
	mu       sync.Mutex
	failures []string
}

// run starts body(g) on n goroutines, calls each of before (on this
// goroutine, once every goroutine exists), releases them all at once and
// waits for them.
func (h *hammer) run(n int, body func(g int), before ...func()) {
	var wg sync.WaitGroup
	release := make(chan struct{})
	for g := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			returned := false
			defer func() {
				if r := recover(); r != nil {
					h.fail(fmt.Sprintf("goroutine %d panicked: %v\n%s", g, r, debug.Stack()))
				} else if !returned {
					// A panic was ruled out: only runtime.Goexit ends a
					// function this way, and t.FailNow is what calls it.
					h.fail(fmt.Sprintf("goroutine %d called runtime.Goexit (t.Fatal or t.FailNow?): "+
						"report failures from hammered functions with t.Error", g))
				}
			}()
			<-release
			body(g)
			returned = true
		}()
	}
	for _, f := range before {
		f()
	}
	close(release)
	wg.Wait()
}

func (h *hammer) fail(msg string) {
	h.stop.Store(true)
	h.mu.Lock()
	h.failures = append(h.failures, msg)
	h.mu.Unlock()
}

// report fails t with the first few failures and a count of the rest.
func (h *hammer) report(t testing.TB) {
	t.Helper()
	if len(h.failures) == 0 {
		return
	}
	const show = 3
	for _, f := range h.failures[:min(show, len(h.failures))] {
		t.Error("redistest: " + f)
	}
	if len(h.failures) > show {
		t.Errorf("redistest: and %d more goroutines ended the same way", len(h.failures)-show)
	}
	t.FailNow()
}
