//! Why an amqctl command failed: the message for stderr and the exit code ([`amq2api::exit`])
//! it means.

/// A failure with its exit code; main prints `amqctl: MESSAGE` and exits with `code`.
#[derive(Debug)]
pub struct Failure {
    pub code: i32,
    pub message: String,
}

/// A [`Failure`] with this code and message.
pub fn fail(code: i32, message: impl Into<String>) -> Failure {
    Failure { code, message: message.into() }
}

/// Writes `text` to standard output. A reader that went away (`amqctl man | head`) ends amqctl
/// quietly with exit 0, as a closed pipe is no failure of amqctl's; any other write error is
/// exit 74 with one line.
pub fn out(text: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(amq2api::exit::OK);
        }
        eprintln!("amqctl: cannot write to standard output: {e}");
        std::process::exit(amq2api::exit::IOERR);
    }
}
