package layercache

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/layercache/layercache/internal/envelope"
)

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
