//! Hashing helpers: SHA-256 and the short fingerprints that tell secrets, keys and names apart
//! in logs and `amqctl` output without revealing them.

use sha2::{Digest, Sha256};

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let out = Sha256::digest(data);
    let mut arr = [0u8; 32];
    arr.copy_from_slice(&out);
    arr
}

/// SHA-256 of what `write` formats, hashed as it is written (no string is built).
pub fn sha256_of_fmt(write: impl FnOnce(&mut dyn std::fmt::Write) -> std::fmt::Result) -> [u8; 32] {
    struct Hashing(Sha256);
    impl std::fmt::Write for Hashing {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            self.0.update(s.as_bytes());
            Ok(())
        }
    }
    let mut h = Hashing(Sha256::new());
    // Writing into the hasher cannot fail; a Debug impl that fails leaves what it wrote.
    let _ = write(&mut h);
    h.0.finalize().into()
}

/// First 8 hex digits of SHA-256: a short, stable tag for a secret.
pub fn fingerprint_of(data: &[u8]) -> String {
    hex::encode(&sha256(data)[..4])
}

#[cfg(test)]
mod tests {
    #[test]
    fn hashing_as_written_equals_hashing_the_string() {
        let v = vec![Some("a\u{e9}\"b"), None];
        assert_eq!(super::sha256_of_fmt(|w| write!(w, "{v:?}")), super::sha256(format!("{v:?}").as_bytes()));
    }
}
