// Command stampede shows what WithLocks saves: many service instances miss
// the same cold key at once, and the database pays once instead of once
// per instance.
//
// It runs on an embedded Redis (miniredis) unless REDIS_ADDR is set
// (host:port; several, comma-separated, for a Redis Cluster):
//
//	go run ./examples/stampede
//	REDIS_ADDR=127.0.0.1:6379 go run ./examples/stampede
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"log/slog"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/layercache/layercache"
	"github.com/redis/go-redis/v9"
)

type product struct {
	SKU   string `json:"sku"`
	Price int    `json:"price"`
}

func main() {
	instances := flag.Int("instances", 8, "service instances (one Cache and one Redis client each)")
	callers := flag.Int("callers", 125, "concurrent requests per instance")
	loadTime := flag.Duration("load", 100*time.Millisecond, "how long one database query takes")
	flag.Parse()

	addrs, where := redisAddrs()
	fmt.Printf("%d instances x %d concurrent requests for one cold key; a query takes %v; Redis: %s\n\n",
		*instances, *callers, *loadTime, where)
	for _, locks := range []bool{false, true} {
		queries, took := run(addrs, locks, *instances, *callers, *loadTime)
		name := "without WithLocks"
		if locks {
			name = "with WithLocks   "
		}
		fmt.Printf("%s: database queries: %d, all %d requests served in %v\n",
			name, queries, *instances**callers, took.Round(time.Millisecond))
	}
}

// redisAddrs returns REDIS_ADDR's addresses, or starts an embedded Redis.
func redisAddrs() ([]string, string) {
	if env := os.Getenv("REDIS_ADDR"); env != "" {
		return strings.Split(env, ","), env
	}
	mr, err := miniredis.Run()
	if err != nil {
		log.Fatal(err)
	}
	return []string{mr.Addr()}, "embedded miniredis (set REDIS_ADDR to use a real one)"
}

// run serves instances*callers concurrent requests for one cold key and
// returns how many database queries they cost and how long serving all of
// them took.
func run(addrs []string, locks bool, instances, callers int, loadTime time.Duration) (int64, time.Duration) {
	ctx := context.Background()
	var queries atomic.Int64
	loadProduct := func(ctx context.Context) (product, error) {
		queries.Add(1)
		time.Sleep(loadTime)
		return product{SKU: "sku-42", Price: 1999}, nil
	}

	// A fresh namespace per run, so that runs against a real Redis start
	// cold.
	ns := fmt.Sprintf("stampede-example-%d", time.Now().UnixNano())
	opts := []layercache.Option{
		layercache.WithNamespace(ns),
		layercache.WithLogger(slog.New(slog.DiscardHandler)),
	}
	if locks {
		opts = append(opts, layercache.WithLocks(5*time.Second, 3*time.Second))
	}
	caches := make([]*layercache.Cache[product], instances)
	for i := range caches {
		client := redis.NewUniversalClient(&redis.UniversalOptions{Addrs: addrs})
		defer client.Close()
		c, err := layercache.New[product](client, opts...)
		if err != nil {
			log.Fatal(err)
		}
		defer c.Close()
		// Connect before the clock starts, as a running service would be.
		if err := client.Ping(ctx).Err(); err != nil {
			log.Fatal(err)
		}
		caches[i] = c
	}

	start := time.Now()
	var wg sync.WaitGroup
	for _, c := range caches {
		for range callers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if _, err := c.Fetch(ctx, "sku-42", loadProduct); err != nil {
					log.Print(err)
				}
			}()
		}
	}
	wg.Wait()
	took := time.Since(start)
	_ = caches[0].Delete(ctx, "sku-42")
	return queries.Load(), took
}
