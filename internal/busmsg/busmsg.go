// Package busmsg is the wire format of the messages layercache's invalidation
// bus sends over Redis pub/sub or a Redis Stream. A message carries a batch
// of items for one or more caches (routes) from one node. Version 2, the one
// Encode writes:
//
//	offset size field
//	0      1    magic (0xB5)
//	1      1    format version (2)
//	2      1    flags (FlagMAC)
//	3      8    origin node id
//	11     8    sent at, Unix milliseconds by the sender's clock
//	19     8    sequence number: per origin, one more for every message
//	27     -    items, up to the MAC
//	end-16 16   HMAC-SHA256(secret, everything before it), truncated; only with FlagMAC
//
// The sent-at time and the sequence number are inside the MAC, so that a
// receiver with the secret can tell a replayed message from a new one: it
// drops messages sent too long ago, and sequence numbers it has seen (the
// bus does this; the format only carries what it needs).
//
// Version 1 is version 2 without the sequence number (items start at
// offset 19). Decode still reads it and reports Version 1, so that the
// receiver decides what an old node's message is worth: without a sequence
// number it cannot be told from a replay within its time window.
//
// An item is a kind byte, a uvarint body length and the body, so a reader
// skips kinds it does not know (newer writers may add some). Kinds:
//
//	KindInvalidate  uvarint route length, route, then keys, each a uvarint length and the bytes
//	KindFlush       uvarint route length, route
//	KindPhase       uvarint route length, route (a migration name)
//
// The magic, the flags byte at offset 2 and the MAC as the last 16 bytes are
// the framing every later version keeps, so that a reader can authenticate a
// message of a version it cannot parse.
package busmsg

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"errors"
)

const (
	// Magic is the first byte of every message.
	Magic byte = 0xB5
	// Version is the format version this package writes.
	Version byte = 2
	// VersionNoSeq is the first format version, without a sequence
	// number, which Decode still reads.
	VersionNoSeq byte = 1
	// FlagMAC marks a message that ends with a MAC.
	FlagMAC byte = 1 << 0
	// HeaderSize is the length of the fixed header of a Version message.
	HeaderSize = 27
	// HeaderSizeNoSeq is the length of the fixed header of a VersionNoSeq
	// message, and the shortest message Decode looks into.
	HeaderSizeNoSeq = 19
	// MACSize is the length of the truncated HMAC-SHA256 tag.
	MACSize = 16
	// MaxSize bounds an encoded message; Encode splits larger batches.
	MaxSize = 32 << 10
	// MaxKeyLen is the longest key an item may carry (the cache's limit).
	MaxKeyLen = 1024
	// maxRouteLen bounds a route ("namespace:version", each at most 128).
	maxRouteLen = 512
)

// Kind says what an item asks for.
type Kind byte

// Item kinds.
const (
	// KindInvalidate drops keys from the local tiers of a route.
	KindInvalidate Kind = 1
	// KindFlush drops every entry of the local tiers of a route.
	KindFlush Kind = 2
	// KindPhase says that the phase of the migration named by the route
	// changed. It carries no phase: receivers re-read the control key, the
	// only source of truth, so a replayed or stray notice costs one GET.
	KindPhase Kind = 3
)

// Errors returned by Decode. They never carry the input bytes.
var (
	// ErrForeign: not a layercache bus message (bad magic, too short).
	ErrForeign = errors.New("busmsg: not a bus message")
	// ErrForged: a secret is configured and the message has no MAC or a
	// wrong one.
	ErrForged = errors.New("busmsg: message not authenticated")
	// ErrVersion: an authentic (or unauthenticated, when no secret is
	// configured) message of a format version this package cannot read.
	ErrVersion = errors.New("busmsg: unknown format version")
	// ErrMalformed: a message of a known version whose header or items
	// do not parse.
	ErrMalformed = errors.New("busmsg: malformed message")
)

// Item is one instruction for the local tiers of a route.
type Item struct {
	Kind  Kind
	Route string
	Keys  []string // KindInvalidate only
}

// Message is a message's header and items: what Encode sends and Decode
// returns.
type Message struct {
	// Version is the format version Decode read (Version or
	// VersionNoSeq); Encode ignores it and writes Version.
	Version byte
	// Origin is the sending node's id.
	Origin [8]byte
	// SentAt is when the message was sent, Unix ms by the sender's clock.
	SentAt int64
	// Seq is the message's sequence number among its origin's messages
	// (0 in a VersionNoSeq message). Encode numbers the messages it
	// returns Seq, Seq+1, ...
	Seq uint64
	// Authentic is set by Decode when it checked the message's MAC
	// against a secret.
	Authentic bool
	// Items are the instructions, in order.
	Items []Item
}

// Encode returns m's items as one or more messages of at most MaxSize
// bytes each (a single key longer than that is impossible: keys are bounded
// by MaxKeyLen), numbered from m.Seq up: the caller's next sequence number
// is m.Seq plus the number of messages returned. With a non-empty secret
// every message carries a MAC over its header and items.
func Encode(m Message, secret []byte) [][]byte {
	e := encoder{origin: m.Origin, sentAt: m.SentAt, seq: m.Seq, secret: secret}
	for _, it := range m.Items {
		switch it.Kind {
		case KindInvalidate:
			e.invalidate(it.Route, it.Keys)
		default:
			e.item(it.Kind, it.Route)
		}
	}
	e.finish()
	return e.out
}

type encoder struct {
	origin [8]byte
	sentAt int64
	seq    uint64 // of the message being built
	secret []byte
	buf    []byte
	out    [][]byte
}

func (e *encoder) limit() int {
	if len(e.secret) > 0 {
		return MaxSize - MACSize
	}
	return MaxSize
}

func (e *encoder) start() {
	if e.buf != nil {
		return
	}
	e.buf = make([]byte, HeaderSize, 512)
	e.buf[0] = Magic
	e.buf[1] = Version
	if len(e.secret) > 0 {
		e.buf[2] = FlagMAC
	}
	copy(e.buf[3:11], e.origin[:])
	binary.BigEndian.PutUint64(e.buf[11:19], uint64(e.sentAt))
	binary.BigEndian.PutUint64(e.buf[19:27], e.seq)
}

func (e *encoder) finish() {
	if e.buf == nil {
		return
	}
	if len(e.secret) > 0 {
		e.buf = append(e.buf, Sum(e.secret, e.buf)...)
	}
	e.out = append(e.out, e.buf)
	e.buf = nil
	e.seq++
}

// item appends a body-less item (flush, or future kinds) for route.
func (e *encoder) item(kind Kind, route string) {
	body := uvarintLen(len(route)) + len(route)
	if e.buf != nil && len(e.buf)+1+uvarintLen(body)+body > e.limit() {
		e.finish()
	}
	e.start()
	e.buf = append(e.buf, byte(kind))
	e.buf = binary.AppendUvarint(e.buf, uint64(body))
	e.buf = binary.AppendUvarint(e.buf, uint64(len(route)))
	e.buf = append(e.buf, route...)
}

// invalidate appends keys of route as one item per message, splitting them
// over as many messages as their size needs.
func (e *encoder) invalidate(route string, keys []string) {
	for len(keys) > 0 {
		head := uvarintLen(len(route)) + len(route)
		// Worst-case item framing: kind + a 3-byte uvarint body length
		// (bodies are below 2^21).
		const framing = 1 + 3
		if e.buf != nil && len(e.buf)+framing+head+uvarintLen(len(keys[0]))+len(keys[0]) > e.limit() {
			e.finish()
		}
		e.start()
		room := e.limit() - len(e.buf) - framing - head
		body := head
		n := 0
		for n < len(keys) {
			k := uvarintLen(len(keys[n])) + len(keys[n])
			if k > room && n > 0 {
				break
			}
			room -= k
			body += k
			n++
		}
		e.buf = append(e.buf, byte(KindInvalidate))
		e.buf = binary.AppendUvarint(e.buf, uint64(body))
		e.buf = binary.AppendUvarint(e.buf, uint64(len(route)))
		e.buf = append(e.buf, route...)
		for _, k := range keys[:n] {
			e.buf = binary.AppendUvarint(e.buf, uint64(len(k)))
			e.buf = append(e.buf, k...)
		}
		keys = keys[n:]
		if len(keys) > 0 {
			e.finish()
		}
	}
}

// Sum returns the truncated HMAC-SHA256 of b under secret.
func Sum(secret, b []byte) []byte {
	m := hmac.New(sha256.New, secret)
	m.Write(b)
	return m.Sum(nil)[:MACSize]
}

// Decode parses b, a message of Version or VersionNoSeq. With a non-empty
// secret, a message without a valid MAC is ErrForged whatever else it
// holds; the MAC is checked before anything past the framing is read, and
// an authentic message comes back with Authentic set. Without a secret a
// MAC, if present, is skipped unchecked. Decode never panics, whatever b
// holds. It copies b once; the strings of the result share that copy.
func Decode(b []byte, secret []byte) (Message, error) {
	return DecodeString(string(b), secret)
}

// DecodeString is Decode of a message held in a string, as go-redis
// returns pub/sub payloads and stream fields. The routes and keys of the
// result are substrings of s: decoding a message of a thousand keys costs
// a few allocations, not a thousand.
func DecodeString(s string, secret []byte) (Message, error) {
	var m Message
	if len(s) < HeaderSizeNoSeq || s[0] != Magic {
		return m, ErrForeign
	}
	hasMAC := s[2]&FlagMAC != 0
	if len(secret) > 0 {
		if !hasMAC || len(s) < HeaderSizeNoSeq+MACSize {
			return m, ErrForged
		}
		body, tag := s[:len(s)-MACSize], s[len(s)-MACSize:]
		if !hmac.Equal([]byte(tag), Sum(secret, []byte(body))) {
			return m, ErrForged
		}
		m.Authentic = true
	}
	header := HeaderSize
	switch s[1] {
	case Version:
	case VersionNoSeq:
		header = HeaderSizeNoSeq
	default:
		return Message{}, ErrVersion
	}
	if s[2]&^FlagMAC != 0 {
		return Message{}, ErrMalformed
	}
	if hasMAC {
		if len(s) < header+MACSize {
			return Message{}, ErrMalformed
		}
		s = s[:len(s)-MACSize]
	}
	if len(s) < header {
		return Message{}, ErrMalformed
	}
	m.Version = s[1]
	copy(m.Origin[:], s[3:11])
	m.SentAt = int64(bigEndian64(s[11:19]))
	if m.Version == Version {
		m.Seq = bigEndian64(s[19:27])
	}
	p := s[header:]
	for len(p) > 0 {
		kind := Kind(p[0])
		bodyLen, n := uvarint(p[1:])
		if n <= 0 || bodyLen > uint64(len(p)-1-n) {
			return m, ErrMalformed
		}
		body := p[1+n : 1+n+int(bodyLen)]
		p = p[1+n+int(bodyLen):]
		if kind != KindInvalidate && kind != KindFlush && kind != KindPhase {
			continue // a newer writer's kind: skip it
		}
		route, rest, ok := field(body, maxRouteLen)
		if !ok || route == "" {
			return m, ErrMalformed
		}
		it := Item{Kind: kind, Route: route}
		if kind != KindInvalidate {
			if len(rest) != 0 {
				return m, ErrMalformed
			}
			m.Items = append(m.Items, it)
			continue
		}
		it.Keys = make([]string, 0, countFields(rest))
		for len(rest) > 0 {
			var k string
			if k, rest, ok = field(rest, MaxKeyLen); !ok || k == "" {
				return m, ErrMalformed
			}
			it.Keys = append(it.Keys, k)
		}
		if len(it.Keys) == 0 {
			return m, ErrMalformed
		}
		m.Items = append(m.Items, it)
	}
	return m, nil
}

// field reads a uvarint-length-prefixed string of at most max bytes.
func field(s string, max int) (string, string, bool) {
	l, n := uvarint(s)
	if n <= 0 || l > uint64(max) || l > uint64(len(s)-n) {
		return "", "", false
	}
	return s[n : n+int(l)], s[n+int(l):], true
}

// countFields counts the length-prefixed fields in s, up to the first
// that does not parse (field reports it), to size the keys' slice.
func countFields(s string) int {
	n := 0
	for len(s) > 0 {
		l, w := uvarint(s)
		if w <= 0 || l > uint64(len(s)-w) {
			break
		}
		s = s[w+int(l):]
		n++
	}
	return n
}

// uvarint is binary.Uvarint of a string.
func uvarint(s string) (uint64, int) {
	var x uint64
	var shift uint
	for i := 0; i < len(s); i++ {
		if i == binary.MaxVarintLen64 {
			return 0, -(i + 1) // overflow
		}
		b := s[i]
		if b < 0x80 {
			if i == binary.MaxVarintLen64-1 && b > 1 {
				return 0, -(i + 1) // overflow
			}
			return x | uint64(b)<<shift, i + 1
		}
		x |= uint64(b&0x7f) << shift
		shift += 7
	}
	return 0, 0
}

// bigEndian64 is binary.BigEndian.Uint64 of an 8-byte string.
func bigEndian64(s string) uint64 {
	_ = s[7]
	return uint64(s[7]) | uint64(s[6])<<8 | uint64(s[5])<<16 | uint64(s[4])<<24 |
		uint64(s[3])<<32 | uint64(s[2])<<40 | uint64(s[1])<<48 | uint64(s[0])<<56
}

func uvarintLen(n int) int {
	l := 1
	for n >= 0x80 {
		n >>= 7
		l++
	}
	return l
}
