//! One account's token chain: the current refresh token, the cached access token and its
//! expiry, and a single-flight refresh (concurrent callers wait for the same refresh; there is
//! no lock shared between accounts).

use crate::config::Secret;
use crate::upstream::{RefreshError, TokenGrant};
use std::future::Future;
use std::time::{Duration, SystemTime};

/// The refresh side of the chain.
#[derive(Debug, Clone)]
pub struct Chain {
    pub refresh_token: Secret,
    /// The refresh token came from a rotation (not from the accounts file).
    pub rotated: bool,
    /// Fingerprint of the file credentials this chain started from.
    pub file_fingerprint: [u8; 32],
}

/// A usable access token.
#[derive(Debug, Clone)]
pub struct Access {
    pub token: Secret,
    pub expires_at: SystemTime,
}

impl Access {
    /// Still valid for at least `margin`.
    pub fn valid_for(&self, margin: Duration) -> bool {
        SystemTime::now() + margin < self.expires_at
    }
}

/// The access token in use and the chain behind it. The async mutex around the chain is the
/// single flight: whoever holds it refreshes, the others wait and then reuse the result.
pub struct Tokens {
    chain: tokio::sync::Mutex<Held>,
    access: std::sync::RwLock<Option<Access>>,
    /// Mirrors `Held::unsaved.is_some()` for readers that must not wait for the lock.
    unsaved: std::sync::atomic::AtomicBool,
    /// Bumped whenever the chain changes: a rotation, a reset (new credentials in the file), an
    /// adoption. An adoption read from the store before a change here is older than the chain.
    generation: std::sync::atomic::AtomicU64,
    /// Refreshes that failed, and the last one's error: callers that waited for a refresh
    /// that failed get its error, rather than each call the token endpoint again in turn (an
    /// outage, or a dead token sent once per waiter).
    failures: std::sync::atomic::AtomicU64,
    last_failure: std::sync::Mutex<Option<RefreshError>>,
    /// Token calls that failed in a row (reset by one that works, or by new settings): the
    /// backoff's exponent, the same for every caller that shared one failure.
    consecutive: std::sync::atomic::AtomicU32,
}

/// The chain, and the access token that came with it while the chain is not yet stored.
struct Held {
    chain: Chain,
    /// Set when storing a rotated chain failed: the access token that came with it, held back
    /// until the chain is durable. While it is set, no refresh runs (it would rotate the chain
    /// again, and the token it replaces is the only live one).
    unsaved: Option<Access>,
    /// While `unsaved` is set: the refresh token the unsaved chain replaced (dead upstream once
    /// rotated). A store that still holds it has not seen the newer chain.
    replaced: Option<Secret>,
    /// Digests of the last refresh tokens this chain rotated away from (newest last), so that
    /// a file that brings one of them back (an `amqctl export` pasted over the accounts file
    /// some rotations later) is known as this chain's past, not as new credentials.
    past: Vec<[u8; 32]>,
}

/// How many rotated-away refresh tokens a chain remembers (digests, in memory).
const PAST_KEPT: usize = 16;

impl Held {
    fn new(chain: Chain) -> Held {
        Held { chain, unsaved: None, replaced: None, past: Vec::new() }
    }

    /// `token` is this chain's head or one it rotated away from.
    fn continues(&self, token: &Secret) -> bool {
        token.expose() == self.chain.refresh_token.expose()
            || self.past.contains(&crate::hash::sha256(token.expose().as_bytes()))
    }

    fn remember(&mut self, replaced: &Secret) {
        if self.past.len() == PAST_KEPT {
            self.past.remove(0);
        }
        self.past.push(crate::hash::sha256(replaced.expose().as_bytes()));
    }
}

/// A rotated chain held unsaved, handed from one account to another
/// ([`Tokens::take_unsaved`], [`Tokens::hold_unsaved`]).
pub struct Unsaved {
    chain: Chain,
    access: Access,
    replaced: Option<Secret>,
}

/// What [`Tokens::reset`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reset {
    /// The chain already grew from these credentials.
    Kept,
    /// The file's refresh token is this chain's (its head or its past): the chain goes on,
    /// once relabelled to the file's credentials ([`Tokens::relabel`]); nothing changed yet.
    Continued,
    /// The chain restarts from the file's token (or the store's chain of these credentials).
    Replaced,
    /// Not done: a rotated chain is held unsaved, the only live one.
    Unsaved,
}

/// See [`Tokens::quiet`].
pub struct Quiet<'a>(#[allow(dead_code)] tokio::sync::MutexGuard<'a, Held>);

/// Callers get a token valid for at least this long, or wait for a refresh.
pub const MIN_VALIDITY: Duration = Duration::from_secs(60);

impl Tokens {
    pub fn new(chain: Chain, access: Option<Access>) -> Self {
        Tokens {
            chain: tokio::sync::Mutex::new(Held::new(chain)),
            access: std::sync::RwLock::new(access),
            unsaved: std::sync::atomic::AtomicBool::new(false),
            generation: std::sync::atomic::AtomicU64::new(0),
            failures: std::sync::atomic::AtomicU64::new(0),
            last_failure: std::sync::Mutex::new(None),
            consecutive: std::sync::atomic::AtomicU32::new(0),
        }
    }

    /// Token calls that failed in a row.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Forgets the failures in a row (the account's settings changed: try again at once).
    pub fn clear_failures(&self) {
        self.consecutive.store(0, std::sync::atomic::Ordering::SeqCst);
    }

    /// True when an access token valid for at least `margin` is cached (no copy made).
    pub fn access_valid_for(&self, margin: Duration) -> bool {
        self.access.read().unwrap_or_else(|e| e.into_inner()).as_ref().is_some_and(|a| a.valid_for(margin))
    }

    pub fn current_access(&self) -> Option<Access> {
        self.access.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn invalidate_access(&self) {
        *self.access.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Drops the cached access token only if it is `refused` (a newer one stays).
    pub fn invalidate_if(&self, refused: &Secret) {
        let mut a = self.access.write().unwrap_or_else(|e| e.into_inner());
        if a.as_ref().is_some_and(|x| x.token.expose() == refused.expose()) {
            *a = None;
        }
    }

    /// A rotated refresh token is held in memory only: storing it failed and is being retried.
    pub fn has_unsaved(&self) -> bool {
        self.unsaved.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The file's credentials changed: the chain restarts from `from_file`, the file's token,
    /// or from `stored` when the store holds a chain grown from these same credentials (they
    /// were changed and changed back: the store's is the live one, the file's long rotated).
    /// A chain that already grew from these credentials is kept as it is (a change applied a
    /// second time, after a reload whose end was not recorded). Returns whether the chain was
    /// replaced; the next use refreshes from a replaced chain.
    ///
    /// A file whose refresh token is this chain's head, or one the chain rotated away from
    /// (`amqctl export` written over the accounts file, perhaps some rotations later), names
    /// the same chain: it goes on (relabelled to the file's credentials) rather than restart
    /// from a token that is dead upstream.
    ///
    /// Never while a rotated chain is held unsaved ([`Reset::Unsaved`]): it is the only live
    /// one, and a reset would drop it; store it first ([`Tokens::store_unsaved`]).
    pub async fn reset(&self, from_file: Chain, stored: Option<Chain>) -> Reset {
        let mut held = self.chain.lock().await;
        if held.chain.file_fingerprint == from_file.file_fingerprint {
            return Reset::Kept;
        }
        if held.unsaved.is_some() {
            return Reset::Unsaved;
        }
        if held.continues(&from_file.refresh_token) {
            // Relabelled by [`Tokens::relabel`], once stored under the new credentials.
            return Reset::Continued;
        }
        let chain = stored.filter(|c| c.file_fingerprint == from_file.file_fingerprint).unwrap_or(from_file);
        *held = Held::new(chain);
        self.unsaved.store(false, std::sync::atomic::Ordering::SeqCst);
        self.generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.invalidate_access();
        Reset::Replaced
    }

    /// The chain goes on under new file credentials (`fingerprint`; see [`Reset::Continued`]):
    /// stored so relabelled first — a restart must find it under the file's credentials, or it
    /// would start from the file's token, which may be one the chain rotated away from — then
    /// relabelled here. `Err` (nothing changed) when the write fails.
    pub async fn relabel<P, PF>(&self, fingerprint: [u8; 32], persist: P) -> Result<(), String>
    where
        P: FnOnce(Chain, Access) -> PF,
        PF: Future<Output = Result<(), String>>,
    {
        let mut held = self.chain.lock().await;
        let mut chain = held.chain.clone();
        chain.file_fingerprint = fingerprint;
        // No access token cached: an expired, empty one (the next use refreshes).
        let access = self
            .current_access()
            .unwrap_or(Access { token: Secret::new(""), expires_at: SystemTime::UNIX_EPOCH });
        persist(chain.clone(), access).await?;
        held.chain = chain;
        Ok(())
    }

    /// Stores a rotated chain held unsaved (with `persist`, as [`Tokens::get`] does), and
    /// nothing else: no token call. `Ok` when nothing is left unsaved.
    pub async fn store_unsaved<P, PF>(&self, persist: P) -> Result<(), String>
    where
        P: FnOnce(Chain, Access) -> PF,
        PF: Future<Output = Result<(), String>>,
    {
        let mut held = self.chain.lock().await;
        if let Some(access) = held.unsaved.clone() {
            persist(held.chain.clone(), access.clone()).await?;
            held.unsaved = None;
            held.replaced = None;
            self.unsaved.store(false, std::sync::atomic::Ordering::SeqCst);
            self.publish(access);
        }
        Ok(())
    }

    /// Replaces the chain and the access token with what another holder stored (`[cluster]`
    /// takeover): any unsaved chain of this node is dropped (its write was fenced) — unless the
    /// stored chain is the very one this node's unsaved chain replaced (nobody stored anything
    /// since: this node lost the store, not the account), in which case the unsaved chain is
    /// the only live one and stays, to be stored at the next use.
    ///
    /// `seen` is [`Tokens::generation`] from before the store was read: when the chain changed
    /// since (a refresh in flight rotated it and stored it under this node's new lease), what
    /// was read is older than the chain, which stays.
    pub async fn adopt(&self, chain: Chain, access: Option<Access>, seen: u64) {
        let mut held = self.chain.lock().await;
        if self.generation() != seen {
            return;
        }
        if held.unsaved.is_some()
            && held.replaced.as_ref().is_some_and(|r| r.expose() == chain.refresh_token.expose())
        {
            return;
        }
        *held = Held::new(chain);
        self.unsaved.store(false, std::sync::atomic::Ordering::SeqCst);
        self.generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        *self.access.write().unwrap_or_else(|e| e.into_inner()) = access;
    }

    /// The chain, if no refresh (nor store retry, nor adoption) is running on it: while the
    /// returned guard lives, none starts. `[cluster]`: a lease is handed over only under it, so
    /// that no refresh of the old holder's can rotate the token the new holder loads.
    pub fn quiet(&self) -> Option<Quiet<'_>> {
        self.chain.try_lock().ok().map(Quiet)
    }

    /// How many times the chain has changed (see the field).
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub async fn chain(&self) -> Chain {
        self.chain.lock().await.chain.clone()
    }

    /// A rotated chain held unsaved, taken out to go on under another account (an account
    /// renamed while its store write failed): this one keeps the chain's value but no longer
    /// holds it unsaved, so it never writes it under its old id (that late write could make
    /// the older chain look the newest). `None` when nothing is held unsaved (a store retry
    /// may have stored it meanwhile).
    pub async fn take_unsaved(&self) -> Option<Unsaved> {
        let mut held = self.chain.lock().await;
        let access = held.unsaved.take()?;
        self.unsaved.store(false, std::sync::atomic::Ordering::SeqCst);
        Some(Unsaved { chain: held.chain.clone(), access, replaced: held.replaced.take() })
    }

    /// Holds a chain taken with [`Tokens::take_unsaved`] as this account's own, unsaved: it is
    /// stored (under this account) before its access token is used, and no refresh runs
    /// meanwhile.
    pub async fn hold_unsaved(&self, u: Unsaved) {
        let mut held = self.chain.lock().await;
        held.chain = u.chain;
        held.unsaved = Some(u.access);
        held.replaced = u.replaced;
        self.unsaved.store(true, std::sync::atomic::Ordering::SeqCst);
        self.generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.invalidate_access();
    }

    /// Holds the chain as not yet stored (its access token, or none, held back), for a chain
    /// this account took over from another entry's stored record at start: it is stored under
    /// this account before any use, and no refresh runs until it is (the entry it came from
    /// may write over its own record with its next rotation). For a fresh account only: it
    /// does nothing if the chain is in use.
    pub fn hold_as_unsaved(&self) {
        let Ok(mut held) = self.chain.try_lock() else { return };
        if held.unsaved.is_some() {
            return;
        }
        let access = self
            .current_access()
            .unwrap_or(Access { token: Secret::new(""), expires_at: SystemTime::UNIX_EPOCH });
        held.unsaved = Some(access);
        self.unsaved.store(true, std::sync::atomic::Ordering::SeqCst);
        self.invalidate_access();
    }

    /// Relabels the chain to new file credentials in memory only (`[cluster]`, on a node that
    /// does not hold the account: its holder stores the chain, and a lease taken later loads
    /// what it stored).
    pub async fn relabel_in_memory(&self, fingerprint: [u8; 32]) {
        self.chain.lock().await.chain.file_fingerprint = fingerprint;
    }

    fn publish(&self, access: Access) {
        *self.access.write().unwrap_or_else(|e| e.into_inner()) = Some(access);
    }

    /// An access token valid for at least `margin`, refreshing through `refresh` when needed.
    /// `persist` stores a new chain and must be durable when it returns `Ok`; it runs *before*
    /// the access token that came with the chain is published, so a rotated refresh token is
    /// durable before anything uses that access token. When it fails, the new chain stays in
    /// memory, no further refresh runs (it would replace the only live refresh token with one
    /// that is not stored either), and each later call tries to store it again first: the
    /// error is [`RefreshError::NotStored`] until that succeeds. `force` refreshes even if the
    /// cached token looks valid (it was refused upstream).
    pub async fn get<R, RF, P, PF>(
        &self,
        margin: Duration,
        force: Option<&Secret>,
        refresh: R,
        persist: P,
    ) -> Result<Secret, RefreshError>
    where
        R: FnOnce(Chain) -> RF,
        RF: Future<Output = Result<TokenGrant, RefreshError>>,
        P: Fn(Chain, Access) -> PF,
        PF: Future<Output = Result<(), String>>,
    {
        let usable = |a: &Access| a.valid_for(margin) && force.is_none_or(|f| f.expose() != a.token.expose());
        if !self.has_unsaved() {
            if let Some(a) = self.current_access().filter(|a| a.valid_for(margin) && force.is_none()) {
                return Ok(a.token);
            }
        }
        let failures = self.failures.load(std::sync::atomic::Ordering::SeqCst);
        let mut held = self.chain.lock().await;
        if let Some(access) = held.unsaved.clone() {
            persist(held.chain.clone(), access.clone()).await.map_err(RefreshError::NotStored)?;
            held.unsaved = None;
            held.replaced = None;
            self.unsaved.store(false, std::sync::atomic::Ordering::SeqCst);
            self.publish(access);
        }
        // Someone else may have refreshed while we waited (or the held-back token is now stored).
        if let Some(a) = self.current_access().filter(usable) {
            return Ok(a.token);
        }
        // Or failed to, while we waited: its answer is ours too.
        if self.failures.load(std::sync::atomic::Ordering::SeqCst) != failures {
            if let Some(e) = self.last_failure.lock().unwrap_or_else(|e| e.into_inner()).clone() {
                return Err(e);
            }
        }
        let grant = match refresh(held.chain.clone()).await {
            Ok(g) => g,
            Err(e) => {
                *self.last_failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.clone());
                self.failures.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if !matches!(e, RefreshError::NotAttempted(_)) {
                    self.consecutive.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                return Err(e);
            }
        };
        self.consecutive.store(0, std::sync::atomic::Ordering::SeqCst);
        let mut next = held.chain.clone();
        let mut rotated = false;
        if let Some(rt) = grant.refresh_token {
            rotated = rt.expose() != next.refresh_token.expose();
            next.refresh_token = rt;
            next.rotated |= rotated;
        }
        let access = Access { token: grant.access_token, expires_at: SystemTime::now() + grant.expires_in };
        let stored = persist(next.clone(), access.clone()).await;
        if !rotated {
            // The refresh token did not change (social sign-in may keep it): the store's copy
            // is still the live one, and only the access token (kept for a restart) failed to
            // be stored. Nothing to protect: the token is used.
            if let Err(e) = stored {
                tracing::warn!(error = %e, "the new access token could not be stored (the refresh token did not change)");
            }
            held.chain = next;
            self.publish(access.clone());
            return Ok(access.token);
        }
        // The old refresh token may already be dead: the successor is kept either way.
        let replaced = std::mem::replace(&mut held.chain, next).refresh_token;
        held.remember(&replaced);
        self.generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if let Err(e) = stored {
            held.unsaved = Some(access);
            held.replaced = Some(replaced);
            self.unsaved.store(true, std::sync::atomic::Ordering::SeqCst);
            self.invalidate_access();
            return Err(RefreshError::NotStored(e));
        }
        self.publish(access.clone());
        Ok(access.token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn chain() -> Chain {
        Chain { refresh_token: Secret::new("rt0"), rotated: false, file_fingerprint: [0; 32] }
    }

    #[tokio::test]
    async fn single_flight_and_rotation_persisted_first() {
        let tokens = Arc::new(Tokens::new(chain(), None));
        let calls = Arc::new(AtomicUsize::new(0));
        let persisted = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let (tokens, calls, persisted) = (tokens.clone(), calls.clone(), persisted.clone());
            tasks.push(tokio::spawn(async move {
                tokens
                    .get(
                        MIN_VALIDITY,
                        None,
                        |c| async move {
                            calls.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            assert_eq!(c.refresh_token.expose(), "rt0");
                            Ok(TokenGrant {
                                access_token: Secret::new("at1"),
                                expires_in: Duration::from_secs(3600),
                                refresh_token: Some(Secret::new("rt1")),
                                profile_arn: None,
                            })
                        },
                        |c: Chain, _| {
                            persisted.lock().unwrap().push(c.refresh_token.expose().to_string());
                            std::future::ready(Ok(()))
                        },
                    )
                    .await
                    .unwrap()
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().expose(), "at1");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(*persisted.lock().unwrap(), vec!["rt1".to_string()]);
        let c = tokens.chain().await;
        assert!(c.rotated && c.refresh_token.expose() == "rt1");
    }

    #[tokio::test]
    async fn persist_failure_does_not_publish() {
        let tokens = Tokens::new(chain(), None);
        let r = tokens
            .get(
                MIN_VALIDITY,
                None,
                |_| async {
                    Ok(TokenGrant {
                        access_token: Secret::new("at"),
                        expires_in: Duration::from_secs(3600),
                        refresh_token: Some(Secret::new("rt1")),
                        profile_arn: None,
                    })
                },
                |_, _| std::future::ready(Err("disk full".into())),
            )
            .await;
        assert!(matches!(r, Err(RefreshError::NotStored(_))));
        assert!(tokens.current_access().is_none());
        assert!(tokens.has_unsaved());
        assert_eq!(tokens.chain().await.refresh_token.expose(), "rt1");
    }

    /// A refresh that did not rotate the refresh token (none in the answer, or the same one)
    /// has nothing to protect: when storing fails, the access token is used all the same and
    /// nothing is held back.
    #[tokio::test]
    async fn a_store_failure_without_rotation_still_gives_the_token() {
        for returned in [None, Some("rt0")] {
            let tokens = Tokens::new(chain(), None);
            let r = tokens
                .get(
                    MIN_VALIDITY,
                    None,
                    |_| async move {
                        Ok(TokenGrant {
                            access_token: Secret::new("at"),
                            expires_in: Duration::from_secs(3600),
                            refresh_token: returned.map(Secret::new),
                            profile_arn: None,
                        })
                    },
                    |_, _| std::future::ready(Err("disk full".into())),
                )
                .await;
            assert_eq!(r.unwrap().expose(), "at", "{returned:?}");
            assert!(!tokens.has_unsaved());
            assert_eq!(tokens.current_access().unwrap().token.expose(), "at");
            assert_eq!(tokens.chain().await.refresh_token.expose(), "rt0");
        }
    }

    /// While the rotated chain is not stored, no refresh runs: each call tries to store it
    /// first, and once that works the held-back access token is used.
    #[tokio::test]
    async fn an_unsaved_chain_blocks_refreshes_until_stored() {
        let tokens = Tokens::new(chain(), None);
        let refreshes = AtomicUsize::new(0);
        let grant = |rt: &str| TokenGrant {
            access_token: Secret::new(format!("at-{rt}")),
            expires_in: Duration::from_secs(3600),
            refresh_token: Some(Secret::new(rt)),
            profile_arn: None,
        };
        let refresh = |rt: &'static str| {
            let refreshes = &refreshes;
            let g = grant(rt);
            move |_: Chain| {
                refreshes.fetch_add(1, Ordering::SeqCst);
                std::future::ready(Ok(g))
            }
        };
        let disk_full = |_: Chain, _: Access| std::future::ready(Err::<(), String>("ENOSPC".into()));
        let r = tokens.get(MIN_VALIDITY, None, refresh("rt1"), disk_full).await;
        assert!(matches!(r, Err(RefreshError::NotStored(_))), "{r:?}");
        // Forced or not, later calls only retry the store; the token endpoint is not called.
        for force in [None, Some(Secret::new("at-rt1"))] {
            let r = tokens.get(MIN_VALIDITY, force.as_ref(), refresh("rt2"), disk_full).await;
            assert!(matches!(r, Err(RefreshError::NotStored(_))), "{r:?}");
        }
        assert_eq!(refreshes.load(Ordering::SeqCst), 1);
        let stored = std::sync::Mutex::new(Vec::new());
        let works = |c: Chain, _: Access| {
            stored.lock().unwrap().push(c.refresh_token.expose().to_owned());
            std::future::ready(Ok(()))
        };
        let t = tokens.get(MIN_VALIDITY, None, refresh("rt3"), works).await.unwrap();
        assert_eq!(t.expose(), "at-rt1", "the held-back token, now stored");
        assert_eq!(*stored.lock().unwrap(), vec!["rt1".to_owned()]);
        assert_eq!(refreshes.load(Ordering::SeqCst), 1);
        assert!(!tokens.has_unsaved());
    }

    /// `[cluster]`: a node that lost the store (not the account) and takes its lease again
    /// keeps its unsaved rotated chain when the store still holds the token it replaced; a
    /// chain another holder stored since replaces it.
    #[tokio::test]
    async fn adopt_keeps_an_unsaved_chain_the_store_never_saw() {
        let tokens = Tokens::new(chain(), None);
        let grant = TokenGrant {
            access_token: Secret::new("at1"),
            expires_in: Duration::from_secs(3600),
            refresh_token: Some(Secret::new("rt1")),
            profile_arn: None,
        };
        let r = tokens
            .get(
                MIN_VALIDITY,
                None,
                |_| std::future::ready(Ok(grant)),
                |_, _| std::future::ready(Err::<(), String>("PostgreSQL down".into())),
            )
            .await;
        assert!(matches!(r, Err(RefreshError::NotStored(_))), "{r:?}");
        // The store still holds rt0 (the token rt1 replaced): the unsaved rt1 stays.
        tokens.adopt(chain(), None, tokens.generation()).await;
        assert!(tokens.has_unsaved());
        assert_eq!(tokens.chain().await.refresh_token.expose(), "rt1");
        // Another holder stored rt5 since: that one is the live chain.
        let newer = Chain { refresh_token: Secret::new("rt5"), rotated: true, file_fingerprint: [0; 32] };
        tokens.adopt(newer, None, tokens.generation()).await;
        assert!(!tokens.has_unsaved());
        assert_eq!(tokens.chain().await.refresh_token.expose(), "rt5");
    }

    /// `[cluster]`: a record read from the store before this node's own refresh rotated and
    /// stored the chain is older than the chain: adopting it would put a dead token back.
    #[tokio::test]
    async fn adopt_skips_a_record_read_before_a_rotation() {
        let tokens = Tokens::new(chain(), None);
        let seen = tokens.generation();
        let grant = TokenGrant {
            access_token: Secret::new("at1"),
            expires_in: Duration::from_secs(3600),
            refresh_token: Some(Secret::new("rt1")),
            profile_arn: None,
        };
        tokens
            .get(MIN_VALIDITY, None, |_| std::future::ready(Ok(grant)), |_, _| std::future::ready(Ok(())))
            .await
            .unwrap();
        // The record read before the refresh ended still names rt0.
        tokens.adopt(chain(), None, seen).await;
        assert_eq!(tokens.chain().await.refresh_token.expose(), "rt1");
        assert_eq!(tokens.current_access().unwrap().token.expose(), "at1");
        // A record read after it is taken as it is.
        let newer = Chain { refresh_token: Secret::new("rt2"), rotated: true, file_fingerprint: [0; 32] };
        tokens.adopt(newer, None, tokens.generation()).await;
        assert_eq!(tokens.chain().await.refresh_token.expose(), "rt2");
    }

    /// `[cluster]` handover: `quiet` is refused while a refresh runs, and while it is held no
    /// refresh starts.
    #[tokio::test]
    async fn quiet_excludes_refreshes() {
        let tokens = Arc::new(Tokens::new(chain(), None));
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let t = tokens.clone();
        let refreshing = tokio::spawn(async move {
            t.get(
                MIN_VALIDITY,
                None,
                |_| async move {
                    let _ = wait.await;
                    Ok(TokenGrant {
                        access_token: Secret::new("at1"),
                        expires_in: Duration::from_secs(3600),
                        refresh_token: Some(Secret::new("rt1")),
                        profile_arn: None,
                    })
                },
                |_, _| std::future::ready(Ok(())),
            )
            .await
        });
        while tokens.quiet().is_some() {
            tokio::task::yield_now().await;
        }
        go.send(()).unwrap();
        refreshing.await.unwrap().unwrap();
        let quiet = tokens.quiet().expect("no refresh running");
        let t = tokens.clone();
        let blocked = tokio::spawn(async move {
            t.get(
                MIN_VALIDITY,
                Some(&Secret::new("at1")),
                |_| async { unreachable!() },
                |_, _| async { Ok(()) },
            )
            .await
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!blocked.is_finished(), "a refresh started while the chain was held quiet");
        drop(quiet);
        blocked.abort();
    }
}
