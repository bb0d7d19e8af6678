//! The Claude streaming grammar, as Anthropic documents it, checked over a whole stream:
//! `message_start` first and once; content blocks one at a time, with consecutive indices, each
//! `content_block_start`, deltas of its own index, `content_block_stop`; `message_delta` only
//! while no block is open; then `message_stop` — or an `error` event, which ends the stream (a
//! tool call cut short is the one block an error may leave open); `ping` anywhere; nothing after
//! the end. One copy, for the integration tests (over SSE frames as a client parses them) and the
//! fuzz targets (over the state machine's typed events).

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
    /// `message_delta`'s stop reason, when the stream got that far.
    pub stop_reason: Option<String>,
    /// True when the stream ended with an `error` event.
    pub errored: bool,
}

/// One event as the grammar sees it.
enum Step<'a> {
    MessageStart,
    Ping,
    BlockStart { index: usize, tool: bool },
    BlockDelta { index: usize, text: Option<&'a str>, input_json: Option<&'a str> },
    BlockStop { index: usize },
    MessageDelta { stop_reason: Option<&'a str> },
    MessageStop,
    Error,
}

#[derive(Default)]
struct Checker {
    started: bool,
    open: Option<(usize, bool)>,
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
            Step::BlockStart { index, tool } => {
                if let Some((open, _)) = self.open {
                    return Err(format!("block {index} starts at {n} while block {open} is open"));
                }
                if index != self.next {
                    return Err(format!("block index {index} at {n}, expected {}", self.next));
                }
                self.open = Some((index, tool));
                if tool {
                    self.tool_inputs.insert(index, String::new());
                }
                self.next += 1;
            }
            Step::BlockDelta { index, text, input_json } => {
                if self.open.map(|o| o.0) != Some(index) {
                    return Err(format!("a delta for block {index} at {n}, open: {:?}", self.open));
                }
                if let Some(t) = text {
                    self.summary.text.push_str(t);
                }
                if let Some(p) = input_json {
                    self.tool_inputs
                        .get_mut(&index)
                        .ok_or_else(|| format!("input_json_delta outside a tool_use block at {n}"))?
                        .push_str(p);
                }
            }
            Step::BlockStop { index } => {
                if self.open.map(|o| o.0) != Some(index) {
                    return Err(format!("a stop for block {index} at {n}, open: {:?}", self.open));
                }
                if let Some(input) = self.tool_inputs.remove(&index) {
                    self.summary.closed_tools.insert(index, input);
                }
                self.open = None;
            }
            Step::MessageDelta { stop_reason } => {
                if let Some((open, _)) = self.open {
                    return Err(format!("message_delta at {n} while block {open} is open"));
                }
                self.summary.stop_reason = stop_reason.map(str::to_owned);
            }
            Step::MessageStop => {
                if let Some((open, _)) = self.open {
                    return Err(format!("message_stop at {n} while block {open} is open"));
                }
                self.ended = true;
            }
            Step::Error => {
                // Only a cut tool call may stay open: a text or thinking block is closed first.
                if let Some((open, false)) = self.open {
                    return Err(format!("error at {n} while text/thinking block {open} is open"));
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
                Step::BlockStart { index: *index, tool: matches!(block, BlockStart::ToolUse { .. }) }
            }
            StreamEvent::BlockDelta { index, delta } => Step::BlockDelta {
                index: *index,
                text: match delta {
                    Delta::Text(t) => Some(t),
                    _ => None,
                },
                input_json: match delta {
                    Delta::InputJson(p) => Some(p),
                    _ => None,
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
                Step::BlockStart { index: index()?, tool: data["content_block"]["type"] == "tool_use" }
            }
            "content_block_delta" => Step::BlockDelta {
                index: index()?,
                text: data["delta"]["text"].as_str().filter(|_| data["delta"]["type"] == "text_delta"),
                input_json: data["delta"]["partial_json"]
                    .as_str()
                    .filter(|_| data["delta"]["type"] == "input_json_delta"),
            },
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

    #[test]
    fn a_whole_stream_passes_and_is_summed_up() {
        let mut evs = vec![start(), StreamEvent::Ping];
        evs.extend(text_block(0, "hi"));
        evs.push(StreamEvent::BlockStart {
            index: 1,
            block: BlockStart::ToolUse { id: "toolu_1".into(), name: "t".into() },
        });
        evs.push(StreamEvent::BlockDelta { index: 1, delta: Delta::InputJson("{}".into()) });
        evs.push(StreamEvent::BlockStop { index: 1 });
        evs.extend([delta("tool_use"), StreamEvent::MessageStop]);
        let s = check_events(&evs).unwrap();
        assert_eq!(s.text, "hi");
        assert_eq!(s.closed_tools, BTreeMap::from([(1, "{}".to_owned())]));
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
    }
}
