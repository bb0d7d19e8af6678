//! The HTTP side: one hyper server (HTTP/1.1 and cleartext HTTP/2) on the emulator's listener,
//! routing by path to the token endpoints and the endpoint roles, the response body type, and
//! closing a connection abruptly on cue.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinSet;

use super::state::Shared;
use super::{Role, assistant, device, listing, oidc, social, wire};

/// Largest `CreateToken` body read.
const MAX_TOKEN_BODY: usize = 64 * 1024;

/// A response body: a whole buffer, or frames arriving on a channel as the writer makes them.
pub(super) enum Body {
    Full(Option<Bytes>),
    Channel(mpsc::Receiver<Bytes>),
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Body::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Body::Channel(rx) => rx.poll_recv(cx).map(|chunk| chunk.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Body::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            Body::Full(None) => SizeHint::with_exact(0),
            Body::Channel(_) => SizeHint::default(),
        }
    }
}

/// A JSON response with `Content-Type` and `x-amzn-RequestId`.
pub(super) fn json_response(
    status: StatusCode,
    content_type: &'static str,
    body: &Value,
    request_id: &str,
) -> Response<Body> {
    let mut response = Response::new(Body::Full(Some(Bytes::from(body.to_string()))));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Ok(id) = HeaderValue::from_str(request_id) {
        headers.insert("x-amzn-RequestId", id);
    }
    response
}

/// Per-connection control: lets a request close its whole connection abruptly.
#[derive(Default)]
pub(super) struct ConnCtl {
    kill: Notify,
    /// The installation (machine id) the connection's first call named, and whether another
    /// has been seen on it since.
    installation: std::sync::Mutex<(Option<String>, bool)>,
}

impl ConnCtl {
    /// Closes the connection at once (a TCP reset), whatever is in flight on it.
    pub fn kill(&self) {
        self.kill.notify_one();
    }

    /// Notes the installation a call on this connection names; true the first time a second
    /// one is seen.
    fn note_installation(&self, id: &str) -> bool {
        let mut seen = self.installation.lock().unwrap_or_else(|e| e.into_inner());
        match &seen.0 {
            None => {
                seen.0 = Some(id.to_owned());
                false
            }
            Some(first) if first != id && !seen.1 => {
                seen.1 = true;
                true
            }
            Some(_) => false,
        }
    }
}

/// The machine id a user agent names (`KiroIDE-<version>-<64 hex digits>`), if any.
pub fn installation_of(user_agent: &str) -> Option<&str> {
    let at = user_agent.find("KiroIDE-")?;
    let rest = &user_agent[at + "KiroIDE-".len()..];
    let id = rest.split_whitespace().next()?.rsplit('-').next()?;
    (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
}

/// Serves `listener` until `shutdown` turns true (or its sender goes), then closes every
/// connection.
pub(super) async fn serve(listener: TcpListener, shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let mut connections = JoinSet::new();
    let for_connections = shutdown.clone();
    loop {
        tokio::select! {
            () = stopped(&mut shutdown) => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    connections.spawn(connection(stream, shared.clone(), for_connections.clone()));
                }
                Err(e) => {
                    // Out of descriptors and the like: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "emulator: accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    connections.shutdown().await;
}

/// Completes once the shutdown flag is set or its sender is gone.
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

async fn connection(stream: TcpStream, shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let _ = stream.set_nodelay(true);
    // A second descriptor of the socket, to set SO_LINGER 0 before an abrupt close (a reset).
    let (stream, twin) = match twin(stream) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::warn!(error = %e, "emulator: cannot set up a connection");
            return;
        }
    };
    let ctl = Arc::new(ConnCtl::default());
    let service_ctl = ctl.clone();
    let service = service_fn(move |req| {
        let shared = shared.clone();
        let ctl = service_ctl.clone();
        async move { Ok::<_, Infallible>(route(req, shared, ctl).await) }
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "emulator: connection ended with an error");
            }
        }
        () = ctl.kill.notified() => {
            tracing::debug!("emulator: resetting a connection as scripted");
            let reset = nix::libc::linger { l_onoff: 1, l_linger: 0 };
            if let Err(e) = nix::sys::socket::setsockopt(&twin, nix::sys::socket::sockopt::Linger, &reset) {
                tracing::debug!(error = %e, "emulator: cannot set SO_LINGER; closing without a reset");
            }
        }
        () = stopped(&mut shutdown) => {}
    }
}

/// The stream and a duplicate of its descriptor.
fn twin(stream: TcpStream) -> std::io::Result<(TcpStream, std::net::TcpStream)> {
    let std_stream = stream.into_std()?;
    let twin = std_stream.try_clone()?;
    Ok((TcpStream::from_std(std_stream)?, twin))
}

/// The endpoint role a path belongs to.
fn role_of(path: &str) -> Option<Role> {
    match path {
        "/" | "/ListAvailableModels" => Some(Role::AmazonQ),
        "/runtime" | "/runtime/" => Some(Role::Runtime),
        "/management" | "/management/" => Some(Role::Management),
        _ => None,
    }
}

async fn route(req: Request<Incoming>, shared: Arc<Shared>, ctl: Arc<ConnCtl>) -> Response<Body> {
    let request_id = shared.ids().uuid();
    let ua = req.headers().get(hyper::header::USER_AGENT).and_then(|v| v.to_str().ok());
    if let Some(id) = ua.and_then(installation_of)
        && ctl.note_installation(id)
    {
        shared.count_shared_connection();
    }
    let path = req.uri().path().to_owned();
    if let Some(role) = role_of(&path)
        && !shared.role_enabled(role)
    {
        tracing::debug!(?role, path, "emulator: role switched off");
        return not_found(&request_id);
    }
    match (req.method(), path.as_str()) {
        (&Method::POST, "/token") => {
            let (parts, body) = req.into_parts();
            match read_body(body, MAX_TOKEN_BODY).await {
                Ok(body) => {
                    let client_id = serde_json::from_slice::<serde_json::Value>(&body)
                        .ok()
                        .and_then(|v| v.get("clientId").and_then(|c| c.as_str()).map(str::to_owned));
                    let _call = client_id.as_deref().map(|c| shared.refresh_call(c));
                    let answer = oidc::create_token(&shared, &parts.headers, &body, &request_id);
                    token_delay(&shared).await;
                    answer
                }
                Err(_) => {
                    shared.count_refresh_failure();
                    let body = json!({ "error": "invalid_request", "error_description": "Unreadable request body." });
                    json_response(StatusCode::BAD_REQUEST, "application/json", &body, &request_id)
                }
            }
        }
        (&Method::POST, path @ ("/client/register" | "/device_authorization")) => {
            let register = path == "/client/register";
            match read_body(req.into_body(), MAX_TOKEN_BODY).await {
                Ok(body) if register => device::register_client(&shared, &body, &request_id),
                Ok(body) => device::start_device_authorization(&shared, &body, &request_id),
                Err(_) => {
                    let body = json!({ "error": "invalid_request", "error_description": "Unreadable request body." });
                    json_response(StatusCode::BAD_REQUEST, "application/json", &body, &request_id)
                }
            }
        }
        (&Method::POST, "/refreshToken") => {
            let (parts, body) = req.into_parts();
            match read_body(body, MAX_TOKEN_BODY).await {
                Ok(body) => {
                    let answer = social::refresh(&shared, &parts.headers, &body, &request_id);
                    token_delay(&shared).await;
                    answer
                }
                Err(_) => {
                    shared.count_refresh_failure();
                    social::error(
                        StatusCode::BAD_REQUEST,
                        "invalid_request",
                        "Unreadable request body.",
                        &request_id,
                    )
                }
            }
        }
        (&Method::POST, "/") => {
            let target = req.headers().get("x-amz-target").and_then(|v| v.to_str().ok());
            if target == Some(listing::PROFILES_TARGET) {
                listing::profiles(req, &shared, &request_id).await
            } else {
                assistant::handle(req, Role::AmazonQ, shared, ctl, request_id).await
            }
        }
        (&Method::GET, "/ListAvailableModels") => listing::models_get(&req, &shared, &request_id),
        (&Method::POST, "/runtime" | "/runtime/") => {
            assistant::handle(req, Role::Runtime, shared, ctl, request_id).await
        }
        (&Method::POST, "/management" | "/management/") => {
            listing::models_post(req, &shared, &request_id).await
        }
        (method, path) => {
            tracing::debug!(%method, path, "emulator: no such route");
            not_found(&request_id)
        }
    }
}

/// The pause of [`EmulatorOptions::token_delay`](super::EmulatorOptions) before a refresh answer.
async fn token_delay(shared: &Shared) {
    let delay = shared.opts.token_delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
}

/// 404 `UnknownOperationException`: no such path, or a role switched off.
fn not_found(request_id: &str) -> Response<Body> {
    let body = json!({ "__type": "com.amazon.coral.service#UnknownOperationException", "message": null });
    json_response(StatusCode::NOT_FOUND, wire::AMZ_JSON, &body, request_id)
}

/// Why a request body could not be read.
#[derive(Debug)]
pub(super) enum ReadError {
    TooLarge,
    Io,
}

/// Reads a whole request body of at most `limit` bytes.
pub(super) async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, ReadError> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ReadError::TooLarge),
        Err(_) => Err(ReadError::Io),
    }
}
