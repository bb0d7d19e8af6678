//! Native reasoning (PROTOCOL.md §5) for a model whose catalog entry has an
//! `additionalModelRequestFieldsSchema`: the Claude request's `thinking`, `output_config.effort`
//! and `max_tokens` become the Amazon Q body's `additionalModelRequestFields`, checked against
//! that schema before anything is sent; an assistant turn's thinking blocks go back as its
//! `reasoningContent`. Models without a schema keep the prompt tags (`request.rs`).
//!
//! The schema check is a small JSON Schema subset of the daemon's own — `type` (a name or a
//! list), `enum`, `const`, `properties`, `required`, `additionalProperties` (`false` or a
//! schema), `minimum`, `maximum`, `exclusiveMinimum`, `exclusiveMaximum`; other keywords are
//! ignored, and the service has the last word on them. It is not the emulator's checker: the
//! emulator stands in for the service in the tests and stays an independent judge of what the
//! daemon sends (one shared checker would agree with its own mistakes), and the daemon's
//! refusals are for Claude clients: they name the Claude field, the value and what the model
//! takes instead.

use crate::anthropic::ApiError;
use crate::anthropic::request::{Block, MessagesRequest, Thinking};
use crate::upstream::types::ReasoningContent;
use serde_json::{Map, Value, json};

/// What a value breaks: shown after "is not supported by MODEL".
#[derive(Debug, Clone, PartialEq)]
pub enum Why {
    /// The schema has no place for this member (`additionalProperties: false`, or a `false`
    /// schema).
    NotTaken,
    /// A required member is missing.
    Required,
    /// Not of the schema's type(s).
    Type(Vec<String>),
    /// Not one of the schema's `enum` values (as shown: strings without quotes).
    NotOneOf(Vec<String>),
    /// Not the schema's `const` (as shown).
    NotConst(String),
    /// Under the lower bound (`minimum`, or `exclusiveMinimum` when `exclusive`).
    Below { bound: f64, exclusive: bool },
    /// Over the upper bound (`maximum`, or `exclusiveMaximum` when `exclusive`).
    Above { bound: f64, exclusive: bool },
}

/// A value of `additionalModelRequestFields` the model's schema does not take: its dotted path
/// (the Claude field of the same name: `output_config.effort`, `thinking.budget_tokens`,
/// `max_tokens`), the value as JSON text (none for a missing member) and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}", self.message("the model"))]
pub struct Mismatch {
    pub path: String,
    pub value: Option<String>,
    pub why: Why,
}

impl Mismatch {
    /// The client's message: `output_config.effort: "xhigh" is not supported by claude-opus-4.6
    /// (supported: low, medium, high, max)`.
    pub fn message(&self, model: &str) -> String {
        let path = if self.path.is_empty() { "additionalModelRequestFields" } else { &self.path };
        let value = self.value.as_deref().unwrap_or_default();
        let detail = match &self.why {
            Why::Required => return format!("{path}: required by {model}"),
            Why::NotTaken => String::new(),
            Why::Type(names) => format!(" (expected {})", names.join(" or ")),
            Why::NotOneOf(allowed) => format!(" (supported: {})", allowed.join(", ")),
            Why::NotConst(expected) => format!(" (supported: {expected})"),
            Why::Below { bound, exclusive: false } => format!(" (at least {})", number(*bound)),
            Why::Below { bound, exclusive: true } => format!(" (more than {})", number(*bound)),
            Why::Above { bound, exclusive: false } => format!(" (at most {})", number(*bound)),
            Why::Above { bound, exclusive: true } => format!(" (less than {})", number(*bound)),
        };
        format!("{path}: {value} is not supported by {model}{detail}")
    }

    /// The 400 `invalid_request_error` the client gets.
    pub fn to_api(&self, model: &str) -> ApiError {
        ApiError::invalid(self.message(model))
    }
}

/// A schema value as the client reads it: strings without quotes.
fn shown(v: &Value) -> String {
    v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())
}

fn number(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e15 { format!("{}", n as i64) } else { n.to_string() }
}

/// The `additionalModelRequestFields` for `req` on `model` (whose schema is `schema`), or a 400
/// naming the first value the model does not take. Only what the client asked for goes in:
/// `thinking` (`enabled` with its `budget_tokens`, or `adaptive`; with `display` when given,
/// except an `omitted` the model does not take, which is left out; none when disabled), `output_config.effort` when given, and `max_tokens` when the schema has
/// a place for it — raised to the schema's `minimum` when the client's is lower (Anthropic takes
/// any `max_tokens` ≥ 1; the daemon still cuts the answer at the client's), refused when higher
/// than its `maximum`. `None` when there is nothing to send.
pub fn request_fields(
    req: &MessagesRequest,
    model: &str,
    schema: &Value,
) -> Result<Option<Map<String, Value>>, ApiError> {
    let mut fields = Map::new();
    let thinking = match req.thinking {
        Thinking::Disabled => None,
        Thinking::Enabled { budget_tokens } => {
            Some(json!({"type": "enabled", "budget_tokens": budget_tokens}))
        }
        Thinking::Adaptive => Some(json!({"type": "adaptive"})),
    };
    if let Some(mut thinking) = thinking {
        if let Some(display) = &req.thinking_display {
            thinking["display"] = json!(display);
        }
        fields.insert("thinking".into(), thinking);
    }
    if let Some(effort) = &req.effort {
        fields.insert("output_config".into(), json!({"effort": effort}));
    }
    if let Some(max_schema) = schema.pointer("/properties/max_tokens").filter(|_| req.max_tokens > 0) {
        let floor = max_schema.get("minimum").and_then(Value::as_u64).unwrap_or(0);
        // Above the model's limit the model's limit (the client's own still cuts the answer).
        let ceiling = max_schema.get("maximum").and_then(Value::as_u64).unwrap_or(u64::MAX).max(floor);
        let max = u64::from(req.max_tokens).clamp(floor, ceiling);
        fields.insert("max_tokens".into(), json!(max));
        // A thinking budget must stay below it.
        if let Some(budget) = fields.get_mut("thinking").and_then(|t| t.get_mut("budget_tokens")) {
            if budget.as_u64().is_some_and(|b| b >= max) && max > 1 {
                *budget = json!(max - 1);
            }
        }
    }
    let mut fields = Value::Object(fields);
    if check(schema, &fields, "").is_err() && req.thinking_display.as_deref() == Some("omitted") {
        // `omitted` only says how the client shows thinking (Claude Code sends it by default);
        // a model that does not take it gets its own default. The answer still carries the
        // thinking text: a replayed block must match its signature.
        if let Some(thinking) = fields.get_mut("thinking").and_then(Value::as_object_mut) {
            thinking.remove("display");
        }
    }
    check(schema, &fields, "").map_err(|m| m.to_api(model))?;
    match fields {
        Value::Object(f) if !f.is_empty() => Ok(Some(f)),
        _ => Ok(None),
    }
}

/// Checks `value` (at `path`, dotted) against `schema`: the first mismatch.
pub fn check(schema: &Value, value: &Value, path: &str) -> Result<(), Mismatch> {
    let fail = |why| Err(Mismatch { path: path.to_string(), value: Some(value.to_string()), why });
    let schema = match schema {
        Value::Object(s) => s,
        Value::Bool(false) => return fail(Why::NotTaken),
        _ => return Ok(()),
    };
    if let Some(ty) = schema.get("type") {
        let names: Vec<String> = match ty {
            Value::String(n) => vec![n.clone()],
            Value::Array(ns) => ns.iter().filter_map(Value::as_str).map(str::to_string).collect(),
            _ => Vec::new(),
        };
        if !names.is_empty() && !names.iter().any(|n| is_type(value, n)) {
            return fail(Why::Type(names));
        }
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.iter().any(|a| same(a, value))
    {
        return fail(Why::NotOneOf(allowed.iter().map(shown).collect()));
    }
    if let Some(expected) = schema.get("const")
        && !same(expected, value)
    {
        return fail(Why::NotConst(shown(expected)));
    }
    if let Some(n) = value.as_f64() {
        let bound = |k: &str| schema.get(k).and_then(Value::as_f64);
        if let Some(b) = bound("minimum").filter(|b| n < *b) {
            return fail(Why::Below { bound: b, exclusive: false });
        }
        if let Some(b) = bound("exclusiveMinimum").filter(|b| n <= *b) {
            return fail(Why::Below { bound: b, exclusive: true });
        }
        if let Some(b) = bound("maximum").filter(|b| n > *b) {
            return fail(Why::Above { bound: b, exclusive: false });
        }
        if let Some(b) = bound("exclusiveMaximum").filter(|b| n >= *b) {
            return fail(Why::Above { bound: b, exclusive: true });
        }
    }
    if let Value::Object(members) = value {
        let at = |name: &str| if path.is_empty() { name.to_string() } else { format!("{path}.{name}") };
        for name in
            schema.get("required").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str)
        {
            if !members.contains_key(name) {
                return Err(Mismatch { path: at(name), value: None, why: Why::Required });
            }
        }
        let properties = schema.get("properties").and_then(Value::as_object);
        for (name, member) in members {
            if let Some(member_schema) =
                properties.and_then(|p| p.get(name)).or_else(|| schema.get("additionalProperties"))
            {
                check(member_schema, member, &at(name))?;
            }
        }
    }
    Ok(())
}

/// JSON Schema equality: `1024` and `1024.0` are the same number.
fn same(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

fn is_type(value: &Value, name: &str) -> bool {
    match name {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "boolean" => value.is_boolean(),
        "null" => value.is_null(),
        "number" => value.is_number(),
        "integer" => value.as_f64().is_some_and(|n| n.fract() == 0.0),
        // A type this subset does not know: the service decides.
        _ => true,
    }
}

/// What a block of an assistant turn replays as `reasoningContent`, if it can: a `thinking`
/// block with the signature the model made for its text (not one this daemon made for
/// prompt-tag thinking, which the service would refuse), or a `redacted_thinking` block, each
/// exactly as received.
pub fn replayable(block: &Block) -> Option<ReasoningContent> {
    match block {
        Block::Thinking { thinking, signature }
            if !signature.is_empty() && *signature != super::response::signature_for(thinking) =>
        {
            Some(ReasoningContent::ReasoningText { text: thinking.clone(), signature: signature.clone() })
        }
        Block::RedactedThinking { data } if !data.is_empty() => {
            Some(ReasoningContent::RedactedContent(data.clone()))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> Value {
        json!({
            "$schema": "http://json-schema.org/draft-07/schema#",
            "type": "object",
            "additionalProperties": false,
            "properties": {
                "thinking": {
                    "type": "object",
                    "additionalProperties": false,
                    "required": ["type"],
                    "properties": {
                        "type": {"type": "string", "enum": ["adaptive", "enabled"]},
                        "budget_tokens": {"type": "integer", "minimum": 1024, "maximum": 63999},
                        "display": {"type": "string", "enum": ["summarized"]}
                    }
                },
                "output_config": {
                    "type": "object",
                    "additionalProperties": false,
                    "properties": {"effort": {"type": "string", "enum": ["low", "medium", "high", "max"]}}
                },
                "max_tokens": {"type": "integer", "minimum": 1024, "maximum": 64000},
                "ratio": {"type": ["number", "null"], "exclusiveMinimum": 0, "exclusiveMaximum": 1},
                "mode": {"const": "fast"},
                "extra": {"type": "object", "additionalProperties": {"type": "string"}}
            }
        })
    }

    fn refusal(value: Value) -> String {
        check(&schema(), &value, "").expect_err(&value.to_string()).message("claude-opus-4.6")
    }

    #[test]
    fn accepts_what_the_schema_takes() {
        for ok in [
            json!({}),
            json!({"thinking": {"type": "adaptive", "display": "summarized"}, "output_config": {"effort": "max"}}),
            json!({"thinking": {"type": "enabled", "budget_tokens": 63999.0}, "max_tokens": 64000}),
            json!({"ratio": 0.5, "mode": "fast", "extra": {"a": "b"}}),
            json!({"ratio": null}),
            json!({"output_config": {}}),
        ] {
            check(&schema(), &ok, "").unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    #[test]
    fn refusals_name_the_field_the_value_and_what_the_model_takes() {
        let cases = [
            (
                json!({"output_config": {"effort": "xhigh"}}),
                r#"output_config.effort: "xhigh" is not supported by claude-opus-4.6 (supported: low, medium, high, max)"#,
            ),
            (
                json!({"max_tokens": 128000}),
                "max_tokens: 128000 is not supported by claude-opus-4.6 (at most 64000)",
            ),
            (
                json!({"thinking": {"type": "enabled", "budget_tokens": 512}}),
                "thinking.budget_tokens: 512 is not supported by claude-opus-4.6 (at least 1024)",
            ),
            (json!({"thinking": {"display": "summarized"}}), "thinking.type: required by claude-opus-4.6"),
            (json!({"temperature": 1}), "temperature: 1 is not supported by claude-opus-4.6"),
            (
                json!({"thinking": {"type": "adaptive", "x": true}}),
                "thinking.x: true is not supported by claude-opus-4.6",
            ),
            (
                json!({"max_tokens": 2048.5}),
                "max_tokens: 2048.5 is not supported by claude-opus-4.6 (expected integer)",
            ),
            (json!({"ratio": 1}), "ratio: 1 is not supported by claude-opus-4.6 (less than 1)"),
            (json!({"ratio": 0}), "ratio: 0 is not supported by claude-opus-4.6 (more than 0)"),
            (
                json!({"ratio": "x"}),
                r#"ratio: "x" is not supported by claude-opus-4.6 (expected number or null)"#,
            ),
            (
                json!({"mode": "slow"}),
                r#"mode: "slow" is not supported by claude-opus-4.6 (supported: fast)"#,
            ),
            (json!({"extra": {"a": 1}}), "extra.a: 1 is not supported by claude-opus-4.6 (expected string)"),
        ];
        for (value, message) in cases {
            assert_eq!(refusal(value), message);
        }
        let m = check(&json!(false), &json!({}), "").unwrap_err();
        assert_eq!(m.message("m"), "additionalModelRequestFields: {} is not supported by m");
    }

    #[test]
    fn only_signed_or_redacted_reasoning_is_replayable() {
        let thinking = |t: &str, s: &str| Block::Thinking { thinking: t.into(), signature: s.into() };
        assert_eq!(
            replayable(&thinking("hm", "c2ln")),
            Some(ReasoningContent::ReasoningText { text: "hm".into(), signature: "c2ln".into() })
        );
        assert_eq!(replayable(&thinking("hm", "")), None, "unsigned");
        let ours = super::super::response::signature_for("hm");
        assert_eq!(replayable(&thinking("hm", &ours)), None, "signed by this daemon for prompt-tag thinking");
        assert_eq!(
            replayable(&Block::RedactedThinking { data: "cmVk".into() }),
            Some(ReasoningContent::RedactedContent("cmVk".into()))
        );
        assert_eq!(replayable(&Block::RedactedThinking { data: String::new() }), None);
        assert_eq!(replayable(&Block::Text { text: "x".into() }), None);
    }
}
