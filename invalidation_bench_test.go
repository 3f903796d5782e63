package layercache_test

import (
	"context"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/layercache/layercache/internal/redistest"
)

// BenchmarkPropagationLag measures, per bus mode, the time from a Set on
// node A until node B's read of the key returns the new value (B's copy is
// local before the Set; after the invalidation B reads Redis once). Each
// node has its own clients and bus, as separate processes would. It reports
// the median and the 99th percentile:
//
//	go test -run '^$' -bench PropagationLag -benchtime 3000x .
//
// On a real redis-server when one is installed, miniredis otherwise.
func BenchmarkPropagationLag(b *testing.B) {
	tgt := benchTarget(b)
	for _, mode := range busModes {
		b.Run("mode="+mode.name, func(b *testing.B) {
			ctx := context.Background()
			ns := redistest.Namespace(b)
			if mode.name == "stream" {
				seedStream(b, tgt, ns+":bus")
			}
			a := newNode(b, tgt, ns, mode.opts(ns))
			n := newNode(b, tgt, ns, mode.opts(ns))
			set(b, a, "k", "0")
			n.warm(b, "k", "0")
			lags := make([]time.Duration, 0, b.N)
			b.ResetTimer()
			for i := range b.N {
				want := strconv.Itoa(i + 1)
				start := time.Now()
				if err := a.cache.Set(ctx, "k", want); err != nil {
					b.Fatal(err)
				}
				for {
					got, err := n.cache.Get(ctx, "k")
					if err != nil {
						b.Fatal(err)
					}
					if got == want {
						break
					}
					// Not a busy loop: B's bus goroutine and redis-server
					// share the two cores with it, and a spinning thread
					// would cost them whole scheduler slices. But a 20µs
					// sleep lasts about a millisecond once the process
					// is idle (the runtime's idle wait has millisecond
					// resolution), which is most of this benchmark's
					// p99: BenchmarkBusLag waits on a channel instead.
					time.Sleep(20 * time.Microsecond)
				}
				lags = append(lags, time.Since(start))
			}
			b.StopTimer()
			slices.Sort(lags)
			us := func(q float64) float64 {
				return float64(lags[int(q*float64(len(lags)-1))]) / float64(time.Microsecond)
			}
			b.ReportMetric(us(0.50), "p50-us")
			b.ReportMetric(us(0.99), "p99-us")
			if st := n.cache.Stats(); st.InvalidationsReceived < uint64(b.N) {
				b.Fatalf("B saw %d invalidations for %d writes: it read new values some other way", st.InvalidationsReceived, b.N)
			}
		})
	}
}
