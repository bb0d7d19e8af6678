//! `amq2api demo`: the embedded Amazon Q emulator and the daemon in one process, with a temporary
//! state directory, a generated API key and three emulated accounts — everything works end to
//! end with no credentials.

use crate::config::{self, Env};
use crate::emulator::{Emulator, EmulatorOptions};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// A demo set-up written to a temporary directory.
pub struct Demo {
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub api_key: String,
    pub emulator: Emulator,
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn random_hex(n: usize) -> String {
    hex::encode(crate::ids::random_bytes::<16>())[..n].to_string()
}

/// Starts the emulator, registers three accounts with it and writes `amq2api.toml` and
/// `accounts.toml` for a daemon listening on `listen`.
pub async fn prepare(listen: SocketAddr) -> std::io::Result<Demo> {
    let dir = std::env::temp_dir().join(format!("amq2api-demo-{}", random_hex(12)));
    std::fs::create_dir_all(dir.join("state"))?;
    let emulator = Emulator::start(EmulatorOptions::default()).await?;
    let mut accounts = String::from("# Emulated accounts of `amq2api demo`.\n");
    for i in 1..=3 {
        let (cid, secret, rt) =
            (format!("demo-client-{i}"), random_hex(24), format!("demo-refresh-{}", random_hex(16)));
        emulator.add_account(&cid, &secret, &rt);
        accounts.push_str(&format!(
            "\n[[account]]\nid = \"demo-{i}\"\nlabel = \"Emulated account {i}\"\nclient_id = \"{cid}\"\nclient_secret = \"{secret}\"\nrefresh_token = \"{rt}\"\n"
        ));
    }
    write_private(&dir.join("accounts.toml"), &accounts)?;
    let api_key = format!("sk-amq-demo-{}", random_hex(24));
    let config_text = format!(
        r#"# Written by `amq2api demo`.
[server]
listen = ["{listen}"]
allow_plaintext = true
drain_timeout_secs = 2

[auth]
api_keys = ["{api_key}"]

[upstream]
endpoint = "{endpoint}"
token_endpoint = "{token}"

[accounts]
file = "accounts.toml"

[state]
dir = "state"

[control]
socket = "control.sock"
"#,
        endpoint = emulator.endpoint(),
        token = emulator.token_endpoint(),
    );
    let config_path = dir.join("amq2api.toml");
    write_private(&config_path, &config_text)?;
    Ok(Demo { dir, config_path, api_key, emulator })
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    std::io::Write::write_all(&mut f, text.as_bytes())
}

/// What the demo prints for a person.
pub fn banner(addr: SocketAddr, demo: &Demo) -> String {
    let base = format!("http://{addr}");
    format!(
        "amq2api demo is running (emulated Amazon Q at {emu}, 3 accounts, state in {dir}).\n\
         \n  Base URL: {base}\n  API key:  {key}\n\
         \nTry it:\n\n  curl -sN {base}/v1/messages -H 'content-type: application/json' -H 'x-api-key: {key}' \\\n    \
         -d '{{\"model\":\"claude-sonnet-4-5\",\"max_tokens\":256,\"stream\":true,\"messages\":[{{\"role\":\"user\",\"content\":\"Hello!\"}}]}}'\n\
         \nFor the SDKs and Claude Code:\n\n  export ANTHROPIC_BASE_URL={base}\n  export ANTHROPIC_API_KEY={key}\n\
         \nControl socket: {sock}  (amqctl --socket {sock} status)\nPress Ctrl-C to stop.\n",
        emu = demo.emulator.endpoint(),
        dir = demo.dir.display(),
        key = demo.api_key,
        sock = demo.dir.join("control.sock").display(),
    )
}

/// Runs the demo until `shutdown`. Prints the banner to stdout once serving.
pub async fn run(listen: SocketAddr, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let listener = std::net::TcpListener::bind(listen)
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e} (choose another with --listen)"))?;
    let addr = listener.local_addr()?;
    let demo = prepare(addr).await?;
    let loaded = config::load(&demo.config_path, &Env::default()).map_err(|d| anyhow::anyhow!("{d}"))?;
    // A closed stdout (the reader went away) must not take the demo down.
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{}", banner(addr, &demo));
        let _ = out.flush();
    }
    crate::daemon::run(loaded, crate::daemon::Listeners { http: vec![listener] }, shutdown).await?;
    drop(demo);
    Ok(())
}
