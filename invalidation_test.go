package layercache_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/layercache/layercache"
	"github.com/layercache/layercache/internal/busmsg"
	"github.com/layercache/layercache/internal/redistest"
	"github.com/redis/go-redis/v9"
	"go.uber.org/goleak"
)

// waitLimit bounds every wait in these tests. It is wide: they run on two
// shared cores under -race, next to a real cluster.
const waitLimit = 20 * time.Second

// eventually polls cond until it holds, failing t after waitLimit.
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitLimit)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", waitLimit, what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// netFault is a dialer that a test can cut: it closes every connection it
// made and refuses new ones until healed, as a network partition would.
type netFault struct {
	mu    sync.Mutex
	down  bool
	conns []net.Conn
}

func (f *netFault) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.down {
		return nil, errors.New("netFault: network is down")
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, network, addr)
	if err == nil {
		f.conns = append(f.conns, c)
	}
	return c, err
}

// block refuses new connections; existing ones stay.
func (f *netFault) block() { f.mu.Lock(); f.down = true; f.mu.Unlock() }

// cut refuses new connections and closes the existing ones.
func (f *netFault) cut() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.down = true
	for _, c := range f.conns {
		_ = c.Close()
	}
	f.conns = nil
}

func (f *netFault) heal() { f.mu.Lock(); f.down = false; f.mu.Unlock() }

// node is one simulated process: a bus and a cache, each on its own client.
// The bus's client goes through a netFault.
type node struct {
	bus   *layercache.Bus
	cache *layercache.Cache[string]
	fault *netFault
}

type busMode struct {
	name string
	opts func(ns string) []layercache.BusOption
}

var busModes = []busMode{
	{"pubsub", func(ns string) []layercache.BusOption {
		return []layercache.BusOption{layercache.WithChannel(ns + ":bus")}
	}},
	{"stream", func(ns string) []layercache.BusOption {
		return []layercache.BusOption{layercache.WithStream(ns+":bus", 1000)}
	}},
}

// runBus runs fn for every Redis target and both bus modes.
func runBus(t *testing.T, fn func(t *testing.T, tgt *redistest.Target, mode busMode)) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		for _, m := range busModes {
			t.Run(m.name, func(t *testing.T) { fn(t, tgt, m) })
		}
	})
}

func newNode(t testing.TB, tgt *redistest.Target, ns string, busOpts []layercache.BusOption, opts ...layercache.Option) *node {
	t.Helper()
	return newNodeOn(t, tgt, tgt.NewClient(t), ns, busOpts, opts...)
}

// newNodeOn is newNode with the cache on client.
func newNodeOn(t testing.TB, tgt *redistest.Target, client redis.UniversalClient, ns string, busOpts []layercache.BusOption, opts ...layercache.Option) *node {
	t.Helper()
	f := &netFault{}
	busClient := tgt.NewClientOpts(t, func(o *redis.UniversalOptions) { o.Dialer = f.dial })
	bus, err := layercache.NewBus(busClient, append([]layercache.BusOption{layercache.WithBusLogger(quiet)}, busOpts...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = bus.Close() })
	// A local TTL far beyond any wait here: whatever a node stops serving,
	// it stopped because of the bus, not because the copy expired.
	opts = append([]layercache.Option{layercache.WithNamespace(ns), layercache.WithLocal(1000, time.Hour),
		layercache.WithInvalidation(bus)}, opts...)
	c, err := layercache.New[string](client, append([]layercache.Option{layercache.WithLogger(quiet)}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), waitLimit)
	defer cancel()
	if err := bus.Ready(ctx); err != nil {
		t.Fatalf("bus not ready: %v", err)
	}
	return &node{bus: bus, cache: c, fault: f}
}

// get reads key on n, failing t on error.
func (n *node) get(t testing.TB, key string) string {
	t.Helper()
	v, err := n.cache.Get(context.Background(), key)
	if err != nil {
		t.Fatalf("Get(%q): %v", key, err)
	}
	return v
}

// warm reads key until it is served from n's local tier with value want.
func (n *node) warm(t testing.TB, key, want string) {
	t.Helper()
	eventually(t, fmt.Sprintf("%q = %q served locally", key, want), func() bool {
		before := n.cache.Stats().LocalHits
		return n.get(t, key) == want && n.cache.Stats().LocalHits > before
	})
}

func set(t testing.TB, n *node, key, value string) {
	t.Helper()
	if err := n.cache.Set(context.Background(), key, value); err != nil {
		t.Fatalf("Set(%q): %v", key, err)
	}
}

func TestBusPropagates(t *testing.T) {
	runBus(t, func(t *testing.T, tgt *redistest.Target, mode busMode) {
		ns := redistest.Namespace(t)
		a := newNode(t, tgt, ns, mode.opts(ns))
		b := newNode(t, tgt, ns, mode.opts(ns))
		c := newNode(t, tgt, ns, mode.opts(ns))
		set(t, a, "flag", "off")
		b.warm(t, "flag", "off")
		c.warm(t, "flag", "off")

		set(t, a, "flag", "on")
		for _, n := range []*node{b, c} {
			eventually(t, "the update to reach the other node", func() bool { return n.get(t, "flag") == "on" })
			n.warm(t, "flag", "on") // and it is local again
			if st := n.cache.Stats(); st.InvalidationsReceived == 0 {
				t.Fatalf("stats %+v", st)
			}
		}
		// Deletes propagate too.
		if err := a.cache.Delete(context.Background(), "flag"); err != nil {
			t.Fatal(err)
		}
		eventually(t, "the delete to reach b", func() bool {
			_, err := b.cache.Get(context.Background(), "flag")
			return errors.Is(err, layercache.ErrNotFound)
		})
		if st := a.bus.Stats(); st.Sent == 0 || st.Received != 0 {
			t.Fatalf("writer's bus: %+v (it must skip its own messages)", st)
		}
		if st := a.cache.Stats(); st.InvalidationsSent != 3 {
			t.Fatalf("writer's cache: %+v", st)
		}
	})
}

// TestBusSameProcess: caches of one namespace on one bus see each other's
// writes at once, without a round trip through Redis.
func TestBusSameProcess(t *testing.T) {
	tgt := redistest.Miniredis(t)
	ns := redistest.Namespace(t)
	a := newNode(t, tgt, ns, nil)
	other := newCache[string](t, tgt.NewClient(t), layercache.WithNamespace(ns), layercache.WithLocal(10, time.Hour),
		layercache.WithInvalidation(a.bus))
	set(t, a, "k", "v1")
	a.warm(t, "k", "v1")
	if v, _ := other.Get(context.Background(), "k"); v != "v1" {
		t.Fatal(v)
	}
	if err := other.Set(context.Background(), "k", "v2"); err != nil {
		t.Fatal(err)
	}
	if v := a.get(t, "k"); v != "v2" { // no waiting
		t.Fatalf("same-process cache read %q after the other's Set", v)
	}
}

// TestBusPubSubKill: the subscriber's connection is killed and cannot come
// back for a while; a write made meanwhile is never hidden by a stale local
// copy, and once the subscription is back the local tier serves again.
func TestBusPubSubKill(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		ns := redistest.Namespace(t)
		opts := busModes[0].opts(ns)
		a := newNode(t, tgt, ns, opts)
		b := newNode(t, tgt, ns, opts)
		set(t, a, "k", "v1")
		set(t, a, "other", "x")
		b.warm(t, "k", "v1")
		b.warm(t, "other", "x")
		flushes := b.bus.Stats().Flushes

		if tgt.Real {
			b.fault.block()
			if n := redistest.KillClients(ctx, t, tgt, "pubsub"); n == 0 {
				t.Fatal("CLIENT KILL TYPE pubsub closed nothing")
			}
		} else {
			b.fault.cut()
		}
		eventually(t, "b to notice", func() bool { return b.bus.Stats().Disconnects > 0 })
		set(t, a, "k", "v2") // b cannot hear of it
		for range 50 {
			if v := b.get(t, "k"); v != "v2" {
				t.Fatalf("b served %q while its subscription was down", v)
			}
		}
		if st := b.cache.Stats(); st.LocalBypasses == 0 {
			t.Fatalf("no bypass while down: %+v", st)
		}

		b.fault.heal()
		eventually(t, "b to resubscribe", func() bool { return b.bus.Stats().Subscriptions >= 2 })
		if st := b.bus.Stats(); st.Flushes <= flushes {
			t.Fatalf("no flush on resubscription: %+v", st)
		}
		b.warm(t, "k", "v2")
		redisHits := b.cache.Stats().RedisHits
		if v := b.get(t, "other"); v != "x" || b.cache.Stats().RedisHits != redisHits+1 {
			t.Fatalf("'other' survived the flush: %q, %+v", v, b.cache.Stats())
		}
		// And it propagates again.
		set(t, a, "k", "v3")
		eventually(t, "v3 at b", func() bool { return b.get(t, "k") == "v3" })
	})
}

// TestBusKillRace: the kill and the write race the subscriber's recovery,
// with nothing held back; b must converge on the new value and stay there.
func TestBusKillRace(t *testing.T) {
	runBus(t, func(t *testing.T, tgt *redistest.Target, mode busMode) {
		ctx := context.Background()
		ns := redistest.Namespace(t)
		a := newNode(t, tgt, ns, mode.opts(ns))
		b := newNode(t, tgt, ns, mode.opts(ns))
		for round := range 3 {
			old, next := fmt.Sprint("v", round), fmt.Sprint("v", round+1)
			set(t, a, "k", old)
			b.warm(t, "k", old)
			if tgt.Real {
				typ := "pubsub"
				if mode.name == "stream" {
					typ = "normal"
				}
				redistest.KillClients(ctx, t, tgt, typ)
			} else {
				b.fault.cut()
				b.fault.heal()
			}
			set(t, a, "k", next)
			eventually(t, "b to converge", func() bool { return b.get(t, "k") == next })
			for range 20 {
				if v := b.get(t, "k"); v != next {
					t.Fatalf("round %d: b went back to %q", round, v)
				}
			}
		}
	})
}

// seedStream creates the stream with an entry for no cache. A reader that
// starts on a missing stream has read nothing yet, and on a server that
// does not report max-deleted-entry-id (miniredis, Redis 6) it cannot tell
// later whether something it never saw was trimmed, so its first catch-up
// flushes. Tests that count flushes start on an existing stream, as
// deployments do after their first write.
func seedStream(t testing.TB, tgt *redistest.Target, stream string) {
	t.Helper()
	msg := busmsg.Encode(busmsg.Message{Origin: [8]byte{1}, SentAt: time.Now().UnixMilli(), Seq: 1, Items: []busmsg.Item{{Kind: busmsg.KindFlush, Route: "nobody:v1"}}}, nil)[0]
	if err := tgt.NewClient(t).XAdd(context.Background(), &redis.XAddArgs{Stream: stream, Values: []any{"m", msg}}).Err(); err != nil {
		t.Fatal(err)
	}
}

// TestBusStreamReplay: a stream reader that was away replays what it
// missed instead of flushing, and serves nothing stale meanwhile.
func TestBusStreamReplay(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		ns := redistest.Namespace(t)
		seedStream(t, tgt, ns+":bus")
		opts := busModes[1].opts(ns)
		a := newNode(t, tgt, ns, opts)
		b := newNode(t, tgt, ns, opts)
		set(t, a, "k", "v1")
		set(t, a, "other", "x")
		b.warm(t, "k", "v1")
		b.warm(t, "other", "x")
		before := b.bus.Stats()

		if tgt.Real {
			b.fault.block()
			redistest.KillClients(ctx, t, tgt, "normal") // the reader's XREAD BLOCK among them
		} else {
			b.fault.cut()
		}
		eventually(t, "b to notice", func() bool { return b.bus.Stats().Disconnects > before.Disconnects })
		sent := a.bus.Stats().SentKeys
		set(t, a, "k", "v2")
		for i := range 5 { // a backlog
			set(t, a, fmt.Sprint("more-", i), "y")
		}
		eventually(t, "a to send", func() bool { return a.bus.Stats().SentKeys == sent+6 })
		for range 20 {
			if v := b.get(t, "k"); v != "v2" {
				t.Fatalf("b served %q while its reader was down", v)
			}
		}

		b.fault.heal()
		ready, cancel := context.WithTimeout(ctx, waitLimit)
		defer cancel()
		if err := b.bus.Ready(ready); err != nil {
			t.Fatal(err)
		}
		st := b.bus.Stats()
		if st.Replayed == before.Replayed || st.ReceivedKeys != before.ReceivedKeys+6 || st.Flushes != before.Flushes || st.Trimmed != 0 {
			t.Fatalf("after the reconnect: %+v (before %+v)", st, before)
		}
		// Not flushed: 'other' is still local.
		hits := b.cache.Stats()
		if v := b.get(t, "other"); v != "x" || b.cache.Stats().LocalHits != hits.LocalHits+1 {
			t.Fatalf("'other' was not served locally after the replay: %+v", b.cache.Stats())
		}
		b.warm(t, "k", "v2")
	})
}

// TestBusStreamTrimmed: when what a reader missed was trimmed away, it
// flushes.
func TestBusStreamTrimmed(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		ns := redistest.Namespace(t)
		stream := ns + ":bus"
		opts := []layercache.BusOption{layercache.WithStream(stream, 5)}
		a := newNode(t, tgt, ns, opts)
		b := newNode(t, tgt, ns, opts)
		set(t, a, "k", "v1")
		set(t, a, "other", "x")
		b.warm(t, "k", "v1")
		b.warm(t, "other", "x")

		b.fault.cut()
		eventually(t, "b to notice", func() bool { return b.bus.Stats().Disconnects > 0 })
		set(t, a, "k", "v2")
		eventually(t, "a to send", func() bool { return a.bus.Stats().SentKeys == 3 })
		// Another node floods the stream: with MAXLEN ~ 5, Redis trims
		// whole nodes of 100 entries, so 300 entries trim a's away.
		client := tgt.NewClient(t)
		msg := busmsg.Encode(busmsg.Message{Origin: [8]byte{9}, SentAt: time.Now().UnixMilli(), Seq: 1, Items: []busmsg.Item{{Kind: busmsg.KindInvalidate, Route: "elsewhere:v1", Keys: []string{"z"}}}}, nil)[0]
		_, err := client.Pipelined(ctx, func(p redis.Pipeliner) error {
			for range 300 {
				p.XAdd(ctx, &redis.XAddArgs{Stream: stream, MaxLen: 5, Approx: true, Values: []any{"m", msg}})
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}

		b.fault.heal()
		eventually(t, "b to find the trim", func() bool { return b.bus.Stats().Trimmed > 0 })
		ready, cancel := context.WithTimeout(ctx, waitLimit)
		defer cancel()
		if err := b.bus.Ready(ready); err != nil {
			t.Fatal(err)
		}
		if v := b.get(t, "k"); v != "v2" {
			t.Fatalf("b served %q after the trim", v)
		}
		hits := b.cache.Stats().RedisHits
		if v := b.get(t, "other"); v != "x" || b.cache.Stats().RedisHits != hits+1 {
			t.Fatalf("'other' survived the flush: %+v", b.cache.Stats())
		}
	})
}

// TestBusForgedDropped: with a secret, messages from a node without it (or
// with another) are dropped and counted; authentic ones still work.
func TestBusForgedDropped(t *testing.T) {
	runBus(t, func(t *testing.T, tgt *redistest.Target, mode busMode) {
		ctx := context.Background()
		ns := redistest.Namespace(t)
		secret := []byte("a shared secret of 32 bytes.....")
		opts := append(mode.opts(ns), layercache.WithSecret(secret))
		a := newNode(t, tgt, ns, opts)
		b := newNode(t, tgt, ns, opts)
		set(t, a, "k", "v1")
		// a's own invalidation of that write must reach b before b warms,
		// or it would drop b's copy and pass for a forgery below.
		eventually(t, "a's invalidation at b", func() bool { return b.cache.Stats().InvalidationsReceived >= 1 })
		b.warm(t, "k", "v1")

		// An attacker who may PUBLISH and XADD forges an invalidation and a
		// flush, without the secret and with a wrong one.
		client := tgt.NewClient(t)
		route := ns + ":" + layercache.DefaultVersion
		items := []busmsg.Item{{Kind: busmsg.KindInvalidate, Route: route, Keys: []string{"k"}}, {Kind: busmsg.KindFlush, Route: route}}
		forged := [][]byte{
			busmsg.Encode(busmsg.Message{Origin: [8]byte{6, 6, 6}, SentAt: time.Now().UnixMilli(), Seq: 1, Items: items}, nil)[0],
			busmsg.Encode(busmsg.Message{Origin: [8]byte{6, 6, 6}, SentAt: time.Now().UnixMilli(), Seq: 1, Items: items}, []byte("the wrong secret, 32 bytes......"))[0],
		}
		for _, m := range forged {
			var err error
			if mode.name == "stream" {
				err = client.XAdd(ctx, &redis.XAddArgs{Stream: ns + ":bus", Values: []any{"m", m}}).Err()
			} else {
				err = client.Publish(ctx, ns+":bus", m).Err()
			}
			if err != nil {
				t.Fatal(err)
			}
		}
		eventually(t, "both forgeries dropped", func() bool { return b.bus.Stats().Forged == 2 })
		hits := b.cache.Stats()
		if v := b.get(t, "k"); v != "v1" || b.cache.Stats().LocalHits != hits.LocalHits+1 {
			t.Fatalf("a forged message reached the local tier: %q, %+v", v, b.cache.Stats())
		}
		set(t, a, "k", "v2")
		eventually(t, "the authentic update", func() bool { return b.get(t, "k") == "v2" })
	})
}

// TestBusCloseLeavesNoGoroutine: buses in both modes and their caches stop
// every goroutine they started.
func TestBusCloseLeavesNoGoroutine(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		clients := []redis.UniversalClient{tgt.NewClient(t), tgt.NewClient(t)}
		for _, c := range clients {
			if err := c.Ping(ctx).Err(); err != nil {
				t.Fatal(err)
			}
		}
		leaks := append(leakOptions(),
			// go-redis's cached clock for connection deadlines, started
			// once per process by the first command.
			goleak.IgnoreTopFunction("github.com/redis/go-redis/v9/internal/pool.init.0.func1"))
		defer goleak.VerifyNone(t, leaks...)
		ns := redistest.Namespace(t)
		for _, mode := range busModes {
			var buses []*layercache.Bus
			var caches []*layercache.Cache[string]
			for _, client := range clients {
				bus, err := layercache.NewBus(client, append(mode.opts(ns), layercache.WithBusLogger(quiet))...)
				if err != nil {
					t.Fatal(err)
				}
				c, err := layercache.New[string](client, layercache.WithNamespace(ns), layercache.WithLocal(10, time.Minute),
					layercache.WithInvalidation(bus), layercache.WithLogger(quiet))
				if err != nil {
					t.Fatal(err)
				}
				buses, caches = append(buses, bus), append(caches, c)
			}
			for _, bus := range buses {
				rctx, cancel := context.WithTimeout(ctx, waitLimit)
				if err := bus.Ready(rctx); err != nil {
					t.Fatal(err)
				}
				cancel()
			}
			_ = caches[0].Set(ctx, "k", "v")
			_, _ = caches[1].Get(ctx, "k")
			// Close in both orders: bus first, cache first.
			_ = buses[0].Close()
			_ = caches[0].Close()
			_ = caches[1].Close()
			_ = buses[1].Close()
			if err := buses[0].Ready(ctx); !errors.Is(err, layercache.ErrClosed) {
				t.Fatalf("Ready after Close = %v", err)
			}
			if _, err := layercache.New[string](clients[0], layercache.WithInvalidation(buses[0])); !errors.Is(err, layercache.ErrClosed) {
				t.Fatalf("New with a closed bus = %v", err)
			}
		}
	})
}

func TestBusOptionErrors(t *testing.T) {
	client := redistest.Miniredis(t).NewClient(t)
	for name, opt := range map[string]layercache.BusOption{
		"empty channel": layercache.WithChannel(""),
		"empty stream":  layercache.WithStream("", 10),
		"zero maxlen":   layercache.WithStream("s", 0),
		"short secret":  layercache.WithSecret([]byte("short")),
		"nil logger":    layercache.WithBusLogger(nil),
		"nil option":    nil,
	} {
		if _, err := layercache.NewBus(client, opt); !errors.Is(err, layercache.ErrInvalidOption) {
			t.Errorf("%s: NewBus = %v, want ErrInvalidOption", name, err)
		}
	}
	if _, err := layercache.NewBus(nil); !errors.Is(err, layercache.ErrInvalidOption) {
		t.Errorf("nil client: %v", err)
	}
}

// TestNewBusRefusesTypedNilClients: a nil pointer of a client type passes
// a plain nil check; NewBus must refuse it rather than start a goroutine
// whose first command panics and kills the process.
func TestNewBusRefusesTypedNilClients(t *testing.T) {
	defer goleak.VerifyNone(t, leakOptions()...)
	for name, client := range map[string]redis.UniversalClient{
		"nil interface":        nil,
		"*redis.Client":        (*redis.Client)(nil),
		"*redis.ClusterClient": (*redis.ClusterClient)(nil),
		"*redis.Ring":          (*redis.Ring)(nil),
	} {
		bus, err := layercache.NewBus(client)
		if !errors.Is(err, layercache.ErrInvalidOption) || bus != nil {
			t.Errorf("%s: NewBus = %v, %v; want ErrInvalidOption", name, bus, err)
		}
	}
}

// TestBusWithStampedeOptions: the local tier and the bus compose with
// leases, early refresh and stale-while-revalidate: Set (which breaks the
// lease in a script) still invalidates every node, and Fetch fills the
// local tier from what the leased load wrote.
func TestBusWithStampedeOptions(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		ns := redistest.Namespace(t)
		opts := busModes[0].opts(ns)
		stampede := []layercache.Option{layercache.WithLocks(time.Second, 5*time.Second),
			layercache.WithEarlyRefresh(1), layercache.WithStaleWhileRevalidate(time.Minute)}
		a := newNode(t, tgt, ns, opts, stampede...)
		b := newNode(t, tgt, ns, opts, stampede...)
		var loads counter
		load := func(context.Context) (string, error) { loads.n.Add(1); return "loaded", nil }
		for _, n := range []*node{a, b} {
			if v, err := n.cache.Fetch(ctx, "k", load); err != nil || v != "loaded" {
				t.Fatalf("Fetch = %q, %v", v, err)
			}
		}
		b.warm(t, "k", "loaded")
		if n := loads.n.Load(); n != 1 {
			t.Fatalf("%d loads for one key", n)
		}
		set(t, a, "k", "set")
		eventually(t, "b to see the Set", func() bool { return b.get(t, "k") == "set" })
		b.warm(t, "k", "set")
	})
}
