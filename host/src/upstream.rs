//! Upstreams at run time: node sets, each node's pooled connections, and sending a request
//! with retries.
//!
//! The gateway keeps its own connections rather than a generic client pool, so that each of an
//! upstream's timeouts means one thing:
//!
//! - `connect_ms`: one connection attempt to one node; on failure the next node is tried;
//! - `send_ms`: the longest the node may leave the gateway's writes waiting (it stopped reading);
//! - `read_ms`: from the request's last byte handed to the connection to the response head;
//! - `idle_ms`: the longest a body may stop moving on its way through, either direction.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{self, Authority, PathAndQuery};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, header};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::metrics::counter::Counter;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tokio::time::Instant;

use crate::balancer::{self, Ejection, InFlight, Node, NodeSet, Outcome, Probing};
use crate::body::{BodyError, ClientBody, ProxyBody, reached_end};
use crate::config::{RetryOn, Scheme, UpstreamConfig, UpstreamTls};
use crate::metrics::Metrics;
use crate::retry::RetryPolicy;
use crate::timeouts::{IdleBody, Stalled, TimedIo};
use crate::tls::{self, ClientTlsError};
use crate::workers;
use rustls_pki_types::ServerName;
use tokio_rustls::TlsConnector;

/// An idle HTTP/1.1 connection older than this is closed rather than reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle HTTP/1.1 connections kept per node.
const MAX_IDLE_PER_NODE: usize = 256;

/// An upstream ready to serve: its nodes, their connections and its retry budget.
#[derive(Debug)]
pub struct Upstream {
    /// The config it was built from.
    pub config: UpstreamConfig,
    /// The nodes and their balancer.
    pub nodes: Arc<NodeSet>,
    /// Each node's connections, in the order of `nodes`.
    connections: Vec<Arc<NodeConnections>>,
    attempts: usize,
    retry: RetryPolicy,
    /// Per node, in the order of `nodes`: a slot for each request allowed in flight at once
    /// (`max_connections`); none without a limit.
    slots: Option<Vec<Arc<Semaphore>>>,
    failures: FailureCounters,
    retries: RetryCounters,
    /// `weir_upstream_ejections_total`, per node in the order of `nodes`.
    ejections: Vec<Counter>,
    fail_open: Counter,
    /// Stops the active health checks' task when the upstream goes.
    _probes: Option<tokio_util::sync::DropGuard>,
}

impl Upstream {
    /// Builds the runtime form of a validated upstream config; only its TLS settings can
    /// fail (a CA bundle that holds no certificate, a system without roots).
    pub fn new(
        config: UpstreamConfig,
        clients: &ClientPool,
        metrics: &Metrics,
    ) -> Result<Self, String> {
        let nodes = config
            .nodes
            .iter()
            .map(|n| {
                Arc::new(Node::new(
                    format_addr(&n.host, n.port),
                    n.effective_weight(),
                ))
            })
            .collect();
        let ejection = config.checks.passive.as_ref().map(Ejection::new);
        let probing = config.checks.active.as_ref().map(Probing::new);
        let nodes = Arc::new(NodeSet::checked(nodes, config.balancer, ejection, probing));
        let send_stall = Duration::from_millis(config.timeout.send_ms);
        let connections = config
            .nodes
            .iter()
            .map(|n| {
                let key = NodeKey {
                    scheme: config.scheme,
                    tls: config.tls.clone().filter(|_| config.scheme.is_tls()),
                    host: n.host.clone(),
                    port: n.port,
                    send_stall,
                };
                clients.node(key)
            })
            .collect::<Result<_, _>>()
            .map_err(|e: ClientTlsError| format!("tls: {e}"))?;
        if config.scheme.is_tls() && config.tls.as_ref().is_some_and(|tls| !tls.verify) {
            tracing::warn!(upstream = %config.id, "tls.verify is false: any certificate is accepted from this upstream's nodes");
        }
        let others = nodes.selectable().saturating_sub(1);
        let retries = config.retries.map_or(others, |r| r as usize);
        let failures = FailureCounters::new(metrics, &config.id);
        let ejections = nodes
            .nodes()
            .iter()
            .map(|node| metrics.upstream_ejections(&config.id, &node.addr))
            .collect();
        let fail_open = metrics.upstream_fail_open(&config.id);
        let retries_counted = RetryCounters::new(metrics, &config.id);
        let retry = RetryPolicy::new(&config);
        let slots = config.max_connections.map(|limit| {
            let limit = usize::try_from(limit)
                .unwrap_or(usize::MAX)
                .min(Semaphore::MAX_PERMITS);
            (0..config.nodes.len())
                .map(|_| Arc::new(Semaphore::new(limit)))
                .collect()
        });
        let probes = config.checks.active.clone().and_then(|check| {
            let gauges = nodes
                .nodes()
                .iter()
                .map(|node| metrics.upstream_node_healthy(&config.id, &node.addr))
                .collect();
            crate::probe::start(&config.id, nodes.clone(), &config.nodes, check, gauges)
        });
        Ok(Upstream {
            config,
            nodes,
            connections,
            attempts: retries + 1,
            retry,
            slots,
            failures,
            retries: retries_counted,
            ejections,
            fail_open,
            _probes: probes,
        })
    }

    /// Tells passive health checks how an attempt on node `index` went.
    fn judge(&self, index: usize, outcome: Outcome) {
        if self.nodes.ejection().is_none() {
            return;
        }
        if self.nodes.record(index, outcome, balancer::now_ms()) {
            self.ejections[index].inc();
            let node = &self.nodes.node(index).addr;
            tracing::warn!(upstream = %self.config.id, %node, "node ejected by passive health checks");
        }
    }

    /// A node for the next attempt, not one of `tried` while another can be had, and its slot
    /// under `max_connections`. When every candidate is full the request waits up to
    /// `queue_ms` for the first one's next free slot.
    async fn pick(&self, key: u64, tried: &[usize]) -> Result<Option<Pick>, UpstreamError> {
        let now = self.nodes.select_time();
        let first = self.nodes.select(key, tried, now).or_else(|| {
            // Every node was tried: an operator who asked for more retries than there are
            // nodes gets them on nodes tried before.
            let again = self.config.retries.is_some() && !tried.is_empty();
            again.then(|| self.nodes.select(key, &[], now)).flatten()
        });
        let Some((index, failed_open)) = first else {
            return Ok(None);
        };
        let Some(slots) = &self.slots else {
            return Ok(Some(Pick {
                index,
                failed_open,
                slot: None,
            }));
        };
        let mut full = tried.to_vec();
        let mut candidate = Some((index, failed_open));
        while let Some((index, failed_open)) = candidate {
            if let Ok(slot) = slots[index].clone().try_acquire_owned() {
                return Ok(Some(Pick {
                    index,
                    failed_open,
                    slot: Some(slot),
                }));
            }
            full.push(index);
            candidate = self.nodes.select(key, &full, now);
        }
        let queue = Duration::from_millis(self.config.timeout.queue_ms);
        match tokio::time::timeout(queue, slots[index].clone().acquire_owned()).await {
            Ok(Ok(slot)) => Ok(Some(Pick {
                index,
                failed_open,
                slot: Some(slot),
            })),
            _ => {
                self.retries.queue_full.inc();
                Err(UpstreamError::Saturated {
                    upstream: self.config.id.clone(),
                    ms: self.config.timeout.queue_ms,
                })
            }
        }
    }

    /// Whether an attempt that ended as `happened` is followed by another: `retry_on` names
    /// it, there are attempts left and a body to send, and, when a node took the request, its
    /// method may be sent again and the budget allows (a refusal is counted).
    fn retries_after(&self, happened: RetryOn, attempt: &Attempt<'_>, last: bool) -> bool {
        if last || attempt.body.is_none() || !self.retry.covers(happened) {
            return false;
        }
        if !happened.after_send() {
            return true;
        }
        if !attempt.retry_after_send {
            return false;
        }
        let allowed = self.retry.withdraw();
        if !allowed {
            self.retries.budget_exhausted.inc();
        }
        allowed
    }

    fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.config.timeout.connect_ms)
    }

    fn read_timeout(&self) -> Duration {
        Duration::from_millis(self.config.timeout.read_ms)
    }

    /// The longest a body may stop moving, in either direction (`timeout.idle_ms`).
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.config.timeout.idle_ms)
    }
}

fn format_addr(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// `weir_upstream_failures_total` for one upstream, one counter per kind.
#[derive(Debug)]
struct FailureCounters {
    connect: Counter,
    connect_timeout: Counter,
    send_timeout: Counter,
    read_timeout: Counter,
    idle_timeout: Counter,
    failed: Counter,
}

impl FailureCounters {
    fn new(metrics: &Metrics, upstream: &str) -> Self {
        let counter = |kind| metrics.upstream_failures(upstream, kind);
        FailureCounters {
            connect: counter("connect"),
            connect_timeout: counter("connect_timeout"),
            send_timeout: counter("send_timeout"),
            read_timeout: counter("read_timeout"),
            idle_timeout: counter("idle_timeout"),
            failed: counter("failed"),
        }
    }

    fn record(&self, error: &UpstreamError) {
        match error {
            UpstreamError::Connect { .. } => self.connect.inc(),
            UpstreamError::ConnectTimeout { .. } => self.connect_timeout.inc(),
            UpstreamError::SendTimeout { .. } => self.send_timeout.inc(),
            UpstreamError::Timeout { .. } => self.read_timeout.inc(),
            UpstreamError::Failed { .. } => self.failed.inc(),
            UpstreamError::NoNodes
            | UpstreamError::RequestBody { .. }
            | UpstreamError::Saturated { .. } => 0,
        };
    }
}

/// The node an attempt goes to.
struct Pick {
    index: usize,
    /// Whether it was picked among ejected nodes because every candidate was ejected.
    failed_open: bool,
    /// Its place under `max_connections`.
    slot: Option<OwnedSemaphorePermit>,
}

/// `weir_upstream_retries_total` and the budget's and queue's counters for one upstream.
#[derive(Debug)]
struct RetryCounters {
    connect_failure: Counter,
    timeout: Counter,
    reset: Counter,
    status: Counter,
    budget_exhausted: Counter,
    queue_full: Counter,
}

impl RetryCounters {
    fn new(metrics: &Metrics, upstream: &str) -> Self {
        let on = |why| metrics.upstream_retries(upstream, why);
        RetryCounters {
            connect_failure: on("connect_failure"),
            timeout: on("timeout"),
            reset: on("reset"),
            status: on("status"),
            budget_exhausted: metrics.upstream_retry_budget_exhausted(upstream),
            queue_full: metrics.upstream_queue_full(upstream),
        }
    }

    fn record(&self, retried_on: RetryOn) {
        match retried_on {
            RetryOn::ConnectFailure => self.connect_failure.inc(),
            RetryOn::Timeout => self.timeout.inc(),
            RetryOn::Reset => self.reset.inc(),
            RetryOn::Status(_) => self.status.inc(),
        };
    }
}

/// Every node's connections, shared by the upstreams that name the same node, so that they
/// survive config reloads.
#[derive(Default)]
pub struct ClientPool {
    nodes: Mutex<HashMap<NodeKey, Weak<NodeConnections>>>,
}

/// What makes two nodes' connections interchangeable.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct NodeKey {
    scheme: Scheme,
    tls: Option<UpstreamTls>,
    host: String,
    port: u16,
    send_stall: Duration,
}

impl ClientPool {
    /// The connections to the node `key` names.
    fn node(&self, key: NodeKey) -> Result<Arc<NodeConnections>, ClientTlsError> {
        let mut nodes = self.nodes.lock().expect("node pool lock");
        if let Some(existing) = nodes.get(&key).and_then(Weak::upgrade) {
            return Ok(existing);
        }
        nodes.retain(|_, weak| weak.strong_count() > 0);
        let authority = Authority::try_from(format_addr(&key.host, key.port))
            .expect("validate() accepts only hosts that parse as an authority");
        let tls = if key.scheme.is_tls() {
            let settings = key.tls.clone().unwrap_or_default();
            let alpn = if key.scheme.is_http2() {
                tls::ALPN_H2
            } else {
                tls::ALPN_HTTP1
            };
            let config = tls::client_config(&settings, alpn)?;
            let name = tls::server_name(&settings, &key.host)?;
            Some((TlsConnector::from(config), name))
        } else {
            None
        };
        let fresh = Arc::new(NodeConnections {
            key: key.clone(),
            authority,
            tls,
            idle: (0..workers::slots()).map(|_| Mutex::default()).collect(),
            shared: Mutex::new(None),
            opening_shared: tokio::sync::Mutex::new(()),
        });
        nodes.insert(key, Arc::downgrade(&fresh));
        Ok(fresh)
    }
}

/// A way to send requests on one connection.
enum Sender {
    Http1(http1::SendRequest<OutgoingBody>),
    Http2(http2::SendRequest<OutgoingBody>),
}

/// The connections to one node: idle HTTP/1.1 connections, or one shared HTTP/2 connection.
pub struct NodeConnections {
    key: NodeKey,
    authority: Authority,
    /// For https and grpcs: the connector and the name it asks for.
    tls: Option<(TlsConnector, ServerName<'static>)>,
    /// Idle HTTP/1.1 connections, a stack per worker (see [`workers::slots`]): a worker reuses
    /// the connections its own runtime drives, warmest first.
    idle: Box<[Mutex<IdleStack>]>,
    shared: Mutex<Option<http2::SendRequest<OutgoingBody>>>,
    /// One HTTP/2 connection is opened at a time, so that concurrent first requests share it.
    opening_shared: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for NodeConnections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeConnections")
            .field("node", &self.authority)
            .finish()
    }
}

/// Idle HTTP/1.1 connections, each with the time it went idle.
type IdleStack = Vec<(http1::SendRequest<OutgoingBody>, Instant)>;

/// Why no connection could be made (for the log).
struct ConnectFailure(String);

impl NodeConnections {
    /// A connection ready for a request: a pooled one unless `fresh`, otherwise a new one.
    /// Returns whether it was reused.
    async fn checkout(self: &Arc<Self>, fresh: bool) -> Result<(Sender, bool), ConnectFailure> {
        if !fresh && let Some(sender) = self.reuse().await {
            return Ok((sender, true));
        }
        // Opening is the rare path, and its futures (connect, TLS, handshake) are kilobytes:
        // boxed, so that every request's future does not carry them and move them around.
        Box::pin(self.open(fresh)).await
    }

    /// A new connection (unless `fresh` is false and another request opened a shared HTTP/2
    /// one meanwhile). Returns whether it was reused.
    async fn open(self: &Arc<Self>, fresh: bool) -> Result<(Sender, bool), ConnectFailure> {
        let _opening = if self.key.scheme.is_http2() {
            let opening = self.opening_shared.lock().await;
            // Another request may have opened it while this one waited.
            if !fresh && let Some(sender) = self.reuse().await {
                return Ok((sender, true));
            }
            Some(opening)
        } else {
            None
        };
        let stream = TimedIo::new(self.connect().await?, self.key.send_stall);
        let sender = match &self.tls {
            Some((connector, name)) => {
                let stream = connector
                    .connect(name.clone(), stream)
                    .await
                    .map_err(|e| ConnectFailure(format!("TLS handshake: {}", error_chain(&e))))?;
                self.handshake(TokioIo::new(stream)).await?
            }
            None => self.handshake(TokioIo::new(stream)).await?,
        };
        if let Sender::Http2(shared) = &sender {
            *self.shared.lock().expect("shared connection lock") = Some(shared.clone());
        }
        Ok((sender, false))
    }

    /// Speaks HTTP/1.1 or HTTP/2 (as the scheme says) over a new connection.
    async fn handshake<I>(&self, io: I) -> Result<Sender, ConnectFailure>
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let refused = |e: hyper::Error| ConnectFailure(format!("handshake: {e}"));
        if self.key.scheme.is_http2() {
            let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await
                .map_err(refused)?;
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    tracing::debug!(%error, "upstream connection ended with an error");
                }
            });
            Ok(Sender::Http2(sender))
        } else {
            let (sender, connection) =
                http1::Builder::new().handshake(io).await.map_err(refused)?;
            tokio::spawn(async move {
                // With upgrades, so that a 101 hands the connection to the WebSocket splice.
                if let Err(error) = connection.with_upgrades().await {
                    tracing::debug!(%error, "upstream connection ended with an error");
                }
            });
            Ok(Sender::Http1(sender))
        }
    }

    async fn reuse(&self) -> Option<Sender> {
        if self.key.scheme.is_http2() {
            let shared = self.shared.lock().expect("shared connection lock");
            return shared
                .as_ref()
                .filter(|sender| !sender.is_closed())
                .map(|sender| Sender::Http2(sender.clone()));
        }
        loop {
            let (mut sender, since) = self.idle_here().lock().expect("idle lock").pop()?;
            if sender.is_closed() || since.elapsed() > IDLE_TIMEOUT {
                continue;
            }
            // Its last response was read to the end; the connection may still be wrapping
            // that exchange up, which takes moments.
            if sender.ready().await.is_ok() {
                return Some(Sender::Http1(sender));
            }
        }
    }

    /// This worker's stack of idle connections.
    fn idle_here(&self) -> &Mutex<IdleStack> {
        &self.idle[workers::index() % self.idle.len()]
    }

    /// Keeps an HTTP/1.1 connection whose exchange finished, for the next request.
    fn put_back(&self, sender: http1::SendRequest<OutgoingBody>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle_here().lock().expect("idle lock");
        if idle.len() < MAX_IDLE_PER_NODE {
            idle.push((sender, Instant::now()));
        }
    }

    /// Opens a TCP connection; the caller bounds the time it takes.
    async fn connect(&self) -> Result<TcpStream, ConnectFailure> {
        let addrs: Vec<SocketAddr> = match self.key.host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, self.key.port)],
            Err(_) => tokio::net::lookup_host((self.key.host.as_str(), self.key.port))
                .await
                .map_err(|e| ConnectFailure(format!("resolving {}: {e}", self.key.host)))?
                .collect(),
        };
        let mut last = ConnectFailure(format!("{} resolves to no address", self.key.host));
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    return Ok(stream);
                }
                Err(e) => last = ConnectFailure(format!("{addr}: {e}")),
            }
        }
        Err(last)
    }
}

/// Why the upstream gave no response. The texts name nodes and OS errors: they go to the log,
/// never to the client.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Every node that was tried refused or failed the connection.
    #[error("could not connect to {node}: {reason}")]
    Connect {
        /// The last node tried.
        node: String,
        /// Why.
        reason: String,
    },
    /// The connection attempt to the last node tried timed out.
    #[error("connecting to {node} timed out after {ms} ms")]
    ConnectTimeout {
        /// The last node tried.
        node: String,
        /// The connect timeout.
        ms: u64,
    },
    /// The node stopped reading the request.
    #[error("{node} stopped reading the request for {ms} ms")]
    SendTimeout {
        /// The node.
        node: String,
        /// The send timeout.
        ms: u64,
    },
    /// The node did not send response headers in time.
    #[error("{node} did not answer within {ms} ms")]
    Timeout {
        /// The node.
        node: String,
        /// The read timeout.
        ms: u64,
    },
    /// The exchange failed after the request was sent.
    #[error("{node} failed: {reason}")]
    Failed {
        /// The node.
        node: String,
        /// Why.
        reason: String,
    },
    /// The client's request body failed on its way to the node.
    #[error("the request body failed on its way to {node}: {reason}")]
    RequestBody {
        /// The node.
        node: String,
        /// Whether the client stopped sending (rather than going away).
        stalled: bool,
        /// Why.
        reason: String,
    },
    /// No node can be selected.
    #[error("no node is available")]
    NoNodes,
    /// Every candidate node had `max_connections` requests in flight for `queue_ms`.
    #[error("every node of {upstream} stayed at max_connections for {ms} ms")]
    Saturated {
        /// The upstream.
        upstream: String,
        /// The queue timeout.
        ms: u64,
    },
}

impl UpstreamError {
    /// How the failure counts against its node, for passive health checks.
    fn outcome(&self) -> Outcome {
        match self {
            UpstreamError::Connect { .. } | UpstreamError::Failed { .. } => Outcome::Failure,
            UpstreamError::ConnectTimeout { .. }
            | UpstreamError::Timeout { .. }
            | UpstreamError::SendTimeout { .. } => Outcome::Timeout,
            UpstreamError::NoNodes
            | UpstreamError::RequestBody { .. }
            | UpstreamError::Saturated { .. } => Outcome::Neither,
        }
    }

    /// What `retry_on` calls this failure, if it names it at all.
    fn retry_on(&self) -> Option<RetryOn> {
        match self {
            UpstreamError::Connect { .. } | UpstreamError::ConnectTimeout { .. } => {
                Some(RetryOn::ConnectFailure)
            }
            UpstreamError::Timeout { .. } => Some(RetryOn::Timeout),
            UpstreamError::Failed { .. } => Some(RetryOn::Reset),
            // A send timeout means the node is not reading: the body may be half gone.
            UpstreamError::SendTimeout { .. }
            | UpstreamError::NoNodes
            | UpstreamError::RequestBody { .. }
            | UpstreamError::Saturated { .. } => None,
        }
    }

    /// Whether the client should get 504 rather than 502.
    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            UpstreamError::Timeout { .. }
                | UpstreamError::ConnectTimeout { .. }
                | UpstreamError::SendTimeout { .. }
        )
    }
}

/// The body of a request on its way upstream.
pub enum OutboundBody {
    /// Held in memory, with the trailers that came with it: every retry sends it again.
    Full(Bytes, Option<HeaderMap>),
    /// Streaming from the client: sent at most once, unless it is empty.
    Streaming(ClientBody),
}

impl OutboundBody {
    /// A copy for another attempt, if this body can be sent again.
    fn replay(&self) -> Option<OutboundBody> {
        match self {
            OutboundBody::Full(bytes, trailers) => {
                Some(OutboundBody::Full(bytes.clone(), trailers.clone()))
            }
            OutboundBody::Streaming(body) if body.is_end_stream() => {
                Some(OutboundBody::Full(Bytes::new(), None))
            }
            OutboundBody::Streaming(_) => None,
        }
    }

    fn into_proxy_body(self, idle: Duration) -> ProxyBody {
        match self {
            OutboundBody::Full(bytes, trailers) => ProxyBody::trailed(bytes, trailers),
            OutboundBody::Streaming(mut body) => {
                body.tighten(idle, Stalled::Upstream);
                ProxyBody::Client(body)
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

/// A request body handed to an upstream connection; it says when its last byte has been
/// taken, which is when the read timeout starts.
pub struct OutgoingBody {
    inner: ProxyBody,
    sent: Option<oneshot::Sender<()>>,
}

impl OutgoingBody {
    fn new(inner: ProxyBody) -> (Self, oneshot::Receiver<()>) {
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

    fn into_inner(self) -> ProxyBody {
        self.inner
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

/// An upstream's response body: it fails if it stops moving for `idle_ms`, and gives its
/// HTTP/1.1 connection back to the pool once it is read to the end.
pub struct UpstreamBody {
    inner: IdleBody<Incoming>,
    give_back: Option<(Arc<NodeConnections>, http1::SendRequest<OutgoingBody>)>,
    idle_timeouts: Counter,
}

impl UpstreamBody {
    fn done(&mut self) {
        if let Some((node, sender)) = self.give_back.take() {
            node.put_back(sender);
        }
    }
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody").finish_non_exhaustive()
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let frame = Pin::new(&mut this.inner).poll_frame(cx);
        if reached_end(&frame, &this.inner) {
            this.done();
        }
        if let Poll::Ready(Some(Err(error))) = &frame {
            // A connection whose response failed midway is not reused.
            this.give_back = None;
            if matches!(error, BodyError::Stalled(_)) {
                this.idle_timeouts.inc();
            }
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

/// How one exchange on one connection ended, short of a response.
enum Exchange {
    /// The connection failed before the request was written: it comes back whole.
    NotSent(Box<Request<OutgoingBody>>, hyper::Error),
    /// No response head within `read_ms`.
    ReadTimeout,
    /// Anything else, after (part of) the request was sent.
    Failed(hyper::Error),
}

type TrySend = Result<Response<Incoming>, hyper::client::conn::TrySendError<Request<OutgoingBody>>>;

impl Sender {
    /// Sends `request` and waits for the response head: without a bound while the request is
    /// being written (the connection's and the body's own timeouts govern that), then for at
    /// most `read` after its last byte.
    async fn exchange(
        &mut self,
        request: Request<OutgoingBody>,
        sent: oneshot::Receiver<()>,
        read: Duration,
    ) -> Result<Response<Incoming>, Exchange> {
        match self {
            Sender::Http1(sender) => {
                wait_for_head(sender.try_send_request(request), sent, read).await
            }
            Sender::Http2(sender) => {
                wait_for_head(sender.try_send_request(request), sent, read).await
            }
        }
    }
}

async fn wait_for_head(
    response: impl Future<Output = TrySend>,
    sent: oneshot::Receiver<()>,
    read: Duration,
) -> Result<Response<Incoming>, Exchange> {
    let mut response = std::pin::pin!(response);
    let early = tokio::select! {
        biased;
        outcome = &mut response => Some(outcome),
        _ = sent => None,
    };
    let outcome = match early {
        Some(outcome) => outcome,
        None => match tokio::time::timeout(read, &mut response).await {
            Ok(outcome) => outcome,
            Err(_) => return Err(Exchange::ReadTimeout),
        },
    };
    outcome.map_err(|mut error| match error.take_message() {
        Some(request) => Exchange::NotSent(Box::new(request), error.into_error()),
        None => Exchange::Failed(error.into_error()),
    })
}

/// Sends `request` to a node of `upstream`, trying other nodes as its retry policy says: after
/// a failed connection, and (for a method in `retry_methods` whose body can be sent again,
/// within the retry budget) after a timeout, a reset or a `retry_on` status.
/// `key` is the consistent-hash key (ignored by other balancers).
pub async fn send(
    upstream: &Upstream,
    key: u64,
    request: Outbound,
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
        if let Some(miss) = retrying.take() {
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
        retrying = Some(match attempt.on(index, &node, last).await {
            Ok(response) => {
                let status = response.status().as_u16();
                if let Some(ejection) = upstream.nodes.ejection() {
                    upstream.judge(index, ejection.judge(status));
                }
                let answered = RetryOn::Status(status);
                if !upstream.retries_after(answered, &attempt, last) {
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
                    Some(happened) if upstream.retries_after(happened, &attempt, last) => happened,
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
struct Attempt<'a> {
    upstream: &'a Upstream,
    method: Method,
    path_and_query: PathAndQuery,
    /// Whether a node that took the request but did not answer may be followed by another:
    /// only for an idempotent request whose body can be sent again.
    retry_after_send: bool,
    headers: HeaderMap,
    /// What the next attempt sends; `None` once a body that cannot be replayed went out.
    body: Option<OutboundBody>,
    /// How long a node may take to answer.
    read: Duration,
    /// Whether the request asks to upgrade.
    upgrade: bool,
}

impl Attempt<'_> {
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
            let Some(body) = self.body.take() else {
                return Err(UpstreamError::NoNodes);
            };
            let headers = if keep_copy {
                self.body = body.replay();
                self.headers.clone()
            } else {
                std::mem::take(&mut self.headers)
            };
            let body = body.into_proxy_body(upstream.idle_timeout());
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
                Err(Exchange::NotSent(request, error)) => {
                    // Nothing was written: the request, body included, can go again.
                    let (parts, outgoing) = request.into_parts();
                    self.headers = parts.headers;
                    self.body = Some(match outgoing.into_inner() {
                        ProxyBody::Client(client) => OutboundBody::Streaming(client),
                        ProxyBody::Full(bytes) => {
                            OutboundBody::Full(bytes.unwrap_or_default(), None)
                        }
                        ProxyBody::Trailed(bytes, trailers) => {
                            OutboundBody::Full(bytes.unwrap_or_default(), trailers)
                        }
                        _ => OutboundBody::Full(Bytes::new(), None),
                    });
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
                Err(Exchange::ReadTimeout) => {
                    return Err(UpstreamError::Timeout {
                        node: node.addr.clone(),
                        ms: self.read.as_millis() as u64,
                    });
                }
                Err(Exchange::Failed(error)) => {
                    return Err(failed_exchange(upstream, node, &error));
                }
            }
        }
    }
}

/// The request for one attempt: origin-form for HTTP/1.1, absolute for HTTP/2.
fn build_request(
    method: &Method,
    path_and_query: &PathAndQuery,
    connections: &NodeConnections,
    sender: &Sender,
    mut headers: HeaderMap,
    body: ProxyBody,
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
fn failed_exchange(upstream: &Upstream, node: &Node, error: &hyper::Error) -> UpstreamError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(body) = e.downcast_ref::<BodyError>() {
            // The client's body failed (or stopped), not the node.
            let stalled = matches!(body, BodyError::Stalled(_));
            return UpstreamError::RequestBody {
                node: node.addr.clone(),
                stalled,
                reason: body.to_string(),
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

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}
