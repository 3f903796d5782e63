// Package testproc starts the server processes that test harnesses own
// (redis-server, postgres) so that they die with the test binary, and
// holds their ports while they are down.
//
// It is shared by [github.com/layercache/layercache/internal/redistest]
// and [github.com/layercache/layercache/internal/pgtest]; tests use those
// packages, not this one.
package testproc
