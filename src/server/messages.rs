//! `/v1/messages` at the HTTP edge: parse and translate the request, hand it to the relay
//! ([`crate::relay`]: the account, the call to Amazon Q, failover, the outcome on the account),
//! then write what comes back as Claude SSE (or one aggregated JSON message), with the access
//! log and metrics of the exchange.

use super::App;
use super::body::{Outbox, Producer};
use crate::anthropic::request::{self, ApiVersion, Endpoint, MessagesRequest};
use crate::anthropic::sse::StreamEvent;
use crate::anthropic::{ApiError, ErrorKind};
use crate::relay::{Connected, Ending, Leased, Spent};
use crate::translate::{Aggregator, Context, ResponseState, Translated, translate};
use crate::upstream::StreamError;
use crate::upstream::client::EventStream;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument;

/// Ping interval while the upstream is silent (keeps idle-timeout proxies from cutting the stream).
pub const PING_INTERVAL: Duration = Duration::from_secs(15);
/// Upstream events taken in one batch when they are there without waiting.
const TAKE_AT_ONCE: usize = 64;

/// What the access log and metrics record about one exchange.
#[derive(Debug, Default, Clone)]
pub struct Exchange {
    /// The client key's name, or an unnamed key's short fingerprint (never the key).
    pub key: String,
    /// Who called (once authenticated).
    pub caller: Option<crate::keys::Caller>,
    /// A `/v1/messages` request (counted in usage).
    pub messages: bool,
    /// The key's concurrency slot, held until the response (a stream: its end) is done.
    pub admitted: Option<Arc<crate::keys::Admitted>>,
    pub model: String,
    /// The Amazon Q model id the request was sent as (what the client's name resolved to); set
    /// with [`Exchange::resolved`].
    pub upstream_model: String,
    /// [`Exchange::model_label`], made once (by [`Exchange::resolved`]).
    pub label: String,
    pub stream: bool,
    pub account: Option<String>,
    pub tokens_in: u64,
    pub tokens_out: u64,
    /// Credits the service charged for the answer (`meteringEvent`), when it said.
    pub credits: Option<f64>,
    pub first_byte: Option<Duration>,
}

impl Exchange {
    /// The model as metrics and usage rows name it: the Claude-style id of the model the name
    /// resolved to, or `other` (the client's own name is unbounded: dated names, aliases and
    /// made-up names would each be a new series and a new row).
    pub fn model_label(&self) -> &str {
        if self.label.is_empty() { "other" } else { &self.label }
    }

    /// The client's model name resolved to `q_model`.
    pub fn resolved(&mut self, q_model: String) {
        self.label =
            if q_model.is_empty() { String::new() } else { crate::translate::catalog::claude_id(&q_model) };
        self.upstream_model = q_model;
    }
}

/// The parsed and translated request, ready for an account.
pub struct Prepared {
    pub req: MessagesRequest,
    pub translated: Translated,
    /// The client session it belongs to (the pin key).
    pub session: crate::accounts::pins::SessionKey,
}

impl Prepared {
    /// The request's input tokens (counted when it was translated).
    pub fn input_tokens(&self) -> u64 {
        self.translated.response.input_tokens
    }
}

pub fn prepare(
    app: &App,
    body: &[u8],
    version: ApiVersion,
    betas: request::Betas,
    session: Option<&str>,
    key_tag: &str,
) -> Result<Prepared, ApiError> {
    let req = request::parse_with(body, version, Endpoint::Messages, betas)?;
    // The client session: Claude Code's (its header or metadata.user_id), else the client key
    // and the conversation's first user message — one conversation, one session.
    let session = session
        .map(str::to_owned)
        .or_else(|| crate::translate::request::session_of(req.metadata_user_id.as_deref()))
        .unwrap_or_else(|| format!("{key_tag}:{}", crate::translate::request::first_user_digest(&req)));
    let session_text = session;
    // The live catalog: the model is resolved against what the accounts offer, and its limits
    // and reasoning schema come from there.
    let live = app.pool.union();
    let caps = app.models.resolve_live(&req.routed_model(), &live).ok().and_then(|q| live.caps(&q));
    let ctx = Context {
        models: &app.models,
        session_id: Some(session_text.as_str()),
        caps: caps.as_ref(),
        catalog: Some(&live),
    };
    let translated = translate(&req, &ctx)?;
    let session = crate::accounts::pins::session_key(&session_text);
    Ok(Prepared { req, translated, session })
}

/// Non-streaming: the whole message as one JSON value. Nothing reaches the client before the
/// end, so an answer whose stream fails midway (the account's capacity, a reset, a silent
/// upstream) goes to another account, as one that fails before its first content does.
pub async fn aggregate(
    app: &Arc<App>,
    p: &Prepared,
    x: &mut Exchange,
) -> Result<serde_json::Value, ApiError> {
    let mut budget = app.relay.budget();
    let feed = |evs: Vec<StreamEvent>, agg: &mut Aggregator| {
        for e in &evs {
            agg.push(e);
        }
    };
    let (lease, st, agg) = 'attempts: loop {
        let Connected { lease, mut stream, pending, ended } =
            app.relay.connect_with(&p.translated.request, Some(p.session), &mut budget).await?;
        x.account = Some(lease.id().to_string());
        lease.served_model(&p.translated.q_model);
        let mut st = ResponseState::new(p.translated.response.clone());
        let mut agg = Aggregator::default();
        feed(st.start(), &mut agg);
        for ev in pending {
            feed(st.on_event(ev), &mut agg);
        }
        if ended {
            feed(st.on_end(), &mut agg);
        }
        while !st.is_finished() {
            // What the answer has used so far, kept current: a client gone before the end (this
            // future dropped) is still charged for it (`http::Left`).
            x.tokens_out = st.output_estimate();
            x.credits = st.credits();
            match stream.next().await {
                Some(Ok(ev)) => feed(st.on_event(ev), &mut agg),
                Some(Err(e)) if !e.is_output_truncation() => {
                    drop(stream);
                    if app.relay.failed_unsent(lease, &e, &mut budget) {
                        x.tokens_out = 0;
                        x.credits = None;
                        continue 'attempts;
                    }
                    // The failure stands: the answer ends with it (the account's verdict is
                    // recorded).
                    feed(st.on_error(&e), &mut agg);
                    return agg.finish();
                }
                Some(Err(e)) => feed(st.on_error(&e), &mut agg),
                None => feed(st.on_end(), &mut agg),
            }
        }
        break (lease, st, agg);
    };
    let result = agg.finish();
    match &result {
        Ok(_) => {
            let usage = st.usage();
            x.tokens_in = usage.total_input();
            x.tokens_out = usage.output_tokens;
            x.credits = st.credits();
            lease.finish(Ending::Answered(spent(x)));
            app.metrics.tokens(x.model_label(), x.tokens_in, x.tokens_out);
            if let Some(c) = x.credits {
                app.metrics.credits(x.model_label(), c);
            }
        }
        // An answer this daemon could not make whole (a tool input that is no JSON object).
        Err(_) => lease.finish(Ending::Daemon),
    }
    result
}

/// Runs the events that are there without waiting — the rest of the read the last one came
/// from, and what the socket holds now — through the response: they leave together, in one
/// write, and text that arrived in several pieces leaves as one delta.
///
/// At most [`TAKE_AT_ONCE`] events: an upstream that never lets the socket run dry still
/// gets its output written (and the client's pace checked) between batches.
async fn take_ready(
    stream: &mut EventStream,
    st: &mut ResponseState,
    out: &mut Vec<StreamEvent>,
    failed: &mut Option<StreamError>,
) {
    for _ in 0..TAKE_AT_ONCE {
        if st.is_finished() {
            break;
        }
        match stream.next_ready().await {
            Some(Some(Ok(ev))) => st.on_event_into(ev, out),
            Some(Some(Err(e))) => {
                out.extend(st.on_error(&e));
                *failed = Some(e);
                return;
            }
            Some(None) => return out.extend(st.on_end()),
            None => break,
        }
    }
}

/// What the exchange used, as the client was told.
fn spent(x: &Exchange) -> Spent {
    Spent { tokens_in: x.tokens_in, tokens_out: x.tokens_out, credits: x.credits }
}

/// What a stream's end records (access log, metrics: the request under its real outcome, tokens,
/// duration, the stream count; the account's outcome, through the relay's [`Leased::finish`]).
/// Its `Drop` does it, so that a stream dropped because the client went away is recorded too
/// (as 499). A stream that failed after its 200 headers is recorded under the status its
/// `event: error` stands for (500 `api_error`, 529 `overloaded_error`, …), in the access log
/// and in `amq2api_requests_total`.
struct StreamEnd {
    app: Arc<App>,
    x: Exchange,
    request_id: String,
    started: Instant,
    lease: Option<Leased>,
    /// `None` until the stream has ended: the client went away first.
    outcome: Option<Result<(), ApiError>>,
    /// The upstream's failure, when the stream ended on one (else an error is this daemon's:
    /// `request_timeout_secs`, shutdown, an answer it could not translate).
    failed: Option<StreamError>,
}

impl StreamEnd {
    fn finish(&mut self, outcome: Result<(), ApiError>) {
        self.outcome = Some(outcome);
    }
}

impl Drop for StreamEnd {
    fn drop(&mut self) {
        let status = match &self.outcome {
            None => 499,
            Some(Err(e)) => e.status().as_u16(),
            Some(Ok(())) => 200,
        };
        if let (Some(lease), Some(outcome)) = (self.lease.take(), &self.outcome) {
            lease.finish(match (outcome, &self.failed) {
                (Ok(()), _) => Ending::Answered(spent(&self.x)),
                (Err(_), Some(e)) => Ending::Upstream(e),
                (Err(_), None) => Ending::Daemon,
            });
        }
        // The client went away first: the lease ends with no verdict on the account.
        drop(self.lease.take());
        self.app.metrics.request(self.x.model_label(), status);
        // The usage the client was told: message_start's input tokens, and message_delta's
        // (input and output) if the stream got that far.
        self.app.metrics.tokens(self.x.model_label(), self.x.tokens_in, self.x.tokens_out);
        if let Some(c) = self.x.credits {
            self.app.metrics.credits(self.x.model_label(), c);
        }
        self.app.metrics.stream_ended();
        self.app.metrics.request_duration(self.started.elapsed());
        super::access_log(&self.app, &self.request_id, &self.x, status, self.started);
    }
}

/// Streaming: connects (with failover), then returns the producer of the SSE body. The producer
/// runs inside the client connection's task and owns the lease and the upstream stream; both
/// are dropped when the client goes away.
pub async fn stream(
    app: &Arc<App>,
    p: Prepared,
    mut x: Exchange,
    started: Instant,
    request_id: String,
) -> Result<Producer, ApiError> {
    let Connected { lease, mut stream, pending, ended } =
        app.relay.connect(&p.translated.request, Some(p.session)).await?;
    x.account = Some(lease.id().to_string());
    lease.served_model(&p.translated.q_model);
    let out = Outbox::default();
    let params = p.translated.response;
    let deadline = started + app.config.server.request_timeout;
    let mut drain = app.drain_expired.clone();
    app.metrics.stream_started();
    let mut end = StreamEnd {
        app: app.clone(),
        x,
        request_id,
        started,
        lease: Some(lease),
        outcome: None,
        failed: None,
    };
    let o = out.clone();
    let span = tracing::Span::current();
    Ok(Producer::new(out, async move {
        let mut st = ResponseState::new(params);
        let mut errored: Option<ApiError> = None;
        let mut batch = st.start();
        for ev in pending {
            st.on_event_into(ev, &mut batch);
        }
        if ended {
            batch.extend(st.on_end());
        } else {
            take_ready(&mut stream, &mut st, &mut batch, &mut end.failed).await;
        }
        // Records usage and errors, and writes the events.
        let mut emit = |evs: &[StreamEvent], x: &mut Exchange| {
            for e in evs {
                match e {
                    StreamEvent::MessageStart { usage, .. } => x.tokens_in = usage.total_input(),
                    StreamEvent::MessageDelta { usage, .. } => {
                        x.tokens_out = usage.output_tokens;
                        x.tokens_in = usage.total_input();
                    }
                    StreamEvent::Error(e) => errored = Some(e.clone()),
                    _ => {}
                }
            }
            if !evs.is_empty() {
                o.write(|buf| {
                    for e in evs {
                        e.write_sse(buf);
                    }
                });
            }
        };
        emit(&batch, &mut end.x);
        end.x.first_byte = Some(started.elapsed());
        end.app.metrics.first_byte(started.elapsed());
        // The first content leaves at once, before whatever follows it is read.
        o.flush().await;
        // The upstream is polled first: while events are ready nothing else is touched (the
        // deadline is checked against the clock read for the ping, once a batch), and the
        // events there without waiting are taken as one batch (`take_ready`) that leaves in one
        // write (the body hands the output over when this waits). The timers are
        // polled and registered only when the upstream has nothing. The ping timer is not moved
        // for every event: when it fires early it is armed again from the last event.
        let mut drained = std::pin::pin!(drain.changed());
        let mut timeout = std::pin::pin!(tokio::time::sleep_until(deadline.into()));
        let mut ping = std::pin::pin!(tokio::time::sleep(PING_INTERVAL));
        // When bytes last left for the client: pings keep a quiet stream alive, and a stream is
        // quiet for the client while the upstream sends a tool call (it leaves whole, at its
        // end), however busy the upstream is.
        let mut last_sent = Instant::now();
        // One vector for every event's output, reused.
        let mut evs = Vec::new();
        while !st.is_finished() {
            o.room().await;
            evs.clear();
            tokio::select! {
                biased;
                ev = stream.next() => {
                    let now = Instant::now();
                    if now >= deadline {
                        evs.extend(st.abort(ApiError::new(ErrorKind::Api, "request timed out (request_timeout_secs)")))
                    } else {
                        match ev {
                            Some(Ok(ev)) => {
                                st.on_event_into(ev, &mut evs);
                                take_ready(&mut stream, &mut st, &mut evs, &mut end.failed).await;
                            }
                            Some(Err(e)) => {
                                evs.extend(st.on_error(&e));
                                end.failed = Some(e);
                            }
                            None => evs.extend(st.on_end()),
                        }
                    }
                }
                _ = &mut drained => {
                    evs.extend(st.abort(ApiError::new(ErrorKind::Overloaded, "server shutting down")))
                }
                _ = &mut timeout => {
                    evs.extend(st.abort(ApiError::new(ErrorKind::Api, "request timed out (request_timeout_secs)")))
                }
                _ = &mut ping => {
                    let now = Instant::now();
                    if now >= last_sent + PING_INTERVAL {
                        ping.as_mut().reset((now + PING_INTERVAL).into());
                        evs.push(StreamEvent::Ping);
                    } else {
                        ping.as_mut().reset((last_sent + PING_INTERVAL).into());
                        continue;
                    }
                }
            }
            if !evs.is_empty() {
                last_sent = Instant::now();
            }
            let fatal = evs.iter().any(|e| matches!(e, StreamEvent::Error(_)));
            // What the answer has used so far, kept current: a stream cut short (aborted, or the
            // client gone, which drops this future) is still charged for the output it made
            // and the credits the service named; `message_delta` brings the counted figure.
            end.x.tokens_out = st.output_estimate();
            end.x.credits = st.credits();
            emit(&evs, &mut end.x);
            if fatal {
                break;
            }
        }
        // Dropping the upstream stream closes it (the emulator and Amazon Q see a cancel).
        drop(stream);
        end.x.credits = st.credits();
        end.finish(match errored {
            Some(e) => Err(e),
            None => Ok(()),
        });
    }.instrument(span)))
}
