//! Operator view of a stream: frames as JSON lines.

use std::io::{self, Read, Write};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Value, json};

use super::decode::{DecodeError, Decoder};
use super::frame::{Frame, HeaderValue};

/// How many bytes [`dump`] reads at a time.
const READ_CHUNK: usize = 64 * 1024;

/// A frame as JSON: `{"headers": [{"name", "type", "value"}, …], "payload": …}` (see the module
/// documentation for how each type is shown).
pub fn frame_to_json(frame: &Frame) -> Value {
    let headers: Vec<Value> = frame
        .headers
        .iter()
        .map(|h| {
            json!({
                "name": h.name.as_str(),
                "type": h.value.type_name(),
                "value": value_to_json(&h.value),
            })
        })
        .collect();
    let payload = match std::str::from_utf8(&frame.payload) {
        Ok(text) => Value::String(text.to_owned()),
        Err(_) => json!({ "base64": BASE64.encode(&frame.payload) }),
    };
    json!({ "headers": headers, "payload": payload })
}

fn value_to_json(value: &HeaderValue) -> Value {
    match value {
        HeaderValue::Bool(v) => Value::Bool(*v),
        HeaderValue::Byte(v) => Value::from(*v),
        HeaderValue::Short(v) => Value::from(*v),
        HeaderValue::Int(v) => Value::from(*v),
        HeaderValue::Long(v) | HeaderValue::Timestamp(v) => Value::from(*v),
        HeaderValue::ByteArray(b) => Value::String(BASE64.encode(b)),
        HeaderValue::String(s) => Value::String(s.as_str().to_owned()),
        HeaderValue::Uuid(u) => Value::String(uuid_text(u)),
    }
}

/// Canonical lowercase hyphenated form: 8-4-4-4-12 hex digits.
fn uuid_text(u: &[u8; 16]) -> String {
    let hex = hex::encode(u);
    format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32])
}

/// Why [`dump`] stopped.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    /// The input is not a valid event stream (the message names the frame's offset and the
    /// reason). Frames before it have been written.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("reading input: {0}")]
    Read(io::Error),
    #[error("writing output: {0}")]
    Write(io::Error),
}

/// Decodes a whole event stream from `input`, writing one JSON object a line (see
/// [`frame_to_json`]) to `out` as frames complete (flushed after every read, so a live stream
/// shows as it arrives). Returns the number of frames.
pub fn dump(mut input: impl Read, out: impl Write) -> Result<usize, DumpError> {
    let mut out = io::BufWriter::new(out);
    let mut decoder = Decoder::new();
    let mut chunk = vec![0u8; READ_CHUNK];
    let mut count = 0usize;
    let result = loop {
        let n = match input.read(&mut chunk) {
            Ok(0) => break decoder.finish().map_err(DumpError::from),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => break Err(DumpError::Read(e)),
        };
        decoder.push(&chunk[..n]);
        if let Err(e) = write_frames(&mut decoder, &mut out, &mut count) {
            break Err(e);
        }
        if let Err(e) = out.flush() {
            break Err(DumpError::Write(e));
        }
    };
    // Whatever came before a failure is still worth showing.
    let flushed = out.flush().map_err(DumpError::Write);
    result?;
    flushed?;
    Ok(count)
}

fn write_frames(decoder: &mut Decoder, out: &mut impl Write, count: &mut usize) -> Result<(), DumpError> {
    while let Some(frame) = decoder.next_frame()? {
        serde_json::to_writer(&mut *out, &frame_to_json(&frame)).map_err(|e| DumpError::Write(e.into()))?;
        out.write_all(b"\n").map_err(DumpError::Write)?;
        *count += 1;
    }
    Ok(())
}
