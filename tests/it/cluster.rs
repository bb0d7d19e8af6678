//! `[cluster]`: several daemons on one real PostgreSQL (a throwaway server started here, in a
//! temp dir, on a Unix socket), the emulator rotating refresh tokens every few seconds.
//!
//! PostgreSQL's server binaries are looked for in /usr/lib/postgresql/*/bin (Debian, Ubuntu;
//! `.ci/run` installs them); without them each test says so and passes without running.

use crate::common;

use amq2api::emulator::{Emulator, EmulatorOptions};
use amq2api::store::postgres::PgStore;
use amq2api::store::{StoreError, TokenRecord};
use bytes::Bytes;
use common::child::{ChildDaemon, write_config};
use common::{API_KEY, client_id};
use http_body_util::Full;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

/// A throwaway PostgreSQL server: `initdb` in a temp dir, `pg_ctl start` on a Unix socket there
/// (as `nobody` when the tests run as root), stopped and removed on drop.
struct Postgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    as_nobody: bool,
    /// Server options beyond the Unix socket (TLS, a TCP port).
    extra: String,
}

impl Postgres {
    /// `None` (with a message) when PostgreSQL's binaries are not installed.
    fn start() -> Option<Postgres> {
        Postgres::start_with(|_| String::new())
    }

    /// [`Postgres::start`], with server options `extra` returns; it is given the server's
    /// directory (to write files into: [`Postgres::own`] gives them to the server's user).
    fn start_with(extra: impl FnOnce(&Path) -> String) -> Option<Postgres> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("bin"))
            .filter(|b| b.join("initdb").exists() && b.join("pg_ctl").exists())
            .max();
        let Some(bin) = bin else {
            eprintln!(
                "SKIPPED: PostgreSQL server binaries not found in /usr/lib/postgresql/*/bin \
                 (apt-get install -y postgresql)"
            );
            return None;
        };
        let dir = tempfile::Builder::new().prefix("amq2api-pg").tempdir().unwrap();
        let as_nobody = nix::unistd::geteuid().is_root();
        if as_nobody {
            let nobody = nix::unistd::User::from_name("nobody").unwrap().expect("a nobody user");
            nix::unistd::chown(dir.path(), Some(nobody.uid), Some(nobody.gid)).unwrap();
        }
        let extra = extra(dir.path());
        let pg = Postgres { bin, dir, as_nobody, extra };
        let data = pg.dir.path().join("data");
        pg.run(
            "initdb",
            &["-D", data.to_str().unwrap(), "-U", "postgres", "--auth=trust", "-N", "-E", "UTF8"],
        );
        pg.resume();
        Some(pg)
    }

    /// Gives `path` to the user the server runs as (a key file must be the server's, 0600).
    fn own(path: &Path) {
        if nix::unistd::geteuid().is_root() {
            let nobody = nix::unistd::User::from_name("nobody").unwrap().expect("a nobody user");
            nix::unistd::chown(path, Some(nobody.uid), Some(nobody.gid)).unwrap();
        }
    }

    /// `pg_ctl start` (again, after [`Postgres::stop`]), waiting until it accepts connections.
    fn resume(&self) {
        let data = self.dir.path().join("data");
        let opts = format!(
            "-k {} -c listen_addresses='' -c fsync=off -c synchronous_commit=off -c full_page_writes=off {}",
            self.dir.path().display(),
            self.extra
        );
        self.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-o",
                &opts,
                "-l",
                self.dir.path().join("log").to_str().unwrap(),
                "-w",
                "start",
            ],
        );
    }

    /// `pg_ctl stop -m immediate`: the server goes away at once (as if its host died).
    fn stop(&self) {
        let data = self.dir.path().join("data");
        self.run("pg_ctl", &["-D", data.to_str().unwrap(), "-m", "immediate", "-w", "stop"]);
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let program = self.bin.join(tool);
        let mut cmd = if self.as_nobody {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]).arg(&program);
            c
        } else {
            Command::new(&program)
        };
        let out = cmd.args(args).current_dir(self.dir.path()).output().unwrap();
        assert!(
            out.status.success(),
            "{tool} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn url(&self) -> String {
        format!("postgresql:///postgres?host={}&user=postgres", self.dir.path().display())
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let program = self.bin.join("pg_ctl");
        let mut cmd = if self.as_nobody {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]).arg(&program);
            c
        } else {
            Command::new(&program)
        };
        let _ = cmd.args(["-D", data.to_str().unwrap(), "-m", "immediate", "-w", "stop"]).output();
    }
}

fn ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("acct-{i}")).collect()
}

async fn emulator(ids: &[String], ttl: Duration) -> Emulator {
    let emu = Emulator::start(EmulatorOptions { access_token_ttl: ttl, ..EmulatorOptions::default() })
        .await
        .unwrap();
    for id in ids {
        emu.add_account(&client_id(id), &format!("secret-{id}"), &format!("refresh-{id}"));
    }
    emu
}

/// A node: its own directory and config ([cluster] on `url`), the shared accounts.
struct Node {
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Node {
    fn new(emu: &Emulator, ids: &[String], url: &str, name: &str, lease_secs: u64) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(dir.path(), emu, ids, "refresh_before_expiry_secs = 60");
        let mut text = std::fs::read_to_string(&config).unwrap();
        text.push_str(&format!(
            "[cluster]\ndatabase_url = \"{url}\"\nnode_id = \"{name}\"\nlease_secs = {lease_secs}\n"
        ));
        std::fs::write(&config, text).unwrap();
        Node { dir, config }
    }

    fn start(&self) -> ChildDaemon {
        let log = self.dir.path().join("log");
        ChildDaemon::start_logged(Command::new(common::child::AMQ2API), &self.config, &[], Some(&log))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }
}

impl Node {
    /// This node's `[auth] keys_file` (named keys with limits), `keys.toml` in its directory.
    fn with_keys(self, keys: &str) -> Node {
        std::fs::write(self.dir.path().join("keys.toml"), keys).unwrap();
        let text = std::fs::read_to_string(&self.config).unwrap();
        std::fs::write(&self.config, text.replacen("[auth]\n", "[auth]\nkeys_file = \"keys.toml\"\n", 1))
            .unwrap();
        self
    }
}

/// Nodes `names` on `pg` (leases of `lease_secs`) serving `ids`, started, once each serves
/// `per_node` accounts (`what`, within `within`).
#[allow(clippy::too_many_arguments)]
fn fleet(
    emu: &Emulator,
    ids: &[String],
    pg: &Postgres,
    names: &[&str],
    lease_secs: u64,
    per_node: u64,
    within: Duration,
    what: &str,
) -> (Vec<Node>, Vec<ChildDaemon>) {
    let nodes: Vec<Node> = names.iter().map(|n| Node::new(emu, ids, &pg.url(), n, lease_secs)).collect();
    let daemons: Vec<ChildDaemon> = nodes.iter().map(|n| n.start()).collect();
    wait_until(within, what, || daemons.iter().all(|d| serving(d) == per_node));
    (nodes, daemons)
}

/// Accounts a node serves now (its `/health` total).
fn serving(d: &ChildDaemon) -> u64 {
    d.health()["accounts"]["total"].as_u64().unwrap_or(0)
}

fn wait_until(within: Duration, what: &str, mut pred: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    loop {
        if pred() {
            return t0.elapsed();
        }
        assert!(t0.elapsed() < within, "no {what} within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One non-streaming request to `addr`; its status (0 when the connection failed).
async fn ask(addr: &str) -> u16 {
    ask_as(addr, API_KEY).await
}

/// [`ask`] with the client key `key`.
async fn ask_as(addr: &str, key: &str) -> u16 {
    let (status, body) = ask_full_as(addr, key).await;
    if status != 200 && status != 0 {
        eprintln!("{addr}: {status} {body}");
    }
    status
}

/// One non-streaming request to `addr`: its status (0 when the connection failed) and body.
async fn ask_full(addr: &str) -> (u16, String) {
    ask_full_as(addr, API_KEY).await
}

async fn ask_full_as(addr: &str, key: &str) -> (u16, String) {
    let req = http::Request::post(format!("http://{addr}/v1/messages"))
        .header("content-type", "application/json")
        .header("x-api-key", key)
        .header("anthropic-version", "2023-06-01")
        .body(Full::new(Bytes::from(common::simple("hello", false).to_string())))
        .unwrap();
    match tokio::time::timeout(Duration::from_secs(20), common::client().request(req)).await {
        Ok(Ok(resp)) => {
            let status = resp.status().as_u16();
            let body = http_body_util::BodyExt::collect(resp.into_body()).await.map(|b| b.to_bytes());
            (status, body.map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default())
        }
        _ => (0, String::new()),
    }
}

/// `GET /health` on `addr`: its status code and JSON body.
fn health_at(addr: &str) -> (u16, serde_json::Value) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let code = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    (code, serde_json::from_str(body).unwrap_or_else(|e| panic!("health is not JSON ({e}): {text}")))
}

/// Clients spread over `addrs` until `stop`: (ok, failed) per address.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<Vec<AtomicU64>>,
    failed: Arc<Vec<AtomicU64>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(rt: &tokio::runtime::Handle, addrs: &[String], live: Arc<Vec<AtomicBool>>) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok: Arc<Vec<AtomicU64>> = Arc::new(addrs.iter().map(|_| AtomicU64::new(0)).collect());
        let failed: Arc<Vec<AtomicU64>> = Arc::new(addrs.iter().map(|_| AtomicU64::new(0)).collect());
        let mut tasks = Vec::new();
        for (i, addr) in addrs.iter().enumerate() {
            for _ in 0..2 {
                let (stop, ok, failed, live, addr) =
                    (stop.clone(), ok.clone(), failed.clone(), live.clone(), addr.clone());
                tasks.push(rt.spawn(async move {
                    while !stop.load(Ordering::SeqCst) {
                        if !live[i].load(Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                        let status = ask(&addr).await;
                        if status == 200 {
                            ok[i].fetch_add(1, Ordering::SeqCst);
                        } else if live[i].load(Ordering::SeqCst) {
                            failed[i].fetch_add(1, Ordering::SeqCst);
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }));
            }
        }
        Load { stop, ok, failed, tasks }
    }

    async fn stop(self) -> (Vec<u64>, Vec<u64>) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            let _ = t.await;
        }
        (
            self.ok.iter().map(|x| x.load(Ordering::SeqCst)).collect(),
            self.failed.iter().map(|x| x.load(Ordering::SeqCst)).collect(),
        )
    }
}

/// Every account's refresh token in PostgreSQL is the emulator's live one (none lost).
///
/// The emulator has rotated a token as soon as it answers, and the daemon stores the new one
/// when the answer has arrived: a refresh that has just happened may be in between. So the
/// check waits up to 5 s for the store to catch up. A lost token never comes back, so the
/// wait hides no loss.
async fn assert_chains_intact(url: &str, emu: &Emulator, ids: &[String]) {
    let store = PgStore::connect(url, "checker", Duration::from_secs(3)).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let mut mismatches = Vec::new();
        for id in ids {
            let live = emu.live_refresh_token(&client_id(id)).expect("the account has a live refresh token");
            let stored = store.get_async(id).await.unwrap().and_then(|r| r.tokens).map(|t| t.refresh_token);
            let intact = match &stored {
                Some(s) => s.expose() == live,
                // Never refreshed: the file's token is still the live one.
                None => live == format!("refresh-{id}"),
            };
            if !intact {
                mismatches.push((id, stored, live));
            }
        }
        let Some((id, stored, live)) = mismatches.into_iter().next() else { return };
        if tokio::time::Instant::now() >= deadline {
            match stored {
                Some(s) => assert_eq!(s.expose(), live, "{id}: the stored refresh token is not the live one"),
                None => assert_eq!(live, format!("refresh-{id}"), "{id}: refreshed, but nothing stored"),
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The fencing rule itself, on the store: a node whose lease expired and was taken over cannot
/// write a token, in the same transaction that checks the epoch; the new holder can.
/// A rotated chain's record holding refresh token `t`.
fn rec(t: &str) -> TokenRecord {
    TokenRecord {
        refresh_token: amq2api::config::Secret::new(t),
        file_fingerprint: [7; 32],
        rotated: true,
        access_token: None,
        access_expires_at: None,
        updated_at: SystemTime::now(),
    }
}

/// Two nodes, `node-a` and `node-b`, on `pg` with leases of `lease`.
async fn two_nodes(pg: &Postgres, lease: Duration) -> (PgStore, PgStore) {
    let a = PgStore::connect(&pg.url(), "node-a", lease).await.unwrap();
    let b = PgStore::connect(&pg.url(), "node-b", lease).await.unwrap();
    (a, b)
}

/// A role that owns the `amq2api` schema (made for it by a DBA) and may not create schemas in
/// the database (least privilege) starts: before, `CREATE SCHEMA IF NOT EXISTS` asked for that
/// right even when the schema existed, and every node failed every start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_without_create_on_the_database_uses_the_schema_made_for_it() {
    let Some(pg) = Postgres::start() else { return };
    let (client, conn) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client
        .batch_execute(
            "CREATE ROLE limited LOGIN; CREATE SCHEMA amq2api AUTHORIZATION limited;
             REVOKE CREATE ON DATABASE postgres FROM PUBLIC;",
        )
        .await
        .unwrap();
    let url = pg.url().replace("user=postgres", "user=limited");
    let store = PgStore::connect(&url, "node-a", Duration::from_secs(5)).await;
    let store = store.unwrap_or_else(|e| panic!("{e}"));
    assert!(store.acquire("x").await.unwrap().is_some());
}

/// Done commands older than a day and nodes silent for a week are pruned; pending commands,
/// recent ones and live nodes stay (before, both tables only grew). And a node's `leaving`
/// mark is its own process's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_commands_and_silent_nodes_are_pruned() {
    let Some(pg) = Postgres::start() else { return };
    let (a, _b) = two_nodes(&pg, Duration::from_secs(5)).await;
    a.heartbeat("ok").await.unwrap();
    let (client, conn) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client
        .batch_execute(
            "INSERT INTO amq2api.commands (account, command, done_by, done_at) VALUES
                 ('x', 'refresh', 'node-a', now() - interval '2 days'),
                 ('x', 'refresh', 'node-a', now() - interval '1 hour');
             INSERT INTO amq2api.commands (account, command) VALUES ('x', 'enable');
             INSERT INTO amq2api.nodes (node_id, started_at, heartbeat_at, lease_ms)
                 VALUES ('gone', now() - interval '30 days', now() - interval '8 days', 5000);",
        )
        .await
        .unwrap();
    assert_eq!(a.prune().await.unwrap(), 2);
    let count = |sql: &'static str| {
        let client = &client;
        async move { client.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
    };
    assert_eq!(count("SELECT count(*) FROM amq2api.commands").await, 2, "the recent and the pending stay");
    assert_eq!(count("SELECT count(*) FROM amq2api.commands WHERE done_at IS NULL").await, 1);
    assert_eq!(count("SELECT count(*) FROM amq2api.nodes WHERE node_id = 'gone'").await, 0);
    assert_eq!(count("SELECT count(*) FROM amq2api.nodes WHERE node_id = 'node-a'").await, 1);
    assert_eq!(a.prune().await.unwrap(), 0);

    // A row left marked as stopping by an earlier process of the same name is cleared by this
    // one's next heartbeat (else no node would count it, nor hand it accounts).
    client.batch_execute("UPDATE amq2api.nodes SET leaving = true WHERE node_id = 'node-a'").await.unwrap();
    a.heartbeat("ok").await.unwrap();
    let (nodes, _) = a.cluster_view().await.unwrap();
    let me = nodes.iter().find(|n| n.node_id == "node-a").unwrap();
    assert!(me.alive && !me.leaving, "{me:?}");
    // Once this process stops, it says so, and its heartbeats go on saying so.
    a.leaving().await.unwrap();
    a.heartbeat("stopping").await.unwrap();
    let (nodes, _) = a.cluster_view().await.unwrap();
    let me = nodes.iter().find(|n| n.node_id == "node-a").unwrap();
    assert!(!me.alive && me.leaving, "{me:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_lost_its_lease_cannot_write_a_token() {
    let Some(pg) = Postgres::start() else { return };
    let lease = Duration::from_secs(2);
    let (a, b) = two_nodes(&pg, lease).await;
    let ha = a.acquire("x").await.unwrap().expect("a free lease");
    assert!(b.acquire("x").await.unwrap().is_none(), "a held lease is not taken");
    a.put_tokens_async("x", &rec("from-a-1")).await.unwrap();
    // A stops renewing (paused); once the lease expires, B takes it over with the next epoch.
    tokio::time::sleep(lease + Duration::from_millis(300)).await;
    let hb = b.acquire("x").await.unwrap().expect("an expired lease is taken over");
    assert_eq!(hb.epoch, ha.epoch + 1);
    b.put_tokens_async("x", &rec("from-b-1")).await.unwrap();
    // A, resumed, still believes it holds the lease: the database says otherwise (a refresh
    // asks it first), and its write is refused.
    assert_eq!(a.held("x"), Some(ha));
    assert!(!a.lease_left("x", Duration::from_millis(100)).await.unwrap());
    assert!(b.lease_left("x", Duration::from_millis(100)).await.unwrap());
    assert!(!b.lease_left("x", Duration::from_secs(10)).await.unwrap(), "the lease is 2 s long");
    assert!(!b.lease_left("y", Duration::ZERO).await.unwrap(), "a lease never taken");
    match a.put_tokens_async("x", &rec("from-a-2")).await {
        Err(StoreError::Fenced { account, epoch }) => assert_eq!((account.as_str(), epoch), ("x", ha.epoch)),
        other => panic!("the stale holder's write went through: {other:?}"),
    }
    // And its renewal tells it so.
    assert!(a.renew().await.unwrap().is_empty());
    assert_eq!(a.held("x"), None);
    let stored = b.get_async("x").await.unwrap().unwrap().tokens.unwrap();
    assert_eq!(stored.refresh_token.expose(), "from-b-1");
    // Migrations ran once, whatever the number of nodes.
    let c = PgStore::connect(&pg.url(), "node-c", lease).await.unwrap();
    drop(c);
}

/// A node whose lease ran out mid-refresh (paused, partitioned) holds the only live refresh
/// token: it may still store it, under its old epoch, while no later holder has stored one;
/// once one has, it never can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_rotated_under_a_lost_lease_is_stored_until_a_later_holder_stores_one() {
    let Some(pg) = Postgres::start() else { return };
    let lease = Duration::from_secs(2);
    let (a, b) = two_nodes(&pg, lease).await;
    let stored = |s: &PgStore| {
        let s = s.clone();
        async move { s.get_async("x").await.unwrap().unwrap().tokens.unwrap().refresh_token.expose().to_owned() }
    };
    let ha = a.acquire("x").await.unwrap().expect("a free lease");
    a.put_tokens_async("x", &rec("from-a-1")).await.unwrap();
    tokio::time::sleep(lease + Duration::from_millis(300)).await;
    // A learns it lost the lease; B has taken it, loaded from-a-1, and stored nothing yet.
    assert!(a.renew().await.unwrap().is_empty());
    assert_eq!(a.held("x"), None);
    let hb = b.acquire("x").await.unwrap().expect("an expired lease is taken over");
    assert_eq!(hb.epoch, ha.epoch + 1);
    assert_eq!(stored(&b).await, "from-a-1");
    // A's refresh, begun under its lease, ends now: the rotated token is stored.
    a.put_tokens_async("x", &rec("from-a-2")).await.unwrap();
    assert_eq!(stored(&b).await, "from-a-2");
    // B (refused with from-a-1) takes from-a-2 and rotates it: its write goes through...
    b.put_tokens_async("x", &rec("from-b-1")).await.unwrap();
    // ...and from then on nothing of A's does.
    match a.put_tokens_async("x", &rec("from-a-3")).await {
        Err(StoreError::Fenced { account, epoch }) => assert_eq!((account.as_str(), epoch), ("x", ha.epoch)),
        other => panic!("the old holder's write went through after the new holder's: {other:?}"),
    }
    assert_eq!(stored(&b).await, "from-b-1");
    // A node that never held the lease writes nothing.
    let c = PgStore::connect(&pg.url(), "node-c", lease).await.unwrap();
    assert!(matches!(c.put_tokens_async("x", &rec("from-c")).await, Err(StoreError::Fenced { .. })));
    assert_eq!(stored(&b).await, "from-b-1");
}

/// An account's state and counters are written only by the node holding its lease: a node
/// that lost it (paused, partitioned) would put its stale view over the new holder's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_lease_holder_writes_an_accounts_state_and_counters() {
    use amq2api::store::{Backend, Counters, StateRecord};
    let Some(pg) = Postgres::start() else { return };
    let lease = Duration::from_secs(2);
    let (a, b) = two_nodes(&pg, lease).await;
    let state = |reason: &str| StateRecord { reason: Some(reason.to_owned()), ..Default::default() };
    let counted = |n: u64| Counters { requests: n, ..Default::default() };
    let write = |s: &PgStore, reason: &'static str, n: u64| {
        let s = s.clone();
        tokio::task::spawn_blocking(move || {
            s.put_states(&[("x".to_owned(), state(reason))]).unwrap();
            s.put_counters(&[("x".to_owned(), counted(n))]).unwrap();
        })
    };
    let stored = |s: &PgStore| {
        let s = s.clone();
        async move {
            let r = s.get_async("x").await.unwrap().unwrap();
            (r.state.reason.unwrap_or_default(), r.counters.requests)
        }
    };
    a.acquire("x").await.unwrap().expect("a free lease");
    write(&a, "from-a", 1).await.unwrap();
    assert_eq!(stored(&b).await, ("from-a".to_owned(), 1));
    // B cannot write what A holds.
    write(&b, "from-b-too-early", 9).await.unwrap();
    assert_eq!(stored(&b).await, ("from-a".to_owned(), 1));
    tokio::time::sleep(lease + Duration::from_millis(300)).await;
    b.acquire("x").await.unwrap().expect("an expired lease is taken over");
    write(&b, "from-b", 2).await.unwrap();
    // A, resumed, still believes it holds the lease: its writes change nothing.
    assert!(a.held("x").is_some());
    write(&a, "from-a-stale", 7).await.unwrap();
    assert_eq!(stored(&b).await, ("from-b".to_owned(), 2));
}

/// Rows that do not decode (damaged, or written by a newer version) are read as the embedded
/// store reads them: a state as `disabled` with its reason (it may hold an operator's `amqctl
/// disable`), counters, identity and catalog as absent, the tokens as they are. Before, one such
/// row stopped every node's start, and an older node could not start once a newer one had
/// written a state it did not know.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_rows_other_than_tokens_stop_no_start() {
    use amq2api::store::{AccountState, Backend, StateRecord};
    let Some(pg) = Postgres::start() else { return };
    let (a, _b) = two_nodes(&pg, Duration::from_secs(5)).await;
    a.acquire("x").await.unwrap().expect("a free lease");
    a.put_tokens_async("x", &rec("rt-x")).await.unwrap();
    let s = a.clone();
    tokio::task::spawn_blocking(move || {
        s.put_states(&[(
            "x".to_owned(),
            StateRecord { state: AccountState::Disabled, ..Default::default() },
        )])
        .unwrap();
    })
    .await
    .unwrap();
    let (client, conn) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client
        .batch_execute(
            "UPDATE amq2api.state SET value = convert_to(replace(convert_from(value, 'SQL_ASCII'), '\"disabled\"', '\"paused\"'), 'SQL_ASCII') WHERE account = 'x';
             INSERT INTO amq2api.counters (account, value) VALUES ('x', '\\xee7b7d') ON CONFLICT (account) DO UPDATE SET value = EXCLUDED.value;
             INSERT INTO amq2api.identity (account, value) VALUES ('x', '\\xee7b7d') ON CONFLICT (account) DO UPDATE SET value = EXCLUDED.value;
             INSERT INTO amq2api.catalog (account, value) VALUES ('x', '\\xee7b7d') ON CONFLICT (account) DO UPDATE SET value = EXCLUDED.value;",
        )
        .await
        .unwrap();
    let all = a.load_all_async().await.unwrap_or_else(|e| panic!("{e}"));
    let one = a.get_async("x").await.unwrap().unwrap();
    for r in [&all["x"], &one] {
        assert_eq!(r.tokens.as_ref().map(|t| t.refresh_token.expose().to_owned()), Some("rt-x".to_owned()));
        assert_eq!(r.state.state, AccountState::Disabled, "{:?}", r.state);
        let reason = r.state.reason.as_deref().unwrap_or_default();
        assert!(reason.contains("unreadable") && reason.contains("paused"), "{reason}");
        assert!(r.identity.is_none() && r.catalog.is_none());
        assert_eq!(r.counters.requests, 0);
    }
}

/// A lease row under a node's name that the node does not hold (its release failed, an
/// acquire's answer was lost, the account left its file) is not renewed by that node: it runs
/// out, and another node takes the account.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_a_node_does_not_hold_runs_out() {
    let Some(pg) = Postgres::start() else { return };
    let lease = Duration::from_secs(2);
    let (a, b) = two_nodes(&pg, lease).await;
    a.acquire("x").await.unwrap().expect("a free lease");
    let ha = a.acquire("y").await.unwrap().expect("a free lease");
    // The same node, knowing only y (x's row is under its name, not in its map).
    let a2 = PgStore::connect(&pg.url(), "node-a", lease).await.unwrap();
    drop(a);
    assert!(a2.acquire("y").await.unwrap().is_none(), "y is held (by node-a's earlier self)");
    let started = Instant::now();
    while started.elapsed() < lease + Duration::from_millis(500) {
        assert!(a2.renew().await.unwrap().is_empty(), "nothing held here");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let hb = b.acquire("x").await.unwrap().expect("the lease nobody holds ran out");
    assert_eq!((ha.epoch, hb.epoch), (1, 2), "taken over from node-a");
    assert!(b.acquire("y").await.unwrap().is_some());
}

/// Three daemons, one PostgreSQL, refresh tokens rotating every few seconds; one node killed
/// under load; then one paused past its lease and resumed.
#[test]
fn three_nodes_share_accounts_and_survive_a_kill_and_a_pause() {
    let Some(pg) = Postgres::start() else { return };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let ids = ids(6);
    // Access tokens live 75 s and refresh 60 s (plus jitter) before expiry: every few seconds.
    let emu = rt.block_on(emulator(&ids, Duration::from_secs(75)));
    let lease_secs = 3;
    let nodes: Vec<Node> =
        ["n1", "n2", "n3"].iter().map(|n| Node::new(&emu, &ids, &pg.url(), n, lease_secs)).collect();
    let mut daemons: Vec<Option<ChildDaemon>> = nodes.iter().map(|n| Some(n.start())).collect();
    let addrs: Vec<String> = daemons.iter().map(|d| d.as_ref().unwrap().addr()).collect();
    // The accounts spread over the nodes: 2 each.
    let spread = wait_until(Duration::from_secs(20), "an even spread", || {
        daemons.iter().all(|d| serving(d.as_ref().unwrap()) == 2)
    });
    eprintln!("spread 2/2/2 after {spread:?}");
    // amqctl status on any node shows the fleet: every node alive with its leases, every account
    // held by exactly one live node.
    let status = daemons[0].as_ref().unwrap().ctl_json(&["status"]).expect("amqctl status --json");
    let cluster = &status["cluster"];
    assert_eq!(cluster["node_id"], "n1", "{cluster}");
    let fleet = cluster["nodes"].as_array().unwrap();
    assert_eq!(fleet.len(), 3, "{cluster}");
    assert!(fleet.iter().all(|n| n["alive"] == true && n["leases"] == 2), "{cluster}");
    let leases = cluster["leases"].as_array().unwrap();
    assert_eq!(leases.len(), 6, "{cluster}");
    assert!(leases.iter().all(|l| l["expires_in_ms"].as_i64().unwrap() > 0), "{cluster}");
    let text = daemons[1].as_ref().unwrap().ctl_text(&["status"]);
    assert!(text.contains("cluster:   this node n2") && text.contains("HELD BY"), "{text}");
    for n in ["n1", "n2", "n3"] {
        assert!(text.lines().any(|l| l.starts_with(n) && l.contains("yes")), "{text}");
    }
    // amqctl refresh from a node that does not hold the account: its holder refreshes it.
    let lease = leases.iter().find(|l| l["node_id"] != "n1").unwrap();
    let elsewhere = lease["account"].as_str().unwrap().to_owned();
    let holder = match lease["node_id"].as_str().unwrap() {
        "n2" => &nodes[1],
        _ => &nodes[2],
    };
    let before = emu.stats_for(&client_id(&elsewhere)).refreshes;
    let r = daemons[0].as_ref().unwrap().ctl_json(&["refresh", &elsewhere]).expect("amqctl refresh");
    assert!(r.to_string().contains("queued for the node that holds it"), "{r}");
    let t0 = Instant::now();
    while !(holder.log().lines().any(|l| l.contains("command from another node") && l.contains(&elsewhere))
        && emu.stats_for(&client_id(&elsewhere)).refreshes > before)
    {
        let log = holder.log();
        let lines: Vec<&str> =
            log.lines().filter(|l| l.contains(&elsewhere) || l.contains("cluster")).collect();
        assert!(
            t0.elapsed() < Duration::from_secs(lease_secs + 2),
            "the holder did not run the queued refresh of {elsewhere} ({} refreshes); its log:\n{}",
            emu.stats_for(&client_id(&elsewhere)).refreshes,
            lines.join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let live: Arc<Vec<AtomicBool>> = Arc::new(addrs.iter().map(|_| AtomicBool::new(true)).collect());
    let load = Load::start(rt.handle(), &addrs, live.clone());
    std::thread::sleep(Duration::from_secs(4));

    // SIGKILL n3 under load: its accounts serve again from the others within lease_secs + 2 s.
    live[2].store(false, Ordering::SeqCst);
    let victim = daemons[2].take().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim.pid()), nix::sys::signal::Signal::SIGKILL)
        .unwrap();
    let killed = Instant::now();
    drop(victim);
    let takeover =
        wait_until(Duration::from_secs(lease_secs + 2), "takeover of the killed node's accounts", || {
            daemons[..2].iter().map(|d| serving(d.as_ref().unwrap())).sum::<u64>() == 6
        });
    eprintln!("takeover after {takeover:?} (lease {lease_secs} s)");
    assert!(killed.elapsed() <= Duration::from_secs(lease_secs + 2));
    std::thread::sleep(Duration::from_secs(3));

    // SIGSTOP n2 past its lease, then SIGCONT: it must not write (nor refresh) what it lost.
    let n2 = nix::unistd::Pid::from_raw(daemons[1].as_ref().unwrap().pid());
    live[1].store(false, Ordering::SeqCst);
    nix::sys::signal::kill(n2, nix::sys::signal::Signal::SIGSTOP).unwrap();
    wait_until(Duration::from_secs(lease_secs + 3), "n1 serving everything", || {
        serving(daemons[0].as_ref().unwrap()) == 6
    });
    std::thread::sleep(Duration::from_secs(2));
    nix::sys::signal::kill(n2, nix::sys::signal::Signal::SIGCONT).unwrap();
    // Back, it rejoins gradually.
    wait_until(Duration::from_secs(15), "n2 rejoining", || serving(daemons[1].as_ref().unwrap()) >= 1);
    live[1].store(true, Ordering::SeqCst);
    std::thread::sleep(Duration::from_secs(3));
    let (ok, failed) = rt.block_on(load.stop());
    eprintln!("requests ok per node {ok:?}, failed {failed:?}");
    assert!(ok.iter().take(2).all(|&n| n > 0), "requests served: {ok:?}");

    let stats = emu.stats();
    eprintln!(
        "emulator: {} refreshes, {} refused, {} overlapping",
        stats.refreshes, stats.refresh_failures, stats.overlapping_refreshes
    );
    assert!(stats.refreshes >= 6, "the refresh tokens rotated: {}", stats.refreshes);
    assert_eq!(stats.refresh_failures, 0, "a refresh token was lost (refused as rotated away)");
    assert_eq!(stats.overlapping_refreshes, 0, "two nodes refreshed one account at once");
    rt.block_on(assert_chains_intact(&pg.url(), &emu, &ids));
    // Each account was one installation whichever node served it: the nodes started at once,
    // each making it a machine id, and every holder took over the one stored (and stored it).
    let stored: Vec<(String, Vec<u8>)> = rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        let rows = client.query("SELECT account, value FROM amq2api.identity", &[]).await.unwrap();
        rows.iter().map(|r| (r.get(0), r.get(1))).collect()
    });
    for id in &ids {
        let machines: std::collections::BTreeSet<String> = emu
            .stats_for(&client_id(id))
            .user_agents
            .iter()
            .filter_map(|ua| amq2api::emulator::installation_of(ua).map(str::to_owned))
            .collect();
        assert_eq!(machines.len(), 1, "{id} looked like several installations: {machines:?}");
        let row = stored.iter().find(|(a, _)| a == id).map(|(_, v)| String::from_utf8_lossy(v).into_owned());
        let machine = machines.first().unwrap();
        assert!(
            row.as_deref().is_some_and(|v| v.contains(machine.as_str())),
            "{id}: stored {row:?}, used {machine}"
        );
    }
    for d in daemons.into_iter().flatten() {
        assert_eq!(d.stop(Duration::from_secs(20)), 0);
    }
    rt.block_on(emu.shutdown());
}

/// The whole cluster restarted: stored access tokens are reused (no refresh storm).
#[test]
fn a_restarted_cluster_reuses_stored_access_tokens() {
    let Some(pg) = Postgres::start() else { return };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let ids = ids(4);
    let emu = rt.block_on(emulator(&ids, Duration::from_secs(3600)));
    let (nodes, daemons) = fleet(
        &emu,
        &ids,
        &pg,
        &["r1", "r2"],
        3,
        2,
        Duration::from_secs(20),
        "every account served, 2 per node",
    );
    // Every account gets its access token (one refresh each).
    for d in &daemons {
        let addr = d.addr();
        for _ in 0..6 {
            assert_eq!(rt.block_on(ask(&addr)), 200);
        }
    }
    wait_until(Duration::from_secs(10), "every account refreshed once", || emu.stats().refreshes == 4);
    for d in daemons {
        assert_eq!(d.stop(Duration::from_secs(20)), 0);
    }
    let before = emu.stats().refreshes;
    let daemons: Vec<ChildDaemon> = nodes.iter().map(|n| n.start()).collect();
    wait_until(Duration::from_secs(20), "every account served again, 2 per node", || {
        daemons.iter().all(|d| serving(d) == 2)
    });
    for d in &daemons {
        let addr = d.addr();
        for _ in 0..6 {
            assert_eq!(rt.block_on(ask(&addr)), 200);
        }
    }
    std::thread::sleep(Duration::from_secs(2));
    let after = emu.stats().refreshes;
    eprintln!("refreshes: {before} before the restart, {after} after");
    assert_eq!(after, before, "the restart refreshed tokens it had stored");
    assert_eq!(emu.stats().refresh_failures, 0);
    for d in daemons {
        assert_eq!(d.stop(Duration::from_secs(20)), 0);
    }
    let _ = Path::new("");
    rt.block_on(emu.shutdown());
}

/// PostgreSQL goes away under a node: the node keeps serving its leased accounts until the
/// leases it renewed last run out, then answers 503 `overloaded_error`, and says why in
/// `/health` and `STATUS=`; PostgreSQL back, the node takes its leases again and serves.
#[test]
fn a_node_that_cannot_reach_postgresql_serves_out_its_leases_then_503_then_recovers() {
    let Some(pg) = Postgres::start() else { return };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let ids = ids(2);
    let emu = rt.block_on(emulator(&ids, Duration::from_secs(3600)));
    let lease_secs = 3;
    let node = Node::new(&emu, &ids, &pg.url(), "p1", lease_secs);
    let notify = common::child::Notify::new(node.dir.path());
    let notify_path = notify.path.to_str().unwrap().to_owned();
    let log = node.dir.path().join("log");
    let d = ChildDaemon::start_logged(
        Command::new(common::child::AMQ2API),
        &node.config,
        &[("NOTIFY_SOCKET", &notify_path)],
        Some(&log),
    );
    let addr = d.addr();
    wait_until(Duration::from_secs(20), "both accounts held", || serving(&d) == 2);
    // Every account has its access token, stored (no refresh is needed while PostgreSQL is
    // away).
    for _ in 0..4 {
        assert_eq!(rt.block_on(ask(&addr)), 200);
    }
    wait_until(Duration::from_secs(10), "both accounts refreshed", || emu.stats().refreshes == 2);
    d.wait_health(Duration::from_secs(5), "every token stored", |h| {
        h["status"] == "ok" && h["accounts"]["tokens_unsaved"] == 0
    });
    assert_eq!(health_at(&addr).0, 200);

    pg.stop();
    let stopped = Instant::now();
    // A refresh while PostgreSQL is away does not start: the node cannot confirm its lease
    // (another node may hold it after a pause this one did not see), and a token rotated now
    // could not be stored anyway.
    let r = d.ctl_text(&["refresh", "acct-0"]);
    eprintln!("amqctl refresh during the outage: {r}");
    assert_eq!(emu.stats().refreshes, 2, "the token endpoint was called: {r}");
    assert!(r.contains("cannot confirm this node's lease"), "{r}");
    // The last renewal was at most one tick (lease / 3) before the stop, and a lease counts
    // here for 0.9 of a lease after its renewal was sent: requests go on being served for at
    // least 0.9 × 3 − 1 = 1.7 s. Ask for the first 1.5 s: all 200.
    let mut served = 0;
    while stopped.elapsed() < Duration::from_millis(1500) {
        let (status, body) = rt.block_on(ask_full(&addr));
        assert_eq!(status, 200, "a request {:?} after PostgreSQL stopped: {body}", stopped.elapsed());
        served += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    // Then, once the leases run out (by 0.9 × lease after the stop), 503 overloaded_error.
    let (status, body) = loop {
        let (status, body) = rt.block_on(ask_full(&addr));
        if status != 200 {
            break (status, body);
        }
        served += 1;
        assert!(stopped.elapsed() < Duration::from_secs(lease_secs), "still serving after the lease ran out");
        std::thread::sleep(Duration::from_millis(50));
    };
    let refused_after = stopped.elapsed();
    eprintln!(
        "served {served} requests for {refused_after:?} after PostgreSQL stopped; then {status} {body}"
    );
    assert_eq!(status, 503, "{body}");
    let err: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(err["type"], "error", "{body}");
    assert_eq!(err["error"]["type"], "overloaded_error", "{body}");
    let message = err["error"]["message"].as_str().unwrap();
    assert!(message.contains("this node serves no account now"), "{message}");
    assert!(
        message.contains("PostgreSQL") || message.contains("postgres"),
        "the reason names the store: {message}"
    );
    // /health: 503, naming the store's problem.
    let (code, h) = health_at(&addr);
    assert_eq!(code, 503, "{h}");
    assert_eq!(h["status"], "unavailable", "{h}");
    assert_eq!(h["store"]["ok"], false, "{h}");
    assert!(h["store"]["problem"].as_str().is_some_and(|p| !p.is_empty()), "{h}");
    // STATUS=: DEGRADED, with the store problem.
    let line = notify.wait_line("STATUS=serving 0/0 accounts", "DEGRADED: ", Duration::from_secs(10));
    assert!(!line.contains("held in memory only"), "nothing was rotated: {line}");

    // PostgreSQL back: the node renews (or takes again) its leases and serves.
    pg.resume();
    let back = Instant::now();
    while !(health_at(&addr).0 == 200 && serving(&d) == 2) {
        assert!(
            back.elapsed() < Duration::from_secs(lease_secs * 3),
            "not serving again; log:\n{}",
            node.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("serving again {:?} after PostgreSQL came back", back.elapsed());
    for _ in 0..4 {
        assert_eq!(rt.block_on(ask(&addr)), 200);
    }
    d.wait_health(Duration::from_secs(5), "no token unsaved", |h| h["accounts"]["tokens_unsaved"] == 0);
    let (code, h) = health_at(&addr);
    assert_eq!((code, &h["status"]), (200, &serde_json::json!("ok")), "{h}");
    assert!(h.get("store").is_none(), "the store problem is gone: {h}");
    notify.wait_line("STATUS=", "serving 2/2 accounts", Duration::from_secs(10));
    // The next refresh uses the live chain.
    rt.block_on(assert_chains_intact(&pg.url(), &emu, &ids));
    d.ctl_text(&["refresh", "acct-0"]);
    assert_eq!(emu.stats().refreshes, 3);
    assert_eq!(emu.stats().refresh_failures, 0, "a refresh token was lost over the outage");
    rt.block_on(assert_chains_intact(&pg.url(), &emu, &ids));
    assert_eq!(d.stop(Duration::from_secs(20)), 0);
    rt.block_on(emu.shutdown());
}

/// A port on 127.0.0.1 that was free a moment ago (PostgreSQL binds its own sockets).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Whether every connection the daemon (application_name amq2api) has open is encrypted, and
/// how many there are; asked over the Unix socket.
async fn amq2api_connections_ssl(pg: &Postgres, port: u16) -> Vec<bool> {
    let url = format!("{}&port={port}", pg.url());
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client
        .query(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.application_name = 'amq2api'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// PostgreSQL over TLS (ssl=on, a certificate for "localhost" signed by a CA made here): a
/// daemon on `sslmode=require` serves, its connections encrypted (pg_stat_ssl); `verify-full`
/// refuses the unknown CA and accepts it given as `sslrootcert=`; `verify-ca` checks the
/// chain but not the name.
#[test]
fn postgresql_over_tls_with_libpq_sslmodes() {
    let port = free_port();
    let ca_pem = std::cell::RefCell::new(PathBuf::new());
    let Some(pg) = Postgres::start_with(|dir| {
        let ca = crate::common::certs::ca();
        let (_, key, cert_pem) = crate::common::certs::server_cert(&ca, "localhost", &["localhost"]);
        let (crt, keyf, ca_file) = (dir.join("server.crt"), dir.join("server.key"), dir.join("ca.pem"));
        std::fs::write(&crt, cert_pem).unwrap();
        std::fs::write(&keyf, key.serialize_pem()).unwrap();
        std::fs::set_permissions(&keyf, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&ca_file, &ca.pem).unwrap();
        for f in [&crt, &keyf, &ca_file] {
            Postgres::own(f);
        }
        *ca_pem.borrow_mut() = ca_file;
        format!(
            "-p {port} -c listen_addresses=127.0.0.1 -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
            crt.display(),
            keyf.display()
        )
    }) else {
        return;
    };
    let ca_pem = ca_pem.into_inner();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let url = |host: &str, query: &str| format!("postgresql://postgres@{host}:{port}/postgres?{query}");
    let lease = Duration::from_secs(3);
    let connect = |u: String| rt.block_on(PgStore::connect(&u, "tls-check", lease));

    // verify-full without sslrootcert checks against the built-in roots: the test CA is not one.
    let e = connect(url("localhost", "sslmode=verify-full")).expect_err("an unknown CA is refused");
    eprintln!("verify-full, unknown CA: {e}");
    assert!(e.to_string().contains("UnknownIssuer"), "{e}");
    let root = format!("sslrootcert={}", ca_pem.display());
    // With the CA: accepted for "localhost", refused for 127.0.0.1 (the name is not in the
    // certificate); verify-ca accepts 127.0.0.1 (chain only).
    connect(url("localhost", &format!("sslmode=verify-full&{root}"))).expect("verify-full with the CA");
    let e = connect(url("127.0.0.1", &format!("sslmode=verify-full&{root}"))).expect_err("a wrong name");
    eprintln!("verify-full, wrong name: {e}");
    assert!(e.to_string().contains("not valid for name"), "{e}");
    connect(url("127.0.0.1", &format!("sslmode=verify-ca&{root}"))).expect("verify-ca with the CA");
    // require + sslrootcert behaves as verify-ca (libpq): another CA's file refuses the server.
    let other = tempfile::NamedTempFile::new().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let other_ca = params.self_signed(&KeyPair::generate().unwrap()).unwrap();
    std::fs::write(other.path(), other_ca.pem()).unwrap();
    let e = connect(url("127.0.0.1", &format!("sslmode=require&sslrootcert={}", other.path().display())))
        .expect_err("require with another CA's root file");
    eprintln!("require + another CA: {e}");
    assert!(e.to_string().contains("UnknownIssuer"), "{e}");
    // An unreadable root file is said as such.
    match connect(url("localhost", "sslmode=verify-full&sslrootcert=/nonexistent/ca.pem")) {
        Err(StoreError::DatabaseUrl(m)) => assert!(m.contains("sslrootcert /nonexistent/ca.pem"), "{m}"),
        other => panic!("{other:?}"),
    }
    // A bad sslmode is a configuration error, not a connection attempt.
    assert!(matches!(connect(url("localhost", "sslmode=allow")), Err(StoreError::DatabaseUrl(_))));

    // A daemon on sslmode=require (no CA given: encryption only, as libpq) serves, encrypted.
    let ids = ids(2);
    let emu = rt.block_on(emulator(&ids, Duration::from_secs(3600)));
    let node = Node::new(&emu, &ids, &url("127.0.0.1", "sslmode=require"), "t1", 3);
    let d = node.start();
    wait_until(Duration::from_secs(20), "both accounts held", || serving(&d) == 2);
    let addr = d.addr();
    for _ in 0..4 {
        assert_eq!(rt.block_on(ask(&addr)), 200);
    }
    let ssl = rt.block_on(amq2api_connections_ssl(&pg, port));
    eprintln!("the daemon's connections, encrypted: {ssl:?}");
    assert!(!ssl.is_empty() && ssl.iter().all(|&s| s), "{ssl:?}");
    assert_eq!(d.stop(Duration::from_secs(20)), 0);
    // And one on verify-full with the CA.
    let node = Node::new(&emu, &ids, &url("localhost", &format!("sslmode=verify-full&{root}")), "t2", 3);
    let d = node.start();
    wait_until(Duration::from_secs(20), "both accounts held", || serving(&d) == 2);
    assert_eq!(rt.block_on(ask(&d.addr())), 200);
    let ssl = rt.block_on(amq2api_connections_ssl(&pg, port));
    assert!(!ssl.is_empty() && ssl.iter().all(|&s| s), "{ssl:?}");
    assert_eq!(d.stop(Duration::from_secs(20)), 0);
    rt.block_on(emu.shutdown());
}

/// `amqctl --json usage --by BY` on `d`: requests and tokens (in + out) of `name`, all days.
fn usage_of(d: &ChildDaemon, by: &str, name: &str) -> (u64, u64) {
    let rows = d.ctl_json(&["usage", "--by", by, "--days", "2"]).expect("amqctl usage");
    rows.as_array()
        .unwrap()
        .iter()
        .filter(|r| r["name"] == name)
        .map(|r| {
            (
                r["requests"].as_u64().unwrap(),
                r["tokens_in"].as_u64().unwrap() + r["tokens_out"].as_u64().unwrap(),
            )
        })
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
}

/// Usage per key is the fleet's under [cluster]: each node adds its batches to the same
/// PostgreSQL rows; `amqctl usage` on either node shows both nodes' requests; `amqctl keys`
/// and the budgets follow the fleet's totals (a key that spent its day's tokens on one node is
/// refused on the other).
#[test]
fn usage_and_budgets_are_the_fleets() {
    const ALICE: &str = "sk-amq-alice-0123456789abcdef";
    const BOB: &str = "sk-amq-bob-0123456789abcdef";
    let Some(pg) = Postgres::start() else { return };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let ids = ids(2);
    let emu = rt.block_on(emulator(&ids, Duration::from_secs(3600)));
    let keys = format!(
        "[[key]]\nname = \"alice\"\nkey = \"{ALICE}\"\ntokens_per_day = 1\n\n[[key]]\nname = \"bob\"\nkey = \"{BOB}\"\n"
    );
    let nodes: Vec<Node> =
        ["u1", "u2"].iter().map(|n| Node::new(&emu, &ids, &pg.url(), n, 3).with_keys(&keys)).collect();
    let daemons: Vec<ChildDaemon> = nodes.iter().map(|n| n.start()).collect();
    wait_until(Duration::from_secs(20), "one account per node", || daemons.iter().all(|d| serving(d) == 1));
    let addrs: Vec<String> = daemons.iter().map(|d| d.addr()).collect();
    // bob: 3 requests on u1, 2 on u2.
    for (addr, n) in addrs.iter().zip([3, 2]) {
        for _ in 0..n {
            assert_eq!(rt.block_on(ask_as(addr, BOB)), 200);
        }
    }
    // Each node shows the fleet's 5 (the other node's last batch is at most a second old).
    for d in &daemons {
        wait_until(Duration::from_secs(5), "bob's 5 requests in amqctl usage", || {
            usage_of(d, "key", "bob").0 == 5
        });
    }
    let (_, bob_tokens) = usage_of(&daemons[1], "key", "bob");
    assert!(bob_tokens > 0);
    let by_account: u64 = ids.iter().map(|id| usage_of(&daemons[0], "account", id).0).sum();
    assert_eq!(by_account, 5, "per account, summed over the fleet");
    // amqctl keys on u2 shows bob's tokens from both nodes.
    wait_until(Duration::from_secs(5), "bob's fleet tokens in amqctl keys on u2", || {
        let k = daemons[1].ctl_json(&["keys"]).unwrap();
        k.as_array().unwrap().iter().any(|k| k["name"] == "bob" && k["tokens_today"] == bob_tokens)
    });
    // alice (1 token a day): one request on u1 spends the day's budget; u2 refuses her within
    // a flush tick or two.
    assert_eq!(rt.block_on(ask_as(&addrs[0], ALICE)), 200);
    let mut attempts = 0;
    let refused = wait_until(Duration::from_secs(5), "u2 refusing alice", || {
        attempts += 1;
        let (status, body) = rt.block_on(ask_full_as(&addrs[1], ALICE));
        assert!(status == 200 || status == 429, "{status} {body}");
        status == 429 && body.contains("daily token budget used up")
    });
    eprintln!("u2 refused alice {refused:?} after she spent her budget on u1");
    let k = daemons[1].ctl_json(&["keys"]).unwrap();
    let alice = k.as_array().unwrap().iter().find(|k| k["name"] == "alice").unwrap().clone();
    assert_eq!(alice["state"], "budget-exhausted", "{alice}");
    for d in daemons {
        assert_eq!(d.stop(Duration::from_secs(20)), 0);
    }
    // What the nodes flushed at their stop is in PostgreSQL: 5 for bob; alice's request on u1
    // and each of her attempts on u2 (a refused request counts as a request).
    let store = rt.block_on(PgStore::connect(&pg.url(), "checker", Duration::from_secs(3))).unwrap();
    let rows = rt.block_on(store.usage_since_async("2000-01-01", None)).unwrap();
    let requests = |name: &str| -> u64 {
        rows.iter().filter(|(k, _)| k.ends_with(&format!("/key/{name}"))).map(|(_, r)| r.requests).sum()
    };
    assert_eq!(requests("bob"), 5);
    assert_eq!(requests("alice"), 1 + attempts);
    rt.block_on(emu.shutdown());
}

/// `amqctl refresh/enable/disable --all` under [cluster]: the asked node acts on the accounts
/// it holds and queues the command for every account another node holds; the answer says how
/// many were queued, and the holders run them.
#[test]
fn all_commands_reach_every_node() {
    let Some(pg) = Postgres::start() else { return };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let ids = ids(4);
    let emu = rt.block_on(emulator(&ids, Duration::from_secs(3600)));
    let (nodes, daemons) =
        fleet(&emu, &ids, &pg, &["q1", "q2"], 3, 2, Duration::from_secs(20), "two accounts per node");
    let held_by_q2: Vec<String> = ids
        .iter()
        .filter(|id| {
            let status = daemons[1].ctl_json(&["status"]).unwrap();
            status["cluster"]["leases"]
                .as_array()
                .unwrap()
                .iter()
                .any(|l| l["account"] == id.as_str() && l["node_id"] == "q2")
        })
        .cloned()
        .collect();
    assert_eq!(held_by_q2.len(), 2, "{held_by_q2:?}");
    let disabled = |d: &ChildDaemon| d.health()["accounts"]["disabled"].as_u64().unwrap_or(0);

    // disable --all from q1: two done on q1, two queued for q2 (which runs them).
    let r = daemons[0].ctl_json(&["disable", "--all"]).expect("amqctl disable --all");
    let rows = r.as_array().unwrap();
    assert_eq!(rows.len(), 4, "{r}");
    assert!(rows.iter().all(|x| x["ok"] == true), "{r}");
    let queued: Vec<&str> =
        rows.iter().filter(|x| x["queued"] == true).map(|x| x["id"].as_str().unwrap()).collect();
    assert_eq!(queued.len(), 2, "{r}");
    assert!(queued.iter().all(|id| held_by_q2.iter().any(|h| h == id)), "{r}");
    assert_eq!(disabled(&daemons[0]), 2);
    wait_until(Duration::from_secs(5), "q2 running the queued disables", || disabled(&daemons[1]) == 2);

    // enable --all from q2 (text): the summary says how many were queued.
    let text = daemons[1].ctl_text(&["enable", "--all"]);
    assert!(text.contains("4 of 4 succeeded (2 here, 2 queued for the nodes that hold them)"), "{text}");
    wait_until(Duration::from_secs(5), "every account enabled again", || {
        daemons.iter().all(|d| disabled(d) == 0 && d.health()["accounts"]["active"] == 2)
    });

    // refresh --all from q1: each account refreshed once, q2's by q2.
    let before: Vec<u64> = ids.iter().map(|id| emu.stats_for(&client_id(id)).refreshes).collect();
    let text = daemons[0].ctl_text(&["refresh", "--all"]);
    assert!(text.contains("4 of 4 succeeded (2 here, 2 queued"), "{text}");
    wait_until(Duration::from_secs(5), "every account refreshed", || {
        ids.iter().zip(&before).all(|(id, b)| emu.stats_for(&client_id(id)).refreshes == b + 1)
    });
    for id in &held_by_q2 {
        assert!(
            nodes[1]
                .log()
                .lines()
                .any(|l| l.contains("command from another node") && l.contains(id.as_str())),
            "q2 ran the refresh of {id}"
        );
    }
    assert_eq!(emu.stats().refresh_failures, 0);
    rt.block_on(assert_chains_intact(&pg.url(), &emu, &ids));

    // export on either node hands out every account's live refresh token, those the other
    // node holds (and has rotated) included: before, q1 gave its own long-dead copy of q2's.
    for d in &daemons {
        let e = d.ctl_json(&["export"]).expect("amqctl export");
        for a in e["accounts"].as_array().unwrap() {
            let id = a["id"].as_str().unwrap();
            let live = emu.live_refresh_token(&client_id(id)).unwrap();
            assert_eq!(a["refresh_token"], live.as_str(), "{id}: a dead refresh token exported");
            assert_eq!(a["rotated"], true, "{id}");
        }
    }
    for d in daemons {
        assert_eq!(d.stop(Duration::from_secs(20)), 0);
    }
    rt.block_on(emu.shutdown());
}

/// An account removed from a node's file while its token refresh is at the token endpoint:
/// the node keeps the lease until the rotated token is stored (given up at once, the answer's
/// write was fenced and the chain lost: the next holder met `invalid_grant`).
#[test]
fn an_account_removed_during_its_refresh_keeps_its_lease_until_the_token_is_stored() {
    let Some(pg) = Postgres::start() else { return };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let ids = ids(2);
    let emu = rt.block_on(async {
        let emu = Emulator::start(EmulatorOptions {
            token_delay: Duration::from_millis(2500),
            ..EmulatorOptions::default()
        })
        .await
        .unwrap();
        for id in &ids {
            emu.add_account(&client_id(id), &format!("secret-{id}"), &format!("refresh-{id}"));
        }
        emu
    });
    let node = Node::new(&emu, &ids, &pg.url(), "r1", 3);
    let d = node.start();
    wait_until(Duration::from_secs(30), "both accounts served", || serving(&d) == 2);
    let before = emu.stats_for(&client_id("acct-0")).refreshes;
    let socket = node.dir.path().join("control.sock");
    let refresh = std::thread::spawn(move || {
        Command::new(common::child::AMQCTL)
            .arg("--socket")
            .arg(&socket)
            .args(["refresh", "acct-0"])
            .output()
            .unwrap()
    });
    // The refresh is at the token endpoint (2.5 s): remove the account meanwhile.
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(node.dir.path().join("accounts.toml"), common::accounts_toml(&ids[1..])).unwrap();
    d.ctl_json(&["reload"]).expect("amqctl reload");
    let out = refresh.join().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(emu.stats_for(&client_id("acct-0")).refreshes, before + 1);
    // The rotated token is the stored one, and the lease goes once it is.
    rt.block_on(assert_chains_intact(&pg.url(), &emu, &ids[..1]));
    wait_until(Duration::from_secs(10), "acct-0's lease given up", || {
        let status = d.ctl_json(&["status"]).unwrap();
        !status["cluster"]["leases"].as_array().unwrap().iter().any(|l| {
            l["account"] == "acct-0" && l["node_id"] == "r1" && l["expires_in_ms"].as_i64().unwrap_or(0) > 0
        })
    });
    assert_eq!(d.stop(Duration::from_secs(30)), 0);
    assert_eq!(emu.stats().refresh_failures, 0);
    rt.block_on(emu.shutdown());
}

/// PostgreSQL away for longer than a lease (every lease and heartbeat stale): the first node
/// back takes no more than its share in a tick, and each node serves its share again within a
/// few ticks. Before, the first node back saw itself alone and took every account, and the
/// others got theirs back one rebalancing at a time (minutes with many accounts), while the
/// load balancer sent them their full share of requests.
#[test]
fn after_a_postgresql_outage_the_nodes_share_the_accounts_again_at_once() {
    let Some(pg) = Postgres::start() else { return };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let ids = ids(30);
    let emu = rt.block_on(emulator(&ids, Duration::from_secs(3600)));
    let (_nodes, daemons) =
        fleet(&emu, &ids, &pg, &["o1", "o2", "o3"], 3, 10, Duration::from_secs(40), "ten accounts per node");
    pg.stop();
    std::thread::sleep(Duration::from_secs(6));
    pg.resume();
    let took = wait_until(Duration::from_secs(8), "every node serving its share again", || {
        daemons.iter().all(|d| serving(d) >= 8)
    });
    eprintln!("shared again {took:?} after PostgreSQL came back");
    for d in daemons {
        assert_eq!(d.stop(Duration::from_secs(20)), 0);
    }
    assert_eq!(emu.stats().refresh_failures, 0);
    rt.block_on(emu.shutdown());
}

/// A node stopped while it serves a long answer gives up its other accounts at once: the other
/// node serves them at its next tick, not after their leases run out (here 15 s: a rolling
/// restart took a node's share of the fleet out for that long). The long answer completes.
#[test]
fn a_stopping_node_gives_up_its_idle_accounts_at_once() {
    let Some(pg) = Postgres::start() else { return };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let ids = ids(4);
    let emu = rt.block_on(emulator(&ids, Duration::from_secs(3600)));
    let (_nodes, daemons) =
        fleet(&emu, &ids, &pg, &["s1", "s2"], 15, 2, Duration::from_secs(40), "two accounts per node");
    let addr = daemons[0].addr();
    let long = rt.spawn(async move {
        let req = http::Request::post(format!("http://{addr}/v1/messages"))
            .header("content-type", "application/json")
            .header("x-api-key", API_KEY)
            .header("anthropic-version", "2023-06-01")
            .body(Full::new(Bytes::from(
                common::simple("slow\n#emulator: slow-fragments 700", false).to_string(),
            )))
            .unwrap();
        let resp = common::client().request(req).await.unwrap();
        resp.status().as_u16()
    });
    std::thread::sleep(Duration::from_millis(500));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(daemons[0].pid()), nix::sys::signal::Signal::SIGTERM)
        .unwrap();
    let took =
        wait_until(Duration::from_secs(10), "s2 serving s1's idle accounts", || serving(&daemons[1]) >= 3);
    eprintln!("s2 took s1's idle accounts {took:?} after the stop");
    assert_eq!(rt.block_on(long).unwrap(), 200, "the long answer did not complete");
    let mut daemons = daemons.into_iter();
    assert_eq!(daemons.next().unwrap().stop(Duration::from_secs(30)), 0);
    let s2 = daemons.next().unwrap();
    wait_until(Duration::from_secs(10), "s2 serving every account", || serving(&s2) == 4);
    assert_eq!(emu.stats().refresh_failures, 0);
    assert_eq!(s2.stop(Duration::from_secs(20)), 0);
    rt.block_on(emu.shutdown());
}

/// What PostgreSQL has done so far (pg_stat_database for the database, pg_stat_statements
/// for the daemons' statements).
#[derive(Debug, Clone, Copy, Default)]
struct PgLoad {
    statements: i64,
    xact_commit: i64,
    tup_written: i64,
    tup_read: i64,
    blks: i64,
}

impl std::ops::Sub for PgLoad {
    type Output = PgLoad;
    fn sub(self, o: PgLoad) -> PgLoad {
        PgLoad {
            statements: self.statements - o.statements,
            xact_commit: self.xact_commit - o.xact_commit,
            tup_written: self.tup_written - o.tup_written,
            tup_read: self.tup_read - o.tup_read,
            blks: self.blks - o.blks,
        }
    }
}

async fn pg_load(pg: &Postgres) -> PgLoad {
    let (client, conn) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let s = client
        .query_one(
            "SELECT coalesce(sum(calls), 0)::int8 FROM pg_stat_statements s JOIN pg_roles r ON r.oid = s.userid
             WHERE query NOT ILIKE '%pg_stat%' AND query NOT ILIKE 'CREATE EXTENSION%'",
            &[],
        )
        .await
        .unwrap();
    let d = client
        .query_one(
            "SELECT xact_commit, tup_inserted + tup_updated + tup_deleted, tup_returned + tup_fetched,
                 blks_read + blks_hit
             FROM pg_stat_database WHERE datname = 'postgres'",
            &[],
        )
        .await
        .unwrap();
    PgLoad {
        statements: s.get(0),
        xact_commit: d.get(0),
        tup_written: d.get(1),
        tup_read: d.get(2),
        blks: d.get(3),
    }
}

/// A measurement, not a check (README "Several nodes": PostgreSQL load per 1,000 requests): two
/// nodes, 4 accounts, `lease_secs = 15` (the default); the load of 20 idle seconds (heartbeats,
/// leases, the fleet budgets' reads), then of 1,000 requests, from pg_stat_statements and
/// pg_stat_database. Run: `cargo nextest run --run-ignored only -E 'test(pg_load)' --no-capture`.
#[test]
#[ignore = "a measurement; prints figures, asserts nothing about them"]
fn pg_load_per_1000_requests() {
    let Some(pg) = Postgres::start_with(|_| "-c shared_preload_libraries=pg_stat_statements".into()) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        client.batch_execute("CREATE EXTENSION pg_stat_statements").await.unwrap();
    });
    let ids = ids(4);
    let emu = rt.block_on(emulator(&ids, Duration::from_secs(3600)));
    let (_nodes, daemons) =
        fleet(&emu, &ids, &pg, &["m1", "m2"], 15, 2, Duration::from_secs(60), "two accounts per node");
    let addrs: Vec<String> = daemons.iter().map(|d| d.addr()).collect();
    // Every account with its access token first (the refreshes are not part of the steady state).
    for addr in &addrs {
        for _ in 0..8 {
            assert_eq!(rt.block_on(ask(addr)), 200);
        }
    }
    std::thread::sleep(Duration::from_secs(3));
    let idle_secs = 20.0;
    let a = rt.block_on(pg_load(&pg));
    std::thread::sleep(Duration::from_secs_f64(idle_secs));
    let b = rt.block_on(pg_load(&pg));
    let idle = b - a;
    // 1,000 requests as fast as 4 clients go, then 1,000 paced at about 100 a second.
    let mut before = b;
    for (label, pause) in [("at full speed", Duration::ZERO), ("at ~100/s", Duration::from_millis(40))] {
        let t0 = Instant::now();
        let n = 1000;
        rt.block_on(async {
            let next = Arc::new(AtomicU64::new(0));
            let mut tasks = Vec::new();
            for c in 0..4 {
                let (addr, next) = (addrs[c % 2].clone(), next.clone());
                tasks.push(tokio::spawn(async move {
                    while next.fetch_add(1, Ordering::SeqCst) < n {
                        assert_eq!(ask(&addr).await, 200);
                        tokio::time::sleep(pause).await;
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
        });
        let busy_secs = t0.elapsed().as_secs_f64();
        // The last usage batch and the statistics' own flush (about a second).
        std::thread::sleep(Duration::from_secs(2));
        let after = rt.block_on(pg_load(&pg));
        let window = t0.elapsed().as_secs_f64();
        let busy = after - before;
        before = after;
        eprintln!("{n} requests {label} in {busy_secs:.1} s (window {window:.1} s): {busy:?}");
        for (name, x, i) in [
            ("statements", busy.statements, idle.statements),
            ("transactions committed", busy.xact_commit, idle.xact_commit),
            ("rows written", busy.tup_written, idle.tup_written),
            ("rows read", busy.tup_read, idle.tup_read),
            ("buffer accesses", busy.blks, idle.blks),
        ] {
            let above = (x as f64 - i as f64 / idle_secs * window).max(0.0);
            eprintln!("  {name}: {x} in the window, {above:.0} above the idle rate");
        }
    }
    for d in daemons {
        assert_eq!(d.stop(Duration::from_secs(20)), 0);
    }
    rt.block_on(emu.shutdown());
}

/// A node that holds no lease (more nodes than accounts): `/health` answers 503 `unavailable`
/// (a front end routing on it sends it nothing) and a request 503 `overloaded_error`.
#[test]
fn a_node_holding_no_lease_is_unavailable() {
    let Some(pg) = Postgres::start() else { return };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let ids = ids(1);
    let emu = rt.block_on(emulator(&ids, Duration::from_secs(3600)));
    let nodes: Vec<Node> = ["h1", "h2"].iter().map(|n| Node::new(&emu, &ids, &pg.url(), n, 3)).collect();
    let first = nodes[0].start();
    wait_until(Duration::from_secs(20), "h1 holding the account", || serving(&first) == 1);
    let second = nodes[1].start();
    let addr = second.addr();
    // Give h2 a few ticks: the account stays with h1 (its share is ceil(1 / 2) = 1).
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(serving(&first), 1);
    let (code, h) = health_at(&addr);
    assert_eq!(code, 503, "{h}");
    assert_eq!(h["status"], "unavailable", "{h}");
    assert_eq!(h["accounts"]["total"], 0, "{h}");
    assert!(h.get("store").is_none(), "no store problem: {h}");
    let (status, body) = rt.block_on(ask_full(&addr));
    assert_eq!(status, 503, "{body}");
    let err: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(err["error"]["type"], "overloaded_error", "{body}");
    assert!(body.contains("every account is served by other nodes"), "{body}");
    assert_eq!(health_at(&first.addr()).0, 200);
    for d in [first, second] {
        assert_eq!(d.stop(Duration::from_secs(20)), 0);
    }
    rt.block_on(emu.shutdown());
}

/// A live reload on a cluster node: an account added to the file is served (its stored state
/// read back from PostgreSQL, not from a blocking call on a runtime worker), one removed is
/// dropped, and the node keeps taking reloads and requests.
#[test]
fn a_cluster_node_takes_accounts_added_and_removed_by_a_reload() {
    let Some(pg) = Postgres::start() else { return };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let all = ids(3);
    let emu = rt.block_on(emulator(&all, Duration::from_secs(3600)));
    let node = Node::new(&emu, &all[..2], &pg.url(), "l1", 3);
    let d = node.start();
    wait_until(Duration::from_secs(20), "both accounts served", || serving(&d) == 2);
    assert_eq!(rt.block_on(ask(&d.addr())), 200);

    let accounts = node.dir.path().join("accounts.toml");
    std::fs::write(&accounts, common::accounts_toml(&all)).unwrap();
    let r = d.ctl_json(&["reload"]).unwrap_or_else(|| panic!("amqctl reload failed: {}", node.log()));
    assert!(r["ok"] == true && r["changes"].as_str().unwrap().contains("acct-2"), "{r}");
    wait_until(Duration::from_secs(20), "the added account served", || serving(&d) == 3);
    for _ in 0..6 {
        assert_eq!(rt.block_on(ask(&d.addr())), 200);
    }

    std::fs::write(&accounts, common::accounts_toml(&all[1..])).unwrap();
    let r = d.ctl_json(&["reload"]).unwrap_or_else(|| panic!("amqctl reload failed: {}", node.log()));
    assert!(r["ok"] == true && r["changes"].as_str().unwrap().contains("acct-0"), "{r}");
    wait_until(Duration::from_secs(20), "the removed account dropped", || serving(&d) == 2);
    assert_eq!(rt.block_on(ask(&d.addr())), 200);
    // Its lease is given up (renewed on, it counted towards this node's share, and nodes whose
    // file still has the account could not serve it).
    wait_until(Duration::from_secs(10), "the removed account's lease given up", || {
        let status = d.ctl_json(&["status"]).unwrap();
        !status["cluster"]["leases"].as_array().unwrap().iter().any(|l| {
            l["account"] == "acct-0" && l["node_id"] == "l1" && l["expires_in_ms"].as_i64().unwrap_or(0) > 0
        })
    });
    assert!(!node.log().contains("panicked"), "{}", node.log());
    assert_eq!(d.stop(Duration::from_secs(20)), 0);
    rt.block_on(emu.shutdown());
}
