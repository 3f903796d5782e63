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

// eventInfo says where an event shows.
type eventInfo struct {
	// stat is the field of Stats or SideStats that snapshots it.
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

	evSideReads:         {stat: "Reads"},
	evSideHits:          {stat: "Hits"},
	evSideMisses:        {stat: "Misses"},
	evSideFallbacks:     {stat: "Fallbacks"},
	evSideBackfills:     {stat: "Backfills"},
	evSideWrites:        {stat: "Writes"},
	evSideInvalidations: {stat: "Invalidations"},
	evSideErrors:        {stat: "Errors"},

	evBusSent:            {stat: "Sent"},
	evBusSentKeys:        {stat: "SentKeys"},
	evBusSendErrors:      {stat: "SendErrors"},
	evBusReceived:        {stat: "Received"},
	evBusReceivedKeys:    {stat: "ReceivedKeys"},
	evBusForged:          {stat: "Forged"},
	evBusMalformed:       {stat: "Malformed"},
	evBusSubscriptions:   {stat: "Subscriptions"},
	evBusDisconnects:     {stat: "Disconnects"},
	evBusFlushes:         {stat: "Flushes"},
	evBusReplayed:        {stat: "Replayed"},
	evBusTrimmed:         {stat: "Trimmed"},
	evBusStale:           {stat: "Stale"},
	evBusReplays:         {stat: "Replays"},
	evBusBacklogFlushes:  {stat: "BacklogFlushes"},
	evBusFlushesDeferred: {stat: "FlushesDeferred"},
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

// snapshotInto copies the counters of the events in [from, to) into the
// fields of *dst that they name (see events): one generic snapshot for
// Stats, SideStats and BusStats instead of one written out per type.
func (r *recorder) snapshotInto(dst any, from, to event) {
	v := reflect.ValueOf(dst).Elem()
	for e, f := range fieldsOf(v.Type(), from, to) {
		if f >= 0 {
			v.Field(f).SetUint(r.n[from+event(e)].Load())
		}
	}
}

// fieldIndexes caches, per snapshot type and event range, the field each
// event fills.
var fieldIndexes sync.Map // fieldKey -> []int

type fieldKey struct {
	t        reflect.Type
	from, to event
}

// fieldsOf returns, for each event in [from, to), the index of the field
// of t it fills, or -1.
func fieldsOf(t reflect.Type, from, to event) []int {
	k := fieldKey{t, from, to}
	if idx, ok := fieldIndexes.Load(k); ok {
		return idx.([]int)
	}
	idx := make([]int, to-from)
	for e := from; e < to; e++ {
		idx[e-from] = -1
		if f, ok := t.FieldByName(events[e].stat); ok && f.Type.Kind() == reflect.Uint64 {
			idx[e-from] = f.Index[0]
		}
	}
	fieldIndexes.Store(k, idx)
	return idx
}
