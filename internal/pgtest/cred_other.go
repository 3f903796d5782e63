//go:build !unix

package pgtest

import "os/exec"

// credential is the user PostgreSQL runs as: always ourselves here.
type credential struct{}

// runAs returns nil: outside Unix, PostgreSQL runs as the current user.
func runAs() (*credential, error) { return nil, nil }

// runWith does nothing: there is no other user to switch to.
func runWith(*exec.Cmd, *credential) {}

// chownTo does nothing: there is no other user to give path to.
func chownTo(string, *credential) error { return nil }
