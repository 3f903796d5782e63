package layercache_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/layercache/layercache"
	"github.com/layercache/layercache/internal/redistest"
)

// The second way a deleted value came back: a Fetch that started after
// another process's Delete had returned joined an in-process load that
// began before it, and returned the deleted version. Once the Delete's
// invalidation reaches the process (a bus message, or the broken lease's
// notice), a new Fetch must start a new load.

// TestFetchAfterRemoteDeleteStartsAfreshWithABus: the invalidation
// arrives on the bus.
func TestFetchAfterRemoteDeleteStartsAfreshWithABus(t *testing.T) {
	runBus(t, func(t *testing.T, tgt *redistest.Target, mode busMode) {
		ctx := context.Background()
		ns := redistest.Namespace(t)
		a := newNode(t, tgt, ns, mode.opts(ns))
		b := newNode(t, tgt, ns, mode.opts(ns))
		checkFreshLoadAfterDelete(t, ctx,
			func(ctx context.Context, load func(context.Context) (string, error)) (string, error) {
				return b.cache.Fetch(ctx, "k", load)
			},
			func() error { return a.cache.Delete(ctx, "k") },
			func() bool { return b.cache.Stats().InvalidationsReceived >= 1 })
		if v, _ := b.cache.Get(ctx, "k"); v == "v1" {
			t.Fatal("the load that began before the Delete was cached")
		}
	})
}

// TestFetchAfterRemoteDeleteStartsAfreshWithLocks: no bus; the Delete
// breaks the lease of the load, and the holder hears the notice.
func TestFetchAfterRemoteDeleteStartsAfreshWithLocks(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		ns := redistest.Namespace(t)
		a := newCache[string](t, tgt.NewClient(t), layercache.WithNamespace(ns), layercache.WithLocks(10*time.Second, 10*time.Second))
		b := newCache[string](t, tgt.NewClient(t), layercache.WithNamespace(ns), layercache.WithLocks(10*time.Second, 10*time.Second))
		checkFreshLoadAfterDelete(t, ctx,
			func(ctx context.Context, load func(context.Context) (string, error)) (string, error) {
				return b.Fetch(ctx, "k", load)
			},
			func() error { return a.Delete(ctx, "k") },
			nil)
		if v, _ := b.Get(ctx, "k"); v == "v1" {
			t.Fatal("the load that began before the Delete was cached")
		}
	})
}

// checkFreshLoadAfterDelete starts a slow load of "v1" through fetch,
// deletes with del, waits until heard() (nil: poll with short Fetches
// until one stops joining the old load), then checks that a Fetch that
// starts now loads "v2" while the first caller still gets "v1".
func checkFreshLoadAfterDelete(t *testing.T, ctx context.Context,
	fetch func(context.Context, func(context.Context) (string, error)) (string, error), del func() error, heard func() bool) {
	t.Helper()
	started, release := make(chan struct{}), make(chan struct{})
	first := make(chan string, 1)
	go func() {
		v, err := fetch(ctx, func(context.Context) (string, error) {
			close(started)
			<-release
			return "v1", nil
		})
		if err != nil {
			t.Error(err)
		}
		first <- v
	}()
	<-started
	var once sync.Once
	unblock := func() { once.Do(func() { close(release) }) }
	defer unblock()
	if err := del(); err != nil {
		t.Fatal(err)
	}
	loadV2 := func(context.Context) (string, error) { return "v2", nil }
	if heard != nil {
		eventually(t, "the invalidation to reach the process", heard)
		ctx, cancel := context.WithTimeout(ctx, 2*time.Second) // a joined load never returns
		defer cancel()
		if v, err := fetch(ctx, loadV2); err != nil || v != "v2" {
			t.Fatalf("a Fetch that started after the invalidation arrived = %q, %v; want a new load (v2)", v, err)
		}
	} else {
		// The lease keeper hears the broken lease's notice and looks; a
		// Fetch that joins the old load times out, one that starts
		// afresh loads v2.
		eventually(t, "a Fetch to start a new load", func() bool {
			ctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
			defer cancel()
			v, err := fetch(ctx, loadV2)
			return err == nil && v == "v2"
		})
	}
	unblock()
	if v := <-first; v != "v1" {
		t.Fatalf("the first caller, who asked before the Delete, got %q; want v1", v)
	}
}
