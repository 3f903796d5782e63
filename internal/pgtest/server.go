package pgtest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/layercache/layercache/internal/testproc"
)

// Server is a running PostgreSQL server (a postmaster and its backends)
// with its own data directory and port on 127.0.0.1.
//
// The shared server behind [Start] cannot be stopped by tests (Stop, Kill
// and Restart panic on it); a server
// from [StartDedicated] belongs to one test, which may [Server.Stop],
// [Server.Kill] and [Server.Restart] it to see the database go down and
// come back on the same address with the same data. Methods are safe for
// concurrent use; those that fail the test must be called from the
// test's goroutine.
type Server struct {
	t    testing.TB // the owner of a dedicated server; nil for the shared one
	name string
	base string // holds data/, sock/ and log
	port *testproc.Port
	addr string
	cred *credential // nil: run as ourselves

	mu   sync.Mutex
	proc *pgProc // nil while down
}

// pgProc is one run of the postmaster.
type pgProc struct {
	cmd     *exec.Cmd
	done    chan struct{} // closed once it has exited
	waitErr error         // valid after done is closed
}

// StartDedicated starts a PostgreSQL server that t owns (its own initdb,
// about a second) and stops it and removes its data when t ends. It
// skips t (or fails it, see [RequireEnv]) when the binaries are missing
// and fails t when the server cannot be started.
func StartDedicated(t testing.TB) *Server {
	t.Helper()
	Require(t)
	s, err := newServer("dedicated")
	if err != nil {
		t.Fatalf("pgtest: %v", err)
	}
	s.t = t
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("pgtest: dedicated server %s log:\n%s", s.addr, s.logTail())
		}
		s.shutdown()
	})
	return s
}

// newServer runs initdb into a new temporary directory and starts the
// server on a reserved port.
func newServer(name string) (*Server, error) {
	b, err := binaries()
	if err != nil {
		return nil, err
	}
	cred, err := runAs()
	if err != nil {
		return nil, err
	}
	// Not t.TempDir: as root, the server runs as postgres, which must be
	// able to reach the directory, and t.TempDir's parent is root's alone.
	base, err := os.MkdirTemp("", "layercache-pgtest-")
	if err != nil {
		return nil, err
	}
	s := &Server{name: name, base: base, cred: cred}
	fail := func(err error) (*Server, error) {
		s.shutdown()
		return nil, fmt.Errorf("%s server: %w", name, err)
	}
	if err := os.Mkdir(s.sockDir(), 0o700); err != nil {
		return fail(err)
	}
	for _, d := range []string{base, s.sockDir()} {
		if err := chownTo(d, cred); err != nil {
			return fail(err)
		}
	}
	initdb := exec.Command(b.initdb,
		"-D", s.dataDir(), "-U", Superuser, "--auth=trust", "-E", "UTF8", "--locale=C",
		"--no-sync", "--no-instructions")
	initdb.Env = childEnv()
	runWith(initdb, cred)
	var out bytes.Buffer
	initdb.Stdout, initdb.Stderr = &out, &out
	if err := testproc.Start(initdb); err != nil {
		return fail(fmt.Errorf("initdb: %w", err))
	}
	if err := initdb.Wait(); err != nil {
		return fail(fmt.Errorf("initdb: %w\n%s", err, out.String()))
	}

	for range 3 { // a process that does not reserve ports may take ours
		if s.port, err = testproc.ReservePort(portMin, portMax); err != nil {
			return fail(err)
		}
		s.addr = s.port.String()
		if err = s.start(); err == nil {
			return s, nil
		}
		s.port.Release()
		s.port = nil
	}
	return fail(err)
}

func (s *Server) dataDir() string { return filepath.Join(s.base, "data") }
func (s *Server) sockDir() string { return filepath.Join(s.base, "sock") }
func (s *Server) logPath() string { return filepath.Join(s.base, "log") }

// start starts the postmaster and waits until it accepts connections.
// s.mu must be held or s not yet shared.
func (s *Server) start() error {
	// After a Kill, the killed postmaster's backends may still be on their
	// way out, attached to its shared memory, and postgres refuses to
	// start over it ("pre-existing shared memory block is still in use")
	// until they are gone: try again for a while.
	var err error
	for range 50 {
		if err = s.startOnce(); err == nil || !strings.Contains(err.Error(), "pre-existing shared memory block") {
			return err
		}
		time.Sleep(100 * time.Millisecond)
	}
	return err
}

func (s *Server) startOnce() error {
	b, err := binaries()
	if err != nil {
		return err
	}
	cmd := exec.Command(b.postgres,
		"-D", s.dataDir(),
		"-p", strconv.Itoa(s.port.Num),
		"-c", "listen_addresses=127.0.0.1",
		// A socket directory of its own: no socket in /var/run or /tmp
		// shared with other servers.
		"-c", "unix_socket_directories="+s.sockDir(),
		"-c", "wal_level=logical",
		"-c", "max_replication_slots=32",
		"-c", "max_wal_senders=32",
		// Speed over durability: tests never survive a machine crash.
		// synchronous_commit stays on, so a commit is at least written
		// to the OS and survives Kill, which only the process dies of.
		"-c", "fsync=off",
		"-c", "full_page_writes=off",
		"-c", "shared_buffers=32MB",
		"-c", "logging_collector=off",
	)
	cmd.Env = childEnv()
	runWith(cmd, s.cred)
	// The log is appended to across restarts; written by this process,
	// so no permission question for the postgres user.
	logf, err := os.OpenFile(s.logPath(), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	err = testproc.Start(cmd)
	_ = logf.Close()
	if err != nil {
		return fmt.Errorf("start postgres: %w", err)
	}
	p := &pgProc{cmd: cmd, done: make(chan struct{})}
	go func() { p.waitErr = cmd.Wait(); close(p.done) }()

	ctx, cancel := ctxTimeout(startTimeout)
	defer cancel()
	var lastErr error
	for {
		select {
		case <-p.done:
			return fmt.Errorf("postgres on %s exited during startup: %v\n%s", s.addr, p.waitErr, s.logTail())
		default:
		}
		pctx, pcancel := context.WithTimeout(ctx, time.Second)
		w, err := dialWire(pctx, s.addr, Superuser, "postgres")
		pcancel()
		if err == nil {
			w.close()
			s.proc = p
			return nil
		}
		lastErr = err
		select {
		case <-ctx.Done():
			stopProc(p, false)
			return fmt.Errorf("postgres on %s not ready within %v: %v\n%s", s.addr, startTimeout, lastErr, s.logTail())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// stopProc stops p and waits for it: gracefully with a fast shutdown
// (SIGINT: clients are disconnected, then a checkpoint), SIGKILL to the
// whole group after stopGrace; or at once with SIGKILL, as a crash.
func stopProc(p *pgProc, graceful bool) {
	if graceful {
		testproc.Interrupt(p.cmd)
		select {
		case <-p.done:
			return
		case <-time.After(stopGrace):
		}
	}
	testproc.Kill(p.cmd)
	<-p.done
}

// shutdown stops the server for good and removes its directory.
func (s *Server) shutdown() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.proc != nil {
		stopProc(s.proc, true)
		s.proc = nil
	}
	if s.port != nil {
		s.port.Release()
		s.port = nil
	}
	_ = os.RemoveAll(s.base)
}

// logTail returns the last lines of the server's log.
func (s *Server) logTail() string {
	data, err := os.ReadFile(s.logPath())
	if err != nil {
		return ""
	}
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > 30 {
		lines = lines[len(lines)-30:]
	}
	return strings.Join(lines, "\n")
}

// Addr returns the server's host:port on 127.0.0.1. It stays the same
// across restarts.
func (s *Server) Addr() string { return s.addr }

// DSN returns a URL that connects to database db as the superuser, with
// TLS off: postgres://postgres@127.0.0.1:port/db?sslmode=disable.
func (s *Server) DSN(db string) string {
	return "postgres://" + Superuser + "@" + s.addr + "/" + db + "?sslmode=disable"
}

// CreateDB creates a database with a fresh name on s and returns it. When
// t ends, its connections are closed and it is dropped with its
// replication slots (which would otherwise hold WAL and use up
// max_replication_slots on the shared server); on a server that is down
// then, nothing is done. It fails t on error.
func (s *Server) CreateDB(t testing.TB) *DB {
	t.Helper()
	name := dbName()
	if err := s.Exec(context.Background(), "postgres", "CREATE DATABASE "+name); err != nil {
		t.Fatalf("pgtest: create database: %v", err)
	}
	t.Cleanup(func() {
		if !s.Running() {
			return
		}
		if err := s.dropDB(name); err != nil {
			t.Errorf("pgtest: drop database %s: %v", name, err)
		}
	})
	return &DB{Name: name, DSN: s.DSN(name), Server: s}
}

// dropDB drops a database and every replication slot of it. Slots must
// go first (a database with slots cannot be dropped), and a slot in use
// cannot be dropped, so the database's backends, WAL senders included,
// are terminated before.
func (s *Server) dropDB(name string) error {
	ctx, cancel := ctxTimeout(30 * time.Second)
	defer cancel()
	lit := "'" + name + "'" // names from dbName need no escaping
	if err := s.Exec(ctx, "postgres", "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = "+lit+
		" AND pid <> pg_backend_pid()"); err != nil {
		return err
	}
	// A terminated WAL sender releases its slot as it exits, shortly
	// after pg_terminate_backend returns: retry while the slot is busy.
	var err error
	for range 100 {
		err = s.Exec(ctx, "postgres", "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = "+lit)
		var pe *pgError
		if err == nil || !errors.As(err, &pe) || pe.Code != "55006" { // object_in_use
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		return err
	}
	return s.Exec(ctx, "postgres", "DROP DATABASE "+name+" WITH (FORCE)")
}

// Exec runs sql in database db as the superuser on a connection of its
// own, discarding any rows, and returns the first error. Several
// statements separated by semicolons run in one implicit transaction (as
// a simple query does), so statements that refuse a transaction that
// wrote, such as pg_create_logical_replication_slot, need a call of
// their own. It needs no driver, for tests' setup and faults, e.g.
// cutting a replication connection:
//
//	srv.Exec(ctx, db.Name, "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots")
func (s *Server) Exec(ctx context.Context, db, sql string) error {
	_, err := s.Query(ctx, db, sql)
	return err
}

// Query is like [Server.Exec] but returns the rows of the last statement
// that returned rows, every value as text (NULL as "").
func (s *Server) Query(ctx context.Context, db, sql string) ([][]string, error) {
	w, err := dialWire(ctx, s.addr, Superuser, db)
	if err != nil {
		return nil, fmt.Errorf("pgtest: connect to %s on %s: %w", db, s.addr, err)
	}
	defer w.close()
	rows, err := w.query(sql)
	if err != nil {
		return nil, fmt.Errorf("pgtest: %s: %w", sql, err)
	}
	return rows, nil
}

// Running reports whether the server is up (started and not stopped or
// killed since).
func (s *Server) Running() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.proc != nil
}

// Stop shuts the server down (a fast shutdown: clients are disconnected,
// committed data is kept) and waits until it is gone; connections are
// refused from then on. It does nothing when the server is down.
func (s *Server) Stop() {
	s.mustOwn("Stop")
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.proc != nil {
		stopProc(s.proc, true)
		s.proc = nil
	}
}

// Kill SIGKILLs the postmaster and its backends, as a crash would, and
// waits until they are gone. Committed data survives (the next start
// replays the WAL), since the machine itself did not crash. It does
// nothing when the server is down.
func (s *Server) Kill() {
	s.mustOwn("Kill")
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.proc != nil {
		stopProc(s.proc, false)
		s.proc = nil
	}
}

// Restart starts the server again on the same port and data directory,
// stopping it first if it is running, and waits until it accepts
// connections. It fails the test if the server does not come up.
func (s *Server) Restart() {
	s.mustOwn("Restart")
	s.t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.proc != nil {
		stopProc(s.proc, true)
		s.proc = nil
	}
	if err := s.start(); err != nil {
		s.t.Fatalf("pgtest: restart %s server: %v", s.name, err)
	}
}

// mustOwn panics when a test tries to take the shared server down, which
// would fail every other test of the binary.
func (s *Server) mustOwn(op string) {
	if s.t == nil {
		panic("pgtest: " + op + " of the shared server; use StartDedicated for a server a test may take down")
	}
}
