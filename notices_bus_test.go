package layercache

import (
	"context"
	"log/slog"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/layercache/layercache/internal/redistest"
	"github.com/redis/go-redis/v9"
)

// TestLeaseNoticesShareTheBus: caches on one bus and its client share one
// notice subscription, and waiters in other processes are still woken by
// the fill (a 30s lease: were they not, they would wait for it to expire).
func TestLeaseNoticesShareTheBus(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		ns := redistest.Namespace(t)
		const procs = 4
		var loads atomic.Int64
		caches := make([]*Cache[string], procs)
		for i := range caches {
			client := tgt.NewClient(t)
			bus, err := NewBus(client, WithChannel(ns+":bus"), WithBusLogger(discardLogger()))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = bus.Close() })
			opts := []Option{WithLocks(30*time.Second, 10*time.Second), WithInvalidation(bus), WithLogger(discardLogger())}
			a, err := New[string](client, append(opts, WithNamespace(ns))...)
			if err != nil {
				t.Fatal(err)
			}
			b, err := New[string](client, append(opts, WithNamespace(ns+"b"))...)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = a.Close(); _ = b.Close() })
			if a.notices == nil || a.notices != b.notices || a.notices != bus.notices {
				t.Fatal("caches on one bus and client do not share the bus's notice subscription")
			}
			caches[i] = a
		}
		start := time.Now()
		var wg sync.WaitGroup
		errs := make(chan error, procs*20)
		for _, c := range caches {
			for range 20 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					v, err := c.Fetch(ctx, "cold", func(context.Context) (string, error) {
						loads.Add(1)
						time.Sleep(100 * time.Millisecond)
						return "v", nil
					})
					if err == nil && v != "v" {
						t.Errorf("got %q", v)
					}
					errs <- err
				}()
			}
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil {
				t.Fatal(err)
			}
		}
		if n := loads.Load(); n != 1 {
			t.Fatalf("%d loads across %d processes, want 1", n, procs)
		}
		if took := time.Since(start); took > 5*time.Second {
			t.Fatalf("callers served after %v: waiters were not woken by the fill notice", took)
		}
	})
}

func TestLeaseNoticesOwnHubOnAnotherClient(t *testing.T) {
	tgt := redistest.Miniredis(t)
	bus, err := NewBus(tgt.NewClient(t), WithBusLogger(discardLogger()))
	if err != nil {
		t.Fatal(err)
	}
	defer bus.Close()
	c, err := New[string](tgt.NewClient(t), WithLocks(time.Second, time.Second), WithInvalidation(bus), WithLogger(discardLogger()))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if c.notices == nil || c.notices == bus.notices || c.sharedNotices {
		t.Fatal("a cache on another client than its bus's must keep its own notice subscription")
	}
}

func discardLogger() *slog.Logger { return slog.New(slog.DiscardHandler) }

// unhashableClient is a client wrapper that cannot be compared with ==.
type unhashableClient struct {
	redis.UniversalClient
	tags []string
}

func TestNewWithUncomparableClient(t *testing.T) {
	tgt := redistest.Miniredis(t)
	client := unhashableClient{UniversalClient: tgt.NewClient(t), tags: []string{"a"}}
	bus, err := NewBus(client, WithBusLogger(discardLogger()))
	if err != nil {
		t.Fatal(err)
	}
	defer bus.Close()
	c, err := New[string](client, WithLocks(time.Second, time.Second), WithInvalidation(bus), WithLogger(discardLogger()))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if v, err := c.Fetch(context.Background(), "k", func(context.Context) (string, error) { return "v", nil }); err != nil || v != "v" {
		t.Fatalf("Fetch = %q, %v", v, err)
	}
}

// TestWaitersPollAfterTheBusCloses: a waiter that relied on the bus's
// notices switches to polling when the bus closes mid-wait, instead of
// sleeping until the holder's lease would expire.
func TestWaitersPollAfterTheBusCloses(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		ns := redistest.Namespace(t)
		client := tgt.NewClient(t)
		bus, err := NewBus(client, WithChannel(ns+":bus"), WithBusLogger(discardLogger()))
		if err != nil {
			t.Fatal(err)
		}
		waiter, err := New[string](client, WithNamespace(ns), WithLocks(time.Minute, time.Minute), WithInvalidation(bus), WithLogger(discardLogger()))
		if err != nil {
			t.Fatal(err)
		}
		defer waiter.Close()
		writer, err := New[string](tgt.NewClient(t), WithNamespace(ns), WithLocks(time.Minute, time.Minute), WithLogger(discardLogger()))
		if err != nil {
			t.Fatal(err)
		}
		defer writer.Close()
		// A holder in another process that will never fill.
		if err := client.Set(ctx, waiter.keys.lease("k"), "someone-else", time.Minute).Err(); err != nil {
			t.Fatal(err)
		}
		got := make(chan string, 1)
		go func() {
			v, _ := waiter.Fetch(ctx, "k", func(context.Context) (string, error) { return "loaded", nil })
			got <- v
		}()
		deadline := time.Now().Add(10 * time.Second)
		for waiter.Stats().LeaseWaits == 0 {
			if time.Now().After(deadline) {
				t.Fatal("the Fetch never started waiting")
			}
			time.Sleep(5 * time.Millisecond)
		}
		_ = bus.Close()
		start := time.Now()
		if err := writer.Set(ctx, "k", "set"); err != nil { // its notice goes unheard
			t.Fatal(err)
		}
		select {
		case v := <-got:
			if v != "set" {
				t.Fatalf("waiter got %q, want the value set meanwhile", v)
			}
			t.Logf("waiter saw the value %v after the bus closed", time.Since(start))
		case <-time.After(15 * time.Second):
			t.Fatal("the waiter kept waiting for a notice that a closed bus cannot deliver")
		}
	})
}

// TestDeleteWakesWaiters: a Delete breaks the key's lease with a notice, so
// a waiter in another process takes over at once instead of sleeping until
// the broken lease would have expired.
func TestDeleteWakesWaiters(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		ns := redistest.Namespace(t)
		opts := []Option{WithNamespace(ns), WithLocks(time.Minute, time.Minute), WithLogger(discardLogger())}
		waiter, err := New[string](tgt.NewClient(t), opts...)
		if err != nil {
			t.Fatal(err)
		}
		defer waiter.Close()
		deleter, err := New[string](tgt.NewClient(t), opts...)
		if err != nil {
			t.Fatal(err)
		}
		defer deleter.Close()
		client := tgt.NewClient(t)
		// A holder in another process, alive but slow: its lease lasts a minute.
		if err := client.Set(ctx, waiter.keys.lease("k"), "slow-holder", time.Minute).Err(); err != nil {
			t.Fatal(err)
		}
		got := make(chan string, 1)
		go func() {
			v, _ := waiter.Fetch(ctx, "k", func(context.Context) (string, error) { return "reloaded", nil })
			got <- v
		}()
		deadline := time.Now().Add(10 * time.Second)
		for waiter.Stats().LeaseWaits == 0 {
			if time.Now().After(deadline) {
				t.Fatal("the Fetch never started waiting")
			}
			time.Sleep(5 * time.Millisecond)
		}
		// Once its subscription is confirmed the waiter stops polling and
		// sleeps toward the lease's expiry: only a notice can wake it.
		channel := waiter.store.noticeChannel("k")
		for {
			waiter.notices.mu.Lock()
			nc := waiter.notices.channels[channel]
			confirmed := nc != nil && nc.confirmed
			waiter.notices.mu.Unlock()
			if confirmed {
				break
			}
			if time.Now().After(deadline) {
				t.Fatal("the waiter's notice subscription was never confirmed")
			}
			time.Sleep(5 * time.Millisecond)
		}
		start := time.Now()
		if err := deleter.Delete(ctx, "k"); err != nil {
			t.Fatal(err)
		}
		select {
		case v := <-got:
			if v != "reloaded" {
				t.Fatalf("waiter got %q, want its own load after the Delete freed the lease", v)
			}
			t.Logf("waiter took over %v after the Delete", time.Since(start))
		case <-time.After(15 * time.Second):
			t.Fatal("a Delete broke the lease without waking the waiters")
		}
	})
}
