//! Body types on the data path: what goes upstream, and what goes back to the client.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::edge::trailers::RequestTrailers;
use crate::timeouts::{BodyStalled, IdleBody, Stalled};
use crate::upstream::UpstreamBody;

/// The client's request body: it fails if the client stops sending for `server.body_timeout_ms`,
/// and loses the trailers its route does not allow.
pub type ClientBody = IdleBody<RequestTrailers<Incoming>>;

/// Why a body stream failed.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The peer's connection failed or sent something malformed.
    #[error(transparent)]
    Peer(#[from] hyper::Error),
    /// The body stopped moving for longer than its bound.
    #[error(transparent)]
    Stalled(#[from] BodyStalled),
}

impl BodyError {
    /// Whether the body stopped moving, and on whose side.
    pub fn stalled(&self) -> Option<Stalled> {
        match self {
            BodyError::Stalled(stalled) => Some(stalled.side),
            BodyError::Peer(_) => None,
        }
    }
}

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
    GrpcWeb(Box<crate::grpc_web::WebBody>),
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
            ProxyBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Trailed(bytes, trailers) => Poll::Ready(
                bytes
                    .take()
                    .map(Frame::data)
                    .or_else(|| trailers.take().map(Frame::trailers))
                    .map(Ok),
            ),
            ProxyBody::Client(body) => Pin::new(body).poll_frame(cx),
            ProxyBody::Upstream(body) => Pin::new(body).poll_frame(cx),
            ProxyBody::GrpcWeb(body) => Pin::new(&mut **body).poll_frame(cx),
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
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Empty => SizeHint::with_exact(0),
            ProxyBody::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            // Not exact: an exact length would send the body without its trailers over
            // HTTP/1.1 (trailers need chunked encoding).
            ProxyBody::Trailed(bytes, _) => {
                let mut hint = SizeHint::new();
                hint.set_lower(bytes.as_ref().map_or(0, |b| b.len() as u64));
                hint
            }
            ProxyBody::Client(body) => body.size_hint(),
            ProxyBody::Upstream(body) => body.size_hint(),
            ProxyBody::GrpcWeb(body) => body.size_hint(),
        }
    }
}

/// What polling a body gives.
pub type Polled<B> = Poll<Option<Result<Frame<<B as Body>::Data>, <B as Body>::Error>>>;

/// Whether `frame`, just polled from `body`, was its last: the stream ended, or the frame
/// left it at its end.
pub fn reached_end<B: Body>(frame: &Polled<B>, body: &B) -> bool {
    match frame {
        Poll::Ready(None) => true,
        Poll::Ready(Some(Ok(_))) => body.is_end_stream(),
        _ => false,
    }
}

/// Why a body could not be buffered.
#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    /// The body is longer than the bound.
    #[error("body is over {0} bytes")]
    TooLarge(u64),
    /// The peer failed while sending it, or stopped sending.
    #[error("reading the body failed: {0}")]
    Read(#[from] BodyError),
}

/// Reads a whole body into memory, stopping as soon as it passes `limit` bytes.
pub async fn collect_bounded<B>(
    mut body: B,
    limit: u64,
) -> Result<(Bytes, Option<http::HeaderMap>), CollectError>
where
    B: Body<Data = Bytes, Error = BodyError> + Unpin,
{
    if body.size_hint().lower() > limit {
        return Err(CollectError::TooLarge(limit));
    }
    let mut buffer = bytes::BytesMut::new();
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        match frame.into_data() {
            Ok(data) => {
                if buffer.len() as u64 + data.len() as u64 > limit {
                    return Err(CollectError::TooLarge(limit));
                }
                buffer.extend_from_slice(&data);
            }
            Err(frame) => trailers = frame.into_trailers().ok(),
        }
    }
    Ok((buffer.freeze(), trailers))
}
