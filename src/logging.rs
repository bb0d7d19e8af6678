//! Log set-up: journald-native under systemd (`JOURNAL_STREAM`), human-readable on a terminal,
//! `RUST_LOG` filtering. No secret reaches a log line: secrets are [`crate::config::Secret`]s.
//!
//! In the journal every entry's `MESSAGE` reads as the terminal line does — the request span and
//! every field written out (`request{id=req_… account=a-1}: account suspended by Amazon Q
//! reason="…"`) — so plain `journalctl` shows the whole of it; the fields are also kept as
//! journal fields of their own (`F_ACCOUNT=a-1`, `F_STATUS=200`, …) for `journalctl F_ACCOUNT=a-1`.

use std::fmt::Write as _;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::{DefaultFields, Writer};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

/// journald's native socket.
const JOURNALD_SOCKET: &str = "/run/systemd/journal/socket";

/// Installs the global subscriber. `default_filter` applies when `RUST_LOG` is unset
/// (for example `"info"` for the daemon, `"warn"` for amqctl).
pub fn init(default_filter: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let registry = tracing_subscriber::registry().with(filter);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        // AMQ2API_JOURNAL_SOCKET: another journald socket (the tests read the entries back from one).
        let path = std::env::var_os("AMQ2API_JOURNAL_SOCKET")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(JOURNALD_SOCKET));
        if let Ok(journald) = Journald::connect(&path, "amq2api") {
            let _ = registry.with(journald).try_init();
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

/// A layer that sends each event to journald over its native protocol: `MESSAGE` is the line the
/// terminal shows (spans, message, fields), `PRIORITY` the level, and each field (the spans'
/// included) also a field of its own, `F_` + its name in capitals.
pub struct Journald {
    socket: UnixDatagram,
    path: PathBuf,
    identifier: String,
}

/// A span's fields: as the terminal writes them, and as journal fields.
struct SpanFields {
    text: String,
    journal: Vec<u8>,
}

impl Journald {
    /// Connects to the journal's socket at `path` (checked with an empty datagram, which journald
    /// discards).
    pub fn connect(path: &Path, identifier: &str) -> std::io::Result<Journald> {
        let socket = UnixDatagram::unbound()?;
        socket.send_to(&[], path)?;
        Ok(Journald { socket, path: path.to_path_buf(), identifier: identifier.to_string() })
    }

    fn send(&self, payload: &[u8]) {
        if self.socket.send_to(payload, &self.path).is_err() {
            // Too large for one datagram (a huge field): the first 16 KiB of the line still go.
            let mut short = Vec::with_capacity(16 * 1024 + 128);
            if let Some(message) = find_message(payload) {
                put_field(&mut short, "MESSAGE", &message[..message.len().min(16 * 1024)]);
                put_field(&mut short, "SYSLOG_IDENTIFIER", self.identifier.as_bytes());
                let _ = self.socket.send_to(&short, &self.path);
            }
        }
    }
}

/// The `MESSAGE` field of a payload this module built (always length-encoded).
fn find_message(payload: &[u8]) -> Option<&[u8]> {
    let mut rest = payload;
    while !rest.is_empty() {
        let nl = rest.iter().position(|&b| b == b'\n')?;
        let name = &rest[..nl];
        let len = u64::from_le_bytes(rest.get(nl + 1..nl + 9)?.try_into().ok()?) as usize;
        let value = rest.get(nl + 9..nl + 9 + len)?;
        if name == b"MESSAGE" {
            return Some(value);
        }
        rest = rest.get(nl + 10 + len..)?;
    }
    None
}

/// Appends one field in the length-encoded form of journald's native protocol (any value, newlines
/// included).
fn put_field(buf: &mut Vec<u8>, name: &str, value: &[u8]) {
    buf.extend_from_slice(name.as_bytes());
    buf.push(b'\n');
    buf.extend_from_slice(&(value.len() as u64).to_le_bytes());
    buf.extend_from_slice(value);
    buf.push(b'\n');
}

/// A tracing field name as a journal field name: `F_` + capitals, digits and `_`.
fn journal_name(name: &str) -> String {
    let mut out = String::from("F_");
    out.extend(name.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }));
    out
}

/// Collects fields as journal fields (the event's `message` excepted).
struct JournalFields<'a>(&'a mut Vec<u8>);

impl Visit for JournalFields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() != "message" {
            put_field(self.0, &journal_name(field.name()), value.as_bytes());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() != "message" {
            put_field(self.0, &journal_name(field.name()), format!("{value:?}").as_bytes());
        }
    }
}

/// Fields written as the terminal writes them (`message key=value key="text"`).
fn text_of(fields: impl RecordFields) -> String {
    let mut text = String::new();
    let _ = DefaultFields::new().format_fields(Writer::new(&mut text), fields);
    text
}

fn priority(level: &Level) -> &'static [u8] {
    match *level {
        Level::ERROR => b"3",
        Level::WARN => b"4",
        Level::INFO => b"6",
        _ => b"7",
    }
}

impl<S> tracing_subscriber::Layer<S> for Journald
where
    S: Subscriber + for<'span> LookupSpan<'span>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut journal = Vec::new();
        attrs.record(&mut JournalFields(&mut journal));
        span.extensions_mut().insert(SpanFields { text: text_of(attrs), journal });
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut ext = span.extensions_mut();
        let Some(fields) = ext.get_mut::<SpanFields>() else { return };
        values.record(&mut JournalFields(&mut fields.journal));
        let more = text_of(values);
        if !more.is_empty() {
            if !fields.text.is_empty() {
                fields.text.push(' ');
            }
            fields.text.push_str(&more);
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut line = String::new();
        let mut payload = Vec::with_capacity(512);
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                let ext = span.extensions();
                line.push_str(span.name());
                if let Some(fields) = ext.get::<SpanFields>() {
                    if !fields.text.is_empty() {
                        let _ = write!(line, "{{{}}}", fields.text);
                    }
                    payload.extend_from_slice(&fields.journal);
                }
                line.push(':');
            }
            if !line.is_empty() {
                line.push(' ');
            }
        }
        line.push_str(&text_of(event));
        event.record(&mut JournalFields(&mut payload));
        let meta = event.metadata();
        put_field(&mut payload, "MESSAGE", line.as_bytes());
        put_field(&mut payload, "PRIORITY", priority(meta.level()));
        put_field(&mut payload, "SYSLOG_IDENTIFIER", self.identifier.as_bytes());
        put_field(&mut payload, "TARGET", meta.target().as_bytes());
        if let Some(file) = meta.file() {
            put_field(&mut payload, "CODE_FILE", file.as_bytes());
        }
        if let Some(line) = meta.line() {
            put_field(&mut payload, "CODE_LINE", line.to_string().as_bytes());
        }
        self.send(&payload);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Parses a native-protocol payload (length-encoded fields only, as this module writes them).
    fn parse(payload: &[u8]) -> HashMap<String, String> {
        let mut out = HashMap::new();
        let mut rest = payload;
        while !rest.is_empty() {
            let nl = rest.iter().position(|&b| b == b'\n').unwrap();
            let name = String::from_utf8(rest[..nl].to_vec()).unwrap();
            let len = u64::from_le_bytes(rest[nl + 1..nl + 9].try_into().unwrap()) as usize;
            let value = String::from_utf8(rest[nl + 9..nl + 9 + len].to_vec()).unwrap();
            assert_eq!(rest[nl + 9 + len], b'\n');
            out.insert(name, value);
            rest = &rest[nl + 10 + len..];
        }
        out
    }

    #[test]
    fn message_carries_spans_and_fields() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("socket");
        let server = UnixDatagram::bind(&path).unwrap();
        let layer = Journald::connect(&path, "amq2api").unwrap();
        let mut buf = vec![0u8; 65536];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(n, 0, "the probe datagram is empty");
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("request", id = "req_1", account = tracing::field::Empty);
            let _g = span.enter();
            span.record("account", "team-a-1");
            tracing::warn!(
                reason = "TEMPORARILY_SUSPENDED",
                status = 403u16,
                "account suspended by Amazon Q"
            );
        });
        let n = server.recv(&mut buf).unwrap();
        let fields = parse(&buf[..n]);
        assert_eq!(
            fields["MESSAGE"],
            "request{id=\"req_1\" account=\"team-a-1\"}: account suspended by Amazon Q \
             reason=\"TEMPORARILY_SUSPENDED\" status=403"
        );
        assert_eq!(fields["PRIORITY"], "4");
        assert_eq!(fields["SYSLOG_IDENTIFIER"], "amq2api");
        assert_eq!(fields["F_ACCOUNT"], "team-a-1");
        assert_eq!(fields["F_STATUS"], "403");
        assert_eq!(fields["F_REASON"], "TEMPORARILY_SUSPENDED");
        assert_eq!(fields["F_ID"], "req_1");
        assert_eq!(find_message(&buf[..n]).unwrap(), fields["MESSAGE"].as_bytes());
    }
}
