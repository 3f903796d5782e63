// Package redistest is the Redis test harness shared by the tests of
// layercache.
//
// Tests run their body once per Redis flavour with [Run]:
//
//	func TestMain(m *testing.M) { redistest.Main(m) }
//
//	func TestSomething(t *testing.T) {
//		redistest.Run(t, func(t *testing.T, tgt *redistest.Target) {
//			c := tgt.NewClient(t)
//			ns := redistest.Namespace(t)
//			// ... use keys prefixed with ns ...
//		})
//	}
//
// The "miniredis" target is always available and is a fresh in-process
// miniredis per call. The "standalone" (one redis-server) and "cluster"
// (three redis-server masters, no replicas) targets are used when both
// redis-server and redis-cli are on PATH. They are started lazily, at most
// once per test binary, shared by every test of the binary, listen on
// 127.0.0.1 only, and are stopped by [Main] after the tests ran. Child
// processes are also killed by the kernel if the test binary dies.
//
// Because real servers are shared, tests must isolate themselves by
// prefixing every key and channel with a [Namespace] and must not run
// FLUSHALL, FLUSHDB, CONFIG SET or similar server-wide commands.
//
// When the binaries are missing, real targets are skipped, unless the
// environment variable LAYERCACHE_REQUIRE_REDIS=1 is set, in which case
// the test fails. A real server that cannot be started is always a test
// failure.
//
// Tests that break Redis on purpose use servers of their own instead:
// [StartServer] (a redis-server to kill and restart on the same port) and
// [StartCluster] (a cluster with replicas whose masters can be killed and
// whose slots can be moved under load), stopped by t.Cleanup. Server-side
// faults are [KillClients], [ClientPause] and [DebugSleep]; network
// faults are in the faults package.
//
// The helpers shared by every test are [Eventually] (bounded polling, no
// sleeping to "let things settle"), [Clients] (one client per simulated
// process) and [Hammer] and [HammerFor] (many goroutines at once, panics
// reported).
package redistest

import (
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
)

// RequireEnv is the environment variable that, when set to "1", turns a
// missing redis-server or redis-cli binary into a test failure instead of
// a skip.
const RequireEnv = "LAYERCACHE_REQUIRE_REDIS"

const (
	pingTimeout         = 10 * time.Second
	pingInterval        = 20 * time.Millisecond
	clusterReadyTimeout = 30 * time.Second
	clusterCreateLimit  = 30 * time.Second
	stopGrace           = 2 * time.Second

	// Ports are picked in [portMin, portMax) so that both P and the cluster
	// bus port P+10000 stay below the usual Linux ephemeral range (32768+),
	// where outgoing connections could grab them after the check.
	portMin = 20000
	portMax = 22700
	busDiff = 10000
)

// Target is one Redis deployment that a test runs against.
//
// Targets returned for real servers are copies: tests may not change the
// servers' configuration, but changing the struct is harmless.
type Target struct {
	// Name is "miniredis", "standalone" or "cluster" for the targets of
	// [Run], "dedicated" or "dedicated-cluster" for [Server.Target] and
	// [DedicatedCluster.Target].
	Name string
	// Addrs are the host:port addresses of the nodes (one for miniredis
	// and standalone, every master for cluster). All are on 127.0.0.1.
	Addrs []string
	// Cluster reports whether the target is a Redis Cluster.
	Cluster bool
	// Real reports whether the target is a real redis-server (false for
	// miniredis).
	Real bool
	// Mini is the in-process server; non-nil only for the miniredis target.
	Mini *miniredis.Miniredis
}

// NewClient returns a client for tgt with short timeouts: a
// *redis.ClusterClient for a cluster target, a *redis.Client otherwise.
// The client is closed by t.Cleanup.
func (tgt *Target) NewClient(t testing.TB) redis.UniversalClient {
	t.Helper()
	return tgt.NewClientOpts(t, nil)
}

// NewClientOpts is like [Target.NewClient] but lets mod adjust the options
// (pre-filled with the addresses and short timeouts) before the client is
// created. mod may be nil.
func (tgt *Target) NewClientOpts(t testing.TB, mod func(*redis.UniversalOptions)) redis.UniversalClient {
	t.Helper()
	o := &redis.UniversalOptions{
		Addrs:        slices.Clone(tgt.Addrs),
		DialTimeout:  2 * time.Second,
		ReadTimeout:  3 * time.Second,
		WriteTimeout: 3 * time.Second,
	}
	if mod != nil {
		mod(o)
	}
	var c redis.UniversalClient
	if tgt.Cluster {
		c = redis.NewClusterClient(o.Cluster())
	} else {
		c = redis.NewClient(o.Simple())
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func (tgt *Target) clone() *Target {
	c := *tgt
	c.Addrs = slices.Clone(tgt.Addrs)
	return &c
}

// Main runs the tests of m, then stops every Redis server this package
// started and removes their directories, and exits with the tests' code.
// Call it from TestMain. It starts nothing itself.
func Main(m *testing.M) {
	code := m.Run()
	StopAll()
	os.Exit(code)
}

// Run runs fn as one subtest per target: "miniredis" (fresh for this
// call), then "standalone" and "cluster". The real targets are skipped
// (or fail, see [RequireEnv]) when redis-server or redis-cli is missing.
func Run(t *testing.T, fn func(t *testing.T, tgt *Target)) {
	t.Helper()
	t.Run("miniredis", func(t *testing.T) { fn(t, Miniredis(t)) })
	t.Run("standalone", func(t *testing.T) { fn(t, Standalone(t)) })
	t.Run("cluster", func(t *testing.T) { fn(t, Cluster(t)) })
}

// Targets returns every available target: a fresh miniredis (closed by
// t.Cleanup) and, when the binaries are on PATH, the shared standalone and
// cluster targets. Missing binaries are logged, or fail the test when
// [RequireEnv] is set; a failed server start fails the test.
func Targets(t testing.TB) []*Target {
	t.Helper()
	ts := []*Target{Miniredis(t)}
	if _, err := binaries(); err != nil {
		if os.Getenv(RequireEnv) == "1" {
			t.Fatal(unavailableMsg(err, true))
		}
		t.Log(unavailableMsg(err, false))
		return ts
	}
	// Start both concurrently; each start happens at most once.
	var wg sync.WaitGroup
	for _, r := range []*realTarget{&standalone, &cluster} {
		wg.Add(1)
		go func() { defer wg.Done(); r.get() }()
	}
	wg.Wait()
	return append(ts, Standalone(t), Cluster(t))
}

// Miniredis returns a target backed by a fresh miniredis server that is
// closed by t.Cleanup.
func Miniredis(t testing.TB) *Target {
	t.Helper()
	m, err := miniredis.Run()
	if err != nil {
		t.Fatalf("redistest: start miniredis: %v", err)
	}
	t.Cleanup(m.Close)
	return &Target{Name: "miniredis", Addrs: []string{m.Addr()}, Mini: m}
}

// Standalone returns the shared single redis-server target, starting it on
// first use. It skips t (or fails it, see [RequireEnv]) when the binaries
// are missing, and fails t when the server cannot be started.
func Standalone(t testing.TB) *Target {
	t.Helper()
	return realGet(t, &standalone)
}

// Cluster returns the shared three-master Redis Cluster target, starting
// it on first use. It skips t (or fails it, see [RequireEnv]) when the
// binaries are missing, and fails t when the cluster cannot be started.
func Cluster(t testing.TB) *Target {
	t.Helper()
	return realGet(t, &cluster)
}

var nsCounter atomic.Uint64

// Namespace returns a short string unique to this call within the test
// binary (and random across binaries), made only of [a-z0-9-], for use as
// a key or channel prefix, e.g. "t1a-3f09c2".
func Namespace(t testing.TB) string {
	t.Helper()
	n := nsCounter.Add(1)
	return "t" + strconv.FormatUint(n, 36) + "-" + fmt.Sprintf("%06x", rand.Uint32()&0xffffff)
}

// ---- real server management ----

type realTarget struct {
	once  sync.Once
	start func() (*Target, error)
	tgt   *Target
	err   error
}

var (
	standalone = realTarget{start: startStandalone}
	cluster    = realTarget{start: startCluster}
)

func (r *realTarget) get() (*Target, error) {
	r.once.Do(func() { r.tgt, r.err = r.start() })
	return r.tgt, r.err
}

func realGet(t testing.TB, r *realTarget) *Target {
	t.Helper()
	requireBinaries(t)
	tgt, err := r.get()
	if err != nil {
		t.Fatalf("redistest: %v", err)
	}
	return tgt.clone()
}

func unavailableMsg(err error, required bool) string {
	msg := fmt.Sprintf("redistest: real Redis targets unavailable: %v; install redis-server and redis-cli "+
		"(Debian/Ubuntu: apt-get install redis-server redis-tools)", err)
	if required {
		return msg + " (" + RequireEnv + "=1 makes this a failure)"
	}
	return msg + "; set " + RequireEnv + "=1 to fail instead of skipping"
}

func startStandalone() (*Target, error) {
	p, err := startShared("standalone", false, nil)
	if err != nil {
		return nil, err
	}
	return &Target{Name: "standalone", Addrs: []string{p.addr}, Real: true}, nil
}
