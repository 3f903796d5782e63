package layercache_test

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/layercache/layercache"
	"github.com/layercache/layercache/internal/redistest"
	"github.com/redis/go-redis/v9"
)

// seedMigration writes n products to both sides of a key-per-entry to
// Hash(16) migration (phase dual-write), with 8 writers.
func seedMigration(b *testing.B, client redis.UniversalClient, ns, name string, n int) *layercache.Cache[product] {
	b.Helper()
	ctx := context.Background()
	if err := layercache.SetPhase(ctx, client, name, layercache.PhaseDualWrite); err != nil {
		b.Fatal(err)
	}
	c, err := layercache.New[product](client, layercache.WithNamespace(ns), layercache.WithLogger(quiet), layercache.WithTTL(time.Hour),
		layercache.WithMigration(name, layercache.KeyPerEntry(), layercache.Hash(16)))
	if err != nil {
		b.Fatal(err)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < n; i += 8 {
				p := benchProduct
				p.ID = i
				if err := c.Set(ctx, fmt.Sprint("p", i), p); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		b.Fatal(err)
	}
	return c
}

// BenchmarkReconcile measures the reconciler's throughput, in keys
// compared per second, on a real Redis (miniredis when none is
// installed), over a key-per-entry to Hash(16) migration of 20,000
// products. The goal is at least 50,000 keys/s on loopback.
//
//	go test -run '^$' -bench Reconcile -count 5 .
func BenchmarkReconcile(b *testing.B) {
	tgt := benchTarget(b)
	client := tgt.NewClientOpts(b, func(o *redis.UniversalOptions) { o.PoolSize = 32 })
	ns := redistest.Namespace(b)
	const n = 20_000
	c := seedMigration(b, client, ns, ns, n)
	defer c.Close()
	ctx := context.Background()
	var keys int64
	for b.Loop() {
		rep, err := c.Reconcile(ctx, layercache.ReconcileOptions{BatchSize: 1000})
		if err != nil {
			b.Fatal(err)
		}
		if rep.Matched != n {
			b.Fatalf("reconcile %+v; want %d matched", rep, n)
		}
		keys += rep.Scanned
	}
	b.ReportMetric(float64(keys)/b.Elapsed().Seconds(), "keys/s")
	b.ReportMetric(0, "ns/op") // one op is a whole pass; keys/s is the number
}

// BenchmarkDualRead measures a Get that hits, in each migration phase,
// against a Get from a cache with a single layout: each iteration times
// one of each, alternately, so that noise on a shared machine hits both
// alike. The single layout is the one the phase reads first (key-per-entry
// for old, dual-write and read-old-first; Hash(16) for read-new-first and
// new-only). Reported: phase-ns/read, single-ns/read and x-single, their
// ratio.
//
//	go test -run '^$' -bench DualRead -count 5 .
func BenchmarkDualRead(b *testing.B) {
	tgt := benchTarget(b)
	client := tgt.NewClient(b)
	ns := redistest.Namespace(b)
	ctx := context.Background()
	const keys = 1000
	seed := seedMigration(b, client, ns, ns, keys)
	seed.Close()
	names := make([]string, keys)
	for i := range names {
		names[i] = fmt.Sprint("p", i)
	}
	for p := layercache.PhaseOld; p <= layercache.PhaseNewOnly; p++ {
		b.Run("phase="+p.String(), func(b *testing.B) {
			if err := layercache.SetPhase(ctx, client, ns, p); err != nil {
				b.Fatal(err)
			}
			mig := newBenchCache(b, client, layercache.WithNamespace(ns),
				layercache.WithMigration(ns, layercache.KeyPerEntry(), layercache.Hash(16)))
			l := layercache.KeyPerEntry()
			if p >= layercache.PhaseReadNewFirst {
				l = layercache.Hash(16)
			}
			single := newBenchCache(b, client, layercache.WithNamespace(ns), layercache.WithLayout(l))
			if _, err := mig.Get(ctx, names[0]); err != nil { // reads the phase
				b.Fatal(err)
			}
			var tSingle, tPhase time.Duration
			i := 0
			for b.Loop() {
				k := names[i%keys]
				i++
				t0 := time.Now()
				if _, err := single.Get(ctx, k); err != nil {
					b.Fatal(err)
				}
				t1 := time.Now()
				if _, err := mig.Get(ctx, k); err != nil {
					b.Fatal(err)
				}
				tSingle += t1.Sub(t0)
				tPhase += time.Since(t1)
			}
			if st := mig.Stats().Migration; st.Old.Fallbacks+st.New.Fallbacks != 0 {
				b.Fatalf("reads fell back: %+v", st)
			}
			b.ReportMetric(float64(tPhase.Nanoseconds())/float64(b.N), "phase-ns/read")
			b.ReportMetric(float64(tSingle.Nanoseconds())/float64(b.N), "single-ns/read")
			b.ReportMetric(float64(tPhase)/float64(tSingle), "x-single")
		})
	}
}

// BenchmarkDualReadFallback measures a read in read-new-first that misses
// the new side and falls back to the old one (and backfills the new side),
// paired with a single-layout read of the old side. The new side's copy is
// deleted before each read, outside the timing.
func BenchmarkDualReadFallback(b *testing.B) {
	tgt := benchTarget(b)
	client := tgt.NewClient(b)
	ns := redistest.Namespace(b)
	ctx := context.Background()
	seed := seedMigration(b, client, ns, ns, 100)
	seed.Close()
	if err := layercache.SetPhase(ctx, client, ns, layercache.PhaseReadNewFirst); err != nil {
		b.Fatal(err)
	}
	mig := newBenchCache(b, client, layercache.WithNamespace(ns), layercache.WithMigration(ns, layercache.KeyPerEntry(), layercache.Hash(16)))
	single := newBenchCache(b, client, layercache.WithNamespace(ns))
	newSide := newBenchCache(b, client, layercache.WithNamespace(ns), layercache.WithLayout(layercache.Hash(16)))
	var tSingle, tPhase time.Duration
	i := 0
	for b.Loop() {
		k := fmt.Sprint("p", i%100)
		i++
		if err := newSide.Delete(ctx, k); err != nil {
			b.Fatal(err)
		}
		t0 := time.Now()
		if _, err := single.Get(ctx, k); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		if _, err := mig.Get(ctx, k); err != nil {
			b.Fatal(err)
		}
		tSingle += t1.Sub(t0)
		tPhase += time.Since(t1)
	}
	if st := mig.Stats().Migration; st.New.Backfills != uint64(b.N) {
		b.Fatalf("backfills %d, want %d", st.New.Backfills, b.N)
	}
	b.ReportMetric(float64(tPhase.Nanoseconds())/float64(b.N), "phase-ns/read")
	b.ReportMetric(float64(tSingle.Nanoseconds())/float64(b.N), "single-ns/read")
	b.ReportMetric(float64(tPhase)/float64(tSingle), "x-single")
}

// BenchmarkDualWrite measures Set in each migration phase, paired with a
// Set to a single key-per-entry cache.
func BenchmarkDualWrite(b *testing.B) {
	tgt := benchTarget(b)
	client := tgt.NewClient(b)
	ns := redistest.Namespace(b)
	ctx := context.Background()
	for p := layercache.PhaseOld; p <= layercache.PhaseNewOnly; p++ {
		b.Run("phase="+p.String(), func(b *testing.B) {
			if err := layercache.SetPhase(ctx, client, ns, p); err != nil {
				b.Fatal(err)
			}
			mig := newBenchCache(b, client, layercache.WithNamespace(ns), layercache.WithMigration(ns, layercache.KeyPerEntry(), layercache.Hash(16)))
			single := newBenchCache(b, client, layercache.WithNamespace(ns+"s"))
			var tSingle, tPhase time.Duration
			i := 0
			for b.Loop() {
				k := fmt.Sprint("p", i%1000)
				i++
				t0 := time.Now()
				if err := single.Set(ctx, k, benchProduct); err != nil {
					b.Fatal(err)
				}
				t1 := time.Now()
				if err := mig.Set(ctx, k, benchProduct); err != nil {
					b.Fatal(err)
				}
				tSingle += t1.Sub(t0)
				tPhase += time.Since(t1)
			}
			b.ReportMetric(float64(tPhase.Nanoseconds())/float64(b.N), "phase-ns/write")
			b.ReportMetric(float64(tSingle.Nanoseconds())/float64(b.N), "single-ns/write")
			b.ReportMetric(float64(tPhase)/float64(tSingle), "x-single")
		})
	}
}

func newBenchCache(b *testing.B, client redis.UniversalClient, opts ...layercache.Option) *layercache.Cache[product] {
	b.Helper()
	c, err := layercache.New[product](client, append([]layercache.Option{layercache.WithLogger(quiet)}, opts...)...)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { c.Close() })
	return c
}

// BenchmarkSetVersioned measures Set, a Lua script that keeps write
// versions growing, against the hand-written code it replaces, json.Marshal
// and a plain SET, paired in each iteration.
func BenchmarkSetVersioned(b *testing.B) {
	tgt := benchTarget(b)
	client := tgt.NewClient(b)
	ns := redistest.Namespace(b)
	ctx := context.Background()
	c := newBenchCache(b, client, layercache.WithNamespace(ns))
	var tPlain, tCache time.Duration
	for b.Loop() {
		t0 := time.Now()
		raw, _ := json.Marshal(benchProduct)
		if err := client.Set(ctx, ns+":plain", raw, time.Minute).Err(); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		if err := c.Set(ctx, "p", benchProduct); err != nil {
			b.Fatal(err)
		}
		tPlain += t1.Sub(t0)
		tCache += time.Since(t1)
	}
	b.ReportMetric(float64(tCache.Nanoseconds())/float64(b.N), "layercache-ns/write")
	b.ReportMetric(float64(tPlain.Nanoseconds())/float64(b.N), "goredis-ns/write")
	b.ReportMetric(float64(tCache)/float64(tPlain), "x-goredis")
}
