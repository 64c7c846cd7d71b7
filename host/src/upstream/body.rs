//! What goes upstream: a request, its body (held, so that a retry can send it again, or
//! streaming from the client), and the body a connection is handed.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::sync::oneshot;

use crate::body::filtered::{ChunkLink, FilteredBody};
use crate::body::stream::{BodyError, Stalled, held_size_hint, poll_held, reached_end};
use crate::edge::trailers::RequestTrailers;
use crate::plugin::StreamType;
use crate::timeouts::IdleBody;

/// The client's request body: it fails if the client stops sending for `server.body_timeout_ms`,
/// and loses the trailers its route does not allow.
pub type ClientBody = IdleBody<RequestTrailers<Incoming>>;

/// The body of a request on its way upstream.
pub enum OutboundBody {
    /// Held in memory, with the trailers that came with it: every retry sends it again.
    Full(Bytes, Option<HeaderMap>),
    /// Streaming from the client: sent at most once, unless it is empty.
    Streaming(ClientBody),
    /// Held or streaming, through proxy-wasm filters' body callbacks: sent at most once.
    Filtered(Box<FilteredBody<Sending>>),
}

impl OutboundBody {
    /// A copy for another attempt, if this body can be sent again.
    pub fn replay(&self) -> Option<OutboundBody> {
        match self {
            OutboundBody::Full(bytes, trailers) => {
                Some(OutboundBody::Full(bytes.clone(), trailers.clone()))
            }
            OutboundBody::Streaming(body) if body.is_end_stream() => {
                Some(OutboundBody::Full(Bytes::new(), None))
            }
            OutboundBody::Streaming(_) | OutboundBody::Filtered(_) => None,
        }
    }

    /// Whether the body is known to be empty, trailers and all.
    pub fn is_empty(&self) -> bool {
        match self {
            OutboundBody::Full(bytes, trailers) => bytes.is_empty() && trailers.is_none(),
            OutboundBody::Streaming(body) => body.is_end_stream(),
            OutboundBody::Filtered(_) => false,
        }
    }

    /// The same body through `links`, proxy-wasm filters' request body callbacks.
    pub fn through(self, links: Vec<ChunkLink>) -> OutboundBody {
        let inner = match self {
            OutboundBody::Full(bytes, trailers) => Sending::held(bytes, trailers),
            OutboundBody::Streaming(body) => Sending::Client(body),
            OutboundBody::Filtered(body) => Sending::Filtered(body),
        };
        OutboundBody::Filtered(Box::new(FilteredBody::new(
            inner,
            StreamType::Request,
            links,
        )))
    }

    /// The body one attempt sends; a streaming one also fails after `idle` without a frame.
    pub(super) fn into_sending(self, idle: Duration) -> Sending {
        match self {
            OutboundBody::Full(bytes, trailers) => Sending::held(bytes, trailers),
            OutboundBody::Streaming(mut body) => {
                body.tighten(idle, Stalled::Upstream);
                Sending::Client(body)
            }
            OutboundBody::Filtered(mut body) => {
                if let Sending::Client(client) = body.inner_mut() {
                    client.tighten(idle, Stalled::Upstream);
                }
                Sending::Filtered(body)
            }
        }
    }
}

/// A request on its way upstream.
pub struct Outbound {
    /// The method.
    pub method: Method,
    /// Path and query, such as `/a/b?c=d`.
    pub path_and_query: String,
    /// The headers to send.
    pub headers: HeaderMap,
    /// The body.
    pub body: OutboundBody,
    /// A bound on the read time tighter than the upstream's `read_ms` (a gRPC client's
    /// `grpc-timeout`).
    pub read_within: Option<Duration>,
    /// Whether it asks to upgrade: it then goes on a connection of its own, never a pooled
    /// one, and a 101 keeps that connection out of the pool.
    pub upgrade: bool,
}

/// What one attempt's connection sends.
#[derive(Debug)]
pub enum Sending {
    /// Bytes held in memory, then the trailers that came with them.
    Held(Option<Bytes>, Option<HeaderMap>),
    /// The client's body, streaming.
    Client(ClientBody),
    /// A body through filters' body callbacks.
    Filtered(Box<FilteredBody<Sending>>),
}

impl Sending {
    /// A body held in memory, then its trailers.
    fn held(bytes: Bytes, trailers: Option<HeaderMap>) -> Self {
        Sending::Held((!bytes.is_empty()).then_some(bytes), trailers)
    }
}

impl Body for Sending {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            Sending::Held(bytes, trailers) => poll_held(bytes, trailers),
            Sending::Client(body) => Pin::new(body).poll_frame(cx),
            Sending::Filtered(body) => Pin::new(&mut **body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Sending::Held(bytes, trailers) => bytes.is_none() && trailers.is_none(),
            Sending::Client(body) => body.is_end_stream(),
            Sending::Filtered(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Sending::Held(bytes, trailers) => held_size_hint(bytes, trailers.is_some()),
            Sending::Client(body) => body.size_hint(),
            Sending::Filtered(body) => body.size_hint(),
        }
    }
}

/// A request body handed to an upstream connection; it says when its last byte has been
/// taken, which is when the read timeout starts.
pub struct OutgoingBody {
    inner: Sending,
    sent: Option<oneshot::Sender<()>>,
}

impl OutgoingBody {
    pub(super) fn new(inner: Sending) -> (Self, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        let mut body = OutgoingBody {
            inner,
            sent: Some(tx),
        };
        if body.inner.is_end_stream() {
            body.mark_sent();
        }
        (body, rx)
    }

    fn mark_sent(&mut self) {
        if let Some(sent) = self.sent.take() {
            let _ = sent.send(());
        }
    }

    /// The body again, for another attempt after a connection that failed before sending it.
    pub(super) fn into_outbound(self) -> OutboundBody {
        match self.inner {
            Sending::Held(bytes, trailers) => {
                OutboundBody::Full(bytes.unwrap_or_default(), trailers)
            }
            Sending::Client(body) => OutboundBody::Streaming(body),
            Sending::Filtered(body) => OutboundBody::Filtered(body),
        }
    }
}

impl Body for OutgoingBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let frame = Pin::new(&mut this.inner).poll_frame(cx);
        if reached_end(&frame, &this.inner) {
            this.mark_sent();
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
