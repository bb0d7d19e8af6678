//! The Kiro tools' credential stores.
//!
//! - The Kiro IDE's `~/.aws/sso/cache/kiro-auth-token.json`: `accessToken`, `refreshToken`,
//!   `expiresAt`, `authMethod` (`social` for Google/GitHub sign-in, `IdC` for Builder ID / IAM
//!   Identity Center), `provider` (`Google`, `Github`, `BuilderId`, `Enterprise`), optional
//!   `profileArn`, `region`, `startUrl`; for IdC a `clientIdHash` naming the client registration
//!   `<clientIdHash>.json` beside it (`clientId`, `clientSecret`, `expiresAt`). Social → a
//!   `social` account; IdC → an `oidc` account with the sibling's client registration.
//! - kiro-cli's `data.sqlite3` (and the Amazon Q CLI's, which kiro-cli grew from): table
//!   `auth_kv(key, value)` with JSON values under `<prefix>:<family>:token` and
//!   `<prefix>:<family>:device-registration`, prefix `kirocli` or `codewhisperer`, family
//!   `social` or `odic` (sic; `oidc` is accepted too). A social token → `social`; an OIDC token
//!   with the device registration of its prefix → `oidc`. The active profile, when kiro-cli
//!   keeps one in `state` under `api.codewhisperer.profile`, gives the OIDC accounts their
//!   `profile_arn`. Field names are read in camelCase and snake_case.
//!
//! The region a token was issued in is where it is refreshed: it becomes `auth_region` unless
//! the profile ARN's region is the same. Access tokens and expiry times are not carried over.

use super::{Creds, Entry, Found, one_line, shown, sqlite};
use rusqlite::Connection;
use serde_json::Value;
use std::path::Path;

/// A non-empty string field under any of `keys` (trimmed).
fn field(v: &Value, keys: &[&str]) -> Option<String> {
    keys.iter()
        .find_map(|k| v.get(*k).and_then(Value::as_str))
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

const REFRESH: &[&str] = &["refreshToken", "refresh_token"];
const CLIENT_ID: &[&str] = &["clientId", "client_id"];
const CLIENT_SECRET: &[&str] = &["clientSecret", "client_secret"];
const PROFILE_ARN: &[&str] = &["profileArn", "profile_arn"];
const REGION: &[&str] = &["region"];
const EXPIRES: &[&str] = &["expiresAt", "expires_at", "clientSecretExpiresAt", "client_secret_expires_at"];

/// Whether a JSON value has the shape of the Kiro IDE's token file.
pub fn is_token_file(v: &Value) -> bool {
    v.is_object() && (field(v, REFRESH).is_some() || field(v, &["authMethod", "auth_method"]).is_some())
}

/// For a JSON file that is a client registration (`clientId`, `clientSecret`, no token): what to
/// import instead.
pub fn registration_hint(v: &Value) -> Option<String> {
    (v.is_object() && field(v, CLIENT_ID).is_some() && field(v, CLIENT_SECRET).is_some()).then(|| {
        "a client registration (clientId, clientSecret) without a refresh token: import the Kiro IDE's kiro-auth-token.json from the same directory, which names this file by its clientIdHash".to_string()
    })
}

/// A provider name for a label: Google, Github, BuilderId, Enterprise, …
fn provider_label(provider: Option<&str>) -> Option<String> {
    let p = provider?;
    (p.len() <= 32 && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')).then(|| match p
        .to_ascii_lowercase()
        .as_str()
    {
        "github" => "GitHub".to_string(),
        "builderid" => "Builder ID".to_string(),
        "enterprise" => "IAM Identity Center".to_string(),
        _ => p.to_string(),
    })
}

/// A timestamp for a comment: shown when it looks like one.
fn when(v: &Value) -> Option<String> {
    let s = field(v, EXPIRES)?;
    (s.len() <= 40 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-:.+ ".contains(&b))).then_some(s)
}

/// The Kiro IDE's `kiro-auth-token.json` at `path`.
pub fn from_token_file(path: &Path, v: &Value) -> Result<Found, String> {
    let format = "the Kiro IDE's kiro-auth-token.json".to_string();
    let refresh_token = field(v, REFRESH).ok_or(
        "no refreshToken (expected the Kiro IDE's kiro-auth-token.json: accessToken, refreshToken, expiresAt, authMethod, provider)",
    )?;
    let method = field(v, &["authMethod", "auth_method"]);
    let provider = field(v, &["provider"]);
    let has_registration = field(v, &["clientIdHash"]).is_some()
        || (field(v, CLIENT_ID).is_some() && field(v, CLIENT_SECRET).is_some());
    let oidc = match method.as_deref().map(str::to_ascii_lowercase).as_deref() {
        Some("social") => false,
        Some("idc" | "iam" | "oidc" | "builderid") => true,
        Some(_) => {
            return Err(format!(
                "authMethod {} is neither \"social\" (Google/GitHub sign-in) nor \"IdC\" (Builder ID / IAM Identity Center)",
                shown(method.as_deref().unwrap_or_default())
            ));
        }
        None => match provider.as_deref().map(str::to_ascii_lowercase).as_deref() {
            Some("google" | "github") => false,
            Some("builderid" | "enterprise" | "internal") => true,
            _ => has_registration,
        },
    };
    let mut warnings = Vec::new();
    let mut remarks = Vec::new();
    if method.is_none() {
        remarks.push(format!(
            "no authMethod in the file: taken as {} ({})",
            if oidc { "IdC" } else { "social" },
            if provider.is_some() {
                "from its provider"
            } else if oidc {
                "it names a client registration"
            } else {
                "it names no client registration"
            }
        ));
    }
    let name = provider_label(provider.as_deref());
    let (label, creds, mut source) = if oidc {
        let (client_id, client_secret, from) = if let (Some(id), Some(secret)) =
            (field(v, CLIENT_ID), field(v, CLIENT_SECRET))
        {
            (id, secret, "its own clientId/clientSecret".to_string())
        } else {
            let hash = field(v, &["clientIdHash"]).ok_or(
                "authMethod IdC, but no clientIdHash (nor clientId/clientSecret): the client registration cannot be found",
            )?;
            if !hash.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') || hash.len() > 128
            {
                return Err(format!("its clientIdHash {} is not a file name", shown(&hash)));
            }
            let dir = path.parent().unwrap_or(Path::new("."));
            let sibling = dir.join(format!("{hash}.json"));
            let text = match std::fs::read_to_string(&sibling) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(format!(
                        "the IdC client registration {} is missing (kiro-auth-token.json names it by its clientIdHash; the Kiro IDE writes it at sign-in beside the token file: copy both, or sign in again)",
                        sibling.display()
                    ));
                }
                Err(e) => {
                    return Err(format!(
                        "cannot read the IdC client registration {}: {e}",
                        sibling.display()
                    ));
                }
            };
            let reg: Value = serde_json::from_str(text.trim_start_matches('\u{feff}')).map_err(|e| {
                format!(
                    "the IdC client registration {} is not valid JSON ({e}): expected clientId, clientSecret, expiresAt",
                    sibling.display()
                )
            })?;
            let need = |keys: &[&str]| {
                field(&reg, keys).ok_or_else(|| {
                    format!(
                        "the IdC client registration {} has no {} (expected clientId, clientSecret, expiresAt)",
                        sibling.display(),
                        keys[0]
                    )
                })
            };
            let (id, secret) = (need(CLIENT_ID)?, need(CLIENT_SECRET)?);
            if let Some(t) = when(&reg) {
                remarks.push(format!("the client registration expires {t}: sign in again before then"));
            }
            (id, secret, format!("the client registration {}", sibling.display()))
        };
        let label = format!("Kiro IDE, {}", name.clone().unwrap_or_else(|| "IdC".into()));
        let source = format!("the Kiro IDE's token file {} (IdC) with {from}", path.display());
        (label, Creds::Oidc { client_id, client_secret, refresh_token }, source)
    } else {
        let label = format!("Kiro IDE, {} sign-in", name.clone().unwrap_or_else(|| "social".into()));
        let source = format!("the Kiro IDE's token file {} (social)", path.display());
        (label, Creds::Social { refresh_token }, source)
    };
    if let Some(url) = field(v, &["startUrl", "start_url"]) {
        if url.starts_with("https://") && url.len() <= 200 && !url.contains(char::is_whitespace) {
            source.push_str(&format!(", start URL {url}"));
        }
    }
    let mut e = Entry::new(label, source, creds);
    e.remarks = remarks;
    e.place(field(v, PROFILE_ARN), field(v, REGION), &mut warnings);
    Ok(Found { format, entries: vec![e], warnings, notes: Vec::new() })
}

/// One `auth_kv` key as `<prefix>:<family>:<what>`.
struct Key<'a> {
    key: &'a str,
    prefix: &'a str,
    family: Family,
    what: What,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    Social,
    Oidc,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum What {
    Token,
    Registration,
}

/// Why a key is not read: a token of a sign-in amqctl does not import (a warning), or a key
/// that holds no credential (a note).
enum Unread {
    Warning(&'static str),
    Note(&'static str),
}

fn parse_key(key: &str) -> Result<Key<'_>, Unread> {
    let (rest, what) = key.rsplit_once(':').unwrap_or(("", key));
    let what = match what {
        "token" => What::Token,
        "device-registration" => What::Registration,
        _ => return Err(Unread::Note("neither a token nor a device registration")),
    };
    let (prefix, family) = rest.rsplit_once(':').unwrap_or(("", rest));
    let family = match family.to_ascii_lowercase().as_str() {
        "social" => Family::Social,
        "odic" | "oidc" => Family::Oidc,
        _ if what == What::Token => {
            return Err(Unread::Warning(
                "a kind of sign-in amqctl does not import (it reads <tool>:social:token and <tool>:odic:token)",
            ));
        }
        _ => return Err(Unread::Note("a registration of a kind of sign-in amqctl does not import")),
    };
    Ok(Key { key, prefix, family, what })
}

/// Which tool wrote keys with this prefix, for labels.
fn tool(prefix: &str) -> &'static str {
    match prefix {
        "kirocli" => "kiro-cli",
        "codewhisperer" => "Amazon Q CLI",
        _ => "kiro-cli database",
    }
}

/// A value of `auth_kv` as a JSON object (a JSON string holding JSON is opened once more).
fn json_value(text: &str) -> Option<Value> {
    let v: Value = serde_json::from_str(text).ok()?;
    let v = match v {
        Value::String(inner) => serde_json::from_str(&inner).ok()?,
        v => v,
    };
    v.is_object().then_some(v)
}

/// kiro-cli's (or the Amazon Q CLI's) `data.sqlite3`: its `auth_kv` table (found as `table`).
pub fn from_cli_db(conn: &Connection, table: &str, tables: &[String]) -> Result<Found, String> {
    let columns = sqlite::columns(conn, table)?;
    let (Some(key_col), Some(value_col)) =
        (sqlite::column(&columns, &["key"]), sqlite::column(&columns, &["value"]))
    else {
        return Err(format!(
            "an SQLite database whose table {table} has no key and value columns (expected kiro-cli's auth_kv(key TEXT, value TEXT); found columns: {})",
            columns.join(", ")
        ));
    };
    let rows = sqlite::rows(conn, table, &[Some(key_col), Some(value_col)])?;
    let rows: Vec<(String, Option<String>)> =
        rows.iter().filter_map(|r| Some((sqlite::text(&r[0])?, sqlite::text(&r[1])))).collect();
    let mut found = Found { format: format!("kiro-cli's data.sqlite3 (table {table})"), ..Found::default() };
    let mut keys = Vec::new();
    for (key, value) in &rows {
        match parse_key(key) {
            Ok(k) => keys.push((k, value.as_deref())),
            Err(Unread::Note(why)) => found.notes.push(format!("{table} key {}: {why}", one_line(key))),
            Err(Unread::Warning(why)) => found.warnings.push(format!("{table} key {}: {why}", one_line(key))),
        }
    }
    // kiro-cli's own keys first: its codewhisperer: rows are often copies of them.
    keys.sort_by_key(|(k, _)| (k.prefix != "kirocli", k.family == Family::Oidc));
    let state_arn = active_profile(conn, tables);
    let mut summary = Vec::new();
    for (k, value) in keys.iter().filter(|(k, _)| k.what == What::Token) {
        let tok = match value.and_then(json_value) {
            Some(t) => t,
            None => {
                found.warnings.push(format!("{table} key {}: its value is not a JSON object", k.key));
                continue;
            }
        };
        let Some(refresh_token) = field(&tok, REFRESH) else {
            found.warnings.push(format!("{table} key {}: no refresh_token in it", k.key));
            continue;
        };
        let tool = tool(k.prefix);
        let mut warnings = Vec::new();
        let mut e = match k.family {
            Family::Social => {
                let name = provider_label(field(&tok, &["provider"]).as_deref());
                let label = format!("{tool}, {} sign-in", name.unwrap_or_else(|| "social".into()));
                summary.push(format!("{} (social)", k.key));
                let mut e = Entry::new(
                    label,
                    format!("{tool}'s {table} key {}", k.key),
                    Creds::Social { refresh_token },
                );
                e.place(field(&tok, PROFILE_ARN), field(&tok, REGION), &mut warnings);
                e
            }
            Family::Oidc => {
                let reg = keys.iter().find(|(r, _)| {
                    r.what == What::Registration && r.family == Family::Oidc && r.prefix == k.prefix
                });
                let Some((reg_key, reg_value)) = reg else {
                    found.warnings.push(format!(
                        "{table} key {}: no client registration beside it (looked for {p}:odic:device-registration and {p}:oidc:device-registration)",
                        k.key,
                        p = one_line(k.prefix)
                    ));
                    continue;
                };
                let Some(reg) = reg_value.and_then(json_value) else {
                    found
                        .warnings
                        .push(format!("{table} key {}: its value is not a JSON object", reg_key.key));
                    continue;
                };
                let (Some(client_id), Some(client_secret)) =
                    (field(&reg, CLIENT_ID), field(&reg, CLIENT_SECRET))
                else {
                    found
                        .warnings
                        .push(format!("{table} key {}: no client_id and client_secret in it", reg_key.key));
                    continue;
                };
                let label = format!(
                    "{tool}, {}",
                    if field(&tok, &["start_url", "startUrl"]).is_some_and(|u| u.contains("view.awsapps.com"))
                    {
                        "Builder ID"
                    } else {
                        "IdC"
                    }
                );
                summary.push(format!("{} + {} (oidc)", k.key, reg_key.key));
                let mut e = Entry::new(
                    label,
                    format!("{tool}'s {table} keys {} + {}", k.key, reg_key.key),
                    Creds::Oidc { client_id, client_secret, refresh_token },
                );
                if let Some(t) = when(&reg) {
                    e.remarks.push(format!("the client registration expires {t}: sign in again before then"));
                }
                let arn = field(&tok, PROFILE_ARN).or_else(|| state_arn.clone());
                e.place(arn, field(&tok, REGION).or_else(|| field(&reg, REGION)), &mut warnings);
                e
            }
        };
        if let Some(url) = field(&tok, &["start_url", "startUrl"]) {
            if url.starts_with("https://") && url.len() <= 200 && !url.contains(char::is_whitespace) {
                e.source.push_str(&format!(", start URL {url}"));
            }
        }
        found.warnings.append(&mut warnings);
        found.entries.push(e);
    }
    if !summary.is_empty() {
        found.notes.insert(0, format!("found: {}", summary.join(", ")));
    }
    if found.entries.is_empty() && found.warnings.is_empty() {
        found.warnings.push(format!(
            "no <tool>:social:token or <tool>:odic:token key in {table} (kiro-cli keeps its sign-in there: is it signed in?)"
        ));
    }
    Ok(found)
}

/// The profile ARN kiro-cli keeps as active (`state` table, key `api.codewhisperer.profile`,
/// JSON `{"arn": …}`), when it has one.
fn active_profile(conn: &Connection, tables: &[String]) -> Option<String> {
    let table = sqlite::find(tables, "state")?;
    let columns = sqlite::columns(conn, table).ok()?;
    let key = sqlite::column(&columns, &["key"])?;
    let value = sqlite::column(&columns, &["value"])?;
    let rows = sqlite::rows(conn, table, &[Some(key), Some(value)]).ok()?;
    rows.iter()
        .find(|r| sqlite::text(&r[0]).as_deref() == Some("api.codewhisperer.profile"))
        .and_then(|r| sqlite::text(&r[1]))
        .and_then(|t| json_value(&t))
        .and_then(|v| field(&v, &["arn", "profileArn", "profile_arn"]))
}
