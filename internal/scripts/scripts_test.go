package scripts

import (
	"context"
	"strings"
	"testing"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
)

// Every script compiles (SCRIPT LOAD parses it), and with only the
// functions it needs.
func TestScriptsCompile(t *testing.T) {
	mr := miniredis.RunT(t)
	client := redis.NewClient(&redis.Options{Addr: mr.Addr()})
	defer client.Close()
	all := map[string]*redis.Script{"Acquire": Acquire, "Renew": Renew, "Release": Release, "BreakLease": BreakLease,
		"Write": Write, "Delete": Delete, "Take": Take, "Version": Version, "CAS": CAS, "Arm": Arm,
		"HashSweep": HashSweep, "SweepClaim": SweepClaim}
	for name, s := range all {
		if err := s.Load(context.Background(), client).Err(); err != nil {
			t.Errorf("%s does not compile: %v", name, err)
		}
	}
}

func TestAssembleTakesWhatTheBodyNeeds(t *testing.T) {
	got := assemble("drop()")
	if !strings.Contains(got, "local function drop()") || strings.Contains(got, "local function put(") {
		t.Fatalf("assemble(drop) = %s", got)
	}
	// write calls current, native, bump, put, cmpb, ... in that order of
	// definition: callees come first.
	got = assemble("write(e, 1, 'f')")
	for _, callee := range []string{"cmpb", "bump", "native", "current", "put", "envversion"} {
		i, j := strings.Index(got, "local function "+callee+"("), strings.Index(got, "local function write(")
		if i < 0 || i > j {
			t.Errorf("%s missing or after write in %s", callee, got)
		}
	}
	if strings.Contains(got, "--") {
		t.Errorf("comments reached the script text: %s", got)
	}
}
