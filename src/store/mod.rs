//! The state store: what must survive a restart (rotated refresh tokens, access tokens, account
//! states, counters, identities, catalogs), behind one [`Backend`] trait with two backends:
//! `redb` (`<state dir>/amq2api.redb`, embedded, the default) and
//! [`postgres`] (several nodes sharing accounts, `[cluster]`, with the account leases of
//! [`crate::cluster`]).
//!
//! Callers ([`crate::accounts::persist::StoreSink`]) see only the trait: the same durability rule
//! holds on both (a token write has committed when it returns `Ok`).

pub mod postgres;
mod redb;

pub use self::redb::*;
use std::collections::BTreeMap;

/// One store backend. Every method blocks (a file commit, a PostgreSQL round trip): call them
/// from a blocking thread (`spawn_blocking`, the store-writer and token-writer threads), never an
/// async worker.
pub trait Backend: Send + Sync {
    /// Every account with a row, by account id.
    fn load_all(&self) -> Result<BTreeMap<String, AccountRecord>, StoreError>;
    /// One account, or `None` when nothing is stored for it.
    fn get(&self, id: &str) -> Result<Option<AccountRecord>, StoreError>;
    /// Replaces the account's token record, committed before it returns. On PostgreSQL the write
    /// is fenced: it fails with [`StoreError::Fenced`] unless this node holds the account's lease.
    fn put_tokens(&self, id: &str, t: &TokenRecord) -> Result<(), StoreError>;
    /// [`Backend::put_tokens`] for many accounts, a result each in the batch's order; each `Ok`
    /// has committed. By default one write after another; a backend that can commit them
    /// together does.
    fn put_tokens_batch(&self, batch: &[(String, TokenRecord)]) -> Vec<Result<(), StoreError>> {
        batch.iter().map(|(id, t)| self.put_tokens(id, t)).collect()
    }
    fn put_states(&self, batch: &[(String, StateRecord)]) -> Result<(), StoreError>;
    fn put_counters(&self, batch: &[(String, Counters)]) -> Result<(), StoreError>;
    fn put_identities(&self, batch: &[(String, IdentityRecord)]) -> Result<(), StoreError>;
    fn put_catalogs(&self, batch: &[(String, CatalogRecord)]) -> Result<(), StoreError>;
    fn remove(&self, id: &str) -> Result<(), StoreError>;
    /// Why the store cannot take writes now (`None` while healthy).
    fn problem(&self) -> Option<StoreProblem>;
}

impl Backend for Store {
    fn load_all(&self) -> Result<BTreeMap<String, AccountRecord>, StoreError> {
        Store::load_all(self)
    }
    fn get(&self, id: &str) -> Result<Option<AccountRecord>, StoreError> {
        Store::get(self, id)
    }
    fn put_tokens(&self, id: &str, t: &TokenRecord) -> Result<(), StoreError> {
        Store::put_tokens(self, id, t)
    }
    fn put_tokens_batch(&self, batch: &[(String, TokenRecord)]) -> Vec<Result<(), StoreError>> {
        Store::put_tokens_batch(self, batch)
    }
    fn put_states(&self, batch: &[(String, StateRecord)]) -> Result<(), StoreError> {
        Store::put_states(self, batch)
    }
    fn put_counters(&self, batch: &[(String, Counters)]) -> Result<(), StoreError> {
        Store::put_counters(self, batch)
    }
    fn put_identities(&self, batch: &[(String, IdentityRecord)]) -> Result<(), StoreError> {
        Store::put_identities(self, batch)
    }
    fn put_catalogs(&self, batch: &[(String, CatalogRecord)]) -> Result<(), StoreError> {
        Store::put_catalogs(self, batch)
    }
    fn remove(&self, id: &str) -> Result<(), StoreError> {
        Store::remove(self, id)
    }
    fn problem(&self) -> Option<StoreProblem> {
        Store::problem(self)
    }
}
