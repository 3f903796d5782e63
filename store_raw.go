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
// its edge: reads return an envelope synthesised from the payload, the
// key's TTL and its version stamp; writes take an envelope, and the
// scripts store its payload and stamp.
type rawStore struct {
	keyed
	l   Layout
	ttl time.Duration // freshness of a raw key without a TTL
}

var _ layoutStore = (*rawStore)(nil)

func newRawStore(client redis.UniversalClient, l Layout, now func() int64, ttl time.Duration) *rawStore {
	s := &rawStore{keyed: newKeyed(client, now), l: l, ttl: ttl}
	s.locate = s.at
	s.writeTTL = s.freshTTL
	s.synth = func(r *acquireReply) []byte {
		return s.decode(rawParts{payload: r.value, stamp: r.stamp, pttl: r.valueTTL, stampTTL: r.stampTTL}).env
	}
	return s
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

// companionBase returns what a companion suffix is appended to so that
// the companion shares rawKey's Cluster slot: rawKey itself when it has a
// hash tag (appending keeps it), {rawKey} when it has none (the whole key
// becomes the tag, which hashes as the untagged key did). A '}' outside a
// valid tag makes that impossible.
func companionBase(rawKey string) (string, error) {
	if i := strings.IndexByte(rawKey, '{'); i >= 0 {
		if j := strings.IndexByte(rawKey[i+1:], '}'); j > 0 {
			return rawKey, nil
		}
	}
	if strings.IndexByte(rawKey, '}') >= 0 {
		return "", fmt.Errorf("%w: raw key %q has a '}' outside a hash tag, so its version stamp and lease cannot share its Cluster slot", ErrInvalidKey, rawKey)
	}
	return "{" + rawKey + "}", nil
}

// at locates key: the raw key, its lease, copy fence and stamp, and its
// notice channel. Keys whose companions cannot share their slot, or whose
// raw key is another key's companion, are refused with ErrInvalidKey.
func (s *rawStore) at(key string) (loc, error) {
	raw := s.rawKey(key)
	if isCompanion(raw) {
		// Key "{42}\xfflc:wv" with Raw("product:%s") would be
		// product:{42}\xfflc:wv, the stamp of key "{42}": reading or
		// writing it would corrupt another key's bookkeeping.
		return loc{}, fmt.Errorf("%w: raw key %q ends like a companion key (version stamp, lease, notice or copy fence) of another key", ErrInvalidKey, raw)
	}
	base, err := companionBase(raw)
	if err != nil {
		return loc{}, err
	}
	return loc{
		keys:     []string{raw, base + rawLeaseSuffix, base + rawFenceSuffix, base + rawStampSuffix},
		layout:   "r",
		chBase:   base,
		chSuffix: rawNoticeSuffix,
	}, nil
}

// noticeChannel is in the raw key's slot. For a key that cannot have
// companions the channel is never used: every lease operation on it
// fails first with ErrInvalidKey.
func (s *rawStore) noticeChannel(key string) string {
	raw := s.rawKey(key)
	base, err := companionBase(raw)
	if err != nil {
		return raw + rawNoticeSuffix
	}
	return base + rawNoticeSuffix
}

// freshTTL is the Redis TTL of a raw write of env: what is left of the
// entry's fresh life, since code reading the raw key (and this cache's Raw
// reads) take the key's TTL as freshness and have no notion of a stale
// grace. ok is false for a copy (backfill, dual copy, repair) of a value
// already stale: written, it would turn stale into fresh.
func (s *rawStore) freshTTL(env []byte, _ time.Duration, copy bool) (time.Duration, bool) {
	h, _, err := envelope.Decode(env)
	if err != nil {
		return 0, false
	}
	ttl := time.Duration(h.FreshUntil-s.now()) * time.Millisecond
	return ttl, ttl > 0 || !copy
}

// del deletes keys like every layout does; a key refused for having no
// slot for its companions has none to delete, and its raw key, which may
// hold a value other code wrote, is deleted alone. One refused for looking
// like a companion is left alone: its raw key is another key's stamp,
// lease or fence.
func (s *rawStore) del(ctx context.Context, keys []string) error {
	var ok, plain []string
	for _, k := range keys {
		rk := s.rawKey(k)
		switch {
		case isCompanion(rk):
		case strings.IndexByte(rk, '}') >= 0:
			if _, err := companionBase(rk); err != nil {
				plain = append(plain, rk)
				continue
			}
			ok = append(ok, k)
		default:
			ok = append(ok, k)
		}
	}
	err := s.keyed.del(ctx, ok)
	if len(plain) > 0 {
		cmds, _ := s.client.Pipelined(ctx, func(p redis.Pipeliner) error {
			for _, rk := range plain {
				p.Del(ctx, rk)
			}
			return nil
		})
		err = errors.Join(err, firstErr(cmds))
	}
	return err
}

// rawReads are the commands of one raw read: value, TTL, stamp, stamp TTL.
type rawReads struct {
	val, stamp       *redis.StringCmd
	valTTL, stampTTL *redis.DurationCmd
	err              error
}

func (s *rawStore) queueRead(ctx context.Context, p redis.Pipeliner, key string) rawReads {
	l, err := s.at(key)
	if err != nil {
		return rawReads{err: err}
	}
	raw, stamp := l.keys[0], l.keys[3]
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
	out := make([]record, len(keys))
	var errs []error
	for i, r := range reads {
		if r.err != nil {
			continue // refused key (see at): nothing stored for it
		}
		if e := firstErr([]redis.Cmder{r.val, r.valTTL, r.stamp, r.stampTTL}); e != nil {
			errs = append(errs, e)
			continue
		}
		out[i] = s.decode(r.parts())
	}
	if len(errs) == 0 && err != nil && !errors.Is(err, redis.Nil) {
		errs = append(errs, err)
	}
	return out, errors.Join(errs...)
}

func (s *rawStore) getMany(ctx context.Context, keys []string) ([][]byte, error) {
	recs, err := s.readMany(ctx, keys)
	return envs(recs), err
}

func (s *rawStore) exists(ctx context.Context, keys []string) ([]bool, error) {
	return existsMany(ctx, s.client, keys,
		func(p redis.Pipeliner, k string) *redis.IntCmd { return p.Exists(ctx, s.rawKey(k)) },
		func(n int64) bool { return n == 1 })
}

func (s *rawStore) lister(ctx context.Context) (*keyLister, error) {
	return scanLister(ctx, s.client, globEscape(s.l.prefix)+"*"+globEscape(s.l.suffix), s.userKey)
}
