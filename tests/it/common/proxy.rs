//! Small egress proxies for the tests, on loopback: a SOCKS5 server (no authentication, or
//! username/password) and an HTTP `CONNECT` server (optionally with `Proxy-Authorization:
//! Basic`). Each records every connection it takes: its peer, the target it was asked for, and
//! the bytes the client sent through the tunnel (the emulator speaks plain HTTP, so a test can
//! see which calls went through). Dead proxies too: one that hangs up at once, one that never
//! answers.

use base64::Engine as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Which protocol the proxy speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Socks5,
    HttpConnect,
    /// Takes each connection and closes it at once.
    HangUp,
    /// Takes each connection and never answers (until the client goes away).
    Silent,
}

/// One connection the proxy took.
#[derive(Debug, Clone, Default)]
pub struct Tunnel {
    /// Who connected.
    pub peer: Option<SocketAddr>,
    /// The target as asked for (`host:port`; a SOCKS5 IPv6 address in brackets); `None` when
    /// the client never got that far.
    pub target: Option<String>,
    /// The proxy's own address towards the target, once connected.
    pub outbound: Option<SocketAddr>,
    /// Credentials were asked for and the client's were wrong.
    pub auth_refused: bool,
    /// Everything the client sent through the tunnel.
    pub sent: Vec<u8>,
}

#[derive(Default)]
struct Log {
    tunnels: Vec<Arc<Mutex<Tunnel>>>,
}

/// A running test proxy; it stops taking connections when dropped.
pub struct TestProxy {
    pub addr: SocketAddr,
    log: Arc<Mutex<Log>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestProxy {
    /// A proxy on 127.0.0.1, on a free port; `auth` is the user name and password it demands.
    pub async fn start(protocol: Protocol, auth: Option<(&str, &str)>) -> TestProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        TestProxy::serve(listener, protocol, auth)
    }

    /// A proxy serving `listener`.
    pub fn serve(listener: TcpListener, protocol: Protocol, auth: Option<(&str, &str)>) -> TestProxy {
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(Mutex::new(Log::default()));
        let auth = auth.map(|(u, p)| (u.to_owned(), p.to_owned()));
        let task = tokio::spawn({
            let log = log.clone();
            async move {
                loop {
                    let Ok((sock, peer)) = listener.accept().await else { continue };
                    let tunnel = Arc::new(Mutex::new(Tunnel { peer: Some(peer), ..Default::default() }));
                    log.lock().unwrap().tunnels.push(tunnel.clone());
                    let auth = auth.clone();
                    tokio::spawn(async move {
                        let _ = match protocol {
                            Protocol::Socks5 => socks5(sock, auth, tunnel).await,
                            Protocol::HttpConnect => http_connect(sock, auth, tunnel).await,
                            Protocol::HangUp => {
                                drop(sock);
                                Ok(())
                            }
                            Protocol::Silent => {
                                let mut sock = sock;
                                let mut sink = [0u8; 1024];
                                while sock.read(&mut sink).await.is_ok_and(|n| n > 0) {}
                                Ok(())
                            }
                        };
                    });
                }
            }
        });
        TestProxy { addr, log, task }
    }

    /// The URL an account names it by, with `user:password@` when given.
    pub fn url(&self, scheme: &str, auth: Option<(&str, &str)>) -> String {
        match auth {
            Some((u, p)) => format!("{scheme}://{u}:{p}@{}", self.addr),
            None => format!("{scheme}://{}", self.addr),
        }
    }

    /// Every connection taken so far.
    pub fn tunnels(&self) -> Vec<Tunnel> {
        self.log.lock().unwrap().tunnels.iter().map(|t| t.lock().unwrap().clone()).collect()
    }

    /// How many times `needle` occurs in everything clients sent through the tunnels.
    pub fn count_sent(&self, needle: &str) -> usize {
        self.tunnels().iter().map(|t| count(&t.sent, needle.as_bytes())).sum()
    }
}

fn count(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

type Result = std::io::Result<()>;

fn bad(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned())
}

async fn socks5(mut sock: TcpStream, auth: Option<(String, String)>, tunnel: Arc<Mutex<Tunnel>>) -> Result {
    let mut head = [0u8; 2];
    sock.read_exact(&mut head).await?;
    let mut methods = vec![0u8; head[1] as usize];
    sock.read_exact(&mut methods).await?;
    if head[0] != 5 {
        return Err(bad("not SOCKS5"));
    }
    match &auth {
        None if methods.contains(&0) => sock.write_all(&[5, 0]).await?,
        Some((user, password)) if methods.contains(&2) => {
            sock.write_all(&[5, 2]).await?;
            let mut v = [0u8; 2];
            sock.read_exact(&mut v).await?;
            let mut u = vec![0u8; v[1] as usize];
            sock.read_exact(&mut u).await?;
            let mut plen = [0u8; 1];
            sock.read_exact(&mut plen).await?;
            let mut p = vec![0u8; plen[0] as usize];
            sock.read_exact(&mut p).await?;
            if u != user.as_bytes() || p != password.as_bytes() {
                tunnel.lock().unwrap().auth_refused = true;
                sock.write_all(&[1, 1]).await?;
                return Ok(());
            }
            sock.write_all(&[1, 0]).await?;
        }
        _ => {
            sock.write_all(&[5, 0xff]).await?;
            return Ok(());
        }
    }
    let mut req = [0u8; 4];
    sock.read_exact(&mut req).await?;
    if req[..3] != [5, 1, 0] {
        return Err(bad("not CONNECT"));
    }
    let host = match req[3] {
        1 => {
            let mut a = [0u8; 4];
            sock.read_exact(&mut a).await?;
            std::net::Ipv4Addr::from(a).to_string()
        }
        4 => {
            let mut a = [0u8; 16];
            sock.read_exact(&mut a).await?;
            format!("[{}]", std::net::Ipv6Addr::from(a))
        }
        3 => {
            let mut len = [0u8; 1];
            sock.read_exact(&mut len).await?;
            let mut name = vec![0u8; len[0] as usize];
            sock.read_exact(&mut name).await?;
            String::from_utf8(name).map_err(|_| bad("name"))?
        }
        _ => return Err(bad("address type")),
    };
    let mut port = [0u8; 2];
    sock.read_exact(&mut port).await?;
    let target = format!("{host}:{}", u16::from_be_bytes(port));
    tunnel.lock().unwrap().target = Some(target.clone());
    match TcpStream::connect(target.as_str()).await {
        Ok(upstream) => {
            sock.write_all(&[5, 0, 0, 1, 0, 0, 0, 0, 0, 0]).await?;
            pipe(sock, upstream, tunnel).await
        }
        Err(_) => sock.write_all(&[5, 5, 0, 1, 0, 0, 0, 0, 0, 0]).await,
    }
}

async fn http_connect(
    mut sock: TcpStream,
    auth: Option<(String, String)>,
    tunnel: Arc<Mutex<Tunnel>>,
) -> Result {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        if sock.read(&mut b).await? == 0 {
            return Err(bad("closed before the head's end"));
        }
        head.push(b[0]);
    }
    let head = String::from_utf8(head).map_err(|_| bad("head"))?;
    let mut lines = head.split("\r\n");
    let target = match lines.next().unwrap_or("").split(' ').collect::<Vec<_>>()[..] {
        ["CONNECT", target, "HTTP/1.1"] => target.to_owned(),
        _ => return Err(bad("not CONNECT")),
    };
    tunnel.lock().unwrap().target = Some(target.clone());
    if let Some((user, password)) = &auth {
        let want = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        );
        let given = lines.find_map(|l| {
            l.split_once(':')
                .filter(|(k, _)| k.eq_ignore_ascii_case("proxy-authorization"))
                .map(|(_, v)| v.trim().to_owned())
        });
        if given.as_deref() != Some(want.as_str()) {
            tunnel.lock().unwrap().auth_refused = given.is_some();
            return sock
                .write_all(
                    b"HTTP/1.1 407 Proxy Authentication Required\r\n\
                      Proxy-Authenticate: Basic realm=\"test\"\r\nContent-Length: 0\r\n\r\n",
                )
                .await;
        }
    }
    match TcpStream::connect(target.as_str()).await {
        Ok(upstream) => {
            sock.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").await?;
            pipe(sock, upstream, tunnel).await
        }
        Err(_) => sock.write_all(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n").await,
    }
}

/// Carries bytes both ways until both sides are done, recording what the client sent.
async fn pipe(client: TcpStream, upstream: TcpStream, tunnel: Arc<Mutex<Tunnel>>) -> Result {
    tunnel.lock().unwrap().outbound = upstream.local_addr().ok();
    let (mut cr, mut cw) = client.into_split();
    let (mut ur, mut uw) = upstream.into_split();
    let up = async {
        let mut buf = [0u8; 8192];
        loop {
            let n = cr.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            tunnel.lock().unwrap().sent.extend_from_slice(&buf[..n]);
            uw.write_all(&buf[..n]).await?;
        }
        uw.shutdown().await
    };
    let down = async {
        tokio::io::copy(&mut ur, &mut cw).await?;
        cw.shutdown().await
    };
    let (a, b) = tokio::join!(up, down);
    a.and(b)
}
