//! Shared test harness: an emulator and a daemon in-process on loopback (port 0), and a small
//! HTTP client for talking to the daemon.
#![allow(dead_code)]

pub mod certs;
pub mod child;
pub mod proxy;

use amq2api::config::{self, Env, Loaded};
use amq2api::emulator::{Emulator, EmulatorOptions};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub const API_KEY: &str = "sk-amq-test-key-0123456789abcdef";

/// A running daemon with its emulator.
pub struct Harness {
    pub emulator: Emulator,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub task: Option<tokio::task::JoinHandle<()>>,
    listener: std::net::TcpListener,
}

/// Registers accounts with the emulator and returns their `[[account]]` entries.
pub type MoreAccounts = Box<dyn FnOnce(&Emulator) -> String + Send>;

/// Options for a harness.
pub struct Setup {
    /// Account ids; each is registered with the emulator as client `<id>-client`.
    pub accounts: Vec<String>,
    /// Extra TOML appended to amq2api.toml (whole tables).
    pub extra_config: String,
    /// Extra keys for the `[server]` table.
    pub server: String,
    /// Extra keys for the `[upstream]` table.
    pub upstream: String,
    /// Extra keys for the `[accounts]` table.
    pub accounts_settings: String,
    pub emulator: EmulatorOptions,
    /// Extra keys for every `[[account]]` table.
    pub account_extra: String,
    /// Registers more accounts with the emulator before the daemon starts, and returns their
    /// `[[account]]` entries (appended to the accounts file).
    pub more_accounts: Option<MoreAccounts>,
    /// Extra keys for one `[[account]]` table: (account id, keys).
    pub account_extra_for: Vec<(String, String)>,
    /// Extra keys for the `[auth]` table.
    pub auth: String,
    /// Files written into the directory before the daemon starts: (name, content).
    pub files: Vec<(String, String)>,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            accounts: vec!["acct-1".into()],
            extra_config: String::new(),
            server: String::new(),
            upstream: String::new(),
            accounts_settings: String::new(),
            emulator: EmulatorOptions::default(),
            account_extra: String::new(),
            more_accounts: None,
            account_extra_for: Vec::new(),
            auth: String::new(),
            files: Vec::new(),
        }
    }
}

pub fn client_id(account: &str) -> String {
    format!("{account}-client")
}

pub fn accounts_toml(ids: &[String]) -> String {
    accounts_toml_with(ids, "")
}

pub fn accounts_toml_with(ids: &[String], extra: &str) -> String {
    accounts_toml_for(ids, extra, &[])
}

/// Accounts with `extra` keys in every table and, for some, keys of their own.
pub fn accounts_toml_for(ids: &[String], extra: &str, own: &[(String, String)]) -> String {
    let mut s = String::new();
    for id in ids {
        let own: Vec<&str> = own.iter().filter(|(i, _)| i == id).map(|(_, keys)| keys.as_str()).collect();
        s.push_str(&format!(
            "[[account]]\nid = \"{id}\"\nclient_id = \"{cid}\"\nclient_secret = \"secret-{id}\"\nrefresh_token = \"refresh-{id}\"\n{extra}\n{own}\n\n",
            cid = client_id(id),
            own = own.join("\n"),
        ));
    }
    s
}

impl Harness {
    pub async fn start(setup: Setup) -> Harness {
        if std::env::var_os("AMQ_TEST_LOG").is_some() {
            amq2api::logging::init("debug,hyper=info,h2=info,hyper_util=info");
        }
        let emulator = Emulator::start(setup.emulator).await.expect("emulator starts");
        for id in &setup.accounts {
            emulator.add_account(&client_id(id), &format!("secret-{id}"), &format!("refresh-{id}"));
        }
        let dir = tempfile::tempdir().unwrap();
        let mut accounts = accounts_toml_for(&setup.accounts, &setup.account_extra, &setup.account_extra_for);
        if let Some(more) = setup.more_accounts {
            accounts.push_str(&more(&emulator));
        }
        std::fs::write(dir.path().join("accounts.toml"), accounts).unwrap();
        for (name, content) in &setup.files {
            std::fs::write(dir.path().join(name), content).unwrap();
        }
        let config_path = dir.path().join("amq2api.toml");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::fs::write(
            &config_path,
            format!(
                "[server]\nlisten = [\"{addr}\"]\n{server}\n[auth]\napi_keys = [\"{API_KEY}\"]\n{auth}\n\
                 [upstream]\n{endpoints}{upstream}\n\
                 [accounts]\nfile = \"accounts.toml\"\n{acc}\n[state]\ndir = \"state\"\n[control]\nsocket = \"control.sock\"\n{extra}\n",
                server = setup.server,
                auth = setup.auth,
                endpoints = amq2api::demo::upstream_keys(&emulator),
                upstream = setup.upstream,
                acc = setup.accounts_settings,
                extra = setup.extra_config,
            ),
        )
        .unwrap();
        // The harness keeps its own handle on the listening socket: a restart hands the same
        // socket to the new daemon, and the address is never free for another process meanwhile.
        let mut h = Harness { emulator, addr, dir, config_path, stop: None, task: None, listener };
        h.launch();
        h
    }

    fn launch(&mut self) {
        let listener = self.listener.try_clone().expect("the listening socket can be shared");
        let loaded = load(&self.config_path);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            amq2api::run(loaded, amq2api::Listeners { http: vec![listener] }, async {
                let _ = rx.await;
            })
            .await
            .expect("daemon runs");
        });
        self.stop = Some(tx);
        self.task = Some(task);
    }

    /// Stops the daemon (for inspecting its state directory): returns once `run` has returned
    /// (then nothing of the daemon's holds the state store).
    pub async fn stop_only(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), t)
                .await
                .expect("run returns within 30 s of the stop")
                .expect("the daemon's task ends without a panic");
        }
    }

    /// Stops the daemon and starts it again on the same address, config and state directory.
    pub async fn restart(&mut self) {
        self.stop_only().await;
        self.launch();
    }

    /// A handle with just what a blocking helper needs (the directory and the address).
    pub fn clone_for_ctl(&self) -> CtlHandle {
        CtlHandle { dir: self.dir.path().to_path_buf(), addr: self.addr }
    }

    /// `amqctl --json ARGS` through the real binary, against this daemon.
    pub fn ctl_json(&self, args: &[&str]) -> serde_json::Value {
        // The daemon opens its control socket a moment after it starts.
        let socket = self.dir.path().join("control.sock");
        let t0 = std::time::Instant::now();
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(t0.elapsed() < Duration::from_secs(20), "the daemon never opened its control socket");
            std::thread::sleep(Duration::from_millis(10));
        }
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_amqctl"))
            .arg("--socket")
            .arg(self.dir.path().join("control.sock"))
            .arg("--json")
            .args(args)
            .output()
            .expect("amqctl runs");
        assert!(out.status.success(), "amqctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("amqctl --json prints JSON")
    }

    /// One account as `amqctl --json account ID` shows it.
    pub fn account(&self, id: &str) -> serde_json::Value {
        self.ctl_json(&["account", id])
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Stops the daemon and waits for it to finish draining.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(30), t).await;
        }
    }
}

pub fn load(path: &std::path::Path) -> Loaded {
    config::load(path, &Env::default()).unwrap_or_else(|d| panic!("config: {d}"))
}

/// The parts of a harness a blocking thread may use.
pub struct CtlHandle {
    pub dir: PathBuf,
    pub addr: SocketAddr,
}

/// A response read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// SSE frames as (event, data JSON).
    pub fn sse(&self) -> Vec<(String, serde_json::Value)> {
        parse_sse(&self.text())
    }
}

pub fn parse_sse(text: &str) -> Vec<(String, serde_json::Value)> {
    let mut out = Vec::new();
    for frame in text.split("\n\n").filter(|f| !f.trim().is_empty()) {
        let mut ev = None;
        let mut data = None;
        for line in frame.lines() {
            if let Some(e) = line.strip_prefix("event: ") {
                ev = Some(e.to_string());
            } else if let Some(d) = line.strip_prefix("data: ") {
                data = Some(serde_json::from_str(d).unwrap_or_else(|e| panic!("bad data ({e}): {d}")));
            }
        }
        out.push((ev.expect("every frame has an event line"), data.expect("every frame has data")));
    }
    out
}

pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Sends a request and reads the whole answer.
pub async fn send(req: http::Request<Full<Bytes>>) -> Reply {
    let resp = tokio::time::timeout(Duration::from_secs(30), client().request(req))
        .await
        .expect("answer within 30 s")
        .expect("request goes through");
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(Duration::from_secs(30), body.collect())
        .await
        .expect("body within 30 s")
        .expect("body reads")
        .to_bytes();
    Reply { status: parts.status.as_u16(), headers: parts.headers, body }
}

/// POST JSON to the daemon with the test key.
pub async fn post(h: &Harness, path: &str, body: &serde_json::Value) -> Reply {
    let req = http::Request::post(h.url(path))
        .header("content-type", "application/json")
        .header("x-api-key", API_KEY)
        .header("anthropic-version", "2023-06-01")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    send(req).await
}

pub async fn get(h: &Harness, path: &str) -> Reply {
    let req =
        http::Request::get(h.url(path)).header("x-api-key", API_KEY).body(Full::new(Bytes::new())).unwrap();
    send(req).await
}

/// A minimal Messages request.
pub fn simple(text: &str, stream: bool) -> serde_json::Value {
    serde_json::json!({
        "model": "claude-sonnet-4-5-20250929",
        "max_tokens": 1024,
        "stream": stream,
        "messages": [{"role": "user", "content": text}],
    })
}

/// Concatenated text of the text blocks of a non-streaming message.
pub fn message_text(m: &serde_json::Value) -> String {
    m["content"]
        .as_array()
        .map(|a| a.iter().filter(|b| b["type"] == "text").map(|b| b["text"].as_str().unwrap_or("")).collect())
        .unwrap_or_default()
}

/// Concatenated text deltas of an SSE reply.
pub fn sse_text(frames: &[(String, serde_json::Value)]) -> String {
    frames
        .iter()
        .filter(|(e, d)| e == "content_block_delta" && d["delta"]["type"] == "text_delta")
        .map(|(_, d)| d["delta"]["text"].as_str().unwrap_or("").to_string())
        .collect()
}
