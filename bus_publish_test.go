package layercache_test

import (
	"context"
	"fmt"
	"strings"
	"testing"

	"github.com/layercache/layercache"
	"github.com/layercache/layercache/internal/redistest"
)

// TestBusBatches: many keys go out in few, bounded messages.
func TestBusBatches(t *testing.T) {
	runBus(t, func(t *testing.T, tgt *redistest.Target, mode busMode) {
		ns := redistest.Namespace(t)
		a := newNode(t, tgt, ns, mode.opts(ns))
		b := newNode(t, tgt, ns, mode.opts(ns))
		keys := make([]string, 3000)
		for i := range keys {
			keys[i] = fmt.Sprintf("key-%05d-%s", i, ns)
		}
		if err := a.cache.Delete(context.Background(), keys...); err != nil {
			t.Fatal(err)
		}
		eventually(t, "all keys sent and received", func() bool {
			return a.bus.Stats().SentKeys == uint64(len(keys)) && b.bus.Stats().ReceivedKeys == uint64(len(keys))
		})
		if st := a.bus.Stats(); st.Sent > 4 || st.SentKeys != uint64(len(keys)) {
			t.Fatalf("%d keys went out as %d messages: %+v", len(keys), st.Sent, st)
		}
	})
}

// TestBusBulkDeleteIsKeys: a bulk Delete far beyond what one message
// holds reaches the other nodes as batched key invalidations: the keys are
// dropped there, and everything else in their local tiers stays local.
func TestBusBulkDeleteIsKeys(t *testing.T) {
	runBus(t, func(t *testing.T, tgt *redistest.Target, mode busMode) {
		ctx := context.Background()
		ns := redistest.Namespace(t)
		a := newNode(t, tgt, ns, mode.opts(ns))
		b := newNode(t, tgt, ns, mode.opts(ns))
		keys := make([]string, 20_000)
		for i := range keys {
			keys[i] = fmt.Sprintf("bulk-%05d", i)
		}
		doomed := []string{keys[0], keys[12_345], keys[len(keys)-1]}
		kept := []string{"other-1", "other-2", "other-3"}
		for _, k := range append(doomed, kept...) {
			set(t, a, k, "v")
		}
		eventually(t, "a's sets at b", func() bool { return b.bus.Stats().ReceivedKeys == 6 })
		for _, k := range append(doomed, kept...) {
			b.warm(t, k, "v")
		}
		before, flushes := b.bus.Stats(), b.cache.Stats().LocalFlushes

		if tgt.Real {
			if err := a.cache.Delete(ctx, keys...); err != nil {
				t.Fatal(err)
			}
		} else {
			// miniredis under -race takes some 10s for the 20,000 DELs
			// of that Delete; the bus gets the same from this.
			layercache.PublishKeys(a.bus, ns+":"+layercache.DefaultVersion, keys)
		}
		eventually(t, "all keys at b", func() bool { return b.bus.Stats().ReceivedKeys == before.ReceivedKeys+uint64(len(keys)) })
		for _, k := range doomed {
			// Eventually: ReceivedKeys may count a message a moment
			// before its keys are dropped.
			eventually(t, k+" dropped at b", func() bool {
				hits := b.cache.Stats().LocalHits
				_, _ = b.cache.Get(ctx, k)
				return b.cache.Stats().LocalHits == hits
			})
		}
		for _, k := range kept {
			if !b.localHit(t, k, "v") {
				t.Fatalf("%q is no longer a local hit at b: %+v", k, b.cache.Stats())
			}
		}
		sa, sb := a.bus.Stats(), b.bus.Stats()
		if sa.BacklogFlushes != 0 || b.cache.Stats().LocalFlushes != flushes || sb.Flushes != before.Flushes {
			t.Fatalf("a flush went out or was applied: a %+v, b %+v", sa, sb)
		}
		// Batched: messages of at most 32 KiB, not one per key.
		if n := sa.Sent; n > 30 {
			t.Fatalf("%d messages for %d keys", n, len(keys))
		}
	})
}

// TestBusBacklogBecomesFlush: while a node cannot publish, its pending
// invalidations pile up; past the queue's bound they become flushes of
// their caches (memory stays bounded), which the other nodes apply once
// the node is back.
func TestBusBacklogBecomesFlush(t *testing.T) {
	tgt := redistest.Miniredis(t)
	ctx := context.Background()
	ns := redistest.Namespace(t)
	// A bound of 8 KiB instead of 32 MiB: the same logic, with hundreds
	// of keys instead of a million.
	const bound = 8 << 10
	opts := append(busModes[0].opts(ns), layercache.WithPendingBound(bound))
	a := newNode(t, tgt, ns, opts)
	b := newNode(t, tgt, ns, opts)
	set(t, a, "k", "v1")
	b.warm(t, "k", "v1")
	flushes := b.cache.Stats().LocalFlushes

	a.fault.cut() // a's bus cannot publish; its cache still writes Redis
	eventually(t, "a's publisher to fail", func() bool {
		_ = a.cache.Delete(ctx, "probe")
		return a.bus.Stats().SendErrors > 0
	})
	// Many writes, each far below the bound; together far above it.
	queued, total := 0, 0
	for batch := 0; queued < 4*bound; batch++ {
		keys := make([]string, 20)
		for i := range keys {
			keys[i] = fmt.Sprintf("gone-%d-%d-%s", batch, i, strings.Repeat("x", 80))
		}
		if layercache.PendingSize(keys) > bound/3 {
			t.Fatal("a batch alone fills the queue: not a backlog")
		}
		if err := a.cache.Delete(ctx, keys...); err != nil {
			t.Fatal(err)
		}
		queued += layercache.PendingSize(keys)
		total += len(keys)
		if n := layercache.PendingBytes(a.bus); n > bound {
			t.Fatalf("%d bytes waiting, bound %d", n, bound)
		}
	}
	if err := a.cache.Set(ctx, "k", "v2"); err != nil {
		t.Fatal(err)
	}
	if st := a.bus.Stats(); st.BacklogFlushes == 0 {
		t.Fatalf("%d bytes of keys queued, bound %d, and no flush: %+v", queued, bound, st)
	}
	a.fault.heal()
	eventually(t, "b to apply the route flush", func() bool { return b.cache.Stats().LocalFlushes > flushes })
	if v := b.get(t, "k"); v != "v2" {
		t.Fatalf("b read %q after the flush", v)
	}
	// The keys were dropped from the queue when it overflowed, not sent.
	// (Keys queued after the publisher took the flush may follow it.)
	if st := a.bus.Stats(); st.SentKeys >= uint64(total) {
		t.Fatalf("a sent all %d keys besides the flush: %+v", total, st)
	}
}
