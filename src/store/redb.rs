//! The embedded state store: `<state dir>/amq2api.redb` (redb) holds each account's refresh-token
//! chain, state and counters across restarts.
//!
//! # Layout (schema version 3)
//!
//! | table      | key                | value                                              |
//! |------------|--------------------|----------------------------------------------------|
//! | `meta`     | `"schema_version"` | `u32`, little-endian (4 bytes)                     |
//! | `tokens`   | account id         | version byte `1` ++ JSON of a [`TokenRecord`]      |
//! | `state`    | account id         | version byte `1` ++ JSON of a [`StateRecord`]      |
//! | `counters` | account id         | version byte `1` ++ JSON of the [`Counters`]       |
//! | `identity` | account id         | version byte `1` ++ JSON of an [`IdentityRecord`]  |
//! | `catalog`  | account id         | version byte `1` ++ JSON of a [`CatalogRecord`]    |
//! | `usage`    | `YYYY-MM-DD/dim/name` | version byte `1` ++ JSON of a [`UsageRow`]      |
//!
//! `usage` (schema version 3) holds one row per UTC day and dimension (`key`, `account`,
//! `model`) and name: requests, errors, tokens in and out, credits. Its keys sort by day, so
//! retention is a range delete and a report a range read.
//!
//! All tables are `&str → &[u8]`. Tokens, state and counters live in separate tables so that a
//! batch of counters never rewrites a token. Timestamps are stored as unix milliseconds, so a
//! [`SystemTime`] comes back truncated to the millisecond. A value whose version byte this build
//! does not know, or whose payload does not decode, is reported as [`StoreError::Corrupt`] naming
//! the table and key; decoding never panics. `meta` must keep its key and value type in every
//! later schema, so that an older amq2api can still read the version and refuse the file.
//!
//! # Opening
//!
//! [`Store::open`] creates the directory (mode 0700) and the file (mode 0600; a wider mode on an
//! existing file is narrowed, with a warning) when missing. A new file is initialised as
//! `amq2api.redb.new` and renamed into place, so `amq2api.redb` never exists empty: an empty one
//! is a damaged one (a cut backup, a full disk) and is refused as [`StoreError::Corrupt`] with the
//! way out, rather than silently replaced (which would drop every rotated refresh token). redb locks the file for its process:
//! a second daemon — or a second [`Store::open`] in the same process — gets
//! [`StoreError::Locked`], whose message names the directory and, when known, the holder's pid
//! (read from `amq2api.pid`, which the holder writes beside the store and removes on close).
//!
//! The schema version in `meta` is then checked: a new (table-less) file is initialised at
//! [`SCHEMA_VERSION`]; an older version is migrated step by step in one transaction; a newer one
//! is refused with [`StoreError::SchemaTooNew`]. A file that holds tables but no schema version
//! is not something amq2api ever writes (the version is committed with the first tables), so it
//! is refused as [`StoreError::Corrupt`] rather than guessed at.
//!
//! # Durability
//!
//! [`Store::put_tokens`], [`Store::put_state`] and [`Store::remove`] commit with
//! `Durability::Immediate`: the data is on disk when they return. [`Store::put_counters`] commits
//! without waiting for the disk; a background thread (`store-sync`) commits durably once the
//! oldest unsynced counters are [`COUNTERS_MAX_UNSYNCED`] old, unless a durable write has carried
//! them to disk first. A crash thus loses at most that much counting and never corrupts the
//! file; closing the store (dropping the last clone) makes pending counters durable at once.
//!
//! Every method blocks on the file (an `fsync` for the durable ones, a few milliseconds); async
//! callers should use `spawn_blocking`.
//!
//! # Failures
//!
//! After a failed write redb refuses everything until the file is closed and opened again. An
//! operation that fails with an I/O error (`ENOSPC`, `EIO`, `EROFS`, …) therefore closes the
//! handle and records a [`StoreProblem`] ([`Store::problem`]); the next operation opens the file
//! again (redb recovers it from its last durable commit) and a write that succeeds clears the
//! problem. Callers keep what they could not write and retry: the store never drops it for them.

pub use crate::accounts::state::{AccountState, UnknownAccountState};
use crate::config::Secret;
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, TableDefinition, TableHandle, WriteTransaction,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::fs::{DirBuilder, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The store file's name inside the state directory.
pub const FILE_NAME: &str = "amq2api.redb";
/// The holder's pid, beside the store file, for the [`StoreError::Locked`] message.
pub const PID_FILE_NAME: &str = "amq2api.pid";
/// The schema version this build writes, and the newest it opens.
pub const SCHEMA_VERSION: u32 = 3;
/// The longest counters may stay in memory only (see [`Store::put_counters`]).
pub const COUNTERS_MAX_UNSYNCED: Duration = Duration::from_secs(5);

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
const STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("state");
const COUNTERS: TableDefinition<&str, &[u8]> = TableDefinition::new("counters");
const IDENTITY: TableDefinition<&str, &[u8]> = TableDefinition::new("identity");
const CATALOG: TableDefinition<&str, &[u8]> = TableDefinition::new("catalog");
const USAGE: TableDefinition<&str, &[u8]> = TableDefinition::new("usage");
const SCHEMA_KEY: &str = "schema_version";
/// The version byte in front of every value this build writes (and the only one it reads).
const VALUE_VERSION: u8 = 1;
/// redb's default (1 GiB) is sized for far bigger files; reads are rare here (the whole file
/// once at start, an account when it comes back), and whatever the cache holds stays in the
/// daemon's memory: 16 MiB was filled at every start with 1,000 accounts' catalogs.
const CACHE_BYTES: usize = 2 * 1024 * 1024;

/// One migration step: step `i` of [`MIGRATIONS`] upgrades schema version `i + 1` to `i + 2`.
type Migration = fn(&WriteTransaction) -> Result<(), StoreError>;

/// Schema migrations, oldest first. To add schema version 2: write `fn v1_to_v2(txn)` (rewrite
/// what changed, in `txn`), append it here and bump [`SCHEMA_VERSION`].
const MIGRATIONS: &[Migration] = &[v1_to_v2, v2_to_v3];

/// Version 2 adds the `identity` table (what an account learned about itself) and the
/// `catalog` table (the models it offers).
fn v1_to_v2(txn: &WriteTransaction) -> Result<(), StoreError> {
    for table in [IDENTITY, CATALOG] {
        txn.open_table(table)
            .map_err(|e| StoreError::Db(format!("creating the {} table: {e}", table.name())))?;
    }
    Ok(())
}

/// Version 3 adds the `usage` table (per key, account and model, per UTC day); nothing else
/// changes, so every existing row stays as it is.
fn v2_to_v3(txn: &WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(USAGE).map_err(|e| StoreError::Db(format!("creating the usage table: {e}")))?;
    Ok(())
}

const _: () = assert!(MIGRATIONS.len() as u32 + 1 == SCHEMA_VERSION);

/// Why the store could not be opened, read or written.
#[derive(thiserror::Error, Debug)]
pub enum StoreError {
    /// Another process (or another [`Store`] in this one) has the store open.
    #[error(
        "another amq2api is using {} ({}): {FILE_NAME} is locked; stop it first, or give this one another [state] dir",
        .path.display(),
        holder(*.pid)
    )]
    Locked {
        /// The state directory.
        path: PathBuf,
        /// The holder's pid, when its pid file names a live process.
        pid: Option<u32>,
    },
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A value that does not decode (`key` is an account id or a `meta` key), or a damaged file
    /// (`table` is [`FILE_DAMAGED`], `key` the file's path).
    #[error("{}", corrupt_message(table, key, detail))]
    Corrupt { table: String, key: String, detail: String },
    #[error(
        "the store has schema version {found}, newer than this amq2api supports ({supported}): it was written by a newer amq2api"
    )]
    SchemaTooNew { found: u32, supported: u32 },
    /// Any other redb failure, with the store's path.
    #[error("store: {0}")]
    Db(String),
    /// PostgreSQL (`[cluster]`) failed or cannot be reached.
    #[error("PostgreSQL: {0}")]
    Postgres(String),
    /// `[cluster] database_url` cannot be used (a bad option, an unreadable `sslrootcert`).
    #[error("database_url: {0}")]
    DatabaseUrl(String),
    /// A token write refused because this node no longer holds the account's lease (fencing):
    /// another node has taken the account over.
    #[error(
        "account {account}: this node no longer holds its lease (epoch {epoch}); the token is not written"
    )]
    Fenced { account: String, epoch: i64 },
}

/// [`StoreError::Corrupt`]'s `table` when the file itself is damaged.
pub const FILE_DAMAGED: &str = "(file)";

/// A row of a table other than the tokens that does not decode (damaged, or written by a newer
/// version): logged and read as absent — the account's state, counters, identity or catalog
/// start afresh, and the row is written over with the next change — rather than stopping the
/// start, whose way out (moving the store away) would lose every rotated refresh token. A
/// token row stays strict: guessing there could lose a chain. A state row has its own rule
/// ([`state_or_disabled`]).
pub(super) fn lenient<T>(decoded: Result<T, StoreError>) -> Option<T> {
    match decoded {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::warn!(error = %e, "an unreadable row of the state store is ignored (it is written anew with the next change)");
            None
        }
    }
}

/// A state row that does not decode (damaged, or a state a newer version wrote) reads as
/// `disabled`, with a reason `amqctl status` shows: the row may hold an operator's `amqctl
/// disable`, which nothing but `amqctl enable` undoes. Read as active, as before, the account
/// served again, and its next change wrote the operator's decision away. The start goes on
/// (the tokens, the rows that matter most, are read as they are).
pub(super) fn state_or_disabled(key: &str, raw: &[u8]) -> StateRecord {
    match decode_state(key, raw) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(account = key, error = %e, "the account's stored state is unreadable: it stays disabled until `amqctl enable`");
            StateRecord {
                state: AccountState::Disabled,
                since: Some(SystemTime::now()),
                reason: Some(format!(
                    "its stored state is unreadable ({e}); it may have been disabled: `amqctl enable {key}` serves it again"
                )),
                ..StateRecord::default()
            }
        }
    }
}

fn corrupt_message(table: &str, key: &str, detail: &str) -> String {
    if table == FILE_DAMAGED {
        format!("the store file {key} is damaged: {detail}")
    } else if table == "tokens" {
        // The one row whose loss loses an account: say so where the operator reads it.
        format!(
            "store value {table}/{key} is corrupt: {detail} (it holds that account's live refresh token: keep the store \
             file; a value of a newer version is read by that version again)"
        )
    } else {
        format!("store value {table}/{key} is corrupt: {detail}")
    }
}

fn holder(pid: Option<u32>) -> String {
    match pid {
        Some(pid) if pid == std::process::id() => format!("this process, pid {pid}"),
        Some(pid) => format!("pid {pid}"),
        None => "pid unknown".to_owned(),
    }
}

impl StoreError {
    fn corrupt(table: &str, key: &str, detail: impl Into<String>) -> Self {
        StoreError::Corrupt { table: table.to_owned(), key: key.to_owned(), detail: detail.into() }
    }

    /// An I/O failure: the handle is unusable until it is opened again (see [`Store::problem`]).
    fn needs_reopen(&self) -> bool {
        matches!(self, StoreError::Io { .. })
    }

    fn from_redb(path: &Path, err: redb::Error) -> Self {
        match err {
            redb::Error::Io(source) => StoreError::Io { path: path.to_owned(), source },
            redb::Error::PreviousIo | redb::Error::DatabaseClosed => StoreError::Io {
                path: path.to_owned(),
                source: std::io::Error::other("an earlier write failed; the store must be reopened"),
            },
            redb::Error::Corrupted(detail) => StoreError::Corrupt {
                table: FILE_DAMAGED.to_owned(),
                key: path.display().to_string(),
                detail,
            },
            other => StoreError::Db(format!("{}: {other}", path.display())),
        }
    }
}

/// Attaches the store path to a redb error.
trait Ctx<T> {
    fn ctx(self, path: &Path) -> Result<T, StoreError>;
}

impl<T, E: Into<redb::Error>> Ctx<T> for Result<T, E> {
    fn ctx(self, path: &Path) -> Result<T, StoreError> {
        self.map_err(|e| StoreError::from_redb(path, e.into()))
    }
}

/// Everything stored about one account. An account with no row in a table gets that part's
/// default (no tokens, `active`, zero counters). Timestamps come back to the millisecond.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct AccountRecord {
    pub tokens: Option<TokenRecord>,
    pub state: StateRecord,
    pub counters: Counters,
    pub identity: Option<IdentityRecord>,
    pub catalog: Option<CatalogRecord>,
}

/// An account's model catalog as last fetched.
#[derive(Clone, Debug, PartialEq)]
pub struct CatalogRecord {
    pub fetched_at: SystemTime,
    /// Shared with every account whose catalog is the same ([`crate::upstream::catalog::share`]):
    /// a thousand accounts' records decode to one copy.
    pub models: std::sync::Arc<crate::upstream::catalog::Models>,
}

/// What an account learned about itself and must keep across restarts: the installation it
/// looks like to the service, its profile ARN, the endpoint that takes its credentials.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct IdentityRecord {
    /// 64 hex digits, made once per account and never changed (it goes into user agents).
    pub machine_id: String,
    /// The profile ARN learned from the service (social refresh, `ListAvailableProfiles`),
    /// with the credentials fingerprint it was learned for.
    pub profile_arn: Option<String>,
    pub profile_for: Option<[u8; 32]>,
    /// The endpoint role that last took the account's credentials (`q` or `runtime`).
    pub endpoint: Option<String>,
}

/// The current link of an account's refresh-token chain, and the access token that came with it.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenRecord {
    pub refresh_token: Secret,
    /// sha256 fingerprint of the credentials as written in accounts.toml when this chain started;
    /// if the file's fingerprint differs at load, the file's credentials win (the pool decides;
    /// the store just keeps it).
    pub file_fingerprint: [u8; 32],
    /// True when `refresh_token` came from a rotation, false when from the file.
    pub rotated: bool,
    pub access_token: Option<Secret>,
    pub access_expires_at: Option<SystemTime>,
    pub updated_at: SystemTime,
}

/// An account's state, with when it started, when it ends and why.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct StateRecord {
    pub state: AccountState,
    pub since: Option<SystemTime>,
    pub until: Option<SystemTime>,
    pub reason: Option<String>,
    pub last_error: Option<String>,
    pub last_error_at: Option<SystemTime>,
}

/// Usage counters of one account.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Counters {
    pub requests: u64,
    pub failures: u64,
    pub failures_by_kind: BTreeMap<String, u64>,
    pub tokens_in: u64,
    pub tokens_out: u64,
    /// Upstream credits charged (`meteringEvent`).
    pub credits: f64,
    pub last_used: Option<SystemTime>,
}

/// One usage row: what one key, account or model did on one UTC day.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
pub struct UsageRow {
    pub requests: u64,
    pub errors: u64,
    pub tokens_in: u64,
    pub tokens_out: u64,
    pub credits: f64,
}

impl UsageRow {
    pub fn plus(&self, d: &UsageRow) -> UsageRow {
        UsageRow {
            requests: self.requests + d.requests,
            errors: self.errors + d.errors,
            tokens_in: self.tokens_in + d.tokens_in,
            tokens_out: self.tokens_out + d.tokens_out,
            credits: self.credits + d.credits,
        }
    }
}

/// The `usage` row key: `YYYY-MM-DD/dim/name` (`dim`: `key`, `account` or `model`).
pub fn usage_key(day: &str, dim: &str, name: &str) -> String {
    let mut key = String::with_capacity(day.len() + dim.len() + name.len() + 2);
    write_usage_key(&mut key, day, dim, name);
    key
}

/// [`usage_key`] written into `out` (cleared first), for a caller that reuses one buffer.
pub fn write_usage_key(out: &mut String, day: &str, dim: &str, name: &str) {
    out.clear();
    for part in [day, "/", dim, "/", name] {
        out.push_str(part);
    }
}

/// Splits a `usage` row key into (day, dim, name).
pub fn split_usage_key(key: &str) -> Option<(&str, &str, &str)> {
    let (day, rest) = key.split_once('/')?;
    let (dim, name) = rest.split_once('/')?;
    Some((day, dim, name))
}

/// The open store. Cheap to clone; the file closes when the last clone is dropped.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

// Fields drop in this order: the pid file goes while the file is still locked, so that it never
// removes the pid file of a process that has opened the store since; then the database closes
// (the sync thread, which shares it, has been joined by `Drop`).
struct Inner {
    _pid_file: PidFile,
    db: Arc<Handle>,
    syncer: Arc<Syncer>,
    sync_thread: Option<JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.syncer.stop();
        if let Some(thread) = self.sync_thread.take() {
            let _ = thread.join();
        }
    }
}

/// The database behind a lock, reopened after an I/O failure.
///
/// redb refuses every operation after a failed write ("Previous I/O error occurred. Please close
/// and re-open the database"): a full disk, an `EIO` or a read-only remount would otherwise
/// poison the handle for the rest of the process's life. So every operation runs under this
/// lock; one that fails with an I/O error closes the handle, records the failure (see
/// [`Store::problem`]), and the next operation opens the file again (redb repairs it on open,
/// from its last durable commit). Writes are serialised by redb anyway, and reads are rare
/// (start-up, an account added at run time), so the lock costs nothing that matters.
struct Handle {
    path: PathBuf,
    slot: Mutex<Slot>,
    /// [`open_database`], or a stand-in whose storage fails on demand (tests).
    opener: Opener,
}

type Opener = Box<dyn Fn(&Path) -> Result<Database, StoreError> + Send + Sync>;

struct Slot {
    /// `None` after an I/O failure, until a reopen succeeds.
    db: Option<Database>,
    /// Set by a failed write (or reopen), cleared by the next successful write.
    problem: Option<StoreProblem>,
}

/// Why the store cannot take writes right now: shown by `/health`, `STATUS=` and `amqctl
/// status` until a write succeeds again.
#[derive(Clone, Debug, PartialEq)]
pub struct StoreProblem {
    /// The error of the last failed attempt (never holds a value, so never a token).
    pub error: String,
    /// When the first failure of this run of failures happened.
    pub since: SystemTime,
    /// Failed attempts in a row.
    pub failures: u32,
}

impl Handle {
    fn lock(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `op` on the open database (opening it again first if an earlier failure closed it).
    /// `write` marks an operation whose success proves the store takes writes again.
    fn run<T>(
        &self,
        write: bool,
        op: impl FnOnce(&Database) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut slot = self.lock();
        if slot.db.is_none() {
            match (self.opener)(&self.path) {
                Ok(db) => {
                    tracing::info!(path = %self.path.display(), "state store reopened");
                    slot.db = Some(db);
                }
                Err(e) => {
                    slot.failed(&e);
                    return Err(e);
                }
            }
        }
        let db = slot.db.as_ref().expect("opened above");
        match op(db) {
            Ok(v) => {
                if write {
                    if let Some(p) = slot.problem.take() {
                        tracing::info!(
                            path = %self.path.display(),
                            failed_attempts = p.failures,
                            "the state store takes writes again"
                        );
                    }
                }
                Ok(v)
            }
            Err(e) => {
                if e.needs_reopen() {
                    // Closing the handle is the only way out of redb's poisoned state.
                    slot.db = None;
                    slot.failed(&e);
                }
                Err(e)
            }
        }
    }

    /// Runs `f` in a write transaction and commits it (aborts when `f` fails). Returns when the
    /// transaction began: every earlier commit had completed by then (redb runs one write
    /// transaction at a time).
    fn commit(
        &self,
        durable: bool,
        f: impl FnOnce(&WriteTransaction) -> Result<(), StoreError>,
    ) -> Result<Instant, StoreError> {
        let path = &self.path;
        self.run(true, |db| {
            let mut txn = db.begin_write().ctx(path)?;
            let begun = Instant::now();
            txn.set_durability(if durable { Durability::Immediate } else { Durability::None }).ctx(path)?;
            f(&txn)?;
            txn.commit().ctx(path)?;
            Ok(begun)
        })
    }
}

impl Slot {
    fn failed(&mut self, e: &StoreError) {
        match &mut self.problem {
            Some(p) => {
                p.failures += 1;
                p.error = e.to_string();
                if p.failures.is_power_of_two() {
                    tracing::error!(error = %e, failed_attempts = p.failures, "the state store still fails");
                }
            }
            None => {
                tracing::error!(error = %e, "the state store failed; closing it, retrying with backoff");
                self.problem =
                    Some(StoreProblem { error: e.to_string(), since: SystemTime::now(), failures: 1 });
            }
        }
    }
}

/// Opens an existing store file with the integrity check (~15 ms for 1,000 accounts): a damaged
/// file is then an error rather than a panic somewhere inside redb later.
fn open_database(path: &Path) -> Result<Database, StoreError> {
    match Database::builder().set_cache_size(CACHE_BYTES).set_check_integrity_on_open(true).create(path) {
        Ok(db) => Ok(db),
        Err(redb::DatabaseError::DatabaseAlreadyOpen | redb::DatabaseError::LockProtocolMismatch) => {
            let dir = path.parent().unwrap_or(Path::new("."));
            Err(StoreError::Locked { path: dir.to_owned(), pid: holder_pid(dir) })
        }
        Err(e) => Err(StoreError::from_redb(path, e.into())),
    }
}

/// `amq2api.pid` beside the store while this process holds it.
struct PidFile(PathBuf);

impl PidFile {
    fn write(dir: &Path) -> PidFile {
        let path = dir.join(PID_FILE_NAME);
        if let Err(e) = std::fs::write(&path, format!("{}\n", std::process::id())) {
            tracing::debug!(path = %path.display(), error = %e, "could not write the store's pid file");
        }
        PidFile(path)
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Makes non-durable (counter) commits durable within `max_unsynced`, from a background thread
/// that commits an empty transaction durably once the oldest unsynced commit is that old.
struct Syncer {
    state: Mutex<SyncState>,
    wake: Condvar,
    max_unsynced: Duration,
}

#[derive(Default)]
struct SyncState {
    /// When the oldest commit not yet on disk was made.
    unsynced_since: Option<Instant>,
    stop: bool,
}

impl Syncer {
    fn lock(&self) -> MutexGuard<'_, SyncState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// After a non-durable commit.
    fn note_unsynced(&self) {
        let mut state = self.lock();
        if state.unsynced_since.is_none() {
            state.unsynced_since = Some(Instant::now());
            self.wake.notify_one();
        }
    }

    /// After a durable commit whose transaction began at `begun`: every commit made before it
    /// is on disk too.
    fn note_durable(&self, begun: Instant) {
        let mut state = self.lock();
        if state.unsynced_since.is_some_and(|since| since <= begun) {
            state.unsynced_since = None;
        }
    }

    fn stop(&self) {
        self.lock().stop = true;
        self.wake.notify_all();
    }

    fn run(&self, db: &Handle) {
        let mut state = self.lock();
        while !state.stop {
            let Some(since) = state.unsynced_since else {
                state = self.wake.wait(state).unwrap_or_else(|p| p.into_inner());
                continue;
            };
            let wait = (since + self.max_unsynced).saturating_duration_since(Instant::now());
            if !wait.is_zero() {
                state = self.wake.wait_timeout(state, wait).unwrap_or_else(|p| p.into_inner()).0;
                continue;
            }
            drop(state);
            let result = db.commit(true, |_| Ok(()));
            state = self.lock();
            match result {
                Ok(begun) if state.unsynced_since.is_some_and(|since| since <= begun) => {
                    state.unsynced_since = None;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "could not sync the state store's counters; retrying");
                    state.unsynced_since = Some(Instant::now());
                }
            }
        }
    }
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store").field("path", &self.inner.db.path).finish_non_exhaustive()
    }
}

impl Store {
    /// Opens or creates `<dir>/amq2api.redb` (creating `dir` with mode 0700 if missing). Fails
    /// with [`StoreError::Locked`] when another process, or another `Store` in this one, has it
    /// open; checks, initialises or migrates the schema (see the module documentation).
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        Store::open_with(dir, COUNTERS_MAX_UNSYNCED)
    }

    fn open_with(dir: &Path, max_unsynced: Duration) -> Result<Store, StoreError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| StoreError::Io { path, source }
        };
        DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io(dir))?;
        let path = dir.join(FILE_NAME);
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.len() == 0 && meta.is_file() => {
                // amq2api never leaves an empty store behind (a new one is made under another
                // name and renamed into place), so an empty file is a damaged one — a restored
                // backup that was cut, a disk that filled up — and starting afresh would drop
                // every rotated refresh token without a word.
                return Err(StoreError::Corrupt {
                    table: FILE_DAMAGED.to_owned(),
                    key: path.display().to_string(),
                    detail: "the file is empty (0 bytes), so the refresh tokens rotated since the \
                             accounts file was written are gone. Restore it from a backup; or, to \
                             start afresh from the credentials in accounts.toml (accounts whose \
                             tokens have rotated will then need new credentials), move it away"
                        .to_owned(),
                });
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => create_new(&path)?,
            Err(e) => return Err(io(&path)(e)),
        }
        let db = open_database(&path)?;
        // Dropped (removed) before `db` on an error below.
        let pid_file = PidFile::write(dir);
        narrow_mode(&path)?;
        Store::start(db, path, Box::new(open_database), pid_file, max_unsynced)
    }

    fn start(
        db: Database,
        path: PathBuf,
        opener: Opener,
        pid_file: PidFile,
        max_unsynced: Duration,
    ) -> Result<Store, StoreError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| StoreError::Io { path, source }
        };
        prepare_schema(&db, &path)?;
        let db = Arc::new(Handle {
            path: path.clone(),
            slot: Mutex::new(Slot { db: Some(db), problem: None }),
            opener,
        });
        let syncer = Arc::new(Syncer { state: Mutex::default(), wake: Condvar::new(), max_unsynced });
        let sync_thread = std::thread::Builder::new()
            .name("store-sync".to_owned())
            .spawn({
                let (db, syncer) = (db.clone(), syncer.clone());
                move || syncer.run(&db)
            })
            .map_err(io(&path))?;
        Ok(Store {
            inner: Arc::new(Inner { _pid_file: pid_file, db, syncer, sync_thread: Some(sync_thread) }),
        })
    }

    /// The store file (`<dir>/amq2api.redb`).
    pub fn path(&self) -> &Path {
        &self.inner.db.path
    }

    /// Why the store cannot take writes, from the last failed write until the next one that
    /// succeeds; `None` while it is healthy.
    pub fn problem(&self) -> Option<StoreProblem> {
        self.inner.db.lock().problem.clone()
    }

    /// Every account with a row in any table, by account id.
    pub fn load_all(&self) -> Result<BTreeMap<String, AccountRecord>, StoreError> {
        let path = self.path();
        self.inner.db.run(false, |db| {
            let txn = db.begin_read().ctx(path)?;
            let mut out: BTreeMap<String, AccountRecord> = BTreeMap::new();
            for row in txn.open_table(TOKENS).ctx(path)?.iter().ctx(path)? {
                let (key, value) = row.ctx(path)?;
                let record = decode_tokens(key.value(), value.value())?;
                out.entry(key.value().to_owned()).or_default().tokens = Some(record);
            }
            for row in txn.open_table(STATE).ctx(path)?.iter().ctx(path)? {
                let (key, value) = row.ctx(path)?;
                out.entry(key.value().to_owned()).or_default().state =
                    state_or_disabled(key.value(), value.value());
            }
            for row in txn.open_table(COUNTERS).ctx(path)?.iter().ctx(path)? {
                let (key, value) = row.ctx(path)?;
                if let Some(record) = lenient(decode_counters(key.value(), value.value())) {
                    out.entry(key.value().to_owned()).or_default().counters = record;
                }
            }
            for row in txn.open_table(IDENTITY).ctx(path)?.iter().ctx(path)? {
                let (key, value) = row.ctx(path)?;
                let record = lenient(decode_identity(key.value(), value.value()));
                if record.is_some() {
                    out.entry(key.value().to_owned()).or_default().identity = record;
                }
            }
            for row in txn.open_table(CATALOG).ctx(path)?.iter().ctx(path)? {
                let (key, value) = row.ctx(path)?;
                let record = lenient(decode_catalog(key.value(), value.value()));
                if record.is_some() {
                    out.entry(key.value().to_owned()).or_default().catalog = record;
                }
            }
            Ok(out)
        })
    }

    /// One account, or `None` when no table has a row for it.
    pub fn get(&self, id: &str) -> Result<Option<AccountRecord>, StoreError> {
        let path = self.path();
        self.inner.db.run(false, |db| {
            let txn = db.begin_read().ctx(path)?;
            let tokens = match txn.open_table(TOKENS).ctx(path)?.get(id).ctx(path)? {
                Some(v) => Some(decode_tokens(id, v.value())?),
                None => None,
            };
            let state =
                txn.open_table(STATE).ctx(path)?.get(id).ctx(path)?.map(|v| state_or_disabled(id, v.value()));
            let counters = match txn.open_table(COUNTERS).ctx(path)?.get(id).ctx(path)? {
                Some(v) => lenient(decode_counters(id, v.value())),
                None => None,
            };
            let identity = match txn.open_table(IDENTITY).ctx(path)?.get(id).ctx(path)? {
                Some(v) => lenient(decode_identity(id, v.value())),
                None => None,
            };
            let catalog = match txn.open_table(CATALOG).ctx(path)?.get(id).ctx(path)? {
                Some(v) => lenient(decode_catalog(id, v.value())),
                None => None,
            };
            if tokens.is_none()
                && state.is_none()
                && counters.is_none()
                && identity.is_none()
                && catalog.is_none()
            {
                return Ok(None);
            }
            Ok(Some(AccountRecord {
                tokens,
                state: state.unwrap_or_default(),
                counters: counters.unwrap_or_default(),
                identity,
                catalog,
            }))
        })
    }

    /// Replaces the account's token record; on disk (`Durability::Immediate`) before returning.
    /// Call it with a rotated refresh token *before* using the access token that came with it.
    pub fn put_tokens(&self, id: &str, t: &TokenRecord) -> Result<(), StoreError> {
        self.commit_tokens(&[(id, t)])
    }

    /// Replaces the token records of `batch`, in its order (a later write of one account wins),
    /// in one durable commit.
    fn commit_tokens(&self, batch: &[(&str, &TokenRecord)]) -> Result<(), StoreError> {
        let values = batch
            .iter()
            .map(|(id, t)| Ok((*id, encode(&TokenWire::from(*t))?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        self.write(true, |txn| {
            let mut table = txn.open_table(TOKENS).ctx(self.path())?;
            for (id, value) in &values {
                table.insert(*id, value.as_slice()).ctx(self.path())?;
            }
            Ok(())
        })
    }

    /// Replaces many accounts' token records in one commit, on disk before returning, a result
    /// each. If the commit fails (or a record does not encode), each record is written alone,
    /// so that each gets its own answer and one bad record fails no other.
    pub fn put_tokens_batch(&self, batch: &[(String, TokenRecord)]) -> Vec<Result<(), StoreError>> {
        if batch.len() > 1 {
            let all: Vec<(&str, &TokenRecord)> = batch.iter().map(|(id, t)| (id.as_str(), t)).collect();
            if self.commit_tokens(&all).is_ok() {
                return batch.iter().map(|_| Ok(())).collect();
            }
        }
        batch.iter().map(|(id, t)| self.put_tokens(id, t)).collect()
    }

    /// Replaces the account's state record; on disk before returning.
    pub fn put_state(&self, id: &str, s: &StateRecord) -> Result<(), StoreError> {
        self.put_states(&[(id.to_owned(), s.clone())])
    }

    /// Replaces the state records of many accounts in one commit; on disk before returning.
    pub fn put_states(&self, batch: &[(String, StateRecord)]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let values = batch
            .iter()
            .map(|(id, s)| Ok((id.as_str(), encode(&StateWire::from(s))?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        self.write(true, |txn| {
            let mut table = txn.open_table(STATE).ctx(self.path())?;
            for (id, value) in &values {
                table.insert(*id, value.as_slice()).ctx(self.path())?;
            }
            Ok(())
        })
    }

    /// Replaces the counters of many accounts in one commit, without waiting for the disk: a
    /// background thread makes it durable within [`COUNTERS_MAX_UNSYNCED`] (sooner if a durable
    /// write comes first). A crash may lose the last few seconds of counting, never corrupt the
    /// store.
    pub fn put_counters(&self, batch: &[(String, Counters)]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let values = batch
            .iter()
            .map(|(id, c)| Ok((id.as_str(), encode(&CountersWire::from(c))?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        self.write(false, |txn| {
            let mut table = txn.open_table(COUNTERS).ctx(self.path())?;
            for (id, value) in &values {
                table.insert(*id, value.as_slice()).ctx(self.path())?;
            }
            Ok(())
        })
    }

    /// Replaces the identity records of many accounts in one commit; on disk before returning.
    pub fn put_identities(&self, batch: &[(String, IdentityRecord)]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let values = batch
            .iter()
            .map(|(id, r)| Ok((id.as_str(), encode(&IdentityWire::from(r))?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        self.write(true, |txn| {
            let mut table = txn.open_table(IDENTITY).ctx(self.path())?;
            for (id, value) in &values {
                table.insert(*id, value.as_slice()).ctx(self.path())?;
            }
            Ok(())
        })
    }

    /// Replaces the catalogs of many accounts in one commit (not waited for: a lost catalog is
    /// fetched again).
    pub fn put_catalogs(&self, batch: &[(String, CatalogRecord)]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let values = batch
            .iter()
            .map(|(id, r)| Ok((id.as_str(), encode(&CatalogWire::from(r))?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        self.write(false, |txn| {
            let mut table = txn.open_table(CATALOG).ctx(self.path())?;
            for (id, value) in &values {
                table.insert(*id, value.as_slice()).ctx(self.path())?;
            }
            Ok(())
        })
    }

    /// Forgets an account: deletes its rows from every table, on disk before returning.
    pub fn remove(&self, id: &str) -> Result<(), StoreError> {
        self.write(true, |txn| {
            for table in [TOKENS, STATE, COUNTERS, IDENTITY, CATALOG] {
                txn.open_table(table).ctx(self.path())?.remove(id).ctx(self.path())?;
            }
            Ok(())
        })
    }

    /// Adds usage deltas (`(row key, delta)`, keys from [`usage_key`]) to their rows in one
    /// durable commit. The usage recorder batches a second's requests into one call, so the
    /// store sees about one commit a second whatever the request rate.
    pub fn add_usage(&self, batch: &[(String, UsageRow)]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        self.write(true, |txn| {
            let mut table = txn.open_table(USAGE).ctx(self.path())?;
            for (key, delta) in batch {
                let old = match table.get(key.as_str()).ctx(self.path())? {
                    Some(v) => decode::<UsageRow>("usage", key, v.value())?,
                    None => UsageRow::default(),
                };
                let value = encode(&old.plus(delta))?;
                table.insert(key.as_str(), value.as_slice()).ctx(self.path())?;
            }
            Ok(())
        })
    }

    /// Usage rows from day `from` (`YYYY-MM-DD`, inclusive) on, in key order (day, dim, name).
    pub fn usage_since(&self, from: &str) -> Result<Vec<(String, UsageRow)>, StoreError> {
        let path = self.path();
        self.inner.db.run(false, |db| {
            let txn = db.begin_read().ctx(path)?;
            let table = txn.open_table(USAGE).ctx(path)?;
            let mut out = Vec::new();
            for row in table.range(from..).ctx(path)? {
                let (key, value) = row.ctx(path)?;
                out.push((key.value().to_owned(), decode("usage", key.value(), value.value())?));
            }
            Ok(out)
        })
    }

    /// Deletes the usage rows of days before `before` (`YYYY-MM-DD`); returns how many.
    pub fn prune_usage(&self, before: &str) -> Result<usize, StoreError> {
        let mut removed = 0;
        self.write(true, |txn| {
            let mut table = txn.open_table(USAGE).ctx(self.path())?;
            let keys: Vec<String> = table
                .range(..before)
                .ctx(self.path())?
                .map(|r| r.map(|(k, _)| k.value().to_owned()))
                .collect::<Result<_, _>>()
                .ctx(self.path())?;
            for k in &keys {
                table.remove(k.as_str()).ctx(self.path())?;
            }
            removed = keys.len();
            Ok(())
        })?;
        Ok(removed)
    }

    /// Runs `f` in a write transaction and commits it, durably or not.
    fn write(
        &self,
        durable: bool,
        f: impl FnOnce(&WriteTransaction) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let begun = self.inner.db.commit(durable, f)?;
        if durable {
            self.inner.syncer.note_durable(begun);
        } else {
            self.inner.syncer.note_unsynced();
        }
        Ok(())
    }
}

/// Makes a new store: initialised under a temporary name and renamed into place, so that
/// `amq2api.redb` never exists empty (an empty one is refused as damaged).
fn create_new(path: &Path) -> Result<(), StoreError> {
    let io = |p: &Path| {
        let p = p.to_owned();
        move |source| StoreError::Io { path: p, source }
    };
    let tmp = path.with_extension("redb.new");
    // Created here rather than by redb, so that the tokens are never readable by others.
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    let db = open_database(&tmp)?;
    prepare_schema(&db, &tmp)?;
    drop(db);
    std::fs::rename(&tmp, path).map_err(io(path))?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))?;
    }
    Ok(())
}

/// Checks the schema version; initialises a new file, migrates an older one, refuses a newer
/// one. Makes sure every table exists.
fn prepare_schema(db: &Database, path: &Path) -> Result<(), StoreError> {
    let txn = db.begin_write().ctx(path)?;
    let tables: Vec<String> = txn.list_tables().ctx(path)?.map(|t| t.name().to_owned()).collect();
    let found = if tables.iter().any(|t| t == META.name()) {
        let meta = txn.open_table(META).ctx(path)?;
        let raw = meta.get(SCHEMA_KEY).ctx(path)?;
        let raw = raw.ok_or_else(|| StoreError::corrupt("meta", SCHEMA_KEY, "missing"))?;
        Some(decode_schema_version(raw.value())?)
    } else if tables.is_empty() {
        None
    } else {
        return Err(StoreError::corrupt(
            "meta",
            SCHEMA_KEY,
            format!(
                "the file holds tables ({}) but no schema version: not an amq2api store",
                tables.join(", ")
            ),
        ));
    };
    match found {
        None => tracing::info!(path = %path.display(), "creating a new state store"),
        Some(found) if found > SCHEMA_VERSION => {
            return Err(StoreError::SchemaTooNew { found, supported: SCHEMA_VERSION });
        }
        Some(found) if found < SCHEMA_VERSION => {
            tracing::info!(
                path = %path.display(),
                from = found,
                to = SCHEMA_VERSION,
                "migrating the state store"
            );
            migrate(&txn, found)?;
        }
        Some(_) => {}
    }
    if found != Some(SCHEMA_VERSION) {
        let version = SCHEMA_VERSION.to_le_bytes();
        txn.open_table(META).ctx(path)?.insert(SCHEMA_KEY, version.as_slice()).ctx(path)?;
    }
    for table in [TOKENS, STATE, COUNTERS, IDENTITY, CATALOG, USAGE] {
        txn.open_table(table).ctx(path)?;
    }
    txn.commit().ctx(path)?;
    Ok(())
}

/// Upgrades the tables in `txn` from schema version `from` to [`SCHEMA_VERSION`].
fn migrate(txn: &WriteTransaction, from: u32) -> Result<(), StoreError> {
    migrate_with(txn, from, MIGRATIONS)
}

fn migrate_with(txn: &WriteTransaction, from: u32, steps: &[Migration]) -> Result<(), StoreError> {
    let first = usize::try_from(from).ok().and_then(|v| v.checked_sub(1)).filter(|&i| i <= steps.len());
    let first = first.ok_or_else(|| {
        StoreError::corrupt("meta", SCHEMA_KEY, format!("schema version {from} is not one amq2api wrote"))
    })?;
    for step in &steps[first..] {
        step(txn)?;
    }
    Ok(())
}

fn decode_schema_version(raw: &[u8]) -> Result<u32, StoreError> {
    let bytes: [u8; 4] = raw.try_into().map_err(|_| {
        StoreError::corrupt("meta", SCHEMA_KEY, format!("{} bytes where 4 were expected", raw.len()))
    })?;
    Ok(u32::from_le_bytes(bytes))
}

/// The pid in the holder's pid file, if it names a live process.
fn holder_pid(dir: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(dir.join(PID_FILE_NAME)).ok()?;
    let pid: i32 = text.trim().parse().ok().filter(|&p| p > 0)?;
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) | Err(nix::errno::Errno::EPERM) => u32::try_from(pid).ok(),
        Err(_) => None,
    }
}

/// Narrows an existing store file readable by group or others to 0600.
fn narrow_mode(path: &Path) -> Result<(), StoreError> {
    let io = |source| StoreError::Io { path: path.to_owned(), source };
    let mode = std::fs::metadata(path).map_err(io)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "the state store holds tokens: narrowing its mode to 0600");
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    }
    Ok(())
}

// ---- value encoding ----

pub(super) fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    let mut out = vec![VALUE_VERSION];
    serde_json::to_writer(&mut out, value).map_err(|e| StoreError::Db(format!("encoding a value: {e}")))?;
    Ok(out)
}

/// Splits off the version byte and decodes the payload. Error details never quote the payload
/// (it may hold a token).
fn decode<T: DeserializeOwned>(table: &str, key: &str, raw: &[u8]) -> Result<T, StoreError> {
    match raw.split_first() {
        None => Err(StoreError::corrupt(table, key, "empty value")),
        Some((&VALUE_VERSION, payload)) => serde_json::from_slice(payload).map_err(|e| {
            StoreError::corrupt(
                table,
                key,
                format!(
                    "undecodable payload ({:?} error at line {} column {})",
                    e.classify(),
                    e.line(),
                    e.column()
                ),
            )
        }),
        Some((&version, _)) => Err(StoreError::corrupt(
            table,
            key,
            format!("unknown value version {version} (this amq2api reads version {VALUE_VERSION})"),
        )),
    }
}

fn to_ms(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_millis()).map(|ms| -ms).unwrap_or(i64::MIN),
    }
}

fn from_ms(ms: i64) -> Option<SystemTime> {
    let magnitude = Duration::from_millis(ms.unsigned_abs());
    if ms >= 0 { UNIX_EPOCH.checked_add(magnitude) } else { UNIX_EPOCH.checked_sub(magnitude) }
}

fn time_field(table: &str, key: &str, field: &str, ms: i64) -> Result<SystemTime, StoreError> {
    from_ms(ms).ok_or_else(|| StoreError::corrupt(table, key, format!("{field} out of range")))
}

fn opt_time_field(
    table: &str,
    key: &str,
    field: &str,
    ms: Option<i64>,
) -> Result<Option<SystemTime>, StoreError> {
    ms.map(|ms| time_field(table, key, field, ms)).transpose()
}

#[derive(Serialize, Deserialize)]
pub(super) struct TokenWire {
    refresh_token: String,
    file_fingerprint: String,
    rotated: bool,
    access_token: Option<String>,
    access_expires_at_ms: Option<i64>,
    updated_at_ms: i64,
}

impl From<&TokenRecord> for TokenWire {
    fn from(t: &TokenRecord) -> Self {
        TokenWire {
            refresh_token: t.refresh_token.expose().to_owned(),
            file_fingerprint: hex::encode(t.file_fingerprint),
            rotated: t.rotated,
            access_token: t.access_token.as_ref().map(|s| s.expose().to_owned()),
            access_expires_at_ms: t.access_expires_at.map(to_ms),
            updated_at_ms: to_ms(t.updated_at),
        }
    }
}

pub(super) fn decode_tokens(key: &str, raw: &[u8]) -> Result<TokenRecord, StoreError> {
    const T: &str = "tokens";
    let w: TokenWire = decode(T, key, raw)?;
    let mut file_fingerprint = [0u8; 32];
    hex::decode_to_slice(&w.file_fingerprint, &mut file_fingerprint)
        .map_err(|_| StoreError::corrupt(T, key, "file_fingerprint is not 32 bytes of hex"))?;
    Ok(TokenRecord {
        refresh_token: Secret::new(w.refresh_token),
        file_fingerprint,
        rotated: w.rotated,
        access_token: w.access_token.map(Secret::new),
        access_expires_at: opt_time_field(T, key, "access_expires_at_ms", w.access_expires_at_ms)?,
        updated_at: time_field(T, key, "updated_at_ms", w.updated_at_ms)?,
    })
}

#[derive(Serialize, Deserialize)]
pub(super) struct StateWire {
    state: String,
    since_ms: Option<i64>,
    until_ms: Option<i64>,
    reason: Option<String>,
    last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_error_ms: Option<i64>,
}

impl From<&StateRecord> for StateWire {
    fn from(s: &StateRecord) -> Self {
        StateWire {
            state: s.state.as_str().to_owned(),
            since_ms: s.since.map(to_ms),
            until_ms: s.until.map(to_ms),
            reason: s.reason.clone(),
            last_error: s.last_error.clone(),
            last_error_ms: s.last_error_at.map(to_ms),
        }
    }
}

pub(super) fn decode_state(key: &str, raw: &[u8]) -> Result<StateRecord, StoreError> {
    const T: &str = "state";
    let w: StateWire = decode(T, key, raw)?;
    Ok(StateRecord {
        state: w
            .state
            .parse()
            .map_err(|e: UnknownAccountState| StoreError::corrupt(T, key, e.to_string()))?,
        since: opt_time_field(T, key, "since_ms", w.since_ms)?,
        until: opt_time_field(T, key, "until_ms", w.until_ms)?,
        reason: w.reason,
        last_error: w.last_error,
        last_error_at: opt_time_field(T, key, "last_error_ms", w.last_error_ms)?,
    })
}

#[derive(Serialize, Deserialize)]
pub(super) struct CountersWire {
    requests: u64,
    failures: u64,
    failures_by_kind: BTreeMap<String, u64>,
    tokens_in: u64,
    tokens_out: u64,
    #[serde(default)]
    credits: f64,
    last_used_ms: Option<i64>,
}

impl From<&Counters> for CountersWire {
    fn from(c: &Counters) -> Self {
        CountersWire {
            requests: c.requests,
            failures: c.failures,
            failures_by_kind: c.failures_by_kind.clone(),
            tokens_in: c.tokens_in,
            tokens_out: c.tokens_out,
            credits: c.credits,
            last_used_ms: c.last_used.map(to_ms),
        }
    }
}

pub(super) fn decode_counters(key: &str, raw: &[u8]) -> Result<Counters, StoreError> {
    const T: &str = "counters";
    let w: CountersWire = decode(T, key, raw)?;
    Ok(Counters {
        requests: w.requests,
        failures: w.failures,
        failures_by_kind: w.failures_by_kind,
        tokens_in: w.tokens_in,
        tokens_out: w.tokens_out,
        credits: if w.credits.is_finite() && w.credits >= 0.0 { w.credits } else { 0.0 },
        last_used: opt_time_field(T, key, "last_used_ms", w.last_used_ms)?,
    })
}

#[derive(Serialize, Deserialize)]
pub(super) struct IdentityWire {
    machine_id: String,
    profile_arn: Option<String>,
    profile_for: Option<String>,
    endpoint: Option<String>,
}

impl From<&IdentityRecord> for IdentityWire {
    fn from(r: &IdentityRecord) -> Self {
        IdentityWire {
            machine_id: r.machine_id.clone(),
            profile_arn: r.profile_arn.clone(),
            profile_for: r.profile_for.map(hex::encode),
            endpoint: r.endpoint.clone(),
        }
    }
}

#[derive(Serialize, Deserialize)]
pub(super) struct CatalogWire {
    fetched_at_ms: i64,
    models: Vec<crate::upstream::catalog::CatalogModel>,
}

impl From<&CatalogRecord> for CatalogWire {
    fn from(r: &CatalogRecord) -> Self {
        CatalogWire { fetched_at_ms: to_ms(r.fetched_at), models: r.models.values().cloned().collect() }
    }
}

pub(super) fn decode_catalog(key: &str, raw: &[u8]) -> Result<CatalogRecord, StoreError> {
    const T: &str = "catalog";
    let w: CatalogWire = decode(T, key, raw)?;
    let models = crate::upstream::catalog::share(w.models);
    Ok(CatalogRecord { fetched_at: time_field(T, key, "fetched_at_ms", w.fetched_at_ms)?, models })
}

pub(super) fn decode_identity(key: &str, raw: &[u8]) -> Result<IdentityRecord, StoreError> {
    const T: &str = "identity";
    let w: IdentityWire = decode(T, key, raw)?;
    let profile_for = match w.profile_for {
        None => None,
        Some(h) => {
            let mut f = [0u8; 32];
            hex::decode_to_slice(&h, &mut f)
                .map_err(|_| StoreError::corrupt(T, key, "profile_for is not 32 bytes of hex"))?;
            Some(f)
        }
    };
    Ok(IdentityRecord {
        machine_id: w.machine_id,
        profile_arn: w.profile_arn,
        profile_for,
        endpoint: w.endpoint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::ReadableTableMetadata;

    fn at(ms: i64) -> SystemTime {
        from_ms(ms).unwrap()
    }

    fn token() -> TokenRecord {
        TokenRecord {
            refresh_token: Secret::new("rt-é✓-🔑"),
            file_fingerprint: [7; 32],
            rotated: true,
            access_token: Some(Secret::new("at-1")),
            access_expires_at: Some(at(1_800_000_000_123)),
            updated_at: at(1_700_000_000_000),
        }
    }

    #[test]
    fn token_encoding_round_trips() {
        let mut t = token();
        let raw = encode(&TokenWire::from(&t)).unwrap();
        assert_eq!(raw[0], VALUE_VERSION);
        assert_eq!(decode_tokens("a", &raw).unwrap(), t);
        t.access_token = None;
        t.access_expires_at = None;
        t.rotated = false;
        let raw = encode(&TokenWire::from(&t)).unwrap();
        assert_eq!(decode_tokens("a", &raw).unwrap(), t);
    }

    #[test]
    fn state_encoding_round_trips_every_state() {
        for state in AccountState::ALL {
            for s in [
                StateRecord { state, ..StateRecord::default() },
                StateRecord {
                    state,
                    since: Some(at(1)),
                    until: Some(at(-5)),
                    reason: Some("429 ✓".into()),
                    last_error: Some("boom".into()),
                    last_error_at: Some(at(2)),
                },
            ] {
                let raw = encode(&StateWire::from(&s)).unwrap();
                assert_eq!(decode_state("a", &raw).unwrap(), s);
            }
        }
    }

    #[test]
    fn counters_encoding_round_trips() {
        let c = Counters {
            requests: u64::MAX,
            failures: 3,
            failures_by_kind: [("throttled".to_owned(), 2), ("auth".to_owned(), 1)].into(),
            tokens_in: 10,
            tokens_out: 20,
            credits: 1.25,
            last_used: Some(at(1_700_000_000_001)),
        };
        let raw = encode(&CountersWire::from(&c)).unwrap();
        assert_eq!(decode_counters("a", &raw).unwrap(), c);
        let raw = encode(&CountersWire::from(&Counters::default())).unwrap();
        assert_eq!(decode_counters("a", &raw).unwrap(), Counters::default());
    }

    #[test]
    fn account_state_names_round_trip() {
        for state in AccountState::ALL {
            assert_eq!(state.as_str().parse::<AccountState>().unwrap(), state);
            assert_eq!(state.to_string(), state.as_str());
        }
        assert_eq!(AccountState::default(), AccountState::Active);
        assert!("Active".parse::<AccountState>().is_err());
    }

    #[test]
    fn timestamps_keep_milliseconds() {
        for ms in [0, 1, -1, 1_700_000_000_999, -86_400_000] {
            assert_eq!(to_ms(at(ms)), ms);
        }
        let t = UNIX_EPOCH + Duration::new(5, 123_456_789);
        assert_eq!(from_ms(to_ms(t)), Some(UNIX_EPOCH + Duration::from_millis(5_123)));
        // Out-of-range values are None (reported as Corrupt by the callers), never a panic.
        let _ = (from_ms(i64::MAX), from_ms(i64::MIN));
    }

    fn assert_corrupt(err: StoreError, want_table: &str, want_key: &str) -> String {
        match err {
            StoreError::Corrupt { table, key, detail } => {
                assert_eq!((table.as_str(), key.as_str()), (want_table, want_key));
                detail
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[test]
    fn bad_values_are_corrupt_never_a_panic() {
        let good = encode(&TokenWire::from(&token())).unwrap();
        let mut unknown = good.clone();
        unknown[0] = 9;
        let detail = assert_corrupt(decode_tokens("k", &unknown).unwrap_err(), "tokens", "k");
        assert!(detail.contains("unknown value version 9"), "{detail}");
        assert_corrupt(decode_tokens("k", &[]).unwrap_err(), "tokens", "k");
        for cut in 1..good.len() {
            assert_corrupt(decode_tokens("k", &good[..cut]).unwrap_err(), "tokens", "k");
        }
        assert_corrupt(decode_state("s", &[1, 0xff, 0xfe]).unwrap_err(), "state", "s");
        assert_corrupt(decode_counters("c", b"\x01{}").unwrap_err(), "counters", "c");

        let bad_state = [
            &[1u8][..],
            br#"{"state":"sleeping","since_ms":null,"until_ms":null,"reason":null,"last_error":null}"#,
        ]
        .concat();
        let detail = assert_corrupt(decode_state("s", &bad_state).unwrap_err(), "state", "s");
        assert!(detail.contains("sleeping"), "{detail}");

        let mut w = TokenWire::from(&token());
        w.file_fingerprint = "abc".into();
        assert_corrupt(decode_tokens("k", &encode(&w).unwrap()).unwrap_err(), "tokens", "k");
        let mut w = TokenWire::from(&token());
        w.updated_at_ms = i64::MIN;
        // Either in range on this platform or reported, never a panic.
        let _ = decode_tokens("k", &encode(&w).unwrap());
    }

    #[test]
    fn corrupt_details_never_quote_a_token() {
        let mut w = TokenWire::from(&token());
        w.refresh_token = "sekrit-refresh".into();
        let raw = encode(&w).unwrap();
        // Break the JSON right after the token, and give a wrong type to a later field.
        let json = String::from_utf8(raw[1..].to_vec())
            .unwrap()
            .replace("\"rotated\":true", "\"rotated\":\"sekrit-refresh\"");
        let raw = [&[1u8][..], json.as_bytes()].concat();
        let err = decode_tokens("k", &raw).unwrap_err();
        assert!(!err.to_string().contains("sekrit"), "{err}");
        assert!(!format!("{err:?}").contains("sekrit"), "{err:?}");
    }

    #[test]
    fn schema_version_must_be_four_bytes() {
        assert_eq!(decode_schema_version(&7u32.to_le_bytes()).unwrap(), 7);
        assert_corrupt(decode_schema_version(&[1, 0]).unwrap_err(), "meta", SCHEMA_KEY);
    }

    const MARKS: TableDefinition<&str, u32> = TableDefinition::new("marks");

    fn mark(txn: &WriteTransaction, step: u32) -> Result<(), StoreError> {
        let mut t = txn.open_table(MARKS).unwrap();
        let n = t.len().unwrap() as u32;
        t.insert(format!("{n}").as_str(), step).unwrap();
        Ok(())
    }

    #[test]
    fn migrations_run_in_order_from_the_found_version() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("m.redb")).unwrap();
        let steps: &[Migration] = &[|t| mark(t, 1), |t| mark(t, 2), |t| mark(t, 3)];
        let run = |from: u32| -> Result<Vec<u32>, StoreError> {
            let txn = db.begin_write().unwrap();
            migrate_with(&txn, from, steps)?;
            let t = txn.open_table(MARKS).unwrap();
            let done = t.iter().unwrap().map(|r| r.unwrap().1.value()).collect();
            drop(t);
            txn.abort().unwrap();
            Ok(done)
        };
        assert_eq!(run(1).unwrap(), vec![1, 2, 3]);
        assert_eq!(run(2).unwrap(), vec![2, 3]);
        assert_eq!(run(4).unwrap(), Vec::<u32>::new());
        assert_corrupt(run(0).unwrap_err(), "meta", SCHEMA_KEY);
        assert_corrupt(run(5).unwrap_err(), "meta", SCHEMA_KEY);
        // Today's chain: nothing to do from version 1.
        let txn = db.begin_write().unwrap();
        migrate(&txn, SCHEMA_VERSION).unwrap();
        assert!(migrate(&txn, 0).is_err());
    }

    #[test]
    fn v2_stores_migrate_to_v3_keeping_their_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        {
            // A version 2 file: its tables, one token row, schema 2, no usage table.
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(META).unwrap().insert(SCHEMA_KEY, 2u32.to_le_bytes().as_slice()).unwrap();
            let tok = encode(&TokenWire::from(&TokenRecord {
                refresh_token: Secret::new("rt"),
                file_fingerprint: [7; 32],
                rotated: true,
                access_token: None,
                access_expires_at: None,
                updated_at: UNIX_EPOCH,
            }))
            .unwrap();
            txn.open_table(TOKENS).unwrap().insert("a", tok.as_slice()).unwrap();
            for t in [STATE, COUNTERS, IDENTITY, CATALOG] {
                txn.open_table(t).unwrap();
            }
            txn.commit().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.get("a").unwrap().unwrap().tokens.unwrap().refresh_token.expose(), "rt");
        let row = |n| UsageRow { requests: n, errors: 1, tokens_in: 10 * n, tokens_out: n, credits: 0.5 };
        store
            .add_usage(&[
                (usage_key("2026-01-01", "key", "alice"), row(1)),
                (usage_key("2026-01-02", "key", "alice"), row(2)),
            ])
            .unwrap();
        store.add_usage(&[(usage_key("2026-01-02", "key", "alice"), row(3))]).unwrap();
        let rows = store.usage_since("2026-01-02").unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(
            rows[0].1,
            UsageRow { requests: 5, errors: 2, tokens_in: 50, tokens_out: 5, credits: 1.0 }
        );
        assert_eq!(split_usage_key(&rows[0].0), Some(("2026-01-02", "key", "alice")));
        assert_eq!(store.prune_usage("2026-01-02").unwrap(), 1);
        assert_eq!(store.usage_since("2000-01-01").unwrap().len(), 1);
    }

    #[test]
    fn a_durable_commit_covers_only_earlier_unsynced_ones() {
        let syncer = Syncer { state: Mutex::default(), wake: Condvar::new(), max_unsynced: Duration::ZERO };
        let before = Instant::now();
        syncer.note_unsynced();
        syncer.note_durable(before);
        assert!(syncer.lock().unsynced_since.is_some(), "began before the unsynced commit");
        syncer.note_durable(Instant::now());
        assert!(syncer.lock().unsynced_since.is_none());
    }

    #[test]
    fn the_store_is_shareable_across_threads() {
        fn send_sync<T: Send + Sync + Clone + 'static>() {}
        send_sync::<Store>();
    }

    const CHILD_DIR_ENV: &str = "AMQ2API_STORE_UNIT_CHILD_DIR";

    /// Helper for `unsynced_counters_reach_the_disk_within_the_bound`.
    #[test]
    #[ignore = "helper: runs in a child process"]
    fn child_counts_then_idles() {
        let Some(dir) = std::env::var_os(CHILD_DIR_ENV) else { return };
        let store = Store::open_with(Path::new(&dir), Duration::from_millis(200)).unwrap();
        let counters = Counters { requests: 42, ..Counters::default() };
        store.put_counters(&[("a".to_owned(), counters)]).unwrap();
        println!("counted");
        std::thread::sleep(Duration::from_secs(30));
    }

    /// Counters committed without waiting for the disk are there after a SIGKILL once the bound
    /// has passed, though nothing else was written.
    #[test]
    fn unsynced_counters_reach_the_disk_within_the_bound() {
        use nix::sys::signal::{Signal, kill};
        use std::io::{BufRead, BufReader};
        use std::process::{Command, Stdio};

        let tmp = tempfile::tempdir().unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "store::redb::tests::child_counts_then_idles",
                "--exact",
                "--ignored",
                "--nocapture",
                "-q",
            ])
            .env(CHILD_DIR_ENV, tmp.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        assert!(lines.map_while(Result::ok).any(|l| l == "counted"), "the child never counted");
        std::thread::sleep(Duration::from_millis(1000));
        kill(nix::unistd::Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
        child.wait().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        assert_eq!(store.get("a").unwrap().map(|r| r.counters.requests), Some(42));
    }

    /// Storage that keeps its bytes across reopens (a disk) and fails every operation with
    /// `EIO` while `fail` is set.
    #[derive(Debug)]
    struct FlakyDisk {
        data: Arc<Mutex<Vec<u8>>>,
        fail: Arc<std::sync::atomic::AtomicBool>,
    }

    impl FlakyDisk {
        fn check(&self) -> std::io::Result<()> {
            if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
                Err(std::io::Error::from_raw_os_error(nix::libc::EIO))
            } else {
                Ok(())
            }
        }
    }

    impl redb::StorageBackend for FlakyDisk {
        fn len(&self) -> std::io::Result<u64> {
            self.check()?;
            Ok(self.data.lock().unwrap().len() as u64)
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
            self.check()?;
            let data = self.data.lock().unwrap();
            let start = offset as usize;
            let src = data
                .get(start..start + out.len())
                .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
            out.copy_from_slice(src);
            Ok(())
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.check()?;
            self.data.lock().unwrap().resize(len as usize, 0);
            Ok(())
        }
        fn sync_data(&self) -> std::io::Result<()> {
            self.check()
        }
        fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            self.check()?;
            let mut d = self.data.lock().unwrap();
            let end = offset as usize + data.len();
            if d.len() < end {
                d.resize(end, 0);
            }
            d[offset as usize..end].copy_from_slice(data);
            Ok(())
        }
    }

    /// An `EIO` poisons redb's handle ("Previous I/O error occurred"): the store closes it,
    /// reports the problem, reopens on the next operation, and takes writes again once the
    /// storage works — with every committed token still there.
    #[test]
    fn an_io_error_closes_the_handle_and_a_later_write_reopens_it() {
        let tmp = tempfile::tempdir().unwrap();
        let data = Arc::new(Mutex::new(Vec::new()));
        let fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let opener: Opener = {
            let (data, fail) = (data.clone(), fail.clone());
            Box::new(move |_: &Path| {
                Database::builder()
                    .create_with_backend(FlakyDisk { data: data.clone(), fail: fail.clone() })
                    .map_err(|e| StoreError::from_redb(Path::new("flaky"), e.into()))
            })
        };
        let db = opener(Path::new("flaky")).unwrap();
        let store = Store::start(
            db,
            tmp.path().join(FILE_NAME),
            opener,
            PidFile::write(tmp.path()),
            Duration::from_secs(5),
        )
        .unwrap();
        let rt = |n: u32| TokenRecord { refresh_token: Secret::new(format!("rt-{n}")), ..token() };
        store.put_tokens("a", &rt(1)).unwrap();
        assert_eq!(store.problem(), None);

        fail.store(true, std::sync::atomic::Ordering::SeqCst);
        for n in 2..5 {
            let err = store.put_tokens("a", &rt(n)).unwrap_err();
            assert!(err.needs_reopen(), "{err:?}");
        }
        let problem = store.problem().expect("the failure is reported");
        assert!(problem.error.contains("Input/output error"), "{problem:?}");
        assert_eq!(problem.failures, 3);
        assert!(store.put_counters(&[("a".to_owned(), Counters::default())]).is_err());
        // A batch that cannot commit: each record is tried alone and each gets its own error.
        let failed = store.put_tokens_batch(&[("a".to_owned(), rt(6)), ("b".to_owned(), rt(7))]);
        assert_eq!(failed.len(), 2);
        assert!(failed.iter().all(|r| r.as_ref().is_err_and(|e| e.needs_reopen())), "{failed:?}");

        fail.store(false, std::sync::atomic::Ordering::SeqCst);
        store.put_tokens("a", &rt(5)).unwrap();
        assert_eq!(store.problem(), None, "a successful write clears the problem");
        let got = store.get("a").unwrap().unwrap().tokens.unwrap();
        assert_eq!(got.refresh_token.expose(), "rt-5");
        assert!(store.get("b").unwrap().and_then(|r| r.tokens).is_none(), "the failed batch wrote nothing");

        // One commit for the batch, in its order: the later write of an account wins.
        let batch = [("a".to_owned(), rt(8)), ("b".to_owned(), rt(9)), ("a".to_owned(), rt(10))];
        assert!(store.put_tokens_batch(&batch).iter().all(Result::is_ok));
        let token_of =
            |id: &str| store.get(id).unwrap().unwrap().tokens.unwrap().refresh_token.expose().to_owned();
        assert_eq!((token_of("a"), token_of("b")), ("rt-10".to_owned(), "rt-9".to_owned()));
    }

    #[test]
    fn locked_message_names_the_directory_and_holder() {
        let e = StoreError::Locked { path: "/var/lib/amq2api".into(), pid: Some(4242) };
        let msg = e.to_string();
        assert!(msg.starts_with("another amq2api is using /var/lib/amq2api (pid 4242)"), "{msg}");
        let e = StoreError::Locked { path: "/x".into(), pid: None };
        assert!(e.to_string().contains("(pid unknown)"));
    }
}
