package layercache

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"github.com/layercache/layercache/internal/envelope"
	"github.com/layercache/layercache/internal/scripts"
	"github.com/redis/go-redis/v9"
)

// Lease operations of the Hash and Raw layouts and of the dual store (the
// key-per-entry ones are in store_lease.go). In every layout a key's lease
// and notice channel carry its value's hash tag, so every script stays in
// one Cluster slot:
//
//	key per entry  ns:ver:{key}:lease             ns:ver:{key}:notice
//	Hash(n)        <shard hash>:lease:<key>       <shard hash>:notice:<key>
//	Raw(pattern)   {<raw key>}\xfflc:lease         {<raw key>}\xfflc:notice
//
// (for a raw key with a hash tag of its own, the suffix is appended to it).
// Fills and overwrites are fresh versioned writes, like set.

// leaseWriteResult reads a fill or overwrite script's reply: the stored
// version (8 bytes) when it wrote, 0 when the lease was lost.
func leaseWriteResult(cmd *redis.Cmd) (uint64, bool, error) {
	v, err := cmd.Result()
	if errors.Is(err, redis.Nil) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, err
	}
	switch v := v.(type) {
	case string:
		if len(v) == 8 {
			return binary.BigEndian.Uint64([]byte(v)), true, nil
		}
	case int64:
		if v == 0 {
			return 0, false, nil
		}
	}
	return 0, false, fmt.Errorf("layercache: lease write script returned %v (%T), want a version or 0", v, v)
}

// ---- copy fences ----

// fenceTTL bounds how long a copy may take from the arming of its fence
// to its write; a later copy is dropped, which costs at most a miss.
const fenceTTL = 10 * time.Second

// armFence adds token to a copy fence (see scripts.Arm).
func armFence(ctx context.Context, client redis.UniversalClient, fence, token string) error {
	return scripts.Arm.Run(ctx, client, []string{fence}, token, fenceTTL.Milliseconds()).Err()
}

// armThenRead arms a copy fence and then runs read, a version read in the
// fence's slot, in one MULTI: one round trip, and the fence is in place
// before the version is read, so a Delete after the read voids the copy.
func armThenRead(ctx context.Context, client redis.UniversalClient, fence, token string, stamp bool, read func(redis.Pipeliner) *redis.StringCmd) (uint64, error) {
	var cmd *redis.StringCmd
	_, err := client.TxPipelined(ctx, func(p redis.Pipeliner) error {
		p.SAdd(ctx, fence, token)
		p.PExpire(ctx, fence, fenceTTL)
		cmd = read(p)
		return nil
	})
	if err != nil && !errors.Is(err, redis.Nil) {
		return 0, err
	}
	b, err := cmd.Bytes()
	return versionReply(b, err, stamp)
}

// ---- key per entry: versioned fill and overwrite ----

func (s *keyPerEntryStore) fillVersioned(ctx context.Context, key, token string, env []byte, ttl time.Duration) (uint64, bool, error) {
	return leaseWriteResult(scripts.Fill.Run(ctx, s.client, s.leaseKeys(key), token, env, physicalTTL(ttl).Milliseconds(),
		publishCommand(s.client), s.noticeChannel(key)))
}

func (s *keyPerEntryStore) overwrite(ctx context.Context, key string, env []byte, ttl time.Duration) (uint64, error) {
	v, _, err := leaseWriteResult(scripts.Overwrite.Run(ctx, s.client, s.leaseKeys(key), env, physicalTTL(ttl).Milliseconds(),
		publishCommand(s.client), s.noticeChannel(key)))
	return v, err
}

func (s *keyPerEntryStore) breakLease(ctx context.Context, key string) error {
	return scripts.BreakLease.Run(ctx, s.client, s.leaseKeys(key), publishCommand(s.client), s.noticeChannel(key)).Err()
}

// ---- hash ----

// leaseKeys returns the shard hash and the key's lease.
func (s *hashStore) leaseKeys(key string) []string {
	shard := s.shardOf(key)
	return []string{shard, shard + ":lease:" + key}
}

func (s *hashStore) noticeChannel(key string) string { return s.shardOf(key) + ":notice:" + key }

func (s *hashStore) acquireLease(ctx context.Context, key, token string, ttl time.Duration, read bool) (leaseAttempt, error) {
	res, err := scripts.HashAcquire.Run(ctx, s.client, s.leaseKeys(key), token, physicalTTL(ttl).Milliseconds(), boolArg(read), key).Slice()
	if err != nil {
		return leaseAttempt{}, err
	}
	return parseLeaseAttempt(res)
}

func (s *hashStore) renewLease(ctx context.Context, key, token string, ttl time.Duration) (bool, error) {
	n, err := scripts.Renew.Run(ctx, s.client, s.leaseKeys(key), token, physicalTTL(ttl).Milliseconds()).Int()
	return n == 1, err
}

func (s *hashStore) fillLeased(ctx context.Context, key, token string, env []byte, ttl time.Duration) (bool, error) {
	_, ok, err := s.fillVersioned(ctx, key, token, env, ttl)
	return ok, err
}

func (s *hashStore) fillVersioned(ctx context.Context, key, token string, env []byte, ttl time.Duration) (uint64, bool, error) {
	return leaseWriteResult(scripts.HashFill.Run(ctx, s.client, s.leaseKeys(key), token, env, ttlMillis(ttl),
		publishCommand(s.client), s.noticeChannel(key), key, s.now()))
}

func (s *hashStore) releaseLease(ctx context.Context, key, token string) error {
	return scripts.Release.Run(ctx, s.client, s.leaseKeys(key), token, publishCommand(s.client), s.noticeChannel(key)).Err()
}

func (s *hashStore) setBreakingLease(ctx context.Context, key string, env []byte, ttl time.Duration) error {
	_, err := s.overwrite(ctx, key, env, ttl)
	return err
}

func (s *hashStore) overwrite(ctx context.Context, key string, env []byte, ttl time.Duration) (uint64, error) {
	v, _, err := leaseWriteResult(scripts.HashOverwrite.Run(ctx, s.client, s.leaseKeys(key), env, ttlMillis(ttl),
		publishCommand(s.client), s.noticeChannel(key), key, s.now()))
	return v, err
}

func (s *hashStore) breakLease(ctx context.Context, key string) error {
	return scripts.BreakLease.Run(ctx, s.client, s.leaseKeys(key), publishCommand(s.client), s.noticeChannel(key)).Err()
}

// ---- raw ----

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

// ---- dual ----

// The dual store takes leases on the side that is authoritative in the
// current phase (see authority): every instance in one phase, or in two
// adjacent phases but across the read-old-first / read-new-first switch,
// uses the same lease. Across that switch two instances may hold leases
// on different sides for a moment; so a dual Set also breaks the second
// side's lease, a fill that finds no lease of its own on the authoritative
// side releases the token on the other side too, and renewals and
// releases try both sides. Waiters who watch the other side's channel
// during a switch look again when the lease they wait for would expire.

func (d *dualStore) leaseSide() int { return authority(Phase(d.mig.phase.Load())) }

func (d *dualStore) acquireLease(ctx context.Context, key, token string, ttl time.Duration, read bool) (leaseAttempt, error) {
	p, err := d.mig.current(ctx)
	if err != nil {
		return leaseAttempt{}, err
	}
	return d.sides[authority(p)].acquireLease(ctx, key, token, ttl, read)
}

func (d *dualStore) renewLease(ctx context.Context, key, token string, ttl time.Duration) (bool, error) {
	side := d.leaseSide()
	ok, err := d.sides[side].renewLease(ctx, key, token, ttl)
	if err == nil && !ok {
		ok, err = d.sides[1-side].renewLease(ctx, key, token, ttl)
	}
	return ok, err
}

func (d *dualStore) releaseLease(ctx context.Context, key, token string) error {
	return errors.Join(d.sides[sideOld].releaseLease(ctx, key, token), d.sides[sideNew].releaseLease(ctx, key, token))
}

func (d *dualStore) noticeChannel(key string) string {
	return d.sides[d.leaseSide()].noticeChannel(key)
}

// fillLeased fills the authoritative side under the lease, as write does a
// fresh write (the other side's version read, or its copy taken, first),
// then copies the value to the other side in the dual phases. A failed
// copy is counted, not returned: the fill itself landed.
func (d *dualStore) fillLeased(ctx context.Context, key, token string, env []byte, ttl time.Duration) (bool, error) {
	p, err := d.mig.current(ctx)
	if err != nil {
		return false, err
	}
	first, second, single := authority(p), 1-authority(p), p == PhaseOld || p == PhaseNewOnly
	fence := newLeaseToken()
	if env, err = d.proposePastOther(ctx, key, env, second, single, fence); err != nil {
		return false, err
	}
	v, ok, err := d.sides[first].fillVersioned(ctx, key, token, env, ttl)
	if err != nil {
		if ctx.Err() == nil {
			d.mig.sides[first].errors.Add(1)
		}
		return false, err
	}
	if !ok {
		// Lost, or taken on the other side before a phase switch.
		_ = d.sides[second].releaseLease(ctx, key, token)
		return false, nil
	}
	d.mig.sides[first].writes.Add(1)
	if !single {
		// The lease guarded the first side only. A Delete may have run
		// since the fill (removing both sides and both leases); the copy
		// lands only if the fence armed with the version read survived
		// it, or the loaded value, older than the Delete, would come
		// back through the second side.
		_, _, _ = d.copySide(ctx, second, key, fence, withWriteVersion(env, v), ttl)
	}
	return true, nil
}

// setBreakingLease is write's fresh write with the authoritative side's
// lease broken in the same script; in the dual phases the second side's
// lease is broken first, since an instance still on the other side of a
// read-old-first / read-new-first switch may hold it.
func (d *dualStore) setBreakingLease(ctx context.Context, key string, env []byte, ttl time.Duration) error {
	p, err := d.mig.current(ctx)
	if err != nil {
		return err
	}
	first, second, single := authority(p), 1-authority(p), p == PhaseOld || p == PhaseNewOnly
	if !single {
		if err := d.sides[second].breakLease(ctx, key); err != nil {
			if ctx.Err() == nil {
				d.mig.sides[second].errors.Add(1)
			}
			return fmt.Errorf("%s side (%v): %w", sideName(second), d.sides[second].layout(), err)
		}
	}
	fence := newLeaseToken()
	if env, err = d.proposePastOther(ctx, key, env, second, single, fence); err != nil {
		return err
	}
	v, err := d.sides[first].overwrite(ctx, key, env, ttl)
	if err != nil {
		if ctx.Err() == nil {
			d.mig.sides[first].errors.Add(1)
		}
		return fmt.Errorf("%s side (%v): %w", sideName(first), d.sides[first].layout(), err)
	}
	d.mig.sides[first].writes.Add(1)
	if single {
		return nil
	}
	// Fenced: a Delete after the first side's write must not be undone
	// by this copy landing after it.
	_, _, err = d.copySide(ctx, second, key, fence, withWriteVersion(env, v), ttl)
	return err
}

// proposePastOther is the first step of a fresh write: read the version of
// the side not written first (dual phases) or take its copy (single-side
// phases), and raise env's proposal past it. In the dual phases it arms
// that side's copy fence with fence first, in the same round trip, for the
// copy that follows the first side's write (see copySide).
func (d *dualStore) proposePastOther(ctx context.Context, key string, env []byte, other int, single bool, fence string) ([]byte, error) {
	var v uint64
	var err error
	if single {
		if v, err = d.sides[other].take(ctx, key); err == nil {
			d.mig.sides[other].invalidations.Add(1)
		}
	} else {
		v, err = d.sides[other].armVersion(ctx, key, fence)
	}
	if err != nil {
		if ctx.Err() == nil {
			d.mig.sides[other].errors.Add(1)
		}
		return nil, fmt.Errorf("%s side (%v): %w", sideName(other), d.sides[other].layout(), err)
	}
	return proposePast(env, v), nil
}
