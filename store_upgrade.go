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

// upgradingStore is the current version's store, plus upgrade on read: a
// key absent (or past its physical end) at the current version is looked
// up at older versions. Writes and deletes also delete the key at the
// older versions: otherwise, once the current entry expired or was
// deleted, a read would upgrade the older value and bring back data older
// than the write or delete. Embedding the store passes every other method
// (leases) through to the current version unchanged.
type upgradingStore struct {
	store
	olds []oldVersion
	now  func() int64
	rec  *recorder
	log  *slog.Logger
	logs *throttledLog
	// validate, if set, runs the cache's validators on an upgraded
	// payload; false means it failed (and was counted) and must be
	// neither written nor served.
	validate func(ctx context.Context, key string, payload []byte) bool
}

var (
	_ store       = (*upgradingStore)(nil)
	_ sweepSource = (*upgradingStore)(nil)
)

// sweepers are the current version's: older versions are read, not
// written, and their keys expire or are purged.
func (u *upgradingStore) sweepers() []sweeper {
	if ss, ok := u.store.(sweepSource); ok {
		return ss.sweepers()
	}
	return nil
}

func (u *upgradingStore) get(ctx context.Context, key string) ([]byte, error) {
	envs, err := u.getMany(ctx, []string{key})
	if len(envs) == 1 {
		return envs[0], err
	}
	return nil, err
}

// getMany reads the current version; the keys it misses are looked up at
// each older version in turn, one batch per version, upgraded, served and
// copied to the current version.
//
// The current version's copy fences are armed before an older version is
// read: a Delete after that read deletes the fence with the current entry
// (and the older ones), and the upgrade's copy, fenced, is dropped instead
// of bringing the deleted value back at the current version. Without a
// fence (arming failed) nothing is copied; the upgraded value is still
// served.
func (u *upgradingStore) getMany(ctx context.Context, keys []string) ([][]byte, error) {
	out, err := getKeys(ctx, u.store, keys)
	if err != nil {
		return out, err
	}
	now := u.now()
	var left []int
	for i, b := range out {
		if !envelope.Usable(b, now) {
			left = append(left, i)
		}
	}
	if len(left) == 0 {
		return out, nil
	}
	fence := newLeaseToken()
	if err := u.store.armMany(ctx, pick(keys, left), fence); err != nil {
		if ctx.Err() == nil {
			u.rec.inc(evRedisError)
		}
		fence = ""
	}
	var copies []writeOp
	for _, o := range u.olds {
		if len(left) == 0 {
			break
		}
		found, _ := getKeys(ctx, o.st, pick(keys, left)) // a version that cannot be read is skipped
		var still []int
		for j, i := range left {
			env, ttl, ok := u.upgrade(ctx, o, keys[i], found, j, now)
			if !ok {
				still = append(still, i)
				continue
			}
			out[i] = env
			u.rec.inc(evUpgrade)
			if fence != "" {
				copies = append(copies, writeOp{key: keys[i], env: env, ttl: ttl, w: writeOpts{copy: true, fence: fence}})
			}
		}
		left = still
	}
	if len(copies) > 0 {
		if _, err := u.store.writeMany(ctx, copies); err != nil && ctx.Err() == nil {
			u.rec.inc(evRedisError)
		}
	}
	return out, nil
}

// upgrade turns found[j], key's envelope at the older version o, into an
// envelope at the current version, or reports false when there is none to
// serve: absent, expired, not convertible, or failing validation.
func (u *upgradingStore) upgrade(ctx context.Context, o oldVersion, key string, found [][]byte, j int, now int64) ([]byte, time.Duration, bool) {
	if j >= len(found) || found[j] == nil {
		return nil, 0, false
	}
	h, payload, err := envelope.Decode(found[j])
	if err != nil || h.ExpiresAt <= now {
		return nil, 0, false
	}
	if !h.Negative() {
		if payload, err = o.convert(payload); err != nil {
			u.rec.inc(evUpgradeError)
			u.logs.log(ctx, u.log, slog.LevelWarn, "layercache: cannot upgrade a value from an older version; treating it as a miss",
				slog.String("key", key), slog.String("from", o.version), slog.Any("err", err))
			return nil, 0, false
		}
		// Validate before writing: a value that fails is a miss, and
		// must not be persisted at the current version either.
		if u.validate != nil && !u.validate(ctx, key, payload) {
			return nil, 0, false
		}
	}
	// Same header: the same absolute expiry, and the old write version,
	// so that a write made at the current version meanwhile (proposed
	// past the older versions', see write) is newer and wins over this
	// copy.
	return envelope.Encode(h, payload), time.Duration(h.ExpiresAt-now) * time.Millisecond, true
}

// pick returns keys[i] for each i in idx.
func pick(keys []string, idx []int) []string {
	out := make([]string, len(idx))
	for j, i := range idx {
		out[j] = keys[i]
	}
	return out
}

// write passes copies and fills through. A fresh write (Set, a fill
// without a lease) proposes env's version past what the older versions
// hold for key (one round trip per older version), then writes and drops
// the older copies. Without the raise, a writer whose clock is behind
// would write a version below an older version's value, and an upgrade
// that read that value just before the write would copy it over the
// write, set-if-newer. A fill under a lease needs neither: it follows a
// miss at every version.
func (u *upgradingStore) write(ctx context.Context, key string, env []byte, ttl time.Duration, w writeOpts) (writeResult, error) {
	if w.copy || w.lease != "" {
		return u.store.write(ctx, key, env, ttl, w)
	}
	env, err := u.proposePastOlds(ctx, key, env)
	if err != nil {
		return writeResult{}, err
	}
	r, err := u.store.write(ctx, key, env, ttl, w)
	if err != nil {
		return r, err
	}
	return r, u.dropOld(ctx, []string{key})
}

// writeMany passes copies through in one batch and applies the other
// writes one by one (see write).
func (u *upgradingStore) writeMany(ctx context.Context, ops []writeOp) ([]writeResult, error) {
	out := make([]writeResult, len(ops))
	var copies []writeOp
	var idx []int
	var errs []error
	for i, op := range ops {
		if op.w.copy {
			copies, idx = append(copies, op), append(idx, i)
			continue
		}
		r, err := u.write(ctx, op.key, op.env, op.ttl, op.w)
		out[i], errs = r, append(errs, err)
	}
	if len(copies) > 0 {
		res, err := u.store.writeMany(ctx, copies)
		for j, i := range idx {
			if j < len(res) {
				out[i] = res[j]
			}
		}
		errs = append(errs, err)
	}
	return out, errors.Join(errs...)
}

// proposePastOlds raises env's proposed version past every older
// version's copy of key.
func (u *upgradingStore) proposePastOlds(ctx context.Context, key string, env []byte) ([]byte, error) {
	for _, o := range u.olds {
		v, err := o.st.version(ctx, key)
		if err != nil {
			return nil, fmt.Errorf("read version at older version %s: %w", o.version, err)
		}
		env = envelope.ProposePast(env, v)
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
