//! Timeouts on byte streams: a connection wrapper whose reads and writes may not wait too long,
//! and a body wrapper that fails a body which stops moving.
//!
//! Both arm their timer only when a poll would wait, and re-arm it lazily when it fires early,
//! so that a connection moving data pays for no timer work on the fast path.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::body::stream::{BodyError, BodyStalled, Stalled};

/// How long an HTTP/1 client connection sits idle before it is parked (see `client_conn.rs`).
/// Long enough that a connection in steady use is never parked between its requests, so that
/// parking costs nothing on the busy path; short against the keep-alive timeout it saves the
/// buffers of.
pub const PARK_AFTER: Duration = Duration::from_secs(1);

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
    /// Where parking stands: one of the `PARK_*` states.
    park: AtomicU8,
}

/// The connection is not parked when idle (HTTP/2, TLS, or upgraded).
const PARK_OFF: u8 = 0;
/// The connection is to be parked once idle for [`PARK_AFTER`].
const PARK_ARMED: u8 = 1;
/// It has been idle that long: its server should park it.
const PARK_DUE: u8 = 2;
/// Its server is parking it: shutting the HTTP state down must leave the socket open.
const PARKING: u8 = 3;

impl Default for ConnectionActivity {
    fn default() -> Self {
        ConnectionActivity {
            in_flight: AtomicUsize::new(0),
            begun: AtomicU64::new(0),
            ended_ms: AtomicU64::new(0),
            origin: Instant::now(),
            open: None,
            park: AtomicU8::new(PARK_OFF),
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

    /// Parks the connection once it has been idle for [`PARK_AFTER`].
    pub fn arm_parking(&self) {
        self.park.store(PARK_ARMED, Ordering::Relaxed);
    }

    /// Never parks the connection.
    pub fn disarm_parking(&self) {
        self.park.store(PARK_OFF, Ordering::Relaxed);
    }

    /// Whether parking is due; if so, it starts (until [`ConnectionActivity::arm_parking`] or
    /// [`ConnectionActivity::disarm_parking`]).
    pub fn start_parking(&self) -> bool {
        self.park
            .compare_exchange(PARK_DUE, PARKING, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }

    /// Marks parking as due, if it is armed (a connection idle for [`PARK_AFTER`]).
    fn park_due(&self) {
        let _ =
            self.park
                .compare_exchange(PARK_ARMED, PARK_DUE, Ordering::Relaxed, Ordering::Relaxed);
    }

    fn park_state(&self) -> u8 {
        self.park.load(Ordering::Relaxed)
    }

    fn idle(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) == 0
    }

    /// How many requests have begun on the connection.
    pub fn requests_begun(&self) -> u64 {
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

impl ReadState {
    /// When the phase's bound runs out, and whether that phase is a request head's.
    fn deadline(&self, clock: &ReadClock) -> (Instant, bool) {
        match self.phase {
            ReadPhase::Header(since) => (since + clock.header, true),
            ReadPhase::Idle(since) => (since + clock.keepalive, false),
        }
    }
}

/// A connection whose writes may not wait longer than a bound, and (for a client connection)
/// whose reads follow a [`ReadClock`]. A timeout fails the read or write with
/// [`io::ErrorKind::TimedOut`], which ends the connection.
pub struct TimedIo<T> {
    inner: T,
    /// Bytes already read from `inner` that the next reads return first.
    unread: Option<Bytes>,
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
            unread: None,
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

    /// Makes the next reads return `bytes` (read from the connection already) first.
    pub fn unread(&mut self, bytes: Bytes) {
        if !bytes.is_empty() {
            self.unread = Some(bytes);
        }
    }

    /// Whether shutting the connection down is to leave the socket open (it is being parked).
    fn parking(&self) -> bool {
        self.read
            .as_ref()
            .is_some_and(|(clock, _)| clock.activity.park_state() == PARKING)
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
                // nothing): make sure this task wakes by then to start the idle clock, or in
                // time to park the connection.
                let wait = if activity.park_state() == PARK_ARMED {
                    clock.keepalive.min(PARK_AFTER)
                } else {
                    clock.keepalive
                };
                self.read_timer.expired(cx, Instant::now() + wait);
            }
            return None;
        }
        let begun = activity.requests_begun();
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
        let (deadline, header) = state.deadline(clock);
        if let ReadPhase::Idle(since) = state.phase
            && activity.park_state() == PARK_ARMED
            && self.write_stalled_since.is_none()
            && since + PARK_AFTER < deadline
        {
            // Idle with nothing left to write: hyper holds no bytes of this connection's, so
            // its server may park it once this fires.
            if self.read_timer.expired(cx, since + PARK_AFTER) {
                activity.park_due();
            }
            return None;
        }
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
        if let Some(unread) = &mut this.unread {
            let n = unread.len().min(buf.remaining());
            buf.put_slice(&unread[..n]);
            unread.advance(n);
            if unread.is_empty() {
                this.unread = None;
            }
            let _ = this.after_read(cx, n > 0, false);
            return Poll::Ready(Ok(()));
        }
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
        let this = self.get_mut();
        if this.parking() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl TimedIo<TcpStream> {
    /// While the connection is parked: `true` once the client sends (or closes), `false` once
    /// it has been idle for the keep-alive timeout.
    pub fn poll_parked(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        if self.unread.is_some() || self.inner.poll_read_ready(cx).is_ready() {
            return Poll::Ready(true);
        }
        let Some((clock, state)) = &self.read else {
            return Poll::Ready(true);
        };
        let (deadline, _) = state.deadline(clock);
        if self.read_timer.expired(cx, deadline) {
            self.count(|c| &c.keepalive);
            return Poll::Ready(false);
        }
        Poll::Pending
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn unread_bytes_come_before_the_connections_own() {
        let (near, mut far) = tokio::io::duplex(64);
        let mut io = TimedIo::new(near, Duration::from_secs(5));
        io.unread(Bytes::from_static(b"GET "));
        far.write_all(b"/ HTTP/1.1").await.unwrap();
        let mut read = [0u8; 14];
        io.read_exact(&mut read).await.unwrap();
        assert_eq!(&read, b"GET / HTTP/1.1");
    }

    #[test]
    fn parking_starts_only_once_due() {
        let activity = ConnectionActivity::default();
        activity.arm_parking();
        assert!(!activity.start_parking(), "armed is not due");
        activity.park_due();
        assert!(activity.start_parking());
        assert_eq!(activity.park_state(), PARKING);
        assert!(!activity.start_parking(), "it starts once");
        activity.disarm_parking();
        activity.park_due();
        assert_eq!(
            activity.park_state(),
            PARK_OFF,
            "only an armed connection falls due"
        );
    }
}
