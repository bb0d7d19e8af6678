//! The front end over real TLS (a throwaway CA made here with rcgen): HTTP/1.1 and h2 by ALPN,
//! certificate reload seen by a new handshake, a bad new certificate keeping the old one;
//! graceful drain on shutdown, after which nothing of the daemon's holds the state store; and
//! `amq2api demo` run as a subprocess.

use crate::common;

use amq2api::emulator::EmulatorOptions;
use bytes::Bytes;
use common::certs::{Ca, ca, write_server_cert};
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use std::sync::Arc;
use std::time::Duration;

fn client_tls(ca: &Ca, alpn: &[&[u8]]) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der.clone()).unwrap();
    let mut cfg =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    cfg
}

async fn tls_harness(ca: &Ca) -> (Harness, tempfile::TempDir) {
    let tls_dir = tempfile::tempdir().unwrap();
    write_server_cert(ca, tls_dir.path(), "first");
    let setup = Setup {
        server: format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"\n",
            tls_dir.path().join("cert.pem").display(),
            tls_dir.path().join("key.pem").display()
        ),
        accounts: vec!["acct-1".into(), "acct-2".into()],
        ..Default::default()
    };
    (Harness::start(setup).await, tls_dir)
}

/// Streams a message over HTTPS with the given protocol (offered alone by ALPN); returns the
/// negotiated version and SSE.
async fn stream_over(ca: &Ca, h: &Harness, h2: bool) -> (http::Version, Vec<(String, serde_json::Value)>) {
    let alpn: &[u8] = if h2 { b"h2" } else { b"http/1.1" };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_tls(ca, &[alpn])));
    let tcp = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let tls =
        connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await.expect("TLS handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(alpn), "the server chose the offered protocol");
    let io = TokioIo::new(tls);
    let authority = format!("localhost:{}", h.addr.port());
    let req = |uri: String| {
        http::Request::post(uri)
            .header("host", &authority)
            .header("content-type", "application/json")
            .header("x-api-key", API_KEY)
            .body(Full::new(Bytes::from(simple("over TLS", true).to_string())))
            .unwrap()
    };
    let resp = if h2 {
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.unwrap();
        tokio::spawn(conn);
        sender.send_request(req(format!("https://{authority}/v1/messages"))).await
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        sender.send_request(req("/v1/messages".into())).await
    }
    .expect("HTTPS request");
    let version = resp.version();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (version, parse_sse(&String::from_utf8_lossy(&body)))
}

/// The certificate the server presents on a new handshake.
async fn presented_cert(ca: &Ca, h: &Harness) -> CertificateDer<'static> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_tls(ca, &[b"http/1.1"])));
    let tcp = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let tls = connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await.unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].clone().into_owned()
}

fn amqctl(h: &CtlHandle, args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_amqctl"))
        .arg("--socket")
        .arg(h.dir.join("control.sock"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_and_h2_over_tls_and_certificate_reload() {
    let ca = ca();
    let (h, tls_dir) = tls_harness(&ca).await;
    for h2 in [false, true] {
        let (version, frames) = stream_over(&ca, &h, h2).await;
        assert_eq!(version, if h2 { http::Version::HTTP_2 } else { http::Version::HTTP_11 });
        assert_eq!(frames.last().unwrap().0, "message_stop");
        assert!(sse_text(&frames).contains("over TLS"));
    }
    let first = presented_cert(&ca, &h).await;

    // A new certificate is used by new handshakes after a reload.
    let second = write_server_cert(&ca, tls_dir.path(), "second");
    assert_ne!(first, second);
    let h2 = h.clone_for_ctl();
    let (code, out) = tokio::task::spawn_blocking(move || amqctl(&h2, &["reload"])).await.unwrap();
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("TLS certificate reloaded"), "{out}");
    assert_eq!(presented_cert(&ca, &h).await, second);

    // A broken certificate refuses the reload (exit 78, kept for `amqctl status` and
    // `STATUS=`), and the working one stays. Before, the reload said ok and exited 0, and
    // nothing showed it until the old certificate expired.
    std::fs::write(
        tls_dir.path().join("cert.pem"),
        "-----BEGIN CERTIFICATE-----\nnot a cert\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let h3 = h.clone_for_ctl();
    let (code, out) = tokio::task::spawn_blocking(move || amqctl(&h3, &["reload"])).await.unwrap();
    assert_eq!(code, 78, "{out}");
    assert!(out.contains("the TLS certificate cannot be loaded"), "{out}");
    let status = h.ctl_json(&["status"]);
    let kept = status["config"]["last_reload_error"].as_str().unwrap_or_default().to_owned();
    assert!(kept.contains("TLS certificate"), "{status}");
    assert_eq!(presented_cert(&ca, &h).await, second);
    let (_, frames) = stream_over(&ca, &h, true).await;
    assert_eq!(frames.last().unwrap().0, "message_stop");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_streams_then_closes_them_with_an_error() {
    let setup = Setup {
        server: "drain_timeout_secs = 1".into(),
        emulator: EmulatorOptions { fragment_delay: Duration::from_millis(20), ..Default::default() },
        ..Default::default()
    };
    let h = Harness::start(setup).await;
    // A first answer: a fresh account takes one request at a time until it has answered.
    assert_eq!(post(&h, "/v1/messages", &simple("warm up", false)).await.status, 200);
    let url = h.url("/v1/messages");
    let start_stream = |text: &str| {
        let req = http::Request::post(url.clone())
            .header("content-type", "application/json")
            .header("x-api-key", API_KEY)
            .body(Full::new(Bytes::from(simple(text, true).to_string())))
            .unwrap();
        tokio::spawn(async move {
            let resp = client().request(req).await.unwrap();
            String::from_utf8_lossy(&resp.into_body().collect().await.unwrap().to_bytes()).into_owned()
        })
    };
    // One short stream that finishes inside the drain window, one that outlives it.
    let short = start_stream("short\n#emulator: long 20");
    let long = start_stream("long\n#emulator: long 5000");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stopping = tokio::spawn(h.stop());
    let short = parse_sse(&short.await.unwrap());
    assert_eq!(short.last().unwrap().0, "message_stop");
    let long = parse_sse(&long.await.unwrap());
    let last = long.last().unwrap();
    assert_eq!(last.0, "error", "{last:?}");
    assert_eq!(last.1["error"]["type"], "overloaded_error");
    assert_eq!(last.1["error"]["message"], "server shutting down");
    // The open text block is closed before the error, as for a mid-stream upstream fault.
    let before = &long[long.len() - 2];
    assert_eq!(before.0, "content_block_stop", "{before:?}");
    let open = long.iter().rev().find(|(e, _)| e == "content_block_start").unwrap();
    assert_eq!(before.1["index"], open.1["index"]);
    tokio::time::timeout(Duration::from_secs(10), stopping).await.unwrap().unwrap();
}

/// The state store's directory in a harness.
fn state_dir(h: &Harness) -> std::path::PathBuf {
    h.dir.path().join("state")
}

/// A model-catalog fetch in flight at shutdown — an API-key account behind an egress proxy
/// that takes the connection and never answers — is cancelled: `run` returns at once, the
/// proxy's connection has been closed by then, and the state store opens at once (nothing the
/// daemon spawned still holds it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catalog_fetch_in_flight_does_not_hold_the_state_store_after_run() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = format!("http://{}", silent.local_addr().unwrap());
    let setup = Setup {
        more_accounts: Some(Box::new(move |_| {
            format!(
                "[[account]]\nid = \"kiro-key\"\napi_key = \"ksk_test_0123456789abcdef\"\nproxy = \"{proxy}\"\n\n"
            )
        })),
        ..Default::default()
    };
    let mut h = Harness::start(setup).await;
    // The refresher's first round starts the key account's catalog fetch through the proxy.
    let (held, _) = tokio::time::timeout(Duration::from_secs(10), silent.accept())
        .await
        .expect("the catalog fetch reaches the proxy")
        .unwrap();
    let t0 = std::time::Instant::now();
    h.stop_only().await;
    assert!(t0.elapsed() < Duration::from_secs(5), "run took {:?} to return", t0.elapsed());
    let store = amq2api::store::Store::open(&state_dir(&h));
    assert!(store.is_ok(), "the store is still held after run returned: {:?}", store.err());
    drop(store);
    assert!(closed(held).await, "the catalog fetch's connection was closed");
}

/// Reads from a socket the daemon should have closed: end of stream or an error, within 1 s.
async fn closed<R: tokio::io::AsyncRead + Unpin>(mut r: R) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(1), r.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

/// A shutdown while work is in flight that the drain cannot finish — an HTTP/1.1 stream read
/// to its end, an h2c stream whose client never reads (its flow-control window fills), a
/// request whose body never arrives, an idle control connection, one with half a request
/// head, one with `POST /v1/refresh` running (every refresh slowed by the token endpoint) —
/// still ends: `run` returns within the drain deadline plus a few seconds, every such socket
/// has been closed by then, and the state store opens at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_shutdown_with_work_in_flight_nothing_holds_the_state_store() {
    use tokio::io::AsyncWriteExt;
    let setup = Setup {
        server: "drain_timeout_secs = 1".into(),
        accounts: vec!["acct-1".into(), "acct-2".into()],
        emulator: EmulatorOptions { token_delay: Duration::from_millis(1500), ..Default::default() },
        ..Default::default()
    };
    let mut h = Harness::start(setup).await;
    assert_eq!(post(&h, "/v1/messages", &simple("warm up", false)).await.status, 200);
    let req = |stream: bool, text: &str, uri: String| {
        let mut body = simple(text, stream);
        // Room for the whole 200 kB reply: more than the h2 window below even when the daemon
        // joins the fragments it reads together into few deltas.
        body["max_tokens"] = serde_json::json!(60_000);
        http::Request::post(uri)
            .header("content-type", "application/json")
            .header("x-api-key", API_KEY)
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap()
    };
    // An HTTP/1.1 stream, read to its end (Amazon Q sends a frame every 400 ms).
    let read_stream = {
        let r = req(true, "slow\n#emulator: slow-fragments 400", h.url("/v1/messages"));
        tokio::spawn(async move {
            let resp = client().request(r).await.unwrap();
            String::from_utf8_lossy(&resp.into_body().collect().await.unwrap().to_bytes()).into_owned()
        })
    };
    // An h2c stream (prior knowledge) whose body is never read: 200 kB of reply against a
    // 16 kB window.
    let tcp = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(16 * 1024)
        .handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    let h2_conn = tokio::spawn(conn);
    let unread = sender
        .send_request(req(true, "long\n#emulator: long 200000", format!("http://{}/v1/messages", h.addr)))
        .await
        .unwrap();
    assert_eq!(unread.status(), 200);
    // A request whose body never arrives.
    let mut no_body = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    no_body
        .write_all(
            format!(
                "POST /v1/messages HTTP/1.1\r\nhost: {}\r\nx-api-key: {API_KEY}\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{{\"model\"",
                h.addr
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    // Control connections: idle, half a request head, a refresh of every account running.
    let socket = h.dir.path().join("control.sock");
    let idle_ctl = tokio::net::UnixStream::connect(&socket).await.unwrap();
    let mut half_ctl = tokio::net::UnixStream::connect(&socket).await.unwrap();
    half_ctl.write_all(b"GET /v1/status HTTP/1.1\r\nhost: amq").await.unwrap();
    let mut refresh_ctl = tokio::net::UnixStream::connect(&socket).await.unwrap();
    refresh_ctl
        .write_all(b"POST /v1/refresh HTTP/1.1\r\nhost: amq2api\r\ncontent-length: 0\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let t0 = std::time::Instant::now();
    h.stop_only().await;
    let took = t0.elapsed();
    // Drain 1 s, 2 s more for streams told to end, the refreshes in flight (1.5 s each).
    assert!(took < Duration::from_secs(10), "run took {took:?} to return");
    let store = amq2api::store::Store::open(&state_dir(&h));
    assert!(store.is_ok(), "the store is still held after run returned: {:?}", store.err());
    drop(store);

    let read = parse_sse(&read_stream.await.unwrap());
    assert_eq!(read.last().unwrap().1["error"]["type"], "overloaded_error", "{:?}", read.last());
    // Every connection was closed by the daemon before run returned.
    let unread_body = tokio::time::timeout(Duration::from_secs(1), unread.into_body().collect()).await;
    assert!(matches!(unread_body, Ok(Err(_))), "the unread h2 stream was cut: {unread_body:?}");
    assert!(tokio::time::timeout(Duration::from_secs(1), h2_conn).await.is_ok(), "the h2 connection ended");
    assert!(closed(no_body).await, "the request without its body was closed");
    assert!(closed(idle_ctl).await, "the idle control connection was closed");
    assert!(closed(half_ctl).await, "the control connection with half a request was closed");
    assert!(closed(refresh_ctl).await, "the control connection with a refresh running was closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_answers_its_printed_curl_line() {
    use std::io::BufRead;
    // Port 0: the demo binds it and prints the address it got.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_amq2api"))
        .args(["demo", "--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let banner = tokio::task::spawn_blocking(move || {
        let mut lines = Vec::new();
        let mut reader = std::io::BufReader::new(stdout).lines();
        for line in reader.by_ref() {
            let line = line.unwrap();
            let done = line.contains("Press Ctrl-C");
            lines.push(line);
            if done {
                break;
            }
        }
        // Keep draining so the demo never writes into a closed pipe.
        std::thread::spawn(move || for _ in reader {});
        lines
    })
    .await
    .unwrap();
    let key = banner.iter().find_map(|l| l.trim().strip_prefix("API key:")).unwrap().trim().to_string();
    let curl = banner.iter().find(|l| l.trim_start().starts_with("curl ")).expect("a curl line");
    let port: u16 = curl
        .split("http://127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .and_then(|p| p.parse().ok())
        .expect("the curl line names the bound port");
    assert_ne!(port, 0);
    assert!(curl.contains(&format!("http://127.0.0.1:{port}/v1/messages")) && curl.contains(&key));
    assert!(banner.iter().any(|l| l.contains(&format!("ANTHROPIC_BASE_URL=http://127.0.0.1:{port}"))));
    let body = banner.iter().skip_while(|l| !l.contains("curl ")).nth(1).unwrap();
    let json = body.trim().trim_start_matches("-d '").trim_end_matches('\'');
    let req = http::Request::post(format!("http://127.0.0.1:{port}/v1/messages"))
        .header("content-type", "application/json")
        .header("x-api-key", &key)
        .body(Full::new(Bytes::from(json.to_string())))
        .unwrap();
    let r = send(req).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let frames = r.sse();
    assert_eq!(frames.last().unwrap().0, "message_stop");
    assert!(sse_text(&frames).contains("Hello!"));
    // The generated config's path, and an export line that the real amqctl takes as it is.
    let config =
        banner.iter().find_map(|l| l.trim().strip_prefix("Configuration:")).expect("the config path");
    assert!(std::path::Path::new(config.trim()).is_file(), "{config}");
    let socket =
        banner.iter().find_map(|l| l.trim().strip_prefix("export AMQ2API_SOCKET=")).expect("an export line");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_amqctl"))
        .args(["--json", "status"])
        .env("AMQ2API_SOCKET", socket)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM)
        .unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
    assert_eq!(status.code(), Some(0));
}
