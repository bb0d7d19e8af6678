//! The SSO OIDC `CreateToken` endpoint (`POST /token`): refresh-token grants, rotation, and the
//! service's error answers; device-code grants go to [`super::device`].

use http::{HeaderMap, Response, StatusCode};
use serde_json::{Value, json};

use super::server::{Body, json_response};
use super::state::{Channel, RefreshError, Shared};
use super::wire::user_agent;

/// Answers one `CreateToken` call whose body has been read.
pub(super) fn create_token(
    shared: &Shared,
    headers: &HeaderMap,
    body: &[u8],
    request_id: &str,
) -> Response<Body> {
    let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(body) else {
        shared.count_refresh_failure();
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidRequestException",
            "invalid_request",
            "Malformed request body.",
            request_id,
        );
    };
    let field = |name: &str| fields.get(name).and_then(Value::as_str);
    let (Some(client_id), Some(client_secret), Some(grant_type)) =
        (field("clientId"), field("clientSecret"), field("grantType"))
    else {
        shared.count_refresh_failure();
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidRequestException",
            "invalid_request",
            "clientId, clientSecret and grantType are required.",
            request_id,
        );
    };
    if grant_type == super::device::DEVICE_GRANT {
        return super::device::create_token(shared, client_id, client_secret, &fields, request_id);
    }
    if grant_type != "refresh_token" {
        shared.count_refresh_failure();
        return error(
            StatusCode::BAD_REQUEST,
            "UnsupportedGrantTypeException",
            "unsupported_grant_type",
            "Only the refresh_token and device_code grants are supported.",
            request_id,
        );
    }
    let Some(refresh_token) = field("refreshToken") else {
        shared.count_refresh_failure();
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidRequestException",
            "invalid_request",
            "refreshToken is required.",
            request_id,
        );
    };
    match shared.refresh(client_id, client_secret, refresh_token) {
        Ok(issued) => {
            tracing::debug!(client_id, "emulator: issued an access token");
            shared.record_user_agent(client_id, Channel::Refresh, user_agent(headers));
            let mut body = json!({
                "accessToken": issued.access_token,
                "tokenType": "Bearer",
                "expiresIn": issued.expires_in,
            });
            if let Some(refresh) = issued.refresh_token {
                body["refreshToken"] = json!(refresh);
            }
            json_response(StatusCode::OK, "application/json", &body, request_id)
        }
        Err(RefreshError::InvalidClient) => {
            tracing::info!(client_id, "emulator: refresh refused: invalid client");
            error(
                StatusCode::UNAUTHORIZED,
                "InvalidClientException",
                "invalid_client",
                "Invalid client provided.",
                request_id,
            )
        }
        Err(RefreshError::InvalidGrant) => {
            tracing::info!(client_id, "emulator: refresh refused: invalid grant");
            error(
                StatusCode::BAD_REQUEST,
                "InvalidGrantException",
                "invalid_grant",
                "Invalid refresh token provided.",
                request_id,
            )
        }
    }
}

pub(super) fn error(
    status: StatusCode,
    exception: &str,
    code: &str,
    description: &str,
    request_id: &str,
) -> Response<Body> {
    let body = json!({ "error": code, "error_description": description });
    let mut response = json_response(status, "application/json", &body, request_id);
    if let Ok(value) = http::HeaderValue::from_str(exception) {
        response.headers_mut().insert("x-amzn-ErrorType", value);
    }
    response
}
