//go:build !linux

package redistest

import (
	"os"
	"os/exec"
)

// startCmd starts cmd. Outside Linux there is no parent-death signal, so
// children may outlive a crashed test binary.
func startCmd(cmd *exec.Cmd) error { return cmd.Start() }

// terminate asks cmd to stop, killing it where interrupts are unsupported.
func terminate(cmd *exec.Cmd) {
	if cmd.Process.Signal(os.Interrupt) != nil {
		_ = cmd.Process.Kill()
	}
}

// forceKill kills cmd.
func forceKill(cmd *exec.Cmd) { _ = cmd.Process.Kill() }
