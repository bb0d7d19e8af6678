//! Random identifiers: request ids, message ids, invocation ids (OS randomness).

/// `n` random bytes from the operating system.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    // The OS random source failing is not something a daemon can work around.
    getrandom::getrandom(&mut buf).expect("the operating system's random source failed");
    buf
}

/// `N` bytes of OS randomness for an identifier, taken from a per-thread buffer refilled 4 KiB
/// at a time: a request needs several ids, and a system call for each showed in profiles.
fn id_bytes<const N: usize>() -> [u8; N] {
    const POOL: usize = 4096;
    thread_local! {
        static BUF: std::cell::RefCell<(Box<[u8; POOL]>, usize)> =
            std::cell::RefCell::new((Box::new([0; POOL]), POOL));
    }
    BUF.with_borrow_mut(|(buf, used)| {
        if *used + N > POOL {
            getrandom::getrandom(&mut buf[..]).expect("the operating system's random source failed");
            *used = 0;
        }
        let mut out = [0u8; N];
        out.copy_from_slice(&buf[*used..*used + N]);
        // Consumed bytes are not left behind.
        buf[*used..*used + N].fill(0);
        *used += N;
        out
    })
}

/// A random version-4 UUID, hyphenated lowercase.
pub fn uuid_v4() -> String {
    let mut b = id_bytes::<16>();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    let mut s = String::with_capacity(36);
    for (i, part) in [&h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..]].into_iter().enumerate() {
        if i > 0 {
            s.push('-');
        }
        s.push_str(part);
    }
    s
}

/// A prefixed id with 24 random base62-ish characters, like Anthropic's `msg_…`/`req_…`.
pub fn prefixed(prefix: &str) -> String {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let bytes = id_bytes::<24>();
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
        // Across refills of the per-thread buffer, ids stay distinct.
        let many: std::collections::HashSet<String> = (0..1000).map(|_| super::uuid_v4()).collect();
        assert_eq!(many.len(), 1000);
    }
}
