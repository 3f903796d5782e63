package layercache

import (
	"math"
	"testing"
	"time"
)

func TestXFetch(t *testing.T) {
	noDraw := func() float64 { panic("no random draw expected this far from expiry") }
	draw := func(u float64) func() float64 { return func() float64 { return u } }
	const now = 1_000_000
	cases := []struct {
		name  string
		fresh int64 // fresh-until, Unix ms
		delta time.Duration
		beta  float64
		rnd   func() float64
		want  bool
	}{
		{"no load time, never", now + 1, 0, 1, noDraw, false},
		{"far from expiry, no draw", now + 60_000, 100 * time.Millisecond, 1, noDraw, false},
		{"beta widens the window", now + 60_000, 100 * time.Millisecond, 100, draw(0.5), false},
		{"at the edge: -ln(1/e)*delta = gap", now + 100, 100 * time.Millisecond, 1, draw(1 / math.E), true},
		{"just inside the gap", now + 101, 100 * time.Millisecond, 1, draw(1 / math.E), false},
		{"big draw, close to expiry", now + 10, 100 * time.Millisecond, 1, draw(0.99), false},
		{"small draw, close to expiry", now + 10, 100 * time.Millisecond, 1, draw(0.01), true},
		{"beta 1 falls short", now + 150, 100 * time.Millisecond, 1, draw(0.4), false},
		{"beta 2 doubles the reach", now + 150, 100 * time.Millisecond, 2, draw(0.4), true},
		{"u = 0 always refreshes", now + 1000, 100 * time.Millisecond, 1, draw(0), true},
		{"at expiry", now, 100 * time.Millisecond, 1, draw(0.999999), true},
	}
	for _, tc := range cases {
		if got := xfetch(now, tc.fresh, tc.delta, tc.beta, tc.rnd); got != tc.want {
			t.Errorf("%s: xfetch = %v, want %v", tc.name, got, tc.want)
		}
	}
}

func TestWaitDelay(t *testing.T) {
	cases := []struct {
		name      string
		heldFor   time.Duration
		confirmed bool
		left      time.Duration
		want      time.Duration
	}{
		{"confirmed: look when the lease would run out", 800 * time.Millisecond, true, time.Minute, 800*time.Millisecond + expirySlack},
		{"unconfirmed: poll", 800 * time.Millisecond, false, time.Minute, unconfirmedPoll},
		{"unconfirmed, lease about to end", 10 * time.Millisecond, false, time.Minute, 10*time.Millisecond + expirySlack},
		{"lease without expiry: poll", 0, true, time.Minute, unconfirmedPoll},
		{"never past the wait", 800 * time.Millisecond, true, 30 * time.Millisecond, 30 * time.Millisecond},
		{"wait over", 800 * time.Millisecond, true, -time.Second, 0},
	}
	for _, tc := range cases {
		if got := waitDelay(tc.heldFor, tc.confirmed, tc.left); got != tc.want {
			t.Errorf("%s: waitDelay = %v, want %v", tc.name, got, tc.want)
		}
	}
}

func TestParseAcquire(t *testing.T) {
	r, err := parseAcquire([]any{nil, int64(0), int64(750), int64(-2), nil, int64(-2)})
	if err != nil || r.taken || r.value != nil || r.heldFor != 750*time.Millisecond {
		t.Fatalf("held: %+v, %v", r, err)
	}
	r, err = parseAcquire([]any{"env", int64(1), int64(0), int64(-2), nil, int64(-2)})
	if err != nil || !r.taken || string(r.value) != "env" {
		t.Fatalf("taken: %+v, %v", r, err)
	}
	r, err = parseAcquire([]any{nil, int64(0), int64(-1), int64(-2), nil, int64(-2)}) // lease without expiry
	if err != nil || r.heldFor != 0 {
		t.Fatalf("no expiry: %+v, %v", r, err)
	}
	r, err = parseAcquire([]any{"p", int64(1), int64(0), int64(1500), "stamp", int64(-1)}) // Raw
	if err != nil || r.valueTTL != 1500*time.Millisecond || string(r.stamp) != "stamp" || r.stampTTL != -1 {
		t.Fatalf("raw parts: %+v, %v", r, err)
	}
	for _, bad := range [][]any{nil, {nil, int64(1)}, {int64(3), int64(1), int64(0)}, {nil, "1", int64(0), int64(0), nil, int64(0)}} {
		if _, err := parseAcquire(bad); err == nil {
			t.Errorf("parseAcquire(%v) accepted", bad)
		}
	}
}
