//! Classification of Amazon Q's answers before the stream (non-200) into outcomes the account
//! pool acts on (PROTOCOL.md §2 "Errors before the stream").

use http::{HeaderMap, StatusCode};
use serde_json::Value;
use std::time::Duration;

/// Which quota ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaKind {
    Monthly,
    Daily,
}

/// What a failed `GenerateAssistantResponse` call means.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum UpstreamFailure {
    /// The request itself is wrong: never retry, not the account's fault.
    #[error("request rejected by Amazon Q: {message}")]
    BadRequest { message: String },
    /// The conversation is longer than the model accepts: a client error.
    #[error("prompt is too long: {message}")]
    ContextTooLong { message: String },
    /// Rate-limited: cool this account down and fail over.
    #[error("throttled: {message}")]
    Throttled { retry_after: Option<Duration>, message: String },
    /// The account-level 429 "Due to suspicious activity…": the account is being watched. Park
    /// it for a long time and never retry it meanwhile (hammering it ends in suspension).
    #[error("suspicious activity: {message}")]
    Suspicious { message: String },
    /// This account cannot use this model (`INVALID_MODEL_ID`): another account may.
    #[error("model not offered to this account: {message}")]
    ModelNotOffered { message: String },
    /// The endpoint is not there (404): the account may be on the other endpoint.
    #[error("endpoint not found: {message}")]
    NotFound { message: String },
    /// The endpoint could not be reached (connection refused, DNS, connect timeout): before
    /// anything was sent.
    #[error("endpoint unreachable: {message}")]
    Unreachable { message: String },
    /// The account's own proxy fails (down, silent, refusing its credentials or the tunnel,
    /// not speaking its protocol): nothing was sent, no endpoint is reached through it, and
    /// the account is cooled down while another serves.
    #[error("the account's proxy fails: {message}")]
    ProxyFailed { message: String },
    /// The service has no capacity for the model right now: transient, try another account.
    #[error("model capacity exhausted: {message}")]
    Capacity { message: String },
    /// The account's monthly or daily quota is used up: park it until the reset.
    #[error("{kind:?} quota used up: {message}")]
    Quota { kind: QuotaKind, message: String },
    /// The bearer token was refused: refresh once and retry on the same account.
    #[error("access token refused")]
    TokenInvalid,
    /// The account is suspended: take it out of rotation and record why.
    #[error("account suspended: {reason}")]
    Suspended { reason: String },
    /// Another access-denied answer (for example a bad profile ARN): the account is unusable.
    #[error("access denied: {message}")]
    AccessDenied { message: String },
    /// 5xx, connection failures, timeouts: fail over.
    #[error("transient upstream failure: {message}")]
    Transient { status: Option<u16>, message: String },
}

impl UpstreamFailure {
    /// A stream that failed before any content reached the client: the same outcomes as an
    /// answer before the stream (one rule for both), so failover treats them alike.
    pub fn from_stream_error(e: &super::StreamError) -> UpstreamFailure {
        use super::StreamError;
        if e.is_output_truncation() {
            // The output cut before any of it came: nothing about the account or the request.
            return UpstreamFailure::Transient { status: None, message: e.to_string() };
        }
        let decided = match e {
            StreamError::Exception { exception_type, message, reason } => decide(
                None,
                short_type(exception_type),
                message.clone(),
                reason.as_deref().unwrap_or(""),
                None,
            ),
            StreamError::ErrorFrame { code, message } => {
                decide(None, short_type(code), message.clone(), "", None)
            }
            _ => UpstreamFailure::Transient { status: None, message: e.to_string() },
        };
        match decided {
            // An exception in the stream that names no account-level cause but a busy service
            // (`MODEL_TEMPORARILY_UNAVAILABLE`, an unavailable service mid-stream): the model's
            // capacity, as before the stream. A throttle stays the account's (it cools down, as
            // for a 429 before the stream): taken as the model's, the account kept its traffic.
            UpstreamFailure::Transient { .. } if e.is_capacity() => {
                UpstreamFailure::Capacity { message: e.to_string() }
            }
            UpstreamFailure::Transient { status, .. } => {
                UpstreamFailure::Transient { status, message: e.to_string() }
            }
            other => other,
        }
    }

    /// Whether another account may succeed where this one failed.
    pub fn try_another_account(&self) -> bool {
        !matches!(self, UpstreamFailure::BadRequest { .. } | UpstreamFailure::ContextTooLong { .. })
    }

    /// A short, stable name for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamFailure::BadRequest { .. } => "bad_request",
            UpstreamFailure::ContextTooLong { .. } => "context_too_long",
            UpstreamFailure::Throttled { .. } => "throttled",
            UpstreamFailure::Suspicious { .. } => "suspicious",
            UpstreamFailure::ModelNotOffered { .. } => "model_not_offered",
            UpstreamFailure::NotFound { .. } => "not_found",
            UpstreamFailure::Unreachable { .. } => "unreachable",
            UpstreamFailure::ProxyFailed { .. } => "proxy_failed",
            UpstreamFailure::Capacity { .. } => "capacity",
            UpstreamFailure::Quota { .. } => "quota",
            UpstreamFailure::TokenInvalid => "token_invalid",
            UpstreamFailure::Suspended { .. } => "suspended",
            UpstreamFailure::AccessDenied { .. } => "access_denied",
            UpstreamFailure::Transient { .. } => "transient",
        }
    }
}

/// The short exception name: the part after `#` and before `:`, e.g.
/// `com.amazon.aws.codewhisperer#ThrottlingException:http://…` → `ThrottlingException`.
fn short_type(t: &str) -> &str {
    let t = t.rsplit('#').next().unwrap_or(t);
    t.split(':').next().unwrap_or(t).trim()
}

fn is(name: &str, base: &str) -> bool {
    name == base || name == format!("{base}Exception") || name == format!("{base}Error")
}

/// Classifies a non-200 answer from the body (`__type`, `code`, `message`, `reason`), the
/// `x-amzn-ErrorType` header, and the status as the last resort.
pub fn classify(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> UpstreamFailure {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let field = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
    let type_name = field("__type")
        .or_else(|| field("code"))
        .or_else(|| headers.get("x-amzn-errortype").and_then(|h| h.to_str().ok()).map(str::to_string))
        .map(|t| short_type(&t).to_string())
        .unwrap_or_default();
    let message = field("message").or_else(|| field("Message")).unwrap_or_else(|| {
        if v.is_object() {
            String::new()
        } else {
            String::from_utf8_lossy(&body[..body.len().min(512)]).trim().to_string()
        }
    });
    let reason = field("reason").unwrap_or_default();
    let retry_after = headers
        .get(http::header::RETRY_AFTER)
        .and_then(|h| h.to_str().ok())
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let message = if message.is_empty() { format!("HTTP {}", status.as_u16()) } else { message };
    decide(Some(status), &type_name, message, &reason, retry_after)
}

impl UpstreamFailure {
    /// The service refused a replayed reasoning signature (`THINKING_SIGNATURE_INVALID`).
    pub fn is_signature_refusal(&self) -> bool {
        matches!(self, UpstreamFailure::BadRequest { message } if message.starts_with("THINKING_SIGNATURE_INVALID"))
    }
}

/// The rule for a failure's parts, before the stream (with its HTTP `status`) or in it (none):
/// the exception's short name, its message and reason.
fn decide(
    status: Option<StatusCode>,
    type_name: &str,
    message: String,
    reason: &str,
    retry_after: Option<Duration>,
) -> UpstreamFailure {
    let text = format!("{reason} {message}");
    let status_is = |s: StatusCode| status == Some(s);

    // The 2026 reasons that mean the request itself is wrong: one attempt, a 400 to the client.
    for r in ["TOOL_USE_RESULT_MISMATCH", "TOOL_SCHEMA_INVALID", "THINKING_SIGNATURE_INVALID"] {
        if reason.contains(r) {
            return UpstreamFailure::BadRequest { message: format!("{r}: {message}") };
        }
    }
    if message.contains("profileArn is required") {
        return UpstreamFailure::BadRequest { message };
    }
    if reason.contains("INVALID_MODEL_ID") {
        return UpstreamFailure::ModelNotOffered { message };
    }
    if reason.contains("OVERAGE_REQUEST_LIMIT_EXCEEDED") {
        return UpstreamFailure::Quota {
            kind: QuotaKind::Monthly,
            message: format!("overage limit: {message}"),
        };
    }
    // The request's own fault: its message may quote the request (a tool id, a name the client
    // chose: "…for the following Ids: toolu_suspended"), so none of the rules that read the
    // message to park an account apply to it; only the service's own fields do. (The service
    // says quotas, suspicion and suspension with other exceptions: PROTOCOL.md §5.)
    if is(type_name, "Validation") || is(type_name, "Serialization") {
        if reason.contains("INSUFFICIENT_MODEL_CAPACITY") {
            return UpstreamFailure::Capacity { message };
        }
        if reason.contains("TEMPORARILY_SUSPENDED") {
            return UpstreamFailure::Suspended { reason: format!("{reason}: {message}") };
        }
        if reason.contains("MONTHLY_REQUEST_COUNT") {
            return UpstreamFailure::Quota { kind: QuotaKind::Monthly, message };
        }
        if reason.contains("DAILY_REQUEST_COUNT") {
            return UpstreamFailure::Quota { kind: QuotaKind::Daily, message };
        }
        if reason.contains("CONTENT_LENGTH_EXCEEDS_THRESHOLD") || message.contains("Input is too long") {
            return UpstreamFailure::ContextTooLong { message };
        }
        return UpstreamFailure::BadRequest { message };
    }
    if message.to_ascii_lowercase().contains("suspicious activity") {
        return UpstreamFailure::Suspicious { message };
    }
    if message.contains("locked your account") {
        return UpstreamFailure::Suspended { reason: message };
    }
    if reason.contains("MONTHLY_REQUEST_COUNT") || text.contains("MONTHLY_REQUEST_COUNT") {
        return UpstreamFailure::Quota { kind: QuotaKind::Monthly, message };
    }
    if reason.contains("DAILY_REQUEST_COUNT") || text.contains("DAILY_REQUEST_COUNT") {
        return UpstreamFailure::Quota { kind: QuotaKind::Daily, message };
    }
    if is(type_name, "ServiceQuotaExceeded") {
        return UpstreamFailure::Quota { kind: QuotaKind::Monthly, message };
    }
    // 413: the request is larger than the service takes (a front end's limit, answered before
    // the body was read): to the client, as to Claude Code, a prompt too long (it compacts).
    if reason.contains("CONTENT_LENGTH_EXCEEDS_THRESHOLD")
        || message.contains("Input is too long")
        || status_is(StatusCode::PAYLOAD_TOO_LARGE)
    {
        return UpstreamFailure::ContextTooLong { message };
    }
    if reason.contains("INSUFFICIENT_MODEL_CAPACITY")
        || message.contains("high traffic")
        || message.contains("high volume of traffic")
    {
        return UpstreamFailure::Capacity { message };
    }
    if is(type_name, "Throttling") || status_is(StatusCode::TOO_MANY_REQUESTS) {
        return UpstreamFailure::Throttled { retry_after, message };
    }
    if reason.contains("TEMPORARILY_SUSPENDED") || message.to_ascii_lowercase().contains("suspended") {
        let reason = if reason.is_empty() { message } else { format!("{reason}: {message}") };
        return UpstreamFailure::Suspended { reason };
    }
    if is(type_name, "AccessDenied")
        || is(type_name, "UnauthorizedAccess")
        || status_is(StatusCode::FORBIDDEN)
    {
        let lower = message.to_ascii_lowercase();
        if lower.contains("bearer token")
            || lower.contains("token") && lower.contains("invalid")
            || lower.contains("expired")
        {
            return UpstreamFailure::TokenInvalid;
        }
        return UpstreamFailure::AccessDenied { message };
    }
    if status_is(StatusCode::UNAUTHORIZED) || is(type_name, "ExpiredToken") {
        return UpstreamFailure::TokenInvalid;
    }
    if status_is(StatusCode::NOT_FOUND) {
        return UpstreamFailure::NotFound { message };
    }
    if is(type_name, "Validation") || is(type_name, "Serialization") || status_is(StatusCode::BAD_REQUEST) {
        return UpstreamFailure::BadRequest { message };
    }
    if status.is_some_and(|s| s.is_server_error())
        || is(type_name, "InternalServer")
        || is(type_name, "ServiceUnavailable")
        || status_is(StatusCode::REQUEST_TIMEOUT)
    {
        return UpstreamFailure::Transient { status: status.map(|s| s.as_u16()), message };
    }
    if status.is_some_and(|s| s.is_client_error()) {
        return UpstreamFailure::BadRequest { message };
    }
    UpstreamFailure::Transient { status: status.map(|s| s.as_u16()), message }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(status: u16, body: &str) -> UpstreamFailure {
        classify(StatusCode::from_u16(status).unwrap(), &HeaderMap::new(), body.as_bytes())
    }

    /// An exception in the stream before any content follows the same rule as the answer
    /// before the stream: the account's own causes park the account, the request's own are
    /// not failed over, and a busy service is capacity.
    /// A refused request whose message quotes what the client chose (a tool id, a name) never
    /// parks the account: before, `toolu_suspended` suspended it and `toolu_MONTHLY_REQUEST_COUNT`
    /// parked it for the month, on every account the request failed over to.
    #[test]
    fn client_text_in_a_refusal_parks_no_account() {
        for id in [
            "toolu_suspended_1",
            "toolu_MONTHLY_REQUEST_COUNT",
            "toolu_DAILY_REQUEST_COUNT",
            "suspicious activity",
            "locked your account",
            "high traffic",
        ] {
            let body = format!(
                r#"{{"__type":"com.amazon.aws.codewhisperer#ValidationException","message":"Bedrock error message: Expected toolResult blocks at messages.2.content for the following Ids: {id}","reason":null}}"#
            );
            let f = c(400, &body);
            assert!(matches!(f, UpstreamFailure::BadRequest { .. }), "{id}: {f:?}");
            assert!(!f.try_another_account(), "{id}");
        }
        // The service's own fields still count.
        let quota =
            c(400, r#"{"__type":"ValidationException","message":"limit","reason":"MONTHLY_REQUEST_COUNT"}"#);
        assert!(matches!(quota, UpstreamFailure::Quota { kind: QuotaKind::Monthly, .. }), "{quota:?}");
        let long =
            c(400, r#"{"__type":"ValidationException","message":"Input is too long for requested model."}"#);
        assert!(matches!(long, UpstreamFailure::ContextTooLong { .. }), "{long:?}");
        let busy = c(
            400,
            r#"{"__type":"ValidationException","message":"busy","reason":"INSUFFICIENT_MODEL_CAPACITY"}"#,
        );
        assert!(matches!(busy, UpstreamFailure::Capacity { .. }), "{busy:?}");
        let banned =
            c(400, r#"{"__type":"ValidationException","message":"x","reason":"TEMPORARILY_SUSPENDED"}"#);
        assert!(matches!(banned, UpstreamFailure::Suspended { .. }), "{banned:?}");
    }

    #[test]
    fn a_stream_exception_before_content_is_classified_as_an_answer_would_be() {
        use crate::upstream::StreamError;
        let ex = |t: &str, m: &str, r: Option<&str>| {
            UpstreamFailure::from_stream_error(&StreamError::Exception {
                exception_type: t.into(),
                message: m.into(),
                reason: r.map(str::to_string),
            })
        };
        let suspicious =
            ex("ThrottlingException", "Due to suspicious activity, your account is limited.", None);
        assert!(matches!(suspicious, UpstreamFailure::Suspicious { .. }), "{suspicious:?}");
        let monthly = ex("ThrottlingException", "You have reached the limit.", Some("MONTHLY_REQUEST_COUNT"));
        assert!(matches!(monthly, UpstreamFailure::Quota { kind: QuotaKind::Monthly, .. }), "{monthly:?}");
        let daily = ex("ThrottlingException", "Daily limit.", Some("DAILY_REQUEST_COUNT"));
        assert!(matches!(daily, UpstreamFailure::Quota { kind: QuotaKind::Daily, .. }), "{daily:?}");
        let invalid = ex("ValidationException", "Improperly formed request.", Some("REQUEST_BODY_INVALID"));
        assert!(matches!(invalid, UpstreamFailure::BadRequest { .. }), "{invalid:?}");
        assert!(!invalid.try_another_account());
        let busy = ex("error", "Encountered an unexpected error.", Some("MODEL_TEMPORARILY_UNAVAILABLE"));
        assert!(matches!(busy, UpstreamFailure::Capacity { .. }), "{busy:?}");
        let throttled = ex("ThrottlingException", "Rate exceeded", None);
        assert!(matches!(throttled, UpstreamFailure::Throttled { .. }), "{throttled:?}");
        let busy =
            ex("ThrottlingException", "I am experiencing high traffic", Some("INSUFFICIENT_MODEL_CAPACITY"));
        assert!(matches!(busy, UpstreamFailure::Capacity { .. }), "{busy:?}");
        let internal = ex("InternalServerException", "oops", None);
        assert!(matches!(internal, UpstreamFailure::Transient { status: None, .. }), "{internal:?}");
        let cut = ex("ContentLengthExceededException", "too long", None);
        assert!(matches!(cut, UpstreamFailure::Transient { .. }), "{cut:?}");
        let frame = UpstreamFailure::from_stream_error(&StreamError::ErrorFrame {
            code: "AccessDeniedException".into(),
            message: "Your account is temporarily suspended.".into(),
        });
        assert!(matches!(frame, UpstreamFailure::Suspended { .. }), "{frame:?}");
        let cut_off = UpstreamFailure::from_stream_error(&StreamError::Transport("reset".into()));
        assert!(matches!(cut_off, UpstreamFailure::Transient { .. }));
        // PROTOCOL §5's wording of a model-wide 429.
        let volume =
            c(429, r#"{"message":"The model you've selected is experiencing a high volume of traffic"}"#);
        assert!(matches!(volume, UpstreamFailure::Capacity { .. }), "{volume:?}");
    }

    #[test]
    fn protocol_table() {
        let p = "com.amazon.aws.codewhisperer#";
        assert!(matches!(
            c(
                400,
                &format!(
                    r#"{{"__type":"{p}ValidationException","message":"Improperly formed request.","reason":"REQUEST_BODY_INVALID"}}"#
                )
            ),
            UpstreamFailure::BadRequest { .. }
        ));
        assert!(matches!(
            c(
                400,
                r#"{"__type":"ValidationException","message":"Input is too long.","reason":"CONTENT_LENGTH_EXCEEDS_THRESHOLD"}"#
            ),
            UpstreamFailure::ContextTooLong { .. }
        ));
        assert!(matches!(
            c(413, r#"{"message":"Request too large"}"#),
            UpstreamFailure::ContextTooLong { .. }
        ));
        assert!(matches!(
            c(413, "<html>413 Request Entity Too Large</html>"),
            UpstreamFailure::ContextTooLong { .. }
        ));
        assert!(matches!(
            c(
                429,
                r#"{"__type":"ThrottlingException","message":"I am experiencing high traffic","reason":"INSUFFICIENT_MODEL_CAPACITY"}"#
            ),
            UpstreamFailure::Capacity { .. }
        ));
        assert!(matches!(
            c(429, r#"{"__type":"ThrottlingException","message":"Rate exceeded"}"#),
            UpstreamFailure::Throttled { .. }
        ));
        assert!(matches!(
            c(
                402,
                r#"{"__type":"ServiceQuotaExceededException","message":"x","reason":"MONTHLY_REQUEST_COUNT"}"#
            ),
            UpstreamFailure::Quota { kind: QuotaKind::Monthly, .. }
        ));
        assert!(matches!(
            c(429, r#"{"__type":"ThrottlingError","message":"x","reason":"DAILY_REQUEST_COUNT"}"#),
            UpstreamFailure::Quota { kind: QuotaKind::Daily, .. }
        ));
        assert_eq!(
            c(
                403,
                &format!(
                    r#"{{"__type":"{p}AccessDeniedException","message":"The bearer token included in the request is invalid."}}"#
                )
            ),
            UpstreamFailure::TokenInvalid
        );
        assert!(matches!(
            c(
                403,
                r#"{"__type":"AccessDeniedException","message":"Your account temporarily is suspended","reason":"TEMPORARILY_SUSPENDED"}"#
            ),
            UpstreamFailure::Suspended { .. }
        ));
        assert!(matches!(
            c(500, r#"{"__type":"InternalServerException","message":"unexpectedly high load"}"#),
            UpstreamFailure::Transient { status: Some(500), .. }
        ));
        assert!(matches!(c(503, ""), UpstreamFailure::Transient { status: Some(503), .. }));
        assert!(matches!(c(502, "<html>bad gateway</html>"), UpstreamFailure::Transient { .. }));
    }

    #[test]
    fn type_from_header_and_code() {
        let mut h = HeaderMap::new();
        h.insert("x-amzn-ErrorType", "ThrottlingException:http://internal.amazon.com/".parse().unwrap());
        h.insert("retry-after", "7".parse().unwrap());
        assert_eq!(
            classify(StatusCode::BAD_REQUEST, &h, b"{}"),
            UpstreamFailure::Throttled {
                retry_after: Some(Duration::from_secs(7)),
                message: "HTTP 400".into()
            }
        );
        assert!(matches!(
            c(400, r#"{"code":"ValidationError","message":"bad"}"#),
            UpstreamFailure::BadRequest { .. }
        ));
        assert!(!c(400, r#"{"code":"ValidationError"}"#).try_another_account());
        assert!(c(503, "").try_another_account());
    }
}
