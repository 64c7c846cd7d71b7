//! A body that goes through proxy-wasm filters' body callbacks chunk by chunk, as it streams:
//! each chunk is called through the chain in order, a filter that pauses holds it (bounded by
//! its `max_body_bytes`) until a later chunk or the end, and nothing else is buffered.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

use super::stream::BodyError;
use crate::config::FailurePolicy;
use crate::metrics::PluginMetrics;
use crate::plugin::{Bound, ChunkOutcome, PluginError, PluginPool, StreamType};

/// One filter a body goes through, with the request's instance of it.
pub struct ChunkLink {
    pool: Arc<PluginPool>,
    bound: Bound,
    failure: FailurePolicy,
    metrics: Arc<PluginMetrics>,
    /// What the filter holds from earlier chunks.
    held: Vec<u8>,
    /// It failed open: the rest of the body passes it by.
    skipped: bool,
}

impl ChunkLink {
    /// The filter of `pool`, calling the request's instance through `bound`; each call is
    /// counted in `metrics`, as the phases' calls are.
    pub fn new(
        pool: Arc<PluginPool>,
        bound: Bound,
        failure: FailurePolicy,
        metrics: Arc<PluginMetrics>,
    ) -> Self {
        ChunkLink {
            pool,
            bound,
            failure,
            metrics,
            held: Vec::new(),
            skipped: false,
        }
    }
}

type ChunkRun = Pin<Box<dyn Future<Output = (Vec<ChunkLink>, Result<Bytes, BodyError>)> + Send>>;

/// A body through filters' body callbacks.
pub struct FilteredBody<B> {
    inner: B,
    stream: StreamType,
    /// The filters, in the order the body meets them; away while a chunk is in their hands.
    links: Vec<ChunkLink>,
    running: Option<ChunkRun>,
    /// Trailers, sent once the filters have seen the end.
    trailers: Option<HeaderMap>,
    /// The inner body has ended, and the filters have been told.
    ended: bool,
}

impl<B> FilteredBody<B> {
    /// `inner`, through `links` in order; `stream` says which callbacks they get.
    pub fn new(inner: B, stream: StreamType, links: Vec<ChunkLink>) -> Self {
        FilteredBody {
            inner,
            stream,
            links,
            running: None,
            trailers: None,
            ended: false,
        }
    }

    /// The body the filters read from.
    pub fn inner_mut(&mut self) -> &mut B {
        &mut self.inner
    }

    /// Starts one chunk through the chain.
    fn run(&mut self, chunk: Bytes, end: bool) {
        let links = std::mem::take(&mut self.links);
        self.running = Some(Box::pin(through(links, self.stream, chunk, end)));
    }
}

/// Calls each filter with the chunk the one before passed on, until one holds it; at the end
/// every filter is called, so that each lets go of what it held.
async fn through(
    mut links: Vec<ChunkLink>,
    stream: StreamType,
    chunk: Bytes,
    end: bool,
) -> (Vec<ChunkLink>, Result<Bytes, BodyError>) {
    let mut data = Some(chunk);
    for link in links.iter_mut().filter(|link| !link.skipped) {
        let Some(bytes) = data.take() else {
            break;
        };
        let mut held = std::mem::take(&mut link.held);
        held.extend_from_slice(&bytes);
        let fallback = (link.failure == FailurePolicy::Open).then(|| Bytes::from(held.clone()));
        let started = std::time::Instant::now();
        let outcome = link
            .pool
            .on_body_chunk(&link.bound, stream, held, end)
            .await;
        let failure = outcome.as_ref().err().map(PluginError::kind);
        link.metrics.record(started.elapsed(), failure);
        match outcome {
            Ok((ChunkOutcome::Pass(out), _)) => data = Some(out),
            Ok((ChunkOutcome::Hold, kept)) => link.held = kept,
            Err(error) => match fallback {
                Some(bytes) => {
                    tracing::debug!(plugin = link.pool.name(), %error, "filter failed open on the body; skipping it");
                    link.skipped = true;
                    data = Some(bytes);
                }
                None => {
                    let failure = BodyError::Plugin {
                        plugin: link.pool.name().to_owned(),
                        reason: error.to_string(),
                    };
                    return (links, Err(failure));
                }
            },
        }
    }
    (links, Ok(data.unwrap_or_default()))
}

impl<B> Body for FilteredBody<B>
where
    B: Body<Data = Bytes, Error = BodyError> + Unpin,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        loop {
            if let Some(running) = &mut this.running {
                let (links, out) = ready!(running.as_mut().poll(cx));
                this.running = None;
                this.links = links;
                match out {
                    Err(error) => {
                        this.ended = true;
                        this.trailers = None;
                        return Poll::Ready(Some(Err(error)));
                    }
                    Ok(bytes) if !bytes.is_empty() => {
                        return Poll::Ready(Some(Ok(Frame::data(bytes))));
                    }
                    Ok(_) => continue,
                }
            }
            if this.ended {
                return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    // The last chunk carries the end, rather than a call of its own after it.
                    Ok(data) if this.inner.is_end_stream() => {
                        this.ended = true;
                        this.run(data, true);
                    }
                    Ok(data) => this.run(data, false),
                    Err(frame) => {
                        this.trailers = frame.into_trailers().ok();
                        this.ended = true;
                        this.run(Bytes::new(), true);
                    }
                },
                Some(Err(error)) => return Poll::Ready(Some(Err(error))),
                None => {
                    this.ended = true;
                    this.run(Bytes::new(), true);
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.running.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        // A filter may change the length: unknown until the end.
        SizeHint::default()
    }
}

impl<B> std::fmt::Debug for FilteredBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FilteredBody")
            .field("filters", &self.links.len())
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}
