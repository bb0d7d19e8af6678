//! The PostgreSQL store (`[cluster]`): the same records as the redb store, shared by every node,
//! plus the cluster's tables (nodes, account leases, commands), through `tokio-postgres`.
//!
//! # Schema (in the `amq2api` schema, created and migrated by the daemon)
//!
//! | table                                          | what                                          |
//! |------------------------------------------------|-----------------------------------------------|
//! | `migrations (version, applied_at)`             | the versions applied ([`MIGRATIONS`])         |
//! | `tokens / state / counters / identity / catalog (account, value)` | the redb store's values, byte for byte (version byte ++ JSON) |
//! | `nodes (node_id, started_at, heartbeat_at, lease_ms, status)` | each node's heartbeat (a node silent for 7 days is pruned) |
//! | `leases (account, node_id, epoch, expires_at)` | who serves an account, until when; `epoch` grows at every change of holder |
//! | `commands (id, account, command, …)`           | `amqctl` account commands for the holder (done ones pruned after a day; pending ones indexed, migration 3) |
//! | `usage (day, dim, name, requests, errors, tokens_in, tokens_out, credits)` | usage per key / account / model per UTC day, the fleet's (migration 2) |
//!
//! Migrations run at start-up in one transaction under an advisory lock, so nodes starting
//! together never race; a database migrated by a newer amq2api is refused.
//!
//! # Fencing
//!
//! A token row keeps the epoch of the lease it was written under, and a write under an older
//! epoch is refused ([`StoreError::Fenced`]): once a later holder has stored a token, nothing a
//! node that lost the lease (paused, partitioned, slow) still holds can overwrite it. Until a
//! later holder has stored one, a node may still store the token it rotated under its lost
//! lease: the token it rotated from is dead, so that write is the chain's only way on (the new
//! holder, refused with the dead token, reads the store again and takes it; see
//! [`crate::accounts::pool`]). A refresh itself starts only while the database confirms the
//! lease ([`PgStore::lease_left`]), so such a write is the rare end of a pause or a partition
//! that began mid-refresh. Token writes commit with `synchronous_commit = on` whatever the
//! server's default. An account's state and counters are written only under the lease this node
//! holds, at its epoch (checked in the same statement), so a node that lost the lease never puts
//! its stale view over the new holder's; identities and catalogs are the account's facts, and
//! any node writes them.
//!
//! # Connections
//!
//! Two connections (one for data, one for leases and heartbeats, so that a slow write never
//! delays a lease renewal), each opened on first use and again after a failure; every
//! statement has a deadline. TLS through rustls (the ring provider) with libpq's `sslmode`
//! meanings (see [`TlsMode`]): `prefer` (the default) and `require` encrypt without checking the
//! certificate; `verify-ca` checks the chain against `sslrootcert=PATH` (PEM) or, without it, the
//! built-in Mozilla roots; `verify-full` also matches the host name.

use super::redb::{
    CatalogWire, CountersWire, IdentityWire, StateWire, TokenWire, decode_catalog, decode_counters,
    decode_identity, decode_tokens, encode, lenient, state_or_disabled,
};
use super::{
    AccountRecord, Backend, CatalogRecord, Counters, IdentityRecord, StateRecord, StoreError, StoreProblem,
    TokenRecord, UsageRow, split_usage_key, usage_key,
};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio_postgres::{Client, NoTls};

/// Schema migrations, oldest first: step `i` brings the schema to version `i + 1`.
pub const MIGRATIONS: &[&str] = &[
    // 1: the store's values, the cluster's nodes, leases and commands.
    "CREATE TABLE amq2api.tokens (account text PRIMARY KEY, value bytea NOT NULL,
         epoch bigint NOT NULL DEFAULT 0, updated_at timestamptz NOT NULL DEFAULT now());
     CREATE TABLE amq2api.state (account text PRIMARY KEY, value bytea NOT NULL);
     CREATE TABLE amq2api.counters (account text PRIMARY KEY, value bytea NOT NULL);
     CREATE TABLE amq2api.identity (account text PRIMARY KEY, value bytea NOT NULL);
     CREATE TABLE amq2api.catalog (account text PRIMARY KEY, value bytea NOT NULL);
     CREATE TABLE amq2api.nodes (node_id text PRIMARY KEY, started_at timestamptz NOT NULL,
         heartbeat_at timestamptz NOT NULL, lease_ms bigint NOT NULL, status text NOT NULL DEFAULT '');
     CREATE TABLE amq2api.leases (account text PRIMARY KEY, node_id text,
         epoch bigint NOT NULL, expires_at timestamptz NOT NULL);
     CREATE INDEX leases_node ON amq2api.leases (node_id);
     CREATE TABLE amq2api.commands (id bigserial PRIMARY KEY, account text NOT NULL,
         command text NOT NULL, created_at timestamptz NOT NULL DEFAULT now(),
         done_by text, done_at timestamptz, result text);",
    // 2: usage per key, account and model per UTC day, the fleet's (every node adds to it).
    "CREATE TABLE amq2api.usage (day text NOT NULL, dim text NOT NULL, name text NOT NULL,
         requests bigint NOT NULL, errors bigint NOT NULL, tokens_in bigint NOT NULL,
         tokens_out bigint NOT NULL, credits double precision NOT NULL,
         PRIMARY KEY (day, dim, name));",
    // 3: the pending commands found without reading the done ones (pruned after a day); a
    // node that is stopping, no longer counted in the others' shares.
    "CREATE INDEX commands_pending ON amq2api.commands (account) WHERE done_at IS NULL;
     ALTER TABLE amq2api.nodes ADD COLUMN leaving boolean NOT NULL DEFAULT false;",
];

/// How long a done command is kept (for a look at what ran), and a node not heard from.
const DONE_COMMANDS_KEPT: &str = "1 day";
const SILENT_NODES_KEPT: &str = "7 days";

/// Longest one statement (or transaction) may take before the connection is dropped.
const STATEMENT_DEADLINE: Duration = Duration::from_secs(5);
/// The advisory lock key that serialises migrations (any constant; "amq2" in ASCII).
const MIGRATION_LOCK: i64 = 0x616d_7132;

/// The tables that hold an account's values.
const VALUE_TABLES: [&str; 5] = ["tokens", "state", "counters", "identity", "catalog"];

/// A lease this node holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Held {
    pub epoch: i64,
}

/// One row of `leases`, for status output.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LeaseRow {
    pub account: String,
    pub node_id: Option<String>,
    pub epoch: i64,
    /// Milliseconds until it expires (negative: expired).
    pub expires_in_ms: i64,
}

/// One row of `nodes`, for status output.
#[derive(Clone, Debug, serde::Serialize)]
pub struct NodeRow {
    pub node_id: String,
    /// Milliseconds since its last heartbeat.
    pub heartbeat_age_ms: i64,
    /// Heard from within its lease, and not stopping.
    pub alive: bool,
    /// Stopping: it gives its accounts up as they go idle, and takes none.
    pub leaving: bool,
    pub status: String,
    pub leases: i64,
}

/// The PostgreSQL store. Cheap to clone.
#[derive(Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
}

struct Inner {
    rt: tokio::runtime::Handle,
    config: tokio_postgres::Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    /// `[0]` data, `[1]` leases and heartbeats.
    conns: [tokio::sync::Mutex<Option<Client>>; 2],
    node_id: String,
    lease: Duration,
    /// The leases this node holds, by account: the epoch every token write is fenced with.
    held: Mutex<HashMap<String, Held>>,
    /// The epoch of each lease this node lost (it ran out, or another node took it) rather than
    /// gave up: a token rotated under it is written with it (see the module documentation).
    lost: Mutex<HashMap<String, i64>>,
    problem: Mutex<Option<StoreProblem>>,
    /// This process is stopping ([`PgStore::leaving`]): every heartbeat says so (and only this
    /// process's heartbeats set the flag, so a row left marked by an earlier process of the
    /// same name is cleared by the next one's first heartbeat).
    leaving: std::sync::atomic::AtomicBool,
}

/// Which connection an operation uses.
#[derive(Clone, Copy)]
enum Conn {
    Data = 0,
    Leases = 1,
}

/// A tokio-postgres error with its causes ("error performing TLS handshake: invalid peer
/// certificate: UnknownIssuer"), no secret among them.
fn pg(e: tokio_postgres::Error) -> StoreError {
    StoreError::Postgres(chain(&e))
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").field("node_id", &self.inner.node_id).finish_non_exhaustive()
    }
}

/// How the connection to PostgreSQL is secured: libpq's `sslmode` (and `sslrootcert`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TlsMode {
    /// `sslmode=disable`: plaintext.
    Disable,
    /// `sslmode=prefer` (also when the URL names no sslmode, as libpq): TLS when the server
    /// offers it, plaintext otherwise; the certificate is not checked.
    Prefer,
    /// `sslmode=require`: TLS or no connection; the certificate is not checked (encryption
    /// only, as libpq). With `sslrootcert=` it is checked as for `verify-ca`, as libpq does.
    Require,
    /// `sslmode=verify-ca`: TLS, the server's chain checked against the roots; not its name.
    VerifyCa,
    /// `sslmode=verify-full`: TLS, the chain checked and the host name matched.
    VerifyFull,
}

/// A `database_url` split into what tokio-postgres takes and what amq2api handles itself.
#[derive(Clone, Debug)]
pub struct DbUrl {
    pub config: tokio_postgres::Config,
    pub tls: TlsMode,
    /// `sslrootcert=PATH`: the trust anchors for `verify-ca` / `verify-full` (PEM); `None` or
    /// `sslrootcert=system`: the built-in Mozilla root set (webpki-roots).
    pub root_cert: Option<std::path::PathBuf>,
}

/// Parses a `postgresql://…` URL: libpq's `sslmode` (all but `allow`) and `sslrootcert` are
/// taken out and handled here (tokio-postgres knows neither `verify-ca`/`verify-full` nor
/// root files); the rest is tokio-postgres's.
pub fn parse_url(url: &str) -> Result<DbUrl, StoreError> {
    let bad = |m: String| StoreError::DatabaseUrl(m);
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, q),
        None => (url, ""),
    };
    let mut tls = TlsMode::Prefer;
    let mut root_cert = None;
    let mut rest = Vec::new();
    for kv in query.split('&').filter(|kv| !kv.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        match crate::server::http::percent_decode(k).as_str() {
            "sslmode" => {
                tls = match crate::server::http::percent_decode(v).as_str() {
                    "disable" => TlsMode::Disable,
                    "prefer" => TlsMode::Prefer,
                    "require" => TlsMode::Require,
                    "verify-ca" => TlsMode::VerifyCa,
                    "verify-full" => TlsMode::VerifyFull,
                    other => {
                        return Err(bad(format!(
                            "sslmode={other} is not supported (disable, prefer, require, verify-ca, verify-full)"
                        )));
                    }
                }
            }
            "sslrootcert" => {
                let path = crate::server::http::percent_decode(v);
                root_cert = (path != "system" && !path.is_empty()).then(|| std::path::PathBuf::from(path));
            }
            _ => rest.push(kv),
        }
    }
    if tls == TlsMode::Require && root_cert.is_some() {
        tls = TlsMode::VerifyCa;
    }
    let sslmode = match tls {
        TlsMode::Disable => "disable",
        TlsMode::Prefer => "prefer",
        TlsMode::Require | TlsMode::VerifyCa | TlsMode::VerifyFull => "require",
    };
    rest.push(match sslmode {
        "disable" => "sslmode=disable",
        "prefer" => "sslmode=prefer",
        _ => "sslmode=require",
    });
    let rebuilt = format!("{base}?{}", rest.join("&"));
    let config = rebuilt.parse().map_err(|e: tokio_postgres::Error| bad(e.to_string()))?;
    Ok(DbUrl { config, tls, root_cert })
}

/// Accepts any server certificate, but still checks the handshake's signatures (the key
/// exchange is bound to the certificate's key): `prefer` and `require`, as libpq.
#[derive(Debug)]
struct EncryptOnly(Arc<rustls::crypto::CryptoProvider>);

/// Checks the chain against the roots but not the host name: `verify-ca`.
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

mod verify {
    use super::{ChainOnly, EncryptOnly};
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{CertificateError, DigitallySignedStruct, Error, SignatureScheme};

    impl ServerCertVerifier for EncryptOnly {
        fn verify_server_cert(
            &self,
            _end_entity: &CertificateDer<'_>,
            _intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp_response: &[u8],
            _now: UnixTime,
        ) -> Result<ServerCertVerified, Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }

    impl ServerCertVerifier for ChainOnly {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            intermediates: &[CertificateDer<'_>],
            server_name: &ServerName<'_>,
            ocsp_response: &[u8],
            now: UnixTime,
        ) -> Result<ServerCertVerified, Error> {
            // The chain is checked first; a name mismatch is reported only for a valid chain.
            match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
                Err(Error::InvalidCertificate(
                    CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
                )) => Ok(ServerCertVerified::assertion()),
                other => other,
            }
        }
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            self.0.verify_tls12_signature(message, cert, dss)
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            self.0.verify_tls13_signature(message, cert, dss)
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.supported_verify_schemes()
        }
    }
}

/// The TLS connector for `url`'s mode; `None` for `sslmode=disable`.
fn tls_connector(url: &DbUrl) -> Result<Option<tokio_postgres_rustls::MakeRustlsConnect>, StoreError> {
    let tls_err = |e: String| StoreError::DatabaseUrl(format!("TLS: {e}"));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err(e.to_string()))?;
    let roots = || -> Result<Arc<rustls::RootCertStore>, StoreError> {
        let mut roots = rustls::RootCertStore::empty();
        match &url.root_cert {
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
            Some(path) => crate::config::read::add_pem_roots(&mut roots, path)
                .map_err(|e| StoreError::DatabaseUrl(format!("sslrootcert {}: {e}", path.display())))?,
        }
        Ok(Arc::new(roots))
    };
    let config = match url.tls {
        TlsMode::Disable => return Ok(None),
        TlsMode::Prefer | TlsMode::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider)))
            .with_no_client_auth(),
        TlsMode::VerifyCa => {
            let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(roots()?, provider)
                .build()
                .map_err(|e| tls_err(e.to_string()))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(ChainOnly(inner)))
                .with_no_client_auth()
        }
        TlsMode::VerifyFull => builder.with_root_certificates(roots()?).with_no_client_auth(),
    };
    Ok(Some(tokio_postgres_rustls::MakeRustlsConnect::new(config)))
}

impl PgStore {
    /// Connects to `url`, creates or migrates the schema, and returns the store for `node_id`.
    /// Must be called on the runtime (its connections' tasks run there).
    pub async fn connect(url: &str, node_id: &str, lease: Duration) -> Result<PgStore, StoreError> {
        let url = parse_url(url)?;
        let tls = tls_connector(&url)?;
        let mut config = url.config;
        config.connect_timeout(STATEMENT_DEADLINE).application_name("amq2api");
        let store = PgStore {
            inner: Arc::new(Inner {
                rt: tokio::runtime::Handle::current(),
                config,
                tls,
                conns: [tokio::sync::Mutex::new(None), tokio::sync::Mutex::new(None)],
                node_id: node_id.to_owned(),
                lease,
                held: Mutex::new(HashMap::new()),
                lost: Mutex::new(HashMap::new()),
                problem: Mutex::new(None),
                leaving: std::sync::atomic::AtomicBool::new(false),
            }),
        };
        store.migrate().await?;
        Ok(store)
    }

    pub fn node_id(&self) -> &str {
        &self.inner.node_id
    }

    pub fn lease(&self) -> Duration {
        self.inner.lease
    }

    /// The epoch this node holds `account`'s lease with, if it does.
    pub fn held(&self, account: &str) -> Option<Held> {
        self.inner.held.lock().unwrap_or_else(|p| p.into_inner()).get(account).copied()
    }

    /// Whether PostgreSQL says this node holds `account`'s lease, with the epoch it believes it
    /// holds, for at least `guard` more. Asked before a token refresh: the local timer alone
    /// can be wrong after a pause the monotonic clock did not count (a frozen VM resumed), and a
    /// refresh on a lease another node took rotates the token that node loaded.
    pub async fn lease_left(&self, account: &str, guard: Duration) -> Result<bool, StoreError> {
        let Some(Held { epoch }) = self.held(account) else {
            return Ok(false);
        };
        let (id, node, secs) = (account.to_owned(), self.inner.node_id.clone(), guard.as_secs_f64());
        self.run(Conn::Data, move |c| {
            Box::pin(async move {
                let row = c
                    .query_opt(
                        "SELECT 1 FROM amq2api.leases WHERE account = $1 AND node_id = $2 AND epoch = $3
                         AND expires_at > now() + make_interval(secs => $4)",
                        &[&id, &node, &epoch, &secs],
                    )
                    .await
                    .map_err(pg)?;
                Ok(row.is_some())
            })
        })
        .await
    }

    /// Every lease this node believes it holds.
    pub fn held_all(&self) -> HashMap<String, Held> {
        self.inner.held.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_held(&self, account: &str, held: Option<Held>) {
        let mut map = self.inner.held.lock().unwrap_or_else(|p| p.into_inner());
        match held {
            Some(h) => {
                map.insert(account.to_owned(), h);
                self.inner.lost.lock().unwrap_or_else(|p| p.into_inner()).remove(account);
            }
            None => {
                map.remove(account);
            }
        }
    }

    /// Marks leases as lost (not given up): see [`Inner::lost`].
    fn lost(&self, lost: impl IntoIterator<Item = (String, Held)>) {
        let mut map = self.inner.lost.lock().unwrap_or_else(|p| p.into_inner());
        for (id, h) in lost {
            map.insert(id, h.epoch);
        }
    }

    /// The epoch a token of `account`'s is written under: the lease's, held or lost.
    fn write_epoch(&self, account: &str) -> Option<i64> {
        self.held(account)
            .map(|h| h.epoch)
            .or_else(|| self.inner.lost.lock().unwrap_or_else(|p| p.into_inner()).get(account).copied())
    }

    async fn open(&self) -> Result<Client, StoreError> {
        let config = &self.inner.config;
        let client = match &self.inner.tls {
            Some(tls) => {
                let (client, connection) = config.connect(tls.clone()).await.map_err(pg)?;
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(error = %e, "PostgreSQL connection ended");
                    }
                });
                client
            }
            None => {
                let (client, connection) = config.connect(NoTls).await.map_err(pg)?;
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(error = %e, "PostgreSQL connection ended");
                    }
                });
                client
            }
        };
        Ok(client)
    }

    /// Runs `op` on connection `which` (opened first when needed) within the statement
    /// deadline; a failure or a timeout drops the connection (the next use opens another) and
    /// is recorded as the store's problem until an operation succeeds again.
    async fn run<T>(
        &self,
        which: Conn,
        op: impl for<'c> FnOnce(
            &'c mut Client,
        )
            -> std::pin::Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'c>>,
    ) -> Result<T, StoreError> {
        let mut slot = self.inner.conns[which as usize].lock().await;
        let result = tokio::time::timeout(STATEMENT_DEADLINE, async {
            if slot.as_ref().is_none_or(|c| c.is_closed()) {
                *slot = Some(self.open().await?);
            }
            op(slot.as_mut().expect("opened above")).await
        })
        .await
        .unwrap_or_else(|_| Err(StoreError::Postgres("no answer within 5 s".into())));
        match &result {
            Ok(_) => {
                if let Some(p) = self.inner.problem.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    tracing::info!(failed_attempts = p.failures, "PostgreSQL answers again");
                }
            }
            Err(StoreError::Fenced { .. }) => {}
            Err(e) => {
                if !matches!(e, StoreError::Corrupt { .. }) {
                    *slot = None;
                }
                let mut problem = self.inner.problem.lock().unwrap_or_else(|p| p.into_inner());
                match &mut *problem {
                    Some(p) => {
                        p.failures += 1;
                        p.error = e.to_string();
                    }
                    None => {
                        tracing::error!(error = %e, "PostgreSQL fails");
                        *problem =
                            Some(StoreProblem { error: e.to_string(), since: SystemTime::now(), failures: 1 })
                    }
                }
            }
        }
        result
    }

    /// Runs an async operation from a blocking thread.
    fn block<T>(&self, f: impl Future<Output = T>) -> T {
        self.inner.rt.block_on(f)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        self.run(Conn::Data, |c| {
            Box::pin(async move {
                let txn = c.transaction().await.map_err(pg)?;
                txn.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await.map_err(pg)?;
                // Created only when missing: `CREATE SCHEMA IF NOT EXISTS` asks for the right to
                // create schemas in the database even when the schema exists, which a
                // least-privilege role (its schema made for it by a DBA) does not have.
                let exists: bool = txn
                    .query_one("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'amq2api')", &[])
                    .await
                    .map_err(pg)?
                    .get(0);
                if !exists {
                    txn.batch_execute("CREATE SCHEMA IF NOT EXISTS amq2api").await.map_err(pg)?;
                }
                txn.batch_execute(
                    "CREATE TABLE IF NOT EXISTS amq2api.migrations (version integer PRIMARY KEY,
                         applied_at timestamptz NOT NULL DEFAULT now());",
                )
                .await
                .map_err(pg)?;
                let row = txn
                    .query_one("SELECT coalesce(max(version), 0) FROM amq2api.migrations", &[])
                    .await
                    .map_err(pg)?;
                let current: i32 = row.get(0);
                let newest = MIGRATIONS.len() as i32;
                if current > newest {
                    return Err(StoreError::SchemaTooNew { found: current as u32, supported: newest as u32 });
                }
                for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
                    let version = i as i32 + 1;
                    txn.batch_execute(sql)
                        .await
                        .map_err(|e| StoreError::Postgres(format!("migration {version}: {}", chain(&e))))?;
                    txn.execute("INSERT INTO amq2api.migrations (version) VALUES ($1)", &[&version])
                        .await
                        .map_err(pg)?;
                    tracing::info!(version, "PostgreSQL schema migrated");
                }
                txn.commit().await.map_err(pg)
            })
        })
        .await
    }

    /// Every account's values, by account id.
    pub async fn load_all_async(&self) -> Result<BTreeMap<String, AccountRecord>, StoreError> {
        self.run(Conn::Data, |c| {
            Box::pin(async move {
                let mut out: BTreeMap<String, AccountRecord> = BTreeMap::new();
                for table in VALUE_TABLES {
                    let rows = c
                        .query(&format!("SELECT account, value FROM amq2api.{table}"), &[])
                        .await
                        .map_err(pg)?;
                    for row in rows {
                        let id: String = row.get(0);
                        let value: Vec<u8> = row.get(1);
                        fill(out.entry(id.clone()).or_default(), table, &id, &value)?;
                    }
                }
                Ok(out)
            })
        })
        .await
    }

    /// One account's values, or `None` when nothing is stored for it.
    pub async fn get_async(&self, id: &str) -> Result<Option<AccountRecord>, StoreError> {
        let id = id.to_owned();
        self.run(Conn::Data, move |c| {
            Box::pin(async move {
                let mut rec = AccountRecord::default();
                let mut any = false;
                for table in VALUE_TABLES {
                    let row = c
                        .query_opt(&format!("SELECT value FROM amq2api.{table} WHERE account = $1"), &[&id])
                        .await
                        .map_err(pg)?;
                    if let Some(row) = row {
                        any = true;
                        let value: Vec<u8> = row.get(0);
                        fill(&mut rec, table, &id, &value)?;
                    }
                }
                Ok(any.then_some(rec))
            })
        })
        .await
    }

    /// The fenced token write (see the module documentation).
    /// Writes `id`'s identity now, under this node's lease (a row of an account it does not
    /// hold is not written).
    pub async fn put_identity_async(&self, id: &str, rec: &IdentityRecord) -> Result<(), StoreError> {
        self.put_values("identity", rows::<_, IdentityWire>(&[(id.to_owned(), rec.clone())])?, true).await
    }

    pub async fn put_tokens_async(&self, id: &str, t: &TokenRecord) -> Result<(), StoreError> {
        let Some(epoch) = self.write_epoch(id) else {
            return Err(StoreError::Fenced { account: id.to_owned(), epoch: 0 });
        };
        self.put_tokens_fenced(id, t, epoch).await
    }

    /// Writes `t` for `id` under the lease epoch `epoch`, unless a token was stored under a
    /// later epoch (then [`StoreError::Fenced`]).
    pub async fn put_tokens_fenced(&self, id: &str, t: &TokenRecord, epoch: i64) -> Result<(), StoreError> {
        let value = encode(&TokenWire::from(t))?;
        let id = id.to_owned();
        self.run(Conn::Data, move |c| {
            Box::pin(async move {
                let txn = c.transaction().await.map_err(pg)?;
                // Durable before it is used, whatever the server's or database's default (a
                // rotated refresh token lost in a crash is an account lost).
                txn.batch_execute("SET LOCAL synchronous_commit = on").await.map_err(pg)?;
                let n = txn
                    .execute(
                        "INSERT INTO amq2api.tokens (account, value, epoch, updated_at) VALUES ($1, $2, $3, now())
                         ON CONFLICT (account) DO UPDATE SET value = EXCLUDED.value, epoch = EXCLUDED.epoch,
                         updated_at = now() WHERE amq2api.tokens.epoch <= EXCLUDED.epoch",
                        &[&id, &value, &epoch],
                    )
                    .await
                    .map_err(pg)?;
                if n == 0 {
                    return Err(StoreError::Fenced { account: id, epoch });
                }
                txn.commit().await.map_err(pg)
            })
        })
        .await
    }

    /// Upserts `rows` into `table`. With `held_only` (an account's state and counters), only
    /// the rows of accounts this node holds the lease of, at its epoch, in the database too: a
    /// node that lost a lease (paused, partitioned) would put its stale view (cooling, invalid,
    /// old counts) over the new holder's. Identities and catalogs are facts of the account, not
    /// of a holder: any node may write them.
    async fn put_values(
        &self,
        table: &'static str,
        rows: Vec<(String, Vec<u8>)>,
        held_only: bool,
    ) -> Result<(), StoreError> {
        let held = if held_only { Some(self.held_all()) } else { None };
        let rows: Vec<(String, Vec<u8>, Option<i64>)> = rows
            .into_iter()
            .filter_map(|(id, v)| match &held {
                None => Some((id, v, None)),
                Some(held) => held.get(&id).map(|h| (id, v, Some(h.epoch))),
            })
            .collect();
        if rows.is_empty() {
            return Ok(());
        }
        let node = self.inner.node_id.clone();
        self.run(Conn::Data, move |c| {
            Box::pin(async move {
                let txn = c.transaction().await.map_err(pg)?;
                let sql = if held_only {
                    format!(
                        "INSERT INTO amq2api.{table} (account, value)
                         SELECT $1::text, $2::bytea WHERE EXISTS (SELECT 1 FROM amq2api.leases
                             WHERE account = $1::text AND node_id = $3::text AND epoch = $4::bigint)
                         ON CONFLICT (account) DO UPDATE SET value = EXCLUDED.value"
                    )
                } else {
                    format!(
                        "INSERT INTO amq2api.{table} (account, value) VALUES ($1, $2)
                         ON CONFLICT (account) DO UPDATE SET value = EXCLUDED.value"
                    )
                };
                let stmt = txn.prepare(&sql).await.map_err(pg)?;
                for (id, value, epoch) in &rows {
                    match epoch {
                        Some(epoch) => txn.execute(&stmt, &[id, value, &node, epoch]).await.map_err(pg)?,
                        None => txn.execute(&stmt, &[id, value]).await.map_err(pg)?,
                    };
                }
                txn.commit().await.map_err(pg)
            })
        })
        .await
    }

    // --- cluster: nodes and leases (used by crate::cluster) ---

    /// Records this node's heartbeat (and status line).
    pub async fn heartbeat(&self, status: &str) -> Result<(), StoreError> {
        let (node, lease_ms, status) =
            (self.inner.node_id.clone(), self.inner.lease.as_millis() as i64, status.to_owned());
        let leaving = self.inner.leaving.load(std::sync::atomic::Ordering::SeqCst);
        self.run(Conn::Leases, move |c| {
            Box::pin(async move {
                c.execute(
                    "INSERT INTO amq2api.nodes (node_id, started_at, heartbeat_at, lease_ms, status, leaving)
                     VALUES ($1, now(), now(), $2, $3, $4)
                     ON CONFLICT (node_id) DO UPDATE SET heartbeat_at = now(), lease_ms = $2, status = $3,
                         leaving = $4",
                    &[&node, &lease_ms, &status, &leaving],
                )
                .await
                .map_err(pg)?;
                Ok(())
            })
        })
        .await
    }

    /// Marks this node as stopping: the other nodes stop counting it in their shares (and take
    /// the accounts it gives up at once), though it still renews what it holds until done.
    pub async fn leaving(&self) -> Result<(), StoreError> {
        self.inner.leaving.store(true, std::sync::atomic::Ordering::SeqCst);
        let node = self.inner.node_id.clone();
        self.run(Conn::Leases, move |c| {
            Box::pin(async move {
                c.execute("UPDATE amq2api.nodes SET leaving = true WHERE node_id = $1", &[&node])
                    .await
                    .map_err(pg)?;
                Ok(())
            })
        })
        .await
    }

    /// Marks this node as just started (a restart with the same node id) and takes back the
    /// leases it held under that id that have not expired, with a new epoch (fencing any older
    /// process of the same name).
    pub async fn reclaim(&self) -> Result<Vec<(String, Held)>, StoreError> {
        let (node, lease_ms) = (self.inner.node_id.clone(), self.inner.lease.as_millis() as i64);
        let rows = self
            .run(Conn::Leases, move |c| {
                Box::pin(async move {
                    c.execute(
                        "INSERT INTO amq2api.nodes (node_id, started_at, heartbeat_at, lease_ms)
                         VALUES ($1, now(), now(), $2)
                         ON CONFLICT (node_id) DO UPDATE SET started_at = now(), heartbeat_at = now(),
                             leaving = false",
                        &[&node, &lease_ms],
                    )
                    .await
                    .map_err(pg)?;
                    c.query(
                        "UPDATE amq2api.leases SET epoch = epoch + 1,
                         expires_at = now() + $2::float8 * interval '1 millisecond'
                         WHERE node_id = $1 AND expires_at > now() RETURNING account, epoch",
                        &[&node, &(lease_ms as f64)],
                    )
                    .await
                    .map_err(pg)
                })
            })
            .await?;
        let out: Vec<(String, Held)> =
            rows.iter().map(|r| (r.get::<_, String>(0), Held { epoch: r.get(1) })).collect();
        for (id, h) in &out {
            self.set_held(id, Some(*h));
        }
        Ok(out)
    }

    /// Renews every unexpired lease this node holds; returns those it still holds. A lease
    /// this node believed it held and that is not among them is lost (and forgotten here).
    pub async fn renew(&self) -> Result<HashMap<String, Held>, StoreError> {
        let (node, lease_ms) = (self.inner.node_id.clone(), self.inner.lease.as_millis() as i64);
        // Only the leases this node knows it holds, at the epoch it holds them with: a row left
        // under this node's name and not held here (a release whose update failed, an acquire
        // whose answer was lost, an account gone from this node's file) must run out so that
        // another node can serve the account, not be kept alive by this one forever.
        let (ids, epochs): (Vec<String>, Vec<i64>) =
            self.held_all().into_iter().map(|(id, h)| (id, h.epoch)).unzip();
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let rows = self
            .run(Conn::Leases, move |c| {
                Box::pin(async move {
                    c.query(
                        "UPDATE amq2api.leases SET expires_at = now() + $2::float8 * interval '1 millisecond'
                         WHERE node_id = $1 AND expires_at > now()
                           AND (account, epoch) IN (SELECT * FROM unnest($3::text[], $4::bigint[]))
                         RETURNING account, epoch",
                        &[&node, &(lease_ms as f64), &ids, &epochs],
                    )
                    .await
                    .map_err(pg)
                })
            })
            .await?;
        let renewed: HashMap<String, Held> =
            rows.iter().map(|r| (r.get::<_, String>(0), Held { epoch: r.get(1) })).collect();
        let mut held = self.inner.held.lock().unwrap_or_else(|p| p.into_inner());
        let lost: Vec<(String, Held)> = held
            .iter()
            .filter(|(id, h)| renewed.get(*id) != Some(h))
            .map(|(id, h)| (id.clone(), *h))
            .collect();
        held.retain(|id, h| renewed.get(id) == Some(h));
        let out = held.clone();
        drop(held);
        self.lost(lost);
        Ok(out)
    }

    /// Takes `account`'s lease if it is free (no row, no holder, or expired), with the next
    /// epoch; `None` when another node holds it.
    pub async fn acquire(&self, account: &str) -> Result<Option<Held>, StoreError> {
        let (id, node, lease_ms) =
            (account.to_owned(), self.inner.node_id.clone(), self.inner.lease.as_millis() as i64);
        let row = self
            .run(Conn::Leases, move |c| {
                Box::pin(async move {
                    c.query_opt(
                        "INSERT INTO amq2api.leases AS l (account, node_id, epoch, expires_at)
                         VALUES ($1, $2, 1, now() + $3::float8 * interval '1 millisecond')
                         ON CONFLICT (account) DO UPDATE SET node_id = EXCLUDED.node_id,
                             epoch = l.epoch + 1, expires_at = EXCLUDED.expires_at
                         WHERE l.expires_at <= now() OR l.node_id IS NULL
                         RETURNING epoch",
                        &[&id, &node, &(lease_ms as f64)],
                    )
                    .await
                    .map_err(pg)
                })
            })
            .await?;
        let held = row.map(|r| Held { epoch: r.get(0) });
        if let Some(h) = held {
            self.set_held(account, Some(h));
        }
        Ok(held)
    }

    /// Gives `account`'s lease up (rebalancing, shutdown): another node may take it at once.
    pub async fn release(&self, account: &str) -> Result<(), StoreError> {
        let Some(Held { epoch }) = self.held(account) else { return Ok(()) };
        self.set_held(account, None);
        let (id, node) = (account.to_owned(), self.inner.node_id.clone());
        self.run(Conn::Leases, move |c| {
            Box::pin(async move {
                c.execute(
                    "UPDATE amq2api.leases SET node_id = NULL, expires_at = now()
                     WHERE account = $1 AND node_id = $2 AND epoch = $3",
                    &[&id, &node, &epoch],
                )
                .await
                .map_err(pg)?;
                Ok(())
            })
        })
        .await
    }

    /// Forgets a lease locally without touching the database (it was lost).
    pub fn forget(&self, account: &str) {
        if let Some(h) = self.held(account) {
            self.set_held(account, None);
            self.lost([(account.to_owned(), h)]);
        }
    }

    /// Every node and lease (for `amqctl status` and the rebalancer).
    pub async fn cluster_view(&self) -> Result<(Vec<NodeRow>, Vec<LeaseRow>), StoreError> {
        self.run(Conn::Leases, |c| {
            Box::pin(async move {
                let nodes = c
                    .query(
                        "SELECT n.node_id, (extract(epoch from now() - n.heartbeat_at) * 1000)::bigint,
                             n.heartbeat_at > now() - n.lease_ms * interval '1 millisecond' AND NOT n.leaving,
                             n.status,
                             (SELECT count(*) FROM amq2api.leases l WHERE l.node_id = n.node_id
                                 AND l.expires_at > now()),
                             n.leaving
                         FROM amq2api.nodes n ORDER BY n.node_id",
                        &[],
                    )
                    .await
                    .map_err(pg)?
                    .iter()
                    .map(|r| NodeRow {
                        node_id: r.get(0),
                        heartbeat_age_ms: r.get(1),
                        alive: r.get(2),
                        status: r.get(3),
                        leases: r.get(4),
                        leaving: r.get(5),
                    })
                    .collect();
                let leases = c
                    .query(
                        "SELECT account, node_id, epoch, (extract(epoch from expires_at - now()) * 1000)::bigint
                         FROM amq2api.leases ORDER BY account",
                        &[],
                    )
                    .await
                    .map_err(pg)?
                    .iter()
                    .map(|r| LeaseRow {
                        account: r.get(0),
                        node_id: r.get(1),
                        epoch: r.get(2),
                        expires_in_ms: r.get(3),
                    })
                    .collect();
                Ok((nodes, leases))
            })
        })
        .await
    }

    /// Queues an account command (`refresh`, `enable`, `disable`) for whichever node holds it.
    pub async fn queue_command(&self, account: &str, command: &str) -> Result<i64, StoreError> {
        let (id, cmd) = (account.to_owned(), command.to_owned());
        self.run(Conn::Leases, move |c| {
            Box::pin(async move {
                let row = c
                    .query_one(
                        "INSERT INTO amq2api.commands (account, command) VALUES ($1, $2) RETURNING id",
                        &[&id, &cmd],
                    )
                    .await
                    .map_err(pg)?;
                Ok(row.get(0))
            })
        })
        .await
    }

    /// Deletes done commands older than a day and nodes not heard from for a week
    /// (each `amqctl refresh --all` adds a row per account, and every
    /// pod name ever started would be listed in `amqctl status` for good). Returns how many
    /// rows went.
    pub async fn prune(&self) -> Result<u64, StoreError> {
        self.run(Conn::Leases, |c| {
            Box::pin(async move {
                let commands = c
                    .execute(
                        &format!(
                            "DELETE FROM amq2api.commands WHERE done_at < now() - interval '{DONE_COMMANDS_KEPT}'"
                        ),
                        &[],
                    )
                    .await
                    .map_err(pg)?;
                let nodes = c
                    .execute(
                        &format!(
                            "DELETE FROM amq2api.nodes WHERE heartbeat_at < now() - interval '{SILENT_NODES_KEPT}'"
                        ),
                        &[],
                    )
                    .await
                    .map_err(pg)?;
                Ok(commands + nodes)
            })
        })
        .await
    }

    /// Takes the pending commands for accounts this node holds (marking them done by it).
    pub async fn take_commands(&self) -> Result<Vec<(String, String)>, StoreError> {
        let held: Vec<String> = self.held_all().into_keys().collect();
        if held.is_empty() {
            return Ok(Vec::new());
        }
        let node = self.inner.node_id.clone();
        self.run(Conn::Leases, move |c| {
            Box::pin(async move {
                let rows = c
                    .query(
                        "UPDATE amq2api.commands SET done_by = $1, done_at = now()
                         WHERE done_at IS NULL AND account = ANY($2) RETURNING account, command",
                        &[&node, &held],
                    )
                    .await
                    .map_err(pg)?;
                Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
            })
        })
        .await
    }
}

impl PgStore {
    /// Adds a batch of usage deltas to the fleet's rows: one statement (an upsert of the
    /// unnested batch), so one commit a flush whatever the batch's size.
    pub async fn add_usage_async(&self, batch: &[(String, UsageRow)]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut cols: (Vec<String>, Vec<String>, Vec<String>) = Default::default();
        let mut nums: [Vec<i64>; 4] = Default::default();
        let mut credits = Vec::new();
        for (key, d) in batch {
            let Some((day, dim, name)) = split_usage_key(key) else { continue };
            cols.0.push(day.to_owned());
            cols.1.push(dim.to_owned());
            cols.2.push(name.to_owned());
            for (v, n) in nums.iter_mut().zip([d.requests, d.errors, d.tokens_in, d.tokens_out]) {
                v.push(i64::try_from(n).unwrap_or(i64::MAX));
            }
            credits.push(d.credits);
        }
        self.run(Conn::Data, move |c| {
            Box::pin(async move {
                c.execute(
                    "INSERT INTO amq2api.usage AS u
                         (day, dim, name, requests, errors, tokens_in, tokens_out, credits)
                     SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::int8[],
                         $6::int8[], $7::int8[], $8::float8[])
                     ON CONFLICT (day, dim, name) DO UPDATE SET requests = u.requests + EXCLUDED.requests,
                         errors = u.errors + EXCLUDED.errors, tokens_in = u.tokens_in + EXCLUDED.tokens_in,
                         tokens_out = u.tokens_out + EXCLUDED.tokens_out, credits = u.credits + EXCLUDED.credits",
                    &[&cols.0, &cols.1, &cols.2, &nums[0], &nums[1], &nums[2], &nums[3], &credits],
                )
                .await
                .map_err(pg)?;
                Ok(())
            })
        })
        .await
    }

    /// The fleet's usage rows from day `from` on, of dimension `dim` when given, in key order.
    pub async fn usage_since_async(
        &self,
        from: &str,
        dim: Option<&str>,
    ) -> Result<Vec<(String, UsageRow)>, StoreError> {
        let (from, dim) = (from.to_owned(), dim.map(str::to_owned));
        self.run(Conn::Data, move |c| {
            Box::pin(async move {
                let rows = c
                    .query(
                        "SELECT day, dim, name, requests, errors, tokens_in, tokens_out, credits
                         FROM amq2api.usage WHERE day >= $1 AND ($2::text IS NULL OR dim = $2)
                         ORDER BY day, dim, name",
                        &[&from, &dim],
                    )
                    .await
                    .map_err(pg)?;
                Ok(rows
                    .iter()
                    .map(|r| {
                        let n = |i: usize| u64::try_from(r.get::<_, i64>(i)).unwrap_or(0);
                        (
                            usage_key(r.get(0), r.get(1), r.get(2)),
                            UsageRow {
                                requests: n(3),
                                errors: n(4),
                                tokens_in: n(5),
                                tokens_out: n(6),
                                credits: r.get(7),
                            },
                        )
                    })
                    .collect())
            })
        })
        .await
    }

    /// Deletes the fleet's usage rows of days before `before`.
    pub async fn prune_usage_async(&self, before: &str) -> Result<usize, StoreError> {
        let before = before.to_owned();
        self.run(Conn::Data, move |c| {
            Box::pin(async move {
                let n =
                    c.execute("DELETE FROM amq2api.usage WHERE day < $1", &[&before]).await.map_err(pg)?;
                Ok(n as usize)
            })
        })
        .await
    }
}

impl crate::keys::usage::UsageStore for PgStore {
    fn add_usage(&self, batch: &[(String, UsageRow)]) -> Result<(), StoreError> {
        self.block(self.add_usage_async(batch))
    }
    fn usage_since(&self, from: &str) -> Result<Vec<(String, UsageRow)>, StoreError> {
        self.block(self.usage_since_async(from, None))
    }
    fn usage_since_of(&self, from: &str, dim: &str) -> Result<Vec<(String, UsageRow)>, StoreError> {
        self.block(self.usage_since_async(from, Some(dim)))
    }
    fn prune_usage(&self, before: &str) -> Result<usize, StoreError> {
        self.block(self.prune_usage_async(before))
    }
}

/// Decodes one stored value into its part of `rec`.
/// A batch of records as the rows of their table: each encoded in its versioned wire form.
fn rows<'a, R: 'a, W: serde::Serialize + From<&'a R>>(
    batch: &'a [(String, R)],
) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
    batch.iter().map(|(id, r)| Ok((id.clone(), encode(&W::from(r))?))).collect()
}

/// As the embedded store reads them: a token row strictly (guessing could lose a chain), a
/// state row that does not decode as `disabled` (it may hold an operator's `amqctl disable`),
/// the other rows leniently (read as absent, written anew). Before, one such row stopped every
/// node's start, and an older node could not start once a newer one had written a new state.
fn fill(rec: &mut AccountRecord, table: &str, id: &str, value: &[u8]) -> Result<(), StoreError> {
    match table {
        "tokens" => rec.tokens = Some(decode_tokens(id, value)?),
        "state" => rec.state = state_or_disabled(id, value),
        "counters" => rec.counters = lenient(decode_counters(id, value)).unwrap_or_default(),
        "identity" => rec.identity = lenient(decode_identity(id, value)),
        "catalog" => rec.catalog = lenient(decode_catalog(id, value)),
        _ => {}
    }
    Ok(())
}

impl Backend for PgStore {
    fn load_all(&self) -> Result<BTreeMap<String, AccountRecord>, StoreError> {
        self.block(self.load_all_async())
    }
    fn get(&self, id: &str) -> Result<Option<AccountRecord>, StoreError> {
        self.block(self.get_async(id))
    }
    fn put_tokens(&self, id: &str, t: &TokenRecord) -> Result<(), StoreError> {
        self.block(self.put_tokens_async(id, t))
    }
    fn put_states(&self, batch: &[(String, StateRecord)]) -> Result<(), StoreError> {
        self.block(self.put_values("state", rows::<_, StateWire>(batch)?, true))
    }
    fn put_counters(&self, batch: &[(String, Counters)]) -> Result<(), StoreError> {
        self.block(self.put_values("counters", rows::<_, CountersWire>(batch)?, true))
    }
    fn put_identities(&self, batch: &[(String, IdentityRecord)]) -> Result<(), StoreError> {
        // Only the lease holder's: two nodes that started at once each made the account a
        // machine id, and the one stored must be the one the holder serves with (a later holder
        // takes it over, `Pool::adopt`).
        self.block(self.put_values("identity", rows::<_, IdentityWire>(batch)?, true))
    }
    fn put_catalogs(&self, batch: &[(String, CatalogRecord)]) -> Result<(), StoreError> {
        self.block(self.put_values("catalog", rows::<_, CatalogWire>(batch)?, false))
    }
    fn remove(&self, id: &str) -> Result<(), StoreError> {
        // Another node may still use the account (it is removed from this node's file first):
        // the shared rows stay; only this node's lease goes.
        self.block(self.release(id))
    }
    fn problem(&self) -> Option<StoreProblem> {
        self.inner.problem.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmodes_as_libpq() {
        let mode = |q: &str| {
            parse_url(&format!("postgresql://u@db.example/amq2api{q}")).map(|u| (u.tls, u.root_cert))
        };
        assert_eq!(mode("").unwrap(), (TlsMode::Prefer, None));
        assert_eq!(mode("?sslmode=disable").unwrap(), (TlsMode::Disable, None));
        assert_eq!(mode("?sslmode=require").unwrap(), (TlsMode::Require, None));
        assert_eq!(mode("?sslmode=verify-full").unwrap(), (TlsMode::VerifyFull, None));
        assert_eq!(mode("?sslmode=verify-ca&sslrootcert=system").unwrap(), (TlsMode::VerifyCa, None));
        // require with a root file checks the chain (libpq).
        assert_eq!(
            mode("?sslmode=require&sslrootcert=%2Fetc%2Fca.pem").unwrap(),
            (TlsMode::VerifyCa, Some(std::path::PathBuf::from("/etc/ca.pem")))
        );
        // Other options still reach tokio-postgres.
        let u = parse_url("postgresql://u@db.example:6432/amq2api?sslmode=verify-full&connect_timeout=3")
            .unwrap();
        assert_eq!(u.config.get_ports(), &[6432]);
        assert_eq!(u.config.get_ssl_mode(), tokio_postgres::config::SslMode::Require);
        assert!(matches!(mode("?sslmode=allow"), Err(StoreError::DatabaseUrl(_))));
        assert!(matches!(mode("?nonsense=1"), Err(StoreError::DatabaseUrl(_))));
    }
}
