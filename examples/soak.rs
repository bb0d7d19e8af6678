//! Soak test (a script, not CI): mixed traffic at moderate load against a daemon subprocess and
//! the in-process emulator, with injected upstream faults, accounts-file rewrites, and a SIGKILL
//! plus restart every few minutes. Reports requests served, outcomes by kind, the daemon's RSS
//! over time, and refresh tokens lost (must be 0).
//!
//! ```sh
//! cargo build --release --bin amq2api --example soak
//! target/release/examples/soak --minutes 30 --daemon target/release/amq2api
//! ```

use amq2api::emulator::{Emulator, EmulatorOptions};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const KEY: &str = "sk-amq-soak-key-0123456789abcdef";

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.into())
}

fn accounts(n: usize, weight: u32) -> String {
    (1..=n)
        .map(|i| {
            format!(
                "[[account]]\nid = \"soak-{i}\"\nclient_id = \"soak-client-{i}\"\nclient_secret = \"s{i}\"\nrefresh_token = \"r{i}\"\nweight = {weight}\nmax_concurrency = 8\n\n"
            )
        })
        .collect()
}

/// Starts the daemon on `listener`, passed as systemd would (fd 3, `LISTEN_FDS`, `LISTEN_PID`):
/// every restart serves the same socket, and its address is never free for another process.
fn spawn(daemon: &Path, config: &Path, listener: &std::net::TcpListener) -> Child {
    use std::os::fd::AsRawFd;
    nix::fcntl::fcntl(listener, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()))
        .expect("the listener can be inherited");
    // bash, not sh: dash takes only one-digit descriptors in a redirection.
    Command::new("bash")
        .arg("-c")
        .arg("export LISTEN_PID=$$; exec \"$0\" --config \"$1\" 3<&\"$2\"")
        .arg(daemon)
        .arg(config)
        .arg(listener.as_raw_fd().to_string())
        .env("LISTEN_FDS", "1")
        .env("LISTEN_FDNAMES", "http")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the daemon")
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .map(|v| v.trim().trim_end_matches(" kB").to_string())
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::main]
async fn main() {
    let minutes: u64 = arg("--minutes", "30").parse().expect("--minutes N");
    let clients: usize = arg("--clients", "16").parse().expect("--clients N");
    let daemon = PathBuf::from(arg("--daemon", "target/release/amq2api"));
    let emulator = Emulator::start(EmulatorOptions {
        access_token_ttl: Duration::from_secs(90),
        fragment_delay: Duration::from_millis(3),
        rotation_grace: true,
        ..Default::default()
    })
    .await
    .unwrap();
    for i in 1..=6 {
        emulator.add_account(&format!("soak-client-{i}"), &format!("s{i}"), &format!("r{i}"));
    }
    let dir = std::env::temp_dir().join(format!("amq2api-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("accounts.toml"), accounts(6, 1)).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let config = dir.join("amq2api.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n[auth]\napi_keys = [\"{KEY}\"]\n[upstream]\nendpoint = \"{}\"\n\
             token_endpoint = \"{}\"\nfirst_byte_timeout_secs = 5\nstream_idle_timeout_secs = 5\n[accounts]\nfile = \"accounts.toml\"\n\
             refresh_before_expiry_secs = 60\n[state]\ndir = \"state\"\n[control]\nsocket = \"control.sock\"\n",
            emulator.endpoint(),
            emulator.token_endpoint()
        ),
    )
    .unwrap();
    let child = Arc::new(Mutex::new(spawn(&daemon, &config, &listener)));
    let outcomes: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let deadline = Instant::now() + Duration::from_secs(minutes * 60);
    let url = format!("http://127.0.0.1:{port}/v1/messages");

    let mut tasks = Vec::new();
    for c in 0..clients {
        let (url, outcomes) = (url.clone(), outcomes.clone());
        tasks.push(tokio::spawn(async move {
            let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
            let mut n = 0u64;
            while Instant::now() < deadline {
                n += 1;
                let (kind, directive) = match (n + c as u64) % 20 {
                    0 => ("fault error-500", "#emulator: error-500"),
                    1 => ("fault corrupt-frame", "#emulator: corrupt-frame"),
                    2 => ("fault reset-after", "#emulator: reset-after"),
                    3 if n % 3 == 0 => ("fault throttled", "#emulator: throttled 2"),
                    4 => ("fault exception", "#emulator: exception error MODEL_TEMPORARILY_UNAVAILABLE"),
                    5 => ("long", "#emulator: long 20000"),
                    _ => ("plain", ""),
                };
                let stream = n % 2 == 0;
                let body = serde_json::json!({"model": "claude-sonnet-4-5", "max_tokens": 2048, "stream": stream,
                    "messages": [{"role": "user", "content": format!("soak {c}/{n}\n{directive}")}]});
                let req = http::Request::post(&url)
                    .header("content-type", "application/json")
                    .header("x-api-key", KEY)
                    .body(Full::new(Bytes::from(body.to_string())))
                    .unwrap();
                let result = match tokio::time::timeout(Duration::from_secs(60), client.request(req)).await {
                    Err(_) => "timeout".to_string(),
                    Ok(Err(_)) => "connection failed (daemon restarting)".to_string(),
                    Ok(Ok(resp)) => {
                        let status = resp.status().as_u16();
                        match tokio::time::timeout(Duration::from_secs(60), resp.into_body().collect()).await {
                            Ok(Ok(b)) => {
                                let text = String::from_utf8_lossy(&b.to_bytes()).into_owned();
                                if status != 200 {
                                    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                                    format!("{status} {}", v["error"]["type"].as_str().unwrap_or("?"))
                                } else if !stream {
                                    "200 message".into()
                                } else if text.trim_end().ends_with("{\"type\":\"message_stop\"}") {
                                    "200 stream complete".into()
                                } else if let Some(i) = text.rfind("event: error") {
                                    let t = &text[i..];
                                    format!("200 stream event:error {}", if t.contains("overloaded_error") { "overloaded_error" } else { "api_error" })
                                } else {
                                    "200 stream cut (daemon killed)".into()
                                }
                            }
                            _ => "body cut (daemon killed)".into(),
                        }
                    }
                };
                *outcomes.lock().unwrap().entry(format!("{kind:<20} {result}")).or_default() += 1;
                // Back off like a real client: after a refusal, or while the daemon restarts.
                if result.starts_with("connection failed") || result.starts_with("429") || result.starts_with("529") {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }));
    }

    let mut rss = Vec::new();
    let mut last_kill = Instant::now();
    let mut restarts = 0;
    let mut tick = 0u64;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(10)).await;
        tick += 1;
        let pid = child.lock().unwrap().id();
        rss.push((tick * 10, rss_kib(pid)));
        if tick % 2 == 0 {
            let weight = 1 + (tick % 3) as u32;
            let n = if tick % 6 == 0 { 5 } else { 6 };
            std::fs::write(dir.join("accounts.toml"), accounts(n, weight)).unwrap();
        }
        if last_kill.elapsed() > Duration::from_secs(150)
            && Instant::now() + Duration::from_secs(20) < deadline
        {
            let mut c = child.lock().unwrap();
            let _ = c.kill();
            let _ = c.wait();
            *c = spawn(&daemon, &config, &listener);
            restarts += 1;
            last_kill = Instant::now();
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    let _ = child.lock().unwrap().kill();
    let stats = emulator.stats();
    println!("## Soak: {minutes} min, {clients} clients, {restarts} SIGKILL + restarts\n");
    println!("| outcome | count |\n|---|---|");
    let total: u64 = outcomes.lock().unwrap().values().sum();
    for (k, v) in outcomes.lock().unwrap().iter() {
        println!("| {k} | {v} |");
    }
    println!("| total | {total} |\n");
    println!(
        "daemon RSS (KiB) every 10 s (resets at each restart): {:?}\n",
        rss.iter().map(|(_, r)| r).collect::<Vec<_>>()
    );
    println!(
        "emulator: {} requests, {} refreshes, {} refresh failures (lost refresh tokens: {}), {} malformed",
        stats.requests,
        stats.refreshes,
        stats.refresh_failures,
        stats.refresh_failures,
        stats.rejected_malformed
    );
    let _ = std::fs::remove_dir_all(&dir);
    if stats.refresh_failures > 0 || stats.rejected_malformed > 0 {
        std::process::exit(1);
    }
}
