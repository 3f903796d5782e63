package layercache

import (
	"context"
	"fmt"
	"time"

	"github.com/redis/go-redis/v9"
)

// PurgeOptions tune [Purge] and [Cache.PurgeVersion]. The zero value is
// valid.
type PurgeOptions struct {
	// BatchSize is the SCAN COUNT hint and the size of each delete
	// pipeline; 0 means 500.
	BatchSize int
	// RateLimit caps deletions per second across all nodes; 0 means no
	// limit. Use it to keep a purge from competing with live traffic.
	RateLimit int
	// DryRun counts the keys a purge would delete, and deletes none.
	DryRun bool
	// Progress, if set, is called after each batch with the totals so far.
	Progress func(PurgeReport)
}

// PurgeReport is what [Purge] did.
type PurgeReport struct {
	// Version is the version purged.
	Version string
	// Nodes is how many masters were scanned.
	Nodes int
	// Matched counts keys found under namespace:version: (values, leases,
	// Hash layout shards and their bookkeeping).
	Matched int64
	// Deleted counts keys deleted (0 in a dry run).
	Deleted int64
	// Duration is how long the purge took.
	Duration time.Duration
}

// PurgeVersion deletes every key of this cache's namespace at another
// schema version, as [Purge] does; it refuses the cache's own version.
// [Raw] keys have no version and are never purged.
func (c *Cache[T]) PurgeVersion(ctx context.Context, version string, opts PurgeOptions) (PurgeReport, error) {
	if version == c.keys.version {
		return PurgeReport{Version: version}, fmt.Errorf("%w: PurgeVersion(%q) is the cache's own version", ErrInvalidOption, version)
	}
	return purge(ctx, c.client, c.keys.namespace, version, c.cfg.clock, opts)
}

// Purge deletes every key of namespace at schema version: once no
// instance reads or upgrades from that version any more, its keys only
// take memory until they expire. It needs no cache, so an operator's tool
// can run it. It SCANs (never KEYS) every master of a Cluster (every shard
// of a Ring), matching namespace:version:*, and UNLINKs what it finds in
// pipelined batches, rate-limited by opts.RateLimit. A cancelled ctx stops
// it between batches; the report says how far it got, and running it again
// continues the work (what is deleted stays deleted). Purging a version
// that running caches still use empties their cache: check first.
func Purge(ctx context.Context, client redis.UniversalClient, namespace, version string, opts PurgeOptions) (PurgeReport, error) {
	if nilClient(client) {
		return PurgeReport{Version: version}, fmt.Errorf("%w: Purge needs a redis.UniversalClient, got %s", ErrInvalidOption, describeNil(client))
	}
	if err := checkName("Purge namespace", namespace); err != nil {
		return PurgeReport{Version: version}, err
	}
	return purge(ctx, client, namespace, version, systemClock{}, opts)
}

func purge(ctx context.Context, client redis.UniversalClient, namespace, version string, clock Clock, opts PurgeOptions) (rep PurgeReport, err error) {
	rep.Version = version
	start := clock.Now()
	defer func() { rep.Duration = clock.Now().Sub(start) }()
	if err := checkName("PurgeVersion", version); err != nil {
		return rep, err
	}
	if opts.BatchSize < 0 || opts.RateLimit < 0 {
		return rep, fmt.Errorf("%w: PurgeOptions: BatchSize and RateLimit must not be negative", ErrInvalidOption)
	}
	batch := opts.BatchSize
	if batch == 0 {
		batch = 500
	}
	nodes, err := masterNodes(ctx, client)
	if err != nil {
		return rep, err
	}
	rep.Nodes = len(nodes)
	match := globEscape(namespace+":"+version+":") + "*"
	pace := newPacer(opts.RateLimit, clock)
	for _, node := range nodes {
		var cursor uint64
		for {
			keys, next, err := node.Scan(ctx, cursor, match, int64(batch)).Result()
			if err != nil {
				return rep, fmt.Errorf("layercache: purge: scan %s: %w", node.Options().Addr, err)
			}
			for len(keys) > 0 {
				n := min(batch, len(keys))
				chunk := keys[:n]
				keys = keys[n:]
				rep.Matched += int64(n)
				if !opts.DryRun {
					if err := pace.wait(ctx, n); err != nil {
						return rep, err
					}
					// One UNLINK per key: keys of one node may still be in
					// different slots, which a multi-key command refuses.
					cmds, err := node.Pipelined(ctx, func(p redis.Pipeliner) error {
						for _, k := range chunk {
							p.Unlink(ctx, k)
						}
						return nil
					})
					for _, cmd := range cmds {
						if ic, ok := cmd.(*redis.IntCmd); ok {
							rep.Deleted += ic.Val()
						}
					}
					if err != nil {
						return rep, fmt.Errorf("layercache: purge: unlink on %s: %w", node.Options().Addr, err)
					}
				}
				if opts.Progress != nil {
					opts.Progress(rep)
				}
			}
			if next == 0 {
				break
			}
			cursor = next
		}
	}
	return rep, ctx.Err()
}

// pacer spaces work out to at most rate units a second.
type pacer struct {
	rate  int
	clock Clock
	start time.Time
	done  int64
}

func newPacer(rate int, clock Clock) *pacer {
	return &pacer{rate: rate, clock: clock, start: clock.Now()}
}

// wait accounts for n more units and sleeps until they are due.
func (p *pacer) wait(ctx context.Context, n int) error {
	if p.rate <= 0 {
		return ctx.Err()
	}
	due := p.start.Add(time.Duration(float64(p.done) / float64(p.rate) * float64(time.Second)))
	p.done += int64(n)
	d := due.Sub(p.clock.Now())
	if d <= 0 {
		return ctx.Err()
	}
	if !sleep(ctx, p.clock, d) {
		return ctx.Err()
	}
	return nil
}
