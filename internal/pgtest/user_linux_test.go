package pgtest

import (
	"os"
	"regexp"
	"strconv"
	"syscall"
	"testing"
)

// TestRunsAsPostgresUser: as root, the server runs as the postgres user
// and its directories belong to it.
func TestRunsAsPostgresUser(t *testing.T) {
	s := Start(t).Server
	// The postmaster: a backend's pid would be gone once the query's
	// connection closed.
	s.mu.Lock()
	pid := strconv.Itoa(s.proc.cmd.Process.Pid)
	s.mu.Unlock()
	status, err := os.ReadFile("/proc/" + pid + "/status")
	if err != nil {
		t.Fatal(err)
	}
	want := strconv.Itoa(os.Geteuid())
	if cred, _ := runAs(); cred != nil {
		want = strconv.Itoa(int(cred.Uid))
	}
	if !regexp.MustCompile(`(?m)^Uid:\s+` + want + `\s`).Match(status) {
		t.Fatalf("postmaster %s does not run as uid %s:\n%s", pid, want, status)
	}
	for _, dir := range []string{s.base, s.dataDir(), s.sockDir()} {
		fi, err := os.Stat(dir)
		if err != nil {
			t.Fatal(err)
		}
		if uid := strconv.Itoa(int(fi.Sys().(*syscall.Stat_t).Uid)); uid != want {
			t.Fatalf("%s belongs to uid %s, want %s", dir, uid, want)
		}
	}
}
