//! A body that goes through proxy-wasm filters' body callbacks chunk by chunk, as it streams:
//! each chunk is called through the chain in order, a filter that pauses holds it (bounded by
//! its `max_body_bytes`) until a later chunk or the end, and nothing else is buffered. Its
//! trailers, if it has any, then go through the filters' trailers callbacks.

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

/// What a run through the filters passes on: bytes, and at the end the trailers, if any.
type Passed = (Bytes, Option<HeaderMap>);

type ChunkRun = Pin<Box<dyn Future<Output = (Vec<ChunkLink>, Result<Passed, BodyError>)> + Send>>;

/// A body through filters' body callbacks.
pub struct FilteredBody<B> {
    inner: B,
    stream: StreamType,
    /// The filters, in the order the body meets them; away while a chunk is in their hands.
    links: Vec<ChunkLink>,
    running: Option<ChunkRun>,
    /// Trailers, sent once the filters have seen the end (and the trailers).
    trailers: Option<HeaderMap>,
    /// The inner body has ended, and the filters have been told.
    ended: bool,
    /// A frame taken from the inner body before it came here, to go first.
    first: Option<Result<Frame<Bytes>, BodyError>>,
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
            first: None,
        }
    }

    /// Puts `first`, taken from the inner body, back in front of the rest.
    pub fn with_first(mut self, first: Option<Result<Frame<Bytes>, BodyError>>) -> Self {
        self.first = first;
        self
    }

    /// The body the filters read from.
    pub fn inner_mut(&mut self) -> &mut B {
        &mut self.inner
    }

    /// Starts one chunk through the chain; the last one takes the trailers after it.
    fn run(&mut self, chunk: Bytes, end: bool) {
        let links = std::mem::take(&mut self.links);
        let trailers = if end { self.trailers.take() } else { None };
        let run = through(links, self.stream, chunk, end, trailers);
        self.running = Some(Box::pin(run));
    }
}

/// Calls each filter with the chunk the one before passed on, until one holds it; at the end
/// every filter is called, so that each lets go of what it held, and then `trailers` go
/// through the filters' trailers callbacks, in the same order.
async fn through(
    mut links: Vec<ChunkLink>,
    stream: StreamType,
    chunk: Bytes,
    end: bool,
    trailers: Option<HeaderMap>,
) -> (Vec<ChunkLink>, Result<Passed, BodyError>) {
    let data = match chunks(&mut links, stream, chunk, end).await {
        Ok(data) => data,
        Err(failure) => return (links, Err(failure)),
    };
    let Some(trailers) = trailers else {
        return (links, Ok((data, None)));
    };
    match trailers_through(&mut links, stream, trailers).await {
        Ok(trailers) => (links, Ok((data, Some(trailers)))),
        Err(failure) => (links, Err(failure)),
    }
}

/// Calls each filter's trailers callback with the trailers the one before left.
async fn trailers_through(
    links: &mut [ChunkLink],
    stream: StreamType,
    mut trailers: HeaderMap,
) -> Result<HeaderMap, BodyError> {
    let readers = links
        .iter_mut()
        .filter(|link| !link.skipped && link.pool.reads_trailers(stream));
    for link in readers {
        let fallback = (link.failure == FailurePolicy::Open).then(|| trailers.clone());
        let started = std::time::Instant::now();
        let outcome = link.pool.on_trailers(&link.bound, stream, trailers).await;
        let failure = outcome.as_ref().err().map(PluginError::kind);
        link.metrics.record(started.elapsed(), failure);
        trailers = match (outcome, fallback) {
            (Ok(trailers), _) => trailers,
            (Err(error), Some(fallback)) => {
                tracing::debug!(plugin = link.pool.name(), %error, "filter failed open on the trailers; skipping it");
                link.skipped = true;
                fallback
            }
            (Err(error), None) => return Err(failed(link, &error)),
        };
    }
    Ok(trailers)
}

/// The body's failure for a filter that failed closed.
fn failed(link: &ChunkLink, error: &PluginError) -> BodyError {
    BodyError::Plugin {
        plugin: link.pool.name().to_owned(),
        reason: error.to_string(),
    }
}

/// The chunk through the filters' body callbacks: what the last one passed on.
async fn chunks(
    links: &mut [ChunkLink],
    stream: StreamType,
    chunk: Bytes,
    end: bool,
) -> Result<Bytes, BodyError> {
    let mut data = Some(chunk);
    let readers = links
        .iter_mut()
        .filter(|link| !link.skipped && link.pool.reads_body(stream));
    for link in readers {
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
            // A refusal is the plugin's answer, not its failure: no policy skips it.
            Ok((ChunkOutcome::Refuse(reply), _)) => {
                let plugin = link.pool.name().to_owned();
                let reply = Box::new(reply);
                return Err(BodyError::Refused { plugin, reply });
            }
            Err(error) => match fallback {
                Some(bytes) => {
                    tracing::debug!(plugin = link.pool.name(), %error, "filter failed open on the body; skipping it");
                    link.skipped = true;
                    data = Some(bytes);
                }
                None => return Err(failed(link, &error)),
            },
        }
    }
    Ok(data.unwrap_or_default())
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
                    Ok((bytes, trailers)) => {
                        if trailers.is_some() {
                            this.trailers = trailers;
                        }
                        if !bytes.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(bytes))));
                        }
                        continue;
                    }
                }
            }
            if this.ended {
                return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            let polled = match this.first.take() {
                Some(first) => Some(first),
                None => ready!(Pin::new(&mut this.inner).poll_frame(cx)),
            };
            match polled {
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

/// What one look at a body found of it, without waiting.
pub enum Arrived {
    /// All of it: one frame, after which it had ended (or no frame at all).
    Whole(Bytes),
    /// Its first frame (or its error), with more to come.
    First(Result<Frame<Bytes>, BodyError>),
    /// Nothing yet.
    Nothing,
}

/// Looks once at what of `body` has already arrived. A body read whole this way (a small
/// answer, in the read that brought its head) goes through filters' body callbacks with no
/// stream to wrap; a frame taken goes back with [`FilteredBody::with_first`].
pub fn arrived<B>(body: &mut B) -> Arrived
where
    B: Body<Data = Bytes, Error = BodyError> + Unpin,
{
    // The body is polled again, with the task's own waker, whenever this finds it unfinished.
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match Pin::new(&mut *body).poll_frame(&mut cx) {
        Poll::Pending => Arrived::Nothing,
        Poll::Ready(None) => Arrived::Whole(Bytes::new()),
        Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
            Ok(data) if body.is_end_stream() => Arrived::Whole(data),
            Ok(data) => Arrived::First(Ok(Frame::data(data))),
            Err(frame) => Arrived::First(Ok(frame)),
        },
        Poll::Ready(Some(Err(error))) => Arrived::First(Err(error)),
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

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use http_body_util::BodyExt;

    use super::*;

    /// A body that yields its script in order: `Some` a data frame, `None` one pending poll.
    struct Scripted(VecDeque<Option<&'static str>>);

    impl Body for Scripted {
        type Data = Bytes;
        type Error = BodyError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
            match self.0.pop_front() {
                Some(Some(data)) => {
                    Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(data.as_bytes())))))
                }
                Some(None) => {
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
                None => Poll::Ready(None),
            }
        }

        fn is_end_stream(&self) -> bool {
            self.0.is_empty()
        }
    }

    fn scripted(script: &[Option<&'static str>]) -> Scripted {
        Scripted(script.iter().copied().collect())
    }

    #[test]
    fn a_body_that_arrived_in_one_frame_is_whole() {
        let mut body = scripted(&[Some("all of it")]);
        assert!(matches!(arrived(&mut body), Arrived::Whole(bytes) if bytes == "all of it"));
        let mut body = scripted(&[]);
        assert!(matches!(arrived(&mut body), Arrived::Whole(bytes) if bytes.is_empty()));
        let mut body = scripted(&[None, Some("later")]);
        assert!(matches!(arrived(&mut body), Arrived::Nothing));
    }

    #[tokio::test]
    async fn a_frame_taken_early_goes_first_and_the_rest_follows() {
        let mut body = scripted(&[Some("first "), None, Some("then the rest")]);
        let Arrived::First(first) = arrived(&mut body) else {
            panic!("the first frame had arrived, and more was to come");
        };
        let body =
            FilteredBody::new(body, StreamType::Response, Vec::new()).with_first(Some(first));
        let Ok(collected) = body.collect().await else {
            panic!("the body failed");
        };
        let collected = collected.to_bytes();
        assert_eq!(collected, "first then the rest");
    }
}
