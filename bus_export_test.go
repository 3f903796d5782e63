package layercache

// Test hooks of the bus, exported to the external tests only.

// WithPendingBound sets the bound of the bus's publish queue (in the units
// of pendingSize) so that tests reach it with a few thousand keys.
func WithPendingBound(n int) BusOption { return func(c *busConfig) { c.maxPending = n } }

// PendingSize is what keys cost the publish queue.
func PendingSize(keys []string) int { return pendingSize(keys) }

// PublishKeys hands keys of route to bus exactly as a Delete of them on a
// cache of that route does, without the Redis writes.
func PublishKeys(bus *Bus, route string, keys []string) { bus.publish(route, keys, nil) }

// PendingBytes is the size of what waits in bus's publish queue.
func PendingBytes(bus *Bus) int {
	bus.pubMu.Lock()
	defer bus.pubMu.Unlock()
	return bus.pendSize
}
