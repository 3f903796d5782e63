package layercache

import (
	"errors"
	"strings"
	"testing"
)

func TestKeyspaceEntry(t *testing.T) {
	ks := newKeyspace("users", "v2")
	cases := []struct{ key, want string }{
		{"42", "users:v2:{42}"},
		{"user:42", "users:v2:{user:42}"},
		{"a{b", "users:v2:{a{b}"},
		{"a}b", `users:v2:{a\]b}`},
		{`a\b`, `users:v2:{a\\b}`},
		{"}", `users:v2:{\]}`},
		{"line\nbreak", "users:v2:{line\nbreak}"},
		{"\xff\xfe", "users:v2:{\xff\xfe}"},
	}
	for _, tc := range cases {
		got := ks.entry(tc.key)
		if got != tc.want {
			t.Errorf("entry(%q) = %q, want %q", tc.key, got, tc.want)
		}
		back, ok := ks.userKey(got)
		if !ok || back != tc.key {
			t.Errorf("userKey(%q) = %q, %v; want %q", got, back, ok, tc.key)
		}
		if lease := ks.lease(tc.key); lease != got+":lease" {
			t.Errorf("lease(%q) = %q", tc.key, lease)
		}
		if tag := hashTag(got); tag == "" || tag != hashTag(ks.lease(tc.key)) {
			t.Errorf("value and lease of %q have tags %q and %q", tc.key, tag, hashTag(ks.lease(tc.key)))
		}
	}
	if _, ok := ks.userKey("users:v2:{42}:lease"); ok {
		t.Error("a lease key parsed as a value key")
	}
	if _, ok := ks.userKey("users:v1:{42}"); ok {
		t.Error("another version's key parsed as this one's")
	}
}

// hashTag is Redis Cluster's rule: the part between the first '{' and the
// first '}' after it, when non-empty.
func hashTag(key string) string {
	i := strings.IndexByte(key, '{')
	if i < 0 {
		return ""
	}
	j := strings.IndexByte(key[i+1:], '}')
	if j <= 0 {
		return ""
	}
	return key[i+1 : i+1+j]
}

func FuzzKeyspace(f *testing.F) {
	for _, s := range []string{"a", "}", "{", `\`, `\]`, "a}b{c", "\x00"} {
		f.Add(s)
	}
	ks := newKeyspace("ns", "v1")
	f.Fuzz(func(t *testing.T, key string) {
		if checkKey(key) != nil {
			return
		}
		rk := ks.entry(key)
		if !strings.HasPrefix(rk, "ns:v1:{") {
			t.Fatalf("%q left its namespace: %q", key, rk)
		}
		back, ok := ks.userKey(rk)
		if !ok || back != key {
			t.Fatalf("round trip of %q gave %q, %v", key, back, ok)
		}
		if hashTag(rk) == "" || hashTag(rk) != hashTag(ks.lease(key)) {
			t.Fatalf("%q: value and lease in different slots", key)
		}
	})
}

func TestCheckKey(t *testing.T) {
	for _, k := range []string{"", strings.Repeat("x", MaxKeyLen+1)} {
		if err := checkKey(k); !errors.Is(err, ErrInvalidKey) {
			t.Errorf("checkKey(len %d) = %v, want ErrInvalidKey", len(k), err)
		}
	}
	if err := checkKey(strings.Repeat("x", MaxKeyLen)); err != nil {
		t.Errorf("a key of MaxKeyLen bytes was refused: %v", err)
	}
}

func TestCheckName(t *testing.T) {
	for _, s := range []string{"users", "v2", "catalog.products", "svc/users@2024", "A_b-9"} {
		if err := checkName("x", s); err != nil {
			t.Errorf("checkName(%q) = %v", s, err)
		}
	}
	for _, s := range []string{"", "a:b", "a{b", "a}b", "a b", "a*", "a?", "a[", "é", strings.Repeat("n", maxNameLen+1)} {
		if err := checkName("x", s); !errors.Is(err, ErrInvalidOption) {
			t.Errorf("checkName(%q) = %v, want ErrInvalidOption", s, err)
		}
	}
}
