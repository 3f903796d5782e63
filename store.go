package layercache

import (
	"context"
	"errors"
	"time"

	"github.com/layercache/layercache/internal/scripts"
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

	// Leases (lease.go). A lease is a random token at the key's lease key,
	// namespace:version:{key}:lease; every write made under it checks the
	// token in the same script (fencing), and value, lease and notice
	// channel share the key's Cluster slot.

	// acquireLease takes key's lease for token, for ttl, if nobody holds
	// it. With read, it also returns key's envelope, read in the same step.
	acquireLease(ctx context.Context, key, token string, ttl time.Duration, read bool) (leaseAttempt, error)
	// renewLease extends key's lease to ttl if token still holds it, and
	// reports whether it did.
	renewLease(ctx context.Context, key, token string, ttl time.Duration) (bool, error)
	// fillLeased stores env as set does if token still holds key's lease,
	// releases the lease and publishes a notice; it reports whether env
	// was stored. When the lease is free (a write broke it), it still
	// publishes a notice so that waiters look again.
	fillLeased(ctx context.Context, key, token string, env []byte, ttl time.Duration) (bool, error)
	// releaseLease drops key's lease if token holds it and publishes a
	// notice.
	releaseLease(ctx context.Context, key, token string) error
	// setBreakingLease stores env as set does and drops key's lease,
	// whoever holds it, so that a fill that started before this write
	// cannot land after it.
	setBreakingLease(ctx context.Context, key string, env []byte, ttl time.Duration) error
	// noticeChannel is the pub/sub channel of key's notices; it hashes to
	// key's slot.
	noticeChannel(key string) string
}

// leaseAttempt is what acquireLease found.
type leaseAttempt struct {
	env      []byte        // key's envelope when asked for and present
	acquired bool          // the caller's token now holds the lease
	heldFor  time.Duration // when not acquired: the holder's remaining lease time
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

// dropKeys is the del of every layout. For each key, queue deletes what
// the layout keeps of it (value and copy fence, so that a copy of a value
// read before the delete cannot land after it) and returns its lease
// script keys (value or slot pin, lease) and notice channel, or nil when
// the key has no lease; the lease is then broken by scripts.BreakLease,
// which publishes a notice, so that waiters in other processes look again
// at once instead of sleeping until the broken lease would have expired.
// Everything is one pipeline (go-redis's ClusterClient splits it by
// slot); each command and script touches one key's slot. A script the
// server does not have yet (NOSCRIPT) is run again, loading it.
func dropKeys(ctx context.Context, client redis.UniversalClient, keys []string, queue func(p redis.Pipeliner, key string) (leaseKeys []string, channel string)) error {
	type breakCall struct {
		cmd     *redis.Cmd
		keys    []string
		channel string
	}
	pub := publishCommand(client)
	var calls []breakCall
	cmds, err := client.Pipelined(ctx, func(p redis.Pipeliner) error {
		for _, k := range keys {
			lk, ch := queue(p, k)
			if lk == nil {
				continue
			}
			calls = append(calls, breakCall{scripts.BreakLease.EvalSha(ctx, p, lk, pub, ch), lk, ch})
		}
		return nil
	})
	if err == nil {
		return nil
	}
	scriptCmds := make(map[redis.Cmder]bool, len(calls))
	var errs []error
	for _, c := range calls {
		scriptCmds[c.cmd] = true
		e := c.cmd.Err()
		if redis.HasErrorPrefix(e, "NOSCRIPT") {
			e = scripts.BreakLease.Run(ctx, client, c.keys, pub, c.channel).Err()
		}
		if e != nil && !errors.Is(e, redis.Nil) {
			errs = append(errs, e)
		}
	}
	for _, c := range cmds {
		if e := c.Err(); e != nil && !errors.Is(e, redis.Nil) && !scriptCmds[c] {
			errs = append(errs, e)
		}
	}
	return errors.Join(errs...)
}

// physicalTTL rounds a lifetime to what Redis accepts: at least 1ms, since
// PX 0 is an error and a zero TTL would make the key live forever.
func physicalTTL(ttl time.Duration) time.Duration {
	if ttl < time.Millisecond {
		return time.Millisecond
	}
	return ttl
}
