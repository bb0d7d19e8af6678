//! Command-line interface of the `amq2api` daemon binary (clap definitions and the
//! subcommands that do not run the daemon).

use crate::config::{self, Env};
use crate::exit;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "amq2api",
    version,
    about = "Serve the Anthropic Claude Messages API from a pool of Amazon Q Developer accounts",
    long_about = "Serve the Anthropic Claude Messages API from a pool of Amazon Q Developer accounts.\n\n\
                  Manage a running daemon with amqctl."
)]
pub struct Cli {
    /// Configuration file.
    #[arg(long, global = true, env = "AMQ2API_CONFIG", default_value = config::DEFAULT_CONFIG_PATH, value_name = "PATH")]
    pub config: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate amq2api.toml and the accounts file it names; exit 0, or 78 with every problem listed.
    CheckConfig,
}

/// `amq2api check-config`: prints every problem (errors and warnings) to stderr, a summary to
/// stdout, and returns the exit code.
pub fn check_config(path: &std::path::Path) -> i32 {
    match config::load(path, &Env::from_process()) {
        Ok(loaded) => {
            for w in &loaded.warnings.0 {
                eprintln!("{w}");
            }
            let enabled = loaded.accounts.iter().filter(|a| a.enabled).count();
            println!(
                "configuration OK: {} and {} ({} accounts, {} enabled)",
                path.display(),
                loaded.config.accounts.file.display(),
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
