//! The model map: Claude model names → Amazon Q `modelId`s (built-in table plus `[models]`),
//! and the model list served at `/v1/models`.

use crate::anthropic::{ApiError, ErrorKind};

/// A model the daemon lists at `/v1/models`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    pub id: String,
    pub display_name: String,
    /// RFC 3339.
    pub created_at: String,
}

/// Built-in prefixes (longest match wins) and the Claude ids listed by `/v1/models`.
const BUILTIN: &[(&str, &str)] = &[
    ("claude-opus-4-5", "claude-opus-4.5"),
    ("claude-sonnet-4-5", "claude-sonnet-4.5"),
    ("claude-haiku-4-5", "claude-haiku-4.5"),
    ("claude-sonnet-4", "claude-sonnet-4"),
    ("claude-3-7-sonnet", "claude-3.7-sonnet"),
];

const LISTED: &[(&str, &str, &str)] = &[
    ("claude-opus-4-5-20251101", "Claude Opus 4.5", "2025-11-24T00:00:00Z"),
    ("claude-haiku-4-5-20251001", "Claude Haiku 4.5", "2025-10-15T00:00:00Z"),
    ("claude-sonnet-4-5-20250929", "Claude Sonnet 4.5", "2025-09-29T00:00:00Z"),
    ("claude-sonnet-4-20250514", "Claude Sonnet 4", "2025-05-22T00:00:00Z"),
    ("claude-3-7-sonnet-20250219", "Claude Sonnet 3.7", "2025-02-24T00:00:00Z"),
];

/// What translation needs to know about the model a request goes to, from the live catalog
/// (`ListAvailableModels`); `None` fields are unknown (no catalog yet), and today's defaults apply.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelCaps {
    /// `tokenLimits.maxInputTokens`: the context window.
    pub max_input_tokens: Option<u64>,
    /// `tokenLimits.maxOutputTokens`: a larger `max_tokens` is a 400.
    pub max_output_tokens: Option<u64>,
    /// `additionalModelRequestFieldsSchema`: when present, the model takes native reasoning
    /// (`thinking`, `output_config.effort`, `max_tokens`) in `additionalModelRequestFields`,
    /// validated against this schema; when absent (the 4.5 family), thinking is asked for with
    /// prompt tags.
    pub request_fields_schema: Option<serde_json::Value>,
    /// `promptCaching.maximumCacheCheckpointsPerRequest` when the model supports caching (0: it
    /// does not).
    pub max_cache_checkpoints: u32,
    /// The model takes no images (`supportedInputTypes` without `IMAGE`).
    pub text_only: bool,
}

#[derive(Debug, Clone)]
pub struct ModelMap {
    /// (prefix, Amazon Q id), longest prefix first: the built-in table and the operator's.
    entries: Vec<(String, String)>,
    /// The operator's `[models]` prefixes (they win over the live catalog too).
    overrides: Vec<(String, String)>,
    fallback: Option<String>,
}

impl Default for ModelMap {
    fn default() -> Self {
        ModelMap::new(&[])
    }
}

impl ModelMap {
    /// The built-in table with `overrides` (from `[models]`) on top; `"*"` is the fallback.
    pub fn new(overrides: &[(String, String)]) -> Self {
        let mut entries: Vec<(String, String)> =
            BUILTIN.iter().map(|(p, q)| (p.to_string(), q.to_string())).collect();
        let mut fallback = None;
        let mut own = Vec::new();
        for (prefix, target) in overrides {
            if prefix == "*" {
                fallback = Some(target.clone());
                continue;
            }
            entries.retain(|(p, _)| p != prefix);
            entries.push((prefix.clone(), target.clone()));
            own.push((prefix.to_ascii_lowercase(), target.clone()));
        }
        entries.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0)));
        own.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0)));
        ModelMap { entries, overrides: own, fallback }
    }

    /// The service model for a client's model name, with the live catalog: the operator's
    /// `[models]` prefixes first; then, once any account has a catalog, what some account offers
    /// (404 `not_found_error` naming the model when none does, unless `"*"` names a fallback);
    /// before that, the built-in table.
    pub fn resolve_live(&self, claude_name: &str, live: &super::Catalog) -> Result<String, ApiError> {
        if live.is_empty() {
            return self.resolve(claude_name);
        }
        let name = claude_name.trim().to_ascii_lowercase();
        if let Some((_, q)) = self.overrides.iter().find(|(p, _)| name.starts_with(p.as_str())) {
            return Ok(q.clone());
        }
        live.resolve(&name).or_else(|| self.fallback.clone()).ok_or_else(|| {
            ApiError::new(
                ErrorKind::NotFound,
                format!("model: {} (no account offers it)", claude_name.escape_debug()),
            )
        })
    }

    /// What `/v1/models` lists with the live catalog: what the accounts offer under
    /// Claude-style ids (and `[1m]` ids), plus the operator's prefixes; the built-in list
    /// before any account has a catalog.
    pub fn list_live(&self, live: &super::Catalog) -> Vec<ModelInfo> {
        if live.is_empty() {
            return self.list();
        }
        let out: Vec<ModelInfo> = live
            .listing()
            .into_iter()
            .map(|l| ModelInfo {
                created_at: LISTED
                    .iter()
                    .find(|(id, _, _)| super::catalog::normalise(id).0 == l.id)
                    .map(|(_, _, at)| at.to_string())
                    .unwrap_or_else(|| "2026-01-01T00:00:00Z".into()),
                id: l.id,
                display_name: l.display_name,
            })
            .collect();
        with_prefixes(out, &self.overrides)
    }

    /// The Amazon Q model for a Claude model name, or 404 `not_found_error` as Anthropic answers.
    pub fn resolve(&self, claude_name: &str) -> Result<String, ApiError> {
        let name = claude_name.trim().to_ascii_lowercase();
        // `[1m]` asks for the model's 1M window; without a catalog, the model itself.
        let name = name.strip_suffix("[1m]").map(str::to_owned).unwrap_or(name);
        let plausible = !name.is_empty()
            && name.len() <= 128
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:@/".contains(&b));
        if !plausible {
            return Err(ApiError::new(ErrorKind::NotFound, format!("model: {}", claude_name.escape_debug())));
        }
        // The operator's prefixes win.
        if let Some((_, q)) = self.overrides.iter().find(|(p, _)| name.starts_with(p.as_str())) {
            return Ok(q.clone());
        }
        // A model newer than any of its family here (the table is from 2025; the catalog knows
        // the rest once an account has fetched it): the service's id for it, rather than an older
        // model answering under the client's name (`claude-sonnet-4-6` starts with the table's
        // `claude-sonnet-4`). The service says so if it has no such model.
        if let Some((id, family, version)) = derived_id(&name) {
            let best = self.entries.iter().filter_map(|(_, q)| service_version(q, family)).max();
            if best.is_none_or(|best| version > best) {
                return Ok(id);
            }
        }
        if let Some((_, q)) = self.entries.iter().find(|(p, _)| name.starts_with(p.as_str())) {
            return Ok(q.clone());
        }
        for family in ["opus", "sonnet", "haiku"] {
            if name.contains(family) {
                if let Some(best) =
                    self.entries.iter().map(|(_, q)| q).filter(|q| q.contains(family)).max_by(|a, b| {
                        version_key(a).partial_cmp(&version_key(b)).unwrap_or(std::cmp::Ordering::Equal)
                    })
                {
                    return Ok(best.clone());
                }
            }
        }
        self.fallback
            .clone()
            .ok_or_else(|| ApiError::new(ErrorKind::NotFound, format!("model: {claude_name}")))
    }

    /// The models `/v1/models` lists: every built-in id this map can serve, and each
    /// configured prefix that names no listed model.
    pub fn list(&self) -> Vec<ModelInfo> {
        let out: Vec<ModelInfo> = LISTED
            .iter()
            .filter(|(id, _, _)| self.resolve(id).is_ok())
            .map(|(id, name, at)| ModelInfo {
                id: id.to_string(),
                display_name: name.to_string(),
                created_at: at.to_string(),
            })
            .collect();
        with_prefixes(out, &self.entries)
    }
}

/// `claude-{family}-{major}[-{minor}][-{date}]` as the service names it
/// (`claude-{family}-{major}[.{minor}]`), with the family and the version.
fn derived_id(name: &str) -> Option<(String, &'static str, (u32, u32))> {
    let mut parts = name.split('-');
    if parts.next()? != "claude" {
        return None;
    }
    let named = parts.next()?;
    let family = ["opus", "sonnet", "haiku", "fable"].into_iter().find(|f| *f == named)?;
    let small = |p: &str| !p.is_empty() && p.len() <= 2 && p.bytes().all(|b| b.is_ascii_digit());
    let major = parts.next().filter(|p| small(p))?;
    let rest: Vec<&str> = parts.collect();
    let (minor, tail) = match rest.as_slice() {
        [m, tail @ ..] if small(m) => (Some(*m), tail),
        tail => (None, tail),
    };
    // Nothing after the version but a date.
    if !tail.iter().all(|p| p.len() == 8 && p.bytes().all(|b| b.is_ascii_digit())) || tail.len() > 1 {
        return None;
    }
    let id = match minor {
        Some(m) => format!("claude-{family}-{major}.{m}"),
        None => format!("claude-{family}-{major}"),
    };
    let number = |p: &str| p.parse::<u32>().ok();
    let version = (number(major)?, minor.map_or(Some(0), number)?);
    Some((id, family, version))
}

/// The (major, minor) version of a service id of `family` (`claude-opus-4.5`, `claude-sonnet-5`),
/// compared as numbers (4.10 is after 4.9).
fn service_version(q: &str, family: &str) -> Option<(u32, u32)> {
    let v = q.strip_prefix("claude-")?.strip_prefix(family)?.strip_prefix('-')?;
    let (major, minor) = v.split_once('.').unwrap_or((v, "0"));
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// Sort key for "newest": the numeric parts of a model id.
fn version_key(id: &str) -> f64 {
    let digits: String = id.chars().filter(|c| c.is_ascii_digit() || *c == '.').collect();
    digits.trim_matches('.').parse().unwrap_or(0.0)
}

/// `out` and each configured prefix that names no model in it.
fn with_prefixes(mut out: Vec<ModelInfo>, prefixes: &[(String, String)]) -> Vec<ModelInfo> {
    for (prefix, q) in prefixes {
        if !out.iter().any(|m| m.id.starts_with(prefix.as_str())) {
            out.push(ModelInfo {
                id: prefix.clone(),
                display_name: format!("{prefix} (Amazon Q {q})"),
                created_at: "2025-01-01T00:00:00Z".into(),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_names() {
        let m = ModelMap::default();
        assert_eq!(m.resolve("claude-sonnet-4-5-20250929").unwrap(), "claude-sonnet-4.5");
        assert_eq!(m.resolve("claude-sonnet-4-20250514").unwrap(), "claude-sonnet-4");
        assert_eq!(m.resolve("claude-haiku-4-5").unwrap(), "claude-haiku-4.5");
        assert_eq!(m.resolve("claude-opus-4-1-20250805").unwrap(), "claude-opus-4.5");
        // Newer than the table knows (no catalog yet): the service's id, not an older model.
        assert_eq!(m.resolve("claude-opus-4-8").unwrap(), "claude-opus-4.8");
        assert_eq!(m.resolve("claude-opus-4-8[1m]").unwrap(), "claude-opus-4.8");
        assert_eq!(m.resolve("claude-sonnet-5").unwrap(), "claude-sonnet-5");
        assert_eq!(m.resolve("claude-sonnet-4-6-20260217").unwrap(), "claude-sonnet-4.6");
        assert_eq!(m.resolve("claude-fable-5").unwrap(), "claude-fable-5");
        assert_eq!(m.resolve("claude-sonnet-4-5[1m]").unwrap(), "claude-sonnet-4.5");
        // Versions compare as numbers: 4.10 is newer than the table's 4.5.
        assert_eq!(m.resolve("claude-opus-4-10").unwrap(), "claude-opus-4.10");
        assert_eq!(m.resolve("claude-3-5-haiku-latest").unwrap(), "claude-haiku-4.5");
        let e = m.resolve("gpt-4").unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotFound);
        let m = ModelMap::new(&[
            ("*".into(), "claude-sonnet-4.5".into()),
            ("claude-sonnet-4-5".into(), "x.y".into()),
        ]);
        assert_eq!(m.resolve("gpt-4").unwrap(), "claude-sonnet-4.5");
        assert_eq!(m.resolve("claude-sonnet-4-5-20250929").unwrap(), "x.y");
        assert!(!m.list().is_empty());
    }
}
