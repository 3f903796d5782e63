package redistest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// DedicatedCluster is a Redis Cluster, with replicas, that one test owns:
// the test may kill masters, wait for their replicas to take over, and move
// slots between masters while clients use it. (The shared cluster target
// is [Cluster]; this type is named apart from it.)
//
// Nodes run with a short cluster-node-timeout, so a killed master is
// failed over in about two to four seconds, and with any replica allowed
// to take over (cluster-replica-validity-factor 0). Other settings are
// Redis's defaults: while a master is down and not yet failed over, the
// whole cluster answers CLUSTERDOWN (cluster-require-full-coverage yes).
//
// It is started by [StartCluster] and stopped by t.Cleanup. Methods that
// fail the test must be called from the test's goroutine.
type DedicatedCluster struct {
	t     testing.TB
	nodes []*Server // masters first, then replicas, as started
}

// ClusterNodeTimeout is the cluster-node-timeout of a [DedicatedCluster].
const ClusterNodeTimeout = 1000 * time.Millisecond

// StartCluster starts a dedicated Redis Cluster for t with masters masters
// (at least three, so that a majority survives a killed master) and
// replicasPerMaster replicas each, on free loopback ports, with the slots
// split evenly, and returns once every node agrees, replicas are in sync
// and every master answers. It takes a couple of seconds. It skips t (or
// fails it, see [RequireEnv]) when the binaries are missing and fails t
// when the cluster cannot be started.
func StartCluster(t testing.TB, masters, replicasPerMaster int) *DedicatedCluster {
	t.Helper()
	requireBinaries(t)
	if masters < 3 || replicasPerMaster < 0 {
		t.Fatalf("redistest: StartCluster(%d, %d): need at least 3 masters", masters, replicasPerMaster)
	}
	n := masters * (1 + replicasPerMaster)
	args := append(clusterArgs(ClusterNodeTimeout),
		"--cluster-replica-validity-factor", "0",
		// A replica's first sync must not wait the default 5s for other
		// replicas to join a diskless transfer.
		"--repl-diskless-sync-delay", "0",
	)
	c := &DedicatedCluster{t: t, nodes: make([]*Server, n)}
	// Started one by one: startDedicated fails t, which only the test's
	// goroutine may do. Each start takes a few milliseconds.
	for i := range n {
		c.nodes[i] = startDedicated(t, "cluster", true, args)
	}
	addrs := c.Addrs()
	ctx, cancel := context.WithTimeout(context.Background(), clusterReadyTimeout)
	defer cancel()
	if err := createCluster(ctx, addrs, masters); err != nil {
		t.Fatalf("redistest: create dedicated cluster: %v", err)
	}
	if err := waitClusterReady(ctx, addrs, masters); err != nil {
		t.Fatalf("redistest: dedicated cluster: %v", err)
	}
	return c
}

// Addrs returns the addresses of every node, masters and replicas, in the
// order they were started (the first masters were the masters then). Each
// stays the same across restarts.
func (c *DedicatedCluster) Addrs() []string {
	addrs := make([]string, len(c.nodes))
	for i, s := range c.nodes {
		addrs[i] = s.Addr()
	}
	return addrs
}

// Target returns a cluster target, named "dedicated-cluster", whose
// addresses are every node's, for [Target.NewClient] and the helpers that
// take a target.
func (c *DedicatedCluster) Target() *Target {
	return &Target{Name: "dedicated-cluster", Addrs: c.Addrs(), Cluster: true, Real: true}
}

// Node returns the node listening on addr, or nil.
func (c *DedicatedCluster) Node(addr string) *Server {
	for _, s := range c.nodes {
		if s.Addr() == addr {
			return s
		}
	}
	return nil
}

// live returns the nodes that are running.
func (c *DedicatedCluster) live() (addrs []string) {
	for _, s := range c.nodes {
		if s.Running() {
			addrs = append(addrs, s.Addr())
		}
	}
	return addrs
}

// view returns CLUSTER SLOTS as seen by the first running node that
// answers.
func (c *DedicatedCluster) view(ctx context.Context) ([]slotRange, error) {
	var errs []error
	for _, a := range c.live() {
		nc := nodeClient(a)
		r, err := clusterSlots(ctx, nc)
		_ = nc.Close()
		if err == nil {
			return r, nil
		}
		errs = append(errs, err)
	}
	return nil, fmt.Errorf("no node answers CLUSTER SLOTS: %w", errors.Join(errs...))
}

// Masters returns the addresses of the masters that serve slots, ordered
// by the first slot each serves, as seen by one running node.
func (c *DedicatedCluster) Masters(ctx context.Context) ([]string, error) {
	ranges, err := c.view(ctx)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, r := range ranges { // sorted by first slot
		if !slices.Contains(out, r.addr) {
			out = append(out, r.addr)
		}
	}
	return out, nil
}

// KillMaster SIGKILLs the i-th master of [DedicatedCluster.Masters] (0 is
// the one that serves slot 0 unless slots were moved) and returns it, so
// that the test may [Server.Restart] it later: it then rejoins as a
// replica of the node that took over. It fails the test when there is no
// such master.
func (c *DedicatedCluster) KillMaster(i int) *Server {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	masters, err := c.Masters(ctx)
	if err != nil {
		c.t.Fatalf("redistest: KillMaster(%d): %v", i, err)
	}
	if i < 0 || i >= len(masters) {
		c.t.Fatalf("redistest: KillMaster(%d): the cluster has %d masters", i, len(masters))
	}
	s := c.Node(masters[i])
	if s == nil {
		c.t.Fatalf("redistest: KillMaster(%d): master %s is not a node of this cluster", i, masters[i])
	}
	s.Kill()
	return s
}

// WaitFailover waits until the cluster serves all 16384 slots again from
// running masters only: every running node reports cluster_state:ok with
// every slot ok and no slot on a node that is down, every running replica
// is in sync, and a key in each master's slots can be written and read.
// It returns ctx's error, with the last unmet condition, if that takes
// too long (it cannot succeed after killing a master that had no
// replica).
//
// Clients made before the failover may still send the dead master's
// slots to it: go-redis's ClusterClient re-reads the slot map on MOVED
// and ASK, or every ClusterStateReloadInterval (60s by default), but not
// on connection errors. Call its ReloadState, or make a new client.
func (c *DedicatedCluster) WaitFailover(ctx context.Context) error {
	addrs := c.live()
	if len(addrs) == 0 {
		return errors.New("redistest: no node is running")
	}
	// Any number of masters: a master that lost all its slots to a
	// Reshard has become a replica.
	return waitClusterReady(ctx, addrs, 0)
}

// MoveSlot moves hash slot slot, with its keys, to the master at to, the
// way redis-cli --cluster reshard does and as the cluster spec describes:
// the target imports the slot, the source migrates it, keys are moved
// with MIGRATE in batches while clients are redirected with ASK, then
// every master is told the new owner. Clients see MOVED and ASK
// redirections, and TRYAGAIN for multi-key commands on the slot while it
// moves, never lost keys. It does nothing if to already serves the slot.
// The cluster should be healthy (see [DedicatedCluster.WaitFailover]).
func (c *DedicatedCluster) MoveSlot(ctx context.Context, slot int, to string) error {
	if slot < 0 || slot >= slotCount {
		return fmt.Errorf("redistest: MoveSlot: no slot %d", slot)
	}
	dst := nodeClient(to)
	defer dst.Close()
	ranges, err := clusterSlots(ctx, dst)
	if err != nil {
		return fmt.Errorf("redistest: MoveSlot: CLUSTER SLOTS on %s: %w", to, err)
	}
	from := ""
	for _, r := range ranges {
		if slot >= r.lo && slot <= r.hi {
			from = r.addr
		}
	}
	if from == "" {
		return fmt.Errorf("redistest: MoveSlot: %s knows no owner of slot %d", to, slot)
	}
	if from == to {
		return nil
	}
	src := nodeClient(from)
	defer src.Close()
	return moveSlot(ctx, src, dst, slot, ranges)
}

func moveSlot(ctx context.Context, src, dst *redis.Client, slot int, ranges []slotRange) error {
	from, to := src.Options().Addr, dst.Options().Addr
	srcID, err := src.Do(ctx, "CLUSTER", "MYID").Text()
	if err != nil {
		return fmt.Errorf("redistest: CLUSTER MYID on %s: %w", from, err)
	}
	dstID, err := dst.Do(ctx, "CLUSTER", "MYID").Text()
	if err != nil {
		return fmt.Errorf("redistest: CLUSTER MYID on %s: %w", to, err)
	}
	// Importing before migrating: once the source sends ASK, the target
	// must already accept the asked commands.
	if err := dst.Do(ctx, "CLUSTER", "SETSLOT", slot, "IMPORTING", srcID).Err(); err != nil {
		return fmt.Errorf("redistest: SETSLOT %d IMPORTING on %s: %w", slot, to, err)
	}
	if err := src.Do(ctx, "CLUSTER", "SETSLOT", slot, "MIGRATING", dstID).Err(); err != nil {
		return fmt.Errorf("redistest: SETSLOT %d MIGRATING on %s: %w", slot, from, err)
	}
	host, port, _ := net.SplitHostPort(to)
	for {
		// While migrating, the source creates no key in the slot (it
		// answers ASK for missing keys), so this loop ends.
		keys, err := src.ClusterGetKeysInSlot(ctx, slot, 100).Result()
		if err != nil {
			return fmt.Errorf("redistest: GETKEYSINSLOT %d on %s: %w", slot, from, err)
		}
		if len(keys) == 0 {
			break
		}
		args := []any{"MIGRATE", host, port, "", 0, 10000, "KEYS"}
		for _, k := range keys {
			args = append(args, k)
		}
		if err := src.Do(ctx, args...).Err(); err != nil {
			return fmt.Errorf("redistest: MIGRATE %d keys of slot %d from %s to %s: %w", len(keys), slot, from, to, err)
		}
	}
	// The target first, so that it owns the slot (and bumps its epoch)
	// before the source stops redirecting with ASK; then the source, then
	// the other masters, which would learn it by gossip anyway.
	owners := []string{to, from}
	for _, r := range ranges {
		if !slices.Contains(owners, r.addr) {
			owners = append(owners, r.addr)
		}
	}
	for _, a := range owners {
		nc := dst
		switch a {
		case to:
		case from:
			nc = src
		default:
			nc = nodeClient(a)
			defer nc.Close()
		}
		if err := nc.Do(ctx, "CLUSTER", "SETSLOT", slot, "NODE", dstID).Err(); err != nil {
			return fmt.Errorf("redistest: SETSLOT %d NODE on %s: %w", slot, a, err)
		}
	}
	return nil
}

// Reshard moves the first (lowest) n slots that the master at from serves
// to the master at to, one slot at a time with [DedicatedCluster.MoveSlot],
// so that tests can move slots while clients use them. A master left
// without slots becomes a replica of the one that took them (Redis 7's
// cluster-allow-replica-migration).
func (c *DedicatedCluster) Reshard(ctx context.Context, from, to string, n int) error {
	if from == to {
		return fmt.Errorf("redistest: Reshard from %s to itself", from)
	}
	src := nodeClient(from)
	defer src.Close()
	dst := nodeClient(to)
	defer dst.Close()
	ranges, err := clusterSlots(ctx, src)
	if err != nil {
		return fmt.Errorf("redistest: Reshard: CLUSTER SLOTS on %s: %w", from, err)
	}
	var slots []int
	for _, r := range ranges { // sorted by first slot
		if r.addr != from {
			continue
		}
		for s := r.lo; s <= r.hi && len(slots) < n; s++ {
			slots = append(slots, s)
		}
	}
	if len(slots) < n {
		return fmt.Errorf("redistest: Reshard: %s serves %d slots, fewer than %d", from, len(slots), n)
	}
	for _, s := range slots {
		if err := moveSlot(ctx, src, dst, s, ranges); err != nil {
			return err
		}
	}
	return nil
}
