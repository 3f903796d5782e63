//go:build !linux

package testproc

import (
	"os"
	"os/exec"
)

// Start starts cmd. Outside Linux there is no parent-death signal, so
// children may outlive a crashed test binary.
func Start(cmd *exec.Cmd) error { return cmd.Start() }

// Interrupt asks cmd to stop, killing it where interrupts are unsupported.
func Interrupt(cmd *exec.Cmd) {
	if cmd.Process.Signal(os.Interrupt) != nil {
		_ = cmd.Process.Kill()
	}
}

// Terminate asks cmd to stop, killing it where interrupts are unsupported.
func Terminate(cmd *exec.Cmd) { Interrupt(cmd) }

// Kill kills cmd.
func Kill(cmd *exec.Cmd) { _ = cmd.Process.Kill() }
