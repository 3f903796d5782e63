package layercache

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/layercache/layercache/internal/envelope"
	"github.com/layercache/layercache/internal/redistest"
)

// newTestDual returns a dual store over the given layouts whose phase is
// set by the test, not read from Redis.
func newTestDual(t *testing.T, tgt *redistest.Target, from, to func(ns string) Layout, p Phase) *dualStore {
	client := tgt.NewClient(t)
	ns := redistest.Namespace(t)
	keys := newKeyspace(ns, "v1")
	now := func() int64 { return time.Now().UnixMilli() }
	m := newMigration(ns, client, time.Hour, systemClock{}, nil)
	m.phase.Store(int32(p))
	m.known.Store(true)
	return &dualStore{mig: m, now: now, sides: [2]layoutStore{
		newLayoutStore(client, keys, from(ns), now, time.Minute),
		newLayoutStore(client, keys, to(ns), now, time.Minute),
	}}
}

func payloadOf(t *testing.T, s store, key string) string {
	t.Helper()
	b, err := s.get(context.Background(), key)
	if err != nil {
		t.Fatal(err)
	}
	if b == nil {
		return "<absent>"
	}
	_, p, err := envelope.Decode(b)
	if err != nil {
		t.Fatal(err)
	}
	return string(p)
}

var dualLayouts = []struct {
	name     string
	from, to func(ns string) Layout
}{
	{"raw-to-hash", func(ns string) Layout { return Raw(ns + ":p:%s") }, func(string) Layout { return Hash(3) }},
	{"keys-to-raw", func(string) Layout { return KeyPerEntry() }, func(ns string) Layout { return Raw(ns + ":p:%s") }},
}

// TestBackfillLosesToAConcurrentWrite plays the race of a fallback read
// with a write: the reader misses the preferred side, reads the old value
// on the other side, a writer (whose clock is far behind) writes both
// sides, and only then does the reader backfill. The backfill must not
// replace the newer write, on any layout pair.
func TestBackfillLosesToAConcurrentWrite(t *testing.T) {
	for _, lc := range dualLayouts {
		t.Run(lc.name, func(t *testing.T) {
			redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
				ctx := context.Background()
				d := newTestDual(t, tgt, lc.from, lc.to, PhaseReadNewFirst)
				// The old side holds "v1", written by an instance whose
				// clock runs an hour ahead.
				ahead := uint64(time.Now().Add(time.Hour).UnixMilli())<<16 | 1
				if _, err := d.sides[sideOld].write(ctx, "k", testEnv(ahead, "v1"), time.Minute, writeOpts{}); err != nil {
					t.Fatal(err)
				}
				// Writer, with a correct clock (an hour behind the first),
				// lands between the reader's fallback read and its backfill.
				behind := uint64(time.Now().UnixMilli())<<16 | 2
				d.sides[sideNew] = &hookSide{layoutStore: d.sides[sideNew], before: func() {
					if _, err := d.write(ctx, "k", testEnv(behind, "v2"), time.Minute, writeOpts{}); err != nil {
						t.Error(err)
					}
				}}
				// Reader: preferred (new) side misses, the old side has v1;
				// the backfill arrives after the write.
				if got := payloadOf(t, d, "k"); got != "v1" {
					t.Fatalf("fallback read = %q, want v1", got)
				}
				for side := range d.sides {
					if got := payloadOf(t, d.sides[side], "k"); got != "v2" {
						t.Fatalf("%s side holds %q after the late backfill; want the newer write v2", sideName(side), got)
					}
				}
				if d.mig.sides[sideNew].get(evSideBackfills) != 0 {
					t.Fatal("a rejected backfill was counted")
				}
				// A backfill onto a side that lacks the key lands.
				if _, err := d.sides[sideOld].write(ctx, "other", testEnv(behind, "x"), time.Minute, writeOpts{}); err != nil {
					t.Fatal(err)
				}
				_ = payloadOf(t, d, "other")
				if got := payloadOf(t, d.sides[sideNew], "other"); got != "x" || d.mig.sides[sideNew].get(evSideBackfills) != 1 {
					t.Fatalf("backfill onto an absent key: %q", got)
				}
			})
		})
	}
}

// TestReorderedDualWritesConverge interleaves two dual writes of one key
// in every order of their four steps (first side, second side each) and
// checks that both sides end with the same value, the one whose first
// side landed last, and the same write version.
func TestReorderedDualWritesConverge(t *testing.T) {
	for _, lc := range dualLayouts {
		t.Run(lc.name, func(t *testing.T) {
			redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
				ctx := context.Background()
				d := newTestDual(t, tgt, lc.from, lc.to, PhaseReadOldFirst)
				// The steps of a dual write, split: version read + first
				// side, then the copy to the second side.
				type half struct {
					env []byte
					v   uint64
				}
				firstHalf := func(key, payload string, proposal uint64) half {
					other, err := d.sides[sideNew].version(ctx, key)
					if err != nil {
						t.Fatal(err)
					}
					env := envelope.ProposePast(testEnv(proposal, payload), other)
					r, err := d.sides[sideOld].write(ctx, key, env, time.Minute, writeOpts{})
					if err != nil || !r.written {
						t.Fatalf("first side: %v, %v", r.written, err)
					}
					return half{envelope.WithWriteVersion(env, r.version), r.version}
				}
				secondHalf := func(key string, h half) {
					if _, err := d.sides[sideNew].write(ctx, key, h.env, time.Minute, writeOpts{copy: true}); err != nil {
						t.Fatal(err)
					}
				}
				// a's proposal is newer by its clock, but b's first side lands later.
				orders := [][]string{{"a1", "b1", "a2", "b2"}, {"a1", "b1", "b2", "a2"}, {"a1", "a2", "b1", "b2"}}
				for n, order := range orders {
					key := fmt.Sprint("k", n)
					now := uint64(time.Now().UnixMilli())
					var ha, hb half
					for _, step := range order {
						switch step {
						case "a1":
							ha = firstHalf(key, "a", (now+5000)<<16|1)
						case "b1":
							hb = firstHalf(key, "b", now<<16|2)
						case "a2":
							secondHalf(key, ha)
						case "b2":
							secondHalf(key, hb)
						}
					}
					for side := range d.sides {
						if got := payloadOf(t, d.sides[side], key); got != "b" {
							t.Fatalf("order %v: %s side holds %q, want b (its first side landed last)", order, sideName(side), got)
						}
					}
					vo, _ := d.sides[sideOld].version(ctx, key)
					vn, _ := d.sides[sideNew].version(ctx, key)
					if vo != vn || vo != hb.v {
						t.Fatalf("order %v: versions old %x, new %x, want both %x", order, vo, vn, hb.v)
					}
					// A retried copy of the older write changes nothing.
					secondHalf(key, ha)
					if got := payloadOf(t, d.sides[sideNew], key); got != "b" {
						t.Fatalf("a retried older copy landed: %q", got)
					}
				}
			})
		})
	}
}

// TestSingleSidePhaseInvalidatesTheOtherSide checks that a write in
// PhaseOld or PhaseNewOnly deletes the other side's copy, proposing past
// its version.
func TestSingleSidePhaseInvalidatesTheOtherSide(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		for _, p := range []Phase{PhaseOld, PhaseNewOnly} {
			d := newTestDual(t, tgt, dualLayouts[0].from, dualLayouts[0].to, p)
			active, other := authority(p), 1-authority(p)
			ahead := uint64(time.Now().Add(time.Hour).UnixMilli())<<16 | 1
			if _, err := d.sides[other].write(ctx, "k", testEnv(ahead, "old"), time.Minute, writeOpts{}); err != nil {
				t.Fatal(err)
			}
			if _, err := d.write(ctx, "k", testEnv(uint64(time.Now().UnixMilli())<<16|2, "new"), time.Minute, writeOpts{}); err != nil {
				t.Fatal(err)
			}
			if got := payloadOf(t, d.sides[other], "k"); got != "<absent>" {
				t.Fatalf("%v: the other side still holds %q", p, got)
			}
			v, _ := d.sides[active].version(ctx, "k")
			if v>>16 <= ahead>>16 {
				t.Fatalf("%v: stored version %x not past the other side's %x", p, v, ahead)
			}
			if d.mig.sides[other].get(evSideInvalidations) != 1 {
				t.Fatalf("%v: invalidations not counted", p)
			}
		}
	})
}

// TestNotifyRereadsThePhase checks the hook a Bus uses to push phase
// changes: with polling effectively off, notify makes the follower read
// the control key at once.
func TestNotifyRereadsThePhase(t *testing.T) {
	tgt := redistest.Miniredis(t)
	client := tgt.NewClient(t)
	ctx := context.Background()
	c, err := New[string](client, WithMigration("m", KeyPerEntry(), Hash(2)), WithPhasePollInterval(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.mig.current(ctx); err != nil {
		t.Fatal(err)
	}
	if err := SetPhase(ctx, client, "m", PhaseDualWrite); err != nil {
		t.Fatal(err)
	}
	c.mig.notify()
	deadline := time.Now().Add(5 * time.Second)
	for c.Phase() != PhaseDualWrite {
		if time.Now().After(deadline) {
			t.Fatal("notify did not make the cache re-read its phase")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if c.Stats().Migration.PhaseChanges != 1 {
		t.Fatalf("phase changes = %d", c.Stats().Migration.PhaseChanges)
	}
}

// TestSetAcrossThePhaseSwitchBreaksBothLeases plays a read-old-first
// instance that holds the lease on the old side while a read-new-first
// instance sets the key: the holder's fill must not land on either side.
func TestSetAcrossThePhaseSwitchBreaksBothLeases(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		client := tgt.NewClient(t)
		ns := redistest.Namespace(t)
		keys := newKeyspace(ns, "v1")
		now := func() int64 { return time.Now().UnixMilli() }
		mk := func(p Phase) *dualStore {
			m := newMigration(ns, client, time.Hour, systemClock{}, nil)
			m.phase.Store(int32(p))
			m.known.Store(true)
			return &dualStore{mig: m, now: now, sides: [2]layoutStore{
				newLayoutStore(client, keys, Raw(ns+":p:%s"), now, time.Minute),
				newLayoutStore(client, keys, Hash(3), now, time.Minute),
			}}
		}
		lagging, ahead := mk(PhaseReadOldFirst), mk(PhaseReadNewFirst)
		att, err := lagging.acquireLease(ctx, "k", "token", time.Minute, false)
		if err != nil || !att.acquired {
			t.Fatalf("acquire: %+v, %v", att, err)
		}
		p := uint64(time.Now().UnixMilli()) << 16
		if _, err := ahead.write(ctx, "k", testEnv(p|2, "set"), time.Minute, writeOpts{breakLease: true}); err != nil {
			t.Fatal(err)
		}
		r, err := lagging.write(ctx, "k", testEnv(p|1, "stale fill"), time.Minute, writeOpts{lease: "token"})
		if err != nil || r.written {
			t.Fatalf("the fill of a broken lease: %v, %v", r.written, err)
		}
		for side := range ahead.sides {
			if got := payloadOf(t, ahead.sides[side], "k"); got != "set" {
				t.Fatalf("%s side holds %q, want the Set's value", sideName(side), got)
			}
		}
	})
}
