// Package scripts holds the Lua scripts of layercache: the Redis lease
// (this file) and the versioned writes of the layouts (layouts.go).
//
// Every script takes a key's value and lease as KEYS[1] and KEYS[2]; both
// carry the key's hash tag, and the notice channel a script publishes to
// (an ARGV, since channels are not keys) carries it too, so a script never
// leaves the key's Redis Cluster slot. The publish command is an ARGV as
// well: SPUBLISH on a cluster, so a notice stays on the key's shard, and
// PUBLISH elsewhere. Scripts stick to commands that miniredis's Lua
// interpreter supports, so tests exercise the same text everywhere.
//
// A lease is a random token stored at the lease key with a PX expiry. Every
// write made on behalf of a lease compares the token in the same script:
// that comparison is the fencing check that keeps a holder whose lease
// expired, or was broken by a write, from caching what it loaded.
//
// Notices ("filled", "released", "broken") only mean "look again": a
// waiter reads the value from Redis after one, so a forged or lost notice
// costs at most a read or a poll, never a wrong value.
package scripts

import "github.com/redis/go-redis/v9"

// Acquire takes the lease if it is free.
//
//	KEYS[1] value, KEYS[2] lease
//	ARGV[1] token, ARGV[2] lease TTL in ms, ARGV[3] "1" to also read the value
//
// It returns {value or nil, 1, 0} when the lease was taken and
// {value or nil, 0, PTTL of the lease} when someone holds it. Reading the
// value in the same step closes the window in which a fill lands between a
// caller's miss and its attempt: such a caller sees the value instead of
// taking a fresh lease and loading again.
var Acquire = redis.NewScript(`
local v = false
if ARGV[3] == '1' then v = redis.call('GET', KEYS[1]) end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
	return {v, 1, 0}
end
return {v, 0, redis.call('PTTL', KEYS[2])}
`)

// Renew extends the lease if the token still holds it.
//
//	KEYS[1] value (unused; it pins the slot), KEYS[2] lease
//	ARGV[1] token, ARGV[2] lease TTL in ms
//
// It returns 1 when renewed, 0 when the lease is gone or held by another.
var Renew = redis.NewScript(`
if redis.call('GET', KEYS[2]) == ARGV[1] then
	redis.call('PEXPIRE', KEYS[2], ARGV[2])
	return 1
end
return 0
`)

// Fill writes the value if the token still holds the lease, releases the
// lease and publishes a notice.
//
//	KEYS[1] value, KEYS[2] lease
//	ARGV[1] token, ARGV[2] envelope, ARGV[3] value TTL in ms,
//	ARGV[4] publish command, ARGV[5] notice channel
//
// It returns the stored write version (8 bytes; the write is fresh, see
// Lib) when the value was written, 0 when the lease was lost. A lost
// lease that nobody holds any more (a Delete or Set broke it) still gets a
// notice, so that waiters stop waiting for a fill that will not come; a
// lease held by another token is left alone, its holder will notify.
var Fill = redis.NewScript(Lib + `
local holder = redis.call('GET', KEYS[2])
if holder == ARGV[1] then
	local v = kvput(KEYS[1], ARGV[2], ARGV[3], 'f')
	redis.call('DEL', KEYS[2])
	redis.call(ARGV[4], ARGV[5], 'filled')
	return v
end
if not holder then
	redis.call(ARGV[4], ARGV[5], 'released')
end
return 0
`)

// Release drops the lease if the token holds it and publishes a notice.
//
//	KEYS[1] value (unused; it pins the slot), KEYS[2] lease
//	ARGV[1] token, ARGV[2] publish command, ARGV[3] notice channel
//
// It returns 1 when released, 0 when the token no longer held it.
var Release = redis.NewScript(`
if redis.call('GET', KEYS[2]) == ARGV[1] then
	redis.call('DEL', KEYS[2])
	redis.call(ARGV[2], ARGV[3], 'released')
	return 1
end
return 0
`)

// Overwrite writes the value unconditionally and drops the lease, whoever
// holds it, then publishes a notice. It is the write of Cache.Set: a fill
// that started before it can no longer land after it.
//
//	KEYS[1] value, KEYS[2] lease
//	ARGV[1] envelope, ARGV[2] value TTL in ms,
//	ARGV[3] publish command, ARGV[4] notice channel
//
// The write is fresh (see Lib); it returns the stored write version.
var Overwrite = redis.NewScript(Lib + `
local v = kvput(KEYS[1], ARGV[1], ARGV[2], 'f')
if redis.call('DEL', KEYS[2]) == 1 then
	redis.call(ARGV[3], ARGV[4], 'broken')
end
return v
`)
