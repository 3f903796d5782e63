package layercache

import (
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"time"

	"github.com/layercache/layercache/internal/envelope"
)

// Set writes value for key, fresh for the cache's TTL. A load of key that
// is running in this process when Set is called never overwrites it. With
// [WithLocks], Set also breaks the key's lease, so no load running in any
// other process overwrites it either; with [WithEarlyRefresh] or
// [WithStaleWhileRevalidate] alone, that holds for their background
// refreshes but not for another process's plain miss load, which can land
// its (older) value just after the Set.
//
// If value cannot be cached (it fails to encode, or exceeds
// [WithMaxValueSize]), Set deletes the key instead, so that no older value
// is served after the write it stands for, and returns the error.
func (c *Cache[T]) Set(ctx context.Context, key string, value T) error {
	if err := checkKey(key); err != nil {
		return err
	}
	c.flights.invalidate(key)
	// With leases in use, the write breaks the key's lease in the same
	// script, so that a fill that started before this write, in any
	// process, cannot land after it.
	_, err := c.write(ctx, key, value, 0, false, writeOpts{breakLease: c.usesLeases()})
	if errors.Is(err, errUnencodable) {
		// The caller changed the source of truth; the old cached value
		// is now wrong. Delete takes the lease too, fencing other fills.
		if delErr := c.store.del(ctx, []string{key}); delErr != nil {
			c.rec.inc(evRedisError)
			err = errors.Join(err, fmt.Errorf("layercache: delete %q after a failed Set: %w", key, delErr))
		}
	}
	// After the write, so no fill can bring the old value back; and even
	// after a failed one, which may have reached Redis.
	c.invalidate(key)
	return err
}

// Delete removes keys, which may fall in different Redis Cluster slots,
// together with any lease on them. A load of one of them running in this
// process when Delete is called will not cache its value. All keys are
// checked before anything is deleted.
func (c *Cache[T]) Delete(ctx context.Context, keys ...string) error {
	for _, k := range keys {
		if err := checkKey(k); err != nil {
			return err
		}
	}
	if len(keys) == 0 {
		return nil
	}
	for _, k := range keys {
		c.flights.invalidate(k)
	}
	err := c.store.del(ctx, keys)
	c.invalidate(keys...)
	if err != nil {
		c.rec.inc(evRedisError)
		return fmt.Errorf("layercache: delete: %w", err)
	}
	c.rec.add(evDelete, uint64(len(keys)))
	return nil
}

// write is the one write path of the cache: Set, and fills with or
// without a lease, encode their value here and hand it to the store's one
// write verb (see writeOpts). It returns the header written. A fill under
// a lease that finds it lost returns errLeaseLost; nothing was written.
func (c *Cache[T]) write(ctx context.Context, key string, value T, took time.Duration, negative bool, w writeOpts) (envelope.Header, error) {
	env, ttl, err := c.encode(key, value, took, negative)
	if err != nil {
		return envelope.Header{}, err
	}
	r, err := c.store.write(ctx, key, env, ttl, w)
	if err != nil {
		if ctx.Err() == nil {
			c.rec.inc(evRedisError)
		}
		return envelope.Header{}, fmt.Errorf("layercache: write %q: %w", key, err)
	}
	if !r.written {
		return envelope.Header{}, errLeaseLost
	}
	c.countWrite(negative)
	hdr, _, _ := envelope.Decode(env)
	hdr.WriteVersion = r.version
	return hdr, nil
}

// encode returns the envelope of value (or of a negative entry) for key and
// its physical TTL: the (jittered) fresh TTL plus the stale grace.
func (c *Cache[T]) encode(key string, value T, took time.Duration, negative bool) ([]byte, time.Duration, error) {
	var payload []byte
	hdr := envelope.Header{LoadDuration: took}
	ttl := c.cfg.ttl
	var grace time.Duration
	if negative {
		hdr.Flags = envelope.FlagNegative
		ttl = c.cfg.negativeTTL
	} else {
		var err error
		if payload, err = c.cfg.codec.Marshal(value); err != nil {
			return nil, 0, fmt.Errorf("layercache: encode %q: %w%w", key, err, errUnencodable)
		}
		if c.cfg.maxValue > 0 && len(payload) > c.cfg.maxValue {
			c.rec.inc(evSkippedWrite)
			return nil, 0, fmt.Errorf("%w: %q encodes to %d bytes, the limit is %d%w", ErrValueTooLarge, key, len(payload), c.cfg.maxValue, errUnencodable)
		}
		ttl = c.jitter(ttl)
		grace = c.cfg.grace
	}
	now := c.nowMillis()
	hdr.WrittenAt = now
	hdr.WriteVersion = c.writes.next()
	hdr.FreshUntil = now + ttl.Milliseconds()
	hdr.ExpiresAt = hdr.FreshUntil + grace.Milliseconds()
	return envelope.Encode(hdr, payload), satAdd(ttl, grace), nil
}

// satAdd adds two non-negative durations, saturating instead of
// overflowing into a negative (and then a 1ms) TTL.
func satAdd(a, b time.Duration) time.Duration {
	if a > math.MaxInt64-b {
		return math.MaxInt64
	}
	return a + b
}

func (c *Cache[T]) countWrite(negative bool) {
	if negative {
		c.rec.inc(evNegativeWrite)
	} else {
		c.rec.inc(evWrite)
	}
}

// jitter spreads ttl by the configured fraction.
func (c *Cache[T]) jitter(ttl time.Duration) time.Duration {
	if c.cfg.jitter == 0 {
		return ttl
	}
	f := float64(ttl) * (1 + c.cfg.jitter*(2*rand.Float64()-1))
	if f >= math.MaxInt64 {
		return math.MaxInt64 // a float past it converts to garbage
	}
	return time.Duration(f)
}
