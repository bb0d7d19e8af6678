//! The daemon's stop signal as every background task sees it (modelled on mini-redis's
//! `Shutdown`): [`Trigger::fire`] once, and every [`Shutdown`] clone's [`Shutdown::recv`]
//! resolves — at once for a task that starts or asks after the signal. And [`Tasks`]: the
//! tasks a part of the daemon spawns, counted so that shutdown waits for them (bounded) and
//! cancels what is left, so that nothing they hold (the pool, and through it the state store)
//! outlives [`crate::run`].

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinHandle};
use tokio_util::task::TaskTracker;

/// Fires the stop signal (held by the daemon's main task).
#[derive(Debug)]
pub struct Trigger(watch::Sender<bool>);

/// Listens for the stop signal. Cheap to clone; one per task.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

/// A trigger and its first listener.
pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Shutdown(rx))
}

impl Trigger {
    /// Signals every listener, now and later.
    pub fn fire(&self) {
        self.0.send_replace(true);
    }

    /// A new listener.
    pub fn subscribe(&self) -> Shutdown {
        Shutdown(self.0.subscribe())
    }
}

impl Shutdown {
    /// True once the signal has fired.
    pub fn is_shutdown(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves when the signal fires (at once if it already has, or if the trigger is gone).
    pub async fn recv(&mut self) {
        // An error means the trigger was dropped: that is a stop too.
        let _ = self.0.wait_for(|stopped| *stopped).await;
    }
}

/// A set of spawned tasks that can be waited for and cancelled as one. Cheap to clone (every
/// clone is the same set). Cancelling aborts the tasks through their abort handles, so a task of
/// the set costs nothing while it runs (no cancellation future polled at every wake-up): a lock
/// when it is spawned and one when it ends, that is all.
///
/// A task forgets its own handle when it ends (a guard in its future, dropped when the future
/// completes, panics or is cancelled). An abort handle keeps the task's whole allocation — its
/// future's size, kilobytes for a connection or a token refresh — alive, so handles kept until
/// some later spawn pruned them held a burst's tasks long after it: 1,000 accounts' first
/// refreshes and catalog fetches kept 8.9 MB until the daemon stopped.
#[derive(Debug, Clone, Default)]
pub struct Tasks {
    tracker: TaskTracker,
    handles: Arc<Mutex<Handles>>,
}

/// The abort handles of the set's running tasks.
#[derive(Debug, Default)]
struct Handles {
    running: HashMap<u64, AbortHandle>,
    /// Tasks that ended before [`Tasks::spawn`] could note their handle (so it is not noted).
    ended_early: HashSet<u64>,
    next: u64,
    /// Set by [`Tasks::stop`]: a task spawned later is aborted at once.
    aborted: bool,
}

/// Lives in a task's future: when the future is dropped (ended or cancelled), the task's
/// handle is forgotten.
struct Forget {
    handles: Arc<Mutex<Handles>>,
    key: u64,
}

impl Drop for Forget {
    fn drop(&mut self) {
        let mut h = lock(&self.handles);
        if h.running.remove(&self.key).is_none() && !h.aborted {
            h.ended_early.insert(self.key);
        }
    }
}

fn lock(handles: &Mutex<Handles>) -> MutexGuard<'_, Handles> {
    handles.lock().unwrap_or_else(|e| e.into_inner())
}

/// How long [`Tasks::stop`] waits for aborted tasks to unwind (an aborted task is dropped at
/// its next turn on the runtime; this bounds a drop that blocks).
const UNWIND: Duration = Duration::from_secs(5);

impl Tasks {
    pub fn new() -> Tasks {
        Tasks::default()
    }

    fn handles(&self) -> MutexGuard<'_, Handles> {
        lock(&self.handles)
    }

    /// Spawns `f` as a task of this set. Awaiting it gives a cancelled [`JoinError`] when the
    /// set was stopped before `f` ended (`f` is dropped then, at its next await point).
    ///
    /// [`JoinError`]: tokio::task::JoinError
    pub fn spawn<F>(&self, f: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let key = {
            let mut h = self.handles();
            h.next += 1;
            h.next
        };
        let forget = Forget { handles: self.handles.clone(), key };
        // The lock is not held while spawning: a runtime that is shutting down drops the
        // future (and `forget`, which takes the lock) inside `spawn`.
        let task = self.tracker.spawn(async move {
            let _forget = forget;
            f.await
        });
        let mut h = self.handles();
        if h.aborted {
            task.abort();
        } else if !h.ended_early.remove(&key) {
            h.running.insert(key, task.abort_handle());
        }
        task
    }

    /// Tasks of this set still running.
    pub fn len(&self) -> usize {
        self.tracker.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tracker.is_empty()
    }

    /// Waits up to `grace` for the running tasks to end, then aborts the rest and waits
    /// (bounded) until they are dropped. Returns how many were aborted. Tasks spawned later are
    /// aborted at once.
    pub async fn stop(&self, grace: Duration) -> usize {
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait()).await.is_ok() {
            return 0;
        }
        let left = self.tracker.len();
        let running: Vec<AbortHandle> = {
            let mut h = self.handles();
            h.aborted = true;
            h.ended_early.clear();
            h.running.drain().map(|(_, t)| t).collect()
        };
        for t in running {
            t.abort();
        }
        if tokio::time::timeout(UNWIND, self.tracker.wait()).await.is_err() {
            tracing::warn!(tasks = self.tracker.len(), "aborted tasks still not ended");
        }
        left
    }
}

/// A hyper executor that spawns a connection's own tasks (HTTP/2 streams) into [`Tasks`].
#[derive(Debug, Clone)]
pub struct Spawner(pub Tasks);

impl<F> hyper::rt::Executor<F> for Spawner
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, f: F) {
        self.0.spawn(crate::selfwake::run(f));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_listener_hears_it_once_fired_even_late_ones() {
        let (trigger, mut early) = channel();
        assert!(!early.is_shutdown());
        let waiting = tokio::spawn(async move {
            early.recv().await;
            early.is_shutdown()
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        trigger.fire();
        assert!(waiting.await.unwrap());
        let mut late = trigger.subscribe();
        tokio::time::timeout(Duration::from_secs(1), late.recv()).await.expect("at once");
        // Receiving again returns again (a loop that checks after every step stops).
        tokio::time::timeout(Duration::from_secs(1), late.recv()).await.expect("again");
    }

    #[tokio::test]
    async fn a_dropped_trigger_is_a_stop() {
        let (trigger, mut s) = channel();
        drop(trigger);
        tokio::time::timeout(Duration::from_secs(1), s.recv()).await.expect("resolves");
    }

    /// `stop` lets a task that ends within the grace end by itself; one that does not is
    /// cancelled, and when `stop` returns its future (and what it held) has been dropped.
    #[tokio::test]
    async fn stop_waits_then_cancels_and_drops_what_the_tasks_held() {
        let tasks = Tasks::new();
        let held = Arc::new(());
        let quick = tasks.spawn({
            let held = held.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                drop(held);
                7
            }
        });
        let stuck = tasks.spawn({
            let held = held.clone();
            async move {
                std::future::pending::<()>().await;
                drop(held);
            }
        });
        assert_eq!(tasks.len(), 2);
        assert_eq!(tasks.stop(Duration::from_millis(300)).await, 1, "one task cancelled");
        assert!(tasks.is_empty());
        assert_eq!(Arc::strong_count(&held), 1, "nothing a task held is left");
        assert_eq!(quick.await.unwrap(), 7);
        assert!(stuck.await.unwrap_err().is_cancelled());
        // After the stop, a new task is aborted at once.
        let late = tasks.spawn(std::future::pending::<()>());
        let late = tokio::time::timeout(Duration::from_secs(1), late).await.expect("ends at once");
        assert!(late.unwrap_err().is_cancelled());
    }

    /// A finished task's handle (and with it the task's allocation) is let go when it ends,
    /// not at some later spawn: after a burst nothing of it is held.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn finished_tasks_are_forgotten_when_they_end() {
        let tasks = Tasks::new();
        let held = Arc::new(());
        let burst: Vec<_> = (0..1000)
            .map(|i| {
                let held = held.clone();
                tasks.spawn(async move {
                    if i % 2 == 0 {
                        tokio::task::yield_now().await;
                    }
                    drop(held);
                })
            })
            .collect();
        let blocked = tasks.spawn(std::future::pending::<()>());
        for t in burst {
            t.await.unwrap();
        }
        {
            let h = tasks.handles();
            assert_eq!(h.running.len(), 1, "only the pending task's handle is kept");
            assert!(h.ended_early.is_empty(), "{}", h.ended_early.len());
        }
        assert_eq!(Arc::strong_count(&held), 1);
        blocked.abort();
        assert!(blocked.await.unwrap_err().is_cancelled());
        assert!(tasks.handles().running.is_empty());
        assert!(tasks.is_empty());
    }

    /// Tasks spawned while the runtime shuts down are dropped inside `spawn`: no deadlock, and
    /// nothing is kept.
    #[test]
    fn spawning_on_a_runtime_that_is_shutting_down_does_not_deadlock() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let tasks = Tasks::new();
        let handle = rt.handle().clone();
        rt.shutdown_timeout(Duration::from_millis(10));
        let _guard = handle.enter();
        let t = tasks.spawn(async { 1 });
        drop(t);
        assert!(tasks.handles().running.is_empty());
        assert!(tasks.handles().ended_early.is_empty());
    }

    #[tokio::test]
    async fn stop_returns_at_once_when_nothing_runs() {
        let tasks = Tasks::new();
        let t0 = std::time::Instant::now();
        assert_eq!(tasks.stop(Duration::from_secs(10)).await, 0);
        assert!(t0.elapsed() < Duration::from_secs(1));
    }
}
