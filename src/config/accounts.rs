//! `accounts.toml`: the operator's list of Amazon Q accounts, parsed and validated.

use super::diag::{Diagnostics, Reporter};
use super::secret::Secret;
use crate::hash::sha256;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::num::NonZeroU32;
use std::path::Path;
use toml::Spanned;

/// An account id: `[a-z0-9_-]{1,64}`. The key the store, the pool and `amqctl` use.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AccountId(String);

impl AccountId {
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() || s.len() > 64 {
            return Err(format!("account id {s:?} must be 1 to 64 characters long"));
        }
        if !s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-') {
            return Err(format!("account id {s:?} may only contain lowercase letters, digits, '_' and '-'"));
        }
        Ok(AccountId(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What kind of account: how it gets a bearer token (PROTOCOL.md §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Builder ID / IAM Identity Center: OIDC `CreateToken` with a client registration.
    Oidc,
    /// Kiro sign-in with Google or GitHub: the Kiro auth service's `refreshToken`.
    Social,
    /// A Kiro API key: the key is the bearer; nothing to refresh.
    ApiKey,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Oidc => "oidc",
            Kind::Social => "social",
            Kind::ApiKey => "api-key",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An account's credentials, by kind: each kind carries exactly what it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    Oidc { client_id: Secret, client_secret: Secret, refresh_token: Secret },
    Social { refresh_token: Secret },
    ApiKey { key: Secret },
}

impl Credentials {
    pub fn kind(&self) -> Kind {
        match self {
            Credentials::Oidc { .. } => Kind::Oidc,
            Credentials::Social { .. } => Kind::Social,
            Credentials::ApiKey { .. } => Kind::ApiKey,
        }
    }

    /// The refresh token the file gives (the head of a new chain); an API key has none.
    pub fn refresh_token(&self) -> Option<&Secret> {
        match self {
            Credentials::Oidc { refresh_token, .. } | Credentials::Social { refresh_token } => {
                Some(refresh_token)
            }
            Credentials::ApiKey { .. } => None,
        }
    }
}

/// An egress proxy for one account's upstream, refresh and catalog traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proxy {
    pub scheme: ProxyScheme,
    pub host: String,
    pub port: u16,
    /// `user:password@` from the URL, when given.
    pub auth: Option<(String, Secret)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyScheme {
    /// `http://`: an HTTP `CONNECT` tunnel.
    Http,
    /// `socks5://` (names resolved by the client) or `socks5h://` (by the proxy).
    Socks5 { remote_dns: bool },
}

impl fmt::Display for Proxy {
    /// The URL without its password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match self.scheme {
            ProxyScheme::Http => "http",
            ProxyScheme::Socks5 { remote_dns: false } => "socks5",
            ProxyScheme::Socks5 { remote_dns: true } => "socks5h",
        };
        let user = self.auth.as_ref().map(|(u, _)| format!("{}:***@", percent_encode(u))).unwrap_or_default();
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        write!(f, "{scheme}://{user}{host}:{}", self.port)
    }
}

/// `s` with every byte but the unreserved ones (RFC 3986: letters, digits, `-._~`) written
/// `%XX`: a user name or password as a URL's userinfo holds it.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `%XX` sequences decoded (a proxy user name or password with `@`, `:`, `/` in it); a `%` not
/// followed by two hex digits is kept as it is (`50%off`, as browsers read URLs). `None` when
/// the bytes decoded are not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match hex.filter(|_| b[i] == b'%').and_then(|h| u8::from_str_radix(h, 16).ok()) {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Parses `http://[user:pass@]host:port` or `socks5[h]://[user:pass@]host:port`.
pub fn parse_proxy(url: &str) -> Result<Proxy, String> {
    let bad = |why: &str| {
        format!("proxy {:?} {why} (expected http://host:port or socks5://host:port)", redact_url(url))
    };
    let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("has no scheme"))?;
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "http" => ProxyScheme::Http,
        "socks5" => ProxyScheme::Socks5 { remote_dns: false },
        "socks5h" => ProxyScheme::Socks5 { remote_dns: true },
        "https" => {
            return Err(bad("is https://, which is not supported: TLS to the proxy is not implemented"));
        }
        _ => return Err(bad("has an unsupported scheme")),
    };
    // The user name and password first (percent-encoded, they may hold any character; a
    // password with a `/` in it is no path).
    let (auth, hostport) = match rest.rsplit_once('@') {
        Some((userinfo, hp)) => {
            let (u, p) = userinfo.split_once(':').unwrap_or((userinfo, ""));
            let (Some(u), Some(p)) = (percent_decode(u), percent_decode(p)) else {
                return Err(bad(
                    "has %-escapes in its user name or password that are not UTF-8 (write a literal % as %25)",
                ));
            };
            if u.is_empty() {
                return Err(bad("has an empty user name"));
            }
            (Some((u, Secret::new(p))), hp)
        }
        None => (None, rest),
    };
    let hostport = hostport.strip_suffix('/').unwrap_or(hostport);
    if hostport.contains('/') || hostport.contains('?') || hostport.contains('#') {
        return Err(bad("has a path"));
    }
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (h, p) = v6.split_once("]:").ok_or_else(|| bad("needs a port"))?;
        (h.to_owned(), p)
    } else {
        let (h, p) = hostport.rsplit_once(':').ok_or_else(|| bad("needs a port"))?;
        (h.to_owned(), p)
    };
    if host.is_empty() {
        return Err(bad("has no host"));
    }
    let port: u16 = port.parse().ok().filter(|p| *p > 0).ok_or_else(|| bad("has a bad port"))?;
    Ok(Proxy { scheme, host, port, auth })
}

/// A URL with any password replaced (for error messages), whatever its shape: everything
/// between the user name and the last `@` goes, with a scheme or without (`user:pw@host:3128`,
/// a `socks5:/` typo).
fn redact_url(url: &str) -> String {
    match url.rsplit_once('@') {
        Some((before, hp)) => {
            let (scheme, userinfo) = match before.split_once("://") {
                Some((scheme, userinfo)) => (format!("{scheme}://"), userinfo),
                None => (String::new(), before),
            };
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}{user}:***@{hp}")
        }
        None => url.to_owned(),
    }
}

/// One validated account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountSpec {
    pub id: AccountId,
    pub label: String,
    pub credentials: Credentials,
    pub profile_arn: Option<String>,
    /// The region the account's endpoints live in (from `region`, else the profile ARN).
    pub region: Option<String>,
    /// Where tokens are refreshed, when it differs from `region`.
    pub auth_region: Option<String>,
    pub enabled: bool,
    pub weight: NonZeroU32,
    pub max_concurrency: NonZeroU32,
    /// At most this many requests start on the account in any 60 s.
    pub rpm: Option<NonZeroU32>,
    pub proxy: Option<Proxy>,
}

impl AccountSpec {
    pub fn kind(&self) -> Kind {
        self.credentials.kind()
    }

    /// SHA-256 over the kind and the credentials as written in the file. The store keeps it
    /// beside the token chain: a changed fingerprint means the operator gave new credentials,
    /// which then win over a rotated refresh token kept in the store.
    pub fn credentials_fingerprint(&self) -> [u8; 32] {
        let mut buf = zeroize::Zeroizing::new(Vec::new());
        let parts: Vec<&Secret> = match &self.credentials {
            Credentials::Oidc { client_id, client_secret, refresh_token } => {
                vec![client_id, client_secret, refresh_token]
            }
            Credentials::Social { refresh_token } => vec![refresh_token],
            Credentials::ApiKey { key } => vec![key],
        };
        // OIDC's fingerprint is the same as before kinds existed: stored chains stay valid.
        if self.kind() != Kind::Oidc {
            buf.extend_from_slice(self.kind().as_str().as_bytes());
        }
        for part in parts {
            buf.extend_from_slice(&(part.expose().len() as u64).to_be_bytes());
            buf.extend_from_slice(part.expose().as_bytes());
        }
        sha256(&buf)
    }

    fn settings_differ(&self, other: &AccountSpec) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.label != other.label {
            out.push("label");
        }
        if self.profile_arn != other.profile_arn {
            out.push("profile_arn");
        }
        if self.region != other.region {
            out.push("region");
        }
        if self.enabled != other.enabled {
            out.push("enabled");
        }
        if self.weight != other.weight {
            out.push("weight");
        }
        if self.max_concurrency != other.max_concurrency {
            out.push("max_concurrency");
        }
        if self.auth_region != other.auth_region {
            out.push("auth_region");
        }
        if self.rpm != other.rpm {
            out.push("rpm");
        }
        if self.proxy != other.proxy {
            out.push("proxy");
        }
        out
    }
}

/// The accounts of one valid file, in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccountSet {
    accounts: Vec<AccountSpec>,
}

impl AccountSet {
    pub fn new(accounts: Vec<AccountSpec>) -> Self {
        AccountSet { accounts }
    }

    pub fn iter(&self) -> impl Iterator<Item = &AccountSpec> {
        self.accounts.iter()
    }

    pub fn len(&self) -> usize {
        self.accounts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.accounts.is_empty()
    }

    pub fn get(&self, id: &AccountId) -> Option<&AccountSpec> {
        self.accounts.iter().find(|a| &a.id == id)
    }

    /// What changed from `self` (the old set) to `new`.
    pub fn diff(&self, new: &AccountSet) -> AccountsDiff {
        let old: BTreeMap<&AccountId, &AccountSpec> = self.accounts.iter().map(|a| (&a.id, a)).collect();
        let newm: BTreeMap<&AccountId, &AccountSpec> = new.accounts.iter().map(|a| (&a.id, a)).collect();
        let mut diff = AccountsDiff::default();
        for (id, n) in &newm {
            match old.get(id) {
                None => diff.added.push((*id).clone()),
                Some(o) => {
                    let credentials = o.credentials_fingerprint() != n.credentials_fingerprint();
                    let settings = o.settings_differ(n);
                    if credentials || !settings.is_empty() {
                        diff.changed.push(AccountChange { id: (*id).clone(), credentials, settings });
                    }
                }
            }
        }
        for id in old.keys() {
            if !newm.contains_key(id) {
                diff.removed.push((*id).clone());
            }
        }
        diff
    }
}

/// The typed difference between two account sets, applied by a live reload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccountsDiff {
    pub added: Vec<AccountId>,
    pub removed: Vec<AccountId>,
    pub changed: Vec<AccountChange>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountChange {
    pub id: AccountId,
    /// The kind or a credential (client_id, client_secret, refresh_token, api_key) changed:
    /// the token chain restarts.
    pub credentials: bool,
    /// Names of the other settings that changed.
    pub settings: Vec<&'static str>,
}

impl AccountsDiff {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

impl fmt::Display for AccountsDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("no changes");
        }
        let mut parts = Vec::new();
        if !self.added.is_empty() {
            parts.push(format!("added {}", join(&self.added)));
        }
        if !self.removed.is_empty() {
            parts.push(format!("removed {}", join(&self.removed)));
        }
        for c in &self.changed {
            let mut what: Vec<&str> = Vec::new();
            if c.credentials {
                what.push("credentials");
            }
            what.extend(c.settings.iter().copied());
            parts.push(format!("changed {} ({})", c.id, what.join(", ")));
        }
        f.write_str(&parts.join("; "))
    }
}

fn join(ids: &[AccountId]) -> String {
    ids.iter().map(|i| i.as_str()).collect::<Vec<_>>().join(", ")
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    account: Vec<Spanned<RawAccount>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccount {
    id: Option<Spanned<String>>,
    #[serde(default)]
    label: String,
    client_id: Option<Spanned<Secret>>,
    client_secret: Option<Spanned<Secret>>,
    refresh_token: Option<Spanned<Secret>>,
    api_key: Option<Spanned<Secret>>,
    kind: Option<Spanned<String>>,
    profile_arn: Option<Spanned<String>>,
    region: Option<Spanned<String>>,
    auth_region: Option<Spanned<String>>,
    enabled: Option<bool>,
    weight: Option<Spanned<i64>>,
    max_concurrency: Option<Spanned<i64>>,
    rpm: Option<Spanned<i64>>,
    proxy: Option<Spanned<String>>,
}

/// Default in-flight cap per account when the file gives none.
pub const DEFAULT_MAX_CONCURRENCY: u32 = 4;

/// Parses and validates the text of an accounts file. Every problem is reported, each with
/// its line and column; the set is returned only when there is no error.
pub fn parse(path: &Path, source: &str) -> Result<(AccountSet, Diagnostics), Diagnostics> {
    let mut rep = Reporter::new(path, source);
    let Some(raw) = super::shape::deserialize::<RawFile>(&mut rep, source) else {
        return Err(rep.out);
    };
    // Id → byte offset of its first definition (line and column are worked out only for an error:
    // counting lines for every account made loading quadratic in the file's size).
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut accounts = Vec::new();
    for (index, entry) in raw.account.iter().enumerate() {
        let span = entry.span();
        let a = entry.get_ref();
        let what = format!("account #{}", index + 1);
        let id = match &a.id {
            None => {
                rep.error_at(
                    Some(span.clone()),
                    format!("{what}: missing `id` (expected [a-z0-9_-]{{1,64}})"),
                );
                None
            }
            Some(id) => match AccountId::parse(id.get_ref()) {
                Ok(parsed) => {
                    if let Some(&first) = seen.get(parsed.as_str()) {
                        let (l, c) = rep.position(first);
                        rep.error_at(
                            Some(id.span()),
                            format!(
                                "duplicate account id {:?} (first defined at line {l}, column {c})",
                                parsed.as_str()
                            ),
                        );
                    } else {
                        seen.insert(parsed.as_str().to_string(), id.span().start);
                    }
                    Some(parsed)
                }
                Err(msg) => {
                    rep.error_at(Some(id.span()), msg);
                    None
                }
            },
        };
        let name = id.as_ref().map(|i| format!("account {:?}", i.as_str())).unwrap_or(what);
        let secret =
            |field: &Option<Spanned<Secret>>, key: &str, why: &str, rep: &mut Reporter| -> Option<Secret> {
                match field {
                    None => {
                        rep.error_at(Some(span.clone()), format!("{name}: missing `{key}` ({why})"));
                        None
                    }
                    Some(v) if v.get_ref().expose().trim().is_empty() => {
                        rep.error_at(Some(v.span()), format!("{name}: `{key}` is empty"));
                        None
                    }
                    Some(v) => Some(v.get_ref().clone()),
                }
            };
        // The kind: as written, else what the credentials given imply.
        let kind = match &a.kind {
            Some(k) => match k.get_ref().as_str() {
                "oidc" => Some(Kind::Oidc),
                "social" => Some(Kind::Social),
                "api-key" => Some(Kind::ApiKey),
                other => {
                    rep.error_at(
                        Some(k.span()),
                        format!("{name}: kind {other:?} is not one of \"oidc\", \"social\", \"api-key\""),
                    );
                    None
                }
            },
            // A client registration (even half of one) means OIDC: a missing half is then
            // named as missing, not as foreign to a social account.
            None if a.client_id.is_some() || a.client_secret.is_some() => Some(Kind::Oidc),
            None if a.api_key.is_some() => Some(Kind::ApiKey),
            None => Some(Kind::Social),
        };
        // A key that does not belong to the kind: each with its place.
        let forbid = |field: Option<std::ops::Range<usize>>, key: &str, kind: Kind, rep: &mut Reporter| {
            if let Some(at) = field {
                let why = match kind {
                    Kind::Oidc => "an oidc account has client_id, client_secret and refresh_token",
                    Kind::Social => "a social (Kiro Google/GitHub) account has only a refresh_token",
                    Kind::ApiKey => "an api-key account has only api_key: there is nothing to refresh",
                };
                rep.error_at(
                    Some(at),
                    format!("{name}: `{key}` does not belong to kind = \"{kind}\" ({why})"),
                );
            }
        };
        let at = |f: &Option<Spanned<Secret>>| f.as_ref().map(|v| v.span());
        let credentials = match kind {
            None => None,
            Some(Kind::Oidc) => {
                forbid(at(&a.api_key), "api_key", Kind::Oidc, &mut rep);
                let why = "an oidc account needs client_id, client_secret and refresh_token";
                let client_id = secret(&a.client_id, "client_id", why, &mut rep);
                let client_secret = secret(&a.client_secret, "client_secret", why, &mut rep);
                let refresh_token = secret(&a.refresh_token, "refresh_token", why, &mut rep);
                match (client_id, client_secret, refresh_token) {
                    (Some(client_id), Some(client_secret), Some(refresh_token)) => {
                        Some(Credentials::Oidc { client_id, client_secret, refresh_token })
                    }
                    _ => None,
                }
            }
            Some(Kind::Social) => {
                forbid(at(&a.client_id), "client_id", Kind::Social, &mut rep);
                forbid(at(&a.client_secret), "client_secret", Kind::Social, &mut rep);
                forbid(at(&a.api_key), "api_key", Kind::Social, &mut rep);
                let why = "a social account needs its refresh_token";
                secret(&a.refresh_token, "refresh_token", why, &mut rep)
                    .map(|refresh_token| Credentials::Social { refresh_token })
            }
            Some(Kind::ApiKey) => {
                forbid(at(&a.client_id), "client_id", Kind::ApiKey, &mut rep);
                forbid(at(&a.client_secret), "client_secret", Kind::ApiKey, &mut rep);
                forbid(at(&a.refresh_token), "refresh_token", Kind::ApiKey, &mut rep);
                match secret(&a.api_key, "api_key", "an api-key account needs its Kiro API key", &mut rep) {
                    Some(key) if !key.expose().starts_with("ksk_") => {
                        rep.error_at(
                            at(&a.api_key),
                            format!("{name}: `api_key` does not start with ksk_ (a Kiro API key does)"),
                        );
                        None
                    }
                    Some(key) => Some(Credentials::ApiKey { key }),
                    None => None,
                }
            }
        };
        let auth_region = match &a.auth_region {
            Some(r) if !valid_region(r.get_ref()) => {
                rep.error_at(
                    Some(r.span()),
                    format!(
                        "{name}: auth_region {:?} is not an AWS region name (expected e.g. \"us-east-2\")",
                        r.get_ref()
                    ),
                );
                None
            }
            Some(r) => Some(r.get_ref().clone()),
            None => None,
        };
        let rpm = match &a.rpm {
            None => Some(None),
            Some(_) => positive(&a.rpm, 1, "rpm", &name, &mut rep).map(Some),
        };
        let proxy = match &a.proxy {
            None => Some(None),
            Some(p) => match parse_proxy(p.get_ref()) {
                Ok(proxy) => Some(Some(proxy)),
                Err(msg) => {
                    rep.error_at(Some(p.span()), format!("{name}: {msg}"));
                    None
                }
            },
        };

        let mut arn_region = None;
        if let Some(arn) = &a.profile_arn {
            match parse_profile_arn(arn.get_ref()) {
                Ok(region) => arn_region = Some(region),
                Err(msg) => rep.error_at(Some(arn.span()), format!("{name}: {msg}")),
            }
        }
        let mut region = arn_region.clone();
        if let Some(r) = &a.region {
            if !valid_region(r.get_ref()) {
                rep.error_at(
                    Some(r.span()),
                    format!(
                        "{name}: region {:?} is not an AWS region name (expected e.g. \"us-east-1\")",
                        r.get_ref()
                    ),
                );
            } else {
                if let Some(ar) = &arn_region {
                    if ar != r.get_ref() {
                        rep.error_at(
                            Some(r.span()),
                            format!(
                                "{name}: region {:?} disagrees with the profile ARN's region {ar:?}",
                                r.get_ref()
                            ),
                        );
                    }
                }
                region = Some(r.get_ref().clone());
            }
        }
        let weight = positive(&a.weight, 1, "weight", &name, &mut rep);
        let max_concurrency =
            positive(&a.max_concurrency, DEFAULT_MAX_CONCURRENCY, "max_concurrency", &name, &mut rep);

        if let (Some(id), Some(credentials), Some(weight), Some(mc), Some(rpm), Some(proxy)) =
            (id, credentials, weight, max_concurrency, rpm, proxy)
        {
            accounts.push(AccountSpec {
                id,
                label: a.label.clone(),
                credentials,
                profile_arn: a.profile_arn.as_ref().map(|s| s.get_ref().clone()),
                region,
                auth_region,
                enabled: a.enabled.unwrap_or(true),
                weight,
                max_concurrency: mc,
                rpm,
                proxy,
            });
        }
    }
    if rep.out.has_errors() { Err(rep.out) } else { Ok((AccountSet::new(accounts), rep.out)) }
}

fn positive(
    v: &Option<Spanned<i64>>,
    default: u32,
    key: &str,
    name: &str,
    rep: &mut Reporter,
) -> Option<NonZeroU32> {
    match v {
        None => NonZeroU32::new(default),
        Some(s) => match u32::try_from(*s.get_ref()).ok().and_then(NonZeroU32::new) {
            Some(n) if n.get() <= 10_000 => Some(n),
            _ => {
                rep.error_at(
                    Some(s.span()),
                    format!("{name}: `{key}` must be a whole number from 1 to 10000, not {}", s.get_ref()),
                );
                None
            }
        },
    }
}

/// Checks `arn:aws:codewhisperer:REGION:ACCOUNT12:profile/ID` and returns the region.
pub fn parse_profile_arn(arn: &str) -> Result<String, String> {
    let bad = || {
        format!(
            "profile_arn {arn:?} is malformed (expected arn:aws:codewhisperer:<region>:<12-digit account>:profile/<ID>)"
        )
    };
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    if parts.len() != 6 || parts[0] != "arn" || !parts[1].starts_with("aws") || parts[2] != "codewhisperer" {
        return Err(bad());
    }
    if !valid_region(parts[3]) {
        return Err(bad());
    }
    if parts[4].len() != 12 || !parts[4].bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let Some(profile) = parts[5].strip_prefix("profile/") else {
        return Err(bad());
    };
    if profile.is_empty() || profile.len() > 64 || !profile.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(bad());
    }
    Ok(parts[3].to_string())
}

/// `us-east-1`, `eu-central-1`, `us-gov-west-1`, `ap-southeast-2`, …
pub fn valid_region(r: &str) -> bool {
    let parts: Vec<&str> = r.split('-').collect();
    parts.len() >= 3
        && parts[0].len() == 2
        && parts[..parts.len() - 1].iter().all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase()))
        && parts
            .last()
            .is_some_and(|p| !p.is_empty() && p.len() <= 2 && p.bytes().all(|b| b.is_ascii_digit()))
}

/// Reads and parses an accounts file, adding a warning when the file is readable by others.
pub fn load(path: &Path) -> Result<(AccountSet, Diagnostics), Diagnostics> {
    load_sized(path).map(|(set, diags, _)| (set, diags))
}

/// [`load`], and how many bytes the file held when it was read (a reload tells a file being
/// rewritten in place, empty for a moment, from one that lists no account on purpose).
pub fn load_sized(path: &Path) -> Result<(AccountSet, Diagnostics, usize), Diagnostics> {
    let mut rep = Reporter::new(path, "");
    let source = match super::read::read_text(path) {
        Ok(s) => s,
        Err(e) => {
            rep.error_at(None, format!("cannot read the accounts file: {e}"));
            return Err(rep.out);
        }
    };
    let (set, mut diags) = parse(path, &source)?;
    if let Some(w) = permission_warning(path) {
        diags.0.push(w);
    }
    Ok((set, diags, source.len()))
}

/// Whether a value is a placeholder of the kind example files hold (`example-client-id`,
/// `ksk_example…`, `…`, `change-me`, `<your token>`): never a real credential.
fn is_placeholder(v: &str) -> bool {
    let l = v.trim().to_ascii_lowercase();
    l.is_empty()
        || l.starts_with("example")
        || l.starts_with("ksk_example")
        || l.contains('…')
        || l.chars().all(|c| c == '.' || c == 'x' || c == '*')
        || l.starts_with("change-me")
        || l.starts_with("changeme")
        || l.starts_with("your-")
        || l.starts_with('<')
}

/// The keys of an account that hold placeholders (examples/accounts.toml's values and the like):
/// such an account passes validation but cannot sign in.
pub fn placeholder_keys(spec: &AccountSpec) -> Vec<&'static str> {
    let mut keys = Vec::new();
    match &spec.credentials {
        Credentials::Oidc { client_id, client_secret, refresh_token } => {
            for (key, v) in
                [("client_id", client_id), ("client_secret", client_secret), ("refresh_token", refresh_token)]
            {
                if is_placeholder(v.expose()) {
                    keys.push(key);
                }
            }
        }
        Credentials::Social { refresh_token } if is_placeholder(refresh_token.expose()) => {
            keys.push("refresh_token")
        }
        Credentials::ApiKey { key } if is_placeholder(key.expose()) => keys.push("api_key"),
        _ => {}
    }
    // The example's profile: the documentation account id of AWS's own examples.
    if spec.profile_arn.as_deref().is_some_and(|a| a.contains(":123456789012:")) {
        keys.push("profile_arn");
    }
    keys
}

fn permission_warning(path: &Path) -> Option<super::diag::Diagnostic> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode();
    (mode & 0o004 != 0).then(|| super::diag::Diagnostic {
        severity: super::diag::Severity::Warning,
        file: path.to_path_buf(),
        position: None,
        message: format!(
            "the accounts file is readable by every user (mode {:04o}); it holds credentials: chmod 0640 and chown root:amq2api",
            mode & 0o7777
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_told_from_credentials() {
        for p in
            ["example-client-id", "ksk_example0000", "…", "...", "xxxx", "change-me", "<refresh token>", ""]
        {
            assert!(is_placeholder(p), "{p}");
        }
        for real in ["aorAAAAexample", "emu-client-1", "refresh-alpha", "ksk_0123abc", "secret-x"] {
            assert!(!is_placeholder(real), "{real}");
        }
    }

    const GOOD: &str = r#"
[[account]]
id = "a-1"
client_id = "cid"
client_secret = "csecret"
refresh_token = "rt"

[[account]]
id = "b_2"
label = "B"
client_id = "cid2"
client_secret = "csecret2"
refresh_token = "rt2"
profile_arn = "arn:aws:codewhisperer:eu-central-1:123456789012:profile/ABCDEFGHIJKL"
weight = 3
max_concurrency = 2
enabled = false
"#;

    fn set(src: &str) -> AccountSet {
        parse(Path::new("accounts.toml"), src).unwrap().0
    }

    #[test]
    fn parses_good_file() {
        let s = set(GOOD);
        assert_eq!(s.len(), 2);
        let b = s.get(&AccountId::parse("b_2").unwrap()).unwrap();
        assert_eq!(b.region.as_deref(), Some("eu-central-1"));
        assert_eq!(b.weight.get(), 3);
        assert!(!b.enabled);
        let a = s.get(&AccountId::parse("a-1").unwrap()).unwrap();
        assert_eq!(a.max_concurrency.get(), DEFAULT_MAX_CONCURRENCY);
        assert!(!format!("{s:?}").contains("csecret"));
    }

    #[test]
    fn reports_every_problem() {
        let src = r#"
[[account]]
id = "Bad Id"
client_id = "x"
client_secret = "y"
refresh_token = "z"
weight = 0

[[account]]
id = "ok"
client_secret = "y"
refresh_token = "z"
profile_arn = "arn:aws:s3:::bucket"

[[account]]
id = "ok"
client_id = "x"
client_secret = "y"
refresh_token = "z"
"#;
        let err = parse(Path::new("accounts.toml"), src).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("accounts.toml:3:6: error: account id \"Bad Id\""), "{text}");
        assert!(text.contains("`weight` must be a whole number"), "{text}");
        assert!(text.contains("missing `client_id`"), "{text}");
        assert!(text.contains("profile_arn \"arn:aws:s3:::bucket\" is malformed"), "{text}");
        assert!(text.contains("duplicate account id \"ok\" (first defined at line 10"), "{text}");
        assert_eq!(err.errors().count(), 5, "{text}");
    }

    #[test]
    fn diff_is_typed() {
        let old = set(GOOD);
        let new_src = GOOD
            .replace("refresh_token = \"rt\"", "refresh_token = \"rt-new\"")
            .replace("weight = 3", "weight = 5")
            + r#"
[[account]]
id = "c"
client_id = "c"
client_secret = "c"
refresh_token = "c"
"#;
        let new = set(&new_src);
        let d = old.diff(&new);
        assert_eq!(d.added, vec![AccountId::parse("c").unwrap()]);
        assert!(d.removed.is_empty());
        assert_eq!(d.changed.len(), 2);
        let a = d.changed.iter().find(|c| c.id.as_str() == "a-1").unwrap();
        assert!(a.credentials && a.settings.is_empty());
        let b = d.changed.iter().find(|c| c.id.as_str() == "b_2").unwrap();
        assert!(!b.credentials);
        assert_eq!(b.settings, vec!["weight"]);

        let removed = new.diff(&old);
        assert_eq!(removed.removed, vec![AccountId::parse("c").unwrap()]);
        assert!(old.diff(&old).is_empty());
        assert_eq!(old.diff(&old).to_string(), "no changes");
        assert!(d.to_string().contains("added c"));
    }

    #[test]
    fn arn_and_region_rules() {
        assert_eq!(
            parse_profile_arn("arn:aws:codewhisperer:us-east-1:123456789012:profile/ABCDEFGHIJKL").unwrap(),
            "us-east-1"
        );
        assert!(parse_profile_arn("arn:aws:codewhisperer:us-east-1:12345:profile/X").is_err());
        assert!(parse_profile_arn("arn:aws:codewhisperer:us-east-1:123456789012:app/X").is_err());
        assert!(valid_region("us-gov-west-1"));
        assert!(!valid_region("US-east-1"));
        assert!(!valid_region("useast1"));
    }

    /// Proxy URLs: a percent-encoded user name and password (any character, `/` and `@`
    /// included) decode; an unencoded `/` in a password is no path; the password never shows
    /// in an error, whatever the URL's shape; an IPv6 host shows in brackets.
    #[test]
    fn proxy_userinfo_is_percent_decoded_and_never_shown() {
        let p = parse_proxy("http://u%40corp:p%2Fw%3A%23%3F@proxy.corp:3128").unwrap();
        let (u, pw) = p.auth.clone().unwrap();
        assert_eq!((u.as_str(), pw.expose()), ("u@corp", "p/w:#?"));
        assert_eq!(p.to_string(), "http://u%40corp:***@proxy.corp:3128");
        let p = parse_proxy("socks5h://alice:s/cret@[::1]:1080").unwrap();
        assert_eq!(p.auth.as_ref().unwrap().1.expose(), "s/cret");
        assert_eq!(p.to_string(), "socks5h://alice:***@[::1]:1080");
        for bad in [
            "alice:s3cret@proxy.corp:3128",
            "socks5:/alice:s3cret@proxy.corp:3128",
            "http://a:s3cret@h:3128/x",
        ] {
            let e = parse_proxy(bad).unwrap_err();
            assert!(!e.contains("s3cret"), "{e}");
        }
        assert_eq!(parse_proxy("http://a:50%off@h:1").unwrap().auth.unwrap().1.expose(), "50%off");
        assert!(parse_proxy("http://a:%ff@h:1").unwrap_err().contains("%25"));
        assert!(parse_proxy("http://h:1/path").unwrap_err().contains("has a path"));
        assert_eq!(percent_encode("p/w:#?é"), "p%2Fw%3A%23%3F%C3%A9");
    }
}
