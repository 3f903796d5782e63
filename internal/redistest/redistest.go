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
package redistest

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
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
	// Name is "miniredis", "standalone" or "cluster".
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
	stopAll()
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

// KillClients runs CLIENT KILL TYPE typ (e.g. "normal", "pubsub") on every
// node of tgt and returns the total number of connections closed. The
// connection that issues the command is spared. It fails t on error and
// skips t for miniredis, which has no CLIENT KILL.
//
// On the shared real servers this also closes connections of other tests
// running in parallel in the same binary; fault tests using it should not
// call t.Parallel.
func KillClients(ctx context.Context, t testing.TB, tgt *Target, typ string) int {
	t.Helper()
	if !tgt.Real {
		t.Skipf("redistest: %s does not support CLIENT KILL; this fault test needs a real Redis target", tgt.Name)
	}
	total := 0
	for _, addr := range tgt.Addrs {
		c := redis.NewClient(&redis.Options{Addr: addr, DialTimeout: 2 * time.Second, ReadTimeout: 3 * time.Second})
		n, err := c.Do(ctx, "CLIENT", "KILL", "TYPE", typ).Int()
		_ = c.Close()
		if err != nil {
			t.Fatalf("redistest: CLIENT KILL TYPE %s on %s: %v", typ, addr, err)
		}
		total += n
	}
	return total
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
	if _, err := binaries(); err != nil {
		if os.Getenv(RequireEnv) == "1" {
			t.Fatal(unavailableMsg(err, true))
		}
		t.Skip(unavailableMsg(err, false))
	}
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

type server struct {
	addr    string
	dir     string
	cmd     *exec.Cmd
	done    chan struct{} // closed once the process has exited
	waitErr error         // valid after done is closed
}

var (
	mu        sync.Mutex
	stopping  bool
	baseDir   string
	servers   []*server
	usedPorts = map[int]bool{}
)

// pickPort returns a port P such that P and P+10000 are free on 127.0.0.1
// and not handed out before by this process.
func pickPort() (int, error) {
	for range 500 {
		p := portMin + rand.IntN(portMax-portMin)
		mu.Lock()
		used := usedPorts[p] || usedPorts[p+busDiff]
		if !used {
			usedPorts[p], usedPorts[p+busDiff] = true, true
		}
		mu.Unlock()
		if used {
			continue
		}
		if portFree(p) && portFree(p+busDiff) {
			return p, nil
		}
	}
	return 0, errors.New("no free port pair found")
}

func portFree(p int) bool {
	l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(p)))
	if err != nil {
		return false
	}
	_ = l.Close()
	return true
}

// startServer starts one redis-server on a fresh port and waits until it
// answers PING. extra returns additional arguments given the node's dir.
func startServer(name string, extra func(dir string) []string) (*server, error) {
	b, err := binaries()
	if err != nil {
		return nil, err
	}
	port, err := pickPort()
	if err != nil {
		return nil, err
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))

	mu.Lock()
	if stopping {
		mu.Unlock()
		return nil, errors.New("redistest is stopping")
	}
	if baseDir == "" {
		if baseDir, err = os.MkdirTemp("", "layercache-redistest-"); err != nil {
			mu.Unlock()
			return nil, err
		}
	}
	dir := filepath.Join(baseDir, fmt.Sprintf("%s-%d", name, port))
	if err := os.MkdirAll(dir, 0o700); err != nil {
		mu.Unlock()
		return nil, err
	}
	args := []string{
		"--port", strconv.Itoa(port),
		"--bind", "127.0.0.1",
		"--save", "",
		"--appendonly", "no",
		"--dir", dir,
		"--logfile", filepath.Join(dir, "log"),
		"--enable-debug-command", "local",
	}
	if extra != nil {
		args = append(args, extra(dir)...)
	}
	cmd := exec.Command(b.server, args...)
	cmd.Dir = dir
	// Errors before the log file is opened (bad arguments) go to stderr.
	stderr, err := os.Create(filepath.Join(dir, "stderr"))
	if err != nil {
		mu.Unlock()
		return nil, err
	}
	cmd.Stdout, cmd.Stderr = stderr, stderr
	err = startCmd(cmd)
	_ = stderr.Close()
	if err != nil {
		mu.Unlock()
		return nil, fmt.Errorf("start redis-server: %w", err)
	}
	s := &server{addr: addr, dir: dir, cmd: cmd, done: make(chan struct{})}
	servers = append(servers, s)
	mu.Unlock()

	go func() { s.waitErr = cmd.Wait(); close(s.done) }()
	if err := s.waitPing(); err != nil {
		tail := s.logTail()
		stopServers([]*server{s})
		return nil, fmt.Errorf("%s redis-server on %s: %w\n%s", name, addr, err, tail)
	}
	return s, nil
}

func (s *server) waitPing() error {
	deadline := time.Now().Add(pingTimeout)
	var lastErr error
	for {
		select {
		case <-s.done:
			return fmt.Errorf("exited during startup: %v", s.waitErr)
		default:
		}
		if lastErr = ping(s.addr); lastErr == nil {
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

// logTail returns the last lines of the server's stderr and log file.
func (s *server) logTail() string {
	var sb strings.Builder
	for _, f := range []string{"stderr", "log"} {
		data, err := os.ReadFile(filepath.Join(s.dir, f))
		if err != nil || len(data) == 0 {
			continue
		}
		lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
		if len(lines) > 25 {
			lines = lines[len(lines)-25:]
		}
		fmt.Fprintf(&sb, "--- %s (%s) ---\n%s\n", f, s.addr, strings.Join(lines, "\n"))
	}
	return sb.String()
}

// stopServers sends SIGTERM to every server, SIGKILL to those still
// running after stopGrace, waits for them and removes their directories.
func stopServers(list []*server) {
	mu.Lock()
	servers = slices.DeleteFunc(servers, func(s *server) bool { return slices.Contains(list, s) })
	mu.Unlock()
	for _, s := range list {
		terminate(s.cmd)
	}
	timer := time.NewTimer(stopGrace)
	defer timer.Stop()
	for _, s := range list {
		select {
		case <-s.done:
		case <-timer.C:
			// Grace period over: kill this and every later server.
			for _, s2 := range list {
				select {
				case <-s2.done:
				default:
					forceKill(s2.cmd)
				}
			}
			<-s.done
		}
	}
	for _, s := range list {
		<-s.done
		_ = os.RemoveAll(s.dir)
	}
}

func stopAll() {
	mu.Lock()
	stopping = true
	list := slices.Clone(servers)
	dir := baseDir
	mu.Unlock()
	stopServers(list)
	if dir != "" {
		_ = os.RemoveAll(dir)
	}
}

func startStandalone() (*Target, error) {
	var err error
	for range 3 { // a port may be taken between the check and the bind
		var s *server
		if s, err = startServer("standalone", nil); err == nil {
			return &Target{Name: "standalone", Addrs: []string{s.addr}, Real: true}, nil
		}
	}
	return nil, err
}

// startCluster starts a three-master cluster. The first attempt wires the
// nodes up directly (CLUSTER ADDSLOTSRANGE / SET-CONFIG-EPOCH / MEET),
// which is what redis-cli --cluster create does minus its one-second
// polling sleeps (it takes 1-5s on its own). If that fails, the cluster is
// rebuilt on new ports with redis-cli --cluster create.
func startCluster() (*Target, error) {
	var errs []error
	for _, create := range []func([]string) error{clusterCreateDirect, clusterCreateCLI} {
		tgt, err := tryStartCluster(create)
		if err == nil {
			return tgt, nil
		}
		errs = append(errs, err)
	}
	return nil, fmt.Errorf("start cluster: %w", errors.Join(errs...))
}

func tryStartCluster(create func(addrs []string) error) (*Target, error) {
	const n = 3
	nodes := make([]*server, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			nodes[i], errs[i] = startServer("cluster", func(dir string) []string {
				return []string{
					"--cluster-enabled", "yes",
					"--cluster-config-file", filepath.Join(dir, "nodes.conf"),
					"--cluster-node-timeout", "5000",
				}
			})
		}()
	}
	wg.Wait()
	var started []*server
	for _, s := range nodes {
		if s != nil {
			started = append(started, s)
		}
	}
	fail := func(err error) (*Target, error) {
		var tails strings.Builder
		for _, s := range started {
			tails.WriteString(s.logTail())
		}
		stopServers(started)
		return nil, fmt.Errorf("%w\n%s", err, tails.String())
	}
	if err := errors.Join(errs...); err != nil {
		return fail(err)
	}

	addrs := make([]string, n)
	for i, s := range nodes {
		addrs[i] = s.addr
	}
	if err := create(addrs); err != nil {
		return fail(err)
	}
	if err := waitClusterReady(addrs); err != nil {
		return fail(err)
	}
	return &Target{Name: "cluster", Addrs: addrs, Cluster: true, Real: true}, nil
}

// clusterCreateDirect assigns each node an equal share of the 16384 slots
// and a distinct config epoch, then makes every node meet every other.
func clusterCreateDirect(addrs []string) error {
	ctx, cancel := context.WithTimeout(context.Background(), clusterCreateLimit)
	defer cancel()
	clients := make([]*redis.Client, len(addrs))
	for i, a := range addrs {
		clients[i] = redis.NewClient(&redis.Options{Addr: a, DialTimeout: time.Second, ReadTimeout: 2 * time.Second, WriteTimeout: time.Second})
		defer clients[i].Close()
	}
	const slots = 16384
	for i, c := range clients {
		lo, hi := i*slots/len(addrs), (i+1)*slots/len(addrs)-1
		if err := c.Do(ctx, "CLUSTER", "ADDSLOTSRANGE", lo, hi).Err(); err != nil {
			return fmt.Errorf("CLUSTER ADDSLOTSRANGE %d %d on %s: %w", lo, hi, addrs[i], err)
		}
		// Only allowed while the node knows no other node, so before MEET.
		if err := c.Do(ctx, "CLUSTER", "SET-CONFIG-EPOCH", i+1).Err(); err != nil {
			return fmt.Errorf("CLUSTER SET-CONFIG-EPOCH on %s: %w", addrs[i], err)
		}
	}
	for i, c := range clients {
		for j, a := range addrs {
			if i == j {
				continue
			}
			host, port, err := net.SplitHostPort(a)
			if err != nil {
				return err
			}
			if err := c.ClusterMeet(ctx, host, port).Err(); err != nil {
				return fmt.Errorf("CLUSTER MEET %s from %s: %w", a, addrs[i], err)
			}
		}
	}
	return nil
}

// clusterCreateCLI creates the cluster with redis-cli --cluster create.
func clusterCreateCLI(addrs []string) error {
	b, err := binaries()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), clusterCreateLimit)
	defer cancel()
	args := append([]string{"--cluster", "create"}, addrs...)
	args = append(args, "--cluster-replicas", "0", "--cluster-yes")
	cmd := exec.CommandContext(ctx, b.cli, args...)
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := startCmd(cmd); err != nil {
		return fmt.Errorf("redis-cli --cluster create: %w", err)
	}
	if err := cmd.Wait(); err != nil {
		return fmt.Errorf("redis-cli --cluster create: %w\n%s", err, out.String())
	}
	return nil
}

// probeKeys hash to slots 15495, 3300 and 7365: one per master of a
// three-master cluster (with either creation method's slot layout).
var probeKeys = []string{"redistest:probe:{a}", "redistest:probe:{b}", "redistest:probe:{c}"}

func waitClusterReady(addrs []string) error {
	ctx, cancel := context.WithTimeout(context.Background(), clusterReadyTimeout)
	defer cancel()
	opts := func(addr string) *redis.Options {
		return &redis.Options{Addr: addr, DialTimeout: time.Second, ReadTimeout: time.Second, WriteTimeout: time.Second, MaxRetries: -1}
	}
	nodeClients := make([]*redis.Client, len(addrs))
	for i, a := range addrs {
		nodeClients[i] = redis.NewClient(opts(a))
		defer nodeClients[i].Close()
	}
	var lastErr error
	check := func() error {
		for i, c := range nodeClients {
			info, err := c.ClusterInfo(ctx).Result()
			if err != nil {
				return fmt.Errorf("CLUSTER INFO on %s: %w", addrs[i], err)
			}
			if !strings.Contains(info, "cluster_state:ok") {
				return fmt.Errorf("%s: cluster_state not ok", addrs[i])
			}
		}
		cc := redis.NewClusterClient(&redis.ClusterOptions{Addrs: addrs, DialTimeout: time.Second, ReadTimeout: time.Second, WriteTimeout: time.Second})
		defer cc.Close()
		for _, k := range probeKeys {
			if err := cc.Set(ctx, k, k, 0).Err(); err != nil {
				return fmt.Errorf("probe SET %s: %w", k, err)
			}
			if v, err := cc.Get(ctx, k).Result(); err != nil || v != k {
				return fmt.Errorf("probe GET %s = %q, %v", k, v, err)
			}
			if err := cc.Del(ctx, k).Err(); err != nil {
				return fmt.Errorf("probe DEL %s: %w", k, err)
			}
		}
		return nil
	}
	for {
		if lastErr = check(); lastErr == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("cluster not ready within %v: %w", clusterReadyTimeout, lastErr)
		case <-time.After(50 * time.Millisecond):
		}
	}
}
