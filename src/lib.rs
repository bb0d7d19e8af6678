//! amq2api: the Anthropic Claude Messages API served from a pool of Amazon Q Developer accounts.
//!
//! Module map (see README for the operator's view):
//!
//! - [`config`]: `amq2api.toml`, `accounts.toml` and `keys.toml` — read safely, parse, validate
//!   with places, typed diffs for reloads; [`config::Secret`].
//! - [`cli`]: the `amq2api` command line: `run` (the default: the daemon), `demo`,
//!   `check-config`, `eventstream decode`, `emulator`, and the hidden `man` (packaging's man page).
//! - [`logging`]: tracing set-up (journald-native under systemd, human-readable on a terminal),
//!   `RUST_LOG` filtering; the daemon's stderr lines leave through a buffer written by a thread
//!   of its own.
//! - [`control`]: the admin API over the Unix socket (peer-credential checked) and its versioned
//!   wire types, structs of their own ([`control::wire`], which `amqctl` uses too).
//! - [`daemon`]: [`run`] — the daemon's life from validated config and bound listeners to drain;
//!   when it returns, no task it started holds the state store.
//! - [`demo`]: `amq2api demo` — emulator and daemon in one process, no credentials needed.
//! - [`exit`]: the exit codes both binaries use.
//! - [`hash`]: SHA-256 and short fingerprints (of secrets, keys, names).
//! - [`ids`]: random bytes and identifiers (request, message and invocation ids, UUIDs).
//! - [`keys`]: named client keys (`keys.toml`): identity, limits, usage per key, account, model, day.
//! - [`accounts`]: the account pool (selection, leases, cooldowns, a changed accounts file applied
//!   live), each account's token lifecycle, the model union of their catalogs, what is kept
//!   in the store (`accounts::persist`: a token-writer thread committing rotated tokens
//!   together, a writer thread batching states and counters), and the file watcher reload uses
//!   (it follows symlinks re-pointed anywhere along the file's path). Token chains move with
//!   their credentials: a renamed account takes its old id's chain (`adopt_renamed`, unsaved
//!   ones too, `take_over`), and ids swapped in the file wait for a restart, where `Pool::new`
//!   moves each stored chain to the entry with its credentials.
//! - [`anthropic`]: Messages API request parsing (field-path errors, the `anthropic-beta`
//!   features that change it), error JSON, SSE.
//! - [`memory`]: gives the heap's free pages back to the kernel once the daemon is quiet
//!   (`malloc_trim`, the library's one `unsafe` call).
//! - [`metrics`]: the `/metrics` registry: requests, tokens, latencies, attempts, failovers, streams, pool.
//! - [`relay`]: the trip to Amazon Q: lease, token, send, classify, fail over ([`relay::retry`];
//!   a non-streaming answer that fails midway too, `Relay::failed_unsent`), Claude error, and the
//!   stream's end recorded on its account (`relay::Ending`); `amqctl check` goes through it too.
//! - [`reload`]: the one owner of configuration changes (SIGHUP, `amqctl reload`, the file watchers):
//!   every file checked before anything applies, and changes that waited for the store tried
//!   again every 10 s.
//! - [`shutdown`]: the stop signal every background task listens to, and the task sets shutdown
//!   waits for and then cancels.
//! - [`selfwake`]: wakes a task sends itself while it runs (hyper's hand-overs between a
//!   connection and its bodies, client side and upstream) taken as another turn of the running
//!   poll, not a yield that wakes another worker.
//! - [`server`]: the HTTPS front end: listeners, TLS, routing, auth, limits, streaming, drain; it
//!   only speaks HTTP and SSE. A request whose client leaves is still logged and charged (499,
//!   `server::http`); a connection whose client reads nothing for `idle_timeout_secs` is closed
//!   (`server::idle`; an HTTP/2 connection is idle by its requests, not its PINGs), and over
//!   HTTP/2 such a stream alone is cut (`server::body::Watched`).
//! - [`store`]: the state store behind one `Backend` trait: redb (embedded, the default) or
//!   PostgreSQL (`[cluster]`): token chains, account states, counters, catalogs, usage per day;
//!   versioned values.
//! - [`cluster`]: node heartbeats and account leases with fencing epochs (on PostgreSQL), and the
//!   lease check a token refresh asks first (`accounts::pool::ClusterView`); a token rotated
//!   under a lease lost since is still stored unless a later holder stored one
//!   (`store::postgres`), and the new holder takes it (`Pool::take_newer_stored_chain`), with
//!   the account's identity (machine id, profile: `Pool::adopt`, stored by the holder only). A
//!   stopping node gives its accounts up as they go idle (`cluster::run`).
//! - [`systemd`]: sd_notify (READY, STATUS, RELOADING, STOPPING, EXTEND_TIMEOUT_USEC while
//!   stopping), watchdog, socket activation.
//! - [`translate`]: Claude → Amazon Q requests, Amazon Q events → Claude events, model map, tokens.
//! - [`upstream`]: the Amazon Q side: event-stream codec, request and event types, error
//!   classification, the model catalog (identical catalogs shared between accounts), and the
//!   HTTP client; [`upstream::conn`] is the daemon's own HTTP/1.1 client side and the one
//!   connection pool for every upstream call (chat, token refresh, catalog, OIDC), partitioned by
//!   account (its machine id: no connection or TLS session carries two accounts), and sends a
//!   request at most once (an answer sent before the request was read whole is still read).
//! - [`emulator`]: a strict Amazon Q + SSO OIDC stand-in on loopback (demo mode, tests, benchmarks).
//!
//! `amqctl`, the operator's CLI over the control socket (its command line, tables, import of seed
//! exports, device-flow login and socket client), is not part of the library: it is its own
//! binary in `ctl/`, a client of [`control::wire`], [`exit`] and [`logging`], that also uses
//! [`config`] (to check what it imports, key names, UTC days), [`ids`] and [`hash`] (new keys, digests
//! of keys and client ids), and [`upstream::conn`] (`amqctl login`'s calls to SSO OIDC).
// `deny`, not `forbid`: `memory::trim` alone may call `malloc_trim` (the issue asking for the
// memory back names trimming); nothing else may use `unsafe`.
#![deny(unsafe_code)]

pub mod accounts;
pub mod anthropic;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod control;
pub mod daemon;
pub mod demo;
pub mod emulator;
pub mod exit;
pub mod hash;
pub mod ids;
pub mod keys;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod relay;
pub mod reload;
pub mod selfwake;
pub mod server;
pub mod shutdown;
pub mod store;
pub mod systemd;
pub mod translate;
pub mod upstream;

pub use daemon::{Listeners, run};
