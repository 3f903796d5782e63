package layercache

import (
	"context"
	"fmt"
	"time"

	"github.com/layercache/layercache/internal/scripts"
	"github.com/redis/go-redis/v9"
)

// Lease operations of the key-per-entry layout (see the store interface and
// internal/scripts). Every script gets the value and the lease as KEYS and
// the notice channel as an ARGV; all three carry the key's hash tag.

// leaseKeys returns KEYS for the lease scripts: value, then lease. Both
// carry the key's hash tag.
func (s *keyPerEntryStore) leaseKeys(key string) []string {
	return []string{s.keys.entry(key), s.keys.lease(key)}
}

// publishCommand is how scripts announce notices: sharded pub/sub on a
// cluster, so a notice travels only to the key's shard, not over the whole
// cluster bus.
func publishCommand(client redis.UniversalClient) string {
	if _, ok := client.(*redis.ClusterClient); ok {
		return "SPUBLISH"
	}
	return "PUBLISH"
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

// parseLeaseAttempt decodes the Acquire script's {value|nil, taken, pttl}.
func parseLeaseAttempt(res []any) (leaseAttempt, error) {
	var a leaseAttempt
	if len(res) != 3 {
		return a, fmt.Errorf("layercache: lease script returned %d values, want 3", len(res))
	}
	switch v := res[0].(type) {
	case nil:
	case string:
		a.env = []byte(v)
	default:
		return a, fmt.Errorf("layercache: lease script returned a %T value", v)
	}
	taken, ok1 := res[1].(int64)
	pttl, ok2 := res[2].(int64)
	if !ok1 || !ok2 {
		return a, fmt.Errorf("layercache: lease script returned %T, %T; want integers", res[1], res[2])
	}
	a.acquired = taken == 1
	if pttl > 0 {
		a.heldFor = time.Duration(pttl) * time.Millisecond
	}
	return a, nil
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
