//! What every body on the data path shares: why a stream failed (or stalled, and on whose
//! side), how its end is seen, and reading one into memory under a bound.

use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

/// Which side of the gateway let a body stall.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stalled {
    /// The client stopped sending its request body.
    Client,
    /// The upstream stopped sending its response body, or the request body stalled on its way
    /// to the upstream for longer than the upstream's `idle_ms`.
    Upstream,
}

impl std::fmt::Display for Stalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stalled::Client => "client",
            Stalled::Upstream => "upstream",
        })
    }
}

/// A body stopped moving.
#[derive(Debug, thiserror::Error)]
#[error("the body stopped moving for {} ms (bound set for the {side})", .idle.as_millis())]
pub struct BodyStalled {
    /// Whose fault it was.
    pub side: Stalled,
    /// The bound it passed.
    pub idle: Duration,
}

/// Why a body stream failed.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The peer's connection failed or sent something malformed.
    #[error(transparent)]
    Peer(#[from] hyper::Error),
    /// The body stopped moving for longer than its bound.
    #[error(transparent)]
    Stalled(#[from] BodyStalled),
    /// A filter's body callback failed, fail-closed: the body stops there.
    #[error("plugin {plugin} failed on the body: {reason}")]
    Plugin {
        /// The plugin.
        plugin: String,
        /// Why.
        reason: String,
    },
    /// A plugin's chunk hook refused the body.
    #[error("plugin {plugin} refused the body")]
    Refused {
        /// The plugin.
        plugin: String,
        /// Its answer, for a client that has not had the response head yet.
        reply: Box<crate::plugin::Reply>,
    },
}

impl BodyError {
    /// Whether the body stopped moving, and on whose side.
    pub fn stalled(&self) -> Option<Stalled> {
        match self {
            BodyError::Stalled(stalled) => Some(stalled.side),
            BodyError::Peer(_) | BodyError::Plugin { .. } | BodyError::Refused { .. } => None,
        }
    }
}

/// Polls a body held in memory: its bytes as one frame, then its trailers, then the end.
pub fn poll_held(
    bytes: &mut Option<Bytes>,
    trailers: &mut Option<HeaderMap>,
) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
    Poll::Ready(
        bytes
            .take()
            .map(Frame::data)
            .or_else(|| trailers.take().map(Frame::trailers))
            .map(Ok),
    )
}

/// The size of a body held in memory. Exact only when no trailers follow: an exact length
/// would send the body without its trailers over HTTP/1.1 (trailers need chunked encoding).
pub fn held_size_hint(bytes: &Option<Bytes>, trailed: bool) -> SizeHint {
    let length = bytes.as_ref().map_or(0, |b| b.len() as u64);
    if trailed {
        let mut hint = SizeHint::new();
        hint.set_lower(length);
        hint
    } else {
        SizeHint::with_exact(length)
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
