//! The emulator's shared state: registered accounts, issued tokens, scripted behaviours, counters,
//! and the token generator.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

use super::script::Behaviour;
use super::{AccountStats, EmulatorOptions, Stats};

/// One registered OIDC client and its Amazon Q account.
#[derive(Debug)]
pub(super) struct Account {
    pub client_secret: String,
    /// The one refresh token that works now; `None` once revoked.
    pub refresh_token: Option<String>,
    /// With `rotation_grace`: the predecessor, valid until the current generation is first used.
    pub previous_refresh_token: Option<String>,
    /// Bumped by every refresh; access tokens remember theirs.
    pub generation: u64,
    pub behaviour: Behaviour,
    /// Behaviours for the next requests, consumed one a request before `behaviour` applies.
    pub queued: VecDeque<Behaviour>,
    pub stats: AccountStats,
}

#[derive(Debug)]
struct AccessToken {
    client_id: String,
    expires_at: Instant,
    generation: u64,
}

#[derive(Debug, Default)]
struct Inner {
    accounts: HashMap<String, Account>,
    access_tokens: HashMap<String, AccessToken>,
    stats: Stats,
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
    pub access_token: String,
    pub expires_in: u64,
    pub refresh_token: Option<String>,
}

/// State shared by the server tasks and the [`Emulator`](super::Emulator) handle.
#[derive(Debug)]
pub(super) struct Shared {
    pub opts: EmulatorOptions,
    inner: Mutex<Inner>,
    ids: IdGen,
}

impl Shared {
    pub fn new(opts: EmulatorOptions) -> Self {
        Shared { opts, inner: Mutex::default(), ids: IdGen::new() }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind: keep serving.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn ids(&self) -> &IdGen {
        &self.ids
    }

    pub fn add_account(&self, client_id: &str, client_secret: &str, refresh_token: &str) {
        let mut inner = self.lock();
        let account = inner.accounts.entry(client_id.to_owned()).or_insert_with(|| Account {
            client_secret: String::new(),
            refresh_token: None,
            previous_refresh_token: None,
            generation: 0,
            behaviour: Behaviour::Normal,
            queued: VecDeque::new(),
            stats: AccountStats::default(),
        });
        account.client_secret = client_secret.to_owned();
        account.refresh_token = Some(refresh_token.to_owned());
        account.previous_refresh_token = None;
    }

    /// Runs `f` on the account, if it is registered.
    pub fn with_account<T>(&self, client_id: &str, f: impl FnOnce(&mut Account) -> T) -> Option<T> {
        let mut inner = self.lock();
        let found = inner.accounts.get_mut(client_id).map(f);
        if found.is_none() {
            tracing::warn!(client_id, "emulator: no such account");
        }
        found
    }

    pub fn expire_access_tokens(&self, client_id: &str) {
        let now = Instant::now();
        let mut inner = self.lock();
        for token in inner.access_tokens.values_mut().filter(|t| t.client_id == client_id) {
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
        let ttl = self.opts.access_token_ttl;
        let rotate = self.opts.rotate_refresh_tokens;
        let grace = self.opts.rotation_grace;
        let access_token = self.ids.access_token();
        let new_refresh = rotate.then(|| self.ids.refresh_token());
        let mut guard = self.lock();
        let inner = &mut *guard;
        let result = match inner.accounts.get_mut(client_id) {
            None => Err(RefreshError::InvalidClient),
            Some(account) if account.client_secret != client_secret => Err(RefreshError::InvalidClient),
            Some(account)
                if account.refresh_token.as_deref() != Some(refresh_token)
                    && !(grace && account.previous_refresh_token.as_deref() == Some(refresh_token)) =>
            {
                Err(RefreshError::InvalidGrant)
            }
            Some(account) => {
                if let Some(new) = &new_refresh {
                    let presented_current = account.refresh_token.as_deref() == Some(refresh_token);
                    if grace {
                        // Presenting the current token confirms it: it becomes the grace
                        // predecessor. Presenting the predecessor (the successor was never
                        // stored) keeps it as the predecessor.
                        if presented_current {
                            account.previous_refresh_token = account.refresh_token.take();
                        }
                    }
                    account.refresh_token = Some(new.clone());
                }
                account.generation += 1;
                account.stats.refreshes += 1;
                Ok(account.generation)
            }
        };
        match result {
            Ok(generation) => {
                inner.stats.refreshes += 1;
                let expires_at = Instant::now() + ttl;
                inner.access_tokens.insert(
                    access_token.clone(),
                    AccessToken { client_id: client_id.to_owned(), expires_at, generation },
                );
                Ok(Issued { access_token, expires_in: ttl.as_secs(), refresh_token: new_refresh })
            }
            Err(e) => {
                inner.stats.refresh_failures += 1;
                Err(e)
            }
        }
    }

    /// The account an unexpired access token belongs to.
    pub fn authenticate(&self, access_token: &str) -> Option<String> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let token = inner.access_tokens.get(access_token)?;
        if token.expires_at <= Instant::now() {
            return None;
        }
        let (client_id, generation) = (token.client_id.clone(), token.generation);
        // Using the newest access token confirms the newest refresh token: the grace ends.
        if let Some(account) = inner.accounts.get_mut(&client_id) {
            if account.generation == generation {
                account.previous_refresh_token = None;
            }
        }
        Some(client_id)
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

    /// Counts an authenticated request of `client_id`.
    pub fn count_account_request(&self, client_id: &str) {
        if let Some(account) = self.lock().accounts.get_mut(client_id) {
            account.stats.requests += 1;
        }
    }

    /// Keeps the last request body `client_id` sent.
    pub fn set_last_request(&self, client_id: &str, body: serde_json::Value) {
        if let Some(account) = self.lock().accounts.get_mut(client_id) {
            account.stats.last_request = Some(body);
        }
    }

    /// The behaviour for the account's next request (consuming a queued one).
    pub fn next_behaviour(&self, client_id: &str) -> Behaviour {
        let mut inner = self.lock();
        match inner.accounts.get_mut(client_id) {
            Some(account) => account.queued.pop_front().unwrap_or_else(|| account.behaviour.clone()),
            None => Behaviour::Normal,
        }
    }

    pub fn stream_opened(&self, client_id: &str) {
        let mut inner = self.lock();
        inner.stats.open_streams += 1;
        if let Some(account) = inner.accounts.get_mut(client_id) {
            account.stats.open_streams += 1;
        }
    }

    pub fn stream_closed(&self, client_id: &str, end: StreamEnd) {
        let mut inner = self.lock();
        inner.stats.open_streams = inner.stats.open_streams.saturating_sub(1);
        match end {
            StreamEnd::Completed => inner.stats.completed_streams += 1,
            StreamEnd::Cancelled => inner.stats.cancelled_streams += 1,
        }
        if let Some(account) = inner.accounts.get_mut(client_id) {
            account.stats.open_streams = account.stats.open_streams.saturating_sub(1);
        }
    }

    pub fn stats(&self) -> Stats {
        self.lock().stats.clone()
    }

    pub fn stats_for(&self, client_id: &str) -> AccountStats {
        self.lock().accounts.get(client_id).map(|a| a.stats.clone()).unwrap_or_default()
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
