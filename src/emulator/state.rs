//! The emulator's shared state: registered accounts of every kind, issued tokens, catalogs,
//! endpoint-role access, scripted behaviours, counters, the token generator and the reasoning
//! signer.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

use super::catalog::{ModelEntry, default_catalog};
use super::device::DeviceState;
use super::reasoning::Signer;
use super::script::Behaviour;
use super::{AccountKind, AccountStats, EmulatorOptions, Role, Stats};

/// Most distinct user agents kept per account.
const MAX_USER_AGENTS: usize = 64;

/// One registered account: an OIDC client, a Kiro social sign-in or a Kiro API key.
#[derive(Debug)]
pub(super) struct Account {
    pub kind: AccountKind,
    /// OIDC only.
    pub client_secret: String,
    /// The one refresh token that works now (OIDC, social); `None` once revoked, and always for
    /// an API key.
    pub refresh_token: Option<String>,
    /// With `rotation_grace`: the predecessor, valid until the current generation is first used.
    pub previous_refresh_token: Option<String>,
    /// Bumped by every refresh; access tokens remember theirs.
    pub generation: u64,
    /// API keys: revoked by [`Emulator::revoke_api_key`](super::Emulator::revoke_api_key).
    pub api_key_revoked: bool,
    /// The account's own profile ARN (IAM Identity Center, or a social account's from its
    /// refresh answer).
    pub profile_arn: Option<String>,
    /// `None`: the default catalog.
    pub catalog: Option<Vec<ModelEntry>>,
    /// Per-role overrides of the options' access rules.
    pub role_access: HashMap<Role, bool>,
    pub behaviour: Behaviour,
    /// Behaviours for the next requests, consumed one a request before `behaviour` applies.
    pub queued: VecDeque<Behaviour>,
    /// What `ListAvailableModels` / `ListAvailableProfiles` calls get (error behaviours only).
    pub listing_behaviour: Behaviour,
    pub stats: AccountStats,
}

impl Account {
    fn new(kind: AccountKind) -> Self {
        Account {
            kind,
            client_secret: String::new(),
            refresh_token: None,
            previous_refresh_token: None,
            generation: 0,
            api_key_revoked: false,
            profile_arn: None,
            catalog: None,
            role_access: HashMap::new(),
            behaviour: Behaviour::Normal,
            queued: VecDeque::new(),
            listing_behaviour: Behaviour::Normal,
            stats: AccountStats::default(),
        }
    }
}

#[derive(Debug)]
struct AccessToken {
    account: String,
    expires_at: Instant,
    generation: u64,
}

#[derive(Debug, Default)]
struct Inner {
    accounts: HashMap<String, Account>,
    access_tokens: HashMap<String, AccessToken>,
    disabled_roles: HashSet<Role>,
    stats: Stats,
    /// Refresh calls being answered, by client id (for [`Stats::overlapping_refreshes`]).
    refreshing: HashMap<String, u32>,
}

/// A refresh call being answered (from its body read to its answer sent).
pub(super) struct RefreshCall<'a> {
    shared: &'a Shared,
    client_id: String,
}

impl Drop for RefreshCall<'_> {
    fn drop(&mut self) {
        let mut inner = self.shared.lock();
        if let Some(n) = inner.refreshing.get_mut(&self.client_id) {
            *n -= 1;
            if *n == 0 {
                inner.refreshing.remove(&self.client_id);
            }
        }
    }
}

/// Why a refresh was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum RefreshError {
    InvalidClient,
    InvalidGrant,
}

/// What a successful refresh hands out.
#[derive(Debug)]
pub(super) struct Issued {
    /// The account the refresh token belonged to.
    pub account: String,
    pub access_token: String,
    pub expires_in: u64,
    pub refresh_token: Option<String>,
    pub profile_arn: Option<String>,
}

/// Who a bearer token (or API key) authenticates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Credential {
    pub account: String,
    pub kind: AccountKind,
}

/// Which kind of call a user agent came with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Channel {
    Chat,
    Refresh,
    Catalog,
    Profiles,
}

/// State shared by the server tasks and the [`Emulator`](super::Emulator) handle.
#[derive(Debug)]
pub(super) struct Shared {
    pub opts: EmulatorOptions,
    inner: Mutex<Inner>,
    ids: IdGen,
    signer: Signer,
    default_catalog: Vec<ModelEntry>,
    device: Mutex<DeviceState>,
}

impl Shared {
    pub fn new(opts: EmulatorOptions) -> Self {
        let ids = IdGen::new();
        let signer = Signer::new(ids.bytes("reasoning-secret"));
        let device = Mutex::new(DeviceState::new(opts.device_flow.clone()));
        Shared { opts, inner: Mutex::default(), ids, signer, default_catalog: default_catalog(), device }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind: keep serving.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The device-authorization flow's state.
    pub fn device(&self) -> MutexGuard<'_, DeviceState> {
        self.device.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A completed device authorization: the client becomes an OIDC account (its id the client
    /// id) with a fresh refresh token, and gets an access token.
    pub fn sign_in(&self, client_id: &str, client_secret: &str) -> Issued {
        let refresh = self.ids.refresh_token();
        let access_token = self.ids.access_token();
        let ttl = self.opts.access_token_ttl;
        let mut guard = self.lock();
        let inner = &mut *guard;
        let account = Self::register(inner, client_id, AccountKind::Oidc);
        account.client_secret = client_secret.to_owned();
        account.refresh_token = Some(refresh.clone());
        account.generation += 1;
        let generation = account.generation;
        inner.access_tokens.insert(
            access_token.clone(),
            AccessToken { account: client_id.to_owned(), expires_at: Instant::now() + ttl, generation },
        );
        Issued {
            account: client_id.to_owned(),
            access_token,
            expires_in: ttl.as_secs(),
            refresh_token: Some(refresh),
            profile_arn: None,
        }
    }

    pub fn ids(&self) -> &IdGen {
        &self.ids
    }

    pub fn signer(&self) -> &Signer {
        &self.signer
    }

    /// Registers (or re-registers) an account of `kind` under `id` and returns it for the
    /// kind-specific fields; a re-registered account keeps its behaviours, counters, catalog,
    /// profile and overrides.
    fn register<'a>(inner: &'a mut Inner, id: &str, kind: AccountKind) -> &'a mut Account {
        let account = inner.accounts.entry(id.to_owned()).or_insert_with(|| Account::new(kind));
        account.kind = kind;
        account.previous_refresh_token = None;
        account.api_key_revoked = false;
        account
    }

    pub fn add_account(&self, client_id: &str, client_secret: &str, refresh_token: &str) {
        let mut inner = self.lock();
        let account = Self::register(&mut inner, client_id, AccountKind::Oidc);
        account.client_secret = client_secret.to_owned();
        account.refresh_token = Some(refresh_token.to_owned());
    }

    pub fn add_social_account(&self, id: &str, refresh_token: &str, profile_arn: Option<&str>) {
        let mut inner = self.lock();
        let account = Self::register(&mut inner, id, AccountKind::Social);
        account.client_secret.clear();
        account.refresh_token = Some(refresh_token.to_owned());
        account.profile_arn = profile_arn.map(str::to_owned);
    }

    pub fn add_api_key(&self, key: &str) {
        let mut inner = self.lock();
        let account = Self::register(&mut inner, key, AccountKind::ApiKey);
        account.client_secret.clear();
        account.refresh_token = None;
    }

    /// Runs `f` on the account, if it is registered.
    pub fn with_account<T>(&self, id: &str, f: impl FnOnce(&mut Account) -> T) -> Option<T> {
        let mut inner = self.lock();
        let found = inner.accounts.get_mut(id).map(f);
        if found.is_none() {
            tracing::warn!(account = id, "emulator: no such account");
        }
        found
    }

    pub fn expire_access_tokens(&self, id: &str) {
        let now = Instant::now();
        let mut inner = self.lock();
        for token in inner.access_tokens.values_mut().filter(|t| t.account == id) {
            token.expires_at = now;
        }
    }

    /// OIDC `CreateToken` with a refresh token.
    pub fn refresh(
        &self,
        client_id: &str,
        client_secret: &str,
        refresh_token: &str,
    ) -> Result<Issued, RefreshError> {
        self.grant(refresh_token, |inner| match inner.accounts.get(client_id) {
            Some(account) if account.kind == AccountKind::Oidc && account.client_secret == client_secret => {
                Ok(client_id.to_owned())
            }
            _ => Err(RefreshError::InvalidClient),
        })
    }

    /// Kiro `refreshToken`: the account is the one whose chain holds `refresh_token`.
    pub fn refresh_social(&self, refresh_token: &str) -> Result<Issued, RefreshError> {
        let grace = self.opts.rotation_grace;
        self.grant(refresh_token, |inner| {
            inner
                .accounts
                .iter()
                .find(|(_, a)| {
                    a.kind == AccountKind::Social
                        && (a.refresh_token.as_deref() == Some(refresh_token)
                            || (grace && a.previous_refresh_token.as_deref() == Some(refresh_token)))
                })
                .map(|(id, _)| id.clone())
                .ok_or(RefreshError::InvalidGrant)
        })
    }

    /// Refreshes the account `find` names with `refresh_token`: checks the token against the
    /// account's chain, rotates it as the options say, and issues an access token.
    fn grant(
        &self,
        refresh_token: &str,
        find: impl FnOnce(&Inner) -> Result<String, RefreshError>,
    ) -> Result<Issued, RefreshError> {
        let ttl = self.opts.access_token_ttl;
        let rotate = self.opts.rotate_refresh_tokens;
        let grace = self.opts.rotation_grace;
        let access_token = self.ids.access_token();
        let new_refresh = rotate.then(|| self.ids.refresh_token());
        let mut guard = self.lock();
        let inner = &mut *guard;
        let result = find(inner).and_then(|id| {
            let account = inner.accounts.get_mut(&id).ok_or(RefreshError::InvalidClient)?;
            let presented_current = account.refresh_token.as_deref() == Some(refresh_token);
            let presented_previous =
                grace && account.previous_refresh_token.as_deref() == Some(refresh_token);
            if !presented_current && !presented_previous {
                return Err(RefreshError::InvalidGrant);
            }
            if let Some(new) = &new_refresh {
                // Presenting the current token confirms it: with grace it becomes the
                // predecessor. Presenting the predecessor (the successor was never stored)
                // keeps it as the predecessor.
                if grace && presented_current {
                    account.previous_refresh_token = account.refresh_token.take();
                }
                account.refresh_token = Some(new.clone());
            }
            account.generation += 1;
            account.stats.refreshes += 1;
            Ok((id, account.generation, account.profile_arn.clone()))
        });
        match result {
            Ok((account, generation, profile_arn)) => {
                inner.stats.refreshes += 1;
                let expires_at = Instant::now() + ttl;
                inner.access_tokens.insert(
                    access_token.clone(),
                    AccessToken { account: account.clone(), expires_at, generation },
                );
                Ok(Issued {
                    account,
                    access_token,
                    expires_in: ttl.as_secs(),
                    refresh_token: new_refresh,
                    profile_arn,
                })
            }
            Err(e) => {
                inner.stats.refresh_failures += 1;
                Err(e)
            }
        }
    }

    /// Who `token` authenticates: an unexpired access token (OIDC or social), or a live API key
    /// sent with `tokentype: API_KEY` (`api_key_header`). An access token sent with that header
    /// authenticates nobody.
    pub fn resolve(&self, token: &str, api_key_header: bool) -> Option<Credential> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        if let Some(access) = inner.access_tokens.get(token) {
            if access.expires_at <= Instant::now() || api_key_header {
                return None;
            }
            let (id, generation) = (access.account.clone(), access.generation);
            let account = inner.accounts.get_mut(&id)?;
            // Using the newest access token confirms the newest refresh token: the grace ends.
            if account.generation == generation {
                account.previous_refresh_token = None;
            }
            return Some(Credential { account: id, kind: account.kind });
        }
        let account = inner.accounts.get(token)?;
        (account.kind == AccountKind::ApiKey && !account.api_key_revoked && api_key_header)
            .then(|| Credential { account: token.to_owned(), kind: AccountKind::ApiKey })
    }

    /// Whether `role` takes `credential`: the account's override, else the options' rule.
    pub fn accepts(&self, role: Role, credential: &Credential) -> bool {
        let inner = self.lock();
        if let Some(&accepted) =
            inner.accounts.get(&credential.account).and_then(|a| a.role_access.get(&role))
        {
            return accepted;
        }
        match (role, credential.kind) {
            (Role::AmazonQ, AccountKind::ApiKey) => self.opts.q_accepts_api_keys,
            (Role::Runtime, AccountKind::Oidc) => self.opts.runtime_accepts_oidc,
            _ => true,
        }
    }

    pub fn role_enabled(&self, role: Role) -> bool {
        !self.lock().disabled_roles.contains(&role)
    }

    pub fn set_role_enabled(&self, role: Role, enabled: bool) {
        let mut inner = self.lock();
        if enabled {
            inner.disabled_roles.remove(&role);
        } else {
            inner.disabled_roles.insert(role);
        }
    }

    /// The account's kind and own profile ARN.
    pub fn profile_of(&self, id: &str) -> Option<(AccountKind, Option<String>)> {
        self.lock().accounts.get(id).map(|a| (a.kind, a.profile_arn.clone()))
    }

    /// The account's catalog (the default one unless set).
    pub fn catalog_for(&self, id: &str) -> Vec<ModelEntry> {
        let inner = self.lock();
        match inner.accounts.get(id).and_then(|a| a.catalog.clone()) {
            Some(catalog) => catalog,
            None => self.default_catalog.clone(),
        }
    }

    /// The catalog entry of `model_id` for the account (its default model when `None`).
    pub fn model_for(&self, id: &str, model_id: Option<&str>) -> Option<ModelEntry> {
        let inner = self.lock();
        let catalog =
            inner.accounts.get(id).and_then(|a| a.catalog.as_ref()).unwrap_or(&self.default_catalog);
        match model_id {
            Some(model_id) => catalog.iter().find(|m| m.model_id == model_id).cloned(),
            None => catalog.first().cloned(),
        }
    }

    /// Remembers the user agent `id` sent with a call of `channel`.
    pub fn record_user_agent(&self, id: &str, channel: Channel, user_agent: Option<&str>) {
        let Some(user_agent) = user_agent else {
            return;
        };
        let mut inner = self.lock();
        let Some(account) = inner.accounts.get_mut(id) else {
            return;
        };
        let stats = &mut account.stats;
        let slot = match channel {
            Channel::Chat => &mut stats.chat_user_agent,
            Channel::Refresh => &mut stats.refresh_user_agent,
            Channel::Catalog | Channel::Profiles => &mut stats.catalog_user_agent,
        };
        *slot = Some(user_agent.to_owned());
        stats.last_user_agent = Some(user_agent.to_owned());
        if !stats.user_agents.iter().any(|ua| ua == user_agent) && stats.user_agents.len() < MAX_USER_AGENTS {
            stats.user_agents.push(user_agent.to_owned());
        }
    }

    /// Every user agent sent by more than one account, with those accounts (sorted).
    pub fn shared_user_agents(&self) -> Vec<(String, Vec<String>)> {
        let inner = self.lock();
        let mut by_agent: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for (id, account) in &inner.accounts {
            for ua in &account.stats.user_agents {
                by_agent.entry(ua).or_default().push(id.clone());
            }
        }
        by_agent
            .into_iter()
            .filter(|(_, ids)| ids.len() > 1)
            .map(|(ua, mut ids)| {
                ids.sort();
                (ua.to_owned(), ids)
            })
            .collect()
    }

    /// A refresh call for `client_id` begins: when another for the same account is still being
    /// answered, that is an overlapping refresh (two holders refreshing one account at once).
    pub(super) fn refresh_call(&self, client_id: &str) -> RefreshCall<'_> {
        let mut inner = self.lock();
        let n = inner.refreshing.entry(client_id.to_owned()).or_insert(0);
        *n += 1;
        if *n > 1 {
            inner.stats.overlapping_refreshes += 1;
        }
        RefreshCall { shared: self, client_id: client_id.to_owned() }
    }

    /// A `CreateToken` call refused before the account was looked at (malformed body, grant type).
    pub fn count_refresh_failure(&self) {
        self.lock().stats.refresh_failures += 1;
    }

    pub fn count_request(&self) {
        self.lock().stats.requests += 1;
    }

    pub fn count_malformed(&self) {
        self.lock().stats.rejected_malformed += 1;
    }

    /// Counts a connection seen carrying a second installation's calls.
    pub fn count_shared_connection(&self) {
        self.lock().stats.shared_connections += 1;
    }

    /// Counts a call `role` refused to take from the account.
    pub fn count_refused(&self, id: &str) {
        let mut inner = self.lock();
        inner.stats.refused += 1;
        if let Some(account) = inner.accounts.get_mut(id) {
            account.stats.refused += 1;
        }
    }

    /// Counts an authenticated chat request of the account, taken by `role`.
    pub fn count_account_request(&self, id: &str, role: Role) {
        if let Some(account) = self.lock().accounts.get_mut(id) {
            account.stats.requests += 1;
            if role == Role::Runtime {
                account.stats.runtime_requests += 1;
            }
        }
    }

    /// Counts an authenticated `ListAvailableModels` (`Channel::Catalog`) or
    /// `ListAvailableProfiles` (`Channel::Profiles`) call.
    pub fn count_listing(&self, id: &str, channel: Channel) {
        let mut inner = self.lock();
        let profiles = channel == Channel::Profiles;
        if profiles {
            inner.stats.profile_requests += 1;
        } else {
            inner.stats.catalog_requests += 1;
        }
        if let Some(account) = inner.accounts.get_mut(id) {
            if profiles {
                account.stats.profile_requests += 1;
            } else {
                account.stats.catalog_requests += 1;
            }
        }
    }

    /// Adds the credits of a `meteringEvent` sent to the account.
    pub fn add_credits(&self, id: &str, credits: f64) {
        if let Some(account) = self.lock().accounts.get_mut(id) {
            account.stats.credits += credits;
        }
    }

    /// Keeps the last request body the account sent.
    pub fn set_last_request(&self, id: &str, body: serde_json::Value) {
        if let Some(account) = self.lock().accounts.get_mut(id) {
            account.stats.last_request = Some(body);
        }
    }

    /// The behaviour for the account's next request (consuming a queued one).
    pub fn next_behaviour(&self, id: &str) -> Behaviour {
        let mut inner = self.lock();
        match inner.accounts.get_mut(id) {
            Some(account) => account.queued.pop_front().unwrap_or_else(|| account.behaviour.clone()),
            None => Behaviour::Normal,
        }
    }

    /// What the account's listing calls get.
    pub fn listing_behaviour(&self, id: &str) -> Behaviour {
        self.lock().accounts.get(id).map_or(Behaviour::Normal, |a| a.listing_behaviour.clone())
    }

    pub fn stream_opened(&self, id: &str) {
        let mut inner = self.lock();
        inner.stats.open_streams += 1;
        if let Some(account) = inner.accounts.get_mut(id) {
            account.stats.open_streams += 1;
        }
    }

    pub fn stream_closed(&self, id: &str, end: StreamEnd) {
        let mut inner = self.lock();
        inner.stats.open_streams = inner.stats.open_streams.saturating_sub(1);
        match end {
            StreamEnd::Completed => inner.stats.completed_streams += 1,
            StreamEnd::Cancelled => inner.stats.cancelled_streams += 1,
        }
        if let Some(account) = inner.accounts.get_mut(id) {
            account.stats.open_streams = account.stats.open_streams.saturating_sub(1);
        }
    }

    pub fn stats(&self) -> Stats {
        self.lock().stats.clone()
    }

    pub fn stats_for(&self, id: &str) -> AccountStats {
        self.lock().accounts.get(id).map(|a| a.stats.clone()).unwrap_or_default()
    }
}

/// How a stream ended, for the counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum StreamEnd {
    /// Written to the end of its script (scripted resets and corruptions included).
    Completed,
    /// The client went away before the end.
    Cancelled,
}

/// Random-looking identifiers: SHA-256 of a per-emulator random seed and a counter.
#[derive(Debug)]
pub(super) struct IdGen {
    seed: [u8; 16],
    counter: AtomicU64,
}

impl IdGen {
    fn new() -> Self {
        let mut seed = [0u8; 16];
        let state = RandomState::new();
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or(Duration::ZERO);
        seed[..8].copy_from_slice(&state.hash_one(now.as_nanos()).to_le_bytes());
        seed[8..].copy_from_slice(&RandomState::new().hash_one(std::process::id()).to_le_bytes());
        IdGen { seed, counter: AtomicU64::new(0) }
    }

    /// 32 fresh pseudo-random bytes.
    pub fn bytes(&self, label: &str) -> [u8; 32] {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let digest = Sha256::new()
            .chain_update(self.seed)
            .chain_update(n.to_le_bytes())
            .chain_update(label)
            .finalize();
        let mut out = [0u8; 32];
        out.copy_from_slice(&digest);
        out
    }

    fn b64(&self, label: &str, blocks: usize) -> String {
        let mut raw = Vec::with_capacity(32 * blocks);
        for _ in 0..blocks {
            raw.extend_from_slice(&self.bytes(label));
        }
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// An opaque access token (not a JWT: no dots), shaped like the service's `aoa…` tokens.
    pub fn access_token(&self) -> String {
        format!("aoa{}", self.b64("access", 4).replace(['-', '_'], "A"))
    }

    /// An opaque refresh token, shaped like the service's `aor…` tokens.
    pub fn refresh_token(&self) -> String {
        format!("aor{}", self.b64("refresh", 5).replace(['-', '_'], "B"))
    }

    /// A lowercase UUID-shaped id.
    pub fn uuid(&self) -> String {
        let b = self.bytes("uuid");
        let h = hex::encode(&b[..16]);
        format!("{}-{}-4{}-a{}-{}", &h[..8], &h[8..12], &h[13..16], &h[17..20], &h[20..32])
    }

    /// A tool-use id: `tooluse_` and 22 characters of `[a-zA-Z0-9_-]`.
    pub fn tool_use_id(&self) -> String {
        let b = self.bytes("tooluse");
        format!("tooluse_{}", &URL_SAFE_NO_PAD.encode(b)[..22])
    }
}
