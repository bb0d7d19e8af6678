//! The Kiro social sign-in refresh (`POST /refreshToken`, standing for
//! `prod.{region}.auth.desktop.kiro.dev/refreshToken`): a Kiro IDE user agent, `{"refreshToken"}`,
//! rotation as for OIDC, the account's profile ARN in the answer.

use http::{HeaderMap, Response, StatusCode};
use serde_json::{Value, json};

use super::SocialDeadToken;
use super::server::{Body, json_response};
use super::state::{Channel, RefreshError, Shared};
use super::wire::user_agent;

/// What a Kiro IDE user agent starts with.
pub const KIRO_USER_AGENT_PREFIX: &str = "KiroIDE-";

/// Answers one `refreshToken` call whose body has been read.
pub(super) fn refresh(shared: &Shared, headers: &HeaderMap, body: &[u8], request_id: &str) -> Response<Body> {
    let ua = user_agent(headers);
    if !ua.is_some_and(|ua| ua.starts_with(KIRO_USER_AGENT_PREFIX)) {
        shared.count_refresh_failure();
        tracing::info!(user_agent = ?ua, "emulator: social refresh refused: not a Kiro IDE user agent");
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "The User-Agent is not a supported client.",
            request_id,
        );
    }
    let token = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(fields)) => fields.get("refreshToken").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    };
    let Some(token) = token.filter(|t| !t.is_empty()) else {
        shared.count_refresh_failure();
        return error(StatusCode::BAD_REQUEST, "invalid_request", "refreshToken is required.", request_id);
    };
    match shared.refresh_social(&token) {
        Ok(issued) => {
            tracing::debug!(account = %issued.account, "emulator: issued a social access token");
            shared.record_user_agent(&issued.account, Channel::Refresh, ua);
            let mut body = json!({ "accessToken": issued.access_token, "expiresIn": issued.expires_in });
            if let Some(refresh) = issued.refresh_token {
                body["refreshToken"] = json!(refresh);
            }
            if let Some(arn) = issued.profile_arn {
                body["profileArn"] = json!(arn);
            }
            json_response(StatusCode::OK, "application/json", &body, request_id)
        }
        Err(RefreshError::InvalidClient | RefreshError::InvalidGrant) => {
            tracing::info!("emulator: social refresh refused: dead refresh token");
            match shared.opts.social_dead_token {
                SocialDeadToken::InvalidGrant => error(
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    "Invalid refresh token provided.",
                    request_id,
                ),
                SocialDeadToken::Unauthorized => error(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "The refresh token is invalid or expired.",
                    request_id,
                ),
            }
        }
    }
}

/// `{"error", "error_description"}`.
pub(super) fn error(status: StatusCode, code: &str, description: &str, request_id: &str) -> Response<Body> {
    let body = json!({ "error": code, "error_description": description });
    json_response(status, "application/json", &body, request_id)
}
