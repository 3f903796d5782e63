package layercache

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/layercache/layercache/internal/envelope"
	"github.com/layercache/layercache/internal/scripts"
	"github.com/redis/go-redis/v9"
)

// headerVersion returns the write version of an envelope header (at
// least its first 40 bytes), or 0 for anything else.
func headerVersion(b []byte) uint64 {
	if len(b) < envelope.HeaderSize || b[0] != envelope.Magic || b[1] != envelope.Version {
		return 0
	}
	return binary.BigEndian.Uint64(b[32:40])
}

// versionReply reads a script or command reply holding a header (or a
// Raw stamp, whose first 8 bytes are the version).
func versionReply(b []byte, err error, stamp bool) (uint64, error) {
	if errors.Is(err, redis.Nil) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	if stamp {
		if len(b) < 9 {
			return 0, nil
		}
		return binary.BigEndian.Uint64(b[:8]), nil
	}
	return headerVersion(b), nil
}

// scriptResult turns a write script's reply into (version, written).
func scriptResult(cmd *redis.Cmd) (uint64, bool, error) {
	s, err := cmd.Text()
	if errors.Is(err, redis.Nil) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, err
	}
	if len(s) != 8 {
		return 0, false, fmt.Errorf("layercache: write script returned %d bytes, want an 8-byte version", len(s))
	}
	return binary.BigEndian.Uint64([]byte(s)), true, nil
}

// evalMany runs script once per call in one pipeline. EVALSHA is tried
// first; calls that fail with NOSCRIPT (a server restarted or flushed its
// script cache) are retried one by one with EVALSHA-then-EVAL.
func evalMany(ctx context.Context, client redis.UniversalClient, script *redis.Script, calls []scriptCall) ([]*redis.Cmd, error) {
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
	var firstErr error
	for i, c := range calls {
		e := cmds[i].Err()
		if e == nil || errors.Is(e, redis.Nil) {
			continue
		}
		if redis.HasErrorPrefix(e, "NOSCRIPT") {
			cmds[i] = script.Run(ctx, client, c.keys, c.args...)
			e = cmds[i].Err()
			if e == nil || errors.Is(e, redis.Nil) {
				continue
			}
		}
		if firstErr == nil {
			firstErr = e
		}
	}
	return cmds, firstErr
}

type scriptCall struct {
	keys []string
	args []any
}

func ttlMillis(ttl time.Duration) int64 { return physicalTTL(ttl).Milliseconds() }

// existsMany runs one existence command per key in a pipeline.
func existsMany(ctx context.Context, client redis.UniversalClient, keys []string, cmd func(redis.Pipeliner, string) *redis.IntCmd) ([]bool, error) {
	cmds := make([]*redis.IntCmd, len(keys))
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
		out[i] = c.Val() == 1
	}
	return out, nil
}

func casResults(cmds []*redis.Cmd, err error) ([]bool, error) {
	out := make([]bool, len(cmds))
	for i, c := range cmds {
		n, e := c.Int()
		out[i] = e == nil && n == 1
	}
	return out, err
}

func modeArg(m writeMode) string {
	if m == writeCopy {
		return "c"
	}
	return "f"
}

func boolArg(b bool) string {
	if b {
		return "1"
	}
	return "0"
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

// leaseWriteResult reads a fill or overwrite script's reply: the stored
// version (8 bytes) when it wrote, 0 when the lease was lost.
func leaseWriteResult(cmd *redis.Cmd) (uint64, bool, error) {
	v, err := cmd.Result()
	if errors.Is(err, redis.Nil) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, err
	}
	switch v := v.(type) {
	case string:
		if len(v) == 8 {
			return binary.BigEndian.Uint64([]byte(v)), true, nil
		}
	case int64:
		if v == 0 {
			return 0, false, nil
		}
	}
	return 0, false, fmt.Errorf("layercache: lease write script returned %v (%T), want a version or 0", v, v)
}

// fenceTTL bounds how long a copy may take from the arming of its fence
// to its write; a later copy is dropped, which costs at most a miss.
const fenceTTL = 10 * time.Second

// armFence adds token to a copy fence (see scripts.Arm).
func armFence(ctx context.Context, client redis.UniversalClient, fence, token string) error {
	return scripts.Arm.Run(ctx, client, []string{fence}, token, fenceTTL.Milliseconds()).Err()
}

// armThenRead arms a copy fence and then runs read, a version read in the
// fence's slot, in one MULTI: one round trip, and the fence is in place
// before the version is read, so a Delete after the read voids the copy.
func armThenRead(ctx context.Context, client redis.UniversalClient, fence, token string, stamp bool, read func(redis.Pipeliner) *redis.StringCmd) (uint64, error) {
	var cmd *redis.StringCmd
	_, err := client.TxPipelined(ctx, func(p redis.Pipeliner) error {
		p.SAdd(ctx, fence, token)
		p.PExpire(ctx, fence, fenceTTL)
		cmd = read(p)
		return nil
	})
	if err != nil && !errors.Is(err, redis.Nil) {
		return 0, err
	}
	b, err := cmd.Bytes()
	return versionReply(b, err, stamp)
}

// dropKeys is the del of every layout. For each key, queue deletes what
// the layout keeps of it (value and copy fence, so that a copy of a value
// read before the delete cannot land after it) and returns its lease
// script keys (value or slot pin, lease) and notice channel, or nil when
// the key has no lease; the lease is then broken by scripts.BreakLease,
// which publishes a notice, so that waiters in other processes look again
// at once instead of sleeping until the broken lease would have expired.
// Everything is one pipeline (go-redis's ClusterClient splits it by
// slot); each command and script touches one key's slot. A script the
// server does not have yet (NOSCRIPT) is run again, loading it.
func dropKeys(ctx context.Context, client redis.UniversalClient, keys []string, queue func(p redis.Pipeliner, key string) (leaseKeys []string, channel string)) error {
	type breakCall struct {
		cmd     *redis.Cmd
		keys    []string
		channel string
	}
	pub := publishCommand(client)
	var calls []breakCall
	cmds, err := client.Pipelined(ctx, func(p redis.Pipeliner) error {
		for _, k := range keys {
			lk, ch := queue(p, k)
			if lk == nil {
				continue
			}
			calls = append(calls, breakCall{scripts.BreakLease.EvalSha(ctx, p, lk, pub, ch), lk, ch})
		}
		return nil
	})
	if err == nil {
		return nil
	}
	scriptCmds := make(map[redis.Cmder]bool, len(calls))
	var errs []error
	for _, c := range calls {
		scriptCmds[c.cmd] = true
		e := c.cmd.Err()
		if redis.HasErrorPrefix(e, "NOSCRIPT") {
			e = scripts.BreakLease.Run(ctx, client, c.keys, pub, c.channel).Err()
		}
		if e != nil && !errors.Is(e, redis.Nil) {
			errs = append(errs, e)
		}
	}
	for _, c := range cmds {
		if e := c.Err(); e != nil && !errors.Is(e, redis.Nil) && !scriptCmds[c] {
			errs = append(errs, e)
		}
	}
	return errors.Join(errs...)
}

// physicalTTL rounds a lifetime to what Redis accepts: at least 1ms, since
// PX 0 is an error and a zero TTL would make the key live forever.
func physicalTTL(ttl time.Duration) time.Duration {
	if ttl < time.Millisecond {
		return time.Millisecond
	}
	return ttl
}

// publishCommand is how scripts announce notices: sharded pub/sub on a
// cluster, so a notice travels only to the key's shard, not over the whole
// cluster bus.
func publishCommand(client redis.UniversalClient) string {
	if _, ok := client.(*redis.ClusterClient); ok {
		return "SPUBLISH"
	}
	return "PUBLISH"
}
