package layercache_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/layercache/layercache"
	"github.com/layercache/layercache/internal/redistest"
)

// leaseLayouts are the layouts and migration phases the lease tests run
// on, besides key-per-entry (stampede_test.go).
var leaseLayouts = []struct {
	name  string
	phase layercache.Phase // for migrations
	opts  func(ns string) []layercache.Option
}{
	{"hash", 0, func(ns string) []layercache.Option {
		return []layercache.Option{layercache.WithLayout(layercache.Hash(4))}
	}},
	{"raw", 0, func(ns string) []layercache.Option {
		return []layercache.Option{layercache.WithLayout(layercache.Raw(ns + ":p:%s"))}
	}},
	{"migration-dual-write", layercache.PhaseDualWrite, migrationOpts},
	{"migration-read-new-first", layercache.PhaseReadNewFirst, migrationOpts},
	{"migration-new-only", layercache.PhaseNewOnly, migrationOpts},
}

func migrationOpts(ns string) []layercache.Option {
	return []layercache.Option{layercache.WithMigration(ns, layercache.Raw(ns+":p:%s"), layercache.Hash(4))}
}

func leaseInstances(t *testing.T, tgt *redistest.Target, n int, phase layercache.Phase, opts func(string) []layercache.Option) []*layercache.Cache[user] {
	t.Helper()
	ns := redistest.Namespace(t)
	if err := layercache.SetPhase(context.Background(), tgt.NewClient(t), ns, phase); err != nil {
		t.Fatal(err)
	}
	return instances(t, tgt, n, ns, append(opts(ns), layercache.WithLocks(30*time.Second, 30*time.Second))...)
}

// TestLeasesOnEveryLayout: cold concurrent misses on several instances cost
// one load whatever the layout, and a Set or Delete elsewhere during the
// load keeps its value from being cached.
func TestLeasesOnEveryLayout(t *testing.T) {
	for _, l := range leaseLayouts {
		t.Run(l.name, func(t *testing.T) {
			redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
				ctx := context.Background()
				cs := leaseInstances(t, tgt, 4, l.phase, l.opts)
				for _, c := range cs {
					if _, err := c.Get(ctx, "warmup"); !errors.Is(err, layercache.ErrNotFound) {
						t.Fatal(err)
					}
				}
				var loads counter
				load := loads.user(7, 100*time.Millisecond)
				var wg sync.WaitGroup
				errs := make(chan error, 4*25)
				for _, c := range cs {
					for range 25 {
						wg.Add(1)
						go func() {
							defer wg.Done()
							got, err := c.Fetch(ctx, "hot", load)
							if err == nil && got.ID != 7 {
								err = fmt.Errorf("got %+v", got)
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
				if n := loads.n.Load(); n != 1 {
					t.Fatalf("%d loads across 4 instances, want 1", n)
				}
				if st := sumStats(cs); st.LeasesAcquired != 1 || st.LeaseWaitTimeouts != 0 {
					t.Fatalf("stats %+v", st)
				}

				// A Set elsewhere during a load breaks the lease.
				a, b := cs[0], cs[1]
				load2, started, release := blockingLoader(user{ID: 1, Name: "old"})
				done := make(chan struct{})
				go func() { defer close(done); _, _ = a.Fetch(ctx, "s", load2) }()
				<-started
				if err := b.Set(ctx, "s", user{ID: 1, Name: "new"}); err != nil {
					t.Fatal(err)
				}
				close(release)
				<-done
				for _, c := range cs {
					if got, err := c.Get(ctx, "s"); err != nil || got.Name != "new" {
						t.Fatalf("after a Set during a load elsewhere, Get = %+v, %v; want the Set's value", got, err)
					}
				}

				// A Delete elsewhere during a load too.
				load3, started3, release3 := blockingLoader(user{ID: 2, Name: "before delete"})
				done3 := make(chan struct{})
				go func() { defer close(done3); _, _ = a.Fetch(ctx, "d", load3) }()
				<-started3
				if err := b.Delete(ctx, "d"); err != nil {
					t.Fatal(err)
				}
				close(release3)
				<-done3
				if _, err := b.Get(ctx, "d"); !errors.Is(err, layercache.ErrNotFound) {
					t.Fatalf("a load that started before Delete was cached after it: %v", err)
				}
				if st := a.Stats(); st.LeasesLost != 2 {
					t.Fatalf("LeasesLost = %d, want 2", st.LeasesLost)
				}
			})
		})
	}
}
