//! Frame, header and header-value types, and the frame encoder.

use std::collections::HashSet;
use std::fmt;
use std::str::Utf8Error;

use bytes::{BufMut, Bytes, BytesMut};

use super::{
    CRC_LEN, DEFAULT_MAX_FRAME_LEN, MAX_HEADER_NAME_LEN, MAX_HEADER_VALUE_LEN, MAX_HEADERS_LEN, PRELUDE_LEN,
};

/// Wire type codes of header values.
pub(super) mod type_code {
    pub const TRUE: u8 = 0;
    pub const FALSE: u8 = 1;
    pub const BYTE: u8 = 2;
    pub const SHORT: u8 = 3;
    pub const INT: u8 = 4;
    pub const LONG: u8 = 5;
    pub const BYTES: u8 = 6;
    pub const STRING: u8 = 7;
    pub const TIMESTAMP: u8 = 8;
    pub const UUID: u8 = 9;
}

/// UTF-8 text held in a [`Bytes`], so that decoded header names and string values share the frame's
/// buffer instead of being copied.
///
/// Every constructor checks (or knows) that the bytes are UTF-8. [`StrBytes::as_str`] re-checks them
/// on each call because the crate forbids `unsafe`; for header-sized strings that is a few
/// nanoseconds.
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StrBytes(pub(super) Bytes);

impl StrBytes {
    /// Wraps a static string without copying it.
    pub const fn from_static(s: &'static str) -> Self {
        StrBytes(Bytes::from_static(s.as_bytes()))
    }

    /// Copies `s` into a new buffer.
    pub fn copy_from_str(s: &str) -> Self {
        StrBytes(Bytes::copy_from_slice(s.as_bytes()))
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        // The fallback is unreachable: every constructor guarantees UTF-8.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// The UTF-8 bytes.
    pub fn as_bytes(&self) -> &Bytes {
        &self.0
    }

    /// The UTF-8 bytes, by value.
    pub fn into_bytes(self) -> Bytes {
        self.0
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the string is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl TryFrom<Bytes> for StrBytes {
    type Error = Utf8Error;

    fn try_from(bytes: Bytes) -> Result<Self, Utf8Error> {
        std::str::from_utf8(&bytes)?;
        Ok(StrBytes(bytes))
    }
}

impl From<&'static str> for StrBytes {
    fn from(s: &'static str) -> Self {
        StrBytes::from_static(s)
    }
}

impl From<String> for StrBytes {
    fn from(s: String) -> Self {
        StrBytes(Bytes::from(s))
    }
}

impl From<StrBytes> for Bytes {
    fn from(s: StrBytes) -> Bytes {
        s.0
    }
}

impl fmt::Debug for StrBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for StrBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<str> for StrBytes {
    fn eq(&self, other: &str) -> bool {
        self.0 == other.as_bytes()
    }
}

impl PartialEq<&str> for StrBytes {
    fn eq(&self, other: &&str) -> bool {
        self.0 == other.as_bytes()
    }
}

/// A header value: one of the ten wire types (`true` and `false` are two types sharing `Bool`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum HeaderValue {
    /// Types 0 (true) and 1 (false); no value bytes.
    Bool(bool),
    /// Type 2: one signed byte.
    Byte(i8),
    /// Type 3: big-endian i16.
    Short(i16),
    /// Type 4: big-endian i32.
    Int(i32),
    /// Type 5: big-endian i64.
    Long(i64),
    /// Type 6: u16 length + bytes (at most 32767).
    ByteArray(Bytes),
    /// Type 7: u16 length + UTF-8 (at most 32767 bytes).
    String(StrBytes),
    /// Type 8: milliseconds since the Unix epoch, big-endian i64.
    Timestamp(i64),
    /// Type 9: 16 raw bytes.
    Uuid([u8; 16]),
}

impl HeaderValue {
    /// The type's name as the JSON dump shows it: "bool", "byte", "short", "int", "long", "bytes",
    /// "string", "timestamp" or "uuid".
    pub fn type_name(&self) -> &'static str {
        match self {
            HeaderValue::Bool(_) => "bool",
            HeaderValue::Byte(_) => "byte",
            HeaderValue::Short(_) => "short",
            HeaderValue::Int(_) => "int",
            HeaderValue::Long(_) => "long",
            HeaderValue::ByteArray(_) => "bytes",
            HeaderValue::String(_) => "string",
            HeaderValue::Timestamp(_) => "timestamp",
            HeaderValue::Uuid(_) => "uuid",
        }
    }

    /// The text of a `String` value; `None` for every other type.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            HeaderValue::String(s) => Some(s.as_str()),
            _ => None,
        }
    }

    /// The wire type code (0..=9).
    pub fn type_code(&self) -> u8 {
        match self {
            HeaderValue::Bool(true) => type_code::TRUE,
            HeaderValue::Bool(false) => type_code::FALSE,
            HeaderValue::Byte(_) => type_code::BYTE,
            HeaderValue::Short(_) => type_code::SHORT,
            HeaderValue::Int(_) => type_code::INT,
            HeaderValue::Long(_) => type_code::LONG,
            HeaderValue::ByteArray(_) => type_code::BYTES,
            HeaderValue::String(_) => type_code::STRING,
            HeaderValue::Timestamp(_) => type_code::TIMESTAMP,
            HeaderValue::Uuid(_) => type_code::UUID,
        }
    }

    /// Bytes the value takes on the wire after its type byte.
    fn wire_len(&self) -> usize {
        match self {
            HeaderValue::Bool(_) => 0,
            HeaderValue::Byte(_) => 1,
            HeaderValue::Short(_) => 2,
            HeaderValue::Int(_) => 4,
            HeaderValue::Long(_) | HeaderValue::Timestamp(_) => 8,
            HeaderValue::ByteArray(b) => 2 + b.len(),
            HeaderValue::String(s) => 2 + s.len(),
            HeaderValue::Uuid(_) => 16,
        }
    }

    /// Length of a variable-length value, if this is one.
    fn var_len(&self) -> Option<usize> {
        match self {
            HeaderValue::ByteArray(b) => Some(b.len()),
            HeaderValue::String(s) => Some(s.len()),
            _ => None,
        }
    }
}

impl From<bool> for HeaderValue {
    fn from(v: bool) -> Self {
        HeaderValue::Bool(v)
    }
}

impl From<i8> for HeaderValue {
    fn from(v: i8) -> Self {
        HeaderValue::Byte(v)
    }
}

impl From<i16> for HeaderValue {
    fn from(v: i16) -> Self {
        HeaderValue::Short(v)
    }
}

impl From<i32> for HeaderValue {
    fn from(v: i32) -> Self {
        HeaderValue::Int(v)
    }
}

impl From<i64> for HeaderValue {
    fn from(v: i64) -> Self {
        HeaderValue::Long(v)
    }
}

impl From<Bytes> for HeaderValue {
    fn from(v: Bytes) -> Self {
        HeaderValue::ByteArray(v)
    }
}

impl From<StrBytes> for HeaderValue {
    fn from(v: StrBytes) -> Self {
        HeaderValue::String(v)
    }
}

impl From<&'static str> for HeaderValue {
    fn from(v: &'static str) -> Self {
        HeaderValue::String(StrBytes::from_static(v))
    }
}

impl From<String> for HeaderValue {
    fn from(v: String) -> Self {
        HeaderValue::String(StrBytes::from(v))
    }
}

/// One header: a name (1..=255 bytes of UTF-8, unique within its frame) and a typed value.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Header {
    pub name: StrBytes,
    pub value: HeaderValue,
}

impl Header {
    /// A header from anything convertible into a name and a value.
    pub fn new(name: impl Into<StrBytes>, value: impl Into<HeaderValue>) -> Self {
        Header { name: name.into(), value: value.into() }
    }
}

/// Whether `name` equals the name of one of `previous`, the headers before it in the same frame.
///
/// Call it for every header in order with the same `seen`: up to 16 headers it compares linearly
/// (no allocation, the common case); past that it keeps a hash set so that a frame packed with
/// thousands of tiny headers costs linear time, not quadratic.
pub(super) fn is_duplicate(seen: &mut Option<HashSet<Bytes>>, previous: &[Header], name: &Bytes) -> bool {
    const LINEAR_MAX: usize = 16;
    if previous.len() < LINEAR_MAX {
        return previous.iter().any(|h| h.name.as_bytes() == name);
    }
    let set = seen.get_or_insert_with(|| previous.iter().map(|h| h.name.as_bytes().clone()).collect());
    !set.insert(name.clone())
}

/// One event-stream message: ordered headers and a payload.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Frame {
    pub headers: Vec<Header>,
    pub payload: Bytes,
}

/// Why a frame could not be encoded. Nothing is written when encoding fails.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("header name is empty")]
    EmptyHeaderName,
    #[error("header name of {len} bytes is longer than 255 bytes")]
    HeaderNameTooLong { len: usize },
    #[error("value of header {name:?} is {len} bytes, more than 32767")]
    HeaderValueTooLong { name: String, len: usize },
    #[error("header {name:?} appears more than once")]
    DuplicateHeader { name: String },
    #[error("headers take {len} bytes, more than the 131072 the format allows")]
    HeadersTooLong { len: usize },
    #[error("frame would be {len} bytes, more than the {max}-byte limit")]
    FrameTooLarge { len: usize, max: usize },
}

impl Frame {
    /// An empty frame: no headers, empty payload.
    pub fn new() -> Self {
        Frame::default()
    }

    /// Adds a header (builder style).
    pub fn with_header(mut self, name: impl Into<StrBytes>, value: impl Into<HeaderValue>) -> Self {
        self.headers.push(Header::new(name, value));
        self
    }

    /// Sets the payload (builder style).
    pub fn with_payload(mut self, payload: impl Into<Bytes>) -> Self {
        self.payload = payload.into();
        self
    }

    /// The value of the first header named `name`.
    pub fn header(&self, name: &str) -> Option<&HeaderValue> {
        let name = name.as_bytes();
        self.headers.iter().find(|h| h.name.as_bytes() == name).map(|h| &h.value)
    }

    /// The text of the header named `name`, if it is a string header.
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.header(name).and_then(HeaderValue::as_str)
    }

    /// Validates the headers and returns (headers length, total frame length).
    fn encoded_lens(&self) -> Result<(usize, usize), EncodeError> {
        let mut headers_len = 0usize;
        let mut seen = None;
        for (i, h) in self.headers.iter().enumerate() {
            let name = h.name.as_bytes();
            if name.is_empty() {
                return Err(EncodeError::EmptyHeaderName);
            }
            if name.len() > MAX_HEADER_NAME_LEN {
                return Err(EncodeError::HeaderNameTooLong { len: name.len() });
            }
            if let Some(len) = h.value.var_len()
                && len > MAX_HEADER_VALUE_LEN
            {
                return Err(EncodeError::HeaderValueTooLong { name: h.name.to_string(), len });
            }
            headers_len = headers_len.saturating_add(2 + name.len() + h.value.wire_len());
            if headers_len > MAX_HEADERS_LEN {
                return Err(EncodeError::HeadersTooLong { len: headers_len });
            }
            if is_duplicate(&mut seen, &self.headers[..i], name) {
                return Err(EncodeError::DuplicateHeader { name: h.name.to_string() });
            }
        }
        let total = (PRELUDE_LEN + CRC_LEN + headers_len).saturating_add(self.payload.len());
        if total > DEFAULT_MAX_FRAME_LEN {
            return Err(EncodeError::FrameTooLarge { len: total, max: DEFAULT_MAX_FRAME_LEN });
        }
        Ok((headers_len, total))
    }

    /// Appends the encoded frame to `out`. On error `out` is left unchanged.
    ///
    /// Rejects empty names, names over 255 bytes, string or byte-array values over 32767 bytes,
    /// duplicate names, a headers section over 128 KiB and frames larger than
    /// [`DEFAULT_MAX_FRAME_LEN`] (what [`Decoder::new`](super::Decoder::new) accepts).
    pub fn encode(&self, out: &mut BytesMut) -> Result<(), EncodeError> {
        let (headers_len, total) = self.encoded_lens()?;
        out.reserve(total);
        let start = out.len();
        // Both fit in u32: total ≤ DEFAULT_MAX_FRAME_LEN.
        out.put_u32(total as u32);
        out.put_u32(headers_len as u32);
        let prelude_crc = crc32fast::hash(&out[start..start + 8]);
        out.put_u32(prelude_crc);
        for h in &self.headers {
            out.put_u8(h.name.len() as u8);
            out.put_slice(h.name.as_bytes());
            out.put_u8(h.value.type_code());
            match &h.value {
                HeaderValue::Bool(_) => {}
                HeaderValue::Byte(v) => out.put_i8(*v),
                HeaderValue::Short(v) => out.put_i16(*v),
                HeaderValue::Int(v) => out.put_i32(*v),
                HeaderValue::Long(v) | HeaderValue::Timestamp(v) => out.put_i64(*v),
                HeaderValue::ByteArray(b) => {
                    out.put_u16(b.len() as u16);
                    out.put_slice(b);
                }
                HeaderValue::String(s) => {
                    out.put_u16(s.len() as u16);
                    out.put_slice(s.as_bytes());
                }
                HeaderValue::Uuid(u) => out.put_slice(u),
            }
        }
        out.put_slice(&self.payload);
        let mut hasher = crc32fast::Hasher::new_with_initial(prelude_crc);
        hasher.update(&out[start + 8..]);
        out.put_u32(hasher.finalize());
        Ok(())
    }

    /// The encoded frame as a new buffer.
    pub fn to_bytes(&self) -> Result<Bytes, EncodeError> {
        let mut out = BytesMut::new();
        self.encode(&mut out)?;
        Ok(out.freeze())
    }
}
