//! Command-line interface of the `amq2api` daemon binary: clap definitions (also the source of
//! its man page) and the dispatch of each subcommand to the library.

use crate::config::{self, Env};
use crate::exit;
use clap::{CommandFactory, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, Parser)]
#[command(
    name = "amq2api",
    version,
    about = "Serve the Anthropic Claude Messages API from a pool of Amazon Q Developer accounts",
    long_about = "Serve the Anthropic Claude Messages API from a pool of Amazon Q Developer accounts.\n\n\
                  Without a command, runs the daemon in the foreground (as systemd does). \
                  Manage a running daemon with amqctl.",
    after_long_help = "Exit status: 0 clean stop; 64 bad command line; 65 corrupt input \
                       (eventstream decode); 71 the daemon could not start: it could not bind a \
                       socket, the state store is locked by another daemon or damaged, or another \
                       operating-system error; 74 an I/O error; 78 invalid configuration (systemd's \
                       RestartPreventExitStatus=78 stops a restart loop)."
)]
pub struct Cli {
    /// Configuration file.
    #[arg(long, global = true, env = "AMQ2API_CONFIG", default_value = config::DEFAULT_CONFIG_PATH, value_name = "PATH")]
    pub config: PathBuf,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon in the foreground (the default).
    Run,
    /// Run the daemon with an embedded Amazon Q emulator, a temporary state directory, a
    /// generated API key and three emulated accounts; prints the URL, the key and a curl line.
    Demo {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
        listen: SocketAddr,
    },
    /// Validate amq2api.toml and the accounts (and keys) file it names; exit 0, or 78 with every problem listed.
    CheckConfig,
    /// Tools for AWS event-stream data (application/vnd.amazon.eventstream).
    Eventstream {
        #[command(subcommand)]
        command: EventstreamCommand,
    },
    /// Run only the Amazon Q + Kiro + OIDC emulator (for experiments and load tests).
    Emulator {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8081", value_name = "ADDR")]
        listen: SocketAddr,
        /// Register an account as CLIENT_ID:CLIENT_SECRET:REFRESH_TOKEN (repeatable).
        #[arg(long = "account", value_name = "ID:SECRET:TOKEN")]
        accounts: Vec<String>,
        /// Register a Kiro social account holding this refresh token (repeatable).
        #[arg(long = "social", value_name = "REFRESH_TOKEN")]
        social: Vec<String>,
        /// Register a Kiro API key (repeatable).
        #[arg(long = "api-key", value_name = "KEY")]
        api_keys: Vec<String>,
        /// Refuse chat and catalog calls without a profileArn, as the 2026 service does.
        #[arg(long)]
        require_profile_arn: bool,
        /// Let the Kiro runtime endpoint take OIDC access tokens.
        #[arg(long)]
        runtime_accepts_oidc: bool,
        /// Report tokenUsage in every stream's metadataEvent.
        #[arg(long)]
        token_usage: bool,
    },
    /// Print the man page (roff). Hidden: packaging/build-deb.sh runs it to install amq2api(1).
    #[command(hide = true)]
    Man,
}

#[derive(Debug, Subcommand)]
pub enum EventstreamCommand {
    /// Decode frames from FILE (or standard input with `-`): one JSON object a line,
    /// `{"headers": [{"name", "type", "value"}], "payload": …}`. Byte arrays are base64, uuids
    /// hyphenated hex, timestamps milliseconds; a payload that is not UTF-8 is `{"base64": …}`.
    /// Exits 65 naming the frame offset and the reason on corrupt input.
    Decode {
        #[arg(default_value = "-", value_name = "FILE|-")]
        file: String,
    },
}

/// Runs the command; returns the process exit code.
pub fn main(cli: Cli) -> i32 {
    match cli.command.unwrap_or(Command::Run) {
        Command::CheckConfig => check_config(&cli.config),
        Command::Man => man(),
        Command::Eventstream { command: EventstreamCommand::Decode { file } } => eventstream_decode(&file),
        Command::Run => {
            // Read and checked before the runtime starts: nothing async waits on a file.
            let loaded = match config::load(&cli.config, &Env::from_process()) {
                Ok(l) => l,
                Err(diags) => {
                    // Once, on stderr (which systemd puts in the journal too).
                    eprintln!("{diags}");
                    return exit::CONFIG;
                }
            };
            with_runtime(|| run_daemon(&cli.config, loaded))
        }
        Command::Demo { listen } => with_runtime(|| async move {
            match crate::demo::run(listen, shutdown_signal()).await {
                Ok(()) => exit::OK,
                Err(e) => {
                    eprintln!("amq2api demo: {e:#}");
                    exit::OSERR
                }
            }
        }),
        Command::Emulator {
            listen,
            accounts,
            social,
            api_keys,
            require_profile_arn,
            runtime_accepts_oidc,
            token_usage,
        } => with_runtime(|| async move {
            let mut list = Vec::new();
            for a in &accounts {
                let parts: Vec<&str> = a.splitn(3, ':').collect();
                if parts.len() != 3 {
                    eprintln!("amq2api emulator: --account takes CLIENT_ID:CLIENT_SECRET:REFRESH_TOKEN");
                    return exit::USAGE;
                }
                list.push((parts[0].to_string(), parts[1].to_string(), parts[2].to_string()));
            }
            let listener = match tokio::net::TcpListener::bind(listen).await {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("amq2api emulator: cannot listen on {listen}: {e}");
                    return exit::OSERR;
                }
            };
            println!(
                "emulator listening on http://{listen}/ (token endpoint http://{listen}/token, runtime \
                 http://{listen}/runtime/, management http://{listen}/management/, social refresh \
                 http://{listen}/refreshToken)"
            );
            println!(
                "sign in to it (device flow, approved after one poll): AMQ2API_OIDC_ENDPOINT=http://{listen} amqctl login"
            );
            let setup = crate::emulator::Standalone {
                options: crate::emulator::EmulatorOptions {
                    require_profile_arn,
                    runtime_accepts_oidc,
                    token_usage,
                    ..Default::default()
                },
                accounts: list,
                social,
                api_keys,
            };
            crate::emulator::run_standalone_with(listener, &setup, shutdown_signal()).await;
            exit::OK
        }),
    }
}

fn with_runtime<F, Fut>(f: F) -> i32
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = i32>,
{
    match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt.block_on(f()),
        Err(e) => {
            eprintln!("amq2api: cannot start the runtime: {e}");
            exit::OSERR
        }
    }
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is called, not when the
/// future is first polled: the daemon polls it only after `READY=1`, and a SIGTERM in between
/// would otherwise kill it with the default action instead of stopping it cleanly. Must be
/// called on a runtime.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate()).ok();
    let int = signal(SignalKind::interrupt()).ok();
    // SIGHUP is taken from here on too: its default action ends the process, and the reload
    // loop listens only once the daemon runs (a store to open, PostgreSQL to reach). tokio keeps
    // its handler installed for the process's life; a SIGHUP before the loop listens is
    // covered by the start itself, which reads the files afresh.
    let _ = signal(SignalKind::hangup());
    async move {
        let term = async {
            match term {
                Some(mut s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        let int = async {
            match int {
                Some(mut s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = term => {}
            _ = int => {}
        }
    }
}

async fn run_daemon(path: &Path, loaded: config::Loaded) -> i32 {
    let activated = match crate::systemd::listeners() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("amq2api: cannot take the sockets systemd passed: {e}");
            return if e.kind() == std::io::ErrorKind::InvalidInput { exit::CONFIG } else { exit::OSERR };
        }
    };
    let mut http = Vec::new();
    if !activated.is_empty() {
        let cfg = &loaded.config.server;
        // The rules `listen` is checked by hold for the sockets systemd passes, which are the
        // listeners now: a public one needs TLS (or allow_plaintext), and anonymous access (no
        // api_keys: it begins whenever the keys, if any, are none) only on loopback.
        let public: Vec<String> = activated
            .iter()
            .filter_map(|(_, l)| l.local_addr().ok())
            .filter(|a| !a.ip().is_loopback())
            .map(|a| a.to_string())
            .collect();
        let refusal = if public.is_empty() {
            None
        } else if cfg.tls.is_none() && !cfg.allow_plaintext {
            Some("no TLS is configured: set tls_cert and tls_key, or allow_plaintext = true")
        } else if loaded.config.auth.allow_anonymous && loaded.config.auth.keys.is_empty() {
            Some(
                "allow_anonymous is set without api_keys: anonymous access is only allowed on loopback listeners",
            )
        } else {
            None
        };
        if let Some(why) = refusal {
            eprintln!(
                "{}: error: systemd passed the non-loopback socket(s) {} and {why}",
                path.display(),
                public.join(", ")
            );
            return exit::CONFIG;
        }
        for (name, l) in activated {
            tracing::info!(name = %name, addr = ?l.local_addr().ok(), "using a socket passed by systemd");
            http.push(l);
        }
    }
    let bind_config = http.is_empty();
    for addr in loaded.config.server.listen.iter().filter(|_| bind_config) {
        match std::net::TcpListener::bind(addr) {
            Ok(l) => http.push(l),
            Err(e) => {
                // Once, on stderr (which systemd puts in the journal too), not also as a log line.
                eprintln!("amq2api: cannot listen on {addr}: {e}");
                return exit::OSERR;
            }
        }
    }
    match crate::daemon::run(loaded, crate::daemon::Listeners { http }, shutdown_signal()).await {
        Ok(()) => exit::OK,
        Err(e) => {
            // Once, on stderr (which systemd puts in the journal too), not also as a log line.
            eprintln!("amq2api: {e}");
            match e {
                crate::daemon::RunError::Tls(_) => exit::CONFIG,
                crate::daemon::RunError::Client(_) => exit::CONFIG,
                _ => exit::OSERR,
            }
        }
    }
}

/// `amq2api eventstream decode`.
fn eventstream_decode(file: &str) -> i32 {
    let stdout = std::io::stdout();
    let out = std::io::BufWriter::new(stdout.lock());
    let result = if file == "-" {
        crate::upstream::eventstream::dump(std::io::stdin().lock(), out)
    } else {
        match std::fs::File::open(file) {
            Ok(f) => crate::upstream::eventstream::dump(f, out),
            Err(e) => {
                eprintln!("amq2api eventstream decode: cannot open {file}: {e}");
                return exit::IOERR;
            }
        }
    };
    match result {
        Ok(_) => exit::OK,
        Err(e) => {
            eprintln!("amq2api eventstream decode: {e}");
            exit::DATAERR
        }
    }
}

/// `amq2api man`: the man page, rendered from the clap definitions above (packaging/build-deb.sh
/// installs it as amq2api(1)).
fn man() -> i32 {
    match clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()) {
        Ok(()) => exit::OK,
        Err(e) => {
            eprintln!("amq2api man: {e}");
            exit::IOERR
        }
    }
}

/// `amq2api check-config`: prints every problem (errors and warnings) to stderr, a summary to
/// stdout, and returns the exit code.
pub fn check_config(path: &Path) -> i32 {
    match config::load(path, &Env { checking: true, ..Env::from_process() }) {
        Ok(loaded) => {
            for w in &loaded.warnings.0 {
                eprintln!("{w}");
            }
            // What the daemon parses at start-up beyond the files' syntax: the certificate and
            // key, the extra CA file. A file that reads but is no PEM fails the start (78), so it
            // fails the check too.
            let mut refused = Vec::new();
            if let Some(files) = &loaded.config.server.tls {
                if let Err(e) = crate::server::tls::load_certified_key(&files.cert, &files.key) {
                    refused.push(format!("{}: error: [server] TLS: {e}", path.display()));
                }
            }
            if let Err(e) = crate::upstream::client::UpstreamClient::new(&loaded.config.upstream) {
                refused.push(format!("{}: error: [upstream] {e}", path.display()));
            }
            if !refused.is_empty() {
                for r in &refused {
                    eprintln!("{r}");
                }
                eprintln!(
                    "configuration invalid: {} error{}",
                    refused.len(),
                    if refused.len() == 1 { "" } else { "s" }
                );
                return exit::CONFIG;
            }
            // Placeholders (the example's values) pass validation but cannot sign in: a warning
            // each, and no plain "OK". The exit code stays 0: the files are valid.
            let accounts_file = &loaded.config.accounts.file;
            let mut placeholders = 0;
            for a in loaded.accounts.iter() {
                let keys = config::accounts::placeholder_keys(a);
                if keys.is_empty() {
                    continue;
                }
                placeholders += 1;
                let warning = config::Diagnostic {
                    severity: config::Severity::Warning,
                    file: accounts_file.clone(),
                    position: None,
                    message: format!(
                        "account {:?}: {} {} the example's placeholder{}: it cannot sign in until it gets real \
                         credentials (amqctl login, amqctl import)",
                        a.id.as_str(),
                        keys.join(", "),
                        if keys.len() == 1 { "is" } else { "are" },
                        if keys.len() == 1 { "" } else { "s" },
                    ),
                };
                eprintln!("{warning}");
            }
            let enabled = loaded.accounts.iter().filter(|a| a.enabled).count();
            let keys = match &loaded.config.auth.keys_file {
                Some(f) => format!("; {} ({} named keys)", f.display(), loaded.keys.keys.len()),
                None => String::new(),
            };
            let verdict = if placeholders == 0 {
                "configuration OK".to_string()
            } else {
                format!(
                    "configuration valid, but {placeholders} account{} still {} placeholder credentials (see the warnings)",
                    if placeholders == 1 { "" } else { "s" },
                    if placeholders == 1 { "holds" } else { "hold" },
                )
            };
            println!(
                "{verdict}: {} and {} ({} accounts, {} enabled){keys}",
                path.display(),
                accounts_file.display(),
                loaded.accounts.len(),
                enabled
            );
            exit::OK
        }
        Err(diags) => {
            for d in &diags.0 {
                eprintln!("{d}");
            }
            let n = diags.errors().count();
            eprintln!("configuration invalid: {n} error{}", if n == 1 { "" } else { "s" });
            exit::CONFIG
        }
    }
}
