package layercache_test

import (
	"bytes"
	"context"
	"testing"
	"time"

	"github.com/layercache/layercache"
	"github.com/layercache/layercache/internal/busmsg"
	"github.com/layercache/layercache/internal/redistest"
	"github.com/redis/go-redis/v9"
)

var busSecret = []byte("a shared secret of 32 bytes.....")

// inject sends payload on the bus of ns the way anyone allowed to PUBLISH
// (or XADD) can.
func inject(t *testing.T, tgt *redistest.Target, mode busMode, ns string, payload []byte) {
	t.Helper()
	ctx := context.Background()
	client := tgt.NewClient(t)
	var err error
	if mode.name == "stream" {
		err = client.XAdd(ctx, &redis.XAddArgs{Stream: ns + ":bus", Values: []any{"m", payload}}).Err()
	} else {
		err = client.Publish(ctx, ns+":bus", payload).Err()
	}
	if err != nil {
		t.Fatal(err)
	}
}

// wiretap records what goes over the bus of ns, as an eavesdropper with
// SUBSCRIBE (or XREAD) rights would.
type wiretap struct {
	ps     *redis.PubSub
	client redis.UniversalClient
	stream string
}

func tap(t *testing.T, tgt *redistest.Target, mode busMode, ns string) *wiretap {
	t.Helper()
	client := tgt.NewClient(t)
	if mode.name == "stream" {
		return &wiretap{client: client, stream: ns + ":bus"}
	}
	ps := client.Subscribe(context.Background(), ns+":bus")
	t.Cleanup(func() { _ = ps.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), waitLimit)
	defer cancel()
	if _, err := ps.Receive(ctx); err != nil { // the subscription's confirmation
		t.Fatal(err)
	}
	return &wiretap{ps: ps}
}

// last returns the latest message on the bus (pub/sub: the next one
// received).
func (w *wiretap) last(t *testing.T) []byte {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitLimit)
	defer cancel()
	if w.ps != nil {
		m, err := w.ps.ReceiveMessage(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return []byte(m.Payload)
	}
	e, err := w.client.XRevRangeN(ctx, w.stream, "+", "-", 1).Result()
	if err != nil || len(e) != 1 {
		t.Fatalf("XREVRANGE: %v, %v", e, err)
	}
	return []byte(e[0].Values["m"].(string))
}

// encode returns items as one message of origin, signed with secret when
// it is not nil.
func encode(t *testing.T, origin byte, sentAt time.Time, seq uint64, secret []byte, items ...busmsg.Item) []byte {
	t.Helper()
	msgs := busmsg.Encode(busmsg.Message{Origin: [8]byte{origin}, SentAt: sentAt.UnixMilli(), Seq: seq, Items: items}, secret)
	if len(msgs) != 1 {
		t.Fatalf("%d messages", len(msgs))
	}
	return msgs[0]
}

// encodeNoSeq is encode in the first format, as nodes of releases before
// sequence numbers send.
func encodeNoSeq(t *testing.T, origin byte, sentAt time.Time, secret []byte, items ...busmsg.Item) []byte {
	t.Helper()
	b := encode(t, origin, sentAt, 0, nil, items...)
	out := append(bytes.Clone(b[:busmsg.HeaderSizeNoSeq]), b[busmsg.HeaderSize:]...)
	out[1] = busmsg.VersionNoSeq
	if secret != nil {
		out[2] |= busmsg.FlagMAC
		out = append(out, busmsg.Sum(secret, out)...)
	}
	return out
}

func invalidateItem(ns string, keys ...string) busmsg.Item {
	return busmsg.Item{Kind: busmsg.KindInvalidate, Route: ns + ":" + layercache.DefaultVersion, Keys: keys}
}

func flushItem(ns string) busmsg.Item {
	return busmsg.Item{Kind: busmsg.KindFlush, Route: ns + ":" + layercache.DefaultVersion}
}

// localHit reports whether n serves key locally with value want.
func (n *node) localHit(t *testing.T, key, want string) bool {
	t.Helper()
	before := n.cache.Stats().LocalHits
	return n.get(t, key) == want && n.cache.Stats().LocalHits == before+1
}

// TestBusReplayedMessageDropped: with a secret, a genuine message captured
// on the wire and sent again, a flush included, is dropped and counted.
func TestBusReplayedMessageDropped(t *testing.T) {
	runBus(t, func(t *testing.T, tgt *redistest.Target, mode busMode) {
		ns := redistest.Namespace(t)
		opts := append(mode.opts(ns), layercache.WithSecret(busSecret))
		a := newNode(t, tgt, ns, opts)
		b := newNode(t, tgt, ns, opts)
		wire := tap(t, tgt, mode, ns)

		set(t, a, "k", "v1")
		eventually(t, "a's invalidation at b", func() bool { return b.cache.Stats().InvalidationsReceived >= 1 })
		captured := wire.last(t)
		// A flush signed by a genuine node: applied once.
		flush := encode(t, 42, time.Now(), 1, busSecret, flushItem(ns))
		flushes := b.cache.Stats().LocalFlushes
		inject(t, tgt, mode, ns, flush)
		eventually(t, "the genuine flush at b", func() bool { return b.cache.Stats().LocalFlushes == flushes+1 })
		b.warm(t, "k", "v1")

		received := b.bus.Stats().Received
		inject(t, tgt, mode, ns, captured)
		inject(t, tgt, mode, ns, flush)
		eventually(t, "both replays dropped", func() bool { return b.bus.Stats().Replays == 2 })
		if st := b.bus.Stats(); st.Received != received || st.Stale != 0 || st.Forged != 0 {
			t.Fatalf("after the replays: %+v", st)
		}
		if !b.localHit(t, "k", "v1") || b.cache.Stats().LocalFlushes != flushes+1 {
			t.Fatalf("a replay reached the local tier: %+v", b.cache.Stats())
		}
		set(t, a, "k", "v2")
		eventually(t, "a's next invalidation", func() bool { return b.get(t, "k") == "v2" })
	})
}

// TestBusStaleMessageDropped: a message sent more than BusReplayWindow
// before (or after) it arrives is dropped, with a secret or without.
func TestBusStaleMessageDropped(t *testing.T) {
	runBus(t, func(t *testing.T, tgt *redistest.Target, mode busMode) {
		for _, secret := range [][]byte{busSecret, nil} {
			t.Run(map[bool]string{true: "secret", false: "no-secret"}[secret != nil], func(t *testing.T) {
				ns := redistest.Namespace(t)
				opts := mode.opts(ns)
				if secret != nil {
					opts = append(opts, layercache.WithSecret(secret))
				}
				b := newNode(t, tgt, ns, opts)
				set(t, b, "k", "v1")
				b.warm(t, "k", "v1")

				flushes := b.cache.Stats().LocalFlushes
				margin := 5 * time.Second
				old := encode(t, 77, time.Now().Add(-layercache.BusReplayWindow-margin), 1, secret, invalidateItem(ns, "k"), flushItem(ns))
				future := encode(t, 77, time.Now().Add(layercache.BusReplayWindow+margin), 2, secret, invalidateItem(ns, "k"), flushItem(ns))
				inject(t, tgt, mode, ns, old)
				inject(t, tgt, mode, ns, future)
				eventually(t, "both dropped as stale", func() bool { return b.bus.Stats().Stale == 2 })
				if st := b.bus.Stats(); st.Received != 0 {
					t.Fatalf("%+v", st)
				}
				if !b.localHit(t, "k", "v1") || b.cache.Stats().LocalFlushes != flushes {
					t.Fatalf("a stale message reached the local tier: %+v", b.cache.Stats())
				}
				// Within the window, skew either way is tolerated.
				skewed := encode(t, 77, time.Now().Add(layercache.BusReplayWindow-margin), 3, secret, invalidateItem(ns, "k"))
				inject(t, tgt, mode, ns, skewed)
				eventually(t, "a skewed but fresh message applied", func() bool { return b.bus.Stats().ReceivedKeys == 1 })
			})
		}
	})
}

// TestBusReorderedMessagesApplied: distinct sequence numbers arriving out
// of order within the window are all applied; only repeats are dropped.
func TestBusReorderedMessagesApplied(t *testing.T) {
	runBus(t, func(t *testing.T, tgt *redistest.Target, mode busMode) {
		ns := redistest.Namespace(t)
		b := newNode(t, tgt, ns, append(mode.opts(ns), layercache.WithSecret(busSecret)))
		for _, k := range []string{"k3", "k4", "k5"} {
			set(t, b, k, "v")
			b.warm(t, k, "v")
		}
		now := time.Now()
		msg := map[uint64][]byte{}
		for seq, k := range map[uint64]string{3: "k3", 4: "k4", 5: "k5"} {
			msg[seq] = encode(t, 55, now, seq, busSecret, invalidateItem(ns, k))
		}
		for _, seq := range []uint64{5, 3, 4} {
			inject(t, tgt, mode, ns, msg[seq])
		}
		eventually(t, "all three applied", func() bool { return b.cache.Stats().InvalidationsReceived == 3 })
		for _, k := range []string{"k3", "k4", "k5"} {
			b.warm(t, k, "v")
		}
		inject(t, tgt, mode, ns, msg[3])
		inject(t, tgt, mode, ns, msg[5])
		inject(t, tgt, mode, ns, encode(t, 55, now, 6, busSecret, invalidateItem(ns, "k5")))
		eventually(t, "the new one applied", func() bool { return b.cache.Stats().InvalidationsReceived == 4 })
		if st := b.bus.Stats(); st.Replays != 2 {
			t.Fatalf("%+v", st)
		}
		if !b.localHit(t, "k3", "v") {
			t.Fatal("a repeated sequence number was applied")
		}
	})
}

// TestBusUnauthenticatedCannotSilence: without a secret, sequence numbers
// are not trusted, so a forged message claiming a node's id and a huge
// sequence number does not make receivers drop that node's messages.
func TestBusUnauthenticatedCannotSilence(t *testing.T) {
	runBus(t, func(t *testing.T, tgt *redistest.Target, mode busMode) {
		ns := redistest.Namespace(t)
		a := newNode(t, tgt, ns, mode.opts(ns))
		b := newNode(t, tgt, ns, mode.opts(ns))
		wire := tap(t, tgt, mode, ns)
		set(t, a, "k", "v1")
		eventually(t, "a's invalidation at b", func() bool { return b.cache.Stats().InvalidationsReceived == 1 })
		m, err := busmsg.Decode(wire.last(t), nil)
		if err != nil {
			t.Fatal(err)
		}
		forged := busmsg.Encode(busmsg.Message{Origin: m.Origin, SentAt: time.Now().UnixMilli(), Seq: 1 << 62,
			Items: []busmsg.Item{invalidateItem(ns, "elsewhere")}}, nil)[0]
		inject(t, tgt, mode, ns, forged)
		eventually(t, "the forgery applied", func() bool { return b.cache.Stats().InvalidationsReceived == 2 })
		b.warm(t, "k", "v1")
		set(t, a, "k", "v2")
		eventually(t, "a still heard", func() bool { return b.get(t, "k") == "v2" })
		if st := b.bus.Stats(); st.Replays != 0 {
			t.Fatalf("%+v", st)
		}
	})
}

// TestBusOldFormat: messages in the format before sequence numbers, as
// nodes not yet upgraded send them, are applied within BusReplayWindow
// (their MAC covers the sending time, when there is a secret) and dropped
// as stale after it.
func TestBusOldFormat(t *testing.T) {
	runBus(t, func(t *testing.T, tgt *redistest.Target, mode busMode) {
		for _, secret := range [][]byte{busSecret, nil} {
			t.Run(map[bool]string{true: "secret", false: "no-secret"}[secret != nil], func(t *testing.T) {
				ns := redistest.Namespace(t)
				opts := mode.opts(ns)
				if secret != nil {
					opts = append(opts, layercache.WithSecret(secret))
				}
				b := newNode(t, tgt, ns, opts)
				set(t, b, "k", "v1")
				b.warm(t, "k", "v1")
				inject(t, tgt, mode, ns, encodeNoSeq(t, 33, time.Now().Add(-layercache.BusReplayWindow-time.Second), secret, invalidateItem(ns, "k")))
				inject(t, tgt, mode, ns, encodeNoSeq(t, 33, time.Now(), secret, invalidateItem(ns, "k")))
				// The bus counts keys once applied; the cache, just before.
				eventually(t, "the fresh one applied", func() bool { return b.bus.Stats().ReceivedKeys == 1 })
				if st := b.bus.Stats(); st.Stale != 1 || st.Forged != 0 || st.Malformed != 0 {
					t.Fatalf("%+v", st)
				}
				redisHits := b.cache.Stats().RedisHits
				if b.get(t, "k") != "v1" || b.cache.Stats().RedisHits != redisHits+1 {
					t.Fatalf("k not dropped: %+v", b.cache.Stats())
				}
			})
		}
	})
}
