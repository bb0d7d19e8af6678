//! Claude streaming events and their SSE wire form: every frame is `event: NAME\ndata: JSON\n\n`
//! and the JSON's `type` equals NAME (the Python SDK drops frames without an `event:` line).

use super::error::ApiError;
use bytes::Bytes;
use serde_json::{Value, json};

/// Usage as Claude reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Input neither read from nor written to the cache (Anthropic's meaning).
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Input written to the cache: the service's figure, 0 when it gives none (never invented).
    pub cache_creation_input_tokens: u64,
    /// Input read from the cache: the service's figure, 0 when it gives none.
    pub cache_read_input_tokens: u64,
}

impl Usage {
    /// Input and output only (no cache figures).
    pub fn new(input_tokens: u64, output_tokens: u64) -> Usage {
        Usage { input_tokens, output_tokens, ..Usage::default() }
    }

    /// All the input: uncached, written to and read from the cache.
    pub fn total_input(&self) -> u64 {
        self.input_tokens
            .saturating_add(self.cache_creation_input_tokens)
            .saturating_add(self.cache_read_input_tokens)
    }

    pub fn to_json(self) -> Value {
        json!({
            "input_tokens": self.input_tokens,
            "cache_creation_input_tokens": self.cache_creation_input_tokens,
            "cache_read_input_tokens": self.cache_read_input_tokens,
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
    ///
    /// The events of an ordinary stream are written from fixed pieces and escaped strings —
    /// the same bytes as serialising `data()` (the tests compare every kind) without building
    /// a `Value` map or going through the serialiser for every fragment; the rest (errors,
    /// tool and thinking block starts) are serialised from `data()`.
    pub fn write_sse(&self, out: &mut Vec<u8>) {
        // One reservation for the whole frame (growing the buffer piece by piece showed in
        // profiles): the fixed parts of the largest ordinary event are under 320 bytes.
        let variable = match self {
            StreamEvent::BlockDelta { delta, .. } => match delta {
                Delta::Text(t) | Delta::InputJson(t) | Delta::Thinking(t) | Delta::Signature(t) => t.len(),
            },
            StreamEvent::MessageStart { id, model, .. } => id.len() + model.len(),
            StreamEvent::MessageDelta { stop_reason, stop_sequence, .. } => {
                stop_reason.len() + stop_sequence.as_ref().map_or(0, String::len)
            }
            _ => 0,
        };
        out.reserve(320 + variable + variable / 8);
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(self.name().as_bytes());
        out.extend_from_slice(b"\ndata: ");
        match self {
            StreamEvent::BlockDelta { index, delta } => {
                let (kind, key, text) = match delta {
                    Delta::Text(t) => ("text_delta", "text", t),
                    Delta::InputJson(t) => ("input_json_delta", "partial_json", t),
                    Delta::Thinking(t) => ("thinking_delta", "thinking", t),
                    Delta::Signature(t) => ("signature_delta", "signature", t),
                };
                out.extend_from_slice(b"{\"type\":\"content_block_delta\",\"index\":");
                write_usize(out, *index);
                out.extend_from_slice(b",\"delta\":{\"type\":\"");
                out.extend_from_slice(kind.as_bytes());
                out.extend_from_slice(b"\",\"");
                out.extend_from_slice(key.as_bytes());
                out.extend_from_slice(b"\":");
                write_json_str(out, text);
                out.extend_from_slice(b"}}");
            }
            StreamEvent::Ping => out.extend_from_slice(b"{\"type\":\"ping\"}"),
            StreamEvent::MessageStop => out.extend_from_slice(b"{\"type\":\"message_stop\"}"),
            StreamEvent::BlockStop { index } => {
                out.extend_from_slice(b"{\"type\":\"content_block_stop\",\"index\":");
                write_usize(out, *index);
                out.push(b'}');
            }
            StreamEvent::BlockStart { index, block: BlockStart::Text } => {
                out.extend_from_slice(b"{\"type\":\"content_block_start\",\"index\":");
                write_usize(out, *index);
                out.extend_from_slice(b",\"content_block\":{\"type\":\"text\",\"text\":\"\"}}");
            }
            StreamEvent::MessageStart { id, model, usage } => {
                out.extend_from_slice(b"{\"type\":\"message_start\",\"message\":{\"id\":");
                write_json_str(out, id);
                out.extend_from_slice(b",\"type\":\"message\",\"role\":\"assistant\",\"model\":");
                write_json_str(out, model);
                out.extend_from_slice(
                    b",\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,\"usage\":",
                );
                write_usage(out, usage);
                out.extend_from_slice(b"}}");
            }
            StreamEvent::MessageDelta { stop_reason, stop_sequence, usage } => {
                out.extend_from_slice(b"{\"type\":\"message_delta\",\"delta\":{\"stop_reason\":");
                write_json_str(out, stop_reason);
                out.extend_from_slice(b",\"stop_sequence\":");
                match stop_sequence {
                    Some(s) => write_json_str(out, s),
                    None => out.extend_from_slice(b"null"),
                }
                out.extend_from_slice(b"},\"usage\":");
                write_usage(out, usage);
                out.push(b'}');
            }
            _ => {
                serde_json::to_writer(&mut *out, &self.data()).expect("serialising JSON to a Vec cannot fail")
            }
        }
        out.extend_from_slice(b"\n\n");
    }
}

/// `Usage::to_json()`'s bytes.
fn write_usage(out: &mut Vec<u8>, u: &Usage) {
    out.extend_from_slice(b"{\"input_tokens\":");
    write_u64(out, u.input_tokens);
    out.extend_from_slice(b",\"cache_creation_input_tokens\":");
    write_u64(out, u.cache_creation_input_tokens);
    out.extend_from_slice(b",\"cache_read_input_tokens\":");
    write_u64(out, u.cache_read_input_tokens);
    out.extend_from_slice(b",\"output_tokens\":");
    write_u64(out, u.output_tokens);
    out.push(b'}');
}

fn write_usize(out: &mut Vec<u8>, n: usize) {
    write_u64(out, n as u64);
}

fn write_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Appends `s` as a JSON string, escaped as serde_json escapes: the quote, the backslash and
/// the control characters below U+0020 (b, t, n, f and r by name, the rest as `u00xx`); nothing
/// else.
pub fn write_json_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    out.push(b'"');
    let mut run = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0x00..=0x1f => &[b'\\', b'u', b'0', b'0', HEX[(b >> 4) as usize], HEX[(b & 0xf) as usize]],
            _ => continue,
        };
        out.extend_from_slice(&bytes[run..i]);
        out.extend_from_slice(esc);
        run = i + 1;
    }
    out.extend_from_slice(&bytes[run..]);
    out.push(b'"');
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
    fn every_event_serialises_exactly_as_its_json_value() {
        let usage = Usage {
            input_tokens: 12_345,
            output_tokens: u64::MAX,
            cache_creation_input_tokens: 7,
            cache_read_input_tokens: 9,
        };
        let evs = [
            StreamEvent::MessageStart { id: "msg_\"1".into(), model: "claude-\u{1}x".into(), usage },
            StreamEvent::MessageStart { id: String::new(), model: String::new(), usage: Usage::default() },
            StreamEvent::Ping,
            StreamEvent::BlockStart { index: 0, block: BlockStart::Text },
            StreamEvent::BlockStart { index: 31, block: BlockStart::Text },
            StreamEvent::BlockStart {
                index: 2,
                block: BlockStart::ToolUse { id: "toolu_1".into(), name: "get\"x".into() },
            },
            StreamEvent::BlockStart { index: 3, block: BlockStart::Thinking },
            StreamEvent::BlockStart { index: 4, block: BlockStart::RedactedThinking { data: "ab==".into() } },
            StreamEvent::BlockStop { index: 0 },
            StreamEvent::BlockStop { index: usize::MAX },
            StreamEvent::MessageDelta { stop_reason: "end_turn".into(), stop_sequence: None, usage },
            StreamEvent::MessageDelta {
                stop_reason: "stop_sequence".into(),
                stop_sequence: Some("\n\nHuman:\t\"".into()),
                usage: Usage::default(),
            },
            StreamEvent::MessageStop,
            StreamEvent::Error(ApiError::new(super::super::ErrorKind::Overloaded, "busy \"now\"")),
        ];
        for e in evs {
            let expected = format!("event: {}\ndata: {}\n\n", e.name(), e.data());
            assert_eq!(String::from_utf8(e.to_sse().to_vec()).unwrap(), expected);
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

    proptest::proptest! {
        #[test]
        fn strings_escape_as_serde_json_escapes(s in "(?s).{0,40}", ctl in proptest::collection::vec(0u8..0x20, 0..4)) {
            let s = format!("{s}{}", ctl.iter().map(|&c| c as char).collect::<String>());
            let mut out = Vec::new();
            write_json_str(&mut out, &s);
            proptest::prop_assert_eq!(String::from_utf8(out).unwrap(), serde_json::to_string(&s).unwrap());
        }
    }
}
