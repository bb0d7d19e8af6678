//! The daemon's life: build the pool, the server and the background tasks from a validated
//! configuration, serve on already-bound listeners, and drain on shutdown.

use crate::accounts::Pool;
use crate::accounts::pool::{NoSink, Restored, StateSink};
use crate::config::Loaded;
use crate::server::{self, App, ServeOptions, tls};
use crate::translate::ModelMap;
use crate::upstream::UpstreamClient;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Sockets bound before the daemon starts (by `main`, by systemd, or by a test).
pub struct Listeners {
    pub http: Vec<std::net::TcpListener>,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Tls(#[from] tls::TlsError),
    #[error("{0}")]
    Client(#[from] crate::upstream::client::ClientBuildError),
    #[error("listener: {0}")]
    Listener(std::io::Error),
}

/// Runs the daemon until `shutdown` resolves, then drains: no new connections, in-flight
/// streams get up to `drain_timeout_secs`, then end with an `overloaded_error` event.
pub async fn run(
    loaded: Loaded,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    run_with(loaded, listeners, shutdown, Arc::new(NoSink), BTreeMap::new()).await
}

/// [`run`] with a state sink and restored account state (the store).
pub async fn run_with(
    loaded: Loaded,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
    sink: Arc<dyn StateSink>,
    restored: BTreeMap<String, Restored>,
) -> Result<(), RunError> {
    let Loaded { config, accounts, warnings } = loaded;
    for w in &warnings.0 {
        tracing::warn!("{w}");
    }
    let client = UpstreamClient::new(&config.upstream)?;
    let pool = Pool::new(&accounts, restored, &config.accounts, config.upstream.clone(), client, sink);
    let tls_config = match &config.server.tls {
        Some(files) => {
            let cert = tls::ReloadableCert::new(tls::load_certified_key(&files.cert, &files.key)?);
            Some(tls::server_config(cert)?)
        }
        None => None,
    };
    let (drain_tx, drain_rx) = watch::channel(false);
    let (stop_tx, stop_rx) = watch::channel(false);
    let app = Arc::new(App {
        auth: RwLock::new(config.auth.clone()),
        models: ModelMap::new(&config.models),
        pool: pool.clone(),
        metrics: Default::default(),
        started: Instant::now(),
        drain_expired: drain_rx,
        config,
    });
    let opts = Arc::new(ServeOptions {
        tls: tls_config,
        max_connections: app.config.server.max_connections,
        header_read_timeout: app.config.server.header_read_timeout,
        max_header_count: app.config.server.max_header_count,
        max_header_bytes: app.config.server.max_header_bytes,
        idle_timeout: app.config.server.idle_timeout,
    });
    let graceful = Arc::new(hyper_util::server::graceful::GracefulShutdown::new());
    let mut servers = Vec::new();
    for l in listeners.http {
        l.set_nonblocking(true).map_err(RunError::Listener)?;
        let addr = l.local_addr().map_err(RunError::Listener)?;
        let listener = tokio::net::TcpListener::from_std(l).map_err(RunError::Listener)?;
        tracing::info!(%addr, tls = opts.tls.is_some(), "listening");
        servers.push(tokio::spawn(server::serve(
            app.clone(),
            listener,
            opts.clone(),
            stop_rx.clone(),
            graceful.clone(),
        )));
    }
    let refresher = tokio::spawn(pool.clone().run_refresher(stop_rx.clone()));
    tracing::info!(accounts = accounts.len(), "amq2api ready");

    shutdown.await;
    tracing::info!("shutting down: no new connections; draining in-flight requests");
    let _ = stop_tx.send(true);
    for s in servers {
        let _ = s.await;
    }
    let drain = app.config.server.drain_timeout;
    let graceful = Arc::try_unwrap(graceful).unwrap_or_else(|_| unreachable!("accept loops have ended"));
    let done = graceful.shutdown();
    tokio::pin!(done);
    if tokio::time::timeout(drain, &mut done).await.is_err() {
        tracing::warn!(
            streams = app.metrics.streams_in_flight(),
            "drain deadline passed: closing open streams"
        );
        let _ = drain_tx.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(2), done).await;
    }
    let _ = refresher.await;
    tracing::info!("stopped");
    Ok(())
}
