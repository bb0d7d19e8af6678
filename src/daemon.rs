//! The daemon's life: build the pool, the server and the background tasks from a validated
//! configuration, serve on already-bound listeners, start the named background tasks (control
//! socket, token refresher, reload's watcher and SIGHUP handler, systemd status and watchdog), and
//! on shutdown stop them all through one [`crate::shutdown::Shutdown`], drain, cancel what is
//! left of the connections and the tasks they spawned, and store what must survive. When
//! [`run`] returns, no task it started holds the state store.

use crate::accounts::Pool;
use crate::accounts::pool::{NoSink, Restored, StateSink};
use crate::config::{Env, Loaded};
use crate::reload::{Reloader, off_runtime};
use crate::server::{self, App, ServeOptions, tls};
use crate::translate::ModelMap;
use crate::upstream::UpstreamClient;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};
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
    #[error("{0}")]
    Control(#[from] crate::control::ControlError),
    #[error("state store: {0}")]
    Store(String),
}

/// The line `systemctl status` shows: "serving 12/14 accounts, 3 streams", plus a persistence
/// problem and the last reload error when there are.
pub fn status_line(app: &App, reloader: &Reloader) -> String {
    let s = app.pool.summary();
    let mut line =
        format!("serving {}/{} accounts, {} streams", s.active, s.total, app.metrics.streams_in_flight());
    if let Some(c) = &app.config.cluster {
        line.push_str(&format!(" (node {}, {} accounts on other nodes)", c.node_id, s.elsewhere));
    }
    if let Some(p) = app.pool.persistence_problem() {
        line.push_str(&format!("; DEGRADED: {p}"));
    }
    if let Some(e) = &reloader.info().last_error {
        line.push_str(&format!("; last reload failed: {e}"));
    }
    line
}

/// Runs the daemon until `shutdown` resolves, then drains: no new connections, in-flight
/// streams get up to `drain_timeout_secs`, then end with an `overloaded_error` event.
/// Opens the state store in `[state] dir` (a second daemon on the same directory fails here).
pub async fn run(
    loaded: Loaded,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    if let Some(cluster) = loaded.config.cluster.clone() {
        let store = crate::store::postgres::PgStore::connect(
            cluster.database_url.expose(),
            &cluster.node_id,
            cluster.lease,
        )
        .await
        .map_err(|e| RunError::Store(e.to_string()))?;
        tracing::info!(node = %cluster.node_id, lease_secs = cluster.lease.as_secs(), "cluster: on PostgreSQL");
        let records = store.load_all_async().await.map_err(|e| RunError::Store(e.to_string()))?;
        let restored = crate::accounts::persist::restored(records);
        let sink = Arc::new(crate::accounts::persist::StoreSink::new(Arc::new(store.clone())));
        // Usage rows are the fleet's: every node adds its batches to the same PostgreSQL rows.
        let usage =
            crate::keys::Usage::new(Some(Arc::new(store.clone())), loaded.config.state.usage_retention_days);
        return run_inner(loaded, listeners, shutdown, sink, restored, usage, Some(store)).await;
    }
    let dir = loaded.config.state.dir.clone();
    let store = tokio::task::spawn_blocking(move || crate::store::Store::open(&dir))
        .await
        .map_err(|e| RunError::Store(e.to_string()))?
        .map_err(|e| RunError::Store(e.to_string()))?;
    let records = store.load_all().map_err(|e| RunError::Store(e.to_string()))?;
    let restored = crate::accounts::persist::restored(records);
    let usage =
        crate::keys::Usage::new(Some(Arc::new(store.clone())), loaded.config.state.usage_retention_days);
    let sink = Arc::new(crate::accounts::persist::StoreSink::new(Arc::new(store)));
    run_inner(loaded, listeners, shutdown, sink, restored, usage, None).await
}

/// [`run`] without persistence (nothing survives a restart): for tools and tests.
pub async fn run_ephemeral(
    loaded: Loaded,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let usage = crate::keys::Usage::new(None, loaded.config.state.usage_retention_days);
    run_with(loaded, listeners, shutdown, Arc::new(NoSink), BTreeMap::new(), usage).await
}

/// [`run`] with a state sink and restored account state (the store).
pub async fn run_with(
    loaded: Loaded,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
    sink: Arc<dyn StateSink>,
    restored: BTreeMap<String, Restored>,
    usage: Arc<crate::keys::Usage>,
) -> Result<(), RunError> {
    run_inner(loaded, listeners, shutdown, sink, restored, usage, None).await
}

async fn run_inner(
    loaded: Loaded,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
    sink: Arc<dyn StateSink>,
    restored: BTreeMap<String, Restored>,
    usage: Arc<crate::keys::Usage>,
    cluster: Option<crate::store::postgres::PgStore>,
) -> Result<(), RunError> {
    let Loaded { config, accounts, keys, warnings } = loaded;
    for w in &warnings.0 {
        tracing::warn!("{w}");
    }
    let config_path = config.path.clone();
    let upstream = config.upstream.clone();
    let client = off_runtime(move || UpstreamClient::new(&upstream)).await?;
    let pool = Pool::new(&accounts, restored, &config.accounts, config.upstream.clone(), client, sink);
    // Chains taken over from another id's record, stored under their new ids before serving
    // (under `[cluster]` at the first use under the account's lease: a write without it is
    // fenced).
    if cluster.is_none() {
        pool.store_unsaved().await;
    }
    if let Some(store) = &cluster {
        // Half a lease: a refresh never starts so late that the lease could end before its
        // answer is stored.
        pool.set_clustered(store.lease() / 2, Arc::new(store.clone()));
    }
    let (tls_cert, tls_config) = match &config.server.tls {
        Some(files) => {
            let files = files.clone();
            let ck = off_runtime(move || tls::load_certified_key(&files.cert, &files.key)).await?;
            let cert = tls::ReloadableCert::new(ck);
            (Some(cert.clone()), Some(tls::server_config(cert)?))
        }
        None => (None, None),
    };
    let control_listener = crate::control::bind(&config.control.socket, config.control.mode)?;
    let control_id = crate::control::socket_id(&config.control.socket);
    let (drain_tx, drain_rx) = watch::channel(false);
    let (stop, shutdown_signal) = crate::shutdown::channel();
    let metrics = Arc::new(crate::metrics::Metrics::new(pool.clone()));
    let key_set = keys.clone();
    let keys = {
        let usage = usage.clone();
        Arc::new(off_runtime(move || crate::keys::Keys::new(&keys, usage)).await)
    };
    let app = Arc::new(App {
        auth: RwLock::new(config.auth.clone()),
        keys,
        models: ModelMap::new(&config.models),
        pool: pool.clone(),
        relay: crate::relay::Relay::new(pool.clone(), metrics.clone(), config.upstream.max_attempts),
        metrics,
        started: Instant::now(),
        drain_expired: drain_rx,
        work: server::work::Work::for_this_runtime(config.server.max_body_bytes, config.server.queue_timeout),
        activity: Arc::default(),
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
    let connections = crate::shutdown::Tasks::new();
    let mut servers = Vec::new();
    let mut addrs = Vec::new();
    let mut listening = Vec::new();
    for l in listeners.http {
        l.set_nonblocking(true).map_err(RunError::Listener)?;
        let addr = l.local_addr().map_err(RunError::Listener)?;
        listening.push(addr);
        let listener = tokio::net::TcpListener::from_std(l).map_err(RunError::Listener)?;
        tracing::info!(%addr, tls = opts.tls.is_some(), "listening");
        addrs.push(format!("{}://{addr}", if opts.tls.is_some() { "https" } else { "http" }));
        servers.push(tokio::spawn(server::serve(
            app.clone(),
            listener,
            opts.clone(),
            shutdown_signal.clone(),
            graceful.clone(),
            connections.clone(),
        )));
    }
    let reloader = Arc::new(Reloader::new(
        app.clone(),
        config_path,
        Env::from_process(),
        tls_cert,
        accounts,
        key_set,
        listening,
    ));
    let named = app.keys.list().len();
    let status = {
        let (app, reloader) = (app.clone(), reloader.clone());
        move || status_line(&app, &reloader)
    };
    let control_ctx = Arc::new(crate::control::Context {
        app: app.clone(),
        reloader: reloader.clone(),
        listeners: addrs,
        started_at: SystemTime::now(),
        cluster: cluster.clone(),
        tasks: crate::shutdown::Tasks::new(),
    });
    // The files' watchers are set up before the control socket answers and READY=1: a change
    // made as soon as the daemon answers is seen.
    let watch_accounts = crate::reload::watch_accounts(reloader.clone(), shutdown_signal.clone());
    let watch_keys = crate::reload::watch_keys(reloader.clone(), shutdown_signal.clone());
    let mut tasks = vec![
        tokio::spawn(crate::control::serve(control_ctx, control_listener, shutdown_signal.clone())),
        tokio::spawn(pool.clone().run_refresher(shutdown_signal.clone())),
        tokio::spawn(watch_accounts),
        tokio::spawn(watch_keys),
        tokio::spawn(usage.clone().run(shutdown_signal.clone())),
        tokio::spawn(crate::reload::on_sighup(reloader.clone(), status.clone(), shutdown_signal.clone())),
        tokio::spawn(crate::memory::run_trimmer(app.activity.clone(), shutdown_signal.clone())),
    ];
    // The lease loop outlives the other tasks: it gives accounts up as the drain frees them,
    // and keeps the rest until the pool is done with (`pool_done`).
    let (pool_done, pool_done_signal) = crate::shutdown::channel();
    let mut lease_loop = None;
    if let Some(store) = &cluster {
        tasks.push(tokio::spawn(app.keys.clone().run_fleet_budgets(shutdown_signal.clone())));
        lease_loop = Some(tokio::spawn(crate::cluster::run(
            store.clone(),
            pool.clone(),
            status.clone(),
            shutdown_signal.clone(),
            pool_done_signal,
        )));
    }
    // systemd: ready, a status line kept current, the watchdog.
    if let Some(interval) = crate::systemd::watchdog_interval() {
        tasks.push(tokio::spawn(crate::systemd::run_watchdog(interval, shutdown_signal.clone())));
    }
    if crate::systemd::under_systemd() {
        tasks.push(tokio::spawn(crate::systemd::keep_status(status.clone(), shutdown_signal.clone())));
    }
    tracing::info!(accounts = reloader.info().accounts.len(), named_keys = named, "amq2api ready");
    crate::systemd::ready(&status());

    shutdown.await;
    crate::systemd::stopping();
    let drain = app.config.server.drain_timeout;
    // The drain, its 2 s of grace, closing what is left; each later step extends again.
    crate::systemd::extend_stop(drain + Duration::from_secs(15));
    tracing::info!("shutting down: no new connections; draining in-flight requests");
    stop.fire();
    for s in servers {
        let _ = s.await;
    }
    let done = match Arc::try_unwrap(graceful) {
        Ok(g) => Some(g.shutdown()),
        Err(_) => None,
    };
    if let Some(done) = done {
        tokio::pin!(done);
        if tokio::time::timeout(drain, &mut done).await.is_err() {
            tracing::warn!(
                streams = app.metrics.streams_in_flight(),
                "drain deadline passed: closing open streams"
            );
            let _ = drain_tx.send(true);
            let _ = tokio::time::timeout(Duration::from_secs(2), done).await;
        }
    }
    // What is left of the connections (one that never ended after the drain deadline, an
    // HTTP/2 stream's task) is cancelled here: none may hold the pool past `run`.
    let cancelled = connections.stop(Duration::ZERO).await;
    if cancelled > 0 {
        tracing::warn!(cancelled, "connections still open after the drain were closed");
    }
    for t in tasks {
        let _ = t.await;
    }
    // Every request has ended: what they used is committed before the process goes.
    let flushed = {
        let usage = usage.clone();
        off_runtime(move || usage.flush()).await
    };
    if let Err(e) = flushed {
        tracing::error!(error = %e, "stopping with usage that could not be stored");
    }
    // A refresh in flight may have rotated the refresh token at the token endpoint: its answer
    // must be stored before the process goes, or the chain is lost. Bounded by the refresh
    // call's own deadline.
    let refresh_deadline = app.config.upstream.connect_timeout
        + crate::upstream::client::TOKEN_CALL_DEADLINE
        + crate::upstream::client::TOKEN_BODY_FLOOR
        + Duration::from_secs(1);
    crate::systemd::extend_stop(refresh_deadline + Duration::from_secs(15));
    let lost = app.pool.finish(refresh_deadline).await;
    if !lost.is_empty() {
        let ids: Vec<String> = lost.iter().map(|id| id.to_string()).collect();
        tracing::error!(
            accounts = %ids.join(", "),
            "stopping with rotated refresh tokens that could not be stored: these accounts need new credentials"
        );
    }
    pool_done.fire();
    if let Some(l) = lease_loop {
        let _ = l.await;
    }
    if let Some(store) = &cluster {
        crate::cluster::release_all(store, &app.pool).await;
    }
    crate::control::unlink_if_ours(&app.config.control.socket, control_id);
    // Every task that held the pool (and through its sink the state store) has ended: the
    // store closes as these go, before `run` returns.
    drop((status, reloader, app, pool, usage));
    tracing::info!("stopped");
    Ok(())
}
