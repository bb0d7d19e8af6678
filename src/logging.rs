//! Log set-up: journald-native under systemd (`JOURNAL_STREAM`), human-readable on a terminal,
//! `RUST_LOG` filtering. No secret reaches a log line: secrets are [`crate::config::Secret`]s.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Installs the global subscriber. `default_filter` applies when `RUST_LOG` is unset
/// (for example `"info"` for the daemon, `"warn"` for amqctl).
pub fn init(default_filter: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let registry = tracing_subscriber::registry().with(filter);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        if let Ok(journald) = tracing_journald::layer() {
            let _ = registry.with(journald.with_syslog_identifier("amq2api".into())).try_init();
            return;
        }
        // No journald socket (a container, a pipe): plain lines, the journal adds its own time.
        let plain = tracing_subscriber::fmt::layer().without_time().with_ansi(false).with_target(false);
        let _ = registry.with(plain).try_init();
        return;
    }
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let human =
        tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi).with_target(false);
    let _ = registry.with(human).try_init();
}
