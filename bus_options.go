package layercache

import (
	"fmt"
	"log/slog"
	"time"
)

// BusOption configures a [Bus].
type BusOption func(*busConfig)

type busConfig struct {
	channel string
	stream  string // stream mode when not empty
	maxLen  int64
	secret  []byte
	logger  *slog.Logger
	errs    []error

	// catchUpHook, for tests, runs after each batch a stream reader
	// applies while catching up, before it decides whether it is current.
	catchUpHook func()
	// health is pubsubHealth; tests shorten it.
	health time.Duration
	// maxPending is maxPendingBytes; tests shorten it.
	maxPending int
}

func (c *busConfig) fail(format string, args ...any) {
	c.errs = append(c.errs, fmt.Errorf("%w: "+format, append([]any{ErrInvalidOption}, args...)...))
}

// DefaultBusChannel is the pub/sub channel a [Bus] uses unless
// [WithChannel] names another.
const DefaultBusChannel = "layercache:invalidation"

// WithChannel sets the pub/sub channel of the bus. Every node of a
// deployment must use the same one; unrelated deployments sharing a Redis
// use different ones. The default is [DefaultBusChannel]. On a Redis
// Cluster, PUBLISH reaches subscribers on every node.
func WithChannel(name string) BusOption {
	return func(c *busConfig) {
		if name == "" {
			c.fail("WithChannel(\"\"): give a channel name")
			return
		}
		c.channel = name
	}
}

// WithStream makes the bus durable: invalidations are appended to the Redis
// Stream at key name (XADD ... MAXLEN ~ maxLen) instead of published, and
// each node reads the stream from the last entry it saw. After a reconnect
// a node replays what it missed instead of flushing its local tiers; it
// flushes only if entries it had not read were trimmed away; and while it
// catches up on a backlog its local hits are off (reads go to Redis).
//
// maxLen must be positive and the same on every node: it bounds the
// stream's memory, and how long a node may be away and still replay rather
// than flush. Each node polls the stream with XREAD BLOCK; an idle node
// sends about five commands a second. On a Redis Cluster the stream lives
// in the slot of name, so one node carries all bus traffic.
func WithStream(name string, maxLen int64) BusOption {
	return func(c *busConfig) {
		if name == "" {
			c.fail("WithStream(\"\", %d): give the stream's key", maxLen)
			return
		}
		if maxLen <= 0 {
			c.fail("WithStream(%q, %d): maxLen must be positive", name, maxLen)
			return
		}
		c.stream, c.maxLen = name, maxLen
	}
}

// WithSecret authenticates bus messages with HMAC-SHA256 under secret, so
// that a client allowed to PUBLISH (or XADD) can neither forge nor replay
// invalidations or flushes. Every node must have the same secret of at
// least 16 bytes.
//
// The MAC covers each message's sending time and its sender's sequence
// number. Receivers drop, and count in [BusStats], messages without a
// valid MAC (Forged), messages sent more than [BusReplayWindow] before
// they arrived (Stale), and messages whose sequence number they have
// applied already (Replays). What a captured message can still do: be
// applied once more, within BusReplayWindow of its sending, by a node that
// had not heard from its sender (one started since, or one that had to
// forget it among more than 4096 senders heard from within the window).
//
// Rolling upgrades: nodes of releases before sequence numbers send
// messages in the older format. With a secret they are still applied
// within BusReplayWindow (their MAC covers the sending time, so they
// cannot be replayed later), though within it they can be replayed, having
// no sequence number. Those older nodes cannot read the new format: they
// flush their local tiers at each message from an upgraded node until they
// are upgraded too.
func WithSecret(secret []byte) BusOption {
	return func(c *busConfig) {
		if len(secret) < 16 {
			c.fail("WithSecret: the secret has %d bytes; use at least 16 random bytes", len(secret))
			return
		}
		c.secret = append([]byte(nil), secret...)
	}
}

// WithBusLogger sets where the bus logs connection losses, trimmed
// streams, forged messages and publish failures. The default is
// slog.Default().
func WithBusLogger(logger *slog.Logger) BusOption {
	return func(c *busConfig) {
		if logger == nil {
			c.fail("WithBusLogger(nil): pass a *slog.Logger")
			return
		}
		c.logger = logger
	}
}

// WithInvalidation attaches the cache to bus: its Set and Delete publish
// invalidations of the keys, and messages from other nodes drop keys from
// its local tier ([WithLocal]). A cache without a local tier only publishes.
// Caches are routed by namespace and version, so any number may share a
// bus. Attaching does no I/O.
//
// The bus also carries what the process's caches hear from other nodes
// besides invalidations: migration phase announcements ([Bus.SetPhase]),
// and, for caches built on the bus's own client with [WithLocks], lease
// fill notices, so that a process keeps one notice subscription for all
// its caches rather than one per cache.
func WithInvalidation(bus *Bus) Option {
	return func(c *config) {
		if bus == nil {
			c.fail("WithInvalidation(nil): pass a *Bus from NewBus")
			return
		}
		c.bus = bus
	}
}
