//! Event-stream decoding throughput: our `Decoder` against smithy-rs's `MessageFrameDecoder` on
//! the same stream of 5,000 frames shaped like Amazon Q's `assistantResponseEvent`s.
//!
//! `cargo bench --bench eventstream_decode -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use amq2api::upstream::eventstream::{Decoder, Frame};
use aws_smithy_eventstream::frame::{DecodedFrame, MessageFrameDecoder};
use bytes::{Bytes, BytesMut};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const FRAMES: usize = 5_000;
/// A typical TCP read.
const READ: usize = 1_500;

/// Frames with Amazon Q's three headers and a `{"content":"…"}` payload of 60–300 bytes.
fn q_stream() -> Bytes {
    const WORDS: &[&str] = &[
        "the",
        "function",
        "returns",
        "a",
        "value",
        "when",
        "called",
        "with",
        "an",
        "argument",
        "fn",
        "main()",
        "{",
        "}",
        "let",
        "x",
        "=",
        "42;",
        "println!",
        "\\\"hello\\\"",
        "\\n",
        "résumé",
        "naïve",
        "→",
        "✓",
    ];
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut out = BytesMut::new();
    for _ in 0..FRAMES {
        let target = 60 + (next() % 241) as usize;
        let mut text = String::new();
        while text.len() + 14 < target {
            text.push_str(WORDS[(next() % WORDS.len() as u64) as usize]);
            text.push(' ');
        }
        let mut payload = format!(r#"{{"content":"{text}"}}"#);
        while payload.len() > target && text.pop().is_some() {
            payload = format!(r#"{{"content":"{}"}}"#, text.trim_end_matches('\\'));
        }
        Frame::new()
            .with_header(":message-type", "event")
            .with_header(":event-type", "assistantResponseEvent")
            .with_header(":content-type", "application/json")
            .with_payload(payload)
            .encode(&mut out)
            .unwrap();
    }
    out.freeze()
}

fn ours_zero_copy(chunks: &[Bytes]) -> usize {
    let mut decoder = Decoder::new();
    let mut n = 0;
    for chunk in chunks {
        decoder.push_bytes(chunk.clone());
        while let Some(frame) = decoder.next_frame().unwrap() {
            black_box(&frame);
            n += 1;
        }
    }
    decoder.finish().unwrap();
    n
}

fn ours_copy(chunks: &[Bytes]) -> usize {
    let mut decoder = Decoder::new();
    let mut n = 0;
    for chunk in chunks {
        decoder.push(chunk);
        while let Some(frame) = decoder.next_frame().unwrap() {
            black_box(&frame);
            n += 1;
        }
    }
    decoder.finish().unwrap();
    n
}

fn smithy_one_chunk(stream: &Bytes) -> usize {
    let mut decoder = MessageFrameDecoder::new();
    let mut buf = stream.clone();
    let mut n = 0;
    while let DecodedFrame::Complete(message) = decoder.decode_frame(&mut buf).unwrap() {
        black_box(&message);
        n += 1;
    }
    n
}

fn smithy_chunks(chunks: &[Bytes]) -> usize {
    let mut decoder = MessageFrameDecoder::new();
    let mut buf = BytesMut::new();
    let mut n = 0;
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        while let DecodedFrame::Complete(message) = decoder.decode_frame(&mut buf).unwrap() {
            black_box(&message);
            n += 1;
        }
    }
    n
}

fn bench(c: &mut Criterion) {
    let stream = q_stream();
    let whole = vec![stream.clone()];
    let reads: Vec<Bytes> =
        (0..stream.len()).step_by(READ).map(|i| stream.slice(i..(i + READ).min(stream.len()))).collect();
    eprintln!(
        "stream: {FRAMES} frames, {} bytes, {:.0} bytes a frame on average",
        stream.len(),
        stream.len() as f64 / FRAMES as f64
    );
    for n in [ours_zero_copy(&whole), ours_copy(&reads), smithy_one_chunk(&stream), smithy_chunks(&reads)] {
        assert_eq!(n, FRAMES);
    }

    let mut group = c.benchmark_group("eventstream_decode");
    group.throughput(Throughput::Bytes(stream.len() as u64));
    group.bench_function("amq2api/one_chunk_zero_copy", |b| b.iter(|| ours_zero_copy(black_box(&whole))));
    group.bench_function("amq2api/one_chunk_copy", |b| b.iter(|| ours_copy(black_box(&whole))));
    group.bench_function("amq2api/1500B_reads_copy", |b| b.iter(|| ours_copy(black_box(&reads))));
    group.bench_function("amq2api/1500B_reads_zero_copy", |b| b.iter(|| ours_zero_copy(black_box(&reads))));
    group.bench_function("smithy/one_chunk", |b| b.iter(|| smithy_one_chunk(black_box(&stream))));
    group.bench_function("smithy/1500B_reads", |b| b.iter(|| smithy_chunks(black_box(&reads))));
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
