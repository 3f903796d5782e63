package layercache

import (
	"context"
	"testing"
	"time"

	"github.com/layercache/layercache/internal/redistest"
)

// casHook runs before() once, just before the wrapped side's next repair.
type casHook struct {
	layoutStore
	before func()
}

func (h *casHook) casMany(ctx context.Context, ops []casOp) ([]bool, error) {
	if f := h.before; f != nil {
		h.before = nil
		f()
	}
	return h.layoutStore.casMany(ctx, ops)
}

// A repairing reconcile reads both sides, a Delete runs, then the repair
// of a key found on one side only: "expect absent" holds on the side the
// Delete emptied, and without a fence the repair would write the deleted
// value back there.
func TestReconcileRepairAfterDeleteIsDropped(t *testing.T) {
	for _, lc := range fenceLayouts {
		t.Run(lc.name, func(t *testing.T) {
			redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
				ctx := context.Background()
				d := newTestDual(t, tgt, lc.from, lc.to, PhaseDualWrite)
				if _, err := d.sides[sideOld].write(ctx, "k", testEnv(uint64(time.Now().UnixMilli())<<16|1, "deleted"), time.Minute, writeOpts{}); err != nil {
					t.Fatal(err)
				}
				sides := d.sides
				sides[sideNew] = &casHook{layoutStore: d.sides[sideNew], before: func() {
					if err := d.del(ctx, []string{"k"}); err != nil {
						t.Error(err)
					}
				}}
				phase := func(context.Context) (Phase, error) { return PhaseDualWrite, nil }
				canon := func(p []byte) ([]byte, bool) { return p, true }
				rep, err := reconcile(ctx, sides, phase, canon, systemClock{}, ReconcileOptions{Repair: true})
				if err != nil {
					t.Fatal(err)
				}
				if rep.OnlyOld != 1 || rep.Repaired != 0 || rep.RepairSkipped != 1 {
					t.Errorf("report %+v: want the one repair skipped", rep)
				}
				for side := range d.sides {
					if got := payloadOf(t, d.sides[side], "k"); got != "<absent>" {
						t.Errorf("%s side after the Delete = %q, want absent (the repair brought it back)", sideName(side), got)
					}
				}
			})
		})
	}
}
