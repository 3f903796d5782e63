package layercache_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/layercache/layercache"
	"github.com/redis/go-redis/v9"
)

type item struct {
	SKU   string
	Price int
}

// exampleRedis starts an embedded Redis; real code passes its own client.
func exampleRedis() (*miniredis.Miniredis, func() *redis.Client) {
	mr, err := miniredis.Run()
	if err != nil {
		panic(err)
	}
	return mr, func() *redis.Client { return redis.NewClient(&redis.Options{Addr: mr.Addr()}) }
}

var discard = layercache.WithLogger(slog.New(slog.DiscardHandler))

// Four service instances (one Cache and one client each, as in four
// processes) get 50 concurrent requests each for an item nobody has
// cached yet. With WithLocks the database is asked once.
func ExampleWithLocks() {
	mr, newClient := exampleRedis()
	defer mr.Close()

	var dbQueries atomic.Int64
	loadItem := func(ctx context.Context) (item, error) {
		dbQueries.Add(1)
		time.Sleep(50 * time.Millisecond) // a slow query
		return item{SKU: "sku-1", Price: 1999}, nil
	}

	var wg sync.WaitGroup
	var served atomic.Int64
	for range 4 {
		client := newClient()
		defer client.Close()
		cache, err := layercache.New[item](client, discard,
			layercache.WithNamespace("products"),
			layercache.WithLocks(5*time.Second, 2*time.Second))
		if err != nil {
			panic(err)
		}
		defer cache.Close()
		for range 50 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				p, err := cache.Fetch(context.Background(), "sku-1", loadItem)
				if err == nil && p.Price == 1999 {
					served.Add(1)
				}
			}()
		}
	}
	wg.Wait()
	fmt.Println("requests served:", served.Load())
	fmt.Println("database queries:", dbQueries.Load())
	// Output:
	// requests served: 200
	// database queries: 1
}

// A hot value is refreshed in the background shortly before it expires,
// so readers never wait for it. The clock is manual here to make the
// example deterministic.
func ExampleWithEarlyRefresh() {
	mr, newClient := exampleRedis()
	defer mr.Close()
	client := newClient()
	defer client.Close()

	clock := layercache.NewManualClock(time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC))
	cache, err := layercache.New[item](client, discard, layercache.WithClock(clock),
		layercache.WithTTL(time.Minute), layercache.WithEarlyRefresh(1))
	if err != nil {
		panic(err)
	}
	defer cache.Close()

	var version atomic.Int64
	loadItem := func(ctx context.Context) (item, error) {
		time.Sleep(20 * time.Millisecond) // XFetch's delta: how long a load takes
		return item{SKU: "sku-1", Price: 1000 + int(version.Add(1))}, nil
	}
	ctx := context.Background()
	p, _ := cache.Fetch(ctx, "sku-1", loadItem)
	fmt.Println("loaded:", p.Price)

	// Far from expiry, hits never refresh.
	clock.Advance(30 * time.Second)
	for range 100 {
		p, _ = cache.Fetch(ctx, "sku-1", loadItem)
	}
	fmt.Println("early refreshes after 100 hits at 30s:", cache.Stats().EarlyRefreshes)

	// A few milliseconds before expiry, a hit soon triggers one.
	clock.Advance(30*time.Second - 5*time.Millisecond)
	for cache.Stats().EarlyRefreshes == 0 {
		p, _ = cache.Fetch(ctx, "sku-1", loadItem)
	}
	fmt.Println("served while refreshing:", p.Price)
	for {
		if p, err := cache.Get(ctx, "sku-1"); err == nil && p.Price == 1002 {
			fmt.Println("after the refresh:", p.Price)
			break
		}
		time.Sleep(time.Millisecond)
	}
	// Output:
	// loaded: 1001
	// early refreshes after 100 hits at 30s: 0
	// served while refreshing: 1001
	// after the refresh: 1002
}

// Past its TTL, a value is still served for the grace period while one
// background refresh replaces it.
func ExampleWithStaleWhileRevalidate() {
	mr, newClient := exampleRedis()
	defer mr.Close()
	client := newClient()
	defer client.Close()

	clock := layercache.NewManualClock(time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC))
	cache, err := layercache.New[item](client, discard, layercache.WithClock(clock),
		layercache.WithTTL(time.Minute), layercache.WithStaleWhileRevalidate(10*time.Minute))
	if err != nil {
		panic(err)
	}
	defer cache.Close()

	var version atomic.Int64
	loadItem := func(ctx context.Context) (item, error) {
		return item{SKU: "sku-1", Price: 1000 + int(version.Add(1))}, nil
	}
	ctx := context.Background()
	p, _ := cache.Fetch(ctx, "sku-1", loadItem)
	fmt.Println("loaded:", p.Price)

	clock.Advance(2 * time.Minute)
	p, _ = cache.Fetch(ctx, "sku-1", loadItem)
	fmt.Println("stale, served at once:", p.Price)
	for {
		if p, err := cache.Get(ctx, "sku-1"); err == nil {
			fmt.Println("after the background refresh:", p.Price)
			break
		}
		time.Sleep(time.Millisecond)
	}
	fmt.Println("stale hits:", cache.Stats().StaleHits)
	// Output:
	// loaded: 1001
	// stale, served at once: 1001
	// after the background refresh: 1002
	// stale hits: 1
}

// When the database fails, the stale value keeps being served and the
// database is left alone for the backoff.
func ExampleWithFailSafe() {
	mr, newClient := exampleRedis()
	defer mr.Close()
	client := newClient()
	defer client.Close()

	clock := layercache.NewManualClock(time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC))
	cache, err := layercache.New[item](client, discard, layercache.WithClock(clock),
		layercache.WithTTL(time.Minute), layercache.WithStaleWhileRevalidate(10*time.Minute),
		layercache.WithFailSafe(30*time.Second))
	if err != nil {
		panic(err)
	}
	defer cache.Close()

	var dbDown atomic.Bool
	var queries atomic.Int64
	loadItem := func(ctx context.Context) (item, error) {
		queries.Add(1)
		if dbDown.Load() {
			return item{}, errors.New("database unavailable")
		}
		return item{SKU: "sku-1", Price: 1999}, nil
	}
	ctx := context.Background()
	_, _ = cache.Fetch(ctx, "sku-1", loadItem)

	dbDown.Store(true)
	clock.Advance(2 * time.Minute)
	p, err := cache.Fetch(ctx, "sku-1", loadItem) // stale; its refresh fails
	fmt.Println("stale:", p.Price, err)
	for cache.Stats().RefreshErrors == 0 {
		time.Sleep(time.Millisecond)
	}
	for range 10 {
		p, err = cache.Fetch(ctx, "sku-1", loadItem)
	}
	fmt.Println("fail-safe:", p.Price, err)
	fmt.Println("database queries:", queries.Load())
	fmt.Println("fail-safe hits:", cache.Stats().FailSafeHits)
	// Output:
	// stale: 1999 <nil>
	// fail-safe: 1999 <nil>
	// database queries: 2
	// fail-safe hits: 10
}
