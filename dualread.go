package layercache

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
)

// Phase is a step of a migration between two layouts. Every cache with the
// migration reads the phase from one control key in Redis (see [SetPhase])
// and follows a change within a second:
//
//	phase          writes                     reads
//	Old            old (new side invalidated) old
//	DualWrite      both, old first            old
//	ReadOldFirst   both, old first            old, else new (and backfill old)
//	ReadNewFirst   both, new first            new, else old (and backfill new)
//	NewOnly        new (old side invalidated) new
//
// Any phase may step back (rollback). While writes go to both sides, the
// old side stays complete enough for old code to run on it alone. In the
// single-write phases the other side's copy of a written key is deleted,
// so that it never holds a value older than the written one when reads
// come back to it; it is left incomplete, which a repairing [Cache.Reconcile]
// fills before reads depend on it alone (see the runbook in the README).
type Phase int32

// The phases of a migration, in order. A migration that was never set is
// in PhaseOld.
const (
	PhaseOld Phase = iota
	PhaseDualWrite
	PhaseReadOldFirst
	PhaseReadNewFirst
	PhaseNewOnly
)

var phaseNames = [...]string{"old", "dual-write", "read-old-first", "read-new-first", "new-only"}

// String returns the phase's name as stored in the control key: "old",
// "dual-write", "read-old-first", "read-new-first" or "new-only".
func (p Phase) String() string {
	if p.valid() {
		return phaseNames[p]
	}
	return fmt.Sprintf("Phase(%d)", int32(p))
}

func (p Phase) valid() bool { return p >= PhaseOld && p <= PhaseNewOnly }

// ParsePhase returns the phase named s (see [Phase.String]).
func ParsePhase(s string) (Phase, error) {
	for i, n := range phaseNames {
		if n == s {
			return Phase(i), nil
		}
	}
	return 0, fmt.Errorf("%w: unknown migration phase %q (want old, dual-write, read-old-first, read-new-first or new-only)", ErrInvalidOption, s)
}

// PhaseKey returns the Redis key that holds the phase of the migration
// name: "layercache-migration:{name}". A namespace may not contain '{', so
// it never collides with a cache's keys.
func PhaseKey(name string) string { return "layercache-migration:{" + name + "}" }

// SetPhase stores the phase of the migration name. Every cache built with
// [WithMigration](name, ...) on the same Redis follows it within a second.
// Any phase may follow any other; step one phase at a time, and reconcile
// before a side becomes the only one read (see [Cache.Reconcile]).
func SetPhase(ctx context.Context, client redis.UniversalClient, name string, p Phase) error {
	if nilClient(client) {
		return fmt.Errorf("%w: SetPhase needs a redis.UniversalClient, got %s", ErrInvalidOption, describeNil(client))
	}
	if err := checkName("SetPhase migration name", name); err != nil {
		return err
	}
	if !p.valid() {
		return fmt.Errorf("%w: SetPhase(%q, %v): not a phase", ErrInvalidOption, name, p)
	}
	if err := client.Set(ctx, PhaseKey(name), p.String(), 0).Err(); err != nil {
		return fmt.Errorf("layercache: set phase of %q: %w", name, err)
	}
	return nil
}

// GetPhase reads the phase of the migration name from Redis: [PhaseOld]
// if it was never set.
func GetPhase(ctx context.Context, client redis.UniversalClient, name string) (Phase, error) {
	if nilClient(client) {
		return 0, fmt.Errorf("%w: GetPhase needs a redis.UniversalClient, got %s", ErrInvalidOption, describeNil(client))
	}
	if err := checkName("GetPhase migration name", name); err != nil {
		return 0, err
	}
	s, err := client.Get(ctx, PhaseKey(name)).Result()
	if errors.Is(err, redis.Nil) {
		return PhaseOld, nil
	}
	if err != nil {
		return 0, fmt.Errorf("layercache: get phase of %q: %w", name, err)
	}
	p, err := ParsePhase(s)
	if err != nil {
		return 0, fmt.Errorf("layercache: phase key %s holds %q: %w", PhaseKey(name), s, err)
	}
	return p, nil
}

type migrationOption struct {
	name     string
	from, to Layout
}

// WithMigration makes the cache keep its entries in two layouts, from (the
// old side) and to (the new side), and read and write them as the phase of
// the migration name says (see [Phase]). It starts a goroutine, stopped by
// [Cache.Close], that re-reads the phase every half second. Until the
// phase has been read once, the first read or write reads it.
//
// Both sides of a write carry the same envelope: the same absolute expiry
// and write version. The first side takes a new write version; the second
// is written set-if-newer, so retried or reordered dual writes leave both
// sides holding the same, newest value. A dual write costs three round
// trips (the second side's version is read first, so that writers' clocks
// need not agree), a write in a single-side phase two (the other side's
// copy is deleted), a read one, a fallback read three (the preferred
// side's miss, a fence armed against a Delete racing the backfill, the
// other side's read), a backfill one more. The copy to the second side and
// a backfill are fenced: a Delete between their read and their write voids
// them, so neither brings a deleted value back.
// [Stats].Migration counts reads, hits, misses, fallbacks, backfills and
// errors per side.
//
// It cannot be combined with [WithLayout]. name takes the characters of
// [WithNamespace].
func WithMigration(name string, from, to Layout) Option {
	return func(c *config) {
		if err := checkName("WithMigration name", name); err != nil {
			c.errs = append(c.errs, err)
			return
		}
		for _, l := range []Layout{from, to} {
			if l.err != nil {
				c.errs = append(c.errs, fmt.Errorf("WithMigration(%q): %w", name, l.err))
				return
			}
		}
		if from.equal(to) {
			c.fail("WithMigration(%q, %v, %v): the two layouts are the same", name, from, to)
			return
		}
		c.migration = &migrationOption{name: name, from: from, to: to}
	}
}

// Phase returns the phase this cache last read for its migration:
// [PhaseOld] until it has read one, and for a cache without
// [WithMigration].
func (c *Cache[T]) Phase() Phase {
	if c.mig == nil {
		return PhaseOld
	}
	return Phase(c.mig.phase.Load())
}

// ---- the phase follower ----

const defaultPhasePoll = 500 * time.Millisecond

// migration is a cache's view of its migration's phase, and the per-side
// counters.
type migration struct {
	name   string
	key    string
	client redis.UniversalClient
	every  time.Duration
	clock  Clock
	log    *slog.Logger

	phase atomic.Int32
	known atomic.Bool
	mu    sync.Mutex    // one control-key read at a time
	poke  chan struct{} // asks the follower to re-read now

	sides   [2]recorder // old, new: evSide* events
	changes atomic.Uint64
	logErr  throttledLog
}

func newMigration(name string, client redis.UniversalClient, every time.Duration, clock Clock, log *slog.Logger) *migration {
	return &migration{name: name, key: PhaseKey(name), client: client, every: every, clock: clock, log: log,
		poke: make(chan struct{}, 1)}
}

// current returns the phase, reading it from Redis if it never was.
func (m *migration) current(ctx context.Context) (Phase, error) {
	if m.known.Load() {
		return Phase(m.phase.Load()), nil
	}
	return m.refresh(ctx)
}

// refresh reads the control key and adopts what it holds.
func (m *migration) refresh(ctx context.Context) (Phase, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	p, err := GetPhase(ctx, m.client, m.name)
	if err != nil {
		if m.known.Load() {
			// Keep following the last phase read: a node that cannot
			// reach the control key cannot reach the data either.
			return Phase(m.phase.Load()), err
		}
		return 0, err
	}
	old := Phase(m.phase.Swap(int32(p)))
	if m.known.Swap(true) && old != p {
		m.changes.Add(1)
		m.log.LogAttrs(ctx, slog.LevelInfo, "layercache: migration phase changed",
			slog.String("migration", m.name), slog.String("from", old.String()), slog.String("to", p.String()))
	}
	return p, nil
}

// notify asks the follower to re-read the phase now instead of at its next
// tick. It never blocks. This is the hook for an invalidation Bus: a Bus
// that carries a "phase changed" notice calls it, and the control key
// stays the only source of truth (a forged notice costs one GET).
func (m *migration) notify() {
	poke(m.poke)
}

// follow re-reads the phase every m.every (with ±10% jitter, so that a
// fleet does not read in lockstep) or when notified, until ctx ends.
func (m *migration) follow(ctx context.Context) {
	next := time.Duration(0) // read at once: most caches start before their first request
	for {
		t, stop := m.clock.NewTimer(next)
		select {
		case <-ctx.Done():
			stop()
			return
		case <-t:
		case <-m.poke:
		}
		stop()
		rctx, cancel := context.WithTimeout(ctx, max(m.every, time.Second))
		if _, err := m.refresh(rctx); err != nil && ctx.Err() == nil {
			m.logErr.log(ctx, m.log, slog.LevelWarn, "layercache: cannot read the migration phase; keeping the last one",
				slog.String("migration", m.name), slog.Any("err", err))
		}
		cancel()
		next = jitterDur(m.every)
	}
}

// SideStats counts the traffic of one side of a migration.
type SideStats struct {
	// Reads counts reads of this side; Hits those that found a value
	// (fresh or within its grace), Misses those that did not.
	Reads, Hits, Misses uint64
	// Fallbacks counts reads of this side made because the preferred
	// side missed or failed.
	Fallbacks uint64
	// Backfills counts values copied into this side after a fallback read
	// found them on the other side.
	Backfills uint64
	// Writes counts values written to this side (fresh writes and
	// copies, not backfills); Invalidations the deletes of this side's
	// copy made by writes in a phase that writes only the other side.
	Writes, Invalidations uint64
	// Errors counts failed Redis commands on this side.
	Errors uint64
}

// MigrationStats counts a migrating cache's traffic per side.
type MigrationStats struct {
	// Name is the migration's name; empty for a cache without one.
	Name string
	// Phase is the phase the cache follows.
	Phase Phase
	// PhaseChanges counts the phase changes this cache has seen.
	PhaseChanges uint64
	// Old and New count each side's traffic.
	Old, New SideStats
}

func (m *migration) snapshot() MigrationStats {
	if m == nil {
		return MigrationStats{}
	}
	st := MigrationStats{Name: m.name, Phase: Phase(m.phase.Load()), PhaseChanges: m.changes.Load()}
	m.sides[sideOld].snapshotInto(&st.Old, ofSide)
	m.sides[sideNew].snapshotInto(&st.New, ofSide)
	return st
}
