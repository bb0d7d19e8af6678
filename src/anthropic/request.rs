//! The Messages API request, parsed at the edge into typed values. Every rule violation is a
//! 400 `invalid_request_error` whose message starts with the field path
//! (`messages.3.content.0.tool_use_id: …`), as Anthropic's API reports it.

use super::error::ApiError;
use serde_json::{Map, Value};
use std::collections::HashSet;
use std::fmt::Write as _;

/// The `anthropic-version` a client spoke.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ApiVersion {
    /// `2023-06-01` (SDK 1.x, Claude Code), `2023-01-01`, and no header at all (curl).
    #[default]
    V2023_06_01,
    /// `2026-10-21` (SDK 2.x): sampling parameters are refused.
    V2026_10_21,
}

/// The `anthropic-version` values Anthropic's API knows, and so this server.
pub const KNOWN_API_VERSIONS: [&str; 3] = ["2023-01-01", "2023-06-01", "2026-10-21"];

impl ApiVersion {
    /// The version a request's `anthropic-version` header names. No header is the oldest
    /// behaviour (a hand-written curl call works); any other value is refused with 400, as
    /// Anthropic's API does: `anthropic-version: "…" is not a valid version`.
    pub fn from_header(v: Option<&str>) -> Result<Self, ApiError> {
        match v {
            None | Some("2023-06-01") | Some("2023-01-01") => Ok(ApiVersion::V2023_06_01),
            Some("2026-10-21") => Ok(ApiVersion::V2026_10_21),
            Some(other) => Err(ApiError::invalid(format!(
                "anthropic-version: {other:?} is not a valid version (known: {})",
                KNOWN_API_VERSIONS.join(", ")
            ))),
        }
    }
}

/// Which endpoint the body was sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Messages,
    CountTokens,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    User,
    Assistant,
    System,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub role: Role,
    pub content: Vec<Block>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ImageSource {
    Base64 { media_type: String, data: String },
    Url { url: String },
    File { file_id: String },
}

#[derive(Debug, Clone, PartialEq)]
pub enum DocumentSource {
    Base64Pdf,
    Text { data: String },
    Content(Vec<Block>),
    Url,
    File,
}

/// A content block.
#[derive(Debug, Clone, PartialEq)]
pub enum Block {
    Text {
        text: String,
    },
    Image {
        source: ImageSource,
    },
    Document {
        source: DocumentSource,
        title: Option<String>,
    },
    ToolUse {
        id: String,
        name: String,
        input: Map<String, Value>,
    },
    ToolResult {
        tool_use_id: String,
        content: Vec<Block>,
        is_error: bool,
    },
    Thinking {
        thinking: String,
        signature: String,
    },
    RedactedThinking {
        data: String,
    },
    SearchResult {
        source: String,
        title: String,
        content: Vec<String>,
    },
    /// Server-side tool traffic (`server_tool_use`, `web_search_tool_result`, …) in the history:
    /// carried as context text.
    ServerTool {
        kind: String,
        json: Value,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum ToolDef {
    Custom {
        name: String,
        description: Option<String>,
        input_schema: Value,
    },
    /// A typed server tool (`web_search_20250305`, `bash_20250124`, …).
    Server {
        kind: String,
        name: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    Auto,
    Any,
    Tool(String),
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Thinking {
    Disabled,
    Enabled { budget_tokens: u32 },
    Adaptive,
}

/// A parsed `/v1/messages` or `/v1/messages/count_tokens` body.
#[derive(Debug, Clone, PartialEq)]
pub struct MessagesRequest {
    pub model: String,
    pub messages: Vec<Message>,
    /// Where the client put `cache_control` breakpoints: on the system prompt, and the indexes
    /// (in `messages`) of messages with one on any block.
    pub cache_system: bool,
    pub cache_messages: Vec<usize>,
    /// The `system` field as text blocks.
    pub system: Vec<String>,
    /// 0 for count_tokens.
    pub max_tokens: u32,
    pub stop_sequences: Vec<String>,
    pub stream: bool,
    pub tools: Vec<ToolDef>,
    pub tool_choice: ToolChoice,
    /// `tool_choice.disable_parallel_tool_use`: at most one tool call in the reply.
    pub single_tool_call: bool,
    pub thinking: Thinking,
    /// `thinking.display` (`summarized`, `omitted`) as sent, when thinking is not disabled.
    pub thinking_display: Option<String>,
    /// `output_config.effort` (`low`, `medium`, `high`, `xhigh`, `max`) as sent; which values a
    /// model takes is decided when translating for it.
    pub effort: Option<String>,
    /// Structured outputs (`output_config.format`, `output_format`): the JSON Schema the answer
    /// must match.
    pub output_schema: Option<Value>,
    pub metadata_user_id: Option<String>,
    /// The `anthropic-beta` features the request came with.
    pub betas: Betas,
}

impl MessagesRequest {
    /// The name the model is looked up by: with the 1M-context beta, the `[1m]` name (the 1M
    /// variant when there is one; the model itself otherwise).
    pub fn routed_model(&self) -> std::borrow::Cow<'_, str> {
        if self.betas.context_1m && !self.model.trim_end().to_ascii_lowercase().ends_with("[1m]") {
            std::borrow::Cow::Owned(format!("{}[1m]", self.model.trim_end()))
        } else {
            std::borrow::Cow::Borrowed(&self.model)
        }
    }
}

/// A JSON path for messages (`messages.3.content.0.text`), kept as borrowed links to the
/// enclosing paths: it is written out only for an error, so a valid request builds no string.
#[derive(Clone, Copy, Default)]
struct Path<'a> {
    parent: Option<&'a Path<'a>>,
    seg: Seg<'a>,
}

#[derive(Clone, Copy, Default)]
enum Seg<'a> {
    #[default]
    Root,
    Key(&'a str),
    Index(usize),
}

impl<'a> From<&'a str> for Seg<'a> {
    fn from(k: &'a str) -> Self {
        Seg::Key(k)
    }
}

impl<'a> From<&'a String> for Seg<'a> {
    fn from(k: &'a String) -> Self {
        Seg::Key(k)
    }
}

impl From<usize> for Seg<'_> {
    fn from(i: usize) -> Self {
        Seg::Index(i)
    }
}

impl<'a> Path<'a> {
    fn at<'b>(&'b self, seg: impl Into<Seg<'b>>) -> Path<'b>
    where
        'a: 'b,
    {
        Path { parent: Some(self), seg: seg.into() }
    }
    fn text(&self) -> String {
        let mut segs = Vec::new();
        let mut at = Some(self);
        while let Some(p) = at {
            segs.push(p.seg);
            at = p.parent;
        }
        let parts: Vec<String> = segs
            .iter()
            .rev()
            .filter_map(|seg| match seg {
                Seg::Root => None,
                Seg::Key(k) => Some(k.to_string()),
                Seg::Index(i) => Some(i.to_string()),
            })
            .collect();
        parts.join(".")
    }
    fn err(&self, msg: impl AsRef<str>) -> ApiError {
        let text = self.text();
        if text.is_empty() {
            ApiError::invalid(msg.as_ref().to_string())
        } else {
            ApiError::invalid(format!("{text}: {}", msg.as_ref()))
        }
    }
}

/// A JSON value's type as JSON Schema and Anthropic's messages name it.
pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn get<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

fn req<'a>(obj: &'a Map<String, Value>, key: &str, p: &Path) -> Result<&'a Value, ApiError> {
    get(obj, key).ok_or_else(|| p.at(key).err("Field required"))
}

fn as_str<'a>(v: &'a Value, p: &Path) -> Result<&'a str, ApiError> {
    v.as_str().ok_or_else(|| p.err(format!("Input should be a valid string, not {}", type_name(v))))
}

fn as_obj<'a>(v: &'a Value, p: &Path) -> Result<&'a Map<String, Value>, ApiError> {
    v.as_object().ok_or_else(|| p.err(format!("Input should be an object, not {}", type_name(v))))
}

fn as_arr<'a>(v: &'a Value, p: &Path) -> Result<&'a Vec<Value>, ApiError> {
    v.as_array().ok_or_else(|| p.err(format!("Input should be a valid list, not {}", type_name(v))))
}

fn as_bool(v: &Value, p: &Path) -> Result<bool, ApiError> {
    v.as_bool().ok_or_else(|| p.err(format!("Input should be a valid boolean, not {}", type_name(v))))
}

fn as_u32(v: &Value, p: &Path) -> Result<u32, ApiError> {
    match v.as_u64() {
        Some(n) if n <= u32::MAX as u64 => Ok(n as u32),
        _ if v.as_i64().is_some_and(|n| n < 0) => Err(p.err("Input should be greater than or equal to 0")),
        _ => Err(p.err(format!("Input should be a valid integer, not {}", describe(v)))),
    }
}

fn as_f64(v: &Value, p: &Path) -> Result<f64, ApiError> {
    v.as_f64().ok_or_else(|| p.err(format!("Input should be a valid number, not {}", type_name(v))))
}

fn describe(v: &Value) -> String {
    match v {
        Value::Number(n) => format!("the number {n}"),
        other => type_name(other).to_string(),
    }
}

fn opt_str(obj: &Map<String, Value>, key: &str, p: &Path) -> Result<Option<String>, ApiError> {
    get(obj, key).map(|v| as_str(v, &p.at(key)).map(str::to_string)).transpose()
}

/// The most base64 text one image may have: Anthropic's API measures its 5 MB limit on the
/// base64 data as sent (`image exceeds 5 MB maximum: N bytes > 5242880 bytes`).
pub const MAX_IMAGE_BASE64_BYTES: usize = 5 << 20;

/// The longest model name taken.
pub const MAX_MODEL_NAME: usize = 256;

/// Media types Amazon Q (and Anthropic) accept for images.
pub const IMAGE_MEDIA_TYPES: [&str; 4] = ["image/jpeg", "image/png", "image/gif", "image/webp"];

/// What the `anthropic-beta` header (comma-separated, possibly repeated) turns on that changes
/// how a request is read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Betas {
    /// `context-1m-…`: the model's 1M-token window (Claude Code sends the model's plain name
    /// with this header for a `[1m]` model).
    pub context_1m: bool,
    /// `interleaved-thinking-…`: thinking between tool calls, whose budget may reach
    /// `max_tokens` (it spans the turn).
    pub interleaved_thinking: bool,
}

impl Betas {
    /// From the header's values, joined.
    pub fn from_header<'a>(values: impl IntoIterator<Item = &'a str>) -> Betas {
        let mut b = Betas::default();
        for name in values.into_iter().flat_map(|v| v.split(',')).map(str::trim) {
            b.context_1m |= name.starts_with("context-1m-");
            b.interleaved_thinking |= name.starts_with("interleaved-thinking-");
        }
        b
    }
}

/// Parses a request body. `version` decides whether sampling parameters are allowed.
pub fn parse(body: &[u8], version: ApiVersion, endpoint: Endpoint) -> Result<MessagesRequest, ApiError> {
    parse_with(body, version, endpoint, Betas::default())
}

/// [`parse`] with the request's `anthropic-beta` features.
pub fn parse_with(
    body: &[u8],
    version: ApiVersion,
    endpoint: Endpoint,
    betas: Betas,
) -> Result<MessagesRequest, ApiError> {
    let text = std::str::from_utf8(body).map_err(|e| {
        ApiError::invalid(format!("The request body is not valid UTF-8 (at byte {})", e.valid_up_to()))
    })?;
    let value: Value = serde_json::from_str::<Strict>(text).map(|s| s.0).map_err(|e| {
        let mut m = String::from("The request body is not valid JSON: ");
        let _ = write!(m, "{e}");
        ApiError::invalid(m)
    })?;
    parse_value_with(&value, version, endpoint, betas)
}

/// A JSON value that refuses duplicate object keys (different parsers disagree on which one
/// wins, so an ambiguous body is an error rather than a guess).
struct Strict(Value);

impl<'de> serde::Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map(Value::Number).unwrap_or(Value::Null))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(serde::de::Error::custom(format!("duplicate key {key:?}")));
            }
            let Strict(v) = map.next_value()?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

/// Parses an already-decoded JSON body.
pub fn parse_value(
    value: &Value,
    version: ApiVersion,
    endpoint: Endpoint,
) -> Result<MessagesRequest, ApiError> {
    parse_value_with(value, version, endpoint, Betas::default())
}

/// [`parse_value`] with the request's `anthropic-beta` features.
pub fn parse_value_with(
    value: &Value,
    version: ApiVersion,
    endpoint: Endpoint,
    betas: Betas,
) -> Result<MessagesRequest, ApiError> {
    let root = Path::default();
    let obj = value.as_object().ok_or_else(|| {
        ApiError::invalid(format!("The request body must be a JSON object, not {}", type_name(value)))
    })?;

    let model = as_str(req(obj, "model", &root)?, &root.at("model"))?;
    if model.trim().is_empty() {
        return Err(root.at("model").err("String should have at least 1 character"));
    }
    // A model name is an identifier: no model is named with control characters or at such
    // length (and the name reaches the access log).
    if model.len() > MAX_MODEL_NAME || model.chars().any(char::is_control) {
        return Err(root.at("model").err(format!(
            "must be a model name (at most {MAX_MODEL_NAME} characters, no control characters)"
        )));
    }

    let max_tokens = match endpoint {
        Endpoint::Messages => {
            let m = as_u32(req(obj, "max_tokens", &root)?, &root.at("max_tokens"))?;
            if m == 0 {
                return Err(root.at("max_tokens").err("Input should be greater than or equal to 1"));
            }
            m
        }
        Endpoint::CountTokens => 0,
    };

    let stream = match (endpoint, get(obj, "stream")) {
        (Endpoint::Messages, Some(v)) => as_bool(v, &root.at("stream"))?,
        _ => false,
    };

    let mut stop_sequences = Vec::new();
    if let (Endpoint::Messages, Some(v)) = (endpoint, get(obj, "stop_sequences")) {
        let p = root.at("stop_sequences");
        for (i, s) in as_arr(v, &p)?.iter().enumerate() {
            let s = as_str(s, &p.at(i))?;
            if s.is_empty() {
                return Err(p.at(i).err("String should have at least 1 character"));
            }
            stop_sequences.push(s.to_string());
        }
    }

    for key in ["temperature", "top_p", "top_k"] {
        if let Some(v) = get(obj, key) {
            let p = root.at(key);
            if version == ApiVersion::V2026_10_21 {
                return Err(p.err(format!("`{key}` is not supported in anthropic-version 2026-10-21")));
            }
            let n = as_f64(v, &p)?;
            let ok = match key {
                "top_k" => v.as_u64().is_some(),
                _ => (0.0..=1.0).contains(&n),
            };
            if !ok {
                let msg = if key == "top_k" {
                    "Input should be a valid integer greater than or equal to 0"
                } else {
                    "Input should be between 0 and 1"
                };
                return Err(p.err(msg));
            }
        }
    }

    let cache_system = match get(obj, "system") {
        Some(Value::Array(blocks)) => {
            blocks.iter().any(|b| b.get("cache_control").is_some_and(|c| !c.is_null()))
        }
        _ => false,
    };
    let system = match get(obj, "system") {
        None => Vec::new(),
        Some(Value::String(s)) => {
            if s.is_empty() {
                Vec::new()
            } else {
                vec![s.clone()]
            }
        }
        Some(v) => {
            let p = root.at("system");
            let mut out = Vec::new();
            for (i, b) in as_arr(v, &p)?.iter().enumerate() {
                let bp = p.at(i);
                let bo = as_obj(b, &bp)?;
                let t = as_str(req(bo, "type", &bp)?, &bp.at("type"))?;
                if t != "text" {
                    return Err(bp.at("type").err(format!("Input should be 'text', not '{t}'")));
                }
                out.push(as_str(req(bo, "text", &bp)?, &bp.at("text"))?.to_string());
            }
            out
        }
    };

    let mut thinking_display = None;
    let thinking = match get(obj, "thinking") {
        None => Thinking::Disabled,
        Some(v) => {
            let p = root.at("thinking");
            let o = as_obj(v, &p)?;
            thinking_display = opt_str(o, "display", &p)?;
            match as_str(req(o, "type", &p)?, &p.at("type"))? {
                "disabled" => Thinking::Disabled,
                "adaptive" => Thinking::Adaptive,
                "enabled" => {
                    let b = as_u32(req(o, "budget_tokens", &p)?, &p.at("budget_tokens"))?;
                    if b < 1024 {
                        return Err(p
                            .at("budget_tokens")
                            .err("Input should be greater than or equal to 1024"));
                    }
                    if endpoint == Endpoint::Messages && b >= max_tokens && !betas.interleaved_thinking {
                        return Err(p.at("budget_tokens").err(format!(
                            "`max_tokens` must be greater than `thinking.budget_tokens` ({b} >= {max_tokens})"
                        )));
                    }
                    Thinking::Enabled { budget_tokens: b }
                }
                other => {
                    return Err(p.at("type").err(format!(
                        "Input tag '{other}' does not match any of the expected tags: 'enabled', 'disabled', 'adaptive'"
                    )));
                }
            }
        }
    };

    if thinking == Thinking::Disabled {
        thinking_display = None;
    }

    // `output_config`: the effort, and the format of structured outputs (also the beta's
    // top-level `output_format`): `{"type": "json_schema", "schema": {…}}`.
    let (effort, mut output_schema) = match get(obj, "output_config") {
        None => (None, None),
        Some(v) => {
            let p = root.at("output_config");
            let o = as_obj(v, &p)?;
            let format = match get(o, "format") {
                None | Some(Value::Null) => None,
                Some(f) => Some(json_schema_format(f, &p.at("format"))?),
            };
            (opt_str(o, "effort", &p)?, format)
        }
    };
    if let Some(f) = get(obj, "output_format").filter(|f| !f.is_null()) {
        output_schema = Some(json_schema_format(f, &root.at("output_format"))?);
    }

    let tools = match get(obj, "tools") {
        None => Vec::new(),
        Some(v) => parse_tools(v, &root.at("tools"))?,
    };

    let mut single_tool_call = false;
    let tool_choice = match get(obj, "tool_choice") {
        None => ToolChoice::Auto,
        Some(v) => {
            let p = root.at("tool_choice");
            let o = as_obj(v, &p)?;
            if let Some(d) = get(o, "disable_parallel_tool_use") {
                single_tool_call = as_bool(d, &p.at("disable_parallel_tool_use"))?;
            }
            let kind = as_str(req(o, "type", &p)?, &p.at("type"))?;
            // A tool call demanded with no tool to call: refused as Anthropic refuses it (the
            // model was told to call one of none, and a tool of an earlier turn, offered again
            // as a placeholder, could come back as a call the client never defined). `auto`
            // and `none` say nothing that tools would be needed for, and are taken.
            if tools.is_empty() && matches!(kind, "any" | "tool") {
                return Err(root.err("tool_choice may only be specified while providing tools."));
            }
            match kind {
                "auto" => ToolChoice::Auto,
                "any" => ToolChoice::Any,
                "none" => ToolChoice::None,
                "tool" => {
                    let name = as_str(req(o, "name", &p)?, &p.at("name"))?.to_string();
                    let known = tools.iter().any(|t| match t {
                        ToolDef::Custom { name: n, .. } | ToolDef::Server { name: n, .. } => n == &name,
                    });
                    if !known {
                        return Err(p.at("name").err(format!("Tool '{name}' not found in tools")));
                    }
                    ToolChoice::Tool(name)
                }
                other => {
                    return Err(p.at("type").err(format!(
                        "Input tag '{other}' does not match any of the expected tags: 'auto', 'any', 'tool', 'none'"
                    )));
                }
            }
        }
    };

    let metadata_user_id = match get(obj, "metadata") {
        None => None,
        Some(v) => {
            let p = root.at("metadata");
            opt_str(as_obj(v, &p)?, "user_id", &p)?
        }
    };

    let mp = root.at("messages");
    let raw_messages = as_arr(req(obj, "messages", &root)?, &mp)?;
    if raw_messages.is_empty() {
        return Err(mp.err("At least one message is required"));
    }
    let mut messages = Vec::with_capacity(raw_messages.len());
    // A tool_result must answer a tool_use of the assistant turn just before it (consecutive
    // same-role messages form one turn; system messages do not end a turn).
    let mut open_tool_uses: HashSet<String> = HashSet::new();
    // The open ones in order, with the message each came in, and those answered so far: each
    // must be answered in the user turn that follows (Anthropic refuses the request otherwise,
    // and Amazon Q refuses a history with a tool use left unanswered).
    let mut opened: Vec<(String, usize)> = Vec::new();
    let mut answered: HashSet<String> = HashSet::new();
    // Tool-use ids are unique in the whole conversation (Anthropic refuses a repeated one, and
    // Amazon Q refuses a history that repeats one).
    let mut tool_use_ids: HashSet<String> = HashSet::new();
    let mut last_role: Option<Role> = None;
    let mut cache_messages = Vec::new();
    for (i, m) in raw_messages.iter().enumerate() {
        let p = mp.at(i);
        let o = as_obj(m, &p)?;
        let role = match as_str(req(o, "role", &p)?, &p.at("role"))? {
            "user" => Role::User,
            "assistant" => Role::Assistant,
            "system" => Role::System,
            other => {
                return Err(p
                    .at("role")
                    .err(format!("Input should be 'user', 'assistant' or 'system', not '{other}'")));
            }
        };
        let content = parse_content(req(o, "content", &p)?, &p.at("content"), role)?;
        if role == Role::Assistant && last_role != Some(Role::Assistant) {
            unanswered(&opened, &answered, &mp)?;
            open_tool_uses.clear();
            opened.clear();
            answered.clear();
        }
        if role != Role::System {
            last_role = Some(role);
        }
        for (j, b) in content.iter().enumerate() {
            match b {
                Block::ToolUse { id, .. } => {
                    if !tool_use_ids.insert(id.clone()) {
                        return Err(p.at("content").at(j).at("id").err("`tool_use` ids must be unique"));
                    }
                    open_tool_uses.insert(id.clone());
                    opened.push((id.clone(), i));
                }
                Block::ToolResult { tool_use_id, .. } if !open_tool_uses.contains(tool_use_id) => {
                    return Err(p.at("content").at(j).at("tool_use_id").err(format!(
                        "unexpected `tool_use_id` found in `tool_result` blocks: {tool_use_id}. Each `tool_result` block must have a corresponding `tool_use` block in the previous message."
                    )));
                }
                Block::ToolResult { tool_use_id, .. } => {
                    answered.insert(tool_use_id.clone());
                }
                _ => {}
            }
        }
        let raw_content = o.get("content");
        let breakpoint = raw_content.and_then(Value::as_array).is_some_and(|blocks| {
            blocks.iter().any(|b| b.get("cache_control").is_some_and(|c| !c.is_null()))
        });
        if breakpoint {
            cache_messages.push(messages.len());
        }
        messages.push(Message { role, content });
    }
    // A conversation that ends with the tool uses (the assistant's turn, prefilled) has no
    // answer due yet.
    if last_role == Some(Role::User) {
        unanswered(&opened, &answered, &mp)?;
    }
    if !messages.iter().any(|m| m.role == Role::User) {
        return Err(mp.err("At least one message with role 'user' is required"));
    }

    Ok(MessagesRequest {
        model: model.to_string(),
        messages,
        cache_system,
        cache_messages,
        system,
        max_tokens,
        stop_sequences,
        stream,
        tools,
        tool_choice,
        single_tool_call,
        thinking,
        thinking_display,
        effort,
        output_schema,
        metadata_user_id,
        betas,
    })
}

/// A structured-output format, `{"type": "json_schema", "schema": {…}}`: the schema.
fn json_schema_format(v: &Value, p: &Path) -> Result<Value, ApiError> {
    let o = as_obj(v, p)?;
    match as_str(req(o, "type", p)?, &p.at("type"))? {
        "json_schema" => {
            let schema = req(o, "schema", p)?;
            as_obj(schema, &p.at("schema"))?;
            Ok(schema.clone())
        }
        other => Err(p
            .at("type")
            .err(format!("Input tag '{other}' does not match the expected tag: 'json_schema'"))),
    }
}

/// Tool name rule of the Messages API.
fn valid_tool_name(n: &str) -> bool {
    !n.is_empty() && n.len() <= 128 && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn parse_tools(v: &Value, p: &Path) -> Result<Vec<ToolDef>, ApiError> {
    let mut out = Vec::new();
    let mut names = HashSet::new();
    for (i, t) in as_arr(v, p)?.iter().enumerate() {
        let tp = p.at(i);
        let o = as_obj(t, &tp)?;
        let kind = opt_str(o, "type", &tp)?;
        // The MCP connector's toolset is named by its server.
        let name_key = if kind.as_deref() == Some("mcp_toolset") { "mcp_server_name" } else { "name" };
        let name = as_str(req(o, name_key, &tp)?, &tp.at(name_key))?.to_string();
        let def = match kind.as_deref() {
            None | Some("custom") => {
                if !valid_tool_name(&name) {
                    return Err(tp.at("name").err("String should match pattern '^[a-zA-Z0-9_-]{1,128}$'"));
                }
                let schema = req(o, "input_schema", &tp)?;
                let sp = tp.at("input_schema");
                let so = as_obj(schema, &sp)?;
                if let Some(t) = get(so, "type") {
                    if t.as_str() != Some("object") {
                        return Err(sp.at("type").err("Input should be 'object'"));
                    }
                }
                let description = opt_str(o, "description", &tp)?;
                ToolDef::Custom { name: name.clone(), description, input_schema: schema.clone() }
            }
            Some(k) => match client_tool(k) {
                // Anthropic-defined tools the client runs itself: an ordinary tool for the model.
                Some((description, input_schema)) => ToolDef::Custom {
                    name: name.clone(),
                    description: Some(description.into()),
                    input_schema,
                },
                None => ToolDef::Server { kind: k.to_string(), name: name.clone() },
            },
        };
        if !names.insert(name.clone()) {
            return Err(tp.at("name").err(format!("Tool names must be unique: '{name}' appears twice")));
        }
        out.push(def);
    }
    Ok(out)
}

/// Schemas of the Anthropic-defined tools that the client executes (bash, text editor, memory,
/// computer use): they reach the model as ordinary tools and come back as `tool_use` blocks.
fn client_tool(kind: &str) -> Option<(&'static str, Value)> {
    use serde_json::json;
    let string = json!({"type": "string"});
    if kind.starts_with("bash_") {
        Some((
            "Run a shell command in a persistent bash session.",
            json!({"type": "object", "properties": {"command": string, "restart": {"type": "boolean"}}}),
        ))
    } else if kind.starts_with("text_editor_") {
        Some((
            "View, create and edit text files: commands view, create, str_replace, insert, undo_edit.",
            json!({"type": "object", "properties": {
                "command": {"type": "string", "enum": ["view", "create", "str_replace", "insert", "undo_edit"]},
                "path": string, "file_text": string, "old_str": string, "new_str": string,
                "insert_line": {"type": "integer"}, "insert_text": string,
                "view_range": {"type": "array", "items": {"type": "integer"}}},
                "required": ["command", "path"]}),
        ))
    } else if kind.starts_with("memory_") {
        Some((
            "Read and write files in a /memories directory: commands view, create, str_replace, insert, delete, rename.",
            json!({"type": "object", "properties": {
                "command": string, "path": string, "file_text": string, "old_str": string, "new_str": string,
                "insert_line": {"type": "integer"}, "insert_text": string, "old_path": string, "new_path": string,
                "view_range": {"type": "array", "items": {"type": "integer"}}},
                "required": ["command"]}),
        ))
    } else if kind.starts_with("computer_") {
        Some((
            "Control the computer's screen, mouse and keyboard: take screenshots, move and click, type and press keys.",
            json!({"type": "object", "properties": {
                "action": string, "coordinate": {"type": "array", "items": {"type": "integer"}},
                "text": string, "duration": {"type": "number"}, "scroll_direction": string,
                "scroll_amount": {"type": "integer"}},
                "required": ["action"]}),
        ))
    } else {
        None
    }
}

/// Tool uses of the assistant turn before left without a result in the user turn after it:
/// Anthropic's refusal, naming the message that made them.
fn unanswered(
    opened: &[(String, usize)],
    answered: &HashSet<String>,
    messages: &Path,
) -> Result<(), ApiError> {
    let left: Vec<&(String, usize)> = opened.iter().filter(|(id, _)| !answered.contains(id)).collect();
    let Some((_, at)) = left.first() else { return Ok(()) };
    let ids: Vec<&str> = left.iter().map(|(id, _)| id.as_str()).collect();
    Err(messages.at(*at).err(format!(
        "`tool_use` ids were found without `tool_result` blocks immediately after: {}. Each `tool_use` block must have a corresponding `tool_result` block in the next message.",
        ids.join(", ")
    )))
}

fn parse_content(v: &Value, p: &Path, role: Role) -> Result<Vec<Block>, ApiError> {
    match v {
        Value::String(s) => Ok(vec![Block::Text { text: s.clone() }]),
        Value::Array(items) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, b) in items.iter().enumerate() {
                out.push(parse_block(b, &p.at(i), role, false)?);
            }
            Ok(out)
        }
        other => Err(p.err(format!(
            "Input should be a valid string or a list of content blocks, not {}",
            type_name(other)
        ))),
    }
}

fn parse_block(v: &Value, p: &Path, role: Role, nested: bool) -> Result<Block, ApiError> {
    let o = as_obj(v, p)?;
    let kind = as_str(req(o, "type", p)?, &p.at("type"))?;
    let only_user = |what: &str| -> Result<(), ApiError> {
        if role == Role::Assistant {
            Err(p.at("type").err(format!("`{what}` blocks are only allowed in user messages")))
        } else {
            Ok(())
        }
    };
    if role == Role::System && kind != "text" {
        // A system message becomes instructions (text); anything else in it would be dropped
        // on the way upstream (a tool result lost: the service then refuses the history).
        return Err(p
            .at("type")
            .err(format!("`{kind}` blocks are not allowed in system messages (only `text`)")));
    }
    Ok(match kind {
        "text" => Block::Text { text: as_str(req(o, "text", p)?, &p.at("text"))?.to_string() },
        "image" => {
            let sp = p.at("source");
            let so = as_obj(req(o, "source", p)?, &sp)?;
            let source = match as_str(req(so, "type", &sp)?, &sp.at("type"))? {
                "base64" => {
                    let media_type = as_str(req(so, "media_type", &sp)?, &sp.at("media_type"))?;
                    if !IMAGE_MEDIA_TYPES.contains(&media_type) {
                        return Err(sp.at("media_type").err(format!(
                            "Input should be 'image/jpeg', 'image/png', 'image/gif' or 'image/webp', not '{media_type}'"
                        )));
                    }
                    let data = as_str(req(so, "data", &sp)?, &sp.at("data"))?;
                    use base64::Engine;
                    if data.trim().is_empty() {
                        return Err(sp.at("data").err("The image data is empty"));
                    }
                    if data.len() > MAX_IMAGE_BASE64_BYTES {
                        return Err(sp.at("data").err(format!(
                            "image exceeds 5 MB maximum: {} bytes > {MAX_IMAGE_BASE64_BYTES} bytes",
                            data.len()
                        )));
                    }
                    if base64::engine::general_purpose::STANDARD.decode(data.trim()).is_err() {
                        return Err(sp.at("data").err("The image data is not valid base64"));
                    }
                    ImageSource::Base64 { media_type: media_type.to_string(), data: data.trim().to_string() }
                }
                "url" => ImageSource::Url { url: as_str(req(so, "url", &sp)?, &sp.at("url"))?.to_string() },
                "file" => ImageSource::File {
                    file_id: as_str(req(so, "file_id", &sp)?, &sp.at("file_id"))?.to_string(),
                },
                other => {
                    return Err(sp.at("type").err(format!(
                        "Input tag '{other}' does not match any of the expected tags: 'base64', 'url', 'file'"
                    )));
                }
            };
            Block::Image { source }
        }
        "document" => {
            only_user("document")?;
            let sp = p.at("source");
            let so = as_obj(req(o, "source", p)?, &sp)?;
            let source = match as_str(req(so, "type", &sp)?, &sp.at("type"))? {
                "base64" => {
                    let mt = as_str(req(so, "media_type", &sp)?, &sp.at("media_type"))?;
                    if mt != "application/pdf" {
                        return Err(sp
                            .at("media_type")
                            .err(format!("Input should be 'application/pdf', not '{mt}'")));
                    }
                    DocumentSource::Base64Pdf
                }
                "text" => {
                    DocumentSource::Text { data: as_str(req(so, "data", &sp)?, &sp.at("data"))?.to_string() }
                }
                "content" => {
                    let cp = sp.at("content");
                    DocumentSource::Content(match req(so, "content", &sp)? {
                        Value::String(s) => vec![Block::Text { text: s.clone() }],
                        v => {
                            let mut blocks = Vec::new();
                            for (i, b) in as_arr(v, &cp)?.iter().enumerate() {
                                blocks.push(parse_block(b, &cp.at(i), role, true)?);
                            }
                            blocks
                        }
                    })
                }
                "url" => DocumentSource::Url,
                "file" => DocumentSource::File,
                other => {
                    return Err(sp.at("type").err(format!(
                        "Input tag '{other}' does not match any of the expected tags: 'base64', 'text', 'content', 'url', 'file'"
                    )));
                }
            };
            Block::Document { source, title: opt_str(o, "title", p)? }
        }
        "tool_use" if !nested => {
            if role != Role::Assistant {
                return Err(p.at("type").err("`tool_use` blocks are only allowed in assistant messages"));
            }
            let id = as_str(req(o, "id", p)?, &p.at("id"))?.to_string();
            if id.is_empty() {
                return Err(p.at("id").err("String should have at least 1 character"));
            }
            let name = as_str(req(o, "name", p)?, &p.at("name"))?.to_string();
            let input = match get(o, "input") {
                None => Map::new(),
                Some(v) => as_obj(v, &p.at("input"))?.clone(),
            };
            Block::ToolUse { id, name, input }
        }
        "tool_result" if !nested => {
            only_user("tool_result")?;
            let tool_use_id = as_str(req(o, "tool_use_id", p)?, &p.at("tool_use_id"))?.to_string();
            let is_error = match get(o, "is_error") {
                None => false,
                Some(v) => as_bool(v, &p.at("is_error"))?,
            };
            let cp = p.at("content");
            let content = match get(o, "content") {
                None => Vec::new(),
                Some(Value::String(s)) => vec![Block::Text { text: s.clone() }],
                Some(v) => {
                    let mut blocks = Vec::new();
                    for (i, b) in as_arr(v, &cp)?.iter().enumerate() {
                        let bp = cp.at(i);
                        let block = parse_block(b, &bp, role, true)?;
                        match block {
                            Block::Text { .. }
                            | Block::Image { .. }
                            | Block::Document { .. }
                            | Block::SearchResult { .. } => blocks.push(block),
                            _ => {
                                return Err(bp.at("type").err(
                                    "tool_result content may only hold text, image, document and search_result blocks",
                                ));
                            }
                        }
                    }
                    blocks
                }
            };
            Block::ToolResult { tool_use_id, content, is_error }
        }
        "thinking" if !nested => Block::Thinking {
            thinking: as_str(req(o, "thinking", p)?, &p.at("thinking"))?.to_string(),
            signature: opt_str(o, "signature", p)?.unwrap_or_default(),
        },
        "redacted_thinking" if !nested => {
            Block::RedactedThinking { data: as_str(req(o, "data", p)?, &p.at("data"))?.to_string() }
        }
        "search_result" => {
            let cp = p.at("content");
            let mut content = Vec::new();
            for (i, b) in as_arr(req(o, "content", p)?, &cp)?.iter().enumerate() {
                let bp = cp.at(i);
                let bo = as_obj(b, &bp)?;
                content.push(as_str(req(bo, "text", &bp)?, &bp.at("text"))?.to_string());
            }
            Block::SearchResult {
                source: as_str(req(o, "source", p)?, &p.at("source"))?.to_string(),
                title: as_str(req(o, "title", p)?, &p.at("title"))?.to_string(),
                content,
            }
        }
        // Tool search (Claude Code's `ENABLE_TOOL_SEARCH`): a tool_result names the deferred
        // tools it loaded. Every tool is offered upstream anyway (`defer_loading` has no
        // equivalent there), so the reference is context for the model.
        "tool_reference" => {
            let name = as_str(req(o, "tool_name", p)?, &p.at("tool_name"))?;
            Block::Text { text: format!("[tool {name} loaded: it can be called now]") }
        }
        k if !nested
            && (k == "server_tool_use"
                || k == "mcp_tool_use"
                || k == "mcp_tool_result"
                || k == "container_upload"
                || k.ends_with("_tool_result")) =>
        {
            Block::ServerTool { kind: k.to_string(), json: v.clone() }
        }
        other => {
            return Err(p
                .at("type")
                .err(format!("Input tag '{other}' does not match any of the expected content block tags")));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse_json(v: Value) -> Result<MessagesRequest, ApiError> {
        parse_value(&v, ApiVersion::V2023_06_01, Endpoint::Messages)
    }

    fn err(v: Value) -> String {
        parse_json(v).unwrap_err().message
    }

    #[test]
    fn minimal_and_full() {
        let r = parse_json(json!({"model": "claude-sonnet-4-5", "max_tokens": 10,
            "messages": [{"role": "user", "content": "hi"}]}))
        .unwrap();
        assert_eq!(r.messages[0].content, vec![Block::Text { text: "hi".into() }]);
        assert!(!r.stream);
        let r = parse_json(json!({
            "model": "m", "max_tokens": 4096, "stream": true, "system": [{"type": "text", "text": "S", "cache_control": {"type": "ephemeral"}}],
            "tools": [{"name": "get_weather", "description": "d", "input_schema": {"type": "object", "properties": {}}},
                      {"type": "web_search_20250305", "name": "web_search"}],
            "tool_choice": {"type": "tool", "name": "get_weather"},
            "thinking": {"type": "enabled", "budget_tokens": 2048},
            "metadata": {"user_id": "u"}, "output_config": {"effort": "high"}, "unknown_field": 1,
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "q", "cache_control": {"type": "ephemeral"}}]},
                {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": "sig"},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny", "is_error": false}]},
                {"role": "system", "content": "late system"}
            ]}))
        .unwrap();
        assert!(r.stream);
        assert_eq!(r.system, vec!["S".to_string()]);
        assert_eq!(r.tools.len(), 2);
        assert_eq!(r.tool_choice, ToolChoice::Tool("get_weather".into()));
        assert_eq!(r.thinking, Thinking::Enabled { budget_tokens: 2048 });
        assert_eq!(r.effort.as_deref(), Some("high"));
        assert_eq!(r.thinking_display, None);
        assert_eq!(r.messages[3].role, Role::System);
        assert_eq!(r.metadata_user_id.as_deref(), Some("u"));
    }

    #[test]
    fn a_tool_call_demanded_without_tools_is_refused() {
        let with = |extra: Value| {
            let mut v =
                json!({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]});
            v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            v
        };
        let refused = "tool_choice may only be specified while providing tools.";
        for tools in [json!(null), json!([])] {
            for choice in [json!({"type": "any"}), json!({"type": "tool", "name": "f"})] {
                let mut v = json!({"tool_choice": choice});
                if !tools.is_null() {
                    v["tools"] = tools.clone();
                }
                assert_eq!(err(with(v)), refused);
            }
            for (choice, expected) in [("auto", ToolChoice::Auto), ("none", ToolChoice::None)] {
                let mut v = json!({"tool_choice": {"type": choice}});
                if !tools.is_null() {
                    v["tools"] = tools.clone();
                }
                assert_eq!(parse_json(with(v)).unwrap().tool_choice, expected);
            }
        }
        let tools = json!([{"name": "f", "input_schema": {"type": "object"}}]);
        let r = parse_json(with(json!({"tools": tools, "tool_choice": {"type": "any"}}))).unwrap();
        assert_eq!(r.tool_choice, ToolChoice::Any);
        assert_eq!(
            err(with(json!({"tools": tools, "tool_choice": {"type": "tool", "name": "g"}}))),
            "tool_choice.name: Tool 'g' not found in tools"
        );
    }

    #[test]
    fn system_messages_hold_text_only() {
        let base = |messages: Value| json!({"model": "m", "max_tokens": 10, "messages": messages});
        assert_eq!(
            err(base(json!([
                {"role": "user", "content": "x"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}]},
                {"role": "system", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "r"}]}
            ]))),
            "messages.2.content.0.type: `tool_result` blocks are not allowed in system messages (only `text`)"
        );
        let ok = parse_json(base(json!([
            {"role": "user", "content": "x"},
            {"role": "system", "content": [{"type": "text", "text": "be brief"}]}
        ])));
        assert!(ok.is_ok(), "{ok:?}");
    }

    #[test]
    fn field_paths_in_errors() {
        let base = |messages: Value| json!({"model": "m", "max_tokens": 10, "messages": messages});
        assert_eq!(err(json!({"max_tokens": 1, "messages": []})), "model: Field required");
        assert_eq!(
            err(json!({"model": "m", "messages": [{"role":"user","content":"x"}]})),
            "max_tokens: Field required"
        );
        assert_eq!(err(json!({"model": "m", "max_tokens": 1})), "messages: Field required");
        assert_eq!(err(base(json!([]))), "messages: At least one message is required");
        assert!(
            err(base(json!([{"role": "bot", "content": "x"}])))
                .starts_with("messages.0.role: Input should be")
        );
        assert_eq!(
            err(base(json!([{"role": "user", "content": [{"type": "text"}]}]))),
            "messages.0.content.0.text: Field required"
        );
        let e = err(base(json!([
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "nope", "content": "x"}]}
        ])));
        assert!(e.starts_with("messages.3.content.0.tool_use_id: unexpected `tool_use_id`"), "{e}");
        let e = err(
            json!({"model": "m", "max_tokens": 2000, "thinking": {"type": "enabled", "budget_tokens": 2000},
            "messages": [{"role": "user", "content": "x"}]}),
        );
        assert!(e.starts_with("thinking.budget_tokens: `max_tokens` must be greater"), "{e}");
        let e = err(base(json!([{"role": "user", "content": [{"type": "image",
            "source": {"type": "base64", "media_type": "image/bmp", "data": "AAAA"}}]}])));
        assert!(e.starts_with("messages.0.content.0.source.media_type:"), "{e}");
        assert!(
            err(json!({"model": 5, "max_tokens": 1, "messages": []}))
                .starts_with("model: Input should be a valid string")
        );
        assert!(
            err(json!({"model": "m", "max_tokens": "1", "messages": []}))
                .starts_with("max_tokens: Input should be a valid integer")
        );
        assert!(err(json!({"model": "m", "max_tokens": -1, "messages": []})).starts_with("max_tokens:"));
    }

    #[test]
    fn thinking_display_and_effort() {
        let with = |extra: Value| {
            let mut v =
                json!({"model": "m", "max_tokens": 4096, "messages": [{"role": "user", "content": "x"}]});
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            v
        };
        let r = parse_json(with(json!({"thinking": {"type": "adaptive", "display": "summarized"},
            "output_config": {"effort": "max", "format": {"type": "json_schema", "schema": {"type": "object"}}}})))
        .unwrap();
        assert_eq!((r.thinking, r.thinking_display.as_deref()), (Thinking::Adaptive, Some("summarized")));
        assert_eq!(r.effort.as_deref(), Some("max"));
        assert_eq!(r.output_schema, Some(json!({"type": "object"})));
        // The beta's top-level form; a format that is not a schema is refused.
        let r =
            parse_json(with(json!({"output_format": {"type": "json_schema", "schema": {"type": "array"}}})))
                .unwrap();
        assert_eq!(r.output_schema, Some(json!({"type": "array"})));
        assert!(
            err(with(json!({"output_format": {"type": "json_schema"}})))
                .starts_with("output_format.schema: Field required")
        );
        assert!(
            err(with(json!({"output_config": {"format": {"type": "regex"}}})))
                .starts_with("output_config.format.type: Input tag 'regex'")
        );
        // An MCP connector's toolset is named by its server (then left out, as server tools are).
        let r =
            parse_json(with(json!({"tools": [{"type": "mcp_toolset", "mcp_server_name": "docs"}]}))).unwrap();
        assert!(
            matches!(&r.tools[0], ToolDef::Server { kind, name } if kind == "mcp_toolset" && name == "docs")
        );
        // Disabled thinking has nothing to display; no output_config, no effort.
        let r = parse_json(with(json!({"thinking": {"type": "disabled", "display": "omitted"}}))).unwrap();
        assert_eq!((r.thinking, r.thinking_display, r.effort), (Thinking::Disabled, None, None));
        assert!(
            err(with(json!({"thinking": {"type": "adaptive", "display": 1}})))
                .starts_with("thinking.display: Input should be a valid string")
        );
        assert!(
            err(with(json!({"output_config": {"effort": ["high"]}})))
                .starts_with("output_config.effort: Input should be a valid string")
        );
        assert!(
            err(with(json!({"output_config": "high"})))
                .starts_with("output_config: Input should be an object")
        );
    }

    #[test]
    fn tool_results_answer_the_previous_assistant_turn() {
        let base = |messages: Value| json!({"model": "m", "max_tokens": 10, "messages": messages});
        let tu = json!({"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "t", "input": {}}]});
        let tr = json!({"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "ok"}]});
        let sys = json!({"role": "system", "content": "reminder"});
        assert!(parse_json(base(json!([{"role": "user", "content": "q"}, tu, sys, tr]))).is_ok());
        // Answered again after another assistant turn: refused, as Anthropic's API does.
        let e = err(base(
            json!([{"role": "user", "content": "q"}, tu, tr, {"role": "assistant", "content": "a"}, tr]),
        ));
        assert!(e.starts_with("messages.4.content.0.tool_use_id: unexpected"), "{e}");
    }

    #[test]
    fn client_run_tools_become_ordinary_tools() {
        let r = parse_json(json!({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "bash_20250124", "name": "bash"}, {"type": "text_editor_20250728", "name": "str_replace_based_edit_tool"},
                      {"type": "web_search_20250305", "name": "web_search"}]}))
        .unwrap();
        assert!(matches!(&r.tools[0], ToolDef::Custom { name, .. } if name == "bash"));
        assert!(matches!(&r.tools[1], ToolDef::Custom { .. }));
        assert!(matches!(&r.tools[2], ToolDef::Server { .. }));
    }

    #[test]
    fn sampling_parameters_depend_on_version() {
        let body = json!({"model": "m", "max_tokens": 10, "temperature": 0.5, "messages": [{"role": "user", "content": "x"}]});
        assert!(parse_value(&body, ApiVersion::V2023_06_01, Endpoint::Messages).is_ok());
        let e = parse_value(&body, ApiVersion::V2026_10_21, Endpoint::Messages).unwrap_err();
        assert!(e.message.starts_with("temperature:"), "{}", e.message);
        assert_eq!(ApiVersion::from_header(Some("2026-10-21")).unwrap(), ApiVersion::V2026_10_21);
        assert_eq!(ApiVersion::from_header(Some("2023-06-01")).unwrap(), ApiVersion::V2023_06_01);
        assert_eq!(ApiVersion::from_header(Some("2023-01-01")).unwrap(), ApiVersion::V2023_06_01);
        assert_eq!(ApiVersion::from_header(None).unwrap(), ApiVersion::V2023_06_01);
        for bad in ["9999-99-99", "2027-01-01", "", "2023-06-01, 2023-06-01", "latest"] {
            let e = ApiVersion::from_header(Some(bad)).unwrap_err();
            assert!(
                e.message.starts_with(&format!("anthropic-version: {bad:?} is not a valid version")),
                "{e:?}"
            );
        }
    }

    #[test]
    fn count_tokens_needs_no_max_tokens() {
        let body = json!({"model": "m", "messages": [{"role": "user", "content": "x"}]});
        assert!(parse_value(&body, ApiVersion::V2023_06_01, Endpoint::CountTokens).is_ok());
    }

    #[test]
    fn bad_bytes() {
        assert!(
            parse(b"\xff\xfe", ApiVersion::default(), Endpoint::Messages)
                .unwrap_err()
                .message
                .contains("UTF-8")
        );
        assert!(
            parse(b"{", ApiVersion::default(), Endpoint::Messages)
                .unwrap_err()
                .message
                .contains("not valid JSON")
        );
        let deep = "[".repeat(100_000);
        assert!(parse(deep.as_bytes(), ApiVersion::default(), Endpoint::Messages).is_err());
        assert!(
            parse(b"[]", ApiVersion::default(), Endpoint::Messages)
                .unwrap_err()
                .message
                .contains("JSON object")
        );
    }
}
