//! amq2api: the Anthropic Claude Messages API served from a pool of Amazon Q Developer accounts.
//!
//! Module map (see README for the operator's view):
//!
//! - [`config`]: `amq2api.toml` and `accounts.toml` — parse, validate with places, diff; [`config::Secret`].
//! - [`cli`]: the `amq2api` command line and its offline subcommands (`check-config`).
//! - [`logging`]: tracing set-up (terminal or journald), `RUST_LOG` filtering.
//! - [`exit`]: the exit codes both binaries use.
//! - [`ids`]: random identifiers (request, message and invocation ids).
//! - [`anthropic`]: Messages API request parsing (field-path errors), error JSON, SSE.
//! - [`translate`]: Claude → Amazon Q requests, Amazon Q events → Claude events, model map, tokens.
//! - [`upstream`]: the Amazon Q side: event-stream codec, request and event types, HTTP client.
//! - [`store`]: the redb state store (`amq2api.redb`): token chains, account states, counters.
#![forbid(unsafe_code)]

pub mod anthropic;
pub mod cli;
pub mod config;
pub mod exit;
pub mod ids;
pub mod logging;
pub mod store;
pub mod translate;
pub mod upstream;
