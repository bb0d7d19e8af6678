//! The `GenerateAssistantResponse` operation (`POST /` on the Amazon Q role, `POST /runtime/` on
//! the Kiro runtime role): headers, credential and role, body rules, the account- and
//! model-dependent checks, the scripted behaviour, and either an error before the stream or a
//! streamed reply.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::Value;
use tokio::sync::mpsc;

use super::Role;
use super::reply::{self, PlanCtx, RequestInfo};
use super::script::{Behaviour, parse_directives};
use super::semantics;
use super::server::{Body, ConnCtl, ReadError, read_body};
use super::state::{Channel, Shared};
use super::stream;
use super::validate::validate_request;
use super::wire::{self, AMZ_JSON, Reason, q_error};

/// The `X-Amz-Target` of the operation.
pub const TARGET: &str = "AmazonCodeWhispererStreamingService.GenerateAssistantResponse";
/// The content type of a streamed reply.
pub const EVENT_STREAM: &str = "application/vnd.amazon.eventstream";
/// Largest request body read; larger ones get `CONTENT_LENGTH_EXCEEDS_THRESHOLD`.
const MAX_BODY: usize = 32 * 1024 * 1024;
/// How long a request whose connection was reset lingers before it gives up (HTTP/2 streams may
/// outlive their connection briefly).
const AFTER_RESET: Duration = Duration::from_secs(5);

pub(super) async fn handle(
    req: Request<Incoming>,
    role: Role,
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
        return wire::unknown_operation(&request_id);
    }
    let content_type = wire::media_type(headers);
    if content_type.as_deref() != Some(AMZ_JSON) {
        tracing::warn!(content_type = ?content_type, "emulator: rejected request: Content-Type is not {AMZ_JSON}");
        shared.count_malformed();
        return wire::wrong_content_type(&request_id);
    }
    let credential = match wire::admit(&shared, headers, role, Channel::Chat) {
        Ok(credential) => credential,
        Err(denied) => return denied.response(&request_id),
    };
    let client_id = credential.account.clone();
    shared.count_account_request(&client_id, role);
    // `amz-sdk-request: attempt=N; max=M`: a `once` directive fails the first attempt only.
    let first_attempt = headers
        .get("amz-sdk-request")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').find_map(|p| p.trim().strip_prefix("attempt=")))
        .is_none_or(|n| n.trim() == "1");

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
    let mut info = RequestInfo::from_body(&body, bytes.len());
    if let Err(violation) = checked {
        shared.set_last_request(&client_id, body);
        tracing::warn!(
            client_id,
            rule = violation.rule.text(),
            path = %violation.path,
            "emulator: rejected malformed request: {} at {}",
            violation.rule.text(),
            violation.path,
        );
        shared.count_malformed();
        let reason = violation.rule.reason().map_or(Reason::Null, Reason::Code);
        return wire::validation(violation.rule.message(), reason, &request_id);
    }
    let checked = semantics::check_chat(&shared, &credential, &body);
    shared.set_last_request(&client_id, body);
    match checked {
        Ok(model) => info.model = Some(model),
        Err(refusal) => {
            tracing::warn!(client_id, ?role, ?refusal, "emulator: refused a well-formed request");
            return refusal.response(&request_id);
        }
    }

    let directives = parse_directives(&info.content);
    let account_behaviour = shared.next_behaviour(&client_id);
    let directed = directives.behaviour.clone().filter(|_| first_attempt || !directives.once);
    let behaviour = directed.unwrap_or(account_behaviour);
    tracing::debug!(client_id, ?behaviour, "emulator: answering GenerateAssistantResponse");
    if let Some(response) = wire::behaviour_error(&behaviour, &request_id) {
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

    let ctx = PlanCtx {
        ids: shared.ids(),
        signer: shared.signer(),
        default_delay: shared.opts.fragment_delay,
        token_usage: shared.opts.token_usage,
    };
    let plan = reply::plan(&info, &behaviour, &directives.shape, &ctx);
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
