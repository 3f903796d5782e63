// Package faults injects network faults between Redis clients and a
// redis-server for tests of how layercache behaves when Redis is slow,
// stuck or gone.
//
// A [Proxy] listens on 127.0.0.1 and forwards every connection to one
// server; on command it delays, holds, discards or cuts the bytes, or
// turns new connections away:
//
//	srv := redistest.StartServer(t)
//	p := faults.NewProxy(t, srv.Addr())
//	c := redis.NewClient(&redis.Options{Addr: p.Addr()})
//	p.Stall()  // commands now hang, as on a blocked socket
//	p.Resume() // and complete
//
// For a cluster, put a proxy in front of each node and give the client
// [Dialer], which sends connections for a proxied node through its proxy.
//
// Faults on the server itself (a killed process, CLIENT PAUSE, DEBUG
// SLEEP, CLIENT KILL) are in the redistest package.
//
// The proxy is a small one of our own rather than Shopify's toxiproxy:
// toxiproxy brings an HTTP API, Prometheus and a logging library into
// the module for the five faults needed here, and its toxics act on a
// running link only through that API.
package faults

import (
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Proxy forwards TCP connections from 127.0.0.1 to one target address
// and injects faults into them on command. Every method is safe for
// concurrent use; faults apply to live and new connections alike unless
// said otherwise.
type Proxy struct {
	target string
	ln     net.Listener
	ctx    context.Context // cancelled by Close, ends dials to the target
	cancel context.CancelFunc
	wg     sync.WaitGroup // the accept loop and every link's goroutines

	mu      sync.Mutex
	links   map[*link]struct{}
	latency time.Duration
	stalled chan struct{} // non-nil while stalled; closed by Resume
	refuse  bool
	drop    bool
	closed  bool
	stats   Stats // Active is computed on read
}

// Stats counts a proxy's connections since it started.
type Stats struct {
	// Accepted is the number of client connections accepted, including
	// those refused.
	Accepted int
	// Refused is the number closed at once because of [Proxy.Refuse].
	Refused int
	// DialErrors is the number closed because the target could not be
	// reached (the server is down).
	DialErrors int
	// Cut is the number closed by [Proxy.CutAll].
	Cut int
	// Active is the number of client connections open now.
	Active int
}

// NewProxy starts a proxy to target (a host:port on the loopback
// interface) listening on a free port of 127.0.0.1, and closes it with
// t.Cleanup. It fails t if it cannot listen.
func NewProxy(t testing.TB, target string) *Proxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("faults: listen: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	p := &Proxy{target: target, ln: ln, ctx: ctx, cancel: cancel, links: map[*link]struct{}{}}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(func() { _ = p.Close() })
	return p
}

// Addr returns the address clients should connect to, 127.0.0.1:port.
func (p *Proxy) Addr() string { return p.ln.Addr().String() }

// Target returns the address the proxy forwards to.
func (p *Proxy) Target() string { return p.target }

// SetLatency delays every chunk of bytes by d in each direction (so a
// request and its reply take 2d longer), from the moment the proxy reads
// it; order is kept. Zero turns the delay off for bytes read from then
// on.
func (p *Proxy) SetLatency(d time.Duration) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.latency = d
}

// Stall stops forwarding in both directions until [Proxy.Resume]:
// connections stay open and accepted, but bytes are held (in the proxy,
// then in the kernel's buffers as the proxy stops reading), as on a
// blocked socket or a frozen peer. Clients see timeouts, not errors.
// Held bytes are delivered, in order, on Resume.
func (p *Proxy) Stall() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.stalled == nil {
		p.stalled = make(chan struct{})
	}
}

// Resume ends a [Proxy.Stall] and delivers the held bytes.
func (p *Proxy) Resume() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.stalled != nil {
		close(p.stalled)
		p.stalled = nil
	}
}

// Drop turns a blackhole on or off: while on, the proxy keeps reading
// both directions of every connection and discards what it reads, so
// requests never reach the server and replies never reach the client,
// yet connections open and stay open. Unlike [Proxy.Stall], nothing is
// delivered afterwards: a client that sent a command while dropping must
// give up on that connection (go-redis does, after its read timeout).
func (p *Proxy) Drop(on bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.drop = on
}

// Refuse turns refusing on or off: while on, every new connection is
// reset as soon as it is accepted, so clients' commands fail at once
// (with "connection reset" or EOF: the kernel completes the TCP
// handshake before the proxy can refuse, so the dial itself succeeds;
// a killed redistest.Server gives a real "connection refused").
// Connections already open are left alone; see [Proxy.CutAll].
func (p *Proxy) Refuse(on bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.refuse = on
}

// CutAll closes every open connection on both sides, as when the server
// is killed or the network drops them, and returns how many it closed.
// New connections are accepted as usual.
func (p *Proxy) CutAll() int {
	p.mu.Lock()
	list := make([]*link, 0, len(p.links))
	for l := range p.links {
		list = append(list, l)
	}
	p.stats.Cut += len(list)
	p.mu.Unlock()
	for _, l := range list {
		l.close()
	}
	return len(list)
}

// Stats returns the proxy's connection counts.
func (p *Proxy) Stats() Stats {
	p.mu.Lock()
	defer p.mu.Unlock()
	s := p.stats
	s.Active = len(p.links)
	return s
}

// Close stops listening, closes every connection and returns once every
// goroutine of the proxy has ended. It is called by t.Cleanup and may be
// called more than once.
func (p *Proxy) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	list := make([]*link, 0, len(p.links))
	for l := range p.links {
		list = append(list, l)
	}
	if p.stalled != nil {
		close(p.stalled)
		p.stalled = nil
	}
	p.mu.Unlock()
	p.cancel()
	err := p.ln.Close()
	for _, l := range list {
		l.close()
	}
	p.wg.Wait()
	return err
}

func (p *Proxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return // closed
		}
		p.mu.Lock()
		p.stats.Accepted++
		switch {
		case p.closed:
			p.mu.Unlock()
			_ = c.Close()
			return
		case p.refuse:
			p.stats.Refused++
			p.mu.Unlock()
			// RST rather than FIN: the closest a listening socket gets to
			// refusing.
			_ = c.(*net.TCPConn).SetLinger(0)
			_ = c.Close()
			continue
		}
		// Registered before the dial, so that CutAll and Close reach a
		// connection whose dial is under way.
		l := &link{p: p, client: c, done: make(chan struct{})}
		p.links[l] = struct{}{}
		p.wg.Add(1)
		p.mu.Unlock()
		go p.serve(l)
	}
}

// serve connects l to the target and starts its four goroutines: a
// reader and a writer for each direction, so that a delayed or held
// chunk never stops the proxy from reading the next (latency does not
// add up over pipelined commands).
func (p *Proxy) serve(l *link) {
	defer p.wg.Done()
	var d net.Dialer
	s, err := d.DialContext(p.ctx, "tcp", p.target)
	if err != nil {
		p.mu.Lock()
		p.stats.DialErrors++
		p.mu.Unlock()
		l.close()
		return
	}
	if !l.setServer(s) {
		return // cut or closed while dialing
	}
	// A few chunks of slack per direction; beyond that the reader
	// blocks and the kernel's buffers, then the sender, fill up, as on a
	// real slow link.
	up, down := make(chan chunk, 16), make(chan chunk, 16)
	l.halves.Add(2)
	p.wg.Add(4)
	go p.read(l, l.client, up)
	go p.write(l, up, s)
	go p.read(l, s, down)
	go p.write(l, down, l.client)
}

// chunk is bytes read from one side, due to be written to the other at
// due.
type chunk struct {
	data []byte
	due  time.Time
}

// read copies from src into ch until src ends: at EOF it closes ch (the
// writer then half-closes the other side); on any other error it closes
// the whole link.
func (p *Proxy) read(l *link, src net.Conn, ch chan<- chunk) {
	defer p.wg.Done()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			p.mu.Lock()
			drop, lat := p.drop, p.latency
			p.mu.Unlock()
			if !drop {
				c := chunk{data: append([]byte(nil), buf[:n]...), due: time.Now().Add(lat)}
				select {
				case ch <- c:
				case <-l.done:
					return
				}
			}
		}
		if err != nil {
			if !errors.Is(err, io.EOF) {
				l.close()
			}
			close(ch)
			return
		}
	}
}

// write copies chunks from ch to dst, each at its due time and only while
// the proxy is not stalled. When ch is closed (its source said EOF) and
// drained, it half-closes dst, and the last of the link's two writers to
// finish closes the link.
func (p *Proxy) write(l *link, ch <-chan chunk, dst net.Conn) {
	defer p.wg.Done()
	for {
		var c chunk
		var ok bool
		select {
		case c, ok = <-ch:
		case <-l.done:
			return
		}
		if !ok {
			if tc, isTCP := dst.(*net.TCPConn); isTCP {
				_ = tc.CloseWrite()
			}
			if l.halves.Add(-1) == 0 {
				l.close()
			}
			return
		}
		if !l.sleepUntil(c.due) || !p.waitResumed(l) {
			return
		}
		if _, err := dst.Write(c.data); err != nil {
			l.close()
			return
		}
	}
}

// waitResumed waits while the proxy is stalled. It reports false if the
// link closed meanwhile.
func (p *Proxy) waitResumed(l *link) bool {
	for {
		p.mu.Lock()
		stalled := p.stalled
		p.mu.Unlock()
		if stalled == nil {
			return true
		}
		select {
		case <-stalled:
		case <-l.done:
			return false
		}
	}
}

func (p *Proxy) remove(l *link) {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.links, l)
}

// link is one proxied connection: the client's side and, once dialed, the
// server's.
type link struct {
	p      *Proxy
	client net.Conn
	done   chan struct{} // closed by close
	halves atomic.Int32  // directions not yet finished

	mu     sync.Mutex
	server net.Conn
	closed bool
}

// setServer attaches the server side, or closes it and reports false if
// the link was closed while dialing.
func (l *link) setServer(s net.Conn) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		_ = s.Close()
		return false
	}
	l.server = s
	return true
}

// close closes both sides and ends the link's goroutines. It may be
// called more than once, from any goroutine.
func (l *link) close() {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return
	}
	l.closed = true
	s := l.server
	l.mu.Unlock()
	close(l.done)
	_ = l.client.Close()
	if s != nil {
		_ = s.Close()
	}
	l.p.remove(l)
}

// sleepUntil waits until t. It reports false if the link closed meanwhile.
func (l *link) sleepUntil(t time.Time) bool {
	d := time.Until(t)
	if d <= 0 {
		return true
	}
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-timer.C:
		return true
	case <-l.done:
		return false
	}
}

// Dialer returns a dial function for go-redis options (Options.Dialer,
// ClusterOptions.Dialer) that connects to the proxy in front of the
// address asked for, when one of proxies has it as its target, and to
// the address itself otherwise. Cluster clients learn node addresses from
// the cluster, not from their options; this is how their traffic to
// chosen nodes goes through proxies.
func Dialer(proxies ...*Proxy) func(ctx context.Context, network, addr string) (net.Conn, error) {
	via := make(map[string]string, len(proxies))
	for _, p := range proxies {
		via[p.Target()] = p.Addr()
	}
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		if a, ok := via[addr]; ok {
			addr = a
		}
		var d net.Dialer
		return d.DialContext(ctx, network, addr)
	}
}
