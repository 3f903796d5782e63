package layercache

import (
	"fmt"
	"log/slog"
	"math"
	"strconv"
	"strings"
	"time"

	"github.com/layercache/layercache/internal/busmsg"
)

// BusReplayWindow is how far a bus message's sending time (by the sender's
// clock) may be from its arrival (by the receiver's clock for pub/sub, by
// the stream entry's ID for streams) before receivers drop it as stale
// ([BusStats].Stale). It bounds how long a captured message can be
// replayed, and how much the clocks of the nodes (and, in stream mode, of
// the Redis server) may disagree: keep them within it with NTP. A stream
// reader that catches up on old entries is not affected, since it compares
// each message with its own entry's time. A pub/sub reader is: a process
// that stalls for longer than the window (a paused VM) with messages
// waiting in its socket drops them when it wakes, and its local TTL then
// bounds how stale its local reads may be, as for any lost message.
const BusReplayWindow = 30 * time.Second

const (
	// replayWindowMs is BusReplayWindow in the unit of message times.
	replayWindowMs = int64(BusReplayWindow / time.Millisecond)
	// maxSenders bounds the senders whose sequence numbers a bus
	// remembers. Only authenticated messages create an entry, and a
	// sender not heard from for BusReplayWindow is forgotten for free
	// (see replayGuard.evict), so the bound matters only for fleets of
	// more than maxSenders buses that all sent within the window.
	maxSenders = 4096
	// seqWindow is how far behind its sender's highest sequence number a
	// message may arrive and still be told apart from a replay. One
	// publisher goroutine sends a bus's messages in order over one
	// connection, so genuine messages are not reordered by more than
	// this; a message further behind is dropped as a replay.
	seqWindow = 64
)

// freshAt reports whether a message sent at sentAt (Unix ms, the sender's
// clock) and arriving at at is within BusReplayWindow, either way: a
// sender's clock may be ahead of the receiver's.
func freshAt(sentAt, at int64) bool {
	d := at - sentAt
	return d <= replayWindowMs && d >= -replayWindowMs
}

// admit reports whether m, which arrived at at, may be applied: it was
// sent within BusReplayWindow and, when authenticated, its sequence number
// is new. It counts and logs what it drops.
func (b *Bus) admit(m *busmsg.Message, at int64) bool {
	if !freshAt(m.SentAt, at) {
		b.rec.inc(evBusStale)
		b.logStale.log(b.ctx, b.log, slog.LevelWarn, "layercache: dropped a bus message sent outside the replay window: a replay, clocks further apart than the window (check NTP on every node and on Redis), or this process stalled for longer",
			slog.String("origin", fmt.Sprintf("%x", m.Origin)), slog.Duration("age", time.Duration(at-m.SentAt)*time.Millisecond),
			slog.Duration("window", BusReplayWindow))
		return false
	}
	if !m.Authentic || m.Version == busmsg.VersionNoSeq {
		// Without a secret a sequence number is whatever the sender
		// wrote: trusting it would let anyone who can PUBLISH claim a
		// genuine node's next numbers and so silence it, leaving stale
		// local entries everywhere. Old-format messages carry none; they
		// are accepted within the window (see WithSecret).
		return true
	}
	if !b.replays.admit(m.Origin, m.Seq, m.SentAt, at) {
		b.rec.inc(evBusReplays)
		b.logReplay.log(b.ctx, b.log, slog.LevelWarn, "layercache: dropped a replayed bus message (a sequence number already applied)",
			slog.String("origin", fmt.Sprintf("%x", m.Origin)), slog.Uint64("seq", m.Seq))
		return false
	}
	return true
}

// streamEntryMs returns the time part of a stream entry ID, capped at now.
// The cap closes a hole: whoever may XADD can give an entry an explicit ID
// far in the future, and every entry after it inherits that time; judged
// by it, every genuine message would look stale and be dropped, leaving
// local tiers stale. Capped, a future ID proves nothing either way and the
// receiver's clock decides.
func streamEntryMs(id string, now int64) int64 {
	ms, _, ok := strings.Cut(id, "-")
	t, err := strconv.ParseInt(ms, 10, 64)
	if !ok || err != nil || t > now {
		return now
	}
	return t
}

// replayGuard remembers, per sender, which sequence numbers of its
// authenticated messages have been applied, so that a captured message
// sent again within BusReplayWindow is dropped. It is owned by the bus's
// reader goroutine (runPubSub or runStream), which alone calls handle:
// no lock.
type replayGuard struct {
	senders map[[8]byte]*senderWindow
}

// senderWindow is a sliding window over one sender's sequence numbers, as
// IPsec and DTLS keep one: the highest number accepted and a bitmap of the
// seqWindow numbers below it.
type senderWindow struct {
	top    uint64 // highest sequence number accepted
	seen   uint64 // bit i: top-i was accepted
	latest int64  // highest sending time accepted, Unix ms by the sender's clock
}

// admit reports whether seq is new, and records it.
func (w *senderWindow) admit(seq uint64) bool {
	switch {
	case seq > w.top:
		if d := seq - w.top; d >= seqWindow {
			w.seen = 1
		} else {
			w.seen = w.seen<<d | 1
		}
		w.top = seq
		return true
	case w.top-seq >= seqWindow:
		return false // too far behind to tell: a replay as far as anyone can know
	default:
		bit := uint64(1) << (w.top - seq)
		if w.seen&bit != 0 {
			return false
		}
		w.seen |= bit
		return true
	}
}

// admit reports whether the message seq of origin, sent at sentAt and
// fresh at at (see freshAt), was not applied before, and records it.
func (g *replayGuard) admit(origin [8]byte, seq uint64, sentAt, at int64) bool {
	w := g.senders[origin]
	if w == nil {
		if g.senders == nil {
			g.senders = make(map[[8]byte]*senderWindow)
		}
		if len(g.senders) >= maxSenders {
			g.evict(at)
		}
		g.senders[origin] = &senderWindow{top: seq, seen: 1, latest: sentAt}
		return true
	}
	if !w.admit(seq) {
		return false
	}
	w.latest = max(w.latest, sentAt)
	return true
}

// evict makes room for one sender. A sender whose latest message was sent
// more than BusReplayWindow before at can be forgotten at no cost: each of
// its messages was sent no later than that one, and arrives (if replayed)
// no earlier than at, so freshAt refuses it anyway. If every sender is
// recent, the one heard from longest ago is forgotten: its messages of the
// last BusReplayWindow could then be replayed here once each.
func (g *replayGuard) evict(at int64) {
	var oldest [8]byte
	oldestAt := int64(math.MaxInt64)
	for id, w := range g.senders {
		if at-w.latest > replayWindowMs {
			delete(g.senders, id)
			continue
		}
		if w.latest < oldestAt {
			oldest, oldestAt = id, w.latest
		}
	}
	if len(g.senders) >= maxSenders {
		delete(g.senders, oldest)
	}
}
