// Package envelope is the binary format of every value layercache keeps in
// Redis: a fixed 40-byte header followed by the codec's payload.
//
//	offset size field
//	0      1    magic (0xC7)
//	1      1    format version (1)
//	2      1    flags (FlagNegative, FlagCompressed)
//	3      1    reserved, zero
//	4      8    written at, Unix milliseconds
//	12     8    fresh until, Unix milliseconds
//	20     8    expires at (end of the stale grace), Unix milliseconds
//	28     4    load duration, microseconds (XFetch's delta)
//	32     8    write version (set-if-newer; 0 when unversioned)
//	40     -    payload
//
// All integers are big-endian, so that Lua scripts can compare write
// versions with string.byte arithmetic if they ever need to.
package envelope

import (
	"encoding/binary"
	"errors"
	"math"
	"time"
)

const (
	// Magic is the first byte of every envelope.
	Magic byte = 0xC7
	// Version is the envelope format version this package writes.
	Version byte = 1
	// HeaderSize is the length of the fixed header.
	HeaderSize = 40
)

// Flags describe an entry.
const (
	// FlagNegative marks a cached "not found": the payload is empty.
	FlagNegative byte = 1 << 0
	// FlagCompressed marks a compressed payload (reserved).
	FlagCompressed byte = 1 << 1
	knownFlags          = FlagNegative | FlagCompressed
)

// Errors returned by Decode. They never carry the input bytes.
var (
	ErrShort   = errors.New("envelope: shorter than its header")
	ErrMagic   = errors.New("envelope: bad magic byte (not written by layercache)")
	ErrVersion = errors.New("envelope: unknown format version")
	ErrFlags   = errors.New("envelope: unknown flags")
	ErrTimes   = errors.New("envelope: inconsistent timestamps")
)

// Header is the decoded fixed part of an envelope. Times are Unix
// milliseconds, so that comparing against a coarse clock needs no time.Time.
type Header struct {
	Flags        byte
	WrittenAt    int64 // Unix ms
	FreshUntil   int64 // Unix ms
	ExpiresAt    int64 // Unix ms; >= FreshUntil
	LoadDuration time.Duration
	WriteVersion uint64
}

// Negative reports whether the entry is a cached "not found".
func (h *Header) Negative() bool { return h.Flags&FlagNegative != 0 }

// Append appends the envelope of h and payload to dst and returns it.
func Append(dst []byte, h Header, payload []byte) []byte {
	var hdr [HeaderSize]byte
	hdr[0] = Magic
	hdr[1] = Version
	hdr[2] = h.Flags
	binary.BigEndian.PutUint64(hdr[4:], uint64(h.WrittenAt))
	binary.BigEndian.PutUint64(hdr[12:], uint64(h.FreshUntil))
	binary.BigEndian.PutUint64(hdr[20:], uint64(h.ExpiresAt))
	us := h.LoadDuration / time.Microsecond
	if us < 0 {
		us = 0
	}
	if us > math.MaxUint32 {
		us = math.MaxUint32
	}
	binary.BigEndian.PutUint32(hdr[28:], uint32(us))
	binary.BigEndian.PutUint64(hdr[32:], h.WriteVersion)
	dst = append(dst, hdr[:]...)
	return append(dst, payload...)
}

// Encode returns a new envelope of h and payload.
func Encode(h Header, payload []byte) []byte {
	return Append(make([]byte, 0, HeaderSize+len(payload)), h, payload)
}

// Decode parses b. The returned payload aliases b; it is not copied.
// Decode never panics, whatever b holds.
func Decode(b []byte) (Header, []byte, error) {
	var h Header
	// Magic first: a legacy value written by other code is far more
	// common than a truncated envelope, and deserves the clearer error.
	if len(b) > 0 && b[0] != Magic {
		return h, nil, ErrMagic
	}
	if len(b) < HeaderSize {
		return h, nil, ErrShort
	}
	if b[1] != Version {
		return h, nil, ErrVersion
	}
	h.Flags = b[2]
	if h.Flags&^knownFlags != 0 || b[3] != 0 {
		return h, nil, ErrFlags
	}
	h.WrittenAt = int64(binary.BigEndian.Uint64(b[4:]))
	h.FreshUntil = int64(binary.BigEndian.Uint64(b[12:]))
	h.ExpiresAt = int64(binary.BigEndian.Uint64(b[20:]))
	h.LoadDuration = time.Duration(binary.BigEndian.Uint32(b[28:])) * time.Microsecond
	h.WriteVersion = binary.BigEndian.Uint64(b[32:])
	if h.WrittenAt < 0 || h.FreshUntil < h.WrittenAt || h.ExpiresAt < h.FreshUntil {
		return h, nil, ErrTimes
	}
	payload := b[HeaderSize:]
	if h.Negative() && len(payload) != 0 {
		return h, nil, ErrFlags
	}
	return h, payload, nil
}

// IsEnvelope reports whether b starts like an envelope. It is a cheap
// pre-check; Decode is the real test.
func IsEnvelope(b []byte) bool { return len(b) >= HeaderSize && b[0] == Magic }

// Offsets of the header fields that the Lua scripts read and write in
// place (internal/scripts builds its library from them), 0-based.
const (
	// FlagsOffset is the offset of the flags byte.
	FlagsOffset = 2
	// ExpiresAtOffset is the offset of the 8-byte expires-at time.
	ExpiresAtOffset = 20
	// VersionOffset is the offset of the 8-byte write version.
	VersionOffset = 32
)

// WriteVersion returns the write version of b, an envelope or at least its
// first HeaderSize bytes, or 0 when b does not start like an envelope of
// this format version.
func WriteVersion(b []byte) uint64 {
	if len(b) < HeaderSize || b[0] != Magic || b[1] != Version {
		return 0
	}
	return binary.BigEndian.Uint64(b[VersionOffset:])
}

// WithWriteVersion returns a copy of env whose write version is v. env
// must be an envelope (at least HeaderSize bytes).
func WithWriteVersion(env []byte, v uint64) []byte {
	out := append([]byte(nil), env...)
	binary.BigEndian.PutUint64(out[VersionOffset:], v)
	return out
}

// Usable reports whether b is an envelope that has not reached its
// physical end (ExpiresAt) at now, Unix ms. Whether it is fresh or stale
// is the reader's call.
func Usable(b []byte, now int64) bool {
	if b == nil {
		return false
	}
	h, _, err := Decode(b)
	return err == nil && now < h.ExpiresAt
}

// ProposePast returns env with its proposed write version raised, if
// needed, to one counter step past other, keeping env's writer id (the
// low 16 bits). A write version is a 48-bit counter (Unix ms when the
// write was proposed) and a 16-bit writer id.
func ProposePast(env []byte, other uint64) []byte {
	p := WriteVersion(env)
	if other>>16 < p>>16 {
		return env
	}
	return WithWriteVersion(env, (other>>16+1)<<16|p&0xffff)
}
