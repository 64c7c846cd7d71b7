//! Body types on the data path: what goes upstream, and what goes back to the client.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;

/// A body that streams from a peer, or was built in memory.
#[derive(Debug)]
pub enum ProxyBody {
    /// No body.
    Empty,
    /// A body held in memory, sent as one frame.
    Full(Option<Bytes>),
    /// A body streaming from the client or the upstream.
    Incoming(Incoming),
    /// A client body that can be taken back if the upstream connection fails before it is read.
    Reclaimable(ReclaimableBody),
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
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ProxyBody::Empty => Poll::Ready(None),
            ProxyBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Incoming(body) => Pin::new(body).poll_frame(cx),
            ProxyBody::Reclaimable(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Empty => true,
            ProxyBody::Full(bytes) => bytes.is_none(),
            ProxyBody::Incoming(body) => body.is_end_stream(),
            ProxyBody::Reclaimable(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Empty => SizeHint::with_exact(0),
            ProxyBody::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            ProxyBody::Incoming(body) => body.size_hint(),
            ProxyBody::Reclaimable(body) => body.size_hint(),
        }
    }
}

/// A client body parked in a shared slot until the first poll. If the connection attempt fails,
/// hyper never polls it, and [`ReclaimableBody::reclaim`] gets it back for a retry.
#[derive(Debug)]
pub struct ReclaimableBody {
    slot: Arc<Mutex<Option<Incoming>>>,
    taken: Option<Incoming>,
    hint: SizeHint,
    end: bool,
}

/// The handle that takes an unread body back.
#[derive(Debug, Clone)]
pub struct Reclaim(Arc<Mutex<Option<Incoming>>>);

impl ReclaimableBody {
    /// Parks `body`; the returned handle can take it back while it is unread.
    pub fn new(body: Incoming) -> (Self, Reclaim) {
        let hint = body.size_hint();
        let end = body.is_end_stream();
        let slot = Arc::new(Mutex::new(Some(body)));
        let parked = ReclaimableBody {
            slot: slot.clone(),
            taken: None,
            hint,
            end,
        };
        (parked, Reclaim(slot))
    }
}

impl Reclaim {
    /// The body, if nothing has read from it yet.
    pub fn reclaim(&self) -> Option<Incoming> {
        self.0.lock().expect("body slot lock").take()
    }
}

impl Body for ReclaimableBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if this.taken.is_none() {
            this.taken = this.slot.lock().expect("body slot lock").take();
        }
        match &mut this.taken {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.end
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}

/// Why a body could not be buffered.
#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    /// The body is longer than the bound.
    #[error("body is over {0} bytes")]
    TooLarge(u64),
    /// The peer failed while sending it.
    #[error("reading the body failed: {0}")]
    Read(#[from] hyper::Error),
}

/// Reads a whole body into memory, stopping as soon as it passes `limit` bytes.
pub async fn collect_bounded<B>(
    mut body: B,
    limit: u64,
) -> Result<(Bytes, Option<http::HeaderMap>), CollectError>
where
    B: Body<Data = Bytes, Error = hyper::Error> + Unpin,
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
