//! How one account looks to the service: one stable installation, with a machine id of its own
//! in every user agent (chat, refresh, catalog), so that no two accounts ever send the same one
//! (identical user agents are the strongest signal that links accounts together, PROTOCOL.md §5).

/// The Kiro IDE and AWS SDK versions the user agents name.
const KIRO_VERSION: &str = "0.7.45";
const SDK_JS_VERSION: &str = "1.0.27";
const NODE_VERSION: &str = "22.21.1";

/// One account's installation: its machine id (64 hex digits), and the user agent parts made
/// from it once (every upstream call sends them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agent {
    machine_id: String,
    /// `KiroIDE-<version>-<machine id>`.
    kiro: String,
    /// `aws-sdk-js/<version> KiroIDE-…`.
    amz: String,
}

impl Agent {
    /// An installation with this machine id (64 lowercase hex digits, checked by the caller).
    pub fn new(machine_id: impl Into<String>) -> Agent {
        let machine_id = machine_id.into();
        let kiro = format!("KiroIDE-{KIRO_VERSION}-{machine_id}");
        let amz = format!("aws-sdk-js/{SDK_JS_VERSION} {kiro}");
        Agent { machine_id, kiro, amz }
    }

    /// A new random machine id (made once per account and kept in the store).
    pub fn new_machine_id() -> String {
        hex::encode(crate::ids::random_bytes::<32>())
    }

    /// True for 64 lowercase hex digits.
    pub fn valid_machine_id(id: &str) -> bool {
        id.len() == 64 && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    }

    pub fn machine_id(&self) -> &str {
        &self.machine_id
    }

    /// `KiroIDE-<version>-<machine id>`: the Kiro auth service's refresh calls send exactly this.
    pub fn kiro(&self) -> String {
        self.kiro.clone()
    }

    /// The `User-Agent` of calls to an AWS API (`api` is e.g. `codewhispererstreaming`).
    pub fn user_agent(&self, api: &str) -> String {
        format!(
            "aws-sdk-js/{SDK_JS_VERSION} ua/2.1 os/linux lang/js md/nodejs#{NODE_VERSION} api/{api}#{SDK_JS_VERSION} m/E {}",
            self.kiro
        )
    }

    /// The `x-amz-user-agent` that goes with [`Agent::user_agent`].
    pub fn amz_user_agent(&self) -> String {
        self.amz.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_user_agent_names_the_machine() {
        let id = Agent::new_machine_id();
        assert!(Agent::valid_machine_id(&id), "{id}");
        let a = Agent::new(id.clone());
        assert!(a.kiro().starts_with("KiroIDE-") && a.kiro().ends_with(&id));
        assert!(a.user_agent("codewhispererstreaming").contains(&a.kiro()));
        assert!(a.amz_user_agent().ends_with(&a.kiro()));
        assert_eq!(
            a.user_agent("codewhispererstreaming"),
            format!(
                "aws-sdk-js/1.0.27 ua/2.1 os/linux lang/js md/nodejs#22.21.1 api/codewhispererstreaming#1.0.27 m/E KiroIDE-0.7.45-{id}"
            )
        );
        assert_eq!(a.amz_user_agent(), format!("aws-sdk-js/1.0.27 KiroIDE-0.7.45-{id}"));
        assert_ne!(Agent::new_machine_id(), id, "random, not derived from anything shared");
        assert!(!Agent::valid_machine_id("ABC"));
    }
}
