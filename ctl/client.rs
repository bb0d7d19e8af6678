//! The control-socket client: one HTTP/1.1 request over the daemon's Unix socket, its answer
//! decoded into the library's wire types; no socket, a refused caller and an error answer
//! become a [`Failure`] with the exit code they mean.

use crate::failure::{Failure, fail};
use amq2api::control::wire::ErrorBody;
use amq2api::exit;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::path::Path;

/// How long amqctl waits for the daemon's whole answer: a stopped or wedged daemon still
/// accepts connections (the kernel queues them), and would otherwise hang amqctl for good.
/// Actions (`reload`, `refresh`, `check`) may wait on the store, a token endpoint or the
/// service; reads answer from memory.
fn deadline(method: &str) -> std::time::Duration {
    let default = if method == "GET" { 30 } else { 300 };
    std::time::Duration::from_secs(TIMEOUT.get().copied().flatten().unwrap_or(default))
}

/// `--timeout` (`AMQCTL_TIMEOUT`), set once at the start.
static TIMEOUT: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();

/// Sets `--timeout` for every call that follows.
pub fn set_timeout(secs: Option<u64>) {
    let _ = TIMEOUT.set(secs);
}

/// One request to the daemon, within [`deadline`].
async fn call(socket: &Path, method: &str, path: &str) -> Result<(u16, Bytes), Failure> {
    let limit = deadline(method);
    tokio::time::timeout(limit, exchange(socket, method, path)).await.unwrap_or_else(|_| {
        Err(fail(
            exit::UNAVAILABLE,
            format!(
                "amq2api did not answer on {} within {}s (stopped or wedged? see systemctl status amq2api)",
                socket.display(),
                limit.as_secs()
            ),
        ))
    })
}

async fn exchange(socket: &Path, method: &str, path: &str) -> Result<(u16, Bytes), Failure> {
    let stream = tokio::net::UnixStream::connect(socket).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            fail(exit::UNAVAILABLE, not_running(socket, e.kind() == std::io::ErrorKind::NotFound))
        }
        std::io::ErrorKind::PermissionDenied => permission_denied(socket),
        _ => fail(exit::UNAVAILABLE, format!("cannot connect to {}: {e}", socket.display())),
    })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .map_err(|e| fail(exit::UNAVAILABLE, format!("control socket handshake failed: {e}")))?;
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .map_err(|e| fail(exit::SOFTWARE, e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| fail(exit::UNAVAILABLE, format!("control request failed: {e}")))?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| fail(exit::UNAVAILABLE, format!("reading the answer: {e}")))?
        .to_bytes();
    if status == 403 {
        // Root-only calls (export) say why themselves; the rest is the group rule.
        if let Ok(e) = serde_json::from_slice::<ErrorBody>(&body)
            && e.error.contains("root only")
        {
            return Err(fail(exit::NOPERM, e.error));
        }
        return Err(permission_denied(socket));
    }
    if status >= 400 {
        let msg = serde_json::from_slice::<ErrorBody>(&body)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&body).into());
        return Err(fail(if status == 404 { exit::USAGE } else { exit::FAILURE }, msg));
    }
    Ok((status, body))
}

/// "Not running", with a hint that fits the socket named: systemd's for the packaged daemon's
/// socket, else the daemon whose `[control] socket` it is (the demo prints its own).
fn not_running(socket: &Path, missing: bool) -> String {
    let what = if missing { "no socket at" } else { "nothing answers on" };
    if socket == Path::new(crate::cli::DEFAULT_SOCKET) {
        format!(
            "amq2api is not running ({what} {}); start it with: systemctl start amq2api \
             (or name another daemon's socket with --socket or AMQ2API_SOCKET)",
            socket.display()
        )
    } else {
        format!(
            "amq2api is not running ({what} {}); start the daemon whose [control] socket this is \
             (amq2api --config FILE; amq2api demo prints its socket), or name the right socket with \
             --socket or AMQ2API_SOCKET",
            socket.display()
        )
    }
}

fn permission_denied(socket: &Path) -> Failure {
    fail(
        exit::NOPERM,
        format!(
            "permission denied on {}: add yourself to group amq2api (sudo usermod -aG amq2api $USER, then log in again) or run as root",
            socket.display()
        ),
    )
}

/// One request whose answer is JSON of type `T`; returns it and the raw body (for `--json`).
pub async fn get<T: serde::de::DeserializeOwned>(
    socket: &Path,
    method: &str,
    path: &str,
) -> Result<(T, Bytes), Failure> {
    let (_, body) = call(socket, method, path).await?;
    let v = serde_json::from_slice(&body)
        .map_err(|e| fail(exit::SOFTWARE, format!("unexpected answer from the daemon: {e}")))?;
    Ok((v, body))
}
