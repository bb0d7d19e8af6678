//! HTTP/1.1 connections to Amazon Q and SSO OIDC, kept alive in a small pool and read by the
//! task that reads the answer: the one way the daemon speaks HTTP upstream.
//!
//! The client side of HTTP/1.1 that the daemon needs is small — one request written whole, a
//! status line and headers, a body framed by `content-length`, by chunks, or by the
//! connection's close — and is written here rather than taken from hyper's client. hyper's
//! client runs a connection as a dispatcher that hands the body over one chunk at a time, and
//! reads a chunk-size line a byte at a time; Amazon Q sends one event a chunk, so that was the
//! larger part of the daemon's work for each event. Here the body is decoded straight from the
//! bytes one read brought, in the reader's task, and a chunk's data is a slice of that read.
//!
//! An idle connection is not polled: on checkout it is read once without waiting, and one that
//! has closed meanwhile (or holds bytes nobody asked for) is dropped. A request is sent at most
//! once: it is tried again on a new connection only when none of it was written on a reused
//! connection (found closed at checkout, or its first write failed). A request that may have
//! left — written, then the connection failed before an answer — is a failure of this attempt,
//! never sent again here (it could run twice upstream: a double charge, a tool call run twice,
//! a refresh token rotated twice); the caller decides what comes next. Connections speak
//! HTTP/1.1 only (ALPN `http/1.1` over TLS). Answers are read strictly: a malformed head, a
//! transfer coding the daemon did not ask for, a malformed chunk, or a body cut short is an
//! error, never a shorter body.
//!
//! A request may name an egress proxy (the account's `proxy`): its connection is opened through
//! the proxy ([`super::tunnel`]) and pooled under the proxy too, so that a connection opened
//! through one proxy — or none — never carries a request meant for another.

use super::tunnel::{self, TunnelError};
use crate::config::{Proxy, ProxyScheme};
use bytes::{Bytes, BytesMut};
use http::{Request, Uri};
use hyper::body::{Body as _, Frame};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Idle connections kept per key (installation, endpoint and proxy).
const MAX_IDLE: usize = 256;
/// An idle connection older than this is closed rather than reused.
const IDLE_FOR: Duration = Duration::from_secs(90);
/// How often a checkin also closes the idle connections of every other key.
const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// Installations whose TLS session caches are kept at most ([`Pool::tls_for`]).
const MAX_TLS_SESSIONS_KEPT: usize = 4096;
/// The TLS session cache of one installation, in rustls's units: it keeps the sessions of
/// `n / 8` servers (eight TLS 1.3 tickets each), here eight hosts (chat, runtime, OIDC, the
/// Kiro auth and management services, and some to spare).
const SESSIONS_PER_INSTALLATION: usize = 8 * 8;

/// Closes the connections idle for longer than [`IDLE_FOR`] at `now`, of every key, and
/// forgets the keys left with none.
fn sweep(map: &mut HashMap<Key, Vec<Idle>>, now: Instant) {
    map.retain(|_, list| {
        list.retain(|i| now.saturating_duration_since(i.since) <= IDLE_FOR);
        !list.is_empty()
    });
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// What a connection is for: the installation that sends on it (an account's machine id), the
/// endpoint and the proxy it goes through. Connections are shared only between requests with
/// equal keys; proxies are equal when their scheme, address and credentials are. One account's
/// requests never travel on another's connection (nor resume its TLS session, see
/// [`Pool::tls_for`]): each account looks like one installation of its own to the service, on
/// the wire as in its user agents, and a connection carrying many accounts' tokens would tie
/// them together.
#[derive(Clone, PartialEq, Eq)]
struct Key {
    installation: String,
    tls: bool,
    host: String,
    port: u16,
    proxy: Option<Proxy>,
}

/// Equal keys hash alike: the password is left out (equal proxies have equal passwords too).
impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (&self.installation, self.tls, &self.host, self.port).hash(state);
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

/// One HTTP/1.1 connection: the transport, and bytes read from it that no answer has used yet.
struct Conn {
    io: Box<dyn Io>,
    buf: BytesMut,
}

impl Conn {
    fn new(io: Box<dyn Io>) -> Self {
        Conn { io, buf: BytesMut::new() }
    }

    /// Whether an idle connection can take a request: nothing left over from earlier answers,
    /// and a read finds nothing to read (polled once, without waiting). A read that finds the
    /// connection closed, an error, or bytes no request asked for makes it unusable.
    fn idle_usable(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut probe = [0u8; 1];
        let mut probe = ReadBuf::new(&mut probe);
        Pin::new(&mut self.io).poll_read(&mut cx, &mut probe).is_pending()
    }

    /// Reads what the socket has into the buffer; `Ok(0)` when it has closed.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < READ_SIZE / 2 {
            self.buf.reserve(READ_SIZE);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf)
    }
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// The pool of idle connections, by installation, endpoint and proxy.
pub struct Pool {
    tls: Arc<rustls::ClientConfig>,
    /// `tls` with a TLS session cache of each installation's own ([`Pool::tls_for`]).
    tls_of: Mutex<HashMap<String, Arc<rustls::ClientConfig>>>,
    connect_timeout: Duration,
    idle: Mutex<HashMap<Key, Vec<Idle>>>,
    /// When the idle connections of every key were last looked at ([`sweep`]).
    swept: Mutex<Instant>,
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
        Arc::new(Pool {
            tls: Arc::new(tls),
            tls_of: Mutex::new(HashMap::new()),
            connect_timeout,
            idle: Mutex::new(HashMap::new()),
            swept: Mutex::new(Instant::now()),
        })
    }

    /// The TLS configuration of `installation`'s connections: the shared one with a session
    /// cache of its own, so that no account resumes a TLS session another account began (a
    /// session ticket presented again names the connection it came from). Bounded: past
    /// [`MAX_TLS_SESSIONS_KEPT`] installations, one installation's cache is dropped for each
    /// new one (its next connection makes a full handshake).
    fn tls_for(&self, installation: &str) -> Arc<rustls::ClientConfig> {
        let mut map = self.tls_of.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = map.get(installation) {
            return c.clone();
        }
        if map.len() >= MAX_TLS_SESSIONS_KEPT {
            if let Some(gone) = map.keys().next().cloned() {
                map.remove(&gone);
            }
        }
        let mut c = (*self.tls).clone();
        c.resumption = rustls::client::Resumption::in_memory_sessions(SESSIONS_PER_INSTALLATION);
        let c = Arc::new(c);
        map.insert(installation.to_owned(), c.clone());
        c
    }

    fn key(uri: &Uri, proxy: Option<&Proxy>, installation: &str) -> Result<Key, ConnError> {
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(ConnError::Endpoint(uri.to_string())),
        };
        let host = uri.host().ok_or_else(|| ConnError::Endpoint(uri.to_string()))?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        Ok(Key { installation: installation.to_owned(), tls, host, port, proxy: proxy.cloned() })
    }

    /// An idle connection that is still open, if any.
    fn checkout(&self, key: &Key) -> Option<Conn> {
        loop {
            let idle = {
                let mut map = self.idle.lock().unwrap_or_else(|e| e.into_inner());
                map.get_mut(key).and_then(Vec::pop)?
            };
            if idle.since.elapsed() > IDLE_FOR {
                continue;
            }
            let mut conn = idle.conn;
            if conn.idle_usable() {
                return Some(conn);
            }
        }
    }

    /// Gives back a connection whose answer was read to its end.
    fn checkin(&self, key: Key, conn: Conn) {
        let mut map = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = map.entry(key).or_default();
        list.retain(|i| i.since.elapsed() <= IDLE_FOR);
        if list.len() < MAX_IDLE {
            list.push(Idle { conn, since: Instant::now() });
        }
        // Now and then every key: the connections of a key no longer used (an account removed,
        // its proxy or endpoint changed) are closed too, not kept open for good.
        let mut swept = self.swept.lock().unwrap_or_else(|e| e.into_inner());
        if swept.elapsed() >= SWEEP_EVERY {
            *swept = Instant::now();
            sweep(&mut map, Instant::now());
        }
    }

    /// A new connection for `key`: TCP (through the proxy, if any), then TLS, all within the
    /// connect timeout.
    async fn connect(&self, key: &Key) -> Result<Conn, ConnError> {
        // Errors name the endpoint, and the proxy when there is one.
        let host = if key.proxy.is_some() { key.describe() } else { key.host.clone() };
        let deadline = tokio::time::Instant::now() + self.connect_timeout;
        let connect = async {
            let tcp = match &key.proxy {
                None => TcpStream::connect((key.host.as_str(), key.port))
                    .await
                    .map_err(|e| ConnError::Connect { host: host.clone(), reason: e.to_string() })?,
                Some(proxy) => {
                    // Silence before the tunnel is up is the proxy's (the account's); after it,
                    // the endpoint's, as on a direct connection.
                    let tunnel = tokio::time::timeout_at(deadline, tunnel::open(proxy, &key.host, key.port));
                    let opened = tunnel
                        .await
                        .unwrap_or_else(|_| Err(tunnel::TunnelError::Timeout(self.connect_timeout)));
                    opened.map_err(|error| ConnError::Proxy {
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
                let tls = tokio_rustls::TlsConnector::from(self.tls_for(&key.installation))
                    .connect(name, tcp)
                    .await
                    .map_err(|e| ConnError::Connect { host: host.clone(), reason: e.to_string() })?;
                Box::new(tls)
            } else {
                Box::new(tcp)
            };
            Ok(Conn::new(io))
        };
        tokio::time::timeout_at(deadline, connect)
            .await
            .map_err(|_| ConnError::ConnectTimeout(key.describe()))?
    }

    /// Sends `req` for `installation` (an account's machine id: one account's connections and
    /// TLS sessions are its own), through `proxy` when given, and returns the answer's head with
    /// the body still to come; the connection goes with it.
    pub async fn send(
        self: &Arc<Self>,
        req: Request<Bytes>,
        proxy: Option<&Proxy>,
        installation: &str,
    ) -> Result<Driven, ConnError> {
        let key = Self::key(req.uri(), proxy, installation)?;
        let wire = serialize(&req, &key);
        let mut reused = self.checkout(&key);
        loop {
            let was_reused = reused.is_some();
            let mut conn = match reused.take() {
                Some(c) => c,
                None => self.connect(&key).await?,
            };
            match exchange(&mut conn, &wire).await {
                Ok(head) => {
                    let framing = head.framing;
                    return Ok(Driven {
                        status: head.status,
                        headers: head.headers,
                        body: DrivenBody {
                            conn: Some(conn),
                            framing,
                            reuse: head.reuse,
                            pool: self.clone(),
                            key,
                        },
                    });
                }
                // Nothing was written, and the reused connection had closed while idle: once
                // more, on a new connection.
                Err(Exchange::Unsent(_)) if was_reused => {}
                // It may have left (or a new connection failed at once): not sent again.
                Err(Exchange::Unsent(e) | Exchange::Failed(e)) => return Err(ConnError::Http(e)),
            }
        }
    }
}

/// Largest answer head (status line and headers) read.
const MAX_HEAD: usize = 64 * 1024;
/// Most headers an answer may have.
const MAX_HEADERS: usize = 128;
/// Longest chunk-size line (size, extensions) and longest trailer section of a chunked body.
const MAX_CHUNK_LINE: usize = 4096;
const MAX_TRAILERS: usize = 16 * 1024;
/// What a read asks the socket for at least.
const READ_SIZE: usize = 16 * 1024;

/// The request as it goes on the wire: the request line in origin form, a `Host` header, the
/// caller's headers, a `content-length` for a body (or for any method but GET and HEAD), the
/// body. One buffer, so a request leaves in one write.
fn serialize(req: &Request<Bytes>, key: &Key) -> Vec<u8> {
    let body = req.body();
    let mut out = Vec::with_capacity(256 + body.len() + 64 * req.headers().len());
    out.extend_from_slice(req.method().as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(req.uri().path_and_query().map_or("/", |pq| pq.as_str()).as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if !req.headers().contains_key(http::header::HOST) {
        out.extend_from_slice(b"host: ");
        // An IPv6 literal keeps its brackets in an authority (`[::1]:8080`).
        let v6 = key.host.parse::<std::net::Ipv6Addr>().is_ok();
        if v6 {
            out.push(b'[');
        }
        out.extend_from_slice(key.host.as_bytes());
        if v6 {
            out.push(b']');
        }
        if let Some(p) = req.uri().port() {
            out.push(b':');
            out.extend_from_slice(p.as_str().as_bytes());
        }
        out.extend_from_slice(b"\r\n");
    }
    for (name, value) in req.headers() {
        if name == http::header::CONTENT_LENGTH || name == http::header::TRANSFER_ENCODING {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !body.is_empty() || !matches!(*req.method(), http::Method::GET | http::Method::HEAD) {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(body.len().to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

/// How an exchange failed: with nothing of the request written (it may go again, on another
/// connection), or after some of it may have left.
#[derive(Debug)]
enum Exchange {
    Unsent(String),
    Failed(String),
}

/// An answer's head, and how its body is framed.
#[derive(Debug)]
struct Head {
    status: http::StatusCode,
    headers: http::HeaderMap,
    framing: Framing,
    /// The connection can carry another request once the body has been read to its end.
    reuse: bool,
}

/// How long a write that failed part-way waits for an answer the server may have sent first.
const EARLY_ANSWER_WAIT: Duration = Duration::from_secs(2);

/// Writes the request and reads the answer's head (informational answers skipped).
async fn exchange(conn: &mut Conn, wire: &[u8]) -> Result<Head, Exchange> {
    use tokio::io::AsyncWriteExt;
    let mut written = 0;
    while written < wire.len() {
        match conn.io.write(&wire[written..]).await {
            Ok(0) if written == 0 => return Err(Exchange::Unsent("the connection is closed".into())),
            Ok(0) => {
                let e = "the connection closed while the request was written".to_owned();
                return early_answer(conn, e).await;
            }
            Ok(n) => written += n,
            Err(e) if written == 0 => return Err(Exchange::Unsent(format!("writing the request: {e}"))),
            Err(e) => return early_answer(conn, format!("writing the request: {e}")).await,
        }
    }
    if let Err(e) = conn.io.flush().await {
        return early_answer(conn, format!("writing the request: {e}")).await;
    }
    read_head(conn).await
}

/// A write that failed part-way: a server may answer before it has read the whole request (413
/// for a body too large, 400, 401), close, and reset the connection when more arrives. The answer
/// it sent is the outcome (a clear refusal, not a connection failure to fail over on): read if
/// it is there, else `error` stands. The connection is not used again.
async fn early_answer(conn: &mut Conn, error: String) -> Result<Head, Exchange> {
    match tokio::time::timeout(EARLY_ANSWER_WAIT, read_head(conn)).await {
        Ok(Ok(mut head)) => {
            head.reuse = false;
            Ok(head)
        }
        _ => Err(Exchange::Failed(error)),
    }
}

/// Reads the answer's head off the connection.
async fn read_head(conn: &mut Conn) -> Result<Head, Exchange> {
    loop {
        if let Some(head) = parse_head(&mut conn.buf).map_err(Exchange::Failed)? {
            return Ok(head);
        }
        if conn.buf.len() >= MAX_HEAD {
            return Err(Exchange::Failed(format!("the answer's head is longer than {MAX_HEAD} bytes")));
        }
        match std::future::poll_fn(|cx| conn.poll_fill(cx)).await {
            Ok(0) => return Err(Exchange::Failed("the connection closed before an answer".into())),
            Ok(_) => {}
            Err(e) => return Err(Exchange::Failed(format!("reading the answer: {e}"))),
        }
    }
}

/// The answer's head, taken off the front of `buf`, when `buf` holds all of it; informational
/// (1xx) answers before it are dropped.
fn parse_head(buf: &mut BytesMut) -> Result<Option<Head>, String> {
    loop {
        let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut slots);
        let len = match resp.parse(buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(format!("a malformed answer: {e}")),
        };
        let code = resp.code.unwrap_or(0);
        let status = http::StatusCode::from_u16(code).map_err(|_| format!("an answer with status {code}"))?;
        if status.is_informational() {
            if code == 101 {
                return Err("the server switched protocols".into());
            }
            let _ = buf.split_to(len);
            continue;
        }
        let mut headers = http::HeaderMap::with_capacity(resp.headers.len());
        for h in resp.headers.iter() {
            let name = http::HeaderName::from_bytes(h.name.as_bytes())
                .map_err(|_| format!("an answer with a malformed header name {:?}", h.name))?;
            let value = http::HeaderValue::from_bytes(h.value)
                .map_err(|_| format!("an answer with a malformed value of {name}"))?;
            headers.append(name, value);
        }
        // `close` in any `Connection` header (there may be several) ends the connection.
        let close = headers
            .get_all(http::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|c| c.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")));
        let mut reuse = resp.version == Some(1) && !close;
        let framing = framing(status, &headers, &mut reuse)?;
        let _ = buf.split_to(len);
        return Ok(Some(Head { status, headers, framing, reuse }));
    }
}

/// How the body of an answer with this status and these headers is delimited (RFC 9112
/// §6.3; the daemon sends neither HEAD nor CONNECT).
fn framing(status: http::StatusCode, headers: &http::HeaderMap, reuse: &mut bool) -> Result<Framing, String> {
    use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
    if status == http::StatusCode::NO_CONTENT || status == http::StatusCode::NOT_MODIFIED {
        return Ok(Framing::Length(0));
    }
    if headers.contains_key(TRANSFER_ENCODING) {
        let mut codings = Vec::new();
        for v in headers.get_all(TRANSFER_ENCODING) {
            let v = v.to_str().map_err(|_| "a malformed transfer-encoding".to_string())?;
            codings
                .extend(v.split(',').map(str::trim).filter(|c| !c.is_empty()).map(str::to_ascii_lowercase));
        }
        if codings != ["chunked"] {
            return Err(format!(
                "an answer in a transfer coding the daemon did not ask for: {}",
                codings.join(", ")
            ));
        }
        if headers.contains_key(CONTENT_LENGTH) {
            // Both framings: chunked wins, and the connection is not trusted with another.
            *reuse = false;
        }
        return Ok(Framing::Chunked(Chunk::Size));
    }
    let mut length = None;
    for v in headers.get_all(CONTENT_LENGTH) {
        for part in v.to_str().map_err(|_| "a malformed content-length".to_string())?.split(',') {
            let part = part.trim();
            let n = (!part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()))
                .then(|| part.parse::<u64>().ok())
                .flatten()
                .ok_or_else(|| format!("a malformed content-length {part:?}"))?;
            if length.is_some_and(|l| l != n) {
                return Err("an answer with two different content-lengths".into());
            }
            length = Some(n);
        }
    }
    match length {
        Some(n) => Ok(Framing::Length(n)),
        None => {
            *reuse = false;
            Ok(Framing::Close)
        }
    }
}

/// How much of a body is still to come.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    /// This many bytes.
    Length(u64),
    /// Chunks, in this state.
    Chunked(Chunk),
    /// Everything until the connection closes.
    Close,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunk {
    /// A chunk-size line is next.
    Size,
    /// This many bytes of the current chunk's data, then its CRLF.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// Trailer lines, up to an empty line; the count is the trailer bytes seen so far.
    Trailers(usize),
    /// The last chunk and its trailers have been read.
    Done,
}

/// What decoding the buffered bytes gave.
enum Decoded {
    Data(Bytes),
    End,
    /// More bytes are needed.
    More,
}

/// A body that cannot be read to its end.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("reading the answer: {0}")]
    Io(#[from] std::io::Error),
    #[error("the connection closed before the end of the answer")]
    Cut,
    #[error("a malformed chunked answer: {0}")]
    Chunked(&'static str),
}

/// The position of the CRLF in `buf`, if there is one.
fn crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

impl Framing {
    /// Takes what it can from the front of `buf`: body data, the end, or nothing yet.
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, BodyError> {
        loop {
            match self {
                Framing::Length(0) | Framing::Chunked(Chunk::Done) => return Ok(Decoded::End),
                Framing::Length(left) | Framing::Chunked(Chunk::Data(left)) => {
                    if buf.is_empty() {
                        return Ok(Decoded::More);
                    }
                    let take = usize::try_from(*left).unwrap_or(usize::MAX).min(buf.len());
                    *left -= take as u64;
                    if *self == Framing::Chunked(Chunk::Data(0)) {
                        *self = Framing::Chunked(Chunk::DataEnd);
                    }
                    return Ok(Decoded::Data(buf.split_to(take).freeze()));
                }
                Framing::Close => {
                    if buf.is_empty() {
                        return Ok(Decoded::More);
                    }
                    return Ok(Decoded::Data(buf.split().freeze()));
                }
                Framing::Chunked(Chunk::Size) => {
                    let Some(end) = crlf(buf) else {
                        return if buf.len() > MAX_CHUNK_LINE {
                            Err(BodyError::Chunked("a chunk-size line too long"))
                        } else {
                            Ok(Decoded::More)
                        };
                    };
                    let size = chunk_size(&buf[..end])?;
                    let _ = buf.split_to(end + 2);
                    *self = Framing::Chunked(if size == 0 { Chunk::Trailers(0) } else { Chunk::Data(size) });
                }
                Framing::Chunked(Chunk::DataEnd) => {
                    if buf.len() < 2 {
                        return Ok(Decoded::More);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(BodyError::Chunked("no CRLF after a chunk's data"));
                    }
                    let _ = buf.split_to(2);
                    *self = Framing::Chunked(Chunk::Size);
                }
                Framing::Chunked(Chunk::Trailers(seen)) => {
                    let Some(end) = crlf(buf) else {
                        return if *seen + buf.len() > MAX_TRAILERS {
                            Err(BodyError::Chunked("trailers too long"))
                        } else {
                            Ok(Decoded::More)
                        };
                    };
                    let _ = buf.split_to(end + 2);
                    *self = Framing::Chunked(if end == 0 {
                        Chunk::Done
                    } else if *seen + end + 2 > MAX_TRAILERS {
                        return Err(BodyError::Chunked("trailers too long"));
                    } else {
                        Chunk::Trailers(*seen + end + 2)
                    });
                }
            }
        }
    }
}

/// The size on a chunk-size line: hex digits, then optional extensions (`;…`) the daemon
/// ignores.
fn chunk_size(line: &[u8]) -> Result<u64, BodyError> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(BodyError::Chunked("a chunk-size line without a size"));
    }
    // Leading zeros are allowed (a size padded to a fixed width); what is left must fit.
    let significant = line[..digits].iter().skip_while(|&&b| b == b'0').count();
    if significant > 15 {
        return Err(BodyError::Chunked("a chunk size too large"));
    }
    // Whitespace may follow the size; extensions start at `;`.
    let rest = &line[digits..];
    let ext = rest.iter().position(|&b| b == b';').unwrap_or(rest.len());
    let rest_ok = rest[..ext].iter().all(|&b| b == b' ' || b == b'\t');
    if !rest_ok {
        return Err(BodyError::Chunked("a chunk-size line with bytes after the size"));
    }
    let hex = std::str::from_utf8(&line[digits - significant.max(1)..digits])
        .map_err(|_| BodyError::Chunked("a chunk size that is not hex"))?;
    u64::from_str_radix(hex, 16).map_err(|_| BodyError::Chunked("a chunk size that is not hex"))
}

/// An answer and the connection it arrives on: reading the body drives the connection, and a
/// body read to its end gives the connection back to the pool.
pub struct Driven {
    status: http::StatusCode,
    headers: http::HeaderMap,
    body: DrivenBody,
}

impl Driven {
    pub fn status(&self) -> http::StatusCode {
        self.status
    }

    pub fn headers(&self) -> &http::HeaderMap {
        &self.headers
    }

    /// The body, read as a [`hyper::body::Body`] or through [`DrivenBody::frame`].
    pub fn into_body(self) -> DrivenBody {
        self.body
    }
}

/// A response body, read straight off its connection by whoever reads the body: everything one
/// read brought is decoded in the reader's task.
pub struct DrivenBody {
    /// `None` once the body has ended (the connection given back or closed) or failed.
    conn: Option<Conn>,
    framing: Framing,
    reuse: bool,
    pool: Arc<Pool>,
    key: Key,
}

/// `is_end_stream` stays false: the poll that sees the end is what gives the connection back.
impl hyper::body::Body for DrivenBody {
    type Data = Bytes;
    type Error = BodyError;

    /// The next piece of the body: from bytes already read, else from what the socket has now,
    /// else pending.
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        let Some(conn) = this.conn.as_mut() else { return Poll::Ready(None) };
        loop {
            match this.framing.decode(&mut conn.buf) {
                Ok(Decoded::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Ok(Decoded::End) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Decoded::More) => {}
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
            match conn.poll_fill(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) if this.framing == Framing::Close => {
                    this.conn = None;
                    return Poll::Ready(None);
                }
                Poll::Ready(Ok(0)) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(BodyError::Cut)));
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(BodyError::Io(e))));
                }
            }
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self.framing {
            Framing::Length(n) => hyper::body::SizeHint::with_exact(n),
            _ => hyper::body::SizeHint::default(),
        }
    }
}

impl DrivenBody {
    /// The next frame, as a future.
    pub async fn frame(&mut self) -> Option<Result<Frame<Bytes>, BodyError>> {
        std::future::poll_fn(|cx| Pin::new(&mut *self).poll_frame(cx)).await
    }

    /// The body ended cleanly: the connection can serve another request, if nothing follows
    /// the answer and the answer allows it.
    fn finish(&mut self) {
        if let Some(conn) = self.conn.take() {
            if self.reuse && conn.buf.is_empty() {
                self.pool.checkin(self.key.clone(), conn);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connection to a server that has taken it and closed it, whose close the client has
    /// seen on the socket.
    async fn closed_conn() -> Conn {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server_side, _) = listener.accept().await.unwrap();
        drop(server_side);
        let mut probe = [0u8; 1];
        assert_eq!(tcp.peek(&mut probe).await.unwrap(), 0, "the close has arrived");
        Conn::new(Box::new(tcp))
    }

    /// A key no longer used (an account removed, its proxy changed) has its idle connections
    /// closed by the sweep of another key's checkin; fresh ones stay. Before, they stayed open
    /// for good (in CLOSE_WAIT once the server closed them).
    #[tokio::test]
    async fn the_sweep_closes_idle_connections_of_keys_no_longer_used() {
        let key = |host: &str| Key {
            installation: "test".into(),
            tls: false,
            host: host.into(),
            port: 80,
            proxy: None,
        };
        let now = Instant::now();
        let mut map: HashMap<Key, Vec<Idle>> = HashMap::new();
        let stale = now.checked_sub(IDLE_FOR + Duration::from_secs(1)).unwrap();
        map.entry(key("old")).or_default().push(Idle { conn: closed_conn().await, since: stale });
        map.entry(key("new")).or_default().push(Idle { conn: closed_conn().await, since: now });
        sweep(&mut map, now);
        assert!(!map.contains_key(&key("old")), "the unused key's connection is still kept");
        assert_eq!(map.get(&key("new")).map(Vec::len), Some(1));
    }

    fn request(uri: &str) -> Request<Bytes> {
        Request::post(uri).body(Bytes::from_static(b"{\"once\":true}")).unwrap()
    }

    /// Reads one request whole (its body is the last part) from `sock`.
    async fn read_request(sock: &mut TcpStream) -> Vec<u8> {
        let mut got = Vec::new();
        while !got.ends_with(b"{\"once\":true}") {
            let mut chunk = [0u8; 1024];
            let n = sock.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the request arrives whole");
            got.extend_from_slice(&chunk[..n]);
        }
        got
    }

    /// Feeds `wire` to a body framed by `framing`, `step` bytes at a time, and gives what the
    /// body decoded: the data joined, or the first error.
    fn decode_in_steps(mut framing: Framing, wire: &[u8], step: usize) -> Result<(Vec<u8>, bool), BodyError> {
        let mut buf = BytesMut::new();
        let mut data = Vec::new();
        for piece in wire.chunks(step) {
            buf.extend_from_slice(piece);
            loop {
                match framing.decode(&mut buf)? {
                    Decoded::Data(d) => data.extend_from_slice(&d),
                    Decoded::End => return Ok((data, buf.is_empty())),
                    Decoded::More => break,
                }
            }
        }
        Ok((data, false))
    }

    /// `close` in any of several `Connection` headers ends the connection; an IPv6 endpoint's
    /// `host` keeps its brackets; a chunk size padded with zeros is still a size.
    #[test]
    fn connection_close_host_and_padded_chunk_sizes() {
        let mut head = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nconnection: keep-alive\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"[..],
        );
        assert!(!parse_head(&mut head).unwrap().unwrap().reuse);
        let mut head =
            BytesMut::from(&b"HTTP/1.1 200 OK\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n"[..]);
        assert!(parse_head(&mut head).unwrap().unwrap().reuse);

        let uri: Uri = "http://[::1]:8080/x".parse().unwrap();
        let wire = serialize(&request("http://[::1]:8080/x"), &Pool::key(&uri, None, "test").unwrap());
        assert!(
            String::from_utf8_lossy(&wire).contains("host: [::1]:8080\r\n"),
            "{}",
            String::from_utf8_lossy(&wire)
        );
        let uri: Uri = "http://127.0.0.1:8080/x".parse().unwrap();
        let wire = serialize(&request("http://127.0.0.1:8080/x"), &Pool::key(&uri, None, "test").unwrap());
        assert!(String::from_utf8_lossy(&wire).contains("host: 127.0.0.1:8080\r\n"));

        assert_eq!(chunk_size(b"0000000000000000000a").unwrap(), 10);
        assert_eq!(chunk_size(b"00000000000000000000").unwrap(), 0);
        assert!(chunk_size(b"1000000000000000").is_err(), "16 significant digits");
        assert_eq!(chunk_size(b"0fffffffffffffff;ext").unwrap(), 0x0fff_ffff_ffff_ffff);
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
            let key = Pool::key(&uri, proxy.as_ref(), "test").unwrap();
            assert!(key == Pool::key(&uri, proxy.as_ref(), "test").unwrap(), "a key equals itself");
            assert_eq!(keys.insert(key, i), None, "{route:?} shares a key");
        }
        assert_eq!(keys.len(), routes.len());
    }

    #[test]
    fn a_request_goes_on_the_wire_in_origin_form_with_host_and_length() {
        let uri: Uri = "http://127.0.0.1:8080/generateAssistantResponse?x=1".parse().unwrap();
        let key = Pool::key(&uri, None, "test").unwrap();
        let req = Request::post(uri)
            .header("x-amz-target", "T")
            .header(http::header::CONTENT_LENGTH, "999")
            .body(Bytes::from_static(b"{}"))
            .unwrap();
        assert_eq!(
            String::from_utf8(serialize(&req, &key)).unwrap(),
            "POST /generateAssistantResponse?x=1 HTTP/1.1\r\nhost: 127.0.0.1:8080\r\nx-amz-target: T\r\ncontent-length: 2\r\n\r\n{}"
        );
        let get = Request::get("https://q.us-east-1.amazonaws.com/m").body(Bytes::new()).unwrap();
        let key = Pool::key(get.uri(), None, "test").unwrap();
        assert_eq!(
            String::from_utf8(serialize(&get, &key)).unwrap(),
            "GET /m HTTP/1.1\r\nhost: q.us-east-1.amazonaws.com\r\n\r\n"
        );
    }

    #[test]
    fn heads_are_parsed_with_their_framing() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Amzn-RequestId: r1\r\n\r\n5\r\n"[..],
        );
        let head = parse_head(&mut buf).unwrap().unwrap();
        assert_eq!(head.status, 200);
        assert_eq!(head.headers["x-amzn-requestid"], "r1");
        assert_eq!(head.framing, Framing::Chunked(Chunk::Size));
        assert!(head.reuse);
        assert_eq!(&buf[..], b"5\r\n", "the body's first bytes stay in the buffer");

        let parse = |wire: &str| parse_head(&mut BytesMut::from(wire.as_bytes()));
        assert!(parse("HTTP/1.1 200 OK\r\ncontent-length: 12").unwrap().is_none(), "a head not yet whole");
        let head = parse("HTTP/1.1 400 Bad Request\r\nContent-Length: 12\r\nConnection: close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!((head.framing, head.reuse), (Framing::Length(12), false));
        let head = parse("HTTP/1.1 200 OK\r\n\r\n").unwrap().unwrap();
        assert_eq!((head.framing, head.reuse), (Framing::Close, false), "no length: the close ends it");
        let head = parse("HTTP/1.1 204 No Content\r\n\r\n").unwrap().unwrap();
        assert_eq!(head.framing, Framing::Length(0));
        let head = parse("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n").unwrap().unwrap();
        assert!(!head.reuse, "an HTTP/1.0 answer ends its connection");
        let head = parse("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!((head.framing, head.reuse), (Framing::Chunked(Chunk::Size), false));
        let head = parse("HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\n\r\n").unwrap().unwrap();
        assert_eq!(head.framing, Framing::Length(3));

        for bad in [
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: -3\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 3a\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\n\r\n",
            "HTTP/1.1 20 OK\r\n\r\n",
            "SSH-2.0-OpenSSH_9.6\r\n\r\n",
            "HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} is refused");
        }
        let many: String = (0..MAX_HEADERS + 1).map(|i| format!("x-h{i}: v\r\n")).collect();
        assert!(parse(&format!("HTTP/1.1 200 OK\r\n{many}\r\n")).is_err(), "too many headers");
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_reads() {
        let wire = b"5\r\nhello\r\n1;name=value\r\n,\r\nA \r\n0123456789\r\n0\r\nx-trailer: 1\r\n\r\n";
        for step in [1, 2, 3, 7, wire.len()] {
            let (data, clean) = decode_in_steps(Framing::Chunked(Chunk::Size), wire, step).unwrap();
            assert_eq!(data, b"hello,0123456789", "in steps of {step}");
            assert!(clean, "nothing left after the body");
        }
        // What follows the body stays in the buffer (and keeps the connection out of the pool).
        let (_, clean) =
            decode_in_steps(Framing::Chunked(Chunk::Size), b"1\r\nx\r\n0\r\n\r\nHTTP", 64).unwrap();
        assert!(!clean);
        for bad in [
            &b"\r\nhello\r\n"[..],
            b"zz\r\n",
            b"5 x\r\nhello\r\n",
            b"10000000000000000\r\n",
            b"5\r\nhelloXY0\r\n\r\n",
        ] {
            assert!(decode_in_steps(Framing::Chunked(Chunk::Size), bad, 1).is_err(), "{bad:?} is refused");
        }
        let long_line = vec![b'1'; 1]
            .into_iter()
            .chain(std::iter::repeat_n(b' ', MAX_CHUNK_LINE + 1))
            .collect::<Vec<_>>();
        assert!(
            decode_in_steps(Framing::Chunked(Chunk::Size), &long_line, 512).is_err(),
            "an endless size line"
        );
        let mut trailers = b"0\r\n".to_vec();
        trailers.extend(std::iter::repeat_n(&b"x-t: 1\r\n"[..], MAX_TRAILERS / 8 + 1).flatten());
        assert!(decode_in_steps(Framing::Chunked(Chunk::Size), &trailers, 100).is_err(), "endless trailers");
    }

    proptest::proptest! {
        /// Any body, cut into chunks of any sizes (hex in either case, with or without
        /// extensions, with or without trailers), read in pieces of any size, comes out whole
        /// and leaves nothing behind.
        #[test]
        fn any_chunking_read_in_any_pieces_gives_the_body_back(
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..600),
            cuts in proptest::collection::vec(1usize..200, 0..8),
            upper in proptest::bool::ANY,
            ext in proptest::bool::ANY,
            trailers in proptest::bool::ANY,
            step in 1usize..40,
        ) {
            let mut wire = Vec::new();
            let mut rest = &body[..];
            let mut cuts = cuts.into_iter().cycle();
            while !rest.is_empty() {
                let n = cuts.next().unwrap_or(rest.len()).min(rest.len());
                let size = if upper { format!("{n:X}") } else { format!("{n:x}") };
                wire.extend_from_slice(size.as_bytes());
                if ext {
                    wire.extend_from_slice(b";name=\"v\"");
                }
                wire.extend_from_slice(b"\r\n");
                wire.extend_from_slice(&rest[..n]);
                wire.extend_from_slice(b"\r\n");
                rest = &rest[n..];
            }
            wire.extend_from_slice(if trailers { &b"0\r\nx-checksum: 1\r\nx-more: 2\r\n\r\n"[..] } else { b"0\r\n\r\n" });
            let (data, clean) = decode_in_steps(Framing::Chunked(Chunk::Size), &wire, step).unwrap();
            proptest::prop_assert_eq!(data, body);
            proptest::prop_assert!(clean);
        }

        /// Bytes of any kind never panic the decoder, and it never gives more body than it
        /// was given bytes.
        #[test]
        fn any_bytes_are_decoded_or_refused(
            wire in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
            step in 1usize..40,
        ) {
            if let Ok((data, _)) = decode_in_steps(Framing::Chunked(Chunk::Size), &wire, step) {
                proptest::prop_assert!(data.len() <= wire.len());
            }
            let mut buf = BytesMut::from(&wire[..]);
            let _ = parse_head(&mut buf);
        }
    }

    #[test]
    fn length_bodies_end_at_their_length() {
        let (data, clean) = decode_in_steps(Framing::Length(5), b"hello", 2).unwrap();
        assert_eq!((data.as_slice(), clean), (&b"hello"[..], true));
        let (data, clean) = decode_in_steps(Framing::Length(5), b"helloHTTP", 9).unwrap();
        assert_eq!((data.as_slice(), clean), (&b"hello"[..], false));
        let (data, ended) = decode_in_steps(Framing::Length(5), b"hel", 9).unwrap();
        assert_eq!((data.as_slice(), ended), (&b"hel"[..], false), "three bytes of five: not the end");
    }

    #[tokio::test]
    async fn a_request_on_a_connection_found_closed_is_not_taken_from_the_pool() {
        let mut conn = closed_conn().await;
        assert!(!conn.idle_usable(), "a closed connection is not used again");
    }

    #[tokio::test]
    async fn a_request_the_server_read_does_not_come_back() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Reads the whole request, then hangs up without an answer.
        let server = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            read_request(&mut sock).await
        });
        let mut conn = Conn::new(Box::new(TcpStream::connect(addr).await.unwrap()));
        let wire = serialize(
            &request("/token"),
            &Pool::key(&format!("http://{addr}/").parse().unwrap(), None, "test").unwrap(),
        );
        let e = exchange(&mut conn, &wire).await.expect_err("the server hung up");
        assert!(matches!(e, Exchange::Failed(_)), "the request left: it must not be sent again ({e:?})");
        assert!(String::from_utf8_lossy(&server.await.unwrap()).starts_with("POST /token HTTP/1.1\r\n"));
    }

    /// A server that refuses a large request before reading it (413), answers, closes and so
    /// resets the connection under the rest of the write: its answer is the outcome, not a
    /// connection failure (which failover would take to every account in turn).
    #[tokio::test]
    async fn an_answer_sent_before_the_request_was_read_is_the_outcome() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let refusal = r#"{"message":"Request too large"}"#;
        let server = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                let mut chunk = [0u8; 1024];
                let n = sock.read(&mut chunk).await.unwrap();
                assert!(n > 0);
                got.extend_from_slice(&chunk[..n]);
            }
            let answer = format!(
                "HTTP/1.1 413 Payload Too Large\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{refusal}",
                refusal.len()
            );
            sock.write_all(answer.as_bytes()).await.unwrap();
            // Closed with most of the request unread: the kernel answers the rest with a reset.
            drop(sock);
        });
        let mut conn = Conn::new(Box::new(TcpStream::connect(addr).await.unwrap()));
        let big = Request::post(format!("http://{addr}/generateAssistantResponse"))
            .body(Bytes::from(vec![b'x'; 32 << 20]))
            .unwrap();
        let wire =
            serialize(&big, &Pool::key(&format!("http://{addr}/").parse().unwrap(), None, "test").unwrap());
        let head = exchange(&mut conn, &wire).await.expect("the server's answer");
        assert_eq!(head.status, http::StatusCode::PAYLOAD_TOO_LARGE);
        assert!(!head.reuse, "a connection reset under a write is not used again");
        server.await.unwrap();
    }

    /// Through the pool: a connection is reused after a body read to its end; a connection the
    /// server closed while idle is replaced and the request goes once, on the new one; a body
    /// cut short is an error, not a shorter body.
    #[tokio::test]
    async fn the_pool_reuses_what_it_may_and_sends_each_request_once() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let mut requests = Vec::new();
            // First connection: two answers, then it is closed while idle.
            let (mut sock, _) = listener.accept().await.unwrap();
            for body in ["first", "second"] {
                requests.push(read_request(&mut sock).await);
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
                    body.len()
                );
                sock.write_all(answer.as_bytes()).await.unwrap();
            }
            drop(sock);
            // Second connection: an answer cut short.
            let (mut sock, _) = listener.accept().await.unwrap();
            requests.push(read_request(&mut sock).await);
            sock.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort").await.unwrap();
            drop(sock);
            requests.len()
        });
        let tls =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth();
        let pool = Pool::new(&tls, Duration::from_secs(5));
        let uri = format!("http://{addr}/token");
        let read = |d: Driven| async move {
            let mut body = d.into_body();
            let mut got = Vec::new();
            while let Some(frame) = body.frame().await {
                got.extend_from_slice(&frame?.into_data().unwrap());
            }
            Ok::<_, BodyError>(got)
        };
        assert_eq!(read(pool.send(request(&uri), None, "test").await.unwrap()).await.unwrap(), b"first");
        assert_eq!(read(pool.send(request(&uri), None, "test").await.unwrap()).await.unwrap(), b"second");
        // Let the server's close arrive before the next checkout.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let cut = read(pool.send(request(&uri), None, "test").await.unwrap()).await;
        assert!(matches!(cut, Err(BodyError::Cut)), "{cut:?}");
        assert_eq!(server.await.unwrap(), 3, "three requests, each sent once");
    }
}
