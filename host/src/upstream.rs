//! Upstreams at run time: node sets, pooled clients, and sending a request with retries.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{self, Authority, PathAndQuery};
use http::{HeaderMap, Method, Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::balancer::{InFlight, Node, NodeSet};
use crate::body::{ProxyBody, ReclaimableBody};
use crate::config::{Scheme, UpstreamConfig};

/// The pooled HTTP client used for upstream requests.
pub type HttpClient = Client<HttpConnector, ProxyBody>;

/// An upstream ready to serve: its nodes, its client and its retry budget.
#[derive(Debug)]
pub struct Upstream {
    /// The config it was built from.
    pub config: UpstreamConfig,
    /// The nodes and their balancer.
    pub nodes: NodeSet,
    /// Each node's URI authority, parsed once.
    authorities: Vec<Authority>,
    client: HttpClient,
    attempts: usize,
}

impl Upstream {
    /// Builds the runtime form of a validated upstream config.
    pub fn new(config: UpstreamConfig, clients: &ClientPool) -> Self {
        let nodes = config
            .nodes
            .iter()
            .map(|n| Arc::new(Node::new(format_addr(&n.host, n.port), n.weight)))
            .collect();
        let nodes = NodeSet::new(nodes, config.balancer);
        let authorities = nodes
            .nodes()
            .iter()
            .map(|node| {
                Authority::try_from(node.addr.as_str())
                    .expect("validate() accepts only hosts that parse as an authority")
            })
            .collect();
        let others = nodes.selectable().saturating_sub(1);
        let retries = config.retries.map_or(others, |r| r as usize);
        let client = clients.client(
            config.scheme,
            Duration::from_millis(config.timeout.connect_ms),
        );
        Upstream {
            config,
            nodes,
            authorities,
            client,
            attempts: retries + 1,
        }
    }

    /// How long to wait for response headers.
    pub fn read_timeout(&self) -> Duration {
        Duration::from_millis(self.config.timeout.read_ms)
    }
}

fn format_addr(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Clients shared by upstreams with the same scheme and connect timeout, so that their connection
/// pools survive config reloads.
#[derive(Default)]
pub struct ClientPool {
    clients: Mutex<HashMap<(Scheme, Duration), HttpClient>>,
}

impl ClientPool {
    /// The client for `scheme` with connect timeout `connect`.
    pub fn client(&self, scheme: Scheme, connect: Duration) -> HttpClient {
        self.clients
            .lock()
            .expect("client pool lock")
            .entry((scheme, connect))
            .or_insert_with(|| {
                let mut connector = HttpConnector::new();
                connector.set_connect_timeout(Some(connect));
                connector.set_nodelay(true);
                connector.enforce_http(true);
                let mut builder = Client::builder(TokioExecutor::new());
                builder
                    .pool_idle_timeout(Duration::from_secs(60))
                    .pool_max_idle_per_host(256);
                if scheme == Scheme::Grpc {
                    builder.http2_only(true);
                }
                builder.build(connector)
            })
            .clone()
    }
}

/// Why the upstream gave no response.
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
    #[error("connecting to {node} timed out")]
    ConnectTimeout {
        /// The last node tried.
        node: String,
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
    /// No node can be selected.
    #[error("no node is available")]
    NoNodes,
}

impl UpstreamError {
    /// Whether the client should get 504 rather than 502.
    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            UpstreamError::Timeout { .. } | UpstreamError::ConnectTimeout { .. }
        )
    }
}

/// The body of a request on its way upstream.
pub enum OutboundBody {
    /// Held in memory: every retry sends it again.
    Full(Bytes),
    /// Streaming from the client: a retry is possible only while it is unread.
    Streaming(Incoming),
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
}

/// Sends `request` to a node of `upstream`, trying other nodes when a connection cannot be made.
/// `key` is the consistent-hash key (ignored by other balancers).
pub async fn send(
    upstream: &Upstream,
    key: u64,
    request: Outbound,
) -> Result<(Response<Incoming>, InFlight), UpstreamError> {
    let Outbound {
        method,
        path_and_query,
        mut headers,
        body,
    } = request;
    let path_and_query =
        PathAndQuery::try_from(path_and_query).map_err(|e| UpstreamError::Failed {
            node: upstream.config.id.clone(),
            reason: format!("bad upstream path: {e}"),
        })?;
    let version = match upstream.config.scheme {
        Scheme::Http => Version::HTTP_11,
        Scheme::Grpc => Version::HTTP_2,
    };
    let mut body = Some(body);
    let mut tried = Vec::new();
    let mut last_error = UpstreamError::NoNodes;
    for attempt in 0..upstream.attempts {
        let Some(index) = upstream.nodes.select(key, &tried) else {
            break;
        };
        tried.push(index);
        let node = upstream.nodes.node(index).clone();
        let last = attempt + 1 == upstream.attempts;
        let (send_body, reclaim) = match body.take() {
            Some(OutboundBody::Full(bytes)) => {
                body = Some(OutboundBody::Full(bytes.clone()));
                (ProxyBody::full(bytes), None)
            }
            Some(OutboundBody::Streaming(incoming)) if !last => {
                let (parked, reclaim) = ReclaimableBody::new(incoming);
                (ProxyBody::Reclaimable(parked), Some(reclaim))
            }
            Some(OutboundBody::Streaming(incoming)) => (ProxyBody::Incoming(incoming), None),
            None => break,
        };
        let mut outbound = Request::new(send_body);
        *outbound.method_mut() = method.clone();
        *outbound.version_mut() = version;
        let mut uri = uri::Parts::default();
        uri.scheme = Some(uri::Scheme::HTTP);
        uri.authority = Some(upstream.authorities[index].clone());
        uri.path_and_query = Some(path_and_query.clone());
        *outbound.uri_mut() = Uri::from_parts(uri).expect("scheme, authority and path make a URI");
        *outbound.headers_mut() = if last {
            std::mem::take(&mut headers)
        } else {
            headers.clone()
        };
        let in_flight = InFlight::begin(node.clone());
        let read_timeout = upstream.read_timeout();
        match tokio::time::timeout(read_timeout, upstream.client.request(outbound)).await {
            Ok(Ok(response)) => return Ok((response, in_flight)),
            Ok(Err(e)) if e.is_connect() => {
                last_error = connect_error(&node.addr, &e);
                tracing::debug!(node = %node.addr, error = %last_error, "upstream connect failed");
                if let Some(reclaim) = reclaim {
                    match reclaim.reclaim() {
                        Some(incoming) => body = Some(OutboundBody::Streaming(incoming)),
                        // The body was read, so it cannot be sent again.
                        None => break,
                    }
                }
            }
            Ok(Err(e)) => {
                return Err(UpstreamError::Failed {
                    node: node.addr.clone(),
                    reason: error_chain(&e),
                });
            }
            Err(_) => {
                return Err(UpstreamError::Timeout {
                    node: node.addr.clone(),
                    ms: upstream.config.timeout.read_ms,
                });
            }
        }
    }
    Err(last_error)
}

fn connect_error(node: &str, error: &hyper_util::client::legacy::Error) -> UpstreamError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::TimedOut
        {
            return UpstreamError::ConnectTimeout {
                node: node.to_owned(),
            };
        }
        source = e.source();
    }
    UpstreamError::Connect {
        node: node.to_owned(),
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
