package redistest_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/layercache/layercache/internal/redistest"
)

// TestDedicatedCluster starts a cluster with replicas, moves slots under
// load, then kills a master and waits for its replica to take over.
func TestDedicatedCluster(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	start := time.Now()
	cl := redistest.StartCluster(t, 3, 1)
	t.Logf("3 masters + 3 replicas ready in %v", time.Since(start))

	tgt := cl.Target()
	if !tgt.Cluster || !tgt.Real || len(tgt.Addrs) != 6 || tgt.Name != "dedicated-cluster" {
		t.Fatalf("bad target %+v", tgt)
	}
	masters, err := cl.Masters(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if want := cl.Addrs()[:3]; strings.Join(masters, ",") != strings.Join(want, ",") {
		t.Fatalf("masters %v, want the first three nodes %v", masters, want)
	}
	for _, a := range cl.Addrs()[3:] {
		if role := nodeRole(ctx, t, a); role != "slave" {
			t.Fatalf("node %s is a %s, want a replica", a, role)
		}
	}

	c := tgt.NewClient(t)
	ns := redistest.Namespace(t)
	key := func(i int) string { return fmt.Sprintf("%s:%d", ns, i) }

	t.Run("MoveSlot", func(t *testing.T) {
		k := key(-1)
		if err := c.Set(ctx, k, "moved", 0).Err(); err != nil {
			t.Fatal(err)
		}
		slot := redistest.Slot(k)
		owner := ownerOf(ctx, t, cl.Addrs()[0], slot)
		to := masters[0]
		if owner == to {
			to = masters[1]
		}
		if err := cl.MoveSlot(ctx, slot, to); err != nil {
			t.Fatal(err)
		}
		if err := cl.MoveSlot(ctx, slot, to); err != nil { // already there
			t.Fatal(err)
		}
		for _, a := range masters {
			if got := ownerOf(ctx, t, a, slot); got != to {
				t.Fatalf("%s says slot %d is on %s, want %s", a, slot, got, to)
			}
		}
		// The key moved with its slot and the client follows MOVED.
		if v, err := c.Get(ctx, k).Result(); err != nil || v != "moved" {
			t.Fatalf("GET after MoveSlot = %q, %v", v, err)
		}
		n := redis.NewClient(&redis.Options{Addr: to})
		defer n.Close()
		if got, err := n.Exists(ctx, k).Result(); err != nil || got != 1 {
			t.Fatalf("key not on %s: %d, %v", to, got, err)
		}
	})

	t.Run("ReshardUnderLoad", func(t *testing.T) {
		const keys, moved = 2000, 200
		for i := range keys {
			if err := c.Set(ctx, key(i), i, 0).Err(); err != nil {
				t.Fatal(err)
			}
		}
		from, to := masters[1], masters[2]
		var fromSlots []int
		for s, owner := range slotOwners(ctx, t, from) {
			if owner == from && len(fromSlots) < moved {
				fromSlots = append(fromSlots, s)
			}
		}

		var reshardErr error
		resharded := make(chan struct{})
		go func() {
			defer close(resharded)
			reshardErr = cl.Reshard(ctx, from, to, moved)
		}()
		// Writers on every key while the slots move. Goroutine g owns the
		// keys k with k%4 == g, so want[k] is written by one goroutine
		// only and the values are known.
		want := make([]int, keys)
		for i := range want {
			want[i] = i
		}
		calls := redistest.HammerFor(t, 4, time.Minute, func(g, i int) bool {
			select {
			case <-resharded:
				return false
			default:
			}
			k := (4*i + g) % keys
			v, err := c.Incr(ctx, key(k)).Result()
			if err != nil {
				t.Errorf("INCR %s during reshard: %v", key(k), err)
				return false
			}
			if want[k]++; int(v) != want[k] {
				t.Errorf("INCR %s = %d, want %d", key(k), v, want[k])
				return false
			}
			return true
		})
		<-resharded
		if reshardErr != nil {
			t.Fatal(reshardErr)
		}
		t.Logf("%d slots moved under %d INCRs", moved, calls)
		for i := range keys {
			if v, err := c.Get(ctx, key(i)).Int(); err != nil || v != want[i] {
				t.Fatalf("GET %s after reshard = %d, %v; want %d", key(i), v, err, want[i])
			}
		}
		// from's first slots are on to now, as every master says.
		for _, m := range masters {
			owners := slotOwners(ctx, t, m)
			for _, s := range fromSlots {
				if owners[s] != to {
					t.Fatalf("%s says slot %d is on %s, want %s", m, s, owners[s], to)
				}
			}
		}
	})

	t.Run("Failover", func(t *testing.T) {
		// Replication is asynchronous: WAIT until every replica has the
		// writes, so that none is lost with the master.
		err := c.(*redis.ClusterClient).ForEachMaster(ctx, func(ctx context.Context, m *redis.Client) error {
			n, err := m.Do(ctx, "WAIT", 1, 5000).Int()
			if err == nil && n < 1 {
				err = fmt.Errorf("%s: WAIT reached %d replicas", m.Options().Addr, n)
			}
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		before, err := cl.Masters(ctx)
		if err != nil {
			t.Fatal(err)
		}
		killed := cl.KillMaster(0)
		if killed.Addr() != before[0] || killed.Running() {
			t.Fatalf("KillMaster(0) killed %s (running %v), want %s", killed.Addr(), killed.Running(), before[0])
		}
		start := time.Now()
		if err := cl.WaitFailover(ctx); err != nil {
			t.Fatal(err)
		}
		t.Logf("failover took %v", time.Since(start))
		after, err := cl.Masters(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for _, a := range after {
			if a == killed.Addr() {
				t.Fatalf("killed master %s still serves slots: %v", a, after)
			}
		}
		if len(after) != 3 {
			t.Fatalf("masters after failover: %v", after)
		}
		// Every key survived. A client made before the failover keeps
		// sending the dead master's slots to it: go-redis re-reads the
		// slot map only on MOVED/ASK or every ClusterStateReloadInterval
		// (60s), not on connection errors. Reloading it by hand is what
		// an application would have to do.
		fresh := cl.Target().NewClient(t)
		for i := range 2000 {
			if err := fresh.Get(ctx, key(i)).Err(); err != nil {
				t.Fatalf("GET %s after failover: %v", key(i), err)
			}
		}
		c.(*redis.ClusterClient).ReloadState(ctx)
		redistest.Eventually(t, redistest.DefaultWait, "the old client to follow the failover", func() bool {
			for i := range 2000 {
				if err := c.Get(ctx, key(i)).Err(); err != nil {
					return false
				}
			}
			return true
		})

		// The old master comes back as a replica of the one that took
		// over.
		killed.Restart()
		redistest.Eventually(t, redistest.DefaultWait, "the old master to rejoin as a replica", func() bool {
			return nodeRole(ctx, t, killed.Addr()) == "slave"
		})
		if err := cl.WaitFailover(ctx); err != nil {
			t.Fatal(err)
		}
	})
}

// nodeRole returns "master" or "slave" as the node at addr sees itself.
func nodeRole(ctx context.Context, t *testing.T, addr string) string {
	t.Helper()
	n := redis.NewClient(&redis.Options{Addr: addr, MaxRetries: -1})
	defer n.Close()
	nodes, err := n.ClusterNodes(ctx).Result()
	if err != nil {
		t.Fatalf("CLUSTER NODES on %s: %v", addr, err)
	}
	for _, line := range strings.Split(nodes, "\n") {
		if f := strings.Fields(line); len(f) > 2 && strings.Contains(f[2], "myself") {
			if strings.Contains(f[2], "master") {
				return "master"
			}
			return "slave"
		}
	}
	t.Fatalf("no myself line in CLUSTER NODES of %s", addr)
	return ""
}

// ownerOf returns the address of slot's master as the node at addr sees
// it.
func ownerOf(ctx context.Context, t *testing.T, addr string, slot int) string {
	t.Helper()
	return slotOwners(ctx, t, addr)[slot]
}

// slotOwners returns the address of every slot's master as the node at
// addr sees it.
func slotOwners(ctx context.Context, t *testing.T, addr string) []string {
	t.Helper()
	n := redis.NewClient(&redis.Options{Addr: addr, MaxRetries: -1})
	defer n.Close()
	ranges, err := n.ClusterSlots(ctx).Result()
	if err != nil {
		t.Fatalf("CLUSTER SLOTS on %s: %v", addr, err)
	}
	owners := make([]string, 16384)
	for _, r := range ranges {
		for s := r.Start; s <= r.End; s++ {
			owners[s] = r.Nodes[0].Addr
		}
	}
	return owners
}
