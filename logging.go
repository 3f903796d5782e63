package layercache

import (
	"context"
	"log/slog"
	"sync/atomic"
	"time"
)

// logEvery is the shortest interval between two logs of one kind of event.
// An outage or a poisoned keyspace hits every request; one line a second,
// with the count of those suppressed, tells the operator as much as a flood.
const logEvery = time.Second

// throttledLog logs one kind of event at most once per logEvery.
type throttledLog struct {
	next       atomic.Int64 // unix ns before which events are only counted
	suppressed atomic.Uint64
}

// log writes the event unless one of its kind was logged less than logEvery
// ago. It reads the system clock, so it belongs on error paths only.
func (t *throttledLog) log(ctx context.Context, l *slog.Logger, level slog.Level, msg string, attrs ...slog.Attr) {
	now := time.Now().UnixNano()
	next := t.next.Load()
	if now < next || !t.next.CompareAndSwap(next, now+int64(logEvery)) {
		t.suppressed.Add(1)
		return
	}
	if n := t.suppressed.Swap(0); n > 0 {
		attrs = append(attrs, slog.Uint64("suppressed_since_last", n))
	}
	l.LogAttrs(ctx, level, msg, attrs...)
}
