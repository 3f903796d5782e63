package pgtest

import (
	"context"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

func TestMain(m *testing.M) { Main(m) }

// one returns the single value of a one-row, one-column query.
func one(t *testing.T, s *Server, db, sql string) string {
	t.Helper()
	rows, err := s.Query(context.Background(), db, sql)
	if err != nil {
		t.Fatal(err)
	}
	if len(rows) != 1 || len(rows[0]) != 1 {
		t.Fatalf("%s: %d rows %v, want one value", sql, len(rows), rows)
	}
	return rows[0][0]
}

// sibling returns the client program name next to the server binaries,
// or on PATH, or skips t.
func sibling(t *testing.T, name string) string {
	t.Helper()
	b, err := binaries()
	if err != nil {
		t.Fatal(err)
	}
	if p := filepath.Join(filepath.Dir(b.initdb), name); executable(p) {
		return p
	}
	p, err := exec.LookPath(name)
	if err != nil {
		t.Skipf("%s not found", name)
	}
	return p
}

// runPsql runs sql with psql on dsn, to check that DSNs work with libpq,
// whose URL syntax pgx follows.
func runPsql(t *testing.T, dsn, sql string) string {
	t.Helper()
	cmd := exec.Command(sibling(t, "psql"), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql, dsn)
	cmd.Env = childEnv()
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("psql %q -c %q: %v\n%s", dsn, sql, err, out)
	}
	return strings.TrimSpace(string(out))
}

func TestStart(t *testing.T) {
	db := Start(t)
	if !regexp.MustCompile(`^postgres://postgres@127\.0\.0\.1:\d+/t[0-9a-z]+_[0-9a-f]{6}\?sslmode=disable$`).MatchString(db.DSN) {
		t.Fatalf("DSN %q", db.DSN)
	}
	if !strings.Contains(db.DSN, "/"+db.Name+"?") || db.Server == nil {
		t.Fatalf("DB %+v", db)
	}
	s := db.Server
	if got := one(t, s, db.Name, "SELECT current_database()"); got != db.Name {
		t.Fatalf("current_database() = %q", got)
	}
	for setting, ok := range map[string]func(string) bool{
		"wal_level":             func(v string) bool { return v == "logical" },
		"max_replication_slots": func(v string) bool { n, _ := strconv.Atoi(v); return n >= 10 },
		"max_wal_senders":       func(v string) bool { n, _ := strconv.Atoi(v); return n >= 10 },
		"fsync":                 func(v string) bool { return v == "off" },
		"listen_addresses":      func(v string) bool { return v == "127.0.0.1" },
		"unix_socket_directories": func(v string) bool {
			return v == s.sockDir() && strings.HasPrefix(v, os.TempDir())
		},
	} {
		if v := one(t, s, db.Name, "SHOW "+setting); !ok(v) {
			t.Errorf("%s = %q", setting, v)
		}
	}

	// The DSN works with libpq (psql), for plain and logical replication
	// connections.
	if got := runPsql(t, db.DSN, "SELECT current_database()"); got != db.Name {
		t.Fatalf("psql current_database() = %q", got)
	}
	if got := runPsql(t, db.DSN+"&replication=database", "IDENTIFY_SYSTEM"); !strings.Contains(got, "|"+db.Name) {
		t.Fatalf("IDENTIFY_SYSTEM on a replication connection = %q", got)
	}
}

// TestLogicalReplicationSlots creates a pgoutput slot and reads a change
// from it: what a change-stream source does.
func TestLogicalReplicationSlots(t *testing.T) {
	ctx := context.Background()
	db := Start(t)
	s := db.Server
	// A slot cannot be created in a transaction that wrote, as the
	// statements of one simple query would be: two calls.
	if err := s.Exec(ctx, db.Name, "CREATE TABLE item (id int PRIMARY KEY, name text)"); err != nil {
		t.Fatal(err)
	}
	if err := s.Exec(ctx, db.Name, "SELECT pg_create_logical_replication_slot('slot_"+db.Name+"', 'test_decoding')"); err != nil {
		t.Fatal(err)
	}
	if err := s.Exec(ctx, db.Name, "INSERT INTO item VALUES (1, 'one')"); err != nil {
		t.Fatal(err)
	}
	rows, err := s.Query(ctx, db.Name, "SELECT data FROM pg_logical_slot_get_changes('slot_"+db.Name+"', NULL, NULL)")
	if err != nil {
		t.Fatal(err)
	}
	var changes []string
	for _, r := range rows {
		changes = append(changes, r[0])
	}
	if !strings.Contains(strings.Join(changes, "\n"), "table public.item: INSERT: id[integer]:1 name[text]:'one'") {
		t.Fatalf("changes: %q", changes)
	}
}

// TestDatabasesIsolatedAndDropped: every Start gets its own database,
// which is dropped with its replication slots (even an active one) when
// its test ends.
func TestDatabasesIsolatedAndDropped(t *testing.T) {
	ctx := context.Background()
	var name string
	var srv *Server
	t.Run("user", func(t *testing.T) {
		// Registered before Start's, so it runs after the database is
		// dropped: the drop must end the WAL sender, and with it the
		// client.
		var recv *exec.Cmd
		recvDone := make(chan struct{})
		t.Cleanup(func() {
			if recv == nil {
				return
			}
			select {
			case <-recvDone:
			case <-time.After(10 * time.Second):
				_ = recv.Process.Kill()
				<-recvDone
				t.Error("dropping the database left its WAL sender running")
			}
		})
		a, b := Start(t), Start(t)
		if a.Name == b.Name || a.Server != b.Server {
			t.Fatalf("databases %q and %q on servers %p and %p", a.Name, b.Name, a.Server, b.Server)
		}
		name, srv = a.Name, a.Server
		if err := srv.Exec(ctx, a.Name, "SELECT pg_create_logical_replication_slot('slot_"+a.Name+"', 'test_decoding')"); err != nil {
			t.Fatal(err)
		}
		// A WAL sender holds the slot when the test ends, as a change
		// stream that was not closed would.
		recv = exec.Command(sibling(t, "pg_recvlogical"), "-d", a.DSN, "--slot", "slot_"+a.Name,
			"--start", "--no-loop", "-f", os.DevNull)
		recv.Env = childEnv()
		if err := recv.Start(); err != nil {
			t.Fatal(err)
		}
		go func() { _ = recv.Wait(); close(recvDone) }()
		waitFor(t, "the slot to be active", func() bool {
			rows, err := srv.Query(ctx, "postgres", "SELECT active FROM pg_replication_slots WHERE slot_name = 'slot_"+a.Name+"'")
			return err == nil && len(rows) == 1 && rows[0][0] == "t"
		})
	})
	if got := one(t, srv, "postgres", "SELECT count(*) FROM pg_database WHERE datname = '"+name+"'"); got != "0" {
		t.Fatalf("database %s still exists", name)
	}
	if got := one(t, srv, "postgres", "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'slot_"+name+"'"); got != "0" {
		t.Fatalf("slot of %s still exists", name)
	}
}

func TestExecError(t *testing.T) {
	db := Start(t)
	err := db.Server.Exec(context.Background(), db.Name, "SELECT 1; SELECT * FROM no_such_table; SELECT 2")
	var pe *pgError
	if !errors.As(err, &pe) || pe.Code != "42P01" || !strings.Contains(pe.Message, "no_such_table") {
		t.Fatalf("Exec of a bad query: %v", err)
	}
	if err := db.Server.Exec(context.Background(), "no_such_db", "SELECT 1"); !errors.As(err, &pe) || pe.Code != "3D000" {
		t.Fatalf("Exec on a missing database: %v", err)
	}
}

func TestDedicatedStopKillRestart(t *testing.T) {
	ctx := context.Background()
	srv := StartDedicated(t)
	if shared, err := shared.get(false); err == nil && shared == srv {
		t.Fatal("StartDedicated returned the shared server")
	}
	db := srv.CreateDB(t)
	if err := srv.Exec(ctx, db.Name, "CREATE TABLE t (v int); INSERT INTO t VALUES (1)"); err != nil {
		t.Fatal(err)
	}
	addr := srv.Addr()

	srv.Kill()
	if srv.Running() {
		t.Fatal("Running after Kill")
	}
	if _, err := net.DialTimeout("tcp", addr, time.Second); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("dial a killed server: %v, want connection refused", err)
	}
	srv.Kill() // no-op when down
	srv.Restart()
	if !srv.Running() || srv.Addr() != addr {
		t.Fatalf("after Restart: running %v on %s, want %s", srv.Running(), srv.Addr(), addr)
	}
	// A committed row survives SIGKILL (crash recovery replays the WAL).
	if got := one(t, srv, db.Name, "SELECT sum(v) FROM t"); got != "1" {
		t.Fatalf("after Kill and Restart: sum = %q, want 1", got)
	}

	if err := srv.Exec(ctx, db.Name, "INSERT INTO t VALUES (2)"); err != nil {
		t.Fatal(err)
	}
	srv.Stop()
	if err := srv.Exec(ctx, db.Name, "SELECT 1"); err == nil {
		t.Fatal("a stopped server answered")
	}
	srv.Restart()
	srv.Restart() // of a running server
	if got := one(t, srv, db.Name, "SELECT sum(v) FROM t"); got != "3" {
		t.Fatalf("after Stop and Restart: sum = %q, want 3", got)
	}
}

func TestSharedServerCannotBeStopped(t *testing.T) {
	db := Start(t)
	for name, op := range map[string]func(){"Stop": db.Server.Stop, "Kill": db.Server.Kill, "Restart": db.Server.Restart} {
		func() {
			defer func() {
				if r := recover(); r == nil || !strings.Contains(r.(string), "shared server") {
					t.Errorf("%s of the shared server: recovered %v", name, r)
				}
			}()
			op()
		}()
	}
	if !db.Server.Running() {
		t.Fatal("the shared server went down")
	}
}

// TestRequire runs Require with the binaries missing, with and without
// RequireEnv.
func TestRequire(t *testing.T) {
	saved := binaries
	binaries = func() (bins, error) { return bins{}, errors.New("no initdb here") }
	defer func() { binaries = saved }()

	for _, required := range []string{"", "1"} {
		t.Setenv(RequireEnv, required)
		f := &fakeT{}
		var wg sync.WaitGroup
		wg.Add(1)
		go func() { defer wg.Done(); Require(f) }()
		wg.Wait()
		if required == "1" && (!f.failed || f.skipped) || required == "" && (!f.skipped || f.failed) {
			t.Errorf("%s=%q: failed %v, skipped %v", RequireEnv, required, f.failed, f.skipped)
		}
		if !strings.Contains(f.msg, "no initdb here") {
			t.Errorf("message %q", f.msg)
		}
	}
}

type fakeT struct {
	testing.TB
	failed, skipped bool
	msg             string
}

func (f *fakeT) Helper()               {}
func (f *fakeT) Fatal(args ...any)     { f.failed, f.msg = true, args[0].(string); runtime.Goexit() }
func (f *fakeT) Skip(args ...any)      { f.skipped, f.msg = true, args[0].(string); runtime.Goexit() }
func (f *fakeT) Fatalf(string, ...any) { panic("unexpected Fatalf") }

// waitFor polls cond for up to 10s. (redistest.Eventually is not used so
// that pgtest does not depend on the Redis harness.)
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
