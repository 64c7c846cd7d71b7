//! Active health checks: one task per upstream probes each of its nodes on an interval and
//! tells the node set, which takes a node out of selection and brings it back.
//!
//! Probes use a connection of their own each time (never the request pool), so that a node's
//! listener going away is seen at the next probe.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, header};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::TcpStream;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::config::{ActiveCheck, NodeConfig, ProbeKind};
use crate::upstream::balancer::{NodeSet, Outcome};

/// One node to probe.
struct Target {
    host: String,
    port: u16,
    /// `host:port`, for the Host header and logs.
    addr: String,
    healthy: Gauge,
}

/// Starts probing `nodes` (the set built from `configs`, in the same order) as `check` says;
/// the probes stop when the returned guard drops. `None` outside a Tokio runtime.
pub fn start(
    upstream: &str,
    nodes: Arc<NodeSet>,
    configs: &[NodeConfig],
    check: ActiveCheck,
    gauges: Vec<Gauge>,
) -> Option<DropGuard> {
    let runtime = tokio::runtime::Handle::try_current().ok()?;
    let targets: Vec<Target> = configs
        .iter()
        .zip(nodes.nodes())
        .zip(gauges)
        .map(|((config, node), healthy)| {
            healthy.set(1);
            Target {
                host: config.host.clone(),
                port: config.port,
                addr: node.addr.clone(),
                healthy,
            }
        })
        .collect();
    let cancel = CancellationToken::new();
    let stopped = cancel.clone();
    let upstream: Arc<str> = upstream.into();
    runtime.spawn(async move {
        let targets: Arc<[Target]> = targets.into();
        let check = Arc::new(check);
        let mut every = tokio::time::interval(Duration::from_millis(check.interval_ms));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stopped.cancelled() => return,
                _ = every.tick() => {}
            }
            let mut round = tokio::task::JoinSet::new();
            for index in 0..targets.len() {
                let (targets, check) = (targets.clone(), check.clone());
                round.spawn(async move { (index, probe(&targets[index], &check).await) });
            }
            while let Some(done) = round.join_next().await {
                let Ok((index, (outcome, why))) = done else {
                    continue;
                };
                let target = &targets[index];
                if let Some(healthy) = nodes.observe(index, outcome) {
                    target.healthy.set(i64::from(healthy));
                    if healthy {
                        tracing::info!(%upstream, node = %target.addr, "node healthy again by its probes");
                    } else {
                        tracing::warn!(%upstream, node = %target.addr, reason = %why, "node unhealthy by its probes");
                    }
                }
                if let Some(node) = nodes.nodes().get(index) {
                    node.set_last_probe_error((outcome != Outcome::Success).then_some(why));
                }
            }
        }
    });
    Some(cancel.drop_guard())
}

/// One probe of `target`: how it went, and why when it did not.
async fn probe(target: &Target, check: &ActiveCheck) -> (Outcome, String) {
    let timeout = Duration::from_millis(check.timeout_ms);
    match tokio::time::timeout(timeout, attempt(target, check)).await {
        Ok(Ok(())) => (Outcome::Success, String::new()),
        Ok(Err(why)) => (Outcome::Failure, why),
        Err(_) => (
            Outcome::Timeout,
            format!("no answer within {} ms", check.timeout_ms),
        ),
    }
}

async fn attempt(target: &Target, check: &ActiveCheck) -> Result<(), String> {
    let stream = TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    if check.kind == ProbeKind::Tcp {
        return Ok(());
    }
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("http: {e}"))?;
    tokio::spawn(connection);
    let request = Request::get(check.path.as_str())
        .header(header::HOST, target.addr.as_str())
        .header(header::CONNECTION, "close")
        .header(header::USER_AGENT, "weir-health-check")
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| format!("request: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("http: {e}"))?;
    let status = response.status().as_u16();
    if check.healthy.statuses.contains(&status) {
        Ok(())
    } else {
        Err(format!("status {status}"))
    }
}
