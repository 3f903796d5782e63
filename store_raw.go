package layercache

import (
	"context"
	"crypto/sha1"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/layercache/layercache/internal/envelope"
	"github.com/layercache/layercache/internal/scripts"
	"github.com/redis/go-redis/v9"
)

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

// leaseKeys returns the raw key, its stamp and its lease.
func (s *rawStore) leaseKeys(key string) ([]string, error) {
	raw, stamp, err := s.keysOf(key)
	if err != nil {
		return nil, err
	}
	lease, _ := companion(raw, rawLeaseSuffix)
	return []string{raw, stamp, lease}, nil
}

// noticeChannel is in the raw key's slot. For a key that cannot have
// companions the channel is never used: every lease operation on it
// fails first with ErrInvalidKey.
func (s *rawStore) noticeChannel(key string) string {
	ch, err := companion(s.rawKey(key), rawNoticeSuffix)
	if err != nil {
		return s.rawKey(key) + rawNoticeSuffix
	}
	return ch
}

func (s *rawStore) acquireLease(ctx context.Context, key, token string, ttl time.Duration, read bool) (leaseAttempt, error) {
	keys, err := s.leaseKeys(key)
	if err != nil {
		return leaseAttempt{}, err
	}
	res, err := scripts.RawAcquire.Run(ctx, s.client, keys, token, physicalTTL(ttl).Milliseconds(), boolArg(read)).Slice()
	if err != nil {
		return leaseAttempt{}, err
	}
	if len(res) != 6 {
		return leaseAttempt{}, fmt.Errorf("layercache: raw lease script returned %d values, want 6", len(res))
	}
	var parts rawParts
	var ints [4]int64
	for i, j := range []int{1, 3, 4, 5} {
		n, ok := res[j].(int64)
		if !ok {
			return leaseAttempt{}, fmt.Errorf("layercache: raw lease script returned a %T, want an integer", res[j])
		}
		ints[i] = n
	}
	if v, ok := res[0].(string); ok {
		parts.payload = []byte(v)
	}
	if v, ok := res[2].(string); ok {
		parts.stamp = []byte(v)
	}
	parts.pttl, parts.stampTTL = redisTTL(ints[0]), redisTTL(ints[1])
	a := leaseAttempt{acquired: ints[2] == 1}
	if ints[3] > 0 {
		a.heldFor = time.Duration(ints[3]) * time.Millisecond
	}
	if read {
		a.env = s.decode(parts).env
	}
	return a, nil
}

// redisTTL converts a PTTL reply as go-redis does: -1 and -2 stay as they
// are (no expiry, no key), other values are milliseconds.
func redisTTL(ms int64) time.Duration {
	if ms < 0 {
		return time.Duration(ms)
	}
	return time.Duration(ms) * time.Millisecond
}

func (s *rawStore) renewLease(ctx context.Context, key, token string, ttl time.Duration) (bool, error) {
	keys, err := s.leaseKeys(key)
	if err != nil {
		return false, err
	}
	n, err := scripts.Renew.Run(ctx, s.client, []string{keys[0], keys[2]}, token, physicalTTL(ttl).Milliseconds()).Int()
	return n == 1, err
}

func (s *rawStore) releaseLease(ctx context.Context, key, token string) error {
	keys, err := s.leaseKeys(key)
	if err != nil {
		return err
	}
	return scripts.Release.Run(ctx, s.client, []string{keys[0], keys[2]}, token, publishCommand(s.client), s.noticeChannel(key)).Err()
}

func (s *rawStore) breakLease(ctx context.Context, key string) error {
	keys, err := s.leaseKeys(key)
	if err != nil {
		return err
	}
	return scripts.BreakLease.Run(ctx, s.client, []string{keys[0], keys[2]}, publishCommand(s.client), s.noticeChannel(key)).Err()
}

// rawWriteArgs returns the payload, version, TTL and negative flag of a
// raw write of env.
func rawWriteArgs(key string, env []byte, now int64) (payload, version []byte, ms int64, negative string, err error) {
	h, p, err := envelope.Decode(env)
	if err != nil {
		return nil, nil, 0, "", fmt.Errorf("layercache: raw write of %q: %w", key, err)
	}
	var v [8]byte
	binary.BigEndian.PutUint64(v[:], h.WriteVersion)
	return p, v[:], ttlMillis(rawTTL(h, now)), boolArg(h.Negative()), nil
}

func (s *rawStore) fillLeased(ctx context.Context, key, token string, env []byte, ttl time.Duration) (bool, error) {
	_, ok, err := s.fillVersioned(ctx, key, token, env, ttl)
	return ok, err
}

func (s *rawStore) fillVersioned(ctx context.Context, key, token string, env []byte, ttl time.Duration) (uint64, bool, error) {
	keys, err := s.leaseKeys(key)
	if err != nil {
		return 0, false, err
	}
	payload, v, ms, neg, err := rawWriteArgs(key, env, s.now())
	if err != nil {
		return 0, false, err
	}
	return leaseWriteResult(scripts.RawFill.Run(ctx, s.client, keys, token, payload, v, ms, neg,
		publishCommand(s.client), s.noticeChannel(key)))
}

func (s *rawStore) setBreakingLease(ctx context.Context, key string, env []byte, ttl time.Duration) error {
	_, err := s.overwrite(ctx, key, env, ttl)
	return err
}

func (s *rawStore) overwrite(ctx context.Context, key string, env []byte, ttl time.Duration) (uint64, error) {
	keys, err := s.leaseKeys(key)
	if err != nil {
		return 0, err
	}
	payload, v, ms, neg, err := rawWriteArgs(key, env, s.now())
	if err != nil {
		return 0, err
	}
	ver, _, err := leaseWriteResult(scripts.RawOverwrite.Run(ctx, s.client, keys, payload, v, ms, neg,
		publishCommand(s.client), s.noticeChannel(key)))
	return ver, err
}
