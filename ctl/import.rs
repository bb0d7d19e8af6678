//! `amqctl import FILE`: other tools' credential stores turned into `[[account]]` entries of
//! accounts.toml on stdout, with generated ids, the right `kind` and a comment saying where each
//! came from. The format is told by the content, never by the file name:
//!
//! | content | format | module |
//! |---|---|---|
//! | `SQLite format 3` header, table `auth_kv` | kiro-cli's (or the Amazon Q CLI's) `data.sqlite3` | [`kiro`] |
//! | `SQLite format 3` header, table `accounts` | the seed project's `accounts.db` | [`seed`] |
//! | JSON object with `refreshToken` / `authMethod` | the Kiro IDE's `kiro-auth-token.json` | [`kiro`] |
//! | JSON array, or object with an `accounts` array | the seed's `/v2/accounts` export | [`seed`] |
//! | other text | the seed's `label\|password\|clientId\|clientSecret\|refreshToken\|accessToken` lines | [`seed`] |
//!
//! `-` reads standard input (an SQLite database from there goes through a private temporary
//! file). With `--json`, the entries are printed as JSON instead: `{"source", "format",
//! "accounts": [{"id", "label", "kind", …the same keys as the TOML}], "warnings"}`.
//!
//! Anything else (empty, binary, JSON of another shape, an SQLite file of another schema) is exit
//! 65 with a line saying what was expected. SQLite files are opened read-only ([`sqlite`]).
//! Secrets appear only in the entries on stdout: messages name files, keys, tables and columns,
//! never a value. Before anything is printed, the entries are parsed back as accounts.toml.

mod kiro;
mod seed;
mod sqlite;

use crate::failure::{Failure, fail};
use amq2api::config::accounts::{parse_profile_arn, valid_region};
use amq2api::exit;
use std::collections::HashSet;
use std::path::Path;

/// What `amqctl import` reads, for the messages that say what was expected.
pub const EXPECTED: &str = "expected the Kiro IDE's kiro-auth-token.json, kiro-cli's data.sqlite3 \
     (table auth_kv), the seed's accounts.db (table accounts), its /v2/accounts JSON export or its \
     label|password|clientId|clientSecret|refreshToken|accessToken lines";

/// An account's credentials as found.
#[derive(Debug, Clone, PartialEq)]
pub enum Creds {
    Oidc { client_id: String, client_secret: String, refresh_token: String },
    Social { refresh_token: String },
}

impl Creds {
    fn kind(&self) -> &'static str {
        match self {
            Creds::Oidc { .. } => "oidc",
            Creds::Social { .. } => "social",
        }
    }

    fn refresh_token(&self) -> &str {
        match self {
            Creds::Oidc { refresh_token, .. } | Creds::Social { refresh_token } => refresh_token,
        }
    }
}

/// One account found in a file, before it gets its id.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub label: String,
    /// Where it came from (one line, no secret): the comment above its entry.
    pub source: String,
    pub creds: Creds,
    pub profile_arn: Option<String>,
    /// Where its tokens are refreshed, when that is not the profile ARN's region.
    pub auth_region: Option<String>,
    pub enabled: bool,
    /// More comment lines for the operator (no secret).
    pub remarks: Vec<String>,
}

impl Entry {
    pub fn new(label: impl Into<String>, source: impl Into<String>, creds: Creds) -> Entry {
        Entry {
            label: label.into(),
            source: source.into(),
            creds,
            profile_arn: None,
            auth_region: None,
            enabled: true,
            remarks: Vec::new(),
        }
    }

    /// Takes the profile ARN and the region the tokens were issued in. The API region follows
    /// from the ARN (accounts.toml derives it); the token region becomes `auth_region` when it
    /// differs from that (or when there is no ARN). A malformed ARN or region is left out with
    /// a warning: the daemon finds the profile itself.
    pub fn place(&mut self, arn: Option<String>, token_region: Option<String>, warnings: &mut Vec<String>) {
        let mut arn_region = None;
        if let Some(arn) = arn {
            match parse_profile_arn(&arn) {
                Ok(region) => {
                    arn_region = Some(region);
                    self.profile_arn = Some(arn);
                }
                Err(_) => warnings.push(format!(
                    "{}: its profileArn is not a CodeWhisperer profile ARN (arn:aws:codewhisperer:<region>:<account>:profile/<ID>): left out, the daemon looks the profile up",
                    self.source
                )),
            }
        }
        if let Some(region) = token_region {
            if !valid_region(&region) {
                warnings.push(format!(
                    "{}: its region {} is not an AWS region name: left out (tokens are then refreshed in us-east-1)",
                    self.source,
                    shown(&region)
                ));
            } else if arn_region.as_deref() != Some(region.as_str()) {
                if arn_region.is_none() && region != "us-east-1" {
                    self.remarks.push(format!(
                        "tokens are refreshed in {region}; the API region is us-east-1 unless you add region = \"…\" (or a profile_arn)"
                    ));
                }
                self.auth_region = Some(region);
            }
        }
    }
}

/// What one file held.
#[derive(Debug, Default)]
pub struct Found {
    /// What the file was taken to be.
    pub format: String,
    pub entries: Vec<Entry>,
    /// Things seen and not imported, or worth a look: stderr, and comments above the entries.
    pub warnings: Vec<String>,
    /// Things seen, said in comments only.
    pub notes: Vec<String>,
}

/// The result of an import: the accounts.toml text for stdout and the warnings for stderr.
#[derive(Debug)]
pub struct Output {
    pub stdout: String,
    pub warnings: Vec<String>,
}

/// A TOML basic string.
pub fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// Text for a comment or a message: one line, no control characters.
pub fn one_line(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
}

/// A value from a foreign file, for a message: shown when it is a short word (an authMethod, a
/// provider, a region), else only its length is told. Used only for fields that hold no secret;
/// the cap keeps a token that landed in the wrong field out of the message.
pub fn shown(s: &str) -> String {
    if !s.is_empty()
        && s.len() <= 32
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        format!("{s:?}")
    } else {
        format!("(a value of {} characters)", s.chars().count())
    }
}

/// An id made from a label: lowercase letters, digits, `_` and `-`, at most 48 characters.
fn id_base(label: &str) -> String {
    let mut base: String = label
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '-' })
        .collect::<String>()
        .split('-')
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("-")
        .chars()
        .take(48)
        .collect();
    base = base.trim_matches('-').to_string();
    if base.is_empty() { "imported".into() } else { base }
}

/// What a binary file that is not SQLite looks like, for the message.
fn binary_kind(bytes: &[u8]) -> &'static str {
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        "a PNG image"
    } else if bytes.starts_with(&[0xff, 0xd8, 0xff]) {
        "a JPEG image"
    } else if bytes.starts_with(&[0x1f, 0x8b]) {
        "gzip data"
    } else if bytes.starts_with(b"PK\x03\x04") {
        "a ZIP archive"
    } else if bytes.starts_with(b"%PDF") {
        "a PDF document"
    } else {
        "binary data"
    }
}

/// `-`: standard input.
fn is_stdin(path: &Path) -> bool {
    path.as_os_str() == "-"
}

/// How a path is named in messages and comments.
fn named(path: &Path) -> String {
    if is_stdin(path) { "standard input".to_owned() } else { path.display().to_string() }
}

/// A private copy of an SQLite database read from standard input (SQLite opens files only);
/// removed when dropped.
struct StdinCopy(std::path::PathBuf);

impl StdinCopy {
    fn new(bytes: &[u8]) -> std::io::Result<StdinCopy> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = std::env::temp_dir().join(format!(
            "amqctl-import-{}-{}.db",
            std::process::id(),
            amq2api::ids::uuid_v4()
        ));
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path)?;
        let copy = StdinCopy(path);
        f.write_all(bytes)?;
        f.sync_all()?;
        Ok(copy)
    }
}

impl Drop for StdinCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Reads `path` (`-`: standard input), tells its format by its content and finds the accounts in it.
pub fn find(path: &Path) -> Result<Found, Failure> {
    let bad = |msg: String| fail(exit::DATAERR, format!("{}: {}", named(path), one_line(&msg)));
    let bytes = if is_stdin(path) {
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut bytes)
            .map_err(|e| fail(exit::IOERR, format!("cannot read standard input: {e}")))?;
        bytes
    } else {
        std::fs::read(path).map_err(|e| fail(exit::IOERR, format!("cannot read {}: {e}", path.display())))?
    };
    let found = if bytes.starts_with(b"SQLite format 3\0") {
        if is_stdin(path) {
            let copy = StdinCopy::new(&bytes).map_err(|e| {
                fail(exit::IOERR, format!("cannot keep standard input in a temporary file: {e}"))
            })?;
            drop(bytes);
            from_sqlite(&copy.0).map_err(bad)?
        } else {
            drop(bytes);
            from_sqlite(path).map_err(bad)?
        }
    } else {
        let Ok(text) = std::str::from_utf8(&bytes) else {
            return Err(bad(format!(
                "{} is neither text nor an SQLite database: {EXPECTED}",
                binary_kind(&bytes)
            )));
        };
        from_text(path, text.strip_prefix('\u{feff}').unwrap_or(text)).map_err(bad)?
    };
    if found.entries.is_empty() {
        let mut msg = format!("no account in it ({})", found.format);
        for w in &found.warnings {
            msg.push_str("; ");
            msg.push_str(w);
        }
        return Err(bad(format!("{msg}: {EXPECTED}")));
    }
    Ok(found)
}

/// What an SQLite file must be.
const EXPECTED_SQLITE: &str = "expected kiro-cli's data.sqlite3 (table auth_kv with key, value) or the seed's accounts.db (table accounts with label, clientId, clientSecret, refreshToken, enabled)";

fn from_sqlite(path: &Path) -> Result<Found, String> {
    let conn = sqlite::open(path).map_err(|e| format!("{e}: {EXPECTED_SQLITE}"))?;
    let tables = sqlite::tables(&conn).map_err(|e| format!("{e}: {EXPECTED_SQLITE}"))?;
    if let Some(table) = sqlite::find(&tables, "auth_kv") {
        return kiro::from_cli_db(&conn, table, &tables);
    }
    if let Some(table) = sqlite::find(&tables, "accounts") {
        return seed::from_db(&conn, table);
    }
    let found =
        if tables.is_empty() { "no tables".to_string() } else { format!("tables {}", tables.join(", ")) };
    Err(format!("an SQLite database with {found}, not one amqctl reads: {EXPECTED_SQLITE}"))
}

fn from_text(path: &Path, text: &str) -> Result<Found, String> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(format!("the file is empty: {EXPECTED}"));
    }
    if !(trimmed.starts_with('[') || trimmed.starts_with('{')) {
        return seed::from_lines(text);
    }
    let v: serde_json::Value =
        serde_json::from_str(trimmed).map_err(|e| format!("not valid JSON ({e}): {EXPECTED}"))?;
    if kiro::is_token_file(&v) {
        return kiro::from_token_file(path, &v);
    }
    if let Some(hint) = kiro::registration_hint(&v) {
        return Err(hint);
    }
    if seed::is_json_export(&v) {
        return seed::from_json(&v);
    }
    let shape = match &v {
        serde_json::Value::Object(o) => {
            let keys: Vec<&str> = o.keys().take(8).map(String::as_str).collect();
            format!("a JSON object with keys {}", one_line(&keys.join(", ")))
        }
        serde_json::Value::Array(_) => "a JSON array".to_string(),
        _ => "a JSON scalar".to_string(),
    };
    Err(format!(
        "{shape}, not a credential file amqctl reads: expected the Kiro IDE's kiro-auth-token.json (an object with refreshToken, authMethod, provider) or the seed's /v2/accounts export (an array of objects with clientId, clientSecret, refreshToken, or {{\"accounts\": [...]}})"
    ))
}

/// Renders the entries found as accounts.toml text with generated ids, then checks that the
/// text parses as an accounts file.
pub fn render(path: &Path, found: &Found) -> Result<Output, Failure> {
    let mut warnings = found.warnings.clone();
    let mut out = String::new();
    let mut seen_tokens: HashSet<&str> = HashSet::new();
    let mut used_ids: HashSet<String> = HashSet::new();
    let mut body = String::new();
    let mut count = 0;
    let mut notes = found.notes.clone();
    for e in &found.entries {
        // Two entries with one refresh token would spend each other's rotations: keep the first.
        if !seen_tokens.insert(e.creds.refresh_token()) {
            notes.push(format!("{}: the same refresh token as an account above: imported once", e.source));
            continue;
        }
        count += 1;
        let base = id_base(&e.label);
        let mut id = base.clone();
        let mut n = 1;
        while !used_ids.insert(id.clone()) {
            n += 1;
            id = format!("{base}-{n}");
        }
        body.push_str(&format!("\n# from {}\n", one_line(&e.source)));
        for r in &e.remarks {
            body.push_str(&format!("# {}\n", one_line(r)));
        }
        body.push_str(&format!(
            "[[account]]\nid = {}\nlabel = {}\nkind = \"{}\"\n",
            toml_str(&id),
            toml_str(&e.label),
            e.creds.kind()
        ));
        match &e.creds {
            Creds::Oidc { client_id, client_secret, refresh_token } => body.push_str(&format!(
                "client_id = {}\nclient_secret = {}\nrefresh_token = {}\n",
                toml_str(client_id),
                toml_str(client_secret),
                toml_str(refresh_token)
            )),
            Creds::Social { refresh_token } => {
                body.push_str(&format!("refresh_token = {}\n", toml_str(refresh_token)))
            }
        }
        if let Some(arn) = &e.profile_arn {
            body.push_str(&format!("profile_arn = {}\n", toml_str(arn)));
        }
        if let Some(r) = &e.auth_region {
            body.push_str(&format!("auth_region = {}\n", toml_str(r)));
        }
        if !e.enabled {
            body.push_str("enabled = false\n");
        }
    }
    out.push_str(&format!(
        "# Imported by amqctl from {}, {}: {count} account{}.\n",
        one_line(&named(path)),
        one_line(&found.format),
        if count == 1 { "" } else { "s" }
    ));
    for n in &notes {
        out.push_str(&format!("# {}\n", one_line(n)));
    }
    for w in &warnings {
        out.push_str(&format!("# not imported or left out: {}\n", one_line(w)));
    }
    out.push_str(&body);
    // The entries must be a valid accounts file as they stand.
    if let Err(diags) = amq2api::config::accounts::parse(Path::new("imported accounts"), &out) {
        return Err(fail(
            exit::DATAERR,
            format!(
                "{}: the entries made from it are not a valid accounts.toml: {}",
                named(path),
                one_line(&diags.to_string())
            ),
        ));
    }
    warnings.iter_mut().for_each(|w| *w = one_line(w));
    Ok(Output { stdout: out, warnings })
}

/// Reads a credential file and renders `[[account]]` entries with generated ids (as JSON with
/// `json`).
pub fn import(path: &Path, json: bool) -> Result<Output, Failure> {
    let found = find(path)?;
    let mut out = render(path, &found)?;
    if json {
        // The entries as rendered (and checked) above, as JSON.
        let parsed: toml::Table = toml::from_str(&out.stdout)
            .map_err(|e| fail(exit::SOFTWARE, format!("the entries do not read back: {e}")))?;
        let accounts = parsed.get("account").cloned().unwrap_or(toml::Value::Array(Vec::new()));
        let v = serde_json::json!({
            "source": named(path),
            "format": found.format,
            "accounts": accounts,
            "warnings": out.warnings,
        });
        out.stdout = format!("{}\n", serde_json::to_string_pretty(&v).unwrap_or_default());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_come_from_labels() {
        assert_eq!(id_base("Team A, first seat"), "team-a-first-seat");
        assert_eq!(id_base("Kiro IDE, Google sign-in"), "kiro-ide-google-sign-in");
        assert_eq!(id_base("Ünïcode"), "n-code");
        assert_eq!(id_base("!!!"), "imported");
        assert_eq!(id_base(&"x".repeat(100)).len(), 48);
    }

    #[test]
    fn messages_show_words_and_describe_the_rest() {
        assert_eq!(shown("social"), "\"social\"");
        assert_eq!(shown("aorSECRET/with+base64=="), "(a value of 23 characters)");
        assert_eq!(one_line("a\nb\tc"), "a b c");
    }

    #[test]
    fn regions_go_where_they_belong() {
        let mut w = Vec::new();
        let social = || Entry::new("x", "src", Creds::Social { refresh_token: "rt".into() });
        let mut e = social();
        e.place(
            Some("arn:aws:codewhisperer:us-east-1:699475941385:profile/EHGA3GRVQMUK".into()),
            Some("us-east-1".into()),
            &mut w,
        );
        assert_eq!((e.profile_arn.is_some(), e.auth_region.as_deref()), (true, None));
        let mut e = social();
        e.place(
            Some("arn:aws:codewhisperer:eu-central-1:123456789012:profile/ABC".into()),
            Some("us-east-2".into()),
            &mut w,
        );
        assert_eq!(e.auth_region.as_deref(), Some("us-east-2"));
        assert!(e.remarks.is_empty() && w.is_empty());
        let mut e = social();
        e.place(Some("not an arn".into()), Some("eu-central-1".into()), &mut w);
        assert_eq!((e.profile_arn.as_deref(), e.auth_region.as_deref()), (None, Some("eu-central-1")));
        assert_eq!((w.len(), e.remarks.len()), (1, 1));
    }
}
