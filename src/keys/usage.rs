//! Usage accounting: requests, errors, tokens in and out and credits per key, per account and per
//! model, per UTC day. Requests add to an in-memory batch (a map insert under a lock); a
//! background task commits the batch every [`BATCH_WINDOW`] in one durable store transaction, so
//! the store sees about one commit a second whatever the request rate, and a crash loses at most
//! the last window. Reports and a clean stop flush first. Rows older than the retention are
//! deleted hourly.

use crate::store::{Store, StoreError, UsageRow, split_usage_key, write_usage_key};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// How long a finished request's usage may wait in memory before it is committed.
pub const BATCH_WINDOW: Duration = Duration::from_secs(1);

/// What one finished `/v1/messages` request used.
#[derive(Debug, Clone, Default)]
pub struct UsageEvent {
    pub account: Option<String>,
    pub model: String,
    pub error: bool,
    pub tokens_in: u64,
    pub tokens_out: u64,
    pub credits: f64,
}

/// One report row.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct UsageLine {
    pub day: String,
    /// `key`, `account` or `model`.
    pub by: String,
    pub name: String,
    pub requests: u64,
    pub errors: u64,
    pub tokens_in: u64,
    pub tokens_out: u64,
    pub credits: f64,
}

/// Where usage rows are kept: the redb store (one node) or PostgreSQL (`[cluster]`: the rows
/// are the fleet's, every node adding its batches to the same rows). Blocking calls.
pub trait UsageStore: Send + Sync {
    /// Adds each delta to its row (`usage_key` → counts), in one commit.
    fn add_usage(&self, batch: &[(String, UsageRow)]) -> Result<(), StoreError>;
    /// Every row from day `from` (`YYYY-MM-DD`) on, in key order.
    fn usage_since(&self, from: &str) -> Result<Vec<(String, UsageRow)>, StoreError>;
    /// The rows of one dimension (`key`, `account`, `model`) from day `from` on.
    fn usage_since_of(&self, from: &str, dim: &str) -> Result<Vec<(String, UsageRow)>, StoreError> {
        let mut rows = self.usage_since(from)?;
        rows.retain(|(k, _)| split_usage_key(k).is_some_and(|(_, d, _)| d == dim));
        Ok(rows)
    }
    /// Deletes the rows of days before `before`; how many.
    fn prune_usage(&self, before: &str) -> Result<usize, StoreError>;
}

impl UsageStore for Store {
    fn add_usage(&self, batch: &[(String, UsageRow)]) -> Result<(), StoreError> {
        Store::add_usage(self, batch)
    }
    fn usage_since(&self, from: &str) -> Result<Vec<(String, UsageRow)>, StoreError> {
        Store::usage_since(self, from)
    }
    fn prune_usage(&self, before: &str) -> Result<usize, StoreError> {
        Store::prune_usage(self, before)
    }
}

/// The usage recorder (see the module documentation).
pub struct Usage {
    /// `None`: kept in memory only (tools, tests without a state directory).
    store: Option<Arc<dyn UsageStore>>,
    pending: Mutex<BTreeMap<String, UsageRow>>,
    memory: Mutex<BTreeMap<String, UsageRow>>,
    /// One flush at a time (the batch task and a report may meet).
    flushing: Mutex<()>,
    pub retention_days: u32,
}

/// The model dimension's name: client-chosen names that are not Claude model names count as
/// `other`, so that the rows stay bounded.
fn model_name(model: &str) -> &str {
    if !model.is_empty()
        && model.len() <= 64
        && model.starts_with("claude")
        && model.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.[]:".contains(&b))
    {
        model
    } else {
        "other"
    }
}

impl Usage {
    pub fn new(store: Option<Arc<dyn UsageStore>>, retention_days: u32) -> Arc<Usage> {
        Arc::new(Usage {
            store,
            pending: Mutex::default(),
            memory: Mutex::default(),
            flushing: Mutex::default(),
            retention_days,
        })
    }

    /// Adds one finished request to today's rows of its key, account and model.
    pub fn record(&self, key: &str, ev: UsageEvent) {
        let day = super::day_string(super::day_number(SystemTime::now()));
        let delta = UsageRow {
            requests: 1,
            errors: u64::from(ev.error),
            tokens_in: ev.tokens_in,
            tokens_out: ev.tokens_out,
            credits: ev.credits,
        };
        // One key buffer for the three rows; a row's key is allocated only when the row is new
        // in this batch (the batch is flushed once a second, so most requests find theirs).
        let mut buf = String::with_capacity(64);
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let mut add = |dim: &str, name: &str| {
            write_usage_key(&mut buf, &day, dim, name);
            match p.get_mut(buf.as_str()) {
                Some(row) => *row = row.plus(&delta),
                None => {
                    p.insert(buf.clone(), delta.clone());
                }
            }
        };
        add("key", key);
        if let Some(a) = &ev.account {
            add("account", a);
        }
        add("model", model_name(&ev.model));
    }

    /// Commits the batch (blocking: call off the async runtime). On failure the batch is kept
    /// for the next try.
    pub fn flush(&self) -> Result<(), String> {
        let _one = self.flushing.lock().unwrap_or_else(|e| e.into_inner());
        let batch = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        if batch.is_empty() {
            return Ok(());
        }
        match &self.store {
            None => {
                let mut m = self.memory.lock().unwrap_or_else(|e| e.into_inner());
                for (k, d) in batch {
                    let row = m.entry(k).or_default();
                    *row = row.plus(&d);
                }
                Ok(())
            }
            Some(store) => {
                let rows: Vec<(String, UsageRow)> = batch.into_iter().collect();
                store.add_usage(&rows).map_err(|e| {
                    let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                    for (k, d) in rows {
                        let row = p.entry(k).or_default();
                        *row = row.plus(&d);
                    }
                    e.to_string()
                })
            }
        }
    }

    /// Every row from day number `from` on (flushes first, so that nothing counted is missing).
    pub fn rows_since(&self, from: i64) -> Result<Vec<UsageLine>, String> {
        self.rows_since_of(from, None)
    }

    /// [`Usage::rows_since`], of one dimension only when `dim` is given.
    fn rows_since_of(&self, from: i64, dim: Option<&str>) -> Result<Vec<UsageLine>, String> {
        self.flush()?;
        let from = super::day_string(from);
        let raw: Vec<(String, UsageRow)> = match (&self.store, dim) {
            (Some(store), None) => store.usage_since(&from).map_err(|e| e.to_string())?,
            (Some(store), Some(dim)) => store.usage_since_of(&from, dim).map_err(|e| e.to_string())?,
            (None, _) => self
                .memory
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .range(from..)
                .filter(|(k, _)| dim.is_none_or(|d| split_usage_key(k).is_some_and(|(_, kd, _)| kd == d)))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        };
        Ok(raw
            .into_iter()
            .filter_map(|(k, r)| {
                let (day, by, name) = split_usage_key(&k)?;
                Some(UsageLine {
                    day: day.into(),
                    by: by.into(),
                    name: name.into(),
                    requests: r.requests,
                    errors: r.errors,
                    tokens_in: r.tokens_in,
                    tokens_out: r.tokens_out,
                    credits: r.credits,
                })
            })
            .collect())
    }

    /// Each key's tokens today and credits this month, from the store (start-up, keys added by
    /// a reload): one read of this month's rows for all keys.
    pub fn restore_keys(&self, today: i64) -> HashMap<String, (u64, f64)> {
        self.key_totals(today).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read the keys' usage: their budgets start from zero");
            HashMap::new()
        })
    }

    /// Each key's tokens on day `today` and credits in its month, as the store holds them after
    /// a flush (`[cluster]`: the whole fleet's).
    pub fn key_totals(&self, today: i64) -> Result<HashMap<String, (u64, f64)>, String> {
        let (y, m, _) = crate::config::keys::civil_from_days(today);
        let first = crate::config::keys::days_from_civil(y, m as i64, 1);
        let rows = self.rows_since_of(first, Some("key"))?;
        let today = super::day_string(today);
        let mut out: HashMap<String, (u64, f64)> = HashMap::new();
        for r in rows.into_iter().filter(|r| r.by == "key") {
            let e = out.entry(r.name).or_default();
            e.1 += r.credits;
            if r.day == today {
                e.0 += r.tokens_in + r.tokens_out;
            }
        }
        Ok(out)
    }

    /// Each key's tokens and credits counted here and not yet flushed, on day `today`.
    pub fn pending_keys(&self, today: i64) -> HashMap<String, (u64, f64)> {
        let today = super::day_string(today);
        let p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.iter()
            .filter_map(|(k, r)| {
                let (day, dim, name) = split_usage_key(k)?;
                (day == today && dim == "key")
                    .then(|| (name.to_owned(), (r.tokens_in + r.tokens_out, r.credits)))
            })
            .collect()
    }

    /// Deletes rows older than the retention (blocking), never the current UTC month's: the
    /// keys' `credits_per_month` budgets are rebuilt from them (a restart, a key added back, a
    /// cluster's fleet totals), and a short retention would have given the month back.
    pub fn prune(&self) {
        let today = super::day_number(SystemTime::now());
        let (y, m, _) = crate::config::keys::civil_from_days(today);
        let month_start = crate::config::keys::days_from_civil(y, m as i64, 1);
        let before = super::day_string((today - i64::from(self.retention_days)).min(month_start));
        match &self.store {
            Some(store) => match store.prune_usage(&before) {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(rows = n, before = %before, "usage rows past their retention deleted")
                }
                Err(e) => tracing::warn!(error = %e, "could not delete old usage rows"),
            },
            None => {
                let mut m = self.memory.lock().unwrap_or_else(|e| e.into_inner());
                *m = m.split_off(&before);
            }
        }
    }

    /// The batch task: commits every [`BATCH_WINDOW`], prunes hourly, until the stop (the daemon
    /// flushes once more after the drain).
    pub async fn run(self: Arc<Self>, mut shutdown: crate::shutdown::Shutdown) {
        let mut last_prune: Option<std::time::Instant> = None;
        loop {
            tokio::select! {
                _ = shutdown.recv() => break,
                _ = tokio::time::sleep(BATCH_WINDOW) => {}
            }
            let me = self.clone();
            let prune = last_prune.is_none_or(|t| t.elapsed() >= Duration::from_secs(3600));
            if prune {
                last_prune = Some(std::time::Instant::now());
            }
            let r = crate::reload::off_runtime(move || {
                if prune {
                    me.prune();
                }
                me.flush()
            })
            .await;
            if let Err(e) = r {
                tracing::warn!(error = %e, "could not store usage; keeping it for the next try");
            }
        }
    }
}
