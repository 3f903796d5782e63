package layercache_test

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/layercache/layercache"
	"github.com/layercache/layercache/internal/redistest"
	"github.com/redis/go-redis/v9"
)

// TestDeleteBreaksTheLeaseWithScriptsFlushed is the first way a deleted
// value came back: Delete sent DEL and the lease-breaking script in one
// pipeline, and when Redis did not have the script loaded (a fresh
// server, a restart, SCRIPT FLUSH, a failover) the lease was broken in a
// second round trip, after DEL, so a fill that read the source before the
// write behind the Delete could land in between, with its full TTL. Here
// every round flushes the scripts, then races a holder's fill with the
// Delete: whichever lands first, nothing may be cached after both.
func TestDeleteBreaksTheLeaseWithScriptsFlushed(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		ns := redistest.Namespace(t)
		cs := instances(t, tgt, 2, ns, layercache.WithLocks(10*time.Second, 10*time.Second))
		a, b := cs[0], cs[1]
		admin := tgt.NewClient(t)
		rounds := 150
		if tgt.Cluster {
			rounds = 60 // SCRIPT FLUSH on every master per round
		}
		resurrected := 0
		for r := range rounds {
			key := fmt.Sprint("k", r)
			load, started, release := blockingLoader(user{ID: 1, Name: "read before the write"})
			done := make(chan struct{})
			go func() { defer close(done); _, _ = b.Fetch(ctx, key, load) }()
			<-started
			if err := flushScripts(ctx, admin); err != nil {
				t.Fatal(err)
			}
			close(release) // the holder's fill races the Delete
			if err := a.Delete(ctx, key); err != nil {
				t.Fatal(err)
			}
			<-done
			if got, err := a.Get(ctx, key); !errors.Is(err, layercache.ErrNotFound) {
				resurrected++
				t.Errorf("round %d: after Delete, Redis holds %+v (%v): the fill landed between the delete and the lease break", r, got, err)
			}
		}
		if resurrected > 0 {
			t.Fatalf("a deleted value came back in %d of %d rounds", resurrected, rounds)
		}
	})
}

// flushScripts empties the script cache of every master.
func flushScripts(ctx context.Context, client redis.UniversalClient) error {
	if cc, ok := client.(*redis.ClusterClient); ok {
		return cc.ForEachMaster(ctx, func(ctx context.Context, c *redis.Client) error { return c.ScriptFlush(ctx).Err() })
	}
	return client.ScriptFlush(ctx).Err()
}
