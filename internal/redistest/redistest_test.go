package redistest_test

import (
	"context"
	"fmt"
	"regexp"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/layercache/layercache/internal/redistest"
)

func TestMain(m *testing.M) { redistest.Main(m) }

func TestRunSetGet(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		c := tgt.NewClient(t)
		ns := redistest.Namespace(t)

		switch tgt.Name {
		case "miniredis":
			if tgt.Mini == nil || tgt.Real || tgt.Cluster {
				t.Fatalf("bad miniredis target: %+v", tgt)
			}
		case "standalone":
			if tgt.Mini != nil || !tgt.Real || tgt.Cluster || len(tgt.Addrs) != 1 {
				t.Fatalf("bad standalone target: %+v", tgt)
			}
		case "cluster":
			if tgt.Mini != nil || !tgt.Real || !tgt.Cluster || len(tgt.Addrs) != 3 {
				t.Fatalf("bad cluster target: %+v", tgt)
			}
		default:
			t.Fatalf("unexpected target name %q", tgt.Name)
		}
		for _, a := range tgt.Addrs {
			if !regexp.MustCompile(`^127\.0\.0\.1:\d+$`).MatchString(a) {
				t.Fatalf("non-loopback address %q", a)
			}
		}
		_, isCluster := c.(*redis.ClusterClient)
		if _, isSimple := c.(*redis.Client); isCluster != tgt.Cluster || isSimple == tgt.Cluster {
			t.Fatalf("client type %T for cluster=%v", c, tgt.Cluster)
		}

		const nkeys = 64
		for i := range nkeys {
			k := fmt.Sprintf("%s:k%d", ns, i)
			if err := c.Set(ctx, k, i, time.Minute).Err(); err != nil {
				t.Fatalf("SET %s: %v", k, err)
			}
		}
		for i := range nkeys {
			k := fmt.Sprintf("%s:k%d", ns, i)
			if v, err := c.Get(ctx, k).Int(); err != nil || v != i {
				t.Fatalf("GET %s = %d, %v; want %d", k, v, err, i)
			}
		}

		if cc, ok := c.(*redis.ClusterClient); ok {
			// The keys must have been spread over all three masters.
			var mu sync.Mutex
			withKeys, masters := 0, 0
			err := cc.ForEachMaster(ctx, func(ctx context.Context, m *redis.Client) error {
				keys, err := m.Keys(ctx, ns+":*").Result()
				mu.Lock()
				defer mu.Unlock()
				masters++
				if len(keys) > 0 {
					withKeys++
				}
				return err
			})
			if err != nil {
				t.Fatal(err)
			}
			if masters != 3 || withKeys != 3 {
				t.Fatalf("masters=%d, masters holding keys=%d; want 3 and 3", masters, withKeys)
			}
		}
	})
}

func TestNamespace(t *testing.T) {
	valid := regexp.MustCompile(`^[a-z0-9_-]{1,20}$`)
	seen := map[string]bool{}
	for range 1000 {
		ns := redistest.Namespace(t)
		if !valid.MatchString(ns) {
			t.Fatalf("invalid namespace %q", ns)
		}
		if seen[ns] {
			t.Fatalf("duplicate namespace %q", ns)
		}
		seen[ns] = true
	}
}

func TestKillClients(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		c := tgt.NewClient(t)
		ns := redistest.Namespace(t)

		ps := c.Subscribe(ctx, ns+":ch")
		defer ps.Close()
		if _, err := ps.ReceiveTimeout(ctx, 2*time.Second); err != nil {
			t.Fatalf("subscribe: %v", err)
		}
		if err := c.Ping(ctx).Err(); err != nil {
			t.Fatal(err)
		}

		// Skips on miniredis.
		if n := redistest.KillClients(ctx, t, tgt, "pubsub"); n < 1 {
			t.Fatalf("killed %d pubsub clients, want >= 1", n)
		}
		if n := redistest.KillClients(ctx, t, tgt, "normal"); n < 1 {
			t.Fatalf("killed %d normal clients, want >= 1", n)
		}
		// The client recovers by redialing.
		k := ns + ":after"
		if err := c.Set(ctx, k, "v", time.Minute).Err(); err != nil {
			t.Fatalf("SET after kill: %v", err)
		}
		if v, err := c.Get(ctx, k).Result(); err != nil || v != "v" {
			t.Fatalf("GET after kill = %q, %v", v, err)
		}
	})
}

func TestSingleTargets(t *testing.T) {
	if tgt := redistest.Miniredis(t); tgt.Name != "miniredis" || tgt.Mini == nil {
		t.Fatalf("Miniredis: %+v", tgt)
	}
	ts := redistest.Targets(t)
	if len(ts) != 1 && len(ts) != 3 {
		t.Fatalf("Targets returned %d targets", len(ts))
	}
	if len(ts) == 3 {
		if s := redistest.Standalone(t); s.Addrs[0] != ts[1].Addrs[0] {
			t.Fatalf("standalone server not shared: %v vs %v", s.Addrs, ts[1].Addrs)
		}
		if c := redistest.Cluster(t); c.Addrs[0] != ts[2].Addrs[0] {
			t.Fatalf("cluster not shared: %v vs %v", c.Addrs, ts[2].Addrs)
		}
	}
}
