// Command flags shows feature flags cached in memory on several nodes: a flag
// is flipped on one node and every other node sees the new value within
// milliseconds, through the invalidation bus, while reading it from memory
// (no Redis round trip) the rest of the time. A node without the bus sees the
// flip only when its local copy expires: the local TTL is the safety net when
// messages cannot flow.
//
// It runs on an embedded Redis (miniredis) unless REDIS_ADDR is set:
//
//	go run ./examples/flags
//	go run ./examples/flags -stream          # durable bus on a Redis Stream
//	REDIS_ADDR=127.0.0.1:6379 go run ./examples/flags -nodes 8
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log"
	"log/slog"
	"os"
	"sync"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/layercache/layercache"
	"github.com/redis/go-redis/v9"
)

// Flag is a feature flag as the service's config database keeps it.
type Flag struct {
	Name    string `json:"name"`
	On      bool   `json:"on"`
	Rollout int    `json:"rollout"` // percent of users
}

// configDB stands in for the database that owns the flags.
type configDB struct {
	mu    sync.Mutex
	flags map[string]Flag
	reads int
}

func (d *configDB) load(name string) func(context.Context) (Flag, error) {
	return func(context.Context) (Flag, error) {
		d.mu.Lock()
		defer d.mu.Unlock()
		d.reads++
		f, ok := d.flags[name]
		if !ok {
			return Flag{}, layercache.ErrNotFound
		}
		return f, nil
	}
}

func (d *configDB) save(f Flag) {
	d.mu.Lock()
	d.flags[f.Name] = f
	d.mu.Unlock()
}

// node is one service instance: its own Redis client, bus and cache, as a
// separate process would have.
type node struct {
	name  string
	rdb   *redis.Client
	bus   *layercache.Bus // nil for the node without a bus
	flags *layercache.Cache[Flag]
}

func (n *node) close() {
	_ = n.flags.Close()
	if n.bus != nil {
		_ = n.bus.Close()
	}
	_ = n.rdb.Close()
}

const (
	flagName = "new-checkout"
	// localTTL bounds how stale a node's in-memory copy can get if the bus
	// cannot deliver: the safety net.
	localTTL = 2 * time.Second
)

func main() {
	nodes := flag.Int("nodes", 4, "nodes with the bus")
	stream := flag.Bool("stream", false, "use the durable stream bus instead of pub/sub")
	flag.Parse()
	if err := run(*nodes, *stream); err != nil {
		log.Fatal(err)
	}
}

func run(nodeCount int, stream bool) error {
	ctx := context.Background()
	addr, where, stop, err := redisAddr()
	if err != nil {
		return err
	}
	defer stop()
	fmt.Println("redis:", where)

	busOpt := layercache.WithChannel("flags-example")
	mode := "pub/sub, channel flags-example (a reconnect flushes the local tiers)"
	if stream {
		busOpt = layercache.WithStream("flags-example:stream", 10_000)
		mode = "stream flags-example:stream (a reconnect replays what was missed)"
	}
	fmt.Println("bus:  ", mode)
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))

	db := &configDB{flags: map[string]Flag{flagName: {Name: flagName, On: false, Rollout: 0}}}
	newNode := func(name string, withBus bool) (*node, error) {
		n := &node{name: name, rdb: redis.NewClient(&redis.Options{Addr: addr})}
		opts := []layercache.Option{
			layercache.WithNamespace("flags"),
			layercache.WithTTL(time.Hour),
			layercache.WithLocal(1000, localTTL),
			layercache.WithLogger(quiet),
		}
		if withBus {
			bus, err := layercache.NewBus(n.rdb, busOpt, layercache.WithBusLogger(quiet))
			if err != nil {
				return nil, err
			}
			n.bus = bus
			opts = append(opts, layercache.WithInvalidation(bus))
		}
		c, err := layercache.New[Flag](n.rdb, opts...)
		if err != nil {
			return nil, err
		}
		n.flags = c
		if n.bus != nil {
			wait, cancel := context.WithTimeout(ctx, 5*time.Second)
			defer cancel()
			if err := n.bus.Ready(wait); err != nil {
				return nil, fmt.Errorf("%s: bus not ready: %w", name, err)
			}
		}
		return n, nil
	}

	var all []*node
	defer func() {
		for _, n := range all {
			n.close()
		}
	}()
	for i := range nodeCount {
		n, err := newNode(fmt.Sprint("node-", i), true)
		if err != nil {
			return err
		}
		all = append(all, n)
	}
	legacy, err := newNode("no-bus", false)
	if err != nil {
		return err
	}
	all = append(all, legacy)
	_ = all[0].flags.Delete(ctx, flagName) // start clean when REDIS_ADDR is reused

	// Every node reads the flag; the second read on each is from memory.
	for _, n := range all {
		for range 2 {
			if _, err := n.flags.Fetch(ctx, flagName, db.load(flagName)); err != nil {
				return err
			}
		}
	}
	fmt.Printf("\n%d nodes read %q: off; config DB reads: %d; each node now serves it from memory\n",
		len(all), flagName, db.reads)

	// Flip it on node 0: write the database first, then the cache.
	flipped := Flag{Name: flagName, On: true, Rollout: 100}
	start := time.Now()
	db.save(flipped)
	if err := all[0].flags.Set(ctx, flagName, flipped); err != nil {
		return err
	}
	fmt.Printf("node-0 turns %q on\n", flagName)

	// Each node polls its cache (mostly from memory) until it sees the flip.
	var wg sync.WaitGroup
	lags := make([]time.Duration, len(all))
	for i, n := range all {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				f, err := n.flags.Fetch(ctx, flagName, db.load(flagName))
				if err == nil && f.On {
					lags[i] = time.Since(start)
					return
				}
				time.Sleep(50 * time.Microsecond)
			}
		}()
	}
	wg.Wait()
	for i, n := range all {
		how := "through the bus"
		switch {
		case i == 0:
			how = "its own write"
		case n.bus == nil:
			how = fmt.Sprintf("no bus: when its local copy expired (local TTL %v, the safety net)", localTTL)
		}
		fmt.Printf("  %-7s sees it on after %9v  (%s)\n", n.name, lags[i].Round(10*time.Microsecond), how)
	}

	// Reads between flips cost no Redis round trip.
	n1 := all[min(1, len(all)-1)]
	before := n1.flags.Stats()
	const reads = 100_000
	t0 := time.Now()
	for range reads {
		if _, err := n1.flags.Fetch(ctx, flagName, db.load(flagName)); err != nil {
			return err
		}
	}
	took := time.Since(t0)
	after := n1.flags.Stats()
	fmt.Printf("\n%s: %d reads in %v (%v each), %d from memory, %d from Redis\n", n1.name, reads,
		took.Round(time.Millisecond), (took / reads).Round(time.Nanosecond),
		after.LocalHits-before.LocalHits, after.RedisHits-before.RedisHits)
	if n1.bus != nil {
		bs := n1.bus.Stats()
		fmt.Printf("%s bus: %d messages received, last lag %v, %d flushes, %d reconnects\n",
			n1.name, bs.Received, bs.LastLag, bs.Flushes, bs.Disconnects)
	}
	fmt.Printf("config DB reads in all: %d\n", db.reads)
	return nil
}

// redisAddr returns REDIS_ADDR, or the address of an embedded miniredis.
func redisAddr() (addr, where string, stop func(), err error) {
	if addr := os.Getenv("REDIS_ADDR"); addr != "" {
		return addr, addr, func() {}, nil
	}
	mr, err := miniredis.Run()
	if err != nil {
		return "", "", nil, err
	}
	return mr.Addr(), "embedded miniredis (set REDIS_ADDR to use a real server)", mr.Close, nil
}
