package layercache

import (
	"fmt"
	"log/slog"
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
// [Raw] passes []byte and string values through unchanged.
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
