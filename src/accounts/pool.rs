//! The account pool: which account serves a request (least-busy or round-robin, skipping
//! cooling, parked, suspended, invalid, disabled and full accounts), a bounded wait when all
//! are busy, leases that record outcomes, and live application of account-set diffs.

use super::catalog::AccountCatalog;
use super::identity::Identity;
use super::tokens::{Access, Chain, MIN_VALIDITY, Reset, Tokens};
use crate::config::{
    AccountId, AccountSet, AccountSpec, AccountsConfig, AccountsDiff, Credentials, Kind, Secret, Strategy,
    UpstreamConfig,
};
use crate::translate::Catalog;
use crate::upstream::catalog::Models;
use crate::upstream::{
    Agent, Caller, Endpoints, QuotaKind, RefreshError, Role, UpstreamClient, UpstreamFailure, endpoints_for,
};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};
use tracing::Instrument;

pub use super::state::AccountState as State;
pub use crate::store::Counters;

/// State with its times and reason.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StateInfo {
    pub state: State,
    pub since: Option<SystemTime>,
    pub until: Option<SystemTime>,
    pub reason: Option<String>,
    pub last_error: Option<String>,
    /// When `last_error` happened; both clear when a request through the account goes through.
    pub last_error_at: Option<SystemTime>,
    /// Consecutive throttles, for the cooling backoff.
    pub strikes: u32,
}

/// Where the pool writes what must survive a restart. The store implements it.
pub trait StateSink: Send + Sync {
    /// Starts writing an account's tokens; the write resolves `Ok` once they are durable
    /// (rotated refresh tokens are stored before they are used). It never blocks the caller: a
    /// sink that waits for a disk does so on a thread of its own.
    fn tokens(&self, id: &AccountId, chain: &Chain, access: &Access) -> TokenWrite;
    /// Queues a state change; the sink writes it in the background, retrying until it is
    /// stored. Never blocks.
    fn state(&self, id: &AccountId, info: &StateInfo);
    /// Queues counters, like [`StateSink::state`] (batched, not waited for).
    fn counters(&self, batch: Vec<(AccountId, Counters)>);
    /// What the store holds for accounts that join at run time (removed earlier and now back,
    /// for example): their rotated token chains must not be lost. One answer per id, in order;
    /// `Err` when the store cannot be read (the account must then not start from its file's
    /// token). It may block (a disk, a database): the pool calls it off the async workers.
    fn restore(&self, ids: &[AccountId]) -> Vec<Result<Restored, String>>;
    /// Queues what an account learned about itself (machine id, profile, endpoint), like
    /// [`StateSink::state`].
    fn identity(&self, id: &AccountId, rec: &crate::store::IdentityRecord) {
        let _ = (id, rec);
    }
    /// Queues an account's freshly fetched catalog, like [`StateSink::state`].
    fn catalog(&self, id: &AccountId, rec: &crate::store::CatalogRecord) {
        let _ = (id, rec);
    }
    /// Why writes fail right now, for `/health`, `STATUS=` and `amqctl status`.
    fn problem(&self) -> Option<String> {
        None
    }
    /// Waits up to `timeout` for queued writes to be stored (at shutdown); false if they are not.
    fn flush(&self, timeout: Duration) -> bool {
        let _ = timeout;
        true
    }
}

/// A token write under way ([`StateSink::tokens`]): `Ok` once the tokens are durable.
pub type TokenWrite = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>>;

/// A sink that keeps nothing (tests, tools).
pub struct NoSink;

impl StateSink for NoSink {
    fn tokens(&self, _: &AccountId, _: &Chain, _: &Access) -> TokenWrite {
        Box::pin(std::future::ready(Ok(())))
    }
    fn state(&self, _: &AccountId, _: &StateInfo) {}
    fn counters(&self, _: Vec<(AccountId, Counters)>) {}
    fn restore(&self, ids: &[AccountId]) -> Vec<Result<Restored, String>> {
        ids.iter().map(|_| Ok(Restored::default())).collect()
    }
}

/// What [`Pool::apply`] could not do, with the reasons.
#[derive(Debug, Default)]
pub struct Applied {
    /// Accounts that did not join (their stored state could not be read).
    pub refused: Vec<(AccountId, String)>,
    /// Accounts whose change waits (new credentials while a rotated refresh token of the
    /// current ones cannot be stored): they keep their current settings.
    pub deferred: Vec<(AccountId, String)>,
    /// Accounts the file no longer lists that stay (with their settings): the entry they were
    /// renamed to could not join, and keeps their chain when it does.
    pub kept: Vec<AccountSpec>,
}

/// What a restart brings back for one account.
#[derive(Debug, Clone, Default)]
pub struct Restored {
    pub chain: Option<Chain>,
    pub access: Option<Access>,
    /// When the chain was stored (`None`: not from the store).
    pub chain_updated_at: Option<SystemTime>,
    pub state: Option<StateInfo>,
    pub counters: Option<Counters>,
    pub identity: Option<crate::store::IdentityRecord>,
    pub catalog: Option<crate::store::CatalogRecord>,
}

pub struct Account {
    pub id: AccountId,
    spec: RwLock<AccountSpec>,
    /// `spec`'s credentials fingerprint (SHA-256 over the credentials, a refresh token of a
    /// kilobyte or two), computed when the spec is set rather than at every request; written
    /// while `spec`'s write lock is held, so a reader holding its read lock sees the pair.
    fingerprint: RwLock<[u8; 32]>,
    endpoints: RwLock<Endpoints>,
    state: Mutex<StateInfo>,
    counters: Mutex<Counters>,
    in_flight: AtomicU32,
    removed: AtomicBool,
    refreshing: AtomicBool,
    refresh_failures: AtomicU32,
    next_refresh_try: Mutex<Option<Instant>>,
    /// After a failed refresh, until when (ms since the Unix epoch; 0: no wait) the token
    /// endpoint is not asked again for this account by requests, which then pass it by while
    /// it has no valid access token (see [`Account::usable`]): the background refresher's
    /// backoff, kept by the request path too.
    refresh_wait_until_ms: AtomicU64,
    /// The account is invalid because a refresh was refused (not for a chat API refusal): a
    /// refresh that works again makes it active.
    invalid_by_refresh: AtomicBool,
    /// Its chain went to a renamed account (see [`adopt_renamed`]) when it was removed.
    given_away: AtomicBool,
    /// When (ms since the Unix epoch; 0: not known here) its access token was last obtained:
    /// with its expiry, the token's lifetime (see [`Pool::refresh_due`]).
    token_obtained_ms: AtomicU64,
    counters_dirty: AtomicBool,
    pub tokens: Tokens,
    identity: Identity,
    /// One `ListAvailableProfiles` at a time.
    profile_lock: tokio::sync::Mutex<()>,
    /// The account has answered since it started or last failed: until then it takes one
    /// request at a time (a probe), so that a burst never lands on an account that throttles,
    /// is parked or is broken before the first answer says so.
    proven: AtomicBool,
    /// The models the account offers.
    catalog: RwLock<AccountCatalog>,
    /// A catalog fetch is running; when the next may start.
    fetching: AtomicBool,
    next_catalog_try: Mutex<Option<Instant>>,
    catalog_failures: AtomicU32,
    /// The Amazon Q model id of the last request the account took (in memory only).
    last_model: Mutex<Option<String>>,
    /// When the requests of the last 60 s started (for `rpm`).
    starts: Mutex<VecDeque<Instant>>,
    /// `[cluster]`: until when (ms on [`mono_ms`]'s clock) this node validly holds the account's
    /// lease; 0 = not held. [`ALWAYS_HELD`] without a cluster.
    held_until: AtomicU64,
}

/// [`Account::held_until`] without a cluster: every account is this node's.
const ALWAYS_HELD: u64 = u64::MAX;

/// Milliseconds on a monotonic clock (since the first call), for lease validity.
pub fn mono_ms() -> u64 {
    static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// A read-only snapshot of an account for status output (never a secret).
#[derive(Debug, Clone)]
pub struct AccountView {
    pub id: String,
    pub label: String,
    pub enabled: bool,
    pub state: StateInfo,
    pub in_flight: u32,
    pub max_concurrency: u32,
    pub weight: u32,
    pub counters: Counters,
    pub access_expires_at: Option<SystemTime>,
    pub access_fingerprint: Option<String>,
    pub refresh_rotated: bool,
    /// A rotated refresh token is held in memory only (storing it failed; retrying).
    pub tokens_unsaved: bool,
    pub kind: Kind,
    /// The chat endpoint the account uses (the one that last took its credentials).
    pub endpoint: Option<Role>,
    /// The profile ARN its calls carry (not a secret), when known.
    pub profile_arn: Option<String>,
    /// Requests started in the last 60 s, and the limit.
    pub requests_last_minute: u32,
    pub rpm: Option<u32>,
    /// The models its catalog offers (without those it refused since), when fetched.
    pub models: Vec<String>,
    pub catalog_fetched_at: Option<SystemTime>,
    pub catalog_error: Option<String>,
    /// The Amazon Q model id of the last request it took since the daemon started.
    pub last_model: Option<String>,
}

impl StateInfo {
    /// Records `error` as the last error, now.
    pub fn set_error(&mut self, error: String) {
        self.last_error = Some(error);
        self.last_error_at = Some(SystemTime::now());
    }
}

impl Account {
    /// The account, and whether its identity is new (to be stored).
    fn new(spec: AccountSpec, upstream: &UpstreamConfig, restored: Restored) -> (Self, bool) {
        let fingerprint = spec.credentials_fingerprint();
        let from_file = Chain {
            // An API key is never refreshed: the chain just holds it.
            refresh_token: match &spec.credentials {
                Credentials::ApiKey { key } => key.clone(),
                c => c.refresh_token().cloned().unwrap_or_else(|| Secret::new("")),
            },
            rotated: false,
            file_fingerprint: fingerprint,
        };
        // The stored chain wins only when it grew from the same file credentials.
        let same_credentials = restored.chain.as_ref().is_none_or(|c| c.file_fingerprint == fingerprint);
        let (chain, access) = match restored.chain {
            Some(c) if c.file_fingerprint == fingerprint => (c, restored.access),
            _ => (from_file, None),
        };
        let endpoints = endpoints_for(upstream, spec.region.as_deref(), spec.auth_region.as_deref());
        let mut state = restored.state.unwrap_or_default();
        if state.state == State::Invalid && !same_credentials {
            state = StateInfo::default();
        }
        let by_refresh = invalid_by_refresh(&state);
        let (identity, new_identity) = Identity::restore(restored.identity);
        let account = Account {
            id: spec.id.clone(),
            fingerprint: RwLock::new(fingerprint),
            spec: RwLock::new(spec),
            endpoints: RwLock::new(endpoints),
            state: Mutex::new(state),
            counters: Mutex::new(restored.counters.unwrap_or_default()),
            in_flight: AtomicU32::new(0),
            removed: AtomicBool::new(false),
            refreshing: AtomicBool::new(false),
            refresh_failures: AtomicU32::new(0),
            next_refresh_try: Mutex::new(None),
            refresh_wait_until_ms: AtomicU64::new(0),
            invalid_by_refresh: AtomicBool::new(by_refresh),
            given_away: AtomicBool::new(false),
            token_obtained_ms: AtomicU64::new(0),
            counters_dirty: AtomicBool::new(false),
            tokens: Tokens::new(chain, access),
            identity,
            profile_lock: tokio::sync::Mutex::new(()),
            proven: AtomicBool::new(false),
            catalog: RwLock::new(match restored.catalog {
                Some(c) => {
                    let mut cat = AccountCatalog::default();
                    cat.replace_shared(c.models, c.fetched_at);
                    cat
                }
                None => AccountCatalog::default(),
            }),
            fetching: AtomicBool::new(false),
            next_catalog_try: Mutex::new(None),
            catalog_failures: AtomicU32::new(0),
            last_model: Mutex::new(None),
            starts: Mutex::new(VecDeque::new()),
            held_until: AtomicU64::new(ALWAYS_HELD),
        };
        (account, new_identity)
    }

    pub fn kind(&self) -> Kind {
        self.spec.read().unwrap_or_else(|e| e.into_inner()).kind()
    }

    /// The installation this account looks like.
    pub fn agent(&self) -> Arc<Agent> {
        self.identity.agent()
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The profile ARN this account's calls carry, when it is known without asking the
    /// service: the file's; else one learned for these credentials; else the social accounts'
    /// fixed one. `None` for an OIDC account that has not asked yet, and for API keys.
    pub fn known_profile_arn(&self) -> Option<String> {
        let spec = self.spec.read().unwrap_or_else(|e| e.into_inner());
        if let Some(arn) = &spec.profile_arn {
            return Some(arn.clone());
        }
        let fingerprint = *self.fingerprint.read().unwrap_or_else(|e| e.into_inner());
        match spec.kind() {
            Kind::ApiKey => None,
            Kind::Oidc => self.identity.learned_profile(&fingerprint),
            Kind::Social => Some(
                self.identity
                    .learned_profile(&fingerprint)
                    .unwrap_or_else(|| super::identity::SOCIAL_PROFILE_ARN.to_owned()),
            ),
        }
    }

    /// Requests started in the last 60 s, and when the oldest of them leaves the window.
    fn rpm_window(&self, now: Instant) -> (u32, Option<Instant>) {
        let mut starts = self.starts.lock().unwrap_or_else(|e| e.into_inner());
        while starts.front().is_some_and(|t| now.duration_since(*t) >= RPM_WINDOW) {
            starts.pop_front();
        }
        (starts.len() as u32, starts.front().map(|t| *t + RPM_WINDOW))
    }

    /// Under its `rpm`, or when a slot frees.
    fn rpm_free(&self, now: Instant) -> Result<(), Instant> {
        let Some(rpm) = self.spec.read().unwrap_or_else(|e| e.into_inner()).rpm else { return Ok(()) };
        match self.rpm_window(now) {
            (n, Some(free_at)) if n >= rpm.get() => Err(free_at),
            _ => Ok(()),
        }
    }

    /// Its catalog offers `model`, or is not known yet (or no model was named).
    fn may_serve(&self, model: Option<&str>) -> bool {
        model.is_none_or(|m| self.catalog.read().unwrap_or_else(|e| e.into_inner()).offers(m) != Some(false))
    }

    /// In-flight requests it may take now: `max_concurrency` once proven, one until then.
    fn concurrency(&self) -> u32 {
        if self.proven.load(Ordering::Relaxed) {
            self.spec.read().unwrap_or_else(|e| e.into_inner()).max_concurrency.get()
        } else {
            1
        }
    }

    /// Counts a request start against `rpm`, if there is room (checked and counted at once,
    /// so that concurrent leases never exceed it).
    fn claim_start(&self, now: Instant) -> bool {
        let Some(rpm) = self.spec.read().unwrap_or_else(|e| e.into_inner()).rpm else { return true };
        let mut starts = self.starts.lock().unwrap_or_else(|e| e.into_inner());
        while starts.front().is_some_and(|t| now.duration_since(*t) >= RPM_WINDOW) {
            starts.pop_front();
        }
        if starts.len() as u32 >= rpm.get() {
            return false;
        }
        starts.push_back(now);
        true
    }

    /// Usable but for its `rpm`: when a start frees.
    fn rpm_wake(&self, now: SystemTime) -> Option<Instant> {
        let usable_otherwise = !self.removed.load(Ordering::SeqCst)
            && self.enabled()
            && self.effective_state(now) == State::Active
            && !self.tokens.has_unsaved();
        if !usable_otherwise {
            return None;
        }
        self.rpm_free(Instant::now()).err()
    }

    pub fn spec(&self) -> AccountSpec {
        self.spec.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The file's `enabled`, read without copying the spec (the background scans read it for
    /// every account every second).
    pub fn enabled(&self) -> bool {
        self.spec.read().unwrap_or_else(|e| e.into_inner()).enabled
    }

    /// The account's egress proxy (its `proxy`), which all its upstream calls go through.
    pub fn proxy(&self) -> Option<crate::config::Proxy> {
        self.spec.read().unwrap_or_else(|e| e.into_inner()).proxy.clone()
    }

    pub fn endpoints(&self) -> Endpoints {
        self.endpoints.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn state(&self) -> StateInfo {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// The state now, with expired cooling/quota periods turned back into active.
    fn effective_state(&self, now: SystemTime) -> State {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if matches!(st.state, State::Cooling | State::Quota) && st.until.is_some_and(|u| u <= now) {
            st.state = State::Active;
            st.until = None;
            st.reason = None;
        }
        st.state
    }

    /// Whether this node may serve the account for at least `margin_ms` more (always, without
    /// a cluster; with one, while its lease is validly held).
    pub fn held_for(&self, margin_ms: u64) -> bool {
        let until = self.held_until.load(Ordering::SeqCst);
        until == ALWAYS_HELD || until > mono_ms().saturating_add(margin_ms)
    }

    fn usable(&self, now: SystemTime) -> bool {
        self.held_for(0)
            && !self.removed.load(Ordering::SeqCst)
            && self.enabled()
            && self.effective_state(now) == State::Active
            // Its token cannot be used until the rotated chain is stored.
            && !self.tokens.has_unsaved()
            && self.rpm_free(Instant::now()).is_ok()
            // Its refresh failed and it waits to try again, with no token to serve meanwhile.
            && (!self.refresh_waiting(now) || self.tokens.access_valid_for(MIN_VALIDITY))
    }

    /// A failed refresh's wait is not over.
    fn refresh_waiting(&self, now: SystemTime) -> bool {
        let until = self.refresh_wait_until_ms.load(Ordering::Relaxed);
        until != 0 && until > unix_ms(now)
    }

    fn set_refresh_wait(&self, until: Option<Instant>) {
        let ms =
            until.map_or(0, |t| unix_ms(SystemTime::now() + t.saturating_duration_since(Instant::now())));
        self.refresh_wait_until_ms.store(ms, Ordering::Relaxed);
        *self.next_refresh_try.lock().unwrap_or_else(|e| e.into_inner()) = until;
    }

    /// A request is about to reach the account (whatever its outcome): its last use is now.
    pub fn mark_used(&self) {
        self.counters.lock().unwrap_or_else(|e| e.into_inner()).last_used = Some(SystemTime::now());
    }

    pub fn view(&self) -> AccountView {
        let spec = self.spec();
        let access = self.tokens.current_access();
        AccountView {
            id: spec.id.to_string(),
            label: spec.label.clone(),
            enabled: spec.enabled,
            state: {
                self.effective_state(SystemTime::now());
                self.state()
            },
            in_flight: self.in_flight(),
            max_concurrency: spec.max_concurrency.get(),
            weight: spec.weight.get(),
            counters: self.counters.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            access_expires_at: access.as_ref().map(|a| a.expires_at),
            access_fingerprint: access.as_ref().map(|a| a.token.fingerprint()),
            refresh_rotated: false,
            tokens_unsaved: self.tokens.has_unsaved(),
            kind: spec.kind(),
            endpoint: self.identity.endpoint(),
            profile_arn: self.known_profile_arn(),
            requests_last_minute: self.rpm_window(Instant::now()).0,
            rpm: spec.rpm.map(|r| r.get()),
            models: {
                let c = self.catalog.read().unwrap_or_else(|e| e.into_inner());
                c.models.keys().filter(|m| !c.dropped.contains(*m)).cloned().collect()
            },
            catalog_fetched_at: self.catalog.read().unwrap_or_else(|e| e.into_inner()).fetched_at,
            catalog_error: self.catalog.read().unwrap_or_else(|e| e.into_inner()).error.clone(),
            last_model: self.last_model.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        }
    }
}

/// Why no account could be leased.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PoolError {
    /// Every account that could serve is cooling or parked; the earliest is back after `retry_after`.
    #[error("every Amazon Q account is rate-limited ({summary})")]
    AllThrottled { retry_after: Duration, summary: String },
    /// No account can serve at all (suspended, invalid, disabled, or none configured).
    #[error("no usable Amazon Q account ({summary})")]
    NoneUsable { summary: String },
    /// All usable accounts stayed at their concurrency limit past the queue deadline;
    /// `retry_after` estimates when a slot frees (the recent mean time a request holds one).
    #[error("every Amazon Q account is busy (all at max_concurrency for {waited_secs} s)")]
    Busy { retry_after: Duration, waited_secs: u64 },
    /// `[cluster]`: this node holds no account's lease (PostgreSQL unreachable past the leases,
    /// or every account served by other nodes).
    #[error("this node serves no account now: {reason}")]
    NoLease { reason: String },
}

/// Counts of accounts by state (for `/health`, `STATUS=`, metrics, the control API).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolSummary {
    pub total: usize,
    pub active: usize,
    pub cooling: usize,
    pub quota: usize,
    pub suspended: usize,
    pub invalid: usize,
    pub disabled: usize,
    pub in_flight: u64,
    /// Accounts whose rotated refresh token is held in memory only (storing it failed).
    pub unsaved: usize,
    /// `[cluster]`: accounts this node does not hold the lease of (served by other nodes); not
    /// counted in `total` nor in any state.
    pub elsewhere: usize,
}

impl PoolSummary {
    fn describe(&self) -> String {
        let mut parts = Vec::new();
        for (n, what) in [
            (self.cooling, "cooling"),
            (self.quota, "out of quota"),
            (self.suspended, "suspended"),
            (self.invalid, "with invalid credentials"),
            (self.disabled, "disabled"),
            (self.unsaved, "waiting for their rotated refresh token to be stored"),
        ] {
            if n > 0 {
                parts.push(format!("{n} {what}"));
            }
        }
        if self.total == 0 {
            "no accounts configured".into()
        } else if parts.is_empty() {
            format!("{} accounts", self.total)
        } else {
            format!("{} of {} accounts: {}", self.total - self.active, self.total, parts.join(", "))
        }
    }
}

/// An account renamed in the file (its id changed, its credentials did not): the diff sees one
/// account removed and another added, and the added one would start from the file's refresh
/// token, long rotated (`invalid_grant`: the account lost, the live chain under the old id).
/// Of `others` (records of ids no longer in the file, or accounts leaving the pool now), the
/// newest chain grown from `spec`'s credentials is given up to it — its id, chain and access
/// token — unless `spec`'s own record (`r`) holds a chain of those credentials at least as new
/// (renamed and renamed back: the other id's is then the live one). Taken, so that two
/// entries with one set of credentials do not both resume it.
fn adopt_renamed<'a>(
    spec: &AccountSpec,
    r: &Restored,
    others: impl Iterator<Item = (&'a String, &'a mut Restored)>,
) -> Option<(String, Chain, Option<Access>)> {
    if matches!(spec.credentials, Credentials::ApiKey { .. }) {
        return None;
    }
    let fp = spec.credentials_fingerprint();
    let when = |x: &Restored| x.chain_updated_at.unwrap_or(SystemTime::UNIX_EPOCH);
    let mut best: Option<(&String, &mut Restored)> = None;
    for (id, o) in others {
        if o.chain.as_ref().is_some_and(|c| c.file_fingerprint == fp)
            && best.as_ref().is_none_or(|(_, b)| when(o) > when(b))
        {
            best = Some((id, o));
        }
    }
    let (id, o) = best?;
    if r.chain.as_ref().is_some_and(|c| c.file_fingerprint == fp) && when(r) >= when(o) {
        return None;
    }
    Some((id.clone(), o.chain.take()?, o.access.take()))
}

/// An account renamed (`to`) has taken the chain of `from`, one of the accounts `leaving`:
/// if that chain is held unsaved there, it moves to `to` whole, to be stored under the new id
/// (the old one, removed, no longer writes it: its late write could land after the new id's
/// newer one and make the older chain look the newest).
async fn take_over(leaving: &[Arc<Account>], from: &str, to: &Account) {
    let Some(old) = leaving.iter().find(|a| a.id.as_str() == from) else { return };
    if let Some(u) = old.tokens.take_unsaved().await {
        tracing::warn!(account = %to.id, from = %from, "the renamed account's rotated refresh token is not stored yet: it is stored under the new id once the store works");
        to.tokens.hold_unsaved(u).await;
    }
}

/// One more strike against the account (its cooldowns grow with them); the count now.
fn strike(a: &Account) -> u32 {
    let mut st = a.state.lock().unwrap_or_else(|e| e.into_inner());
    st.strikes += 1;
    st.strikes
}

/// The profile an account's listing names for it: the first in its region (the file's
/// `region`), else the first; `None` for an empty listing.
fn choose_profile(profiles: &[crate::upstream::Profile], region: Option<&str>) -> Option<String> {
    let in_region = |p: &&crate::upstream::Profile| region.is_none_or(|r| p.arn.split(':').nth(3) == Some(r));
    profiles.iter().find(in_region).or(profiles.first()).map(|p| p.arn.clone())
}

/// Invalid by a refused refresh (its reason is the refusal's): a refresh that works again
/// makes it active, after a restart or a `[cluster]` handover too.
fn invalid_by_refresh(state: &StateInfo) -> bool {
    state.state == State::Invalid
        && state.reason.as_deref().is_some_and(|r| {
            r.starts_with("refresh token rejected") || r.starts_with("client registration rejected")
        })
}

/// How long an account waits to refresh after the daemon did not attempt it
/// ([`RefreshError::NotAttempted`]).
const NOT_ATTEMPTED_WAIT: Duration = Duration::from_secs(2);

/// How long before its expiry an access token is refreshed: `wanted`, but never more than half
/// its lifetime when that is known. Tokens that live no longer than `refresh_before_expiry`
/// (a service that shortened them) would otherwise be due at once, and every account would
/// rotate its refresh token on every pass of the refresher, once a second.
fn refresh_margin(wanted: Duration, a: &Account, acc: &Access) -> Duration {
    let obtained = a.token_obtained_ms.load(Ordering::Relaxed);
    if obtained == 0 {
        return wanted;
    }
    let lifetime = Duration::from_millis(unix_ms(acc.expires_at).saturating_sub(obtained));
    wanted.min(lifetime / 2)
}

/// Milliseconds since the Unix epoch.
fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// How often a request waiting for a slot looks at the accounts again without being woken.
const RECHECK: Duration = Duration::from_millis(50);

pub struct Pool {
    accounts: RwLock<Vec<Arc<Account>>>,
    /// The same accounts by id, replaced with the list (a session's pinned account is looked
    /// up on every request of that session: a copy of the whole list each time, 1,000
    /// reference counts up and down at 1,000 accounts, was most of that lookup's cost).
    by_id: RwLock<HashMap<String, Arc<Account>>>,
    strategy: Strategy,
    rr: AtomicUsize,
    freed: tokio::sync::Notify,
    client: UpstreamClient,
    upstream: UpstreamConfig,
    refresh_before: Duration,
    queue_timeout: Duration,
    refresh_slots: tokio::sync::Semaphore,
    /// Set when shutdown begins ([`Pool::finish`]): no new token call starts (a call cut off by
    /// the process's end may have rotated the refresh token with nothing stored).
    stopping: AtomicBool,
    sink: Arc<dyn StateSink>,
    /// Every refresh runs as a task of its own, tracked here: a refresh is never cancelled
    /// halfway (the token endpoint may already have rotated the refresh token; only storing
    /// the answer keeps the chain), and shutdown waits for the ones in flight (bounded; what
    /// is left at the deadline is cancelled, as the process's exit would).
    refreshes: crate::shutdown::Tasks,
    /// The background refresher's own tasks (a due refresh, a catalog fetch): cancelled at
    /// shutdown (a refresh they started goes on in `refreshes`).
    background: crate::shutdown::Tasks,
    /// Exponentially weighted mean of how long a lease is held, in ms (0: none ended yet).
    hold_ewma_ms: AtomicU64,
    /// Sessions pinned to the account that served them.
    pins: super::pins::Pins,
    /// What the enabled accounts offer (rebuilt when read after a catalog or the set changed).
    union: RwLock<Arc<Catalog>>,
    /// An account's catalog, its `enabled` or the set of accounts changed since the union was
    /// built: the next [`Pool::union`] rebuilds it.
    union_stale: AtomicBool,
    catalog_refresh: Duration,
    catalog_slots: tokio::sync::Semaphore,
    /// Removed accounts whose rotated refresh token is not stored yet: kept until it is.
    orphans: Mutex<Vec<Arc<Account>>>,
    /// `[cluster]`: a [`Pool::revive_from_store`] pass is running (one at a time).
    reviving: AtomicBool,
    /// Removed accounts, while anything still holds them (a refresh in flight, a request, an
    /// orphan): one added back is this same account again, never a second token chain for
    /// one id beside it (which would start from an older token).
    retired: Mutex<Vec<std::sync::Weak<Account>>>,
    pub refreshes_ok: AtomicU64,
    pub refreshes_failed: AtomicU64,
    /// `[cluster]`: accounts are served only under a lease ([`Pool::hold`]); a token refresh
    /// starts only while the lease has at least this long (ms) left. `None`: no cluster.
    cluster_guard_ms: RwLock<Option<u64>>,
    /// `[cluster]`: asks the database whether a lease is still this node's, and what it stores.
    leases: RwLock<Option<Arc<dyn ClusterView>>>,
}

/// `[cluster]`: what the pool asks the database directly.
pub trait ClusterView: Send + Sync {
    /// Whether this node holds `id`'s lease for at least `guard` more (checked before a token
    /// refresh).
    fn lease_left<'a>(
        &'a self,
        id: &'a str,
        guard: Duration,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<bool, String>> + Send + 'a>>;

    /// `id`'s stored record, read now (a refresh token the token endpoint refused may have been
    /// replaced there by the node that rotated it).
    fn stored<'a>(
        &'a self,
        id: &'a str,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<Option<crate::store::AccountRecord>, String>> + Send + 'a,
        >,
    >;
}

/// Most refreshes running at once (a thousand accounts never stampede the token endpoint).
const MAX_CONCURRENT_REFRESHES: usize = 4;
/// The window of `rpm`.
const RPM_WINDOW: Duration = Duration::from_secs(60);

impl Pool {
    pub fn new(
        set: &AccountSet,
        restored: BTreeMap<String, Restored>,
        settings: &AccountsConfig,
        upstream: UpstreamConfig,
        client: UpstreamClient,
        sink: Arc<dyn StateSink>,
    ) -> Arc<Pool> {
        let mut restored = restored;
        let mut own: Vec<Restored> =
            set.iter().map(|spec| restored.remove(spec.id.as_str()).unwrap_or_default()).collect();
        // What is left belongs to ids no longer in the file: an account renamed while the
        // daemon was down resumes its old id's chain (see [`adopt_renamed`]). So does a chain
        // stored under an id the file now gives other credentials (ids swapped or shifted:
        // `{a: X, b: Y}` become `{b: X, c: Y}`): that entry starts from its new credentials,
        // and its stored chain is the live one of the entry that has its old credentials.
        let mut stranded: BTreeMap<String, Restored> = set
            .iter()
            .zip(own.iter())
            .filter_map(|(spec, r)| {
                let chain = r.chain.as_ref()?;
                (chain.file_fingerprint != spec.credentials_fingerprint()).then(|| {
                    let r = Restored {
                        chain: Some(chain.clone()),
                        access: r.access.clone(),
                        chain_updated_at: r.chain_updated_at,
                        ..Default::default()
                    };
                    (spec.id.to_string(), r)
                })
            })
            .collect();
        let mut adopted = HashSet::new();
        for (spec, r) in set.iter().zip(own.iter_mut()) {
            if let Some((old, chain, access)) =
                adopt_renamed(spec, r, restored.iter_mut().chain(stranded.iter_mut()))
            {
                tracing::info!(account = %spec.id, from = %old, "the account resumes the refresh token stored under another id (renamed, or ids swapped)");
                r.chain = Some(chain);
                r.access = access;
                adopted.insert(spec.id.clone());
            }
        }
        let accounts: Vec<Arc<Account>> = set
            .iter()
            .zip(own)
            .map(|(spec, r)| {
                let (account, new_identity) = Account::new(spec.clone(), &upstream, r);
                if new_identity {
                    sink.identity(&account.id, &account.identity.record());
                }
                // Stored under its new id before any use ([`Pool::store_unsaved`], before the
                // daemon serves): the id it came from may write over its record.
                if adopted.contains(&account.id) {
                    account.tokens.hold_as_unsaved();
                }
                Arc::new(account)
            })
            .collect();
        Arc::new(Pool {
            by_id: RwLock::new(index(&accounts)),
            accounts: RwLock::new(accounts),
            strategy: settings.strategy,
            rr: AtomicUsize::new(0),
            freed: tokio::sync::Notify::new(),
            client,
            upstream,
            refresh_before: settings.refresh_before_expiry,
            queue_timeout: settings.queue_timeout,
            refresh_slots: tokio::sync::Semaphore::new(MAX_CONCURRENT_REFRESHES),
            stopping: AtomicBool::new(false),
            sink,
            refreshes: crate::shutdown::Tasks::new(),
            background: crate::shutdown::Tasks::new(),
            hold_ewma_ms: AtomicU64::new(0),
            union: RwLock::new(Arc::new(Catalog::default())),
            // Catalogs restored from the store serve from the first read.
            union_stale: AtomicBool::new(true),
            pins: super::pins::Pins::new(Duration::from_secs(3600), 200_000),
            catalog_refresh: settings.catalog_refresh,
            catalog_slots: tokio::sync::Semaphore::new(MAX_CONCURRENT_REFRESHES),
            orphans: Mutex::new(Vec::new()),
            reviving: AtomicBool::new(false),
            retired: Mutex::new(Vec::new()),
            refreshes_ok: AtomicU64::new(0),
            refreshes_failed: AtomicU64::new(0),
            cluster_guard_ms: RwLock::new(None),
            leases: RwLock::new(None),
        })
    }

    /// `[cluster]`: from now on an account serves only while [`Pool::hold`] says this node
    /// holds its lease; a refresh starts only with at least `guard` of the lease left.
    pub fn set_clustered(&self, guard: Duration, leases: Arc<dyn ClusterView>) {
        *self.cluster_guard_ms.write().unwrap_or_else(|e| e.into_inner()) = Some(guard.as_millis() as u64);
        *self.leases.write().unwrap_or_else(|e| e.into_inner()) = Some(leases);
        for a in self.accounts() {
            a.held_until.store(0, Ordering::SeqCst);
        }
    }

    fn clustered(&self) -> Option<u64> {
        *self.cluster_guard_ms.read().unwrap_or_else(|e| e.into_inner())
    }

    /// `[cluster]`: this node holds `id`'s lease until `until_ms` ([`mono_ms`]); 0 = no longer.
    pub fn hold(&self, id: &str, until_ms: u64) {
        if let Some(a) = self.get(id) {
            let was = a.held_until.swap(until_ms, Ordering::SeqCst);
            if was == 0 && until_ms > 0 {
                self.freed.notify_waiters();
            }
        }
    }

    /// `[cluster]`: takes over what the store holds for an account whose lease this node has
    /// just acquired (the previous holder's rotated refresh token, access token, state,
    /// counters and identity), replacing what this node knew, which may be stale.
    ///
    /// Returns this node's identity when the store held none (or a damaged one), for the
    /// caller to store before the account serves, so that the next holder takes it over.
    pub async fn adopt(
        &self,
        id: &str,
        restored: Restored,
        seen: u64,
    ) -> Option<crate::store::IdentityRecord> {
        let a = self.get(id)?;
        let fingerprint = a.spec().credentials_fingerprint();
        if let Some(chain) = restored.chain.filter(|c| c.file_fingerprint == fingerprint) {
            a.tokens.adopt(chain, restored.access, seen).await;
        }
        if let Some(st) = restored.state {
            // As at a start: the node that stored it may have left it invalid by a refused
            // refresh, and a chain stored since (by a node that lost its lease, say) may work.
            a.invalid_by_refresh.store(invalid_by_refresh(&st), Ordering::SeqCst);
            *a.state.lock().unwrap_or_else(|e| e.into_inner()) = st;
        }
        if let Some(c) = restored.counters {
            *a.counters.lock().unwrap_or_else(|e| e.into_inner()) = c;
        }
        // The identity the previous holder stored; none (or a damaged one): this node's.
        (!restored.identity.is_some_and(|rec| a.identity.adopt(rec))).then(|| a.identity.record())
    }

    /// The account's token chain generation ([`Tokens::generation`]), read before its stored
    /// record is, for [`Pool::adopt`].
    pub fn chain_generation(&self, id: &str) -> u64 {
        self.get(id).map_or(0, |a| a.tokens.generation())
    }

    /// The ids of the accounts this node serves (all of them without a cluster).
    pub fn held_ids(&self) -> Vec<String> {
        self.accounts().iter().filter(|a| a.held_for(0)).map(|a| a.id.to_string()).collect()
    }

    pub fn client(&self) -> &UpstreamClient {
        &self.client
    }

    pub fn accounts(&self) -> Vec<Arc<Account>> {
        self.accounts.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn get(&self, id: &str) -> Option<Arc<Account>> {
        self.by_id.read().unwrap_or_else(|e| e.into_inner()).get(id).cloned()
    }

    pub fn summary(&self) -> PoolSummary {
        let now = SystemTime::now();
        let mut s = PoolSummary::default();
        for a in self.accounts() {
            if !a.held_for(0) {
                s.elsewhere += 1;
                continue;
            }
            s.total += 1;
            s.in_flight += a.in_flight() as u64;
            if a.tokens.has_unsaved() {
                s.unsaved += 1;
            }
            if !a.enabled() {
                s.disabled += 1;
                continue;
            }
            match a.effective_state(now) {
                State::Active => s.active += 1,
                State::Cooling => s.cooling += 1,
                State::Quota => s.quota += 1,
                State::Suspended => s.suspended += 1,
                State::Disabled => s.disabled += 1,
                State::Invalid => s.invalid += 1,
            }
        }
        s
    }

    /// The error for a request that waited out the queue: with an honest `retry-after`, the
    /// recent mean time a request holds an account (a slot is unlikely to free sooner), at
    /// least a second and at most two minutes; the queue timeout while nothing has finished yet.
    pub fn busy(&self) -> PoolError {
        let held = self.hold_ewma_ms.load(Ordering::Relaxed);
        let retry_after = if held == 0 { self.queue_timeout } else { Duration::from_millis(held) };
        PoolError::Busy {
            retry_after: retry_after.clamp(Duration::from_secs(1), Duration::from_secs(120)),
            waited_secs: self.queue_timeout.as_secs(),
        }
    }

    /// Picks an account, waiting (up to the queue timeout) while every usable one is full.
    /// The account a session is pinned to, if any.
    pub fn pinned(&self, session: &super::pins::SessionKey) -> Option<AccountId> {
        self.pins.get(session)
    }

    /// Pins a session to the account that served it.
    pub fn pin(&self, session: super::pins::SessionKey, account: &AccountId) {
        self.pins.set(session, account);
    }

    /// Sessions pinned now.
    pub fn pinned_sessions(&self) -> usize {
        self.pins.len()
    }

    /// A lease on `preferred` (a session's account) when it is usable, offers the model and has
    /// a slot free right now; else `None` (the caller leases as usual: a pin never makes a
    /// request wait or land on an unhealthy account).
    pub fn lease_preferred(
        self: &Arc<Self>,
        preferred: &AccountId,
        exclude: &HashSet<AccountId>,
        model: Option<&str>,
    ) -> Option<Lease> {
        if exclude.contains(preferred) {
            return None;
        }
        let a = self.get(preferred.as_str())?;
        if !a.usable(SystemTime::now()) || !a.may_serve(model) {
            return None;
        }
        let max = a.concurrency();
        let slot = a
            .in_flight
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |x| (x < max).then_some(x + 1))
            .is_ok();
        if !slot {
            return None;
        }
        if !a.claim_start(Instant::now()) {
            a.in_flight.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(Lease { account: a, pool: self.clone(), taken: Instant::now() })
    }

    /// Only accounts whose catalog offers `model` (or is not known yet) are considered.
    pub async fn lease(
        self: &Arc<Self>,
        exclude: &HashSet<AccountId>,
        model: Option<&str>,
    ) -> Result<Lease, PoolError> {
        let deadline = tokio::time::Instant::now() + self.queue_timeout;
        loop {
            let notified = self.freed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.try_lease(exclude, model) {
                Ok(Some(lease)) => return Ok(lease),
                Ok(None) => {}
                Err(e @ PoolError::AllThrottled { .. }) => {
                    // Held back only by `rpm`: wait in the queue for the window to move on, if
                    // that is within the queue timeout; else say honestly when to come back.
                    match self.rpm_wake(exclude, model) {
                        Some(wake) if tokio::time::Instant::from_std(wake) <= deadline => {
                            let _ =
                                tokio::time::timeout_at(tokio::time::Instant::from_std(wake), notified).await;
                            continue;
                        }
                        _ => return Err(e),
                    }
                }
                Err(e) => return Err(e),
            }
            // A waiter woken for a slot it cannot take (an account it excludes, a model that
            // account lacks) leaves that slot to the next freeing; looking again every
            // RECHECK bounds how long such a slot stays unused while others wait.
            let recheck = (tokio::time::Instant::now() + RECHECK).min(deadline);
            if tokio::time::timeout_at(recheck, notified).await.is_err() && recheck >= deadline {
                return Err(self.busy());
            }
        }
    }

    /// The soonest an account that only its `rpm` holds back can start a request.
    fn rpm_wake(&self, exclude: &HashSet<AccountId>, model: Option<&str>) -> Option<Instant> {
        let now = SystemTime::now();
        let accounts = self.accounts.read().unwrap_or_else(|e| e.into_inner());
        accounts
            .iter()
            .filter(|a| !exclude.contains(&a.id) && a.may_serve(model))
            .filter_map(|a| a.rpm_wake(now))
            .min()
    }

    fn try_lease(
        self: &Arc<Self>,
        exclude: &HashSet<AccountId>,
        model: Option<&str>,
    ) -> Result<Option<Lease>, PoolError> {
        let now = SystemTime::now();
        // This runs for every request over every account: the choice is made under the read lock
        // without cloning the list, and only the chosen account is cloned.
        let chosen = {
            let accounts = self.accounts.read().unwrap_or_else(|e| e.into_inner());
            let allowed =
                |a: &Account| (exclude.is_empty() || !exclude.contains(&a.id)) && a.may_serve(model);
            // Least-busy's choice is an idle account whenever there is one: walk the rotation
            // from its next start and take the first idle usable account, touching only the
            // accounts walked (with many accounts and few requests, nearly always the first).
            // Only when none is idle does the full scan below rank them by load.
            if self.strategy == Strategy::LeastBusy && !accounts.is_empty() {
                let n = accounts.len();
                let start = self.rr.fetch_add(1, Ordering::Relaxed);
                for k in 0..n {
                    let a = &accounts[(start + k) % n];
                    if a.in_flight() == 0
                        && allowed(a)
                        && a.usable(now)
                        && a.in_flight.compare_exchange(0, 1, Ordering::SeqCst, Ordering::SeqCst).is_ok()
                    {
                        if !a.claim_start(Instant::now()) {
                            a.in_flight.fetch_sub(1, Ordering::SeqCst);
                            continue;
                        }
                        return Ok(Some(Lease {
                            account: a.clone(),
                            pool: self.clone(),
                            taken: Instant::now(),
                        }));
                    }
                }
            }
            let usable: Vec<&Arc<Account>> =
                accounts.iter().filter(|a| allowed(a) && a.usable(now)).collect();
            if usable.is_empty() {
                let soonest = accounts
                    .iter()
                    .filter(|a| allowed(a) && !a.removed.load(Ordering::SeqCst))
                    .filter(|a| a.enabled())
                    .filter_map(|a| {
                        let st = a.state();
                        let cooling =
                            matches!(st.state, State::Cooling | State::Quota).then_some(st.until).flatten();
                        // An account held back only by its rpm is free when its window moves on.
                        let rpm =
                            a.rpm_wake(now).map(|at| now + at.saturating_duration_since(Instant::now()));
                        cooling.or(rpm)
                    })
                    .min();
                Err(soonest)
            } else {
                Ok(self.pick(&usable))
            }
        };
        match chosen {
            Ok(Some(account)) => Ok(Some(Lease { account, pool: self.clone(), taken: Instant::now() })),
            Ok(None) => Ok(None),
            Err(soonest) => {
                let summary = self.summary().describe();
                Err(match soonest {
                    Some(t) => PoolError::AllThrottled {
                        retry_after: t.duration_since(now).unwrap_or_default().max(Duration::from_secs(1)),
                        summary,
                    },
                    None if self.clustered().is_some() && accounts_held(self) == 0 => PoolError::NoLease {
                        reason: self
                            .sink
                            .problem()
                            .unwrap_or_else(|| "every account is served by other nodes".to_owned()),
                    },
                    None => PoolError::NoneUsable { summary },
                })
            }
        }
    }

    /// Takes a slot on the first account of the strategy's order that has one free.
    fn pick(&self, usable: &[&Arc<Account>]) -> Option<Arc<Account>> {
        let take = |a: &Arc<Account>| {
            let max = a.concurrency();
            let slot = a
                .in_flight
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |x| (x < max).then_some(x + 1))
                .is_ok();
            if slot && !a.claim_start(Instant::now()) {
                a.in_flight.fetch_sub(1, Ordering::SeqCst);
                return false;
            }
            slot
        };
        let n = usable.len();
        let start = self.rr.fetch_add(1, Ordering::Relaxed);
        match self.strategy {
            Strategy::RoundRobin => {
                // Weighted: an account of weight w appears w times in the rotation.
                let total: usize = usable.iter().map(|a| weight(a) as usize).sum::<usize>().max(1);
                let mut slot = start % total;
                let mut first = 0;
                for (i, a) in usable.iter().enumerate() {
                    let w = weight(a) as usize;
                    if slot < w {
                        first = i;
                        break;
                    }
                    slot -= w;
                }
                (0..n).map(|k| usable[(first + k) % n]).find(|a| take(a)).cloned()
            }
            Strategy::LeastBusy => {
                // (load, place in the rotation): the rotation breaks ties, so keys are distinct.
                let key = |i: usize, a: &Account| {
                    (a.in_flight() as f64 / weight(a) as f64, (i + n - start % n) % n)
                };
                let order = |x: &(f64, usize), y: &(f64, usize)| {
                    x.0.partial_cmp(&y.0).unwrap_or(std::cmp::Ordering::Equal).then(x.1.cmp(&y.1))
                };
                // The least busy account is nearly always the one leased: find it without sorting,
                // and sort the whole list only when it turns out to be full.
                let best = usable
                    .iter()
                    .enumerate()
                    .map(|(i, a)| (key(i, a), *a))
                    .min_by(|x, y| order(&x.0, &y.0))
                    .map(|(_, a)| a);
                if let Some(a) = best.filter(|a| take(a)) {
                    return Some(a.clone());
                }
                let mut v: Vec<((f64, usize), &Arc<Account>)> =
                    usable.iter().enumerate().map(|(i, a)| (key(i, a), *a)).collect();
                v.sort_by(|x, y| order(&x.0, &y.0));
                v.into_iter().map(|(_, a)| a).find(|a| take(a)).cloned()
            }
        }
    }

    /// An access token for the account, refreshing it if needed (or if `force`, the token
    /// that was refused, is still the current one), with the pool's bounded concurrency.
    ///
    /// The refresh runs in a task of its own: a caller that goes away (a client that hangs up,
    /// a timeout) does not cancel it between the token endpoint's answer and storing it.
    pub async fn access_token(
        self: &Arc<Self>,
        a: &Arc<Account>,
        force: Option<Secret>,
    ) -> Result<Secret, RefreshError> {
        if let Credentials::ApiKey { key } = &a.spec.read().unwrap_or_else(|e| e.into_inner()).credentials {
            // The key is the bearer: nothing to refresh, ever.
            return Ok(key.clone());
        }
        if force.is_none() && !a.tokens.has_unsaved() {
            if let Some(acc) = a.tokens.current_access().filter(|x| x.valid_for(MIN_VALIDITY)) {
                return Ok(acc.token);
            }
            // The last refresh failed and its wait is not over: the token endpoint is not asked
            // again sooner for a request (an outage met once per request, or per waiting
            // caller, is a retry storm); `amqctl refresh` (forced) still asks.
            if a.refresh_waiting(SystemTime::now()) {
                let left = a
                    .refresh_wait_until_ms
                    .load(Ordering::Relaxed)
                    .saturating_sub(unix_ms(SystemTime::now()));
                let last = a.state().last_error.unwrap_or_default();
                return Err(RefreshError::NotAttempted(format!(
                    "the last token refresh failed ({last}); the next try is in {} s",
                    left.div_ceil(1000)
                )));
            }
        }
        let (pool, account) = (self.clone(), a.clone());
        // The refresh's log lines carry the request that needed it (when one did).
        let task = self.refreshes.spawn(
            async move {
                let mut result = pool.refresh_tokens(&account, force.as_ref()).await;
                if result.as_ref().is_err_and(RefreshError::is_permanent) && pool.take_newer_stored_chain(&account).await {
                    tracing::warn!(account = %account.id, "the refresh token was refused, and the store holds a newer one (stored by the node that rotated it after losing the lease): refreshing with it");
                    result = pool.refresh_tokens(&account, None).await;
                }
                if matches!(result, Err(RefreshError::NotStored(_)))
                    && !account.held_for(0)
                    && pool.take_newer_stored_chain(&account).await
                {
                    // The lease was lost and the new holder stored a token of its own: this
                    // node's rotated one is superseded (the stored chain replaced it here).
                    result = Err(RefreshError::NotAttempted(
                        "this node lost the lease, and the new holder stored a newer token than the one rotated here"
                            .into(),
                    ));
                }
                pool.after_refresh(&account, &result);
                result
            }
            .instrument(tracing::Span::current()),
        );
        match task.await {
            Ok(result) => result,
            Err(e) if e.is_cancelled() => Err(RefreshError::Transient("the daemon is stopping".into())),
            Err(e) => Err(RefreshError::Transient(format!("the refresh task failed: {e}"))),
        }
    }

    /// `[cluster]`: takes the stored chain of `a` when it differs from this node's (same file
    /// credentials, another refresh token); true when taken. A node that rotated the token
    /// under a lease it then lost stores the new one if no later holder stored one (see
    /// [`crate::store::postgres`]); the holder's own token is then dead, and this is its way on.
    pub async fn take_newer_stored_chain(&self, a: &Account) -> bool {
        let Some(view) = self.leases.read().unwrap_or_else(|e| e.into_inner()).clone() else {
            return false;
        };
        let seen = a.tokens.generation();
        let ours = a.tokens.chain().await;
        let record = match view.stored(a.id.as_str()).await {
            Ok(Some(record)) => record,
            Ok(None) => return false,
            Err(e) => {
                tracing::warn!(account = %a.id, error = %e, "cannot read the stored token");
                return false;
            }
        };
        let restored = super::persist::restored_one(record);
        let Some(chain) = restored.chain.filter(|c| {
            c.file_fingerprint == ours.file_fingerprint
                && c.refresh_token.expose() != ours.refresh_token.expose()
        }) else {
            return false;
        };
        a.tokens.adopt(chain, restored.access, seen).await;
        a.tokens.generation() != seen
    }

    /// `[cluster]`: an account held here and invalid since its refresh token was refused
    /// serves again when the store holds a newer chain for it ([`Pool::take_newer_stored_chain`]:
    /// stored after the refusal). Called by the lease loop.
    pub async fn revive_from_store(&self) {
        for a in self.accounts() {
            // A refresh holding the chain (an operator's `amqctl refresh`, up to a token
            // endpoint's timeout) is not waited for: the next pass looks again.
            let quiet = a.tokens.quiet().is_some();
            if quiet
                && a.held_for(0)
                && a.state().state == State::Invalid
                && !a.tokens.has_unsaved()
                && self.take_newer_stored_chain(&a).await
            {
                tracing::warn!(account = %a.id, "the store holds a newer refresh token than the one refused: the account serves again");
                a.refresh_failures.store(0, Ordering::SeqCst);
                self.set_state(&a, State::Active, None, None);
            }
        }
    }

    /// [`Pool::revive_from_store`] on its own task, one pass at a time: the lease loop calls
    /// it and goes on to its renewals (store reads must never hold them up).
    pub fn revive_from_store_in_background(self: &Arc<Self>) {
        if self.reviving.swap(true, Ordering::SeqCst) {
            return;
        }
        let pool = self.clone();
        tokio::spawn(async move {
            pool.revive_from_store().await;
            pool.reviving.store(false, Ordering::SeqCst);
        });
    }

    async fn refresh_tokens(&self, a: &Account, force: Option<&Secret>) -> Result<Secret, RefreshError> {
        let client = self.client.clone();
        let id = a.id.clone();
        a.tokens
            .get(
                MIN_VALIDITY,
                force,
                |chain| async move {
                    let _slot = self.refresh_slots.acquire().await;
                    // Refreshes queued behind the slots when shutdown began end here: only
                    // the calls already sent are waited for (each is bounded by its deadline,
                    // which the shutdown's wait covers), and none is cut halfway.
                    if self.stopping.load(Ordering::SeqCst) {
                        return Err(RefreshError::NotAttempted("the daemon is stopping; not refreshing".into()));
                    }
                    // A removed account (its request still in flight) no longer rotates its
                    // chain: a renamed account may have taken it over (see [`adopt_renamed`]),
                    // and two holders of one chain kill each other's token.
                    if a.removed.load(Ordering::SeqCst) {
                        return Err(RefreshError::NotAttempted(
                            "the account was removed from the accounts file; not refreshing".into(),
                        ));
                    }
                    // Read under the chain's lock, after the slot: a reload may have changed the
                    // credentials while this refresh waited. A chain and credentials of two
                    // different file versions (the new spec is in, the chain's reset still
                    // queued behind this refresh) would send one's refresh token with the
                    // other's client: refused, and the account marked invalid although its new
                    // credentials are good. The reset comes next; refresh after it.
                    let spec = a.spec();
                    let endpoints = a.endpoints();
                    if chain.file_fingerprint != spec.credentials_fingerprint() {
                        return Err(RefreshError::NotAttempted(
                            "the account's credentials are being replaced (a reload); refreshing after that"
                                .into(),
                        ));
                    }
                    if let Some(guard) = self.clustered() {
                        // Fencing's first line: never rotate a refresh token near the end of
                        // (or after) the lease; the new holder would find its token dead.
                        if !a.held_for(guard) {
                            return Err(RefreshError::NotAttempted(
                                "this node's lease on the account is ending; not refreshing".into(),
                            ));
                        }
                        // The local timer is not proof: after a pause it did not count (a
                        // frozen VM), another node may hold the lease and the token.
                        let leases = self.leases.read().unwrap_or_else(|e| e.into_inner()).clone();
                        if let Some(leases) = leases {
                            match leases.lease_left(a.id.as_str(), Duration::from_millis(guard)).await {
                                Ok(true) => {}
                                Ok(false) => {
                                    return Err(RefreshError::NotAttempted(
                                        "PostgreSQL says this node's lease on the account is gone or ending; not refreshing"
                                            .into(),
                                    ));
                                }
                                Err(e) => {
                                    return Err(RefreshError::NotAttempted(format!(
                                        "cannot confirm this node's lease on the account ({e}); not refreshing"
                                    )));
                                }
                            }
                        }
                    }
                    let grant = match &spec.credentials {
                        Credentials::Oidc { client_id, client_secret, .. } => {
                            client
                                .create_token(
                                    &endpoints.token,
                                    client_id,
                                    client_secret,
                                    &chain.refresh_token,
                                    &a.agent(),
                                    spec.proxy.as_ref(),
                                )
                                .await
                        }
                        Credentials::Social { .. } => {
                            client
                                .social_refresh(
                                    &endpoints.social_token,
                                    &chain.refresh_token,
                                    &a.agent(),
                                    spec.proxy.as_ref(),
                                )
                                .await
                        }
                        Credentials::ApiKey { .. } => {
                            Err(RefreshError::Transient("an API key is never refreshed".into()))
                        }
                    };
                    if let Ok(Some(arn)) = grant.as_ref().map(|g| g.profile_arn.clone()) {
                        // The Kiro auth service names the account's profile: kept for its calls.
                        if spec.profile_arn.is_none()
                            && a.identity.learn_profile(arn, spec.credentials_fingerprint())
                        {
                            self.sink.identity(&a.id, &a.identity.record());
                        }
                    }
                    // Counted where the token endpoint is called: callers that joined a refresh
                    // in flight, or found a fresh token, are not refreshes.
                    let counter = if grant.is_ok() { &self.refreshes_ok } else { &self.refreshes_failed };
                    counter.fetch_add(1, Ordering::Relaxed);
                    grant
                },
                // The sink's token writer waits for the disk, off the async workers.
                |chain, access| self.sink.tokens(&id, &chain, &access),
            )
            .await
    }

    /// What the enabled accounts offer, rebuilt here when something changed since it was
    /// last built.
    pub fn union(&self) -> Arc<Catalog> {
        if self.union_stale.swap(false, Ordering::AcqRel) {
            self.rebuild_union();
        }
        self.union.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The union must be built again: done by the next [`Pool::union`], not here. A catalog
    /// fetch ends this way, and 10,000 accounts fetching after a first start or a reload
    /// rebuilt it 10,000 times over 10,000 accounts (quadratic: most of the daemon's CPU
    /// then); now the work is one rebuild per change that is actually read.
    fn union_changed(&self) {
        self.union_stale.store(true, Ordering::Release);
    }

    /// Builds the union from the enabled accounts' catalogs. Accounts share their catalog
    /// (`Arc<Models>`, one per distinct list): each distinct catalog, with what its account
    /// dropped, is merged once, in the accounts' order (where two catalogs describe one model
    /// differently, the first account's description wins).
    fn rebuild_union(&self) {
        let accounts = self.accounts();
        let mut offers: Vec<(Arc<Models>, BTreeSet<String>)> = Vec::new();
        for a in accounts.iter().filter(|a| a.enabled() && !a.removed.load(Ordering::SeqCst)) {
            let c = a.catalog.read().unwrap_or_else(|e| e.into_inner());
            let ptr = Arc::as_ptr(&c.models);
            // Distinct catalogs are few (one per distinct model list): a scan of them is
            // cheaper than hashing.
            if !offers.iter().any(|(m, d)| Arc::as_ptr(m) == ptr && *d == c.dropped) {
                offers.push((c.models.clone(), c.dropped.clone()));
            }
        }
        let union = Catalog::from_offers(offers.iter().map(|(models, dropped)| (&**models, dropped)));
        *self.union.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(union);
    }

    /// An account's catalog (for `amqctl account`).
    pub fn catalog_of(&self, a: &Account) -> AccountCatalog {
        a.catalog.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The account refused `q_model` (`INVALID_MODEL_ID`): it is not offered by this account
    /// until the next fetch.
    pub fn drop_model(&self, a: &Account, q_model: &str) {
        tracing::info!(account = %a.id, model = q_model, "the account does not take this model: left out until its next catalog fetch");
        a.catalog.write().unwrap_or_else(|e| e.into_inner()).dropped.insert(q_model.to_owned());
        self.union_changed();
    }

    /// Fetches one account's catalog (bounded concurrency); a failure keeps the last good one
    /// and is shown with the account.
    pub async fn fetch_catalog(self: &Arc<Self>, a: &Arc<Account>) -> Result<usize, String> {
        let _slot = self.catalog_slots.acquire().await;
        let token = self.access_token(a, None).await.map_err(|e| e.to_string())?;
        let kind = a.kind();
        let proxy = a.proxy();
        let agent = a.agent();
        let caller =
            Caller { bearer: &token, api_key: kind == Kind::ApiKey, agent: &agent, proxy: proxy.as_ref() };
        let role = a.identity.chat_order(kind)[0];
        let arn = match role {
            Role::Q => self.profile_arn(a, &caller).await,
            Role::Runtime => a.known_profile_arn(),
        };
        let result = self.client.list_models(&a.endpoints(), role, &caller, arn.as_deref()).await;
        let now = SystemTime::now();
        let outcome = match result {
            Ok(models) => {
                let n = models.len();
                let models = crate::upstream::catalog::share(models);
                let rec = crate::store::CatalogRecord { fetched_at: now, models: models.clone() };
                a.catalog.write().unwrap_or_else(|e| e.into_inner()).replace_shared(models, now);
                self.sink.catalog(&a.id, &rec);
                a.catalog_failures.store(0, Ordering::SeqCst);
                tracing::debug!(account = %a.id, models = n, "model catalog fetched");
                Ok(n)
            }
            Err(f) => {
                let n = a.catalog_failures.fetch_add(1, Ordering::SeqCst) + 1;
                let wait = backoff(n, Duration::from_secs(30), self.catalog_refresh);
                *a.next_catalog_try.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now() + wait);
                let message = format!("catalog fetch failed: {f}");
                tracing::warn!(account = %a.id, failure = %f, retry_in_s = wait.as_secs(), "model catalog fetch failed; the last good one stays");
                a.catalog.write().unwrap_or_else(|e| e.into_inner()).error = Some(message.clone());
                Err(message)
            }
        };
        self.union_changed();
        outcome
    }

    /// Starts catalog fetches that are due: an account with a usable token and no catalog, or
    /// one older than `catalog_refresh_secs`.
    fn fetch_catalogs_due(self: &Arc<Self>) {
        let now = SystemTime::now();
        for a in self.accounts() {
            // `[cluster]`: only the holder's (another node serves it, with its own token).
            if a.removed.load(Ordering::SeqCst) || !a.enabled() || a.tokens.has_unsaved() || !a.held_for(0) {
                continue;
            }
            if matches!(a.state().state, State::Invalid | State::Suspended | State::Disabled) {
                continue;
            }
            // After its first token (an API key has one from the start).
            let has_token = a.kind() == Kind::ApiKey
                || a.tokens.current_access().is_some_and(|x| x.valid_for(MIN_VALIDITY));
            if !has_token {
                continue;
            }
            let due = match a.catalog.read().unwrap_or_else(|e| e.into_inner()).fetched_at {
                None => true,
                Some(at) => now.duration_since(at).unwrap_or_default() >= self.catalog_refresh,
            };
            let backoff = a
                .next_catalog_try
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some_and(|t| t > Instant::now());
            if !due || backoff || a.fetching.swap(true, Ordering::SeqCst) {
                continue;
            }
            let pool = self.clone();
            self.background.spawn(async move {
                let _ = pool.fetch_catalog(&a).await;
                a.fetching.store(false, Ordering::SeqCst);
            });
        }
    }

    /// The profile ARN for the account's calls: the known one, else (an OIDC account that has
    /// not asked yet) the one `ListAvailableProfiles` names — the account's region's first —
    /// kept in the store, or the Builder ID placeholder when the account has none. Asked once
    /// per account at a time; a failed listing is not kept (asked again next time).
    pub async fn profile_arn(&self, a: &Arc<Account>, caller: &Caller<'_>) -> Option<String> {
        if let Some(arn) = a.known_profile_arn() {
            return Some(arn);
        }
        if a.kind() != Kind::Oidc {
            return None;
        }
        let _one = a.profile_lock.lock().await;
        if let Some(arn) = a.known_profile_arn() {
            return Some(arn);
        }
        let spec = a.spec();
        match self.client.list_profiles(&a.endpoints().q, caller).await {
            Ok(profiles) => {
                let arn = choose_profile(&profiles, spec.region.as_deref())
                    .unwrap_or_else(|| super::identity::BUILDER_ID_PROFILE_ARN.to_owned());
                tracing::info!(account = %a.id, profile_arn = %arn, profiles = profiles.len(), "profile ARN learned");
                if a.identity.learn_profile(arn.clone(), spec.credentials_fingerprint()) {
                    self.sink.identity(&a.id, &a.identity.record());
                }
                Some(arn)
            }
            Err(f) => {
                tracing::warn!(account = %a.id, failure = %f, "ListAvailableProfiles failed: using the Builder ID profile for now");
                Some(super::identity::BUILDER_ID_PROFILE_ARN.to_owned())
            }
        }
    }

    /// The learned profile ARN `refused` was refused ("not authorized"): the account's profiles
    /// are listed again, and the one the listing names now is learned (and stored) in its
    /// place; one another request learned meanwhile is returned as it is. `None`, the learned
    /// one kept, when there is nothing to ask (the file's ARN, one not learned by listing) or
    /// nothing better to learn: the listing fails, comes back empty, or names the same one. A
    /// social account's ARN (named by its refresh) refused by its `last` endpoint too is
    /// forgotten, and the fixed social one stands in until the next refresh names one (by the
    /// first endpoint only, it goes on to the other). Before, the learned ARN was forgotten
    /// (and stored so) before the listing: when the listing failed, the account sent the
    /// Builder ID stand-in everywhere, was refused and cooled down, and its profile stayed
    /// lost across restarts, though the other endpoint took the learned one.
    pub async fn relist_profile(
        &self,
        a: &Arc<Account>,
        caller: &Caller<'_>,
        refused: &str,
        last: bool,
    ) -> Option<String> {
        let spec = a.spec();
        let fingerprint = spec.credentials_fingerprint();
        if spec.profile_arn.is_some() {
            return None;
        }
        let stand_in = super::identity::SOCIAL_PROFILE_ARN;
        let learned = a.identity.learned_profile(&fingerprint);
        match a.kind() {
            Kind::Oidc => {}
            Kind::Social if last && refused != stand_in && learned.as_deref() == Some(refused) => {
                a.identity.forget_profile();
                self.sink.identity(&a.id, &a.identity.record());
                tracing::info!(account = %a.id, "the profile ARN its refresh named was refused: the fixed one stands in until the next refresh");
                return Some(stand_in.to_owned());
            }
            _ => return None,
        }
        let _one = a.profile_lock.lock().await;
        if a.identity.learned_profile(&fingerprint).as_deref() != Some(refused) {
            // Not learned, or another request learned a newer one meanwhile: that one is tried.
            return a.identity.learned_profile(&fingerprint).filter(|arn| arn != refused);
        }
        let profiles = match self.client.list_profiles(&a.endpoints().q, caller).await {
            Ok(p) => p,
            Err(f) => {
                tracing::warn!(account = %a.id, failure = %f, "ListAvailableProfiles failed: keeping the learned profile ARN");
                return None;
            }
        };
        let arn = choose_profile(&profiles, spec.region.as_deref()).filter(|arn| arn != refused)?;
        tracing::info!(account = %a.id, profile_arn = %arn, profiles = profiles.len(), "profile ARN learned again");
        if a.identity.learn_profile(arn.clone(), fingerprint) {
            self.sink.identity(&a.id, &a.identity.record());
        }
        Some(arn)
    }

    /// The chat endpoint `role` took the account's credentials: remembered (and stored).
    pub fn remember_endpoint(&self, a: &Account, role: Role) {
        if a.identity.set_endpoint(role) {
            tracing::info!(account = %a.id, endpoint = role.as_str(), "chat endpoint remembered");
            self.sink.identity(&a.id, &a.identity.record());
        }
    }

    /// Refreshes now, whatever the cached token's expiry.
    pub async fn refresh_now(self: &Arc<Self>, a: &Arc<Account>) -> Result<Secret, RefreshError> {
        let current = a.tokens.current_access().map(|x| x.token).unwrap_or_else(|| Secret::new(""));
        self.access_token(a, Some(current)).await
    }

    fn after_refresh(&self, a: &Arc<Account>, result: &Result<Secret, RefreshError>) {
        // Removed by a reload while this refresh ran, and its rotated token not stored: the
        // reload found nothing unsaved then, so the account is kept here (its store write is
        // retried like any other) rather than dropped with the only live refresh token.
        if a.removed.load(Ordering::SeqCst) && a.tokens.has_unsaved() {
            self.orphan(a);
        }
        match result {
            Ok(_) => {
                tracing::debug!(account = %a.id, "token refreshed");
                a.refresh_failures.store(0, Ordering::SeqCst);
                a.set_refresh_wait(None);
                a.token_obtained_ms.store(unix_ms(SystemTime::now()), Ordering::Relaxed);
                // A refresh that works proves the credentials (an `amqctl refresh` after a
                // fix elsewhere: the auth region, the proxy, a newer chain taken from the
                // store): an account made invalid by a refused refresh serves again (not one
                // made invalid by the chat API: a refused API key, access denied).
                if a.invalid_by_refresh.swap(false, Ordering::SeqCst) && a.state().state == State::Invalid {
                    tracing::info!(account = %a.id, "its token refresh works again: the account is active");
                    self.set_state(a, State::Active, None, None);
                }
            }
            Err(e) => {
                if e.is_permanent() && a.state().state == State::Disabled {
                    // An operator's disable stands; the problem is still shown.
                    a.state.lock().unwrap_or_else(|e| e.into_inner()).set_error(e.to_string());
                } else if e.is_permanent() {
                    tracing::warn!(account = %a.id, error = %e, "credentials refused; the account is invalid until its credentials change or a refresh works (amqctl refresh)");
                    self.set_state(a, State::Invalid, None, Some(e.to_string()));
                    a.invalid_by_refresh.store(true, Ordering::SeqCst);
                } else if matches!(e, RefreshError::NotAttempted(_)) {
                    // Not the account's failure, and not counted as one; a short wait all the
                    // same, so that a reason that lasts (a lease that cannot be confirmed while
                    // PostgreSQL is slow) is not asked again by every request and every pass.
                    tracing::debug!(account = %a.id, error = %e, "token refresh not attempted");
                    a.set_refresh_wait(Some(Instant::now() + NOT_ATTEMPTED_WAIT));
                } else {
                    // A failed token call is counted once, however many callers shared it
                    // (the backoff's exponent is the chain's failures in a row); a store
                    // failure, per try.
                    let n = match e {
                        RefreshError::NotStored(_) => a.refresh_failures.fetch_add(1, Ordering::SeqCst) + 1,
                        _ => a.tokens.consecutive_failures().max(1),
                    };
                    // Storing is retried sooner than the token endpoint is asked again: it
                    // recovers as soon as the disk does.
                    let backoff = match e {
                        RefreshError::NotStored(_) => {
                            backoff(n, Duration::from_millis(500), Duration::from_secs(10))
                        }
                        _ => backoff(n, Duration::from_secs(2), Duration::from_secs(300)),
                    };
                    a.set_refresh_wait(Some(Instant::now() + backoff));
                    if matches!(e, RefreshError::NotStored(_)) {
                        tracing::error!(account = %a.id, error = %e, retry_in_ms = backoff.as_millis() as u64, "the rotated refresh token is held in memory only; no refresh until it is stored");
                    } else {
                        tracing::warn!(account = %a.id, error = %e, retry_in_s = backoff.as_secs(), "token refresh failed");
                    }
                    a.state.lock().unwrap_or_else(|e| e.into_inner()).set_error(e.to_string());
                }
            }
        }
    }

    /// Why the daemon is degraded for reasons other than accounts' states: the store fails to
    /// take writes, or rotated refresh tokens are held in memory only.
    pub fn persistence_problem(&self) -> Option<String> {
        let unsaved = self.accounts().iter().filter(|a| a.tokens.has_unsaved()).count()
            + self
                .orphans
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .filter(|a| a.tokens.has_unsaved())
                .count();
        match (self.sink.problem(), unsaved) {
            (None, 0) => None,
            (Some(p), 0) => Some(p),
            (None, n) => Some(format!("{n} rotated refresh token(s) not yet stored")),
            (Some(p), n) => Some(format!("{p}; {n} rotated refresh token(s) held in memory only")),
        }
    }

    /// At shutdown (after the background refresher has stopped): cancels the refresher's
    /// tasks (catalog fetches, the wait on a due refresh), waits up to `timeout` for the
    /// refreshes in flight (their answers are stored) and cancels what is left then, tries
    /// once more to store any held-back rotated token, and flushes the sink's queued writes.
    /// When it returns, no task of the pool's holds the pool. Returns the ids of accounts whose
    /// rotated refresh token could not be stored (lost with this process).
    pub async fn finish(self: &Arc<Self>, timeout: Duration) -> Vec<AccountId> {
        let deadline = tokio::time::Instant::now() + timeout;
        self.stopping.store(true, Ordering::SeqCst);
        self.background.stop(Duration::ZERO).await;
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let cancelled = self.refreshes.stop(left).await;
        if cancelled > 0 {
            tracing::warn!(
                cancelled,
                "token refreshes still running at the shutdown deadline were cancelled"
            );
        }
        let mut unsaved = Vec::new();
        let orphans = self.orphans.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for a in self.accounts().into_iter().chain(orphans) {
            if a.tokens.has_unsaved() {
                // Only the write: no token call starts now.
                let id = a.id.clone();
                let write = a.tokens.store_unsaved(|chain, access| self.sink.tokens(&id, &chain, &access));
                let stored = tokio::time::timeout_at(deadline, write).await;
                if !matches!(stored, Ok(Ok(()))) && a.tokens.has_unsaved() {
                    unsaved.push(a.id.clone());
                }
            }
        }
        let sink = self.sink.clone();
        let left =
            deadline.saturating_duration_since(tokio::time::Instant::now()).max(Duration::from_secs(1));
        if !tokio::task::spawn_blocking(move || sink.flush(left)).await.unwrap_or(false) {
            tracing::warn!("account states or counters not stored at shutdown");
        }
        unsaved
    }

    fn set_state(&self, a: &Account, state: State, until: Option<SystemTime>, reason: Option<String>) {
        let info = {
            let mut st = a.state.lock().unwrap_or_else(|e| e.into_inner());
            if st.state != state {
                st.since = Some(SystemTime::now());
            }
            st.state = state;
            st.until = until;
            if reason.is_some() {
                st.last_error = reason.clone();
                st.last_error_at = Some(SystemTime::now());
            }
            st.reason = reason;
            if state == State::Active {
                st.strikes = 0;
            }
            st.clone()
        };
        self.sink.state(&a.id, &info);
        if state == State::Active {
            self.freed.notify_waiters();
        }
    }

    /// Operator override: back to active (clears suspension, quota, cooling, invalid).
    pub fn enable(&self, id: &str) -> bool {
        let Some(a) = self.get(id) else { return false };
        self.set_state(&a, State::Active, None, None);
        true
    }

    /// Operator override: no new requests until enabled.
    pub fn disable(&self, id: &str) -> bool {
        let Some(a) = self.get(id) else { return false };
        self.set_state(&a, State::Disabled, None, Some("disabled by operator".into()));
        true
    }

    /// Records the verdict of a health check.
    pub fn record_check(&self, a: &Account, outcome: Result<(), &UpstreamFailure>) {
        match outcome {
            Ok(()) => {
                if matches!(
                    a.state().state,
                    State::Suspended | State::Cooling | State::Quota | State::Invalid
                ) {
                    self.set_state(a, State::Active, None, None);
                }
            }
            Err(f) => self.apply_failure(a, f),
        }
    }

    /// Moves an account according to an upstream failure.
    pub fn apply_failure(&self, a: &Account, f: &UpstreamFailure) {
        // The account's own trouble: one request at a time until it answers again. A busy
        // model (capacity) is not the account's: taken as such, a service-wide capacity spike
        // cut every account it touched to one request at a time.
        if !matches!(
            f,
            UpstreamFailure::BadRequest { .. }
                | UpstreamFailure::ContextTooLong { .. }
                | UpstreamFailure::Capacity { .. }
        ) {
            a.proven.store(false, Ordering::Relaxed);
        }
        {
            let mut c = a.counters.lock().unwrap_or_else(|e| e.into_inner());
            c.failures += 1;
            *c.failures_by_kind.entry(f.kind().to_string()).or_default() += 1;
            a.counters_dirty.store(true, Ordering::Relaxed);
        }
        let now = SystemTime::now();
        match f {
            UpstreamFailure::Throttled { retry_after, message } => {
                let strikes = strike(a);
                let wait = retry_after
                    .unwrap_or_else(|| backoff(strikes, Duration::from_secs(10), Duration::from_secs(600)));
                self.set_state(a, State::Cooling, Some(now + wait), Some(format!("throttled: {message}")));
            }
            UpstreamFailure::Suspicious { message } => {
                let until = now + self.upstream.suspicious_cooldown;
                tracing::warn!(account = %a.id, cooldown_s = self.upstream.suspicious_cooldown.as_secs(), "account flagged for suspicious activity: parked, no request goes to it meanwhile");
                self.set_state(
                    a,
                    State::Cooling,
                    Some(until),
                    Some(format!("suspicious activity: {message}")),
                );
            }
            UpstreamFailure::Quota { kind, message } => {
                let until = match kind {
                    QuotaKind::Monthly => next_utc_month(now),
                    QuotaKind::Daily => next_utc_day(now),
                };
                self.set_state(
                    a,
                    State::Quota,
                    Some(until),
                    Some(format!("{kind:?} quota used up: {message}")),
                );
            }
            UpstreamFailure::Suspended { reason } => {
                tracing::warn!(account = %a.id, reason = %reason, "account suspended by Amazon Q");
                self.set_state(a, State::Suspended, None, Some(reason.clone()));
            }
            UpstreamFailure::AccessDenied { message } => {
                a.invalid_by_refresh.store(false, Ordering::SeqCst);
                self.set_state(a, State::Invalid, None, Some(format!("access denied: {message}")));
            }
            UpstreamFailure::TokenInvalid => {
                a.state.lock().unwrap_or_else(|e| e.into_inner()).set_error("access token refused".into());
            }
            UpstreamFailure::Capacity { message } | UpstreamFailure::Transient { message, .. } => {
                a.state.lock().unwrap_or_else(|e| e.into_inner()).set_error(message.clone());
            }
            // No chat endpoint takes the account's credentials (the relay tried each): it failed
            // fast and stayed active, so the least busy choice kept picking it, and each request
            // spent one of its attempts there. Cooled down, with a growing backoff.
            UpstreamFailure::NotFound { message } => {
                let strikes = strike(a);
                let wait = backoff(strikes, Duration::from_secs(30), Duration::from_secs(1800));
                self.set_state(
                    a,
                    State::Cooling,
                    Some(now + wait),
                    Some(format!("no chat endpoint takes the account's credentials: {message}")),
                );
            }
            // Its proxy fails fast (or is silent), and the account stayed active: picked again
            // and again as the least busy, each request spent an attempt on it. Cooled down,
            // with a growing backoff, while the others serve.
            UpstreamFailure::ProxyFailed { message } => {
                let strikes = strike(a);
                let wait = backoff(strikes, Duration::from_secs(10), Duration::from_secs(600));
                self.set_state(
                    a,
                    State::Cooling,
                    Some(now + wait),
                    Some(format!("its proxy fails: {message}")),
                );
            }
            UpstreamFailure::ModelNotOffered { message } | UpstreamFailure::Unreachable { message } => {
                a.state.lock().unwrap_or_else(|e| e.into_inner()).set_error(message.clone());
            }
            UpstreamFailure::BadRequest { .. } | UpstreamFailure::ContextTooLong { .. } => {}
        }
    }

    /// Applies a new account set (a reload): joins, drains, resets, updates. Returns the added
    /// accounts that were not added, with why: their stored state could not be read, and
    /// starting from the file's token could overwrite a rotated chain the store still holds.
    pub async fn apply(&self, new: &AccountSet, diff: &AccountsDiff) -> Applied {
        // Lookups by id through maps: a linear search per account made a reload of a large file
        // quadratic (10,000 accounts took seconds).
        let specs: HashMap<&AccountId, &AccountSpec> = new.iter().map(|s| (&s.id, s)).collect();
        let joining: Vec<AccountId> =
            diff.added.iter().filter(|id| specs.contains_key(id)).cloned().collect();
        // Accounts whose credentials changed: the store may hold a chain grown from the new
        // ones (credentials changed and changed back), which is then the live one.
        let rekeyed: Vec<AccountId> =
            diff.changed.iter().filter(|c| c.credentials).map(|c| c.id.clone()).collect();
        // The store's reads block (redb's disk, PostgreSQL through its own runtime, which must
        // not be entered from an async worker): one blocking task reads them all.
        let sink = self.sink.clone();
        let ids: Vec<AccountId> = joining.iter().chain(&rekeyed).cloned().collect();
        let wanted = ids.len();
        let mut restored = match tokio::task::spawn_blocking(move || sink.restore(&ids)).await {
            Ok(r) if r.len() == wanted => r,
            Ok(_) | Err(_) => {
                (0..wanted).map(|_| Err("the store's read did not finish".to_string())).collect()
            }
        };
        let stored_chains: HashMap<AccountId, Chain> = rekeyed
            .iter()
            .cloned()
            .zip(restored.split_off(joining.len()))
            .filter_map(|(id, r)| match r {
                Ok(r) => r.chain.map(|c| (id, c)),
                Err(e) => {
                    tracing::warn!(account = %id, error = %e, "cannot read the account's stored chain; its new credentials start from the file's token");
                    None
                }
            })
            .collect();
        let mut added = Vec::new();
        let mut refused = Vec::new();
        let mut deferred = Vec::new();
        let mut revived = Vec::new();
        let mut kept: Vec<AccountSpec> = Vec::new();
        let mut kept_ids: HashSet<String> = HashSet::new();
        // Credentials that move between ids in the running set (ids swapped or shifted:
        // `{a: X, b: Y}` become `{b: X, c: Y}`, or `{a: Y, b: Z}`). Applied live, an entry would
        // restart from the file's long-rotated token and drop the live chain of its old
        // credentials, which the entry now having them never got. Every entry involved waits
        // for a restart, which moves each stored chain with its credentials (see
        // [`Pool::new`]): one that takes credentials another entry gives up (removed, or
        // changed to others) waits or is not added, and the one giving them up waits or stays.
        // Credentials another entry keeps (two entries sharing them) are no move.
        let running: Vec<(AccountId, [u8; 32])> = self
            .accounts()
            .iter()
            .map(|a| (a.id.clone(), *a.fingerprint.read().unwrap_or_else(|e| e.into_inner())))
            .collect();
        let removed_ids: HashSet<&AccountId> = diff.removed.iter().collect();
        let giving_up = |fp: [u8; 32], not: &AccountId| {
            running
                .iter()
                .find(|(id, f)| *f == fp && id != not && (removed_ids.contains(id) || rekeyed.contains(id)))
                .map(|(id, _)| id.clone())
        };
        let restart = "(ids swapped or shifted in the file): applied at the next restart, which moves each refresh token chain with its credentials";
        let mut moving: HashMap<AccountId, String> = HashMap::new();
        let mut blocked: HashMap<AccountId, String> = HashMap::new();
        let mut givers: Vec<AccountId> = Vec::new();
        for id in &rekeyed {
            if let Some(other) = specs.get(id).and_then(|s| giving_up(s.credentials_fingerprint(), id)) {
                moving.insert(
                    id.clone(),
                    format!("its new credentials are those account {other} gives up {restart}"),
                );
                givers.push(other);
            }
        }
        for id in &joining {
            if let Some(other) = specs
                .get(id)
                .and_then(|s| giving_up(s.credentials_fingerprint(), id))
                .filter(|o| rekeyed.contains(o))
            {
                blocked.insert(
                    id.clone(),
                    format!("its credentials are those account {other} gives up {restart}"),
                );
                givers.push(other);
            }
        }
        // The givers: a removed one stays (serving, its chain with it), a changed one waits.
        for g in givers {
            if removed_ids.contains(&g) {
                if kept_ids.insert(g.to_string()) {
                    if let Some(a) = self.get(g.as_str()) {
                        tracing::warn!(account = %g, "the account stays until a restart: its credentials move to another id");
                        kept.push(a.spec());
                    }
                }
            } else {
                moving.entry(g.clone()).or_insert_with(|| {
                    format!("its credentials go to another entry while it takes others {restart}")
                });
            }
        }
        // Accounts leaving with this change, by what they would give a renamed account (see
        // [`adopt_renamed`]): their current chain, read once any refresh in flight has ended.
        // Marked removed first, so that no new refresh of theirs starts meanwhile.
        let mut leaving: Vec<(String, Restored)> = Vec::new();
        let mut leaving_accounts: Vec<Arc<Account>> = Vec::new();
        // `[cluster]`: not across nodes (another node may hold the old id's lease and go on
        // refreshing its chain): there a rename keeps the old id's chain in the store, and
        // renaming back finds it.
        if !joining.is_empty() && !diff.removed.is_empty() && self.clustered().is_none() {
            let removed: HashSet<&AccountId> = diff.removed.iter().collect();
            for a in self.accounts().into_iter().filter(|a| removed.contains(&a.id)) {
                // A kept giver gives nothing: it stays, and keeps its chain.
                if a.kind() == Kind::ApiKey || kept_ids.contains(a.id.as_str()) {
                    continue;
                }
                a.removed.store(true, Ordering::SeqCst);
                // Read once any refresh in flight has ended. A chain held unsaved (the store
                // fails) is the only live one: the renamed account takes it whole, unsaved
                // state and all (see [`take_over`]), and stores it under its new id.
                let chain = a.tokens.chain().await;
                let access = a.tokens.current_access();
                // In memory, in use until now: newer than anything stored.
                let updated = Some(SystemTime::now());
                let r =
                    Restored { chain: Some(chain), access, chain_updated_at: updated, ..Default::default() };
                leaving.push((a.id.to_string(), r));
                leaving_accounts.push(a);
            }
        }
        for (id, restored) in joining.into_iter().zip(restored) {
            if let Some(spec) = specs.get(&id) {
                if let Some(a) = self.revive(&id) {
                    tracing::info!(account = %id, "account added back: it resumes where it was removed");
                    // Renamed away and back while something still held it: its chain went to
                    // the name it had (which stopped refreshing its own when it was removed),
                    // and that name, leaving now, carries the chain on. Only then: an account
                    // that gave nothing away keeps its own chain.
                    if a.given_away.swap(false, Ordering::SeqCst) && !a.tokens.has_unsaved() {
                        if let Some((from, chain, access)) = adopt_renamed(
                            spec,
                            &Restored::default(),
                            leaving.iter_mut().map(|(i, r)| (&*i, r)),
                        ) {
                            tracing::info!(account = %id, from = %from, "account renamed back: it resumes the chain of the name it had");
                            let seen = a.tokens.generation();
                            a.tokens.adopt(chain, access, seen).await;
                            take_over(&leaving_accounts, &from, &a).await;
                        }
                    }
                    // Serving (and refreshing) again only now, with the chain it goes on with.
                    a.removed.store(false, Ordering::SeqCst);
                    let stored = restored.ok().and_then(|r| r.chain);
                    revived.push((a.clone(), *spec, stored));
                    added.push(a);
                    continue;
                }
                let fp = spec.credentials_fingerprint();
                if let Some(why) = blocked.get(&id) {
                    tracing::warn!(account = %id, "account not added: {why}");
                    refused.push((id.clone(), why.clone()));
                    continue;
                }
                let mut restored = match restored {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(account = %id, error = %e, "account not added: its stored state cannot be read");
                        // Renamed: the old id stays until the new one joins (removed now, the
                        // retry would have no chain to give the new id, which would start from
                        // the file's long-rotated token).
                        for (old, a) in leaving.iter().map(|(i, _)| i).zip(&leaving_accounts) {
                            if *a.fingerprint.read().unwrap_or_else(|e| e.into_inner()) == fp
                                && !kept_ids.contains(old.as_str())
                            {
                                tracing::info!(account = %old, renamed_to = %id, "the renamed account stays under its old id until the new one can join");
                                kept_ids.insert(old.clone());
                                kept.push(a.spec());
                            }
                        }
                        refused.push((id, format!("cannot read its stored state: {e}")));
                        continue;
                    }
                };
                let mut renamed_from = None;
                if let Some((old, chain, access)) =
                    adopt_renamed(spec, &restored, leaving.iter_mut().map(|(i, r)| (&*i, r)))
                {
                    tracing::info!(account = %id, from = %old, "account renamed: it resumes the refresh token of its old id");
                    restored.chain = Some(chain);
                    restored.access = access;
                    renamed_from = Some(old);
                }
                let (account, new_identity) = Account::new((*spec).clone(), &self.upstream, restored);
                let account = Arc::new(account);
                if let Some(old) = renamed_from {
                    take_over(&leaving_accounts, &old, &account).await;
                }
                if self.clustered().is_some() {
                    account.held_until.store(0, Ordering::SeqCst);
                }
                if new_identity {
                    self.sink.identity(&account.id, &account.identity.record());
                }
                added.push(account);
            }
        }
        // The leaving accounts whose chain a renamed account took: renamed back, they take
        // it back (above, in a later apply).
        for (a, (_, r)) in leaving_accounts.iter().zip(&leaving) {
            if r.chain.is_none() {
                a.given_away.store(true, Ordering::SeqCst);
            }
        }
        let current: HashMap<AccountId, Arc<Account>> = if diff.changed.is_empty() {
            HashMap::new()
        } else {
            self.accounts().into_iter().map(|a| (a.id.clone(), a)).collect()
        };
        for change in &diff.changed {
            let (Some(a), Some(spec)) = (current.get(&change.id).cloned(), specs.get(&change.id).copied())
            else {
                continue;
            };
            if let Some(why) = moving.get(&change.id) {
                tracing::warn!(account = %change.id, "the account's change waits: {why}");
                deferred.push((change.id.clone(), why.clone()));
                continue;
            }
            if let Err(why) =
                self.update(&a, spec, change.credentials, stored_chains.get(&change.id).cloned()).await
            {
                deferred.push((change.id.clone(), why));
            }
        }
        for (a, spec, stored) in revived {
            let credentials =
                *a.fingerprint.read().unwrap_or_else(|e| e.into_inner()) != spec.credentials_fingerprint();
            if let Err(why) = self.update(&a, spec, credentials, stored).await {
                deferred.push((a.id.clone(), why));
            }
            if self.clustered().is_some() {
                a.held_until.store(0, Ordering::SeqCst);
            }
        }
        {
            let mut list = self.accounts.write().unwrap_or_else(|e| e.into_inner());
            // The stored chain is kept: an account removed and added back (commented out for a
            // while, say) resumes its rotated refresh token instead of a dead one.
            let removed: HashSet<&AccountId> =
                diff.removed.iter().filter(|id| !kept_ids.contains(id.as_str())).collect();
            let mut retired = self.retired.lock().unwrap_or_else(|e| e.into_inner());
            retired.retain(|w| w.strong_count() > 0);
            for a in list.iter().filter(|a| removed.contains(&a.id)) {
                retired.push(Arc::downgrade(a));
                a.removed.store(true, Ordering::SeqCst);
                if a.tokens.has_unsaved() {
                    self.orphan(a);
                }
            }
            list.retain(|a| !removed.contains(&a.id));
            list.extend(added);
            // Keep file order.
            let order: HashMap<&AccountId, usize> = new.iter().enumerate().map(|(i, s)| (&s.id, i)).collect();
            list.sort_by_key(|a| order.get(&a.id).copied().unwrap_or(usize::MAX));
            // Under the list's lock, so that two applies cannot leave the index behind it.
            *self.by_id.write().unwrap_or_else(|e| e.into_inner()) = index(&list);
        }
        // Kept: serving (and refreshing) again.
        for a in leaving_accounts.iter().filter(|a| kept_ids.contains(a.id.as_str())) {
            a.removed.store(false, Ordering::SeqCst);
        }
        self.union_changed();
        self.freed.notify_waiters();
        Applied { refused, deferred, kept }
    }

    /// A removed account with this id that something still holds, taken back (out of the
    /// orphans too): `None` when there is none.
    fn revive(&self, id: &AccountId) -> Option<Arc<Account>> {
        let a = {
            let mut retired = self.retired.lock().unwrap_or_else(|e| e.into_inner());
            let at = retired.iter().position(|w| w.upgrade().is_some_and(|a| a.id == *id))?;
            retired.swap_remove(at).upgrade()?
        };
        self.orphans.lock().unwrap_or_else(|e| e.into_inner()).retain(|o| !Arc::ptr_eq(o, &a));
        // Still `removed` (no refresh of its own starts) until the caller clears it, once it
        // has the chain it goes on with.
        Some(a)
    }

    /// Brings an account's settings to `spec`; `credentials`: they changed, and the token chain
    /// restarts (from `stored` when it grew from the new credentials, see [`Tokens::reset`]).
    ///
    /// `Err` (nothing changed) when the credentials changed while a rotated refresh token of
    /// the current ones is held unsaved and still cannot be stored: replacing the chain would
    /// drop the only live token. The change waits for a reload once the store works.
    async fn update(
        &self,
        a: &Arc<Account>,
        spec: &AccountSpec,
        credentials: bool,
        stored: Option<Chain>,
    ) -> Result<(), String> {
        if credentials {
            let from_file = Chain {
                refresh_token: match &spec.credentials {
                    Credentials::ApiKey { key } => key.clone(),
                    c => c.refresh_token().cloned().unwrap_or_else(|| Secret::new("")),
                },
                rotated: false,
                file_fingerprint: spec.credentials_fingerprint(),
            };
            let mut reset = a.tokens.reset(from_file.clone(), stored.clone()).await;
            if reset == Reset::Unsaved {
                let id = a.id.clone();
                if let Err(e) =
                    a.tokens.store_unsaved(|chain, access| self.sink.tokens(&id, &chain, &access)).await
                {
                    tracing::error!(account = %a.id, error = %e, "the account's new credentials are not applied: a refresh token its current ones rotated is held in memory only (it cannot be stored), and replacing them would lose it; they are applied once it is stored");
                    return Err(format!(
                        "its new credentials wait: a rotated refresh token of its current ones cannot be stored ({e})"
                    ));
                }
                reset = a.tokens.reset(from_file.clone(), stored).await;
                if reset == Reset::Unsaved {
                    // Rotated again, and not stored again, meanwhile.
                    return Err("its new credentials wait: a rotated refresh token of its current ones cannot be stored".into());
                }
            }
            if reset == Reset::Continued && self.clustered().is_some() && !a.held_for(0) {
                // `[cluster]`: the node holding the account stores the chain under the new
                // entry (a write here would be fenced); a lease taken later loads it.
                a.tokens.relabel_in_memory(from_file.file_fingerprint).await;
            } else if reset == Reset::Continued {
                let id = a.id.clone();
                let relabelled = a
                    .tokens
                    .relabel(from_file.file_fingerprint, |chain, access| {
                        self.sink.tokens(&id, &chain, &access)
                    })
                    .await;
                if let Err(e) = relabelled {
                    tracing::error!(account = %a.id, error = %e, "the file's refresh token is this account's own chain, which cannot be stored under the new entry; the change waits");
                    return Err(format!("its chain cannot be stored under the new entry ({e})"));
                }
                tracing::info!(account = %a.id, "the file's refresh token is one this account's chain already holds or rotated away from: the chain goes on");
            }
            if a.state().state == State::Invalid {
                self.set_state(a, State::Active, None, None);
            }
        }
        *a.endpoints.write().unwrap_or_else(|e| e.into_inner()) =
            endpoints_for(&self.upstream, spec.region.as_deref(), spec.auth_region.as_deref());
        // New settings (a region, a proxy, credentials): a refresh that failed under the old
        // ones is no reason to wait now.
        a.set_refresh_wait(None);
        a.refresh_failures.store(0, Ordering::SeqCst);
        a.tokens.clear_failures();
        let mut held = a.spec.write().unwrap_or_else(|e| e.into_inner());
        *a.fingerprint.write().unwrap_or_else(|e| e.into_inner()) = spec.credentials_fingerprint();
        *held = spec.clone();
        Ok(())
    }

    /// Stores every chain held unsaved now (with no token call), as the start does for chains
    /// taken over from another id's record; what cannot be stored stays held (no refresh runs
    /// on it) and is retried by the refresher.
    pub async fn store_unsaved(&self) {
        for a in self.accounts().into_iter().filter(|a| a.tokens.has_unsaved()) {
            let id = a.id.clone();
            if let Err(e) =
                a.tokens.store_unsaved(|chain, access| self.sink.tokens(&id, &chain, &access)).await
            {
                tracing::error!(account = %a.id, error = %e, "the refresh token it took over cannot be stored yet; it is held, and stored once the store works");
            }
        }
    }

    /// A removed account that something still holds (a request, a token refresh in flight, a
    /// rotated token waiting to be stored), if any: `[cluster]` gives its lease up only once
    /// nothing of it can still write the chain (a write after the release would be fenced,
    /// and the chain lost).
    pub fn removed_account(&self, id: &str) -> Option<Arc<Account>> {
        let orphan = {
            let orphans = self.orphans.lock().unwrap_or_else(|e| e.into_inner());
            orphans.iter().find(|a| a.id.as_str() == id).cloned()
        };
        orphan.or_else(|| {
            let retired = self.retired.lock().unwrap_or_else(|e| e.into_inner());
            retired.iter().filter_map(std::sync::Weak::upgrade).find(|a| a.id.as_str() == id)
        })
    }

    /// Keeps a removed account whose rotated refresh token is not stored yet, until it is (once:
    /// the reload and the refresh that rotated it may both get here).
    fn orphan(&self, a: &Arc<Account>) {
        let mut orphans = self.orphans.lock().unwrap_or_else(|e| e.into_inner());
        if !orphans.iter().any(|o| Arc::ptr_eq(o, a)) {
            orphans.push(a.clone());
        }
    }

    /// One pass of the background refresher: refreshes tokens that expire within
    /// `refresh_before` (with per-account jitter), bounded by the refresh slots.
    pub fn refresh_due(self: &Arc<Self>) -> usize {
        let now = SystemTime::now();
        let mut started = 0;
        let orphans = {
            let mut orphans = self.orphans.lock().unwrap_or_else(|e| e.into_inner());
            orphans.retain(|a| a.tokens.has_unsaved());
            orphans.clone()
        };
        for a in self.accounts().into_iter().chain(orphans) {
            if a.next_refresh_try
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some_and(|t| t > Instant::now())
            {
                continue;
            }
            // A rotated token that is not stored yet is retried whatever the account's state:
            // it is the only live link of the chain.
            // `[cluster]`: so is one rotated under a lease lost since (see
            // [`crate::store::postgres`]: it is stored unless the new holder stored one).
            let unsaved = a.tokens.has_unsaved();
            if a.kind() == Kind::ApiKey || (!a.held_for(0) && !unsaved) {
                continue;
            }
            if !unsaved && (a.removed.load(Ordering::SeqCst) || !a.enabled()) {
                continue;
            }
            if !unsaved && matches!(a.state().state, State::Invalid | State::Suspended | State::Disabled) {
                continue;
            }
            // Jitter: each account refreshes at its own point in the last 20% before the threshold.
            let jitter = self.refresh_before.mul_f64(0.2 * jitter_fraction(a.id.as_str()));
            let due = unsaved
                || match a.tokens.current_access() {
                    None => true,
                    Some(acc) => {
                        acc.expires_at <= now + refresh_margin(self.refresh_before + jitter, &a, &acc)
                    }
                };
            if !due || a.refreshing.swap(true, Ordering::SeqCst) {
                continue;
            }
            tracing::debug!(account = %a.id, "background token refresh");
            started += 1;
            let pool = self.clone();
            self.background.spawn(async move {
                let _ = if unsaved { pool.access_token(&a, None).await } else { pool.refresh_now(&a).await };
                a.refreshing.store(false, Ordering::SeqCst);
            });
        }
        started
    }

    /// Runs the background refresher until `stop` resolves.
    pub async fn run_refresher(self: Arc<Self>, mut stop: crate::shutdown::Shutdown) {
        loop {
            self.refresh_due();
            self.fetch_catalogs_due();
            self.flush_counters();
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.recv() => break,
            }
        }
        self.flush_counters();
    }

    /// Writes changed counters to the sink (batched).
    pub fn flush_counters(&self) {
        let batch: Vec<(AccountId, Counters)> = self
            .accounts()
            .iter()
            .filter(|a| a.counters_dirty.swap(false, Ordering::Relaxed))
            .map(|a| (a.id.clone(), a.counters.lock().unwrap_or_else(|e| e.into_inner()).clone()))
            .collect();
        if !batch.is_empty() {
            self.sink.counters(batch);
        }
    }
}

/// The accounts by id.
fn index(accounts: &[Arc<Account>]) -> HashMap<String, Arc<Account>> {
    accounts.iter().map(|a| (a.id.as_str().to_owned(), a.clone())).collect()
}

fn accounts_held(pool: &Pool) -> usize {
    pool.accounts().iter().filter(|a| a.held_for(0)).count()
}

fn weight(a: &Account) -> u32 {
    a.spec.read().unwrap_or_else(|e| e.into_inner()).weight.get()
}

/// A stable pseudo-random fraction in [0, 1) per account id.
fn jitter_fraction(id: &str) -> f64 {
    let d = crate::hash::sha256(id.as_bytes());
    u16::from_be_bytes([d[0], d[1]]) as f64 / 65536.0
}

/// Exponential backoff with jitter: base·2^(n-1), capped, ±25%.
pub fn backoff(n: u32, base: Duration, cap: Duration) -> Duration {
    let exp = base.saturating_mul(1u32 << n.saturating_sub(1).min(16)).min(cap);
    let r = crate::ids::random_bytes::<2>();
    let f = 0.75 + 0.5 * (u16::from_be_bytes(r) as f64 / 65536.0);
    exp.mul_f64(f)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp as i64 + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn unix_days(t: SystemTime) -> i64 {
    (t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs() / 86_400) as i64
}

fn from_days(days: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs((days.max(0) as u64) * 86_400)
}

/// Midnight UTC after `t`.
pub fn next_utc_day(t: SystemTime) -> SystemTime {
    from_days(unix_days(t) + 1)
}

/// The first day of the next month, 00:00 UTC.
pub fn next_utc_month(t: SystemTime) -> SystemTime {
    let (y, m, _) = civil_from_days(unix_days(t));
    let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    from_days(days_from_civil(y, m, 1))
}

/// A request's hold on an account. Dropping it frees the slot.
pub struct Lease {
    pub account: Arc<Account>,
    pool: Arc<Pool>,
    taken: Instant,
}

impl Lease {
    pub fn id(&self) -> &AccountId {
        &self.account.id
    }

    pub fn failure(&self, f: &UpstreamFailure) {
        self.pool.apply_failure(&self.account, f);
    }

    /// The request went through: count it.
    pub fn success(&self, tokens_in: u64, tokens_out: u64, credits: Option<f64>) {
        if !self.account.proven.swap(true, Ordering::Relaxed) {
            // Out of probing: the requests waiting for this account may come now.
            self.pool.freed.notify_waiters();
        }
        let mut c = self.account.counters.lock().unwrap_or_else(|e| e.into_inner());
        c.requests += 1;
        c.tokens_in += tokens_in;
        c.tokens_out += tokens_out;
        c.credits += credits.unwrap_or(0.0);
        c.last_used = Some(SystemTime::now());
        self.account.counters_dirty.store(true, Ordering::Relaxed);
        let mut st = self.account.state.lock().unwrap_or_else(|e| e.into_inner());
        st.strikes = 0;
        // The account recovered: its last error is history (stored, so a restart agrees).
        if st.last_error.is_some() && st.state == State::Active {
            st.last_error = None;
            st.last_error_at = None;
            let info = st.clone();
            drop(st);
            self.pool.sink.state(&self.account.id, &info);
        }
    }

    /// The account is serving a request as `model` (the Amazon Q model id it was sent as).
    pub fn served_model(&self, model: &str) {
        let mut last = self.account.last_model.lock().unwrap_or_else(|e| e.into_inner());
        if last.as_deref() != Some(model) {
            *last = Some(model.to_owned());
        }
    }

    /// Counts a request that reached the account (whatever its outcome).
    pub fn attempted(&self) {
        self.account.mark_used();
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let held = self.taken.elapsed().as_millis().min(u64::MAX as u128) as u64;
        // Weight 1/8 for the newest; a lost race between two updates only loses one sample.
        let old = self.pool.hold_ewma_ms.load(Ordering::Relaxed);
        let new = if old == 0 { held.max(1) } else { (old * 7 + held) / 8 };
        self.pool.hold_ewma_ms.store(new.max(1), Ordering::Relaxed);
        self.account.in_flight.fetch_sub(1, Ordering::SeqCst);
        // One slot freed: one waiter. Waking every waiter for each slot made them all scan the
        // accounts for the one that could take it (at 128 clients on 32 accounts, most of the
        // daemon's CPU went to that herd). Changes that can free more (an account proven,
        // recovered, added) still wake them all.
        self.pool.freed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar() {
        // 2026-11-29T12:00:00Z
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_953_600);
        let d = next_utc_day(t).duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
        assert_eq!(d, 1_795_996_800); // 2026-11-30T00:00:00Z
        let m = next_utc_month(t).duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
        assert_eq!(m, 1_796_083_200); // 2026-12-01T00:00:00Z
        let dec = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_083_200 + 86_400 * 5);
        let jan = next_utc_month(dec).duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
        assert_eq!(jan, 1_798_761_600); // 2027-01-01T00:00:00Z
    }

    /// A store that cannot be read.
    struct Unreadable;

    impl StateSink for Unreadable {
        fn tokens(&self, _: &AccountId, _: &Chain, _: &Access) -> TokenWrite {
            Box::pin(std::future::ready(Ok(())))
        }
        fn state(&self, _: &AccountId, _: &StateInfo) {}
        fn counters(&self, _: Vec<(AccountId, Counters)>) {}
        fn restore(&self, ids: &[AccountId]) -> Vec<Result<Restored, String>> {
            ids.iter().map(|_| Err("input/output error".to_string())).collect()
        }
    }

    fn accounts(ids: &[&str]) -> AccountSet {
        let text: String = ids
            .iter()
            .map(|id| {
                format!(
                    "[[account]]\nid = \"{id}\"\nclient_id = \"c-{id}\"\nclient_secret = \"s-{id}\"\nrefresh_token = \"r-{id}\"\n"
                )
            })
            .collect();
        crate::config::accounts::parse(std::path::Path::new("accounts.toml"), &text).unwrap().0
    }

    #[tokio::test]
    async fn an_account_whose_stored_state_cannot_be_read_does_not_join() {
        let (cfg, _) = crate::config::parse_config(
            std::path::Path::new("/etc/amq2api/amq2api.toml"),
            "[server]\nlisten = [\"127.0.0.1:0\"]\n[auth]\napi_keys = [\"sk-amq-0123456789abcdef\"]\n\
             [accounts]\nfile = \"accounts.toml\"\n",
            &crate::config::Env::default(),
        )
        .unwrap();
        let (one, two) = (accounts(&["a1"]), accounts(&["a1", "a2"]));
        let client = UpstreamClient::new(&cfg.upstream).unwrap();
        let pool = Pool::new(
            &one,
            BTreeMap::new(),
            &cfg.accounts,
            cfg.upstream.clone(),
            client,
            Arc::new(Unreadable),
        );
        let refused = pool.apply(&two, &one.diff(&two)).await.refused;
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert_eq!(refused[0].0.as_str(), "a2");
        assert!(refused[0].1.contains("input/output error"), "{refused:?}");
        assert!(pool.get("a2").is_none(), "joined with its file's token over an unread store");
        assert!(pool.get("a1").is_some());
        assert_eq!(pool.accounts().len(), 1);
    }

    /// A store whose token writes fail until told otherwise; it keeps the refresh tokens it
    /// took.
    #[derive(Default)]
    struct Flaky {
        failing: std::sync::atomic::AtomicBool,
        /// The next `restore` fails (once).
        unreadable: std::sync::atomic::AtomicBool,
        stored: Mutex<Vec<(String, String)>>,
        /// Each account's last stored chain, as a store keeps it.
        chains: Mutex<HashMap<String, Chain>>,
        /// The machine ids stored, in order: (account, machine id).
        identities: Mutex<Vec<(String, String)>>,
    }

    impl StateSink for Flaky {
        fn tokens(&self, id: &AccountId, chain: &Chain, _: &Access) -> TokenWrite {
            let r = if self.failing.load(Ordering::SeqCst) {
                Err("no space left on device".to_string())
            } else {
                self.stored.lock().unwrap().push((id.to_string(), chain.refresh_token.expose().to_string()));
                self.chains.lock().unwrap().insert(id.to_string(), chain.clone());
                Ok(())
            };
            Box::pin(std::future::ready(r))
        }
        fn state(&self, _: &AccountId, _: &StateInfo) {}
        fn counters(&self, _: Vec<(AccountId, Counters)>) {}
        fn identity(&self, id: &AccountId, rec: &crate::store::IdentityRecord) {
            self.identities.lock().unwrap().push((id.to_string(), rec.machine_id.clone()));
        }
        fn restore(&self, ids: &[AccountId]) -> Vec<Result<Restored, String>> {
            if self.unreadable.swap(false, Ordering::SeqCst) {
                return ids.iter().map(|_| Err("the store cannot be read".to_string())).collect();
            }
            let chains = self.chains.lock().unwrap();
            ids.iter()
                .map(|id| Ok(Restored { chain: chains.get(id.as_str()).cloned(), ..Restored::default() }))
                .collect()
        }
    }

    /// An emulator with the account `a1`, and a pool serving it through `sink`.
    async fn pool_with_a1(sink: Arc<Flaky>) -> (crate::emulator::Emulator, Arc<Pool>) {
        let emu =
            crate::emulator::Emulator::start(crate::emulator::EmulatorOptions::default()).await.unwrap();
        emu.add_account("c-a1", "s-a1", "r-a1");
        let pool = pool_of(&config_for(&emu), &["a1"], sink);
        (emu, pool)
    }

    /// [`pool_with_a1`] through a [`Flaky`] store, `a1`'s token rotated once (and stored).
    async fn rotated_a1() -> (Arc<Flaky>, crate::emulator::Emulator, Arc<Pool>, Arc<Account>) {
        let sink = Arc::new(Flaky::default());
        let (emu, pool) = pool_with_a1(sink.clone()).await;
        let a = pool.get("a1").unwrap();
        pool.refresh_now(&a).await.unwrap();
        (sink, emu, pool, a)
    }

    /// A pool serving `ids` with `cfg` through `sink`.
    fn pool_of(cfg: &crate::config::Config, ids: &[&str], sink: Arc<dyn StateSink>) -> Arc<Pool> {
        let client = UpstreamClient::new(&cfg.upstream).unwrap();
        Pool::new(&accounts(ids), BTreeMap::new(), &cfg.accounts, cfg.upstream.clone(), client, sink)
    }

    /// The daemon's config against `emu`.
    fn config_for(emu: &crate::emulator::Emulator) -> crate::config::Config {
        config_with_upstream(&crate::demo::upstream_keys(emu))
    }

    /// The daemon's config with these `[upstream]` keys.
    fn config_with_upstream(keys: &str) -> crate::config::Config {
        crate::config::parse_config(
            std::path::Path::new("/etc/amq2api/amq2api.toml"),
            &format!(
                "[server]\nlisten = [\"127.0.0.1:0\"]\n[auth]\napi_keys = [\"sk-amq-0123456789abcdef\"]\n\
                 [upstream]\n{keys}[accounts]\nfile = \"accounts.toml\"\n"
            ),
            &crate::config::Env::default(),
        )
        .unwrap()
        .0
    }

    /// Credentials changed by a reload and changed back: the account resumes the chain the
    /// store holds for them (the file's token was rotated long ago), and the same change
    /// applied twice (a reload whose end was not recorded) keeps the chain it has.
    #[tokio::test]
    async fn credentials_changed_and_changed_back_resume_their_stored_chain() {
        let good = accounts(&["a1"]);
        let text = "[[account]]\nid = \"a1\"\nclient_id = \"c-a1\"\nclient_secret = \"typo\"\nrefresh_token = \"r-a1\"\n";
        let typo = crate::config::accounts::parse(std::path::Path::new("accounts.toml"), text).unwrap().0;
        let (emu, pool) = pool_with_a1(Arc::new(Flaky::default())).await;
        let a = pool.get("a1").unwrap();
        pool.access_token(&a, None).await.unwrap();
        assert_eq!(emu.stats().refreshes, 1, "r-a1 rotated: the file's token is dead now");

        pool.apply(&typo, &good.diff(&typo)).await;
        pool.apply(&good, &typo.diff(&good)).await;
        let token = pool.access_token(&a, None).await;
        assert!(token.is_ok(), "the stored chain was not resumed: {token:?}");
        assert_eq!(emu.stats().refresh_failures, 0);
        assert_eq!(a.state().state, State::Active);

        // The change back applied a second time: nothing to reset, the token stays.
        let refreshes = emu.stats().refreshes;
        pool.apply(&good, &typo.diff(&good)).await;
        assert_eq!(pool.access_token(&a, None).await.unwrap().expose(), token.unwrap().expose());
        assert_eq!(emu.stats().refreshes, refreshes, "a chain of the same credentials was reset");
    }

    /// The file brings back a refresh token the account's chain holds or has rotated away
    /// from (`amqctl export` written over the accounts file, some rotations later): the chain
    /// goes on; restarting from that token would meet `invalid_grant`.
    #[tokio::test]
    async fn a_file_with_a_token_of_the_chains_past_continues_the_chain() {
        let sink = Arc::new(Flaky::default());
        let (emu, pool) = pool_with_a1(sink.clone()).await;
        let a = pool.get("a1").unwrap();
        let mut seen = Vec::new();
        for _ in 0..3 {
            pool.refresh_tokens(&a, a.tokens.current_access().map(|x| x.token).as_ref()).await.unwrap();
            seen.push(emu.live_refresh_token("c-a1").unwrap());
        }
        let file = |token: &str| {
            let text = format!(
                "[[account]]\nid = \"a1\"\nclient_id = \"c-a1\"\nclient_secret = \"s-a1\"\nrefresh_token = \"{token}\"\n"
            );
            crate::config::accounts::parse(std::path::Path::new("accounts.toml"), &text).unwrap().0
        };
        let mut before = accounts(&["a1"]);
        // An export taken one rotation ago, then one of the head itself.
        for token in [&seen[1], &seen[2]] {
            let next = file(token);
            let applied = pool.apply(&next, &before.diff(&next)).await;
            assert!(applied.refused.is_empty() && applied.deferred.is_empty());
            // Stored under the new entry's credentials: a restart finds it there.
            let fp = next.iter().next().unwrap().credentials_fingerprint();
            assert_eq!(
                sink.chains.lock().unwrap()["a1"].file_fingerprint,
                fp,
                "the relabelled chain was not stored"
            );
            assert!(pool.access_token(&a, None).await.is_ok());
            pool.refresh_tokens(&a, a.tokens.current_access().map(|x| x.token).as_ref()).await.unwrap();
            before = next;
        }
        assert_eq!(emu.stats().refresh_failures, 0, "the chain restarted from a dead token");
        assert_eq!(a.state().state, State::Active);
        // A token the chain never held is new credentials: the chain restarts from it.
        emu.add_account("c-a1", "s-a1", "r-fresh");
        let next = file("r-fresh");
        pool.apply(&next, &before.diff(&next)).await;
        assert_eq!(a.tokens.chain().await.refresh_token.expose(), "r-fresh");
    }

    /// An account renamed away while a request still holds it, then renamed back: the old
    /// holder no longer rotates the chain it gave away, and the name it comes back to resumes
    /// the chain the other name carried on (renamed back, it would otherwise hold the token it
    /// had when it left, dead since).
    #[tokio::test]
    async fn an_account_renamed_away_and_back_while_held_keeps_one_chain() {
        let (emu, pool) = pool_with_a1(Arc::new(Flaky::default())).await;
        let named = |id: &str| {
            let text = format!(
                "[[account]]\nid = \"{id}\"\nclient_id = \"c-a1\"\nclient_secret = \"s-a1\"\nrefresh_token = \"r-a1\"\n"
            );
            crate::config::accounts::parse(std::path::Path::new("accounts.toml"), &text).unwrap().0
        };
        let (first, second) = (named("a1"), named("b1"));
        let held = pool.get("a1").unwrap();
        pool.refresh_now(&held).await.unwrap();
        pool.apply(&second, &first.diff(&second)).await;
        // The request that still holds the old name: no token call of its own now.
        let r = pool.refresh_now(&held).await;
        assert!(matches!(&r, Err(RefreshError::NotAttempted(_))), "{r:?}");
        let b = pool.get("b1").unwrap();
        pool.refresh_now(&b).await.unwrap();
        pool.apply(&first, &second.diff(&first)).await;
        let back = pool.get("a1").unwrap();
        assert!(Arc::ptr_eq(&back, &held), "not the account that was held");
        assert_eq!(back.tokens.chain().await.refresh_token.expose(), emu.live_refresh_token("c-a1").unwrap());
        pool.refresh_now(&back).await.unwrap();
        assert_eq!(emu.stats().refresh_failures, 0, "a dead refresh token was presented");
    }

    /// `[cluster]`: a file that continues the chain, on a node that does not hold the account,
    /// relabels it in memory only (a write there would be fenced, and the change would wait
    /// until this node held the account and then write its stale chain over the holder's).
    #[tokio::test]
    async fn a_continued_chain_on_a_node_without_the_lease_is_relabelled_in_memory() {
        let (sink, emu, pool, a) = rotated_a1().await;
        let head = emu.live_refresh_token("c-a1").unwrap();
        pool.set_clustered(Duration::from_secs(1), Arc::new(Shared::default()));
        a.held_until.store(0, Ordering::SeqCst);
        let writes = sink.stored.lock().unwrap().len();
        let before = accounts(&["a1"]);
        let text = format!(
            "[[account]]\nid = \"a1\"\nclient_id = \"c-a1\"\nclient_secret = \"s-a1\"\nrefresh_token = \"{head}\"\n"
        );
        let next = crate::config::accounts::parse(std::path::Path::new("accounts.toml"), &text).unwrap().0;
        let applied = pool.apply(&next, &before.diff(&next)).await;
        assert!(applied.deferred.is_empty(), "{applied:?}");
        assert_eq!(sink.stored.lock().unwrap().len(), writes, "a node without the lease wrote the chain");
        let fp = next.iter().next().unwrap().credentials_fingerprint();
        assert_eq!(a.tokens.chain().await.file_fingerprint, fp);
        assert_eq!(a.tokens.chain().await.refresh_token.expose(), head);
    }

    /// An account renamed while its rotated refresh token cannot be stored (a full disk): the
    /// new name takes the chain along, unsaved, and stores it under its own id once the store
    /// works; the old name no longer holds it, so it never writes it. Renamed back and forth
    /// meanwhile, the chain follows the name. Before, the new name started from the file's
    /// token, dead since the first rotation (`invalid_grant`).
    #[tokio::test]
    async fn an_account_renamed_while_its_token_is_unsaved_takes_the_chain_along() {
        // One rotation stored, the next one not: the chain it replaced is not the file's.
        let (sink, emu, pool, held) = rotated_a1().await;
        sink.failing.store(true, Ordering::SeqCst);
        let r = pool.refresh_now(&held).await;
        assert!(matches!(r, Err(RefreshError::NotStored(_))), "{r:?}");
        let live = emu.live_refresh_token("c-a1").unwrap();
        let named = |id: &str| {
            let text = format!(
                "[[account]]\nid = \"{id}\"\nclient_id = \"c-a1\"\nclient_secret = \"s-a1\"\nrefresh_token = \"r-a1\"\n"
            );
            crate::config::accounts::parse(std::path::Path::new("accounts.toml"), &text).unwrap().0
        };
        let (first, second) = (named("a1"), named("b1"));
        let moved = |to: &Arc<Account>, from: &Arc<Account>| {
            assert!(to.tokens.has_unsaved(), "{} does not hold the unsaved chain", to.id);
            assert!(!from.tokens.has_unsaved(), "{} still holds the unsaved chain", from.id);
        };
        pool.apply(&second, &first.diff(&second)).await;
        let b = pool.get("b1").unwrap();
        assert_eq!(b.tokens.chain().await.refresh_token.expose(), live, "started from the file's token");
        moved(&b, &held);
        // Renamed back while the store still fails, and away again: the chain follows.
        pool.apply(&first, &second.diff(&first)).await;
        let back = pool.get("a1").unwrap();
        assert!(Arc::ptr_eq(&back, &held));
        assert_eq!(back.tokens.chain().await.refresh_token.expose(), live);
        moved(&back, &b);
        pool.apply(&second, &first.diff(&second)).await;
        assert!(Arc::ptr_eq(&pool.get("b1").unwrap(), &b));
        moved(&b, &held);
        // The store works again: the chain is stored under the new id, and only there.
        sink.failing.store(false, Ordering::SeqCst);
        b.set_refresh_wait(None);
        pool.access_token(&b, None).await.unwrap();
        assert_eq!(sink.chains.lock().unwrap()["b1"].refresh_token.expose(), live);
        assert_ne!(sink.chains.lock().unwrap()["a1"].refresh_token.expose(), live);
        pool.refresh_now(&b).await.unwrap();
        assert_eq!(emu.stats().refresh_failures, 0, "a dead refresh token was presented");
    }

    /// Access tokens that live no longer than `refresh_before_expiry_secs` (300 s by default)
    /// are refreshed at half their lifetime, not on every pass of the refresher: before, each
    /// such account rotated its refresh token once a second.
    #[tokio::test]
    async fn short_lived_tokens_are_not_refreshed_on_every_pass() {
        let opts = crate::emulator::EmulatorOptions {
            access_token_ttl: Duration::from_secs(4),
            ..Default::default()
        };
        let emu = crate::emulator::Emulator::start(opts).await.unwrap();
        emu.add_account("c-a1", "s-a1", "r-a1");
        let pool = pool_of(&config_for(&emu), &["a1"], Arc::new(Flaky::default()));
        for _ in 0..12 {
            pool.refresh_due();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(emu.stats().refreshes, 1, "refreshed on every pass");
        // Past half its lifetime, it is due again.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let t0 = Instant::now();
        while emu.stats().refreshes < 2 {
            assert!(t0.elapsed() < Duration::from_secs(5), "never refreshed again");
            pool.refresh_due();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// New credentials in the file while a rotated refresh token of the current ones is held
    /// unsaved (the store fails): the change waits, and the held token is kept; once the
    /// store works, the change applies.
    #[tokio::test]
    async fn new_credentials_wait_while_a_rotated_token_is_unsaved() {
        let sink = Arc::new(Flaky::default());
        let (emu, pool) = pool_with_a1(sink.clone()).await;
        let a = pool.get("a1").unwrap();
        sink.failing.store(true, Ordering::SeqCst);
        let r = pool.access_token(&a, None).await;
        assert!(matches!(r, Err(RefreshError::NotStored(_))), "{r:?}");
        let held = a.tokens.chain().await.refresh_token.expose().to_owned();
        let good = accounts(&["a1"]);
        let text = "[[account]]\nid = \"a1\"\nclient_id = \"c-a1\"\nclient_secret = \"s-a1-new\"\nrefresh_token = \"r-a1\"\n";
        let next = crate::config::accounts::parse(std::path::Path::new("accounts.toml"), text).unwrap().0;
        let applied = pool.apply(&next, &good.diff(&next)).await;
        assert_eq!(applied.deferred.len(), 1, "{applied:?}");
        assert!(applied.deferred[0].1.contains("cannot be stored"), "{applied:?}");
        assert_eq!(a.tokens.chain().await.refresh_token.expose(), held, "the only live token was dropped");
        assert!(a.tokens.has_unsaved());
        // The store is back: the held token is stored first, then the change applies.
        sink.failing.store(false, Ordering::SeqCst);
        let applied = pool.apply(&next, &good.diff(&next)).await;
        assert!(applied.deferred.is_empty(), "{applied:?}");
        assert_eq!(sink.chains.lock().unwrap()["a1"].refresh_token.expose(), held);
        assert_eq!(a.spec().credentials_fingerprint(), next.iter().next().unwrap().credentials_fingerprint());
        assert_eq!(emu.stats().refresh_failures, 0);
    }

    /// An account made invalid by a refused refresh whose problem was elsewhere (a wrong auth
    /// region, fixed since; a newer chain in the store): a refresh that works (`amqctl
    /// refresh`) makes it active again, without new credentials.
    #[tokio::test]
    async fn a_refresh_that_works_makes_an_invalid_account_active() {
        let (emu, pool) = pool_with_a1(Arc::new(Flaky::default())).await;
        let a = pool.get("a1").unwrap();
        // Made invalid by the chat API (access denied): a refresh proves nothing about that.
        pool.apply_failure(&a, &UpstreamFailure::AccessDenied { message: "not authorized".into() });
        pool.refresh_now(&a).await.unwrap();
        assert_eq!(a.state().state, State::Invalid);
        // Made invalid by a refused refresh: a refresh that works clears it.
        pool.set_state(&a, State::Invalid, None, Some("client registration rejected: wrong region".into()));
        a.invalid_by_refresh.store(true, Ordering::SeqCst);
        assert!(!a.usable(SystemTime::now()));
        pool.refresh_now(&a).await.unwrap();
        assert_eq!(a.state().state, State::Active);
        assert!(a.usable(SystemTime::now()));
        assert_eq!(emu.stats().refresh_failures, 0);
    }

    /// A token endpoint that fails (an outage): the callers that waited for the failed refresh
    /// get its error, and requests do not ask again until the backoff is over (the account is
    /// passed by meanwhile); a forced refresh (`amqctl refresh`) still asks.
    #[tokio::test]
    async fn a_failed_refresh_is_not_retried_by_every_caller() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let down = format!("http://{}/token", listener.local_addr().unwrap());
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = calls.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    let _ = s.read(&mut buf).await;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let _ = s
                        .write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .await;
                });
            }
        });
        let emu =
            crate::emulator::Emulator::start(crate::emulator::EmulatorOptions::default()).await.unwrap();
        emu.add_account("c-a1", "s-a1", "r-a1");
        let cfg =
            config_with_upstream(&crate::demo::upstream_keys(&emu).replace(&emu.token_endpoint(), &down));
        let pool = pool_of(&cfg, &["a1"], Arc::new(Flaky::default()));
        let a = pool.get("a1").unwrap();
        let waiting: Vec<_> = (0..5)
            .map(|_| {
                let (pool, a) = (pool.clone(), a.clone());
                tokio::spawn(async move { pool.access_token(&a, None).await })
            })
            .collect();
        for w in waiting {
            let r = w.await.unwrap();
            assert!(matches!(&r, Err(RefreshError::Transient(_))), "{r:?}");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1, "each waiting caller asked the token endpoint again");
        // One failure, counted once: the wait is the first step's (2 s, ±25 %), not five steps'.
        assert_eq!(a.tokens.consecutive_failures(), 1);
        let wait = a.refresh_wait_until_ms.load(Ordering::SeqCst).saturating_sub(unix_ms(SystemTime::now()));
        assert!(wait > 0 && wait <= 2_500, "waits {wait} ms after one failed refresh");
        let r = pool.access_token(&a, None).await;
        assert!(matches!(&r, Err(RefreshError::NotAttempted(m)) if m.contains("next try")), "{r:?}");
        assert_eq!(calls.load(Ordering::SeqCst), 1, "a request asked during the backoff");
        assert!(!a.usable(SystemTime::now()), "an account with no token, waiting to refresh, is picked");
        assert!(pool.refresh_now(&a).await.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 2, "a forced refresh did not ask");
    }

    /// A refresh that finds the account's credentials and its chain from two versions of the
    /// file (a reload between writing the one and resetting the other) does not call the token
    /// endpoint with a mismatched pair, and does not mark the account invalid.
    #[tokio::test]
    async fn a_refresh_between_new_credentials_and_their_chain_waits_for_the_chain() {
        let (emu, pool) = pool_with_a1(Arc::new(Flaky::default())).await;
        let a = pool.get("a1").unwrap();
        let text = "[[account]]\nid = \"a1\"\nclient_id = \"c-a1\"\nclient_secret = \"s-a1\"\nrefresh_token = \"r-new\"\n";
        let next = crate::config::accounts::parse(std::path::Path::new("accounts.toml"), text).unwrap().0;
        // The new credentials are in; the chain's reset has not run yet.
        *a.spec.write().unwrap() = next.iter().next().unwrap().clone();
        let r = pool.access_token(&a, None).await;
        assert!(matches!(&r, Err(e) if !e.is_permanent()), "{r:?}");
        assert_eq!(emu.stats().refreshes + emu.stats().refresh_failures, 0, "the token endpoint was called");
        assert_ne!(a.state().state, State::Invalid);
    }

    /// An account removed while its rotated token is held in memory (the store failed) and
    /// added back is that same account again: its chain goes on, no second one starts from
    /// the file's (dead) token.
    #[tokio::test]
    async fn an_account_added_back_resumes_its_unsaved_chain() {
        let (one, none) = (accounts(&["a1"]), accounts(&[]));
        let sink = Arc::new(Flaky::default());
        sink.failing.store(true, Ordering::SeqCst);
        let (emu, pool) = pool_with_a1(sink.clone()).await;
        let a = pool.get("a1").unwrap();
        let r = pool.access_token(&a, None).await;
        assert!(matches!(r, Err(RefreshError::NotStored(_))), "{r:?}");
        pool.apply(&none, &one.diff(&none)).await;
        assert!(pool.persistence_problem().is_some());
        drop(a);
        assert!(pool.apply(&one, &none.diff(&one)).await.refused.is_empty());
        let back = pool.get("a1").unwrap();
        assert!(back.tokens.has_unsaved(), "a new account from the file's token, not the one removed");
        sink.failing.store(false, Ordering::SeqCst);
        let token = pool.access_token(&back, None).await;
        assert!(token.is_ok(), "{token:?}");
        assert_eq!(emu.stats().refreshes, 1, "the held chain was stored, not rotated again");
        assert_eq!(emu.stats().refresh_failures, 0);
        assert_eq!(sink.stored.lock().unwrap().len(), 1);
        assert!(pool.persistence_problem().is_none());
        assert_eq!(pool.accounts().len(), 1);
    }

    /// A reload removes an account while its refresh is in flight; the refresh rotates the
    /// token and cannot store it. The rotated token is the only live one: it must be kept and
    /// stored once the disk is back, not dropped with the account.
    #[tokio::test]
    async fn a_token_rotated_after_its_account_was_removed_is_still_stored() {
        let (one, none) = (accounts(&["a1"]), accounts(&[]));
        let sink = Arc::new(Flaky::default());
        sink.failing.store(true, Ordering::SeqCst);
        // A slow token endpoint: the refresh is in flight (the token call sent, the token
        // rotated upstream) when the account is removed. (A removed account starts no token
        // call: a refresh still waiting for its slot then gives up.)
        let opts = crate::emulator::EmulatorOptions {
            token_delay: Duration::from_millis(400),
            ..Default::default()
        };
        let emu = crate::emulator::Emulator::start(opts).await.unwrap();
        emu.add_account("c-a1", "s-a1", "r-a1");
        let pool = pool_of(&config_for(&emu), &["a1"], sink.clone());
        let a = pool.get("a1").unwrap();
        let refresh = tokio::spawn({
            let (pool, a) = (pool.clone(), a.clone());
            async move { pool.access_token(&a, None).await }
        });
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(emu.stats().refreshes, 1, "the token call is in flight");
        assert!(pool.apply(&none, &one.diff(&none)).await.refused.is_empty());
        assert!(pool.get("a1").is_none());
        assert!(pool.persistence_problem().is_none(), "nothing was unsaved when it was removed");
        let r = refresh.await.unwrap();
        assert!(matches!(r, Err(RefreshError::NotStored(_))), "{r:?}");
        assert_eq!(emu.stats().refreshes, 1, "the token was rotated upstream");
        let problem = pool.persistence_problem().expect("the unsaved rotated token is reported");
        assert!(problem.contains("1 rotated refresh token"), "{problem}");

        // The disk is back: the background refresher stores it.
        sink.failing.store(false, Ordering::SeqCst);
        a.set_refresh_wait(None);
        let deadline = Instant::now() + Duration::from_secs(10);
        while sink.stored.lock().unwrap().is_empty() {
            assert!(Instant::now() < deadline, "the rotated token was never stored");
            pool.refresh_due();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let stored = sink.stored.lock().unwrap().clone();
        assert_eq!(stored.len(), 1, "{stored:?}");
        assert_eq!(stored[0].0, "a1");
        assert_ne!(stored[0].1, "r-a1", "the rotated successor, not the file's token");
        assert_eq!(emu.stats().refreshes, 1, "stored without another rotation");
        assert!(pool.persistence_problem().is_none());
    }

    /// `[cluster]`'s database as the pool sees it: every lease confirmed, one stored record.
    #[derive(Default)]
    struct Shared {
        record: Mutex<Option<crate::store::AccountRecord>>,
    }

    impl ClusterView for Shared {
        fn lease_left<'a>(
            &'a self,
            _: &'a str,
            _: Duration,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<bool, String>> + Send + 'a>> {
            Box::pin(std::future::ready(Ok(true)))
        }
        fn stored<'a>(
            &'a self,
            _: &'a str,
        ) -> std::pin::Pin<
            Box<
                dyn std::future::Future<Output = Result<Option<crate::store::AccountRecord>, String>>
                    + Send
                    + 'a,
            >,
        > {
            Box::pin(std::future::ready(Ok(self.record.lock().unwrap().clone())))
        }
    }

    /// An account renamed while the store cannot be read: the new id is not added, and the old
    /// one stays (serving, its chain with it) until the new one joins; then the new id takes
    /// the chain. Before, the old id was removed at once, and the retry had no chain to give:
    /// the new id started from the file's long-rotated token.
    #[tokio::test]
    async fn a_rename_the_store_refuses_once_keeps_the_old_id_until_the_new_one_joins() {
        let (sink, emu, pool, a) = rotated_a1().await;
        let named = |id: &str| entries(&[id], &["a1"]);
        let (first, second) = (named("a1"), named("b1"));
        sink.unreadable.store(true, Ordering::SeqCst);
        let applied = pool.apply(&second, &first.diff(&second)).await;
        assert_eq!(applied.refused.len(), 1, "{applied:?}");
        assert_eq!(applied.kept.iter().map(|k| k.id.as_str()).collect::<Vec<_>>(), ["a1"], "{applied:?}");
        assert!(Arc::ptr_eq(&pool.get("a1").unwrap(), &a), "the old id left");
        assert!(pool.get("b1").is_none());
        pool.refresh_now(&a).await.unwrap();
        // The retry, as the reloader records it: the old id is still in the set.
        let recorded = entries(&["a1"], &["a1"]);
        let applied = pool.apply(&second, &recorded.diff(&second)).await;
        assert!(applied.refused.is_empty() && applied.kept.is_empty(), "{applied:?}");
        let b = pool.get("b1").unwrap();
        assert!(pool.get("a1").is_none());
        assert_eq!(b.tokens.chain().await.refresh_token.expose(), emu.live_refresh_token("c-a1").unwrap());
        pool.refresh_now(&b).await.unwrap();
        assert_eq!(emu.stats().refresh_failures, 0, "a dead refresh token was presented");
    }

    /// Entries `ids` with the credentials of the accounts `creds` (client `c-X`, secret `s-X`,
    /// refresh token `r-X`), pairwise.
    fn entries(ids: &[&str], creds: &[&str]) -> AccountSet {
        let text: String = ids
            .iter()
            .zip(creds)
            .map(|(id, c)| {
                format!("[[account]]\nid = \"{id}\"\nclient_id = \"c-{c}\"\nclient_secret = \"s-{c}\"\nrefresh_token = \"r-{c}\"\n")
            })
            .collect();
        crate::config::accounts::parse(std::path::Path::new("accounts.toml"), &text).unwrap().0
    }

    /// Ids swapped or shifted in the file (`{a1: A, b1: B}` become `{b1: A, c1: B}`), both
    /// chains rotated: live, the change waits and the new entry is not added (applied, `b1`
    /// restarted from A's dead file token and dropped B's live chain, and `c1` started from B's
    /// dead one); at a restart each chain moves with its credentials, stored under its new id
    /// before the daemon serves, and both refresh.
    #[tokio::test]
    async fn ids_swapped_in_the_file_keep_both_chains() {
        let sink = Arc::new(Flaky::default());
        let emu =
            crate::emulator::Emulator::start(crate::emulator::EmulatorOptions::default()).await.unwrap();
        for c in ["a1", "b1"] {
            emu.add_account(&format!("c-{c}"), &format!("s-{c}"), &format!("r-{c}"));
        }
        let before = entries(&["a1", "b1"], &["a1", "b1"]);
        let client = UpstreamClient::new(&config_for(&emu).upstream).unwrap();
        let pool = Pool::new(
            &before,
            BTreeMap::new(),
            &config_for(&emu).accounts,
            config_for(&emu).upstream,
            client,
            sink.clone(),
        );
        for id in ["a1", "b1"] {
            let a = pool.get(id).unwrap();
            pool.refresh_now(&a).await.unwrap();
        }
        let live = |c: &str| emu.live_refresh_token(&format!("c-{c}")).unwrap();
        let after = entries(&["b1", "c1"], &["a1", "b1"]);
        let applied = pool.apply(&after, &before.diff(&after)).await;
        assert!(
            applied.deferred.iter().any(|(id, why)| id.as_str() == "b1" && why.contains("swapped")),
            "{applied:?}"
        );
        assert!(
            applied.refused.iter().any(|(id, why)| id.as_str() == "c1" && why.contains("swapped")),
            "{applied:?}"
        );
        assert_eq!(applied.kept.iter().map(|k| k.id.as_str()).collect::<Vec<_>>(), ["a1"], "{applied:?}");
        // The reloader's retry, from the set it recorded (a1 kept, b1 as it was): the same.
        let applied = pool.apply(&after, &before.diff(&after)).await;
        assert_eq!(
            (applied.deferred.len(), applied.refused.len(), applied.kept.len()),
            (1, 1, 1),
            "{applied:?}"
        );
        for (id, c) in [("a1", "a1"), ("b1", "b1")] {
            let a = pool.get(id).unwrap_or_else(|| panic!("{id} left"));
            assert_eq!(
                a.tokens.chain().await.refresh_token.expose(),
                live(c),
                "{id}'s live chain was dropped"
            );
            pool.refresh_now(&a).await.unwrap();
        }
        assert_eq!(emu.stats().refresh_failures, 0);
        // Shifted the other way, `{a1: A, b1: B}` to `{a1: B, b1: Z}`: both wait.
        let shifted = entries(&["a1", "b1"], &["b1", "z1"]);
        let applied = pool.apply(&shifted, &before.diff(&shifted)).await;
        let mut waiting: Vec<&str> = applied.deferred.iter().map(|(id, _)| id.as_str()).collect();
        waiting.sort();
        assert_eq!(waiting, ["a1", "b1"], "{applied:?}");
        // Two entries sharing credentials is no move: the change applies.
        let shared = entries(&["a1", "b1"], &["a1", "a1"]);
        let applied = pool.apply(&shared, &before.diff(&shared)).await;
        assert!(applied.deferred.is_empty(), "{applied:?}");

        // The restart: the store's records, the swapped file.
        let restored: BTreeMap<String, Restored> = sink
            .chains
            .lock()
            .unwrap()
            .iter()
            .map(|(id, c)| {
                let r = Restored {
                    chain: Some(c.clone()),
                    chain_updated_at: Some(SystemTime::now()),
                    ..Default::default()
                };
                (id.clone(), r)
            })
            .collect();
        let client = UpstreamClient::new(&config_for(&emu).upstream).unwrap();
        let pool = Pool::new(
            &after,
            restored,
            &config_for(&emu).accounts,
            config_for(&emu).upstream,
            client,
            sink.clone(),
        );
        pool.store_unsaved().await;
        assert_eq!(sink.chains.lock().unwrap()["b1"].refresh_token.expose(), live("a1"));
        assert_eq!(sink.chains.lock().unwrap()["c1"].refresh_token.expose(), live("b1"));
        for id in ["b1", "c1"] {
            let a = pool.get(id).unwrap();
            pool.refresh_now(&a).await.unwrap();
        }
        assert_eq!(emu.stats().refresh_failures, 0, "a dead refresh token was presented");
    }

    /// An account whose proxy fails is cooled down, with a growing backoff: it fails fast, so
    /// as the least busy it was picked again and again, each request spending an attempt on it.
    #[tokio::test]
    async fn an_account_whose_proxy_fails_is_cooled_down() {
        let (_sink, _emu, pool, a) = rotated_a1().await;
        let failure = UpstreamFailure::ProxyFailed { message: "cannot reach the proxy".into() };
        pool.apply_failure(&a, &failure);
        let st = a.state();
        assert_eq!(st.state, State::Cooling, "{:?}", st.reason);
        assert!(st.reason.as_deref().is_some_and(|r| r.contains("its proxy fails")), "{:?}", st.reason);
        let first = st.until.unwrap();
        pool.apply_failure(&a, &failure);
        assert!(a.state().until.unwrap() > first, "the backoff does not grow");
        assert!(failure.try_another_account());
    }

    /// `[cluster]` handover: the node that stored the account left it invalid by a refused
    /// refresh, and the chain stored with it works (another node stored it later). The new
    /// holder's `amqctl refresh` makes it active, as after a restart; before, it stayed
    /// invalid until `amqctl enable`, the refresh that worked notwithstanding.
    #[tokio::test]
    async fn an_account_adopted_invalid_by_a_refused_refresh_serves_once_a_refresh_works() {
        let (_sink, emu, pool, a) = rotated_a1().await;
        pool.set_clustered(Duration::from_secs(1), Arc::new(Shared::default()));
        let chain = a.tokens.chain().await;
        let state = StateInfo {
            state: State::Invalid,
            reason: Some("refresh token rejected: invalid_grant".into()),
            ..Default::default()
        };
        let restored = Restored { chain: Some(chain), state: Some(state), ..Default::default() };
        let seen = pool.chain_generation("a1");
        pool.adopt("a1", restored, seen).await;
        pool.hold("a1", mono_ms() + 3_600_000);
        assert_eq!(a.state().state, State::Invalid);
        pool.refresh_now(&a).await.unwrap();
        assert_eq!(a.state().state, State::Active, "a refresh that works left it invalid");
        assert_eq!(emu.stats().refresh_failures, 0);
    }

    /// `[cluster]` handover: two nodes that started at once each made the account a machine id;
    /// the new holder takes the one the previous holder stored (and the profile and endpoint
    /// it learned), so the service sees one installation whichever node serves the account.
    #[tokio::test]
    async fn an_adopted_account_keeps_the_machine_id_the_previous_holder_used() {
        let (sink, emu, pool, a) = rotated_a1().await;
        pool.set_clustered(Duration::from_secs(1), Arc::new(Shared::default()));
        let mine = a.agent().machine_id().to_owned();
        let theirs = crate::upstream::Agent::new_machine_id();
        assert_ne!(mine, theirs);
        let fingerprint = a.spec().credentials_fingerprint();
        let arn = "arn:aws:codewhisperer:us-east-1:111122223333:profile/LEARNEDELSEWHERE".to_owned();
        let identity = crate::store::IdentityRecord {
            machine_id: theirs.clone(),
            profile_arn: Some(arn.clone()),
            profile_for: Some(fingerprint),
            endpoint: Some("runtime".into()),
        };
        // A damaged record, or none, changes nothing, and this node's is handed back, for the
        // lease loop to store before the account serves (the next holder takes it over).
        let damaged = crate::store::IdentityRecord { machine_id: "short".into(), ..identity.clone() };
        let seen = pool.chain_generation("a1");
        for stored in [Some(damaged), None] {
            let restored = Restored { identity: stored, ..Default::default() };
            let own = pool.adopt("a1", restored, seen).await;
            assert_eq!(a.agent().machine_id(), mine);
            assert_eq!(own.map(|r| r.machine_id), Some(mine.clone()));
        }
        sink.identities.lock().unwrap().clear();
        let restored = Restored { identity: Some(identity), ..Default::default() };
        assert!(pool.adopt("a1", restored, seen).await.is_none(), "nothing of its own to store");
        pool.hold("a1", mono_ms() + 3_600_000);
        assert_eq!(a.agent().machine_id(), theirs);
        assert_eq!(a.identity().learned_profile(&fingerprint), Some(arn));
        assert_eq!(a.identity().endpoint(), Some(Role::Runtime));
        assert_eq!(a.identity().record().machine_id, theirs, "what this node stores next");
        assert!(sink.identities.lock().unwrap().is_empty(), "the stored identity was written again");
        pool.refresh_now(&a).await.unwrap();
        let ua = emu.stats_for("c-a1").refresh_user_agent.unwrap_or_default();
        assert!(ua.contains(&theirs), "the refresh went out as {ua}");
        assert!(!ua.contains(&mine), "{ua}");
    }

    /// Node C rotated the refresh token under a lease it then lost, and stores the new one
    /// afterwards (no later holder had stored one). Node B took the lease with the token C
    /// rotated from: refused before C's token is stored, it is invalid until its lease loop
    /// finds the newer chain, and then serves again. Node D, refused while the store already
    /// holds a newer chain, takes it in the same refresh: never invalid.
    #[tokio::test]
    async fn a_refused_refresh_token_gives_way_to_a_newer_stored_one() {
        let (emu, _) = pool_with_a1(Arc::new(Flaky::default())).await;
        let cfg = config_for(&emu);
        let node = |view: Arc<Shared>| {
            let pool = pool_of(&cfg, &["a1"], Arc::new(Flaky::default()));
            pool.set_clustered(Duration::from_secs(1), view);
            pool.hold("a1", mono_ms() + 3_600_000);
            pool
        };
        let view = Arc::new(Shared::default());
        let (b_pool, c_pool) = (node(view.clone()), node(view.clone()));

        // C refreshes first, with the file's token: it rotates (r-a1 is dead now), and C's
        // lease is then lost before the new token is stored.
        let c = c_pool.get("a1").unwrap();
        c_pool.access_token(&c, None).await.unwrap();

        // B loaded the file's token (dead). Nothing newer is stored yet: B is invalid too.
        let b = b_pool.get("a1").unwrap();
        let r = b_pool.access_token(&b, None).await;
        assert!(matches!(&r, Err(e) if e.is_permanent()), "{r:?}");
        assert_eq!(b.state().state, State::Invalid);
        b_pool.revive_from_store().await;
        assert_eq!(b.state().state, State::Invalid, "revived with nothing newer stored");

        // C's chain is stored now (C rotated it under a lease it then lost).
        let chain = c.tokens.chain().await;
        let access = c.tokens.current_access().unwrap();
        *view.record.lock().unwrap() = Some(record_of(&chain, Some(&access)));
        // B's lease loop finds it: B serves again, on C's token, without a refresh.
        let refreshes = emu.stats().refreshes;
        b_pool.revive_from_store().await;
        assert_eq!(b.state().state, State::Active);
        assert_eq!(b_pool.access_token(&b, None).await.unwrap().expose(), access.token.expose());
        assert_eq!(emu.stats().refreshes, refreshes);

        // A forced refresh on B now rotates C's token, and works.
        let fresh = b_pool.refresh_now(&b).await.unwrap();
        assert_ne!(fresh.expose(), access.token.expose());
        assert_eq!(emu.stats().refreshes, refreshes + 1);

        // A fourth node refused with the file's token while the store holds B's chain takes it
        // in the same refresh (no invalid state in between).
        let chain = b.tokens.chain().await;
        let access = b.tokens.current_access().unwrap();
        *view.record.lock().unwrap() = Some(record_of(&chain, Some(&access)));
        let d_pool = node(view.clone());
        let d = d_pool.get("a1").unwrap();
        let token = d_pool.access_token(&d, None).await;
        assert_eq!(token.unwrap().expose(), access.token.expose());
        assert_eq!(d.state().state, State::Active);
    }

    /// A record holding `chain` (and `access`).
    fn record_of(chain: &Chain, access: Option<&Access>) -> crate::store::AccountRecord {
        crate::store::AccountRecord {
            tokens: Some(super::super::persist::token_record(chain, access)),
            ..Default::default()
        }
    }

    /// A token rotated here and not stored (the store failed), and then the lease lost: it is
    /// still stored when the store answers (the retry runs on an account no longer held), and
    /// it gives way when the store shows that the new holder stored a token of its own.
    #[tokio::test]
    async fn a_token_rotated_under_a_lost_lease_is_stored_or_superseded() {
        let emu =
            crate::emulator::Emulator::start(crate::emulator::EmulatorOptions::default()).await.unwrap();
        emu.add_account("c-a1", "s-a1", "r-a1");
        emu.add_account("c-a2", "s-a2", "r-a2");
        let cfg = config_for(&emu);
        let sink = Arc::new(Flaky::default());
        sink.failing.store(true, Ordering::SeqCst);
        let pool = pool_of(&cfg, &["a1", "a2"], sink.clone());
        let view = Arc::new(Shared::default());
        pool.set_clustered(Duration::from_secs(1), view.clone());
        let (a1, a2) = (pool.get("a1").unwrap(), pool.get("a2").unwrap());
        for a in [&a1, &a2] {
            pool.hold(a.id.as_str(), mono_ms() + 3_600_000);
            let before = a.tokens.chain().await;
            let r = pool.access_token(a, None).await;
            assert!(matches!(r, Err(RefreshError::NotStored(_))), "{r:?}");
            assert!(a.tokens.has_unsaved());
            // The lease is lost; the store still holds the token rotated from.
            pool.hold(a.id.as_str(), 0);
            *view.record.lock().unwrap() = Some(record_of(&before, None));
            // Still not stored: kept, retried.
            pool.access_token(a, None).await.unwrap_err();
            assert!(a.tokens.has_unsaved(), "the only live token was dropped");
        }
        // a2: the new holder stored a token of its own meanwhile. The one rotated here gives way.
        let theirs = Chain {
            refresh_token: Secret::new("r-a2-the-new-holders"),
            rotated: true,
            file_fingerprint: a2.tokens.chain().await.file_fingerprint,
        };
        *view.record.lock().unwrap() = Some(record_of(&theirs, None));
        let r = pool.access_token(&a2, None).await;
        assert!(matches!(&r, Err(RefreshError::NotAttempted(m)) if m.contains("newer token")), "{r:?}");
        assert!(!a2.tokens.has_unsaved());
        assert_eq!(a2.tokens.chain().await.refresh_token.expose(), "r-a2-the-new-holders");

        // a1: the store answers again, and the background refresher stores the token although
        // the account is not held here.
        sink.failing.store(false, Ordering::SeqCst);
        a1.set_refresh_wait(None);
        let deadline = Instant::now() + Duration::from_secs(10);
        while a1.tokens.has_unsaved() {
            assert!(Instant::now() < deadline, "the rotated token was never stored");
            pool.refresh_due();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let stored = sink.stored.lock().unwrap().clone();
        assert_eq!(stored.len(), 1, "{stored:?}");
        assert_eq!(stored[0].0, "a1");
        assert_ne!(stored[0].1, "r-a1");
        assert_eq!(emu.stats().refreshes, 2, "one rotation each, nothing rotated again");
    }

    #[test]
    fn backoff_grows_and_caps() {
        let b1 = backoff(1, Duration::from_secs(10), Duration::from_secs(600));
        assert!(b1 >= Duration::from_millis(7500) && b1 <= Duration::from_millis(12_500));
        let b10 = backoff(10, Duration::from_secs(10), Duration::from_secs(600));
        assert!(b10 <= Duration::from_secs(750) && b10 >= Duration::from_secs(450));
    }
}
