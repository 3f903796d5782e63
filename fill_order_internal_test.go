package layercache

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/layercache/layercache/internal/redistest"
)

// pausedSetStore holds the first set (a load's fill) until released, to
// place a write exactly between a fill's last look at its flight and the
// moment its value reaches Redis.
type pausedSetStore struct {
	store
	armed   atomic.Bool
	entered chan struct{}
	release chan struct{}
}

func (s *pausedSetStore) write(ctx context.Context, key string, env []byte, ttl time.Duration, w writeOpts) (writeResult, error) {
	if s.armed.CompareAndSwap(true, false) {
		close(s.entered)
		<-s.release
	}
	return s.store.write(ctx, key, env, ttl, w)
}

// TestWriteDuringFillWins: a Set or Delete made while a fill is on its way
// to Redis (without leases) waits for it and lands after it, so what Redis
// holds when the write returns is the write's, never the older fill's.
func TestWriteDuringFillWins(t *testing.T) {
	writes := map[string]func(c *Cache[string]) error{
		"delete": func(c *Cache[string]) error { return c.Delete(context.Background(), "k") },
		"set":    func(c *Cache[string]) error { return c.Set(context.Background(), "k", "new") },
	}
	for name, write := range writes {
		t.Run(name, func(t *testing.T) {
			redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
				ctx := context.Background()
				c, err := New[string](tgt.NewClient(t), WithNamespace(redistest.Namespace(t)), WithLogger(discardLogger()))
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				ps := &pausedSetStore{store: c.store, entered: make(chan struct{}), release: make(chan struct{})}
				ps.armed.Store(true)
				c.store = ps
				fetched := make(chan string, 1)
				go func() {
					v, _ := c.Fetch(ctx, "k", func(context.Context) (string, error) { return "old", nil })
					fetched <- v
				}()
				<-ps.entered // the fill looked at its flight and is writing
				wrote := make(chan error, 1)
				go func() { wrote <- write(c) }()
				var early error
				returnedEarly := false
				select {
				case early = <-wrote:
					returnedEarly = true
				case <-time.After(50 * time.Millisecond):
				}
				close(ps.release) // before any Fatal: Close waits for the fill
				if returnedEarly {
					t.Fatalf("the write returned (%v) before the fill it overtook had landed", early)
				}
				if err := <-wrote; err != nil {
					t.Fatal(err)
				}
				if v := <-fetched; v != "old" {
					t.Fatalf("the load's caller got %q, want what it loaded", v)
				}
				v, err := c.Get(ctx, "k")
				switch name {
				case "delete":
					if !errors.Is(err, ErrNotFound) {
						t.Fatalf("after Delete returned, Get = %q, %v: the fill landed after the Delete", v, err)
					}
				case "set":
					if err != nil || v != "new" {
						t.Fatalf("after Set returned, Get = %q, %v: the fill landed after the Set", v, err)
					}
				}
			})
		})
	}
}
