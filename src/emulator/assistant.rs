//! The `GenerateAssistantResponse` operation (`POST /`): headers, bearer token, body rules, the
//! scripted behaviour, and either an error before the stream or a streamed reply.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::reply::{self, RequestInfo};
use super::script::{Behaviour, parse_directives};
use super::server::{Body, ConnCtl, ReadError, json_response, read_body};
use super::state::Shared;
use super::stream;
use super::validate::validate_request;

/// The content type of Amazon Q requests and error bodies.
pub const AMZ_JSON: &str = "application/x-amz-json-1.0";
/// The `X-Amz-Target` of the operation.
pub const TARGET: &str = "AmazonCodeWhispererStreamingService.GenerateAssistantResponse";
/// The content type of a streamed reply.
pub const EVENT_STREAM: &str = "application/vnd.amazon.eventstream";
/// The message of the 403 for an unknown, expired or missing bearer token.
pub const BEARER_INVALID: &str = "The bearer token included in the request is invalid.";
/// Largest request body read; larger ones get `CONTENT_LENGTH_EXCEEDS_THRESHOLD`.
const MAX_BODY: usize = 32 * 1024 * 1024;
/// How long a request whose connection was reset lingers before it gives up (HTTP/2 streams may
/// outlive their connection briefly).
const AFTER_RESET: Duration = Duration::from_secs(5);

/// The `reason` member of an error body.
enum Reason {
    /// No `reason` member.
    Omit,
    /// `"reason": null`.
    Null,
    Code(&'static str),
}

/// An error before the stream: `{"__type": "com.amazon.aws.codewhisperer#<name>", "message",
/// "reason"}` with `x-amzn-ErrorType` and `x-amzn-RequestId`.
fn q_error(
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

/// The error a failing behaviour answers with; `None` for the streaming ones.
fn behaviour_error(behaviour: &Behaviour, request_id: &str) -> Option<Response<Body>> {
    let throttled = |message, reason| {
        q_error(StatusCode::TOO_MANY_REQUESTS, "ThrottlingException", message, reason, request_id)
    };
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
        _ => return None,
    })
}

/// The token of `Authorization: Bearer <token>`.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

/// The media type of `Content-Type`, lowercased, without parameters.
fn media_type(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(http::header::CONTENT_TYPE)?.to_str().ok()?;
    Some(value.split(';').next().unwrap_or_default().trim().to_ascii_lowercase())
}

pub(super) async fn handle(
    req: Request<Incoming>,
    shared: Arc<Shared>,
    conn: Arc<ConnCtl>,
    request_id: String,
) -> Response<Body> {
    shared.count_request();
    let headers = req.headers();
    let target = headers.get("x-amz-target").and_then(|v| v.to_str().ok());
    if target != Some(TARGET) {
        tracing::warn!(target = ?target, "emulator: rejected request: X-Amz-Target is not {TARGET}");
        shared.count_malformed();
        return q_error(
            StatusCode::BAD_REQUEST,
            "UnknownOperationException",
            "The X-Amz-Target header names no operation of this service.",
            Reason::Omit,
            &request_id,
        );
    }
    let content_type = media_type(headers);
    if content_type.as_deref() != Some(AMZ_JSON) {
        tracing::warn!(content_type = ?content_type, "emulator: rejected request: Content-Type is not {AMZ_JSON}");
        shared.count_malformed();
        return q_error(
            StatusCode::BAD_REQUEST,
            "SerializationException",
            "Expected Content-Type application/x-amz-json-1.0.",
            Reason::Omit,
            &request_id,
        );
    }
    let Some(client_id) = bearer(headers).and_then(|token| shared.authenticate(token)) else {
        tracing::info!("emulator: rejected request: bearer token missing, unknown or expired");
        return q_error(
            StatusCode::FORBIDDEN,
            "AccessDeniedException",
            BEARER_INVALID,
            Reason::Omit,
            &request_id,
        );
    };
    shared.count_account_request(&client_id);

    let bytes = match read_body(req.into_body(), MAX_BODY).await {
        Ok(bytes) => bytes,
        Err(ReadError::TooLarge) => {
            tracing::warn!(client_id, "emulator: rejected request: body over {MAX_BODY} bytes");
            shared.count_malformed();
            return q_error(
                StatusCode::BAD_REQUEST,
                "ValidationException",
                "Input is too long.",
                Reason::Code("CONTENT_LENGTH_EXCEEDS_THRESHOLD"),
                &request_id,
            );
        }
        Err(ReadError::Io) => {
            shared.count_malformed();
            return q_error(
                StatusCode::BAD_REQUEST,
                "SerializationException",
                "The request body could not be read.",
                Reason::Omit,
                &request_id,
            );
        }
    };
    let body: Value = match serde_json::from_slice(&bytes) {
        Ok(body) => body,
        Err(e) => {
            tracing::warn!(client_id, error = %e, "emulator: rejected request: the body is not JSON");
            shared.count_malformed();
            return q_error(
                StatusCode::BAD_REQUEST,
                "SerializationException",
                "The request body is not valid JSON.",
                Reason::Omit,
                &request_id,
            );
        }
    };
    let checked = validate_request(&body);
    let info = RequestInfo::from_body(&body, bytes.len());
    shared.set_last_request(&client_id, body);
    if let Err(violation) = checked {
        tracing::warn!(
            client_id,
            rule = violation.rule.text(),
            path = %violation.path,
            "emulator: rejected malformed request: {} at {}",
            violation.rule.text(),
            violation.path,
        );
        shared.count_malformed();
        return if violation.rule.is_content_length() {
            q_error(
                StatusCode::BAD_REQUEST,
                "ValidationException",
                "Input is too long.",
                Reason::Code("CONTENT_LENGTH_EXCEEDS_THRESHOLD"),
                &request_id,
            )
        } else {
            q_error(
                StatusCode::BAD_REQUEST,
                "ValidationException",
                "Improperly formed request.",
                Reason::Null,
                &request_id,
            )
        };
    }

    let directives = parse_directives(&info.content);
    let account_behaviour = shared.next_behaviour(&client_id);
    let behaviour = directives.behaviour.clone().unwrap_or(account_behaviour);
    tracing::debug!(client_id, ?behaviour, "emulator: answering GenerateAssistantResponse");
    if let Some(response) = behaviour_error(&behaviour, &request_id) {
        return response;
    }
    match behaviour {
        Behaviour::ResetBeforeFirstByte => {
            conn.kill();
            tokio::time::sleep(AFTER_RESET).await;
            return q_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalServerException",
                "reset",
                Reason::Omit,
                &request_id,
            );
        }
        Behaviour::SlowFirstByte(d) => tokio::time::sleep(d).await,
        _ => {}
    }

    let plan = reply::plan(&info, &behaviour, &directives.shape, shared.ids(), shared.opts.fragment_delay);
    let (tx, rx) = mpsc::channel(stream::CHANNEL_FRAMES);
    tokio::spawn(stream::write(plan, tx, shared.clone(), client_id, conn));
    let mut response = Response::new(Body::Channel(rx));
    let headers = response.headers_mut();
    headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static(EVENT_STREAM));
    if let Ok(id) = HeaderValue::from_str(&request_id) {
        headers.insert("x-amzn-RequestId", id);
    }
    response
}
