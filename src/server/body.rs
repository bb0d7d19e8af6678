//! Response bodies: a whole buffer, or a stream produced by a future that the connection's own
//! task polls (SSE).
//!
//! A streamed body owns its producer: polling the body polls the producer, which reads the
//! upstream and appends to an [`Outbox`]; whatever has accumulated is handed to hyper as one
//! frame. Everything already readable upstream therefore leaves in one write, with no task and
//! no channel between the upstream read and the client write, and dropping the body (the client
//! went away) drops the producer and with it the upstream stream.
//!
//! An HTTP/2 stream's body is also watched ([`Body::cut_when_stalled`]): a client that stops
//! reading one stream stalls it on flow control, hyper stops polling the body, and with it the
//! producer and its timers; a watchdog then drops the producer (its upstream call, its account,
//! the key's slot) once the client has taken nothing for the idle timeout. (HTTP/1.1 has the
//! same check per connection, on its blocked socket writes: [`super::idle`].)

use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

pub enum Body {
    Full(Option<Bytes>),
    /// A produced stream; the guard (if any) marks the connection busy until the body ends.
    Stream(Producer, Option<super::idle::RequestGuard>),
    /// A produced stream a watchdog may cut ([`Body::cut_when_stalled`]).
    Watched(Arc<Watched>),
}

/// The error a cut stream ends with: hyper resets the HTTP/2 stream (`RST_STREAM`), which also
/// frees what its send buffer holds.
#[derive(Debug, thiserror::Error)]
#[error("the client took nothing of the stream for the idle timeout")]
pub struct Cut;

/// A stream shared between its body and the watchdog that may cut it.
pub struct Watched {
    origin: Instant,
    /// When (ms after `origin`, plus one) the body last handed a frame over and has not been
    /// polled since (hyper waits for the client's flow-control window); 0 otherwise.
    handed_ms: AtomicU64,
    /// The producer and the connection's busy mark; `None` once ended or cut.
    stream: Mutex<Option<(Producer, Option<super::idle::RequestGuard>)>>,
    cut: AtomicBool,
}

impl Watched {
    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64 + 1
    }

    fn stalled(&self, limit: Duration) -> bool {
        let since = self.handed_ms.load(Ordering::Relaxed);
        since != 0 && self.now_ms() - since >= limit.as_millis() as u64
    }

    fn poll_frame(&self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, Cut>>> {
        self.handed_ms.store(0, Ordering::Relaxed);
        let mut slot = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        let Some((producer, _)) = slot.as_mut() else {
            return Poll::Ready(self.cut.load(Ordering::Relaxed).then_some(Err(Cut)));
        };
        match producer.poll_chunk(cx) {
            Poll::Ready(Some(b)) => {
                self.handed_ms.store(self.now_ms(), Ordering::Relaxed);
                Poll::Ready(Some(Ok(b)))
            }
            Poll::Ready(None) => {
                let ended = slot.take();
                drop(slot);
                drop(ended);
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    /// Drops the stream when its client has taken nothing for `limit`; true when it did.
    fn cut_if_stalled(&self, limit: Duration) -> bool {
        let mut slot = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() || !self.stalled(limit) {
            return false;
        }
        self.cut.store(true, Ordering::Relaxed);
        let taken = slot.take();
        drop(slot);
        tracing::warn!(
            idle_s = limit.as_secs(),
            "cutting an HTTP/2 stream whose client has taken none of it for idle_timeout_secs"
        );
        // The producer's own end records the request (a client gone: 499).
        drop(taken);
        true
    }
}

/// Checks a watched stream every quarter of `limit` (at least every 250 ms) until its body is
/// gone or it is cut.
async fn watchdog(w: Weak<Watched>, limit: Duration) {
    let check = (limit / 4).max(Duration::from_millis(250));
    loop {
        tokio::time::sleep(check).await;
        let Some(w) = w.upgrade() else { return };
        if w.stream.lock().unwrap_or_else(|e| e.into_inner()).is_none() || w.cut_if_stalled(limit) {
            return;
        }
    }
}

impl Body {
    pub fn full(b: impl Into<Bytes>) -> Self {
        Body::Full(Some(b.into()))
    }

    pub fn empty() -> Self {
        Body::Full(None)
    }

    /// True for a produced stream.
    pub fn is_stream(&self) -> bool {
        !matches!(self, Body::Full(_))
    }

    /// A stream whose client takes nothing of it for `limit` is cut: its producer (the upstream
    /// call, the account, the key's slot) is dropped, and the body ends with [`Cut`]. For
    /// HTTP/2, whose flow control stops hyper from polling the body of a stream the client does
    /// not read, so that the producer's own timers never run. Other bodies pass unchanged.
    pub fn cut_when_stalled(self, limit: Duration) -> Body {
        match self {
            Body::Stream(producer, guard) => {
                let w = Arc::new(Watched {
                    origin: Instant::now(),
                    handed_ms: AtomicU64::new(0),
                    stream: Mutex::new(Some((producer, guard))),
                    cut: AtomicBool::new(false),
                });
                tokio::spawn(watchdog(Arc::downgrade(&w), limit));
                Body::Watched(w)
            }
            other => other,
        }
    }
}

/// Above this many buffered bytes a producer waits for the body to hand them over.
pub const HIGH_WATER: usize = 64 * 1024;

/// The bytes a producer has written and the body has not yet handed to hyper.
#[derive(Clone)]
pub struct Outbox(Arc<Mutex<Vec<u8>>>);

impl Default for Outbox {
    /// Room for a stream's opening events and first text without growing.
    fn default() -> Self {
        Outbox(Arc::new(Mutex::new(Vec::with_capacity(1024))))
    }
}

impl Outbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends with `write`.
    pub fn write(&self, write: impl FnOnce(&mut Vec<u8>)) {
        write(&mut self.lock());
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What is buffered, as one frame; the next writes go to a buffer as large as this one
    /// was (between 512 bytes and [`HIGH_WATER`]), so that they do not grow it step by step.
    fn take(&self) -> Option<Bytes> {
        let mut b = self.lock();
        if b.is_empty() {
            return None;
        }
        let next = Vec::with_capacity(b.len().clamp(512, HIGH_WATER));
        Some(Bytes::from(std::mem::replace(&mut *b, next)))
    }

    /// Lets the body hand what is buffered over now: pending once (the body takes the bytes
    /// while the producer is pending).
    ///
    /// It is pending without a wake. A producer only runs inside its body's `poll_chunk`, which
    /// answers a pending producer with what is buffered — never empty here — and whoever reads
    /// the body polls it again for the next frame, which polls the producer on. (A wake would
    /// be the task waking itself while it runs, which tokio's scheduler takes as a yield that
    /// wakes another worker: see [`crate::selfwake`].)
    pub async fn flush(&self) {
        if self.is_empty() {
            return;
        }
        let mut yielded = false;
        std::future::poll_fn(|_| {
            if yielded {
                Poll::Ready(())
            } else {
                yielded = true;
                Poll::Pending
            }
        })
        .await
    }

    /// Returns at once below [`HIGH_WATER`]; above it, lets the body hand the bytes over (and
    /// the producer is polled again only when hyper wants more, which is the back-pressure of a
    /// slow client).
    pub async fn room(&self) {
        if self.len() >= HIGH_WATER {
            self.flush().await;
        }
    }
}

/// A future writing into an [`Outbox`], run by the body that streams the outbox.
pub struct Producer {
    fut: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    out: Outbox,
}

impl Producer {
    pub fn new(out: Outbox, fut: impl Future<Output = ()> + Send + 'static) -> Self {
        Producer { fut: Some(Box::pin(fut)), out }
    }

    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        if let Some(fut) = &mut self.fut {
            if fut.as_mut().poll(cx).is_ready() {
                self.fut = None;
            }
        }
        match self.out.take() {
            Some(b) => Poll::Ready(Some(b)),
            None if self.fut.is_none() => Poll::Ready(None),
            None => Poll::Pending,
        }
    }
}

impl HttpBody for Body {
    type Data = Bytes;
    type Error = Cut;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Cut>>> {
        match &mut *self {
            Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::Stream(producer, guard) => {
                let r = producer.poll_chunk(cx);
                if matches!(r, Poll::Ready(None)) {
                    guard.take();
                }
                r.map(|o| o.map(|b| Ok(Frame::data(b))))
            }
            Body::Watched(w) => w.poll_frame(cx).map(|o| o.map(|r| r.map(Frame::data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Body::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Body::Full(None) => SizeHint::with_exact(0),
            Body::Stream(..) | Body::Watched(_) => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn ready_writes_leave_as_one_frame_and_the_end_follows() {
        let out = Outbox::default();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let o = out.clone();
        let mut body = Body::Stream(
            Producer::new(out, async move {
                o.write(|b| b.extend_from_slice(b"a"));
                o.write(|b| b.extend_from_slice(b"b"));
                let _ = rx.await;
                o.write(|b| b.extend_from_slice(b"c"));
            }),
            None,
        );
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&first[..], b"ab");
        tx.send(()).unwrap();
        let second = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&second[..], b"c");
        assert!(body.frame().await.is_none());
    }

    #[tokio::test]
    async fn a_producer_that_outruns_the_body_is_cut_into_bounded_frames() {
        let out = Outbox::default();
        let o = out.clone();
        let mut body = Body::Stream(
            Producer::new(out, async move {
                for _ in 0..1000 {
                    o.write(|b| b.extend_from_slice(&[b'x'; 1000]));
                    o.room().await;
                }
            }),
            None,
        );
        let mut total = 0;
        let mut frames = 0;
        while let Some(f) = body.frame().await {
            let d = f.unwrap().into_data().unwrap();
            assert!(d.len() <= HIGH_WATER + 1000, "frame of {} bytes", d.len());
            total += d.len();
            frames += 1;
        }
        assert_eq!(total, 1_000_000);
        assert!(frames >= 1_000_000 / (HIGH_WATER + 1000), "{frames} frames");
    }
}
