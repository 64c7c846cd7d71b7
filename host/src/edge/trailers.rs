//! Request trailers: header fields that arrive after the body (HTTP/2, or chunked HTTP/1.1),
//! long after the edge and the plugins have read the head. Only `grpc-*` and the names a route
//! allows (`request_trailers`) go upstream; the rest are dropped as they pass.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::{self, HeaderMap, HeaderName};
use http_body::{Body, Frame, SizeHint};

use super::hop::{is_hop_by_hop, is_kept_whatever_connection_says};

/// Why a name may never be a request trailer the upstream sees, if it may not: the gateway's
/// own headers, hop-by-hop ones, and those that frame or route the message.
pub fn refused_trailer(name: &HeaderName) -> Option<&'static str> {
    if is_kept_whatever_connection_says(name)
        || name.as_str().starts_with("x-consumer-")
        || name.as_str() == "x-request-id"
    {
        Some("the gateway sets it")
    } else if is_hop_by_hop(name) {
        Some("it is hop-by-hop")
    } else if matches!(
        *name,
        header::CONTENT_LENGTH | header::CONTENT_TYPE | header::AUTHORIZATION | header::COOKIE
    ) {
        Some("it belongs in the request head")
    } else {
        None
    }
}

/// Whether a request trailer goes upstream on a route that allows `allowed`.
pub fn passes(name: &HeaderName, allowed: &[HeaderName]) -> bool {
    (name.as_str().starts_with("grpc-") || allowed.contains(name))
        && refused_trailer(name).is_none()
}

/// Removes the trailers a route does not allow; says how many went.
pub fn filter(trailers: &mut HeaderMap, allowed: &[HeaderName]) -> usize {
    let before = trailers.len();
    let doomed: Vec<HeaderName> = trailers
        .keys()
        .filter(|name| !passes(name, allowed))
        .cloned()
        .collect();
    for name in doomed {
        trailers.remove(name);
    }
    before - trailers.len()
}

/// A client's request body whose trailers are cut down to what the route allows.
#[derive(Debug)]
pub struct RequestTrailers<B> {
    inner: B,
    allowed: Arc<[HeaderName]>,
}

impl<B> RequestTrailers<B> {
    /// `inner`, letting through the trailers [`passes`] allows for `allowed`.
    pub fn new(inner: B, allowed: Arc<[HeaderName]>) -> Self {
        RequestTrailers { inner, allowed }
    }
}

impl<B> Body for RequestTrailers<B>
where
    B: Body + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) if frame.is_trailers() => {
                let mut trailers = match frame.into_trailers() {
                    Ok(trailers) => trailers,
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                };
                let dropped = filter(&mut trailers, &this.allowed);
                if dropped > 0 {
                    // The names are the client's: counted, never logged.
                    tracing::debug!(
                        dropped,
                        "request trailers the route does not allow were dropped"
                    );
                }
                if trailers.is_empty() {
                    // Nothing left to send: the body ends here.
                    Poll::Ready(None)
                } else {
                    Poll::Ready(Some(Ok(Frame::trailers(trailers))))
                }
            }
            other => other,
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
    use bytes::Bytes;
    use http_body_util::BodyExt;

    fn trailers(names: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for name in names {
            map.insert(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                "1".parse().unwrap(),
            );
        }
        map
    }

    #[test]
    fn only_grpc_and_allowed_trailers_pass_and_never_the_gateways_own() {
        let allowed: Vec<HeaderName> = vec![HeaderName::from_static("x-checksum")];
        let mut map = trailers(&[
            "grpc-status-details-bin",
            "x-checksum",
            "x-consumer-username",
            "x-forwarded-for",
            "forwarded",
            "x-real-ip",
            "x-request-id",
            "te",
            "connection",
            "content-length",
            "x-other",
        ]);
        assert_eq!(filter(&mut map, &allowed), 9);
        let mut kept: Vec<&str> = map.keys().map(HeaderName::as_str).collect();
        kept.sort_unstable();
        assert_eq!(kept, ["grpc-status-details-bin", "x-checksum"]);
        // A route cannot allow the gateway's own names back in.
        let allowed = [HeaderName::from_static("x-consumer-username")];
        let mut map = trailers(&["x-consumer-username"]);
        assert_eq!(filter(&mut map, &allowed), 1);
    }

    #[tokio::test]
    async fn a_body_loses_its_refused_trailers_and_ends_when_none_are_left() {
        let frames = |names: &[&str]| {
            crate::body::ProxyBody::trailed(Bytes::from_static(b"hi"), Some(trailers(names)))
        };
        let body = RequestTrailers::new(
            frames(&["grpc-status", "x-consumer-username"]),
            Arc::from([]),
        );
        let collected = body.collect().await.unwrap();
        let seen = collected.trailers().cloned().unwrap();
        assert_eq!(seen.keys().collect::<Vec<_>>(), ["grpc-status"]);
        assert_eq!(collected.to_bytes(), "hi");
        let body = RequestTrailers::new(frames(&["x-consumer-username"]), Arc::from([]));
        let collected = body.collect().await.unwrap();
        assert!(collected.trailers().is_none());
    }
}
