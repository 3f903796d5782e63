package redistest_test

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/layercache/layercache/internal/redistest"
)

// fakeT records failures instead of failing the test, so that the
// failure paths of the helpers can be tested. Only the methods the
// helpers use are implemented; the embedded nil TB panics on others.
type fakeT struct {
	testing.TB
	mu     sync.Mutex
	msgs   []string
	failed bool
}

func (f *fakeT) Helper() {}

func (f *fakeT) Error(args ...any) { f.record(strings.TrimSuffix(sprintln(args...), "\n")) }

func (f *fakeT) Errorf(format string, args ...any) { f.record(sprintf(format, args...)) }

func (f *fakeT) Fatalf(format string, args ...any) {
	f.record(sprintf(format, args...))
	f.FailNow()
}

func (f *fakeT) FailNow() {
	f.mu.Lock()
	f.failed = true
	f.mu.Unlock()
	runtime.Goexit()
}

func (f *fakeT) Failed() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.failed
}

func (f *fakeT) record(msg string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.failed = true
	f.msgs = append(f.msgs, msg)
}

func (f *fakeT) text() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return strings.Join(f.msgs, "\n")
}

// runFake runs fn with a fakeT on a goroutine of its own, as the testing
// package runs a test, and returns the fakeT once fn has ended, by
// returning or by FailNow.
func runFake(fn func(t *fakeT)) *fakeT {
	f := &fakeT{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		fn(f)
	}()
	<-done
	return f
}

func TestEventually(t *testing.T) {
	start := time.Now()
	calls := 0
	redistest.Eventually(t, redistest.DefaultWait, "the third call", func() bool {
		calls++
		return calls == 3
	})
	if calls != 3 {
		t.Fatalf("cond called %d times, want 3", calls)
	}
	// 1ms then 2ms of polling, not a fixed coarse interval.
	if d := time.Since(start); d > time.Second {
		t.Fatalf("three polls took %v", d)
	}

	var polls atomic.Int32
	f := runFake(func(ft *fakeT) {
		redistest.Eventually(ft, 50*time.Millisecond, "the impossible", func() bool {
			polls.Add(1)
			return false
		})
		ft.record("Eventually returned")
	})
	if !f.Failed() || !strings.Contains(f.text(), "the impossible") || strings.Contains(f.text(), "returned") {
		t.Fatalf("Eventually on a false condition: failed=%v, messages %q", f.Failed(), f.text())
	}
	// Growing from 1ms to 20ms, 50ms holds about six polls, not fifty.
	if n := polls.Load(); n < 3 || n > 30 {
		t.Fatalf("%d polls in 50ms", n)
	}
}

func TestHammer(t *testing.T) {
	const n = 50
	var arrived atomic.Int32
	seen := make([]atomic.Bool, n)
	redistest.Hammer(t, n, func(g int) {
		seen[g].Store(true)
		arrived.Add(1)
	})
	for g := range seen {
		if !seen[g].Load() {
			t.Fatalf("goroutine %d did not run", g)
		}
	}
	if arrived.Load() != n {
		t.Fatalf("%d calls, want %d", arrived.Load(), n)
	}
}

// TestHammerReleasesTogether shows that every goroutine is running before
// any calls fn: each waits (bounded) for all the others to arrive, which
// would time out if they were started one after another's fn.
func TestHammerReleasesTogether(t *testing.T) {
	const n = 16
	var arrived atomic.Int32
	redistest.Hammer(t, n, func(int) {
		arrived.Add(1)
		deadline := time.Now().Add(redistest.DefaultWait)
		for arrived.Load() < n && time.Now().Before(deadline) {
			runtime.Gosched()
		}
	})
	if arrived.Load() != n {
		t.Fatalf("%d arrived", arrived.Load())
	}
}

func TestHammerReportsPanicsAndGoexit(t *testing.T) {
	var finished atomic.Int32
	f := runFake(func(ft *fakeT) {
		redistest.Hammer(ft, 8, func(g int) {
			switch g {
			case 3:
				panic("boom")
			case 5:
				ft.FailNow() // as t.Fatal from a hammered goroutine
			}
			finished.Add(1)
		})
		ft.record("Hammer returned")
	})
	txt := f.text()
	for _, want := range []string{"goroutine 3 panicked: boom", "helpers_test.go", "goroutine 5 called runtime.Goexit"} {
		if !strings.Contains(txt, want) {
			t.Errorf("report lacks %q:\n%s", want, txt)
		}
	}
	if strings.Contains(txt, "Hammer returned") {
		t.Error("Hammer returned normally after a panic")
	}
	if finished.Load() != 6 {
		t.Errorf("%d goroutines finished, want the other 6", finished.Load())
	}
}

func TestHammerFor(t *testing.T) {
	const n, d = 4, 50 * time.Millisecond
	counts := make([]atomic.Int32, n)
	start := time.Now()
	total := redistest.HammerFor(t, n, d, func(g, i int) bool {
		if int(counts[g].Load()) != i {
			t.Errorf("goroutine %d: call %d numbered %d", g, counts[g].Load(), i)
		}
		counts[g].Add(1)
		if g == 0 {
			return false // goroutine 0 stops after one call
		}
		time.Sleep(time.Millisecond)
		return true
	})
	if el := time.Since(start); el < d {
		t.Fatalf("returned after %v, before %v", el, d)
	}
	sum := 0
	for g := range counts {
		sum += int(counts[g].Load())
	}
	if total != sum {
		t.Fatalf("returned %d calls, counted %d", total, sum)
	}
	if counts[0].Load() != 1 {
		t.Fatalf("goroutine 0 made %d calls after returning false", counts[0].Load())
	}
	for g := 1; g < n; g++ {
		if counts[g].Load() < 5 {
			t.Fatalf("goroutine %d made only %d calls in %v", g, counts[g].Load(), d)
		}
	}

	// A zero duration still calls every goroutine once.
	if got := redistest.HammerFor(t, n, 0, func(int, int) bool { return true }); got != n {
		t.Fatalf("HammerFor(0) made %d calls, want %d", got, n)
	}
}

func TestHammerForStopsOnFailure(t *testing.T) {
	var calls atomic.Int32
	start := time.Now()
	f := runFake(func(ft *fakeT) {
		redistest.HammerFor(ft, 4, time.Minute, func(g, i int) bool {
			calls.Add(1)
			if g == 2 && i == 10 {
				ft.Errorf("check failed in goroutine %d", g)
			}
			return true
		})
	})
	if el := time.Since(start); el > 10*time.Second {
		t.Fatalf("a failed check did not stop the hammer: ran %v", el)
	}
	if !strings.Contains(f.text(), "check failed in goroutine 2") {
		t.Fatalf("messages: %q", f.text())
	}

	start = time.Now()
	f = runFake(func(ft *fakeT) {
		redistest.HammerFor(ft, 4, time.Minute, func(g, i int) bool {
			if g == 1 && i == 3 {
				panic("bad state")
			}
			return true
		})
	})
	if el := time.Since(start); el > 10*time.Second {
		t.Fatalf("a panic did not stop the hammer: ran %v", el)
	}
	if !strings.Contains(f.text(), "goroutine 1 panicked: bad state") {
		t.Fatalf("messages: %q", f.text())
	}
}

// TestClients checks that every client has a pool of its own: closing one
// leaves the others working, and (for single-node clients, which open no
// connection by themselves) traffic on one opens connections in that one
// only.
func TestClients(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		cs := redistest.Clients(t, tgt, 3)
		if len(cs) != 3 || cs[0] == cs[1] || cs[1] == cs[2] || cs[0] == cs[2] {
			t.Fatalf("clients not distinct: %v", cs)
		}
		if err := cs[1].Ping(ctx).Err(); err != nil {
			t.Fatal(err)
		}
		if !tgt.Cluster {
			for i, c := range cs {
				if conns := c.PoolStats().TotalConns; (i == 1) != (conns > 0) {
					t.Fatalf("client %d has %d connections after a PING on client 1 only", i, conns)
				}
			}
		}
		if err := cs[0].Close(); err != nil {
			t.Fatal(err)
		}
		if err := cs[0].Ping(ctx).Err(); !errors.Is(err, redis.ErrClosed) {
			t.Fatalf("PING on a closed client: %v", err)
		}
		for _, c := range cs[1:] {
			if err := c.Ping(ctx).Err(); err != nil {
				t.Fatalf("closing one client broke another: %v", err)
			}
		}
	})
}

func sprintf(format string, args ...any) string { return fmt.Sprintf(format, args...) }

func sprintln(args ...any) string { return fmt.Sprintln(args...) }
