// Command schemachange shows, in numbers, what a schema change does to a
// cache's hit rate, with and without versioned keys and upgrade on read.
//
// A deploy adds three fields to the cached User: a display name and a
// locale, which can be derived from what old values hold, and a phone
// number, which cannot and which payments need. Users are read by a
// skewed, steady workload (4% of requests update a user and invalidate
// it), so the hit rate before the deploy is about 95%.
//
//   - Without versioning, the new code reads the old values, finds the new
//     fields missing and treats them as misses: the hit rate falls to about
//     40% and recovers only as the database reloads every user.
//   - With WithVersion("v2") and WithUpgradeFrom("v1", ...), the new code
//     reads its own keyspace; a miss there upgrades the v1 value without a
//     load. Only payers, whose phone number cannot be derived and whom a
//     WithValidator check refuses to serve without one, are loaded. The hit
//     rate stays where it was.
//
// It runs on an embedded Redis (miniredis) unless REDIS_ADDR is set:
//
//	go run ./examples/schemachange
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"log/slog"
	"math/rand/v2"
	"os"
	"strings"
	"sync/atomic"

	"github.com/alicebob/miniredis/v2"
	"github.com/layercache/layercache"
	"github.com/redis/go-redis/v9"
)

// UserV1 is what the old code cached.
type UserV1 struct {
	ID    int    `json:"id"`
	Name  string `json:"name"`
	Email string `json:"email"`
	Payer bool   `json:"payer"`
}

// User is what the new code caches: three more fields.
type User struct {
	ID          int    `json:"id"`
	Name        string `json:"name"`
	Email       string `json:"email"`
	Payer       bool   `json:"payer"`
	DisplayName string `json:"display_name"`
	Locale      string `json:"locale"`
	Phone       string `json:"phone"`
}

const (
	users  = 5000
	window = 2500 // requests per window
)

// database is the source of truth, and counts its queries.
type database struct{ loads atomic.Int64 }

func (d *database) user(id int) User {
	d.loads.Add(1)
	first, _, _ := strings.Cut(fmt.Sprint("user", id, " Example"), " ")
	return User{ID: id, Name: fmt.Sprint("user", id, " Example"), Email: fmt.Sprint("u", id, "@example.com"),
		Payer: id%10 == 0, DisplayName: first, Locale: "en", Phone: fmt.Sprintf("+1 555 %04d", id)}
}

func (d *database) userV1(id int) UserV1 {
	u := d.user(id)
	return UserV1{ID: u.ID, Name: u.Name, Email: u.Email, Payer: u.Payer}
}

// complete is the new code's check: a user without the new fields is not
// usable, and a payer without a phone number must never be served.
func complete(u User) error {
	if u.DisplayName == "" || u.Locale == "" {
		return errors.New("missing fields added in v2")
	}
	if u.Payer && u.Phone == "" {
		return errors.New("payer without a phone number")
	}
	return nil
}

// upgrade derives what it can; a payer's phone number it cannot.
func upgrade(old UserV1) (User, error) {
	first, _, _ := strings.Cut(old.Name, " ")
	return User{ID: old.ID, Name: old.Name, Email: old.Email, Payer: old.Payer, DisplayName: first, Locale: "en"}, nil
}

func main() {
	windows := flag.Int("windows", 6, "windows of requests to show after the deploy")
	flag.Parse()
	if err := run(*windows); err != nil {
		log.Fatal(err)
	}
}

func run(windows int) error {
	ctx := context.Background()
	rdb, where, stop, err := connect()
	if err != nil {
		return err
	}
	defer stop()
	fmt.Println("redis:", where)
	quiet := layercache.WithLogger(slog.New(slog.DiscardHandler))

	type scenario struct {
		name string
		opts []layercache.Option // the new code's cache
	}
	scenarios := []scenario{
		{"without versioning (same keyspace, new fields required)", []layercache.Option{
			layercache.WithVersion("v1"), layercache.WithValidator(complete)}},
		{"with WithVersion(\"v2\") + WithUpgradeFrom(\"v1\")", []layercache.Option{
			layercache.WithVersion("v2"), layercache.WithValidator(complete),
			layercache.WithUpgradeFrom("v1", upgrade)}},
	}
	var summary []string
	for i, sc := range scenarios {
		ns := fmt.Sprint("schemachange", i)
		db := &database{}

		// The old deploy, warmed up.
		old, err := layercache.New[UserV1](rdb, layercache.WithNamespace(ns), layercache.WithVersion("v1"), quiet)
		if err != nil {
			return err
		}
		oldRead := func(ctx context.Context, id int) error {
			_, err := old.Fetch(ctx, fmt.Sprint(id), func(context.Context) (UserV1, error) { return db.userV1(id), nil })
			return err
		}
		oldWrite := func(ctx context.Context, id int) error { return old.Delete(ctx, fmt.Sprint(id)) }
		// A long-running service's cache holds every user.
		for id := range users {
			if err := old.Set(ctx, fmt.Sprint(id), db.userV1(id)); err != nil {
				return err
			}
		}
		// Run the workload until invalidations reach their steady state,
		// then measure the last window before the deploy.
		w := newWorkload(db)
		for range 8 {
			w.run(ctx, window, oldRead, oldWrite)
		}
		before := w.run(ctx, window, oldRead, oldWrite)
		old.Close()

		// The deploy.
		c, err := layercache.New[User](rdb, append([]layercache.Option{layercache.WithNamespace(ns), quiet}, sc.opts...)...)
		if err != nil {
			return err
		}
		newRead := func(ctx context.Context, id int) error {
			_, err := c.Fetch(ctx, fmt.Sprint(id), func(context.Context) (User, error) { return db.user(id), nil })
			return err
		}
		newWrite := func(ctx context.Context, id int) error { return c.Delete(ctx, fmt.Sprint(id)) }

		fmt.Printf("\n%s\n", sc.name)
		fmt.Printf("  %-22s %8s %8s %9s %9s\n", "window", "reads", "hit rate", "db loads", "upgrades")
		fmt.Printf("  %-22s %8d %7.1f%% %9d %9s\n", "before the deploy", before.reads, before.hitRate(), before.loads, "-")
		worst := 100.0
		var loads int64
		for win := 1; win <= windows; win++ {
			u0 := c.Stats().Upgrades
			r := w.run(ctx, window, newRead, newWrite)
			worst = min(worst, r.hitRate())
			loads += r.loads
			fmt.Printf("  %-22s %8d %7.1f%% %9d %9d\n", fmt.Sprintf("after, window %d", win), r.reads, r.hitRate(), r.loads, c.Stats().Upgrades-u0)
		}
		st := c.Stats()
		summary = append(summary, fmt.Sprintf("  %-56s lowest hit rate %5.1f%%, %5d db loads after the deploy, %d values refused by the validator",
			sc.name+":", worst, loads, st.ValidationFailures))
		c.Close()
	}
	fmt.Println()
	for _, s := range summary {
		fmt.Println(s)
	}
	return nil
}

// workload reads users, skewed towards popular ones; 4% of requests
// update a user (in the database, then invalidate the cache).
type workload struct {
	db *database
	r  *rand.Rand
	z  *rand.Zipf
}

// The workload: popularity follows a Zipf law (s, v), and one request in
// writeEvery updates a user.
const (
	zipfS, zipfV = 1.2, 100.0
	writeEvery   = 25
)

type result struct{ reads, loads int64 }

func (w result) hitRate() float64 { return 100 * (1 - float64(w.loads)/float64(w.reads)) }

func newWorkload(db *database) *workload {
	r := rand.New(rand.NewPCG(1, 2))
	return &workload{db: db, r: r, z: rand.NewZipf(r, zipfS, zipfV, users-1)}
}

func (w *workload) run(ctx context.Context, requests int, read, write func(context.Context, int) error) result {
	loads0 := w.db.loads.Load()
	var win result
	for range requests {
		id := int(w.z.Uint64())
		if w.r.IntN(writeEvery) == 0 {
			if err := write(ctx, id); err != nil {
				log.Fatal(err)
			}
			continue
		}
		win.reads++
		if err := read(ctx, id); err != nil {
			log.Fatal(err)
		}
	}
	win.loads = w.db.loads.Load() - loads0
	return win
}

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
