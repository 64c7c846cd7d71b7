//! The access log and the Prometheus endpoint.

use http::StatusCode;
use serde_json::json;
use weir_tests::{TestGateway, Upstream, all_plugins, get, node, yaml};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_gets_one_access_log_line_and_is_counted() {
    let up = Upstream::start("u").await;
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "u", "nodes": [node(&up)]}],
        "plugins": all_plugins(),
        "routes": [{"id": "api", "uri": "/api/*", "upstream_id": "u", "plugins": [{"name": "request-id"}]}],
    })))
    .await;
    for _ in 0..3 {
        assert_eq!(get(&gateway.url("/api/x")).await.status, StatusCode::OK);
    }
    assert_eq!(
        get(&gateway.url("/missing")).await.status,
        StatusCode::NOT_FOUND
    );

    let log = gateway.access_log(4).await;
    assert_eq!(log.len(), 4);
    let line = &log[0];
    assert_eq!(line["route"], "api");
    assert_eq!(line["method"], "GET");
    assert_eq!(line["path"], "/api/x");
    assert_eq!(line["status"], 200);
    assert_eq!(line["client_ip"], "127.0.0.1");
    assert_eq!(line["upstream"], format!("127.0.0.1:{}", up.port()));
    assert!(line["latency_us"].as_u64().unwrap() >= line["plugin_us"].as_u64().unwrap());
    assert!(line["plugin_us"].as_u64().unwrap() > 0);
    assert_eq!(line["request_id"].as_str().unwrap().len(), 36);
    assert_eq!(log[3]["status"], 404);
    assert!(log[3]["route"].is_null());

    let metrics = get(&gateway.admin_url("/metrics")).await;
    assert_eq!(metrics.status, StatusCode::OK);
    let text = metrics.text();
    assert!(
        text.contains(r#"weir_http_requests_total{route="api",class="2xx"} 3"#),
        "{text}"
    );
    assert!(
        text.contains(r#"weir_http_request_duration_seconds_count{route="api"} 3"#),
        "{text}"
    );
    assert!(text.contains("weir_routes 1"), "{text}");
    assert_eq!(get(&gateway.admin_url("/healthz")).await.text(), "ok\n");
}
