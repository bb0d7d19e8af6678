//! Random identifiers: request ids, message ids, invocation ids (OS randomness).

/// `n` random bytes from the operating system.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    // The OS random source failing is not something a daemon can work around.
    getrandom::getrandom(&mut buf).expect("the operating system's random source failed");
    buf
}

/// A random version-4 UUID, hyphenated lowercase.
pub fn uuid_v4() -> String {
    let mut b = random_bytes::<16>();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

/// A prefixed id with 24 random base62-ish characters, like Anthropic's `msg_…`/`req_…`.
pub fn prefixed(prefix: &str) -> String {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let bytes = random_bytes::<24>();
    let mut s = String::with_capacity(prefix.len() + 24);
    s.push_str(prefix);
    for b in bytes {
        s.push(ALPHABET[(b as usize) % ALPHABET.len()] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn shapes() {
        let u = super::uuid_v4();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        let m = super::prefixed("msg_");
        assert!(m.starts_with("msg_") && m.len() == 28);
        assert_ne!(super::prefixed("x"), super::prefixed("x"));
    }
}
