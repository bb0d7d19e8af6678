//! Gives the heap's free memory back to the kernel once the daemon is quiet again.
//!
//! glibc's allocator keeps what a burst freed (connection buffers, held streams, a reload of
//! 10,000 accounts) in its arenas: after a load the daemon's resident size stayed at its high
//! water (103 MiB where a restarted daemon needs 25). Allocators with decay were measured and
//! rejected (README "Performance": mimalloc started at 75 MiB, jemalloc kept 103 MiB and slowed
//! the first byte), so the daemon keeps glibc and trims: once a second it looks whether it is
//! quiet (no request in flight, none ended during the last second), and when it is and its
//! resident size has grown by [`SLACK`] over what it was after the last trim, it calls
//! `malloc_trim(0)`, which returns every arena's free pages (not only the top of the main
//! heap) with `MADV_DONTNEED`. Under load it never trims (nothing waits on the allocator's
//! locks for it); a burst's leftovers go back within a second or two of its end. On a system
//! without glibc the task only measures.
//!
//! `malloc_trim` is the one foreign call of the library (`unsafe`, see [`trim`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How much the resident size may grow over its size after the last trim before the next.
pub const SLACK: u64 = 4 << 20;
/// How often the resident size is read.
pub const TICK: Duration = Duration::from_secs(1);

/// The process's resident size in bytes (`VmRSS` of `/proc/self/status`), if it can be read.
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line["VmRSS:".len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib << 10)
}

/// Returns the allocator's free pages to the kernel; true when some were returned.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn trim() -> bool {
    // SAFETY: `malloc_trim` takes a plain integer, touches only the allocator's own state under
    // the allocator's locks, and is safe to call from any thread at any time (glibc
    // malloc/malloc.c); Rust's global allocator here is that same glibc malloc.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Without glibc there is nothing to call.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn trim() -> bool {
    false
}

/// Requests in flight and requests ended, so the trimmer knows when the daemon is quiet.
#[derive(Debug, Default)]
pub struct Activity {
    in_flight: AtomicU64,
    ended: AtomicU64,
}

/// A request in flight, from its head's arrival to its response's last byte; counted as ended
/// when dropped.
#[derive(Debug)]
pub struct Busy(Arc<Activity>);

impl Activity {
    /// A request begins (two relaxed atomic adds per request in all).
    pub fn begin(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Busy(self.clone())
    }

    /// Requests in flight now, and requests ended so far.
    fn read(&self) -> (u64, u64) {
        (self.in_flight.load(Ordering::Relaxed), self.ended.load(Ordering::Relaxed))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.ended.fetch_add(1, Ordering::Relaxed);
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The decision of one tick: trim when the daemon is quiet (no request in flight, and none
/// ended during the last tick) and its resident size is more than [`SLACK`] above the size
/// after the last trim. Trims happen only when quiet, so that size is the quiet working set,
/// never a burst's middle.
pub fn should_trim(quiet: bool, resident: u64, after_last: u64) -> bool {
    quiet && resident > after_last.saturating_add(SLACK)
}

/// Runs until `shutdown`: every [`TICK`], trims when [`should_trim`] says so.
pub async fn run_trimmer(activity: Arc<Activity>, mut shutdown: crate::shutdown::Shutdown) {
    let mut after_last = resident_bytes().unwrap_or(0);
    let mut seen = activity.read().1;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.recv() => return,
        }
        let (in_flight, ended) = activity.read();
        let quiet = in_flight == 0 && ended == seen;
        seen = ended;
        let Some(resident) = resident_bytes() else { continue };
        if quiet && resident < after_last {
            // Less than after the last trim (memory unmapped on its own): the new floor.
            after_last = resident;
        }
        if !should_trim(quiet, resident, after_last) {
            continue;
        }
        let Ok(returned) = tokio::task::spawn_blocking(trim).await else { continue };
        let now = resident_bytes().unwrap_or(resident);
        tracing::debug!(
            before_mib = resident >> 20,
            after_mib = now >> 20,
            returned,
            "memory: gave free heap pages back to the kernel"
        );
        after_last = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_only_past_the_slack_and_when_quiet() {
        let base = 20 << 20;
        assert!(!should_trim(true, base + SLACK, base), "growth within the slack");
        assert!(should_trim(true, base + SLACK + 1, base));
        assert!(!should_trim(false, base + SLACK + 1, base), "not quiet");
        assert!(!should_trim(true, base, base + (1 << 20)), "below the last size");
    }

    #[test]
    fn resident_size_is_read_and_moves_with_use() {
        let before = resident_bytes().expect("VmRSS in /proc/self/status");
        assert!(before > 1 << 20, "a test binary is more than 1 MiB resident: {before}");
        // Touch 64 MiB so the pages are resident.
        let big = vec![1u8; 64 << 20];
        let during = resident_bytes().unwrap();
        assert!(during >= before + (48 << 20), "{before} -> {during}");
        drop(big);
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn trim_returns_freed_arena_pages() {
        // Many small blocks on another thread (its own arena, below the mmap threshold, so
        // freeing them leaves the pages in the arena), freed there, then trimmed.
        std::thread::spawn(|| {
            let blocks: Vec<Vec<u8>> = (0..40_000).map(|i| vec![(i % 251) as u8; 1000]).collect();
            // Keep every 100th block so the arena's top cannot simply shrink.
            let kept: Vec<Vec<u8>> = blocks.into_iter().step_by(100).collect();
            let high = resident_bytes().unwrap();
            trim();
            let low = resident_bytes().unwrap();
            assert!(high > low + (16 << 20), "trim returned too little: {high} -> {low}");
            drop(kept);
        })
        .join()
        .unwrap();
    }
}
