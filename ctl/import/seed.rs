//! The seed amq2api project's account stores: its text export (`label|password|clientId|
//! clientSecret|refreshToken|accessToken` lines), its `/v2/accounts` JSON export (an array, or
//! `{"accounts": [...]}` / `{"data": [...]}`) and its SQLite `accounts.db`. All three hold OIDC
//! accounts (Builder ID / IAM Identity Center client registrations with their refresh tokens);
//! passwords and access tokens are not carried over.
//!
//! The seed's SQLite schema is not published: amqctl reads a table `accounts` with the columns
//! its JSON export has (`label`, `clientId`, `clientSecret`, `refreshToken`, `accessToken`,
//! `enabled`, …), whatever their case or `_` spelling (`client_id`, `CLIENTID`), and names what
//! it expected when the table or a column is missing.

use super::sqlite;
use super::{Creds, Entry, Found};
use rusqlite::Connection;

const LINE_FORMAT: &str = "label|password|clientId|clientSecret|refreshToken|accessToken";

/// Whether a JSON value has the shape of the seed's `/v2/accounts` export.
pub fn is_json_export(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Array(items) => items.iter().all(|i| i.is_object()),
        serde_json::Value::Object(o) => {
            o.get("accounts").or_else(|| o.get("data")).is_some_and(serde_json::Value::is_array)
        }
        _ => false,
    }
}

/// The accounts of the seed's JSON export.
pub fn from_json(v: &serde_json::Value) -> Result<Found, String> {
    let items = match v {
        serde_json::Value::Array(a) => a,
        serde_json::Value::Object(o) => o
            .get("accounts")
            .or_else(|| o.get("data"))
            .and_then(|a| a.as_array())
            .ok_or("a JSON object export must hold an \"accounts\" array")?,
        _ => return Err("expected a JSON array of accounts".into()),
    };
    let mut entries = Vec::new();
    for (i, it) in items.iter().enumerate() {
        let f = |keys: &[&str]| {
            keys.iter()
                .find_map(|k| it.get(*k).and_then(|v| v.as_str()))
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
        };
        let need = |keys: &[&str]| f(keys).ok_or(format!("account #{}: missing {}", i + 1, keys[0]));
        let creds = Creds::Oidc {
            client_id: need(&["clientId", "client_id"])?,
            client_secret: need(&["clientSecret", "client_secret"])?,
            refresh_token: need(&["refreshToken", "refresh_token"])?,
        };
        let label = f(&["label", "name"]).unwrap_or_else(|| format!("account {}", i + 1));
        let mut e = Entry::new(label, format!("the seed's JSON export, account #{}", i + 1), creds);
        e.enabled = it.get("enabled").and_then(|e| e.as_bool()).unwrap_or(true);
        entries.push(e);
    }
    Ok(Found { format: "the seed's /v2/accounts JSON export".into(), entries, ..Found::default() })
}

/// The accounts of the seed's text export; `#` comments and blank lines are skipped.
pub fn from_lines(text: &str) -> Result<Found, String> {
    let mut entries = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let parts: Vec<&str> = line.split('|').collect();
        if parts.len() < 5 {
            return Err(format!(
                "line {}: expected {LINE_FORMAT} (the seed's text export; amqctl import also reads the Kiro IDE's kiro-auth-token.json, kiro-cli's data.sqlite3, the seed's accounts.db and JSON export)",
                n + 1
            ));
        }
        let (client_id, client_secret, refresh_token) = (parts[2].trim(), parts[3].trim(), parts[4].trim());
        if client_id.is_empty() || client_secret.is_empty() || refresh_token.is_empty() {
            return Err(format!("line {}: clientId, clientSecret and refreshToken must not be empty", n + 1));
        }
        let creds = Creds::Oidc {
            client_id: client_id.into(),
            client_secret: client_secret.into(),
            refresh_token: refresh_token.into(),
        };
        entries.push(Entry::new(parts[0].trim(), format!("the seed's text export, line {}", n + 1), creds));
    }
    Ok(Found { format: format!("the seed's {LINE_FORMAT} export"), entries, ..Found::default() })
}

/// The seed's `accounts.db`: table `table` (found as `accounts`).
pub fn from_db(conn: &Connection, table: &str) -> Result<Found, String> {
    let columns = sqlite::columns(conn, table)?;
    let expected =
        "the seed's accounts table has label, clientId, clientSecret, refreshToken, accessToken, enabled";
    let need = |names: &[&str]| {
        sqlite::column(&columns, names).ok_or_else(|| {
            format!(
                "an SQLite database whose table {table} has no {} column ({expected}; found columns: {})",
                names[0],
                columns.join(", ")
            )
        })
    };
    let client_id = need(&["clientId"])?;
    let client_secret = need(&["clientSecret"])?;
    let refresh_token = need(&["refreshToken"])?;
    let label = sqlite::column(&columns, &["label", "name"]);
    let enabled = sqlite::column(&columns, &["enabled"]);
    let rows = sqlite::rows(
        conn,
        table,
        &[label, Some(client_id), Some(client_secret), Some(refresh_token), enabled],
    )?;
    let mut entries = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        let n = i + 1;
        let label = sqlite::text(&row[0]);
        let what = match &label {
            Some(l) => format!("row {n} (label {:?})", super::one_line(l)),
            None => format!("row {n}"),
        };
        let need = |col: usize, name: &str| {
            sqlite::text(&row[col]).ok_or_else(|| format!("table {table}, {what}: no {name}"))
        };
        let creds = Creds::Oidc {
            client_id: need(1, "clientId")?,
            client_secret: need(2, "clientSecret")?,
            refresh_token: need(3, "refreshToken")?,
        };
        let mut e = Entry::new(
            label.unwrap_or_else(|| format!("account {n}")),
            format!("the seed's accounts.db, table {table}, row {n}"),
            creds,
        );
        e.enabled = sqlite::flag(&row[4], true);
        entries.push(e);
    }
    Ok(Found { format: format!("the seed's accounts.db (table {table})"), entries, ..Found::default() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_json() {
        let lines = "# seed export\nTeam A|pw|cid1|cs1|rt1|at1\nTeam A|pw|cid2|cs2|rt2|\n";
        let a = from_lines(lines).unwrap().entries;
        assert_eq!(a.len(), 2);
        assert_eq!(
            a[1].creds,
            Creds::Oidc {
                client_id: "cid2".into(),
                client_secret: "cs2".into(),
                refresh_token: "rt2".into()
            }
        );
        assert_eq!(a[1].source, "the seed's text export, line 3");
        let json: serde_json::Value = serde_json::from_str(
            r#"[{"label": "x y", "clientId": "c", "clientSecret": "s", "refreshToken": "r", "enabled": false}]"#,
        )
        .unwrap();
        assert!(is_json_export(&json));
        let b = from_json(&json).unwrap().entries;
        assert!(!b[0].enabled);
        assert!(from_lines("a|b|c").unwrap_err().contains("line 1"));
        let partial: serde_json::Value = serde_json::from_str(r#"{"accounts": [{"label": "x"}]}"#).unwrap();
        assert!(is_json_export(&partial));
        assert_eq!(from_json(&partial).unwrap_err(), "account #1: missing clientId");
        assert!(!is_json_export(&serde_json::json!({"refreshToken": "r"})));
    }
}
