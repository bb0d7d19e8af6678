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

/// Installs the global subscriber, writing lines to stderr as they come. `default_filter`
/// applies when `RUST_LOG` is unset (for example `"warn"` for amqctl).
pub fn init(default_filter: &str) {
    install(default_filter, None);
}

/// The daemon's logging: as [`init`], but lines bound for stderr (not journald) go through a
/// [`LineBuffer`] written by a thread of its own. Keep the returned guard until the process
/// ends: dropping it writes out what is left.
pub fn init_buffered(default_filter: &str) -> Flush {
    let buffer = LineBuffer::start();
    install(default_filter, buffer.clone());
    Flush(buffer)
}

fn install(default_filter: &str, buffer: Option<LineBuffer>) {
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
        let _ = match buffer {
            Some(b) => registry.with(plain.with_writer(b)).try_init(),
            None => registry.with(plain.with_writer(std::io::stderr)).try_init(),
        };
        return;
    }
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let human = tracing_subscriber::fmt::layer().with_ansi(ansi).with_target(false);
    let _ = match buffer {
        Some(b) => registry.with(human.with_writer(b)).try_init(),
        None => registry.with(human.with_writer(std::io::stderr)).try_init(),
    };
}

/// Log lines on their way to stderr: appended under a short lock, written by one thread.
///
/// Writing each line with its own `write(2)` under stderr's lock costs a system call per
/// request (the access log) and, with several worker threads, a contended lock: threads that
/// log at once wait for each other's write. Here a line is only appended to memory; the writer
/// thread writes whatever has gathered in one call, then waits `GATHER` before looking
/// again, so under load lines leave in batches and nobody wakes it. Only a line that finds the
/// writer asleep wakes it (an idle daemon's lines still leave at once). Should stderr block
/// (a full pipe) and more than `MAX_BUFFERED` pile up, further lines are dropped and
/// counted — a request never waits for its log line — and the count is written when stderr
/// moves again.
#[derive(Clone)]
pub struct LineBuffer(std::sync::Arc<Lines>);

/// How long the writer gathers lines after a write.
const GATHER: std::time::Duration = std::time::Duration::from_millis(2);
/// Bytes buffered beyond which lines are dropped.
const MAX_BUFFERED: usize = 4 << 20;

struct Lines {
    state: std::sync::Mutex<LinesState>,
    wake: std::sync::Condvar,
    writer: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

#[derive(Default)]
struct LinesState {
    buf: Vec<u8>,
    asleep: bool,
    dropped: u64,
    stop: bool,
}

impl Lines {
    fn lock(&self) -> std::sync::MutexGuard<'_, LinesState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl LineBuffer {
    /// Starts the writer thread; `None` if no thread can be started (lines then go straight to
    /// stderr).
    fn start() -> Option<LineBuffer> {
        Self::start_with(std::io::stderr())
    }

    fn start_with(mut out: impl std::io::Write + Send + 'static) -> Option<LineBuffer> {
        let lines = std::sync::Arc::new(Lines {
            state: std::sync::Mutex::new(LinesState::default()),
            wake: std::sync::Condvar::new(),
            writer: std::sync::Mutex::new(None),
        });
        let l = lines.clone();
        let handle = std::thread::Builder::new()
            .name("log-writer".to_owned())
            .spawn(move || write_lines(&l, &mut out))
            .ok()?;
        *lines.writer.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
        Some(LineBuffer(lines))
    }

    fn push(&self, line: &[u8]) {
        let mut st = self.0.lock();
        if st.stop {
            // Written out and stopped (the process is ending): straight to stderr.
            drop(st);
            let _ = std::io::Write::write_all(&mut std::io::stderr(), line);
            return;
        }
        if st.buf.len() + line.len() > MAX_BUFFERED {
            st.dropped += 1;
            return;
        }
        st.buf.extend_from_slice(line);
        if st.asleep {
            st.asleep = false;
            drop(st);
            self.0.wake.notify_one();
        }
    }

    /// Writes out what is buffered and stops the writer thread.
    fn finish(&self) {
        self.0.lock().stop = true;
        self.0.wake.notify_one();
        if let Some(h) = self.0.writer.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = h.join();
        }
    }
}

/// The writer thread: waits for lines, writes them in one call, gathers for a moment.
fn write_lines(lines: &Lines, out: &mut impl std::io::Write) {
    use std::io::Write as _;
    let mut spare = Vec::new();
    loop {
        let mut st = lines.lock();
        while st.buf.is_empty() && st.dropped == 0 && !st.stop {
            st.asleep = true;
            st = lines.wake.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.asleep = false;
        let stop = st.stop;
        let dropped = std::mem::take(&mut st.dropped);
        std::mem::swap(&mut st.buf, &mut spare);
        drop(st);
        if dropped > 0 {
            let _ = writeln!(spare, "amq2api: {dropped} log lines dropped (stderr did not keep up)");
        }
        let _ = out.write_all(&spare);
        let _ = out.flush();
        spare.clear();
        if spare.capacity() > 64 * 1024 {
            spare = Vec::new();
        }
        if stop && lines.lock().buf.is_empty() {
            return;
        }
        if !stop {
            std::thread::sleep(GATHER);
        }
    }
}

impl std::io::Write for LineBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LineBuffer {
    type Writer = LineBuffer;

    fn make_writer(&'a self) -> LineBuffer {
        self.clone()
    }
}

/// Writes out the daemon's buffered log lines when dropped (see [`init_buffered`]).
pub struct Flush(Option<LineBuffer>);

impl Flush {
    /// Writes out what is buffered now (as dropping does).
    pub fn drop_now(self) {}
}

impl Drop for Flush {
    fn drop(&mut self) {
        if let Some(b) = self.0.take() {
            b.finish();
        }
    }
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
    use std::time::Duration;

    /// A writer the test reads back.
    #[derive(Clone, Default)]
    struct Sink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn buffered_lines_from_many_threads_all_arrive_whole_and_in_order() {
        let sink = Sink::default();
        let buffer = LineBuffer::start_with(sink.clone()).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let mut b = buffer.clone();
                std::thread::spawn(move || {
                    for i in 0..2000 {
                        std::io::Write::write_all(&mut b, format!("thread {t} line {i}\n").as_bytes())
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // A line written while the writer sleeps still leaves promptly.
        std::thread::sleep(Duration::from_millis(50));
        buffer.push(b"last\n");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !String::from_utf8(sink.0.lock().unwrap().clone()).unwrap().ends_with("last\n") {
            assert!(std::time::Instant::now() < deadline, "the writer did not wake for a lone line");
            std::thread::sleep(Duration::from_millis(1));
        }
        Flush(Some(buffer)).drop_now();
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let mut next = [0usize; 4];
        for line in text.lines().filter(|l| *l != "last") {
            let (t, i) = line.strip_prefix("thread ").unwrap().split_once(" line ").unwrap();
            let (t, i): (usize, usize) = (t.parse().unwrap(), i.parse().unwrap());
            assert_eq!(i, next[t], "thread {t}'s lines out of order or missing");
            next[t] += 1;
        }
        assert_eq!(next, [2000; 4]);
    }

    #[test]
    fn a_blocked_stderr_drops_lines_rather_than_stalling_and_says_how_many() {
        /// A writer that blocks until released.
        struct Gate(std::sync::Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>, Sink);
        impl std::io::Write for Gate {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                let (open, cv) = &*self.0;
                let mut o = open.lock().unwrap();
                while !*o {
                    o = cv.wait(o).unwrap();
                }
                self.1.write(buf)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let gate = std::sync::Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
        let sink = Sink::default();
        let buffer = LineBuffer::start_with(Gate(gate.clone(), sink.clone())).unwrap();
        buffer.push(b"first\n");
        std::thread::sleep(Duration::from_millis(20));
        let line = vec![b'x'; 1023];
        let started = std::time::Instant::now();
        for _ in 0..(MAX_BUFFERED / 1024 + 100) {
            let mut l = line.clone();
            l.push(b'\n');
            buffer.push(&l);
        }
        assert!(started.elapsed() < Duration::from_secs(2), "pushing waited for the blocked writer");
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        Flush(Some(buffer)).drop_now();
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        assert!(text.starts_with("first\n"));
        assert!(text.contains(" log lines dropped (stderr did not keep up)"), "no drop count");
        let kept = text.lines().filter(|l| l.len() == 1023).count();
        assert!(kept > 0 && kept < MAX_BUFFERED / 1024 + 100, "{kept} lines kept");
    }

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
