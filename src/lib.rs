//! amq2api: the Anthropic Claude Messages API served from a pool of Amazon Q Developer accounts.
//!
//! Module map (see README for the operator's view):
//!
//! - [`config`]: `amq2api.toml` and `accounts.toml` — parse, validate with places, diff; [`config::Secret`].
//! - [`cli`]: the `amq2api` command line and its offline subcommands (`check-config`).
//! - [`logging`]: tracing set-up (terminal or journald), `RUST_LOG` filtering.
//! - [`exit`]: the exit codes both binaries use.
//! - [`upstream`]: the Amazon Q side: event-stream codec, request and event types, HTTP client.
//! - [`emulator`]: a strict Amazon Q + SSO OIDC stand-in on loopback (demo mode, tests, benchmarks).
#![forbid(unsafe_code)]

pub mod cli;
pub mod config;
pub mod emulator;
pub mod exit;
pub mod logging;
pub mod upstream;
