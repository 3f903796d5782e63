package layercache

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// Script plumbing, slot grouping and node listing: how the stores talk to
// Redis, whatever the client (a *redis.Client, *redis.ClusterClient,
// *redis.Ring or failover client).

// scriptCall is one call of a script: its KEYS and ARGV.
type scriptCall struct {
	keys []string
	args []any
}

// evalMany runs script once per call in one pipeline (go-redis's
// ClusterClient splits it by node: one round trip per node). EVALSHA is
// tried first; calls that fail with NOSCRIPT (a server restarted, failed
// over or flushed its script cache) are sent again, together, with EVAL,
// which also loads the script. Every script is one atomic step, so a call
// that failed with NOSCRIPT did nothing and may be run again.
func evalMany(ctx context.Context, client redis.UniversalClient, script *redis.Script, calls []scriptCall) ([]*redis.Cmd, error) {
	if len(calls) == 0 {
		return nil, nil
	}
	cmds := make([]*redis.Cmd, len(calls))
	_, err := client.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, c := range calls {
			cmds[i] = script.EvalSha(ctx, p, c.keys, c.args...)
		}
		return nil
	})
	if err == nil {
		return cmds, nil
	}
	var retry []int
	for i := range calls {
		if redis.HasErrorPrefix(cmds[i].Err(), "NOSCRIPT") {
			retry = append(retry, i)
		}
	}
	if len(retry) > 0 {
		_, _ = client.Pipelined(ctx, func(p redis.Pipeliner) error {
			for _, i := range retry {
				cmds[i] = script.Eval(ctx, p, calls[i].keys, calls[i].args...)
			}
			return nil
		})
	}
	return cmds, firstErr(cmds)
}

// firstErr returns the first error of cmds other than redis.Nil.
func firstErr[C redis.Cmder](cmds []C) error {
	for _, c := range cmds {
		if e := c.Err(); e != nil && !errors.Is(e, redis.Nil) {
			return e
		}
	}
	return nil
}

// versionOf reads a reply that is a write version (8 bytes), or nil when
// there is none (nothing written, no version stored).
func versionOf(r any) (writeResult, error) {
	switch v := r.(type) {
	case nil:
		return writeResult{}, nil
	case string:
		if len(v) == 8 {
			return writeResult{version: binary.BigEndian.Uint64([]byte(v)), written: true}, nil
		}
	}
	return writeResult{}, fmt.Errorf("layercache: script replied %v (%T), want an 8-byte version or nil", r, r)
}

// ttlMillis is a TTL as the scripts take it.
func ttlMillis(ttl time.Duration) int64 { return physicalTTL(ttl).Milliseconds() }

// physicalTTL rounds a lifetime to what Redis accepts: at least 1ms, since
// PX 0 is an error and a zero TTL would make the key live forever.
func physicalTTL(ttl time.Duration) time.Duration {
	if ttl < time.Millisecond {
		return time.Millisecond
	}
	return ttl
}

func boolArg(b bool) string {
	if b {
		return "1"
	}
	return "0"
}

// fenceTTL bounds how long a copy may take from the arming of its fence
// to its write; a later copy is dropped, which costs at most a miss.
const fenceTTL = 10 * time.Second

// publishCommand is how scripts announce notices: sharded pub/sub on a
// cluster, so a notice travels only to the key's shard, not over the whole
// cluster bus.
func publishCommand(client redis.UniversalClient) string {
	if isCluster(client) {
		return "SPUBLISH"
	}
	return "PUBLISH"
}

// isCluster reports whether client is a Redis Cluster client, whose
// multi-key commands must stay in one slot.
func isCluster(client redis.UniversalClient) bool {
	_, ok := client.(*redis.ClusterClient)
	return ok
}

// slotGroups groups the indexes of redisKeys by Cluster slot, in the order
// the slots first appear; without a cluster, all keys are one group. A
// multi-key command (MGET, HMGET) is sent per group.
func slotGroups(cluster bool, redisKeys []string) [][]int {
	if !cluster {
		all := make([]int, len(redisKeys))
		for i := range all {
			all[i] = i
		}
		return [][]int{all}
	}
	var groups [][]int
	bySlot := make(map[uint16]int, len(redisKeys))
	for i, k := range redisKeys {
		slot := keySlot(k)
		g, ok := bySlot[slot]
		if !ok {
			g = len(groups)
			bySlot[slot] = g
			groups = append(groups, nil)
		}
		groups[g] = append(groups[g], i)
	}
	return groups
}

// keySlot is the Redis Cluster slot of a key: CRC16 of its hash tag (the
// part between the first '{' and the next '}', if not empty) or of the
// whole key, modulo 16384.
func keySlot(key string) uint16 {
	if i := strings.IndexByte(key, '{'); i >= 0 {
		if j := strings.IndexByte(key[i+1:], '}'); j > 0 {
			key = key[i+1 : i+1+j]
		}
	}
	return crc16(key) % 16384
}

// existsMany runs one existence command per key in a pipeline.
func existsMany[C interface {
	redis.Cmder
	Val() V
}, V any](ctx context.Context, client redis.UniversalClient, keys []string, cmd func(redis.Pipeliner, string) C, found func(V) bool) ([]bool, error) {
	cmds := make([]C, len(keys))
	_, err := client.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, k := range keys {
			cmds[i] = cmd(p, k)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	out := make([]bool, len(keys))
	for i, c := range cmds {
		out[i] = found(c.Val())
	}
	return out, nil
}

// masterNodes returns a client for every master (or the only server),
// sorted by address, so that a scan can go through them in a stable order
// and resume at one. A failover client is a *redis.Client.
func masterNodes(ctx context.Context, client redis.UniversalClient) ([]*redis.Client, error) {
	var nodes []*redis.Client
	var mu sync.Mutex
	collect := func(_ context.Context, c *redis.Client) error {
		mu.Lock()
		nodes = append(nodes, c)
		mu.Unlock()
		return nil
	}
	var err error
	switch cl := client.(type) {
	case *redis.Client:
		nodes = []*redis.Client{cl}
	case *redis.ClusterClient:
		err = cl.ForEachMaster(ctx, collect)
	case *redis.Ring:
		err = cl.ForEachShard(ctx, collect)
	default:
		return nil, fmt.Errorf("layercache: scanning needs a *redis.Client, *redis.ClusterClient or *redis.Ring, not %T", client)
	}
	if err != nil {
		return nil, fmt.Errorf("layercache: list masters: %w", err)
	}
	slices.SortFunc(nodes, func(a, b *redis.Client) int { return strings.Compare(a.Options().Addr, b.Options().Addr) })
	return nodes, nil
}

// crc16Table is CRC16 (XMODEM), the Redis Cluster key hash.
var crc16Table = func() (t [256]uint16) {
	for i := range t {
		c := uint16(i) << 8
		for range 8 {
			if c&0x8000 != 0 {
				c = c<<1 ^ 0x1021
			} else {
				c <<= 1
			}
		}
		t[i] = c
	}
	return t
}()

func crc16(s string) uint16 {
	var c uint16
	for i := 0; i < len(s); i++ {
		c = c<<8 ^ crc16Table[byte(c>>8)^s[i]]
	}
	return c
}

// nilClient reports whether c is unusable as a client: a nil interface, or
// an interface holding a nil pointer (or other nil reference) of any type,
// such as (*redis.Client)(nil), whose first command would panic.
func nilClient(c redis.UniversalClient) bool {
	if c == nil {
		return true
	}
	switch v := reflect.ValueOf(c); v.Kind() {
	case reflect.Pointer, reflect.Interface, reflect.Map, reflect.Slice, reflect.Func, reflect.Chan, reflect.UnsafePointer:
		return v.IsNil()
	}
	return false
}

// describeNil names what nilClient refused, for error messages.
func describeNil(c redis.UniversalClient) string {
	if c == nil {
		return "nil"
	}
	return fmt.Sprintf("a nil %T", c)
}
