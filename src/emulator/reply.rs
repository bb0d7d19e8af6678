//! Building the event-stream reply: what a request gets said back (`plan`), the event and
//! exception frames that carry it, and the deterministic fragmentation of text into frames.

use std::time::Duration;

use bytes::Bytes;
use serde_json::{Map, Value, json};

use super::catalog::ModelEntry;
use super::reasoning::Signer;
use super::script::{Behaviour, Shape, ToolDirective, strip_directives};
use super::state::IdGen;
use crate::upstream::eventstream::Frame;

/// How many characters of the prompt the default reply echoes.
const ECHO_CHARS: usize = 200;
/// The context window the `contextUsageEvent` percentage is computed against when the model is
/// not known, in tokens.
const DEFAULT_CONTEXT_WINDOW_TOKENS: u64 = 200_000;
/// Characters a token, for every count the emulator makes.
const CHARS_PER_TOKEN: f64 = 4.0;
/// Tokens a credit costs at rate 1 (`meteringEvent.usage` = tokens ÷ this × `rateMultiplier`).
const TOKENS_PER_CREDIT: f64 = 100_000.0;

/// What the reply needs to know about the request.
#[derive(Clone, Debug, Default)]
pub struct RequestInfo {
    pub conversation_id: Option<String>,
    pub model_id: Option<String>,
    /// The current user message's content.
    pub content: String,
    /// One summary text a tool result of the current message.
    pub tool_results: Vec<String>,
    /// The current message's tools: name and input schema.
    pub tools: Vec<(String, Value)>,
    /// Size of the request body, for the context-usage percentage.
    pub request_chars: usize,
    /// `additionalModelRequestFields.thinking.type` is `enabled` or `adaptive`: the reply
    /// reasons natively first.
    pub thinking: bool,
    /// `additionalModelRequestFields.output_config.effort`.
    pub effort: Option<String>,
    /// `additionalModelRequestFields.max_tokens`: the answer is cut there (`MAX_TOKENS`).
    pub max_tokens: Option<u64>,
    /// The catalog entry the call runs on (window, rate, reasoning style); set once the call
    /// passed the model checks.
    pub model: Option<ModelEntry>,
}

impl RequestInfo {
    /// Extracts what the reply needs from a body that passed validation.
    pub fn from_body(body: &Value, request_chars: usize) -> Self {
        let state = &body["conversationState"];
        let user = &state["currentMessage"]["userInputMessage"];
        let ctx = &user["userInputMessageContext"];
        let tools = ctx["tools"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| {
                let spec = &t["toolSpecification"];
                Some((spec["name"].as_str()?.to_owned(), spec["inputSchema"]["json"].clone()))
            })
            .collect();
        let tool_results = ctx["toolResults"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| {
                let parts: Vec<String> = r["content"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|item| match &item["text"] {
                        Value::String(text) => text.clone(),
                        _ => item["json"].to_string(),
                    })
                    .collect();
                parts.join(" ")
            })
            .collect();
        let fields = &body["additionalModelRequestFields"];
        RequestInfo {
            conversation_id: state["conversationId"].as_str().map(str::to_owned),
            model_id: user["modelId"].as_str().map(str::to_owned),
            content: user["content"].as_str().unwrap_or_default().to_owned(),
            tool_results,
            tools,
            request_chars,
            thinking: matches!(fields["thinking"]["type"].as_str(), Some("enabled" | "adaptive")),
            effort: fields["output_config"]["effort"].as_str().map(str::to_owned),
            max_tokens: fields["max_tokens"].as_u64(),
            model: None,
        }
    }
}

/// One step of a reply stream.
#[derive(Clone, Debug, PartialEq)]
pub enum Segment {
    /// A ready frame (the `initial-response`, metadata, an exception, a corrupt frame).
    Frame(Bytes),
    /// `assistantResponseEvent` frames: the text in fragments of 1–12 characters.
    Text(String),
    /// `reasoningContentEvent` frames: the text in fragments, then the signature, in fragments
    /// when `split_signature`, else in one frame.
    Reasoning { text: String, signature: String, split_signature: bool },
    /// One `reasoningContentEvent {"redactedContent"}` frame.
    Redacted(String),
    /// A `meteringEvent` frame worth `credits`, added to the account's count once sent.
    Metered { frame: Bytes, credits: f64 },
    /// `toolUseEvent` frames: the start, `input` in fragments, then `stop: true` when `stop`.
    ToolUse { id: String, name: String, input: String, stop: bool },
    /// Nothing for this long.
    Silence(Duration),
    /// Close the TCP connection abruptly (after what was sent has been flushed).
    Reset,
}

/// A whole reply: its segments and the pause before every event frame after the first.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub segments: Vec<Segment>,
    pub frame_delay: Duration,
    /// Echoed in every `assistantResponseEvent` when the request named a model.
    pub model_id: Option<String>,
}

/// An event frame: `:message-type: event`, `:event-type`, `:content-type: application/json`.
pub fn event_frame(event_type: &str, payload: &Value) -> Bytes {
    let frame = Frame::new()
        .with_header(":message-type", "event")
        .with_header(":event-type", event_type.to_owned())
        .with_header(":content-type", "application/json")
        .with_payload(payload.to_string());
    encode(&frame)
}

/// An exception frame: `:message-type: exception`, `:exception-type`, `:content-type`.
pub fn exception_frame(exception_type: &str, payload: &Value) -> Bytes {
    let frame = Frame::new()
        .with_header(":message-type", "exception")
        .with_header(":exception-type", exception_type.to_owned())
        .with_header(":content-type", "application/json")
        .with_payload(payload.to_string());
    encode(&frame)
}

/// `frame` encoded with its last byte (part of the message CRC) flipped.
pub fn corrupt(frame: &Bytes) -> Bytes {
    let mut bad = frame.to_vec();
    if let Some(last) = bad.last_mut() {
        *last ^= 0xA5;
    }
    Bytes::from(bad)
}

fn encode(frame: &Frame) -> Bytes {
    // Every frame built here is small and has valid, distinct headers; an encoding failure is a
    // bug of the emulator, and an empty chunk then fails the client's decoding visibly.
    frame.to_bytes().unwrap_or_else(|e| {
        tracing::error!(error = %e, "emulator: cannot encode a frame");
        Bytes::new()
    })
}

/// Splits `text` into fragments of 1..=12 characters; the lengths vary deterministically with
/// the text itself.
pub fn fragments(text: &str) -> Fragments<'_> {
    // FNV-1a of the text seeds a xorshift sequence.
    let mut seed = 0xcbf2_9ce4_8422_2325u64;
    for b in text.bytes().take(4096) {
        seed = (seed ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    Fragments { rest: text, state: seed | 1 }
}

/// Iterator of [`fragments`].
pub struct Fragments<'a> {
    rest: &'a str,
    state: u64,
}

impl<'a> Iterator for Fragments<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        if self.rest.is_empty() {
            return None;
        }
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        let chars = 1 + (self.state % 12) as usize;
        let end = self.rest.char_indices().nth(chars).map_or(self.rest.len(), |(i, _)| i);
        let (head, tail) = self.rest.split_at(end);
        self.rest = tail;
        Some(head)
    }
}

/// What a plan needs besides the request.
pub(super) struct PlanCtx<'a> {
    pub ids: &'a IdGen,
    pub signer: &'a Signer,
    /// [`EmulatorOptions::fragment_delay`](super::EmulatorOptions).
    pub default_delay: Duration,
    /// [`EmulatorOptions::token_usage`](super::EmulatorOptions).
    pub token_usage: bool,
}

/// The reply to a request streamed under `behaviour` (one of the streaming ones), shaped by the
/// prompt's directives.
pub(super) fn plan(info: &RequestInfo, behaviour: &Behaviour, shape: &Shape, ctx: &PlanCtx<'_>) -> Plan {
    let ids = ctx.ids;
    let conversation_id = info.conversation_id.clone().unwrap_or_else(|| ids.uuid());
    let mut segments =
        vec![Segment::Frame(event_frame("initial-response", &json!({ "conversationId": conversation_id })))];
    let mut frame_delay = ctx.default_delay;
    match behaviour {
        Behaviour::SlowFragments(d) => frame_delay = *d,
        Behaviour::SilentAfterFirstByte(d) => segments.push(Segment::Silence(*d)),
        Behaviour::EmptyFrames(d) => {
            for _ in 0..super::script::EMPTY_FRAMES {
                segments.push(Segment::Silence(*d));
                segments
                    .push(Segment::Frame(event_frame("assistantResponseEvent", &json!({ "content": "" }))));
            }
        }
        _ => {}
    }
    segments.push(Segment::Frame(event_frame(
        "messageMetadataEvent",
        &json!({ "conversationId": conversation_id, "utteranceId": ids.uuid() }),
    )));
    if shape.empty_text_first {
        segments.push(Segment::Frame(event_frame("assistantResponseEvent", &json!({ "content": "" }))));
    }
    let mut reasoning_chars = 0;
    if let Some(reasoning) = reasoning(info, behaviour, shape, ctx) {
        if let Segment::Reasoning { text, .. } = &reasoning {
            reasoning_chars = text.chars().count();
        }
        segments.push(reasoning);
    }
    let (text, tools) = match behaviour {
        Behaviour::LongReply { chars } => (long_text(*chars), Vec::new()),
        Behaviour::EmptyAnswer => {
            return Plan { segments, frame_delay, model_id: info.model_id.clone() };
        }
        Behaviour::ResetAfterFirstByte => {
            segments.push(Segment::Text("Hello from the Amazon Q emulator. This reply is".into()));
            segments.push(Segment::Reset);
            return Plan { segments, frame_delay, model_id: info.model_id.clone() };
        }
        Behaviour::CorruptFrame => {
            segments.push(Segment::Text("These frames are fine.".into()));
            let good = event_frame("assistantResponseEvent", &json!({ "content": " This one is corrupt." }));
            segments.push(Segment::Frame(corrupt(&good)));
            return Plan { segments, frame_delay, model_id: info.model_id.clone() };
        }
        Behaviour::InStreamException { exception_type, message } => {
            segments.push(Segment::Text("A partial answer, cut by an exception".into()));
            let mut payload = json!({ "message": message });
            let looks_like_reason =
                !message.is_empty() && message.bytes().all(|b| b.is_ascii_uppercase() || b == b'_');
            if looks_like_reason {
                payload["reason"] = json!(message);
            }
            segments.push(Segment::Frame(exception_frame(exception_type, &payload)));
            return Plan { segments, frame_delay, model_id: info.model_id.clone() };
        }
        Behaviour::ToolCallCutBeforeStop => {
            let (name, schema) =
                info.tools.first().cloned().unwrap_or_else(|| ("emulator_tool".into(), json!({})));
            let mut input = serde_json::to_string(&generate_args(&schema)).unwrap_or_default();
            if input.len() < 8 {
                input = r#"{"query": "an argument cut short"}"#.to_owned();
            }
            let cut: String = input.chars().take(input.chars().count() / 2).collect();
            segments.push(Segment::Text("Let me call a tool.".into()));
            segments.push(Segment::ToolUse { id: ids.tool_use_id(), name, input: cut, stop: false });
            return Plan { segments, frame_delay, model_id: info.model_id.clone() };
        }
        _ => answer(info, shape, ids),
    };
    let (text, tools, stop_reason) = cap_output(text, tools, info.max_tokens);
    let output_chars =
        reasoning_chars + text.chars().count() + tools.iter().map(|t| t.2.len()).sum::<usize>();
    if !text.is_empty() {
        segments.push(Segment::Text(text));
    }
    for (id, name, input) in tools {
        segments.push(Segment::ToolUse { id, name, input, stop: true });
    }
    segments.extend(closing(info, output_chars, stop_reason, ctx));
    Plan { segments, frame_delay, model_id: info.model_id.clone() }
}

/// The reasoning that comes before the answer, if any: redacted content for the
/// `redacted-thinking` directive; else, with native thinking asked for (signature in pieces) or
/// the `reasoning` behaviour (signature in one frame), readable text (`"..."` for a model with
/// opaque reasoning) and its signature.
fn reasoning(info: &RequestInfo, behaviour: &Behaviour, shape: &Shape, ctx: &PlanCtx<'_>) -> Option<Segment> {
    if shape.redacted_thinking {
        let mut random = [0u8; 64];
        random[..32].copy_from_slice(&ctx.ids.bytes("redacted"));
        random[32..].copy_from_slice(&ctx.ids.bytes("redacted"));
        return Some(Segment::Redacted(ctx.signer.redacted(&random)));
    }
    if !info.thinking && *behaviour != Behaviour::Reasoning {
        return None;
    }
    let text = if info.model.as_ref().is_some_and(|m| m.opaque_reasoning) {
        "...".to_owned()
    } else {
        let summary: String = strip_directives(&info.content).chars().take(80).collect();
        let effort = info.effort.as_deref().map(|e| format!(" Effort: {e}.")).unwrap_or_default();
        format!("The user wrote: \"{summary}\". A short, friendly answer will do.{effort}")
    };
    let signature = ctx.signer.sign(&text, &ctx.ids.bytes("signature"));
    Some(Segment::Reasoning { text, signature, split_signature: info.thinking })
}

/// The answer cut to `max_tokens` (tool calls dropped when cut), and the stop reason.
fn cap_output(
    text: String,
    mut tools: Vec<(String, String, String)>,
    max_tokens: Option<u64>,
) -> (String, Vec<(String, String, String)>, &'static str) {
    let limit =
        max_tokens.map(|t| usize::try_from(t).unwrap_or(usize::MAX).saturating_mul(CHARS_PER_TOKEN as usize));
    if let Some(limit) = limit
        && text.chars().count() > limit
    {
        tools.clear();
        return (text.chars().take(limit).collect(), tools, "MAX_TOKENS");
    }
    let stop = if tools.is_empty() { "END_TURN" } else { "TOOL_USE" };
    (text, tools, stop)
}

/// The frames that end a whole reply, as live streams end: `metadataEvent` (`stopReason`, and
/// `tokenUsage` when asked for), `contextUsageEvent`, `meteringEvent`.
fn closing(info: &RequestInfo, output_chars: usize, stop_reason: &str, ctx: &PlanCtx<'_>) -> Vec<Segment> {
    let window = info.model.as_ref().map_or(DEFAULT_CONTEXT_WINDOW_TOKENS, |m| m.max_input_tokens).max(1);
    let rate = info.model.as_ref().map_or(1.0, |m| m.rate_multiplier);
    let input_tokens = info.request_chars as f64 / CHARS_PER_TOKEN;
    let output_tokens = output_chars as f64 / CHARS_PER_TOKEN;
    let round4 = |x: f64| (x * 10_000.0).round() / 10_000.0;
    let mut metadata = json!({ "stopReason": stop_reason });
    if ctx.token_usage {
        let (input, output) = (input_tokens.ceil() as u64, output_tokens.ceil() as u64);
        metadata["tokenUsage"] = json!({
            "uncachedInputTokens": input,
            "outputTokens": output,
            "totalTokens": input + output,
            "cacheReadInputTokens": 0,
            "cacheWriteInputTokens": 0,
        });
    }
    let context = round4((input_tokens / window as f64 * 100.0).min(100.0));
    let credits = round4(((input_tokens + output_tokens) / TOKENS_PER_CREDIT * rate).max(0.01));
    vec![
        Segment::Frame(event_frame("metadataEvent", &metadata)),
        Segment::Frame(event_frame("contextUsageEvent", &json!({ "contextUsagePercentage": context }))),
        Segment::Metered {
            frame: event_frame(
                "meteringEvent",
                &json!({ "unit": "credit", "unitPlural": "credits", "usage": credits }),
            ),
            credits,
        },
    ]
}

/// The answer's text and tool calls `(id, name, input JSON)`.
fn answer(info: &RequestInfo, shape: &Shape, ids: &IdGen) -> (String, Vec<(String, String, String)>) {
    let mut text = shape.text.clone();
    let mut calls = Vec::new();
    let mut problems = Vec::new();
    match &shape.tools {
        None => {}
        Some(ToolDirective::One { name, args }) => match (info.tools.iter().any(|(n, _)| n == name), args) {
            (false, _) => {
                problems.push(format!("[emulator] tool `{name}` is not defined in the request's tools."))
            }
            (true, Err(raw)) => {
                problems.push(format!("[emulator] the arguments for `{name}` are not a JSON object: {raw}"))
            }
            (true, Ok(args)) => calls.push((name.clone(), args.clone())),
        },
        Some(ToolDirective::FirstTwo) => {
            if info.tools.is_empty() {
                problems.push("[emulator] tools2: the request defines no tools.".to_owned());
            }
            for (name, schema) in info.tools.iter().take(2) {
                calls.push((name.clone(), generate_args(schema)));
            }
        }
    }
    if !problems.is_empty() {
        for p in &problems {
            tracing::debug!(problem = %p, "emulator: tool directive not followed");
        }
        let joined = problems.join("\n");
        text = Some(match text {
            Some(t) if !t.is_empty() => format!("{t}\n{joined}"),
            _ => joined,
        });
    }
    let mut text = match text {
        Some(text) => text,
        None if !calls.is_empty() => String::new(),
        None => default_text(info),
    };
    if shape.thinking_tags {
        let words = strip_directives(&info.content).split_whitespace().count();
        let thinking = format!(
            "<thinking>\nThe user wrote {words} words. I should answer briefly and plainly.\n</thinking>\n\n"
        );
        text = format!("{thinking}{text}");
    }
    let calls = calls
        .into_iter()
        .map(|(name, args)| (ids.tool_use_id(), name, serde_json::to_string(&args).unwrap_or_default()))
        .collect();
    (text, calls)
}

/// The reply to a request without a text or tool directive.
fn default_text(info: &RequestInfo) -> String {
    if !info.tool_results.is_empty() {
        let acks: Vec<String> = info
            .tool_results
            .iter()
            .map(|r| {
                format!("I received the tool result: {}", r.chars().take(ECHO_CHARS).collect::<String>())
            })
            .collect();
        return acks.join("\n");
    }
    let said: String = strip_directives(&info.content).chars().take(ECHO_CHARS).collect();
    format!("Hello from the Amazon Q emulator. You said: {said}")
}

/// Exactly `chars` characters of readable filler.
pub fn long_text(chars: usize) -> String {
    const WORDS: &[&str] = &[
        "the",
        "emulator",
        "streams",
        "a",
        "long",
        "reply",
        "in",
        "many",
        "small",
        "fragments",
        "so",
        "that",
        "clients",
        "see",
        "output",
        "arrive",
        "steadily",
        "over",
        "time.",
    ];
    let mut out = String::with_capacity(chars + 16);
    let mut i = 0usize;
    while out.len() < chars {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(WORDS[i % WORDS.len()]);
        i += 1;
    }
    out.truncate(chars); // ASCII only: every index is a char boundary.
    out
}

/// Arguments that satisfy a simple JSON schema: the required properties (all of them when none
/// is listed), each with a value of its declared type.
pub fn generate_args(schema: &Value) -> Value {
    let mut args = Map::new();
    let Some(props) = schema.get("properties").and_then(Value::as_object) else {
        return Value::Object(args);
    };
    let required: Vec<&str> = schema
        .get("required")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    for (name, prop) in props {
        if required.is_empty() || required.contains(&name.as_str()) {
            args.insert(name.clone(), example_value(prop));
        }
    }
    Value::Object(args)
}

fn example_value(prop: &Value) -> Value {
    if let Some(first) = prop.get("enum").and_then(Value::as_array).and_then(|e| e.first()) {
        return first.clone();
    }
    let ty = match prop.get("type") {
        Some(Value::String(t)) => t.as_str(),
        Some(Value::Array(types)) => {
            types.iter().filter_map(Value::as_str).find(|t| *t != "null").unwrap_or("null")
        }
        _ => "string",
    };
    match ty {
        "integer" => json!(1),
        "number" => json!(1.5),
        "boolean" => json!(true),
        "array" => json!([]),
        "object" => generate_args(prop),
        "null" => Value::Null,
        _ => json!("example"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::eventstream::Decoder;

    #[test]
    fn fragments_cover_the_text_in_pieces_of_one_to_twelve_chars() {
        let text = "Héllo wörld, this is a reply with ünïcödé in it and more than twelve characters.";
        let parts: Vec<&str> = fragments(text).collect();
        assert_eq!(parts.concat(), text);
        assert!(parts.iter().all(|p| (1..=12).contains(&p.chars().count())), "{parts:?}");
        let lens: std::collections::HashSet<usize> = parts.iter().map(|p| p.chars().count()).collect();
        assert!(lens.len() > 2, "fragment lengths vary: {parts:?}");
        assert_eq!(parts, fragments(text).collect::<Vec<_>>(), "deterministic");
    }

    proptest::proptest! {
        #[test]
        fn fragments_rejoin_to_any_text(text in "\\PC{0,200}") {
            let parts: Vec<&str> = fragments(&text).collect();
            proptest::prop_assert_eq!(parts.concat(), text.clone());
            proptest::prop_assert!(parts.iter().all(|p| (1..=12).contains(&p.chars().count())));
        }
    }

    #[test]
    fn long_text_has_the_exact_length() {
        for n in [0, 1, 5, 1000, 12345] {
            assert_eq!(long_text(n).chars().count(), n);
        }
    }

    #[test]
    fn generated_args_follow_the_schema() {
        let schema = json!({
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "unit": {"enum": ["celsius", "fahrenheit"]},
                "extra": {"type": "boolean"}
            },
            "required": ["city", "days", "unit"]
        });
        assert_eq!(generate_args(&schema), json!({"city": "example", "days": 1, "unit": "celsius"}));
        assert_eq!(generate_args(&json!({"type": "object"})), json!({}));
    }

    #[test]
    fn frames_decode_with_the_expected_headers() {
        let mut decoder = Decoder::new();
        decoder.push(&event_frame("assistantResponseEvent", &json!({"content": "hi"})));
        decoder.push(&exception_frame("error", &json!({"message": "boom"})));
        let event = decoder.next_frame().unwrap().unwrap();
        assert_eq!(event.header_str(":message-type"), Some("event"));
        assert_eq!(event.header_str(":event-type"), Some("assistantResponseEvent"));
        assert_eq!(event.header_str(":content-type"), Some("application/json"));
        assert_eq!(&event.payload[..], br#"{"content":"hi"}"#);
        let exception = decoder.next_frame().unwrap().unwrap();
        assert_eq!(exception.header_str(":message-type"), Some("exception"));
        assert_eq!(exception.header_str(":exception-type"), Some("error"));
        let mut decoder = Decoder::new();
        decoder.push(&corrupt(&event_frame("x", &json!({}))));
        assert!(matches!(
            decoder.next_frame(),
            Err(crate::upstream::eventstream::DecodeError::MessageChecksumMismatch { .. })
        ));
    }
}
