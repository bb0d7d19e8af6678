//! The `amq2api` daemon binary: parse the command line, set up logging, call the library.

use amq2api::cli::Cli;
use amq2api::{exit, logging};
use clap::Parser;

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { exit::USAGE } else { exit::OK };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    logging::init("info");
    std::process::exit(amq2api::cli::main(cli));
}
