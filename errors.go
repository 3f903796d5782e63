package layercache

import (
	"errors"
	"fmt"
)

// ErrNotFound reports that a key has no value. [Cache.Get] returns it for an
// absent key; a loader returns it (or an error wrapping it) to say the source
// has no such record, which [Cache.Fetch] then caches as a short-lived
// negative entry (see [WithNegativeTTL]). Test with errors.Is.
var ErrNotFound = errors.New("layercache: not found")

// ErrInvalidKey reports a key that cannot be stored: empty, or longer than
// [MaxKeyLen] bytes. Nothing was read or written; fix the caller.
var ErrInvalidKey = errors.New("layercache: invalid key")

// ErrInvalidOption reports a bad option value given to [New] (or another
// constructor). The message names the option and the accepted range.
var ErrInvalidOption = errors.New("layercache: invalid option")

// ErrValueTooLarge reports that an encoded value exceeds the limit set with
// [WithMaxValueSize]. [Cache.Set] returns it, caches nothing and deletes the
// key's older value; [Cache.Fetch] still returns the loaded value to its
// caller but does not cache it.
var ErrValueTooLarge = errors.New("layercache: encoded value exceeds the maximum size")

// ErrNoMigration reports a migration operation ([Cache.Reconcile]) on a
// cache built without [WithMigration].
var ErrNoMigration = errors.New("layercache: the cache has no migration")

// ErrClosed reports a call on a [Cache] after [Cache.Close], or on a [Bus]
// after [Bus.Close] (including attaching a cache to it).
var ErrClosed = errors.New("layercache: cache is closed")

// ErrLoaderPanic wraps a panic raised by a loader. Every caller that shared
// the load receives it (as a *[PanicError]); the process keeps running.
var ErrLoaderPanic = errors.New("layercache: loader panicked")

// PanicError is the error every caller sharing a load receives when the
// loader panicked. errors.Is(err, ErrLoaderPanic) is true.
type PanicError struct {
	// Value is what the loader passed to panic.
	Value any
	// Stack is the loader goroutine's stack at the panic.
	Stack []byte
}

// Error describes the panic; the stack is in the Stack field.
func (e *PanicError) Error() string {
	return fmt.Sprintf("layercache: loader panicked: %v", e.Value)
}

// Is makes errors.Is(err, ErrLoaderPanic) true.
func (e *PanicError) Is(target error) bool { return target == ErrLoaderPanic }

// Unwrap returns the panic value when it is an error (panic(err)), so that
// errors.Is and errors.As see through the panic to it; nil otherwise.
func (e *PanicError) Unwrap() error {
	err, _ := e.Value.(error)
	return err
}

// ErrLoaderGoexit is what every caller sharing a load receives when the
// loader called runtime.Goexit (as t.FailNow does in a test) instead of
// returning: the load has no result, and a zero value with a nil error
// would pass for one. Nothing is cached.
var ErrLoaderGoexit = errors.New("layercache: loader called runtime.Goexit instead of returning")

// errUnencodable marks errors of values that cannot be cached at all (codec
// failure, size limit), as opposed to Redis failures. It adds nothing to
// the message.
var errUnencodable = silentError{}

// errLeaseLost reports a fill under a lease that was no longer held (it
// expired, or a write broke it): nothing was written.
var errLeaseLost = errors.New("layercache: lease lost before the fill")

type silentError struct{}

func (silentError) Error() string { return "" }
