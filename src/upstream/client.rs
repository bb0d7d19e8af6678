//! The HTTP client that speaks to Amazon Q and SSO OIDC: every call goes through one pool of
//! HTTP/1.1 connections that the reading task drives itself ([`super::conn`]), a request sent
//! at most once; connect and first-byte timeouts, event streams read as they arrive, other
//! bodies read whole up to a limit. Every call of an account goes through the account's egress
//! proxy when it has one ([`Caller::proxy`], the `proxy` argument of the token calls).

use super::conn::{DrivenBody, Pool};
use super::errors::{UpstreamFailure, classify};
use super::events::{Event, StreamError, parse_frame};
use super::eventstream::Decoder;
use crate::config::{Proxy, Secret, UpstreamConfig};
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Frame;
use serde::Deserialize;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

/// `X-Amz-Target` of the chat operation.
pub const GENERATE_TARGET: &str = "AmazonCodeWhispererStreamingService.GenerateAssistantResponse";
/// `X-Amz-Target` of the profile listing (Amazon Q role).
pub const PROFILES_TARGET: &str = "AmazonCodeWhispererService.ListAvailableProfiles";
/// Largest body read whole: a failed call's error, a token answer.
const MAX_BODY: usize = 64 * 1024;

// The AWS calls' own header names and fixed values, made once: a name or value given as text is
// checked and copied on every request.
const X_AMZ_TARGET: HeaderName = HeaderName::from_static("x-amz-target");
const X_AMZ_USER_AGENT: HeaderName = HeaderName::from_static("x-amz-user-agent");
const TOKEN_TYPE: HeaderName = HeaderName::from_static("tokentype");
const OPT_OUT: HeaderName = HeaderName::from_static("x-amzn-codewhisperer-optout");
const INVOCATION_ID: HeaderName = HeaderName::from_static("amz-sdk-invocation-id");
const SDK_REQUEST: HeaderName = HeaderName::from_static("amz-sdk-request");
const AMZ_JSON: HeaderValue = HeaderValue::from_static("application/x-amz-json-1.0");
const EVENT_STREAM_OR_JSON: HeaderValue =
    HeaderValue::from_static("application/vnd.amazon.eventstream, application/json");

#[derive(Debug, thiserror::Error)]
pub enum ClientBuildError {
    #[error("cannot read CA file {path}: {reason}")]
    CaFile { path: String, reason: String },
    #[error("TLS set-up failed: {0}")]
    Tls(String),
}

/// The endpoints one account talks to, its region filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    /// Amazon Q (`q.*`): chat, profiles, catalog.
    pub q: Uri,
    /// Kiro runtime: chat.
    pub runtime: Uri,
    /// Kiro management: catalog.
    pub management: Uri,
    /// SSO OIDC `CreateToken` (in the auth region).
    pub token: Uri,
    /// The Kiro auth service's `refreshToken` (in the auth region).
    pub social_token: Uri,
}

impl Endpoints {
    /// The chat endpoint of `role`.
    pub fn chat(&self, role: Role) -> &Uri {
        match role {
            Role::Q => &self.q,
            Role::Runtime => &self.runtime,
        }
    }
}

/// Which service answers chat: Amazon Q or the Kiro runtime (same JSON-RPC shape).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Q,
    Runtime,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Q => "q",
            Role::Runtime => "runtime",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "q" => Some(Role::Q),
            "runtime" => Some(Role::Runtime),
            _ => None,
        }
    }

    /// The other one (the fallback).
    pub fn other(self) -> Role {
        match self {
            Role::Q => Role::Runtime,
            Role::Runtime => Role::Q,
        }
    }
}

/// The account's endpoints: `{region}` is the account's region (us-east-1 when it has none),
/// and for the token endpoints its `auth_region` when set.
pub fn endpoints_for(cfg: &UpstreamConfig, region: Option<&str>, auth_region: Option<&str>) -> Endpoints {
    let region = region.unwrap_or("us-east-1");
    let auth = auth_region.unwrap_or(region);
    Endpoints {
        q: cfg.endpoint.fill(region),
        runtime: cfg.runtime_endpoint.fill(region),
        management: cfg.management_endpoint.fill(region),
        token: cfg.token_endpoint.fill(auth),
        social_token: cfg.social_token_endpoint.fill(auth),
    }
}

/// Who is calling: the bearer as the service takes it, the account's installation and the
/// account's egress proxy.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    pub bearer: &'a Secret,
    /// The bearer is a Kiro API key (sent with `tokentype: API_KEY`).
    pub api_key: bool,
    pub agent: &'a super::agent::Agent,
    /// The account's `proxy`: its calls are connected through it; `None` connects directly.
    pub proxy: Option<&'a Proxy>,
}

impl Caller<'_> {
    /// The bearer, the API-key marker and the user agents on a request to an AWS API.
    fn apply(&self, req: http::request::Builder, api: &str) -> http::request::Builder {
        let req = req
            .header(header::AUTHORIZATION, format!("Bearer {}", self.bearer.expose()))
            .header(header::USER_AGENT, self.agent.user_agent(api))
            .header(X_AMZ_USER_AGENT, self.agent.amz_user_agent());
        if self.api_key { req.header(TOKEN_TYPE, HeaderValue::from_static("API_KEY")) } else { req }
    }
}

/// A profile `ListAvailableProfiles` returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    pub arn: String,
    pub name: String,
}

/// A successful token refresh.
#[derive(Debug, Clone)]
pub struct TokenGrant {
    pub access_token: Secret,
    pub expires_in: Duration,
    /// The successor refresh token, when the service rotated it. It replaces the old one,
    /// which may stop working at once.
    pub refresh_token: Option<Secret>,
    /// The profile ARN the answer named (the Kiro auth service gives one).
    pub profile_arn: Option<String>,
}

/// Why a token refresh failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RefreshError {
    /// The refresh token is dead (revoked, expired, already rotated): new credentials needed.
    #[error("refresh token rejected (invalid_grant): {0}")]
    InvalidGrant(String),
    /// The client registration is wrong or expired: new credentials needed.
    #[error("client registration rejected (invalid_client): {0}")]
    InvalidClient(String),
    /// Network trouble, 5xx, SlowDown: retry later with backoff.
    #[error("token endpoint unavailable: {0}")]
    Transient(String),
    /// The token endpoint rotated the refresh token and storing the new one failed: it is held
    /// in memory and no refresh runs until it is stored (retried with backoff).
    #[error("the rotated refresh token could not be stored yet (retrying): {0}")]
    NotStored(String),
    /// This daemon did not call the token endpoint now (a reload replacing the credentials,
    /// the shutdown, a cluster lease ending, the wait after a failed refresh): no failure of
    /// the account's, and no reason to wait longer.
    #[error("token refresh not attempted now: {0}")]
    NotAttempted(String),
}

impl RefreshError {
    pub fn is_permanent(&self) -> bool {
        matches!(self, RefreshError::InvalidGrant(_) | RefreshError::InvalidClient(_))
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TokenResponse {
    access_token: String,
    #[serde(default, deserialize_with = "lenient_seconds")]
    expires_in: Option<u64>,
    refresh_token: Option<String>,
    #[serde(default)]
    profile_arn: Option<String>,
}

/// A token call's deadline beyond the connect timeout: the answer's head and body together.
pub const TOKEN_CALL_DEADLINE: Duration = Duration::from_secs(30);
/// The least time a token answer's body gets, whatever is left of the deadline.
pub const TOKEN_BODY_FLOOR: Duration = Duration::from_secs(5);

/// `expiresIn` as the services send it (whole seconds), or as a float or a numeric string: a
/// token answer is not refused for its shape, since the refresh token it carries has already
/// replaced the one sent (refusing the answer would lose the chain).
fn lenient_seconds<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    Ok(match Option::<serde_json::Value>::deserialize(d)? {
        Some(serde_json::Value::Number(n)) => {
            n.as_u64().or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
        }
        Some(serde_json::Value::String(s)) => {
            s.trim().parse::<f64>().ok().filter(|f| *f >= 0.0).map(|f| f as u64)
        }
        _ => None,
    })
}

/// The shared upstream client. Cheap to clone.
#[derive(Clone)]
pub struct UpstreamClient {
    /// Connections to every endpoint: Amazon Q and OIDC alike.
    pool: Arc<Pool>,
    connect_timeout: Duration,
    first_byte_timeout: Duration,
    idle_timeout: Duration,
    max_attempts: u32,
}

impl UpstreamClient {
    pub fn new(cfg: &UpstreamConfig) -> Result<Self, ClientBuildError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = &cfg.ca_file {
            crate::config::read::add_pem_roots(&mut roots, path)
                .map_err(|reason| ClientBuildError::CaFile { path: path.display().to_string(), reason })?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientBuildError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(UpstreamClient {
            pool: Pool::new(&tls, cfg.connect_timeout),
            connect_timeout: cfg.connect_timeout,
            first_byte_timeout: cfg.first_byte_timeout,
            idle_timeout: cfg.stream_idle_timeout,
            max_attempts: cfg.max_attempts,
        })
    }

    /// Calls `GenerateAssistantResponse` and, on 200, returns the event stream as it arrives.
    /// `attempt` is 1-based (it goes into `amz-sdk-request`).
    pub async fn generate(
        &self,
        endpoint: &Uri,
        caller: &Caller<'_>,
        body: Bytes,
        attempt: u32,
    ) -> Result<EventStream, UpstreamFailure> {
        let req = caller
            .apply(Request::post(endpoint.clone()), "codewhispererstreaming")
            .header(header::CONTENT_TYPE, AMZ_JSON)
            .header(X_AMZ_TARGET, HeaderValue::from_static(GENERATE_TARGET))
            .header(OPT_OUT, HeaderValue::from_static("true"))
            .header(INVOCATION_ID, crate::ids::uuid_v4())
            .header(SDK_REQUEST, format!("attempt={attempt}; max={}", self.max_attempts))
            .header(header::ACCEPT, EVENT_STREAM_OR_JSON)
            .body(body)
            .map_err(|e| UpstreamFailure::Transient { status: None, message: e.to_string() })?;
        let send = self.pool.send(req, caller.proxy, caller.agent.machine_id());
        let resp = match tokio::time::timeout(self.first_byte_timeout, send).await {
            Err(_) => {
                return Err(UpstreamFailure::Transient {
                    status: None,
                    message: format!("no answer within {} s", self.first_byte_timeout.as_secs()),
                });
            }
            Ok(Err(e)) => return Err(send_failure(&e)),
            Ok(Ok(r)) => r,
        };
        let status = resp.status();
        let request_id =
            resp.headers().get("x-amzn-requestid").and_then(|v| v.to_str().ok()).map(str::to_string);
        if status != StatusCode::OK {
            let headers = resp.headers().clone();
            // A body too large, too slow or cut off: classified by status and headers alone,
            // except that a refusal that may have said "throttled" or "no capacity" in the
            // part that never came is not taken for the request's own fault (which stops the
            // request: no other account is tried).
            let failure = match read_whole(resp.into_body(), MAX_BODY, self.first_byte_timeout).await {
                Ok(bytes) => classify(status, &headers, &bytes),
                Err(_) => match classify(status, &headers, b"") {
                    // Unless the headers say what it was (`x-amzn-ErrorType`).
                    UpstreamFailure::BadRequest { message } if !headers.contains_key("x-amzn-errortype") => {
                        UpstreamFailure::Transient {
                            status: Some(status.as_u16()),
                            message: format!("{message} (the answer's body was cut off)"),
                        }
                    }
                    other => other,
                },
            };
            return Err(failure);
        }
        Ok(EventStream {
            body: resp.into_body(),
            decoder: Decoder::new(),
            idle_timeout: self.idle_timeout,
            idle: Box::pin(tokio::time::sleep(self.idle_timeout)),
            quiet_since: None,
            first_content: self.first_byte_timeout.max(self.idle_timeout),
            request_id,
            done: false,
        })
    }

    /// OIDC `CreateToken` with the refresh-token grant, through `proxy` when given.
    pub async fn create_token(
        &self,
        token_endpoint: &Uri,
        client_id: &Secret,
        client_secret: &Secret,
        refresh_token: &Secret,
        agent: &super::agent::Agent,
        proxy: Option<&Proxy>,
    ) -> Result<TokenGrant, RefreshError> {
        let body = serde_json::json!({
            "clientId": client_id.expose(),
            "clientSecret": client_secret.expose(),
            "grantType": "refresh_token",
            "refreshToken": refresh_token.expose(),
        });
        let req = Request::post(token_endpoint.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::USER_AGENT, agent.user_agent("sso-oidc"))
            .header(X_AMZ_USER_AGENT, agent.amz_user_agent())
            .body(Bytes::from(body.to_string()))
            .map_err(|e| RefreshError::Transient(e.to_string()))?;
        self.token_call(req, proxy, agent.machine_id()).await
    }

    /// The Kiro auth service's `refreshToken` (social accounts): `{"refreshToken"}`, with the
    /// Kiro IDE's user agent; through `proxy` when given.
    pub async fn social_refresh(
        &self,
        endpoint: &Uri,
        refresh_token: &Secret,
        agent: &super::agent::Agent,
        proxy: Option<&Proxy>,
    ) -> Result<TokenGrant, RefreshError> {
        let body = serde_json::json!({ "refreshToken": refresh_token.expose() });
        let req = Request::post(endpoint.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::USER_AGENT, agent.kiro())
            .body(Bytes::from(body.to_string()))
            .map_err(|e| RefreshError::Transient(e.to_string()))?;
        self.token_call(req, proxy, agent.machine_id()).await
    }

    /// `ListAvailableProfiles` on the Amazon Q endpoint: the profiles the account may use.
    pub async fn list_profiles(&self, q: &Uri, caller: &Caller<'_>) -> Result<Vec<Profile>, UpstreamFailure> {
        let req = caller
            .apply(Request::post(q.clone()), "codewhispererruntime")
            .header(header::CONTENT_TYPE, AMZ_JSON)
            .header(X_AMZ_TARGET, HeaderValue::from_static(PROFILES_TARGET))
            .body(Bytes::from_static(b"{\"maxResults\":10}"))
            .map_err(|e| UpstreamFailure::Transient { status: None, message: e.to_string() })?;
        let (status, headers, bytes) = self.call_whole(req, caller).await?;
        if status != StatusCode::OK {
            return Err(classify(status, &headers, &bytes));
        }
        #[derive(Deserialize)]
        struct Listed {
            #[serde(default)]
            profiles: Vec<ListedProfile>,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct ListedProfile {
            arn: String,
            #[serde(default)]
            profile_name: String,
        }
        let listed: Listed = serde_json::from_slice(&bytes).map_err(|e| UpstreamFailure::Transient {
            status: None,
            message: format!("malformed ListAvailableProfiles answer: {e}"),
        })?;
        Ok(listed.profiles.into_iter().map(|p| Profile { arn: p.arn, name: p.profile_name }).collect())
    }

    /// `ListAvailableModels`: the whole catalog (every page), from Amazon Q (`GET`, for accounts
    /// on the Amazon Q endpoint) or from the Kiro management endpoint (`POST`).
    pub async fn list_models(
        &self,
        endpoints: &Endpoints,
        role: Role,
        caller: &Caller<'_>,
        profile_arn: Option<&str>,
    ) -> Result<Vec<super::catalog::CatalogModel>, UpstreamFailure> {
        let mut models = Vec::new();
        let mut next: Option<String> = None;
        // A bound on pages: a service that keeps answering with a next token is not followed
        // forever.
        for _ in 0..20 {
            let req = match role {
                Role::Q => {
                    let mut url = format!("{}ListAvailableModels?origin=AI_EDITOR", endpoints.q);
                    if let Some(arn) = profile_arn {
                        url.push_str(&format!("&profileArn={}", percent_encode(arn)));
                    }
                    if let Some(t) = &next {
                        url.push_str(&format!("&nextToken={}", percent_encode(t)));
                    }
                    let uri: Uri = url.parse().map_err(|e| UpstreamFailure::Transient {
                        status: None,
                        message: format!("catalog URL: {e}"),
                    })?;
                    caller.apply(Request::get(uri), "codewhispererruntime").body(Bytes::new())
                }
                Role::Runtime => {
                    let mut body = serde_json::json!({ "origin": "AI_EDITOR" });
                    if let Some(arn) = profile_arn {
                        body["profileArn"] = arn.into();
                    }
                    if let Some(t) = &next {
                        body["nextToken"] = t.clone().into();
                    }
                    caller
                        .apply(Request::post(endpoints.management.clone()), "kirocontrolplane")
                        .header(header::CONTENT_TYPE, AMZ_JSON)
                        .header(X_AMZ_TARGET, HeaderValue::from_static(super::catalog::MODELS_TARGET))
                        .body(Bytes::from(body.to_string()))
                }
            }
            .map_err(|e| UpstreamFailure::Transient { status: None, message: e.to_string() })?;
            let (status, headers, bytes) = self.call_whole(req, caller).await?;
            if status != StatusCode::OK {
                return Err(classify(status, &headers, &bytes));
            }
            let page = super::catalog::parse_page(&bytes)
                .map_err(|message| UpstreamFailure::Transient { status: None, message })?;
            models.extend(page.models);
            match page.next_token {
                Some(t) => next = Some(t),
                None => return Ok(models),
            }
        }
        Ok(models)
    }

    /// Sends a request (through `proxy` when given) and reads its whole answer (up to the body
    /// limit), within the first-byte timeout.
    pub(crate) async fn call_whole(
        &self,
        req: Request<Bytes>,
        caller: &Caller<'_>,
    ) -> Result<(StatusCode, http::HeaderMap, Bytes), UpstreamFailure> {
        let t = |message: String| UpstreamFailure::Transient { status: None, message };
        let send = self.pool.send(req, caller.proxy, caller.agent.machine_id());
        let resp = match tokio::time::timeout(self.first_byte_timeout, send).await {
            Err(_) => return Err(t(format!("no answer within {} s", self.first_byte_timeout.as_secs()))),
            Ok(Err(e)) => return Err(send_failure(&e)),
            Ok(Ok(r)) => r,
        };
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = read_whole(resp.into_body(), MAX_BODY, self.first_byte_timeout)
            .await
            .map_err(|e| t(format!("reading the answer: {e}")))?;
        Ok((status, headers, bytes))
    }

    /// A token call (OIDC or Kiro): sent at most once, its answer read whole and classified.
    async fn token_call(
        &self,
        req: Request<Bytes>,
        proxy: Option<&Proxy>,
        installation: &str,
    ) -> Result<TokenGrant, RefreshError> {
        // One deadline for the whole call (the answer's head and its body): shutdown waits
        // for a call in flight this long ([`TOKEN_CALL_DEADLINE`]) and no longer.
        let deadline = self.connect_timeout + TOKEN_CALL_DEADLINE;
        let until = tokio::time::Instant::now() + deadline;
        // Sent at most once, as every call: a refresh sent twice would rotate the refresh token
        // twice and lose the chain with the first answer.
        let resp = match tokio::time::timeout_at(until, self.pool.send(req, proxy, installation)).await {
            Err(_) => {
                return Err(RefreshError::Transient(format!("no answer within {} s", deadline.as_secs())));
            }
            Ok(Err(e)) => return Err(RefreshError::Transient(e.to_string())),
            Ok(Ok(r)) => r,
        };
        let status = resp.status();
        let headers = resp.headers().clone();
        // The answer's body gets at least a few seconds: after a 200 the token may already be
        // rotated, and only this body carries the new one (shutdown's wait covers the floor).
        let left = until.saturating_duration_since(tokio::time::Instant::now()).max(TOKEN_BODY_FLOOR);
        let bytes = read_whole(resp.into_body(), MAX_BODY, left)
            .await
            .map_err(|e| RefreshError::Transient(format!("reading the token answer: {e}")))?;
        if status == StatusCode::OK {
            let t: TokenResponse = serde_json::from_slice(&bytes)
                .map_err(|e| RefreshError::Transient(format!("malformed token answer: {e}")))?;
            if t.access_token.is_empty() {
                return Err(RefreshError::Transient("token answer without an access token".into()));
            }
            return Ok(TokenGrant {
                access_token: Secret::new(t.access_token),
                expires_in: Duration::from_secs(t.expires_in.unwrap_or(3600).clamp(1, 86_400 * 30)),
                refresh_token: t.refresh_token.filter(|r| !r.is_empty()).map(Secret::new),
                profile_arn: t.profile_arn.filter(|a| !a.is_empty()),
            });
        }
        Err(classify_refresh(status, &headers, &bytes))
    }
}

/// A request that got no answer: unreachable (nothing was sent: another endpoint may take it;
/// so too when the account's proxy could not reach the endpoint) or a transient failure (a
/// proxy that is down or refuses the account's credentials: no endpoint is reached through
/// it, another account may serve).
fn send_failure(e: &super::conn::ConnError) -> UpstreamFailure {
    use super::conn::ConnError;
    match e {
        ConnError::Connect { .. } | ConnError::ConnectTimeout(_) | ConnError::Endpoint(_) => {
            UpstreamFailure::Unreachable { message: e.to_string() }
        }
        ConnError::Proxy { error, .. } if error.target_unreachable() => {
            UpstreamFailure::Unreachable { message: e.to_string() }
        }
        ConnError::Proxy { .. } => UpstreamFailure::ProxyFailed { message: e.to_string() },
        _ => UpstreamFailure::Transient { status: None, message: e.to_string() },
    }
}

/// Percent-encodes a query value (everything but unreserved characters).
fn percent_encode(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Classifies a failed `CreateToken` answer.
pub fn classify_refresh(status: StatusCode, headers: &http::HeaderMap, body: &[u8]) -> RefreshError {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let error = v.get("error").and_then(|e| e.as_str()).unwrap_or("");
    let description = v
        .get("error_description")
        .or_else(|| v.get("message"))
        .and_then(|e| e.as_str())
        .unwrap_or("")
        .to_string();
    let etype = headers.get("x-amzn-errortype").and_then(|h| h.to_str().ok()).unwrap_or("");
    let etype = etype.rsplit('#').next().unwrap_or("").split(':').next().unwrap_or("");
    let what =
        if description.is_empty() { format!("HTTP {} {error}{etype}", status.as_u16()) } else { description };
    if error == "invalid_grant" || etype.starts_with("InvalidGrant") || etype.starts_with("ExpiredToken") {
        RefreshError::InvalidGrant(what)
    } else if error == "invalid_client"
        || error == "unauthorized_client"
        || etype.starts_with("InvalidClient")
        || etype.starts_with("UnauthorizedClient")
        || status == StatusCode::UNAUTHORIZED
    {
        RefreshError::InvalidClient(what)
    } else {
        RefreshError::Transient(what)
    }
}

/// Why a body could not be read whole.
#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error("the body exceeds {0} bytes")]
    TooLarge(usize),
    #[error("the body did not arrive within {} s", .0.as_secs())]
    Timeout(Duration),
    #[error("{0}")]
    Transport(String),
}

/// Reads a whole body of at most `limit` bytes within `deadline` (as the server reads request
/// bodies: [`Limited`]). A body read to its end gives its connection back to the pool.
async fn read_whole(body: DrivenBody, limit: usize, deadline: Duration) -> Result<Bytes, ReadError> {
    match tokio::time::timeout(deadline, Limited::new(body, limit).collect()).await {
        Err(_) => Err(ReadError::Timeout(deadline)),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => Err(ReadError::TooLarge(limit)),
        Ok(Err(e)) => Err(ReadError::Transport(super::conn::error_chain(&*e))),
        Ok(Ok(c)) => Ok(c.to_bytes()),
    }
}

/// What `fut` gives on its first poll, or `None` when it is pending (then dropped). It is polled
/// with the task's own context, so a pending poll leaves the task's waker where the next wait
/// needs it. `fut` must be cancel-safe.
async fn at_once<F: std::future::Future>(fut: F) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    std::future::poll_fn(|cx| {
        Poll::Ready(match fut.as_mut().poll(cx) {
            Poll::Ready(v) => Some(v),
            Poll::Pending => None,
        })
    })
    .await
}

/// A `GenerateAssistantResponse` answer being received. Dropping it closes the upstream
/// stream (its connection is closed).
pub struct EventStream {
    body: super::conn::DrivenBody,
    decoder: Decoder,
    idle_timeout: Duration,
    /// The idle timer. It is never later than the current wait's start plus the timeout (each
    /// deadline it had came from an earlier wait); when it fires early it is armed again for
    /// the current wait. A busy stream thus does not move a timer for every chunk.
    idle: std::pin::Pin<Box<tokio::time::Sleep>>,
    /// When the upstream last went quiet: set by the first wait that finds nothing, cleared by
    /// a whole frame (not by any bytes: an upstream trickling a byte at a time, never finishing
    /// a frame, would otherwise hold the request until `request_timeout_secs`). It outlives a
    /// wait that is dropped (the SSE stream drops `next()` for its pings), so the idle timeout
    /// counts from the last frame, not from the latest wait.
    quiet_since: Option<tokio::time::Instant>,
    /// How long the first content may take once the answer's head is here
    /// (`first_byte_timeout_secs`; see [`EventStream::first_content_within`]).
    first_content: Duration,
    request_id: Option<String>,
    done: bool,
}

impl EventStream {
    /// Amazon Q's request id (`x-amzn-RequestId`), for logs.
    pub fn request_id(&self) -> Option<&str> {
        self.request_id.as_deref()
    }

    /// How long the answer's first content may take after its head (the longer of
    /// `first_byte_timeout_secs` and `stream_idle_timeout_secs`, which an operator raises for
    /// long silent starts): an upstream that sends frames with nothing in them fails over then
    /// instead of holding the request until `request_timeout_secs`.
    pub fn first_content_within(&self) -> Duration {
        self.first_content
    }

    /// The next event if it can be had without waiting — decoded from bytes already read, or
    /// from what the socket holds now — else `None` (and nothing is lost: the bytes stay here
    /// for the next call). `Some(None)` is the clean end of the stream.
    pub async fn next_ready(&mut self) -> Option<Option<Result<Event, StreamError>>> {
        at_once(self.next()).await
    }

    /// Waits for the body's next frame, until the idle timeout after the upstream went quiet;
    /// `Err` when the timeout passed first.
    async fn wait_frame(&mut self) -> Result<Option<Result<Frame<Bytes>, super::conn::BodyError>>, ()> {
        let waiting_since = *self.quiet_since.get_or_insert_with(tokio::time::Instant::now);
        loop {
            let r = tokio::select! {
                biased;
                frame = self.body.frame() => Ok(frame),
                () = self.idle.as_mut() => Err(()),
            };
            match r {
                Ok(frame) => return Ok(frame),
                Err(()) => {
                    let due = waiting_since + self.idle_timeout;
                    if tokio::time::Instant::now() >= due {
                        return Err(());
                    }
                    self.idle.as_mut().reset(due);
                }
            }
        }
    }

    /// The next event; `None` at the clean end of the stream. After an error the stream is over.
    pub async fn next(&mut self) -> Option<Result<Event, StreamError>> {
        if self.done {
            return None;
        }
        loop {
            match self.decoder.next_frame() {
                Ok(Some(frame)) => {
                    self.quiet_since = None;
                    let ev = parse_frame(&frame);
                    if ev.is_err() {
                        self.done = true;
                    }
                    return Some(ev);
                }
                Ok(None) => {}
                Err(e) => {
                    self.done = true;
                    return Some(Err(StreamError::Decode(e)));
                }
            }
            // A frame the body has at once needs neither the idle timer nor the clock.
            let read = match at_once(self.body.frame()).await {
                Some(frame) => Ok(frame),
                None => self.wait_frame().await,
            };
            match read {
                Err(()) => {
                    self.done = true;
                    return Some(Err(StreamError::Idle(self.idle_timeout.as_secs())));
                }
                Ok(None) => {
                    self.done = true;
                    return match self.decoder.finish() {
                        Ok(()) => None,
                        Err(e) => Some(Err(StreamError::Decode(e))),
                    };
                }
                Ok(Some(Err(e))) => {
                    self.done = true;
                    return Some(Err(StreamError::Transport(e.to_string())));
                }
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        self.decoder.push_bytes(data);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_errors() {
        let mut h = http::HeaderMap::new();
        assert!(matches!(
            classify_refresh(
                StatusCode::BAD_REQUEST,
                &h,
                br#"{"error":"invalid_grant","error_description":"x"}"#
            ),
            RefreshError::InvalidGrant(_)
        ));
        assert!(matches!(
            classify_refresh(StatusCode::UNAUTHORIZED, &h, br#"{"error":"invalid_client"}"#),
            RefreshError::InvalidClient(_)
        ));
        assert!(matches!(
            classify_refresh(StatusCode::INTERNAL_SERVER_ERROR, &h, b""),
            RefreshError::Transient(_)
        ));
        h.insert("x-amzn-errortype", "SlowDownException".parse().unwrap());
        assert!(matches!(classify_refresh(StatusCode::BAD_REQUEST, &h, b"{}"), RefreshError::Transient(_)));
        h.insert("x-amzn-errortype", "InvalidGrantException".parse().unwrap());
        assert!(classify_refresh(StatusCode::BAD_REQUEST, &h, b"{}").is_permanent());
    }

    #[test]
    fn default_endpoints_follow_region() {
        use crate::config::Template;
        let cfg = UpstreamConfig {
            endpoint: Template::new(crate::config::DEFAULT_ENDPOINT),
            runtime_endpoint: Template::new(crate::config::DEFAULT_RUNTIME_ENDPOINT),
            management_endpoint: Template::new(crate::config::DEFAULT_MANAGEMENT_ENDPOINT),
            token_endpoint: Template::new(crate::config::DEFAULT_TOKEN_ENDPOINT),
            social_token_endpoint: Template::new(crate::config::DEFAULT_SOCIAL_TOKEN_ENDPOINT),
            suspicious_cooldown: Duration::from_secs(1800),
            ca_file: None,
            connect_timeout: Duration::from_secs(1),
            first_byte_timeout: Duration::from_secs(1),
            stream_idle_timeout: Duration::from_secs(1),
            max_attempts: 3,
        };
        let e = endpoints_for(&cfg, Some("eu-central-1"), None);
        assert_eq!(e.q, "https://q.eu-central-1.amazonaws.com/");
        assert_eq!(e.runtime, "https://runtime.eu-central-1.kiro.dev/");
        assert_eq!(e.token, "https://oidc.eu-central-1.amazonaws.com/token");
        assert_eq!(e.social_token, "https://prod.eu-central-1.auth.desktop.kiro.dev/refreshToken");
        assert_eq!(endpoints_for(&cfg, None, None).q, "https://q.us-east-1.amazonaws.com/");
        // Tokens are refreshed in the auth region when it differs.
        let e = endpoints_for(&cfg, Some("us-east-1"), Some("us-east-2"));
        assert_eq!(e.q, "https://q.us-east-1.amazonaws.com/");
        assert_eq!(e.token, "https://oidc.us-east-2.amazonaws.com/token");
        assert_eq!(e.social_token, "https://prod.us-east-2.auth.desktop.kiro.dev/refreshToken");
    }
}
