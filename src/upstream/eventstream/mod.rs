//! The AWS event-stream codec (`application/vnd.amazon.eventstream`): encodes and decodes the
//! binary frames Amazon Q streams its responses in, and dumps them as JSON for operators.
//!
//! # Wire format
//!
//! Every integer is big-endian. A frame is a 12-byte prelude — total length (CRCs included,
//! at least 16), headers length, CRC-32 of those 8 bytes — then the headers, the payload, and a
//! CRC-32 of everything before it. CRC-32 is the IEEE/zlib one. A header is a `u8` name length
//! (1..=255), the UTF-8 name (unique within the frame), a type byte and the value:
//!
//! | type | [`HeaderValue`] | value bytes | JSON dump |
//! |---|---|---|---|
//! | 0 / 1 | `Bool(true)` / `Bool(false)` | none | `true` / `false` |
//! | 2 | `Byte(i8)` | 1 | number |
//! | 3 | `Short(i16)` | 2 | number |
//! | 4 | `Int(i32)` | 4 | number |
//! | 5 | `Long(i64)` | 8 | number |
//! | 6 | `ByteArray(Bytes)` | u16 length + bytes | base64 string (standard alphabet, padded) |
//! | 7 | `String(StrBytes)` | u16 length + UTF-8 | string |
//! | 8 | `Timestamp(i64)` | i64 ms since the epoch | number of milliseconds |
//! | 9 | `Uuid([u8; 16])` | 16 | `"xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"`, lowercase |
//!
//! # Decoding
//!
//! [`Decoder`] takes bytes in chunks of any size (one byte at a time works) and returns whole
//! [`Frame`]s. It checks the prelude CRC as soon as 12 bytes are in, then the lengths (total ≥ 16,
//! headers fit, headers ≤ 128 KiB as the format specifies, total ≤ the decoder's cap, 16 MiB by
//! default) — all before buffering the body, so a corrupt or hostile length never makes it wait
//! for, or allocate, more than the cap. Then the message CRC, then the headers: unknown types,
//! empty names, lengths running past the headers section, string or byte-array values over 32767
//! bytes, non-UTF-8 names or string values and repeated names are errors (so every frame that
//! decodes re-encodes to the same bytes). Every error is a [`DecodeError`] giving the frame's offset in the
//! stream; the first one ends the stream (the decoder returns it again on every later call). The
//! decoder never panics on any input.
//!
//! Header names, string and byte-array values and the payload are [`Bytes`](bytes::Bytes)
//! slices of the frame's buffer, not copies; a frame wholly inside a chunk given to
//! [`Decoder::push_bytes`] is not copied at all. (Two dozen well-known names and values —
//! `:event-type`, `application/json`, Amazon Q's event names — come back as static strings
//! instead, which is cheaper still.)
//!
//! # JSON dump
//!
//! [`frame_to_json`] gives `{"headers": [{"name": …, "type": …, "value": …}, …], "payload": …}`:
//! `type` is [`HeaderValue::type_name`] ("bool", "byte", "short", "int", "long", "bytes", "string",
//! "timestamp", "uuid") and `value` is encoded as in the table above. The payload is a JSON string
//! when it is valid UTF-8 — JSON payloads too, kept verbatim as text so the dump is lossless —
//! and `{"base64": "…"}` otherwise. [`dump`] streams a whole input through the decoder and writes
//! one such object a line.

mod decode;
mod dump;
mod frame;

pub use decode::{DecodeError, Decoder};
pub use dump::{DumpError, dump, frame_to_json};
pub use frame::{EncodeError, Frame, Header, HeaderValue, StrBytes};

/// Prelude: total length, headers length, prelude CRC.
const PRELUDE_LEN: usize = 12;
/// Message CRC at the end of the frame.
const CRC_LEN: usize = 4;
/// The smallest frame: a prelude and a message CRC.
const MIN_FRAME_LEN: usize = PRELUDE_LEN + CRC_LEN;
const MAX_HEADER_NAME_LEN: usize = 255;
/// String and byte-array values: the u16 length field is limited to `i16::MAX` by the format.
const MAX_HEADER_VALUE_LEN: usize = i16::MAX as usize;
/// The format's limit on the encoded headers of one frame.
pub const MAX_HEADERS_LEN: usize = 128 * 1024;
/// The frame size [`Decoder::new`] accepts and [`Frame::encode`] produces at most.
pub const DEFAULT_MAX_FRAME_LEN: usize = 16 * 1024 * 1024;
