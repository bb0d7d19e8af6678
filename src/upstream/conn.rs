//! HTTP/1.1 connections to Amazon Q and SSO OIDC that the calling task drives itself, kept
//! alive in a small pool: the one way the daemon speaks HTTP upstream.
//!
//! hyper's pooled client runs each connection in a task of its own, which hands a response body
//! over one chunk at a time: every Amazon Q event then cost a hand-over between two tasks, and
//! events that arrived together still left one by one. Here the connection's future lives with
//! the response ([`Driven`]) and is polled by whoever reads the body, so everything a read
//! brought is decoded in one go, in one task.
//!
//! An idle connection is not polled: on checkout it is polled once, and one that has closed
//! meanwhile is dropped. A request is sent at most once: it is tried again on a new connection
//! only when hyper gives it back unsent (a reused connection found closed before the first byte
//! was written). A request that may have left — written, then the connection failed before an
//! answer — is a failure of this attempt, never sent again here (it could run twice upstream: a
//! double charge, a tool call run twice, a refresh token rotated twice); the caller decides
//! what comes next. Connections speak HTTP/1.1 only (ALPN `http/1.1` over TLS).
//!
//! A request may name an egress proxy (the account's `proxy`): its connection is opened through
//! the proxy ([`super::tunnel`]) and pooled under the proxy too, so that a connection opened
//! through one proxy — or none — never carries a request meant for another.

use super::tunnel::{self, TunnelError};
use crate::config::{Proxy, ProxyScheme};
use crate::selfwake::SelfWakes;
use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body_util::Full;
use hyper::body::{Body as _, Frame, Incoming};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// Idle connections kept per endpoint and proxy.
const MAX_IDLE: usize = 256;
/// An idle connection older than this is closed rather than reused.
const IDLE_FOR: Duration = Duration::from_secs(90);

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

type Connection = http1::Connection<TokioIo<Box<dyn Io>>, Full<Bytes>>;

/// What a connection is for: the endpoint and the proxy it goes through. Connections are
/// shared only between requests with equal keys; proxies are equal when their scheme, address
/// and credentials are.
#[derive(Clone, PartialEq, Eq)]
struct Key {
    tls: bool,
    host: String,
    port: u16,
    proxy: Option<Proxy>,
}

/// Equal keys hash alike: the password is left out (equal proxies have equal passwords too).
impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (self.tls, &self.host, self.port).hash(state);
        if let Some(p) = &self.proxy {
            let scheme = match p.scheme {
                ProxyScheme::Http => 0u8,
                ProxyScheme::Socks5 { remote_dns: false } => 1,
                ProxyScheme::Socks5 { remote_dns: true } => 2,
            };
            (scheme, &p.host, p.port, p.auth.as_ref().map(|(user, _)| user)).hash(state);
        }
    }
}

impl Key {
    /// The endpoint, and the proxy when there is one (its password redacted), for errors.
    fn describe(&self) -> String {
        match &self.proxy {
            None => format!("{}:{}", self.host, self.port),
            Some(p) => format!("{}:{} through proxy {p}", self.host, self.port),
        }
    }
}

/// One connection: the handle requests go through and the future that runs it.
struct Conn {
    sender: http1::SendRequest<Full<Bytes>>,
    /// The connection's future while it runs; dropped once it has ended, which settles every
    /// request still waiting on it (a request not yet taken for writing is given back).
    conn: Option<Pin<Box<Connection>>>,
}

impl Conn {
    /// Polls the connection; false once it has ended.
    fn poll_alive(&mut self, cx: &mut Context<'_>) -> bool {
        if let Some(conn) = self.conn.as_mut() {
            if conn.as_mut().poll(cx).is_ready() {
                self.conn = None;
            }
        }
        self.conn.is_some()
    }
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// The pool of idle connections, by endpoint and proxy.
pub struct Pool {
    tls: Arc<rustls::ClientConfig>,
    connect_timeout: Duration,
    idle: Mutex<HashMap<Key, Vec<Idle>>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("unsupported endpoint {0}")]
    Endpoint(String),
    #[error("connecting to {0} timed out")]
    ConnectTimeout(String),
    #[error("connecting to {host}: {reason}")]
    Connect { host: String, reason: String },
    /// No tunnel through the account's proxy (`proxy` is its URL, password redacted).
    #[error("connecting to {target} through proxy {proxy}: {error}")]
    Proxy { target: String, proxy: String, error: TunnelError },
    #[error("{0}")]
    Http(String),
}

/// An error with its sources, `outer: inner: …`.
pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

impl Pool {
    /// `tls` is used with its ALPN replaced by `http/1.1`.
    pub fn new(tls: &rustls::ClientConfig, connect_timeout: Duration) -> Arc<Self> {
        let mut tls = tls.clone();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(Pool { tls: Arc::new(tls), connect_timeout, idle: Mutex::new(HashMap::new()) })
    }

    fn key(uri: &Uri, proxy: Option<&Proxy>) -> Result<Key, ConnError> {
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(ConnError::Endpoint(uri.to_string())),
        };
        let host = uri.host().ok_or_else(|| ConnError::Endpoint(uri.to_string()))?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        Ok(Key { tls, host, port, proxy: proxy.cloned() })
    }

    /// An idle connection that is still open, if any.
    async fn checkout(&self, key: &Key) -> Option<Conn> {
        loop {
            let idle = {
                let mut map = self.idle.lock().unwrap_or_else(|e| e.into_inner());
                map.get_mut(key).and_then(Vec::pop)?
            };
            if idle.since.elapsed() > IDLE_FOR {
                continue;
            }
            let mut conn = idle.conn;
            let usable =
                std::future::poll_fn(|cx| Poll::Ready(conn.poll_alive(cx))).await && conn.sender.is_ready();
            if usable {
                return Some(conn);
            }
        }
    }

    fn checkin(&self, key: Key, mut conn: Conn) {
        // A connection goes back only if it can take another request at once.
        let ready = can_take_request(&mut conn);
        if !ready {
            return;
        }
        let mut map = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = map.entry(key).or_default();
        list.retain(|i| i.since.elapsed() <= IDLE_FOR);
        if list.len() < MAX_IDLE {
            list.push(Idle { conn, since: Instant::now() });
        }
    }

    /// A new connection for `key`: TCP (through the proxy, if any), TLS, the HTTP/1.1
    /// handshake, all within the connect timeout.
    async fn connect(&self, key: &Key) -> Result<Conn, ConnError> {
        // Errors name the endpoint, and the proxy when there is one.
        let host = if key.proxy.is_some() { key.describe() } else { key.host.clone() };
        let connect = async {
            let tcp = match &key.proxy {
                None => TcpStream::connect((key.host.as_str(), key.port))
                    .await
                    .map_err(|e| ConnError::Connect { host: host.clone(), reason: e.to_string() })?,
                Some(proxy) => {
                    tunnel::open(proxy, &key.host, key.port).await.map_err(|error| ConnError::Proxy {
                        target: format!("{}:{}", key.host, key.port),
                        proxy: proxy.to_string(),
                        error,
                    })?
                }
            };
            let _ = tcp.set_nodelay(true);
            let _ = nix::sys::socket::setsockopt(&tcp, nix::sys::socket::sockopt::KeepAlive, &true);
            let io: Box<dyn Io> = if key.tls {
                let name = rustls::pki_types::ServerName::try_from(key.host.clone())
                    .map_err(|e| ConnError::Connect { host: host.clone(), reason: e.to_string() })?;
                let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| ConnError::Connect { host: host.clone(), reason: e.to_string() })?;
                Box::new(tls)
            } else {
                Box::new(tcp)
            };
            let (sender, conn) =
                http1::handshake(TokioIo::new(io)).await.map_err(|e| ConnError::Http(error_chain(&e)))?;
            Ok(Conn { sender, conn: Some(Box::pin(conn)) })
        };
        tokio::time::timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| ConnError::ConnectTimeout(key.describe()))?
    }

    /// Sends `req`, through `proxy` when given, and returns the answer's head with the body
    /// still to come; the connection goes with it.
    pub async fn send(
        self: &Arc<Self>,
        req: Request<Full<Bytes>>,
        proxy: Option<&Proxy>,
    ) -> Result<Driven, ConnError> {
        let key = Self::key(req.uri(), proxy)?;
        // The request as sent on the wire: origin-form path, with a Host header.
        let (mut parts, body) = req.into_parts();
        if !parts.headers.contains_key(http::header::HOST) {
            let host = match parts.uri.port() {
                Some(p) => format!("{}:{}", key.host, p),
                None => key.host.clone(),
            };
            if let Ok(v) = http::HeaderValue::from_str(&host) {
                parts.headers.insert(http::header::HOST, v);
            }
        }
        parts.uri =
            parts.uri.path_and_query().map(|pq| pq.as_str()).unwrap_or("/").parse().unwrap_or_default();
        let mut req = Request::from_parts(parts, body);
        let mut reused = self.checkout(&key).await;
        loop {
            let was_reused = reused.is_some();
            let mut conn = match reused.take() {
                Some(c) => c,
                None => self.connect(&key).await?,
            };
            match exchange(&mut conn, req).await {
                Ok(resp) => {
                    return Ok(Driven { resp: Some(resp), conn: Some(conn), pool: self.clone(), key });
                }
                Err(mut e) => match e.take_message() {
                    // Given back unsent: the reused connection had closed while idle. Once
                    // more, on a new connection.
                    Some(unsent) if was_reused => req = unsent,
                    // It may have left (or a new connection failed at once): not sent again.
                    _ => return Err(ConnError::Http(error_chain(e.error()))),
                },
            }
        }
    }
}

/// Whether the connection can take a request now (polled once, without waiting).
fn can_take_request(conn: &mut Conn) -> bool {
    let waker = std::task::Waker::noop();
    let mut cx = Context::from_waker(waker);
    conn.poll_alive(&mut cx) && conn.sender.is_ready()
}

type SendError = hyper::client::conn::TrySendError<Request<Full<Bytes>>>;

/// Sends one request on `conn`, driving the connection until the answer's head arrives. On
/// failure the error holds the request if, and only if, none of it was written
/// ([`hyper::client::conn::TrySendError::take_message`]).
async fn exchange(conn: &mut Conn, req: Request<Full<Bytes>>) -> Result<Response<Incoming>, SendError> {
    let mut answer = std::pin::pin!(conn.sender.try_send_request(req));
    let running = &mut conn.conn;
    // The request and the answer are handed between the sender and the connection with
    // wakes: turns of this poll (see `DrivenBody::wakes`).
    let wakes = SelfWakes::new();
    std::future::poll_fn(|cx| {
        wakes.poll(cx, |cx| {
            if let Poll::Ready(r) = answer.as_mut().poll(cx) {
                return Poll::Ready(r);
            }
            if let Some(c) = running.as_mut() {
                if c.as_mut().poll(cx).is_ready() {
                    // The connection ended first. Dropping it settles the request: given back if
                    // it was still queued, else failed with the connection's error.
                    *running = None;
                    return answer.as_mut().poll(cx);
                }
            }
            Poll::Pending
        })
    })
    .await
}

/// An answer and the connection it arrives on: reading the body drives the connection, and a
/// body read to its end gives the connection back to the pool.
pub struct Driven {
    resp: Option<Response<Incoming>>,
    conn: Option<Conn>,
    pool: Arc<Pool>,
    key: Key,
}

impl Driven {
    pub fn status(&self) -> http::StatusCode {
        self.resp.as_ref().map(|r| r.status()).unwrap_or_default()
    }

    pub fn headers(&self) -> &http::HeaderMap {
        self.resp.as_ref().expect("the head is taken only with the body").headers()
    }

    /// The body, read as a [`hyper::body::Body`] or through [`DrivenBody::frame`].
    pub fn into_body(mut self) -> DrivenBody {
        let body = self.resp.take().expect("the body is taken once").into_body();
        DrivenBody {
            body,
            conn: self.conn.take(),
            pool: self.pool.clone(),
            key: self.key.clone(),
            ended: false,
            wakes: SelfWakes::new(),
        }
    }
}

/// A response body whose connection is driven by reading it.
pub struct DrivenBody {
    body: Incoming,
    conn: Option<Conn>,
    pool: Arc<Pool>,
    key: Key,
    ended: bool,
    /// The connection and the body wake each other when they hand a chunk over; polled here,
    /// inside the reader's task, those wakes are turns of this poll, not a yield of the task.
    wakes: SelfWakes,
}

/// `is_end_stream` stays false: the poll that sees the end is what gives the connection back.
impl hyper::body::Body for DrivenBody {
    type Data = Bytes;
    type Error = hyper::Error;

    /// The next frame: the body's if it has one, else after letting the connection read what
    /// the socket has (and hand it over), else pending.
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let r = this.wakes.poll(cx, |cx| {
            loop {
                if let Poll::Ready(r) = Pin::new(&mut this.body).poll_frame(cx) {
                    return Poll::Ready(r);
                }
                let Some(conn) = this.conn.as_mut() else { return Poll::Pending };
                let was_alive = conn.conn.is_some();
                let alive = conn.poll_alive(cx);
                if let Poll::Ready(r) = Pin::new(&mut this.body).poll_frame(cx) {
                    return Poll::Ready(r);
                }
                if was_alive && !alive {
                    // The connection ended: the body reports its end or error on the next poll.
                    this.conn = None;
                    continue;
                }
                return Poll::Pending;
            }
        });
        if matches!(r, Poll::Ready(None)) {
            self.finish();
        }
        r
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

impl DrivenBody {
    /// The next frame, as a future.
    pub async fn frame(&mut self) -> Option<Result<Frame<Bytes>, hyper::Error>> {
        std::future::poll_fn(|cx| Pin::new(&mut *self).poll_frame(cx)).await
    }

    /// The body ended cleanly: the connection can serve another request.
    fn finish(&mut self) {
        if !self.ended {
            self.ended = true;
            if let Some(conn) = self.conn.take() {
                self.pool.checkin(self.key.clone(), conn);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// A connection to a server that has taken it and closed it, whose close the client has
    /// seen on the socket (not yet on the connection: it was never polled).
    async fn closed_conn() -> Conn {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server_side, _) = listener.accept().await.unwrap();
        drop(server_side);
        let mut probe = [0u8; 1];
        assert_eq!(tcp.peek(&mut probe).await.unwrap(), 0, "the close has arrived");
        let io: Box<dyn Io> = Box::new(tcp);
        let (sender, conn) = http1::handshake(TokioIo::new(io)).await.unwrap();
        Conn { sender, conn: Some(Box::pin(conn)) }
    }

    fn request() -> Request<Full<Bytes>> {
        Request::post("/token")
            .header(http::header::HOST, "127.0.0.1")
            .body(Full::new(Bytes::from_static(b"{\"once\":true}")))
            .unwrap()
    }

    /// Connections are pooled by key: a key names the proxy whole, password included, so no
    /// two egresses share a connection.
    #[test]
    fn keys_of_different_proxies_differ() {
        use crate::config::accounts::parse_proxy;
        let uri: Uri = "https://q.us-east-1.amazonaws.com/".parse().unwrap();
        let routes = [
            None,
            Some("http://127.0.0.1:3128"),
            Some("http://u:p1@127.0.0.1:3128"),
            Some("http://u:p2@127.0.0.1:3128"),
            Some("http://v:p1@127.0.0.1:3128"),
            Some("socks5://127.0.0.1:3128"),
            Some("socks5h://127.0.0.1:3128"),
            Some("socks5://127.0.0.1:1080"),
        ];
        let mut keys = HashMap::new();
        for (i, route) in routes.iter().enumerate() {
            let proxy = route.map(|r| parse_proxy(r).unwrap());
            let key = Pool::key(&uri, proxy.as_ref()).unwrap();
            assert!(key == Pool::key(&uri, proxy.as_ref()).unwrap(), "a key equals itself");
            assert_eq!(keys.insert(key, i), None, "{route:?} shares a key");
        }
        assert_eq!(keys.len(), routes.len());
    }

    #[tokio::test]
    async fn a_request_on_a_connection_found_closed_comes_back_unsent() {
        let mut conn = closed_conn().await;
        let mut e = exchange(&mut conn, request()).await.expect_err("no server to answer");
        let back = e.take_message().expect("nothing was written: the request comes back");
        assert_eq!(back.uri().path(), "/token");
    }

    #[tokio::test]
    async fn a_request_the_server_read_does_not_come_back() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Reads the whole request (the body is the last part), then hangs up without an answer.
        let server = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            while !got.ends_with(b"{\"once\":true}") {
                let mut chunk = [0u8; 1024];
                let n = sock.read(&mut chunk).await.unwrap();
                assert!(n > 0, "the request arrives whole");
                got.extend_from_slice(&chunk[..n]);
            }
            got
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let io: Box<dyn Io> = Box::new(tcp);
        let (sender, c) = http1::handshake(TokioIo::new(io)).await.unwrap();
        let mut conn = Conn { sender, conn: Some(Box::pin(c)) };
        let mut e = exchange(&mut conn, request()).await.expect_err("the server hung up");
        assert!(e.take_message().is_none(), "the request left: it must not be sent again");
        assert!(String::from_utf8_lossy(&server.await.unwrap()).starts_with("POST /token HTTP/1.1\r\n"));
    }
}
