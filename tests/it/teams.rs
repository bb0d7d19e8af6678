//! Teams: named client keys with limits (`[auth] keys_file`), usage per key, account and model,
//! and `amqctl keys` / `key new` / `usage`, through the real daemon, the emulator and the real
//! amqctl binary.

use crate::common;

use bytes::Bytes;
use common::{Harness, Setup, child, send, simple};
use http_body_util::Full;
use serde_json::{Value, json};
use std::time::Duration;

const ALICE: &str = "sk-amq-alice-0123456789abcdef";
const BOB: &str = "sk-amq-bob-0123456789abcdef";
const CAROL: &str = "sk-amq-carol-0123456789abcdef";
const DAVE: &str = "sk-amq-dave-0123456789abcdef";

fn digest(key: &str) -> String {
    format!("sha256:{}", hex::encode(amq2api::hash::sha256(key.as_bytes())))
}

fn accounts(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("acct-{i}")).collect()
}

async fn start(keys: &str, accounts: Vec<String>, fragment_delay: Duration) -> Harness {
    let mut setup = Setup {
        accounts,
        auth: "keys_file = \"keys.toml\"".into(),
        files: vec![("keys.toml".into(), keys.into())],
        ..Default::default()
    };
    setup.emulator.fragment_delay = fragment_delay;
    Harness::start(setup).await
}

async fn post_as(h: &Harness, key: &str, body: &Value) -> common::Reply {
    post_to_as(h, "/v1/messages", key, body).await
}

async fn post_to_as(h: &Harness, path: &str, key: &str, body: &Value) -> common::Reply {
    let req = http::Request::post(h.url(path))
        .header("content-type", "application/json")
        .header("x-api-key", key)
        .header("anthropic-version", "2023-06-01")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    send(req).await
}

/// A daemon whose keys file holds `alice` with `limits`, after `n` requests of hers served;
/// returns the keys file's text too.
async fn alice_served(limits: &str, n: usize) -> (String, Harness) {
    let keys = format!("[[key]]\nname = \"alice\"\nkey = \"{ALICE}\"\n{limits}\n");
    let h = start(&keys, accounts(1), Duration::ZERO).await;
    for _ in 0..n {
        assert_eq!(post_as(&h, ALICE, &simple("hi", false)).await.status, 200);
    }
    (keys, h)
}

/// Fires `n` requests at once as `key`; returns the replies.
async fn burst(h: &Harness, key: &str, n: usize, stream: bool) -> Vec<common::Reply> {
    let mut tasks = Vec::new();
    for i in 0..n {
        let (url, key) = (h.url("/v1/messages"), key.to_string());
        let body = simple(&format!("request {i}"), stream);
        tasks.push(tokio::spawn(async move {
            let req = http::Request::post(url)
                .header("content-type", "application/json")
                .header("x-api-key", key)
                .header("anthropic-version", "2023-06-01")
                .body(Full::new(Bytes::from(body.to_string())))
                .unwrap();
            send(req).await
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

fn retry_after(r: &common::Reply) -> u64 {
    r.headers.get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// `amqctl --json usage --by BY` rows for `name`, summed over days.
fn usage_of(h: &Harness, by: &str, name: &str) -> Value {
    let rows = h.ctl_json(&["usage", "--by", by, "--days", "2"]);
    let mut sum = json!({"requests": 0, "errors": 0, "tokens_in": 0, "tokens_out": 0, "credits": 0.0});
    for r in rows.as_array().unwrap().iter().filter(|r| r["name"] == name) {
        for f in ["requests", "errors", "tokens_in", "tokens_out"] {
            sum[f] = json!(sum[f].as_u64().unwrap() + r[f].as_u64().unwrap());
        }
        sum["credits"] = json!(sum["credits"].as_f64().unwrap() + r["credits"].as_f64().unwrap());
    }
    sum
}

fn key_view(h: &Harness, name: &str) -> Value {
    h.ctl_json(&["keys"]).as_array().unwrap().iter().find(|k| k["name"] == name).cloned().unwrap()
}

fn tokens_of(m: &Value) -> u64 {
    m["usage"]["input_tokens"].as_u64().unwrap() + m["usage"]["output_tokens"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rpm_and_concurrency_limits_hold_under_concurrent_load_and_counts_match_the_emulator() {
    let keys = format!(
        "[[key]]\nname = \"alice\"\nkey = \"{a}\"\nrpm = 10\n\n[[key]]\nname = \"bob\"\nkey = \"{b}\"\nmax_concurrency = 2\n",
        a = digest(ALICE),
        b = BOB
    );
    let h = start(&keys, accounts(3), Duration::from_millis(100)).await;

    // alice: 25 at once against rpm = 10: exactly 10 go through (no request ends within the
    // minute's window, so nothing is off), the others are told when the oldest start leaves it.
    let replies = burst(&h, ALICE, 25, false).await;
    let ok = replies.iter().filter(|r| r.status == 200).count();
    let limited: Vec<&common::Reply> = replies.iter().filter(|r| r.status == 429).collect();
    assert_eq!((ok, limited.len()), (10, 15), "{:?}", replies.iter().map(|r| r.status).collect::<Vec<_>>());
    for r in &limited {
        assert_eq!(r.json()["error"]["type"], "rate_limit_error");
        assert!(r.json()["error"]["message"].as_str().unwrap().contains("rpm limit of 10"), "{}", r.text());
        let secs = retry_after(r);
        assert!((1..=60).contains(&secs), "retry-after {secs}");
    }

    // bob: 8 slow streams at once against max_concurrency = 2: exactly 2 stream, 6 are refused
    // (the two take far longer than the burst takes to arrive).
    let replies = burst(&h, BOB, 8, true).await;
    let ok: Vec<&common::Reply> = replies.iter().filter(|r| r.status == 200).collect();
    let limited: Vec<&common::Reply> = replies.iter().filter(|r| r.status == 429).collect();
    assert_eq!(
        (ok.len(), limited.len()),
        (2, 6),
        "{:?}",
        replies.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    for r in &limited {
        assert!(r.json()["error"]["message"].as_str().unwrap().contains("max_concurrency"), "{}", r.text());
        assert_eq!(retry_after(r), 1);
    }
    // The slots are free again once the streams ended.
    assert_eq!(key_view(&h, "bob")["in_flight"], 0);
    let again = burst(&h, BOB, 2, false).await;
    assert!(again.iter().all(|r| r.status == 200));

    // Counts: what amqctl usage says per key matches the replies; per account, what the
    // emulator served.
    let alice = usage_of(&h, "key", "alice");
    assert_eq!((alice["requests"].as_u64(), alice["errors"].as_u64()), (Some(25), Some(15)));
    let bob = usage_of(&h, "key", "bob");
    assert_eq!((bob["requests"].as_u64(), bob["errors"].as_u64()), (Some(10), Some(6)));
    let mut served = 0;
    for id in accounts(3) {
        let emu = h.emulator.stats_for(&common::client_id(&id)).requests;
        let row = usage_of(&h, "account", &id);
        assert_eq!(row["requests"].as_u64().unwrap(), emu, "account {id}");
        served += emu;
    }
    assert_eq!(served, 10 + 4, "what the emulator served");
    // By the model the name resolved to; a request refused before its body was read (the
    // key over its limits then) has no model: `other`.
    let model = usage_of(&h, "model", "claude-sonnet-4-5");
    let other = usage_of(&h, "model", "other");
    assert_eq!(model["requests"].as_u64().unwrap() + other["requests"].as_u64().unwrap(), 35);
    assert_eq!(model["errors"].as_u64().unwrap() + other["errors"].as_u64().unwrap(), 21);
    assert!(model["requests"].as_u64().unwrap() >= 14, "the requests served: {model}");
    // Per-key counters on /metrics, named, never the key.
    let m = common::get(&h, "/metrics").await.text();
    assert!(m.contains("amq2api_key_requests_total{key=\"alice\",status=\"429\"} 15"), "{m}");
    assert!(m.contains("amq2api_key_requests_total{key=\"bob\",status=\"200\"} 4"), "{m}");
    assert!(!m.contains(BOB) && !m.contains(ALICE));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn token_and_credit_budgets_hold_within_the_requests_in_flight() {
    // Measure one request first (the emulator's answer to a fixed prompt is deterministic).
    let probe_keys = format!("[[key]]\nname = \"probe\"\nkey = \"{CAROL}\"\n");
    let h = start(&probe_keys, accounts(2), Duration::ZERO).await;
    let r = post_as(&h, CAROL, &simple("same prompt", false)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let per_tokens = tokens_of(&r.json());
    let per_credits: f64 = r.headers["x-amq2api-credits"].to_str().unwrap().parse().unwrap();
    h.stop().await;

    // Budgets: 5 requests' worth plus a little, so the 6th is the last admitted when one client
    // runs alone; 4 clients at once may each have one more in flight when it runs out.
    const CLIENTS: usize = 4;
    let tokens_budget = per_tokens * 5 + 1;
    let credits_budget = per_credits * 5.0 + per_credits / 2.0;
    let keys = format!(
        "[[key]]\nname = \"carol\"\nkey = \"{CAROL}\"\ntokens_per_day = {tokens_budget}\n\n\
         [[key]]\nname = \"dave\"\nkey = \"{DAVE}\"\ncredits_per_month = {credits_budget}\n"
    );
    let h = start(&keys, accounts(4), Duration::from_millis(5)).await;
    for (key, name, budget_word) in
        [(CAROL, "carol", "daily token budget"), (DAVE, "dave", "monthly credit budget")]
    {
        let mut tasks = Vec::new();
        for _ in 0..CLIENTS {
            let (url, key) = (h.url("/v1/messages"), key.to_string());
            tasks.push(tokio::spawn(async move {
                let mut ok = 0u64;
                loop {
                    let req = http::Request::post(&url)
                        .header("content-type", "application/json")
                        .header("x-api-key", &key)
                        .header("anthropic-version", "2023-06-01")
                        .body(Full::new(Bytes::from(simple("same prompt", false).to_string())))
                        .unwrap();
                    let r = send(req).await;
                    if r.status == 200 {
                        ok += 1;
                    } else {
                        return (ok, r);
                    }
                }
            }));
        }
        let mut ok = 0;
        for t in tasks {
            let (n, refusal) = t.await.unwrap();
            ok += n;
            assert_eq!(refusal.status, 429, "{}", refusal.text());
            let msg = refusal.json()["error"]["message"].as_str().unwrap().to_string();
            assert!(
                msg.contains(budget_word) && msg.contains("resets at ") && msg.contains("T00:00:00Z"),
                "{msg}"
            );
            let secs = retry_after(&refusal);
            assert!((1..=31 * 86_400).contains(&secs), "retry-after {secs}");
        }
        // Exact with one client: 6 admitted. With 4: at most 3 more (the others' requests in
        // flight when the budget ran out).
        assert!((6..=6 + CLIENTS as u64 - 1).contains(&ok), "{name}: {ok} admitted");
        let u = usage_of(&h, "key", name);
        assert_eq!(u["requests"].as_u64().unwrap(), ok + CLIENTS as u64);
        assert_eq!(u["errors"].as_u64().unwrap(), CLIENTS as u64);
        assert_eq!(u["tokens_in"].as_u64().unwrap() + u["tokens_out"].as_u64().unwrap(), ok * per_tokens);
        assert!((u["credits"].as_f64().unwrap() - ok as f64 * per_credits).abs() < 1e-6, "{u}");
        let v = key_view(&h, name);
        assert_eq!(v["state"], "budget-exhausted");
    }
    // What the emulator served: the admitted requests, no more.
    let served: u64 =
        accounts(4).iter().map(|id| h.emulator.stats_for(&common::client_id(id)).requests).sum();
    let admitted = usage_of(&h, "key", "carol")["requests"].as_u64().unwrap()
        + usage_of(&h, "key", "dave")["requests"].as_u64().unwrap()
        - 2 * CLIENTS as u64;
    assert_eq!(served, admitted);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restart_loses_no_usage_and_keeps_the_budget_spent() {
    let keys = format!("[[key]]\nname = \"alice\"\nkey = \"{ALICE}\"\n");
    let mut h = start(&keys, accounts(1), Duration::ZERO).await;
    let mut tokens = 0;
    for i in 0..5 {
        let r = post_as(&h, ALICE, &simple(&format!("before {i}"), false)).await;
        assert_eq!(r.status, 200);
        tokens += tokens_of(&r.json());
    }
    // Restart in the middle of three requests: they finish during the drain and are counted.
    let mut in_flight = Vec::new();
    for i in 0..3 {
        let (url, body) =
            (h.url("/v1/messages"), simple(&format!("#emulator: slow-first-byte 400\nmiddle {i}"), false));
        in_flight.push(tokio::spawn(async move {
            let req = http::Request::post(url)
                .header("content-type", "application/json")
                .header("x-api-key", ALICE)
                .header("anthropic-version", "2023-06-01")
                .body(Full::new(Bytes::from(body.to_string())))
                .unwrap();
            send(req).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    h.restart().await;
    for t in in_flight {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        tokens += tokens_of(&r.json());
    }
    for i in 0..3 {
        let r = post_as(&h, ALICE, &simple(&format!("after {i}"), false)).await;
        assert_eq!(r.status, 200);
        tokens += tokens_of(&r.json());
    }
    let u = usage_of(&h, "key", "alice");
    assert_eq!(u["requests"].as_u64(), Some(11));
    assert_eq!(u["tokens_in"].as_u64().unwrap() + u["tokens_out"].as_u64().unwrap(), tokens);
    assert_eq!(key_view(&h, "alice")["tokens_today"].as_u64(), Some(tokens));

    // A budget now below what was spent before the restart: the next request is refused.
    std::fs::write(
        h.dir.path().join("keys.toml"),
        format!("[[key]]\nname = \"alice\"\nkey = \"{ALICE}\"\ntokens_per_day = {}\n", tokens),
    )
    .unwrap();
    h.restart().await;
    let r = post_as(&h, ALICE, &simple("over", false)).await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert!(r.text().contains("daily token budget used up"), "{}", r.text());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_loses_nothing_older_than_the_batch_window() {
    let emulator = amq2api::emulator::Emulator::start(Default::default()).await.unwrap();
    let ids = accounts(1);
    for id in &ids {
        emulator.add_account(&common::client_id(id), &format!("secret-{id}"), &format!("refresh-{id}"));
    }
    let dir = tempfile::tempdir().unwrap();
    let config = child::write_config(dir.path(), &emulator, &ids, "");
    let text = std::fs::read_to_string(&config).unwrap().replacen(
        "[auth]\n",
        "[auth]\nkeys_file = \"keys.toml\"\n",
        1,
    );
    std::fs::write(&config, text).unwrap();
    std::fs::write(dir.path().join("keys.toml"), format!("[[key]]\nname = \"alice\"\nkey = \"{ALICE}\"\n"))
        .unwrap();
    let log = dir.path().join("daemon.log");
    let launch = |config: std::path::PathBuf, log: std::path::PathBuf| {
        tokio::task::spawn_blocking(move || {
            let d = child::ChildDaemon::start_logged(
                std::process::Command::new(child::AMQ2API),
                &config,
                &[],
                Some(&log),
            );
            let addr = d.addr();
            (d, addr)
        })
    };
    let (mut d, addr) = launch(config.clone(), log.clone()).await.unwrap();
    let mut tokens = 0;
    for i in 0..6 {
        let req = http::Request::post(format!("http://{addr}/v1/messages"))
            .header("content-type", "application/json")
            .header("x-api-key", ALICE)
            .header("anthropic-version", "2023-06-01")
            .body(Full::new(Bytes::from(simple(&format!("crash {i}"), false).to_string())))
            .unwrap();
        let r = send(req).await;
        assert_eq!(r.status, 200, "{}", r.text());
        tokens += tokens_of(&r.json());
    }
    // Past the batch window, then SIGKILL: no flush on the way out.
    tokio::time::sleep(amq2api::keys::usage::BATCH_WINDOW * 2 + Duration::from_millis(500)).await;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(d.pid()), nix::sys::signal::Signal::SIGKILL).unwrap();
    let _ = d.child.wait();
    drop(d);
    let (d, _) = launch(config, dir.path().join("daemon2.log")).await.unwrap();
    let (usage, keys) = tokio::task::spawn_blocking(move || {
        let u = d.ctl_json(&["usage", "--by", "key"]).unwrap();
        let k = d.ctl_json(&["keys"]).unwrap();
        d.stop(Duration::from_secs(20));
        (u, k)
    })
    .await
    .unwrap();
    let row = usage.as_array().unwrap().iter().find(|r| r["name"] == "alice").cloned().unwrap();
    assert_eq!(row["requests"], 6, "{usage}");
    assert_eq!(row["tokens_in"].as_u64().unwrap() + row["tokens_out"].as_u64().unwrap(), tokens);
    assert_eq!(keys[0]["tokens_today"].as_u64(), Some(tokens));
    // The access log names the key, never shows it.
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.lines()
            .any(|l| l.contains("request_id=") && l.contains(" key=alice ") && l.contains("status=200")),
        "{text}"
    );
    assert!(!text.contains(ALICE));
}

/// A key over its limits is refused before its request's body is read: its bodies do not take
/// the body budget and parsing threads every key shares. Here a key at its `rpm` sends the
/// headers of a large request and holds the body back: the 429 comes at once (before, the
/// daemon waited for the whole body first). `count_tokens` takes no `rpm` start: it is held
/// back by the budgets only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_over_its_limits_is_refused_before_its_body_is_read() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let keys = format!("[[key]]\nname = \"alice\"\nkey = \"{ALICE}\"\nrpm = 1\n");
    let h = start(&keys, accounts(1), Duration::ZERO).await;
    assert_eq!(post_as(&h, ALICE, &simple("hi", false)).await.status, 200);
    let count = json!({"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "hi"}]});
    let r = post_to_as(&h, "/v1/messages/count_tokens", ALICE, &count).await;
    assert_eq!(r.status, 200, "count_tokens held back by rpm: {}", r.text());
    {
        let path = "/v1/messages";
        let mut s = tokio::net::TcpStream::connect(h.addr).await.unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: x\r\nx-api-key: {ALICE}\r\ncontent-type: application/json\r\n\
             content-length: 10000000\r\n\r\n{{\"model\": "
        );
        s.write_all(head.as_bytes()).await.unwrap();
        let mut answer = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut answer))
            .await
            .unwrap_or_else(|_| panic!("{path}: no answer before the body"))
            .unwrap();
        let text = String::from_utf8_lossy(&answer[..n]);
        assert!(text.starts_with("HTTP/1.1 429"), "{path}: {text}");
        assert!(text.contains("rpm limit"), "{path}: {text}");
    }
    h.stop().await;
}

/// A key removed and added back by two quick reloads (an edit undone) is the same key: its
/// `rpm` window is not a fresh allowance. Before, the name started over with no starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_removed_and_added_back_keeps_its_rpm_window() {
    let (keys, h) = alice_served("rpm = 2", 2).await;
    let file = h.dir.path().join("keys.toml");
    // Removed, another change (a second reload while it is out), then back.
    let bob = format!("[[key]]\nname = \"bob\"\nkey = \"{BOB}\"\n");
    for text in [bob.clone(), format!("{bob}rpm = 5\n"), keys.clone()] {
        std::fs::write(&file, text).unwrap();
        let r = h.ctl_json(&["reload"]);
        assert_eq!(r["ok"], true, "{r}");
    }
    let r = post_as(&h, ALICE, &simple("hi", false)).await;
    assert_eq!(r.status, 429, "the rpm window started over: {}", r.text());
    h.stop().await;
}

/// A reload that drops `keys_file` from amq2api.toml drops its keys, and the old file's next
/// edit (a configuration tool rewriting it) does not bring them back through the watcher.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_of_a_keys_file_no_longer_configured_stay_gone() {
    let keys = format!("[[key]]\nname = \"alice\"\nkey = \"{ALICE}\"\n");
    let h = start(&keys, accounts(1), Duration::ZERO).await;
    assert_eq!(post_as(&h, ALICE, &simple("hi", false)).await.status, 200);
    let config = h.dir.path().join("amq2api.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("keys_file = \"keys.toml\""), "{text}");
    std::fs::write(&config, text.replace("keys_file = \"keys.toml\"", "")).unwrap();
    let r = h.ctl_json(&["reload"]);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(post_as(&h, ALICE, &simple("hi", false)).await.status, 401);
    // The old file is rewritten (the watcher still watches it until a restart).
    std::fs::write(h.dir.path().join("keys.toml"), format!("{keys}rpm = 100\n")).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        post_as(&h, ALICE, &simple("hi", false)).await.status,
        401,
        "the old keys file's keys came back"
    );
    h.stop().await;
}

/// A keys file emptied (truncated before it is written again, as an editor saving in place or
/// a `>` redirect does) does not take every key away meanwhile, through the watcher or a
/// reload; a file of comments only does, on purpose.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emptied_keys_file_keeps_the_keys_serving() {
    let keys = format!("[[key]]\nname = \"alice\"\nkey = \"{ALICE}\"\n");
    let h = start(&keys, accounts(1), Duration::ZERO).await;
    let file = h.dir.path().join("keys.toml");
    h.ctl_json(&["status"]);
    std::fs::write(&file, "").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_amqctl"))
        .arg("--socket")
        .arg(h.dir.path().join("control.sock"))
        .args(["--json", "reload"])
        .output()
        .unwrap();
    let r: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(out.status.code(), Some(78), "{r}");
    assert!(r["errors"].to_string().contains("the keys file is empty"), "{r}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        post_as(&h, ALICE, &simple("hi", false)).await.status,
        200,
        "the keys went with the emptied file"
    );
    std::fs::write(&file, "# no keys for now\n").unwrap();
    let t0 = std::time::Instant::now();
    while post_as(&h, ALICE, &simple("hi", false)).await.status != 401 {
        assert!(t0.elapsed() < Duration::from_secs(10), "a file of comments only did not remove the keys");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reload_that_lowers_a_limit_applies_to_the_next_request_and_a_bad_file_changes_nothing() {
    let (_, h) = alice_served("rpm = 100", 3).await;
    // Through the watcher: the file changes, the next request sees rpm = 3.
    std::fs::write(
        h.dir.path().join("keys.toml"),
        format!("[[key]]\nname = \"alice\"\nkey = \"{ALICE}\"\nrpm = 3\n"),
    )
    .unwrap();
    let t0 = std::time::Instant::now();
    while key_view(&h, "alice")["rpm"] != 3 {
        assert!(t0.elapsed() < Duration::from_secs(10), "the keys file was never reloaded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = post_as(&h, ALICE, &simple("hi", false)).await;
    assert_eq!(r.status, 429, "{}", r.text());

    // An invalid file: the reload is refused with line:column, the last good keys serve on.
    std::fs::write(
        h.dir.path().join("keys.toml"),
        format!("[[key]]\nname = \"alice\"\nkey = \"{ALICE}\"\nrpm = 3\nburst = 9\n"),
    )
    .unwrap();
    let out = std::process::Command::new(child::AMQCTL)
        .arg("--socket")
        .arg(h.dir.path().join("control.sock"))
        .arg("reload")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("keys.toml:5:1: error: unknown field `burst`"), "{stderr}");
    assert_eq!(key_view(&h, "alice")["rpm"], 3);
    assert_eq!(post_as(&h, ALICE, &simple("hi", false)).await.status, 429);
    // The unnamed key of [auth] api_keys is unlimited as before.
    assert_eq!(common::post(&h, "/v1/messages", &simple("hi", false)).await.status, 200);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_globs_expiry_disabled_and_a_key_made_by_amqctl() {
    let keys = format!(
        "[[key]]\nname = \"intern\"\nkey = \"{ALICE}\"\nmodels = [\"claude-sonnet-*\"]\n\n\
         [[key]]\nname = \"gone\"\nkey = \"{BOB}\"\nexpires = 2020-01-01T00:00:00Z\n\n\
         [[key]]\nname = \"off\"\nkey = \"{CAROL}\"\nenabled = false\n"
    );
    let h = start(&keys, accounts(1), Duration::ZERO).await;
    assert_eq!(post_as(&h, ALICE, &simple("hi", false)).await.status, 200);
    let mut opus = simple("hi", false);
    opus["model"] = json!("claude-opus-4-5");
    let r = post_as(&h, ALICE, &opus).await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.json()["error"]["type"], "permission_error");
    for key in [BOB, CAROL] {
        let r = post_as(&h, key, &simple("hi", false)).await;
        assert_eq!(r.status, 401, "{}", r.text());
        assert_eq!(r.json()["error"]["type"], "authentication_error");
    }
    assert_eq!(h.emulator.stats().requests, 1, "nothing refused reached the upstream");
    // The listing shows the key only what it may use.
    let req = http::Request::get(h.url("/v1/models?limit=1000"))
        .header("x-api-key", ALICE)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let listed = send(req).await.json();
    let ids: Vec<&str> =
        listed["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert!(!ids.is_empty() && ids.iter().all(|id| id.starts_with("claude-sonnet-")), "{ids:?}");
    let all = common::get(&h, "/v1/models?limit=1000").await.json();
    assert!(all["data"].as_array().unwrap().len() > ids.len());
    let states: Vec<(String, String)> = h
        .ctl_json(&["keys"])
        .as_array()
        .unwrap()
        .iter()
        .map(|k| (k["name"].as_str().unwrap().into(), k["state"].as_str().unwrap().into()))
        .collect();
    assert_eq!(
        states,
        [("intern", "active"), ("gone", "expired"), ("off", "disabled")]
            .map(|(a, b)| (a.to_string(), b.to_string()))
    );

    // amqctl key new: the key once, an entry with only its digest; pasted in, it works.
    let out =
        std::process::Command::new(child::AMQCTL).args(["--json", "key", "new", "newbie"]).output().unwrap();
    assert!(out.status.success());
    let made: Value = serde_json::from_slice(&out.stdout).unwrap();
    let key = made["key"].as_str().unwrap();
    let entry = made["entry"].as_str().unwrap();
    assert!(!entry.contains(key) && entry.contains(&digest(key)), "{entry}");
    // Text: the key on stderr only, the entry (digest only) on stdout, ready to append.
    let out = std::process::Command::new(child::AMQCTL).args(["key", "new", "other"]).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let shown = stderr.lines().map(str::trim).find(|l| l.starts_with("sk-amq-")).unwrap().to_string();
    assert!(!stdout.contains(&shown) && stdout.contains(&digest(&shown)), "{stdout}");
    amq2api::config::keys::parse(std::path::Path::new("k.toml"), &stdout).unwrap();
    let text = String::from_utf8_lossy(
        &std::process::Command::new(child::AMQCTL).args(["key", "new", "Bad Name"]).output().unwrap().stderr,
    )
    .into_owned();
    assert!(text.contains("must be 1 to 64"), "{text}");
    std::fs::write(h.dir.path().join("keys.toml"), format!("{keys}\n{entry}")).unwrap();
    h.ctl_json(&["reload"]);
    let r = post_as(&h, key, &simple("hi", false)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    // usage in CSV.
    let csv = std::process::Command::new(child::AMQCTL)
        .arg("--socket")
        .arg(h.dir.path().join("control.sock"))
        .args(["usage", "--by", "key", "--csv"])
        .output()
        .unwrap();
    let csv = String::from_utf8_lossy(&csv.stdout);
    assert!(csv.starts_with("day,by,name,requests,errors,tokens_in,tokens_out,credits\n"), "{csv}");
    assert!(csv.lines().any(|l| l.contains(",key,newbie,1,0,")), "{csv}");
    assert!(csv.lines().any(|l| l.contains(",key,intern,2,1,")), "{csv}");
    h.stop().await;
}

#[test]
fn keys_file_errors_are_reported_with_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("accounts.toml"), common::accounts_toml(&accounts(1))).unwrap();
    std::fs::write(
        dir.path().join("keys.toml"),
        "[[key]]\nname = \"a\"\nkey = \"sk-amq-0123456789abcdef\"\nrpm = 0\n\n[[key]]\nname = \"a\"\nkey = \"sk-amq-0123456789abcdef\"\ncolour = \"red\"\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("amq2api.toml"),
        "[server]\nlisten = [\"127.0.0.1:0\"]\n[auth]\nkeys_file = \"keys.toml\"\n[accounts]\nfile = \"accounts.toml\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(child::AMQ2API)
        .args(["check-config", "--config"])
        .arg(dir.path().join("amq2api.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("keys.toml:9:1: error: unknown field `colour`"), "{text}");
    // With the shape fixed, the rest is listed too.
    std::fs::write(
        dir.path().join("keys.toml"),
        "[[key]]\nname = \"a\"\nkey = \"sk-amq-0123456789abcdef\"\nrpm = 0\n\n[[key]]\nname = \"a\"\nkey = \"sk-amq-0123456789abcdef\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(child::AMQ2API)
        .args(["check-config", "--config"])
        .arg(dir.path().join("amq2api.toml"))
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("keys.toml:4:7: error: key \"a\": `rpm` must be a whole number"), "{text}");
    assert!(
        text.contains("keys.toml:7:8: error: duplicate key name \"a\" (first defined at line 2, column 8)"),
        "{text}"
    );
    assert!(text.contains("keys.toml:8:7: error: key \"a\": duplicate key"), "{text}");
}

/// A stream the client leaves before its end is still charged for the output it made (it was
/// counted as none: a key's `tokens_per_day` only ever saw input when clients hung up early, as
/// Claude Code does on Esc).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_left_early_is_charged_for_its_output() {
    use http_body_util::BodyExt;
    let keys = format!("[[key]]\nname = \"carol\"\nkey = \"{}\"\n", digest(CAROL));
    let h = start(&keys, accounts(1), Duration::from_millis(30)).await;
    let req = http::Request::post(h.url("/v1/messages"))
        .header("content-type", "application/json")
        .header("x-api-key", CAROL)
        .header("anthropic-version", "2023-06-01")
        .body(Full::new(Bytes::from(simple("tell me a story", true).to_string())))
        .unwrap();
    let resp = common::client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut seen = String::new();
    while seen.matches("text_delta").count() < 3 {
        let frame =
            tokio::time::timeout(Duration::from_secs(10), body.frame()).await.unwrap().unwrap().unwrap();
        if let Ok(data) = frame.into_data() {
            seen.push_str(&String::from_utf8_lossy(&data));
        }
    }
    assert!(!seen.contains("message_stop"), "the stream ended before the client left: {seen}");
    drop(body);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let u = usage_of(&h, "key", "carol");
        if u["requests"] == 1 {
            assert!(u["tokens_out"].as_u64().unwrap() > 0, "no output charged: {u}");
            assert!(u["tokens_in"].as_u64().unwrap() > 0, "{u}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the request was never counted: {u}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A non-streaming request whose client leaves before the answer is whole is logged and
/// counted (499), and charged for what the answer used by then (it was neither logged nor
/// counted: its tokens escaped the key's budgets).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_left_before_its_answer_is_counted_and_charged() {
    use tokio::io::AsyncWriteExt;
    let keys = format!("[[key]]\nname = \"carol\"\nkey = \"{}\"\n", digest(CAROL));
    let h = start(&keys, accounts(1), Duration::from_millis(30)).await;
    let body = simple("tell me a story", false).to_string();
    let mut conn = tokio::net::TcpStream::connect(&h.addr).await.unwrap();
    let head = format!(
        "POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nx-api-key: {CAROL}\r\n\
         anthropic-version: 2023-06-01\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    // The answer is on its way (slowly): the client leaves.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while h.emulator.stats().open_streams == 0 {
        assert!(std::time::Instant::now() < deadline, "no answer started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(h.emulator.stats().completed_streams, 0, "the answer ended before the client left");
    drop(conn);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let u = usage_of(&h, "key", "carol");
        if u["requests"] == 1 {
            assert_eq!(u["errors"], 1, "{u}");
            assert!(u["tokens_in"].as_u64().unwrap() > 0, "{u}");
            assert!(u["tokens_out"].as_u64().unwrap() > 0, "no output charged: {u}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the request was never counted: {u}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The upstream answer was let go of with the client.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while h.emulator.stats().cancelled_streams == 0 {
        assert!(std::time::Instant::now() < deadline, "the upstream answer was read on");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A refused accounts file stays reported while the keys file is edited and applied: each file's
/// refusal is its own (a good keys file cleared the accounts file's error, and `STATUS=` and
/// `amqctl status` then looked healthy while the broken file was never applied).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_keys_file_does_not_hide_a_refused_accounts_file() {
    let keys = format!("[[key]]\nname = \"alice\"\nkey = \"{}\"\n", digest(ALICE));
    let h = start(&keys, accounts(1), Duration::ZERO).await;
    let error = |h: &Harness| h.ctl_json(&["status"])["config"]["last_reload_error"].clone();
    let wait = |what: &str, pred: &dyn Fn(&Value) -> bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let e = error(&h);
            if pred(&e) {
                return e;
            }
            assert!(std::time::Instant::now() < deadline, "no {what}: {e}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // The control socket is open (ctl_json waits for it).
    assert!(error(&h).is_null());
    let accounts_file = h.dir.path().join("accounts.toml");
    let good = std::fs::read_to_string(&accounts_file).unwrap();
    std::fs::write(&accounts_file, format!("{good}[[account]]\nid = \"Bad Id\"\n")).unwrap();
    // `amqctl reload` (exit 78: refused).
    let reload = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_amqctl"))
            .arg("--socket")
            .arg(h.dir.path().join("control.sock"))
            .arg("reload")
            .output()
            .unwrap()
    };
    assert_eq!(reload().status.code(), Some(78));
    wait("refusal of the accounts file", &|e| e.as_str().is_some_and(|e| e.contains("accounts.toml")));
    std::fs::write(h.dir.path().join("keys.toml"), format!("{keys}rpm = 100\n")).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while key_view(&h, "alice")["rpm"] != 100 {
        assert!(std::time::Instant::now() < deadline, "the keys file was not applied");
        std::thread::sleep(Duration::from_millis(50));
    }
    let e = error(&h);
    assert!(e.as_str().is_some_and(|e| e.contains("accounts.toml")), "the refusal was cleared: {e}");
    std::fs::write(&accounts_file, good).unwrap();
    assert!(reload().status.success());
    wait("the error cleared", &|e| e.is_null());
}
