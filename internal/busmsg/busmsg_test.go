package busmsg

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"reflect"
	"strings"
	"testing"
)

var origin = [8]byte{1, 2, 3, 4, 5, 6, 7, 8}

func TestRoundTrip(t *testing.T) {
	items := []Item{
		{Kind: KindInvalidate, Route: "users:v1", Keys: []string{"1", "2", "k}{\x00\xff"}},
		{Kind: KindFlush, Route: "flags:v3"},
		{Kind: KindPhase, Route: "catalog"},
		{Kind: KindInvalidate, Route: "flags:v3", Keys: []string{strings.Repeat("x", MaxKeyLen)}},
	}
	for _, secret := range [][]byte{nil, []byte("0123456789abcdef")} {
		msgs := Encode(origin, 1234, items, secret)
		if len(msgs) != 1 {
			t.Fatalf("secret %q: %d messages, want 1", secret, len(msgs))
		}
		m, err := Decode(msgs[0], secret)
		if err != nil {
			t.Fatalf("secret %q: %v", secret, err)
		}
		want := Message{Origin: origin, SentAt: 1234, Items: items}
		if !reflect.DeepEqual(m, want) {
			t.Fatalf("secret %q: got %+v, want %+v", secret, m, want)
		}
		// A reader without a secret still reads an authenticated message.
		if _, err := Decode(msgs[0], nil); err != nil {
			t.Fatalf("reader without secret: %v", err)
		}
	}
}

func TestSplitsLargeBatches(t *testing.T) {
	keys := make([]string, 5000)
	for i := range keys {
		keys[i] = fmt.Sprintf("key-%06d-%s", i, strings.Repeat("p", 20))
	}
	items := []Item{
		{Kind: KindFlush, Route: "a:v1"},
		{Kind: KindInvalidate, Route: "b:v1", Keys: keys},
		{Kind: KindInvalidate, Route: "c:v1", Keys: []string{strings.Repeat("z", MaxKeyLen)}},
	}
	for _, secret := range [][]byte{nil, []byte("0123456789abcdef")} {
		msgs := Encode(origin, 1, items, secret)
		if len(msgs) < 2 {
			t.Fatalf("%d messages for %d keys, want a split", len(msgs), len(keys))
		}
		var got []string
		flushes, bigs := 0, 0
		for _, b := range msgs {
			if len(b) > MaxSize {
				t.Fatalf("message of %d bytes, limit %d", len(b), MaxSize)
			}
			m, err := Decode(b, secret)
			if err != nil {
				t.Fatal(err)
			}
			for _, it := range m.Items {
				switch it.Route {
				case "a:v1":
					flushes++
				case "b:v1":
					got = append(got, it.Keys...)
				case "c:v1":
					bigs++
				}
			}
		}
		if !reflect.DeepEqual(got, keys) || flushes != 1 || bigs != 1 {
			t.Fatalf("after split: %d keys (equal: %v), %d flushes, %d big keys", len(got), reflect.DeepEqual(got, keys), flushes, bigs)
		}
	}
}

func TestAuthentication(t *testing.T) {
	secret := []byte("0123456789abcdef")
	items := []Item{{Kind: KindInvalidate, Route: "users:v1", Keys: []string{"1"}}}
	good := Encode(origin, 1, items, secret)[0]
	plain := Encode(origin, 1, items, nil)[0]
	other := Encode(origin, 1, items, []byte("fedcba9876543210"))[0]
	tampered := bytes.Clone(good)
	tampered[len(tampered)-MACSize-1] ^= 1 // the key byte
	truncated := good[:len(good)-1]
	futureVersion := bytes.Clone(plain)
	futureVersion[1] = 9
	futureAuth := bytes.Clone(plain)
	futureAuth[1] = 9
	futureAuth[2] = FlagMAC
	futureAuth = append(futureAuth, Sum(secret, futureAuth)...)

	cases := []struct {
		name   string
		b      []byte
		secret []byte
		want   error
	}{
		{"authentic", good, secret, nil},
		{"no MAC", plain, secret, ErrForged},
		{"other secret", other, secret, ErrForged},
		{"tampered", tampered, secret, ErrForged},
		{"truncated", truncated, secret, ErrForged},
		{"future version, authentic", futureAuth, secret, ErrVersion},
		{"future version, forged", futureVersion, secret, ErrForged},
		{"future version, no secret", futureVersion, nil, ErrVersion},
		{"foreign", []byte("hello, world, this is not ours"), nil, ErrForeign},
		{"short", []byte{Magic, Version}, secret, ErrForeign},
	}
	for _, c := range cases {
		_, err := Decode(c.b, c.secret)
		if !errors.Is(err, c.want) && !(c.want == nil && err == nil) {
			t.Errorf("%s: Decode = %v, want %v", c.name, err, c.want)
		}
	}
}

func TestSkipsUnknownKinds(t *testing.T) {
	b := Encode(origin, 1, []Item{{Kind: KindInvalidate, Route: "r:v1", Keys: []string{"k"}}}, nil)[0]
	// Insert an item of kind 9 with a 3-byte body before the known one.
	unknown := []byte{9, 3, 'a', 'b', 'c'}
	b = append(append(bytes.Clone(b[:HeaderSize]), unknown...), b[HeaderSize:]...)
	m, err := Decode(b, nil)
	if err != nil || len(m.Items) != 1 || m.Items[0].Keys[0] != "k" {
		t.Fatalf("Decode = %+v, %v", m, err)
	}
}

func TestMalformed(t *testing.T) {
	hdr := Encode(origin, 1, []Item{{Kind: KindFlush, Route: "r"}}, nil)[0][:HeaderSize]
	item := func(kind Kind, body []byte) []byte {
		b := append(bytes.Clone(hdr), byte(kind))
		b = binary.AppendUvarint(b, uint64(len(body)))
		return append(b, body...)
	}
	cases := map[string][]byte{
		"body past end":     append(bytes.Clone(hdr), byte(KindFlush), 50, 1, 'r'),
		"empty route":       item(KindFlush, []byte{0}),
		"flush with keys":   item(KindFlush, []byte{1, 'r', 1, 'k'}),
		"invalidate no key": item(KindInvalidate, []byte{1, 'r'}),
		"empty key":         item(KindInvalidate, []byte{1, 'r', 0}),
		"key past body":     item(KindInvalidate, []byte{1, 'r', 5, 'k'}),
		"bad varint":        append(bytes.Clone(hdr), byte(KindFlush), 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff),
		"unknown flags":     func() []byte { b := item(KindFlush, []byte{1, 'r'}); b[2] = 0x80; return b }(),
	}
	for name, b := range cases {
		if _, err := Decode(b, nil); !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: Decode = %v, want ErrMalformed", name, err)
		}
	}
}

func FuzzDecode(f *testing.F) {
	secret := []byte("0123456789abcdef")
	f.Add(Encode(origin, 1, []Item{{Kind: KindInvalidate, Route: "users:v1", Keys: []string{"1", "2"}}}, nil)[0], false)
	f.Add(Encode(origin, 1, []Item{{Kind: KindFlush, Route: "users:v1"}}, secret)[0], true)
	f.Add([]byte{Magic, Version, 0}, false)
	f.Fuzz(func(t *testing.T, b []byte, withSecret bool) {
		var s []byte
		if withSecret {
			s = secret
		}
		m, err := Decode(b, s)
		if err != nil {
			return
		}
		// Whatever decodes re-encodes to something that decodes the same.
		for _, it := range m.Items {
			if it.Route == "" || (it.Kind == KindInvalidate && len(it.Keys) == 0) {
				t.Fatalf("decoded an invalid item %+v", it)
			}
		}
		for _, out := range Encode(m.Origin, m.SentAt, m.Items, s) {
			m2, err := Decode(out, s)
			if err != nil {
				t.Fatalf("re-encoded message does not decode: %v", err)
			}
			if m2.Origin != m.Origin || m2.SentAt != m.SentAt {
				t.Fatalf("header changed: %+v vs %+v", m2, m)
			}
		}
	})
}
