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

// hashStore keeps entries as fields of shard hashes; see [Hash]. A key's
// lease, copy fence and notice channel are named after its shard, in its
// shard's slot: <shard>:lease:<key>, <shard>:copy:<key>,
// <shard>:notice:<key>.
type hashStore struct {
	keyed
	l      Layout
	shards []string // hash keys, by shard index
}

var (
	_ layoutStore = (*hashStore)(nil)
	_ sweeper     = (*hashStore)(nil)
	_ sweepSource = (*hashStore)(nil)
)

func newHashStore(client redis.UniversalClient, keys keyspace, l Layout, now func() int64) *hashStore {
	s := &hashStore{keyed: newKeyed(client, now), l: l, shards: make([]string, l.shards)}
	s.locate = s.at
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

// String names the layout, for logs.
func (s *hashStore) String() string { return s.l.String() }

func (s *hashStore) sweepers() []sweeper { return []sweeper{s} }

// shardIndex returns the index of key's shard.
func (s *hashStore) shardIndex(key string) int {
	h := fnv.New64a()
	_, _ = h.Write([]byte(key))
	return int(h.Sum64() % uint64(len(s.shards)))
}

func (s *hashStore) shardOf(key string) string { return s.shards[s.shardIndex(key)] }

func (s *hashStore) at(key string) (loc, error) {
	shard := s.shardOf(key)
	return loc{
		keys:     []string{shard, shard + leaseSuffix + ":" + key, shard + fenceSuffix + ":" + key},
		layout:   "h",
		field:    key,
		timed:    true,
		chBase:   shard + noticeSuffix + ":",
		chSuffix: key,
	}, nil
}

func (s *hashStore) noticeChannel(key string) string {
	return s.shardOf(key) + noticeSuffix + ":" + key
}

func (s *hashStore) get(ctx context.Context, key string) ([]byte, error) {
	b, err := s.client.HGet(ctx, s.shardOf(key), key).Bytes()
	if errors.Is(err, redis.Nil) {
		return nil, nil
	}
	return b, err
}

func (s *hashStore) getMany(ctx context.Context, keys []string) ([][]byte, error) {
	recs, err := s.readMany(ctx, keys)
	return envs(recs), err
}

// readMany is one HMGET per shard, pipelined: a shard is one slot, so one
// round trip per node.
func (s *hashStore) readMany(ctx context.Context, keys []string) ([]record, error) {
	byShard := make(map[int]int, len(s.shards))
	var groups [][]int
	var shards []string
	for i, k := range keys {
		sh := s.shardIndex(k)
		g, ok := byShard[sh]
		if !ok {
			g = len(groups)
			byShard[sh] = g
			groups, shards = append(groups, nil), append(shards, s.shards[sh])
		}
		groups[g] = append(groups[g], i)
	}
	gi := 0
	return mgetRecords(ctx, s.client, groups, func(p redis.Pipeliner, g []int) *redis.SliceCmd {
		fields := make([]string, len(g))
		for j, i := range g {
			fields[j] = keys[i]
		}
		cmd := p.HMGet(ctx, shards[gi], fields...)
		gi++
		return cmd
	}, len(keys))
}

func (s *hashStore) exists(ctx context.Context, keys []string) ([]bool, error) {
	return existsMany(ctx, s.client, keys,
		func(p redis.Pipeliner, k string) *redis.BoolCmd { return p.HExists(ctx, s.shardOf(k), k) },
		func(b bool) bool { return b })
}

func (s *hashStore) lister(context.Context) (*keyLister, error) {
	return &keyLister{client: s.client, hashes: s.shards}, nil
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
