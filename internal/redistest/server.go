package redistest

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/layercache/layercache/internal/testproc"
)

// ---- redis-server processes, shared and dedicated ----

type bins struct{ server, cli string }

var binaries = sync.OnceValues(func() (bins, error) {
	var b bins
	var missing []string
	var err error
	if b.server, err = exec.LookPath("redis-server"); err != nil {
		missing = append(missing, "redis-server")
	}
	if b.cli, err = exec.LookPath("redis-cli"); err != nil {
		missing = append(missing, "redis-cli")
	}
	if len(missing) > 0 {
		return b, fmt.Errorf("%s not found on PATH", strings.Join(missing, " and "))
	}
	return b, nil
})

// requireBinaries skips t (or fails it, see [RequireEnv]) when the
// binaries are missing.
func requireBinaries(t testing.TB) {
	t.Helper()
	if _, err := binaries(); err != nil {
		if os.Getenv(RequireEnv) == "1" {
			t.Fatal(unavailableMsg(err, true))
		}
		t.Skip(unavailableMsg(err, false))
	}
}

// proc is one running redis-server process.
type proc struct {
	addr    string
	dir     string
	cmd     *exec.Cmd
	done    chan struct{} // closed once the process has exited
	waitErr error         // valid after done is closed
}

var (
	mu       sync.Mutex
	stopping bool
	baseDir  string
	procs    []*proc // every process started and not yet stopped, for StopAll
)

// sharedDir makes a directory for a shared server under the base
// directory that StopAll removes.
func sharedDir(name string, port int) (string, error) {
	mu.Lock()
	defer mu.Unlock()
	if baseDir == "" {
		var err error
		if baseDir, err = os.MkdirTemp("", "layercache-redistest-"); err != nil {
			return "", err
		}
	}
	dir := filepath.Join(baseDir, fmt.Sprintf("%s-%d", name, port))
	return dir, os.MkdirAll(dir, 0o700)
}

// serverArgs are the arguments every redis-server of this package gets,
// followed by extra (later arguments override earlier ones).
func serverArgs(port int, dir string, extra []string) []string {
	args := []string{
		"--port", strconv.Itoa(port),
		"--bind", "127.0.0.1",
		"--save", "",
		"--appendonly", "no",
		"--dir", dir,
		"--logfile", filepath.Join(dir, "log"),
		// DEBUG SLEEP and friends, from loopback connections (which all
		// connections are: servers bind 127.0.0.1 only).
		"--enable-debug-command", "local",
	}
	return append(args, extra...)
}

// spawn starts a redis-server on port with dir as its directory and waits
// until it answers PING. On failure nothing is left running and the
// error carries the tail of the server's log.
func spawn(port int, dir string, extra []string) (*proc, error) {
	b, err := binaries()
	if err != nil {
		return nil, err
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	cmd := exec.Command(b.server, serverArgs(port, dir, extra)...)
	cmd.Dir = dir
	// Errors before the log file is opened (bad arguments) go to stderr.
	stderr, err := os.Create(filepath.Join(dir, "stderr"))
	if err != nil {
		return nil, err
	}
	cmd.Stdout, cmd.Stderr = stderr, stderr

	mu.Lock()
	if stopping {
		mu.Unlock()
		_ = stderr.Close()
		return nil, errors.New("redistest is stopping")
	}
	err = testproc.Start(cmd)
	_ = stderr.Close()
	if err != nil {
		mu.Unlock()
		return nil, fmt.Errorf("start redis-server: %w", err)
	}
	p := &proc{addr: addr, dir: dir, cmd: cmd, done: make(chan struct{})}
	procs = append(procs, p)
	mu.Unlock()

	go func() { p.waitErr = cmd.Wait(); close(p.done) }()
	if err := p.waitPing(); err != nil {
		tail := logTail(dir, addr)
		stopProcs([]*proc{p}, true)
		return nil, fmt.Errorf("redis-server on %s: %w\n%s", addr, err, tail)
	}
	return p, nil
}

func (p *proc) waitPing() error {
	deadline := time.Now().Add(pingTimeout)
	var lastErr error
	for {
		select {
		case <-p.done:
			return fmt.Errorf("exited during startup: %v", p.waitErr)
		default:
		}
		if lastErr = ping(p.addr); lastErr == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no PONG within %v: %v", pingTimeout, lastErr)
		}
		time.Sleep(pingInterval)
	}
}

func ping(addr string) error {
	conn, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
	if err != nil {
		return err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(500 * time.Millisecond))
	if _, err := conn.Write([]byte("PING\r\n")); err != nil {
		return err
	}
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		return err
	}
	if !strings.HasPrefix(line, "+PONG") {
		return fmt.Errorf("PING answered %q", strings.TrimSpace(line))
	}
	return nil
}

// logTail returns the last lines of a server's stderr and log file.
func logTail(dir, addr string) string {
	var sb strings.Builder
	for _, f := range []string{"stderr", "log"} {
		data, err := os.ReadFile(filepath.Join(dir, f))
		if err != nil || len(data) == 0 {
			continue
		}
		lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
		if len(lines) > 25 {
			lines = lines[len(lines)-25:]
		}
		fmt.Fprintf(&sb, "--- %s (%s) ---\n%s\n", f, addr, strings.Join(lines, "\n"))
	}
	return sb.String()
}

// stopProcs stops every process in list and waits for them. With
// graceful, it sends SIGTERM first (redis-server then writes its AOF or
// RDB as configured) and SIGKILL to those still running after stopGrace;
// otherwise it sends SIGKILL at once, as a crash would.
func stopProcs(list []*proc, graceful bool) {
	mu.Lock()
	procs = slices.DeleteFunc(procs, func(p *proc) bool { return slices.Contains(list, p) })
	mu.Unlock()
	if !graceful {
		for _, p := range list {
			testproc.Kill(p.cmd)
		}
		for _, p := range list {
			<-p.done
		}
		return
	}
	for _, p := range list {
		testproc.Terminate(p.cmd)
	}
	timer := time.NewTimer(stopGrace)
	defer timer.Stop()
	for _, p := range list {
		select {
		case <-p.done:
		case <-timer.C:
			// Grace period over: kill this and every later process.
			for _, p2 := range list {
				select {
				case <-p2.done:
				default:
					testproc.Kill(p2.cmd)
				}
			}
			<-p.done
		}
	}
	for _, p := range list {
		<-p.done
	}
}

// StopAll stops every Redis server this package started and removes the
// shared servers' directories; later starts fail. [Main] calls it after
// the tests; a TestMain that tears down other harnesses too (pgtest)
// calls it instead of Main.
func StopAll() {
	mu.Lock()
	stopping = true
	list := slices.Clone(procs)
	dir := baseDir
	mu.Unlock()
	stopProcs(list, true)
	if dir != "" {
		_ = os.RemoveAll(dir)
	}
}

// startShared starts a shared server (one [Main] stops) on a fresh port.
// With bus, the cluster bus port (port+10000) is reserved too.
func startShared(name string, bus bool, extra []string) (*proc, error) {
	var offsets []int
	if bus {
		offsets = []int{busDiff}
	}
	var err error
	for range 3 { // a process that does not reserve ports may take ours
		var port *testproc.Port
		if port, err = testproc.ReservePort(portMin, portMax, offsets...); err != nil {
			return nil, err
		}
		// The reservation is kept until the test binary exits: the kernel
		// drops it then, and nothing here reuses the port before.
		var dir string
		if dir, err = sharedDir(name, port.Num); err != nil {
			return nil, err
		}
		var p *proc
		if p, err = spawn(port.Num, dir, extra); err == nil {
			return p, nil
		}
		port.Release()
		_ = os.RemoveAll(dir)
	}
	return nil, fmt.Errorf("%s: %w", name, err)
}

// ---- dedicated servers ----

// Server is a redis-server that one test owns: unlike the shared targets,
// the test may kill it, stop it and start it again, on the same port and
// data directory, so that clients see Redis go down and come back.
//
// It is started by [StartServer] and stopped for good by t.Cleanup. Its
// methods are safe for concurrent use; those that fail the test must be
// called from the test's goroutine.
type Server struct {
	t    testing.TB
	name string
	port *testproc.Port
	addr string
	dir  string
	args []string

	mu sync.Mutex
	p  *proc // nil while down
}

// ServerOption configures a [Server] started by [StartServer].
type ServerOption func(*serverConfig)

type serverConfig struct{ args []string }

// ServerArgs adds redis-server command-line arguments, e.g.
// ServerArgs("--maxmemory", "10mb"). They come after the harness's own
// and so override them, except --port, --bind and --dir, which the
// harness needs.
func ServerArgs(args ...string) ServerOption {
	return func(c *serverConfig) { c.args = append(c.args, args...) }
}

// Persistent makes the server keep its data across [Server.Kill] and
// [Server.Restart]: an append-only file fsynced on every write, so every
// acknowledged write survives even SIGKILL. Without it, a killed or
// stopped server comes back empty, like a cache Redis without
// persistence.
func Persistent() ServerOption {
	return ServerArgs("--appendonly", "yes", "--appendfsync", "always")
}

// StartServer starts a dedicated redis-server for t on a free loopback
// port, with DEBUG enabled for loopback clients. It skips t (or fails it,
// see [RequireEnv]) when the binaries are missing and fails t when the
// server cannot be started. t.Cleanup stops it and removes its data; when
// t failed, the end of the server's log is logged first.
func StartServer(t testing.TB, opts ...ServerOption) *Server {
	t.Helper()
	requireBinaries(t)
	var cfg serverConfig
	for _, o := range opts {
		o(&cfg)
	}
	return startDedicated(t, "server", false, cfg.args)
}

// startDedicated starts a Server for t; bus reserves the cluster bus port.
func startDedicated(t testing.TB, name string, bus bool, extra []string) *Server {
	t.Helper()
	var offsets []int
	if bus {
		offsets = []int{busDiff}
	}
	var err error
	for range 3 { // a process that does not reserve ports may take ours
		var port *testproc.Port
		if port, err = testproc.ReservePort(portMin, portMax, offsets...); err != nil {
			break
		}
		// t.TempDir's removal was registered before the Cleanup below, so
		// it runs after the server is stopped.
		dir := filepath.Join(t.TempDir(), fmt.Sprintf("%s-%d", name, port.Num))
		if err = os.Mkdir(dir, 0o700); err != nil {
			port.Release()
			break
		}
		s := &Server{t: t, name: name, port: port, addr: port.String(), dir: dir, args: extra}
		if s.p, err = spawn(port.Num, dir, extra); err != nil {
			port.Release()
			continue
		}
		t.Cleanup(s.cleanup)
		return s
	}
	t.Fatalf("redistest: start dedicated %s: %v", name, err)
	return nil
}

func (s *Server) cleanup() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.t.Failed() {
		s.t.Logf("redistest: dedicated %s %s:\n%s", s.name, s.addr, logTail(s.dir, s.addr))
	}
	if s.p != nil {
		stopProcs([]*proc{s.p}, true)
		s.p = nil
	}
	s.port.Release()
}

// Addr returns the server's host:port on 127.0.0.1. It stays the same
// across restarts.
func (s *Server) Addr() string { return s.addr }

// Target returns a target for the server, named "dedicated", for
// [Target.NewClient] and the helpers that take a target.
func (s *Server) Target() *Target {
	return &Target{Name: "dedicated", Addrs: []string{s.addr}, Real: true}
}

// Kill SIGKILLs the server and waits until it is gone: its connections
// are reset and new ones are refused, as when Redis crashes. Data not
// persisted (see [Persistent]) is lost. It does nothing when the server
// is down.
func (s *Server) Kill() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.p != nil {
		stopProcs([]*proc{s.p}, false)
		s.p = nil
	}
}

// Stop shuts the server down gracefully (SIGTERM: it closes its
// connections and, if configured, writes its data) and waits until it
// is gone. It does nothing when the server is down.
func (s *Server) Stop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.p != nil {
		stopProcs([]*proc{s.p}, true)
		s.p = nil
	}
}

// Restart starts the server again, on the same port and data directory
// and with the same arguments, stopping it gracefully first if it is
// running, and waits until it answers PING. It fails the test if the
// server cannot be started.
func (s *Server) Restart() {
	s.t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.p != nil {
		stopProcs([]*proc{s.p}, true)
		s.p = nil
	}
	p, err := spawn(s.port.Num, s.dir, s.args)
	if err != nil {
		s.t.Fatalf("redistest: restart %s %s: %v", s.name, s.addr, err)
	}
	s.p = p
}

// Running reports whether the server process is up (started and not
// killed or stopped since).
func (s *Server) Running() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.p != nil
}
