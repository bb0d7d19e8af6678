//! What the pool may do with an account (its state), by the names the store, `/health` and
//! `amqctl` use.

use std::fmt;
use std::str::FromStr;

/// What the pool may do with an account; stored by name ([`AccountState::as_str`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash, PartialOrd, Ord)]
pub enum AccountState {
    #[default]
    Active,
    Cooling,
    Quota,
    Suspended,
    Disabled,
    Invalid,
}

impl AccountState {
    pub const ALL: [AccountState; 6] = [
        AccountState::Active,
        AccountState::Cooling,
        AccountState::Quota,
        AccountState::Suspended,
        AccountState::Disabled,
        AccountState::Invalid,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AccountState::Active => "active",
            AccountState::Cooling => "cooling",
            AccountState::Quota => "quota",
            AccountState::Suspended => "suspended",
            AccountState::Disabled => "disabled",
            AccountState::Invalid => "invalid",
        }
    }
}

impl fmt::Display for AccountState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An account state name that is not one of [`AccountState::as_str`]'s.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
#[error("unknown account state {0:?} (expected active, cooling, quota, suspended, disabled or invalid)")]
pub struct UnknownAccountState(pub String);

impl FromStr for AccountState {
    type Err = UnknownAccountState;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        AccountState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| UnknownAccountState(s.to_owned()))
    }
}
