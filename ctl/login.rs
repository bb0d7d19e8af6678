//! `amqctl login`: the SSO OIDC device-authorization flow for AWS Builder ID and IAM Identity
//! Center. RegisterClient → StartDeviceAuthorization → the verification URL and code on stderr
//! (the person opens it on any device: works from a headless server) → CreateToken polled with
//! the device-code grant (honouring `interval`, `slow_down`, `authorization_pending`, the code's
//! expiry and `access_denied`) → one `[[account]]` entry on stdout. Nothing is written anywhere:
//! the operator appends the entry to accounts.toml.

use crate::failure::{Failure, fail};
use amq2api::exit;
use amq2api::upstream::conn::Pool;
use bytes::Bytes;
use http::{Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Limited};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// AWS Builder ID's start URL (the default: personal accounts).
pub const BUILDER_ID_START_URL: &str = "https://view.awsapps.com/start";

/// The scopes Amazon Q Developer's own clients register with.
const SCOPES: [&str; 5] = [
    "codewhisperer:completions",
    "codewhisperer:analysis",
    "codewhisperer:conversations",
    "codewhisperer:transformations",
    "codewhisperer:taskassist",
];

const DEVICE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";

/// Regions where the Amazon Q / Kiro API itself runs; an Identity Center instance elsewhere
/// refreshes in its own region (`auth_region`) and calls the API in us-east-1.
const API_REGIONS: [&str; 2] = ["us-east-1", "eu-central-1"];

/// Consecutive polls that may fail on the network before login gives up.
const MAX_POLL_ERRORS: u32 = 5;

/// What the command line asked for.
pub struct Options<'a> {
    pub start_url: &'a str,
    pub region: &'a str,
    pub id: Option<&'a str>,
    pub label: Option<&'a str>,
    pub oidc_endpoint: Option<&'a str>,
}

/// The signed-in account, ready to print.
pub struct LoggedIn {
    pub entry: String,
}

fn valid_region(r: &str) -> bool {
    !r.is_empty()
        && r.len() <= 32
        && r.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// The OIDC base URL: the override (tests, the demo's emulator), else the region's service.
fn base_url(opts: &Options<'_>) -> Result<String, Failure> {
    let base = match opts.oidc_endpoint {
        Some(e) => e.trim_end_matches('/').to_string(),
        None => format!("https://oidc.{}.amazonaws.com", opts.region),
    };
    let uri: Uri = base.parse().map_err(|_| fail(exit::USAGE, format!("not a URL: {base}")))?;
    match uri.scheme_str() {
        Some("https") => {}
        Some("http") => {
            let host = uri.host().unwrap_or("").trim_start_matches('[').trim_end_matches(']');
            let loopback = host == "localhost"
                || host.parse::<std::net::IpAddr>().map(|ip| ip.is_loopback()).unwrap_or(false);
            if !loopback {
                return Err(fail(
                    exit::USAGE,
                    format!("{base}: http:// is accepted for loopback addresses only"),
                ));
            }
        }
        _ => return Err(fail(exit::USAGE, format!("{base}: the OIDC endpoint must be an https:// URL"))),
    }
    Ok(base)
}

/// An OIDC service answer: the status and the JSON body (or null).
struct Answer {
    status: StatusCode,
    body: Value,
    error_type: String,
}

impl Answer {
    /// `error` of an error answer (`authorization_pending`, …), else the exception name.
    fn error(&self) -> String {
        match self.body.get("error").and_then(Value::as_str) {
            Some(e) if !e.is_empty() => e.to_string(),
            _ => self.error_type.clone(),
        }
    }

    fn describe(&self) -> String {
        let what = self
            .body
            .get("error_description")
            .or_else(|| self.body.get("message"))
            .and_then(Value::as_str)
            .unwrap_or("");
        let mut s = format!("HTTP {}", self.status.as_u16());
        let e = self.error();
        if !e.is_empty() {
            s.push_str(&format!(" {e}"));
        }
        if !what.is_empty() {
            s.push_str(&format!(": {}", crate::import::one_line(what)));
        }
        s
    }

    fn str(&self, name: &str) -> Result<String, Failure> {
        match self.body.get(name).and_then(Value::as_str) {
            Some(v) if !v.is_empty() => Ok(v.to_string()),
            _ => Err(fail(exit::FAILURE, format!("the OIDC service's answer has no {name}"))),
        }
    }
}

struct Oidc {
    pool: Arc<Pool>,
    base: String,
}

impl Oidc {
    fn new(base: String) -> Result<Oidc, Failure> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| fail(exit::SOFTWARE, e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Oidc { pool: Pool::new(&tls, Duration::from_secs(10)), base })
    }

    /// POSTs `body` as JSON to `path` and reads the whole answer.
    async fn post(&self, path: &str, body: &Value) -> Result<Answer, Failure> {
        let url = format!("{}{path}", self.base);
        let unreachable = |e: String| fail(exit::UNAVAILABLE, format!("{url}: {e}"));
        let req = Request::post(url.as_str())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::USER_AGENT, concat!("amq2api/", env!("CARGO_PKG_VERSION"), " amqctl-login"))
            .body(Bytes::from(body.to_string()))
            .map_err(|e| fail(exit::USAGE, e.to_string()))?;
        let resp = tokio::time::timeout(Duration::from_secs(30), self.pool.send(req, None, "amqctl-login"))
            .await
            .map_err(|_| unreachable("no answer within 30 s".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        let status = resp.status();
        let error_type = resp
            .headers()
            .get("x-amzn-errortype")
            .and_then(|v| v.to_str().ok())
            .map(|t| t.split(':').next().unwrap_or("").rsplit('#').next().unwrap_or("").to_string())
            .unwrap_or_default();
        let bytes =
            tokio::time::timeout(Duration::from_secs(30), Limited::new(resp.into_body(), 1 << 20).collect())
                .await
                .map_err(|_| unreachable("the answer did not arrive within 30 s".into()))?
                .map_err(|e| unreachable(format!("reading the answer: {e}")))?
                .to_bytes();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok(Answer { status, body, error_type })
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs()
}

/// A UTC date (YYYY-MM-DD) of unix seconds.
pub fn date(secs: u64) -> String {
    // Civil from days (Howard Hinnant's algorithm).
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Runs the device flow; progress and the code go to stderr, the entry is returned.
pub async fn login(opts: &Options<'_>) -> Result<LoggedIn, Failure> {
    if !valid_region(opts.region) {
        return Err(fail(exit::USAGE, format!("not a region name: {:?}", opts.region)));
    }
    if let Some(id) = opts.id
        && !valid_id(id)
    {
        return Err(fail(exit::USAGE, format!("--id {id:?}: use 1 to 64 of a-z, 0-9, _ and -")));
    }
    if !opts.start_url.starts_with("https://") {
        return Err(fail(exit::USAGE, format!("--start-url {:?}: an https:// URL", opts.start_url)));
    }
    let builder_id = opts.start_url.trim_end_matches('/') == BUILDER_ID_START_URL;
    let oidc = Oidc::new(base_url(opts)?)?;

    // RegisterClient: a public client for the device grant.
    let reg = oidc
        .post(
            "/client/register",
            &json!({ "clientName": "amq2api", "clientType": "public", "scopes": SCOPES }),
        )
        .await?;
    if reg.status != StatusCode::OK {
        return Err(fail(exit::FAILURE, format!("RegisterClient failed: {}", reg.describe())));
    }
    let client_id = reg.str("clientId")?;
    let client_secret = reg.str("clientSecret")?;
    let secret_expires = reg.body.get("clientSecretExpiresAt").and_then(Value::as_u64);

    // StartDeviceAuthorization.
    let dev = oidc
        .post(
            "/device_authorization",
            &json!({ "clientId": client_id, "clientSecret": client_secret, "startUrl": opts.start_url }),
        )
        .await?;
    if dev.status != StatusCode::OK {
        return Err(fail(exit::FAILURE, format!("StartDeviceAuthorization failed: {}", dev.describe())));
    }
    let device_code = dev.str("deviceCode")?;
    let user_code = dev.str("userCode")?;
    let uri = dev.str("verificationUri")?;
    let complete = dev.body.get("verificationUriComplete").and_then(Value::as_str).map(str::to_string);
    let expires_in = dev.body.get("expiresIn").and_then(Value::as_u64).unwrap_or(600).clamp(1, 3600);
    let mut interval =
        Duration::from_secs(dev.body.get("interval").and_then(Value::as_u64).unwrap_or(5).clamp(1, 60));
    let deadline = Instant::now() + Duration::from_secs(expires_in);

    let who = if builder_id {
        "AWS Builder ID".to_string()
    } else {
        format!("IAM Identity Center ({})", opts.start_url)
    };
    eprintln!("Sign in with {who}: open this URL on any device (a phone will do) and approve:");
    eprintln!();
    eprintln!("    {}", crate::import::one_line(complete.as_deref().unwrap_or(&uri)));
    eprintln!();
    eprintln!(
        "or open {} and enter the code {}",
        crate::import::one_line(&uri),
        crate::import::one_line(&user_code)
    );
    eprintln!("Waiting for the approval (the code expires in {} min)…", expires_in.div_ceil(60));

    // CreateToken with the device-code grant until approved, denied or expired.
    let mut net_errors = 0;
    let token = loop {
        tokio::time::sleep(interval).await;
        if Instant::now() >= deadline {
            return Err(fail(
                exit::FAILURE,
                "the code expired before the sign-in was approved; run amqctl login again",
            ));
        }
        let body = json!({
            "clientId": client_id,
            "clientSecret": client_secret,
            "grantType": DEVICE_GRANT,
            "deviceCode": device_code,
        });
        let answer = match oidc.post("/token", &body).await {
            Ok(a) => {
                net_errors = 0;
                a
            }
            Err(f) if net_errors + 1 < MAX_POLL_ERRORS => {
                net_errors += 1;
                eprintln!("amqctl: warning: {} (retrying)", f.message);
                continue;
            }
            Err(f) => return Err(f),
        };
        if answer.status == StatusCode::OK {
            break answer;
        }
        match answer.error().as_str() {
            "authorization_pending" | "AuthorizationPendingException" => {}
            "slow_down" | "SlowDownException" => {
                interval += Duration::from_secs(5);
                eprintln!("(the service asks to poll less often: every {} s now)", interval.as_secs());
            }
            "expired_token" | "ExpiredTokenException" => {
                return Err(fail(
                    exit::FAILURE,
                    "the code expired before the sign-in was approved; run amqctl login again",
                ));
            }
            "access_denied" | "AccessDeniedException" => {
                return Err(fail(exit::NOPERM, "the sign-in was denied at the verification page"));
            }
            _ => return Err(fail(exit::FAILURE, format!("CreateToken failed: {}", answer.describe()))),
        }
    };
    let refresh_token = token.str("refreshToken")?;
    token.str("accessToken")?;

    // The entry. The API region: the login region where the API runs, else us-east-1 with the
    // tokens refreshed in the login region.
    let digest = hex::encode(amq2api::hash::sha256(client_id.as_bytes()));
    let kind = if builder_id { "builder-id" } else { "idc" };
    let id = opts.id.map(str::to_string).unwrap_or_else(|| format!("{kind}-{}", &digest[..8]));
    let today = date(unix_now());
    let label = opts.label.map(str::to_string).unwrap_or_else(|| {
        if builder_id {
            format!("Builder ID, signed in {today}")
        } else {
            format!("IAM Identity Center, signed in {today}")
        }
    });
    let s = crate::import::toml_str;
    let mut entry =
        format!("# amqctl login: {} on {today}, region {}.\n", crate::import::one_line(&who), opts.region);
    if let Some(t) = secret_expires {
        entry.push_str(&format!(
            "# The client registration expires on {}: run amqctl login again before then.\n",
            date(t)
        ));
    }
    entry.push_str(&format!(
        "[[account]]\nid = {}\nlabel = {}\nkind = \"oidc\"\nclient_id = {}\nclient_secret = {}\nrefresh_token = {}\n",
        s(&id),
        s(&label),
        s(&client_id),
        s(&client_secret),
        s(&refresh_token)
    ));
    if API_REGIONS.contains(&opts.region) {
        entry.push_str(&format!("region = {}\n", s(opts.region)));
    } else {
        entry.push_str(&format!("region = \"us-east-1\"\nauth_region = {}\n", s(opts.region)));
    }
    Ok(LoggedIn { entry })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(date(0), "1970-01-01");
        assert_eq!(date(1_798_761_600), "2027-01-01");
        assert_eq!(date(1_709_164_800), "2024-02-29");
    }

    #[test]
    fn plain_http_only_on_loopback() {
        let o = |e: &'static str| Options {
            start_url: BUILDER_ID_START_URL,
            region: "us-east-1",
            id: None,
            label: None,
            oidc_endpoint: Some(e),
        };
        assert!(base_url(&o("http://127.0.0.1:9/")).is_ok());
        assert!(base_url(&o("http://[::1]:9")).is_ok());
        assert!(base_url(&o("http://example.com/")).is_err());
        assert!(base_url(&o("ftp://127.0.0.1/")).is_err());
        assert_eq!(base_url(&o("https://oidc.example/")).unwrap(), "https://oidc.example");
    }
}
