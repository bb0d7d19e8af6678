//! Named keys and usage: `amqctl key new NAME` (offline: a fresh key and its `[[key]]` entry),
//! and the tables of `amqctl keys` and `amqctl usage` (text and CSV).

use crate::failure::{Failure, fail};
use amq2api::control::wire::{KeyView, UsageLine};
use amq2api::exit;
use std::collections::BTreeMap;
use std::fmt::Write;

/// `amqctl key new NAME`: the key is printed once (stderr); the entry, on stdout, carries only its
/// digest. With `--json`, one object on stdout with both.
pub fn new_key(name: &str, json: bool) -> Result<i32, Failure> {
    if !amq2api::config::keys::valid_name(name) {
        return Err(fail(
            exit::USAGE,
            format!(
                "key name {name:?} must be 1 to 64 of lowercase letters, digits, '_', '.' and '-', with a letter or digit"
            ),
        ));
    }
    let key = format!("sk-amq-{}", hex::encode(amq2api::ids::random_bytes::<24>()));
    let digest = hex::encode(amq2api::hash::sha256(key.as_bytes()));
    let entry = format!("[[key]]\nname = \"{name}\"\nkey = \"sha256:{digest}\"\nenabled = true\n");
    if json {
        let v = serde_json::json!({"name": name, "key": key, "digest": format!("sha256:{digest}"), "entry": entry});
        outln!("{v}");
    } else {
        // The key on stderr, the entry on stdout: `amqctl key new bob >> keys.toml` appends only
        // the digest, and the key shows on the terminal, once.
        eprintln!("The key for {name:?} (give it to its holder now: it is not shown again, nor stored):");
        eprintln!();
        eprintln!("    {key}");
        eprintln!();
        eprintln!("Its entry for the keys file ([auth] keys_file), holding only the key's digest:");
        out!("\n{entry}");
    }
    Ok(exit::OK)
}

fn limit<T: std::fmt::Display>(used: String, l: Option<T>) -> String {
    match l {
        Some(l) => format!("{used}/{l}"),
        None => used,
    }
}

fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let n = cells.len();
        for (i, c) in cells.into_iter().enumerate() {
            if i + 1 == n {
                out.push_str(c);
            } else {
                let _ = write!(out, "{c:<width$}  ", width = w[i]);
            }
        }
        out.push('\n');
    };
    line(headers.to_vec(), &mut out);
    for r in rows {
        line(r.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

/// `amqctl keys`: one row a key; used/limit where a limit is set.
pub fn render_keys(list: &[KeyView]) -> String {
    if list.is_empty() {
        return "no named keys (set [auth] keys_file; amqctl key new NAME makes an entry)\n".into();
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|k| {
            vec![
                k.name.clone(),
                k.state.clone(),
                limit(k.requests_last_minute.to_string(), k.rpm),
                limit(k.in_flight.to_string(), k.max_concurrency),
                limit(k.tokens_today.to_string(), k.tokens_per_day),
                limit(format!("{:.2}", k.credits_this_month), k.credits_per_month),
                k.refused.to_string(),
                k.expires.map(expiry).unwrap_or_else(|| "-".into()),
                if k.models.is_empty() { "all".into() } else { k.models.join(",") },
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "STATE",
            "RPM",
            "IN-FLIGHT",
            "TOKENS TODAY",
            "CREDITS MONTH",
            "REFUSED",
            "EXPIRES",
            "MODELS",
        ],
        &rows,
    )
}

fn expiry(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let (y, m, d) = amq2api::config::keys::civil_from_days(days);
    let s = unix % 86_400;
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", s / 3600, s / 60 % 60, s % 60)
}

/// `amqctl usage`: one row per day and name, newest day first, and a total per name.
pub fn render_usage(rows: &[UsageLine], by: &str) -> String {
    if rows.is_empty() {
        return "no usage in these days\n".into();
    }
    let mut sorted: Vec<&UsageLine> = rows.iter().collect();
    sorted.sort_by(|a, b| b.day.cmp(&a.day).then(a.name.cmp(&b.name)));
    let cells = |day: &str, r: &UsageLine| {
        vec![
            day.to_string(),
            r.name.clone(),
            r.requests.to_string(),
            r.errors.to_string(),
            r.tokens_in.to_string(),
            r.tokens_out.to_string(),
            format!("{:.4}", r.credits),
        ]
    };
    let mut out: Vec<Vec<String>> = sorted.iter().map(|r| cells(&r.day, r)).collect();
    let mut totals: BTreeMap<&str, UsageLine> = BTreeMap::new();
    for r in rows {
        let t = totals.entry(&r.name).or_insert_with(|| UsageLine {
            day: "total".into(),
            by: r.by.clone(),
            name: r.name.clone(),
            requests: 0,
            errors: 0,
            tokens_in: 0,
            tokens_out: 0,
            credits: 0.0,
        });
        t.requests += r.requests;
        t.errors += r.errors;
        t.tokens_in += r.tokens_in;
        t.tokens_out += r.tokens_out;
        t.credits += r.credits;
    }
    out.extend(totals.values().map(|t| cells("total", t)));
    let name = by.to_uppercase();
    table(&["DAY", &name, "REQUESTS", "ERRORS", "TOKENS IN", "TOKENS OUT", "CREDITS"], &out)
}

/// `amqctl usage --csv`: a header line, then one line per day and name.
pub fn render_usage_csv(rows: &[UsageLine]) -> String {
    let mut out = String::from("day,by,name,requests,errors,tokens_in,tokens_out,credits\n");
    for r in rows {
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{},{:.4}",
            r.day, r.by, r.name, r.requests, r.errors, r.tokens_in, r.tokens_out, r.credits
        );
    }
    out
}
