//! The admin API over a Unix socket (HTTP/1.1 + JSON): status, accounts, refresh, check,
//! enable/disable, reload, named keys and usage, export. Every connection's peer credentials are
//! checked (root, the daemon's uid, or a member of its group); every mutating call is logged with
//! uid and pid. `GET /v1/export` (the live credentials, secrets included) is for root and the
//! daemon's own uid only, and each call is logged with uid and pid (never a secret).

pub mod wire;

use crate::accounts::Account;
use crate::accounts::pool::AccountView;
use crate::reload::Reloader;
use crate::server::App;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::net::UnixListener;
use wire::*;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("another amq2api is already listening on {0}")]
    InUse(String),
    #[error("cannot create the control socket {path}: {source}")]
    Io { path: String, source: std::io::Error },
}

/// Binds the control socket: a stale socket file from a crashed run is replaced, a live
/// daemon already listening is refused; the file gets `mode`.
pub fn bind(path: &Path, mode: u32) -> Result<std::os::unix::net::UnixListener, ControlError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let io = |source| ControlError::Io { path: path.display().to_string(), source };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => return Err(ControlError::InUse(path.display().to_string())),
                // Nobody listens: a crashed run's socket.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                // Anything else (no permission, a full backlog) does not say nobody listens:
                // removing it could cut a live daemon off from amqctl.
                Err(e) => return Err(io(e)),
            }
            std::fs::remove_file(path).map_err(io)?;
        } else {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way",
            )));
        }
    }
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() && !dir.exists() {
            std::fs::create_dir_all(dir).map_err(io)?;
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750));
        }
    }
    let l = std::os::unix::net::UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io)?;
    Ok(l)
}

/// The socket file's identity, taken after [`bind`]: device, inode and change time (an inode
/// freed by a removed socket is soon given to the next one).
pub type SocketId = (u64, u64, i64, i64);

/// See [`SocketId`].
pub fn socket_id(path: &Path) -> Option<SocketId> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino(), m.ctime(), m.ctime_nsec()))
}

/// Removes the control socket at exit, if it is still the one `id` names: a daemon started on
/// the same path while this one drained has its own socket there, which must stay.
pub fn unlink_if_ours(path: &Path, id: Option<SocketId>) {
    if id.is_some() && socket_id(path) == id {
        let _ = std::fs::remove_file(path);
    }
}

/// Who is calling.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

/// Root, the daemon's own uid, or a member of the daemon's group.
fn allowed(peer: &Peer) -> bool {
    let my_uid = nix::unistd::getuid().as_raw();
    let my_gid = nix::unistd::getgid().as_raw();
    if peer.uid == 0 || peer.uid == my_uid || peer.gid == my_gid {
        return true;
    }
    // Supplementary groups of the caller's user.
    let Ok(Some(user)) = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(peer.uid)) else {
        return false;
    };
    let Ok(name) = std::ffi::CString::new(user.name.clone()) else { return false };
    nix::unistd::getgrouplist(&name, user.gid)
        .map(|gs| gs.iter().any(|g| g.as_raw() == my_gid))
        .unwrap_or(false)
}

/// `GET /v1/export` hands out secrets: root, or the user the daemon runs as (a service user no
/// one logs in as; tests run the daemon as themselves), never a mere member of its group.
fn export_allowed(peer: &Peer) -> bool {
    peer.uid == 0 || peer.uid == nix::unistd::getuid().as_raw()
}

/// A proxy as its accounts.toml URL, password included.
fn proxy_url(p: &crate::config::accounts::Proxy) -> String {
    use crate::config::accounts::ProxyScheme;
    let scheme = match p.scheme {
        ProxyScheme::Http => "http",
        ProxyScheme::Socks5 { remote_dns: false } => "socks5",
        ProxyScheme::Socks5 { remote_dns: true } => "socks5h",
    };
    let auth = p
        .auth
        .as_ref()
        .map(|(u, pw)| {
            use crate::config::accounts::percent_encode;
            format!("{}:{}@", percent_encode(u), percent_encode(pw.expose()))
        })
        .unwrap_or_default();
    let host = if p.host.contains(':') { format!("[{}]", p.host) } else { p.host.clone() };
    format!("{scheme}://{auth}{host}:{}", p.port)
}

/// Every account's live credentials (the head of each token chain). Under `[cluster]`, an
/// account another node holds is read from the store: that node rotates its chain, and this
/// node's copy (from its start or its last lease) is long dead. `Err` when the store cannot
/// say (a dead token handed out for a move would lose the account).
pub async fn export(shared: &Context) -> Result<Export, String> {
    use crate::config::Credentials;
    let mut accounts = Vec::new();
    for a in shared.app.pool.accounts() {
        let spec = a.spec();
        let mut chain = a.tokens.chain().await;
        if let Some(store) =
            shared.cluster.as_ref().filter(|_| !a.held_for(0) && spec.kind() != crate::config::Kind::ApiKey)
        {
            let record = store
                .get_async(a.id.as_str())
                .await
                .map_err(|e| format!("cannot read account {}'s chain from the cluster's store: {e}", a.id))?;
            // A chain of other credentials is not this entry's (the file's token is the live one).
            let fingerprint = spec.credentials_fingerprint();
            match record.and_then(|r| r.tokens).filter(|t| t.file_fingerprint == fingerprint) {
                Some(t) => {
                    chain.refresh_token = t.refresh_token;
                    chain.rotated = t.rotated;
                }
                None => {
                    if let Some(token) = spec.credentials.refresh_token() {
                        chain.refresh_token = token.clone();
                        chain.rotated = false;
                    }
                }
            }
        }
        let (client_id, client_secret, refresh_token, api_key) = match &spec.credentials {
            Credentials::Oidc { client_id, client_secret, .. } => (
                Some(client_id.expose().to_owned()),
                Some(client_secret.expose().to_owned()),
                Some(chain.refresh_token.expose().to_owned()),
                None,
            ),
            Credentials::Social { .. } => (None, None, Some(chain.refresh_token.expose().to_owned()), None),
            Credentials::ApiKey { key } => (None, None, None, Some(key.expose().to_owned())),
        };
        accounts.push(ExportedAccount {
            id: spec.id.to_string(),
            label: spec.label.clone(),
            kind: spec.kind().as_str().to_owned(),
            client_id,
            client_secret,
            rotated: refresh_token.is_some() && chain.rotated,
            refresh_token,
            api_key,
            profile_arn: spec.profile_arn.clone(),
            region: spec.region.clone(),
            auth_region: spec.auth_region.clone(),
            enabled: spec.enabled,
            weight: spec.weight.get(),
            max_concurrency: spec.max_concurrency.get(),
            rpm: spec.rpm.map(|r| r.get()),
            proxy: spec.proxy.as_ref().map(proxy_url),
        });
    }
    Ok(Export {
        accounts_file: shared.app.config.accounts.file.display().to_string(),
        exported_at: unix(Some(SystemTime::now())).unwrap_or(0),
        accounts,
    })
}

/// What the control API reads and acts on.
pub struct Context {
    pub app: Arc<App>,
    pub reloader: Arc<Reloader>,
    /// The daemon's listeners, as URLs.
    pub listeners: Vec<String>,
    pub started_at: SystemTime,
    /// With `[cluster]`: the store that knows the nodes and leases.
    pub cluster: Option<crate::store::postgres::PgStore>,
    /// The control API's connections and the work they fan out ([`serve`] stops them).
    pub tasks: crate::shutdown::Tasks,
}

/// How long a control request in flight at shutdown may take before it is cancelled (a
/// refresh it started goes on in the pool).
const STOP_GRACE: Duration = Duration::from_secs(2);

/// The control API's answers: a whole JSON body.
type Body = Full<Bytes>;

/// Serves the control API until the stop; then closes idle connections, gives requests in
/// flight `STOP_GRACE` (2 s) and cancels what is left, so that when it returns no task of its
/// holds the daemon's state.
pub async fn serve(
    shared: Arc<Context>,
    listener: std::os::unix::net::UnixListener,
    mut stop: crate::shutdown::Shutdown,
) {
    if listener.set_nonblocking(true).is_err() {
        return;
    }
    let Ok(listener) = UnixListener::from_std(listener) else { return };
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.recv() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let peer = match stream.peer_cred() {
            Ok(c) => Peer { uid: c.uid(), gid: c.gid(), pid: c.pid() },
            Err(_) => continue,
        };
        let tasks = shared.tasks.clone();
        let shared = shared.clone();
        let svc = service_fn(move |req| {
            let shared = shared.clone();
            async move { Ok::<_, Infallible>(handle(&shared, peer, req).await) }
        });
        let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
        let conn = graceful.watch(conn);
        tasks.spawn(async move {
            let _ = conn.await;
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(STOP_GRACE, graceful.shutdown()).await;
    let cancelled = shared.tasks.stop(Duration::ZERO).await;
    if cancelled > 0 {
        tracing::warn!(cancelled, "control requests still running at shutdown were cancelled");
    }
}

fn json<T: serde::Serialize>(status: StatusCode, v: &T) -> Response<Body> {
    let mut r =
        Response::new(Full::new(Bytes::from(serde_json::to_vec_pretty(v).expect("wire types serialise"))));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    r
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response<Body> {
    json(status, &ErrorBody { error: msg.into() })
}

/// The wire form of a reload's outcome.
fn reload_result(o: crate::reload::Outcome) -> ReloadResult {
    ReloadResult { ok: o.ok, changes: o.changes, errors: o.errors, warnings: o.warnings }
}

fn unix(t: Option<SystemTime>) -> Option<u64> {
    t.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok()).map(|d| d.as_secs())
}

pub fn account_info(v: &AccountView) -> AccountInfo {
    AccountInfo {
        id: v.id.clone(),
        label: v.label.clone(),
        enabled: v.enabled,
        state: if v.enabled { v.state.state.as_str().to_string() } else { "disabled".into() },
        since: unix(v.state.since),
        until: unix(v.state.until),
        reason: v
            .state
            .reason
            .clone()
            .or_else(|| (!v.enabled).then(|| "enabled = false in the accounts file".into())),
        token_expires_at: unix(v.access_expires_at),
        token_fingerprint: v.access_fingerprint.clone(),
        in_flight: v.in_flight,
        max_concurrency: v.max_concurrency,
        weight: v.weight,
        requests: v.counters.requests,
        failures: v.counters.failures,
        tokens_in: v.counters.tokens_in,
        tokens_out: v.counters.tokens_out,
        credits: v.counters.credits,
        last_used: unix(v.counters.last_used),
        last_error: v.state.last_error.clone(),
        last_error_at: unix(v.state.last_error_at),
        tokens_unsaved: v.tokens_unsaved,
        kind: v.kind.as_str().to_owned(),
        endpoint: v.endpoint.map(|r| r.as_str().to_owned()),
        profile_arn: v.profile_arn.clone(),
        requests_last_minute: v.requests_last_minute,
        rpm: v.rpm,
        models: v.models.clone(),
        catalog_fetched_at: unix(v.catalog_fetched_at),
        catalog_error: v.catalog_error.clone(),
        last_model: v.last_model.clone(),
    }
}

pub fn status(shared: &Context) -> Status {
    let s = shared.app.pool.summary();
    let info = shared.reloader.info();
    Status {
        server_version: env!("CARGO_PKG_VERSION").into(),
        api_version: API_VERSION,
        pid: std::process::id(),
        started_at: unix(Some(shared.started_at)).unwrap_or(0),
        uptime_secs: shared.app.started.elapsed().as_secs(),
        listeners: shared.listeners.clone(),
        config: ConfigState {
            config_file: shared.reloader.config_path().display().to_string(),
            accounts_file: shared.app.config.accounts.file.display().to_string(),
            loaded_at: unix(Some(info.loaded_at)).unwrap_or(0),
            last_reload_error: info.last_error.clone(),
            last_reload_at: unix(info.last_attempt),
        },
        pool: PoolState {
            total: s.total,
            active: s.active,
            cooling: s.cooling,
            quota: s.quota,
            suspended: s.suspended,
            invalid: s.invalid,
            disabled: s.disabled,
            in_flight: s.in_flight,
            unsaved: s.unsaved,
        },
        streams_in_flight: shared.app.metrics.streams_in_flight(),
        accounts: shared.app.pool.accounts().iter().map(|a| account_info(&a.view())).collect(),
        persistence_problem: shared.app.pool.persistence_problem(),
        cluster: None,
    }
}

/// The nodes and leases in PostgreSQL, with `[cluster]`.
async fn cluster_state(shared: &Context) -> Option<ClusterState> {
    let store = shared.cluster.as_ref()?;
    let node_id = shared.app.config.cluster.as_ref().map(|c| c.node_id.clone()).unwrap_or_default();
    Some(match store.cluster_view().await {
        Ok((nodes, leases)) => ClusterState {
            node_id,
            nodes: nodes
                .into_iter()
                .map(|n| NodeState {
                    node_id: n.node_id,
                    heartbeat_age_ms: n.heartbeat_age_ms,
                    alive: n.alive,
                    status: n.status,
                    leases: n.leases,
                })
                .collect(),
            leases: leases
                .into_iter()
                .map(|l| LeaseState {
                    account: l.account,
                    node_id: l.node_id,
                    epoch: l.epoch,
                    expires_in_ms: l.expires_in_ms,
                })
                .collect(),
            error: None,
        },
        Err(e) => ClusterState { node_id, nodes: Vec::new(), leases: Vec::new(), error: Some(e.to_string()) },
    })
}

/// The state an action reports: `disabled` when the accounts file says `enabled = false` (as in
/// [`account_info`]), else the pool's state.
fn state_of(a: &Account) -> String {
    if a.enabled() { a.state().state.as_str().into() } else { "disabled".into() }
}

fn expires_in(a: &Account) -> String {
    match a.tokens.current_access() {
        Some(acc) => {
            let secs = acc.expires_at.duration_since(SystemTime::now()).unwrap_or_default().as_secs();
            format!("token refreshed, expires in {} min", secs / 60)
        }
        None => "token refreshed".into(),
    }
}

/// Refreshes one account's token now.
pub async fn refresh_one(shared: &Context, a: &Arc<Account>) -> ActionResult {
    let r = shared.app.pool.refresh_now(a).await;
    let (ok, mut message) = match r {
        Ok(_) => (true, expires_in(a)),
        Err(e) => (false, e.to_string()),
    };
    if ok {
        // The model catalog is fetched again too.
        match shared.app.pool.fetch_catalog(a).await {
            Ok(n) => message.push_str(&format!("; catalog: {n} models")),
            Err(e) => message.push_str(&format!("; {e} (the last good catalog stays)")),
        }
    }
    ActionResult { id: a.id.to_string(), ok, message, state: state_of(a), queued: false }
}

/// A real minimal upstream call on the account, through the relay: classified like live
/// traffic (capacity errors included), the verdict recorded unless an operator disabled it.
pub async fn check_one(shared: &Context, a: &Arc<Account>) -> ActionResult {
    use crate::upstream::types::*;
    let q_model =
        shared.app.models.resolve("claude-sonnet-4-5").unwrap_or_else(|_| "claude-sonnet-4.5".into());
    let req = GenerateRequest {
        conversation_state: ConversationState {
            conversation_id: crate::ids::uuid_v4(),
            chat_trigger_type: ChatTriggerType::Manual,
            history: vec![],
            current_message: CurrentMessage {
                user_input_message: UserInputMessage {
                    content: "Reply with the single word: ok".into(),
                    model_id: Some(q_model),
                    origin: Some("AI_EDITOR".into()),
                    ..Default::default()
                },
            },
        },
        profile_arn: None,
        additional_model_request_fields: None,
    };
    let outcome = shared.app.relay.check(a, &req).await;
    let disabled = a.state().state == crate::accounts::State::Disabled;
    let (ok, mut message) = match &outcome {
        Ok(()) => (true, "healthy".to_string()),
        Err(e) => (false, e.to_string()),
    };
    if disabled {
        message.push_str(" (stays disabled until amqctl enable)");
    }
    ActionResult { id: a.id.to_string(), ok, message, state: state_of(a), queued: false }
}

/// `action` (`refresh`, `check`, `enable`, `disable`) on one account; `None` for an unknown
/// action. Under `[cluster]`, refresh, enable and disable of an account another node holds are
/// queued in PostgreSQL and its holder runs them at its next heartbeat (`queued` in the answer).
async fn act(shared: &Arc<Context>, a: &Arc<Account>, action: &str) -> Option<ActionResult> {
    let id = a.id.to_string();
    if let Some(store) = &shared.cluster
        && !a.held_for(0)
        && matches!(action, "refresh" | "enable" | "disable")
    {
        return Some(match store.queue_command(&id, action).await {
            Ok(_) => ActionResult {
                id,
                ok: true,
                message: format!("{action} queued for the node that holds it"),
                state: state_of(a),
                queued: true,
            },
            Err(e) => ActionResult {
                id,
                ok: false,
                message: format!("cannot queue {action} for the node that holds it: {e}"),
                state: state_of(a),
                queued: false,
            },
        });
    }
    let done = |ok: bool, message: &str| ActionResult {
        id: id.clone(),
        ok,
        message: message.into(),
        state: state_of(a),
        queued: false,
    };
    Some(match action {
        "refresh" => refresh_one(shared, a).await,
        "check" => check_one(shared, a).await,
        "enable" if !a.enabled() => {
            done(false, "the accounts file says enabled = false: change it there, then amqctl reload")
        }
        "enable" => {
            shared.app.pool.enable(&id);
            done(true, "enabled")
        }
        "disable" => {
            shared.app.pool.disable(&id);
            done(true, "disabled")
        }
        _ => return None,
    })
}

/// Runs `f` over accounts with at most `limit` at once, results in account order.
async fn for_all<F, Fut>(shared: &Arc<Context>, limit: usize, f: F) -> Vec<ActionResult>
where
    F: Fn(Arc<Context>, Arc<Account>) -> Fut,
    Fut: std::future::Future<Output = ActionResult> + Send + 'static,
{
    let sem = Arc::new(tokio::sync::Semaphore::new(limit));
    let mut tasks = Vec::new();
    for a in shared.app.pool.accounts() {
        let fut = f(shared.clone(), a);
        let sem = sem.clone();
        // In the control API's task set (shutdown waits for them); aborted when the request
        // that started them goes away.
        tasks.push(tokio_util::task::AbortOnDropHandle::new(shared.tasks.spawn(async move {
            let _p = sem.acquire().await;
            fut.await
        })));
    }
    let mut out = Vec::new();
    for t in tasks {
        if let Ok(r) = t.await {
            out.push(r);
        }
    }
    out
}

async fn handle(shared: &Arc<Context>, peer: Peer, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().trim_end_matches('/').to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    if !allowed(&peer) {
        tracing::warn!(uid = peer.uid, pid = peer.pid, %path, "control socket: caller refused (not root, not the daemon's user, not in its group)");
        return error(
            StatusCode::FORBIDDEN,
            "permission denied: add yourself to the daemon's group (amq2api)",
        );
    }
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    if method == Method::POST {
        tracing::info!(uid = peer.uid, pid = peer.pid, %path, "control: {path}");
    }
    let find = |id: &str| shared.app.pool.get(id);
    let not_found = |id: &str| error(StatusCode::NOT_FOUND, format!("no account {id:?}"));
    match (&method, segs.as_slice()) {
        (&Method::GET, ["v1", "export"]) => {
            if !export_allowed(&peer) {
                tracing::warn!(
                    uid = peer.uid,
                    pid = peer.pid,
                    "control: export refused (not root, not the daemon's user)"
                );
                return error(
                    StatusCode::FORBIDDEN,
                    "permission denied: export hands out every account's secrets and is for root only (sudo amqctl export)",
                );
            }
            let e = match export(shared).await {
                Ok(e) => e,
                Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, &e),
            };
            let rotated = e.accounts.iter().filter(|a| a.rotated).count();
            tracing::warn!(
                uid = peer.uid,
                pid = peer.pid,
                accounts = e.accounts.len(),
                rotated,
                "control: export: the credentials of {} accounts handed out",
                e.accounts.len()
            );
            json(StatusCode::OK, &e)
        }
        (&Method::GET, ["v1", "status"]) => {
            let mut s = status(shared);
            s.cluster = cluster_state(shared).await;
            json(StatusCode::OK, &s)
        }
        (&Method::GET, ["v1", "accounts"]) => {
            let list: Vec<AccountInfo> =
                shared.app.pool.accounts().iter().map(|a| account_info(&a.view())).collect();
            json(StatusCode::OK, &list)
        }
        (&Method::GET, ["v1", "accounts", id]) => match find(id) {
            Some(a) => json(StatusCode::OK, &account_info(&a.view())),
            None => not_found(id),
        },
        (&Method::POST, ["v1", "accounts", id, action]) => {
            let Some(a) = find(id) else { return not_found(id) };
            let Some(r) = act(shared, &a, action).await else {
                return error(StatusCode::NOT_FOUND, format!("unknown action {action:?}"));
            };
            tracing::info!(uid = peer.uid, pid = peer.pid, account = %id, action = %action, ok = r.ok, queued = r.queued, result = %r.message, "control action");
            json(StatusCode::OK, &r)
        }
        (&Method::POST, ["v1", "refresh"]) => {
            let rs = for_all(shared, 8, |s, a| async move {
                act(&s, &a, "refresh").await.expect("refresh is an action")
            })
            .await;
            json(StatusCode::OK, &rs)
        }
        (&Method::POST, ["v1", "check"]) => {
            let rs = for_all(shared, 4, |s, a| async move { check_one(&s, &a).await }).await;
            json(StatusCode::OK, &rs)
        }
        (&Method::GET, ["v1", "keys"]) => {
            let keys: Vec<KeyView> = shared.app.keys.view().into_iter().map(KeyView::from).collect();
            json(StatusCode::OK, &keys)
        }
        (&Method::GET, ["v1", "usage"]) => {
            let param = |k: &str| {
                query
                    .split('&')
                    .filter_map(|kv| kv.split_once('='))
                    .find(|(key, _)| *key == k)
                    .map(|(_, v)| v)
            };
            let days: i64 = match param("days").map(str::parse) {
                None => 7,
                Some(Ok(n)) if (1..=36_500).contains(&n) => n,
                Some(_) => {
                    return error(StatusCode::BAD_REQUEST, "days must be a whole number from 1 to 36500");
                }
            };
            let by = param("by").unwrap_or("key").to_string();
            if !["key", "account", "model"].contains(&by.as_str()) {
                return error(StatusCode::BAD_REQUEST, "by must be key, account or model");
            }
            let from = crate::keys::day_number(SystemTime::now()) - (days - 1);
            let usage = shared.app.keys.usage.clone();
            match crate::reload::off_runtime(move || usage.rows_since(from)).await {
                Ok(rows) => {
                    let rows: Vec<UsageLine> =
                        rows.into_iter().filter(|r| r.by == by).map(UsageLine::from).collect();
                    json(StatusCode::OK, &rows)
                }
                Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, format!("usage cannot be read: {e}")),
            }
        }
        (&Method::POST, ["v1", "reload"]) => {
            let r = reload_result(shared.reloader.all().await);
            tracing::info!(uid = peer.uid, pid = peer.pid, ok = r.ok, changes = %r.changes, "control: reload");
            json(StatusCode::OK, &r)
        }
        (_, ["v1", ..]) => error(StatusCode::NOT_FOUND, format!("no route {method} {path}")),
        _ => error(StatusCode::NOT_FOUND, format!("no route {method} {path} (the API lives under /v1/)")),
    }
}

#[cfg(test)]
mod socket_tests {
    use super::*;

    /// A stale socket (nobody listens) is replaced, a live one refused; at exit only this
    /// daemon's own socket is removed, not one another daemon bound at the same path since.
    #[test]
    fn the_control_socket_is_replaced_only_when_stale_and_removed_only_when_ours() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let first = bind(&path, 0o660).unwrap();
        assert!(matches!(bind(&path, 0o660), Err(ControlError::InUse(_))));
        let first_id = socket_id(&path);
        drop(first);
        // Past the file system's timestamp tick (a few ms): the new socket may get the same
        // inode, and its change time tells it apart.
        std::thread::sleep(std::time::Duration::from_millis(20));
        // Stale: replaced.
        let second = bind(&path, 0o660).unwrap();
        let second_id = socket_id(&path);
        assert_ne!(first_id, second_id);
        unlink_if_ours(&path, first_id);
        assert!(path.exists(), "another daemon's socket was removed");
        drop(second);
        unlink_if_ours(&path, second_id);
        assert!(!path.exists());
    }
}
