//! Upstream (Amazon Q) event sequences through `translate::ResponseState`, with every emitted
//! Claude stream event fed to an `Aggregator`, as the daemon does for streaming and
//! non-streaming responses.
//!
//! The input is decoded with `arbitrary` into response parameters (max_tokens 1..=5000, stop
//! sequences, thinking), a list of upstream events built from small, protocol-shaped pieces
//! (`<thinking>` tags and parts of them, stop-sequence parts, JSON fragments of tool inputs), and
//! how the stream ends (cleanly or with one of the `StreamError`s).
//!
//! Checks, besides "never panics":
//! - the event grammar of Anthropic's streaming API: `message_start` first; block indices
//!   contiguous from 0; no block start while one is open; deltas only for the open block;
//!   `message_delta` only with no open block; the stream ends with `message_stop` or an `error`
//!   event and nothing follows it (nor does anything come out of further calls);
//! - `Aggregator::finish` is Ok exactly when the stream ended with `message_stop`;
//! - a tool_use block closed after its upstream fragments formed a JSON object carries exactly
//!   that object, streamed (`input_json_delta`s) and aggregated; every aggregated tool input is
//!   an object;
//! - without thinking, stop sequences or a max_tokens cut, the text deltas are the upstream text.
#![no_main]

use amq2api::anthropic::sse::StreamEvent;
use amq2api::translate::{Aggregator, ResponseParams, ResponseState, ToolNames};
use amq2api::upstream::events::TokenUsage;
use amq2api::upstream::{Event, StreamError};
use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

/// A short string: up to 12 characters of anything.
#[derive(Debug)]
struct Short(String);

impl<'a> Arbitrary<'a> for Short {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let s: &str = u.arbitrary()?;
        Ok(Short(s.chars().take(12).collect()))
    }
}

/// A piece of answer text.
#[derive(Arbitrary, Debug)]
enum TextPiece {
    Fixed(u8),
    Any(Short),
}

const TEXT_PIECES: &[&str] = &[
    "<thinking>",
    "</thinking>",
    "<think",
    "ing>",
    "</",
    "thinking>",
    "<",
    ">",
    "\n",
    "\n\n",
    "\r\n",
    " ",
    "Hello",
    "world.",
    "STOP",
    "ST",
    "OP",
    "END",
    "é",
    "日本語",
    "🦀",
    "{\"a\":1}",
];

/// A fragment of a tool's input JSON.
#[derive(Arbitrary, Debug)]
enum JsonPiece {
    Fixed(u8),
    Any(Short),
}

const JSON_PIECES: &[&str] = &[
    "{",
    "}",
    "{}",
    "\"k\"",
    "\"city\"",
    ":",
    ",",
    "1",
    "-2.5e3",
    "true",
    "null",
    "\"Paris\"",
    "\"",
    "[",
    "]",
    " ",
    "\n",
    "\"é\"",
    "{\"x\":",
    "{\"a\":[1,2]}",
    "\\u00e9",
];

#[derive(Arbitrary, Debug)]
enum Up {
    Text(Vec<TextPiece>),
    /// `id` and `name` index small tables; `input` is a list of JSON pieces (none = no `input`).
    Tool {
        id: u8,
        name: u8,
        input: Option<Vec<JsonPiece>>,
        stop: bool,
    },
    Reasoning {
        text: Option<Vec<TextPiece>>,
        signature: Option<Short>,
        redacted: Option<Short>,
    },
    ContextUsage(f64),
    Metadata {
        uncached: Option<u64>,
        read: Option<u64>,
        write: Option<u64>,
    },
    Metering(Option<f64>),
    Unknown,
}

const TOOL_IDS: &[&str] = &["tooluse_a", "tooluse_b", "toolu_c", "d", "", "tooluse_é!"];
const TOOL_NAMES: &[&str] = &["get_weather", "t", "", "mcp__x__y", "long_name_alias_0123abcd"];

#[derive(Arbitrary, Debug)]
enum Ending {
    End,
    Truncated,
    Capacity,
    Validation,
    ErrorFrame,
    Transport,
    Idle,
}

#[derive(Arbitrary, Debug)]
struct StopSeq(TextPiece);

/// max_tokens, 1..=5000; small budgets (1..=16) often, so that cuts fall between events.
#[derive(Arbitrary, Debug)]
enum MaxTokens {
    Small(u8),
    Any(u16),
}

#[derive(Arbitrary, Debug)]
struct Input {
    max_tokens: MaxTokens,
    input_tokens: u32,
    context_window: u32,
    thinking: bool,
    stop_sequences: Vec<StopSeq>,
    events: Vec<Up>,
    ending: Ending,
    /// Events fed after the end, which must produce nothing.
    after: Option<Up>,
}

fn text(pieces: &[TextPiece]) -> String {
    pieces
        .iter()
        .map(|p| match p {
            TextPiece::Fixed(i) => TEXT_PIECES[usize::from(*i) % TEXT_PIECES.len()].to_string(),
            TextPiece::Any(s) => s.0.clone(),
        })
        .collect()
}

fn json_text(pieces: &[JsonPiece]) -> String {
    pieces
        .iter()
        .map(|p| match p {
            JsonPiece::Fixed(i) => JSON_PIECES[usize::from(*i) % JSON_PIECES.len()].to_string(),
            JsonPiece::Any(s) => s.0.clone(),
        })
        .collect()
}

fn event(up: &Up) -> Event {
    match up {
        Up::Text(p) => Event::AssistantResponse { content: text(p) },
        Up::Tool { id, name, input, stop } => Event::ToolUse {
            tool_use_id: TOOL_IDS[usize::from(*id) % TOOL_IDS.len()].into(),
            name: TOOL_NAMES[usize::from(*name) % TOOL_NAMES.len()].into(),
            input: input.as_deref().map(json_text),
            stop: *stop,
        },
        Up::Reasoning { text: t, signature, redacted } => Event::Reasoning {
            text: t.as_deref().map(text),
            signature: signature.as_ref().map(|s| s.0.clone()),
            redacted_content: redacted.as_ref().map(|s| s.0.clone()),
        },
        Up::ContextUsage(p) => Event::ContextUsage { percentage: *p },
        Up::Metadata { uncached, read, write } => Event::Metadata {
            token_usage: Some(TokenUsage {
                uncached_input_tokens: *uncached,
                cache_read_input_tokens: *read,
                cache_write_input_tokens: *write,
                ..TokenUsage::default()
            }),
            stop_reason: None,
        },
        Up::Metering(usage) => Event::Metering { usage: *usage, unit: Some("INVOCATIONS".into()) },
        Up::Unknown => Event::Unknown { event_type: "citationEvent".into() },
    }
}

fn stream_error(e: &Ending) -> Option<StreamError> {
    let exception = |t: &str, reason: Option<&str>| StreamError::Exception {
        exception_type: t.into(),
        message: "m".into(),
        reason: reason.map(str::to_string),
    };
    Some(match e {
        Ending::End => return None,
        Ending::Truncated => {
            exception("ContentLengthExceededException", Some("CONTENT_LENGTH_EXCEEDS_THRESHOLD"))
        }
        Ending::Capacity => exception("ThrottlingException", Some("MODEL_TEMPORARILY_UNAVAILABLE")),
        Ending::Validation => exception("ValidationException", None),
        Ending::ErrorFrame => StreamError::ErrorFrame { code: "InternalError".into(), message: "x".into() },
        Ending::Transport => StreamError::Transport("connection reset".into()),
        Ending::Idle => StreamError::Idle(120),
    })
}

fuzz_target!(|data: &[u8]| {
    let u = Unstructured::new(data);
    let Ok(input) = Input::arbitrary_take_rest(u) else {
        return;
    };
    // `AMQ2API_FUZZ_DEBUG=1 <target binary> <crash file>` shows what an input decodes to.
    static DEBUG: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let debug = *DEBUG.get_or_init(|| std::env::var_os("AMQ2API_FUZZ_DEBUG").is_some());
    let stop_sequences: Vec<String> = input
        .stop_sequences
        .iter()
        .take(4)
        .map(|s| text(std::slice::from_ref(&s.0)))
        .filter(|s| !s.is_empty())
        .collect();
    let max_tokens = match input.max_tokens {
        MaxTokens::Small(n) => u64::from(n % 16) + 1,
        MaxTokens::Any(n) => u64::from(n % 5000) + 1,
    };
    let params = ResponseParams {
        message_id: "msg_fuzz".into(),
        model: "claude-sonnet-4-5".into(),
        input_tokens: u64::from(input.input_tokens),
        max_tokens,
        stop_sequences: stop_sequences.clone(),
        thinking: input.thinking,
        tool_names: ToolNames::default(),
        context_window: Some(u64::from(input.context_window)),
    };

    if debug {
        eprintln!("{params:#?}");
        for up in input.events.iter().take(64) {
            eprintln!("upstream: {:?}", event(up));
        }
        eprintln!("ending: {:?}", stream_error(&input.ending));
    }
    let mut st = ResponseState::new(params);
    let mut all = st.start();
    // Upstream tool calls as the harness sees them: (id, fragments) for each run of ToolUse
    // events with one id; the state machine numbers blocks, so remember which upstream call
    // each tool block start belongs to by order.
    let mut upstream_calls: Vec<String> = Vec::new();
    let mut current_call: Option<String> = None;
    let mut upstream_text = String::new();
    for up in input.events.iter().take(64) {
        if st.is_finished() {
            break;
        }
        let ev = event(up);
        match &ev {
            Event::ToolUse { tool_use_id, input, .. } => {
                if current_call.as_deref() != Some(tool_use_id.as_str()) {
                    current_call = Some(tool_use_id.clone());
                    upstream_calls.push(String::new());
                }
                if let (Some(frag), Some(acc)) = (input, upstream_calls.last_mut()) {
                    acc.push_str(frag);
                }
            }
            Event::AssistantResponse { content } => {
                current_call = None;
                upstream_text.push_str(content);
            }
            Event::Reasoning { .. } => current_call = None,
            _ => {}
        }
        if let Event::ToolUse { stop: true, .. } = &ev {
            // The next ToolUse, even with the same id, is a new call.
            all.extend(st.on_event(ev));
            current_call = None;
        } else {
            all.extend(st.on_event(ev));
        }
    }
    if !st.is_finished() {
        all.extend(match stream_error(&input.ending) {
            None => st.on_end(),
            Some(e) => st.on_error(&e),
        });
    }
    assert!(st.is_finished(), "not finished after the end of the stream");
    // Nothing more comes out once finished.
    if let Some(up) = &input.after {
        assert!(st.on_event(event(up)).is_empty(), "events after the end");
    }
    assert!(st.on_end().is_empty(), "on_end after the end emitted events");
    assert!(st.on_error(&StreamError::Transport("late".into())).is_empty(), "on_error after the end");

    if debug {
        for e in &all {
            eprintln!("emitted: {e:?}");
        }
    }
    let summary = amq2api::anthropic::grammar::check_events(&all).unwrap_or_else(|e| panic!("{e}"));
    let (closed_tools, streamed_text) = (summary.closed_tools, summary.text);

    let mut agg = Aggregator::default();
    for e in &all {
        agg.push(e);
    }
    let ended_ok = matches!(all.last(), Some(StreamEvent::MessageStop));
    let message = agg.finish();
    assert_eq!(
        message.is_ok(),
        ended_ok,
        "Aggregator::finish {message:?} but the stream ended with {:?}",
        all.last()
    );
    let Ok(message) = message else {
        return;
    };
    let content = message["content"].as_array().expect("content is an array");

    // Tool blocks, in order, against the upstream calls, in order. A ToolUse event that arrives
    // after the message finished makes no block, so blocks ≤ calls.
    let tool_blocks: Vec<(usize, &Value)> =
        content.iter().enumerate().filter(|(_, b)| b["type"] == "tool_use").collect();
    for (k, (index, block)) in tool_blocks.iter().enumerate() {
        assert!(block["input"].is_object(), "tool_use block {index} has a non-object input: {block}");
        let Some(streamed) = closed_tools.get(index) else {
            continue;
        };
        let Some(upstream) = upstream_calls.get(k) else {
            panic!("more tool blocks than upstream tool calls");
        };
        if let Ok(obj @ Value::Object(_)) = serde_json::from_str::<Value>(upstream) {
            let s: Value = serde_json::from_str(streamed)
                .unwrap_or_else(|e| panic!("streamed input {streamed:?} of {upstream:?} is not JSON: {e}"));
            assert_eq!(s, obj, "streamed tool input differs from upstream's");
            assert_eq!(block["input"], obj, "aggregated tool input differs from upstream's");
        }
    }

    // Text is passed through unchanged when nothing may cut or reinterpret it.
    let stop_reason = message["stop_reason"].as_str().unwrap_or_default();
    if !input.thinking && stop_sequences.is_empty() && stop_reason != "max_tokens" {
        assert_eq!(streamed_text, upstream_text, "text was altered");
    }
});
