package layercache

import (
	"context"
	"errors"
	"log/slog"
	"math"
	"math/rand/v2"
	"sync"
	"time"
)

// Background refreshes: XFetch early refresh (WithEarlyRefresh),
// stale-while-revalidate (WithStaleWhileRevalidate) and the fail-safe
// backoff (WithFailSafe). A refresh never blocks a caller: it runs on its
// own goroutine, detached from the caller's cancellation, under the key's
// lease, so that one process at a time refreshes a key; a process that
// cannot take the lease skips the refresh.

// checkStampede validates the options that only make sense together.
func (c *config) checkStampede() {
	if c.failSafeWait > 0 && c.grace == 0 {
		c.fail("WithFailSafe(%v) needs stale values to fall back on: add WithStaleWhileRevalidate(grace)", c.failSafeWait)
	}
}

// xfetchMaxDraw bounds -ln(u) for every u that rand.Float64 returns but 0
// (the smallest non-zero one is 2^-53, and -ln(2^-53) is 36.7): far enough
// from expiry, no random draw can trigger a refresh, so none is made.
const xfetchMaxDraw = 37

// xfetch is the XFetch rule: refresh when now - delta*beta*ln(u) >= expiry,
// with times in Unix ms and u drawn from rnd, uniform in [0, 1).
func xfetch(now, freshUntil int64, delta time.Duration, beta float64, rnd func() float64) bool {
	if delta <= 0 {
		return false
	}
	gap := float64(freshUntil - now)
	scale := float64(delta) / float64(time.Millisecond) * beta
	if gap > xfetchMaxDraw*scale {
		return false
	}
	return -scale*math.Log(rnd()) >= gap
}

// maybeRefreshEarly starts a background refresh of a fresh hit when XFetch
// says so. Most hits are far from expiry and return at the first compare.
func (c *Cache[T]) maybeRefreshEarly(ctx context.Context, key string, e *entry[T], load func(context.Context) (T, error)) {
	if !xfetch(e.now, e.hdr.FreshUntil, e.hdr.LoadDuration, c.cfg.earlyBeta, rand.Float64) {
		return
	}
	if c.refresh.inBackoff(key, e.now) {
		return
	}
	if c.startRefresh(ctx, key, load) {
		c.rec.inc(evEarlyRefresh)
	}
}

// serveStale accounts for a stale value that Fetch returns, and starts its
// refresh unless the key's refreshes are failing.
func (c *Cache[T]) serveStale(ctx context.Context, key string, now int64, load func(context.Context) (T, error)) {
	c.rec.inc(evStaleHit)
	if c.refresh.inBackoff(key, now) {
		c.rec.inc(evFailSafeHit)
		return
	}
	c.startRefresh(ctx, key, load)
}

// startRefresh refreshes key in the background unless a refresh of it is
// already running here or the cache is closing. It reports whether it
// started one.
func (c *Cache[T]) startRefresh(ctx context.Context, key string, load func(context.Context) (T, error)) bool {
	if !c.refresh.begin(key) {
		return false
	}
	go func() {
		defer c.refresh.end(key)
		ctx, cancel := c.detach(ctx)
		defer cancel()
		c.runRefresh(ctx, key, load)
	}()
	return true
}

// runRefresh is the body of a background refresh.
func (c *Cache[T]) runRefresh(ctx context.Context, key string, load func(context.Context) (T, error)) {
	tok := c.local.begin(key) // before the load: see localTier
	token, ttl := newLeaseToken(), c.leaseTTL()
	att, err := c.store.acquireLease(ctx, key, token, ttl, false)
	if err != nil {
		if ctx.Err() == nil {
			c.rec.inc(evRedisError)
			c.logBg.log(ctx, c.log, slog.LevelWarn, "layercache: background refresh could not take the lease",
				slog.String("key", key), slog.Any("err", err))
		}
		return
	}
	if !att.acquired {
		// Another process (or a load here) is at it already.
		c.rec.inc(evRefreshSkipped)
		return
	}
	_, err = c.loadUnderLease(ctx, key, token, ttl, load, tok, nil)
	if err == nil || errors.Is(err, ErrNotFound) {
		c.refresh.clearBackoff(key)
		return
	}
	if c.cfg.failSafeWait > 0 {
		now := c.nowMillis()
		c.refresh.setBackoff(key, now, now+c.cfg.failSafeWait.Milliseconds())
	}
	c.rec.inc(evRefreshError) // after the backoff: a reader that sees the count sees the backoff
	c.logBg.log(ctx, c.log, slog.LevelWarn, "layercache: background refresh failed; the cached value is still served",
		slog.String("key", key), slog.Duration("backoff", c.cfg.failSafeWait), slog.Any("err", err))
}

// refresher tracks background refreshes: at most one per key in this
// process, none of a key in fail-safe backoff, and all waited for by Close.
type refresher struct {
	mu      sync.Mutex
	running map[string]struct{}
	backoff map[string]int64 // key -> Unix ms before which no refresh starts
	closing bool
	wg      sync.WaitGroup
}

// maxBackoffKeys bounds the backoff map between sweeps of expired entries.
const maxBackoffKeys = 1024

func (r *refresher) begin(key string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closing {
		return false
	}
	if _, busy := r.running[key]; busy {
		return false
	}
	if r.running == nil {
		r.running = make(map[string]struct{})
	}
	r.running[key] = struct{}{}
	r.wg.Add(1)
	return true
}

func (r *refresher) end(key string) {
	r.mu.Lock()
	delete(r.running, key)
	r.mu.Unlock()
	r.wg.Done()
}

func (r *refresher) inBackoff(key string, now int64) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	until, ok := r.backoff[key]
	return ok && now < until
}

func (r *refresher) setBackoff(key string, now, until int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.backoff == nil {
		r.backoff = make(map[string]int64)
	}
	if len(r.backoff) >= maxBackoffKeys {
		for k, u := range r.backoff {
			if u <= now {
				delete(r.backoff, k)
			}
		}
	}
	r.backoff[key] = until
}

func (r *refresher) clearBackoff(key string) {
	r.mu.Lock()
	delete(r.backoff, key)
	r.mu.Unlock()
}

// close refuses new refreshes and waits for running ones, whose contexts
// Close has cancelled.
func (r *refresher) close() {
	r.mu.Lock()
	r.closing = true
	r.mu.Unlock()
	r.wg.Wait()
}
