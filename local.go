package layercache

import (
	"fmt"
	"hash/maphash"
	"sync"
	"sync/atomic"
	"time"

	"github.com/layercache/layercache/internal/envelope"
	"github.com/maypok86/otter/v2"
)

// WithLocal adds an in-process tier in front of Redis: up to maxEntries
// decoded values, each kept for at most ttl and never past the end of its
// freshness in Redis. A local hit does no I/O and allocates nothing.
//
// Without [WithInvalidation], a write on another process is seen here only
// when the local copy expires, so ttl is how stale a read may be. With it,
// writes reach every node's local tier within milliseconds and ttl is the
// safety net for when messages cannot flow: no local read is staler than the
// invalidation lag, and never staler than ttl.
//
// Local hits return the same T to every caller: treat values whose type
// holds pointers, slices or maps as read-only. maxEntries and ttl must be
// positive. Eviction is W-TinyLFU (otter), so a scan of cold keys does not
// push the hot ones out. The tier runs a bookkeeping goroutine, and, for a
// cache without a bus, a millisecond clock ticker; [Cache.Close] stops both
// and turns local hits off.
func WithLocal(maxEntries int, ttl time.Duration) Option {
	return func(c *config) {
		if maxEntries <= 0 {
			c.fail("WithLocal(%d, %v): maxEntries must be positive", maxEntries, ttl)
			return
		}
		if ttl <= 0 {
			c.fail("WithLocal(%d, %v): the local TTL must be positive", maxEntries, ttl)
			return
		}
		c.localMax, c.localTTL = maxEntries, ttl
	}
}

// localStripes is the number of invalidation stripes a local tier keeps.
// A fill is dropped when its key's stripe saw an invalidation while it read
// Redis; more stripes mean fewer fills dropped for other keys' sake.
const localStripes = 256

// localEntry is a decoded value (or a cached "not found") in the local tier.
type localEntry[T any] struct {
	state    entryState
	val      T
	hdr      envelope.Header
	deadline int64 // unix ms, by the tier's clock; the entry is not served from then on
}

// localTier is the in-process tier of one Cache.
//
// The race it closes: a fill (a Redis read whose result is kept locally)
// that read a value before a write, and stores it after the write's
// invalidation was applied here, would serve the old value until its TTL.
// So a fill takes a token (its key's stripe sequence and the flush epoch)
// before reading Redis, and stores only if neither moved, checking and
// storing under the stripe's lock (and the flush lock, shared), while an
// invalidation bumps the sequence and removes the key under the same lock
// (a flush bumps the epoch and clears all under the flush lock,
// exclusive). Once invalidate(k) returns, no value of k read from Redis
// before it began is in the tier, nor can one be stored later. The hit path
// takes no lock.
type localTier[T any] struct {
	// up says local hits may be served. Without a bus it is true until
	// Close; with one, the bus sets it only while it is subscribed and
	// current, so that a node that may have missed messages reads Redis.
	up atomic.Bool

	// The fields the hit path reads come first, in one cache line.
	entries *otter.Cache[string, *localEntry[T]]
	coarse  *coarseClock // the hit path's clock; nil when cfg.clock is not the system clock
	clock   Clock        // used when coarse is nil (tests' ManualClock)
	stats   *recorder

	ttlMs int64
	// slackMs shortens every deadline by the coarse clock's resolution, by
	// which it may lag the real time.
	slackMs  int64
	ownClock bool // the tier started coarse and stops it on close
	maint    *maintenance

	flushMu sync.RWMutex // fills share it; flush holds it alone
	epoch   atomic.Uint64
	stripes [localStripes]localStripe
	seed    maphash.Seed
}

// localStripe orders the fills and invalidations of the keys that hash to
// it. seq only grows, and only under mu; begin reads it without the lock.
type localStripe struct {
	mu  sync.Mutex
	seq atomic.Uint64
}

// fillToken is what a fill remembers of the tier before reading Redis.
type fillToken struct {
	ok      bool // local hits were on; store the result
	stripe  uint32
	epoch   uint64
	seq     uint64
	startMs int64
}

func newLocalTier[T any](cfg *config, stats *recorder, shared *coarseClock) (*localTier[T], error) {
	maint := startMaintenance()
	entries, err := otter.New(&otter.Options[string, *localEntry[T]]{
		MaximumSize:     cfg.localMax,
		InitialCapacity: min(cfg.localMax, 1024),
		Executor:        maint.submit,
	})
	if err != nil {
		maint.close()
		return nil, err
	}
	l := &localTier[T]{
		maint:   maint,
		entries: entries,
		clock:   cfg.clock,
		ttlMs:   cfg.localTTL.Milliseconds(),
		stats:   stats,
		seed:    maphash.MakeSeed(),
	}
	if l.ttlMs < 1 {
		l.ttlMs = 1
	}
	if _, system := cfg.clock.(systemClock); system {
		// time.Now costs more than the whole map lookup; the hit path
		// reads an atomic that a ticker keeps current instead.
		l.coarse, l.slackMs = shared, coarseResolution.Milliseconds()
		if l.coarse == nil {
			l.coarse, l.ownClock = startCoarseClock(), true
		}
	}
	return l, nil
}

func (l *localTier[T]) now() int64 {
	if l.coarse != nil {
		return l.coarse.ms.Load()
	}
	return l.clock.Now().UnixMilli()
}

// get returns the local entry of key if it may be served, else nil. The
// entry is shared and immutable.
func (l *localTier[T]) get(key string) *localEntry[T] {
	if !l.up.Load() {
		l.stats.inc(evLocalBypass)
		return nil
	}
	le, ok := l.entries.GetIfPresent(key)
	if !ok || l.now() >= le.deadline {
		return nil
	}
	l.stats.inc(evLocalHit)
	if le.state == stateNegative {
		l.stats.inc(evNegativeHit)
	}
	return le
}

func (l *localTier[T]) stripeOf(key string) uint32 {
	return uint32(maphash.String(l.seed, key) % localStripes)
}

// begin takes a fill token for key. Call it before reading Redis.
func (l *localTier[T]) begin(key string) fillToken {
	if l == nil || !l.up.Load() {
		// Local hits are off (the bus is catching up or reconnecting): a
		// value stored now would be flushed or checked again before hits
		// come back, so storing it is wasted work.
		return fillToken{}
	}
	i := l.stripeOf(key)
	return fillToken{ok: true, stripe: i, epoch: l.epoch.Load(), seq: l.stripes[i].seq.Load(), startMs: l.now()}
}

// put stores what a fill read from Redis, unless an invalidation of key or
// a flush happened since tok was taken.
func (l *localTier[T]) put(key string, tok fillToken, e *entry[T]) {
	if !tok.ok {
		return
	}
	// The local TTL runs from before the Redis read, so the copy's age is
	// never understated; and a copy never outlives the value's freshness.
	deadline := min(tok.startMs+l.ttlMs-l.slackMs, e.hdr.FreshUntil)
	if deadline <= l.now() {
		return
	}
	le := &localEntry[T]{state: e.state, val: e.val, hdr: e.hdr, deadline: deadline}
	st := &l.stripes[tok.stripe]
	l.flushMu.RLock()
	st.mu.Lock()
	// A moved token means an invalidation or flush came after the Redis
	// read began: what was read may predate it.
	if l.epoch.Load() == tok.epoch && st.seq.Load() == tok.seq {
		l.entries.Set(key, le)
	}
	st.mu.Unlock()
	l.flushMu.RUnlock()
}

// invalidate drops keys: see localTier for why under the stripe's lock.
func (l *localTier[T]) invalidate(keys []string) {
	for _, k := range keys {
		st := &l.stripes[l.stripeOf(k)]
		st.mu.Lock()
		st.seq.Add(1)
		l.entries.Invalidate(k)
		st.mu.Unlock()
	}
}

// flush drops every entry.
func (l *localTier[T]) flush() {
	l.flushMu.Lock()
	l.epoch.Add(1)
	l.entries.InvalidateAll()
	l.flushMu.Unlock()
	l.stats.inc(evLocalFlush)
}

// The methods below serve cacheTier: the bus calls it for messages from
// other nodes and for its connection state.

func (l *localTier[T]) remoteInvalidate(keys []string) {
	l.invalidate(keys)
	// Counted once applied: a reader that sees the count sees the keys gone.
	l.stats.add(evInvalidationReceived, uint64(len(keys)))
}

func (l *localTier[T]) setUp(up bool) { l.up.Store(up) }

// close turns local hits off for good and frees the entries. The caller
// has detached the tier from its bus, so nothing turns them on again.
func (l *localTier[T]) close() {
	l.up.Store(false)
	l.flushMu.Lock()
	l.epoch.Add(1)
	l.entries.InvalidateAll()
	l.flushMu.Unlock()
	l.maint.close()
	if l.ownClock {
		l.coarse.close()
	}
}

// coarseResolution is how often a coarseClock reads the time.
const coarseResolution = time.Millisecond

// coarseClock is a Unix-millisecond clock that a goroutine updates every
// coarseResolution, so reading it costs an atomic load instead of a
// time.Now (about 50ns on the target machines, more than a local hit
// should cost in total). It counts from a wall-clock base with the
// monotonic clock, so it never goes back when the wall clock is stepped,
// and it lags the real time by about one resolution.
type coarseClock struct {
	ms   atomic.Int64
	stop chan struct{}
	done chan struct{}
}

func startCoarseClock() *coarseClock {
	c := &coarseClock{stop: make(chan struct{}), done: make(chan struct{})}
	base := time.Now()
	baseMs := base.UnixMilli()
	c.ms.Store(baseMs)
	go func() {
		defer close(c.done)
		t := time.NewTicker(coarseResolution)
		defer t.Stop()
		for {
			select {
			case <-c.stop:
				return
			case <-t.C:
				c.ms.Store(baseMs + time.Since(base).Milliseconds())
			}
		}
	}()
	return c
}

// close stops the goroutine and waits for it. Call it once.
func (c *coarseClock) close() {
	close(c.stop)
	<-c.done
}

// initTiers sets up the local tier and attaches the cache to its bus.
func (c *Cache[T]) initTiers() error {
	c.route = c.keys.namespace + ":" + c.keys.version
	c.bus = c.cfg.bus
	if c.cfg.localMax > 0 {
		var shared *coarseClock
		if c.bus != nil {
			shared = c.bus.clock
		}
		l, err := newLocalTier[T](&c.cfg, &c.rec, shared)
		if err != nil {
			return fmt.Errorf("%w: WithLocal: %v", ErrInvalidOption, err)
		}
		// Without a bus nothing else decides when hits are safe.
		l.up.Store(c.bus == nil)
		c.local = l
	}
	if c.bus != nil {
		if err := c.bus.attach(c.route, c.busTier()); err != nil {
			c.closeTiers()
			return err
		}
	}
	return nil
}

// busTier returns the cache as its bus sees it (made once: the bus tells
// its tiers apart by identity).
func (c *Cache[T]) busTier() busTier {
	if c.tier == nil {
		c.tier = &cacheTier[T]{c: c}
	}
	return c.tier
}

// cacheTier is a Cache as its bus sees it: news of writes made elsewhere
// drop keys from the local tier and detach the flights (reads and loads)
// that began before them, so that no Fetch that starts after the news
// joins one (see Cache.Fetch).
type cacheTier[T any] struct{ c *Cache[T] }

// invalidate is a write by another cache of the same namespace and
// version in this process.
func (t *cacheTier[T]) invalidate(keys []string) {
	if t.c.local != nil {
		t.c.local.invalidate(keys)
	}
	for _, k := range keys {
		t.c.flights.detach(k)
	}
}

// remoteInvalidate is a message from another node.
func (t *cacheTier[T]) remoteInvalidate(keys []string) {
	if t.c.local != nil {
		t.c.local.remoteInvalidate(keys)
	}
	for _, k := range keys {
		t.c.flights.detach(k)
	}
}

func (t *cacheTier[T]) flush() {
	if t.c.local != nil {
		t.c.local.flush()
	}
	t.c.flights.detachAll()
}

func (t *cacheTier[T]) setUp(up bool) {
	if t.c.local != nil {
		t.c.local.setUp(up)
	}
}

// invalidate drops keys from this process's local tiers and tells the
// other nodes, after a write or delete of them reached Redis.
func (c *Cache[T]) invalidate(keys ...string) {
	if c.local != nil {
		c.local.invalidate(keys)
	}
	if c.bus != nil {
		c.rec.add(evInvalidationSent, uint64(len(keys)))
		c.bus.publish(c.route, keys, c.busTier())
	}
}

// closeTiers detaches the cache from its bus and turns local hits off.
func (c *Cache[T]) closeTiers() {
	if c.bus != nil {
		c.bus.detach(c.route, c.busTier())
		if c.mig != nil {
			c.bus.unfollowPhase(c.mig)
		}
	}
	if c.local != nil {
		c.local.close()
	}
}

// maintenance runs the local tier's bookkeeping (otter's read-buffer drains:
// frequency sketch, LRU order, eviction) off the caller's goroutine, on one
// goroutine per tier that Close stops. otter asks for a drain after a batch
// of reads; run on the reader, it would roughly double a local hit's cost.
// submit never blocks (an executor must not): when the goroutine is busy
// or stopped, the task runs on the caller, which is correct, only slower.
type maintenance struct {
	mu     sync.Mutex
	closed bool
	tasks  chan func()
	done   chan struct{}
}

func startMaintenance() *maintenance {
	m := &maintenance{tasks: make(chan func(), 1), done: make(chan struct{})}
	go func() {
		defer close(m.done)
		for fn := range m.tasks {
			fn()
		}
	}()
	return m
}

func (m *maintenance) submit(fn func()) {
	m.mu.Lock()
	if !m.closed {
		select {
		case m.tasks <- fn:
			m.mu.Unlock()
			return
		default:
		}
	}
	m.mu.Unlock()
	fn()
}

// close stops the goroutine after it ran what was queued. Idempotent.
func (m *maintenance) close() {
	m.mu.Lock()
	if !m.closed {
		m.closed = true
		close(m.tasks)
	}
	m.mu.Unlock()
	<-m.done
}
