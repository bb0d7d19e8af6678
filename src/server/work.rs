//! Where the CPU work of a request body runs, and how much of it may wait: a byte budget that
//! every body holds from the moment it has arrived until it is parsed, translated and counted,
//! a gate that keeps the small bodies' work (done on the async worker that read them) to one
//! worker fewer than there are, and a small pool of blocking threads for the larger bodies.
//! However many requests come, and however large, the async workers — which serve `/health`,
//! the streams and the systemd watchdog — are never all busy with them.
//!
//! - **Inline** (bodies up to [`INLINE_MAX`]): parsed on the worker, with no thread hop — a
//!   50 KB Claude Code request costs about 0.45 ms in a release build — behind a gate of
//!   `workers - 1` permits (at least one): a flood of small bodies, each costing up to ~8 ms
//!   (a 64 KiB body of letters without a space, release build), waits at the gate instead of
//!   filling every worker's queue.
//! - **Pool** (larger bodies): `spawn_blocking` while holding one of `workers - 1` slots (at
//!   least one). The slot and the body's budget go with the work, so a request given up (the
//!   client went away, `request_timeout_secs`) frees them only when the thread is done.
//! - **Budget**: `max(64 MiB, 2 × max_body_bytes)` in units of 64 KiB; a body takes its size,
//!   rounded up, at least one unit. Twice the largest body lets one body be parsed while the
//!   next waits. The budget is taken once the body has arrived, not from its `Content-Length`:
//!   a promise would let a client that declares large bodies and sends them slowly hold the
//!   whole budget, and stop every request, for `body_read_timeout_secs` at no cost.
//!
//! A request waits at most `queue_timeout_secs` for the budget, and again at most that for a
//! slot; past it the client gets 529 `overloaded_error` with `retry-after`, which the SDKs retry.

use crate::anthropic::{ApiError, ErrorKind};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The budget is counted in units of this many bytes.
pub const UNIT: u64 = 64 * 1024;
/// The smallest byte budget.
pub const MIN_BUDGET: u64 = 64 << 20;
/// Bodies up to this size are parsed and counted on the async worker that read them.
pub const INLINE_MAX: usize = 64 * 1024;
/// How long a client refused for want of room is asked to wait before it tries again.
pub const RETRY_AFTER: Duration = Duration::from_secs(2);

/// Why a body's work did not run.
#[derive(Debug, thiserror::Error)]
pub enum WorkError {
    #[error(
        "the server is busy with other large requests: no room for a body of {bytes} bytes within {} s (queue_timeout_secs); try again",
        waited.as_secs()
    )]
    NoRoom { bytes: usize, waited: Duration },
    #[error(
        "the server is busy with other large requests: no CPU slot within {} s (queue_timeout_secs); try again",
        waited.as_secs()
    )]
    NoSlot { waited: Duration },
    #[error("the request's processing failed: {0}")]
    Failed(String),
}

impl From<WorkError> for ApiError {
    fn from(e: WorkError) -> Self {
        match e {
            WorkError::NoRoom { .. } | WorkError::NoSlot { .. } => {
                ApiError::new(ErrorKind::Overloaded, e.to_string()).with_retry_after(RETRY_AFTER)
            }
            WorkError::Failed(_) => ApiError::new(ErrorKind::Api, e.to_string()),
        }
    }
}

/// A body's share of the budget, held until its work is done.
#[derive(Debug)]
pub struct Admission {
    _permit: OwnedSemaphorePermit,
}

/// The budget, the gate and the pool of one daemon.
pub struct Work {
    budget: Arc<Semaphore>,
    budget_units: u32,
    inline: Arc<Semaphore>,
    pool: Arc<Semaphore>,
    workers: usize,
    queue_timeout: Duration,
}

impl Work {
    /// For a runtime of `workers` async workers and bodies of at most `max_body_bytes`.
    pub fn new(workers: usize, max_body_bytes: u64, queue_timeout: Duration) -> Self {
        let workers = workers.max(1);
        let slots = (workers - 1).max(1);
        let budget_units =
            u32::try_from(MIN_BUDGET.max(2 * max_body_bytes).div_ceil(UNIT)).unwrap_or(u32::MAX);
        Work {
            budget: Arc::new(Semaphore::new(budget_units as usize)),
            budget_units,
            inline: Arc::new(Semaphore::new(slots)),
            pool: Arc::new(Semaphore::new(slots)),
            workers,
            queue_timeout,
        }
    }

    /// For the runtime this is called on, with its real number of workers (however it was
    /// built: `main`, `TOKIO_WORKER_THREADS`, a test's runtime).
    pub fn for_this_runtime(max_body_bytes: u64, queue_timeout: Duration) -> Self {
        Self::new(tokio::runtime::Handle::current().metrics().num_workers(), max_body_bytes, queue_timeout)
    }

    /// The runtime's async workers.
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// How many bodies' work may run at once on the pool (and, apart, inline).
    pub fn slots(&self) -> usize {
        (self.workers - 1).max(1)
    }

    /// The whole budget, in bytes.
    pub fn budget_bytes(&self) -> u64 {
        self.budget_units as u64 * UNIT
    }

    /// Waits (at most `queue_timeout_secs`) for room for a body of `bytes` that has arrived.
    pub async fn admit(&self, bytes: usize) -> Result<Admission, WorkError> {
        let units = (bytes as u64).div_ceil(UNIT).clamp(1, self.budget_units as u64) as u32;
        if let Ok(p) = self.budget.clone().try_acquire_many_owned(units) {
            return Ok(Admission { _permit: p });
        }
        match tokio::time::timeout(self.queue_timeout, self.budget.clone().acquire_many_owned(units)).await {
            Ok(Ok(p)) => Ok(Admission { _permit: p }),
            _ => {
                tracing::warn!(
                    bytes,
                    "request refused: no room in the body budget within queue_timeout_secs"
                );
                Err(WorkError::NoRoom { bytes, waited: self.queue_timeout })
            }
        }
    }

    async fn slot(&self, slots: &Arc<Semaphore>) -> Result<OwnedSemaphorePermit, WorkError> {
        if let Ok(p) = slots.clone().try_acquire_owned() {
            return Ok(p);
        }
        match tokio::time::timeout(self.queue_timeout, slots.clone().acquire_owned()).await {
            Ok(Ok(p)) => Ok(p),
            _ => {
                tracing::warn!("request refused: no CPU slot within queue_timeout_secs");
                Err(WorkError::NoSlot { waited: self.queue_timeout })
            }
        }
    }

    /// Runs `work`, the parsing (and translating, counting) of an admitted body of `bytes`:
    /// inline when the body is small, on the pool otherwise. The admission is released when
    /// the work is done.
    pub async fn run<T, F>(&self, admission: Admission, bytes: usize, work: F) -> Result<T, WorkError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        if bytes <= INLINE_MAX {
            let slot = self.slot(&self.inline).await?;
            let out = work();
            drop((slot, admission));
            return Ok(out);
        }
        let slot = self.slot(&self.pool).await?;
        tokio::task::spawn_blocking(move || {
            let out = work();
            drop((slot, admission));
            out
        })
        .await
        .map_err(|e| WorkError::Failed(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn sizes() {
        let w = Work::new(2, 32 << 20, Duration::from_secs(1));
        assert_eq!((w.workers(), w.slots(), w.budget_bytes()), (2, 1, 64 << 20));
        let w = Work::new(1, 1 << 30, Duration::from_secs(1));
        assert_eq!((w.slots(), w.budget_bytes()), (1, 2 << 30));
        assert_eq!(Work::new(8, 1024, Duration::from_secs(1)).slots(), 7);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 3)]
    async fn the_runtime_s_workers_are_counted() {
        assert_eq!(Work::for_this_runtime(1024, Duration::from_secs(1)).workers(), 3);
    }

    /// A full budget refuses a body after the queue timeout; the room comes back when the
    /// admitted body's work is done.
    #[tokio::test]
    async fn a_full_budget_refuses_after_the_queue_timeout() {
        let w = Work::new(2, 1024, Duration::from_millis(50));
        let all = w.admit(w.budget_bytes() as usize).await.unwrap();
        let e = w.admit(1).await.unwrap_err();
        assert!(matches!(e, WorkError::NoRoom { bytes: 1, .. }), "{e}");
        let api = ApiError::from(e);
        assert_eq!((api.status().as_u16(), api.retry_after), (529, Some(RETRY_AFTER)));
        assert_eq!(w.run(all, INLINE_MAX + 1, || 7).await.unwrap(), 7);
        let one = w.admit(1).await.unwrap();
        drop(one);
    }

    /// A slot that stays busy refuses the next large body after the queue timeout, with the
    /// same 529; the refused body's room in the budget comes back at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_busy_pool_refuses_after_the_queue_timeout() {
        let w = Arc::new(Work::new(2, 1024, Duration::from_millis(50)));
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let busy = {
            let w = w.clone();
            let a = w.admit(INLINE_MAX + 1).await.unwrap();
            tokio::spawn(async move { w.run(a, INLINE_MAX + 1, move || rx.recv()).await })
        };
        while w.pool.available_permits() > 0 {
            tokio::task::yield_now().await;
        }
        let a = w.admit(w.budget_bytes() as usize - 2 * UNIT as usize).await.unwrap();
        assert_eq!(w.budget.available_permits(), 0);
        let e = w.run(a, INLINE_MAX + 1, || ()).await.unwrap_err();
        assert!(matches!(e, WorkError::NoSlot { .. }), "{e}");
        assert_eq!(ApiError::from(e).status().as_u16(), 529);
        assert_eq!(w.budget.available_permits() as u64, w.budget_units as u64 - 2);
        tx.send(()).unwrap();
        busy.await.unwrap().unwrap().unwrap();
        assert_eq!(w.budget.available_permits() as u64, w.budget_units as u64);
    }

    /// With the pool and the gate both full of work that does not end, a task still runs (a
    /// worker is free): large bodies' work is not on the workers, small bodies' is on at most
    /// `slots` of them. When the work ends, every body's turn comes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 3)]
    async fn full_pool_and_gate_leave_a_worker_free() {
        let w = Arc::new(Work::new(3, 1024, Duration::from_secs(30)));
        let release = Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
        let running = Arc::new(AtomicUsize::new(0));
        let mut jobs = Vec::new();
        for size in [INLINE_MAX + 1, 10, INLINE_MAX + 1, 10, INLINE_MAX + 1, 10, INLINE_MAX + 1, 10] {
            let (w, release, running) = (w.clone(), release.clone(), running.clone());
            jobs.push(tokio::spawn(async move {
                let a = w.admit(size).await.unwrap();
                w.run(a, size, move || {
                    running.fetch_add(1, Ordering::SeqCst);
                    let (lock, cv) = &*release;
                    let mut go = lock.lock().unwrap();
                    while !*go {
                        go = cv.wait(go).unwrap();
                    }
                })
                .await
                .unwrap()
            }));
        }
        let full = async {
            while running.load(Ordering::SeqCst) < 4 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), full).await.expect("two on the pool, two inline");
        let free = tokio::time::timeout(Duration::from_secs(10), tokio::spawn(async { 1 })).await;
        assert_eq!(free.expect("a task runs while the pool and the gate are full").unwrap(), 1);
        assert_eq!(running.load(Ordering::SeqCst), 4, "at most two slots each");
        *release.0.lock().unwrap() = true;
        release.1.notify_all();
        for j in jobs {
            j.await.unwrap();
        }
        assert_eq!(running.load(Ordering::SeqCst), 8);
    }
}
