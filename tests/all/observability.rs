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

/// A gateway in front of an echo upstream, with `server`.
async fn traced_gateway(up: &Upstream, server: serde_json::Value) -> TestGateway {
    TestGateway::start(&yaml(json!({
        "server": server,
        "upstreams": [{"id": "u", "nodes": [node(up)]}],
        "routes": [{"id": "t", "uri": "/t", "upstream_id": "u"}],
    })))
    .await
}

/// What the echo upstream saw of `header`.
fn upstream_saw(reply: &weir_tests::Reply, header: &str) -> Option<String> {
    reply.json()["headers"][header].as_str().map(str::to_owned)
}

/// A `traceparent`'s four fields.
fn fields(traceparent: &str) -> Vec<String> {
    let fields: Vec<String> = traceparent.split('-').map(str::to_owned).collect();
    assert_eq!(fields.len(), 4, "{traceparent}");
    assert_eq!(
        (
            fields[0].len(),
            fields[1].len(),
            fields[2].len(),
            fields[3].len()
        ),
        (2, 32, 16, 2)
    );
    assert!(
        traceparent
            .bytes()
            .all(|b| b == b'-' || b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    );
    fields
}

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_context_goes_upstream_with_the_gateways_span_and_into_the_log_and_errors() {
    let up = Upstream::start("u").await;
    let gateway = traced_gateway(&up, json!({"tracing": {"sample_ratio": 0.0}})).await;
    assert!(gateway.errors().is_empty(), "{:?}", gateway.errors());
    let url = gateway.url("/t");
    let ask =
        |headers: &'static [(&'static str, &'static str)]| crate::plugins::get_with(&url, headers);

    // A client's trace goes on, with the gateway's span as the parent. The client is no
    // trusted proxy, so its sampled flag is not believed: at ratio 0 the trace is unsampled.
    let reply = ask(&[
        ("traceparent", CLIENT_PARENT),
        ("tracestate", "congo=t61rcWkgMzE"),
    ])
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let sent = fields(&upstream_saw(&reply, "traceparent").unwrap());
    assert_eq!(sent[1], CLIENT_TRACE);
    assert_ne!(
        sent[2], "00f067aa0ba902b7",
        "the parent is the gateway's span"
    );
    assert_eq!(sent[3], "00");
    assert_eq!(
        upstream_saw(&reply, "tracestate").as_deref(),
        Some("congo=t61rcWkgMzE")
    );

    // A malformed one is replaced, never passed on, and its tracestate goes with it.
    let reply = ask(&[
        ("traceparent", "00-NOT-A-TRACE-01"),
        ("tracestate", "evil=1"),
    ])
    .await;
    let replaced = fields(&upstream_saw(&reply, "traceparent").unwrap());
    assert_ne!(replaced[1], CLIENT_TRACE);
    assert_ne!(replaced[1], "0".repeat(32));
    assert_eq!(upstream_saw(&reply, "tracestate"), None);

    // None: the gateway starts one.
    let reply = ask(&[]).await;
    let started = fields(&upstream_saw(&reply, "traceparent").unwrap());
    assert_ne!(started[1], replaced[1]);

    // The gateway's own error names the trace beside the request id.
    let missing =
        crate::plugins::get_with(&gateway.url("/missing"), &[("traceparent", CLIENT_PARENT)]).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(
        missing.json()["trace_id"],
        CLIENT_TRACE,
        "{}",
        missing.text()
    );
    assert!(missing.json()["request_id"].is_string());

    let log = gateway.access_log(4).await;
    let traces: Vec<&str> = log
        .iter()
        .map(|line| line["trace_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        traces,
        [CLIENT_TRACE, &replaced[1], &started[1], CLIENT_TRACE]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_trusted_peer_or_the_config_decides_sampling_and_tracing_off_changes_nothing() {
    let up = Upstream::start("u").await;
    let sampled =
        |reply: &weir_tests::Reply| fields(&upstream_saw(reply, "traceparent").unwrap())[3].clone();
    let headers = [("traceparent", CLIENT_PARENT)];
    for server in [
        json!({"tracing": {"sample_ratio": 0.0}, "trusted_proxies": ["127.0.0.1"]}),
        json!({"tracing": {"sample_ratio": 0.0, "respect_client_sampling": true}}),
    ] {
        let gateway = traced_gateway(&up, server.clone()).await;
        let reply = crate::plugins::get_with(&gateway.url("/t"), &headers).await;
        assert_eq!(sampled(&reply), "01", "{server}");
    }

    // Off: a client's header, even a malformed one, is the client's business; nothing is added.
    let gateway = traced_gateway(&up, json!({})).await;
    let reply = crate::plugins::get_with(&gateway.url("/t"), &[("traceparent", "whatever")]).await;
    assert_eq!(
        upstream_saw(&reply, "traceparent").as_deref(),
        Some("whatever")
    );
    let reply = crate::plugins::get_with(&gateway.url("/t"), &[]).await;
    assert_eq!(upstream_saw(&reply, "traceparent"), None);
    let missing = weir_tests::get(&gateway.url("/missing")).await;
    assert!(
        missing.json().get("trace_id").is_none(),
        "{}",
        missing.text()
    );
    let log = gateway.access_log(3).await;
    assert!(
        log.iter().all(|line| line.get("trace_id").is_none()),
        "{log:?}"
    );

    // A ratio outside 0..=1 is refused, with its place named.
    let gateway = traced_gateway(&up, json!({"tracing": {"sample_ratio": 2.0}})).await;
    let errors = format!("{:?}", gateway.errors());
    assert!(
        errors.contains("sample_ratio 2 is not in 0..=1"),
        "{errors}"
    );
}
