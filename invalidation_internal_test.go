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
	"go.uber.org/goleak"
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
		seed := busmsg.Encode(busmsg.Message{Origin: [8]byte{1}, SentAt: time.Now().UnixMilli(), Seq: 1, Items: []busmsg.Item{{Kind: busmsg.KindFlush, Route: "nobody:v1"}}}, nil)[0]
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
		msg := busmsg.Encode(busmsg.Message{Origin: [8]byte{7}, SentAt: time.Now().UnixMilli(), Seq: 1, Items: []busmsg.Item{{Kind: busmsg.KindInvalidate, Route: ns + ":v1", Keys: []string{"cold"}}}}, nil)[0]
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

func TestSenderWindow(t *testing.T) {
	type step struct {
		seq  uint64
		want bool
	}
	for name, steps := range map[string][]step{
		"in order":             {{1, true}, {2, true}, {3, true}},
		"repeat":               {{1, true}, {1, false}, {2, true}, {1, false}, {2, false}},
		"reordered":            {{5, true}, {3, true}, {4, true}, {3, false}, {4, false}, {5, false}, {6, true}},
		"gap then fill":        {{1, true}, {40, true}, {2, true}, {39, true}, {2, false}},
		"edge of the window":   {{100, true}, {100 - seqWindow + 1, true}, {100 - seqWindow, false}},
		"jump past the window": {{1, true}, {2 + seqWindow, true}, {3, true}, {2, false}, {2 + seqWindow, false}},
		"far behind":           {{1 << 40, true}, {1, false}},
	} {
		g := &replayGuard{}
		for i, s := range steps {
			if got := g.admit([8]byte{1}, s.seq, 0, 0); got != s.want {
				t.Errorf("%s: step %d (seq %d): admit = %v, want %v", name, i, s.seq, got, s.want)
			}
		}
	}
}

// TestReplayGuardBounded: the guard keeps at most maxSenders senders,
// forgetting first those whose messages freshAt refuses anyway.
func TestReplayGuardBounded(t *testing.T) {
	g := &replayGuard{}
	id := func(i int) [8]byte { return [8]byte{byte(i), byte(i >> 8), byte(i >> 16), 1} }
	const now = int64(10_000_000)
	// Half the senders were last heard from before the window.
	for i := range maxSenders {
		sentAt := now + int64(i)
		if i%2 == 0 {
			sentAt = now - replayWindowMs - 1
		}
		g.admit(id(i), 7, sentAt, sentAt)
	}
	g.admit(id(maxSenders), 1, now+maxSenders, now+maxSenders)
	if n := len(g.senders); n != maxSenders/2+1 {
		t.Fatalf("%d senders after an eviction, want the %d recent ones and the new one", n, maxSenders/2)
	}
	// A recent sender is still remembered: its repeat is refused.
	if g.admit(id(1), 7, now, now) {
		t.Fatal("a recent sender was forgotten")
	}
	// All recent: the one heard from longest ago goes.
	for i := maxSenders + 1; len(g.senders) < maxSenders; i++ {
		g.admit(id(i), 1, now+int64(i), now+int64(i))
	}
	at := now + 2*maxSenders // every sender within the window of it
	g.admit(id(1<<20), 1, at, at)
	if n := len(g.senders); n != maxSenders {
		t.Fatalf("%d senders, bound %d", n, maxSenders)
	}
	if _, ok := g.senders[id(1)]; ok {
		t.Fatal("the oldest sender was kept")
	}
}

func TestFreshAndStreamTimes(t *testing.T) {
	for _, c := range []struct {
		sentAt, at int64
		want       bool
	}{
		{1000, 1000, true},
		{1000, 1000 + replayWindowMs, true},
		{1000, 1001 + replayWindowMs, false},
		{1000 + replayWindowMs, 1000, true},
		{1001 + replayWindowMs, 1000, false},
	} {
		if got := freshAt(c.sentAt, c.at); got != c.want {
			t.Errorf("freshAt(%d, %d) = %v", c.sentAt, c.at, got)
		}
	}
	const now = 5000
	for id, want := range map[string]int64{
		"4000-0":                 4000,
		"4999-12":                4999,
		"9999999999999-0":        now, // a future ID proves nothing: the receiver's clock decides
		"18446744073709551615-0": now,
		"garbage":                now,
	} {
		if got := streamEntryMs(id, now); got != want {
			t.Errorf("streamEntryMs(%q) = %d, want %d", id, got, want)
		}
	}
}

// flushCounter is a local tier that counts flushes.
type flushCounter struct{ n atomic.Int32 }

func (f *flushCounter) invalidate([]string)       {}
func (f *flushCounter) remoteInvalidate([]string) {}
func (f *flushCounter) flush()                    { f.n.Add(1) }
func (f *flushCounter) setUp(bool)                {}

// TestRemoteFlushesSpacedOut: remote flushes of one route within
// remoteFlushInterval of each other are deferred and applied together,
// none is lost, and Close waits for (or cancels) a deferred one.
func TestRemoteFlushesSpacedOut(t *testing.T) {
	ignore := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, ignore) }) // last: after the server's cleanup
	client := redistest.Miniredis(t).NewClient(t)
	bus, err := NewBus(client, WithBusLogger(slog.New(slog.DiscardHandler)))
	if err != nil {
		t.Fatal(err)
	}
	ready, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := bus.Ready(ready); err != nil { // the subscription's flush is behind us
		t.Fatal(err)
	}
	tier, other := &flushCounter{}, &flushCounter{}
	if err := bus.attach("r:v1", tier); err != nil {
		t.Fatal(err)
	}
	if err := bus.attach("s:v1", other); err != nil {
		t.Fatal(err)
	}
	remote := func(route string) {
		bus.mu.RLock()
		bus.remoteFlushLocked(route)
		bus.mu.RUnlock()
	}
	start := time.Now()
	for range 100 {
		remote("r:v1")
	}
	remote("s:v1")
	remote("nobody:v1") // no tier: nothing remembered
	if time.Since(start) < remoteFlushInterval {
		if n := tier.n.Load(); n != 1 {
			t.Fatalf("%d flushes applied at once, want 1", n)
		}
		if d := bus.Stats().FlushesDeferred; d != 99 {
			t.Fatalf("%d deferred, want 99", d)
		}
	}
	if other.n.Load() != 1 {
		t.Fatal("another route's flush was held back")
	}
	for deadline := time.Now().Add(5 * time.Second); tier.n.Load() != 2; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%d flushes: the deferred ones were not applied", tier.n.Load())
		}
	}
	bus.flushLimit.mu.Lock()
	_, remembered := bus.flushLimit.last["nobody:v1"]
	bus.flushLimit.mu.Unlock()
	if remembered {
		t.Fatal("a route without tiers was remembered")
	}
	// A deferred flush pending at Close is dropped, and Close waits for a
	// timer already under way: nothing touches the tier afterwards.
	remote("r:v1")
	remote("r:v1")
	_ = bus.Close()
	n := tier.n.Load()
	// Not waiting for things to settle: proving that a timer set for one
	// interval never fires takes letting that interval pass.
	time.Sleep(2 * remoteFlushInterval)
	if tier.n.Load() != n {
		t.Fatal("a deferred flush ran after Close")
	}
}
