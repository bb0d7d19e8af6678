//! Event-stream decoder memory behaviour, measured with a counting allocator: a hostile length is
//! refused without allocating, and decoding costs one allocation a frame (its headers `Vec`).
//!
//! The allocator is the only `unsafe` here (implementing `GlobalAlloc` requires it); it forwards
//! to the system allocator and counts, per thread, so tests running in parallel do not interfere.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use amq2api::upstream::eventstream::{DecodeError, Decoder, Frame};
use bytes::{Bytes, BytesMut};

struct Counting;

thread_local! {
    static ALLOCS: Cell<usize> = const { Cell::new(0) };
    static BYTES: Cell<usize> = const { Cell::new(0) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn record(size: usize) {
    let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
    let _ = BYTES.try_with(|c| c.set(c.get() + size));
    let _ = LARGEST.try_with(|c| c.set(c.get().max(size)));
}

// SAFETY: every method forwards to `System` unchanged; the counters are plain thread-locals with
// const initialisers, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        record(new_size);
        // SAFETY: forwarded with the caller's pointer, layout and size.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's pointer and layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[derive(Debug, Clone, Copy)]
struct Usage {
    allocs: usize,
    bytes: usize,
    largest: usize,
}

/// Allocations made by this thread while `f` runs.
fn measure<T>(f: impl FnOnce() -> T) -> (T, Usage) {
    ALLOCS.set(0);
    BYTES.set(0);
    LARGEST.set(0);
    let out = f();
    let usage = Usage { allocs: ALLOCS.get(), bytes: BYTES.get(), largest: LARGEST.get() };
    (out, usage)
}

fn prelude(total: u32, headers_len: u32) -> Vec<u8> {
    let mut p = Vec::with_capacity(12);
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&headers_len.to_be_bytes());
    p.extend_from_slice(&crc32fast::hash(&p).to_be_bytes());
    p
}

#[test]
fn one_gib_prelude_is_refused_without_allocating() {
    let announce = prelude(1 << 30, 0);
    let mut decoder = Decoder::new();
    let (result, usage) = measure(|| {
        decoder.push(&announce);
        let result = decoder.next_frame();
        // More bytes after the refusal are dropped, not buffered.
        decoder.push(&[0u8; 4096]);
        result
    });
    assert!(matches!(result, Err(DecodeError::FrameTooLarge { total_len: 1073741824, .. })));
    assert_eq!(decoder.buffered_len(), 0);
    assert!(usage.largest < 4096, "{usage:?}");
    assert!(usage.bytes < 4096, "{usage:?}");

    // A frame announced at the cap is buffered only as its bytes arrive.
    let mut decoder = Decoder::new();
    let announce = prelude(16 << 20, 0);
    let ((), usage) = measure(|| {
        decoder.push(&announce);
        assert_eq!(decoder.next_frame(), Ok(None));
        decoder.push(&[0u8; 100]);
        assert_eq!(decoder.next_frame(), Ok(None));
    });
    assert!(usage.largest < 4096, "{usage:?}");
}

/// `count` frames shaped like Amazon Q's, back to back.
fn q_stream(count: usize) -> Bytes {
    let mut out = BytesMut::new();
    for i in 0..count {
        let text = "token ".repeat(1 + i % 40);
        Frame::new()
            .with_header(":message-type", "event")
            .with_header(":event-type", "assistantResponseEvent")
            .with_header(":content-type", "application/json")
            .with_payload(format!(r#"{{"content":"{text}"}}"#))
            .encode(&mut out)
            .unwrap();
    }
    out.freeze()
}

#[test]
fn one_allocation_a_frame() {
    const FRAMES: usize = 2000;
    let stream = q_stream(FRAMES);

    // Whole stream as one zero-copy chunk: the headers Vec of each frame, plus a constant.
    let (count, usage) = measure(|| {
        let mut decoder = Decoder::new();
        decoder.push_bytes(stream.clone());
        let mut count = 0;
        while let Some(frame) = decoder.next_frame().unwrap() {
            assert_eq!(frame.headers.len(), 3);
            count += 1;
        }
        count
    });
    assert_eq!(count, FRAMES);
    assert!(usage.allocs <= FRAMES + 4, "{usage:?}");
    // Nothing like a copy of the stream was made.
    assert!(usage.largest < 1024, "{usage:?}");

    // 1500-byte reads copied in with push(): frames are dropped as they are handled, so the
    // buffer's memory is reused; a few extra allocations at most.
    let (count, usage) = measure(|| {
        let mut decoder = Decoder::new();
        let mut count = 0;
        for chunk in stream.chunks(1500) {
            decoder.push(chunk);
            while let Some(frame) = decoder.next_frame().unwrap() {
                assert_eq!(frame.headers.len(), 3);
                count += 1;
            }
        }
        decoder.finish().unwrap();
        count
    });
    assert_eq!(count, FRAMES);
    let chunks = stream.len().div_ceil(1500);
    assert!(chunks > 300);
    assert!(usage.allocs <= FRAMES + 16, "{usage:?}");
    eprintln!("1500-byte pushes: {usage:?} for {FRAMES} frames, {chunks} chunks");
}

/// The streaming path of a text frame, from the bytes read to the SSE written: decode, read the
/// event, run it through the response state machine, write its events. Two allocations a
/// frame (the headers `Vec`, the text's `String`, which then travels on into the delta
/// without a copy), plus a constant.
#[test]
fn a_text_frame_costs_two_allocations_from_bytes_to_sse() {
    use amq2api::translate::{ResponseParams, ResponseState, ToolNames};
    use amq2api::upstream::events::parse_frame;
    const FRAMES: usize = 2000;
    let stream = q_stream(FRAMES);
    let params = ResponseParams {
        message_id: "msg_alloc".into(),
        model: "claude-sonnet-4-5".into(),
        input_tokens: 10,
        max_tokens: 1_000_000,
        stop_sequences: Vec::new(),
        thinking: false,
        tool_names: ToolNames::default(),
        context_window: Some(200_000),
    };
    let mut st = ResponseState::new(params);
    let mut sse = Vec::with_capacity(1 << 20);
    for e in st.start() {
        e.write_sse(&mut sse);
    }
    let mut events = Vec::new();
    let (written, usage) = measure(|| {
        let mut decoder = Decoder::new();
        decoder.push_bytes(stream.clone());
        let mut written = 0;
        while let Some(frame) = decoder.next_frame().unwrap() {
            events.clear();
            st.on_event_into(parse_frame(&frame).unwrap(), &mut events);
            for e in &events {
                e.write_sse(&mut sse);
                written += 1;
            }
        }
        written
    });
    // A delta a frame, and the text block's start.
    assert_eq!(written, FRAMES + 1);
    assert!(usage.allocs <= 2 * FRAMES + 32, "{usage:?} for {FRAMES} frames");
    assert!(String::from_utf8(sse).unwrap().contains("\"text_delta\",\"text\":\"token token \""));
}
