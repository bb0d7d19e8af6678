//! Wake-ups a task sends itself while it is being polled, taken as one more turn of the same
//! poll instead of a yield that wakes another worker.
//!
//! hyper's server hands a request body from a connection to its reader over a channel, and the
//! response body back to the connection the same way. The daemon runs a client's connection, the
//! request's body and the response body (which reads the upstream connection itself,
//! `upstream::conn`) in one task, so each hand-over wakes the task that is already running.
//! tokio's multi-thread scheduler takes a wake during a poll as a yield: the task goes to the
//! back of the run queue and a parked worker is woken to steal it — a futex call and a context
//! switch on the other core, for work the running poll can do itself. When the upstream side
//! was hyper's client too, with Amazon Q's frames arriving one by one, that was most of the
//! daemon's scheduling cost (README "Performance" has the figures).
//!
//! [`SelfWakes::poll`] polls with a waker of its own. A wake that arrives while the poll runs
//! only marks it, and if the poll ends pending it is run again at once; a wake at any other
//! time goes to the task as before. A poll whose task has spent its cooperative budget still
//! yields (tokio's forced yield stays a yield), and so does one that has taken [`MAX_TURNS`]
//! turns: a future that wakes itself on every poll does not keep a worker to itself.

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

/// Turns one poll may take before the task yields anyway.
pub const MAX_TURNS: usize = 8;

/// Runs `fut` with [`SelfWakes`]: its wakes of its own task while it is polled are turns. Each
/// client connection's task runs under it (`server::serve`, and HTTP/2 streams through
/// `shutdown::Spawner`).
pub async fn run<F: std::future::Future>(fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    let wakes = SelfWakes::new();
    std::future::poll_fn(move |cx| wakes.poll(cx, |cx| fut.as_mut().poll(cx))).await
}

/// A poll function's own waker: see [`SelfWakes::poll`]. One per thing polled (a body, a
/// request in flight), kept across its polls.
pub struct SelfWakes {
    state: Arc<State>,
    waker: Waker,
}

#[derive(Default)]
struct State {
    /// A turn is running.
    polling: AtomicBool,
    /// A wake arrived since the current turn began.
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

    /// Calls `turn` with a context of this waker, again at once while it ends pending after a
    /// wake that arrived during it (up to [`MAX_TURNS`] turns, and not past a spent budget:
    /// then the task is woken to yield). Wakes between polls reach the task directly.
    pub fn poll<T>(
        &self,
        cx: &mut Context<'_>,
        mut turn: impl FnMut(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        {
            let mut task = self.state.task();
            if !task.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *task = Some(cx.waker().clone());
            }
        }
        let mut inner = Context::from_waker(&self.waker);
        for _ in 0..MAX_TURNS {
            // Each side stores its flag before it reads the other's (both sequentially
            // consistent): a wake either sees the turn running and is seen below, or sees it
            // ended and goes to the task. None is lost.
            self.state.woken.store(false, SeqCst);
            self.state.polling.store(true, SeqCst);
            let r = turn(&mut inner);
            self.state.polling.store(false, SeqCst);
            if r.is_ready() || !self.state.woken.load(SeqCst) {
                // Ready: the caller polls again anyway, so a wake during the turn needs no more.
                return r;
            }
            if !tokio::task::coop::has_budget_remaining() {
                break;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
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

    fn counting() -> (Arc<Count>, Waker) {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        (count, waker)
    }

    #[test]
    fn wakes_during_a_turn_are_turns_and_the_task_is_not_woken() {
        let (count, waker) = counting();
        let mut cx = Context::from_waker(&waker);
        let wakes = SelfWakes::new();
        // Wakes itself (three times) on its first three turns, ready on the fourth.
        let mut turns = 0;
        let r = wakes.poll(&mut cx, |inner| {
            turns += 1;
            if turns == 4 {
                return Poll::Ready(());
            }
            for _ in 0..3 {
                inner.waker().wake_by_ref();
            }
            Poll::Pending
        });
        assert!(r.is_ready());
        assert_eq!(turns, 4);
        assert_eq!(count.0.load(SeqCst), 0, "no wake reached the task");
        // Pending without a wake: one turn, and the task is not woken.
        let mut turns = 0;
        let r: Poll<()> = wakes.poll(&mut cx, |_| {
            turns += 1;
            Poll::Pending
        });
        assert!(r.is_pending());
        assert_eq!(turns, 1);
        assert_eq!(count.0.load(SeqCst), 0);
        // A wake between polls, through a clone kept by whatever was polled, goes straight on.
        wakes.waker.wake_by_ref();
        assert_eq!(count.0.load(SeqCst), 1);
    }

    #[test]
    fn a_future_that_keeps_waking_itself_yields_after_max_turns() {
        let (count, waker) = counting();
        let mut cx = Context::from_waker(&waker);
        let wakes = SelfWakes::new();
        let mut turns = 0;
        let r: Poll<()> = wakes.poll(&mut cx, |inner| {
            turns += 1;
            inner.waker().wake_by_ref();
            Poll::Pending
        });
        assert!(r.is_pending());
        assert_eq!(turns, MAX_TURNS);
        assert_eq!(count.0.load(SeqCst), 1, "the task was woken to yield");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_spent_budget_still_yields() {
        // A loop over an always-ready channel runs into tokio's budget; the forced yield must
        // let the other task run (it sets the flag the loop waits for) long before the
        // channel is drained.
        let flag = Arc::new(AtomicBool::new(false));
        let f2 = flag.clone();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        for _ in 0..100_000 {
            tx.send(()).unwrap();
        }
        tokio::spawn(async move { f2.store(true, SeqCst) });
        let wakes = SelfWakes::new();
        let mut seen = 0usize;
        std::future::poll_fn(|cx| {
            wakes.poll(cx, |cx| {
                loop {
                    if flag.load(SeqCst) {
                        return Poll::Ready(());
                    }
                    match rx.poll_recv(cx) {
                        Poll::Ready(Some(())) => seen += 1,
                        Poll::Ready(None) => return Poll::Ready(()),
                        Poll::Pending => return Poll::Pending,
                    }
                }
            })
        })
        .await;
        assert!(flag.load(SeqCst));
        assert!(seen < 100_000, "the other task ran before the channel was drained ({seen})");
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
