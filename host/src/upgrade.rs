//! Upgraded connections (WebSocket, and other `Upgrade` protocols): once the upstream answers
//! 101, the client's connection and the upstream's are spliced byte for byte until either side
//! closes, or until neither has sent anything for the idle timeout.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Version};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// How a spliced connection went, for the access log.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Spliced {
    /// Bytes the client sent after the upgrade.
    pub bytes_from_client: u64,
    /// Bytes the upstream sent after the upgrade.
    pub bytes_to_client: u64,
    /// `closed` (a side closed), `idle` (the idle timeout), or `error`.
    pub ended: &'static str,
}

/// The protocol a request asks to upgrade to: an HTTP/1.1 GET with `Connection: upgrade` and
/// an `Upgrade` header. `h2c` is not proxied (it is a hop-by-hop change of this connection).
pub fn requested(method: &Method, version: Version, headers: &HeaderMap) -> Option<HeaderValue> {
    if version != Version::HTTP_11 || method != Method::GET {
        return None;
    }
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    let mut protocols = headers.get_all(header::UPGRADE).iter();
    let protocol = protocols.next()?;
    if !asks || protocols.next().is_some() {
        return None;
    }
    let text = protocol.to_str().ok()?;
    if text.is_empty() || text.len() > 64 || text.trim().eq_ignore_ascii_case("h2c") {
        return None;
    }
    Some(protocol.clone())
}

/// Copies both ways between `client` and `upstream` until one side closes (then the other is
/// shut down for writing and drained), an error, or `idle` without a byte either way.
pub async fn splice<A, B>(client: A, upstream: B, idle: Duration) -> Spliced
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    let last_ms = Arc::new(AtomicU64::new(0));
    let from_client = Arc::new(AtomicU64::new(0));
    let to_client = Arc::new(AtomicU64::new(0));
    let mut client = Counted {
        inner: client,
        read: from_client.clone(),
        last_ms: last_ms.clone(),
        start,
    };
    let mut upstream = Counted {
        inner: upstream,
        read: to_client.clone(),
        last_ms: last_ms.clone(),
        start,
    };
    let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
    tokio::pin!(copy);
    let ended = loop {
        let quiet_until = start + Duration::from_millis(last_ms.load(Ordering::Relaxed)) + idle;
        tokio::select! {
            result = &mut copy => break if result.is_ok() { "closed" } else { "error" },
            _ = tokio::time::sleep_until(quiet_until) => {
                let last = start + Duration::from_millis(last_ms.load(Ordering::Relaxed));
                if last + idle <= Instant::now() {
                    break "idle";
                }
            }
        }
    };
    Spliced {
        bytes_from_client: from_client.load(Ordering::Relaxed),
        bytes_to_client: to_client.load(Ordering::Relaxed),
        ended,
    }
}

/// A stream that counts the bytes read from it and notes when the last ones came.
struct Counted<T> {
    inner: T,
    read: Arc<AtomicU64>,
    /// When either side last read a byte, in ms after `start`.
    last_ms: Arc<AtomicU64>,
    start: Instant,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        let got = buf.filled().len() - before;
        if got > 0 {
            this.read.fetch_add(got as u64, Ordering::Relaxed);
            let now = this.start.elapsed().as_millis() as u64;
            this.last_ms.fetch_max(now, Ordering::Relaxed);
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn an_upgrade_needs_get_http11_connection_upgrade_and_one_protocol() {
        let ws = headers(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ]);
        let get = Method::GET;
        assert_eq!(requested(&get, Version::HTTP_11, &ws).unwrap(), "websocket");
        assert!(requested(&Method::POST, Version::HTTP_11, &ws).is_none());
        assert!(requested(&get, Version::HTTP_2, &ws).is_none());
        let no_connection = headers(&[("upgrade", "websocket")]);
        assert!(requested(&get, Version::HTTP_11, &no_connection).is_none());
        let h2c = headers(&[("connection", "upgrade"), ("upgrade", "h2c")]);
        assert!(requested(&get, Version::HTTP_11, &h2c).is_none());
        let two = headers(&[
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
            ("upgrade", "other"),
        ]);
        assert!(requested(&get, Version::HTTP_11, &two).is_none());
    }

    #[tokio::test]
    async fn splice_copies_both_ways_and_counts() {
        let (mut client, client_side) = tokio::io::duplex(64);
        let (upstream_side, mut upstream) = tokio::io::duplex(64);
        let spliced = tokio::spawn(splice(client_side, upstream_side, Duration::from_secs(5)));
        client.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        upstream.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        upstream.write_all(b"hi").await.unwrap();
        let mut got = [0u8; 2];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hi");
        drop(client);
        drop(upstream);
        let spliced = spliced.await.unwrap();
        assert_eq!(spliced.bytes_from_client, 5);
        assert_eq!(spliced.bytes_to_client, 2);
        assert_eq!(spliced.ended, "closed");
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_splice_ends_at_the_idle_timeout() {
        let (mut client, client_side) = tokio::io::duplex(64);
        let (upstream_side, _upstream) = tokio::io::duplex(64);
        let spliced = tokio::spawn(splice(client_side, upstream_side, Duration::from_secs(30)));
        client.write_all(b"x").await.unwrap();
        let spliced = spliced.await.unwrap();
        assert_eq!(spliced.ended, "idle");
        assert_eq!(spliced.bytes_from_client, 1);
    }
}
