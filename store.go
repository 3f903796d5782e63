package layercache

import (
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"time"

	"github.com/redis/go-redis/v9"
)

// store is where a cache keeps its envelopes in Redis. A Layout makes one;
// a migration wraps two. Methods take user keys (already validated) and
// envelope bytes; a store that keeps another format (Raw) converts at its
// edge, so the read path above it only ever sees envelopes.
type store interface {
	// get returns the envelope stored for key, or (nil, nil) when absent.
	get(ctx context.Context, key string) ([]byte, error)
	// set stores env for key as a new write; ttl is the physical lifetime
	// (fresh + grace). It replaces what the key holds; the write version
	// stored is env's, or one past the key's current version if that is
	// not older (writeFresh in layout.go), so versions of one key grow in
	// the order writes land.
	set(ctx context.Context, key string, env []byte, ttl time.Duration) error
	// del removes the values of keys and anything tied to them (leases).
	// Keys may fall in different Cluster slots.
	del(ctx context.Context, keys []string) error

	// Leases (lease.go). A lease is a random token at the key's lease key,
	// namespace:version:{key}:lease; every write made under it checks the
	// token in the same script (fencing), and value, lease and notice
	// channel share the key's Cluster slot.

	// acquireLease takes key's lease for token, for ttl, if nobody holds
	// it. With read, it also returns key's envelope, read in the same step.
	acquireLease(ctx context.Context, key, token string, ttl time.Duration, read bool) (leaseAttempt, error)
	// renewLease extends key's lease to ttl if token still holds it, and
	// reports whether it did.
	renewLease(ctx context.Context, key, token string, ttl time.Duration) (bool, error)
	// fillLeased stores env as set does if token still holds key's lease,
	// releases the lease and publishes a notice; it reports whether env
	// was stored. When the lease is free (a write broke it), it still
	// publishes a notice so that waiters look again.
	fillLeased(ctx context.Context, key, token string, env []byte, ttl time.Duration) (bool, error)
	// releaseLease drops key's lease if token holds it and publishes a
	// notice.
	releaseLease(ctx context.Context, key, token string) error
	// setBreakingLease stores env as set does and drops key's lease,
	// whoever holds it, so that a fill that started before this write
	// cannot land after it.
	setBreakingLease(ctx context.Context, key string, env []byte, ttl time.Duration) error
	// noticeChannel is the pub/sub channel of key's notices; it hashes to
	// key's slot.
	noticeChannel(key string) string
}

// leaseAttempt is what acquireLease found.
type leaseAttempt struct {
	env      []byte        // key's envelope when asked for and present
	acquired bool          // the caller's token now holds the lease
	heldFor  time.Duration // when not acquired: the holder's remaining lease time
}

// writeMode says how a layout store applies a write.
type writeMode uint8

const (
	// writeFresh is a new value (Set, a fill): it replaces what is there,
	// and the stored write version is the proposal or, if the entry
	// already holds a version at or past it, that version's counter plus
	// one (see bumpVersion). Writes to one entry thus get increasing
	// versions in the order Redis applies them, whatever the writers'
	// clocks say.
	writeFresh writeMode = iota
	// writeCopy is set-if-newer: a copy of a value that already has its
	// version (the second side of a dual write, a backfill, an upgrade).
	// It is applied only if the entry holds no version at or past it, so
	// a retried or reordered copy never makes an entry older.
	writeCopy
)

// record is one entry as read by a batch read: the envelope the read path
// would see (synthesised for Raw) and the bytes actually stored, which a
// compare-and-set repair must find unchanged.
type record struct {
	env    []byte // nil when absent
	native []byte // nil when absent
	found  bool   // native is present (even if env could not be made)
}

// casOp is one compare-and-set of a repair: if the entry still holds
// expect, replace it by env (or delete it when env is nil).
type casOp struct {
	key    string
	expect record
	env    []byte
	ttl    time.Duration
}

// layoutStore is a store made by a Layout. Beyond the read path's store,
// it offers what dual writes, reconciliation and the sweep need.
//
// Every layoutStore keeps a key's lease and notice channel in its value's
// slot (see layout_lease.go), so a script may check the lease and write
// the value together.
type layoutStore interface {
	store
	layout() Layout
	// write applies env for key in the given mode and returns the write
	// version stored, or written=false when a copy was not newer.
	write(ctx context.Context, key string, env []byte, ttl time.Duration, mode writeMode) (version uint64, written bool, err error)
	// readMany reads keys in one round trip per node.
	readMany(ctx context.Context, keys []string) ([]record, error)
	// exists reports, in one round trip per node, which keys have a
	// stored value (found, in readMany's terms).
	exists(ctx context.Context, keys []string) ([]bool, error)
	// casMany applies compare-and-set repairs, reporting which applied.
	casMany(ctx context.Context, ops []casOp) ([]bool, error)
	// version returns the write version key holds (0 if none). It may
	// overstate it (a stale Raw stamp), never understate it.
	version(ctx context.Context, key string) (uint64, error)
	// take deletes key's value and returns the write version it held:
	// the invalidation of the side a single-side phase does not write.
	take(ctx context.Context, key string) (uint64, error)

	// fillVersioned is fillLeased, also returning the version stored.
	fillVersioned(ctx context.Context, key, token string, env []byte, ttl time.Duration) (uint64, bool, error)
	// overwrite is setBreakingLease, returning the version stored.
	overwrite(ctx context.Context, key string, env []byte, ttl time.Duration) (uint64, error)
	// breakLease drops key's lease, whoever holds it, with a notice.
	breakLease(ctx context.Context, key string) error

	// Copy fences (scripts.Arm, layout_lease.go): a copy into this store
	// of a value read elsewhere is written only if the fence armed before
	// that read still holds its token, so a Delete in between voids it.

	// arm adds token to key's copy fence.
	arm(ctx context.Context, key, token string) error
	// armVersion arms key's copy fence, then reads key's version (as
	// version does), in one round trip.
	armVersion(ctx context.Context, key, token string) (uint64, error)
	// copyFenced is write in writeCopy mode, applied only if token is
	// still in key's copy fence (and taking it out).
	copyFenced(ctx context.Context, key, token string, env []byte, ttl time.Duration) (uint64, bool, error)
}

// newLayoutStore returns the store of l for a cache's keyspace.
func newLayoutStore(client redis.UniversalClient, keys keyspace, l Layout, now func() int64, ttl time.Duration) layoutStore {
	switch l.kind {
	case kindHash:
		return newHashStore(client, keys, l, now)
	case kindRaw:
		return &rawStore{client: client, l: l, now: now, ttl: ttl}
	}
	return &keyPerEntryStore{client: client, keys: keys}
}

const defaultSweepEvery = 30 * time.Second

// buildStore makes the cache's store from its layout or migration, wraps
// it for upgrade on read, and starts the background work (phase follower,
// Hash sweeps), which Close stops and waits for. It runs at the end of
// New, after every option has been checked.
func (c *Cache[T]) buildStore(upgrades []upgradeOption) store {
	build := func(keys keyspace) store {
		switch {
		case c.cfg.migration != nil:
			m := c.cfg.migration
			if c.mig == nil {
				c.mig = newMigration(m.name, c.client, c.cfg.phasePoll, c.log)
			}
			return &dualStore{mig: c.mig, now: c.nowMillis, sides: [2]layoutStore{
				newLayoutStore(c.client, keys, m.from, c.nowMillis, c.cfg.ttl),
				newLayoutStore(c.client, keys, m.to, c.nowMillis, c.cfg.ttl),
			}}
		case c.cfg.layout != nil:
			return newLayoutStore(c.client, keys, *c.cfg.layout, c.nowMillis, c.cfg.ttl)
		}
		return &keyPerEntryStore{client: c.client, keys: keys}
	}
	st := build(c.keys)
	// Only the current version's Hash stores are swept: older versions
	// are read, not written, and their keys expire or are purged.
	switch s := st.(type) {
	case *hashStore:
		c.sweeps = append(c.sweeps, s)
	case *dualStore:
		for _, side := range s.sides {
			if h, ok := side.(*hashStore); ok {
				c.sweeps = append(c.sweeps, h)
			}
		}
	}
	if c.mig != nil {
		c.bg.Add(1)
		go func() { defer c.bg.Done(); c.mig.follow(c.closeCtx) }()
	}
	for _, h := range c.sweeps {
		c.bg.Add(1)
		go func() { defer c.bg.Done(); c.sweepLoop(h) }()
	}
	if len(upgrades) == 0 {
		return st
	}
	u := &upgradingStore{store: st, now: c.nowMillis, stats: &c.stats, log: c.log, logs: &c.logBg}
	if c.vals != nil {
		codec := c.cfg.codec
		u.validate = func(ctx context.Context, key string, payload []byte) bool {
			var v T
			if err := codec.Unmarshal(payload, &v); err != nil {
				return true // not the validator's call: the read path counts a bad decode
			}
			return c.valid(ctx, key, v)
		}
	}
	for _, up := range upgrades {
		codec := c.cfg.codec
		convert := up.convert
		u.olds = append(u.olds, oldVersion{
			version: up.version,
			st:      build(c.keys.withVersion(up.version)),
			convert: func(p []byte) ([]byte, error) { return convert(codec, p) },
		})
	}
	return u
}

// sweepLoop sweeps h every sweepEvery (jittered) until Close.
func (c *Cache[T]) sweepLoop(h *hashStore) {
	every := c.cfg.sweepEvery
	t := time.NewTimer(jitterDur(every))
	defer t.Stop()
	for {
		select {
		case <-c.closeCtx.Done():
			return
		case <-t.C:
		}
		n, err := h.sweep(c.closeCtx, c.nowMillis(), every)
		c.stats.swept.Add(uint64(n))
		if err != nil && c.closeCtx.Err() == nil {
			c.stats.redisErrors.Add(1)
			c.logBg.log(c.closeCtx, c.log, slog.LevelWarn, "layercache: sweeping expired hash fields failed",
				slog.String("layout", h.l.String()), slog.Any("err", err))
		}
		t.Reset(jitterDur(every))
	}
}

// jitterDur spreads d by ±10%.
func jitterDur(d time.Duration) time.Duration {
	return time.Duration(float64(d) * (0.9 + 0.2*rand.Float64()))
}

// parseLeaseAttempt decodes the Acquire script's {value|nil, taken, pttl}.
func parseLeaseAttempt(res []any) (leaseAttempt, error) {
	var a leaseAttempt
	if len(res) != 3 {
		return a, fmt.Errorf("layercache: lease script returned %d values, want 3", len(res))
	}
	switch v := res[0].(type) {
	case nil:
	case string:
		a.env = []byte(v)
	default:
		return a, fmt.Errorf("layercache: lease script returned a %T value", v)
	}
	taken, ok1 := res[1].(int64)
	pttl, ok2 := res[2].(int64)
	if !ok1 || !ok2 {
		return a, fmt.Errorf("layercache: lease script returned %T, %T; want integers", res[1], res[2])
	}
	a.acquired = taken == 1
	if pttl > 0 {
		a.heldFor = time.Duration(pttl) * time.Millisecond
	}
	return a, nil
}
