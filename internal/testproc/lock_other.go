//go:build !unix

package testproc

import (
	"io"
	"os"
	"sync"
)

var (
	localMu    sync.Mutex
	localLocks = map[string]bool{}
)

type localLock string

func (l localLock) Close() error {
	localMu.Lock()
	defer localMu.Unlock()
	delete(localLocks, string(l))
	return nil
}

// lockFile reserves path within this process only: without flock, test
// binaries running at the same time may pick the same port.
func lockFile(path string) (io.Closer, error) {
	localMu.Lock()
	defer localMu.Unlock()
	if localLocks[path] {
		return nil, os.ErrExist
	}
	localLocks[path] = true
	return localLock(path), nil
}
