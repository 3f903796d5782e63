package redistest_test

import (
	"context"
	"fmt"
	"testing"

	"github.com/layercache/layercache/internal/redistest"
)

func TestSlot(t *testing.T) {
	ctx := context.Background()
	c := redistest.Cluster(t).NewClient(t)
	keys := []string{"", "a", "foo", "{user1000}.following", "{}x", "x{}", "{a", "a}", "a{b}c{d}", "{{x}}", "héllo", "\x00\xff"}
	for i := range 100 {
		keys = append(keys, fmt.Sprintf("ns:v1:{k%d}:lease", i))
	}
	for _, k := range keys {
		want, err := c.ClusterKeySlot(ctx, k).Result()
		if err != nil {
			t.Fatal(err)
		}
		if got := redistest.Slot(k); int64(got) != want {
			t.Fatalf("Slot(%q) = %d, CLUSTER KEYSLOT says %d", k, got, want)
		}
	}
}
