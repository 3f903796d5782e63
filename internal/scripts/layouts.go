package scripts

import "github.com/redis/go-redis/v9"

// Versioned writes of the three layouts, and their lease scripts.
//
// Every envelope carries a write version (bytes 33-40, big-endian): a
// 48-bit counter (milliseconds) and a 16-bit writer id. A write is either
//
//   - fresh (mode 'f': Set, a fill): it always lands, and stores
//     max(proposal, current counter + 1), keeping the proposal's writer id,
//     so versions of one entry grow in the order Redis applies writes; or
//   - a copy (mode 'c': the second side of a dual write, a backfill, an
//     upgrade): set-if-newer, applied only when the entry holds no version
//     at or past it.
//
// Versions are compared byte by byte: Lua numbers are doubles, which do
// not hold 64 bits, and string comparison follows the server's locale.
//
// A Raw value has no envelope; its version lives in a stamp key in its
// slot: the 8 version bytes, then the SHA-1 (hex) of the payload it
// describes, or "-" for a cached "not found" (raw key absent). A stamp
// that does not describe what the raw key holds (other code overwrote or
// deleted it) is ignored: that value's version is unknown, older than any.

// Lib is the library every versioned script starts with.
const Lib = `
local function isenv(s)
  return s and string.len(s) >= 40 and string.byte(s, 1) == 199 and string.byte(s, 2) == 1
end
local function cmpb(a, ai, b, bi, n)
  for i = 0, n - 1 do
    local x, y = string.byte(a, ai + i), string.byte(b, bi + i)
    if x ~= y then
      if x < y then return -1 end
      return 1
    end
  end
  return 0
end
local function bump(cur, p)
  if cmpb(cur, 1, p, 1, 6) < 0 then return p end
  local b = {string.byte(cur, 1, 6)}
  for i = 6, 1, -1 do
    if b[i] < 255 then
      b[i] = b[i] + 1
      break
    end
    b[i] = 0
  end
  return string.char(b[1], b[2], b[3], b[4], b[5], b[6]) .. string.sub(p, 7, 8)
end
local function expiresAt(s)
  local n = 0
  for i = 21, 28 do n = n * 256 + string.byte(s, i) end
  return n
end
local function apply(cur, env, mode, now)
  local v = string.sub(env, 33, 40)
  if isenv(cur) and not (now and expiresAt(cur) <= now) then
    if mode == 'c' then
      if cmpb(cur, 33, env, 33, 8) >= 0 then return nil, nil end
    else
      local nv = bump(string.sub(cur, 33, 40), v)
      if nv ~= v then
        v = nv
        env = string.sub(env, 1, 32) .. v .. string.sub(env, 41)
      end
    end
  end
  return env, v
end
local function kvput(k, env, ttl, mode)
  local e, v = apply(redis.call('GET', k), env, mode, nil)
  if not e then return nil end
  redis.call('SET', k, e, 'PX', ttl)
  return v
end
local function hashput(hk, field, env, ttl, mode, now)
  local e, v = apply(redis.call('HGET', hk, field), env, mode, tonumber(now))
  if not e then return nil end
  redis.call('HSET', hk, field, e)
  local t = tonumber(ttl)
  if redis.call('PTTL', hk) < t then redis.call('PEXPIRE', hk, t) end
  return v
end
local function rawput(rk, sk, payload, v, ttl, mode, neg)
  local cur = redis.call('GET', rk)
  local st = redis.call('GET', sk)
  if st and string.len(st) > 8 then
    local tail = string.sub(st, 9)
    if (tail == '-' and not cur) or (cur and tail == redis.sha1hex(cur)) then
      local curv = string.sub(st, 1, 8)
      if mode == 'c' then
        if cmpb(curv, 1, v, 1, 8) >= 0 then return nil end
      else
        v = bump(curv, v)
      end
    end
  end
  if neg == '1' then
    redis.call('DEL', rk)
    redis.call('SET', sk, v .. '-', 'PX', ttl)
  else
    redis.call('SET', rk, payload, 'PX', ttl)
    redis.call('SET', sk, v .. redis.sha1hex(payload), 'PX', ttl)
  end
  return v
end
`

// KVWrite writes a key-per-entry value. KEYS[1] value, KEYS[2] (for a
// fenced copy) the key's copy fence; ARGV envelope, TTL ms, mode, fence
// token. Returns the stored version (8 bytes), or nil when a copy was not
// newer or its fence was gone (see Arm).
var KVWrite = redis.NewScript(Lib + `
if KEYS[2] and redis.call('SREM', KEYS[2], ARGV[4]) == 0 then return false end
local v = kvput(KEYS[1], ARGV[1], ARGV[2], ARGV[3])
if not v then return false end
return v
`)

// KVCAS is a repair: KEYS[1] value; ARGV expect-present ('1'/'0'),
// expected bytes, new envelope (empty: delete), TTL ms. Returns 1 when
// applied, 0 when the key changed since it was read.
var KVCAS = redis.NewScript(`
local cur = redis.call('GET', KEYS[1])
if ARGV[1] == '1' then
  if cur ~= ARGV[2] then return 0 end
elseif cur then
  return 0
end
if ARGV[3] == '' then redis.call('DEL', KEYS[1]) else redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4]) end
return 1
`)

// KVTake deletes a value and its copy fence (a pending copy must not
// land on the side a single-side phase emptied) and returns its first 40
// bytes (its header, if it is an envelope). KEYS[1] value, KEYS[2] fence.
var KVTake = redis.NewScript(`
local h = redis.call('GETRANGE', KEYS[1], 0, 39)
redis.call('DEL', KEYS[1], KEYS[2])
return h
`)

// HashWrite writes a Hash layout field. KEYS[1] shard hash; ARGV field,
// envelope, TTL ms, mode, now (the cache's clock, ms). A field past its
// expiry counts as absent: it only waits for the sweep and must not hold
// back a copy. The hash key lives as long as its longest-lived field. A
// fenced copy also gets KEYS[2], the field's copy fence, and ARGV[6], its
// token (see Arm).
var HashWrite = redis.NewScript(Lib + `
if KEYS[2] and redis.call('SREM', KEYS[2], ARGV[6]) == 0 then return false end
local v = hashput(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])
if not v then return false end
return v
`)

// HashCAS is a repair: KEYS[1] shard hash; ARGV field, expect-present,
// expected bytes, new envelope (empty: delete), TTL ms.
var HashCAS = redis.NewScript(`
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if ARGV[2] == '1' then
  if cur ~= ARGV[3] then return 0 end
elseif cur then
  return 0
end
if ARGV[4] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
  return 1
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[4])
local ttl = tonumber(ARGV[5])
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return 1
`)

// HashTake deletes a field and its copy fence and returns the field's
// first 40 bytes. KEYS[1] shard hash, KEYS[2] fence; ARGV[1] field.
var HashTake = redis.NewScript(`
redis.call('DEL', KEYS[2])
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v then return false end
redis.call('HDEL', KEYS[1], ARGV[1])
return string.sub(v, 1, 40)
`)

// HashSweep deletes the listed fields that are still expired (or not
// envelopes) when it runs, so a field rewritten since the HSCAN that
// listed it survives. KEYS[1] shard hash; ARGV now ms, fields...
var HashSweep = redis.NewScript(Lib + `
local now = tonumber(ARGV[1])
local n = 0
for i = 2, #ARGV do
  local v = redis.call('HGET', KEYS[1], ARGV[i])
  if v and ((not isenv(v)) or expiresAt(v) <= now) then
    redis.call('HDEL', KEYS[1], ARGV[i])
    n = n + 1
  end
end
return n
`)

// SweepClaim lets one instance sweep a shard per interval. KEYS[1] claim
// key; ARGV now ms, interval ms. Times are the cache's clock, not the
// server's, so the claim works under a test's manual clock too.
var SweepClaim = redis.NewScript(`
local t = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
local now = tonumber(ARGV[1])
if t > now then return 0 end
redis.call('SET', KEYS[1], tostring(now + tonumber(ARGV[2])), 'PX', tonumber(ARGV[2]) * 2)
return 1
`)

// RawWrite writes a Raw value and its stamp. KEYS raw key, stamp, and
// for a fenced copy the copy fence; ARGV payload, proposed version (8
// bytes), TTL ms, mode, negative ('1'/'0'), fence token.
var RawWrite = redis.NewScript(Lib + `
if KEYS[3] and redis.call('SREM', KEYS[3], ARGV[6]) == 0 then return false end
local v = rawput(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])
if not v then return false end
return v
`)

// RawCAS is a repair: KEYS raw key, stamp; ARGV expect-present, expected
// payload, op ('s' set, 'n' not-found, 'd' delete), payload, version, TTL
// ms.
var RawCAS = redis.NewScript(`
local cur = redis.call('GET', KEYS[1])
if ARGV[1] == '1' then
  if cur ~= ARGV[2] then return 0 end
elseif cur then
  return 0
end
if ARGV[3] == 'd' then
  redis.call('DEL', KEYS[1], KEYS[2])
elseif ARGV[3] == 'n' then
  redis.call('DEL', KEYS[1])
  redis.call('SET', KEYS[2], ARGV[5] .. '-', 'PX', ARGV[6])
else
  redis.call('SET', KEYS[1], ARGV[4], 'PX', ARGV[6])
  redis.call('SET', KEYS[2], ARGV[5] .. redis.sha1hex(ARGV[4]), 'PX', ARGV[6])
end
return 1
`)

// RawTake deletes a Raw value, its stamp and its copy fence, and returns
// the stamp. KEYS raw key, stamp, fence.
var RawTake = redis.NewScript(`
local st = redis.call('GET', KEYS[2])
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return st or false
`)

// Lease scripts of the Hash and Raw layouts: as Acquire, Fill and
// Overwrite, with the value written as the layout keeps it. Renew and
// Release touch only the lease, and serve every layout.

// HashAcquire is Acquire for a Hash field. KEYS[1] shard hash, KEYS[2]
// lease; ARGV token, lease TTL ms, "1" to read the field, field.
var HashAcquire = redis.NewScript(`
local v = false
if ARGV[3] == '1' then v = redis.call('HGET', KEYS[1], ARGV[4]) end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
	return {v, 1, 0}
end
return {v, 0, redis.call('PTTL', KEYS[2])}
`)

// HashFill is Fill for a Hash field. KEYS[1] shard hash, KEYS[2] lease;
// ARGV token, envelope, TTL ms, publish command, notice channel, field,
// now ms. Returns the stored version when written, 0 when the lease was
// lost.
var HashFill = redis.NewScript(Lib + `
local holder = redis.call('GET', KEYS[2])
if holder == ARGV[1] then
	local v = hashput(KEYS[1], ARGV[6], ARGV[2], ARGV[3], 'f', ARGV[7])
	redis.call('DEL', KEYS[2])
	redis.call(ARGV[4], ARGV[5], 'filled')
	return v
end
if not holder then
	redis.call(ARGV[4], ARGV[5], 'released')
end
return 0
`)

// HashOverwrite is Overwrite for a Hash field. KEYS[1] shard hash,
// KEYS[2] lease; ARGV envelope, TTL ms, publish command, notice channel,
// field, now ms. Returns the stored version.
var HashOverwrite = redis.NewScript(Lib + `
local v = hashput(KEYS[1], ARGV[5], ARGV[1], ARGV[2], 'f', ARGV[6])
if redis.call('DEL', KEYS[2]) == 1 then
	redis.call(ARGV[3], ARGV[4], 'broken')
end
return v
`)

// RawAcquire is Acquire for a Raw value. KEYS raw key, stamp, lease; ARGV
// token, lease TTL ms, "1" to read the value. Returns {value, value PTTL,
// stamp, stamp PTTL, taken, lease PTTL}, the value and stamp false when
// absent or not read.
var RawAcquire = redis.NewScript(`
local v, vt, s, st = false, -2, false, -2
if ARGV[3] == '1' then
	v = redis.call('GET', KEYS[1])
	vt = redis.call('PTTL', KEYS[1])
	s = redis.call('GET', KEYS[2])
	st = redis.call('PTTL', KEYS[2])
end
if redis.call('SET', KEYS[3], ARGV[1], 'NX', 'PX', ARGV[2]) then
	return {v, vt, s, st, 1, 0}
end
return {v, vt, s, st, 0, redis.call('PTTL', KEYS[3])}
`)

// RawFill is Fill for a Raw value. KEYS raw key, stamp, lease; ARGV token,
// payload, version, TTL ms, negative, publish command, notice channel.
var RawFill = redis.NewScript(Lib + `
local holder = redis.call('GET', KEYS[3])
if holder == ARGV[1] then
	local v = rawput(KEYS[1], KEYS[2], ARGV[2], ARGV[3], ARGV[4], 'f', ARGV[5])
	redis.call('DEL', KEYS[3])
	redis.call(ARGV[6], ARGV[7], 'filled')
	return v
end
if not holder then
	redis.call(ARGV[6], ARGV[7], 'released')
end
return 0
`)

// RawOverwrite is Overwrite for a Raw value. KEYS raw key, stamp, lease;
// ARGV payload, version, TTL ms, negative, publish command, notice
// channel.
var RawOverwrite = redis.NewScript(Lib + `
local v = rawput(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], 'f', ARGV[4])
if redis.call('DEL', KEYS[3]) == 1 then
	redis.call(ARGV[5], ARGV[6], 'broken')
end
return v
`)

// BreakLease drops a lease, whoever holds it, and publishes a notice if
// there was one: the second side of a dual Set, whose lease a lagging
// instance may hold. KEYS[1] value (pins the slot), KEYS[2] lease; ARGV
// publish command, notice channel.
var BreakLease = redis.NewScript(`
if redis.call('DEL', KEYS[2]) == 1 then
	redis.call(ARGV[1], ARGV[2], 'broken')
	return 1
end
return 0
`)

// Arm adds a token to a key's copy fence: a set of tokens, in the slot of
// the side a copy will be written to, that expires ARGV[2] ms after the
// last token was added. KEYS[1] fence; ARGV token, TTL ms.
//
// A copy is a write of a value read elsewhere: the second side of a dual
// write or fill, a backfill after a fallback read, an upgrade from an
// older version. The copier arms a fence on the destination before it
// reads (or writes) the source, and the copy is written, by the layout's
// write script, only if its token is still in the fence, which the
// script removes. A Delete deletes the fence with the value, so a copy
// whose source was read before the Delete cannot land after it, however
// late it runs; a fence that expired voids its copies, which only costs a
// miss. Copies of concurrent writers each have their own token, so they
// all land, set-if-newer, and the sides converge.
var Arm = redis.NewScript(`
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
`)
