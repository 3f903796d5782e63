package layercache

import (
	"context"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"log/slog"
	"math/rand/v2"
	"sync/atomic"
	"time"
)

// The Redis lease: one load per key across processes (see WithLocks).
//
// Invariants:
//   - Only the holder of a key's lease writes a loaded value, and only with
//     a script that checks its token in the same step (fencing). A lease
//     that expired, or that Set or Delete broke, stops the write, never the
//     holder's callers: they get what was loaded.
//   - Every exit of a holder releases its lease (or finds it gone), and
//     every release or fill publishes a notice, so waiters never stall
//     behind a holder that has finished; a holder that died stops renewing
//     and its lease expires within its TTL.
//   - A waiter looks at Redis again after each notice and after each
//     (re)subscription of its channel, so a notice published before the
//     subscription took effect is never the only news of a fill.

const (
	// defaultLeaseTTL is the lease lifetime of background refreshes when
	// WithLocks does not set one. Renewal keeps long loads covered.
	defaultLeaseTTL = 5 * time.Second
	// leaseOpTimeout bounds the release of a lease on the way out of a
	// load whose context was cancelled (Close): other processes should not
	// wait out the TTL of a lease nobody uses.
	leaseOpTimeout = time.Second
	// unconfirmedPoll is how often a waiter looks at Redis while its
	// notice subscription is not confirmed (or not available: Ring).
	unconfirmedPoll = 100 * time.Millisecond
	// expirySlack is how long after the holder's lease would run out a
	// waiter looks again, to find it expired rather than just about to.
	expirySlack = 5 * time.Millisecond
)

// usesLeases reports whether any option makes this cache take leases; Set
// then breaks them.
func (c *Cache[T]) usesLeases() bool {
	return c.cfg.lockTTL > 0 || c.cfg.earlyBeta > 0 || c.cfg.grace > 0
}

// newLeaseToken returns a token unique to one holding of one lease. It only
// has to be unpredictable enough never to collide; math/rand/v2's global
// source is seeded from the OS and is cheaper than crypto/rand.
func newLeaseToken() string {
	var b [16]byte
	binary.LittleEndian.PutUint64(b[:8], rand.Uint64())
	binary.LittleEndian.PutUint64(b[8:], rand.Uint64())
	return hex.EncodeToString(b[:])
}

// leaseTTL returns the lifetime of a new lease, jittered like value TTLs
// so that leases taken together do not all run out together.
func (c *Cache[T]) leaseTTL() time.Duration {
	ttl := c.cfg.lockTTL
	if ttl == 0 {
		ttl = defaultLeaseTTL
	}
	return c.jitter(ttl)
}

// loadLeased is the body of a shared load under WithLocks: take the lease
// and load, or wait for the holder's fill. f is the flight it loads for.
func (c *Cache[T]) loadLeased(ctx context.Context, key string, load func(context.Context) (T, error), f *flight[T]) (T, error) {
	var (
		zero     T
		w        *noticeWatch
		deadline time.Time
	)
	defer func() {
		if w != nil {
			c.notices.unwatch(w)
		}
	}()
	for {
		token, ttl := newLeaseToken(), c.leaseTTL()
		att, err := c.store.acquireLease(ctx, key, token, ttl, true)
		if err != nil {
			if ctx.Err() != nil {
				return zero, ErrClosed
			}
			// Without Redis there is no lease to hold, and writing without
			// one could land after a Delete: load, return, cache nothing.
			c.rec.inc(evRedisError)
			c.logReadFailed.log(ctx, c.log, slog.LevelWarn, "layercache: lease unavailable; loading without it, the value will not be cached",
				slog.String("key", key), slog.Any("err", err))
			val, _, err := c.timedLoad(ctx, key, load)
			return val, err
		}
		if att.env != nil {
			// A fill landed since this caller's miss (or while it waited).
			// A stale value is worth serving only while someone else
			// refreshes it; with the lease in hand, this caller loads.
			e := c.decode(ctx, key, att.env, c.nowMillis())
			switch {
			case e.state == stateFresh, e.state == stateStale && !att.acquired:
				if att.acquired {
					c.releaseLease(ctx, key, token)
				}
				if e.state == stateStale {
					c.rec.inc(evStaleHit)
				} else {
					c.local.put(key, f.tok, &e)
				}
				return e.val, nil
			case e.state == stateNegative:
				if att.acquired {
					c.releaseLease(ctx, key, token)
				}
				c.local.put(key, f.tok, &e)
				return zero, ErrNotFound
			}
		}
		if att.acquired {
			return c.loadUnderLease(ctx, key, token, ttl, load, f.tok, f)
		}

		now := c.cfg.clock.Now()
		if w == nil {
			c.rec.inc(evLeaseWait)
			deadline = now.Add(c.cfg.lockWait)
			w = c.notices.watch(c.store.noticeChannel(key))
		} else if !now.Before(deadline) {
			// The holder is slow or stuck; do not hang the callers. The
			// value is not cached: only a holder may write.
			c.rec.inc(evLeaseWaitTimeout)
			c.log.LogAttrs(ctx, slog.LevelWarn, "layercache: waited too long for another process's load; loading without the lease, the value will not be cached",
				slog.String("key", key), slog.Duration("wait", c.cfg.lockWait))
			val, _, err := c.timedLoad(ctx, key, load)
			return val, err
		}
		d := waitDelay(att.heldFor, w.confirmed.Load(), deadline.Sub(now))
		timer, stop := c.cfg.clock.NewTimer(d)
		select {
		case <-w.wake:
		case <-timer:
		case <-ctx.Done():
			stop()
			return zero, ErrClosed
		}
		stop()
	}
}

// waitDelay is how long a waiter sleeps before looking at Redis again when
// no notice comes. With a confirmed subscription, a notice announces every
// fill and release, so the only event to poll for is the holder's death:
// look when its lease would run out. Otherwise poll at unconfirmedPoll.
// Never past the wait deadline.
func waitDelay(heldFor time.Duration, confirmed bool, left time.Duration) time.Duration {
	d := heldFor + expirySlack
	if heldFor <= 0 || !confirmed && d > unconfirmedPoll {
		// heldFor <= 0: a lease without expiry (set by hand); poll.
		d = unconfirmedPoll
	}
	return max(min(d, left), 0)
}

// loadUnderLease runs load while token holds key's lease, renewing it, then
// caches the outcome under the lease, which the fill releases, and in the
// local tier unless an invalidation came since tok was taken. It returns
// what load returned, whether or not it could be cached. f, the flight the
// load is for (nil for a background refresh), is detached the moment the
// lease is found lost: news that a write broke it.
func (c *Cache[T]) loadUnderLease(ctx context.Context, key, token string, ttl time.Duration, load func(context.Context) (T, error), tok fillToken, f *flight[T]) (T, error) {
	c.rec.inc(evLeaseAcquired)
	filled := false
	defer func() {
		// Runs on every path the fill did not take, panics included, so
		// waiters elsewhere never wait out the TTL of a finished load.
		if !filled {
			c.releaseLease(ctx, key, token)
		}
	}()

	keeper := c.keepLease(ctx, key, token, ttl, f)
	val, took, err := c.timedLoad(ctx, key, load)
	lost := keeper.end()

	if !c.cacheable(err) {
		return val, err
	}
	if f != nil && f.stale.Load() {
		// A write or invalidation overtook the load (and broke the lease).
		c.rec.inc(evSkippedWrite)
		return val, err
	}
	negative := err != nil
	hdr, werr := c.write(ctx, key, val, took, negative, writeOpts{lease: token})
	switch {
	case werr == nil:
		filled = true // the script released the lease
		c.keepLoaded(key, tok, val, hdr)
	case errors.Is(werr, errLeaseLost):
		c.lostFlight(key, f)
		// The fill script found another token, or none: the value may
		// predate a write that broke the lease. The script released
		// nothing of ours and woke waiters if the lease is free.
		filled = true
		c.rec.inc(evLeaseLost)
		c.rec.inc(evSkippedWrite)
		if !lost { // keepLease has not logged it yet
			c.log.LogAttrs(ctx, slog.LevelWarn, "layercache: lease lost before the fill; the loaded value is returned but not cached",
				slog.String("key", key))
		}
	case errors.Is(werr, ErrValueTooLarge), ctx.Err() != nil:
	default:
		c.logWriteFailed.log(ctx, c.log, slog.LevelWarn, "layercache: caching a loaded value failed",
			slog.String("key", key), slog.Any("err", werr))
	}
	return val, err
}

// releaseLease drops key's lease if token holds it, even when ctx was
// cancelled (Close), and wakes waiters.
func (c *Cache[T]) releaseLease(ctx context.Context, key, token string) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), leaseOpTimeout)
	defer cancel()
	if err := c.store.releaseLease(ctx, key, token); err != nil {
		c.rec.inc(evRedisError)
		c.logWriteFailed.log(ctx, c.log, slog.LevelWarn, "layercache: releasing a lease failed; it expires by itself",
			slog.String("key", key), slog.Any("err", err))
	}
}

// leaseKeeper renews a lease while a load runs.
type leaseKeeper struct {
	stop    chan struct{}
	done    chan struct{}
	lost    atomic.Bool
	watch   *noticeWatch // the key's notices, when there is a flight to detach
	unwatch func(*noticeWatch)
}

// lostFlight detaches f, whose lease was lost: the write that broke it
// reached this process, and later callers must not join a load that began
// before it.
func (c *Cache[T]) lostFlight(key string, f *flight[T]) {
	if f != nil {
		c.flights.detachFlight(key, f)
	}
}

// keepLease renews token's lease on key every third of ttl until end is
// called, and at once on any notice on the key's channel, which, while
// this process holds the lease, means someone broke it (a Set or Delete).
// A renewal that finds the lease gone stops renewing, the lease cannot
// come back and the fill will refuse to write, and detaches f (when not
// nil), so that no caller who starts after the write joins this load.
func (c *Cache[T]) keepLease(ctx context.Context, key, token string, ttl time.Duration, f *flight[T]) *leaseKeeper {
	k := &leaseKeeper{stop: make(chan struct{}), done: make(chan struct{})}
	var wake <-chan struct{}
	if c.notices != nil && f != nil {
		k.watch = c.notices.watch(c.store.noticeChannel(key))
		k.unwatch = c.notices.unwatch
		wake = k.watch.wake
	}
	go func() {
		defer close(k.done)
		tick, stop := c.cfg.clock.NewTicker(max(ttl/3, time.Millisecond))
		defer stop()
		for {
			select {
			case <-k.stop:
				return
			case <-ctx.Done():
				return
			case <-tick:
			case <-wake:
				// A notice, or the subscription's confirmation: look.
			}
			ok, err := c.store.renewLease(ctx, key, token, ttl)
			if err != nil {
				// Keep trying: the lease outlives a short Redis hiccup, and
				// if it does not, the fill's token check stops the write.
				if ctx.Err() == nil {
					c.rec.inc(evRedisError)
				}
				continue
			}
			if !ok {
				k.lost.Store(true)
				c.lostFlight(key, f)
				c.log.LogAttrs(ctx, slog.LevelWarn, "layercache: lease lost while loading (expired, or broken by a write); the value will be returned but not cached",
					slog.String("key", key))
				return
			}
		}
	}()
	return k
}

// end stops the renewals and reports whether they found the lease lost.
func (k *leaseKeeper) end() bool {
	close(k.stop)
	<-k.done
	if k.watch != nil {
		k.unwatch(k.watch)
	}
	return k.lost.Load()
}
