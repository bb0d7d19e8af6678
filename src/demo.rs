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

/// The `[upstream]` keys that point every endpoint at `emulator`.
pub fn upstream_keys(emulator: &Emulator) -> String {
    format!(
        "endpoint = \"{}\"\nruntime_endpoint = \"{}\"\nmanagement_endpoint = \"{}\"\ntoken_endpoint = \"{}\"\nsocial_token_endpoint = \"{}\"\n",
        emulator.endpoint(),
        emulator.runtime_endpoint(),
        emulator.management_endpoint(),
        emulator.token_endpoint(),
        emulator.social_token_endpoint(),
    )
}

fn random_hex(n: usize) -> String {
    hex::encode(crate::ids::random_bytes::<16>())[..n].to_string()
}

/// Starts the emulator, registers one account of each kind with it (Builder ID / IdC, Kiro
/// social sign-in, Kiro API key) and writes `amq2api.toml` and `accounts.toml` for a daemon
/// listening on `listen`.
pub async fn prepare(listen: SocketAddr) -> std::io::Result<Demo> {
    let dir = std::env::temp_dir().join(format!("amq2api-demo-{}", random_hex(12)));
    std::fs::create_dir_all(dir.join("state"))?;
    let emulator = Emulator::start(EmulatorOptions::default()).await?;
    let mut accounts = String::from("# Emulated accounts of `amq2api demo`: one of each kind.\n");
    let (cid, secret, rt) =
        ("demo-client-1".to_owned(), random_hex(24), format!("demo-refresh-{}", random_hex(16)));
    emulator.add_account(&cid, &secret, &rt);
    accounts.push_str(&format!(
        "\n[[account]]\nid = \"demo-oidc\"\nlabel = \"Emulated Builder ID account\"\nkind = \"oidc\"\nclient_id = \"{cid}\"\nclient_secret = \"{secret}\"\nrefresh_token = \"{rt}\"\n"
    ));
    let social_rt = format!("demo-social-{}", random_hex(16));
    emulator.add_social_account(&social_rt, None);
    accounts.push_str(&format!(
        "\n[[account]]\nid = \"demo-social\"\nlabel = \"Emulated Kiro sign-in (Google/GitHub)\"\nkind = \"social\"\nrefresh_token = \"{social_rt}\"\n"
    ));
    let key = format!("ksk_demo{}", random_hex(24));
    emulator.add_api_key(&key);
    accounts.push_str(&format!(
        "\n[[account]]\nid = \"demo-api-key\"\nlabel = \"Emulated Kiro API key\"\nkind = \"api-key\"\napi_key = \"{key}\"\n"
    ));
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
{upstream}
[accounts]
file = "accounts.toml"

[state]
dir = "state"

[control]
socket = "control.sock"
"#,
        upstream = upstream_keys(&emulator),
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
         \nConfiguration: {config}\n         \nFor amqctl (target/release/amqctl, built with the daemon by cargo build --release):\n\n           export AMQ2API_SOCKET={sock}\n  amqctl status\n         \nPress Ctrl-C to stop.\n",
        emu = demo.emulator.endpoint(),
        config = demo.config_path.display(),
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
