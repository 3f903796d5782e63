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
// the current phase says.
type dualStore struct {
	sides [2]layoutStore // old, new
	mig   *migration
	now   func() int64
}

// authority returns the side that is authoritative in phase p: the one
// read first, written first, and copied from by a repair.
func authority(p Phase) int {
	if p >= PhaseReadNewFirst {
		return sideNew
	}
	return sideOld
}

func (d *dualStore) get(ctx context.Context, key string) ([]byte, error) {
	p, err := d.mig.current(ctx)
	if err != nil {
		return nil, err
	}
	switch p {
	case PhaseOld, PhaseDualWrite:
		b, _, err := d.read(ctx, sideOld, key, false)
		return b, err
	case PhaseNewOnly:
		b, _, err := d.read(ctx, sideNew, key, false)
		return b, err
	}
	pref := authority(p)
	alt := 1 - pref
	b, hit, perr := d.read(ctx, pref, key, false)
	if hit {
		return b, nil
	}
	// Arm the preferred side's copy fence before the fallback read: a
	// Delete after that read removes the fence with both sides, and the
	// backfill, fenced, is dropped instead of writing the deleted value
	// back (set-if-newer alone would let it into the emptied key). One
	// more round trip, on the fallback path only.
	var fence string
	if perr == nil {
		fence = newLeaseToken()
		if err := d.sides[pref].arm(ctx, key, fence); err != nil {
			if ctx.Err() == nil {
				d.mig.sides[pref].errors.Add(1)
			}
			fence = ""
		}
	}
	ab, ahit, aerr := d.read(ctx, alt, key, true)
	if !ahit {
		if perr != nil {
			return nil, perr
		}
		if aerr != nil {
			return nil, aerr
		}
		return b, nil // the preferred side's miss, as it was (absent or expired)
	}
	if fence != "" {
		d.backfill(ctx, pref, key, fence, ab)
	}
	return ab, nil
}

// read reads one side and counts it. hit is true for a usable envelope.
func (d *dualStore) read(ctx context.Context, side int, key string, fallback bool) ([]byte, bool, error) {
	s := &d.mig.sides[side]
	b, err := d.sides[side].get(ctx, key)
	// Counted when done, so that a snapshot never shows reads without
	// their outcome.
	s.reads.Add(1)
	if fallback {
		s.fallbacks.Add(1)
	}
	if err != nil {
		if ctx.Err() == nil {
			s.errors.Add(1)
		}
		return nil, false, err
	}
	if usable(b, d.now()) {
		s.hits.Add(1)
		return b, true, nil
	}
	s.misses.Add(1)
	return b, false, nil
}

// backfill copies env, found on the other side, into side: set-if-newer,
// so that it never replaces a write that landed after the fallback read,
// and fenced by fence, armed before that read, so that it never lands
// after a Delete that followed the read.
func (d *dualStore) backfill(ctx context.Context, side int, key, fence string, env []byte) {
	h, _, err := envelope.Decode(env)
	if err != nil {
		return
	}
	ttl := time.Duration(h.ExpiresAt-d.now()) * time.Millisecond
	if ttl <= 0 {
		return
	}
	s := &d.mig.sides[side]
	_, ok, err := d.sides[side].copyFenced(ctx, key, fence, env, ttl)
	switch {
	case err != nil:
		if ctx.Err() == nil {
			s.errors.Add(1)
		}
	case ok:
		s.backfills.Add(1)
	}
}

func (d *dualStore) set(ctx context.Context, key string, env []byte, ttl time.Duration) error {
	_, _, err := d.write(ctx, key, env, ttl, writeFresh)
	return err
}

// write applies a write as the phase says.
//
// Write versions come from the writers' clocks, which may disagree, so a
// fresh write must be proposed past whatever the side it does not write
// first holds; otherwise, landing on an empty first side, it could get a
// version below an older value on the other side, lose its copy there and
// lose to a backfill of that older value. Hence:
//
//   - Dual phases: read the second side's version, write the first
//     (authoritative) side fresh, proposing past it, then copy the same
//     envelope, with the version the first side stored, to the second
//     side set-if-newer. Three round trips. Retried or reordered dual
//     writes leave both sides at the highest version either applied.
//   - Single-side phases: take the other side's copy (delete it, reading
//     its version, in one script), then write the active side fresh,
//     proposing past it. Two round trips. The other side is left without
//     the key, never with an older value.
//
// Copies (mode writeCopy: upgrades) are set-if-newer on every side they
// go to and need neither step. A write fails if any step fails; the
// caller learns that the sides may differ, which a reconcile repairs.
func (d *dualStore) write(ctx context.Context, key string, env []byte, ttl time.Duration, mode writeMode) (uint64, bool, error) {
	p, err := d.mig.current(ctx)
	if err != nil {
		return 0, false, err
	}
	first := authority(p)
	second := 1 - first
	single := p == PhaseOld || p == PhaseNewOnly
	var fence string
	if mode == writeFresh {
		fence = newLeaseToken()
		if env, err = d.proposePastOther(ctx, key, env, second, single, fence); err != nil {
			return 0, false, err
		}
	}
	v, ok, err := d.writeSide(ctx, first, key, env, ttl, mode)
	if err != nil || !ok || single {
		return v, ok, err
	}
	if v != headerVersion(env) {
		env = withWriteVersion(env, v)
	}
	if fence == "" {
		_, _, err = d.writeSide(ctx, second, key, env, ttl, writeCopy)
	} else {
		// A Delete between the first side's write and this copy
		// deleted the fence armed with the version read: the copy
		// must not bring the value back on the second side.
		_, _, err = d.copySide(ctx, second, key, fence, env, ttl)
	}
	return v, ok, err
}

// copySide is writeSide for a fenced copy (see layoutStore.copyFenced).
func (d *dualStore) copySide(ctx context.Context, side int, key, fence string, env []byte, ttl time.Duration) (uint64, bool, error) {
	s := &d.mig.sides[side]
	v, ok, err := d.sides[side].copyFenced(ctx, key, fence, env, ttl)
	if err != nil {
		if ctx.Err() == nil {
			s.errors.Add(1)
		}
		return v, ok, fmt.Errorf("%s side (%v): %w", sideName(side), d.sides[side].layout(), err)
	}
	if ok {
		s.writes.Add(1)
	}
	return v, ok, nil
}

// arm arms key's copy fence on every side a copy (write in writeCopy
// mode, as upgrade on read does) goes to in the current phase; see
// copyFenced.
func (d *dualStore) arm(ctx context.Context, key, token string) error {
	p, err := d.mig.current(ctx)
	if err != nil {
		return err
	}
	if p == PhaseOld || p == PhaseNewOnly {
		return d.sides[authority(p)].arm(ctx, key, token)
	}
	return errors.Join(d.sides[sideOld].arm(ctx, key, token), d.sides[sideNew].arm(ctx, key, token))
}

// copyFenced is write in writeCopy mode with every side's copy fenced by
// token, armed by arm before the copied value was read.
func (d *dualStore) copyFenced(ctx context.Context, key, token string, env []byte, ttl time.Duration) (uint64, bool, error) {
	p, err := d.mig.current(ctx)
	if err != nil {
		return 0, false, err
	}
	first := authority(p)
	v, ok, err := d.copySide(ctx, first, key, token, env, ttl)
	if err != nil || !ok || p == PhaseOld || p == PhaseNewOnly {
		return v, ok, err
	}
	_, _, err = d.copySide(ctx, 1-first, key, token, env, ttl)
	return v, ok, err
}

// proposePast returns env with its proposed write version raised, if
// needed, to one counter step past other (keeping env's writer id).
func proposePast(env []byte, other uint64) []byte {
	p := headerVersion(env)
	if other>>16 < p>>16 {
		return env
	}
	return withWriteVersion(env, (other>>16+1)<<16|p&0xffff)
}

func (d *dualStore) writeSide(ctx context.Context, side int, key string, env []byte, ttl time.Duration, mode writeMode) (uint64, bool, error) {
	s := &d.mig.sides[side]
	v, ok, err := d.sides[side].write(ctx, key, env, ttl, mode)
	if err != nil {
		if ctx.Err() == nil {
			s.errors.Add(1)
		}
		return v, ok, fmt.Errorf("%s side (%v): %w", sideName(side), d.sides[side].layout(), err)
	}
	if ok {
		s.writes.Add(1)
	}
	return v, ok, nil
}

// del deletes from both sides in every phase: a value left on the side
// not read now would come back, stale, on the next phase change.
func (d *dualStore) del(ctx context.Context, keys []string) error {
	var errs []error
	for side := range d.sides {
		if err := d.sides[side].del(ctx, keys); err != nil {
			if ctx.Err() == nil {
				d.mig.sides[side].errors.Add(1)
			}
			errs = append(errs, fmt.Errorf("%s side: %w", sideName(side), err))
		}
	}
	return errors.Join(errs...)
}

func sideName(side int) string {
	if side == sideNew {
		return "new"
	}
	return "old"
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
