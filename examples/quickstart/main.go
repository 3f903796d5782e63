// Command quickstart shows layercache's read-through cache in a few steps: a
// miss that loads, a hit that does not, a delete, and a schema version bump
// that moves to a new keyspace.
//
// It runs on an embedded Redis (miniredis) unless REDIS_ADDR is set:
//
//	go run ./examples/quickstart
//	REDIS_ADDR=127.0.0.1:6379 go run ./examples/quickstart
package main

import (
	"context"
	"errors"
	"fmt"
	"log"
	"os"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/layercache/layercache"
	"github.com/redis/go-redis/v9"
)

// User is the cached value: any type the codec (JSON by default) handles.
type User struct {
	ID    int    `json:"id"`
	Name  string `json:"name"`
	Email string `json:"email"`
}

// db stands in for the service's database.
type db struct{ queries int }

func (d *db) user(_ context.Context, id int) (User, error) {
	d.queries++
	time.Sleep(20 * time.Millisecond) // a realistic query
	if id == 404 {
		return User{}, layercache.ErrNotFound
	}
	return User{ID: id, Name: "Ada Lovelace", Email: "ada@example.com"}, nil
}

func main() {
	if err := run(); err != nil {
		log.Fatal(err)
	}
}

func run() error {
	ctx := context.Background()
	rdb, where, stop, err := connect()
	if err != nil {
		return err
	}
	defer stop()
	fmt.Println("redis:", where)

	database := &db{}
	users, err := layercache.New[User](rdb,
		layercache.WithNamespace("quickstart-users"),
		layercache.WithVersion("v1"),
		layercache.WithTTL(5*time.Minute),
	)
	if err != nil {
		return err
	}
	defer users.Close()
	load := func(id int) func(context.Context) (User, error) {
		return func(ctx context.Context) (User, error) { return database.user(ctx, id) }
	}
	_ = users.Delete(ctx, "42", "404") // start clean when REDIS_ADDR is reused

	step := func(what string, f func() (User, error)) {
		before := database.queries
		start := time.Now()
		u, err := f()
		took := time.Since(start).Round(10 * time.Microsecond)
		switch {
		case errors.Is(err, layercache.ErrNotFound):
			fmt.Printf("%-34s not found   db queries +%d  %v\n", what, database.queries-before, took)
		case err != nil:
			fmt.Printf("%-34s error: %v\n", what, err)
		default:
			fmt.Printf("%-34s %-11s db queries +%d  %v\n", what, u.Name, database.queries-before, took)
		}
	}

	step("1. Fetch 42 (miss, loads)", func() (User, error) { return users.Fetch(ctx, "42", load(42)) })
	step("2. Fetch 42 again (hit)", func() (User, error) { return users.Fetch(ctx, "42", load(42)) })
	fmt.Printf("   stored at %q\n", layercache.RedisKey("quickstart-users", "v1", "42"))

	step("3. Fetch 404 (not found, cached)", func() (User, error) { return users.Fetch(ctx, "404", load(404)) })
	step("4. Fetch 404 again (negative hit)", func() (User, error) { return users.Fetch(ctx, "404", load(404)) })

	if err := users.Delete(ctx, "42"); err != nil {
		return err
	}
	fmt.Println("5. Delete 42")
	step("6. Fetch 42 (miss after delete)", func() (User, error) { return users.Fetch(ctx, "42", load(42)) })

	// A deploy that changes User bumps the version: the new code reads its
	// own keyspace and never decodes old-shaped values.
	usersV2, err := layercache.New[User](rdb,
		layercache.WithNamespace("quickstart-users"),
		layercache.WithVersion("v2"),
	)
	if err != nil {
		return err
	}
	defer usersV2.Close()
	_ = usersV2.Delete(ctx, "42")
	step("7. Fetch 42 at v2 (own keyspace)", func() (User, error) { return usersV2.Fetch(ctx, "42", load(42)) })
	fmt.Printf("   stored at %q\n", layercache.RedisKey("quickstart-users", "v2", "42"))

	st := users.Stats()
	fmt.Printf("\nv1 stats: redis hits %d, negative hits %d, misses %d, loads %d\n",
		st.RedisHits, st.NegativeHits, st.Misses, st.Loads)
	fmt.Printf("database queries in all: %d\n", database.queries)
	return nil
}

// connect returns a client for REDIS_ADDR, or for an embedded miniredis.
func connect() (redis.UniversalClient, string, func(), error) {
	if addr := os.Getenv("REDIS_ADDR"); addr != "" {
		rdb := redis.NewClient(&redis.Options{Addr: addr})
		return rdb, addr, func() { rdb.Close() }, nil
	}
	mr, err := miniredis.Run()
	if err != nil {
		return nil, "", nil, err
	}
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr()})
	return rdb, "embedded miniredis (set REDIS_ADDR to use a real server)", func() { rdb.Close(); mr.Close() }, nil
}
