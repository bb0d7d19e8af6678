//! The `amq2api` daemon binary: parse the command line, set up logging, call the library.

use amq2api::cli::Cli;
use amq2api::{exit, logging};
use clap::Parser;

fn main() {
    // Tokens and client secrets live in this process's memory: no core dump may write them to
    // disk, whatever the core limit (systemd's LimitCORE=0 says the same), and no other process
    // of the same user may read the memory through /proc or ptrace.
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        eprintln!("amq2api: warning: cannot make the process non-dumpable: {e}");
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { exit::USAGE } else { exit::OK };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    let log = logging::init_buffered("info");
    let code = amq2api::cli::main(cli);
    // The last log lines leave before the process does.
    drop(log);
    std::process::exit(code);
}
