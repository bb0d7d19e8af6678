//! Golden tests for the Claude → Amazon Q request translation.
//!
//! Every `tests/fixtures/claude/<name>.json` is a Messages API request body (sent with
//! `anthropic-version: 2023-06-01` to `/v1/messages`); `tests/fixtures/q/<name>.json` is the
//! `GenerateAssistantResponse` body it must translate to, with `profileArn` set to [`PROFILE_ARN`]
//! and the conversation id (random or derived from the session) replaced by `"CONVERSATION_ID"`.
//! Each translated body must also pass the emulator's strict Amazon Q rules
//! (`amq2api::emulator::validate_request`).
//!
//! Every case is translated as the catalog would have it: the model map knows the 2026 ids
//! ([`models`]) and the translation gets the [`ModelCaps`] of the emulator's default catalog entry
//! for the model. For a model with an `additionalModelRequestFieldsSchema` (the `native_*` cases)
//! the body carries `additionalModelRequestFields`, which must pass the emulator's schema checker
//! too; for any other model the body must be exactly what it is without a catalog.
//!
//! To regenerate the goldens after an intended change of the translation:
//!
//! ```text
//! UPDATE_GOLDEN=1 cargo nextest run --test it -E 'test(/^translate::/)'
//! ```
//!
//! The test then writes `tests/fixtures/q/*.json` instead of comparing. Review the diff by hand
//! against PROTOCOL.md §2 before committing it: a golden file is only worth what its review was.
//!
//! The invalid requests are a table at the end of this file: each must fail with 400
//! `invalid_request_error` and a message that starts with the offending field path.

use amq2api::anthropic::request::{ApiVersion, Endpoint, parse_value};
use amq2api::anthropic::{ApiError, ErrorKind};
use amq2api::emulator::{default_catalog, validate_request};
use amq2api::translate::request::{Context, to_json, translate, valid_q_name};
use amq2api::translate::{ModelCaps, ModelMap};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

const PROFILE_ARN: &str = "arn:aws:codewhisperer:us-east-1:123456789012:profile/GOLDENPROFILE1";
const CONVERSATION_ID: &str = "CONVERSATION_ID";

/// Every case that must exist (a missing fixture file is a failure, not a silent skip).
const CASES: &[&str] = &[
    "plain",
    "multi_turn",
    "system_string",
    "system_blocks",
    "system_messages",
    "system_message_last",
    "starts_with_assistant",
    "tools_and_results",
    "tool_errors",
    "tool_choice",
    "retired_tool",
    "images",
    "images_merged_turns",
    "documents",
    "thinking_enabled",
    "thinking_adaptive",
    "prefill",
    "long_tool_names",
    "oversized_description",
    "server_tools",
    "claude_code",
    "claude_code_followup",
    "native_adaptive_effort",
    "native_enabled_budget",
    "native_effort_only",
    "native_replay",
];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn run(body: &Value, version: ApiVersion) -> Result<Value, ApiError> {
    let req = parse_value(body, version, Endpoint::Messages)?;
    let models = ModelMap::default();
    let t = translate(&req, &Context { models: &models, session_id: None, caps: None, catalog: None })?;
    Ok(to_json(&t, Some(PROFILE_ARN)))
}

/// The model map with the 2026 ids (as `[models]` in amq2api.toml would give it).
fn models() -> ModelMap {
    ModelMap::new(&[
        ("claude-opus-4-6".into(), "claude-opus-4.6".into()),
        ("claude-opus-4-7".into(), "claude-opus-4.7".into()),
        ("claude-opus-4-8".into(), "claude-opus-4.8".into()),
        ("claude-sonnet-4-6".into(), "claude-sonnet-4.6".into()),
    ])
}

/// What the catalog says of an Amazon Q model: the emulator's default catalog entry.
fn caps_of(q_model: &str) -> Option<ModelCaps> {
    default_catalog().into_iter().find(|m| m.model_id == q_model).map(|m| ModelCaps {
        max_input_tokens: Some(m.max_input_tokens),
        // The output limit is the daemon's own check (tests/it/messages.rs); these tests are about
        // what reaches the service, so the schema alone speaks for max_tokens here.
        max_output_tokens: None,
        request_fields_schema: m.request_fields_schema.clone(),
        max_cache_checkpoints: m.prompt_caching.max_checkpoints,
        text_only: !m.takes_images(),
    })
}

/// `body` translated for its model with the catalog's capabilities, and without a catalog.
fn run_with_caps(body: &Value) -> (Result<Value, ApiError>, Result<Value, ApiError>, Option<ModelCaps>) {
    let models = models();
    let translate_with = |caps: Option<&ModelCaps>| {
        let req = parse_value(body, ApiVersion::V2023_06_01, Endpoint::Messages)?;
        let t = translate(&req, &Context { models: &models, session_id: None, caps, catalog: None })?;
        Ok(to_json(&t, Some(PROFILE_ARN)))
    };
    let caps = body["model"].as_str().and_then(|m| models.resolve(m).ok()).and_then(|q| caps_of(&q));
    (translate_with(caps.as_ref()), translate_with(None), caps)
}

/// `v` without its `cachePoint` members.
fn strip_cache_points(v: &mut Value) {
    match v {
        Value::Object(map) => {
            map.remove("cachePoint");
            map.values_mut().for_each(strip_cache_points);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_cache_points),
        _ => {}
    }
}

/// The translated body of a fixture, checked by the emulator, with the conversation id normalised.
fn translated(name: &str) -> Value {
    let claude = read_json(&fixtures().join(format!("claude/{name}.json")));
    let (with_caps, without, caps) = run_with_caps(&claude);
    let mut q = with_caps.unwrap_or_else(|e| panic!("{name}: {e}"));
    if let Err(v) = validate_request(&q) {
        panic!("{name}: the emulator rejects the translated body: {v}");
    }
    let schema = caps.as_ref().and_then(|c| c.request_fields_schema.as_ref());
    match (schema, q.get("additionalModelRequestFields")) {
        (Some(schema), Some(fields)) => {
            amq2api::emulator::schema::check(schema, fields, "additionalModelRequestFields")
                .unwrap_or_else(|e| panic!("{name}: the model's schema refuses the fields: {e}"));
        }
        (Some(_), None) => {}
        (None, fields) => {
            assert_eq!(fields, None, "{name}: fields for a model without a schema");
            let mut without = without.unwrap_or_else(|e| panic!("{name} without a catalog: {e}"));
            without["conversationState"]["conversationId"] = q["conversationState"]["conversationId"].clone();
            // Cache points come from the catalog's caching flag, not from the schema.
            let mut with = q.clone();
            strip_cache_points(&mut with);
            assert_eq!(with, without, "{name}: a model without a schema translates as without a catalog");
        }
    }
    let id = &mut q["conversationState"]["conversationId"];
    let len = id.as_str().map(str::len);
    assert_eq!(len, Some(36), "{name}: the conversation id is a UUID: {id}");
    *id = json!(CONVERSATION_ID);
    q
}

/// The first place where two JSON values differ, as a path and both sides.
fn first_difference(path: &str, actual: &Value, expected: &Value) -> Option<String> {
    match (actual, expected) {
        (Value::Object(a), Value::Object(e)) => {
            for (k, ev) in e {
                match a.get(k) {
                    None => return Some(format!("{path}.{k}: missing (expected {})", short(ev))),
                    Some(av) => {
                        if let Some(d) = first_difference(&format!("{path}.{k}"), av, ev) {
                            return Some(d);
                        }
                    }
                }
            }
            a.iter()
                .find(|(k, _)| !e.contains_key(*k))
                .map(|(k, av)| format!("{path}.{k}: unexpected {}", short(av)))
        }
        (Value::Array(a), Value::Array(e)) => {
            for (i, (av, ev)) in a.iter().zip(e).enumerate() {
                if let Some(d) = first_difference(&format!("{path}[{i}]"), av, ev) {
                    return Some(d);
                }
            }
            (a.len() != e.len()).then(|| format!("{path}: {} items, expected {}", a.len(), e.len()))
        }
        _ if actual == expected => None,
        _ => Some(format!("{path}:\n  actual:   {}\n  expected: {}", short(actual), short(expected))),
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 600 { format!("{}…", s.chars().take(600).collect::<String>()) } else { s }
}

#[test]
fn golden_translations() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| !v.is_empty() && v != "0");
    let mut on_disk: Vec<String> = std::fs::read_dir(fixtures().join("claude"))
        .expect("tests/fixtures/claude")
        .filter_map(|e| {
            let p = e.ok()?.path();
            (p.extension()? == "json").then(|| p.file_stem()?.to_str().map(str::to_string))?
        })
        .collect();
    on_disk.sort();
    for name in CASES {
        assert!(on_disk.iter().any(|n| n == name), "missing fixture tests/fixtures/claude/{name}.json");
    }
    let mut failures = Vec::new();
    for name in &on_disk {
        let actual = translated(name);
        let golden = fixtures().join(format!("q/{name}.json"));
        if update {
            let mut text = serde_json::to_string_pretty(&actual).expect("serialise");
            text.push('\n');
            std::fs::write(&golden, text).unwrap_or_else(|e| panic!("{}: {e}", golden.display()));
            continue;
        }
        let expected = read_json(&golden);
        assert_eq!(
            expected["conversationState"]["conversationId"], CONVERSATION_ID,
            "{name}: the golden file keeps the normalised conversation id"
        );
        if let Err(v) = validate_request(&expected) {
            failures.push(format!("{name}: the golden file itself breaks an Amazon Q rule: {v}"));
        }
        if let Some(d) = first_difference("$", &actual, &expected) {
            failures.push(format!("{name}: {d}"));
        }
    }
    assert!(failures.is_empty(), "{} golden mismatch(es):\n{}", failures.len(), failures.join("\n\n"));
}

// ---------------------------------------------------------------------------------------------
// Properties the goldens must have, asserted apart so that a careless regeneration cannot bless
// a regression.

fn state(q: &Value) -> &Value {
    &q["conversationState"]
}

fn current(q: &Value) -> &Value {
    &q["conversationState"]["currentMessage"]["userInputMessage"]
}

fn history(q: &Value) -> &Vec<Value> {
    static EMPTY: Vec<Value> = Vec::new();
    q["conversationState"]["history"].as_array().unwrap_or(&EMPTY)
}

fn tool_names(q: &Value) -> Vec<String> {
    current(q)["userInputMessageContext"]["tools"]
        .as_array()
        .map(|t| t.iter().map(|t| t["toolSpecification"]["name"].as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

fn content(m: &Value) -> &str {
    m["content"].as_str().expect("content is a string")
}

#[test]
fn every_message_carries_the_mapped_model_and_origin() {
    for name in CASES {
        let q = translated(name);
        assert_eq!(state(&q)["chatTriggerType"], "MANUAL");
        assert_eq!(q["profileArn"], PROFILE_ARN);
        let users =
            history(&q).iter().filter_map(|m| m.get("userInputMessage")).chain(std::iter::once(current(&q)));
        for u in users {
            assert_eq!(u["origin"], "AI_EDITOR", "{name}");
            let model = u["modelId"].as_str().unwrap();
            assert!(model.starts_with("claude-") && !model.contains("2025"), "{name}: {model}");
        }
    }
}

#[test]
fn system_prompt_goes_first_and_late_system_messages_stay_in_place() {
    let q = translated("system_blocks");
    let c = content(current(&q));
    assert!(c.starts_with("<system>\n"), "{c}");
    assert!(c.find("Second block").unwrap() > c.find("First block").unwrap());

    let q = translated("system_messages");
    let first = content(&history(&q)[0]["userInputMessage"]);
    assert!(first.starts_with("<system>\n"), "{first}");
    assert!(
        first.contains("leading system message"),
        "a system message before the first user joins the prompt"
    );
    // The reminder sent right after the first user message stays in that turn.
    assert!(
        first.contains("<system-reminder>\nThe user prefers metric units.\n</system-reminder>"),
        "{first}"
    );
    let second = content(&history(&q)[2]["userInputMessage"]);
    assert!(second.starts_with("<system-reminder>\nA new file appeared"), "{second}");

    let q = translated("system_message_last");
    let c = content(current(&q));
    assert!(c.ends_with("</system-reminder>"), "the trailing system message ends the current turn: {c}");
}

#[test]
fn claude_code_request_keeps_everything_the_model_needs() {
    let claude = read_json(&fixtures().join("claude/claude_code.json"));
    let size = serde_json::to_string(&claude).unwrap().len();
    assert!((30_000..=50_000).contains(&size), "the recorded request is about 30–50 KB: {size}");
    let tools = claude["tools"].as_array().unwrap();
    assert_eq!(tools.len(), 12);
    let long = tools.iter().map(|t| t["name"].as_str().unwrap()).find(|n| n.len() > 64).expect("a long name");

    let q = translated("claude_code");
    assert!(history(&q).is_empty());
    let names = tool_names(&q);
    assert_eq!(names.len(), 12);
    assert!(names.iter().all(|n| valid_q_name(n)), "{names:?}");
    assert!(!names.iter().any(|n| n == long));
    let alias = names.iter().find(|n| n.starts_with("mcp__")).unwrap();
    for t in current(&q)["userInputMessageContext"]["tools"].as_array().unwrap() {
        let schema = &t["toolSpecification"]["inputSchema"]["json"];
        assert!(schema.get("$schema").is_none());
        assert_eq!(schema["type"], "object");
    }
    let c = content(current(&q));
    assert!(c.starts_with(
        "<thinking_mode>enabled</thinking_mode><max_thinking_length>32000</max_thinking_length>"
    ));
    for block in claude["system"].as_array().unwrap() {
        assert!(c.contains(block["text"].as_str().unwrap()), "every system block reaches the model");
    }
    let late = claude["messages"].as_array().unwrap().last().unwrap();
    assert_eq!(late["role"], "system");
    assert!(
        c.ends_with(&format!("<system-reminder>\n{}\n</system-reminder>", late["content"].as_str().unwrap()))
    );

    let f = translated("claude_code_followup");
    assert_eq!(tool_names(&f), names, "the follow-up sends the same tools under the same names");
    let h = history(&f);
    assert_eq!(h.len(), 2);
    // The system message that followed the first user message did not move to the new turn.
    assert!(content(&h[0]["userInputMessage"]).ends_with("</system-reminder>"));
    assert!(!content(current(&f)).contains("<system-reminder>\nThe user"));
    let uses = h[1]["assistantResponseMessage"]["toolUses"].as_array().unwrap();
    assert!(uses.iter().any(|u| u["name"] == alias.as_str()), "the long-named call uses the alias");
    let results = current(&f)["userInputMessageContext"]["toolResults"].as_array().unwrap();
    assert_eq!(results.len(), uses.len());
    for (u, r) in uses.iter().zip(results) {
        assert_eq!(u["toolUseId"], r["toolUseId"]);
    }
}

#[test]
fn long_tool_names_are_aliased_consistently() {
    let q = translated("long_tool_names");
    let names = tool_names(&q);
    assert!(names.iter().all(|n| valid_q_name(n)), "{names:?}");
    for m in history(&q) {
        for u in m["assistantResponseMessage"]["toolUses"].as_array().into_iter().flatten() {
            assert!(names.contains(&u["name"].as_str().unwrap().to_string()), "{u}");
            assert!(valid_q_name(u["toolUseId"].as_str().unwrap()), "{u}");
        }
    }
    let c = content(current(&q));
    assert_eq!(names.iter().filter(|n| n.len() == 64).count(), 2, "two aliases of 64 chars: {names:?}");
    let alias = names.iter().find(|n| n.starts_with("mcp__corporate-knowledge-base__fetch_")).unwrap();
    assert!(c.contains(&format!("You must call the tool `{alias}`")), "tool_choice names the alias: {c}");
}

#[test]
fn oversized_description_is_cut_but_kept_whole_in_the_system_prompt() {
    let claude = read_json(&fixtures().join("claude/oversized_description.json"));
    let full = claude["tools"][0]["description"].as_str().unwrap();
    assert!(full.chars().count() > 10_240);
    let q = translated("oversized_description");
    let d = current(&q)["userInputMessageContext"]["tools"][0]["toolSpecification"]["description"]
        .as_str()
        .unwrap();
    assert!(d.chars().count() <= 10_240);
    assert!(content(current(&q)).contains(full));
}

#[test]
fn merged_user_turns_hold_at_most_ten_images() {
    let q = translated("images_merged_turns");
    let images = current(&q)["images"].as_array().unwrap();
    assert_eq!(images.len(), 10);
    assert!(content(current(&q)).contains("[2 older image(s) omitted"));
}

#[test]
fn native_reasoning_goes_in_fields_never_in_prompt_tags() {
    for name in ["native_adaptive_effort", "native_enabled_budget", "native_effort_only", "native_replay"] {
        let q = translated(name);
        let everything = q.to_string();
        for tag in ["<thinking_mode>", "<max_thinking_length>", "<thinking>"] {
            assert!(!everything.contains(tag), "{name}: {tag} in {everything}");
        }
        let claude = read_json(&fixtures().join(format!("claude/{name}.json")));
        let fields = &q["additionalModelRequestFields"];
        assert_eq!(fields["output_config"]["effort"], claude["output_config"]["effort"], "{name}");
        match claude["thinking"]["type"].as_str() {
            Some("disabled") | None => assert!(fields.get("thinking").is_none(), "{name}: {fields}"),
            Some(kind) => assert_eq!(fields["thinking"]["type"], kind, "{name}"),
        }
        // max_tokens: the client's, or the schema's minimum (1024) when lower.
        let asked = claude["max_tokens"].as_u64().unwrap();
        assert_eq!(fields["max_tokens"], asked.max(1024), "{name}");
    }
}

#[test]
fn replay_sends_each_turns_first_reasoning_the_model_signed() {
    let claude = read_json(&fixtures().join("claude/native_replay.json"));
    let q = translated("native_replay");
    let reasoning: Vec<&Value> = history(&q)
        .iter()
        .filter_map(|m| m.get("assistantResponseMessage"))
        .map(|a| &a["reasoningContent"])
        .collect();
    let block = |message: usize, block: usize| &claude["messages"][message]["content"][block];
    assert_eq!(
        reasoning,
        [
            // The thinking block exactly as received.
            &json!({"reasoningText": {"text": block(1, 0)["thinking"], "signature": block(1, 0)["signature"]}}),
            &json!({"redactedContent": block(3, 0)["data"]}),
            // Of three blocks: not the one this daemon signed for prompt-tag thinking, the first
            // of the model's, not both.
            &json!({"reasoningText": {"text": block(5, 1)["thinking"], "signature": block(5, 1)["signature"]}}),
            // Unsigned thinking has nothing to replay.
            &Value::Null,
        ]
    );
}

/// A request for a model whose schema does not take a value is refused before anything is sent,
/// naming the field, the value and what the model takes.
#[test]
fn native_values_a_model_does_not_take_are_refused_naming_the_field() {
    let ask = |model: &str, extra: Value| {
        let mut b =
            json!({"model": model, "max_tokens": 64000, "messages": [{"role": "user", "content": "Hi"}]});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        let (with_caps, without, caps) = run_with_caps(&b);
        assert!(caps.is_some_and(|c| c.request_fields_schema.is_some()), "{model} reasons natively");
        assert!(without.is_ok(), "without a catalog the request goes through: {b}");
        with_caps
    };
    let message = r#"output_config.effort: "xhigh" is not supported by claude-opus-4.6 (supported: low, medium, high, max)"#;
    let e = ask("claude-opus-4-6", json!({"output_config": {"effort": "xhigh"}})).expect_err(message);
    assert_eq!((e.kind, e.message.as_str()), (ErrorKind::InvalidRequest, message));
    // What the models do take goes through.
    ask("claude-opus-4-7", json!({"output_config": {"effort": "xhigh"}, "thinking": {"type": "adaptive"}}))
        .unwrap();
    // A `max_tokens` above the model's limit is the model's limit upstream (clients choose it by
    // Anthropic's limits: Claude Code's non-streaming fallback asks for 64,000 whatever the
    // model), and a thinking budget stays below it.
    let q = ask("claude-sonnet-4-6", json!({"max_tokens": 128000})).unwrap();
    assert_eq!(q["additionalModelRequestFields"]["max_tokens"], 64000);
    let q = ask(
        "claude-opus-4-8",
        json!({"max_tokens": 200000, "thinking": {"type": "enabled", "budget_tokens": 150000}}),
    )
    .unwrap();
    assert_eq!(q["additionalModelRequestFields"]["max_tokens"], 128000);
    assert_eq!(q["additionalModelRequestFields"]["thinking"]["budget_tokens"], 127999);
    // `display: "omitted"` (Claude Code's default) is how the client shows thinking: a model that
    // does not take it gets the request without it, never a 400; one it does take is kept.
    let q = ask("claude-opus-4-7", json!({"thinking": {"type": "adaptive", "display": "omitted"}})).unwrap();
    assert_eq!(q["additionalModelRequestFields"]["thinking"], json!({"type": "adaptive"}));
    let q =
        ask("claude-opus-4-7", json!({"thinking": {"type": "adaptive", "display": "summarized"}})).unwrap();
    assert_eq!(
        q["additionalModelRequestFields"]["thinking"],
        json!({"type": "adaptive", "display": "summarized"})
    );
    let e =
        ask("claude-opus-4-7", json!({"thinking": {"type": "adaptive", "display": "verbose"}})).unwrap_err();
    assert_eq!(
        e.message,
        r#"thinking.display: "verbose" is not supported by claude-opus-4.7 (supported: summarized)"#
    );
    ask(
        "claude-opus-4-8",
        json!({"max_tokens": 128000, "thinking": {"type": "enabled", "budget_tokens": 127999}}),
    )
    .unwrap();
}

// ---------------------------------------------------------------------------------------------
// Invalid requests: 400 invalid_request_error, the message starting with the field path.

fn user(content: Value) -> Value {
    json!({"role": "user", "content": content})
}

fn body(messages: Value) -> Value {
    json!({"model": "claude-sonnet-4-5-20250929", "max_tokens": 1024, "messages": messages})
}

fn with(mut base: Value, key: &str, v: Value) -> Value {
    base[key] = v;
    base
}

fn without(mut base: Value, key: &str) -> Value {
    base.as_object_mut().unwrap().remove(key);
    base
}

fn invalid_cases() -> Vec<(&'static str, ApiVersion, Value, &'static str)> {
    use ApiVersion::{V2023_06_01 as V1, V2026_10_21 as V2};
    let hi = json!([{"role": "user", "content": "Hi"}]);
    let ok = body(hi.clone());
    let weather = json!([{"name": "get_weather", "description": "Weather for a city.",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]);
    let call = json!({"role": "assistant", "content": [
        {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Oslo"}}]});
    vec![
        // Required fields.
        ("missing model", V1, without(ok.clone(), "model"), "model: Field required"),
        (
            "empty model",
            V1,
            with(ok.clone(), "model", json!("")),
            "model: String should have at least 1 character",
        ),
        ("missing messages", V1, without(ok.clone(), "messages"), "messages: Field required"),
        ("missing max_tokens", V1, without(ok.clone(), "max_tokens"), "max_tokens: Field required"),
        (
            "zero max_tokens",
            V1,
            with(ok.clone(), "max_tokens", json!(0)),
            "max_tokens: Input should be greater than or equal to 1",
        ),
        (
            "negative max_tokens",
            V1,
            with(ok.clone(), "max_tokens", json!(-5)),
            "max_tokens: Input should be greater than or equal to 0",
        ),
        ("empty messages", V1, body(json!([])), "messages: At least one message is required"),
        // Roles.
        (
            "bad role",
            V1,
            body(json!([{"role": "human", "content": "Hi"}])),
            "messages.0.role: Input should be 'user', 'assistant' or 'system'",
        ),
        (
            "bad role later",
            V1,
            body(json!([user(json!("Hi")), {"role": "tool", "content": "x"}])),
            "messages.1.role: Input should be",
        ),
        ("missing role", V1, body(json!([{"content": "Hi"}])), "messages.0.role: Field required"),
        (
            "no user message",
            V1,
            body(json!([{"role": "assistant", "content": "Hello"}])),
            "messages: At least one message with role 'user' is required",
        ),
        ("missing content", V1, body(json!([{"role": "user"}])), "messages.0.content: Field required"),
        // Tool uses and results.
        (
            "tool_result without tool_use",
            V1,
            with(
                body(json!([user(json!("Hi")), {"role": "assistant", "content": "Hello"},
            user(json!([{"type": "tool_result", "tool_use_id": "toolu_99", "content": "x"}]))])),
                "tools",
                weather.clone(),
            ),
            "messages.2.content.0.tool_use_id: unexpected `tool_use_id` found in `tool_result` blocks: toolu_99",
        ),
        (
            "tool_result answering a later tool_use",
            V1,
            with(
                body(json!([
                    user(json!([{"type": "tool_result", "tool_use_id": "toolu_01", "content": "x"}])),
                    call.clone(),
                    user(json!("go on"))
                ])),
                "tools",
                weather.clone(),
            ),
            "messages.0.content.0.tool_use_id: unexpected `tool_use_id`",
        ),
        (
            "tool_use left unanswered",
            V1,
            with(
                body(json!([user(json!("Hi")), call.clone(), user(json!("never mind"))])),
                "tools",
                weather.clone(),
            ),
            "messages.1: `tool_use` ids were found without `tool_result` blocks immediately after: toolu_01. \
             Each `tool_use` block must have a corresponding `tool_result` block in the next message.",
        ),
        (
            "parallel tool uses answered in part",
            V1,
            with(
                body(json!([
                    user(json!("Weather in Oslo and Rome?")),
                    {"role": "assistant", "content": [
                        {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Oslo"}},
                        {"type": "tool_use", "id": "toolu_02", "name": "get_weather", "input": {"city": "Rome"}}]},
                    user(json!([{"type": "tool_result", "tool_use_id": "toolu_01", "content": "cold"}])),
                    {"role": "assistant", "content": "Oslo is cold."},
                    user(json!("and Rome?"))
                ])),
                "tools",
                weather.clone(),
            ),
            "messages.1: `tool_use` ids were found without `tool_result` blocks immediately after: toolu_02.",
        ),
        (
            "tool use answered only in a later turn",
            V1,
            with(
                body(json!([
                    user(json!("Hi")),
                    call.clone(),
                    user(json!("wait")),
                    {"role": "assistant", "content": "ok"},
                    user(json!([{"type": "tool_result", "tool_use_id": "toolu_01", "content": "x"}]))
                ])),
                "tools",
                weather.clone(),
            ),
            "messages.1: `tool_use` ids were found without `tool_result` blocks",
        ),
        (
            "tool_use in a user message",
            V1,
            body(json!([user(
                json!([{"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {}}])
            )])),
            "messages.0.content.0.type: `tool_use` blocks are only allowed in assistant messages",
        ),
        (
            "tool_result in an assistant message",
            V1,
            body(json!([user(json!("Hi")), {"role": "assistant", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_01", "content": "x"}]}])),
            "messages.1.content.0.type: `tool_result` blocks are only allowed in user messages",
        ),
        (
            "final tool_use without its result",
            V1,
            with(body(json!([user(json!("Weather in Oslo?")), call.clone()])), "tools", weather.clone()),
            "messages: the final assistant message may not contain tool_use blocks",
        ),
        (
            "tool_use without id",
            V1,
            body(json!([user(json!("Hi")), {"role": "assistant", "content": [
            {"type": "tool_use", "name": "get_weather", "input": {}}]}, user(json!("x"))])),
            "messages.1.content.0.id: Field required",
        ),
        // Thinking.
        (
            "thinking budget equal to max_tokens",
            V1,
            with(ok.clone(), "thinking", json!({"type": "enabled", "budget_tokens": 1024})),
            "thinking.budget_tokens: `max_tokens` must be greater than `thinking.budget_tokens`",
        ),
        (
            "thinking budget above max_tokens",
            V1,
            with(
                with(ok.clone(), "max_tokens", json!(2000)),
                "thinking",
                json!({"type": "enabled", "budget_tokens": 4000}),
            ),
            "thinking.budget_tokens: `max_tokens` must be greater than `thinking.budget_tokens` (4000 >= 2000)",
        ),
        (
            "thinking budget under 1024",
            V1,
            with(
                with(ok.clone(), "max_tokens", json!(8000)),
                "thinking",
                json!({"type": "enabled", "budget_tokens": 512}),
            ),
            "thinking.budget_tokens: Input should be greater than or equal to 1024",
        ),
        (
            "thinking without budget",
            V1,
            with(ok.clone(), "thinking", json!({"type": "enabled"})),
            "thinking.budget_tokens: Field required",
        ),
        (
            "thinking of unknown type",
            V1,
            with(ok.clone(), "thinking", json!({"type": "sometimes"})),
            "thinking.type: Input tag 'sometimes'",
        ),
        // Media.
        (
            "bmp image",
            V1,
            body(json!([user(json!([{"type": "text", "text": "What is this?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/bmp", "data": "Qk0="}}]))])),
            "messages.0.content.1.source.media_type: Input should be 'image/jpeg', 'image/png', 'image/gif' or 'image/webp', not 'image/bmp'",
        ),
        (
            "image that is not base64",
            V1,
            body(json!([user(
                json!([{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "not base64!"}}])
            )])),
            "messages.0.content.0.source.data: The image data is not valid base64",
        ),
        (
            "html document",
            V1,
            body(json!([user(
                json!([{"type": "document", "source": {"type": "base64", "media_type": "text/html", "data": "PGI+"}}])
            )])),
            "messages.0.content.0.source.media_type: Input should be 'application/pdf', not 'text/html'",
        ),
        (
            "document in an assistant message",
            V1,
            body(json!([user(json!("Hi")), {"role": "assistant", "content": [
            {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"}}]}])),
            "messages.1.content.0.type: `document` blocks are only allowed in user messages",
        ),
        // Sampling parameters and anthropic-version.
        (
            "temperature under 2026-10-21",
            V2,
            with(ok.clone(), "temperature", json!(1.0)),
            "temperature: `temperature` is not supported in anthropic-version 2026-10-21",
        ),
        (
            "top_p under 2026-10-21",
            V2,
            with(ok.clone(), "top_p", json!(0.9)),
            "top_p: `top_p` is not supported",
        ),
        (
            "top_k under 2026-10-21",
            V2,
            with(ok.clone(), "top_k", json!(40)),
            "top_k: `top_k` is not supported",
        ),
        (
            "temperature out of range",
            V1,
            with(ok.clone(), "temperature", json!(1.5)),
            "temperature: Input should be between 0 and 1",
        ),
        (
            "top_k negative",
            V1,
            with(ok.clone(), "top_k", json!(-1)),
            "top_k: Input should be a valid integer greater than or equal to 0",
        ),
        // Wrong JSON types.
        (
            "model as a number",
            V1,
            with(ok.clone(), "model", json!(4.5)),
            "model: Input should be a valid string, not number",
        ),
        (
            "max_tokens as a string",
            V1,
            with(ok.clone(), "max_tokens", json!("1024")),
            "max_tokens: Input should be a valid integer, not string",
        ),
        (
            "max_tokens as a float",
            V1,
            with(ok.clone(), "max_tokens", json!(10.5)),
            "max_tokens: Input should be a valid integer, not the number 10.5",
        ),
        (
            "messages as an object",
            V1,
            with(ok.clone(), "messages", json!({"role": "user", "content": "Hi"})),
            "messages: Input should be a valid list, not object",
        ),
        ("message as a string", V1, body(json!(["Hi"])), "messages.0: Input should be an object, not string"),
        (
            "content as a number",
            V1,
            body(json!([user(json!(42))])),
            "messages.0.content: Input should be a valid string or a list of content blocks, not number",
        ),
        (
            "text as a list",
            V1,
            body(json!([user(json!([{"type": "text", "text": ["Hi"]}]))])),
            "messages.0.content.0.text: Input should be a valid string, not array",
        ),
        (
            "block as a string",
            V1,
            body(json!([user(json!(["Hi"]))])),
            "messages.0.content.0: Input should be an object, not string",
        ),
        (
            "stream as a string",
            V1,
            with(ok.clone(), "stream", json!("yes")),
            "stream: Input should be a valid boolean, not string",
        ),
        (
            "system as a number",
            V1,
            with(ok.clone(), "system", json!(7)),
            "system: Input should be a valid list, not number",
        ),
        (
            "system block of type image",
            V1,
            with(ok.clone(), "system", json!([{"type": "image", "text": "x"}])),
            "system.0.type: Input should be 'text', not 'image'",
        ),
        (
            "tools as an object",
            V1,
            with(ok.clone(), "tools", json!({"name": "x"})),
            "tools: Input should be a valid list, not object",
        ),
        (
            "tool without input_schema",
            V1,
            with(ok.clone(), "tools", json!([{"name": "get_weather"}])),
            "tools.0.input_schema: Field required",
        ),
        (
            "tool schema of type array",
            V1,
            with(ok.clone(), "tools", json!([{"name": "t", "input_schema": {"type": "array"}}])),
            "tools.0.input_schema.type: Input should be 'object'",
        ),
        (
            "tool name with a dot",
            V1,
            with(ok.clone(), "tools", json!([{"name": "files.read", "input_schema": {"type": "object"}}])),
            "tools.0.name: String should match pattern '^[a-zA-Z0-9_-]{1,128}$'",
        ),
        (
            "duplicate tool names",
            V1,
            with(
                ok.clone(),
                "tools",
                json!([{"name": "t", "input_schema": {}}, {"name": "t", "input_schema": {}}]),
            ),
            "tools.1.name: Tool names must be unique: 't' appears twice",
        ),
        (
            "tool_use input as a string",
            V1,
            with(
                body(json!([user(json!("Hi")), {"role": "assistant", "content": [
            {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": "{\"city\": \"Oslo\"}"}]},
            user(json!([{"type": "tool_result", "tool_use_id": "toolu_01", "content": "x"}]))])),
                "tools",
                weather.clone(),
            ),
            "messages.1.content.0.input: Input should be an object, not string",
        ),
        (
            "is_error as a string",
            V1,
            with(
                body(json!([
                    user(json!("Hi")),
                    call.clone(),
                    user(
                        json!([{"type": "tool_result", "tool_use_id": "toolu_01", "content": "x", "is_error": "true"}])
                    )
                ])),
                "tools",
                weather.clone(),
            ),
            "messages.2.content.0.is_error: Input should be a valid boolean, not string",
        ),
        (
            "tool_result content as a number",
            V1,
            with(
                body(json!([
                    user(json!("Hi")),
                    call.clone(),
                    user(json!([{"type": "tool_result", "tool_use_id": "toolu_01", "content": 3}]))
                ])),
                "tools",
                weather.clone(),
            ),
            "messages.2.content.0.content: Input should be a valid list, not number",
        ),
        (
            "tool_use inside a tool_result",
            V1,
            with(
                body(json!([
                    user(json!("Hi")),
                    call.clone(),
                    user(
                        json!([{"type": "tool_result", "tool_use_id": "toolu_01", "content": [{"type": "tool_use", "id": "x", "name": "y", "input": {}}]}])
                    )
                ])),
                "tools",
                weather.clone(),
            ),
            "messages.2.content.0.content.0.type: Input tag 'tool_use' does not match",
        ),
        (
            "metadata.user_id as a number",
            V1,
            with(ok.clone(), "metadata", json!({"user_id": 12})),
            "metadata.user_id: Input should be a valid string, not number",
        ),
        (
            "stop_sequences as a string",
            V1,
            with(ok.clone(), "stop_sequences", json!("END")),
            "stop_sequences: Input should be a valid list, not string",
        ),
        (
            "empty stop sequence",
            V1,
            with(ok.clone(), "stop_sequences", json!(["END", ""])),
            "stop_sequences.1: String should have at least 1 character",
        ),
        // Unknown block types and tool_choice.
        (
            "unknown content block type",
            V1,
            body(json!([user(json!([{"type": "text", "text": "Look"}, {"type": "video", "source": {}}]))])),
            "messages.0.content.1.type: Input tag 'video' does not match any of the expected content block tags",
        ),
        (
            "block without type",
            V1,
            body(json!([user(json!([{"text": "Hi"}]))])),
            "messages.0.content.0.type: Field required",
        ),
        (
            "tool_choice naming an unknown tool",
            V1,
            with(
                with(ok.clone(), "tools", weather.clone()),
                "tool_choice",
                json!({"type": "tool", "name": "get_time"}),
            ),
            "tool_choice.name: Tool 'get_time' not found in tools",
        ),
        (
            "tool_choice naming a tool without tools",
            V1,
            with(ok.clone(), "tool_choice", json!({"type": "tool", "name": "get_weather"})),
            "tool_choice may only be specified while providing tools.",
        ),
        (
            "tool_choice naming a tool not among the tools",
            V1,
            with(
                with(ok.clone(), "tools", json!([{"name": "get_time", "input_schema": {"type": "object"}}])),
                "tool_choice",
                json!({"type": "tool", "name": "get_weather"}),
            ),
            "tool_choice.name: Tool 'get_weather' not found in tools",
        ),
        (
            "tool_choice of unknown type",
            V1,
            with(ok.clone(), "tool_choice", json!({"type": "required"})),
            "tool_choice.type: Input tag 'required'",
        ),
        (
            "tool_choice without name",
            V1,
            with(with(ok.clone(), "tools", weather.clone()), "tool_choice", json!({"type": "tool"})),
            "tool_choice.name: Field required",
        ),
        (
            "disable_parallel_tool_use as a string",
            V1,
            with(ok.clone(), "tool_choice", json!({"type": "auto", "disable_parallel_tool_use": "yes"})),
            "tool_choice.disable_parallel_tool_use: Input should be a valid boolean",
        ),
        // Sizes.
        (
            "oversized user message",
            V1,
            body(json!([user(json!("x".repeat(600_001)))])),
            "prompt is too long: a user message has 600001 characters",
        ),
        (
            "oversized merged user turn",
            V1,
            body(json!([user(json!("a".repeat(400_000))), user(json!("b".repeat(400_000)))])),
            "prompt is too long: a user message",
        ),
        (
            "oversized system prompt",
            V1,
            with(ok.clone(), "system", json!("s".repeat(700_000))),
            "prompt is too long: a user message",
        ),
        (
            "oversized tool result",
            V1,
            with(
                body(json!([
                    user(json!("Read it")),
                    call.clone(),
                    user(
                        json!([{"type": "tool_result", "tool_use_id": "toolu_01", "content": "r".repeat(800_001)}])
                    )
                ])),
                "tools",
                weather.clone(),
            ),
            "prompt is too long: a tool result has 800001 characters",
        ),
    ]
}

#[test]
fn invalid_requests_are_refused_with_the_field_path() {
    let mut failures = Vec::new();
    let cases = invalid_cases();
    assert!(cases.len() >= 60);
    for (name, version, body, prefix) in cases {
        match run(&body, version) {
            Ok(q) => failures.push(format!("{name}: accepted, translated to {}", short(&q))),
            Err(e) => {
                let ok = e.kind == ErrorKind::InvalidRequest
                    && e.status().as_u16() == 400
                    && e.body("req_test")["error"]["type"] == "invalid_request_error"
                    && e.message.starts_with(prefix);
                if !ok {
                    failures.push(format!(
                        "{name}: got {} {} {:?}, expected 400 invalid_request_error starting with {prefix:?}",
                        e.status().as_u16(),
                        e.kind.as_str(),
                        e.message
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} case(s) failed:\n{}", failures.len(), failures.join("\n"));
}

/// The same bodies are fine once the offending part is fixed: the table tests what it says.
#[test]
fn the_invalid_table_differs_from_valid_requests_only_where_it_says() {
    let weather = json!([{"name": "get_weather", "description": "Weather for a city.",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]);
    let valid = [
        body(json!([{"role": "user", "content": "Hi"}])),
        with(body(json!([{"role": "user", "content": "Hi"}])), "temperature", json!(1.0)),
        with(
            with(body(json!([{"role": "user", "content": "Hi"}])), "max_tokens", json!(2000)),
            "thinking",
            json!({"type": "enabled", "budget_tokens": 1999}),
        ),
        with(
            with(body(json!([{"role": "user", "content": "Hi"}])), "tools", weather),
            "tool_choice",
            json!({"type": "tool", "name": "get_weather"}),
        ),
        body(json!([{"role": "user", "content": "x".repeat(600_000)}])),
    ];
    for (i, b) in valid.iter().enumerate() {
        let q = run(b, ApiVersion::V2023_06_01).unwrap_or_else(|e| panic!("valid[{i}]: {e}"));
        validate_request(&q).unwrap_or_else(|v| panic!("valid[{i}]: {v}"));
    }
}

/// A one-pixel PNG image block.
fn png_image() -> Value {
    let png =
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==";
    json!({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}})
}

/// User messages with no text and no tool results (an image-only follow-up, a blank text block)
/// are sent with a short text: Amazon Q refuses them blank ("Improperly formed request").
#[test]
fn blank_user_messages_are_sent_with_a_text() {
    let image = png_image();
    let cases = [
        json!([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": [image]}]),
        json!([{"role": "user", "content": [{"type": "text", "text": ""}]}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Go on"}]),
        json!([{"role": "user", "content": " \n"}]),
    ];
    for (i, messages) in cases.into_iter().enumerate() {
        let q = run(&body(messages), ApiVersion::V2023_06_01).unwrap_or_else(|e| panic!("case {i}: {e}"));
        validate_request(&q).unwrap_or_else(|v| panic!("case {i}: {v}"));
    }
}

/// Twelve tool results of one image each: Amazon Q takes ten images, the two oldest are dropped,
/// and the results that held them say so ("attached" before, and the model paired the ten left
/// with the wrong results); the note on dropped images comes before the reply's prefill line,
/// which stays last.
#[test]
fn tool_results_whose_images_are_dropped_say_so() {
    let image = png_image();
    let uses: Vec<Value> = (0..12)
        .map(
            |i| json!({"type": "tool_use", "id": format!("toolu_{i:02}"), "name": "screenshot", "input": {}}),
        )
        .collect();
    let results: Vec<Value> = (0..12)
        .map(|i| {
            json!({"type": "tool_result", "tool_use_id": format!("toolu_{i:02}"),
                "content": [{"type": "text", "text": format!("screen {i}")}, image]})
        })
        .collect();
    let mut req = body(json!([
        {"role": "user", "content": "Take the screenshots"},
        {"role": "assistant", "content": uses},
        {"role": "user", "content": results},
        {"role": "assistant", "content": "The glitch is in screen"}
    ]));
    req["tools"] = json!([{"name": "screenshot", "input_schema": {"type": "object"}}]);
    let q = run(&req, ApiVersion::V2023_06_01).unwrap();
    validate_request(&q).unwrap_or_else(|v| panic!("{v}"));
    let cur = current(&q);
    assert_eq!(cur["images"].as_array().unwrap().len(), 10);
    let results = cur["userInputMessageContext"]["toolResults"].as_array().unwrap();
    assert_eq!(results.len(), 12);
    for (i, r) in results.iter().enumerate() {
        let texts: Vec<&str> =
            r["content"].as_array().unwrap().iter().filter_map(|c| c["text"].as_str()).collect();
        assert_eq!(texts[0], format!("screen {i}"));
        let expected = if i < 2 { "omitted" } else { "attached" };
        assert!(texts[1].contains(expected), "result {i}: {texts:?}");
    }
    let c = content(cur);
    let note = c.find("[2 older image(s) omitted").unwrap_or_else(|| panic!("{c}"));
    let prefill = c.find("Begin your reply with exactly").unwrap_or_else(|| panic!("{c}"));
    assert!(note < prefill, "{c}");
    assert!(c.trim_end().ends_with("The glitch is in screen"), "{c}");
}
