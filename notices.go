package layercache

import (
	"context"
	"log/slog"
	"sync"
	"sync/atomic"

	"github.com/redis/go-redis/v9"
)

// noticeHub is a Cache's one subscription to lease notices. A waiter
// watches its key's notice channel; the hub subscribes to the channel while
// at least one waiter watches it and routes each notice to that channel's
// waiters, so any number of waiting keys share one connection (one per
// cluster node, since sharded channels live on their slot's node).
//
// Every subscription event of a channel wakes its waiters too: a notice
// published before the subscription took effect is lost, so a waiter looks
// at Redis again once it is sure to hear of the next one, and again after
// go-redis re-subscribes on a new connection (notices published while the
// connection was down are lost as well).
type noticeHub struct {
	ctx    context.Context // the cache's lifetime: subscription I/O
	client redis.UniversalClient
	log    *slog.Logger

	mu       sync.Mutex
	closed   bool
	channels map[string]*noticeChannel
	conns    map[string]*noticeConn // by node address; "" when there is one server
	wg       sync.WaitGroup         // dispatch goroutines
}

// noticeChannel is one subscribed channel and the waiters watching it.
type noticeChannel struct {
	conn      *noticeConn
	watches   map[*noticeWatch]struct{}
	confirmed bool // the last subscription event was a subscribe
}

// noticeConn is one pub/sub connection.
type noticeConn struct {
	ps      *redis.PubSub
	sharded bool
}

// noticeWatch is one waiter's interest in a channel.
type noticeWatch struct {
	channel string
	// wake holds at most one pending wake-up: notices that arrive while
	// the waiter is busy collapse into one look at Redis.
	wake chan struct{}
	// confirmed is true while the channel's subscription is known to be
	// in effect, so notices (not polls) will tell of fills.
	confirmed atomic.Bool
}

func newNoticeHub(ctx context.Context, client redis.UniversalClient, log *slog.Logger) *noticeHub {
	return &noticeHub{
		ctx:      ctx,
		client:   client,
		log:      log,
		channels: make(map[string]*noticeChannel),
		conns:    make(map[string]*noticeConn),
	}
}

// watch registers interest in channel. The returned watch is always usable;
// when no subscription can serve it (closed cache, Ring client, Redis
// down) it is simply never woken and never confirmed, and its waiter polls.
func (h *noticeHub) watch(channel string) *noticeWatch {
	w := &noticeWatch{channel: channel, wake: make(chan struct{}, 1)}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return w
	}
	nc := h.channels[channel]
	if nc == nil {
		conn := h.connFor(channel)
		if conn == nil {
			return w
		}
		nc = &noticeChannel{conn: conn, watches: make(map[*noticeWatch]struct{})}
		h.channels[channel] = nc
		// The command is written under h.mu so that subscribes and
		// unsubscribes of one channel reach Redis in the order of the
		// watch count's changes. On error go-redis still records the
		// channel and subscribes it when it reconnects; meanwhile the
		// waiter polls.
		if err := conn.subscribe(h.ctx, channel); err != nil && h.ctx.Err() == nil {
			h.log.LogAttrs(h.ctx, slog.LevelDebug, "layercache: subscribing to lease notices failed; waiters poll",
				slog.String("channel", channel), slog.Any("err", err))
		}
	} else if nc.confirmed {
		// Already subscribed: notices from now on reach w, but one may
		// have been published since the waiter last looked. Look again.
		w.confirmed.Store(true)
		w.wake <- struct{}{}
	}
	nc.watches[w] = struct{}{}
	return w
}

// unwatch ends w's interest; the channel is unsubscribed when no waiter is
// left on it.
func (h *noticeHub) unwatch(w *noticeWatch) {
	h.mu.Lock()
	defer h.mu.Unlock()
	nc := h.channels[w.channel]
	if nc == nil {
		return
	}
	if _, ok := nc.watches[w]; !ok {
		return
	}
	delete(nc.watches, w)
	if len(nc.watches) > 0 {
		return
	}
	delete(h.channels, w.channel)
	if !h.closed {
		_ = nc.conn.unsubscribe(h.ctx, w.channel)
	}
}

// connFor returns the connection that can subscribe to channel, opening it
// on first use. Called with h.mu held.
func (h *noticeHub) connFor(channel string) *noticeConn {
	var (
		addr    string
		sharded bool
		open    func() *redis.PubSub
	)
	switch cl := h.client.(type) {
	case *redis.ClusterClient:
		// A sharded channel is served by its slot's master. Subscribing
		// through that node's client pins the connection to the node:
		// go-redis reconnects it there rather than to a random node.
		node, err := cl.MasterForKey(h.ctx, channel)
		if err != nil {
			h.log.LogAttrs(h.ctx, slog.LevelDebug, "layercache: no node for lease notices; waiters poll",
				slog.String("channel", channel), slog.Any("err", err))
			return nil
		}
		addr, sharded = node.Options().Addr, true
		open = func() *redis.PubSub { return node.SSubscribe(h.ctx) }
	case *redis.Ring:
		// A Ring subscribes on the shard of its first channel and cannot
		// move; one connection per waiting key is not worth it. Waiters
		// poll instead.
		return nil
	default:
		open = func() *redis.PubSub { return cl.Subscribe(h.ctx) }
	}
	if conn := h.conns[addr]; conn != nil {
		return conn
	}
	conn := &noticeConn{ps: open(), sharded: sharded}
	h.conns[addr] = conn
	msgs := conn.ps.ChannelWithSubscriptions()
	h.wg.Add(1)
	go h.dispatch(msgs)
	return conn
}

// dispatch routes one connection's messages until the connection closes.
func (h *noticeHub) dispatch(msgs <-chan any) {
	defer h.wg.Done()
	for m := range msgs {
		switch m := m.(type) {
		case *redis.Message:
			h.signal(m.Channel, false, false)
		case *redis.Subscription:
			switch m.Kind {
			case "subscribe", "ssubscribe":
				h.signal(m.Channel, true, true)
			case "unsubscribe", "sunsubscribe":
				// Ours (the channel is gone from the map then) or the
				// server's, when a slot moved away: waiters fall back to
				// polling.
				h.signal(m.Channel, true, false)
			}
		}
	}
}

// signal wakes the waiters of channel and, for subscription events,
// records whether the subscription is in effect.
func (h *noticeHub) signal(channel string, event, confirmed bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	nc := h.channels[channel]
	if nc == nil {
		return
	}
	if event {
		nc.confirmed = confirmed
	}
	for w := range nc.watches {
		if event {
			w.confirmed.Store(confirmed)
		}
		poke(w.wake)
	}
}

// close closes every connection and waits for their dispatchers.
func (h *noticeHub) close() {
	h.mu.Lock()
	h.closed = true
	conns := h.conns
	h.conns = nil
	// No notice will come any more: waiters that trusted one must poll,
	// and look at Redis now rather than at their holder's lease expiry.
	for _, nc := range h.channels {
		for w := range nc.watches {
			w.confirmed.Store(false)
			poke(w.wake)
		}
	}
	h.mu.Unlock()
	for _, conn := range conns {
		_ = conn.ps.Close()
	}
	h.wg.Wait()
}

func (nc *noticeConn) subscribe(ctx context.Context, channel string) error {
	if nc.sharded {
		return nc.ps.SSubscribe(ctx, channel)
	}
	return nc.ps.Subscribe(ctx, channel)
}

func (nc *noticeConn) unsubscribe(ctx context.Context, channel string) error {
	if nc.sharded {
		return nc.ps.SUnsubscribe(ctx, channel)
	}
	return nc.ps.Unsubscribe(ctx, channel)
}
