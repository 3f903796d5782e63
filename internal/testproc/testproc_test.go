package testproc_test

import (
	"net"
	"os/exec"
	"testing"
	"time"

	"github.com/layercache/layercache/internal/testproc"
)

func TestReservePortExcludesOthers(t *testing.T) {
	p, err := testproc.ReservePort(20000, 22700, 10000)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Release()
	if p.Num < 20000 || p.Num >= 22700 || len(p.Extra) != 1 || p.Extra[0] != p.Num+10000 {
		t.Fatalf("bad reservation %+v", p)
	}
	// A one-port range that holds only the reserved port cannot be
	// reserved again, by this or any other process, though it is free.
	if _, err := testproc.ReservePort(p.Num, p.Num+1); err == nil {
		t.Fatalf("port %d reserved twice", p.Num)
	}
	if _, err := testproc.ReservePort(p.Extra[0], p.Extra[0]+1); err == nil {
		t.Fatalf("port %d reserved twice", p.Extra[0])
	}
	l, err := net.Listen("tcp", p.String())
	if err != nil {
		t.Fatalf("reserved port is not free for its owner: %v", err)
	}
	_ = l.Close()

	p.Release()
	p.Release() // idempotent
	q, err := testproc.ReservePort(p.Num, p.Num+1)
	if err != nil {
		t.Fatalf("port not reservable after Release: %v", err)
	}
	q.Release()
}

func TestReservePortSkipsBoundPorts(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	n := l.Addr().(*net.TCPAddr).Port
	if p, err := testproc.ReservePort(n, n+1); err == nil {
		p.Release()
		t.Fatalf("reserved port %d that is in use", n)
	}
}

func TestSignals(t *testing.T) {
	if _, err := exec.LookPath("sleep"); err != nil {
		t.Skip("no sleep binary")
	}
	for name, stop := range map[string]func(*exec.Cmd){
		"Interrupt": testproc.Interrupt, "Terminate": testproc.Terminate, "Kill": testproc.Kill,
	} {
		t.Run(name, func(t *testing.T) {
			cmd := exec.Command("sleep", "60")
			if err := testproc.Start(cmd); err != nil {
				t.Fatal(err)
			}
			done := make(chan error, 1)
			go func() { done <- cmd.Wait() }()
			stop(cmd)
			select {
			case err := <-done:
				if err == nil {
					t.Fatal("sleep exited cleanly; want killed by a signal")
				}
			case <-time.After(10 * time.Second):
				_ = cmd.Process.Kill()
				t.Fatal("sleep still running")
			}
		})
	}
}
