//! The Claude streaming grammar, as Anthropic documents it, checked over a whole stream:
//! `message_start` first and once; content blocks one at a time, with consecutive indices, each
//! `content_block_start`, deltas of its own index and kind (`text_delta` in a text block,
//! `input_json_delta` in a tool_use block, `thinking_delta`s then exactly one `signature_delta`
//! in a thinking block, none in a redacted_thinking block), `content_block_stop`;
//! `message_delta` only while no block is open; then `message_stop` — or an `error` event, which
//! ends the stream (a tool call cut short is the one block an error may leave open); `ping`
//! anywhere; nothing after the end. One copy, for the integration tests (over SSE frames as a
//! client parses them) and the fuzz targets (over the state machine's typed events).

use super::sse::{BlockStart, Delta, StreamEvent};
use serde_json::Value;
use std::collections::BTreeMap;

/// What a well-formed stream carried.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    /// The text deltas, joined.
    pub text: String,
    /// The tool calls that were closed (so presented as whole), by block index, with their
    /// streamed input JSON.
    pub closed_tools: BTreeMap<usize, String>,
    /// The thinking blocks that were closed, in order: (thinking text, signature).
    pub thinking: Vec<(String, String)>,
    /// The redacted_thinking blocks, in order: their `data`.
    pub redacted: Vec<String>,
    /// `message_delta`'s stop reason, when the stream got that far.
    pub stop_reason: Option<String>,
    /// True when the stream ended with an `error` event.
    pub errored: bool,
}

/// The kind of a content block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    Tool,
    Thinking,
    Redacted,
}

/// A delta as the grammar sees it.
enum DeltaStep<'a> {
    Text(&'a str),
    InputJson(&'a str),
    Thinking(&'a str),
    Signature(&'a str),
}

/// One event as the grammar sees it.
enum Step<'a> {
    MessageStart,
    Ping,
    /// `data`: a redacted_thinking block's.
    BlockStart {
        index: usize,
        kind: Kind,
        data: Option<&'a str>,
    },
    BlockDelta {
        index: usize,
        delta: DeltaStep<'a>,
    },
    BlockStop {
        index: usize,
    },
    MessageDelta {
        stop_reason: Option<&'a str>,
    },
    MessageStop,
    Error,
}

/// The open block: index, kind, and for a thinking block its text and signature so far.
struct OpenBlock {
    index: usize,
    kind: Kind,
    thinking: String,
    signature: Option<String>,
}

#[derive(Default)]
struct Checker {
    started: bool,
    open: Option<OpenBlock>,
    next: usize,
    ended: bool,
    tool_inputs: BTreeMap<usize, String>,
    summary: Summary,
}

impl Checker {
    fn step(&mut self, n: usize, step: Step<'_>) -> Result<(), String> {
        if self.ended {
            return Err(format!("event {n} after the end of the stream"));
        }
        if !self.started && !matches!(step, Step::MessageStart) {
            return Err(format!("event {n} comes before message_start"));
        }
        match step {
            Step::MessageStart if self.started => return Err(format!("a second message_start at {n}")),
            Step::MessageStart => self.started = true,
            Step::Ping => {}
            Step::BlockStart { index, kind, data } => {
                if let Some(open) = &self.open {
                    return Err(format!("block {index} starts at {n} while block {} is open", open.index));
                }
                if index != self.next {
                    return Err(format!("block index {index} at {n}, expected {}", self.next));
                }
                self.open = Some(OpenBlock { index, kind, thinking: String::new(), signature: None });
                match kind {
                    Kind::Tool => {
                        self.tool_inputs.insert(index, String::new());
                    }
                    Kind::Redacted => self.summary.redacted.push(data.unwrap_or_default().to_owned()),
                    Kind::Text | Kind::Thinking => {}
                }
                self.next += 1;
            }
            Step::BlockDelta { index, delta } => {
                let Some(open) = self.open.as_mut().filter(|o| o.index == index) else {
                    let open = self.open.as_ref().map(|o| o.index);
                    return Err(format!("a delta for block {index} at {n}, open: {open:?}"));
                };
                if open.signature.is_some() {
                    return Err(format!("a delta after the signature_delta of block {index} at {n}"));
                }
                match (open.kind, delta) {
                    (Kind::Text, DeltaStep::Text(t)) => self.summary.text.push_str(t),
                    (Kind::Tool, DeltaStep::InputJson(p)) => {
                        if let Some(acc) = self.tool_inputs.get_mut(&index) {
                            acc.push_str(p);
                        }
                    }
                    (Kind::Thinking, DeltaStep::Thinking(t)) => open.thinking.push_str(t),
                    (Kind::Thinking, DeltaStep::Signature(s)) => open.signature = Some(s.to_owned()),
                    (kind, _) => {
                        return Err(format!("a delta of the wrong kind for {kind:?} block {index} at {n}"));
                    }
                }
            }
            Step::BlockStop { index } => {
                let Some(open) = self.open.take().filter(|o| o.index == index) else {
                    return Err(format!(
                        "a stop for block {index} at {n}, open: {:?}",
                        self.open.as_ref().map(|o| o.index)
                    ));
                };
                if open.kind == Kind::Thinking {
                    let Some(signature) = open.signature else {
                        return Err(format!("thinking block {index} stops at {n} without a signature_delta"));
                    };
                    self.summary.thinking.push((open.thinking, signature));
                }
                if let Some(input) = self.tool_inputs.remove(&index) {
                    self.summary.closed_tools.insert(index, input);
                }
            }
            Step::MessageDelta { stop_reason } => {
                if let Some(open) = &self.open {
                    return Err(format!("message_delta at {n} while block {} is open", open.index));
                }
                self.summary.stop_reason = stop_reason.map(str::to_owned);
            }
            Step::MessageStop => {
                if let Some(open) = &self.open {
                    return Err(format!("message_stop at {n} while block {} is open", open.index));
                }
                self.ended = true;
            }
            Step::Error => {
                // Only a cut tool call may stay open: a text or thinking block is closed first.
                if let Some(open) = self.open.as_ref().filter(|o| o.kind != Kind::Tool) {
                    return Err(format!("error at {n} while text/thinking block {} is open", open.index));
                }
                self.summary.errored = true;
                self.ended = true;
            }
        }
        Ok(())
    }

    fn finish(self) -> Result<Summary, String> {
        if !self.ended {
            return Err("the stream ended without message_stop or error".into());
        }
        Ok(self.summary)
    }
}

/// Checks the state machine's typed events.
pub fn check_events(events: &[StreamEvent]) -> Result<Summary, String> {
    let mut c = Checker::default();
    for (n, e) in events.iter().enumerate() {
        let step = match e {
            StreamEvent::MessageStart { .. } => Step::MessageStart,
            StreamEvent::Ping => Step::Ping,
            StreamEvent::BlockStart { index, block } => {
                let (kind, data) = match block {
                    BlockStart::Text => (Kind::Text, None),
                    BlockStart::ToolUse { .. } => (Kind::Tool, None),
                    BlockStart::Thinking => (Kind::Thinking, None),
                    BlockStart::RedactedThinking { data } => (Kind::Redacted, Some(data.as_str())),
                };
                Step::BlockStart { index: *index, kind, data }
            }
            StreamEvent::BlockDelta { index, delta } => Step::BlockDelta {
                index: *index,
                delta: match delta {
                    Delta::Text(t) => DeltaStep::Text(t),
                    Delta::InputJson(p) => DeltaStep::InputJson(p),
                    Delta::Thinking(t) => DeltaStep::Thinking(t),
                    Delta::Signature(s) => DeltaStep::Signature(s),
                },
            },
            StreamEvent::BlockStop { index } => Step::BlockStop { index: *index },
            StreamEvent::MessageDelta { stop_reason, .. } => {
                Step::MessageDelta { stop_reason: Some(stop_reason) }
            }
            StreamEvent::MessageStop => Step::MessageStop,
            StreamEvent::Error(_) => Step::Error,
        };
        c.step(n, step)?;
    }
    c.finish()
}

/// Checks SSE frames as a client parses them (event name, data JSON): the grammar, plus what
/// the SDKs need of each frame — the data's `type` equals the event name, `message_start`
/// carries a whole message (`usage` and `content` included: the Python SDK crashes without),
/// `message_delta` a numeric `usage.output_tokens`. Unknown event names are skipped, as
/// clients do.
pub fn check_frames<'a>(frames: impl IntoIterator<Item = (&'a str, &'a Value)>) -> Result<Summary, String> {
    let mut c = Checker::default();
    for (n, (name, data)) in frames.into_iter().enumerate() {
        if data["type"] != *name {
            return Err(format!("frame {n}: event {name} carries data of type {}", data["type"]));
        }
        let index = || {
            data["index"]
                .as_u64()
                .map(|i| i as usize)
                .ok_or_else(|| format!("frame {n}: {name} without an index"))
        };
        let step = match name {
            "message_start" => {
                let m = &data["message"];
                for key in ["id", "type", "role", "model", "content", "stop_reason", "stop_sequence", "usage"]
                {
                    if m.get(key).is_none() {
                        return Err(format!("message_start lacks message.{key}"));
                    }
                }
                Step::MessageStart
            }
            "ping" => Step::Ping,
            "content_block_start" => {
                let block = &data["content_block"];
                let kind = match block["type"].as_str() {
                    Some("text") => Kind::Text,
                    Some("tool_use") => Kind::Tool,
                    Some("thinking") => Kind::Thinking,
                    Some("redacted_thinking") => Kind::Redacted,
                    other => return Err(format!("frame {n}: a content block of type {other:?}")),
                };
                Step::BlockStart { index: index()?, kind, data: block["data"].as_str() }
            }
            "content_block_delta" => {
                let d = &data["delta"];
                let field = |key: &str| {
                    d[key].as_str().ok_or_else(|| format!("frame {n}: {} without a string {key}", d["type"]))
                };
                let delta = match d["type"].as_str() {
                    Some("text_delta") => DeltaStep::Text(field("text")?),
                    Some("input_json_delta") => DeltaStep::InputJson(field("partial_json")?),
                    Some("thinking_delta") => DeltaStep::Thinking(field("thinking")?),
                    Some("signature_delta") => DeltaStep::Signature(field("signature")?),
                    other => return Err(format!("frame {n}: a delta of type {other:?}")),
                };
                Step::BlockDelta { index: index()?, delta }
            }
            "content_block_stop" => Step::BlockStop { index: index()? },
            "message_delta" => {
                if !data["usage"]["output_tokens"].is_u64() {
                    return Err(format!("frame {n}: message_delta without a numeric usage.output_tokens"));
                }
                Step::MessageDelta { stop_reason: data["delta"]["stop_reason"].as_str() }
            }
            "message_stop" => Step::MessageStop,
            "error" => Step::Error,
            _ => continue,
        };
        c.step(n, step)?;
    }
    c.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::anthropic::sse::Usage;
    use crate::anthropic::{ApiError, ErrorKind};

    fn start() -> StreamEvent {
        StreamEvent::MessageStart { id: "msg_1".into(), model: "m".into(), usage: Usage::default() }
    }

    fn delta(stop: &str) -> StreamEvent {
        StreamEvent::MessageDelta { stop_reason: stop.into(), stop_sequence: None, usage: Usage::default() }
    }

    fn text_block(index: usize, t: &str) -> Vec<StreamEvent> {
        vec![
            StreamEvent::BlockStart { index, block: BlockStart::Text },
            StreamEvent::BlockDelta { index, delta: Delta::Text(t.into()) },
            StreamEvent::BlockStop { index },
        ]
    }

    fn thinking_block(index: usize, t: &str, sig: &str) -> Vec<StreamEvent> {
        vec![
            StreamEvent::BlockStart { index, block: BlockStart::Thinking },
            StreamEvent::BlockDelta { index, delta: Delta::Thinking(t.into()) },
            StreamEvent::BlockDelta { index, delta: Delta::Signature(sig.into()) },
            StreamEvent::BlockStop { index },
        ]
    }

    #[test]
    fn a_whole_stream_passes_and_is_summed_up() {
        let mut evs = vec![start(), StreamEvent::Ping];
        evs.extend(thinking_block(0, "hm", "SIG"));
        evs.push(StreamEvent::BlockStart {
            index: 1,
            block: BlockStart::RedactedThinking { data: "cmVk".into() },
        });
        evs.push(StreamEvent::BlockStop { index: 1 });
        evs.extend(text_block(2, "hi"));
        evs.push(StreamEvent::BlockStart {
            index: 3,
            block: BlockStart::ToolUse { id: "toolu_1".into(), name: "t".into() },
        });
        evs.push(StreamEvent::BlockDelta { index: 3, delta: Delta::InputJson("{}".into()) });
        evs.push(StreamEvent::BlockStop { index: 3 });
        evs.extend([delta("tool_use"), StreamEvent::MessageStop]);
        let s = check_events(&evs).unwrap();
        assert_eq!(s.text, "hi");
        assert_eq!(s.thinking, vec![("hm".to_owned(), "SIG".to_owned())]);
        assert_eq!(s.redacted, vec!["cmVk".to_owned()]);
        assert_eq!(s.closed_tools, BTreeMap::from([(3, "{}".to_owned())]));
        assert_eq!(s.stop_reason.as_deref(), Some("tool_use"));
        // The same stream as SSE frames passes the frame checker.
        let frames: Vec<(String, Value)> = evs
            .iter()
            .map(|e| {
                let mut buf = Vec::new();
                e.write_sse(&mut buf);
                let text = String::from_utf8(buf).unwrap();
                let data = text.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
                (e.name().to_owned(), serde_json::from_str(data).unwrap())
            })
            .collect();
        assert_eq!(check_frames(frames.iter().map(|(n, d)| (n.as_str(), d))).unwrap(), s);
    }

    #[test]
    fn every_broken_rule_is_named() {
        let err = |evs: Vec<StreamEvent>| check_events(&evs).unwrap_err();
        assert!(err(vec![StreamEvent::Ping]).contains("before message_start"));
        assert!(err(vec![start(), start()]).contains("second message_start"));
        let mut skipped = vec![start()];
        skipped.extend(text_block(1, "x"));
        assert!(err(skipped).contains("expected 0"));
        let mut open = vec![start(), StreamEvent::BlockStart { index: 0, block: BlockStart::Text }];
        open.push(delta("end_turn"));
        assert!(err(open).contains("while block 0 is open"));
        let mut text_open_at_error =
            vec![start(), StreamEvent::BlockStart { index: 0, block: BlockStart::Text }];
        text_open_at_error.push(StreamEvent::Error(ApiError::new(ErrorKind::Api, "x")));
        assert!(err(text_open_at_error).contains("text/thinking block 0 is open"));
        assert!(err(vec![start(), StreamEvent::MessageStop, StreamEvent::Ping]).contains("after the end"));
        assert!(err(vec![start()]).contains("without message_stop"));
        // A tool call cut short may stay open when an error ends the stream.
        let cut = vec![
            start(),
            StreamEvent::BlockStart {
                index: 0,
                block: BlockStart::ToolUse { id: "t".into(), name: "n".into() },
            },
            StreamEvent::Error(ApiError::new(ErrorKind::Api, "cut")),
        ];
        let s = check_events(&cut).unwrap();
        assert!(s.errored && s.closed_tools.is_empty());
        // Deltas of the wrong kind; a thinking block's one signature_delta comes last.
        let block = |index, block| StreamEvent::BlockStart { index, block };
        let d = |index, delta| StreamEvent::BlockDelta { index, delta };
        for (evs, why) in [
            (vec![start(), block(0, BlockStart::Text), d(0, Delta::Thinking("x".into()))], "wrong kind"),
            (vec![start(), block(0, BlockStart::Thinking), d(0, Delta::Text("x".into()))], "wrong kind"),
            (
                vec![
                    start(),
                    block(0, BlockStart::RedactedThinking { data: "x".into() }),
                    d(0, Delta::Signature("s".into())),
                ],
                "wrong kind",
            ),
            (
                vec![
                    start(),
                    block(0, BlockStart::Thinking),
                    d(0, Delta::Signature("s".into())),
                    d(0, Delta::Signature("t".into())),
                ],
                "after the signature_delta",
            ),
            (
                vec![
                    start(),
                    block(0, BlockStart::Thinking),
                    d(0, Delta::Signature("s".into())),
                    d(0, Delta::Thinking("t".into())),
                ],
                "after the signature_delta",
            ),
            (
                vec![
                    start(),
                    block(0, BlockStart::Thinking),
                    d(0, Delta::Thinking("t".into())),
                    StreamEvent::BlockStop { index: 0 },
                ],
                "without a signature_delta",
            ),
        ] {
            assert!(err(evs).contains(why), "{why}");
        }
    }
}
