//! Routing: paths, methods, hosts, priority, strip_prefix, HTTP/2, and the 404 shape.

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::Full;
use serde_json::json;
use weir_tests::{TestGateway, Upstream, get, node, request, send, yaml};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_path_method_host_and_priority() {
    let (a, b, c) = (
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    );
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [
            {"id": "a", "nodes": [node(&a)]},
            {"id": "b", "nodes": [node(&b)]},
            {"id": "c", "nodes": [node(&c)]},
        ],
        "routes": [
            {"id": "exact", "uri": "/exact", "upstream_id": "a"},
            {"id": "prefix", "uri": "/api/*", "upstream_id": "b"},
            {"id": "param", "uri": "/users/{id}", "upstream_id": "c"},
            {"id": "post-only", "uri": "/api/items", "methods": ["POST"], "upstream_id": "c"},
            {"id": "hosted", "uri": "/api/*", "hosts": ["api.example.com"], "upstream_id": "c"},
            {"id": "low", "uri": "/p", "upstream_id": "a"},
            {"id": "high", "uri": "/p", "priority": 10, "upstream_id": "b"},
            {"id": "many", "uris": ["/one", "/two/*"], "upstream_id": "a"},
        ],
    })))
    .await;
    let upstream_of = |reply: weir_tests::Reply| reply.header("x-upstream").map(str::to_owned);

    assert_eq!(
        upstream_of(get(&gateway.url("/exact")).await).as_deref(),
        Some("a")
    );
    assert_eq!(
        upstream_of(get(&gateway.url("/api/anything/deep")).await).as_deref(),
        Some("b")
    );
    assert_eq!(
        upstream_of(get(&gateway.url("/api")).await).as_deref(),
        Some("b")
    );
    assert_eq!(
        upstream_of(get(&gateway.url("/users/42")).await).as_deref(),
        Some("c")
    );
    assert_eq!(
        upstream_of(get(&gateway.url("/api/items")).await).as_deref(),
        Some("b")
    );
    let post = weir_tests::send_body(Method::POST, &gateway.url("/api/items"), "x").await;
    assert_eq!(upstream_of(post).as_deref(), Some("c"));
    let hosted = send(
        request(Method::GET, &gateway.url("/api/x"))
            .header("host", "api.example.com:9080")
            .body(Full::<Bytes>::default())
            .unwrap(),
    )
    .await;
    assert_eq!(upstream_of(hosted).as_deref(), Some("c"));
    assert_eq!(
        upstream_of(get(&gateway.url("/p")).await).as_deref(),
        Some("b")
    );
    assert_eq!(
        upstream_of(get(&gateway.url("/one")).await).as_deref(),
        Some("a")
    );
    assert_eq!(
        upstream_of(get(&gateway.url("/two/x")).await).as_deref(),
        Some("a")
    );

    // The echo shows what the upstream received: path and query untouched.
    let echo = get(&gateway.url("/users/42?x=1&y=2")).await.json();
    assert_eq!(echo["path"], "/users/42");
    assert_eq!(echo["query"], "x=1&y=2");
    assert_eq!(echo["headers"]["x-forwarded-for"], "127.0.0.1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_route_is_a_json_404_with_the_request_id() {
    let gateway = TestGateway::start(&yaml(json!({}))).await;
    let reply = get(&gateway.url("/nowhere")).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let body = reply.json();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("no route matches GET /nowhere"),
        "{body}"
    );
    assert_eq!(body["request_id"].as_str().unwrap().len(), 36, "{body}");

    let reply = send(
        request(Method::GET, &gateway.url("/nowhere"))
            .header("x-request-id", "client-chosen-id")
            .body(Full::<Bytes>::default())
            .unwrap(),
    )
    .await;
    assert_eq!(reply.json()["request_id"], "client-chosen-id");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strip_prefix_removes_the_route_prefix_or_a_literal() {
    let up = Upstream::start("u").await;
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "u", "nodes": [node(&up)]}],
        "routes": [
            {"id": "svc", "uri": "/svc/*", "strip_prefix": true, "upstream_id": "u"},
            {"id": "lit", "uri": "/v2/api/*", "strip_prefix": "/v2", "upstream_id": "u"},
        ],
    })))
    .await;
    assert_eq!(
        get(&gateway.url("/svc/a/b?q=1")).await.json()["path"],
        "/a/b"
    );
    assert_eq!(get(&gateway.url("/svc")).await.json()["path"], "/");
    assert_eq!(
        get(&gateway.url("/v2/api/x")).await.json()["path"],
        "/api/x"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_http2_with_prior_knowledge() {
    let up = Upstream::start("u").await;
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "u", "nodes": [node(&up)]}],
        "routes": [{"id": "all", "uri": "/*", "upstream_id": "u"}],
    })))
    .await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let response = client
        .request(
            request(Method::GET, &gateway.url("/h2"))
                .body(Full::default())
                .unwrap(),
        )
        .await
        .expect("an HTTP/2 response");
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.status(), StatusCode::OK);
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    let echo: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(echo["path"], "/h2");
    // The upstream speaks HTTP/1.1 and still gets a Host header.
    assert!(
        echo["headers"]["host"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"),
        "{echo}"
    );
}

/// An h2c node that answers like a gRPC server: a body, then `grpc-status` in trailers, and
/// says which HTTP version and path it saw.
async fn grpc_like_node() -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::pin::Pin;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Poll};

    struct WithTrailers(Vec<http_body::Frame<Bytes>>);
    impl http_body::Body for WithTrailers {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
            let frames = &mut self.get_mut().0;
            Poll::Ready((!frames.is_empty()).then(|| Ok(frames.remove(0))))
        }
    }

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let connections = Arc::new(AtomicUsize::new(0));
    let counter = connections.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            let service = hyper::service::service_fn(
                |request: http::Request<hyper::body::Incoming>| async move {
                    let said = format!("{:?} {}", request.version(), request.uri().path());
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", "0".parse().unwrap());
                    let body = WithTrailers(vec![
                        http_body::Frame::data(Bytes::from(said)),
                        http_body::Frame::trailers(trailers),
                    ]);
                    Ok::<_, std::convert::Infallible>(http::Response::new(body))
                },
            );
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
            );
        }
    });
    (port, connections)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_upstream_gets_http2_and_its_trailers_come_back() {
    let (port, connections) = grpc_like_node().await;
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "g", "scheme": "grpc", "nodes": [{"host": "127.0.0.1", "port": port}]}],
        "routes": [{"id": "g", "uri": "/pkg.Service/*", "upstream_id": "g"}],
    })))
    .await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let calls = (0..10).map(|_| {
        let call = request(Method::POST, &gateway.url("/pkg.Service/Method"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
            .unwrap();
        client.request(call)
    });
    for response in futures_join(calls).await {
        let response = response.expect("a response");
        assert_eq!(response.status(), StatusCode::OK);
        let collected = http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap();
        assert_eq!(
            collected.trailers().and_then(|t| t.get("grpc-status")),
            Some(&http::HeaderValue::from_static("0"))
        );
        assert_eq!(collected.to_bytes(), "HTTP/2.0 /pkg.Service/Method");
    }
    // Ten concurrent calls share one HTTP/2 connection to the node.
    assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), 1);
}

/// Runs the futures concurrently and returns their outputs in order.
async fn futures_join<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut outputs = Vec::new();
    for handle in handles {
        outputs.push(handle.await.expect("a call task"));
    }
    outputs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugins_targets_are_tried_in_turn_each_with_its_own_edits() {
    use weir_tests::Behaviour;
    let answering = |status: StatusCode| Behaviour {
        status,
        ..Behaviour::default()
    };
    let busy = Upstream::start_with("busy", answering(StatusCode::TOO_MANY_REQUESTS)).await;
    let broken = Upstream::start_with("broken", answering(StatusCode::SERVICE_UNAVAILABLE)).await;
    let good = Upstream::start("good").await;
    let target = |upstream: &str, extra: serde_json::Value| {
        let mut target = json!({"upstream": upstream});
        for (key, value) in extra.as_object().unwrap() {
            target[key] = value.clone();
        }
        target
    };
    // Sixty headers per target: two targets set more than one call's header edits may.
    let sixty: serde_json::Map<String, serde_json::Value> =
        (0..60).map(|i| (format!("x-h{i}"), json!("v"))).collect();
    let route = |id: &str, targets: serde_json::Value| {
        json!({"id": id, "uri": format!("/{id}"), "upstream_id": "good",
               "plugins": [{"name": "fallback", "config": {"targets": targets}}]})
    };
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [
            {"id": "busy", "nodes": [node(&busy)]},
            {"id": "broken", "nodes": [node(&broken)]},
            {"id": "good", "nodes": [node(&good)]},
            // Nothing listens on port 1: the connection is refused.
            {"id": "dead", "nodes": [{"host": "127.0.0.1", "port": 1}], "retries": 0},
        ],
        "plugins": [{"name": "fallback", "module": weir_tests::plugins::FALLBACK,
                     "grants": {"routing": true}, "limits": {"max_body_bytes": 1024}}],
        "routes": [
            route("fall", json!([
                target("busy", json!({"set": {"x-key": "k1"}})),
                target("dead", json!({})),
                target("good", json!({"set": {"x-key": "k3"}, "path": "/v3/chat?stream=1"})),
            ])),
            route("bodied", json!([
                target("busy", json!({})),
                target("dead", json!({})),
                target("good", json!({"body": "for the third"})),
            ])),
            route("exhausted", json!([target("busy", json!({})), target("broken", json!({}))])),
            route("unknown", json!([target("good", json!({})), target("nope", json!({}))])),
            route("owned", json!([target("good", json!({"set": {"transfer-encoding": "chunked"}}))])),
            route("pathless", json!([target("good", json!({"path": "v1#frag"}))])),
            route("fragment", json!([target("good", json!({"path": "/v1?a=1#frag"}))])),
            route("split", json!([target("good", json!({"set": {"x-evil": "a\r\nx-injected: 1"}}))])),
            route("heavy", json!([target("good", json!({"body": "x".repeat(2048)}))])),
            route("many", json!(vec![target("good", json!({})); 9])),
            route("flood", json!(vec![target("good", json!({"set": sixty})); 2])),
        ],
    })))
    .await;

    // A request without a body goes to each in turn, with each one's edits.
    let reply = get(&gateway.url("/fall")).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.header("x-answered-by"), Some("2"));
    let echo = reply.json();
    assert_eq!(echo["upstream"], "good", "{echo}");
    assert_eq!(echo["path"], "/v3/chat", "{echo}");
    assert_eq!(echo["query"], "stream=1", "{echo}");
    assert_eq!(echo["headers"]["x-key"], "k3", "{echo}");
    assert_eq!(busy.hits(), 1);

    // A streaming body can be sent once: after the first target, only a target with a body of
    // its own is tried.
    let streamed = request(Method::POST, &gateway.url("/bodied"))
        .body(Full::new(Bytes::from_static(b"from the client")))
        .unwrap();
    let reply = send(streamed).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.header("x-answered-by"), Some("2"));
    assert_eq!(reply.json()["body"], "for the third", "{}", reply.text());
    assert_eq!(busy.hits(), 2);

    // When every target fails, the last one's answer is the client's.
    let reply = get(&gateway.url("/exhausted")).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.header("x-answered-by"), Some("1"));
    assert_eq!(broken.hits(), 1);

    // Bad targets are refused whole, with the reason, and nothing is sent.
    let hits = good.hits();
    for (path, reason) in [
        ("/unknown", "target 1: there is no upstream \"nope\""),
        (
            "/owned",
            "target 0: transfer-encoding is managed by the gateway",
        ),
        (
            "/pathless",
            "target 0: path \"v1#frag\" does not start with /",
        ),
        ("/fragment", "target 0: path \"/v1\" holds a #"),
        (
            "/split",
            "target 0: the value for x-evil has a forbidden character",
        ),
        (
            "/heavy",
            "target 0: a body of 2048 bytes is over this plugin's limit of 1024",
        ),
        ("/many", "9 targets: give 1 to 8"),
    ] {
        let reply = get(&gateway.url(path)).await;
        assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR, "{path}");
        assert_eq!(reply.text(), reason, "{path}");
    }
    // Headers a target sets come out of the call's budget of header edits: past it the call
    // fails, as a plugin that sets too many headers does.
    let reply = get(&gateway.url("/flood")).await;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        reply.json()["error"],
        "plugin fallback failed",
        "{}",
        reply.text()
    );
    assert_eq!(good.hits(), hits);
}
