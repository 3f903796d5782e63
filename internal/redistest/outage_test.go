package redistest_test

import (
	"context"
	"testing"
	"time"

	"github.com/layercache/layercache/internal/redistest"
)

func TestClientPause(t *testing.T) {
	ctx := context.Background()
	const d = 300 * time.Millisecond
	for _, tgt := range []*redistest.Target{redistest.StartServer(t).Target(), redistest.Miniredis(t)} {
		t.Run(tgt.Name, func(t *testing.T) {
			c := tgt.NewClient(t)
			if err := c.Ping(ctx).Err(); err != nil {
				t.Fatal(err)
			}
			err := redistest.ClientPause(ctx, c, d)
			if !tgt.Real {
				if err == nil {
					t.Fatal("ClientPause on miniredis did not fail")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			// The pause is in place when ClientPause returns: the next
			// command waits for its end.
			start := time.Now()
			if err := c.Set(ctx, "k", "v", 0).Err(); err != nil {
				t.Fatal(err)
			}
			if el := time.Since(start); el < d/2 {
				t.Fatalf("SET during a %v pause took %v", d, el)
			}
		})
	}
}

func TestDebugSleep(t *testing.T) {
	ctx := context.Background()
	// Longer than the client read timeout (3s) would fail with a naive
	// client; 300ms keeps the test short and still shows the server
	// blocked.
	const d = 300 * time.Millisecond
	s := redistest.StartServer(t)
	c := s.Target().NewClient(t)
	other := s.Target().NewClient(t)

	done := make(chan error, 1)
	start := time.Now()
	go func() { done <- redistest.DebugSleep(ctx, c, d) }()
	// Some PING, once the sleep has begun, waits for its end.
	redistest.Eventually(t, redistest.DefaultWait, "a PING blocked by DEBUG SLEEP", func() bool {
		t0 := time.Now()
		_ = other.Ping(ctx).Err()
		return time.Since(t0) > d/3
	})
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if el := time.Since(start); el < d {
		t.Fatalf("DebugSleep(%v) returned after %v", d, el)
	}

	if err := redistest.DebugSleep(ctx, redistest.Miniredis(t).NewClient(t), time.Millisecond); err == nil {
		t.Fatal("DebugSleep on miniredis did not fail")
	}
}

// TestDebugOnSharedServers: the shared servers allow DEBUG too, so fault
// tests may use them (sparingly: a sleep stalls every test of the binary).
func TestDebugOnSharedServers(t *testing.T) {
	ctx := context.Background()
	for _, tgt := range []*redistest.Target{redistest.Standalone(t), redistest.Cluster(t)} {
		if err := redistest.DebugSleep(ctx, tgt.NewClient(t), time.Millisecond); err != nil {
			t.Fatalf("%s: %v", tgt.Name, err)
		}
	}
}
