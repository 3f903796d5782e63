package layercache

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/layercache/layercache/internal/busmsg"
	"github.com/layercache/layercache/internal/redistest"
	"github.com/redis/go-redis/v9"
)

// TestStreamCatchUpBypassesLocal checks, from inside the reader, that local
// hits stay off for every batch of a backlog and come back once it is
// replayed.
func TestStreamCatchUpBypassesLocal(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		ns := redistest.Namespace(t)
		stream := ns + ":bus"
		quiet := slog.New(slog.NewTextHandler(io.Discard, nil))

		var (
			mu    sync.Mutex // held across a dial, so a cut cannot miss one
			conns []net.Conn
			down  bool
		)
		dial := func(ctx context.Context, network, addr string) (net.Conn, error) {
			mu.Lock()
			defer mu.Unlock()
			if down {
				return nil, errors.New("test: network is down")
			}
			var d net.Dialer
			c, err := d.DialContext(ctx, network, addr)
			if err == nil {
				conns = append(conns, c)
			}
			return c, err
		}
		var cp atomic.Pointer[Cache[string]]
		var batches, violations atomic.Int32
		hook := func() {
			c := cp.Load()
			if c == nil {
				return
			}
			batches.Add(1)
			if c.local.up.Load() || c.local.get("warm") != nil {
				violations.Add(1)
			}
		}
		// An existing stream, as in TestBusStreamReplay (see seedStream).
		seed := busmsg.Encode([8]byte{1}, 0, []busmsg.Item{{Kind: busmsg.KindFlush, Route: "nobody:v1"}}, nil)[0]
		if err := tgt.NewClient(t).XAdd(ctx, &redis.XAddArgs{Stream: stream, Values: []any{"m", seed}}).Err(); err != nil {
			t.Fatal(err)
		}
		bus, err := NewBus(tgt.NewClientOpts(t, func(o *redis.UniversalOptions) { o.Dialer = dial }),
			WithStream(stream, 10_000), WithBusLogger(quiet), func(cfg *busConfig) { cfg.catchUpHook = hook })
		if err != nil {
			t.Fatal(err)
		}
		defer bus.Close()
		c, err := New[string](tgt.NewClient(t), WithNamespace(ns), WithLocal(100, time.Hour), WithInvalidation(bus), WithLogger(quiet))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		cp.Store(c)
		wait, cancel := context.WithTimeout(ctx, 20*time.Second)
		defer cancel()
		if err := bus.Ready(wait); err != nil {
			t.Fatal(err)
		}
		_ = c.Set(ctx, "warm", "v")
		_, _ = c.Get(ctx, "warm")
		if c.local.get("warm") == nil {
			t.Fatal("not warm")
		}

		// Cut the reader off, then queue a backlog of 3 batches.
		mu.Lock()
		down = true
		for _, cn := range conns {
			_ = cn.Close()
		}
		mu.Unlock()
		for deadline := time.Now().Add(20 * time.Second); bus.Stats().Disconnects == 0; time.Sleep(time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatal("the reader did not notice the cut")
			}
		}
		before := batches.Load()
		other := tgt.NewClient(t)
		msg := busmsg.Encode([8]byte{7}, 0, []busmsg.Item{{Kind: busmsg.KindInvalidate, Route: ns + ":v1", Keys: []string{"cold"}}}, nil)[0]
		if _, err := other.Pipelined(ctx, func(p redis.Pipeliner) error {
			for range 3 * streamBatch {
				p.XAdd(ctx, &redis.XAddArgs{Stream: stream, Values: []any{"m", msg}})
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		mu.Lock()
		down = false
		mu.Unlock()
		if err := bus.Ready(wait); err != nil {
			t.Fatal(err)
		}
		if n := batches.Load() - before; n < 3 {
			t.Fatalf("%d catch-up batches for a backlog of 3 full ones: %+v", n, bus.Stats())
		}
		if v := violations.Load(); v != 0 {
			t.Fatalf("local hits were on during %d catch-up batches", v)
		}
		if c.local.get("warm") == nil {
			t.Fatal("an unrelated key was dropped: the replay flushed")
		}
		if st := bus.Stats(); st.Flushes != 0 || st.Replayed < 3*streamBatch {
			t.Fatalf("%+v", st)
		}
	})
}

// freezingProxy forwards TCP connections to a Redis server and can freeze:
// stop moving bytes either way without closing anything, as a silently
// dead network path (a NAT that forgot the flow, a pulled cable) does.
type freezingProxy struct {
	ln     net.Listener
	target string
	frozen atomic.Bool
	wg     sync.WaitGroup
	mu     sync.Mutex
	conns  []net.Conn
}

func startFreezingProxy(t *testing.T, target string) *freezingProxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &freezingProxy{ln: ln, target: target}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			up, err := net.Dial("tcp", target)
			if err != nil {
				_ = c.Close()
				continue
			}
			p.mu.Lock()
			p.conns = append(p.conns, c, up)
			p.mu.Unlock()
			p.wg.Add(2)
			go p.pipe(c, up)
			go p.pipe(up, c)
		}
	}()
	t.Cleanup(func() {
		_ = ln.Close()
		p.mu.Lock()
		for _, c := range p.conns {
			_ = c.Close()
		}
		p.mu.Unlock()
		p.wg.Wait()
	})
	return p
}

// pipe copies src to dst, holding bytes back while the proxy is frozen.
func (p *freezingProxy) pipe(dst, src net.Conn) {
	defer p.wg.Done()
	defer dst.Close()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		for n > 0 && p.frozen.Load() {
			time.Sleep(time.Millisecond)
			if p.isClosed(src) {
				return
			}
		}
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

func (p *freezingProxy) isClosed(c net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, x := range p.conns {
		if x == c {
			return false
		}
	}
	return true
}

// forget closes every proxied connection and drops it from the list, so
// pipes held by a freeze exit (the test's stand-in for the dead path's
// connections finally timing out).
func (p *freezingProxy) forget() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.conns {
		_ = c.Close()
	}
	p.conns = nil
}

// TestPubSubSilentDeath: a subscription whose connection stops delivering
// without any error is found dead by the health ping; local hits go off
// at once, and come back after a new subscription and a flush.
func TestPubSubSilentDeath(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		if tgt.Cluster {
			t.Skip("the proxy forwards to one node; cluster redirections would bypass it")
		}
		ctx := context.Background()
		ns := redistest.Namespace(t)
		quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
		proxy := startFreezingProxy(t, tgt.Addrs[0])
		busClient := redis.NewClient(&redis.Options{Addr: proxy.ln.Addr().String(), ReadTimeout: 3 * time.Second})
		defer busClient.Close()
		const health = 100 * time.Millisecond
		bus, err := NewBus(busClient, WithChannel(ns), WithBusLogger(quiet), func(c *busConfig) { c.health = health })
		if err != nil {
			t.Fatal(err)
		}
		defer bus.Close()
		c, err := New[string](tgt.NewClient(t), WithNamespace(ns), WithLocal(10, time.Hour), WithInvalidation(bus), WithLogger(quiet))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		wait, cancel := context.WithTimeout(ctx, 20*time.Second)
		defer cancel()
		if err := bus.Ready(wait); err != nil {
			t.Fatal(err)
		}
		_ = c.Set(ctx, "k", "v")
		_, _ = c.Get(ctx, "k")
		if c.local.get("k") == nil {
			t.Fatal("not warm")
		}

		proxy.frozen.Store(true)
		start := time.Now()
		for bus.Stats().Disconnects == 0 {
			if time.Since(start) > 20*time.Second {
				t.Fatal("a frozen subscription was never declared dead")
			}
			time.Sleep(5 * time.Millisecond)
		}
		// Deliberately soft: the bound is the 20s Fatal above.
		t.Logf("declared dead after %v (health interval %v)", time.Since(start), health)
		if c.local.get("k") != nil {
			t.Fatal("local hits still on after the subscription was declared dead")
		}
		proxy.frozen.Store(false)
		proxy.forget() // the dead connection's pipes exit
		if err := bus.Ready(wait); err != nil {
			t.Fatal(err)
		}
		// Ready returns once hits are on; the subscription is counted just
		// after (see runPubSub), so give the counter a moment.
		for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
			st := bus.Stats()
			if st.Subscriptions >= 2 && st.Flushes >= 2 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("after recovery: %+v", st)
			}
		}
	})
}

// wrappedClient is a user's client wrapper held by value: not nil, though
// its embedded interface is.
type wrappedClient struct{ redis.UniversalClient }

func TestNilClient(t *testing.T) {
	var ptrToWrapper *wrappedClient
	live := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1"})
	defer live.Close()
	for _, c := range []struct {
		name   string
		client redis.UniversalClient
		want   bool
	}{
		{"nil interface", nil, true},
		{"*redis.Client", (*redis.Client)(nil), true},
		{"*redis.ClusterClient", (*redis.ClusterClient)(nil), true},
		{"*redis.Ring", (*redis.Ring)(nil), true},
		{"nil pointer to a wrapper", ptrToWrapper, true},
		{"wrapper value", wrappedClient{}, false},
		{"live client", live, false},
	} {
		if got := nilClient(c.client); got != c.want {
			t.Errorf("%s: nilClient = %v, want %v", c.name, got, c.want)
		}
	}
}
