//! Each node's connections: opened, kept idle for reuse (HTTP/1.1) or shared (HTTP/2), and
//! given back when a response body has been read to its end.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::Authority;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::metrics::counter::Counter;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::body::OutgoingBody;
use super::error::error_chain;
use crate::body::stream::{BodyError, reached_end};
use crate::config::{Scheme, UpstreamTls};
use crate::timeouts::{IdleBody, TimedIo};
use crate::tls::{self, ClientTlsError};
use crate::workers;
use rustls_pki_types::ServerName;
use tokio_rustls::TlsConnector;

/// An idle HTTP/1.1 connection older than this is closed rather than reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle HTTP/1.1 connections kept per node.
const MAX_IDLE_PER_NODE: usize = 256;

/// `host:port`, with an IPv6 host in brackets.
pub(super) fn format_addr(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
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
pub(super) struct NodeKey {
    pub(super) scheme: Scheme,
    pub(super) tls: Option<UpstreamTls>,
    pub(super) host: String,
    pub(super) port: u16,
    pub(super) send_stall: Duration,
}

impl ClientPool {
    /// The connections to the node `key` names.
    pub(super) fn node(&self, key: NodeKey) -> Result<Arc<NodeConnections>, ClientTlsError> {
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
            let config = tls::client_config(settings.client(), alpn)?;
            let name = tls::server_name(settings.sni.as_deref(), &key.host)?;
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
pub(super) enum Sender {
    Http1(http1::SendRequest<OutgoingBody>),
    Http2(http2::SendRequest<OutgoingBody>),
}

/// The connections to one node: idle HTTP/1.1 connections, or one shared HTTP/2 connection.
pub struct NodeConnections {
    pub(super) key: NodeKey,
    pub(super) authority: Authority,
    /// For https and grpcs: the connector and the name it asks for.
    pub(super) tls: Option<(TlsConnector, ServerName<'static>)>,
    /// Idle HTTP/1.1 connections, a stack per worker (see [`workers::slots`]): a worker reuses
    /// the connections its own runtime drives, warmest first.
    pub(super) idle: Box<[Mutex<IdleStack>]>,
    pub(super) shared: Mutex<Option<http2::SendRequest<OutgoingBody>>>,
    /// One HTTP/2 connection is opened at a time, so that concurrent first requests share it.
    pub(super) opening_shared: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for NodeConnections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeConnections")
            .field("node", &self.authority)
            .finish()
    }
}

/// Idle HTTP/1.1 connections, each with the time it went idle.
pub(super) type IdleStack = Vec<(http1::SendRequest<OutgoingBody>, Instant)>;

/// Why no connection could be made (for the log).
pub(super) struct ConnectFailure(pub(super) String);

impl NodeConnections {
    /// A connection ready for a request: a pooled one unless `fresh`, otherwise a new one.
    /// Returns whether it was reused.
    pub(super) async fn checkout(
        self: &Arc<Self>,
        fresh: bool,
    ) -> Result<(Sender, bool), ConnectFailure> {
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
    pub(super) fn put_back(&self, sender: http1::SendRequest<OutgoingBody>) {
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

/// An upstream's response body: it fails if it stops moving for `idle_ms`, and gives its
/// HTTP/1.1 connection back to the pool once it is read to the end.
pub struct UpstreamBody {
    pub(super) inner: IdleBody<Incoming>,
    pub(super) give_back: Option<(Arc<NodeConnections>, http1::SendRequest<OutgoingBody>)>,
    pub(super) idle_timeouts: Counter,
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
pub(super) enum NoResponse {
    /// The connection failed before the request was written: it comes back whole.
    NotSent(Box<Request<OutgoingBody>>, hyper::Error),
    /// No response head within `read_ms`.
    ReadTimeout,
    /// Anything else, after (part of) the request was sent.
    Failed(hyper::Error),
}

pub(super) type TrySend =
    Result<Response<Incoming>, hyper::client::conn::TrySendError<Request<OutgoingBody>>>;

impl Sender {
    /// Sends `request` and waits for the response head: without a bound while the request is
    /// being written (the connection's and the body's own timeouts govern that), then for at
    /// most `read` after its last byte.
    pub(super) async fn exchange(
        &mut self,
        request: Request<OutgoingBody>,
        sent: oneshot::Receiver<()>,
        read: Duration,
    ) -> Result<Response<Incoming>, NoResponse> {
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

pub(super) async fn wait_for_head(
    response: impl Future<Output = TrySend>,
    sent: oneshot::Receiver<()>,
    read: Duration,
) -> Result<Response<Incoming>, NoResponse> {
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
            Err(_) => return Err(NoResponse::ReadTimeout),
        },
    };
    outcome.map_err(|mut error| match error.take_message() {
        Some(request) => NoResponse::NotSent(Box::new(request), error.into_error()),
        None => NoResponse::Failed(error.into_error()),
    })
}
