//! Sending one request: its attempts across nodes, each on a pooled connection, as the
//! upstream's retry policy allows.

use std::time::Duration;

use http::uri::{self, PathAndQuery};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, header};
use http_body::Body;
use tokio::sync::oneshot;

use super::Upstream;
use super::balancer::{InFlight, Node};
use super::body::{Outbound, OutboundBody, OutgoingBody, Sending};
use super::error::{UpstreamError, error_chain};
use super::pool::ConnectFailure;
use super::pool::{NoResponse, NodeConnections, Sender, UpstreamBody};
use crate::body::stream::{BodyError, Stalled};
use crate::config::RetryOn;
use crate::spans::{Kind, RequestSpans, SpanRecord};
use crate::timeouts::IdleBody;

/// Sends `request` to a node of `upstream`, trying other nodes as its retry policy says: after
/// a failed connection, and (for a method in `retry_methods` whose body can be sent again,
/// within the retry budget) after a timeout, a reset or a `retry_on` status.
/// `key` is the consistent-hash key (ignored by other balancers). Each attempt is recorded
/// as a span in `spans`, when the request's spans are recorded.
pub async fn send(
    upstream: &Upstream,
    key: u64,
    request: Outbound,
    mut spans: Option<&mut RequestSpans>,
) -> Result<(Response<UpstreamBody>, InFlight), UpstreamError> {
    let Outbound {
        method,
        path_and_query,
        headers,
        body,
        read_within,
        upgrade,
    } = request;
    if upgrade && upstream.config.scheme.is_http2() {
        return Err(UpstreamError::Failed {
            node: upstream.config.id.clone(),
            reason: "an upgrade needs an HTTP/1.1 upstream (scheme http or https)".into(),
        });
    }
    let path_and_query =
        PathAndQuery::try_from(path_and_query).map_err(|e| UpstreamError::Failed {
            node: upstream.config.id.clone(),
            reason: format!("bad upstream path: {e}"),
        })?;
    let read = upstream
        .read_timeout()
        .min(read_within.unwrap_or(Duration::MAX));
    upstream.retry.request();
    let resend = upstream.retry.may_resend(&method) && body.replay().is_some();
    let mut attempt = Attempt {
        upstream,
        method,
        path_and_query,
        retry_after_send: resend,
        headers,
        body: Some(body),
        read,
        upgrade,
        reused: false,
    };
    let mut tried = Vec::new();
    let mut last_error = UpstreamError::NoNodes;
    // An answer with a `retry_on` status, given to the client if no other node does better.
    let mut fallback: Option<(Response<UpstreamBody>, InFlight)> = None;
    // Why this attempt is a retry, counted once it has a node to go to.
    let mut retrying: Option<RetryOn> = None;
    for number in 0..upstream.attempts {
        let pick = match upstream.pick(key, &tried).await {
            Ok(Some(pick)) => pick,
            Ok(None) => break,
            Err(error) => {
                last_error = error;
                break;
            }
        };
        let retry_of = retrying.take();
        if let Some(miss) = retry_of {
            upstream.retries.record(miss);
        }
        let index = pick.index;
        if pick.failed_open {
            upstream.fail_open.inc();
        }
        tried.push(index);
        let node = upstream.nodes.node(index).clone();
        let in_flight = InFlight::begin(node.clone(), pick.slot);
        let last = number + 1 == upstream.attempts;
        let began = spans.is_some().then(std::time::SystemTime::now);
        let tried_once = attempt.on(index, &node, last).await;
        if let (Some(spans), Some(began)) = (spans.as_deref_mut(), began) {
            let span = attempt_span(
                spans,
                &attempt,
                &node.addr,
                number,
                retry_of,
                &tried_once,
                began,
            );
            spans.push(span);
        }
        retrying = Some(match tried_once {
            Ok(response) => {
                let status = response.status().as_u16();
                if let Some(ejection) = upstream.nodes.ejection() {
                    upstream.judge(index, ejection.judge(status));
                }
                let answered = RetryOn::Status(status);
                if !attempt.retries_after(answered, last) {
                    return Ok((response, in_flight));
                }
                tracing::debug!(node = %node.addr, status, "upstream answered a retry_on status");
                fallback = Some((response, in_flight));
                answered
            }
            Err(error) => {
                upstream.failures.record(&error);
                upstream.judge(index, error.outcome());
                tracing::debug!(node = %node.addr, %error, "upstream attempt failed");
                let happened = error.retry_on();
                last_error = error;
                match happened {
                    Some(happened) if attempt.retries_after(happened, last) => happened,
                    _ => break,
                }
            }
        });
    }
    match fallback {
        Some(answer) => Ok(answer),
        None => Err(last_error),
    }
}

/// One request's state across its attempts.
pub(super) struct Attempt<'a> {
    pub(super) upstream: &'a Upstream,
    pub(super) method: Method,
    pub(super) path_and_query: PathAndQuery,
    /// Whether a node that took the request but did not answer may be followed by another:
    /// only for an idempotent request whose body can be sent again.
    pub(super) retry_after_send: bool,
    pub(super) headers: HeaderMap,
    /// What the next attempt sends; `None` once a body that cannot be replayed went out.
    pub(super) body: Option<OutboundBody>,
    /// How long a node may take to answer.
    pub(super) read: Duration,
    /// Whether the request asks to upgrade.
    pub(super) upgrade: bool,
    /// Whether the last attempt went on a pooled connection rather than a new one.
    pub(super) reused: bool,
}

/// The span of attempt `number` (from 0) on `node`, which is a retry after `retry_of`.
fn attempt_span(
    spans: &mut RequestSpans,
    attempt: &Attempt<'_>,
    node: &str,
    number: usize,
    retry_of: Option<RetryOn>,
    tried: &Result<Response<UpstreamBody>, UpstreamError>,
    began: std::time::SystemTime,
) -> SpanRecord {
    let id = spans.new_id();
    let parent = Some(spans.context.span_id);
    let name = format!("upstream {}", attempt.upstream.config.id);
    let mut span = SpanRecord::ending_now(name, Kind::Client, id, parent, began);
    span.set("http.request.method", attempt.method.to_string());
    span.set("server.address", node.to_owned());
    span.set("weir.upstream", attempt.upstream.config.id.to_string());
    span.set("weir.attempt", number as i64 + 1);
    span.set(
        "weir.connection",
        if attempt.reused { "reused" } else { "new" },
    );
    if let Some(retry_of) = retry_of {
        span.set("weir.retry_reason", retry_reason(retry_of));
    }
    match tried {
        Ok(response) => {
            let status = response.status().as_u16();
            span.set("http.response.status_code", i64::from(status));
            if status >= 500 {
                span.failed = Some(format!("answered {status}").into());
            }
        }
        Err(error) => {
            span.set("error.type", error.kind());
            span.failed = Some(error.kind().into());
        }
    }
    span
}

/// Why an attempt is a retry, as its span says.
fn retry_reason(happened: RetryOn) -> String {
    match happened {
        RetryOn::ConnectFailure => "connect-failure".to_owned(),
        RetryOn::Timeout => "timeout".to_owned(),
        RetryOn::Reset => "reset".to_owned(),
        RetryOn::Status(status) => status.to_string(),
    }
}

impl Attempt<'_> {
    /// Whether an attempt that ended as `happened` is followed by another: `retry_on` names
    /// it, there are attempts left and a body to send, and, when a node took the request, its
    /// method may be sent again and the budget allows (a refusal is counted).
    fn retries_after(&self, happened: RetryOn, last: bool) -> bool {
        let upstream = self.upstream;
        if last || self.body.is_none() || !upstream.retry.covers(happened) {
            return false;
        }
        if !happened.after_send() {
            return true;
        }
        if !self.retry_after_send {
            return false;
        }
        let allowed = upstream.retry.withdraw();
        if !allowed {
            upstream.retries.budget_exhausted.inc();
        }
        allowed
    }

    /// One attempt on node `index`: a pooled connection, or a new one if the pooled one turns
    /// out to be closed before the request was written.
    async fn on(
        &mut self,
        index: usize,
        node: &Node,
        last: bool,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let upstream = self.upstream;
        let connections = &upstream.connections[index];
        let keep_copy = self.retry_after_send && !last;
        let mut fresh = self.upgrade;
        loop {
            let checkout =
                tokio::time::timeout(upstream.connect_timeout(), connections.checkout(fresh));
            let (mut sender, reused) = match checkout.await {
                Ok(Ok(ready)) => ready,
                Ok(Err(ConnectFailure(reason))) => {
                    return Err(UpstreamError::Connect {
                        node: node.addr.clone(),
                        reason,
                    });
                }
                Err(_) => {
                    return Err(UpstreamError::ConnectTimeout {
                        node: node.addr.clone(),
                        ms: upstream.config.timeout.connect_ms,
                    });
                }
            };
            self.reused = reused;
            let Some(body) = self.body.take() else {
                return Err(UpstreamError::NoNodes);
            };
            let headers = if keep_copy {
                self.body = body.replay();
                self.headers.clone()
            } else {
                std::mem::take(&mut self.headers)
            };
            let body = body.into_sending(upstream.idle_timeout());
            let (request, sent) = build_request(
                &self.method,
                &self.path_and_query,
                connections,
                &sender,
                headers,
                body,
            );
            match sender.exchange(request, sent, self.read).await {
                Ok(response) => {
                    let (parts, incoming) = response.into_parts();
                    let give_back = match sender {
                        // Upgraded: the connection now belongs to the splice.
                        Sender::Http1(_) if parts.status == StatusCode::SWITCHING_PROTOCOLS => None,
                        // An upgrade the node declined: the connection may be left in any
                        // state, so it is not reused.
                        Sender::Http1(_) if self.upgrade => None,
                        // A response without a body (HEAD, 204, 304) is never read: its
                        // connection is free now.
                        Sender::Http1(sender) if incoming.is_end_stream() => {
                            connections.put_back(sender);
                            None
                        }
                        Sender::Http1(sender) => Some((connections.clone(), sender)),
                        Sender::Http2(_) => None,
                    };
                    let body = UpstreamBody {
                        inner: IdleBody::new(incoming, upstream.idle_timeout(), Stalled::Upstream),
                        give_back,
                        idle_timeouts: upstream.failures.idle_timeout.clone(),
                    };
                    return Ok(Response::from_parts(parts, body));
                }
                Err(NoResponse::NotSent(request, error)) => {
                    // Nothing was written: the request, body included, can go again.
                    let (parts, outgoing) = request.into_parts();
                    self.headers = parts.headers;
                    self.body = Some(outgoing.into_outbound());
                    if reused {
                        // A pooled connection the node had closed: try a new one.
                        fresh = true;
                        continue;
                    }
                    return Err(UpstreamError::Connect {
                        node: node.addr.clone(),
                        reason: error_chain(&error),
                    });
                }
                Err(NoResponse::ReadTimeout) => {
                    return Err(UpstreamError::Timeout {
                        node: node.addr.clone(),
                        ms: self.read.as_millis() as u64,
                    });
                }
                Err(NoResponse::Failed(error)) => {
                    return Err(failed_exchange(upstream, node, &error));
                }
            }
        }
    }
}

/// The request for one attempt: origin-form for HTTP/1.1, absolute for HTTP/2.
pub(super) fn build_request(
    method: &Method,
    path_and_query: &PathAndQuery,
    connections: &NodeConnections,
    sender: &Sender,
    mut headers: HeaderMap,
    body: Sending,
) -> (Request<OutgoingBody>, oneshot::Receiver<()>) {
    let (body, sent) = OutgoingBody::new(body);
    let mut request = Request::new(body);
    *request.method_mut() = method.clone();
    let uri = match sender {
        Sender::Http1(_) => {
            if !headers.contains_key(header::HOST)
                && let Ok(host) = HeaderValue::from_str(connections.authority.as_str())
            {
                headers.insert(header::HOST, host);
            }
            Uri::from(path_and_query.clone())
        }
        Sender::Http2(_) => {
            *request.version_mut() = http::Version::HTTP_2;
            let mut parts = uri::Parts::default();
            parts.scheme = Some(if connections.tls.is_some() {
                uri::Scheme::HTTPS
            } else {
                uri::Scheme::HTTP
            });
            parts.authority = Some(connections.authority.clone());
            parts.path_and_query = Some(path_and_query.clone());
            Uri::from_parts(parts).expect("scheme, authority and path make a URI")
        }
    };
    *request.uri_mut() = uri;
    *request.headers_mut() = headers;
    (request, sent)
}

/// Names what went wrong once the request was (partly) sent.
pub(super) fn failed_exchange(
    upstream: &Upstream,
    node: &Node,
    error: &hyper::Error,
) -> UpstreamError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(body) = e.downcast_ref::<BodyError>() {
            // The client's body failed (or stopped), not the node.
            let stalled = matches!(body, BodyError::Stalled(_));
            let refused = match body {
                BodyError::Refused { reply, .. } => Some(reply.clone()),
                _ => None,
            };
            return UpstreamError::RequestBody {
                node: node.addr.clone(),
                stalled,
                reason: body.to_string(),
                refused,
            };
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::TimedOut
        {
            return UpstreamError::SendTimeout {
                node: node.addr.clone(),
                ms: upstream.config.timeout.send_ms,
            };
        }
        source = e.source();
    }
    UpstreamError::Failed {
        node: node.addr.clone(),
        reason: error_chain(error),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;
    use http_body_util::BodyExt;
    use hyper_util::rt::TokioIo;

    use super::*;
    use crate::config::UpstreamConfig;
    use crate::metrics::Metrics;
    use crate::upstream::ClientPool;

    /// A loopback HTTP/1.1 server that answers every request with `body`, and counts the
    /// connections it accepted.
    async fn server(body: &'static str) -> (u16, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counted = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                let service = hyper::service::service_fn(move |_| async move {
                    let body = http_body_util::Full::new(Bytes::from_static(body.as_bytes()));
                    Ok::<_, std::convert::Infallible>(Response::new(body))
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        (port, accepted)
    }

    /// A port nothing listens on: bound, then let go.
    fn closed_port() -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    }

    fn upstream(ports: &[u16], clients: &ClientPool) -> Upstream {
        let nodes: Vec<_> = ports
            .iter()
            .map(|port| serde_json::json!({"host": "127.0.0.1", "port": port, "weight": 1}))
            .collect();
        let config: UpstreamConfig =
            crate::config::parse(&serde_json::json!({"id": "u", "nodes": nodes})).unwrap();
        Upstream::new(config, clients, &Metrics::new()).unwrap()
    }

    fn get() -> Outbound {
        Outbound {
            method: Method::GET,
            path_and_query: "/".into(),
            headers: HeaderMap::new(),
            body: OutboundBody::Full(Bytes::new(), None),
            read_within: None,
            upgrade: false,
        }
    }

    async fn read(response: Response<UpstreamBody>) -> Bytes {
        response.into_body().collect().await.unwrap().to_bytes()
    }

    #[tokio::test]
    async fn a_response_read_to_its_end_gives_the_connection_back_for_the_next_request() {
        let (port, accepted) = server("hi").await;
        let clients = ClientPool::default();
        let upstream = upstream(&[port], &clients);
        for _ in 0..3 {
            let (response, _in_flight) = send(&upstream, 0, get(), None).await.unwrap();
            assert_eq!(read(response).await, "hi");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_response_dropped_before_its_end_keeps_its_connection_out_of_the_pool() {
        let (port, accepted) = server("hi").await;
        let clients = ClientPool::default();
        let upstream = upstream(&[port], &clients);
        let (unread, _in_flight) = send(&upstream, 0, get(), None).await.unwrap();
        drop(unread);
        let (response, _in_flight) = send(&upstream, 0, get(), None).await.unwrap();
        assert_eq!(read(response).await, "hi");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn the_connections_of_a_node_outlive_the_upstream_that_named_it() {
        let (port, accepted) = server("hi").await;
        let clients = ClientPool::default();
        let first = upstream(&[port], &clients);
        let (response, _in_flight) = send(&first, 0, get(), None).await.unwrap();
        assert_eq!(read(response).await, "hi");
        // A config reload builds the upstream again; the node's idle connection is still there.
        let reloaded = upstream(&[port], &clients);
        drop(first);
        let (response, _in_flight) = send(&reloaded, 0, get(), None).await.unwrap();
        assert_eq!(read(response).await, "hi");
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_refused_connection_moves_on_to_the_next_node() {
        let (port, _) = server("from the live node").await;
        let clients = ClientPool::default();
        let upstream = upstream(&[closed_port(), port], &clients);
        // Round robin starts at each node in turn: half the requests try the closed one first.
        for _ in 0..4 {
            let (response, in_flight) = send(&upstream, 0, get(), None).await.unwrap();
            assert_eq!(in_flight.node().addr, format!("127.0.0.1:{port}"));
            assert_eq!(read(response).await, "from the live node");
        }
    }

    #[tokio::test]
    async fn with_no_node_answering_the_last_connect_failure_is_named() {
        let clients = ClientPool::default();
        let closed = closed_port();
        let upstream = upstream(&[closed], &clients);
        match send(&upstream, 0, get(), None).await {
            Err(UpstreamError::Connect { node, .. }) => {
                assert_eq!(node, format!("127.0.0.1:{closed}"));
            }
            other => panic!("{:?}", other.map(|(r, _)| r.status())),
        }
    }
}
