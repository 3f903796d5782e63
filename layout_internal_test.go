package layercache

import (
	"context"
	"testing"
	"time"

	"github.com/layercache/layercache/internal/envelope"
	"github.com/layercache/layercache/internal/redistest"
)

func testEnv(version uint64, payload string) []byte {
	now := time.Now().UnixMilli()
	return envelope.Encode(envelope.Header{WrittenAt: now, FreshUntil: now + 60_000, ExpiresAt: now + 60_000, WriteVersion: version}, []byte(payload))
}

func storedVersion(t *testing.T, s layoutStore, key string) (uint64, string) {
	t.Helper()
	b, err := s.get(context.Background(), key)
	if err != nil || b == nil {
		t.Fatalf("get(%q) = %v, %v", key, b, err)
	}
	h, p, err := envelope.Decode(b)
	if err != nil {
		t.Fatal(err)
	}
	return h.WriteVersion, string(p)
}

// TestWriteModes checks, for every layout store, that fresh writes always
// land with growing versions whatever their proposal, and that copies are
// set-if-newer.
func TestWriteModes(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		client := tgt.NewClient(t)
		ns := redistest.Namespace(t)
		keys := newKeyspace(ns, "v1")
		now := func() int64 { return time.Now().UnixMilli() }
		stores := []layoutStore{
			newLayoutStore(client, keys, KeyPerEntry(), now, time.Minute),
			newLayoutStore(client, keys, Hash(4), now, time.Minute),
			newLayoutStore(client, keys, Raw(ns+":raw:%s"), now, time.Minute),
		}
		const writerA, writerB = 0x0001, 0x0002
		v := func(counter uint64, writer uint64) uint64 { return counter<<16 | writer }
		for _, s := range stores {
			t.Run(s.layout().String(), func(t *testing.T) {
				key := "k"
				r, err := s.write(ctx, key, testEnv(v(1000, writerA), "one"), time.Minute, writeOpts{})
				if err != nil || !r.written || r.version != v(1000, writerA) {
					t.Fatalf("first fresh write: %x, %v, %v", r.version, r.written, err)
				}
				// A fresh write proposing an older version still lands, one
				// counter step past the stored version, with its writer id.
				r, err = s.write(ctx, key, testEnv(v(10, writerB), "two"), time.Minute, writeOpts{})
				if err != nil || !r.written || r.version != v(1001, writerB) {
					t.Fatalf("fresh write behind the stored version: %x, %v, %v; want %x", r.version, r.written, err, v(1001, writerB))
				}
				if sv, p := storedVersion(t, s, key); sv != v(1001, writerB) || p != "two" {
					t.Fatalf("stored %x %q", sv, p)
				}
				// Copies are set-if-newer: equal or older ones are dropped.
				for _, old := range []uint64{v(1001, writerB), v(1001, writerA), v(5, writerA)} {
					if r, err := s.write(ctx, key, testEnv(old, "stale"), time.Minute, writeOpts{copy: true}); err != nil || r.written {
						t.Fatalf("copy of %x over %x: written=%v, %v", old, v(1001, writerB), r.written, err)
					}
				}
				if r, err := s.write(ctx, key, testEnv(v(2000, writerA), "newer"), time.Minute, writeOpts{copy: true}); err != nil || !r.written {
					t.Fatalf("newer copy: written=%v, %v", r.written, err)
				}
				if sv, p := storedVersion(t, s, key); sv != v(2000, writerA) || p != "newer" {
					t.Fatalf("stored %x %q after a newer copy", sv, p)
				}
				// A copy lands on an absent entry.
				if r, err := s.write(ctx, "absent", testEnv(v(1, writerA), "x"), time.Minute, writeOpts{copy: true}); err != nil || !r.written {
					t.Fatalf("copy onto an absent entry: %v, %v", r.written, err)
				}
			})
		}

		// A Raw key overwritten by other code loses its version: the value
		// is unversioned, so any copy replaces it.
		raw := stores[2].(*rawStore)
		if err := client.Set(ctx, raw.rawKey("k"), "foreign", time.Minute).Err(); err != nil {
			t.Fatal(err)
		}
		if sv, p := storedVersion(t, raw, "k"); sv != 0 || p != "foreign" {
			t.Fatalf("after a foreign write: version %x, %q; want 0, foreign", sv, p)
		}
		if r, err := raw.write(ctx, "k", testEnv(v(3, writerA), "copy"), time.Minute, writeOpts{copy: true}); err != nil || !r.written {
			t.Fatalf("copy over an unversioned raw value: %v, %v", r.written, err)
		}
	})
}

// TestExpiredHashFieldDoesNotBlockCopies: a field past its expiry, waiting
// for the sweep, counts as absent for a set-if-newer copy.
func TestExpiredHashFieldDoesNotBlockCopies(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		clock := NewManualClock(time.Now())
		now := func() int64 { return clock.Now().UnixMilli() }
		s := newHashStore(tgt.NewClient(t), newKeyspace(redistest.Namespace(t), "v1"), Hash(2), now)
		high := uint64(time.Now().Add(time.Hour).UnixMilli()) << 16
		if _, err := s.write(ctx, "k", testEnv(high, "expired"), time.Minute, writeOpts{}); err != nil {
			t.Fatal(err)
		}
		if r, _ := s.write(ctx, "k", testEnv(5<<16, "copy"), time.Minute, writeOpts{copy: true}); r.written {
			t.Fatal("a lower copy replaced a live field")
		}
		clock.Advance(2 * time.Minute)
		env := envelope.Encode(envelope.Header{WrittenAt: now(), FreshUntil: now() + 60_000, ExpiresAt: now() + 60_000, WriteVersion: 5 << 16}, []byte("copy"))
		if r, err := s.write(ctx, "k", env, time.Minute, writeOpts{copy: true}); err != nil || !r.written {
			t.Fatalf("a copy over an expired field: written=%v, %v", r.written, err)
		}
	})
}
