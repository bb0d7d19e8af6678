//! Secret values (tokens, client secrets, API keys) that never print themselves and are wiped
//! from memory when dropped.

use crate::hash::{fingerprint_of, sha256};
use serde::{Deserialize, Deserializer};
use std::fmt;
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// A secret string. `Debug` and `Display` print `***`; the value is reached only through
/// [`Secret::expose`], so every place that handles the raw value is easy to find. Dropping it
/// overwrites its bytes with zeros (a core dump or a swapped-out page then holds no stale copy).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Zeroize for Secret {
    fn zeroize(&mut self) {
        self.0.zeroize();
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.zeroize();
    }
}

impl ZeroizeOnDrop for Secret {}

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The raw value. Only for sending it where it belongs (an HTTP header, the store).
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// SHA-256 of the value.
    pub fn digest(&self) -> [u8; 32] {
        sha256(self.0.as_bytes())
    }

    /// A short, non-reversible tag (first 8 hex digits of the SHA-256) that lets an operator
    /// tell two secrets apart in logs and `amqctl` output without learning either.
    pub fn fingerprint(&self) -> String {
        fingerprint_of(self.0.as_bytes())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

/// The set of accepted client API keys, held only as SHA-256 digests.
///
/// A presented key is hashed once and compared against every entry in constant time, so
/// neither the comparison nor the number of entries checked reveals which bytes matched.
#[derive(Clone, Default)]
pub struct ApiKeys {
    digests: Vec<[u8; 32]>,
}

impl ApiKeys {
    pub fn new(digests: Vec<[u8; 32]>) -> Self {
        ApiKeys { digests }
    }

    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    pub fn len(&self) -> usize {
        self.digests.len()
    }

    /// True when `presented` is one of the configured keys.
    pub fn verify(&self, presented: &str) -> bool {
        let digest = sha256(presented.as_bytes());
        let mut found = subtle::Choice::from(0u8);
        for d in &self.digests {
            found |= d.ct_eq(&digest);
        }
        bool::from(found)
    }
}

impl fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKeys({} keys)", self.digests.len())
    }
}

/// Parses one `api_keys` entry: a plain key, or `sha256:<64 hex digits>`.
pub fn parse_api_key_entry(entry: &str) -> Result<[u8; 32], String> {
    if let Some(hexpart) = entry.strip_prefix("sha256:") {
        let bytes = hex::decode(hexpart.trim())
            .map_err(|_| "a sha256: entry must be followed by 64 hex digits".to_string())?;
        <[u8; 32]>::try_from(bytes.as_slice())
            .map_err(|_| "a sha256: entry must be followed by 64 hex digits".to_string())
    } else if entry.trim().is_empty() {
        Err("an API key must not be empty".into())
    } else if entry.len() < 16 {
        Err("an API key must be at least 16 characters long".into())
    } else if entry.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Err("an API key must not contain white space or control characters".into())
    } else {
        Ok(sha256(entry.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_never_prints() {
        let s = Secret::new("super-secret-token");
        assert_eq!(format!("{s:?}"), "***");
        assert_eq!(format!("{s}"), "***");
        assert_eq!(format!("{:?}", Some(s.clone())), "Some(***)");
        assert_eq!(s.expose(), "super-secret-token");
        assert_eq!(s.fingerprint().len(), 8);
    }

    /// Compiles only while `Secret` promises to wipe itself on drop.
    fn wiped_on_drop<T: ZeroizeOnDrop>() {}

    #[test]
    fn secret_wipes_itself() {
        wiped_on_drop::<Secret>();
        // What drop runs: the bytes are overwritten and the value is gone.
        let mut s = Secret::new("super-secret-token");
        s.zeroize();
        assert_eq!(s.expose(), "");
        assert!(s.is_empty());
    }

    #[test]
    fn api_keys_plain_and_digest() {
        let plain = parse_api_key_entry("sk-amq-0123456789abcdef").unwrap();
        let digest_entry = format!("sha256:{}", hex::encode(sha256(b"sk-amq-other-key-000")));
        let digest = parse_api_key_entry(&digest_entry).unwrap();
        let keys = ApiKeys::new(vec![plain, digest]);
        assert!(keys.verify("sk-amq-0123456789abcdef"));
        assert!(keys.verify("sk-amq-other-key-000"));
        assert!(!keys.verify("sk-amq-0123456789abcdeF"));
        assert!(!keys.verify(""));
        assert!(parse_api_key_entry("sha256:zz").is_err());
        assert!(parse_api_key_entry("short").is_err());
        assert!(!format!("{keys:?}").contains("sk-amq"));
    }
}
