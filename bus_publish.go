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

type pendingRoute struct {
	keys  []string
	flush bool // too many keys piled up: flush the route instead
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
	b.enqueueLocked(route, keys, false)
	b.pubMu.Unlock()
	poke(b.kick)
}

func (b *Bus) enqueueLocked(route string, keys []string, flush bool) {
	p := b.pending[route]
	if p == nil {
		p = &pendingRoute{}
		b.pending[route] = p
	}
	if flush {
		b.npend -= len(p.keys)
		p.keys, p.flush = nil, true
	}
	if !p.flush {
		p.keys = append(p.keys, keys...)
		b.npend += len(keys)
	}
	if b.npend > maxPendingKeys {
		// Redis has been unreachable for a while: a flush per route
		// says the same in constant space.
		for _, p := range b.pending {
			p.keys, p.flush = nil, true
		}
		b.npend = 0
	}
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
	b.npend = 0
	return items
}

// requeue puts items whose publish failed back in front of newer ones.
// Order does not matter: invalidations commute.
func (b *Bus) requeue(items []busmsg.Item) {
	b.pubMu.Lock()
	defer b.pubMu.Unlock()
	for _, it := range items {
		if it.Kind == busmsg.KindPhase {
			b.phased[it.Route] = struct{}{}
			continue
		}
		b.enqueueLocked(it.Route, it.Keys, it.Kind == busmsg.KindFlush)
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
				b.stats.sendErrors.Add(1)
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

// send publishes items as one or more messages.
func (b *Bus) send(ctx context.Context, items []busmsg.Item) error {
	msgs := busmsg.Encode(busmsg.Message{Origin: b.node, SentAt: time.Now().UnixMilli(), Seq: b.seq, Items: items}, b.cfg.secret)
	// Numbers are spent whether or not the send succeeds: a retry
	// re-encodes under new ones, so receivers that got part of a failed
	// send do not take the retry for a replay.
	b.seq += uint64(len(msgs))
	var err error
	if b.cfg.stream == "" {
		for _, m := range msgs {
			if err = b.client.Publish(ctx, b.cfg.channel, m).Err(); err != nil {
				break
			}
		}
	} else {
		_, err = b.client.Pipelined(ctx, func(p redis.Pipeliner) error {
			for _, m := range msgs {
				p.XAdd(ctx, &redis.XAddArgs{Stream: b.cfg.stream, MaxLen: b.cfg.maxLen, Approx: true, Values: []any{"m", m}})
			}
			return nil
		})
	}
	if err != nil {
		return err
	}
	b.stats.sent.Add(uint64(len(msgs)))
	for _, it := range items {
		b.stats.sentKeys.Add(uint64(len(it.Keys)))
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
