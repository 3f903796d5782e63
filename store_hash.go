package layercache

import (
	"context"
	"errors"
	"hash/fnv"
	"strconv"
	"sync"
	"time"

	"github.com/layercache/layercache/internal/envelope"
	"github.com/layercache/layercache/internal/scripts"
	"github.com/redis/go-redis/v9"
)

// hashStore keeps entries as fields of shard hashes; see [Hash].
type hashStore struct {
	client redis.UniversalClient
	keys   keyspace
	l      Layout
	now    func() int64 // the cache's clock, Unix ms
	shards []string     // hash keys, by shard index
}

func newHashStore(client redis.UniversalClient, keys keyspace, l Layout, now func() int64) *hashStore {
	s := &hashStore{client: client, keys: keys, l: l, now: now, shards: make([]string, l.shards)}
	base := keys.namespace + ":" + keys.version + ":h" + strconv.Itoa(l.shards) + ":{"
	for i, tag := range shardTags(l.shards) {
		s.shards[i] = base + tag + "}"
	}
	return s
}

// shardTags returns, for n shards, one hash tag per shard such that shard
// i's tag hashes into the i-th n-th of the 16384 Cluster slots. Clusters
// assign slots to masters in contiguous ranges, so shards spread over the
// masters as evenly as they can. The tags are a pure function of n.
//
// Finding the tags costs about 85ms of CPU for Hash(1024), and every New
// builds a store per side and per upgraded version, so they are computed
// once per shard count and shared; callers must not modify the slice.
func shardTags(n int) []string {
	if t, ok := shardTagCache.Load(n); ok {
		return t.([]string)
	}
	t, _ := shardTagCache.LoadOrStore(n, computeShardTags(n))
	return t.([]string)
}

// shardTagCache maps a shard count to its tags (see shardTags). It only
// memoises a pure function, so sharing it between caches is invisible.
var shardTagCache sync.Map

func computeShardTags(n int) []string {
	tags := make([]string, n)
	for i := range tags {
		lo, hi := i*16384/n, (i+1)*16384/n
		for j := 0; ; j++ {
			tag := strconv.Itoa(i) + "." + strconv.Itoa(j)
			if s := int(crc16(tag) % 16384); s >= lo && s < hi {
				tags[i] = tag
				break
			}
		}
	}
	return tags
}

func (s *hashStore) layout() Layout { return s.l }

func (s *hashStore) shardOf(key string) string {
	h := fnv.New64a()
	_, _ = h.Write([]byte(key))
	return s.shards[h.Sum64()%uint64(len(s.shards))]
}

func (s *hashStore) get(ctx context.Context, key string) ([]byte, error) {
	b, err := s.client.HGet(ctx, s.shardOf(key), key).Bytes()
	if errors.Is(err, redis.Nil) {
		return nil, nil
	}
	return b, err
}

func (s *hashStore) set(ctx context.Context, key string, env []byte, ttl time.Duration) error {
	_, _, err := s.write(ctx, key, env, ttl, writeFresh)
	return err
}

func (s *hashStore) write(ctx context.Context, key string, env []byte, ttl time.Duration, mode writeMode) (uint64, bool, error) {
	return scriptResult(scripts.HashWrite.Run(ctx, s.client, []string{s.shardOf(key)}, key, env, ttlMillis(ttl), modeArg(mode), s.now()))
}

func (s *hashStore) copyFenced(ctx context.Context, key, token string, env []byte, ttl time.Duration) (uint64, bool, error) {
	return scriptResult(scripts.HashWrite.Run(ctx, s.client, []string{s.shardOf(key), s.fence(key)},
		key, env, ttlMillis(ttl), modeArg(writeCopy), s.now(), token))
}

// fence returns key's copy fence, beside its lease in its shard's slot.
func (s *hashStore) fence(key string) string { return s.shardOf(key) + ":copy:" + key }

func (s *hashStore) arm(ctx context.Context, key, token string) error {
	return armFence(ctx, s.client, s.fence(key), token)
}

func (s *hashStore) armVersion(ctx context.Context, key, token string) (uint64, error) {
	return armThenRead(ctx, s.client, s.fence(key), token, false, func(p redis.Pipeliner) *redis.StringCmd {
		return p.HGet(ctx, s.shardOf(key), key)
	})
}

func (s *hashStore) del(ctx context.Context, keys []string) error {
	// Field, lease and copy fence share the shard's slot.
	return dropKeys(ctx, s.client, keys, func(p redis.Pipeliner, k string) ([]string, string) {
		p.HDel(ctx, s.shardOf(k), k)
		p.Del(ctx, s.fence(k))
		return s.leaseKeys(k), s.noticeChannel(k)
	})
}

func (s *hashStore) readMany(ctx context.Context, keys []string) ([]record, error) {
	cmds := make([]*redis.StringCmd, len(keys))
	_, err := s.client.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, k := range keys {
			cmds[i] = p.HGet(ctx, s.shardOf(k), k)
		}
		return nil
	})
	if err != nil && !errors.Is(err, redis.Nil) {
		return nil, err
	}
	out := make([]record, len(keys))
	for i, cmd := range cmds {
		if b, err := cmd.Bytes(); err == nil {
			out[i] = record{env: b, native: b, found: true}
		}
	}
	return out, nil
}

func (s *hashStore) exists(ctx context.Context, keys []string) ([]bool, error) {
	cmds := make([]*redis.BoolCmd, len(keys))
	_, err := s.client.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, k := range keys {
			cmds[i] = p.HExists(ctx, s.shardOf(k), k)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	out := make([]bool, len(keys))
	for i, c := range cmds {
		out[i] = c.Val()
	}
	return out, nil
}

func (s *hashStore) casMany(ctx context.Context, ops []casOp) ([]bool, error) {
	calls := make([]scriptCall, len(ops))
	for i, op := range ops {
		calls[i] = scriptCall{keys: []string{s.shardOf(op.key)},
			args: []any{op.key, boolArg(op.expect.found), op.expect.native, op.env, ttlMillis(op.ttl)}}
	}
	return casResults(evalMany(ctx, s.client, scripts.HashCAS, calls))
}

func (s *hashStore) version(ctx context.Context, key string) (uint64, error) {
	b, err := s.client.HGet(ctx, s.shardOf(key), key).Bytes()
	return versionReply(b, err, false)
}

func (s *hashStore) take(ctx context.Context, key string) (uint64, error) {
	b, err := scripts.HashTake.Run(ctx, s.client, []string{s.shardOf(key), s.fence(key)}, key).Text()
	return versionReply([]byte(b), err, false)
}

// sweepBatch is how many fields one HSCAN step looks at.
const sweepBatch = 256

// sweep deletes the expired fields of every shard whose claim this
// instance wins, and returns how many it deleted.
func (s *hashStore) sweep(ctx context.Context, now int64, every time.Duration) (int, error) {
	total := 0
	for _, shard := range s.shards {
		won, err := scripts.SweepClaim.Run(ctx, s.client, []string{shard + ":sweep"}, now, every.Milliseconds()).Int()
		if err != nil {
			return total, err
		}
		if won != 1 {
			continue
		}
		var cursor uint64
		for {
			kv, next, err := s.client.HScan(ctx, shard, cursor, "", sweepBatch).Result()
			if err != nil {
				return total, err
			}
			args := []any{now}
			for i := 0; i+1 < len(kv); i += 2 {
				h, _, err := envelope.Decode([]byte(kv[i+1]))
				if err != nil || h.ExpiresAt <= now {
					args = append(args, kv[i])
				}
			}
			if len(args) > 1 {
				n, err := scripts.HashSweep.Run(ctx, s.client, []string{shard}, args...).Int()
				if err != nil {
					return total, err
				}
				total += n
			}
			if next == 0 {
				break
			}
			cursor = next
		}
	}
	return total, nil
}

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
