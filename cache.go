package layercache

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime/debug"
	"sync"
	"time"

	"github.com/layercache/layercache/internal/envelope"
	"github.com/redis/go-redis/v9"
)

// Cache is a typed read-through cache over Redis for values of type T.
// One Cache serves one namespace; it is safe for concurrent use and must be
// closed with [Cache.Close] when no longer needed.
//
// A Cache with no options is a correct cache-aside cache: JSON values at
// layercache:v1:{key}, fresh for 10 minutes, loads coalesced per key within
// the process, "not found" remembered for 10 seconds.
type Cache[T any] struct {
	cfg    config
	client redis.UniversalClient
	keys   keyspace
	store  store
	log    *slog.Logger

	flights flightGroup[T]
	rec     recorder

	notices       *noticeHub // lease notices; nil without WithLocks
	sharedNotices bool       // notices belongs to the bus, which closes it
	refresh       refresher  // background refreshes and fail-safe backoff

	// local is the in-process tier (WithLocal) and bus the invalidation
	// bus (WithInvalidation); either may be nil. route names this cache on
	// the bus.
	local *localTier[T]
	bus   *Bus
	route string
	tier  busTier // the cache as its bus sees it

	// Throttled logs of events that, when they happen, happen to every
	// request: a Redis outage, a keyspace full of undecodable values.
	logReadFailed, logWriteFailed, logDecodeFailed throttledLog

	// Versions, layouts and migration (versioning.go, layout.go,
	// dualread.go).
	vals   *validation[T] // nil without WithValidator
	writes *writeClock
	mig    *migration     // nil unless WithMigration
	bg     sync.WaitGroup // background goroutines; Close waits for them
	logBg  throttledLog   // background work: sweeps, upgrades, refreshes

	closeCtx  context.Context // cancelled by Close; stops detached loads
	closeFn   context.CancelFunc
	closeOnce sync.Once
}

// New returns a Cache of T values kept in Redis through client, which may be
// a *redis.Client, *redis.ClusterClient, *redis.Ring or failover client.
// New does no I/O. It returns an error wrapping [ErrInvalidOption] if an
// option is invalid.
func New[T any](client redis.UniversalClient, opts ...Option) (*Cache[T], error) {
	if nilClient(client) {
		return nil, fmt.Errorf("%w: New needs a redis.UniversalClient, got %s", ErrInvalidOption, describeNil(client))
	}
	cfg := defaultConfig()
	for _, opt := range opts {
		if opt == nil {
			cfg.fail("nil Option passed to New")
			continue
		}
		opt(&cfg)
	}
	cfg.checkStampede()
	if cfg.codec == PassThrough && !rawCodecCompatible(new(T)) {
		var zero T
		cfg.fail("WithCodec(PassThrough) needs T to be []byte or string, not %T", zero)
	}
	vals, upgrades := resolveVersioning[T](&cfg)
	if len(cfg.errs) > 0 {
		return nil, errors.Join(cfg.errs...)
	}
	if cfg.logger == nil {
		cfg.logger = slog.Default()
	}
	c := &Cache[T]{
		cfg:    cfg,
		client: client,
		keys:   newKeyspace(cfg.namespace, cfg.version),
		vals:   vals,
		writes: newWriteClock(),
	}
	c.log = cfg.logger.With("cache", cfg.namespace+":"+cfg.version)
	c.closeCtx, c.closeFn = context.WithCancel(context.Background())
	if err := c.initTiers(); err != nil {
		return nil, err
	}
	// Last: it starts background work (phase follower, sweeps) and cannot
	// fail, so a failed New leaves nothing running.
	c.store = c.buildStore(upgrades)
	if c.mig != nil && c.bus != nil {
		c.bus.followPhase(c.mig) // Bus.SetPhase reaches this cache at once
	}
	if cfg.lockTTL > 0 {
		if c.bus != nil && sameClient(c.bus.client, client) {
			// One notice subscription per process, through the bus. Only
			// on the bus's own client: another client may be another
			// deployment, or differ in sharded versus plain pub/sub.
			c.notices, c.sharedNotices = c.bus.leaseNotices(), true
		} else {
			c.notices = newNoticeHub(c.closeCtx, client, c.log)
		}
	}
	return c, nil
}

// entryState is what a read found.
type entryState uint8

const (
	stateMiss     entryState = iota // absent, expired or undecodable
	stateFresh                      // a value within its fresh TTL
	stateNegative                   // a fresh cached "not found"
	stateStale                      // past its fresh TTL, within the WithStaleWhileRevalidate grace
)

// entry is one decoded read.
type entry[T any] struct {
	state entryState
	val   T
	hdr   envelope.Header
	now   int64 // Unix ms at which state was judged
}

// Fetch returns the value of key, calling load on a miss and caching what it
// returns. Concurrent Fetches of one key in this process share one Redis
// read and, on a miss, one load; the load runs detached from ctx (bounded
// by [WithLoadTimeout]), so a caller that gives up returns ctx.Err()
// without failing the others. A value this process loads enters its local
// tier ([WithLocal]) at once.
//
// A load returning an error wrapping [ErrNotFound] is cached as a negative
// entry (see [WithNegativeTTL]) and returned as is. Other load errors are
// returned and nothing is cached. A Redis failure never fails a Fetch: the
// value is loaded and returned, and the failure counted and logged.
//
// A Fetch that starts after a write's invalidation reached this process (a
// Set or Delete made here, a message on the [WithInvalidation] bus, or,
// with [WithLocks], the lease that write broke) never joins a read or load
// that began before it. Without a bus or leases, news of a write made by
// another process reaches this one only through Redis: a Fetch may join a
// load that was running when the write happened, and return its value,
// for as long as that load runs (at most [WithLoadTimeout]).
func (c *Cache[T]) Fetch(ctx context.Context, key string, load func(ctx context.Context) (T, error)) (T, error) {
	var zero T
	if load == nil {
		return zero, fmt.Errorf("%w: Fetch(%q) needs a load function", ErrInvalidOption, key)
	}
	if err := checkKey(key); err != nil {
		return zero, err
	}
	if c.local != nil {
		if le := c.local.get(key); le != nil {
			if le.state == stateNegative {
				return zero, ErrNotFound
			}
			return le.val, nil
		}
	}
	return c.fetch(ctx, key, load)
}

// fetch is Fetch past the local tier. The first caller of a key leads a
// flight: it reads Redis itself (no goroutine hop on a hit) and, on a
// miss, starts the shared load; callers arriving meanwhile wait for the
// flight instead of reading Redis again, so a cold stampede costs one GET
// and one load per process.
func (c *Cache[T]) fetch(ctx context.Context, key string, load func(context.Context) (T, error)) (T, error) {
	var zero T
	f, done, leader, ok := c.flights.join(key)
	if !ok {
		return zero, ErrClosed
	}
	if !leader {
		c.rec.inc(evCoalesced)
		return c.await(ctx, f, done)
	}
	f.tok = c.local.begin(key) // before the Redis read: see localTier
	e, err := c.read(ctx, key, f.tok)
	if err != nil && ctx.Err() != nil && c.flights.abandon(key, f) {
		return zero, ctx.Err()
	}
	switch e.state {
	case stateFresh:
		f.val = e.val
		c.flights.finish(key, f)
		if c.cfg.earlyBeta > 0 {
			c.maybeRefreshEarly(ctx, key, &e, load) // refresh.go
		}
		return e.val, nil
	case stateNegative:
		f.err = ErrNotFound
		c.flights.finish(key, f)
		return zero, ErrNotFound
	case stateStale:
		f.val = e.val
		c.flights.finish(key, f)
		c.serveStale(ctx, key, e.now, load) // refresh.go
		return e.val, nil
	}
	// A miss (or a failed read: load anyway). The load outlives this
	// caller if it gives up (see detach).
	done = c.flights.wait(f) // before the load can finish
	go c.runLoad(ctx, key, f, load)
	return c.await(ctx, f, done)
}

// await waits for f's result (done closed), or for ctx, whichever comes
// first.
func (c *Cache[T]) await(ctx context.Context, f *flight[T], done <-chan struct{}) (T, error) {
	select {
	case <-done:
		return f.val, f.err
	case <-ctx.Done():
		var zero T
		return zero, ctx.Err()
	}
}

// Get returns the cached value of key without loading. It returns an error
// wrapping [ErrNotFound] when the key is absent, expired, cached as not
// found, or holds a value that does not decode; and the Redis error (wrapped)
// when Redis cannot be read.
func (c *Cache[T]) Get(ctx context.Context, key string) (T, error) {
	var zero T
	if err := checkKey(key); err != nil {
		return zero, err
	}
	if c.local != nil {
		if le := c.local.get(key); le != nil {
			if le.state == stateNegative {
				return zero, fmt.Errorf("%w: %q", ErrNotFound, key)
			}
			return le.val, nil
		}
	}
	e, err := c.read(ctx, key, c.local.begin(key))
	if err != nil {
		return zero, fmt.Errorf("layercache: get %q: %w", key, err)
	}
	switch e.state {
	case stateFresh:
		return e.val, nil
	case stateStale:
		c.rec.inc(evMiss)
	}
	return zero, fmt.Errorf("%w: %q", ErrNotFound, key)
}

// Stats returns a snapshot of the cache's counters.
func (c *Cache[T]) Stats() Stats {
	var st Stats
	c.rec.snapshotInto(&st, ofCache)
	st.Migration = c.mig.snapshot()
	return st
}

// Close stops the cache: running loads are cancelled and waited for, and
// later Fetches that need a load fail with [ErrClosed]. It does not close
// the Redis client, which the caller owns. Close is idempotent.
func (c *Cache[T]) Close() error {
	c.closeOnce.Do(func() {
		c.closeFn()
		c.flights.close()
		c.refresh.close()
		if c.notices != nil && !c.sharedNotices {
			c.notices.close()
		}
		c.closeTiers()
		c.bg.Wait()
	})
	return nil
}

// read fetches and decodes key from Redis, and keeps a fresh value (or "not
// found") in the local tier unless an invalidation came since tok was
// taken (before the read: see localTier). An error is a Redis failure;
// everything else (absent, expired, corrupt) is a miss with a nil error.
// Callers look in the local tier first.
func (c *Cache[T]) read(ctx context.Context, key string, tok fillToken) (entry[T], error) {
	var e entry[T]
	raw, err := c.store.get(ctx, key)
	if err != nil {
		if ctx.Err() == nil {
			c.rec.inc(evRedisError)
			c.logReadFailed.log(ctx, c.log, slog.LevelWarn, "layercache: redis read failed; loading instead",
				slog.String("key", key), slog.Any("err", err))
		}
		c.rec.inc(evMiss)
		return e, err
	}
	if raw == nil {
		c.rec.inc(evMiss)
		return e, nil
	}
	e = c.decode(ctx, key, raw, c.nowMillis())
	switch e.state {
	case stateFresh:
		c.rec.inc(evRedisHit)
		c.local.put(key, tok, &e)
	case stateNegative:
		c.rec.inc(evNegativeHit)
		c.local.put(key, tok, &e)
	case stateMiss:
		c.rec.inc(evMiss)
	case stateStale:
		// Counted by the caller: served by Fetch, a miss for Get.
	}
	return e, nil
}

// decode judges an envelope read from Redis at now. It counts decode
// failures, nothing else.
func (c *Cache[T]) decode(ctx context.Context, key string, raw []byte, now int64) entry[T] {
	e := entry[T]{now: now}
	hdr, payload, err := envelope.Decode(raw)
	if err != nil {
		c.decodeFailed(ctx, key, err)
		return e
	}
	e.hdr = hdr
	state := stateFresh
	if now >= hdr.FreshUntil {
		if c.cfg.grace == 0 || hdr.Negative() || now >= hdr.ExpiresAt {
			return e
		}
		state = stateStale
	}
	if hdr.Negative() {
		e.state = stateNegative
		return e
	}
	// Only val goes to the codec: the codec is an interface, so what it
	// gets a pointer to escapes to the heap, and the whole entry need not.
	var val T
	if err := c.cfg.codec.Unmarshal(payload, &val); err != nil {
		c.decodeFailed(ctx, key, err)
		return e
	}
	if !c.valid(ctx, key, val) { // versioning.go; counted there
		return entry[T]{now: now}
	}
	e.val, e.state = val, state
	return e
}

func (c *Cache[T]) decodeFailed(ctx context.Context, key string, err error) {
	c.rec.inc(evDecodeError)
	c.logDecodeFailed.log(ctx, c.log, slog.LevelWarn, "layercache: cached value does not decode; treating it as a miss",
		slog.String("key", key), slog.Any("err", err))
}

// runLoad is the body of a shared load, on its own goroutine. The value
// is written to Redis before waiters are released, so a caller that got it
// from Fetch reads it back with Get (read-your-writes within the process),
// and the flight leaves the group before they are released, so no later
// caller can join a finished flight and get a value that may since have
// expired.
func (c *Cache[T]) runLoad(ctx context.Context, key string, f *flight[T], load func(context.Context) (T, error)) {
	returned := false
	defer func() {
		if !returned {
			// The loader called runtime.Goexit (t.FailNow in a test, say):
			// its callers must not take the zero value for a success.
			var zero T
			f.val, f.err = zero, ErrLoaderGoexit
			c.rec.inc(evLoadError)
		}
		// finish takes the flight out of the group, then releases its
		// callers.
		c.flights.finish(key, f)
	}()
	ctx, cancel := c.detach(ctx)
	defer cancel()
	c.loadFlight(ctx, key, f, load)
	returned = true
}

// loadFlight loads f's value and caches it.
func (c *Cache[T]) loadFlight(ctx context.Context, key string, f *flight[T], load func(context.Context) (T, error)) {
	if c.cfg.lockTTL > 0 {
		// One load per key across processes: lease.go.
		f.val, f.err = c.loadLeased(ctx, key, load, f)
		return
	}
	var took time.Duration
	f.val, took, f.err = c.timedLoad(ctx, key, load)
	if !c.cacheable(f.err) {
		return
	}
	// Held until the value is in Redis: see flight.fill. Without leases
	// this is what keeps a fill from landing after a Set or Delete made in
	// this process; across processes only WithLocks' token fences it.
	f.fill.Lock()
	defer f.fill.Unlock()
	if f.stale.Load() {
		// A write or invalidation overtook this load; its value may be
		// older.
		c.rec.inc(evSkippedWrite)
		return
	}
	hdr, err := c.write(ctx, key, f.val, took, f.err != nil, writeOpts{})
	if err != nil {
		if !errors.Is(err, ErrValueTooLarge) && ctx.Err() == nil {
			c.logWriteFailed.log(ctx, c.log, slog.LevelWarn, "layercache: caching a loaded value failed",
				slog.String("key", key), slog.Any("err", err))
		}
		return
	}
	c.keepLoaded(key, f.tok, f.val, hdr)
}

// keepLoaded puts a value this process loaded and wrote, with the header
// it was written with, in the local tier, unless an invalidation came
// since tok was taken.
func (c *Cache[T]) keepLoaded(key string, tok fillToken, val T, hdr envelope.Header) {
	if c.local == nil {
		return
	}
	e := entry[T]{state: stateFresh, val: val, hdr: hdr}
	if hdr.Negative() {
		var zero T
		e.state, e.val = stateNegative, zero
	}
	c.local.put(key, tok, &e)
}

// detach returns a context for work that outlives its caller (a shared
// load, a background refresh): it keeps ctx's values (trace context) but
// not its cancellation, and Close cancels it.
func (c *Cache[T]) detach(ctx context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	stop := context.AfterFunc(c.closeCtx, cancel)
	return ctx, func() { stop(); cancel() }
}

// timedLoad calls load bounded by the load timeout and measures it.
func (c *Cache[T]) timedLoad(ctx context.Context, key string, load func(context.Context) (T, error)) (T, time.Duration, error) {
	ctx, cancel := context.WithTimeout(ctx, c.cfg.loadTimeout)
	defer cancel()
	start := time.Now()
	val, err := c.callLoader(ctx, key, load)
	return val, time.Since(start), err
}

// cacheable reports whether a load's outcome is cached: a value, or a "not
// found" while negative caching is on.
func (c *Cache[T]) cacheable(err error) bool {
	return err == nil || errors.Is(err, ErrNotFound) && c.cfg.negativeTTL > 0
}

// callLoader calls load, turning a panic into a *PanicError.
func (c *Cache[T]) callLoader(ctx context.Context, key string, load func(context.Context) (T, error)) (val T, err error) {
	c.rec.inc(evLoad)
	defer func() {
		if r := recover(); r != nil {
			c.rec.inc(evLoadPanic)
			c.rec.inc(evLoadError)
			pe := &PanicError{Value: r, Stack: debug.Stack()}
			c.log.LogAttrs(ctx, slog.LevelError, "layercache: loader panicked",
				slog.String("key", key), slog.Any("panic", r), slog.String("stack", string(pe.Stack)))
			var zero T
			val, err = zero, pe
		}
	}()
	val, err = load(ctx)
	if err != nil && !errors.Is(err, ErrNotFound) {
		c.rec.inc(evLoadError)
	}
	return val, err
}

func (c *Cache[T]) nowMillis() int64 { return c.cfg.clock.Now().UnixMilli() }

// sameClient reports whether a and b are one client. Interface comparison
// panics on uncomparable dynamic types (a user's wrapper struct holding a
// slice, say); such clients are simply not the same.
func sameClient(a, b redis.UniversalClient) (same bool) {
	defer func() {
		if recover() != nil {
			same = false
		}
	}()
	return a == b
}
