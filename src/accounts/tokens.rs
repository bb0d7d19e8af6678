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
    chain: tokio::sync::Mutex<Chain>,
    access: std::sync::RwLock<Option<Access>>,
    /// Bumped whenever the chain is reset (new credentials in the file).
    generation: std::sync::atomic::AtomicU64,
}

/// Callers get a token valid for at least this long, or wait for a refresh.
pub const MIN_VALIDITY: Duration = Duration::from_secs(60);

impl Tokens {
    pub fn new(chain: Chain, access: Option<Access>) -> Self {
        Tokens {
            chain: tokio::sync::Mutex::new(chain),
            access: std::sync::RwLock::new(access),
            generation: std::sync::atomic::AtomicU64::new(0),
        }
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

    /// Replaces the chain (the file's credentials changed). The next use refreshes from it.
    pub async fn reset(&self, chain: Chain) {
        let mut c = self.chain.lock().await;
        *c = chain;
        self.generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.invalidate_access();
    }

    pub async fn chain(&self) -> Chain {
        self.chain.lock().await.clone()
    }

    /// An access token valid for at least `margin`, refreshing through `refresh` when needed.
    /// `persist` runs with the new chain *before* the new access token is published, so a
    /// rotated refresh token is durable before anything uses the access token that came with it.
    /// `force` refreshes even if the cached token looks valid (it was refused upstream).
    pub async fn get<R, RF, P>(
        &self,
        margin: Duration,
        force: Option<&Secret>,
        refresh: R,
        persist: P,
    ) -> Result<Secret, RefreshError>
    where
        R: FnOnce(Chain) -> RF,
        RF: Future<Output = Result<TokenGrant, RefreshError>>,
        P: FnOnce(&Chain, &Access) -> Result<(), String>,
    {
        if force.is_none() {
            if let Some(a) = self.current_access().filter(|a| a.valid_for(margin)) {
                return Ok(a.token);
            }
        }
        let mut chain = self.chain.lock().await;
        // Someone else may have refreshed while we waited.
        if let Some(a) = self.current_access().filter(|a| a.valid_for(margin)) {
            let refused = force.is_some_and(|f| f.expose() == a.token.expose());
            if !refused {
                return Ok(a.token);
            }
        }
        let grant = refresh(chain.clone()).await?;
        let mut next = chain.clone();
        if let Some(rt) = grant.refresh_token {
            next.refresh_token = rt;
            next.rotated = true;
        }
        let access = Access { token: grant.access_token, expires_at: SystemTime::now() + grant.expires_in };
        if let Err(e) = persist(&next, &access) {
            // The old refresh token may already be dead: keep the successor in memory so the
            // next attempt can use (and store) it, but do not use the access token unstored.
            *chain = next;
            return Err(RefreshError::Transient(format!("cannot store the new tokens: {e}")));
        }
        *chain = next;
        *self.access.write().unwrap_or_else(|e| e.into_inner()) = Some(access.clone());
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
                            })
                        },
                        |c, _| {
                            persisted.lock().unwrap().push(c.refresh_token.expose().to_string());
                            Ok(())
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
                    })
                },
                |_, _| Err("disk full".into()),
            )
            .await;
        assert!(matches!(r, Err(RefreshError::Transient(_))));
        assert!(tokens.current_access().is_none());
        assert_eq!(tokens.chain().await.refresh_token.expose(), "rt1");
    }
}
