//! The `amq2api.toml` schema (serde, unknown keys refused) and its validation into [`Config`].

use super::diag::{Diagnostics, Reporter};
use super::secret::{ApiKeys, parse_api_key_entry};
use super::{
    AccountsConfig, AuthConfig, ClusterConfig, Config, ControlConfig, Env, Secret, ServerConfig, StateConfig,
    Strategy, TlsFiles, UpstreamConfig,
};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::Spanned;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    auth: RawAuth,
    #[serde(default)]
    upstream: RawUpstream,
    #[serde(default)]
    accounts: RawAccounts,
    #[serde(default)]
    models: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    state: RawState,
    #[serde(default)]
    control: RawControl,
    cluster: Option<RawCluster>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    database_url: Option<Spanned<String>>,
    node_id: Option<Spanned<String>>,
    lease_secs: Secs,
}

type Secs = Option<Spanned<i64>>;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<Spanned<Vec<Spanned<String>>>>,
    tls_cert: Option<Spanned<String>>,
    tls_key: Option<Spanned<String>>,
    #[serde(default)]
    allow_plaintext: bool,
    max_body_bytes: Option<Spanned<i64>>,
    count_tokens_max_bytes: Option<Spanned<i64>>,
    queue_timeout_secs: Secs,
    request_timeout_secs: Secs,
    header_read_timeout_secs: Secs,
    body_read_timeout_secs: Secs,
    idle_timeout_secs: Secs,
    max_connections: Option<Spanned<i64>>,
    max_header_count: Option<Spanned<i64>>,
    max_header_bytes: Option<Spanned<i64>>,
    drain_timeout_secs: Secs,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    #[serde(default)]
    api_keys: Vec<Spanned<String>>,
    api_keys_file: Option<Spanned<String>>,
    keys_file: Option<Spanned<String>>,
    #[serde(default)]
    allow_anonymous: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    endpoint: Option<Spanned<String>>,
    runtime_endpoint: Option<Spanned<String>>,
    management_endpoint: Option<Spanned<String>>,
    token_endpoint: Option<Spanned<String>>,
    social_token_endpoint: Option<Spanned<String>>,
    suspicious_cooldown_secs: Secs,
    ca_file: Option<Spanned<String>>,
    connect_timeout_secs: Secs,
    first_byte_timeout_secs: Secs,
    stream_idle_timeout_secs: Secs,
    max_attempts: Option<Spanned<i64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAccounts {
    file: Option<Spanned<String>>,
    strategy: Option<Spanned<String>>,
    refresh_before_expiry_secs: Secs,
    queue_timeout_secs: Secs,
    catalog_refresh_secs: Secs,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawState {
    dir: Option<Spanned<String>>,
    usage_retention_days: Option<Spanned<i64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawControl {
    socket: Option<Spanned<String>>,
    mode: Option<Spanned<String>>,
}

const DEFAULT_LISTEN: &str = "0.0.0.0:8443";
/// The placeholder key of examples/amq2api.toml (check-config warns when it is in use).
const EXAMPLE_API_KEY: &str = "sk-amq-example-change-me-0123456789";
const DEFAULT_ACCOUNTS_FILE: &str = "/etc/amq2api/accounts.toml";
const DEFAULT_STATE_DIR: &str = "/var/lib/amq2api";
const DEFAULT_CONTROL_SOCKET: &str = "/run/amq2api/control.sock";

/// Resolves a path from the file against the file's own directory.
fn resolve(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() { p.to_path_buf() } else { base.parent().unwrap_or(Path::new(".")).join(p) }
}

/// The accounts path named by a file that failed validation, so its accounts can still be checked.
pub(super) fn accounts_path_hint(path: &Path, source: &str) -> Option<PathBuf> {
    let value: toml::Table = toml::from_str(source).ok()?;
    let file = value.get("accounts")?.get("file");
    match file {
        Some(v) => v.as_str().map(|s| resolve(path, s)),
        None => Some(PathBuf::from(DEFAULT_ACCOUNTS_FILE)),
    }
}

struct Checker<'a> {
    rep: Reporter<'a>,
}

impl Checker<'_> {
    /// A whole number within `min..=max`, or the default when absent.
    fn number(&mut self, v: &Option<Spanned<i64>>, key: &str, default: i64, min: i64, max: i64) -> i64 {
        match v {
            None => default,
            Some(s) if (min..=max).contains(s.get_ref()) => *s.get_ref(),
            Some(s) => {
                self.rep.error_at(
                    Some(s.span()),
                    format!("`{key}` must be a whole number from {min} to {max}, not {}", s.get_ref()),
                );
                default
            }
        }
    }

    fn secs(&mut self, v: &Secs, key: &str, default: u64, min: i64, max: i64) -> Duration {
        Duration::from_secs(self.number(v, key, default as i64, min, max) as u64)
    }

    fn readable_file(&mut self, s: &Spanned<String>, base: &Path, what: &str) -> PathBuf {
        let p = resolve(base, s.get_ref());
        if let Err(e) = super::read::read_bytes(&p) {
            self.rep.error_at(Some(s.span()), format!("{what} {} cannot be read: {e}", p.display()));
        }
        p
    }

    /// An endpoint URL that may hold `{region}`: checked with a region filled in; the default
    /// when the key is absent (or wrong: the error is reported).
    fn template(&mut self, s: &Option<Spanned<String>>, key: &str, default: &str) -> super::Template {
        let Some(text) = s else { return super::Template::new(default) };
        let filled = text.get_ref().replace("{region}", "us-east-1");
        if filled.contains(['{', '}']) {
            self.rep.error_at(
                Some(text.span()),
                format!("`{key}` {:?}: the only placeholder is {{region}}", text.get_ref()),
            );
            return super::Template::new(default);
        }
        let probe = Some(Spanned::new(text.span(), filled));
        match self.uri(&probe, key) {
            Some(_) => super::Template::new(text.get_ref()),
            None => super::Template::new(default),
        }
    }

    fn uri(&mut self, s: &Option<Spanned<String>>, key: &str) -> Option<http::Uri> {
        let s = s.as_ref()?;
        let text = s.get_ref();
        let uri: http::Uri = match text.parse() {
            Ok(u) => u,
            Err(e) => {
                self.rep.error_at(Some(s.span()), format!("`{key}` {text:?} is not a URL: {e}"));
                return None;
            }
        };
        let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
        match uri.scheme_str() {
            Some("https") if !host.is_empty() => Some(uri),
            Some("http") if is_loopback_host(host) => Some(uri),
            Some("http") => {
                self.rep.error_at(
                    Some(s.span()),
                    format!("`{key}` {text:?}: http:// is accepted only for loopback addresses (the emulator, tests); use https://"),
                );
                None
            }
            _ => {
                self.rep.error_at(
                    Some(s.span()),
                    format!("`{key}` {text:?} must be an https:// URL with a host"),
                );
                None
            }
        }
    }
}

fn is_loopback_host(host: &str) -> bool {
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Parses and validates the text of `amq2api.toml`. Every problem is reported with its place.
/// Returns the config and any warnings, or all the errors found.
/// A cluster node id: 1 to 64 letters, digits and `_ . -`.
fn valid_node_id(v: &str) -> bool {
    !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

pub fn parse_config(path: &Path, source: &str, env: &Env) -> Result<(Config, Diagnostics), Diagnostics> {
    let mut ck = Checker { rep: Reporter::new(path, source) };
    let Some(raw) = super::shape::deserialize::<RawConfig>(&mut ck.rep, source) else {
        return Err(ck.rep.out);
    };

    // [server]
    let s = &raw.server;
    let mut listen = Vec::new();
    let mut listen_spans = Vec::new();
    match &s.listen {
        None => listen.push(DEFAULT_LISTEN.parse::<SocketAddr>().expect("valid default")),
        Some(list) => {
            if list.get_ref().is_empty() {
                ck.rep.error_at(
                    Some(list.span()),
                    "`listen` is empty: give at least one address such as \"127.0.0.1:8443\" (systemd socket activation overrides it)",
                );
            }
            for entry in list.get_ref() {
                match entry.get_ref().parse::<SocketAddr>() {
                    Ok(a) => {
                        listen.push(a);
                        listen_spans.push(Some(entry.span()));
                    }
                    Err(_) => ck.rep.error_at(
                        Some(entry.span()),
                        format!(
                            "listen address {:?} is not IP:PORT (expected e.g. \"0.0.0.0:8443\" or \"[::1]:8443\")",
                            entry.get_ref()
                        ),
                    ),
                }
            }
        }
    }
    let cert = s.tls_cert.as_ref().map(|c| ck.readable_file(c, path, "tls_cert"));
    let credential_key = env.credentials_directory.as_ref().map(|d| d.join("tls.key")).filter(|p| p.exists());
    let key = match (&s.tls_key, credential_key) {
        (_, Some(k)) => Some(k),
        (Some(k), None) => Some(ck.readable_file(k, path, "tls_key")),
        (None, None) => None,
    };
    let tls = match (cert, key) {
        (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
        (Some(_), None) if env.checking && env.credentials_directory.is_none() => {
            ck.rep.warning_at(
                s.tls_cert.as_ref().map(|c| c.span()),
                "`tls_cert` is set without `tls_key`: the daemon needs the key as $CREDENTIALS_DIRECTORY/tls.key \
                 (the unit's LoadCredential=tls.key:…), which only the service has; the certificate and key are \
                 not checked here",
            );
            None
        }
        (Some(_), None) => {
            ck.rep.error_at(
                s.tls_cert.as_ref().map(|c| c.span()),
                "`tls_cert` is set without `tls_key` (or $CREDENTIALS_DIRECTORY/tls.key): both are needed for HTTPS",
            );
            None
        }
        (None, Some(_)) => {
            ck.rep.error_at(
                s.tls_key.as_ref().map(|c| c.span()),
                "`tls_key` is set without `tls_cert`: both are needed for HTTPS",
            );
            None
        }
        (None, None) => None,
    };
    if s.tls_cert.is_none() && !s.allow_plaintext {
        for (addr, span) in listen.iter().zip(listen_spans.iter().chain(std::iter::repeat(&None))) {
            if !addr.ip().is_loopback() {
                let span = span.clone().or_else(|| s.listen.as_ref().map(|l| l.span()));
                ck.rep.error_at(
                    span,
                    format!(
                        "listen address {addr} is not loopback and no TLS is configured: set tls_cert and tls_key, listen on 127.0.0.1, or set allow_plaintext = true"
                    ),
                );
            }
        }
    }
    let server = ServerConfig {
        listen,
        tls,
        allow_plaintext: s.allow_plaintext,
        max_body_bytes: ck.number(&s.max_body_bytes, "max_body_bytes", 32 << 20, 1024, 1 << 30) as u64,
        count_tokens_max_bytes: ck.number(
            &s.count_tokens_max_bytes,
            "count_tokens_max_bytes",
            16 << 20,
            1024,
            1 << 30,
        ) as u64,
        queue_timeout: ck.secs(&s.queue_timeout_secs, "queue_timeout_secs", 30, 1, 3600),
        request_timeout: ck.secs(&s.request_timeout_secs, "request_timeout_secs", 3600, 1, 86_400),
        header_read_timeout: ck.secs(&s.header_read_timeout_secs, "header_read_timeout_secs", 10, 1, 600),
        body_read_timeout: ck.secs(&s.body_read_timeout_secs, "body_read_timeout_secs", 30, 1, 3600),
        idle_timeout: ck.secs(&s.idle_timeout_secs, "idle_timeout_secs", 120, 1, 86_400),
        max_connections: ck.number(&s.max_connections, "max_connections", 4096, 1, 1_000_000) as usize,
        max_header_count: ck.number(&s.max_header_count, "max_header_count", 100, 8, 1000) as usize,
        max_header_bytes: ck.number(&s.max_header_bytes, "max_header_bytes", 64 << 10, 1024, 1 << 20)
            as usize,
        drain_timeout: ck.secs(&s.drain_timeout_secs, "drain_timeout_secs", 20, 0, 3600),
    };

    // [auth]
    let mut digests = Vec::new();
    for k in &raw.auth.api_keys {
        match parse_api_key_entry(k.get_ref()) {
            Ok(d) => digests.push(d),
            Err(msg) => ck.rep.error_at(Some(k.span()), format!("api_keys entry: {msg}")),
        }
    }
    if let Some(f) = &raw.auth.api_keys_file {
        let p = resolve(path, f.get_ref());
        match super::read::read_text(&p) {
            Err(e) => {
                ck.rep.error_at(Some(f.span()), format!("api_keys_file {} cannot be read: {e}", p.display()))
            }
            Ok(text) => {
                for (n, line) in text.lines().enumerate() {
                    let line = line.trim();
                    if line.is_empty() || line.starts_with('#') {
                        continue;
                    }
                    match parse_api_key_entry(line) {
                        Ok(d) => digests.push(d),
                        Err(msg) => ck.rep.error_at(
                            Some(f.span()),
                            format!("api_keys_file {} line {}: {msg}", p.display(), n + 1),
                        ),
                    }
                }
            }
        }
    }
    if digests.contains(&crate::hash::sha256(EXAMPLE_API_KEY.as_bytes())) {
        ck.rep.warning_at(
            raw.auth.api_keys.first().map(|k| k.span()),
            "the example API key from examples/amq2api.toml is configured: replace it with your own secret",
        );
    }
    let keys = ApiKeys::new(digests);
    let keys_file = raw.auth.keys_file.as_ref().map(|f| resolve(path, f.get_ref()));
    if keys.is_empty() && keys_file.is_none() && !raw.auth.allow_anonymous && !ck.rep.out.has_errors() {
        ck.rep.error_at(
            None,
            "[auth] has no api_keys (and no api_keys_file entries, no keys_file): add a key, or set allow_anonymous = true for a loopback-only setup",
        );
    }
    // With a keys file too: anonymous access begins the moment the file holds no key (emptied,
    // or every entry removed), on whatever the daemon listens on.
    if raw.auth.allow_anonymous && keys.is_empty() {
        for addr in server.listen.iter().filter(|a| !a.ip().is_loopback()) {
            ck.rep.error_at(
                s.listen.as_ref().map(|l| l.span()),
                format!("allow_anonymous without api_keys is only allowed on loopback listeners, and {addr} is not one"),
            );
        }
    }
    let auth = AuthConfig { keys, allow_anonymous: raw.auth.allow_anonymous, keys_file };

    // [upstream]
    let u = &raw.upstream;
    let upstream = UpstreamConfig {
        endpoint: ck.template(&u.endpoint, "endpoint", super::DEFAULT_ENDPOINT),
        runtime_endpoint: ck.template(
            &u.runtime_endpoint,
            "runtime_endpoint",
            super::DEFAULT_RUNTIME_ENDPOINT,
        ),
        management_endpoint: ck.template(
            &u.management_endpoint,
            "management_endpoint",
            super::DEFAULT_MANAGEMENT_ENDPOINT,
        ),
        token_endpoint: ck.template(&u.token_endpoint, "token_endpoint", super::DEFAULT_TOKEN_ENDPOINT),
        social_token_endpoint: ck.template(
            &u.social_token_endpoint,
            "social_token_endpoint",
            super::DEFAULT_SOCIAL_TOKEN_ENDPOINT,
        ),
        suspicious_cooldown: ck.secs(
            &u.suspicious_cooldown_secs,
            "suspicious_cooldown_secs",
            1800,
            1,
            86_400 * 7,
        ),
        ca_file: u.ca_file.as_ref().map(|c| ck.readable_file(c, path, "ca_file")),
        connect_timeout: ck.secs(&u.connect_timeout_secs, "connect_timeout_secs", 10, 1, 600),
        first_byte_timeout: ck.secs(&u.first_byte_timeout_secs, "first_byte_timeout_secs", 120, 1, 3600),
        stream_idle_timeout: ck.secs(&u.stream_idle_timeout_secs, "stream_idle_timeout_secs", 120, 1, 3600),
        max_attempts: ck.number(&u.max_attempts, "max_attempts", 3, 1, 100) as u32,
    };

    // [accounts]
    let a = &raw.accounts;
    let strategy = match a.strategy.as_ref().map(|s| (s.get_ref().as_str(), s.span())) {
        None | Some(("least-busy", _)) => Strategy::LeastBusy,
        Some(("round-robin", _)) => Strategy::RoundRobin,
        Some((other, span)) => {
            ck.rep.error_at(
                Some(span),
                format!("unknown strategy {other:?} (expected \"least-busy\" or \"round-robin\")"),
            );
            Strategy::LeastBusy
        }
    };
    let accounts = AccountsConfig {
        file: a
            .file
            .as_ref()
            .map(|f| resolve(path, f.get_ref()))
            .unwrap_or_else(|| DEFAULT_ACCOUNTS_FILE.into()),
        strategy,
        refresh_before_expiry: ck.secs(
            &a.refresh_before_expiry_secs,
            "refresh_before_expiry_secs",
            300,
            30,
            3000,
        ),
        queue_timeout: ck.secs(&a.queue_timeout_secs, "queue_timeout_secs", 30, 0, 600),
        catalog_refresh: ck.secs(&a.catalog_refresh_secs, "catalog_refresh_secs", 3600, 60, 86_400 * 7),
    };

    // [models]
    let mut models = Vec::new();
    for (prefix, target) in &raw.models {
        let t = target.get_ref();
        if t.is_empty() || !t.bytes().all(|b| b.is_ascii_alphanumeric() || b"_:.-".contains(&b)) {
            ck.rep.error_at(
                Some(target.span()),
                format!(
                    "[models] {prefix:?} = {t:?}: an Amazon Q modelId is made of letters, digits and _ : . -"
                ),
            );
        } else {
            models.push((prefix.clone(), t.clone()));
        }
    }

    // [state], [control]
    let state = StateConfig {
        dir: match (&raw.state.dir, &env.state_directory) {
            (Some(d), _) => resolve(path, d.get_ref()),
            (None, Some(envdir)) => envdir.clone(),
            (None, None) => DEFAULT_STATE_DIR.into(),
        },
        usage_retention_days: ck.number(
            &raw.state.usage_retention_days,
            "usage_retention_days",
            400,
            1,
            36_500,
        ) as u32,
    };
    let mode = match &raw.control.mode {
        None => 0o660,
        Some(m) => match u32::from_str_radix(m.get_ref().trim_start_matches("0o"), 8) {
            Ok(v) if v <= 0o777 => v,
            _ => {
                ck.rep.error_at(
                    Some(m.span()),
                    format!("control mode {:?} is not an octal file mode such as \"0660\"", m.get_ref()),
                );
                0o660
            }
        },
    };
    let control = ControlConfig {
        socket: match (&raw.control.socket, &env.runtime_directory) {
            (Some(s), _) => resolve(path, s.get_ref()),
            (None, Some(rt)) => rt.join("control.sock"),
            (None, None) => DEFAULT_CONTROL_SOCKET.into(),
        },
        mode,
    };

    // [cluster]
    let cluster = match &raw.cluster {
        None => None,
        Some(c) => {
            let url = match &c.database_url {
                Some(u)
                    if u.get_ref().starts_with("postgresql://") || u.get_ref().starts_with("postgres://") =>
                {
                    match crate::store::postgres::parse_url(u.get_ref()) {
                        Ok(_) => Some(Secret::new(u.get_ref().clone())),
                        Err(e) => {
                            ck.rep.error_at(Some(u.span()), format!("[cluster] {e}"));
                            None
                        }
                    }
                }
                Some(u) => {
                    ck.rep.error_at(
                        Some(u.span()),
                        "[cluster] database_url must be a postgresql://… URL".to_owned(),
                    );
                    None
                }
                None => {
                    ck.rep.error_at(None, "[cluster] needs database_url = \"postgresql://…\"".to_owned());
                    None
                }
            };
            let node_id = match &c.node_id {
                Some(n) => {
                    let v = n.get_ref();
                    if !valid_node_id(v) {
                        ck.rep.error_at(
                            Some(n.span()),
                            format!("[cluster] node_id {v:?}: 1 to 64 letters, digits and _ . -"),
                        );
                    }
                    v.clone()
                }
                // The host name from the kernel (`gethostname(2)`: /proc/sys is hidden under
                // the unit's `ProcSubset=pid`, where reading it gave every node one id). Two
                // nodes under one id would renew and take each other's leases: without a host
                // name that can be an id, the operator must name the node.
                None => match nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()) {
                    Some(h) if valid_node_id(h.trim()) => h.trim().to_owned(),
                    other => {
                        ck.rep.error_at(
                            None,
                            format!(
                                "[cluster] needs node_id: the host name {:?} cannot serve as one (1 to 64 letters, digits and _ . -)",
                                other.unwrap_or_default()
                            ),
                        );
                        String::new()
                    }
                },
            };
            let lease = match &c.lease_secs {
                None => Duration::from_secs(15),
                Some(v) if (2..=3600).contains(v.get_ref()) => Duration::from_secs(*v.get_ref() as u64),
                Some(v) => {
                    ck.rep.error_at(Some(v.span()), "[cluster] lease_secs must be 2 to 3600".to_owned());
                    Duration::from_secs(15)
                }
            };
            url.map(|database_url| ClusterConfig { database_url, node_id, lease })
        }
    };

    if ck.rep.out.has_errors() {
        return Err(ck.rep.out);
    }
    let config = Config {
        path: path.to_path_buf(),
        server,
        auth,
        upstream,
        accounts,
        models,
        state,
        control,
        cluster,
    };
    Ok((config, ck.rep.out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(src: &str) -> Result<Config, Diagnostics> {
        parse_config(Path::new("/etc/amq2api/amq2api.toml"), src, &Env::default()).map(|(c, _)| c)
    }

    /// Without `node_id`, a cluster node is named by the kernel's host name (read with
    /// `gethostname(2)`, which `ProcSubset=pid` does not hide as it hides /proc/sys).
    #[test]
    fn a_cluster_node_is_named_by_its_host_name() {
        let src = "[server]\nlisten = [\"127.0.0.1:8080\"]\n[auth]\napi_keys = [\"sk-amq-0123456789abcdef\"]\n\
                   [accounts]\nfile = \"accounts.toml\"\n[cluster]\ndatabase_url = \"postgresql://u@h/db\"\n";
        let host = nix::unistd::gethostname().unwrap().into_string().unwrap();
        let c = parse(src).unwrap();
        assert_eq!(c.cluster.unwrap().node_id, host.trim());
        let named = parse(&format!("{src}node_id = \"n-1\"\n")).unwrap();
        assert_eq!(named.cluster.unwrap().node_id, "n-1");
        assert!(parse(&format!("{src}node_id = \"a b\"\n")).is_err());
    }

    #[test]
    fn minimal_loopback_config() {
        let c = parse(
            r#"
[server]
listen = ["127.0.0.1:8080"]
[auth]
api_keys = ["sk-amq-0123456789abcdef"]
[accounts]
file = "accounts.toml"
"#,
        )
        .unwrap();
        assert_eq!(c.server.listen, vec!["127.0.0.1:8080".parse().unwrap()]);
        assert_eq!(c.accounts.file, PathBuf::from("/etc/amq2api/accounts.toml"));
        assert_eq!(c.accounts.strategy, Strategy::LeastBusy);
        assert_eq!(c.upstream.max_attempts, 3);
        assert_eq!(c.upstream.endpoint.as_str(), super::super::DEFAULT_ENDPOINT);
        assert_eq!(c.control.mode, 0o660);
        assert!(c.auth.keys.verify("sk-amq-0123456789abcdef"));
        assert_eq!(c.server.count_tokens_max_bytes, 16 << 20);
        assert_eq!(c.server.queue_timeout, Duration::from_secs(30));
    }

    #[test]
    fn all_problems_listed() {
        let err = parse(
            r#"
[server]
listen = ["nonsense", "0.0.0.0:8443"]
tls_key = "/nonexistent/key.pem"
max_body_bytes = -1
count_tokens_max_bytes = 10
queue_timeout_secs = 0
[accounts]
strategy = "random"
[upstream]
endpoint = "http://example.com/"
"#,
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains(":3:11: error: listen address \"nonsense\""), "{text}");
        assert!(text.contains("tls_key /nonexistent/key.pem cannot be read"), "{text}");
        assert!(text.contains("`max_body_bytes` must be"), "{text}");
        assert!(text.contains("`count_tokens_max_bytes` must be a whole number from 1024"), "{text}");
        assert!(text.contains("`queue_timeout_secs` must be a whole number from 1"), "{text}");
        assert!(text.contains("unknown strategy \"random\""), "{text}");
        assert!(text.contains("http:// is accepted only for loopback"), "{text}");
        assert!(text.contains("0.0.0.0:8443 is not loopback and no TLS"), "{text}");
    }

    #[test]
    fn unknown_key_refused_with_place() {
        let err = parse("[server]\nlisten = [\"127.0.0.1:1\"]\nlisten_port = 3\n").unwrap_err();
        let text = err.to_string();
        assert!(text.contains(":3:1: error: unknown field `listen_port`"), "{text}");
    }

    /// Anonymous access only on loopback, with or without a keys file (an empty keys file
    /// lets anyone in).
    #[test]
    fn anonymous_access_is_loopback_only_even_with_a_keys_file() {
        for auth in ["allow_anonymous = true", "allow_anonymous = true\nkeys_file = \"keys.toml\""] {
            let text =
                format!("[server]\nlisten=[\"0.0.0.0:8080\"]\nallow_plaintext = true\n[auth]\n{auth}\n");
            let e = parse_config(Path::new("/etc/a/amq2api.toml"), &text, &Env::default()).unwrap_err();
            let e = e.to_string();
            assert!(
                e.contains("only allowed on loopback listeners") && e.contains("0.0.0.0:8080"),
                "{auth}: {e}"
            );
            let text = text.replace("0.0.0.0", "127.0.0.1");
            assert!(parse_config(Path::new("/etc/a/amq2api.toml"), &text, &Env::default()).is_ok(), "{auth}");
        }
        // A key in the file itself: anonymous access can never begin.
        let text = "[server]\nlisten=[\"0.0.0.0:8080\"]\nallow_plaintext = true\n[auth]\nallow_anonymous = true\n\
                    api_keys = [\"sk-amq-0123456789abcdef\"]\n";
        assert!(parse_config(Path::new("/etc/a/amq2api.toml"), text, &Env::default()).is_ok());
    }

    #[test]
    fn environment_paths() {
        let env = Env {
            state_directory: Some("/var/lib/x".into()),
            runtime_directory: Some("/run/x".into()),
            credentials_directory: None,
            checking: false,
        };
        let (c, _) = parse_config(
            Path::new("/etc/a/amq2api.toml"),
            "[server]\nlisten=[\"127.0.0.1:1\"]\n[auth]\nallow_anonymous = true\n",
            &env,
        )
        .unwrap();
        assert_eq!(c.state.dir, PathBuf::from("/var/lib/x"));
        assert_eq!(c.control.socket, PathBuf::from("/run/x/control.sock"));
    }
}
