//! What one account learned about itself and keeps across restarts: the installation it looks
//! like to the service (a machine id of its own), its profile ARN, and the endpoint that takes
//! its credentials; and the profile ARN each kind of account sends.

use crate::config::Kind;
use crate::store::IdentityRecord;
use crate::upstream::{Agent, Role};
use std::sync::{Arc, Mutex, RwLock};

/// The Builder ID placeholder profile ARN, accepted for OIDC accounts without a profile.
pub const BUILDER_ID_PROFILE_ARN: &str = "arn:aws:codewhisperer:us-east-1:638616132270:profile/AAAACCCCXXXX";
/// The profile ARN of Kiro social accounts whose refresh names none.
pub const SOCIAL_PROFILE_ARN: &str = "arn:aws:codewhisperer:us-east-1:699475941385:profile/EHGA3GRVQMUK";

/// An account's identity.
pub struct Identity {
    /// Replaced only when a `[cluster]` node takes the account over from another
    /// ([`Identity::adopt`]): an account looks like one installation whichever node serves it.
    agent: RwLock<Arc<Agent>>,
    learned: Mutex<Learned>,
}

#[derive(Clone, Default)]
struct Learned {
    profile_arn: Option<String>,
    /// The credentials fingerprint the profile was learned for: new credentials ask again.
    profile_for: Option<[u8; 32]>,
    endpoint: Option<Role>,
}

impl Identity {
    /// From the store's record, or new (a fresh machine id) when there is none or it is
    /// damaged. The flag says whether the result must be stored.
    pub fn restore(rec: Option<IdentityRecord>) -> (Identity, bool) {
        match rec {
            Some(r) if Agent::valid_machine_id(&r.machine_id) => (
                Identity {
                    agent: RwLock::new(Arc::new(Agent::new(r.machine_id))),
                    learned: Mutex::new(Learned {
                        profile_arn: r.profile_arn,
                        profile_for: r.profile_for,
                        endpoint: r.endpoint.as_deref().and_then(Role::parse),
                    }),
                },
                false,
            ),
            _ => (
                Identity {
                    agent: RwLock::new(Arc::new(Agent::new(Agent::new_machine_id()))),
                    learned: Mutex::new(Learned::default()),
                },
                true,
            ),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Learned> {
        self.learned.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn agent(&self) -> Arc<Agent> {
        self.agent.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// `[cluster]`: takes what the node that served the account before stored (its machine
    /// id, the profile and endpoint it learned), as this node takes the account over: two
    /// nodes that started at once each made a machine id of their own, and the service would
    /// otherwise see the account move from one installation to another at every handover.
    /// False, nothing changed, for a damaged record (the caller stores its own instead).
    pub fn adopt(&self, rec: IdentityRecord) -> bool {
        if !Agent::valid_machine_id(&rec.machine_id) {
            return false;
        }
        {
            let mut agent = self.agent.write().unwrap_or_else(|e| e.into_inner());
            if agent.machine_id() != rec.machine_id {
                *agent = Arc::new(Agent::new(rec.machine_id));
            }
        }
        // The profile as the holder left it, none included (one it forgot as refused).
        let mut l = self.lock();
        l.profile_arn = rec.profile_arn;
        l.profile_for = rec.profile_for;
        if let Some(endpoint) = rec.endpoint.as_deref().and_then(Role::parse) {
            l.endpoint = Some(endpoint);
        }
        true
    }

    /// Forgets the learned profile (a social account's, refused): the fixed one stands in
    /// until the next refresh names one.
    pub fn forget_profile(&self) {
        let mut l = self.lock();
        l.profile_arn = None;
        l.profile_for = None;
    }

    /// What the store keeps.
    pub fn record(&self) -> IdentityRecord {
        let l = self.lock().clone();
        IdentityRecord {
            machine_id: self.agent().machine_id().to_owned(),
            profile_arn: l.profile_arn,
            profile_for: l.profile_for,
            endpoint: l.endpoint.map(|r| r.as_str().to_owned()),
        }
    }

    /// The profile ARN learned for these credentials, if any.
    pub fn learned_profile(&self, fingerprint: &[u8; 32]) -> Option<String> {
        let l = self.lock();
        l.profile_arn.clone().filter(|_| l.profile_for.as_ref() == Some(fingerprint))
    }

    /// Remembers the profile learned for these credentials; true when it changed.
    pub fn learn_profile(&self, arn: String, fingerprint: [u8; 32]) -> bool {
        let mut l = self.lock();
        let changed = l.profile_arn.as_deref() != Some(arn.as_str()) || l.profile_for != Some(fingerprint);
        l.profile_arn = Some(arn);
        l.profile_for = Some(fingerprint);
        changed
    }

    /// The chat endpoints to try, in order: the one that last worked first, else the kind's
    /// order (oidc: Amazon Q first; social and api-key: the Kiro runtime first).
    pub fn chat_order(&self, kind: Kind) -> [Role; 2] {
        let first = self.lock().endpoint.unwrap_or(match kind {
            Kind::Oidc => Role::Q,
            Kind::Social | Kind::ApiKey => Role::Runtime,
        });
        [first, first.other()]
    }

    /// The endpoint last known to work.
    pub fn endpoint(&self) -> Option<Role> {
        self.lock().endpoint
    }

    /// Remembers the endpoint that took the credentials; true when it changed.
    pub fn set_endpoint(&self, role: Role) -> bool {
        let mut l = self.lock();
        let changed = l.endpoint != Some(role);
        l.endpoint = Some(role);
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_machine_id_is_made_once_and_kept() {
        let (fresh, new) = Identity::restore(None);
        assert!(new);
        let rec = fresh.record();
        let (again, new) = Identity::restore(Some(rec.clone()));
        assert!(!new);
        assert_eq!(again.agent().machine_id(), fresh.agent().machine_id());
        let (other, _) = Identity::restore(None);
        assert_ne!(other.agent().machine_id(), fresh.agent().machine_id(), "accounts never share one");
        let damaged = IdentityRecord { machine_id: "short".into(), ..rec };
        assert!(Identity::restore(Some(damaged)).1, "a damaged id is replaced");
    }

    #[test]
    fn profiles_are_per_credentials_and_endpoints_remembered() {
        let (id, _) = Identity::restore(None);
        assert!(id.learn_profile("arn:x".into(), [1; 32]));
        assert!(!id.learn_profile("arn:x".into(), [1; 32]));
        assert_eq!(id.learned_profile(&[1; 32]).as_deref(), Some("arn:x"));
        assert_eq!(id.learned_profile(&[2; 32]), None, "new credentials ask again");
        assert_eq!(id.chat_order(Kind::Oidc), [Role::Q, Role::Runtime]);
        assert_eq!(id.chat_order(Kind::Social), [Role::Runtime, Role::Q]);
        assert_eq!(id.chat_order(Kind::ApiKey), [Role::Runtime, Role::Q]);
        assert!(id.set_endpoint(Role::Q));
        assert_eq!(id.chat_order(Kind::ApiKey), [Role::Q, Role::Runtime]);
        let (back, _) = Identity::restore(Some(id.record()));
        assert_eq!(back.endpoint(), Some(Role::Q));
    }
}
