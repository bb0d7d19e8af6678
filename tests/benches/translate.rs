//! Translation costs on the request path and the response path.
//!
//! - `request/*`: a ~50 KB Claude-Code-shaped request (3 system blocks, 12 tools with JSON schemas,
//!   a few turns of history with tool calls and results): `parse`, `translate`, the input-token
//!   count, serialising the Amazon Q body, and all four together (what the daemon does before it
//!   calls upstream).
//! - `response/*`: an Amazon Q event sequence (initial response, ~300 text fragments of 1–12
//!   characters as the emulator cuts them, a tool call whose arguments come in fragments, the
//!   closing metadata) through `ResponseState` into SSE bytes, and into the `Aggregator`; and the
//!   whole streaming pipeline from event-stream bytes (decode, parse, state machine, SSE).
//!
//! `cargo bench --bench translate -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use amq2api::anthropic::request::{self, ApiVersion, Endpoint};
use amq2api::anthropic::sse::StreamEvent;
use amq2api::emulator::reply::{event_frame, fragments};
use amq2api::translate::{Aggregator, Context, ModelMap, ResponseParams, ResponseState, tokens, translate};
use amq2api::upstream::eventstream::Decoder;
use amq2api::upstream::{Event, events::parse_frame};
use bytes::{Bytes, BytesMut};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use serde_json::{Value, json};

/// Deterministic English-ish prose of about `chars` characters.
fn prose(chars: usize, seed: u64) -> String {
    const WORDS: &[&str] = &[
        "the",
        "tool",
        "file",
        "should",
        "always",
        "use",
        "when",
        "you",
        "need",
        "to",
        "search",
        "for",
        "a",
        "pattern",
        "in",
        "codebase",
        "instead",
        "of",
        "running",
        "command",
        "with",
        "absolute",
        "path",
        "parameter",
        "must",
        "be",
        "provided",
        "results",
        "are",
        "returned",
        "sorted",
        "by",
        "modification",
        "time",
        "and",
        "it",
        "is",
        "important",
        "that",
        "user",
        "asks",
        "concise",
        "answer",
        "do",
        "not",
        "add",
        "comments",
        "unless",
        "asked",
        "project",
        "tests",
        "lint",
        "typecheck",
        "commit",
        "changes",
        "IMPORTANT:",
        "NEVER",
        "Before",
        "making",
        "edits,",
        "read",
        "the",
        "surrounding",
        "context.",
    ];
    let mut state = seed | 1;
    let mut out = String::with_capacity(chars + 16);
    let mut sentence = 0;
    while out.len() < chars {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.push_str(WORDS[(state % WORDS.len() as u64) as usize]);
        sentence += 1;
        if sentence % 14 == 0 {
            out.push_str(if state % 5 == 0 { ".\n- " } else { ". " });
        } else {
            out.push(' ');
        }
    }
    out
}

/// Rust-ish source text for file reads.
fn source_file(lines: usize, seed: u64) -> String {
    let mut out = String::new();
    for i in 0..lines {
        let words = prose(40, seed + i as u64).replace(['\n', '-', ':', ','], "");
        let ident = words.split(' ').take(3).collect::<Vec<_>>().join("_");
        out.push_str(&format!(
            "{:>6}\u{2192}    let {ident} = compute(&self.{ident}, {i}); // {}\n",
            i + 1,
            words.trim()
        ));
    }
    out
}

fn schema_props(n: usize, seed: u64) -> Value {
    let mut props = serde_json::Map::new();
    for i in 0..n {
        let desc = prose(120, seed * 31 + i as u64);
        let v = match i % 4 {
            0 => json!({"type": "string", "description": desc}),
            1 => json!({"type": "number", "description": desc}),
            2 => json!({"type": "boolean", "description": desc}),
            _ => json!({"type": "array", "items": {"type": "object", "properties": {
                "content": {"type": "string", "minLength": 1},
                "status": {"type": "string", "enum": ["pending", "in_progress", "completed"]},
                "id": {"type": "string"}}, "required": ["content", "status", "id"],
                "additionalProperties": false}, "description": desc}),
        };
        props.insert(format!("param_{i}"), v);
    }
    Value::Object(props)
}

/// The 12 tools Claude Code sends, with schemas in its shape.
fn tools() -> Vec<Value> {
    let names = [
        ("Task", 3, 1_800),
        ("Bash", 4, 3_500),
        ("Glob", 2, 700),
        ("Grep", 9, 1_800),
        ("LS", 2, 400),
        ("ExitPlanMode", 1, 700),
        ("Read", 3, 1_400),
        ("Edit", 4, 1_100),
        ("MultiEdit", 2, 2_200),
        ("Write", 2, 700),
        ("WebFetch", 2, 1_000),
        ("TodoWrite", 1, 3_500),
    ];
    names
        .iter()
        .enumerate()
        .map(|(i, (name, params, desc))| {
            let props = schema_props(*params, i as u64 + 7);
            let required: Vec<&String> = props.as_object().unwrap().keys().take(1).collect();
            json!({
                "name": name,
                "description": prose(*desc, i as u64 + 100),
                "input_schema": {
                    "type": "object",
                    "properties": props,
                    "required": required,
                    "additionalProperties": false,
                    "$schema": "http://json-schema.org/draft-07/schema#"
                }
            })
        })
        .collect()
}

/// A ~50 KB request shaped like one of Claude Code's mid-session turns.
fn claude_code_request() -> Vec<u8> {
    let body = json!({
        "model": "claude-sonnet-4-5-20250929",
        "max_tokens": 32000,
        "stream": true,
        "temperature": 1,
        "metadata": {"user_id": "user_0123456789abcdef_account__session_5f2b7c1e-9a7d-4c1b-8e0a-2d3f4b5c6d7e"},
        "system": [
            {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude.",
             "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": prose(8_000, 1), "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": format!("<env>\nWorking directory: /home/dev/project\nIs directory a git repo: Yes\nPlatform: linux\nToday's date: 2025-11-29\n</env>\n{}", prose(600, 2))},
        ],
        "tools": tools(),
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": format!("<system-reminder>\n{}\n</system-reminder>", prose(1_200, 3))},
                {"type": "text", "text": "The request parser rejects tool results with images; find out why and fix it."},
            ]},
            {"role": "assistant", "content": [
                {"type": "text", "text": "I'll look at the request parser first."},
                {"type": "tool_use", "id": "toolu_01A9fGc3kq8h2V1bXWnY4dRt", "name": "Grep",
                 "input": {"param_0": "fn parse_block", "param_1": 3, "param_2": true}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01A9fGc3kq8h2V1bXWnY4dRt",
                 "content": "src/anthropic/request.rs:540:fn parse_block(v: &Value, p: &Path, role: Role, nested: bool)"},
            ]},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "toolu_01Bq7mZ2xT5cV8nL3pR6sWyE", "name": "Read",
                 "input": {"param_0": "/home/dev/project/src/anthropic/request.rs", "param_1": 520, "param_2": false}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01Bq7mZ2xT5cV8nL3pR6sWyE",
                 "content": [{"type": "text", "text": source_file(90, 5)}]},
                {"type": "text", "text": format!("<system-reminder>\n{}\n</system-reminder>", prose(400, 6))},
            ]},
            {"role": "assistant", "content": [
                {"type": "text", "text": prose(500, 8)},
                {"type": "tool_use", "id": "toolu_01Cw4hJ9yU2iO7pA1sD5fGhK", "name": "TodoWrite",
                 "input": {"param_0": [
                     {"content": "Find where image blocks in tool results are rejected", "status": "completed", "id": "1"},
                     {"content": "Accept them and translate to Amazon Q images", "status": "in_progress", "id": "2"},
                     {"content": "Add a test", "status": "pending", "id": "3"}]}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01Cw4hJ9yU2iO7pA1sD5fGhK",
                 "content": "Todos have been modified successfully."},
                {"type": "text", "text": "Go on, and run the tests when you are done.",
                 "cache_control": {"type": "ephemeral"}},
            ]},
        ],
    });
    serde_json::to_vec(&body).unwrap()
}

/// Everything the daemon does with a request body before it calls Amazon Q.
fn prepare(body: &[u8], models: &ModelMap) -> usize {
    let req = request::parse(body, ApiVersion::default(), Endpoint::Messages).unwrap();
    let t = translate(
        &req,
        &Context {
            models,
            session_id: Some("5f2b7c1e-9a7d-4c1b-8e0a-2d3f4b5c6d7e"),
            caps: None,
            catalog: None,
        },
    )
    .unwrap();
    let n = tokens::count_request(&req);
    let bytes = serde_json::to_vec(&t.request).unwrap();
    black_box(n);
    bytes.len()
}

/// An Amazon Q reply: ~2,000 characters of text in the emulator's fragments, then a tool call.
fn q_events() -> Vec<Event> {
    let text = prose(2_000, 42);
    let args = json!({"param_0": "/home/dev/project/src/anthropic/request.rs",
        "param_1": "        Value::Array(items) => {\n            let mut out = Vec::new();",
        "param_2": "        Value::Array(items) => {\n            let mut out = Vec::with_capacity(items.len());",
        "param_3": false})
    .to_string();
    let mut evs =
        vec![Event::InitialResponse { conversation_id: Some("c0ffee00-1234-4abc-8def-0123456789ab".into()) }];
    evs.extend(fragments(&text).map(|f| Event::AssistantResponse { content: f.to_string() }));
    let id = "tooluse_Xk2P9qLm4RtZ8vBn1WcY7d".to_string();
    evs.push(Event::ToolUse { tool_use_id: id.clone(), name: "Edit".into(), input: None, stop: false });
    evs.extend(fragments(&args).map(|f| Event::ToolUse {
        tool_use_id: id.clone(),
        name: "Edit".into(),
        input: Some(f.to_string()),
        stop: false,
    }));
    evs.push(Event::ToolUse { tool_use_id: id, name: "Edit".into(), input: None, stop: true });
    evs.push(Event::Metering { usage: Some(0.0121), unit: Some("credit".into()) });
    evs.push(Event::ContextUsage { percentage: 6.4 });
    evs.push(Event::MessageMetadata {
        conversation_id: Some("c0ffee00-1234-4abc-8def-0123456789ab".into()),
        utterance_id: Some("u-0001".into()),
    });
    evs
}

/// The same reply as Amazon Q's event-stream bytes.
fn q_stream(events: &[Event]) -> Bytes {
    let mut out = BytesMut::new();
    for ev in events {
        let (kind, payload) = match ev {
            Event::InitialResponse { conversation_id } => {
                ("initial-response", json!({"conversationId": conversation_id}))
            }
            Event::AssistantResponse { content } => {
                ("assistantResponseEvent", json!({"content": content, "modelId": "claude-sonnet-4.5"}))
            }
            Event::ToolUse { tool_use_id, name, input, stop } => {
                let mut p = json!({"toolUseId": tool_use_id, "name": name});
                if let Some(i) = input {
                    p["input"] = json!(i);
                }
                if *stop {
                    p["stop"] = json!(true);
                }
                ("toolUseEvent", p)
            }
            Event::Metering { usage, unit } => ("meteringEvent", json!({"usage": usage, "unit": unit})),
            Event::ContextUsage { percentage } => {
                ("contextUsageEvent", json!({"contextUsagePercentage": percentage}))
            }
            Event::MessageMetadata { conversation_id, utterance_id } => (
                "messageMetadataEvent",
                json!({"conversationId": conversation_id, "utteranceId": utterance_id}),
            ),
            _ => unreachable!(),
        };
        out.extend_from_slice(&event_frame(kind, &payload));
    }
    out.freeze()
}

fn params() -> ResponseParams {
    ResponseParams {
        message_id: "msg_01XFDUDYJgAACzvnptvVoYEL".into(),
        model: "claude-sonnet-4-5-20250929".into(),
        input_tokens: 12_000,
        max_tokens: 32_000,
        stop_sequences: vec![],
        thinking: false,
        tool_names: Default::default(),
        context_window: Some(200_000),
    }
}

/// The daemon's streaming path from events: the state machine, every output batch to SSE bytes.
fn to_sse(events: &[Event]) -> usize {
    let mut st = ResponseState::new(params());
    let mut bytes = 0;
    let mut emit = |evs: Vec<StreamEvent>| {
        let mut buf = Vec::new();
        for e in &evs {
            buf.extend_from_slice(&e.to_sse());
        }
        bytes += black_box(Bytes::from(buf)).len();
    };
    emit(st.start());
    for ev in events {
        emit(st.on_event(ev.clone()));
    }
    emit(st.on_end());
    bytes
}

/// The non-streaming path: the state machine into the Aggregator, then the message JSON.
fn to_message(events: &[Event]) -> usize {
    let mut st = ResponseState::new(params());
    let mut agg = Aggregator::default();
    for e in st.start() {
        agg.push(&e);
    }
    for ev in events {
        for e in st.on_event(ev.clone()) {
            agg.push(&e);
        }
    }
    for e in st.on_end() {
        agg.push(&e);
    }
    serde_json::to_vec(&agg.finish().unwrap()).unwrap().len()
}

/// The whole streaming pipeline from upstream bytes in 1,500-byte reads.
fn stream_pipeline(reads: &[Bytes]) -> usize {
    let mut st = ResponseState::new(params());
    let mut decoder = Decoder::new();
    let mut bytes = 0;
    let mut emit = |evs: Vec<StreamEvent>| {
        let mut buf = Vec::new();
        for e in &evs {
            buf.extend_from_slice(&e.to_sse());
        }
        bytes += black_box(Bytes::from(buf)).len();
    };
    emit(st.start());
    for chunk in reads {
        decoder.push(chunk);
        while let Some(frame) = decoder.next_frame().unwrap() {
            emit(st.on_event(parse_frame(&frame).unwrap()));
        }
    }
    emit(st.on_end());
    bytes
}

fn bench(c: &mut Criterion) {
    let body = claude_code_request();
    let models = ModelMap::default();
    let parsed = request::parse(&body, ApiVersion::default(), Endpoint::Messages).unwrap();
    let translated =
        translate(&parsed, &Context { models: &models, session_id: None, caps: None, catalog: None })
            .unwrap();
    let q_body = serde_json::to_vec(&translated.request).unwrap();
    eprintln!(
        "request: {} bytes, {} tools, {} system blocks, {} messages; Amazon Q body {} bytes, {} input tokens",
        body.len(),
        parsed.tools.len(),
        parsed.system.len(),
        parsed.messages.len(),
        q_body.len(),
        tokens::count_request(&parsed)
    );
    assert!((45_000..=56_000).contains(&body.len()), "the request is ~50 KB: {}", body.len());

    let mut group = c.benchmark_group("request");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("parse", |b| {
        b.iter(|| request::parse(black_box(&body), ApiVersion::default(), Endpoint::Messages).unwrap())
    });
    group.bench_function("translate", |b| {
        b.iter(|| {
            translate(
                black_box(&parsed),
                &Context { models: &models, session_id: None, caps: None, catalog: None },
            )
            .unwrap()
        })
    });
    group.bench_function("count_tokens", |b| b.iter(|| tokens::count_request(black_box(&parsed))));
    group.bench_function("serialise_q_body", |b| {
        b.iter(|| serde_json::to_vec(black_box(&translated.request)).unwrap())
    });
    group.bench_function("prepare_all", |b| b.iter(|| prepare(black_box(&body), &models)));
    group.finish();

    let events = q_events();
    let stream = q_stream(&events);
    let reads: Vec<Bytes> =
        (0..stream.len()).step_by(1_500).map(|i| stream.slice(i..(i + 1_500).min(stream.len()))).collect();
    let sse = to_sse(&events);
    eprintln!(
        "response: {} events ({} event-stream bytes) -> {} SSE bytes; message JSON {} bytes",
        events.len(),
        stream.len(),
        sse,
        to_message(&events)
    );
    assert_eq!(stream_pipeline(&reads), sse);

    let mut group = c.benchmark_group("response");
    group.throughput(Throughput::Elements(events.len() as u64));
    group.bench_function("state_machine_to_sse", |b| b.iter(|| to_sse(black_box(&events))));
    group.bench_function("state_machine_to_aggregator", |b| b.iter(|| to_message(black_box(&events))));
    group.bench_function("eventstream_bytes_to_sse", |b| b.iter(|| stream_pipeline(black_box(&reads))));
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
