//! `ListAvailableModels`: what models an account may use, with their token limits, reasoning
//! schema and caching support (PROTOCOL.md §5 "Model catalog"). Parsed tolerantly: unknown
//! members are ignored, a model without an id is skipped.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};

/// `X-Amz-Target` of the catalog call on the Kiro management endpoint.
pub const MODELS_TARGET: &str = "KiroControlPlaneBearerService.ListAvailableModels";

/// One model of an account's catalog.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CatalogModel {
    /// What chat calls send as `modelId`.
    pub model_id: String,
    pub model_name: Option<String>,
    pub max_input_tokens: Option<u64>,
    pub max_output_tokens: Option<u64>,
    pub rate_multiplier: Option<f64>,
    /// `maximumCacheCheckpointsPerRequest` when the model supports prompt caching.
    pub cache_checkpoints: Option<u32>,
    /// `additionalModelRequestFieldsSchema`.
    pub request_fields_schema: Option<Value>,
    /// `supportedInputTypes` names no `IMAGE`: the model refuses a request holding an image
    /// (a record stored before this field reads as false).
    #[serde(default)]
    pub text_only: bool,
}

/// The models of a catalog, by `modelId`.
pub type Models = BTreeMap<String, CatalogModel>;

/// Catalogs in use, each held once: accounts of one kind nearly always offer the same models
/// (with their request-field schemas, a few kilobytes of JSON each), and 1,000 accounts held
/// 1,000 copies of it (80 MiB of the daemon's idle memory).
static IN_USE: Mutex<Vec<Weak<Models>>> = Mutex::new(Vec::new());

/// The shared copy of `models`: one already in use that is equal, else this one.
fn shared(models: Models) -> Arc<Models> {
    let mut in_use = IN_USE.lock().unwrap_or_else(|e| e.into_inner());
    in_use.retain(|w| w.strong_count() > 0);
    if let Some(found) = in_use.iter().filter_map(Weak::upgrade).find(|m| **m == models) {
        return found;
    }
    let new = Arc::new(models);
    in_use.push(Arc::downgrade(&new));
    new
}

/// The shared copy of the catalog `models` make (see [`Models`]).
pub fn share(models: Vec<CatalogModel>) -> Arc<Models> {
    shared(models.into_iter().map(|m| (m.model_id.clone(), m)).collect())
}

/// One page of the answer.
#[derive(Debug, Default)]
pub struct Page {
    pub models: Vec<CatalogModel>,
    pub next_token: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WirePage {
    #[serde(default)]
    models: Vec<Value>,
    next_token: Option<String>,
}

/// Parses one page; a page that is not the catalog's shape is an error (with what was wrong).
pub fn parse_page(body: &[u8]) -> Result<Page, String> {
    let page: WirePage =
        serde_json::from_slice(body).map_err(|e| format!("malformed ListAvailableModels answer: {e}"))?;
    let models = page
        .models
        .iter()
        .filter_map(|m| {
            let id = m.get("modelId")?.as_str()?.trim();
            if id.is_empty() || id.len() > 128 {
                return None;
            }
            let limits = m.get("tokenLimits");
            let limit = |k: &str| limits.and_then(|l| l.get(k)).and_then(Value::as_u64);
            let caching = m.get("promptCaching");
            let cache_checkpoints = caching
                .filter(|c| c.get("supportsPromptCaching").and_then(Value::as_bool) == Some(true))
                .and_then(|c| c.get("maximumCacheCheckpointsPerRequest"))
                .and_then(Value::as_u64)
                .map(|n| n.min(u32::MAX as u64) as u32);
            Some(CatalogModel {
                model_id: id.to_owned(),
                model_name: m.get("modelName").and_then(Value::as_str).map(str::to_owned),
                max_input_tokens: limit("maxInputTokens"),
                max_output_tokens: limit("maxOutputTokens"),
                rate_multiplier: m.get("rateMultiplier").and_then(Value::as_f64),
                cache_checkpoints,
                request_fields_schema: m
                    .get("additionalModelRequestFieldsSchema")
                    .filter(|s| s.is_object())
                    .cloned(),
                text_only: m.get("supportedInputTypes").and_then(Value::as_array).is_some_and(|types| {
                    !types.iter().any(|t| t.as_str().is_some_and(|t| t.eq_ignore_ascii_case("IMAGE")))
                }),
            })
        })
        .collect();
    Ok(Page { models, next_token: page.next_token.filter(|t| !t.is_empty()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_parse_tolerantly() {
        let body = br#"{"models":[
            {"modelId":"claude-opus-4.8","modelName":"Claude Opus 4.8","tokenLimits":{"maxInputTokens":1000000,"maxOutputTokens":128000},
             "rateMultiplier":2.2,"promptCaching":{"supportsPromptCaching":true,"maximumCacheCheckpointsPerRequest":4},
             "additionalModelRequestFieldsSchema":{"type":"object"},"futureField":1},
            {"modelName":"no id"},
            {"modelId":"gpt-5.6-sol","promptCaching":{"supportsPromptCaching":false,"maximumCacheCheckpointsPerRequest":4}}
        ],"defaultModel":{"modelId":"claude-opus-4.8"},"nextToken":"t2"}"#;
        let p = parse_page(body).unwrap();
        assert_eq!(p.models.len(), 2);
        assert_eq!(p.models[0].max_input_tokens, Some(1_000_000));
        assert_eq!(p.models[0].cache_checkpoints, Some(4));
        assert!(p.models[0].request_fields_schema.is_some());
        assert_eq!(p.models[1].cache_checkpoints, None, "caching not supported");
        assert_eq!(p.next_token.as_deref(), Some("t2"));
        assert!(parse_page(b"[]").is_err());
    }
}
