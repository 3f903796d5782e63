package layercache_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/layercache/layercache"
	"github.com/layercache/layercache/internal/redistest"
	"github.com/redis/go-redis/v9"
	"go.uber.org/goleak"
)

// migItem is the value of the migration tests: Seq grows with every write of
// its key, so a read can tell whether it missed an acknowledged write.
type migItem struct {
	Key string `json:"key"`
	Seq int64  `json:"seq"`
}

// fleet is several cache instances, each with its own client, following
// one migration, as the instances of a blue/green deploy would.
type fleet struct {
	t        *testing.T
	tgt      *redistest.Target
	ns, name string
	from, to layercache.Layout
	admin    redis.UniversalClient
	caches   []*layercache.Cache[migItem]
}

func newFleet(t *testing.T, tgt *redistest.Target, ns string, from, to layercache.Layout, n int) *fleet {
	f := &fleet{t: t, tgt: tgt, ns: ns, from: from, to: to, admin: tgt.NewClient(t)}
	f.name = f.ns + "-mig"
	for range n {
		f.caches = append(f.caches, newCache[migItem](t, tgt.NewClient(t), f.options()...))
	}
	return f
}

func (f *fleet) options() []layercache.Option {
	return []layercache.Option{layercache.WithNamespace(f.ns), layercache.WithTTL(time.Hour),
		layercache.WithMigration(f.name, f.from, f.to), layercache.WithPhasePollInterval(20 * time.Millisecond)}
}

// setPhase moves the migration to p and waits until every instance
// follows it.
func (f *fleet) setPhase(p layercache.Phase) {
	f.t.Helper()
	if err := layercache.SetPhase(context.Background(), f.admin, f.name, p); err != nil {
		f.t.Fatal(err)
	}
	if got, err := layercache.GetPhase(context.Background(), f.admin, f.name); err != nil || got != p {
		f.t.Fatalf("GetPhase = %v, %v; want %v", got, err, p)
	}
	waitFor(f.t, func() bool {
		for _, c := range f.caches {
			if c.Phase() != p {
				return false
			}
		}
		return true
	})
}

// side returns a cache that reads one side only, as code that knows
// nothing of the migration would.
func (f *fleet) side(l layercache.Layout) *layercache.Cache[migItem] {
	return newCache[migItem](f.t, f.admin, layercache.WithNamespace(f.ns), layercache.WithTTL(time.Hour), layercache.WithLayout(l))
}

// workload drives writers and readers over a fixed set of keys. Each key
// has one writer, which updates the "database" (db) and then the cache,
// and acknowledges the write (acked) once Set returned. Get readers check
// that a read never misses (every key is always cached somewhere readable)
// and never returns less than what was acknowledged before it started.
// Fetch readers hold the key's read lock, so no write overlaps them and
// they must see exactly the acknowledged value; their loader, which must
// never run, would return the database's.
type workload struct {
	f     *fleet
	keys  []string
	db    []atomic.Int64
	acked []atomic.Int64
	locks []sync.RWMutex

	loads, reads, writes atomic.Int64
	errMu                sync.Mutex
	errs                 []error

	stop chan struct{}
	wg   sync.WaitGroup
}

func newWorkload(f *fleet, n int) *workload {
	w := &workload{f: f, keys: make([]string, n), db: make([]atomic.Int64, n), acked: make([]atomic.Int64, n), locks: make([]sync.RWMutex, n)}
	for i := range w.keys {
		w.keys[i] = fmt.Sprintf("p%03d", i)
	}
	return w
}

func (w *workload) fail(err error) {
	w.errMu.Lock()
	if len(w.errs) < 20 {
		w.errs = append(w.errs, err)
	}
	w.errMu.Unlock()
}

func (w *workload) check(when string) {
	w.f.t.Helper()
	w.errMu.Lock()
	defer w.errMu.Unlock()
	if len(w.errs) > 0 {
		w.f.t.Fatalf("%s: %d errors, first: %v", when, len(w.errs), errors.Join(w.errs...))
	}
	if n := w.loads.Load(); n != 0 {
		w.f.t.Fatalf("%s: the loader ran %d times; every key should have stayed cached", when, n)
	}
}

func (w *workload) start() {
	w.stop = make(chan struct{})
	ctx := context.Background()
	n := len(w.f.caches)
	for g := range n {
		c := w.f.caches[g]
		w.wg.Add(3)
		go func() { // writer of the keys i with i%n == g
			defer w.wg.Done()
			for j := 0; ; j++ {
				select {
				case <-w.stop:
					return
				default:
				}
				i := g + n*(j%((len(w.keys)-g+n-1)/n))
				if w.cold(i) {
					continue
				}
				w.locks[i].Lock()
				seq := w.db[i].Add(1)
				err := c.Set(ctx, w.keys[i], migItem{Key: w.keys[i], Seq: seq})
				if err == nil {
					w.acked[i].Store(seq)
				}
				w.locks[i].Unlock()
				if err != nil {
					w.fail(fmt.Errorf("phase %v: Set(%s): %w", c.Phase(), w.keys[i], err))
				}
				w.writes.Add(1)
			}
		}()
		go func() { // Get reader
			defer w.wg.Done()
			r := rand.New(rand.NewPCG(uint64(g), 1))
			for {
				select {
				case <-w.stop:
					return
				default:
				}
				i := r.IntN(len(w.keys))
				lo := w.acked[i].Load()
				got, err := c.Get(ctx, w.keys[i])
				switch {
				case err != nil:
					w.fail(fmt.Errorf("phase %v: Get(%s): %w", c.Phase(), w.keys[i], err))
				case got.Seq < lo:
					w.fail(fmt.Errorf("phase %v: Get(%s) = seq %d after seq %d was acknowledged: a lost write", c.Phase(), w.keys[i], got.Seq, lo))
				}
				w.reads.Add(1)
			}
		}()
		go func() { // Fetch reader
			defer w.wg.Done()
			r := rand.New(rand.NewPCG(uint64(g), 2))
			for {
				select {
				case <-w.stop:
					return
				default:
				}
				i := r.IntN(len(w.keys))
				w.locks[i].RLock()
				want := w.acked[i].Load()
				got, err := c.Fetch(ctx, w.keys[i], func(context.Context) (migItem, error) {
					w.loads.Add(1)
					return migItem{Key: w.keys[i], Seq: w.db[i].Load()}, nil
				})
				w.locks[i].RUnlock()
				switch {
				case err != nil:
					w.fail(fmt.Errorf("phase %v: Fetch(%s): %w", c.Phase(), w.keys[i], err))
				case got.Seq != want:
					w.fail(fmt.Errorf("phase %v: Fetch(%s) = seq %d, want the acknowledged %d", c.Phase(), w.keys[i], got.Seq, want))
				}
				w.reads.Add(1)
			}
		}()
	}
}

// cold keys are never written by the workload: the first reconcile has to
// copy them to the new side.
func (w *workload) cold(i int) bool { return i%4 == 3 }

// writeCold writes every cold key once through c (the workload must be
// paused).
func (w *workload) writeCold(c *layercache.Cache[migItem]) {
	w.f.t.Helper()
	for i, k := range w.keys {
		if !w.cold(i) {
			continue
		}
		seq := w.db[i].Add(1)
		if err := c.Set(context.Background(), k, migItem{Key: k, Seq: seq}); err != nil {
			w.f.t.Fatal(err)
		}
		w.acked[i].Store(seq)
	}
}

// run lets the workload do at least ops more writes and reads.
func (w *workload) run(ops int64) {
	w.f.t.Helper()
	r0, w0 := w.reads.Load(), w.writes.Load()
	waitForWithin(w.f.t, 60*time.Second, func() bool {
		return w.reads.Load()-r0 >= ops && w.writes.Load()-w0 >= ops
	})
}

func (w *workload) pause() {
	close(w.stop)
	w.wg.Wait()
}

// verify reads every key through c and checks it holds the acknowledged
// value; the workload must be paused.
func (w *workload) verify(what string, c *layercache.Cache[migItem]) {
	w.f.t.Helper()
	for i, k := range w.keys {
		got, err := c.Get(context.Background(), k)
		if err != nil || got.Seq != w.acked[i].Load() {
			w.f.t.Fatalf("%s: %s = %+v, %v; want seq %d", what, k, got, err, w.acked[i].Load())
		}
	}
}

// reconcileClean runs a repairing reconcile, then checks that a second
// pass finds the sides equal. The workload must be paused.
func (w *workload) reconcileClean(when string) layercache.ReconcileReport {
	w.f.t.Helper()
	ctx := context.Background()
	c := w.f.caches[0]
	rep, err := c.Reconcile(ctx, layercache.ReconcileOptions{Repair: true, BatchSize: 16})
	if err != nil {
		w.f.t.Fatalf("%s: reconcile: %v", when, err)
	}
	diffs := rep.OnlyOld + rep.OnlyNew + rep.Mismatched
	if rep.Repaired != diffs || rep.RepairSkipped != 0 || rep.Cursor != "" {
		w.f.t.Fatalf("%s: repairing reconcile %+v: want every difference repaired", when, rep)
	}
	again, err := c.Reconcile(ctx, layercache.ReconcileOptions{})
	if err != nil {
		w.f.t.Fatal(err)
	}
	if again.OnlyOld+again.OnlyNew+again.Mismatched != 0 || again.Matched != int64(len(w.keys)) || again.Scanned != int64(len(w.keys)) {
		w.f.t.Fatalf("%s: second pass after a repair %+v; want %d keys, all matched", when, again, len(w.keys))
	}
	return rep
}

func waitForWithin(t *testing.T, d time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("condition not met within %v", d)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestMigrationPhases drives a migration through every phase, forward,
// back and forward again, under concurrent writers and readers on three
// instances, and checks that no read fails or misses, no acknowledged write
// is lost, repairing reconciles leave nothing to repair, and a rollback
// leaves the old side complete for old code.
func TestMigrationPhases(t *testing.T) {
	cases := []struct {
		name     string
		from, to func(ns string) layercache.Layout
	}{
		{"raw-to-hash",
			func(ns string) layercache.Layout { return layercache.Raw(ns + ":product:%s") },
			func(string) layercache.Layout { return layercache.Hash(4) }},
		{"keys-to-hash",
			func(string) layercache.Layout { return layercache.KeyPerEntry() },
			func(string) layercache.Layout { return layercache.Hash(8) }},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
				ns := redistest.Namespace(t)
				testMigrationPhases(t, tgt, ns, tc.from(ns), tc.to(ns))
			})
		})
	}
}

func testMigrationPhases(t *testing.T, tgt *redistest.Target, ns string, from, to layercache.Layout) {
	ctx := context.Background()
	f := newFleet(t, tgt, ns, from, to, 3)
	w := newWorkload(f, 60)
	const ops = 150

	// Seed the old side as the old code did: plain go-redis for Raw.
	legacy := strings.HasPrefix(from.String(), "raw(")
	rawKey := func(k string) string { return ns + ":product:" + k }
	oldSide := f.side(from)
	for _, k := range w.keys {
		if legacy {
			b, _ := json.Marshal(migItem{Key: k})
			if err := f.admin.Set(ctx, rawKey(k), b, time.Hour).Err(); err != nil {
				t.Fatal(err)
			}
		} else if err := oldSide.Set(ctx, k, migItem{Key: k}); err != nil {
			t.Fatal(err)
		}
	}
	// Phase Old: legacy values are hits, without a load.
	for _, k := range w.keys {
		if _, err := f.caches[0].Fetch(ctx, k, noLoad[migItem](t)); err != nil {
			t.Fatalf("phase old, key %s written by old code: %v", k, err)
		}
	}

	w.start()
	step := func(p layercache.Phase) {
		t.Helper()
		f.setPhase(p)
		w.run(ops)
		w.check(p.String())
	}
	w.run(ops)

	// Forward.
	step(layercache.PhaseDualWrite)
	w.pause()
	if rep := w.reconcileClean("after dual-write"); rep.OnlyOld != int64(len(w.keys)/4) {
		t.Fatalf("the first reconcile %+v; want the %d cold keys on the old side only", rep, len(w.keys)/4)
	}
	w.start()
	step(layercache.PhaseReadOldFirst)
	step(layercache.PhaseReadNewFirst)
	step(layercache.PhaseNewOnly)

	// Roll back to old reads.
	step(layercache.PhaseReadNewFirst)
	w.pause()
	w.reconcileClean("rollback to read-new-first")
	w.start()
	step(layercache.PhaseReadOldFirst)
	w.pause()
	w.verify("after rollback to read-old-first, the old side alone", oldSide)
	if legacy {
		for i, k := range w.keys {
			var got migItem
			b, err := f.admin.Get(ctx, rawKey(k)).Bytes()
			if err == nil {
				err = json.Unmarshal(b, &got)
			}
			if err != nil || got.Seq != w.acked[i].Load() {
				t.Fatalf("old code reads %s = %+v, %v; want seq %d", k, got, err, w.acked[i].Load())
			}
		}
	}
	w.start()
	step(layercache.PhaseDualWrite)
	step(layercache.PhaseOld)
	w.pause()
	w.writeCold(f.caches[0]) // in phase old: gone from the new side
	w.start()

	// Forward again, this time reading the new side before it is
	// complete: reads of the cold keys fall back and backfill.
	step(layercache.PhaseDualWrite)
	step(layercache.PhaseReadOldFirst)
	step(layercache.PhaseReadNewFirst)
	w.pause()
	var backfills, fallbacks uint64
	for _, c := range f.caches {
		st := c.Stats().Migration
		backfills += st.New.Backfills
		fallbacks += st.Old.Fallbacks
	}
	if backfills == 0 || fallbacks == 0 {
		t.Fatalf("reading an incomplete new side first made %d fallbacks and %d backfills; want some", fallbacks, backfills)
	}
	w.reconcileClean("before new-only")
	w.start()
	step(layercache.PhaseNewOnly)
	w.pause()
	w.check("end")
	w.verify("the new side alone", f.side(to))

	for _, c := range f.caches {
		st := c.Stats()
		m := st.Migration
		if m.Old.Errors+m.New.Errors+st.RedisErrors != 0 || m.PhaseChanges < 10 || m.Name != f.name {
			t.Fatalf("stats %+v", st)
		}
	}
	t.Logf("%d writes, %d reads", w.writes.Load(), w.reads.Load())
}

// TestReconcileResumeAndProgress checks the cursor, batches, progress and
// the repair rules on hand-made differences.
func TestReconcileResumeAndProgress(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		f := newFleet(t, tgt, redistest.Namespace(t), layercache.KeyPerEntry(), layercache.Hash(3), 1)
		c := f.caches[0]
		oldSide, newSide := f.side(f.from), f.side(f.to)
		const n = 90
		for i := range n {
			k := fmt.Sprint(i)
			switch i % 3 {
			case 0: // both, equal
				_ = oldSide.Set(ctx, k, migItem{Key: k, Seq: 1})
				_ = newSide.Set(ctx, k, migItem{Key: k, Seq: 1})
			case 1: // old only
				_ = oldSide.Set(ctx, k, migItem{Key: k, Seq: 1})
			case 2: // both, different: the new side is written later (below)
				_ = oldSide.Set(ctx, k, migItem{Key: k, Seq: 1})
			}
		}
		// Write versions order writes of different instances by their
		// millisecond; let it tick so that "later" is unambiguous.
		for t0 := time.Now().UnixMilli(); time.Now().UnixMilli() <= t0; {
			time.Sleep(100 * time.Microsecond)
		}
		for i := 2; i < n; i += 3 {
			k := fmt.Sprint(i)
			_ = newSide.Set(ctx, k, migItem{Key: k, Seq: 2})
		}
		_ = newSide.Set(ctx, "new-only", migItem{Seq: 5})

		// Stop after a few batches, then resume from the cursor.
		var calls int
		cctx, cancel := context.WithCancel(ctx)
		first, err := c.Reconcile(cctx, layercache.ReconcileOptions{BatchSize: 10, Progress: func(r layercache.ReconcileReport) {
			calls++
			if calls == 3 {
				cancel()
			}
		}})
		if !errors.Is(err, context.Canceled) || first.Cursor == "" || first.Scanned == 0 || first.Scanned >= n {
			t.Fatalf("cancelled reconcile: %+v, %v", first, err)
		}
		rest, err := c.Reconcile(ctx, layercache.ReconcileOptions{BatchSize: 10, Cursor: first.Cursor})
		if err != nil || rest.Cursor != "" {
			t.Fatalf("resumed reconcile: %+v, %v", rest, err)
		}
		total := first.Scanned + rest.Scanned
		if total != n+1 || first.Matched+rest.Matched != n/3 || first.OnlyOld+rest.OnlyOld != n/3 || first.Mismatched+rest.Mismatched != n/3 || first.OnlyNew+rest.OnlyNew != 1 {
			t.Fatalf("first %+v, rest %+v: want %d keys, %d old-only, %d mismatched, 1 new-only", first, rest, n+1, n/3, n/3)
		}
		if _, err := c.Reconcile(ctx, layercache.ReconcileOptions{Cursor: "garbage"}); !errors.Is(err, layercache.ErrInvalidOption) {
			t.Fatalf("a bad cursor: %v", err)
		}

		// Repair in phase Old: old-only keys are copied, the newer write
		// version wins a mismatch, and the new-only key is deleted.
		rep, err := c.Reconcile(ctx, layercache.ReconcileOptions{Repair: true, BatchSize: 7})
		if err != nil || rep.Repaired != 2*n/3+1 {
			t.Fatalf("repair: %+v, %v", rep, err)
		}
		if got, err := newSide.Get(ctx, "2"); err != nil || got.Seq != 2 {
			t.Fatalf("mismatch repaired to %+v, %v; want the newer write (seq 2)", got, err)
		}
		if got, err := oldSide.Get(ctx, "2"); err != nil || got.Seq != 2 {
			t.Fatalf("old side after repair: %+v, %v", got, err)
		}
		if _, err := newSide.Get(ctx, "new-only"); !errors.Is(err, layercache.ErrNotFound) {
			t.Fatalf("a new-only key survived a repair while old is authoritative: %v", err)
		}
		again, err := c.Reconcile(ctx, layercache.ReconcileOptions{})
		if err != nil || again.Matched != n || again.Scanned != n {
			t.Fatalf("after repair: %+v, %v", again, err)
		}

		// A cache without a migration cannot reconcile.
		if _, err := oldSide.Reconcile(ctx, layercache.ReconcileOptions{}); !errors.Is(err, layercache.ErrNoMigration) {
			t.Fatalf("Reconcile without a migration: %v", err)
		}
	})
}

func TestPhaseControl(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		client := tgt.NewClient(t)
		name := redistest.Namespace(t)
		if p, err := layercache.GetPhase(ctx, client, name); err != nil || p != layercache.PhaseOld {
			t.Fatalf("phase of a new migration = %v, %v; want old", p, err)
		}
		for p := layercache.PhaseOld; p <= layercache.PhaseNewOnly; p++ {
			if err := layercache.SetPhase(ctx, client, name, p); err != nil {
				t.Fatal(err)
			}
			got, err := layercache.GetPhase(ctx, client, name)
			if err != nil || got != p {
				t.Fatalf("GetPhase = %v, %v; want %v", got, err, p)
			}
			if back, err := layercache.ParsePhase(p.String()); err != nil || back != p {
				t.Fatalf("ParsePhase(%q) = %v, %v", p.String(), back, err)
			}
		}
		if err := layercache.SetPhase(ctx, client, name, layercache.Phase(9)); !errors.Is(err, layercache.ErrInvalidOption) {
			t.Fatalf("SetPhase(9) = %v", err)
		}
		if err := layercache.SetPhase(ctx, client, "a{b}", layercache.PhaseOld); !errors.Is(err, layercache.ErrInvalidOption) {
			t.Fatalf("SetPhase with a bad name = %v", err)
		}
		client.Set(ctx, layercache.PhaseKey(name), "sideways", 0)
		if _, err := layercache.GetPhase(ctx, client, name); !errors.Is(err, layercache.ErrInvalidOption) {
			t.Fatalf("GetPhase of garbage = %v", err)
		}
		// A cache follows changes.
		_ = layercache.SetPhase(ctx, client, name, layercache.PhaseReadOldFirst)
		c := newCache[migItem](t, tgt.NewClient(t), layercache.WithNamespace(name),
			layercache.WithMigration(name, layercache.KeyPerEntry(), layercache.Hash(2)), layercache.WithPhasePollInterval(20*time.Millisecond))
		if _, err := c.Get(ctx, "k"); !errors.Is(err, layercache.ErrNotFound) {
			t.Fatal(err)
		}
		if c.Phase() != layercache.PhaseReadOldFirst {
			t.Fatalf("Phase() = %v after the first read", c.Phase())
		}
		_ = layercache.SetPhase(ctx, client, name, layercache.PhaseNewOnly)
		waitFor(t, func() bool { return c.Phase() == layercache.PhaseNewOnly })

		// With the default polling (every 500ms, +-10%), a cache follows
		// within a second: 550ms plus one GET. The bound checked is wider,
		// for a loaded machine.
		d := newCache[migItem](t, tgt.NewClient(t), layercache.WithNamespace(name),
			layercache.WithMigration(name, layercache.KeyPerEntry(), layercache.Hash(2)))
		if _, err := d.Get(ctx, "k"); !errors.Is(err, layercache.ErrNotFound) {
			t.Fatal(err)
		}
		// The first change may meet the follower's first read, made at
		// once; the second is seen by a regular poll.
		_ = layercache.SetPhase(ctx, client, name, layercache.PhaseDualWrite)
		waitFor(t, func() bool { return d.Phase() == layercache.PhaseDualWrite })
		start := time.Now()
		_ = layercache.SetPhase(ctx, client, name, layercache.PhaseReadOldFirst)
		waitFor(t, func() bool { return d.Phase() == layercache.PhaseReadOldFirst })
		if took := time.Since(start); took > 2*time.Second {
			t.Fatalf("followed a phase change after %v", took)
		} else {
			t.Logf("followed a phase change after %v", took)
		}
	})
}

// TestMigrationFollowerStopsOnClose checks that Close stops the phase
// follower and the hash sweeps.
func TestMigrationFollowerStopsOnClose(t *testing.T) {
	tgt := redistest.Miniredis(t)
	client := tgt.NewClient(t)
	defer goleak.VerifyNone(t, leakOptions()...)
	c, err := layercache.New[migItem](client, layercache.WithLogger(quiet),
		layercache.WithMigration("m", layercache.Hash(2), layercache.Hash(4)), layercache.WithSweepInterval(time.Millisecond),
		layercache.WithPhasePollInterval(time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	_ = c.Set(context.Background(), "k", migItem{})
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
}
