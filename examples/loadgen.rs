//! Load generator: the same workloads sent directly to the Amazon Q emulator (the floor: what the
//! upstream costs by itself) and through the daemon, over real HTTP (or HTTPS with `--tls`)
//! connections on 127.0.0.1, with the figures side by side and their ratio.
//!
//! The emulator runs in this process on its own runtime (threads named `emu`, so its CPU time can
//! be told apart from the clients'); the daemon is the release `amq2api` binary run as a
//! subprocess (`--daemon PATH`), configured in a temporary directory to use the emulator, so its
//! CPU time (`/proc/PID/stat`) and RSS (`/proc/PID/status`) are its own.
//!
//! Workloads (`--workloads`, comma-separated, all by default):
//!
//! - `paced`: the same replies from `--paced-clients` clients at a fixed offered load of
//!   `--rate` requests/s in all (below what either path can serve), so that latency is the
//!   daemon's own and not queueing at saturation;
//! - `short`: streamed replies of `--short-chars` characters, closed loop at each of
//!   `--concurrency` (default 1, 50, 500 clients, one keep-alive connection each), `--warmup`
//!   seconds unrecorded then `--duration` seconds measured;
//! - `long`: `--long-requests` replies of `--long-chars` characters (200 kB) in the emulator's small
//!   fragments (1–12 characters), one at a time;
//! - `held`: `--held` streams opened at once and held open for `--hold` seconds while the emulator
//!   sends one fragment every `--held-interval-ms`; the daemon's RSS with them open against idle;
//! - `start`: the daemon stopped and started `--restarts` times with its 1,000 accounts' tokens in
//!   its store, timing spawn → `READY=1` on a `NOTIFY_SOCKET` datagram socket read here;
//! - `reload`: the accounts file rewritten with `--reload-accounts` accounts (10,000), then with one
//!   of them changed; each time `POST /v1/reload` on the control socket, timed.
//!
//! First byte is the first byte of content (the first `assistantResponseEvent` frame directly, the
//! first `content_block_delta` through the daemon): the daemon holds its response until the first
//! content arrives so it can still fail over. Every loop is bounded by a deadline or a count.
//!
//! ```text
//! cargo build --release --bin amq2api --example loadgen
//! target/release/examples/loadgen            # --daemon defaults to the amq2api beside it
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use amq2api::anthropic::request::{self, ApiVersion, Endpoint};
use amq2api::emulator::{Emulator, EmulatorOptions};
use amq2api::translate::{Context, ModelMap, request::to_json, translate};
use anyhow::{Context as _, Result, anyhow, bail};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

const API_KEY: &str = "sk-amq-loadgen-0123456789abcdef";
const MODEL: &str = "claude-sonnet-4-5-20250929";
const Q_TARGET: &str = "AmazonCodeWhispererStreamingService.GenerateAssistantResponse";
/// Clock ticks of `/proc/*/stat` (USER_HZ, 100 on Linux).
const TICK_MS: f64 = 10.0;
/// How long any one exchange may take before it counts as an error.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Parser, Debug, Clone)]
#[command(about = "Direct-to-emulator vs through-daemon load figures (loopback only)")]
struct Args {
    /// The daemon binary (default: the `amq2api` beside this example's directory, else
    /// target/release/amq2api).
    #[arg(long)]
    daemon: Option<PathBuf>,
    /// Accounts the daemon serves from (all registered with the emulator).
    #[arg(long, default_value_t = 1000)]
    accounts: usize,
    /// Workloads to run.
    #[arg(long, value_delimiter = ',', default_value = "short,paced,long,held,start,reload")]
    workloads: Vec<String>,
    /// Client counts for `short`.
    #[arg(long, value_delimiter = ',', default_value = "1,50,500")]
    concurrency: Vec<usize>,
    /// Measured seconds of each `short` run.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Stop each `short` run after this many measured requests (per path) instead of at the end
    /// of `--duration` (which still bounds it): a fixed amount of work, for profilers.
    #[arg(long)]
    requests: Option<usize>,
    /// Offered load of the `paced` workload: requests per second over all its clients.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Clients of the `paced` workload.
    #[arg(long, default_value_t = 50)]
    paced_clients: usize,
    /// Unrecorded seconds before each `short` run (connections, caches).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Characters of a `short` reply.
    #[arg(long, default_value_t = 200)]
    short_chars: usize,
    /// Characters of a `long` reply (about 50k tokens: under the model's 64k output limit).
    #[arg(long, default_value_t = 200_000)]
    long_chars: usize,
    /// Sequential `long` requests per path.
    #[arg(long, default_value_t = 3)]
    long_requests: usize,
    /// Streams held open at once in `held`.
    #[arg(long, default_value_t = 1000)]
    held: usize,
    /// Milliseconds between fragments of a held stream.
    #[arg(long, default_value_t = 1000)]
    held_interval_ms: u64,
    /// Seconds the held streams stay open once all are open.
    #[arg(long, default_value_t = 5.0)]
    hold: f64,
    /// Daemon restarts timed in `start`.
    #[arg(long, default_value_t = 3)]
    restarts: usize,
    /// Accounts in the file `reload` applies.
    #[arg(long, default_value_t = 10_000)]
    reload_accounts: usize,
    /// Serve the daemon over TLS (a throwaway CA made here); the emulator stays plain HTTP.
    #[arg(long)]
    tls: bool,
    /// Keep the temporary directory (config, state, the daemon's log) and print its path.
    #[arg(long)]
    keep_dir: bool,
    /// HAProxy for the third path: HAProxy in front of the emulator, the plain proxy the daemon
    /// is measured against (default: `haproxy` on PATH when there is one; `none` skips it).
    #[arg(long)]
    haproxy: Option<String>,
    /// CPU microseconds the emulator spends on every event frame, each frame then leaving in a
    /// write of its own: an upstream as slow as a Python stand-in (`EmulatorOptions::frame_work`).
    /// 0: full speed.
    #[arg(long, default_value_t = 0)]
    frame_work_us: u64,
    /// Requests through the daemon name a client session (`metadata.user_id`, as Claude Code
    /// sends it), so each one looks up the session's pinned account first.
    #[arg(long)]
    session: bool,
}

// ---------------------------------------------------------------------------------------------
// Process figures

/// utime + stime of a `/proc/.../stat` line, in ms.
fn stat_cpu_ms(stat: &str) -> Option<f64> {
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 * TICK_MS)
}

fn proc_cpu_ms(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|s| stat_cpu_ms(&s)).unwrap_or(0.0)
}

fn rss_kib(pid: u32) -> u64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return 0 };
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// CPU ms of this process's threads: (emulator threads, the rest).
fn self_cpu_split() -> (f64, f64) {
    let (mut emu, mut rest) = (0.0, 0.0);
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else { return (0.0, 0.0) };
    for e in dir.flatten() {
        let p = e.path();
        let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
        let cpu = std::fs::read_to_string(p.join("stat")).ok().and_then(|s| stat_cpu_ms(&s)).unwrap_or(0.0);
        if comm.trim().starts_with("emu") {
            emu += cpu;
        } else {
            rest += cpu;
        }
    }
    (emu, rest)
}

#[derive(Clone, Copy, Default)]
struct CpuSnap {
    daemon: f64,
    emu: f64,
    client: f64,
}

impl CpuSnap {
    fn take(pid: Option<u32>) -> Self {
        let (emu, client) = self_cpu_split();
        CpuSnap { daemon: pid.map(proc_cpu_ms).unwrap_or(0.0), emu, client }
    }
    fn since(self, earlier: CpuSnap) -> CpuSnap {
        CpuSnap {
            daemon: self.daemon - earlier.daemon,
            emu: self.emu - earlier.emu,
            client: self.client - earlier.client,
        }
    }
}

/// Samples a process's RSS every 50 ms until stopped; yields the maximum.
struct RssSampler {
    stop: tokio::sync::watch::Sender<bool>,
    task: JoinHandle<u64>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let (stop, mut rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let mut max = rss_kib(pid);
            // Bounded: at most ten minutes of samples.
            for _ in 0..12_000 {
                tokio::select! {
                    _ = rx.changed() => break,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
                max = max.max(rss_kib(pid));
            }
            max.max(rss_kib(pid))
        });
        RssSampler { stop, task }
    }
    async fn finish(self) -> u64 {
        let _ = self.stop.send(true);
        self.task.await.unwrap_or(0)
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP clients

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Where a client connects and what it sends.
struct Target {
    name: &'static str,
    addr: SocketAddr,
    tls: Option<tokio_rustls::TlsConnector>,
    /// Marks the first content in the response body.
    content_marker: &'static [u8],
    /// Marks the end of a complete response.
    end_marker: &'static [u8],
    /// Builds the request for a prompt.
    build: BuildRequest,
}

type BuildRequest = Box<dyn Fn(&str) -> http::Request<Full<Bytes>> + Send + Sync>;
/// The Amazon Q request for a prompt, shared by the direct and the HAProxy paths.
type SharedBuild = Arc<dyn Fn(&str) -> http::Request<Full<Bytes>> + Send + Sync>;

struct Conn {
    sender: SendRequest<Full<Bytes>>,
    task: JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn connect(t: &Target) -> Result<Conn> {
    let tcp = TcpStream::connect(t.addr).await.with_context(|| format!("connect {}", t.addr))?;
    tcp.set_nodelay(true)?;
    let io: Box<dyn Io> = match &t.tls {
        Some(c) => {
            let name = rustls::pki_types::ServerName::IpAddress(t.addr.ip().into());
            Box::new(c.connect(name, tcp).await.context("TLS handshake")?)
        }
        None => Box::new(tcp),
    };
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(Conn { sender, task })
}

/// One finished exchange.
#[derive(Clone, Copy)]
struct Sample {
    started: Instant,
    first: Duration,
    total: Duration,
    bytes: u64,
}

/// Finds `marker` in `chunk`, also across the boundary with the previous chunk's tail.
fn seen(carry: &mut Vec<u8>, chunk: &[u8], marker: &[u8]) -> bool {
    let found = {
        let mut joined = std::mem::take(carry);
        let head = chunk.len().min(marker.len());
        joined.extend_from_slice(&chunk[..head]);
        joined.windows(marker.len()).any(|w| w == marker) || chunk.windows(marker.len()).any(|w| w == marker)
    };
    let keep = chunk.len().min(marker.len().saturating_sub(1));
    carry.extend_from_slice(&chunk[chunk.len() - keep..]);
    found
}

/// Sends one request on `conn` and reads the response to its end. With `hold`, returns after the
/// first content, handing back the body to keep reading.
async fn exchange(conn: &mut Conn, t: &Target, prompt: &str, min_bytes: u64) -> Result<Sample> {
    let started = Instant::now();
    let (first, body) = open(conn, t, prompt, started).await?;
    let (bytes, tail) = drain(body, first.1, first.2).await?;
    if !tail.windows(t.end_marker.len()).any(|w| w == t.end_marker) {
        bail!("{}: incomplete response (no {:?} at its end)", t.name, String::from_utf8_lossy(t.end_marker));
    }
    if bytes < min_bytes {
        bail!("{}: a reply of {bytes} bytes, shorter than the {min_bytes} characters asked for", t.name);
    }
    Ok(Sample { started, first: first.0, total: started.elapsed(), bytes })
}

type Body = hyper::body::Incoming;

/// Sends the request and reads until the first content: (first-content time, bytes read, tail).
async fn open(
    conn: &mut Conn,
    t: &Target,
    prompt: &str,
    started: Instant,
) -> Result<((Duration, u64, Vec<u8>), Body)> {
    conn.sender.ready().await.context("connection not ready")?;
    let resp = conn.sender.send_request((t.build)(prompt)).await.context("send")?;
    let status = resp.status();
    let mut body = resp.into_body();
    if !status.is_success() {
        let text = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
        bail!("{}: HTTP {status}: {}", t.name, String::from_utf8_lossy(&text[..text.len().min(300)]));
    }
    let mut carry = Vec::new();
    let mut bytes = 0u64;
    let mut tail = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.context("body")?;
        let Ok(data) = frame.into_data() else { continue };
        bytes += data.len() as u64;
        keep_tail(&mut tail, &data);
        if seen(&mut carry, &data, t.content_marker) {
            return Ok(((started.elapsed(), bytes, tail), body));
        }
    }
    bail!("{}: the response ended without content", t.name)
}

fn keep_tail(tail: &mut Vec<u8>, data: &[u8]) {
    tail.extend_from_slice(data);
    if tail.len() > 512 {
        tail.drain(..tail.len() - 512);
    }
}

async fn drain(mut body: Body, mut bytes: u64, mut tail: Vec<u8>) -> Result<(u64, Vec<u8>)> {
    while let Some(frame) = body.frame().await {
        let frame = frame.context("body")?;
        if let Ok(data) = frame.into_data() {
            bytes += data.len() as u64;
            keep_tail(&mut tail, &data);
        }
    }
    Ok((bytes, tail))
}

// ---------------------------------------------------------------------------------------------
// Results

#[derive(Default, Clone)]
struct RunResult {
    samples: Vec<Sample>,
    errors: usize,
    first_error: Option<String>,
    secs: f64,
    cpu: CpuSnap,
    daemon_rss_max: u64,
}

impl RunResult {
    fn rps(&self) -> f64 {
        self.samples.len() as f64 / self.secs.max(1e-9)
    }
    fn pct(&self, p: f64, f: impl Fn(&Sample) -> Duration) -> f64 {
        let mut v: Vec<f64> = self.samples.iter().map(|s| f(s).as_secs_f64() * 1e3).collect();
        if v.is_empty() {
            return f64::NAN;
        }
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[((p / 100.0) * (v.len() - 1) as f64).round() as usize]
    }
    fn fb(&self, p: f64) -> f64 {
        self.pct(p, |s| s.first)
    }
    fn total(&self, p: f64) -> f64 {
        self.pct(p, |s| s.total)
    }
    fn per_req(&self, ms: f64) -> f64 {
        ms / (self.samples.len().max(1)) as f64
    }
}

/// One table row pair: a workload directly and through the daemon.
struct Pair {
    workload: String,
    direct: Option<RunResult>,
    haproxy: Option<RunResult>,
    daemon: Option<RunResult>,
}

fn f(v: f64, digits: usize) -> String {
    if v.is_nan() { "–".into() } else { format!("{v:.digits$}") }
}

fn print_pairs(pairs: &[Pair]) {
    println!();
    println!(
        "| workload | path | requests (errors) | req/s | first byte p50 / p99 ms | total p50 / p99 ms | proxy CPU ms/req | emulator CPU ms/req | client CPU ms/req | proxy RSS max MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for p in pairs {
        for (path, r) in [("direct", &p.direct), ("haproxy", &p.haproxy), ("daemon", &p.daemon)] {
            let Some(r) = r else { continue };
            println!(
                "| {} | {path} | {} ({}) | {} | {} / {} | {} / {} | {} | {} | {} | {} |",
                p.workload,
                r.samples.len(),
                r.errors,
                f(r.rps(), 1),
                f(r.fb(50.0), 2),
                f(r.fb(99.0), 2),
                f(r.total(50.0), 2),
                f(r.total(99.0), 2),
                if path == "direct" { "–".into() } else { f(r.per_req(r.cpu.daemon), 3) },
                f(r.per_req(r.cpu.emu), 3),
                f(r.per_req(r.cpu.client), 3),
                if path == "direct" { "–".into() } else { f(r.daemon_rss_max as f64 / 1024.0, 1) },
            );
        }
        if let (Some(d), Some(x)) = (&p.direct, &p.daemon) {
            println!(
                "| {} | **daemon ÷ direct** | | **{}** | **+{} / +{}** | +{} / +{} | | | | |",
                p.workload,
                f(x.rps() / d.rps(), 2),
                f(x.fb(50.0) - d.fb(50.0), 2),
                f(x.fb(99.0) - d.fb(99.0), 2),
                f(x.total(50.0) - d.total(50.0), 2),
                f(x.total(99.0) - d.total(99.0), 2),
            );
        }
        if let (Some(h), Some(x)) = (&p.haproxy, &p.daemon) {
            println!(
                "| {} | **daemon ÷ HAProxy** | | **{}** | **{:+.2} / {:+.2}** | {:+.2} / {:+.2} | {:+.3} | | | |",
                p.workload,
                f(x.rps() / h.rps(), 2),
                x.fb(50.0) - h.fb(50.0),
                x.fb(99.0) - h.fb(99.0),
                x.total(50.0) - h.total(50.0),
                x.total(99.0) - h.total(99.0),
                x.per_req(x.cpu.daemon) - h.per_req(h.cpu.daemon),
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Workloads

/// How a closed loop runs.
#[derive(Clone, Copy)]
struct Shape {
    clients: usize,
    warmup: Duration,
    duration: Duration,
    max_requests: Option<usize>,
    /// When set, each client sends on a fixed schedule of this interval (or at once when it
    /// is behind): a fixed offered load, below saturation, for latency without queueing.
    pace: Option<Duration>,
}

/// Closed loop: `clients` connections, each sending the next request when the last ends (or,
/// paced, when its next slot comes).
async fn closed_loop(
    t: Arc<Target>,
    prompt: Arc<str>,
    min_bytes: u64,
    shape: Shape,
    daemon_pid: Option<u32>,
) -> RunResult {
    let Shape { clients, warmup, duration, max_requests, pace } = shape;
    let t0 = Instant::now();
    let done = Arc::new(AtomicUsize::new(0));
    let all_done = Arc::new(tokio::sync::Notify::new());
    let measure_from = t0 + warmup;
    let until = measure_from + duration;
    let errors = Arc::new(AtomicUsize::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let mut tasks = Vec::with_capacity(clients);
    for client in 0..clients {
        let (t, prompt, errors, first_error) =
            (t.clone(), prompt.clone(), errors.clone(), first_error.clone());
        let (done, all_done) = (done.clone(), all_done.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            let mut conn: Option<Conn> = None;
            // Paced clients start spread over one interval.
            let mut next_send = pace.map(|p| t0 + p.mul_f64(client as f64 / clients as f64));
            // Bounded by the deadline and by a count.
            for _ in 0..10_000_000u64 {
                if let (Some(at), Some(p)) = (next_send.as_mut(), pace) {
                    tokio::time::sleep_until((*at).into()).await;
                    *at = (*at + p).max(Instant::now() - p);
                }
                if Instant::now() >= until || max_requests.is_some_and(|m| done.load(Ordering::Relaxed) >= m)
                {
                    break;
                }
                let c = match conn.as_mut() {
                    Some(c) => c,
                    None => match connect(&t).await {
                        Ok(c) => conn.insert(c),
                        Err(e) => {
                            note_error(&errors, &first_error, e);
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        }
                    },
                };
                match tokio::time::timeout(EXCHANGE_TIMEOUT, exchange(c, &t, &prompt, min_bytes)).await {
                    Ok(Ok(s)) => {
                        if s.started >= measure_from && s.started < until {
                            out.push(s);
                            let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                            if max_requests == Some(n) {
                                all_done.notify_one();
                            }
                        }
                    }
                    Ok(Err(e)) => {
                        note_error(&errors, &first_error, e);
                        conn = None;
                    }
                    Err(_) => {
                        note_error(&errors, &first_error, anyhow!("exchange timed out"));
                        conn = None;
                    }
                }
            }
            out
        }));
    }
    tokio::time::sleep_until(measure_from.into()).await;
    let errors_before = errors.load(Ordering::Relaxed);
    let cpu0 = CpuSnap::take(daemon_pid);
    let rss = daemon_pid.map(RssSampler::start);
    tokio::select! {
        _ = tokio::time::sleep_until(until.into()) => {}
        _ = all_done.notified() => {}
    }
    let cpu = CpuSnap::take(daemon_pid).since(cpu0);
    let secs = measure_from.elapsed().as_secs_f64();
    let daemon_rss_max = match rss {
        Some(r) => r.finish().await,
        None => 0,
    };
    let mut samples = Vec::new();
    for task in tasks {
        samples.extend(task.await.unwrap_or_default());
    }
    let first_error = first_error.lock().unwrap().clone();
    RunResult {
        samples,
        errors: errors.load(Ordering::Relaxed) - errors_before,
        first_error,
        secs,
        cpu,
        daemon_rss_max,
    }
}

fn note_error(errors: &AtomicUsize, first: &std::sync::Mutex<Option<String>>, e: anyhow::Error) {
    errors.fetch_add(1, Ordering::Relaxed);
    let mut first = first.lock().unwrap();
    if first.is_none() {
        *first = Some(format!("{e:#}"));
    }
}

/// `n` requests one after the other on one connection.
async fn sequential(
    t: Arc<Target>,
    prompt: &str,
    min_bytes: u64,
    n: usize,
    daemon_pid: Option<u32>,
) -> RunResult {
    let cpu0 = CpuSnap::take(daemon_pid);
    let rss = daemon_pid.map(RssSampler::start);
    let t0 = Instant::now();
    let mut r = RunResult::default();
    let mut conn = None;
    for _ in 0..n {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match connect(&t).await {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    r.errors += 1;
                    r.first_error.get_or_insert(format!("{e:#}"));
                    continue;
                }
            },
        };
        match tokio::time::timeout(EXCHANGE_TIMEOUT, exchange(c, &t, prompt, min_bytes)).await {
            Ok(Ok(s)) => r.samples.push(s),
            Ok(Err(e)) => {
                r.errors += 1;
                r.first_error.get_or_insert(format!("{e:#}"));
                conn = None;
            }
            Err(_) => {
                r.errors += 1;
                r.first_error.get_or_insert("exchange timed out".into());
                conn = None;
            }
        }
    }
    r.secs = t0.elapsed().as_secs_f64();
    r.cpu = CpuSnap::take(daemon_pid).since(cpu0);
    if let Some(rss) = rss {
        r.daemon_rss_max = rss.finish().await;
    }
    r
}

/// What holding streams open measured.
struct Held {
    opened: RunResult,
    /// Seconds until every stream had its first content.
    ramp_secs: f64,
    rss_idle: u64,
    rss_held_max: u64,
    rss_held_end: u64,
    rss_after: u64,
    /// CPU over the hold (ms), and the hold's length.
    hold_cpu: CpuSnap,
    hold_secs: f64,
}

/// Opens `n` streams at once, holds them `hold` after the last is open, then drops them all.
async fn hold_streams(
    t: Arc<Target>,
    prompt: Arc<str>,
    n: usize,
    hold: Duration,
    daemon_pid: Option<u32>,
    emulator: &Emulator,
) -> Held {
    let settle = |pid| async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        rss_kib(pid)
    };
    let rss_idle = match daemon_pid {
        Some(pid) => settle(pid).await,
        None => 0,
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (open_tx, mut open_rx) = tokio::sync::mpsc::channel::<Result<Sample, String>>(n.max(1));
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let (t, prompt, open_tx, mut stop) = (t.clone(), prompt.clone(), open_tx.clone(), stop_rx.clone());
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            let opened = async {
                let mut conn = connect(&t).await?;
                let (first, body) = open(&mut conn, &t, &prompt, started).await?;
                anyhow::Ok((conn, first, body))
            };
            let (conn, first, mut body) = match tokio::time::timeout(Duration::from_secs(60), opened).await {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => {
                    let _ = open_tx.send(Err(format!("{e:#}"))).await;
                    return;
                }
                Err(_) => {
                    let _ = open_tx.send(Err("no first content within 60 s".into())).await;
                    return;
                }
            };
            let _ =
                open_tx.send(Ok(Sample { started, first: first.0, total: first.0, bytes: first.1 })).await;
            // Keep reading until told to stop (bounded by the stop signal and a 10-minute cap).
            let cap = tokio::time::sleep(Duration::from_secs(600));
            tokio::pin!(cap);
            loop {
                tokio::select! {
                    _ = stop.changed() => break,
                    _ = &mut cap => break,
                    frame = body.frame() => match frame {
                        Some(Ok(_)) => {}
                        _ => break,
                    },
                }
            }
            drop(body);
            drop(conn);
        }));
    }
    drop(open_tx);
    let mut opened = RunResult::default();
    for _ in 0..n {
        match tokio::time::timeout(Duration::from_secs(90), open_rx.recv()).await {
            Ok(Some(Ok(s))) => opened.samples.push(s),
            Ok(Some(Err(e))) => {
                opened.errors += 1;
                opened.first_error.get_or_insert(e);
            }
            _ => break,
        }
    }
    let ramp_secs = t0.elapsed().as_secs_f64();
    opened.secs = ramp_secs;
    let cpu0 = CpuSnap::take(daemon_pid);
    let h0 = Instant::now();
    let sampler = daemon_pid.map(RssSampler::start);
    tokio::time::sleep(hold).await;
    let rss_held_end = daemon_pid.map(rss_kib).unwrap_or(0);
    let rss_held_max = match sampler {
        Some(s) => s.finish().await,
        None => 0,
    };
    let hold_cpu = CpuSnap::take(daemon_pid).since(cpu0);
    let hold_secs = h0.elapsed().as_secs_f64();
    let _ = stop_tx.send(true);
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    }
    // Wait (bounded) for the emulator to see every stream closed.
    for _ in 0..200 {
        if emulator.stats().open_streams == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rss_after = match daemon_pid {
        Some(pid) => settle(pid).await,
        None => 0,
    };
    Held { opened, ramp_secs, rss_idle, rss_held_max, rss_held_end, rss_after, hold_cpu, hold_secs }
}

// ---------------------------------------------------------------------------------------------
// The daemon subprocess

struct Daemon {
    bin: PathBuf,
    dir: PathBuf,
    /// Bound here and passed as systemd passes a socket: every restart serves the same socket,
    /// and its address is never free for another process.
    listener: std::net::TcpListener,
    child: Option<Child>,
}

/// A command that runs `program args…` with `listener` as its fd 3 (`LISTEN_FDS=1` and
/// `LISTEN_PID` set as systemd sets them; HAProxy takes it as `fd@3`).
fn with_listener(
    program: &Path,
    args: &[&std::ffi::OsStr],
    listener: &std::net::TcpListener,
) -> Result<Command> {
    use std::os::fd::AsRawFd;
    nix::fcntl::fcntl(listener, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()))?;
    let mut c = Command::new("bash");
    // bash, not sh: dash takes only one-digit descriptors in a redirection.
    c.arg("-c")
        .arg("fd=$1; shift; export LISTEN_PID=$$; exec \"$@\" 3<&\"$fd\"")
        .arg("loadgen")
        .arg(listener.as_raw_fd().to_string())
        .arg(program)
        .args(args)
        .env("LISTEN_FDS", "1")
        .env("LISTEN_FDNAMES", "http");
    Ok(c)
}

/// HAProxy in front of the emulator: the third path.
struct Haproxy {
    child: Child,
    addr: SocketAddr,
}

impl Haproxy {
    async fn start(bin: &Path, dir: &Path, upstream: SocketAddr) -> Result<Haproxy> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let cfg = dir.join("haproxy.cfg");
        // Streaming as the daemon must stream: every piece forwarded at once (http-no-delay),
        // keep-alive both ways, upstream connections reused.
        std::fs::write(
            &cfg,
            format!(
                "global\n    nbthread 2\n    maxconn 4000\n\n\
                 defaults\n    mode http\n    option http-no-delay\n    http-reuse always\n    \
                 timeout connect 5s\n    timeout client 130s\n    timeout server 130s\n\n\
                 frontend loadgen\n    bind fd@3\n    default_backend emulator\n\n\
                 backend emulator\n    server emulator {upstream} maxconn 4000\n"
            ),
        )?;
        let log = std::fs::File::create(dir.join("haproxy.log"))?;
        let child = with_listener(bin, &["-db".as_ref(), "-f".as_ref(), cfg.as_os_str()], &listener)?
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?;
        drop(listener);
        // Up when it answers on the socket (a TCP connect is accepted by the kernel alone, so
        // ask for something).
        for _ in 0..200 {
            if let Ok(mut s) = TcpStream::connect(addr).await {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let _ = s.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await;
                let mut b = [0u8; 16];
                if matches!(tokio::time::timeout(Duration::from_millis(200), s.read(&mut b)).await, Ok(Ok(n)) if n > 0)
                {
                    return Ok(Haproxy { child, addr });
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        bail!("HAProxy did not answer within 5 s; see {}/haproxy.log", dir.display())
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The HAProxy binary to use: `--haproxy PATH`, else `haproxy` on PATH; `none`: no third path.
fn find_haproxy(arg: Option<&str>) -> Option<PathBuf> {
    match arg {
        Some("none") => None,
        Some(p) => Some(PathBuf::from(p)),
        None => std::env::var_os("PATH")
            .into_iter()
            .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .chain([PathBuf::from("/usr/sbin")])
            .map(|d| d.join("haproxy"))
            .find(|p| p.is_file()),
    }
}

impl Daemon {
    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Spawns the daemon and waits for `READY=1`; returns the time from spawn to it.
    async fn start(&mut self) -> Result<Duration> {
        let notify_path = self.dir.join("notify.sock");
        let _ = std::fs::remove_file(&notify_path);
        let sock = tokio::net::UnixDatagram::bind(&notify_path)?;
        // The log lives outside the directory of the watched accounts file: a line appended
        // there would wake the daemon's file watcher once per request (as /etc/amq2api holds no
        // log in a real installation).
        let log_dir = self.dir.join("log");
        std::fs::create_dir_all(&log_dir)?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log_dir.join("daemon.log"))?;
        let t0 = Instant::now();
        let config = self.dir.join("amq2api.toml");
        let child = with_listener(&self.bin, &["--config".as_ref(), config.as_os_str()], &self.listener)?
            .env("NOTIFY_SOCKET", &notify_path)
            .env_remove("WATCHDOG_USEC")
            .env_remove("JOURNAL_STREAM")
            .env("RUST_LOG", std::env::var("LOADGEN_DAEMON_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawn {}", self.bin.display()))?;
        self.child = Some(child);
        let mut buf = vec![0u8; 4096];
        let deadline = t0 + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, sock.recv(&mut buf)).await {
                Ok(Ok(n)) => {
                    let msg = String::from_utf8_lossy(&buf[..n]);
                    if msg.lines().any(|l| l == "READY=1") {
                        return Ok(t0.elapsed());
                    }
                }
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => {
                    if let Some(Ok(Some(st))) = self.child.as_mut().map(Child::try_wait) {
                        bail!(
                            "the daemon exited ({st}) before READY=1; see {}/log/daemon.log",
                            self.dir.display()
                        );
                    }
                    bail!("no READY=1 within 30 s; see {}/log/daemon.log", self.dir.display());
                }
            }
        }
    }

    /// SIGTERM, then a bounded wait (SIGKILL after 30 s).
    async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        for _ in 0..600 {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn account_id(i: usize) -> String {
    format!("acct-{i:05}")
}

fn write_accounts(path: &Path, n: usize, label: &str) -> Result<()> {
    let mut s = String::with_capacity(n * 160);
    for i in 0..n {
        let id = account_id(i);
        s.push_str(&format!(
            "[[account]]\nid = \"{id}\"\nlabel = \"{label}\"\nclient_id = \"{id}-client\"\nclient_secret = \"secret-{id}\"\nrefresh_token = \"refresh-{id}\"\n\n"
        ));
    }
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, s)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn register(emulator: &Emulator, from: usize, to: usize) {
    for i in from..to {
        let id = account_id(i);
        emulator.add_account(&format!("{id}-client"), &format!("secret-{id}"), &format!("refresh-{id}"));
    }
}

/// A TLS certificate for 127.0.0.1 from a throwaway CA: (client connector, cert PEM, key PEM).
fn throwaway_tls() -> Result<(tokio_rustls::TlsConnector, String, String)> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "amq2api loadgen CA");
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let params = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])?;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_cert.der().clone())?;
    let mut cfg =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((tokio_rustls::TlsConnector::from(Arc::new(cfg)), cert.pem(), key.serialize_pem()))
}

/// A request to the daemon's control socket (HTTP/1.1 over a Unix socket).
async fn control(socket: &Path, method: &str, path: &str) -> Result<Value> {
    let stream = tokio::net::UnixStream::connect(socket).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))?;
    let resp = sender.send_request(req).await?;
    let body = resp.into_body().collect().await?.to_bytes();
    task.abort();
    Ok(serde_json::from_slice(&body)?)
}

/// GET /health on the daemon: (total, active) accounts.
async fn health(t: &Target) -> Result<(u64, u64)> {
    let mut c = connect(t).await?;
    let req =
        http::Request::get("/health").header("host", t.addr.to_string()).body(Full::new(Bytes::new()))?;
    let resp = c.sender.send_request(req).await?;
    let body = resp.into_body().collect().await?.to_bytes();
    let v: Value = serde_json::from_slice(&body)?;
    Ok((v["accounts"]["total"].as_u64().unwrap_or(0), v["accounts"]["active"].as_u64().unwrap_or(0)))
}

// ---------------------------------------------------------------------------------------------

fn messages_body(prompt: &str) -> Value {
    json!({
        "model": MODEL,
        // The model's most (its catalog's maxOutputTokens; more is a 400): above any reply here,
        // so the daemon never cuts the long reply at max_tokens.
        "max_tokens": 64_000,
        "stream": true,
        "messages": [{"role": "user", "content": prompt}],
    })
}

/// [`messages_body`] as one client session (`--session`).
fn session_body(prompt: &str) -> Value {
    let mut body = messages_body(prompt);
    body["metadata"] = json!({"user_id": "user_loadgen_account__session_0f3c8e2a-loadgen"});
    body
}

fn default_daemon() -> PathBuf {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent()?.parent().map(|d| d.join("amq2api")))
        .filter(|p| p.is_file());
    beside.unwrap_or_else(|| PathBuf::from("target/release/amq2api"))
}

fn machine_line() -> String {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    format!(
        "{cpus} CPUs ({model}); load average {}",
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    )
}

fn main() -> Result<()> {
    let args = Args::parse();
    if std::env::var_os("LOADGEN_LOG").is_some() {
        amq2api::logging::init("warn");
    }
    // The emulator on its own runtime, so its threads (and CPU time) are its own.
    let emu_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("emu")
        .enable_all()
        .build()?;
    let emulator = emu_rt.block_on(Emulator::start(EmulatorOptions {
        frame_work: Duration::from_micros(args.frame_work_us),
        ..Default::default()
    }))?;
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("client")
        .enable_all()
        .build()?;
    // On a worker, not on this thread: a client task and its connection then wake each other on
    // the same worker instead of across threads.
    let result = client_rt
        .block_on(client_rt.spawn(run(args, emulator.clone())))
        .unwrap_or_else(|e| Err(anyhow!("the load generator panicked: {e}")));
    client_rt.shutdown_timeout(Duration::from_secs(5));
    emu_rt.block_on(emulator.shutdown());
    emu_rt.shutdown_timeout(Duration::from_secs(5));
    result
}

async fn run(args: Args, emulator: Emulator) -> Result<()> {
    let want = |w: &str| args.workloads.iter().any(|x| x == w);
    let bin = args.daemon.clone().unwrap_or_else(default_daemon);
    if !bin.is_file() {
        bail!(
            "no daemon binary at {} (cargo build --release --bin amq2api, or --daemon PATH)",
            bin.display()
        );
    }
    println!("# amq2api load generator");
    println!();
    println!("- machine: {}", machine_line());
    println!(
        "- daemon: {} ({}), {} accounts",
        bin.display(),
        if args.tls { "HTTPS" } else { "HTTP" },
        args.accounts
    );

    let tmp = tempfile::Builder::new().prefix("amq2api-loadgen-").tempdir()?;
    let dir = tmp.path().to_path_buf();
    register(&emulator, 0, args.accounts);
    emulator.add_account("direct-client", "direct-secret", "direct-refresh");
    write_accounts(&dir.join("accounts.toml"), args.accounts, "loadgen")?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let (tls_connector, tls_lines) = if args.tls {
        let (connector, cert, key) = throwaway_tls()?;
        std::fs::write(dir.join("cert.pem"), cert)?;
        std::fs::write(dir.join("key.pem"), key)?;
        (Some(connector), "tls_cert = \"cert.pem\"\ntls_key = \"key.pem\"\n")
    } else {
        (None, "")
    };
    std::fs::write(
        dir.join("amq2api.toml"),
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n{tls_lines}drain_timeout_secs = 2\n\
             [auth]\napi_keys = [\"{API_KEY}\"]\n\
             [upstream]\nendpoint = \"{}\"\ntoken_endpoint = \"{}\"\n\
             [accounts]\nfile = \"accounts.toml\"\n[state]\ndir = \"state\"\n\
             [control]\nsocket = \"control.sock\"\n",
            emulator.endpoint(),
            emulator.token_endpoint()
        ),
    )?;

    // The direct path: a token of its own (a separate emulator account, so refresh-token rotation
    // never touches the daemon's), and the Amazon Q body the daemon itself would send.
    let token = direct_token(&emulator).await?;
    let models = ModelMap::default();
    let emu_addr = emulator.addr();
    // The headers the daemon sends with every GenerateAssistantResponse (its user agents, the
    // opt-out, an invocation id, the attempt, what it accepts), so the emulator does the same work
    // for a request on every path: it checks and records them.
    let agent = amq2api::upstream::agent::Agent::new(amq2api::upstream::agent::Agent::new_machine_id());
    let (user_agent, amz_user_agent) = (agent.user_agent("codewhispererstreaming"), agent.amz_user_agent());
    let cache = std::sync::Mutex::new(std::collections::HashMap::<String, Bytes>::new());
    let q_request: SharedBuild = Arc::new(move |prompt: &str| {
        // Translated once per prompt: the client's own cost stays small.
        let q = cache
            .lock()
            .unwrap()
            .entry(prompt.to_string())
            .or_insert_with(|| {
                let body = serde_json::to_vec(&messages_body(prompt)).unwrap();
                let req = request::parse(&body, ApiVersion::default(), Endpoint::Messages).unwrap();
                let t = translate(
                    &req,
                    &Context { models: &models, session_id: None, caps: None, catalog: None },
                )
                .unwrap();
                Bytes::from(serde_json::to_vec(&to_json(&t, None)).unwrap())
            })
            .clone();
        http::Request::post("/")
            .header("host", emu_addr.to_string())
            .header("content-type", "application/x-amz-json-1.0")
            .header("x-amz-target", Q_TARGET)
            .header("authorization", format!("Bearer {token}"))
            .header("user-agent", user_agent.as_str())
            .header("x-amz-user-agent", amz_user_agent.as_str())
            .header("x-amzn-codewhisperer-optout", "true")
            .header("amz-sdk-invocation-id", amq2api::ids::uuid_v4())
            .header("amz-sdk-request", "attempt=1; max=3")
            .header("accept", "application/vnd.amazon.eventstream, application/json")
            .body(Full::new(q))
            .unwrap()
    });
    let q_target = |name: &'static str, addr: SocketAddr| {
        let build = q_request.clone();
        Arc::new(Target {
            name,
            addr,
            tls: None,
            content_marker: b"assistantResponseEvent",
            end_marker: b"meteringEvent",
            build: Box::new(move |prompt| build(prompt)),
        })
    };
    let direct = q_target("direct", emu_addr);
    let haproxy = match find_haproxy(args.haproxy.as_deref()) {
        Some(bin) => Some(Haproxy::start(&bin, &dir, emu_addr).await?),
        None => {
            eprintln!("no haproxy (install it, or --haproxy PATH): two paths only");
            None
        }
    };
    let haproxy_target = haproxy.as_ref().map(|h| q_target("haproxy", h.addr));
    let haproxy_pid = haproxy.as_ref().map(|h| h.child.id());
    if let Some(h) = &haproxy {
        println!("- HAProxy: {} (in front of the emulator, http-no-delay, 2 threads)", h.addr);
    }
    if args.frame_work_us > 0 {
        println!("- emulator slowed: {} µs of CPU a frame, each frame its own write", args.frame_work_us);
    }
    if args.session {
        println!("- requests through the daemon name one client session (metadata.user_id)");
    }
    let host = addr.to_string();
    let session = args.session;
    let daemon_target = Arc::new(Target {
        name: "daemon",
        addr,
        tls: tls_connector,
        content_marker: b"content_block_delta",
        end_marker: b"message_stop",
        build: Box::new(move |prompt| {
            http::Request::post("/v1/messages")
                .header("host", host.as_str())
                .header("content-type", "application/json")
                .header("x-api-key", API_KEY)
                .header("anthropic-version", "2023-06-01")
                .body(Full::new(Bytes::from(
                    if session { session_body(prompt) } else { messages_body(prompt) }.to_string(),
                )))
                .unwrap()
        }),
    });

    let mut daemon = Daemon { bin, dir: dir.clone(), listener, child: None };
    let first_ready = daemon.start().await?;
    let pid = daemon.pid();
    // Every account fetches its first access token in the background: wait for all of them.
    let t0 = Instant::now();
    for _ in 0..1200 {
        if emulator.stats().refreshes as usize >= args.accounts {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let tokens_secs = t0.elapsed().as_secs_f64();
    for _ in 0..200 {
        if matches!(health(&daemon_target).await, Ok((_, a)) if a as usize == args.accounts) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_rss = pid.map(rss_kib).unwrap_or(0);
    println!(
        "- first start (empty store): READY=1 after {:.1} ms; {} access tokens fetched {:.2} s later",
        first_ready.as_secs_f64() * 1e3,
        emulator.stats().refreshes,
        tokens_secs
    );
    println!(
        "- idle RSS with {} accounts (before any request): {:.1} MiB",
        args.accounts,
        idle_rss as f64 / 1024.0
    );

    let mut pairs = Vec::new();
    if want("short") {
        let prompt: Arc<str> = format!("#emulator: long {}\nSay something short.", args.short_chars).into();
        for &c in &args.concurrency {
            let warm = Duration::from_secs_f64(args.warmup);
            let dur = Duration::from_secs_f64(args.duration);
            eprintln!("short, {c} clients: direct…");
            let min = args.short_chars as u64;
            let shape =
                Shape { clients: c, warmup: warm, duration: dur, max_requests: args.requests, pace: None };
            let d = closed_loop(direct.clone(), prompt.clone(), min, shape, pid).await;
            let h = match &haproxy_target {
                Some(t) => {
                    eprintln!("short, {c} clients: through HAProxy…");
                    Some(closed_loop(t.clone(), prompt.clone(), min, shape, haproxy_pid).await)
                }
                None => None,
            };
            eprintln!("short, {c} clients: through the daemon…");
            let x = closed_loop(daemon_target.clone(), prompt.clone(), min, shape, pid).await;
            report_errors(&format!("short c={c}"), &d, &x);
            if let Some(h) = &h {
                report_errors(&format!("short c={c} (HAProxy)"), &d, h);
            }
            pairs.push(Pair {
                workload: format!("short ×{c}"),
                direct: Some(d),
                haproxy: h,
                daemon: Some(x),
            });
        }
    }
    if want("paced") {
        let prompt: Arc<str> = format!("#emulator: long {}\nSay something short.", args.short_chars).into();
        let c = args.paced_clients.max(1);
        let shape = Shape {
            clients: c,
            warmup: Duration::from_secs_f64(args.warmup),
            duration: Duration::from_secs_f64(args.duration),
            max_requests: args.requests,
            pace: Some(Duration::from_secs_f64(c as f64 / args.rate.max(1e-3))),
        };
        let min = args.short_chars as u64;
        eprintln!("paced, {c} clients at {} req/s: direct…", args.rate);
        let d = closed_loop(direct.clone(), prompt.clone(), min, shape, pid).await;
        let h = match &haproxy_target {
            Some(t) => {
                eprintln!("paced, {c} clients at {} req/s: through HAProxy…", args.rate);
                Some(closed_loop(t.clone(), prompt.clone(), min, shape, haproxy_pid).await)
            }
            None => None,
        };
        eprintln!("paced, {c} clients at {} req/s: through the daemon…", args.rate);
        let x = closed_loop(daemon_target.clone(), prompt.clone(), min, shape, pid).await;
        report_errors(&format!("paced c={c}"), &d, &x);
        pairs.push(Pair {
            workload: format!("short ×{c} at {} req/s", args.rate),
            direct: Some(d),
            haproxy: h,
            daemon: Some(x),
        });
    }
    if want("long") {
        let prompt = format!("#emulator: long {}\nWrite a lot.", args.long_chars);
        eprintln!("long: direct…");
        let min = args.long_chars as u64;
        let d = sequential(direct.clone(), &prompt, min, args.long_requests, pid).await;
        let h = match &haproxy_target {
            Some(t) => {
                eprintln!("long: through HAProxy…");
                Some(sequential(t.clone(), &prompt, min, args.long_requests, haproxy_pid).await)
            }
            None => None,
        };
        eprintln!("long: through the daemon…");
        let x = sequential(daemon_target.clone(), &prompt, min, args.long_requests, pid).await;
        report_errors("long", &d, &x);
        let mb =
            |r: &RunResult| r.samples.iter().map(|s| s.bytes).sum::<u64>() as f64 / 1e6 / r.secs.max(1e-9);
        println!();
        println!(
            "- long ({} chars): direct {:.1} MB/s of event stream, daemon {:.1} MB/s of SSE; daemon CPU {:.0} ms/request, emulator {:.0} ms/request",
            args.long_chars,
            mb(&d),
            mb(&x),
            x.per_req(x.cpu.daemon),
            d.per_req(d.cpu.emu)
        );
        pairs.push(Pair { workload: "long 200 kB".into(), direct: Some(d), haproxy: h, daemon: Some(x) });
    }
    if want("held") {
        // A fixed text (a shape directive) with the slow-fragments behaviour: one behaviour
        // applies per request, so `long` here would replace the pacing and stream at full speed.
        // The text has enough fragments to outlast the hold.
        let words = "steady ".repeat(((args.hold * 1000.0 / args.held_interval_ms as f64) as usize + 20) * 2);
        let prompt: Arc<str> = format!(
            "#emulator: text {}\n#emulator: slow-fragments {}\nTake your time.",
            words.trim_end(),
            args.held_interval_ms
        )
        .into();
        let hold = Duration::from_secs_f64(args.hold);
        eprintln!("held: {} streams directly…", args.held);
        let d = hold_streams(direct.clone(), prompt.clone(), args.held, hold, None, &emulator).await;
        eprintln!("held: {} streams through the daemon…", args.held);
        let x = hold_streams(daemon_target.clone(), prompt.clone(), args.held, hold, pid, &emulator).await;
        report_errors("held", &d.opened, &x.opened);
        let per = (x.rss_held_max.saturating_sub(x.rss_idle)) as f64 / x.opened.samples.len().max(1) as f64;
        println!();
        println!(
            "- held: {} of {} streams open through the daemon (all open after {:.2} s; directly {:.2} s). Daemon RSS idle {:.1} MiB, held max {:.1} MiB (end {:.1} MiB), after closing {:.1} MiB: {:.1} KiB a held stream. Daemon CPU while holding: {:.1} ms/s ({:.0} fragments/s).",
            x.opened.samples.len(),
            args.held,
            x.ramp_secs,
            d.ramp_secs,
            x.rss_idle as f64 / 1024.0,
            x.rss_held_max as f64 / 1024.0,
            x.rss_held_end as f64 / 1024.0,
            x.rss_after as f64 / 1024.0,
            per,
            x.hold_cpu.daemon / x.hold_secs,
            x.opened.samples.len() as f64 * 1000.0 / args.held_interval_ms as f64
        );
        let mut dd = d.opened.clone();
        dd.secs = d.ramp_secs;
        let mut xx = x.opened.clone();
        xx.secs = x.ramp_secs;
        xx.daemon_rss_max = x.rss_held_max;
        pairs.push(Pair {
            workload: format!("held ×{} (opening)", args.held),
            direct: Some(dd),
            haproxy: None,
            daemon: Some(xx),
        });
    }
    print_pairs(&pairs);
    let idle_after = pid.map(rss_kib).unwrap_or(0);
    // The daemon gives freed heap back once it has been quiet for a tick or two
    // (`amq2api::memory`): the resident size after three quiet seconds.
    tokio::time::sleep(amq2api::memory::TICK * 3).await;
    let quiet_after = pid.map(rss_kib).unwrap_or(0);
    println!();
    println!(
        "- daemon RSS idle after the workloads: {:.1} MiB at once, {:.1} MiB after {} s quiet",
        idle_after as f64 / 1024.0,
        quiet_after as f64 / 1024.0,
        (amq2api::memory::TICK * 3).as_secs()
    );

    if want("start") {
        let refreshes_before = emulator.stats().refreshes;
        let mut times = Vec::new();
        for _ in 0..args.restarts {
            daemon.stop().await;
            let t = daemon.start().await?;
            times.push(t.as_secs_f64() * 1e3);
            // Let it settle (and prove it answers) before the next stop.
            for _ in 0..100 {
                if health(&daemon_target).await.is_ok() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let idle_restarted = daemon.pid().map(rss_kib).unwrap_or(0);
        println!(
            "- restart with {} accounts' tokens stored: spawn → READY=1 {} ms; token refreshes after the restarts: {}; idle RSS after a restart {:.1} MiB",
            args.accounts,
            times.iter().map(|t| format!("{t:.1}")).collect::<Vec<_>>().join(", "),
            emulator.stats().refreshes - refreshes_before,
            idle_restarted as f64 / 1024.0
        );
    }
    if want("reload") {
        let n = args.reload_accounts;
        register(&emulator, args.accounts, n);
        let socket = dir.join("control.sock");
        let accounts_file = dir.join("accounts.toml");
        let mut times = Vec::new();
        for (what, label) in [
            (format!("{} → {n} accounts", args.accounts), "loadgen"),
            (format!("{n} accounts, one label changed"), "edited"),
        ] {
            if label == "edited" {
                // The same file with one account's label changed.
                let text = std::fs::read_to_string(&accounts_file)?;
                let text = text.replacen("label = \"loadgen\"", "label = \"edited\"", 1);
                std::fs::write(accounts_file.with_extension("toml.tmp"), text)?;
                std::fs::rename(accounts_file.with_extension("toml.tmp"), &accounts_file)?;
            } else {
                write_accounts(&accounts_file, n, label)?;
            }
            let t0 = Instant::now();
            let r = control(&socket, "POST", "/v1/reload").await?;
            let took = t0.elapsed();
            let mut total = 0;
            for _ in 0..400 {
                if let Ok((t, _)) = health(&daemon_target).await {
                    total = t;
                    if t as usize == n {
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            println!(
                "- reload ({what}): POST /v1/reload answered in {:.1} ms (ok: {}, changes: {}); /health total {}",
                took.as_secs_f64() * 1e3,
                r["ok"],
                r["changes"].as_str().unwrap_or("").chars().take(80).collect::<String>(),
                total
            );
            times.push(took);
            // Let the file watcher's own reload (150 ms debounce) pass before the next one.
            tokio::time::sleep(Duration::from_millis(600)).await;
        }
        if let Some(pid) = daemon.pid() {
            println!("- daemon RSS with {n} accounts: {:.1} MiB", rss_kib(pid) as f64 / 1024.0);
        }
    }
    println!();
    println!("- load average at the end: {}", machine_line());
    daemon.stop().await;
    if args.keep_dir {
        let kept = tmp.keep();
        println!("- kept {}", kept.display());
    }
    Ok(())
}

fn report_errors(what: &str, d: &RunResult, x: &RunResult) {
    for (path, r) in [("direct", d), ("daemon", x)] {
        if r.errors > 0 {
            eprintln!(
                "{what} {path}: {} errors; first: {}",
                r.errors,
                r.first_error.as_deref().unwrap_or("?")
            );
        }
    }
}

async fn direct_token(emulator: &Emulator) -> Result<String> {
    let t = Target {
        name: "token",
        addr: emulator.addr(),
        tls: None,
        content_marker: b"",
        end_marker: b"",
        build: Box::new(|_| unreachable!()),
    };
    let mut c = connect(&t).await?;
    let body = json!({"clientId": "direct-client", "clientSecret": "direct-secret",
        "grantType": "refresh_token", "refreshToken": "direct-refresh"});
    let req = http::Request::post("/token")
        .header("host", emulator.addr().to_string())
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))?;
    let resp = c.sender.send_request(req).await?;
    let v: Value = serde_json::from_slice(&resp.into_body().collect().await?.to_bytes())?;
    v["accessToken"].as_str().map(str::to_string).ok_or_else(|| anyhow!("no access token: {v}"))
}
