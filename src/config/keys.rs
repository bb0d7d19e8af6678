//! `keys.toml` (named by `[auth] keys_file`): named client keys with limits, parsed and validated
//! (every problem with line and column, as for the accounts file).

use super::diag::{Diagnostics, Reporter};
use super::secret::{Secret, parse_api_key_entry};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use toml::Spanned;

/// One named key, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct KeySpec {
    /// `[a-z0-9_.-]{1,64}`: what logs, usage and metrics show (never the key).
    pub name: String,
    /// SHA-256 of the key.
    pub digest: [u8; 32],
    pub enabled: bool,
    /// At most this many requests start in any 60 s.
    pub rpm: Option<NonZeroU32>,
    /// At most this many requests in flight (streams included).
    pub max_concurrency: Option<NonZeroU32>,
    /// Input + output tokens per UTC day.
    pub tokens_per_day: Option<u64>,
    /// Upstream credits per UTC calendar month.
    pub credits_per_month: Option<f64>,
    /// Globs over Claude model ids (`*`, `?`); empty: every model.
    pub models: Vec<String>,
    pub expires: Option<SystemTime>,
}

impl KeySpec {
    /// Whether `model` is one this key may use.
    pub fn allows_model(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|g| glob_match(g.as_bytes(), model.as_bytes()))
    }
}

/// The named keys of one valid file, in file order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeySet {
    pub keys: Vec<KeySpec>,
}

impl KeySet {
    pub fn names(&self) -> Vec<&str> {
        self.keys.iter().map(|k| k.name.as_str()).collect()
    }

    /// What changed from `self` to `new` ("added a; removed b; changed c", "no changes").
    pub fn diff(&self, new: &KeySet) -> String {
        let mut parts = Vec::new();
        for k in &new.keys {
            match self.keys.iter().find(|o| o.name == k.name) {
                None => parts.push(format!("added key {}", k.name)),
                Some(o) if o != k => parts.push(format!("changed key {}", k.name)),
                Some(_) => {}
            }
        }
        for o in &self.keys {
            if !new.keys.iter().any(|k| k.name == o.name) {
                parts.push(format!("removed key {}", o.name));
            }
        }
        if parts.is_empty() { "no changes".into() } else { parts.join("; ") }
    }
}

/// `*` (any run) and `?` (one character) over bytes; everything else literal.
pub fn glob_match(pat: &[u8], s: &[u8]) -> bool {
    let (mut p, mut i) = (0, 0);
    let mut back: Option<(usize, usize)> = None;
    while i < s.len() {
        if p < pat.len() && (pat[p] == b'?' || pat[p] == s[i]) {
            p += 1;
            i += 1;
        } else if p < pat.len() && pat[p] == b'*' {
            back = Some((p, i));
            p += 1;
        } else if let Some((bp, bi)) = back {
            p = bp + 1;
            i = bi + 1;
            back = Some((bp, bi + 1));
        } else {
            return false;
        }
    }
    pat[p..].iter().all(|&c| c == b'*')
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    key: Vec<Spanned<RawKey>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    name: Option<Spanned<String>>,
    key: Option<Spanned<Secret>>,
    enabled: Option<bool>,
    rpm: Option<Spanned<i64>>,
    max_concurrency: Option<Spanned<i64>>,
    tokens_per_day: Option<Spanned<i64>>,
    credits_per_month: Option<Spanned<f64>>,
    models: Option<Vec<Spanned<String>>>,
    expires: Option<Spanned<toml::Value>>,
}

/// Checks a key name: `[a-z0-9_.-]{1,64}`.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b))
        // At least one letter or digit: `-` is the usage label of unnamed keys, and a key
        // called that would be charged with (and budgeted on) all their traffic.
        && s.bytes().any(|b| b.is_ascii_alphanumeric())
}

/// Parses and validates the text of a keys file: every problem with its place; the set only
/// when there is none.
pub fn parse(path: &Path, source: &str) -> Result<(KeySet, Diagnostics), Diagnostics> {
    let mut rep = Reporter::new(path, source);
    let Some(raw) = super::shape::deserialize::<RawFile>(&mut rep, source) else {
        return Err(rep.out);
    };
    let mut names: BTreeMap<String, usize> = BTreeMap::new();
    let mut digests: BTreeMap<[u8; 32], usize> = BTreeMap::new();
    let mut keys = Vec::new();
    for (index, entry) in raw.key.iter().enumerate() {
        let span = entry.span();
        let k = entry.get_ref();
        let mut ok = true;
        let name = match &k.name {
            None => {
                rep.error_at(
                    Some(span.clone()),
                    format!("key #{}: missing `name` (expected [a-z0-9_.-]{{1,64}})", index + 1),
                );
                ok = false;
                format!("key #{}", index + 1)
            }
            Some(n) if !valid_name(n.get_ref()) => {
                rep.error_at(
                    Some(n.span()),
                    format!(
                        "key name {:?} must be 1 to 64 of lowercase letters, digits, '_', '.' and '-', with a letter or digit",
                        n.get_ref()
                    ),
                );
                ok = false;
                format!("key {:?}", n.get_ref())
            }
            Some(n) => {
                if let Some(&first) = names.get(n.get_ref()) {
                    let (l, c) = rep.position(first);
                    rep.error_at(
                        Some(n.span()),
                        format!(
                            "duplicate key name {:?} (first defined at line {l}, column {c})",
                            n.get_ref()
                        ),
                    );
                    ok = false;
                } else {
                    names.insert(n.get_ref().clone(), n.span().start);
                }
                n.get_ref().clone()
            }
        };
        let shown = if k.name.is_some() { format!("key {name:?}") } else { name.clone() };
        let digest = match &k.key {
            None => {
                rep.error_at(
                    Some(span.clone()),
                    format!("{shown}: missing `key` (the key itself, or \"sha256:<64 hex digits>\")"),
                );
                None
            }
            Some(v) => {
                match parse_api_key_entry(v.get_ref().expose()) {
                    Ok(d) => {
                        if let Some(&first) = digests.get(&d) {
                            let (l, c) = rep.position(first);
                            rep.error_at(
                            Some(v.span()),
                            format!("{shown}: duplicate key (the same key as the entry at line {l}, column {c})"),
                        );
                            None
                        } else {
                            digests.insert(d, v.span().start);
                            Some(d)
                        }
                    }
                    Err(msg) => {
                        rep.error_at(Some(v.span()), format!("{shown}: `key`: {msg}"));
                        None
                    }
                }
            }
        };
        let mut whole = |v: &Option<Spanned<i64>>, key: &str, max: i64, rep: &mut Reporter| -> Option<u64> {
            let s = v.as_ref()?;
            if (1..=max).contains(s.get_ref()) {
                Some(*s.get_ref() as u64)
            } else {
                rep.error_at(
                    Some(s.span()),
                    format!("{shown}: `{key}` must be a whole number from 1 to {max}, not {}", s.get_ref()),
                );
                ok = false;
                None
            }
        };
        let rpm = whole(&k.rpm, "rpm", 1_000_000, &mut rep).and_then(|n| NonZeroU32::new(n as u32));
        let max_concurrency = whole(&k.max_concurrency, "max_concurrency", 100_000, &mut rep)
            .and_then(|n| NonZeroU32::new(n as u32));
        let tokens_per_day = whole(&k.tokens_per_day, "tokens_per_day", i64::MAX, &mut rep);
        let credits_per_month = match &k.credits_per_month {
            None => None,
            Some(c) if c.get_ref().is_finite() && *c.get_ref() > 0.0 => Some(*c.get_ref()),
            Some(c) => {
                rep.error_at(
                    Some(c.span()),
                    format!("{shown}: `credits_per_month` must be a positive number, not {}", c.get_ref()),
                );
                ok = false;
                None
            }
        };
        let mut models = Vec::new();
        for m in k.models.iter().flatten() {
            let g = m.get_ref();
            if g.is_empty() || g.len() > 128 || g.chars().any(|c| c.is_whitespace() || c.is_control()) {
                rep.error_at(
                    Some(m.span()),
                    format!(
                        "{shown}: models entry {g:?} is not a glob over model ids (e.g. \"claude-sonnet-*\")"
                    ),
                );
                ok = false;
            } else {
                models.push(g.clone());
            }
        }
        if k.models.as_ref().is_some_and(|m| m.is_empty()) {
            rep.error_at(
                Some(span.clone()),
                format!("{shown}: `models` is empty, so the key could reach no model (leave it out for all)"),
            );
            ok = false;
        }
        let expires = match &k.expires {
            None => None,
            Some(v) => match expiry(v.get_ref()) {
                Ok(t) => Some(t),
                Err(msg) => {
                    rep.error_at(Some(v.span()), format!("{shown}: `expires`: {msg}"));
                    ok = false;
                    None
                }
            },
        };
        if let (true, Some(digest)) = (ok, digest) {
            keys.push(KeySpec {
                name,
                digest,
                enabled: k.enabled.unwrap_or(true),
                rpm,
                max_concurrency,
                tokens_per_day,
                credits_per_month,
                models,
                expires,
            });
        }
    }
    if rep.out.has_errors() { Err(rep.out) } else { Ok((KeySet { keys }, rep.out)) }
}

/// An RFC 3339 instant: a TOML offset date-time (`2027-01-01T00:00:00Z`), the same as a string,
/// or a bare date (midnight UTC).
fn expiry(v: &toml::Value) -> Result<SystemTime, String> {
    let dt = match v {
        toml::Value::Datetime(d) => *d,
        toml::Value::String(s) => s
            .parse::<toml::value::Datetime>()
            .map_err(|_| format!("{s:?} is not an RFC 3339 date-time (e.g. 2027-01-01T00:00:00Z)"))?,
        other => return Err(format!("expected an RFC 3339 date-time, not a {}", other.type_str())),
    };
    let date = dt.date.ok_or("a time without a date")?;
    let days = days_from_civil(date.year as i64, date.month as i64, date.day as i64);
    let mut secs = days * 86_400;
    if let Some(t) = dt.time {
        secs += t.hour as i64 * 3600 + t.minute as i64 * 60 + t.second.unwrap_or(0) as i64;
        match dt.offset {
            None => {
                return Err("a date-time needs its time zone (Z or ±hh:mm), e.g. 2027-01-01T00:00:00Z".into());
            }
            Some(toml::value::Offset::Z) => {}
            Some(toml::value::Offset::Custom { minutes }) => secs -= minutes as i64 * 60,
        }
    }
    if secs < 0 {
        return Err("before 1970".into());
    }
    Ok(UNIX_EPOCH + Duration::from_secs(secs as u64))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date (year, month, day) of a day number since 1970-01-01.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Reads and parses a keys file, with a warning when it is readable by every user.
pub fn load(path: &Path) -> Result<(KeySet, Diagnostics), Diagnostics> {
    load_sized(path).map(|(set, diags, _)| (set, diags))
}

/// [`load`], and how many bytes the file held when it was read (see
/// [`super::accounts::load_sized`]).
pub fn load_sized(path: &Path) -> Result<(KeySet, Diagnostics, usize), Diagnostics> {
    let mut rep = Reporter::new(path, "");
    let source = match super::read::read_text(path) {
        Ok(s) => s,
        Err(e) => {
            rep.error_at(None, format!("cannot read the keys file: {e}"));
            return Err(rep.out);
        }
    };
    let (set, mut diags) = parse(path, &source)?;
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode();
        if mode & 0o004 != 0 {
            diags.0.push(super::diag::Diagnostic {
                severity: super::diag::Severity::Warning,
                file: path.to_path_buf(),
                position: None,
                message: format!(
                    "the keys file is readable by every user (mode {:04o}): chmod 0640 and chown root:amq2api (or keep only sha256: digests in it)",
                    mode & 0o7777
                ),
            });
        }
    }
    Ok((set, diags, source.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match(b"claude-sonnet-*", b"claude-sonnet-4-5-20250929"));
        assert!(!glob_match(b"claude-sonnet-*", b"claude-opus-4-1"));
        assert!(glob_match(b"*", b""));
        assert!(glob_match(b"claude-?-x*", b"claude-a-xyz"));
        assert!(glob_match(b"*haiku*", b"claude-3-5-haiku-latest"));
        assert!(!glob_match(b"claude", b"claude-x"));
    }

    #[test]
    fn dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2027, 1, 1), 20819);
        assert_eq!(civil_from_days(20819), (2027, 1, 1));
        assert_eq!(civil_from_days(days_from_civil(2024, 2, 29)), (2024, 2, 29));
    }

    #[test]
    fn parses_and_reports() {
        let good = "[[key]]\nname = \"alice\"\nkey = \"sk-amq-alice-0123456789\"\nrpm = 60\nmodels = [\"claude-sonnet-*\"]\nexpires = 2027-01-01T00:00:00Z\ncredits_per_month = 500\n";
        let (set, _) = parse(Path::new("keys.toml"), good).unwrap();
        assert_eq!(set.keys[0].rpm.unwrap().get(), 60);
        assert_eq!(set.keys[0].credits_per_month, Some(500.0));
        assert_eq!(set.keys[0].expires, Some(UNIX_EPOCH + Duration::from_secs(20819 * 86_400)));
        assert!(set.keys[0].allows_model("claude-sonnet-4-5"));
        let bad = "[[key]]\nname = \"alice\"\nkey = \"sk-amq-alice-0123456789\"\nrpm = 0\nfoo = 1\n\n[[key]]\nname = \"alice\"\nkey = \"sk-amq-alice-0123456789\"\nexpires = 2027-01-01T00:00:00\n";
        let err = parse(Path::new("keys.toml"), bad).unwrap_err().to_string();
        assert!(err.contains("keys.toml:5:1: error: unknown field `foo`"), "{err}");
        let err = parse(Path::new("keys.toml"), &bad.replace("foo = 1\n", "")).unwrap_err().to_string();
        assert!(err.contains("keys.toml:4:7: error: key \"alice\": `rpm` must be"), "{err}");
        assert!(
            err.contains("keys.toml:7:8: error: duplicate key name \"alice\" (first defined at line 2"),
            "{err}"
        );
        assert!(err.contains("keys.toml:8:7: error: key \"alice\": duplicate key"), "{err}");
        assert!(
            err.contains("keys.toml:9:11: error: key \"alice\": `expires`: a date-time needs its time zone"),
            "{err}"
        );
    }
}
