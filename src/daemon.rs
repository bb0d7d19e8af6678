//! The daemon's life: build the pool, the server and the background tasks from a validated
//! configuration, serve on already-bound listeners, reload on request (SIGHUP, `amqctl reload`,
//! a changed accounts file), and drain on shutdown.

use crate::accounts::Pool;
use crate::accounts::pool::{NoSink, Restored, StateSink};
use crate::config::{self, AccountSet, Env, Loaded};
use crate::control::wire::ReloadResult;
use crate::server::{self, App, ServeOptions, tls};
use crate::translate::ModelMap;
use crate::upstream::UpstreamClient;
use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
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

/// What the last reload did.
#[derive(Debug, Clone)]
pub struct ReloadInfo {
    /// The set in use (the last good one).
    pub accounts: AccountSet,
    pub loaded_at: SystemTime,
    pub last_error: Option<String>,
    pub last_attempt: Option<SystemTime>,
}

/// State shared by the server, the control socket and the reload path.
pub struct Shared {
    pub app: Arc<App>,
    pub config_path: PathBuf,
    pub env: Env,
    pub listeners: Vec<String>,
    pub started_at: SystemTime,
    pub tls_cert: Option<Arc<tls::ReloadableCert>>,
    info: RwLock<ReloadInfo>,
    reload_lock: tokio::sync::Mutex<()>,
}

impl Shared {
    /// The line `systemctl status` shows: "serving 12/14 accounts, 3 streams", plus the last
    /// reload error when there is one.
    pub fn status_line(&self) -> String {
        let s = self.app.pool.summary();
        let mut line = format!(
            "serving {}/{} accounts, {} streams",
            s.active,
            s.total,
            self.app.metrics.streams_in_flight()
        );
        if let Some(p) = self.app.pool.persistence_problem() {
            line.push_str(&format!("; DEGRADED: {p}"));
        }
        if let Some(e) = &self.reload_info().last_error {
            line.push_str(&format!("; last reload failed: {e}"));
        }
        line
    }

    pub fn reload_info(&self) -> ReloadInfo {
        self.info.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn record(&self, result: &ReloadResult, new_set: Option<AccountSet>) {
        let mut info = self.info.write().unwrap_or_else(|e| e.into_inner());
        info.last_attempt = Some(SystemTime::now());
        if result.ok {
            info.last_error = None;
            if let Some(set) = new_set {
                info.accounts = set;
                info.loaded_at = SystemTime::now();
            }
        } else {
            info.last_error = Some(result.errors.join("; "));
        }
    }

    /// Re-reads the accounts file and applies the difference; an invalid file changes nothing.
    pub async fn reload_accounts(&self) -> ReloadResult {
        let _guard = self.reload_lock.lock().await;
        let path = self.app.config.accounts.file.clone();
        let result = match off_runtime(move || config::accounts::load(&path)).await {
            Ok((set, warnings)) => {
                let old = self.reload_info().accounts;
                let diff = old.diff(&set);
                if !diff.is_empty() {
                    self.app.pool.apply(&set, &diff).await;
                    tracing::info!(changes = %diff, "accounts file reloaded");
                }
                let r = ReloadResult {
                    ok: true,
                    changes: diff.to_string(),
                    errors: vec![],
                    warnings: warnings.0.iter().map(|w| w.to_string()).collect(),
                };
                self.record(&r, Some(set));
                return r;
            }
            Err(diags) => {
                for d in diags.errors() {
                    tracing::error!("accounts file not applied (the last good set keeps serving): {d}");
                }
                ReloadResult {
                    ok: false,
                    changes: "no changes".into(),
                    errors: diags.errors().map(|d| d.to_string()).collect(),
                    warnings: diags.warnings().map(|d| d.to_string()).collect(),
                }
            }
        };
        self.record(&result, None);
        result
    }

    /// SIGHUP / `amqctl reload`: re-reads amq2api.toml (client keys, TLS certificate) and the
    /// accounts file. Settings that need a restart (listeners, state dir) are reported.
    pub async fn reload_all(&self) -> ReloadResult {
        let (path, env) = (self.config_path.clone(), self.env.clone());
        let loaded = match off_runtime(move || config::load(&path, &env)).await {
            Ok(l) => l,
            Err(diags) => {
                for d in diags.errors() {
                    tracing::error!("configuration not applied (the running one stays): {d}");
                }
                let r = ReloadResult {
                    ok: false,
                    changes: "no changes".into(),
                    errors: diags.errors().map(|d| d.to_string()).collect(),
                    warnings: diags.warnings().map(|d| d.to_string()).collect(),
                };
                self.record(&r, None);
                return r;
            }
        };
        let mut notes = Vec::new();
        *self.app.auth.write().unwrap_or_else(|e| e.into_inner()) = loaded.config.auth.clone();
        if let (Some(cert), Some(files)) = (&self.tls_cert, &loaded.config.server.tls) {
            let (cert, files) = (cert.clone(), files.clone());
            match off_runtime(move || cert.reload(&files.cert, &files.key)).await {
                Ok(()) => notes.push("TLS certificate reloaded".to_string()),
                Err(e) => {
                    tracing::error!(error = %e, "new TLS certificate refused; the old one stays in use");
                    notes.push(format!("TLS certificate NOT reloaded: {e}"));
                }
            }
        }
        if loaded.config.server.listen != self.app.config.server.listen {
            notes.push("listen addresses changed: restart to apply".into());
        }
        let mut r = self.reload_accounts().await;
        if !notes.is_empty() {
            r.changes = format!("{}; {}", r.changes, notes.join("; "));
        }
        r
    }
}

/// Runs blocking work (reading configuration files) on the blocking pool, so that no runtime
/// worker ever waits on a file; a panic there goes on in the caller.
async fn off_runtime<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// Runs the daemon until `shutdown` resolves, then drains: no new connections, in-flight
/// streams get up to `drain_timeout_secs`, then end with an `overloaded_error` event.
/// Opens the state store in `[state] dir` (a second daemon on the same directory fails here).
pub async fn run(
    loaded: Loaded,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let dir = loaded.config.state.dir.clone();
    let store = tokio::task::spawn_blocking(move || crate::store::Store::open(&dir))
        .await
        .map_err(|e| RunError::Store(e.to_string()))?
        .map_err(|e| RunError::Store(e.to_string()))?;
    let records = store.load_all().map_err(|e| RunError::Store(e.to_string()))?;
    let restored = crate::accounts::persist::restored(records);
    run_with(loaded, listeners, shutdown, Arc::new(crate::accounts::persist::StoreSink::new(store)), restored)
        .await
}

/// [`run`] without persistence (nothing survives a restart): for tools and tests.
pub async fn run_ephemeral(
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
    let config_path = config.path.clone();
    let upstream = config.upstream.clone();
    let client = off_runtime(move || UpstreamClient::new(&upstream)).await?;
    let pool = Pool::new(&accounts, restored, &config.accounts, config.upstream.clone(), client, sink);
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
    let (drain_tx, drain_rx) = watch::channel(false);
    let (stop_tx, stop_rx) = watch::channel(false);
    let metrics = Arc::new(crate::metrics::Metrics::new(pool.clone()));
    let app = Arc::new(App {
        auth: RwLock::new(config.auth.clone()),
        models: ModelMap::new(&config.models),
        pool: pool.clone(),
        relay: crate::relay::Relay::new(pool.clone(), metrics.clone(), config.upstream.max_attempts),
        metrics,
        started: Instant::now(),
        drain_expired: drain_rx,
        work: server::work::Work::for_this_runtime(config.server.max_body_bytes, config.server.queue_timeout),
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
    let mut addrs = Vec::new();
    for l in listeners.http {
        l.set_nonblocking(true).map_err(RunError::Listener)?;
        let addr = l.local_addr().map_err(RunError::Listener)?;
        let listener = tokio::net::TcpListener::from_std(l).map_err(RunError::Listener)?;
        tracing::info!(%addr, tls = opts.tls.is_some(), "listening");
        addrs.push(format!("{}://{addr}", if opts.tls.is_some() { "https" } else { "http" }));
        servers.push(tokio::spawn(server::serve(
            app.clone(),
            listener,
            opts.clone(),
            stop_rx.clone(),
            graceful.clone(),
        )));
    }
    let shared = Arc::new(Shared {
        app: app.clone(),
        env: Env::from_process(),
        config_path,
        listeners: addrs,
        started_at: SystemTime::now(),
        tls_cert,
        info: RwLock::new(ReloadInfo {
            accounts,
            loaded_at: SystemTime::now(),
            last_error: None,
            last_attempt: None,
        }),
        reload_lock: tokio::sync::Mutex::new(()),
    });
    let control = tokio::spawn(crate::control::serve(shared.clone(), control_listener, stop_rx.clone()));
    let refresher = tokio::spawn(pool.clone().run_refresher(stop_rx.clone()));

    // The accounts file, live.
    let (file_tx, mut file_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut watcher = match crate::accounts::watch::watch(&app.config.accounts.file, file_tx) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the accounts file; reload with SIGHUP or amqctl reload");
            None
        }
    };
    let watch_shared = shared.clone();
    let mut watch_stop = stop_rx.clone();
    let watcher_task = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = watch_stop.changed() => break,
                more = crate::accounts::watch::next_burst(&mut file_rx) => {
                    if !more { break; }
                    // The symlink may have been re-pointed: watch where it leads now.
                    if let Some(w) = watcher.as_mut() { w.follow_target(); }
                    watch_shared.reload_accounts().await;
                }
            }
        }
    });
    // SIGHUP: reload everything.
    let hup_shared = shared.clone();
    let mut hup_stop = stop_rx.clone();
    let hup_task = tokio::spawn(async move {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
            return;
        };
        loop {
            tokio::select! {
                _ = hup_stop.changed() => break,
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reloading configuration and accounts");
                    crate::systemd::reloading();
                    let r = hup_shared.reload_all().await;
                    tracing::info!(ok = r.ok, changes = %r.changes, "reload finished");
                    crate::systemd::ready(&hup_shared.status_line());
                }
            }
        }
    });
    // systemd: ready, a status line kept current, the watchdog.
    let mut extra = Vec::new();
    if let Some(interval) = crate::systemd::watchdog_interval() {
        extra.push(tokio::spawn(crate::systemd::run_watchdog(interval, stop_rx.clone())));
    }
    if crate::systemd::under_systemd() {
        let st_shared = shared.clone();
        let mut st_stop = stop_rx.clone();
        extra.push(tokio::spawn(async move {
            let mut last = String::new();
            loop {
                let line = st_shared.status_line();
                if line != last {
                    crate::systemd::status(&line);
                    last = line;
                }
                tokio::select! {
                    _ = st_stop.changed() => break,
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
            }
        }));
    }
    tracing::info!(accounts = shared.reload_info().accounts.len(), "amq2api ready");
    crate::systemd::ready(&shared.status_line());

    shutdown.await;
    crate::systemd::stopping();
    tracing::info!("shutting down: no new connections; draining in-flight requests");
    let _ = stop_tx.send(true);
    for s in servers {
        let _ = s.await;
    }
    let drain = app.config.server.drain_timeout;
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
    let _ = tokio::join!(refresher, control, watcher_task, hup_task);
    for t in extra {
        let _ = t.await;
    }
    // A refresh in flight may have rotated the refresh token at the token endpoint: its answer
    // must be stored before the process goes, or the chain is lost. Bounded by the refresh
    // call's own deadline.
    let refresh_deadline = app.config.upstream.connect_timeout + Duration::from_secs(35);
    let lost = app.pool.finish(refresh_deadline).await;
    if !lost.is_empty() {
        let ids: Vec<String> = lost.iter().map(|id| id.to_string()).collect();
        tracing::error!(
            accounts = %ids.join(", "),
            "stopping with rotated refresh tokens that could not be stored: these accounts need new credentials"
        );
    }
    let _ = std::fs::remove_file(&app.config.control.socket);
    tracing::info!("stopped");
    Ok(())
}
