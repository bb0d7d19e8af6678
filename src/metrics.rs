//! Prometheus metrics for `/metrics`: requests, latencies, upstream attempts and failovers,
//! streams in flight, token refreshes, accounts by state, tokens in and out.

use crate::accounts::Pool;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

const BUCKETS: [f64; 14] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];

#[derive(Default)]
struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                self.counts[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {}", self.counts[i].load(Ordering::Relaxed));
        }
        let n = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {n}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {n}");
    }
}

#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    attempts: Mutex<BTreeMap<String, u64>>,
    failovers: AtomicU64,
    first_byte: Histogram,
    total: Histogram,
    streams: AtomicI64,
    tokens_in: AtomicU64,
    tokens_out: AtomicU64,
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

impl Metrics {
    pub fn request(&self, model: &str, status: u16) {
        // Bound the label space: unknown model names from clients are folded together.
        let model = if model.len() <= 64 && model.starts_with("claude") { model } else { "other" };
        *self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((model.to_string(), status))
            .or_default() += 1;
    }

    pub fn attempt(&self, outcome: &str) {
        *self.attempts.lock().unwrap_or_else(|e| e.into_inner()).entry(outcome.to_string()).or_default() += 1;
    }

    pub fn failover(&self) {
        self.failovers.fetch_add(1, Ordering::Relaxed);
    }

    pub fn first_byte(&self, d: Duration) {
        self.first_byte.observe(d);
    }

    pub fn total(&self, d: Duration) {
        self.total.observe(d);
    }

    pub fn stream_started(&self) {
        self.streams.fetch_add(1, Ordering::Relaxed);
    }

    pub fn stream_ended(&self) {
        self.streams.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn streams_in_flight(&self) -> i64 {
        self.streams.load(Ordering::Relaxed)
    }

    pub fn tokens(&self, input: u64, output: u64) {
        self.tokens_in.fetch_add(input, Ordering::Relaxed);
        self.tokens_out.fetch_add(output, Ordering::Relaxed);
    }

    /// The Prometheus text exposition.
    pub fn render(&self, pool: &Pool) -> String {
        let mut out = String::with_capacity(4096);
        out.push_str("# HELP amq2api_requests_total Client requests by model and HTTP status.\n");
        out.push_str("# TYPE amq2api_requests_total counter\n");
        for ((model, status), n) in self.requests.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(
                out,
                "amq2api_requests_total{{model=\"{}\",status=\"{status}\"}} {n}",
                escape(model)
            );
        }
        out.push_str("# HELP amq2api_upstream_attempts_total Amazon Q calls by outcome.\n");
        out.push_str("# TYPE amq2api_upstream_attempts_total counter\n");
        for (outcome, n) in self.attempts.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "amq2api_upstream_attempts_total{{outcome=\"{}\"}} {n}", escape(outcome));
        }
        let _ = writeln!(
            out,
            "# HELP amq2api_failovers_total Requests moved to another account before the client saw a byte.\n# TYPE amq2api_failovers_total counter\namq2api_failovers_total {}",
            self.failovers.load(Ordering::Relaxed)
        );
        self.first_byte.render(
            "amq2api_first_byte_seconds",
            "Time to the first byte sent to the client.",
            &mut out,
        );
        self.total.render("amq2api_request_duration_seconds", "Time to the end of the response.", &mut out);
        let _ = writeln!(
            out,
            "# HELP amq2api_streams_in_flight Streaming responses being sent.\n# TYPE amq2api_streams_in_flight gauge\namq2api_streams_in_flight {}",
            self.streams.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP amq2api_token_refreshes_total OIDC token refreshes by result.\n# TYPE amq2api_token_refreshes_total counter\namq2api_token_refreshes_total{{result=\"ok\"}} {}\namq2api_token_refreshes_total{{result=\"failed\"}} {}",
            pool.refreshes_ok.load(Ordering::Relaxed),
            pool.refreshes_failed.load(Ordering::Relaxed)
        );
        let s = pool.summary();
        out.push_str("# HELP amq2api_accounts Accounts by state.\n# TYPE amq2api_accounts gauge\n");
        for (state, n) in [
            ("active", s.active),
            ("cooling", s.cooling),
            ("quota", s.quota),
            ("suspended", s.suspended),
            ("invalid", s.invalid),
            ("disabled", s.disabled),
        ] {
            let _ = writeln!(out, "amq2api_accounts{{state=\"{state}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP amq2api_tokens_total Tokens by direction.\n# TYPE amq2api_tokens_total counter\namq2api_tokens_total{{direction=\"in\"}} {}\namq2api_tokens_total{{direction=\"out\"}} {}",
            self.tokens_in.load(Ordering::Relaxed),
            self.tokens_out.load(Ordering::Relaxed)
        );
        out
    }
}
