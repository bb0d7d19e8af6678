//! Exit codes with a meaning (sysexits.h), shared by `amq2api` and `amqctl`.

/// Clean stop.
pub const OK: i32 = 0;
/// Something failed that has no more specific code.
pub const FAILURE: i32 = 1;
/// The command line was wrong.
pub const USAGE: i32 = 64;
/// The input data was wrong (for example a corrupt event stream).
pub const DATAERR: i32 = 65;
/// A service is unavailable (amqctl: the daemon is not running).
pub const UNAVAILABLE: i32 = 69;
/// An internal error.
pub const SOFTWARE: i32 = 70;
/// An operating-system error (cannot bind, cannot open the store).
pub const OSERR: i32 = 71;
/// I/O error.
pub const IOERR: i32 = 74;
/// Permission denied (amqctl: not in the daemon's group).
pub const NOPERM: i32 = 77;
/// The configuration is invalid; systemd's `RestartPreventExitStatus=78` stops a restart loop.
pub const CONFIG: i32 = 78;
