//! Wire conventions shared by the JSON-RPC roles (Amazon Q, Kiro runtime, Kiro management):
//! error bodies and their messages, the answers of failing [`Behaviour`]s, reading `Authorization`
//! and `Content-Type`, and admitting a call (bearer or API key, then the role's access rule).

use http::{HeaderMap, HeaderValue, Response, StatusCode};
use serde_json::{Value, json};

use super::script::Behaviour;
use super::server::{Body, json_response};
use super::state::{Channel, Credential, Shared};
use super::{AccountKind, Role};

/// The content type of JSON-RPC requests and error bodies.
pub const AMZ_JSON: &str = "application/x-amz-json-1.0";
/// The message of the 403 for an unknown, expired or missing bearer token (or API key).
pub const BEARER_INVALID: &str = "The bearer token included in the request is invalid.";
/// The message of the 403 for a credential the endpoint does not take, or a wrong profile ARN.
pub const NOT_AUTHORIZED: &str = "User is not authorized to make this call";
/// The message of the 400 for a missing `profileArn`.
pub const PROFILE_REQUIRED: &str = "profileArn is required for this request.";
/// The message of the 400 `INVALID_MODEL_ID`.
pub const INVALID_MODEL: &str = "Invalid model. Please select a different model to continue.";
/// The message of the 400 for reasoning fields sent to a model that takes none.
pub const FIELDS_NOT_SUPPORTED: &str = "additionalModelRequestFields is not supported for this model";
/// The message of the 400 for reasoning fields that break the model's schema.
pub const FIELDS_INVALID: &str = "Invalid additionalModelRequestFields";
/// The message of the 400 `THINKING_SIGNATURE_INVALID`.
pub const SIGNATURE_INVALID: &str = "Invalid signature in thinking block.";
/// The message of the 429 that says the account is being watched.
pub const SUSPICIOUS: &str = "Due to suspicious activity, we are imposing temporary limits on your account. \
                              Please try again later.";
/// The message of the 403 for a locked account.
pub const LOCKED: &str = "Your User ID temporarily is suspended. We've locked your account as a security \
                          precaution. Please contact AWS Support to unlock it.";
/// The message of the 429 `INSUFFICIENT_MODEL_CAPACITY` of 2026.
pub const HIGH_TRAFFIC: &str = "The model you've selected is experiencing a high volume of traffic. Please \
                                try again later or select a different model.";

/// The `reason` member of an error body.
#[derive(Clone, Copy, Debug)]
pub enum Reason {
    /// No `reason` member.
    Omit,
    /// `"reason": null`.
    Null,
    Code(&'static str),
}

/// An error: `{"__type": "com.amazon.aws.codewhisperer#<name>", "message", "reason"}` with
/// `x-amzn-ErrorType` and `x-amzn-RequestId`.
pub(super) fn q_error(
    status: StatusCode,
    name: &str,
    message: &str,
    reason: Reason,
    request_id: &str,
) -> Response<Body> {
    let mut body = json!({
        "__type": format!("com.amazon.aws.codewhisperer#{name}"),
        "message": message,
    });
    match reason {
        Reason::Omit => {}
        Reason::Null => body["reason"] = Value::Null,
        Reason::Code(code) => body["reason"] = json!(code),
    }
    let mut response = json_response(status, AMZ_JSON, &body, request_id);
    let error_type = format!("{name}:http://internal.amazon.com/coral/com.amazon.aws.codewhisperer/");
    if let Ok(value) = HeaderValue::from_str(&error_type) {
        response.headers_mut().insert("x-amzn-ErrorType", value);
    }
    response
}

/// A 400 `ValidationException`.
pub(super) fn validation(message: &str, reason: Reason, request_id: &str) -> Response<Body> {
    q_error(StatusCode::BAD_REQUEST, "ValidationException", message, reason, request_id)
}

/// A 403 `AccessDeniedException` without a reason.
pub(super) fn access_denied(message: &str, request_id: &str) -> Response<Body> {
    q_error(StatusCode::FORBIDDEN, "AccessDeniedException", message, Reason::Omit, request_id)
}

/// The 400 `UnknownOperationException` for an `X-Amz-Target` the role does not serve.
pub(super) fn unknown_operation(request_id: &str) -> Response<Body> {
    q_error(
        StatusCode::BAD_REQUEST,
        "UnknownOperationException",
        "The X-Amz-Target header names no operation of this service.",
        Reason::Omit,
        request_id,
    )
}

/// The 400 `SerializationException` for a body that is not `application/x-amz-json-1.0`.
pub(super) fn wrong_content_type(request_id: &str) -> Response<Body> {
    q_error(
        StatusCode::BAD_REQUEST,
        "SerializationException",
        "Expected Content-Type application/x-amz-json-1.0.",
        Reason::Omit,
        request_id,
    )
}

/// The error a failing behaviour answers with; `None` for the streaming ones.
pub(super) fn behaviour_error(behaviour: &Behaviour, request_id: &str) -> Option<Response<Body>> {
    let throttled = |message, reason| {
        q_error(StatusCode::TOO_MANY_REQUESTS, "ThrottlingException", message, reason, request_id)
    };
    let invalid = |message, reason| validation(message, Reason::Code(reason), request_id);
    Some(match behaviour {
        Behaviour::Suspended => q_error(
            StatusCode::FORBIDDEN,
            "AccessDeniedException",
            "Your User ID temporarily is suspended. Please contact AWS support.",
            Reason::Code("TEMPORARILY_SUSPENDED"),
            request_id,
        ),
        Behaviour::Throttled { retry_after_secs } => {
            let mut response = throttled("Rate exceeded", Reason::Omit);
            if let Some(secs) = retry_after_secs {
                response.headers_mut().insert(http::header::RETRY_AFTER, HeaderValue::from(*secs));
            }
            response
        }
        Behaviour::CapacityExhausted => throttled(
            "I am experiencing high traffic, please try again shortly.",
            Reason::Code("INSUFFICIENT_MODEL_CAPACITY"),
        ),
        Behaviour::MonthlyQuota => throttled(
            "You have reached the limit for requests. The limit resets at the start of next month.",
            Reason::Code("MONTHLY_REQUEST_COUNT"),
        ),
        Behaviour::DailyQuota => throttled(
            "You have reached the daily limit for requests. The limit resets tomorrow.",
            Reason::Code("DAILY_REQUEST_COUNT"),
        ),
        Behaviour::InternalError => q_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalServerException",
            "Encountered an unexpectedly high load when processing the request, please try again.",
            Reason::Omit,
            request_id,
        ),
        Behaviour::Unavailable => q_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailableException",
            "Service is temporarily unavailable. Please try again later.",
            Reason::Omit,
            request_id,
        ),
        Behaviour::Suspicious => throttled(SUSPICIOUS, Reason::Null),
        Behaviour::Locked => access_denied(LOCKED, request_id),
        Behaviour::BearerRefused => access_denied(BEARER_INVALID, request_id),
        Behaviour::ToolUseResultMismatch => {
            invalid("Tool use and tool result do not match.", "TOOL_USE_RESULT_MISMATCH")
        }
        Behaviour::ToolSchemaInvalid => invalid("A tool input schema is invalid.", "TOOL_SCHEMA_INVALID"),
        Behaviour::SignatureInvalid => invalid(SIGNATURE_INVALID, "THINKING_SIGNATURE_INVALID"),
        Behaviour::ProfileRequired => validation(PROFILE_REQUIRED, Reason::Null, request_id),
        Behaviour::Overage => q_error(
            StatusCode::PAYMENT_REQUIRED,
            "ServiceQuotaExceededException",
            "You have reached the overage limit for requests. Overage resumes at the start of next month.",
            Reason::Code("OVERAGE_REQUEST_LIMIT_EXCEEDED"),
            request_id,
        ),
        Behaviour::HighTraffic => throttled(HIGH_TRAFFIC, Reason::Code("INSUFFICIENT_MODEL_CAPACITY")),
        Behaviour::InvalidModel => invalid(INVALID_MODEL, "INVALID_MODEL_ID"),
        _ => return None,
    })
}

/// The token of `Authorization: Bearer <token>`.
pub(super) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

/// The media type of `Content-Type`, lowercased, without parameters.
pub(super) fn media_type(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(http::header::CONTENT_TYPE)?.to_str().ok()?;
    Some(value.split(';').next().unwrap_or_default().trim().to_ascii_lowercase())
}

/// The `User-Agent` header, when it is readable.
pub(super) fn user_agent(headers: &HeaderMap) -> Option<&str> {
    headers.get(http::header::USER_AGENT)?.to_str().ok()
}

/// Why a call was not admitted (403 `AccessDeniedException`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Denied {
    /// "The bearer token included in the request is invalid.": no credential resolved (or an API
    /// key on the Amazon Q role, which does not know API keys).
    BearerInvalid,
    /// "User is not authorized to make this call": a credential of a kind the role refuses.
    NotAuthorized,
}

impl Denied {
    pub fn response(self, request_id: &str) -> Response<Body> {
        match self {
            Denied::BearerInvalid => access_denied(BEARER_INVALID, request_id),
            Denied::NotAuthorized => access_denied(NOT_AUTHORIZED, request_id),
        }
    }
}

/// Who the call comes from, once `role` has agreed to take it: the bearer token (or API key with
/// `tokentype: API_KEY`) is resolved, the user agent recorded for `channel`, and the role's access
/// rule applied.
pub(super) fn admit(
    shared: &Shared,
    headers: &HeaderMap,
    role: Role,
    channel: Channel,
) -> Result<Credential, Denied> {
    let api_key_header = headers.get("tokentype").is_some_and(|v| v.as_bytes() == b"API_KEY");
    let Some(credential) = bearer(headers).and_then(|token| shared.resolve(token, api_key_header)) else {
        tracing::info!(?role, "emulator: rejected call: bearer token missing, unknown or expired");
        return Err(Denied::BearerInvalid);
    };
    shared.record_user_agent(&credential.account, channel, user_agent(headers));
    if !shared.accepts(role, &credential) {
        tracing::info!(account = %credential.account, ?role, kind = ?credential.kind, "emulator: refused a credential this endpoint does not take");
        shared.count_refused(&credential.account);
        let unknown_here = role == Role::AmazonQ && credential.kind == AccountKind::ApiKey;
        return Err(if unknown_here { Denied::BearerInvalid } else { Denied::NotAuthorized });
    }
    Ok(credential)
}
