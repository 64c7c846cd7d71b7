//! gRPC clients get gRPC statuses: a gateway error, or a plugin's answer, on a request whose
//! content-type is `application/grpc…` is a trailers-only response (HTTP 200 with
//! `grpc-status` and `grpc-message`), which a gRPC client can read; others still get JSON.

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use serde_json::json;
use weir_tests::{TestGateway, all_plugins, get, request, yaml};

/// An h2c call, as a gRPC client makes it; returns the status, headers and body bytes.
async fn call(url: &str, extra: &[(&str, &str)]) -> (StatusCode, http::HeaderMap, Bytes) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let mut builder = request(Method::POST, url)
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in extra {
        builder = builder.header(*name, *value);
    }
    let response = client
        .request(
            builder
                .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
                .unwrap(),
        )
        .await
        .expect("a response");
    let (parts, body) = response.into_parts();
    let collected = body.collect().await.expect("the body");
    assert!(
        collected.trailers().is_none(),
        "trailers-only: no separate trailers"
    );
    (parts.status, parts.headers, collected.to_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_errors_and_plugin_answers_reach_a_grpc_client_as_grpc_statuses() {
    // A port nothing listens on: the node is down.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "down", "scheme": "grpc", "nodes": [{"host": "127.0.0.1", "port": dead}]}],
        "plugins": all_plugins(),
        "routes": [
            {"id": "down", "uri": "/down.Service/*", "upstream_id": "down"},
            {"id": "guarded", "uri": "/guarded.Service/*", "upstream_id": "down",
             "plugins": [{"name": "key-auth", "config": {"keys": ["k"]}}]},
        ],
    })))
    .await;

    let (status, headers, body) = call(&gateway.url("/nowhere.Service/Call"), &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["grpc-status"], "5", "NOT_FOUND: {headers:?}");
    assert_eq!(headers["content-type"], "application/grpc");
    assert!(body.is_empty());

    let (status, headers, _) = call(&gateway.url("/down.Service/Call"), &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["grpc-status"], "14", "UNAVAILABLE: {headers:?}");
    assert_eq!(headers["grpc-message"], "upstream unavailable");
    assert!(headers.contains_key("x-request-id"));

    // key-auth answers 401 without a key: the client reads UNAUTHENTICATED.
    let (status, headers, body) = call(&gateway.url("/guarded.Service/Call"), &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["grpc-status"], "16", "UNAUTHENTICATED: {headers:?}");
    assert!(body.is_empty());

    // A client that is not gRPC still gets the JSON error.
    let plain = get(&gateway.url("/nowhere")).await;
    assert_eq!(plain.status, StatusCode::NOT_FOUND);
    assert!(plain.json()["error"].as_str().unwrap().contains("no route"));
}

/// Serves `answer` over h2c on a free loopback port; returns the port.
async fn h2c_node<F, Fut>(answer: F) -> u16
where
    F: Fn(http::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = http::Response<BoxBody<Bytes, std::convert::Infallible>>>
        + Send
        + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let answer = answer.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let answer = answer.clone();
                    async move { Ok::<_, std::convert::Infallible>(answer(request).await) }
                });
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
            });
        }
    });
    port
}

/// An h2c node that takes every call and never answers.
async fn silent_node() -> u16 {
    h2c_node(|_request| std::future::pending()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_timeout_bounds_the_wait_for_the_upstream() {
    let port = silent_node().await;
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "slow", "scheme": "grpc", "timeout": {"read_ms": 600000},
                       "nodes": [{"host": "127.0.0.1", "port": port}]}],
        "routes": [{"id": "slow", "uri": "/slow.Service/*", "upstream_id": "slow"}],
    })))
    .await;
    // The route would wait ten minutes; the client's deadline is 200 ms. The bound below is
    // not an expected time: it only says the answer did not wait for read_ms.
    let answer = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        call(
            &gateway.url("/slow.Service/Call"),
            &[("grpc-timeout", "200m")],
        ),
    )
    .await
    .expect("the client's grpc-timeout, not read_ms, bounds the wait");
    let (status, headers, _) = answer;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        headers["grpc-status"], "4",
        "DEADLINE_EXCEEDED: {headers:?}"
    );
    assert_eq!(headers["grpc-message"], "upstream timed out");
}

/// An h2c node that answers with the request's body, then trailers: `grpc-status: 0` and
/// `x-request-trailer`, the request's `x-client-trailer` trailer (or `none`).
async fn echo_node() -> u16 {
    h2c_node(|request: http::Request<hyper::body::Incoming>| async move {
        let collected = request.into_body().collect().await.unwrap();
        let seen = collected
            .trailers()
            .and_then(|t| t.get("x-client-trailer"))
            .map_or("none".to_owned(), |v| v.to_str().unwrap().to_owned());
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        trailers.insert("x-request-trailer", seen.parse().unwrap());
        let body = Full::new(collected.to_bytes())
            .with_trailers(async move { Some(Ok(trailers)) })
            .boxed();
        http::Response::builder()
            .header("content-type", "application/grpc")
            .body(body)
            .unwrap()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_survive_a_plugin_that_buffers_both_bodies() {
    let port = echo_node().await;
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "echo", "scheme": "grpc", "nodes": [{"host": "127.0.0.1", "port": port}]}],
        "plugins": [weir_tests::probe_entry("probe", json!({}))],
        "routes": [{"id": "echo", "uri": "/echo.Service/*", "upstream_id": "echo",
                    "plugins": [{"name": "probe", "config": {"mode": "body", "suffix": "!"}}]}],
    })))
    .await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<BoxBody<Bytes, std::convert::Infallible>>();
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-client-trailer", "t1".parse().unwrap());
    let body = Full::new(Bytes::from_static(b"hello"))
        .with_trailers(async move { Some(Ok(trailers)) })
        .boxed();
    let call = request(Method::POST, &gateway.url("/echo.Service/Echo"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body)
        .unwrap();
    let response = client.request(call).await.expect("a response");
    assert_eq!(response.status(), StatusCode::OK);
    let collected = response.into_body().collect().await.unwrap();
    let trailers = collected
        .trailers()
        .cloned()
        .expect("the upstream's trailers");
    // The plugin changed both bodies, and both sets of trailers went through.
    assert_eq!(collected.to_bytes(), "HELLO!");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["x-request-trailer"], "t1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstreams_trailers_only_error_reaches_the_client_intact() {
    // A gRPC server's error with no message: grpc-status in the only HEADERS frame.
    let port = h2c_node(|_request| async {
        http::Response::builder()
            .header("content-type", "application/grpc")
            .header("grpc-status", "14")
            .header("grpc-message", "backend%20down")
            .body(Full::new(Bytes::new()).boxed())
            .unwrap()
    })
    .await;
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "g", "scheme": "grpc", "nodes": [{"host": "127.0.0.1", "port": port}]}],
        "routes": [{"id": "g", "uri": "/g.Service/*", "upstream_id": "g"}],
    })))
    .await;
    let (status, headers, body) = call(&gateway.url("/g.Service/Call"), &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["grpc-status"], "14", "{headers:?}");
    assert_eq!(headers["grpc-message"], "backend%20down");
    assert!(body.is_empty(), "no message: {body:?}");
}
