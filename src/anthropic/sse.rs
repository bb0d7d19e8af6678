//! Claude streaming events and their SSE wire form: every frame is `event: NAME\ndata: JSON\n\n`
//! and the JSON's `type` equals NAME (the Python SDK drops frames without an `event:` line).

use super::error::ApiError;
use bytes::Bytes;
use serde_json::{Value, json};

/// Usage as Claude reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
}

impl Usage {
    pub fn to_json(self) -> Value {
        json!({
            "input_tokens": self.input_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": self.output_tokens,
        })
    }
}

/// The start of a content block.
#[derive(Debug, Clone, PartialEq)]
pub enum BlockStart {
    Text,
    ToolUse { id: String, name: String },
    Thinking,
    RedactedThinking { data: String },
}

/// A content-block delta.
#[derive(Debug, Clone, PartialEq)]
pub enum Delta {
    Text(String),
    InputJson(String),
    Thinking(String),
    Signature(String),
}

/// One Claude streaming event.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    MessageStart { id: String, model: String, usage: Usage },
    Ping,
    BlockStart { index: usize, block: BlockStart },
    BlockDelta { index: usize, delta: Delta },
    BlockStop { index: usize },
    MessageDelta { stop_reason: String, stop_sequence: Option<String>, usage: Usage },
    MessageStop,
    Error(ApiError),
}

impl StreamEvent {
    pub fn name(&self) -> &'static str {
        match self {
            StreamEvent::MessageStart { .. } => "message_start",
            StreamEvent::Ping => "ping",
            StreamEvent::BlockStart { .. } => "content_block_start",
            StreamEvent::BlockDelta { .. } => "content_block_delta",
            StreamEvent::BlockStop { .. } => "content_block_stop",
            StreamEvent::MessageDelta { .. } => "message_delta",
            StreamEvent::MessageStop => "message_stop",
            StreamEvent::Error(_) => "error",
        }
    }

    /// The `data:` JSON of the event.
    pub fn data(&self) -> Value {
        match self {
            StreamEvent::MessageStart { id, model, usage } => json!({
                "type": "message_start",
                "message": {
                    "id": id, "type": "message", "role": "assistant", "model": model,
                    "content": [], "stop_reason": null, "stop_sequence": null,
                    "usage": usage.to_json(),
                }
            }),
            StreamEvent::Ping => json!({"type": "ping"}),
            StreamEvent::BlockStart { index, block } => {
                let cb = match block {
                    BlockStart::Text => json!({"type": "text", "text": ""}),
                    BlockStart::ToolUse { id, name } => {
                        json!({"type": "tool_use", "id": id, "name": name, "input": {}})
                    }
                    BlockStart::Thinking => json!({"type": "thinking", "thinking": "", "signature": ""}),
                    BlockStart::RedactedThinking { data } => {
                        json!({"type": "redacted_thinking", "data": data})
                    }
                };
                json!({"type": "content_block_start", "index": index, "content_block": cb})
            }
            StreamEvent::BlockDelta { index, delta } => {
                let d = match delta {
                    Delta::Text(t) => json!({"type": "text_delta", "text": t}),
                    Delta::InputJson(p) => json!({"type": "input_json_delta", "partial_json": p}),
                    Delta::Thinking(t) => json!({"type": "thinking_delta", "thinking": t}),
                    Delta::Signature(s) => json!({"type": "signature_delta", "signature": s}),
                };
                json!({"type": "content_block_delta", "index": index, "delta": d})
            }
            StreamEvent::BlockStop { index } => json!({"type": "content_block_stop", "index": index}),
            StreamEvent::MessageDelta { stop_reason, stop_sequence, usage } => json!({
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                "usage": usage.to_json(),
            }),
            StreamEvent::MessageStop => json!({"type": "message_stop"}),
            StreamEvent::Error(e) => e.sse_data(),
        }
    }

    /// The SSE frame.
    pub fn to_sse(&self) -> Bytes {
        let mut out = Vec::with_capacity(64);
        self.write_sse(&mut out);
        Bytes::from(out)
    }

    /// Appends the SSE frame to `out`.
    pub fn write_sse(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(self.name().as_bytes());
        out.extend_from_slice(b"\ndata: ");
        let written = match self {
            // Nearly every event of a stream is a delta: serialised straight from the borrowed
            // text, the same bytes as `data()` gives without building a `Value` map each time.
            StreamEvent::BlockDelta { index, delta } => serde_json::to_writer(
                &mut *out,
                &DeltaFrame { kind: "content_block_delta", index: *index, delta: delta.into() },
            ),
            _ => serde_json::to_writer(&mut *out, &self.data()),
        };
        written.expect("serialising JSON to a Vec cannot fail");
        out.extend_from_slice(b"\n\n");
    }
}

/// `content_block_delta` data with the members in `data()`'s order.
#[derive(serde::Serialize)]
struct DeltaFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    index: usize,
    delta: DeltaData<'a>,
}

#[derive(serde::Serialize)]
#[serde(tag = "type")]
enum DeltaData<'a> {
    #[serde(rename = "text_delta")]
    Text { text: &'a str },
    #[serde(rename = "input_json_delta")]
    InputJson { partial_json: &'a str },
    #[serde(rename = "thinking_delta")]
    Thinking { thinking: &'a str },
    #[serde(rename = "signature_delta")]
    Signature { signature: &'a str },
}

impl<'a> From<&'a Delta> for DeltaData<'a> {
    fn from(d: &'a Delta) -> Self {
        match d {
            Delta::Text(text) => DeltaData::Text { text },
            Delta::InputJson(partial_json) => DeltaData::InputJson { partial_json },
            Delta::Thinking(thinking) => DeltaData::Thinking { thinking },
            Delta::Signature(signature) => DeltaData::Signature { signature },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_have_event_line_and_matching_type() {
        let evs = [
            StreamEvent::MessageStart { id: "msg_1".into(), model: "m".into(), usage: Usage::default() },
            StreamEvent::Ping,
            StreamEvent::BlockStart { index: 0, block: BlockStart::Text },
            StreamEvent::BlockDelta { index: 0, delta: Delta::Text("a\nb".into()) },
            StreamEvent::BlockStop { index: 0 },
            StreamEvent::MessageDelta {
                stop_reason: "end_turn".into(),
                stop_sequence: None,
                usage: Usage::default(),
            },
            StreamEvent::MessageStop,
            StreamEvent::Error(ApiError::new(super::super::ErrorKind::Overloaded, "busy")),
        ];
        for e in evs {
            let s = String::from_utf8(e.to_sse().to_vec()).unwrap();
            let mut lines = s.split('\n');
            let ev = lines.next().unwrap().strip_prefix("event: ").unwrap();
            let data: Value =
                serde_json::from_str(lines.next().unwrap().strip_prefix("data: ").unwrap()).unwrap();
            assert_eq!(data["type"], ev);
            assert!(s.ends_with("\n\n") && s.matches('\n').count() == 3, "{s:?}");
        }
    }

    #[test]
    fn deltas_serialise_exactly_as_their_json_value() {
        let texts = [
            "",
            "plain",
            "quote \" backslash \\ newline \n tab \t",
            "\u{0}\u{1f}\u{7f}",
            "héllo → ✓ 😀",
            "</script>",
        ];
        for (i, t) in texts.iter().enumerate() {
            for delta in [
                Delta::Text(t.to_string()),
                Delta::InputJson(t.to_string()),
                Delta::Thinking(t.to_string()),
                Delta::Signature(t.to_string()),
            ] {
                let e = StreamEvent::BlockDelta { index: i * 7, delta };
                let expected = format!("event: content_block_delta\ndata: {}\n\n", e.data());
                assert_eq!(String::from_utf8(e.to_sse().to_vec()).unwrap(), expected);
            }
        }
    }
}
