package layercache

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/layercache/layercache/internal/busmsg"
	"github.com/layercache/layercache/internal/redistest"
	"github.com/redis/go-redis/v9"
)

// TestStreamCatchUpBypassesLocal checks, from inside the reader, that local
// hits stay off for every batch of a backlog and come back once it is
// replayed.
func TestStreamCatchUpBypassesLocal(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		ns := redistest.Namespace(t)
		stream := ns + ":bus"
		quiet := slog.New(slog.NewTextHandler(io.Discard, nil))

		var (
			mu    sync.Mutex // held across a dial, so a cut cannot miss one
			conns []net.Conn
			down  bool
		)
		dial := func(ctx context.Context, network, addr string) (net.Conn, error) {
			mu.Lock()
			defer mu.Unlock()
			if down {
				return nil, errors.New("test: network is down")
			}
			var d net.Dialer
			c, err := d.DialContext(ctx, network, addr)
			if err == nil {
				conns = append(conns, c)
			}
			return c, err
		}
		var cp atomic.Pointer[Cache[string]]
		var batches, violations atomic.Int32
		hook := func() {
			c := cp.Load()
			if c == nil {
				return
			}
			batches.Add(1)
			if c.local.up.Load() || c.local.get("warm") != nil {
				violations.Add(1)
			}
		}
		// An existing stream, as in TestBusStreamReplay (see seedStream).
		seed := busmsg.Encode([8]byte{1}, 0, []busmsg.Item{{Kind: busmsg.KindFlush, Route: "nobody:v1"}}, nil)[0]
		if err := tgt.NewClient(t).XAdd(ctx, &redis.XAddArgs{Stream: stream, Values: []any{"m", seed}}).Err(); err != nil {
			t.Fatal(err)
		}
		bus, err := NewBus(tgt.NewClientOpts(t, func(o *redis.UniversalOptions) { o.Dialer = dial }),
			WithStream(stream, 10_000), WithBusLogger(quiet), func(cfg *busConfig) { cfg.catchUpHook = hook })
		if err != nil {
			t.Fatal(err)
		}
		defer bus.Close()
		c, err := New[string](tgt.NewClient(t), WithNamespace(ns), WithLocal(100, time.Hour), WithInvalidation(bus), WithLogger(quiet))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		cp.Store(c)
		wait, cancel := context.WithTimeout(ctx, 20*time.Second)
		defer cancel()
		if err := bus.Ready(wait); err != nil {
			t.Fatal(err)
		}
		_ = c.Set(ctx, "warm", "v")
		_, _ = c.Get(ctx, "warm")
		if c.local.get("warm") == nil {
			t.Fatal("not warm")
		}

		// Cut the reader off, then queue a backlog of 3 batches.
		mu.Lock()
		down = true
		for _, cn := range conns {
			_ = cn.Close()
		}
		mu.Unlock()
		for deadline := time.Now().Add(20 * time.Second); bus.Stats().Disconnects == 0; time.Sleep(time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatal("the reader did not notice the cut")
			}
		}
		before := batches.Load()
		other := tgt.NewClient(t)
		msg := busmsg.Encode([8]byte{7}, 0, []busmsg.Item{{Kind: busmsg.KindInvalidate, Route: ns + ":v1", Keys: []string{"cold"}}}, nil)[0]
		if _, err := other.Pipelined(ctx, func(p redis.Pipeliner) error {
			for range 3 * streamBatch {
				p.XAdd(ctx, &redis.XAddArgs{Stream: stream, Values: []any{"m", msg}})
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		mu.Lock()
		down = false
		mu.Unlock()
		if err := bus.Ready(wait); err != nil {
			t.Fatal(err)
		}
		if n := batches.Load() - before; n < 3 {
			t.Fatalf("%d catch-up batches for a backlog of 3 full ones: %+v", n, bus.Stats())
		}
		if v := violations.Load(); v != 0 {
			t.Fatalf("local hits were on during %d catch-up batches", v)
		}
		if c.local.get("warm") == nil {
			t.Fatal("an unrelated key was dropped: the replay flushed")
		}
		if st := bus.Stats(); st.Flushes != 0 || st.Replayed < 3*streamBatch {
			t.Fatalf("%+v", st)
		}
	})
}
