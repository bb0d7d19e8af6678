//! amqctl's command line: the clap definitions of its options and subcommands (also the
//! source of its man page and shell completions).

use clap::{Parser, Subcommand};
use std::path::PathBuf;

pub const DEFAULT_SOCKET: &str = "/run/amq2api/control.sock";

#[derive(Debug, Parser)]
#[command(
    name = "amqctl",
    version,
    about = "Manage a running amq2api daemon over its control socket",
    after_long_help = "Exit status: 0 success; 1 an action failed (refresh, check, enable, disable); \
                       64 bad command line or unknown account; 65 a file import does not read; \
                       69 the daemon is not running (no socket, or nothing answers on it); \
                       70 an unexpected answer; 71 an operating-system error; 74 an I/O error; \
                       77 permission denied on the control socket; 78 a reload was refused."
)]
pub struct Cli {
    /// The daemon's control socket.
    #[arg(long, global = true, env = "AMQ2API_SOCKET", default_value = DEFAULT_SOCKET, value_name = "PATH")]
    pub socket: PathBuf,
    /// Print JSON (stable, for scripts) instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// Give up (exit 69) when the daemon has not answered within SECS: a stopped or wedged
    /// daemon still accepts connections. Default 30 for reads, 300 for actions (reload,
    /// refresh, check, enable, disable).
    #[arg(long, global = true, env = "AMQCTL_TIMEOUT", value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: Option<u64>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Daemon version and uptime, listeners, configuration state, pool summary, one row an account.
    Status,
    /// List the accounts.
    Accounts,
    /// One account in detail.
    Account { id: String },
    /// Refresh access tokens now and report each result.
    Refresh {
        ids: Vec<String>,
        /// Every account.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
    /// Make a real minimal Amazon Q call per account and classify the result (updates its state).
    Check {
        ids: Vec<String>,
        /// Every account.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
    /// Put accounts back in rotation (also clears a suspension, quota or cooldown).
    Enable {
        ids: Vec<String>,
        /// Every account.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
    /// Take accounts out of rotation (in-flight requests finish).
    Disable {
        ids: Vec<String>,
        /// Every account.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
    /// Re-read the configuration and the accounts file (the same as SIGHUP).
    Reload,
    /// Turn a credential file into accounts.toml entries on stdout: the Kiro IDE's
    /// kiro-auth-token.json (~/.aws/sso/cache/), kiro-cli's data.sqlite3, or the seed amq2api's
    /// accounts.db, /v2/accounts JSON export or label|password|clientId|clientSecret|refreshToken|
    /// accessToken lines. The format is told by the content; SQLite files are opened read-only.
    /// `-` reads standard input; with --json the entries are printed as JSON.
    Import {
        #[arg(value_name = "FILE|-")]
        file: PathBuf,
    },
    /// Sign in (Builder ID, or IAM Identity Center) and print the account's accounts.toml entry.
    ///
    /// The OIDC device flow: AWS Builder ID by default, IAM Identity Center with --start-url and
    /// --region. Open the URL it prints (stderr) on any device and approve; the account's
    /// [[account]] entry, secrets included, is printed on stdout, to append to accounts.toml.
    /// Needs no daemon.
    Login {
        /// The IAM Identity Center start URL (https://d-…awsapps.com/start); default Builder ID.
        #[arg(long, value_name = "URL", default_value = crate::login::BUILDER_ID_START_URL)]
        start_url: String,
        /// The region of the OIDC service (an Identity Center instance's region).
        #[arg(long, value_name = "REGION", default_value = "us-east-1")]
        region: String,
        /// The entry's id (default builder-id-XXXXXXXX or idc-XXXXXXXX).
        #[arg(long, value_name = "ID")]
        id: Option<String>,
        /// The entry's label.
        #[arg(long, value_name = "TEXT")]
        label: Option<String>,
        /// Another SSO OIDC base URL (the emulator: tests and the demo).
        #[arg(long, hide = true, env = "AMQ2API_OIDC_ENDPOINT", hide_env = true, value_name = "URL")]
        oidc_endpoint: Option<String>,
    },
    /// Print the live credentials (rotated tokens included) as accounts.toml entries (root only).
    ///
    /// The daemon's state directory holds the only live copy of a rotated refresh token: this
    /// prints every account's current credentials, for a move or before starting over. Root only
    /// (and the daemon's own user), not members of its group; the daemon logs each call.
    Export,
    /// Named client keys (keys.toml): limits, today's use against them, state.
    Keys,
    /// Named-key tools.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Usage per UTC day (requests, errors, tokens in and out, credits) by key, account or model.
    Usage {
        /// What the rows are per.
        #[arg(long, value_enum, default_value = "key")]
        by: UsageBy,
        /// Days back, today included.
        #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u32).range(1..=36500))]
        days: u32,
        /// Comma-separated values with a header line (for spreadsheets).
        #[arg(long, conflicts_with = "json")]
        csv: bool,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff).
    Man,
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// A fresh random key (printed once, on stderr) and its [[key]] entry holding only the key's
    /// digest (stdout: `amqctl key new bob >> keys.toml`); the daemon never writes the keys file.
    /// Needs no daemon.
    New {
        /// The key's name: 1 to 64 of a-z 0-9 _ . -
        name: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum UsageBy {
    Key,
    Account,
    Model,
}

impl UsageBy {
    pub fn as_str(self) -> &'static str {
        match self {
            UsageBy::Key => "key",
            UsageBy::Account => "account",
            UsageBy::Model => "model",
        }
    }
}
