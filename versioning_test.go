package layercache_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/layercache/layercache"
	"github.com/layercache/layercache/internal/envelope"
	"github.com/layercache/layercache/internal/redistest"
	"github.com/redis/go-redis/v9"
)

// Three generations of one cached type.
type userV1 struct {
	ID   int    `json:"id"`
	Name string `json:"name"`
}

type userV2 struct {
	ID    int    `json:"id"`
	First string `json:"first"`
	Last  string `json:"last"`
}

type userV3 struct {
	ID    int    `json:"id"`
	First string `json:"first"`
	Last  string `json:"last"`
	Phone string `json:"phone"`
}

func upgradeV1(u userV1) (userV3, error) {
	first, last, _ := strings.Cut(u.Name, " ")
	return userV3{ID: u.ID, First: first, Last: last, Phone: "unknown"}, nil
}

func upgradeV2(u userV2) (userV3, error) {
	return userV3{ID: u.ID, First: u.First, Last: u.Last, Phone: "unknown"}, nil
}

func TestUpgradeOnRead(t *testing.T) {
	for _, layout := range []layercache.Layout{layercache.KeyPerEntry(), layercache.Hash(4)} {
		t.Run(layout.String(), func(t *testing.T) {
			redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
				ctx := context.Background()
				client := tgt.NewClient(t)
				ns := redistest.Namespace(t)
				v1 := newCache[userV1](t, client, layercache.WithNamespace(ns), layercache.WithVersion("v1"), layercache.WithLayout(layout))
				v2 := newCache[userV2](t, client, layercache.WithNamespace(ns), layercache.WithVersion("v2"), layercache.WithLayout(layout))
				const n = 40
				for i := range n {
					var err error
					if i%2 == 0 {
						err = v1.Set(ctx, fmt.Sprint(i), userV1{ID: i, Name: "Ada Lovelace"})
					} else {
						err = v2.Set(ctx, fmt.Sprint(i), userV2{ID: i, First: "Grace", Last: "Hopper"})
					}
					if err != nil {
						t.Fatal(err)
					}
				}
				if err := v1.Set(ctx, "both", userV1{ID: -1, Name: "from v1"}); err != nil {
					t.Fatal(err)
				}
				if err := v2.Set(ctx, "both", userV2{ID: -1, First: "from v2"}); err != nil {
					t.Fatal(err)
				}

				v3 := newCache[userV3](t, client, layercache.WithNamespace(ns), layercache.WithVersion("v3"), layercache.WithLayout(layout),
					layercache.WithUpgradeFrom("v2", upgradeV2), layercache.WithUpgradeFrom("v1", upgradeV1))
				for i := range n {
					got, err := v3.Fetch(ctx, fmt.Sprint(i), noLoad[userV3](t))
					if err != nil || got.ID != i || got.Phone != "unknown" || got.First == "" || got.Last == "" {
						t.Fatalf("Fetch(%d) = %+v, %v", i, got, err)
					}
				}
				// The most recent version given first wins.
				if got, err := v3.Get(ctx, "both"); err != nil || got.First != "from v2" {
					t.Fatalf("a key at v1 and v2 upgraded to %+v, %v; want v2's", got, err)
				}
				st := v3.Stats()
				if st.Upgrades != n+1 || st.Loads != 0 || st.RedisHits != n+1 {
					t.Fatalf("stats %+v; want %d upgrades, no loads", st, n+1)
				}
				// Written at v3: the next reads are plain hits.
				for i := range n {
					if _, err := v3.Fetch(ctx, fmt.Sprint(i), noLoad[userV3](t)); err != nil {
						t.Fatal(err)
					}
				}
				if st := v3.Stats(); st.Upgrades != n+1 {
					t.Fatalf("values were upgraded again: %d", st.Upgrades)
				}
				if layout.String() == "key-per-entry" {
					// Same absolute expiry as the old value.
					oldEnv, _ := client.Get(ctx, layercache.RedisKey(ns, "v1", "0")).Bytes()
					newEnv, _ := client.Get(ctx, layercache.RedisKey(ns, "v3", "0")).Bytes()
					oh, _, err1 := envelope.Decode(oldEnv)
					nh, _, err2 := envelope.Decode(newEnv)
					if err1 != nil || err2 != nil || oh.ExpiresAt != nh.ExpiresAt || oh.FreshUntil != nh.FreshUntil {
						t.Fatalf("upgraded header %+v, old %+v (%v, %v)", nh, oh, err1, err2)
					}
				}
			})
		})
	}
}

// TestUpgradeNeverResurrects checks that a write or delete at the current
// version removes the older version's value, which an upgrade could
// otherwise bring back once the current entry is gone.
func TestUpgradeNeverResurrects(t *testing.T) {
	for name, extra := range map[string][]layercache.Option{
		"plain":      nil,
		"with locks": {layercache.WithLocks(time.Second, time.Second)},
	} {
		t.Run(name, func(t *testing.T) { testUpgradeNeverResurrects(t, extra) })
	}
}

func testUpgradeNeverResurrects(t *testing.T, extra []layercache.Option) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		client := tgt.NewClient(t)
		ns := redistest.Namespace(t)
		v1 := newCache[userV1](t, client, layercache.WithNamespace(ns))
		_ = v1.Set(ctx, "written", userV1{ID: 1, Name: "before the write"})
		_ = v1.Set(ctx, "deleted", userV1{ID: 2, Name: "before the delete"})
		v3 := newCache[userV3](t, client, append([]layercache.Option{layercache.WithNamespace(ns), layercache.WithVersion("v3"),
			layercache.WithUpgradeFrom("v1", upgradeV1)}, extra...)...)
		if err := v3.Set(ctx, "written", userV3{ID: 1, First: "after"}); err != nil {
			t.Fatal(err)
		}
		if err := v3.Delete(ctx, "deleted"); err != nil {
			t.Fatal(err)
		}
		// The current entry expires (or is evicted).
		client.Del(ctx, layercache.RedisKey(ns, "v3", "written"))
		for _, k := range []string{"written", "deleted"} {
			if got, err := v3.Get(ctx, k); !errors.Is(err, layercache.ErrNotFound) {
				t.Fatalf("%s: Get = %+v, %v; an old value came back", k, got, err)
			}
		}
	})
}

func TestUpgradeFailureIsAMiss(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		client := tgt.NewClient(t)
		ns := redistest.Namespace(t)
		v1 := newCache[userV1](t, client, layercache.WithNamespace(ns))
		_ = v1.Set(ctx, "bad", userV1{ID: 1, Name: "x"})
		_ = v1.Set(ctx, "panics", userV1{ID: 2, Name: "y"})
		_ = client.Set(ctx, layercache.RedisKey(ns, "v1", "garbage"), "not an envelope", time.Minute)
		v3 := newCache[userV3](t, client, layercache.WithNamespace(ns), layercache.WithVersion("v3"),
			layercache.WithUpgradeFrom("v1", func(u userV1) (userV3, error) {
				if u.ID == 2 {
					panic("upgrade bug")
				}
				return userV3{}, errors.New("cannot upgrade")
			}),
			layercache.WithValidator(func(u userV3) error { return nil }))
		var loads counter
		for _, k := range []string{"bad", "panics", "garbage"} {
			got, err := v3.Fetch(ctx, k, func(context.Context) (userV3, error) { loads.n.Add(1); return userV3{ID: 9}, nil })
			if err != nil || got.ID != 9 {
				t.Fatalf("%s: Fetch = %+v, %v; want the loaded value", k, got, err)
			}
		}
		if st := v3.Stats(); st.UpgradeErrors != 2 || st.Upgrades != 0 || loads.n.Load() != 3 {
			t.Fatalf("stats %+v, loads %d", st, loads.n.Load())
		}
	})
}

func TestValidator(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		client := tgt.NewClient(t)
		ns := redistest.Namespace(t)
		// Old code cached users without the phone number payments need.
		old := newCache[userV3](t, client, layercache.WithNamespace(ns))
		_ = old.Set(ctx, "no-phone", userV3{ID: 1})
		_ = old.Set(ctx, "ok", userV3{ID: 2, Phone: "+1 555"})

		var logs lockedBuffer
		c, err := layercache.New[userV3](client, layercache.WithNamespace(ns),
			layercache.WithLogger(slog.New(slog.NewTextHandler(&logs, nil))),
			layercache.WithValidator(func(u userV3) error {
				if u.Phone == "" {
					return errors.New("no phone number")
				}
				return nil
			}))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		for range 3 {
			if _, err := c.Get(ctx, "no-phone"); !errors.Is(err, layercache.ErrNotFound) {
				t.Fatalf("Get of an invalid value = %v, want ErrNotFound", err)
			}
		}
		if got, err := c.Get(ctx, "ok"); err != nil || got.Phone == "" {
			t.Fatalf("Get of a valid value = %+v, %v", got, err)
		}
		got, err := c.Fetch(ctx, "no-phone", func(context.Context) (userV3, error) { return userV3{ID: 1, Phone: "+1 999"}, nil })
		if err != nil || got.Phone != "+1 999" {
			t.Fatalf("Fetch = %+v, %v; want the loaded value", got, err)
		}
		if st := c.Stats(); st.ValidationFailures != 4 || st.Loads != 1 {
			t.Fatalf("stats %+v; want 4 validation failures, 1 load", st)
		}
		if n := strings.Count(logs.String(), "fails validation"); n != 1 {
			t.Fatalf("%d log lines for one bad key read 4 times, want 1:\n%s", n, logs.String())
		}
	})
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func TestTypedOptionsMustMatchT(t *testing.T) {
	client := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1"})
	defer client.Close()
	cases := map[string]layercache.Option{
		"validator of another type": layercache.WithValidator(func(product) error { return nil }),
		"upgrade to another type":   layercache.WithUpgradeFrom("v0", func(u userV1) (product, error) { return product{}, nil }),
		"upgrade from own version":  layercache.WithUpgradeFrom("v1", func(u userV1) (user, error) { return user{}, nil }),
		"nil validator":             layercache.WithValidator[user](nil),
		"nil upgrade":               layercache.WithUpgradeFrom[userV1, user]("v0", nil),
		"bad upgrade version":       layercache.WithUpgradeFrom("v:0", func(u userV1) (user, error) { return user{}, nil }),
	}
	for name, opt := range cases {
		_, err := layercache.New[user](client, opt)
		if !errors.Is(err, layercache.ErrInvalidOption) {
			t.Errorf("%s: New = %v, want ErrInvalidOption", name, err)
		}
	}
	_, err := layercache.New[user](client, layercache.WithValidator(func(product) error { return nil }))
	if msg := fmt.Sprint(err); !strings.Contains(msg, "layercache_test.product") || !strings.Contains(msg, "layercache_test.user") {
		t.Errorf("the error should name both types: %v", err)
	}
	_, err = layercache.New[user](client,
		layercache.WithUpgradeFrom("v0", func(u userV1) (user, error) { return user{}, nil }),
		layercache.WithUpgradeFrom("v0", func(u userV2) (user, error) { return user{}, nil }))
	if !errors.Is(err, layercache.ErrInvalidOption) {
		t.Errorf("the same upgrade version twice: %v", err)
	}
}

// Shapes for version-from-type.
type (
	shapeA struct {
		ID   int       `json:"id"`
		Name string    `json:"name"`
		At   time.Time `json:"at"`
		Tree *tree     `json:"tree"`
	}
	// shapeARenamed has shapeA's shape under other names: same version.
	shapeARenamed struct {
		ID   int       `json:"id"`
		Name string    `json:"name"`
		At   time.Time `json:"at"`
		Tree *forest   `json:"tree"`
	}
	shapeNewField struct {
		ID    int       `json:"id"`
		Name  string    `json:"name"`
		At    time.Time `json:"at"`
		Tree  *tree     `json:"tree"`
		Phone string    `json:"phone"`
	}
	shapeNewTag struct {
		ID   int       `json:"id"`
		Name string    `json:"full_name"`
		At   time.Time `json:"at"`
		Tree *tree     `json:"tree"`
	}
	shapeDeepChange struct {
		ID   int       `json:"id"`
		Name string    `json:"name"`
		At   time.Time `json:"at"`
		Tree *tree2    `json:"tree"`
	}
	tree struct {
		Value    int
		Children []tree
		Parent   *tree
		Index    map[string]*tree
	}
	forest struct {
		Value    int
		Children []forest
		Parent   *forest
		Index    map[string]*forest
	}
	tree2 struct {
		Value    int64 // was int
		Children []tree2
		Parent   *tree2
		Index    map[string]*tree2
	}
)

func typeVersions() string {
	return strings.Join([]string{
		layercache.TypeVersion[shapeA](),
		layercache.TypeVersion[shapeNewField](),
		layercache.TypeVersion[tree](),
		layercache.TypeVersion[map[string][]*userV3](),
	}, " ")
}

// TestHelperPrintTypeVersions is run by TestVersionFromType in a separate
// process.
func TestHelperPrintTypeVersions(t *testing.T) {
	if os.Getenv("LAYERCACHE_PRINT_TYPE_VERSIONS") != "1" {
		t.Skip("helper for TestVersionFromType")
	}
	fmt.Println("versions:", typeVersions())
}

func TestVersionFromType(t *testing.T) {
	a := layercache.TypeVersion[shapeA]()
	if len(a) != 12 || a != layercache.TypeVersion[shapeA]() {
		t.Fatalf("TypeVersion = %q, not a stable 12-digit digest", a)
	}
	if r := layercache.TypeVersion[shapeARenamed](); r != a {
		t.Fatalf("the same shape under other type names has version %s, want %s", r, a)
	}
	for name, v := range map[string]string{
		"new field":   layercache.TypeVersion[shapeNewField](),
		"new tag":     layercache.TypeVersion[shapeNewTag](),
		"deep change": layercache.TypeVersion[shapeDeepChange](),
	} {
		if v == a {
			t.Errorf("%s: version unchanged (%s)", name, v)
		}
	}

	// Another process computes the same versions.
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperPrintTypeVersions$", "-test.count=1")
	cmd.Env = append(os.Environ(), "LAYERCACHE_PRINT_TYPE_VERSIONS=1")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("subprocess: %v\n%s", err, out)
	}
	if want := "versions: " + typeVersions(); !strings.Contains(string(out), want) {
		t.Fatalf("subprocess printed\n%s\nwant %q", out, want)
	}

	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		client := tgt.NewClient(t)
		ns := redistest.Namespace(t)
		oldC := newCache[shapeA](t, client, layercache.WithNamespace(ns), layercache.WithVersionFromType())
		newC := newCache[shapeNewField](t, client, layercache.WithNamespace(ns), layercache.WithVersionFromType())
		if oldC.Version() != "v1."+a || newC.Version() == oldC.Version() {
			t.Fatalf("versions %q and %q", oldC.Version(), newC.Version())
		}
		_ = oldC.Set(ctx, "k", shapeA{ID: 1})
		if _, err := newC.Get(ctx, "k"); !errors.Is(err, layercache.ErrNotFound) {
			t.Fatalf("a new shape read an old-shaped value: %v", err)
		}
		// Upgrades name the old shape's version through TypeVersion.
		up := newCache[shapeNewField](t, client, layercache.WithNamespace(ns), layercache.WithVersionFromType(),
			layercache.WithUpgradeFrom("v1."+layercache.TypeVersion[shapeARenamed](), func(o shapeARenamed) (shapeNewField, error) {
				return shapeNewField{ID: o.ID, Phone: "?"}, nil
			}))
		if got, err := up.Get(ctx, "k"); err != nil || got.ID != 1 || got.Phone != "?" {
			t.Fatalf("upgrade across derived versions = %+v, %v", got, err)
		}
	})
}

func TestPurgeVersion(t *testing.T) {
	redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
		ctx := context.Background()
		client := tgt.NewClient(t)
		ns := redistest.Namespace(t)
		v1 := newCache[user](t, client, layercache.WithNamespace(ns), layercache.WithVersion("v1"))
		v1h := newCache[user](t, client, layercache.WithNamespace(ns), layercache.WithVersion("v1"), layercache.WithLayout(layercache.Hash(4)))
		v10 := newCache[user](t, client, layercache.WithNamespace(ns), layercache.WithVersion("v10"))
		v2 := newCache[user](t, client, layercache.WithNamespace(ns), layercache.WithVersion("v2"))
		other := newCache[user](t, client, layercache.WithNamespace(ns+"x"), layercache.WithVersion("v1"))
		const n = 300
		for i := range n {
			k := fmt.Sprint(i)
			for _, c := range []*layercache.Cache[user]{v1, v1h} {
				if err := c.Set(ctx, k, user{ID: i}); err != nil {
					t.Fatal(err)
				}
			}
			if i < 10 {
				_ = v10.Set(ctx, k, user{ID: i})
				_ = v2.Set(ctx, k, user{ID: i})
				_ = other.Set(ctx, k, user{ID: i})
			}
		}
		want := int64(n + 4) // the values and the four hashes

		if _, err := v2.PurgeVersion(ctx, "v2", layercache.PurgeOptions{}); !errors.Is(err, layercache.ErrInvalidOption) {
			t.Fatalf("purging the cache's own version: %v", err)
		}
		if _, err := v2.PurgeVersion(ctx, "v*", layercache.PurgeOptions{}); !errors.Is(err, layercache.ErrInvalidOption) {
			t.Fatalf("purging a pattern: %v", err)
		}
		dry, err := v2.PurgeVersion(ctx, "v1", layercache.PurgeOptions{DryRun: true})
		if err != nil || dry.Matched != want || dry.Deleted != 0 {
			t.Fatalf("dry run: %+v, %v", dry, err)
		}
		var progress []layercache.PurgeReport
		start := time.Now()
		rep, err := v2.PurgeVersion(ctx, "v1", layercache.PurgeOptions{BatchSize: 50, RateLimit: 1000,
			Progress: func(r layercache.PurgeReport) { progress = append(progress, r) }})
		took := time.Since(start)
		if err != nil || rep.Matched != want || rep.Deleted != want {
			t.Fatalf("purge: %+v, %v", rep, err)
		}
		if took < 200*time.Millisecond {
			t.Fatalf("%d keys at 1000/s took %v", want, took)
		}
		if len(progress) < int(want/50) || progress[len(progress)-1].Deleted != want {
			t.Fatalf("%d progress calls, last %+v", len(progress), progress[len(progress)-1])
		}
		if wantNodes := len(tgt.Addrs); rep.Nodes != wantNodes {
			t.Fatalf("scanned %d nodes, want %d", rep.Nodes, wantNodes)
		}
		if left := scanAll(ctx, t, client, ns+":v1:*"); len(left) != 0 {
			t.Fatalf("%d v1 keys left: %q", len(left), left[:min(5, len(left))])
		}
		for _, c := range []*layercache.Cache[user]{v10, v2, other} {
			if _, err := c.Get(ctx, "3"); err != nil {
				t.Fatalf("purging v1 touched %s: %v", c.Version(), err)
			}
		}
	})
}
