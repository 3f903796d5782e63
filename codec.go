package layercache

import (
	"encoding/json"
	"fmt"
)

// Codec turns values into the payload bytes stored in Redis and back.
// Implementations must be safe for concurrent use. Unmarshal must not keep
// data after it returns: the buffer may be reused.
type Codec interface {
	Marshal(v any) ([]byte, error)
	Unmarshal(data []byte, v any) error
}

// JSON is the default [Codec]: encoding/json, readable by any other code
// that shares the keys.
var JSON Codec = jsonCodec{}

type jsonCodec struct{}

func (jsonCodec) Marshal(v any) ([]byte, error)      { return json.Marshal(v) }
func (jsonCodec) Unmarshal(data []byte, v any) error { return json.Unmarshal(data, v) }

// PassThrough is a [Codec] for caches of []byte or string: the payload is
// the value's bytes, unchanged. Any other type is an error. (It is not
// called Raw: [Raw] is the layout of plain values at legacy keys.)
var PassThrough Codec = rawCodec{}

type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error) {
	switch v := v.(type) {
	case []byte:
		return v, nil
	case *[]byte:
		return *v, nil
	case string:
		return []byte(v), nil
	case *string:
		return []byte(*v), nil
	}
	return nil, fmt.Errorf("layercache: PassThrough codec takes []byte or string, not %T", v)
}

func (rawCodec) Unmarshal(data []byte, v any) error {
	switch v := v.(type) {
	case *[]byte:
		*v = append([]byte(nil), data...)
		return nil
	case *string:
		*v = string(data)
		return nil
	}
	return fmt.Errorf("layercache: PassThrough codec decodes into *[]byte or *string, not %T", v)
}

// rawCodecCompatible reports whether a zero T can go through the PassThrough codec.
func rawCodecCompatible(v any) bool {
	switch v.(type) {
	case *[]byte, *string:
		return true
	}
	return false
}
