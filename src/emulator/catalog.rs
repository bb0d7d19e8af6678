//! The model catalog `ListAvailableModels` serves: [`ModelEntry`], the late-2026
//! [`default_catalog`], the `additionalModelRequestFieldsSchema`s of the reasoning models, and the
//! JSON shape of an entry.

use serde_json::{Value, json};

/// `promptCaching` of a catalog entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PromptCaching {
    /// `supportsPromptCaching`: without it, any `cachePoint` in a request is refused.
    pub supported: bool,
    /// `maximumCacheCheckpointsPerRequest`: more `cachePoint`s in one request are refused.
    pub max_checkpoints: u32,
    /// `minimumTokensPerCacheCheckpoint` (informational).
    pub min_tokens: u32,
}

impl PromptCaching {
    /// Supported, with up to `max_checkpoints` checkpoints of at least `min_tokens` tokens.
    pub const fn supported(max_checkpoints: u32, min_tokens: u32) -> Self {
        PromptCaching { supported: true, max_checkpoints, min_tokens }
    }

    /// Not supported.
    pub const NONE: PromptCaching = PromptCaching { supported: false, max_checkpoints: 0, min_tokens: 0 };
}

/// One model of a catalog, as `ListAvailableModels` lists it and as chat calls are checked against
/// it.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelEntry {
    /// `modelId`: what chat calls send in `userInputMessage.modelId`.
    pub model_id: String,
    /// `modelName`.
    pub model_name: String,
    /// `description`.
    pub description: String,
    /// `tokenLimits.maxInputTokens`: the window `contextUsagePercentage` is computed against.
    pub max_input_tokens: u64,
    /// `tokenLimits.maxOutputTokens`.
    pub max_output_tokens: u64,
    /// `rateMultiplier`: credits a request costs relative to the base rate (scales
    /// `meteringEvent.usage`).
    pub rate_multiplier: f64,
    /// `promptCaching`.
    pub prompt_caching: PromptCaching,
    /// `additionalModelRequestFieldsSchema`: what a request's `additionalModelRequestFields` may
    /// hold; `None` means the model takes none (any field is refused).
    pub request_fields_schema: Option<Value>,
    /// `supportedInputTypes` (`TEXT`, `IMAGE`): without `IMAGE`, images are refused.
    pub supported_input_types: Vec<String>,
    /// Reasoning streams as `{"text": "..."}` and an opaque signature (the GPT models), not as
    /// readable text.
    pub opaque_reasoning: bool,
}

impl ModelEntry {
    /// A plain model: no reasoning fields, no prompt caching, text and images, rate 1.
    pub fn new(model_id: &str, max_input_tokens: u64, max_output_tokens: u64) -> Self {
        ModelEntry {
            model_id: model_id.to_owned(),
            model_name: model_id.to_owned(),
            description: format!("{model_id} (emulated)"),
            max_input_tokens,
            max_output_tokens,
            rate_multiplier: 1.0,
            prompt_caching: PromptCaching::NONE,
            request_fields_schema: None,
            supported_input_types: vec!["TEXT".to_owned(), "IMAGE".to_owned()],
            opaque_reasoning: false,
        }
    }

    /// With `additionalModelRequestFieldsSchema` = `schema`.
    pub fn with_schema(mut self, schema: Value) -> Self {
        self.request_fields_schema = Some(schema);
        self
    }

    /// Whether the model takes images.
    pub fn takes_images(&self) -> bool {
        self.supported_input_types.iter().any(|t| t == "IMAGE")
    }

    /// The entry as `ListAvailableModels` lists it.
    pub fn to_json(&self) -> Value {
        let mut entry = json!({
            "modelId": self.model_id,
            "modelName": self.model_name,
            "description": self.description,
            "tokenLimits": {
                "maxInputTokens": self.max_input_tokens,
                "maxOutputTokens": self.max_output_tokens,
            },
            "rateMultiplier": self.rate_multiplier,
            "promptCaching": {
                "supportsPromptCaching": self.prompt_caching.supported,
                "maximumCacheCheckpointsPerRequest": self.prompt_caching.max_checkpoints,
                "minimumTokensPerCacheCheckpoint": self.prompt_caching.min_tokens,
            },
            "supportedInputTypes": self.supported_input_types,
        });
        if let Some(schema) = &self.request_fields_schema {
            entry["additionalModelRequestFieldsSchema"] = schema.clone();
        }
        entry
    }
}

/// The `additionalModelRequestFieldsSchema` of a Claude reasoning model: `thinking` (`type`
/// `adaptive` | `enabled`, optional `budget_tokens` 1024..max_tokens−1, optional `display:
/// "summarized"`), `output_config.effort` (`low`, `medium`, `high`, `xhigh` when `xhigh`, `max`)
/// and `max_tokens` 1024..=`max_tokens`; nothing else (`additionalProperties: false` throughout).
pub fn claude_reasoning_schema(max_tokens: u64, xhigh: bool) -> Value {
    let mut efforts = vec!["low", "medium", "high"];
    if xhigh {
        efforts.push("xhigh");
    }
    efforts.push("max");
    reasoning_schema(max_tokens, &efforts)
}

/// The schema of a GPT model: as the Claude one, with `effort` `low` | `medium` | `high`.
pub fn gpt_reasoning_schema(max_tokens: u64) -> Value {
    reasoning_schema(max_tokens, &["low", "medium", "high"])
}

fn reasoning_schema(max_tokens: u64, efforts: &[&str]) -> Value {
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
                    "budget_tokens": {"type": "integer", "minimum": 1024, "maximum": max_tokens.saturating_sub(1)},
                    "display": {"type": "string", "enum": ["summarized"]}
                }
            },
            "output_config": {
                "type": "object",
                "additionalProperties": false,
                "properties": {"effort": {"type": "string", "enum": efforts}}
            },
            "max_tokens": {"type": "integer", "minimum": 1024, "maximum": max_tokens}
        }
    })
}

/// Thousands of tokens.
const K: u64 = 1_000;
/// A million tokens.
const M: u64 = 1_000_000;

/// The catalog every account has unless [`Emulator::set_catalog`](super::Emulator::set_catalog)
/// gave it another: the late-2026 ids (PROTOCOL.md §5) plus the two older ids the daemon's
/// built-in model map still sends. The first entry, `claude-sonnet-4.5`, is the `defaultModel`
/// (the model of a chat call without `modelId`).
///
/// | modelId | maxInputTokens | maxOutputTokens | rate | schema |
/// |---|---|---|---|---|
/// | `claude-sonnet-4.5` | 200,000 | 64,000 | 1.3 | none |
/// | `claude-sonnet-4.5-1m` | 1,000,000 | 64,000 | 2.2 | none |
/// | `claude-haiku-4.5` | 200,000 | 64,000 | 0.4 | none |
/// | `claude-opus-4.5` | 200,000 | 64,000 | 2.2 | none |
/// | `claude-sonnet-4.6` | 1,000,000 | 64,000 | 1.3 | Claude, no `xhigh`, `max_tokens` ≤ 64,000 |
/// | `claude-opus-4.6` | 1,000,000 | 64,000 | 2.2 | Claude, no `xhigh`, ≤ 64,000 |
/// | `claude-opus-4.7` | 1,000,000 | 64,000 | 2.2 | Claude with `xhigh`, ≤ 64,000 |
/// | `claude-opus-4.8` | 1,000,000 | 128,000 | 2.2 | Claude with `xhigh`, ≤ 128,000 |
/// | `claude-opus-5` | 1,000,000 | 128,000 | 2.5 | Claude with `xhigh`, ≤ 128,000 |
/// | `claude-sonnet-5` | 1,000,000 | 128,000 | 1.5 | Claude with `xhigh`, ≤ 128,000 |
/// | `claude-fable-5` | 1,000,000 | 128,000 | 1.5 | Claude with `xhigh`, ≤ 128,000 |
/// | `gpt-5.6-sol` / `-terra` / `-luna` | 400,000 | 128,000 | 1.0 / 0.5 / 0.25 | GPT (opaque reasoning) |
/// | `deepseek-3.2` | 128,000 | 32,000 | 0.25 | none, text only |
/// | `glm-5` | 200,000 | 32,000 | 0.25 | none, text only |
/// | `qwen3-coder-next` | 256,000 | 64,000 | 0.2 | none, text only |
/// | `auto` | 200,000 | 64,000 | 1.0 | none |
/// | `claude-sonnet-4`, `claude-3.7-sonnet` (legacy) | 200,000 | 64,000 | 1.3 | none |
///
/// Claude models support prompt caching (4 checkpoints of at least 1,024 tokens; 2,048 for
/// Haiku); the others do not.
pub fn default_catalog() -> Vec<ModelEntry> {
    let claude = |id: &str, name: &str, input: u64, output: u64, rate: f64| {
        let mut entry = ModelEntry::new(id, input, output);
        entry.model_name = name.to_owned();
        entry.description = format!("{name}, emulated");
        entry.rate_multiplier = rate;
        entry.prompt_caching = PromptCaching::supported(4, 1024);
        entry
    };
    let reasoning = |entry: ModelEntry, xhigh: bool| {
        let max = entry.max_output_tokens;
        entry.with_schema(claude_reasoning_schema(max, xhigh))
    };
    let other = |id: &str, name: &str, input: u64, output: u64, rate: f64, images: bool| {
        let mut entry = ModelEntry::new(id, input, output);
        entry.model_name = name.to_owned();
        entry.description = format!("{name}, emulated");
        entry.rate_multiplier = rate;
        if !images {
            entry.supported_input_types = vec!["TEXT".to_owned()];
        }
        entry
    };
    let gpt = |id: &str, name: &str, rate: f64| {
        let mut entry =
            other(id, name, 400 * K, 128 * K, rate, true).with_schema(gpt_reasoning_schema(128 * K));
        entry.opaque_reasoning = true;
        entry
    };
    let mut haiku = claude("claude-haiku-4.5", "Claude Haiku 4.5", 200 * K, 64 * K, 0.4);
    haiku.prompt_caching = PromptCaching::supported(4, 2048);
    vec![
        claude("claude-sonnet-4.5", "Claude Sonnet 4.5", 200 * K, 64 * K, 1.3),
        claude("claude-sonnet-4.5-1m", "Claude Sonnet 4.5 (1M context)", M, 64 * K, 2.2),
        haiku,
        claude("claude-opus-4.5", "Claude Opus 4.5", 200 * K, 64 * K, 2.2),
        reasoning(claude("claude-sonnet-4.6", "Claude Sonnet 4.6", M, 64 * K, 1.3), false),
        reasoning(claude("claude-opus-4.6", "Claude Opus 4.6", M, 64 * K, 2.2), false),
        reasoning(claude("claude-opus-4.7", "Claude Opus 4.7", M, 64 * K, 2.2), true),
        reasoning(claude("claude-opus-4.8", "Claude Opus 4.8", M, 128 * K, 2.2), true),
        reasoning(claude("claude-opus-5", "Claude Opus 5", M, 128 * K, 2.5), true),
        reasoning(claude("claude-sonnet-5", "Claude Sonnet 5", M, 128 * K, 1.5), true),
        reasoning(claude("claude-fable-5", "Claude Fable 5", M, 128 * K, 1.5), true),
        gpt("gpt-5.6-sol", "GPT-5.6 Sol", 1.0),
        gpt("gpt-5.6-terra", "GPT-5.6 Terra", 0.5),
        gpt("gpt-5.6-luna", "GPT-5.6 Luna", 0.25),
        other("deepseek-3.2", "DeepSeek 3.2", 128 * K, 32 * K, 0.25, false),
        other("glm-5", "GLM-5", 200 * K, 32 * K, 0.25, false),
        other("qwen3-coder-next", "Qwen3 Coder Next", 256 * K, 64 * K, 0.2, false),
        other("auto", "Auto", 200 * K, 64 * K, 1.0, true),
        claude("claude-sonnet-4", "Claude Sonnet 4", 200 * K, 64 * K, 1.3),
        claude("claude-3.7-sonnet", "Claude Sonnet 3.7", 200 * K, 64 * K, 1.3),
    ]
}

/// Only the non-Claude models of the default catalog (what a China-registered account or a
/// flagged egress address gets), `auto` first.
pub fn non_claude_catalog() -> Vec<ModelEntry> {
    let mut models: Vec<ModelEntry> =
        default_catalog().into_iter().filter(|m| !m.model_id.starts_with("claude-")).collect();
    models.sort_by_key(|m| m.model_id != "auto");
    models
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulator::schema::check;

    fn entry(id: &str) -> ModelEntry {
        default_catalog().into_iter().find(|m| m.model_id == id).unwrap_or_else(|| panic!("{id}"))
    }

    #[test]
    fn the_daemon_s_built_in_ids_are_listed() {
        let ids: Vec<String> = default_catalog().into_iter().map(|m| m.model_id).collect();
        for id in [
            "claude-opus-4.5",
            "claude-sonnet-4.5",
            "claude-haiku-4.5",
            "claude-sonnet-4",
            "claude-3.7-sonnet",
        ] {
            assert!(ids.iter().any(|i| i == id), "{id}");
        }
        let unique: std::collections::HashSet<&String> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len(), "ids are unique");
    }

    #[test]
    fn schemas_follow_the_protocol() {
        let effort = |id: &str, e: &str| {
            let schema = entry(id).request_fields_schema.expect("a schema");
            check(&schema, &json!({"output_config": {"effort": e}}), "").is_ok()
        };
        assert!(effort("claude-opus-4.7", "xhigh") && effort("claude-sonnet-5", "xhigh"));
        assert!(effort("claude-fable-5", "xhigh") && effort("claude-opus-4.8", "max"));
        assert!(!effort("claude-opus-4.6", "xhigh") && !effort("claude-sonnet-4.6", "xhigh"));
        assert!(entry("claude-sonnet-4.5").request_fields_schema.is_none());
        assert!(entry("claude-haiku-4.5").request_fields_schema.is_none());
        let max = |id: &str, n: u64| {
            check(&entry(id).request_fields_schema.unwrap(), &json!({"max_tokens": n}), "").is_ok()
        };
        assert!(max("claude-opus-4.8", 128_000) && !max("claude-opus-4.8", 128_001));
        assert!(max("claude-opus-4.6", 64_000) && !max("claude-opus-4.6", 64_001));
        assert!(!max("claude-sonnet-5", 1023));
        assert_eq!(entry("claude-opus-4.8").max_input_tokens, 1_000_000);
        assert_eq!(entry("claude-opus-4.5").max_input_tokens, 200_000);
    }

    #[test]
    fn entries_render_every_member() {
        let json = entry("claude-opus-4.8").to_json();
        for member in [
            "modelId",
            "modelName",
            "description",
            "tokenLimits",
            "rateMultiplier",
            "promptCaching",
            "additionalModelRequestFieldsSchema",
            "supportedInputTypes",
        ] {
            assert!(json.get(member).is_some(), "{member}: {json}");
        }
        assert_eq!(json["additionalModelRequestFieldsSchema"]["additionalProperties"], false);
        assert!(entry("claude-sonnet-4.5").to_json().get("additionalModelRequestFieldsSchema").is_none());
        assert!(non_claude_catalog().iter().all(|m| !m.model_id.starts_with("claude")));
        assert_eq!(non_claude_catalog()[0].model_id, "auto");
    }
}
