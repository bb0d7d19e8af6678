//! Hostile configuration files, through the real daemon binary and `amqctl`: a FIFO, a device,
//! a directory or a file over 64 MiB where a configuration file belongs. At start-up each is
//! exit 78 with a message naming the file; live (the watcher, `amqctl reload`) each is a reload
//! error shown by `amqctl status`, the last good set keeps serving, and the daemon keeps
//! answering HTTP, `amqctl` and SIGTERM.
//!
//! Every daemon here runs under `ulimit -v` (4 GiB), so that a regression that reads a device
//! like /dev/zero fails the test instead of exhausting the host's memory.

use crate::common;

use amq2api::control::wire::{ReloadResult, Status};
use amq2api::emulator::{Emulator, EmulatorOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const DAEMON: &str = env!("CARGO_BIN_EXE_amq2api");
const AMQCTL: &str = env!("CARGO_BIN_EXE_amqctl");
/// How long a start-up check, an amqctl run or a stop may take before the test gives up.
const LIMIT: Duration = Duration::from_secs(30);
/// The address-space limit each daemon runs under, in KiB.
const ULIMIT_V_KIB: u64 = 4 << 20;

fn write_config(dir: &Path, emulator: Option<&Emulator>, extra_auth: &str, extra_server: &str) -> PathBuf {
    let upstream = match emulator {
        Some(e) => format!("endpoint = \"{}\"\ntoken_endpoint = \"{}\"\n", e.endpoint(), e.token_endpoint()),
        None => String::new(),
    };
    let config = dir.join("amq2api.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\ndrain_timeout_secs = 1\n{extra_server}\n\
             [auth]\napi_keys = [\"{}\"]\n{extra_auth}\n[upstream]\n{upstream}\n\
             [accounts]\nfile = \"accounts.toml\"\n[state]\ndir = \"state\"\n[control]\nsocket = \"control.sock\"\n",
            common::API_KEY,
        ),
    )
    .unwrap();
    config
}

fn write_accounts(dir: &Path, ids: &[&str]) {
    let ids: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
    let p = dir.join("accounts.toml");
    let tmp = dir.join("accounts.toml.tmp");
    std::fs::write(&tmp, common::accounts_toml(&ids)).unwrap();
    std::fs::rename(&tmp, p).unwrap();
}

/// Puts `what` at `path` by rename (as an editor or `ln -sf` would), so that the watcher sees
/// one change.
fn replace_with(path: &Path, what: Hostile) {
    let tmp = path.with_extension("hostile");
    let _ = std::fs::remove_file(&tmp);
    match what {
        Hostile::Fifo => nix::unistd::mkfifo(&tmp, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap(),
        Hostile::DevZero => std::os::unix::fs::symlink("/dev/zero", &tmp).unwrap(),
        Hostile::Huge => {
            // Sparse: 64 MiB and one byte, without writing them.
            let f = std::fs::File::create(&tmp).unwrap();
            f.set_len((64 << 20) + 1).unwrap();
        }
        Hostile::Directory => std::fs::create_dir(&tmp).unwrap(),
    }
    if what == Hostile::Directory {
        let _ = std::fs::remove_file(path);
    }
    std::fs::rename(&tmp, path).unwrap();
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hostile {
    Fifo,
    DevZero,
    Huge,
    Directory,
}

impl Hostile {
    /// What the daemon says about it.
    fn message(self) -> &'static str {
        match self {
            Hostile::Fifo => "it is not a regular file but a FIFO (named pipe)",
            Hostile::DevZero => "it is not a regular file but a character device",
            Hostile::Huge => "it is larger than 64 MiB (the limit for a configuration file)",
            Hostile::Directory => "it is not a regular file but a directory",
        }
    }
}

/// `sh -c 'ulimit -v N; exec amq2api ARGS…'`.
fn daemon_command(args: &[&std::ffi::OsStr]) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(format!("ulimit -v {ULIMIT_V_KIB} && exec \"$0\" \"$@\""))
        .arg(DAEMON)
        .args(args)
        .env_remove("CREDENTIALS_DIRECTORY")
        .env_remove("STATE_DIRECTORY")
        .env_remove("RUNTIME_DIRECTORY")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null());
    c
}

/// Kills the child when the test ends early (a wedged daemon must not outlive the test).
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Waits for the child without blocking the runtime (the emulator runs in this process).
async fn wait_within(child: &mut Child, what: &str) -> ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if t0.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: no exit within {LIMIT:?} (blocked on a file?)");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Runs a command to its end within [`LIMIT`]; returns exit code, stdout, stderr.
async fn run_to_end(mut cmd: Command, what: &str) -> (i32, String, String) {
    let work = tempfile::tempdir().unwrap();
    let (o, e) = (work.path().join("out"), work.path().join("err"));
    cmd.stdout(std::fs::File::create(&o).unwrap()).stderr(std::fs::File::create(&e).unwrap());
    let mut child = cmd.spawn().unwrap();
    let st = wait_within(&mut child, what).await;
    let (stdout, stderr) = (std::fs::read_to_string(&o).unwrap(), std::fs::read_to_string(&e).unwrap());
    let code = st.code().unwrap_or_else(|| panic!("{what}: died of a signal ({st:?})\n{stderr}"));
    (code, stdout, stderr)
}

async fn amqctl(socket: &Path, args: &[&str]) -> (i32, String, String) {
    let mut c = Command::new(AMQCTL);
    c.arg("--socket").arg(socket).args(args).env_remove("AMQ2API_SOCKET").env("NO_COLOR", "1");
    run_to_end(c, &format!("amqctl {args:?}")).await
}

async fn status(socket: &Path) -> Status {
    let (code, out, err) = amqctl(socket, &["--json", "status"]).await;
    assert_eq!(code, 0, "amqctl status: {out}\n{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_config_files_at_start_up_exit_78_naming_the_file() {
    // (what is replaced, by what, the words that name the file)
    let cases: [(&str, Hostile, &str); 8] = [
        ("amq2api.toml", Hostile::Fifo, "cannot read the configuration file"),
        ("amq2api.toml", Hostile::Directory, "cannot read the configuration file"),
        ("accounts.toml", Hostile::Fifo, "cannot read the accounts file"),
        ("accounts.toml", Hostile::DevZero, "cannot read the accounts file"),
        ("accounts.toml", Hostile::Huge, "cannot read the accounts file"),
        ("keys.txt", Hostile::Fifo, "api_keys_file"),
        ("cert.pem", Hostile::Fifo, "tls_cert"),
        ("key.pem", Hostile::DevZero, "tls_key"),
    ];
    for (file, hostile, names) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        write_accounts(dir, &["acct-1"]);
        for f in ["keys.txt", "cert.pem", "key.pem"] {
            std::fs::write(dir.join(f), "").unwrap();
        }
        let config = write_config(
            dir,
            None,
            "api_keys_file = \"keys.txt\"",
            "tls_cert = \"cert.pem\"\ntls_key = \"key.pem\"",
        );
        let target = dir.join(file);
        replace_with(&target, hostile);
        let case = format!("{file} as {hostile:?}");
        for sub in [None, Some("check-config")] {
            let mut args: Vec<&std::ffi::OsStr> = vec!["--config".as_ref(), config.as_os_str()];
            args.extend(sub.map(std::ffi::OsStr::new));
            let (code, stdout, stderr) = run_to_end(daemon_command(&args), &format!("{case}, {sub:?}")).await;
            assert_eq!(code, 78, "{case}, {sub:?}: exit 78 expected\n{stdout}\n{stderr}");
            let line = stderr
                .lines()
                .find(|l| l.contains(hostile.message()))
                .unwrap_or_else(|| panic!("{case}, {sub:?}: no {:?} in\n{stderr}", hostile.message()));
            assert!(line.contains(names), "{case}, {sub:?}: the line does not name the file: {line}");
            assert!(
                line.contains(&target.display().to_string())
                    || line.starts_with(&config.display().to_string()),
                "{case}, {sub:?}: no path in {line}"
            );
            assert!(stdout.is_empty(), "{case}, {sub:?}: {stdout}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_accounts_files_live_are_refused_and_the_daemon_keeps_answering() {
    let emulator = Emulator::start(EmulatorOptions::default()).await.unwrap();
    for id in ["acct-1", "acct-2"] {
        emulator.add_account(&common::client_id(id), &format!("secret-{id}"), &format!("refresh-{id}"));
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_accounts(dir, &["acct-1"]);
    let config = write_config(dir, Some(&emulator), "", "");
    let log = dir.join("daemon.log");
    let mut cmd = daemon_command(&["--config".as_ref(), config.as_os_str()]);
    cmd.stdout(Stdio::null()).stderr(std::fs::File::create(&log).unwrap());
    let mut daemon = Guard(cmd.spawn().unwrap());
    let socket = dir.join("control.sock");
    let t0 = Instant::now();
    while tokio::net::UnixStream::connect(&socket).await.is_err() {
        assert!(t0.elapsed() < LIMIT, "no control socket: {}", std::fs::read_to_string(&log).unwrap());
        assert!(daemon.0.try_wait().unwrap().is_none(), "{}", std::fs::read_to_string(&log).unwrap());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let s = status(&socket).await;
    assert_eq!(s.accounts.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(), ["acct-1"]);
    let health = format!("{}/health", s.listeners[0]);
    let accounts = dir.join("accounts.toml");

    for hostile in [Hostile::Fifo, Hostile::DevZero, Hostile::Huge] {
        replace_with(&accounts, hostile);
        // The watcher sees the change and tries it; its error shows in `amqctl status`.
        let t0 = Instant::now();
        loop {
            let s = status(&socket).await;
            if s.config.last_reload_error.as_deref().is_some_and(|e| e.contains(hostile.message())) {
                break;
            }
            assert!(t0.elapsed() < LIMIT, "{hostile:?}: the watcher's reload never reported: {s:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // An explicit reload says the same, with the file's path.
        let (code, out, err) = amqctl(&socket, &["--json", "reload"]).await;
        assert_eq!(code, 78, "{hostile:?}: {out}\n{err}");
        let r: ReloadResult = serde_json::from_str(&out).unwrap();
        assert!(!r.ok);
        let want =
            format!("{}: error: cannot read the accounts file: {}", accounts.display(), hostile.message());
        assert_eq!(r.errors, vec![want], "{hostile:?}");
        // The last good set keeps serving; HTTP answers.
        let s = status(&socket).await;
        assert_eq!(s.accounts.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(), ["acct-1"], "{hostile:?}");
        let (code, out, _) = amqctl(&socket, &["status"]).await;
        assert_eq!(code, 0);
        assert!(out.contains("LAST RELOAD FAILED") && out.contains(hostile.message()), "{out}");
        let req = http::Request::get(&health).body(http_body_util::Full::new(bytes::Bytes::new())).unwrap();
        assert_eq!(common::send(req).await.status, 200, "{hostile:?}: /health");
    }

    // An empty file (one being rewritten in place: truncated, not yet written) is not taken
    // for "no accounts": the accounts keep serving and the reload says why.
    std::fs::write(&accounts, "").unwrap();
    let (code, out, err) = amqctl(&socket, &["--json", "reload"]).await;
    assert_eq!(code, 78, "empty file: {out}\n{err}");
    let r: ReloadResult = serde_json::from_str(&out).unwrap();
    assert!(!r.ok && r.errors.len() == 1 && r.errors[0].contains("the accounts file is empty"), "{r:?}");
    let s = status(&socket).await;
    assert_eq!(s.accounts.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(), ["acct-1"], "empty file");
    // A file that says so (a comment, no account) does remove them all.
    std::fs::write(&accounts, "# no accounts for now\n").unwrap();
    let (code, out, err) = amqctl(&socket, &["reload"]).await;
    assert_eq!(code, 0, "comment-only file: {out}\n{err}");
    assert!(status(&socket).await.accounts.is_empty());

    // A good file again: applied, the error cleared.
    let _ = std::fs::remove_file(&accounts);
    write_accounts(dir, &["acct-1", "acct-2"]);
    let (code, out, err) = amqctl(&socket, &["reload"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    let s = status(&socket).await;
    assert_eq!(s.accounts.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(), ["acct-1", "acct-2"]);
    assert_eq!(s.config.last_reload_error, None);

    // The log said why each version was refused.
    let text = std::fs::read_to_string(&log).unwrap();
    for hostile in [Hostile::Fifo, Hostile::DevZero, Hostile::Huge] {
        assert!(text.contains(hostile.message()), "{hostile:?} not in the log:\n{text}");
    }

    // SIGTERM still stops it.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let st = wait_within(&mut daemon.0, "the daemon after SIGTERM").await;
    assert_eq!(st.code(), Some(0), "{}", std::fs::read_to_string(&log).unwrap());
}
