//! Client compatibility: the official `anthropic` Python SDK, both generations (1.x speaks
//! `anthropic-version: 2023-06-01` with `x-api-key`, 2.x speaks `2026-10-21` with `Authorization:
//! Bearer`), runs `tests/sdk/test_sdk.py` against a daemon and emulator started here.
//!
//! The SDKs live in `target/pysdk/v1` and `target/pysdk/v2` (`bash tests/sdk/install.sh` puts them
//! there; `.ci/run` runs it). A missing one fails the test under CI (`CI` set) and is skipped, with
//! a message, elsewhere.

use crate::common;

use common::*;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Longest a whole Python suite may take.
const SUITE_TIMEOUT: Duration = Duration::from_secs(240);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Copies a child's output, line by line, into this test's output as it arrives.
fn forward<R: Read + Send + 'static>(
    tag: &'static str,
    stream: R,
    to_stderr: bool,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if to_stderr {
                eprintln!("[{tag}] {line}");
            } else {
                println!("[{tag}] {line}");
            }
        }
    })
}

/// Kills the child if the test gives up on it (timeout or panic).
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

async fn run_suite(version: &'static str) {
    let sdk = repo().join("target/pysdk").join(version);
    if !sdk.join("anthropic").is_dir() {
        let msg = format!(
            "the anthropic Python SDK ({version}) is not installed in {}: run `bash tests/sdk/install.sh`",
            sdk.display()
        );
        if std::env::var_os("CI").is_some() {
            panic!("{msg} (CI must install it)");
        }
        eprintln!("SKIPPED sdk_{version}: {msg}");
        return;
    }

    let setup =
        Setup { accounts: vec!["acct-1".into(), "acct-2".into(), "acct-3".into()], ..Default::default() };
    let h = Harness::start(setup).await;
    let status = run_python(version, &sdk, &h).await;
    assert_eq!(h.emulator.stats().rejected_malformed, 0, "the daemon sent Amazon Q a malformed request");
    h.stop().await;
    assert!(status.success(), "tests/sdk/test_sdk.py with SDK {version} failed: {status}");
}

/// Runs the suite in a blocking thread, so the daemon keeps serving on the runtime meanwhile.
async fn run_python(version: &'static str, sdk: &Path, h: &Harness) -> ExitStatus {
    let sdk = sdk.to_path_buf();
    let base_url = format!("http://{}", h.addr);
    tokio::task::spawn_blocking(move || run_python_blocking(version, &sdk, &base_url))
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

fn run_python_blocking(version: &'static str, sdk: &Path, base_url: &str) -> ExitStatus {
    let mut cmd = Command::new("python3");
    cmd.arg(repo().join("tests/sdk/test_sdk.py"))
        .arg("-v")
        .current_dir(repo())
        .env("PYTHONPATH", sdk)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1")
        .env("AMQ2API_BASE_URL", base_url)
        .env("AMQ2API_KEY", API_KEY)
        // Loopback only, whatever proxy the machine is set up with.
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // Nothing from the environment may steer the SDK elsewhere or change its credentials.
    for var in [
        "ANTHROPIC_API_KEY",
        "ANTHROPIC_AUTH_TOKEN",
        "ANTHROPIC_BASE_URL",
        "ANTHROPIC_PROFILE",
        "ANTHROPIC_CONFIG_DIR",
        "ANTHROPIC_LOG",
    ] {
        cmd.env_remove(var);
    }
    let tag: &'static str = if version == "v1" { "py-sdk-v1" } else { "py-sdk-v2" };
    let mut child = KillOnDrop(cmd.spawn().expect("python3 starts"));
    let out = forward(tag, child.0.stdout.take().unwrap(), false);
    let err = forward(tag, child.0.stderr.take().unwrap(), true);
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.0.try_wait().expect("python3 runs") {
            break s;
        }
        assert!(
            started.elapsed() < SUITE_TIMEOUT,
            "tests/sdk/test_sdk.py with SDK {version} did not finish within {SUITE_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = out.join();
    let _ = err.join();
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_v1() {
    run_suite("v1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_v2() {
    run_suite("v2").await;
}
