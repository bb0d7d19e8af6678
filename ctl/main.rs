//! `amqctl`, the operator's CLI: parse the command line, run the offline commands (import,
//! completions, man) here and the others against the daemon's control socket.
//!
//! Modules: [`cli`] the clap definitions; [`commands`] the commands that call the daemon;
//! [`client`] the control-socket client; [`render`] tables for people; [`import`] other tools'
//! credential stores (the seed's exports and accounts.db, the Kiro IDE's token file, kiro-cli's
//! SQLite) to accounts.toml; [`keys`] named keys and usage (`keys`, `key new`, `usage`); [`failure`] a failure and its exit code. The wire types are the library's
//! ([`amq2api::control::wire`]).
#![forbid(unsafe_code)]

mod cli;
mod client;
mod commands;
mod failure;
mod import;
mod keys;
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
        Command::Completions { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "amqctl", &mut std::io::stdout());
            Ok(exit::OK)
        }
        Command::Man => {
            let man = clap_mangen::Man::new(Cli::command());
            match man.render(&mut std::io::stdout()) {
                Ok(()) => Ok(exit::OK),
                Err(e) => Err(fail(exit::IOERR, e.to_string())),
            }
        }
        Command::Key(cli::KeyCommand::New { name }) => keys::new_key(name, cli.json),
        Command::Import { file } => import::import(file).map(|out| {
            for w in &out.warnings {
                eprintln!("amqctl: warning: {w}");
            }
            print!("{}", out.stdout);
            exit::OK
        }),
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
