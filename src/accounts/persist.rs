//! The pool's persistence through the store: rotated refresh tokens durably before use, state
//! changes and counters batched by a writer thread that retries what failed; and the state a
//! restart brings back.

use super::pool::{Restored, StateInfo, StateSink};
use super::tokens::{Access, Chain};
use crate::config::AccountId;
use crate::store::{
    AccountRecord, Backend, CatalogRecord, Counters, IdentityRecord, StateRecord, TokenRecord,
};
use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

/// Writes through to the store (redb, or PostgreSQL with `[cluster]`): tokens at once (the caller waits for the disk, on a
/// blocking thread), states and counters through a writer thread that batches them and keeps
/// what failed to be written until a retry succeeds.
pub struct StoreSink {
    store: Arc<dyn Backend>,
    queue: Arc<Queue>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

/// Writes waiting for the writer thread; the newest value per account wins.
struct Queue {
    pending: Mutex<Pending>,
    /// Wakes the writer (new work, stop) and flushers (the queue emptied).
    changed: Condvar,
}

#[derive(Default)]
struct Pending {
    states: BTreeMap<String, StateRecord>,
    counters: BTreeMap<String, Counters>,
    identities: BTreeMap<String, IdentityRecord>,
    catalogs: BTreeMap<String, CatalogRecord>,
    /// A batch taken by the writer and not yet written (flush waits for it too).
    writing: bool,
    /// Failed attempts in a row: the writer waits before the next one.
    failures: u32,
    stop: bool,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl StoreSink {
    pub fn new(store: Arc<dyn Backend>) -> StoreSink {
        let queue = Arc::new(Queue { pending: Mutex::default(), changed: Condvar::new() });
        let writer = std::thread::Builder::new().name("store-writer".to_owned()).spawn({
            let (store, queue) = (store.clone(), queue.clone());
            move || write_loop(&store, &queue)
        });
        let writer = match writer {
            Ok(handle) => Some(handle),
            Err(e) => {
                // Without the thread, queued writes would never be written: say so loudly.
                tracing::error!(error = %e, "cannot start the state store's writer thread; account states will not be stored");
                None
            }
        };
        StoreSink { store, queue, writer: Mutex::new(writer) }
    }
}

impl Drop for StoreSink {
    fn drop(&mut self) {
        self.queue.lock().stop = true;
        self.queue.changed.notify_all();
        if let Some(handle) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = handle.join();
        }
    }
}

/// The writer thread: takes everything queued, writes states durably and counters lazily (one
/// commit each), and on failure puts back what was not overwritten meanwhile and waits
/// (backoff, 0.5 s doubling to 10 s) before trying again. Ends when stopped, after one last try.
fn write_loop(store: &Arc<dyn Backend>, queue: &Queue) {
    let mut pending = queue.lock();
    let mut retry_at: Option<std::time::Instant> = None;
    let mut last_try = false;
    loop {
        let idle = pending.states.is_empty()
            && pending.counters.is_empty()
            && pending.identities.is_empty()
            && pending.catalogs.is_empty();
        if pending.stop {
            if idle || last_try {
                if !idle {
                    tracing::error!(
                        accounts = pending.states.len().max(pending.counters.len()),
                        "stopping with account states or counters not stored"
                    );
                }
                break;
            }
            // One last attempt, without waiting out the backoff.
            last_try = true;
            retry_at = None;
        }
        if idle {
            pending = queue.changed.wait(pending).unwrap_or_else(|p| p.into_inner());
            continue;
        }
        if let Some(at) = retry_at {
            let wait = at.saturating_duration_since(std::time::Instant::now());
            if !wait.is_zero() {
                pending = queue.changed.wait_timeout(pending, wait).unwrap_or_else(|p| p.into_inner()).0;
                continue;
            }
        }
        let states = std::mem::take(&mut pending.states);
        let counters = std::mem::take(&mut pending.counters);
        let identities = std::mem::take(&mut pending.identities);
        let catalogs = std::mem::take(&mut pending.catalogs);
        pending.writing = true;
        drop(pending);
        let batch: Vec<(String, StateRecord)> = states.into_iter().collect();
        let states_result = store.put_states(&batch);
        let counters_batch: Vec<(String, Counters)> = counters.into_iter().collect();
        let counters_result = store.put_counters(&counters_batch);
        let identities_batch: Vec<(String, IdentityRecord)> = identities.into_iter().collect();
        let identities_result = store.put_identities(&identities_batch);
        let catalogs_batch: Vec<(String, CatalogRecord)> = catalogs.into_iter().collect();
        let catalogs_result = store.put_catalogs(&catalogs_batch);
        pending = queue.lock();
        pending.writing = false;
        let mut failed = false;
        if let Err(e) = states_result {
            tracing::warn!(error = %e, "cannot store account states; keeping them to retry");
            for (id, s) in batch {
                pending.states.entry(id).or_insert(s);
            }
            failed = true;
        }
        if let Err(e) = identities_result {
            tracing::warn!(error = %e, "cannot store what accounts learned (machine ids, profiles); keeping it to retry");
            for (id, r) in identities_batch {
                pending.identities.entry(id).or_insert(r);
            }
            failed = true;
        }
        if let Err(e) = catalogs_result {
            tracing::warn!(error = %e, "cannot store model catalogs; keeping them to retry");
            for (id, r) in catalogs_batch {
                pending.catalogs.entry(id).or_insert(r);
            }
            failed = true;
        }
        if let Err(e) = counters_result {
            tracing::warn!(error = %e, "cannot store counters; keeping them to retry");
            for (id, c) in counters_batch {
                pending.counters.entry(id).or_insert(c);
            }
            failed = true;
        }
        pending.failures = if failed { pending.failures.saturating_add(1) } else { 0 };
        retry_at = (pending.failures > 0).then(|| {
            let backoff = Duration::from_millis(500).saturating_mul(1 << (pending.failures - 1).min(5));
            std::time::Instant::now() + backoff.min(Duration::from_secs(10))
        });
        queue.changed.notify_all();
    }
}

impl StateSink for StoreSink {
    fn tokens(&self, id: &AccountId, chain: &Chain, access: &Access) -> Result<(), String> {
        let rec = TokenRecord {
            refresh_token: chain.refresh_token.clone(),
            file_fingerprint: chain.file_fingerprint,
            rotated: chain.rotated,
            access_token: Some(access.token.clone()),
            access_expires_at: Some(access.expires_at),
            updated_at: SystemTime::now(),
        };
        self.store.put_tokens(id.as_str(), &rec).map_err(|e| e.to_string())
    }

    fn state(&self, id: &AccountId, info: &StateInfo) {
        let rec = StateRecord {
            state: info.state,
            since: info.since,
            until: info.until,
            reason: info.reason.clone(),
            last_error: info.last_error.clone(),
            last_error_at: info.last_error_at,
        };
        self.queue.lock().states.insert(id.to_string(), rec);
        self.queue.changed.notify_all();
    }

    fn counters(&self, batch: Vec<(AccountId, Counters)>) {
        let mut pending = self.queue.lock();
        for (id, c) in batch {
            pending.counters.insert(id.to_string(), c);
        }
        drop(pending);
        self.queue.changed.notify_all();
    }

    fn identity(&self, id: &AccountId, rec: &IdentityRecord) {
        self.queue.lock().identities.insert(id.to_string(), rec.clone());
        self.queue.changed.notify_all();
    }

    fn catalog(&self, id: &AccountId, rec: &CatalogRecord) {
        self.queue.lock().catalogs.insert(id.to_string(), rec.clone());
        self.queue.changed.notify_all();
    }

    fn restore(&self, id: &AccountId) -> Restored {
        match self.store.get(id.as_str()) {
            Ok(Some(rec)) => restored_one(rec),
            Ok(None) => Restored::default(),
            Err(e) => {
                tracing::warn!(account = %id, error = %e, "cannot read the account's stored state");
                Restored::default()
            }
        }
    }

    fn problem(&self) -> Option<String> {
        let p = self.store.problem()?;
        let since = p.since.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        Some(format!(
            "the state store fails to take writes ({} failed attempts since unix time {since}): {}",
            p.failures, p.error
        ))
    }

    fn flush(&self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let mut pending = self.queue.lock();
        loop {
            if pending.states.is_empty()
                && pending.counters.is_empty()
                && pending.identities.is_empty()
                && !pending.writing
            {
                return true;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            pending = self.queue.changed.wait_timeout(pending, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

/// What the pool restores from the store's records.
pub fn restored(records: BTreeMap<String, AccountRecord>) -> BTreeMap<String, Restored> {
    records.into_iter().map(|(id, r)| (id, restored_one(r))).collect()
}

pub fn restored_one(r: AccountRecord) -> Restored {
    let (chain, access) = match r.tokens {
        Some(t) => {
            let access = match (t.access_token, t.access_expires_at) {
                (Some(token), Some(expires_at)) => Some(Access { token, expires_at }),
                _ => None,
            };
            let chain = Chain {
                refresh_token: t.refresh_token,
                rotated: t.rotated,
                file_fingerprint: t.file_fingerprint,
            };
            (Some(chain), access)
        }
        None => (None, None),
    };
    let state = Some(StateInfo {
        state: r.state.state,
        since: r.state.since,
        until: r.state.until,
        reason: r.state.reason,
        last_error: r.state.last_error,
        last_error_at: r.state.last_error_at,
        strikes: 0,
    });
    Restored { chain, access, state, counters: Some(r.counters), identity: r.identity, catalog: r.catalog }
}
