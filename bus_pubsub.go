package layercache

import (
	"errors"
	"net"
	"time"

	"github.com/redis/go-redis/v9"
)

// runPubSub keeps a subscription to the channel. go-redis reconnects and
// resubscribes by itself after a broken connection; every subscription
// confirmation it reads is a (re)subscription, after which messages may
// have been lost, so it flushes the local tiers then turns hits on.
func (b *Bus) runPubSub() {
	defer b.wg.Done()
	var (
		ps       *redis.PubSub
		bo       backoff
		pingSent bool
	)
	defer func() {
		if ps != nil {
			_ = ps.Close()
		}
	}()
	for b.ctx.Err() == nil {
		if ps == nil {
			ps = b.client.Subscribe(b.ctx, b.cfg.channel)
			if !b.setPubSub(ps) {
				return
			}
			pingSent = false
		}
		msg, err := ps.ReceiveTimeout(b.ctx, b.cfg.health)
		if err != nil {
			if b.ctx.Err() != nil {
				return
			}
			if isTimeout(err) {
				if pingSent {
					// Neither a message nor the pong: the connection is
					// dead even if TCP has not said so. Start afresh.
					b.setDown(err)
					_ = ps.Close()
					ps = nil
					continue
				}
				if err := ps.Ping(b.ctx); err != nil {
					b.setDown(err)
				}
				pingSent = true
				continue
			}
			// go-redis has dropped the connection and will dial again
			// (and resubscribe) on the next receive.
			b.setDown(err)
			if !bo.wait(b.ctx) {
				return
			}
			continue
		}
		bo.reset()
		pingSent = false
		switch m := msg.(type) {
		case *redis.Subscription:
			if m.Kind == "subscribe" && m.Channel == b.cfg.channel {
				b.markCurrent(true)
				b.rec.inc(evBusSubscriptions) // after the flush it caused
			}
		case *redis.Message:
			b.handle(m.Payload, time.Now().UnixMilli())
		}
	}
}

// setPubSub records the live subscription so Close can close it; it
// reports false (and closes ps) if the bus is already closed.
func (b *Bus) setPubSub(ps *redis.PubSub) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		_ = ps.Close()
		return false
	}
	b.ps = ps
	return true
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
