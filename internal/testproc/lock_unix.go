//go:build unix

package testproc

import (
	"io"
	"os"
	"syscall"
)

// lockFile opens (creating) path and takes an exclusive, non-blocking
// flock on it; closing the result drops the lock. flock locks belong to
// the open file, so a second lockFile of the same path fails even within
// one process.
func lockFile(path string) (io.Closer, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|os.O_CREATE, 0o666)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		_ = f.Close()
		return nil, err
	}
	return f, nil
}
