package layercache_test

import (
	"testing"

	"github.com/layercache/layercache/internal/redistest"
)

// TestMain starts real Redis servers on demand (standalone and a 3-master
// cluster) and stops them when the package's tests end.
func TestMain(m *testing.M) { redistest.Main(m) }
