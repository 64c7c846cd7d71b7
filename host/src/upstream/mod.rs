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
//!
//! How the files fit: [`Upstream`] (this file) is one upstream as the snapshot holds it: its
//! node set ([`balancer`]), retry policy ([`retry`]), health probes ([`probe`]) and, per node,
//! the shared connections of [`pool`]. [`send`] runs one request's attempts across nodes;
//! [`body`] is what goes out, and [`error`] names why nothing came back.

pub mod balancer;
pub mod body;
pub mod error;
pub mod pool;
pub mod probe;
pub mod retry;
pub mod send;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use self::balancer::{Ejection, Node, NodeSet, Outcome, Probing, hash_key};
use self::pool::{NodeConnections, NodeKey, format_addr};
use self::retry::RetryPolicy;
use crate::config::{HashOn, RetryOn, UpstreamConfig};
use crate::metrics::Metrics;
use crate::tls::ClientTlsError;

pub use self::body::{ClientBody, Outbound, OutboundBody};
pub use self::error::UpstreamError;
pub use self::pool::{ClientPool, UpstreamBody};
pub use self::send::send;

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
            crate::upstream::probe::start(&config.id, nodes.clone(), &config.nodes, check, gauges)
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

    /// The consistent-hash key of a request, from what the upstream's `hash_on` names; 0 for
    /// other balancers.
    pub fn hash_key(
        &self,
        client_ip: IpAddr,
        path: &str,
        query: Option<&str>,
        headers: &HeaderMap,
    ) -> u64 {
        match &self.config.hash_on {
            None => 0,
            Some(HashOn::Ip) => hash_key(client_ip.to_string().as_bytes()),
            Some(HashOn::Uri) => {
                hash_key(path.as_bytes()) ^ hash_key(query.unwrap_or("").as_bytes())
            }
            Some(HashOn::Header(name)) => {
                hash_key(headers.get(name).map_or(&b""[..], |v| v.as_bytes()))
            }
        }
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
