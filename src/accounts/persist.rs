//! The pool's persistence through the store: rotated refresh tokens durably before use (a
//! token-writer thread commits what is queued together, each caller waiting for its own
//! commit), state changes and counters batched by a writer thread that retries what failed;
//! and the state a restart brings back.

use super::pool::{Restored, StateInfo, StateSink, TokenWrite};
use super::tokens::{Access, Chain};
use crate::config::AccountId;
use crate::store::{
    AccountRecord, Backend, CatalogRecord, Counters, IdentityRecord, StateRecord, TokenRecord,
};
use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

/// Writes through to the store (redb, or PostgreSQL with `[cluster]`): tokens through a
/// token-writer thread (each caller waits, without blocking, until its own write is durable),
/// states and counters through a writer thread that batches them and keeps what failed to be
/// written until a retry succeeds.
pub struct StoreSink {
    store: Arc<dyn Backend>,
    queue: Arc<Queue>,
    writer: Mutex<Option<JoinHandle<()>>>,
    tokens: Arc<TokenQueue>,
    token_writer: Mutex<Option<JoinHandle<()>>>,
}

/// Token writes waiting for the token writer, in the order they were asked for.
///
/// Many accounts refresh at once at a first start (1,000 accounts, 1,000 rotated tokens): one
/// thread takes whatever is queued and commits it together (one durable commit on redb instead
/// of one each), where a blocking task per write had put up to 512 threads to wait on the
/// store's one write lock.
struct TokenQueue {
    pending: Mutex<TokenPending>,
    changed: Condvar,
}

#[derive(Default)]
struct TokenPending {
    writes: Vec<QueuedTokens>,
    stop: bool,
    /// No writer takes writes (it could not start, or it ended): a write fails at once.
    closed: bool,
}

struct QueuedTokens {
    id: String,
    record: TokenRecord,
    done: tokio::sync::oneshot::Sender<Result<(), String>>,
}

impl TokenQueue {
    fn lock(&self) -> MutexGuard<'_, TokenPending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The token writer: takes every queued write, hands them to the store as one batch, and
/// answers each caller with its own result. When stopped, it writes what is queued first.
fn token_loop(store: &Arc<dyn Backend>, queue: &TokenQueue) {
    /// However the writer ends (stopped, or a panic in a backend), later writes fail at once
    /// and queued ones are answered with an error: no caller waits for ever.
    struct Close<'a>(&'a TokenQueue);
    impl Drop for Close<'_> {
        fn drop(&mut self) {
            let mut pending = self.0.lock();
            pending.closed = true;
            pending.writes.clear();
        }
    }
    let _close = Close(queue);
    let mut pending = queue.lock();
    loop {
        if pending.writes.is_empty() {
            if pending.stop {
                return;
            }
            pending = queue.changed.wait(pending).unwrap_or_else(|p| p.into_inner());
            continue;
        }
        let writes = std::mem::take(&mut pending.writes);
        drop(pending);
        let batch: Vec<(String, TokenRecord)> =
            writes.iter().map(|w| (w.id.clone(), w.record.clone())).collect();
        let results = store.put_tokens_batch(&batch);
        for (write, result) in writes.into_iter().zip(results) {
            // A caller that gave up no longer waits: its tokens are written all the same.
            let _ = write.done.send(result.map_err(|e| e.to_string()));
        }
        pending = queue.lock();
    }
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
        let writer = start("store-writer", "account states will not be stored", {
            let (store, queue) = (store.clone(), queue.clone());
            move || write_loop(&store, &queue)
        });
        let tokens = Arc::new(TokenQueue { pending: Mutex::default(), changed: Condvar::new() });
        // Without it every token write fails and says why; nothing is used unstored.
        let token_writer = start("token-writer", "refreshed tokens cannot be stored", {
            let (store, tokens) = (store.clone(), tokens.clone());
            move || token_loop(&store, &tokens)
        });
        tokens.lock().closed |= token_writer.is_none();
        StoreSink { store, queue, writer: Mutex::new(writer), tokens, token_writer: Mutex::new(token_writer) }
    }
}

/// Starts one of the sink's threads; without it, what it would write is not written, and that
/// is said loudly (`consequence`).
fn start(name: &str, consequence: &str, run: impl FnOnce() + Send + 'static) -> Option<JoinHandle<()>> {
    match std::thread::Builder::new().name(name.to_owned()).spawn(run) {
        Ok(handle) => Some(handle),
        Err(e) => {
            tracing::error!(error = %e, thread = name, "cannot start a thread of the state store; {consequence}");
            None
        }
    }
}

impl Drop for StoreSink {
    fn drop(&mut self) {
        self.queue.lock().stop = true;
        self.queue.changed.notify_all();
        self.tokens.lock().stop = true;
        self.tokens.changed.notify_all();
        if let Some(handle) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = handle.join();
        }
        if let Some(handle) = self.token_writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
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

/// The stored form of `chain` (and the access token that came with it, if any).
pub fn token_record(chain: &Chain, access: Option<&Access>) -> TokenRecord {
    TokenRecord {
        refresh_token: chain.refresh_token.clone(),
        file_fingerprint: chain.file_fingerprint,
        rotated: chain.rotated,
        access_token: access.map(|a| a.token.clone()),
        access_expires_at: access.map(|a| a.expires_at),
        updated_at: SystemTime::now(),
    }
}

impl StateSink for StoreSink {
    fn tokens(&self, id: &AccountId, chain: &Chain, access: &Access) -> TokenWrite {
        let record = token_record(chain, Some(access));
        let (done, answer) = tokio::sync::oneshot::channel();
        {
            let mut pending = self.tokens.lock();
            // Closed: `done` is dropped here and the write fails at once.
            if !pending.closed {
                pending.writes.push(QueuedTokens { id: id.to_string(), record, done });
            }
        }
        self.tokens.changed.notify_one();
        Box::pin(async move {
            answer.await.unwrap_or_else(|_| Err("the state store's token writer is not running".to_owned()))
        })
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

    fn restore(&self, ids: &[AccountId]) -> Vec<Result<Restored, String>> {
        // Many accounts at once (a large file added): one read of everything beats a round
        // trip per account.
        if ids.len() > RESTORE_ONE_BY_ONE {
            return match self.store.load_all() {
                Ok(mut all) => ids
                    .iter()
                    .map(|id| Ok(all.remove(id.as_str()).map(restored_one).unwrap_or_default()))
                    .collect(),
                Err(e) => ids.iter().map(|_| Err(e.to_string())).collect(),
            };
        }
        ids.iter()
            .map(|id| match self.store.get(id.as_str()) {
                Ok(Some(rec)) => Ok(restored_one(rec)),
                Ok(None) => Ok(Restored::default()),
                Err(e) => Err(e.to_string()),
            })
            .collect()
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

/// Above this many accounts joining at once, [`StoreSink`] reads the whole store once instead
/// of each account's record.
const RESTORE_ONE_BY_ONE: usize = 64;

/// What the pool restores from the store's records.
pub fn restored(records: BTreeMap<String, AccountRecord>) -> BTreeMap<String, Restored> {
    records.into_iter().map(|(id, r)| (id, restored_one(r))).collect()
}

pub fn restored_one(r: AccountRecord) -> Restored {
    let updated_at = r.tokens.as_ref().map(|t| t.updated_at);
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
    Restored {
        chain,
        access,
        chain_updated_at: updated_at,
        state,
        counters: Some(r.counters),
        identity: r.identity,
        catalog: r.catalog,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::secret::Secret;
    use crate::store::{StateRecord as S, Store, StoreError, StoreProblem};

    fn chain(token: &str) -> Chain {
        Chain { refresh_token: Secret::new(token), rotated: true, file_fingerprint: [7; 32] }
    }

    fn access(token: &str) -> Access {
        Access { token: Secret::new(token), expires_at: SystemTime::now() + Duration::from_secs(3600) }
    }

    fn id(n: usize) -> AccountId {
        AccountId::parse(&format!("acct-{n}")).unwrap()
    }

    /// A real redb store behind a gate: the first token batch waits until the test opens the
    /// gate; every batch's size is recorded; with `panics`, a token batch panics (a broken
    /// backend).
    struct Gated {
        store: Store,
        gate: Mutex<bool>,
        opened: Condvar,
        batches: Mutex<Vec<usize>>,
        panics: bool,
    }

    impl Gated {
        fn new(dir: &std::path::Path, open: bool, panics: bool) -> Arc<Gated> {
            Arc::new(Gated {
                store: Store::open(dir).unwrap(),
                gate: Mutex::new(open),
                opened: Condvar::new(),
                batches: Mutex::new(Vec::new()),
                panics,
            })
        }
    }

    impl Backend for Gated {
        fn load_all(&self) -> Result<BTreeMap<String, AccountRecord>, StoreError> {
            self.store.load_all()
        }
        fn get(&self, id: &str) -> Result<Option<AccountRecord>, StoreError> {
            self.store.get(id)
        }
        fn put_tokens(&self, id: &str, t: &TokenRecord) -> Result<(), StoreError> {
            self.store.put_tokens(id, t)
        }
        fn put_tokens_batch(&self, batch: &[(String, TokenRecord)]) -> Vec<Result<(), StoreError>> {
            let mut open = self.gate.lock().unwrap();
            while !*open {
                open = self.opened.wait(open).unwrap();
            }
            drop(open);
            assert!(!self.panics, "a broken backend");
            self.batches.lock().unwrap().push(batch.len());
            self.store.put_tokens_batch(batch)
        }
        fn put_states(&self, batch: &[(String, S)]) -> Result<(), StoreError> {
            self.store.put_states(batch)
        }
        fn put_counters(&self, batch: &[(String, Counters)]) -> Result<(), StoreError> {
            self.store.put_counters(batch)
        }
        fn put_identities(&self, batch: &[(String, IdentityRecord)]) -> Result<(), StoreError> {
            self.store.put_identities(batch)
        }
        fn put_catalogs(&self, batch: &[(String, CatalogRecord)]) -> Result<(), StoreError> {
            self.store.put_catalogs(batch)
        }
        fn remove(&self, id: &str) -> Result<(), StoreError> {
            self.store.remove(id)
        }
        fn problem(&self) -> Option<StoreProblem> {
            self.store.problem()
        }
    }

    /// 200 accounts refresh at once: their tokens are committed in two commits (the one the
    /// writer had begun, then everything queued meanwhile), each caller is answered only once
    /// its own tokens are stored, and a reopened store holds every one of them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queued_token_writes_commit_together_and_each_waits_for_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let backend = Gated::new(dir.path(), false, false);
        let sink = Arc::new(StoreSink::new(backend.clone()));
        let first = sink.tokens(&id(0), &chain("rt-0"), &access("at-0"));
        // The writer has taken the first write and waits at the gate; the rest queue up.
        while sink.tokens.lock().writes.len() == 1 {
            tokio::task::yield_now().await;
        }
        let rest: Vec<TokenWrite> = (1..200)
            .map(|n| sink.tokens(&id(n), &chain(&format!("rt-{n}")), &access(&format!("at-{n}"))))
            .collect();
        let mut waiting = tokio::spawn(async move {
            let mut results = Vec::new();
            for write in rest {
                results.push(write.await);
            }
            results
        });
        // Nothing is answered before it is stored.
        assert!(tokio::time::timeout(Duration::from_millis(50), &mut waiting).await.is_err());
        *backend.gate.lock().unwrap() = true;
        backend.opened.notify_all();
        assert_eq!(first.await, Ok(()));
        for result in waiting.await.unwrap() {
            assert_eq!(result, Ok(()));
        }
        assert_eq!(*backend.batches.lock().unwrap(), vec![1, 199]);
        drop(sink);
        drop(backend);
        let reopened = Store::open(dir.path()).unwrap();
        for n in 0..200 {
            let rec = reopened.get(id(n).as_str()).unwrap().and_then(|r| r.tokens).expect("stored");
            assert_eq!(rec.refresh_token.expose(), format!("rt-{n}"));
            assert_eq!(rec.access_token.as_ref().map(|t| t.expose().to_owned()), Some(format!("at-{n}")));
        }
    }

    /// A sink dropped with writes queued writes them before its thread ends.
    #[tokio::test]
    async fn queued_token_writes_are_written_before_the_sink_stops() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let sink = StoreSink::new(Arc::new(store.clone()));
        let writes: Vec<TokenWrite> =
            (0..20).map(|n| sink.tokens(&id(n), &chain(&format!("rt-{n}")), &access("at"))).collect();
        drop(sink);
        for write in writes {
            assert_eq!(write.await, Ok(()));
        }
        for n in 0..20 {
            assert!(store.get(id(n).as_str()).unwrap().and_then(|r| r.tokens).is_some(), "acct-{n}");
        }
    }

    /// A token writer that dies (a backend panics) fails the write it held and every later
    /// one at once: nobody waits for ever, and nothing is reported stored that is not.
    #[tokio::test]
    async fn a_dead_token_writer_fails_writes_instead_of_keeping_them_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let backend = Gated::new(dir.path(), true, true);
        let sink = StoreSink::new(backend.clone());
        let first = sink.tokens(&id(1), &chain("rt-1"), &access("at"));
        let err = tokio::time::timeout(Duration::from_secs(10), first).await.expect("answered").unwrap_err();
        assert!(err.contains("token writer is not running"), "{err}");
        let later = sink.tokens(&id(2), &chain("rt-2"), &access("at"));
        let err = tokio::time::timeout(Duration::from_secs(10), later).await.expect("answered").unwrap_err();
        assert!(err.contains("token writer is not running"), "{err}");
        assert!(backend.store.get("acct-1").unwrap().and_then(|r| r.tokens).is_none());
    }
}
