//! Anthropic-shaped errors: `{"type": "error", "error": {"type", "message"}, "request_id"}` with
//! the matching HTTP status.

use http::StatusCode;
use serde_json::json;
use std::time::Duration;

/// The `error.type` values of the Messages API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    InvalidRequest,
    Authentication,
    Permission,
    NotFound,
    RequestTooLarge,
    RateLimit,
    Api,
    Overloaded,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidRequest => "invalid_request_error",
            ErrorKind::Authentication => "authentication_error",
            ErrorKind::Permission => "permission_error",
            ErrorKind::NotFound => "not_found_error",
            ErrorKind::RequestTooLarge => "request_too_large",
            ErrorKind::RateLimit => "rate_limit_error",
            ErrorKind::Api => "api_error",
            ErrorKind::Overloaded => "overloaded_error",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            ErrorKind::InvalidRequest => StatusCode::BAD_REQUEST,
            ErrorKind::Authentication => StatusCode::UNAUTHORIZED,
            ErrorKind::Permission => StatusCode::FORBIDDEN,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::RequestTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::RateLimit => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::Api => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorKind::Overloaded => StatusCode::from_u16(529).expect("529 is a valid status"),
        }
    }
}

/// An error the client sees.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", kind.as_str())]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
    /// For 429/529: when the client may try again.
    pub retry_after: Option<Duration>,
    /// Overrides the status implied by `kind` (for example 405 for a wrong method).
    pub status: Option<StatusCode>,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError { kind, message: message.into(), retry_after: None, status: None }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidRequest, message)
    }

    pub fn with_retry_after(mut self, d: Duration) -> Self {
        self.retry_after = Some(d);
        self
    }

    pub fn with_status(mut self, s: StatusCode) -> Self {
        self.status = Some(s);
        self
    }

    pub fn status(&self) -> StatusCode {
        self.status.unwrap_or_else(|| self.kind.status())
    }

    /// The JSON body of an error response.
    pub fn body(&self, request_id: &str) -> serde_json::Value {
        json!({
            "type": "error",
            "error": {"type": self.kind.as_str(), "message": self.message},
            "request_id": request_id,
        })
    }

    /// The `data` of an SSE `event: error` frame (no request id inside, as Anthropic sends it).
    pub fn sse_data(&self) -> serde_json::Value {
        json!({"type": "error", "error": {"type": self.kind.as_str(), "message": self.message}})
    }

    /// Whether the SDKs should retry (`x-should-retry`): not when the wait is longer than a
    /// minute (a key's day or month budget spent). The SDKs ignore a `retry-after` above 60 s
    /// and retry on their own backoff, each retry another refused request.
    pub fn should_retry(&self) -> bool {
        matches!(self.kind, ErrorKind::RateLimit | ErrorKind::Api | ErrorKind::Overloaded)
            && self.retry_after.is_none_or(|d| d <= Duration::from_secs(60))
    }
}

#[cfg(test)]
mod retry_tests {
    use super::*;

    #[test]
    fn a_wait_past_a_minute_is_not_retried() {
        let limited = ApiError::new(ErrorKind::RateLimit, "rpm");
        assert!(limited.should_retry());
        assert!(limited.clone().with_retry_after(Duration::from_secs(60)).should_retry());
        assert!(!limited.with_retry_after(Duration::from_secs(3600)).should_retry(), "a spent daily budget");
        assert!(ApiError::new(ErrorKind::Overloaded, "busy").should_retry());
        assert!(!ApiError::invalid("bad").should_retry());
    }
}
