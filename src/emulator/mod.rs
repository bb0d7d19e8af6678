//! Amazon Q + Kiro + SSO OIDC emulator: a strict stand-in for the 2026 upstream on loopback —
//! `GenerateAssistantResponse` on the Amazon Q and Kiro runtime endpoints, the model catalog and
//! profiles, OIDC `CreateToken` and the Kiro social refresh — for demo mode, integration tests and
//! benchmarks. Facts it models: PROTOCOL.md §2, §3 and §5.
//!
//! One hyper server (HTTP/1.1 and cleartext HTTP/2) answers every role, told apart by path:
//!
//! | path | role / service | [`Emulator`] accessor |
//! |---|---|---|
//! | `POST /token` | SSO OIDC `CreateToken` (OIDC accounts) | [`Emulator::token_endpoint`] |
//! | `POST /client/register`, `POST /device_authorization` | SSO OIDC `RegisterClient`, `StartDeviceAuthorization` (the device flow, [`DeviceFlow`]) | [`Emulator::oidc_endpoint`] |
//! | `POST /refreshToken` | Kiro social refresh (social accounts) | [`Emulator::social_token_endpoint`] |
//! | `POST /` | Amazon Q role (`q.{region}.amazonaws.com`): `GenerateAssistantResponse`, `ListAvailableProfiles` | [`Emulator::endpoint`] |
//! | `GET /ListAvailableModels?…` | Amazon Q role: the catalog | [`Emulator::catalog_url`] |
//! | `POST /runtime/` (or `/runtime`) | Kiro runtime role (`runtime.{region}.kiro.dev`): `GenerateAssistantResponse` | [`Emulator::runtime_endpoint`] |
//! | `POST /management/` (or `/management`) | Kiro management role (`management.{region}.kiro.dev`): `ListAvailableModels` | [`Emulator::management_endpoint`] |
//! | anything else | 404 `UnknownOperationException` | |
//!
//! A role switched off with [`Emulator::set_role_enabled`] answers 404 `UnknownOperationException`
//! on all its paths (the token endpoints are not roles and always answer).
//!
//! # Accounts and credentials
//!
//! Every account has an id: what [`Emulator::set_behaviour`], [`Emulator::stats_for`] and the other
//! per-account calls take.
//!
//! | kind ([`AccountKind`]) | registered with | id | bearer it sends |
//! |---|---|---|---|
//! | `Oidc` (Builder ID / IdC) | [`Emulator::add_account`]`(client_id, secret, refresh)` | the client id | an access token from `POST /token` |
//! | `Social` (Kiro Google/GitHub) | [`Emulator::add_social_account`]`(refresh, arn)` → id `social-<16 hex of SHA-256(refresh)>`, or [`Emulator::add_social_account_as`]`(id, refresh, arn)` | returned / given | an access token from `POST /refreshToken` |
//! | `ApiKey` (Kiro `ksk_…`) | [`Emulator::add_api_key`]`(key)` | the key itself | the key, with header `tokentype: API_KEY`; never refreshed |
//!
//! Re-registering an id replaces its credentials (and revives a revoked chain or key), keeping its
//! behaviours, counters, catalog and overrides, and its profile ARN (a social registration sets the
//! one it is given, or none). Access tokens are opaque (`aoa…`, not JWTs) and expire after
//! [`EmulatorOptions::access_token_ttl`]; [`Emulator::expire_access_tokens`] expires an account's
//! at once. The kind-specific calls: [`Emulator::revoke_api_key`], [`Emulator::set_profile_arn`],
//! [`Emulator::set_catalog`], [`Emulator::set_role_access`], [`Emulator::set_listing_behaviour`].
//!
//! A credential is resolved from `Authorization: Bearer <token>`: an unexpired access token (OIDC or
//! social) sent *without* `tokentype: API_KEY`, or a live registered API key sent *with* it. Anything
//! else — missing, unknown, expired, revoked, an API key without the header, an access token with it
//! — is 403 `AccessDeniedException` "The bearer token included in the request is invalid.".
//!
//! ## Which role takes which credential
//!
//! | role | `Oidc` | `Social` | `ApiKey` |
//! |---|---|---|---|
//! | Amazon Q | yes | yes | no: 403 bearer invalid (the role does not know Kiro API keys), unless [`EmulatorOptions::q_accepts_api_keys`] |
//! | runtime | no: 403 `AccessDeniedException` "User is not authorized to make this call", unless [`EmulatorOptions::runtime_accepts_oidc`] | yes | yes |
//! | management | yes | yes | yes |
//!
//! [`Emulator::set_role_access`] overrides the table per account and role (`Some(false)` refuses
//! with "User is not authorized to make this call"; an API key refused by the Amazon Q role still
//! gets bearer invalid). Refusals count in [`AccountStats::refused`] and [`Stats::refused`].
//!
//! ## Token endpoints
//!
//! Both rotate and expire alike: with [`EmulatorOptions::rotate_refresh_tokens`] (default) every
//! refresh returns a new refresh token and the old one dies at once — or, with
//! [`EmulatorOptions::rotation_grace`], when the new access or refresh token is first used;
//! [`EmulatorOptions::token_delay`] pauses between deciding and answering.
//! [`Emulator::live_refresh_token`] is the head of the chain (OIDC and social), and
//! [`Emulator::revoke_refresh_token`] kills it.
//!
//! - `POST /token` (OIDC): `{"clientId", "clientSecret", "grantType": "refresh_token",
//!   "refreshToken"}` → 200 `{"accessToken", "tokenType": "Bearer", "expiresIn", "refreshToken"?}`
//!   (`refreshToken` only when rotating). Errors `{"error", "error_description"}` with
//!   `x-amzn-ErrorType`: 401 `invalid_client` (`InvalidClientException`: unknown client, wrong
//!   secret, or a client id that is not an OIDC account), 400 `invalid_grant`
//!   (`InvalidGrantException`), 400 `invalid_request`, 400 `unsupported_grant_type`.
//!   With `"grantType": "urn:ietf:params:oauth:grant-type:device_code"` and `"deviceCode"`: the
//!   device flow's poll (a registered client's id and secret): 400 `authorization_pending`,
//!   `slow_down` (scripted, or a poll before the interval is over: the interval grows by 5 s),
//!   `expired_token`, `access_denied`, `invalid_grant` (unknown or used code) as
//!   [`DeviceFlow`] scripts it; once approved, 200 `{"accessToken", "tokenType", "expiresIn",
//!   "refreshToken"}` and the client is an OIDC account like one [`Emulator::add_account`] made.
//! - `POST /client/register` (`RegisterClient`): `{"clientName", "clientType": "public",
//!   "scopes"?, "grantTypes"?, "issuerUrl"?}` → `{"clientId", "clientSecret", "clientIdIssuedAt",
//!   "clientSecretExpiresAt"}`; `POST /device_authorization` (`StartDeviceAuthorization`):
//!   `{"clientId", "clientSecret", "startUrl"}` (https) → `{"deviceCode", "userCode",
//!   "verificationUri", "verificationUriComplete", "expiresIn", "interval"}`.
//! - `POST /refreshToken` (social): `User-Agent` must start with `KiroIDE-` (else 400
//!   `{"error": "invalid_request"}`), body `{"refreshToken"}` (else 400 `invalid_request`) → 200
//!   `{"accessToken", "expiresIn", "refreshToken"?, "profileArn"?}`: `refreshToken` only when
//!   rotating (keep the old one when absent), `profileArn` only when the account has one (else the
//!   client uses [`SOCIAL_PROFILE_ARN`]). A dead token (unknown, rotated away, revoked) is 400
//!   `{"error": "invalid_grant", "error_description"}` or, with
//!   [`EmulatorOptions::social_dead_token`] = [`SocialDeadToken::Unauthorized`], 401
//!   `{"error": "unauthorized", "error_description"}`. No `x-amzn-ErrorType` here.
//!
//! # Profile ARNs
//!
//! An account may have its own profile ARN ([`Emulator::set_profile_arn`], or the social
//! registration's). The ARN a call must send is the account's own, else
//! [`BUILDER_ID_PROFILE_ARN`] for `Oidc`, [`SOCIAL_PROFILE_ARN`] for `Social`, none for `ApiKey`.
//! For chat calls (both roles) and catalog calls (`profileArn` in the query or body):
//!
//! | the call sends | answer |
//! |---|---|
//! | the ARN it must send | accepted |
//! | another ARN (any other, for an `ApiKey` any at all) | 403 `AccessDeniedException` "User is not authorized to make this call" |
//! | none, the account has its own ARN | 400 `ValidationException` "profileArn is required for this request." (`"reason": null`) |
//! | none, no own ARN, [`EmulatorOptions::require_profile_arn`] (the 2026 behaviour; default **false** because today's daemon sends none for Builder ID accounts) | the same 400 (not for `ApiKey`) |
//! | none, otherwise | accepted |
//!
//! `ListAvailableProfiles` (`POST /`, `X-Amz-Target: AmazonCodeWhispererService.ListAvailableProfiles`,
//! `Content-Type: application/x-amz-json-1.0`, bearer, body `{"maxResults": 1..100}` or `{}`) →
//! `{"profiles": [{"arn", "profileName": "emulator-<ID>", "region"}]}`: the account's own ARN, or
//! `[]` (Builder ID, and social accounts without one). Amazon Q role rules for credentials.
//!
//! # Model catalog
//!
//! Every account has a catalog: [`catalog::default_catalog`] (its table lists ids, windows, output
//! limits, rates and schemas) unless [`Emulator::set_catalog`] gave it another (e.g.
//! [`catalog::non_claude_catalog`]). Its first entry is the `defaultModel`.
//!
//! - `GET /ListAvailableModels?origin=AI_EDITOR[&profileArn=…][&maxResults=N][&nextToken=T]` (Amazon
//!   Q role, bearer; answer `application/json`), and
//! - `POST /management/` with `X-Amz-Target: KiroControlPlaneBearerService.ListAvailableModels`,
//!   `Content-Type: application/x-amz-json-1.0`, body `{"origin", "profileArn"?, "maxResults"?,
//!   "nextToken"?}` (management role; answer `application/x-amz-json-1.0`)
//!
//! → `{"models": [{"modelId", "modelName", "description", "tokenLimits": {"maxInputTokens",
//! "maxOutputTokens"}, "rateMultiplier", "promptCaching": {"supportsPromptCaching",
//! "maximumCacheCheckpointsPerRequest", "minimumTokensPerCacheCheckpoint"},
//! "additionalModelRequestFieldsSchema"? (JSON schema, `additionalProperties: false`; absent when
//! the model takes none), "supportedInputTypes"}], "defaultModel": {"modelId"}, "nextToken"?}`.
//! `origin` must be `AI_EDITOR` or `CLI` and `maxResults` 1..100 (else 400 `ValidationException`);
//! the page is `maxResults` and [`EmulatorOptions::catalog_page_size`] (the smaller), everything by
//! default; `nextToken` is opaque (`emu-page-N`), a bad one is 400. Profile-ARN rules as above.
//!
//! Listing calls count in [`AccountStats::catalog_requests`] / [`AccountStats::profile_requests`];
//! they get neither directives nor the chat behaviours, only the error ones set with
//! [`Emulator::set_listing_behaviour`].
//!
//! # `GenerateAssistantResponse` (`POST /` and `POST /runtime/`)
//!
//! In order, the first failure answering:
//!
//! 1. `X-Amz-Target: AmazonCodeWhispererStreamingService.GenerateAssistantResponse` (400
//!    `UnknownOperationException`), `Content-Type: application/x-amz-json-1.0` (400
//!    `SerializationException`);
//! 2. the credential and the role (above: 403);
//! 3. the body: readable JSON (400 `SerializationException`), every rule of [`validate_request`]
//!    (400 `ValidationException`: "Improperly formed request." with `"reason": null`;
//!    `CONTENT_LENGTH_EXCEEDS_THRESHOLD` "Input is too long."; `REQUEST_BODY_INVALID` for a
//!    malformed `reasoningContent`; "Invalid additionalModelRequestFields" for a non-object; a
//!    `warn!` names the rule and the JSON path);
//! 4. the account- and model-dependent checks, each 400 `ValidationException` unless said:
//!
//! | check | refusal |
//! |---|---|
//! | profile ARN (table above) | 403 "User is not authorized to make this call" / 400 "profileArn is required for this request." |
//! | `currentMessage.userInputMessage.modelId` (absent: the `defaultModel`) is in the account's catalog | `INVALID_MODEL_ID` "Invalid model. Please select a different model to continue." |
//! | images anywhere in the conversation need `IMAGE` in `supportedInputTypes` | "This model does not support image input." (`"reason": null`) |
//! | `cachePoint`s (on messages, or `tools[]` items `{"cachePoint": {"type": "default"}}`) need `supportsPromptCaching` and at most `maximumCacheCheckpointsPerRequest` | "Prompt caching is not supported for this model." / "The request has more cache points than this model allows." |
//! | a non-empty top-level `additionalModelRequestFields` needs a model schema | "additionalModelRequestFields is not supported for this model" (`"reason": null`) |
//! | …and must match it ([`schema`]'s subset, `additionalProperties: false`) | "Invalid additionalModelRequestFields" (`"reason": null`) |
//! | every history `assistantResponseMessage.reasoningContent` verifies: `reasoningText.signature` signs `reasoningText.text`, `redactedContent` is this emulator's, unchanged | `THINKING_SIGNATURE_INVALID` "Invalid signature in thinking block." |
//!
//! 5. the [`Behaviour`] (see below): an error before the stream, a dropped connection, or a 200
//!    `application/vnd.amazon.eventstream` reply written frame by frame as it is produced.
//!
//! Every answer carries `x-amzn-RequestId`; errors are `{"__type":
//! "com.amazon.aws.codewhisperer#<Name>", "message", "reason"?}` with `x-amzn-ErrorType:
//! <Name>:http://internal.amazon.com/coral/com.amazon.aws.codewhisperer/` on every role.
//!
//! # A streamed reply
//!
//! 1. `initial-response` (`{"conversationId"}`, the request's or a new one);
//! 2. `messageMetadataEvent` (`{conversationId, utteranceId}`);
//! 3. reasoning, when asked for: `reasoningContentEvent`s `{"text"}` (fragments), then
//!    `{"signature"}` — in fragments for native thinking (`additionalModelRequestFields.thinking.type`
//!    `enabled` / `adaptive`), in one frame for the `reasoning` behaviour. A model with opaque
//!    reasoning (the GPT ids) reasons `"..."`. With the `redacted-thinking` directive: one
//!    `{"redactedContent": "<base64>"}` instead. Signatures and redacted content are made with a
//!    per-emulator secret (HMAC-SHA256) and verify on replay ([`Emulator::sign_reasoning`] makes
//!    valid ones for tests);
//! 4. `assistantResponseEvent`s (`{"content", "modelId"}`, `modelId` echoing the request's, in
//!    fragments of 1–12 characters whose lengths vary deterministically with the text), tool calls
//!    as `toolUseEvent`s (`{toolUseId, name}`, then `{toolUseId, name, input}` fragments of the JSON
//!    arguments, then `{toolUseId, name, stop: true}`). With `additionalModelRequestFields.max_tokens`
//!    the answer text is cut at 4 × max_tokens characters (tool calls then dropped);
//! 5. as live streams end: `metadataEvent {"stopReason": "END_TURN" | "TOOL_USE" | "MAX_TOKENS"}` —
//!    plus, with [`EmulatorOptions::token_usage`], `"tokenUsage": {uncachedInputTokens, outputTokens,
//!    totalTokens, cacheReadInputTokens: 0, cacheWriteInputTokens: 0}` — then `contextUsageEvent
//!    {"contextUsagePercentage"}` (request characters ÷ 4 as a share of the model's
//!    `maxInputTokens`, 4 decimals), then `meteringEvent {"unit": "credit", "unitPlural": "credits",
//!    "usage"}` ((request + output characters) ÷ 4 ÷ 100,000 × `rateMultiplier`, at least 0.01,
//!    4 decimals; summed in [`AccountStats::credits`] as the frame is sent).
//!
//! The default text is `Hello from the Amazon Q emulator. You said: <first 200 characters of the
//! prompt, directive lines removed>`, or, when the current message carries tool results, one `I
//! received the tool result: <first 200 characters>` line a result.
//!
//! # Choosing a behaviour
//!
//! A request gets, in order of precedence: a behaviour directive in its prompt; the next of the
//! behaviours queued by [`Emulator::set_behaviour_for_next`] (consumed by every chat request of the
//! account that passes authentication and every check above, directive or not); the account's
//! [`Emulator::set_behaviour`] (default [`Behaviour::Normal`]).
//!
//! # Directives
//!
//! A line `#emulator: <directive>` in the current message's content
//! (`conversationState.currentMessage.userInputMessage.content`; leading blanks allowed, names
//! case-insensitive). Later lines win; unknown or malformed directives are ignored (logged at
//! debug). A behaviour directive followed by `once` (`#emulator: suspended once`, `#emulator:
//! throttled 5 once`) applies to the first attempt only: a request whose `amz-sdk-request` header
//! says `attempt=1` (or that has none); the same prompt tried again — failed over to another
//! account, `attempt=2` — gets the account's behaviour. Behaviours (errors are answered before the
//! stream):
//!
//! | directive | [`Behaviour`] | answer |
//! |---|---|---|
//! | `normal` | `Normal` | a normal reply |
//! | `suspended` | `Suspended` | 403 `AccessDeniedException`, reason `TEMPORARILY_SUSPENDED` |
//! | `bearer-refused` | `BearerRefused` | 403 `AccessDeniedException` "The bearer token included in the request is invalid.", whatever the token |
//! | `locked` | `Locked` | 403 `AccessDeniedException` "Your User ID temporarily is suspended. We've locked your account as a security precaution…", no reason |
//! | `throttled [<secs>]` | `Throttled` | 429 `ThrottlingException`, no reason; `retry-after: <secs>` when given |
//! | `suspicious` | `Suspicious` | 429 `ThrottlingException` "Due to suspicious activity, we are imposing temporary limits on your account…", `"reason": null` |
//! | `quota-monthly` / `quota-daily` | `MonthlyQuota` / `DailyQuota` | 429 `ThrottlingException`, reason `MONTHLY_REQUEST_COUNT` / `DAILY_REQUEST_COUNT` |
//! | `overage` | `Overage` | 402 `ServiceQuotaExceededException`, reason `OVERAGE_REQUEST_LIMIT_EXCEEDED` |
//! | `capacity` | `CapacityExhausted` | 429 `ThrottlingException`, reason `INSUFFICIENT_MODEL_CAPACITY` "I am experiencing high traffic…" |
//! | `high-traffic` | `HighTraffic` | 429 `ThrottlingException`, reason `INSUFFICIENT_MODEL_CAPACITY` "The model you've selected is experiencing a high volume of traffic…" |
//! | `invalid-model` | `InvalidModel` | 400 `ValidationException`, reason `INVALID_MODEL_ID` |
//! | `profile-required` | `ProfileRequired` | 400 `ValidationException` "profileArn is required for this request.", `"reason": null` |
//! | `tool-mismatch` | `ToolUseResultMismatch` | 400 `ValidationException`, reason `TOOL_USE_RESULT_MISMATCH` |
//! | `tool-schema-invalid` | `ToolSchemaInvalid` | 400 `ValidationException`, reason `TOOL_SCHEMA_INVALID` |
//! | `signature-invalid` | `SignatureInvalid` | 400 `ValidationException`, reason `THINKING_SIGNATURE_INVALID` |
//! | `error-500` / `error-503` | `InternalError` / `Unavailable` | 500 `InternalServerException` / 503 `ServiceUnavailableException` |
//! | `slow-first-byte <ms>` | `SlowFirstByte` | sleep before the response headers |
//! | `slow-fragments <ms>` | `SlowFragments` | sleep before every event frame after the first |
//! | `silent <ms>` | `SilentAfterFirstByte` | headers and `initial-response`, silence, then the rest |
//! | `empty-frames <ms>` | `EmptyFrames` | headers, then 20 `assistantResponseEvent {"content": ""}` frames that far apart (never idle, no content), then the rest |
//! | `reset-before` | `ResetBeforeFirstByte` | TCP reset, no answer |
//! | `reset-after` | `ResetAfterFirstByte` | headers and a few frames, then a TCP reset |
//! | `empty-answer` | `EmptyAnswer` | headers and the opening frames, then the end of the body: no content, no closing events |
//! | `corrupt-frame` | `CorruptFrame` | a few good frames, one with a bad message CRC, end of body |
//! | `exception <type> [<message…>]` | `InStreamException` | a few frames, then an exception frame `{"message"}` (plus `"reason"` when the message looks like `UPPER_CASE`), end of body |
//! | `tool-cut` | `ToolCallCutBeforeStop` | a tool call whose input stops half-way, no `stop`, end of body |
//! | `long <chars>` | `LongReply` | a reply of exactly that many characters |
//! | `reasoning` | `Reasoning` | reasoning (`text` fragments, then one `signature` frame) before the answer |
//!
//! Reply shaping (combines with a streaming behaviour and with each other):
//!
//! | directive | reply |
//! |---|---|
//! | `text <literal…>` | exactly this text (the rest of the line, trimmed) |
//! | `tool <name> [<json-object-args>]` | a call of that tool (it must be defined in the request's tools; else the reply says why) with those arguments (`{}` when omitted); no text unless `text` is given too |
//! | `tools2` | calls of the first two defined tools, arguments generated from their schemas |
//! | `thinking-tags` | `<thinking>…</thinking>` before the answer, as a model asked for visible reasoning writes |
//! | `redacted-thinking` | one `reasoningContentEvent {"redactedContent"}` before the answer, instead of readable reasoning |
//! | `empty-text-first` | an `assistantResponseEvent {"content": ""}` before anything else |
//!
//! # Counters
//!
//! [`Stats::requests`] counts every `GenerateAssistantResponse` call (`POST /` that is not
//! `ListAvailableProfiles`, and `POST /runtime/`); [`AccountStats::requests`] the authenticated ones
//! a role took ([`AccountStats::runtime_requests`] those of the runtime role).
//! [`Stats::refreshes`] counts successful refreshes (both token endpoints),
//! [`Stats::refresh_failures`] refused ones. A stream is open from its first frame to its last; it
//! ends completed (its script ran out, scripted resets and corruptions included) or cancelled (the
//! client went away first). [`AccountStats`] also keeps the user agents an account sent (chat,
//! refresh, listing calls); [`Emulator::shared_user_agents`] lists any sent by two accounts.

mod assistant;
pub mod catalog;
mod device;
mod listing;
mod oidc;
mod reasoning;
pub mod reply;
pub mod schema;
pub mod script;
mod semantics;
mod server;
mod social;
mod state;
mod stream;
pub mod validate;
mod wire;

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use catalog::{ModelEntry, PromptCaching, default_catalog};
pub use device::{DeviceDecision, DeviceFlow, DeviceStats};
pub use script::Behaviour;
pub use server::installation_of;
pub use validate::{Rule, RuleViolation, validate_request};

use sha2::{Digest, Sha256};
use state::Shared;

/// The profile ARN Builder ID (`Oidc`) accounts without their own send.
pub const BUILDER_ID_PROFILE_ARN: &str = "arn:aws:codewhisperer:us-east-1:638616132270:profile/AAAACCCCXXXX";
/// The profile ARN social accounts without their own send.
pub const SOCIAL_PROFILE_ARN: &str = "arn:aws:codewhisperer:us-east-1:699475941385:profile/EHGA3GRVQMUK";

/// The kind of credential an account holds (PROTOCOL.md §5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AccountKind {
    /// Builder ID or IAM Identity Center: an OIDC client and its refresh token.
    Oidc,
    /// Kiro sign-in with Google or GitHub: a refresh token only.
    Social,
    /// A Kiro API key (`ksk_…`): the bearer itself, never refreshed.
    ApiKey,
}

/// An endpoint role of the emulator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// `q.{region}.amazonaws.com`: `POST /`, `GET /ListAvailableModels`.
    AmazonQ,
    /// `runtime.{region}.kiro.dev`: `POST /runtime/`.
    Runtime,
    /// `management.{region}.kiro.dev`: `POST /management/`.
    Management,
}

/// How `POST /refreshToken` answers a dead refresh token (sources disagree).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SocialDeadToken {
    /// 400 `{"error": "invalid_grant", "error_description"}`.
    #[default]
    InvalidGrant,
    /// 401 `{"error": "unauthorized", "error_description"}`.
    Unauthorized,
}

/// Knobs of an emulator instance.
#[derive(Clone, Debug)]
pub struct EmulatorOptions {
    /// Lifetime of issued access tokens (`expiresIn`). Default 3600 s.
    pub access_token_ttl: Duration,
    /// Pause before every event frame after the first, for every stream. Default 0.
    pub fragment_delay: Duration,
    /// CPU spent on every event frame before it is sent (a busy wait), after which the writer
    /// yields so that each frame leaves in a write of its own: an upstream as slow as a Python
    /// stand-in, whose events trickle in separate TCP segments (the load generator's slowed
    /// emulator). Default 0: frames are sent as fast as they are made.
    pub frame_work: Duration,
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
    /// token unless it waits for and stores the answer (both token endpoints). Default 0.
    pub token_delay: Duration,
    /// Whether the runtime role takes OIDC access tokens. Default false (403 "User is not
    /// authorized to make this call", as reported for some OIDC tokens).
    pub runtime_accepts_oidc: bool,
    /// Whether the Amazon Q role takes Kiro API keys. Default false (403 bearer invalid).
    pub q_accepts_api_keys: bool,
    /// Whether a call without `profileArn` is refused (400 "profileArn is required for this
    /// request.") for accounts without their own ARN too (API keys excepted). The 2026 service
    /// does this; default false, because today's daemon sends none for Builder ID accounts.
    /// Accounts with their own ARN must always send it.
    pub require_profile_arn: bool,
    /// Whether `metadataEvent` carries `tokenUsage`. Default false (mostly absent live).
    pub token_usage: bool,
    /// How the social refresh answers a dead refresh token. Default 400 `invalid_grant`.
    pub social_dead_token: SocialDeadToken,
    /// Most models on one `ListAvailableModels` page (then `nextToken`). Default `None`: one page.
    pub catalog_page_size: Option<usize>,
    /// What the person does with a device authorization (`amqctl login`), and its timing.
    /// Default: approved after one pending poll, interval 1 s, expiry 600 s.
    pub device_flow: DeviceFlow,
}

impl Default for EmulatorOptions {
    fn default() -> Self {
        EmulatorOptions {
            access_token_ttl: Duration::from_secs(3600),
            fragment_delay: Duration::ZERO,
            frame_work: Duration::ZERO,
            rotate_refresh_tokens: true,
            rotation_grace: false,
            token_delay: Duration::ZERO,
            runtime_accepts_oidc: false,
            q_accepts_api_keys: false,
            require_profile_arn: false,
            token_usage: false,
            social_dead_token: SocialDeadToken::InvalidGrant,
            catalog_page_size: None,
            device_flow: DeviceFlow::default(),
        }
    }
}

/// Counters over the whole emulator (a snapshot).
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub refreshes: u64,
    pub refresh_failures: u64,
    /// OIDC refresh calls that began while another for the same account was still being
    /// answered (two clients refreshing one account at once).
    pub overlapping_refreshes: u64,
    pub requests: u64,
    pub rejected_malformed: u64,
    /// Streams currently being written.
    pub open_streams: u64,
    pub completed_streams: u64,
    /// Streams the client went away from before their end.
    pub cancelled_streams: u64,
    /// Authenticated calls a role refused to take (the credential's kind, or an override).
    pub refused: u64,
    /// Authenticated `ListAvailableModels` calls.
    pub catalog_requests: u64,
    /// Authenticated `ListAvailableProfiles` calls.
    pub profile_requests: u64,
    /// Connections that carried calls of more than one installation (the machine ids in their
    /// user agents differ): accounts a connection ties together.
    pub shared_connections: u64,
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
    /// Of `requests`, those the runtime role took.
    pub runtime_requests: u64,
    /// Calls a role refused to take from this account.
    pub refused: u64,
    /// Authenticated `ListAvailableModels` calls.
    pub catalog_requests: u64,
    /// Authenticated `ListAvailableProfiles` calls.
    pub profile_requests: u64,
    /// Credits of the `meteringEvent`s sent to the account (counted as each frame is handed to
    /// the connection).
    pub credits: f64,
    /// The `User-Agent` of the account's last call of any kind (authenticated chat or listing
    /// call, successful refresh).
    pub last_user_agent: Option<String>,
    /// … of its last chat call.
    pub chat_user_agent: Option<String>,
    /// … of its last successful refresh.
    pub refresh_user_agent: Option<String>,
    /// … of its last listing call (`ListAvailableModels`, `ListAvailableProfiles`).
    pub catalog_user_agent: Option<String>,
    /// Every distinct user agent the account sent, first seen first (at most 64).
    pub user_agents: Vec<String>,
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

    /// The Kiro social refresh endpoint: `http://127.0.0.1:PORT/refreshToken`.
    pub fn social_token_endpoint(&self) -> String {
        format!("http://{}/refreshToken", self.control.addr)
    }

    /// The Kiro runtime endpoint: `http://127.0.0.1:PORT/runtime/`.
    pub fn runtime_endpoint(&self) -> String {
        format!("http://{}/runtime/", self.control.addr)
    }

    /// The Kiro management endpoint: `http://127.0.0.1:PORT/management/`.
    pub fn management_endpoint(&self) -> String {
        format!("http://{}/management/", self.control.addr)
    }

    /// The Amazon Q role's catalog: `http://127.0.0.1:PORT/ListAvailableModels` (add
    /// `?origin=AI_EDITOR`).
    pub fn catalog_url(&self) -> String {
        format!("http://{}/ListAvailableModels", self.control.addr)
    }

    /// Registers an OIDC account: a client (`client_id`, `client_secret`) holding
    /// `refresh_token`; its id is `client_id`. Registering a known id again replaces its secret
    /// and refresh token (and revives a revoked chain), keeping its behaviour, counters, catalog
    /// and profile ARN.
    pub fn add_account(&self, client_id: &str, client_secret: &str, refresh_token: &str) {
        self.shared.add_account(client_id, client_secret, refresh_token);
    }

    /// Registers a social (Kiro Google/GitHub) account holding `refresh_token`, with its own
    /// `profile_arn` (returned by its refreshes) or none; returns its id,
    /// `social-<first 16 hex digits of SHA-256(refresh_token)>` — the same refresh token gives
    /// the same id, so registering it again replaces the account's credentials as
    /// [`add_account`](Self::add_account) does.
    pub fn add_social_account(&self, refresh_token: &str, profile_arn: Option<&str>) -> String {
        let digest = Sha256::digest(refresh_token.as_bytes());
        let id = format!("social-{}", &hex::encode(digest)[..16]);
        self.shared.add_social_account(&id, refresh_token, profile_arn);
        id
    }

    /// Registers a social account under an id of the caller's choosing.
    pub fn add_social_account_as(&self, id: &str, refresh_token: &str, profile_arn: Option<&str>) {
        self.shared.add_social_account(id, refresh_token, profile_arn);
    }

    /// Registers a Kiro API key (`ksk_…`) as an account; its id is the key itself (returned).
    pub fn add_api_key(&self, key: &str) -> String {
        self.shared.add_api_key(key);
        key.to_owned()
    }

    /// Revokes an API key: from now on it is 403 bearer invalid ([`add_api_key`](Self::add_api_key)
    /// again revives it).
    pub fn revoke_api_key(&self, key: &str) {
        self.shared.with_account(key, |account| account.api_key_revoked = true);
    }

    /// The account's own profile ARN (`None`: it has none, and sends its kind's placeholder).
    pub fn set_profile_arn(&self, account: &str, arn: Option<&str>) {
        self.shared.with_account(account, |a| a.profile_arn = arn.map(str::to_owned));
    }

    /// The account's catalog from now on (the first entry is its `defaultModel`).
    pub fn set_catalog(&self, account: &str, models: Vec<ModelEntry>) {
        self.shared.with_account(account, |a| a.catalog = Some(models));
    }

    /// The account's catalog (the default one unless [`set_catalog`](Self::set_catalog) changed it).
    pub fn catalog_for(&self, account: &str) -> Vec<ModelEntry> {
        self.shared.catalog_for(account)
    }

    /// Overrides whether `role` takes this account's credential: `Some(true)` / `Some(false)`, or
    /// `None` for the options' rule again.
    pub fn set_role_access(&self, account: &str, role: Role, accepted: Option<bool>) {
        self.shared.with_account(account, |a| match accepted {
            Some(accepted) => a.role_access.insert(role, accepted),
            None => a.role_access.remove(&role),
        });
    }

    /// Switches a whole role on or off: off, its paths answer 404 (an endpoint that is gone).
    pub fn set_role_enabled(&self, role: Role, enabled: bool) {
        self.shared.set_role_enabled(role, enabled);
    }

    /// What the account's listing calls (`ListAvailableModels`, `ListAvailableProfiles`) answer
    /// from now on: an error behaviour's error, or the listing for any other behaviour.
    pub fn set_listing_behaviour(&self, account: &str, b: Behaviour) {
        self.shared.with_account(account, |a| a.listing_behaviour = b);
    }

    /// A signature of `text` this emulator accepts in a replayed `reasoningContent.reasoningText`.
    pub fn sign_reasoning(&self, text: &str) -> String {
        self.shared.signer().sign(text, &self.shared.ids().bytes("signature"))
    }

    /// Whether `signature` is this emulator's signature of exactly `text`.
    pub fn verify_reasoning(&self, text: &str, signature: &str) -> bool {
        self.shared.signer().verify(text, signature)
    }

    /// Redacted reasoning content this emulator accepts in a replayed
    /// `reasoningContent.redactedContent`.
    pub fn redacted_reasoning(&self) -> String {
        let mut random = [0u8; 64];
        random[..32].copy_from_slice(&self.shared.ids().bytes("redacted"));
        random[32..].copy_from_slice(&self.shared.ids().bytes("redacted"));
        self.shared.signer().redacted(&random)
    }

    /// Every user agent that more than one account sent, with those accounts' ids (sorted).
    /// Empty when every account looked like its own installation.
    pub fn shared_user_agents(&self) -> Vec<(String, Vec<String>)> {
        self.shared.shared_user_agents()
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

    /// The SSO OIDC base URL (`/client/register`, `/device_authorization`, `/token` under it):
    /// what `amqctl login --oidc-endpoint` takes.
    pub fn oidc_endpoint(&self) -> String {
        format!("http://{}", self.control.addr)
    }

    /// How device authorizations started from now on go.
    pub fn set_device_flow(&self, flow: DeviceFlow) {
        self.shared.device().flow = flow;
    }

    /// A snapshot of the device-flow counters.
    pub fn device_stats(&self) -> DeviceStats {
        self.shared.device().stats.clone()
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

/// What a standalone emulator serves: its options and accounts.
#[derive(Clone, Debug, Default)]
pub struct Standalone {
    pub options: EmulatorOptions,
    /// OIDC accounts: `(client_id, client_secret, refresh_token)`.
    pub accounts: Vec<(String, String, String)>,
    /// Social accounts: their refresh tokens (ids as [`Emulator::add_social_account`] makes them).
    pub social: Vec<String>,
    /// Kiro API keys.
    pub api_keys: Vec<String>,
}

/// Serves an emulator on `listener` with default options and `accounts` — `(client_id,
/// client_secret, refresh_token)` each — until `shutdown` completes.
pub async fn run_standalone(
    listener: TcpListener,
    accounts: &[(String, String, String)],
    shutdown: impl Future<Output = ()>,
) {
    let setup = Standalone { accounts: accounts.to_vec(), ..Standalone::default() };
    run_standalone_with(listener, &setup, shutdown).await;
}

/// Serves an emulator on `listener` as `setup` says until `shutdown` completes.
pub async fn run_standalone_with(
    listener: TcpListener,
    setup: &Standalone,
    shutdown: impl Future<Output = ()>,
) {
    let emulator = match Emulator::start_on(listener, setup.options.clone()).await {
        Ok(emulator) => emulator,
        Err(e) => {
            tracing::error!(error = %e, "emulator: cannot start");
            return;
        }
    };
    for (client_id, client_secret, refresh_token) in &setup.accounts {
        emulator.add_account(client_id, client_secret, refresh_token);
    }
    for refresh_token in &setup.social {
        let id = emulator.add_social_account(refresh_token, None);
        tracing::info!(account = %id, "emulator: social account registered");
    }
    for key in &setup.api_keys {
        emulator.add_api_key(key);
    }
    tracing::info!(
        endpoint = %emulator.endpoint(),
        runtime_endpoint = %emulator.runtime_endpoint(),
        management_endpoint = %emulator.management_endpoint(),
        token_endpoint = %emulator.token_endpoint(),
        social_token_endpoint = %emulator.social_token_endpoint(),
        accounts = setup.accounts.len(),
        social_accounts = setup.social.len(),
        api_keys = setup.api_keys.len(),
        "emulator: serving"
    );
    shutdown.await;
    emulator.shutdown().await;
}
