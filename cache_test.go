package layercache_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"runtime"
	"strings"
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

type user struct {
	ID   int    `json:"id"`
	Name string `json:"name"`
}

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

func newCache[T any](t *testing.T, client redis.UniversalClient, opts ...layercache.Option) *layercache.Cache[T] {
	t.Helper()
	c, err := layercache.New[T](client, append([]layercache.Option{layercache.WithLogger(quiet)}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// counter is a loader that counts its calls.
type counter struct{ n atomic.Int64 }

func (c *counter) user(id int, delay time.Duration) func(context.Context) (user, error) {
	return func(ctx context.Context) (user, error) {
		c.n.Add(1)
		if delay > 0 {
			select {
			case <-time.After(delay):
			case <-ctx.Done():
				return user{}, ctx.Err()
			}
		}
		return user{ID: id, Name: fmt.Sprint("user-", id)}, nil
	}
}

func TestFetchMissThenHit(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		client := tgt.NewClient(t)
		ns := redistest.Namespace(t)
		c := newCache[user](t, client, layercache.WithNamespace(ns))
		var loads counter

		got, err := c.Fetch(ctx, "42", loads.user(42, 0))
		if err != nil || got.ID != 42 {
			t.Fatalf("first Fetch = %+v, %v", got, err)
		}
		got, err = c.Fetch(ctx, "42", loads.user(42, 0))
		if err != nil || got.ID != 42 {
			t.Fatalf("second Fetch = %+v, %v", got, err)
		}
		if n := loads.n.Load(); n != 1 {
			t.Fatalf("loader ran %d times, want 1", n)
		}
		// The value sits at exactly namespace:version:{key}.
		if n, err := client.Exists(ctx, ns+":v1:{42}").Result(); err != nil || n != 1 {
			t.Fatalf("EXISTS %s:v1:{42} = %d, %v", ns, n, err)
		}
		ttl, err := client.PTTL(ctx, ns+":v1:{42}").Result()
		if err != nil || ttl <= 0 || ttl > layercache.DefaultTTL {
			t.Fatalf("PTTL = %v, %v; want within the default TTL", ttl, err)
		}
		st := c.Stats()
		if st.Misses != 1 || st.RedisHits != 1 || st.Loads != 1 || st.Writes != 1 {
			t.Fatalf("stats %+v", st)
		}
	})
}

func TestGetSetDelete(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		c := newCache[user](t, tgt.NewClient(t), layercache.WithNamespace(redistest.Namespace(t)))
		if _, err := c.Get(ctx, "1"); !errors.Is(err, layercache.ErrNotFound) {
			t.Fatalf("Get of absent key: %v, want ErrNotFound", err)
		}
		if err := c.Set(ctx, "1", user{ID: 1, Name: "ann"}); err != nil {
			t.Fatal(err)
		}
		if got, err := c.Get(ctx, "1"); err != nil || got.Name != "ann" {
			t.Fatalf("Get after Set = %+v, %v", got, err)
		}
		if err := c.Delete(ctx, "1"); err != nil {
			t.Fatal(err)
		}
		if _, err := c.Get(ctx, "1"); !errors.Is(err, layercache.ErrNotFound) {
			t.Fatalf("Get after Delete: %v, want ErrNotFound", err)
		}
	})
}

func TestDeleteAcrossSlots(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		client := tgt.NewClient(t)
		c := newCache[user](t, client, layercache.WithNamespace(redistest.Namespace(t)))
		keys := make([]string, 50) // 50 keys land on all three masters
		for i := range keys {
			keys[i] = fmt.Sprint("k", i)
			if err := c.Set(ctx, keys[i], user{ID: i}); err != nil {
				t.Fatal(err)
			}
		}
		if err := c.Delete(ctx, keys...); err != nil {
			t.Fatalf("Delete of keys in many slots: %v", err)
		}
		for _, k := range keys {
			if _, err := c.Get(ctx, k); !errors.Is(err, layercache.ErrNotFound) {
				t.Fatalf("%s survived Delete: %v", k, err)
			}
		}
		// A bad key anywhere in the list deletes nothing.
		if err := c.Set(ctx, "keep", user{ID: 7}); err != nil {
			t.Fatal(err)
		}
		if err := c.Delete(ctx, "keep", ""); !errors.Is(err, layercache.ErrInvalidKey) {
			t.Fatalf("Delete with an empty key: %v, want ErrInvalidKey", err)
		}
		if _, err := c.Get(ctx, "keep"); err != nil {
			t.Fatalf("a failed Delete removed a key: %v", err)
		}
	})
}

func TestHostileKeys(t *testing.T) {
	keys := []string{"{", "}", "}{", "{x}", "a:b:c", "line\nbreak", "\xff\xfe invalid utf8", `back\slash`, `\]`, " ", strings.Repeat("k", layercache.MaxKeyLen)}
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		client := tgt.NewClient(t)
		ns := redistest.Namespace(t)
		c := newCache[user](t, client, layercache.WithNamespace(ns))
		for i, k := range keys {
			if err := c.Set(ctx, k, user{ID: i}); err != nil {
				t.Fatalf("Set(%q): %v", k, err)
			}
		}
		for i, k := range keys {
			got, err := c.Get(ctx, k)
			if err != nil || got.ID != i {
				t.Fatalf("Get(%q) = %+v, %v; want ID %d (keys must not collide)", k, got, err, i)
			}
		}
		// Every key stays inside the namespace.
		var n int
		iter := scanAll(ctx, t, client, "*")
		for _, k := range iter {
			if !strings.HasPrefix(k, ns+":v1:{") {
				continue
			}
			n++
		}
		if n != len(keys) {
			t.Fatalf("found %d keys under %s:v1:{, want %d", n, ns, len(keys))
		}
		if tgt.Cluster {
			// Value and lease of every key share a slot: a script may touch both.
			for _, k := range keys {
				val := layercache.RedisKey(ns, "v1", k)
				err := client.Eval(ctx, "return redis.call('exists', KEYS[1], KEYS[2])", []string{val, val + ":lease"}).Err()
				if err != nil {
					t.Fatalf("value and lease of %q in different slots: %v", k, err)
				}
			}
		}
		for _, bad := range []string{"", strings.Repeat("k", layercache.MaxKeyLen+1)} {
			if _, err := c.Fetch(ctx, bad, func(context.Context) (user, error) { return user{}, nil }); !errors.Is(err, layercache.ErrInvalidKey) {
				t.Fatalf("Fetch(len %d) = %v, want ErrInvalidKey", len(bad), err)
			}
		}
	})
}

func scanAll(ctx context.Context, t *testing.T, client redis.UniversalClient, match string) []string {
	t.Helper()
	var out []string
	scan := func(ctx context.Context, c *redis.Client) error {
		it := c.Scan(ctx, 0, match, 1000).Iterator()
		for it.Next(ctx) {
			out = append(out, it.Val())
		}
		return it.Err()
	}
	var err error
	switch cl := client.(type) {
	case *redis.ClusterClient:
		var mu sync.Mutex
		err = cl.ForEachMaster(ctx, func(ctx context.Context, c *redis.Client) error {
			mu.Lock()
			defer mu.Unlock()
			return scan(ctx, c)
		})
	case *redis.Client:
		err = scan(ctx, cl)
	}
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func TestVersionsIsolate(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		client := tgt.NewClient(t)
		ns := redistest.Namespace(t)
		v1 := newCache[user](t, client, layercache.WithNamespace(ns), layercache.WithVersion("v1"))
		v2 := newCache[user](t, client, layercache.WithNamespace(ns), layercache.WithVersion("v2"))
		if err := v1.Set(ctx, "1", user{ID: 1, Name: "old"}); err != nil {
			t.Fatal(err)
		}
		if _, err := v2.Get(ctx, "1"); !errors.Is(err, layercache.ErrNotFound) {
			t.Fatalf("v2 read a v1 value: %v", err)
		}
		var loads counter
		got, err := v2.Fetch(ctx, "1", loads.user(1, 0))
		if err != nil || got.Name != "user-1" || loads.n.Load() != 1 {
			t.Fatalf("v2 Fetch = %+v, %v, loads %d", got, err, loads.n.Load())
		}
		if got, _ := v1.Get(ctx, "1"); got.Name != "old" {
			t.Fatalf("v2's write changed v1: %+v", got)
		}
	})
}

func TestCorruptValuesAreMisses(t *testing.T) {
	valid := envelope.Encode(envelope.Header{WrittenAt: 1, FreshUntil: 1 << 50, ExpiresAt: 1 << 50}, []byte(`{"id":"not a number"}`))
	cases := map[string][]byte{
		"legacy plain json":      []byte(`{"id":1,"name":"legacy"}`),
		"empty":                  {},
		"truncated envelope":     valid[:10],
		"payload not a T":        valid,
		"bad magic":              append([]byte{0x00}, valid[1:]...),
		"unknown format version": append([]byte{envelope.Magic, 99}, valid[2:]...),
	}
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		client := tgt.NewClient(t)
		ns := redistest.Namespace(t)
		c := newCache[user](t, client, layercache.WithNamespace(ns))
		i := 0
		for name, raw := range cases {
			i++
			key := fmt.Sprint("bad", i)
			if err := client.Set(ctx, layercache.RedisKey(ns, "v1", key), raw, time.Minute).Err(); err != nil {
				t.Fatal(err)
			}
			if _, err := c.Get(ctx, key); !errors.Is(err, layercache.ErrNotFound) {
				t.Fatalf("%s: Get = %v, want ErrNotFound", name, err)
			}
			var loads counter
			got, err := c.Fetch(ctx, key, loads.user(i, 0))
			if err != nil || got.ID != i || loads.n.Load() != 1 {
				t.Fatalf("%s: Fetch = %+v, %v, loads %d", name, got, err, loads.n.Load())
			}
			// The bad value was replaced by a good one.
			if got, err := c.Get(ctx, key); err != nil || got.ID != i {
				t.Fatalf("%s: after refill Get = %+v, %v", name, got, err)
			}
		}
		if st := c.Stats(); st.DecodeErrors != uint64(2*len(cases)) {
			t.Fatalf("DecodeErrors = %d, want %d", st.DecodeErrors, 2*len(cases))
		}
	})
}

func TestCoalescing(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		c := newCache[user](t, tgt.NewClient(t), layercache.WithNamespace(redistest.Namespace(t)))
		var loads counter
		const n = 100
		var wg sync.WaitGroup
		errs := make(chan error, n)
		for range n {
			wg.Add(1)
			go func() {
				defer wg.Done()
				got, err := c.Fetch(ctx, "hot", loads.user(7, 100*time.Millisecond))
				if err == nil && got.ID != 7 {
					err = fmt.Errorf("got %+v", got)
				}
				errs <- err
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil {
				t.Fatal(err)
			}
		}
		if got := loads.n.Load(); got != 1 {
			t.Fatalf("%d concurrent misses ran the loader %d times, want 1", n, got)
		}
		if st := c.Stats(); st.Coalesced == 0 {
			t.Fatalf("no coalesced calls counted: %+v", st)
		}
	})
}

func TestCallerCancelDoesNotFailOthers(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		c := newCache[user](t, tgt.NewClient(t), layercache.WithNamespace(redistest.Namespace(t)))
		var loads counter
		leaderCtx, cancel := context.WithCancel(context.Background())
		leaderErr := make(chan error, 1)
		go func() {
			_, err := c.Fetch(leaderCtx, "k", loads.user(1, 200*time.Millisecond))
			leaderErr <- err
		}()
		for loads.n.Load() == 0 { // wait until the shared load has started
			time.Sleep(time.Millisecond)
		}
		followerErr := make(chan error, 1)
		go func() {
			got, err := c.Fetch(context.Background(), "k", loads.user(1, 0))
			if err == nil && got.ID != 1 {
				err = fmt.Errorf("got %+v", got)
			}
			followerErr <- err
		}()
		cancel()
		if err := <-leaderErr; !errors.Is(err, context.Canceled) {
			t.Fatalf("cancelled caller got %v, want context.Canceled", err)
		}
		if err := <-followerErr; err != nil {
			t.Fatalf("the other caller failed with the first one: %v", err)
		}
		if n := loads.n.Load(); n != 1 {
			t.Fatalf("loader ran %d times, want 1", n)
		}
	})
}

func TestLoaderPanic(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		c := newCache[user](t, tgt.NewClient(t), layercache.WithNamespace(redistest.Namespace(t)))
		release := make(chan struct{})
		load := func(context.Context) (user, error) {
			<-release
			panic("boom")
		}
		const n = 10
		errs := make(chan error, n)
		for range n {
			go func() { _, err := c.Fetch(ctx, "p", load); errs <- err }()
		}
		// All n on one flight before the loader may end (a late joiner
		// would start, and panic in, a second load).
		waitFor(t, func() bool { return c.Stats().Coalesced == n-1 })
		close(release)
		for range n {
			err := <-errs
			var pe *layercache.PanicError
			if !errors.Is(err, layercache.ErrLoaderPanic) || !errors.As(err, &pe) || pe.Value != "boom" {
				t.Fatalf("waiter got %v, want a PanicError of \"boom\"", err)
			}
		}
		// The process is alive and the key loads normally afterwards.
		var loads counter
		if got, err := c.Fetch(ctx, "p", loads.user(3, 0)); err != nil || got.ID != 3 {
			t.Fatalf("Fetch after a panic = %+v, %v", got, err)
		}
		if st := c.Stats(); st.LoadPanics != 1 {
			t.Fatalf("LoadPanics = %d, want 1", st.LoadPanics)
		}
	})
}

// TestLoaderPanicUnwraps: a loader that panics with an error hands it to
// errors.Is and errors.As through the PanicError.
func TestLoaderPanicUnwraps(t *testing.T) {
	c := newCache[user](t, redistest.Miniredis(t).NewClient(t), layercache.WithNamespace(redistest.Namespace(t)))
	_, err := c.Fetch(context.Background(), "p", func(context.Context) (user, error) { panic(io.ErrUnexpectedEOF) })
	if !errors.Is(err, layercache.ErrLoaderPanic) || !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("Fetch = %v, want a PanicError that unwraps to io.ErrUnexpectedEOF", err)
	}
	_, err = c.Fetch(context.Background(), "q", func(context.Context) (user, error) { panic("not an error") })
	var pe *layercache.PanicError
	if !errors.As(err, &pe) || pe.Unwrap() != nil {
		t.Fatalf("Fetch = %v; a non-error panic value unwraps to nothing", err)
	}
}

// TestLoaderGoexit: a loader that calls runtime.Goexit (t.FailNow in a
// test) gives its callers an error, not a zero value with a nil error,
// and nothing is cached.
func TestLoaderGoexit(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		c := newCache[user](t, tgt.NewClient(t), layercache.WithNamespace(redistest.Namespace(t)))
		release := make(chan struct{})
		load := func(context.Context) (user, error) {
			<-release
			runtime.Goexit()
			return user{ID: 1}, nil
		}
		const n = 5
		errs := make(chan error, n)
		for range n {
			go func() { _, err := c.Fetch(ctx, "g", load); errs <- err }()
		}
		waitFor(t, func() bool { return c.Stats().Coalesced == n-1 })
		close(release)
		for range n {
			if err := <-errs; !errors.Is(err, layercache.ErrLoaderGoexit) {
				t.Fatalf("waiter got %v, want ErrLoaderGoexit", err)
			}
		}
		if _, err := c.Get(ctx, "g"); !errors.Is(err, layercache.ErrNotFound) {
			t.Fatalf("Get after a Goexit = %v, want not found", err)
		}
	})
}

func TestLoaderErrorIsNotCached(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		c := newCache[user](t, tgt.NewClient(t), layercache.WithNamespace(redistest.Namespace(t)))
		errDB := errors.New("db down")
		if _, err := c.Fetch(ctx, "e", func(context.Context) (user, error) { return user{}, errDB }); !errors.Is(err, errDB) {
			t.Fatalf("Fetch = %v, want the loader's error", err)
		}
		var loads counter
		if got, err := c.Fetch(ctx, "e", loads.user(5, 0)); err != nil || got.ID != 5 || loads.n.Load() != 1 {
			t.Fatalf("after a load error, Fetch = %+v, %v (loads %d)", got, err, loads.n.Load())
		}
	})
}

func TestNegativeCaching(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		clock := layercache.NewManualClock(time.Now())
		c := newCache[user](t, tgt.NewClient(t), layercache.WithNamespace(redistest.Namespace(t)),
			layercache.WithNegativeTTL(5*time.Second), layercache.WithClock(clock))
		var calls atomic.Int64
		missing := func(context.Context) (user, error) {
			calls.Add(1)
			return user{}, fmt.Errorf("user 9: %w", layercache.ErrNotFound)
		}
		for i := range 3 {
			if _, err := c.Fetch(ctx, "9", missing); !errors.Is(err, layercache.ErrNotFound) {
				t.Fatalf("Fetch %d = %v, want ErrNotFound", i, err)
			}
		}
		if n := calls.Load(); n != 1 {
			t.Fatalf("loader ran %d times during the negative TTL, want 1", n)
		}
		if _, err := c.Get(ctx, "9"); !errors.Is(err, layercache.ErrNotFound) {
			t.Fatalf("Get of a negative entry = %v", err)
		}
		clock.Advance(6 * time.Second)
		if _, err := c.Fetch(ctx, "9", missing); !errors.Is(err, layercache.ErrNotFound) || calls.Load() != 2 {
			t.Fatalf("after the negative TTL: %v, loads %d (want a new load)", err, calls.Load())
		}
		if st := c.Stats(); st.NegativeHits < 2 || st.NegativeWrites != 2 || st.LoadErrors != 0 {
			t.Fatalf("stats %+v", st)
		}
	})
}

func TestNegativeCachingOff(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		c := newCache[user](t, tgt.NewClient(t), layercache.WithNamespace(redistest.Namespace(t)), layercache.WithNegativeTTL(0))
		var calls atomic.Int64
		missing := func(context.Context) (user, error) { calls.Add(1); return user{}, layercache.ErrNotFound }
		for range 2 {
			if _, err := c.Fetch(ctx, "9", missing); !errors.Is(err, layercache.ErrNotFound) {
				t.Fatal(err)
			}
		}
		if calls.Load() != 2 {
			t.Fatalf("loader ran %d times with negative caching off, want 2", calls.Load())
		}
	})
}

func TestExpiryFollowsClock(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		clock := layercache.NewManualClock(time.Now())
		c := newCache[user](t, tgt.NewClient(t), layercache.WithNamespace(redistest.Namespace(t)),
			layercache.WithTTL(time.Minute), layercache.WithClock(clock))
		var loads counter
		if _, err := c.Fetch(ctx, "x", loads.user(1, 0)); err != nil {
			t.Fatal(err)
		}
		clock.Advance(59 * time.Second)
		if _, err := c.Fetch(ctx, "x", loads.user(1, 0)); err != nil || loads.n.Load() != 1 {
			t.Fatalf("still fresh, yet loads = %d (%v)", loads.n.Load(), err)
		}
		clock.Advance(2 * time.Second)
		if _, err := c.Fetch(ctx, "x", loads.user(1, 0)); err != nil || loads.n.Load() != 2 {
			t.Fatalf("expired, yet loads = %d (%v)", loads.n.Load(), err)
		}
	})
}

func TestDeleteDuringLoadIsNotCached(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		c := newCache[user](t, tgt.NewClient(t), layercache.WithNamespace(redistest.Namespace(t)))
		started, release := make(chan struct{}), make(chan struct{})
		done := make(chan user, 1)
		go func() {
			got, _ := c.Fetch(ctx, "d", func(context.Context) (user, error) {
				close(started)
				<-release
				return user{ID: 1, Name: "before delete"}, nil
			})
			done <- got
		}()
		<-started
		if err := c.Delete(ctx, "d"); err != nil {
			t.Fatal(err)
		}
		close(release)
		if got := <-done; got.Name != "before delete" {
			t.Fatalf("the caller did not get what was loaded: %+v", got)
		}
		waitFor(t, func() bool { return c.Stats().SkippedWrites == 1 })
		if _, err := c.Get(ctx, "d"); !errors.Is(err, layercache.ErrNotFound) {
			t.Fatalf("a load that started before Delete was cached after it: %v", err)
		}
	})
}

// waitFor polls cond for up to 5s: for effects of background work, with a
// margin wide enough for a loaded 2-core machine.
func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 5s")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestRawCodec(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		client := tgt.NewClient(t)
		ns := redistest.Namespace(t)
		b := newCache[[]byte](t, client, layercache.WithNamespace(ns), layercache.WithCodec(layercache.PassThrough))
		s := newCache[string](t, client, layercache.WithNamespace(ns+"s"), layercache.WithCodec(layercache.PassThrough))
		payload := []byte{0, 1, 2, 0xff}
		if err := b.Set(ctx, "b", payload); err != nil {
			t.Fatal(err)
		}
		if got, err := b.Get(ctx, "b"); err != nil || string(got) != string(payload) {
			t.Fatalf("Get = %x, %v", got, err)
		}
		if err := s.Set(ctx, "s", "héllo"); err != nil {
			t.Fatal(err)
		}
		if got, err := s.Get(ctx, "s"); err != nil || got != "héllo" {
			t.Fatalf("Get = %q, %v", got, err)
		}
		raw, _ := client.Get(ctx, layercache.RedisKey(ns+"s", "v1", "s")).Bytes()
		if string(raw[envelope.HeaderSize:]) != "héllo" {
			t.Fatalf("payload %q is not the raw string", raw[envelope.HeaderSize:])
		}
	})
}

func TestMaxValueSize(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		c := newCache[string](t, tgt.NewClient(t), layercache.WithNamespace(redistest.Namespace(t)), layercache.WithMaxValueSize(16))
		if err := c.Set(ctx, "big", "small"); err != nil {
			t.Fatal(err)
		}
		if err := c.Set(ctx, "big", strings.Repeat("x", 100)); !errors.Is(err, layercache.ErrValueTooLarge) {
			t.Fatalf("Set of a large value = %v, want ErrValueTooLarge", err)
		}
		// The value the failed Set stood for replaced "small" at the
		// source: "small" must not be served any more.
		if v, err := c.Get(ctx, "big"); !errors.Is(err, layercache.ErrNotFound) {
			t.Fatalf("after a Set too large to cache, Get = %q, %v; want ErrNotFound", v, err)
		}
		got, err := c.Fetch(ctx, "big", func(context.Context) (string, error) { return strings.Repeat("y", 100), nil })
		if err != nil || len(got) != 100 {
			t.Fatalf("Fetch of a large value = %d bytes, %v; want it returned", len(got), err)
		}
		waitFor(t, func() bool { return c.Stats().SkippedWrites == 2 })
		if _, err := c.Get(ctx, "big"); !errors.Is(err, layercache.ErrNotFound) {
			t.Fatalf("a value over the limit was cached: %v", err)
		}
	})
}

func TestRedisDownStillLoads(t *testing.T) {
	// A client pointed at a port nobody listens on.
	client := downClient()
	defer client.Close()
	c := newCache[user](t, client)
	var loads counter
	got, err := c.Fetch(context.Background(), "1", loads.user(1, 0))
	if err != nil || got.ID != 1 {
		t.Fatalf("Fetch with Redis down = %+v, %v; want the loaded value", got, err)
	}
	if _, err := c.Get(context.Background(), "1"); err == nil || errors.Is(err, layercache.ErrNotFound) {
		t.Fatalf("Get with Redis down = %v; want the Redis error", err)
	}
	if st := c.Stats(); st.RedisErrors < 2 {
		t.Fatalf("RedisErrors = %d", st.RedisErrors)
	}
}

func TestRingClient(t *testing.T) {
	tgt := redistest.Miniredis(t)
	ring := redis.NewRing(&redis.RingOptions{Addrs: map[string]string{"a": tgt.Addrs[0]}})
	defer ring.Close()
	c := newCache[user](t, ring)
	var loads counter
	for range 2 {
		if got, err := c.Fetch(context.Background(), "1", loads.user(1, 0)); err != nil || got.ID != 1 {
			t.Fatalf("Fetch on a Ring = %+v, %v", got, err)
		}
	}
	if loads.n.Load() != 1 {
		t.Fatalf("loads = %d", loads.n.Load())
	}
}

func TestOptionErrors(t *testing.T) {
	client := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1"})
	defer client.Close()
	cases := map[string]layercache.Option{
		"namespace with colon": layercache.WithNamespace("a:b"),
		"empty namespace":      layercache.WithNamespace(""),
		"version with brace":   layercache.WithVersion("v{1}"),
		"zero TTL":             layercache.WithTTL(0),
		"jitter too large":     layercache.WithTTLJitter(0.9),
		"jitter NaN":           layercache.WithTTLJitter(nanFloat()),
		"nil codec":            layercache.WithCodec(nil),
		"negative neg TTL":     layercache.WithNegativeTTL(-time.Second),
		"negative max size":    layercache.WithMaxValueSize(-1),
		"zero load timeout":    layercache.WithLoadTimeout(0),
		"nil logger":           layercache.WithLogger(nil),
		"nil clock":            layercache.WithClock(nil),
		"nil option":           nil,
	}
	for name, opt := range cases {
		if _, err := layercache.New[user](client, opt); !errors.Is(err, layercache.ErrInvalidOption) {
			t.Errorf("%s: New = %v, want ErrInvalidOption", name, err)
		}
	}
	if _, err := layercache.New[user](client, layercache.WithCodec(layercache.PassThrough)); !errors.Is(err, layercache.ErrInvalidOption) {
		t.Errorf("PassThrough codec with a struct T: %v, want ErrInvalidOption", err)
	}
	if _, err := layercache.New[user](nil); !errors.Is(err, layercache.ErrInvalidOption) {
		t.Errorf("nil client: %v, want ErrInvalidOption", err)
	}
}

func nanFloat() float64 { z := 0.0; return z / z }

func TestCloseWaitsForLoads(t *testing.T) {
	tgt := redistest.Miniredis(t)
	client := tgt.NewClient(t)
	defer goleak.VerifyNone(t, leakOptions()...)
	c, err := layercache.New[user](client, layercache.WithLogger(quiet))
	if err != nil {
		t.Fatal(err)
	}
	started := make(chan struct{})
	ended := make(chan struct{})
	go func() {
		_, _ = c.Fetch(context.Background(), "slow", func(ctx context.Context) (user, error) {
			close(started)
			<-ctx.Done() // Close must cancel the detached load
			return user{}, ctx.Err()
		})
		close(ended)
	}()
	<-started
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	<-ended
	if _, err := c.Fetch(context.Background(), "x", func(context.Context) (user, error) { return user{}, nil }); !errors.Is(err, layercache.ErrClosed) {
		t.Fatalf("Fetch after Close = %v, want ErrClosed", err)
	}
	if err := c.Close(); err != nil {
		t.Fatalf("second Close = %v", err)
	}
}

// leakOptions ignore goroutines that belong to the test's servers and
// clients, not to the cache under test.
func leakOptions() []goleak.Option {
	return []goleak.Option{
		goleak.IgnoreCurrent(),
		goleak.IgnoreAnyFunction("github.com/alicebob/miniredis/v2/server.(*Server).servePeer"),
		goleak.IgnoreAnyFunction("github.com/alicebob/miniredis/v2/server.(*Server).servePeer.func2"),
	}
}

func TestOutageLogsAreThrottled(t *testing.T) {
	var buf strings.Builder
	var mu sync.Mutex
	logger := slog.New(slog.NewTextHandler(writerFunc(func(p []byte) (int, error) {
		mu.Lock()
		defer mu.Unlock()
		return buf.Write(p)
	}), nil))
	client := downClient()
	defer client.Close()
	c, err := layercache.New[user](client, layercache.WithLogger(logger))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var loads counter
	for i := range 20 {
		if _, err := c.Fetch(context.Background(), fmt.Sprint(i), loads.user(i, 0)); err != nil {
			t.Fatal(err)
		}
	}
	mu.Lock()
	lines := strings.Count(buf.String(), "\n")
	mu.Unlock()
	// 20 failed reads and 20 failed writes, within a second: one line each.
	if lines == 0 || lines > 4 {
		t.Fatalf("%d log lines for 20 failing Fetches, want 1 or 2:\n%s", lines, buf.String())
	}
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

// downClient is a client of a port nobody listens on, failing fast.
func downClient() *redis.Client {
	return redis.NewClient(&redis.Options{
		Addr: "127.0.0.1:1", DialTimeout: 50 * time.Millisecond, MaxRetries: -1,
		DialerRetries: 1, DialerRetryTimeout: time.Millisecond,
	})
}
