package layercache

import (
	"context"
	"errors"
	"time"

	"github.com/layercache/layercache/internal/envelope"
	"github.com/layercache/layercache/internal/scripts"
	"github.com/redis/go-redis/v9"
)

func (s *keyPerEntryStore) layout() Layout { return KeyPerEntry() }

func (s *keyPerEntryStore) write(ctx context.Context, key string, env []byte, ttl time.Duration, mode writeMode) (uint64, bool, error) {
	return scriptResult(scripts.KVWrite.Run(ctx, s.client, []string{s.keys.entry(key)}, env, ttlMillis(ttl), modeArg(mode)))
}

func (s *keyPerEntryStore) copyFenced(ctx context.Context, key, token string, env []byte, ttl time.Duration) (uint64, bool, error) {
	return scriptResult(scripts.KVWrite.Run(ctx, s.client, []string{s.keys.entry(key), s.keys.fence(key)},
		env, ttlMillis(ttl), modeArg(writeCopy), token))
}

func (s *keyPerEntryStore) arm(ctx context.Context, key, token string) error {
	return armFence(ctx, s.client, s.keys.fence(key), token)
}

func (s *keyPerEntryStore) armVersion(ctx context.Context, key, token string) (uint64, error) {
	return armThenRead(ctx, s.client, s.keys.fence(key), token, false, func(p redis.Pipeliner) *redis.StringCmd {
		return p.GetRange(ctx, s.keys.entry(key), 0, envelope.HeaderSize-1)
	})
}

func (s *keyPerEntryStore) readMany(ctx context.Context, keys []string) ([]record, error) {
	cmds := make([]*redis.StringCmd, len(keys))
	_, err := s.client.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, k := range keys {
			cmds[i] = p.Get(ctx, s.keys.entry(k))
		}
		return nil
	})
	if err != nil && !errors.Is(err, redis.Nil) {
		return nil, err
	}
	out := make([]record, len(keys))
	for i, cmd := range cmds {
		b, err := cmd.Bytes()
		if err == nil {
			out[i] = record{env: b, native: b, found: true}
		}
	}
	return out, nil
}

func (s *keyPerEntryStore) exists(ctx context.Context, keys []string) ([]bool, error) {
	return existsMany(ctx, s.client, keys, func(p redis.Pipeliner, k string) *redis.IntCmd { return p.Exists(ctx, s.keys.entry(k)) })
}

func (s *keyPerEntryStore) casMany(ctx context.Context, ops []casOp) ([]bool, error) {
	calls := make([]scriptCall, len(ops))
	for i, op := range ops {
		calls[i] = scriptCall{keys: []string{s.keys.entry(op.key)},
			args: []any{boolArg(op.expect.found), op.expect.native, op.env, ttlMillis(op.ttl)}}
	}
	return casResults(evalMany(ctx, s.client, scripts.KVCAS, calls))
}

func (s *keyPerEntryStore) version(ctx context.Context, key string) (uint64, error) {
	b, err := s.client.GetRange(ctx, s.keys.entry(key), 0, envelope.HeaderSize-1).Bytes()
	return versionReply(b, err, false)
}

func (s *keyPerEntryStore) take(ctx context.Context, key string) (uint64, error) {
	b, err := scripts.KVTake.Run(ctx, s.client, []string{s.keys.entry(key), s.keys.fence(key)}).Text()
	return versionReply([]byte(b), err, false)
}

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

// keyPerEntryStore keeps each entry in its own string key,
// namespace:version:{key}.
type keyPerEntryStore struct {
	client redis.UniversalClient
	keys   keyspace
}

func (s *keyPerEntryStore) get(ctx context.Context, key string) ([]byte, error) {
	b, err := s.client.Get(ctx, s.keys.entry(key)).Bytes()
	if errors.Is(err, redis.Nil) {
		return nil, nil
	}
	return b, err
}

func (s *keyPerEntryStore) set(ctx context.Context, key string, env []byte, ttl time.Duration) error {
	_, _, err := s.write(ctx, key, env, ttl, writeFresh)
	return err
}

func (s *keyPerEntryStore) del(ctx context.Context, keys []string) error {
	return dropKeys(ctx, s.client, keys, func(p redis.Pipeliner, k string) ([]string, string) {
		p.Del(ctx, s.keys.entry(k), s.keys.fence(k))
		return s.leaseKeys(k), s.noticeChannel(k)
	})
}

// leaseKeys returns KEYS for the lease scripts: value, then lease. Both
// carry the key's hash tag.
func (s *keyPerEntryStore) leaseKeys(key string) []string {
	return []string{s.keys.entry(key), s.keys.lease(key)}
}

func (s *keyPerEntryStore) acquireLease(ctx context.Context, key, token string, ttl time.Duration, read bool) (leaseAttempt, error) {
	readArg := "0"
	if read {
		readArg = "1"
	}
	res, err := scripts.Acquire.Run(ctx, s.client, s.leaseKeys(key), token, physicalTTL(ttl).Milliseconds(), readArg).Slice()
	if err != nil {
		return leaseAttempt{}, err
	}
	return parseLeaseAttempt(res)
}

func (s *keyPerEntryStore) renewLease(ctx context.Context, key, token string, ttl time.Duration) (bool, error) {
	n, err := scripts.Renew.Run(ctx, s.client, s.leaseKeys(key), token, physicalTTL(ttl).Milliseconds()).Int()
	return n == 1, err
}

// fillLeased and setBreakingLease are fresh versioned writes (see
// layout_lease.go for fillVersioned and overwrite).
func (s *keyPerEntryStore) fillLeased(ctx context.Context, key, token string, env []byte, ttl time.Duration) (bool, error) {
	_, ok, err := s.fillVersioned(ctx, key, token, env, ttl)
	return ok, err
}

func (s *keyPerEntryStore) releaseLease(ctx context.Context, key, token string) error {
	return scripts.Release.Run(ctx, s.client, s.leaseKeys(key), token, publishCommand(s.client), s.noticeChannel(key)).Err()
}

func (s *keyPerEntryStore) setBreakingLease(ctx context.Context, key string, env []byte, ttl time.Duration) error {
	_, err := s.overwrite(ctx, key, env, ttl)
	return err
}

func (s *keyPerEntryStore) noticeChannel(key string) string { return s.keys.notice(key) }
