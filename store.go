package layercache

import (
	"context"
	"errors"
	"time"

	"github.com/redis/go-redis/v9"
)

// store is where a cache keeps its envelopes in Redis. A Layout makes one;
// a migration wraps two. Methods take user keys (already validated) and
// envelope bytes; a store that keeps another format (Raw) converts at its
// edge, so the read path above it only ever sees envelopes.
type store interface {
	// get returns the envelope stored for key, or (nil, nil) when absent.
	get(ctx context.Context, key string) ([]byte, error)
	// set stores env for key as a new write; ttl is the physical lifetime
	// (fresh + grace). It replaces what the key holds; the write version
	// stored is env's, or one past the key's current version if that is
	// not older (writeFresh in layout.go), so versions of one key grow in
	// the order writes land.
	set(ctx context.Context, key string, env []byte, ttl time.Duration) error
	// del removes the values of keys and anything tied to them (leases).
	// Keys may fall in different Cluster slots.
	del(ctx context.Context, keys []string) error
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
	if len(keys) == 1 {
		// Value and lease share the key's slot, so one DEL takes both.
		return s.client.Del(ctx, s.keys.entry(keys[0]), s.keys.lease(keys[0])).Err()
	}
	// One DEL per key: keys of different slots never share a command. A
	// pipeline keeps it to one round trip per node (go-redis's
	// ClusterClient splits pipelines by slot).
	_, err := s.client.Pipelined(ctx, func(p redis.Pipeliner) error {
		for _, k := range keys {
			p.Del(ctx, s.keys.entry(k), s.keys.lease(k))
		}
		return nil
	})
	return err
}

// physicalTTL rounds a lifetime to what Redis accepts: at least 1ms, since
// PX 0 is an error and a zero TTL would make the key live forever.
func physicalTTL(ttl time.Duration) time.Duration {
	if ttl < time.Millisecond {
		return time.Millisecond
	}
	return ttl
}
