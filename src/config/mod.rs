//! Configuration: `amq2api.toml`, `accounts.toml` and `keys.toml` — read safely, parse, validate
//! (every problem, with place), typed diffs for reloads, and the [`Secret`] newtype.

pub mod accounts;
pub mod diag;
mod file;
pub mod keys;
pub mod read;
pub mod secret;
mod shape;

pub use accounts::{
    AccountChange, AccountId, AccountSet, AccountSpec, AccountsDiff, Credentials, Kind, Proxy, ProxyScheme,
};
pub use diag::{Diagnostic, Diagnostics, Severity};
pub use file::parse_config;
pub use keys::{KeySet, KeySpec};
pub use secret::{ApiKeys, Secret};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the daemon looks for its configuration when neither `--config` nor `$AMQ2API_CONFIG`
/// names a file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/amq2api/amq2api.toml";

/// The validated `amq2api.toml`.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this came from (relative paths inside it are resolved against its directory).
    pub path: PathBuf,
    pub server: ServerConfig,
    pub auth: AuthConfig,
    pub upstream: UpstreamConfig,
    pub accounts: AccountsConfig,
    /// Claude model-name prefix → Amazon Q `modelId`, in file order; `"*"` is the fallback.
    pub models: Vec<(String, String)>,
    pub state: StateConfig,
    pub control: ControlConfig,
    /// `[cluster]`: several nodes on one PostgreSQL; `None` = one node on redb.
    pub cluster: Option<ClusterConfig>,
}

/// `[cluster]`: the PostgreSQL store and account leases.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// `postgresql://…`; TLS (rustls) when it says `sslmode=require` (or `prefer`).
    pub database_url: Secret,
    /// This node's name in leases and `amqctl status` (default: the host name).
    pub node_id: String,
    /// How long a lease lasts without renewal (default 15 s).
    pub lease: Duration,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: Vec<SocketAddr>,
    pub tls: Option<TlsFiles>,
    pub allow_plaintext: bool,
    pub max_body_bytes: u64,
    /// Largest `/v1/messages/count_tokens` body (the smaller of this and `max_body_bytes`
    /// applies): counting is the heaviest work a request can ask for.
    pub count_tokens_max_bytes: u64,
    /// Longest a request waits for its turn (the body budget, then a CPU slot) before it is
    /// answered 529 `overloaded_error`.
    pub queue_timeout: Duration,
    pub request_timeout: Duration,
    pub header_read_timeout: Duration,
    /// The whole request body must arrive within this time.
    pub body_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub max_header_count: usize,
    pub max_header_bytes: usize,
    pub drain_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub keys: ApiKeys,
    pub allow_anonymous: bool,
    /// Named keys with limits (`keys.toml`), watched and reloaded like the accounts file.
    pub keys_file: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Amazon Q (`q.*`) chat and catalog endpoint.
    pub endpoint: Template,
    /// Kiro runtime (`runtime.*.kiro.dev`) chat endpoint.
    pub runtime_endpoint: Template,
    /// Kiro management (`management.*.kiro.dev`) catalog endpoint.
    pub management_endpoint: Template,
    /// SSO OIDC `CreateToken` (oidc accounts).
    pub token_endpoint: Template,
    /// The Kiro auth service's `refreshToken` (social accounts).
    pub social_token_endpoint: Template,
    /// How long an account-level "suspicious activity" 429 parks the account.
    pub suspicious_cooldown: Duration,
    pub ca_file: Option<PathBuf>,
    pub connect_timeout: Duration,
    pub first_byte_timeout: Duration,
    pub stream_idle_timeout: Duration,
    pub max_attempts: u32,
}

/// The endpoints' defaults (`{region}`: the account's region, or `auth_region` for token endpoints).
pub const DEFAULT_ENDPOINT: &str = "https://q.{region}.amazonaws.com/";
pub const DEFAULT_RUNTIME_ENDPOINT: &str = "https://runtime.{region}.kiro.dev/";
pub const DEFAULT_MANAGEMENT_ENDPOINT: &str = "https://management.{region}.kiro.dev/";
pub const DEFAULT_TOKEN_ENDPOINT: &str = "https://oidc.{region}.amazonaws.com/token";
pub const DEFAULT_SOCIAL_TOKEN_ENDPOINT: &str = "https://prod.{region}.auth.desktop.kiro.dev/refreshToken";

/// An endpoint URL that may hold `{region}`, checked when the configuration was loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template(String);

impl Template {
    pub fn new(text: &str) -> Template {
        Template(text.to_owned())
    }

    /// The URL for `region` (a validated region name).
    pub fn fill(&self, region: &str) -> http::Uri {
        let text = self.0.replace("{region}", region);
        text.parse().unwrap_or_else(|_| {
            // Checked at load with a sample region; region names are validated too.
            tracing::error!(template = %self.0, region, "an endpoint template gave an invalid URL");
            http::Uri::from_static("https://invalid.invalid/")
        })
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    LeastBusy,
    RoundRobin,
}

#[derive(Debug, Clone)]
pub struct AccountsConfig {
    pub file: PathBuf,
    pub strategy: Strategy,
    pub refresh_before_expiry: Duration,
    /// How long a request may wait for a free account when all are busy.
    pub queue_timeout: Duration,
    /// How often each account's model catalog is fetched again.
    pub catalog_refresh: Duration,
}

#[derive(Debug, Clone)]
pub struct StateConfig {
    pub dir: PathBuf,
    /// Days of usage (per key, account and model) kept in the store.
    pub usage_retention_days: u32,
}

#[derive(Debug, Clone)]
pub struct ControlConfig {
    pub socket: PathBuf,
    pub mode: u32,
}

/// The parts of the environment that change where things live (set by systemd).
#[derive(Debug, Clone, Default)]
pub struct Env {
    pub credentials_directory: Option<PathBuf>,
    pub state_directory: Option<PathBuf>,
    pub runtime_directory: Option<PathBuf>,
    /// `amq2api check-config` outside the service: what only the service's environment gives
    /// (the TLS key as a credential, with no `$CREDENTIALS_DIRECTORY` here) is a warning, not an
    /// error.
    pub checking: bool,
}

impl Env {
    pub fn from_process() -> Self {
        let get = |k: &str| {
            std::env::var_os(k).filter(|v| !v.is_empty()).map(|v| {
                // systemd may pass several colon-separated directories; the first is ours.
                let s = v.to_string_lossy().into_owned();
                PathBuf::from(s.split(':').next().unwrap_or_default())
            })
        };
        Env {
            credentials_directory: get("CREDENTIALS_DIRECTORY"),
            state_directory: get("STATE_DIRECTORY"),
            runtime_directory: get("RUNTIME_DIRECTORY"),
            checking: false,
        }
    }
}

/// A validated pair of files.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    pub accounts: AccountSet,
    /// The named keys (empty without `[auth] keys_file`).
    pub keys: KeySet,
    /// Warnings found on the way (for example a world-readable accounts file).
    pub warnings: Diagnostics,
}

/// Reads and validates `amq2api.toml` and the accounts file it names. On failure every problem
/// of both files is returned.
pub fn load(path: &Path, env: &Env) -> Result<Loaded, Diagnostics> {
    let mut diags = Diagnostics::default();
    let source = match read::read_text(path) {
        Ok(s) => s,
        Err(e) => {
            diags.0.push(Diagnostic {
                severity: Severity::Error,
                file: path.to_path_buf(),
                position: None,
                message: format!("cannot read the configuration file: {e}"),
            });
            return Err(diags);
        }
    };
    let config = match parse_config(path, &source, env) {
        Ok((config, warnings)) => {
            diags.extend(warnings);
            Some(config)
        }
        Err(errors) => {
            diags.extend(errors);
            None
        }
    };
    // The accounts file is checked even when the main file has errors, so one run lists all.
    let accounts_path =
        config.as_ref().map(|c| c.accounts.file.clone()).or_else(|| file::accounts_path_hint(path, &source));
    let mut accounts = None;
    if let Some(ap) = accounts_path {
        match accounts::load(&ap) {
            Ok((set, warnings)) => {
                diags.extend(warnings);
                accounts = Some(set);
            }
            Err(errors) => diags.extend(errors),
        }
    }
    let mut keys = Some(KeySet::default());
    if let Some(kp) = config.as_ref().and_then(|c| c.auth.keys_file.clone()) {
        match keys::load(&kp) {
            Ok((set, warnings)) => {
                diags.extend(warnings);
                keys = Some(set);
            }
            Err(errors) => {
                diags.extend(errors);
                keys = None;
            }
        }
    }
    diags.sort();
    match (config, accounts, keys) {
        (Some(config), Some(accounts), Some(keys)) if !diags.has_errors() => {
            Ok(Loaded { config, accounts, keys, warnings: diags })
        }
        _ => Err(diags),
    }
}
