//! The streaming frame decoder and its errors.

use bytes::{Buf, Bytes, BytesMut};

use super::frame::{Frame, Header, HeaderValue, StrBytes, is_duplicate, type_code};
use super::{
    CRC_LEN, DEFAULT_MAX_FRAME_LEN, MAX_HEADER_VALUE_LEN, MAX_HEADERS_LEN, MIN_FRAME_LEN, PRELUDE_LEN,
};

/// Why the stream could not be decoded. Every variant carries `offset`, the byte offset in the
/// stream where the offending frame starts; header errors also carry `at`, the header's byte
/// offset within that frame.
///
/// In the checksum variants `expected` is the CRC computed from the bytes received and `actual`
/// the one the frame carries.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error(
        "frame at byte offset {offset}: prelude checksum mismatch (expected {expected:#010x}, got {actual:#010x})"
    )]
    PreludeChecksumMismatch { offset: u64, expected: u32, actual: u32 },
    #[error(
        "frame at byte offset {offset}: message checksum mismatch (expected {expected:#010x}, got {actual:#010x})"
    )]
    MessageChecksumMismatch { offset: u64, expected: u32, actual: u32 },
    #[error("frame at byte offset {offset}: total length {total_len} is less than the 16-byte minimum")]
    FrameTooShort { offset: u64, total_len: u32 },
    #[error("frame at byte offset {offset}: total length {total_len} is over the {max}-byte limit")]
    FrameTooLarge { offset: u64, total_len: u32, max: usize },
    #[error(
        "frame at byte offset {offset}: headers length {headers_len} does not fit in a frame of {total_len} bytes"
    )]
    HeadersLengthTooLong { offset: u64, headers_len: u32, total_len: u32 },
    #[error(
        "frame at byte offset {offset}: headers length {headers_len} is over the format's {max}-byte limit"
    )]
    HeadersTooLarge { offset: u64, headers_len: u32, max: usize },
    #[error("frame at byte offset {offset}: header at frame byte {at} has an empty name")]
    EmptyHeaderName { offset: u64, at: usize },
    #[error(
        "frame at byte offset {offset}: header at frame byte {at} runs past the end of the headers section"
    )]
    HeaderOverrun { offset: u64, at: usize },
    #[error("frame at byte offset {offset}: header at frame byte {at} has unknown value type {type_code}")]
    UnknownHeaderType { offset: u64, at: usize, type_code: u8 },
    #[error(
        "frame at byte offset {offset}: header at frame byte {at} has a value of {len} bytes, over the format's 32767-byte limit"
    )]
    HeaderValueTooLong { offset: u64, at: usize, len: usize },
    #[error("frame at byte offset {offset}: header at frame byte {at}: {what} is not UTF-8")]
    InvalidUtf8 { offset: u64, at: usize, what: &'static str },
    #[error("frame at byte offset {offset}: header {name:?} at frame byte {at} repeats a name")]
    DuplicateHeader { offset: u64, at: usize, name: String },
    #[error(
        "frame at byte offset {offset}: truncated: {buffered} bytes of an incomplete frame at end of input"
    )]
    Truncated { offset: u64, buffered: usize },
}

impl DecodeError {
    /// Byte offset in the stream of the frame the error is about.
    pub fn offset(&self) -> u64 {
        match *self {
            DecodeError::PreludeChecksumMismatch { offset, .. }
            | DecodeError::MessageChecksumMismatch { offset, .. }
            | DecodeError::FrameTooShort { offset, .. }
            | DecodeError::FrameTooLarge { offset, .. }
            | DecodeError::HeadersLengthTooLong { offset, .. }
            | DecodeError::HeadersTooLarge { offset, .. }
            | DecodeError::EmptyHeaderName { offset, .. }
            | DecodeError::HeaderOverrun { offset, .. }
            | DecodeError::UnknownHeaderType { offset, .. }
            | DecodeError::HeaderValueTooLong { offset, .. }
            | DecodeError::InvalidUtf8 { offset, .. }
            | DecodeError::DuplicateHeader { offset, .. }
            | DecodeError::Truncated { offset, .. } => offset,
        }
    }
}

/// A validated prelude: the lengths of the frame being decoded.
#[derive(Clone, Copy, Debug)]
struct Prelude {
    total: usize,
    headers_len: usize,
}

/// Incremental decoder: push bytes as they arrive, pull whole frames.
///
/// The bytes not yet decoded are `buf` followed by `pending`. `pending` is the last chunk given to
/// [`Decoder::push_bytes`]; frames lying wholly inside it are sliced out without copying. `buf`
/// collects what [`Decoder::push`] copies in, and the start of a frame that straddles chunks (only
/// the bytes that frame needs are moved into it).
#[derive(Debug)]
pub struct Decoder {
    buf: BytesMut,
    pending: Bytes,
    /// The prelude of the frame at `offset`, once its 12 bytes have arrived and passed the checks.
    prelude: Option<Prelude>,
    offset: u64,
    max_frame_len: usize,
    /// Set by the first error, returned by every later call.
    poisoned: Option<DecodeError>,
    /// A fresh CRC-32 state, cloned for each checksum (saves the CPU-feature detection that
    /// `Hasher::new` does every time).
    crc: crc32fast::Hasher,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new()
    }
}

impl Decoder {
    /// A decoder that accepts frames up to [`DEFAULT_MAX_FRAME_LEN`] (16 MiB).
    pub fn new() -> Self {
        Decoder::with_max_frame_len(DEFAULT_MAX_FRAME_LEN)
    }

    /// A decoder that refuses frames whose total length exceeds `max` bytes.
    pub fn with_max_frame_len(max: usize) -> Self {
        Decoder {
            buf: BytesMut::new(),
            pending: Bytes::new(),
            prelude: None,
            offset: 0,
            max_frame_len: max,
            poisoned: None,
            crc: crc32fast::Hasher::new(),
        }
    }

    /// The largest total frame length accepted.
    pub fn max_frame_len(&self) -> usize {
        self.max_frame_len
    }

    /// Appends bytes from the stream (copying them). Ignored once the decoder has failed.
    pub fn push(&mut self, chunk: &[u8]) {
        if self.poisoned.is_some() || chunk.is_empty() {
            return;
        }
        if !self.pending.is_empty() {
            let pending = std::mem::take(&mut self.pending);
            self.buf.extend_from_slice(&pending);
        }
        self.buf.extend_from_slice(chunk);
    }

    /// Appends bytes from the stream without copying them: frames that lie wholly inside `chunk`
    /// are slices of it. (Such a frame keeps the whole chunk alive while any part of it is held.)
    /// Ignored once the decoder has failed.
    pub fn push_bytes(&mut self, chunk: Bytes) {
        if self.poisoned.is_some() || chunk.is_empty() {
            return;
        }
        if !self.pending.is_empty() {
            let pending = std::mem::replace(&mut self.pending, chunk);
            self.buf.extend_from_slice(&pending);
        } else {
            self.pending = chunk;
        }
    }

    /// Byte offset in the stream of the frame being decoded (the next one to come out, or the one
    /// an error was about).
    pub fn frame_offset(&self) -> u64 {
        self.offset
    }

    /// Bytes received but not yet returned as frames.
    pub fn buffered_len(&self) -> usize {
        self.buf.len() + self.pending.len()
    }

    /// The next whole frame, `Ok(None)` when more bytes are needed. After an error the stream is
    /// over: every later call returns the same error.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, DecodeError> {
        if let Some(err) = &self.poisoned {
            return Err(err.clone());
        }
        match self.decode_next() {
            Ok(frame) => Ok(frame),
            Err(err) => {
                self.buf = BytesMut::new();
                self.pending = Bytes::new();
                self.prelude = None;
                self.poisoned = Some(err.clone());
                Err(err)
            }
        }
    }

    /// Call at the end of input: `Err(Truncated)` if part of a frame is still buffered, or the
    /// error that already ended the stream.
    pub fn finish(&self) -> Result<(), DecodeError> {
        if let Some(err) = &self.poisoned {
            return Err(err.clone());
        }
        match self.buffered_len() {
            0 => Ok(()),
            buffered => Err(DecodeError::Truncated { offset: self.offset, buffered }),
        }
    }

    fn decode_next(&mut self) -> Result<Option<Frame>, DecodeError> {
        let prelude = match self.prelude {
            Some(prelude) => prelude,
            None => {
                let prelude = if self.buf.is_empty() && self.pending.len() >= PRELUDE_LEN {
                    self.check_prelude(&self.pending[..PRELUDE_LEN])?
                } else {
                    self.fill_buf(PRELUDE_LEN);
                    if self.buf.len() < PRELUDE_LEN {
                        return Ok(None);
                    }
                    self.check_prelude(&self.buf[..PRELUDE_LEN])?
                };
                self.prelude = Some(prelude);
                prelude
            }
        };
        let bytes = if self.buf.is_empty() && self.pending.len() >= prelude.total {
            self.pending.split_to(prelude.total)
        } else {
            self.fill_buf(prelude.total);
            if self.buf.len() < prelude.total {
                return Ok(None);
            }
            self.buf.split_to(prelude.total).freeze()
        };
        self.prelude = None;
        let frame = parse_frame(bytes, prelude, self.offset, self.crc.clone())?;
        self.offset += prelude.total as u64;
        Ok(Some(frame))
    }

    /// Moves bytes from `pending` to `buf` until `buf` holds `want` bytes or `pending` is empty.
    fn fill_buf(&mut self, want: usize) {
        if self.buf.len() >= want || self.pending.is_empty() {
            return;
        }
        let n = (want - self.buf.len()).min(self.pending.len());
        self.buf.extend_from_slice(&self.pending[..n]);
        self.pending.advance(n);
    }

    /// Checks the 12 prelude bytes: CRC first, then lengths, all before any of the body is
    /// buffered.
    fn check_prelude(&self, p: &[u8]) -> Result<Prelude, DecodeError> {
        let offset = self.offset;
        let (total_len, headers_len, actual) = (be_u32(p, 0), be_u32(p, 4), be_u32(p, 8));
        let mut crc = self.crc.clone();
        crc.update(p.get(..8).unwrap_or_default());
        let expected = crc.finalize();
        if expected != actual {
            return Err(DecodeError::PreludeChecksumMismatch { offset, expected, actual });
        }
        let total = total_len as usize;
        if total < MIN_FRAME_LEN {
            return Err(DecodeError::FrameTooShort { offset, total_len });
        }
        if total > self.max_frame_len {
            return Err(DecodeError::FrameTooLarge { offset, total_len, max: self.max_frame_len });
        }
        if headers_len > total_len - MIN_FRAME_LEN as u32 {
            return Err(DecodeError::HeadersLengthTooLong { offset, headers_len, total_len });
        }
        if headers_len as usize > MAX_HEADERS_LEN {
            return Err(DecodeError::HeadersTooLarge { offset, headers_len, max: MAX_HEADERS_LEN });
        }
        Ok(Prelude { total, headers_len: headers_len as usize })
    }
}

/// The big-endian u32 at `at`, 0 if out of range (callers pass in-range offsets).
fn be_u32(data: &[u8], at: usize) -> u32 {
    data.get(at..at + 4).and_then(|b| b.try_into().ok()).map_or(0, u32::from_be_bytes)
}

/// Decodes a whole frame whose prelude has been checked: message CRC, then headers. `crc` is a
/// fresh CRC-32 state.
fn parse_frame(
    mut bytes: Bytes,
    prelude: Prelude,
    offset: u64,
    mut crc: crc32fast::Hasher,
) -> Result<Frame, DecodeError> {
    let data: &[u8] = &bytes;
    let crc_at = prelude.total - CRC_LEN;
    let actual = be_u32(data, crc_at);
    crc.update(data.get(..crc_at).unwrap_or_default());
    let expected = crc.finalize();
    if expected != actual {
        return Err(DecodeError::MessageChecksumMismatch { offset, expected, actual });
    }
    let headers_end = PRELUDE_LEN + prelude.headers_len;
    let headers = parse_headers(&bytes, headers_end, offset)?;
    // The payload takes over the frame's own reference to the buffer (no reference-count
    // traffic). headers_end ≤ crc_at = len - 4: checked with the prelude.
    bytes.truncate(crc_at);
    bytes.advance(headers_end);
    Ok(Frame { headers, payload: bytes })
}

/// Header names and string values found in nearly every Amazon Q frame. Decoding one of these
/// gives a static string: no reference to the frame's buffer to count, no UTF-8 check. (Cloning
/// and dropping a slice of a shared buffer is an atomic operation each way; for a typical frame
/// that was over a third of the decoding time.)
const WELL_KNOWN: &[&str] = &[
    ":message-type",
    ":event-type",
    ":content-type",
    ":exception-type",
    ":error-code",
    ":error-message",
    "event",
    "exception",
    "error",
    "application/json",
    "assistantResponseEvent",
    "toolUseEvent",
    "reasoningContentEvent",
    "messageMetadataEvent",
    "metadataEvent",
    "meteringEvent",
    "contextUsageEvent",
    "codeReferenceEvent",
    "citationEvent",
    "supplementaryWebLinksEvent",
    "followupPromptEvent",
    "invalidStateEvent",
    "intentsEvent",
    "initial-response",
];

/// `bytes[range]` as UTF-8: a static string when it is a [`WELL_KNOWN`] one, else a checked slice
/// of `bytes`. `None` if it is not UTF-8. `range` must lie within `bytes`.
#[inline(always)]
fn utf8_bytes(bytes: &Bytes, range: std::ops::Range<usize>) -> Option<Bytes> {
    let raw = bytes.get(range.clone())?;
    if let Some(known) = WELL_KNOWN.iter().find(|k| k.as_bytes() == raw) {
        return Some(Bytes::from_static(known.as_bytes()));
    }
    std::str::from_utf8(raw).ok()?;
    Some(bytes.slice(range))
}

/// The next `N` bytes of the headers section (which ends at `end`), advancing `pos`.
#[inline(always)]
fn take<const N: usize>(data: &[u8], pos: &mut usize, end: usize) -> Option<[u8; N]> {
    if end - *pos < N {
        return None;
    }
    let value = data.get(*pos..*pos + N)?.try_into().ok()?;
    *pos += N;
    Some(value)
}

/// Decodes the headers in `bytes[12..end]`; names and variable-length values are slices of `bytes`
/// (or static strings, see [`WELL_KNOWN`]).
fn parse_headers(bytes: &Bytes, end: usize, offset: u64) -> Result<Vec<Header>, DecodeError> {
    let data = bytes.get(..end).unwrap_or_default();
    let end = data.len();
    let mut pos = PRELUDE_LEN;
    if pos >= end {
        return Ok(Vec::new());
    }
    let mut headers = Vec::with_capacity(((end - pos) / 24).clamp(1, 8));
    let mut seen = None;
    while pos < end {
        let at = pos;
        let overrun = || DecodeError::HeaderOverrun { offset, at };
        let name_len = usize::from(data[pos]);
        if name_len == 0 {
            return Err(DecodeError::EmptyHeaderName { offset, at });
        }
        let name_start = pos + 1;
        let type_at = name_start + name_len;
        // The name and the type byte must both lie inside the headers section.
        if type_at >= end {
            return Err(overrun());
        }
        let name = utf8_bytes(bytes, name_start..type_at).ok_or(DecodeError::InvalidUtf8 {
            offset,
            at,
            what: "header name",
        })?;
        if is_duplicate(&mut seen, &headers, &name) {
            return Err(DecodeError::DuplicateHeader {
                offset,
                at,
                name: String::from_utf8_lossy(&name).into_owned(),
            });
        }
        let type_code = data[type_at];
        pos = type_at + 1;
        let value = match type_code {
            type_code::TRUE => HeaderValue::Bool(true),
            type_code::FALSE => HeaderValue::Bool(false),
            type_code::BYTE => {
                HeaderValue::Byte(i8::from_be_bytes(take(data, &mut pos, end).ok_or_else(overrun)?))
            }
            type_code::SHORT => {
                HeaderValue::Short(i16::from_be_bytes(take(data, &mut pos, end).ok_or_else(overrun)?))
            }
            type_code::INT => {
                HeaderValue::Int(i32::from_be_bytes(take(data, &mut pos, end).ok_or_else(overrun)?))
            }
            type_code::LONG => {
                HeaderValue::Long(i64::from_be_bytes(take(data, &mut pos, end).ok_or_else(overrun)?))
            }
            type_code::TIMESTAMP => {
                HeaderValue::Timestamp(i64::from_be_bytes(take(data, &mut pos, end).ok_or_else(overrun)?))
            }
            type_code::UUID => HeaderValue::Uuid(take(data, &mut pos, end).ok_or_else(overrun)?),
            type_code::BYTES | type_code::STRING => {
                let len = usize::from(u16::from_be_bytes(take(data, &mut pos, end).ok_or_else(overrun)?));
                if end - pos < len {
                    return Err(overrun());
                }
                // The u16 field could say more, but the format (and every encoder, this one
                // included) stops at i16::MAX: a longer value could not be re-encoded.
                if len > MAX_HEADER_VALUE_LEN {
                    return Err(DecodeError::HeaderValueTooLong { offset, at, len });
                }
                let range = pos..pos + len;
                pos += len;
                if type_code == type_code::BYTES {
                    HeaderValue::ByteArray(bytes.slice(range))
                } else {
                    let value = utf8_bytes(bytes, range).ok_or(DecodeError::InvalidUtf8 {
                        offset,
                        at,
                        what: "string value",
                    })?;
                    HeaderValue::String(StrBytes(value))
                }
            }
            _ => {
                return Err(DecodeError::UnknownHeaderType { offset, at, type_code });
            }
        };
        headers.push(Header { name: StrBytes(name), value });
    }
    Ok(headers)
}
