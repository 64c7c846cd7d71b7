//! The file store: changes go live without a restart, and bad changes keep what was serving.

use std::time::Duration;

use http::StatusCode;
use serde_json::{Value, json};
use weir_tests::admin_get;
use weir_tests::{TestGateway, Upstream, all_plugins, eventually, get, metric, node, yaml};

fn config(upstream: &Upstream, route_extra: Value) -> String {
    let mut route = json!({"id": "r", "uri": "/*", "upstream_id": "u"});
    for (k, v) in route_extra.as_object().unwrap() {
        route[k] = v.clone();
    }
    yaml(json!({
        "upstreams": [{"id": "u", "nodes": [node(upstream)]}],
        "plugins": all_plugins(),
        "routes": [route],
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_change_goes_live_without_a_restart() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let gateway = TestGateway::start(&config(&a, json!({}))).await;
    assert_eq!(get(&gateway.url("/")).await.header("x-upstream"), Some("a"));

    gateway
        .reload(&config(&b, json!({"plugins": [{"name": "headers", "config": {"response": {"set": {"x-v": "2"}}}}]})))
        .await;
    let reply = get(&gateway.url("/")).await;
    assert_eq!(reply.header("x-upstream"), Some("b"));
    assert_eq!(reply.header("x-v"), Some("2"));

    // One change is one reload: reading the file must not count as the next change.
    let generation = gateway.generation();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        gateway.generation(),
        generation,
        "the gateway kept reloading"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_changes_are_reported_and_the_old_config_keeps_serving() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let good = json!({"plugins": [{"name": "key-auth", "config": {"keys": ["k"]}}]});
    let gateway = TestGateway::start(&config(&a, good.clone())).await;
    let check_still_old = || async {
        assert_eq!(
            get(&gateway.url("/")).await.status,
            StatusCode::UNAUTHORIZED
        );
    };
    check_still_old().await;

    // Not YAML at all: nothing changes, not even the generation.
    let generation = gateway.generation();
    let failed = r#"weir_config_reloads_total{outcome="failed"}"#;
    let metrics = gateway.admin_url("/metrics");
    assert_eq!(metric(&metrics, failed).await, 0.0);
    gateway.write_config("routes: [ {id: r, uri: /*");
    eventually(
        "the broken file is read and refused",
        Duration::from_secs(10),
        || async { metric(&metrics, failed).await == 1.0 },
    )
    .await;
    assert_eq!(gateway.generation(), generation);
    check_still_old().await;

    // An unknown plugin: the route keeps its previous version, and the reason is listed.
    gateway
        .reload(&config(
            &a,
            json!({"plugins": [{"name": "no-such-plugin"}]}),
        ))
        .await;
    check_still_old().await;
    let status = admin_get(&gateway.admin_url("/v1/status")).await.json();
    let reason = status["errors"][0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("plugin \"no-such-plugin\" is not loaded"),
        "{status}"
    );
    assert!(
        reason.contains("previous version keeps serving"),
        "{status}"
    );

    // A config that the plugin's init rejects.
    gateway
        .reload(&config(
            &a,
            json!({"plugins": [{"name": "key-auth", "config": {"keys": [""]}}]}),
        ))
        .await;
    check_still_old().await;
    assert!(
        gateway.errors()[0]
            .reason
            .contains("`keys` has an empty key"),
        "{:?}",
        gateway.errors()
    );

    // An upstream with no nodes keeps the nodes it had.
    let mut no_nodes: Value = serde_json::from_str(&config(&b, good.clone())).unwrap();
    no_nodes["upstreams"][0]["nodes"] = json!([]);
    gateway.reload(&yaml(no_nodes)).await;
    check_still_old().await;
    assert_eq!(a.hits(), 0);
    let errors = gateway.errors();
    assert!(
        errors
            .iter()
            .any(|e| e.id == "u" && e.reason.contains("at least one node")),
        "{errors:?}"
    );

    // A good change after all that applies, and clears the errors.
    gateway.reload(&config(&b, json!({}))).await;
    assert_eq!(get(&gateway.url("/")).await.header("x-upstream"), Some("b"));
    assert!(gateway.errors().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_finishes_on_the_config_it_started_with() {
    let (slow, gate) = Upstream::gated("slow").await;
    let fast = Upstream::start("fast").await;
    let gateway = TestGateway::start(&config(&slow, json!({}))).await;
    let url = gateway.url("/in-flight");
    let in_flight = tokio::spawn(async move { get(&url).await });
    eventually(
        "the request reaches the old upstream",
        Duration::from_secs(10),
        || async { slow.hits() == 1 },
    )
    .await;
    gateway.reload(&config(&fast, json!({}))).await;
    assert_eq!(
        get(&gateway.url("/")).await.header("x-upstream"),
        Some("fast")
    );
    gate.open();
    let reply = in_flight.await.unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("x-upstream"), Some("slow"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_made_right_after_start_is_not_missed() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    for _ in 0..5 {
        // The watch is in place before start returns: nothing written after it is lost.
        let gateway = TestGateway::start(&config(&a, json!({}))).await;
        gateway.reload(&config(&b, json!({}))).await;
        assert_eq!(get(&gateway.url("/")).await.header("x-upstream"), Some("b"));
        gateway.stop().await;
    }
}
