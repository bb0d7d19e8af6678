//! Memory and time of building the token counter's tables (a measurement, not CI): prints the
//! process's RSS (anonymous and file-backed) before and after the first `count_text`, the time of
//! that first call, and the tokens counted in a few repeated texts.
//!
//! ```sh
//! cargo run --release --example tokens_rss
//! ```

use amq2api::translate::tokens::count_text;
use std::time::Instant;

/// (VmRSS, RssAnon, RssFile) in KiB, from /proc/self/status.
fn rss() -> (u64, u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("RssAnon:"), field("RssFile:"))
}

fn main() {
    let text = "The quick brown fox jumps over the lazy dog's back; it's 1234567 o'clock!\n\n";
    let (rss0, anon0, file0) = rss();
    let start = Instant::now();
    let first = count_text("hello world");
    let build = start.elapsed();
    let (rss1, anon1, file1) = rss();
    let long = text.repeat(1_000);
    let start = Instant::now();
    let n = count_text(&long);
    let counted = start.elapsed();
    let start = Instant::now();
    count_text(&long);
    let again = start.elapsed();
    let (rss2, anon2, file2) = rss();
    println!("before:           VmRSS {rss0:>7} KiB (anon {anon0:>7}, file {file0:>7})");
    println!("after first call: VmRSS {rss1:>7} KiB (anon {anon1:>7}, file {file1:>7})");
    println!("after 76 KB text: VmRSS {rss2:>7} KiB (anon {anon2:>7}, file {file2:>7})");
    println!(
        "added by the tables: {} KiB (anon {}, file {}); first call {:.1} ms ({first} tokens)",
        rss1 as i64 - rss0 as i64,
        anon1 as i64 - anon0 as i64,
        file1 as i64 - file0 as i64,
        build.as_secs_f64() * 1e3
    );
    println!(
        "76 KB text: {n} tokens in {:.3} ms, then {:.3} ms",
        counted.as_secs_f64() * 1e3,
        again.as_secs_f64() * 1e3
    );
}
