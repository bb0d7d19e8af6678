//! Prometheus metrics for `/metrics`, on a `prometheus-client` registry: requests, latencies,
//! upstream attempts and failovers, streams in flight, tokens in and out per model, and (read
//! from the pool at scrape time) accounts by state and token refreshes.
//!
//! Every metric the daemon updates is a private field of [`Metrics`]. [`Metrics::new`] registers
//! a clone of it before the field is set, so nothing but the `pub(crate)` method that updates
//! the metric reads the field. A metric nobody updates is therefore dead code: rustc warns that
//! its method is never used and its field never read (an error under `clippy -D warnings`),
//! where it used to be a series stuck at zero.
//!
//! `/metrics` is the Prometheus text format, version 0.0.4 ([`CONTENT_TYPE`]), which every
//! Prometheus-compatible scraper reads. The encoder appends `_total` to counters: a counter is
//! registered as `requests` and exposed as `amq2api_requests_total`.

use crate::accounts::Pool;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, prometheus_text};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// The `Content-Type` of `/metrics`: `text/plain; version=0.0.4; charset=utf-8`.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Upper bounds (seconds) of the latency histograms' buckets.
const BUCKETS: [f64; 14] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    model: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttemptLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    model: String,
    direction: &'static str,
}

/// The daemon's metrics and the registry that renders them.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    attempts: Family<AttemptLabels, Counter>,
    failovers: Counter,
    first_byte: Histogram,
    duration: Histogram,
    streams: Gauge,
    tokens: Family<TokenLabels, Counter>,
    credits: Family<ModelLabels, Counter<f64, std::sync::atomic::AtomicU64>>,
    key_requests: Family<KeyStatusLabels, Counter>,
    key_tokens: Family<KeyTokenLabels, Counter>,
    key_credits: Family<KeyLabels, Counter<f64, std::sync::atomic::AtomicU64>>,
}

/// `key`: a configured key name, or `-` for unnamed keys (so the label space is bounded by the
/// keys file).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyLabels {
    key: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyStatusLabels {
    key: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyTokenLabels {
    key: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: String,
}

/// The model label: the client's model name, or `other` for names that are not Claude model
/// names (clients choose them, so the label space is bounded).
fn model_label(model: &str) -> String {
    if model.len() <= 64 && model.starts_with("claude") { model } else { "other" }.to_string()
}

impl Metrics {
    /// The metrics, registered; the pool's state is read at each scrape.
    pub fn new(pool: Arc<Pool>) -> Metrics {
        let mut registry = Registry::with_prefix("amq2api");
        let requests = Family::default();
        registry.register(
            "requests",
            "Client requests to /v1/messages and its count_tokens by model and HTTP status",
            requests.clone(),
        );
        let attempts = Family::default();
        registry.register("upstream_attempts", "Amazon Q calls by outcome", attempts.clone());
        let failovers = Counter::default();
        registry.register(
            "failovers",
            "Requests moved to another account before the client saw a byte",
            failovers.clone(),
        );
        let first_byte = Histogram::new(BUCKETS);
        registry.register_with_unit(
            "first_byte",
            "Time to the first byte of a Messages answer (a non-streaming one: its whole body)",
            Unit::Seconds,
            first_byte.clone(),
        );
        let duration = Histogram::new(BUCKETS);
        registry.register_with_unit(
            "request_duration",
            "Time to the end of the response, streams included (not /health nor /metrics)",
            Unit::Seconds,
            duration.clone(),
        );
        let streams = Gauge::default();
        registry.register("streams_in_flight", "Streaming responses being sent", streams.clone());
        let tokens = Family::default();
        registry.register(
            "tokens",
            "Tokens of the usage reported to clients, by model and direction (in, out)",
            tokens.clone(),
        );
        let credits = Family::default();
        registry.register(
            "credits",
            "Upstream credits the service charged (meteringEvent), by model",
            credits.clone(),
        );
        let key_requests = Family::default();
        registry.register(
            "key_requests",
            "/v1/messages requests by client key name (`-`: unnamed keys) and HTTP status (429: a limit)",
            key_requests.clone(),
        );
        let key_tokens = Family::default();
        registry.register(
            "key_tokens",
            "Tokens by client key name and direction (in, out)",
            key_tokens.clone(),
        );
        let key_credits = Family::default();
        registry.register("key_credits", "Upstream credits by client key name", key_credits.clone());
        registry.register_collector(Box::new(PoolCollector(pool)));
        Metrics {
            registry,
            requests,
            attempts,
            failovers,
            first_byte,
            duration,
            streams,
            tokens,
            credits,
            key_requests,
            key_tokens,
            key_credits,
        }
    }

    /// A client request to `/v1/messages` (or `count_tokens`) answered with `status`.
    pub(crate) fn request(&self, model: &str, status: u16) {
        self.requests.get_or_create(&RequestLabels { model: model_label(model), status }).inc();
    }

    /// A finished `/v1/messages` request of client key `key` (a configured name or `-`).
    pub(crate) fn key_request(&self, key: &str, status: u16, tokens_in: u64, tokens_out: u64, credits: f64) {
        let key = key.to_owned();
        self.key_requests.get_or_create(&KeyStatusLabels { key: key.clone(), status }).inc();
        if tokens_in > 0 {
            self.key_tokens
                .get_or_create(&KeyTokenLabels { key: key.clone(), direction: "in" })
                .inc_by(tokens_in);
        }
        if tokens_out > 0 {
            self.key_tokens
                .get_or_create(&KeyTokenLabels { key: key.clone(), direction: "out" })
                .inc_by(tokens_out);
        }
        if credits > 0.0 {
            self.key_credits.get_or_create(&KeyLabels { key }).inc_by(credits);
        }
    }

    /// One call to Amazon Q ended with `outcome` (`ok`, `refresh_failed`, or a failure kind).
    pub(crate) fn attempt(&self, outcome: &'static str) {
        self.attempts.get_or_create(&AttemptLabels { outcome }).inc();
    }

    pub(crate) fn failover(&self) {
        self.failovers.inc();
    }

    pub(crate) fn first_byte(&self, d: Duration) {
        self.first_byte.observe(d.as_secs_f64());
    }

    /// A response ended (for a stream: its last byte, or the client going away).
    pub(crate) fn request_duration(&self, d: Duration) {
        self.duration.observe(d.as_secs_f64());
    }

    pub(crate) fn stream_started(&self) {
        self.streams.inc();
    }

    pub(crate) fn stream_ended(&self) {
        self.streams.dec();
    }

    pub fn streams_in_flight(&self) -> i64 {
        self.streams.get()
    }

    /// The usage an answer reported to its client: `input` and `output` tokens of `model`.
    pub(crate) fn tokens(&self, model: &str, input: u64, output: u64) {
        let model = model_label(model);
        for (direction, n) in [("in", input), ("out", output)] {
            self.tokens.get_or_create(&TokenLabels { model: model.clone(), direction }).inc_by(n);
        }
    }

    pub(crate) fn credits(&self, model: &str, credits: f64) {
        self.credits.get_or_create(&ModelLabels { model: model_label(model) }).inc_by(credits);
    }

    /// The Prometheus text exposition.
    pub(crate) fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        // Writing to a String does not fail, nor does the pool collector.
        if let Err(e) = prometheus_text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "metrics: encoding failed");
        }
        out
    }
}

/// The pool's own counters and state, read at each scrape.
struct PoolCollector(Arc<Pool>);

impl std::fmt::Debug for PoolCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PoolCollector")
    }
}

impl Collector for PoolCollector {
    // (A collector's help text is written as given: the registry's full stop is added here.)
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let pool = &self.0;
        let mut m = encoder.encode_descriptor(
            "token_refreshes",
            "OIDC token refreshes by result",
            None,
            MetricType::Counter,
        )?;
        for (result, n) in [
            ("ok", pool.refreshes_ok.load(Ordering::Relaxed)),
            ("failed", pool.refreshes_failed.load(Ordering::Relaxed)),
        ] {
            ConstCounter::new(n).encode(m.encode_family(&[("result", result)])?)?;
        }
        let s = pool.summary();
        let mut m = encoder.encode_descriptor("accounts", "Accounts by state.", None, MetricType::Gauge)?;
        for (state, n) in [
            ("active", s.active),
            ("cooling", s.cooling),
            ("quota", s.quota),
            ("suspended", s.suspended),
            ("invalid", s.invalid),
            ("disabled", s.disabled),
        ] {
            ConstGauge::new(n as i64).encode(m.encode_family(&[("state", state)])?)?;
        }
        Ok(())
    }
}
