package layercache_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/layercache/layercache"
	"github.com/layercache/layercache/internal/redistest"
)

// The local-hit benchmark and its floor, a plain RWMutex-guarded map read of
// the same value, sit in one file so they run in one go:
//
//	go test -run '^$' -bench 'LocalHit|RWMutexMapRead' -count 10 . | tee local.txt
//	benchstat local.txt
//
// The target is within 8x of the floor with 0 allocs/op (goal: 3x).

// BenchmarkFetchLocalHit is a Fetch answered by the local tier: no I/O, no
// allocation, no time.Now.
func BenchmarkFetchLocalHit(b *testing.B) {
	c := localHitCache(b)
	ctx := context.Background()
	load := func(context.Context) (product, error) { return benchProduct, nil }
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		p, err := c.Fetch(ctx, "p42", load)
		if err != nil || p.ID != 42 {
			b.Fatal(p, err)
		}
	}
}

// BenchmarkRWMutexMapRead is the floor for BenchmarkFetchLocalHit.
func BenchmarkRWMutexMapRead(b *testing.B) {
	m := rwMap{m: map[string]product{"p42": benchProduct}}
	b.ReportAllocs()
	for b.Loop() {
		p, ok := m.get("p42")
		if !ok || p.ID != 42 {
			b.Fatal(p)
		}
	}
}

// BenchmarkFetchLocalHitParallel is BenchmarkFetchLocalHit from every P.
func BenchmarkFetchLocalHitParallel(b *testing.B) {
	c := localHitCache(b)
	ctx := context.Background()
	load := func(context.Context) (product, error) { return benchProduct, nil }
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if p, err := c.Fetch(ctx, "p42", load); err != nil || p.ID != 42 {
				b.Error(p, err)
				return
			}
		}
	})
}

// BenchmarkRWMutexMapReadParallel is the floor for
// BenchmarkFetchLocalHitParallel.
func BenchmarkRWMutexMapReadParallel(b *testing.B) {
	m := rwMap{m: map[string]product{"p42": benchProduct}}
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if p, ok := m.get("p42"); !ok || p.ID != 42 {
				b.Error(p)
				return
			}
		}
	})
}

type rwMap struct {
	mu sync.RWMutex
	m  map[string]product
}

func (m *rwMap) get(k string) (product, bool) {
	m.mu.RLock()
	p, ok := m.m[k]
	m.mu.RUnlock()
	return p, ok
}

// localHitCache returns a cache with a local tier holding p42.
func localHitCache(b *testing.B) *layercache.Cache[product] {
	b.Helper()
	tgt := redistest.Miniredis(b) // only the first read reaches Redis
	c, err := layercache.New[product](tgt.NewClient(b), layercache.WithNamespace(redistest.Namespace(b)),
		layercache.WithLocal(1000, time.Minute), layercache.WithLogger(quiet))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = c.Close() })
	ctx := context.Background()
	if err := c.Set(ctx, "p42", benchProduct); err != nil {
		b.Fatal(err)
	}
	if _, err := c.Get(ctx, "p42"); err != nil { // fills the local tier
		b.Fatal(err)
	}
	if st := c.Stats(); st.RedisHits != 1 {
		b.Fatalf("warm-up: %+v", st)
	}
	return c
}
