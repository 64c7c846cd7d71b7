//! Serving one client connection: HTTP/2 or HTTP/1 (by its first bytes, or over TLS by ALPN), a
//! graceful close when the listener stops, and an HTTP/1 connection parked while it is idle.
//!
//! hyper keeps an HTTP/1 connection's read and write buffers (8 KiB each) for as long as the
//! connection lives, so 10,000 idle keep-alive clients would hold 160 MiB of them. Once an
//! HTTP/1 connection has been idle for [`PARK_AFTER`](crate::timeouts::PARK_AFTER), hyper's
//! side of it is shut down without closing the socket, and only the socket, its clock and the
//! service wait for the next byte; then a new hyper connection takes the socket over.

use std::error::Error as StdError;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::config::{MIN_HEADER_BYTES, ServerConfig};
use crate::edge::ServerSettings;
use crate::metrics::HandshakeFailureLabels;
use crate::timeouts::{ConnectionActivity, TimedIo};
use crate::tls;

/// What answers a connection's requests: hyper's bounds on a service, named once.
pub trait ConnService<B>:
    Service<
        Request<Incoming>,
        Response = Response<B>,
        Future: Send + 'static,
        Error: Into<ConnError>,
    > + Send
    + 'static
{
}

impl<S, B> ConnService<B> for S where
    S: Service<
            Request<Incoming>,
            Response = Response<B>,
            Future: Send + 'static,
            Error: Into<ConnError>,
        > + Send
        + 'static
{
}

/// A response body hyper can write to a connection.
pub trait ResponseBody: Body<Data: Send, Error: Into<ConnError>> + Send + 'static {}

impl<B> ResponseBody for B where B: Body<Data: Send, Error: Into<ConnError>> + Send + 'static {}

/// What ends a connection badly: hyper's error, or the socket's before hyper had it.
type ConnError = Box<dyn StdError + Send + Sync>;

/// The first bytes of every HTTP/2 connection without TLS (RFC 9113, section 3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A client connection just accepted, and what serves it.
pub struct ClientConn<S> {
    /// The socket, on its clock.
    pub io: TimedIo<TcpStream>,
    /// What the request path tells the clock; it also says when to park.
    pub activity: Arc<ConnectionActivity>,
    /// The service that answers each request.
    pub service: S,
    /// The live server settings when the connection was accepted.
    pub settings: Arc<ServerSettings>,
    /// The listener's TLS, for a TLS listener.
    pub tls: Option<TlsAcceptor>,
    /// What the connection counts and logs with.
    pub counts: Arc<ConnCounts>,
    /// Fires when the listener stops: no new requests, and the connection closes once idle.
    pub closing: CancellationToken,
    /// The client's address, for debug logs.
    pub peer: SocketAddr,
}

/// A listener's counters that its connections add to.
pub struct ConnCounts {
    /// Idle HTTP/1 connections parked now.
    pub parked: Gauge,
    /// Connections ended because a request head did not fit.
    pub header_too_large: Counter,
    /// Connections ended by a malformed request.
    pub protocol: Counter,
    /// Failed TLS handshakes, by kind.
    pub handshake_failures: Family<HandshakeFailureLabels, Counter>,
}

/// Serves a client connection until it ends, or until `closing` and then its requests in flight
/// end. HTTP/2 and TLS connections are boxed, so that a plain HTTP/1 connection's task, the
/// commonest and the one that may sit idle for long, holds only what it needs.
pub async fn serve<S, B>(conn: ClientConn<S>)
where
    S: ConnService<B>,
    B: ResponseBody,
{
    let ClientConn {
        mut io,
        activity,
        service,
        settings,
        tls,
        counts,
        closing,
        peer,
    } = conn;
    let limits = &settings.config;
    let result = match tls {
        Some(acceptor) => {
            Box::pin(serve_tls(io, acceptor, limits, service, &counts, &closing)).await
        }
        None => {
            let first = tokio::select! {
                first = read_preface(&mut io) => Some(first),
                () = closing.cancelled() => None,
            };
            match first {
                None => Ok(()),
                Some(Ok(first)) if first.as_ref() == H2_PREFACE => {
                    io.unread(first);
                    let conn = http2_builder(limits).serve_connection(TokioIo::new(io), service);
                    Box::pin(until_closed(conn, &closing, |conn| {
                        conn.graceful_shutdown()
                    }))
                    .await
                    .map_err(Into::into)
                }
                Some(Ok(first)) => {
                    io.unread(first);
                    let http1 = http1_builder(limits);
                    serve_http1(io, &activity, service, &http1, &closing, &counts.parked).await
                }
                Some(Err(error)) => Err(error.into()),
            }
        }
    };
    if let Err(error) = result {
        match error.downcast_ref::<hyper::Error>() {
            Some(e) if e.is_parse_too_large() => counts.header_too_large.inc(),
            Some(e) if e.is_parse() => counts.protocol.inc(),
            _ => 0,
        };
        tracing::debug!(%peer, %error, "connection ended with an error");
    }
}

/// Reads up to the length of the HTTP/2 preface, stopping at the first byte that differs from
/// it (or at the end of the stream): what it read decides the protocol.
async fn read_preface(io: &mut TimedIo<TcpStream>) -> std::io::Result<Bytes> {
    let mut buf = [0u8; H2_PREFACE.len()];
    let mut filled = 0;
    while filled < buf.len() {
        let n = io.read(&mut buf[filled..]).await?;
        let matches = buf[filled..filled + n] == H2_PREFACE[filled..filled + n];
        filled += n;
        if n == 0 || !matches {
            break;
        }
    }
    Ok(Bytes::copy_from_slice(&buf[..filled]))
}

/// Serves HTTP/1 on `io`, parking it whenever it has been idle long enough.
async fn serve_http1<S, B>(
    mut io: TimedIo<TcpStream>,
    activity: &ConnectionActivity,
    mut service: S,
    http1: &http1::Builder,
    closing: &CancellationToken,
    parked: &Gauge,
) -> Result<(), ConnError>
where
    S: ConnService<B>,
    B: ResponseBody,
{
    loop {
        activity.arm_parking();
        // Boxed, so that a parked connection's task does not keep room for it.
        let mut conn = Box::new(
            http1
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades(),
        );
        let mut cancelled = pin!(closing.cancelled());
        let mut closed = false;
        // The requests begun when parking started: any more, and hyper has answered one with
        // keep-alive off, so the connection must close rather than park.
        let mut parking_at: Option<u64> = None;
        let result = poll_fn(|cx| {
            loop {
                if let Poll::Ready(result) = Pin::new(&mut *conn).poll(cx) {
                    return Poll::Ready(result);
                }
                if !closed && cancelled.as_mut().poll(cx).is_ready() {
                    closed = true;
                    if parking_at.is_none() {
                        activity.disarm_parking();
                        Pin::new(&mut *conn).graceful_shutdown();
                        continue;
                    }
                }
                if !closed && parking_at.is_none() && activity.start_parking() {
                    // hyper is idle between requests and has flushed everything: this closes
                    // its side at once, and the socket's shutdown is skipped.
                    parking_at = Some(activity.requests_begun());
                    Pin::new(&mut *conn).graceful_shutdown();
                    continue;
                }
                return Poll::Pending;
            }
        })
        .await;
        activity.disarm_parking();
        result?;
        let Some(begun) = parking_at else {
            return Ok(());
        };
        if closed || activity.requests_begun() != begun {
            return Ok(());
        }
        let Some(parts) = conn.into_parts() else {
            return Ok(()); // upgraded
        };
        io = parts.io.into_inner();
        service = parts.service;
        let read = parts.read_buf;
        if !read.is_empty() {
            // The start of a next request was already read: serve it at once.
            io.unread(read);
            continue;
        }
        // It shares hyper's read buffer's allocation, which parking is to free.
        drop(read);
        parked.inc();
        return_freed_memory();
        let woke = tokio::select! {
            woke = poll_fn(|cx| io.poll_parked(cx)) => woke,
            () = closing.cancelled() => false,
        };
        parked.dec();
        if !woke {
            return Ok(());
        }
    }
}

/// Hands memory freed by parking back to the kernel, at most every [`COLLECT_EVERY`] on each
/// thread. mimalloc returns a freed page only once its purge delay has passed and the thread
/// allocates again, so connections that go idle together (and free 16 KiB each) would otherwise
/// leave their buffers resident until later traffic.
#[allow(unsafe_code)] // one FFI call that takes no pointers (below)
fn return_freed_memory() {
    thread_local! {
        static LAST: std::cell::Cell<Option<std::time::Instant>> = const { std::cell::Cell::new(None) };
    }
    let now = std::time::Instant::now();
    let due = LAST.with(|last| match last.get() {
        Some(at) if now.duration_since(at) < COLLECT_EVERY => false,
        _ => {
            last.set(Some(now));
            true
        }
    });
    if due {
        // SAFETY: mi_collect takes no pointers; it only walks this thread's heap.
        unsafe { libmimalloc_sys::mi_collect(true) };
    }
}

/// How often parking may hand freed memory back, per thread.
const COLLECT_EVERY: Duration = Duration::from_millis(100);

/// A TLS connection: the handshake, bounded by the settings' timeout, then HTTP/2 or HTTP/1 as
/// ALPN chose. It is not parked: its TLS state outweighs hyper's buffers. A failed handshake is
/// counted, not returned.
async fn serve_tls<S, B>(
    io: TimedIo<TcpStream>,
    acceptor: TlsAcceptor,
    limits: &ServerConfig,
    service: S,
    counts: &ConnCounts,
    closing: &CancellationToken,
) -> Result<(), ConnError>
where
    S: ConnService<B>,
    B: ResponseBody,
{
    let timeout = Duration::from_millis(limits.tls_handshake_timeout_ms);
    let kind = match tokio::time::timeout(timeout, acceptor.accept(io)).await {
        Ok(Ok(stream)) => {
            // HTTP/2 over TLS is chosen by ALPN alone (RFC 9113 §3.2), as the client chose it.
            let h2 = stream.get_ref().1.alpn_protocol() == Some(tls::ALPN_H2);
            let io = TokioIo::new(stream);
            return if h2 {
                let conn = http2_builder(limits).serve_connection(io, service);
                until_closed(conn, closing, |conn| conn.graceful_shutdown()).await
            } else {
                let conn = http1_builder(limits).serve_connection(io, service);
                let conn = conn.with_upgrades();
                until_closed(conn, closing, |conn| conn.graceful_shutdown()).await
            }
            .map_err(Into::into);
        }
        Ok(Err(error)) => {
            tracing::debug!(%error, "TLS handshake failed");
            "error"
        }
        Err(_) => "timeout",
    };
    counts
        .handshake_failures
        .get_or_create(&HandshakeFailureLabels { kind })
        .inc();
    Ok(())
}

/// HTTP/1 settings from the server's.
fn http1_builder(limits: &ServerConfig) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder.max_buf_size(header_buffer(limits));
    if limits.max_headers != DEFAULT_MAX_HEADERS {
        // Only when it differs: hyper then parses headers into the heap instead of the stack.
        builder.max_headers(limits.max_headers);
    }
    builder
}

/// HTTP/2 settings from the server's.
fn http2_builder(limits: &ServerConfig) -> http2::Builder<TokioExecutor> {
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .max_concurrent_streams(limits.http2_max_streams)
        .max_header_list_size(header_list_size(limits))
        .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESETS)
        .max_local_error_reset_streams(MAX_LOCAL_ERROR_RESETS);
    builder
}

/// hyper answers 431 when a request head does not fit its read buffer, so the buffer's bound
/// is the header block's bound.
fn header_buffer(limits: &ServerConfig) -> usize {
    limits.max_header_bytes.max(MIN_HEADER_BYTES)
}

fn header_list_size(limits: &ServerConfig) -> u32 {
    u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX)
}

/// hyper's own bound on header lines, which parses them on the stack.
const DEFAULT_MAX_HEADERS: usize = 100;

/// Reset-flood protection (CVE-2023-44487 and CVE-2025-8671): hyper's defaults, pinned.
const MAX_PENDING_ACCEPT_RESETS: usize = 20;
const MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// Drives `conn` until it ends; once `closing` fires, `stop` makes it take no new requests, and
/// it ends when those in flight have.
async fn until_closed<C: Future>(
    conn: C,
    closing: &CancellationToken,
    stop: impl FnOnce(Pin<&mut C>),
) -> C::Output {
    let mut conn = pin!(conn);
    tokio::select! {
        result = conn.as_mut() => return result,
        () = closing.cancelled() => {}
    }
    stop(conn.as_mut());
    conn.await
}
