package layercache

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"strconv"
	"time"

	"github.com/layercache/layercache/internal/scripts"
	"github.com/redis/go-redis/v9"
)

// store is where a cache keeps its envelopes in Redis. A Layout makes one
// (store_kv.go, store_hash.go, store_raw.go); a migration wraps two
// (store_dual.go); upgrade on read wraps one (store_upgrade.go). Methods
// take user keys (already validated) and envelope bytes; a store that keeps
// another format (Raw) converts at its edge, so everything above it only
// ever sees envelopes.
//
// Every store keeps a key's value, lease, copy fence and notice channel in
// one Cluster slot, so that one script may check a lease and write the
// value together (internal/scripts):
//
//	key per entry  ns:ver:{key}            ns:ver:{key}:lease            ns:ver:{key}:notice
//	Hash(n)        <shard hash>, field key <shard hash>:lease:<key>     <shard hash>:notice:<key>
//	Raw(pattern)   <raw key>               {<raw key>}\xfflc:lease        {<raw key>}\xfflc:notice
//
// (for a raw key with a hash tag of its own, the suffix is appended to it).
type store interface {
	// get returns the envelope stored for key, or (nil, nil) when absent.
	get(ctx context.Context, key string) ([]byte, error)
	// getMany returns the envelopes of keys, nil for the absent ones, in
	// one round trip per Cluster slot group (a migrating or upgrading
	// store adds one for the keys it falls back on). On a partial failure
	// it returns what it read, nil for the keys it could not read, and the
	// error.
	getMany(ctx context.Context, keys []string) ([][]byte, error)
	// write is the one write of every store: see writeOpts.
	write(ctx context.Context, key string, env []byte, ttl time.Duration, w writeOpts) (writeResult, error)
	// writeMany applies writes in one round trip per slot group where the
	// store can (a dual store's fresh writes take their own steps).
	writeMany(ctx context.Context, ops []writeOp) ([]writeResult, error)
	// del removes the values of keys and everything tied to them (lease,
	// copy fence), breaking leases with a notice, one key at a time
	// atomically. Keys may fall in different Cluster slots.
	del(ctx context.Context, keys []string) error
	// version returns the write version key holds (0 if none). It may
	// overstate it (a stale Raw stamp), never understate it.
	version(ctx context.Context, key string) (uint64, error)

	// Copy fences (scripts.Arm): a copy into this store of a value read
	// elsewhere is written (write with writeOpts.fence) only if the fence
	// armed before that read still holds its token, so a Delete in
	// between voids it.

	// armMany adds token to the copy fence of every key, on every side a
	// copy of it would be written to.
	armMany(ctx context.Context, keys []string, token string) error

	// Leases (lease.go). A lease is a random token at the key's lease key;
	// every write made under it checks the token in the same script.

	// acquireLease takes key's lease for token, for ttl, if nobody holds
	// it. With read, it also returns key's envelope, read in the same step.
	acquireLease(ctx context.Context, key, token string, ttl time.Duration, read bool) (leaseAttempt, error)
	// renewLease extends key's lease to ttl if token still holds it, and
	// reports whether it did.
	renewLease(ctx context.Context, key, token string, ttl time.Duration) (bool, error)
	// releaseLease drops key's lease if token holds it and publishes a
	// notice.
	releaseLease(ctx context.Context, key, token string) error
	// noticeChannel is the pub/sub channel of key's notices; it hashes to
	// key's slot.
	noticeChannel(key string) string
}

// writeOpts says how store.write applies a write. The zero value is a
// fresh write: it replaces what the key holds, and the write version
// stored is env's, or one past the key's current version if that is not
// older, so versions of one key grow in the order writes land (Redis's
// order, whatever the writers' clocks say).
type writeOpts struct {
	// copy makes the write set-if-newer: a copy of a value that already
	// has its version (the second side of a dual write, a backfill, an
	// upgrade), applied only if the key holds no version at or past it,
	// so a retried or reordered copy never makes an entry older.
	copy bool
	// lease, if set, writes only while this token holds the key's lease,
	// then releases it with a notice (a fill). A lost lease is
	// written=false, not an error.
	lease string
	// breakLease drops the key's lease, whoever holds it, in the same
	// step (Set): a fill that started before this write cannot land
	// after it.
	breakLease bool
	// fence, if set, writes only while this token is in the key's copy
	// fence, taking it out (a fenced copy: see scripts.Arm).
	fence string
}

// writeResult is what a write did.
type writeResult struct {
	version uint64 // the write version stored
	written bool   // false: a copy was not newer, a lease or fence was lost
}

// writeOp is one write of writeMany.
type writeOp struct {
	key string
	env []byte
	ttl time.Duration
	w   writeOpts
}

// leaseAttempt is what acquireLease found.
type leaseAttempt struct {
	env      []byte        // key's envelope when asked for and present
	acquired bool          // the caller's token now holds the lease
	heldFor  time.Duration // when not acquired: the holder's remaining lease time
}

// layoutStore is a store made by one Layout: one side of a migration.
// Beyond store, it offers what dual writes, reconciliation and the
// migration's invalidations need.
type layoutStore interface {
	store
	layout() Layout
	// readMany reads keys in one round trip per slot group, as records.
	readMany(ctx context.Context, keys []string) ([]record, error)
	// exists reports, in one round trip per node, which keys have a
	// stored value (found, in readMany's terms).
	exists(ctx context.Context, keys []string) ([]bool, error)
	// casMany applies compare-and-set repairs, reporting which applied.
	casMany(ctx context.Context, ops []casOp) ([]bool, error)
	// take deletes key's value and returns the write version it held:
	// the invalidation of the side a single-side phase does not write.
	take(ctx context.Context, key string) (uint64, error)
	// armVersion arms key's copy fence, then reads key's version (as
	// version does), in one step.
	armVersion(ctx context.Context, key, token string) (uint64, error)
	// breakLease drops key's lease, whoever holds it, with a notice.
	breakLease(ctx context.Context, key string) error
	// lister lists the user keys the store holds, for a reconcile.
	lister(ctx context.Context) (*keyLister, error)
}

// sweeper is a store with expired entries to delete in the background
// (Hash: Redis 7.0 has no per-field expiry).
type sweeper interface {
	sweep(ctx context.Context, now int64, every time.Duration) (int, error)
	String() string
}

// sweepSource is a store that has sweepers, its own or its sides'.
type sweepSource interface {
	sweepers() []sweeper
}

// record is one entry as read by a batch read: the envelope the read path
// would see (synthesised for Raw) and the bytes actually stored, which a
// compare-and-set repair must find unchanged.
type record struct {
	env    []byte // nil when absent
	native []byte // nil when absent
	found  bool   // native is present (even if env could not be made)
}

// getKeys is s.getMany, through s.get for a single key (the read path's
// common case: no batching to set up).
func getKeys(ctx context.Context, s store, keys []string) ([][]byte, error) {
	if len(keys) == 1 {
		b, err := s.get(ctx, keys[0])
		return [][]byte{b}, err
	}
	return s.getMany(ctx, keys)
}

// envs returns the envelopes of records.
func envs(recs []record) [][]byte {
	out := make([][]byte, len(recs))
	for i := range recs {
		out[i] = recs[i].env
	}
	return out
}

// casOp is one compare-and-set of a repair: if the entry still holds
// expect, replace it by env (or delete it when env is nil); with a fence
// token, only while the key's copy fence holds it (see scripts.Arm).
type casOp struct {
	key    string
	expect record
	env    []byte
	ttl    time.Duration
	fence  string
}

// newLayoutStore returns the store of l for a cache's keyspace. ttl is how
// long a Raw key without a TTL counts as fresh.
func newLayoutStore(client redis.UniversalClient, keys keyspace, l Layout, now func() int64, ttl time.Duration) layoutStore {
	switch l.kind {
	case kindHash:
		return newHashStore(client, keys, l, now)
	case kindRaw:
		return newRawStore(client, l, now, ttl)
	}
	return newKVStore(client, keys, now)
}

// ---- the per-key scripts, shared by the layouts ----

// loc is where one user key lives in a layout: every Redis key its scripts
// touch, all in one Cluster slot, and how the scripts find the entry (see
// internal/scripts).
type loc struct {
	keys   []string // container, lease, copy fence[, Raw stamp]
	layout string   // "k", "h" or "r"
	field  string   // Hash: the field
	timed  bool     // Hash: the scripts need now (expired fields count as absent)
	// The lease notice channel is chBase+chSuffix, joined only by the
	// operations that publish (see channel).
	chBase, chSuffix string
}

// channel returns the key's lease notice channel.
func (l *loc) channel() string { return l.chBase + l.chSuffix }

// keyed is the part of every layout store that runs the per-key scripts;
// a layout says where a key lives (locate) and, for Raw, how its TTLs and
// values differ from an envelope's (rawTTL, synth).
type keyed struct {
	client  redis.UniversalClient
	pub     string       // PUBLISH, or SPUBLISH on a cluster
	pubArg  any          // pub, boxed once
	cluster bool         // batch reads group keys by slot
	now     func() int64 // the cache's clock, Unix ms
	locate  func(key string) (loc, error)
	// writeTTL, if set, turns a write's TTL into the layout's (Raw keeps
	// only the fresh part, see rawTTL); ok=false skips the write.
	writeTTL func(env []byte, ttl time.Duration, copy bool) (time.Duration, bool)
	// synth, if set, makes the envelope of what Acquire read (Raw).
	synth func(r *acquireReply) []byte
}

func newKeyed(client redis.UniversalClient, now func() int64) keyed {
	pub := publishCommand(client)
	return keyed{client: client, pub: pub, pubArg: pub, cluster: isCluster(client), now: now}
}

// Script arguments boxed once: converting a string to an interface
// allocates, and a Set passes several.
var (
	argFresh, argCopy any = "f", "c"
	argTrue, argFalse any = "1", "0"
	layoutArgs            = map[string]any{"k": "k", "h": "h", "r": "r"}
)

// batchItem is one key's part of a call of a per-key script.
type batchItem struct {
	l    loc
	args []any // the operation's arguments, after the field
}

// maxBatch bounds the keys of one script call: a script blocks the server
// while it runs, and one call per slot group of a 20,000-key Delete
// should not.
const maxBatch = 128

// eval runs script over items: one call per slot group (per maxBatch
// items), all in one pipeline, so one round trip per node. It returns each
// item's reply and error.
func (k *keyed) eval(ctx context.Context, script *redis.Script, items []batchItem) ([]any, []error) {
	replies, errs := make([]any, len(items)), make([]error, len(items))
	if len(items) == 0 {
		return replies, errs
	}
	first := make([]string, len(items))
	for i := range items {
		first[i] = items[i].l.keys[0]
	}
	now := ""
	if items[0].l.timed {
		now = strconv.FormatInt(k.now(), 10)
	}
	var calls []scriptCall
	var idx [][]int
	for _, g := range slotGroups(k.cluster, first) {
		for len(g) > 0 {
			chunk := g[:min(len(g), maxBatch)]
			g = g[len(chunk):]
			c := scriptCall{args: []any{items[chunk[0]].l.layout, now}}
			for _, i := range chunk {
				c.keys = append(c.keys, items[i].l.keys...)
				c.args = append(append(c.args, items[i].l.field), items[i].args...)
			}
			calls, idx = append(calls, c), append(idx, chunk)
		}
	}
	cmds, _ := evalMany(ctx, k.client, script, calls)
	for ci, cmd := range cmds {
		res, err := cmd.Slice()
		if err == nil && len(res) != len(idx[ci]) {
			err = fmt.Errorf("layercache: script replied %d values for %d keys", len(res), len(idx[ci]))
		}
		for j, i := range idx[ci] {
			if err != nil {
				errs[i] = err
			} else {
				replies[i] = res[j]
			}
		}
	}
	return replies, errs
}

// one runs script for one key.
func (k *keyed) one(ctx context.Context, script *redis.Script, key string, args ...any) (any, error) {
	l, err := k.locate(key)
	if err != nil {
		return nil, err
	}
	return k.eval1(ctx, script, &l, args...)
}

// eval1 runs script for the one key at l: eval without the batching, for
// the single-key operations (a Set, a fill, a lease).
func (k *keyed) eval1(ctx context.Context, script *redis.Script, l *loc, args ...any) (any, error) {
	return k.run1(ctx, script, l, append(k.head(l, len(args)), args...))
}

// head returns the arguments a one-key call starts with (layout, now,
// field), with room for n more.
func (k *keyed) head(l *loc, n int) []any {
	now := ""
	if l.timed {
		now = strconv.FormatInt(k.now(), 10)
	}
	return append(make([]any, 0, 3+n), layoutArgs[l.layout], now, l.field)
}

// run1 runs script for the one key at l with its whole ARGV.
func (k *keyed) run1(ctx context.Context, script *redis.Script, l *loc, argv []any) (any, error) {
	res, err := script.Run(ctx, k.client, l.keys, argv...).Slice()
	if err != nil {
		return nil, err
	}
	if len(res) != 1 {
		return nil, fmt.Errorf("layercache: script replied %d values for 1 key", len(res))
	}
	return res[0], nil
}

// many runs script for keys, with args(i) the arguments of keys[i]. A key
// the layout refuses (locate) gets its error and is not sent, nor is one
// args declines.
func (k *keyed) many(ctx context.Context, script *redis.Script, keys []string, args func(i int, l *loc) ([]any, bool)) ([]any, []error) {
	if len(keys) == 1 {
		// One key (a dual read's fence, a single Delete): no batching.
		replies, errs := make([]any, 1), make([]error, 1)
		l, err := k.locate(keys[0])
		if err != nil {
			errs[0] = err
			return replies, errs
		}
		if a, ok := args(0, &l); ok {
			replies[0], errs[0] = k.eval1(ctx, script, &l, a...)
		}
		return replies, errs
	}
	items := make([]batchItem, 0, len(keys))
	at := make([]int, 0, len(keys))
	errs := make([]error, len(keys))
	for i, key := range keys {
		l, err := k.locate(key)
		if err != nil {
			errs[i] = err
			continue
		}
		a, ok := args(i, &l)
		if !ok {
			continue
		}
		items, at = append(items, batchItem{l: l, args: a}), append(at, i)
	}
	replies := make([]any, len(keys))
	r, e := k.eval(ctx, script, items)
	for j, i := range at {
		replies[i], errs[i] = r[j], e[j]
	}
	return replies, errs
}

// writeArgs appends the Write arguments of op to dst, or returns false
// when the layout skips it (writeTTL).
func (k *keyed) writeArgs(op *writeOp, l *loc, dst []any) ([]any, bool) {
	ttl := op.ttl
	if k.writeTTL != nil {
		var ok bool
		if ttl, ok = k.writeTTL(op.env, ttl, op.w.copy); !ok {
			return nil, false
		}
	}
	mode := argFresh
	if op.w.copy {
		mode = argCopy
	}
	brk := argFalse
	if op.w.breakLease {
		brk = argTrue
	}
	var ch any = ""
	if op.w.lease != "" || op.w.breakLease {
		ch = l.channel() // the only writes that publish
	}
	return append(dst, op.env, ttlMillis(ttl), mode, op.w.lease, brk, op.w.fence, k.pubArg, ch), true
}

func (k *keyed) write(ctx context.Context, key string, env []byte, ttl time.Duration, w writeOpts) (writeResult, error) {
	l, err := k.locate(key)
	if err != nil {
		return writeResult{}, err
	}
	args, ok := k.writeArgs(&writeOp{key: key, env: env, ttl: ttl, w: w}, &l, k.head(&l, 8))
	if !ok {
		return writeResult{}, nil
	}
	r, err := k.run1(ctx, scripts.Write, &l, args)
	if err != nil {
		return writeResult{}, err
	}
	return versionOf(r)
}

func (k *keyed) writeMany(ctx context.Context, ops []writeOp) ([]writeResult, error) {
	keys := make([]string, len(ops))
	for i := range ops {
		keys[i] = ops[i].key
	}
	replies, errs := k.many(ctx, scripts.Write, keys, func(i int, l *loc) ([]any, bool) { return k.writeArgs(&ops[i], l, nil) })
	out := make([]writeResult, len(ops))
	for i, r := range replies {
		if errs[i] == nil {
			out[i], errs[i] = versionOf(r)
		}
	}
	return out, errors.Join(errs...)
}

func (k *keyed) del(ctx context.Context, keys []string) error {
	_, errs := k.many(ctx, scripts.Delete, keys, func(_ int, l *loc) ([]any, bool) { return []any{k.pub, l.channel()}, true })
	return errors.Join(errs...)
}

// versionOne runs a script that replies a version for key.
func (k *keyed) versionOne(ctx context.Context, script *redis.Script, key string, args ...any) (uint64, error) {
	r, err := k.one(ctx, script, key, args...)
	if err != nil {
		return 0, err
	}
	res, err := versionOf(r)
	return res.version, err
}

func (k *keyed) version(ctx context.Context, key string) (uint64, error) {
	return k.versionOne(ctx, scripts.Version, key)
}

func (k *keyed) take(ctx context.Context, key string) (uint64, error) {
	return k.versionOne(ctx, scripts.Take, key)
}

func (k *keyed) armVersion(ctx context.Context, key, token string) (uint64, error) {
	return k.versionOne(ctx, scripts.Arm, key, token, fenceTTL.Milliseconds(), "1")
}

// armMany arms the copy fence of keys; a key the layout refuses is never
// copied to and is skipped.
func (k *keyed) armMany(ctx context.Context, keys []string, token string) error {
	args := []any{token, fenceTTL.Milliseconds(), "0"}
	_, errs := k.many(ctx, scripts.Arm, keys, func(int, *loc) ([]any, bool) { return args, true })
	return joinUnlessInvalid(errs)
}

// joinUnlessInvalid joins errs but those of keys the layout refuses.
func joinUnlessInvalid(errs []error) error {
	var out []error
	for _, err := range errs {
		if err != nil && !errors.Is(err, ErrInvalidKey) {
			out = append(out, err)
		}
	}
	return errors.Join(out...)
}

// casMany applies repairs; a repair the layout skips (see rawTTL: a
// stale value is not copied to Raw) or refuses reports false.
func (k *keyed) casMany(ctx context.Context, ops []casOp) ([]bool, error) {
	keys := make([]string, len(ops))
	for i := range ops {
		keys[i] = ops[i].key
	}
	replies, errs := k.many(ctx, scripts.CAS, keys, func(i int, _ *loc) ([]any, bool) {
		op := &ops[i]
		ttl := op.ttl
		if op.env != nil && k.writeTTL != nil {
			var ok bool
			if ttl, ok = k.writeTTL(op.env, ttl, true); !ok {
				return nil, false
			}
		}
		return []any{boolArg(op.expect.found), op.expect.native, op.env, ttlMillis(ttl), op.fence}, true
	})
	out := make([]bool, len(ops))
	for i, r := range replies {
		n, _ := r.(int64)
		out[i] = n == 1
	}
	return out, joinUnlessInvalid(errs)
}

func (k *keyed) acquireLease(ctx context.Context, key, token string, ttl time.Duration, read bool) (leaseAttempt, error) {
	r, err := k.one(ctx, scripts.Acquire, key, token, ttlMillis(ttl), boolArg(read))
	if err != nil {
		return leaseAttempt{}, err
	}
	res, ok := r.([]any)
	if !ok {
		return leaseAttempt{}, fmt.Errorf("layercache: lease script replied %T, want an array", r)
	}
	ar, err := parseAcquire(res)
	if err != nil {
		return leaseAttempt{}, err
	}
	a := leaseAttempt{acquired: ar.taken, heldFor: ar.heldFor, env: ar.value}
	if read && k.synth != nil {
		a.env = k.synth(&ar)
	}
	return a, nil
}

// acquireReply is the Acquire script's reply.
type acquireReply struct {
	value              []byte // native bytes, nil when absent or not read
	taken              bool
	heldFor            time.Duration
	valueTTL, stampTTL time.Duration // Raw: PTTLs (-1 no expiry, -2 absent)
	stamp              []byte        // Raw: the version stamp
}

// parseAcquire decodes {value, taken, lease PTTL, value PTTL, stamp,
// stamp PTTL}.
func parseAcquire(res []any) (acquireReply, error) {
	var r acquireReply
	if len(res) != 6 {
		return r, fmt.Errorf("layercache: lease script returned %d values, want 6", len(res))
	}
	var ints [4]int64
	for i, j := range [...]int{1, 2, 3, 5} {
		n, ok := res[j].(int64)
		if !ok {
			return r, fmt.Errorf("layercache: lease script returned a %T, want an integer", res[j])
		}
		ints[i] = n
	}
	if v, ok := res[0].(string); ok {
		r.value = []byte(v)
	}
	if v, ok := res[4].(string); ok {
		r.stamp = []byte(v)
	}
	r.taken = ints[0] == 1
	if ints[1] > 0 {
		r.heldFor = time.Duration(ints[1]) * time.Millisecond
	}
	r.valueTTL, r.stampTTL = redisTTL(ints[2]), redisTTL(ints[3])
	return r, nil
}

// redisTTL converts a PTTL reply as go-redis does: -1 and -2 stay as they
// are (no expiry, no key), other values are milliseconds.
func redisTTL(ms int64) time.Duration {
	if ms < 0 {
		return time.Duration(ms)
	}
	return time.Duration(ms) * time.Millisecond
}

func (k *keyed) renewLease(ctx context.Context, key, token string, ttl time.Duration) (bool, error) {
	r, err := k.one(ctx, scripts.Renew, key, token, ttlMillis(ttl))
	n, _ := r.(int64)
	return n == 1, err
}

func (k *keyed) releaseLease(ctx context.Context, key, token string) error {
	l, err := k.locate(key)
	if err != nil {
		return err
	}
	_, err = k.eval1(ctx, scripts.Release, &l, token, k.pub, l.channel())
	return err
}

func (k *keyed) breakLease(ctx context.Context, key string) error {
	l, err := k.locate(key)
	if err != nil {
		return err
	}
	_, err = k.eval1(ctx, scripts.BreakLease, &l, k.pub, l.channel())
	return err
}

// ---- building a cache's store ----

const defaultSweepEvery = 30 * time.Second

// buildStore makes the cache's store from its layout or migration, wraps
// it for upgrade on read, and starts the background work (phase follower,
// sweeps), which Close stops and waits for. It runs at the end of New,
// after every option has been checked.
func (c *Cache[T]) buildStore(upgrades []upgradeOption) store {
	build := func(keys keyspace) store {
		switch {
		case c.cfg.migration != nil:
			m := c.cfg.migration
			if c.mig == nil {
				c.mig = newMigration(m.name, c.client, c.cfg.phasePoll, c.cfg.clock, c.log)
			}
			return &dualStore{mig: c.mig, now: c.nowMillis, sides: [2]layoutStore{
				newLayoutStore(c.client, keys, m.from, c.nowMillis, c.cfg.ttl),
				newLayoutStore(c.client, keys, m.to, c.nowMillis, c.cfg.ttl),
			}}
		case c.cfg.layout != nil:
			return newLayoutStore(c.client, keys, *c.cfg.layout, c.nowMillis, c.cfg.ttl)
		}
		return newKVStore(c.client, keys, c.nowMillis)
	}
	st := build(c.keys)
	if c.mig != nil {
		c.bg.Add(1)
		go func() { defer c.bg.Done(); c.mig.follow(c.closeCtx) }()
	}
	if len(upgrades) > 0 {
		st = c.upgrading(st, upgrades, build)
	}
	if ss, ok := st.(sweepSource); ok {
		for _, sw := range ss.sweepers() {
			c.bg.Add(1)
			go func() { defer c.bg.Done(); c.sweepLoop(sw) }()
		}
	}
	return st
}

// upgrading wraps st for upgrade on read from the older versions.
func (c *Cache[T]) upgrading(st store, upgrades []upgradeOption, build func(keyspace) store) store {
	u := &upgradingStore{store: st, now: c.nowMillis, rec: &c.rec, log: c.log, logs: &c.logBg}
	codec := c.cfg.codec
	if c.vals != nil {
		u.validate = func(ctx context.Context, key string, payload []byte) bool {
			var v T
			if err := codec.Unmarshal(payload, &v); err != nil {
				return true // not the validator's call: the read path counts a bad decode
			}
			return c.valid(ctx, key, v)
		}
	}
	for _, up := range upgrades {
		convert := up.convert
		u.olds = append(u.olds, oldVersion{
			version: up.version,
			st:      build(c.keys.withVersion(up.version)),
			convert: func(p []byte) ([]byte, error) { return convert(codec, p) },
		})
	}
	return u
}

// sweepLoop runs sw every sweepEvery (jittered) until Close.
func (c *Cache[T]) sweepLoop(sw sweeper) {
	every := c.cfg.sweepEvery
	for {
		if !sleep(c.closeCtx, c.cfg.clock, jitterDur(every)) {
			return
		}
		n, err := sw.sweep(c.closeCtx, c.nowMillis(), every)
		c.rec.add(evSwept, uint64(n))
		if err != nil && c.closeCtx.Err() == nil {
			c.rec.inc(evRedisError)
			c.logBg.log(c.closeCtx, c.log, slog.LevelWarn, "layercache: sweeping expired entries failed",
				slog.String("layout", sw.String()), slog.Any("err", err))
		}
	}
}

// jitterDur spreads d by ±10%.
func jitterDur(d time.Duration) time.Duration {
	return time.Duration(float64(d) * (0.9 + 0.2*rand.Float64()))
}
