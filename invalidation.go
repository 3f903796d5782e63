package layercache

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/layercache/layercache/internal/busmsg"
	"github.com/redis/go-redis/v9"
)

// Bus carries invalidations between the processes that share a Redis, so
// that a write on one node reaches the local tier ([WithLocal]) of every
// other node within milliseconds. One Bus per process serves all its caches
// ([WithInvalidation]) over one subscription; messages are routed by
// namespace and version.
//
// [Cache.Set] and [Cache.Delete] hand their keys to the bus, which
// publishes them in the background: batched under load (what piles up while
// one publish is in flight goes out in the next), small, tagged with this
// node's id so the node skips its own, and retried until delivered or the
// bus is closed. Receivers drop the keys from their local tiers.
//
// A node that may have missed messages never serves local hits: in the
// default pub/sub mode, which is at-most-once, local hits are off from the
// moment the connection is found broken (an error, or no answer to a
// health-check ping within a few seconds) until the subscription is back,
// and the local tiers are flushed on every subscription before hits resume.
// In stream mode ([WithStream]) the node replays what it missed instead of
// flushing, and flushes only when what it missed was trimmed away.
//
// The promise: no local read is staler than the invalidation lag, and never
// staler than the local TTL, whatever happens to the connection.
//
// # Who can talk on the bus
//
// Messages only ever remove local copies, or make migrating caches re-read
// their phase: none makes a node serve a value that is not in Redis.
// Without [WithSecret], anyone who can PUBLISH to the channel (or XADD to
// the stream) can make every node drop any key from its local tier, flush
// one cache's local tier or (with a message the node cannot read) all of
// them, and make migrating caches re-read their control key. That costs
// Redis reads and hit ratio, not correctness, and remote flushes of one
// cache are spaced out on each node (about 100ms apart; see
// [BusStats].FlushesDeferred), so a flood of them cannot take a node's
// CPU. It cannot silence a genuine node: sequence numbers are trusted only
// when authenticated. With WithSecret it can do none of this; see there
// for what a replayed message can still do. Whoever can write the stream's
// key can also delete or trim it, or append an entry with the largest
// possible ID, after which no XADD succeeds: restrict the channel and the
// key with Redis ACLs.
//
// A Bus must be closed with [Bus.Close]; caches still attached then stop
// serving local hits (their reads go to Redis).
type Bus struct {
	client redis.UniversalClient
	cfg    busConfig
	node   [8]byte
	log    *slog.Logger
	clock  *coarseClock // shared by the local tiers of attached caches

	mu     sync.RWMutex
	routes map[string][]busTier
	phases map[string][]*migration // migration name -> its followers in this process
	// notices is the lease-notice subscription shared by the attached
	// caches that use WithLocks on the bus's own client; made on first use.
	notices *noticeHub
	up      bool          // subscribed and current: local hits on
	upCh    chan struct{} // closed when up turns true; replaced when it turns false
	closed  bool
	ps      *redis.PubSub // the live subscription, closed by Close to unblock the reader

	pubMu    sync.Mutex
	pending  map[string]*pendingRoute
	pendSize int                 // sum of the routes' sizes
	phased   map[string]struct{} // migrations whose phase change is to be announced
	drained  bool                // the publisher took its last batch: queue no more
	kick     chan struct{}

	// seq is the sequence number of the next message; only the
	// publisher goroutine sends.
	seq uint64
	// replays is the receiving side's memory of sequence numbers; only
	// the reader goroutine handles messages.
	replays    replayGuard
	flushLimit flushLimiter

	ctx       context.Context // cancelled by Close
	cancel    context.CancelFunc
	wg        sync.WaitGroup
	closeOnce sync.Once
	rec       recorder     // evBus* events: see BusStats
	lastLagMs atomic.Int64 // LastLag, a gauge

	logDown, logSend, logForged, logStale, logReplay, logFlood, logBacklog throttledLog
}

// busTier is a local tier as the bus sees it, whatever its value type.
type busTier interface {
	invalidate(keys []string)       // a write in this process
	remoteInvalidate(keys []string) // a message from another node
	flush()
	setUp(bool)
}

// Tuning of the bus. Not options: they are about the connection, not about
// what a user wants from the cache.
const (
	// pubsubHealth is how long the subscriber waits for a message before
	// it pings; a connection that answers neither within two of these is
	// declared dead, and local hits go off.
	pubsubHealth = 2 * time.Second
	// streamBlock is how long one XREAD BLOCK waits for new entries. Close
	// waits for at most one of these.
	streamBlock = 200 * time.Millisecond
	// streamBatch is the most entries one XREAD asks for (less when the
	// stream's MAXLEN is smaller; see runStream).
	streamBatch = 128
	// maxPendingBytes bounds the invalidations waiting to be published,
	// counting each key as its length plus pendingKeyOverhead: about a
	// million typical keys. Past it, the routes' keys are replaced by
	// route flushes (see enqueueLocked): memory stays bounded when Redis
	// is unreachable for long, at the price of hit ratio.
	maxPendingBytes = 32 << 20
	// closeFlushTimeout bounds Close's last attempt to publish what is
	// pending.
	closeFlushTimeout = 2 * time.Second
)

// NewBus returns a Bus over client (a *redis.Client, *redis.ClusterClient,
// or any redis.UniversalClient) and starts its goroutines: one that
// subscribes (or reads the stream), one that publishes, and the coarse clock
// its caches' local tiers read. It does not wait
// for the subscription: until it is up, attached caches read through to
// Redis; [Bus.Ready] waits for it. It returns an error wrapping
// [ErrInvalidOption] for a bad option, and for a nil client, typed nils
// such as (*redis.Client)(nil) included.
func NewBus(client redis.UniversalClient, opts ...BusOption) (*Bus, error) {
	if nilClient(client) {
		// A typed nil would pass a plain nil check and panic later on the
		// bus's own goroutine, where no caller can recover: refuse it here.
		return nil, fmt.Errorf("%w: NewBus needs a redis.UniversalClient, got %s; pass a client from redis.NewClient, redis.NewClusterClient or redis.NewUniversalClient",
			ErrInvalidOption, describeNil(client))
	}
	cfg := busConfig{channel: DefaultBusChannel, health: pubsubHealth, maxPending: maxPendingBytes}
	for _, opt := range opts {
		if opt == nil {
			cfg.fail("nil BusOption passed to NewBus")
			continue
		}
		opt(&cfg)
	}
	if len(cfg.errs) > 0 {
		return nil, errors.Join(cfg.errs...)
	}
	if cfg.logger == nil {
		cfg.logger = slog.Default()
	}
	b := &Bus{
		client:  client,
		cfg:     cfg,
		routes:  make(map[string][]busTier),
		phases:  make(map[string][]*migration),
		phased:  make(map[string]struct{}),
		upCh:    make(chan struct{}),
		pending: make(map[string]*pendingRoute),
		kick:    make(chan struct{}, 1),
		seq:     1,
	}
	b.flushLimit.last = make(map[string]time.Time)
	b.flushLimit.due = make(map[string]struct{})
	if _, err := rand.Read(b.node[:]); err != nil {
		return nil, fmt.Errorf("layercache: node id: %w", err)
	}
	mode := "pubsub:" + cfg.channel
	if cfg.stream != "" {
		mode = "stream:" + cfg.stream
	}
	b.log = cfg.logger.With("bus", mode, "node", fmt.Sprintf("%x", b.node))
	b.ctx, b.cancel = context.WithCancel(context.Background())
	b.clock = startCoarseClock()
	b.wg.Add(2)
	go b.runPublisher()
	if cfg.stream != "" {
		go b.runStream()
	} else {
		go b.runPubSub()
	}
	return b, nil
}

// Ready waits until the bus is subscribed (pub/sub) or has caught up with
// the stream, which is when attached caches serve local hits. It returns
// ctx.Err() if ctx ends first and [ErrClosed] if the bus is closed.
func (b *Bus) Ready(ctx context.Context) error {
	for {
		b.mu.RLock()
		closed, up, ch := b.closed, b.up, b.upCh
		b.mu.RUnlock()
		switch {
		case closed:
			return ErrClosed
		case up:
			return nil
		}
		select {
		case <-ch:
		case <-b.ctx.Done():
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// Close stops the bus: it makes one last attempt (of at most two seconds)
// to publish pending invalidations, unsubscribes, and waits for its
// goroutines. Caches still attached stop serving local hits. Close does not
// close the Redis client. It is idempotent.
func (b *Bus) Close() error {
	b.closeOnce.Do(func() {
		b.mu.Lock()
		b.closed = true
		b.up = false
		for _, tiers := range b.routes {
			for _, t := range tiers {
				t.setUp(false)
			}
		}
		ps := b.ps
		notices := b.notices
		b.mu.Unlock()
		b.cancel()
		if ps != nil {
			// Unblocks a reader waiting in ReceiveTimeout.
			_ = ps.Close()
		}
		if notices != nil {
			// Waiters of caches still open poll from now on.
			notices.close()
		}
		b.wg.Wait()
		// After the reader stopped: nothing defers a flush any more.
		b.flushLimit.close()
		b.clock.close()
	})
	return nil
}

// attach registers a cache's local tier (nil for a cache without one).
func (b *Bus) attach(route string, t busTier) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return fmt.Errorf("%w: WithInvalidation got a closed Bus", ErrClosed)
	}
	if t != nil {
		b.routes[route] = append(b.routes[route], t)
		t.setUp(b.up)
	}
	return nil
}

// detach unregisters t; afterwards the bus never touches it.
func (b *Bus) detach(route string, t busTier) {
	if t == nil {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	removeFrom(b.routes, route, t)
}

// leaseNotices returns the bus's lease-notice subscription, so that every
// cache of the process waits for fills through one subscription (one
// connection per Cluster master) instead of one per cache. Its waiters
// return through their own cache's context; only Close of the bus closes it.
func (b *Bus) leaseNotices() *noticeHub {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.notices == nil {
		b.notices = newNoticeHub(b.ctx, b.client, b.log)
		if b.closed {
			b.notices.close()
		}
	}
	return b.notices
}

// followPhase registers a migration's follower: a phase notice for its
// name (from any node) makes it re-read the control key at once.
func (b *Bus) followPhase(m *migration) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.phases[m.name] = append(b.phases[m.name], m)
}

// unfollowPhase undoes followPhase.
func (b *Bus) unfollowPhase(m *migration) {
	b.mu.Lock()
	defer b.mu.Unlock()
	removeFrom(b.phases, m.name, m)
}

// removeFrom removes v from the list m[k], and the entry once the list is
// empty. It builds a new slice rather than shifting in place: readers may
// still range over the old one.
func removeFrom[K, V comparable](m map[K][]V, k K, v V) {
	s := m[k]
	if i := slices.Index(s, v); i >= 0 {
		s = append(s[:i:i], s[i+1:]...)
	}
	if len(s) == 0 {
		delete(m, k)
	} else {
		m[k] = s
	}
}

// poke wakes the goroutine that receives on ch, unless a wake-up is
// already pending there (ch has a buffer of one, or a receiver is due).
func poke(ch chan<- struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// setDown turns local hits off: the node may be missing messages.
func (b *Bus) setDown(reason error) {
	b.mu.Lock()
	was := b.up
	if was {
		b.up = false
		b.upCh = make(chan struct{})
		for _, tiers := range b.routes {
			for _, t := range tiers {
				t.setUp(false)
			}
		}
	}
	b.mu.Unlock()
	if was {
		b.rec.inc(evBusDisconnects)
		b.logDown.log(b.ctx, b.log, slog.LevelWarn, "layercache: invalidation bus interrupted; local hits off until it is current",
			slog.Any("reason", reason))
	}
}

// markCurrent turns local hits on, flushing the local tiers first when flush is
// set (a fill that read Redis before the flush cannot store after it: see
// localTier).
func (b *Bus) markCurrent(flush bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return
	}
	for _, tiers := range b.routes {
		for _, t := range tiers {
			if flush {
				t.flush()
			}
			t.setUp(true)
		}
	}
	if flush {
		b.rec.inc(evBusFlushes)
	}
	if !b.up {
		b.up = true
		close(b.upCh)
	}
}

// flushAll empties every local tier without changing whether hits are on.
func (b *Bus) flushAll() {
	b.mu.RLock()
	b.flushLocked(allRoutes)
	b.mu.RUnlock()
}

// handle applies one message from the channel or the stream, which
// arrived at at (Unix ms; see BusReplayWindow for whose clock). Only the
// reader goroutine calls it (the replay guard is its own).
func (b *Bus) handle(payload string, at int64) {
	// Decoded in place: the keys are substrings of the payload go-redis
	// read, not one allocation each.
	m, err := busmsg.DecodeString(payload, b.cfg.secret)
	switch {
	case err == nil:
	case errors.Is(err, busmsg.ErrForged):
		b.rec.inc(evBusForged)
		b.logForged.log(b.ctx, b.log, slog.LevelWarn, "layercache: dropped a bus message that failed authentication")
		return
	case errors.Is(err, busmsg.ErrForeign):
		b.rec.inc(evBusMalformed)
		return
	default:
		// Ours (and authentic, if there is a secret), but unreadable: a
		// newer format or a bug. It may have carried invalidations, so
		// the only safe reading is "anything may have changed". Without
		// a secret anyone can send one, hence the limit.
		b.rec.inc(evBusMalformed)
		b.mu.RLock()
		b.remoteFlushLocked(allRoutes)
		b.mu.RUnlock()
		return
	}
	if m.Origin == b.node {
		return // this node's tiers were invalidated when it published
	}
	if !b.admit(&m, at) {
		return
	}
	b.rec.inc(evBusReceived)
	if lag := time.Now().UnixMilli() - m.SentAt; lag >= 0 {
		b.lastLagMs.Store(lag)
	}
	b.mu.RLock()
	defer b.mu.RUnlock()
	for _, it := range m.Items {
		if it.Kind == busmsg.KindPhase {
			for _, mig := range b.phases[it.Route] {
				mig.notify()
			}
			continue
		}
		if it.Kind == busmsg.KindFlush {
			b.remoteFlushLocked(it.Route)
			continue
		}
		for _, t := range b.routes[it.Route] {
			t.remoteInvalidate(it.Keys)
		}
		b.rec.add(evBusReceivedKeys, uint64(len(it.Keys))) // once applied: tests wait on it
	}
}

// BusStats is a snapshot of a [Bus]'s counters since [NewBus]. Counters
// only grow. Per-cache figures (local hits, bypasses, flushes, keys sent
// and received) are in [Cache.Stats].
type BusStats struct {
	// Sent counts messages published (PUBLISH or XADD); SentKeys the key
	// invalidations they carried. SendErrors counts failed attempts, each
	// retried.
	Sent, SentKeys, SendErrors uint64
	// Received counts messages from other nodes that were applied (not
	// dropped as Forged, Malformed, Stale or Replays); ReceivedKeys the key
	// invalidations in them.
	Received, ReceivedKeys uint64
	// Forged counts messages dropped because they failed authentication
	// (see WithSecret). Malformed counts messages that were not bus
	// messages (ignored) or could not be read (each caused a flush of
	// every local tier, spaced out as FlushesDeferred says).
	Forged, Malformed uint64
	// Subscriptions counts pub/sub subscriptions made, the first one
	// included; each later one followed a lost connection and flushed the
	// local tiers.
	Subscriptions uint64
	// Disconnects counts times local hits were turned off because the bus
	// lost its connection or fell behind on the stream.
	Disconnects uint64
	// Flushes counts flushes of all attached local tiers.
	Flushes uint64
	// Replayed counts stream entries read while catching up after a start,
	// a reconnect or a backlog. Trimmed counts catch-ups that found unread
	// entries trimmed away (each caused a flush).
	Replayed, Trimmed uint64
	// Stale counts messages dropped because they were sent more than
	// [BusReplayWindow] before (or after) they arrived: replays of old
	// messages, or nodes whose clocks disagree by more than the window.
	// Replays counts authenticated messages dropped because their
	// sender's sequence number had been applied already: a captured
	// message sent again (see [WithSecret]). Neither is applied.
	Stale, Replays uint64
	// BacklogFlushes counts times the invalidations waiting to be
	// published outgrew their bound (32 MiB; Redis unreachable for long
	// while writes went on) and were replaced by flushes of the caches
	// they were for, which every other node applies once delivered. Bulk
	// writes and deletes are not a backlog: however many keys they have,
	// they go out as batched key invalidations.
	BacklogFlushes uint64
	// FlushesDeferred counts flushes asked for by other nodes (or by
	// unreadable messages) that came within 100ms of the last one of the
	// same cache here, and were applied together at the end of that
	// interval rather than at once: many of them mean a node that keeps
	// flushing, or someone forging flushes on a bus without a secret.
	FlushesDeferred uint64
	// LastLag is the time from the sending of the last message received
	// to its arrival, by the two nodes' clocks (millisecond precision).
	LastLag time.Duration
}

// Stats returns a snapshot of the bus's counters.
func (b *Bus) Stats() BusStats {
	st := BusStats{LastLag: time.Duration(b.lastLagMs.Load()) * time.Millisecond}
	b.rec.snapshotInto(&st, ofBus)
	return st
}
