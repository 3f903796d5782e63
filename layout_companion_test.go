package layercache

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/layercache/layercache/internal/envelope"
	"github.com/layercache/layercache/internal/redistest"
)

// A Raw user key whose raw key ends like a companion key is refused: with
// Raw("<ns>:p:%s"), key "{42}\xfflc:wv" would be the stamp of key "{42}".
func TestRawRefusesCompanionLikeKeys(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		client := tgt.NewClient(t)
		ns := redistest.Namespace(t)
		now := func() int64 { return time.Now().UnixMilli() }
		s := newLayoutStore(client, newKeyspace(ns, "v1"), Raw(ns+":p:%s"), now, time.Minute)
		env := testEnv(uint64(now())<<16|1, "v")
		if _, err := s.write(ctx, "{42}", env, time.Minute, writeOpts{}); err != nil {
			t.Fatal(err)
		}
		for _, suf := range []string{rawStampSuffix, rawLeaseSuffix, rawNoticeSuffix, rawFenceSuffix} {
			k := "{42}" + suf
			if _, err := s.write(ctx, k, env, time.Minute, writeOpts{}); !errors.Is(err, ErrInvalidKey) {
				t.Errorf("set(%q) = %v, want ErrInvalidKey", k, err)
			}
			if _, err := s.get(ctx, k); !errors.Is(err, ErrInvalidKey) {
				t.Errorf("get(%q) = %v, want ErrInvalidKey", k, err)
			}
			if err := s.del(ctx, []string{k}); err != nil {
				t.Errorf("del(%q) = %v", k, err)
			}
		}
		// Nothing above touched key "{42}"'s value or stamp.
		b, err := s.get(ctx, "{42}")
		if err != nil || b == nil {
			t.Fatalf("get({42}) = %v, %v", b, err)
		}
		if v := envelope.WriteVersion(b); v != envelope.WriteVersion(env) {
			t.Fatalf("version of {42} = %x, want %x (its stamp was lost or overwritten)", v, envelope.WriteVersion(env))
		}
	})
}

// shardTags is computed once per shard count: building a Hash(1024) store
// must not cost its ~85ms of CPU on every New.
func TestShardTagsMemoised(t *testing.T) {
	a := shardTags(MaxHashShards)
	b := shardTags(MaxHashShards)
	if &a[0] != &b[0] {
		t.Error("shardTags recomputed the tags")
	}
	want := computeShardTags(7)
	got := shardTags(7)
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("shardTags(7)[%d] = %q, want %q", i, got[i], want[i])
		}
	}
}

func BenchmarkShardTags1024(b *testing.B) {
	for b.Loop() {
		_ = shardTags(1024)
	}
}
