package layercache_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/layercache/layercache"
	"github.com/layercache/layercache/internal/envelope"
	"github.com/redis/go-redis/v9"
)

// FuzzCachedBytes stores arbitrary bytes where a cache keeps its value and
// checks the read path: Get answers a value or ErrNotFound, never a panic or
// another error, and Fetch always returns what the loader loads when the
// stored bytes are not a valid value.
func FuzzCachedBytes(f *testing.F) {
	future := time.Now().Add(time.Hour).UnixMilli()
	f.Add([]byte(`{"id":1,"name":"legacy"}`))
	f.Add(envelope.Encode(envelope.Header{WrittenAt: 1, FreshUntil: future, ExpiresAt: future}, []byte(`{"id":2}`)))
	f.Add(envelope.Encode(envelope.Header{WrittenAt: 1, FreshUntil: future, ExpiresAt: future}, []byte(`{"id":`)))
	f.Add(envelope.Encode(envelope.Header{Flags: envelope.FlagNegative, WrittenAt: 1, FreshUntil: future, ExpiresAt: future}, nil))
	f.Add([]byte{envelope.Magic, envelope.Version})

	mr := miniredis.NewMiniRedis()
	if err := mr.Start(); err != nil {
		f.Fatal(err)
	}
	defer mr.Close()
	client := redis.NewClient(&redis.Options{Addr: mr.Addr()})
	defer client.Close()
	c, err := layercache.New[user](client, layercache.WithNamespace("fuzz"), layercache.WithLogger(quiet))
	if err != nil {
		f.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	key := layercache.RedisKey("fuzz", "v1", "k")

	f.Fuzz(func(t *testing.T, stored []byte) {
		if err := client.Set(ctx, key, stored, time.Minute).Err(); err != nil {
			t.Fatal(err)
		}
		got, err := c.Get(ctx, "k")
		if err != nil && !errors.Is(err, layercache.ErrNotFound) {
			t.Fatalf("Get of stored bytes %x: %v", stored, err)
		}
		if err := client.Set(ctx, key, stored, time.Minute).Err(); err != nil {
			t.Fatal(err)
		}
		fetched, err := c.Fetch(ctx, "k", func(context.Context) (user, error) { return user{ID: -1}, nil })
		switch {
		case errors.Is(err, layercache.ErrNotFound):
			// A valid negative envelope.
		case err != nil:
			t.Fatalf("Fetch of stored bytes %x: %v", stored, err)
		case fetched.ID != -1 && fetched != got:
			t.Fatalf("Fetch returned %+v, neither the loaded value nor what Get saw (%+v)", fetched, got)
		}
	})
}
