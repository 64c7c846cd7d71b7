//! Upstream resilience through a real gateway: active probes take a node that went away out of
//! rotation and bring it back; passive health checks eject a node that keeps failing on real
//! traffic, never more than the allowed share of nodes; and an upstream whose every node is out
//! is still tried (failing open) rather than answered by the gateway.

use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::{Value, json};
use weir_tests::{
    Behaviour, TestGateway, Upstream, admin_get, eventually, get, metric, node, send_body, yaml,
};

/// A gateway to upstream `u` of `nodes`, checked passively as `passive` says.
async fn gateway(nodes: Vec<Value>, passive: Value) -> TestGateway {
    TestGateway::fronting(json!({"nodes": nodes, "checks": {"passive": passive}})).await
}

async fn failing(name: &str) -> Upstream {
    Upstream::start_with(
        name,
        Behaviour {
            status: StatusCode::SERVICE_UNAVAILABLE,
            ..Behaviour::default()
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_answering_503_is_ejected_after_its_failures_in_a_row() {
    let (good, bad) = (Upstream::start("good").await, failing("bad").await);
    let gateway = gateway(
        vec![node(&good), node(&bad)],
        json!({"unhealthy": {"failures": 3}, "eject_ms": 600000}),
    )
    .await;
    let mut statuses = Vec::new();
    for _ in 0..20 {
        statuses.push(get(&gateway.url("/x")).await.status);
    }
    // Round robin alternates; the bad node's third 503 in a row ejects it, and the rest go to
    // the good one. A 503 is the node's answer: it goes back to the client, not retried.
    let unavailable = statuses
        .iter()
        .filter(|s| **s == StatusCode::SERVICE_UNAVAILABLE)
        .count();
    assert_eq!(unavailable, 3, "{statuses:?}");
    assert_eq!(bad.hits(), 3);
    assert_eq!(good.hits(), 17);
    let ejections = format!(
        r#"weir_upstream_ejections_total{{upstream="u",node="127.0.0.1:{}"}}"#,
        bad.port()
    );
    assert_eq!(
        metric(&gateway.admin_url("/metrics"), &ejections).await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_node_is_ejected_and_then_no_longer_dialled() {
    let good = Upstream::start("good").await;
    // A port nothing listens on: every connection is refused (and retried on the good node).
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let gateway = gateway(
        vec![node(&good), json!({"host": "127.0.0.1", "port": closed})],
        json!({"unhealthy": {"failures": 2}, "eject_ms": 600000}),
    )
    .await;
    let refused = r#"weir_upstream_failures_total{upstream="u",kind="connect"}"#;
    for _ in 0..20 {
        assert_eq!(get(&gateway.url("/x")).await.status, StatusCode::OK);
    }
    // Two refusals in a row eject it; from then on it is not dialled at all.
    assert_eq!(metric(&gateway.admin_url("/metrics"), refused).await, 2.0);
    assert_eq!(good.hits(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_node_failing_requests_still_reach_the_upstream() {
    let (a, b) = (failing("a").await, failing("b").await);
    // At most half the nodes may be out: one is ejected, the other keeps being tried.
    let half = gateway(
        vec![node(&a), node(&b)],
        json!({"unhealthy": {"failures": 1}, "eject_ms": 600000}),
    )
    .await;
    for _ in 0..10 {
        let reply = get(&half.url("/x")).await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            reply.header("x-upstream").is_some(),
            "the upstream's own answer, not the gateway's"
        );
    }
    let hits_before = a.hits() + b.hits();
    assert_eq!(hits_before, 10);

    // Even with every node allowed out, a request is sent to one of them (failing open), and
    // that is counted.
    let all = gateway(
        vec![node(&a), node(&b)],
        json!({"unhealthy": {"failures": 1}, "eject_ms": 600000, "max_ejected_percent": 100}),
    )
    .await;
    for _ in 0..10 {
        let reply = get(&all.url("/x")).await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(reply.header("x-upstream").is_some());
    }
    assert_eq!(a.hits() + b.hits() - hits_before, 10);
    let opened = metric(
        &all.admin_url("/metrics"),
        r#"weir_upstream_fail_open_total{upstream="u"}"#,
    )
    .await;
    assert_eq!(opened, 8.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_passive_checks_are_refused_at_their_field() {
    let up = Upstream::start("u").await;
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [
            {"id": "share", "nodes": [node(&up)],
             "checks": {"passive": {"max_ejected_percent": 150}}},
            {"id": "status", "nodes": [node(&up)],
             "checks": {"passive": {"unhealthy": {"statuses": [5030]}}}},
            {"id": "eject", "nodes": [node(&up)], "checks": {"passive": {"eject_ms": 0}}},
            {"id": "typo", "nodes": [node(&up)], "checks": {"pasive": {}}},
        ],
    })))
    .await;
    for (id, expected) in [
        ("share", "/checks/passive/max_ejected_percent"),
        ("status", "/checks/passive/unhealthy/statuses/0"),
        ("eject", "/checks/passive/eject_ms"),
        ("typo", "pasive"),
    ] {
        let reason = gateway.refusal(id);
        assert!(reason.contains(expected), "{id}: {reason}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_take_a_node_that_went_away_out_and_bring_it_back() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let b_addr = b.addr;
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "u", "nodes": [node(&a), node(&b)], "checks": {"active": {
            "type": "http", "path": "/healthz", "interval_ms": 100, "timeout_ms": 1000,
            "healthy": {"successes": 2}, "unhealthy": {"failures": 2},
        }}}],
        "routes": [{"id": "r", "uri": "/*", "upstream_id": "u"}],
    })))
    .await;
    assert!(gateway.errors().is_empty(), "{:?}", gateway.errors());
    let metrics = gateway.admin_url("/metrics");
    let healthy = format!(
        r#"weir_upstream_node_healthy{{upstream="u",node="127.0.0.1:{}"}}"#,
        b_addr.port()
    );
    let soon = Duration::from_secs(20);
    eventually("b is probed", soon, || async { b.hits() >= 2 }).await;
    assert_eq!(metric(&metrics, &healthy).await, 1.0);
    let mut seen = Vec::new();
    for _ in 0..4 {
        let reply = get(&gateway.url("/x")).await;
        seen.push(reply.header("x-upstream").map(str::to_owned));
    }
    assert!(
        seen.contains(&Some("b".into())),
        "b takes its turn while healthy: {seen:?}"
    );

    // b goes away: its probes fail, it leaves rotation, and no request is sent to it (so none
    // is refused and retried).
    drop(b);
    eventually("b is unhealthy", soon, || async {
        metric(&metrics, &healthy).await == 0.0
    })
    .await;
    for _ in 0..10 {
        let reply = get(&gateway.url("/x")).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.header("x-upstream"), Some("a"));
    }
    let refused = r#"weir_upstream_failures_total{upstream="u",kind="connect"}"#;
    assert_eq!(metric(&metrics, refused).await, 0.0);
    let status = admin_get(&gateway.admin_url("/v1/status")).await.json();
    let b_state = &status["upstream_health"]["u"][1];
    assert_eq!(b_state["healthy"], false, "{status}");
    assert!(
        b_state["last_probe_error"]
            .as_str()
            .is_some_and(|e| e.contains("connect")),
        "{b_state}"
    );

    // Back on its port: two good probes in a row return it to rotation.
    let b = Upstream::start_at("b-again", b_addr).await;
    eventually("b is healthy again", soon, || async {
        metric(&metrics, &healthy).await == 1.0
    })
    .await;
    eventually("b takes traffic again", soon, || async {
        get(&gateway.url("/x")).await.header("x-upstream") == Some("b-again")
    })
    .await;
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_on_status_sends_idempotent_requests_to_another_node() {
    let (good, bad) = (Upstream::start("good").await, failing("bad").await);
    let gateway = TestGateway::fronting(json!({
        "nodes": [node(&good), node(&bad)], "retry_on": ["connect-failure", 503],
        // Half the requests are retried: more than the default budget's 20% allows.
        "retry_budget": {"percent": 100}
    }))
    .await;
    for _ in 0..10 {
        let reply = get(&gateway.url("/x")).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.header("x-upstream"), Some("good"));
    }
    // Each request went to the bad node on its turn and was sent on.
    assert_eq!(bad.hits(), 5);
    let retried = r#"weir_upstream_retries_total{upstream="u",on="status"}"#;
    assert_eq!(metric(&gateway.admin_url("/metrics"), retried).await, 5.0);

    // POST is not in retry_methods: its 503 goes back as the node sent it.
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(
            send_body(Method::POST, &gateway.url("/x"), "once")
                .await
                .status,
        );
    }
    let unavailable = statuses
        .iter()
        .filter(|s| **s == StatusCode::SERVICE_UNAVAILABLE)
        .count();
    assert_eq!(unavailable, 2, "{statuses:?}");
    assert_eq!(bad.hits(), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_node_answers_a_retry_on_status_the_client_gets_the_last_answer() {
    let (a, b) = (failing("a").await, failing("b").await);
    let gateway =
        TestGateway::fronting(json!({"nodes": [node(&a), node(&b)], "retry_on": [503]})).await;
    let reply = get(&gateway.url("/x")).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        reply.header("x-upstream").is_some(),
        "the upstream's answer, not the gateway's: {}",
        reply.text()
    );
    // Tried once on each node, never twice on one.
    assert_eq!((a.hits(), b.hits()), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_budget_caps_retries_after_a_node_took_the_request() {
    let (a, b) = (failing("a").await, failing("b").await);
    let gateway = TestGateway::fronting(json!({
        "nodes": [node(&a), node(&b)], "retry_on": [503],
        "retry_budget": {"percent": 0, "min_per_second": 1}
    }))
    .await;
    let started = std::time::Instant::now();
    for _ in 0..20 {
        assert_eq!(
            get(&gateway.url("/x")).await.status,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
    // With no share of requests to spend, only the floor of one a second is left.
    let seconds = started.elapsed().as_secs() as usize + 1;
    let retries = a.hits() + b.hits() - 20;
    assert!(
        (1..=seconds + 1).contains(&retries),
        "{retries} retries in under {seconds} s"
    );
    let metrics = gateway.admin_url("/metrics");
    let exhausted = r#"weir_upstream_retry_budget_exhausted_total{upstream="u"}"#;
    assert_eq!(metric(&metrics, exhausted).await as usize, 20 - retries);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_at_max_connections_queues_then_refuses_with_503() {
    let (held, gate) = Upstream::gated("held").await;
    let gateway = TestGateway::fronting(json!({
        "nodes": [node(&held)], "max_connections": 1, "timeout": {"queue_ms": 300}
    }))
    .await;
    let url = gateway.url("/x");
    let first = tokio::spawn({
        let url = url.clone();
        async move { get(&url).await }
    });
    eventually(
        "the first request holds the node",
        Duration::from_secs(10),
        || async { held.hits() == 1 },
    )
    .await;
    // The one slot is taken: the next request waits queue_ms, then is refused by the gateway.
    let refused = get(&url).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(refused.header("x-upstream").is_none());
    assert!(refused.text().contains("busy"), "{}", refused.text());
    assert_eq!(held.hits(), 1);
    let metrics = gateway.admin_url("/metrics");
    let full = r#"weir_upstream_queue_full_total{upstream="u"}"#;
    assert_eq!(metric(&metrics, full).await, 1.0);

    // A request that is queued when the slot frees goes through.
    let queued = tokio::spawn({
        let url = url.clone();
        async move { get(&url).await }
    });
    gate.open();
    assert_eq!(first.await.unwrap().status, StatusCode::OK);
    assert_eq!(queued.await.unwrap().status, StatusCode::OK);
    assert_eq!(held.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_retry_settings_are_refused_at_their_field() {
    let up = Upstream::start("u").await;
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [
            {"id": "on", "nodes": [node(&up)], "retry_on": ["connect_failure"]},
            {"id": "status", "nodes": [node(&up)], "retry_on": [200]},
            {"id": "methods", "nodes": [node(&up)], "retry_methods": ["get"]},
            {"id": "budget", "nodes": [node(&up)], "retry_budget": {"percent": 101}},
            {"id": "max", "nodes": [node(&up)], "max_connections": 0},
            {"id": "queue", "nodes": [node(&up)], "timeout": {"queue_ms": 0}},
        ],
    })))
    .await;
    for (id, expected) in [
        ("on", "connect-failure"),
        ("status", "retry_on 200"),
        ("methods", "/retry_methods/0"),
        ("budget", "/retry_budget/percent"),
        ("max", "/max_connections"),
        ("queue", "/timeout/queue_ms"),
    ] {
        let reason = gateway.refusal(id);
        assert!(reason.contains(expected), "{id}: {reason}");
    }
}
