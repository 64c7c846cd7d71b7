//! Stopping without dropping requests: SIGTERM drains the gateway as a load balancer expects.

use std::time::Duration;

use http::StatusCode;
use serde_json::json;
use weir_tests::{ChildDrain, ChildGateway, Upstream, eventually, get, node, yaml};

/// A config with a route to each: `/slow` and `/fast`.
fn slow_and_fast(slow: &Upstream, fast: &Upstream) -> String {
    yaml(json!({
        "upstreams": [{"id": "slow", "nodes": [node(slow)]}, {"id": "fast", "nodes": [node(fast)]}],
        "routes": [
            {"id": "slow", "uri": "/slow", "upstream_id": "slow"},
            {"id": "fast", "uri": "/fast", "upstream_id": "fast"},
        ],
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_slow_request_finish_and_then_refuses_new_connections() {
    let (slow, gate) = Upstream::gated("slow").await;
    let fast = Upstream::start("fast").await;
    let mut gateway = ChildGateway::start_draining(
        &slow_and_fast(&slow, &fast),
        ChildDrain {
            delay: Duration::from_secs(2),
            timeout: Duration::from_secs(30),
        },
    )
    .await;
    let ready = format!("{}/readyz", gateway.admin);
    assert_eq!(get(&ready).await.status, StatusCode::OK);
    let url = format!("{}/slow", gateway.url);
    let in_flight = tokio::spawn(async move { get(&url).await });
    eventually(
        "the slow request reaches its upstream",
        Duration::from_secs(10),
        || async { slow.hits() == 1 },
    )
    .await;

    gateway.terminate();
    // Not ready at once, so that load balancers stop sending...
    eventually("/readyz turns 503", Duration::from_secs(10), || async {
        get(&ready).await.status == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    // ...while the listener still takes what they send in the meantime.
    let reply = get(&format!("{}/fast", gateway.url)).await;
    assert_eq!(reply.status, StatusCode::OK);
    // After the delay, new connections are refused.
    let addr = gateway.addr;
    eventually(
        "the listener closes",
        Duration::from_secs(10),
        || async move { tokio::net::TcpStream::connect(addr).await.is_err() },
    )
    .await;
    assert!(gateway.alive(), "the gateway quit with a request in flight");

    // The request in flight finishes, and then the gateway exits cleanly.
    gate.open();
    let reply = in_flight.await.unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("x-upstream"), Some("slow"));
    let exited = tokio::time::timeout(Duration::from_secs(30), gateway.exited()).await;
    assert_eq!(exited, Ok(true), "the gateway did not exit cleanly");
    // Its access log was flushed on the way out.
    let log = gateway.access_log();
    assert!(
        log.iter()
            .any(|l| l["path"] == "/slow" && l["status"] == 200),
        "{log:?}"
    );
}

/// With worker threads, each worker listens on its own socket of the shared port: the kernel
/// spreads connections over them, and SIGTERM drains every one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_share_the_port_and_drain_together() {
    let (slow, gate) = Upstream::gated("slow").await;
    let fast = Upstream::start("fast").await;
    let mut gateway = ChildGateway::start_workers(
        &slow_and_fast(&slow, &fast),
        ChildDrain {
            delay: Duration::ZERO,
            timeout: Duration::from_secs(30),
        },
        2,
    )
    .await;
    // Each request opens a connection of its own.
    for _ in 0..40 {
        assert_eq!(
            get(&format!("{}/fast", gateway.url)).await.status,
            StatusCode::OK
        );
    }
    let metrics = get(&format!("{}/metrics", gateway.admin)).await.text();
    let accepted = |worker: usize| -> u64 {
        let series =
            format!(r#"weir_connections_accepted_total{{listener="proxy",worker="{worker}"}} "#);
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(&series))
            .and_then(|count| count.parse().ok())
            .unwrap_or(0)
    };
    // Both workers took some: 40 connections all hashed to one socket would be a 1 in 2^39 chance.
    assert!(accepted(1) > 0 && accepted(2) > 0, "{metrics}");
    assert_eq!(accepted(1) + accepted(2), 40, "{metrics}");
    assert_eq!(accepted(0), 0, "{metrics}");

    let url = format!("{}/slow", gateway.url);
    let in_flight = tokio::spawn(async move { get(&url).await });
    eventually(
        "the slow request reaches its upstream",
        Duration::from_secs(10),
        || async { slow.hits() == 1 },
    )
    .await;
    gateway.terminate();
    let addr = gateway.addr;
    eventually(
        "every worker's socket closes",
        Duration::from_secs(10),
        || async move { tokio::net::TcpStream::connect(addr).await.is_err() },
    )
    .await;
    assert!(gateway.alive(), "the gateway quit with a request in flight");
    gate.open();
    let reply = in_flight.await.unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    let exited = tokio::time::timeout(Duration::from_secs(30), gateway.exited()).await;
    assert_eq!(exited, Ok(true), "the gateway did not exit cleanly");
}
