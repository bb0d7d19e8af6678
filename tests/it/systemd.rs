//! The daemon binary under (a stand-in for) systemd: a real `NOTIFY_SOCKET` datagram socket
//! read by the test (READY, STATUS, WATCHDOG, RELOADING with MONOTONIC_USEC, STOPPING), exit
//! codes, and socket activation through `systemd-socket-activate` (real `LISTEN_FDS`).

use crate::common;

use amq2api::emulator::{Emulator, EmulatorOptions};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
    _emulator: Emulator,
}

async fn setup(listen: &str) -> Setup {
    let emulator = Emulator::start(EmulatorOptions::default()).await.unwrap();
    emulator.add_account(&common::client_id("acct-1"), "secret-acct-1", "refresh-acct-1");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("accounts.toml"), common::accounts_toml(&["acct-1".to_string()])).unwrap();
    let config = dir.path().join("amq2api.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = [\"{listen}\"]\ndrain_timeout_secs = 1\n[auth]\napi_keys = [\"{}\"]\n\
             [upstream]\nendpoint = \"{}\"\ntoken_endpoint = \"{}\"\n[accounts]\nfile = \"accounts.toml\"\n\
             [state]\ndir = \"state\"\n[control]\nsocket = \"control.sock\"\n",
            common::API_KEY,
            emulator.endpoint(),
            emulator.token_endpoint()
        ),
    )
    .unwrap();
    Setup { dir, config, _emulator: emulator }
}

fn notify_socket(dir: &Path) -> (UnixDatagram, PathBuf) {
    let path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    (sock, path)
}

/// Reads notifications until one contains `want`, returning everything read.
fn wait_for(sock: &UnixDatagram, want: &str, within: Duration) -> Vec<String> {
    let t0 = Instant::now();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while t0.elapsed() < within {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = msg.lines().any(|l| l == want || l.starts_with(want));
            seen.push(msg);
            if done {
                return seen;
            }
        }
    }
    panic!("no {want:?} within {within:?}; got {seen:?}");
}

fn signal(child: &Child, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig).unwrap();
}

fn wait_exit(child: &mut Child, within: Duration) -> i32 {
    let t0 = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st.code().unwrap_or(-1);
        }
        if t0.elapsed() > within {
            let _ = child.kill();
            panic!("the daemon did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn notify_watchdog_reload_and_stop() {
    let s = setup("127.0.0.1:0").await;
    let (sock, path) = notify_socket(s.dir.path());
    let mut child = Command::new(env!("CARGO_BIN_EXE_amq2api"))
        .arg("--config")
        .arg(&s.config)
        .env("NOTIFY_SOCKET", &path)
        .env("WATCHDOG_USEC", "400000")
        .env_remove("WATCHDOG_PID")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let child_ref = &mut child;
    let result = tokio::task::spawn_blocking({
        let sock = sock.try_clone().unwrap();
        let pid = child_ref.id();
        move || {
            let seen = wait_for(&sock, "READY=1", Duration::from_secs(15));
            let all = seen.join("\n");
            assert!(all.contains("STATUS=serving "), "{all}");
            wait_for(&sock, "WATCHDOG=1", Duration::from_secs(2));
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGHUP)
                .unwrap();
            let seen = wait_for(&sock, "RELOADING=1", Duration::from_secs(5));
            let reload_msg = seen.last().unwrap().clone();
            assert!(reload_msg.contains("MONOTONIC_USEC="), "{reload_msg}");
            wait_for(&sock, "READY=1", Duration::from_secs(5));
        }
    })
    .await;
    if let Err(e) = result {
        let _ = child.kill();
        std::panic::resume_unwind(e.into_panic());
    }
    signal(&child, nix::sys::signal::Signal::SIGTERM);
    wait_for(&sock, "STOPPING=1", Duration::from_secs(5));
    // The stop asks systemd for the time it needs (the drain, then storing tokens whose
    // refresh is in flight), so TimeoutStopSec does not kill it with a rotated token unstored.
    let extended = |seen: Vec<String>| -> u64 {
        let last = seen.last().unwrap().clone();
        last.lines().find_map(|l| l.strip_prefix("EXTEND_TIMEOUT_USEC=")).unwrap().parse().unwrap()
    };
    let drain = extended(wait_for(&sock, "EXTEND_TIMEOUT_USEC=", Duration::from_secs(5)));
    assert!(drain >= 15_000_000, "{drain} µs for the drain");
    // Then the bound of a refresh in flight (connect timeout + 35 s) and a margin.
    let tokens = extended(wait_for(&sock, "EXTEND_TIMEOUT_USEC=", Duration::from_secs(5)));
    assert!(tokens >= 50_000_000, "{tokens} µs for storing tokens");
    assert_eq!(wait_exit(&mut child, Duration::from_secs(15)), 0, "a clean stop exits 0");
}

#[tokio::test]
async fn bad_config_exits_78() {
    let s = setup("127.0.0.1:0").await;
    std::fs::write(s.dir.path().join("accounts.toml"), "[[account]]\nid = \"Bad Id\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_amq2api")).arg("--config").arg(&s.config).output().unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("accounts.toml:2:6: error"));
}

/// The daemon as systemd starts it with socket activation, by hand: `fd` passed as fd 3 with
/// LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID (the daemon's own pid: the shell exports its pid,
/// then becomes the daemon with exec). bash, not sh: dash takes only one-digit descriptors in a
/// redirection. `fd` must not be close-on-exec.
fn activated(config: &Path, fd: &impl std::os::fd::AsFd) -> Command {
    use std::os::fd::AsRawFd;
    nix::fcntl::fcntl(fd.as_fd(), nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty())).unwrap();
    let mut c = Command::new("bash");
    c.arg("-c")
        .arg("export LISTEN_PID=$$; exec \"$0\" --config \"$1\" 3<&\"$2\"")
        .arg(env!("CARGO_BIN_EXE_amq2api"))
        .arg(config)
        .arg(fd.as_fd().as_raw_fd().to_string())
        .env("LISTEN_FDS", "1")
        .env("LISTEN_FDNAMES", "https");
    c
}

/// The daemon started on `listener` as systemd passes it, telling `notify` when it is ready.
fn spawn_activated(config: &Path, listener: &std::net::TcpListener, notify: &Path) -> Child {
    activated(config, listener)
        .env("NOTIFY_SOCKET", notify)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn socket_activation_serves_the_passed_socket() {
    // The configured address must not be used when systemd passes a socket.
    let s = setup("127.0.0.1:0").await;
    let (sock, path) = notify_socket(s.dir.path());
    // The socket is bound here (port 0, never freed and reused) and passed as systemd does.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let mut child = spawn_activated(&s.config, &listener, &path);
    drop(listener);
    let t0 = Instant::now();
    let stream = loop {
        match std::net::TcpStream::connect(&addr) {
            Ok(s) => break s,
            Err(_) if t0.elapsed() < Duration::from_secs(5) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => {
                let _ = child.kill();
                panic!("cannot connect: {e}");
            }
        }
    };
    drop(stream);
    let ready = tokio::task::spawn_blocking({
        let sock = sock.try_clone().unwrap();
        move || wait_for(&sock, "READY=1", Duration::from_secs(15))
    })
    .await;
    if ready.is_err() {
        let _ = child.kill();
        panic!("not ready");
    }
    let req = http::Request::get(format!("http://{addr}/health"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let r = common::send(req).await;
    assert_eq!(r.status, 200, "{}", r.text());
    signal(&child, nix::sys::signal::Signal::SIGTERM);
    assert_eq!(wait_exit(&mut child, Duration::from_secs(15)), 0);
}

/// A passed socket that is not listening (a `.socket` unit with `Accept=yes` passes each
/// connection) is refused at start-up with exit 78 and a message naming the fix: accepting on
/// it would fail at once, every time, and the daemon would serve nothing.
#[tokio::test(flavor = "multi_thread")]
async fn socket_activation_refuses_a_socket_that_is_not_listening() {
    let s = setup("127.0.0.1:0").await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let conn = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (accepted, _) = listener.accept().unwrap();
    let out = activated(&s.config, &accepted).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(stderr.contains("not listening") && stderr.contains("Accept=no"), "{stderr}");
    drop((conn, accepted));
}

/// Anonymous access is loopback-only for the sockets systemd passes too (`listen`, which the
/// configuration check looks at, is ignored then).
#[tokio::test(flavor = "multi_thread")]
async fn socket_activation_refuses_anonymous_access_on_a_public_socket() {
    let s = setup("127.0.0.1:0").await;
    let text = std::fs::read_to_string(&s.config).unwrap();
    let text = text.replace(&format!("api_keys = [\"{}\"]", common::API_KEY), "allow_anonymous = true");
    let text = text.replace("[server]\n", "[server]\nallow_plaintext = true\n");
    std::fs::write(&s.config, text).unwrap();
    let listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let out = activated(&s.config, &listener).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(stderr.contains("allow_anonymous") && stderr.contains("loopback"), "{stderr}");
}

/// A reload may not open a running public listener to anonymous access: the file's own check
/// looks at `listen`, which applies only at a restart (and is ignored for passed sockets), so
/// the reload checks the sockets the daemon serves. Before, the new `[auth]` applied at once.
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_never_opens_a_public_socket_to_anonymous_access() {
    let s = setup("127.0.0.1:0").await;
    let text = std::fs::read_to_string(&s.config).unwrap();
    std::fs::write(&s.config, text.replace("[server]\n", "[server]\nallow_plaintext = true\n")).unwrap();
    let (sock, path) = notify_socket(s.dir.path());
    let listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut child = spawn_activated(&s.config, &listener, &path);
    drop(listener);
    let ready =
        tokio::task::spawn_blocking(move || wait_for(&sock, "READY=1", Duration::from_secs(15))).await;
    if ready.is_err() {
        let _ = child.kill();
        panic!("not ready");
    }
    let text = std::fs::read_to_string(&s.config).unwrap();
    std::fs::write(
        &s.config,
        text.replace(&format!("api_keys = [\"{}\"]", common::API_KEY), "allow_anonymous = true"),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_amqctl"))
        .arg("--socket")
        .arg(s.dir.path().join("control.sock"))
        .arg("reload")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(stderr.contains("allow_anonymous") && stderr.contains("loopback"), "{stderr}");
    let keyless = http::Request::get(format!("http://127.0.0.1:{port}/v1/models"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    assert_eq!(common::send(keyless).await.status, 401, "anonymous access opened on a public socket");
    signal(&child, nix::sys::signal::Signal::SIGTERM);
    assert_eq!(wait_exit(&mut child, Duration::from_secs(15)), 0);
}

/// Under systemd with a journal (`JOURNAL_STREAM` set), each entry goes to journald's native
/// socket — here one the test binds, named by `AMQ2API_JOURNAL_SOCKET` — and its `MESSAGE` reads
/// completely, as the terminal line does: the access log of a request names its status, account
/// and model in the message itself, not only in separate fields.
#[tokio::test(flavor = "multi_thread")]
async fn journal_messages_carry_their_fields() {
    let s = setup("127.0.0.1:0").await;
    let journal_path = s.dir.path().join("journal.sock");
    let journal = UnixDatagram::bind(&journal_path).unwrap();
    journal.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let (sock, path) = notify_socket(s.dir.path());
    let mut child = Command::new(env!("CARGO_BIN_EXE_amq2api"))
        .arg("--config")
        .arg(&s.config)
        .env("NOTIFY_SOCKET", &path)
        .env("JOURNAL_STREAM", "8:12345")
        .env("AMQ2API_JOURNAL_SOCKET", &journal_path)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ready = tokio::task::spawn_blocking({
        let sock = sock.try_clone().unwrap();
        move || wait_for(&sock, "READY=1", Duration::from_secs(15))
    })
    .await;
    if ready.is_err() {
        let _ = child.kill();
        panic!("not ready");
    }
    let status = common::child::ChildDaemon { child, socket: s.dir.path().join("control.sock") };
    let base = status.addr();
    let req = http::Request::post(format!("http://{base}/v1/messages"))
        .header("x-api-key", common::API_KEY)
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            common::simple("hello journal", false).to_string(),
        )))
        .unwrap();
    let r = common::send(req).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let messages = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            if let Ok(n) = journal.recv(&mut buf) {
                let entry = journal_entry(&buf[..n]);
                let done = entry.iter().any(|(k, v)| k == "MESSAGE" && v.contains("status=200"));
                out.push(entry);
                if done {
                    break;
                }
            }
        }
        out
    })
    .await
    .unwrap();
    assert_eq!(status.stop(Duration::from_secs(15)), 0);
    let field =
        |e: &Vec<(String, String)>, name: &str| e.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let listening = messages.iter().find(|e| field(e, "MESSAGE").is_some_and(|m| m.contains("listening")));
    let listening = field(listening.expect("a listening line"), "MESSAGE").unwrap();
    assert!(listening.contains("127.0.0.1:"), "the address is in the message: {listening}");
    let access = messages
        .iter()
        .find(|e| field(e, "MESSAGE").is_some_and(|m| m.contains("status=200")))
        .unwrap_or_else(|| panic!("an access log entry: {messages:?}"));
    let message = field(access, "MESSAGE").unwrap();
    assert!(message.contains("account=\"acct-1\"") || message.contains("account=acct-1"), "{message}");
    assert!(message.contains("model="), "{message}");
    assert_eq!(field(access, "F_STATUS").as_deref(), Some("200"));
    assert_eq!(field(access, "PRIORITY").as_deref(), Some("6"));
    assert_eq!(field(access, "SYSLOG_IDENTIFIER").as_deref(), Some("amq2api"));
}

/// The fields of one journald native-protocol datagram (`NAME=value` lines and length-encoded
/// `NAME\n<u64 le><value>\n` fields).
fn journal_entry(mut rest: &[u8]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
        let line = &rest[..nl];
        if let Some(eq) = line.iter().position(|&b| b == b'=') {
            out.push((
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
            ));
            rest = &rest[nl + 1..];
        } else {
            let len = u64::from_le_bytes(rest[nl + 1..nl + 9].try_into().unwrap()) as usize;
            out.push((
                String::from_utf8_lossy(line).into_owned(),
                String::from_utf8_lossy(&rest[nl + 9..nl + 9 + len]).into_owned(),
            ));
            rest = &rest[nl + 10 + len..];
        }
    }
    out
}

/// Without systemd (no StateDirectory=, no RuntimeDirectory=) the daemon creates the missing
/// state directory (0700) and control socket directory (0750) itself, and serves.
#[tokio::test(flavor = "multi_thread")]
async fn without_systemd_the_daemon_creates_its_directories() {
    let s = setup("127.0.0.1:0").await;
    let text = std::fs::read_to_string(&s.config).unwrap();
    let text = text
        .replace("dir = \"state\"", "dir = \"var/lib/amq2api\"")
        .replace("socket = \"control.sock\"", "socket = \"run/amq2api/control.sock\"");
    std::fs::write(&s.config, text).unwrap();
    let state = s.dir.path().join("var/lib/amq2api");
    let run = s.dir.path().join("run/amq2api");
    assert!(!state.exists() && !run.exists());
    let (sock, path) = notify_socket(s.dir.path());
    let mut child = Command::new(env!("CARGO_BIN_EXE_amq2api"))
        .arg("--config")
        .arg(&s.config)
        .env("NOTIFY_SOCKET", &path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ready = tokio::task::spawn_blocking({
        let sock = sock.try_clone().unwrap();
        move || wait_for(&sock, "READY=1", Duration::from_secs(15))
    })
    .await;
    if ready.is_err() {
        let _ = child.kill();
        panic!("not ready");
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&state), 0o700);
    assert!(state.join("amq2api.redb").is_file());
    assert_eq!(mode(&run), 0o750);
    assert!(run.join("control.sock").exists());
    signal(&child, nix::sys::signal::Signal::SIGTERM);
    assert_eq!(wait_exit(&mut child, Duration::from_secs(15)), 0);
}
