package layercache

import (
	"context"
	"crypto/sha1"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/fnv"
	"log/slog"
	"math/rand/v2"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/layercache/layercache/internal/envelope"
	"github.com/layercache/layercache/internal/scripts"
	"github.com/redis/go-redis/v9"
)

// Layout is where a cache keeps its entries in Redis: [KeyPerEntry] (the
// default), [Hash] or [Raw]. Give one to [WithLayout], or two to
// [WithMigration] to move a cache from one to the other. A Layout is a
// value; an invalid one (Hash(0), a Raw pattern without %s) makes [New]
// fail with [ErrInvalidOption].
type Layout struct {
	kind    layoutKind
	shards  int    // Hash
	pattern string // Raw, as given
	prefix  string // Raw: the pattern's text before %s, with %% unescaped
	suffix  string // Raw: the text after %s
	err     error
}

type layoutKind uint8

const (
	kindKeyPerEntry layoutKind = iota
	kindHash
	kindRaw
)

// MaxHashShards is the largest shard count [Hash] accepts.
const MaxHashShards = 1024

// KeyPerEntry keeps each entry in its own string key,
// namespace:version:{key}, holding the envelope. It is the default layout.
func KeyPerEntry() Layout { return Layout{kind: kindKeyPerEntry} }

// Hash keeps entries as fields of shards hashes (1 to [MaxHashShards]),
// namespace:version:h<shards>:{<tag>}, the field being the user key and
// its value the envelope. The tags are chosen so that the hashes spread
// evenly over the slots of a Redis Cluster: a catalog never becomes one
// hot key on one node.
//
// Redis 7.0 has no per-field expiry, so the logical expiry travels inside
// each field's envelope: an expired field is a miss, and a background
// sweep (stopped by [Cache.Close]) deletes expired fields; each hash key
// itself expires when its longest-lived field does. A key's lease lives
// at <hash key>:lease:<key>, in its hash's slot.
func Hash(shards int) Layout {
	if shards < 1 || shards > MaxHashShards {
		return Layout{kind: kindHash, shards: shards,
			err: fmt.Errorf("%w: Hash(%d): shards must be in [1, %d]", ErrInvalidOption, shards, MaxHashShards)}
	}
	return Layout{kind: kindHash, shards: shards}
}

// Raw keeps plain payloads, with no envelope, at the key made by replacing
// the %s in pattern with the user key ("product:%s" keeps key "42" at
// "product:42"); %% stands for a literal %. The payload is exactly what
// the cache's codec produces, so values written by other code, e.g.
// rdb.Set(ctx, "product:42", jsonBytes, time.Hour), are read as they are,
// and what the cache writes is read back by that code. The entry's expiry
// is the key's Redis TTL (a key with no TTL is fresh for the cache's TTL
// from each read); a Raw key has no stale grace.
//
// Having no envelope, a Raw key carries no write version. The cache keeps
// one beside it, in a companion key in the same Cluster slot, tied to the
// payload it describes by a SHA-1 of it, so that writes stay set-if-newer
// and a value that other code overwrote is recognised as unversioned. A
// cached "not found" is a companion tombstone with the raw key absent:
// other code sees a plain miss. Companion and lease keys end in
// "\xfflc:wv" and "\xfflc:lease"; for untagged keys they are the raw key
// wrapped in a hash tag, "{product:42}\xfflc:wv". A user key whose raw key
// has a '}' outside a valid hash tag cannot share a slot with such keys
// and is refused with [ErrInvalidKey].
//
// Raw keys have no namespace or version: a Raw cache cannot use
// [WithUpgradeFrom], and [Cache.PurgeVersion] does not touch them.
func Raw(pattern string) Layout {
	l := Layout{kind: kindRaw, pattern: pattern}
	l.prefix, l.suffix, l.err = parseRawPattern(pattern)
	return l
}

func parseRawPattern(p string) (prefix, suffix string, err error) {
	bad := func(why string) (string, string, error) {
		return "", "", fmt.Errorf("%w: Raw(%q): %s", ErrInvalidOption, p, why)
	}
	if len(p) > 512 {
		return bad("the pattern is longer than 512 bytes")
	}
	var parts [2]strings.Builder
	n := 0
	for i := 0; i < len(p); i++ {
		if p[i] != '%' {
			parts[n].WriteByte(p[i])
			continue
		}
		if i+1 == len(p) {
			return bad("a lone % at the end; write %% for a literal %")
		}
		i++
		switch p[i] {
		case '%':
			parts[n].WriteByte('%')
		case 's':
			if n == 1 {
				return bad("more than one %s")
			}
			n = 1
		default:
			return bad(fmt.Sprintf("%%%c is not supported; the pattern takes one %%s and %%%% only", p[i]))
		}
	}
	if n == 0 {
		return bad("no %s for the key")
	}
	prefix, suffix = parts[0].String(), parts[1].String()
	if prefix == "" && suffix == "" {
		return bad("the pattern is only %s; give it a prefix or suffix so its keys can be told apart from others")
	}
	return prefix, suffix, nil
}

// String describes the layout: "key-per-entry", "hash(8)", "raw(product:%s)".
func (l Layout) String() string {
	switch l.kind {
	case kindHash:
		return "hash(" + strconv.Itoa(l.shards) + ")"
	case kindRaw:
		return "raw(" + l.pattern + ")"
	}
	return "key-per-entry"
}

func (l Layout) equal(o Layout) bool {
	return l.kind == o.kind && l.shards == o.shards && l.prefix == o.prefix && l.suffix == o.suffix
}

// WithLayout sets where the cache keeps its entries (see [Layout]); the
// default is [KeyPerEntry]. A cache that is moving between two layouts uses
// [WithMigration] instead.
func WithLayout(l Layout) Option {
	return func(c *config) {
		if l.err != nil {
			c.errs = append(c.errs, fmt.Errorf("WithLayout: %w", l.err))
			return
		}
		lc := l
		c.layout = &lc
	}
}

// writeMode says how a layout store applies a write.
type writeMode uint8

const (
	// writeFresh is a new value (Set, a fill): it replaces what is there,
	// and the stored write version is the proposal or, if the entry
	// already holds a version at or past it, that version's counter plus
	// one (see bumpVersion). Writes to one entry thus get increasing
	// versions in the order Redis applies them, whatever the writers'
	// clocks say.
	writeFresh writeMode = iota
	// writeCopy is set-if-newer: a copy of a value that already has its
	// version (the second side of a dual write, a backfill, an upgrade).
	// It is applied only if the entry holds no version at or past it, so
	// a retried or reordered copy never makes an entry older.
	writeCopy
)

// record is one entry as read by a batch read: the envelope the read path
// would see (synthesised for Raw) and the bytes actually stored, which a
// compare-and-set repair must find unchanged.
type record struct {
	env    []byte // nil when absent
	native []byte // nil when absent
	found  bool   // native is present (even if env could not be made)
}

// casOp is one compare-and-set of a repair: if the entry still holds
// expect, replace it by env (or delete it when env is nil).
type casOp struct {
	key    string
	expect record
	env    []byte
	ttl    time.Duration
}

// layoutStore is a store made by a Layout. Beyond the read path's store,
// it offers what dual writes, reconciliation and the sweep need.
//
// Every layoutStore keeps a key's lease and notice channel in its value's
// slot (see layout_lease.go), so a script may check the lease and write
// the value together.
type layoutStore interface {
	store
	layout() Layout
	// write applies env for key in the given mode and returns the write
	// version stored, or written=false when a copy was not newer.
	write(ctx context.Context, key string, env []byte, ttl time.Duration, mode writeMode) (version uint64, written bool, err error)
	// readMany reads keys in one round trip per node.
	readMany(ctx context.Context, keys []string) ([]record, error)
	// exists reports, in one round trip per node, which keys have a
	// stored value (found, in readMany's terms).
	exists(ctx context.Context, keys []string) ([]bool, error)
	// casMany applies compare-and-set repairs, reporting which applied.
	casMany(ctx context.Context, ops []casOp) ([]bool, error)
	// version returns the write version key holds (0 if none). It may
	// overstate it (a stale Raw stamp), never understate it.
	version(ctx context.Context, key string) (uint64, error)
	// take deletes key's value and returns the write version it held:
	// the invalidation of the side a single-side phase does not write.
	take(ctx context.Context, key string) (uint64, error)

	// fillVersioned is fillLeased, also returning the version stored.
	fillVersioned(ctx context.Context, key, token string, env []byte, ttl time.Duration) (uint64, bool, error)
	// overwrite is setBreakingLease, returning the version stored.
	overwrite(ctx context.Context, key string, env []byte, ttl time.Duration) (uint64, error)
	// breakLease drops key's lease, whoever holds it, with a notice.
	breakLease(ctx context.Context, key string) error

	// Copy fences (scripts.Arm, layout_lease.go): a copy into this store
	// of a value read elsewhere is written only if the fence armed before
	// that read still holds its token, so a Delete in between voids it.

	// arm adds token to key's copy fence.
	arm(ctx context.Context, key, token string) error
	// armVersion arms key's copy fence, then reads key's version (as
	// version does), in one round trip.
	armVersion(ctx context.Context, key, token string) (uint64, error)
	// copyFenced is write in writeCopy mode, applied only if token is
	// still in key's copy fence (and taking it out).
	copyFenced(ctx context.Context, key, token string, env []byte, ttl time.Duration) (uint64, bool, error)
}

// headerVersion returns the write version of an envelope header (at
// least its first 40 bytes), or 0 for anything else.
func headerVersion(b []byte) uint64 {
	if len(b) < envelope.HeaderSize || b[0] != envelope.Magic || b[1] != envelope.Version {
		return 0
	}
	return binary.BigEndian.Uint64(b[32:40])
}

// versionReply reads a script or command reply holding a header (or a
// Raw stamp, whose first 8 bytes are the version).
func versionReply(b []byte, err error, stamp bool) (uint64, error) {
	if errors.Is(err, redis.Nil) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	if stamp {
		if len(b) < 9 {
			return 0, nil
		}
		return binary.BigEndian.Uint64(b[:8]), nil
	}
	return headerVersion(b), nil
}

// ---- script results ----

// scriptResult turns a write script's reply into (version, written).
func scriptResult(cmd *redis.Cmd) (uint64, bool, error) {
	s, err := cmd.Text()
	if errors.Is(err, redis.Nil) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, err
	}
	if len(s) != 8 {
		return 0, false, fmt.Errorf("layercache: write script returned %d bytes, want an 8-byte version", len(s))
	}
	return binary.BigEndian.Uint64([]byte(s)), true, nil
}

// evalMany runs script once per call in one pipeline. EVALSHA is tried
// first; calls that fail with NOSCRIPT (a server restarted or flushed its
// script cache) are retried one by one with EVALSHA-then-EVAL.
func evalMany(ctx context.Context, client redis.UniversalClient, script *redis.Script, calls []scriptCall) ([]*redis.Cmd, error) {
	cmds := make([]*redis.Cmd, len(calls))
	_, err := client.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, c := range calls {
			cmds[i] = script.EvalSha(ctx, p, c.keys, c.args...)
		}
		return nil
	})
	if err == nil {
		return cmds, nil
	}
	var firstErr error
	for i, c := range calls {
		e := cmds[i].Err()
		if e == nil || errors.Is(e, redis.Nil) {
			continue
		}
		if redis.HasErrorPrefix(e, "NOSCRIPT") {
			cmds[i] = script.Run(ctx, client, c.keys, c.args...)
			e = cmds[i].Err()
			if e == nil || errors.Is(e, redis.Nil) {
				continue
			}
		}
		if firstErr == nil {
			firstErr = e
		}
	}
	return cmds, firstErr
}

type scriptCall struct {
	keys []string
	args []any
}

func ttlMillis(ttl time.Duration) int64 { return physicalTTL(ttl).Milliseconds() }

// ---- key per entry ----
// keyPerEntryStore itself (get, set, del) is in store.go.

func (s *keyPerEntryStore) layout() Layout { return KeyPerEntry() }

func (s *keyPerEntryStore) write(ctx context.Context, key string, env []byte, ttl time.Duration, mode writeMode) (uint64, bool, error) {
	return scriptResult(scripts.KVWrite.Run(ctx, s.client, []string{s.keys.entry(key)}, env, ttlMillis(ttl), modeArg(mode)))
}

func (s *keyPerEntryStore) copyFenced(ctx context.Context, key, token string, env []byte, ttl time.Duration) (uint64, bool, error) {
	return scriptResult(scripts.KVWrite.Run(ctx, s.client, []string{s.keys.entry(key), s.keys.fence(key)},
		env, ttlMillis(ttl), modeArg(writeCopy), token))
}

func (s *keyPerEntryStore) arm(ctx context.Context, key, token string) error {
	return armFence(ctx, s.client, s.keys.fence(key), token)
}

func (s *keyPerEntryStore) armVersion(ctx context.Context, key, token string) (uint64, error) {
	return armThenRead(ctx, s.client, s.keys.fence(key), token, false, func(p redis.Pipeliner) *redis.StringCmd {
		return p.GetRange(ctx, s.keys.entry(key), 0, envelope.HeaderSize-1)
	})
}

func (s *keyPerEntryStore) readMany(ctx context.Context, keys []string) ([]record, error) {
	cmds := make([]*redis.StringCmd, len(keys))
	_, err := s.client.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, k := range keys {
			cmds[i] = p.Get(ctx, s.keys.entry(k))
		}
		return nil
	})
	if err != nil && !errors.Is(err, redis.Nil) {
		return nil, err
	}
	out := make([]record, len(keys))
	for i, cmd := range cmds {
		b, err := cmd.Bytes()
		if err == nil {
			out[i] = record{env: b, native: b, found: true}
		}
	}
	return out, nil
}

func (s *keyPerEntryStore) exists(ctx context.Context, keys []string) ([]bool, error) {
	return existsMany(ctx, s.client, keys, func(p redis.Pipeliner, k string) *redis.IntCmd { return p.Exists(ctx, s.keys.entry(k)) })
}

// existsMany runs one existence command per key in a pipeline.
func existsMany(ctx context.Context, client redis.UniversalClient, keys []string, cmd func(redis.Pipeliner, string) *redis.IntCmd) ([]bool, error) {
	cmds := make([]*redis.IntCmd, len(keys))
	_, err := client.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, k := range keys {
			cmds[i] = cmd(p, k)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	out := make([]bool, len(keys))
	for i, c := range cmds {
		out[i] = c.Val() == 1
	}
	return out, nil
}

func (s *keyPerEntryStore) casMany(ctx context.Context, ops []casOp) ([]bool, error) {
	calls := make([]scriptCall, len(ops))
	for i, op := range ops {
		calls[i] = scriptCall{keys: []string{s.keys.entry(op.key)},
			args: []any{boolArg(op.expect.found), op.expect.native, op.env, ttlMillis(op.ttl)}}
	}
	return casResults(evalMany(ctx, s.client, scripts.KVCAS, calls))
}

func (s *keyPerEntryStore) version(ctx context.Context, key string) (uint64, error) {
	b, err := s.client.GetRange(ctx, s.keys.entry(key), 0, envelope.HeaderSize-1).Bytes()
	return versionReply(b, err, false)
}

func (s *keyPerEntryStore) take(ctx context.Context, key string) (uint64, error) {
	b, err := scripts.KVTake.Run(ctx, s.client, []string{s.keys.entry(key), s.keys.fence(key)}).Text()
	return versionReply([]byte(b), err, false)
}

func casResults(cmds []*redis.Cmd, err error) ([]bool, error) {
	out := make([]bool, len(cmds))
	for i, c := range cmds {
		n, e := c.Int()
		out[i] = e == nil && n == 1
	}
	return out, err
}

func modeArg(m writeMode) string {
	if m == writeCopy {
		return "c"
	}
	return "f"
}

func boolArg(b bool) string {
	if b {
		return "1"
	}
	return "0"
}

// ---- hash ----

// hashStore keeps entries as fields of shard hashes; see [Hash].
type hashStore struct {
	client redis.UniversalClient
	keys   keyspace
	l      Layout
	now    func() int64 // the cache's clock, Unix ms
	shards []string     // hash keys, by shard index
}

func newHashStore(client redis.UniversalClient, keys keyspace, l Layout, now func() int64) *hashStore {
	s := &hashStore{client: client, keys: keys, l: l, now: now, shards: make([]string, l.shards)}
	base := keys.namespace + ":" + keys.version + ":h" + strconv.Itoa(l.shards) + ":{"
	for i, tag := range shardTags(l.shards) {
		s.shards[i] = base + tag + "}"
	}
	return s
}

// shardTags returns, for n shards, one hash tag per shard such that shard
// i's tag hashes into the i-th n-th of the 16384 Cluster slots. Clusters
// assign slots to masters in contiguous ranges, so shards spread over the
// masters as evenly as they can. The tags are a pure function of n.
//
// Finding the tags costs about 85ms of CPU for Hash(1024), and every New
// builds a store per side and per upgraded version, so they are computed
// once per shard count and shared; callers must not modify the slice.
func shardTags(n int) []string {
	if t, ok := shardTagCache.Load(n); ok {
		return t.([]string)
	}
	t, _ := shardTagCache.LoadOrStore(n, computeShardTags(n))
	return t.([]string)
}

// shardTagCache maps a shard count to its tags (see shardTags). It only
// memoises a pure function, so sharing it between caches is invisible.
var shardTagCache sync.Map

func computeShardTags(n int) []string {
	tags := make([]string, n)
	for i := range tags {
		lo, hi := i*16384/n, (i+1)*16384/n
		for j := 0; ; j++ {
			tag := strconv.Itoa(i) + "." + strconv.Itoa(j)
			if s := int(crc16(tag) % 16384); s >= lo && s < hi {
				tags[i] = tag
				break
			}
		}
	}
	return tags
}

func (s *hashStore) layout() Layout { return s.l }

func (s *hashStore) shardOf(key string) string {
	h := fnv.New64a()
	_, _ = h.Write([]byte(key))
	return s.shards[h.Sum64()%uint64(len(s.shards))]
}

func (s *hashStore) get(ctx context.Context, key string) ([]byte, error) {
	b, err := s.client.HGet(ctx, s.shardOf(key), key).Bytes()
	if errors.Is(err, redis.Nil) {
		return nil, nil
	}
	return b, err
}

func (s *hashStore) set(ctx context.Context, key string, env []byte, ttl time.Duration) error {
	_, _, err := s.write(ctx, key, env, ttl, writeFresh)
	return err
}

func (s *hashStore) write(ctx context.Context, key string, env []byte, ttl time.Duration, mode writeMode) (uint64, bool, error) {
	return scriptResult(scripts.HashWrite.Run(ctx, s.client, []string{s.shardOf(key)}, key, env, ttlMillis(ttl), modeArg(mode), s.now()))
}

func (s *hashStore) copyFenced(ctx context.Context, key, token string, env []byte, ttl time.Duration) (uint64, bool, error) {
	return scriptResult(scripts.HashWrite.Run(ctx, s.client, []string{s.shardOf(key), s.fence(key)},
		key, env, ttlMillis(ttl), modeArg(writeCopy), s.now(), token))
}

// fence returns key's copy fence, beside its lease in its shard's slot.
func (s *hashStore) fence(key string) string { return s.shardOf(key) + ":copy:" + key }

func (s *hashStore) arm(ctx context.Context, key, token string) error {
	return armFence(ctx, s.client, s.fence(key), token)
}

func (s *hashStore) armVersion(ctx context.Context, key, token string) (uint64, error) {
	return armThenRead(ctx, s.client, s.fence(key), token, false, func(p redis.Pipeliner) *redis.StringCmd {
		return p.HGet(ctx, s.shardOf(key), key)
	})
}

func (s *hashStore) del(ctx context.Context, keys []string) error {
	// Field, lease and copy fence share the shard's slot.
	return dropKeys(ctx, s.client, keys, func(p redis.Pipeliner, k string) ([]string, string) {
		p.HDel(ctx, s.shardOf(k), k)
		p.Del(ctx, s.fence(k))
		return s.leaseKeys(k), s.noticeChannel(k)
	})
}

func (s *hashStore) readMany(ctx context.Context, keys []string) ([]record, error) {
	cmds := make([]*redis.StringCmd, len(keys))
	_, err := s.client.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, k := range keys {
			cmds[i] = p.HGet(ctx, s.shardOf(k), k)
		}
		return nil
	})
	if err != nil && !errors.Is(err, redis.Nil) {
		return nil, err
	}
	out := make([]record, len(keys))
	for i, cmd := range cmds {
		if b, err := cmd.Bytes(); err == nil {
			out[i] = record{env: b, native: b, found: true}
		}
	}
	return out, nil
}

func (s *hashStore) exists(ctx context.Context, keys []string) ([]bool, error) {
	cmds := make([]*redis.BoolCmd, len(keys))
	_, err := s.client.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, k := range keys {
			cmds[i] = p.HExists(ctx, s.shardOf(k), k)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	out := make([]bool, len(keys))
	for i, c := range cmds {
		out[i] = c.Val()
	}
	return out, nil
}

func (s *hashStore) casMany(ctx context.Context, ops []casOp) ([]bool, error) {
	calls := make([]scriptCall, len(ops))
	for i, op := range ops {
		calls[i] = scriptCall{keys: []string{s.shardOf(op.key)},
			args: []any{op.key, boolArg(op.expect.found), op.expect.native, op.env, ttlMillis(op.ttl)}}
	}
	return casResults(evalMany(ctx, s.client, scripts.HashCAS, calls))
}

func (s *hashStore) version(ctx context.Context, key string) (uint64, error) {
	b, err := s.client.HGet(ctx, s.shardOf(key), key).Bytes()
	return versionReply(b, err, false)
}

func (s *hashStore) take(ctx context.Context, key string) (uint64, error) {
	b, err := scripts.HashTake.Run(ctx, s.client, []string{s.shardOf(key), s.fence(key)}, key).Text()
	return versionReply([]byte(b), err, false)
}

// sweepBatch is how many fields one HSCAN step looks at.
const sweepBatch = 256

// sweep deletes the expired fields of every shard whose claim this
// instance wins, and returns how many it deleted.
func (s *hashStore) sweep(ctx context.Context, now int64, every time.Duration) (int, error) {
	total := 0
	for _, shard := range s.shards {
		won, err := scripts.SweepClaim.Run(ctx, s.client, []string{shard + ":sweep"}, now, every.Milliseconds()).Int()
		if err != nil {
			return total, err
		}
		if won != 1 {
			continue
		}
		var cursor uint64
		for {
			kv, next, err := s.client.HScan(ctx, shard, cursor, "", sweepBatch).Result()
			if err != nil {
				return total, err
			}
			args := []any{now}
			for i := 0; i+1 < len(kv); i += 2 {
				h, _, err := envelope.Decode([]byte(kv[i+1]))
				if err != nil || h.ExpiresAt <= now {
					args = append(args, kv[i])
				}
			}
			if len(args) > 1 {
				n, err := scripts.HashSweep.Run(ctx, s.client, []string{shard}, args...).Int()
				if err != nil {
					return total, err
				}
				total += n
			}
			if next == 0 {
				break
			}
			cursor = next
		}
	}
	return total, nil
}

// ---- raw ----

const (
	rawStampSuffix  = "\xfflc:wv"
	rawLeaseSuffix  = "\xfflc:lease"
	rawNoticeSuffix = "\xfflc:notice"
	rawFenceSuffix  = "\xfflc:copy"
)

// isCompanion reports whether a raw key ends like a companion key.
func isCompanion(rk string) bool {
	for _, suf := range [...]string{rawStampSuffix, rawLeaseSuffix, rawNoticeSuffix, rawFenceSuffix} {
		if strings.HasSuffix(rk, suf) {
			return true
		}
	}
	return false
}

// rawStore keeps plain payloads at pattern keys; see [Raw]. It converts at
// its edge: get returns an envelope synthesised from the payload, the
// key's TTL and its version stamp; writes take an envelope and store its
// payload.
type rawStore struct {
	client redis.UniversalClient
	l      Layout
	now    func() int64 // the cache's clock, Unix ms
	ttl    time.Duration
}

func (s *rawStore) layout() Layout { return s.l }

func (s *rawStore) rawKey(key string) string { return s.l.prefix + key + s.l.suffix }

// userKey recovers the user key from a raw key, or false for keys that do
// not match the pattern or are companions (stamps, leases).
func (s *rawStore) userKey(rk string) (string, bool) {
	if len(rk) < len(s.l.prefix)+len(s.l.suffix) || !strings.HasPrefix(rk, s.l.prefix) || !strings.HasSuffix(rk, s.l.suffix) {
		return "", false
	}
	if isCompanion(rk) {
		return "", false
	}
	k := rk[len(s.l.prefix) : len(rk)-len(s.l.suffix)]
	return k, k != ""
}

// companion returns a key in rawKey's Cluster slot: rawKey+suffix when
// rawKey has a hash tag (appending keeps it), {rawKey}+suffix when it has
// none (the whole key becomes the tag, which hashes as the untagged key
// did). A '}' outside a valid tag makes that impossible.
func companion(rawKey, suffix string) (string, error) {
	if i := strings.IndexByte(rawKey, '{'); i >= 0 {
		if j := strings.IndexByte(rawKey[i+1:], '}'); j > 0 {
			return rawKey + suffix, nil
		}
	}
	if strings.IndexByte(rawKey, '}') >= 0 {
		return "", fmt.Errorf("%w: raw key %q has a '}' outside a hash tag, so its version stamp and lease cannot share its Cluster slot", ErrInvalidKey, rawKey)
	}
	return "{" + rawKey + "}" + suffix, nil
}

func (s *rawStore) keysOf(key string) (raw, stamp string, err error) {
	raw = s.rawKey(key)
	if isCompanion(raw) {
		// Key "{42}\xfflc:wv" with Raw("product:%s") would be
		// product:{42}\xfflc:wv, the stamp of key "{42}": reading or
		// writing it would corrupt another key's bookkeeping.
		return "", "", fmt.Errorf("%w: raw key %q ends like a companion key (version stamp, lease, notice or copy fence) of another key", ErrInvalidKey, raw)
	}
	stamp, err = companion(raw, rawStampSuffix)
	return raw, stamp, err
}

// version trusts the stamp without checking it against the payload: a
// stale stamp overstates the version, which only makes the next write's
// version higher.
func (s *rawStore) version(ctx context.Context, key string) (uint64, error) {
	_, stamp, err := s.keysOf(key)
	if err != nil {
		return 0, err
	}
	b, err := s.client.Get(ctx, stamp).Bytes()
	return versionReply(b, err, true)
}

func (s *rawStore) take(ctx context.Context, key string) (uint64, error) {
	raw, stamp, err := s.keysOf(key)
	if err != nil {
		return 0, err
	}
	fence, _ := companion(raw, rawFenceSuffix)
	b, err := scripts.RawTake.Run(ctx, s.client, []string{raw, stamp, fence}).Text()
	return versionReply([]byte(b), err, true)
}

// rawReads are the commands of one raw read: value, TTL, stamp, stamp TTL.
type rawReads struct {
	val, stamp       *redis.StringCmd
	valTTL, stampTTL *redis.DurationCmd
	err              error
}

func (s *rawStore) queueRead(ctx context.Context, p redis.Pipeliner, key string) rawReads {
	raw, stamp, err := s.keysOf(key)
	if err != nil {
		return rawReads{err: err}
	}
	return rawReads{val: p.Get(ctx, raw), valTTL: p.PTTL(ctx, raw), stamp: p.Get(ctx, stamp), stampTTL: p.PTTL(ctx, stamp)}
}

// rawParts is what one raw read found: the value and its TTL, the stamp
// and its TTL. A TTL is -2 for an absent key, -1 for a key without one.
type rawParts struct {
	payload, stamp []byte // nil when absent
	pttl, stampTTL time.Duration
}

func (r rawReads) parts() rawParts {
	var p rawParts
	if b, err := r.val.Bytes(); err == nil {
		p.payload = b
	}
	if b, err := r.stamp.Bytes(); err == nil {
		p.stamp = b
	}
	p.pttl, p.stampTTL = r.valTTL.Val(), r.stampTTL.Val()
	return p
}

// decode turns the replies of one raw read into a record. The four
// commands of a pipelined read are not atomic; a write landing between
// them can pair a value with another write's TTL or stamp. The stamp is
// checked against the payload's hash, and a mismatched TTL only shifts an
// expiry by the length of a race, so nothing worse than a slightly early
// or late expiry or an unversioned (older than any) value can come of it.
func (s *rawStore) decode(r rawParts) record {
	now := s.now()
	if r.payload == nil {
		// Absent: a tombstone stamp is a cached "not found".
		if len(r.stamp) != 9 || r.stamp[8] != '-' || r.stampTTL <= 0 {
			return record{}
		}
		exp := now + r.stampTTL.Milliseconds()
		h := envelope.Header{Flags: envelope.FlagNegative, WrittenAt: now, FreshUntil: exp, ExpiresAt: exp,
			WriteVersion: binary.BigEndian.Uint64(r.stamp[:8])}
		return record{env: envelope.Encode(h, nil)}
	}
	var exp int64
	switch {
	case r.pttl > 0:
		exp = now + r.pttl.Milliseconds()
	case r.pttl == -1: // no TTL: written without one by other code
		exp = now + s.ttl.Milliseconds()
	default: // gone since the GET
		return record{native: r.payload, found: true}
	}
	h := envelope.Header{WrittenAt: now, FreshUntil: exp, ExpiresAt: exp}
	if len(r.stamp) == 8+40 {
		sum := sha1.Sum(r.payload)
		var digest [40]byte // on the stack: this runs on every Raw hit
		hex.Encode(digest[:], sum[:])
		if string(digest[:]) == string(r.stamp[8:]) {
			h.WriteVersion = binary.BigEndian.Uint64(r.stamp[:8])
		}
	}
	return record{env: envelope.Encode(h, r.payload), native: r.payload, found: true}
}

func (s *rawStore) get(ctx context.Context, key string) ([]byte, error) {
	p := s.client.Pipeline() // not Pipelined: its closure would escape on every hit
	r := s.queueRead(ctx, p, key)
	if r.err != nil {
		return nil, r.err
	}
	_, err := p.Exec(ctx)
	if err != nil && !errors.Is(err, redis.Nil) {
		return nil, err
	}
	return s.decode(r.parts()).env, nil
}

func (s *rawStore) readMany(ctx context.Context, keys []string) ([]record, error) {
	reads := make([]rawReads, len(keys))
	_, err := s.client.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, k := range keys {
			reads[i] = s.queueRead(ctx, p, k)
		}
		return nil
	})
	if err != nil && !errors.Is(err, redis.Nil) {
		return nil, err
	}
	out := make([]record, len(keys))
	for i, r := range reads {
		if r.err == nil {
			out[i] = s.decode(r.parts())
		}
	}
	return out, nil
}

func (s *rawStore) set(ctx context.Context, key string, env []byte, ttl time.Duration) error {
	_, _, err := s.write(ctx, key, env, ttl, writeFresh)
	return err
}

// rawTTL is the Redis TTL of a raw write: what is left of the entry's
// fresh life at now, since code reading the raw key (and this cache's Raw
// reads) take the key's TTL as freshness and have no notion of a stale
// grace. It is <= 0 for a value already stale: a copy of one (backfill,
// dual copy, repair) is not written, or it would turn stale into fresh.
func rawTTL(h envelope.Header, now int64) time.Duration {
	return time.Duration(h.FreshUntil-now) * time.Millisecond
}

func (s *rawStore) write(ctx context.Context, key string, env []byte, ttl time.Duration, mode writeMode) (uint64, bool, error) {
	return s.writeFenced(ctx, key, env, ttl, mode, "")
}

func (s *rawStore) copyFenced(ctx context.Context, key, token string, env []byte, ttl time.Duration) (uint64, bool, error) {
	return s.writeFenced(ctx, key, env, ttl, writeCopy, token)
}

// writeFenced is write, checking the copy fence for token unless it is "".
func (s *rawStore) writeFenced(ctx context.Context, key string, env []byte, ttl time.Duration, mode writeMode, token string) (uint64, bool, error) {
	h, payload, err := envelope.Decode(env)
	if err != nil {
		return 0, false, fmt.Errorf("layercache: raw write of %q: %w", key, err)
	}
	raw, stamp, err := s.keysOf(key)
	if err != nil {
		return 0, false, err
	}
	var v [8]byte
	binary.BigEndian.PutUint64(v[:], h.WriteVersion)
	rt := rawTTL(h, s.now())
	if rt <= 0 && mode == writeCopy {
		return 0, false, nil
	}
	keys := []string{raw, stamp}
	args := []any{payload, v[:], ttlMillis(rt), modeArg(mode), boolArg(h.Negative())}
	if token != "" {
		fence, _ := companion(raw, rawFenceSuffix)
		keys, args = append(keys, fence), append(args, token)
	}
	return scriptResult(scripts.RawWrite.Run(ctx, s.client, keys, args...))
}

func (s *rawStore) fenceKey(key string) (string, error) {
	raw, _, err := s.keysOf(key)
	if err != nil {
		return "", err
	}
	return companion(raw, rawFenceSuffix)
}

func (s *rawStore) arm(ctx context.Context, key, token string) error {
	fence, err := s.fenceKey(key)
	if err != nil {
		return err
	}
	return armFence(ctx, s.client, fence, token)
}

func (s *rawStore) armVersion(ctx context.Context, key, token string) (uint64, error) {
	_, stamp, err := s.keysOf(key)
	if err != nil {
		return 0, err
	}
	fence, _ := companion(s.rawKey(key), rawFenceSuffix)
	return armThenRead(ctx, s.client, fence, token, true, func(p redis.Pipeliner) *redis.StringCmd { return p.Get(ctx, stamp) })
}

func (s *rawStore) del(ctx context.Context, keys []string) error {
	return dropKeys(ctx, s.client, keys, func(p redis.Pipeliner, k string) ([]string, string) {
		lk, err := s.leaseKeys(k)
		if err != nil {
			// No companions can exist for it. A key refused for
			// looking like a companion is left alone: its raw key is
			// another key's stamp, lease or fence.
			if !isCompanion(s.rawKey(k)) {
				p.Del(ctx, s.rawKey(k))
			}
			return nil, ""
		}
		fence, _ := companion(lk[0], rawFenceSuffix)
		p.Del(ctx, lk[0], lk[1], fence) // value, stamp, fence: one slot
		return []string{lk[0], lk[2]}, s.noticeChannel(k)
	})
}

func (s *rawStore) exists(ctx context.Context, keys []string) ([]bool, error) {
	return existsMany(ctx, s.client, keys, func(p redis.Pipeliner, k string) *redis.IntCmd { return p.Exists(ctx, s.rawKey(k)) })
}

func (s *rawStore) casMany(ctx context.Context, ops []casOp) ([]bool, error) {
	calls := make([]scriptCall, 0, len(ops))
	idx := make([]int, 0, len(ops))
	for i, op := range ops {
		raw, stamp, err := s.keysOf(op.key)
		if err != nil {
			continue
		}
		code, payload := "d", []byte(nil)
		var v [8]byte
		ttl := op.ttl
		if op.env != nil {
			h, p, err := envelope.Decode(op.env)
			if err != nil {
				continue
			}
			binary.BigEndian.PutUint64(v[:], h.WriteVersion)
			if ttl = rawTTL(h, s.now()); ttl <= 0 {
				continue // stale already: not repaired (see rawTTL)
			}
			code, payload = "s", p
			if h.Negative() {
				code = "n"
			}
		}
		calls = append(calls, scriptCall{keys: []string{raw, stamp},
			args: []any{boolArg(op.expect.found), op.expect.native, code, payload, v[:], ttlMillis(ttl)}})
		idx = append(idx, i)
	}
	got, err := casResults(evalMany(ctx, s.client, scripts.RawCAS, calls))
	out := make([]bool, len(ops))
	for j, i := range idx {
		out[i] = got[j]
	}
	return out, err
}

// ---- building stores ----

// newLayoutStore returns the store of l for a cache's keyspace.
func newLayoutStore(client redis.UniversalClient, keys keyspace, l Layout, now func() int64, ttl time.Duration) layoutStore {
	switch l.kind {
	case kindHash:
		return newHashStore(client, keys, l, now)
	case kindRaw:
		return &rawStore{client: client, l: l, now: now, ttl: ttl}
	}
	return &keyPerEntryStore{client: client, keys: keys}
}

// ---- nodes ----

// masterNodes returns a client for every master (or the only server),
// sorted by address, so that a scan can go through them in a stable order
// and resume at one. A failover client is a *redis.Client.
func masterNodes(ctx context.Context, client redis.UniversalClient) ([]*redis.Client, error) {
	var nodes []*redis.Client
	var mu sync.Mutex
	collect := func(_ context.Context, c *redis.Client) error {
		mu.Lock()
		nodes = append(nodes, c)
		mu.Unlock()
		return nil
	}
	var err error
	switch cl := client.(type) {
	case *redis.Client:
		nodes = []*redis.Client{cl}
	case *redis.ClusterClient:
		err = cl.ForEachMaster(ctx, collect)
	case *redis.Ring:
		err = cl.ForEachShard(ctx, collect)
	default:
		return nil, fmt.Errorf("layercache: scanning needs a *redis.Client, *redis.ClusterClient or *redis.Ring, not %T", client)
	}
	if err != nil {
		return nil, fmt.Errorf("layercache: list masters: %w", err)
	}
	slices.SortFunc(nodes, func(a, b *redis.Client) int { return strings.Compare(a.Options().Addr, b.Options().Addr) })
	return nodes, nil
}

// ---- CRC16 (XMODEM), the Redis Cluster key hash ----

var crc16Table = func() (t [256]uint16) {
	for i := range t {
		c := uint16(i) << 8
		for range 8 {
			if c&0x8000 != 0 {
				c = c<<1 ^ 0x1021
			} else {
				c <<= 1
			}
		}
		t[i] = c
	}
	return t
}()

func crc16(s string) uint16 {
	var c uint16
	for i := 0; i < len(s); i++ {
		c = c<<8 ^ crc16Table[byte(c>>8)^s[i]]
	}
	return c
}

const defaultSweepEvery = 30 * time.Second

// buildStore makes the cache's store from its layout or migration, wraps
// it for upgrade on read, and starts the background work (phase follower,
// Hash sweeps), which Close stops and waits for. It runs at the end of
// New, after every option has been checked.
func (c *Cache[T]) buildStore(upgrades []upgradeOption) store {
	build := func(keys keyspace) store {
		switch {
		case c.cfg.migration != nil:
			m := c.cfg.migration
			if c.mig == nil {
				c.mig = newMigration(m.name, c.client, c.cfg.phasePoll, c.log)
			}
			return &dualStore{mig: c.mig, now: c.nowMillis, sides: [2]layoutStore{
				newLayoutStore(c.client, keys, m.from, c.nowMillis, c.cfg.ttl),
				newLayoutStore(c.client, keys, m.to, c.nowMillis, c.cfg.ttl),
			}}
		case c.cfg.layout != nil:
			return newLayoutStore(c.client, keys, *c.cfg.layout, c.nowMillis, c.cfg.ttl)
		}
		return &keyPerEntryStore{client: c.client, keys: keys}
	}
	st := build(c.keys)
	// Only the current version's Hash stores are swept: older versions
	// are read, not written, and their keys expire or are purged.
	switch s := st.(type) {
	case *hashStore:
		c.sweeps = append(c.sweeps, s)
	case *dualStore:
		for _, side := range s.sides {
			if h, ok := side.(*hashStore); ok {
				c.sweeps = append(c.sweeps, h)
			}
		}
	}
	if c.mig != nil {
		c.bg.Add(1)
		go func() { defer c.bg.Done(); c.mig.follow(c.closeCtx) }()
	}
	for _, h := range c.sweeps {
		c.bg.Add(1)
		go func() { defer c.bg.Done(); c.sweepLoop(h) }()
	}
	if len(upgrades) == 0 {
		return st
	}
	u := &upgradingStore{store: st, now: c.nowMillis, stats: &c.stats, log: c.log, logs: &c.logBg}
	if c.vals != nil {
		codec := c.cfg.codec
		u.validate = func(ctx context.Context, key string, payload []byte) bool {
			var v T
			if err := codec.Unmarshal(payload, &v); err != nil {
				return true // not the validator's call: the read path counts a bad decode
			}
			return c.valid(ctx, key, v)
		}
	}
	for _, up := range upgrades {
		codec := c.cfg.codec
		convert := up.convert
		u.olds = append(u.olds, oldVersion{
			version: up.version,
			st:      build(c.keys.withVersion(up.version)),
			convert: func(p []byte) ([]byte, error) { return convert(codec, p) },
		})
	}
	return u
}

// sweepLoop sweeps h every sweepEvery (jittered) until Close.
func (c *Cache[T]) sweepLoop(h *hashStore) {
	every := c.cfg.sweepEvery
	t := time.NewTimer(jitterDur(every))
	defer t.Stop()
	for {
		select {
		case <-c.closeCtx.Done():
			return
		case <-t.C:
		}
		n, err := h.sweep(c.closeCtx, c.nowMillis(), every)
		c.stats.swept.Add(uint64(n))
		if err != nil && c.closeCtx.Err() == nil {
			c.stats.redisErrors.Add(1)
			c.logBg.log(c.closeCtx, c.log, slog.LevelWarn, "layercache: sweeping expired hash fields failed",
				slog.String("layout", h.l.String()), slog.Any("err", err))
		}
		t.Reset(jitterDur(every))
	}
}

// jitterDur spreads d by ±10%.
func jitterDur(d time.Duration) time.Duration {
	return time.Duration(float64(d) * (0.9 + 0.2*rand.Float64()))
}
