//! The live model catalog: what the enabled accounts offer (the union of their
//! `ListAvailableModels`), the Claude-style ids clients use for the service's model ids
//! (`claude-opus-4.8` ↔ `claude-opus-4-8`, `[1m]` for 1M windows), and what `/v1/models` lists.

use super::ModelCaps;
use crate::upstream::catalog::CatalogModel;
use std::collections::{BTreeMap, BTreeSet};

/// A window this large or more is listed a second time with a `[1m]` suffix (Claude Code picks
/// a 1M window only for an id ending in `[1m]`).
pub const ONE_MILLION: u64 = 1_000_000;

/// The Claude-style id of a service model id: `claude-opus-4.8` → `claude-opus-4-8`; a model
/// of another family keeps its own id (`gpt-5.6-sol`, `deepseek-3.2`).
pub fn claude_id(q_model: &str) -> String {
    if q_model.starts_with("claude-") { q_model.replace('.', "-") } else { q_model.to_owned() }
}

/// Whether [`claude_id`] of `q_model` is `id`, without building it (every request resolves its
/// model against every catalog entry).
fn claude_id_is(q_model: &str, id: &str) -> bool {
    if q_model.starts_with("claude-") {
        q_model.len() == id.len()
            && q_model.bytes().zip(id.bytes()).all(|(q, i)| if q == b'.' { i == b'-' } else { q == i })
    } else {
        q_model == id
    }
}

/// A client's model name, normalised: lower case, a `[1m]` suffix taken off (returned as a
/// flag), an Anthropic date suffix (`-20250929`) dropped.
pub fn normalise(name: &str) -> (String, bool) {
    let mut n = name.trim().to_ascii_lowercase();
    let one_m = n.ends_with("[1m]");
    if one_m {
        n.truncate(n.len() - "[1m]".len());
    }
    if let Some((base, date)) = n.rsplit_once('-') {
        if date.len() == 8 && date.bytes().all(|b| b.is_ascii_digit()) {
            n = base.to_owned();
        }
    }
    (n, one_m)
}

/// What the enabled accounts offer, by `modelId` (the first account's entry for each): the
/// live catalog requests are resolved and routed by, and `/v1/models` lists.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    models: BTreeMap<String, CatalogModel>,
}

/// A model `/v1/models` lists.
#[derive(Debug, Clone, PartialEq)]
pub struct Listed {
    /// The Claude-style id (with `[1m]` for the 1M listing).
    pub id: String,
    pub display_name: String,
    pub q_model: String,
}

impl Catalog {
    /// The union of accounts' offers: (models by id, models the account refused).
    pub fn from_offers<'a>(
        offers: impl IntoIterator<Item = (&'a BTreeMap<String, CatalogModel>, &'a BTreeSet<String>)>,
    ) -> Catalog {
        let mut models = BTreeMap::new();
        for (offered, dropped) in offers {
            for (id, m) in offered {
                if !dropped.contains(id) {
                    models.entry(id.clone()).or_insert_with(|| m.clone());
                }
            }
        }
        Catalog { models }
    }

    /// No account has a catalog yet: the built-in model table applies.
    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }

    pub fn get(&self, q_model: &str) -> Option<&CatalogModel> {
        self.models.get(q_model)
    }

    /// What translation needs to know of `q_model`.
    pub fn caps(&self, q_model: &str) -> Option<ModelCaps> {
        self.models.get(q_model).map(|m| ModelCaps {
            max_input_tokens: m.max_input_tokens,
            max_output_tokens: m.max_output_tokens,
            request_fields_schema: m.request_fields_schema.clone(),
            max_cache_checkpoints: m.cache_checkpoints.unwrap_or(0),
            text_only: m.text_only,
        })
    }

    /// The service model a client's name means, when some account offers one: its own id
    /// (`gpt-5.6-sol`), or the Claude-style id of a Claude model (`claude-opus-4-8`, with a date
    /// suffix or not). With `[1m]`, the model's 1M variant (`claude-sonnet-4.5-1m`) when there
    /// is one, else the model itself when its window is 1M.
    pub fn resolve(&self, name: &str) -> Option<String> {
        let (base, one_m) = normalise(name);
        let matches = |q: &str| q == base || claude_id_is(q, &base);
        if one_m {
            if let Some(q) = self.models.keys().find(|q| q.strip_suffix("-1m").is_some_and(matches)) {
                return Some(q.clone());
            }
        }
        self.models.keys().find(|q| matches(q)).cloned()
    }

    /// What `/v1/models` lists: each model under its Claude-style id, plus a `[1m]` id for each
    /// model whose window is 1M or more (a `…-1m` variant is listed as its base's `[1m]`).
    pub fn listing(&self) -> Vec<Listed> {
        let mut out: Vec<Listed> = Vec::new();
        for (q, m) in &self.models {
            let name = m.model_name.clone().unwrap_or_else(|| q.clone());
            let big = m.max_input_tokens.is_some_and(|t| t >= ONE_MILLION);
            match q.strip_suffix("-1m") {
                Some(base) if big => {
                    out.push(Listed {
                        id: format!("{}[1m]", claude_id(base)),
                        display_name: name,
                        q_model: q.clone(),
                    });
                }
                _ => {
                    out.push(Listed { id: claude_id(q), display_name: name.clone(), q_model: q.clone() });
                    if big && !self.models.contains_key(&format!("{q}-1m")) {
                        out.push(Listed {
                            id: format!("{}[1m]", claude_id(q)),
                            display_name: format!("{name} (1M context)"),
                            q_model: q.clone(),
                        });
                    }
                }
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out.dedup_by(|a, b| a.id == b.id);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(id: &str, input: u64) -> CatalogModel {
        CatalogModel {
            model_id: id.into(),
            model_name: Some(format!("Name of {id}")),
            max_input_tokens: Some(input),
            max_output_tokens: Some(64_000),
            rate_multiplier: None,
            cache_checkpoints: None,
            request_fields_schema: None,
            text_only: false,
        }
    }

    fn union(ids: &[(&str, u64)]) -> Catalog {
        let models: BTreeMap<String, CatalogModel> =
            ids.iter().map(|(id, w)| (id.to_string(), model(id, *w))).collect();
        Catalog::from_offers([(&models, &BTreeSet::new())])
    }

    #[test]
    fn claude_ids_and_names() {
        assert_eq!(claude_id("claude-opus-4.8"), "claude-opus-4-8");
        assert_eq!(claude_id("gpt-5.6-sol"), "gpt-5.6-sol");
        assert_eq!(normalise("Claude-Sonnet-4-5-20250929"), ("claude-sonnet-4-5".into(), false));
        assert_eq!(normalise("claude-opus-4-8[1m]"), ("claude-opus-4-8".into(), true));
        for (q, id) in [
            ("claude-opus-4.8", "claude-opus-4-8"),
            ("claude-opus-4.8", "claude-opus-4.8"),
            ("claude-opus-4.8", "claude-opus-4-9"),
            ("claude-opus-4.8", "claude-opus-4-8x"),
            ("gpt-5.6-sol", "gpt-5.6-sol"),
            ("gpt-5.6-sol", "gpt-5-6-sol"),
        ] {
            assert_eq!(claude_id_is(q, id), claude_id(q) == id, "{q} {id}");
        }
    }

    #[test]
    fn names_resolve_to_what_some_account_offers() {
        let u = union(&[
            ("claude-opus-4.8", 1_000_000),
            ("claude-sonnet-4.5", 200_000),
            ("claude-sonnet-4.5-1m", 1_000_000),
            ("gpt-5.6-sol", 400_000),
        ]);
        assert_eq!(u.resolve("claude-opus-4-8").as_deref(), Some("claude-opus-4.8"));
        assert_eq!(u.resolve("claude-opus-4-8[1m]").as_deref(), Some("claude-opus-4.8"));
        assert_eq!(u.resolve("claude-sonnet-4-5-20250929").as_deref(), Some("claude-sonnet-4.5"));
        assert_eq!(u.resolve("claude-sonnet-4-5[1m]").as_deref(), Some("claude-sonnet-4.5-1m"));
        assert_eq!(u.resolve("gpt-5.6-sol").as_deref(), Some("gpt-5.6-sol"));
        assert_eq!(u.resolve("claude-opus-5"), None);
        let ids: Vec<String> = u.listing().into_iter().map(|l| l.id).collect();
        assert_eq!(
            ids,
            [
                "claude-opus-4-8",
                "claude-opus-4-8[1m]",
                "claude-sonnet-4-5",
                "claude-sonnet-4-5[1m]",
                "gpt-5.6-sol"
            ]
        );
    }
}
