package layercache

import (
	"context"
	"fmt"
	"time"

	"github.com/redis/go-redis/v9"
)

// PurgeOptions tune [Cache.PurgeVersion]. The zero value is valid.
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

// PurgeReport is what [Cache.PurgeVersion] did.
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
// schema version: once no instance reads or upgrades from that version any
// more, its keys only take memory until they expire. It SCANs (never KEYS)
// every master of a Cluster (every shard of a Ring), matching
// namespace:version:*, and UNLINKs what it finds in pipelined batches,
// rate-limited by opts.RateLimit. It refuses the cache's own version. A
// cancelled ctx stops it between batches; the report says how far it got,
// and running it again continues the work (what is deleted stays deleted).
// [Raw] keys have no version and are never purged.
func (c *Cache[T]) PurgeVersion(ctx context.Context, version string, opts PurgeOptions) (rep PurgeReport, err error) {
	rep.Version = version
	start := time.Now()
	defer func() { rep.Duration = time.Since(start) }()
	if err := checkName("PurgeVersion", version); err != nil {
		return rep, err
	}
	if version == c.keys.version {
		return rep, fmt.Errorf("%w: PurgeVersion(%q) is the cache's own version", ErrInvalidOption, version)
	}
	if opts.BatchSize < 0 || opts.RateLimit < 0 {
		return rep, fmt.Errorf("%w: PurgeOptions: BatchSize and RateLimit must not be negative", ErrInvalidOption)
	}
	batch := opts.BatchSize
	if batch == 0 {
		batch = 500
	}
	nodes, err := masterNodes(ctx, c.client)
	if err != nil {
		return rep, err
	}
	rep.Nodes = len(nodes)
	match := globEscape(c.keys.namespace+":"+version+":") + "*"
	pace := newPacer(opts.RateLimit)
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
	start time.Time
	done  int64
}

func newPacer(rate int) *pacer { return &pacer{rate: rate, start: time.Now()} }

// wait accounts for n more units and sleeps until they are due.
func (p *pacer) wait(ctx context.Context, n int) error {
	if p.rate <= 0 {
		return ctx.Err()
	}
	due := p.start.Add(time.Duration(float64(p.done) / float64(p.rate) * float64(time.Second)))
	p.done += int64(n)
	d := time.Until(due)
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
