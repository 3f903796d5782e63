package layercache_test

import (
	"context"
	"encoding/json"
	"testing"

	"github.com/layercache/layercache"
	"github.com/layercache/layercache/internal/redistest"
	"github.com/redis/go-redis/v9"
)

type product struct {
	ID    int      `json:"id"`
	Name  string   `json:"name"`
	Price float64  `json:"price"`
	Tags  []string `json:"tags"`
}

var benchProduct = product{ID: 42, Name: "Espresso machine", Price: 249.99, Tags: []string{"kitchen", "coffee", "appliance"}}

// BenchmarkRedisHit pairs a Fetch that hits Redis with the hand-written code
// it replaces, GET + json.Unmarshal of the same value, in the same run:
//
//	go test -run '^$' -bench RedisHit -count 10 . | tee hit.txt
//	benchstat -col /impl hit.txt
func BenchmarkRedisHit(b *testing.B) {
	tgt := benchTarget(b)
	ctx := context.Background()
	client := tgt.NewClient(b)
	ns := redistest.Namespace(b)
	c, err := layercache.New[product](client, layercache.WithNamespace(ns), layercache.WithLogger(quiet))
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	if err := c.Set(ctx, "p42", benchProduct); err != nil {
		b.Fatal(err)
	}
	raw, _ := json.Marshal(benchProduct)
	rawKey := ns + ":raw:p42"
	if err := client.Set(ctx, rawKey, raw, 0).Err(); err != nil {
		b.Fatal(err)
	}
	load := func(context.Context) (product, error) {
		b.Fatal("a Redis hit called the loader")
		return product{}, nil
	}

	b.Run("impl=goredis", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			data, err := client.Get(ctx, rawKey).Bytes()
			if err != nil {
				b.Fatal(err)
			}
			var p product
			if err := json.Unmarshal(data, &p); err != nil || p.ID != 42 {
				b.Fatal(err)
			}
		}
	})
	b.Run("impl=layercache", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			p, err := c.Fetch(ctx, "p42", load)
			if err != nil || p.ID != 42 {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkRedisHitParallel is BenchmarkRedisHit with concurrent callers,
// where connection-pool and counter contention would show.
func BenchmarkRedisHitParallel(b *testing.B) {
	tgt := benchTarget(b)
	ctx := context.Background()
	client := tgt.NewClientOpts(b, func(o *redis.UniversalOptions) { o.PoolSize = 64 })
	ns := redistest.Namespace(b)
	c, err := layercache.New[product](client, layercache.WithNamespace(ns), layercache.WithLogger(quiet))
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	_ = c.Set(ctx, "p42", benchProduct)
	raw, _ := json.Marshal(benchProduct)
	rawKey := ns + ":raw:p42"
	_ = client.Set(ctx, rawKey, raw, 0).Err()
	load := func(context.Context) (product, error) { return benchProduct, nil }

	b.Run("impl=goredis", func(b *testing.B) {
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				data, _ := client.Get(ctx, rawKey).Bytes()
				var p product
				if err := json.Unmarshal(data, &p); err != nil {
					b.Error(err)
					return
				}
			}
		})
	})
	b.Run("impl=layercache", func(b *testing.B) {
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if _, err := c.Fetch(ctx, "p42", load); err != nil {
					b.Error(err)
					return
				}
			}
		})
	})
}
