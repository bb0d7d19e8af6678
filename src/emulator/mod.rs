//! Amazon Q + SSO OIDC emulator: a strict stand-in for `GenerateAssistantResponse` and
//! `CreateToken` on loopback, for demo mode, integration tests and benchmarks.
//!
//! One hyper server (HTTP/1.1 and cleartext HTTP/2) answers both services:
//!
//! - `POST /token` — OIDC `CreateToken` with `grantType: "refresh_token"`. Registered clients
//!   ([`Emulator::add_account`]) hold one working refresh token; with
//!   [`EmulatorOptions::rotate_refresh_tokens`] every refresh returns a new one and the old one stops
//!   working at once. Access tokens are opaque (`aoa…`, not JWTs) and expire after
//!   [`EmulatorOptions::access_token_ttl`]. Errors: 401 `invalid_client`
//!   (`InvalidClientException`), 400 `invalid_grant` (`InvalidGrantException`), 400
//!   `invalid_request`, 400 `unsupported_grant_type`.
//! - `POST /` — `GenerateAssistantResponse`. In order: `X-Amz-Target` (400
//!   `UnknownOperationException`), `Content-Type: application/x-amz-json-1.0` (400
//!   `SerializationException`), `Authorization: Bearer` (403 `AccessDeniedException` "The bearer
//!   token included in the request is invalid."), JSON (400 `SerializationException`), every rule
//!   of [`validate_request`] (400 `ValidationException` "Improperly formed request." with `"reason":
//!   null`, or `CONTENT_LENGTH_EXCEEDS_THRESHOLD` "Input is too long."; a `warn!` names the rule and
//!   the JSON path), then the [`Behaviour`]: an error before the stream, a dropped connection, or a
//!   200 `application/vnd.amazon.eventstream` reply written frame by frame as it is produced.
//!
//! Every answer carries `x-amzn-RequestId`; errors carry `x-amzn-ErrorType`
//! (`<Name>Exception:http://internal.amazon.com/coral/com.amazon.aws.codewhisperer/` on `/`).
//!
//! # A streamed reply
//!
//! An `initial-response` event (`{"conversationId"}`, the request's or a new one), then
//! `assistantResponseEvent`s (`{"content", "modelId"}`, `modelId` echoing the request's, in
//! fragments of 1–12 characters whose lengths vary deterministically with the text), tool calls as
//! `toolUseEvent`s (`{toolUseId, name}`, then `{toolUseId, name, input}` fragments of the JSON
//! arguments, then `{toolUseId, name, stop: true}`), then `meteringEvent`, `contextUsageEvent`
//! (request characters ÷ 4 as a share of 200,000 tokens) and `messageMetadataEvent`
//! (`{conversationId, utteranceId}`). The default text is `Hello from the Amazon Q emulator. You
//! said: <first 200 characters of the prompt, directive lines removed>`, or, when the current
//! message carries tool results, one `I received the tool result: <first 200 characters>` line a
//! result.
//!
//! # Choosing a behaviour
//!
//! A request gets, in order of precedence: a behaviour directive in its prompt; the next of the
//! behaviours queued by [`Emulator::set_behaviour_for_next`] (consumed by every request of the
//! account that passes authentication and validation, directive or not); the account's
//! [`Emulator::set_behaviour`] (default [`Behaviour::Normal`]).
//!
//! # Directives
//!
//! A line `#emulator: <directive>` in the current message's content
//! (`conversationState.currentMessage.userInputMessage.content`; leading blanks allowed, names
//! case-insensitive). Later lines win; unknown or malformed directives are ignored (logged at
//! debug). Behaviours:
//!
//! | directive | behaviour |
//! |---|---|
//! | `normal` | [`Behaviour::Normal`] |
//! | `suspended` | 403 `AccessDeniedException`, reason `TEMPORARILY_SUSPENDED` |
//! | `throttled [<secs>]` | 429 `ThrottlingException`; `retry-after: <secs>` when given |
//! | `quota-monthly` / `quota-daily` | 429 `ThrottlingException`, reason `MONTHLY_REQUEST_COUNT` / `DAILY_REQUEST_COUNT` |
//! | `capacity` | 429 `ThrottlingException`, reason `INSUFFICIENT_MODEL_CAPACITY` |
//! | `error-500` / `error-503` | 500 `InternalServerException` / 503 `ServiceUnavailableException` |
//! | `slow-first-byte <ms>` | sleep before the response headers |
//! | `slow-fragments <ms>` | sleep before every event frame after the first |
//! | `silent <ms>` | headers and `initial-response`, silence, then the rest |
//! | `reset-before` | TCP reset, no answer |
//! | `reset-after` | headers and a few frames, then a TCP reset |
//! | `corrupt-frame` | a few good frames, one with a bad message CRC, end of body |
//! | `exception <type> [<message…>]` | a few frames, then an exception frame `{"message"}` (plus `"reason"` when the message looks like `UPPER_CASE`), end of body |
//! | `tool-cut` | a tool call whose input stops half-way, no `stop`, end of body |
//! | `long <chars>` | a reply of exactly that many characters |
//! | `reasoning` | `reasoningContentEvent`s (`text` fragments, then `signature`) before the answer |
//!
//! Reply shaping (combines with a streaming behaviour and with each other):
//!
//! | directive | reply |
//! |---|---|
//! | `text <literal…>` | exactly this text (the rest of the line, trimmed) |
//! | `tool <name> [<json-object-args>]` | a call of that tool (it must be defined in the request's tools; else the reply says why) with those arguments (`{}` when omitted); no text unless `text` is given too |
//! | `tools2` | calls of the first two defined tools, arguments generated from their schemas |
//! | `thinking-tags` | `<thinking>…</thinking>` before the answer, as a model asked for visible reasoning writes |
//!
//! # Counters
//!
//! [`Stats::requests`] counts every `POST /`; [`AccountStats::requests`] the authenticated ones.
//! [`Stats::refreshes`] counts successful refreshes, [`Stats::refresh_failures`] refused ones.
//! A stream is open from its first frame to its last; it ends completed (its script ran out,
//! scripted resets and corruptions included) or cancelled (the client went away first).

mod assistant;
mod oidc;
pub mod reply;
pub mod script;
mod server;
mod state;
mod stream;
pub mod validate;

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use script::Behaviour;
pub use validate::{Rule, RuleViolation, validate_request};

use state::Shared;

/// Knobs of an emulator instance.
#[derive(Clone, Debug)]
pub struct EmulatorOptions {
    /// Lifetime of issued access tokens (`expiresIn`). Default 3600 s.
    pub access_token_ttl: Duration,
    /// Pause before every event frame after the first, for every stream. Default 0.
    pub fragment_delay: Duration,
    /// Whether each refresh returns a new refresh token (and kills the old one). Default true.
    pub rotate_refresh_tokens: bool,
    /// With rotation: the old refresh token keeps working until the new access token or the new
    /// refresh token is first used (OAuth rotation with a reuse grace), instead of dying at
    /// once. A client that stores the successor durably before using anything it got with it
    /// then never loses its chain, even when killed between the answer and its own write.
    /// Default false (the strictest reading of the service).
    pub rotation_grace: bool,
    /// Pause between deciding a token refresh (the refresh token has rotated) and sending the
    /// answer: the window in which a client that stops or crashes loses the only live refresh
    /// token unless it waits for and stores the answer. Default 0.
    pub token_delay: Duration,
}

impl Default for EmulatorOptions {
    fn default() -> Self {
        EmulatorOptions {
            access_token_ttl: Duration::from_secs(3600),
            fragment_delay: Duration::ZERO,
            rotate_refresh_tokens: true,
            rotation_grace: false,
            token_delay: Duration::ZERO,
        }
    }
}

/// Counters over the whole emulator (a snapshot).
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub refreshes: u64,
    pub refresh_failures: u64,
    pub requests: u64,
    pub rejected_malformed: u64,
    /// Streams currently being written.
    pub open_streams: u64,
    pub completed_streams: u64,
    /// Streams the client went away from before their end.
    pub cancelled_streams: u64,
}

/// Counters of one account (a snapshot).
#[derive(Clone, Debug, Default)]
pub struct AccountStats {
    pub refreshes: u64,
    pub requests: u64,
    pub open_streams: u64,
    /// The last `GenerateAssistantResponse` body the account sent (valid or not, once it parsed as
    /// JSON).
    pub last_request: Option<serde_json::Value>,
}

/// A running emulator. Clones share it; it stops on [`Emulator::shutdown`] or when the last clone
/// is dropped.
#[derive(Clone)]
pub struct Emulator {
    shared: Arc<Shared>,
    control: Arc<Control>,
}

/// Owns the server task; dropping the last one stops the server.
struct Control {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Control {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

impl std::fmt::Debug for Emulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emulator").field("addr", &self.control.addr).finish_non_exhaustive()
    }
}

impl Emulator {
    /// Starts an emulator on `127.0.0.1`, on a free port.
    pub async fn start(opts: EmulatorOptions) -> std::io::Result<Emulator> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        Emulator::start_on(listener, opts).await
    }

    /// Starts an emulator serving `listener`.
    pub async fn start_on(listener: TcpListener, opts: EmulatorOptions) -> std::io::Result<Emulator> {
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(opts));
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(server::serve(listener, shared.clone(), stopped));
        tracing::debug!(%addr, "emulator: listening");
        Ok(Emulator { shared, control: Arc::new(Control { addr, stop, task: Mutex::new(Some(task)) }) })
    }

    /// The address the emulator listens on.
    pub fn addr(&self) -> SocketAddr {
        self.control.addr
    }

    /// The Amazon Q endpoint: `http://127.0.0.1:PORT/`.
    pub fn endpoint(&self) -> String {
        format!("http://{}/", self.control.addr)
    }

    /// The OIDC token endpoint: `http://127.0.0.1:PORT/token`.
    pub fn token_endpoint(&self) -> String {
        format!("http://{}/token", self.control.addr)
    }

    /// Registers an account: an OIDC client (`client_id`, `client_secret`) holding
    /// `refresh_token`. Registering a known client again replaces its secret and refresh token
    /// (and revives a revoked chain), keeping its behaviour and counters.
    pub fn add_account(&self, client_id: &str, client_secret: &str, refresh_token: &str) {
        self.shared.add_account(client_id, client_secret, refresh_token);
    }

    /// The behaviour of the account's requests from now on (after any queued ones).
    pub fn set_behaviour(&self, client_id: &str, b: Behaviour) {
        self.shared.with_account(client_id, |account| account.behaviour = b);
    }

    /// The next `n` requests of this account get `b`, then the account's behaviour again. Calls
    /// add to the queue: `set_behaviour_for_next(id, A, 1)` then `(id, B, 2)` gives A, B, B.
    pub fn set_behaviour_for_next(&self, client_id: &str, b: Behaviour, n: usize) {
        self.shared.with_account(client_id, |account| account.queued.extend(std::iter::repeat_n(b, n)));
    }

    /// Expires every access token issued so far for this account: the next Q call with one gets
    /// 403 bearer invalid.
    pub fn expire_access_tokens(&self, client_id: &str) {
        self.shared.expire_access_tokens(client_id);
    }

    /// Kills the account's refresh-token chain: the next refresh gets `invalid_grant`.
    pub fn revoke_refresh_token(&self, client_id: &str) {
        self.shared.with_account(client_id, |account| {
            account.refresh_token = None;
            account.previous_refresh_token = None;
        });
    }

    /// The refresh token the account's next refresh must present (the head of its chain), or
    /// `None` when the chain was revoked or the account is unknown.
    pub fn live_refresh_token(&self, client_id: &str) -> Option<String> {
        self.shared.with_account(client_id, |account| account.refresh_token.clone()).flatten()
    }

    /// A snapshot of the global counters.
    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// A snapshot of one account's counters (all zero for an unknown account).
    pub fn stats_for(&self, client_id: &str) -> AccountStats {
        self.shared.stats_for(client_id)
    }

    /// Stops accepting, closes every connection, and waits for the server task to end.
    pub async fn shutdown(self) {
        let _ = self.control.stop.send(true);
        let task = self.control.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

/// Serves an emulator on `listener` with default options and `accounts` — `(client_id,
/// client_secret, refresh_token)` each — until `shutdown` completes.
pub async fn run_standalone(
    listener: TcpListener,
    accounts: &[(String, String, String)],
    shutdown: impl Future<Output = ()>,
) {
    let emulator = match Emulator::start_on(listener, EmulatorOptions::default()).await {
        Ok(emulator) => emulator,
        Err(e) => {
            tracing::error!(error = %e, "emulator: cannot start");
            return;
        }
    };
    for (client_id, client_secret, refresh_token) in accounts {
        emulator.add_account(client_id, client_secret, refresh_token);
    }
    tracing::info!(
        endpoint = %emulator.endpoint(),
        token_endpoint = %emulator.token_endpoint(),
        accounts = accounts.len(),
        "emulator: serving"
    );
    shutdown.await;
    emulator.shutdown().await;
}
