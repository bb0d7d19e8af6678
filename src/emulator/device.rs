//! The SSO OIDC device-authorization flow (what `amqctl login` drives): `RegisterClient`
//! (`POST /client/register`), `StartDeviceAuthorization` (`POST /device_authorization`) and
//! `CreateToken` with the device-code grant (`POST /token`, `grantType`
//! `urn:ietf:params:oauth:grant-type:device_code`). The person's side (opening the verification
//! URL, approving or denying) is scripted by [`DeviceFlow`]; an approved device becomes an
//! ordinary OIDC account of the emulator (the client id is its id), so that its refresh token
//! works with the refresh grant and its access token with the chat roles.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use http::{Response, StatusCode};
use serde_json::{Map, Value, json};

use super::oidc::error;
use super::server::{Body, json_response};
use super::state::Shared;

/// The grant type of a device-code `CreateToken`.
pub const DEVICE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";

/// How long a registered client's secret lives (`clientSecretExpiresAt`): 90 days, as the service.
const CLIENT_SECRET_TTL: Duration = Duration::from_secs(90 * 86_400);

/// A poll that comes this much before the interval is over is still on time (clock and
/// scheduling slack).
const POLL_SLACK: Duration = Duration::from_millis(250);

/// What the person at the verification URL does, and the timing the service announces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceFlow {
    /// `interval` of `StartDeviceAuthorization` (seconds between polls). Default 1.
    pub interval_secs: u64,
    /// `expiresIn` of `StartDeviceAuthorization`: after it, polls get `expired_token`.
    /// Default 600.
    pub expires_in_secs: u64,
    /// Polls answered `authorization_pending` before the person's decision lands. Default 1.
    pub pending_polls: u32,
    /// The decision then; `None`: the person never acts (pending until the code expires).
    pub decision: Option<DeviceDecision>,
    /// Polls (1-based, counting only polls on time) answered `slow_down` whatever else holds;
    /// each raises the required interval by 5 s, as a poll that comes too early does.
    pub slow_down_on: Vec<u32>,
}

impl Default for DeviceFlow {
    fn default() -> Self {
        DeviceFlow {
            interval_secs: 1,
            expires_in_secs: 600,
            pending_polls: 1,
            decision: Some(DeviceDecision::Approve),
            slow_down_on: Vec::new(),
        }
    }
}

/// The person's decision at the verification URL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceDecision {
    Approve,
    Deny,
}

/// Counters of the device flow (a snapshot).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceStats {
    pub registrations: u64,
    pub authorizations: u64,
    /// Device-code `CreateToken` calls for a known device code.
    pub polls: u64,
    pub pending: u64,
    pub slow_downs: u64,
    /// Of `slow_downs`, the polls that came before the required interval was over.
    pub too_early: u64,
    pub expired: u64,
    pub denied: u64,
    pub approved: u64,
}

#[derive(Debug)]
struct Client {
    secret: String,
    secret_expires_at: SystemTime,
}

#[derive(Debug)]
struct Device {
    client_id: String,
    expires_at: Instant,
    /// The interval the client must keep now (grows by 5 s with each `slow_down`).
    interval: Duration,
    last_poll: Option<Instant>,
    /// Polls on time so far.
    polls: u32,
    script: DeviceFlow,
}

/// Registered clients and device authorizations in progress.
#[derive(Debug, Default)]
pub(super) struct DeviceState {
    clients: HashMap<String, Client>,
    devices: HashMap<String, Device>,
    pub flow: DeviceFlow,
    pub stats: DeviceStats,
}

impl DeviceState {
    pub fn new(flow: DeviceFlow) -> Self {
        DeviceState { flow, ..DeviceState::default() }
    }
}

fn invalid_request(description: &str, request_id: &str) -> Response<Body> {
    error(StatusCode::BAD_REQUEST, "InvalidRequestException", "invalid_request", description, request_id)
}

fn invalid_client(request_id: &str) -> Response<Body> {
    error(
        StatusCode::UNAUTHORIZED,
        "InvalidClientException",
        "invalid_client",
        "Invalid client provided.",
        request_id,
    )
}

fn object(body: &[u8]) -> Option<Map<String, Value>> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(fields)) => Some(fields),
        _ => None,
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs()
}

/// `RegisterClient`: `{"clientName", "clientType": "public", "scopes"?, "grantTypes"?,
/// "issuerUrl"?}` → `{"clientId", "clientSecret", "clientIdIssuedAt", "clientSecretExpiresAt"}`.
pub(super) fn register_client(shared: &Shared, body: &[u8], request_id: &str) -> Response<Body> {
    let Some(fields) = object(body) else { return invalid_request("Malformed request body.", request_id) };
    let name = fields.get("clientName").and_then(Value::as_str).unwrap_or("");
    if name.is_empty() || name.len() > 256 {
        return invalid_request("clientName is required.", request_id);
    }
    if fields.get("clientType").and_then(Value::as_str) != Some("public") {
        return invalid_request("clientType must be public.", request_id);
    }
    if let Some(scopes) = fields.get("scopes") {
        let ok = scopes.as_array().is_some_and(|list| {
            list.iter().all(|s| {
                s.as_str().is_some_and(|s| {
                    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b":._-".contains(&b))
                })
            })
        });
        if !ok {
            return error(
                StatusCode::BAD_REQUEST,
                "InvalidScopeException",
                "invalid_scope",
                "Invalid scope provided.",
                request_id,
            );
        }
    }
    if let Some(grants) = fields.get("grantTypes") {
        let ok = grants.as_array().is_some_and(|list| {
            list.iter()
                .all(|g| matches!(g.as_str(), Some(DEVICE_GRANT | "refresh_token" | "authorization_code")))
        });
        if !ok {
            return error(
                StatusCode::BAD_REQUEST,
                "InvalidClientMetadataException",
                "invalid_client_metadata",
                "Invalid grantTypes provided.",
                request_id,
            );
        }
    }
    if let Some(issuer) = fields.get("issuerUrl")
        && !issuer.as_str().is_some_and(|u| u.starts_with("https://"))
    {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidClientMetadataException",
            "invalid_client_metadata",
            "issuerUrl must be an https URL.",
            request_id,
        );
    }
    let client_id = format!("emu-client-{}", &hex::encode(shared.ids().bytes("client-id"))[..20]);
    let secret = format!("emu-secret-{}", hex::encode(shared.ids().bytes("client-secret")));
    let now = SystemTime::now();
    let expires = now + CLIENT_SECRET_TTL;
    {
        let mut state = shared.device();
        state
            .clients
            .insert(client_id.clone(), Client { secret: secret.clone(), secret_expires_at: expires });
        state.stats.registrations += 1;
    }
    tracing::debug!(client_id, "emulator: client registered");
    let body = json!({
        "clientId": client_id,
        "clientSecret": secret,
        "clientIdIssuedAt": unix(now),
        "clientSecretExpiresAt": unix(expires),
    });
    json_response(StatusCode::OK, "application/json", &body, request_id)
}

/// Checks a registered client's secret.
fn client_ok(state: &DeviceState, client_id: &str, secret: &str) -> bool {
    state
        .clients
        .get(client_id)
        .is_some_and(|c| c.secret == secret && c.secret_expires_at > SystemTime::now())
}

/// `StartDeviceAuthorization`: `{"clientId", "clientSecret", "startUrl"}` → `{"deviceCode",
/// "userCode", "verificationUri", "verificationUriComplete", "expiresIn", "interval"}`.
pub(super) fn start_device_authorization(shared: &Shared, body: &[u8], request_id: &str) -> Response<Body> {
    let Some(fields) = object(body) else { return invalid_request("Malformed request body.", request_id) };
    let field = |name: &str| fields.get(name).and_then(Value::as_str);
    let (Some(client_id), Some(secret), Some(start_url)) =
        (field("clientId"), field("clientSecret"), field("startUrl"))
    else {
        return invalid_request("clientId, clientSecret and startUrl are required.", request_id);
    };
    if !start_url.starts_with("https://") || start_url.len() < 12 {
        return invalid_request("startUrl must be an https URL.", request_id);
    }
    let device_code = shared.ids().access_token().replacen("aoa", "dev", 1);
    let letters: String =
        shared.ids().bytes("user-code")[..8].iter().map(|b| (b'A' + b % 26) as char).collect();
    let user_code = format!("{}-{}", &letters[..4], &letters[4..]);
    let mut state = shared.device();
    if !client_ok(&state, client_id, secret) {
        return invalid_client(request_id);
    }
    let script = state.flow.clone();
    state.devices.insert(
        device_code.clone(),
        Device {
            client_id: client_id.to_owned(),
            expires_at: Instant::now() + Duration::from_secs(script.expires_in_secs),
            interval: Duration::from_secs(script.interval_secs),
            last_poll: None,
            polls: 0,
            script: script.clone(),
        },
    );
    state.stats.authorizations += 1;
    drop(state);
    tracing::debug!(client_id, start_url, "emulator: device authorization started");
    let verification = "https://device.sso.us-east-1.amazonaws.com/";
    let body = json!({
        "deviceCode": device_code,
        "userCode": user_code,
        "verificationUri": verification,
        "verificationUriComplete": format!("{verification}?user_code={user_code}"),
        "expiresIn": script.expires_in_secs,
        "interval": script.interval_secs,
    });
    json_response(StatusCode::OK, "application/json", &body, request_id)
}

/// `CreateToken` with the device-code grant (the caller checked `grantType`).
pub(super) fn create_token(
    shared: &Shared,
    client_id: &str,
    client_secret: &str,
    fields: &Map<String, Value>,
    request_id: &str,
) -> Response<Body> {
    let Some(device_code) = fields.get("deviceCode").and_then(Value::as_str) else {
        return invalid_request("deviceCode is required.", request_id);
    };
    let mut guard = shared.device();
    let state = &mut *guard;
    if !client_ok(state, client_id, client_secret) {
        return invalid_client(request_id);
    }
    let Some(device) = state.devices.get_mut(device_code).filter(|d| d.client_id == client_id) else {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidGrantException",
            "invalid_grant",
            "Invalid device code provided.",
            request_id,
        );
    };
    state.stats.polls += 1;
    let now = Instant::now();
    let pending = |state: &mut DeviceState| {
        state.stats.pending += 1;
        error(
            StatusCode::BAD_REQUEST,
            "AuthorizationPendingException",
            "authorization_pending",
            "Authorization is still pending.",
            request_id,
        )
    };
    let slow_down = |state: &mut DeviceState, too_early: bool| {
        state.stats.slow_downs += 1;
        state.stats.too_early += u64::from(too_early);
        error(
            StatusCode::BAD_REQUEST,
            "SlowDownException",
            "slow_down",
            "Client is polling too fast.",
            request_id,
        )
    };
    if now >= device.expires_at {
        state.devices.remove(device_code);
        state.stats.expired += 1;
        return error(
            StatusCode::BAD_REQUEST,
            "ExpiredTokenException",
            "expired_token",
            "Device code has expired.",
            request_id,
        );
    }
    let early = device.last_poll.is_some_and(|last| now + POLL_SLACK < last + device.interval);
    device.last_poll = Some(now);
    if early {
        device.interval += Duration::from_secs(5);
        return slow_down(state, true);
    }
    device.polls += 1;
    if device.script.slow_down_on.contains(&device.polls) {
        device.interval += Duration::from_secs(5);
        return slow_down(state, false);
    }
    if device.polls <= device.script.pending_polls {
        return pending(state);
    }
    match device.script.decision {
        None => pending(state),
        Some(DeviceDecision::Deny) => {
            state.devices.remove(device_code);
            state.stats.denied += 1;
            error(
                StatusCode::BAD_REQUEST,
                "AccessDeniedException",
                "access_denied",
                "The user denied the authorization.",
                request_id,
            )
        }
        Some(DeviceDecision::Approve) => {
            state.devices.remove(device_code);
            state.stats.approved += 1;
            drop(guard);
            let issued = shared.sign_in(client_id, client_secret);
            tracing::debug!(client_id, "emulator: device approved, tokens issued");
            let body = json!({
                "accessToken": issued.access_token,
                "tokenType": "Bearer",
                "expiresIn": issued.expires_in,
                "refreshToken": issued.refresh_token,
            });
            json_response(StatusCode::OK, "application/json", &body, request_id)
        }
    }
}
