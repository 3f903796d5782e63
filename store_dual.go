package layercache

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/layercache/layercache/internal/envelope"
)

const (
	sideOld = 0
	sideNew = 1
)

// dualStore is the store of a migrating cache: two layout stores, used as
// the current phase says (see [Phase]).
//
// Leases are taken on the side that is authoritative in the current phase
// (see authority): every instance in one phase, or in two adjacent phases
// but across the read-old-first / read-new-first switch, uses the same
// lease. Across that switch two instances may hold leases on different
// sides for a moment; so a dual Set also breaks the second side's lease,
// a fill that finds no lease of its own on the authoritative side releases
// the token on the other side too, and renewals and releases try both
// sides. Waiters who watch the other side's channel during a switch look
// again when the lease they wait for would expire.
type dualStore struct {
	sides [2]layoutStore // old, new
	mig   *migration
	now   func() int64
}

var (
	_ store       = (*dualStore)(nil)
	_ sweepSource = (*dualStore)(nil)
)

// authority returns the side that is authoritative in phase p: the one
// read first, written first, and copied from by a repair.
func authority(p Phase) int {
	if p >= PhaseReadNewFirst {
		return sideNew
	}
	return sideOld
}

// singleSide reports whether p writes one side only.
func singleSide(p Phase) bool { return p == PhaseOld || p == PhaseNewOnly }

func sideName(side int) string {
	if side == sideNew {
		return "new"
	}
	return "old"
}

// sideErr counts a failed command on side (unless ctx ended: a cancelled
// caller is not a Redis failure) and names the side in the error.
func (d *dualStore) sideErr(ctx context.Context, side int, err error) error {
	if err == nil {
		return nil
	}
	if ctx.Err() == nil {
		d.mig.sides[side].add(evSideErrors, 1)
	}
	return fmt.Errorf("%s side (%v): %w", sideName(side), d.sides[side].layout(), err)
}

func (d *dualStore) sweepers() []sweeper {
	var out []sweeper
	for _, s := range d.sides {
		if ss, ok := s.(sweepSource); ok {
			out = append(out, ss.sweepers()...)
		}
	}
	return out
}

// reads returns the sides a read in phase p looks at: the preferred one,
// and the one it falls back on (-1 for none).
func reads(p Phase) (pref, alt int) {
	switch p {
	case PhaseOld, PhaseDualWrite:
		return sideOld, -1
	case PhaseNewOnly:
		return sideNew, -1
	}
	return authority(p), 1 - authority(p)
}

func (d *dualStore) get(ctx context.Context, key string) ([]byte, error) {
	envs, err := d.getMany(ctx, []string{key})
	if len(envs) == 1 {
		return envs[0], err
	}
	return nil, err
}

// getMany reads the preferred side, then, for the keys it missed (in the
// phases that fall back), arms the preferred side's copy fence, reads the
// other side, and backfills what it found: one round trip per step and
// slot group, on the fallback path only.
//
// The fence is armed before the fallback read: a Delete after that read
// removes the fence with both sides, and the backfill, fenced, is dropped
// instead of writing the deleted value back (set-if-newer alone would let
// it into the emptied key).
func (d *dualStore) getMany(ctx context.Context, keys []string) ([][]byte, error) {
	p, err := d.mig.current(ctx)
	if err != nil {
		return nil, err
	}
	pref, alt := reads(p)
	out, perr := getKeys(ctx, d.sides[pref], keys)
	now := d.now()
	var miss []int
	for i, env := range out {
		hit := envelope.Usable(env, now)
		d.countRead(pref, hit, false)
		if !hit && alt >= 0 {
			miss = append(miss, i)
		}
	}
	perr = d.sideErr(ctx, pref, perr)
	if len(miss) == 0 {
		return out, perr
	}
	missed := pick(keys, miss)
	// Without the fence, nothing is backfilled; the fallback still serves.
	fence := newLeaseToken()
	if perr != nil || d.sideErr(ctx, pref, d.sides[pref].armMany(ctx, missed, fence)) != nil {
		fence = ""
	}
	found, aerr := getKeys(ctx, d.sides[alt], missed)
	aerr = d.sideErr(ctx, alt, aerr)
	var backfills []writeOp
	unresolved := false
	for j, i := range miss {
		var env []byte
		if j < len(found) {
			env = found[j]
		}
		hit := envelope.Usable(env, now)
		d.countRead(alt, hit, true)
		if !hit {
			unresolved = true // the preferred side's miss stands (absent or expired)
			continue
		}
		out[i] = env
		if fence == "" {
			continue
		}
		// Set-if-newer, so that a write that landed after the fallback
		// read wins; fenced, so that a Delete that followed the read
		// voids it.
		if h, _, err := envelope.Decode(env); err == nil {
			if ttl := time.Duration(h.ExpiresAt-now) * time.Millisecond; ttl > 0 {
				backfills = append(backfills, writeOp{key: keys[i], env: env, ttl: ttl, w: writeOpts{copy: true, fence: fence}})
			}
		}
	}
	if len(backfills) > 0 {
		res, err := d.sides[pref].writeMany(ctx, backfills)
		for _, r := range res {
			if r.written {
				d.mig.sides[pref].add(evSideBackfills, 1)
			}
		}
		_ = d.sideErr(ctx, pref, err)
	}
	if unresolved {
		// A miss on a side that failed may not be one: say so.
		return out, errors.Join(perr, aerr)
	}
	return out, nil
}

// countRead counts one read of side. Counted when done, so that a
// snapshot never shows reads without their outcome.
func (d *dualStore) countRead(side int, hit, fallback bool) {
	s := &d.mig.sides[side]
	s.add(evSideReads, 1)
	if fallback {
		s.add(evSideFallbacks, 1)
	}
	if hit {
		s.add(evSideHits, 1)
	} else {
		s.add(evSideMisses, 1)
	}
}

// write applies a write as the phase says.
//
// Write versions come from the writers' clocks, which may disagree, so a
// fresh write must be proposed past whatever the side it does not write
// first holds; otherwise, landing on an empty first side, it could get a
// version below an older value on the other side, lose its copy there and
// lose to a backfill of that older value. Hence:
//
//   - Dual phases: read the second side's version (arming its copy fence in
//     the same step), write the first (authoritative) side fresh,
//     proposing past it, then copy the same envelope, with the version the
//     first side stored, to the second side, set-if-newer and fenced.
//     Three round trips. Retried or reordered dual writes leave both sides
//     at the highest version either applied; a Delete between the first
//     side's write and the copy deletes the fence, and the copy does not
//     bring the value back on the second side.
//   - Single-side phases: take the other side's copy (delete it, reading
//     its version, in one script), then write the active side fresh,
//     proposing past it. Two round trips. The other side is left without
//     the key, never with an older value.
//
// A write that breaks the lease (Set) in a dual phase breaks the second
// side's lease first, since an instance still on the other side of a
// read-old-first / read-new-first switch may hold it. A fill (w.lease)
// that finds its lease lost on the first side releases its token on the
// second. Copies (w.copy: upgrades) are set-if-newer on every side they go
// to and need neither step. A write fails if any step fails, but a fill's
// copy, once the fill landed, is only counted: the caller learns that the
// sides may differ, which a reconcile repairs.
func (d *dualStore) write(ctx context.Context, key string, env []byte, ttl time.Duration, w writeOpts) (writeResult, error) {
	p, err := d.mig.current(ctx)
	if err != nil {
		return writeResult{}, err
	}
	first, second, single := authority(p), 1-authority(p), singleSide(p)
	if w.copy {
		r, err := d.writeSide(ctx, first, key, env, ttl, w)
		if err != nil || !r.written || single {
			return r, err
		}
		_, err = d.writeSide(ctx, second, key, envelope.WithWriteVersion(env, r.version), ttl, w)
		return r, err
	}
	if w.breakLease && !single {
		if err := d.sideErr(ctx, second, d.sides[second].breakLease(ctx, key)); err != nil {
			return writeResult{}, err
		}
	}
	fence := newLeaseToken()
	if env, err = d.proposePastOther(ctx, key, env, second, single, fence); err != nil {
		return writeResult{}, err
	}
	r, err := d.writeSide(ctx, first, key, env, ttl, w)
	if err != nil {
		return r, err
	}
	if !r.written {
		if w.lease != "" {
			// Lost, or taken on the other side before a phase switch.
			_ = d.sides[second].releaseLease(ctx, key, w.lease)
		}
		return r, nil
	}
	if single {
		return r, nil
	}
	_, err = d.writeSide(ctx, second, key, envelope.WithWriteVersion(env, r.version), ttl, writeOpts{copy: true, fence: fence})
	if w.lease != "" {
		err = nil // the fill landed; the copy's failure is counted
	}
	return r, err
}

// writeSide writes one side and counts it.
func (d *dualStore) writeSide(ctx context.Context, side int, key string, env []byte, ttl time.Duration, w writeOpts) (writeResult, error) {
	r, err := d.sides[side].write(ctx, key, env, ttl, w)
	if err = d.sideErr(ctx, side, err); err == nil && r.written {
		d.mig.sides[side].add(evSideWrites, 1)
	}
	return r, err
}

// proposePastOther is the first step of a fresh write: read the version of
// the side not written first (dual phases) or take its copy (single-side
// phases), and raise env's proposal past it. In the dual phases it arms
// that side's copy fence with fence first, in the same step, for the copy
// that follows the first side's write.
func (d *dualStore) proposePastOther(ctx context.Context, key string, env []byte, other int, single bool, fence string) ([]byte, error) {
	var v uint64
	var err error
	if single {
		if v, err = d.sides[other].take(ctx, key); err == nil {
			d.mig.sides[other].add(evSideInvalidations, 1)
		}
	} else {
		v, err = d.sides[other].armVersion(ctx, key, fence)
	}
	if err := d.sideErr(ctx, other, err); err != nil {
		return nil, err
	}
	return envelope.ProposePast(env, v), nil
}

// writeMany applies copies side by side, in one round trip per side and
// slot group; fresh writes, each with its own steps, one at a time.
func (d *dualStore) writeMany(ctx context.Context, ops []writeOp) ([]writeResult, error) {
	out := make([]writeResult, len(ops))
	var copies []int
	var errs []error
	for i := range ops {
		if ops[i].w.copy {
			copies = append(copies, i)
			continue
		}
		r, err := d.write(ctx, ops[i].key, ops[i].env, ops[i].ttl, ops[i].w)
		out[i] = r
		errs = append(errs, err)
	}
	if len(copies) == 0 {
		return out, errors.Join(errs...)
	}
	p, err := d.mig.current(ctx)
	if err != nil {
		return out, errors.Join(append(errs, err)...)
	}
	first := authority(p)
	batch := make([]writeOp, len(copies))
	for j, i := range copies {
		batch[j] = ops[i]
	}
	res, err := d.writeSideMany(ctx, first, batch)
	errs = append(errs, err)
	var again []writeOp
	for j, i := range copies {
		out[i] = res[j]
		if res[j].written && !singleSide(p) {
			op := ops[i]
			op.env = envelope.WithWriteVersion(op.env, res[j].version)
			again = append(again, op)
		}
	}
	if len(again) > 0 {
		_, err = d.writeSideMany(ctx, 1-first, again)
		errs = append(errs, err)
	}
	return out, errors.Join(errs...)
}

func (d *dualStore) writeSideMany(ctx context.Context, side int, ops []writeOp) ([]writeResult, error) {
	res, err := d.sides[side].writeMany(ctx, ops)
	for _, r := range res {
		if r.written {
			d.mig.sides[side].add(evSideWrites, 1)
		}
	}
	return res, d.sideErr(ctx, side, err)
}

// armMany arms the copy fences of keys on every side a copy (write with
// writeOpts.copy, as upgrade on read does) goes to in the current phase.
func (d *dualStore) armMany(ctx context.Context, keys []string, token string) error {
	p, err := d.mig.current(ctx)
	if err != nil {
		return err
	}
	if singleSide(p) {
		return d.sides[authority(p)].armMany(ctx, keys, token)
	}
	return errors.Join(d.sides[sideOld].armMany(ctx, keys, token), d.sides[sideNew].armMany(ctx, keys, token))
}

// version is the higher of the two sides' versions.
func (d *dualStore) version(ctx context.Context, key string) (uint64, error) {
	a, err := d.sides[sideOld].version(ctx, key)
	if err != nil {
		return 0, err
	}
	b, err := d.sides[sideNew].version(ctx, key)
	return max(a, b), err
}

// del deletes from both sides in every phase: a value left on the side
// not read now would come back, stale, on the next phase change.
func (d *dualStore) del(ctx context.Context, keys []string) error {
	return errors.Join(
		d.sideErr(ctx, sideOld, d.sides[sideOld].del(ctx, keys)),
		d.sideErr(ctx, sideNew, d.sides[sideNew].del(ctx, keys)))
}

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
