//go:build linux

package redistest

import (
	"os/exec"
	"runtime"
	"sync"
	"syscall"
)

type spawnReq struct {
	cmd *exec.Cmd
	err chan error
}

var spawnCh = sync.OnceValue(func() chan spawnReq {
	ch := make(chan spawnReq)
	go func() {
		// Pdeathsig fires when the thread that forked the child exits, not
		// the process. Fork from a thread that is locked to this goroutine,
		// which never returns, so children die only with the process.
		runtime.LockOSThread()
		for r := range ch {
			r.err <- r.cmd.Start()
		}
	}()
	return ch
})

// startCmd starts cmd in its own process group, to be SIGKILLed by the
// kernel when the test binary dies.
func startCmd(cmd *exec.Cmd) error {
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	r := spawnReq{cmd: cmd, err: make(chan error, 1)}
	spawnCh() <- r
	return <-r.err
}

// terminate sends SIGTERM to cmd's process group.
func terminate(cmd *exec.Cmd) { _ = syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM) }

// forceKill sends SIGKILL to cmd's process group.
func forceKill(cmd *exec.Cmd) { _ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
