package redistest

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// Server-side faults: what a test can make a real Redis do to its
// clients. For faults in the network between them, see the faults
// package's proxy.

// KillClients runs CLIENT KILL TYPE typ (e.g. "normal", "pubsub") on every
// node of tgt and returns the total number of connections closed. The
// connection that issues the command is spared. It fails t on error and
// skips t for miniredis, which has no CLIENT KILL.
//
// On the shared real servers this also closes connections of other tests
// running in parallel in the same binary; fault tests using it should not
// call t.Parallel.
func KillClients(ctx context.Context, t testing.TB, tgt *Target, typ string) int {
	t.Helper()
	if !tgt.Real {
		t.Skipf("redistest: %s does not support CLIENT KILL; this fault test needs a real Redis target", tgt.Name)
	}
	total := 0
	for _, addr := range tgt.Addrs {
		c := redis.NewClient(&redis.Options{Addr: addr, DialTimeout: 2 * time.Second, ReadTimeout: 3 * time.Second})
		n, err := c.Do(ctx, "CLIENT", "KILL", "TYPE", typ).Int()
		_ = c.Close()
		if err != nil {
			t.Fatalf("redistest: CLIENT KILL TYPE %s on %s: %v", typ, addr, err)
		}
		total += n
	}
	return total
}

// ClientPause runs CLIENT PAUSE d ALL on every node that c sends commands
// to (every master of a cluster client): until d has passed, the server
// accepts connections and reads commands but answers none, as a Redis
// stuck in a long command or a failover would. It returns as soon as the
// pause is in place. It returns an error for miniredis, which cannot
// pause.
//
// On the shared servers it also stalls tests running in parallel in the
// same binary: prefer a [Server] or [DedicatedCluster].
func ClientPause(ctx context.Context, c redis.UniversalClient, d time.Duration) error {
	addrs, err := nodeAddrs(ctx, c)
	if err != nil {
		return err
	}
	ms := max(d.Milliseconds(), 1)
	for _, a := range addrs {
		nc := nodeClient(a)
		err := nc.Do(ctx, "CLIENT", "PAUSE", ms, "ALL").Err()
		_ = nc.Close()
		if err != nil {
			return fmt.Errorf("redistest: CLIENT PAUSE on %s: %w", a, err)
		}
	}
	return nil
}

// DebugSleep runs DEBUG SLEEP d on every node that c sends commands to
// (every master of a cluster client, all at once), each on a connection of
// its own with a read timeout longer than d, and returns when every sleep
// is over: meanwhile each server is blocked, answering nobody, as Redis
// is during a slow command or a fork on a big dataset. Run it in a
// goroutine to act while the servers sleep. Every server this package
// starts allows DEBUG from loopback clients; miniredis returns an error.
//
// On the shared servers it also stalls tests running in parallel in the
// same binary: prefer a [Server] or [DedicatedCluster].
func DebugSleep(ctx context.Context, c redis.UniversalClient, d time.Duration) error {
	addrs, err := nodeAddrs(ctx, c)
	if err != nil {
		return err
	}
	secs := strconv.FormatFloat(d.Seconds(), 'f', 3, 64)
	errs := make([]error, len(addrs))
	var wg sync.WaitGroup
	for i, a := range addrs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			nc := redis.NewClient(&redis.Options{
				Addr: a, DialTimeout: 2 * time.Second, ReadTimeout: d + 5*time.Second, MaxRetries: -1, PoolSize: 1,
			})
			defer nc.Close()
			if err := nc.Do(ctx, "DEBUG", "SLEEP", secs).Err(); err != nil {
				errs[i] = fmt.Errorf("redistest: DEBUG SLEEP on %s: %w", a, err)
			}
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

// nodeAddrs returns the address of every node that c sends commands to.
func nodeAddrs(ctx context.Context, c redis.UniversalClient) ([]string, error) {
	switch c := c.(type) {
	case *redis.Client:
		return []string{c.Options().Addr}, nil
	case *redis.ClusterClient:
		var mu sync.Mutex
		var addrs []string
		err := c.ForEachMaster(ctx, func(ctx context.Context, m *redis.Client) error {
			mu.Lock()
			defer mu.Unlock()
			addrs = append(addrs, m.Options().Addr)
			return nil
		})
		return addrs, err
	case *redis.Ring:
		var mu sync.Mutex
		var addrs []string
		err := c.ForEachShard(ctx, func(ctx context.Context, m *redis.Client) error {
			mu.Lock()
			defer mu.Unlock()
			addrs = append(addrs, m.Options().Addr)
			return nil
		})
		return addrs, err
	default:
		return nil, fmt.Errorf("redistest: cannot list the nodes of a %T", c)
	}
}
