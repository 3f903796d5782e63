package layercache

import (
	"context"
	"crypto/sha256"
	"encoding"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// ---- write versions ----

// A write version is 64 bits: a 48-bit counter, Unix milliseconds when a
// write is proposed, and the 16-bit id of the writing cache instance in the
// low bits, so that two instances never propose the same version in the
// same millisecond (short of a 1-in-65536 id clash). Redis stores a fresh
// write at max(proposal, current counter + 1) (see writeFresh), so what
// orders writes to one entry is the order Redis applies them, not the
// writers' clocks; the clock only makes versions of a new entry roughly
// comparable with older ones.
type writeClock struct {
	writer uint64 // 16 bits
	last   atomic.Uint64
}

func newWriteClock() *writeClock { return &writeClock{writer: uint64(rand.Uint32() & 0xffff)} }

// next proposes the version of a new write. Proposals of one instance
// strictly grow, even within a millisecond or if the clock steps back.
func (w *writeClock) next() uint64 {
	now := uint64(time.Now().UnixMilli())
	for {
		last := w.last.Load()
		c := now
		if c <= last {
			c = last + 1
		}
		if w.last.CompareAndSwap(last, c) {
			return c<<16 | w.writer
		}
	}
}

// ---- upgrade on read ----

type upgradeOption struct {
	version  string
	from, to reflect.Type
	// convert decodes an Old payload, upgrades it and encodes the T.
	convert func(codec Codec, payload []byte) ([]byte, error)
}

// WithUpgradeFrom makes a miss at the cache's version look for the same key
// at an older version, holding values of type Old: such a value is decoded
// as Old, converted by upgrade, written at the current version with the
// same absolute expiry and write version (a newer write there wins), and
// returned, without calling the loader. upgrade's T must be the cache's
// value type, checked by [New]. Writes and deletes of a key also delete it
// at the older versions (one more round trip per older version), so that
// an upgrade never brings back a value older than a write or a delete.
//
// Several may be given (v1 -> v3, v2 -> v3); they are tried in the order
// given, so list the most recent first: each one costs a Redis read per
// miss that finds nothing at the current version, plus one to fence the
// upgrade's write against a Delete racing it. Set reads the older versions'
// write versions too (one read per older version), so its write version
// passes theirs whatever the writers' clocks say. A value that does not
// decode as Old, an upgrade that fails or panics, and an upgraded value
// that fails a [WithValidator] check are misses (counted in
// [Stats].UpgradeErrors or ValidationFailures), never served. Cached "not
// found" entries are carried over as they are.
//
// A [Raw] layout has no version in its keys, so it cannot be combined with
// WithUpgradeFrom; validate its values instead.
func WithUpgradeFrom[Old, T any](version string, upgrade func(Old) (T, error)) Option {
	return func(c *config) {
		if err := checkName("WithUpgradeFrom", version); err != nil {
			c.errs = append(c.errs, err)
			return
		}
		if upgrade == nil {
			c.fail("WithUpgradeFrom(%q, nil): give an upgrade function", version)
			return
		}
		c.upgrades = append(c.upgrades, upgradeOption{
			version: version,
			from:    reflect.TypeFor[Old](),
			to:      reflect.TypeFor[T](),
			convert: func(codec Codec, payload []byte) (out []byte, err error) {
				var old Old
				if err := codec.Unmarshal(payload, &old); err != nil {
					return nil, fmt.Errorf("decode as %v: %w", reflect.TypeFor[Old](), err)
				}
				defer func() {
					if r := recover(); r != nil {
						out, err = nil, fmt.Errorf("upgrade from %v panicked: %v", reflect.TypeFor[Old](), r)
					}
				}()
				v, err := upgrade(old)
				if err != nil {
					return nil, fmt.Errorf("upgrade from %v: %w", reflect.TypeFor[Old](), err)
				}
				return codec.Marshal(v)
			},
		})
	}
}

// ---- validators ----

type validatorOption struct {
	typ reflect.Type
	fn  any // func(T) error
}

// WithValidator adds a check of every value read from Redis: a value for
// which validate returns an error (or panics) is a miss, never served; it
// is counted in [Stats].ValidationFailures and logged at most once per key
// (for the first 4096 keys; later ones are only counted). Use it for
// fields that must be present, such as a phone number needed for payments:
// serving an old value without it is worse than a miss. validate's T must
// be the cache's value type, checked by [New]. Several may be given; all
// must pass. Values returned by the loader are not checked.
func WithValidator[T any](validate func(T) error) Option {
	return func(c *config) {
		if validate == nil {
			c.fail("WithValidator(nil): give a validation function")
			return
		}
		c.validators = append(c.validators, validatorOption{typ: reflect.TypeFor[T](), fn: validate})
	}
}

// maxLoggedInvalid bounds the set of keys whose validation failure was
// logged, so a keyspace full of bad values cannot grow it without end.
const maxLoggedInvalid = 4096

type validation[T any] struct {
	fns    []func(T) error
	mu     sync.Mutex
	logged map[string]struct{}
}

// valid runs the validators on a value read for key.
func (c *Cache[T]) valid(ctx context.Context, key string, v T) bool {
	if c.vals == nil {
		return true
	}
	for _, fn := range c.vals.fns {
		if err := callValidator(fn, v); err != nil {
			c.rec.inc(evValidationFailure)
			c.vals.mu.Lock()
			_, seen := c.vals.logged[key]
			first := !seen && len(c.vals.logged) < maxLoggedInvalid
			if first {
				c.vals.logged[key] = struct{}{}
			}
			c.vals.mu.Unlock()
			if first {
				c.log.LogAttrs(ctx, slog.LevelWarn, "layercache: cached value fails validation; treating it as a miss",
					slog.String("key", key), slog.Any("err", err))
			}
			return false
		}
	}
	return true
}

func callValidator[T any](fn func(T) error, v T) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("validator panicked: %v", r)
		}
	}()
	return fn(v)
}

// ---- version from type ----

// WithVersionFromType derives the schema version from the shape of T: the
// version becomes the one set by [WithVersion] (default "v1"), a dot, and
// [TypeVersion] of T, e.g. "v1.3f09c2a1b4d5". A change of T's shape (a
// field added, removed, renamed, retyped or retagged, at any depth) moves
// the cache to a new keyspace by itself, so new code can never read
// old-shaped values; [WithUpgradeFrom] can still carry them over. Bump
// WithVersion for a change of meaning that keeps the shape.
func WithVersionFromType() Option {
	return func(c *config) { c.versionFromType = true }
}

// TypeVersion returns a 12-hex-digit digest of the shape of T: field
// names, types and tags, recursively (recursive types included), not the
// names of named types or their packages, so an old copy of a struct kept
// under another name (OldUser) has the version the original had. Types
// that encode themselves (json.Marshaler, encoding.TextMarshaler, such as
// time.Time) count by their package path and name instead of their
// insides. It is stable across builds, processes and machines.
func TypeVersion[T any]() string {
	sum := sha256.Sum256([]byte("layercache shape v1\n" + typeShape(reflect.TypeFor[T]())))
	return hex.EncodeToString(sum[:6])
}

var (
	jsonMarshalerType = reflect.TypeFor[json.Marshaler]()
	textMarshalerType = reflect.TypeFor[encoding.TextMarshaler]()
)

func typeShape(t reflect.Type) string {
	var b strings.Builder
	writeShape(&b, t, map[reflect.Type]int{})
	return b.String()
}

// writeShape writes a canonical description of t. path maps the types
// being described, outer to inner, to their depth: meeting one again is a
// recursive type, written as a back-reference by distance ("^2"), which
// depends on shape only, not on names.
func writeShape(b *strings.Builder, t reflect.Type, path map[reflect.Type]int) {
	if d, ok := path[t]; ok {
		b.WriteString("^" + strconv.Itoa(len(path)-d))
		return
	}
	if t.Name() != "" && t.Kind() != reflect.Interface && selfEncoding(t) {
		b.WriteString("opaque(" + t.PkgPath() + "." + t.Name() + ")")
		return
	}
	path[t] = len(path)
	defer delete(path, t)
	switch t.Kind() {
	case reflect.Struct:
		b.WriteString("struct{")
		for i := range t.NumField() {
			f := t.Field(i)
			if i > 0 {
				b.WriteByte(';')
			}
			if f.Anonymous {
				b.WriteString("embedded ")
			}
			b.WriteString(f.Name)
			b.WriteByte(' ')
			writeShape(b, f.Type, path)
			if f.Tag != "" {
				b.WriteByte(' ')
				b.WriteString(strconv.Quote(string(f.Tag)))
			}
		}
		b.WriteByte('}')
	case reflect.Pointer:
		b.WriteByte('*')
		writeShape(b, t.Elem(), path)
	case reflect.Slice:
		b.WriteString("[]")
		writeShape(b, t.Elem(), path)
	case reflect.Array:
		b.WriteString("[" + strconv.Itoa(t.Len()) + "]")
		writeShape(b, t.Elem(), path)
	case reflect.Map:
		b.WriteString("map[")
		writeShape(b, t.Key(), path)
		b.WriteByte(']')
		writeShape(b, t.Elem(), path)
	case reflect.Chan:
		b.WriteString(t.ChanDir().String() + " ")
		writeShape(b, t.Elem(), path)
	case reflect.Func:
		b.WriteString("func(")
		for i := range t.NumIn() {
			writeShape(b, t.In(i), path)
			b.WriteByte(',')
		}
		b.WriteString(")(")
		for i := range t.NumOut() {
			writeShape(b, t.Out(i), path)
			b.WriteByte(',')
		}
		b.WriteByte(')')
	case reflect.Interface:
		b.WriteString("interface{")
		for i := range t.NumMethod() { // sorted by name
			m := t.Method(i)
			b.WriteString(m.Name)
			writeShape(b, m.Type, path)
			b.WriteByte(';')
		}
		b.WriteByte('}')
	default:
		b.WriteString(t.Kind().String())
	}
}

func selfEncoding(t reflect.Type) bool {
	p := reflect.PointerTo(t)
	return t.Implements(jsonMarshalerType) || p.Implements(jsonMarshalerType) ||
		t.Implements(textMarshalerType) || p.Implements(textMarshalerType)
}

// Version returns the schema version in the cache's keys (with
// [WithVersionFromType], the derived one).
func (c *Cache[T]) Version() string { return c.keys.version }

// ---- wiring (called by New) ----

// resolveVersioning checks the typed options against T, settles the
// version, and checks that the layout options agree with each other and
// with the versioning ones. Errors go to cfg.errs.
func resolveVersioning[T any](cfg *config) (*validation[T], []upgradeOption) {
	want := reflect.TypeFor[T]()
	if cfg.layout != nil && cfg.migration != nil {
		cfg.fail("WithLayout(%v) and WithMigration(%q): a migrating cache's layouts are the migration's", *cfg.layout, cfg.migration.name)
	}
	var vals *validation[T]
	for _, v := range cfg.validators {
		fn, ok := v.fn.(func(T) error)
		if !ok {
			cfg.fail("WithValidator(func(%v) error) on a Cache[%v]: the validator must take the cache's value type", v.typ, want)
			continue
		}
		if vals == nil {
			vals = &validation[T]{logged: make(map[string]struct{})}
		}
		vals.fns = append(vals.fns, fn)
	}
	if cfg.versionFromType {
		v := cfg.version + "." + TypeVersion[T]()
		if err := checkName("WithVersionFromType", v); err != nil {
			cfg.errs = append(cfg.errs, err)
		}
		cfg.version = v
	}
	seen := map[string]bool{}
	for _, u := range cfg.upgrades {
		switch {
		case u.to != want:
			cfg.fail("WithUpgradeFrom(%q, func(%v) (%v, error)) on a Cache[%v]: the upgrade must return the cache's value type", u.version, u.from, u.to, want)
		case u.version == cfg.version:
			cfg.fail("WithUpgradeFrom(%q): that is the cache's own version", u.version)
		case seen[u.version]:
			cfg.fail("WithUpgradeFrom(%q) given twice", u.version)
		}
		seen[u.version] = true
	}
	if len(cfg.upgrades) > 0 {
		if cfg.layout != nil && cfg.layout.kind == kindRaw ||
			cfg.migration != nil && (cfg.migration.from.kind == kindRaw || cfg.migration.to.kind == kindRaw) {
			cfg.fail("WithUpgradeFrom with a Raw layout: Raw keys carry no version to upgrade from; use WithValidator")
		}
	}
	return vals, cfg.upgrades
}
