//! Amazon Q response events: one typed value per event-stream frame, with in-stream
//! exceptions and `error` frames as typed errors (PROTOCOL.md §2 "Response stream").

use super::eventstream::{DecodeError, Frame};
use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;

/// One event of a `GenerateAssistantResponse` stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The first frame of an RPC event stream: the non-stream output members.
    InitialResponse {
        conversation_id: Option<String>,
    },
    /// A fragment of the answer's text.
    AssistantResponse {
        content: String,
    },
    /// A tool-call frame: the first names the tool, later ones add `input` fragments, the
    /// last has `stop: true`.
    ToolUse {
        tool_use_id: String,
        name: String,
        input: Option<String>,
        stop: bool,
    },
    /// Visible reasoning: text, its signature, or redacted (base64) content.
    Reasoning {
        text: Option<String>,
        signature: Option<String>,
        redacted_content: Option<String>,
    },
    MessageMetadata {
        conversation_id: Option<String>,
        utterance_id: Option<String>,
    },
    Metadata {
        token_usage: Option<TokenUsage>,
        /// Why the model stopped (`END_TURN`, `TOOL_USE`, `MAX_TOKENS`), when said.
        stop_reason: Option<String>,
    },
    Metering {
        usage: Option<f64>,
        unit: Option<String>,
    },
    /// Share (0–100) of the model's context window the input used.
    ContextUsage {
        percentage: f64,
    },
    /// An event this daemon has no use for (citations, follow-up prompts, …); skipped safely.
    Unknown {
        event_type: String,
    },
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TokenUsage {
    pub uncached_input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub total_tokens: Option<u64>,
    pub cache_read_input_tokens: Option<u64>,
    pub cache_write_input_tokens: Option<u64>,
}

/// Why a stream stopped before it ended cleanly.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum StreamError {
    /// A modelled exception frame (`:message-type: exception`).
    #[error("upstream exception {exception_type}: {message}")]
    Exception { exception_type: String, message: String, reason: Option<String> },
    /// An unmodelled `error` frame.
    #[error("upstream error {code}: {message}")]
    ErrorFrame { code: String, message: String },
    /// The bytes were not a valid event stream.
    #[error("corrupt event stream: {0}")]
    Decode(#[from] DecodeError),
    /// A known event whose payload did not parse.
    #[error("malformed {event_type} event: {reason}")]
    BadEvent { event_type: String, reason: String },
    /// The connection failed or closed mid-frame.
    #[error("upstream connection failed: {0}")]
    Transport(String),
    /// No bytes for longer than the stream idle timeout.
    #[error("upstream stream silent for {0} s")]
    Idle(u64),
}

impl StreamError {
    /// The output was cut because it grew too long (stop reason `max_tokens`).
    pub fn is_output_truncation(&self) -> bool {
        matches!(self, StreamError::Exception { exception_type, reason, .. }
            if exception_type.contains("ContentLengthExceeded")
                || reason.as_deref().is_some_and(|r| r.contains("CONTENT_LENGTH")))
    }

    /// A capacity problem (`overloaded_error` for the client), as opposed to a fault.
    pub fn is_capacity(&self) -> bool {
        match self {
            StreamError::Exception { exception_type, message, reason } => {
                let r = reason.as_deref().unwrap_or("");
                r.contains("MODEL_TEMPORARILY_UNAVAILABLE")
                    || r.contains("INSUFFICIENT_MODEL_CAPACITY")
                    || exception_type.contains("Throttling")
                    || exception_type.contains("ServiceUnavailable")
                    || message.contains("high traffic")
                    || message.contains("high volume of traffic")
                    || message.contains("unexpectedly high load")
            }
            _ => false,
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ToolUsePayload {
    tool_use_id: String,
    name: String,
    #[serde(default)]
    input: Option<Value>,
    #[serde(default)]
    stop: Option<bool>,
}

/// `assistantResponseEvent`'s payload (other members, such as `modelId`, are skipped).
#[derive(Deserialize)]
struct ContentPayload {
    #[serde(default)]
    content: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct ReasoningPayload {
    text: Option<String>,
    signature: Option<String>,
    redacted_content: Option<String>,
}

/// The text of the usual `assistantResponseEvent` payload, `{"content":"…"}` or
/// `{"content":"…","modelId":"…"}` with neither string escaped, read without a JSON parser
/// (`None` for anything else, which the parser then reads).
fn plain_content(payload: &[u8]) -> Option<String> {
    let plain = |s: &[u8]| !s.iter().any(|&b| b == b'"' || b == b'\\' || b < 0x20);
    let rest = payload.strip_prefix(b"{\"content\":\"")?;
    let end = rest.iter().position(|&b| b == b'"')?;
    let (text, tail) = (&rest[..end], &rest[end + 1..]);
    let tail_ok = tail == b"}"
        || tail.strip_prefix(b",\"modelId\":\"").and_then(|t| t.strip_suffix(b"\"}")).is_some_and(plain);
    if !tail_ok || !plain(text) {
        return None;
    }
    String::from_utf8(text.to_vec()).ok()
}

/// The members of the bookkeeping events (metadata, metering, context usage), borrowed from
/// the payload: each event then costs no JSON tree. Read only from an object, and only when
/// it parses this way (a repeated member does not): anything else takes the general path.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Members<'a> {
    #[serde(borrow, default)]
    conversation_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    utterance_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    token_usage: Option<&'a RawValue>,
    #[serde(borrow, default)]
    usage: Option<&'a RawValue>,
    #[serde(borrow, default)]
    unit: Option<&'a RawValue>,
    #[serde(borrow, default)]
    context_usage_percentage: Option<&'a RawValue>,
    #[serde(borrow, default)]
    stop_reason: Option<&'a RawValue>,
}

fn members(frame: &Frame) -> Option<Members<'_>> {
    match frame.payload.first() {
        Some(b'{') => serde_json::from_slice(&frame.payload).ok(),
        _ => None,
    }
}

/// A member's value when it is of type `T` (as `Value::as_str` and `as_f64` read it).
fn member<'a, T: Deserialize<'a>>(raw: Option<&'a RawValue>) -> Option<T> {
    raw.and_then(|r| serde_json::from_str(r.get()).ok())
}

/// A bookkeeping event from its members (as the general path reads it from a JSON tree).
fn from_members(event_type: &str, m: Members<'_>) -> Event {
    match event_type {
        "messageMetadataEvent" => Event::MessageMetadata {
            conversation_id: member(m.conversation_id),
            utterance_id: member(m.utterance_id),
        },
        "metadataEvent" => {
            Event::Metadata { token_usage: member(m.token_usage), stop_reason: member(m.stop_reason) }
        }
        "meteringEvent" => Event::Metering { usage: member(m.usage), unit: member(m.unit) },
        _ => match member::<f64>(m.context_usage_percentage) {
            Some(p) if p.is_finite() && p >= 0.0 => Event::ContextUsage { percentage: p },
            _ => Event::Unknown { event_type: event_type.to_string() },
        },
    }
}

fn json(frame: &Frame) -> Result<Value, String> {
    if frame.payload.is_empty() {
        return Ok(Value::Object(Default::default()));
    }
    serde_json::from_slice(&frame.payload).map_err(|e| e.to_string())
}

fn str_field(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(str::to_string)
}

/// Turns one frame into an [`Event`], or the error it carries.
pub fn parse_frame(frame: &Frame) -> Result<Event, StreamError> {
    let message_type = frame.header_str(":message-type").unwrap_or("event");
    match message_type {
        "exception" => {
            let exception_type =
                frame.header_str(":exception-type").unwrap_or("UnknownException").to_string();
            let body = json(frame).unwrap_or_default();
            let message = str_field(&body, "message")
                .or_else(|| str_field(&body, "Message"))
                .unwrap_or_else(|| String::from_utf8_lossy(&frame.payload).into_owned());
            Err(StreamError::Exception { exception_type, message, reason: str_field(&body, "reason") })
        }
        "error" => Err(StreamError::ErrorFrame {
            code: frame.header_str(":error-code").unwrap_or("UnknownError").to_string(),
            message: frame.header_str(":error-message").unwrap_or("").to_string(),
        }),
        _ => {
            let event_type = frame.header_str(":event-type").unwrap_or("");
            let bad = |reason: String| StreamError::BadEvent { event_type: event_type.to_string(), reason };
            let body = || json(frame).map_err(bad);
            let bookkeeping = matches!(
                event_type,
                "messageMetadataEvent" | "metadataEvent" | "meteringEvent" | "contextUsageEvent"
            );
            if let Some(m) = bookkeeping.then(|| members(frame)).flatten() {
                return Ok(from_members(event_type, m));
            }
            Ok(match event_type {
                "initial-response" => {
                    // Tolerate an empty or non-JSON initial response: it is informational.
                    let v = json(frame).unwrap_or_default();
                    Event::InitialResponse { conversation_id: str_field(&v, "conversationId") }
                }
                "assistantResponseEvent" => {
                    // Nearly every frame of a stream: read the one member straight into its
                    // string; anything unusual (not an object, a non-string or repeated
                    // `content`, bad JSON) takes the general path and its rules.
                    // (A derived struct would also take a JSON array, hence the `{` check.)
                    let typed = match frame.payload.first() {
                        Some(b'{') => plain_content(&frame.payload).or_else(|| {
                            serde_json::from_slice::<ContentPayload>(&frame.payload).ok()?.content
                        }),
                        _ => None,
                    };
                    match typed {
                        Some(content) => Event::AssistantResponse { content },
                        None => {
                            let v = body()?;
                            Event::AssistantResponse { content: str_field(&v, "content").unwrap_or_default() }
                        }
                    }
                }
                "toolUseEvent" => {
                    let p: ToolUsePayload = serde_json::from_slice(&frame.payload).map_err(|e| {
                        StreamError::BadEvent { event_type: event_type.to_string(), reason: e.to_string() }
                    })?;
                    let input = match p.input {
                        None | Some(Value::Null) => None,
                        Some(Value::String(s)) => Some(s),
                        // Some producers send the arguments as an object already.
                        Some(other) => Some(other.to_string()),
                    };
                    Event::ToolUse {
                        tool_use_id: p.tool_use_id,
                        name: p.name,
                        input,
                        stop: p.stop.unwrap_or(false),
                    }
                }
                "reasoningContentEvent" => {
                    let p: ReasoningPayload =
                        serde_json::from_slice(&frame.payload).map_err(|e| bad(e.to_string()))?;
                    if p.text.is_none() && p.signature.is_none() && p.redacted_content.is_none() {
                        // Nothing in it: no thinking block to open (one with a made-up
                        // signature would only mislead).
                        return Ok(Event::Unknown { event_type: event_type.to_string() });
                    }
                    Event::Reasoning {
                        text: p.text,
                        signature: p.signature,
                        redacted_content: p.redacted_content,
                    }
                }
                "messageMetadataEvent" => {
                    let v = body()?;
                    Event::MessageMetadata {
                        conversation_id: str_field(&v, "conversationId"),
                        utterance_id: str_field(&v, "utteranceId"),
                    }
                }
                "metadataEvent" => {
                    let v = body()?;
                    let token_usage = v
                        .get("tokenUsage")
                        .and_then(|t| serde_json::from_value::<TokenUsage>(t.clone()).ok());
                    Event::Metadata { token_usage, stop_reason: str_field(&v, "stopReason") }
                }
                "meteringEvent" => {
                    let v = body()?;
                    Event::Metering {
                        usage: v.get("usage").and_then(Value::as_f64),
                        unit: str_field(&v, "unit"),
                    }
                }
                "contextUsageEvent" => {
                    let v = body()?;
                    match v.get("contextUsagePercentage").and_then(Value::as_f64) {
                        Some(p) if p.is_finite() && p >= 0.0 => Event::ContextUsage { percentage: p },
                        _ => Event::Unknown { event_type: event_type.to_string() },
                    }
                }
                _ => Event::Unknown { event_type: event_type.to_string() },
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::eventstream::HeaderValue;

    fn event(kind: &str, payload: &str) -> Frame {
        Frame::new()
            .with_header(":message-type", HeaderValue::from("event"))
            .with_header(":event-type", HeaderValue::from(kind.to_string()))
            .with_header(":content-type", HeaderValue::from("application/json"))
            .with_payload(payload.as_bytes().to_vec())
    }

    #[test]
    fn parses_each_event() {
        assert_eq!(
            parse_frame(&event("assistantResponseEvent", r#"{"content":"Hi","modelId":"m"}"#)).unwrap(),
            Event::AssistantResponse { content: "Hi".into() }
        );
        assert_eq!(
            parse_frame(&event("toolUseEvent", r#"{"toolUseId":"t","name":"n","input":"{\"a\""}"#)).unwrap(),
            Event::ToolUse {
                tool_use_id: "t".into(),
                name: "n".into(),
                input: Some("{\"a\"".into()),
                stop: false
            }
        );
        assert_eq!(
            parse_frame(&event("toolUseEvent", r#"{"toolUseId":"t","name":"n","stop":true}"#)).unwrap(),
            Event::ToolUse { tool_use_id: "t".into(), name: "n".into(), input: None, stop: true }
        );
        assert_eq!(
            parse_frame(&event("contextUsageEvent", r#"{"contextUsagePercentage":12.5}"#)).unwrap(),
            Event::ContextUsage { percentage: 12.5 }
        );
        assert_eq!(
            parse_frame(&event("citationEvent", r#"{"x":1}"#)).unwrap(),
            Event::Unknown { event_type: "citationEvent".into() }
        );
        assert!(matches!(
            parse_frame(&event("metadataEvent", r#"{"tokenUsage":{"outputTokens":7}}"#)).unwrap(),
            Event::Metadata {
                token_usage: Some(TokenUsage { output_tokens: Some(7), .. }),
                stop_reason: None
            }
        ));
        assert!(matches!(
            parse_frame(&event("assistantResponseEvent", "{not json")),
            Err(StreamError::BadEvent { .. })
        ));
    }

    /// A reasoning event with nothing in it opens no thinking block; one that is not a
    /// reasoning payload at all is a malformed event, as for every other kind.
    #[test]
    fn empty_or_malformed_reasoning_events() {
        assert_eq!(
            parse_frame(&event("reasoningContentEvent", "{}")).unwrap(),
            Event::Unknown { event_type: "reasoningContentEvent".into() }
        );
        for bad in [r#"{"text":5}"#, "not json", r#"{"signature":[1]}"#] {
            assert!(
                matches!(
                    parse_frame(&event("reasoningContentEvent", bad)),
                    Err(StreamError::BadEvent { .. })
                ),
                "{bad}"
            );
        }
        assert_eq!(
            parse_frame(&event("reasoningContentEvent", r#"{"signature":"AB=="}"#)).unwrap(),
            Event::Reasoning { text: None, signature: Some("AB==".into()), redacted_content: None }
        );
    }

    #[test]
    fn bookkeeping_events_read_alike_on_both_paths() {
        let md = |c: Option<&str>, u: Option<&str>| Event::MessageMetadata {
            conversation_id: c.map(str::to_string),
            utterance_id: u.map(str::to_string),
        };
        let cases: Vec<(&str, &str, Event)> = vec![
            ("messageMetadataEvent", r#"{"conversationId":"c","utteranceId":"u"}"#, md(Some("c"), Some("u"))),
            ("messageMetadataEvent", r#"{"conversationId":5,"utteranceId":null}"#, md(None, None)),
            ("messageMetadataEvent", r#"{"conversationId":"a\u00e9"}"#, md(Some("a\u{e9}"), None)),
            // A repeated member takes the general path: the last one wins.
            ("messageMetadataEvent", r#"{"conversationId":"a","conversationId":"b"}"#, md(Some("b"), None)),
            ("messageMetadataEvent", r#" {"conversationId":"a"}"#, md(Some("a"), None)),
            ("messageMetadataEvent", "", md(None, None)),
            (
                "metadataEvent",
                r#"{"tokenUsage":{"uncachedInputTokens":3,"outputTokens":7,"x":{"y":[1]}}}"#,
                Event::Metadata {
                    token_usage: Some(TokenUsage {
                        uncached_input_tokens: Some(3),
                        output_tokens: Some(7),
                        ..Default::default()
                    }),
                    stop_reason: None,
                },
            ),
            (
                "metadataEvent",
                r#"{"tokenUsage":"many"}"#,
                Event::Metadata { token_usage: None, stop_reason: None },
            ),
            (
                "metadataEvent",
                r#"{"tokenUsage":null,"other":1}"#,
                Event::Metadata { token_usage: None, stop_reason: None },
            ),
            (
                "metadataEvent",
                r#"{"stopReason":"MAX_TOKENS"}"#,
                Event::Metadata { token_usage: None, stop_reason: Some("MAX_TOKENS".into()) },
            ),
            (
                "metadataEvent",
                r#"{"stopReason":"END_TURN","stopReason":"MAX_TOKENS"}"#,
                Event::Metadata { token_usage: None, stop_reason: Some("MAX_TOKENS".into()) },
            ),
            (
                "metadataEvent",
                r#"{"stopReason":7}"#,
                Event::Metadata { token_usage: None, stop_reason: None },
            ),
            (
                "meteringEvent",
                r#"{"usage":0.25,"unit":"credit"}"#,
                Event::Metering { usage: Some(0.25), unit: Some("credit".into()) },
            ),
            ("meteringEvent", r#"{"usage":2}"#, Event::Metering { usage: Some(2.0), unit: None }),
            ("meteringEvent", r#"{"usage":"2","unit":3}"#, Event::Metering { usage: None, unit: None }),
            (
                "contextUsageEvent",
                r#"{"contextUsagePercentage":12}"#,
                Event::ContextUsage { percentage: 12.0 },
            ),
            (
                "contextUsageEvent",
                r#"{"contextUsagePercentage":-1}"#,
                Event::Unknown { event_type: "contextUsageEvent".into() },
            ),
            (
                "contextUsageEvent",
                r#"{"contextUsagePercentage":"9"}"#,
                Event::Unknown { event_type: "contextUsageEvent".into() },
            ),
        ];
        for (kind, payload, want) in cases {
            assert_eq!(parse_frame(&event(kind, payload)).unwrap(), want, "{kind} {payload}");
        }
        // Not JSON at all stays an error of the event.
        assert!(matches!(parse_frame(&event("meteringEvent", "{usage")), Err(StreamError::BadEvent { .. })));
    }

    #[test]
    fn unusual_text_payloads_keep_the_general_rules() {
        let text = |payload: &str| match parse_frame(&event("assistantResponseEvent", payload)) {
            Ok(Event::AssistantResponse { content }) => Ok(content),
            other => Err(format!("{other:?}")),
        };
        assert_eq!(text(r#"{"content":"a\u00e9\n\"b"}"#).unwrap(), "a\u{e9}\n\"b");
        assert_eq!(text(r#"{"content":null}"#).unwrap(), "");
        assert_eq!(text(r#"{"content":5}"#).unwrap(), "", "a non-string content is no text");
        assert_eq!(text(r#"["content"]"#).unwrap(), "", "a non-object payload is no text");
        assert_eq!(text(r#"{"content":"a","content":"b"}"#).unwrap(), "b", "the last member wins");
        assert_eq!(text("").unwrap(), "");
        assert!(text(r#"{"content":"a""#).is_err());
    }

    proptest::proptest! {
        #[test]
        fn the_plain_reading_agrees_with_the_parser(
            content in "(?s).{0,24}",
            model in proptest::option::of("[ -~]{0,12}"),
            spaced in proptest::bool::ANY,
        ) {
            let mut v = serde_json::Map::new();
            v.insert("content".into(), Value::String(content.clone()));
            if let Some(m) = &model {
                v.insert("modelId".into(), Value::String(m.clone()));
            }
            let mut payload = serde_json::to_string(&v).unwrap();
            if spaced {
                payload = payload.replacen(':', ": ", 1);
            }
            let ev = parse_frame(&event("assistantResponseEvent", &payload)).unwrap();
            proptest::prop_assert_eq!(ev, Event::AssistantResponse { content });
        }
    }

    #[test]
    fn exceptions_and_errors() {
        let f = Frame::new()
            .with_header(":message-type", HeaderValue::from("exception"))
            .with_header(":exception-type", HeaderValue::from("ContentLengthExceededException"))
            .with_payload(br#"{"message":"too long"}"#.to_vec());
        let e = parse_frame(&f).unwrap_err();
        assert!(e.is_output_truncation());
        let f = Frame::new()
            .with_header(":message-type", HeaderValue::from("exception"))
            .with_header(":exception-type", HeaderValue::from("error"))
            .with_payload(br#"{"message":"busy","reason":"MODEL_TEMPORARILY_UNAVAILABLE"}"#.to_vec());
        let e = parse_frame(&f).unwrap_err();
        assert!(e.is_capacity() && !e.is_output_truncation());
        let f = Frame::new()
            .with_header(":message-type", HeaderValue::from("error"))
            .with_header(":error-code", HeaderValue::from("InternalFailure"))
            .with_header(":error-message", HeaderValue::from("boom"));
        assert_eq!(
            parse_frame(&f).unwrap_err(),
            StreamError::ErrorFrame { code: "InternalFailure".into(), message: "boom".into() }
        );
    }
}
