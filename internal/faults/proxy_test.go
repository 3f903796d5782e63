package faults_test

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/goleak"

	"github.com/layercache/layercache/internal/faults"
	"github.com/layercache/layercache/internal/redistest"
)

func TestMain(m *testing.M) { redistest.Main(m) }

// client returns a go-redis client through p that neither retries nor
// waits long, so that faults show as errors quickly.
func client(t *testing.T, p *faults.Proxy, readTimeout time.Duration) *redis.Client {
	t.Helper()
	c := redis.NewClient(&redis.Options{
		Addr: p.Addr(), DialTimeout: time.Second, ReadTimeout: readTimeout, WriteTimeout: time.Second,
		MaxRetries: -1,
	})
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// rawConn is a plain connection through the proxy, to see exactly which
// bytes arrive.
type rawConn struct {
	net.Conn
	r *bufio.Reader
}

func dialRaw(t *testing.T, p *faults.Proxy) *rawConn {
	t.Helper()
	c, err := net.DialTimeout("tcp", p.Addr(), time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return &rawConn{Conn: c, r: bufio.NewReader(c)}
}

func (c *rawConn) send(t *testing.T, cmd string) {
	t.Helper()
	if _, err := c.Write([]byte(cmd + "\r\n")); err != nil {
		t.Fatalf("write %q: %v", cmd, err)
	}
}

// line reads one reply line within d.
func (c *rawConn) line(d time.Duration) (string, error) {
	_ = c.SetReadDeadline(time.Now().Add(d))
	s, err := c.r.ReadString('\n')
	return strings.TrimSpace(s), err
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

func TestProxyForwards(t *testing.T) {
	ctx := context.Background()
	tgt := redistest.Standalone(t)
	p := faults.NewProxy(t, tgt.Addrs[0])
	if p.Target() != tgt.Addrs[0] || !strings.HasPrefix(p.Addr(), "127.0.0.1:") {
		t.Fatalf("proxy %s -> %s", p.Addr(), p.Target())
	}
	c := client(t, p, 3*time.Second)
	ns := redistest.Namespace(t)

	// A value far bigger than one read, and a long pipeline.
	big := strings.Repeat("0123456789abcdef", 1<<16) // 1 MiB
	if err := c.Set(ctx, ns+":big", big, time.Minute).Err(); err != nil {
		t.Fatal(err)
	}
	if v, err := c.Get(ctx, ns+":big").Result(); err != nil || v != big {
		t.Fatalf("GET big: %d bytes, %v", len(v), err)
	}
	pipe := c.Pipeline()
	cmds := make([]*redis.IntCmd, 1000)
	for i := range cmds {
		cmds[i] = pipe.Incr(ctx, ns+":n")
	}
	if _, err := pipe.Exec(ctx); err != nil {
		t.Fatal(err)
	}
	for i, cmd := range cmds {
		if cmd.Val() != int64(i+1) {
			t.Fatalf("INCR %d = %d", i, cmd.Val())
		}
	}
	if s := p.Stats(); s.Accepted < 1 || s.Active < 1 || s.Refused != 0 || s.Cut != 0 || s.DialErrors != 0 {
		t.Fatalf("stats %+v", s)
	}
}

func TestProxyLatency(t *testing.T) {
	ctx := context.Background()
	tgt := redistest.Standalone(t)
	p := faults.NewProxy(t, tgt.Addrs[0])
	c := client(t, p, 3*time.Second)
	if err := c.Ping(ctx).Err(); err != nil {
		t.Fatal(err)
	}
	const lat = 100 * time.Millisecond
	p.SetLatency(lat)
	start := time.Now()
	if err := c.Ping(ctx).Err(); err != nil {
		t.Fatal(err)
	}
	if el := time.Since(start); el < 2*lat {
		t.Fatalf("PING with %v each way took %v", lat, el)
	}

	// Messages pushed back to back arrive about lat later, not lat
	// apart: the delay does not add up over a stream.
	ns := redistest.Namespace(t)
	sub := c.Subscribe(ctx, ns)
	defer sub.Close()
	if _, err := sub.ReceiveTimeout(ctx, 3*time.Second); err != nil {
		t.Fatal(err)
	}
	pub := tgt.NewClient(t)
	const n = 10
	start = time.Now()
	for range n {
		if err := pub.Publish(ctx, ns, "m").Err(); err != nil {
			t.Fatal(err)
		}
	}
	for i := range n {
		if _, err := sub.ReceiveTimeout(ctx, 3*time.Second); err != nil {
			t.Fatalf("message %d: %v", i, err)
		}
	}
	if el := time.Since(start); el < lat || el > n*lat/2 {
		t.Fatalf("%d messages through %v latency took %v", n, lat, el)
	}

	p.SetLatency(0)
	start = time.Now()
	if err := c.Ping(ctx).Err(); err != nil {
		t.Fatal(err)
	}
	if el := time.Since(start); el >= lat {
		t.Fatalf("PING after latency off took %v", el)
	}
}

func TestProxyStall(t *testing.T) {
	ctx := context.Background()
	tgt := redistest.Standalone(t)
	p := faults.NewProxy(t, tgt.Addrs[0])
	raw := dialRaw(t, p)
	raw.send(t, "PING")
	if l, err := raw.line(2 * time.Second); err != nil || l != "+PONG" {
		t.Fatalf("PING = %q, %v", l, err)
	}

	p.Stall()
	raw.send(t, "PING")
	if l, err := raw.line(100 * time.Millisecond); !isTimeout(err) {
		t.Fatalf("stalled PING = %q, %v; want a timeout", l, err)
	}
	// New connections are accepted but stall too; go-redis times out.
	c := client(t, p, 200*time.Millisecond)
	if err := c.Ping(ctx).Err(); !isTimeout(err) {
		t.Fatalf("go-redis PING while stalled: %v, want a timeout", err)
	}

	p.Resume()
	// The held PING is delivered and answered now.
	if l, err := raw.line(2 * time.Second); err != nil || l != "+PONG" {
		t.Fatalf("held PING after Resume = %q, %v", l, err)
	}
	if err := c.Ping(ctx).Err(); err != nil {
		t.Fatalf("go-redis PING after Resume: %v", err)
	}
}

func TestProxyDrop(t *testing.T) {
	ctx := context.Background()
	tgt := redistest.Standalone(t)
	p := faults.NewProxy(t, tgt.Addrs[0])
	raw := dialRaw(t, p)
	ns := redistest.Namespace(t)

	p.Drop(true)
	raw.send(t, "INCR "+ns+":n")
	if l, err := raw.line(100 * time.Millisecond); !isTimeout(err) {
		t.Fatalf("dropped INCR = %q, %v; want a timeout", l, err)
	}
	// New connections open and stay silent.
	c := client(t, p, 200*time.Millisecond)
	if err := c.Ping(ctx).Err(); !isTimeout(err) {
		t.Fatalf("go-redis PING while dropping: %v, want a timeout", err)
	}

	p.Drop(false)
	// The dropped INCR never reached the server: the next one is the
	// first, on the same connection.
	raw.send(t, "INCR "+ns+":n")
	if l, err := raw.line(2 * time.Second); err != nil || l != ":1" {
		t.Fatalf("INCR after Drop(false) = %q, %v; want :1", l, err)
	}
	if l, err := raw.line(50 * time.Millisecond); !isTimeout(err) {
		t.Fatalf("a second reply %q, %v: dropped bytes were delivered", l, err)
	}
	if err := c.Ping(ctx).Err(); err != nil {
		t.Fatalf("go-redis PING after Drop(false): %v", err)
	}
}

func TestProxyRefuse(t *testing.T) {
	ctx := context.Background()
	tgt := redistest.Standalone(t)
	p := faults.NewProxy(t, tgt.Addrs[0])
	old := dialRaw(t, p)
	old.send(t, "PING")
	if l, err := old.line(2 * time.Second); err != nil || l != "+PONG" {
		t.Fatalf("PING = %q, %v", l, err)
	}

	p.Refuse(true)
	c := client(t, p, 3*time.Second)
	start := time.Now()
	if err := c.Ping(ctx).Err(); err == nil {
		t.Fatal("PING through a refusing proxy succeeded")
	}
	if el := time.Since(start); el > time.Second {
		t.Fatalf("refused PING took %v; refusing should fail fast", el)
	}
	// Open connections are untouched.
	old.send(t, "PING")
	if l, err := old.line(2 * time.Second); err != nil || l != "+PONG" {
		t.Fatalf("PING on an open connection while refusing = %q, %v", l, err)
	}
	if s := p.Stats(); s.Refused < 1 {
		t.Fatalf("stats %+v, want refusals", s)
	}

	p.Refuse(false)
	if err := c.Ping(ctx).Err(); err != nil {
		t.Fatalf("PING after Refuse(false): %v", err)
	}
}

func TestProxyCutAll(t *testing.T) {
	ctx := context.Background()
	tgt := redistest.Standalone(t)
	p := faults.NewProxy(t, tgt.Addrs[0])
	raws := []*rawConn{dialRaw(t, p), dialRaw(t, p), dialRaw(t, p)}
	for _, r := range raws {
		r.send(t, "PING")
		if l, err := r.line(2 * time.Second); err != nil || l != "+PONG" {
			t.Fatalf("PING = %q, %v", l, err)
		}
	}
	c := client(t, p, 3*time.Second)
	if err := c.Ping(ctx).Err(); err != nil {
		t.Fatal(err)
	}

	if n := p.CutAll(); n != 4 {
		t.Fatalf("CutAll closed %d connections, want 4", n)
	}
	for _, r := range raws {
		if l, err := r.line(2 * time.Second); !errors.Is(err, io.EOF) {
			t.Fatalf("read on a cut connection = %q, %v; want EOF", l, err)
		}
	}
	redistest.Eventually(t, redistest.DefaultWait, "no active connection", func() bool {
		return p.Stats().Active == 0
	})
	// go-redis notices the dead pooled connection and dials a new one.
	if err := c.Ping(ctx).Err(); err != nil {
		t.Fatalf("PING after CutAll: %v", err)
	}
	if s := p.Stats(); s.Cut != 4 || s.Active != 1 || s.Accepted != 5 {
		t.Fatalf("stats %+v, want 4 cut, 1 active, 5 accepted", s)
	}
}

// TestProxyServerDown: with the server killed, connections through the
// proxy fail at once; after a restart, they work again.
func TestProxyServerDown(t *testing.T) {
	ctx := context.Background()
	srv := redistest.StartServer(t)
	p := faults.NewProxy(t, srv.Addr())
	c := client(t, p, 3*time.Second)
	if err := c.Ping(ctx).Err(); err != nil {
		t.Fatal(err)
	}
	srv.Kill()
	if err := c.Ping(ctx).Err(); err == nil {
		t.Fatal("PING through a proxy to a killed server succeeded")
	}
	redistest.Eventually(t, redistest.DefaultWait, "a failed dial to the killed server", func() bool {
		_ = c.Ping(ctx).Err()
		return p.Stats().DialErrors > 0
	})
	srv.Restart()
	redistest.Eventually(t, redistest.DefaultWait, "PING through the proxy after a restart", func() bool {
		return c.Ping(ctx).Err() == nil
	})
}

// TestProxyCloseLeavesNoGoroutine closes proxies in the middle of
// everything: links with delayed, held and dropped bytes, and one whose
// target accepts but never answers, and checks that none of their
// goroutines is left.
func TestProxyCloseLeavesNoGoroutine(t *testing.T) {
	tgt := redistest.Standalone(t) // started before the snapshot: its goroutines are not the proxies'
	ignore := goleak.IgnoreCurrent()

	// A target that accepts (the kernel does) but is never served.
	hang, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer hang.Close()
	var proxies []*faults.Proxy
	for _, fault := range []func(p *faults.Proxy){
		func(p *faults.Proxy) { p.SetLatency(time.Hour) },
		func(p *faults.Proxy) { p.Stall() },
		func(p *faults.Proxy) { p.Drop(true) },
		nil,
	} {
		target := tgt.Addrs[0]
		if fault == nil {
			target = hang.Addr().String()
		}
		p := faults.NewProxy(t, target)
		if fault != nil {
			fault(p)
		}
		r := dialRaw(t, p)
		r.send(t, "PING")
		// More than the proxy's queue holds: ECHO of 256 KiB.
		big := strings.Repeat("x", 256<<10)
		r.send(t, "*2\r\n$4\r\nECHO\r\n$"+strconv.Itoa(len(big))+"\r\n"+big)
		proxies = append(proxies, p)
	}
	redistest.Eventually(t, redistest.DefaultWait, "every link to be up", func() bool {
		for _, p := range proxies {
			if p.Stats().Active != 1 {
				return false
			}
		}
		return true
	})
	for _, p := range proxies {
		if err := p.Close(); err != nil {
			t.Fatal(err)
		}
		if err := p.Close(); err != nil { // idempotent
			t.Fatal(err)
		}
	}
	goleak.VerifyNone(t, ignore)
	if _, err := net.DialTimeout("tcp", proxies[0].Addr(), time.Second); err == nil {
		t.Fatal("a closed proxy still accepts")
	}
}

// TestDialer puts a proxy in front of each master of a cluster and
// stalls one: commands for its slots time out while the others work.
func TestDialer(t *testing.T) {
	ctx := context.Background()
	tgt := redistest.Cluster(t)
	var proxies []*faults.Proxy
	for _, a := range tgt.Addrs {
		proxies = append(proxies, faults.NewProxy(t, a))
	}
	c := tgt.NewClientOpts(t, func(o *redis.UniversalOptions) {
		o.Dialer = faults.Dialer(proxies...)
		o.ReadTimeout = 300 * time.Millisecond
		o.MaxRetries = -1
		o.MaxRedirects = -1
	})
	ns := redistest.Namespace(t)
	// One key per master.
	keyOn := map[string]string{}
	for i := 0; len(keyOn) < len(tgt.Addrs); i++ {
		k := ns + ":{" + string(rune('a'+i%26)) + strings.Repeat("x", i/26) + "}"
		if err := c.Set(ctx, k, "v", time.Minute).Err(); err != nil {
			t.Fatal(err)
		}
		owner := masterOf(ctx, t, tgt.Addrs[0], redistest.Slot(k))
		if _, ok := keyOn[owner]; !ok {
			keyOn[owner] = k
		}
	}
	for i, p := range proxies {
		if p.Stats().Accepted == 0 {
			t.Fatalf("no connection went through the proxy of %s", tgt.Addrs[i])
		}
	}

	stalled := proxies[0]
	stalled.Stall()
	for owner, k := range keyOn {
		err := c.Get(ctx, k).Err()
		if owner == stalled.Target() && !isTimeout(err) {
			t.Fatalf("GET %s on the stalled master: %v, want a timeout", k, err)
		}
		if owner != stalled.Target() && err != nil {
			t.Fatalf("GET %s on %s: %v", k, owner, err)
		}
	}
	stalled.Resume()
	redistest.Eventually(t, redistest.DefaultWait, "GET on the resumed master", func() bool {
		return c.Get(ctx, keyOn[stalled.Target()]).Err() == nil
	})
}

// masterOf returns the address of slot's master as the node at addr sees
// it.
func masterOf(ctx context.Context, t *testing.T, addr string, slot int) string {
	t.Helper()
	n := redis.NewClient(&redis.Options{Addr: addr})
	defer n.Close()
	ranges, err := n.ClusterSlots(ctx).Result()
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range ranges {
		if slot >= r.Start && slot <= r.End {
			return r.Nodes[0].Addr
		}
	}
	t.Fatalf("no owner for slot %d", slot)
	return ""
}
