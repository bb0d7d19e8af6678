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
