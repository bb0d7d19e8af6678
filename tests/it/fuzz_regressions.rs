//! What the fuzz targets in `tests/fuzz/` found, kept as ordinary tests: each feeds the input
//! that failed through the code path of its target (see tests/fuzz/README.md). Request bodies
//! are the crashing inputs themselves (`tests/fuzz/regressions/<target>/`, control byte first);
//! the response state machine's inputs are the upstream event sequences they decoded to.

use amq2api::anthropic::request::{self, ApiVersion, Endpoint};
use amq2api::anthropic::sse::StreamEvent;
use amq2api::emulator::validate_request;
use amq2api::translate::{self, Aggregator, Context, ModelMap, ResponseParams, ResponseState, ToolNames};
use amq2api::upstream::events::TokenUsage;
use amq2api::upstream::eventstream::{DecodeError, Decoder, Frame, HeaderValue};
use amq2api::upstream::{Event, StreamError};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------------
// eventstream_decode

/// One frame with a single string header `h` whose value is `len` bytes of `a`, encoded by hand
/// (the encoder refuses values over 32767 bytes).
fn frame_with_string_value(len: usize) -> Vec<u8> {
    let mut headers = vec![1, b'h', 7];
    headers.extend_from_slice(&(len as u16).to_be_bytes());
    headers.extend(std::iter::repeat_n(b'a', len));
    let total = 12 + headers.len() + 4;
    let mut out = Vec::new();
    out.extend_from_slice(&(total as u32).to_be_bytes());
    out.extend_from_slice(&(headers.len() as u32).to_be_bytes());
    out.extend_from_slice(&crc32fast::hash(&out[..8]).to_be_bytes());
    out.extend_from_slice(&headers);
    out.extend_from_slice(&crc32fast::hash(&out).to_be_bytes());
    out
}

fn decode_all(bytes: &[u8]) -> (Vec<Frame>, Result<(), DecodeError>) {
    let mut dec = Decoder::new();
    dec.push(bytes);
    let mut frames = Vec::new();
    loop {
        match dec.next_frame() {
            Ok(Some(f)) => frames.push(f),
            Ok(None) => return (frames, dec.finish()),
            Err(e) => return (frames, Err(e)),
        }
    }
}

/// Found by review, confirmed with the target: a header value of 32768..=65535 bytes decoded,
/// but the frame could not be re-encoded (`Frame::encode` stops at the format's 32767).
#[test]
fn header_value_over_32767_bytes_is_refused() {
    let (frames, verdict) = decode_all(&frame_with_string_value(32768));
    assert!(frames.is_empty());
    assert_eq!(verdict, Err(DecodeError::HeaderValueTooLong { offset: 0, at: 12, len: 32768 }));

    // The largest value the format allows decodes and re-encodes to the same bytes.
    let bytes = frame_with_string_value(32767);
    let (frames, verdict) = decode_all(&bytes);
    assert_eq!(verdict, Ok(()));
    assert_eq!(frames.len(), 1);
    assert!(matches!(frames[0].header("h"), Some(HeaderValue::String(s)) if s.len() == 32767));
    assert_eq!(&frames[0].to_bytes().unwrap()[..], &bytes[..]);
}

// ---------------------------------------------------------------------------------------------
// request_translate

/// The target's path: parse, count, translate, and (for /v1/messages) Amazon Q's rules.
/// Returns the parse error, if the body is refused.
fn request_path(data: &[u8]) -> Result<Value, String> {
    let (&ctl, body) = data.split_first().expect("a control byte");
    let version = if ctl & 1 == 0 { ApiVersion::V2023_06_01 } else { ApiVersion::V2026_10_21 };
    let endpoint = if ctl & 2 == 0 { Endpoint::Messages } else { Endpoint::CountTokens };
    let req = request::parse(body, version, endpoint).map_err(|e| e.message)?;
    translate::tokens::count_request(&req);
    let models = ModelMap::default();
    let t =
        translate::translate(&req, &Context { models: &models, session_id: None, caps: None, catalog: None })
            .map_err(|e| e.message)?;
    let json = translate::request::to_json(&t, None);
    if let Err(v) = validate_request(&json) {
        panic!("translated request breaks an Amazon Q rule: {v}");
    }
    Ok(json)
}

/// A conversation that repeats a tool_use id (the same call replayed in a later turn) was
/// translated into a history Amazon Q refuses ("a toolUseId is used by one tool use only").
/// Anthropic refuses such a body, and so does the parser now.
#[test]
fn repeated_tool_use_id_is_refused() {
    let data = include_bytes!("../fuzz/regressions/request_translate/duplicate_tool_use_id");
    let err = request_path(data).unwrap_err();
    assert_eq!(err, "messages.5.content.1.id: `tool_use` ids must be unique");

    // Within one message too.
    let body = json!({"model": "claude-sonnet-4-5", "max_tokens": 10, "messages": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "toolu_1", "name": "t", "input": {}},
            {"type": "tool_use", "id": "toolu_1", "name": "t", "input": {}}]}]});
    let mut data = vec![0];
    data.extend_from_slice(body.to_string().as_bytes());
    assert_eq!(request_path(&data).unwrap_err(), "messages.1.content.1.id: `tool_use` ids must be unique");
}

/// A tool used in the history but no longer offered gets a placeholder definition whose
/// description quoted the client's tool name in full; a tool_use name of 20 000 characters made
/// a description over Amazon Q's 10 240.
#[test]
fn placeholder_description_of_a_long_tool_name_stays_within_limits() {
    let data = include_bytes!("../fuzz/regressions/request_translate/long_tool_name_in_history");
    let json = request_path(data).expect("translates");
    let tools =
        &json["conversationState"]["currentMessage"]["userInputMessage"]["userInputMessageContext"]["tools"];
    let placeholder = tools
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["toolSpecification"]["description"].as_str().unwrap())
        .find(|d| d.ends_with("(used earlier in this conversation; no longer offered)"))
        .expect("a placeholder tool");
    assert!(placeholder.starts_with("Tool mcp__corporate-kn"), "{placeholder}");
    assert!(placeholder.chars().count() < 300, "{placeholder}");
}

// ---------------------------------------------------------------------------------------------
// response_state_machine

fn params(max_tokens: u64, stop_sequences: &[&str]) -> ResponseParams {
    ResponseParams {
        message_id: "msg_fuzz".into(),
        model: "claude-sonnet-4-5".into(),
        input_tokens: 10,
        max_tokens,
        stop_sequences: stop_sequences.iter().map(|s| s.to_string()).collect(),
        thinking: false,
        tool_names: ToolNames::default(),
        context_window: Some(200_000),
    }
}

fn tool(id: &str, input: Option<&str>, stop: bool) -> Event {
    Event::ToolUse { tool_use_id: id.into(), name: "t".into(), input: input.map(str::to_string), stop }
}

/// Drives the state machine as the daemon does; `end` is `None` for a clean end.
fn run(
    p: ResponseParams,
    events: Vec<Event>,
    end: Option<StreamError>,
) -> (Vec<StreamEvent>, Result<Value, String>) {
    let mut st = ResponseState::new(p);
    let mut all = st.start();
    for ev in events {
        if st.is_finished() {
            break;
        }
        all.extend(st.on_event(ev));
    }
    if !st.is_finished() {
        all.extend(match &end {
            None => st.on_end(),
            Some(e) => st.on_error(e),
        });
    }
    assert!(st.is_finished());
    amq2api::anthropic::grammar::check_events(&all).unwrap_or_else(|e| panic!("{e}: {all:?}"));
    let mut agg = Aggregator::default();
    for e in &all {
        agg.push(e);
    }
    let message = agg.finish().map_err(|e| e.message);
    assert_eq!(message.is_ok(), matches!(all.last(), Some(StreamEvent::MessageStop)));
    (all, message)
}

/// Output cut upstream (`ContentLengthExceededException`) inside a tool call: the tool block was
/// left open and followed by `message_delta` / `message_stop`, which the stream grammar forbids
/// (and SDKs reject). Then it ended with an `api_error`, which clients retried into the same
/// cut. Now the call, of which nothing was sent, is left out, and the message ends with
/// max_tokens, in the grammar.
#[test]
fn output_cut_inside_a_tool_call_ends_the_message_with_max_tokens() {
    let cut = StreamError::Exception {
        exception_type: "ContentLengthExceededException".into(),
        message: "m".into(),
        reason: Some("CONTENT_LENGTH_EXCEEDS_THRESHOLD".into()),
    };
    let (evs, message) = run(params(1415, &[]), vec![tool("tooluse_a", None, false)], Some(cut.clone()));
    assert!(
        !evs.iter().any(|e| matches!(e, StreamEvent::BlockStart { .. } | StreamEvent::Error(_))),
        "{evs:?}"
    );
    assert!(matches!(evs.last(), Some(StreamEvent::MessageStop)));
    assert_eq!(message.unwrap()["stop_reason"], "max_tokens");

    // Cut after text: still a normal max_tokens end.
    let (_, message) =
        run(params(1415, &[]), vec![Event::AssistantResponse { content: "partial".into() }], Some(cut));
    assert_eq!(message.unwrap()["stop_reason"], "max_tokens");
}

/// A tool's input that is valid JSON but not an object (`"k"`, `true`, `-2.5e3`, …) became the
/// non-streaming tool_use block's `input`; Claude's `input` is always an object. (Then it was
/// read as `{}` when aggregated while the stream carried it as sent: the two modes disagreed.)
/// Now such a call is not handed over as made in either mode: the answer ends with an error.
#[test]
fn aggregated_tool_input_is_always_an_object() {
    for input in ["\"k\"", "true", "-2.5e3", "null", "[1]"] {
        let (evs, message) = run(params(1332, &[]), vec![tool("d", Some(input), true)], None);
        assert!(
            matches!(evs.last(), Some(StreamEvent::Error(e)) if e.message.contains("not one JSON object")),
            "input {input}: {evs:?}"
        );
        assert!(!evs.iter().any(|e| matches!(e, StreamEvent::MessageDelta { .. })), "input {input}");
        assert!(message.is_err(), "input {input}");
    }
    let (_, message) = run(params(100, &[]), vec![tool("d", Some("{\"a\":[1,2]}"), true)], None);
    assert_eq!(message.unwrap()["content"][0]["input"], json!({"a": [1, 2]}));
}

/// Text held back as a possible stop-sequence start ("ST" of "STOP") and flushed by a tool call
/// that exceeds max_tokens: the message finished, but `on_event` returned before writing
/// `message_delta` / `message_stop`, so the stream ended with neither.
#[test]
fn max_tokens_reached_by_text_flushed_at_a_tool_call_ends_the_message() {
    let events =
        vec![Event::AssistantResponse { content: "HelloST".into() }, tool("tooluse_a", Some("{}"), true)];
    let (evs, message) = run(params(1, &["STOP"]), events, None);
    assert!(matches!(evs.last(), Some(StreamEvent::MessageStop)));
    let message = message.unwrap();
    assert_eq!(message["stop_reason"], "max_tokens");
    assert_eq!(message["content"], json!([{"type": "text", "text": "Hello"}]));
}

/// Token counts from upstream's metadata event are added up; huge ones overflowed (a panic in
/// debug builds, a wrapped count in release).
#[test]
fn upstream_token_counts_saturate() {
    let usage = TokenUsage {
        uncached_input_tokens: Some(u64::MAX - 1),
        output_tokens: Some(3),
        cache_read_input_tokens: Some(5),
        cache_write_input_tokens: Some(u64::MAX),
        ..TokenUsage::default()
    };
    let events = vec![
        Event::Metadata { token_usage: Some(usage), stop_reason: None },
        Event::AssistantResponse { content: "x".into() },
    ];
    let (_, message) = run(params(100, &[]), events, None);
    // The service's figures pass through as they are (Anthropic's meaning: input_tokens is the
    // uncached part); nothing overflows when they are added up.
    let m = message.unwrap();
    assert_eq!(m["usage"]["input_tokens"], json!(u64::MAX - 1));
    assert_eq!(m["usage"]["cache_creation_input_tokens"], json!(u64::MAX));
    assert_eq!(m["usage"]["cache_read_input_tokens"], json!(5));
    assert_eq!(m["usage"]["output_tokens"], json!(3));
    let total = amq2api::anthropic::sse::Usage {
        input_tokens: u64::MAX - 1,
        output_tokens: 3,
        cache_creation_input_tokens: u64::MAX,
        cache_read_input_tokens: 5,
    }
    .total_input();
    assert_eq!(total, u64::MAX);
}

/// Found by review, confirmed with the target: empty (or blank) base64 image data decodes, so it
/// was accepted and sent as an empty image, which Amazon Q refuses.
#[test]
fn empty_image_data_is_refused() {
    let data = include_bytes!("../fuzz/regressions/request_translate/empty_image_data");
    assert_eq!(request_path(data).unwrap_err(), "messages.0.content.0.source.data: The image data is empty");
}

/// Found by review while triaging the target's findings: two tool_result blocks answering the
/// same tool_use are merged into one result, and only each block was held to Amazon Q's 800 000
/// characters, not the merged result.
#[test]
fn merged_tool_results_are_held_to_the_limit() {
    let half = "x".repeat(500_000);
    let body = json!({"model": "claude-sonnet-4-5", "max_tokens": 10, "messages": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "t", "input": {}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": half},
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": half}]}]});
    let mut data = vec![0];
    data.extend_from_slice(body.to_string().as_bytes());
    let err = request_path(&data).unwrap_err();
    assert!(err.starts_with("prompt is too long: a tool result has 1000000 characters"), "{err}");
}
