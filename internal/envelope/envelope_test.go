package envelope

import (
	"bytes"
	"errors"
	"testing"
	"time"
)

func TestRoundTrip(t *testing.T) {
	cases := []struct {
		name    string
		h       Header
		payload []byte
	}{
		{"empty payload", Header{WrittenAt: 1, FreshUntil: 2, ExpiresAt: 3}, nil},
		{"value", Header{WrittenAt: 1700000000000, FreshUntil: 1700000060000, ExpiresAt: 1700000120000, LoadDuration: 35 * time.Millisecond, WriteVersion: 42}, []byte(`{"a":1}`)},
		{"negative", Header{Flags: FlagNegative, WrittenAt: 5, FreshUntil: 5, ExpiresAt: 5}, nil},
		{"huge load duration is clamped", Header{WrittenAt: 1, FreshUntil: 1, ExpiresAt: 1, LoadDuration: 100 * time.Hour}, []byte("x")},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			b := Encode(tc.h, tc.payload)
			h, p, err := Decode(b)
			if err != nil {
				t.Fatal(err)
			}
			want := tc.h
			if want.LoadDuration > time.Duration(1<<32-1)*time.Microsecond {
				want.LoadDuration = time.Duration(1<<32-1) * time.Microsecond
			}
			if h != want {
				t.Fatalf("header %+v, want %+v", h, want)
			}
			if !bytes.Equal(p, tc.payload) {
				t.Fatalf("payload %q, want %q", p, tc.payload)
			}
		})
	}
}

func TestDecodeRejects(t *testing.T) {
	good := Encode(Header{WrittenAt: 1, FreshUntil: 2, ExpiresAt: 3}, []byte("p"))
	mut := func(f func(b []byte) []byte) []byte { return f(append([]byte(nil), good...)) }
	cases := []struct {
		name string
		b    []byte
		want error
	}{
		{"nil", nil, ErrShort},
		{"plain json", []byte(`{"name":"legacy value written by old code"}`), ErrMagic},
		{"truncated", good[:HeaderSize-1], ErrShort},
		{"version", mut(func(b []byte) []byte { b[1] = 9; return b }), ErrVersion},
		{"flags", mut(func(b []byte) []byte { b[2] = 0x80; return b }), ErrFlags},
		{"reserved", mut(func(b []byte) []byte { b[3] = 1; return b }), ErrFlags},
		{"fresh before written", mut(func(b []byte) []byte { b[11] = 9; return b }), ErrTimes},
		{"negative with payload", mut(func(b []byte) []byte { b[2] = FlagNegative; return b }), ErrFlags},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if _, _, err := Decode(tc.b); !errors.Is(err, tc.want) {
				t.Fatalf("err %v, want %v", err, tc.want)
			}
		})
	}
}

func FuzzDecode(f *testing.F) {
	f.Add(Encode(Header{WrittenAt: 1, FreshUntil: 2, ExpiresAt: 3, WriteVersion: 7}, []byte("payload")))
	f.Add(Encode(Header{Flags: FlagNegative}, nil))
	f.Add([]byte(`{"legacy":true}`))
	f.Add([]byte{Magic})
	f.Fuzz(func(t *testing.T, b []byte) {
		h, p, err := Decode(b)
		if err != nil {
			return
		}
		// Whatever decodes must re-encode to the same bytes.
		if again := Encode(h, p); !bytes.Equal(again, b) {
			t.Fatalf("re-encode differs:\n%x\n%x", again, b)
		}
	})
}

func TestHeaderHelpers(t *testing.T) {
	h := Header{WrittenAt: 1, FreshUntil: 2, ExpiresAt: 3, WriteVersion: 5<<16 | 7}
	env := Encode(h, []byte("x"))
	if got := WriteVersion(env); got != h.WriteVersion {
		t.Fatalf("WriteVersion = %x, want %x", got, h.WriteVersion)
	}
	if got := WriteVersion(env[:HeaderSize-1]); got != 0 {
		t.Fatalf("WriteVersion of a short header = %x, want 0", got)
	}
	if got := WriteVersion([]byte("legacy value that is long enough to be a header!")); got != 0 {
		t.Fatalf("WriteVersion of a legacy value = %x, want 0", got)
	}
	v2 := WithWriteVersion(env, 9)
	if WriteVersion(v2) != 9 || WriteVersion(env) != h.WriteVersion {
		t.Fatal("WithWriteVersion must copy, not change its input")
	}
	if !Usable(env, 2) || Usable(env, 3) || Usable(nil, 0) || Usable([]byte("x"), 0) {
		t.Fatal("Usable is true before ExpiresAt only, for envelopes only")
	}
	// ProposePast keeps the writer id and moves the counter past other's.
	if got := WriteVersion(ProposePast(env, 4<<16|9)); got != h.WriteVersion {
		t.Fatalf("ProposePast past an older counter changed the version to %x", got)
	}
	if got := WriteVersion(ProposePast(env, 5<<16|9)); got != 6<<16|7 {
		t.Fatalf("ProposePast past an equal counter = %x, want %x", got, 6<<16|7)
	}
	if got := WriteVersion(ProposePast(env, 8<<16|1)); got != 9<<16|7 {
		t.Fatalf("ProposePast past a newer counter = %x, want %x", got, 9<<16|7)
	}
}
