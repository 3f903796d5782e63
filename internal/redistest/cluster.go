package redistest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/layercache/layercache/internal/testproc"
)

// slotCount is the number of hash slots of a Redis Cluster.
const slotCount = 16384

// clusterArgs are the arguments of every cluster node. nodeTimeout is
// cluster-node-timeout: how long a node may be unreachable before it is
// failed over.
func clusterArgs(nodeTimeout time.Duration) []string {
	return []string{
		"--cluster-enabled", "yes",
		"--cluster-config-file", "nodes.conf", // relative to --dir
		"--cluster-node-timeout", strconv.FormatInt(nodeTimeout.Milliseconds(), 10),
	}
}

// ---- the shared cluster ----

// startCluster starts the shared three-master cluster. The first attempt
// wires the nodes up directly (CLUSTER ADDSLOTSRANGE / SET-CONFIG-EPOCH /
// MEET), which is what redis-cli --cluster create does minus its
// one-second polling sleeps (it takes 1-5s on its own). If that fails, the
// cluster is rebuilt on new ports with redis-cli --cluster create.
func startCluster() (*Target, error) {
	var errs []error
	for _, create := range []func([]string) error{clusterCreateDirect, clusterCreateCLI} {
		tgt, err := tryStartCluster(create)
		if err == nil {
			return tgt, nil
		}
		errs = append(errs, err)
	}
	return nil, fmt.Errorf("start cluster: %w", errors.Join(errs...))
}

func tryStartCluster(create func(addrs []string) error) (*Target, error) {
	const n = 3
	nodes := make([]*proc, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			nodes[i], errs[i] = startShared("cluster", true, clusterArgs(5*time.Second))
		}()
	}
	wg.Wait()
	var started []*proc
	for _, p := range nodes {
		if p != nil {
			started = append(started, p)
		}
	}
	fail := func(err error) (*Target, error) {
		var tails strings.Builder
		for _, p := range started {
			tails.WriteString(logTail(p.dir, p.addr))
		}
		stopProcs(started, true)
		for _, p := range started {
			_ = os.RemoveAll(p.dir)
		}
		return nil, fmt.Errorf("%w\n%s", err, tails.String())
	}
	if err := errors.Join(errs...); err != nil {
		return fail(err)
	}

	addrs := make([]string, n)
	for i, p := range nodes {
		addrs[i] = p.addr
	}
	if err := create(addrs); err != nil {
		return fail(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), clusterReadyTimeout)
	defer cancel()
	if err := waitClusterReady(ctx, addrs, n); err != nil {
		return fail(err)
	}
	return &Target{Name: "cluster", Addrs: addrs, Cluster: true, Real: true}, nil
}

// clusterCreateDirect makes a cluster of masters only.
func clusterCreateDirect(addrs []string) error {
	ctx, cancel := context.WithTimeout(context.Background(), clusterCreateLimit)
	defer cancel()
	return createCluster(ctx, addrs, len(addrs))
}

// clusterCreateCLI creates the cluster with redis-cli --cluster create.
func clusterCreateCLI(addrs []string) error {
	b, err := binaries()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), clusterCreateLimit)
	defer cancel()
	args := append([]string{"--cluster", "create"}, addrs...)
	args = append(args, "--cluster-replicas", "0", "--cluster-yes")
	cmd := exec.CommandContext(ctx, b.cli, args...)
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := testproc.Start(cmd); err != nil {
		return fmt.Errorf("redis-cli --cluster create: %w", err)
	}
	if err := cmd.Wait(); err != nil {
		return fmt.Errorf("redis-cli --cluster create: %w\n%s", err, out.String())
	}
	return nil
}

// ---- cluster plumbing shared by both kinds ----

// nodeClient returns a client for one node that does not retry, so that
// polling loops see each failure.
func nodeClient(addr string) *redis.Client {
	return redis.NewClient(&redis.Options{
		Addr: addr, DialTimeout: time.Second, ReadTimeout: 2 * time.Second, WriteTimeout: time.Second,
		MaxRetries: -1, PoolSize: 2,
	})
}

// createCluster wires nodes up directly: the first masters of addrs get an
// equal share of the slots each, every node a distinct config epoch,
// every node meets every other, and the remaining nodes become replicas,
// spread evenly over the masters in order (replica j of addrs[masters:]
// follows master j % masters).
func createCluster(ctx context.Context, addrs []string, masters int) error {
	clients := make([]*redis.Client, len(addrs))
	for i, a := range addrs {
		clients[i] = nodeClient(a)
		defer clients[i].Close()
	}
	for i, c := range clients {
		if i < masters {
			lo, hi := i*slotCount/masters, (i+1)*slotCount/masters-1
			if err := c.Do(ctx, "CLUSTER", "ADDSLOTSRANGE", lo, hi).Err(); err != nil {
				return fmt.Errorf("CLUSTER ADDSLOTSRANGE %d %d on %s: %w", lo, hi, addrs[i], err)
			}
		}
		// Only allowed while the node knows no other node, so before MEET.
		if err := c.Do(ctx, "CLUSTER", "SET-CONFIG-EPOCH", i+1).Err(); err != nil {
			return fmt.Errorf("CLUSTER SET-CONFIG-EPOCH on %s: %w", addrs[i], err)
		}
	}
	for i, c := range clients {
		for j, a := range addrs {
			if i == j {
				continue
			}
			host, port, err := net.SplitHostPort(a)
			if err != nil {
				return err
			}
			if err := c.ClusterMeet(ctx, host, port).Err(); err != nil {
				return fmt.Errorf("CLUSTER MEET %s from %s: %w", a, addrs[i], err)
			}
		}
	}
	ids := make([]string, masters)
	for i := range masters {
		id, err := clients[i].Do(ctx, "CLUSTER", "MYID").Text()
		if err != nil {
			return fmt.Errorf("CLUSTER MYID on %s: %w", addrs[i], err)
		}
		ids[i] = id
	}
	for j, c := range clients[masters:] {
		id := ids[j%masters]
		// The replica must have finished its handshake with the master
		// (MEET is asynchronous) before it may follow it.
		for {
			err := c.Do(ctx, "CLUSTER", "REPLICATE", id).Err()
			if err == nil {
				break
			}
			if !strings.Contains(err.Error(), "Unknown node") {
				return fmt.Errorf("CLUSTER REPLICATE on %s: %w", addrs[masters+j], err)
			}
			select {
			case <-ctx.Done():
				return fmt.Errorf("CLUSTER REPLICATE on %s: %w (%w)", addrs[masters+j], err, ctx.Err())
			case <-time.After(10 * time.Millisecond):
			}
		}
	}
	return nil
}

// clusterNode is one line of CLUSTER NODES.
type clusterNode struct {
	id, addr string
	myself   bool
	master   bool
	failed   bool // fail or fail? flag
	masterID string
	slots    [][2]int
}

func clusterNodes(ctx context.Context, c *redis.Client) ([]clusterNode, error) {
	s, err := c.ClusterNodes(ctx).Result()
	if err != nil {
		return nil, err
	}
	var out []clusterNode
	for _, line := range strings.Split(strings.TrimSpace(s), "\n") {
		f := strings.Fields(line)
		if len(f) < 8 {
			continue
		}
		n := clusterNode{id: f[0], masterID: f[3]}
		// "127.0.0.1:6379@16379[,hostname]"
		n.addr, _, _ = strings.Cut(f[1], "@")
		for _, flag := range strings.Split(f[2], ",") {
			switch flag {
			case "myself":
				n.myself = true
			case "master":
				n.master = true
			case "fail", "fail?":
				n.failed = true
			}
		}
		for _, r := range f[8:] {
			if strings.HasPrefix(r, "[") { // a slot being migrated or imported
				continue
			}
			lo, hi, isRange := strings.Cut(r, "-")
			if !isRange {
				hi = lo
			}
			l, err1 := strconv.Atoi(lo)
			h, err2 := strconv.Atoi(hi)
			if err1 != nil || err2 != nil {
				return nil, fmt.Errorf("bad slot range %q in CLUSTER NODES", r)
			}
			n.slots = append(n.slots, [2]int{l, h})
		}
		out = append(out, n)
	}
	return out, nil
}

// clusterView is what one node believes about the slot owners: every
// slot range with the address of its master.
type slotRange struct {
	lo, hi int
	addr   string
}

func clusterSlots(ctx context.Context, c *redis.Client) ([]slotRange, error) {
	slots, err := c.ClusterSlots(ctx).Result()
	if err != nil {
		return nil, err
	}
	var out []slotRange
	for _, s := range slots {
		if len(s.Nodes) == 0 {
			return nil, fmt.Errorf("slots %d-%d have no node", s.Start, s.End)
		}
		out = append(out, slotRange{lo: s.Start, hi: s.End, addr: s.Nodes[0].Addr})
	}
	slices.SortFunc(out, func(a, b slotRange) int { return a.lo - b.lo })
	return out, nil
}

// checkClusterHealthy checks, from the point of view of every node in
// addrs (which must all be up), that the cluster is ok with every slot
// served by a master in addrs, by masters masters (any number if 0), and
// that every
// replica among addrs replicates. Then it writes, reads and deletes a key
// in every master's slots through a cluster client.
func checkClusterHealthy(ctx context.Context, clients []*redis.Client, addrs []string, masters int) error {
	for i, c := range clients {
		info, err := c.ClusterInfo(ctx).Result()
		if err != nil {
			return fmt.Errorf("CLUSTER INFO on %s: %w", addrs[i], err)
		}
		for _, want := range []string{"cluster_state:ok", "cluster_slots_ok:16384"} {
			if !strings.Contains(info, want) {
				return fmt.Errorf("%s: no %s yet", addrs[i], want)
			}
		}
		ranges, err := clusterSlots(ctx, c)
		if err != nil {
			return fmt.Errorf("CLUSTER SLOTS on %s: %w", addrs[i], err)
		}
		covered, owners := 0, map[string]bool{}
		for _, r := range ranges {
			if !slices.Contains(addrs, r.addr) {
				return fmt.Errorf("%s: slots %d-%d still served by %s", addrs[i], r.lo, r.hi, r.addr)
			}
			covered += r.hi - r.lo + 1
			owners[r.addr] = true
		}
		if covered != slotCount || masters > 0 && len(owners) != masters {
			return fmt.Errorf("%s: %d slots on %d masters, want %d on %d", addrs[i], covered, len(owners), slotCount, masters)
		}
		nodes, err := clusterNodes(ctx, c)
		if err != nil {
			return fmt.Errorf("CLUSTER NODES on %s: %w", addrs[i], err)
		}
		for _, n := range nodes {
			if n.myself && !n.master {
				repl, err := c.Info(ctx, "replication").Result()
				if err != nil {
					return fmt.Errorf("INFO replication on %s: %w", addrs[i], err)
				}
				if !strings.Contains(repl, "master_link_status:up") {
					return fmt.Errorf("replica %s not in sync with its master yet", addrs[i])
				}
			}
		}
	}

	// Probe through a cluster client as a test would, one key per master.
	ranges, err := clusterSlots(ctx, clients[0])
	if err != nil {
		return err
	}
	cc := redis.NewClusterClient(&redis.ClusterOptions{
		Addrs: addrs, DialTimeout: time.Second, ReadTimeout: time.Second, WriteTimeout: time.Second,
	})
	defer cc.Close()
	for _, r := range ranges {
		k := keyInSlots("redistest:probe:", r.lo, r.hi)
		if err := cc.Set(ctx, k, k, 0).Err(); err != nil {
			return fmt.Errorf("probe SET %s: %w", k, err)
		}
		if v, err := cc.Get(ctx, k).Result(); err != nil || v != k {
			return fmt.Errorf("probe GET %s = %q, %v", k, v, err)
		}
		if err := cc.Del(ctx, k).Err(); err != nil {
			return fmt.Errorf("probe DEL %s: %w", k, err)
		}
	}
	return nil
}

// waitClusterReady polls checkClusterHealthy until it passes or ctx ends.
func waitClusterReady(ctx context.Context, addrs []string, masters int) error {
	clients := make([]*redis.Client, len(addrs))
	for i, a := range addrs {
		clients[i] = nodeClient(a)
		defer clients[i].Close()
	}
	for {
		lastErr := checkClusterHealthy(ctx, clients, addrs, masters)
		if lastErr == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("cluster not ready: %w (%w)", lastErr, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Slot returns the Redis Cluster hash slot of key: CRC16 of the key, or of
// its hash tag (the part between the first "{" and the next "}", when not
// empty), modulo 16384.
func Slot(key string) int {
	if i := strings.IndexByte(key, '{'); i >= 0 {
		if j := strings.IndexByte(key[i+1:], '}'); j > 0 {
			key = key[i+1 : i+1+j]
		}
	}
	var crc uint16 // CRC-16/XMODEM, as in the cluster spec
	for i := 0; i < len(key); i++ {
		crc ^= uint16(key[i]) << 8
		for range 8 {
			if crc&0x8000 != 0 {
				crc = crc<<1 ^ 0x1021
			} else {
				crc <<= 1
			}
		}
	}
	return int(crc % slotCount)
}

// keyInSlots returns prefix + "{N}" for the smallest N whose slot is in
// [lo, hi].
func keyInSlots(prefix string, lo, hi int) string {
	for n := 0; ; n++ {
		tag := "{" + strconv.Itoa(n) + "}"
		if s := Slot(tag); s >= lo && s <= hi {
			return prefix + tag
		}
	}
}
