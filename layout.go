package layercache

import (
	"fmt"
	"strconv"
	"strings"
)

// Layout is where a cache keeps its entries in Redis: [KeyPerEntry] (the
// default), [Hash] or [Raw]. Give one to [WithLayout], or two to
// [WithMigration] to move a cache from one to the other. A Layout is a
// value; an invalid one (Hash(0), a Raw pattern without %s) makes [New]
// fail with [ErrInvalidOption].
type Layout struct {
	kind    layoutKind
	shards  int    // Hash
	pattern string // Raw, as given
	prefix  string // Raw: the pattern's text before %s, with %% unescaped
	suffix  string // Raw: the text after %s
	err     error
}

type layoutKind uint8

const (
	kindKeyPerEntry layoutKind = iota
	kindHash
	kindRaw
)

// MaxHashShards is the largest shard count [Hash] accepts.
const MaxHashShards = 1024

// KeyPerEntry keeps each entry in its own string key,
// namespace:version:{key}, holding the envelope. It is the default layout.
func KeyPerEntry() Layout { return Layout{kind: kindKeyPerEntry} }

// Hash keeps entries as fields of shards hashes (1 to [MaxHashShards]),
// namespace:version:h<shards>:{<tag>}, the field being the user key and
// its value the envelope. The tags are chosen so that the hashes spread
// evenly over the slots of a Redis Cluster: a catalog never becomes one
// hot key on one node.
//
// Redis 7.0 has no per-field expiry, so the logical expiry travels inside
// each field's envelope: an expired field is a miss, and a background
// sweep (stopped by [Cache.Close]) deletes expired fields; each hash key
// itself expires when its longest-lived field does. A key's lease lives
// at <hash key>:lease:<key>, in its hash's slot.
func Hash(shards int) Layout {
	if shards < 1 || shards > MaxHashShards {
		return Layout{kind: kindHash, shards: shards,
			err: fmt.Errorf("%w: Hash(%d): shards must be in [1, %d]", ErrInvalidOption, shards, MaxHashShards)}
	}
	return Layout{kind: kindHash, shards: shards}
}

// Raw keeps plain payloads, with no envelope, at the key made by replacing
// the %s in pattern with the user key ("product:%s" keeps key "42" at
// "product:42"); %% stands for a literal %. The payload is exactly what
// the cache's codec produces, so values written by other code, e.g.
// rdb.Set(ctx, "product:42", jsonBytes, time.Hour), are read as they are,
// and what the cache writes is read back by that code. The entry's expiry
// is the key's Redis TTL (a key with no TTL is fresh for the cache's TTL
// from each read); a Raw key has no stale grace.
//
// Having no envelope, a Raw key carries no write version. The cache keeps
// one beside it, in a companion key in the same Cluster slot, tied to the
// payload it describes by a SHA-1 of it, so that writes stay set-if-newer
// and a value that other code overwrote is recognised as unversioned. A
// cached "not found" is a companion tombstone with the raw key absent:
// other code sees a plain miss. Companion and lease keys end in
// "\xfflc:wv" and "\xfflc:lease"; for untagged keys they are the raw key
// wrapped in a hash tag, "{product:42}\xfflc:wv". A user key whose raw key
// has a '}' outside a valid hash tag cannot share a slot with such keys
// and is refused with [ErrInvalidKey].
//
// Raw keys have no namespace or version: a Raw cache cannot use
// [WithUpgradeFrom], and [Cache.PurgeVersion] does not touch them.
func Raw(pattern string) Layout {
	l := Layout{kind: kindRaw, pattern: pattern}
	l.prefix, l.suffix, l.err = parseRawPattern(pattern)
	return l
}

func parseRawPattern(p string) (prefix, suffix string, err error) {
	bad := func(why string) (string, string, error) {
		return "", "", fmt.Errorf("%w: Raw(%q): %s", ErrInvalidOption, p, why)
	}
	if len(p) > 512 {
		return bad("the pattern is longer than 512 bytes")
	}
	var parts [2]strings.Builder
	n := 0
	for i := 0; i < len(p); i++ {
		if p[i] != '%' {
			parts[n].WriteByte(p[i])
			continue
		}
		if i+1 == len(p) {
			return bad("a lone % at the end; write %% for a literal %")
		}
		i++
		switch p[i] {
		case '%':
			parts[n].WriteByte('%')
		case 's':
			if n == 1 {
				return bad("more than one %s")
			}
			n = 1
		default:
			return bad(fmt.Sprintf("%%%c is not supported; the pattern takes one %%s and %%%% only", p[i]))
		}
	}
	if n == 0 {
		return bad("no %s for the key")
	}
	prefix, suffix = parts[0].String(), parts[1].String()
	if prefix == "" && suffix == "" {
		return bad("the pattern is only %s; give it a prefix or suffix so its keys can be told apart from others")
	}
	return prefix, suffix, nil
}

// String describes the layout: "key-per-entry", "hash(8)", "raw(product:%s)".
func (l Layout) String() string {
	switch l.kind {
	case kindHash:
		return "hash(" + strconv.Itoa(l.shards) + ")"
	case kindRaw:
		return "raw(" + l.pattern + ")"
	}
	return "key-per-entry"
}

func (l Layout) equal(o Layout) bool {
	return l.kind == o.kind && l.shards == o.shards && l.prefix == o.prefix && l.suffix == o.suffix
}

// WithLayout sets where the cache keeps its entries (see [Layout]); the
// default is [KeyPerEntry]. A cache that is moving between two layouts uses
// [WithMigration] instead.
func WithLayout(l Layout) Option {
	return func(c *config) {
		if l.err != nil {
			c.errs = append(c.errs, fmt.Errorf("WithLayout: %w", l.err))
			return
		}
		lc := l
		c.layout = &lc
	}
}
