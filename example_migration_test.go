package layercache_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"time"

	"github.com/layercache/layercache"
)

type Product struct {
	ID   int    `json:"id"`
	Name string `json:"name"`
}

func ExampleWithLayout() {
	rdb, stop := exampleClient()
	defer stop()
	ctx := context.Background()

	// A catalog in 4 hashes rather than one key per product: on a Redis
	// Cluster the hashes spread over the masters.
	catalog, _ := layercache.New[Product](rdb, layercache.WithNamespace("catalog"), layercache.WithLayout(layercache.Hash(4)))
	defer catalog.Close()
	for i := 1; i <= 100; i++ {
		_ = catalog.Set(ctx, fmt.Sprint(i), Product{ID: i})
	}
	p, _ := catalog.Get(ctx, "42")
	keys, _ := rdb.Keys(ctx, "*").Result()
	sort.Strings(keys)
	fmt.Println(p.ID, len(keys), keys[0])
	// Output: 42 4 catalog:v1:h4:{0.1}
}

func ExampleKeyPerEntry() {
	rdb, stop := exampleClient()
	defer stop()
	ctx := context.Background()

	c, _ := layercache.New[Product](rdb, layercache.WithNamespace("products"), layercache.WithLayout(layercache.KeyPerEntry()))
	defer c.Close()
	_ = c.Set(ctx, "42", Product{ID: 42})
	keys, _ := rdb.Keys(ctx, "*").Result()
	fmt.Println(keys)
	// Output: [products:v1:{42}]
}

func ExampleHash() {
	rdb, stop := exampleClient()
	defer stop()
	ctx := context.Background()

	c, _ := layercache.New[Product](rdb, layercache.WithNamespace("catalog"), layercache.WithLayout(layercache.Hash(1)))
	defer c.Close()
	_ = c.Set(ctx, "42", Product{ID: 42, Name: "Espresso machine"})
	_ = c.Set(ctx, "43", Product{ID: 43, Name: "Grinder"})
	fields, _ := rdb.HKeys(ctx, "catalog:v1:h1:{0.0}").Result()
	sort.Strings(fields)
	fmt.Println(fields)
	// Output: [42 43]
}

func ExampleRaw() {
	rdb, stop := exampleClient()
	defer stop()
	ctx := context.Background()

	// Code that predates the library cached products like this.
	_ = rdb.Set(ctx, "product:42", `{"id":42,"name":"Espresso machine"}`, time.Hour).Err()

	// Adopt the library over that cache, without flushing it.
	products, _ := layercache.New[Product](rdb, layercache.WithLayout(layercache.Raw("product:%s")))
	defer products.Close()
	p, _ := products.Fetch(ctx, "42", func(context.Context) (Product, error) {
		panic("not called: the legacy value is a hit")
	})
	fmt.Println(p.Name)

	// And what the library writes, the old code still reads.
	_ = products.Set(ctx, "43", Product{ID: 43, Name: "Grinder"})
	fmt.Println(rdb.Get(ctx, "product:43").Val())
	// Output:
	// Espresso machine
	// {"id":43,"name":"Grinder"}
}

func ExampleWithMigration() {
	rdb, stop := exampleClient()
	defer stop()
	ctx := context.Background()

	// The old code's cache: one string key per product.
	_ = rdb.Set(ctx, "product:42", `{"id":42,"name":"Espresso machine"}`, time.Hour).Err()

	// The operator moved the migration to read-new-first; every instance
	// follows within a second.
	_ = layercache.SetPhase(ctx, rdb, "catalog-to-hash", layercache.PhaseReadNewFirst)

	products, _ := layercache.New[Product](rdb, layercache.WithNamespace("catalog"),
		layercache.WithMigration("catalog-to-hash", layercache.Raw("product:%s"), layercache.Hash(16)))
	defer products.Close()

	p, _ := products.Get(ctx, "42") // new side misses, old side hits: backfilled
	p, _ = products.Get(ctx, "42")  // new side hits
	st := products.Stats().Migration
	fmt.Println(p.Name, st.Phase)
	fmt.Printf("new: reads=%d hits=%d backfills=%d; old: fallbacks=%d hits=%d\n",
		st.New.Reads, st.New.Hits, st.New.Backfills, st.Old.Fallbacks, st.Old.Hits)
	// Output:
	// Espresso machine read-new-first
	// new: reads=2 hits=1 backfills=1; old: fallbacks=1 hits=1
}

func ExampleSetPhase() {
	rdb, stop := exampleClient()
	defer stop()
	ctx := context.Background()

	p, _ := layercache.GetPhase(ctx, rdb, "catalog-to-hash")
	fmt.Println("before:", p)
	for _, next := range []layercache.Phase{layercache.PhaseDualWrite, layercache.PhaseReadOldFirst} {
		if err := layercache.SetPhase(ctx, rdb, "catalog-to-hash", next); err != nil {
			panic(err)
		}
	}
	p, _ = layercache.GetPhase(ctx, rdb, "catalog-to-hash")
	fmt.Println("now:", p, "in", layercache.PhaseKey("catalog-to-hash"))
	// Output:
	// before: old
	// now: read-old-first in layercache-migration:{catalog-to-hash}
}

func ExampleCache_Reconcile() {
	rdb, stop := exampleClient()
	defer stop()
	ctx := context.Background()

	for i := 1; i <= 3; i++ {
		_ = rdb.Set(ctx, fmt.Sprint("product:", i), fmt.Sprintf(`{"id":%d}`, i), time.Hour).Err()
	}
	_ = layercache.SetPhase(ctx, rdb, "catalog-to-hash", layercache.PhaseDualWrite)
	products, _ := layercache.New[Product](rdb, layercache.WithNamespace("catalog"),
		layercache.WithMigration("catalog-to-hash", layercache.Raw("product:%s"), layercache.Hash(4)))
	defer products.Close()

	// Fill the new side with what only the old side has.
	rep, _ := products.Reconcile(ctx, layercache.ReconcileOptions{Repair: true})
	fmt.Printf("scanned=%d only-old=%d repaired=%d\n", rep.Scanned, rep.OnlyOld, rep.Repaired)
	rep, _ = products.Reconcile(ctx, layercache.ReconcileOptions{})
	fmt.Printf("scanned=%d matched=%d\n", rep.Scanned, rep.Matched)
	// Output:
	// scanned=3 only-old=3 repaired=3
	// scanned=3 matched=3
}

type UserV1 struct {
	ID   int    `json:"id"`
	Name string `json:"name"`
}

type UserV2 struct {
	ID    int    `json:"id"`
	Name  string `json:"name"`
	Phone string `json:"phone"`
}

func ExampleWithUpgradeFrom() {
	rdb, stop := exampleClient()
	defer stop()
	ctx := context.Background()

	v1, _ := layercache.New[UserV1](rdb, layercache.WithNamespace("users"), layercache.WithVersion("v1"))
	defer v1.Close()
	_ = v1.Set(ctx, "42", UserV1{ID: 42, Name: "Ada"})

	// The new deploy reads v2; a miss there upgrades the v1 value.
	v2, _ := layercache.New[UserV2](rdb, layercache.WithNamespace("users"), layercache.WithVersion("v2"),
		layercache.WithUpgradeFrom("v1", func(u UserV1) (UserV2, error) {
			return UserV2{ID: u.ID, Name: u.Name}, nil
		}))
	defer v2.Close()
	u, _ := v2.Fetch(ctx, "42", func(context.Context) (UserV2, error) {
		panic("not called: the v1 value was upgraded")
	})
	fmt.Println(u.Name, v2.Stats().Upgrades, rdb.Exists(ctx, "users:v2:{42}").Val())
	// Output: Ada 1 1
}

func ExampleWithValidator() {
	rdb, stop := exampleClient()
	defer stop()
	ctx := context.Background()

	old, _ := layercache.New[UserV2](rdb, layercache.WithNamespace("users"))
	defer old.Close()
	_ = old.Set(ctx, "42", UserV2{ID: 42, Name: "Ada"}) // no phone number

	// Payments need the phone number: a cached user without one is a miss.
	users, _ := layercache.New[UserV2](rdb, layercache.WithNamespace("users"), layercache.WithLogger(slog.New(slog.DiscardHandler)),
		layercache.WithValidator(func(u UserV2) error {
			if u.Phone == "" {
				return errors.New("no phone number")
			}
			return nil
		}))
	defer users.Close()
	u, _ := users.Fetch(ctx, "42", func(context.Context) (UserV2, error) {
		fmt.Println("loading from the database")
		return UserV2{ID: 42, Name: "Ada", Phone: "+44 20 7946 0000"}, nil
	})
	fmt.Println(u.Phone, users.Stats().ValidationFailures)
	// Output:
	// loading from the database
	// +44 20 7946 0000 1
}

func ExampleWithVersionFromType() {
	rdb, stop := exampleClient()
	defer stop()

	v1, _ := layercache.New[UserV1](rdb, layercache.WithNamespace("users"), layercache.WithVersionFromType())
	v2, _ := layercache.New[UserV2](rdb, layercache.WithNamespace("users"), layercache.WithVersionFromType())
	defer v1.Close()
	defer v2.Close()
	// A new field is a new keyspace, by itself.
	fmt.Println(v1.Version() == "v1."+layercache.TypeVersion[UserV1](), v1.Version() != v2.Version())
	// Output: true true
}

func ExampleCache_PurgeVersion() {
	rdb, stop := exampleClient()
	defer stop()
	ctx := context.Background()

	v1, _ := layercache.New[UserV1](rdb, layercache.WithNamespace("users"), layercache.WithVersion("v1"))
	defer v1.Close()
	for i := range 3 {
		_ = v1.Set(ctx, fmt.Sprint(i), UserV1{ID: i})
	}
	v2, _ := layercache.New[UserV2](rdb, layercache.WithNamespace("users"), layercache.WithVersion("v2"))
	defer v2.Close()
	rep, err := v2.PurgeVersion(ctx, "v1", layercache.PurgeOptions{RateLimit: 1000})
	fmt.Println(rep.Matched, rep.Deleted, err)
	// Output: 3 3 <nil>
}
