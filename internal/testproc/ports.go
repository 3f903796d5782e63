package testproc

import (
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strconv"
)

// Port is a TCP port on 127.0.0.1 reserved for one server of this test
// binary. See [ReservePort].
type Port struct {
	// Num is the reserved port number.
	Num int
	// Extra are the other reserved ports, Num plus each offset given to
	// [ReservePort], in that order.
	Extra []int

	locks []io.Closer
}

// ReservePort picks a random port P in [lo, hi) such that P and P+off for
// every off in offsets are free on 127.0.0.1 now and not reserved by any
// process that uses this package, and reserves them until
// [Port.Release].
//
// The reservation is an exclusive lock on one file per port under
// os.TempDir()/layercache-ports, which the kernel drops when the process
// dies. It is what lets a test kill a server and start it again on the
// same port: while the server is down the port is free (clients are
// refused, as they should be), but no other test binary running at the
// same time (go test ./... runs packages in parallel) may pick it. A
// process that does not use this package may still bind it; keep [lo, hi)
// below the ephemeral range (32768+ on Linux) so that outgoing
// connections never do.
func ReservePort(lo, hi int, offsets ...int) (*Port, error) {
	dir := filepath.Join(os.TempDir(), "layercache-ports")
	if err := os.MkdirAll(dir, 0o777); err != nil {
		return nil, fmt.Errorf("reserve port: %w", err)
	}
	// Users other than the one that made the directory must be able to
	// create lock files in it too.
	_ = os.Chmod(dir, 0o777|os.ModeSticky)
	for range 500 {
		p := &Port{Num: lo + rand.IntN(hi-lo)}
		ok := true
		for i, off := range append([]int{0}, offsets...) {
			n := p.Num + off
			if i > 0 {
				p.Extra = append(p.Extra, n)
			}
			f, err := lockFile(filepath.Join(dir, strconv.Itoa(n)))
			if err != nil {
				ok = false
				break
			}
			p.locks = append(p.locks, f)
			// Checked after locking, so that no test binary can bind it
			// between this check and our server's bind.
			if !portFree(n) {
				ok = false
				break
			}
		}
		if ok {
			return p, nil
		}
		p.Release()
	}
	return nil, errors.New("reserve port: no free port found")
}

// Release gives the ports back. It may be called more than once.
func (p *Port) Release() {
	for _, f := range p.locks {
		_ = f.Close() // closing the file drops its lock
	}
	p.locks = nil
}

// String returns "127.0.0.1:Num".
func (p *Port) String() string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(p.Num)) }

func portFree(p int) bool {
	l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(p)))
	if err != nil {
		return false
	}
	_ = l.Close()
	return true
}
