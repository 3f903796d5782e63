//go:build linux

package testproc

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

// Start starts cmd in its own process group, to be SIGKILLed by the kernel
// when the test binary dies. Fields the caller set in cmd.SysProcAttr (a
// Credential, say) are kept: the kernel clears the parent-death signal on
// a change of user, but Go sets it after switching credentials, so it
// holds for children started as another user too.
func Start(cmd *exec.Cmd) error {
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	cmd.SysProcAttr.Setpgid = true
	r := spawnReq{cmd: cmd, err: make(chan error, 1)}
	spawnCh() <- r
	return <-r.err
}

// Interrupt sends SIGINT to cmd's own process only (postgres's "fast"
// shutdown; its backends are the postmaster's to stop).
func Interrupt(cmd *exec.Cmd) { _ = cmd.Process.Signal(syscall.SIGINT) }

// Terminate sends SIGTERM to cmd's process group.
func Terminate(cmd *exec.Cmd) { _ = syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM) }

// Kill sends SIGKILL to cmd's process group, so that children of cmd
// (postgres backends) die with it, as on a crash of the machine's process.
func Kill(cmd *exec.Cmd) { _ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
