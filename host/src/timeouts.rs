//! Timeouts on byte streams: a connection wrapper whose reads and writes may not wait too long,
//! and a body wrapper that fails a body which stops moving.
//!
//! Both arm their timer only when a poll would wait, and re-arm it lazily when it fires early,
//! so that a connection moving data pays for no timer work on the fast path.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body::{Body, Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::body::stream::{BodyError, BodyStalled, Stalled};

/// A timer that is created on first use and moved only when it must fire earlier.
#[derive(Debug, Default)]
struct LazyTimer(Option<Pin<Box<Sleep>>>);

impl LazyTimer {
    /// Whether `deadline` has passed; otherwise makes sure this task wakes by then.
    fn expired(&mut self, cx: &mut Context<'_>, deadline: Instant) -> bool {
        loop {
            let sleep = match &mut self.0 {
                Some(sleep) => {
                    if sleep.deadline() > deadline {
                        sleep.as_mut().reset(deadline);
                    }
                    sleep
                }
                None => self.0.insert(Box::pin(tokio::time::sleep_until(deadline))),
            };
            if sleep.as_mut().poll(cx).is_pending() {
                return false;
            }
            if Instant::now() >= deadline {
                return true;
            }
            // It fired for an earlier deadline: aim it at this one and poll again to register.
            sleep.as_mut().reset(deadline);
        }
    }
}

/// What the request path tells a client connection's read clock: how many of its requests
/// are being served, how many have begun, and when the last one ended. It lives as long as the
/// connection's socket (an upgraded connection's too), so it also keeps the connection counted
/// as open.
#[derive(Debug)]
pub struct ConnectionActivity {
    in_flight: AtomicUsize,
    begun: AtomicU64,
    /// When the last request ended, in ms after `origin`.
    ended_ms: AtomicU64,
    origin: Instant,
    /// The listener's open-connection gauge, decremented when the connection is gone.
    open: Option<Gauge>,
}

impl Default for ConnectionActivity {
    fn default() -> Self {
        ConnectionActivity {
            in_flight: AtomicUsize::new(0),
            begun: AtomicU64::new(0),
            ended_ms: AtomicU64::new(0),
            origin: Instant::now(),
            open: None,
        }
    }
}

impl Drop for ConnectionActivity {
    fn drop(&mut self) {
        if let Some(open) = &self.open {
            open.dec();
        }
    }
}

impl ConnectionActivity {
    /// A new connection's activity, counted in `open` until it is dropped.
    pub fn counted(open: &Gauge) -> Self {
        open.inc();
        let mut activity = ConnectionActivity::default();
        activity.open = Some(open.clone());
        activity
    }

    /// Marks a request as being served until the returned guard drops.
    pub fn begin(self: &Arc<Self>) -> ServingRequest {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.begun.fetch_add(1, Ordering::Relaxed);
        ServingRequest(self.clone())
    }

    fn idle(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) == 0
    }

    fn begun(&self) -> u64 {
        self.begun.load(Ordering::Relaxed)
    }

    fn ended_at(&self) -> Instant {
        self.origin + Duration::from_millis(self.ended_ms.load(Ordering::Relaxed))
    }
}

/// Held while a request is served (until its response body is done).
#[derive(Debug)]
pub struct ServingRequest(Arc<ConnectionActivity>);

impl Drop for ServingRequest {
    fn drop(&mut self) {
        let activity = &self.0;
        let ended = activity.origin.elapsed().as_millis() as u64;
        activity.ended_ms.fetch_max(ended, Ordering::Relaxed);
        activity.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The counters a client connection's timeouts add to.
#[derive(Clone, Debug)]
pub struct TimeoutCounters {
    /// A request head took too long.
    pub header: Counter,
    /// The connection sat idle between requests too long.
    pub keepalive: Counter,
    /// The peer left a write waiting too long.
    pub send: Counter,
}

/// The read side's clock on a client connection.
pub struct ReadClock {
    /// The longest a request head may take, from its first byte (or from accept).
    pub header: Duration,
    /// The longest a connection may sit idle between requests.
    pub keepalive: Duration,
    /// Which requests are in flight.
    pub activity: Arc<ConnectionActivity>,
}

/// Where a client connection's reading stands while no request is being served (while one
/// is, the request path's own timeouts apply instead).
#[derive(Clone, Copy, Debug)]
enum ReadPhase {
    /// Waiting for (the rest of) a request head since this instant.
    Header(Instant),
    /// Idle between requests since this instant.
    Idle(Instant),
}

/// The phase, and how many requests had begun when it started: once more have, the phase is
/// over and the connection has been idle since the last one ended.
#[derive(Clone, Copy, Debug)]
struct ReadState {
    phase: ReadPhase,
    begun: u64,
}

/// A connection whose writes may not wait longer than a bound, and (for a client connection)
/// whose reads follow a [`ReadClock`]. A timeout fails the read or write with
/// [`io::ErrorKind::TimedOut`], which ends the connection.
pub struct TimedIo<T> {
    inner: T,
    read: Option<(ReadClock, ReadState)>,
    read_timer: LazyTimer,
    write_stall: Duration,
    write_stalled_since: Option<Instant>,
    write_timer: LazyTimer,
    counters: Option<TimeoutCounters>,
}

impl<T> TimedIo<T> {
    /// An upstream connection: only writes are bounded.
    pub fn new(inner: T, write_stall: Duration) -> Self {
        TimedIo {
            inner,
            read: None,
            read_timer: LazyTimer::default(),
            write_stall,
            write_stalled_since: None,
            write_timer: LazyTimer::default(),
            counters: None,
        }
    }

    /// A client connection just accepted: it has `clock.header` to send its first request head.
    pub fn client(
        inner: T,
        clock: ReadClock,
        write_stall: Duration,
        counters: TimeoutCounters,
    ) -> Self {
        let mut io = TimedIo::new(inner, write_stall);
        let state = ReadState {
            phase: ReadPhase::Header(Instant::now()),
            begun: 0,
        };
        io.read = Some((clock, state));
        io.counters = Some(counters);
        io
    }

    /// The wrapped connection.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    fn count(&self, which: fn(&TimeoutCounters) -> &Counter) {
        if let Some(counters) = &self.counters {
            which(counters).inc();
        }
    }

    /// Bookkeeping after a read attempt; turns a wait past the phase's deadline into an error.
    fn after_read(
        &mut self,
        cx: &mut Context<'_>,
        got_bytes: bool,
        pending: bool,
    ) -> Option<io::Error> {
        let (clock, state) = self.read.as_mut()?;
        let activity = &clock.activity;
        if !activity.idle() {
            if pending {
                // hyper may not read again once the response is done (it knows the socket has
                // nothing): make sure this task wakes by then to start the idle clock.
                self.read_timer
                    .expired(cx, Instant::now() + clock.keepalive);
            }
            return None;
        }
        let begun = activity.begun();
        if begun != state.begun {
            *state = ReadState {
                phase: ReadPhase::Idle(activity.ended_at()),
                begun,
            };
        }
        if got_bytes {
            if let ReadPhase::Idle(_) = state.phase {
                state.phase = ReadPhase::Header(Instant::now());
            }
            return None;
        }
        if !pending {
            return None;
        }
        let (deadline, header) = match state.phase {
            ReadPhase::Header(since) => (since + clock.header, true),
            ReadPhase::Idle(since) => (since + clock.keepalive, false),
        };
        if !self.read_timer.expired(cx, deadline) {
            return None;
        }
        if header {
            self.count(|c| &c.header);
            Some(io::Error::new(
                io::ErrorKind::TimedOut,
                "request head timed out",
            ))
        } else {
            self.count(|c| &c.keepalive);
            Some(io::Error::new(
                io::ErrorKind::TimedOut,
                "idle keep-alive timed out",
            ))
        }
    }

    /// Bookkeeping after a write attempt; turns a stall past the bound into an error.
    fn after_write<R>(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        if result.is_ready() {
            self.write_stalled_since = None;
            return result;
        }
        let since = *self.write_stalled_since.get_or_insert_with(Instant::now);
        if self.write_timer.expired(cx, since + self.write_stall) {
            self.count(|c| &c.send);
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the peer stopped reading",
            )));
        }
        Poll::Pending
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for TimedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        let got_bytes = matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before;
        match this.after_read(cx, got_bytes, result.is_pending()) {
            Some(timeout) => Poll::Ready(Err(timeout)),
            None => result,
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for TimedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.after_write(cx, result)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.after_write(cx, result)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_flush(cx);
        this.after_write(cx, result)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A body that fails when no frame arrives for its idle bound while it is being read.
#[derive(Debug)]
pub struct IdleBody<B> {
    inner: B,
    idle: Duration,
    side: Stalled,
    waiting_since: Option<Instant>,
    timer: LazyTimer,
}

impl<B> IdleBody<B> {
    /// `inner`, failing after `idle` without a frame; `side` is whose fault that is.
    pub fn new(inner: B, idle: Duration, side: Stalled) -> Self {
        IdleBody {
            inner,
            idle,
            side,
            waiting_since: None,
            timer: LazyTimer::default(),
        }
    }

    /// Bounds the body by `idle` too, blaming `side`, when that is shorter than its bound.
    pub fn tighten(&mut self, idle: Duration, side: Stalled) {
        if idle < self.idle {
            self.idle = idle;
            self.side = side;
        }
    }
}

impl<B> Body for IdleBody<B>
where
    B: Body + Unpin,
    B::Error: Into<BodyError>,
{
    type Data = B::Data;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, BodyError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => {
                let since = *this.waiting_since.get_or_insert_with(Instant::now);
                if this.timer.expired(cx, since + this.idle) {
                    let stalled = BodyStalled {
                        side: this.side,
                        idle: this.idle,
                    };
                    return Poll::Ready(Some(Err(BodyError::Stalled(stalled))));
                }
                Poll::Pending
            }
            Poll::Ready(frame) => {
                this.waiting_since = None;
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
