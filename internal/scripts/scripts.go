// Package scripts holds the Lua scripts of layercache: one script per
// operation (take a lease, write, delete, ...), shared by the three
// layouts, which differ only in where a key's value lives.
//
// # One key, one slot
//
// Every per-key script gets the same KEYS, all carrying one hash tag, so a
// script never leaves the key's Redis Cluster slot:
//
//	KEYS[1] the value's container: the value key (key per entry), the
//	        shard hash (Hash) or the raw key (Raw)
//	KEYS[2] the key's lease
//	KEYS[3] the key's copy fence (see Arm)
//	KEYS[4] Raw only: the version stamp
//
// and ARGV starts with the same three arguments:
//
//	ARGV[1] the layout: "k" (key per entry), "h" (Hash) or "r" (Raw)
//	ARGV[2] Hash: the field (the user key); "" otherwise
//	ARGV[3] Hash: now, Unix ms by the cache's clock (a field past its
//	        expiry counts as absent, it only waits for the sweep); ""
//	        otherwise
//
// followed by the operation's own. The notice channel a script publishes
// to carries the key's hash tag too; the publish command is an argument:
// SPUBLISH on a cluster (a notice stays on the key's shard), PUBLISH
// elsewhere. Scripts stick to commands that miniredis's Lua interpreter
// supports, so tests exercise the same text everywhere.
//
// # Leases
//
// A lease is a random token stored at the lease key with a PX expiry.
// Every write made on behalf of a lease compares the token in the same
// script: that comparison is the fencing check that keeps a holder whose
// lease expired, or was broken by a write, from caching what it loaded.
// Notices ("filled", "released", "broken") only mean "look again": a
// waiter reads the value from Redis after one, so a forged or lost notice
// costs at most a read or a poll, never a wrong value.
//
// # Write versions
//
// Every envelope carries a write version: a 48-bit counter (milliseconds)
// and a 16-bit writer id. A write is either
//
//   - fresh (mode "f": Set, a fill): it always lands, and stores
//     max(proposal, current counter + 1), keeping the proposal's writer
//     id, so versions of one entry grow in the order Redis applies writes;
//     or
//   - a copy (mode "c": the second side of a dual write, a backfill, an
//     upgrade): set-if-newer, applied only when the entry holds no version
//     at or past it.
//
// Versions are compared byte by byte: Lua numbers are doubles, which do
// not hold 64 bits, and string comparison follows the server's locale.
//
// A Raw value has no envelope; its version lives in the stamp key: the 8
// version bytes, then the SHA-1 (hex) of the payload it describes, or "-"
// for a cached "not found" (raw key absent). A stamp that does not
// describe what the raw key holds (other code overwrote or deleted it) is
// ignored: that value's version is unknown, older than any.
//
// The envelope's byte offsets come from internal/envelope, the one place
// that defines them.
package scripts

import (
	"strconv"
	"strings"

	"github.com/layercache/layercache/internal/envelope"
	"github.com/redis/go-redis/v9"
)

// envelopeOffsets substitutes the envelope's layout into Lua text.
var envelopeOffsets = strings.NewReplacer(
	"$MAGIC", strconv.Itoa(int(envelope.Magic)),
	"$FORMAT", strconv.Itoa(int(envelope.Version)),
	"$HEADER", strconv.Itoa(envelope.HeaderSize),
	"$FLAGS", strconv.Itoa(envelope.FlagsOffset+1),
	"$EXPIRES", strconv.Itoa(envelope.ExpiresAtOffset+1),
	"$VFROM", strconv.Itoa(envelope.VersionOffset+1),
	"$VTO", strconv.Itoa(envelope.VersionOffset+8),
	"$NEGATIVE", strconv.Itoa(int(envelope.FlagNegative)),
)

// lib holds every Lua function a script may use, in an order where each
// comes after those it calls. A script gets only the ones its body needs
// (see assemble): miniredis compiles a script's whole text on every call,
// and Redis keeps each script's text in its script cache.
var lib = envelopeOffsets.Replace(`
local function isenv(s)
  return s and string.len(s) >= $HEADER and string.byte(s, 1) == $MAGIC and string.byte(s, 2) == $FORMAT
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
  for i = $EXPIRES, $EXPIRES + 7 do n = n * 256 + string.byte(s, i) end
  return n
end
local function envversion(e) return string.sub(e, $VFROM, $VTO) end
local function negative(e) return math.floor(string.byte(e, $FLAGS) / $NEGATIVE) % 2 == 1 end
-- native returns the bytes stored for the entry, false when absent.
local function native()
  if layout == 'h' then return redis.call('HGET', KEYS[1], field) end
  return redis.call('GET', KEYS[1])
end
-- current returns the write version of the entry that holds cur (its
-- native bytes), nil when it has none: absent, not an envelope, a Hash
-- field past its expiry, or a Raw value its stamp does not describe.
local function current(cur)
  if layout == 'r' then
    local st = redis.call('GET', KEYS[4])
    if st and string.len(st) > 8 then
      local tail = string.sub(st, 9)
      if (tail == '-' and not cur) or (cur and tail == redis.sha1hex(cur)) then
        return string.sub(st, 1, 8)
      end
    end
    return nil
  end
  if isenv(cur) and not (now and expiresAt(cur) <= now) then return envversion(cur) end
  return nil
end
-- stored returns the version the entry claims without checking it (a Raw
-- stamp is trusted; an expired field still counts): it may overstate the
-- version, never understate it.
local function stored()
  local h
  if layout == 'r' then
    h = redis.call('GET', KEYS[4])
    if h and string.len(h) > 8 then return string.sub(h, 1, 8) end
    return nil
  elseif layout == 'h' then
    h = redis.call('HGET', KEYS[1], field)
  else
    h = redis.call('GETRANGE', KEYS[1], 0, $HEADER - 1)
  end
  if isenv(h) then return envversion(h) end
  return nil
end
-- put stores envelope e with write version v for ttl ms.
local function put(e, v, ttl)
  if layout == 'r' then
    if negative(e) then
      redis.call('DEL', KEYS[1])
      redis.call('SET', KEYS[4], v .. '-', 'PX', ttl)
    else
      local p = string.sub(e, $HEADER + 1)
      redis.call('SET', KEYS[1], p, 'PX', ttl)
      redis.call('SET', KEYS[4], v .. redis.sha1hex(p), 'PX', ttl)
    end
    return
  end
  if v ~= envversion(e) then
    e = string.sub(e, 1, $VFROM - 1) .. v .. string.sub(e, $VTO + 1)
  end
  if layout == 'h' then
    redis.call('HSET', KEYS[1], field, e)
    local t = tonumber(ttl)
    if redis.call('PTTL', KEYS[1]) < t then redis.call('PEXPIRE', KEYS[1], t) end
  else
    redis.call('SET', KEYS[1], e, 'PX', ttl)
  end
end
-- write applies envelope e as a fresh write or a copy (see the package
-- doc) and returns the version stored, nil when a copy was not newer.
local function write(e, ttl, mode)
  local v = envversion(e)
  local cur = current(native())
  if cur then
    if mode == 'c' then
      if cmpb(cur, 1, v, 1, 8) >= 0 then return nil end
    else
      v = bump(cur, v)
    end
  end
  put(e, v, ttl)
  return v
end
-- drop deletes the entry's value (and stamp).
local function drop()
  if layout == 'h' then
    redis.call('HDEL', KEYS[1], field)
  elseif layout == 'r' then
    redis.call('DEL', KEYS[1], KEYS[4])
  else
    redis.call('DEL', KEYS[1])
  end
end
`)

// keyArgs opens every per-key script: the common arguments (see the
// package doc).
const keyArgs = "\nlocal layout, field, now = ARGV[1], ARGV[2], tonumber(ARGV[3])\n"

// script is a per-key script: the common arguments, the functions of lib
// that body needs, and body.
func script(body string) *redis.Script { return redis.NewScript(keyArgs + assemble(body)) }

// luaFunc is one function of lib.
type luaFunc struct{ name, text string }

// libFuncs are lib's functions, in lib's order.
var libFuncs = func() []luaFunc {
	var code []string // lib without its comments, which stay in the Go source
	for _, line := range strings.Split(lib, "\n") {
		if !strings.HasPrefix(strings.TrimSpace(line), "--") {
			code = append(code, line)
		}
	}
	var out []luaFunc
	for _, part := range strings.Split(strings.Join(code, "\n"), "\nlocal function ")[1:] {
		name := part[:strings.IndexByte(part, '(')]
		out = append(out, luaFunc{name: name, text: "\nlocal function " + strings.TrimRight(part, "\n") + "\n"})
	}
	return out
}()

// assemble returns the functions of lib that body calls, directly or
// through each other, in lib's order, followed by body.
func assemble(body string) string {
	need := map[string]bool{}
	for grew := true; grew; {
		grew = false
		text := body
		for _, f := range libFuncs {
			if need[f.name] {
				text += f.text
			}
		}
		for _, f := range libFuncs {
			if !need[f.name] && strings.Contains(text, f.name+"(") {
				need[f.name], grew = true, true
			}
		}
	}
	var b strings.Builder
	for _, f := range libFuncs {
		if need[f.name] {
			b.WriteString(f.text)
		}
	}
	b.WriteString(body)
	return b.String()
}

// Acquire takes the lease if it is free, and reads the entry in the same
// step when asked to.
//
//	ARGV[4] token, ARGV[5] lease TTL ms, ARGV[6] "1" to read the entry
//
// It returns {value, taken, lease PTTL, value PTTL, stamp, stamp PTTL}:
// value is the entry's native bytes (false when absent or not read),
// taken is 1 when the token now holds the lease (lease PTTL is then 0),
// and the last three are read for Raw only (-2 and false otherwise).
// Reading the value in the same step closes the window in which a fill
// lands between a caller's miss and its attempt: such a caller sees the
// value instead of taking a fresh lease and loading again.
var Acquire = script(`
local v, vt, s, st = false, -2, false, -2
if ARGV[6] == '1' then
  v = native()
  if layout == 'r' then
    vt = redis.call('PTTL', KEYS[1])
    s = redis.call('GET', KEYS[4])
    st = redis.call('PTTL', KEYS[4])
  end
end
if redis.call('SET', KEYS[2], ARGV[4], 'NX', 'PX', ARGV[5]) then
  return {v, 1, 0, vt, s, st}
end
return {v, 0, redis.call('PTTL', KEYS[2]), vt, s, st}
`)

// Renew extends the lease if the token still holds it.
//
//	ARGV[4] token, ARGV[5] lease TTL ms
//
// It returns 1 when renewed, 0 when the lease is gone or held by another.
var Renew = script(`
if redis.call('GET', KEYS[2]) == ARGV[4] then
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
  return 1
end
return 0
`)

// Release drops the lease if the token holds it and publishes a notice.
//
//	ARGV[4] token, ARGV[5] publish command, ARGV[6] notice channel
//
// It returns 1 when released, 0 when the token no longer held it.
var Release = script(`
if redis.call('GET', KEYS[2]) == ARGV[4] then
  redis.call('DEL', KEYS[2])
  redis.call(ARGV[5], ARGV[6], 'released')
  return 1
end
return 0
`)

// BreakLease drops the lease, whoever holds it, and publishes a notice if
// there was one: the second side of a dual Set, whose lease an instance
// still on the other side of a phase switch may hold.
//
//	ARGV[4] publish command, ARGV[5] notice channel
var BreakLease = script(`
if redis.call('DEL', KEYS[2]) == 1 then
  redis.call(ARGV[4], ARGV[5], 'broken')
  return 1
end
return 0
`)

// Write is the one write of every layout: a fresh write or a copy (see
// the package doc), optionally under a lease, behind a copy fence, or
// breaking the lease.
//
//	ARGV[4] envelope, ARGV[5] TTL ms, ARGV[6] mode ("f" fresh, "c" copy),
//	ARGV[7] lease token ("" for none), ARGV[8] "1" to break the lease,
//	ARGV[9] copy fence token ("" for none), ARGV[10] publish command,
//	ARGV[11] notice channel
//
// It returns the stored write version (8 bytes), or nil when nothing was
// written:
//
//   - under a lease (a fill): unless the token still holds the lease. A
//     fill that lands releases the lease and publishes "filled". A lost
//     lease that nobody holds any more (a write broke it) gets a
//     "released" notice, so that waiters stop waiting for a fill that will
//     not come; a lease held by another token is left alone, its holder
//     will notify.
//   - behind a fence: unless the token is still in the fence, which it
//     takes out (see Arm).
//   - a copy: unless it is newer than what the entry holds.
//
// Breaking the lease (Set) drops it whoever holds it, in the same step
// as the write, so that a fill that started before this write cannot land
// after it; a broken lease gets a "broken" notice.
var Write = script(`
if ARGV[7] ~= '' then
  local holder = redis.call('GET', KEYS[2])
  if holder ~= ARGV[7] then
    if not holder then redis.call(ARGV[10], ARGV[11], 'released') end
    return false
  end
end
if ARGV[9] ~= '' and redis.call('SREM', KEYS[3], ARGV[9]) == 0 then return false end
local v = write(ARGV[4], ARGV[5], ARGV[6])
if ARGV[7] ~= '' then
  redis.call('DEL', KEYS[2])
  redis.call(ARGV[10], ARGV[11], 'filled')
elseif ARGV[8] == '1' and redis.call('DEL', KEYS[2]) == 1 then
  redis.call(ARGV[10], ARGV[11], 'broken')
end
return v or false
`)

// Delete removes the entry, its copy fence and its lease in one step, and
// publishes a notice if there was a lease: a fill that started before the
// delete cannot land after it (its token is gone), nor can a copy whose
// source was read before it (its fence is gone), and waiters in other
// processes look again at once instead of sleeping until the broken lease
// would have expired. Value and lease go together, in one script, so no
// fill can slip in between them whatever the server's script cache holds.
//
//	ARGV[4] publish command, ARGV[5] notice channel
var Delete = script(`
drop()
redis.call('DEL', KEYS[3])
if redis.call('DEL', KEYS[2]) == 1 then
  redis.call(ARGV[4], ARGV[5], 'broken')
end
return 1
`)

// Take deletes the entry and its copy fence (a pending copy must not land
// on the side a single-side phase emptied) and returns the version it
// held (as Version does), or nil.
var Take = script(`
local v = stored()
drop()
redis.call('DEL', KEYS[3])
return v or false
`)

// Version returns the version the entry holds: the one in its envelope
// header (expired Hash fields included), a Raw stamp's without checking it
// against the payload; nil when none. It may overstate the version (a
// stale stamp), which only makes a later write's version higher; it never
// understates it.
var Version = script(`
return stored() or false
`)

// CAS is a repair: if the entry still holds the expected native bytes,
// replace it by an envelope or delete it.
//
//	ARGV[4] "1" if the entry was present, ARGV[5] its native bytes,
//	ARGV[6] the new envelope ("" to delete), ARGV[7] TTL ms
//
// It returns 1 when applied, 0 when the entry changed since it was read.
var CAS = script(`
local cur = native()
if ARGV[4] == '1' then
  if cur ~= ARGV[5] then return 0 end
elseif cur then
  return 0
end
if ARGV[6] == '' then
  drop()
else
  put(ARGV[6], envversion(ARGV[6]), ARGV[7])
end
return 1
`)

// Arm adds a token to the key's copy fence: a set of tokens, in the slot
// of the side a copy will be written to, that expires ARGV[5] ms after the
// last token was added.
//
//	ARGV[4] token, ARGV[5] fence TTL ms, ARGV[6] "1" to also return the
//	entry's version (as Version does), read after the fence is armed
//
// A copy is a write of a value read elsewhere: the second side of a dual
// write or fill, a backfill after a fallback read, an upgrade from an
// older version. The copier arms a fence on the destination before it
// reads (or writes) the source, and the copy is written (Write with a
// fence token) only if its token is still in the fence, which the write
// removes. A Delete deletes the fence with the value, so a copy whose
// source was read before the Delete cannot land after it, however late it
// runs; a fence that expired voids its copies, which only costs a miss.
// Copies of concurrent writers each have their own token, so they all
// land, set-if-newer, and the sides converge.
var Arm = script(`
redis.call('SADD', KEYS[3], ARGV[4])
redis.call('PEXPIRE', KEYS[3], ARGV[5])
if ARGV[6] == '1' then return stored() or false end
return false
`)

// HashSweep deletes the listed fields that are still expired (or not
// envelopes) when it runs, so a field rewritten since the HSCAN that
// listed it survives. KEYS[1] shard hash; ARGV now ms, fields...
var HashSweep = redis.NewScript(assemble(`
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
`))

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
