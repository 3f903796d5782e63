package testproc_test

import (
	"bufio"
	"errors"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/layercache/layercache/internal/testproc"
)

// TestHelperProcess is not a test: TestChildDiesWithParent runs the test
// binary again with this test selected, as a parent that starts a child
// and prints its pid.
func TestHelperProcess(t *testing.T) {
	if os.Getenv("TESTPROC_HELPER") != "1" {
		t.Skip("helper process only")
	}
	cmd := exec.Command("sleep", "60")
	if err := testproc.Start(cmd); err != nil {
		t.Fatal(err)
	}
	os.Stdout.WriteString("child " + strconv.Itoa(cmd.Process.Pid) + "\n")
	time.Sleep(time.Minute) // killed by the parent test long before
}

func TestChildDiesWithParent(t *testing.T) {
	if _, err := exec.LookPath("sleep"); err != nil {
		t.Skip("no sleep binary")
	}
	parent := exec.Command(os.Args[0], "-test.run=^TestHelperProcess$", "-test.count=1")
	parent.Env = append(os.Environ(), "TESTPROC_HELPER=1")
	out, err := parent.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := parent.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = parent.Process.Kill(); _ = parent.Wait() }()

	var child int
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		if f := strings.Fields(sc.Text()); len(f) == 2 && f[0] == "child" {
			child, _ = strconv.Atoi(f[1])
			break
		}
	}
	if child == 0 {
		t.Fatal("helper printed no child pid")
	}
	if err := syscall.Kill(child, 0); err != nil {
		t.Fatalf("child %d not running: %v", child, err)
	}
	// Kill the parent the hard way: no deferred cleanup may run in it.
	if err := parent.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	_ = parent.Wait()

	deadline := time.Now().Add(10 * time.Second)
	for {
		// The child is reparented to init, which reaps it; until then it
		// is a zombie, which counts as dead.
		if err := syscall.Kill(child, 0); errors.Is(err, syscall.ESRCH) || zombie(child) {
			return
		}
		if time.Now().After(deadline) {
			_ = syscall.Kill(child, syscall.SIGKILL)
			t.Fatalf("child %d outlived its parent", child)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func zombie(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	// pid (comm) state ...
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i >= 0 && i+2 < len(s) && s[i+2] == 'Z'
}
