//! Named client keys (`keys.toml`): who is calling, whether they may (expiry, enabled, models),
//! their limits (rpm, concurrency, tokens a UTC day, credits a UTC month), and usage accounting
//! per key, account and model per UTC day ([`usage`]).
//!
//! Every check is constant time per request: a key's live state holds the start times of its
//! last `rpm` requests (a ring), its in-flight count, and its running totals for today and this
//! month; nothing scans history. The totals are restored from the store at start-up, and a
//! reload keeps each name's live state (a lowered limit applies to the next request).
//!
//! Budgets are checked when a request starts, against what finished requests used: requests
//! already in flight when a budget runs out still finish (a running stream is never cut), so a
//! budget can be exceeded by at most what those in-flight requests use.

pub mod usage;

use crate::anthropic::{ApiError, ErrorKind};
use crate::config::{AuthConfig, KeySet, KeySpec};
use crate::hash::sha256;
use std::collections::{HashMap, VecDeque};
#[cfg(test)]
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use subtle::{ConditionallySelectable, ConstantTimeEq};
pub use usage::{Usage, UsageEvent};

/// The window of `rpm`.
pub const RPM_WINDOW: Duration = Duration::from_secs(60);

/// A key's live state, kept by name across reloads.
#[derive(Debug, Default)]
pub struct Live {
    inner: Mutex<LiveInner>,
}

#[derive(Debug, Default)]
struct LiveInner {
    /// Start times of the last requests (at most `rpm` of them).
    starts: VecDeque<Instant>,
    in_flight: u32,
    /// UTC day number of `day_tokens`.
    day: i64,
    day_tokens: u64,
    /// (year, month) of `month_credits`.
    month: (i64, u32),
    month_credits: f64,
    /// Requests refused by a limit (for `amqctl keys`).
    refused: u64,
}

impl LiveInner {
    /// Starts a new day's tokens and a new month's credits when the clock has moved into them.
    /// Only forwards: a wall clock stepped back across midnight (NTP, a restored VM) keeps the
    /// spend so far instead of giving the day's (or month's) budget back.
    fn roll(&mut self, now: SystemTime) {
        let day = day_number(now);
        if day > self.day {
            self.day = day;
            self.day_tokens = 0;
        }
        let month = month_of(day);
        if month > self.month {
            self.month = month;
            self.month_credits = 0.0;
        }
    }
}

/// One named key and its live state.
#[derive(Debug)]
pub struct NamedKey {
    pub spec: KeySpec,
    pub live: Arc<Live>,
}

/// Who sent a request.
#[derive(Debug, Clone)]
pub enum Caller {
    Named(Arc<NamedKey>),
    /// An `[auth] api_keys` key: its short fingerprint (no limits).
    Unnamed(String),
    /// `allow_anonymous` without keys.
    Anonymous,
}

impl Caller {
    /// What logs show: the key's name, or an unnamed key's fingerprint.
    pub fn label(&self) -> String {
        match self {
            Caller::Named(k) => k.spec.name.clone(),
            Caller::Unnamed(tag) => tag.clone(),
            Caller::Anonymous => "-".into(),
        }
    }

    /// The name usage and metrics use: the key's name, or `-` for unnamed keys.
    pub fn usage_name(&self) -> &str {
        match self {
            Caller::Named(k) => &k.spec.name,
            _ => "-",
        }
    }
}

/// A request admitted under a key's concurrency limit; dropping it frees the slot.
#[derive(Debug)]
pub struct Admitted {
    live: Arc<Live>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut l = self.live.inner.lock().unwrap_or_else(|e| e.into_inner());
        l.in_flight = l.in_flight.saturating_sub(1);
    }
}

/// The named keys in use and their live state.
pub struct Keys {
    table: RwLock<Arc<Vec<Arc<NamedKey>>>>,
    lives: Mutex<HashMap<String, Arc<Live>>>,
    pub usage: Arc<Usage>,
}

/// Days since 1970-01-01 (UTC) of `t`.
pub fn day_number(t: SystemTime) -> i64 {
    (t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() / 86_400) as i64
}

fn month_of(day: i64) -> (i64, u32) {
    let (y, m, _) = crate::config::keys::civil_from_days(day);
    (y, m)
}

/// `YYYY-MM-DD` of a day number.
pub fn day_string(day: i64) -> String {
    let (y, m, d) = crate::config::keys::civil_from_days(day);
    format!("{y:04}-{m:02}-{d:02}")
}

/// The start of the next UTC day after day number `day`, as RFC 3339.
fn next_day(day: i64) -> (String, SystemTime) {
    let t = UNIX_EPOCH + Duration::from_secs((day as u64 + 1) * 86_400);
    (format!("{}T00:00:00Z", day_string(day + 1)), t)
}

fn next_month(day: i64) -> (String, SystemTime) {
    let (y, m) = month_of(day);
    let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    let first = crate::config::keys::days_from_civil(ny, nm as i64, 1);
    (format!("{ny:04}-{nm:02}-01T00:00:00Z"), UNIX_EPOCH + Duration::from_secs(first as u64 * 86_400))
}

fn until(t: SystemTime, now: SystemTime) -> Duration {
    let d = t.duration_since(now).unwrap_or_default();
    // Whole seconds, rounded up: retrying at the advertised time succeeds.
    Duration::from_secs(d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(Duration::from_secs(1))
}

fn rate_limited(msg: String, retry: Duration) -> ApiError {
    ApiError::new(ErrorKind::RateLimit, msg).with_retry_after(retry)
}

impl Keys {
    /// The keys of `set`, with today's and this month's use restored from `usage`.
    pub fn new(set: &KeySet, usage: Arc<Usage>) -> Keys {
        let keys = Keys { table: RwLock::default(), lives: Mutex::default(), usage };
        keys.apply(set);
        keys
    }

    /// Replaces the keys (a reload): each name keeps its live state.
    pub fn apply(&self, set: &KeySet) {
        let now = SystemTime::now();
        let today = day_number(now);
        let mut lives = self.lives.lock().unwrap_or_else(|e| e.into_inner());
        // New names start from what the store says they spent (one read for all of them).
        let restored = if set.keys.iter().any(|k| !lives.contains_key(&k.name)) {
            self.usage.restore_keys(today)
        } else {
            HashMap::new()
        };
        let mut table = Vec::new();
        for spec in &set.keys {
            let live = lives
                .entry(spec.name.clone())
                .or_insert_with(|| {
                    let live = Arc::new(Live::default());
                    let (tokens, credits) = restored.get(&spec.name).copied().unwrap_or_default();
                    let mut l = live.inner.lock().unwrap_or_else(|e| e.into_inner());
                    l.roll(now);
                    l.day_tokens = tokens;
                    l.month_credits = credits;
                    drop(l);
                    live
                })
                .clone();
            table.push(Arc::new(NamedKey { spec: spec.clone(), live }));
        }
        // A name removed keeps its running state while requests it admitted are in flight or
        // its last start is inside the `rpm` window: removed and added back by two quick
        // reloads (an edit undone), it is the same key, not a fresh allowance.
        let now_i = Instant::now();
        lives.retain(|name, live| {
            set.keys.iter().any(|k| &k.name == name) || {
                let l = live.inner.lock().unwrap_or_else(|e| e.into_inner());
                l.in_flight > 0 || l.starts.back().is_some_and(|t| now_i.duration_since(*t) < RPM_WINDOW)
            }
        });
        *self.table.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(table);
    }

    pub fn list(&self) -> Arc<Vec<Arc<NamedKey>>> {
        self.table.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Who presented `presented`. The presented key is hashed once and compared with every named
    /// and unnamed digest in constant time. An expired or disabled named key is a 401.
    pub fn identify(&self, auth: &AuthConfig, presented: Option<&str>) -> Result<Caller, ApiError> {
        let table = self.list();
        if auth.keys.is_empty() && table.is_empty() && auth.allow_anonymous {
            return Ok(Caller::Anonymous);
        }
        let invalid = || ApiError::new(ErrorKind::Authentication, "invalid x-api-key");
        let Some(k) = presented else { return Err(invalid()) };
        let digest = sha256(k.as_bytes());
        let mut found = subtle::Choice::from(0u8);
        let mut index = 0u32;
        for (i, named) in table.iter().enumerate() {
            let eq = named.spec.digest.ct_eq(&digest);
            index = u32::conditional_select(&index, &(i as u32), eq);
            found |= eq;
        }
        if bool::from(found) {
            let named = table[index as usize].clone();
            if !named.spec.enabled {
                return Err(ApiError::new(
                    ErrorKind::Authentication,
                    format!("key {:?} is disabled", named.spec.name),
                ));
            }
            if named.spec.expires.is_some_and(|e| e <= SystemTime::now()) {
                return Err(ApiError::new(
                    ErrorKind::Authentication,
                    format!("key {:?} has expired", named.spec.name),
                ));
            }
            return Ok(Caller::Named(named));
        }
        if auth.keys.verify(k) {
            return Ok(Caller::Unnamed(crate::hash::fingerprint_of(k.as_bytes())));
        }
        Err(invalid())
    }

    /// Whether `caller` may use `model` (403 `permission_error` when not).
    pub fn check_model(caller: &Caller, model: &str) -> Result<(), ApiError> {
        match caller {
            Caller::Named(k) if !k.spec.allows_model(model) => Err(ApiError::new(
                ErrorKind::Permission,
                format!(
                    "key {:?} may not use model {model:?} (allowed: {})",
                    k.spec.name,
                    k.spec.models.join(", ")
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Whether `caller` may use `model` as it will be served: `served` is the Amazon Q model the
    /// name resolved to. The name alone is not enough: resolution matches families and falls
    /// back (`claude-sonnet-x-opus` is served by Opus, and `[models] "*"` serves any name), so
    /// the model served must be the one the name names (the name starts with its Claude id) or
    /// itself be allowed.
    pub fn check_served(caller: &Caller, model: &str, served: &str) -> Result<(), ApiError> {
        Keys::check_model(caller, model)?;
        let Caller::Named(k) = caller else { return Ok(()) };
        let id = crate::translate::catalog::claude_id(served);
        if served.is_empty() || model.starts_with(&id) || k.spec.allows_model(&id) {
            return Ok(());
        }
        Err(ApiError::new(
            ErrorKind::Permission,
            format!(
                "key {:?} may not use model {id:?}, which serves {model:?} (allowed: {})",
                k.spec.name,
                k.spec.models.join(", ")
            ),
        ))
    }

    /// Admits a request that is about to go upstream, or says which limit it hit: the model
    /// (403; `served`: the Amazon Q model the name resolved to, see [`Keys::check_served`]),
    /// the day's tokens or the month's credits (429 naming the budget and its reset),
    /// concurrency or rpm (429 with an honest `retry-after`).
    pub fn admit(caller: &Caller, model: &str, served: &str) -> Result<Option<Admitted>, ApiError> {
        let Caller::Named(k) = caller else { return Ok(None) };
        Keys::check_served(caller, model, served)?;
        let now = Instant::now();
        let mut l = k.live.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = Keys::limits(k, &mut l, now, true) {
            l.refused += 1;
            return Err(e);
        }
        if let Some(rpm) = k.spec.rpm {
            if l.starts.len() == rpm.get() as usize {
                l.starts.pop_front();
            }
            l.starts.push_back(now);
        }
        l.in_flight += 1;
        drop(l);
        Ok(Some(Admitted { live: k.live.clone() }))
    }

    /// The key's limits before its request's body is read: a key over its budgets — and, for a
    /// `/v1/messages` call (`slots`), its `max_concurrency` or its `rpm` — is refused then,
    /// before its bodies take their share of the body budget and the parsing threads that
    /// every key shares. (`count_tokens` takes no slot and no `rpm` start, so only the budgets
    /// hold it back.) Nothing is taken: the request is admitted, with its model, by
    /// [`Keys::admit`].
    pub fn precheck(caller: &Caller, slots: bool) -> Result<(), ApiError> {
        let Caller::Named(k) = caller else { return Ok(()) };
        let mut l = k.live.inner.lock().unwrap_or_else(|e| e.into_inner());
        let r = Keys::limits(k, &mut l, Instant::now(), slots);
        if r.is_err() {
            l.refused += 1;
        }
        r
    }

    /// The budgets, and with `slots` the `max_concurrency` and `rpm`, of `k` against its live
    /// counts (rolled to now).
    fn limits(k: &NamedKey, l: &mut LiveInner, now: Instant, slots: bool) -> Result<(), ApiError> {
        let spec = &k.spec;
        let name = &spec.name;
        let now_sys = SystemTime::now();
        l.roll(now_sys);
        if let Some(limit) = spec.tokens_per_day {
            if l.day_tokens >= limit {
                let (when, t) = next_day(l.day);
                let used = l.day_tokens;
                return Err(rate_limited(
                    format!(
                        "key {name:?}: daily token budget used up ({used} of {limit} tokens_per_day); it resets at {when}"
                    ),
                    until(t, now_sys),
                ));
            }
        }
        if let Some(limit) = spec.credits_per_month {
            if l.month_credits >= limit {
                let (when, t) = next_month(l.day);
                let used = l.month_credits;
                return Err(rate_limited(
                    format!(
                        "key {name:?}: monthly credit budget used up ({used:.2} of {limit} credits_per_month); it resets at {when}"
                    ),
                    until(t, now_sys),
                ));
            }
        }
        if !slots {
            return Ok(());
        }
        if let Some(max) = spec.max_concurrency {
            if l.in_flight >= max.get() {
                let n = l.in_flight;
                return Err(rate_limited(
                    format!(
                        "key {name:?}: {n} requests in flight, the most max_concurrency allows; retry when one ends"
                    ),
                    Duration::from_secs(1),
                ));
            }
        }
        if let Some(rpm) = spec.rpm {
            let rpm = rpm.get() as usize;
            // A lowered limit: only the newest `rpm` starts matter.
            while l.starts.len() > rpm {
                l.starts.pop_front();
            }
            if l.starts.len() == rpm {
                let oldest = l.starts[0];
                if now.duration_since(oldest) < RPM_WINDOW {
                    let wait = (oldest + RPM_WINDOW).duration_since(now);
                    let wait = Duration::from_secs(wait.as_secs() + u64::from(wait.subsec_nanos() > 0));
                    return Err(rate_limited(
                        format!("key {name:?}: rpm limit of {rpm} requests a minute reached"),
                        wait.max(Duration::from_secs(1)),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Counts a finished request: usage rows (key, account, model) and the key's budgets.
    pub fn record(&self, caller: &Caller, ev: UsageEvent) {
        if let Caller::Named(k) = caller {
            let mut l = k.live.inner.lock().unwrap_or_else(|e| e.into_inner());
            l.roll(SystemTime::now());
            l.day_tokens += ev.tokens_in + ev.tokens_out;
            l.month_credits += ev.credits;
        }
        self.usage.record(caller.usage_name(), ev);
    }

    /// `[cluster]`: sets every key's day tokens and month credits to the fleet's totals (what
    /// PostgreSQL holds after this node's flush, plus what this node counted since). On a
    /// failure the counts stay as they are. Blocking.
    pub fn follow_fleet(&self) -> Result<(), String> {
        let today = day_number(SystemTime::now());
        let totals = self.usage.key_totals(today)?;
        let pending = self.usage.pending_keys(today);
        let now = SystemTime::now();
        for k in self.list().iter() {
            let name = &k.spec.name;
            let (t, c) = totals.get(name).copied().unwrap_or_default();
            let (pt, pc) = pending.get(name).copied().unwrap_or_default();
            let mut l = k.live.inner.lock().unwrap_or_else(|e| e.into_inner());
            l.roll(now);
            l.day_tokens = t + pt;
            l.month_credits = c + pc;
        }
        Ok(())
    }

    /// `[cluster]`: [`Keys::follow_fleet`] every [`usage::BATCH_WINDOW`] until the stop.
    pub async fn run_fleet_budgets(self: Arc<Self>, mut shutdown: crate::shutdown::Shutdown) {
        let mut failing = false;
        loop {
            tokio::select! {
                _ = shutdown.recv() => break,
                _ = tokio::time::sleep(usage::BATCH_WINDOW) => {}
            }
            let me = self.clone();
            match crate::reload::off_runtime(move || me.follow_fleet()).await {
                Ok(()) => failing = false,
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "cannot read the fleet's key usage; budgets count this node's use meanwhile");
                }
                Err(_) => {}
            }
        }
    }

    /// Each key with its limits, today's use and state (`amqctl keys`).
    pub fn view(&self) -> Vec<KeyView> {
        let now = SystemTime::now();
        let inst = Instant::now();
        self.list()
            .iter()
            .map(|k| {
                let mut l = k.live.inner.lock().unwrap_or_else(|e| e.into_inner());
                l.roll(now);
                let s = &k.spec;
                let state = if !s.enabled {
                    "disabled"
                } else if s.expires.is_some_and(|e| e <= now) {
                    "expired"
                } else if s.tokens_per_day.is_some_and(|t| l.day_tokens >= t)
                    || s.credits_per_month.is_some_and(|c| l.month_credits >= c)
                {
                    "budget-exhausted"
                } else {
                    "active"
                };
                KeyView {
                    name: s.name.clone(),
                    state: state.into(),
                    enabled: s.enabled,
                    expires: s.expires.map(|e| e.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()),
                    rpm: s.rpm.map(|n| n.get()),
                    max_concurrency: s.max_concurrency.map(|n| n.get()),
                    tokens_per_day: s.tokens_per_day,
                    credits_per_month: s.credits_per_month,
                    models: s.models.clone(),
                    in_flight: l.in_flight,
                    requests_last_minute: l
                        .starts
                        .iter()
                        .filter(|t| inst.duration_since(**t) < RPM_WINDOW)
                        .count() as u32,
                    tokens_today: l.day_tokens,
                    credits_this_month: l.month_credits,
                    refused: l.refused,
                }
            })
            .collect()
    }
}

/// One key as `amqctl keys` shows it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct KeyView {
    pub name: String,
    /// `active`, `disabled`, `expired`, `budget-exhausted`.
    pub state: String,
    pub enabled: bool,
    /// Unix seconds.
    pub expires: Option<u64>,
    pub rpm: Option<u32>,
    pub max_concurrency: Option<u32>,
    pub tokens_per_day: Option<u64>,
    pub credits_per_month: Option<f64>,
    pub models: Vec<String>,
    pub in_flight: u32,
    pub requests_last_minute: u32,
    pub tokens_today: u64,
    pub credits_this_month: f64,
    /// Requests refused by a limit since the daemon started.
    pub refused: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ApiKeys;

    /// The clock stepped back across midnight (or a month's end) and forward again: the spend
    /// of the day and the month is kept, not given back.
    #[test]
    fn budgets_roll_only_forwards() {
        let day = |d: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(d * 86_400 + 60);
        // 2025-12-01 is day 20,423 since 1970-01-01; 2025-11-30 the day before.
        let (dec1, nov30) = (day(20_423), day(20_422));
        let mut live = LiveInner::default();
        live.roll(dec1);
        live.day_tokens = 500;
        live.month_credits = 2.5;
        live.roll(nov30);
        live.roll(dec1);
        assert_eq!((live.day_tokens, live.month_credits), (500, 2.5));
        live.roll(day(20_424));
        assert_eq!((live.day_tokens, live.month_credits), (0, 2.5), "a new day, the same month");
        live.roll(day(20_423 + 31));
        assert_eq!((live.day_tokens, live.month_credits), (0, 0.0), "a new month");
        assert!(!crate::config::keys::valid_name("-"), "the unnamed keys' usage label");
        assert!(!crate::config::keys::valid_name("--"));
        assert!(crate::config::keys::valid_name("team-a"));
    }

    fn spec(name: &str, key: &str) -> KeySpec {
        KeySpec {
            name: name.into(),
            digest: sha256(key.as_bytes()),
            enabled: true,
            rpm: None,
            max_concurrency: None,
            tokens_per_day: None,
            credits_per_month: None,
            models: vec![],
            expires: None,
        }
    }

    fn auth() -> AuthConfig {
        AuthConfig {
            keys: ApiKeys::new(vec![sha256(b"unnamed-key-0123456789")]),
            allow_anonymous: false,
            keys_file: None,
        }
    }

    /// A key's model list is held against the model that serves the request, not only the name
    /// the client gave: a name that resolves to another family, or falls back to a model the
    /// key may not use, is refused.
    #[test]
    fn a_model_allow_list_holds_for_the_model_served() {
        let mut s = spec("a", "key-a-0123456789abcdef");
        s.models = vec!["claude-sonnet-*".into()];
        let mut dated = spec("b", "key-b-0123456789abcdef");
        dated.models = vec!["claude-sonnet-4-5-20250929".into()];
        let keys = Keys::new(&KeySet { keys: vec![s, dated] }, Usage::new(None, 400));
        let a = keys.identify(&auth(), Some("key-a-0123456789abcdef")).unwrap();
        let e = Keys::check_served(&a, "claude-sonnet-x-opus", "claude-opus-4.5").unwrap_err();
        assert_eq!(e.kind, ErrorKind::Permission);
        assert!(e.message.contains("claude-opus-4-5"), "{}", e.message);
        assert!(Keys::check_served(&a, "claude-sonnet-4-5-20250929", "claude-sonnet-4.5").is_ok());
        assert!(
            Keys::check_served(&a, "claude-sonnet-next", "claude-sonnet-4.5").is_ok(),
            "a fallback it may use"
        );
        assert!(Keys::check_served(&a, "claude-opus-4-5", "claude-opus-4.5").is_err(), "the name itself");
        let b = keys.identify(&auth(), Some("key-b-0123456789abcdef")).unwrap();
        assert!(Keys::check_served(&b, "claude-sonnet-4-5-20250929", "claude-sonnet-4.5").is_ok());
        let unnamed = keys.identify(&auth(), Some("unnamed-key-0123456789")).unwrap();
        assert!(Keys::check_served(&unnamed, "anything", "claude-opus-4.5").is_ok());
    }

    #[test]
    fn rpm_retry_after_is_when_the_oldest_start_leaves_the_minute() {
        let mut s = spec("a", "key-a-0123456789abcdef");
        s.rpm = NonZeroU32::new(2);
        let keys = Keys::new(&KeySet { keys: vec![s.clone()] }, Usage::new(None, 400));
        let c = keys.identify(&auth(), Some("key-a-0123456789abcdef")).unwrap();
        assert_eq!(c.label(), "a");
        assert!(Keys::admit(&c, "m", "").is_ok());
        assert!(Keys::admit(&c, "m", "").is_ok());
        let e = Keys::admit(&c, "m", "").unwrap_err();
        assert_eq!(e.kind, ErrorKind::RateLimit);
        assert!((59..=60).contains(&e.retry_after.unwrap().as_secs()), "{e:?}");
        // A reload raising the limit: the next request passes; lowering it: refused again.
        s.rpm = NonZeroU32::new(3);
        keys.apply(&KeySet { keys: vec![s.clone()] });
        let c = keys.identify(&auth(), Some("key-a-0123456789abcdef")).unwrap();
        assert!(Keys::admit(&c, "m", "").is_ok());
        s.rpm = NonZeroU32::new(1);
        keys.apply(&KeySet { keys: vec![s] });
        let c = keys.identify(&auth(), Some("key-a-0123456789abcdef")).unwrap();
        assert!(Keys::admit(&c, "m", "").is_err());
        assert!(matches!(keys.identify(&auth(), Some("unnamed-key-0123456789")), Ok(Caller::Unnamed(_))));
        assert!(keys.identify(&auth(), Some("nobody-0123456789")).is_err());
        assert!(keys.identify(&auth(), None).is_err());
    }

    #[test]
    fn month_and_day_resets() {
        let d = crate::config::keys::days_from_civil(2026, 12, 6);
        assert_eq!(next_day(d).0, "2026-12-07T00:00:00Z");
        assert_eq!(next_month(d).0, "2027-01-01T00:00:00Z");
        assert_eq!(day_string(d), "2026-12-06");
    }

    /// The accounting's cost per request (identify + admit + release + record), printed: run with
    /// `cargo test --release -p amq2api --lib keys::tests::cost -- --nocapture`.
    #[test]
    fn cost_per_request() {
        let names: Vec<KeySpec> =
            (0..50).map(|i| spec(&format!("k{i}"), &format!("key-{i}-0123456789abcdef"))).collect();
        let mut limited = names.clone();
        for k in &mut limited {
            k.rpm = NonZeroU32::new(1_000_000);
            k.max_concurrency = NonZeroU32::new(1000);
            k.tokens_per_day = Some(u64::MAX / 2);
            k.credits_per_month = Some(1e12);
        }
        let keys = Keys::new(&KeySet { keys: limited }, Usage::new(None, 400));
        let a = auth();
        let n = 100_000;
        let t0 = Instant::now();
        for i in 0..n {
            let c = keys.identify(&a, Some("key-49-0123456789abcdef")).unwrap();
            let g = Keys::admit(&c, "claude-sonnet-4-5", "claude-sonnet-4.5").unwrap();
            drop(g);
            keys.record(
                &c,
                UsageEvent {
                    account: Some(format!("acct-{}", i % 8)),
                    model: "claude-sonnet-4-5".into(),
                    error: false,
                    tokens_in: 100,
                    tokens_out: 50,
                    credits: 0.01,
                },
            );
        }
        let per = t0.elapsed() / n;
        keys.usage.flush().unwrap();
        println!("accounting: {per:?} a request (50 named keys, every limit set)");
        assert_eq!(keys.view()[49].tokens_today, 150 * n as u64);
    }
}
