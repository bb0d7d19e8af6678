//! amqctl's tables and detail views for people: account rows with states, token expiries and
//! ages, the status summary, one line an action; colour only on a terminal without `NO_COLOR`.

use amq2api::control::wire::{AccountInfo, ActionResult, Export, Status};
use std::io::IsTerminal;
use std::time::{SystemTime, UNIX_EPOCH};

/// One line of `refresh` / `check`: the mark, the account, what happened, its state afterwards.
pub fn render_action(r: &ActionResult) -> String {
    let mark = if r.ok { "ok  " } else { "FAIL" };
    format!("{mark} {:<20} {} (state {})", r.id, r.message, r.state)
}

#[derive(Clone, Copy)]
pub struct Style {
    pub color: bool,
    pub width: usize,
}

/// The style of standard output: colour on a terminal without `NO_COLOR`, `$COLUMNS` wide (120).
pub fn style() -> Style {
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

/// The last error with when it happened (`3m ago: …`).
fn last_error(a: &AccountInfo) -> Option<String> {
    let e = a.last_error.as_ref()?;
    Some(match a.last_error_at {
        Some(at) => format!("{}: {e}", ago(Some(at))),
        None => e.clone(),
    })
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

/// The accounts table: one row an account, the last column (the last error) fills the width.
pub fn render_accounts(list: &[AccountInfo], st: Style) -> String {
    let headers = [
        "ID",
        "LABEL",
        "STATE",
        "KIND",
        "TOKEN",
        "IN-FLIGHT",
        "RPM",
        "REQUESTS",
        "FAILURES",
        "LAST USED",
        "LAST ERROR",
    ];
    const LAST: usize = 10;
    let rows: Vec<[String; 11]> = list
        .iter()
        .map(|a| {
            [
                a.id.clone(),
                a.label.clone(),
                state_text(a),
                if a.kind.is_empty() { "-".into() } else { a.kind.clone() },
                if a.tokens_unsaved {
                    "NOT STORED".into()
                } else {
                    a.token_expires_at.map(|t| human(t as i64 - now() as i64)).unwrap_or_else(|| "-".into())
                },
                format!("{}/{}", a.in_flight, a.max_concurrency),
                match a.rpm {
                    Some(limit) => format!("{}/{limit}", a.requests_last_minute),
                    None => "-".into(),
                },
                a.requests.to_string(),
                a.failures.to_string(),
                ago(a.last_used),
                last_error(a).or_else(|| a.reason.clone()).unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate().take(LAST) {
            widths[i] = widths[i].max(c.chars().count().min(if i == 1 { 24 } else { 40 }));
        }
    }
    let fixed: usize = widths[..LAST].iter().sum::<usize>() + 2 * LAST;
    widths[LAST] = st.width.saturating_sub(fixed).max(10);
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

/// `amqctl status`: the daemon, its configuration, the pool summary, then the accounts table.
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
    if let Some(c) = &s.cluster {
        out.push_str(&render_cluster(c));
    }
    out.push_str(&render_accounts(&s.accounts, st));
    out
}

/// The nodes and who holds each account, under `[cluster]`.
fn render_cluster(c: &amq2api::control::wire::ClusterState) -> String {
    let mut out = format!(
        "cluster:   this node {}
",
        c.node_id
    );
    if let Some(e) = &c.error {
        out.push_str(&format!(
            "CLUSTER UNREACHABLE: {e}
\n"
        ));
        return out;
    }
    out.push_str("NODE                 ALIVE  HEARTBEAT  LEASES  STATUS\n");
    for n in &c.nodes {
        out.push_str(&format!(
            "{:<20} {:<6} {:>8}ms  {:>6}  {}\n",
            n.node_id,
            if n.alive { "yes" } else { "no" },
            n.heartbeat_age_ms,
            n.leases,
            n.status
        ));
    }
    out.push_str("ACCOUNT              HELD BY              EPOCH  EXPIRES IN\n");
    for l in &c.leases {
        out.push_str(&format!(
            "{:<20} {:<20} {:>5}  {}\n",
            l.account,
            l.node_id.as_deref().unwrap_or("-"),
            l.epoch,
            if l.expires_in_ms >= 0 { format!("{} ms", l.expires_in_ms) } else { "expired".into() }
        ));
    }
    out.push('\n');
    out
}

/// `amqctl account ID`: every field of one account, one a line.
pub fn render_account(a: &AccountInfo) -> String {
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let time = |t: Option<u64>| t.map(|t| format!("{t} ({})", ago(Some(t)))).unwrap_or_else(|| "-".into());
    format!(
        "id:               {}\nlabel:            {}\nkind:             {}\nenabled:          {}\nstate:            {}\nreason:           {}\nsince:            {}\nuntil:            {}\nendpoint:         {}\nprofile ARN:      {}\ntoken expires in: {}\ntoken:            {}{}\nin flight:        {}/{}\nrequests/minute:  {}\nmodels:           {}\nweight:           {}\nrequests:         {}\nfailures:         {}\ntokens in/out:    {}/{}\ncredits:          {:.4}\nlast used:        {}\nlast model:       {}\nlast error:       {}\n",
        a.id,
        a.label,
        if a.kind.is_empty() { "-" } else { &a.kind },
        a.enabled,
        a.state,
        opt(&a.reason),
        time(a.since),
        a.until.map(|u| format!("{u} (in {})", human(u as i64 - now() as i64))).unwrap_or_else(|| "-".into()),
        opt(&a.endpoint),
        opt(&a.profile_arn),
        a.token_expires_at.map(|t| human(t as i64 - now() as i64)).unwrap_or_else(|| "-".into()),
        a.token_fingerprint.as_deref().map(|f| format!("sha256:{f}…")).unwrap_or_else(|| "-".into()),
        if a.tokens_unsaved { " (rotated refresh token NOT STORED yet: retrying)" } else { "" },
        a.in_flight,
        a.max_concurrency,
        match a.rpm {
            Some(limit) => format!("{} of {limit} (rpm)", a.requests_last_minute),
            None => format!("{} (no rpm limit)", a.requests_last_minute),
        },
        match (&a.catalog_fetched_at, &a.catalog_error) {
            (None, None) => "- (catalog not fetched yet)".to_owned(),
            (None, Some(e)) => format!("- ({e})"),
            (Some(at), e) => format!(
                "{} (catalog {}{})",
                if a.models.is_empty() { "none".to_owned() } else { a.models.join(", ") },
                ago(Some(*at)),
                e.as_deref().map(|e| format!("; last fetch failed: {e}")).unwrap_or_default()
            ),
        },
        a.weight,
        a.requests,
        a.failures,
        a.tokens_in,
        a.tokens_out,
        a.credits,
        ago(a.last_used),
        opt(&a.last_model),
        last_error(a).unwrap_or_else(|| "-".into()),
    )
}

/// `amqctl export`: accounts.toml entries with the live credentials.
pub fn render_export(e: &Export) -> String {
    use crate::import::{one_line, toml_str as q};
    let t = e.exported_at;
    let mut out = format!(
        "# amqctl export: the live credentials of {} accounts, {} {:02}:{:02} UTC (the daemon's accounts file:\n\
         # {}). A refresh token marked rotated replaces the file's, which no longer works; each is\n\
         # good until the daemon refreshes that account again (the old token dies at each rotation).\n",
        e.accounts.len(),
        crate::login::date(t),
        t % 86_400 / 3600,
        t % 3600 / 60,
        one_line(&e.accounts_file),
    );
    for a in &e.accounts {
        out.push_str(&format!("\n[[account]]\nid = {}\n", q(&a.id)));
        if !a.label.is_empty() {
            out.push_str(&format!("label = {}\n", q(&a.label)));
        }
        out.push_str(&format!("kind = {}\n", q(&a.kind)));
        for (key, v) in [("client_id", &a.client_id), ("client_secret", &a.client_secret)] {
            if let Some(v) = v {
                out.push_str(&format!("{key} = {}\n", q(v)));
            }
        }
        if let Some(r) = &a.refresh_token {
            let note = if a.rotated { "   # rotated by the daemon" } else { "" };
            out.push_str(&format!("refresh_token = {}{note}\n", q(r)));
        }
        if let Some(k) = &a.api_key {
            out.push_str(&format!("api_key = {}\n", q(k)));
        }
        for (key, v) in [
            ("profile_arn", &a.profile_arn),
            ("region", &a.region),
            ("auth_region", &a.auth_region),
            ("proxy", &a.proxy),
        ] {
            if let Some(v) = v {
                out.push_str(&format!("{key} = {}\n", q(v)));
            }
        }
        out.push_str(&format!(
            "enabled = {}\nweight = {}\nmax_concurrency = {}\n",
            a.enabled, a.weight, a.max_concurrency
        ));
        if let Some(r) = a.rpm {
            out.push_str(&format!("rpm = {r}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_durations() {
        assert_eq!(human(5), "5s");
        assert_eq!(human(300), "5m");
        assert_eq!(human(7800), "2h10m");
        assert_eq!(human(-90), "-1m");
    }
}
