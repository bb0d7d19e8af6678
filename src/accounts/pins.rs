//! Sessions that stay on one account: a client session (Claude Code's session id, else the
//! client key and the conversation's first message) is pinned to the account that served it,
//! so that its requests keep landing there (one conversation, one account's cache) while that
//! account is healthy and under its limits. Bounded memory: two generations of a hash map, the
//! older dropped whenever the newer is a TTL old or half full — an idle pin is gone within one to
//! two TTLs, a live one is carried into the newer generation when used.

use crate::config::AccountId;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A session's key: 16 bytes of a hash (never the session id or the message itself).
pub type SessionKey = [u8; 16];

/// The pins.
pub struct Pins {
    inner: Mutex<Generations>,
    ttl: Duration,
    capacity: usize,
}

struct Generations {
    current: HashMap<SessionKey, AccountId>,
    previous: HashMap<SessionKey, AccountId>,
    started: Instant,
}

impl Pins {
    /// Pins idle for `ttl` go (between one and two TTLs); at most `capacity` are kept.
    pub fn new(ttl: Duration, capacity: usize) -> Pins {
        Pins {
            inner: Mutex::new(Generations {
                current: HashMap::new(),
                previous: HashMap::new(),
                started: Instant::now(),
            }),
            ttl,
            capacity: capacity.max(2),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Generations> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if g.started.elapsed() >= self.ttl || g.current.len() >= self.capacity / 2 {
            g.previous = std::mem::take(&mut g.current);
            g.started = Instant::now();
        }
        g
    }

    /// The account the session is pinned to (a use keeps the pin alive).
    pub fn get(&self, key: &SessionKey) -> Option<AccountId> {
        let mut g = self.lock();
        if let Some(id) = g.current.get(key) {
            return Some(id.clone());
        }
        let id = g.previous.remove(key)?;
        g.current.insert(*key, id.clone());
        Some(id)
    }

    /// Pins the session to `account`.
    pub fn set(&self, key: SessionKey, account: &AccountId) {
        let mut g = self.lock();
        g.previous.remove(&key);
        g.current.insert(key, account.clone());
    }

    /// Sessions pinned now.
    pub fn len(&self) -> usize {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.current.len() + g.previous.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The session key of a request: its session (Claude Code's), else the client key's tag and the
/// conversation's first user message.
pub fn session_key(session: &str) -> SessionKey {
    let d = crate::hash::sha256(format!("amq2api-session\0{session}").as_bytes());
    let mut k = [0u8; 16];
    k.copy_from_slice(&d[..16]);
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> AccountId {
        AccountId::parse(s).unwrap()
    }

    #[test]
    fn a_pin_holds_while_used_and_memory_stays_bounded() {
        let pins = Pins::new(Duration::from_secs(3600), 1000);
        pins.set(session_key("s1"), &id("a"));
        assert_eq!(pins.get(&session_key("s1")), Some(id("a")));
        assert_eq!(pins.get(&session_key("s2")), None);
        for i in 0..10_000 {
            pins.set(session_key(&format!("x{i}")), &id("b"));
        }
        assert!(pins.len() <= 1000, "bounded: {}", pins.len());
        // A session used all along survives the churn (it is carried forward when used).
        let pins = Pins::new(Duration::from_secs(3600), 100);
        pins.set(session_key("live"), &id("a"));
        for i in 0..1000 {
            pins.set(session_key(&format!("y{i}")), &id("b"));
            assert_eq!(pins.get(&session_key("live")), Some(id("a")), "after {i}");
        }
    }

    #[test]
    fn idle_pins_expire() {
        let pins = Pins::new(Duration::from_millis(20), 1000);
        pins.set(session_key("idle"), &id("a"));
        std::thread::sleep(Duration::from_millis(50));
        pins.set(session_key("other"), &id("b"));
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(pins.get(&session_key("idle")), None);
    }
}
