package layercache_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/layercache/layercache"
	"github.com/layercache/layercache/internal/envelope"
	"github.com/layercache/layercache/internal/redistest"
	"github.com/redis/go-redis/v9"
	"go.uber.org/goleak"
)

// instances returns n caches of one namespace, each on its own client: n
// processes sharing one Redis, as far as the caches can tell.
func instances(t *testing.T, tgt *redistest.Target, n int, ns string, opts ...layercache.Option) []*layercache.Cache[user] {
	t.Helper()
	cs := make([]*layercache.Cache[user], n)
	for i := range cs {
		cs[i] = newCache[user](t, tgt.NewClient(t), append([]layercache.Option{layercache.WithNamespace(ns)}, opts...)...)
	}
	return cs
}

func sumStats(cs []*layercache.Cache[user]) layercache.Stats {
	var s layercache.Stats
	for _, c := range cs {
		st := c.Stats()
		s.Loads += st.Loads
		s.LeasesAcquired += st.LeasesAcquired
		s.LeaseWaits += st.LeaseWaits
		s.LeaseWaitTimeouts += st.LeaseWaitTimeouts
		s.LeasesLost += st.LeasesLost
		s.Writes += st.Writes
	}
	return s
}

func leaseKey(ns, key string) string { return layercache.RedisKey(ns, "v1", key) + ":lease" }

// TestLocksOneLoadAcrossInstances is the headline: 8 instances,
// 125 callers each, all cold on one key, a 100ms loader: one load in all.
// The lease TTL is long (30s), so waiters can only finish early if the fill
// notice wakes them; polling would wait for the lease to run out.
func TestLocksOneLoadAcrossInstances(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		const nInst, perInst = 8, 125
		ctx := context.Background()
		cs := instances(t, tgt, nInst, redistest.Namespace(t), layercache.WithLocks(30*time.Second, 30*time.Second))
		var loads counter
		load := loads.user(7, 100*time.Millisecond)
		// Connect every client first, so the measurement is of the cache,
		// not of 8 TCP handshakes.
		for _, c := range cs {
			if _, err := c.Get(ctx, "warmup"); !errors.Is(err, layercache.ErrNotFound) {
				t.Fatal(err)
			}
		}

		start := make(chan struct{})
		errs := make(chan error, nInst*perInst)
		var wg sync.WaitGroup
		for _, c := range cs {
			for range perInst {
				wg.Add(1)
				go func() {
					defer wg.Done()
					<-start
					got, err := c.Fetch(ctx, "hot", load)
					if err == nil && got.ID != 7 {
						err = fmt.Errorf("got %+v", got)
					}
					errs <- err
				}()
			}
		}
		t0 := time.Now()
		close(start)
		wg.Wait()
		took := time.Since(t0)
		close(errs)
		for err := range errs {
			if err != nil {
				t.Fatal(err)
			}
		}
		st := sumStats(cs)
		t.Logf("%s: %d callers on %d instances served in %v; loads %d, leases %d, lease waits %d",
			tgt.Name, nInst*perInst, nInst, took, loads.n.Load(), st.LeasesAcquired, st.LeaseWaits)
		if n := loads.n.Load(); n != 1 {
			t.Fatalf("%d loads across %d instances, want exactly 1", n, nInst)
		}
		if st.LeasesAcquired != 1 || st.LeaseWaitTimeouts != 0 {
			t.Fatalf("stats %+v", st)
		}
		// "Well under a second" on a quiet machine; 2 shared cores under
		// -race get a wide margin.
		if took > 3*time.Second {
			t.Fatalf("serving every caller took %v", took)
		}
	})
}

// TestLockDeadHolderRecovery takes the lease by hand and never releases it,
// as a crashed holder would: the reader takes over when it expires.
func TestLockDeadHolderRecovery(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		if tgt.Mini != nil {
			tgt.Mini.ClockTTL(true) // miniredis expires keys only when told
		}
		ctx := context.Background()
		client := tgt.NewClient(t)
		ns := redistest.Namespace(t)
		c := newCache[user](t, client, layercache.WithNamespace(ns), layercache.WithLocks(time.Second, 10*time.Second))
		if ok, err := client.SetNX(ctx, leaseKey(ns, "k"), "dead-holder", time.Second).Result(); err != nil || !ok {
			t.Fatalf("SET NX of the lease = %v, %v", ok, err)
		}
		var loads counter
		t0 := time.Now()
		got, err := c.Fetch(ctx, "k", loads.user(3, 0))
		took := time.Since(t0)
		t.Logf("%s: value behind a dead 1s lease after %v", tgt.Name, took)
		if err != nil || got.ID != 3 {
			t.Fatalf("Fetch = %+v, %v", got, err)
		}
		if took > 2500*time.Millisecond {
			t.Fatalf("reader behind a dead 1s lease waited %v, want well under 2.5s", took)
		}
		if st := c.Stats(); st.LeaseWaits != 1 || st.LeasesAcquired != 1 || st.LeaseWaitTimeouts != 0 || st.Writes != 1 {
			t.Fatalf("stats %+v", st)
		}
	})
}

// blockingLoader returns a loader that signals when it starts and returns
// u once released.
func blockingLoader(u user) (load func(context.Context) (user, error), started, release chan struct{}) {
	started, release = make(chan struct{}), make(chan struct{})
	var once sync.Once
	return func(ctx context.Context) (user, error) {
		once.Do(func() { close(started) })
		select {
		case <-release:
			return u, nil
		case <-ctx.Done():
			return user{}, ctx.Err()
		}
	}, started, release
}

// TestLockDeleteDuringLoadAcrossInstances: a Delete in one process while
// another process loads under the lease breaks the lease, so the load
// (which may have read the source before the write behind the Delete) is
// returned to its callers but never cached.
func TestLockDeleteDuringLoadAcrossInstances(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		ns := redistest.Namespace(t)
		cs := instances(t, tgt, 2, ns, layercache.WithLocks(10*time.Second, 10*time.Second))
		a, b := cs[0], cs[1]
		load, started, release := blockingLoader(user{ID: 1, Name: "before delete"})
		done := make(chan user, 1)
		go func() {
			got, _ := a.Fetch(ctx, "d", load)
			done <- got
		}()
		<-started
		if err := b.Delete(ctx, "d"); err != nil {
			t.Fatal(err)
		}
		close(release)
		if got := <-done; got.Name != "before delete" {
			t.Fatalf("the holder's caller did not get what was loaded: %+v", got)
		}
		waitFor(t, func() bool { return a.Stats().LeasesLost == 1 })
		for _, c := range cs {
			if _, err := c.Get(ctx, "d"); !errors.Is(err, layercache.ErrNotFound) {
				t.Fatalf("a load that started before Delete was cached after it: %v", err)
			}
		}
		// The next reader loads afresh and caches.
		var loads counter
		if got, err := b.Fetch(ctx, "d", loads.user(2, 0)); err != nil || got.ID != 2 {
			t.Fatalf("Fetch after the Delete = %+v, %v", got, err)
		}
		if got, err := a.Get(ctx, "d"); err != nil || got.ID != 2 {
			t.Fatalf("Get = %+v, %v", got, err)
		}
	})
}

// TestLockLostMidLoadIsNotWritten: a holder whose lease was deleted or
// taken over during its load never writes over the key.
func TestLockLostMidLoadIsNotWritten(t *testing.T) {
	cases := map[string]func(ctx context.Context, client redis.UniversalClient, lease string) error{
		"deleted": func(ctx context.Context, client redis.UniversalClient, lease string) error {
			return client.Del(ctx, lease).Err()
		},
		"taken over": func(ctx context.Context, client redis.UniversalClient, lease string) error {
			return client.Set(ctx, lease, "another-holder", time.Minute).Err()
		},
	}
	for name, breakLease := range cases {
		t.Run(name, func(t *testing.T) {
			redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
				ctx := context.Background()
				client := tgt.NewClient(t)
				ns := redistest.Namespace(t)
				// A short lease renewed during the load: renewals find the
				// loss before the fill does.
				c := newCache[user](t, client, layercache.WithNamespace(ns), layercache.WithLocks(300*time.Millisecond, time.Second))
				load, started, release := blockingLoader(user{ID: 1, Name: "loaded"})
				done := make(chan error, 1)
				go func() {
					got, err := c.Fetch(ctx, "k", load)
					if err == nil && got.Name != "loaded" {
						err = fmt.Errorf("got %+v", got)
					}
					done <- err
				}()
				<-started
				if err := breakLease(ctx, client, leaseKey(ns, "k")); err != nil {
					t.Fatal(err)
				}
				close(release)
				if err := <-done; err != nil {
					t.Fatalf("the holder's caller: %v", err)
				}
				if n, err := client.Exists(ctx, layercache.RedisKey(ns, "v1", "k")).Result(); err != nil || n != 0 {
					t.Fatalf("a holder that lost its lease wrote the value (EXISTS = %d, %v)", n, err)
				}
				st := c.Stats()
				if st.LeasesLost != 1 || st.Writes != 0 {
					t.Fatalf("stats %+v", st)
				}
				if name == "taken over" {
					if v, _ := client.Get(ctx, leaseKey(ns, "k")).Result(); v != "another-holder" {
						t.Fatalf("the other holder's lease was touched: %q", v)
					}
				}
			})
		})
	}
}

// TestLockSetBreaksLease: a Set in one process while another loads under
// the lease wins; the older load is not written over it.
func TestLockSetBreaksLease(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		ns := redistest.Namespace(t)
		cs := instances(t, tgt, 2, ns, layercache.WithLocks(10*time.Second, 10*time.Second))
		a, b := cs[0], cs[1]
		load, started, release := blockingLoader(user{ID: 1, Name: "old"})
		done := make(chan struct{})
		go func() { defer close(done); _, _ = a.Fetch(ctx, "s", load) }()
		<-started
		if err := b.Set(ctx, "s", user{ID: 1, Name: "new"}); err != nil {
			t.Fatal(err)
		}
		close(release)
		<-done
		if got, err := a.Get(ctx, "s"); err != nil || got.Name != "new" {
			t.Fatalf("after a Set during a load elsewhere, Get = %+v, %v; want the Set's value", got, err)
		}
		if st := a.Stats(); st.LeasesLost != 1 {
			t.Fatalf("stats %+v", st)
		}
	})
}

// TestLockLoaderPanicReleasesLease: a panicking holder releases its lease at
// once, so a waiter elsewhere takes over instead of waiting out the TTL.
func TestLockLoaderPanicReleasesLease(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		ns := redistest.Namespace(t)
		client := tgt.NewClient(t)
		cs := instances(t, tgt, 2, ns, layercache.WithLocks(30*time.Second, 30*time.Second))
		a, b := cs[0], cs[1]
		started, release := make(chan struct{}), make(chan struct{})
		aErr := make(chan error, 1)
		go func() {
			_, err := a.Fetch(ctx, "p", func(context.Context) (user, error) {
				close(started)
				<-release
				panic("boom")
			})
			aErr <- err
		}()
		<-started
		var loads counter
		bDone := make(chan error, 1)
		go func() {
			got, err := b.Fetch(ctx, "p", loads.user(9, 0))
			if err == nil && got.ID != 9 {
				err = fmt.Errorf("got %+v", got)
			}
			bDone <- err
		}()
		waitFor(t, func() bool { return b.Stats().LeaseWaits == 1 })
		t0 := time.Now()
		close(release)
		if err := <-aErr; !errors.Is(err, layercache.ErrLoaderPanic) {
			t.Fatalf("holder's caller got %v, want the panic", err)
		}
		if err := <-bDone; err != nil {
			t.Fatalf("waiter: %v", err)
		}
		if took := time.Since(t0); took > 3*time.Second {
			t.Fatalf("the waiter took over %v after the panic; the lease was not released", took)
		}
		if st := b.Stats(); st.LeasesAcquired != 1 || st.LeaseWaitTimeouts != 0 {
			t.Fatalf("waiter stats %+v", st)
		}
		if a.Stats().LoadPanics != 1 {
			t.Fatalf("holder stats %+v", a.Stats())
		}
		// b's fill released its own lease; a's is long gone.
		if n, _ := client.Exists(ctx, leaseKey(ns, "p")).Result(); n != 0 {
			t.Fatal("a lease is left behind")
		}
	})
}

// TestLockWaitTimeout: a waiter whose wait runs out loads by itself, says
// so, and leaves the caching to the holder.
func TestLockWaitTimeout(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		ns := redistest.Namespace(t)
		holder := newCache[user](t, tgt.NewClient(t), layercache.WithNamespace(ns), layercache.WithLocks(10*time.Second, 10*time.Second))
		waiter := newCache[user](t, tgt.NewClient(t), layercache.WithNamespace(ns), layercache.WithLocks(10*time.Second, 200*time.Millisecond))
		load, started, release := blockingLoader(user{ID: 1, Name: "holder"})
		holderDone := make(chan struct{})
		go func() { defer close(holderDone); _, _ = holder.Fetch(ctx, "w", load) }()
		<-started
		var loads counter
		t0 := time.Now()
		got, err := waiter.Fetch(ctx, "w", loads.user(2, 0))
		took := time.Since(t0)
		if err != nil || got.ID != 2 {
			t.Fatalf("waiter Fetch = %+v, %v", got, err)
		}
		if took < 200*time.Millisecond || took > 3*time.Second {
			t.Fatalf("waiter with a 200ms wait returned after %v", took)
		}
		st := waiter.Stats()
		if st.LeaseWaitTimeouts != 1 || st.Loads != 1 || st.Writes != 0 {
			t.Fatalf("waiter stats %+v", st)
		}
		close(release)
		<-holderDone
		if got, err := waiter.Get(ctx, "w"); err != nil || got.Name != "holder" {
			t.Fatalf("Get = %+v, %v; want the holder's value", got, err)
		}
	})
}

// TestLockWaiterSurvivesSubscriptionLoss kills the pub/sub connections
// while a waiter waits for a fill: go-redis re-subscribes, the waiter looks
// again, and the fill's notice still wakes it long before the 30s lease
// would run out.
func TestLockWaiterSurvivesSubscriptionLoss(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		ns := redistest.Namespace(t)
		cs := instances(t, tgt, 2, ns, layercache.WithLocks(30*time.Second, 30*time.Second))
		a, b := cs[0], cs[1]
		load, started, release := blockingLoader(user{ID: 5})
		go func() { _, _ = a.Fetch(ctx, "r", load) }()
		<-started
		done := make(chan error, 1)
		go func() {
			got, err := b.Fetch(ctx, "r", func(context.Context) (user, error) { return user{}, errors.New("waiter loaded") })
			if err == nil && got.ID != 5 {
				err = fmt.Errorf("got %+v", got)
			}
			done <- err
		}()
		waitFor(t, func() bool { return b.Stats().LeaseWaits == 1 })
		if n := redistest.KillClients(ctx, t, tgt, "pubsub"); n == 0 {
			t.Fatal("no pub/sub connection to kill")
		}
		close(release)
		select {
		case err := <-done:
			if err != nil {
				t.Fatal(err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("the waiter missed the fill after its subscription was killed")
		}
	})
}

// TestLockNegativeAndErrors: a "not found" is cached under the lease and
// seen by waiters; a failed load releases the lease so a waiter retries.
func TestLockNegativeAndErrors(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		ns := redistest.Namespace(t)
		cs := instances(t, tgt, 2, ns, layercache.WithLocks(30*time.Second, 30*time.Second))
		a, b := cs[0], cs[1]

		for _, tc := range []struct {
			key     string
			aErr    error
			wantB   error
			bLoads  int64
			wantBID int
		}{
			{key: "missing", aErr: layercache.ErrNotFound, wantB: layercache.ErrNotFound, bLoads: 0},
			{key: "failing", aErr: errors.New("db down"), wantB: nil, bLoads: 1, wantBID: 4},
		} {
			started, release := make(chan struct{}), make(chan struct{})
			go func() {
				_, _ = a.Fetch(ctx, tc.key, func(context.Context) (user, error) {
					close(started)
					<-release
					return user{}, tc.aErr
				})
			}()
			<-started
			var loads counter
			done := make(chan error, 1)
			var got user
			waitsBefore := b.Stats().LeaseWaits
			go func() {
				var err error
				got, err = b.Fetch(ctx, tc.key, loads.user(4, 0))
				done <- err
			}()
			waitFor(t, func() bool { return b.Stats().LeaseWaits == waitsBefore+1 })
			close(release)
			if err := <-done; !errors.Is(err, tc.wantB) && err != tc.wantB {
				t.Fatalf("%s: waiter got %v, want %v", tc.key, err, tc.wantB)
			}
			if loads.n.Load() != tc.bLoads || got.ID != tc.wantBID {
				t.Fatalf("%s: waiter loaded %d times and got %+v", tc.key, loads.n.Load(), got)
			}
		}
	})
}

// putEnvelope writes an envelope for key by hand, as another process would.
func putEnvelope(t *testing.T, client redis.UniversalClient, ns, key string, hdr envelope.Header, v user) {
	t.Helper()
	payload, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	if err := client.Set(context.Background(), layercache.RedisKey(ns, "v1", key), envelope.Encode(hdr, payload), time.Hour).Err(); err != nil {
		t.Fatal(err)
	}
}

// TestEarlyRefreshSpreads checks XFetch with a manual clock: 50 values
// written together, each loaded in 1s, are refreshed at different moments
// before their common expiry rather than all missing at once, and never
// long before it.
func TestEarlyRefreshSpreads(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		client := tgt.NewClient(t)
		ns := redistest.Namespace(t)
		t0 := time.Unix(1_700_000_000, 0)
		clock := layercache.NewManualClock(t0)
		c := newCache[user](t, client, layercache.WithNamespace(ns), layercache.WithClock(clock),
			layercache.WithTTL(time.Minute), layercache.WithEarlyRefresh(1))
		const n = 50
		expiry := t0.Add(time.Minute)
		for i := range n {
			putEnvelope(t, client, ns, fmt.Sprint(i), envelope.Header{
				WrittenAt: t0.UnixMilli(), FreshUntil: expiry.UnixMilli(), ExpiresAt: expiry.UnixMilli(),
				LoadDuration: time.Second,
			}, user{ID: i})
		}
		var mu sync.Mutex
		refreshedAt := map[int]time.Duration{} // key -> time before expiry
		load := func(i int) func(context.Context) (user, error) {
			return func(context.Context) (user, error) {
				mu.Lock()
				refreshedAt[i] = expiry.Sub(clock.Now())
				mu.Unlock()
				return user{ID: i, Name: "refreshed"}, nil
			}
		}
		refreshed := func() int { mu.Lock(); defer mu.Unlock(); return len(refreshedAt) }

		const step = 250 * time.Millisecond
		clock.Set(expiry.Add(-20 * time.Second))
		for clock.Now().Before(expiry) {
			for i := range n {
				mu.Lock()
				_, done := refreshedAt[i]
				mu.Unlock()
				if done {
					continue
				}
				got, err := c.Fetch(ctx, fmt.Sprint(i), load(i))
				if err != nil || got.ID != i {
					t.Fatalf("Fetch(%d) = %+v, %v", i, got, err)
				}
			}
			// Let the refreshes started at this instant read the clock
			// before it moves.
			want := int(c.Stats().EarlyRefreshes)
			waitFor(t, func() bool { return refreshed() == want })
			clock.Advance(step)
		}
		st := c.Stats()
		steps := map[time.Duration]bool{}
		var earliest time.Duration
		for _, before := range refreshedAt {
			steps[before] = true
			earliest = max(earliest, before)
		}
		t.Logf("%s: %d of %d refreshed early, over %d distinct instants, earliest %v before expiry; stats %+v",
			tgt.Name, len(refreshedAt), n, len(steps), earliest, st)
		if len(refreshedAt) < n*9/10 {
			t.Fatalf("only %d of %d hot values were refreshed before expiry", len(refreshedAt), n)
		}
		if len(steps) < 4 {
			t.Fatalf("refreshes bunched on %d instants; XFetch should spread them", len(steps))
		}
		if earliest > 15*time.Second {
			t.Fatalf("a value loaded in 1s was refreshed %v before expiry", earliest)
		}
		if st.RefreshesSkipped != 0 || st.Misses != 0 {
			t.Fatalf("stats %+v", st)
		}
	})
}

// TestEarlyRefreshOneRefresher: with two instances on one value near its
// expiry, one refreshes and the other skips; neither caller waits.
func TestEarlyRefreshOneRefresher(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		client := tgt.NewClient(t)
		ns := redistest.Namespace(t)
		t0 := time.Unix(1_700_000_000, 0)
		clock := layercache.NewManualClock(t0.Add(time.Minute - time.Millisecond))
		cs := instances(t, tgt, 2, ns, layercache.WithClock(clock), layercache.WithEarlyRefresh(1000))
		putEnvelope(t, client, ns, "e", envelope.Header{
			WrittenAt: t0.UnixMilli(), FreshUntil: t0.Add(time.Minute).UnixMilli(), ExpiresAt: t0.Add(time.Minute).UnixMilli(),
			LoadDuration: time.Second,
		}, user{ID: 1, Name: "old"})
		load, started, release := blockingLoader(user{ID: 1, Name: "new"})
		if got, err := cs[0].Fetch(ctx, "e", load); err != nil || got.Name != "old" {
			t.Fatalf("first Fetch = %+v, %v; want the cached value at once", got, err)
		}
		<-started // the refresh runs and holds the lease
		if got, err := cs[1].Fetch(ctx, "e", load); err != nil || got.Name != "old" {
			t.Fatalf("second Fetch = %+v, %v", got, err)
		}
		waitFor(t, func() bool { return cs[1].Stats().RefreshesSkipped == 1 })
		close(release)
		waitFor(t, func() bool { got, err := cs[1].Get(ctx, "e"); return err == nil && got.Name == "new" })
		if a, b := cs[0].Stats(), cs[1].Stats(); a.EarlyRefreshes != 1 || b.EarlyRefreshes != 1 || a.Loads+b.Loads != 1 {
			t.Fatalf("stats %+v / %+v", a, b)
		}
	})
}

// versions is a loader whose values count up; fail makes it fail.
type versions struct {
	n    atomic.Int64
	fail atomic.Bool
	gate chan struct{} // if not nil, each load waits for a receive
}

func (v *versions) load(ctx context.Context) (user, error) {
	if v.gate != nil {
		select {
		case <-v.gate:
		case <-ctx.Done():
			return user{}, ctx.Err()
		}
	}
	n := v.n.Add(1)
	if v.fail.Load() {
		return user{}, errors.New("db down")
	}
	return user{ID: int(n), Name: fmt.Sprint("v", n)}, nil
}

func TestStaleWhileRevalidate(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		ns := redistest.Namespace(t)
		clock := layercache.NewManualClock(time.Unix(1_700_000_000, 0))
		cs := instances(t, tgt, 2, ns, layercache.WithClock(clock), layercache.WithTTL(time.Minute),
			layercache.WithStaleWhileRevalidate(time.Minute))
		a, b := cs[0], cs[1]
		v := &versions{gate: make(chan struct{})}
		go func() { v.gate <- struct{}{} }()
		if got, err := a.Fetch(ctx, "s", v.load); err != nil || got.Name != "v1" {
			t.Fatalf("first Fetch = %+v, %v", got, err)
		}
		if pttl, _ := tgt.NewClient(t).PTTL(ctx, layercache.RedisKey(ns, "v1", "s")).Result(); pttl <= time.Minute {
			t.Fatalf("physical TTL %v; want the fresh TTL plus the grace", pttl)
		}

		clock.Advance(61 * time.Second) // stale, within the grace
		// The refresh's loader is blocked on the gate: callers must not be.
		fetchStale := func(c *layercache.Cache[user]) {
			t.Helper()
			if got, err := c.Fetch(ctx, "s", v.load); err != nil || got.Name != "v1" {
				t.Fatalf("stale Fetch = %+v, %v; want v1 at once", got, err)
			}
		}
		fetchStale(a)
		fetchStale(a) // a refresh of the key runs here already
		if _, err := a.Get(ctx, "s"); !errors.Is(err, layercache.ErrNotFound) {
			t.Fatalf("Get of a stale value = %v, want ErrNotFound", err)
		}
		// Once a's refresh holds the lease, b's finds it taken.
		waitFor(t, func() bool { return a.Stats().LeasesAcquired == 1 })
		fetchStale(b)
		waitFor(t, func() bool { return b.Stats().RefreshesSkipped == 1 })
		v.gate <- struct{}{}
		waitFor(t, func() bool { got, err := b.Get(ctx, "s"); return err == nil && got.Name == "v2" })
		if sa, sb := a.Stats(), b.Stats(); sa.StaleHits != 2 || sb.StaleHits != 1 || sa.Loads != 2 || sb.Loads != 0 {
			t.Fatalf("stats %+v / %+v", sa, sb)
		}

		// Past the grace, a stale value is a miss: the caller waits.
		clock.Advance(3 * time.Minute)
		go func() { v.gate <- struct{}{} }()
		if got, err := b.Fetch(ctx, "s", v.load); err != nil || got.Name != "v3" {
			t.Fatalf("Fetch past the grace = %+v, %v; want a fresh load", got, err)
		}
	})
}

func TestFailSafe(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		clock := layercache.NewManualClock(time.Unix(1_700_000_000, 0))
		c := newCache[user](t, tgt.NewClient(t), layercache.WithNamespace(redistest.Namespace(t)),
			layercache.WithClock(clock), layercache.WithTTL(time.Minute),
			layercache.WithStaleWhileRevalidate(5*time.Minute), layercache.WithFailSafe(10*time.Second))
		v := &versions{}
		if got, err := c.Fetch(ctx, "f", v.load); err != nil || got.Name != "v1" {
			t.Fatalf("first Fetch = %+v, %v", got, err)
		}
		v.fail.Store(true)
		clock.Advance(61 * time.Second)
		if got, err := c.Fetch(ctx, "f", v.load); err != nil || got.Name != "v1" {
			t.Fatalf("stale Fetch = %+v, %v", got, err)
		}
		waitFor(t, func() bool { return c.Stats().RefreshErrors == 1 })
		// The source is failing: the stale value is served and the loader
		// left alone for the backoff.
		for range 5 {
			if got, err := c.Fetch(ctx, "f", v.load); err != nil || got.Name != "v1" {
				t.Fatalf("fail-safe Fetch = %+v, %v", got, err)
			}
		}
		if st := c.Stats(); st.FailSafeHits != 5 || v.n.Load() != 2 {
			t.Fatalf("during the backoff: loads %d, stats %+v", v.n.Load(), st)
		}
		// After the backoff, one retry; it succeeds this time.
		v.fail.Store(false)
		clock.Advance(11 * time.Second)
		if got, err := c.Fetch(ctx, "f", v.load); err != nil || got.Name != "v1" {
			t.Fatalf("Fetch after the backoff = %+v, %v", got, err)
		}
		waitFor(t, func() bool { got, err := c.Get(ctx, "f"); return err == nil && got.Name == "v3" })
		if st := c.Stats(); st.FailSafeHits != 5 || st.RefreshErrors != 1 || st.StaleHits != 7 {
			t.Fatalf("stats %+v", st)
		}
	})
}

func TestStampedeOptionErrors(t *testing.T) {
	client := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1"})
	defer client.Close()
	inf := 1 / func() float64 { return 0 }()
	cases := map[string][]layercache.Option{
		"lease TTL zero":        {layercache.WithLocks(0, time.Second)},
		"lease TTL too short":   {layercache.WithLocks(5*time.Millisecond, time.Second)},
		"wait zero":             {layercache.WithLocks(time.Second, 0)},
		"beta zero":             {layercache.WithEarlyRefresh(0)},
		"beta negative":         {layercache.WithEarlyRefresh(-1)},
		"beta NaN":              {layercache.WithEarlyRefresh(nanFloat())},
		"beta infinite":         {layercache.WithEarlyRefresh(inf)},
		"grace zero":            {layercache.WithStaleWhileRevalidate(0)},
		"backoff zero":          {layercache.WithStaleWhileRevalidate(time.Minute), layercache.WithFailSafe(0)},
		"fail-safe, no stale":   {layercache.WithFailSafe(time.Second)},
		"negative lease wait":   {layercache.WithLocks(time.Second, -time.Second)},
		"negative grace":        {layercache.WithStaleWhileRevalidate(-time.Second)},
		"negative backoff":      {layercache.WithStaleWhileRevalidate(time.Minute), layercache.WithFailSafe(-time.Second)},
		"negative lease TTL":    {layercache.WithLocks(-time.Second, time.Second)},
		"fail-safe before none": {layercache.WithFailSafe(time.Second), layercache.WithTTL(time.Minute)},
	}
	for name, opts := range cases {
		if _, err := layercache.New[user](client, opts...); !errors.Is(err, layercache.ErrInvalidOption) {
			t.Errorf("%s: New = %v, want ErrInvalidOption", name, err)
		}
	}
	c, err := layercache.New[user](client, layercache.WithLocks(time.Second, time.Second), layercache.WithEarlyRefresh(1),
		layercache.WithFailSafe(time.Second), layercache.WithStaleWhileRevalidate(time.Minute))
	if err != nil {
		t.Fatalf("every option together, fail-safe first: %v", err)
	}
	_ = c.Close()
}

// TestCloseStopsBackgroundWork leaves a waiter blocked behind a foreign
// lease (so the notice subscription runs) and a background refresh blocked
// in its loader, then closes the cache: nothing may be left running.
func TestCloseStopsBackgroundWork(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		// The client is made by hand: t.Cleanup would close it only after
		// the leak check.
		var client redis.UniversalClient
		if tgt.Cluster {
			client = redis.NewClusterClient(&redis.ClusterOptions{Addrs: tgt.Addrs})
		} else {
			client = redis.NewClient(&redis.Options{Addr: tgt.Addrs[0]})
		}
		defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
		defer client.Close()

		ctx := context.Background()
		ns := redistest.Namespace(t)
		clock := layercache.NewManualClock(time.Unix(1_700_000_000, 0))
		c, err := layercache.New[user](client, layercache.WithLogger(quiet), layercache.WithNamespace(ns), layercache.WithClock(clock),
			layercache.WithTTL(time.Minute), layercache.WithLocks(time.Minute, time.Minute),
			layercache.WithStaleWhileRevalidate(time.Minute), layercache.WithEarlyRefresh(1))
		if err != nil {
			t.Fatal(err)
		}
		// A value that will be stale, and a refresh stuck in its loader.
		if err := c.Set(ctx, "stale", user{ID: 1}); err != nil {
			t.Fatal(err)
		}
		clock.Advance(61 * time.Second)
		stuck := make(chan struct{})
		if _, err := c.Fetch(ctx, "stale", func(ctx context.Context) (user, error) {
			close(stuck)
			<-ctx.Done()
			return user{}, ctx.Err()
		}); err != nil {
			t.Fatal(err)
		}
		<-stuck
		// A waiter behind a lease nobody will release.
		if err := client.Set(ctx, leaseKey(ns, "held"), "someone", time.Minute).Err(); err != nil {
			t.Fatal(err)
		}
		waiterErr := make(chan error, 1)
		go func() {
			_, err := c.Fetch(ctx, "held", func(context.Context) (user, error) { return user{}, nil })
			waiterErr <- err
		}()
		waitFor(t, func() bool { return c.Stats().LeaseWaits == 1 })

		if err := c.Close(); err != nil {
			t.Fatal(err)
		}
		if err := <-waiterErr; !errors.Is(err, layercache.ErrClosed) {
			t.Fatalf("waiter after Close: %v, want ErrClosed", err)
		}
		_ = client.Del(ctx, leaseKey(ns, "held")).Err()
	})
}

// TestLockWaitersOnManyKeys has one instance wait on 30 keys at once,
// spread over every cluster node, behind another instance's leases: each
// notice must reach its own waiter through the shared subscription (one
// connection per node). The 30s leases rule out polling.
func TestLockWaitersOnManyKeys(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		const n = 30
		ctx := context.Background()
		cs := instances(t, tgt, 2, redistest.Namespace(t), layercache.WithLocks(30*time.Second, 30*time.Second))
		a, b := cs[0], cs[1]
		release := make(chan struct{})
		var holding sync.WaitGroup
		for i := range n {
			holding.Add(1)
			go func() {
				_, _ = a.Fetch(ctx, fmt.Sprint("key-", i), func(context.Context) (user, error) {
					holding.Done()
					<-release
					return user{ID: i}, nil
				})
			}()
		}
		holding.Wait()
		errs := make(chan error, n)
		for i := range n {
			go func() {
				got, err := b.Fetch(ctx, fmt.Sprint("key-", i), func(context.Context) (user, error) {
					return user{}, errors.New("the waiter loaded")
				})
				if err == nil && got.ID != i {
					err = fmt.Errorf("key-%d: got %+v", i, got)
				}
				errs <- err
			}()
		}
		waitFor(t, func() bool { return b.Stats().LeaseWaits == n })
		t0 := time.Now()
		close(release)
		for range n {
			if err := <-errs; err != nil {
				t.Fatal(err)
			}
		}
		t.Logf("%s: %d waiters on %d keys woken within %v", tgt.Name, n, n, time.Since(t0))
		if took := time.Since(t0); took > 3*time.Second {
			t.Fatalf("waiters took %v after the fills", took)
		}
	})
}

// TestLockRing: a Ring has no shared subscription (it cannot move a
// subscription between shards), so its waiters poll; they still get the
// holder's value without loading.
func TestLockRing(t *testing.T) {
	tgt := redistest.Miniredis(t)
	newRing := func() *redis.Ring {
		r := redis.NewRing(&redis.RingOptions{Addrs: map[string]string{"a": tgt.Addrs[0]}})
		t.Cleanup(func() { _ = r.Close() })
		return r
	}
	ctx := context.Background()
	ns := redistest.Namespace(t)
	a := newCache[user](t, newRing(), layercache.WithNamespace(ns), layercache.WithLocks(30*time.Second, 30*time.Second))
	b := newCache[user](t, newRing(), layercache.WithNamespace(ns), layercache.WithLocks(30*time.Second, 30*time.Second))
	load, started, release := blockingLoader(user{ID: 8})
	go func() { _, _ = a.Fetch(ctx, "r", load) }()
	<-started
	done := make(chan error, 1)
	go func() {
		got, err := b.Fetch(ctx, "r", func(context.Context) (user, error) { return user{}, errors.New("the waiter loaded") })
		if err == nil && got.ID != 8 {
			err = fmt.Errorf("got %+v", got)
		}
		done <- err
	}()
	waitFor(t, func() bool { return b.Stats().LeaseWaits == 1 })
	close(release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}
