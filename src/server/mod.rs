//! The HTTPS front end: listeners (TCP, TLS with ALPN h2/http1.1, systemd sockets), HTTP/1.1
//! and HTTP/2 via hyper, connection limits, and graceful drain on shutdown.

pub mod body;
pub mod http;
pub mod idle;
pub mod messages;
pub mod tls;
pub mod work;

use crate::accounts::Pool;
use crate::config::{AuthConfig, Config};
use crate::shutdown::{Spawner, Tasks};
use crate::translate::ModelMap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use messages::Exchange;
use std::convert::Infallible;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Everything a request handler needs.
pub struct App {
    pub config: Config,
    pub auth: RwLock<AuthConfig>,
    /// Named keys, their limits and the usage recorder.
    pub keys: Arc<crate::keys::Keys>,
    pub pool: Arc<Pool>,
    /// The trip to Amazon Q (lease, send, fail over).
    pub relay: crate::relay::Relay,
    pub models: ModelMap,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub started: Instant,
    /// Turns true when the drain deadline has passed: open streams end with an error event.
    pub drain_expired: watch::Receiver<bool>,
    /// The body budget and where bodies are parsed: inline, or on the CPU pool.
    pub work: work::Work,
    /// Requests in flight and ended, which tell the memory trimmer when the daemon is quiet.
    pub activity: Arc<crate::memory::Activity>,
}

/// Writes the access-log line of one request.
/// A `/v1/messages` exchange is also counted here: usage per key, account and model, the key's
/// budgets and its metrics.
pub fn access_log(app: &App, request_id: &str, x: &Exchange, status: u16, started: Instant) {
    if let (true, Some(caller)) = (x.messages, &x.caller) {
        // A request refused before any account answered used nothing; one an account
        // answered used what the answer had used by then, however it ended (an error in the
        // answer, `request_timeout_secs`, the client gone: 499).
        let served = status < 400 || x.first_byte.is_some() || x.account.is_some();
        let (tokens_in, tokens_out) = if served { (x.tokens_in, x.tokens_out) } else { (0, 0) };
        let credits = x.credits.unwrap_or(0.0);
        app.metrics.key_request(caller.usage_name(), status, tokens_in, tokens_out, credits);
        app.keys.record(
            caller,
            crate::keys::UsageEvent {
                account: x.account.clone(),
                model: x.model_label().to_string(),
                error: status >= 400,
                tokens_in,
                tokens_out,
                credits,
            },
        );
    }
    tracing::info!(
        target: "access",
        request_id,
        key = %x.key,
        model = %x.model,
        upstream_model = if x.upstream_model.is_empty() { "-" } else { x.upstream_model.as_str() },
        stream = x.stream,
        account = x.account.as_deref().unwrap_or("-"),
        status,
        first_byte_ms = x.first_byte.map(|d| d.as_millis() as u64).unwrap_or(0),
        total_ms = started.elapsed().as_millis() as u64,
        tokens_in = x.tokens_in,
        tokens_out = x.tokens_out,
        "request"
    );
}

/// How connections are accepted.
pub struct ServeOptions {
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub max_header_count: usize,
    pub max_header_bytes: usize,
    pub idle_timeout: Duration,
}

fn builder(opts: &ServeOptions, tasks: &Tasks) -> auto::Builder<Spawner> {
    let mut b = auto::Builder::new(Spawner(tasks.clone()));
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(opts.header_read_timeout)
        .max_headers(opts.max_header_count)
        .max_buf_size(opts.max_header_bytes.max(8192))
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .max_header_list_size(opts.max_header_bytes as u32)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    b
}

/// Accepts connections on `listener` until `stop` turns true, then lets open connections finish
/// (hyper's graceful shutdown: h1 closes after the current response, h2 sends GOAWAY). Every
/// connection, and every task a connection spawns (an HTTP/2 stream), runs in `tasks`: the
/// daemon cancels what is left of them after the drain.
pub async fn serve(
    app: Arc<App>,
    listener: tokio::net::TcpListener,
    opts: Arc<ServeOptions>,
    mut stop: crate::shutdown::Shutdown,
    graceful: Arc<hyper_util::server::graceful::GracefulShutdown>,
    tasks: Tasks,
) {
    let b = Arc::new(builder(&opts, &tasks));
    let slots = Arc::new(tokio::sync::Semaphore::new(opts.max_connections));
    let acceptor = opts.tls.clone().map(tokio_rustls::TlsAcceptor::from);
    loop {
        let permit = tokio::select! {
            _ = stop.recv() => break,
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let (tcp, peer) = tokio::select! {
            _ = stop.recv() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let app = app.clone();
        let b = b.clone();
        let acceptor = acceptor.clone();
        let watcher = graceful.watcher();
        let handshake_timeout = opts.header_read_timeout;
        let idle_timeout = opts.idle_timeout;
        // The connection's wakes of its own task (hyper's hand-overs between the connection and
        // its bodies, both ways) are turns of its poll: see `selfwake`.
        tasks.spawn(crate::selfwake::run(async move {
            let _permit = permit;
            let activity = idle::Activity::new();
            let svc_activity = activity.clone();
            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let app = app.clone();
                let h2 = req.version() == ::http::Version::HTTP_2;
                let guard = svc_activity.request(app.activity.begin(), !h2);
                async move {
                    let mut resp = http::handle(app, req).await;
                    // A streaming response stays "in flight" until its body ends.
                    if let body::Body::Stream(_, g) = resp.body_mut() {
                        *g = Some(guard);
                    }
                    // An HTTP/2 client that stops reading one stream blocks no socket write
                    // (`drive` would see that): each such stream is watched on its own.
                    if h2 {
                        resp = resp.map(|b| b.cut_when_stalled(idle_timeout));
                    }
                    Ok::<_, Infallible>(resp)
                }
            });
            match acceptor {
                Some(acc) => match tokio::time::timeout(handshake_timeout, acc.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let conn = b
                            .serve_connection(TokioIo::new(idle::IdleIo::new(tls, activity.clone())), svc)
                            .into_owned();
                        drive(watcher.watch(conn), activity, idle_timeout, peer).await
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                },
                None => {
                    let conn = b
                        .serve_connection(TokioIo::new(idle::IdleIo::new(tcp, activity.clone())), svc)
                        .into_owned();
                    drive(watcher.watch(conn), activity, idle_timeout, peer).await
                }
            }
        }));
    }
}

/// Runs a connection until it ends, closing it when it has been idle (no request in flight, no
/// byte moved) for `idle`, or when its client has taken none of the response waiting for it
/// for `idle` (a client that stopped reading held a stream, its upstream call and its account
/// past `request_timeout_secs`: the stream's own timers run only when the client takes bytes).
/// The stream then ends as a client gone (499).
async fn drive<F, E>(
    conn: F,
    activity: std::sync::Arc<idle::Activity>,
    idle: Duration,
    peer: std::net::SocketAddr,
) where
    F: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    tokio::pin!(conn);
    let check = (idle / 4).max(Duration::from_millis(250));
    loop {
        tokio::select! {
            biased;
            r = &mut conn => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                return;
            }
            _ = tokio::time::sleep(check) => {
                if activity.is_idle(idle) {
                    tracing::debug!(%peer, "closing an idle connection");
                    return;
                }
                if activity.is_stalled(idle) {
                    tracing::warn!(%peer, idle_s = idle.as_secs(), "closing a connection whose client has read nothing of its response for idle_timeout_secs");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod stall_tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::AsyncWriteExt;

    /// Set when the producer's future is dropped.
    struct Dropped(Arc<AtomicBool>);

    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    /// A client that asks for a stream and then reads nothing: once the response's writes have
    /// waited the idle timeout, the connection is closed and the stream's producer (its upstream
    /// call, its account) dropped. A real TCP pair; the server side's send buffer is small so
    /// that the writes block soon, as they do after a few megabytes on a default socket.
    #[tokio::test]
    async fn a_client_that_reads_nothing_is_cut_after_the_idle_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, peer) = listener.accept().await.unwrap();
        nix::sys::socket::setsockopt(&server, nix::sys::socket::sockopt::SndBuf, &4096).unwrap();
        nix::sys::socket::setsockopt(&client, nix::sys::socket::sockopt::RcvBuf, &4096).unwrap();
        let activity = idle::Activity::new();
        let (svc_activity, dropped) = (activity.clone(), Arc::new(AtomicBool::new(false)));
        let flag = dropped.clone();
        let svc = service_fn(move |_req| {
            let guard = svc_activity.request(Arc::new(crate::memory::Activity::default()).begin(), true);
            let flag = flag.clone();
            async move {
                let out = body::Outbox::default();
                let o = out.clone();
                let producer = body::Producer::new(out, async move {
                    let _dropped = Dropped(flag);
                    loop {
                        o.write(|b| b.extend_from_slice(&[b'x'; 16 * 1024]));
                        o.room().await;
                    }
                });
                Ok::<_, Infallible>(hyper::Response::new(body::Body::Stream(producer, Some(guard))))
            }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(idle::IdleIo::new(server, activity.clone())), svc);
        client.write_all(b"GET /v1/messages HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
        let t0 = Instant::now();
        let idle = Duration::from_secs(1);
        tokio::time::timeout(Duration::from_secs(20), drive(conn, activity, idle, peer))
            .await
            .expect("a stalled connection was kept");
        assert!(t0.elapsed() >= idle, "cut before the idle timeout: {:?}", t0.elapsed());
        assert!(dropped.load(Ordering::SeqCst), "the stream's producer lives on");
        drop(client);
    }

    /// HTTP/2 keeps a connection's bytes moving with PINGs (hyper's server pings, the client
    /// answers): a connection with no request in flight for the idle timeout is closed all the
    /// same, whether it has sent requests or none (a client that only holds a slot).
    #[tokio::test]
    async fn an_idle_http2_connection_is_closed_whatever_its_pings() {
        use http_body_util::BodyExt;
        use hyper_util::rt::TokioExecutor;
        for requests in [0, 2] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let client = tokio::spawn(async move {
                let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
                let (mut send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                    .handshake(TokioIo::new(tcp))
                    .await
                    .unwrap();
                let conn = tokio::spawn(conn);
                for _ in 0..requests {
                    let req = hyper::Request::get(format!("http://{addr}/health"))
                        .body(http_body_util::Empty::<bytes::Bytes>::new())
                        .unwrap();
                    let resp = send.send_request(req).await.unwrap();
                    resp.into_body().collect().await.unwrap();
                }
                // The connection stays open (and answers the server's PINGs) until closed.
                let _ = conn.await;
                drop(send);
            });
            let (tcp, peer) = listener.accept().await.unwrap();
            let activity = idle::Activity::new();
            let svc_activity = activity.clone();
            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let busy = Arc::new(crate::memory::Activity::default()).begin();
                let guard = svc_activity.request(busy, req.version() != ::http::Version::HTTP_2);
                async move {
                    let _guard = guard;
                    Ok::<_, Infallible>(hyper::Response::new(body::Body::full("ok")))
                }
            });
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .keep_alive_interval(Some(Duration::from_millis(100)))
                .keep_alive_timeout(Duration::from_secs(5))
                .serve_connection(TokioIo::new(idle::IdleIo::new(tcp, activity.clone())), svc);
            let t0 = Instant::now();
            let idle = Duration::from_secs(1);
            tokio::time::timeout(Duration::from_secs(10), drive(conn, activity, idle, peer))
                .await
                .unwrap_or_else(|_| panic!("an idle HTTP/2 connection ({requests} requests) was kept"));
            assert!(t0.elapsed() >= idle, "closed before the idle timeout: {:?}", t0.elapsed());
            client.abort();
        }
    }

    /// HTTP/2: a client that stops reading one stream blocks on flow control, not on a socket
    /// write, and hyper stops polling the body. The stream is cut once the client has taken
    /// nothing for the idle timeout (the producer dropped, the stream reset), while a stream
    /// whose upstream is silent for longer than that, read by its client, is left alone.
    #[tokio::test]
    async fn an_http2_stream_whose_client_reads_nothing_is_cut_after_the_idle_timeout() {
        use http_body_util::BodyExt;
        use hyper_util::rt::TokioExecutor;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let idle = Duration::from_secs(1);
        let dropped = Arc::new(AtomicBool::new(false));
        let flag = dropped.clone();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let flag = flag.clone();
                async move {
                    let out = body::Outbox::default();
                    let o = out.clone();
                    let producer = if req.uri().path() == "/silent" {
                        // Two pieces with a silence of twice the idle timeout between them.
                        body::Producer::new(out, async move {
                            o.write(|b| b.extend_from_slice(b"first;"));
                            o.flush().await;
                            tokio::time::sleep(2 * idle).await;
                            o.write(|b| b.extend_from_slice(b"second"));
                        })
                    } else {
                        body::Producer::new(out, async move {
                            let _dropped = Dropped(flag);
                            loop {
                                o.write(|b| b.extend_from_slice(&[b'x'; 16 * 1024]));
                                o.room().await;
                            }
                        })
                    };
                    let b = body::Body::Stream(producer, None).cut_when_stalled(idle);
                    Ok::<_, Infallible>(hyper::Response::new(b))
                }
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(65_535)
            .handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        let get = |path: &str| {
            hyper::Request::get(format!("http://{addr}{path}"))
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap()
        };
        // A silent upstream, a client that reads: the whole answer, nothing cut.
        let resp = send.send_request(get("/silent")).await.unwrap();
        let whole = resp.into_body().collect().await.expect("a silent upstream's stream was cut");
        assert_eq!(&whole.to_bytes()[..], b"first;second");
        // A client that reads nothing: cut after the idle timeout.
        let t0 = Instant::now();
        let resp = send.send_request(get("/stalled")).await.unwrap();
        while !dropped.load(Ordering::SeqCst) {
            assert!(t0.elapsed() < Duration::from_secs(20), "a stalled HTTP/2 stream was kept");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(t0.elapsed() >= idle, "cut before the idle timeout: {:?}", t0.elapsed());
        // What the window let through arrives, then the reset.
        assert!(resp.into_body().collect().await.is_err(), "a cut stream ended as if complete");
    }
}
