package layercache

import (
	"context"
	"testing"
	"time"

	"github.com/layercache/layercache/internal/envelope"
	"github.com/layercache/layercache/internal/redistest"
)

// hookSide runs before() once, just before the wrapped side's next write
// or copy: the place to play a Delete racing with a copy.
type hookSide struct {
	layoutStore
	before func()
}

func (h *hookSide) fire() {
	if f := h.before; f != nil {
		h.before = nil
		f()
	}
}

func (h *hookSide) write(ctx context.Context, key string, env []byte, ttl time.Duration, w writeOpts) (writeResult, error) {
	h.fire()
	return h.layoutStore.write(ctx, key, env, ttl, w)
}

func (h *hookSide) writeMany(ctx context.Context, ops []writeOp) ([]writeResult, error) {
	h.fire()
	return h.layoutStore.writeMany(ctx, ops)
}

var fenceLayouts = append([]struct {
	name     string
	from, to func(ns string) Layout
}{{"keys-to-hash", func(string) Layout { return KeyPerEntry() }, func(string) Layout { return Hash(3) }}}, dualLayouts...)

// A lease holder's fill lands on the first side, a Delete removes both
// sides and leases, then the copy to the second side runs: it must not
// land, or a later fallback read would serve and backfill the deleted
// value. The same holds for a dual Set's copy.
func TestDualCopyAfterDeleteIsDropped(t *testing.T) {
	for _, lc := range fenceLayouts {
		for _, op := range []string{"fill", "set-breaking-lease", "set"} {
			t.Run(lc.name+"/"+op, func(t *testing.T) {
				redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
					ctx := context.Background()
					d := newTestDual(t, tgt, lc.from, lc.to, PhaseReadOldFirst)
					d.sides[sideNew] = &hookSide{layoutStore: d.sides[sideNew], before: func() {
						if err := d.del(ctx, []string{"k"}); err != nil {
							t.Error(err)
						}
					}}
					env := testEnv(uint64(time.Now().UnixMilli())<<16|1, "before-delete")
					switch op {
					case "fill":
						att, err := d.acquireLease(ctx, "k", "tok", time.Minute, false)
						if err != nil || !att.acquired {
							t.Fatal(att, err)
						}
						if r, err := d.write(ctx, "k", env, time.Minute, writeOpts{lease: "tok"}); err != nil || !r.written {
							t.Fatal(r, err)
						}
					case "set-breaking-lease":
						if _, err := d.write(ctx, "k", env, time.Minute, writeOpts{breakLease: true}); err != nil {
							t.Fatal(err)
						}
					case "set":
						if _, err := d.write(ctx, "k", env, time.Minute, writeOpts{}); err != nil {
							t.Fatal(err)
						}
					}
					for side := range d.sides {
						if got := payloadOf(t, d.sides[side], "k"); got != "<absent>" {
							t.Errorf("%s side after the Delete = %q, want absent (the copy landed after the Delete)", sideName(side), got)
						}
					}
					if got := payloadOf(t, d, "k"); got != "<absent>" {
						t.Errorf("read after the Delete = %q, want a miss", got)
					}
				})
			})
		}
	}
}

// A fallback read finds v on the other side, a Delete runs, then the
// backfill: it must not write v back into the emptied preferred side.
func TestDualBackfillAfterDeleteIsDropped(t *testing.T) {
	for _, lc := range fenceLayouts {
		t.Run(lc.name, func(t *testing.T) {
			redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
				ctx := context.Background()
				d := newTestDual(t, tgt, lc.from, lc.to, PhaseReadOldFirst)
				if _, err := d.sides[sideNew].write(ctx, "k", testEnv(uint64(time.Now().UnixMilli())<<16|1, "v1"), time.Minute, writeOpts{}); err != nil {
					t.Fatal(err)
				}
				d.sides[sideOld] = &hookSide{layoutStore: d.sides[sideOld], before: func() {
					if err := d.del(ctx, []string{"k"}); err != nil {
						t.Error(err)
					}
				}}
				if got := payloadOf(t, d, "k"); got != "v1" { // the racing reader
					t.Fatalf("fallback read = %q, want v1", got)
				}
				if got := payloadOf(t, d, "k"); got != "<absent>" {
					t.Errorf("read after the Delete = %q, want a miss (the backfill landed after the Delete)", got)
				}
				if n := d.mig.sides[sideOld].get(evSideBackfills); n != 0 {
					t.Errorf("%d backfills counted, want 0", n)
				}
				// Without a Delete the backfill still lands.
				if _, err := d.sides[sideNew].write(ctx, "k2", testEnv(uint64(time.Now().UnixMilli())<<16|1, "v2"), time.Minute, writeOpts{}); err != nil {
					t.Fatal(err)
				}
				_ = payloadOf(t, d, "k2")
				if got := payloadOf(t, d.sides[sideOld], "k2"); got != "v2" {
					t.Errorf("old side after a backfill = %q, want v2", got)
				}
			})
		})
	}
}

// A backfill into a Raw side of a value already past its fresh time must
// not write it with its whole remaining lifetime, which Raw readers would
// take as fresh.
func TestRawBackfillKeepsStaleStale(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		d := newTestDual(t, tgt, func(ns string) Layout { return Raw(ns + ":p:%s") }, func(string) Layout { return Hash(3) }, PhaseReadOldFirst)
		now := time.Now().UnixMilli()
		env := envelope.Encode(envelope.Header{WrittenAt: now - 120_000, FreshUntil: now - 60_000, ExpiresAt: now + 3_600_000,
			WriteVersion: uint64(now)<<16 | 1}, []byte(`"x"`))
		if _, err := d.sides[sideNew].write(ctx, "k", env, time.Hour, writeOpts{copy: true}); err != nil {
			t.Fatal(err)
		}
		_ = payloadOf(t, d, "k") // fallback, and the backfill into Raw
		b, err := d.get(ctx, "k")
		if err != nil || b == nil {
			t.Fatal(b, err)
		}
		if h, _, _ := envelope.Decode(b); h.FreshUntil > time.Now().UnixMilli() {
			t.Errorf("a value stale for a minute reads as fresh for %v more", time.Duration(h.FreshUntil-time.Now().UnixMilli())*time.Millisecond)
		}
	})
}
