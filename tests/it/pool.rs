//! The account pool end to end: single-flight refresh under load, rotation across restarts,
//! no refresh storm on start, the live accounts file, SIGKILL during token rotation, and
//! accounts behind egress proxies (SOCKS5 and HTTP `CONNECT` test servers on loopback).

use crate::common;

use amq2api::emulator::{Behaviour, EmulatorOptions, Role};
use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_token_refreshed_once_while_50_requests_wait() {
    let setup = Setup { account_extra: "max_concurrency = 100".into(), ..Default::default() };
    let h = Harness::start(setup).await;
    let cid = client_id("acct-1");
    assert_eq!(post(&h, "/v1/messages", &simple("warm up", false)).await.status, 200);
    let before = h.emulator.stats_for(&cid).refreshes;
    h.emulator.expire_access_tokens(&cid);
    let mut tasks = Vec::new();
    for i in 0..50 {
        let url = h.url("/v1/messages");
        tasks.push(tokio::spawn(async move {
            let req = http::Request::post(url)
                .header("content-type", "application/json")
                .header("x-api-key", API_KEY)
                .body(Full::new(Bytes::from(simple(&format!("request {i}"), i % 2 == 0).to_string())))
                .unwrap();
            send(req).await.status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(
        h.emulator.stats_for(&cid).refreshes - before,
        1,
        "exactly one refresh for 50 waiting requests"
    );
    h.stop().await;
}

#[tokio::test]
async fn rotation_survives_a_restart_and_tokens_are_reused() {
    let mut h = Harness::start(Setup::default()).await;
    let cid = client_id("acct-1");
    assert_eq!(post(&h, "/v1/messages", &simple("one", false)).await.status, 200);
    let refreshes = h.emulator.stats_for(&cid).refreshes;
    assert!(refreshes >= 1);
    h.restart().await;
    // The stored, unexpired access token is reused: no refresh on start.
    assert_eq!(post(&h, "/v1/messages", &simple("two", false)).await.status, 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(h.emulator.stats_for(&cid).refreshes, refreshes, "a restart must not refresh a valid token");
    // The original refresh token is dead (rotated); a forced refresh must use the stored successor.
    h.emulator.expire_access_tokens(&cid);
    h.restart().await;
    assert_eq!(post(&h, "/v1/messages", &simple("three", false)).await.status, 200);
    assert_eq!(h.emulator.stats_for(&cid).refreshes, refreshes + 1);
    assert_eq!(h.emulator.stats().refresh_failures, 0);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_accounts_start_without_a_refresh_storm() {
    let ids: Vec<String> = (0..1000).map(|i| format!("a{i:04}")).collect();
    let mut h = Harness::start(Setup { accounts: ids.clone(), ..Default::default() }).await;
    // Serving at once, while the background refresher works through the accounts.
    assert_eq!(post(&h, "/v1/messages", &simple("first", false)).await.status, 200);
    let t0 = Instant::now();
    while h.emulator.stats().refreshes < 1000 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "refreshed only {} of 1000",
            h.emulator.stats().refreshes
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let spread = t0.elapsed();
    h.restart().await;
    assert_eq!(post(&h, "/v1/messages", &simple("after restart", false)).await.status, 200);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(h.emulator.stats().refreshes, 1000, "stored tokens are reused after a restart");
    assert_eq!(h.emulator.stats().refresh_failures, 0);
    eprintln!("1000 initial refreshes took {spread:?}");
    h.stop().await;
}

async fn total_accounts(h: &Harness) -> u64 {
    get(h, "/health").await.json()["accounts"]["total"].as_u64().unwrap()
}

async fn until<F: AsyncFnMut() -> bool>(within: Duration, mut f: F) -> Duration {
    let t0 = Instant::now();
    loop {
        if f().await {
            return t0.elapsed();
        }
        assert!(t0.elapsed() < within, "not applied within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_file_edits_apply_live_and_spare_in_flight_streams() {
    let setup = Setup {
        accounts: vec!["acct-1".into(), "acct-2".into()],
        emulator: EmulatorOptions { fragment_delay: Duration::from_millis(30), ..Default::default() },
        ..Default::default()
    };
    let h = Harness::start(setup).await;
    for id in ["acct-3", "acct-4"] {
        h.emulator.add_account(&client_id(id), &format!("secret-{id}"), &format!("refresh-{id}"));
    }
    let file = h.dir.path().join("accounts.toml");
    let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();

    // A long stream in flight through every edit below.
    let req = http::Request::post(h.url("/v1/messages"))
        .header("content-type", "application/json")
        .header("x-api-key", API_KEY)
        .body(Full::new(Bytes::from(simple("long one\n#emulator: long 600", true).to_string())))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    let streaming = tokio::spawn(async move { resp.into_body().collect().await.unwrap().to_bytes() });

    // Add.
    std::fs::write(&file, accounts_toml(&ids(&["acct-1", "acct-2", "acct-3"]))).unwrap();
    let took = until(Duration::from_secs(1), async || total_accounts(&h).await == 3).await;
    eprintln!("add applied in {took:?}");
    // Break: the last good set keeps serving.
    std::fs::write(&file, "[[account]]\nid = \"broken\n").unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(total_accounts(&h).await, 3);
    assert_eq!(post(&h, "/v1/messages", &simple("during breakage", false)).await.status, 200);
    // Fix and remove (acct-1 carries the in-flight stream or not; either way it must finish).
    std::fs::write(&file, accounts_toml(&ids(&["acct-2", "acct-3"]))).unwrap();
    until(Duration::from_secs(1), async || total_accounts(&h).await == 2).await;
    // Replace by rename, as editors do; change a setting and add one.
    let tmp = h.dir.path().join(".accounts.toml.swp");
    std::fs::write(&tmp, accounts_toml_with(&ids(&["acct-2", "acct-3", "acct-4"]), "weight = 2")).unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    until(Duration::from_secs(1), async || total_accounts(&h).await == 3).await;
    // Changed credentials restart the token chain from the file.
    h.emulator.add_account(&client_id("acct-2"), "secret-acct-2", "refresh-acct-2-new");
    std::fs::write(
        &file,
        accounts_toml(&ids(&["acct-2", "acct-3", "acct-4"])).replace("refresh-acct-2", "refresh-acct-2-new"),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    h.emulator.set_behaviour(&client_id("acct-3"), Behaviour::Suspended);
    h.emulator.set_behaviour(&client_id("acct-4"), Behaviour::Suspended);
    h.emulator.expire_access_tokens(&client_id("acct-2"));
    assert_eq!(post(&h, "/v1/messages", &simple("on the new credentials", false)).await.status, 200);
    // The stream that was in flight all along finished whole.
    let body = tokio::time::timeout(Duration::from_secs(30), streaming).await.unwrap().unwrap();
    let frames = parse_sse(&String::from_utf8_lossy(&body));
    assert_eq!(frames.last().unwrap().0, "message_stop", "{:?}", frames.last());
    assert_eq!(sse_text(&frames).chars().count(), 600);
    h.stop().await;
}

/// Runs the daemon binary as a child process.
fn spawn_daemon(config: &std::path::Path) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_amq2api"))
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_rotation_never_loses_a_refresh_token() {
    // Access tokens that live 2 s keep every account refreshing (and rotating) all the time.
    // With instant invalidation no client could survive a kill between the service's answer and
    // its own durable write; the daemon's guarantee is "stored before anything from the answer
    // is used", which the rotation grace checks: the old token dies once the new one is used.
    let emulator = amq2api::emulator::Emulator::start(EmulatorOptions {
        access_token_ttl: Duration::from_secs(2),
        rotation_grace: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let ids: Vec<String> = (0..8).map(|i| format!("k{i}")).collect();
    for id in &ids {
        emulator.add_account(&client_id(id), &format!("secret-{id}"), &format!("refresh-{id}"));
    }
    // Kiro social accounts rotate through the Kiro auth service under the same rule.
    let socials: Vec<String> = (0..4).map(|i| format!("s{i}")).collect();
    let mut accounts = accounts_toml(&ids);
    for id in &socials {
        emulator.add_social_account_as(id, &format!("social-refresh-{id}"), None);
        accounts
            .push_str(&format!("[[account]]\nid = \"{id}\"\nrefresh_token = \"social-refresh-{id}\"\n\n"));
    }
    let dir = tempfile::tempdir().unwrap();
    let config = common::child::write_config(dir.path(), &emulator, &ids, "refresh_before_expiry_secs = 30");
    std::fs::write(dir.path().join("accounts.toml"), accounts).unwrap();
    let mut seed = 0x9e37_79b9u32;
    for round in 0..20 {
        let mut child = spawn_daemon(&config);
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        let wait = 300 + (seed % 900) as u64;
        tokio::time::sleep(Duration::from_millis(wait)).await;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let _ = child.wait();
        assert_eq!(emulator.stats().refresh_failures, 0, "round {round}: a refresh token was lost");
    }
    // Every account still refreshes: start once more and let them all go round.
    let mut child = spawn_daemon(&config);
    let keys: Vec<String> = ids.iter().map(|id| client_id(id)).chain(socials.iter().cloned()).collect();
    let before: Vec<u64> = keys.iter().map(|k| emulator.stats_for(k).refreshes).collect();
    let t0 = Instant::now();
    loop {
        let now: Vec<u64> = keys.iter().map(|k| emulator.stats_for(k).refreshes).collect();
        if now.iter().zip(&before).all(|(n, b)| n > b) {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "not every account refreshed: {before:?} → {now:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(emulator.stats().refresh_failures, 0);
    assert!(emulator.stats().refreshes >= 12 * 3, "rotation really happened: {}", emulator.stats().refreshes);
    for s in &socials {
        assert!(emulator.stats_for(s).refreshes >= 3, "social {s} rotated: {:?}", emulator.stats_for(s));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_fails_no_request() {
    let ids: Vec<String> = (1..=4).map(|i| format!("acct-{i}")).collect();
    let setup = Setup {
        accounts: ids.clone(),
        account_extra: "max_concurrency = 60".into(),
        emulator: EmulatorOptions { fragment_delay: Duration::from_millis(5), ..Default::default() },
        ..Default::default()
    };
    let h = Harness::start(setup).await;
    let file = h.dir.path().join("accounts.toml");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..100 {
        let url = h.url("/v1/messages");
        let stop = stop.clone();
        clients.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let req = http::Request::post(url.clone())
                    .header("content-type", "application/json")
                    .header("x-api-key", API_KEY)
                    .body(Full::new(Bytes::from(simple(&format!("client {c}"), true).to_string())))
                    .unwrap();
                let r = send(req).await;
                let frames = if r.status == 200 { r.sse() } else { vec![] };
                if r.status == 200 && frames.last().is_some_and(|(e, _)| e == "message_stop") {
                    ok += 1;
                } else {
                    failed.push(format!("{} {}", r.status, r.text().chars().take(200).collect::<String>()));
                }
            }
            (ok, failed)
        }));
    }
    let pick = |n: usize| ids[..n].to_vec();
    for i in 0..50 {
        match i % 5 {
            0 => std::fs::write(&file, accounts_toml(&pick(2))).unwrap(),
            1 => std::fs::write(&file, "[[account]]\nid = \"half-writ").unwrap(),
            2 => {
                let tmp = h.dir.path().join("accounts.toml.new");
                std::fs::write(&tmp, accounts_toml_with(&pick(4), "max_concurrency = 60\nweight = 2"))
                    .unwrap();
                std::fs::rename(&tmp, &file).unwrap();
            }
            3 => std::fs::write(&file, accounts_toml_with(&pick(3), "max_concurrency = 60")).unwrap(),
            _ => std::fs::write(&file, accounts_toml_with(&ids[1..], "max_concurrency = 60")).unwrap(),
        }
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut failed) = (0, Vec::new());
    for c in clients {
        let (o, f) = c.await.unwrap();
        ok += o;
        failed.extend(f);
    }
    eprintln!("{ok} streams completed during 50 rewrites, {} failed", failed.len());
    assert!(failed.is_empty(), "{} failed: {:?}", failed.len(), &failed[..failed.len().min(5)]);
    assert!(ok >= 100, "{ok}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_removed_and_added_back_keeps_its_rotated_token() {
    let h = Harness::start(Setup { accounts: vec!["acct-1".into(), "acct-2".into()], ..Default::default() })
        .await;
    let file = h.dir.path().join("accounts.toml");
    let all = vec!["acct-1".to_string(), "acct-2".to_string()];
    // Both accounts refresh (and rotate) once.
    let t0 = Instant::now();
    while h.emulator.stats().refreshes < 2 {
        assert!(t0.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    std::fs::write(&file, accounts_toml(&all[..1])).unwrap();
    until(Duration::from_secs(10), async || total_accounts(&h).await == 1).await;
    std::fs::write(&file, accounts_toml(&all)).unwrap();
    until(Duration::from_secs(10), async || total_accounts(&h).await == 2).await;
    // Force a refresh of the returning account: it must use the stored successor, not the
    // file's (long dead) original.
    h.emulator.expire_access_tokens(&client_id("acct-2"));
    h.emulator.set_behaviour(&client_id("acct-1"), amq2api::emulator::Behaviour::Suspended);
    assert_eq!(post(&h, "/v1/messages", &simple("back again", false)).await.status, 200);
    assert_eq!(h.emulator.stats().refresh_failures, 0);
    h.stop().await;
}

/// Runs `f` off the runtime (it starts child daemons and waits on them); its panic is the
/// test's.
async fn blocking(f: impl FnOnce() + Send + 'static) {
    if let Err(e) = tokio::task::spawn_blocking(f).await {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// [`assert_live_stored`] for each of `ids` (its client `client_id(id)`); `what` names the
/// moment.
fn assert_all_live_stored(
    state_dir: &std::path::Path,
    emu: &amq2api::emulator::Emulator,
    ids: &[String],
    what: &str,
) {
    for id in ids {
        assert_live_stored(
            state_dir,
            emu,
            id,
            &client_id(id),
            &format!("{what}: {id}'s live refresh token is not the stored one"),
        );
    }
}

/// An emulator with `opts` and the accounts `ids` (`secret-ID`, `refresh-ID`).
async fn emulator_with(opts: EmulatorOptions, ids: &[String]) -> amq2api::emulator::Emulator {
    let emulator = amq2api::emulator::Emulator::start(opts).await.unwrap();
    for id in ids {
        emulator.add_account(&client_id(id), &format!("secret-{id}"), &format!("refresh-{id}"));
    }
    emulator
}

/// The refresh token stored for `id` is the emulator's live one for `cid`.
fn assert_live_stored(
    state_dir: &std::path::Path,
    emu: &amq2api::emulator::Emulator,
    id: &str,
    cid: &str,
    what: &str,
) {
    assert_eq!(stored_refresh_token(state_dir, id), emu.live_refresh_token(cid).unwrap(), "{what}");
}

/// The refresh token at the head of the account's chain in a stopped daemon's store (the
/// file's when the store has none).
fn stored_refresh_token(state_dir: &std::path::Path, id: &str) -> String {
    let store = amq2api::store::Store::open(state_dir).expect("the store opens");
    match store.get(id).unwrap().and_then(|r| r.tokens) {
        Some(t) => t.refresh_token.expose().to_owned(),
        None => format!("refresh-{id}"),
    }
}

/// Waits (polling, up to `within`) until the emulator has seen `n` more refreshes of `cid`.
fn wait_refreshes(emulator: &amq2api::emulator::Emulator, cid: &str, n: u64, within: Duration) {
    let start = emulator.stats_for(cid).refreshes;
    let t0 = Instant::now();
    while emulator.stats_for(cid).refreshes < start + n {
        assert!(t0.elapsed() < within, "fewer than {n} refreshes of {cid} within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The state directory on a small disk that fills up (and, in a second run, then turns
/// read-only): a commit that fails stops the rotation of every account whose new refresh token
/// it was (no refresh replaces a token that is not stored), `/health`, `STATUS=` and `amqctl
/// status` say why, and once there is room again the store is reopened, the held tokens stored
/// and rotation resumes by itself. After each run the stopped daemon's store holds exactly the
/// emulator's live refresh token of every account: nothing was lost.
///
/// redb reuses pages it has already written, so a full disk bites only when the store needs
/// more: each run adds twenty accounts once the disk is full (their records need new pages),
/// on a disk of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_or_read_only_disk_never_loses_the_refresh_token_chain() {
    use common::child::{AMQ2API, ChildDaemon, Notify, SmallDisk, write_config};
    // Tokens that live 2 s with a 30 s refresh margin: every account rotates on every pass of
    // the refresher (once a second). Strict rotation: the old refresh token dies at once.
    let emulator = amq2api::emulator::Emulator::start(EmulatorOptions {
        access_token_ttl: Duration::from_secs(2),
        ..Default::default()
    })
    .await
    .unwrap();
    let runs = [("full", false), ("readonly", true)];
    for (run, _) in runs {
        for i in 0..21 {
            let id = format!("{run}-{i}");
            emulator.add_account(&client_id(&id), &format!("secret-{id}"), &format!("refresh-{id}"));
        }
        // The credentials one account's entry changes to (a client of its own).
        let id = format!("{run}-19");
        emulator.add_account(
            &client_id(&format!("{id}-moved")),
            &format!("secret-{id}"),
            &format!("refresh-{id}-moved"),
        );
    }
    let emu = emulator.clone();
    blocking(move || {
        for (run, read_only) in runs {
            let all: Vec<String> = (0..21).map(|i| format!("{run}-{i}")).collect();
            let first = all[..1].to_vec();
            let tmp = tempfile::tempdir().unwrap();
            let config = write_config(tmp.path(), &emu, &first, "refresh_before_expiry_secs = 30");
            let disk = SmallDisk::new(&tmp.path().join("state"), "2m");
            let notify = Notify::new(tmp.path());
            let notify_path = notify.path.to_str().unwrap().to_owned();
            let d = ChildDaemon::start(disk.command(AMQ2API), &config, &[("NOTIFY_SOCKET", &notify_path)]);
            let total_refreshes =
                || all.iter().map(|id| emu.stats_for(&client_id(id)).refreshes).sum::<u64>();
            wait_refreshes(&emu, &client_id(&all[0]), 3, Duration::from_secs(20));
            d.wait_health(Duration::from_secs(5), "ok", |h| h["status"] == "ok");
            disk.fill();
            std::fs::write(tmp.path().join("accounts.toml"), accounts_toml(&all)).unwrap();
            // Every account rotates once more and cannot store it: all held, none refreshing.
            d.wait_health(Duration::from_secs(30), "every account waiting for its token to be stored", |h| {
                h["status"] == "degraded"
                    && h["accounts"]["total"] == 21
                    && h["accounts"]["tokens_unsaved"] == 21
            });
            let problem = d.health()["store"]["problem"].as_str().unwrap().to_owned();
            assert!(problem.contains("No space left on device"), "{problem}");
            // One account renamed meanwhile: the new name takes the unsaved chain along (from
            // the file's token, long rotated, it would meet `invalid_grant`). Another one's
            // credentials changed: the change waits (it would drop the unsaved chain), and
            // applies by itself once the store works.
            let renamed = format!("{run}-renamed");
            let last = format!("\"{}\"", all[20]);
            let moved = client_id(&format!("{}-moved", all[19]));
            let text = accounts_toml(&all)
                .replace(&format!("id = {last}"), &format!("id = \"{renamed}\""))
                .replace(&format!("\"{}\"", client_id(&all[19])), &format!("\"{moved}\""))
                .replace(&format!("\"refresh-{}\"", all[19]), &format!("\"refresh-{}-moved\"", all[19]));
            std::fs::write(tmp.path().join("accounts.toml"), text).unwrap();
            let t0 = Instant::now();
            while !d.ctl_text(&["status"]).contains(&renamed) {
                assert!(t0.elapsed() < Duration::from_secs(20), "the rename was not applied");
                std::thread::sleep(Duration::from_millis(100));
            }
            let h = d.health();
            assert_eq!(h["accounts"]["tokens_unsaved"], 21, "the renamed account's chain was dropped: {h}");
            let r = d.ctl_json(&["reload"]).expect("reload");
            let waits = r["warnings"].to_string();
            assert!(waits.contains("not changed") && waits.contains(&all[19]), "{r}");
            let status = d.ctl_text(&["status"]);
            assert!(status.contains("DEGRADED: ") && status.contains("No space left"), "{status}");
            assert!(status.contains("NOT STORED"), "{status}");
            let line = notify.wait_line("STATUS=", "DEGRADED", Duration::from_secs(10));
            assert!(line.contains("No space left"), "{line}");
            // No refresh while rotated tokens are held in memory only.
            let before = total_refreshes();
            std::thread::sleep(Duration::from_secs(3));
            assert_eq!(total_refreshes(), before, "{run}: a refresh ran while its chain was not stored");
            if read_only {
                // Remounting needs the store's file closed: it is, after the failure, except
                // for a moment at each retry.
                let t0 = Instant::now();
                while !disk.remount("ro") {
                    assert!(t0.elapsed() < Duration::from_secs(20), "the disk never became read-only");
                    std::thread::sleep(Duration::from_millis(20));
                }
                d.wait_health(Duration::from_secs(20), "a read-only store reported", |h| {
                    h["accounts"]["tokens_unsaved"] == 21
                        && h["store"]["problem"].as_str().unwrap_or("").contains("Read-only file system")
                });
                let before = total_refreshes();
                std::thread::sleep(Duration::from_secs(2));
                assert_eq!(total_refreshes(), before, "{run}: a refresh ran while read-only");
                assert!(disk.remount("rw"), "remount rw");
            }
            disk.free();
            d.wait_health(Duration::from_secs(30), "recovery", |h| {
                h["status"] == "ok" && h["accounts"]["tokens_unsaved"] == 0 && h.get("store").is_none()
            });
            wait_refreshes(&emu, &client_id(&all[0]), 2, Duration::from_secs(20));
            // The waiting change applies by itself within a retry (10 s) of the store working.
            let start = emu.stats_for(&moved).refreshes;
            let t0 = Instant::now();
            while emu.stats_for(&moved).refreshes < start + 2 {
                if t0.elapsed() > Duration::from_secs(60) {
                    let account = d.ctl_json(&["account", &all[19]]);
                    let status = d.ctl_json(&["status"]).map(|s| s["config"].clone());
                    panic!("{run}: the waiting credentials change never applied: {account:?} {status:?}");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            assert_eq!(d.stop(Duration::from_secs(60)), 0);
            let what = format!("{run}, after recovery");
            assert_all_live_stored(&disk.path(""), &emu, &all[..19], &what);
            assert_live_stored(&disk.path(""), &emu, &all[19], &moved, &what);
            assert_live_stored(&disk.path(""), &emu, &renamed, &client_id(&all[20]), &what);
        }
    })
    .await;
    assert_eq!(emulator.stats().refresh_failures, 0, "a refresh presented a dead token");
}

/// SIGTERM at many points around a refresh whose answer is slow (the token endpoint has
/// already rotated the refresh token when the answer leaves): the daemon waits for the answer
/// and stores it before it exits, so the next start never meets `invalid_grant`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_during_a_refresh_stores_its_answer_first() {
    use common::child::{AMQ2API, ChildDaemon, write_config};
    // Tokens that live 2 s with a 30 s margin: a refresh starts on every pass of the
    // refresher (once a second), and each answer takes 400 ms after the rotation.
    let opts = EmulatorOptions {
        access_token_ttl: Duration::from_secs(2),
        token_delay: Duration::from_millis(400),
        ..Default::default()
    };
    let ids = vec!["stop-1".to_owned(), "stop-2".to_owned()];
    let emulator = emulator_with(opts, &ids).await;
    let tmp = tempfile::tempdir().unwrap();
    let config = write_config(tmp.path(), &emulator, &ids, "refresh_before_expiry_secs = 30");
    let emu = emulator.clone();
    blocking(move || {
        let mut seed = 0x2545_f491u32;
        for round in 0..12 {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            let d = ChildDaemon::start(std::process::Command::new(AMQ2API), &config, &[]);
            // Anywhere in a refresh cycle: before a refresh, while its answer is on the way, after.
            std::thread::sleep(Duration::from_millis((seed % 1500) as u64));
            assert_eq!(d.stop(Duration::from_secs(60)), 0, "round {round}: a clean stop exits 0");
            assert_all_live_stored(&tmp.path().join("state"), &emu, &ids, &format!("round {round}"));
        }
    })
    .await;
    assert_eq!(emulator.stats().refresh_failures, 0);
    assert!(emulator.stats().refreshes >= 12, "refreshes really happened: {}", emulator.stats().refreshes);
}

/// An account renamed in the file (a new id, the same credentials) resumes its rotated refresh
/// token, whether renamed live (a reload) or while the daemon was down (a start), and renamed
/// back. Before, the
/// new id started from the file's token, long rotated: `invalid_grant`, the account invalid,
/// and its live chain left under the old id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renamed_account_resumes_its_rotated_refresh_token() {
    use common::child::{AMQ2API, ChildDaemon, write_config};
    let emulator = amq2api::emulator::Emulator::start(EmulatorOptions::default()).await.unwrap();
    let cid = client_id("first");
    emulator.add_account(&cid, "secret-first", "refresh-first");
    let client = cid.clone();
    let tmp = tempfile::tempdir().unwrap();
    let config = write_config(tmp.path(), &emulator, &["first".to_owned()], "");
    let accounts = tmp.path().join("accounts.toml");
    let entry = move |id: &str| {
        format!(
            "[[account]]\nid = \"{id}\"\nclient_id = \"{client}\"\nclient_secret = \"secret-first\"\nrefresh_token = \"refresh-first\"\n"
        )
    };
    let emu = emulator.clone();
    blocking(move || {
        let refreshed = |d: &ChildDaemon, id: &str| {
            let r = d
                .ctl_json(&["refresh", id])
                .unwrap_or_else(|| panic!("{id}: {}", d.ctl_text(&["refresh", id])));
            assert_eq!(r[0]["ok"], true, "{id}: {r}");
        };
        let d = ChildDaemon::start(std::process::Command::new(AMQ2API), &config, &[]);
        refreshed(&d, "first");
        assert_ne!(emu.live_refresh_token(&cid).unwrap(), "refresh-first", "the token rotated");
        // Renamed live.
        std::fs::write(&accounts, entry("second")).unwrap();
        assert!(d.ctl_text(&["reload"]).contains("second"), "the rename was applied");
        refreshed(&d, "second");
        assert_eq!(d.stop(Duration::from_secs(30)), 0);
        // Renamed while stopped, then back to the first name (whose own stored chain is dead
        // now: the newest chain of these credentials wins).
        for id in ["third", "first"] {
            std::fs::write(&accounts, entry(id)).unwrap();
            let d = ChildDaemon::start(std::process::Command::new(AMQ2API), &config, &[]);
            refreshed(&d, id);
            assert_eq!(d.stop(Duration::from_secs(30)), 0);
            assert_live_stored(
                &tmp.path().join("state"),
                &emu,
                id,
                &cid,
                &format!("{id}: the renamed account's chain is the live one"),
            );
        }
    })
    .await;
    assert_eq!(emulator.stats().refresh_failures, 0, "a refresh presented a dead token");
}

/// A stop while refreshes queue behind the refresh slots (a first start: every account's token
/// is due at once): the token calls already sent are waited for and their answers stored, and
/// no queued refresh starts a new call. (Before, the queue went on calling through the
/// shutdown's wait, and the calls in flight at its end were cut off after the token endpoint
/// had rotated their refresh tokens: those accounts met `invalid_grant` at the next start.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_during_a_refresh_backlog_starts_no_new_token_call() {
    use common::child::{AMQ2API, ChildDaemon, write_config};
    let ids: Vec<String> = (0..12).map(|i| format!("backlog-{i}")).collect();
    let emulator =
        emulator_with(EmulatorOptions { token_delay: Duration::from_secs(3), ..Default::default() }, &ids)
            .await;
    let tmp = tempfile::tempdir().unwrap();
    let config = write_config(tmp.path(), &emulator, &ids, "");
    let emu = emulator.clone();
    blocking(move || {
        let d = ChildDaemon::start(std::process::Command::new(AMQ2API), &config, &[]);
        // The first wave is sent (its answers take 3 s); the rest wait for a slot.
        let t0 = Instant::now();
        while emu.stats().refreshes == 0 {
            assert!(t0.elapsed() < Duration::from_secs(10), "no refresh started");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(300));
        let sent = emu.stats().refreshes;
        assert!(sent < ids.len() as u64, "no backlog: {sent} refreshes sent at once");
        assert_eq!(d.stop(Duration::from_secs(60)), 0);
        assert_eq!(
            emu.stats().refreshes,
            sent,
            "refreshes queued at the stop still called the token endpoint"
        );
        assert_all_live_stored(&tmp.path().join("state"), &emu, &ids, "after the stop");
    })
    .await;
    assert_eq!(emulator.stats().refresh_failures, 0);
}

/// Every account at its concurrency limit for the whole queue wait: the 429's `retry-after`
/// is an honest estimate (how long requests have recently held an account), not "1".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_timeout_says_honestly_when_to_retry() {
    let setup = Setup {
        account_extra: "max_concurrency = 1".into(),
        accounts_settings: "queue_timeout_secs = 1".into(),
        emulator: EmulatorOptions { fragment_delay: Duration::from_millis(30), ..Default::default() },
        ..Default::default()
    };
    let h = Harness::start(setup).await;
    // Requests that hold the account for about 3 s each.
    let slow = simple("hold it\n#emulator: long 600", false);
    let t0 = Instant::now();
    assert_eq!(post(&h, "/v1/messages", &slow).await.status, 200);
    let held = t0.elapsed();
    assert!(held >= Duration::from_secs(2), "{held:?}");
    let h = std::sync::Arc::new(h);
    let busy = {
        let h = h.clone();
        let slow = slow.clone();
        tokio::spawn(async move { post(&h, "/v1/messages", &slow).await.status })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = post(&h, "/v1/messages", &simple("no room", false)).await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.json()["error"]["type"], "rate_limit_error");
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry >= 2 && retry <= held.as_secs() + 1, "retry-after {retry} s for requests held {held:?}");
    let ms: u64 = r.headers["retry-after-ms"].to_str().unwrap().parse().unwrap();
    assert!(ms >= 2000, "{ms}");
    assert_eq!(busy.await.unwrap(), 200);
}

/// Every log line of a request carries its id: the failover decisions and the access log of a
/// request that two throttled accounts refused all name the `request-id` the client got.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_log_lines_carry_the_request_id() {
    use common::child::{AMQ2API, ChildDaemon, write_config};
    let emulator = amq2api::emulator::Emulator::start(EmulatorOptions::default()).await.unwrap();
    let ids = vec!["span-1".to_owned(), "span-2".to_owned()];
    for id in &ids {
        emulator.add_account(&client_id(id), &format!("secret-{id}"), &format!("refresh-{id}"));
        emulator.set_behaviour(&client_id(id), Behaviour::Throttled { retry_after_secs: None });
    }
    let tmp = tempfile::tempdir().unwrap();
    let config = write_config(tmp.path(), &emulator, &ids, "");
    let log = tmp.path().join("daemon.log");
    blocking(move || {
        let d = ChildDaemon::start_logged(std::process::Command::new(AMQ2API), &config, &[], Some(&log));
        let addr = d.addr();
        let body = simple("refused twice", false).to_string();
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
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
        assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
        let request_id = answer
            .lines()
            .find_map(|l| l.strip_prefix("request-id: "))
            .expect("a request-id header")
            .trim()
            .to_owned();
        assert_eq!(d.stop(Duration::from_secs(30)), 0);
        let text = std::fs::read_to_string(&log).unwrap();
        let failovers: Vec<&str> = text.lines().filter(|l| l.contains("failing over")).collect();
        assert_eq!(failovers.len(), 2, "{text}");
        for line in &failovers {
            assert!(line.contains(&format!("id={request_id}")), "{line}");
            assert!(line.contains("attempt="), "{line}");
            assert!(line.contains("account=span-"), "{line}");
        }
        let access: Vec<&str> = text.lines().filter(|l| l.contains(&request_id) && l.contains(" request ")).collect();
        assert!(!access.is_empty(), "the access log names the request: {text}");
    })
    .await;
}

/// `[[account]]` entries for a social account and an API-key account registered with `e`.
fn social_and_api_key(e: &amq2api::emulator::Emulator) -> String {
    e.add_social_account_as("kiro-social", "social-refresh-1", None);
    e.add_api_key("ksk_test_0123456789abcdef");
    "[[account]]\nid = \"kiro-social\"\nrefresh_token = \"social-refresh-1\"\n\n\
     [[account]]\nid = \"kiro-key\"\napi_key = \"ksk_test_0123456789abcdef\"\n\n"
        .to_owned()
}

/// One account of each kind: each gets its bearer its own way (OIDC refresh, the Kiro auth
/// service, the key itself with `tokentype: API_KEY`), serves on its kind's endpoint (Amazon Q
/// for OIDC, the Kiro runtime for the others) with its kind's profile ARN, and looks like an
/// installation of its own: no two accounts ever send the same user agent, nor send on the
/// same connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_account_gets_its_bearer_and_serves_on_its_endpoint() {
    let setup = Setup {
        accounts: vec!["idc-1".into()],
        more_accounts: Some(Box::new(social_and_api_key)),
        emulator: EmulatorOptions { require_profile_arn: true, ..Default::default() },
        ..Default::default()
    };
    let h = Harness::start(setup).await;
    let idc_arn = "arn:aws:codewhisperer:us-east-1:123456789012:profile/IDCPROFILE01";
    h.emulator.set_profile_arn(&client_id("idc-1"), Some(idc_arn));
    for i in 0..9 {
        let r = post(&h, "/v1/messages", &simple(&format!("request {i}"), i % 2 == 0)).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let oidc = h.emulator.stats_for(&client_id("idc-1"));
    let social = h.emulator.stats_for("kiro-social");
    let key = h.emulator.stats_for("ksk_test_0123456789abcdef");
    assert!(oidc.requests > 0 && oidc.runtime_requests == 0, "OIDC on Amazon Q: {oidc:?}");
    assert_eq!(oidc.profile_requests, 1, "ListAvailableProfiles asked once");
    assert!(
        social.requests > 0 && social.runtime_requests == social.requests,
        "social on the runtime: {social:?}"
    );
    assert!(social.refreshes >= 1, "social accounts refresh through the Kiro auth service");
    assert!(key.requests > 0 && key.runtime_requests == key.requests, "API key on the runtime: {key:?}");
    assert_eq!(key.refreshes, 0, "an API key is never refreshed");
    assert_eq!(h.emulator.stats().refused, 0);
    assert_eq!(h.emulator.stats().refresh_failures, 0);
    // The profile each sends: the learned one, the social accounts' fixed one, none.
    let arn = |s: &amq2api::emulator::AccountStats| s.last_request.as_ref().unwrap()["profileArn"].clone();
    assert_eq!(arn(&oidc), idc_arn);
    assert_eq!(arn(&social), "arn:aws:codewhisperer:us-east-1:699475941385:profile/EHGA3GRVQMUK");
    assert!(arn(&key).is_null());
    assert!(h.emulator.shared_user_agents().is_empty(), "{:?}", h.emulator.shared_user_agents());
    assert_eq!(h.emulator.stats().shared_connections, 0, "a connection carried two accounts' calls");
    for s in [&oidc, &social, &key] {
        assert!(s.chat_user_agent.as_deref().unwrap().contains("KiroIDE-"), "{s:?}");
    }
    assert!(social.refresh_user_agent.as_deref().unwrap().starts_with("KiroIDE-"));
    // amqctl shows each account's kind, endpoint and profile; nothing secret.
    let accounts = h.ctl_json(&["accounts"]);
    let text = accounts.to_string();
    for secret in ["social-refresh-1", "ksk_test_0123456789abcdef", "secret-idc-1", "refresh-idc-1"] {
        assert!(!text.contains(secret), "amqctl shows a secret: {text}");
    }
    let by_id = |id: &str| accounts.as_array().unwrap().iter().find(|a| a["id"] == id).unwrap().clone();
    assert_eq!(
        (by_id("idc-1")["kind"].clone(), by_id("idc-1")["endpoint"].clone()),
        ("oidc".into(), "q".into())
    );
    assert_eq!(by_id("idc-1")["profile_arn"], idc_arn);
    assert_eq!(by_id("kiro-social")["kind"], "social");
    assert_eq!(by_id("kiro-social")["endpoint"], "runtime");
    assert_eq!(by_id("kiro-key")["kind"], "api-key");
    assert!(by_id("kiro-key")["profile_arn"].is_null());
    // After a restart the learned profile and the machine ids are the same (from the store).
    let agents_before = (oidc.chat_user_agent.clone(), social.chat_user_agent.clone());
    let mut h = h;
    h.restart().await;
    for i in 0..6 {
        assert_eq!(post(&h, "/v1/messages", &simple(&format!("again {i}"), false)).await.status, 200);
    }
    let oidc = h.emulator.stats_for(&client_id("idc-1"));
    assert_eq!(oidc.profile_requests, 1, "the learned profile was kept");
    let social = h.emulator.stats_for("kiro-social");
    assert_eq!((oidc.chat_user_agent.clone(), social.chat_user_agent.clone()), agents_before);
    // One installation: every call (refresh, profiles, chat) names the same machine.
    let machine = agents_before.0.as_deref().unwrap().rsplit('-').next().unwrap().to_owned();
    assert!(oidc.user_agents.iter().all(|ua| ua.ends_with(&machine)), "{:?}", oidc.user_agents);
    assert!(oidc.user_agents.len() <= 3, "one agent per API called: {:?}", oidc.user_agents);
    assert_eq!(h.emulator.stats().shared_connections, 0, "a connection carried two accounts' calls");
    h.stop().await;
}

/// Each endpoint fallback: an account whose first endpoint is not there (404), or not
/// listening, or that refuses its freshly refreshed token, moves to the other endpoint and
/// remembers it (across a restart); an ordinary 4xx about the request never moves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_fall_back_to_the_other_endpoint_and_remember_it() {
    use Role as EmuRole;
    // The runtime is switched off: social and API-key accounts go to Amazon Q (which takes
    // social tokens; API keys it refuses: they stay on the runtime and fail over).
    let setup = Setup {
        accounts: vec![],
        more_accounts: Some(Box::new(|e| {
            e.add_social_account_as("kiro-social", "social-refresh-1", None);
            "[[account]]\nid = \"kiro-social\"\nrefresh_token = \"social-refresh-1\"\n".to_owned()
        })),
        ..Default::default()
    };
    let mut h = Harness::start(setup).await;
    h.emulator.set_role_enabled(EmuRole::Runtime, false);
    let r = post(&h, "/v1/messages", &simple("no runtime today", false)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let s = h.emulator.stats_for("kiro-social");
    assert_eq!((s.requests, s.runtime_requests), (1, 0), "served by Amazon Q: {s:?}");
    assert_eq!(h.account("kiro-social")["endpoint"], "q");
    // Remembered: after a restart, with the runtime back, the account goes straight to Amazon Q.
    h.emulator.set_role_enabled(EmuRole::Runtime, true);
    h.restart().await;
    assert_eq!(post(&h, "/v1/messages", &simple("straight there", false)).await.status, 200);
    let s = h.emulator.stats_for("kiro-social");
    assert_eq!((s.requests, s.runtime_requests), (2, 0), "{s:?}");
    // A request Amazon Q rejects as malformed is the client's fault: no fallback, one call.
    let bad = simple("#emulator: tool-mismatch", false);
    let r = post(&h, "/v1/messages", &bad).await;
    assert_eq!(r.status, 400, "{}", r.text());
    let s = h.emulator.stats_for("kiro-social");
    assert_eq!((s.requests, s.runtime_requests), (3, 0), "exactly one attempt, same endpoint: {s:?}");
    assert_eq!(h.account("kiro-social")["endpoint"], "q");
    h.stop().await;

    // An OIDC account whose Amazon Q endpoint is not listening (port 1: nothing ever is) moves
    // to the runtime (which takes OIDC tokens here).
    let setup = Setup {
        upstream: String::new(),
        emulator: EmulatorOptions { runtime_accepts_oidc: true, ..Default::default() },
        ..Default::default()
    };
    let h = Harness::start(setup).await;
    let config = std::fs::read_to_string(&h.config_path).unwrap();
    let ep = h.emulator.endpoint();
    std::fs::write(
        &h.config_path,
        config.replacen(&format!("endpoint = \"{ep}\""), "endpoint = \"http://127.0.0.1:1/\"", 1),
    )
    .unwrap();
    let mut h = h;
    h.restart().await;
    let r = post(&h, "/v1/messages", &simple("q is down", true)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let s = h.emulator.stats_for(&client_id("acct-1"));
    assert_eq!((s.requests, s.runtime_requests), (1, 1), "{s:?}");
    assert_eq!(h.account("acct-1")["endpoint"], "runtime");
    h.stop().await;
}

/// The 2026 error reasons, each as PROTOCOL.md §5 says: a suspicious-activity 429 parks the
/// account for the cool-down (the request fails over, nothing retries it); "locked your
/// account" suspends it; the request's own faults are a 400 after exactly one attempt;
/// overage parks it for quota; a model that stays busy is a 529.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_2026_error_reasons_do_what_the_protocol_says() {
    let setup = Setup {
        accounts: vec!["e-1".into(), "e-2".into()],
        upstream: "suspicious_cooldown_secs = 1200".into(),
        ..Default::default()
    };
    let h = Harness::start(setup).await;
    let total = |h: &Harness| {
        ["e-1", "e-2"].iter().map(|id| h.emulator.stats_for(&client_id(id)).requests).sum::<u64>()
    };
    // The request's own faults: one call, 400, nobody blamed.
    for (directive, reason) in [
        ("tool-mismatch", "TOOL_USE_RESULT_MISMATCH"),
        ("tool-schema-invalid", "TOOL_SCHEMA_INVALID"),
        ("signature-invalid", "THINKING_SIGNATURE_INVALID"),
        ("profile-required", "profileArn is required"),
    ] {
        let before = total(&h);
        let r = post(&h, "/v1/messages", &simple(&format!("x\n#emulator: {directive}"), false)).await;
        assert_eq!(r.status, 400, "{directive}: {}", r.text());
        assert_eq!(r.json()["error"]["type"], "invalid_request_error");
        assert!(r.text().contains(reason), "{directive}: {}", r.text());
        assert_eq!(total(&h), before + 1, "{directive}: exactly one attempt");
    }
    for id in ["e-1", "e-2"] {
        assert_eq!(h.account(id)["state"], "active");
    }
    // Suspicious activity on the first account tried: parked 20 min, the request fails over.
    h.emulator.set_behaviour_for_next(&client_id("e-1"), Behaviour::Suspicious, 1);
    h.emulator.set_behaviour_for_next(&client_id("e-2"), Behaviour::Suspicious, 1);
    let r = post(&h, "/v1/messages", &simple("watched", false)).await;
    let parked: Vec<serde_json::Value> =
        ["e-1", "e-2"].iter().map(|id| h.account(id)).filter(|a| a["state"] == "cooling").collect();
    assert!(!parked.is_empty(), "{}", r.text());
    for a in &parked {
        assert!(a["reason"].as_str().unwrap().contains("suspicious activity"), "{a}");
        let until = a["until"].as_u64().unwrap();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        assert!(until >= now + 1100 && until <= now + 1300, "parked for the cool-down: {a}");
    }
    if parked.len() == 1 {
        assert_eq!(r.status, 200, "failed over: {}", r.text());
    }
    // Nothing goes to a parked account meanwhile.
    let parked_ids: Vec<String> = parked.iter().map(|a| a["id"].as_str().unwrap().to_owned()).collect();
    let before: Vec<u64> =
        parked_ids.iter().map(|id| h.emulator.stats_for(&client_id(id)).requests).collect();
    for i in 0..5 {
        let _ = post(&h, "/v1/messages", &simple(&format!("after {i}"), false)).await;
    }
    let after: Vec<u64> = parked_ids.iter().map(|id| h.emulator.stats_for(&client_id(id)).requests).collect();
    assert_eq!(before, after, "a parked account got requests");
    h.stop().await;

    // Locked: suspended. Overage: quota. A model busy on every account: 529.
    let h = Harness::start(Setup { accounts: vec!["f-1".into()], ..Default::default() }).await;
    let r = post(&h, "/v1/messages", &simple("x\n#emulator: high-traffic", false)).await;
    assert_eq!(r.status, 529, "{}", r.text());
    assert_eq!(r.json()["error"]["type"], "overloaded_error");
    assert_eq!(h.account("f-1")["state"], "active", "the model was busy, not the account");
    let r = post(&h, "/v1/messages", &simple("x\n#emulator: overage", false)).await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(h.account("f-1")["state"], "quota");
    h.ctl_json(&["enable", "f-1"]);
    let r = post(&h, "/v1/messages", &simple("x\n#emulator: locked", false)).await;
    assert_eq!(r.status, 529, "{}", r.text());
    let a = h.account("f-1");
    assert_eq!(a["state"], "suspended", "{a}");
    assert!(a["reason"].as_str().unwrap().contains("locked your account"), "{a}");
    h.stop().await;
}

/// No retry storm: 200 requests against one throttling account and one healthy one reach the
/// throttling one at most twice (it cools down after the first 429 and nothing retries it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_requests_do_not_storm_a_throttling_account() {
    let setup = Setup {
        accounts: vec!["calm".into(), "busy".into()],
        account_extra: "max_concurrency = 50".into(),
        ..Default::default()
    };
    let h = std::sync::Arc::new(Harness::start(setup).await);
    h.emulator.set_behaviour(&client_id("busy"), Behaviour::Throttled { retry_after_secs: None });
    let mut tasks = Vec::new();
    for i in 0..200 {
        let h = h.clone();
        tasks.push(tokio::spawn(async move {
            post(&h, "/v1/messages", &simple(&format!("r{i}"), i % 3 == 0)).await.status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    let busy = h.emulator.stats_for(&client_id("busy")).requests;
    assert!((1..=2).contains(&busy), "the throttling account was called {busy} times");
    assert_eq!(h.emulator.stats_for(&client_id("calm")).requests, 200, "the healthy account served them all");
}

/// `rpm`: at most that many requests start on the account in any 60 s; past it the request
/// waits in the queue or, when every account is at its limit for longer, gets a 429 that says
/// when a slot frees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpm_caps_the_requests_an_account_starts_each_minute() {
    let setup = Setup {
        accounts: vec!["paced".into()],
        account_extra: "rpm = 3".into(),
        accounts_settings: "queue_timeout_secs = 1".into(),
        ..Default::default()
    };
    let h = Harness::start(setup).await;
    for i in 0..3 {
        assert_eq!(post(&h, "/v1/messages", &simple(&format!("r{i}"), false)).await.status, 200);
    }
    let r = post(&h, "/v1/messages", &simple("one too many", false)).await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.json()["error"]["type"], "rate_limit_error");
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((50..=60).contains(&retry), "a slot frees within the minute: {retry}");
    assert_eq!(h.emulator.stats_for(&client_id("paced")).requests, 3, "the limit held");
    let a = h.account("paced");
    assert_eq!((a["requests_last_minute"].clone(), a["rpm"].clone()), (3.into(), 3.into()), "{a}");
    h.stop().await;
}

/// `n` non-streaming requests, each served (200).
async fn all_served(h: &Harness, n: usize) {
    for i in 0..n {
        let r = post(h, "/v1/messages", &simple(&format!("request {i}"), false)).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
}

/// A daemon with one IAM Identity Center account, `idc`, against an emulator that requires
/// a profile ARN; and that account's client id.
async fn idc_account() -> (Harness, String) {
    let setup = Setup {
        accounts: vec!["idc".into()],
        emulator: EmulatorOptions { require_profile_arn: true, ..Default::default() },
        ..Default::default()
    };
    (Harness::start(setup).await, client_id("idc"))
}

/// A profile ARN the service stops taking ("User is not authorized to make this call") is
/// asked for again, once, and the request goes through with the new one; the file's
/// `profile_arn` always wins and is never asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_profile_is_asked_for_again_once() {
    let (h, cid) = idc_account().await;
    let first = "arn:aws:codewhisperer:us-east-1:123456789012:profile/FIRSTPROFILE";
    let second = "arn:aws:codewhisperer:us-east-1:123456789012:profile/SECONDPROFIL";
    h.emulator.set_profile_arn(&cid, Some(first));
    assert_eq!(post(&h, "/v1/messages", &simple("one", false)).await.status, 200);
    assert_eq!(h.account("idc")["profile_arn"], first);
    h.emulator.set_profile_arn(&cid, Some(second));
    let r = post(&h, "/v1/messages", &simple("two", false)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let s = h.emulator.stats_for(&cid);
    assert_eq!(s.profile_requests, 2, "asked once more: {s:?}");
    assert_eq!(s.last_request.unwrap()["profileArn"], second);
    assert_eq!(h.account("idc")["profile_arn"], second);
    assert_eq!(h.account("idc")["state"], "active");
    h.stop().await;

    // The file's ARN wins: no listing call; a wrong one is the operator's to fix (the account
    // is taken out with the service's words).
    let setup = Setup {
        accounts: vec!["pinned".into()],
        account_extra: format!("profile_arn = \"{first}\""),
        emulator: EmulatorOptions { require_profile_arn: true, ..Default::default() },
        ..Default::default()
    };
    let h = Harness::start(setup).await;
    h.emulator.set_profile_arn(&client_id("pinned"), Some(first));
    assert_eq!(post(&h, "/v1/messages", &simple("pinned", false)).await.status, 200);
    assert_eq!(h.emulator.stats_for(&client_id("pinned")).profile_requests, 0);
    h.stop().await;
}

/// A learned profile ARN refused by one endpoint ("not authorized") while the profiles cannot
/// be listed is kept: the other endpoint takes it and the request goes through, and the ARN
/// survives a restart. Before, it was forgotten (and stored so) before the listing was
/// asked; the listing failed, the Builder ID stand-in was refused by both endpoints, and the
/// account cooled down, its profile lost until a listing worked again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learned_profile_is_kept_when_the_listing_fails() {
    let (mut h, cid) = idc_account().await;
    let learned = "arn:aws:codewhisperer:us-east-1:123456789012:profile/LEARNEDPROF1";
    h.emulator.set_profile_arn(&cid, Some(learned));
    assert_eq!(post(&h, "/v1/messages", &simple("one", false)).await.status, 200);
    assert_eq!(h.account("idc")["profile_arn"], learned);
    // Amazon Q's endpoint stops taking the account; the runtime takes it; no listing works.
    h.emulator.set_role_access(&cid, Role::AmazonQ, Some(false));
    h.emulator.set_role_access(&cid, Role::Runtime, Some(true));
    h.emulator.set_listing_behaviour(&cid, Behaviour::Unavailable);
    let r = post(&h, "/v1/messages", &simple("two", false)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let s = h.emulator.stats_for(&cid);
    assert_eq!(s.last_request.unwrap()["profileArn"], learned);
    let idc = h.account("idc");
    assert_eq!(idc["profile_arn"], learned, "{idc}");
    assert_eq!(idc["state"], "active", "{idc}");
    h.restart().await;
    assert_eq!(h.account("idc")["profile_arn"], learned);
    assert_eq!(post(&h, "/v1/messages", &simple("three", false)).await.status, 200);
    assert_eq!(h.emulator.stats_for(&cid).last_request.unwrap()["profileArn"], learned);
    h.stop().await;
}

/// An IAM Identity Center account whose profiles cannot be listed for a while (the listing
/// fails): the Builder ID profile stands in, the service refuses it ("not authorized"), and
/// the account cools down (it is listed again once back). Before, it was made invalid for
/// good, though nothing was wrong with it. Once the listing works, the account serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_profile_listing_is_no_verdict_on_the_account() {
    let (h, cid) = idc_account().await;
    let real = "arn:aws:codewhisperer:us-east-1:123456789012:profile/REALPROFILE1";
    h.emulator.set_profile_arn(&cid, Some(real));
    h.emulator.set_listing_behaviour(&cid, Behaviour::Unavailable);
    let r = post(&h, "/v1/messages", &simple("one", false)).await;
    assert_ne!(r.status, 200, "{}", r.text());
    let idc = h.account("idc");
    assert_eq!(idc["state"], "cooling", "{idc}");
    assert!(idc["reason"].as_str().is_some_and(|r| r.contains("profiles could not be listed")), "{idc}");
    h.emulator.set_listing_behaviour(&cid, Behaviour::Normal);
    // Back now rather than after the cool-down.
    ctl_json(&h, &["enable", "idc"]).await;
    let r = post(&h, "/v1/messages", &simple("two", false)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(h.account("idc")["profile_arn"], real);
    assert_eq!(h.emulator.stats_for(&cid).last_request.unwrap()["profileArn"], real);
    h.stop().await;
}

/// An account that no chat endpoint takes (Amazon Q's endpoint gone, the runtime refusing its
/// token) is cooled down, not left active to be picked by every request; the other account
/// serves meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_no_endpoint_takes_is_cooled_down() {
    use amq2api::emulator::Role;
    let setup = Setup { accounts: vec!["gone".into(), "fine".into()], ..Default::default() };
    let h = Harness::start(setup).await;
    h.emulator.set_role_enabled(Role::AmazonQ, false);
    h.emulator.set_role_access(&client_id("gone"), Role::Runtime, Some(false));
    h.emulator.set_role_access(&client_id("fine"), Role::Runtime, Some(true));
    all_served(&h, 6).await;
    let gone = h.account("gone");
    assert_eq!(gone["state"], "cooling", "{gone}");
    assert!(gone["reason"].as_str().is_some_and(|r| r.contains("no chat endpoint")), "{gone}");
    let tried =
        h.emulator.stats_for(&client_id("gone")).requests + h.emulator.stats_for(&client_id("gone")).refused;
    assert!(tried <= 2, "the cooling account was still tried: {tried}");
    h.stop().await;
}

/// An account whose every token is refused by every chat endpoint, a freshly refreshed one
/// too: cooled down after one forced refresh, not refreshed again on every request (a refresh
/// and three chat calls each time, for ever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_whose_fresh_token_is_refused_cools_down_instead_of_refreshing_per_request() {
    let setup = Setup { accounts: vec!["refused".into(), "fine".into()], ..Default::default() };
    let h = Harness::start(setup).await;
    h.emulator.set_behaviour(&client_id("refused"), Behaviour::BearerRefused);
    all_served(&h, 8).await;
    let refused = h.account("refused");
    assert_eq!(refused["state"], "cooling", "{refused}");
    assert!(refused["reason"].as_str().is_some_and(|r| r.contains("freshly refreshed token")), "{refused}");
    let refreshes = h.emulator.stats_for(&client_id("refused")).refreshes;
    assert!(refreshes <= 2, "refreshed {refreshes} times");
    h.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Egress proxies

use common::proxy::{Protocol, TestProxy};

/// `amqctl --json ARGS` against the in-process daemon, once its control socket is open.
async fn ctl_json(h: &Harness, args: &[&str]) -> serde_json::Value {
    let socket = h.dir.path().join("control.sock");
    let t0 = Instant::now();
    while tokio::net::UnixStream::connect(&socket).await.is_err() {
        assert!(t0.elapsed() < Duration::from_secs(20), "the daemon never opened its control socket");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_amqctl"))
            .arg("--socket")
            .arg(socket)
            .arg("--json")
            .args(&args)
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"))
}

/// Two accounts, `via` behind the proxy at `url` and `direct` without one, taking turns.
fn via_and_direct(url: &str) -> Setup {
    Setup {
        accounts: vec!["via".into(), "direct".into()],
        accounts_settings: "strategy = \"round-robin\"".into(),
        account_extra_for: vec![("via".into(), format!("proxy = \"{url}\""))],
        ..Default::default()
    }
}

/// Every call of the account with a proxy — refreshes, the profile listing, chat — went through
/// the proxy, to the emulator; no call of the other account did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_s_calls_all_go_through_its_proxy_and_no_other_account_s_do() {
    for (protocol, scheme, auth) in [
        (Protocol::Socks5, "socks5", None),
        (Protocol::Socks5, "socks5h", Some(("amq", "socks-pw"))),
        (Protocol::HttpConnect, "http", None),
        (Protocol::HttpConnect, "http", Some(("amq", "http-pw"))),
    ] {
        let proxy = TestProxy::start(protocol, auth).await;
        let url = proxy.url(scheme, auth);
        let h = Harness::start(via_and_direct(&url)).await;
        for i in 0..6 {
            let r = post(&h, "/v1/messages", &simple(&format!("hello {i}"), i % 2 == 1)).await;
            assert_eq!(r.status, 200, "{url}: {}", r.text());
        }
        let (via, direct) =
            (h.emulator.stats_for(&client_id("via")), h.emulator.stats_for(&client_id("direct")));
        assert!(via.requests >= 1 && via.refreshes >= 1 && via.profile_requests >= 1, "{url}: {via:?}");
        assert!(direct.requests >= 1 && direct.refreshes >= 1, "{url}: {direct:?}");
        // Each of the account's calls the emulator answered was carried by the proxy.
        assert_eq!(proxy.count_sent("\"clientId\":\"via-client\""), via.refreshes as usize, "{url}");
        assert_eq!(proxy.count_sent(".GenerateAssistantResponse"), via.requests as usize, "{url}");
        assert_eq!(proxy.count_sent(".ListAvailableProfiles"), via.profile_requests as usize, "{url}");
        // And none of the other account's.
        assert_eq!(proxy.count_sent("direct-client"), 0, "{url}");
        let tunnels = proxy.tunnels();
        assert!(!tunnels.is_empty(), "{url}");
        for t in &tunnels {
            assert_eq!(t.target, Some(h.emulator.addr().to_string()), "{url}: {t:?}");
            assert!(t.outbound.is_some() && !t.auth_refused, "{url}: {t:?}");
        }
        h.stop().await;
    }
}

/// Log lines the daemon writes in this process (nextest runs each test in a process of its
/// own).
fn capture_logs() -> std::sync::Arc<std::sync::Mutex<Vec<u8>>> {
    struct Writer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Writer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let b = buf.clone();
    let _ = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing::Level::DEBUG)
        .with_writer(move || Writer(b.clone()))
        .try_init();
    buf
}

/// A proxy that refuses the account's password: that account's calls fail, each time with an
/// error that names the proxy and not the password; the other account serves every request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_proxy_password_fails_only_that_account_and_is_never_shown() {
    let logs = capture_logs();
    for (protocol, scheme) in [(Protocol::Socks5, "socks5"), (Protocol::HttpConnect, "http")] {
        let proxy = TestProxy::start(protocol, Some(("amq", "right-pw"))).await;
        let url = proxy.url(scheme, Some(("amq", "wrong-pw-7d1c")));
        let h = Harness::start(via_and_direct(&url)).await;
        for i in 0..6 {
            let r = post(&h, "/v1/messages", &simple(&format!("hello {i}"), i % 2 == 1)).await;
            assert_eq!(r.status, 200, "{url}: {}", r.text());
        }
        let refresh = &ctl_json(&h, &["refresh", "via"]).await[0];
        assert_eq!(refresh["ok"], false, "{refresh}");
        let message = refresh["message"].as_str().unwrap();
        assert!(message.contains(&format!("through proxy {scheme}://amq:***@{}", proxy.addr)), "{message}");
        assert!(message.contains("the proxy refused the user name and password"), "{message}");
        let accounts = ctl_json(&h, &["accounts"]).await;
        assert!(!accounts.to_string().contains("wrong-pw"), "{accounts}");
        // The proxy refused it; nothing of the account went around the proxy.
        assert!(proxy.tunnels().iter().any(|t| t.auth_refused), "{url}");
        assert!(proxy.tunnels().iter().all(|t| t.outbound.is_none()), "{url}: no tunnel opened");
        let via = h.emulator.stats_for(&client_id("via"));
        assert_eq!((via.requests, via.refreshes), (0, 0), "{url}: {via:?}");
        assert!(h.emulator.stats_for(&client_id("direct")).requests >= 6, "{url}");
        h.stop().await;
    }
    let logs = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(logs.contains("the proxy refused the user name and password"), "{logs}");
    assert!(!logs.contains("wrong-pw"), "the password is in the log: {logs}");
}

/// A proxy that is down (it hangs up on every connection, or never answers): its account is
/// failed over at once, never reached directly, and the other account serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_proxy_fails_over_cleanly() {
    for (protocol, scheme) in
        [(Protocol::HangUp, "socks5"), (Protocol::HangUp, "http"), (Protocol::Silent, "socks5h")]
    {
        let proxy = TestProxy::start(protocol, None).await;
        let url = proxy.url(scheme, None);
        let setup = Setup { upstream: "connect_timeout_secs = 1".into(), ..via_and_direct(&url) };
        let h = Harness::start(setup).await;
        for i in 0..4 {
            let r = post(&h, "/v1/messages", &simple(&format!("hello {i}"), i % 2 == 1)).await;
            assert_eq!(r.status, 200, "{url}: {}", r.text());
        }
        assert!(!proxy.tunnels().is_empty(), "{url}: the proxy was tried");
        let via = h.emulator.stats_for(&client_id("via"));
        assert_eq!((via.requests, via.refreshes), (0, 0), "{url}: never around the proxy: {via:?}");
        let refresh = &ctl_json(&h, &["refresh", "via"]).await[0];
        assert_eq!(refresh["ok"], false, "{refresh}");
        assert!(refresh["message"].as_str().unwrap().contains(&format!("through proxy {url}")), "{refresh}");
        h.stop().await;
    }
}

/// A Kiro API key the service refuses (revoked) takes its account out as `invalid`, with the
/// reason; requests fail over; it is never "refreshed".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_api_key_marks_its_account_invalid() {
    let setup = Setup {
        accounts: vec!["backup".into()],
        more_accounts: Some(Box::new(|e| {
            e.add_api_key("ksk_revoked_0123456789");
            "[[account]]\nid = \"key\"\napi_key = \"ksk_revoked_0123456789\"\n".to_owned()
        })),
        ..Default::default()
    };
    let h = Harness::start(setup).await;
    h.emulator.revoke_api_key("ksk_revoked_0123456789");
    for i in 0..4 {
        let r = post(&h, "/v1/messages", &simple(&format!("r{i}"), false)).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let a = h.account("key");
    assert_eq!(a["state"], "invalid", "{a}");
    assert!(a["reason"].as_str().unwrap().contains("API key was refused"), "{a}");
    assert_eq!(h.emulator.stats().refresh_failures, 0, "an API key is never refreshed");
    h.stop().await;
}

/// Requests of one client session stay on one account (with one conversation id) while it is
/// healthy; other sessions spread over the accounts; an account that fails breaks its pins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_stays_on_one_account_while_it_is_healthy() {
    let h = Harness::start(Setup { accounts: vec!["s-1".into(), "s-2".into()], ..Default::default() }).await;
    let ask = |session: &str, n: usize| {
        let body = serde_json::json!({
            "model": "claude-sonnet-4-5-20250929",
            "max_tokens": 64,
            "metadata": {"user_id": format!("user_x_account__session_{session}")},
            "messages": [{"role": "user", "content": format!("turn {n}")}],
        });
        body
    };
    let requests = |id: &str| h.emulator.stats_for(&client_id(id)).requests;
    let conversation = |id: &str| {
        h.emulator.stats_for(&client_id(id)).last_request.unwrap()["conversationState"]["conversationId"]
            .clone()
    };
    assert_eq!(post(&h, "/v1/messages", &ask("aaaa", 0)).await.status, 200);
    let home = if requests("s-1") == 1 { "s-1" } else { "s-2" };
    let other = if home == "s-1" { "s-2" } else { "s-1" };
    let conv = conversation(home);
    for n in 1..8 {
        assert_eq!(post(&h, "/v1/messages", &ask("aaaa", n)).await.status, 200);
    }
    assert_eq!((requests(home), requests(other)), (8, 0), "the session stayed on {home}");
    assert_eq!(conversation(home), conv, "one conversation id for the session");
    // Sessions without an id: the client key and the first message make one.
    let plain = |n: usize| {
        serde_json::json!({
            "model": "claude-sonnet-4-5-20250929", "max_tokens": 64,
            "messages": [{"role": "user", "content": "first words"}, {"role": "assistant", "content": "ok"},
                         {"role": "user", "content": format!("more {n}")}],
        })
    };
    let before = (requests(home), requests(other));
    for n in 0..4 {
        assert_eq!(post(&h, "/v1/messages", &plain(n)).await.status, 200);
    }
    let after = (requests(home), requests(other));
    assert!(after.0 - before.0 == 4 || after.1 - before.1 == 4, "{before:?} → {after:?}");
    // The home account fails: the session moves, and stays on its new account.
    h.emulator.set_behaviour(&client_id(home), Behaviour::Suspended);
    for n in 10..14 {
        assert_eq!(post(&h, "/v1/messages", &ask("aaaa", n)).await.status, 200);
    }
    assert_eq!(h.account(home)["state"], "suspended");
    let moved = requests(other);
    for n in 20..24 {
        assert_eq!(post(&h, "/v1/messages", &ask("aaaa", n)).await.status, 200);
    }
    assert_eq!(requests(other), moved + 4);
    h.stop().await;
}

/// The accounts file is a symlink into a directory that a deployment swaps by moving the old
/// one away and the new one in: for a moment the link leads nowhere, and the new directory
/// appears where nothing is watched. The daemon looks again every second while the link
/// dangles, and applies the new file once it is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlinked_accounts_directory_swapped_in_two_moves_is_applied() {
    let h = Harness::start(Setup::default()).await;
    let dir = h.dir.path();
    let conf = dir.join("srv/conf");
    std::fs::create_dir_all(&conf).unwrap();
    let one = accounts_toml(&["acct-1".to_string()]);
    std::fs::write(conf.join("accounts.toml"), &one).unwrap();
    let accounts = dir.join("accounts.toml");
    std::fs::remove_file(&accounts).unwrap();
    std::os::unix::fs::symlink(conf.join("accounts.toml"), &accounts).unwrap();
    let count = |h: &Harness| h.ctl_json(&["status"])["accounts"].as_array().map_or(0, Vec::len);
    // The watcher follows the new link (a reload of the same set).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(count(&h), 1);
    // The swap: the old directory moved away (the link dangles), then the new one moved in.
    h.emulator.add_account(&client_id("acct-2"), "secret-acct-2", "refresh-acct-2");
    let new = dir.join("srv/conf.new");
    std::fs::create_dir(&new).unwrap();
    std::fs::write(new.join("accounts.toml"), accounts_toml(&["acct-1".to_string(), "acct-2".to_string()]))
        .unwrap();
    std::fs::rename(&conf, dir.join("srv/conf.old")).unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    std::fs::rename(&new, &conf).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while count(&h) != 2 {
        assert!(Instant::now() < deadline, "the swapped-in accounts file was never applied");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    h.stop().await;
}

/// Credentials moved from an id the file drops to one it keeps (`{acct-1: X, acct-2: Y}` become
/// `{acct-1: Y}`): through the daemon's reload and its retries, both accounts keep their live
/// chains until a restart. Before, the dropped id was not recorded as kept, and the retry 10 s
/// later applied the change: acct-1 restarted from Y's long-rotated file token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_moved_from_a_dropped_id_wait_through_the_retries() {
    let h = Harness::start(Setup { accounts: vec!["acct-1".into(), "acct-2".into()], ..Default::default() })
        .await;
    for id in ["acct-1", "acct-2"] {
        assert_eq!(ctl_json(&h, &["refresh", id]).await[0]["ok"], true);
    }
    let text = format!(
        "[[account]]\nid = \"acct-1\"\nclient_id = \"{}\"\nclient_secret = \"secret-acct-2\"\nrefresh_token = \"refresh-acct-2\"\n",
        client_id("acct-2")
    );
    std::fs::write(h.dir.path().join("accounts.toml"), text).unwrap();
    let r = ctl_json(&h, &["reload"]).await;
    assert!(r["warnings"].to_string().contains("swapped"), "{r}");
    // Past a retry (10 s): still waiting, both serving with their own chains.
    tokio::time::sleep(Duration::from_secs(12)).await;
    for id in ["acct-1", "acct-2"] {
        let refreshed = &ctl_json(&h, &["refresh", id]).await[0];
        assert_eq!(refreshed["ok"], true, "{id}: {refreshed}");
    }
    assert_eq!(h.emulator.stats().refresh_failures, 0, "a dead refresh token was presented");
    h.stop().await;
}

/// A social account's profile ARN (named by its refresh) refused by its first endpoint goes on
/// to the other one, and is kept; refused by both, it is forgotten, and the fixed social ARN
/// stands in at once: the request goes through. (Listing profiles is an IAM Identity Center
/// matter; a social account has nothing to list.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_social_accounts_refused_profile_gives_way_to_the_fixed_one() {
    let own = "arn:aws:codewhisperer:us-east-1:123456789012:profile/SOCIALOWN001";
    let setup = Setup {
        accounts: vec![],
        more_accounts: Some(Box::new(move |e: &amq2api::emulator::Emulator| {
            e.add_social_account_as("kiro-social", "social-refresh-1", Some(own));
            "[[account]]\nid = \"kiro-social\"\nrefresh_token = \"social-refresh-1\"\n\n".to_owned()
        })),
        ..Default::default()
    };
    let h = Harness::start(setup).await;
    let r = post(&h, "/v1/messages", &simple("one", false)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let arn = || h.emulator.stats_for("kiro-social").last_request.unwrap()["profileArn"].clone();
    assert_eq!(arn(), own);
    // The runtime stops taking the account: Amazon Q's endpoint takes it, with its own ARN.
    h.emulator.set_role_access("kiro-social", Role::Runtime, Some(false));
    let r = post(&h, "/v1/messages", &simple("two", false)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(arn(), own);
    assert_eq!(h.account("kiro-social")["profile_arn"], own);
    h.emulator.set_role_access("kiro-social", Role::Runtime, None);
    // The account's own profile is gone: the service wants the fixed one now.
    h.emulator.set_profile_arn("kiro-social", None);
    let r = post(&h, "/v1/messages", &simple("three", false)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(arn(), "arn:aws:codewhisperer:us-east-1:699475941385:profile/EHGA3GRVQMUK");
    assert_eq!(h.account("kiro-social")["state"], "active");
    h.stop().await;
}
