//! Tenants and the sandbox's policies: quarantine, per-request isolation, and quotas.

use std::time::Duration;

use http::StatusCode;
use serde_json::json;
use weir_tests::admin_get;
use weir_tests::{TestGateway, Upstream, eventually, get, node, probe_entry, yaml};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_keeps_failing_is_quarantined_then_retried() {
    let up = Upstream::start("u").await;
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "u", "nodes": [node(&up)]}],
        "plugins": [probe_entry("flaky", json!({"quarantine": {"traps": 3, "window_ms": 60000, "backoff_ms": 400}}))],
        "routes": [{"id": "r", "uri": "/r", "upstream_id": "u", "plugins": [{"name": "flaky", "config": {"mode": "panic"}}]}],
    })))
    .await;
    let url = gateway.url("/r");
    for _ in 0..3 {
        assert_eq!(get(&url).await.status, StatusCode::INTERNAL_SERVER_ERROR);
    }
    // Quarantined: the plugin is not called, and the closed policy answers 503.
    let reply = get(&url).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.json()["error"], "plugin flaky failed");
    let status = admin_get(&gateway.admin_url("/v1/status")).await.json();
    assert_eq!(status["quarantined"][0]["plugin"], "flaky", "{status}");
    let metrics = get(&gateway.admin_url("/metrics")).await.text();
    assert!(
        metrics.contains(r#"weir_plugin_quarantines_total{plugin="flaky",tenant="default"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"weir_plugin_failures_total{plugin="flaky",route="r",tenant="default",kind="quarantined"} 1"#), "{metrics}");

    // After the backoff one call probes the plugin; it fails again, so it goes back for longer.
    let status_url = gateway.admin_url("/v1/status");
    eventually("the backoff runs out", Duration::from_secs(10), || async {
        admin_get(&status_url).await.json()["quarantined"][0]["retry_in_ms"] == 0
    })
    .await;
    assert_eq!(get(&url).await.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(get(&url).await.status, StatusCode::SERVICE_UNAVAILABLE);
    let metrics = get(&gateway.admin_url("/metrics")).await.text();
    assert!(
        metrics.contains(r#"weir_plugin_quarantines_total{plugin="flaky",tenant="default"} 2"#),
        "{metrics}"
    );
    assert_eq!(up.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_request_isolation_carries_no_state_between_requests() {
    let up = Upstream::start("u").await;
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "u", "nodes": [node(&up)]}],
        "plugins": [
            probe_entry("pooled", json!({})),
            probe_entry("fresh", json!({"isolation": "per-request"})),
        ],
        "routes": [
            {"id": "pooled", "uri": "/pooled", "upstream_id": "u", "plugins": [{"name": "pooled", "config": {"mode": "instance-counter"}}]},
            {"id": "fresh", "uri": "/fresh", "upstream_id": "u", "plugins": [{"name": "fresh", "config": {"mode": "instance-counter"}}]},
        ],
    })))
    .await;
    let counts = |path: &'static str| {
        let url = gateway.url(path);
        async move {
            let mut seen = Vec::new();
            for _ in 0..3 {
                seen.push(get(&url).await.text());
            }
            seen
        }
    };
    assert_eq!(counts("/pooled").await, ["1", "2", "3"]);
    assert_eq!(counts("/fresh").await, ["1", "1", "1"]);
}

/// Under per-request isolation a request's phases share its own instance: what on-request kept
/// is there in on-response and on-log, and no other request has used that instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_request_isolation_binds_one_instance_to_all_phases_of_a_request() {
    let up = Upstream::start("u").await;
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "u", "nodes": [node(&up)]}],
        "plugins": [probe_entry("fresh", json!({"isolation": "per-request"}))],
        "routes": [
            {"id": "fresh", "uri": "/fresh", "upstream_id": "u", "plugins": [{"name": "fresh", "config": {"mode": "remember"}}]},
        ],
    })))
    .await;
    for _ in 0..3 {
        let reply = get(&gateway.url("/fresh")).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.header("x-remembered"), Some("same"));
        assert_eq!(reply.header("x-instance-seen"), Some("1"));
    }
    let metrics_url = gateway.admin_url("/metrics");
    eventually(
        "on-log of all three requests",
        Duration::from_secs(5),
        || async {
            get(&metrics_url)
                .await
                .text()
                .contains(r#"weir_plugin_events_total{plugin="fresh",name="remember-same"} 3"#)
        },
    )
    .await;
    let metrics = get(&metrics_url).await.text();
    assert!(!metrics.contains("remember-other"), "{metrics}");
}

/// A route can ask for fresh instances of a plugin whose entry pools them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_can_override_isolation() {
    let up = Upstream::start("u").await;
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "u", "nodes": [node(&up)]}],
        "plugins": [probe_entry("counter", json!({}))],
        "routes": [
            {"id": "fresh", "uri": "/fresh", "upstream_id": "u",
             "plugins": [{"name": "counter", "config": {"mode": "instance-counter"}, "isolation": "per-request"}]},
        ],
    })))
    .await;
    for _ in 0..3 {
        assert_eq!(get(&gateway.url("/fresh")).await.text(), "1");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_quotas_bound_memory_and_instances() {
    let up = Upstream::start("u").await;
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "u", "nodes": [node(&up)]}],
        "tenants": [
            {"name": "small", "quotas": {"memory_mb": 64}},
            {"name": "tiny", "quotas": {"instances": 1}},
        ],
        "plugins": [
            probe_entry("hold-a", json!({"tenant": "small", "limits": {"memory_mb": 48}})),
            probe_entry("hold-b", json!({"tenant": "small", "limits": {"memory_mb": 48}})),
            probe_entry("one", json!({"tenant": "tiny"})),
            probe_entry("two", json!({"tenant": "tiny"})),
            probe_entry("stranger", json!({"tenant": "nobody"})),
        ],
        "routes": [
            {"id": "a", "uri": "/a", "upstream_id": "u", "plugins": [{"name": "hold-a", "config": {"mode": "hold", "mb": 40}}]},
            {"id": "b", "uri": "/b", "upstream_id": "u", "plugins": [{"name": "hold-b", "config": {"mode": "hold", "mb": 40}}]},
            {"id": "one", "uri": "/one", "upstream_id": "u", "plugins": [{"name": "one", "config": {"mode": "variant"}}]},
            {"id": "two", "uri": "/two", "upstream_id": "u", "plugins": [{"name": "two", "config": {"mode": "variant"}}]},
        ],
    })))
    .await;
    // Memory: a holds 40 MiB of the tenant's 64; b cannot take 40 more.
    assert_eq!(get(&gateway.url("/a")).await.status, StatusCode::OK);
    let b = get(&gateway.url("/b")).await;
    assert_eq!(b.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(b.json()["error"], "plugin hold-b failed");
    let metrics = get(&gateway.admin_url("/metrics")).await.text();
    assert!(
        metrics.contains(
            r#"weir_plugin_failures_total{plugin="hold-b",route="b",tenant="small",kind="quota"} 1"#
        ),
        "{metrics}"
    );
    let status = admin_get(&gateway.admin_url("/v1/status")).await.json();
    let small = status["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "small")
        .unwrap()
        .clone();
    assert!(
        small["usage"]["memory_bytes"].as_u64().unwrap() >= 40 << 20,
        "{small}"
    );

    // Instances: tiny's one instance goes to the first route that loads; the other is refused.
    let errors = gateway.errors();
    assert!(
        errors
            .iter()
            .any(|e| e.id == "two" && e.reason.contains("instances quota of 1")),
        "{errors:?}"
    );
    assert_eq!(get(&gateway.url("/one")).await.text(), "a");
    // A plugin naming a tenant that does not exist does not load.
    assert!(
        errors
            .iter()
            .any(|e| e.id == "stranger" && e.reason.contains("tenant \"nobody\" does not exist")),
        "{errors:?}"
    );
    assert_eq!(errors.len(), 2, "nothing else is rejected: {errors:?}");
}

/// One tenant filling its kv quota takes nothing from another: b's counter and values stay, and
/// a's write past its own quota fails its call rather than being dropped (or dropping another's)
/// while the plugin is told it was kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_filling_its_kv_quota_evicts_nothing_of_another() {
    let up = Upstream::start("u").await;
    let route = |id: &str, plugin: &str, config: serde_json::Value| {
        json!({"id": id, "uri": format!("/{id}"), "upstream_id": "u",
               "plugins": [{"name": plugin, "config": config}]})
    };
    let mib = 1 << 20;
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "u", "nodes": [node(&up)]}],
        // a has the default kv quota of 64 MiB.
        "tenants": [{"name": "a"}, {"name": "b"}],
        "plugins": [
            // Copying 64 MiB into the kv takes longer than the default 50 ms in a debug build.
            probe_entry("a-data", json!({"tenant": "a", "limits": {"timeout_ms": 10000}})),
            probe_entry("b-data", json!({"tenant": "b", "limits": {"timeout_ms": 10000}})),
            probe_entry("b-limit", json!({"tenant": "b"})),
        ],
        "routes": [
            route("a-flood", "a-data", json!({"mode": "kv-flood", "count": 70, "size": mib})),
            route("a-census", "a-data", json!({"mode": "kv-census", "count": 70})),
            route("b-flood", "b-data", json!({"mode": "kv-flood", "count": 8, "size": mib})),
            route("b-census", "b-data", json!({"mode": "kv-census", "count": 8})),
            route("b-count", "b-limit", json!({"mode": "count", "key": "hits"})),
        ],
    })))
    .await;
    assert!(gateway.errors().is_empty(), "{:?}", gateway.errors());
    let count =
        || async { get(&gateway.url("/b-count")).await.json()["headers"]["x-count"].clone() };
    for expected in ["1", "2", "3"] {
        assert_eq!(count().await, expected);
    }
    assert_eq!(get(&gateway.url("/b-flood")).await.status, StatusCode::OK);

    // 63 values of 1 MiB and their keys fit in a's 64 MiB; the 64th does not, and fails the call.
    let flood = get(&gateway.url("/a-flood")).await;
    assert_eq!(
        flood.status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "{}",
        flood.text()
    );
    let metrics = get(&gateway.admin_url("/metrics")).await.text();
    assert!(
        metrics.contains(
            r#"weir_plugin_failures_total{plugin="a-data",route="a-flood",tenant="a",kind="quota"} 1"#
        ),
        "{metrics}"
    );
    // Every write a was not refused is kept, and so is everything of b's.
    assert_eq!(get(&gateway.url("/a-census")).await.text(), "63");
    assert_eq!(get(&gateway.url("/b-census")).await.text(), "8");
    assert_eq!(count().await, "4");
    // a stays at its quota: a second flood rewrites its 63 values and is refused at the 64th.
    assert_eq!(
        get(&gateway.url("/a-flood")).await.status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(get(&gateway.url("/a-census")).await.text(), "63");
    assert_eq!(count().await, "5");
}
