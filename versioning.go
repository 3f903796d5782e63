package layercache

import (
	"context"
	"crypto/sha256"
	"encoding"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/layercache/layercache/internal/envelope"
	"github.com/redis/go-redis/v9"
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

// withWriteVersion returns a copy of env whose write version is v.
func withWriteVersion(env []byte, v uint64) []byte {
	out := append([]byte(nil), env...)
	binary.BigEndian.PutUint64(out[32:40], v)
	return out
}

// usable reports whether b is an envelope that has not reached its
// physical end (ExpiresAt) at now. Fresh-or-stale is the read path's call.
func usable(b []byte, now int64) bool {
	if b == nil {
		return false
	}
	h, _, err := envelope.Decode(b)
	return err == nil && now < h.ExpiresAt
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

// oldVersion is an older version's store and how to convert its values.
type oldVersion struct {
	version string
	st      store
	convert func(payload []byte) ([]byte, error)
}

// fencedCopier is a store that can arm a key's copy fence and write a copy
// only while the fence holds (layout stores and the dual store).
type fencedCopier interface {
	arm(ctx context.Context, key, token string) error
	copyFenced(ctx context.Context, key, token string, env []byte, ttl time.Duration) (uint64, bool, error)
}

// storeVersion returns the highest write version st holds for key: of a
// layout store, or of either side of a dual store; 0 for other stores.
func storeVersion(ctx context.Context, st store, key string) (uint64, error) {
	switch s := st.(type) {
	case layoutStore:
		return s.version(ctx, key)
	case *dualStore:
		a, err := s.sides[sideOld].version(ctx, key)
		if err != nil {
			return 0, err
		}
		b, err := s.sides[sideNew].version(ctx, key)
		return max(a, b), err
	}
	return 0, nil
}

// upgradingStore is the current version's store, plus upgrade on read: a
// key absent (or past its physical end) at the current version is looked
// up at older versions. Writes and deletes also delete the key at the
// older versions: otherwise, once the current entry expired or was
// deleted, a read would upgrade the older value and bring back data older
// than the write or delete. Embedding the store passes every other method
// (leases) through to the current version unchanged.
type upgradingStore struct {
	store
	olds  []oldVersion
	now   func() int64
	stats *counters
	log   *slog.Logger
	logs  *throttledLog
	// validate, if set, runs the cache's validators on an upgraded
	// payload; false means it failed (and was counted) and must be
	// neither written nor served.
	validate func(ctx context.Context, key string, payload []byte) bool
}

func (u *upgradingStore) get(ctx context.Context, key string) ([]byte, error) {
	b, err := u.store.get(ctx, key)
	now := u.now()
	if err != nil || usable(b, now) {
		return b, err
	}
	// Arm the current version's copy fence before reading an older
	// version: a Delete after that read deletes the fence with the
	// current entry (and the older ones), and the upgrade's copy, fenced,
	// is dropped instead of bringing the deleted value back at the
	// current version. Without a fence (arming failed) nothing is
	// copied; the upgraded value is still served.
	fc, _ := u.store.(fencedCopier)
	fence := newLeaseToken()
	if fc != nil {
		if err := fc.arm(ctx, key, fence); err != nil {
			if ctx.Err() == nil {
				u.stats.redisErrors.Add(1)
			}
			fc = nil
		}
	}
	for _, o := range u.olds {
		ob, err := o.st.get(ctx, key)
		if err != nil || ob == nil {
			continue
		}
		h, payload, err := envelope.Decode(ob)
		if err != nil || h.ExpiresAt <= now {
			continue
		}
		if !h.Negative() {
			if payload, err = o.convert(payload); err != nil {
				u.stats.upgradeErrors.Add(1)
				u.logs.log(ctx, u.log, slog.LevelWarn, "layercache: cannot upgrade a value from an older version; treating it as a miss",
					slog.String("key", key), slog.String("from", o.version), slog.Any("err", err))
				continue
			}
		}
		// Validate before writing: a value that fails is a miss, and
		// must not be persisted at the current version either.
		if !h.Negative() && u.validate != nil && !u.validate(ctx, key, payload) {
			continue
		}
		// Same header: the same absolute expiry, and the old write
		// version, so that a write made at the current version meanwhile
		// (proposed past the older versions', see set) is newer and wins
		// over this copy.
		env := envelope.Encode(h, payload)
		ttl := time.Duration(h.ExpiresAt-now) * time.Millisecond
		if fc != nil {
			if _, _, werr := fc.copyFenced(ctx, key, fence, env, ttl); werr != nil && ctx.Err() == nil {
				u.stats.redisErrors.Add(1)
			}
		}
		u.stats.upgrades.Add(1)
		return env, nil
	}
	return b, nil
}

// set proposes env's version past what the older versions hold for key
// (one round trip per older version), then writes and drops the older
// copies. Without the raise, a writer whose clock is behind would write a
// version below an older version's value, and an upgrade that read that
// value just before the write would copy it over the write, set-if-newer.
func (u *upgradingStore) set(ctx context.Context, key string, env []byte, ttl time.Duration) error {
	env, err := u.proposePastOlds(ctx, key, env)
	if err != nil {
		return err
	}
	if err := u.store.set(ctx, key, env, ttl); err != nil {
		return err
	}
	return u.dropOld(ctx, []string{key})
}

// setBreakingLease is set when leases are in use.
func (u *upgradingStore) setBreakingLease(ctx context.Context, key string, env []byte, ttl time.Duration) error {
	env, err := u.proposePastOlds(ctx, key, env)
	if err != nil {
		return err
	}
	if err := u.store.setBreakingLease(ctx, key, env, ttl); err != nil {
		return err
	}
	return u.dropOld(ctx, []string{key})
}

// proposePastOlds raises env's proposed version past every older
// version's copy of key.
func (u *upgradingStore) proposePastOlds(ctx context.Context, key string, env []byte) ([]byte, error) {
	for _, o := range u.olds {
		v, err := storeVersion(ctx, o.st, key)
		if err != nil {
			return nil, fmt.Errorf("read version at older version %s: %w", o.version, err)
		}
		env = proposePast(env, v)
	}
	return env, nil
}

func (u *upgradingStore) del(ctx context.Context, keys []string) error {
	err := u.store.del(ctx, keys)
	return errors.Join(err, u.dropOld(ctx, keys))
}

// dropOld deletes keys at every older version, after the current version
// was written: a reader in between finds the current entry.
func (u *upgradingStore) dropOld(ctx context.Context, keys []string) error {
	var errs []error
	for _, o := range u.olds {
		if err := o.st.del(ctx, keys); err != nil {
			errs = append(errs, fmt.Errorf("delete at older version %s: %w", o.version, err))
		}
	}
	return errors.Join(errs...)
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
			c.stats.validationFailures.Add(1)
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

// ---- purge ----

// PurgeOptions tune [Cache.PurgeVersion]. The zero value is valid.
type PurgeOptions struct {
	// BatchSize is the SCAN COUNT hint and the size of each delete
	// pipeline; 0 means 500.
	BatchSize int
	// RateLimit caps deletions per second across all nodes; 0 means no
	// limit. Use it to keep a purge from competing with live traffic.
	RateLimit int
	// DryRun counts the keys a purge would delete, and deletes none.
	DryRun bool
	// Progress, if set, is called after each batch with the totals so far.
	Progress func(PurgeReport)
}

// PurgeReport is what [Cache.PurgeVersion] did.
type PurgeReport struct {
	// Version is the version purged.
	Version string
	// Nodes is how many masters were scanned.
	Nodes int
	// Matched counts keys found under namespace:version: (values, leases,
	// Hash layout shards and their bookkeeping).
	Matched int64
	// Deleted counts keys deleted (0 in a dry run).
	Deleted int64
	// Duration is how long the purge took.
	Duration time.Duration
}

// PurgeVersion deletes every key of this cache's namespace at another
// schema version: once no instance reads or upgrades from that version any
// more, its keys only take memory until they expire. It SCANs (never KEYS)
// every master of a Cluster (every shard of a Ring), matching
// namespace:version:*, and UNLINKs what it finds in pipelined batches,
// rate-limited by opts.RateLimit. It refuses the cache's own version. A
// cancelled ctx stops it between batches; the report says how far it got,
// and running it again continues the work (what is deleted stays deleted).
// [Raw] keys have no version and are never purged.
func (c *Cache[T]) PurgeVersion(ctx context.Context, version string, opts PurgeOptions) (rep PurgeReport, err error) {
	rep.Version = version
	start := time.Now()
	defer func() { rep.Duration = time.Since(start) }()
	if err := checkName("PurgeVersion", version); err != nil {
		return rep, err
	}
	if version == c.keys.version {
		return rep, fmt.Errorf("%w: PurgeVersion(%q) is the cache's own version", ErrInvalidOption, version)
	}
	if opts.BatchSize < 0 || opts.RateLimit < 0 {
		return rep, fmt.Errorf("%w: PurgeOptions: BatchSize and RateLimit must not be negative", ErrInvalidOption)
	}
	batch := opts.BatchSize
	if batch == 0 {
		batch = 500
	}
	nodes, err := masterNodes(ctx, c.client)
	if err != nil {
		return rep, err
	}
	rep.Nodes = len(nodes)
	match := globEscape(c.keys.namespace+":"+version+":") + "*"
	pace := newPacer(opts.RateLimit)
	for _, node := range nodes {
		var cursor uint64
		for {
			keys, next, err := node.Scan(ctx, cursor, match, int64(batch)).Result()
			if err != nil {
				return rep, fmt.Errorf("layercache: purge: scan %s: %w", node.Options().Addr, err)
			}
			for len(keys) > 0 {
				n := min(batch, len(keys))
				chunk := keys[:n]
				keys = keys[n:]
				rep.Matched += int64(n)
				if !opts.DryRun {
					if err := pace.wait(ctx, n); err != nil {
						return rep, err
					}
					// One UNLINK per key: keys of one node may still be in
					// different slots, which a multi-key command refuses.
					cmds, err := node.Pipelined(ctx, func(p redis.Pipeliner) error {
						for _, k := range chunk {
							p.Unlink(ctx, k)
						}
						return nil
					})
					for _, cmd := range cmds {
						if ic, ok := cmd.(*redis.IntCmd); ok {
							rep.Deleted += ic.Val()
						}
					}
					if err != nil {
						return rep, fmt.Errorf("layercache: purge: unlink on %s: %w", node.Options().Addr, err)
					}
				}
				if opts.Progress != nil {
					opts.Progress(rep)
				}
			}
			if next == 0 {
				break
			}
			cursor = next
		}
	}
	return rep, ctx.Err()
}

// pacer spaces work out to at most rate units a second.
type pacer struct {
	rate  int
	start time.Time
	done  int64
}

func newPacer(rate int) *pacer { return &pacer{rate: rate, start: time.Now()} }

// wait accounts for n more units and sleeps until they are due.
func (p *pacer) wait(ctx context.Context, n int) error {
	if p.rate <= 0 {
		return ctx.Err()
	}
	due := p.start.Add(time.Duration(float64(p.done) / float64(p.rate) * float64(time.Second)))
	p.done += int64(n)
	d := time.Until(due)
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
