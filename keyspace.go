package layercache

import (
	"fmt"
	"strings"

	"github.com/layercache/layercache/internal/busmsg"
)

// MaxKeyLen is the longest user key, in bytes, that a [Cache] accepts.
const MaxKeyLen = busmsg.MaxKeyLen // one limit: the bus must carry every key

const maxNameLen = 128

// keyspace builds the Redis keys of one cache: namespace:version:{key}.
//
// The user key sits inside a Redis Cluster hash tag, so that the value, its
// lease and anything else about the key share one slot. A hash tag ends at
// the first '}', so a '}' in a user key is escaped (as `\]`, with '\' as
// `\\`): the escaping is injective, keys without '}' or '\' appear
// verbatim, and the tag is never empty.
type keyspace struct {
	namespace string
	version   string
	prefix    string // "namespace:version:{"
}

func newKeyspace(namespace, version string) keyspace {
	return keyspace{namespace: namespace, version: version, prefix: namespace + ":" + version + ":{"}
}

// withVersion returns the keyspace of the same namespace at another version.
func (ks keyspace) withVersion(version string) keyspace { return newKeyspace(ks.namespace, version) }

// entry returns the Redis key of a user key's value.
func (ks keyspace) entry(key string) string {
	if !strings.ContainsAny(key, `}\`) {
		return ks.prefix + key + "}"
	}
	return ks.prefix + escapeTag(key) + "}"
}

// Suffixes of the keys and channel tied to a value key, in its slot.
const (
	leaseSuffix  = ":lease"
	fenceSuffix  = ":copy"
	noticeSuffix = ":notice"
)

// lease returns the Redis key of a user key's lease.
func (ks keyspace) lease(key string) string { return ks.entry(key) + leaseSuffix }

// fence returns the Redis key of a user key's copy fence (see
// scripts.Arm), beside its lease in its slot.
func (ks keyspace) fence(key string) string { return ks.entry(key) + fenceSuffix }

// notice returns the pub/sub channel on which fills and releases of a user
// key's lease are announced. Like the lease, it carries the key's hash tag,
// so a sharded publish from a script stays in the key's slot.
func (ks keyspace) notice(key string) string { return ks.entry(key) + noticeSuffix }

// pattern returns a SCAN MATCH pattern for every key of the keyspace.
func (ks keyspace) pattern() string { return globEscape(ks.prefix) + "*" }

// userKey recovers the user key from a Redis key of this keyspace, reporting
// false for keys that are not values of this keyspace (leases, other versions).
func (ks keyspace) userKey(redisKey string) (string, bool) {
	if !strings.HasPrefix(redisKey, ks.prefix) || !strings.HasSuffix(redisKey, "}") {
		return "", false
	}
	inner := redisKey[len(ks.prefix) : len(redisKey)-1]
	if strings.Contains(inner, "}") {
		return "", false
	}
	return unescapeTag(inner)
}

func escapeTag(key string) string {
	var b strings.Builder
	b.Grow(len(key) + 8)
	for i := 0; i < len(key); i++ {
		switch key[i] {
		case '\\':
			b.WriteString(`\\`)
		case '}':
			b.WriteString(`\]`)
		default:
			b.WriteByte(key[i])
		}
	}
	return b.String()
}

func unescapeTag(s string) (string, bool) {
	if !strings.Contains(s, `\`) {
		return s, true
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] != '\\' {
			b.WriteByte(s[i])
			continue
		}
		if i+1 == len(s) {
			return "", false
		}
		i++
		switch s[i] {
		case '\\':
			b.WriteByte('\\')
		case ']':
			b.WriteByte('}')
		default:
			return "", false
		}
	}
	return b.String(), true
}

func globEscape(s string) string {
	r := strings.NewReplacer(`\`, `\\`, `*`, `\*`, `?`, `\?`, `[`, `\[`, `]`, `\]`)
	return r.Replace(s)
}

func checkKey(key string) error {
	if key == "" {
		return fmt.Errorf("%w: empty key", ErrInvalidKey)
	}
	if len(key) > MaxKeyLen {
		return fmt.Errorf("%w: %d bytes, the limit is %d (hash long keys before caching)", ErrInvalidKey, len(key), MaxKeyLen)
	}
	return nil
}

// checkName validates a namespace or version: 1 to 128 bytes of letters,
// digits, '_', '-', '.', '/' and '@'. Anything else could break key parsing
// (':'), the hash tag ('{', '}') or SCAN patterns ('*', '?', '[').
func checkName(what, s string) error {
	if s == "" {
		return fmt.Errorf("%w: %s is empty", ErrInvalidOption, what)
	}
	if len(s) > maxNameLen {
		return fmt.Errorf("%w: %s is %d bytes, the limit is %d", ErrInvalidOption, what, len(s), maxNameLen)
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-' || c == '.' || c == '/' || c == '@' {
			continue
		}
		return fmt.Errorf("%w: %s %q has %q; use letters, digits and _ - . / @", ErrInvalidOption, what, s, c)
	}
	return nil
}

// RedisKey returns the Redis key under which a cache with the given
// namespace and version keeps key's value: namespace:version:{key}, with a
// '}' or '\' in key escaped so the hash tag holds the whole key. It is for
// operators' tools and tests; the cache builds keys itself.
func RedisKey(namespace, version, key string) string {
	return newKeyspace(namespace, version).entry(key)
}
