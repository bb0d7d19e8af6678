//! Claude → Amazon Q: turns a parsed Messages request into a `GenerateAssistantResponse` body
//! that Amazon Q accepts (alternating history, tool results answering earlier tool uses, every
//! used tool defined, names and descriptions within limits) and that carries everything the
//! model needs (system prompt, thinking request, tool-choice instruction, prefill).
//!
//! Thinking goes one of two ways. A model with an `additionalModelRequestFieldsSchema` in the
//! catalog ([`Context::caps`]) reasons natively: `additionalModelRequestFields` and replayed
//! `reasoningContent` ([`super::reasoning`]), no prompt tags. Any other model (no catalog, or
//! the 4.5 family without a schema) is asked with `<thinking_mode>` tags in the prompt, and its
//! history's thinking goes back as `<thinking>` text.

use super::models::ModelMap;
use crate::anthropic::request::{
    Block, DocumentSource, ImageSource, Message, MessagesRequest, Role, Thinking, ToolChoice, ToolDef,
};
use crate::anthropic::{ApiError, ErrorKind};
use crate::upstream::types::{
    AssistantResponseMessage, ChatTriggerType, ConversationState, CurrentMessage, GenerateRequest,
    HistoryMessage, Image, ImageSource as QImageSource, InputSchema, ReasoningContent, Tool, ToolResult,
    ToolResultContent, ToolResultStatus, ToolSpecification, ToolUse, UserInputMessage,
    UserInputMessageContext,
};
use serde_json::{Map, Value, json};
use std::collections::{HashMap, HashSet};

/// Amazon Q's practical limits (PROTOCOL.md §2).
pub const MAX_USER_MESSAGE_CHARS: usize = 600_000;
pub const MAX_TOOL_RESULT_CHARS: usize = 800_000;
pub const MAX_DESCRIPTION_CHARS: usize = 10_240;
pub const MAX_IMAGES_PER_MESSAGE: usize = 10;
/// How much of a client's tool name a placeholder tool's description quotes.
const PLACEHOLDER_NAME_CHARS: usize = 200;
const ORIGIN: &str = "AI_EDITOR";

/// Maps tool names that Amazon Q cannot take to short aliases, and back.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ToolNames {
    to_alias: HashMap<String, String>,
    to_original: HashMap<String, String>,
}

impl ToolNames {
    /// The name to send upstream for a client's tool name.
    pub fn upstream(&mut self, name: &str) -> String {
        if valid_q_name(name) {
            return name.to_string();
        }
        if let Some(a) = self.to_alias.get(name) {
            return a.clone();
        }
        let alias = alias_for(name);
        self.to_alias.insert(name.to_string(), alias.clone());
        self.to_original.insert(alias.clone(), name.to_string());
        alias
    }

    /// The client's name for a name Amazon Q used.
    pub fn original<'a>(&'a self, upstream: &'a str) -> &'a str {
        self.to_original.get(upstream).map(String::as_str).unwrap_or(upstream)
    }
}

/// `[a-zA-Z0-9_-]{1,64}`: what Amazon Q accepts for tool names and tool-use ids.
pub fn valid_q_name(n: &str) -> bool {
    !n.is_empty() && n.len() <= 64 && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A readable prefix plus a hash: `mcp__server__very_long_…` → `mcp__server__very_lon_3f2a91c4`.
fn alias_for(name: &str) -> String {
    let clean: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' })
        .collect();
    let hash = crate::hash::fingerprint_of(name.as_bytes());
    let prefix: String = clean.chars().take(64 - 1 - hash.len()).collect();
    format!("{prefix}_{hash}")
}

/// Tool-use ids that break Amazon Q's pattern get a stable alias (the same on every request).
fn q_tool_use_id(id: &str) -> String {
    if valid_q_name(id) { id.to_string() } else { alias_for(id) }
}

/// The translated request and what the response side needs to map answers back.
#[derive(Debug, Clone)]
pub struct Translated {
    /// The body without `profileArn` (set per account when sending).
    pub request: GenerateRequest,
    pub q_model: String,
    /// What the answer's state machine needs to know about this request.
    pub response: super::ResponseParams,
}

/// Inputs besides the request itself.
pub struct Context<'a> {
    pub models: &'a ModelMap,
    /// A client session id (Claude Code's session header), for a stable conversation id.
    pub session_id: Option<&'a str>,
    /// The target model's capabilities from the catalog, when known.
    pub caps: Option<&'a super::ModelCaps>,
    /// The live catalog the model name is resolved against (`None`: the built-in table).
    pub catalog: Option<&'a super::Catalog>,
}

fn too_long(what: &str, n: usize, max: usize) -> ApiError {
    ApiError::new(
        ErrorKind::InvalidRequest,
        format!("prompt is too long: {what} has {n} characters, more than Amazon Q accepts ({max})"),
    )
}

/// One merged turn while building the history.
#[derive(Default)]
struct UserTurn {
    texts: Vec<String>,
    images: Vec<Image>,
    /// Where each of `images` is named in a tool result (that result's index in `results`, and
    /// the part that says "attached"), to be said omitted if the image is dropped.
    image_from: Vec<Option<(usize, usize)>>,
    omitted_images: usize,
    results: Vec<ToolResult>,
    /// Where each result's id is in `results`, and that result's size in characters (a
    /// search and a recount per result made a request of many results quadratic).
    result_at: HashMap<String, (usize, usize)>,
}

#[derive(Default)]
struct AssistantTurn {
    texts: Vec<String>,
    uses: Vec<ToolUse>,
    /// Native reasoning only: the turn's reasoning to replay (its first replayable block).
    reasoning: Option<ReasoningContent>,
}

enum Turn {
    User(UserTurn),
    Assistant(AssistantTurn),
}

/// Translates a parsed request. Errors are client errors (400/404).
pub fn translate(req: &MessagesRequest, ctx: &Context) -> Result<Translated, ApiError> {
    let q_model = match ctx.catalog {
        Some(live) => ctx.models.resolve_live(&req.routed_model(), live)?,
        None => ctx.models.resolve(&req.routed_model())?,
    };
    // A `max_tokens` above the model's output limit is not refused: clients choose it by
    // Anthropic's limits (Claude Code's non-streaming fallback asks for 64,000 whatever the
    // model), and the service stops at its own limit anyway. Where the model takes a
    // `max_tokens` field it gets the smaller of the two; the answer is cut at the client's.
    // The model's schema, when it reasons natively: checked first, so that a value the model
    // does not take is the client's 400, never the service's.
    let native = ctx.caps.and_then(|c| c.request_fields_schema.as_ref());
    let additional_fields = match native {
        Some(schema) => super::reasoning::request_fields(req, &q_model, schema)?,
        None => None,
    };
    let mut names = ToolNames::default();
    let mut preamble: Vec<String> = req.system.clone();

    // Tools the client defined (server tools Amazon Q cannot run are left out).
    let mut tools: Vec<Tool> = Vec::new();
    let mut defined: HashSet<String> = HashSet::new();
    for t in &req.tools {
        match t {
            ToolDef::Custom { name, description, input_schema } => {
                let q_name = names.upstream(name);
                let mut desc = description.clone().unwrap_or_default();
                if desc.trim().is_empty() {
                    desc = format!("Tool {name}");
                }
                if desc.chars().count() > MAX_DESCRIPTION_CHARS {
                    preamble.push(format!("Full description of the tool `{name}`:\n{desc}"));
                    let cut: String = desc.chars().take(MAX_DESCRIPTION_CHARS - 80).collect();
                    desc = format!("{cut}… (truncated; the full description is in the system prompt)");
                }
                if defined.insert(q_name.clone()) {
                    tools.push(tool_spec(q_name, desc, normalise_schema(input_schema)));
                }
            }
            ToolDef::Server { kind, name } => {
                tracing::debug!(tool = %name, kind = %kind, "server tool left out: Amazon Q cannot run it");
            }
        }
    }
    // Server tools Amazon Q cannot run: a request that forces one (by name, or `any` with no
    // client tool) would get an answer made up without it (search results from memory), so it
    // is refused and the tool visibly fails; otherwise the model is told they are not there
    // (a chat front end may offer web search on every turn, and most turns need none).
    let server: Vec<(&str, &str)> = req
        .tools
        .iter()
        .filter_map(|t| match t {
            ToolDef::Server { kind, name } => Some((name.as_str(), kind.as_str())),
            _ => None,
        })
        .collect();
    for (name, kind) in &server {
        let forced = match &req.tool_choice {
            ToolChoice::Tool(n) => n == name,
            ToolChoice::Any => defined.is_empty(),
            _ => false,
        };
        if forced {
            return Err(ApiError::invalid(format!(
                "tools: the server tool `{name}` ({kind}) is not supported by this server: Amazon Q cannot run \
                 web search, web fetch, code execution or MCP connectors"
            )));
        }
    }
    if !server.is_empty() {
        let names: Vec<String> = server.iter().map(|(n, _)| format!("`{n}`")).collect();
        preamble.push(format!(
            "The tools {} are not available in this conversation: do not claim to have used them; \
             answer from what you know and say so when it may be out of date.",
            names.join(", ")
        ));
    }

    // Build merged turns. A system message stays where the client put it: after a user message it
    // joins that user turn (so it keeps its place once the assistant has answered), after an
    // assistant message it opens the next user turn; before the first user message it is part of
    // the system prompt.
    let mut turns: Vec<Turn> = Vec::new();
    let mut pending_system: Vec<String> = Vec::new();
    let first_user = req.messages.iter().position(|m| m.role == Role::User).unwrap_or(req.messages.len());
    // The turn each Claude message went into (for its cache breakpoint); a system message
    // waiting for the next user turn is placed with it.
    let mut turn_of: Vec<Placed> = vec![Placed::Nowhere; req.messages.len()];
    let mut pending_at: Vec<usize> = Vec::new();
    // Where the current tool loop began: the last user message that is not only tool results.
    // Thinking written back as `<thinking>` text (models without native reasoning) is kept from
    // there on only, as Anthropic leaves earlier turns' thinking out of the context: a long
    // session's every past thought would fill the window (and the model would read its own
    // old tags as part of its answers).
    let text_only = ctx.caps.is_some_and(|c| c.text_only);
    let loop_start = req.messages.iter().rposition(|m| {
        m.role == Role::User && m.content.iter().any(|b| !matches!(b, Block::ToolResult { .. }))
    });
    for (i, m) in req.messages.iter().enumerate() {
        match m.role {
            Role::System => {
                let text = plain_text(m);
                if !text.trim().is_empty() {
                    if i < first_user {
                        preamble.push(text);
                        turn_of[i] = Placed::Preamble;
                    } else if let Some(Turn::User(prev)) = turns.last_mut() {
                        prev.texts.push(system_reminder(&text));
                        turn_of[i] = Placed::Turn(turns.len() - 1);
                    } else {
                        pending_system.push(text);
                        pending_at.push(i);
                    }
                }
            }
            Role::User => {
                // Consecutive user messages fill one turn, so that the per-message limits (images,
                // one result per tool use) hold for the merged turn.
                if !matches!(turns.last(), Some(Turn::User(_))) {
                    turns.push(Turn::User(UserTurn::default()));
                }
                let at = Placed::Turn(turns.len() - 1);
                let Some(Turn::User(turn)) = turns.last_mut() else {
                    unreachable!("a user turn was just ensured");
                };
                for s in pending_system.drain(..) {
                    turn.texts.push(system_reminder(&s));
                }
                for j in pending_at.drain(..).chain([i]) {
                    turn_of[j] = at;
                }
                user_blocks(&m.content, turn, text_only)?;
            }
            Role::Assistant => {
                let mut turn = AssistantTurn::default();
                let thinking = if native.is_some() {
                    Replay::Native
                } else if loop_start.is_none_or(|start| i > start) {
                    Replay::Text
                } else {
                    Replay::None
                };
                assistant_blocks(&m.content, &mut turn, &mut names, thinking);
                match turns.last_mut() {
                    Some(Turn::Assistant(prev)) => {
                        prev.texts.append(&mut turn.texts);
                        prev.uses.append(&mut turn.uses);
                        prev.reasoning = prev.reasoning.take().or(turn.reasoning);
                    }
                    _ => turns.push(Turn::Assistant(turn)),
                }
                turn_of[i] = Placed::Turn(turns.len() - 1);
            }
        }
    }
    // Turns from here on: those before `current_turn` become the history (shifted by one when
    // a turn is put in front), the current turn and a prefill after it the current message.

    // A trailing assistant turn is a prefill: the answer must continue it.
    let mut prefill = None;
    if matches!(turns.last(), Some(Turn::Assistant(_))) {
        if let Some(Turn::Assistant(a)) = turns.pop() {
            let text = a.texts.join("\n\n");
            if !a.uses.is_empty() {
                return Err(ApiError::invalid(
                    "messages: the final assistant message may not contain tool_use blocks without their tool_result",
                ));
            }
            if !text.trim().is_empty() {
                prefill = Some(text);
            }
        }
    }
    let current_turn = turns.len().saturating_sub(1);
    let Some(Turn::User(mut current)) = turns.pop() else {
        return Err(ApiError::invalid(
            "messages: a user message is required before the final assistant message",
        ));
    };
    // System messages after the last user message belong to the current turn.
    for s in pending_system.drain(..) {
        current.texts.push(system_reminder(&s));
    }
    for j in pending_at.drain(..) {
        turn_of[j] = Placed::Turn(current_turn);
    }
    let mut shift = 0;
    if turns.first().is_some_and(|t| matches!(t, Turn::Assistant(_))) {
        shift = 1;
        turns.insert(
            0,
            Turn::User(UserTurn { texts: vec!["(conversation start)".into()], ..Default::default() }),
        );
    }

    // Every tool used in the history must be defined: placeholders for the missing ones.
    for t in &turns {
        if let Turn::Assistant(a) = t {
            for u in &a.uses {
                if defined.insert(u.name.clone()) {
                    // The client's name is unchecked (a tool_use block's name has no length
                    // limit): a long one is shortened so that the description stays within limits.
                    let original = names.original(&u.name);
                    let shown = if original.chars().count() > PLACEHOLDER_NAME_CHARS {
                        let cut: String = original.chars().take(PLACEHOLDER_NAME_CHARS).collect();
                        format!("{cut}…")
                    } else {
                        original.to_string()
                    };
                    tools.push(tool_spec(
                        u.name.clone(),
                        format!("Tool {shown} (used earlier in this conversation; no longer offered)"),
                        json!({"type": "object", "properties": {}}),
                    ));
                }
            }
        }
    }
    let history_needs_tools = turns.iter().any(|t| matches!(t, Turn::Assistant(a) if !a.uses.is_empty()));

    // The system prompt goes first: the first user turn, or the current message without history.
    let mut instructions: Vec<String> = Vec::new();
    match req.tool_choice {
        ToolChoice::Auto => {}
        ToolChoice::Any => {
            instructions.push("You must call at least one of the available tools in this reply.".into())
        }
        // The name the model sees in `tools` (an alias for a name Amazon Q cannot take).
        ToolChoice::Tool(ref n) => {
            let q = names.upstream(n);
            if defined.contains(&q) {
                instructions.push(format!("You must call the tool `{q}` in this reply."))
            }
        }
        ToolChoice::None => instructions.push("Do not call any tool in this reply; answer in text.".into()),
    }
    if req.single_tool_call && !matches!(req.tool_choice, ToolChoice::None) {
        instructions.push("Call at most one tool in this reply.".into());
    }
    // Structured outputs: the service has no such field, so the schema goes to the model as an
    // instruction (best effort: the answer is not validated against it).
    if let Some(schema) = &req.output_schema {
        instructions.push(format!(
            "Reply with one JSON value that matches this JSON Schema, and nothing else (no prose, no code fence):\n{schema}"
        ));
    }
    let send_tools = match req.tool_choice {
        ToolChoice::None => {
            if history_needs_tools {
                tools
            } else {
                Vec::new()
            }
        }
        _ => tools,
    };

    let thinking_prefix = match req.thinking {
        _ if native.is_some() => None,
        Thinking::Disabled => None,
        Thinking::Enabled { budget_tokens } => Some(budget_tokens),
        Thinking::Adaptive => Some((req.max_tokens / 2).clamp(1024, 32_000)),
    }
    .map(|budget| {
        format!("<thinking_mode>enabled</thinking_mode><max_thinking_length>{budget}</max_thinking_length>")
    });

    let system_text = if preamble.is_empty() { None } else { Some(preamble.join("\n\n")) };
    let mut history: Vec<HistoryMessage> = Vec::with_capacity(turns.len());
    let has_history = !turns.is_empty();
    for (i, t) in turns.into_iter().enumerate() {
        match t {
            Turn::User(mut u) => {
                if i == 0 {
                    if let Some(s) = &system_text {
                        u.texts.insert(0, format!("<system>\n{s}\n</system>"));
                    }
                }
                history.push(HistoryMessage::UserInputMessage(user_message(u, &q_model, Vec::new())?));
            }
            Turn::Assistant(a) => {
                let mut content = a.texts.join("\n\n");
                if content.trim().is_empty() {
                    content = if a.uses.is_empty() { "(no text)".into() } else { "(calling tools)".into() };
                }
                history.push(HistoryMessage::AssistantResponseMessage(AssistantResponseMessage {
                    message_id: None,
                    content,
                    tool_uses: a.uses,
                    reasoning_content: a.reasoning,
                    cache_point: None,
                }));
            }
        }
    }

    let mut head: Vec<String> = Vec::new();
    if let Some(t) = thinking_prefix {
        head.push(t);
    }
    if !has_history {
        if let Some(s) = &system_text {
            head.push(format!("<system>\n{s}\n</system>"));
        }
    }
    current.texts.splice(0..0, head);
    note_omitted_images(&mut current);
    current.texts.extend(instructions);
    if let Some(p) = prefill {
        current.texts.push(format!(
            "Begin your reply with exactly the following text and continue from it (do not repeat it):\n{p}"
        ));
    }
    let mut current = user_message(current, &q_model, send_tools)?;

    let conversation_id = conversation_id(req.metadata_user_id.as_deref(), ctx.session_id);
    let response = super::ResponseParams {
        message_id: crate::ids::prefixed("msg_"),
        model: req.model.clone(),
        input_tokens: super::tokens::count_request(req),
        max_tokens: req.max_tokens as u64,
        stop_sequences: req.stop_sequences.clone(),
        // Prompt-tag thinking only: native reasoning arrives as reasoning events.
        thinking: native.is_none() && !matches!(req.thinking, Thinking::Disabled),
        tool_names: names,
        context_window: ctx.caps.and_then(|c| c.max_input_tokens),
    };
    let max_points = ctx.caps.map_or(0, |c| c.max_cache_checkpoints) as usize;
    if max_points > 0 {
        // Where each breakpoint's message went, from the end: 0 the current message (a
        // prefill after it included), the history's last entry 1, its first `history.len()`.
        let total = history.len() + 1;
        let mut from_end: Vec<usize> = req
            .cache_messages
            .iter()
            .filter_map(|&i| req.messages.get(i).map(|_| i))
            .filter_map(|i| match turn_of[i] {
                Placed::Nowhere => None,
                Placed::Preamble => Some(total - 1),
                Placed::Turn(t) if t >= current_turn => Some(0),
                Placed::Turn(t) => (t + shift < history.len()).then(|| history.len() - (t + shift)),
            })
            .collect();
        if req.cache_system {
            from_end.push(total - 1);
        }
        place_cache_points(from_end, &mut history, &mut current, max_points);
    }
    Ok(Translated {
        request: GenerateRequest {
            conversation_state: ConversationState {
                conversation_id,
                chat_trigger_type: ChatTriggerType::Manual,
                history,
                current_message: CurrentMessage { user_input_message: current },
            },
            profile_arn: None,
            additional_model_request_fields: additional_fields,
        },
        q_model,
        response,
    })
}

fn tool_spec(name: String, description: String, schema: Value) -> Tool {
    Tool {
        tool_specification: ToolSpecification {
            name,
            description,
            input_schema: InputSchema { json: schema },
        },
    }
}

/// Drops `$schema`, and makes sure of `type: object`, a `properties` object and a `required` array.
pub fn normalise_schema(schema: &Value) -> Value {
    let mut m: Map<String, Value> = schema.as_object().cloned().unwrap_or_default();
    m.remove("$schema");
    m.insert("type".into(), Value::String("object".into()));
    if !m.get("properties").is_some_and(Value::is_object) {
        m.insert("properties".into(), Value::Object(Map::new()));
    }
    match m.get("required") {
        Some(Value::Array(a)) => {
            let only_strings: Vec<Value> = a.iter().filter(|v| v.is_string()).cloned().collect();
            m.insert("required".into(), Value::Array(only_strings));
        }
        Some(_) => {
            m.remove("required");
        }
        None => {}
    }
    Value::Object(m)
}

fn system_reminder(text: &str) -> String {
    format!("<system-reminder>\n{text}\n</system-reminder>")
}

fn plain_text(m: &Message) -> String {
    m.content
        .iter()
        .filter_map(|b| match b {
            Block::Text { text } => Some(text.as_str()),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// An inline image as the service takes it; an image by URL or file id (this server fetches
/// nothing) is the text that stands in for it, for the model to see and say.
fn image(source: &ImageSource, text_only: bool) -> Result<Image, String> {
    if text_only {
        // The service refuses the whole request otherwise, and every later one of the session
        // (the image stays in the history).
        return Err(
            "[an image was attached here; the model answering takes text only, so it was left out]".into()
        );
    }
    match source {
        ImageSource::Base64 { media_type, data } => Ok(Image {
            format: media_type.trim_start_matches("image/").to_string(),
            source: QImageSource { bytes: data.clone() },
        }),
        ImageSource::Url { .. } | ImageSource::File { .. } => Err(
            "[an image was attached here by URL or file id; this server passes only inline (base64) images, so it was left out]"
                .into(),
        ),
    }
}

/// A document as text. A PDF, or a document by URL or file id, is a note saying it was left
/// out: the service takes no documents, and refusing the request would refuse every later one
/// too (the block stays in the client's history: Claude Code would be stuck until `/clear`).
fn document_text(source: &DocumentSource, title: &Option<String>) -> String {
    let named = title.as_deref().map(|t| format!(" \"{t}\"")).unwrap_or_default();
    let body = match source {
        DocumentSource::Text { data } => data.clone(),
        DocumentSource::Content(blocks) => blocks
            .iter()
            .filter_map(|b| match b {
                Block::Text { text } => Some(text.clone()),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join("\n\n"),
        DocumentSource::Base64Pdf => {
            return format!(
                "[a PDF document{named} was attached here; this server cannot pass PDFs to the model, so its content was left out]"
            );
        }
        DocumentSource::Url | DocumentSource::File => {
            return format!(
                "[a document{named} was attached here by URL or file id; this server fetches nothing, so its content was left out]"
            );
        }
    };
    match title {
        Some(t) => format!("<document title=\"{}\">\n{body}\n</document>", t.replace('"', "&quot;")),
        None => format!("<document>\n{body}\n</document>"),
    }
}

fn search_result_text(source: &str, title: &str, content: &[String]) -> String {
    format!(
        "<search_result source=\"{}\" title=\"{}\">\n{}\n</search_result>",
        source.replace('"', "&quot;"),
        title.replace('"', "&quot;"),
        content.join("\n")
    )
}

/// What a tool result says in place of an image it held that goes with the message.
const IMAGE_ATTACHED: &str = "[image attached to this message]";
/// … of one dropped past Amazon Q's limit.
const IMAGE_OMITTED: &str = "[image omitted: Amazon Q accepts at most 10 images per message]";

/// An image into `turn`; `from`: the tool result part that names it. Amazon Q takes ten: the
/// newest are kept, and the oldest become a note; a tool result that named a dropped one says
/// so (it said "attached", and the model paired the images left with the wrong results).
fn push_image(turn: &mut UserTurn, img: Image, from: Option<(usize, usize)>) {
    turn.images.push(img);
    turn.image_from.push(from);
    if turn.images.len() > MAX_IMAGES_PER_MESSAGE {
        turn.images.remove(0);
        if let Some((r, part)) = turn.image_from.remove(0) {
            if let Some(p) = turn.results.get_mut(r).and_then(|r| r.content.get_mut(part)) {
                *p = ToolResultContent::Text(IMAGE_OMITTED.into());
            }
        }
        turn.omitted_images += 1;
    }
}

/// The note on images dropped from `turn`, once, among its texts (the current message's before
/// the instructions and the reply's prefill, which must stay last).
fn note_omitted_images(turn: &mut UserTurn) {
    if turn.omitted_images > 0 {
        turn.texts.push(format!(
            "[{} older image(s) omitted: Amazon Q accepts at most {MAX_IMAGES_PER_MESSAGE} images per message]",
            turn.omitted_images
        ));
        turn.omitted_images = 0;
    }
}

/// The blocks of a user message into `turn`.
fn user_blocks(blocks: &[Block], turn: &mut UserTurn, text_only: bool) -> Result<(), ApiError> {
    for b in blocks {
        match b {
            Block::Text { text } => turn.texts.push(text.clone()),
            Block::Image { source } => match image(source, text_only) {
                Ok(img) => push_image(turn, img, None),
                Err(note) => turn.texts.push(note),
            },
            Block::Document { source, title } => turn.texts.push(document_text(source, title)),
            Block::SearchResult { source, title, content } => {
                turn.texts.push(search_result_text(source, title, content))
            }
            Block::ToolResult { tool_use_id, content, is_error } => {
                let mut parts: Vec<ToolResultContent> = Vec::new();
                // Its images, with the part that names each: pushed once the result has its place.
                let mut images: Vec<(Image, usize)> = Vec::new();
                for c in content {
                    match c {
                        Block::Text { text } => parts.push(ToolResultContent::Text(text.clone())),
                        Block::Image { source } => match image(source, text_only) {
                            Ok(img) => {
                                images.push((img, parts.len()));
                                parts.push(ToolResultContent::Text(IMAGE_ATTACHED.into()));
                            }
                            Err(note) => parts.push(ToolResultContent::Text(note)),
                        },
                        Block::Document { source, title } => {
                            parts.push(ToolResultContent::Text(document_text(source, title)))
                        }
                        Block::SearchResult { source, title, content } => {
                            parts.push(ToolResultContent::Text(search_result_text(source, title, content)))
                        }
                        _ => {}
                    }
                }
                if parts.is_empty()
                    || parts.iter().all(|p| matches!(p, ToolResultContent::Text(t) if t.is_empty()))
                {
                    parts = vec![ToolResultContent::Text(
                        if *is_error {
                            "(the tool failed without output)"
                        } else {
                            "(the tool returned no output)"
                        }
                        .into(),
                    )];
                }
                let id = q_tool_use_id(tool_use_id);
                let status = if *is_error { ToolResultStatus::Error } else { ToolResultStatus::Success };
                let added: usize = parts
                    .iter()
                    .map(|p| match p {
                        ToolResultContent::Text(t) => t.chars().count(),
                        ToolResultContent::Json(v) => v.to_string().chars().count(),
                    })
                    .sum();
                let (at, offset, size) = match turn.result_at.get_mut(&id) {
                    Some((at, size)) => {
                        // Two ids that are one in Amazon Q's form: merged into one result.
                        let existing = &mut turn.results[*at];
                        let offset = existing.content.len();
                        existing.content.extend(parts);
                        if status == ToolResultStatus::Error {
                            existing.status = ToolResultStatus::Error;
                        }
                        *size += added;
                        (*at, offset, *size)
                    }
                    None => {
                        let at = turn.results.len();
                        turn.result_at.insert(id.clone(), (at, added));
                        turn.results.push(ToolResult { tool_use_id: id, content: parts, status });
                        (at, 0, added)
                    }
                };
                for (img, part) in images {
                    push_image(turn, img, Some((at, offset + part)));
                }
                // Amazon Q's limit holds for the merged result.
                if size > MAX_TOOL_RESULT_CHARS {
                    return Err(too_long("a tool result", size, MAX_TOOL_RESULT_CHARS));
                }
            }
            Block::Thinking { thinking, .. } => turn.texts.push(format!("<thinking>{thinking}</thinking>")),
            Block::RedactedThinking { .. } | Block::ToolUse { .. } => {}
            Block::ServerTool { kind, json } => turn.texts.push(format!("[{kind}] {json}")),
        }
    }
    Ok(())
}

/// How an assistant message's thinking goes back upstream.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Replay {
    /// As `reasoningContent` (the model reasons natively).
    Native,
    /// As `<thinking>` text (prompt-tag thinking, in the current tool loop).
    Text,
    /// Left out (prompt-tag thinking before the current tool loop).
    None,
}

/// An assistant message's blocks into `turn`. With [`Replay::Native`], the first thinking or
/// redacted_thinking block that can be replayed ([`super::reasoning::replayable`]) becomes the
/// turn's `reasoningContent` — Amazon Q takes one per message, and the signature covers exactly
/// one block's text, so several are never joined — and the other thinking blocks are left out;
/// with [`Replay::Text`] thinking goes back as `<thinking>` text, with [`Replay::None`] it is
/// left out; redacted thinking is left out but natively.
fn assistant_blocks(blocks: &[Block], turn: &mut AssistantTurn, names: &mut ToolNames, thinking: Replay) {
    for b in blocks {
        match b {
            Block::Text { text } => {
                if !text.is_empty() {
                    turn.texts.push(text.clone())
                }
            }
            Block::Thinking { .. } | Block::RedactedThinking { .. } if thinking == Replay::Native => {
                if turn.reasoning.is_none() {
                    turn.reasoning = super::reasoning::replayable(b);
                }
            }
            Block::Thinking { thinking: text, .. } => {
                if thinking == Replay::Text && !text.is_empty() {
                    turn.texts.push(format!("<thinking>{text}</thinking>"))
                }
            }
            Block::ToolUse { id, name, input } => turn.uses.push(ToolUse {
                tool_use_id: q_tool_use_id(id),
                name: names.upstream(name),
                input: Value::Object(input.clone()),
            }),
            Block::ServerTool { kind, json } => turn.texts.push(format!("[{kind}] {json}")),
            Block::RedactedThinking { .. } => {}
            Block::Image { .. }
            | Block::Document { .. }
            | Block::SearchResult { .. }
            | Block::ToolResult { .. } => {}
        }
    }
}

/// The text of a user message that has none and no tool results (Amazon Q refuses it empty).
const BLANK_MESSAGE: &str = "(empty message)";
/// The same for a message of images only.
const IMAGES_ONLY_MESSAGE: &str = "(see the attached image)";

fn user_message(mut turn: UserTurn, q_model: &str, tools: Vec<Tool>) -> Result<UserInputMessage, ApiError> {
    note_omitted_images(&mut turn);
    let texts = turn.texts;
    let mut content = texts.join("\n\n");
    // Amazon Q refuses a user message with no text unless it carries tool results
    // ("Improperly formed request"): an image-only follow-up, a blank text block.
    if content.trim().is_empty() && turn.results.is_empty() {
        content = if turn.images.is_empty() { BLANK_MESSAGE } else { IMAGES_ONLY_MESSAGE }.into();
    }
    let n = content.chars().count();
    if n > MAX_USER_MESSAGE_CHARS {
        return Err(too_long("a user message", n, MAX_USER_MESSAGE_CHARS));
    }
    let ctx = UserInputMessageContext { env_state: None, tools, tool_results: turn.results };
    Ok(UserInputMessage {
        content,
        model_id: Some(q_model.to_string()),
        origin: Some(ORIGIN.into()),
        images: turn.images,
        user_input_message_context: if ctx.is_empty() { None } else { Some(ctx) },
        cache_point: None,
    })
}

/// Where a Claude message went in the translation.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Placed {
    /// Nowhere (an empty system message).
    Nowhere,
    /// The system prompt (carried by the first message).
    Preamble,
    /// The merged turn at this index (of the turns before the current one was taken out).
    Turn(usize),
}

/// The client's `cache_control` breakpoints as Amazon Q `cachePoint`s, for a model with prompt
/// caching, at most `max` of them (the latest kept: the longest cached prefixes). `from_end`:
/// each breakpoint's message counted from the end of the translated conversation (0 the current
/// message), as merging turns, folding system messages and a prefill placed them.
fn place_cache_points(
    mut from_end: Vec<usize>,
    history: &mut [HistoryMessage],
    current: &mut UserInputMessage,
    max: usize,
) {
    let total = history.len() + 1;
    from_end.sort_unstable();
    from_end.dedup();
    for d in from_end.into_iter().take(max) {
        if d == 0 {
            current.cache_point = Some(crate::upstream::types::CachePoint::DEFAULT);
        } else {
            match &mut history[total - 1 - d] {
                HistoryMessage::UserInputMessage(m) => {
                    m.cache_point = Some(crate::upstream::types::CachePoint::DEFAULT)
                }
                HistoryMessage::AssistantResponseMessage(m) => {
                    m.cache_point = Some(crate::upstream::types::CachePoint::DEFAULT)
                }
            }
        }
    }
}

/// Stable per client session when one can be identified, random otherwise.
/// The client session `metadata.user_id` names: Claude Code puts JSON with a `session_id`
/// there, or `…_session_<uuid>`; any other value is taken whole.
pub fn session_of(user_id: Option<&str>) -> Option<String> {
    let u = user_id.filter(|u| !u.is_empty())?;
    if let Ok(v) = serde_json::from_str::<Value>(u) {
        if let Some(s) = v.get("session_id").and_then(Value::as_str) {
            return Some(s.to_string());
        }
    }
    Some(u.rsplit_once("_session_").map(|(_, s)| s.to_string()).unwrap_or_else(|| u.to_string()))
}

/// A digest of the conversation's first user message (the same for every request of one
/// conversation): 32 hex digits.
pub fn first_user_digest(req: &MessagesRequest) -> String {
    let first = req.messages.iter().find(|m| m.role == crate::anthropic::Role::User);
    // The digest of the content's Debug text (as before), hashed as it is written: a long
    // first message is not copied into a string for every request of the conversation.
    let d = crate::hash::sha256_of_fmt(|w| match first {
        Some(m) => write!(w, "{:?}", m.content),
        None => Ok(()),
    });
    hex::encode(&d[..16])
}

fn conversation_id(user_id: Option<&str>, session: Option<&str>) -> String {
    let key = session.map(str::to_string).or_else(|| session_of(user_id));
    match key {
        Some(k) if !k.is_empty() => {
            let d = crate::hash::sha256(k.as_bytes());
            let h = hex::encode(&d[..16]);
            format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
        }
        _ => crate::ids::uuid_v4(),
    }
}

/// For tests and diagnostics: the request as the JSON Amazon Q receives (with `profileArn`).
pub fn to_json(t: &Translated, profile_arn: Option<&str>) -> Value {
    let mut req = t.request.clone();
    req.profile_arn = profile_arn.map(str::to_string);
    serde_json::to_value(&req).expect("request types always serialise")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::anthropic::request::{ApiVersion, Endpoint, parse_value};

    fn tr(v: Value) -> Value {
        let req = parse_value(&v, ApiVersion::default(), Endpoint::Messages).unwrap();
        let models = ModelMap::default();
        let t = translate(&req, &Context { models: &models, session_id: None, caps: None, catalog: None })
            .unwrap();
        let mut j = to_json(&t, None);
        j["conversationState"]["conversationId"] = json!("ID");
        j
    }

    /// A model's capabilities: `checkpoints` cache points, `text_only`, nothing else known.
    fn caps_with(checkpoints: u32, text_only: bool) -> crate::translate::ModelCaps {
        crate::translate::ModelCaps {
            max_input_tokens: None,
            max_output_tokens: None,
            request_fields_schema: None,
            max_cache_checkpoints: checkpoints,
            text_only,
        }
    }

    /// Where the cache points of a request land, for a model that takes four: `history.N` or
    /// `current`.
    fn cache_points(v: Value) -> Vec<String> {
        let req = parse_value(&v, ApiVersion::default(), Endpoint::Messages).unwrap();
        let models = ModelMap::default();
        let caps = caps_with(4, false);
        let t =
            translate(&req, &Context { models: &models, session_id: None, caps: Some(&caps), catalog: None })
                .unwrap();
        let j = to_json(&t, None);
        let state = &j["conversationState"];
        let point = json!({"type": "default"});
        state["history"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
            .filter(|(_, m)| m.as_object().unwrap().values().any(|v| v["cachePoint"] == point))
            .map(|(i, _)| format!("history.{i}"))
            .chain(
                (state["currentMessage"]["userInputMessage"]["cachePoint"] == point)
                    .then(|| "current".into()),
            )
            .collect()
    }

    /// A breakpoint lands on the message its Claude message became, whatever merging turns,
    /// folding system messages and taking off a prefill did to the positions.
    #[test]
    fn cache_points_follow_merged_turns_and_a_prefill() {
        let cc = json!({"type": "ephemeral"});
        let text = |t: &str, cached: bool| {
            let mut b = json!({"type": "text", "text": t});
            if cached {
                b["cache_control"] = cc.clone();
            }
            json!([b])
        };
        let body =
            |messages: Value| json!({"model": "claude-sonnet-4-5", "max_tokens": 64, "messages": messages});
        // A prefill after the current message.
        let points = cache_points(body(json!([
            {"role": "user", "content": text("zero", true)},
            {"role": "assistant", "content": "one"},
            {"role": "user", "content": text("two", true)},
            {"role": "assistant", "content": "Sure:"}
        ])));
        assert_eq!(points, ["history.0", "current"]);
        // Two user messages merged into the current one.
        let points = cache_points(body(json!([
            {"role": "user", "content": text("zero", true)},
            {"role": "assistant", "content": "one"},
            {"role": "user", "content": text("two", false)},
            {"role": "user", "content": text("three", true)}
        ])));
        assert_eq!(points, ["history.0", "current"]);
        // A system message folded into the user turn before it, and an assistant turn merged.
        let points = cache_points(body(json!([
            {"role": "user", "content": text("zero", false)},
            {"role": "system", "content": text("note", true)},
            {"role": "assistant", "content": "one"},
            {"role": "assistant", "content": text("one more", true)},
            {"role": "user", "content": text("two", false)}
        ])));
        assert_eq!(points, ["history.0", "history.1"]);
    }

    #[test]
    fn plain_request_with_system() {
        let j = tr(json!({"model": "claude-sonnet-4-5", "max_tokens": 100, "system": "Be brief.",
            "messages": [{"role": "user", "content": "Hi"}]}));
        assert_eq!(
            j,
            json!({"conversationState": {"conversationId": "ID", "chatTriggerType": "MANUAL",
                "currentMessage": {"userInputMessage": {"content": "<system>\nBe brief.\n</system>\n\nHi",
                    "modelId": "claude-sonnet-4.5", "origin": "AI_EDITOR"}}}})
        );
    }

    #[test]
    fn merges_turns_and_folds_late_system_messages() {
        let j = tr(
            json!({"model": "claude-sonnet-4-5", "max_tokens": 100, "system": [{"type": "text", "text": "S"}],
            "messages": [
                {"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                {"role": "assistant", "content": "c"},
                {"role": "user", "content": "d"},
                {"role": "system", "content": "late"}
            ]}),
        );
        let cs = &j["conversationState"];
        assert_eq!(cs["history"][0]["userInputMessage"]["content"], "<system>\nS\n</system>\n\na\n\nb");
        assert_eq!(cs["history"][1]["assistantResponseMessage"]["content"], "c");
        assert_eq!(cs["history"].as_array().unwrap().len(), 2);
        assert_eq!(
            cs["currentMessage"]["userInputMessage"]["content"],
            "d\n\n<system-reminder>\nlate\n</system-reminder>"
        );
    }

    #[test]
    fn tools_aliases_placeholders_and_results() {
        let long = "x".repeat(70);
        let j = tr(json!({"model": "claude-sonnet-4-5", "max_tokens": 100,
        "tools": [{"name": long, "description": "", "input_schema": {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object", "required": "bad"}}],
        "messages": [
            {"role": "user", "content": "go"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "gone_tool", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [], "is_error": true}]}
        ]}));
        let cur = &j["conversationState"]["currentMessage"]["userInputMessage"];
        let tools = cur["userInputMessageContext"]["tools"].as_array().unwrap();
        assert_eq!(tools.len(), 2);
        let alias = tools[0]["toolSpecification"]["name"].as_str().unwrap();
        assert!(valid_q_name(alias) && alias.starts_with("xxxx"));
        assert_eq!(tools[0]["toolSpecification"]["description"], format!("Tool {long}"));
        assert_eq!(
            tools[0]["toolSpecification"]["inputSchema"]["json"],
            json!({"type": "object", "properties": {}})
        );
        assert_eq!(tools[1]["toolSpecification"]["name"], "gone_tool");
        assert_eq!(
            cur["userInputMessageContext"]["toolResults"][0],
            json!({"toolUseId": "toolu_1", "content": [{"text": "(the tool failed without output)"}], "status": "error"})
        );
        assert_eq!(
            j["conversationState"]["history"][1]["assistantResponseMessage"]["content"],
            "(calling tools)"
        );
    }

    #[test]
    fn prefill_and_tool_choice() {
        let j = tr(json!({"model": "claude-sonnet-4-5", "max_tokens": 100,
            "tools": [{"name": "t", "input_schema": {"type": "object"}}], "tool_choice": {"type": "none"},
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "The answer is"}]}));
        let cur = &j["conversationState"]["currentMessage"]["userInputMessage"];
        let c = cur["content"].as_str().unwrap();
        assert!(c.starts_with("q\n\nDo not call any tool"), "{c}");
        assert!(c.ends_with("continue from it (do not repeat it):\nThe answer is"), "{c}");
        assert!(cur.get("userInputMessageContext").is_none());
        assert!(j["conversationState"].get("history").is_none());
    }

    #[test]
    fn what_the_service_cannot_take_becomes_a_note_and_sizes_are_checked() {
        let models = ModelMap::default();
        let ctx = Context { models: &models, session_id: None, caps: None, catalog: None };
        let p = |v: Value| parse_value(&v, ApiVersion::default(), Endpoint::Messages).unwrap();
        let content = |r: &MessagesRequest| {
            translate(r, &ctx).unwrap().request.conversation_state.current_message.user_input_message.content
        };
        // A PDF, a URL image, a URL document, in the message and in a tool result: notes the
        // model sees (a refusal would refuse every later request of the session too).
        let r = p(json!({"model": "claude-sonnet-4-5", "max_tokens": 1, "messages": [
            {"role": "user", "content": "Read it"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": [
                    {"type": "document", "title": "spec.pdf", "source": {"type": "base64", "media_type": "application/pdf", "data": "AA=="}}]},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}},
                {"type": "document", "source": {"type": "url", "url": "https://example.com/b.pdf"}},
                {"type": "text", "text": "Summarise"}]}]}));
        let t = translate(&r, &ctx).unwrap();
        let current = &t.request.conversation_state.current_message.user_input_message;
        assert!(
            current.content.contains("by URL or file id; this server passes only inline (base64) images"),
            "{}",
            current.content
        );
        assert!(
            current.content.contains("a document was attached here by URL or file id"),
            "{}",
            current.content
        );
        let results = serde_json::to_string(&current.user_input_message_context).unwrap();
        assert!(results.contains(r#"a PDF document \"spec.pdf\" was attached here"#), "{results}");
        // Text documents stay text.
        let r = p(
            json!({"model": "claude-sonnet-4-5", "max_tokens": 1, "messages": [{"role": "user", "content": [
            {"type": "document", "title": "notes", "source": {"type": "text", "media_type": "text/plain", "data": "hello"}}]}]}),
        );
        assert!(content(&r).contains("<document title=\"notes\">\nhello\n</document>"));
        let r = p(
            json!({"model": "claude-sonnet-4-5", "max_tokens": 1, "messages": [{"role": "user", "content": "x".repeat(600_001)}]}),
        );
        assert!(translate(&r, &ctx).unwrap_err().message.starts_with("prompt is too long"));
        let r = p(json!({"model": "nope", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]}));
        assert_eq!(translate(&r, &ctx).unwrap_err().kind, ErrorKind::NotFound);
    }

    /// Prompt-tag thinking goes back only for the current tool loop (Anthropic leaves earlier
    /// turns' thinking out of the context).
    #[test]
    fn text_thinking_is_replayed_for_the_current_tool_loop_only() {
        let models = ModelMap::default();
        let ctx = Context { models: &models, session_id: None, caps: None, catalog: None };
        let v = json!({"model": "claude-sonnet-4-5", "max_tokens": 4096,
            "thinking": {"type": "enabled", "budget_tokens": 2048},
            "tools": [{"name": "Read", "input_schema": {"type": "object"}}],
            "messages": [
                {"role": "user", "content": "First question"},
                {"role": "assistant", "content": [{"type": "thinking", "thinking": "OLD THOUGHT", "signature": ""},
                    {"type": "text", "text": "First answer"}]},
                {"role": "user", "content": "Second question"},
                {"role": "assistant", "content": [{"type": "thinking", "thinking": "LOOP THOUGHT", "signature": ""},
                    {"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "done"}]}]});
        let r = parse_value(&v, ApiVersion::default(), Endpoint::Messages).unwrap();
        let t = translate(&r, &ctx).unwrap();
        let history = serde_json::to_string(&t.request.conversation_state.history).unwrap();
        assert!(!history.contains("OLD THOUGHT"), "{history}");
        assert!(history.contains("First answer"), "{history}");
        assert!(history.contains("<thinking>LOOP THOUGHT</thinking>"), "{history}");
    }

    /// A model that takes text only gets notes where the images were (the service would refuse
    /// the request, and every later one of the session).
    #[test]
    fn images_for_a_text_only_model_become_notes() {
        let models = ModelMap::default();
        let caps = caps_with(0, true);
        let ctx = Context { models: &models, session_id: None, caps: Some(&caps), catalog: None };
        let png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==";
        let v = json!({"model": "claude-sonnet-4-5", "max_tokens": 1, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}},
            {"type": "text", "text": "What is this?"}]}]});
        let r = parse_value(&v, ApiVersion::default(), Endpoint::Messages).unwrap();
        let t = translate(&r, &ctx).unwrap();
        let current = &t.request.conversation_state.current_message.user_input_message;
        assert!(current.images.is_empty(), "{current:?}");
        assert!(current.content.contains("takes text only"), "{}", current.content);
        let all = Context { caps: None, ..ctx };
        let t = translate(&r, &all).unwrap();
        assert_eq!(t.request.conversation_state.current_message.user_input_message.images.len(), 1);
    }

    /// Structured outputs reach the model as an instruction with the schema.
    #[test]
    fn a_structured_output_schema_is_an_instruction() {
        let models = ModelMap::default();
        let ctx = Context { models: &models, session_id: None, caps: None, catalog: None };
        let v = json!({"model": "claude-sonnet-4-5", "max_tokens": 1,
            "output_config": {"format": {"type": "json_schema", "schema": {"type": "object", "required": ["city"]}}},
            "messages": [{"role": "user", "content": "Where is the Eiffel tower?"}]});
        let r = parse_value(&v, ApiVersion::default(), Endpoint::Messages).unwrap();
        let t = translate(&r, &ctx).unwrap();
        let content = &t.request.conversation_state.current_message.user_input_message.content;
        assert!(content.contains("Reply with one JSON value that matches this JSON Schema"), "{content}");
        assert!(content.contains(r#""required":["city"]"#), "{content}");
    }

    /// Server tools: left out, and the model told they are not there; refused when the
    /// request forces one (an answer made up without the tool).
    #[test]
    fn server_tools_are_left_out_and_refused_when_forced() {
        let models = ModelMap::default();
        let ctx = Context { models: &models, session_id: None, caps: None, catalog: None };
        let p = |tools: Value, choice: Value| {
            let mut v = json!({"model": "claude-sonnet-4-5", "max_tokens": 1, "tools": tools,
                "messages": [{"role": "user", "content": "Search the web for amq2api"}]});
            if !choice.is_null() {
                v["tool_choice"] = choice;
            }
            parse_value(&v, ApiVersion::default(), Endpoint::Messages).unwrap()
        };
        let search = json!({"type": "web_search_20250305", "name": "web_search", "max_uses": 8});
        let read = json!({"name": "Read", "description": "Read a file", "input_schema": {"type": "object"}});
        let t = translate(&p(json!([search.clone()]), Value::Null), &ctx).unwrap();
        let sent = serde_json::to_string(&t.request.conversation_state.current_message).unwrap();
        assert!(sent.contains("The tools `web_search` are not available in this conversation"), "{sent}");
        let e = translate(&p(json!([search.clone()]), json!({"type": "any"})), &ctx).unwrap_err();
        assert!(e.message.contains("server tool `web_search`"), "{}", e.message);
        let e = translate(
            &p(json!([search.clone(), read.clone()]), json!({"type": "tool", "name": "web_search"})),
            &ctx,
        )
        .unwrap_err();
        assert!(e.message.contains("not supported by this server"), "{}", e.message);
        let t = translate(&p(json!([search, read]), Value::Null), &ctx).unwrap();
        let tools = serde_json::to_string(
            &t.request.conversation_state.current_message.user_input_message.user_input_message_context,
        )
        .unwrap();
        assert!(tools.contains("\"Read\"") && !tools.contains("web_search"), "{tools}");
    }

    #[test]
    fn conversation_id_is_stable_per_session() {
        let a = conversation_id(Some("user_abc_account__session_1234"), None);
        assert_eq!(a, conversation_id(Some("user_x_account__session_1234"), None));
        assert_ne!(a, conversation_id(Some("user_abc_account__session_9999"), None));
        assert_ne!(conversation_id(None, None), conversation_id(None, None));
        assert_eq!(a.len(), 36);
    }
}
