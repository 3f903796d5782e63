package pgtest

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"time"
)

// wireConn speaks the least of the PostgreSQL frontend/backend protocol
// (version 3) that the harness needs: a startup with trust
// authentication, and simple queries whose rows are ignored. It saves the
// harness a driver dependency and a psql process per database.
type wireConn struct {
	c net.Conn
	r *bufio.Reader
}

// pgError is an ErrorResponse from the server.
type pgError struct {
	Severity, Code, Message string
}

func (e *pgError) Error() string {
	return fmt.Sprintf("%s: %s (SQLSTATE %s)", e.Severity, e.Message, e.Code)
}

// dialWire connects to addr as user, to database db. The whole
// conversation is bounded by ctx's deadline, or by 10s without one.
func dialWire(ctx context.Context, addr, user, db string) (*wireConn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(10 * time.Second)
	}
	_ = c.SetDeadline(deadline)
	w := &wireConn{c: c, r: bufio.NewReader(c)}

	msg := []byte{0, 0, 0, 0}                         // length, set below
	msg = binary.BigEndian.AppendUint32(msg, 3<<16|0) // protocol 3.0
	for _, kv := range [][2]string{{"user", user}, {"database", db}} {
		msg = append(append(append(append(msg, kv[0]...), 0), kv[1]...), 0)
	}
	msg = append(msg, 0)
	binary.BigEndian.PutUint32(msg, uint32(len(msg)))
	if _, err := c.Write(msg); err != nil {
		_ = c.Close()
		return nil, err
	}
	for {
		typ, body, err := w.read()
		if err != nil {
			_ = c.Close()
			return nil, err
		}
		switch typ {
		case 'R': // authentication request
			if len(body) < 4 || binary.BigEndian.Uint32(body) != 0 {
				_ = c.Close()
				return nil, errors.New("pgtest: the server asks for a password; pgtest's servers trust loopback clients")
			}
		case 'E':
			_ = c.Close()
			return nil, parseError(body)
		case 'Z': // ready for query
			return w, nil
		}
		// ParameterStatus, BackendKeyData, NoticeResponse: not needed.
	}
}

// read returns the next message's type and body.
func (w *wireConn) read() (byte, []byte, error) {
	var hdr [5]byte
	if _, err := io.ReadFull(w.r, hdr[:]); err != nil {
		return 0, nil, err
	}
	n := int(binary.BigEndian.Uint32(hdr[1:])) - 4
	if n < 0 || n > 64<<20 {
		return 0, nil, fmt.Errorf("pgtest: bad message length %d", n)
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(w.r, body); err != nil {
		return 0, nil, err
	}
	return hdr[0], body, nil
}

// query runs sql (one or more statements) as a simple query and returns
// the rows of the last statement that returned any, as text (NULL as ""),
// and the first error the server reported.
func (w *wireConn) query(sql string) ([][]string, error) {
	msg := append([]byte{'Q', 0, 0, 0, 0}, sql...)
	msg = append(msg, 0)
	binary.BigEndian.PutUint32(msg[1:], uint32(len(msg)-1))
	if _, err := w.c.Write(msg); err != nil {
		return nil, err
	}
	var rows [][]string
	var first error
	for {
		typ, body, err := w.read()
		if err != nil {
			return nil, err
		}
		switch typ {
		case 'T': // row description: a new result set begins
			rows = nil
		case 'D':
			row, err := parseDataRow(body)
			if err != nil {
				return nil, err
			}
			rows = append(rows, row)
		case 'E':
			if first == nil {
				first = parseError(body)
			}
		case 'Z': // every statement done, with or without error
			return rows, first
		}
	}
}

// parseDataRow decodes a DataRow body: a column count, then each value as
// a length (-1 for NULL) and that many bytes of text.
func parseDataRow(body []byte) ([]string, error) {
	if len(body) < 2 {
		return nil, errors.New("pgtest: short DataRow")
	}
	n := int(binary.BigEndian.Uint16(body))
	body = body[2:]
	row := make([]string, n)
	for i := range row {
		if len(body) < 4 {
			return nil, errors.New("pgtest: short DataRow")
		}
		l := int(int32(binary.BigEndian.Uint32(body)))
		body = body[4:]
		if l < 0 {
			continue // NULL
		}
		if len(body) < l {
			return nil, errors.New("pgtest: short DataRow")
		}
		row[i], body = string(body[:l]), body[l:]
	}
	return row, nil
}

// close says goodbye and closes the connection.
func (w *wireConn) close() {
	_, _ = w.c.Write([]byte{'X', 0, 0, 0, 4})
	_ = w.c.Close()
}

// parseError decodes an ErrorResponse body: fields of a type byte and a
// NUL-terminated string, ended by a zero byte.
func parseError(body []byte) error {
	e := &pgError{}
	for len(body) > 1 {
		typ := body[0]
		val, rest, ok := strings.Cut(string(body[1:]), "\x00")
		if !ok {
			break
		}
		switch typ {
		case 'S':
			e.Severity = val
		case 'C':
			e.Code = val
		case 'M':
			e.Message = val
		}
		body = []byte(rest)
	}
	return e
}
