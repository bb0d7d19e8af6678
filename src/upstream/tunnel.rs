//! An account's egress proxy: the TCP stream to an upstream host, opened through the proxy the
//! account's `proxy` names. `http://` is an HTTP `CONNECT` tunnel (with `Proxy-Authorization:
//! Basic` when the URL carries `user:password`); `socks5://` is SOCKS5 with the host resolved
//! here, `socks5h://` SOCKS5 with the host resolved by the proxy, both with username/password
//! authentication when the URL carries credentials. TLS to the upstream then runs inside the
//! stream, as on a direct connection.
//!
//! No error here carries the proxy's password: the callers name the proxy by its `Display`,
//! which redacts it.

use crate::config::{Proxy, ProxyScheme};
use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_socks::TargetAddr;
use tokio_socks::tcp::Socks5Stream;

/// The most a proxy's answer to `CONNECT` may take, head and all.
const MAX_CONNECT_ANSWER: usize = 8 * 1024;

/// Why no tunnel to the target could be opened. Nothing was sent to the target.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("cannot reach the proxy: {0}")]
    Reach(std::io::Error),
    #[error("the proxy refused the user name and password")]
    AuthRefused,
    #[error("the proxy wants a user name and password, and the proxy URL has none")]
    AuthRequired,
    #[error("the proxy refused the tunnel: {0}")]
    Refused(String),
    #[error("resolving {host}: {reason}")]
    Resolve { host: String, reason: String },
    #[error("the proxy's answer is malformed: {0}")]
    Malformed(String),
    #[error("talking to the proxy: {0}")]
    Io(std::io::Error),
    #[error("SOCKS5: {0}")]
    Socks(tokio_socks::Error),
    /// No tunnel, with TLS through it, within the connect timeout.
    #[error("no tunnel within {} s", .0.as_secs())]
    Timeout(std::time::Duration),
}

impl TunnelError {
    /// The target could not be reached through a working proxy (the proxy could not or would
    /// not connect to it, or its name did not resolve): another endpoint might do. Every other
    /// failure is the proxy's own (down, credentials refused, not speaking its protocol), and
    /// no endpoint can be reached through it.
    pub fn target_unreachable(&self) -> bool {
        match self {
            // Not the target's: the proxy wants other credentials or limits the account
            // (`HTTP/1.1 407 …`, 429). A 403 is often a destination not on the proxy's
            // allow-list: another endpoint may do.
            TunnelError::Refused(line) => !matches!(line.split_whitespace().nth(1), Some("407" | "429")),
            TunnelError::Resolve { .. } => true,
            TunnelError::Socks(e) => target_unreachable(e),
            _ => false,
        }
    }
}

/// A TCP stream to `host:port` through `proxy`, ready for TLS or HTTP.
pub async fn open(proxy: &Proxy, host: &str, port: u16) -> Result<TcpStream, TunnelError> {
    match proxy.scheme {
        ProxyScheme::Http => http_connect(proxy, host, port).await,
        ProxyScheme::Socks5 { remote_dns } => socks5(proxy, remote_dns, host, port).await,
    }
}

async fn dial(proxy: &Proxy) -> Result<TcpStream, TunnelError> {
    TcpStream::connect((proxy.host.as_str(), proxy.port)).await.map_err(TunnelError::Reach)
}

/// `host:port` as a request target: an IPv6 address in brackets.
fn authority(host: &str, port: u16) -> String {
    if host.parse::<std::net::Ipv6Addr>().is_ok() {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// `CONNECT host:port`; the stream once the proxy answered 2xx. The proxy must not send
/// anything past its answer's head (the client speaks first, in TLS as in HTTP).
async fn http_connect(proxy: &Proxy, host: &str, port: u16) -> Result<TcpStream, TunnelError> {
    use base64::Engine as _;
    let mut tcp = dial(proxy).await?;
    let target = authority(host, port);
    let mut head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some((user, password)) = &proxy.auth {
        let pair = zeroize::Zeroizing::new(format!("{user}:{}", password.expose()));
        let token =
            zeroize::Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(pair.as_bytes()));
        head.push_str("Proxy-Authorization: Basic ");
        head.push_str(&token);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    let head = zeroize::Zeroizing::new(head);
    tcp.write_all(head.as_bytes()).await.map_err(TunnelError::Io)?;

    let mut answer = Vec::with_capacity(256);
    let end = loop {
        if let Some(i) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if answer.len() >= MAX_CONNECT_ANSWER {
            return Err(TunnelError::Malformed(format!("no end of head within {MAX_CONNECT_ANSWER} bytes")));
        }
        let mut chunk = [0u8; 1024];
        let n = tcp.read(&mut chunk).await.map_err(TunnelError::Io)?;
        if n == 0 {
            return Err(TunnelError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the proxy closed the connection before answering CONNECT",
            )));
        }
        answer.extend_from_slice(&chunk[..n]);
    };
    let status_line = answer.split(|b| *b == b'\n').next().unwrap_or_default();
    let status_line = String::from_utf8_lossy(status_line).trim().chars().take(200).collect::<String>();
    let mut parts = status_line.split_whitespace();
    let status = match (parts.next(), parts.next().and_then(|s| s.parse::<u16>().ok())) {
        (Some(v), Some(s)) if v.starts_with("HTTP/1.") => s,
        _ => return Err(TunnelError::Malformed(format!("status line {status_line:?}"))),
    };
    match status {
        200..=299 if end == answer.len() => Ok(tcp),
        200..=299 => Err(TunnelError::Malformed("data after the answer to CONNECT".into())),
        407 if proxy.auth.is_some() => Err(TunnelError::AuthRefused),
        407 => Err(TunnelError::AuthRequired),
        _ => Err(TunnelError::Refused(status_line)),
    }
}

/// SOCKS5 `CONNECT`. Resolved here (`socks5://`), each address is tried in turn while the
/// proxy reports the target unreachable; the first failure of any other kind ends it.
async fn socks5(proxy: &Proxy, remote_dns: bool, host: &str, port: u16) -> Result<TcpStream, TunnelError> {
    let targets: Vec<TargetAddr<'_>> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![TargetAddr::Ip(SocketAddr::new(ip, port))],
        Err(_) if remote_dns => vec![TargetAddr::Domain(Cow::Borrowed(host), port)],
        Err(_) => {
            let resolve = |reason: String| TunnelError::Resolve { host: host.to_owned(), reason };
            let addrs: Vec<_> =
                tokio::net::lookup_host((host, port)).await.map_err(|e| resolve(e.to_string()))?.collect();
            if addrs.is_empty() {
                return Err(resolve("no address".into()));
            }
            addrs.into_iter().map(TargetAddr::Ip).collect()
        }
    };
    let mut last = None;
    for target in targets {
        let tcp = dial(proxy).await?;
        let connected = match &proxy.auth {
            Some((user, password)) => {
                Socks5Stream::connect_with_password_and_socket(tcp, target, user, password.expose()).await
            }
            None => Socks5Stream::connect_with_socket(tcp, target).await,
        };
        match connected {
            Ok(stream) => return Ok(stream.into_inner()),
            Err(e) if target_unreachable(&e) => last = Some(e),
            Err(e) => return Err(socks_error(e, proxy)),
        }
    }
    Err(socks_error(last.expect("at least one target was tried"), proxy))
}

/// The proxy could not reach this address of the target (another address may do).
fn target_unreachable(e: &tokio_socks::Error) -> bool {
    use tokio_socks::Error as E;
    matches!(e, E::ConnectionRefused | E::HostUnreachable | E::NetworkUnreachable | E::TtlExpired)
}

fn socks_error(e: tokio_socks::Error, proxy: &Proxy) -> TunnelError {
    use tokio_socks::Error as E;
    match e {
        E::PasswordAuthFailure(_) => TunnelError::AuthRefused,
        E::NoAcceptableAuthMethods if proxy.auth.is_none() => TunnelError::AuthRequired,
        E::Io(e) => TunnelError::Io(e),
        e => TunnelError::Socks(e),
    }
}
