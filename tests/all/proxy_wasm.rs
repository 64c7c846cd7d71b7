//! proxy-wasm filters, built from source by the test build, run unchanged: the Rust SDK's own
//! examples, Weir's test filter (shared data, queues, metrics, hostile modes) and an
//! AssemblyScript filter, alone and mixed with components in one chain.

use std::time::Duration;

use futures_util::FutureExt;

use http::StatusCode;
use serde_json::{Value, json};
use weir_tests::plugins::{
    FILTER_ASSEMBLYSCRIPT, FILTER_HELLO_WORLD, FILTER_HTTP_AUTH_RANDOM, FILTER_HTTP_CONFIG,
    FILTER_HTTP_HEADERS, FILTER_WEIR,
};
use weir_tests::{
    Behaviour, ChildGateway, TestGateway, Upstream, admin_get, eventually, get, metric, node, yaml,
};

/// A filter's plugin entry; quarantine off unless `extra` sets it.
fn filter(name: &str, module: &str, extra: Value) -> Value {
    let mut entry = json!({"name": name, "module": module, "quarantine": {"traps": 0}});
    for (key, value) in extra.as_object().expect("an object") {
        entry[key] = value.clone();
    }
    entry
}

fn route(id: &str, uri: &str, plugins: Value) -> Value {
    json!({"id": id, "uri": uri, "upstream_id": "u", "plugins": plugins})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdks_http_headers_example_answers_hello_and_passes_the_rest() {
    let up = Upstream::start("u").await;
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "u", "nodes": [node(&up)]}],
        "plugins": [filter("headers", FILTER_HTTP_HEADERS, json!({"grants": {"log": true}}))],
        "routes": [route("all", "/*", json!([{"name": "headers"}]))],
    })))
    .await;
    let hello = get(&gateway.url("/hello")).await;
    assert_eq!(hello.status, StatusCode::OK);
    assert_eq!(hello.text(), "Hello, World!\n");
    assert_eq!(hello.header("hello"), Some("World"));
    assert_eq!(hello.header("powered-by"), Some("proxy-wasm"));
    assert_eq!(up.hits(), 0, "a local response never reaches the upstream");
    let other = get(&gateway.url("/other?x=1")).await;
    assert_eq!(other.status, StatusCode::OK, "{}", other.text());
    assert_eq!(other.json()["path"], "/other", "{}", other.text());
    assert_eq!(up.hits(), 1);
    // The status page says what kind of plugin it is.
    let status = admin_get(&gateway.admin_url("/v1/status")).await.json();
    let plugin = &status["plugins"][0];
    assert_eq!(plugin["kind"], "proxy-wasm", "{status}");
    assert_eq!(plugin["world"], "0.2.1", "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdks_http_config_example_reads_the_routes_config() {
    let up = Upstream::start("u").await;
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "u", "nodes": [node(&up)]}],
        "plugins": [filter("config", FILTER_HTTP_CONFIG, json!({}))],
        "routes": [
            route("a", "/a", json!([{"name": "config", "config": "from route a"}])),
            route("b", "/b", json!([{"name": "config", "config": {"json": true}}])),
        ],
    })))
    .await;
    let a = get(&gateway.url("/a")).await;
    assert_eq!(a.header("custom-header"), Some("from route a"));
    // Config that is not a string reaches the filter as its JSON text.
    let b = get(&gateway.url("/b")).await;
    assert_eq!(b.header("custom-header"), Some(r#"{"json":true}"#));
}

/// A gateway with http_auth_random in front of `u`, whose `httpbin` cluster answers `byte`.
async fn auth_random(up: &Upstream, byte: &'static [u8]) -> (TestGateway, Upstream) {
    let httpbin = Upstream::start_with(
        "httpbin",
        Behaviour {
            body: Some(bytes::Bytes::from_static(byte)),
            ..Default::default()
        },
    )
    .await;
    let granted = format!("127.0.0.1:{}", httpbin.port());
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [
            {"id": "u", "nodes": [node(up)]},
            {"id": "httpbin", "nodes": [node(&httpbin)]},
        ],
        "plugins": [filter("auth", FILTER_HTTP_AUTH_RANDOM, json!({"grants": {"log": true, "http": {"hosts": [granted]}}}))],
        "routes": [route("all", "/*", json!([{"name": "auth"}]))],
    })))
    .await;
    (gateway, httpbin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdks_http_auth_random_example_pauses_for_its_call_then_resumes_or_answers() {
    let up = Upstream::start("u").await;
    // An even first byte lets the request through, once the call has answered.
    let (gateway, httpbin) = auth_random(&up, b"2").await;
    let allowed = get(&gateway.url("/x")).await;
    assert_eq!(allowed.status, StatusCode::OK, "{}", allowed.text());
    assert_eq!(allowed.header("powered-by"), Some("proxy-wasm"));
    assert_eq!((httpbin.hits(), up.hits()), (1, 1));
    // An odd one answers 403 from the callback, and the upstream is never called.
    let (gateway, httpbin) = auth_random(&up, b"1").await;
    let denied = get(&gateway.url("/x")).await;
    assert_eq!(denied.status, StatusCode::FORBIDDEN);
    assert_eq!(denied.text(), "Access forbidden.\n");
    assert_eq!((httpbin.hits(), up.hits()), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdks_hello_world_example_ticks_and_logs() {
    let up = Upstream::start("u").await;
    let child = ChildGateway::start(&yaml(json!({
        "upstreams": [{"id": "u", "nodes": [node(&up)]}],
        "plugins": [filter("hello", FILTER_HELLO_WORLD, json!({"grants": {"log": true, "wasi": ["clocks", "random"]}}))],
        "routes": [route("all", "/*", json!([{"name": "hello"}]))],
    })))
    .await;
    eventually(
        "hello_world's vm start log line",
        Duration::from_secs(30),
        || {
            let log = child.log();
            async move { log.contains("Hello, World!") }
        },
    )
    .await;
    // Its root context asked for a tick every 5 s; each one logs the time and a random number.
    eventually("hello_world's first tick", Duration::from_secs(30), || {
        let log = child.log();
        async move { log.contains("your lucky number is") }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_data_counts_with_cas_queues_deliver_and_metrics_export() {
    let up = Upstream::start("u").await;
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "u", "nodes": [node(&up)]}],
        "tenants": [{"name": "a"}, {"name": "b"}],
        "plugins": [
            filter("counter", FILTER_WEIR, json!({"tenant": "a", "grants": {"kv": true, "metrics": true}})),
            filter("reader-a", FILTER_WEIR, json!({"tenant": "a", "grants": {"kv": true}})),
            filter("reader-b", FILTER_WEIR, json!({"tenant": "b", "grants": {"kv": true}})),
        ],
        "routes": [
            route("count", "/count", json!([{"name": "counter", "config": {"mode": "shared", "key": "hits"}}])),
            route("read-a", "/read-a", json!([{"name": "reader-a", "config": {"mode": "shared-read", "key": "hits"}}])),
            route("read-b", "/read-b", json!([{"name": "reader-b", "config": {"mode": "shared-read", "key": "hits"}}])),
        ],
    })))
    .await;
    for n in 1..=3 {
        let reply = get(&gateway.url("/count")).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(reply.header("x-count"), Some(n.to_string().as_str()));
        if n > 1 {
            // A write with the CAS value read before the last write is refused.
            assert_eq!(reply.header("x-stale-cas"), Some("refused"));
        }
        assert_eq!(reply.header("x-queue"), Some("enqueued"));
    }
    // The root context of the control instance is told the queue has items, and records the
    // last one in shared data.
    let url = gateway.url("/count");
    eventually(
        "the queue to be drained by on_queue_ready",
        Duration::from_secs(10),
        || {
            let url = url.clone();
            async move { get(&url).await.header("x-last-dequeued") == Some("/count") }
        },
    )
    .await;
    // The tenant's other filter sees the data; another tenant's does not.
    let same_tenant = get(&gateway.url("/read-a")).await;
    let count: u64 = same_tenant.header("x-shared").unwrap().parse().unwrap();
    assert!(count >= 4, "{count}");
    let other_tenant = get(&gateway.url("/read-b")).await;
    assert_eq!(other_tenant.header("x-shared"), Some("missing"));
    // Metrics, under the plugin's label.
    let metrics = gateway.admin_url("/metrics");
    let requests = metric(
        &metrics,
        r#"weir_plugin_events_total{plugin="counter",name="weir_filter_requests"}"#,
    )
    .await;
    assert!(requests >= 4.0, "{requests}");
    let gauge = metric(
        &metrics,
        r#"weir_plugin_gauges{plugin="counter",name="weir_filter_last_count"}"#,
    )
    .await;
    assert!(gauge >= 4.0, "{gauge}");
    let recorded = metric(
        &metrics,
        r#"weir_plugin_values_count{plugin="counter",name="weir_filter_path_bytes"}"#,
    )
    .await;
    assert!(recorded >= 4.0, "{recorded}");
}

/// A gateway where weir-filter runs in each hostile mode, fail-closed, with a 50 ms deadline.
async fn hostile(up: &Upstream, quarantine: Value) -> TestGateway {
    let entry = |name: &str, extra: Value| {
        let mut e = filter(
            name,
            FILTER_WEIR,
            json!({"limits": {"timeout_ms": 50, "memory_mb": 16}, "quarantine": quarantine}),
        );
        for (k, v) in extra.as_object().unwrap() {
            e[k] = v.clone();
        }
        e
    };
    TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "u", "nodes": [node(up)]}],
        "plugins": [
            entry("hostile", json!({})),
            entry("ticker", json!({})),
            entry("caller", json!({"grants": {"http": {"hosts": ["127.0.0.1:9"]}}})),
        ],
        "routes": [
            {"id": "ok", "uri": "/ok", "upstream_id": "u"},
            route("loop", "/loop", json!([{"name": "hostile", "config": {"mode": "loop-headers"}}])),
            route("grow", "/grow", json!([{"name": "hostile", "config": {"mode": "grow", "mb": 64}}])),
            route("trap", "/trap", json!([{"name": "hostile", "config": {"mode": "trap"}}])),
            route("crlf", "/crlf", json!([{"name": "hostile", "config": {"mode": "crlf"}}])),
            route("tick", "/tick", json!([{"name": "ticker", "config": {"mode": "loop-tick"}}])),
            route("callout", "/callout", json!([{"name": "caller", "config": {"mode": "callout", "cluster": "example.com:80", "path": "/"}}])),
        ],
    })))
    .await
}

fn failures(text: &str, route: &str, kind: &str) -> Option<f64> {
    let needle = format!(
        r#"weir_plugin_failures_total{{plugin="hostile",route="{route}",tenant="default",kind="{kind}"}} "#
    );
    text.lines()
        .find_map(|line| line.strip_prefix(&needle))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_filters_meet_the_deadline_the_memory_cap_and_the_header_checks() {
    let up = Upstream::start("u").await;
    let gateway = hostile(&up, json!({"traps": 0})).await;
    let ok_url = gateway.url("/ok");
    let neighbour = tokio::spawn(async move {
        let mut statuses = Vec::new();
        for _ in 0..30 {
            statuses.push(get(&ok_url).await.status);
        }
        statuses
    });
    for path in ["/loop", "/grow", "/trap"] {
        let reply = get(&gateway.url(path)).await;
        assert_eq!(
            reply.status,
            StatusCode::INTERNAL_SERVER_ERROR,
            "{path}: {}",
            reply.text()
        );
        assert_eq!(reply.json()["error"], "plugin hostile failed", "{path}");
    }
    let statuses = neighbour.await.unwrap();
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    let text = get(&gateway.admin_url("/metrics")).await.text();
    assert_eq!(failures(&text, "loop", "timeout"), Some(1.0), "{text}");
    assert_eq!(failures(&text, "grow", "memory"), Some(1.0), "{text}");
    assert_eq!(failures(&text, "trap", "trap"), Some(1.0), "{text}");
    // A CR LF in a header value is refused with BadArgument, as a component's edit is refused;
    // the filter goes on and answers.
    let crlf = get(&gateway.url("/crlf")).await;
    assert_eq!(
        crlf.header("x-crlf-status"),
        Some("BadArgument"),
        "{crlf:?}"
    );
    // A call to a host the grant does not list is refused when it is made.
    let refused = get(&gateway.url("/callout")).await;
    assert_eq!(refused.status, StatusCode::BAD_GATEWAY);
    assert_eq!(refused.header("x-callout-error"), Some("BadArgument"));
    // A tick that loops forever is stopped by the deadline, again and again, and the route
    // through the same filter keeps serving.
    let admin = gateway.admin_url("/metrics");
    eventually(
        "the looping tick to time out twice",
        Duration::from_secs(20),
        || {
            let admin = admin.clone();
            async move {
                let text = get(&admin).await.text();
                text.lines().any(|line| {
                    line.starts_with(r#"weir_plugin_failures_total{plugin="ticker",route=":root""#)
                        && line.contains(r#"kind="timeout""#)
                        && line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) >= Some(2.0)
                })
            }
        },
    )
    .await;
    let ticking = get(&gateway.url("/tick")).await;
    assert_eq!(ticking.status, StatusCode::OK);
    assert_eq!(ticking.header("x-ticking"), Some("yes"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_that_keeps_trapping_is_quarantined() {
    let up = Upstream::start("u").await;
    let gateway = hostile(
        &up,
        json!({"traps": 3, "window_ms": 60000, "backoff_ms": 60000}),
    )
    .await;
    for _ in 0..3 {
        assert_eq!(
            get(&gateway.url("/trap")).await.status,
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
    let status = admin_get(&gateway.admin_url("/v1/status")).await.json();
    let quarantined = status["quarantined"].as_array().unwrap();
    assert!(
        quarantined.iter().any(|q| q["plugin"] == "hostile"),
        "{status}"
    );
    // Quarantined, it is not called: the gateway answers 503 until the backoff ends.
    let text = get(&gateway.admin_url("/metrics")).await.text();
    let before = failures(&text, "trap", "trap");
    assert_eq!(
        get(&gateway.url("/trap")).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let text = get(&gateway.admin_url("/metrics")).await.text();
    assert_eq!(failures(&text, "trap", "trap"), before);
    assert_eq!(failures(&text, "trap", "quarantined"), Some(1.0), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn components_and_filters_mix_in_one_chain_and_see_each_others_edits_in_order() {
    let up = Upstream::start("u").await;
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "u", "nodes": [node(&up)]}],
        "plugins": [
            weir_tests::probe_entry("probe-1", json!({})),
            filter("tagger", FILTER_WEIR, json!({})),
            weir_tests::probe_entry("probe-2", json!({})),
        ],
        "routes": [route("mixed", "/mixed", json!([
            {"name": "probe-1", "config": {"mode": "chain", "tag": "c1"}},
            {"name": "tagger", "config": {"mode": "tag", "tag": "f"}},
            {"name": "probe-2", "config": {"mode": "chain", "tag": "c2"}},
        ]))],
    })))
    .await;
    assert_eq!(gateway.errors(), vec![]);
    let reply = get(&gateway.url("/mixed")).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    // On the way in, in chain order; on the way out, in reverse.
    assert_eq!(reply.json()["headers"]["x-chain"], "c1,f,c2");
    assert_eq!(reply.header("x-chain"), Some("c2,f,c1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_assemblyscript_filter_edits_headers_and_answers_locally() {
    let up = Upstream::start("u").await;
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "u", "nodes": [node(&up)]}],
        // Its runtime registers its root context under the empty root id.
        "plugins": [filter("as", FILTER_ASSEMBLYSCRIPT, json!({"root_id": "", "grants": {"log": true}}))],
        "routes": [route("all", "/*", json!([{"name": "as"}]))],
    })))
    .await;
    let passed = get(&gateway.url("/x")).await;
    assert_eq!(passed.status, StatusCode::OK, "{}", passed.text());
    assert_eq!(passed.json()["headers"]["x-as"], "hello");
    assert_eq!(passed.header("x-as-response"), Some("yes"));
    let local = get(&gateway.url("/as-local")).await;
    assert_eq!(local.status, StatusCode::FORBIDDEN);
    assert_eq!(local.text(), "denied by assemblyscript");
    assert_eq!(local.header("x-as-local"), Some("yes"));
    let status = admin_get(&gateway.admin_url("/v1/status")).await.json();
    assert_eq!(status["plugins"][0]["world"], "0.2.0", "{status}");
}

/// A gateway whose route `/body` answers `body` through the filter `module`, with a
/// `max_body_bytes` of 64 KiB.
async fn body_gateway(module: &str, body: &'static [u8]) -> (TestGateway, Upstream) {
    let up = Upstream::start_with(
        "u",
        Behaviour {
            body: Some(bytes::Bytes::from_static(body)),
            ..Default::default()
        },
    )
    .await;
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "u", "nodes": [node(&up)]}],
        "plugins": [filter("f", module, json!({"limits": {"max_body_bytes": 65536}, "grants": {"log": true}}))],
        "routes": [route("body", "/body", json!([{"name": "f"}]))],
    })))
    .await;
    (gateway, up)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdks_http_body_example_rewrites_a_response_body_it_held_to_the_end() {
    use weir_tests::plugins::FILTER_HTTP_BODY;
    let (gateway, _up) = body_gateway(FILTER_HTTP_BODY, b"this is a secret message").await;
    let reply = get(&gateway.url("/body")).await;
    assert_eq!(reply.status, StatusCode::OK);
    let text = reply.text();
    assert_eq!(text, "Original message body (24 bytes) redacted.\n");
    // It removed the upstream's content-length: the answer is framed by its new length, set by
    // the gateway when the body had all arrived with its head, or else by chunks.
    let length = reply.header("content-length");
    assert!(
        length.is_none_or(|length| length == text.len().to_string()),
        "content-length {length:?} for {} bytes",
        text.len()
    );
    let (gateway, _up) = body_gateway(FILTER_HTTP_BODY, b"nothing to hide").await;
    assert_eq!(get(&gateway.url("/body")).await.text(), "nothing to hide");
}

/// 4 MiB of a repeated pattern, a body far over the filters' 64 KiB `max_body_bytes`.
static LARGE: std::sync::LazyLock<Vec<u8>> =
    std::sync::LazyLock::new(|| (0..4u32 << 20).map(|i| b'a' + (i % 26) as u8).collect());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_streams_through_a_filter_that_passes_each_chunk_and_is_never_buffered() {
    // http_headers has the SDK's body callbacks, which pass every chunk on: 4 MiB goes
    // through a filter bounded to 64 KiB, so nothing held it whole.
    let large: &'static [u8] = LARGE.as_slice();
    let (gateway, _up) = body_gateway(FILTER_HTTP_HEADERS, large).await;
    let reply = get(&gateway.url("/body")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body.len(), large.len());
    assert!(reply.body == large, "the body came through changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_that_holds_a_body_past_its_max_body_bytes_cuts_the_answer() {
    use weir_tests::plugins::FILTER_HTTP_BODY;
    // http_body holds every chunk until the end: past 64 KiB the filter fails, closed, and the
    // answer, whose head has gone, is cut rather than sent whole.
    let large: &'static [u8] = LARGE.as_slice();
    let (gateway, _up) = body_gateway(FILTER_HTTP_BODY, large).await;
    let request = weir_tests::request(http::Method::GET, &gateway.url("/body"))
        .body(http_body_util::Full::<bytes::Bytes>::default())
        .unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let response = client.request(request).await.unwrap();
    use http_body_util::BodyExt;
    let read = response.into_body().collect().await;
    assert!(read.is_err(), "a body held past its bound came whole");
    let text = get(&gateway.admin_url("/metrics")).await.text();
    assert!(
        text.contains(
            r#"weir_plugin_failures_total{plugin="f",route="body",tenant="default",kind="limit"}"#
        ),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_pushed_to_etcd_serves_and_swaps_under_load_without_a_failed_request() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use weir::client::{PushSettings, push_plugin};
    use weir::store::etcd::EtcdOptions;
    use weir_tests::plugins::FILTER_WEIR_B;

    let etcd = weir_tests::etcd::Etcd::start().await;
    let up = Upstream::start("u").await;
    etcd.put(
        "/weir/upstreams/u",
        json!({"nodes": [{"host": "127.0.0.1", "port": up.port()}]}),
    )
    .await;
    let options = EtcdOptions::new(vec![etcd.url.clone()]);
    let push = |file: &'static str| {
        let options = options.clone();
        async move {
            let bytes = std::fs::read(file).expect("a built filter");
            push_plugin(&options, "versioned", &bytes, &PushSettings::default())
                .await
                .expect("push")
                .sha256
        }
    };
    let sha_a = push(FILTER_WEIR).await;
    etcd.put(
        "/weir/routes/v",
        json!({"uri": "/v", "upstream_id": "u", "plugins": [{"name": "versioned", "config": {"mode": "version"}}]}),
    )
    .await;
    let gateway = TestGateway::start_etcd(&etcd.url, None).await;
    let url = gateway.url("/v");
    let version = |url: String| async move {
        get(&url)
            .await
            .header("x-filter-version")
            .map(str::to_owned)
    };
    assert_eq!(version(url.clone()).await.as_deref(), Some("a"));

    let stop = Arc::new(AtomicBool::new(false));
    let (served, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (url, stop, served, failed) =
            (url.clone(), stop.clone(), served.clone(), failed.clone());
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let reply = get(&url).await;
                let ok = reply.status == StatusCode::OK
                    && matches!(reply.header("x-filter-version"), Some("a" | "b"));
                if ok { &served } else { &failed }.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let sha_b = push(FILTER_WEIR_B).await;
    assert_ne!(sha_a, sha_b);
    eventually("version b serves", Duration::from_secs(30), || {
        version(url.clone()).map(|v| v.as_deref() == Some("b"))
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0);
    assert!(
        served.load(Ordering::Relaxed) > 20,
        "only {served:?} requests ran"
    );
    let status = admin_get(&gateway.admin_url("/v1/status")).await.json();
    assert_eq!(status["plugins"][0]["sha256"], sha_b.as_str(), "{status}");
    assert_eq!(status["plugins"][0]["kind"], "proxy-wasm", "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_data_on_redis_counts_across_gateways_with_cas() {
    let redis = weir_tests::redis::Redis::start().await;
    let up = Upstream::start("u").await;
    let config = yaml(json!({
        "server": {"redis_url": redis.url},
        "upstreams": [{"id": "u", "nodes": [node(&up)]}],
        "plugins": [filter("counter", FILTER_WEIR, json!({"grants": {"kv": true, "metrics": true}, "kv": {"backend": "redis"}}))],
        "routes": [route("count", "/count", json!([{"name": "counter", "config": {"mode": "shared", "key": "hits"}}]))],
    }));
    let (one, two) = (
        TestGateway::start(&config).await,
        TestGateway::start(&config).await,
    );
    assert_eq!(one.errors(), vec![]);
    for (n, gateway) in [&one, &two, &one, &two].into_iter().enumerate() {
        let reply = get(&gateway.url("/count")).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        // One counter, whichever gateway counts: the compare-and-swap is Redis's.
        assert_eq!(reply.header("x-count"), Some((n + 1).to_string().as_str()));
        if n > 0 {
            assert_eq!(reply.header("x-stale-cas"), Some("refused"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_request_whose_client_goes_away_frees_its_context() {
    use tokio::io::AsyncWriteExt;
    let up = Upstream::start("u").await;
    // The call the filter waits on never answers while the test runs.
    let (slow, _gate) = Upstream::gated("slow").await;
    let granted = format!("127.0.0.1:{}", slow.port());
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "u", "nodes": [node(&up)]}, {"id": "slow", "nodes": [node(&slow)]}],
        "tenants": [{"name": "t"}],
        "plugins": [filter("waiter", FILTER_WEIR, json!({
            "tenant": "t", "isolation": "per-request",
            "grants": {"http": {"hosts": [granted], "timeout_ms": 60000}},
        }))],
        "routes": [route("paused", "/paused", json!([{"name": "waiter", "config": {"mode": "callout", "cluster": "slow", "path": "/"}}]))],
    })))
    .await;
    let admin = gateway.admin_url("/v1/status");
    let instances = |admin: String| async move {
        let status = admin_get(&admin).await.json();
        status["tenants"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == "t")
            .map(|t| t["usage"]["instances"].as_u64().unwrap())
    };
    assert_eq!(instances(admin.clone()).await, Some(0));
    let mut client = tokio::net::TcpStream::connect(gateway.addr())
        .await
        .unwrap();
    client
        .write_all(b"GET /paused HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    eventually(
        "the paused request to hold its instance",
        Duration::from_secs(10),
        || instances(admin.clone()).map(|n| n == Some(1)),
    )
    .await;
    eventually(
        "the filter's call to reach the held upstream",
        Duration::from_secs(10),
        || {
            let hits = slow.hits();
            async move { hits == 1 }
        },
    )
    .await;
    drop(client);
    eventually(
        "the instance to go with the client",
        Duration::from_secs(10),
        || instances(admin.clone()).map(|n| n == Some(0)),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_check_tells_a_filter_by_its_bytes_and_its_wasi_grants() {
    use weir::authoring::check;
    use weir::config::Grants;
    use weir::plugin::grants::Verdict;
    let bytes = std::fs::read(FILTER_HTTP_HEADERS).unwrap();
    let report = check(bytes, &Grants::default()).await.unwrap();
    assert_eq!(report.kind, Some("proxy-wasm"));
    assert_eq!(report.abi, Some("0.2.1"));
    assert!(
        report
            .to_string()
            .contains("implements: proxy-wasm ABI 0.2.1"),
        "{report}"
    );
    // The SDK imports every host function: they load, and each checks its grant when called.
    assert!(report.loads.is_ok(), "{report}");
    assert!(
        report
            .imports
            .iter()
            .any(|i| i.import == "env.proxy_http_call")
    );
    // WASI is checked at load, as for a component.
    let bytes = std::fs::read(FILTER_HELLO_WORLD).unwrap();
    let report = check(bytes, &Grants::default()).await.unwrap();
    let random = report
        .imports
        .iter()
        .find(|i| i.import == "wasi_snapshot_preview1.random_get")
        .unwrap();
    assert_eq!(random.verdict, Verdict::NotGranted("wasi: [random]"));
    assert!(report.loads.is_err());
    // A core module that is no filter is refused with the reason.
    let report = check(b"\0asm\x01\0\0\0".to_vec(), &Grants::default())
        .await
        .unwrap();
    assert!(
        report
            .loads
            .unwrap_err()
            .contains("not a proxy-wasm filter"),
        "an empty core module"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_test_runs_a_filter_through_every_phase_and_its_body_callbacks() {
    use weir::authoring::{TestRequest, TestUpstream, run};
    use weir_tests::plugins::FILTER_HTTP_BODY;
    let grants = serde_json::from_value(json!({"log": true})).unwrap();
    let report = run(
        std::fs::read(FILTER_HTTP_BODY).unwrap(),
        "",
        grants,
        TestRequest {
            method: "GET".into(),
            target: "/doc".into(),
            headers: Vec::new(),
            body: Vec::new(),
            client_ip: "127.0.0.1".parse().unwrap(),
        },
        TestUpstream {
            status: 200,
            headers: vec![("content-type".into(), "text/plain".into())],
            body: b"the secret plan".to_vec(),
        },
    )
    .await
    .unwrap();
    assert!(!report.failed(), "{report:?}");
    assert!(
        report
            .response_edits
            .iter()
            .any(|edit| edit == "body Original message body (15 bytes) redacted.\n"),
        "{report:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_goes_through_a_filter_chunk_by_chunk_and_its_vm_config_reaches_it() {
    use http_body_util::StreamBody;
    let up = Upstream::start("u").await;
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "u", "nodes": [node(&up)]}],
        "plugins": [
            filter("upper", FILTER_WEIR, json!({})),
            filter("vm", FILTER_WEIR, json!({"vm_config": "from the entry"})),
        ],
        "routes": [
            route("upper", "/upper", json!([{"name": "upper", "config": {"mode": "upper-body"}}])),
            route("vm", "/vm", json!([{"name": "vm", "config": {"mode": "vm-config"}}])),
        ],
    })))
    .await;
    // Three chunks, sent as three frames of a chunked body.
    let chunks = ["first ", "second ", "third"]
        .map(|c| Ok::<_, std::convert::Infallible>(http_body::Frame::data(bytes::Bytes::from(c))));
    let request = weir_tests::request(http::Method::POST, &gateway.url("/upper"))
        .body(StreamBody::new(futures_util::stream::iter(chunks)))
        .unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let calls: u32 = response.headers()["x-body-calls"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    use http_body_util::BodyExt;
    let echo: Value =
        serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
    // The filter held every chunk to the end, then wrote the whole body once.
    assert_eq!(echo["body"], "FIRST SECOND THIRD", "{echo}");
    assert!(calls >= 2, "the body reached the filter in {calls} calls");
    let vm = get(&gateway.url("/vm")).await;
    assert_eq!(vm.header("x-vm-config"), Some("from the entry"));
}

/// Sends `n` GETs of `path`, each once the one before is held at `held` (a gated upstream):
/// theirs, or their filters' calls. One at a time, so that no request's callback ever finds
/// the instance busy with another's (one suspended at an epoch tick, on a loaded machine),
/// and the instance counts stay exact.
async fn held_gets(
    gateway: &TestGateway,
    path: &str,
    held: &Upstream,
    n: usize,
) -> Vec<tokio::task::JoinHandle<weir_tests::Reply>> {
    let mut requests = Vec::with_capacity(n);
    for sent in 1..=n {
        let url = gateway.url(path);
        requests.push(tokio::spawn(async move { get(&url).await }));
        eventually(
            &format!("{sent} requests to wait at the held upstream"),
            Duration::from_secs(10),
            || {
                let hits = held.hits();
                async move { hits == sent }
            },
        )
        .await;
    }
    requests
}

/// The instances tenant `t` has now, as the status page counts them.
async fn tenant_instances(gateway: &TestGateway) -> u64 {
    let status = admin_get(&gateway.admin_url("/v1/status")).await.json();
    let tenants = status["tenants"].as_array().expect("tenants");
    let tenant = tenants.iter().find(|t| t["name"] == "t").expect("tenant t");
    tenant["usage"]["instances"].as_u64().expect("a count")
}

// One worker thread, and requests sent one at a time: every call finds the shared instance
// free, requests never need a second one, and the counts below are exact.
#[tokio::test(flavor = "current_thread")]
async fn a_pooled_filters_requests_share_one_instance_whose_contexts_end_with_them() {
    let (up, gate) = Upstream::gated("u").await;
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "u", "nodes": [node(&up)]}],
        "tenants": [{"name": "t"}],
        "plugins": [filter("counter", FILTER_WEIR, json!({"tenant": "t"}))],
        "routes": [route("c", "/c", json!([{"name": "counter", "config": {"mode": "contexts"}}]))],
    })))
    .await;
    let before = tenant_instances(&gateway).await;
    let requests = held_gets(&gateway, "/c", &up, 4).await;
    // Four requests in flight, with an HTTP context each, and no instance made for them.
    assert_eq!(tenant_instances(&gateway).await, before);
    gate.open();
    let mut live = Vec::new();
    for request in requests {
        let reply = request.await.unwrap();
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        live.push(reply.header("x-live-contexts").unwrap_or("none").to_owned());
    }
    live.sort();
    assert_eq!(
        live,
        ["1", "2", "3", "4"],
        "each request saw the ones before it"
    );
    // Each context was deleted with its request.
    let after = get(&gateway.url("/c")).await;
    assert_eq!(after.header("x-live-contexts"), Some("1"));
}

#[tokio::test(flavor = "current_thread")]
async fn a_paused_filter_lends_its_instance_to_other_requests_while_its_call_is_out() {
    let up = Upstream::start("u").await;
    let (slow, gate) = Upstream::gated("slow").await;
    let granted = format!("127.0.0.1:{}", slow.port());
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "u", "nodes": [node(&up)]}, {"id": "slow", "nodes": [node(&slow)]}],
        "tenants": [{"name": "t"}],
        "plugins": [filter("waiter", FILTER_WEIR, json!({
            "tenant": "t",
            "grants": {"http": {"hosts": [granted], "timeout_ms": 60000}},
        }))],
        "routes": [route("paused", "/paused", json!([{"name": "waiter", "config": {"mode": "callout", "cluster": "slow", "path": "/"}}]))],
    })))
    .await;
    let before = tenant_instances(&gateway).await;
    let requests = held_gets(&gateway, "/paused", &slow, 3).await;
    // Each request paused its filter, and the next one still had the same instance.
    assert_eq!(tenant_instances(&gateway).await, before);
    gate.open();
    for request in requests {
        let reply = request.await.unwrap();
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        let headers = &reply.json()["headers"];
        assert_eq!(headers["x-callout-status"], "200", "{}", reply.text());
    }
    assert_eq!(up.hits(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_that_fails_open_on_the_request_is_left_out_of_the_rest_of_it() {
    let up = Upstream::start("u").await;
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "u", "nodes": [node(&up)]}],
        "plugins": [filter("hostile", FILTER_WEIR, json!({"failure": "open"}))],
        "routes": [route("trap", "/trap", json!([{"name": "hostile", "config": {"mode": "trap"}}]))],
    })))
    .await;
    let reply = get(&gateway.url("/trap")).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let text = get(&gateway.admin_url("/metrics")).await.text();
    assert_eq!(failures(&text, "trap", "trap"), Some(1.0), "{text}");
    // Its context went with the instance that trapped: its later phases are not called, and
    // are no failure of their own.
    assert_eq!(failures(&text, "trap", "context_lost"), None, "{text}");
}

/// A gateway in front of the tonic echo service, whose route `echo` runs `filter_config` in
/// weir-filter (plugin entry `name`, with `extra`), and a tonic client of it.
async fn grpc_through_filter(
    name: &str,
    extra: Value,
    filter_config: Value,
) -> (
    TestGateway,
    weir_tests::grpc::echo::echo_client::EchoClient<tonic::transport::Channel>,
) {
    let server = weir_tests::grpc::echo_server().await;
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "u", "scheme": "grpc", "nodes": [{"host": "127.0.0.1", "port": server.port()}]}],
        "plugins": [filter(name, FILTER_WEIR, extra)],
        "routes": [route("echo", "/weir.test.Echo/*", json!([{"name": name, "config": filter_config}]))],
    })))
    .await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", gateway.addr()))
        .unwrap()
        .connect()
        .await
        .expect("an h2c connection to weir");
    let client = weir_tests::grpc::echo::echo_client::EchoClient::new(channel);
    (gateway, client)
}

/// An echo request: `message`, `count` replies for a stream, ending in error `fail` if any.
fn ask(message: &str, count: u32, fail: &str) -> weir_tests::grpc::echo::EchoRequest {
    weir_tests::grpc::echo::EchoRequest {
        message: message.into(),
        count,
        fail: fail.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_reads_a_grpc_answers_status_in_its_trailers_and_adds_its_own() {
    let (_gateway, mut echo) =
        grpc_through_filter("trailers", json!({}), json!({"mode": "trailers"})).await;

    // A unary call: tonic reads the trailers into the reply's metadata.
    let reply = echo.unary(ask("hi", 0, "")).await.expect("unary");
    let metadata = reply.metadata();
    let text = |name: &str| metadata.get(name).map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(reply.get_ref().message, "hi");
    assert_eq!(
        text("x-grpc-status-seen").as_deref(),
        Some("0"),
        "{metadata:?}"
    );
    assert_eq!(
        text("x-response-trailers-seen").as_deref(),
        Some("1"),
        "{metadata:?}"
    );
    // `connection` is no trailer: refused, and not sent.
    assert_eq!(
        text("x-refused").as_deref(),
        Some("BadArgument"),
        "{metadata:?}"
    );
    assert_eq!(text("connection"), None, "{metadata:?}");
    // In the headers' callback there are no trailers yet, and nothing to edit.
    assert_eq!(
        text("x-trailers-in-headers").as_deref(),
        Some("0/NotFound"),
        "{metadata:?}"
    );

    // A stream that ends in an error: the status the filter read is the server's.
    let mut stream = echo
        .server_stream(ask("n", 2, "boom"))
        .await
        .expect("the stream's head")
        .into_inner();
    let mut replies = 0;
    let status = loop {
        match stream.message().await {
            Ok(Some(_)) => replies += 1,
            Ok(None) => panic!("the stream ended without its error"),
            Err(status) => break status,
        }
    };
    assert_eq!(replies, 2);
    assert_eq!(status.code(), tonic::Code::Aborted, "{status:?}");
    assert_eq!(status.message(), "boom");
    let trailers = status.metadata();
    let seen = trailers
        .get("x-grpc-status-seen")
        .map(|v| v.to_str().unwrap());
    assert_eq!(seen, Some("10"), "{trailers:?}");
    let server_own = trailers.get("x-trailer").map(|v| v.to_str().unwrap());
    assert_eq!(server_own, Some("from-the-server"), "{trailers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_that_traps_on_the_trailers_is_skipped_or_cuts_the_answer_as_its_policy_says() {
    // Open: the trailers go on as they came, and the trap is counted.
    let (gateway, mut echo) = grpc_through_filter(
        "hostile",
        json!({"failure": "open"}),
        json!({"mode": "trap-trailers"}),
    )
    .await;
    let reply = echo.unary(ask("hi", 0, "")).await.expect("unary");
    assert_eq!(reply.get_ref().message, "hi");
    let text = get(&gateway.admin_url("/metrics")).await.text();
    assert_eq!(failures(&text, "echo", "trap"), Some(1.0), "{text}");
    // Closed: the answer is cut before its trailers, so the client has no status from the
    // server: the stream is reset, which tonic reads as `Internal`.
    let (_gateway, mut echo) = grpc_through_filter(
        "hostile",
        json!({"failure": "closed"}),
        json!({"mode": "trap-trailers"}),
    )
    .await;
    let status = echo.unary(ask("hi", 0, "")).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_edits_request_trailers_within_the_edges_rules() {
    use http_body_util::BodyExt;
    let up = Upstream::start("u").await;
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "u", "scheme": "grpc", "nodes": [node(&up)]}],
        "plugins": [filter("trailers", FILTER_WEIR, json!({}))],
        "routes": [{"id": "t", "uri": "/*", "upstream_id": "u", "request_trailers": ["x-checksum"],
                    "plugins": [{"name": "trailers", "config": {"mode": "trailers"}}]}],
    })))
    .await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let mut trailers = http::HeaderMap::new();
    for (name, value) in [
        ("x-checksum", "abc"),
        ("grpc-previous-rpc-attempts", "1"),
        ("x-other", "dropped at the edge"),
        ("x-consumer-username", "admin"),
    ] {
        trailers.insert(name, value.parse().unwrap());
    }
    let frames = [
        Ok::<_, std::convert::Infallible>(http_body::Frame::data(bytes::Bytes::from_static(b"hi"))),
        Ok(http_body::Frame::trailers(trailers)),
    ];
    let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
    let request = weir_tests::request(http::Method::POST, &gateway.url("/x"))
        .body(body)
        .unwrap();
    let reply = client.request(request).await.unwrap();
    assert_eq!(reply.status(), StatusCode::OK);
    let bytes = reply.into_body().collect().await.unwrap().to_bytes();
    let echo: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(echo["body"], "hi", "{echo}");
    // The filter saw what the edge let through, edited it, and could add neither the
    // gateway's consumer header nor a value with CR LF.
    assert_eq!(
        echo["trailers"],
        json!({
            "grpc-previous-rpc-attempts": "1",
            "x-checksum": "ABC",
            "x-request-trailers-seen": "2:grpc-previous-rpc-attempts,x-checksum",
            "x-refused": "BadArgument,BadArgument",
        }),
        "{echo}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_run_in_one_entry_each_get_the_whole_deadline() {
    // `proxy_on_done`, `proxy_on_log` and `proxy_on_delete` run in one entry into the guest,
    // each spinning 40 ms under a 100 ms deadline: together they would overrun it.
    let up = Upstream::start("u").await;
    let entry = filter(
        "hostile",
        FILTER_WEIR,
        json!({"limits": {"timeout_ms": 100}, "grants": {"clock": true}}),
    );
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "u", "nodes": [node(&up)]}],
        "plugins": [entry],
        "routes": [route("spin", "/spin", json!([{"name": "hostile", "config": {"mode": "spin-end", "ms": 40}}]))],
    })))
    .await;
    // Each request's headers say how many ends its instance had finished; an end that ran out
    // of time takes the instance (and its count) with it, and is counted as a failure.
    for _ in 0..50 {
        let reply = get(&gateway.url("/spin")).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        let text = get(&gateway.admin_url("/metrics")).await.text();
        assert_eq!(failures(&text, "spin", "timeout"), None, "{text}");
        let ends: u64 = reply.header("x-ends").unwrap().parse().unwrap();
        if ends > 0 {
            return;
        }
    }
    panic!("no request's end finished in its instance");
}
