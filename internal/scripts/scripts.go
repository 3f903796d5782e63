// Package scripts holds the Lua scripts of layercache: one script per
// operation (take a lease, write, delete, ...), shared by the three
// layouts, which differ only in where a key's value lives.
//
// # Batches of keys, each in its slot
//
// Every per-key script works on a batch of keys (one or many) that share a
// layout, given as items: each item's KEYS are consecutive, all carrying
// one hash tag, so on a Redis Cluster a batch of keys of one slot never
// leaves that slot (callers group keys by slot):
//
//	KEYS[i+1] the value's container: the value key (key per entry), the
//	          shard hash (Hash) or the raw key (Raw)
//	KEYS[i+2] the key's lease
//	KEYS[i+3] the key's copy fence (see Arm)
//	KEYS[i+4] Raw only: the version stamp
//
// (three keys an item, four for Raw). ARGV starts with two arguments for
// the whole batch:
//
//	ARGV[1] the layout: "k" (key per entry), "h" (Hash) or "r" (Raw)
//	ARGV[2] Hash: now, Unix ms by the cache's clock (a field past its
//	        expiry counts as absent, it only waits for the sweep); ""
//	        otherwise
//
// then, item after item, the item's arguments: the Hash field (the user
// key; "" for other layouts), then the operation's own, a fixed number of
// them per script. A script returns an array with one reply per item. The
// notice channel a script publishes to carries the key's hash tag too; the
// publish command is an argument: SPUBLISH on a cluster (a notice stays on
// the key's shard), PUBLISH elsewhere. Scripts stick to commands that
// miniredis's Lua interpreter supports, so tests exercise the same text
// everywhere.
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
  if layout == 'h' then return redis.call('HGET', kval, field) end
  return redis.call('GET', kval)
end
-- current returns the write version of the entry that holds cur (its
-- native bytes), nil when it has none: absent, not an envelope, a Hash
-- field past its expiry, or a Raw value its stamp does not describe.
local function current(cur)
  if layout == 'r' then
    local st = redis.call('GET', kstamp)
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
    h = redis.call('GET', kstamp)
    if h and string.len(h) > 8 then return string.sub(h, 1, 8) end
    return nil
  elseif layout == 'h' then
    h = redis.call('HGET', kval, field)
  else
    h = redis.call('GETRANGE', kval, 0, $HEADER - 1)
  end
  if isenv(h) then return envversion(h) end
  return nil
end
-- put stores envelope e with write version v for ttl ms.
local function put(e, v, ttl)
  if layout == 'r' then
    if negative(e) then
      redis.call('DEL', kval)
      redis.call('SET', kstamp, v .. '-', 'PX', ttl)
    else
      local p = string.sub(e, $HEADER + 1)
      redis.call('SET', kval, p, 'PX', ttl)
      redis.call('SET', kstamp, v .. redis.sha1hex(p), 'PX', ttl)
    end
    return
  end
  if v ~= envversion(e) then
    e = string.sub(e, 1, $VFROM - 1) .. v .. string.sub(e, $VTO + 1)
  end
  if layout == 'h' then
    redis.call('HSET', kval, field, e)
    local t = tonumber(ttl)
    if redis.call('PTTL', kval) < t then redis.call('PEXPIRE', kval, t) end
  else
    redis.call('SET', kval, e, 'PX', ttl)
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
    redis.call('HDEL', kval, field)
  elseif layout == 'r' then
    redis.call('DEL', kval, kstamp)
  else
    redis.call('DEL', kval)
  end
end
`)

// batchHead opens every per-key script: the batch's arguments, and the
// current item's keys and field, which lib's functions read.
const batchHead = `
local layout, now = ARGV[1], tonumber(ARGV[2])
local field, kval, klease, kfence, kstamp = '', nil, nil, nil, nil
`

// batchLoop runs item on every item of the batch: it points kval,
// klease, kfence, kstamp and field at the item, and passes item the index
// in ARGV before the item's arguments (the field is ARGV[a + 1], the
// operation's arguments follow it).
const batchLoop = `
local stride = 3
if layout == 'r' then stride = 4 end
local out = {}
for i = 0, #KEYS / stride - 1 do
  local o = i * stride
  kval, klease, kfence, kstamp = KEYS[o + 1], KEYS[o + 2], KEYS[o + 3], KEYS[o + 4]
  local a = 2 + i * $PER
  field = ARGV[a + 1]
  out[i + 1] = item(a)
end
return out
`

// PerItem is the number of ARGV entries of one item of each per-key
// script, its field included.
var PerItem = map[*redis.Script]int{}

// script is a per-key script whose item (a function of a, see batchLoop;
// it must not return nil) is body, with per arguments an item (its field
// included).
func script(per int, body string) *redis.Script {
	item := "\nlocal function item(a)" + body + "end\n"
	s := redis.NewScript(batchHead + assemble(item) + strings.Replace(batchLoop, "$PER", strconv.Itoa(per), 1))
	PerItem[s] = per
	return s
}

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
// step when asked to. Item arguments: field, token, lease TTL ms, "1" to
// read the entry.
//
// Each reply is {value, taken, lease PTTL, value PTTL, stamp, stamp PTTL}:
// value is the entry's native bytes (false when absent or not read),
// taken is 1 when the token now holds the lease (lease PTTL is then 0),
// and the last three are read for Raw only (-2 and false otherwise).
// Reading the value in the same step closes the window in which a fill
// lands between a caller's miss and its attempt: such a caller sees the
// value instead of taking a fresh lease and loading again.
var Acquire = script(4, `
local token, ttl, read = ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
local v, vt, s, st = false, -2, false, -2
if read == '1' then
  v = native()
  if layout == 'r' then
    vt = redis.call('PTTL', kval)
    s = redis.call('GET', kstamp)
    st = redis.call('PTTL', kstamp)
  end
end
if redis.call('SET', klease, token, 'NX', 'PX', ttl) then
  return {v, 1, 0, vt, s, st}
end
return {v, 0, redis.call('PTTL', klease), vt, s, st}
`)

// Renew extends the lease if the token still holds it. Item arguments:
// field, token, lease TTL ms. Each reply is 1 when renewed, 0 when the
// lease is gone or held by another.
var Renew = script(3, `
if redis.call('GET', klease) == ARGV[a + 2] then
  redis.call('PEXPIRE', klease, ARGV[a + 3])
  return 1
end
return 0
`)

// Release drops the lease if the token holds it and publishes a notice.
// Item arguments: field, token, publish command, notice channel. Each
// reply is 1 when released, 0 when the token no longer held it.
var Release = script(4, `
if redis.call('GET', klease) == ARGV[a + 2] then
  redis.call('DEL', klease)
  redis.call(ARGV[a + 3], ARGV[a + 4], 'released')
  return 1
end
return 0
`)

// BreakLease drops the lease, whoever holds it, and publishes a notice if
// there was one: the second side of a dual Set, whose lease an instance
// still on the other side of a phase switch may hold. Item arguments:
// field, publish command, notice channel.
var BreakLease = script(3, `
if redis.call('DEL', klease) == 1 then
  redis.call(ARGV[a + 2], ARGV[a + 3], 'broken')
  return 1
end
return 0
`)

// Write is the one write of every layout: a fresh write or a copy (see
// the package doc), optionally under a lease, behind a copy fence, or
// breaking the lease. Item arguments: field, envelope, TTL ms, mode ("f"
// fresh, "c" copy), lease token ("" for none), "1" to break the lease,
// copy fence token ("" for none), publish command, notice channel.
//
// Each reply is the stored write version (8 bytes), or nil when nothing
// was written:
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
var Write = script(9, `
local e, ttl, mode, lease, brk, fence, pub, ch =
  ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5], ARGV[a + 6], ARGV[a + 7], ARGV[a + 8], ARGV[a + 9]
if lease ~= '' then
  local holder = redis.call('GET', klease)
  if holder ~= lease then
    if not holder then redis.call(pub, ch, 'released') end
    return false
  end
end
if fence ~= '' and redis.call('SREM', kfence, fence) == 0 then return false end
local v = write(e, ttl, mode)
if lease ~= '' then
  redis.call('DEL', klease)
  redis.call(pub, ch, 'filled')
elseif brk == '1' and redis.call('DEL', klease) == 1 then
  redis.call(pub, ch, 'broken')
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
// Item arguments: field, publish command, notice channel.
var Delete = script(3, `
drop()
redis.call('DEL', kfence)
if redis.call('DEL', klease) == 1 then
  redis.call(ARGV[a + 2], ARGV[a + 3], 'broken')
end
return 1
`)

// Take deletes the entry and its copy fence (a pending copy must not land
// on the side a single-side phase emptied) and replies the version it held
// (as Version does), or nil. Item arguments: field.
var Take = script(1, `
local v = stored()
drop()
redis.call('DEL', kfence)
return v or false
`)

// Version replies the version the entry holds: the one in its envelope
// header (expired Hash fields included), a Raw stamp's without checking it
// against the payload; nil when none. It may overstate the version (a
// stale stamp), which only makes a later write's version higher; it never
// understates it. Item arguments: field.
var Version = script(1, `
return stored() or false
`)

// CAS is a repair: if the entry still holds the expected native bytes,
// replace it by an envelope or delete it. Item arguments: field, "1" if
// the entry was present, its native bytes, the new envelope ("" to
// delete), TTL ms, copy fence token ("" for none: see Arm; a repair that
// copies a value read before a Delete must not land after it). Each reply
// is 1 when applied, 0 when the entry changed since it was read or the
// fence was gone.
var CAS = script(6, `
local present, expected, e, ttl, fence = ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5], ARGV[a + 6]
if fence ~= '' and redis.call('SREM', kfence, fence) == 0 then return 0 end
local cur = native()
if present == '1' then
  if cur ~= expected then return 0 end
elseif cur then
  return 0
end
if e == '' then
  drop()
else
  put(e, envversion(e), ttl)
end
return 1
`)

// Arm adds a token to the key's copy fence: a set of tokens, in the slot
// of the side a copy will be written to, that expires a fence TTL after
// the last token was added. Item arguments: field, token, fence TTL ms,
// "1" to also reply the entry's version (as Version does), read after the
// fence is armed.
//
// A copy is a write of a value read elsewhere: the second side of a dual
// write or fill, a backfill after a fallback read, an upgrade from an
// older version, a reconcile's repair. The copier arms a fence on the
// destination before it reads (or writes) the source, and the copy is
// written (Write or CAS with a fence token) only if its token is still in
// the fence, which the write removes. A Delete deletes the fence with the
// value, so a copy whose source was read before the Delete cannot land
// after it, however late it runs; a fence that expired voids its copies,
// which only costs a miss. Copies of concurrent writers each have their
// own token, so they all land, set-if-newer, and the sides converge.
var Arm = script(4, `
redis.call('SADD', kfence, ARGV[a + 2])
redis.call('PEXPIRE', kfence, ARGV[a + 3])
if ARGV[a + 4] == '1' then return stored() or false end
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
