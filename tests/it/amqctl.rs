//! amqctl end to end: the real `amqctl` binary against an in-process daemon and emulator, over
//! the daemon's control socket. Tables and `--json` for status, accounts, refresh, check,
//! enable/disable and reload; import of every format (the seed's text, JSON and accounts.db,
//! the Kiro IDE's token file, kiro-cli's SQLite), the imports accepted by `amq2api check-config`,
//! and foreign files refused; completions and man; exit codes (daemon not running, permission
//! refused); no secret in anything amqctl prints; and `refresh --all` over 100 accounts within 5 s.

use crate::common;

use amq2api::control::wire::{API_VERSION, AccountInfo, ActionResult, ReloadResult, Status};
use amq2api::emulator::Behaviour;
use common::*;
use serde::de::DeserializeOwned;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

const AMQCTL: &str = env!("CARGO_BIN_EXE_amqctl");

/// How long one amqctl run may take before the test gives up on it.
const RUN_LIMIT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Running amqctl

/// What one amqctl run produced.
#[derive(Debug, Clone)]
struct Out {
    args: Vec<String>,
    code: i32,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

impl fmt::Display for Out {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "amqctl {}: exit {} in {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.args.join(" "),
            self.code,
            self.elapsed,
            self.stdout,
            self.stderr
        )
    }
}

impl Out {
    fn json<T: DeserializeOwned>(&self) -> T {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not the JSON expected ({e}): {self}"))
    }

    fn value(&self) -> serde_json::Value {
        self.json()
    }

    /// Asserts exit 0 and an empty stderr.
    fn ok(self) -> Out {
        assert_eq!(self.code, 0, "{self}");
        assert_eq!(self.stderr, "", "{self}");
        self
    }

    fn code(self, code: i32) -> Out {
        assert_eq!(self.code, code, "{self}");
        self
    }

    /// The stdout line that starts with `prefix`.
    fn line(&self, prefix: &str) -> &str {
        self.stdout
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line {prefix:?}: {self}"))
    }
}

/// Runs amqctl against one socket and keeps everything every run printed, for the secrets check.
struct Ctl {
    socket: PathBuf,
    work: tempfile::TempDir,
    outputs: Vec<Out>,
}

impl Ctl {
    fn new(socket: &Path) -> Ctl {
        Ctl { socket: socket.to_path_buf(), work: tempfile::tempdir().unwrap(), outputs: Vec::new() }
    }

    fn of(h: &Harness) -> Ctl {
        Ctl::new(&h.dir.path().join("control.sock"))
    }

    async fn run(&mut self, args: &[&str]) -> Out {
        self.run_as(&[], args).await
    }

    /// Runs `prefix… amqctl --socket S args…` (the prefix changes the user, for example). Output
    /// goes to files, so the child never blocks on a pipe, and the wait is asynchronous, so the
    /// daemon in this process keeps serving meanwhile.
    async fn run_as(&mut self, prefix: &[&str], args: &[&str]) -> Out {
        let n = self.outputs.len();
        let (out_path, err_path) =
            (self.work.path().join(format!("{n}.out")), self.work.path().join(format!("{n}.err")));
        let mut cmd = match prefix.split_first() {
            Some((program, rest)) => {
                let mut c = std::process::Command::new(program);
                c.args(rest).arg(AMQCTL);
                c
            }
            None => std::process::Command::new(AMQCTL),
        };
        cmd.arg("--socket")
            .arg(&self.socket)
            .args(args)
            .env_remove("AMQ2API_SOCKET")
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .env("COLUMNS", "200")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out_path).unwrap())
            .stderr(std::fs::File::create(&err_path).unwrap());
        let started = Instant::now();
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start amqctl {args:?}: {e}"));
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if started.elapsed() > RUN_LIMIT {
                let _ = child.kill();
                let _ = child.wait();
                panic!("amqctl {args:?} did not finish within {RUN_LIMIT:?}");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        let elapsed = started.elapsed();
        let out = Out {
            args: args.iter().map(|s| s.to_string()).collect(),
            code: status.code().unwrap_or_else(|| panic!("amqctl {args:?} died of a signal: {status:?}")),
            stdout: std::fs::read_to_string(&out_path).unwrap(),
            stderr: std::fs::read_to_string(&err_path).unwrap(),
            elapsed,
        };
        self.outputs.push(out.clone());
        out
    }

    async fn status(&mut self) -> Status {
        self.run(&["--json", "status"]).await.ok().json()
    }

    async fn account(&mut self, id: &str) -> AccountInfo {
        self.run(&["--json", "account", id]).await.ok().json()
    }

    /// No run printed a secret of these accounts (client secret, refresh token, client id), the
    /// API key, or anything shaped like an emulator-issued token; nor did the daemon log one.
    fn assert_no_secrets(&self, ids: &[String]) {
        let mut needles = vec![API_KEY.to_string()];
        for id in ids {
            needles.push(format!("secret-{id}"));
            needles.push(format!("refresh-{id}"));
            needles.push(client_id(id));
        }
        assert!(!self.outputs.is_empty());
        for o in &self.outputs {
            for text in [&o.stdout, &o.stderr] {
                for n in &needles {
                    assert!(!text.contains(n.as_str()), "amqctl printed the secret {n:?}: {o}");
                }
                if let Some(t) = token_like(text) {
                    panic!("amqctl printed something shaped like a token ({t}): {o}");
                }
            }
        }
        // The daemon's log lines too (client ids are not secret there: the emulator logs them).
        let logs = logs();
        for n in needles.iter().filter(|n| !n.ends_with("-client")) {
            assert!(!logs.contains(n.as_str()), "the daemon logged the secret {n:?}");
        }
        if let Some(t) = token_like(&logs) {
            panic!("the daemon logged something shaped like a token ({t})");
        }
    }
}

/// `aoa…` (access) or `aor…` (refresh) followed by 20 or more base64 characters: how the
/// emulator's tokens look. Nothing amqctl legitimately prints has that shape (fingerprints are
/// 8 hex digits).
fn token_like(text: &str) -> Option<String> {
    for prefix in ["aoa", "aor"] {
        for (i, _) in text.match_indices(prefix) {
            let n = text[i + 3..].bytes().take_while(|b| b.is_ascii_alphanumeric()).count();
            if n >= 20 {
                return Some(text[i..i + 3 + n].to_string());
            }
        }
    }
    None
}

fn ids(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn setup(names: &[&str]) -> Setup {
    Setup { accounts: ids(names), ..Default::default() }
}

// ---------------------------------------------------------------------------------------------
// The daemon's log, captured (it runs in this process)

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();

/// Installs the capturing subscriber (once a process; nextest runs each test in its own).
fn capture_logs() {
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let b = buf.clone();
        let _ = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || LogWriter(b.clone()))
            .try_init();
        buf
    });
}

fn logs() -> String {
    LOGS.get()
        .map(|b| String::from_utf8_lossy(&b.lock().unwrap_or_else(|e| e.into_inner())).into_owned())
        .unwrap_or_default()
}

/// Starts emulator and daemon, and waits for the control socket: the harness returns before the
/// daemon task first runs, and amqctl, another process, would find no socket yet.
async fn start(names: &[&str]) -> Harness {
    capture_logs();
    let h = Harness::start(setup(names)).await;
    let socket = h.dir.path().join("control.sock");
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::UnixStream::connect(&socket).await.is_err() {
        assert!(Instant::now() < deadline, "the daemon never opened its control socket");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    h
}

/// One non-streaming request through the daemon must succeed.
async fn message_ok(h: &Harness) {
    // A new conversation each time: the requests of one conversation stay on one account.
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let r = post(h, "/v1/messages", &simple(&format!("hello {n}"), false)).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

fn requests_of(h: &Harness, id: &str) -> u64 {
    h.emulator.stats_for(&client_id(id)).requests
}

/// Waits until the background refresher gave every account an access token.
async fn wait_tokens(ctl: &mut Ctl, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = ctl.status().await;
        if s.accounts.len() == n && s.accounts.iter().all(|a| a.token_expires_at.is_some()) {
            return;
        }
        assert!(Instant::now() < deadline, "accounts still without a token after 30 s: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn find<'a>(s: &'a Status, id: &str) -> &'a AccountInfo {
    s.accounts.iter().find(|a| a.id == id).unwrap_or_else(|| panic!("no account {id} in {s:?}"))
}

/// The table row of an account: the line whose first column is its id.
fn row<'a>(out: &'a Out, id: &str) -> &'a str {
    out.stdout
        .lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .unwrap_or_else(|| panic!("no row for {id}: {out}"))
}

fn labeled_accounts(names: &[&str]) -> String {
    let mut s = String::new();
    for id in names {
        s.push_str(&format!(
            "[[account]]\nid = \"{id}\"\nlabel = \"Seat {id}\"\nclient_id = \"{cid}\"\nclient_secret = \"secret-{id}\"\nrefresh_token = \"refresh-{id}\"\n\n",
            cid = client_id(id)
        ));
    }
    s
}

// ---------------------------------------------------------------------------------------------
// status, accounts, account

#[tokio::test]
async fn status_accounts_and_account_in_tables_and_json() {
    let names = ["alpha", "beta", "gamma"];
    let h = start(&names).await;
    let mut ctl = Ctl::of(&h);

    // Labels: the same credentials with labels; applied by `amqctl reload` or by the file
    // watcher, whichever comes first.
    std::fs::write(h.dir.path().join("accounts.toml"), labeled_accounts(&names)).unwrap();
    let r = ctl.run(&["reload"]).await.code(0);
    assert!(r.stdout.starts_with("reloaded: "), "{r}");
    // The harness writes accounts.toml with mode 0644: the reload passes the daemon's warning on.
    // (A diagnostic: "<file>: warning: <message>", said once.)
    assert!(
        r.stderr.starts_with(&format!("{}: warning: ", h.dir.path().join("accounts.toml").display())),
        "{r}"
    );
    assert!(r.stderr.contains("readable by every user") && r.stderr.matches("warning").count() == 1, "{r}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while ctl.status().await.accounts.iter().any(|a| a.label.is_empty()) {
        assert!(Instant::now() < deadline, "labels never applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_tokens(&mut ctl, 3).await;
    let d = ctl.run(&["disable", "beta"]).await.ok();
    assert_eq!(d.stdout.trim(), "beta: disabled (state disabled)", "{d}");

    // status --json: the wire type, every field filled in.
    let out = ctl.run(&["--json", "status"]).await.ok();
    let raw = out.value();
    assert_eq!(raw["server_version"], env!("CARGO_PKG_VERSION"), "{out}");
    assert_eq!(raw["api_version"], API_VERSION, "{out}");
    let s: Status = out.json();
    assert_eq!(s.pid, std::process::id(), "the daemon runs in this test process");
    assert!(s.uptime_secs < 600, "{s:?}");
    assert!(s.started_at > 1_600_000_000, "{s:?}");
    assert_eq!(s.listeners, vec![format!("http://{}", h.addr)]);
    assert_eq!(s.config.config_file, h.config_path.display().to_string());
    assert_eq!(s.config.accounts_file, h.dir.path().join("accounts.toml").display().to_string());
    assert!(s.config.loaded_at > 1_600_000_000);
    assert_eq!(s.config.last_reload_error, None);
    assert_eq!(s.pool.total, 3);
    assert_eq!((s.pool.active, s.pool.disabled), (2, 1), "{:?}", s.pool);
    assert_eq!((s.pool.cooling, s.pool.quota, s.pool.suspended, s.pool.invalid), (0, 0, 0, 0));
    assert_eq!(s.streams_in_flight, 0);
    let got: Vec<(&str, &str, &str)> =
        s.accounts.iter().map(|a| (a.id.as_str(), a.label.as_str(), a.state.as_str())).collect();
    assert_eq!(
        got,
        vec![
            ("alpha", "Seat alpha", "active"),
            ("beta", "Seat beta", "disabled"),
            ("gamma", "Seat gamma", "active")
        ]
    );
    for a in &s.accounts {
        assert!(a.enabled);
        assert_eq!(a.max_concurrency, 4);
        assert_eq!(a.weight, 1);
        let fp = a.token_fingerprint.as_deref().expect("a token fingerprint");
        assert!(fp.len() == 8 && fp.bytes().all(|b| b.is_ascii_hexdigit()), "{fp}");
        assert!(a.token_expires_at.unwrap() > s.started_at + 3000, "{a:?}");
    }
    assert_eq!(find(&s, "beta").reason.as_deref(), Some("disabled by operator"));

    // status as a table.
    let t = ctl.run(&["status"]).await.ok();
    let first = t.stdout.lines().next().unwrap();
    assert!(
        first.starts_with(&format!(
            "amq2api {} (pid {}), up ",
            env!("CARGO_PKG_VERSION"),
            std::process::id()
        )),
        "{t}"
    );
    assert_eq!(t.line("listeners:"), format!("listeners: http://{}", h.addr));
    assert_eq!(t.line("config:"), format!("config:    {}", h.config_path.display()));
    assert!(
        t.line("accounts:").starts_with(&format!("accounts:  {} (loaded ", s.config.accounts_file)),
        "{t}"
    );
    assert!(!t.stdout.contains("LAST RELOAD FAILED"), "{t}");
    assert_eq!(
        t.line("pool:"),
        "pool:      3 accounts: 2 active, 0 cooling, 0 quota, 0 suspended, 0 invalid, 1 disabled; 0 in flight, 0 streams"
    );
    let header = t.line("ID");
    for col in [
        "ID",
        "LABEL",
        "STATE",
        "KIND",
        "TOKEN",
        "IN-FLIGHT",
        "RPM",
        "REQUESTS",
        "FAILURES",
        "LAST USED",
        "LAST ERROR",
    ] {
        assert!(header.contains(col), "{header}");
    }
    for (id, state) in [("alpha", "active"), ("beta", "disabled"), ("gamma", "active")] {
        let r = row(&t, id);
        assert!(r.contains(&format!("Seat {id}")), "{r}");
        let cols: Vec<&str> = r.split_whitespace().collect();
        assert_eq!(cols[3], state, "{r}");
        assert!(cols.contains(&"oidc"), "the kind: {r}");
        assert!(r.contains("0/4"), "in flight of max: {r}");
    }
    assert!(row(&t, "beta").contains("disabled by operator"), "{t}");
    assert_eq!(
        t.stdout
            .lines()
            .filter(|l| l.starts_with("alpha") || l.starts_with("beta") || l.starts_with("gamma"))
            .count(),
        3
    );

    // accounts: the same rows.
    let a = ctl.run(&["accounts"]).await.ok();
    assert!(a.stdout.lines().next().unwrap().starts_with("ID"), "{a}");
    assert_eq!(a.stdout.lines().count(), 4, "a header and one row an account: {a}");
    for id in names {
        assert!(row(&a, id).contains(&format!("Seat {id}")), "{a}");
    }
    let list: Vec<AccountInfo> = ctl.run(&["--json", "accounts"]).await.ok().json();
    assert_eq!(list.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(), names);
    assert_eq!(list[1].state, "disabled");

    // account ID: detail.
    let one = ctl.run(&["account", "alpha"]).await.ok();
    for l in [
        "id:               alpha",
        "label:            Seat alpha",
        "enabled:          true",
        "state:            active",
        "in flight:        0/4",
        "weight:           1",
    ] {
        assert!(one.stdout.lines().any(|x| x == l), "no line {l:?}: {one}");
    }
    let fp = find(&s, "alpha").token_fingerprint.clone().unwrap();
    assert!(one.line("token:").contains(&format!("sha256:{fp}")), "{one}");
    let j: AccountInfo = ctl.run(&["--json", "account", "gamma"]).await.ok().json();
    assert_eq!((j.id.as_str(), j.label.as_str(), j.state.as_str()), ("gamma", "Seat gamma", "active"));

    // An unknown id.
    for args in [&["account", "nope"][..], &["--json", "account", "nope"][..]] {
        let e = ctl.run(args).await;
        assert_ne!(e.code, 0, "{e}");
        assert_eq!(e.code, 64, "{e}");
        assert_eq!(e.stdout, "", "{e}");
        assert!(e.stderr.contains("no account \"nope\""), "{e}");
    }
    // Actions on an unknown id are failures too.
    let e = ctl.run(&["enable", "nope"]).await;
    assert_eq!(e.code, 64, "{e}");
    assert!(e.stderr.contains("no account \"nope\""), "{e}");

    ctl.assert_no_secrets(&ids(&names));
    h.stop().await;
}

// ---------------------------------------------------------------------------------------------
/// Ids no accounts file could hold are no account (exit 64), whatever they would do to a URL:
/// a space or a non-ASCII letter used to fail as an unexpected answer (70), and `a1?x` showed
/// account `a1`.
#[tokio::test]
async fn ids_no_file_could_hold_are_no_account() {
    let h = start(&["alpha"]).await;
    let mut ctl = Ctl::of(&h);
    for id in ["Team A", "é", "alpha?x", "alpha#x", "alpha/enable", ""] {
        let r = ctl.run(&["account", id]).await.code(64);
        assert!(r.stderr.contains("no account"), "{id:?}: {r}");
        assert!(r.stdout.is_empty(), "{id:?}: {r}");
        ctl.run(&["--json", "enable", id]).await.code(64);
        ctl.run(&["refresh", "alpha", id]).await.code(64);
    }
    ctl.run(&["account", "alpha"]).await.code(0);
}

/// A daemon that accepts connections and never answers (stopped with SIGSTOP, or wedged: the
/// kernel still queues connections): amqctl gives up after `--timeout` with exit 69, not hang.
#[tokio::test]
async fn amqctl_gives_up_on_a_daemon_that_never_answers() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("control.sock");
    // Bound and listening, never accepted from.
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let mut ctl = Ctl::new(&socket);
    let t0 = Instant::now();
    let r = ctl.run(&["--timeout", "1", "status"]).await.code(69);
    assert!(r.stderr.contains("did not answer") && r.stderr.contains("within 1s"), "{r}");
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    ctl.run(&["--timeout", "0", "status"]).await.code(64);
}

// refresh

#[tokio::test]
async fn refresh_one_all_and_a_revoked_token() {
    let names = ["alpha", "beta", "gamma"];
    let h = start(&names).await;
    let mut ctl = Ctl::of(&h);
    wait_tokens(&mut ctl, 3).await;

    // One account.
    let before = h.emulator.stats_for(&client_id("alpha")).refreshes;
    let fp_before = ctl.account("alpha").await.token_fingerprint;
    let r = ctl.run(&["refresh", "alpha"]).await.ok();
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{r}");
    assert!(lines[0].starts_with("ok   alpha "), "{r}");
    assert!(
        lines[0].contains("token refreshed, expires in 59 min") || lines[0].contains("expires in 60 min"),
        "{r}"
    );
    assert!(lines[0].ends_with("(state active)"), "{r}");
    assert_eq!(lines[1], "1 of 1 succeeded");
    assert_eq!(h.emulator.stats_for(&client_id("alpha")).refreshes, before + 1);
    assert_ne!(ctl.account("alpha").await.token_fingerprint, fp_before, "a new access token");

    // All: a line an account and a summary.
    let r = ctl.run(&["refresh", "--all"]).await.ok();
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{r}");
    // Lines come as results arrive, in any order.
    for id in names {
        let l = lines[..3]
            .iter()
            .find(|l| l.starts_with(&format!("ok   {id} ")))
            .unwrap_or_else(|| panic!("{id}: {r}"));
        assert!(l.contains("token refreshed"), "{r}");
    }
    assert_eq!(lines[3], "3 of 3 succeeded");
    let j: Vec<ActionResult> = ctl.run(&["--json", "refresh", "--all"]).await.ok().json();
    assert_eq!(j.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), names);
    assert!(
        j.iter().all(|r| r.ok && r.state == "active" && r.message.starts_with("token refreshed")),
        "{j:?}"
    );
    let j: Vec<ActionResult> = ctl.run(&["--json", "refresh", "gamma", "alpha"]).await.ok().json();
    assert_eq!(j.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["gamma", "alpha"]);
    assert!(j.iter().all(|r| r.ok));

    // Neither ids nor --all: a usage error, nothing sent.
    let e = ctl.run(&["refresh"]).await.code(64);
    assert!(e.stderr.contains("--all"), "{e}");

    // beta's refresh token is revoked upstream.
    h.emulator.revoke_refresh_token(&client_id("beta"));
    let r = ctl.run(&["refresh", "--all"]).await;
    assert_ne!(r.code, 0, "{r}");
    assert_eq!(r.code, 1, "{r}");
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{r}");
    let find_line = |prefix: &str| {
        *lines[..3].iter().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("{prefix}: {r}"))
    };
    let _ = find_line("ok   alpha ");
    assert!(find_line("FAIL beta ").ends_with("(state invalid)"), "{r}");
    let _ = find_line("ok   gamma ");
    assert_eq!(lines[3], "2 of 3 succeeded, 1 failed");
    let s = ctl.status().await;
    let beta = find(&s, "beta");
    assert_eq!(beta.state, "invalid", "{beta:?}");
    assert!(beta.reason.is_some() && beta.last_error.is_some(), "{beta:?}");
    assert_eq!((s.pool.active, s.pool.invalid), (2, 1), "{:?}", s.pool);
    assert_eq!(find(&s, "alpha").state, "active");
    assert!(row(&ctl.run(&["status"]).await.ok(), "beta").contains(" invalid"));

    // The same through --json and by name.
    let r = ctl.run(&["--json", "refresh", "--all"]).await.code(1);
    let j: Vec<ActionResult> = r.json();
    assert_eq!(j.iter().filter(|r| !r.ok).map(|r| r.id.as_str()).collect::<Vec<_>>(), ["beta"]);
    assert_eq!(j[1].state, "invalid");
    let r = ctl.run(&["refresh", "beta"]).await.code(1);
    assert!(r.stdout.starts_with("FAIL beta "), "{r}");
    assert!(r.stdout.ends_with("0 of 1 succeeded, 1 failed\n"), "{r}");
    let r = ctl.run(&["refresh", "alpha", "beta"]).await.code(1);
    assert!(r.stdout.contains("1 of 2 succeeded, 1 failed"), "{r}");
    // An unknown id among known ones fails its line, not the others.
    let r = ctl.run(&["refresh", "alpha", "nope"]).await.code(1);
    assert!(r.stdout.lines().any(|l| l.starts_with("ok   alpha ")), "{r}");
    assert!(r.stdout.contains("FAIL nope") && r.stdout.contains("no account"), "{r}");

    // Requests keep flowing on the others.
    message_ok(&h).await;
    ctl.assert_no_secrets(&ids(&names));
    h.stop().await;
}

// ---------------------------------------------------------------------------------------------
// check, enable, disable

#[tokio::test]
async fn check_suspended_enable_and_disable() {
    let names = ["alpha", "beta", "gamma"];
    let h = start(&names).await;
    let mut ctl = Ctl::of(&h);
    wait_tokens(&mut ctl, 3).await;

    // All healthy.
    let r = ctl.run(&["check", "--all"]).await.ok();
    assert!(r.stdout.lines().take(3).all(|l| l.starts_with("ok   ") && l.contains("healthy")), "{r}");
    assert!(r.stdout.ends_with("3 of 3 succeeded\n"), "{r}");
    assert_eq!(requests_of(&h, "beta"), 1, "check made one real call");

    // beta is suspended upstream.
    h.emulator.set_behaviour(&client_id("beta"), Behaviour::Suspended);
    let r = ctl.run(&["check", "--all"]).await;
    assert_eq!(r.code, 1, "{r}");
    // One line per account as its result arrives (any order), then the summary.
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{r}");
    let line = |prefix: &str| {
        *lines[..3].iter().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no {prefix:?}: {r}"))
    };
    let _ = line("ok   alpha ");
    let beta = line("FAIL beta ");
    assert!(beta.contains("suspended"), "{r}");
    assert!(beta.ends_with("(state suspended)"), "{r}");
    let _ = line("ok   gamma ");
    assert_eq!(lines[3], "2 of 3 succeeded, 1 failed");
    let s = ctl.status().await;
    assert_eq!(find(&s, "beta").state, "suspended");
    assert_eq!((s.pool.active, s.pool.suspended), (2, 1));
    let t = ctl.run(&["status"]).await.ok();
    assert!(t.line("pool:").contains("2 active, 0 cooling, 0 quota, 1 suspended"), "{t}");
    assert_eq!(row(&t, "beta").split_whitespace().nth(1), Some("suspended"), "{t}");

    // --json and by name.
    let j: Vec<ActionResult> = ctl.run(&["--json", "check", "beta", "alpha"]).await.code(1).json();
    assert_eq!(j.len(), 2);
    assert_eq!((j[0].id.as_str(), j[0].ok, j[0].state.as_str()), ("beta", false, "suspended"));
    assert!(j[0].message.starts_with("suspended"), "{j:?}");
    assert_eq!((j[1].id.as_str(), j[1].ok), ("alpha", true));

    // A suspended account takes no traffic.
    let beta_before = requests_of(&h, "beta");
    for _ in 0..4 {
        message_ok(&h).await;
    }
    assert_eq!(requests_of(&h, "beta"), beta_before);

    // Amazon Q lifts the suspension; the operator enables the account.
    h.emulator.set_behaviour(&client_id("beta"), Behaviour::Normal);
    let r = ctl.run(&["enable", "beta"]).await.ok();
    assert_eq!(r.stdout, "beta: enabled (state active)\n", "{r}");
    assert_eq!(ctl.account("beta").await.state, "active");
    let s = ctl.status().await;
    assert_eq!((s.pool.active, s.pool.suspended), (3, 0));
    ctl.run(&["check", "beta"]).await.ok();
    let before = requests_of(&h, "beta");
    for _ in 0..6 {
        message_ok(&h).await;
    }
    assert!(requests_of(&h, "beta") > before, "an enabled account takes traffic again");

    // disable: no request reaches it, whatever the load.
    let j: ActionResult = ctl.run(&["--json", "disable", "beta"]).await.ok().json();
    assert_eq!(
        (j.id.as_str(), j.ok, j.message.as_str(), j.state.as_str()),
        ("beta", true, "disabled", "disabled")
    );
    let s = ctl.status().await;
    assert_eq!(find(&s, "beta").state, "disabled");
    assert_eq!((s.pool.active, s.pool.disabled), (2, 1));
    let before = (requests_of(&h, "alpha"), requests_of(&h, "beta"), requests_of(&h, "gamma"));
    let mut tasks = Vec::new();
    for i in 0..12 {
        let body = simple(&format!("request {i}"), i % 2 == 0);
        let req = http::Request::post(h.url("/v1/messages"))
            .header("content-type", "application/json")
            .header("x-api-key", API_KEY)
            .body(http_body_util::Full::new(bytes::Bytes::from(body.to_string())))
            .unwrap();
        tasks.push(tokio::spawn(send(req)));
    }
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(requests_of(&h, "beta"), before.1, "a disabled account took a request");
    assert_eq!(requests_of(&h, "alpha") + requests_of(&h, "gamma"), before.0 + before.2 + 12);

    // enable puts it back.
    ctl.run(&["enable", "beta"]).await.ok();
    assert_eq!(ctl.account("beta").await.state, "active");
    for _ in 0..6 {
        message_ok(&h).await;
    }
    assert!(requests_of(&h, "beta") > before.1);

    ctl.assert_no_secrets(&ids(&names));
    h.stop().await;
}

/// An operator's `disable` holds until `enable`, whatever checks find; an account the file
/// disables cannot be enabled from amqctl, and every answer reports the state status shows.
#[tokio::test]
async fn operator_overrides_hold() {
    let names = ["alpha", "beta"];
    let h = start(&names).await;
    let mut ctl = Ctl::of(&h);
    wait_tokens(&mut ctl, 2).await;
    ctl.run(&["disable", "beta"]).await.ok();

    // Checks of a disabled account report upstream's verdict but leave it disabled.
    for (behaviour, kind) in [
        (Behaviour::Suspended, "suspended"),
        (Behaviour::Throttled { retry_after_secs: Some(1) }, "throttled"),
    ] {
        h.emulator.set_behaviour(&client_id("beta"), behaviour);
        let r = ctl.run(&["check", "--all"]).await.code(1);
        let line = r.stdout.lines().find(|l| l.starts_with("FAIL beta ")).unwrap_or_else(|| panic!("{r}"));
        assert!(line.starts_with("FAIL beta ") && line.contains(kind), "{r}");
        assert!(line.ends_with("(state disabled)"), "{r}");
        assert_eq!(ctl.account("beta").await.state, "disabled", "after a {kind} check");
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(ctl.account("beta").await.state, "disabled", "a cooldown's end does not enable it");
    h.emulator.set_behaviour(&client_id("beta"), Behaviour::Normal);
    let r = ctl.run(&["check", "--all"]).await.ok();
    assert!(r.stdout.contains("ok   beta ") && r.stdout.contains("(state disabled)"), "{r}");
    let s = ctl.status().await;
    assert_eq!(find(&s, "beta").state, "disabled");
    assert_eq!((s.pool.active, s.pool.disabled), (1, 1));
    let before = requests_of(&h, "beta");
    for _ in 0..4 {
        message_ok(&h).await;
    }
    assert_eq!(requests_of(&h, "beta"), before);

    // The file disables beta too: amqctl cannot enable it, and says so.
    let text = accounts_toml(&ids(&names))
        .replace("refresh_token = \"refresh-beta\"\n", "refresh_token = \"refresh-beta\"\nenabled = false\n");
    std::fs::write(h.dir.path().join("accounts.toml"), &text).unwrap();
    ctl.run(&["reload"]).await.code(0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while ctl.account("beta").await.enabled {
        assert!(Instant::now() < deadline, "enabled = false never applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = ctl.run(&["enable", "beta"]).await.code(1);
    assert!(r.stdout.starts_with("beta: the accounts file says enabled = false"), "{r}");
    assert!(r.stdout.trim_end().ends_with("(state disabled)"), "{r}");
    let j: ActionResult = ctl.run(&["--json", "enable", "beta"]).await.code(1).json();
    assert_eq!((j.ok, j.state.as_str()), (false, "disabled"));
    let j: Vec<ActionResult> = ctl.run(&["--json", "refresh", "beta"]).await.ok().json();
    assert_eq!(j[0].state, "disabled", "every answer reports the state status shows");
    assert_eq!(ctl.account("beta").await.state, "disabled");

    // The file enables it again; the operator's disable still holds until enable.
    std::fs::write(h.dir.path().join("accounts.toml"), accounts_toml(&ids(&names))).unwrap();
    ctl.run(&["reload"]).await.code(0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ctl.account("beta").await.enabled {
        assert!(Instant::now() < deadline, "enabled = true never applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ctl.account("beta").await.state, "disabled");
    let r = ctl.run(&["enable", "beta"]).await.ok();
    assert_eq!(r.stdout, "beta: enabled (state active)\n");
    ctl.run(&["check", "beta"]).await.ok();
    for _ in 0..4 {
        message_ok(&h).await;
    }
    assert!(requests_of(&h, "beta") > before);

    ctl.assert_no_secrets(&ids(&names));
    h.stop().await;
}

// ---------------------------------------------------------------------------------------------
// reload

#[tokio::test]
async fn a_reload_says_what_needs_a_restart() {
    let h = start(&["alpha"]).await;
    let mut ctl = Ctl::of(&h);
    let text = std::fs::read_to_string(&h.config_path).unwrap();
    std::fs::copy(h.dir.path().join("accounts.toml"), h.dir.path().join("other.toml")).unwrap();
    let changed = text.replacen("file = \"accounts.toml\"", "file = \"other.toml\"", 1);
    assert_ne!(changed, text);
    std::fs::write(&h.config_path, changed).unwrap();
    let j: ReloadResult = ctl.run(&["--json", "reload"]).await.ok().json();
    assert!(j.ok, "{j:?}");
    assert!(
        j.changes.contains(
            "[accounts] file (the running daemon still reads the old one) changed: restart to apply"
        ),
        "{j:?}"
    );
    std::fs::write(&h.config_path, &text).unwrap();
    let j: ReloadResult = ctl.run(&["--json", "reload"]).await.ok().json();
    assert!(!j.changes.contains("restart"), "{j:?}");
    // A limit, an account setting, the usage retention: each named.
    let changed = text.replacen("[server]\n", "[server]\nmax_body_bytes = 1234567\n", 1).replacen(
        "[accounts]\n",
        "[accounts]\nstrategy = \"round-robin\"\n",
        1,
    );
    let changed = changed.replacen("[state]\n", "[state]\nusage_retention_days = 30\n", 1);
    assert_ne!(changed, text);
    std::fs::write(&h.config_path, changed).unwrap();
    let j: ReloadResult = ctl.run(&["--json", "reload"]).await.ok().json();
    for what in ["[server] limits or timeouts", "[accounts] settings", "[state] usage_retention_days"] {
        assert!(j.changes.contains(what), "{what}: {j:?}");
    }
    std::fs::write(&h.config_path, text).unwrap();
    let j: ReloadResult = ctl.run(&["--json", "reload"]).await.ok().json();
    assert!(!j.changes.contains("restart"), "{j:?}");
}

/// An accounts file refused by `amqctl reload` (or SIGHUP), then fixed: the watcher's reload
/// of the fixed file clears the error. Before, a refusal found by a whole reload was kept as
/// amq2api.toml's and stayed in `amqctl status` and `STATUS=` until the next SIGHUP.
#[tokio::test]
async fn an_accounts_file_fixed_after_a_refused_reload_clears_the_error() {
    let names = ["alpha"];
    let h = start(&names).await;
    let mut ctl = Ctl::of(&h);
    wait_tokens(&mut ctl, 1).await;
    // amq2api.toml refused first, then fixed while the accounts file breaks: the fixed file's
    // error goes at once, the accounts file's when the watcher applies its fix.
    let config = h.dir.path().join("amq2api.toml");
    let main = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{main}\n[bogus]\n")).unwrap();
    ctl.run(&["reload"]).await.code(78);
    assert!(ctl.status().await.config.last_reload_error.is_some_and(|e| e.contains("bogus")));
    std::fs::write(&config, &main).unwrap();
    let file = h.dir.path().join("accounts.toml");
    let good = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, format!("{good}[[account]]\nid = \"Bad Id\"\n")).unwrap();
    ctl.run(&["reload"]).await.code(78);
    let e = ctl.status().await.config.last_reload_error.unwrap_or_default();
    assert!(!e.contains("bogus"), "amq2api.toml's fixed error stayed: {e}");
    assert!(ctl.status().await.config.last_reload_error.is_some_and(|e| e.contains("Bad Id")));
    std::fs::write(&file, &good).unwrap();
    let t0 = Instant::now();
    while let Some(e) = ctl.status().await.config.last_reload_error {
        assert!(t0.elapsed() < Duration::from_secs(10), "the fixed file's error stayed: {e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn reload_reports_changes_and_refuses_an_invalid_file() {
    let names = ["alpha", "beta"];
    let h = start(&names).await;
    let mut ctl = Ctl::of(&h);
    wait_tokens(&mut ctl, 2).await;

    // The daemon also watches accounts.toml and reloads on its own; `amqctl reload` must be the
    // one to see each change here. The watcher watches the file's directory (and a symlink's
    // target's), so the file becomes a hard link to a file in a subdirectory: edits through that
    // name reach a reload but not the watcher.
    let dir = h.dir.path();
    let accounts = dir.join("accounts.toml");
    std::fs::create_dir(dir.join("real")).unwrap();
    let real = dir.join("real/accounts.toml");
    std::fs::write(&real, accounts_toml(&ids(&names))).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o640)).unwrap();
    }
    std::fs::hard_link(&real, dir.join("accounts.toml.new")).unwrap();
    std::fs::rename(dir.join("accounts.toml.new"), &accounts).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while ctl.status().await.config.last_reload_at.is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let j: ReloadResult = ctl.run(&["--json", "reload"]).await.ok().json();
    assert_eq!(j, ReloadResult { ok: true, changes: "no changes".into(), errors: vec![], warnings: vec![] });

    // Add an account, relabel another.
    h.emulator.add_account(&client_id("gamma"), "secret-gamma", "refresh-gamma");
    let mut text = accounts_toml(&ids(&["alpha", "beta", "gamma"]));
    text =
        text.replacen("[[account]]\nid = \"alpha\"\n", "[[account]]\nid = \"alpha\"\nlabel = \"First\"\n", 1);
    std::fs::write(&real, &text).unwrap();
    let r = ctl.run(&["reload"]).await.ok();
    assert_eq!(r.stdout, "reloaded: added gamma; changed alpha (label)\n", "{r}");
    let s = ctl.status().await;
    assert_eq!(s.accounts.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(), ["alpha", "beta", "gamma"]);
    assert_eq!(find(&s, "alpha").label, "First");
    assert_eq!(s.config.last_reload_error, None);
    assert!(s.config.last_reload_at.is_some());
    let r = ctl.run(&["reload"]).await.ok();
    assert_eq!(r.stdout, "reloaded: no changes\n", "{r}");
    // gamma serves.
    let g = requests_of(&h, "gamma");
    for _ in 0..6 {
        message_ok(&h).await;
    }
    assert!(requests_of(&h, "gamma") > g, "the added account takes traffic");

    // Remove beta.
    std::fs::write(&real, text.replace(&accounts_toml(&ids(&["beta"])), "")).unwrap();
    let j: ReloadResult = ctl.run(&["--json", "reload"]).await.ok().json();
    assert!(j.ok && j.errors.is_empty(), "{j:?}");
    assert_eq!(j.changes, "removed beta");
    let good = std::fs::read_to_string(&real).unwrap();

    // A syntax error (an unquoted secret on line 9): refused, with its place; nothing changes.
    let bad = format!(
        "{good}[[account]]\nid = \"delta\"\nclient_id = \"{}\"\nclient_secret = secret-delta\nrefresh_token = \"refresh-delta\"\n",
        client_id("delta")
    );
    let line = bad.lines().position(|l| l.starts_with("client_secret = secret-delta")).unwrap() + 1;
    std::fs::write(&real, &bad).unwrap();
    let r = ctl.run(&["reload"]).await.code(78);
    assert_eq!(r.stdout, "", "{r}");
    let mut err = r.stderr.lines();
    assert_eq!(err.next(), Some("reload refused (the running configuration stays):"), "{r}");
    let e = err.next().unwrap_or_else(|| panic!("no error listed: {r}"));
    let place = format!("  {}:{line}:", accounts.display());
    assert!(e.starts_with(&place), "expected {place:?} (line {line} and a column): {r}");
    let col: usize =
        e[place.len()..].split(':').next().unwrap().parse().unwrap_or_else(|_| panic!("no column: {r}"));
    assert!((1..=40).contains(&col), "{r}");
    assert!(e.contains(": error: "), "{r}");

    // status shows the failure; the old set keeps serving.
    let s = ctl.status().await;
    let last = s.config.last_reload_error.clone().expect("the last reload's error");
    assert!(last.contains(&format!("{}:{line}:{col}", accounts.display())), "{last}");
    assert_eq!(s.accounts.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(), ["alpha", "gamma"]);
    assert_eq!(s.pool.active, 2);
    let t = ctl.run(&["status"]).await.ok();
    let failed = t.line("LAST RELOAD FAILED");
    assert!(failed.contains(&format!("accounts.toml:{line}:{col}")), "{t}");
    let (a, g) = (requests_of(&h, "alpha"), requests_of(&h, "gamma"));
    for _ in 0..4 {
        message_ok(&h).await;
    }
    assert_eq!(requests_of(&h, "alpha") + requests_of(&h, "gamma"), a + g + 4);

    // Several problems: each listed with its place (--json: exit 78 too).
    let bad = format!(
        "{good}[[account]]\nid = \"Bad Id\"\nclient_id = \"x\"\nclient_secret = \"y\"\nrefresh_token = \"z\"\n\n\
         [[account]]\nid = \"gamma\"\nclient_id = \"x\"\nrefresh_token = \"z\"\n"
    );
    std::fs::write(&real, &bad).unwrap();
    let r = ctl.run(&["--json", "reload"]).await.code(78);
    let j: ReloadResult = r.json();
    assert!(!j.ok);
    assert_eq!(j.changes, "no changes");
    assert!(j.errors.len() >= 3, "bad id, duplicate id, missing client_secret: {j:?}");
    for e in &j.errors {
        let rest = e.strip_prefix(&format!("{}:", accounts.display())).unwrap_or_else(|| panic!("{e}"));
        let mut parts = rest.splitn(3, ':');
        let (l, c) = (parts.next().unwrap(), parts.next().unwrap());
        assert!(l.parse::<usize>().is_ok() && c.parse::<usize>().is_ok(), "line and column in {e}");
        assert!(parts.next().unwrap().starts_with(" error: "), "{e}");
    }
    let text = r.stdout.clone();
    assert!(text.contains("Bad Id") && text.contains("client_secret"), "{r}");
    let r = ctl.run(&["reload"]).await.code(78);
    assert!(r.stderr.lines().count() > j.errors.len(), "every error listed: {r}");
    assert_eq!(ctl.status().await.accounts.len(), 2);
    message_ok(&h).await;

    // Fixed: the error clears.
    std::fs::write(&real, &good).unwrap();
    let r = ctl.run(&["reload"]).await.ok();
    assert_eq!(r.stdout, "reloaded: no changes\n", "{r}");
    let s = ctl.status().await;
    assert_eq!(s.config.last_reload_error, None);
    assert!(!ctl.run(&["status"]).await.ok().stdout.contains("LAST RELOAD FAILED"));

    ctl.assert_no_secrets(&ids(&["alpha", "beta", "gamma", "delta"]));
    h.stop().await;
}

/// Waits until `amqctl status` lists exactly `want`, with no reload error.
async fn wait_accounts(ctl: &mut Ctl, want: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = ctl.status().await;
        let ids: Vec<&str> = s.accounts.iter().map(|a| a.id.as_str()).collect();
        if ids == want && s.config.last_reload_error.is_none() {
            return;
        }
        assert!(Instant::now() < deadline, "accounts never became {want:?} without a reload: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_symlinked_accounts_file_is_watched_through_its_target() {
    let h = start(&["alpha"]).await;
    let mut ctl = Ctl::of(&h);
    for id in ["beta", "gamma"] {
        h.emulator.add_account(&client_id(id), &format!("secret-{id}"), &format!("refresh-{id}"));
    }
    // The control socket accepts connections from its bind on, before the daemon has set up
    // its watchers: an answer means it has (they are set up before the control task starts).
    ctl.status().await;
    let dir = h.dir.path();
    let accounts = dir.join("accounts.toml");
    let link_to = |target: &Path| {
        std::os::unix::fs::symlink(target, dir.join("accounts.toml.new")).unwrap();
        std::fs::rename(dir.join("accounts.toml.new"), &accounts).unwrap();
    };
    // accounts.toml -> real/accounts.toml (the same accounts): the watcher reloads it.
    std::fs::create_dir(dir.join("real")).unwrap();
    let real = dir.join("real/accounts.toml");
    std::fs::write(&real, accounts_toml(&ids(&["alpha"]))).unwrap();
    link_to(&real);
    let deadline = Instant::now() + Duration::from_secs(20);
    while ctl.status().await.config.last_reload_at.is_none() {
        assert!(
            Instant::now() < deadline,
            "the watcher never reloaded the new link; the daemon's log:\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The target edited in place: seen without SIGHUP or amqctl reload.
    std::fs::write(&real, accounts_toml(&ids(&["alpha", "beta"]))).unwrap();
    wait_accounts(&mut ctl, &["alpha", "beta"]).await;

    // The link re-pointed to a file in another directory, under another name.
    std::fs::create_dir(dir.join("other")).unwrap();
    let other = dir.join("other/seats.toml");
    std::fs::write(&other, accounts_toml(&ids(&["alpha", "beta", "gamma"]))).unwrap();
    link_to(&other);
    wait_accounts(&mut ctl, &["alpha", "beta", "gamma"]).await;

    // ... and the new target edited in place.
    std::fs::write(&other, accounts_toml(&ids(&["alpha", "gamma"]))).unwrap();
    wait_accounts(&mut ctl, &["alpha", "gamma"]).await;
    message_ok(&h).await;
    h.stop().await;
}

// ---------------------------------------------------------------------------------------------
// import, completions, man (no daemon needed)

#[tokio::test]
async fn import_both_seed_formats() {
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = Ctl::new(&dir.path().join("absent.sock"));

    let lines = dir.path().join("accounts.txt");
    std::fs::write(
        &lines,
        "# seed export\n\
         Team A, first seat|pw-one|imp-client-1|imp-secret-1|imp-refresh-1|imp-access-1\n\
         \n\
         Team A, first seat|pw-two|imp-client-2|imp-secret-2|imp-refresh-2|\n\
         Ünïcode \"quoted\" label|pw-three|imp-client-3|imp-secret-3|imp-refresh-3|imp-access-3\n",
    )
    .unwrap();
    let r = ctl.run(&["import", lines.to_str().unwrap()]).await.ok();
    let (set, diags) = amq2api::config::accounts::parse(Path::new("imported.toml"), &r.stdout)
        .unwrap_or_else(|d| panic!("not a valid accounts.toml ({d}): {r}"));
    assert!(diags.is_empty(), "{diags}");
    let got: Vec<(String, String, String, String, String, bool)> = set
        .iter()
        .map(|a| (a.id.to_string(), a.label.clone(), oidc(a).0, oidc(a).1, oidc(a).2, a.enabled))
        .collect();
    assert_eq!(got.len(), 3, "{r}");
    for (i, g) in got.iter().enumerate() {
        let n = i + 1;
        assert_eq!(
            (&g.2[..], &g.3[..], &g.4[..], g.5),
            (
                &format!("imp-client-{n}")[..],
                &format!("imp-secret-{n}")[..],
                &format!("imp-refresh-{n}")[..],
                true
            )
        );
    }
    assert_eq!(got[0].1, "Team A, first seat");
    assert_eq!(got[2].1, "Ünïcode \"quoted\" label");
    assert_ne!(got[0].0, got[1].0, "unique ids for equal labels");
    // Passwords and access tokens are not carried over.
    for never in ["pw-one", "pw-two", "pw-three", "imp-access-1", "imp-access-3"] {
        assert!(!r.stdout.contains(never), "{never} copied: {r}");
    }

    let json = dir.path().join("export.json");
    std::fs::write(
        &json,
        r#"[
  {"label": "Seat B", "clientId": "imp-client-b", "clientSecret": "imp-secret-b", "refreshToken": "imp-refresh-b", "accessToken": "imp-access-b", "enabled": false},
  {"clientId": "imp-client-c", "clientSecret": "imp-secret-c", "refreshToken": "imp-refresh-c"}
]"#,
    )
    .unwrap();
    let r = ctl.run(&["import", json.to_str().unwrap()]).await.ok();
    let (set, _) = amq2api::config::accounts::parse(Path::new("imported.toml"), &r.stdout)
        .unwrap_or_else(|d| panic!("not a valid accounts.toml ({d}): {r}"));
    let v: Vec<_> = set.iter().collect();
    assert_eq!(v.len(), 2, "{r}");
    assert_eq!(v[0].label, "Seat B");
    assert_eq!(oidc(v[0]), ("imp-client-b".into(), "imp-secret-b".into(), "imp-refresh-b".into()));
    assert!(!v[0].enabled);
    assert_eq!(oidc(v[1]).2, "imp-refresh-c");
    assert!(v[1].enabled);
    assert!(!r.stdout.contains("imp-access-b"), "{r}");

    // Broken input: a clear message, no partial output.
    std::fs::write(&lines, "only|three|fields\n").unwrap();
    let r = ctl.run(&["import", lines.to_str().unwrap()]).await.code(65);
    assert_eq!(r.stdout, "", "{r}");
    assert!(r.stderr.contains("line 1"), "{r}");
    std::fs::write(&json, r#"[{"label": "x", "clientId": "c"}]"#).unwrap();
    let r = ctl.run(&["import", json.to_str().unwrap()]).await.code(65);
    assert!(r.stderr.contains("missing clientSecret"), "{r}");
    let r = ctl.run(&["import", "/nonexistent/export.json"]).await;
    assert_ne!(r.code, 0, "{r}");
    assert!(r.stderr.contains("/nonexistent/export.json"), "{r}");
}

/// Every fixture secret (client ids and secrets, refresh and access tokens) starts with this:
/// none may ever appear on stderr, and access tokens nowhere.
const FIXTURE: &str = "fx-";

/// Parses an import's stdout as accounts.toml (no error, no warning).
fn imported(r: &Out) -> amq2api::config::AccountSet {
    parse_imported(&r.stdout)
}

fn parse_imported(text: &str) -> amq2api::config::AccountSet {
    let (set, diags) = amq2api::config::accounts::parse(Path::new("imported.toml"), text)
        .unwrap_or_else(|d| panic!("not a valid accounts.toml ({d}):\n{text}"));
    assert!(diags.is_empty(), "{diags}");
    set
}

/// A social account's refresh token.
fn social(a: &amq2api::config::AccountSpec) -> String {
    match &a.credentials {
        amq2api::config::Credentials::Social { refresh_token } => refresh_token.expose().to_owned(),
        other => panic!("not a social account: {:?}", other.kind()),
    }
}

/// An import that must be refused: exit 65, nothing on stdout, a message on stderr that names
/// the file and contains `want`, and no fixture secret in it.
async fn refused(ctl: &mut Ctl, file: &Path, want: &str) -> Out {
    let r = ctl.run(&["import", file.to_str().unwrap()]).await.code(65);
    assert_eq!(r.stdout, "", "{r}");
    assert!(r.stderr.starts_with(&format!("amqctl: {}: ", file.display())), "{r}");
    assert!(r.stderr.contains(want), "expected {want:?}: {r}");
    assert_eq!(r.stderr.lines().count(), 1, "one line: {r}");
    assert!(!r.stderr.contains(FIXTURE), "a secret on stderr: {r}");
    r
}

/// No run printed a fixture secret on stderr, nor an access token anywhere.
fn assert_no_fixture_secret_leaked(ctl: &Ctl) {
    assert!(!ctl.outputs.is_empty());
    for o in &ctl.outputs {
        assert!(!o.stderr.contains(FIXTURE), "a secret on stderr: {o}");
        assert!(!o.stdout.contains("fx-access"), "an access token carried over: {o}");
    }
}

/// An SQLite database made by the test, the file's bytes kept to check it is never changed.
fn sqlite_fixture(path: &Path, sql: &str) -> Vec<u8> {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.execute_batch(sql).unwrap();
    drop(conn);
    std::fs::read(path).unwrap()
}

/// The names of the files in `dir`, sorted.
fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn import_the_kiro_ide_token_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = Ctl::new(&dir.path().join("absent.sock"));
    let cache = dir.path().join("sso-cache");
    std::fs::create_dir(&cache).unwrap();
    let token = cache.join("kiro-auth-token.json");

    // Google sign-in: a social account with the file's profile ARN; the region is the ARN's.
    std::fs::write(
        &token,
        r#"{"accessToken": "fx-access-social", "refreshToken": "fx-refresh-social", "expiresAt": "2026-11-30T10:00:00.000Z",
            "authMethod": "social", "provider": "Google",
            "profileArn": "arn:aws:codewhisperer:us-east-1:699475941385:profile/EHGA3GRVQMUK", "region": "us-east-1"}"#,
    )
    .unwrap();
    let r = ctl.run(&["import", token.to_str().unwrap()]).await.ok();
    let set = imported(&r);
    let a: Vec<_> = set.iter().collect();
    assert_eq!(a.len(), 1, "{r}");
    assert_eq!(a[0].kind(), amq2api::config::accounts::Kind::Social);
    assert_eq!(social(a[0]), "fx-refresh-social");
    assert_eq!(a[0].label, "Kiro IDE, Google sign-in");
    assert_eq!(
        a[0].profile_arn.as_deref(),
        Some("arn:aws:codewhisperer:us-east-1:699475941385:profile/EHGA3GRVQMUK")
    );
    assert_eq!((a[0].region.as_deref(), a[0].auth_region.as_deref()), (Some("us-east-1"), None));
    assert!(r.stdout.contains("# from the Kiro IDE's token file"), "{r}");
    assert!(r.stdout.contains("kind = \"social\""), "{r}");

    // GitHub, no profile ARN, tokens issued in eu-central-1: auth_region, and a remark.
    std::fs::write(
        &token,
        r#"{"accessToken": "fx-access-gh", "refreshToken": "fx-refresh-gh", "authMethod": "social", "provider": "Github", "region": "eu-central-1"}"#,
    )
    .unwrap();
    let r = ctl.run(&["import", token.to_str().unwrap()]).await.ok();
    let set = imported(&r);
    let a = set.iter().next().unwrap();
    assert_eq!((social(a).as_str(), a.label.as_str()), ("fx-refresh-gh", "Kiro IDE, GitHub sign-in"));
    assert_eq!((a.profile_arn.as_deref(), a.auth_region.as_deref()), (None, Some("eu-central-1")));

    // IAM Identity Center: the client registration comes from <clientIdHash>.json beside it.
    let hash = "0b5d4c3e2f1a09b8c7d6e5f4a3b2c1d0e9f8a7b6";
    std::fs::write(
        &token,
        format!(
            r#"{{"accessToken": "fx-access-idc", "refreshToken": "fx-refresh-idc", "expiresAt": "2026-11-30T10:00:00Z",
                "authMethod": "IdC", "provider": "Enterprise", "region": "us-east-2", "clientIdHash": "{hash}",
                "startUrl": "https://d-1234567890.awsapps.com/start",
                "profileArn": "arn:aws:codewhisperer:us-east-1:123456789012:profile/ABCDEFGHIJKL"}}"#
        ),
    )
    .unwrap();
    let sibling = cache.join(format!("{hash}.json"));
    // Missing: exit 65 naming the file it looked for.
    refused(&mut ctl, &token, &format!("the IdC client registration {} is missing", sibling.display())).await;
    std::fs::write(
        &sibling,
        r#"{"clientId": "fx-client-idc", "clientSecret": "fx-secret-idc", "expiresAt": "2027-02-01T00:00:00Z"}"#,
    )
    .unwrap();
    let r = ctl.run(&["import", token.to_str().unwrap()]).await.ok();
    let set = imported(&r);
    let a = set.iter().next().unwrap();
    assert_eq!(oidc(a), ("fx-client-idc".into(), "fx-secret-idc".into(), "fx-refresh-idc".into()));
    assert_eq!(a.label, "Kiro IDE, IAM Identity Center");
    // Refreshed where the token was issued, served where the profile lives.
    assert_eq!((a.region.as_deref(), a.auth_region.as_deref()), (Some("us-east-1"), Some("us-east-2")));
    assert!(r.stdout.contains(&sibling.display().to_string()), "the source names the registration: {r}");
    assert!(r.stdout.contains("expires 2027-02-01T00:00:00Z"), "{r}");

    // Builder ID, no authMethod: the provider tells; a broken registration is named.
    std::fs::write(
        &token,
        format!(r#"{{"accessToken": "fx-access-b", "refreshToken": "fx-refresh-b", "provider": "BuilderId", "clientIdHash": "{hash}", "region": "us-east-1"}}"#),
    )
    .unwrap();
    let r = ctl.run(&["import", token.to_str().unwrap()]).await.ok();
    let set = imported(&r);
    let a = set.iter().next().unwrap();
    assert_eq!(oidc(a).2, "fx-refresh-b");
    assert_eq!(a.label, "Kiro IDE, Builder ID");
    std::fs::write(&sibling, r#"{"clientId": "fx-client-idc"}"#).unwrap();
    refused(&mut ctl, &token, "has no clientSecret").await;
    std::fs::write(&sibling, "not json").unwrap();
    refused(&mut ctl, &token, "is not valid JSON").await;

    // The registration itself is not a token file: the message says what to import instead.
    std::fs::write(&sibling, r#"{"clientId": "fx-client-idc", "clientSecret": "fx-secret-idc"}"#).unwrap();
    refused(&mut ctl, &sibling, "import the Kiro IDE's kiro-auth-token.json").await;
    // An authMethod amqctl does not know.
    std::fs::write(&token, r#"{"refreshToken": "fx-refresh-x", "authMethod": "saml"}"#).unwrap();
    refused(&mut ctl, &token, "authMethod \"saml\" is neither \"social\"").await;
    // IdC without a way to the registration.
    std::fs::write(&token, r#"{"refreshToken": "fx-refresh-x", "authMethod": "IdC"}"#).unwrap();
    refused(&mut ctl, &token, "no clientIdHash").await;
    // A clientIdHash that is a path, not a file name.
    std::fs::write(
        &token,
        r#"{"refreshToken": "fx-refresh-x", "authMethod": "IdC", "clientIdHash": "../../etc/passwd"}"#,
    )
    .unwrap();
    refused(&mut ctl, &token, "is not a file name").await;
    assert_no_fixture_secret_leaked(&ctl);
}

#[tokio::test]
async fn import_kiro_cli_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = Ctl::new(&dir.path().join("absent.sock"));

    // kiro-cli: a social sign-in, an IdC one (snake_case JSON, as kiro-cli writes it), the
    // Amazon Q CLI's copy of the IdC one, a kind amqctl does not import, and the active profile.
    let kiro = dir.path().join("kiro-cli");
    std::fs::create_dir(&kiro).unwrap();
    let db = kiro.join("data.sqlite3");
    let before = sqlite_fixture(
        &db,
        r#"
        CREATE TABLE auth_kv (key TEXT PRIMARY KEY, value TEXT);
        CREATE TABLE state (key TEXT PRIMARY KEY, value BLOB);
        INSERT INTO auth_kv VALUES
          ('kirocli:social:token', '{"accessToken": "fx-access-1", "refreshToken": "fx-refresh-social", "expiresAt": "2026-11-30T10:00:00Z", "provider": "Github", "profileArn": "arn:aws:codewhisperer:us-east-1:699475941385:profile/EHGA3GRVQMUK"}'),
          ('kirocli:odic:token', '{"access_token": "fx-access-2", "refresh_token": "fx-refresh-idc", "expires_at": "2026-11-30T10:00:00Z", "region": "us-east-2", "start_url": "https://d-1234567890.awsapps.com/start", "oauth_flow": "DeviceCode"}'),
          ('kirocli:odic:device-registration', '{"client_id": "fx-client-idc", "client_secret": "fx-secret-idc", "client_secret_expires_at": "2027-02-01T00:00:00Z", "region": "us-east-2"}'),
          ('codewhisperer:odic:token', '{"access_token": "fx-access-2", "refresh_token": "fx-refresh-idc", "region": "us-east-2"}'),
          ('codewhisperer:odic:device-registration', '{"client_id": "fx-client-idc", "client_secret": "fx-secret-idc", "region": "us-east-2"}'),
          ('kirocli:external-idp:token', '{"access_token": "fx-access-3", "refresh_token": "fx-refresh-ext"}'),
          ('kirocli:telemetry-client-id', '0c9b0e0e-1111-2222-3333-444455556666');
        INSERT INTO state VALUES ('api.codewhisperer.profile', CAST('{"arn": "arn:aws:codewhisperer:eu-central-1:123456789012:profile/ABCDEFGHIJKL", "profile_name": "QDevProfile"}' AS BLOB));
        "#,
    );
    let r = ctl.run(&["import", db.to_str().unwrap()]).await.code(0);
    let set = imported(&r);
    let a: Vec<_> = set.iter().collect();
    assert_eq!(a.len(), 2, "the codewhisperer: copy is imported once: {r}");
    assert_eq!(social(a[0]), "fx-refresh-social");
    assert_eq!(a[0].label, "kiro-cli, GitHub sign-in");
    assert_eq!(a[0].region.as_deref(), Some("us-east-1"));
    assert_eq!(oidc(a[1]), ("fx-client-idc".into(), "fx-secret-idc".into(), "fx-refresh-idc".into()));
    assert_eq!(a[1].label, "kiro-cli, IdC");
    // The active profile from `state`; tokens refreshed where they were issued.
    assert_eq!(
        a[1].profile_arn.as_deref(),
        Some("arn:aws:codewhisperer:eu-central-1:123456789012:profile/ABCDEFGHIJKL")
    );
    assert_eq!(
        (a[1].region.as_deref(), a[1].auth_region.as_deref()),
        (Some("eu-central-1"), Some("us-east-2"))
    );
    // What was found, said.
    assert!(r.stdout.contains("# found: kirocli:social:token (social), kirocli:odic:token + kirocli:odic:device-registration (oidc)"), "{r}");
    assert!(
        r.stdout
            .contains("# from kiro-cli's auth_kv keys kirocli:odic:token + kirocli:odic:device-registration"),
        "{r}"
    );
    assert!(r.stdout.contains("codewhisperer:odic:token + codewhisperer:odic:device-registration: the same refresh token as an account above: imported once"), "{r}");
    // The external-IdP token is not imported, and stderr says so (without its secret).
    assert!(!r.stdout.contains("fx-refresh-ext"), "{r}");
    assert!(r.stderr.contains("amqctl: warning: auth_kv key kirocli:external-idp:token: a kind of sign-in amqctl does not import"), "{r}");
    assert_eq!(r.stderr.lines().count(), 1, "{r}");
    // Read-only: the database is unchanged and nothing was created beside it.
    assert_eq!(std::fs::read(&db).unwrap(), before, "the database changed");
    assert_eq!(files_in(&kiro), ["data.sqlite3"]);

    // The Amazon Q CLI's naming alone, the `oidc` spelling, a WAL-mode database.
    let q = dir.path().join("amazon-q");
    std::fs::create_dir(&q).unwrap();
    let db = q.join("data.sqlite3");
    let before = sqlite_fixture(
        &db,
        r#"
        PRAGMA journal_mode = WAL;
        CREATE TABLE Auth_KV (Key TEXT, Value TEXT);
        INSERT INTO Auth_KV VALUES
          ('codewhisperer:oidc:token', '{"access_token": "fx-access-4", "refresh_token": "fx-refresh-q", "region": "us-east-1", "start_url": "https://view.awsapps.com/start"}'),
          ('codewhisperer:oidc:device-registration', '{"client_id": "fx-client-q", "client_secret": "fx-secret-q", "region": "us-east-1"}');
        "#,
    );
    assert_eq!(files_in(&q), ["data.sqlite3"], "the fixture's WAL was checkpointed and removed");
    let r = ctl.run(&["import", db.to_str().unwrap()]).await.ok();
    let set = imported(&r);
    let a = set.iter().next().unwrap();
    assert_eq!(oidc(a), ("fx-client-q".into(), "fx-secret-q".into(), "fx-refresh-q".into()));
    assert_eq!(a.label, "Amazon Q CLI, Builder ID");
    assert_eq!(a.auth_region.as_deref(), Some("us-east-1"));
    assert_eq!(std::fs::read(&db).unwrap(), before, "the database changed");
    assert_eq!(files_in(&q), ["data.sqlite3"], "no -wal or -shm left behind");

    // A WAL-mode database another process has open: read through its WAL, left as it was.
    let live = rusqlite::Connection::open(&db).unwrap();
    live.execute_batch(
        "INSERT INTO Auth_KV VALUES ('kirocli:social:token', '{\"refreshToken\": \"fx-refresh-live\"}');",
    )
    .unwrap();
    let r = ctl.run(&["import", db.to_str().unwrap()]).await.ok();
    let set = imported(&r);
    assert_eq!(set.len(), 2, "the row still in the WAL is read: {r}");
    assert!(
        set.iter()
            .any(|a| a.kind() == amq2api::config::accounts::Kind::Social && social(a) == "fx-refresh-live")
    );
    drop(live);

    // An IdC token without its registration, alone: nothing to import.
    let lone = dir.path().join("lone.sqlite3");
    sqlite_fixture(
        &lone,
        r#"CREATE TABLE auth_kv (key TEXT, value TEXT);
           INSERT INTO auth_kv VALUES ('kirocli:odic:token', '{"refresh_token": "fx-refresh-lone"}');"#,
    );
    refused(&mut ctl, &lone, "no client registration beside it (looked for kirocli:odic:device-registration")
        .await;
    // Signed out: an auth_kv table without tokens.
    let out = dir.path().join("signed-out.sqlite3");
    sqlite_fixture(&out, "CREATE TABLE auth_kv (key TEXT, value TEXT);");
    refused(&mut ctl, &out, "is it signed in?").await;
    // auth_kv of another shape.
    let odd = dir.path().join("odd.sqlite3");
    sqlite_fixture(&odd, "CREATE TABLE auth_kv (k TEXT, v TEXT);");
    refused(
        &mut ctl,
        &odd,
        "has no key and value columns (expected kiro-cli's auth_kv(key TEXT, value TEXT)",
    )
    .await;
    assert_no_fixture_secret_leaked(&ctl);
}

#[tokio::test]
async fn import_the_seed_accounts_db() {
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = Ctl::new(&dir.path().join("absent.sock"));

    // The columns of the seed's JSON export.
    let db = dir.path().join("accounts.db");
    let before = sqlite_fixture(
        &db,
        r#"
        CREATE TABLE accounts (id TEXT PRIMARY KEY, label TEXT, clientId TEXT, clientSecret TEXT,
          refreshToken TEXT, accessToken TEXT, other TEXT, last_refresh_time TEXT,
          last_refresh_status TEXT, created_at TEXT, updated_at TEXT, enabled INTEGER);
        INSERT INTO accounts (id, label, clientId, clientSecret, refreshToken, accessToken, enabled) VALUES
          ('6f1c', 'Team A, first seat', 'fx-client-1', 'fx-secret-1', 'fx-refresh-1', 'fx-access-1', 1),
          ('7a2d', 'Team A, first seat', 'fx-client-2', 'fx-secret-2', 'fx-refresh-2', NULL, 0),
          ('8b3e', NULL, 'fx-client-3', 'fx-secret-3', 'fx-refresh-3', 'fx-access-3', NULL);
        "#,
    );
    let r = ctl.run(&["import", db.to_str().unwrap()]).await.ok();
    let set = imported(&r);
    let a: Vec<_> = set.iter().collect();
    assert_eq!(a.len(), 3, "{r}");
    for (i, acc) in a.iter().enumerate() {
        let n = i + 1;
        assert_eq!(
            oidc(acc),
            (format!("fx-client-{n}"), format!("fx-secret-{n}"), format!("fx-refresh-{n}"))
        );
        assert_eq!(acc.kind(), amq2api::config::accounts::Kind::Oidc);
    }
    assert_eq!((a[0].label.as_str(), a[0].enabled), ("Team A, first seat", true));
    assert_eq!((a[1].label.as_str(), a[1].enabled), ("Team A, first seat", false));
    assert_eq!((a[2].label.as_str(), a[2].enabled), ("account 3", true));
    assert_ne!(a[0].id, a[1].id);
    assert!(r.stdout.contains("# from the seed's accounts.db, table accounts, row 2"), "{r}");
    assert_eq!(std::fs::read(&db).unwrap(), before, "the database changed");

    // Another spelling of the same schema: table and columns in other case and snake_case.
    let db2 = dir.path().join("seed-copy.sqlite");
    sqlite_fixture(
        &db2,
        r#"CREATE TABLE ACCOUNTS (Name TEXT, CLIENT_ID TEXT, client_secret TEXT, refresh_token TEXT, Enabled TEXT);
           INSERT INTO ACCOUNTS VALUES ('Seat B', 'fx-client-b', 'fx-secret-b', 'fx-refresh-b', 'false');"#,
    );
    let r = ctl.run(&["import", db2.to_str().unwrap()]).await.ok();
    let set = imported(&r);
    let b = set.iter().next().unwrap();
    assert_eq!(oidc(b), ("fx-client-b".into(), "fx-secret-b".into(), "fx-refresh-b".into()));
    assert_eq!((b.label.as_str(), b.enabled), ("Seat B", false));

    // A column missing: what was expected, and what is there.
    let db3 = dir.path().join("partial.db");
    sqlite_fixture(&db3, "CREATE TABLE accounts (id TEXT, label TEXT, clientId TEXT, refreshToken TEXT);");
    let r = refused(&mut ctl, &db3, "whose table accounts has no clientSecret column").await;
    assert!(r.stderr.contains("label, clientId, clientSecret, refreshToken"), "{r}");
    assert!(r.stderr.contains("found columns: id, label, clientId, refreshToken"), "{r}");
    // A row without a refresh token.
    let db4 = dir.path().join("row.db");
    sqlite_fixture(
        &db4,
        r#"CREATE TABLE accounts (label TEXT, clientId TEXT, clientSecret TEXT, refreshToken TEXT);
           INSERT INTO accounts VALUES ('Seat C', 'fx-client-c', 'fx-secret-c', NULL);"#,
    );
    refused(&mut ctl, &db4, "table accounts, row 1 (label \"Seat C\"): no refreshToken").await;
    // No account at all.
    let db5 = dir.path().join("empty.db");
    sqlite_fixture(
        &db5,
        "CREATE TABLE accounts (label TEXT, clientId TEXT, clientSecret TEXT, refreshToken TEXT);",
    );
    refused(&mut ctl, &db5, "no account in it (the seed's accounts.db").await;
    assert_no_fixture_secret_leaked(&ctl);
}

#[tokio::test]
async fn import_refuses_foreign_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = Ctl::new(&dir.path().join("absent.sock"));
    let file = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let expected = "expected the Kiro IDE's kiro-auth-token.json, kiro-cli's data.sqlite3";
    refused(&mut ctl, &file("empty.json", b""), &format!("the file is empty: {expected}")).await;
    refused(&mut ctl, &file("blank.txt", b" \n\n\t\n"), "the file is empty").await;
    refused(&mut ctl, &file("comments.txt", b"# nothing but a comment\n"), "no account in it").await;
    // Random bytes (not UTF-8), whatever the name.
    let noise: Vec<u8> = (0u32..4096).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 | 0x80).collect();
    refused(
        &mut ctl,
        &file("kiro-auth-token.json", &noise),
        &format!("binary data is neither text nor an SQLite database: {expected}"),
    )
    .await;
    // A PNG named like a database.
    let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01\0\0\0\x01\x08\x06\0\0\0\x1f\x15\xc4\x89".to_vec();
    png.extend_from_slice(&noise[..64]);
    refused(&mut ctl, &file("accounts.db", &png), "a PNG image is neither text nor an SQLite database").await;
    // JSON of other shapes.
    refused(
        &mut ctl,
        &file("other.json", br#"{"name": "x", "version": 3}"#),
        "a JSON object with keys name, version, not a credential file",
    )
    .await;
    refused(&mut ctl, &file("strings.json", br#"["a", "b"]"#), "a JSON array, not a credential file").await;
    refused(&mut ctl, &file("number.json", b"42"), "line 1: expected label|password|clientId").await;
    refused(&mut ctl, &file("broken.json", br#"{"refreshToken": "fx-refresh-x""#), "not valid JSON").await;
    refused(&mut ctl, &file("none.json", b"[]"), "no account in it").await;
    // Prose.
    refused(
        &mut ctl,
        &file("notes.txt", b"Remember to rotate the keys.\n"),
        "line 1: expected label|password|clientId|clientSecret|refreshToken|accessToken",
    )
    .await;
    // SQLite of another schema, and a file with only the SQLite header.
    let other = dir.path().join("data.sqlite3");
    sqlite_fixture(
        &other,
        "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT); CREATE TABLE tags (name TEXT);",
    );
    refused(&mut ctl, &other, "an SQLite database with tables notes, tags, not one amqctl reads: expected kiro-cli's data.sqlite3 (table auth_kv with key, value) or the seed's accounts.db").await;
    let none = dir.path().join("blank.sqlite3");
    sqlite_fixture(&none, "PRAGMA user_version = 1;");
    refused(&mut ctl, &none, "an SQLite database with no tables").await;
    let mut fake = b"SQLite format 3\0".to_vec();
    fake.extend_from_slice(&noise[..200]);
    refused(&mut ctl, &file("fake.sqlite3", &fake), "expected kiro-cli's data.sqlite3").await;
    assert_no_fixture_secret_leaked(&ctl);
}

#[tokio::test]
async fn imported_entries_pass_check_config() {
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = Ctl::new(&dir.path().join("absent.sock"));
    // One file of each format, imported and appended, as the README shows.
    let token = dir.path().join("kiro-auth-token.json");
    std::fs::write(
        &token,
        r#"{"accessToken": "fx-access-1", "refreshToken": "fx-refresh-ide", "authMethod": "IdC", "provider": "BuilderId",
            "region": "us-east-1", "clientIdHash": "c0ffee"}"#,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("c0ffee.json"),
        r#"{"clientId": "fx-client-ide", "clientSecret": "fx-secret-ide"}"#,
    )
    .unwrap();
    let cli = dir.path().join("data.sqlite3");
    sqlite_fixture(
        &cli,
        r#"CREATE TABLE auth_kv (key TEXT, value TEXT);
           INSERT INTO auth_kv VALUES ('kirocli:social:token', '{"refreshToken": "fx-refresh-cli", "profileArn": "arn:aws:codewhisperer:us-east-1:699475941385:profile/EHGA3GRVQMUK", "region": "us-east-1"}');"#,
    );
    let seed = dir.path().join("accounts.db");
    sqlite_fixture(
        &seed,
        r#"CREATE TABLE accounts (label TEXT, clientId TEXT, clientSecret TEXT, refreshToken TEXT, enabled INTEGER);
           INSERT INTO accounts VALUES ('Seed seat', 'fx-client-seed', 'fx-secret-seed', 'fx-refresh-seed', 0);"#,
    );
    let lines = dir.path().join("export.txt");
    std::fs::write(&lines, "Line seat|pw|fx-client-line|fx-secret-line|fx-refresh-line|fx-access-line\n")
        .unwrap();
    let mut all = String::new();
    for f in [&token, &cli, &seed, &lines] {
        all.push_str(&ctl.run(&["import", f.to_str().unwrap()]).await.ok().stdout);
    }
    let accounts = dir.path().join("accounts.toml");
    std::fs::write(&accounts, &all).unwrap();
    std::fs::set_permissions(&accounts, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let config = dir.path().join("amq2api.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = [\"127.0.0.1:8443\"]\n[auth]\napi_keys = [\"{API_KEY}\"]\n[accounts]\nfile = {:?}\n",
            accounts.display().to_string()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(common::child::AMQ2API)
        .arg("check-config")
        .arg("--config")
        .arg(&config)
        .env_remove("CREDENTIALS_DIRECTORY")
        .env_remove("STATE_DIRECTORY")
        .env_remove("RUNTIME_DIRECTORY")
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        out.status.code(),
        Some(0),
        "check-config refused the imported entries:\n{stdout}\n{stderr}\n{all}"
    );
    assert!(!stdout.contains(FIXTURE) && !stderr.contains(FIXTURE), "{stdout}\n{stderr}");
    let set = parse_imported(&all);
    let kinds: Vec<&str> = set.iter().map(|a| a.kind().as_str()).collect();
    assert_eq!(kinds, ["oidc", "social", "oidc", "oidc"], "{all}");
    assert_no_fixture_secret_leaked(&ctl);
}

#[tokio::test]
async fn completions_and_man() {
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = Ctl::new(&dir.path().join("absent.sock"));
    let r = ctl.run(&["completions", "bash"]).await.ok();
    assert!(r.stdout.len() > 1000, "{r}");
    assert!(r.stdout.contains("complete") && r.stdout.contains("amqctl"), "{r}");
    for sub in
        ["status", "accounts", "refresh", "check", "enable", "disable", "reload", "import", "login", "export"]
    {
        assert!(r.stdout.contains(sub), "no {sub} in the bash completions");
    }
    for shell in ["zsh", "fish"] {
        let r = ctl.run(&["completions", shell]).await.ok();
        assert!(!r.stdout.is_empty());
    }
    let r = ctl.run(&["man"]).await.ok();
    assert!(r.stdout.starts_with(".ie") || r.stdout.contains(".TH amqctl"), "{r}");
    assert!(r.stdout.contains(".TH amqctl"), "{r}");
    assert!(r.stdout.contains("refresh"), "{r}");
    assert!(r.stdout.contains("login") && r.stdout.contains("export"), "{r}");
    // The emulator's endpoint override is for tests and the demo: not in the man page.
    assert!(!r.stdout.contains("oidc-endpoint") && !r.stdout.contains("OIDC_ENDPOINT"), "{r}");
    let r = ctl.run(&["login", "--help"]).await.ok();
    assert!(r.stdout.contains("--start-url") && !r.stdout.contains("oidc-endpoint"), "{r}");
    let r = ctl.run(&["completions", "no-such-shell"]).await;
    assert_eq!(r.code, 64, "{r}");
}

// ---------------------------------------------------------------------------------------------
// errors: no daemon, no permission

#[tokio::test]
async fn no_daemon_is_exit_69() {
    let mut ctl = Ctl::new(Path::new("/nonexistent/x.sock"));
    for args in [&["status"][..], &["--json", "status"][..], &["refresh", "--all"][..], &["reload"][..]] {
        let r = ctl.run(args).await.code(69);
        assert_eq!(r.stdout, "", "{r}");
        assert!(r.stderr.contains("amq2api is not running (no socket at /nonexistent/x.sock)"), "{r}");
    }
    // A stale socket file: nobody listens.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let mut ctl = Ctl::new(&path);
    let r = ctl.run(&["status"]).await.code(69);
    assert!(r.stderr.contains("amq2api is not running"), "{r}");
}

#[tokio::test]
async fn a_caller_outside_the_group_is_refused() {
    let Some(setpriv) =
        ["/usr/bin/setpriv", "/bin/setpriv", "/usr/sbin/setpriv"].into_iter().find(|p| Path::new(p).exists())
    else {
        println!("note: setpriv not found; the permission test is skipped");
        return;
    };
    if !nix::unistd::getuid().is_root() {
        println!("note: not root, cannot switch to uid 65534; the permission test is skipped");
        return;
    }
    let h = start(&["alpha"]).await;
    let mut ctl = Ctl::of(&h);
    // Let the connection itself through (directory and socket open to all): the daemon's
    // peer-credential check is what must refuse.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(h.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&ctl.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let nobody = [setpriv, "--reuid", "65534", "--regid", "65534", "--clear-groups"];

    for args in [
        &["status"][..],
        &["--json", "accounts"][..],
        &["disable", "alpha"][..],
        &["refresh", "--all"][..],
        &["refresh", "alpha"][..],
    ] {
        let r = ctl.run_as(&nobody, args).await;
        assert_eq!(r.code, 77, "{r}");
        assert_eq!(r.stdout, "", "{r}");
        assert!(r.stderr.contains("add yourself to group amq2api"), "{r}");
        assert!(r.stderr.contains(&ctl.socket.display().to_string()), "{r}");
    }
    // Nothing happened.
    assert_eq!(ctl.account("alpha").await.state, "active");
    // The daemon logged each refusal with the caller's uid.
    let log = logs();
    let refusals: Vec<&str> = log.lines().filter(|l| l.contains("caller refused")).collect();
    assert!(refusals.len() >= 5, "{log}");
    assert!(refusals.iter().all(|l| l.contains("uid=65534")), "{refusals:?}");
    assert!(refusals.iter().any(|l| l.contains("/v1/accounts/alpha/disable")), "{refusals:?}");
    // Root (the test) is let in, and its mutating calls are logged with uid and pid.
    ctl.run(&["disable", "alpha"]).await.ok();
    ctl.run(&["enable", "alpha"]).await.ok();
    let log = logs();
    assert!(
        log.lines()
            .any(|l| l.contains("control action") && l.contains("uid=0") && l.contains("action=disable")),
        "{log}"
    );

    ctl.assert_no_secrets(&ids(&["alpha"]));
    h.stop().await;
}

// ---------------------------------------------------------------------------------------------
// scale

#[tokio::test]
async fn refresh_all_over_100_accounts() {
    let names: Vec<String> = (0..100).map(|i| format!("acct-{i:03}")).collect();
    let name_refs: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
    let started = Instant::now();
    let h = start(&name_refs).await;
    let mut ctl = Ctl::of(&h);
    wait_tokens(&mut ctl, 100).await;
    println!("startup: 100 accounts got their first tokens within {:?}", started.elapsed());

    for round in 0..2 {
        let r = ctl.run(&["refresh", "--all"]).await.ok();
        println!("refresh --all over 100 accounts (round {round}): {:?}", r.elapsed);
        let lines: Vec<&str> = r.stdout.lines().collect();
        assert_eq!(lines.len(), 101, "{r}");
        assert!(lines[..100].iter().all(|l| l.starts_with("ok   ")), "{r}");
        assert_eq!(lines[100], "100 of 100 succeeded");
        eprintln!("refresh --all over 100 accounts took {:?}", r.elapsed);
    }
    let r = ctl.run(&["--json", "refresh", "--all"]).await.ok();
    println!("refresh --all --json over 100 accounts: {:?}", r.elapsed);
    let j: Vec<ActionResult> = r.json();
    assert_eq!(j.len(), 100);
    assert!(j.iter().all(|a| a.ok));
    eprintln!("refresh --all --json over 100 accounts took {:?}", r.elapsed);
    for a in &names {
        assert!(h.emulator.stats_for(&client_id(a)).refreshes >= 4, "{a}");
    }
    let t = ctl.run(&["status"]).await.ok();
    println!("status over 100 accounts: {:?}", t.elapsed);
    assert_eq!(t.line("pool:").split(':').nth(1).unwrap().trim().split(' ').next(), Some("100"));

    ctl.assert_no_secrets(&names);
    h.stop().await;
}

#[test]
fn the_token_detector_sees_tokens() {
    assert_eq!(
        token_like("x aoaABCDEFGHIJKLMNOPQRSTUVWXYZ0123 y").as_deref(),
        Some("aoaABCDEFGHIJKLMNOPQRSTUVWXYZ0123")
    );
    assert!(token_like("refresh aorQWERTYUIOPASDFGHJKLZXCVB").is_some());
    assert_eq!(token_like("token:            sha256:1e8d8386… aoa short"), None);
}

/// An OIDC account's client id, client secret and refresh token.
fn oidc(a: &amq2api::config::AccountSpec) -> (String, String, String) {
    match &a.credentials {
        amq2api::config::Credentials::Oidc { client_id, client_secret, refresh_token } => (
            client_id.expose().to_owned(),
            client_secret.expose().to_owned(),
            refresh_token.expose().to_owned(),
        ),
        other => panic!("not an oidc account: {:?}", other.kind()),
    }
}

// ---------------------------------------------------------------------------------------------
// login: the OIDC device flow against the emulator

/// `amqctl login` against the emulator's OIDC endpoint.
async fn login(ctl: &mut Ctl, emulator: &amq2api::emulator::Emulator, extra: &[&str]) -> Out {
    let endpoint = emulator.oidc_endpoint();
    let mut args = vec!["login", "--oidc-endpoint", endpoint.as_str()];
    args.extend_from_slice(extra);
    ctl.run(&args).await
}

#[tokio::test]
async fn login_prints_an_account_that_serves() {
    let h = start(&["alpha"]).await;
    let mut ctl = Ctl::of(&h);
    wait_tokens(&mut ctl, 1).await;
    h.emulator.set_device_flow(amq2api::emulator::DeviceFlow { pending_polls: 2, ..Default::default() });

    let r = login(&mut ctl, &h.emulator, &["--id", "fresh"]).await.code(0);
    // stderr: the complete verification URL, the URL and the code apart, the secrets warning.
    let code_line = r.stderr.lines().find(|l| l.contains("enter the code")).unwrap_or_else(|| panic!("{r}"));
    let user_code = code_line.rsplit(' ').next().unwrap().to_string();
    assert_eq!(user_code.len(), 9, "{r}");
    assert!(r.stderr.contains(&format!("?user_code={user_code}")), "{r}");
    assert!(r.stderr.contains("AWS Builder ID"), "{r}");
    assert!(r.stderr.contains("stdout holds this account's secrets"), "{r}");
    // Waited through two pending polls, each after the announced interval (1 s).
    assert!(r.elapsed >= Duration::from_secs(3), "{r}");
    let d = h.emulator.device_stats();
    assert_eq!((d.registrations, d.authorizations, d.pending, d.approved), (1, 1, 2, 1), "{d:?}");
    assert_eq!((d.slow_downs, d.too_early), (0, 0), "{d:?}");
    // stdout: one valid oidc entry with the registration and the issued refresh token.
    let set = imported(&r);
    let a = set.iter().next().unwrap();
    assert_eq!(set.iter().count(), 1);
    assert_eq!(a.id.as_str(), "fresh");
    assert_eq!(a.kind().as_str(), "oidc");
    assert_eq!(a.region.as_deref(), Some("us-east-1"));
    let (cid, secret, refresh) = oidc(a);
    assert_eq!(h.emulator.live_refresh_token(&cid).as_deref(), Some(refresh.as_str()));

    // Fed to the daemon, the account serves.
    let accounts = h.dir.path().join("accounts.toml");
    let mut text = std::fs::read_to_string(&accounts).unwrap();
    text.push('\n');
    text.push_str(&r.stdout);
    std::fs::write(&accounts, text).unwrap();
    let mut ctl = Ctl::of(&h);
    let rl: ReloadResult = ctl.run(&["--json", "reload"]).await.ok().json();
    assert!(rl.ok, "{rl:?}");
    ctl.run(&["refresh", "fresh"]).await.ok();
    ctl.run(&["disable", "alpha"]).await.ok();
    message_ok(&h).await;
    assert!(h.emulator.stats_for(&cid).requests >= 1);
    // The secrets it printed never reached the daemon's log.
    let log = logs();
    assert!(!log.contains(&secret) && !log.contains(&refresh), "the daemon logged a login secret");
    ctl.assert_no_secrets(&ids(&["alpha"]));
    h.stop().await;
}

#[tokio::test]
async fn login_honours_slow_down() {
    use amq2api::emulator::{DeviceFlow, Emulator, EmulatorOptions};
    let emulator = Emulator::start(EmulatorOptions::default()).await.unwrap();
    emulator.set_device_flow(DeviceFlow { pending_polls: 0, slow_down_on: vec![1], ..Default::default() });
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = Ctl::new(&dir.path().join("absent.sock"));
    let r = login(
        &mut ctl,
        &emulator,
        &["--start-url", "https://d-1234567890.awsapps.com/start", "--region", "eu-west-1"],
    )
    .await
    .code(0);
    // The second poll waited the interval plus 5 s, and came on time.
    assert!(r.elapsed >= Duration::from_secs(7), "{r}");
    assert!(r.stderr.contains("every 6 s"), "{r}");
    assert!(r.stderr.contains("IAM Identity Center (https://d-1234567890.awsapps.com/start)"), "{r}");
    let d = emulator.device_stats();
    assert_eq!((d.slow_downs, d.too_early, d.approved), (1, 0, 1), "{d:?}");
    // An Identity Center outside the API's regions: tokens refresh there, the API is us-east-1.
    let set = imported(&r);
    let a = set.iter().next().unwrap();
    assert!(a.id.as_str().starts_with("idc-"), "{r}");
    assert_eq!(a.region.as_deref(), Some("us-east-1"));
    assert_eq!(a.auth_region.as_deref(), Some("eu-west-1"));
}

#[tokio::test]
async fn login_denied_or_expired() {
    use amq2api::emulator::{DeviceDecision, DeviceFlow, Emulator, EmulatorOptions};
    let emulator = Emulator::start(EmulatorOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = Ctl::new(&dir.path().join("absent.sock"));

    emulator.set_device_flow(DeviceFlow { decision: Some(DeviceDecision::Deny), ..Default::default() });
    let r = login(&mut ctl, &emulator, &[]).await.code(77);
    assert_eq!(r.stdout, "", "{r}");
    assert!(r.stderr.contains("denied"), "{r}");
    assert!(!r.stderr.contains("stdout holds"), "{r}");

    // Nobody approves: the code expires (2 s here) and login says so.
    emulator.set_device_flow(DeviceFlow { decision: None, expires_in_secs: 2, ..Default::default() });
    let r = login(&mut ctl, &emulator, &[]).await.code(1);
    assert_eq!(r.stdout, "", "{r}");
    assert!(r.stderr.contains("the code expired"), "{r}");
    let d = emulator.device_stats();
    assert_eq!((d.denied, d.approved, d.too_early), (1, 0, 0), "{d:?}");

    // A service that closes every connection without an answer: unavailable, at once. (The
    // socket stays bound for the whole test, so no other process can take its port meanwhile.)
    let closing = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", closing.local_addr().unwrap());
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let closer = tokio::spawn({
        let accepted = accepted.clone();
        async move {
            while let Ok((conn, _)) = closing.accept().await {
                accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                drop(conn);
            }
        }
    });
    let t0 = Instant::now();
    let r = ctl.run(&["login", "--oidc-endpoint", &url]).await.code(69);
    assert_eq!(r.stdout, "", "{r}");
    assert!(r.stderr.contains(&url), "{r}");
    assert!(t0.elapsed() < Duration::from_secs(10), "took {:?}", t0.elapsed());
    assert!(accepted.load(std::sync::atomic::Ordering::SeqCst) >= 1, "the call reached the service");
    closer.abort();
    // Plain HTTP elsewhere than loopback is refused before anything is sent.
    let r = ctl.run(&["login", "--oidc-endpoint", "http://oidc.example/"]).await.code(64);
    assert!(r.stderr.contains("loopback"), "{r}");
}

// ---------------------------------------------------------------------------------------------
// export: the live credentials, root only

/// `amq2api check-config` over `accounts` (a file's text) with a minimal configuration: exit
/// code, stdout, stderr.
fn check_config(dir: &Path, accounts: &str) -> (i32, String, String) {
    let file = dir.join("exported-accounts.toml");
    std::fs::write(&file, accounts).unwrap();
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let config = dir.join("check.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = [\"127.0.0.1:8443\"]\n[auth]\napi_keys = [\"{API_KEY}\"]\n[accounts]\nfile = {:?}\n",
            file.display().to_string()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(common::child::AMQ2API)
        .arg("check-config")
        .arg("--config")
        .arg(&config)
        .env_remove("CREDENTIALS_DIRECTORY")
        .env_remove("STATE_DIRECTORY")
        .env_remove("RUNTIME_DIRECTORY")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn export_gives_the_rotated_tokens() {
    let names = ["alpha", "beta"];
    let h = start(&names).await;
    let mut ctl = Ctl::of(&h);
    wait_tokens(&mut ctl, 2).await;
    // Another rotation for alpha: the file's token died at the first.
    ctl.run(&["refresh", "alpha"]).await.ok();
    ctl.assert_no_secrets(&ids(&names));

    let mut ex = Ctl::of(&h);
    let r = ex.run(&["export"]).await.code(0);
    assert!(r.stderr.contains("stdout holds the secrets of 2 accounts"), "{r}");
    let set = imported(&r);
    assert_eq!(set.iter().count(), 2, "{r}");
    let mut live = Vec::new();
    for a in set.iter() {
        let id = a.id.as_str();
        let (cid, secret, refresh) = oidc(a);
        assert_eq!(cid, client_id(id));
        assert_eq!(secret, format!("secret-{id}"));
        assert_ne!(refresh, format!("refresh-{id}"), "the file's token, dead since the first rotation");
        assert_eq!(h.emulator.live_refresh_token(&cid).as_deref(), Some(refresh.as_str()), "{r}");
        live.push(refresh);
    }
    assert!(r.stdout.contains("# rotated by the daemon"), "{r}");
    // What it printed is a valid accounts file as it stands.
    let (code, out, err) = check_config(ex.work.path(), &r.stdout);
    assert_eq!(code, 0, "check-config refused the export:\n{out}\n{err}\n{}", r.stdout);
    assert!(out.contains("configuration OK"), "{out}\n{err}");
    assert_eq!(err, "", "{out}\n{err}");

    // --json: the wire type.
    let j: amq2api::control::wire::Export = ex.run(&["--json", "export"]).await.code(0).json();
    assert_eq!(j.accounts.len(), 2);
    assert!(j.accounts.iter().all(|a| a.rotated && a.kind == "oidc"));

    // Each call is logged with uid and pid, and no secret is.
    let log = logs();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("control: export")).collect();
    assert_eq!(lines.len(), 2, "{log}");
    let uid = nix::unistd::getuid().as_raw();
    assert!(lines.iter().all(|l| l.contains(&format!("uid={uid}")) && l.contains("pid=")), "{lines:?}");
    for s in live.iter().map(String::as_str).chain(["secret-alpha", "secret-beta"]) {
        assert!(!log.contains(s), "the daemon logged a secret");
    }
    h.stop().await;
}

#[tokio::test]
async fn export_is_refused_to_the_group() {
    let Some(setpriv) =
        ["/usr/bin/setpriv", "/bin/setpriv", "/usr/sbin/setpriv"].into_iter().find(|p| Path::new(p).exists())
    else {
        println!("note: setpriv not found; the export permission test is skipped");
        return;
    };
    if !nix::unistd::getuid().is_root() {
        println!("note: not root, cannot switch to uid 65534; the export permission test is skipped");
        return;
    }
    let h = start(&["alpha"]).await;
    let mut ctl = Ctl::of(&h);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(h.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // A member of the daemon's group (its primary group here), not its user, not root.
    let gid = nix::unistd::getgid().as_raw().to_string();
    let member = [setpriv, "--reuid", "65534", "--regid", gid.as_str(), "--clear-groups"];
    // The group may use the socket…
    let r = ctl.run_as(&member, &["status"]).await;
    assert_eq!(r.code, 0, "{r}");
    // …but not export.
    for args in [&["export"][..], &["--json", "export"][..]] {
        let r = ctl.run_as(&member, args).await;
        assert_eq!(r.code, 77, "{r}");
        assert_eq!(r.stdout, "", "{r}");
        assert!(r.stderr.contains("for root only"), "{r}");
        assert!(!r.stderr.contains("add yourself to group"), "{r}");
    }
    let log = logs();
    let refusals: Vec<&str> = log.lines().filter(|l| l.contains("export refused")).collect();
    assert_eq!(refusals.len(), 2, "{log}");
    assert!(refusals.iter().all(|l| l.contains("uid=65534") && l.contains("pid=")), "{refusals:?}");
    ctl.assert_no_secrets(&ids(&["alpha"]));
    h.stop().await;
}

/// The model a request was actually sent upstream as is in the access log (`upstream_model`,
/// next to the client's `model`) and in `amqctl account ID` (`last model`, and `last_model` in
/// `--json`): the real daemon binary, its log, the real amqctl.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_model_is_in_the_access_log_and_amqctl() {
    use common::child::{AMQ2API, ChildDaemon, write_config};
    let emulator = amq2api::emulator::Emulator::start(Default::default()).await.unwrap();
    let ids = vec!["model-1".to_owned()];
    emulator.add_account(&client_id("model-1"), "secret-model-1", "refresh-model-1");
    let tmp = tempfile::tempdir().unwrap();
    let config = write_config(tmp.path(), &emulator, &ids, "");
    let log = tmp.path().join("daemon.log");
    let result = tokio::task::spawn_blocking(move || {
        let d = ChildDaemon::start_logged(std::process::Command::new(AMQ2API), &config, &[], Some(&log));
        let before = d.ctl_json(&["account", "model-1"]).unwrap();
        assert!(before["last_model"].is_null(), "{before}");
        let body = simple("which model?", false).to_string();
        let mut s = std::net::TcpStream::connect(d.addr()).unwrap();
        use std::io::{Read, Write};
        write!(
            s,
            "POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: {API_KEY}\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let json = d.ctl_json(&["account", "model-1"]).unwrap();
        assert_eq!(json["last_model"], "claude-sonnet-4.5", "{json}");
        let text = d.ctl_text(&["account", "model-1"]);
        assert!(text.lines().any(|l| l.starts_with("last model:") && l.ends_with("claude-sonnet-4.5")), "{text}");
        assert_eq!(d.stop(Duration::from_secs(30)), 0);
        let logged = std::fs::read_to_string(&log).unwrap();
        let access = logged.lines().find(|l| l.contains("status=200")).unwrap_or_else(|| panic!("{logged}"));
        assert!(access.contains("model=claude-sonnet-4-5-20250929"), "{access}");
        assert!(access.contains("upstream_model=\"claude-sonnet-4.5\""), "{access}");
    })
    .await;
    if let Err(e) = result {
        std::panic::resume_unwind(e.into_panic());
    }
}

// ---------------------------------------------------------------------------------------------
// Operator polish: enable/disable --all, LAST ERROR's time, 529's reason phrase, closed pipes,
// import from standard input, the "not running" hint, one fatal line, exit codes in the man pages

/// `amqctl disable --all` and `enable --all`: a line an account and a summary (an array with
/// `--json`); without ids or `--all`, a usage error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enable_and_disable_all() {
    let names = ["alpha", "beta", "gamma"];
    let h = start(&names).await;
    let mut ctl = Ctl::of(&h);
    let r = ctl.run(&["disable", "--all"]).await.ok();
    assert!(r.stdout.ends_with("3 of 3 succeeded\n"), "{r}");
    let s = ctl.status().await;
    assert_eq!((s.pool.active, s.pool.disabled), (0, 3), "{:?}", s.pool);
    // 529 on HTTP/1.1 carries its reason phrase.
    let mut tcp = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let body = simple("nobody serves", false).to_string();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tcp.write_all(
        format!(
            "POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: {API_KEY}\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 529 Overloaded\r\n"), "{answer}");
    let j: Vec<ActionResult> = ctl.run(&["--json", "enable", "--all"]).await.ok().json();
    assert_eq!(
        j.iter().map(|r| (r.id.as_str(), r.ok)).collect::<Vec<_>>(),
        [("alpha", true), ("beta", true), ("gamma", true)]
    );
    assert_eq!(ctl.status().await.pool.active, 3);
    let r = ctl.run(&["enable"]).await.code(64);
    assert!(r.stderr.contains("--all"), "{r}");
    // One name keeps its one-line answer.
    let r = ctl.run(&["disable", "beta"]).await.ok();
    assert_eq!(r.stdout, "beta: disabled (state disabled)\n", "{r}");
    h.stop().await;
}

/// An account's last error carries when it happened (`--json` `last_error_at`, "… ago: " in the
/// tables) and clears once a request through the account goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_error_has_its_time_and_clears_on_recovery() {
    let h = start(&["alpha"]).await;
    let mut ctl = Ctl::of(&h);
    h.emulator.set_behaviour(&client_id("alpha"), Behaviour::InternalError);
    let r = post(&h, "/v1/messages", &simple("fails upstream", false)).await;
    assert_ne!(r.status, 200, "{}", r.text());
    let a = ctl.account("alpha").await;
    assert_eq!(a.state, "active");
    assert!(a.last_error.is_some(), "{a:?}");
    let at = a.last_error_at.expect("last_error_at");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    assert!(at <= now && now - at < 60, "{at} vs {now}");
    let t = ctl.run(&["status"]).await.ok();
    assert!(row(&t, "alpha").contains(" ago: "), "{t}");
    let t = ctl.run(&["account", "alpha"]).await.ok();
    assert!(t.line("last error:").contains(" ago: "), "{t}");
    h.emulator.set_behaviour(&client_id("alpha"), Behaviour::Normal);
    message_ok(&h).await;
    let a = ctl.account("alpha").await;
    assert_eq!((a.last_error.as_deref(), a.last_error_at), (None, None), "{a:?}");
    let t = ctl.run(&["account", "alpha"]).await.ok();
    assert!(t.line("last error:").ends_with(" -"), "{t}");
    h.stop().await;
}

/// `amqctl man`, `completions` and a table written into a pipe nobody reads (`amqctl man | head`
/// where head has gone) end quietly: exit 0, nothing on stderr, no panic.
#[test]
fn a_closed_pipe_ends_amqctl_quietly() {
    let dir = tempfile::tempdir().unwrap();
    for args in [&["man"][..], &["completions", "bash"][..], &["import", "-"][..]] {
        let (read, write) = nix::unistd::pipe().unwrap();
        drop(read);
        let mut cmd = std::process::Command::new(AMQCTL);
        cmd.args(args).env_remove("RUST_LOG").stdout(Stdio::from(write)).stderr(Stdio::piped());
        if args[0] == "import" {
            let file = dir.path().join("lines.txt");
            std::fs::write(&file, "Seat|pw|pipe-client|pipe-secret|pipe-refresh|\n").unwrap();
            cmd.stdin(std::fs::File::open(&file).unwrap());
        }
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{args:?}: {out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stderr), "", "{args:?}");
    }
}

/// `amqctl import -` reads standard input (text, JSON, an SQLite database), and `--json` prints
/// the entries as JSON.
#[test]
fn import_reads_standard_input_and_prints_json() {
    let dir = tempfile::tempdir().unwrap();
    let lines = dir.path().join("accounts.txt");
    std::fs::write(&lines, "Seat one|pw|in-client-1|in-secret-1|in-refresh-1|\nSeat two|pw|in-client-2|in-secret-2|in-refresh-2|\n")
        .unwrap();
    let db = dir.path().join("accounts.db");
    sqlite_fixture(
        &db,
        "CREATE TABLE accounts (id TEXT, label TEXT, clientId TEXT, clientSecret TEXT, refreshToken TEXT, enabled INTEGER);
         INSERT INTO accounts VALUES ('1', 'From the db', 'db-client', 'db-secret', 'db-refresh', 1);",
    );
    let run = |args: &[&str], input: &Path| {
        let out = std::process::Command::new(AMQCTL)
            .args(args)
            .env_remove("RUST_LOG")
            .stdin(std::fs::File::open(input).unwrap())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let toml = run(&["import", "-"], &lines);
    assert!(toml.starts_with("# Imported by amqctl from standard input"), "{toml}");
    let set = parse_imported(&toml);
    assert_eq!(set.iter().map(|a| oidc(a).2).collect::<Vec<_>>(), ["in-refresh-1", "in-refresh-2"]);
    let json: serde_json::Value = serde_json::from_str(&run(&["--json", "import", "-"], &lines)).unwrap();
    assert_eq!(json["source"], "standard input");
    let accounts = json["accounts"].as_array().unwrap();
    assert_eq!(accounts.len(), 2, "{json}");
    assert_eq!(accounts[0]["label"], "Seat one");
    assert_eq!(accounts[0]["client_id"], "in-client-1");
    assert_eq!(accounts[1]["refresh_token"], "in-refresh-2");
    assert_eq!(accounts[0]["kind"], "oidc");
    // A file by name prints JSON too.
    let json: serde_json::Value =
        serde_json::from_str(&run(&["import", "--json", lines.to_str().unwrap()], &lines)).unwrap();
    assert_eq!(json["accounts"].as_array().unwrap().len(), 2);
    // An SQLite database through a pipe (its private copy is gone afterwards).
    let before: Vec<String> =
        files_in(&std::env::temp_dir()).into_iter().filter(|f| f.starts_with("amqctl-import-")).collect();
    let toml = run(&["import", "-"], &db);
    assert_eq!(parse_imported(&toml).iter().map(|a| oidc(a).2).collect::<Vec<_>>(), ["db-refresh"]);
    let after: Vec<String> =
        files_in(&std::env::temp_dir()).into_iter().filter(|f| f.starts_with("amqctl-import-")).collect();
    assert_eq!(before, after, "the temporary copy is removed");
}

/// "Not running" names the socket that was given, with a hint that fits it: systemd's for the
/// packaged daemon's socket, the daemon's own `[control] socket` otherwise.
#[tokio::test]
async fn the_not_running_hint_fits_the_socket() {
    let mut ctl = Ctl::new(Path::new("/nonexistent/demo/control.sock"));
    let r = ctl.run(&["status"]).await.code(69);
    assert!(r.stderr.contains("/nonexistent/demo/control.sock"), "{r}");
    assert!(!r.stderr.contains("systemctl"), "no systemd hint for a socket systemd does not make: {r}");
    assert!(r.stderr.contains("--socket"), "{r}");
    assert_eq!(r.stderr.lines().count(), 1, "{r}");
    if !Path::new("/run/amq2api/control.sock").exists() {
        let mut ctl = Ctl::new(Path::new("/run/amq2api/control.sock"));
        let r = ctl.run(&["status"]).await.code(69);
        assert!(r.stderr.contains("systemctl start amq2api"), "{r}");
    }
}

/// A daemon that cannot start says why once (not also as a log line), and exits 71; both man
/// pages document the exit codes, 71 among them.
#[test]
fn a_fatal_error_is_printed_once_and_exit_codes_are_documented() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    std::fs::write(dir.path().join("accounts.toml"), accounts_toml(&ids(&["alpha"]))).unwrap();
    let config = dir.path().join("amq2api.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = [\"{addr}\"]\n[auth]\napi_keys = [\"{API_KEY}\"]\n[upstream]\n\
             endpoint = \"http://127.0.0.1:9/\"\ntoken_endpoint = \"http://127.0.0.1:9/token\"\n\
             [accounts]\nfile = \"accounts.toml\"\n[state]\ndir = \"state\"\n[control]\nsocket = \"control.sock\"\n"
        ),
    )
    .unwrap();
    let out = std::process::Command::new(common::child::AMQ2API)
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "info")
        .env_remove("JOURNAL_STREAM")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(71), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.matches("cannot listen").count(), 1, "{stderr}");
    drop(taken);
    for bin in [common::child::AMQ2API, AMQCTL] {
        let man = std::process::Command::new(bin).arg("man").output().unwrap();
        let text = String::from_utf8_lossy(&man.stdout);
        assert!(text.contains("Exit status"), "{bin}: {text}");
        assert!(text.contains("71"), "{bin}");
    }
}
