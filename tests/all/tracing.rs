//! Spans sent over OTLP to a real receiver (tests/src/otlp.rs): the tree of a request through
//! plugins and a retried upstream, sampling, a collector that is down or slow, and what
//! plugins add to their own spans.

use std::time::Duration;

use http::StatusCode;
use serde_json::json;
use weir_tests::otlp::{OtlpReceiver, ReceivedSpan};
use weir_tests::{
    Behaviour, BlackHole, TestGateway, Upstream, eventually, get, metric, node, plugins, yaml,
};

use crate::plugins::get_with;

const WAIT: Duration = Duration::from_secs(15);

/// The plugin entries the tracing tests use: `spanner` (granted `tracing` and calls to
/// `callee`), in tenant `acme`, and `request-id`.
fn plugin_entries(callee: Option<&Upstream>) -> serde_json::Value {
    let mut grants = json!({"tracing": true});
    if let Some(callee) = callee {
        grants["http"] =
            json!({"hosts": [format!("127.0.0.1:{}", callee.port())], "private": true});
    }
    json!([
        {"name": "spanner", "module": plugins::SPANNER, "grants": grants, "tenant": "acme"},
        {"name": "request-id", "module": plugins::REQUEST_ID},
    ])
}

/// The spans of trace `trace_id`, once its server span has arrived.
async fn trace_of(receiver: &OtlpReceiver, trace_id: &str) -> Vec<ReceivedSpan> {
    let spans = receiver
        .wait_for(&format!("the server span of {trace_id}"), WAIT, |spans| {
            spans.iter().any(|s| s.trace_id == trace_id && s.kind == 2)
        })
        .await;
    spans
        .into_iter()
        .filter(|s| s.trace_id == trace_id)
        .collect()
}

fn trace_id_seen_by(reply: &weir_tests::Reply) -> String {
    let sent = reply.json()["headers"]["traceparent"]
        .as_str()
        .expect("the upstream got a traceparent")
        .to_owned();
    sent.split('-').nth(1).unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_through_two_plugins_and_a_retried_upstream_exports_its_span_tree() {
    let receiver = OtlpReceiver::grpc().await;
    let callee = Upstream::start("callee").await;
    let good = Upstream::start("good").await;
    let busy = Upstream::start_with(
        "busy",
        Behaviour {
            status: StatusCode::SERVICE_UNAVAILABLE,
            ..Behaviour::default()
        },
    )
    .await;
    let gateway = TestGateway::start(&yaml(json!({
        "server": {"tracing": {
            "endpoint": receiver.endpoint(), "service_name": "edge-eu",
            "headers": {"x-vendor-key": "s3cret"},
        }},
        "tenants": [{"name": "acme"}],
        "plugins": plugin_entries(Some(&callee)),
        "upstreams": [{"id": "u", "nodes": [node(&busy), node(&good)], "retry_on": [503],
                       "retry_budget": {"percent": 100}}],
        "routes": [{"id": "orders", "uri": "/orders/*", "upstream_id": "u", "plugins": [
            {"name": "spanner", "config": {"tag": "gold",
                "call": format!("http://127.0.0.1:{}/lookup", callee.port())}},
            {"name": "request-id"},
        ]}],
    })))
    .await;
    assert!(gateway.errors().is_empty(), "{:?}", gateway.errors());

    // Round robin: of two requests, one meets the busy node first and is retried.
    let mut traces = Vec::new();
    for _ in 0..2 {
        let reply = get_with(&gateway.url("/orders/7?card=4111"), &[]).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.json()["headers"]["x-spanner-recorded"], "true");
        traces.push(trace_id_seen_by(&reply));
    }
    let mut retried = None;
    for trace_id in &traces {
        let spans = trace_of(&receiver, trace_id).await;
        let attempts = spans.iter().filter(|s| s.name == "upstream u").count();
        if attempts == 2 {
            retried = Some(spans);
        }
    }
    let spans = retried.expect("one of the two requests was retried");
    let by_name = |name: &str| {
        spans
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no span {name} in {spans:#?}"))
    };

    // The server span: the root (the client sent no traceparent), the route, the status, the
    // client, and the normal path without its query.
    let server = by_name("GET orders");
    assert_eq!(server.kind, 2);
    assert_eq!(server.parent_id, "");
    assert_eq!(server.service, "edge-eu");
    assert_eq!(server.attribute("http.route"), Some("orders"));
    assert_eq!(server.attribute("http.response.status_code"), Some("200"));
    assert_eq!(server.attribute("client.address"), Some("127.0.0.1"));
    assert_eq!(server.attribute("url.path"), Some("/orders/7"));
    assert!(
        !spans
            .iter()
            .flat_map(|s| &s.attributes)
            .any(|(_, v)| v.contains("4111")),
        "the query string is in no span"
    );

    // A span per plugin call, each a child of the server span, with its tenant and outcome;
    // spanner's own attribute and event are on its span.
    let spanner = by_name("plugin spanner on-request");
    assert_eq!(spanner.parent_id, server.span_id);
    assert_eq!(spanner.kind, 1);
    assert_eq!(spanner.attribute("weir.tenant"), Some("acme"));
    assert_eq!(spanner.attribute("weir.phase"), Some("on-request"));
    assert_eq!(spanner.attribute("weir.outcome"), Some("ok"));
    assert_eq!(spanner.attribute("spanner.tag"), Some("gold"));
    assert_eq!(spanner.attribute("weir.plugin.outbound_calls"), Some("1"));
    assert!(spanner.attribute("weir.plugin.time_us").is_some());
    assert_eq!(spanner.events, ["spanner.checked"]);
    let request_id = by_name("plugin request-id on-request");
    assert_eq!(request_id.parent_id, server.span_id);
    assert_eq!(request_id.attribute("weir.tenant"), Some("default"));

    // The plugin's outbound call: a client span under the plugin's, and the callee got the
    // trace with that span as its parent.
    let call = by_name("plugin call GET");
    assert_eq!(call.kind, 3);
    assert_eq!(call.parent_id, spanner.span_id);
    assert_eq!(call.attribute("http.response.status_code"), Some("200"));

    // Two upstream attempts under the server span: the busy node's 503, then the retry.
    let mut attempts: Vec<&ReceivedSpan> =
        spans.iter().filter(|s| s.name == "upstream u").collect();
    attempts.sort_by_key(|s| s.attribute("weir.attempt").map(str::to_owned));
    assert_eq!(attempts[0].attribute("weir.attempt"), Some("1"));
    assert_eq!(
        attempts[0].attribute("http.response.status_code"),
        Some("503")
    );
    assert_eq!(attempts[0].status, 2);
    assert_eq!(
        attempts[0].attribute("server.address"),
        Some(format!("127.0.0.1:{}", busy.port()).as_str())
    );
    assert_eq!(attempts[1].attribute("weir.attempt"), Some("2"));
    assert_eq!(attempts[1].attribute("weir.retry_reason"), Some("503"));
    assert_eq!(
        attempts[1].attribute("http.response.status_code"),
        Some("200")
    );
    assert!(matches!(
        attempts[1].attribute("weir.connection"),
        Some("new" | "reused")
    ));
    for attempt in &attempts {
        assert_eq!(attempt.parent_id, server.span_id);
        assert_eq!(attempt.kind, 3);
    }
    // Every span lies within the server span.
    for span in &spans {
        assert!(
            span.start_ns >= server.start_ns && span.end_ns <= server.end_ns,
            "{span:#?}"
        );
    }
    // The vendor's header went with the export.
    assert!(
        receiver
            .request_headers()
            .iter()
            .all(|h| h.get("x-vendor-key").is_some_and(|v| v == "s3cret"))
    );
    // And the admin API never shows it.
    let shown = weir_tests::admin_get(&gateway.admin_url("/v1/server")).await;
    assert_eq!(shown.status, StatusCode::OK, "{}", shown.text());
    assert_eq!(
        shown.json()["value"]["tracing"]["headers"]["x-vendor-key"],
        "<redacted>"
    );
    // Counted once the collector's answer is in, just after the spans arrive.
    eventually("the exported spans are counted", WAIT, || async {
        let exported = metric(
            &gateway.admin_url("/metrics"),
            "weir_tracing_spans_exported_total",
        )
        .await;
        exported >= spans.len() as f64
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_trace_continues_a_sampled_out_one_exports_nothing_and_http_protobuf_works() {
    let receiver = OtlpReceiver::http().await;
    let up = Upstream::start("u").await;
    let config = |ratio: f64| {
        yaml(json!({
            "server": {"tracing": {"endpoint": receiver.endpoint(), "protocol": "http",
                                   "sample_ratio": ratio, "respect_client_sampling": true}},
            "upstreams": [{"id": "u", "nodes": [node(&up)]}],
            "routes": [{"id": "t", "uri": "/t", "upstream_id": "u"}],
        }))
    };
    let gateway = TestGateway::start(&config(0.0)).await;
    assert!(gateway.errors().is_empty(), "{:?}", gateway.errors());
    let url = gateway.url("/t");

    // Sampled out by the client's flag (which this config believes): nothing exported.
    let unsampled = "00-11111111111111111111111111111111-2222222222222222-00";
    get_with(&url, &[("traceparent", unsampled)]).await;
    // Sampled in by the client: the server span's parent is the client's span.
    let sampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    get_with(&url, &[("traceparent", sampled)]).await;
    // A malformed traceparent is replaced by a new trace, sampled at ratio 0: not exported.
    let reply = get_with(&url, &[("traceparent", "00-zz-01")]).await;
    let replaced = trace_id_seen_by(&reply);
    // No traceparent, ratio 0: not exported either.
    get(&url).await;

    let spans = trace_of(&receiver, "4bf92f3577b34da6a3ce929d0e0e4736").await;
    let server: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.kind == 2).collect();
    assert_eq!(server.len(), 1, "{spans:#?}");
    assert_eq!(server[0].parent_id, "00f067aa0ba902b7");
    // Every request above has finished (each writes its access-log line after handing over
    // its spans); one more sampled trace goes after them through the same queue, so once it
    // arrives, anything they had sent would have too.
    gateway.access_log(4).await;
    let last = "00-99999999999999999999999999999999-00f067aa0ba902b7-01";
    get_with(&url, &[("traceparent", last)]).await;
    trace_of(&receiver, &"9".repeat(32)).await;
    let all = receiver.spans();
    // Each of the two: its server span and its upstream attempt.
    assert_eq!(all.len(), 4, "{all:#?}");
    assert!(
        !all.iter()
            .any(|s| s.trace_id == replaced || s.trace_id == "1".repeat(32))
    );

    // A live change: ratio 1 exports every trace, with no restart.
    gateway.reload(&config(1.0)).await;
    let reply = get(&url).await;
    let started = trace_id_seen_by(&reply);
    trace_of(&receiver, &started).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_down_or_slow_costs_dropped_spans_not_requests() {
    let up = Upstream::start("u").await;
    // Down: nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let down = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    // Slow: it takes connections and never answers.
    let slow = BlackHole::accepting().await;
    let slow_endpoint = format!("http://127.0.0.1:{}", slow.node()["port"]);
    for (endpoint, slow) in [(down, false), (slow_endpoint, true)] {
        let gateway = TestGateway::start(&yaml(json!({
            "server": {"tracing": {"endpoint": endpoint}},
            "upstreams": [{"id": "u", "nodes": [node(&up)]}],
            "routes": [{"id": "t", "uri": "/t", "upstream_id": "u"}],
        })))
        .await;
        let url = gateway.url("/t");
        let dropped = || async {
            metric(
                &gateway.admin_url("/metrics"),
                "weir_tracing_spans_dropped_total",
            )
            .await
        };
        // Twice the spans the export queue holds (2,048, plus a batch of 512 in the export
        // that hangs): each request is two spans, the server's and its upstream attempt's.
        let requests = 2000;
        let started = std::time::Instant::now();
        let mut statuses = Vec::new();
        for _ in 0..requests {
            statuses.push(get(&url).await.status);
        }
        let took = started.elapsed();
        assert!(statuses.iter().all(|s| *s == StatusCode::OK));
        if slow {
            // The queue is bounded: what did not fit was dropped at once, while the first
            // export still hangs. An unbounded queue would hold it all and drop nothing yet.
            let over = (2 * requests - 2048 - 512) as f64;
            let now = dropped().await;
            assert!(now >= over, "{now} dropped, not {over}, after {took:?}");
        }
        eventually("spans are dropped and counted", WAIT, || async {
            dropped().await >= 1000.0
        })
        .await;
        assert_eq!(
            metric(
                &gateway.admin_url("/metrics"),
                "weir_tracing_spans_exported_total"
            )
            .await,
            0.0
        );
        // No request waited on the collector: an export's timeout is 5 s.
        assert!(took < Duration::from_secs(60), "{took:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_imports_tracing_without_the_grant_does_not_load_and_its_notes_are_bounded() {
    let receiver = OtlpReceiver::grpc().await;
    let up = Upstream::start("u").await;
    let gateway = TestGateway::start(&yaml(json!({
        "server": {"tracing": {"endpoint": receiver.endpoint()}},
        "plugins": [
            {"name": "ungranted", "module": plugins::SPANNER, "grants": {"http": {"hosts": []}}},
            {"name": "spanner", "module": plugins::SPANNER,
             "grants": {"tracing": true, "http": {"hosts": []}}},
        ],
        "upstreams": [{"id": "u", "nodes": [node(&up)]}],
        "routes": [
            {"id": "flood", "uri": "/flood", "upstream_id": "u",
             "plugins": [{"name": "spanner", "config": {"tag": "t", "flood": 40}}]},
        ],
    })))
    .await;
    assert_eq!(gateway.errors().len(), 1, "{:?}", gateway.errors());
    let refusal = gateway.refusal("ungranted");
    assert!(
        refusal.contains("weir:plugin/tracing@0.3.0 (not granted; add grants: {tracing: true})")
            && !refusal.contains("http-client"),
        "{refusal}"
    );
    // Past 16 attributes in one call, the plugin is told no, and the span keeps 16 of its own
    // (besides the gateway's).
    let reply = get(&gateway.url("/flood")).await;
    let said = reply.json()["headers"]["x-spanner-recorded"]
        .as_str()
        .unwrap_or_else(|| panic!("{}", reply.text()))
        .to_owned();
    assert!(said.starts_with("flood 15:"), "{said}");
    let trace_id = trace_id_seen_by(&reply);
    let spans = trace_of(&receiver, &trace_id).await;
    let spanner = spans
        .iter()
        .find(|s| s.name == "plugin spanner on-request")
        .unwrap();
    let own = spanner
        .attributes
        .iter()
        .filter(|(k, _)| !k.starts_with("weir."))
        .count();
    assert_eq!(own, 16, "{spanner:#?}");

    // Not traced (no collector): the plugin is told `false`, and nothing fails.
    gateway
        .reload(&yaml(json!({
            "plugins": [{"name": "spanner", "module": plugins::SPANNER,
                         "grants": {"tracing": true, "http": {"hosts": []}}}],
            "upstreams": [{"id": "u", "nodes": [node(&up)]}],
            "routes": [{"id": "flood", "uri": "/flood", "upstream_id": "u",
                        "plugins": [{"name": "spanner", "config": {"tag": "t"}}]}],
        })))
        .await;
    let reply = get(&gateway.url("/flood")).await;
    assert_eq!(reply.json()["headers"]["x-spanner-recorded"], "false");
}
