//go:build unix

package pgtest

import (
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"strconv"
	"sync"
	"syscall"
)

// credential is the user PostgreSQL runs as.
type credential = syscall.Credential

// runAs returns the credential to run PostgreSQL with: the postgres
// user's when running as root (initdb and postgres refuse root), nil
// (ourselves) otherwise.
var runAs = sync.OnceValues(func() (*credential, error) {
	if os.Geteuid() != 0 {
		return nil, nil
	}
	u, err := user.Lookup("postgres")
	if err != nil {
		return nil, fmt.Errorf("running as root, PostgreSQL must run as the postgres user: %w", err)
	}
	uid, err1 := strconv.ParseUint(u.Uid, 10, 32)
	gid, err2 := strconv.ParseUint(u.Gid, 10, 32)
	if err1 != nil || err2 != nil {
		return nil, fmt.Errorf("postgres user has uid %q, gid %q", u.Uid, u.Gid)
	}
	return &credential{Uid: uint32(uid), Gid: uint32(gid)}, nil
})

// runWith makes cmd run as c (testproc.Start keeps it).
func runWith(cmd *exec.Cmd, c *credential) {
	if c != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: c}
	}
}

// chownTo gives path to c, so that PostgreSQL running as c may use it.
func chownTo(path string, c *credential) error {
	if c == nil {
		return nil
	}
	return os.Chown(path, int(c.Uid), int(c.Gid))
}
