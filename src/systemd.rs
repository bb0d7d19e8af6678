//! systemd integration: `sd_notify` states (READY, STATUS, RELOADING, STOPPING, EXTEND_TIMEOUT_USEC), the watchdog,
//! and sockets passed by socket activation (`LISTEN_FDS`/`LISTEN_FDNAMES`). Everything is a
//! no-op outside systemd. Taking over inherited descriptors is done by the `listenfd` crate,
//! so this crate stays free of `unsafe`.

use sd_notify::NotifyState;
use std::time::Duration;

/// True when a service manager listens for notifications.
pub fn under_systemd() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// `READY=1` with a status line.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `STATUS=…`: the line `systemctl status` shows.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// `RELOADING=1` with `MONOTONIC_USEC=` (required by `Type=notify-reload`).
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// `EXTEND_TIMEOUT_USEC=…` while stopping: the next step may take up to `d` (the drain, storing
/// a token whose refresh is in flight), so systemd's `TimeoutStopSec` does not kill the process
/// first (a refresh token rotated and not stored is lost).
pub fn extend_stop(d: Duration) {
    let usec = u32::try_from(d.as_micros()).unwrap_or(u32::MAX);
    send(&[NotifyState::ExtendTimeoutUsec(usec)]);
}

/// `STOPPING=1`.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("draining in-flight requests")]);
}

/// The watchdog interval systemd asked for (`WATCHDOG_USEC`, for this process).
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
}

/// Pings the watchdog at half its interval until `stop`. The pings come from a task on the
/// runtime: a wedged runtime (every worker blocked) stops pinging and systemd restarts the
/// service.
pub async fn run_watchdog(interval: Duration, mut shutdown: crate::shutdown::Shutdown) {
    let mut tick = tokio::time::interval(interval / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.recv() => break,
            _ = tick.tick() => send(&[NotifyState::Watchdog]),
        }
    }
}

/// Keeps `STATUS=` current: sends the line `status` gives whenever it changes (checked every
/// 2 s) until the stop.
pub async fn keep_status(status: impl Fn() -> String, mut shutdown: crate::shutdown::Shutdown) {
    let mut last = String::new();
    loop {
        let line = status();
        if line != last {
            self::status(&line);
            last = line;
        }
        tokio::select! {
            _ = shutdown.recv() => break,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

/// TCP listeners passed by systemd socket activation, with their names (`FileDescriptorName=`,
/// for the log: every passed TCP listener is served, whatever its name, so that sockets added
/// with `systemctl edit amq2api.socket` need no name of their own). Empty when the process was
/// not socket-activated. A passed TCP socket that is not listening (a `.socket` unit with
/// `Accept=yes` passes each connection instead) is an error of kind `InvalidInput`: accepting on
/// it fails at once, every time, and the daemon would serve nothing.
pub fn listeners() -> std::io::Result<Vec<(String, std::net::TcpListener)>> {
    let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
        .map(|n| n.split(':').map(str::to_string).collect())
        .unwrap_or_default();
    let mut fds = listenfd::ListenFd::from_env();
    let mut out = Vec::new();
    for i in 0..fds.len() {
        let name = names.get(i).cloned().unwrap_or_else(|| format!("fd{}", i + 3));
        match fds.take_tcp_listener(i) {
            Ok(Some(l)) => {
                if !nix::sys::socket::getsockopt(&l, nix::sys::socket::sockopt::AcceptConn)
                    .map_err(std::io::Error::from)?
                {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!(
                            "the socket {name} systemd passed is not listening (a .socket unit with Accept=yes passes \
                             connections, one service per connection); amq2api.socket needs Accept=no (the default)"
                        ),
                    ));
                }
                out.push((name, l))
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(name = %name, error = %e, "ignoring a passed descriptor that is not a TCP listener")
            }
        }
    }
    // listenfd has removed LISTEN_FDS and LISTEN_PID, so children do not take the sockets.
    Ok(out)
}
