package layercache

import (
	"context"
	"fmt"
	"reflect"
	"sync/atomic"
	"testing"
	"time"

	"github.com/layercache/layercache/internal/redistest"
	"github.com/redis/go-redis/v9"
)

// roundTrips counts what each node of a client is sent: one per command
// sent alone, one per pipeline.
type roundTrips struct{ n atomic.Int64 }

func (r *roundTrips) DialHook(next redis.DialHook) redis.DialHook { return next }
func (r *roundTrips) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error { r.n.Add(1); return next(ctx, cmd) }
}
func (r *roundTrips) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error { r.n.Add(1); return next(ctx, cmds) }
}

// countedClient returns a client of tgt whose node clients count their
// round trips, and the number of masters.
func countedClient(t *testing.T, tgt *redistest.Target) (redis.UniversalClient, *roundTrips, int) {
	rt := &roundTrips{}
	client := tgt.NewClient(t)
	if cc, ok := client.(*redis.ClusterClient); ok {
		cc.OnNewNode(func(c *redis.Client) { c.AddHook(rt) })
		return client, rt, len(tgt.Addrs)
	}
	client.AddHook(rt)
	return client, rt, 1
}

// TestGetManyOneRoundTripPerNode: a batch read of 100 keys costs one
// round trip per node, in every layout, and reads what was written.
func TestGetManyOneRoundTripPerNode(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		ns := redistest.Namespace(t)
		client, rt, nodes := countedClient(t, tgt)
		now := func() int64 { return time.Now().UnixMilli() }
		for _, l := range []Layout{KeyPerEntry(), Hash(16), Raw(ns + ":raw:%s")} {
			t.Run(l.String(), func(t *testing.T) {
				s := newLayoutStore(client, newKeyspace(ns, "v1"), l, now, time.Minute)
				keys := make([]string, 100)
				ops := make([]writeOp, 0, len(keys))
				for i := range keys {
					keys[i] = fmt.Sprint("k", i)
					if i%2 == 0 {
						ops = append(ops, writeOp{key: keys[i], env: testEnv(uint64(now())<<16, keys[i]), ttl: time.Minute})
					}
				}
				if _, err := s.writeMany(ctx, ops); err != nil {
					t.Fatal(err)
				}
				// Connect every node first: a dial is not a round trip of
				// the read.
				if _, err := s.getMany(ctx, keys); err != nil {
					t.Fatal(err)
				}
				before := rt.n.Load()
				envs, err := s.getMany(ctx, keys)
				if err != nil {
					t.Fatal(err)
				}
				if got := rt.n.Load() - before; got < 1 || got > int64(nodes) {
					t.Errorf("getMany of %d keys took %d round trips, want at most one per node (%d)", len(keys), got, nodes)
				}
				for i, env := range envs {
					want := "<absent>"
					if i%2 == 0 {
						want = keys[i]
					}
					got := "<absent>"
					if env != nil {
						got = string(env[40:])
					}
					if got != want {
						t.Fatalf("key %s = %q, want %q", keys[i], got, want)
					}
				}
			})
		}
	})
}

// The recorder fills every counter of Stats, SideStats and BusStats from
// exactly one event of its owner, and every event names a field that
// exists.
func TestRecorderCoversEveryCounter(t *testing.T) {
	var r recorder
	for e := event(0); e < numEvents; e++ {
		r.add(e, uint64(e)+1)
	}
	var st Stats
	var side SideStats
	var bus BusStats
	snaps := map[owner]any{ofCache: &st, ofSide: &side, ofBus: &bus}
	for of, dst := range snaps {
		r.snapshotInto(dst, of)
		n := 0
		for e := range events {
			if events[e].of == of {
				n++
			}
		}
		seen := map[uint64]bool{}
		rv := reflect.ValueOf(dst).Elem()
		for i := 0; i < rv.NumField(); i++ {
			f := rv.Field(i)
			if f.Kind() != reflect.Uint64 {
				continue
			}
			v := f.Uint()
			if v == 0 {
				t.Errorf("%T.%s is filled by no event", dst, rv.Type().Field(i).Name)
			}
			if seen[v] {
				t.Errorf("%T.%s is filled by two events", dst, rv.Type().Field(i).Name)
			}
			seen[v] = true
		}
		if len(seen) != n {
			t.Errorf("%T: %d fields filled by %d events; every event must name a field of its owner's snapshot", dst, len(seen), n)
		}
	}
}
