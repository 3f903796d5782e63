package layercache_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/layercache/layercache"
	"github.com/redis/go-redis/v9"
)

// exampleClient starts an embedded Redis for the examples; real code passes
// its own go-redis client.
func exampleClient() (redis.UniversalClient, func()) {
	mr, err := miniredis.Run()
	if err != nil {
		panic(err)
	}
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr()})
	return rdb, func() { rdb.Close(); mr.Close() }
}

type User struct {
	ID   int    `json:"id"`
	Name string `json:"name"`
}

func Example() {
	rdb, stop := exampleClient()
	defer stop()
	ctx := context.Background()

	users, err := layercache.New[User](rdb, layercache.WithNamespace("users"), layercache.WithTTL(time.Minute))
	if err != nil {
		panic(err)
	}
	defer users.Close()

	loadUser := func(ctx context.Context) (User, error) {
		fmt.Println("loading user 42 from the database")
		return User{ID: 42, Name: "Ada"}, nil
	}
	u, _ := users.Fetch(ctx, "42", loadUser) // miss: loads and caches
	fmt.Println(u.Name)
	u, _ = users.Fetch(ctx, "42", loadUser) // hit: no load
	fmt.Println(u.Name)
	// Output:
	// loading user 42 from the database
	// Ada
	// Ada
}

func ExampleWithNamespace() {
	rdb, stop := exampleClient()
	defer stop()
	ctx := context.Background()

	users, _ := layercache.New[User](rdb, layercache.WithNamespace("users"))
	defer users.Close()
	_ = users.Set(ctx, "42", User{ID: 42})
	keys, _ := rdb.Keys(ctx, "*").Result()
	fmt.Println(keys)
	// Output: [users:v1:{42}]
}

func ExampleWithVersion() {
	rdb, stop := exampleClient()
	defer stop()
	ctx := context.Background()

	v1, _ := layercache.New[User](rdb, layercache.WithNamespace("users"), layercache.WithVersion("v1"))
	v2, _ := layercache.New[User](rdb, layercache.WithNamespace("users"), layercache.WithVersion("v2"))
	defer v1.Close()
	defer v2.Close()
	_ = v1.Set(ctx, "42", User{ID: 42, Name: "written by v1"})
	_, err := v2.Get(ctx, "42")
	fmt.Println("v2 sees v1's value:", !errors.Is(err, layercache.ErrNotFound))
	// Output: v2 sees v1's value: false
}

func ExampleWithTTL() {
	rdb, stop := exampleClient()
	defer stop()
	ctx := context.Background()

	sessions, _ := layercache.New[string](rdb, layercache.WithNamespace("sessions"), layercache.WithTTL(30*time.Second))
	defer sessions.Close()
	_ = sessions.Set(ctx, "abc", "user-42")
	ttl := rdb.PTTL(ctx, "sessions:v1:{abc}").Val()
	fmt.Println(ttl > 29*time.Second && ttl <= 30*time.Second)
	// Output: true
}

func ExampleWithTTLJitter() {
	rdb, stop := exampleClient()
	defer stop()
	ctx := context.Background()

	// Each write lives between 54s and 66s, so keys written together
	// do not expire together.
	c, _ := layercache.New[int](rdb, layercache.WithNamespace("jitter"), layercache.WithTTL(time.Minute), layercache.WithTTLJitter(0.1))
	defer c.Close()
	inRange, distinct := true, map[time.Duration]bool{}
	for i := range 20 {
		key := fmt.Sprint("k", i)
		_ = c.Set(ctx, key, i)
		ttl := rdb.PTTL(ctx, layercache.RedisKey("jitter", "v1", key)).Val()
		inRange = inRange && ttl >= 53*time.Second && ttl <= 66*time.Second // 54s less a second of clock
		distinct[ttl.Round(10*time.Millisecond)] = true
	}
	fmt.Println("all within ±10%:", inRange, "spread out:", len(distinct) > 1)
	// Output: all within ±10%: true spread out: true
}

func ExampleWithCodec() {
	rdb, stop := exampleClient()
	defer stop()
	ctx := context.Background()

	// PassThrough passes bytes through: handy for pre-rendered pages or protobufs.
	pages, _ := layercache.New[[]byte](rdb, layercache.WithNamespace("pages"), layercache.WithCodec(layercache.PassThrough))
	defer pages.Close()
	_ = pages.Set(ctx, "/home", []byte("<h1>hello</h1>"))
	b, _ := pages.Get(ctx, "/home")
	stored, _ := rdb.Get(ctx, "pages:v1:{/home}").Bytes()
	fmt.Println(string(b), "stored as is:", bytes.HasSuffix(stored, b)) // JSON would store base64
	// Output: <h1>hello</h1> stored as is: true
}

func ExampleRedisKey() {
	// Where operators and tools find a cache's values.
	fmt.Println(layercache.RedisKey("users", "v1", "42"))
	fmt.Println(layercache.RedisKey("users", "v1", "a}b")) // '}' escaped: the hash tag holds the whole key
	// Output:
	// users:v1:{42}
	// users:v1:{a\]b}
}

func ExampleWithNegativeTTL() {
	rdb, stop := exampleClient()
	defer stop()
	ctx := context.Background()

	users, _ := layercache.New[User](rdb, layercache.WithNamespace("users"), layercache.WithNegativeTTL(5*time.Second))
	defer users.Close()
	lookup := func(ctx context.Context) (User, error) {
		fmt.Println("database lookup")
		return User{}, layercache.ErrNotFound
	}
	for range 3 {
		_, err := users.Fetch(ctx, "404", lookup)
		fmt.Println(errors.Is(err, layercache.ErrNotFound))
	}
	// Output:
	// database lookup
	// true
	// true
	// true
}

func ExampleWithMaxValueSize() {
	rdb, stop := exampleClient()
	defer stop()
	ctx := context.Background()

	c, _ := layercache.New[string](rdb, layercache.WithNamespace("small"), layercache.WithMaxValueSize(64))
	defer c.Close()
	err := c.Set(ctx, "big", string(make([]byte, 1000)))
	fmt.Println(errors.Is(err, layercache.ErrValueTooLarge))
	// Output: true
}

func ExampleWithLoadTimeout() {
	rdb, stop := exampleClient()
	defer stop()
	ctx := context.Background()

	c, _ := layercache.New[string](rdb, layercache.WithNamespace("slow"), layercache.WithLoadTimeout(50*time.Millisecond))
	defer c.Close()
	_, err := c.Fetch(ctx, "k", func(ctx context.Context) (string, error) {
		<-ctx.Done() // a hung source: the load's own timeout stops it
		return "", ctx.Err()
	})
	fmt.Println(errors.Is(err, context.DeadlineExceeded))
	// Output: true
}

func ExampleWithLogger() {
	rdb, stop := exampleClient()
	defer stop()
	ctx := context.Background()

	logger := slog.New(slog.NewTextHandler(os.Stdout, &slog.HandlerOptions{
		ReplaceAttr: func(_ []string, a slog.Attr) slog.Attr {
			if a.Key == slog.TimeKey {
				return slog.Attr{} // keep the output stable
			}
			return a
		},
	}))
	c, _ := layercache.New[User](rdb, layercache.WithNamespace("users"), layercache.WithLogger(logger))
	defer c.Close()
	_ = rdb.Set(ctx, "users:v1:{7}", "not an envelope", 0).Err()
	_, err := c.Get(ctx, "7") // logged and counted, a miss for the caller
	fmt.Println(errors.Is(err, layercache.ErrNotFound), c.Stats().DecodeErrors)
	// Output:
	// level=WARN msg="layercache: cached value does not decode; treating it as a miss" cache=users:v1 key=7 err="envelope: bad magic byte (not written by layercache)"
	// true 1
}

func ExampleWithClock() {
	rdb, stop := exampleClient()
	defer stop()
	ctx := context.Background()

	clock := layercache.NewManualClock(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
	c, _ := layercache.New[string](rdb, layercache.WithNamespace("clocked"), layercache.WithTTL(time.Minute), layercache.WithClock(clock))
	defer c.Close()
	_ = c.Set(ctx, "k", "v")
	clock.Advance(2 * time.Minute) // expiry follows the clock, no sleeping
	_, err := c.Get(ctx, "k")
	fmt.Println(errors.Is(err, layercache.ErrNotFound))
	// Output: true
}

func ExampleCache_Delete() {
	rdb, stop := exampleClient()
	defer stop()
	ctx := context.Background()

	c, _ := layercache.New[int](rdb, layercache.WithNamespace("counts"))
	defer c.Close()
	_ = c.Set(ctx, "a", 1)
	_ = c.Set(ctx, "b", 2)
	_ = c.Delete(ctx, "a", "b") // keys may live on different Cluster nodes
	_, err := c.Get(ctx, "a")
	fmt.Println(errors.Is(err, layercache.ErrNotFound))
	// Output: true
}

func ExampleCache_Stats() {
	rdb, stop := exampleClient()
	defer stop()
	ctx := context.Background()

	c, _ := layercache.New[int](rdb, layercache.WithNamespace("stats"))
	defer c.Close()
	load := func(context.Context) (int, error) { return 1, nil }
	_, _ = c.Fetch(ctx, "k", load)
	_, _ = c.Fetch(ctx, "k", load)
	st := c.Stats()
	fmt.Printf("misses=%d loads=%d redis hits=%d\n", st.Misses, st.Loads, st.RedisHits)
	// Output: misses=1 loads=1 redis hits=1
}
