//! The trip to Amazon Q: lease an account → its access token → the body with the account's
//! profile ARN, to the account's endpoint → send → classify the outcome (one rule for errors
//! before the stream and streams that fail before any content, `upstream::errors`) → fail over
//! ([`retry`]) or finish → the Claude error the client sees; and once the stream has ended,
//! its outcome on the account ([`Leased::finish`]). The HTTP front end and `amqctl check` both
//! go through here; the server only speaks HTTP and SSE.

pub mod retry;

use crate::accounts::pins::SessionKey;
use crate::accounts::{Account, Lease, Pool, PoolError};
use crate::anthropic::{ApiError, ErrorKind};
use crate::config::{AccountId, Kind, Secret};
use crate::metrics::Metrics;
use crate::upstream::types::GenerateRequest;
use crate::upstream::{Caller, Event, EventStream, UpstreamFailure};
use bytes::Bytes;
use retry::{Budget, Next};
use std::sync::Arc;
use std::time::Duration;

/// Sends requests to Amazon Q through the account pool.
pub struct Relay {
    pool: Arc<Pool>,
    metrics: Arc<Metrics>,
    max_attempts: u32,
}

/// An upstream stream whose first content has arrived (or that ended). Until then nothing has
/// reached the client, so anything that failed before could still fail over.
pub struct Connected {
    pub lease: Leased,
    pub stream: EventStream,
    /// Events read while deciding the stream is good, to be replayed.
    pub pending: Vec<Event>,
    pub ended: bool,
}

/// How one attempt on one account ended. (Short-lived, one per attempt: its size is no cost.)
#[allow(clippy::large_enum_variant)]
enum Attempt {
    /// Content arrived (or the stream ended without error).
    Connected { stream: EventStream, pending: Vec<Event>, ended: bool },
    /// The account's token could not be had.
    NoToken(String),
    /// Amazon Q refused, or the stream failed before any content.
    Failed(UpstreamFailure),
}

/// The account a connected stream runs on, leased until this is dropped. The stream's end is
/// recorded on the account with [`Leased::finish`]; dropped without it (the client went away),
/// the lease ends with no verdict on the account.
pub struct Leased(Lease);

/// What a request that went through used, as the client was told.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Spent {
    pub tokens_in: u64,
    pub tokens_out: u64,
    /// Credits the service charged (`meteringEvent`), when it said.
    pub credits: Option<f64>,
}

impl Leased {
    pub fn id(&self) -> &AccountId {
        self.0.id()
    }

    /// The account is serving the request as `model` (the Amazon Q model id it was sent as).
    pub fn served_model(&self, model: &str) {
        self.0.served_model(model);
    }

    /// Records how the stream ended on the account and ends the lease (nothing is failed over
    /// once content has reached the client):
    /// - answered: the request counts, with what it used;
    /// - the upstream failed midway: the account's failure, by the same rule as before any
    ///   content (a throttle mid-stream cools the account down, a suspension parks it, …);
    /// - this daemon ended it (`request_timeout_secs`, shutdown, an answer it could not
    ///   translate): no verdict on the account.
    pub fn finish(self, ending: Ending<'_>) {
        match ending {
            Ending::Answered(spent) => self.0.success(spent.tokens_in, spent.tokens_out, spent.credits),
            Ending::Upstream(e) => self.0.failure(&UpstreamFailure::from_stream_error(e)),
            Ending::Daemon => {}
        }
    }
}

/// How a stream ended, for [`Leased::finish`].
#[derive(Debug, Clone, Copy)]
pub enum Ending<'a> {
    Answered(Spent),
    Upstream(&'a crate::upstream::StreamError),
    Daemon,
}

/// Content: what the client would be sent. An empty text event is none (the service may send
/// one first), so it does not end the time a failure can still fail over.
fn is_content(ev: &Event) -> bool {
    match ev {
        Event::AssistantResponse { content } => !content.is_empty(),
        Event::ToolUse { .. } | Event::Reasoning { .. } => true,
        _ => false,
    }
}

/// One of the service's closing events: what it sends at the end of a whole answer.
fn is_closing(ev: &Event) -> bool {
    matches!(ev, Event::Metadata { .. } | Event::ContextUsage { .. } | Event::Metering { .. })
}

/// Reads a stream until its first content (or its end): until then it could still fail over.
/// A stream that ends with nothing at all in it — no content, none of the service's closing
/// events (usage, metering) — was cut, not answered: a failure of the attempt.
async fn read_first_content(account: &Account, mut stream: EventStream) -> Attempt {
    let mut pending = Vec::new();
    let within = stream.first_content_within();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let Ok(next) = tokio::time::timeout_at(deadline, stream.next()).await else {
            tracing::info!(account = %account.id, "upstream stream sent no content within {} s", within.as_secs());
            return Attempt::Failed(UpstreamFailure::Transient {
                status: None,
                message: format!("no content within {} s of the answer's start", within.as_secs()),
            });
        };
        match next {
            Some(Ok(ev)) => {
                let content = is_content(&ev);
                pending.push(ev);
                if content {
                    return Attempt::Connected { stream, pending, ended: false };
                }
            }
            None if !pending.iter().any(is_closing) => {
                tracing::info!(account = %account.id, "upstream stream ended with nothing in it");
                return Attempt::Failed(UpstreamFailure::Transient {
                    status: None,
                    message: "the upstream answer ended with nothing in it".into(),
                });
            }
            None => return Attempt::Connected { stream, pending, ended: true },
            Some(Err(e)) => {
                tracing::info!(account = %account.id, error = %e, "upstream stream failed before any content");
                return Attempt::Failed(UpstreamFailure::from_stream_error(&e));
            }
        }
    }
}

impl Relay {
    pub fn new(pool: Arc<Pool>, metrics: Arc<Metrics>, max_attempts: u32) -> Relay {
        Relay { pool, metrics, max_attempts }
    }

    /// Calls Amazon Q with `request`, failing over to other accounts (up to `max_attempts`)
    /// while nothing has reached the client: errors before the stream and streams that fail
    /// before any content.
    /// A `session` stays on the account that last served it while that account is usable.
    pub async fn connect(
        &self,
        request: &GenerateRequest,
        session: Option<SessionKey>,
    ) -> Result<Connected, ApiError> {
        self.connect_with(request, session, &mut self.budget()).await
    }

    /// A request's attempts, for [`Relay::connect_with`].
    pub fn budget(&self) -> Budget {
        Budget::new(self.max_attempts)
    }

    /// A stream that failed after its first content, before any of it reached the client (a
    /// non-streaming answer is sent whole, at its end): the failure is the account's, as
    /// before content, and the request may go to another account. True when it may (the
    /// caller connects again with the same `budget`); false when the failure stands.
    pub fn failed_unsent(
        &self,
        lease: Leased,
        error: &crate::upstream::StreamError,
        budget: &mut Budget,
    ) -> bool {
        let f = UpstreamFailure::from_stream_error(error);
        self.metrics.attempt(f.kind());
        lease.0.failure(&f);
        match budget.after(lease.id(), f) {
            Next::Failover => {
                tracing::info!(account = %lease.id(), %error, "the answer failed before it was sent: failing over");
                true
            }
            Next::RefreshAndRetry | Next::Stop(_) => false,
        }
    }

    /// [`Relay::connect`] with the request's attempts so far (`budget`): a request that comes
    /// back after [`Relay::failed_unsent`] goes on where it stopped.
    pub async fn connect_with(
        &self,
        request: &GenerateRequest,
        session: Option<SessionKey>,
        budget: &mut Budget,
    ) -> Result<Connected, ApiError> {
        // The request without replayed reasoning, once the service refused a signature in it.
        let mut stripped: Option<GenerateRequest> = None;
        loop {
            let model = request.conversation_state.current_message.user_input_message.model_id.as_deref();
            let preferred = session
                .and_then(|s| self.pool.pinned(&s))
                .and_then(|id| self.pool.lease_preferred(&id, budget.excluded(), model));
            let leased = match preferred {
                Some(lease) => Ok(lease),
                None => self.pool.lease(budget.excluded(), model).await,
            };
            let lease = match leased {
                Ok(l) => l,
                Err(e) => {
                    return Err(match (budget.last(), &e) {
                        (Some(f), PoolError::NoneUsable { .. }) => failure_to_api(f),
                        _ => pool_to_api(&e),
                    });
                }
            };
            if !budget.start_attempt() {
                return Err(budget
                    .last()
                    .map(failure_to_api)
                    .unwrap_or_else(|| pool_to_api(&self.pool.busy())));
            }
            if budget.attempt() > 1 {
                self.metrics.failover();
            }
            let span = tracing::Span::current();
            span.record("account", lease.id().as_str());
            span.record("attempt", budget.attempt());
            let mut force = None;
            loop {
                let sent = stripped.as_ref().unwrap_or(request);
                let next = match self.attempt(&lease.account, force.take(), sent, budget.attempt()).await {
                    (Attempt::Connected { stream, pending, ended }, _) => {
                        self.metrics.attempt("ok");
                        if let Some(s) = session {
                            self.pool.pin(s, lease.id());
                        }
                        return Ok(Connected { lease: Leased(lease), stream, pending, ended });
                    }
                    (Attempt::NoToken(message), _) => {
                        self.metrics.attempt("refresh_failed");
                        budget.refresh_failed(lease.id(), format!("token refresh: {message}"))
                    }
                    (Attempt::Failed(f), _)
                        if f.is_signature_refusal() && stripped.is_none() && request.replays_reasoning() =>
                    {
                        // A thinking block another model or service signed (a `/model` switch,
                        // a fallback model, a session begun elsewhere): refused now, and in every
                        // later request of the session, which carries it on. The history goes
                        // again without replayed reasoning, on the same account (not its fault).
                        self.metrics.attempt(f.kind());
                        tracing::warn!(account = %lease.id(), "the service refused a replayed reasoning signature: sending the history again without reasoning");
                        stripped = Some(request.without_replayed_reasoning());
                        continue;
                    }
                    (Attempt::Failed(f), token) => {
                        self.metrics.attempt(f.kind());
                        if let (UpstreamFailure::ModelNotOffered { .. }, Some(m)) = (&f, model) {
                            self.pool.drop_model(&lease.account, m);
                        }
                        if f == UpstreamFailure::TokenInvalid && lease.account.kind() == Kind::ApiKey {
                            // An API key refused by every endpoint is a bad key: nothing to
                            // refresh, the account is out until the file changes it.
                            let bad = UpstreamFailure::AccessDenied {
                                message: "the Kiro API key was refused (revoked or wrong)".into(),
                            };
                            lease.failure(&bad);
                            budget.after(lease.id(), bad)
                        } else if f == UpstreamFailure::TokenInvalid {
                            if let Some(t) = &token {
                                lease.account.tokens.invalidate_if(t);
                            }
                            force = token;
                            budget.after(lease.id(), f)
                        } else {
                            lease.failure(&f);
                            budget.after(lease.id(), f)
                        }
                    }
                };
                match next {
                    Next::RefreshAndRetry => continue,
                    Next::Failover => {
                        tracing::info!(account = %lease.id(), failure = ?budget.last().map(|f| f.to_string()), "failing over");
                        break;
                    }
                    Next::Stop(f) => return Err(failure_to_api(&f)),
                }
            }
        }
    }

    /// One attempt on `account`: token (a refresh if `force`, the refused token, is still the
    /// current one), the profile ARN, then its chat endpoints in order — the one that last took
    /// its credentials first — reading until the first content. The other endpoint is tried
    /// only on answers that mean "this endpoint does not take this credential" (404, nothing
    /// listening, a 403 for a token that was just refreshed), never on a 4xx about the request;
    /// the one that works is remembered. A 403 "not authorized" with a learned profile ARN
    /// (`Pool::relist_profile`) lists an OIDC account's profiles again, once: a new one is tried
    /// on the same endpoint; else the learned one goes on to the other endpoint. A social
    /// account's goes on to the other endpoint, and the fixed social ARN stands in once both
    /// refused it. Returns the token used.
    async fn attempt(
        &self,
        account: &Arc<Account>,
        force: Option<Secret>,
        request: &GenerateRequest,
        attempt: u32,
    ) -> (Attempt, Option<Secret>) {
        let fresh = force.is_some();
        let token = match self.pool.access_token(account, force).await {
            Ok(t) => t,
            Err(e) => return (Attempt::NoToken(e.to_string()), None),
        };
        let kind = account.kind();
        let proxy = account.proxy();
        let agent = account.agent();
        let caller =
            Caller { bearer: &token, api_key: kind == Kind::ApiKey, agent: &agent, proxy: proxy.as_ref() };
        let endpoints = account.endpoints();
        let order = account.identity().chat_order(kind);
        let mut reasked = false;
        let mut i = 0;
        // The first endpoint's failure, when it sent us to the other one, and the profile ARN
        // sent there.
        let mut first: Option<(UpstreamFailure, Option<String>)> = None;
        let outcome = loop {
            let role = order[i];
            let arn = self.pool.profile_arn(account, &caller).await;
            let body = Bytes::from(request.to_body(arn.as_deref()));
            account.mark_used();
            match self.pool.client().generate(endpoints.chat(role), &caller, body, attempt).await {
                Ok(stream) => {
                    self.pool.remember_endpoint(account, role);
                    break read_first_content(account, stream).await;
                }
                Err(f) => {
                    let not_authorized = matches!(&f, UpstreamFailure::AccessDenied { message }
                        if message.to_ascii_lowercase().contains("not authorized"));
                    if not_authorized && !reasked {
                        let refused = arn.as_deref().unwrap_or_default();
                        let last = i + 1 >= order.len();
                        let other = self.pool.relist_profile(account, &caller, refused, last).await;
                        // Asked once an attempt (an OIDC account's listing is a call); a social
                        // account's learned ARN goes on to the other endpoint first.
                        reasked = other.is_some() || last || kind != Kind::Social;
                        if other.is_some() {
                            tracing::info!(account = %account.id, "profile ARN refused: trying another");
                            continue;
                        }
                    }
                    let refused = match &f {
                        UpstreamFailure::NotFound { .. } | UpstreamFailure::Unreachable { .. } => true,
                        UpstreamFailure::TokenInvalid => fresh || kind == Kind::ApiKey,
                        UpstreamFailure::AccessDenied { .. } => not_authorized,
                        _ => false,
                    };
                    if refused && i + 1 < order.len() {
                        tracing::info!(account = %account.id, endpoint = role.as_str(), failure = %f, "this endpoint does not take the account's credentials: trying the other one");
                        first = Some((f, arn));
                        i += 1;
                        continue;
                    }
                    // Refused by both: the first endpoint's answer is the one that counts (the
                    // other was only a fallback; its refusal says nothing new about the account).
                    let (f, sent) = match first.take() {
                        Some((f1, arn1)) if refused => (f1, arn1),
                        _ => (f, arn),
                    };
                    // The Builder ID profile stood in for one that could not be listed (an IAM
                    // Identity Center account needs its own): its refusal is no verdict on the
                    // account (it was made invalid, for good), only this attempt's failure. What
                    // this attempt sent decides (the stand-in, while the account knows no such
                    // profile of its own), whatever another request learned meanwhile.
                    let stand_in = crate::accounts::identity::BUILDER_ID_PROFILE_ARN;
                    let stand_in_refused = matches!(&f, UpstreamFailure::AccessDenied { message }
                        if message.to_ascii_lowercase().contains("not authorized"))
                        && sent.as_deref() == Some(stand_in)
                        && account.known_profile_arn().as_deref() != Some(stand_in);
                    // A token refreshed just now and refused by every endpoint: refreshing
                    // again on every request would not help (a refresh and three chat calls each
                    // time); the account cools down as one no endpoint takes.
                    if fresh && f == UpstreamFailure::TokenInvalid {
                        tracing::warn!(account = %account.id, "a freshly refreshed token was refused by every chat endpoint: cooling the account down");
                        break Attempt::Failed(UpstreamFailure::NotFound {
                            message: "a freshly refreshed token was refused by every chat endpoint".into(),
                        });
                    }
                    if stand_in_refused {
                        tracing::warn!(account = %account.id, "the stand-in profile ARN was refused (ListAvailableProfiles had failed): failing over; the profiles are listed again next time");
                        break Attempt::Failed(UpstreamFailure::NotFound {
                            message:
                                "its profiles could not be listed, and the stand-in profile ARN was refused"
                                    .into(),
                        });
                    }
                    break Attempt::Failed(f);
                }
            }
        };
        (outcome, Some(token))
    }

    /// `amqctl check`: a real minimal call on this one account (whatever its state), read to
    /// the end and classified like live traffic; a refused token is refreshed once. The
    /// verdict is recorded on the account unless an operator disabled it.
    pub async fn check(&self, account: &Arc<Account>, request: &GenerateRequest) -> Result<(), CheckFailure> {
        let mut force = None;
        let mut retried = false;
        let outcome = loop {
            match self.attempt(account, force.take(), request, 1).await {
                (Attempt::NoToken(message), _) => return Err(CheckFailure::Token(message)),
                (Attempt::Failed(UpstreamFailure::TokenInvalid), token) if !retried => {
                    retried = true;
                    if let Some(t) = &token {
                        account.tokens.invalidate_if(t);
                    }
                    force = token;
                }
                (Attempt::Failed(f), _) => break Err(f),
                (Attempt::Connected { mut stream, ended, .. }, _) => {
                    if ended {
                        break Ok(());
                    }
                    // Bounded as a whole: an answer that never ends (frames with nothing in
                    // them) must not hold the check, nor the account, for good.
                    let rest = async {
                        loop {
                            match stream.next().await {
                                Some(Ok(_)) => continue,
                                None => break Ok(()),
                                Some(Err(e)) => break Err(UpstreamFailure::from_stream_error(&e)),
                            }
                        }
                    };
                    break tokio::time::timeout(CHECK_ANSWER_WITHIN, rest).await.unwrap_or_else(|_| {
                        Err(UpstreamFailure::Transient {
                            status: None,
                            message: format!(
                                "the answer did not end within {} s",
                                CHECK_ANSWER_WITHIN.as_secs()
                            ),
                        })
                    });
                }
            }
        };
        if account.state().state != crate::accounts::State::Disabled {
            self.pool.record_check(account, outcome.as_ref().map(|_| ()));
        }
        outcome.map_err(|failure| CheckFailure::Upstream { failure })
    }
}

/// How long the rest of a check's answer (a minimal one) may take once its content began.
const CHECK_ANSWER_WITHIN: Duration = Duration::from_secs(60);

/// Why `amqctl check` failed.
#[derive(Debug, thiserror::Error)]
pub enum CheckFailure {
    #[error("{0}")]
    Token(String),
    #[error("{}: {failure}", .failure.kind())]
    Upstream { failure: UpstreamFailure },
}

/// Maps the last upstream failure (after every attempt) to the client's error.
pub fn failure_to_api(f: &UpstreamFailure) -> ApiError {
    match f {
        UpstreamFailure::BadRequest { message } => {
            ApiError::invalid(format!("Amazon Q rejected the request: {message}"))
        }
        UpstreamFailure::ContextTooLong { message } => {
            ApiError::invalid(format!("prompt is too long: {message}"))
        }
        UpstreamFailure::Throttled { retry_after, message } => ApiError::new(
            ErrorKind::RateLimit,
            format!("Amazon Q is rate-limiting every account tried: {message}"),
        )
        .with_retry_after(retry_after.unwrap_or(Duration::from_secs(10))),
        UpstreamFailure::Quota { message, .. } => ApiError::new(
            ErrorKind::RateLimit,
            format!("the Amazon Q quota of every account tried is used up: {message}"),
        )
        .with_retry_after(Duration::from_secs(60)),
        UpstreamFailure::Capacity { message } => {
            ApiError::new(ErrorKind::Overloaded, format!("Amazon Q is overloaded: {message}"))
        }
        UpstreamFailure::Suspicious { message } => ApiError::new(
            ErrorKind::Overloaded,
            format!(
                "no usable Amazon Q account: the last one tried is parked for suspicious activity ({message})"
            ),
        ),
        UpstreamFailure::ModelNotOffered { message } => {
            ApiError::new(ErrorKind::NotFound, format!("no account offers the requested model ({message})"))
        }
        // No endpoint took the account (its credentials, or a fresh token refused everywhere):
        // no usable account, as for the others the pool parks.
        UpstreamFailure::NotFound { message } => ApiError::new(
            ErrorKind::Overloaded,
            format!("no usable Amazon Q account: no endpoint took the last one tried ({message})"),
        ),
        UpstreamFailure::Unreachable { message } => {
            ApiError::new(ErrorKind::Api, format!("no Amazon Q endpoint took the request: {message}"))
        }
        // Its proxy is the account's: no usable account, as for the others the pool parks.
        UpstreamFailure::ProxyFailed { message } => ApiError::new(
            ErrorKind::Overloaded,
            format!(
                "no usable Amazon Q account: the last one tried cannot reach Amazon Q through its proxy ({message})"
            ),
        ),
        UpstreamFailure::TokenInvalid
        | UpstreamFailure::Suspended { .. }
        | UpstreamFailure::AccessDenied { .. } => ApiError::new(
            ErrorKind::Overloaded,
            format!("no usable Amazon Q account: the last one tried failed ({f})"),
        ),
        UpstreamFailure::Transient { status, message } => {
            if matches!(status, Some(503) | Some(529)) {
                ApiError::new(ErrorKind::Overloaded, format!("Amazon Q is unavailable: {message}"))
            } else {
                ApiError::new(ErrorKind::Api, format!("Amazon Q failed: {message}"))
            }
        }
    }
}

/// Maps a pool that could not lease an account to the client's error.
pub fn pool_to_api(e: &PoolError) -> ApiError {
    match e {
        PoolError::AllThrottled { retry_after, .. } => {
            ApiError::new(ErrorKind::RateLimit, e.to_string()).with_retry_after(*retry_after)
        }
        PoolError::NoneUsable { .. } => ApiError::new(ErrorKind::Overloaded, e.to_string()),
        PoolError::NoLease { .. } => ApiError::new(ErrorKind::Overloaded, e.to_string())
            .with_status(http::StatusCode::SERVICE_UNAVAILABLE)
            .with_retry_after(Duration::from_secs(1)),
        PoolError::Busy { retry_after, .. } => {
            ApiError::new(ErrorKind::RateLimit, e.to_string()).with_retry_after(*retry_after)
        }
    }
}
