package layercache

import (
	"context"
	"log/slog"
	"os/exec"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/layercache/layercache/internal/redistest"
	"github.com/redis/go-redis/v9"
)

// applyWaiter is a local tier that tells a benchmark when the bus applied
// an invalidation, so that it waits on a channel instead of polling: a
// 20µs time.Sleep takes a millisecond on an idle Go process, which is
// what BenchmarkPropagationLag's tail mostly measures.
type applyWaiter struct {
	mu   sync.Mutex
	ch   chan struct{}
	left int // keys still to come before ch is closed
}

// arm returns a channel closed once n more keys were applied.
func (w *applyWaiter) arm(n int) <-chan struct{} {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.ch, w.left = make(chan struct{}), n
	return w.ch
}

func (w *applyWaiter) remoteInvalidate(keys []string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.left -= len(keys); w.ch != nil && w.left <= 0 {
		close(w.ch)
		w.ch = nil
	}
}

func (w *applyWaiter) invalidate([]string) {}
func (w *applyWaiter) flush()              {}
func (w *applyWaiter) setUp(bool)          {}

// BenchmarkBusLag measures, per bus mode, the time from a Set on node A
// until node B's bus has dropped the key from B's local tier (applied-us),
// and until B's next read returns the new value (read-us), without
// polling; and, for keys=5000, from A's bus being handed 5,000 keys (as
// by a Delete of them) until B has dropped them all. Both nodes run in this process, each on its own
// clients, on a real redis-server when one is installed:
//
//	go test -run '^$' -bench BusLag -benchtime 3000x .
func BenchmarkBusLag(b *testing.B) {
	tgt := redistest.Miniredis(b)
	_, errServer := exec.LookPath("redis-server")
	_, errCLI := exec.LookPath("redis-cli")
	if errServer == nil && errCLI == nil {
		tgt = redistest.Standalone(b)
	}
	quiet := slog.New(slog.DiscardHandler)
	for _, run := range []struct {
		mode string
		keys int
	}{{"pubsub", 1}, {"stream", 1}, {"pubsub", 5000}, {"stream", 5000}} {
		mode := run.mode
		b.Run("mode="+mode+"/keys="+strconv.Itoa(run.keys), func(b *testing.B) {
			ctx := context.Background()
			ns := redistest.Namespace(b)
			if mode == "stream" {
				// An existing stream: see seedStream.
				if err := tgt.NewClient(b).XAdd(ctx, &redis.XAddArgs{Stream: ns + ":bus", Values: []any{"m", "seed"}}).Err(); err != nil {
					b.Fatal(err)
				}
			}
			node := func() (*Bus, *Cache[string]) {
				opt := WithChannel(ns + ":bus")
				if mode == "stream" {
					opt = WithStream(ns+":bus", 10_000)
				}
				bus, err := NewBus(tgt.NewClient(b), opt, WithBusLogger(quiet))
				if err != nil {
					b.Fatal(err)
				}
				b.Cleanup(func() { _ = bus.Close() })
				c, err := New[string](tgt.NewClient(b), WithNamespace(ns), WithLocal(100, time.Hour), WithInvalidation(bus), WithLogger(quiet))
				if err != nil {
					b.Fatal(err)
				}
				b.Cleanup(func() { _ = c.Close() })
				ready, cancel := context.WithTimeout(ctx, 20*time.Second)
				defer cancel()
				if err := bus.Ready(ready); err != nil {
					b.Fatal(err)
				}
				return bus, c
			}
			_, ca := node()
			busB, cb := node()
			w := &applyWaiter{}
			// After cb's tier: the waiter hears of a message once cb's
			// tier has dropped the key.
			if err := busB.attach(cb.route, w); err != nil {
				b.Fatal(err)
			}
			applied := make([]time.Duration, 0, b.N)
			read := make([]time.Duration, 0, b.N)
			bulk := make([]string, run.keys)
			for i := range bulk {
				bulk[i] = "bulk-" + strconv.Itoa(i)
			}
			b.ResetTimer()
			for i := range b.N {
				want := strconv.Itoa(i + 1)
				done := w.arm(run.keys)
				start := time.Now()
				if run.keys > 1 {
					// What a Delete of them hands the bus, without the
					// Redis deletes, which would dominate the time.
					ca.bus.publish(ca.route, bulk, nil)
				} else if err := ca.Set(ctx, "k", want); err != nil {
					b.Fatal(err)
				}
				select {
				case <-done:
				case <-time.After(10 * time.Second):
					b.Fatal("the invalidation never arrived")
				}
				applied = append(applied, time.Since(start))
				if run.keys > 1 {
					continue
				}
				if got, err := cb.Get(ctx, "k"); err != nil || got != want {
					b.Fatalf("B read %q, %v after the invalidation of %q", got, err, want)
				}
				read = append(read, time.Since(start))
			}
			b.StopTimer()
			us := func(d []time.Duration, q float64) float64 {
				slices.Sort(d)
				return float64(d[int(q*float64(len(d)-1))]) / float64(time.Microsecond)
			}
			b.ReportMetric(us(applied, 0.50), "applied-p50-us")
			b.ReportMetric(us(applied, 0.99), "applied-p99-us")
			if len(read) > 0 {
				b.ReportMetric(us(read, 0.50), "read-p50-us")
				b.ReportMetric(us(read, 0.99), "read-p99-us")
			}
		})
	}
}
