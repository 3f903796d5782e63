package layercache

import (
	"reflect"
	"sync"
	"sync/atomic"
)

// The recorder seam. Everything a cache, a migration side or a bus counts
// is an event, recorded with one atomic add into a recorder; [Stats],
// [SideStats] and [BusStats] are snapshots of recorders, and telemetry
// sinks (OpenTelemetry's observable instruments) read the same counters
// when they collect, so the hit path pays one atomic add and nothing more
// whatever is watching.

// event is one kind of thing that is counted.
type event uint8

const (
	// A cache's events: see Stats for their meaning.
	evLocalHit event = iota
	evRedisHit
	evNegativeHit
	evMiss
	evLoad
	evLoadError
	evLoadPanic
	evCoalesced
	evDecodeError
	evRedisError
	evWrite
	evNegativeWrite
	evDelete
	evSkippedWrite
	evLeaseAcquired
	evLeaseWait
	evLeaseWaitTimeout
	evLeaseLost
	evEarlyRefresh
	evStaleHit
	evFailSafeHit
	evRefreshSkipped
	evRefreshError
	evLocalBypass
	evLocalFlush
	evInvalidationSent
	evInvalidationReceived
	evUpgrade
	evUpgradeError
	evValidationFailure
	evSwept

	// A migration side's events: see SideStats.
	evSideReads
	evSideHits
	evSideMisses
	evSideFallbacks
	evSideBackfills
	evSideWrites
	evSideInvalidations
	evSideErrors

	// A bus's events: see BusStats.
	evBusSent
	evBusSentKeys
	evBusSendErrors
	evBusReceived
	evBusReceivedKeys
	evBusForged
	evBusMalformed
	evBusSubscriptions
	evBusDisconnects
	evBusFlushes
	evBusReplayed
	evBusTrimmed
	evBusStale
	evBusReplays
	evBusBacklogFlushes
	evBusFlushesDeferred

	numEvents
)

// owner is what counts an event: a cache, a migration side or a bus.
type owner uint8

const (
	ofCache owner = iota // Stats
	ofSide               // SideStats
	ofBus                // BusStats
)

// eventInfo says where an event shows.
type eventInfo struct {
	// of is what counts it; stat is the field of of's snapshot type
	// (Stats, SideStats, BusStats) that shows it.
	of   owner
	stat string
}

var events = [numEvents]eventInfo{
	evLocalHit:             {stat: "LocalHits"},
	evRedisHit:             {stat: "RedisHits"},
	evNegativeHit:          {stat: "NegativeHits"},
	evMiss:                 {stat: "Misses"},
	evLoad:                 {stat: "Loads"},
	evLoadError:            {stat: "LoadErrors"},
	evLoadPanic:            {stat: "LoadPanics"},
	evCoalesced:            {stat: "Coalesced"},
	evDecodeError:          {stat: "DecodeErrors"},
	evRedisError:           {stat: "RedisErrors"},
	evWrite:                {stat: "Writes"},
	evNegativeWrite:        {stat: "NegativeWrites"},
	evDelete:               {stat: "Deletes"},
	evSkippedWrite:         {stat: "SkippedWrites"},
	evLeaseAcquired:        {stat: "LeasesAcquired"},
	evLeaseWait:            {stat: "LeaseWaits"},
	evLeaseWaitTimeout:     {stat: "LeaseWaitTimeouts"},
	evLeaseLost:            {stat: "LeasesLost"},
	evEarlyRefresh:         {stat: "EarlyRefreshes"},
	evStaleHit:             {stat: "StaleHits"},
	evFailSafeHit:          {stat: "FailSafeHits"},
	evRefreshSkipped:       {stat: "RefreshesSkipped"},
	evRefreshError:         {stat: "RefreshErrors"},
	evLocalBypass:          {stat: "LocalBypasses"},
	evLocalFlush:           {stat: "LocalFlushes"},
	evInvalidationSent:     {stat: "InvalidationsSent"},
	evInvalidationReceived: {stat: "InvalidationsReceived"},
	evUpgrade:              {stat: "Upgrades"},
	evUpgradeError:         {stat: "UpgradeErrors"},
	evValidationFailure:    {stat: "ValidationFailures"},
	evSwept:                {stat: "Swept"},

	evSideReads:         {of: ofSide, stat: "Reads"},
	evSideHits:          {of: ofSide, stat: "Hits"},
	evSideMisses:        {of: ofSide, stat: "Misses"},
	evSideFallbacks:     {of: ofSide, stat: "Fallbacks"},
	evSideBackfills:     {of: ofSide, stat: "Backfills"},
	evSideWrites:        {of: ofSide, stat: "Writes"},
	evSideInvalidations: {of: ofSide, stat: "Invalidations"},
	evSideErrors:        {of: ofSide, stat: "Errors"},

	evBusSent:            {of: ofBus, stat: "Sent"},
	evBusSentKeys:        {of: ofBus, stat: "SentKeys"},
	evBusSendErrors:      {of: ofBus, stat: "SendErrors"},
	evBusReceived:        {of: ofBus, stat: "Received"},
	evBusReceivedKeys:    {of: ofBus, stat: "ReceivedKeys"},
	evBusForged:          {of: ofBus, stat: "Forged"},
	evBusMalformed:       {of: ofBus, stat: "Malformed"},
	evBusSubscriptions:   {of: ofBus, stat: "Subscriptions"},
	evBusDisconnects:     {of: ofBus, stat: "Disconnects"},
	evBusFlushes:         {of: ofBus, stat: "Flushes"},
	evBusReplayed:        {of: ofBus, stat: "Replayed"},
	evBusTrimmed:         {of: ofBus, stat: "Trimmed"},
	evBusStale:           {of: ofBus, stat: "Stale"},
	evBusReplays:         {of: ofBus, stat: "Replays"},
	evBusBacklogFlushes:  {of: ofBus, stat: "BacklogFlushes"},
	evBusFlushesDeferred: {of: ofBus, stat: "FlushesDeferred"},
}

// recorder holds the live counters of one cache, migration side or bus.
// Counters only grow.
type recorder struct {
	n [numEvents]atomic.Uint64
}

// add counts n occurrences of e.
func (r *recorder) add(e event, n uint64) { r.n[e].Add(n) }

// inc counts one occurrence of e.
func (r *recorder) inc(e event) { r.n[e].Add(1) }

// get returns e's count.
func (r *recorder) get(e event) uint64 { return r.n[e].Load() }

// snapshotInto copies the counters into the fields of *dst that the
// events name (see events): one generic snapshot for Stats, SideStats and
// BusStats instead of one written out per type. A recorder counts the
// events of one kind of owner; fields of dst no event names stay as they
// are.
func (r *recorder) snapshotInto(dst any, of owner) {
	v := reflect.ValueOf(dst).Elem()
	for e, f := range fieldsOf(v.Type(), of) {
		if f >= 0 {
			v.Field(f).SetUint(r.n[e].Load())
		}
	}
}

// fieldIndexes caches, per snapshot type, the field each event fills.
var fieldIndexes sync.Map // fieldKey -> []int

type fieldKey struct {
	t  reflect.Type
	of owner
}

// fieldsOf returns, for each event of owner of, the index of the uint64
// field of t it fills; -1 for the other events.
func fieldsOf(t reflect.Type, of owner) []int {
	k := fieldKey{t, of}
	if idx, ok := fieldIndexes.Load(k); ok {
		return idx.([]int)
	}
	idx := make([]int, numEvents)
	for e := range idx {
		idx[e] = -1
		if events[e].of != of {
			continue
		}
		if f, ok := t.FieldByName(events[e].stat); ok && f.Type.Kind() == reflect.Uint64 {
			idx[e] = f.Index[0]
		}
	}
	fieldIndexes.Store(k, idx)
	return idx
}
