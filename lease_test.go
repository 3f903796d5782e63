package layercache_test

import (
	"context"
	"testing"
	"time"

	"github.com/layercache/layercache"
	"github.com/layercache/layercache/internal/redistest"
)

// TestLeaseWaitRunsOnTheCacheClock: a waiter behind a holder that never
// fills gives up when the cache's Clock says its wait is over, not after
// that much real time: a test moves a ManualClock instead of sleeping.
func TestLeaseWaitRunsOnTheCacheClock(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		ns := redistest.Namespace(t)
		client := tgt.NewClient(t)
		clock := layercache.NewManualClock(time.Now())
		c := newCache[user](t, client, layercache.WithNamespace(ns), layercache.WithClock(clock),
			layercache.WithLocks(time.Hour, time.Hour))
		// A holder that never fills nor releases, with a lease that will
		// not expire in this test's real time.
		if err := client.Set(ctx, leaseKey(ns, "k"), "stuck-holder", time.Hour).Err(); err != nil {
			t.Fatal(err)
		}
		var loads counter
		done := make(chan user, 1)
		go func() {
			u, err := c.Fetch(ctx, "k", loads.user(5, 0))
			if err != nil {
				t.Error(err)
			}
			done <- u
		}()
		waitFor(t, func() bool { return c.Stats().LeaseWaits == 1 })
		select {
		case <-done:
			t.Fatal("the waiter gave up before its wait was over by the cache's clock")
		case <-time.After(50 * time.Millisecond):
		}
		// Past the wait (and past the stuck lease's TTL by the clock): the
		// waiter loads by itself.
		for range 4 {
			clock.Advance(40 * time.Minute)
			select {
			case u := <-done:
				if u.ID != 5 || loads.n.Load() != 1 {
					t.Fatalf("got %+v after %d loads", u, loads.n.Load())
				}
				if st := c.Stats(); st.LeaseWaitTimeouts != 1 {
					t.Fatalf("stats %+v", st)
				}
				return
			case <-time.After(200 * time.Millisecond):
			}
		}
		t.Fatal("the waiter did not give up after its wait, by the cache's clock, was over")
	})
}
