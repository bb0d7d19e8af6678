//! `amqctl`, the operator's CLI: parse the command line, run the offline commands (import,
//! login, completions, man) here and the others against the daemon's control socket.
//!
//! Modules: [`cli`] the clap definitions; [`commands`] the commands that call the daemon;
//! [`client`] the control-socket client; [`render`] tables for people; [`import`] other tools'
//! credential stores (the seed's exports and accounts.db, the Kiro IDE's token file, kiro-cli's
//! SQLite) to accounts.toml; [`login`] the OIDC device flow (Builder ID, IAM Identity Center) to
//! an accounts.toml entry; [`keys`] named keys and usage (`keys`, `key new`, `usage`); [`failure`]
//! a failure and its exit code. The wire types are the library's
//! ([`amq2api::control::wire`]).
#![forbid(unsafe_code)]

/// `print!` to standard output through [`failure::out`] (a closed pipe ends amqctl quietly).
macro_rules! out {
    ($($arg:tt)*) => { $crate::failure::out(&format!($($arg)*)) };
}

/// `println!` through [`failure::out`].
macro_rules! outln {
    ($($arg:tt)*) => { $crate::failure::out(&format!("{}\n", format_args!($($arg)*))) };
}

mod cli;
mod client;
mod commands;
mod failure;
mod import;
mod keys;
mod login;
mod render;

use amq2api::{exit, logging};
use clap::{CommandFactory, Parser};
use cli::{Cli, Command};
use failure::fail;

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { exit::USAGE } else { exit::OK };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    logging::init("warn");
    std::process::exit(run(cli));
}

/// Runs amqctl; returns the exit code.
fn run(cli: Cli) -> i32 {
    let result = match &cli.command {
        // Rendered whole, then written (a reader that stops early is no error).
        Command::Completions { shell } => {
            let mut text = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "amqctl", &mut text);
            out!("{}", String::from_utf8_lossy(&text));
            Ok(exit::OK)
        }
        Command::Man => {
            let mut text = Vec::new();
            match clap_mangen::Man::new(Cli::command()).render(&mut text) {
                Ok(()) => {
                    out!("{}", String::from_utf8_lossy(&text));
                    Ok(exit::OK)
                }
                Err(e) => Err(fail(exit::IOERR, e.to_string())),
            }
        }
        Command::Key(cli::KeyCommand::New { name }) => keys::new_key(name, cli.json),
        Command::Import { file } => import::import(file, cli.json).map(|o| {
            for w in &o.warnings {
                eprintln!("amqctl: warning: {w}");
            }
            out!("{}", o.stdout);
            exit::OK
        }),
        Command::Login { start_url, region, id, label, oidc_endpoint } => {
            let opts = login::Options {
                start_url,
                region,
                id: id.as_deref(),
                label: label.as_deref(),
                oidc_endpoint: oidc_endpoint.as_deref(),
            };
            match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt.block_on(login::login(&opts)).map(|done| {
                    eprintln!(
                        "amqctl: warning: stdout holds this account's secrets (client secret, refresh token): \
                         append it to accounts.toml (root:amq2api, mode 0640), then run amqctl reload"
                    );
                    out!("{}", done.entry);
                    exit::OK
                }),
                Err(e) => Err(fail(exit::OSERR, e.to_string())),
            }
        }
        _ => match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt.block_on(commands::run(&cli)),
            Err(e) => Err(fail(exit::OSERR, e.to_string())),
        },
    };
    match result {
        Ok(code) => code,
        Err(f) => {
            eprintln!("amqctl: {}", f.message);
            f.code
        }
    }
}
