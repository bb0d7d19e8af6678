//! The pool's persistence through the store: rotated refresh tokens durably before use,
//! state changes at once, counters batched; and the state a restart brings back.

use super::pool::{Restored, StateInfo, StateSink};
use super::tokens::{Access, Chain};
use crate::config::AccountId;
use crate::store::{AccountRecord, Counters, StateRecord, Store, TokenRecord};
use std::collections::BTreeMap;
use std::time::SystemTime;

/// Writes through to the redb store.
pub struct StoreSink(pub Store);

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
        self.0.put_tokens(id.as_str(), &rec).map_err(|e| e.to_string())
    }

    fn state(&self, id: &AccountId, info: &StateInfo) {
        let rec = StateRecord {
            state: info.state,
            since: info.since,
            until: info.until,
            reason: info.reason.clone(),
            last_error: info.last_error.clone(),
        };
        if let Err(e) = self.0.put_state(id.as_str(), &rec) {
            tracing::error!(account = %id, error = %e, "cannot store the account's state");
        }
    }

    fn counters(&self, batch: Vec<(AccountId, Counters)>) {
        let batch: Vec<(String, Counters)> = batch.into_iter().map(|(id, c)| (id.to_string(), c)).collect();
        if let Err(e) = self.0.put_counters(&batch) {
            tracing::warn!(error = %e, "cannot store counters");
        }
    }

    fn restore(&self, id: &AccountId) -> Restored {
        match self.0.get(id.as_str()) {
            Ok(Some(rec)) => restored_one(rec),
            Ok(None) => Restored::default(),
            Err(e) => {
                tracing::warn!(account = %id, error = %e, "cannot read the account's stored state");
                Restored::default()
            }
        }
    }
}

/// What the pool restores from the store's records.
pub fn restored(records: BTreeMap<String, AccountRecord>) -> BTreeMap<String, Restored> {
    records.into_iter().map(|(id, r)| (id, restored_one(r))).collect()
}

fn restored_one(r: AccountRecord) -> Restored {
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
        strikes: 0,
    });
    Restored { chain, access, state, counters: Some(r.counters) }
}
