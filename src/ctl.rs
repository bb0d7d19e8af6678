//! `amqctl`, the operator's CLI: talks to the daemon's control socket (HTTP/1.1 + JSON over
//! Unix) with the wire types of [`crate::control::wire`], and prints tables or stable JSON.

use crate::control::wire::*;
use crate::exit;
use bytes::Bytes;
use clap::{CommandFactory, Parser, Subcommand};
use http_body_util::{BodyExt, Full};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

pub const DEFAULT_SOCKET: &str = "/run/amq2api/control.sock";

#[derive(Debug, Parser)]
#[command(name = "amqctl", version, about = "Manage a running amq2api daemon over its control socket")]
pub struct Cli {
    /// The daemon's control socket.
    #[arg(long, global = true, env = "AMQ2API_SOCKET", default_value = DEFAULT_SOCKET, value_name = "PATH")]
    pub socket: PathBuf,
    /// Print JSON (stable, for scripts) instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Daemon version and uptime, listeners, configuration state, pool summary, one row an account.
    Status,
    /// List the accounts.
    Accounts,
    /// One account in detail.
    Account { id: String },
    /// Refresh access tokens now and report each result.
    Refresh {
        ids: Vec<String>,
        /// Every account.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
    /// Make a real minimal Amazon Q call per account and classify the result (updates its state).
    Check {
        ids: Vec<String>,
        /// Every account.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
    /// Put an account back in rotation (also clears a suspension, quota or cooldown).
    Enable { id: String },
    /// Take an account out of rotation (in-flight requests finish).
    Disable { id: String },
    /// Re-read the configuration and the accounts file (the same as SIGHUP).
    Reload,
    /// Convert a seed amq2api export (label|password|clientId|clientSecret|refreshToken|accessToken
    /// lines, or its /v2/accounts JSON array) into accounts.toml entries on stdout.
    Import { file: PathBuf },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff).
    Man,
}

/// A failure with its exit code.
#[derive(Debug)]
pub struct Failure {
    pub code: i32,
    pub message: String,
}

fn fail(code: i32, message: impl Into<String>) -> Failure {
    Failure { code, message: message.into() }
}

/// Runs amqctl; returns the exit code.
pub fn main(cli: Cli) -> i32 {
    let result = match &cli.command {
        Command::Completions { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "amqctl", &mut std::io::stdout());
            Ok(exit::OK)
        }
        Command::Man => {
            let man = clap_mangen::Man::new(Cli::command());
            match man.render(&mut std::io::stdout()) {
                Ok(()) => Ok(exit::OK),
                Err(e) => Err(fail(exit::IOERR, e.to_string())),
            }
        }
        Command::Import { file } => import(file).map(|out| {
            print!("{out}");
            exit::OK
        }),
        _ => match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt.block_on(run(&cli)),
            Err(e) => Err(fail(exit::OSERR, e.to_string())),
        },
    };
    match result {
        Ok(code) => code,
        Err(f) => {
            eprintln!("amqctl: {}", f.message);
            f.code
        }
    }
}

/// One request to the daemon.
async fn call(socket: &Path, method: &str, path: &str) -> Result<(u16, Bytes), Failure> {
    let stream = tokio::net::UnixStream::connect(socket).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => fail(
            exit::UNAVAILABLE,
            format!(
                "amq2api is not running (no socket at {}); start it with: systemctl start amq2api",
                socket.display()
            ),
        ),
        std::io::ErrorKind::PermissionDenied => permission_denied(socket),
        _ => fail(exit::UNAVAILABLE, format!("cannot connect to {}: {e}", socket.display())),
    })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .map_err(|e| fail(exit::UNAVAILABLE, format!("control socket handshake failed: {e}")))?;
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .map_err(|e| fail(exit::SOFTWARE, e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| fail(exit::UNAVAILABLE, format!("control request failed: {e}")))?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| fail(exit::UNAVAILABLE, format!("reading the answer: {e}")))?
        .to_bytes();
    if status == 403 {
        return Err(permission_denied(socket));
    }
    if status >= 400 {
        let msg = serde_json::from_slice::<ErrorBody>(&body)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&body).into());
        return Err(fail(if status == 404 { exit::USAGE } else { exit::FAILURE }, msg));
    }
    Ok((status, body))
}

fn permission_denied(socket: &Path) -> Failure {
    fail(
        exit::NOPERM,
        format!(
            "permission denied on {}: add yourself to group amq2api (sudo usermod -aG amq2api $USER, then log in again) or run as root",
            socket.display()
        ),
    )
}

async fn get<T: serde::de::DeserializeOwned>(
    socket: &Path,
    method: &str,
    path: &str,
) -> Result<(T, Bytes), Failure> {
    let (_, body) = call(socket, method, path).await?;
    let v = serde_json::from_slice(&body)
        .map_err(|e| fail(exit::SOFTWARE, format!("unexpected answer from the daemon: {e}")))?;
    Ok((v, body))
}

fn print_json(body: &Bytes) {
    println!("{}", String::from_utf8_lossy(body).trim_end());
}

async fn run(cli: &Cli) -> Result<i32, Failure> {
    let s = &cli.socket;
    match &cli.command {
        Command::Status => {
            let (st, body) = get::<Status>(s, "GET", "/v1/status").await?;
            if st.api_version != API_VERSION || st.server_version != env!("CARGO_PKG_VERSION") {
                eprintln!(
                    "amqctl: warning: daemon is amq2api {} (control API v{}), amqctl is {} (v{})",
                    st.server_version,
                    st.api_version,
                    env!("CARGO_PKG_VERSION"),
                    API_VERSION
                );
            }
            if cli.json {
                print_json(&body);
            } else {
                print!("{}", render_status(&st, style()));
            }
            Ok(exit::OK)
        }
        Command::Accounts => {
            let (list, body) = get::<Vec<AccountInfo>>(s, "GET", "/v1/accounts").await?;
            if cli.json {
                print_json(&body);
            } else {
                print!("{}", render_accounts(&list, style()));
            }
            Ok(exit::OK)
        }
        Command::Account { id } => {
            let (a, body) = get::<AccountInfo>(s, "GET", &format!("/v1/accounts/{id}")).await?;
            if cli.json {
                print_json(&body);
            } else {
                print!("{}", render_account(&a));
            }
            Ok(exit::OK)
        }
        Command::Refresh { ids, all } => actions(cli, "refresh", ids, *all).await,
        Command::Check { ids, all } => actions(cli, "check", ids, *all).await,
        Command::Enable { id } | Command::Disable { id } => {
            let verb = if matches!(cli.command, Command::Enable { .. }) { "enable" } else { "disable" };
            let (r, body) = get::<ActionResult>(s, "POST", &format!("/v1/accounts/{id}/{verb}")).await?;
            if cli.json {
                print_json(&body);
            } else {
                println!("{}: {} (state {})", r.id, r.message, r.state);
            }
            Ok(if r.ok { exit::OK } else { exit::FAILURE })
        }
        Command::Reload => {
            let (r, body) = get::<ReloadResult>(s, "POST", "/v1/reload").await?;
            if cli.json {
                print_json(&body);
            } else if r.ok {
                println!("reloaded: {}", r.changes);
                // Each is a diagnostic that names its file and says "warning:" itself.
                for w in &r.warnings {
                    eprintln!("{w}");
                }
            } else {
                eprintln!("reload refused (the running configuration stays):");
                for e in &r.errors {
                    eprintln!("  {e}");
                }
            }
            Ok(if r.ok { exit::OK } else { exit::CONFIG })
        }
        Command::Import { .. } | Command::Completions { .. } | Command::Man => Ok(exit::OK),
    }
}

/// refresh / check: one line per account as results arrive, a summary, non-zero if any failed.
async fn actions(cli: &Cli, verb: &str, ids: &[String], all: bool) -> Result<i32, Failure> {
    let s = &cli.socket;
    if ids.is_empty() && !all {
        return Err(fail(exit::USAGE, format!("name accounts (amqctl {verb} ID…) or use --all")));
    }
    // With --all, the daemon's list names the accounts; either way each account is its own call,
    // at most 8 at once, and each line is printed as its result arrives.
    let ids: Vec<String> = if all {
        get::<Vec<AccountInfo>>(s, "GET", "/v1/accounts").await?.0.into_iter().map(|a| a.id).collect()
    } else {
        ids.to_vec()
    };
    let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(8));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for (i, id) in ids.iter().enumerate() {
        let (s, path, id, tx, limit) =
            (s.clone(), format!("/v1/accounts/{id}/{verb}"), id.clone(), tx.clone(), limit.clone());
        tokio::spawn(async move {
            let _permit = limit.acquire_owned().await;
            let r = get::<ActionResult>(&s, "POST", &path).await.map(|(r, _)| r);
            let _ = tx.send((i, id, r));
        });
    }
    drop(tx);
    let mut results: Vec<(usize, ActionResult)> = Vec::new();
    while let Some((i, id, r)) = rx.recv().await {
        let r = match r {
            Ok(r) => r,
            Err(f) if f.code == exit::UNAVAILABLE || f.code == exit::NOPERM => return Err(f),
            Err(f) => ActionResult { id, ok: false, message: f.message, state: "-".into() },
        };
        if !cli.json {
            print_action(&r);
        }
        results.push((i, r));
    }
    // JSON keeps the accounts' order.
    results.sort_by_key(|(i, _)| *i);
    let results: Vec<ActionResult> = results.into_iter().map(|(_, r)| r).collect();
    let failed = results.iter().filter(|r| !r.ok).count();
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&results).unwrap_or_default());
    } else {
        println!(
            "{} of {} succeeded{}",
            results.len() - failed,
            results.len(),
            if failed > 0 { format!(", {failed} failed") } else { String::new() }
        );
    }
    Ok(if failed > 0 { exit::FAILURE } else { exit::OK })
}

fn print_action(r: &ActionResult) {
    let mark = if r.ok { "ok  " } else { "FAIL" };
    println!("{mark} {:<20} {} (state {})", r.id, r.message, r.state);
}

#[derive(Clone, Copy)]
pub struct Style {
    pub color: bool,
    pub width: usize,
}

fn style() -> Style {
    let width = std::env::var("COLUMNS").ok().and_then(|c| c.parse().ok()).unwrap_or(120);
    Style { color: std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(), width }
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// "5m", "2h10m", "3d".
pub fn human(secs: i64) -> String {
    let (neg, s) = (secs < 0, secs.unsigned_abs());
    let t = if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m", s / 60)
    } else if s < 86_400 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}d{}h", s / 86_400, (s % 86_400) / 3600)
    };
    if neg { format!("-{t}") } else { t }
}

fn ago(t: Option<u64>) -> String {
    t.map(|t| format!("{} ago", human(now() as i64 - t as i64))).unwrap_or_else(|| "never".into())
}

fn state_text(a: &AccountInfo) -> String {
    let mut s = a.state.clone();
    if let Some(u) = a.until {
        s.push_str(&format!(" ({} left)", human(u as i64 - now() as i64)));
    } else if a.state != "active" {
        if let Some(since) = a.since {
            s.push_str(&format!(" ({})", ago(Some(since))));
        }
    }
    s
}

fn paint(s: &str, state: &str, st: Style) -> String {
    if !st.color {
        return s.to_string();
    }
    let code = match state {
        "active" => "32",
        "cooling" | "quota" => "33",
        _ => "31",
    };
    format!("\x1b[{code}m{s}\x1b[0m")
}

fn cut(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

pub fn render_accounts(list: &[AccountInfo], st: Style) -> String {
    let headers =
        ["ID", "LABEL", "STATE", "TOKEN", "IN-FLIGHT", "REQUESTS", "FAILURES", "LAST USED", "LAST ERROR"];
    let rows: Vec<[String; 9]> = list
        .iter()
        .map(|a| {
            [
                a.id.clone(),
                a.label.clone(),
                state_text(a),
                if a.tokens_unsaved {
                    "NOT STORED".into()
                } else {
                    a.token_expires_at.map(|t| human(t as i64 - now() as i64)).unwrap_or_else(|| "-".into())
                },
                format!("{}/{}", a.in_flight, a.max_concurrency),
                a.requests.to_string(),
                a.failures.to_string(),
                ago(a.last_used),
                a.last_error.clone().or_else(|| a.reason.clone()).unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate().take(8) {
            widths[i] = widths[i].max(c.chars().count().min(if i == 1 { 24 } else { 40 }));
        }
    }
    let fixed: usize = widths[..8].iter().sum::<usize>() + 2 * 8;
    widths[8] = st.width.saturating_sub(fixed).max(10);
    let mut out = String::new();
    let line = |cells: Vec<String>, out: &mut String, state: Option<&str>| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            let c = cut(c, widths[i]);
            let pad = widths[i].saturating_sub(c.chars().count());
            let text = if i == 2 { state.map(|s| paint(&c, s, st)).unwrap_or(c) } else { c };
            l.push_str(&text);
            if i + 1 < cells.len() {
                l.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(headers.iter().map(|h| h.to_string()).collect(), &mut out, None);
    for (r, a) in rows.into_iter().zip(list) {
        line(r.to_vec(), &mut out, Some(&a.state));
    }
    out
}

pub fn render_status(s: &Status, st: Style) -> String {
    let mut out = format!(
        "amq2api {} (pid {}), up {}\nlisteners: {}\nconfig:    {}\naccounts:  {} (loaded {})\n",
        s.server_version,
        s.pid,
        human(s.uptime_secs as i64),
        if s.listeners.is_empty() { "-".into() } else { s.listeners.join(", ") },
        s.config.config_file,
        s.config.accounts_file,
        ago(Some(s.config.loaded_at)),
    );
    if let Some(e) = &s.config.last_reload_error {
        out.push_str(&format!("LAST RELOAD FAILED ({}): {e}\n", ago(s.config.last_reload_at)));
    }
    if let Some(problem) = &s.persistence_problem {
        out.push_str(&format!("DEGRADED: {problem}\n"));
    }
    let p = &s.pool;
    out.push_str(&format!(
        "pool:      {} accounts: {} active, {} cooling, {} quota, {} suspended, {} invalid, {} disabled; {} in flight, {} streams\n\n",
        p.total, p.active, p.cooling, p.quota, p.suspended, p.invalid, p.disabled, p.in_flight, s.streams_in_flight
    ));
    out.push_str(&render_accounts(&s.accounts, st));
    out
}

fn render_account(a: &AccountInfo) -> String {
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let time = |t: Option<u64>| t.map(|t| format!("{t} ({})", ago(Some(t)))).unwrap_or_else(|| "-".into());
    format!(
        "id:               {}\nlabel:            {}\nenabled:          {}\nstate:            {}\nreason:           {}\nsince:            {}\nuntil:            {}\ntoken expires in: {}\ntoken:            {}{}\nin flight:        {}/{}\nweight:           {}\nrequests:         {}\nfailures:         {}\ntokens in/out:    {}/{}\nlast used:        {}\nlast error:       {}\n",
        a.id,
        a.label,
        a.enabled,
        a.state,
        opt(&a.reason),
        time(a.since),
        a.until.map(|u| format!("{u} (in {})", human(u as i64 - now() as i64))).unwrap_or_else(|| "-".into()),
        a.token_expires_at.map(|t| human(t as i64 - now() as i64)).unwrap_or_else(|| "-".into()),
        a.token_fingerprint.as_deref().map(|f| format!("sha256:{f}…")).unwrap_or_else(|| "-".into()),
        if a.tokens_unsaved { " (rotated refresh token NOT STORED yet: retrying)" } else { "" },
        a.in_flight,
        a.max_concurrency,
        a.weight,
        a.requests,
        a.failures,
        a.tokens_in,
        a.tokens_out,
        ago(a.last_used),
        opt(&a.last_error),
    )
}

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
    for (i, a) in accounts.iter().enumerate() {
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
        let _ = i;
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
        let set = crate::config::accounts::parse(Path::new("x.toml"), &out).unwrap().0;
        assert_eq!(set.len(), 2);
    }

    #[test]
    fn human_durations() {
        assert_eq!(human(5), "5s");
        assert_eq!(human(300), "5m");
        assert_eq!(human(7800), "2h10m");
        assert_eq!(human(-90), "-1m");
    }
}
