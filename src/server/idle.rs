//! Idle-connection accounting: an I/O wrapper that records the last read or write, a count of
//! requests in flight, and since when a write has waited for the client, so that a keep-alive
//! connection with neither reads, writes nor requests is closed after the idle timeout (hyper
//! has no idle timeout of its own for HTTP/1.1), and so is one whose client has taken none of
//! the response waiting for it for as long.
//!
//! Bytes count as activity only on an HTTP/1.1 connection: HTTP/2 keeps its connections busy
//! with its own PINGs (hyper pings every 30 s, and the client's answer is a read), so an
//! HTTP/2 connection, and one that has not yet sent a request, is idle when no request has
//! been in flight for the timeout, whatever bytes moved.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Shared between the wrapper, the service and the idle check.
#[derive(Debug)]
pub struct Activity {
    origin: Instant,
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
    /// Since when (ms after `origin`, plus one) a write has been waiting for the client to take
    /// bytes; 0 when none waits.
    blocked_ms: AtomicU64,
    /// When a request last began or ended (ms after `origin`).
    request_ms: AtomicU64,
    /// An HTTP/1.1 request was seen: bytes count as activity.
    http1: AtomicBool,
}

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Activity {
            origin: Instant::now(),
            last_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            blocked_ms: AtomicU64::new(0),
            request_ms: AtomicU64::new(0),
            http1: AtomicBool::new(false),
        })
    }

    fn touch(&self) {
        self.last_ms.store(self.origin.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// A write moved bytes (`true`) or must wait for the client (`false`).
    fn wrote(&self, moved: bool) {
        if moved {
            self.touch();
            self.blocked_ms.store(0, Ordering::Relaxed);
        } else if self.blocked_ms.load(Ordering::Relaxed) == 0 {
            self.blocked_ms.store(self.origin.elapsed().as_millis() as u64 + 1, Ordering::Relaxed);
        }
    }

    /// True when a write has waited `limit` for a client that takes nothing (it stopped
    /// reading: the response, its upstream call and its account would be held for as long as
    /// the client likes).
    pub fn is_stalled(&self, limit: Duration) -> bool {
        let since = self.blocked_ms.load(Ordering::Relaxed);
        since != 0 && self.origin.elapsed().as_millis() as u64 + 1 - since >= limit.as_millis() as u64
    }

    fn request_touch(&self) {
        self.request_ms.store(self.origin.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Marks a request in flight until the guard drops; `busy` counts it daemon-wide.
    /// `http1`: it came over HTTP/1.1 (bytes then count as the connection's activity).
    pub fn request(self: &Arc<Self>, busy: crate::memory::Busy, http1: bool) -> RequestGuard {
        if http1 {
            self.http1.store(true, Ordering::Relaxed);
        }
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.request_touch();
        RequestGuard(self.clone(), busy)
    }

    /// True when nothing is in flight and, for `idle`, no request was (nor, on HTTP/1.1, any
    /// byte moved).
    pub fn is_idle(&self, idle: Duration) -> bool {
        let last = if self.http1.load(Ordering::Relaxed) { &self.last_ms } else { &self.request_ms };
        let since = self.origin.elapsed().as_millis() as u64 - last.load(Ordering::Relaxed);
        self.in_flight.load(Ordering::SeqCst) == 0 && since >= idle.as_millis() as u64
    }
}

pub struct RequestGuard(Arc<Activity>, #[allow(dead_code)] crate::memory::Busy);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.touch();
        self.0.request_touch();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Records activity on every successful read or write.
pub struct IdleIo<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T> IdleIo<T> {
    pub fn new(inner: T, activity: Arc<Activity>) -> Self {
        activity.touch();
        IdleIo { inner, activity }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleIo<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        match r {
            Poll::Ready(Ok(n)) if n > 0 => self.activity.wrote(true),
            Poll::Pending => self.activity.wrote(false),
            _ => {}
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        match r {
            Poll::Ready(Ok(())) => self.activity.blocked_ms.store(0, Ordering::Relaxed),
            Poll::Pending => self.activity.wrote(false),
            Poll::Ready(Err(_)) => {}
        }
        r
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        match r {
            Poll::Ready(Ok(n)) if n > 0 => self.activity.wrote(true),
            Poll::Pending => self.activity.wrote(false),
            _ => {}
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
