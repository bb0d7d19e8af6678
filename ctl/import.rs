//! `amqctl import`: the seed amq2api project's exports (label|password|clientId|clientSecret|
//! refreshToken|accessToken lines, or its /v2/accounts JSON) turned into `[[account]]` entries
//! of accounts.toml with generated ids.

use crate::failure::{Failure, fail};
use amq2api::exit;
use std::path::Path;

/// An account found in a seed export.
#[derive(Debug, Clone, PartialEq)]
pub struct Imported {
    pub label: String,
    pub client_id: String,
    pub client_secret: String,
    pub refresh_token: String,
    pub enabled: bool,
}

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// Reads a seed export and renders `[[account]]` entries with generated ids.
pub fn import(path: &Path) -> Result<String, Failure> {
    let bytes =
        std::fs::read(path).map_err(|e| fail(exit::IOERR, format!("cannot read {}: {e}", path.display())))?;
    if bytes.starts_with(b"SQLite format 3\0") {
        return Err(fail(
            exit::DATAERR,
            format!(
                "{} is the seed's SQLite accounts.db, which amqctl does not read: export the accounts from the seed's /v2/accounts endpoint as JSON (or its label|password|clientId|clientSecret|refreshToken|accessToken lines) and import that",
                path.display()
            ),
        ));
    }
    let text = String::from_utf8(bytes)
        .map_err(|_| fail(exit::DATAERR, format!("{} is not UTF-8 text", path.display())))?;
    let accounts =
        parse_export(&text).map_err(|e| fail(exit::DATAERR, format!("{}: {e}", path.display())))?;
    let mut out = format!("# Imported by amqctl from {} ({} accounts).\n", path.display(), accounts.len());
    let mut used = std::collections::HashSet::new();
    for a in &accounts {
        let mut base: String = a
            .label
            .to_ascii_lowercase()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '-' })
            .collect::<String>()
            .trim_matches('-')
            .chars()
            .take(48)
            .collect();
        if base.is_empty() {
            base = "imported".into();
        }
        let mut id = base.clone();
        let mut n = 1;
        while !used.insert(id.clone()) {
            n += 1;
            id = format!("{base}-{n}");
        }
        out.push_str(&format!(
            "\n[[account]]\nid = {}\nlabel = {}\nclient_id = {}\nclient_secret = {}\nrefresh_token = {}\n",
            toml_str(&id),
            toml_str(&a.label),
            toml_str(&a.client_id),
            toml_str(&a.client_secret),
            toml_str(&a.refresh_token)
        ));
        if !a.enabled {
            out.push_str("enabled = false\n");
        }
    }
    Ok(out)
}

/// Parses either format of the seed project's exports.
pub fn parse_export(text: &str) -> Result<Vec<Imported>, String> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') || trimmed.starts_with('{') {
        let v: serde_json::Value =
            serde_json::from_str(trimmed).map_err(|e| format!("not valid JSON: {e}"))?;
        let items = match &v {
            serde_json::Value::Array(a) => a.clone(),
            serde_json::Value::Object(o) => o
                .get("accounts")
                .or_else(|| o.get("data"))
                .and_then(|a| a.as_array())
                .cloned()
                .ok_or("a JSON object export must hold an \"accounts\" array")?,
            _ => return Err("expected a JSON array of accounts".into()),
        };
        let mut out = Vec::new();
        for (i, it) in items.iter().enumerate() {
            let f = |keys: &[&str]| {
                keys.iter().find_map(|k| it.get(*k).and_then(|v| v.as_str()).map(str::to_string))
            };
            let need = |keys: &[&str]| {
                f(keys).filter(|s| !s.is_empty()).ok_or(format!("account #{}: missing {}", i + 1, keys[0]))
            };
            out.push(Imported {
                label: f(&["label", "name"]).unwrap_or_else(|| format!("account {}", i + 1)),
                client_id: need(&["clientId", "client_id"])?,
                client_secret: need(&["clientSecret", "client_secret"])?,
                refresh_token: need(&["refreshToken", "refresh_token"])?,
                enabled: it.get("enabled").and_then(|e| e.as_bool()).unwrap_or(true),
            });
        }
        return Ok(out);
    }
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let parts: Vec<&str> = line.split('|').collect();
        if parts.len() < 5 {
            return Err(format!(
                "line {}: expected label|password|clientId|clientSecret|refreshToken|accessToken",
                n + 1
            ));
        }
        let (client_id, client_secret, refresh_token) = (parts[2].trim(), parts[3].trim(), parts[4].trim());
        if client_id.is_empty() || client_secret.is_empty() || refresh_token.is_empty() {
            return Err(format!("line {}: clientId, clientSecret and refreshToken must not be empty", n + 1));
        }
        out.push(Imported {
            label: parts[0].trim().to_string(),
            client_id: client_id.into(),
            client_secret: client_secret.into(),
            refresh_token: refresh_token.into(),
            enabled: true,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_both_formats() {
        let lines = "# seed export\nTeam A|pw|cid1|cs1|rt1|at1\nTeam A|pw|cid2|cs2|rt2|\n";
        let a = parse_export(lines).unwrap();
        assert_eq!(a.len(), 2);
        assert_eq!(a[1].refresh_token, "rt2");
        let json = r#"[{"label": "x y", "clientId": "c", "clientSecret": "s", "refreshToken": "r", "enabled": false}]"#;
        let b = parse_export(json).unwrap();
        assert!(!b[0].enabled);
        assert!(parse_export("a|b|c").is_err());
        assert!(parse_export(r#"[{"label": "x"}]"#).is_err());
        let tmp = std::env::temp_dir().join(format!("amqctl-import-{}", std::process::id()));
        std::fs::write(&tmp, lines).unwrap();
        let out = import(&tmp).unwrap();
        std::fs::remove_file(&tmp).ok();
        assert!(out.contains("id = \"team-a\"") && out.contains("id = \"team-a-2\""), "{out}");
        let set = amq2api::config::accounts::parse(Path::new("x.toml"), &out).unwrap().0;
        assert_eq!(set.len(), 2);
    }
}
