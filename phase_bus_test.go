package layercache_test

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/layercache/layercache"
	"github.com/layercache/layercache/internal/redistest"
)

// TestBusCarriesPhaseChanges: with polling set to an hour, only the bus can
// move other nodes to a new phase, so their following it shows the notice
// travelled; both bus modes, on every target.
func TestBusCarriesPhaseChanges(t *testing.T) {
	for _, mode := range []string{"pubsub", "stream"} {
		t.Run(mode, func(t *testing.T) {
			redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
				ctx := context.Background()
				ns := redistest.Namespace(t)
				var busOpts []layercache.BusOption
				if mode == "stream" {
					busOpts = append(busOpts, layercache.WithStream(ns+":bus", 1000))
				} else {
					busOpts = append(busOpts, layercache.WithChannel(ns+":bus"))
				}
				busOpts = append(busOpts, layercache.WithBusLogger(quiet))
				type node struct {
					bus   *layercache.Bus
					cache *layercache.Cache[user]
				}
				nodes := make([]node, 3)
				for i := range nodes {
					bus, err := layercache.NewBus(tgt.NewClient(t), busOpts...)
					if err != nil {
						t.Fatal(err)
					}
					t.Cleanup(func() { _ = bus.Close() })
					c := newCache[user](t, tgt.NewClient(t), layercache.WithNamespace(ns),
						layercache.WithMigration(ns, layercache.KeyPerEntry(), layercache.Hash(4)),
						layercache.WithPhasePollInterval(time.Hour),
						layercache.WithInvalidation(bus))
					readyCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
					err = bus.Ready(readyCtx)
					cancel()
					if err != nil {
						t.Fatal(err)
					}
					// The first operation reads the phase once.
					if _, err := c.Get(ctx, "warm"); !errors.Is(err, layercache.ErrNotFound) {
						t.Fatal(err)
					}
					nodes[i] = node{bus, c}
				}
				for _, p := range []layercache.Phase{layercache.PhaseDualWrite, layercache.PhaseReadOldFirst, layercache.PhaseDualWrite} {
					if err := nodes[0].bus.SetPhase(ctx, ns, p); err != nil {
						t.Fatal(err)
					}
					for i, n := range nodes {
						deadline := time.Now().Add(5 * time.Second)
						for n.cache.Phase() != p {
							if time.Now().After(deadline) {
								t.Fatalf("node %d is at %v, not %v, 5s after Bus.SetPhase (polling is hourly)", i, n.cache.Phase(), p)
							}
							time.Sleep(2 * time.Millisecond)
						}
					}
					if got, err := layercache.GetPhase(ctx, tgt.NewClient(t), ns); err != nil || got != p {
						t.Fatalf("control key holds %v, %v; want %v", got, err, p)
					}
				}
				if err := nodes[0].bus.SetPhase(ctx, ns, layercache.Phase(99)); !errors.Is(err, layercache.ErrInvalidOption) {
					t.Fatalf("SetPhase of a bad phase = %v, want ErrInvalidOption", err)
				}
			})
		})
	}
}

func ExampleBus_SetPhase() {
	rdb, stop := exampleClient()
	defer stop()
	ctx := context.Background()

	// Each instance has one bus; its migrating caches follow phase
	// announcements on it at once (and poll the control key as a fallback).
	bus, _ := layercache.NewBus(rdb)
	defer bus.Close()
	catalog, _ := layercache.New[string](rdb,
		layercache.WithNamespace("catalog"),
		layercache.WithMigration("catalog", layercache.Raw("product:%s"), layercache.Hash(16)),
		layercache.WithInvalidation(bus))
	defer catalog.Close()
	fmt.Println("before:", catalog.Phase())

	// The operator's step, from any instance (or a tool with its own bus).
	if err := bus.SetPhase(ctx, "catalog", layercache.PhaseDualWrite); err != nil {
		panic(err)
	}
	awaitExample(func() bool { return catalog.Phase() == layercache.PhaseDualWrite })
	fmt.Println("after:", catalog.Phase())
	// Output:
	// before: old
	// after: dual-write
}
