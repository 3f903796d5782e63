package layercache

import (
	"bytes"
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/layercache/layercache/internal/envelope"
	"github.com/redis/go-redis/v9"
)

// ReconcileOptions tune [Cache.Reconcile]. The zero value compares without
// repairing, 500 keys a batch, as fast as Redis answers.
type ReconcileOptions struct {
	// Repair makes the sides agree. A key on the old side only is copied
	// to the new side: the new side is written only by this library, so
	// what it lacks it never had or lost to expiry. A key on the new side
	// only is copied to the old side when the new side is authoritative
	// (ReadNewFirst, NewOnly), and deleted from the new side when the old
	// side is (Old, DualWrite, ReadOldFirst): there, code that predates
	// the library may have deleted it from the old side. A key whose
	// values differ takes the value with the newer write version where
	// both have one, the authoritative side's otherwise (a value other
	// code wrote on a Raw side has none). Each repair is a
	// compare-and-set: a key written since the reconciler read it is left
	// alone (counted in RepairSkipped), so a repair never undoes a live
	// write.
	Repair bool
	// BatchSize is how many keys are read, compared and repaired per
	// round trip; 0 means 500.
	BatchSize int
	// RateLimit caps keys compared per second; 0 means no limit.
	RateLimit int
	// Cursor resumes a reconcile where an earlier one stopped: pass the
	// Cursor of its report. Empty starts from the beginning.
	Cursor string
	// Progress, if set, is called after each batch with the totals so far
	// (and the cursor to resume from).
	Progress func(ReconcileReport)
}

// ReconcileReport is what [Cache.Reconcile] found and did.
type ReconcileReport struct {
	// Phase is the phase the reconcile ran under; it decides which side
	// is authoritative.
	Phase Phase
	// Scanned counts keys compared. A key found on both sides counts
	// once. SCAN may return a key twice, so counts are exact only when
	// nothing is written meanwhile.
	Scanned int64
	// Matched counts keys whose decoded values are equal on both sides.
	Matched int64
	// OnlyOld and OnlyNew count keys with a usable value on one side
	// only; Mismatched those whose decoded values differ.
	OnlyOld, OnlyNew, Mismatched int64
	// Repaired counts repairs applied; RepairSkipped repairs not applied
	// because the key changed after it was read.
	Repaired, RepairSkipped int64
	// Cursor is where to resume (see [ReconcileOptions].Cursor); empty
	// when both sides were scanned to the end.
	Cursor string
	// Duration is how long the reconcile ran.
	Duration time.Duration
}

// MigrationSpec names a migration and the keyspace it moves, without the
// cache's value type: what an operator's tool needs to reconcile it (see
// [Reconcile]) while the services that use the cache keep running.
type MigrationSpec struct {
	// Name is the migration's name, as given to [WithMigration].
	Name string
	// Namespace and Version are the cache's ([WithNamespace],
	// [WithVersion]); empty means [DefaultNamespace] and [DefaultVersion].
	Namespace, Version string
	// From and To are the migration's layouts, as given to WithMigration.
	From, To Layout
	// TTL is how long a Raw key without a TTL counts as fresh, as
	// [WithTTL] says for the cache; 0 means [DefaultTTL].
	TTL time.Duration
	// Codec decodes payloads to compare them: two payloads match when
	// they decode (into an interface value) to the same value, encoded
	// again, so that two encodings of one JSON document match; a payload
	// that does not decode counts as absent. nil means [JSON];
	// [PassThrough] compares bytes.
	Codec Codec
}

// Reconcile compares, and with opts.Repair repairs, the two sides of a
// migration as [Cache.Reconcile] does, without the cache's value type: it
// compares payloads decoded by spec.Codec into an interface value. Use it
// from operator tools; a service that has the cache calls
// [Cache.Reconcile], which compares values decoded as T.
func Reconcile(ctx context.Context, client redis.UniversalClient, spec MigrationSpec, opts ReconcileOptions) (ReconcileReport, error) {
	if nilClient(client) {
		return ReconcileReport{}, fmt.Errorf("%w: Reconcile needs a redis.UniversalClient, got %s", ErrInvalidOption, describeNil(client))
	}
	if spec.Namespace == "" {
		spec.Namespace = DefaultNamespace
	}
	if spec.Version == "" {
		spec.Version = DefaultVersion
	}
	if spec.TTL == 0 {
		spec.TTL = DefaultTTL
	}
	if spec.Codec == nil {
		spec.Codec = JSON
	}
	for _, err := range []error{checkName("MigrationSpec.Name", spec.Name), checkName("MigrationSpec.Namespace", spec.Namespace),
		checkName("MigrationSpec.Version", spec.Version), spec.From.err, spec.To.err} {
		if err != nil {
			return ReconcileReport{}, err
		}
	}
	if spec.TTL < 0 {
		return ReconcileReport{}, fmt.Errorf("%w: MigrationSpec.TTL %v is negative", ErrInvalidOption, spec.TTL)
	}
	phase := func(ctx context.Context) (Phase, error) { return GetPhase(ctx, client, spec.Name) }
	codec := spec.Codec
	canon := func(payload []byte) ([]byte, bool) {
		if codec == PassThrough {
			return payload, true
		}
		var v any
		if codec.Unmarshal(payload, &v) != nil {
			return nil, false
		}
		b, err := codec.Marshal(v)
		return b, err == nil
	}
	sys := systemClock{}
	now := func() int64 { return sys.Now().UnixMilli() }
	keys := newKeyspace(spec.Namespace, spec.Version)
	sides := [2]layoutStore{
		newLayoutStore(client, keys, spec.From, now, spec.TTL),
		newLayoutStore(client, keys, spec.To, now, spec.TTL),
	}
	return reconcile(ctx, sides, phase, canon, sys, opts)
}

// Reconcile compares the two sides of the cache's migration: it SCANs the
// old side, then the new one (SCAN on every master, or HSCAN of every
// hash for a [Hash] layout; never KEYS), in batches, reads each key on both
// sides, and compares the values decoded as T (so that two encodings of one
// value match). An entry past its expiry, or that does not decode, counts
// as absent. With Repair it also makes the sides agree (see
// [ReconcileOptions]). It returns an error wrapping [ErrNoMigration] for a
// cache without [WithMigration].
//
// Reconcile is resumable: a cancelled ctx or a Redis error stops it between
// batches with a report whose Cursor continues the work. Run a repairing
// reconcile after entering DualWrite (to fill the new side before it is
// read) and before any rollback that moves reads back to a side that was
// not written meanwhile.
func (c *Cache[T]) Reconcile(ctx context.Context, opts ReconcileOptions) (ReconcileReport, error) {
	m := c.cfg.migration
	if m == nil {
		return ReconcileReport{}, fmt.Errorf("%w: Reconcile needs WithMigration", ErrNoMigration)
	}
	codec := c.cfg.codec
	canon := func(payload []byte) ([]byte, bool) {
		var v T
		if codec.Unmarshal(payload, &v) != nil {
			return nil, false
		}
		b, err := codec.Marshal(v)
		return b, err == nil
	}
	sides := [2]layoutStore{
		newLayoutStore(c.client, c.keys, m.from, c.nowMillis, c.cfg.ttl),
		newLayoutStore(c.client, c.keys, m.to, c.nowMillis, c.cfg.ttl),
	}
	return reconcile(ctx, sides, c.mig.refresh, canon, c.cfg.clock, opts)
}

// reconcile is the T-free core of both Reconciles. phase reads the
// migration's phase.
func reconcile(ctx context.Context, sides [2]layoutStore, phase func(context.Context) (Phase, error),
	canon func([]byte) ([]byte, bool), clock Clock, opts ReconcileOptions) (rep ReconcileReport, err error) {
	start := clock.Now()
	defer func() { rep.Duration = clock.Now().Sub(start) }()
	if opts.BatchSize < 0 || opts.RateLimit < 0 {
		return rep, fmt.Errorf("%w: ReconcileOptions: BatchSize and RateLimit must not be negative", ErrInvalidOption)
	}
	batch := opts.BatchSize
	if batch == 0 {
		batch = 500
	}
	pos, err := parseReconcileCursor(opts.Cursor)
	if err != nil {
		return rep, err
	}
	// Read the control key now rather than trust a follower's copy, which
	// may be up to a poll interval old: right after a SetPhase the cached
	// phase could name the wrong authoritative side, and a repair would
	// then spread the side that is no longer written first.
	p, err := phase(ctx)
	if err != nil {
		return rep, fmt.Errorf("layercache: reconcile: read phase: %w", err)
	}
	rep.Phase = p
	r := reconciler{sides: sides, canon: canon, opts: opts, batch: batch, auth: authority(p),
		pace: newPacer(opts.RateLimit, clock), now: func() int64 { return clock.Now().UnixMilli() }, rep: &rep}
	for side := pos.side; side < 2; side++ {
		kl, err := sides[side].lister(ctx)
		if err != nil {
			return rep, err
		}
		if side != pos.side {
			pos = scanPos{side: side}
		}
		if err := r.scanSide(ctx, kl, pos); err != nil {
			return rep, err
		}
	}
	rep.Cursor = ""
	return rep, nil
}

type reconciler struct {
	sides [2]layoutStore
	// canon returns a payload decoded and encoded again, so that two
	// encodings of one value compare equal; false when it does not
	// decode.
	canon func([]byte) ([]byte, bool)
	opts  ReconcileOptions
	batch int
	auth  int
	pace  *pacer
	now   func() int64
	rep   *ReconcileReport
}

// scanSide goes through one side from pos, a page at a time, and a page
// BatchSize keys at a time.
func (r *reconciler) scanSide(ctx context.Context, sc *keyLister, pos scanPos) error {
	if err := sc.check(pos); err != nil {
		return err
	}
	for !sc.done(pos) {
		pos.addr = sc.addr(pos.node)
		keys, next, err := sc.page(ctx, pos, r.batch)
		if err != nil {
			return err
		}
		if pos.skip > len(keys) {
			pos.skip = len(keys)
		}
		for i := pos.skip; i < len(keys); i += r.batch {
			chunk := keys[i:min(i+r.batch, len(keys))]
			if err := r.pace.wait(ctx, len(chunk)); err != nil {
				return err
			}
			if err := r.compare(ctx, pos.side, chunk); err != nil {
				return err
			}
			at := pos
			at.skip = i + len(chunk)
			r.rep.Cursor = at.String()
			if at.skip == len(keys) {
				r.rep.Cursor = next.String()
			}
			if r.opts.Progress != nil {
				r.opts.Progress(*r.rep)
			}
		}
		pos = next
		r.rep.Cursor = pos.String()
	}
	return ctx.Err()
}

// compare classifies a batch of keys found on side, and repairs them.
// Keys found while scanning the old side are compared in full; keys found
// on the new side only if the old side has nothing at all for them (the
// others were compared while scanning the old side), which an existence
// check tells without reading values.
func (r *reconciler) compare(ctx context.Context, side int, keys []string) error {
	if side == sideNew {
		found, err := r.sides[sideOld].exists(ctx, keys)
		if err != nil {
			return fmt.Errorf("layercache: reconcile: read old side: %w", err)
		}
		var only []string
		for i, k := range keys {
			if !found[i] {
				only = append(only, k)
			}
		}
		if keys = only; len(keys) == 0 {
			return nil
		}
	}
	// A repair copies a value read here: arm both sides' copy fences
	// first, so that a Delete between the read and the repair, which
	// deletes them, voids the copy instead of letting it write the
	// deleted value into the emptied side ("expect absent" would pass).
	var fence string
	if r.opts.Repair {
		fence = newLeaseToken()
		for side := range r.sides {
			if err := r.sides[side].armMany(ctx, keys, fence); err != nil {
				return fmt.Errorf("layercache: reconcile: arm %s side: %w", sideName(side), err)
			}
		}
	}
	var recs [2][]record
	var err error
	if recs[sideOld], err = r.sides[sideOld].readMany(ctx, keys); err != nil {
		return fmt.Errorf("layercache: reconcile: read old side: %w", err)
	}
	if recs[sideNew], err = r.sides[sideNew].readMany(ctx, keys); err != nil {
		return fmt.Errorf("layercache: reconcile: read new side: %w", err)
	}
	now := r.now()
	var fixes [2][]casOp
	for i, k := range keys {
		if side == sideNew && recs[sideOld][i].found {
			continue // written since the existence check: compared by now or next time
		}
		o, n := entryOf(recs[sideOld][i], now), entryOf(recs[sideNew][i], now)
		r.rep.Scanned++
		src := -1 // the side to copy from, or the side to delete on
		del := false
		switch r.sameEntry(&o, &n) {
		case neither:
			r.rep.Scanned-- // gone from both since the scan listed it
			continue
		case matched:
			r.rep.Matched++
			continue
		case mismatched:
			r.rep.Mismatched++
			src = r.auth
			if o.version != 0 && n.version != 0 && o.version != n.version {
				src = sideOld
				if n.version > o.version {
					src = sideNew
				}
			}
		case onlyOld:
			r.rep.OnlyOld++
			src = sideOld
		case onlyNew:
			r.rep.OnlyNew++
			src, del = sideNew, r.auth != sideNew
		}
		if !r.opts.Repair {
			continue
		}
		if del {
			// Only the new side has it and the old side, which other
			// code may write, is authoritative: delete, don't spread.
			fixes[src] = append(fixes[src], casOp{key: k, expect: recs[src][i]})
			continue
		}
		from := o
		if src == sideNew {
			from = n
		}
		ttl := time.Duration(from.expiresAt-now) * time.Millisecond
		if ttl <= 0 {
			continue
		}
		to := 1 - src
		fixes[to] = append(fixes[to], casOp{key: k, expect: recs[to][i], env: recs[src][i].env, ttl: ttl, fence: fence})
	}
	for side, ops := range fixes {
		if len(ops) == 0 {
			continue
		}
		done, err := r.sides[side].casMany(ctx, ops)
		for _, ok := range done {
			if ok {
				r.rep.Repaired++
			} else {
				r.rep.RepairSkipped++
			}
		}
		if err != nil {
			return fmt.Errorf("layercache: reconcile: repair %s side: %w", sideName(side), err)
		}
	}
	return nil
}

// sideEntry is one side's entry as the reconciler sees it. Decoding the
// payload as T, the costly part, is done only when needed.
type sideEntry struct {
	ok        bool // a usable envelope (decoding as T still to be checked)
	negative  bool
	payload   []byte
	version   uint64
	expiresAt int64

	decodedT  bool // canonical was computed
	valid     bool // the payload decodes as T
	canonical []byte
}

func entryOf(r record, now int64) sideEntry {
	if r.env == nil {
		return sideEntry{}
	}
	h, payload, err := envelope.Decode(r.env)
	if err != nil || h.ExpiresAt <= now {
		return sideEntry{}
	}
	return sideEntry{ok: true, negative: h.Negative(), payload: payload, version: h.WriteVersion, expiresAt: h.ExpiresAt}
}

// usable reports whether e would be served: a negative entry, or a
// payload that decodes; it computes e's canonical encoding (decoded and
// encoded again).
func (r *reconciler) usable(e *sideEntry) bool {
	if !e.ok {
		return false
	}
	if e.negative {
		return true
	}
	if !e.decodedT {
		e.decodedT = true
		e.canonical, e.valid = r.canon(e.payload)
	}
	return e.valid
}

type comparison uint8

const (
	neither comparison = iota
	matched
	mismatched
	onlyOld
	onlyNew
)

// sameEntry compares two sides' entries by value: byte-equal payloads
// match without decoding; others are decoded as T and encoded again, so
// that two encodings of one value (legacy JSON with other spacing or field
// order) match. An entry that does not decode as T counts as absent, as it
// does for reads.
func (r *reconciler) sameEntry(o, n *sideEntry) comparison {
	if o.ok && n.ok && o.negative == n.negative && bytes.Equal(o.payload, n.payload) {
		return matched
	}
	ou, nu := r.usable(o), r.usable(n)
	switch {
	case !ou && !nu:
		return neither
	case !nu:
		return onlyOld
	case !ou:
		return onlyNew
	case o.negative || n.negative:
		if o.negative == n.negative {
			return matched
		}
		return mismatched
	case bytes.Equal(o.canonical, n.canonical):
		return matched
	}
	return mismatched
}

// ---- scanning one side ----

// scanPos is a position in a reconcile: which side, which node (or hash
// shard), the SCAN cursor there, and how many keys of the page at that
// cursor were already done.
type scanPos struct {
	side   int
	node   int    // master index (key-per-entry, raw) or shard (hash)
	addr   string // the master's address, checked on resume
	cursor uint64
	skip   int
}

const cursorPrefix = "rc1"

// String encodes the position as an opaque resume cursor.
func (p scanPos) String() string {
	return strings.Join([]string{cursorPrefix, strconv.Itoa(p.side), strconv.Itoa(p.node),
		strconv.FormatUint(p.cursor, 10), strconv.Itoa(p.skip), p.addr}, ":")
}

func parseReconcileCursor(s string) (scanPos, error) {
	if s == "" {
		return scanPos{}, nil
	}
	bad := fmt.Errorf("%w: ReconcileOptions.Cursor %q is not a cursor from a ReconcileReport", ErrInvalidOption, s)
	f := strings.SplitN(s, ":", 6)
	if len(f) != 6 || f[0] != cursorPrefix {
		return scanPos{}, bad
	}
	var p scanPos
	var err [4]error
	p.side, err[0] = strconv.Atoi(f[1])
	p.node, err[1] = strconv.Atoi(f[2])
	p.cursor, err[2] = strconv.ParseUint(f[3], 10, 64)
	p.skip, err[3] = strconv.Atoi(f[4])
	p.addr = f[5]
	for _, e := range err {
		if e != nil {
			return scanPos{}, bad
		}
	}
	if p.side < 0 || p.side > 1 || p.node < 0 || p.skip < 0 {
		return scanPos{}, bad
	}
	return p, nil
}

// keyLister lists the user keys of one layout store: SCAN of every master
// with a pattern and a parser (key per entry, Raw), or HSCAN of every hash
// (Hash). A store makes its own (layoutStore.lister).
type keyLister struct {
	client redis.UniversalClient
	nodes  []*redis.Client // SCAN: the masters
	hashes []string        // HSCAN: the hash keys
	match  string
	parse  func(redisKey string) (string, bool)
}

// scanLister lists the keys matching match on every master, parsed back
// into user keys.
func scanLister(ctx context.Context, client redis.UniversalClient, match string, parse func(string) (string, bool)) (*keyLister, error) {
	nodes, err := masterNodes(ctx, client)
	if err != nil {
		return nil, err
	}
	return &keyLister{client: client, nodes: nodes, match: match, parse: parse}, nil
}

func (sc *keyLister) size() int {
	if sc.hashes != nil {
		return len(sc.hashes)
	}
	return len(sc.nodes)
}

func (sc *keyLister) done(p scanPos) bool { return p.node >= sc.size() }

// check refuses a resume cursor whose node list no longer matches.
func (sc *keyLister) check(p scanPos) error {
	if p.node > sc.size() || sc.hashes == nil && p.node < len(sc.nodes) && p.addr != "" && p.addr != sc.nodes[p.node].Options().Addr {
		return fmt.Errorf("%w: the reconcile cursor refers to a node that is no longer a master at that position (the topology changed); start again with an empty cursor", ErrInvalidOption)
	}
	return nil
}

// page returns the user keys of one SCAN/HSCAN step at p, and the position
// after it.
func (sc *keyLister) page(ctx context.Context, p scanPos, count int) ([]string, scanPos, error) {
	next := scanPos{side: p.side, node: p.node}
	var keys []string
	if sc.hashes != nil {
		kv, cur, err := sc.client.HScan(ctx, sc.hashes[p.node], p.cursor, "", int64(count)).Result()
		if err != nil {
			return nil, p, fmt.Errorf("layercache: reconcile: hscan %s: %w", sc.hashes[p.node], err)
		}
		for i := 0; i < len(kv); i += 2 {
			keys = append(keys, kv[i])
		}
		next.cursor = cur
	} else {
		node := sc.nodes[p.node]
		found, cur, err := node.Scan(ctx, p.cursor, sc.match, int64(count)).Result()
		if err != nil {
			return nil, p, fmt.Errorf("layercache: reconcile: scan %s: %w", sc.addr(p.node), err)
		}
		for _, rk := range found {
			if k, ok := sc.parse(rk); ok {
				keys = append(keys, k)
			}
		}
		next.cursor = cur
	}
	if next.cursor == 0 {
		next.node++
	}
	next.addr = sc.addr(next.node)
	return keys, next, nil
}

// addr is the address of master i, recorded in cursors; "" for hash
// shards and past the end.
func (sc *keyLister) addr(i int) string {
	if sc.hashes == nil && i < len(sc.nodes) {
		return sc.nodes[i].Options().Addr
	}
	return ""
}
