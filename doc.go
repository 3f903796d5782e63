// Package layercache puts a safe, fast, observable cache on top of a go-redis
// client.
//
// A [Cache] of T replaces hand-written rdb.Get / json.Unmarshal / load /
// rdb.Set code with one call, [Cache.Fetch]:
//
//	users, err := layercache.New[User](rdb, layercache.WithNamespace("users"), layercache.WithTTL(time.Minute))
//	u, err := users.Fetch(ctx, "42", func(ctx context.Context) (User, error) { return db.User(ctx, 42) })
//
// Values live at namespace:version:{key} (the key in a Redis Cluster hash
// tag) inside a small binary envelope that records when the value was
// written and until when it is fresh. A value that does not decode is a
// counted miss, never an error or a panic. Concurrent reads of one key in a
// process share one Redis read and one load, detached from any one
// caller's context; a load returning [ErrNotFound] is remembered for a
// short while.
//
// [WithLocal] adds an in-process tier of decoded values (a hit costs tens
// of nanoseconds, no I/O); a [Bus] ([NewBus], [WithInvalidation]) carries
// each Set and Delete to every other process's local tier within
// milliseconds, over pub/sub or a durable Redis Stream ([WithStream]). No
// local read is staler than the invalidation lag, and never staler than the
// local TTL, whatever happens to the connection.
//
// Schema changes do not poison the cache: bump the version (or derive it
// from T's shape, [WithVersionFromType]) and old values are upgraded on
// read ([WithUpgradeFrom]) or purged ([Cache.PurgeVersion]); values that
// must never be served incomplete are checked ([WithValidator]). Entries
// may live one per key ([KeyPerEntry]), in sharded hashes ([Hash]), or as
// plain values at keys other code writes ([Raw]); [WithMigration] moves a
// cache between two of them in phases every process follows ([SetPhase]),
// with rollback at any step and a reconciler ([Cache.Reconcile]).
// [Purge] and [Reconcile] need no value type, so an operator's tool can run
// them against the keys the services' caches keep.
//
// It works with *redis.Client, *redis.ClusterClient, *redis.Ring and the
// failover client through [redis.UniversalClient]. No command or script
// touches keys of two Cluster slots.
package layercache
