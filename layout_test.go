package layercache_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/layercache/layercache"
	"github.com/layercache/layercache/internal/redistest"
	"github.com/redis/go-redis/v9"
)

// noLoad is a loader that must not run.
func noLoad[T any](t *testing.T) func(context.Context) (T, error) {
	return func(context.Context) (T, error) {
		t.Error("the loader ran, but the value was cached")
		var zero T
		return zero, errors.New("unexpected load")
	}
}

func TestHashLayout(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		client := tgt.NewClient(t)
		ns := redistest.Namespace(t)
		c := newCache[user](t, client, layercache.WithNamespace(ns), layercache.WithLayout(layercache.Hash(8)))
		const n = 200
		for i := range n {
			if err := c.Set(ctx, fmt.Sprint("u", i), user{ID: i}); err != nil {
				t.Fatal(err)
			}
		}
		for i := range n {
			got, err := c.Fetch(ctx, fmt.Sprint("u", i), noLoad[user](t))
			if err != nil || got.ID != i {
				t.Fatalf("Fetch(u%d) = %+v, %v", i, got, err)
			}
		}
		shards := layercache.ShardKeys(ns, "v1", 8)
		keys := scanAll(ctx, t, client, ns+"*")
		for _, k := range keys {
			if !contains(shards, k) {
				t.Fatalf("key %q is not one of the layout's hashes %q", k, shards)
			}
		}
		var fields int64
		for _, s := range shards {
			fields += client.HLen(ctx, s).Val()
			if ttl := client.PTTL(ctx, s).Val(); ttl <= 0 && client.Exists(ctx, s).Val() == 1 {
				t.Fatalf("hash %s has no TTL (%v): it would outlive its fields", s, ttl)
			}
		}
		if fields != n {
			t.Fatalf("%d fields in the hashes, want %d", fields, n)
		}
		if err := c.Delete(ctx, "u1", "u2"); err != nil {
			t.Fatal(err)
		}
		if _, err := c.Get(ctx, "u1"); !errors.Is(err, layercache.ErrNotFound) {
			t.Fatalf("Get after Delete = %v", err)
		}
		if tgt.Cluster {
			// The hashes spread over every master.
			perNode := map[string]int{}
			var mu sync.Mutex
			err := client.(*redis.ClusterClient).ForEachMaster(ctx, func(ctx context.Context, node *redis.Client) error {
				for _, s := range shards {
					if node.Exists(ctx, s).Val() == 1 {
						mu.Lock()
						perNode[node.Options().Addr]++
						mu.Unlock()
					}
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			if len(perNode) != 3 {
				t.Fatalf("8 hashes on %d masters (%v), want all 3", len(perNode), perNode)
			}
			// A key's lease shares its hash's slot.
			for _, s := range shards {
				if err := client.Eval(ctx, "return redis.call('exists', KEYS[1], KEYS[2])", []string{s, s + ":lease:u3"}).Err(); err != nil {
					t.Fatalf("hash and lease in different slots: %v", err)
				}
			}
		}
	})
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

func TestHashExpiredFieldsAreMissesAndSwept(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		client := tgt.NewClient(t)
		ns := redistest.Namespace(t)
		clock := layercache.NewManualClock(time.Now())
		c := newCache[user](t, client, layercache.WithNamespace(ns), layercache.WithLayout(layercache.Hash(2)),
			layercache.WithTTL(time.Minute), layercache.WithClock(clock), layercache.WithSweepInterval(20*time.Millisecond))
		for _, k := range []string{"a", "b", "c"} {
			if err := c.Set(ctx, k, user{Name: k}); err != nil {
				t.Fatal(err)
			}
		}
		clock.Advance(2 * time.Minute)
		if _, err := c.Get(ctx, "a"); !errors.Is(err, layercache.ErrNotFound) {
			t.Fatalf("Get of an expired field = %v, want ErrNotFound", err)
		}
		if err := c.Set(ctx, "d", user{Name: "d"}); err != nil { // fresh: must survive the sweep
			t.Fatal(err)
		}
		fields := func() int64 {
			var n int64
			for _, s := range layercache.ShardKeys(ns, "v1", 2) {
				n += client.HLen(ctx, s).Val()
			}
			return n
		}
		waitFor(t, func() bool { return fields() == 1 })
		if got, err := c.Get(ctx, "d"); err != nil || got.Name != "d" {
			t.Fatalf("the sweep took a fresh field: %+v, %v", got, err)
		}
		if st := c.Stats(); st.Swept != 3 {
			t.Fatalf("Swept = %d, want 3", st.Swept)
		}
	})
}

func TestRawLayoutInteroperatesWithLegacyCode(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		client := tgt.NewClient(t)
		ns := redistest.Namespace(t)
		pattern := ns + ":product:%s"
		legacyKey := func(k string) string { return fmt.Sprintf(pattern, k) }

		// Code that predates the library.
		p42 := product{ID: 42, Name: "legacy", Price: 9.5, Tags: []string{"a"}}
		raw, _ := json.Marshal(p42)
		if err := client.Set(ctx, legacyKey("42"), raw, time.Hour).Err(); err != nil {
			t.Fatal(err)
		}
		if err := client.Set(ctx, legacyKey("7"), `{"id":7,"name":"no ttl"}`, 0).Err(); err != nil {
			t.Fatal(err)
		}

		c := newCache[product](t, client, layercache.WithNamespace(ns), layercache.WithLayout(layercache.Raw(pattern)),
			layercache.WithTTL(10*time.Minute))
		for _, k := range []string{"42", "7"} {
			got, err := c.Fetch(ctx, k, noLoad[product](t))
			if err != nil || got.Name == "" {
				t.Fatalf("legacy key %s: Fetch = %+v, %v", k, got, err)
			}
		}

		// What the cache writes, legacy code reads byte for byte.
		p43 := product{ID: 43, Name: "new", Price: 1, Tags: []string{"x", "y"}}
		if err := c.Set(ctx, "43", p43); err != nil {
			t.Fatal(err)
		}
		want, _ := json.Marshal(p43)
		got, err := client.Get(ctx, legacyKey("43")).Bytes()
		if err != nil || string(got) != string(want) {
			t.Fatalf("legacy GET = %q, %v; want %q", got, err, want)
		}
		if ttl := client.PTTL(ctx, legacyKey("43")).Val(); ttl <= 0 || ttl > 10*time.Minute {
			t.Fatalf("raw key TTL %v, want the cache's TTL", ttl)
		}
		// A write by legacy code after the cache's is what the cache reads.
		p43.Name = "rewritten by legacy code"
		raw, _ = json.Marshal(p43)
		client.Set(ctx, legacyKey("43"), raw, time.Hour)
		if got, err := c.Get(ctx, "43"); err != nil || got.Name != p43.Name {
			t.Fatalf("after a legacy write, Get = %+v, %v", got, err)
		}

		// "Not found" is cached beside the key; legacy code sees a miss.
		var calls int
		missing := func(context.Context) (product, error) { calls++; return product{}, layercache.ErrNotFound }
		for range 2 {
			if _, err := c.Fetch(ctx, "404", missing); !errors.Is(err, layercache.ErrNotFound) {
				t.Fatal(err)
			}
		}
		if calls != 1 {
			t.Fatalf("a cached not-found on Raw loaded %d times, want 1", calls)
		}
		if n := client.Exists(ctx, legacyKey("404")).Val(); n != 0 {
			t.Fatal("a negative entry wrote the raw key")
		}

		if err := c.Delete(ctx, "42"); err != nil {
			t.Fatal(err)
		}
		if n := client.Exists(ctx, legacyKey("42")).Val(); n != 0 {
			t.Fatal("Delete left the raw key")
		}

		// A key whose raw key cannot share a slot with its stamp.
		if err := c.Set(ctx, "a}b", p43); !errors.Is(err, layercache.ErrInvalidKey) {
			t.Fatalf("Set of a key with a stray '}' = %v, want ErrInvalidKey", err)
		}
		if tgt.Cluster {
			// Stamp and lease share the raw key's slot.
			for _, k := range []string{"43", "{tagged}", "x{y}z"} {
				rk := legacyKey(k)
				if err := c.Set(ctx, k, p43); err != nil {
					t.Fatalf("Set(%q): %v", k, err)
				}
				keys := scanAll(ctx, t, client, "*"+rk+"*") // rk holds this test's namespace: other runs' keys stay out
				if len(keys) < 2 {
					t.Fatalf("%q: want the raw key and its stamp, found %q", k, keys)
				}
				if err := client.Eval(ctx, "return redis.call('exists', unpack(KEYS))", keys).Err(); err != nil {
					t.Fatalf("%q: raw key and companions %q in different slots: %v", k, keys, err)
				}
			}
		}
	})
}

func TestLayoutOptionErrors(t *testing.T) {
	client := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1"})
	defer client.Close()
	cases := map[string][]layercache.Option{
		"Hash(0)":            {layercache.WithLayout(layercache.Hash(0))},
		"Hash(too many)":     {layercache.WithLayout(layercache.Hash(layercache.MaxHashShards + 1))},
		"Raw without %s":     {layercache.WithLayout(layercache.Raw("product"))},
		"Raw only %s":        {layercache.WithLayout(layercache.Raw("%s"))},
		"Raw two %s":         {layercache.WithLayout(layercache.Raw("a:%s:%s"))},
		"Raw %d":             {layercache.WithLayout(layercache.Raw("a:%d"))},
		"Raw trailing %":     {layercache.WithLayout(layercache.Raw("a:%s%"))},
		"same layouts":       {layercache.WithMigration("m", layercache.Hash(4), layercache.Hash(4))},
		"bad migration name": {layercache.WithMigration("a:b", layercache.KeyPerEntry(), layercache.Hash(4))},
		"bad side":           {layercache.WithMigration("m", layercache.KeyPerEntry(), layercache.Hash(-1))},
		"layout and migration": {layercache.WithLayout(layercache.Hash(2)),
			layercache.WithMigration("m", layercache.KeyPerEntry(), layercache.Hash(4))},
		"upgrade with raw layout": {layercache.WithLayout(layercache.Raw("p:%s")),
			layercache.WithUpgradeFrom("v0", func(u user) (user, error) { return u, nil })},
		"upgrade with raw side": {layercache.WithMigration("m", layercache.Raw("p:%s"), layercache.Hash(2)),
			layercache.WithUpgradeFrom("v0", func(u user) (user, error) { return u, nil })},
	}
	for name, opts := range cases {
		if _, err := layercache.New[user](client, opts...); !errors.Is(err, layercache.ErrInvalidOption) {
			t.Errorf("%s: New = %v, want ErrInvalidOption", name, err)
		}
	}
	// Valid ones.
	for _, l := range []layercache.Layout{layercache.KeyPerEntry(), layercache.Hash(1), layercache.Hash(layercache.MaxHashShards),
		layercache.Raw("p:%s"), layercache.Raw("100%%:%s:x"), layercache.Raw("%s:suffix")} {
		c, err := layercache.New[user](client, layercache.WithLayout(l), layercache.WithLogger(quiet))
		if err != nil {
			t.Errorf("WithLayout(%v): %v", l, err)
			continue
		}
		c.Close()
	}
}

func TestShardTagsSpreadOverSlots(t *testing.T) {
	if got := layercache.CRC16("123456789"); got != 0x31C3 {
		t.Fatalf("CRC16 = %#x, want 0x31c3", got)
	}
	for _, n := range []int{1, 3, 8, 100, layercache.MaxHashShards} {
		keys := layercache.ShardKeys("ns", "v1", n)
		for i, k := range keys {
			tag := k[strings.IndexByte(k, '{')+1 : len(k)-1]
			slot := int(layercache.CRC16(tag) % 16384)
			if slot < i*16384/n || slot >= (i+1)*16384/n {
				t.Fatalf("Hash(%d): shard %d's tag %q is in slot %d, outside its range", n, i, tag, slot)
			}
		}
	}
}
