//! The control API's wire types, shared by the daemon (`src/control`) and `amqctl`. Never a
//! secret (tokens appear only as expiry times and short fingerprints), except in [`Export`], the
//! answer of the root-only `GET /v1/export`.

use serde::{Deserialize, Serialize};

/// Bumped when a route or a field changes incompatibly; amqctl warns on a mismatch.
pub const API_VERSION: u32 = 1;

/// `GET /v1/keys`: one named key (never the key itself). (Its own type, like every type here:
/// a change inside `keys` must not change this wire format, [`API_VERSION`] 1, without anyone
/// noticing; the conversion below names every field of the inside type.)
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct KeyView {
    pub name: String,
    /// `active`, `disabled`, `expired`, `budget-exhausted`.
    pub state: String,
    pub enabled: bool,
    /// Unix seconds.
    pub expires: Option<u64>,
    pub rpm: Option<u32>,
    pub max_concurrency: Option<u32>,
    pub tokens_per_day: Option<u64>,
    pub credits_per_month: Option<f64>,
    pub models: Vec<String>,
    pub in_flight: u32,
    pub requests_last_minute: u32,
    pub tokens_today: u64,
    pub credits_this_month: f64,
    /// Requests refused by a limit since the daemon started.
    pub refused: u64,
}

impl From<crate::keys::KeyView> for KeyView {
    fn from(v: crate::keys::KeyView) -> KeyView {
        let crate::keys::KeyView {
            name,
            state,
            enabled,
            expires,
            rpm,
            max_concurrency,
            tokens_per_day,
            credits_per_month,
            models,
            in_flight,
            requests_last_minute,
            tokens_today,
            credits_this_month,
            refused,
        } = v;
        KeyView {
            name,
            state,
            enabled,
            expires,
            rpm,
            max_concurrency,
            tokens_per_day,
            credits_per_month,
            models,
            in_flight,
            requests_last_minute,
            tokens_today,
            credits_this_month,
            refused,
        }
    }
}

/// `GET /v1/usage?days=N&by=key|account|model`: one row per UTC day and name. (Its own type;
/// see [`KeyView`].)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageLine {
    /// `YYYY-MM-DD` (UTC).
    pub day: String,
    /// `key`, `account` or `model`.
    pub by: String,
    pub name: String,
    pub requests: u64,
    pub errors: u64,
    pub tokens_in: u64,
    pub tokens_out: u64,
    pub credits: f64,
}

impl From<crate::keys::usage::UsageLine> for UsageLine {
    fn from(r: crate::keys::usage::UsageLine) -> UsageLine {
        let crate::keys::usage::UsageLine { day, by, name, requests, errors, tokens_in, tokens_out, credits } =
            r;
        UsageLine { day, by, name, requests, errors, tokens_in, tokens_out, credits }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub server_version: String,
    pub api_version: u32,
    pub pid: u32,
    pub started_at: u64,
    pub uptime_secs: u64,
    pub listeners: Vec<String>,
    pub config: ConfigState,
    pub pool: PoolState,
    pub streams_in_flight: i64,
    pub accounts: Vec<AccountInfo>,
    /// Why the daemon is degraded beside its accounts' states: the state store failing to take
    /// writes, rotated refresh tokens held in memory only. Absent when all is well.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistence_problem: Option<String>,
    /// With `[cluster]`: the nodes and the account leases, as PostgreSQL holds them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterState>,
}

/// The fleet as one node sees it in PostgreSQL.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClusterState {
    /// The node that answered.
    pub node_id: String,
    pub nodes: Vec<NodeState>,
    pub leases: Vec<LeaseState>,
    /// Why PostgreSQL could not be asked (then `nodes` and `leases` are empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeState {
    pub node_id: String,
    /// Milliseconds since its last heartbeat.
    pub heartbeat_age_ms: i64,
    /// Its heartbeat is younger than a lease.
    pub alive: bool,
    pub status: String,
    /// Unexpired leases it holds.
    pub leases: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LeaseState {
    pub account: String,
    pub node_id: Option<String>,
    pub epoch: i64,
    /// Milliseconds until it expires (negative: expired).
    pub expires_in_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConfigState {
    pub config_file: String,
    pub accounts_file: String,
    /// Unix seconds of the last successful load of the accounts file.
    pub loaded_at: u64,
    /// The last reload's problem (the last good set keeps serving), if the last attempt failed.
    pub last_reload_error: Option<String>,
    pub last_reload_at: Option<u64>,
}

/// Accounts by state. (Its own type: a change inside the pool must not change this wire
/// format, [`API_VERSION`] 1, without anyone noticing.)
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PoolState {
    pub total: usize,
    pub active: usize,
    pub cooling: usize,
    pub quota: usize,
    pub suspended: usize,
    pub invalid: usize,
    pub disabled: usize,
    pub in_flight: u64,
    /// Accounts whose rotated refresh token is held in memory only (storing it failed).
    #[serde(default)]
    pub unsaved: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AccountInfo {
    pub id: String,
    pub label: String,
    pub enabled: bool,
    /// active, cooling, quota, suspended, disabled, invalid.
    pub state: String,
    pub since: Option<u64>,
    pub until: Option<u64>,
    pub reason: Option<String>,
    pub token_expires_at: Option<u64>,
    /// First 8 hex digits of the access token's SHA-256.
    pub token_fingerprint: Option<String>,
    pub in_flight: u32,
    pub max_concurrency: u32,
    pub weight: u32,
    pub requests: u64,
    pub failures: u64,
    pub tokens_in: u64,
    pub tokens_out: u64,
    /// Upstream credits charged to the account (`meteringEvent`).
    #[serde(default)]
    pub credits: f64,
    pub last_used: Option<u64>,
    pub last_error: Option<String>,
    /// When the last error happened (unix seconds); both clear when the account serves again.
    #[serde(default)]
    pub last_error_at: Option<u64>,
    /// The rotated refresh token is held in memory only: storing it failed (retrying).
    #[serde(default)]
    pub tokens_unsaved: bool,
    /// `oidc`, `social` or `api-key`.
    #[serde(default)]
    pub kind: String,
    /// The chat endpoint in use (`q` or `runtime`), once one has taken the credentials.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// The profile ARN the account's calls carry (not a secret), when known.
    #[serde(default)]
    pub profile_arn: Option<String>,
    /// Requests started in the last 60 s, and the account's `rpm` limit.
    #[serde(default)]
    pub requests_last_minute: u32,
    #[serde(default)]
    pub rpm: Option<u32>,
    /// The service model ids its catalog offers (empty until fetched).
    #[serde(default)]
    pub models: Vec<String>,
    /// When the catalog was fetched (unix seconds), and the last fetch's failure while the last
    /// good catalog serves.
    #[serde(default)]
    pub catalog_fetched_at: Option<u64>,
    #[serde(default)]
    pub catalog_error: Option<String>,
    /// The Amazon Q model id of the last request the account took (since the daemon started).
    #[serde(default)]
    pub last_model: Option<String>,
}

/// The result of an action on one account (refresh, check, enable, disable).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ActionResult {
    pub id: String,
    pub ok: bool,
    /// What happened, for people ("token refreshed, expires in 59 min", "suspended: …").
    pub message: String,
    /// The account's state afterwards.
    pub state: String,
    /// `[cluster]`: the account is held by another node; the action was queued for it (in
    /// PostgreSQL) rather than done here.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub queued: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReloadResult {
    pub ok: bool,
    /// What changed ("added a, removed b", "no changes").
    pub changes: String,
    /// Every problem when the new files were refused (the old set keeps serving).
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorBody {
    pub error: String,
}

/// `GET /v1/export`: every account's live credentials, as accounts.toml needs them; the refresh
/// token is the head of the daemon's chain (a rotated successor of the file's when `rotated`).
/// The one answer of this API that carries secrets: root and the daemon's own user only.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Export {
    pub accounts_file: String,
    /// Unix seconds.
    pub exported_at: u64,
    pub accounts: Vec<ExportedAccount>,
}

/// One account of an [`Export`]: the accounts.toml keys it was configured with, secrets
/// included, with the live refresh token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExportedAccount {
    pub id: String,
    pub label: String,
    /// `oidc`, `social` or `api-key`.
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    /// The refresh token came from a rotation: the file's one is dead.
    #[serde(default)]
    pub rotated: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile_arn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_region: Option<String>,
    pub enabled: bool,
    pub weight: u32,
    pub max_concurrency: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<u32>,
    /// The egress proxy URL, its password included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wire form of `GET /v1/keys` and `GET /v1/usage` at API version 1, field by field and
    /// in order (what amqctl and scripts read), built from the daemon's own types.
    #[test]
    fn keys_and_usage_rows_keep_their_version_1_json() {
        let key = KeyView::from(crate::keys::KeyView {
            name: "alice".into(),
            state: "active".into(),
            enabled: true,
            expires: Some(1_900_000_000),
            rpm: Some(60),
            max_concurrency: None,
            tokens_per_day: Some(100_000),
            credits_per_month: Some(12.5),
            models: vec!["claude-sonnet-4-5".into()],
            in_flight: 2,
            requests_last_minute: 7,
            tokens_today: 4_321,
            credits_this_month: 1.25,
            refused: 3,
        });
        assert_eq!(
            serde_json::to_string(&key).unwrap(),
            r#"{"name":"alice","state":"active","enabled":true,"expires":1900000000,"rpm":60,"max_concurrency":null,"tokens_per_day":100000,"credits_per_month":12.5,"models":["claude-sonnet-4-5"],"in_flight":2,"requests_last_minute":7,"tokens_today":4321,"credits_this_month":1.25,"refused":3}"#
        );
        let row = UsageLine::from(crate::keys::usage::UsageLine {
            day: "2026-12-06".into(),
            by: "key".into(),
            name: "alice".into(),
            requests: 10,
            errors: 1,
            tokens_in: 900,
            tokens_out: 300,
            credits: 0.5,
        });
        let json = serde_json::to_string(&row).unwrap();
        assert_eq!(
            json,
            r#"{"day":"2026-12-06","by":"key","name":"alice","requests":10,"errors":1,"tokens_in":900,"tokens_out":300,"credits":0.5}"#
        );
        assert_eq!(
            serde_json::from_str::<UsageLine>(&json).unwrap(),
            row,
            "amqctl reads what the daemon writes"
        );
        let key_json = serde_json::to_string(&key).unwrap();
        assert_eq!(serde_json::from_str::<KeyView>(&key_json).unwrap(), key);
    }
}
