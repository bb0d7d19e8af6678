//! Amazon Q → Claude: one state machine turns upstream events into Claude stream events; the
//! SSE writer and the non-streaming [`Aggregator`] both consume its output, so the two
//! responses can never disagree.

use super::request::ToolNames;
use super::tokens::{count_text, first_tokens};
use crate::anthropic::sse::{BlockStart, Delta, StreamEvent, Usage};
use crate::anthropic::{ApiError, ErrorKind};
use crate::upstream::{Event, StreamError};
use serde_json::{Value, json};

const OPEN_TAG: &str = "<thinking>";
/// Uncounted output is counted once it grows past this many bytes.
const UNCOUNTED_MAX: usize = 16 * 1024;
const CLOSE_TAG: &str = "</thinking>";

/// What the response needs to know about its request.
#[derive(Debug, Clone)]
pub struct ResponseParams {
    pub message_id: String,
    /// The model name the client asked for (echoed back).
    pub model: String,
    pub input_tokens: u64,
    pub max_tokens: u64,
    pub stop_sequences: Vec<String>,
    /// Thinking was requested: `<thinking>` at the start of the answer becomes a thinking block.
    pub thinking: bool,
    pub tool_names: ToolNames,
    /// Context window of the upstream model, as its catalog gives it (for `contextUsageEvent`:
    /// a share of a window guessed would make the input count wrong, a 1M model's five times
    /// too low, and key budgets with it; without it, the daemon's own count stands).
    pub context_window: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TextMode {
    /// Thinking requested, nothing decided yet: is the answer opening with `<thinking>`?
    Start,
    InThinking,
    Text,
}

#[derive(Debug)]
enum Open {
    None,
    Text {
        index: usize,
    },
    /// `signature`: the pieces received so far, joined (none yet: the block is still open to
    /// more text).
    Thinking {
        index: usize,
        text: String,
        signature: Option<String>,
    },
    /// A tool call being received. Nothing of it has been sent yet: it leaves whole (start,
    /// its input, stop) once its `stop` comes, so that a call the service cuts short (it does,
    /// with large inputs) can be left out instead of reaching the client broken.
    Tool {
        upstream_id: String,
        /// The client's name for the tool.
        name: String,
        input: String,
    },
}

/// The state machine.
pub struct ResponseState {
    p: ResponseParams,
    next_index: usize,
    open: Open,
    mode: TextMode,
    buf: String,
    /// Tokens counted exactly so far.
    output_tokens: u64,
    /// Output not yet counted: a token is at least one byte, so while counted tokens plus these
    /// bytes stay within max_tokens no exact count is needed (tokenizing every 1–12 character
    /// fragment was the largest CPU cost of a stream). Counted in pieces and at the end.
    uncounted: String,
    tool_calls: usize,
    /// Upstream ids of the tool calls finished (their `stop` came): a repeated frame of one is
    /// ignored, not started again as a second call with the same id.
    done_tools: Vec<String>,
    stop: Option<(String, Option<String>)>,
    /// The service said the model stopped at its output limit (`metadataEvent`'s `stopReason`
    /// `MAX_TOKENS`).
    cut_upstream: bool,
    finished: bool,
    hold: usize,
    /// Drop newlines at the start of the next thinking or text (after a thinking tag).
    strip_leading: bool,
    /// The service's own usage figures (`metadataEvent.tokenUsage`), when it gave them.
    exact: Option<Usage>,
    /// Credits charged (`meteringEvent.usage`, summed).
    credits: Option<f64>,
}

/// A daemon-issued thinking signature (clients send it back; it is accepted as context).
pub fn signature_for(thinking: &str) -> String {
    use base64::Engine;
    let d = crate::hash::sha256(format!("amq2api-thinking\0{thinking}").as_bytes());
    base64::engine::general_purpose::STANDARD.encode(d)
}

/// Claude's id for an upstream tool-use id: `toolu_…`.
pub fn claude_tool_id(upstream: &str) -> String {
    let rest =
        upstream.strip_prefix("tooluse_").or_else(|| upstream.strip_prefix("toolu_")).unwrap_or(upstream);
    let clean: String =
        rest.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-').collect();
    format!("toolu_{clean}")
}

impl ResponseState {
    pub fn new(p: ResponseParams) -> Self {
        let mode = if p.thinking { TextMode::Start } else { TextMode::Text };
        let hold = p.stop_sequences.iter().map(|s| s.len()).max().unwrap_or(0);
        ResponseState {
            p,
            next_index: 0,
            open: Open::None,
            mode,
            buf: String::new(),
            output_tokens: 0,
            uncounted: String::with_capacity(256),
            tool_calls: 0,
            done_tools: Vec::new(),
            stop: None,
            cut_upstream: false,
            finished: false,
            hold,
            strip_leading: false,
            exact: None,
            credits: None,
        }
    }

    /// True once the message is complete (stop sequence or max_tokens reached, or ended):
    /// the caller stops reading the upstream.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// The usage so far (the final figures once the message is finished).
    pub fn usage(&self) -> Usage {
        match &self.exact {
            // The service's own figures, when it gave them (metadataEvent.tokenUsage).
            Some(u) => *u,
            None => Usage::new(self.p.input_tokens, self.output_tokens + count_text(&self.uncounted)),
        }
    }

    /// Output tokens so far, cheaply: those counted, and the bytes not counted yet at four to a
    /// token (the counted figure comes with `message_delta`). For a stream cut short.
    pub fn output_estimate(&self) -> u64 {
        match &self.exact {
            Some(u) => u.output_tokens,
            None => self.output_tokens + (self.uncounted.len() as u64).div_ceil(4),
        }
    }

    /// Credits the service charged for this answer (`meteringEvent`), when it said.
    pub fn credits(&self) -> Option<f64> {
        self.credits
    }

    /// `message_start` and the first `ping`.
    pub fn start(&self) -> Vec<StreamEvent> {
        vec![
            StreamEvent::MessageStart {
                id: self.p.message_id.clone(),
                model: self.p.model.clone(),
                usage: Usage::new(self.p.input_tokens, 1),
            },
            StreamEvent::Ping,
        ]
    }

    fn close_open(&mut self, out: &mut Vec<StreamEvent>) {
        match std::mem::replace(&mut self.open, Open::None) {
            Open::None => {}
            Open::Text { index } => out.push(StreamEvent::BlockStop { index }),
            Open::Thinking { index, text, signature } => {
                // Upstream's signature, or (prompt-tag thinking, or a block cut before its
                // signature) one this daemon makes, which is never replayed upstream.
                let sig = signature.filter(|s| !s.is_empty()).unwrap_or_else(|| signature_for(&text));
                out.push(StreamEvent::BlockDelta { index, delta: Delta::Signature(sig) });
                out.push(StreamEvent::BlockStop { index });
            }
            Open::Tool { upstream_id, name, input } => {
                // Not reached while a call is open (it is finished or left out first); whole,
                // it is sent, else left out.
                if input.trim().is_empty() || is_json_object(&input) {
                    self.emit_tool(&upstream_id, name, input, out);
                }
            }
        }
    }

    /// A whole tool call: its block, its input in one delta (`{}` for none), its stop.
    fn emit_tool(&mut self, upstream_id: &str, name: String, input: String, out: &mut Vec<StreamEvent>) {
        let index = self.open_block(BlockStart::ToolUse { id: claude_tool_id(upstream_id), name }, out);
        let input = if input.trim().is_empty() { "{}".to_string() } else { input };
        out.push(StreamEvent::BlockDelta { index, delta: Delta::InputJson(input) });
        out.push(StreamEvent::BlockStop { index });
        self.tool_calls += 1;
        self.done_tools.push(upstream_id.to_string());
    }

    fn open_block(&mut self, block: BlockStart, out: &mut Vec<StreamEvent>) -> usize {
        self.close_open(out);
        let index = self.next_index;
        self.next_index += 1;
        out.push(StreamEvent::BlockStart { index, block });
        index
    }

    /// Counts `text` against max_tokens; returns the part that fits (all of it, usually).
    /// Adds output that max_tokens does not cut (tool input) to the count.
    fn count_later(&mut self, text: &str) {
        self.uncounted.push_str(text);
        if self.uncounted.len() > UNCOUNTED_MAX {
            self.output_tokens += count_text(&self.uncounted);
            self.uncounted.clear();
        }
    }

    /// What of `text` fits in `max_tokens` (all of it, unmoved, well below the limit).
    fn budget(&mut self, text: String) -> String {
        if (self.output_tokens + self.uncounted.len() as u64 + text.len() as u64) <= self.p.max_tokens {
            self.count_later(&text);
            return text;
        }
        // Near the limit: count exactly from here on.
        self.output_tokens += count_text(&self.uncounted);
        self.uncounted.clear();
        let n = count_text(&text);
        if self.output_tokens + n <= self.p.max_tokens {
            self.output_tokens += n;
            return text;
        }
        let room = self.p.max_tokens.saturating_sub(self.output_tokens) as usize;
        let kept = first_tokens(&text, room).to_string();
        self.output_tokens = self.p.max_tokens;
        self.stop = Some(("max_tokens".into(), None));
        self.finished = true;
        kept
    }

    fn emit_text(&mut self, text: String, out: &mut Vec<StreamEvent>) {
        if text.is_empty() || self.finished {
            return;
        }
        let text = self.budget(text);
        if text.is_empty() {
            return;
        }
        let index = match self.open {
            Open::Text { index } => index,
            _ => {
                let i = self.open_block(BlockStart::Text, out);
                self.open = Open::Text { index: i };
                i
            }
        };
        // Text read together leaves as one delta.
        if let Some(StreamEvent::BlockDelta { index: last, delta: Delta::Text(prev) }) = out.last_mut() {
            if *last == index {
                prev.push_str(&text);
                return;
            }
        }
        out.push(StreamEvent::BlockDelta { index, delta: Delta::Text(text) });
    }

    /// Thinking text and/or a piece of its signature. Upstream sends a reasoning block's text
    /// pieces, then its signature pieces: the pieces are joined into the one `signature_delta`
    /// sent when the block closes, and text after a signature starts a new thinking block.
    fn emit_thinking(&mut self, text: &str, signature: Option<String>, out: &mut Vec<StreamEvent>) {
        if self.finished {
            return;
        }
        let text = if text.is_empty() { String::new() } else { self.budget(text.to_owned()) };
        let signed = matches!(self.open, Open::Thinking { signature: Some(_), .. });
        if !matches!(self.open, Open::Thinking { .. }) || (signed && !text.is_empty()) {
            let i = self.open_block(BlockStart::Thinking, out);
            self.open = Open::Thinking { index: i, text: String::new(), signature: None };
        }
        if let Open::Thinking { index, text: acc, signature: sig } = &mut self.open {
            if !text.is_empty() {
                acc.push_str(&text);
                match out.last_mut() {
                    Some(StreamEvent::BlockDelta { index: last, delta: Delta::Thinking(prev) })
                        if last == index =>
                    {
                        prev.push_str(&text)
                    }
                    _ => out.push(StreamEvent::BlockDelta { index: *index, delta: Delta::Thinking(text) }),
                }
            }
            if let Some(piece) = signature {
                sig.get_or_insert_with(String::new).push_str(&piece);
            }
        }
    }

    /// Length of the longest suffix of `buf` that is a proper prefix of `pat`.
    fn partial_suffix(buf: &str, pat: &str) -> usize {
        let max = pat.len().saturating_sub(1).min(buf.len());
        (1..=max).rev().find(|&k| pat.is_char_boundary(k) && buf.ends_with(&pat[..k])).unwrap_or(0)
    }

    /// Runs buffered answer text through thinking-tag and stop-sequence detection.
    fn process_text(&mut self, out: &mut Vec<StreamEvent>, at_end: bool) {
        loop {
            if self.finished {
                self.buf.clear();
                return;
            }
            if self.strip_leading && self.mode != TextMode::Start {
                let trimmed = self.buf.trim_start_matches(['\n', '\r']);
                if trimmed.len() != self.buf.len() {
                    self.buf = trimmed.to_string();
                }
                if self.buf.is_empty() {
                    return;
                }
                self.strip_leading = false;
            }
            match self.mode {
                TextMode::Start => {
                    let trimmed = self.buf.trim_start();
                    if let Some(rest) = trimmed.strip_prefix(OPEN_TAG) {
                        self.buf = rest.to_string();
                        self.mode = TextMode::InThinking;
                        self.strip_leading = true;
                        continue;
                    }
                    if !at_end && OPEN_TAG.starts_with(trimmed) {
                        return; // could still become the tag
                    }
                    self.mode = TextMode::Text;
                }
                TextMode::InThinking => {
                    if let Some(pos) = self.buf.find(CLOSE_TAG) {
                        let thinking = self.buf[..pos].trim_end_matches(['\n', '\r']).to_string();
                        let rest = self.buf[pos + CLOSE_TAG.len()..].to_string();
                        self.emit_thinking(&thinking, None, out);
                        self.close_open(out);
                        self.buf = rest;
                        self.mode = TextMode::Text;
                        self.strip_leading = true;
                        continue;
                    }
                    let mut keep = if at_end { 0 } else { Self::partial_suffix(&self.buf, CLOSE_TAG) };
                    if !at_end {
                        // Newlines just before the closing tag are not part of the thinking.
                        let body = &self.buf[..self.buf.len() - keep];
                        keep += body.len() - body.trim_end_matches(['\n', '\r']).len();
                    }
                    let emit: String = self.buf[..self.buf.len() - keep].to_string();
                    self.buf.drain(..self.buf.len() - keep);
                    if !emit.is_empty() {
                        self.emit_thinking(&emit, None, out);
                    }
                    return;
                }
                TextMode::Text => {
                    // Earliest stop sequence in the buffer.
                    let found = self
                        .p
                        .stop_sequences
                        .iter()
                        .filter_map(|s| self.buf.find(s.as_str()).map(|pos| (pos, s.clone())))
                        .min_by_key(|(pos, _)| *pos);
                    if let Some((pos, seq)) = found {
                        self.buf.truncate(pos);
                        let before = std::mem::take(&mut self.buf);
                        self.emit_text(before, out);
                        if !self.finished {
                            self.stop = Some(("stop_sequence".into(), Some(seq)));
                            self.finished = true;
                        }
                        self.buf.clear();
                        return;
                    }
                    let keep = if at_end || self.hold == 0 {
                        0
                    } else {
                        self.p
                            .stop_sequences
                            .iter()
                            .map(|s| Self::partial_suffix(&self.buf, s))
                            .max()
                            .unwrap_or(0)
                    };
                    // Usually nothing is held back: the buffer itself is the delta's text.
                    let emit = if keep == 0 {
                        std::mem::take(&mut self.buf)
                    } else {
                        let held = self.buf.split_off(self.buf.len() - keep);
                        std::mem::replace(&mut self.buf, held)
                    };
                    self.emit_text(emit, out);
                    return;
                }
            }
        }
    }

    fn flush_text(&mut self, out: &mut Vec<StreamEvent>) {
        if !self.buf.is_empty() {
            self.process_text(out, true);
        }
    }

    /// Feeds one upstream event.
    pub fn on_event(&mut self, ev: Event) -> Vec<StreamEvent> {
        let mut out = Vec::new();
        self.on_event_into(ev, &mut out);
        out
    }

    /// As [`Self::on_event`], appending to `out` (a stream reuses one vector).
    pub fn on_event_into(&mut self, ev: Event, out: &mut Vec<StreamEvent>) {
        if self.finished {
            return;
        }
        // Content that is not the open tool call's own, before that call's `stop`: the call is
        // over. Whole (its input one JSON object) it counts as made; else the stream ends with
        // an error rather than hand over a call with broken input as if it were whole.
        if let Open::Tool { upstream_id, .. } = &self.open {
            let other = match &ev {
                // An empty text event is nothing: it does not end the call.
                Event::AssistantResponse { content } => !content.is_empty(),
                Event::Reasoning { .. } => true,
                Event::ToolUse { tool_use_id, .. } => tool_use_id != upstream_id,
                _ => false,
            };
            if other && !self.finish_tool(out) {
                return;
            }
        }
        match ev {
            Event::AssistantResponse { content } => {
                if self.buf.is_empty() {
                    self.buf = content;
                } else {
                    self.buf.push_str(&content);
                }
                self.process_text(out, false);
            }
            Event::Reasoning { text, signature, redacted_content } => {
                self.flush_text(out);
                if self.finished {
                    // The held text reached a stop sequence or max_tokens.
                } else if let Some(data) = redacted_content {
                    self.open_block(BlockStart::RedactedThinking { data }, out);
                    let index = self.next_index - 1;
                    out.push(StreamEvent::BlockStop { index });
                } else {
                    self.emit_thinking(text.as_deref().unwrap_or(""), signature, out);
                }
            }
            Event::ToolUse { tool_use_id, .. } if self.done_tools.contains(&tool_use_id) => {
                // The call was finished: a repeated frame of it (a stop sent twice, the call
                // sent again) is not a second call.
                tracing::debug!(tool_use_id, "a frame of a finished tool call ignored");
            }
            Event::ToolUse { tool_use_id, name, input, stop } => {
                let same =
                    matches!(&self.open, Open::Tool { upstream_id, .. } if *upstream_id == tool_use_id);
                if !same {
                    self.flush_text(out);
                    if self.finished {
                        // The held text reached a stop sequence or max_tokens: end the message.
                        self.finish_into(out);
                        return;
                    }
                    self.close_open(out);
                    let original = self.p.tool_names.original(&name).to_string();
                    self.open =
                        Open::Tool { upstream_id: tool_use_id.clone(), name: original, input: String::new() };
                }
                if let Some(frag) = input.filter(|f| !f.is_empty()) {
                    self.count_later(&frag);
                    if let Open::Tool { input: acc, .. } = &mut self.open {
                        acc.push_str(&frag);
                    }
                }
                if stop && !self.finish_tool(out) {
                    // Failed: the error ended the stream.
                    return;
                }
            }
            Event::ContextUsage { percentage } => {
                // An estimate of the input from the share of the model's window it used; the
                // service's exact figures, when they came, stand.
                let est = self.p.context_window.map_or(0, |w| (percentage / 100.0 * w as f64).round() as u64);
                if est > 0 && self.exact.is_none() {
                    self.p.input_tokens = est;
                }
            }
            Event::Metadata { token_usage, stop_reason } => {
                if let Some((Some(input), Some(output), u)) =
                    token_usage.map(|u| (u.uncached_input_tokens, u.output_tokens, u))
                {
                    self.exact = Some(Usage {
                        input_tokens: input,
                        output_tokens: output,
                        cache_creation_input_tokens: u.cache_write_input_tokens.unwrap_or(0),
                        cache_read_input_tokens: u.cache_read_input_tokens.unwrap_or(0),
                    });
                }
                // The model reached its output limit upstream (the daemon's own count, an
                // estimate, may not have): the answer is cut, whatever else it holds.
                if stop_reason.as_deref() == Some("MAX_TOKENS") {
                    self.cut_upstream = true;
                }
            }
            Event::Metering { usage: Some(credits), .. } => {
                if credits.is_finite() && credits >= 0.0 {
                    self.credits = Some(self.credits.unwrap_or(0.0) + credits);
                }
            }
            Event::InitialResponse { .. }
            | Event::MessageMetadata { .. }
            | Event::Metering { .. }
            | Event::Unknown { .. } => {}
        }
        if self.finished {
            self.finish_into(out);
        }
    }

    fn finish_into(&mut self, out: &mut Vec<StreamEvent>) {
        if matches!(self.open, Open::Tool { .. }) {
            self.cut_tool_call();
        }
        self.close_open(out);
        let (stop_reason, stop_sequence) = self.stop.take().unwrap_or_else(|| {
            let reason = if self.cut_upstream {
                "max_tokens"
            } else if self.tool_calls > 0 {
                "tool_use"
            } else {
                "end_turn"
            };
            (reason.to_string(), None)
        });
        out.push(StreamEvent::MessageDelta { stop_reason, stop_sequence, usage: self.usage() });
        out.push(StreamEvent::MessageStop);
        self.finished = true;
        self.open = Open::None;
    }

    /// The upstream stream ended cleanly.
    pub fn on_end(&mut self) -> Vec<StreamEvent> {
        let mut out = Vec::new();
        if self.finished {
            return out;
        }
        self.flush_text(&mut out);
        if self.finished {
            // A stop sequence in the flushed text already finished the message.
            self.finish_into(&mut out);
            return out;
        }
        if let Open::Tool { input, .. } = &self.open {
            // Ended with no `stop` for the call: whole (its input one JSON object) it counts as
            // made; else the service cut it (finish_into leaves it out).
            if is_json_object(input) && !self.finish_tool(&mut out) {
                return out;
            }
        }
        self.finish_into(&mut out);
        out
    }

    /// The output was cut inside a tool call (the service's output limit, or its own cut of a
    /// large input, which ends the stream with no `stop`): the call is left out — nothing of
    /// it was sent — and the message ends as cut, `max_tokens`, as Anthropic's does when
    /// max_tokens falls inside a call. Clients then go on with a shorter step; an error would
    /// have them send the same request again, and meet the same cut.
    fn cut_tool_call(&mut self) {
        if let Open::Tool { upstream_id, name, input } = std::mem::replace(&mut self.open, Open::None) {
            tracing::warn!(
                tool = %name,
                tool_use_id = %upstream_id,
                input_bytes = input.len(),
                "the upstream output was cut in the middle of a tool call: the call is left out and the message ends with max_tokens"
            );
            self.stop = Some(("max_tokens".into(), None));
        }
    }

    /// Ends the open tool call as made: no input at all is `{}` (the SDK accumulates that from
    /// nothing); input that is not one JSON object fails the stream (Claude's tool input is an
    /// object; streamed and aggregated answers must not read it two ways). False when it failed.
    fn finish_tool(&mut self, out: &mut Vec<StreamEvent>) -> bool {
        let Open::Tool { upstream_id, name, input } = std::mem::replace(&mut self.open, Open::None) else {
            return true;
        };
        if !input.trim().is_empty() && !is_json_object(&input) {
            self.fail_in_tool_call(out, "the upstream tool call's input is not one JSON object");
            return false;
        }
        self.emit_tool(&upstream_id, name, input, out);
        true
    }

    /// Ends the response with an `api_error` over a tool call that cannot be sent (nothing of
    /// it was).
    fn fail_in_tool_call(&mut self, out: &mut Vec<StreamEvent>, why: &str) {
        out.push(StreamEvent::Error(ApiError::new(
            ErrorKind::Api,
            format!("{why}; the tool call is incomplete"),
        )));
        self.open = Open::None;
        self.finished = true;
    }

    /// The upstream stream failed.
    pub fn on_error(&mut self, err: &StreamError) -> Vec<StreamEvent> {
        let mut out = Vec::new();
        if self.finished {
            return out;
        }
        if err.is_output_truncation() {
            self.flush_text(&mut out);
            if !self.finished {
                self.stop = Some(("max_tokens".into(), None));
            }
            // Inside a tool call, the call is left out (finish_into).
            self.finish_into(&mut out);
            return out;
        }
        let kind = if err.is_capacity() { ErrorKind::Overloaded } else { ErrorKind::Api };
        out.extend(self.abort(ApiError::new(kind, format!("upstream failed mid-response: {err}"))));
        out
    }

    /// Ends the stream with `error` (the daemon is shutting down, the request timed out, the
    /// upstream failed): text held back is flushed and the open text or thinking block is
    /// closed before the `error` event, as a client's parser expects. An open tool call is
    /// left unclosed: its input is incomplete, and a `content_block_stop` would present it as
    /// whole.
    pub fn abort(&mut self, error: ApiError) -> Vec<StreamEvent> {
        let mut out = Vec::new();
        if self.finished {
            return out;
        }
        self.flush_text(&mut out);
        match self.open {
            Open::Tool { .. } => self.open = Open::None,
            _ => self.close_open(&mut out),
        }
        out.push(StreamEvent::Error(error));
        self.finished = true;
        out
    }
}

/// Builds the non-streaming `Message` from the same events the stream would carry.
#[derive(Default)]
pub struct Aggregator {
    id: String,
    model: String,
    blocks: Vec<Value>,
    tool_json: Vec<Option<String>>,
    stop_reason: Option<String>,
    stop_sequence: Option<String>,
    usage: Usage,
    error: Option<ApiError>,
}

impl Aggregator {
    pub fn push(&mut self, ev: &StreamEvent) {
        match ev {
            StreamEvent::MessageStart { id, model, usage } => {
                self.id = id.clone();
                self.model = model.clone();
                self.usage = *usage;
            }
            StreamEvent::Ping | StreamEvent::MessageStop => {}
            StreamEvent::BlockStart { block, .. } => {
                let (b, j) = match block {
                    BlockStart::Text => (json!({"type": "text", "text": ""}), None),
                    BlockStart::ToolUse { id, name } => (
                        json!({"type": "tool_use", "id": id, "name": name, "input": {}}),
                        Some(String::new()),
                    ),
                    BlockStart::Thinking => {
                        (json!({"type": "thinking", "thinking": "", "signature": ""}), None)
                    }
                    BlockStart::RedactedThinking { data } => {
                        (json!({"type": "redacted_thinking", "data": data}), None)
                    }
                };
                self.blocks.push(b);
                self.tool_json.push(j);
            }
            StreamEvent::BlockDelta { index, delta } => {
                let (Some(b), Some(j)) = (self.blocks.get_mut(*index), self.tool_json.get_mut(*index)) else {
                    return;
                };
                let append = |b: &mut Value, key: &str, s: &str| {
                    if let Some(Value::String(t)) = b.get_mut(key) {
                        t.push_str(s);
                    }
                };
                match delta {
                    Delta::Text(t) => append(b, "text", t),
                    Delta::Thinking(t) => append(b, "thinking", t),
                    Delta::Signature(s) => append(b, "signature", s),
                    Delta::InputJson(p) => {
                        if let Some(acc) = j {
                            acc.push_str(p);
                        }
                    }
                }
            }
            StreamEvent::BlockStop { index } => {
                if let (Some(b), Some(Some(j))) = (self.blocks.get_mut(*index), self.tool_json.get(*index)) {
                    // A tool's input is an object: anything else upstream sent (not JSON, or JSON
                    // of another type) gives `{}`.
                    let input = match serde_json::from_str::<Value>(j) {
                        Ok(v @ Value::Object(_)) => v,
                        _ => json!({}),
                    };
                    b["input"] = input;
                }
            }
            StreamEvent::MessageDelta { stop_reason, stop_sequence, usage } => {
                self.stop_reason = Some(stop_reason.clone());
                self.stop_sequence = stop_sequence.clone();
                self.usage = *usage;
            }
            StreamEvent::Error(e) => self.error = Some(e.clone()),
        }
    }

    /// The message, or the error that ended the response.
    pub fn finish(self) -> Result<Value, ApiError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        let Some(stop_reason) = self.stop_reason else {
            return Err(ApiError::new(ErrorKind::Api, "the upstream response ended without a result"));
        };
        Ok(json!({
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": self.blocks,
            "stop_reason": stop_reason,
            "stop_sequence": self.stop_sequence,
            "usage": self.usage.to_json(),
        }))
    }
}

/// `text` is one whole JSON object (surrounding whitespace allowed).
fn is_json_object(text: &str) -> bool {
    serde_json::from_str::<&serde_json::value::RawValue>(text).is_ok_and(|v| v.get().starts_with('{'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> ResponseParams {
        ResponseParams {
            message_id: "msg_test".into(),
            model: "claude-sonnet-4-5".into(),
            input_tokens: 10,
            max_tokens: 1000,
            stop_sequences: vec![],
            thinking: false,
            tool_names: ToolNames::default(),
            context_window: Some(200_000),
        }
    }

    fn text(s: &str) -> Event {
        Event::AssistantResponse { content: s.into() }
    }

    fn tool(id: &str, name: &str, input: Option<&str>, stop: bool) -> Event {
        Event::ToolUse { tool_use_id: id.into(), name: name.into(), input: input.map(str::to_string), stop }
    }

    enum Step {
        Ev(Event),
        End,
        Fail(StreamError),
    }

    fn run(p: ResponseParams, steps: Vec<Step>) -> (Vec<StreamEvent>, Result<Value, ApiError>) {
        let mut st = ResponseState::new(p);
        let mut all = st.start();
        for s in steps {
            if st.is_finished() {
                break;
            }
            all.extend(match s {
                Step::Ev(e) => st.on_event(e),
                Step::End => st.on_end(),
                Step::Fail(e) => st.on_error(&e),
            });
        }
        let mut agg = Aggregator::default();
        for e in &all {
            agg.push(e);
        }
        check_order(&all);
        (all, agg.finish())
    }

    /// The event grammar of Anthropic's streaming documentation.
    fn check_order(evs: &[StreamEvent]) {
        assert!(matches!(evs[0], StreamEvent::MessageStart { .. }));
        let mut open: Option<usize> = None;
        let mut next = 0;
        let mut ended = false;
        for e in &evs[1..] {
            assert!(!ended, "event after the end: {e:?}");
            match e {
                StreamEvent::BlockStart { index, .. } => {
                    assert!(open.is_none(), "block started while {open:?} open");
                    assert_eq!(*index, next);
                    open = Some(*index);
                    next += 1;
                }
                StreamEvent::BlockDelta { index, .. } => assert_eq!(Some(*index), open),
                StreamEvent::BlockStop { index } => {
                    assert_eq!(Some(*index), open);
                    open = None;
                }
                StreamEvent::MessageDelta { .. } => assert!(open.is_none()),
                StreamEvent::MessageStop | StreamEvent::Error(_) => ended = true,
                _ => {}
            }
        }
        assert!(ended, "no message_stop or error");
    }

    #[test]
    fn text_only() {
        let (_, m) = run(params(), vec![Step::Ev(text("Hel")), Step::Ev(text("lo")), Step::End]);
        let m = m.unwrap();
        assert_eq!(m["content"], json!([{"type": "text", "text": "Hello"}]));
        assert_eq!(m["stop_reason"], "end_turn");
        assert_eq!(m["stop_sequence"], Value::Null);
        assert_eq!(m["usage"]["output_tokens"], 1, "\"Hello\" is one token, counted whole");
    }

    #[test]
    fn text_then_tool_then_stop_reason_tool_use() {
        let (evs, m) = run(
            params(),
            vec![
                Step::Ev(text("Let me check.")),
                Step::Ev(Event::Unknown { event_type: "citationEvent".into() }),
                Step::Ev(tool("tooluse_abc", "get_weather", None, false)),
                Step::Ev(tool("tooluse_abc", "get_weather", Some("{\"city\":"), false)),
                Step::Ev(tool("tooluse_abc", "get_weather", Some("\"Paris\"}"), false)),
                Step::Ev(tool("tooluse_abc", "get_weather", None, true)),
                Step::Ev(Event::Metering { usage: Some(0.1), unit: None }),
                Step::End,
            ],
        );
        let m = m.unwrap();
        assert_eq!(m["stop_reason"], "tool_use");
        assert_eq!(
            m["content"][1],
            json!({"type": "tool_use", "id": "toolu_abc", "name": "get_weather", "input": {"city": "Paris"}})
        );
        let partials: Vec<_> = evs
            .iter()
            .filter_map(|e| match e {
                StreamEvent::BlockDelta { delta: Delta::InputJson(p), .. } => Some(p.clone()),
                _ => None,
            })
            .collect();
        // The call leaves whole, once its stop came: its input in one delta.
        assert_eq!(partials, vec!["{\"city\":\"Paris\"}"]);
    }

    /// The service says the model reached its output limit (`metadataEvent` `stopReason`
    /// `MAX_TOKENS`) before the daemon's own count did: the answer is cut, `max_tokens`, even
    /// after a whole tool call.
    #[test]
    fn an_upstream_max_tokens_stop_is_max_tokens() {
        let cut = |stop: &str| Event::Metadata { token_usage: None, stop_reason: Some(stop.into()) };
        let (_, m) =
            run(params(), vec![Step::Ev(text("Hello, wor")), Step::Ev(cut("MAX_TOKENS")), Step::End]);
        assert_eq!(m.unwrap()["stop_reason"], "max_tokens");
        let (_, m) = run(
            params(),
            vec![
                Step::Ev(tool("a", "t1", Some("{}"), true)),
                Step::Ev(text("and then")),
                Step::Ev(cut("MAX_TOKENS")),
                Step::End,
            ],
        );
        assert_eq!(m.unwrap()["stop_reason"], "max_tokens");
        let (_, m) = run(params(), vec![Step::Ev(text("Hello.")), Step::Ev(cut("END_TURN")), Step::End]);
        assert_eq!(m.unwrap()["stop_reason"], "end_turn");
        let (_, m) = run(
            params(),
            vec![Step::Ev(tool("a", "t1", Some("{}"), true)), Step::Ev(cut("TOOL_USE")), Step::End],
        );
        assert_eq!(m.unwrap()["stop_reason"], "tool_use");
    }

    /// A finished tool call's frames coming again (its stop twice, the whole call again) make
    /// no second `tool_use` block with the same id.
    #[test]
    fn a_repeated_tool_call_is_one_call() {
        for again in [
            vec![tool("t1", "f", None, true)],
            vec![tool("t1", "f", Some("{\"a\":1}"), false), tool("t1", "f", None, true)],
        ] {
            let mut steps = vec![
                Step::Ev(tool("t1", "f", Some("{\"a\":1}"), false)),
                Step::Ev(tool("t1", "f", None, true)),
            ];
            steps.extend(again.into_iter().map(Step::Ev));
            steps.push(Step::End);
            let (evs, m) = run(params(), steps);
            let m = m.unwrap();
            assert_eq!(
                m["content"],
                json!([{"type": "tool_use", "id": "toolu_t1", "name": "f", "input": {"a": 1}}])
            );
            assert_eq!(m["stop_reason"], "tool_use");
            let starts = evs.iter().filter(|e| matches!(e, StreamEvent::BlockStart { .. })).count();
            assert_eq!(starts, 1, "{evs:?}");
        }
    }

    /// Input that is not one JSON object is not handed over as a whole call, streamed or not.
    #[test]
    fn a_tool_call_with_broken_input_fails() {
        for input in ["{\"a\":1,\"b\":", "[1]", "{a:1}", "\"x\"", "{} {}"] {
            let (evs, m) = run(
                params(),
                vec![
                    Step::Ev(tool("t1", "f", Some(input), false)),
                    Step::Ev(tool("t1", "f", None, true)),
                    Step::End,
                ],
            );
            assert!(m.is_err(), "{input}: {m:?}");
            assert!(matches!(evs.last(), Some(StreamEvent::Error(_))), "{input}: {evs:?}");
            assert!(!evs.iter().any(|e| matches!(e, StreamEvent::MessageDelta { .. })), "{input}");
        }
        let (_, m) =
            run(params(), vec![Step::Ev(tool("t1", "f", Some(" {\"a\": [1, 2]} "), true)), Step::End]);
        assert_eq!(m.unwrap()["content"][0]["input"], json!({"a": [1, 2]}));
    }

    /// Something else arriving before an open call's stop ends the call: as made when its input
    /// is whole, with an error when it is not.
    #[test]
    fn a_tool_call_interrupted_before_its_stop() {
        let (_, m) = run(
            params(),
            vec![Step::Ev(tool("t1", "f", Some("{\"a\":1}"), false)), Step::Ev(text("then text")), Step::End],
        );
        let m = m.unwrap();
        assert_eq!(m["content"][0]["input"], json!({"a": 1}));
        assert_eq!(m["content"][1]["text"], "then text");
        assert_eq!(m["stop_reason"], "tool_use");
        let (_, m) = run(
            params(),
            vec![
                Step::Ev(tool("t1", "f", Some("{\"a\":1}"), false)),
                Step::Ev(tool("t2", "g", Some("{}"), true)),
                Step::Ev(tool("t1", "f", None, true)),
                Step::End,
            ],
        );
        let m = m.unwrap();
        assert_eq!(m["content"].as_array().unwrap().len(), 2, "{m}");
        let (evs, m) = run(
            params(),
            vec![Step::Ev(tool("t1", "f", Some("{\"a\":"), false)), Step::Ev(text("oops")), Step::End],
        );
        assert!(m.is_err());
        assert!(matches!(evs.last(), Some(StreamEvent::Error(_))));
    }

    #[test]
    fn two_tools_and_tool_then_text() {
        let (_, m) = run(
            params(),
            vec![
                Step::Ev(tool("a", "t1", Some("{}"), false)),
                Step::Ev(tool("a", "t1", None, true)),
                Step::Ev(tool("b", "t2", None, false)),
                Step::Ev(tool("b", "t2", None, true)),
                Step::Ev(text("done")),
                Step::End,
            ],
        );
        let m = m.unwrap();
        let c = m["content"].as_array().unwrap();
        assert_eq!(c.len(), 3);
        assert_eq!(c[0]["id"], "toolu_a");
        assert_eq!(c[1]["input"], json!({}));
        assert_eq!(c[2]["text"], "done");
        assert_eq!(m["stop_reason"], "tool_use");
    }

    #[test]
    fn aliased_tool_name_mapped_back() {
        let mut p = params();
        let long = "n".repeat(80);
        let alias = p.tool_names.upstream(&long);
        let (_, m) = run(p, vec![Step::Ev(tool("x", &alias, Some("{}"), true)), Step::End]);
        assert_eq!(m.unwrap()["content"][0]["name"], long);
    }

    #[test]
    fn thinking_tag_split_at_every_offset() {
        let answer = "<thinking>\nStep one.\n</thinking>\n\nThe answer is 42.";
        for i in 0..answer.len() {
            for j in i..answer.len() {
                let parts = [&answer[..i], &answer[i..j], &answer[j..]];
                let mut p = params();
                p.thinking = true;
                let mut steps: Vec<Step> = parts.iter().map(|s| Step::Ev(text(s))).collect();
                steps.push(Step::End);
                let (_, m) = run(p, steps);
                let m = m.unwrap();
                assert_eq!(m["content"][0]["type"], "thinking", "split {i},{j}");
                assert_eq!(m["content"][0]["thinking"], "Step one.", "split {i},{j}");
                assert_eq!(m["content"][0]["signature"], signature_for("Step one."));
                assert_eq!(
                    m["content"][1],
                    json!({"type": "text", "text": "The answer is 42."}),
                    "split {i},{j}"
                );
            }
        }
    }

    #[test]
    fn thinking_tag_later_in_text_is_text() {
        let mut p = params();
        p.thinking = true;
        let (_, m) =
            run(p, vec![Step::Ev(text("Use `<thinking>` tags like <thinking>x</thinking>.")), Step::End]);
        let m = m.unwrap();
        assert_eq!(m["content"].as_array().unwrap().len(), 1);
        assert_eq!(m["content"][0]["type"], "text");
        let (_, m) = run(params(), vec![Step::Ev(text("<thinking>not requested</thinking>")), Step::End]);
        assert_eq!(m.unwrap()["content"][0]["type"], "text");
    }

    fn reasoning(text: Option<&str>, signature: Option<&str>) -> Step {
        Step::Ev(Event::Reasoning {
            text: text.map(str::to_string),
            signature: signature.map(str::to_string),
            redacted_content: None,
        })
    }

    /// Pieces handed over in one batch (one read) leave as one delta; pieces of separate
    /// batches stay separate; a block change ends the merging.
    #[test]
    fn pieces_of_one_batch_leave_as_one_delta() {
        let deltas = |evs: &[StreamEvent]| -> Vec<String> {
            evs.iter()
                .filter_map(|e| match e {
                    StreamEvent::BlockDelta { delta: Delta::Text(t) | Delta::Thinking(t), .. } => {
                        Some(t.clone())
                    }
                    _ => None,
                })
                .collect()
        };
        let mut st = ResponseState::new(params());
        let mut all = st.start();
        let mut batch = Vec::new();
        for piece in ["Hel", "lo", ", "] {
            st.on_event_into(text(piece), &mut batch);
        }
        assert_eq!(deltas(&batch), ["Hello, "]);
        all.append(&mut batch);
        st.on_event_into(text("world"), &mut batch);
        st.on_event_into(
            Event::Reasoning { text: Some("a".into()), signature: None, redacted_content: None },
            &mut batch,
        );
        st.on_event_into(
            Event::Reasoning { text: Some("b".into()), signature: None, redacted_content: None },
            &mut batch,
        );
        st.on_event_into(text("!"), &mut batch);
        assert_eq!(deltas(&batch), ["world", "ab", "!"]);
        all.append(&mut batch);
        all.extend(st.on_end());
        check_order(&all);
        let mut agg = Aggregator::default();
        for e in &all {
            agg.push(e);
        }
        let m = agg.finish().unwrap();
        assert_eq!(m["content"][0]["text"], "Hello, world");
        assert_eq!(m["content"][1]["thinking"], "ab");
        assert_eq!(m["content"][2]["text"], "!");
    }

    #[test]
    fn reasoning_events_become_thinking_block() {
        let (_, m) = run(
            params(),
            vec![reasoning(Some("hmm"), None), reasoning(None, Some("SIG")), Step::Ev(text("ok")), Step::End],
        );
        let m = m.unwrap();
        assert_eq!(m["content"][0], json!({"type": "thinking", "thinking": "hmm", "signature": "SIG"}));
        assert_eq!(m["content"][1]["text"], "ok");
    }

    /// Native reasoning: text pieces, then the signature in pieces (joined into one
    /// `signature_delta` before the block's stop); text after a signature is a new block;
    /// redacted reasoning is a `redacted_thinking` block of its own.
    #[test]
    fn signature_pieces_join_and_redacted_reasoning_is_its_own_block() {
        let (evs, m) = run(
            params(),
            vec![
                reasoning(Some("Step one. "), None),
                reasoning(Some("Step two."), None),
                reasoning(None, Some("AAAA")),
                reasoning(None, Some("BBBB")),
                reasoning(None, Some("==")),
                reasoning(Some("Again."), None),
                reasoning(None, Some("CCCC")),
                Step::Ev(Event::Reasoning {
                    text: None,
                    signature: None,
                    redacted_content: Some("cmVk".into()),
                }),
                Step::Ev(text("Answer.")),
                Step::End,
            ],
        );
        let m = m.unwrap();
        assert_eq!(
            m["content"],
            json!([
                {"type": "thinking", "thinking": "Step one. Step two.", "signature": "AAAABBBB=="},
                {"type": "thinking", "thinking": "Again.", "signature": "CCCC"},
                {"type": "redacted_thinking", "data": "cmVk"},
                {"type": "text", "text": "Answer."}
            ])
        );
        let summary = crate::anthropic::grammar::check_events(&evs).unwrap();
        assert_eq!(
            summary.thinking,
            vec![
                ("Step one. Step two.".to_string(), "AAAABBBB==".to_string()),
                ("Again.".into(), "CCCC".into())
            ]
        );
        // Each thinking block has exactly one signature_delta, its last delta.
        let signatures: Vec<(usize, &str)> = evs
            .iter()
            .filter_map(|e| match e {
                StreamEvent::BlockDelta { index, delta: Delta::Signature(s) } => Some((*index, s.as_str())),
                _ => None,
            })
            .collect();
        assert_eq!(signatures, vec![(0, "AAAABBBB=="), (1, "CCCC")]);
    }

    /// A reasoning block cut before its signature (max_tokens) gets a daemon-made one, which
    /// the request side never replays upstream.
    #[test]
    fn reasoning_cut_by_max_tokens_is_closed_with_a_daemon_signature() {
        let mut p = params();
        p.max_tokens = 3;
        let (_, m) = run(
            p,
            vec![
                reasoning(Some("one two three four five six"), None),
                reasoning(None, Some("SIG")),
                Step::End,
            ],
        );
        let m = m.unwrap();
        assert_eq!(m["stop_reason"], "max_tokens");
        let thinking = m["content"][0]["thinking"].as_str().unwrap();
        assert_eq!(thinking, "one two three");
        assert_eq!(m["content"][0]["signature"], signature_for(thinking));
    }

    #[test]
    fn stop_sequence_split_across_fragments() {
        let answer = "one two STOP three";
        for i in 1..answer.len() {
            let mut p = params();
            p.stop_sequences = vec!["STOP".into(), "never".into()];
            let (_, m) = run(p, vec![Step::Ev(text(&answer[..i])), Step::Ev(text(&answer[i..])), Step::End]);
            let m = m.unwrap();
            assert_eq!(m["content"][0]["text"], "one two ", "split {i}");
            assert_eq!(m["stop_reason"], "stop_sequence");
            assert_eq!(m["stop_sequence"], "STOP");
        }
    }

    #[test]
    fn max_tokens_cut() {
        let mut p = params();
        p.max_tokens = 5;
        let (_, m) = run(p, vec![Step::Ev(text("one two three four five six seven eight")), Step::End]);
        let m = m.unwrap();
        assert_eq!(m["stop_reason"], "max_tokens");
        assert_eq!(m["usage"]["output_tokens"], 5);
        assert_eq!(m["content"][0]["text"], "one two three four five");
    }

    #[test]
    fn faults() {
        // Output truncated upstream → max_tokens.
        let (_, m) = run(
            params(),
            vec![
                Step::Ev(text("partial")),
                Step::Fail(StreamError::Exception {
                    exception_type: "ContentLengthExceededException".into(),
                    message: "x".into(),
                    reason: None,
                }),
            ],
        );
        assert_eq!(m.unwrap()["stop_reason"], "max_tokens");
        // Capacity exception → overloaded_error, text block closed first.
        let (evs, m) = run(
            params(),
            vec![
                Step::Ev(text("partial")),
                Step::Fail(StreamError::Exception {
                    exception_type: "error".into(),
                    message: "busy".into(),
                    reason: Some("MODEL_TEMPORARILY_UNAVAILABLE".into()),
                }),
            ],
        );
        assert_eq!(m.unwrap_err().kind, ErrorKind::Overloaded);
        assert!(matches!(evs[evs.len() - 2], StreamEvent::BlockStop { .. }));
        // Error frame / corrupt frame / idle / transport → api_error.
        for e in [
            StreamError::ErrorFrame { code: "X".into(), message: "y".into() },
            StreamError::Idle(120),
            StreamError::Transport("reset".into()),
        ] {
            let (_, m) = run(params(), vec![Step::Ev(text("a")), Step::Fail(e)]);
            assert_eq!(m.unwrap_err().kind, ErrorKind::Api);
        }
        // A tool call cut short (no stop, its input incomplete), by the end of the stream or by
        // the service's output limit, is left out: nothing of it is sent, and the message ends
        // as cut (max_tokens), with what came before it.
        let tool_started = |evs: &[StreamEvent]| {
            evs.iter().any(|e| matches!(e, StreamEvent::BlockStart { block: BlockStart::ToolUse { .. }, .. }))
        };
        let limit = StreamError::Exception {
            exception_type: "ContentLengthExceededException".into(),
            message: "x".into(),
            reason: None,
        };
        for last in [Step::End, Step::Fail(limit)] {
            let steps = vec![
                Step::Ev(text("Writing it.")),
                Step::Ev(tool("a", "t", Some("{\"x\": \"lo"), false)),
                last,
            ];
            let (evs, m) = run(params(), steps);
            let m = m.unwrap();
            assert_eq!(m["stop_reason"], "max_tokens", "{m}");
            assert_eq!(m["content"], json!([{"type": "text", "text": "Writing it."}]));
            assert!(!tool_started(&evs), "{evs:?}");
        }
        // Whole input with no stop: the call counts as made.
        let (_, m) = run(params(), vec![Step::Ev(tool("a", "t", Some("{\"x\": 1}"), false)), Step::End]);
        let m = m.unwrap();
        assert_eq!(m["stop_reason"], "tool_use");
        assert_eq!(m["content"][0]["input"], json!({"x": 1}));
        // The upstream failed mid-call: an error, with nothing of the call sent.
        let steps = vec![
            Step::Ev(tool("a", "t", Some("{\"x\": 1"), false)),
            Step::Fail(StreamError::Transport("reset".into())),
        ];
        let (evs, m) = run(params(), steps);
        assert!(m.is_err());
        assert!(!tool_started(&evs), "{evs:?}");
        // An empty text event between a call's fragments does not end the call.
        let steps = vec![
            Step::Ev(tool("a", "t", Some("{\"x\":"), false)),
            Step::Ev(text("")),
            Step::Ev(tool("a", "t", Some(" 2}"), true)),
            Step::End,
        ];
        let (_, m) = run(params(), steps);
        assert_eq!(m.unwrap()["content"][0]["input"], json!({"x": 2}));
    }

    /// The exact bytes of a streamed reply, in the order of Anthropic's streaming documentation:
    /// message_start, ping, then per block start/deltas/stop, message_delta, message_stop.
    #[test]
    fn sse_bytes_follow_the_documented_order() {
        let mut p = params();
        p.input_tokens = 25;
        let mut st = ResponseState::new(p);
        let mut evs = st.start();
        evs.extend(st.on_event(text("Hello")));
        evs.extend(st.on_event(tool("tooluse_X1", "get_weather", Some("{\"city\": \"Paris\"}"), false)));
        evs.extend(st.on_event(tool("tooluse_X1", "get_weather", None, true)));
        evs.extend(st.on_end());
        let bytes: Vec<u8> = evs.iter().flat_map(|e| e.to_sse().to_vec()).collect();
        let expected = concat!(
            "event: message_start\n",
            "data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_test\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-sonnet-4-5\",\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":25,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":0,\"output_tokens\":1}}}\n\n",
            "event: ping\n",
            "data: {\"type\":\"ping\"}\n\n",
            "event: content_block_start\n",
            "data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
            "event: content_block_delta\n",
            "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello\"}}\n\n",
            "event: content_block_stop\n",
            "data: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
            "event: content_block_start\n",
            "data: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"tool_use\",\"id\":\"toolu_X1\",\"name\":\"get_weather\",\"input\":{}}}\n\n",
            "event: content_block_delta\n",
            "data: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"city\\\": \\\"Paris\\\"}\"}}\n\n",
            "event: content_block_stop\n",
            "data: {\"type\":\"content_block_stop\",\"index\":1}\n\n",
            "event: message_delta\n",
            "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\",\"stop_sequence\":null},\"usage\":{\"input_tokens\":25,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":0,\"output_tokens\":7}}\n\n",
            "event: message_stop\n",
            "data: {\"type\":\"message_stop\"}\n\n",
        );
        assert_eq!(String::from_utf8(bytes).unwrap(), expected);
    }

    #[test]
    fn context_usage_sets_input_tokens() {
        let (_, m) = run(
            params(),
            vec![Step::Ev(Event::ContextUsage { percentage: 1.5 }), Step::Ev(text("x")), Step::End],
        );
        assert_eq!(m.unwrap()["usage"]["input_tokens"], 3000);
    }
}
