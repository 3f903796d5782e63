package redistest_test

import (
	"context"
	"errors"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/layercache/layercache/internal/redistest"
)

func TestServerKillRestart(t *testing.T) {
	for _, persistent := range []bool{false, true} {
		name := "volatile"
		var opts []redistest.ServerOption
		if persistent {
			name = "persistent"
			opts = append(opts, redistest.Persistent())
		}
		t.Run(name, func(t *testing.T) {
			ctx := context.Background()
			s := redistest.StartServer(t, opts...)
			addr := s.Addr()
			tgt := s.Target()
			if tgt.Name != "dedicated" || !tgt.Real || tgt.Cluster || tgt.Addrs[0] != addr {
				t.Fatalf("bad target %+v", tgt)
			}
			c := tgt.NewClientOpts(t, func(o *redis.UniversalOptions) { o.MaxRetries = -1 })
			if err := c.Set(ctx, "k", "v1", 0).Err(); err != nil {
				t.Fatal(err)
			}

			s.Kill()
			if s.Running() {
				t.Fatal("Running after Kill")
			}
			// Down means refused, not hanging: the port is free.
			if _, err := net.DialTimeout("tcp", addr, time.Second); !errors.Is(err, syscall.ECONNREFUSED) {
				t.Fatalf("dial a killed server: %v, want connection refused", err)
			}
			if err := c.Ping(ctx).Err(); err == nil {
				t.Fatal("PING answered by a killed server")
			}
			s.Kill() // no-op when down

			s.Restart()
			if !s.Running() || s.Addr() != addr {
				t.Fatalf("after Restart: running=%v addr=%s, want true %s", s.Running(), s.Addr(), addr)
			}
			// The same client reconnects by itself.
			redistest.Eventually(t, redistest.DefaultWait, "the client to reconnect", func() bool {
				return c.Ping(ctx).Err() == nil
			})
			v, err := c.Get(ctx, "k").Result()
			if persistent && (err != nil || v != "v1") {
				t.Fatalf("persistent server lost a write across SIGKILL: %q, %v", v, err)
			}
			if !persistent && !errors.Is(err, redis.Nil) {
				t.Fatalf("volatile server kept data across SIGKILL: %q, %v", v, err)
			}

			// A graceful stop, then Restart of a running server.
			if err := c.Set(ctx, "k", "v2", 0).Err(); err != nil {
				t.Fatal(err)
			}
			s.Stop()
			if s.Running() {
				t.Fatal("Running after Stop")
			}
			s.Restart()
			s.Restart()
			redistest.Eventually(t, redistest.DefaultWait, "the client to reconnect", func() bool {
				return c.Ping(ctx).Err() == nil
			})
			v, err = c.Get(ctx, "k").Result()
			if persistent && v != "v2" || !persistent && !errors.Is(err, redis.Nil) {
				t.Fatalf("after Stop and two restarts: %q, %v (persistent=%v)", v, err, persistent)
			}
		})
	}
}

func TestServerArgs(t *testing.T) {
	ctx := context.Background()
	s := redistest.StartServer(t, redistest.ServerArgs("--maxmemory", "7mb", "--maxmemory-policy", "allkeys-lru"))
	c := s.Target().NewClient(t)
	got, err := c.ConfigGet(ctx, "maxmemory*").Result()
	if err != nil {
		t.Fatal(err)
	}
	if got["maxmemory"] != "7340032" || got["maxmemory-policy"] != "allkeys-lru" {
		t.Fatalf("CONFIG GET maxmemory* = %v", got)
	}
	s.Kill()
	s.Restart() // with the same arguments
	got, err = c.ConfigGet(ctx, "maxmemory").Result()
	if err != nil || got["maxmemory"] != "7340032" {
		t.Fatalf("after restart: %v, %v", got, err)
	}
}

// TestServersDistinct: two dedicated servers of one test are independent.
func TestServersDistinct(t *testing.T) {
	ctx := context.Background()
	a, b := redistest.StartServer(t), redistest.StartServer(t)
	if a.Addr() == b.Addr() {
		t.Fatalf("both on %s", a.Addr())
	}
	ca, cb := a.Target().NewClient(t), b.Target().NewClient(t)
	if err := ca.Set(ctx, "k", "a", 0).Err(); err != nil {
		t.Fatal(err)
	}
	a.Kill()
	if err := cb.Set(ctx, "k", "b", 0).Err(); err != nil {
		t.Fatalf("killing one server broke the other: %v", err)
	}
}
