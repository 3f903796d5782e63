package layercache_test

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/layercache/layercache"
	"github.com/redis/go-redis/v9"
)

// exampleNode is one service instance of the multi-node examples: its own
// client, bus and cache on a shared Redis.
type exampleNode struct {
	rdb   *redis.Client
	bus   *layercache.Bus
	users *layercache.Cache[User]
}

func newExampleNode(addr string, busOpts ...layercache.BusOption) *exampleNode {
	rdb := redis.NewClient(&redis.Options{Addr: addr})
	bus, err := layercache.NewBus(rdb, busOpts...)
	if err != nil {
		panic(err)
	}
	users, err := layercache.New[User](rdb,
		layercache.WithNamespace("users"),
		layercache.WithLocal(10_000, 30*time.Second),
		layercache.WithInvalidation(bus),
	)
	if err != nil {
		panic(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := bus.Ready(ctx); err != nil {
		panic(err)
	}
	return &exampleNode{rdb: rdb, bus: bus, users: users}
}

func (n *exampleNode) Close() {
	n.users.Close()
	n.bus.Close()
	n.rdb.Close()
}

// awaitExample polls cond for up to five seconds; the examples use it to wait
// for a message to cross from one node to another.
func awaitExample(cond func() bool) bool {
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		if cond() {
			return true
		}
	}
	return false
}

func ExampleWithLocal() {
	rdb, stop := exampleClient()
	defer stop()
	ctx := context.Background()

	// Up to 10,000 decoded users in memory, each for at most 30s (and never
	// past its freshness in Redis). Without a bus, 30s is also how long a
	// write on another node may go unseen here; see WithInvalidation.
	users, err := layercache.New[User](rdb, layercache.WithNamespace("users"), layercache.WithLocal(10_000, 30*time.Second))
	if err != nil {
		panic(err)
	}
	defer users.Close()

	_ = users.Set(ctx, "42", User{ID: 42, Name: "Ada"})
	for range 3 {
		u, _ := users.Get(ctx, "42") // the first read fills the local tier
		fmt.Println(u.Name)
	}
	st := users.Stats()
	fmt.Println("from Redis:", st.RedisHits, "from memory:", st.LocalHits)
	// Output:
	// Ada
	// Ada
	// Ada
	// from Redis: 1 from memory: 2
}

func ExampleNewBus() {
	mr, _ := miniredis.Run()
	defer mr.Close()
	ctx := context.Background()

	// Two service instances, each with its own client and bus.
	a := newExampleNode(mr.Addr())
	defer a.Close()
	b := newExampleNode(mr.Addr())
	defer b.Close()

	_ = a.users.Set(ctx, "42", User{ID: 42, Name: "Ada"})
	u, _ := b.users.Get(ctx, "42") // b now holds Ada in memory
	fmt.Println("b reads:", u.Name)

	_ = a.users.Set(ctx, "42", User{ID: 42, Name: "Ada Lovelace"})
	awaitExample(func() bool { u, _ = b.users.Get(ctx, "42"); return u.Name == "Ada Lovelace" })
	fmt.Println("b reads:", u.Name)
	fmt.Println("b's copy was invalidated:", b.users.Stats().InvalidationsReceived > 0)
	// Output:
	// b reads: Ada
	// b reads: Ada Lovelace
	// b's copy was invalidated: true
}

func ExampleWithInvalidation() {
	rdb, stop := exampleClient()
	defer stop()
	ctx := context.Background()

	// One bus per process, shared by all its caches.
	bus, err := layercache.NewBus(rdb)
	if err != nil {
		panic(err)
	}
	defer bus.Close()
	users, _ := layercache.New[User](rdb, layercache.WithNamespace("users"),
		layercache.WithLocal(10_000, time.Minute), layercache.WithInvalidation(bus))
	defer users.Close()
	sessions, _ := layercache.New[string](rdb, layercache.WithNamespace("sessions"),
		layercache.WithInvalidation(bus)) // no local tier: it only publishes

	_ = bus.Ready(ctx)
	_ = users.Set(ctx, "42", User{ID: 42, Name: "Ada"})
	_ = sessions.Set(ctx, "s1", "42")
	_ = users.Delete(ctx, "7")
	awaitExample(func() bool { return bus.Stats().SentKeys == 3 })
	fmt.Println("invalidations published:", bus.Stats().SentKeys)
	// Output:
	// invalidations published: 3
}

func ExampleWithStream() {
	mr, _ := miniredis.Run()
	defer mr.Close()
	ctx := context.Background()

	// A durable bus: invalidations go to a Redis Stream of about 100,000
	// entries; a node that reconnects replays what it missed.
	a := newExampleNode(mr.Addr(), layercache.WithStream("users:invalidations", 100_000))
	defer a.Close()
	b := newExampleNode(mr.Addr(), layercache.WithStream("users:invalidations", 100_000))
	defer b.Close()

	_ = a.users.Set(ctx, "42", User{ID: 42, Name: "Ada"})
	u, _ := b.users.Get(ctx, "42")
	fmt.Println("b reads:", u.Name)
	_ = a.users.Set(ctx, "42", User{ID: 42, Name: "Grace"})
	awaitExample(func() bool { u, _ = b.users.Get(ctx, "42"); return u.Name == "Grace" })
	fmt.Println("b reads:", u.Name)
	fmt.Println("entries in the stream:", mr.Exists("users:invalidations"))
	// Output:
	// b reads: Ada
	// b reads: Grace
	// entries in the stream: true
}

func ExampleWithSecret() {
	mr, _ := miniredis.Run()
	defer mr.Close()
	ctx := context.Background()

	secret := []byte("32 random bytes from the vault..")
	a := newExampleNode(mr.Addr(), layercache.WithSecret(secret))
	defer a.Close()
	b := newExampleNode(mr.Addr(), layercache.WithSecret(secret))
	defer b.Close()

	// Anyone who may PUBLISH can send bytes to the channel: here noise, and
	// a well-formed but unsigned "flush users:v1". Without a valid tag a
	// message is dropped and counted.
	_ = a.rdb.Publish(ctx, layercache.DefaultBusChannel, "flush everything, please").Err()
	unsigned := []byte{0xB5, 1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0, 0, 2, 9, 8, 'u', 's', 'e', 'r', 's', ':', 'v', '1'}
	_ = a.rdb.Publish(ctx, layercache.DefaultBusChannel, unsigned).Err()
	awaitExample(func() bool { return b.bus.Stats().Forged == 1 })
	fmt.Println("forged:", b.bus.Stats().Forged, "not ours:", b.bus.Stats().Malformed)

	// Authentic messages still flow.
	_ = a.users.Set(ctx, "42", User{ID: 42, Name: "Ada"})
	u, _ := b.users.Get(ctx, "42")
	_ = a.users.Set(ctx, "42", User{ID: 42, Name: "Grace"})
	awaitExample(func() bool { u, _ = b.users.Get(ctx, "42"); return u.Name == "Grace" })
	fmt.Println("b reads:", u.Name)
	// Output:
	// forged: 1 not ours: 1
	// b reads: Grace
}

func ExampleWithChannel() {
	rdb, stop := exampleClient()
	defer stop()
	ctx := context.Background()

	// Deployments that share a Redis but not their data use their own
	// channels; every node of one deployment uses the same.
	bus, err := layercache.NewBus(rdb, layercache.WithChannel("checkout-service:invalidation"))
	if err != nil {
		panic(err)
	}
	defer bus.Close()
	if err := bus.Ready(ctx); err != nil {
		panic(err)
	}
	fmt.Println("subscribed to:", rdb.PubSubChannels(ctx, "*").Val())
	// Output:
	// subscribed to: [checkout-service:invalidation]
}

func ExampleWithBusLogger() {
	rdb, stop := exampleClient()
	defer stop()
	ctx := context.Background()

	// Print only the message (the bus adds its mode and node id as attrs).
	logger := slog.New(slog.NewTextHandler(os.Stdout, &slog.HandlerOptions{
		ReplaceAttr: func(_ []string, a slog.Attr) slog.Attr {
			if a.Key == slog.MessageKey {
				return a
			}
			return slog.Attr{}
		},
	}))
	bus, err := layercache.NewBus(rdb, layercache.WithBusLogger(logger), layercache.WithSecret([]byte("0123456789abcdef")))
	if err != nil {
		panic(err)
	}
	defer bus.Close()
	_ = bus.Ready(ctx)
	_ = rdb.Publish(ctx, layercache.DefaultBusChannel, []byte{0xB5, 1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0, 0}).Err()
	awaitExample(func() bool { return bus.Stats().Forged == 1 })
	// Output:
	// msg="layercache: dropped a bus message that failed authentication"
}
