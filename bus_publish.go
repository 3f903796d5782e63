package layercache

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"time"

	"github.com/layercache/layercache/internal/busmsg"
	"github.com/redis/go-redis/v9"
)

// pendingRoute is what waits to be published for one route.
type pendingRoute struct {
	keys  []string
	size  int  // pendingSize of keys
	flush bool // the backlog outgrew its bound: flush the route instead
}

// pendingKeyOverhead is what the queue holds per key besides its bytes:
// the string header in pendingRoute.keys.
const pendingKeyOverhead = 16

// pendingSize is what keys cost the queue, for the bound of
// maxPendingBytes.
func pendingSize(keys []string) int {
	n := len(keys) * pendingKeyOverhead
	for _, k := range keys {
		n += len(k)
	}
	return n
}

// SetPhase moves the migration name to phase p, like the package-level
// [SetPhase], and announces the change on the bus: every cache of that
// migration attached to a bus on the same channel or stream re-reads the
// control key at once, instead of at its next poll (up to about half a
// second later). The control key stays the only source of truth; the
// announcement carries no phase, so a lost one only means the poll decides.
// It returns once the control key is written; the announcement is sent in
// the background like invalidations.
func (b *Bus) SetPhase(ctx context.Context, name string, p Phase) error {
	if b.ctx.Err() != nil {
		return fmt.Errorf("%w: Bus.SetPhase on a closed Bus", ErrClosed)
	}
	if err := SetPhase(ctx, b.client, name, p); err != nil {
		return err
	}
	b.mu.RLock()
	for _, m := range b.phases[name] {
		m.notify() // this process hears nothing of its own messages
	}
	b.mu.RUnlock()
	b.pubMu.Lock()
	if b.drained {
		// Close took the last batch during the control-key write: the
		// other nodes see the phase at their next poll.
		b.pubMu.Unlock()
		return nil
	}
	b.phased[name] = struct{}{}
	b.pubMu.Unlock()
	poke(b.kick)
	return nil
}

// publish drops keys from the other local tiers of route in this process
// at once, and queues them for the other nodes. from (the writer's own
// tier, which it invalidated itself) is skipped.
func (b *Bus) publish(route string, keys []string, from busTier) {
	if b.ctx.Err() != nil {
		return // closed: the attached tiers are off, other nodes have their TTL
	}
	b.mu.RLock()
	var others []string // a copy for them: keys handed to an interface escape, and Set's slice need not
	for _, t := range b.routes[route] {
		if t != from {
			if others == nil {
				others = slices.Clone(keys)
			}
			t.invalidate(others)
		}
	}
	b.mu.RUnlock()

	b.pubMu.Lock()
	if b.drained {
		// Close passed the check above and took the last batch already:
		// queueing would lose the keys without a word.
		b.pubMu.Unlock()
		b.logSend.log(b.ctx, b.log, slog.LevelWarn, "layercache: invalidation after the bus closed; other nodes rely on their local TTL",
			slog.String("route", route), slog.Int("keys", len(keys)))
		return
	}
	overflow := b.enqueueLocked(route, keys, false)
	b.pubMu.Unlock()
	poke(b.kick)
	if overflow {
		b.logOverflow()
	}
}

// enqueueLocked queues keys of route (or a flush of it) and reports
// whether the queue outgrew b.cfg.maxPending, in which case every route's
// keys were replaced by a flush of the route. Call it with b.pubMu held.
//
// However many keys one write hands over, they go out as keys: the
// publisher takes the whole queue and Encode splits it into messages of
// at most busmsg.MaxSize, so a bulk Delete reaches the other nodes as
// batched key invalidations and costs them nothing else. Only a queue
// that outgrows the bound, which takes Redis being unreachable for a
// while (or one write of about a million keys), turns into flushes: the
// same news in constant space, paid for by the other nodes' hit ratio.
func (b *Bus) enqueueLocked(route string, keys []string, flush bool) (overflow bool) {
	p := b.pending[route]
	if p == nil {
		p = &pendingRoute{}
		b.pending[route] = p
	}
	if flush {
		b.pendSize -= p.size
		p.keys, p.size, p.flush = nil, 0, true
	}
	if !p.flush {
		n := pendingSize(keys)
		p.keys = append(p.keys, keys...)
		p.size += n
		b.pendSize += n
	}
	if b.pendSize <= b.cfg.maxPending {
		return false
	}
	for _, p := range b.pending {
		p.keys, p.size, p.flush = nil, 0, true
	}
	b.pendSize = 0
	b.rec.inc(evBusBacklogFlushes)
	return true
}

// logOverflow reports a backlog replaced by flushes. Called without
// pubMu: a slow log handler must not hold up writers.
func (b *Bus) logOverflow() {
	b.logBacklog.log(b.ctx, b.log, slog.LevelWarn, "layercache: invalidations waiting to be published outgrew their bound; other nodes will flush the caches concerned instead",
		slog.Int("bound_bytes", b.cfg.maxPending), slog.Uint64("send_errors", b.rec.get(evBusSendErrors)))
}

// takePending empties the queue into message items.
func (b *Bus) takePending() []busmsg.Item {
	b.pubMu.Lock()
	defer b.pubMu.Unlock()
	if len(b.pending) == 0 && len(b.phased) == 0 {
		return nil
	}
	items := make([]busmsg.Item, 0, len(b.pending)+len(b.phased))
	for name := range b.phased {
		items = append(items, busmsg.Item{Kind: busmsg.KindPhase, Route: name})
	}
	clear(b.phased)
	for route, p := range b.pending {
		if p.flush {
			items = append(items, busmsg.Item{Kind: busmsg.KindFlush, Route: route})
		} else {
			items = append(items, busmsg.Item{Kind: busmsg.KindInvalidate, Route: route, Keys: p.keys})
		}
	}
	clear(b.pending)
	b.pendSize = 0
	return items
}

// requeue puts items whose publish failed back in front of newer ones.
// Order does not matter: invalidations commute.
func (b *Bus) requeue(items []busmsg.Item) {
	overflow := false
	b.pubMu.Lock()
	for _, it := range items {
		if it.Kind == busmsg.KindPhase {
			b.phased[it.Route] = struct{}{}
			continue
		}
		if b.enqueueLocked(it.Route, it.Keys, it.Kind == busmsg.KindFlush) {
			overflow = true
		}
	}
	b.pubMu.Unlock()
	if overflow {
		b.logOverflow()
	}
}

// runPublisher sends what is queued, one batch at a time: whatever piles
// up while a publish is in flight goes out together in the next one.
func (b *Bus) runPublisher() {
	defer b.wg.Done()
	var bo backoff
	for {
		select {
		case <-b.kick:
		case <-b.ctx.Done():
			ctx, cancel := context.WithTimeout(context.Background(), closeFlushTimeout)
			b.pubMu.Lock()
			b.drained = true // with the take below, nothing queued is left behind
			b.pubMu.Unlock()
			if items := b.takePending(); items != nil {
				if err := b.send(ctx, items); err != nil {
					b.log.LogAttrs(ctx, slog.LevelWarn, "layercache: bus closed with invalidations unsent; other nodes rely on their local TTL",
						slog.Any("err", err))
				}
			}
			cancel()
			return
		}
		for {
			items := b.takePending()
			if items == nil {
				break
			}
			if err := b.send(b.ctx, items); err != nil {
				b.rec.inc(evBusSendErrors)
				b.requeue(items)
				if b.ctx.Err() != nil {
					break // Close sends what is left
				}
				b.logSend.log(b.ctx, b.log, slog.LevelWarn, "layercache: publishing invalidations failed; retrying", slog.Any("err", err))
				if !bo.wait(b.ctx) {
					break
				}
				continue
			}
			bo.reset()
		}
	}
}

// post sends m on c (the client, or a pipeline that queues it): PUBLISH,
// or XADD in stream mode.
func (b *Bus) post(ctx context.Context, c redis.Cmdable, m []byte) redis.Cmder {
	if b.cfg.stream == "" {
		return c.Publish(ctx, b.cfg.channel, m)
	}
	return c.XAdd(ctx, &redis.XAddArgs{Stream: b.cfg.stream, MaxLen: b.cfg.maxLen, Approx: true, Values: []any{"m", m}})
}

// sendBatch is the most messages (of up to busmsg.MaxSize each) one
// pipeline carries.
const sendBatch = 64

// send publishes items as one or more messages.
func (b *Bus) send(ctx context.Context, items []busmsg.Item) error {
	msgs := busmsg.Encode(busmsg.Message{Origin: b.node, SentAt: time.Now().UnixMilli(), Seq: b.seq, Items: items}, b.cfg.secret)
	// Numbers are spent whether or not the send succeeds: a retry
	// re-encodes under new ones, so receivers that got part of a failed
	// send do not take the retry for a replay.
	b.seq += uint64(len(msgs))
	if len(msgs) == 1 {
		if err := b.post(ctx, b.client, msgs[0]).Err(); err != nil {
			return err
		}
		b.rec.inc(evBusSent)
		msgs = nil
	}
	// A bulk write's messages go out pipelined, sendBatch at a time: one
	// round trip per batch rather than per message, and no single write
	// of more than a few MiB to time out.
	var err error
	for len(msgs) > 0 && err == nil {
		n := min(len(msgs), sendBatch)
		_, err = b.client.Pipelined(ctx, func(p redis.Pipeliner) error {
			for _, m := range msgs[:n] {
				b.post(ctx, p, m)
			}
			return nil
		})
		if err == nil {
			b.rec.add(evBusSent, uint64(n))
		}
		msgs = msgs[n:]
	}
	if err != nil {
		return err
	}
	for _, it := range items {
		b.rec.add(evBusSentKeys, uint64(len(it.Keys)))
	}
	return nil
}

// backoff spaces out retries: 10ms, doubling up to a second.
type backoff struct{ d time.Duration }

// wait sleeps for the next delay; false if ctx ended first.
func (bo *backoff) wait(ctx context.Context) bool {
	bo.d = min(max(2*bo.d, 10*time.Millisecond), time.Second)
	t := time.NewTimer(bo.d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

func (bo *backoff) reset() { bo.d = 0 }
