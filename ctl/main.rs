//! `amqctl`: parse the command line, set up logging, call the library's control client.

use amq2api::ctl::Cli;
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
    logging::init("warn");
    std::process::exit(amq2api::ctl::main(cli));
}
