//! Reasoning signatures the emulator can check: a `reasoningContentEvent` signature is
//! `base64(nonce ‖ HMAC-SHA256(secret, "reasoning-text" ‖ nonce ‖ text))` and redacted content
//! `base64(nonce ‖ filler ‖ HMAC-SHA256(secret, "redacted" ‖ nonce ‖ filler))`, with a secret
//! drawn at start-up per emulator. A replayed `reasoningContent` passes only when it came from
//! this emulator unchanged.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Bytes of the nonce that starts a signature or redacted content.
const NONCE: usize = 16;
/// Bytes of filler in redacted content (stands for the encrypted reasoning).
const FILLER: usize = 48;
/// Bytes of an HMAC-SHA256.
const MAC: usize = 32;
const SHA256_BLOCK: usize = 64;

/// The per-emulator signing key.
#[derive(Clone)]
pub(super) struct Signer {
    key: [u8; 32],
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(…)")
    }
}

impl Signer {
    pub fn new(key: [u8; 32]) -> Self {
        Signer { key }
    }

    /// A signature of `text`; `nonce` makes two signatures of one text differ.
    pub fn sign(&self, text: &str, nonce: &[u8; 32]) -> String {
        let nonce = &nonce[..NONCE];
        let mac = self.mac(&[b"reasoning-text", nonce, text.as_bytes()]);
        let mut raw = Vec::with_capacity(NONCE + MAC);
        raw.extend_from_slice(nonce);
        raw.extend_from_slice(&mac);
        BASE64.encode(raw)
    }

    /// Whether `signature` is this emulator's signature of exactly `text`.
    pub fn verify(&self, text: &str, signature: &str) -> bool {
        let Ok(raw) = BASE64.decode(signature.trim()) else {
            return false;
        };
        if raw.len() != NONCE + MAC {
            return false;
        }
        let (nonce, mac) = raw.split_at(NONCE);
        let expected = self.mac(&[b"reasoning-text", nonce, text.as_bytes()]);
        bool::from(expected.ct_eq(mac))
    }

    /// Redacted reasoning content made from `random` (nonce and filler).
    pub fn redacted(&self, random: &[u8; 64]) -> String {
        let (nonce, filler) = (&random[..NONCE], &random[NONCE..NONCE + FILLER]);
        let mac = self.mac(&[b"redacted", nonce, filler]);
        let mut raw = Vec::with_capacity(NONCE + FILLER + MAC);
        raw.extend_from_slice(nonce);
        raw.extend_from_slice(filler);
        raw.extend_from_slice(&mac);
        BASE64.encode(raw)
    }

    /// Whether `content` is redacted content this emulator made, unchanged.
    pub fn verify_redacted(&self, content: &str) -> bool {
        let Ok(raw) = BASE64.decode(content.trim()) else {
            return false;
        };
        if raw.len() != NONCE + FILLER + MAC {
            return false;
        }
        let (nonce, rest) = raw.split_at(NONCE);
        let (filler, mac) = rest.split_at(FILLER);
        let expected = self.mac(&[b"redacted", nonce, filler]);
        bool::from(expected.ct_eq(mac))
    }

    /// HMAC-SHA256 of `parts`, each prefixed with its length so that the split between them is
    /// part of what is signed.
    fn mac(&self, parts: &[&[u8]]) -> [u8; MAC] {
        let lengths: Vec<[u8; 8]> = parts.iter().map(|p| (p.len() as u64).to_be_bytes()).collect();
        let chunks = parts.iter().zip(&lengths).flat_map(|(part, len)| [&len[..], *part]);
        hmac_sha256(&self.key, chunks)
    }
}

/// HMAC-SHA256 (RFC 2104) with a 32-byte key over the concatenated `chunks`.
fn hmac_sha256<'a>(key: &[u8; 32], chunks: impl Iterator<Item = &'a [u8]>) -> [u8; MAC] {
    let mut ipad = [0x36u8; SHA256_BLOCK];
    let mut opad = [0x5cu8; SHA256_BLOCK];
    for (i, b) in key.iter().enumerate() {
        ipad[i] ^= b;
        opad[i] ^= b;
    }
    let mut inner = Sha256::new().chain_update(ipad);
    for chunk in chunks {
        inner.update(chunk);
    }
    let inner = inner.finalize();
    let outer = Sha256::new().chain_update(opad).chain_update(inner).finalize();
    let mut out = [0u8; MAC];
    out.copy_from_slice(&outer);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231_case_2() {
        // HMAC pads a short key with zeros to the block size: "Jefe" and "Jefe" + 28 zeros agree.
        let mut key = [0u8; 32];
        key[..4].copy_from_slice(b"Jefe");
        let mac = hmac_sha256(&key, [&b"what do ya "[..], &b"want for nothing?"[..]].into_iter());
        assert_eq!(hex::encode(mac), "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }

    #[test]
    fn signatures_verify_only_their_text_and_key() {
        let signer = Signer::new([7; 32]);
        let sig = signer.sign("I think, therefore.", &[1; 32]);
        assert!(signer.verify("I think, therefore.", &sig));
        assert!(!signer.verify("I think, therefore!", &sig));
        assert!(!Signer::new([8; 32]).verify("I think, therefore.", &sig));
        assert_ne!(sig, signer.sign("I think, therefore.", &[2; 32]), "nonces differ");
        let mut tampered = BASE64.decode(&sig).unwrap();
        tampered[20] ^= 1;
        assert!(!signer.verify("I think, therefore.", &BASE64.encode(tampered)));
        assert!(!signer.verify("x", "not base64!"));
        assert!(!signer.verify("x", ""));
    }

    #[test]
    fn redacted_content_verifies_unchanged_only() {
        let signer = Signer::new([3; 32]);
        let content = signer.redacted(&[9; 64]);
        assert!(signer.verify_redacted(&content));
        let mut raw = BASE64.decode(&content).unwrap();
        raw[30] ^= 0x40;
        assert!(!signer.verify_redacted(&BASE64.encode(raw)));
        assert!(!signer.verify_redacted(&signer.sign("x", &[0; 32])));
    }
}
