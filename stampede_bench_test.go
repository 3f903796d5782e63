package layercache_test

import (
	"context"
	"fmt"
	"os/exec"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/layercache/layercache"
	"github.com/layercache/layercache/internal/redistest"
	"github.com/redis/go-redis/v9"
)

// benchTarget is a real redis-server when one is installed (loopback
// numbers are what the goals are about), else miniredis.
func benchTarget(b *testing.B) *redistest.Target {
	b.Helper()
	_, errServer := exec.LookPath("redis-server")
	_, errCLI := exec.LookPath("redis-cli")
	if errServer == nil && errCLI == nil {
		return redistest.Standalone(b)
	}
	b.Log("redis-server not installed: benchmarking on miniredis")
	return redistest.Miniredis(b)
}

// benchInstances returns n caches of a fresh namespace, each on its own
// client, and the namespace.
func benchInstances(b *testing.B, tgt *redistest.Target, n int, opts ...layercache.Option) ([]*layercache.Cache[user], string) {
	b.Helper()
	ns := redistest.Namespace(b)
	cs := make([]*layercache.Cache[user], n)
	for i := range cs {
		c, err := layercache.New[user](tgt.NewClient(b), append([]layercache.Option{layercache.WithLogger(quiet), layercache.WithNamespace(ns)}, opts...)...)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { _ = c.Close() })
		cs[i] = c
	}
	return cs, ns
}

// BenchmarkStampedeColdReads measures what 1000 concurrent cold reads of
// one key (8 instances, each on its own client, 125 callers each; a 10ms
// loader) cost the source: loads/op is loads per 1000 reads, ns/op the time
// to serve all of them. "singleflight" is the floor to compare with: one
// load per process.
func BenchmarkStampedeColdReads(b *testing.B) {
	const nInst, perInst = 8, 125
	tgt := benchTarget(b)
	for _, mode := range []struct {
		name string
		opts []layercache.Option
	}{
		{"singleflight", nil},
		{"locks", []layercache.Option{layercache.WithLocks(5*time.Second, 5*time.Second)}},
	} {
		b.Run(mode.name, func(b *testing.B) {
			cs, _ := benchInstances(b, tgt, nInst, mode.opts...)
			var loads atomic.Int64
			load := func(ctx context.Context) (user, error) {
				loads.Add(1)
				time.Sleep(10 * time.Millisecond)
				return user{ID: 1}, nil
			}
			ctx := context.Background()
			var iter int
			b.ResetTimer()
			for b.Loop() {
				iter++
				key := fmt.Sprint("cold-", iter)
				var wg sync.WaitGroup
				for _, c := range cs {
					for range perInst {
						wg.Add(1)
						go func() {
							defer wg.Done()
							if _, err := c.Fetch(ctx, key, load); err != nil {
								b.Error(err)
							}
						}()
					}
				}
				wg.Wait()
			}
			b.ReportMetric(float64(loads.Load())/float64(iter), "loads/op")
		})
	}
}

// BenchmarkStampedeWakeup measures how soon callers waiting on another
// caller's load get its value, from the moment the loader returns: across
// processes ("locks": 7 instances wait on an 8th's lease and are woken by
// its fill notice) and, as the floor, within one process ("singleflight":
// 7 callers coalesced on one in-process load). It reports the 50th and 99th
// percentile wake-up latency in microseconds.
func BenchmarkStampedeWakeup(b *testing.B) {
	const waiters = 7
	tgt := benchTarget(b)
	ctx := context.Background()
	b.Run("singleflight", func(b *testing.B) {
		cs, _ := benchInstances(b, tgt, 1)
		c := cs[0]
		var lat []time.Duration
		var iter int
		for b.Loop() {
			iter++
			key := fmt.Sprint("wake-", iter)
			var ready atomic.Int64
			coalesced := c.Stats().Coalesced
			load := func(context.Context) (user, error) {
				for c.Stats().Coalesced < coalesced+waiters {
					time.Sleep(50 * time.Microsecond)
				}
				ready.Store(time.Now().UnixNano())
				return user{ID: 1}, nil
			}
			lat = append(lat, fetchAll(b, ctx, slices.Repeat([]*layercache.Cache[user]{c}, waiters+1), key, load, &ready)...)
		}
		reportLatency(b, lat)
	})
	b.Run("locks", func(b *testing.B) {
		cs, ns := benchInstances(b, tgt, waiters+1, layercache.WithLocks(5*time.Second, 5*time.Second))
		probe := tgt.NewClient(b)
		var lat []time.Duration
		var iter int
		for b.Loop() {
			iter++
			key := fmt.Sprint("wake-", iter)
			channel := layercache.RedisKey(ns, "v1", key) + ":notice"
			var ready atomic.Int64
			load := func(context.Context) (user, error) {
				// Return only once every other instance is subscribed to
				// the key's notices, i.e. waiting for this fill.
				for numSub(ctx, b, probe, channel) < waiters {
					time.Sleep(50 * time.Microsecond)
				}
				ready.Store(time.Now().UnixNano())
				return user{ID: 1}, nil
			}
			lat = append(lat, fetchAll(b, ctx, cs, key, load, &ready)...)
		}
		reportLatency(b, lat)
	})
}

// fetchAll runs one Fetch of key per cache at once and returns how long
// after ready (set by the one load) each caller that did not load got its
// value.
func fetchAll(b *testing.B, ctx context.Context, cs []*layercache.Cache[user], key string, load func(context.Context) (user, error), ready *atomic.Int64) []time.Duration {
	ends := make([]int64, len(cs))
	var wg sync.WaitGroup
	for i, c := range cs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := c.Fetch(ctx, key, load); err != nil {
				b.Error(err)
			}
			ends[i] = time.Now().UnixNano()
		}()
	}
	wg.Wait()
	r := ready.Load()
	var lat []time.Duration
	for _, end := range ends {
		lat = append(lat, time.Duration(end-r))
	}
	// The fastest is the loader's own caller, not a waiter.
	slices.Sort(lat)
	return lat[1:]
}

func reportLatency(b *testing.B, lat []time.Duration) {
	if len(lat) == 0 {
		return
	}
	slices.Sort(lat)
	pct := func(p float64) float64 {
		return float64(lat[int(p*float64(len(lat)-1))]) / float64(time.Microsecond)
	}
	b.ReportMetric(pct(0.50), "wake-p50-µs")
	b.ReportMetric(pct(0.99), "wake-p99-µs")
}

func numSub(ctx context.Context, b *testing.B, client redis.UniversalClient, channel string) int64 {
	m, err := client.PubSubNumSub(ctx, channel).Result()
	if err != nil {
		b.Fatal(err)
	}
	return m[channel]
}

// BenchmarkFetchRedisHit is the hit path of a fresh value in Redis, with
// and without WithEarlyRefresh: a value far from expiry must cost the same
// (no random draw, no extra round trip, no extra allocation).
func BenchmarkFetchRedisHit(b *testing.B) {
	tgt := redistest.Miniredis(b)
	ctx := context.Background()
	load := func(context.Context) (user, error) { return user{ID: 1, Name: "ann"}, nil }
	for _, mode := range []struct {
		name string
		opts []layercache.Option
	}{
		{"plain", nil},
		{"early-refresh", []layercache.Option{layercache.WithEarlyRefresh(1)}},
		{"all-stampede-options", []layercache.Option{layercache.WithEarlyRefresh(1), layercache.WithLocks(time.Second, time.Second),
			layercache.WithStaleWhileRevalidate(time.Minute), layercache.WithFailSafe(time.Second)}},
	} {
		b.Run(mode.name, func(b *testing.B) {
			cs, _ := benchInstances(b, tgt, 1, mode.opts...)
			c := cs[0]
			if _, err := c.Fetch(ctx, "hit", load); err != nil {
				b.Fatal(err)
			}
			b.ReportAllocs()
			for b.Loop() {
				if _, err := c.Fetch(ctx, "hit", load); err != nil {
					b.Fatal(err)
				}
			}
			if st := c.Stats(); st.Loads != 1 || st.EarlyRefreshes != 0 {
				b.Fatalf("stats %+v", st)
			}
		})
	}
}
