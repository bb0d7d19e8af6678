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

/// First 8 hex digits of SHA-256: a short, stable tag for a secret.
pub fn fingerprint_of(data: &[u8]) -> String {
    hex::encode(&sha256(data)[..4])
}
