//! Wake-ups a task sends itself while it is being polled, deferred until its worker has run
//! what else is ready instead of being taken as a yield that wakes another worker.
//!
//! hyper hands a response body from a connection to its reader over a channel, and a request to
//! a connection the same way. The daemon drives its upstream connection from the reading task
//! itself (`upstream::conn`), so each hand-over wakes the task that is already running: the
//! connection decodes a chunk and wakes the body's reader, the reader takes it and wakes the
//! connection. tokio's multi-thread scheduler takes a wake during a poll as a yield: the task
//! goes to the back of the run queue and a parked worker is woken to steal it — a futex call
//! and a context switch on the other core, for work the running worker does itself a moment
//! later. With an upstream that sends its frames one by one, as Amazon Q does, that was most of
//! the daemon's scheduling cost (README "Performance" has the figures).
//!
//! [`SelfWakes::poll`] polls with a waker of its own. A wake that arrives while the poll runs
//! only marks it; if the poll then ends pending, the task is woken the way
//! [`tokio::task::yield_now`] wakes it: once its worker has nothing else ready (and has looked
//! for I/O), on the same worker, without waking another. A wake at any other time goes to the
//! task at once, as before. Outside a tokio runtime the deferred wake is an ordinary one.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

/// A poll function's own waker: see [`SelfWakes::poll`]. One per thing polled (a body, a
/// request in flight), kept across its polls.
pub struct SelfWakes {
    state: Arc<State>,
    waker: Waker,
}

#[derive(Default)]
struct State {
    /// A poll is running.
    polling: AtomicBool,
    /// A wake arrived while it ran.
    woken: AtomicBool,
    /// The task's own waker, for wakes between polls.
    task: Mutex<Option<Waker>>,
}

impl State {
    fn task(&self) -> std::sync::MutexGuard<'_, Option<Waker>> {
        self.task.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Default for SelfWakes {
    fn default() -> Self {
        Self::new()
    }
}

impl SelfWakes {
    pub fn new() -> Self {
        let state = Arc::new(State::default());
        SelfWakes { waker: Waker::from(state.clone()), state }
    }

    /// Calls `poll` with a context of this waker. Wakes that arrive while it runs are one
    /// deferred wake of the task if it ends pending (none if it is ready: the caller polls
    /// again anyway); wakes between polls reach the task directly.
    pub fn poll<T>(&self, cx: &mut Context<'_>, poll: impl FnOnce(&mut Context<'_>) -> Poll<T>) -> Poll<T> {
        {
            let mut task = self.state.task();
            if !task.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *task = Some(cx.waker().clone());
            }
        }
        // Each side stores its flag before it reads the other's (both sequentially consistent):
        // a wake either sees the poll running and is seen below, or sees it ended and goes to
        // the task. None is lost.
        self.state.woken.store(false, SeqCst);
        self.state.polling.store(true, SeqCst);
        let r = poll(&mut Context::from_waker(&self.waker));
        self.state.polling.store(false, SeqCst);
        if r.is_pending() && self.state.woken.load(SeqCst) {
            // tokio's deferred wake; the future is dropped at once, the wake stays registered.
            let _ = std::pin::pin!(tokio::task::yield_now()).poll(cx);
        }
        r
    }
}

impl Wake for State {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, SeqCst);
        if !self.polling.load(SeqCst) {
            if let Some(w) = self.task().as_ref() {
                w.wake_by_ref();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts the wakes the task receives.
    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, SeqCst);
        }
    }

    #[test]
    fn wakes_during_a_poll_are_one_wake_after_it_and_none_when_ready() {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let wakes = SelfWakes::new();
        // Three wakes during a poll that ends pending: the task is woken once (outside a
        // runtime, the deferred wake is an ordinary one), and only after the poll.
        let r: Poll<()> = wakes.poll(&mut cx, |inner| {
            for _ in 0..3 {
                inner.waker().wake_by_ref();
            }
            assert_eq!(count.0.load(SeqCst), 0, "not during the poll");
            Poll::Pending
        });
        assert!(r.is_pending());
        assert_eq!(count.0.load(SeqCst), 1);
        // A poll that is ready wakes nobody.
        let r = wakes.poll(&mut cx, |inner| {
            inner.waker().wake_by_ref();
            Poll::Ready(())
        });
        assert!(r.is_ready());
        assert_eq!(count.0.load(SeqCst), 1);
        // A wake between polls, through a clone kept by whatever was polled, goes straight on.
        let kept = wakes.waker.clone();
        kept.wake();
        assert_eq!(count.0.load(SeqCst), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hand_overs_inside_one_task_and_from_others_all_arrive() {
        // A task reading a channel that another task fills (wakes between polls), and a pair of
        // channels it both fills and drains itself (wakes during its own polls): nothing stalls.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<u64>(1);
        let reader = tokio::spawn(async move {
            let (itx, mut irx) = tokio::sync::mpsc::channel::<u64>(1);
            let wakes = SelfWakes::new();
            let mut sum = 0u64;
            let mut pending: Option<u64> = None;
            let mut closed = false;
            std::future::poll_fn(|cx| {
                wakes.poll(cx, |cx| {
                    loop {
                        if let Some(v) = pending.take() {
                            match itx.try_send(v) {
                                Ok(()) => {}
                                Err(_) => pending = Some(v),
                            }
                        }
                        let mut progressed = false;
                        if let Poll::Ready(Some(v)) = irx.poll_recv(cx) {
                            sum += v;
                            progressed = true;
                        }
                        if pending.is_none() && !closed {
                            match rx.poll_recv(cx) {
                                Poll::Ready(Some(v)) => {
                                    pending = Some(v);
                                    progressed = true;
                                }
                                Poll::Ready(None) => closed = true,
                                Poll::Pending => {}
                            }
                        }
                        if closed && pending.is_none() && irx.is_empty() {
                            return Poll::Ready(sum);
                        }
                        if !progressed {
                            return Poll::Pending;
                        }
                    }
                })
            })
            .await
        });
        for i in 0..1000 {
            tx.send(i).await.unwrap();
        }
        drop(tx);
        let sum = tokio::time::timeout(std::time::Duration::from_secs(10), reader).await.unwrap().unwrap();
        assert_eq!(sum, (0..1000u64).sum::<u64>());
    }
}
