package layercache

import (
	"context"
	"errors"

	"github.com/redis/go-redis/v9"
)

// keyPerEntryStore keeps each entry in its own string key,
// namespace:version:{key}, holding the envelope; see [KeyPerEntry].
type keyPerEntryStore struct {
	keyed
	keys keyspace
}

var (
	_ layoutStore = (*keyPerEntryStore)(nil)
	_ store       = (*keyPerEntryStore)(nil)
)

func newKVStore(client redis.UniversalClient, keys keyspace, now func() int64) *keyPerEntryStore {
	s := &keyPerEntryStore{keyed: newKeyed(client, now), keys: keys}
	s.locate = s.at
	return s
}

func (s *keyPerEntryStore) layout() Layout { return KeyPerEntry() }

// at locates key: its value, lease and copy fence, and its notice
// channel, all under its hash tag.
func (s *keyPerEntryStore) at(key string) (loc, error) {
	e := s.keys.entry(key)
	return loc{keys: []string{e, e + leaseSuffix, e + fenceSuffix}, layout: "k", chBase: e, chSuffix: noticeSuffix}, nil
}

func (s *keyPerEntryStore) noticeChannel(key string) string { return s.keys.notice(key) }

func (s *keyPerEntryStore) get(ctx context.Context, key string) ([]byte, error) {
	b, err := s.client.Get(ctx, s.keys.entry(key)).Bytes()
	if errors.Is(err, redis.Nil) {
		return nil, nil
	}
	return b, err
}

func (s *keyPerEntryStore) getMany(ctx context.Context, keys []string) ([][]byte, error) {
	recs, err := s.readMany(ctx, keys)
	return envs(recs), err
}

// readMany is one MGET per slot group (one in all without a cluster),
// pipelined: one round trip per node.
func (s *keyPerEntryStore) readMany(ctx context.Context, keys []string) ([]record, error) {
	rk := make([]string, len(keys))
	for i, k := range keys {
		rk[i] = s.keys.entry(k)
	}
	return mgetRecords(ctx, s.client, slotGroups(s.cluster, rk), func(p redis.Pipeliner, g []int) *redis.SliceCmd {
		args := make([]string, len(g))
		for j, i := range g {
			args[j] = rk[i]
		}
		return p.MGet(ctx, args...)
	}, len(keys))
}

// mgetRecords runs one multi-get per group in a pipeline and returns a
// record per key (the stored bytes are the envelope). A group that failed
// leaves its keys absent, and the first failure is returned.
func mgetRecords(ctx context.Context, client redis.UniversalClient, groups [][]int, get func(redis.Pipeliner, []int) *redis.SliceCmd, n int) ([]record, error) {
	out := make([]record, n)
	cmds := make([]*redis.SliceCmd, len(groups))
	_, _ = client.Pipelined(ctx, func(p redis.Pipeliner) error {
		for gi, g := range groups {
			cmds[gi] = get(p, g)
		}
		return nil
	})
	for gi, g := range groups {
		vals := cmds[gi].Val()
		if len(vals) != len(g) {
			continue
		}
		for j, i := range g {
			if v, ok := vals[j].(string); ok {
				b := []byte(v)
				out[i] = record{env: b, native: b, found: true}
			}
		}
	}
	return out, firstErr(cmds)
}

func (s *keyPerEntryStore) exists(ctx context.Context, keys []string) ([]bool, error) {
	return existsMany(ctx, s.client, keys,
		func(p redis.Pipeliner, k string) *redis.IntCmd { return p.Exists(ctx, s.keys.entry(k)) },
		func(n int64) bool { return n == 1 })
}

func (s *keyPerEntryStore) lister(ctx context.Context) (*keyLister, error) {
	return scanLister(ctx, s.client, s.keys.pattern(), s.keys.userKey)
}
