package layercache

import (
	"fmt"
	"log/slog"
	"math"
	"time"
)

// Option configures a [Cache]. Options are applied in order by [New]; a bad
// value makes New return an error wrapping [ErrInvalidOption], never a panic.
type Option func(*config)

// Defaults of a Cache built with no options.
const (
	DefaultNamespace   = "layercache"
	DefaultVersion     = "v1"
	DefaultTTL         = 10 * time.Minute
	DefaultNegativeTTL = 10 * time.Second
	DefaultLoadTimeout = 10 * time.Second
)

type config struct {
	namespace   string
	version     string
	ttl         time.Duration
	jitter      float64
	codec       Codec
	negativeTTL time.Duration
	maxValue    int
	loadTimeout time.Duration
	logger      *slog.Logger
	clock       Clock
	localMax    int           // WithLocal; 0: no local tier
	localTTL    time.Duration // WithLocal
	bus         *Bus          // WithInvalidation

	// Stampede protection (lease.go, refresh.go); zero means off.
	lockTTL      time.Duration // WithLocks: lease lifetime
	lockWait     time.Duration // WithLocks: longest wait for another holder
	earlyBeta    float64       // WithEarlyRefresh: XFetch's beta
	grace        time.Duration // WithStaleWhileRevalidate: stale window
	failSafeWait time.Duration // WithFailSafe: backoff after a failed refresh

	// Schema versions (versioning.go). Typed hooks are kept as any and
	// checked against the cache's T in New.
	upgrades        []upgradeOption
	validators      []validatorOption
	versionFromType bool

	// Layouts and migration (layout.go, dualread.go).
	layout     *Layout
	migration  *migrationOption
	phasePoll  time.Duration // how often a migrating cache re-reads its phase
	sweepEvery time.Duration // how often Hash layouts sweep expired fields

	errs []error
}

func defaultConfig() config {
	return config{
		namespace:   DefaultNamespace,
		version:     DefaultVersion,
		ttl:         DefaultTTL,
		codec:       JSON,
		negativeTTL: DefaultNegativeTTL,
		loadTimeout: DefaultLoadTimeout,
		clock:       systemClock{},
		phasePoll:   defaultPhasePoll,
		sweepEvery:  defaultSweepEvery,
	}
}

func (c *config) fail(format string, args ...any) {
	c.errs = append(c.errs, fmt.Errorf("%w: "+format, append([]any{ErrInvalidOption}, args...)...))
}

// WithNamespace sets the first part of every key, namespace:version:{key}.
// Caches of different value types must use different namespaces. It takes
// 1 to 128 letters, digits and _ - . / @. The default is "layercache".
func WithNamespace(namespace string) Option {
	return func(c *config) {
		if err := checkName("WithNamespace", namespace); err != nil {
			c.errs = append(c.errs, err)
			return
		}
		c.namespace = namespace
	}
}

// WithVersion sets the schema version in every key, namespace:version:{key}.
// Changing it moves the cache to a new keyspace: a cache at "v2" never reads
// values written at "v1". Same character rules as [WithNamespace]; the
// default is "v1".
func WithVersion(version string) Option {
	return func(c *config) {
		if err := checkName("WithVersion", version); err != nil {
			c.errs = append(c.errs, err)
			return
		}
		c.version = version
	}
}

// WithTTL sets how long a value stays fresh after it is written. It must be
// positive; the default is 10 minutes.
func WithTTL(ttl time.Duration) Option {
	return func(c *config) {
		if ttl <= 0 {
			c.fail("WithTTL(%v): the TTL must be positive", ttl)
			return
		}
		c.ttl = ttl
	}
}

// WithTTLJitter spreads expiries: each write's TTL is multiplied by a random
// factor in [1-fraction, 1+fraction], so values written together do not all
// expire together. fraction is in [0, 0.5]; the default is 0.
func WithTTLJitter(fraction float64) Option {
	return func(c *config) {
		if !(fraction >= 0 && fraction <= 0.5) {
			c.fail("WithTTLJitter(%v): the fraction must be in [0, 0.5]", fraction)
			return
		}
		c.jitter = fraction
	}
}

// WithCodec sets how values are encoded in Redis. The default is [JSON];
// [PassThrough] passes []byte and string values through unchanged.
func WithCodec(codec Codec) Option {
	return func(c *config) {
		if codec == nil {
			c.fail("WithCodec(nil): give a Codec such as layercache.JSON")
			return
		}
		c.codec = codec
	}
}

// WithNegativeTTL sets how long a loader's [ErrNotFound] is remembered, so
// that lookups of absent records do not reach the source each time. Zero
// turns negative caching off; negative values are an error. The default is
// 10 seconds.
func WithNegativeTTL(ttl time.Duration) Option {
	return func(c *config) {
		if ttl < 0 {
			c.fail("WithNegativeTTL(%v): use 0 to disable, or a positive TTL", ttl)
			return
		}
		c.negativeTTL = ttl
	}
}

// WithMaxValueSize bounds the encoded size of a cached value, in bytes.
// Larger values are not cached ([ErrValueTooLarge] from Set; Fetch still
// returns them). Zero, the default, means no limit.
func WithMaxValueSize(bytes int) Option {
	return func(c *config) {
		if bytes < 0 {
			c.fail("WithMaxValueSize(%d): use 0 for no limit, or a positive size", bytes)
			return
		}
		c.maxValue = bytes
	}
}

// WithLoadTimeout bounds a shared load. The load runs detached from its
// callers' contexts (one caller giving up never fails the others), so this
// is what stops a hung source. It must be positive; the default is 10s.
func WithLoadTimeout(d time.Duration) Option {
	return func(c *config) {
		if d <= 0 {
			c.fail("WithLoadTimeout(%v): the timeout must be positive", d)
			return
		}
		c.loadTimeout = d
	}
}

// WithLogger sets where the cache logs events (decode failures, Redis
// errors, panics). The default is slog.Default().
func WithLogger(logger *slog.Logger) Option {
	return func(c *config) {
		if logger == nil {
			c.fail("WithLogger(nil): pass a *slog.Logger, e.g. slog.New(slog.DiscardHandler) for none")
			return
		}
		c.logger = logger
	}
}

// WithClock sets the clock used for expiry decisions. Tests pass a
// [ManualClock]; production code leaves the default, the system clock.
func WithClock(clock Clock) Option {
	return func(c *config) {
		if clock == nil {
			c.fail("WithClock(nil): pass a Clock")
			return
		}
		c.clock = clock
	}
}

// WithLocks makes concurrent misses of a key cost one load across every
// process that shares the Redis, instead of one per process.
//
// On a miss, the process takes the key's lease, a random token stored with
// SET NX PX at namespace:version:{key}:lease for ttl. The holder loads,
// renews the lease while the load runs, and caches the value with a script
// that writes only if its token still holds the lease; the script releases
// the lease and publishes a notice. Other processes wait for that notice
// (one shared subscription per Cache, or per process for the caches
// attached with [WithInvalidation] to a Bus on the same client; sharded
// pub/sub on a Redis Cluster)
// and read the value; they poll only as a fallback, when the subscription
// is not yet confirmed or at the moment the holder's lease would run out.
//
// A holder that dies stops renewing: its lease expires within ttl and the
// next waiter takes over. A waiter that has waited wait loads by itself
// (its value is returned but not cached; see [Stats].LeaseWaitTimeouts).
// A holder that lost its lease, because it expired or because [Cache.Set]
// or [Cache.Delete] broke it, never caches its value, but its callers still
// get it: a load that started before a write is never cached after it.
//
// A miss costs one more round trip (the lease script) and a waiter a few;
// hits cost nothing more. [Cache.Set] writes and breaks the lease in one
// script. ttl must be at least 10ms and well above a Redis round trip; it
// bounds how long waiters stall behind a crashed holder. wait must be
// positive; it bounds how long a caller waits for another process's load.
func WithLocks(ttl, wait time.Duration) Option {
	return func(c *config) {
		if ttl < 10*time.Millisecond {
			c.fail("WithLocks(%v, %v): the lease TTL must be at least 10ms", ttl, wait)
			return
		}
		if wait <= 0 {
			c.fail("WithLocks(%v, %v): the wait must be positive", ttl, wait)
			return
		}
		c.lockTTL, c.lockWait = ttl, wait
	}
}

// WithEarlyRefresh refreshes hot values before they expire, with the XFetch
// rule (Vattani et al., VLDB 2015): a Fetch that hits a fresh value
// refreshes it in the background when
//
//	now - delta*beta*ln(rand()) >= fresh-until
//
// where delta is how long the value took to load (kept in its envelope).
// Slow-to-load and often-read values are refreshed earlier; refreshes of
// values read together spread out instead of all happening at expiry.
// Values written by [Cache.Set] have no load time and are not refreshed
// early.
//
// The refresh never blocks a caller. It runs under the key's lease (see
// [WithLocks]; without that option the lease lives 5s and is renewed), so
// only one process refreshes a key at a time; a process that cannot take
// the lease skips the refresh. beta must be positive and finite: 1 is the
// usual choice, larger values refresh earlier.
func WithEarlyRefresh(beta float64) Option {
	return func(c *config) {
		if !(beta > 0 && beta <= math.MaxFloat64) {
			c.fail("WithEarlyRefresh(%v): beta must be positive and finite; 1 is typical", beta)
			return
		}
		c.earlyBeta = beta
	}
}

// WithStaleWhileRevalidate keeps values for grace after they stop being
// fresh (the physical Redis TTL is the fresh TTL plus grace). A Fetch that
// finds a stale value within the grace returns it at once and refreshes it
// in the background; one refresh per key runs at a time across processes
// (under the key's lease, as with [WithEarlyRefresh]). A value may thus be
// served up to grace after its TTL, plus the time one refresh takes.
// [Cache.Get] still treats stale values as absent. Cached "not found"
// entries get no grace. grace must be positive.
func WithStaleWhileRevalidate(grace time.Duration) Option {
	return func(c *config) {
		if grace <= 0 {
			c.fail("WithStaleWhileRevalidate(%v): the grace must be positive", grace)
			return
		}
		c.grace = grace
	}
}

// WithFailSafe protects a failing source: when a background refresh of a
// stale value fails, the stale value keeps being served (until its grace
// ends) and no refresh of that key starts in this process for backoff, so
// a failing database sees at most one load per key per backoff from each
// process. Such reads are counted in [Stats].FailSafeHits and the failure
// is logged. It needs stale values to fall back on: use it with
// [WithStaleWhileRevalidate]. backoff must be positive.
func WithFailSafe(backoff time.Duration) Option {
	return func(c *config) {
		if backoff <= 0 {
			c.fail("WithFailSafe(%v): the backoff must be positive", backoff)
			return
		}
		c.failSafeWait = backoff
	}
}
