//! Arbitrary bytes through the event-stream `Decoder`, cut into chunks whose size the input
//! chooses; every decoded frame must re-encode to exactly its own bytes and decode back equal.
//!
//! Input layout: byte 0 is a control byte, the rest is the stream.
//!
//! - bits 0..=5: chunk size (0 = the whole stream in one chunk);
//! - bit 6: feed with `push` (copying) instead of `push_bytes`;
//! - bit 7: before decoding, fix up the prelude and message CRCs of every frame the length
//!   fields delimit, so that mutations reach the length checks and the header parser instead
//!   of dying at the checksums (the raw mode, bit 7 clear, still fuzzes the checksums).
//!
//! Checks, besides "never panics":
//! - the frames and the verdict do not depend on the chunking (compared with one big push);
//! - after an error, `next_frame` and `finish` repeat it;
//! - the encodings of the decoded frames, concatenated, are exactly the stream's first bytes
//!   (the format is canonical), each decodes back to an equal frame, and the error's offset
//!   is where they end.
#![no_main]

use amq2api::upstream::eventstream::{DecodeError, Decoder, Frame};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

/// Recomputes both CRCs of every whole frame in `buf`, walking the total-length fields.
fn fix_crcs(buf: &mut [u8]) {
    let mut pos = 0usize;
    while buf.len() - pos >= 12 {
        let p = &mut buf[pos..];
        let crc = crc32(&p[..8]);
        p[8..12].copy_from_slice(&crc.to_be_bytes());
        let total = u32::from_be_bytes(p[..4].try_into().unwrap()) as usize;
        if total < 16 || total > p.len() {
            return;
        }
        let crc = crc32(&p[..total - 4]);
        p[total - 4..total].copy_from_slice(&crc.to_be_bytes());
        pos += total;
    }
}

/// CRC-32 (IEEE), bitwise: the harness must not share code with the decoder it checks.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// Decodes `stream` fed in `chunk`-byte pieces: the frames, then the error that ended the stream
/// (or `finish`'s verdict).
fn decode(stream: &[u8], chunk: usize, copy: bool) -> (Vec<Frame>, Result<(), DecodeError>) {
    let mut dec = Decoder::new();
    let mut frames = Vec::new();
    for piece in stream.chunks(chunk.max(1)) {
        if copy {
            dec.push(piece);
        } else {
            dec.push_bytes(Bytes::copy_from_slice(piece));
        }
        loop {
            match dec.next_frame() {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(e) => {
                    // The stream is over: every later call says the same.
                    assert_eq!(dec.next_frame(), Err(e.clone()));
                    assert_eq!(dec.finish(), Err(e.clone()));
                    dec.push(b"more");
                    assert_eq!(dec.next_frame(), Err(e.clone()));
                    return (frames, Err(e));
                }
            }
        }
    }
    let end = dec.finish();
    if let Err(e) = &end {
        assert!(matches!(e, DecodeError::Truncated { .. }), "finish gave {e:?}");
    }
    (frames, end)
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let mut stream = rest.to_vec();
    if ctl & 0x80 != 0 {
        fix_crcs(&mut stream);
    }
    let chunk = match usize::from(ctl & 0x3f) {
        0 => stream.len(),
        n => n,
    };
    let (frames, verdict) = decode(&stream, chunk, ctl & 0x40 != 0);

    // The chunking changes nothing.
    let (whole_frames, whole_verdict) = decode(&stream, stream.len(), false);
    assert_eq!(frames, whole_frames, "frames depend on the chunking");
    assert_eq!(verdict, whole_verdict, "verdict depends on the chunking");

    // Canonical encoding: re-encoding gives back the very bytes, and they decode to an equal frame.
    let mut at = 0usize;
    for f in &frames {
        let bytes = f.to_bytes().unwrap_or_else(|e| panic!("decoded frame does not re-encode: {e}"));
        assert_eq!(&bytes[..], &stream[at..at + bytes.len()], "re-encoding differs from the input");
        at += bytes.len();
        let mut d = Decoder::new();
        d.push_bytes(bytes);
        let again = d.next_frame().expect("re-encoded frame decodes").expect("re-encoded frame is whole");
        assert_eq!(&again, f);
        assert_eq!(d.next_frame(), Ok(None));
        assert_eq!(d.finish(), Ok(()));
    }
    match verdict {
        Ok(()) => assert_eq!(at, stream.len()),
        Err(e) => assert_eq!(e.offset(), at as u64, "error offset is not where the frames end"),
    }
});
