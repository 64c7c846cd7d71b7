//! The bodies the gateway hands hyper: [`ProxyBody`], any body on its way through (built in
//! memory, or streaming from the client, an upstream or a gRPC-Web conversion), and
//! [`ResponseBody`], the one a client connection is answered with.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

pub mod filtered;
pub mod stream;

pub use self::stream::{
    BodyError, BodyStalled, CollectError, Polled, Stalled, collect_bounded, reached_end,
};
use self::stream::{held_size_hint, poll_held};
use crate::grpc_web::WebBody;
use crate::timeouts::ServingRequest;
use crate::upstream::body::ClientBody;
use crate::upstream::pool::UpstreamBody;

/// A body that streams from a peer, or was built in memory.
#[derive(Debug)]
pub enum ProxyBody {
    /// No body.
    Empty,
    /// A body held in memory, sent as one frame.
    Full(Option<Bytes>),
    /// A body held in memory, then the trailers that came with it (a buffered gRPC message
    /// keeps its `grpc-status`).
    Trailed(Option<Bytes>, Option<http::HeaderMap>),
    /// The client's request body, streaming to the upstream.
    Client(ClientBody),
    /// An upstream's response body, streaming to the client.
    Upstream(UpstreamBody),
    /// A gRPC response body on its way to a gRPC-Web client: its trailers become a frame.
    GrpcWeb(Box<WebBody<ProxyBody>>),
    /// A body going through proxy-wasm filters' body callbacks.
    Filtered(Box<filtered::FilteredBody<ProxyBody>>),
}

impl ProxyBody {
    /// A body of these bytes.
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        if bytes.is_empty() {
            ProxyBody::Empty
        } else {
            ProxyBody::Full(Some(bytes))
        }
    }

    /// A body of these bytes, then these trailers, if any.
    pub fn trailed(bytes: impl Into<Bytes>, trailers: Option<http::HeaderMap>) -> Self {
        match trailers {
            None => ProxyBody::full(bytes),
            Some(trailers) => {
                let bytes = bytes.into();
                ProxyBody::Trailed((!bytes.is_empty()).then_some(bytes), Some(trailers))
            }
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            ProxyBody::Empty => Poll::Ready(None),
            ProxyBody::Full(bytes) => poll_held(bytes, &mut None),
            ProxyBody::Trailed(bytes, trailers) => poll_held(bytes, trailers),
            ProxyBody::Client(body) => Pin::new(body).poll_frame(cx),
            ProxyBody::Upstream(body) => Pin::new(body).poll_frame(cx),
            ProxyBody::GrpcWeb(body) => Pin::new(&mut **body).poll_frame(cx),
            ProxyBody::Filtered(body) => Pin::new(&mut **body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Empty => true,
            ProxyBody::Full(bytes) => bytes.is_none(),
            ProxyBody::Trailed(bytes, trailers) => bytes.is_none() && trailers.is_none(),
            ProxyBody::Client(body) => body.is_end_stream(),
            ProxyBody::Upstream(body) => body.is_end_stream(),
            ProxyBody::GrpcWeb(body) => body.is_end_stream(),
            ProxyBody::Filtered(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Empty => SizeHint::with_exact(0),
            ProxyBody::Full(bytes) => held_size_hint(bytes, false),
            ProxyBody::Trailed(bytes, _) => held_size_hint(bytes, true),
            ProxyBody::Client(body) => body.size_hint(),
            ProxyBody::Upstream(body) => body.size_hint(),
            ProxyBody::GrpcWeb(body) => body.size_hint(),
            ProxyBody::Filtered(body) => body.size_hint(),
        }
    }
}

/// The response body sent to the client. Dropping it drops `D`, the work that ends the request
/// (the proxy's access log and log phase), and tells the connection that the request is over.
pub struct ResponseBody<D = ()> {
    inner: ProxyBody,
    /// Held only for its `Drop`.
    _finish: Option<D>,
    /// Held only for its `Drop`.
    _serving: Option<ServingRequest>,
    /// For a 101: where the connection's serving guard goes, to be held while spliced.
    upgraded: Option<tokio::sync::oneshot::Sender<ServingRequest>>,
}

impl<D> ResponseBody<D> {
    /// A body with no finishing work, for responses outside the proxy path.
    pub fn plain(inner: ProxyBody) -> Self {
        Self::finishing(inner, None)
    }

    /// A body that holds `finish` until it is dropped.
    pub fn finishing(inner: ProxyBody, finish: Option<D>) -> Self {
        ResponseBody {
            inner,
            _finish: finish,
            _serving: None,
            upgraded: None,
        }
    }

    /// An empty body for a 101: the connection's serving guard goes to `splice`, to be held
    /// while the upgraded connection is spliced.
    pub fn upgrading(splice: tokio::sync::oneshot::Sender<ServingRequest>) -> Self {
        ResponseBody {
            inner: ProxyBody::Empty,
            _finish: None,
            _serving: None,
            upgraded: Some(splice),
        }
    }

    /// The same body, holding the connection's count of requests being served until it is done
    /// (for an upgrade, until the spliced connection is).
    pub fn serving(mut self, serving: ServingRequest) -> Self {
        match self.upgraded.take() {
            Some(splice) => {
                let _ = splice.send(serving);
            }
            None => self._serving = Some(serving),
        }
        self
    }
}

impl<D: Unpin> Body for ResponseBody<D> {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
