//! Plugin failures: loops, memory bombs, panics and runaway recursion become the plugin's
//! failure policy, and the gateway keeps serving everything else.

use http::StatusCode;
use serde_json::{Value, json};
use weir_tests::admin_get;
use weir_tests::{TestGateway, Upstream, get, node, yaml};

/// Quarantine is off here, so that every call reaches the plugin; tests/all/tenants.rs has it on.
fn probe(name: &str, failure: &str, limits: Value) -> Value {
    weir_tests::probe_entry(
        name,
        json!({"failure": failure, "limits": limits, "quarantine": {"traps": 0}}),
    )
}

async fn hostile_gateway(up: &Upstream) -> TestGateway {
    TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "u", "nodes": [node(up)]}],
        "plugins": [
            probe("closed", "closed", json!({"timeout_ms": 50, "memory_mb": 16})),
            probe("open", "open", json!({"timeout_ms": 50, "memory_mb": 16})),
        ],
        "routes": [
            {"id": "ok", "uri": "/ok", "upstream_id": "u"},
            {"id": "loop", "uri": "/loop", "upstream_id": "u", "plugins": [{"name": "closed", "config": {"mode": "loop"}}]},
            {"id": "alloc", "uri": "/alloc", "upstream_id": "u", "plugins": [{"name": "closed", "config": {"mode": "alloc"}}]},
            {"id": "panic", "uri": "/panic", "upstream_id": "u", "plugins": [{"name": "closed", "config": {"mode": "panic"}}]},
            {"id": "recurse", "uri": "/recurse", "upstream_id": "u", "plugins": [{"name": "closed", "config": {"mode": "recurse"}}]},
            {"id": "open-loop", "uri": "/open-loop", "upstream_id": "u", "plugins": [{"name": "open", "config": {"mode": "loop"}}]},
            {"id": "open-panic", "uri": "/open-panic", "upstream_id": "u", "plugins": [{"name": "open", "config": {"mode": "panic"}}]},
        ],
    })))
    .await
}

async fn assert_plugin_failure(gateway: &TestGateway, path: &str) {
    let reply = get(&gateway.url(path)).await;
    assert_eq!(
        reply.status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "{path}: {}",
        reply.text()
    );
    let body = reply.json();
    assert_eq!(body["error"], "plugin closed failed", "{path}: {body}");
    assert_eq!(body["request_id"].as_str().unwrap().len(), 36);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_infinite_loop_is_stopped_by_the_deadline_while_other_routes_serve() {
    let up = Upstream::start("u").await;
    let gateway = hostile_gateway(&up).await;
    // Keep a well-behaved route busy while the loops run.
    let ok_url = gateway.url("/ok");
    let neighbour = tokio::spawn(async move {
        let mut statuses = Vec::new();
        for _ in 0..50 {
            statuses.push(get(&ok_url).await.status);
        }
        statuses
    });
    for _ in 0..5 {
        assert_plugin_failure(&gateway, "/loop").await;
    }
    let statuses = neighbour.await.unwrap();
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    let metrics = get(&gateway.admin_url("/metrics")).await.text();
    assert!(
        metrics.contains(r#"weir_plugin_failures_total{plugin="closed",route="loop",tenant="default",kind="timeout"} 5"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_bomb_hits_its_limit_and_nothing_else_notices() {
    let up = Upstream::start("u").await;
    let gateway = hostile_gateway(&up).await;
    for _ in 0..5 {
        assert_plugin_failure(&gateway, "/alloc").await;
        assert_eq!(get(&gateway.url("/ok")).await.status, StatusCode::OK);
    }
    let metrics = get(&gateway.admin_url("/metrics")).await.text();
    assert!(
        metrics.contains(r#"weir_plugin_failures_total{plugin="closed",route="alloc",tenant="default",kind="memory"} 5"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_or_runaway_recursion_fails_closed_and_the_instance_is_replaced() {
    let up = Upstream::start("u").await;
    let gateway = hostile_gateway(&up).await;
    for _ in 0..3 {
        assert_plugin_failure(&gateway, "/panic").await;
        assert_plugin_failure(&gateway, "/recurse").await;
        assert_eq!(get(&gateway.url("/ok")).await.status, StatusCode::OK);
    }
    assert_eq!(up.hits(), 3, "failed requests never reach the upstream");
    let metrics = get(&gateway.admin_url("/metrics")).await.text();
    for route in ["panic", "recurse"] {
        let line = format!(
            r#"weir_plugin_failures_total{{plugin="closed",route="{route}",tenant="default",kind="trap"}} 3"#
        );
        assert!(metrics.contains(&line), "{line} in {metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_skips_the_broken_plugin() {
    let up = Upstream::start("u").await;
    let gateway = hostile_gateway(&up).await;
    for path in ["/open-loop", "/open-panic"] {
        let reply = get(&gateway.url(path)).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}");
        assert_eq!(reply.json()["path"], path);
    }
    assert_eq!(up.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_fails_in_init_is_rejected_when_the_route_loads() {
    let up = Upstream::start("u").await;
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "u", "nodes": [node(&up)]}],
        "plugins": [probe("probe", "closed", json!({}))],
        "routes": [
            {"id": "ok", "uri": "/ok", "upstream_id": "u"},
            {"id": "init-panics", "uri": "/a", "upstream_id": "u", "plugins": [{"name": "probe", "config": {"mode": "panic-in-init"}}]},
            {"id": "bad-config", "uri": "/b", "upstream_id": "u", "plugins": [{"name": "probe", "config": {"mode": "no-such-mode"}}]},
        ],
    })))
    .await;
    let errors = gateway.errors();
    let reason = |id: &str| gateway.refusal(id);
    assert!(
        reason("init-panics").contains("plugin trapped"),
        "{errors:?}"
    );
    // Refused by the schema the plugin describes itself with, before its `init` runs; the
    // refused value is not echoed (it could be a secret).
    assert!(
        reason("bad-config").contains("does not match the plugin's schema")
            && !reason("bad-config").contains("no-such-mode"),
        "{errors:?}"
    );
    assert_eq!(get(&gateway.url("/a")).await.status, StatusCode::NOT_FOUND);
    assert_eq!(get(&gateway.url("/ok")).await.status, StatusCode::OK);
    let status = admin_get(&gateway.admin_url("/v1/status")).await.json();
    assert_eq!(status["errors"].as_array().unwrap().len(), 2, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_wasi_runtime_granted_the_filesystem_is_linked_but_no_file_is_reachable() {
    let up = Upstream::start("u").await;
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "u", "nodes": [node(&up)]}],
        "plugins": [{"name": "reader", "module": weir_tests::plugins::FS_READER,
                     "grants": {"wasi": ["runtime", "clocks"]}}],
        "routes": [{"id": "read", "uri": "/read", "upstream_id": "u", "plugins": [{"name": "reader"}]}],
    })))
    .await;
    // It loads: `runtime` links wasi:filesystem.
    assert!(gateway.errors().is_empty(), "{:?}", gateway.errors());
    // And reaches nothing: no directory is preopened, so /etc/passwd is not there to read.
    let reply = get(&gateway.url("/read")).await;
    assert_eq!(
        reply.status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "{}",
        reply.text()
    );
    assert!(!reply.text().contains("root:"), "{}", reply.text());
    assert_eq!(up.hits(), 0);
}

/// A call that fails leaves no trace. The failing plugin edits the request (a header, a var that
/// the trace plugin before it set) and queues a `set-cookie` and then headers until it goes past
/// the bound; in on-response it sets the status and a header, then floods headers until it fails.
async fn edit_then_fail_gateway(up: &Upstream) -> TestGateway {
    let chain = |name: &str| {
        json!([{"name": "trace", "config": {"mode": "trace", "tag": "before"}},
                                    {"name": name, "config": {"mode": "edit-then-fail"}}])
    };
    TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "u", "nodes": [node(up)]}],
        "plugins": [
            probe("trace", "closed", json!({})),
            probe("closed", "closed", json!({})),
            probe("open", "open", json!({})),
        ],
        "routes": [
            {"id": "open", "uri": "/open", "upstream_id": "u", "plugins": chain("open")},
            {"id": "closed", "uri": "/closed", "upstream_id": "u", "plugins": chain("closed")},
        ],
    })))
    .await
}

/// None of the failed plugin's edits show in the answer's headers.
fn assert_no_edits_of_the_failed_plugin(reply: &weir_tests::Reply) {
    for name in [
        "set-cookie",
        "x-probe-queued",
        "x-probe-edited",
        "x-probe-flood-0",
    ] {
        assert_eq!(reply.header(name), None, "{name}: {:?}", reply.headers);
    }
    let bytes: usize = reply
        .headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len())
        .sum();
    assert!(
        bytes < 1024,
        "{bytes} bytes of headers: {:?}",
        reply.headers
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_fails_open_leaves_no_edit_behind() {
    let up = Upstream::start("u").await;
    let gateway = edit_then_fail_gateway(&up).await;
    let reply = get(&gateway.url("/open")).await;
    // The on-response edits (status 299 and a header) are undone too.
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_no_edits_of_the_failed_plugin(&reply);
    // The var is the one trace set, not the failed plugin's.
    assert_eq!(reply.header("x-probe-tag"), Some("before"));
    let echo = reply.json();
    assert_eq!(echo["headers"]["x-probe-edited"], Value::Null, "{echo}");
    // It did fail, in both phases.
    let metrics = get(&gateway.admin_url("/metrics")).await.text();
    let failures =
        r#"weir_plugin_failures_total{plugin="open",route="open",tenant="default",kind="limit"} 2"#;
    assert!(metrics.contains(failures), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_fails_closed_leaves_no_header_on_the_gateways_error() {
    let up = Upstream::start("u").await;
    let gateway = edit_then_fail_gateway(&up).await;
    let reply = get(&gateway.url("/closed")).await;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(reply.json()["error"], "plugin closed failed");
    assert_no_edits_of_the_failed_plugin(&reply);
    assert_eq!(up.hits(), 0);
}
