//! The commands that talk to the daemon (status, accounts, account, refresh, check, enable,
//! disable, reload): the calls each makes, what it prints (a table or the daemon's JSON) and the
//! exit code it returns.

use crate::cli::{Cli, Command};
use crate::client::get;
use crate::failure::{Failure, fail};
use crate::render::{render_account, render_accounts, render_action, render_status, style};
use amq2api::control::wire::*;
use amq2api::exit;
use bytes::Bytes;

fn print_json(body: &Bytes) {
    outln!("{}", String::from_utf8_lossy(body).trim_end());
}

/// Runs a command that calls the daemon (main runs the offline ones); returns the exit code.
pub async fn run(cli: &Cli) -> Result<i32, Failure> {
    crate::client::set_timeout(cli.timeout);
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
                out!("{}", render_status(&st, style()));
            }
            Ok(exit::OK)
        }
        Command::Accounts => {
            let (list, body) = get::<Vec<AccountInfo>>(s, "GET", "/v1/accounts").await?;
            if cli.json {
                print_json(&body);
            } else {
                out!("{}", render_accounts(&list, style()));
            }
            Ok(exit::OK)
        }
        Command::Account { id } => {
            let (a, body) = get::<AccountInfo>(s, "GET", &account_path(id, "")?).await?;
            if cli.json {
                print_json(&body);
            } else {
                out!("{}", render_account(&a));
            }
            Ok(exit::OK)
        }
        Command::Refresh { ids, all } => actions(cli, "refresh", ids, *all).await,
        Command::Check { ids, all } => actions(cli, "check", ids, *all).await,
        Command::Enable { ids, all } | Command::Disable { ids, all } => {
            let verb = if matches!(cli.command, Command::Enable { .. }) { "enable" } else { "disable" };
            // Several accounts (or --all): a line each as for refresh and check, and a summary.
            let [id] = ids.as_slice() else { return actions(cli, verb, ids, *all).await };
            let (r, body) = get::<ActionResult>(s, "POST", &account_path(id, verb)?).await?;
            if cli.json {
                print_json(&body);
            } else {
                outln!("{}: {} (state {})", r.id, r.message, r.state);
            }
            Ok(if r.ok { exit::OK } else { exit::FAILURE })
        }
        Command::Reload => {
            let (r, body) = get::<ReloadResult>(s, "POST", "/v1/reload").await?;
            if cli.json {
                print_json(&body);
            } else if r.ok {
                outln!("reloaded: {}", r.changes);
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
        Command::Export => {
            let (e, body) = get::<Export>(s, "GET", "/v1/export").await?;
            eprintln!(
                "amqctl: warning: stdout holds the secrets of {} accounts: keep it where accounts.toml is kept \
                 (root:amq2api, mode 0640)",
                e.accounts.len()
            );
            if cli.json {
                print_json(&body);
            } else {
                out!("{}", crate::render::render_export(&e));
            }
            Ok(exit::OK)
        }
        Command::Keys => {
            let (list, body) = get::<Vec<KeyView>>(s, "GET", "/v1/keys").await?;
            if cli.json {
                print_json(&body);
            } else {
                out!("{}", crate::keys::render_keys(&list));
            }
            Ok(exit::OK)
        }
        Command::Usage { by, days, csv } => {
            let path = format!("/v1/usage?by={}&days={days}", by.as_str());
            let (rows, body) = get::<Vec<UsageLine>>(s, "GET", &path).await?;
            if cli.json {
                print_json(&body);
            } else if *csv {
                out!("{}", crate::keys::render_usage_csv(&rows));
            } else {
                out!("{}", crate::keys::render_usage(&rows, by.as_str()));
            }
            Ok(exit::OK)
        }
        Command::Import { .. }
        | Command::Login { .. }
        | Command::Completions { .. }
        | Command::Man
        | Command::Key(_) => Ok(exit::OK),
    }
}

/// The control path of account `id` (and its `action`, if any). An id the accounts file could
/// not hold is no account (exit 64), not a malformed request (a space) or another account's
/// path (`a1?x` is `a1` to a URL).
fn account_path(id: &str, action: &str) -> Result<String, Failure> {
    let id = amq2api::config::AccountId::parse(id)
        .map_err(|e| fail(exit::USAGE, format!("no account {id:?}: {e}")))?;
    Ok(if action.is_empty() { format!("/v1/accounts/{id}") } else { format!("/v1/accounts/{id}/{action}") })
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
    let paths = ids.iter().map(|id| account_path(id, verb)).collect::<Result<Vec<_>, _>>()?;
    let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(8));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for (i, (id, path)) in ids.iter().zip(paths).enumerate() {
        let (s, id, tx, limit) = (s.clone(), id.clone(), tx.clone(), limit.clone());
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
            Err(f) => ActionResult { id, ok: false, message: f.message, state: "-".into(), queued: false },
        };
        if !cli.json {
            outln!("{}", render_action(&r));
        }
        results.push((i, r));
    }
    // JSON keeps the accounts' order.
    results.sort_by_key(|(i, _)| *i);
    let results: Vec<ActionResult> = results.into_iter().map(|(_, r)| r).collect();
    let failed = results.iter().filter(|r| !r.ok).count();
    let queued = results.iter().filter(|r| r.ok && r.queued).count();
    if cli.json {
        outln!("{}", serde_json::to_string_pretty(&results).unwrap_or_default());
    } else {
        outln!(
            "{} of {} succeeded{}{}",
            results.len() - failed,
            results.len(),
            if queued > 0 {
                format!(
                    " ({} here, {queued} queued for the nodes that hold them)",
                    results.len() - failed - queued
                )
            } else {
                String::new()
            },
            if failed > 0 { format!(", {failed} failed") } else { String::new() }
        );
    }
    Ok(if failed > 0 { exit::FAILURE } else { exit::OK })
}
