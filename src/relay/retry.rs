//! The failover decision of one request, apart from any I/O: after each failed attempt, whether
//! to refresh the token and try the same account again, try another account, or stop with the
//! failure the client sees. linkerd2-proxy keeps its retry policy as such a unit.

use crate::config::AccountId;
use crate::upstream::UpstreamFailure;
use std::collections::HashSet;

/// What the relay does next.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// The account's access token was refused: refresh it (once per account) and try again.
    RefreshAndRetry,
    /// Try another account (this one is excluded for the rest of the request).
    Failover,
    /// Give up with this failure.
    Stop(UpstreamFailure),
}

/// One request's attempts: how many accounts it may still try and which ones it has.
#[derive(Debug)]
pub struct Budget {
    max_attempts: u32,
    attempts: u32,
    token_retried: bool,
    excluded: HashSet<AccountId>,
    last: Option<UpstreamFailure>,
}

impl Budget {
    /// A request that may try up to `max_attempts` accounts (at least one).
    pub fn new(max_attempts: u32) -> Budget {
        Budget {
            max_attempts: max_attempts.max(1),
            attempts: 0,
            token_retried: false,
            excluded: HashSet::new(),
            last: None,
        }
    }

    /// An account was leased for the next attempt; false when the budget is spent.
    pub fn start_attempt(&mut self) -> bool {
        if self.attempts >= self.max_attempts {
            return false;
        }
        self.attempts += 1;
        self.token_retried = false;
        true
    }

    /// The attempt number (1 for the first account).
    pub fn attempt(&self) -> u32 {
        self.attempts
    }

    /// Accounts this request must not be given again.
    pub fn excluded(&self) -> &HashSet<AccountId> {
        &self.excluded
    }

    /// The last failure seen, for the error when no account is left.
    pub fn last(&self) -> Option<&UpstreamFailure> {
        self.last.as_ref()
    }

    /// Decides after `account` failed with `failure`.
    pub fn after(&mut self, account: &AccountId, failure: UpstreamFailure) -> Next {
        if failure == UpstreamFailure::TokenInvalid && !self.token_retried {
            self.token_retried = true;
            return Next::RefreshAndRetry;
        }
        if !failure.try_another_account() {
            return Next::Stop(failure);
        }
        self.excluded.insert(account.clone());
        if self.attempts >= self.max_attempts {
            return Next::Stop(failure);
        }
        self.last = Some(failure);
        Next::Failover
    }

    /// The account's token could not be had (refresh failed): another account may serve.
    pub fn refresh_failed(&mut self, account: &AccountId, message: String) -> Next {
        self.after(account, UpstreamFailure::Transient { status: None, message })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> AccountId {
        AccountId::parse(s).unwrap()
    }

    fn transient() -> UpstreamFailure {
        UpstreamFailure::Transient { status: Some(503), message: "down".into() }
    }

    #[test]
    fn a_refused_token_is_refreshed_once_per_account() {
        let mut b = Budget::new(3);
        assert!(b.start_attempt());
        assert_eq!(b.after(&id("a"), UpstreamFailure::TokenInvalid), Next::RefreshAndRetry);
        assert_eq!(b.after(&id("a"), UpstreamFailure::TokenInvalid), Next::Failover);
        assert!(b.excluded().contains(&id("a")));
        assert!(b.start_attempt());
        assert_eq!(b.after(&id("b"), UpstreamFailure::TokenInvalid), Next::RefreshAndRetry);
    }

    #[test]
    fn the_request_s_own_faults_stop_at_once_and_blame_no_account() {
        for f in [
            UpstreamFailure::BadRequest { message: "Improperly formed request.".into() },
            UpstreamFailure::ContextTooLong { message: "Input is too long.".into() },
        ] {
            let mut b = Budget::new(3);
            assert!(b.start_attempt());
            assert_eq!(b.after(&id("a"), f.clone()), Next::Stop(f));
            assert!(b.excluded().is_empty());
        }
    }

    #[test]
    fn account_faults_fail_over_until_the_budget_is_spent() {
        let mut b = Budget::new(3);
        let throttled = UpstreamFailure::Throttled { retry_after: None, message: "slow".into() };
        for (n, (acct, f)) in [("a", throttled.clone()), ("b", transient())].into_iter().enumerate() {
            assert!(b.start_attempt());
            assert_eq!(b.attempt(), n as u32 + 1);
            assert_eq!(b.after(&id(acct), f.clone()), Next::Failover);
            assert_eq!(b.last(), Some(&f));
        }
        assert!(b.start_attempt());
        let capacity = UpstreamFailure::Capacity { message: "busy".into() };
        assert_eq!(b.after(&id("c"), capacity.clone()), Next::Stop(capacity));
        assert!(!b.start_attempt(), "three accounts tried");
        assert_eq!(b.excluded().len(), 3);
    }

    #[test]
    fn a_failed_refresh_moves_on_to_another_account() {
        let mut b = Budget::new(2);
        assert!(b.start_attempt());
        assert_eq!(b.refresh_failed(&id("a"), "token endpoint down".into()), Next::Failover);
        assert!(b.excluded().contains(&id("a")));
        assert!(b.start_attempt());
        assert!(matches!(
            b.refresh_failed(&id("b"), "again".into()),
            Next::Stop(UpstreamFailure::Transient { .. })
        ));
    }

    #[test]
    fn at_least_one_attempt() {
        let mut b = Budget::new(0);
        assert!(b.start_attempt());
        assert!(!b.start_attempt());
    }
}
