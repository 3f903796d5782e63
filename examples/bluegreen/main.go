// Command bluegreen moves a product catalog cache from one Redis string key
// per product, written by code that predates layercache, to 16 hashes,
// with zero downtime, under synthetic load, with a rollback on the way.
//
// Two instances, blue and green, share Redis and a "database". The
// program seeds the legacy keys (product:<id>, plain JSON, as the old code
// wrote them, for 95% of the products: a warm cache), then steps the migration through its phases while both
// instances serve reads (90%) and writes (10%, database first, then the
// cache), reconciles the two layouts where the runbook says to, rolls back
// once and goes forward again. After each phase it prints a row: requests,
// the share served without a database load, each side's hit ratio,
// fallbacks, backfills, database loads, errors and p99 latency. The hit
// rate never collapses.
//
// It runs on an embedded Redis (miniredis) unless REDIS_ADDR is set:
//
//	go run ./examples/bluegreen
//	REDIS_ADDR=127.0.0.1:6379 go run ./examples/bluegreen -phase 3s
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"log/slog"
	"math/rand/v2"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/layercache/layercache"
	"github.com/redis/go-redis/v9"
)

// Product is the cached value. The old code stored it as JSON at
// product:<id>; layercache's JSON codec writes the same bytes.
type Product struct {
	ID    int     `json:"id"`
	Name  string  `json:"name"`
	Price float64 `json:"price"`
	Stock int     `json:"stock"`
}

const (
	products  = 2000
	migration = "bluegreen-catalog"
	rawKeys   = "bluegreen:product:%s"
)

// database stands in for the source of truth.
type database struct {
	mu    sync.RWMutex
	rows  map[int]Product
	loads atomic.Int64
}

func (d *database) get(id int) (Product, error) {
	d.loads.Add(1)
	time.Sleep(2 * time.Millisecond) // a query
	d.mu.RLock()
	defer d.mu.RUnlock()
	return d.rows[id], nil
}

func (d *database) update(id int) Product {
	d.mu.Lock()
	defer d.mu.Unlock()
	p := d.rows[id]
	p.Stock++
	d.rows[id] = p
	return p
}

func main() {
	perPhase := flag.Duration("phase", 1500*time.Millisecond, "how long to run each phase")
	workers := flag.Int("workers", 16, "concurrent clients")
	flag.Parse()
	if err := run(*perPhase, *workers); err != nil {
		log.Fatal(err)
	}
}

func run(perPhase time.Duration, workers int) error {
	ctx := context.Background()
	newClient, where, stop, err := connect()
	if err != nil {
		return err
	}
	defer stop()
	fmt.Println("redis:", where)
	admin := newClient()
	defer admin.Close()

	db := &database{rows: map[int]Product{}}
	for id := range products {
		db.rows[id] = Product{ID: id, Name: fmt.Sprintf("product %d", id), Price: float64(id%97) + 0.99}
	}

	// Start clean when REDIS_ADDR is reused, then seed the legacy keys as
	// the old code did: plain JSON, one key per product, an hour's TTL.
	if err := layercache.SetPhase(ctx, admin, migration, layercache.PhaseOld); err != nil {
		return err
	}
	pipe := admin.Pipeline()
	seeded := 0
	for id := range products {
		if id%20 == 19 {
			continue // not cached: the legacy cache was warm, not full
		}
		seeded++
		b, _ := json.Marshal(db.rows[id])
		pipe.Set(ctx, fmt.Sprintf(rawKeys, fmt.Sprint(id)), b, time.Hour)
	}
	if _, err := pipe.Exec(ctx); err != nil {
		return err
	}
	fmt.Printf("seeded %d of %d products as legacy keys like %q\n\n", seeded, products, fmt.Sprintf(rawKeys, "42"))

	// Blue and green: two deploys, each with its own client.
	var instances []*layercache.Cache[Product]
	for range 2 {
		client := newClient()
		defer client.Close()
		c, err := layercache.New[Product](client,
			layercache.WithNamespace("bluegreen"),
			layercache.WithTTL(time.Hour),
			layercache.WithLogger(slog.New(slog.DiscardHandler)),
			layercache.WithMigration(migration, layercache.Raw(rawKeys), layercache.Hash(16)))
		if err != nil {
			return err
		}
		defer c.Close()
		instances = append(instances, c)
	}

	load := newLoad(db, instances)
	load.start(workers)
	defer load.stop()

	t := &table{}
	t.header()
	phase := func(p layercache.Phase, note string) error {
		if err := layercache.SetPhase(ctx, admin, migration, p); err != nil {
			return err
		}
		// Every instance follows within a second; the load keeps running.
		deadline := time.Now().Add(3 * time.Second)
		for _, c := range instances {
			for c.Phase() != p {
				if time.Now().After(deadline) {
					return fmt.Errorf("an instance did not follow phase %v", p)
				}
				time.Sleep(10 * time.Millisecond)
			}
		}
		w := load.window(instances)
		time.Sleep(perPhase)
		t.row(p.String(), note, w.end(instances))
		return nil
	}
	reconcile := func(note string) error {
		rep, err := instances[0].Reconcile(ctx, layercache.ReconcileOptions{Repair: true, BatchSize: 500})
		if err != nil {
			return err
		}
		again, err := instances[0].Reconcile(ctx, layercache.ReconcileOptions{})
		if err != nil {
			return err
		}
		t.note(fmt.Sprintf("reconcile (%s, under load): scanned %d, old-only %d, new-only %d, mismatched %d, repaired %d, skipped %d in %v; second pass: %d differences (writes in flight)",
			note, rep.Scanned, rep.OnlyOld, rep.OnlyNew, rep.Mismatched, rep.Repaired, rep.RepairSkipped, rep.Duration.Round(time.Millisecond),
			again.OnlyOld+again.OnlyNew+again.Mismatched))
		return nil
	}

	steps := []func() error{
		func() error { return phase(layercache.PhaseOld, "legacy keys only") },
		func() error { return phase(layercache.PhaseDualWrite, "writes reach the hashes") },
		func() error { return reconcile("fill the hashes") },
		func() error { return phase(layercache.PhaseReadOldFirst, "") },
		func() error { return phase(layercache.PhaseReadNewFirst, "hashes serve reads") },
		func() error { return phase(layercache.PhaseNewOnly, "legacy keys retired") },
		func() error { return phase(layercache.PhaseReadNewFirst, "ROLLBACK") },
		func() error { return phase(layercache.PhaseReadOldFirst, "ROLLBACK: old first, backfilled") },
		func() error { return reconcile("refill the legacy keys") },
		func() error { return phase(layercache.PhaseDualWrite, "ROLLBACK: old code could take over") },
		func() error { return phase(layercache.PhaseReadOldFirst, "forward again") },
		func() error { return phase(layercache.PhaseReadNewFirst, "") },
		func() error { return phase(layercache.PhaseNewOnly, "done") },
	}
	for _, s := range steps {
		if err := s(); err != nil {
			return err
		}
	}
	load.stop()
	t.summary()
	return nil
}

// ---- load ----

// load is the synthetic traffic: each worker picks blue or green and a
// product (skewed towards popular ones), reads it (90%) or updates it in
// the database and then in the cache (10%).
type load struct {
	db        *database
	instances []*layercache.Cache[Product]
	quit      chan struct{}
	wg        sync.WaitGroup
	stopOnce  sync.Once

	mu  sync.Mutex
	cur *window
}

type window struct {
	requests, reads, errors atomic.Int64
	db                      *database
	loads0                  int64
	stats0                  []layercache.Stats
	mu                      sync.Mutex
	latencies               []time.Duration
}

type result struct {
	requests, reads, errors, loads int64
	old, new                       layercache.SideStats
	p99                            time.Duration
}

func newLoad(db *database, instances []*layercache.Cache[Product]) *load {
	l := &load{db: db, instances: instances, quit: make(chan struct{})}
	l.cur = &window{}
	return l
}

func (l *load) start(workers int) {
	for w := range workers {
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			r := rand.New(rand.NewPCG(uint64(w), 7))
			zipf := rand.NewZipf(r, 1.1, 2, products-1)
			ctx := context.Background()
			for {
				select {
				case <-l.quit:
					return
				default:
				}
				c := l.instances[r.IntN(len(l.instances))]
				id := int(zipf.Uint64())
				key := fmt.Sprint(id)
				start := time.Now()
				var err error
				read := r.IntN(10) != 0
				if read {
					_, err = c.Fetch(ctx, key, func(context.Context) (Product, error) { return l.db.get(id) })
				} else {
					p := l.db.update(id)
					err = c.Set(ctx, key, p)
				}
				took := time.Since(start)
				l.mu.Lock()
				win := l.cur
				l.mu.Unlock()
				win.requests.Add(1)
				if read {
					win.reads.Add(1)
				}
				if err != nil {
					win.errors.Add(1)
				}
				win.mu.Lock()
				win.latencies = append(win.latencies, took)
				win.mu.Unlock()
			}
		}()
	}
}

func (l *load) stop() {
	l.stopOnce.Do(func() {
		close(l.quit)
		l.wg.Wait()
	})
}

// window starts a new measurement window.
func (l *load) window(instances []*layercache.Cache[Product]) *window {
	w := &window{db: l.db}
	for _, c := range instances {
		w.stats0 = append(w.stats0, c.Stats())
	}
	l.mu.Lock()
	l.cur = w
	l.mu.Unlock()
	w.loads0 = l.db.loads.Load()
	return w
}

func (w *window) end(instances []*layercache.Cache[Product]) result {
	res := result{requests: w.requests.Load(), reads: w.reads.Load(), errors: w.errors.Load(), loads: w.db.loads.Load() - w.loads0}
	for i, c := range instances {
		m, m0 := c.Stats().Migration, w.stats0[i].Migration
		res.old = add(res.old, sub(m.Old, m0.Old))
		res.new = add(res.new, sub(m.New, m0.New))
	}
	w.mu.Lock()
	lat := slices.Clone(w.latencies)
	w.mu.Unlock()
	if len(lat) > 0 {
		slices.Sort(lat)
		res.p99 = lat[len(lat)*99/100]
	}
	return res
}

func sub(a, b layercache.SideStats) layercache.SideStats {
	return layercache.SideStats{Reads: a.Reads - b.Reads, Hits: a.Hits - b.Hits, Misses: a.Misses - b.Misses,
		Fallbacks: a.Fallbacks - b.Fallbacks, Backfills: a.Backfills - b.Backfills, Errors: a.Errors - b.Errors}
}

func add(a, b layercache.SideStats) layercache.SideStats {
	return layercache.SideStats{Reads: a.Reads + b.Reads, Hits: a.Hits + b.Hits, Misses: a.Misses + b.Misses,
		Fallbacks: a.Fallbacks + b.Fallbacks, Backfills: a.Backfills + b.Backfills, Errors: a.Errors + b.Errors}
}

// ---- table ----

type table struct {
	minHit float64
	rows   int
	loads  int64
	errs   int64
}

func (t *table) header() {
	t.minHit = 1
	fmt.Printf("%-15s %8s %8s %9s %9s %9s %9s %8s %6s %8s  %s\n",
		"phase", "requests", "no-load", "old hit", "new hit", "fallback", "backfill", "db loads", "errors", "p99", "")
}

func (t *table) row(phase, note string, r result) {
	served := 1.0
	dbLoads := r.loads
	if r.reads > 0 {
		served = 1 - float64(dbLoads)/float64(r.reads)
	}
	t.minHit = min(t.minHit, served)
	t.rows++
	t.loads += dbLoads
	t.errs += r.errors
	fmt.Printf("%-15s %8d %7.1f%% %9s %9s %9d %9d %8d %6d %8v  %s\n",
		phase, r.requests, 100*served, ratio(r.old), ratio(r.new), r.old.Fallbacks+r.new.Fallbacks,
		r.old.Backfills+r.new.Backfills, dbLoads, r.errors, r.p99.Round(10*time.Microsecond), note)
}

func (t *table) note(s string) { fmt.Printf("  %s\n", s) }

func (t *table) summary() {
	fmt.Printf("\n%d phases: lowest share of reads served without a database load %.1f%%, %d database loads, %d errors\n",
		t.rows, 100*t.minHit, t.loads, t.errs)
}

func ratio(s layercache.SideStats) string {
	if s.Reads == 0 {
		return "-"
	}
	return fmt.Sprintf("%.1f%%", 100*float64(s.Hits)/float64(s.Reads))
}

// connect returns a client maker for REDIS_ADDR, or for an embedded
// miniredis.
func connect() (func() redis.UniversalClient, string, func(), error) {
	if addr := os.Getenv("REDIS_ADDR"); addr != "" {
		return func() redis.UniversalClient { return redis.NewClient(&redis.Options{Addr: addr}) }, addr, func() {}, nil
	}
	mr, err := miniredis.Run()
	if err != nil {
		return nil, "", nil, err
	}
	return func() redis.UniversalClient { return redis.NewClient(&redis.Options{Addr: mr.Addr()}) },
		"embedded miniredis (set REDIS_ADDR to use a real server)", mr.Close, nil
}
