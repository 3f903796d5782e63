package layercache

// Stats is a snapshot of a cache's counters since [New]. Counters only grow.
// For dashboards, prefer the OpenTelemetry metrics; Stats is for tests,
// health endpoints and users without OpenTelemetry.
type Stats struct {
	// LocalHits counts reads answered by the in-process tier (WithLocal);
	// a cached "not found" answered there counts in NegativeHits too.
	LocalHits uint64
	// RedisHits counts reads answered by a fresh value in Redis.
	RedisHits uint64
	// NegativeHits counts reads answered by a cached "not found".
	NegativeHits uint64
	// Misses counts reads that found no usable value (absent, expired,
	// undecodable) and so went to the loader (Fetch) or returned
	// ErrNotFound (Get).
	Misses uint64
	// Loads counts loader calls; LoadErrors those that failed (ErrNotFound
	// aside), LoadPanics those that panicked.
	Loads, LoadErrors, LoadPanics uint64
	// Coalesced counts Fetch calls that shared another caller's load
	// instead of calling the loader.
	Coalesced uint64
	// DecodeErrors counts values in Redis that were not valid envelopes or
	// did not decode into T. Each was treated as a miss.
	DecodeErrors uint64
	// RedisErrors counts failed Redis commands (reads fall back to the
	// loader; writes are logged and the loaded value still returned).
	RedisErrors uint64
	// Writes counts values written to Redis (Set, and Fetch fills);
	// NegativeWrites the cached "not found" entries; Deletes the keys
	// passed to Delete. SkippedWrites counts loaded values not cached
	// because a write or delete of the key overtook the load, or they
	// exceeded WithMaxValueSize.
	Writes, NegativeWrites, Deletes, SkippedWrites uint64

	// LeasesAcquired counts loads this process ran under the key's lease
	// (WithLocks misses, and background refreshes). LeaseWaits counts
	// misses that waited for another holder's load instead of loading.
	// LeaseWaitTimeouts counts waits that ran out, after which this
	// process loaded by itself and did not cache the value. LeasesLost
	// counts loads whose lease expired or was broken by a write before the
	// fill; their value was returned but not cached (also in
	// SkippedWrites).
	LeasesAcquired, LeaseWaits, LeaseWaitTimeouts, LeasesLost uint64
	// EarlyRefreshes counts background refreshes started by
	// WithEarlyRefresh. StaleHits counts stale values served by
	// WithStaleWhileRevalidate, FailSafeHits the part of them served
	// while the key's refreshes were failing (WithFailSafe).
	EarlyRefreshes, StaleHits, FailSafeHits uint64
	// RefreshesSkipped counts background refreshes given up because
	// another process held the key's lease; RefreshErrors those whose
	// loader failed.
	RefreshesSkipped, RefreshErrors uint64

	// LocalBypasses counts reads that skipped the local tier because its
	// invalidation bus was not subscribed and current (reconnecting, or
	// replaying a stream backlog), or the cache was closed.
	LocalBypasses uint64
	// LocalFlushes counts times the local tier was emptied: on every bus
	// (re)subscription in pub/sub mode, when a stream was trimmed past this
	// node, on a flush message.
	LocalFlushes uint64
	// InvalidationsSent counts keys this cache published to its bus after a
	// Set or Delete; InvalidationsReceived the keys other nodes' messages
	// dropped from its local tier.
	InvalidationsSent, InvalidationsReceived uint64

	// Upgrades counts reads answered by upgrading a value found at an
	// older version (WithUpgradeFrom), without a load; UpgradeErrors the
	// older values that could not be upgraded (each then a miss).
	Upgrades, UpgradeErrors uint64
	// ValidationFailures counts values read from Redis that a
	// WithValidator check rejected; each was a miss.
	ValidationFailures uint64
	// Swept counts expired fields deleted by the Hash layout's sweep.
	Swept uint64
	// Migration counts a migrating cache's reads and writes per side.
	Migration MigrationStats
}
