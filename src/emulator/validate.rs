//! The request rules Amazon Q enforces on a `GenerateAssistantResponse` body, checked on a raw
//! [`serde_json::Value`] so that they are independent of the project's own request types.
//!
//! [`validate_request`] walks the body in a fixed order and stops at the first violation, which
//! names the [`Rule`] and the JSON path (`conversationState.history[2].assistantResponseMessage.
//! toolUses[0].name`). Unknown fields are tolerated, as the service tolerates them.
//!
//! The 2026 members are checked for shape here (their meaning, which depends on the account and
//! its model, is checked when the call is answered): a top-level `additionalModelRequestFields`
//! must be an object; an assistant message's `reasoningContent` must be exactly one of
//! `{"reasoningText": {"text", "signature"}}` or `{"redactedContent": "<base64>"}` (a flat
//! `{"text", "signature"}` is [`Rule::ReasoningContentShape`], answered `REQUEST_BODY_INVALID`);
//! `cachePoint` (on a user or assistant message, or as a `tools[]` item of its own) must be
//! `{"type": "default"}`.

use std::collections::{HashMap, HashSet};
use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Map, Value};

/// Largest user message content, in characters (larger → `CONTENT_LENGTH_EXCEEDS_THRESHOLD`).
pub const MAX_USER_CONTENT_CHARS: usize = 600_000;
/// Largest tool result (its texts and serialised JSON items together), in characters.
pub const MAX_TOOL_RESULT_CHARS: usize = 800_000;
/// Most images in one user message.
pub const MAX_IMAGES: usize = 10;
/// Longest tool name or tool-use id.
pub const MAX_TOOL_NAME_LEN: usize = 64;
/// Longest tool description, in characters.
pub const MAX_TOOL_DESCRIPTION_CHARS: usize = 10_240;
/// Longest conversation id, in characters.
pub const MAX_CONVERSATION_ID_CHARS: usize = 128;

/// One rule of the service. [`Rule::text`] says it in words.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rule {
    BodyObject,
    ProfileArnFormat,
    ConversationStateRequired,
    ChatTriggerType,
    ConversationIdLength,
    CurrentMessageRequired,
    CurrentMessageIsUser,
    HistoryArray,
    MessageUnion,
    HistoryStartsWithUser,
    HistoryAlternates,
    HistoryEndsWithAssistant,
    UserContentString,
    UserContentTooLong,
    ModelIdFormat,
    FieldType,
    AssistantContentNonEmpty,
    ToolUseShape,
    ToolUseIdFormat,
    ToolUseIdUnique,
    ToolNameFormat,
    ToolUseNameDefined,
    ImagesCount,
    ImageShape,
    ImageFormat,
    ImageBase64,
    ContextShape,
    ToolSpecShape,
    ToolDescriptionLength,
    ToolSchemaShape,
    ToolNamesUnique,
    ToolResultShape,
    ToolResultContent,
    ToolResultStatus,
    ToolResultTooLong,
    ToolResultAnswersToolUse,
    ToolResultOnce,
    ToolUseAnswered,
    UserContentNonEmpty,
    AdditionalFieldsObject,
    ReasoningContentShape,
    CachePointShape,
}

impl Rule {
    /// The rule in words, as the rejection warning logs it.
    pub fn text(self) -> &'static str {
        match self {
            Rule::BodyObject => "the body is a JSON object",
            Rule::ProfileArnFormat => {
                "profileArn, if present, matches arn:aws:codewhisperer:<region>:<12 digits>:profile/<ID>"
            }
            Rule::ConversationStateRequired => "conversationState is a required object",
            Rule::ChatTriggerType => "conversationState.chatTriggerType is required and is \"MANUAL\"",
            Rule::ConversationIdLength => "conversationId, if present, is a string of 1..128 characters",
            Rule::CurrentMessageRequired => "conversationState.currentMessage is a required object",
            Rule::CurrentMessageIsUser => "currentMessage holds exactly one userInputMessage",
            Rule::HistoryArray => "conversationState.history, if present, is an array",
            Rule::MessageUnion => {
                "a history item holds exactly one of userInputMessage / assistantResponseMessage"
            }
            Rule::HistoryStartsWithUser => "history starts with a userInputMessage",
            Rule::HistoryAlternates => "history alternates strictly user / assistant",
            Rule::HistoryEndsWithAssistant => {
                "a non-empty history ends with an assistantResponseMessage (the current message is the user turn)"
            }
            Rule::UserContentString => "userInputMessage.content is a required string",
            Rule::UserContentTooLong => "userInputMessage.content is at most 600000 characters",
            Rule::ModelIdFormat => "modelId, if present, is a string matching [a-zA-Z0-9_:.-]+",
            Rule::FieldType => "a field has the wrong JSON type",
            Rule::AssistantContentNonEmpty => "assistantResponseMessage.content is a non-empty string",
            Rule::ToolUseShape => "toolUses is an array of {toolUseId: string, name: string, input: object}",
            Rule::ToolUseIdFormat => "tool-use ids match [a-zA-Z0-9_-]+, at most 64 characters",
            Rule::ToolUseIdUnique => "a toolUseId is used by one tool use only",
            Rule::ToolNameFormat => "tool names match [a-zA-Z0-9_-]+, at most 64 characters",
            Rule::ToolUseNameDefined => {
                "every tool name used in history toolUses is defined in the current message's tools"
            }
            Rule::ImagesCount => "images is an array of at most 10 images",
            Rule::ImageShape => "an image is {format, source: {bytes}}",
            Rule::ImageFormat => "image format is one of png, jpeg, gif, webp",
            Rule::ImageBase64 => "image source.bytes is non-empty valid base64",
            Rule::ContextShape => {
                "userInputMessageContext is an object whose tools and toolResults are arrays"
            }
            Rule::ToolSpecShape => {
                "tools[] entries are {toolSpecification: {name, description, inputSchema: {json: object}}}"
            }
            Rule::ToolDescriptionLength => "tool description is a string of 1..10240 characters",
            Rule::ToolSchemaShape => {
                "inputSchema.json is an object whose properties (if present) is an object and required (if present) an array of strings"
            }
            Rule::ToolNamesUnique => "tool names are unique within tools",
            Rule::ToolResultShape => "toolResults[] entries are {toolUseId: string, content: array, status}",
            Rule::ToolResultContent => "tool result content items are {text: string} or {json: any}",
            Rule::ToolResultStatus => "tool result status is \"success\" or \"error\"",
            Rule::ToolResultTooLong => "a tool result is at most 800000 characters",
            Rule::ToolResultAnswersToolUse => {
                "every tool result answers a toolUse in an earlier assistant message"
            }
            Rule::ToolResultOnce => "each toolUseId is answered by at most one tool result",
            Rule::ToolUseAnswered => {
                "every toolUse of an assistant message is answered by a tool result in the user message after it"
            }
            Rule::UserContentNonEmpty => "a user message without tool results has non-blank content",
            Rule::AdditionalFieldsObject => "additionalModelRequestFields, if present, is a JSON object",
            Rule::ReasoningContentShape => {
                "reasoningContent is exactly one of {reasoningText: {text: string, signature: string}} or {redactedContent: non-empty base64}"
            }
            Rule::CachePointShape => "a cachePoint is {\"type\": \"default\"}",
        }
    }

    /// The `message` the service answers a violation of this rule with.
    pub fn message(self) -> &'static str {
        match self {
            Rule::UserContentTooLong | Rule::ToolResultTooLong => "Input is too long.",
            Rule::AdditionalFieldsObject => "Invalid additionalModelRequestFields",
            _ => "Improperly formed request.",
        }
    }

    /// The `reason` the service answers a violation of this rule with (`None`: `"reason": null`).
    pub fn reason(self) -> Option<&'static str> {
        match self {
            Rule::UserContentTooLong | Rule::ToolResultTooLong => Some("CONTENT_LENGTH_EXCEEDS_THRESHOLD"),
            Rule::ReasoningContentShape => Some("REQUEST_BODY_INVALID"),
            _ => None,
        }
    }

    /// Whether the service reports this rule as `CONTENT_LENGTH_EXCEEDS_THRESHOLD` "Input is too
    /// long." rather than "Improperly formed request.".
    pub fn is_content_length(self) -> bool {
        matches!(self, Rule::UserContentTooLong | Rule::ToolResultTooLong)
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.text())
    }
}

/// The first rule a request breaks, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleViolation {
    pub rule: Rule,
    /// Dotted JSON path of the offending value (`$` for the body itself).
    pub path: String,
}

impl RuleViolation {
    fn new(rule: Rule, path: impl Into<String>) -> Self {
        RuleViolation { rule, path: path.into() }
    }
}

impl fmt::Display for RuleViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (at {})", self.rule.text(), self.path)
    }
}

impl std::error::Error for RuleViolation {}

type Check = Result<(), RuleViolation>;

fn fail<T>(rule: Rule, path: impl Into<String>) -> Result<T, RuleViolation> {
    Err(RuleViolation::new(rule, path))
}

/// Checks `body` against every rule of the service; the first violation is returned.
pub fn validate_request(body: &Value) -> Check {
    let Some(body) = body.as_object() else {
        return fail(Rule::BodyObject, "$");
    };
    if let Some(arn) = body.get("profileArn")
        && !arn.as_str().is_some_and(is_profile_arn)
    {
        return fail(Rule::ProfileArnFormat, "profileArn");
    }
    match body.get("additionalModelRequestFields") {
        None | Some(Value::Null | Value::Object(_)) => {}
        Some(_) => return fail(Rule::AdditionalFieldsObject, "additionalModelRequestFields"),
    }
    let Some(state) = body.get("conversationState").and_then(Value::as_object) else {
        return fail(Rule::ConversationStateRequired, "conversationState");
    };
    if state.get("chatTriggerType").and_then(Value::as_str) != Some("MANUAL") {
        return fail(Rule::ChatTriggerType, "conversationState.chatTriggerType");
    }
    if let Some(id) = state.get("conversationId") {
        let ok = id.as_str().is_some_and(|s| (1..=MAX_CONVERSATION_ID_CHARS).contains(&s.chars().count()));
        if !ok {
            return fail(Rule::ConversationIdLength, "conversationState.conversationId");
        }
    }
    let Some(current) = state.get("currentMessage").and_then(Value::as_object) else {
        return fail(Rule::CurrentMessageRequired, "conversationState.currentMessage");
    };
    let current_path = "conversationState.currentMessage.userInputMessage";
    let current_user = match (current.len(), current.get("userInputMessage").and_then(Value::as_object)) {
        (1, Some(user)) => user,
        _ => return fail(Rule::CurrentMessageIsUser, "conversationState.currentMessage"),
    };

    // The current tools first: history tool uses are checked against them.
    let mut v = Validator { current_tools: check_tools(current_user, current_path)?, ..Default::default() };

    let history = match state.get("history") {
        None | Some(Value::Null) => &[][..],
        Some(Value::Array(items)) => items.as_slice(),
        Some(_) => return fail(Rule::HistoryArray, "conversationState.history"),
    };
    for (i, item) in history.iter().enumerate() {
        let path = format!("conversationState.history[{i}]");
        let (kind, msg) = match item.as_object() {
            Some(obj) if obj.len() == 1 => match obj.iter().next() {
                Some((k, Value::Object(m))) if k == "userInputMessage" || k == "assistantResponseMessage" => {
                    (k.as_str(), m)
                }
                _ => return fail(Rule::MessageUnion, path),
            },
            _ => return fail(Rule::MessageUnion, path),
        };
        let is_user = kind == "userInputMessage";
        let expect_user = i % 2 == 0;
        if is_user != expect_user {
            let rule = if i == 0 { Rule::HistoryStartsWithUser } else { Rule::HistoryAlternates };
            return fail(rule, path);
        }
        let path = format!("{path}.{kind}");
        if is_user {
            // Tools defined in history turns must be well-formed too; only the current ones count.
            check_tools(msg, &path)?;
            v.user_message(msg, &path)?;
        } else {
            v.assistant_message(msg, &path)?;
        }
    }
    if history.len() % 2 == 1 {
        return fail(
            Rule::HistoryEndsWithAssistant,
            format!("conversationState.history[{}]", history.len() - 1),
        );
    }
    v.user_message(current_user, current_path)
}

/// What the walk has seen so far.
#[derive(Default)]
struct Validator {
    /// Names defined in the current message's tools.
    current_tools: HashSet<String>,
    /// Tool uses of earlier assistant messages: id → name.
    tool_uses: HashMap<String, String>,
    /// Tool-use ids already answered by a tool result.
    answered: HashSet<String>,
    /// The tool uses of the assistant message just walked, which the next user message answers.
    due: Vec<String>,
}

impl Validator {
    /// Content, model id, images and tool results of a user message (tools are checked apart).
    fn user_message(&mut self, msg: &Map<String, Value>, path: &str) -> Check {
        let Some(content) = msg.get("content").and_then(Value::as_str) else {
            return fail(Rule::UserContentString, format!("{path}.content"));
        };
        if content.len() > MAX_USER_CONTENT_CHARS && content.chars().count() > MAX_USER_CONTENT_CHARS {
            return fail(Rule::UserContentTooLong, format!("{path}.content"));
        }
        if let Some(model) = msg.get("modelId")
            && !model.as_str().is_some_and(is_model_id)
        {
            return fail(Rule::ModelIdFormat, format!("{path}.modelId"));
        }
        check_cache_point(msg, path)?;
        for field in ["origin", "userIntent"] {
            if let Some(value) = msg.get(field)
                && !value.is_string()
            {
                return fail(Rule::FieldType, format!("{path}.{field}"));
            }
        }
        if let Some(images) = msg.get("images") {
            check_images(images, &format!("{path}.images"))?;
        }
        self.user_context(msg, path)?;
        let has_results = context(msg, path)?
            .and_then(|ctx| ctx.get("toolResults"))
            .and_then(Value::as_array)
            .is_some_and(|r| !r.is_empty());
        if content.trim().is_empty() && !has_results {
            return fail(Rule::UserContentNonEmpty, format!("{path}.content"));
        }
        let due = std::mem::take(&mut self.due);
        if due.iter().any(|id| !self.answered.contains(id)) {
            return fail(Rule::ToolUseAnswered, format!("{path}.userInputMessageContext.toolResults"));
        }
        Ok(())
    }

    /// A user message's context: its environment and tool results.
    fn user_context(&mut self, msg: &Map<String, Value>, path: &str) -> Check {
        let Some(ctx) = context(msg, path)? else {
            return Ok(());
        };
        let ctx_path = format!("{path}.userInputMessageContext");
        if let Some(env) = ctx.get("envState")
            && !env.is_object()
        {
            return fail(Rule::FieldType, format!("{ctx_path}.envState"));
        }
        let results = match ctx.get("toolResults") {
            None | Some(Value::Null) => return Ok(()),
            Some(Value::Array(results)) => results,
            Some(_) => return fail(Rule::ContextShape, format!("{ctx_path}.toolResults")),
        };
        for (i, result) in results.iter().enumerate() {
            self.tool_result(result, &format!("{ctx_path}.toolResults[{i}]"))?;
        }
        Ok(())
    }

    fn tool_result(&mut self, result: &Value, path: &str) -> Check {
        let Some(result) = result.as_object() else {
            return fail(Rule::ToolResultShape, path);
        };
        let Some(id) = result.get("toolUseId").and_then(Value::as_str) else {
            return fail(Rule::ToolResultShape, format!("{path}.toolUseId"));
        };
        if !is_tool_ident(id) {
            return fail(Rule::ToolUseIdFormat, format!("{path}.toolUseId"));
        }
        let Some(content) = result.get("content").and_then(Value::as_array) else {
            return fail(Rule::ToolResultShape, format!("{path}.content"));
        };
        let mut chars = 0usize;
        for (i, item) in content.iter().enumerate() {
            let item_path = format!("{path}.content[{i}]");
            let Some(item) = item.as_object().filter(|o| o.len() == 1) else {
                return fail(Rule::ToolResultContent, item_path);
            };
            chars += match item.iter().next() {
                Some((k, Value::String(text))) if k == "text" => text.chars().count(),
                Some((k, json)) if k == "json" => json.to_string().chars().count(),
                _ => return fail(Rule::ToolResultContent, item_path),
            };
        }
        if chars > MAX_TOOL_RESULT_CHARS {
            return fail(Rule::ToolResultTooLong, format!("{path}.content"));
        }
        match result.get("status").and_then(Value::as_str) {
            Some("success" | "error") => {}
            _ => return fail(Rule::ToolResultStatus, format!("{path}.status")),
        }
        if !self.tool_uses.contains_key(id) {
            return fail(Rule::ToolResultAnswersToolUse, format!("{path}.toolUseId"));
        }
        if !self.answered.insert(id.to_owned()) {
            return fail(Rule::ToolResultOnce, format!("{path}.toolUseId"));
        }
        Ok(())
    }

    fn assistant_message(&mut self, msg: &Map<String, Value>, path: &str) -> Check {
        match msg.get("content").and_then(Value::as_str) {
            Some(content) if !content.is_empty() => {}
            _ => return fail(Rule::AssistantContentNonEmpty, format!("{path}.content")),
        }
        if let Some(id) = msg.get("messageId")
            && !id.is_string()
        {
            return fail(Rule::FieldType, format!("{path}.messageId"));
        }
        check_cache_point(msg, path)?;
        check_reasoning_content(msg, path)?;
        let uses = match msg.get("toolUses") {
            None | Some(Value::Null) => return Ok(()),
            Some(Value::Array(uses)) => uses,
            Some(_) => return fail(Rule::ToolUseShape, format!("{path}.toolUses")),
        };
        for (i, tool_use) in uses.iter().enumerate() {
            let use_path = format!("{path}.toolUses[{i}]");
            let Some(tool_use) = tool_use.as_object() else {
                return fail(Rule::ToolUseShape, use_path);
            };
            let Some(id) = tool_use.get("toolUseId").and_then(Value::as_str) else {
                return fail(Rule::ToolUseShape, format!("{use_path}.toolUseId"));
            };
            if !is_tool_ident(id) {
                return fail(Rule::ToolUseIdFormat, format!("{use_path}.toolUseId"));
            }
            let Some(name) = tool_use.get("name").and_then(Value::as_str) else {
                return fail(Rule::ToolUseShape, format!("{use_path}.name"));
            };
            if !is_tool_ident(name) {
                return fail(Rule::ToolNameFormat, format!("{use_path}.name"));
            }
            if !tool_use.get("input").is_some_and(Value::is_object) {
                return fail(Rule::ToolUseShape, format!("{use_path}.input"));
            }
            if !self.current_tools.contains(name) {
                return fail(Rule::ToolUseNameDefined, format!("{use_path}.name"));
            }
            if self.tool_uses.insert(id.to_owned(), name.to_owned()).is_some() {
                return fail(Rule::ToolUseIdUnique, format!("{use_path}.toolUseId"));
            }
            self.due.push(id.to_owned());
        }
        Ok(())
    }
}

/// The message's `userInputMessageContext`, if any.
fn context<'a>(
    msg: &'a Map<String, Value>,
    path: &str,
) -> Result<Option<&'a Map<String, Value>>, RuleViolation> {
    match msg.get("userInputMessageContext") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(ctx)) => Ok(Some(ctx)),
        Some(_) => fail(Rule::ContextShape, format!("{path}.userInputMessageContext")),
    }
}

/// Checks a user message's tool definitions and returns their names.
fn check_tools(msg: &Map<String, Value>, path: &str) -> Result<HashSet<String>, RuleViolation> {
    let mut names = HashSet::new();
    let Some(ctx) = context(msg, path)? else {
        return Ok(names);
    };
    let tools_path = format!("{path}.userInputMessageContext.tools");
    let tools = match ctx.get("tools") {
        None | Some(Value::Null) => return Ok(names),
        Some(Value::Array(tools)) => tools,
        Some(_) => return fail(Rule::ContextShape, tools_path),
    };
    for (i, tool) in tools.iter().enumerate() {
        if let Some(item) = tool.as_object()
            && item.len() == 1
            && item.contains_key("cachePoint")
        {
            check_cache_point(item, &format!("{tools_path}[{i}]"))?;
            continue;
        }
        let tool_path = format!("{tools_path}[{i}].toolSpecification");
        let Some(spec) = tool.get("toolSpecification").and_then(Value::as_object) else {
            return fail(Rule::ToolSpecShape, tool_path);
        };
        let Some(name) = spec.get("name").and_then(Value::as_str) else {
            return fail(Rule::ToolSpecShape, format!("{tool_path}.name"));
        };
        if !is_tool_ident(name) {
            return fail(Rule::ToolNameFormat, format!("{tool_path}.name"));
        }
        let description_ok = spec
            .get("description")
            .and_then(Value::as_str)
            .is_some_and(|d| (1..=MAX_TOOL_DESCRIPTION_CHARS).contains(&d.chars().count()));
        if !description_ok {
            return fail(Rule::ToolDescriptionLength, format!("{tool_path}.description"));
        }
        let Some(schema) = spec.get("inputSchema").and_then(Value::as_object) else {
            return fail(Rule::ToolSpecShape, format!("{tool_path}.inputSchema"));
        };
        let schema_path = format!("{tool_path}.inputSchema.json");
        let Some(json) = schema.get("json").and_then(Value::as_object) else {
            return fail(Rule::ToolSchemaShape, schema_path);
        };
        if let Some(props) = json.get("properties")
            && !props.is_object()
        {
            return fail(Rule::ToolSchemaShape, format!("{schema_path}.properties"));
        }
        if let Some(required) = json.get("required") {
            let ok = required.as_array().is_some_and(|r| r.iter().all(Value::is_string));
            if !ok {
                return fail(Rule::ToolSchemaShape, format!("{schema_path}.required"));
            }
        }
        if !names.insert(name.to_owned()) {
            return fail(Rule::ToolNamesUnique, format!("{tool_path}.name"));
        }
    }
    Ok(names)
}

/// A message's (or a `tools[]` item's) `cachePoint`, if any, is `{"type": "default"}`.
fn check_cache_point(msg: &Map<String, Value>, path: &str) -> Check {
    match msg.get("cachePoint") {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Object(point))
            if point.len() == 1 && point.get("type") == Some(&Value::from("default")) =>
        {
            Ok(())
        }
        Some(_) => fail(Rule::CachePointShape, format!("{path}.cachePoint")),
    }
}

/// An assistant message's `reasoningContent`, if any, holds exactly one of `reasoningText {text,
/// signature}` or a non-empty base64 `redactedContent`.
fn check_reasoning_content(msg: &Map<String, Value>, path: &str) -> Check {
    let path = format!("{path}.reasoningContent");
    let reasoning = match msg.get("reasoningContent") {
        None | Some(Value::Null) => return Ok(()),
        Some(Value::Object(reasoning)) if reasoning.len() == 1 => reasoning,
        Some(_) => return fail(Rule::ReasoningContentShape, path),
    };
    let ok = match reasoning.iter().next() {
        Some((key, Value::Object(text))) if key == "reasoningText" => {
            text.get("text").is_some_and(Value::is_string)
                && text.get("signature").is_some_and(Value::is_string)
        }
        Some((key, Value::String(content))) if key == "redactedContent" => {
            !content.is_empty() && BASE64.decode(content).is_ok()
        }
        _ => false,
    };
    if ok { Ok(()) } else { fail(Rule::ReasoningContentShape, path) }
}

/// How many `cachePoint`s a (valid) body carries: on messages of the history and the current
/// message, and as `tools[]` items of the current message.
pub fn count_cache_points(body: &Value) -> usize {
    let state = &body["conversationState"];
    let messages =
        state["history"].as_array().into_iter().flatten().chain(std::iter::once(&state["currentMessage"]));
    let mut count = 0;
    for message in messages {
        for kind in ["userInputMessage", "assistantResponseMessage"] {
            if message[kind]["cachePoint"].is_object() {
                count += 1;
            }
        }
    }
    let tools = &state["currentMessage"]["userInputMessage"]["userInputMessageContext"]["tools"];
    count + tools.as_array().into_iter().flatten().filter(|t| t["cachePoint"].is_object()).count()
}

fn check_images(images: &Value, path: &str) -> Check {
    let Some(images) = images.as_array().filter(|a| a.len() <= MAX_IMAGES) else {
        return fail(Rule::ImagesCount, path);
    };
    for (i, image) in images.iter().enumerate() {
        let image_path = format!("{path}[{i}]");
        let Some(image) = image.as_object() else {
            return fail(Rule::ImageShape, image_path);
        };
        let Some(format) = image.get("format").and_then(Value::as_str) else {
            return fail(Rule::ImageShape, format!("{image_path}.format"));
        };
        if !matches!(format, "png" | "jpeg" | "gif" | "webp") {
            return fail(Rule::ImageFormat, format!("{image_path}.format"));
        }
        let Some(bytes) = image.get("source").and_then(|s| s.get("bytes")) else {
            return fail(Rule::ImageShape, format!("{image_path}.source.bytes"));
        };
        let ok = bytes.as_str().is_some_and(|b| !b.is_empty() && BASE64.decode(b).is_ok());
        if !ok {
            return fail(Rule::ImageBase64, format!("{image_path}.source.bytes"));
        }
    }
    Ok(())
}

/// `[a-zA-Z0-9_-]{1,64}`: tool names and tool-use ids.
pub fn is_tool_ident(s: &str) -> bool {
    (1..=MAX_TOOL_NAME_LEN).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `[a-zA-Z0-9_:.-]+`.
fn is_model_id(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b':' | b'.' | b'-'))
}

/// `arn:aws:codewhisperer:<region>:<12 digits>:profile/<ID>`.
fn is_profile_arn(s: &str) -> bool {
    let Some(rest) = s.strip_prefix("arn:aws:codewhisperer:") else {
        return false;
    };
    let mut parts = rest.splitn(3, ':');
    let (Some(region), Some(account), Some(resource)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let region_ok = !region.is_empty()
        && region.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let account_ok = account.len() == 12 && account.bytes().all(|b| b.is_ascii_digit());
    let id_ok = resource
        .strip_prefix("profile/")
        .is_some_and(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric()));
    region_ok && account_ok && id_ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// History: user, assistant with a tool use; current message: its tool result, with tools.
    fn baseline() -> Value {
        json!({
            "profileArn": "arn:aws:codewhisperer:us-east-1:123456789012:profile/ABCDEF123456",
            "conversationState": {
                "conversationId": "0f2a3c9e-7b1d-4e55-9a0c-1d2e3f4a5b6c",
                "chatTriggerType": "MANUAL",
                "history": [
                    {"userInputMessage": {
                        "content": "What is the weather in Paris?",
                        "modelId": "claude-sonnet-4.5",
                        "origin": "AI_EDITOR",
                        "images": [{"format": "png", "source": {"bytes": "iVBORw0KGgo="}}]
                    }},
                    {"assistantResponseMessage": {
                        "messageId": "m-1",
                        "content": "Let me check.",
                        "toolUses": [{"toolUseId": "tooluse_abc-1", "name": "get_weather", "input": {"city": "Paris"}}]
                    }}
                ],
                "currentMessage": {"userInputMessage": {
                    "content": "",
                    "modelId": "claude-sonnet-4.5",
                    "origin": "AI_EDITOR",
                    "userInputMessageContext": {
                        "envState": {"operatingSystem": "linux", "currentWorkingDirectory": "/tmp"},
                        "tools": [
                            {"toolSpecification": {
                                "name": "get_weather",
                                "description": "Current weather for a city.",
                                "inputSchema": {"json": {
                                    "type": "object",
                                    "properties": {"city": {"type": "string"}},
                                    "required": ["city"]
                                }}
                            }},
                            {"toolSpecification": {
                                "name": "get_time",
                                "description": "Current time.",
                                "inputSchema": {"json": {"type": "object"}}
                            }}
                        ],
                        "toolResults": [{
                            "toolUseId": "tooluse_abc-1",
                            "content": [{"text": "Sunny, 21 °C"}, {"json": {"temp": 21}}],
                            "status": "success"
                        }]
                    }
                }}
            }
        })
    }

    /// Applies `mutate` to the baseline and checks that the result breaks `rule` at `path`.
    #[track_caller]
    fn rejects(rule: Rule, path: &str, mutate: impl FnOnce(&mut Value)) {
        let mut body = baseline();
        mutate(&mut body);
        let err = validate_request(&body).expect_err("mutated request must be rejected");
        assert_eq!(err.rule, rule, "wrong rule: {err}");
        assert_eq!(err.path, path, "wrong path: {err}");
    }

    const CUR: &str = "/conversationState/currentMessage/userInputMessage";
    const CTX: &str = "/conversationState/currentMessage/userInputMessage/userInputMessageContext";
    const H1: &str = "/conversationState/history/1/assistantResponseMessage";

    fn at<'a>(v: &'a mut Value, pointer: &str) -> &'a mut Value {
        v.pointer_mut(pointer).unwrap_or_else(|| panic!("no {pointer} in the baseline"))
    }

    /// Sets (or adds, when the parent is an object) the value at `pointer`.
    fn set(v: &mut Value, pointer: &str, value: Value) {
        if let Some(slot) = v.pointer_mut(pointer) {
            *slot = value;
            return;
        }
        let (parent, key) = pointer.rsplit_once('/').expect("pointer has a parent");
        at(v, parent).as_object_mut().expect("parent is an object").insert(key.to_owned(), value);
    }

    fn remove(v: &mut Value, pointer: &str) {
        let (parent, key) = pointer.rsplit_once('/').expect("pointer has a parent");
        at(v, parent).as_object_mut().expect("parent is an object").remove(key);
    }

    #[test]
    fn baseline_is_valid() {
        validate_request(&baseline()).expect("baseline is valid");
    }

    #[test]
    fn minimal_request_is_valid() {
        let body = json!({"conversationState": {
            "chatTriggerType": "MANUAL",
            "currentMessage": {"userInputMessage": {"content": "Hi"}}
        }});
        validate_request(&body).expect("minimal request is valid");
    }

    #[test]
    fn body_must_be_an_object() {
        let err = validate_request(&json!([1])).unwrap_err();
        assert_eq!((err.rule, err.path.as_str()), (Rule::BodyObject, "$"));
    }

    #[test]
    fn profile_arn_format() {
        rejects(Rule::ProfileArnFormat, "profileArn", |b| {
            set(b, "/profileArn", json!("arn:aws:codewhisperer:us-east-1:12345:profile/X"))
        });
        rejects(Rule::ProfileArnFormat, "profileArn", |b| set(b, "/profileArn", json!(42)));
        rejects(Rule::ProfileArnFormat, "profileArn", |b| {
            set(b, "/profileArn", json!("arn:aws:iam::123456789012:role/x"))
        });
    }

    #[test]
    fn conversation_state_required() {
        rejects(Rule::ConversationStateRequired, "conversationState", |b| remove(b, "/conversationState"));
    }

    #[test]
    fn chat_trigger_type_manual() {
        rejects(Rule::ChatTriggerType, "conversationState.chatTriggerType", |b| {
            remove(b, "/conversationState/chatTriggerType")
        });
        rejects(Rule::ChatTriggerType, "conversationState.chatTriggerType", |b| {
            set(b, "/conversationState/chatTriggerType", json!("manual"))
        });
    }

    #[test]
    fn conversation_id_length() {
        rejects(Rule::ConversationIdLength, "conversationState.conversationId", |b| {
            set(b, "/conversationState/conversationId", json!(""))
        });
        rejects(Rule::ConversationIdLength, "conversationState.conversationId", |b| {
            set(b, "/conversationState/conversationId", json!("x".repeat(129)))
        });
    }

    #[test]
    fn current_message_required() {
        rejects(Rule::CurrentMessageRequired, "conversationState.currentMessage", |b| {
            remove(b, "/conversationState/currentMessage")
        });
    }

    #[test]
    fn current_message_is_user() {
        rejects(Rule::CurrentMessageIsUser, "conversationState.currentMessage", |b| {
            set(b, "/conversationState/currentMessage", json!({"assistantResponseMessage": {"content": "x"}}))
        });
    }

    #[test]
    fn history_is_an_array() {
        rejects(Rule::HistoryArray, "conversationState.history", |b| {
            set(b, "/conversationState/history", json!({}))
        });
    }

    #[test]
    fn history_item_is_a_union() {
        rejects(Rule::MessageUnion, "conversationState.history[0]", |b| {
            let user = at(b, "/conversationState/history/0/userInputMessage").clone();
            set(
                b,
                "/conversationState/history/0",
                json!({"userInputMessage": user, "assistantResponseMessage": {"content": "x"}}),
            )
        });
        rejects(Rule::MessageUnion, "conversationState.history[0]", |b| {
            set(b, "/conversationState/history/0", json!({}))
        });
    }

    #[test]
    fn history_starts_with_user() {
        rejects(Rule::HistoryStartsWithUser, "conversationState.history[0]", |b| {
            at(b, "/conversationState/history").as_array_mut().unwrap().remove(0);
        });
    }

    #[test]
    fn history_alternates() {
        rejects(Rule::HistoryAlternates, "conversationState.history[1]", |b| {
            let history = at(b, "/conversationState/history").as_array_mut().unwrap();
            history.insert(1, json!({"userInputMessage": {"content": "again"}}));
        });
    }

    #[test]
    fn history_ends_with_assistant() {
        rejects(Rule::HistoryEndsWithAssistant, "conversationState.history[2]", |b| {
            let history = at(b, "/conversationState/history").as_array_mut().unwrap();
            history.push(json!({"userInputMessage": {"content": "dangling"}}));
            // Answering the tool uses before it, so that only the ending is wrong.
            let results = at(b, &format!("{CTX}/toolResults")).clone();
            set(
                b,
                "/conversationState/history/2/userInputMessage/userInputMessageContext",
                json!({"toolResults": results}),
            );
        });
    }

    #[test]
    fn user_content_is_a_string() {
        rejects(Rule::UserContentString, &format!("{}.content", dotted(CUR)), |b| {
            remove(b, &format!("{CUR}/content"))
        });
        rejects(Rule::UserContentString, "conversationState.history[0].userInputMessage.content", |b| {
            set(b, "/conversationState/history/0/userInputMessage/content", json!(["x"]))
        });
    }

    #[test]
    fn user_content_too_long() {
        rejects(Rule::UserContentTooLong, &format!("{}.content", dotted(CUR)), |b| {
            set(b, &format!("{CUR}/content"), json!("é".repeat(MAX_USER_CONTENT_CHARS + 1)))
        });
        assert!(Rule::UserContentTooLong.is_content_length());
        // Exactly at the limit (in characters, not bytes) is fine.
        let mut body = baseline();
        set(&mut body, &format!("{CUR}/content"), json!("é".repeat(MAX_USER_CONTENT_CHARS)));
        validate_request(&body).expect("content at the limit is valid");
    }

    #[test]
    fn model_id_format() {
        rejects(Rule::ModelIdFormat, &format!("{}.modelId", dotted(CUR)), |b| {
            set(b, &format!("{CUR}/modelId"), json!("claude sonnet"))
        });
        rejects(Rule::ModelIdFormat, "conversationState.history[0].userInputMessage.modelId", |b| {
            set(b, "/conversationState/history/0/userInputMessage/modelId", json!(""))
        });
    }

    #[test]
    fn field_types() {
        rejects(Rule::FieldType, &format!("{}.origin", dotted(CUR)), |b| {
            set(b, &format!("{CUR}/origin"), json!(1))
        });
        rejects(Rule::FieldType, &format!("{}.messageId", dotted(H1)), |b| {
            set(b, &format!("{H1}/messageId"), json!(null))
        });
        rejects(Rule::FieldType, &format!("{}.envState", dotted(CTX)), |b| {
            set(b, &format!("{CTX}/envState"), json!("linux"))
        });
    }

    #[test]
    fn assistant_content_non_empty() {
        rejects(Rule::AssistantContentNonEmpty, &format!("{}.content", dotted(H1)), |b| {
            set(b, &format!("{H1}/content"), json!(""))
        });
        rejects(Rule::AssistantContentNonEmpty, &format!("{}.content", dotted(H1)), |b| {
            remove(b, &format!("{H1}/content"))
        });
    }

    #[test]
    fn tool_use_shape() {
        let p = dotted(H1);
        rejects(Rule::ToolUseShape, &format!("{p}.toolUses"), |b| {
            set(b, &format!("{H1}/toolUses"), json!({}))
        });
        rejects(Rule::ToolUseShape, &format!("{p}.toolUses[0].input"), |b| {
            set(b, &format!("{H1}/toolUses/0/input"), json!("{\"city\":\"Paris\"}"))
        });
        rejects(Rule::ToolUseShape, &format!("{p}.toolUses[0].name"), |b| {
            remove(b, &format!("{H1}/toolUses/0/name"))
        });
        rejects(Rule::ToolUseShape, &format!("{p}.toolUses[0].toolUseId"), |b| {
            remove(b, &format!("{H1}/toolUses/0/toolUseId"))
        });
    }

    #[test]
    fn tool_use_id_format() {
        rejects(Rule::ToolUseIdFormat, &format!("{}.toolUses[0].toolUseId", dotted(H1)), |b| {
            set(b, &format!("{H1}/toolUses/0/toolUseId"), json!("toolu_01.x"))
        });
        rejects(Rule::ToolUseIdFormat, &format!("{}.toolUses[0].toolUseId", dotted(H1)), |b| {
            set(b, &format!("{H1}/toolUses/0/toolUseId"), json!("a".repeat(65)))
        });
        rejects(Rule::ToolUseIdFormat, &format!("{}.toolResults[0].toolUseId", dotted(CTX)), |b| {
            set(b, &format!("{CTX}/toolResults/0/toolUseId"), json!("bad id"))
        });
    }

    #[test]
    fn tool_use_id_unique() {
        rejects(Rule::ToolUseIdUnique, &format!("{}.toolUses[1].toolUseId", dotted(H1)), |b| {
            let uses = at(b, &format!("{H1}/toolUses")).as_array_mut().unwrap();
            uses.push(uses[0].clone());
        });
    }

    #[test]
    fn tool_name_format() {
        rejects(Rule::ToolNameFormat, &format!("{}.toolUses[0].name", dotted(H1)), |b| {
            set(b, &format!("{H1}/toolUses/0/name"), json!("get.weather"))
        });
        rejects(Rule::ToolNameFormat, &format!("{}.tools[1].toolSpecification.name", dotted(CTX)), |b| {
            set(b, &format!("{CTX}/tools/1/toolSpecification/name"), json!("t".repeat(65)))
        });
        rejects(Rule::ToolNameFormat, &format!("{}.tools[1].toolSpecification.name", dotted(CTX)), |b| {
            set(b, &format!("{CTX}/tools/1/toolSpecification/name"), json!(""))
        });
    }

    #[test]
    fn tool_use_name_defined() {
        rejects(Rule::ToolUseNameDefined, &format!("{}.toolUses[0].name", dotted(H1)), |b| {
            set(b, &format!("{H1}/toolUses/0/name"), json!("get_forecast"))
        });
        // Tools defined only in a history turn do not count.
        rejects(Rule::ToolUseNameDefined, &format!("{}.toolUses[0].name", dotted(H1)), |b| {
            let tools = at(b, &format!("{CTX}/tools")).clone();
            remove(b, &format!("{CTX}/tools"));
            set(
                b,
                "/conversationState/history/0/userInputMessage/userInputMessageContext",
                json!({"tools": tools}),
            );
        });
    }

    #[test]
    fn images_count() {
        rejects(Rule::ImagesCount, "conversationState.history[0].userInputMessage.images", |b| {
            let image = at(b, "/conversationState/history/0/userInputMessage/images/0").clone();
            set(b, "/conversationState/history/0/userInputMessage/images", Value::Array(vec![image; 11]))
        });
    }

    #[test]
    fn image_shape() {
        rejects(
            Rule::ImageShape,
            "conversationState.history[0].userInputMessage.images[0].source.bytes",
            |b| remove(b, "/conversationState/history/0/userInputMessage/images/0/source"),
        );
        rejects(Rule::ImageShape, "conversationState.history[0].userInputMessage.images[0].format", |b| {
            remove(b, "/conversationState/history/0/userInputMessage/images/0/format")
        });
    }

    #[test]
    fn image_format() {
        rejects(Rule::ImageFormat, "conversationState.history[0].userInputMessage.images[0].format", |b| {
            set(b, "/conversationState/history/0/userInputMessage/images/0/format", json!("image/png"))
        });
    }

    #[test]
    fn image_base64() {
        rejects(
            Rule::ImageBase64,
            "conversationState.history[0].userInputMessage.images[0].source.bytes",
            |b| {
                set(
                    b,
                    "/conversationState/history/0/userInputMessage/images/0/source/bytes",
                    json!("not base64!"),
                )
            },
        );
    }

    #[test]
    fn context_shape() {
        rejects(Rule::ContextShape, &format!("{}.userInputMessageContext", dotted(CUR)), |b| {
            set(b, CTX, json!([]))
        });
        rejects(Rule::ContextShape, &format!("{}.tools", dotted(CTX)), |b| {
            set(b, &format!("{CTX}/tools"), json!({}))
        });
        rejects(Rule::ContextShape, &format!("{}.toolResults", dotted(CTX)), |b| {
            set(b, &format!("{CTX}/toolResults"), json!("x"))
        });
    }

    #[test]
    fn tool_spec_shape() {
        rejects(Rule::ToolSpecShape, &format!("{}.tools[0].toolSpecification", dotted(CTX)), |b| {
            let spec = at(b, &format!("{CTX}/tools/0/toolSpecification")).clone();
            set(b, &format!("{CTX}/tools/0"), spec)
        });
        rejects(
            Rule::ToolSpecShape,
            &format!("{}.tools[0].toolSpecification.inputSchema", dotted(CTX)),
            |b| remove(b, &format!("{CTX}/tools/0/toolSpecification/inputSchema")),
        );
    }

    #[test]
    fn tool_description_length() {
        let path = format!("{}.tools[0].toolSpecification.description", dotted(CTX));
        rejects(Rule::ToolDescriptionLength, &path, |b| {
            set(b, &format!("{CTX}/tools/0/toolSpecification/description"), json!(""))
        });
        rejects(Rule::ToolDescriptionLength, &path, |b| {
            set(b, &format!("{CTX}/tools/0/toolSpecification/description"), json!("d".repeat(10_241)))
        });
        rejects(Rule::ToolDescriptionLength, &path, |b| {
            remove(b, &format!("{CTX}/tools/0/toolSpecification/description"))
        });
    }

    #[test]
    fn tool_schema_shape() {
        let json_path = format!("{CTX}/tools/0/toolSpecification/inputSchema/json");
        let path = format!("{}.tools[0].toolSpecification.inputSchema.json", dotted(CTX));
        rejects(Rule::ToolSchemaShape, &path, |b| set(b, &json_path, json!("{\"type\":\"object\"}")));
        rejects(Rule::ToolSchemaShape, &format!("{path}.properties"), |b| {
            set(b, &format!("{json_path}/properties"), json!([]))
        });
        rejects(Rule::ToolSchemaShape, &format!("{path}.required"), |b| {
            set(b, &format!("{json_path}/required"), json!("city"))
        });
        rejects(Rule::ToolSchemaShape, &format!("{path}.required"), |b| {
            set(b, &format!("{json_path}/required"), json!([1]))
        });
    }

    #[test]
    fn tool_names_unique() {
        rejects(Rule::ToolNamesUnique, &format!("{}.tools[1].toolSpecification.name", dotted(CTX)), |b| {
            set(b, &format!("{CTX}/tools/1/toolSpecification/name"), json!("get_weather"))
        });
    }

    #[test]
    fn tool_result_shape() {
        let p = dotted(CTX);
        rejects(Rule::ToolResultShape, &format!("{p}.toolResults[0].content"), |b| {
            set(b, &format!("{CTX}/toolResults/0/content"), json!("Sunny"))
        });
        rejects(Rule::ToolResultShape, &format!("{p}.toolResults[0].toolUseId"), |b| {
            remove(b, &format!("{CTX}/toolResults/0/toolUseId"))
        });
        rejects(Rule::ToolResultShape, &format!("{p}.toolResults[0]"), |b| {
            set(b, &format!("{CTX}/toolResults/0"), json!("x"))
        });
    }

    #[test]
    fn tool_result_content() {
        let p = dotted(CTX);
        rejects(Rule::ToolResultContent, &format!("{p}.toolResults[0].content[0]"), |b| {
            set(b, &format!("{CTX}/toolResults/0/content/0"), json!({"type": "text", "text": "x"}))
        });
        rejects(Rule::ToolResultContent, &format!("{p}.toolResults[0].content[1]"), |b| {
            set(b, &format!("{CTX}/toolResults/0/content/1"), json!({"text": 5}))
        });
    }

    #[test]
    fn tool_result_status() {
        let p = format!("{}.toolResults[0].status", dotted(CTX));
        rejects(Rule::ToolResultStatus, &p, |b| set(b, &format!("{CTX}/toolResults/0/status"), json!("ok")));
        rejects(Rule::ToolResultStatus, &p, |b| remove(b, &format!("{CTX}/toolResults/0/status")));
    }

    #[test]
    fn tool_result_too_long() {
        rejects(Rule::ToolResultTooLong, &format!("{}.toolResults[0].content", dotted(CTX)), |b| {
            set(b, &format!("{CTX}/toolResults/0/content/0/text"), json!("r".repeat(MAX_TOOL_RESULT_CHARS)))
        });
        assert!(Rule::ToolResultTooLong.is_content_length());
    }

    #[test]
    fn tool_result_answers_tool_use() {
        let p = format!("{}.toolResults[0].toolUseId", dotted(CTX));
        rejects(Rule::ToolResultAnswersToolUse, &p, |b| {
            set(b, &format!("{CTX}/toolResults/0/toolUseId"), json!("tooluse_unknown"))
        });
        // A result in the first history turn cannot answer a later tool use.
        rejects(
            Rule::ToolResultAnswersToolUse,
            "conversationState.history[0].userInputMessage.userInputMessageContext.toolResults[0].toolUseId",
            |b| {
                let results = at(b, &format!("{CTX}/toolResults")).clone();
                set(
                    b,
                    "/conversationState/history/0/userInputMessage/userInputMessageContext",
                    json!({"toolResults": results}),
                );
            },
        );
    }

    #[test]
    fn tool_result_once() {
        rejects(Rule::ToolResultOnce, &format!("{}.toolResults[1].toolUseId", dotted(CTX)), |b| {
            let results = at(b, &format!("{CTX}/toolResults")).as_array_mut().unwrap();
            results.push(results[0].clone());
        });
    }

    #[test]
    fn tool_uses_are_answered_in_the_next_user_message() {
        let p = format!("{}.toolResults", dotted(CTX));
        rejects(Rule::ToolUseAnswered, &p, |b| {
            set(b, &format!("{CUR}/content"), json!("Go on"));
            remove(b, &format!("{CTX}/toolResults"));
        });
    }

    #[test]
    fn user_content_is_not_blank_without_tool_results() {
        rejects(Rule::UserContentNonEmpty, &format!("{}.content", dotted(CUR)), |b| {
            set(b, &format!("{CUR}/content"), json!(" \n"));
            remove(b, &format!("{CTX}/toolResults"));
        });
        rejects(Rule::UserContentNonEmpty, "conversationState.history[0].userInputMessage.content", |b| {
            set(b, "/conversationState/history/0/userInputMessage/content", json!(""))
        });
        // With tool results, no text is needed.
        let mut body = baseline();
        set(&mut body, &format!("{CUR}/content"), json!(""));
        validate_request(&body).expect("tool results without text are valid");
    }

    #[test]
    fn additional_fields_are_an_object() {
        rejects(Rule::AdditionalFieldsObject, "additionalModelRequestFields", |b| {
            set(b, "/additionalModelRequestFields", json!("thinking"))
        });
        for ok in [json!(null), json!({}), json!({"thinking": {"type": "adaptive"}})] {
            let mut body = baseline();
            set(&mut body, "/additionalModelRequestFields", ok.clone());
            validate_request(&body).unwrap_or_else(|v| panic!("{ok}: {v}"));
        }
        assert_eq!(Rule::AdditionalFieldsObject.message(), "Invalid additionalModelRequestFields");
    }

    #[test]
    fn reasoning_content_shape() {
        let path = format!("{}.reasoningContent", dotted(H1));
        for bad in [
            json!({"text": "x", "signature": "c2ln"}),
            json!({"reasoningText": {"text": "x"}}),
            json!({"reasoningText": {"text": 1, "signature": "c2ln"}}),
            json!({"reasoningText": {"text": "x", "signature": "c2ln"}, "redactedContent": "c2ln"}),
            json!({"redactedContent": ""}),
            json!({"redactedContent": "not base64!"}),
            json!("x"),
        ] {
            rejects(Rule::ReasoningContentShape, &path, |b| {
                set(b, &format!("{H1}/reasoningContent"), bad.clone())
            });
        }
        for ok in
            [json!({"reasoningText": {"text": "x", "signature": "c2ln"}}), json!({"redactedContent": "c2ln"})]
        {
            let mut body = baseline();
            set(&mut body, &format!("{H1}/reasoningContent"), ok.clone());
            validate_request(&body).unwrap_or_else(|v| panic!("{ok}: {v}"));
        }
        assert_eq!(Rule::ReasoningContentShape.reason(), Some("REQUEST_BODY_INVALID"));
        assert_eq!(Rule::HistoryAlternates.reason(), None);
        assert_eq!(Rule::ToolResultTooLong.reason(), Some("CONTENT_LENGTH_EXCEEDS_THRESHOLD"));
    }

    #[test]
    fn cache_points() {
        let mut body = baseline();
        set(&mut body, &format!("{H1}/cachePoint"), json!({"type": "default"}));
        set(&mut body, &format!("{CUR}/cachePoint"), json!({"type": "default"}));
        at(&mut body, &format!("{CTX}/tools"))
            .as_array_mut()
            .unwrap()
            .push(json!({"cachePoint": {"type": "default"}}));
        validate_request(&body).expect("cache points in their places are valid");
        assert_eq!(count_cache_points(&body), 3);
        assert_eq!(count_cache_points(&baseline()), 0);
        rejects(Rule::CachePointShape, &format!("{}.cachePoint", dotted(CUR)), |b| {
            set(b, &format!("{CUR}/cachePoint"), json!({"type": "ephemeral"}))
        });
        rejects(Rule::CachePointShape, &format!("{}.tools[2].cachePoint", dotted(CTX)), |b| {
            at(b, &format!("{CTX}/tools")).as_array_mut().unwrap().push(json!({"cachePoint": {}}))
        });
    }

    #[test]
    fn every_rule_has_text() {
        let display = RuleViolation::new(Rule::HistoryAlternates, "conversationState.history[1]").to_string();
        assert!(display.contains("alternates") && display.contains("history[1]"), "{display}");
    }

    /// `/a/b/0/c` → `a.b[0].c`, the form violation paths take.
    fn dotted(pointer: &str) -> String {
        let mut out = String::new();
        for part in pointer.trim_start_matches('/').split('/') {
            if part.bytes().all(|b| b.is_ascii_digit()) {
                out.push_str(&format!("[{part}]"));
            } else {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(part);
            }
        }
        out
    }
}
