//! The account pool: selection, leases, cooldowns and suspensions ([`pool`]), and each account's
//! token lifecycle — refresh before expiry, single flight, rotation ([`tokens`]), and the live
//! accounts file ([`watch`]), the state enum ([`state`]) and what the store keeps ([`persist`]).

pub mod catalog;
pub mod identity;
pub mod persist;
pub mod pins;
pub mod pool;
pub mod state;
pub mod tokens;
pub mod watch;

pub use pool::{Account, AccountView, Lease, Pool, PoolError, PoolSummary, State};
