// Package pgtest starts real PostgreSQL servers for tests, as redistest
// starts redis-server: for the change-stream source that turns committed
// row changes into invalidations, which needs logical replication.
//
//	func TestMain(m *testing.M) { pgtest.Main(m) }
//
//	func TestSomething(t *testing.T) {
//		db := pgtest.Start(t) // a fresh database on the shared server
//		conn, err := pgx.Connect(ctx, db.DSN)
//		// ...
//	}
//
// The shared server is started lazily, at most once per test binary, from
// initdb into a temporary directory, listens on 127.0.0.1 only (its unix
// socket is in that directory too), runs with wal_level=logical, room
// for replication slots and WAL senders, fsync off, and trust
// authentication for the superuser "postgres". [Main] stops it after the
// tests; the kernel kills it if the test binary dies. Every [Start] gets
// a database of its own, dropped with its replication slots when the test
// ends, so tests may run in parallel.
//
// Tests that take the database down use [StartDedicated]: a server of
// their own they may stop, kill and restart.
//
// As root, initdb and postgres refuse to run, so they run as the
// "postgres" user, which must exist; otherwise as the current user.
// The binaries are looked up on PATH, then in /usr/lib/postgresql/*/bin
// (Debian's layout), newest version first. When they are missing, tests
// are skipped, unless LAYERCACHE_REQUIRE_REDIS=1 (the variable that
// makes redistest require its servers) is set: then they fail.
package pgtest

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// RequireEnv is the environment variable that, when set to "1", turns
// missing PostgreSQL binaries into a test failure instead of a skip. It
// is the same variable as redistest's: CI sets it to require every real
// server.
const RequireEnv = "LAYERCACHE_REQUIRE_REDIS"

// Superuser is the role every server is initialised with; DSNs connect
// as it.
const Superuser = "postgres"

const (
	startTimeout = 30 * time.Second
	stopGrace    = 10 * time.Second

	// Ports are picked in [portMin, portMax): below the Linux ephemeral
	// range, and apart from redistest's ports (20000-22699 and their
	// cluster bus ports 30000-32699).
	portMin = 23000
	portMax = 29000
)

// DB is a database of its own for one test.
type DB struct {
	// Name is the database's name.
	Name string
	// DSN connects to it as the superuser, e.g.
	// postgres://postgres@127.0.0.1:23456/t1_3f09c2?sslmode=disable.
	// Add replication=database for a logical replication connection.
	DSN string
	// Server is the server the database is on.
	Server *Server
}

// Main runs the tests of m, then stops the shared server (if a test
// started it) and removes its directory, and exits with the tests' code.
// Call it from TestMain. A package that also uses redistest writes its
// own TestMain instead:
//
//	func TestMain(m *testing.M) {
//		code := m.Run()
//		pgtest.StopAll()
//		redistest.StopAll()
//		os.Exit(code)
//	}
func Main(m *testing.M) {
	code := m.Run()
	StopAll()
	os.Exit(code)
}

// StopAll stops the shared server if it was started, removes its
// directory, and makes later [Start] calls fail. [Main] calls it.
func StopAll() {
	sharedMu.Lock()
	stopping = true
	sharedMu.Unlock()
	if s, _ := shared.get(false); s != nil {
		s.shutdown()
	}
}

// Require skips t (or fails it, see [RequireEnv]) when the PostgreSQL
// binaries are missing.
func Require(t testing.TB) {
	t.Helper()
	if _, err := binaries(); err != nil {
		msg := fmt.Sprintf("pgtest: PostgreSQL unavailable: %v; install it (Debian/Ubuntu: apt-get install postgresql)", err)
		if os.Getenv(RequireEnv) == "1" {
			t.Fatal(msg + " (" + RequireEnv + "=1 makes this a failure)")
		}
		t.Skip(msg + "; set " + RequireEnv + "=1 to fail instead of skipping")
	}
}

// Start returns a fresh database on the shared server, starting the
// server on first use. The database is dropped, with its replication
// slots, when t ends. It skips t (or fails it, see [RequireEnv]) when the
// binaries are missing, and fails t when the server cannot be started.
func Start(t testing.TB) *DB {
	t.Helper()
	Require(t)
	s, err := shared.get(true)
	if err != nil {
		t.Fatalf("pgtest: %v", err)
	}
	return s.CreateDB(t)
}

// ---- the shared server ----

type sharedServer struct {
	once sync.Once
	s    *Server
	err  error
	done atomic.Bool
}

var (
	shared   sharedServer
	sharedMu sync.Mutex
	stopping bool
)

// get returns the shared server, starting it if start and it was not
// started yet.
func (ss *sharedServer) get(start bool) (*Server, error) {
	if !start && !ss.done.Load() {
		return nil, nil
	}
	ss.once.Do(func() {
		defer ss.done.Store(true)
		sharedMu.Lock()
		stop := stopping
		sharedMu.Unlock()
		if stop {
			ss.err = fmt.Errorf("pgtest is stopping")
			return
		}
		ss.s, ss.err = newServer("shared")
	})
	return ss.s, ss.err
}

// ---- binaries and users ----

type bins struct{ initdb, postgres string }

var binaries = sync.OnceValues(func() (bins, error) {
	var dirs []string
	if p, err := exec.LookPath("initdb"); err == nil {
		dirs = append(dirs, filepath.Dir(p))
	}
	// Debian keeps the server binaries off PATH, one directory per major
	// version; prefer the newest.
	versioned, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	slices.SortFunc(versioned, func(a, b string) int { return majorOf(b) - majorOf(a) })
	dirs = append(dirs, versioned...)
	for _, d := range dirs {
		b := bins{initdb: filepath.Join(d, "initdb"), postgres: filepath.Join(d, "postgres")}
		if executable(b.initdb) && executable(b.postgres) {
			return b, nil
		}
	}
	return bins{}, fmt.Errorf("initdb and postgres not found on PATH or in /usr/lib/postgresql/*/bin")
})

func majorOf(binDir string) int {
	v, _ := strconv.ParseFloat(filepath.Base(filepath.Dir(binDir)), 64)
	return int(v * 10)
}

func executable(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0
}

// childEnv is the environment of PostgreSQL processes: ours without PG*
// variables, which would redirect initdb or postgres (PGDATA, PGPORT).
func childEnv() []string {
	return slices.DeleteFunc(os.Environ(), func(kv string) bool { return strings.HasPrefix(kv, "PG") })
}

var dbCounter atomic.Uint64

// dbName returns a database name unique within the binary and random
// across binaries, valid unquoted: t<n>_<hex>.
func dbName() string {
	return "t" + strconv.FormatUint(dbCounter.Add(1), 36) + "_" + fmt.Sprintf("%06x", rand.Uint32()&0xffffff)
}

// ctxTimeout is a context for one harness operation.
func ctxTimeout(d time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), d)
}
