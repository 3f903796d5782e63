package layercache

import (
	"context"
	"testing"
	"time"

	"github.com/layercache/layercache/internal/envelope"
	"github.com/layercache/layercache/internal/redistest"
)

// An upgrade on read reads the older version, a Delete runs, then the
// upgrade's copy: it must not bring the deleted value back at the current
// version.
func TestUpgradeCopyAfterDeleteIsDropped(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		client := tgt.NewClient(t)
		ns := redistest.Namespace(t)
		now := func() int64 { return time.Now().UnixMilli() }
		cur := newLayoutStore(client, newKeyspace(ns, "v2"), KeyPerEntry(), now, time.Minute)
		old := newLayoutStore(client, newKeyspace(ns, "v1"), KeyPerEntry(), now, time.Minute)
		if _, err := old.write(ctx, "k", testEnv(uint64(now())<<16|1, `"v1"`), time.Minute, writeOpts{}); err != nil {
			t.Fatal(err)
		}
		var c recorder
		h := &hookSide{layoutStore: cur}
		u := &upgradingStore{store: h, now: now, rec: &c, logs: &throttledLog{},
			olds: []oldVersion{{version: "v1", st: old, convert: func(p []byte) ([]byte, error) { return p, nil }}}}
		h.before = func() {
			if err := u.del(ctx, []string{"k"}); err != nil {
				t.Error(err)
			}
		}
		if got := payloadOf(t, u, "k"); got != `"v1"` { // the racing reader
			t.Fatalf("upgrade read = %q", got)
		}
		if got := payloadOf(t, u, "k"); got != "<absent>" {
			t.Errorf("read after the Delete = %q, want a miss (the upgrade's copy landed after the Delete)", got)
		}
	})
}

// A Set from a writer whose clock is behind the older version's writer
// must still win over an upgrade copy of the older value; and a value
// that fails validation is not written at the current version.
func TestUpgradeSetRaisesVersionAndValidatesBeforeWrite(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		client := tgt.NewClient(t)
		ns := redistest.Namespace(t)
		now := func() int64 { return time.Now().UnixMilli() }
		cur := newLayoutStore(client, newKeyspace(ns, "v2"), KeyPerEntry(), now, time.Minute)
		old := newLayoutStore(client, newKeyspace(ns, "v1"), KeyPerEntry(), now, time.Minute)
		ahead := uint64(time.Now().Add(time.Hour).UnixMilli())<<16 | 1
		if _, err := old.write(ctx, "k", testEnv(ahead, "old"), time.Minute, writeOpts{}); err != nil {
			t.Fatal(err)
		}
		var c recorder
		u := &upgradingStore{store: cur, now: now, rec: &c, logs: &throttledLog{},
			olds: []oldVersion{{version: "v1", st: old, convert: func(p []byte) ([]byte, error) { return p, nil }}}}
		behind := uint64(now())<<16 | 2
		if _, err := u.write(ctx, "k", testEnv(behind, "new"), time.Minute, writeOpts{}); err != nil {
			t.Fatal(err)
		}
		b, err := cur.get(ctx, "k")
		if err != nil || envelope.WriteVersion(b) <= ahead {
			t.Fatalf("Set stored version %x, want past the older version's %x (%v)", envelope.WriteVersion(b), ahead, err)
		}

		if _, err := old.write(ctx, "bad", testEnv(ahead, "bad"), time.Minute, writeOpts{}); err != nil {
			t.Fatal(err)
		}
		u.validate = func(context.Context, string, []byte) bool { return false }
		if got := payloadOf(t, u, "bad"); got != "<absent>" {
			t.Errorf("an invalid upgrade was served: %q", got)
		}
		if got := payloadOf(t, cur, "bad"); got != "<absent>" {
			t.Errorf("an invalid upgrade was written at the current version: %q", got)
		}
	})
}
