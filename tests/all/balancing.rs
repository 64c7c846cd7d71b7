//! Balancing across nodes: weighted round robin, consistent hash, least-connections, retries
//! and timeouts.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::Full;
use serde_json::json;
use weir_tests::{Behaviour, TestGateway, Upstream, get, node, request, send, send_body, yaml};

/// A loopback port with nothing listening on it.
async fn closed_port() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_follows_weights() {
    let (heavy, light) = (
        Upstream::start("heavy").await,
        Upstream::start("light").await,
    );
    let mut heavy_node = node(&heavy);
    heavy_node["weight"] = json!(3);
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "u", "nodes": [heavy_node, node(&light)]}],
        "routes": [{"id": "r", "uri": "/*", "upstream_id": "u"}],
    })))
    .await;
    for _ in 0..40 {
        assert_eq!(get(&gateway.url("/")).await.status, StatusCode::OK);
    }
    assert_eq!((heavy.hits(), light.hits()), (30, 10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_keeps_a_key_on_one_node() {
    let nodes = [
        Upstream::start("n0").await,
        Upstream::start("n1").await,
        Upstream::start("n2").await,
    ];
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [{
            "id": "u", "type": "chash", "hash_on": "header:x-user",
            "nodes": nodes.iter().map(node).collect::<Vec<_>>(),
        }],
        "routes": [{"id": "r", "uri": "/*", "upstream_id": "u"}],
    })))
    .await;
    let mut used = std::collections::HashSet::new();
    for user in 0..30 {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..3 {
            let reply = send(
                request(Method::GET, &gateway.url("/"))
                    .header("x-user", format!("user-{user}"))
                    .body(Full::<Bytes>::default())
                    .unwrap(),
            )
            .await;
            seen.insert(reply.header("x-upstream").unwrap().to_owned());
        }
        assert_eq!(seen.len(), 1, "user-{user} moved between nodes: {seen:?}");
        used.extend(seen);
    }
    assert_eq!(
        used.len(),
        3,
        "30 users should spread over all 3 nodes: {used:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_conn_avoids_the_busy_node() {
    let slow = Upstream::start_with(
        "slow",
        Behaviour {
            delay: Duration::from_millis(600),
            ..Behaviour::default()
        },
    )
    .await;
    let fast = Upstream::start("fast").await;
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "u", "type": "least_conn", "nodes": [node(&slow), node(&fast)]}],
        "routes": [{"id": "r", "uri": "/*", "upstream_id": "u"}],
    })))
    .await;
    let mut requests = Vec::new();
    for _ in 0..20 {
        let url = gateway.url("/");
        requests.push(tokio::spawn(async move { get(&url).await.status }));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for r in requests {
        assert_eq!(r.await.unwrap(), StatusCode::OK);
    }
    // Round robin would send 10 to each; least-conn sends to slow only while it is idle.
    assert!(
        slow.hits() <= 2 && fast.hits() >= 18,
        "slow {} fast {}",
        slow.hits(),
        fast.hits()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_connect_is_retried_on_another_node_with_the_body() {
    let alive = Upstream::start("alive").await;
    let dead = json!({"host": "127.0.0.1", "port": closed_port().await});
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [
            {"id": "mixed", "nodes": [dead.clone(), node(&alive)]},
            {"id": "only-dead", "nodes": [dead], "retries": 0},
        ],
        "routes": [
            {"id": "r", "uri": "/*", "upstream_id": "mixed"},
            {"id": "d", "uri": "/dead", "upstream_id": "only-dead"},
        ],
    })))
    .await;
    for i in 0..10 {
        let reply = send_body(Method::POST, &gateway.url("/echo"), format!("payload-{i}")).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.json()["body"], format!("payload-{i}"));
    }
    assert_eq!(alive.hits(), 10);

    let reply = get(&gateway.url("/dead")).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    let body = reply.json();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("could not connect"),
        "{body}"
    );
    assert!(!body["request_id"].as_str().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upstream_gets_504() {
    let slow = Upstream::start_with(
        "slow",
        Behaviour {
            delay: Duration::from_secs(3),
            ..Behaviour::default()
        },
    )
    .await;
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "u", "nodes": [node(&slow)], "timeout": {"connect_ms": 500, "read_ms": 200}}],
        "routes": [{"id": "r", "uri": "/*", "upstream_id": "u"}],
    })))
    .await;
    let started = Instant::now();
    let reply = get(&gateway.url("/")).await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        reply.json()["error"]
            .as_str()
            .unwrap()
            .contains("within 200 ms")
    );
}
