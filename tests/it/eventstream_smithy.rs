//! Differential tests of the event-stream codec against smithy-rs (`aws-smithy-eventstream`):
//! random frames of every header type must encode to the same bytes and decode to the same values
//! in both, and random corruptions must be judged alike (valid or not).
//!
//! Known, deliberate differences: this decoder also rejects empty header names, repeated names and
//! string or byte-array values over 32767 bytes (the format forbids all three; smithy-rs accepts
//! them). The corruption test allows exactly those.

use std::collections::HashSet;

use amq2api::upstream::eventstream::{DecodeError, Decoder, Frame, Header, HeaderValue, StrBytes};
use aws_smithy_eventstream::frame::{DecodedFrame, MessageFrameDecoder, read_message_from, write_message_to};
use aws_smithy_types::DateTime;
use aws_smithy_types::event_stream::{Header as SmithyHeader, HeaderValue as SmithyValue, Message};
use bytes::{Buf, Bytes, BytesMut};
use proptest::collection::vec;
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------------
// Conversions

fn to_smithy(frame: &Frame) -> Message {
    let headers = frame
        .headers
        .iter()
        .map(|h| {
            let value = match &h.value {
                HeaderValue::Bool(v) => SmithyValue::Bool(*v),
                HeaderValue::Byte(v) => SmithyValue::Byte(*v),
                HeaderValue::Short(v) => SmithyValue::Int16(*v),
                HeaderValue::Int(v) => SmithyValue::Int32(*v),
                HeaderValue::Long(v) => SmithyValue::Int64(*v),
                HeaderValue::ByteArray(b) => SmithyValue::ByteArray(b.clone()),
                HeaderValue::String(s) => SmithyValue::String(s.as_str().to_owned().into()),
                HeaderValue::Timestamp(ms) => SmithyValue::Timestamp(DateTime::from_millis(*ms)),
                HeaderValue::Uuid(u) => SmithyValue::Uuid(u128::from_be_bytes(*u)),
            };
            SmithyHeader::new(h.name.as_str().to_owned(), value)
        })
        .collect();
    Message::new_from_parts(headers, frame.payload.clone())
}

fn from_smithy(message: &Message) -> Frame {
    let headers = message
        .headers()
        .iter()
        .map(|h| {
            let value = match h.value() {
                SmithyValue::Bool(v) => HeaderValue::Bool(*v),
                SmithyValue::Byte(v) => HeaderValue::Byte(*v),
                SmithyValue::Int16(v) => HeaderValue::Short(*v),
                SmithyValue::Int32(v) => HeaderValue::Int(*v),
                SmithyValue::Int64(v) => HeaderValue::Long(*v),
                SmithyValue::ByteArray(b) => HeaderValue::ByteArray(b.clone()),
                SmithyValue::String(s) => HeaderValue::String(StrBytes::copy_from_str(s.as_str())),
                SmithyValue::Timestamp(t) => HeaderValue::Timestamp(t.to_millis().unwrap()),
                SmithyValue::Uuid(u) => HeaderValue::Uuid(u.to_be_bytes()),
                other => panic!("unexpected smithy header value {other:?}"),
            };
            Header { name: StrBytes::copy_from_str(h.name().as_str()), value }
        })
        .collect();
    Frame { headers, payload: message.payload().clone() }
}

fn smithy_encode(frame: &Frame) -> Vec<u8> {
    let mut out = Vec::new();
    write_message_to(&to_smithy(frame), &mut out).expect("smithy encodes");
    out
}

/// smithy-rs's verdict on `bytes` as exactly one frame.
fn smithy_decode_one(bytes: &[u8]) -> Option<Frame> {
    let mut buf = Bytes::copy_from_slice(bytes);
    let message = read_message_from(&mut buf).ok()?;
    (!buf.has_remaining()).then(|| from_smithy(&message))
}

/// Our verdict on `bytes` as exactly one frame (empty input counts as truncated).
fn our_decode_one(bytes: &[u8]) -> Result<Frame, DecodeError> {
    let mut decoder = Decoder::new();
    decoder.push(bytes);
    let frame = decoder.next_frame()?;
    decoder.finish()?;
    frame.ok_or(DecodeError::Truncated { offset: 0, buffered: 0 })
}

// ---------------------------------------------------------------------------------------------
// Strategies

fn header_value() -> impl Strategy<Value = HeaderValue> {
    prop_oneof![
        any::<bool>().prop_map(HeaderValue::Bool),
        any::<i8>().prop_map(HeaderValue::Byte),
        any::<i16>().prop_map(HeaderValue::Short),
        any::<i32>().prop_map(HeaderValue::Int),
        any::<i64>().prop_map(HeaderValue::Long),
        vec(any::<u8>(), 0..48).prop_map(|v| HeaderValue::ByteArray(v.into())),
        prop_oneof!["[ -~]{0,40}", "\\PC{0,12}", Just("application/json".to_owned())]
            .prop_map(|s| HeaderValue::String(s.into())),
        any::<i64>().prop_map(HeaderValue::Timestamp),
        any::<[u8; 16]>().prop_map(HeaderValue::Uuid),
    ]
}

fn header_name() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => "[a-zA-Z0-9:_-]{1,24}",
        2 => "\\PC{1,10}",
        1 => "[a-z]{250,255}",
    ]
}

fn frame() -> impl Strategy<Value = Frame> {
    let payload =
        prop_oneof![vec(any::<u8>(), 0..300).prop_map(Bytes::from), "\\PC{0,100}".prop_map(Bytes::from),];
    (vec((header_name(), header_value()), 0..14), payload).prop_map(|(headers, payload)| {
        let mut seen = HashSet::new();
        let headers = headers
            .into_iter()
            .filter(|(name, _)| seen.insert(name.clone()))
            .map(|(name, value)| Header::new(name, value))
            .collect();
        Frame { headers, payload }
    })
}

#[derive(Clone, Debug)]
enum Corruption {
    /// XOR one byte; CRCs left alone.
    Flip { index: prop::sample::Index, xor: u8 },
    /// Keep only the first `len` bytes.
    Truncate { index: prop::sample::Index },
    /// Replace the total length, recomputing the prelude CRC.
    TotalLen { value: u32 },
    /// Move the total length by a little, recomputing the prelude CRC.
    TotalLenBy { delta: i8 },
    /// Replace the headers length, recomputing both CRCs.
    HeadersLen { value: u32 },
    /// Move the headers length by a little, recomputing both CRCs.
    HeadersLenBy { delta: i8 },
    /// Change a byte in the headers section, recomputing both CRCs, so that the header parsers
    /// (not the checksums) judge it.
    HeaderByte { index: prop::sample::Index, value: u8 },
}

fn corruption() -> impl Strategy<Value = Corruption> {
    prop_oneof![
        1 => (any::<prop::sample::Index>(), 1u8..=255)
            .prop_map(|(index, xor)| Corruption::Flip { index, xor }),
        1 => any::<prop::sample::Index>().prop_map(|index| Corruption::Truncate { index }),
        1 => any::<u32>().prop_map(|value| Corruption::TotalLen { value }),
        1 => any::<i8>().prop_map(|delta| Corruption::TotalLenBy { delta }),
        1 => any::<u32>().prop_map(|value| Corruption::HeadersLen { value }),
        1 => any::<i8>().prop_map(|delta| Corruption::HeadersLenBy { delta }),
        3 => (any::<prop::sample::Index>(), any::<u8>())
            .prop_map(|(index, value)| Corruption::HeaderByte { index, value }),
    ]
}

fn fix_prelude_crc(b: &mut [u8]) {
    let crc = crc32fast::hash(&b[..8]);
    b[8..12].copy_from_slice(&crc.to_be_bytes());
}

fn fix_message_crc(b: &mut [u8]) {
    let n = b.len();
    let crc = crc32fast::hash(&b[..n - 4]);
    b[n - 4..].copy_from_slice(&crc.to_be_bytes());
}

fn apply(bytes: &mut Vec<u8>, c: &Corruption) {
    let get = |b: &[u8], at: usize| u32::from_be_bytes(b[at..at + 4].try_into().unwrap());
    match c {
        Corruption::Flip { index, xor } => {
            let i = index.index(bytes.len());
            bytes[i] ^= xor;
        }
        Corruption::Truncate { index } => bytes.truncate(index.index(bytes.len())),
        Corruption::TotalLen { value } => {
            bytes[0..4].copy_from_slice(&value.to_be_bytes());
            fix_prelude_crc(bytes);
        }
        Corruption::TotalLenBy { delta } => {
            let v = get(bytes, 0).wrapping_add_signed(i32::from(*delta));
            bytes[0..4].copy_from_slice(&v.to_be_bytes());
            fix_prelude_crc(bytes);
        }
        Corruption::HeadersLen { value } => {
            bytes[4..8].copy_from_slice(&value.to_be_bytes());
            fix_prelude_crc(bytes);
            fix_message_crc(bytes);
        }
        Corruption::HeadersLenBy { delta } => {
            let v = get(bytes, 4).wrapping_add_signed(i32::from(*delta));
            bytes[4..8].copy_from_slice(&v.to_be_bytes());
            fix_prelude_crc(bytes);
            fix_message_crc(bytes);
        }
        Corruption::HeaderByte { index, value } => {
            let headers_len = get(bytes, 4) as usize;
            if headers_len > 0 && 12 + headers_len <= bytes.len() - 4 {
                bytes[12 + index.index(headers_len)] = *value;
                fix_message_crc(bytes);
            }
        }
    }
}

proptest! {
    // 1024 cases by default (about a second in a debug build); PROPTEST_CASES overrides.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(1024),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Both encoders give the same bytes; each decoder reads the other's output back exactly.
    #[test]
    fn encoders_and_decoders_agree(frame in frame()) {
        let ours = frame.to_bytes().unwrap();
        let theirs = smithy_encode(&frame);
        prop_assert_eq!(&ours[..], &theirs[..]);
        prop_assert_eq!(smithy_decode_one(&ours), Some(frame.clone()));
        prop_assert_eq!(our_decode_one(&theirs), Ok(frame));
    }

    /// A stream of frames cut into chunks: our decoder and smithy-rs's `MessageFrameDecoder` give
    /// the same frames.
    #[test]
    fn streams_agree(frames in vec(frame(), 1..8), chunk in 1usize..400) {
        let stream: Vec<u8> = frames.iter().flat_map(smithy_encode).collect();

        let mut smithy = MessageFrameDecoder::new();
        let mut buf = BytesMut::new();
        let mut theirs = Vec::new();
        let mut ours = Vec::new();
        let mut decoder = Decoder::new();
        for piece in stream.chunks(chunk) {
            buf.extend_from_slice(piece);
            while let DecodedFrame::Complete(m) = smithy.decode_frame(&mut buf).unwrap() {
                theirs.push(from_smithy(&m));
            }
            decoder.push_bytes(Bytes::copy_from_slice(piece));
            while let Some(f) = decoder.next_frame().unwrap() {
                ours.push(f);
            }
        }
        decoder.finish().unwrap();
        prop_assert_eq!(&theirs, &frames);
        prop_assert_eq!(&ours, &frames);
    }

    /// After a corruption both decoders agree whether the bytes are one valid frame, and on its
    /// contents when it is.
    #[test]
    fn corruptions_are_judged_alike(frame in frame(), corruptions in vec(corruption(), 1..3)) {
        let mut bytes = frame.to_bytes().unwrap().to_vec();
        for c in &corruptions {
            if bytes.len() >= 16 {
                apply(&mut bytes, c);
            }
        }
        let theirs = smithy_decode_one(&bytes);
        let ours = our_decode_one(&bytes);
        match (&ours, &theirs) {
            (Ok(a), Some(b)) => prop_assert_eq!(a, b),
            (Err(_), None) => {}
            // Stricter than smithy-rs by design.
            (
                Err(
                    DecodeError::EmptyHeaderName { .. }
                    | DecodeError::DuplicateHeader { .. }
                    | DecodeError::HeaderValueTooLong { .. },
                ),
                Some(_),
            ) => {}
            _ => prop_assert!(false, "disagree: ours {:?}, smithy {:?}", ours, theirs),
        }
        // Whatever the bytes, decoding them one at a time gives the same verdict.
        let mut decoder = Decoder::new();
        let mut frames = Vec::new();
        let mut failed = false;
        for b in &bytes {
            decoder.push(std::slice::from_ref(b));
            match decoder.next_frame() {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => {}
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        let byte_by_byte = if !failed && decoder.finish().is_ok() && frames.len() == 1 {
            frames.pop()
        } else {
            None
        };
        prop_assert_eq!(byte_by_byte, ours.ok());
    }
}
