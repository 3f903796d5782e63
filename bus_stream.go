package layercache

import (
	"errors"
	"log/slog"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
)

// runStream reads the stream from the last entry this node saw.
//
// Blocking reads are made only while the node is current, and they ask for
// at most min(streamBatch, MAXLEN) entries. A short answer then proves that
// nothing after the last-seen entry was trimmed: trimming leaves at least
// MAXLEN entries, so had it removed any unread one, every entry left would
// be unread and the read would come back full. A full answer, an error or
// a start means the node may be behind: hits go off, and it catches up with
// reads that check for trimmed entries (catchUp) until a short one.
func (b *Bus) runStream() {
	defer b.wg.Done()
	count := min(int64(streamBatch), b.cfg.maxLen)
	var (
		bo      backoff
		lastID  string // "" until known
		current bool
	)
	fail := func(err error) bool {
		current = false
		b.setDown(err)
		return bo.wait(b.ctx)
	}
	for b.ctx.Err() == nil {
		if lastID == "" {
			// Start at the end: the local tiers start empty, so there is
			// nothing older to apply.
			id, err := b.streamTail()
			if err != nil {
				if !fail(err) {
					return
				}
				continue
			}
			lastID = id
		}
		if !current {
			entries, next, lost, err := b.catchUp(lastID, count)
			if err != nil {
				if !fail(err) {
					return
				}
				continue
			}
			bo.reset()
			if lost {
				b.rec.inc(evBusTrimmed)
				b.log.LogAttrs(b.ctx, slog.LevelWarn, "layercache: invalidations were trimmed from the stream before this node read them; local tiers flushed",
					slog.String("last_seen", lastID), slog.Int64("maxlen", b.cfg.maxLen))
				b.flushAll()
				lastID = next
				continue
			}
			b.rec.add(evBusReplayed, uint64(len(entries)))
			lastID = b.apply(entries, lastID)
			if b.cfg.catchUpHook != nil {
				b.cfg.catchUpHook()
			}
			if int64(len(entries)) < count {
				current = true
				b.markCurrent(false)
			}
			continue
		}
		res, err := b.client.XRead(b.ctx, &redis.XReadArgs{
			Streams: []string{b.cfg.stream, lastID},
			Count:   count,
			Block:   streamBlock,
		}).Result()
		if errors.Is(err, redis.Nil) {
			continue // nothing new within streamBlock
		}
		if err != nil {
			if b.ctx.Err() != nil {
				return
			}
			if !fail(err) {
				return
			}
			continue
		}
		var entries []redis.XMessage
		if len(res) > 0 {
			entries = res[0].Messages
		}
		if int64(len(entries)) >= count {
			// Possibly behind, possibly trimmed past: drop this answer
			// and read again from lastID with the trim check.
			current = false
			b.setDown(errors.New("stream backlog"))
			continue
		}
		lastID = b.apply(entries, lastID)
	}
}

// apply handles stream entries and returns the ID of the last one.
func (b *Bus) apply(entries []redis.XMessage, lastID string) string {
	now := time.Now().UnixMilli()
	for _, e := range entries {
		if s, ok := e.Values["m"].(string); ok {
			// Judged by when Redis appended it, not by when this node
			// reads it: a reader catching up on old entries applies
			// them, while a captured message appended again is stale.
			b.handle(s, streamEntryMs(e.ID, now))
		} else {
			b.rec.inc(evBusMalformed)
		}
		lastID = e.ID
	}
	return lastID
}

// streamTail returns the ID of the stream's last entry, or "0-0".
func (b *Bus) streamTail() (string, error) {
	last, err := b.client.XRevRangeN(b.ctx, b.cfg.stream, "+", "-", 1).Result()
	if err != nil {
		return "", err
	}
	if len(last) == 0 {
		return "0-0", nil
	}
	return last[0].ID, nil
}

// catchUp reads up to count entries after lastID and tells whether entries
// after lastID were removed before this node read them (lost). When lost,
// next is where to go on from after flushing: the stream's last generated
// ID (a flush now covers every entry up to it).
//
// The read and the check that lastID's entry still exists run in one
// MULTI: if it exists, nothing after it was trimmed (trimming removes from
// the head). If it is gone, XINFO STREAM's max-deleted-entry-id (Redis 7)
// tells whether the deletions stopped exactly at it; otherwise (entries
// after it deleted, the stream recreated, or an older server that does not
// say) the node assumes the worst.
func (b *Bus) catchUp(lastID string, count int64) (entries []redis.XMessage, next string, lost bool, err error) {
	ctx := b.ctx
	key := b.cfg.stream
	var exists *redis.XMessageSliceCmd
	var read *redis.XStreamSliceCmd
	_, err = b.client.TxPipelined(ctx, func(p redis.Pipeliner) error {
		if lastID != "0-0" {
			exists = p.XRangeN(ctx, key, lastID, lastID, 1)
		}
		read = p.XRead(ctx, &redis.XReadArgs{Streams: []string{key, lastID}, Count: count, Block: -1})
		return nil
	})
	if err != nil && !errors.Is(err, redis.Nil) {
		return nil, "", false, err
	}
	if err := read.Err(); err != nil && !errors.Is(err, redis.Nil) {
		return nil, "", false, err
	}
	if res := read.Val(); len(res) > 0 {
		entries = res[0].Messages
	}
	if exists != nil {
		if err := exists.Err(); err != nil {
			return nil, "", false, err
		}
		if len(exists.Val()) == 1 {
			return entries, "", false, nil
		}
	}
	info, err := b.client.XInfoStream(ctx, key).Result()
	if err != nil {
		if !isNoSuchKey(err) {
			return nil, "", false, err
		}
		if lastID == "0-0" {
			return entries, "", false, nil // never written, nothing missed
		}
		return nil, "0-0", true, nil // the stream was deleted
	}
	if info.MaxDeletedEntryID == lastID {
		return entries, "", false, nil
	}
	if lastID == "0-0" && info.MaxDeletedEntryID == "" && len(entries) == 0 && info.Length == 0 {
		// An empty stream on a server that does not report deletions:
		// buses never trim to empty (MAXLEN >= 1), so take it as unwritten
		// rather than flush every time an idle node reconnects.
		return entries, "", false, nil
	}
	return nil, info.LastGeneratedID, true, nil
}

func isNoSuchKey(err error) bool { return strings.Contains(err.Error(), "no such key") }
