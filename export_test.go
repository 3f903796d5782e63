package layercache

import "time"

// Test hooks: options users do not need, exported to the tests only.

// WithPhasePollInterval sets how often a migrating cache re-reads its
// phase, so tests follow phase changes quickly.
func WithPhasePollInterval(d time.Duration) Option { return func(c *config) { c.phasePoll = d } }

// WithSweepInterval sets how often Hash layouts sweep expired fields.
func WithSweepInterval(d time.Duration) Option { return func(c *config) { c.sweepEvery = d } }

// ShardKeys returns the Redis keys of the hashes of a Hash layout.
func ShardKeys(namespace, version string, shards int) []string {
	return newHashStore(nil, newKeyspace(namespace, version), Hash(shards), nil).shards
}

// CRC16 is the Redis Cluster key hash, for checking shard placement.
func CRC16(s string) uint16 { return crc16(s) }
