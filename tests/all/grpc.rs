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
        "server": {"tracing": {}},
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
    // Under `server.tracing`, the trace id too, as the client's trace sent it.
    let client_trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let (_, headers, _) = call(
        &gateway.url("/down.Service/Call"),
        &[("traceparent", client_trace)],
    )
    .await;
    assert_eq!(headers["x-trace-id"], "4bf92f3577b34da6a3ce929d0e0e4736");

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
        // A request trailer other than grpc-* goes upstream only where the route allows it.
        "routes": [{"id": "echo", "uri": "/echo.Service/*", "upstream_id": "echo",
                    "request_trailers": ["x-client-trailer"],
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

mod tonic_peers {
    //! A tonic client and a tonic server with weir between them: every kind of call, metadata
    //! both ways, an error status, a 1 MiB message, the gateway's own error, and a route whose
    //! plugin buffers both bodies.

    use futures_util::StreamExt;
    use serde_json::json;
    use tonic::Code;
    use tonic::transport::Channel;
    use weir_tests::grpc::echo::echo_client::EchoClient;
    use weir_tests::grpc::echo::{EchoReply, EchoRequest};
    use weir_tests::grpc::echo_server;
    use weir_tests::{TestGateway, yaml};

    fn ask(message: &str) -> EchoRequest {
        EchoRequest {
            message: message.into(),
            ..EchoRequest::default()
        }
    }

    async fn client(gateway: &TestGateway) -> EchoClient<Channel> {
        let channel = Channel::from_shared(format!("http://{}", gateway.addr()))
            .unwrap()
            .connect()
            .await
            .expect("an h2c connection to weir");
        EchoClient::new(channel)
            .max_decoding_message_size(8 << 20)
            .max_encoding_message_size(8 << 20)
    }

    async fn gateway_for(port: u16, plugins: serde_json::Value) -> TestGateway {
        TestGateway::start(&yaml(json!({
            "upstreams": [{"id": "echo", "scheme": "grpc", "nodes": [{"host": "127.0.0.1", "port": port}]}],
            "plugins": [weir_tests::probe_entry("probe", json!({}))],
            "routes": [{"id": "echo", "uri": "/weir.test.Echo/*", "upstream_id": "echo",
                        "plugins": plugins}],
        })))
        .await
    }

    /// Every kind of call through `gateway`, checked end to end. `interleaved`: the
    /// bidirectional call waits for each answer before it sends the next message (which a
    /// route that buffers the whole request body cannot do).
    async fn every_kind_of_call(gateway: &TestGateway, interleaved: bool) {
        let mut echo = client(gateway).await;

        let mut request = tonic::Request::new(ask("hello"));
        request
            .metadata_mut()
            .insert("x-client-meta", "from-the-client".parse().unwrap());
        let response = echo.unary(request).await.expect("unary");
        assert_eq!(
            response.metadata().get("x-server-meta").unwrap(),
            "from-the-client"
        );
        assert_eq!(response.get_ref().message, "hello");

        let mut stream = echo
            .server_stream(EchoRequest {
                count: 5,
                ..ask("n")
            })
            .await
            .unwrap()
            .into_inner();
        let mut got = Vec::new();
        while let Some(reply) = stream.next().await {
            got.push(reply.unwrap().message);
        }
        assert_eq!(got, ["n 0", "n 1", "n 2", "n 3", "n 4"]);

        // Messages, then an error with trailing metadata: it comes in the HTTP/2 trailers.
        let mut stream = echo
            .server_stream(EchoRequest {
                count: 2,
                fail: "late".into(),
                ..ask("m")
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(stream.next().await.unwrap().unwrap().message, "m 0");
        assert_eq!(stream.next().await.unwrap().unwrap().message, "m 1");
        let status = stream.next().await.unwrap().unwrap_err();
        assert_eq!(status.code(), Code::Aborted);
        assert_eq!(status.message(), "late");
        assert_eq!(
            status.metadata().get("x-trailer").unwrap(),
            "from-the-server"
        );

        let outgoing = futures_util::stream::iter((0..10).map(|i| ask(&format!("c{i}"))));
        let joined = echo.client_stream(outgoing).await.unwrap().into_inner();
        assert_eq!(joined.message, "c0,c1,c2,c3,c4,c5,c6,c7,c8,c9");

        if interleaved {
            let (sender, receiver) = tokio::sync::mpsc::channel(1);
            let outgoing = tokio_stream_of(receiver);
            let mut replies = echo.bidi(outgoing).await.unwrap().into_inner();
            for i in 0..10 {
                // One at a time: each answer comes back before the next message goes.
                sender.send(ask(&format!("b{i}"))).await.unwrap();
                let reply: EchoReply = replies.next().await.unwrap().unwrap();
                assert_eq!(reply.message, format!("B{i}"));
            }
            drop(sender);
            assert!(replies.next().await.is_none());
        } else {
            let outgoing = futures_util::stream::iter((0..10).map(|i| ask(&format!("b{i}"))));
            let replies = echo.bidi(outgoing).await.unwrap().into_inner();
            let got: Vec<String> = replies.map(|r| r.unwrap().message).collect().await;
            let expected: Vec<String> = (0..10).map(|i| format!("B{i}")).collect();
            assert_eq!(got, expected);
        }

        let status = echo
            .unary(EchoRequest {
                fail: "boom: it failed".into(),
                ..ask("x")
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Aborted);
        assert_eq!(status.message(), "boom: it failed");
    }

    fn tokio_stream_of(
        mut receiver: tokio::sync::mpsc::Receiver<EchoRequest>,
    ) -> impl futures_util::Stream<Item = EchoRequest> {
        futures_util::stream::poll_fn(move |cx| receiver.poll_recv(cx))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_kind_of_call_goes_through() {
        let server = echo_server().await;
        let gateway = gateway_for(server.port(), json!([])).await;
        every_kind_of_call(&gateway, true).await;

        // A 1 MiB message each way.
        let payload = vec![0xA5u8; 1 << 20];
        let reply = client(&gateway)
            .await
            .unary(EchoRequest {
                payload: payload.clone(),
                ..ask("big")
            })
            .await
            .expect("a 1 MiB unary call");
        assert_eq!(reply.into_inner().payload, payload);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_kind_of_call_goes_through_a_plugin_that_buffers_both_bodies() {
        let server = echo_server().await;
        let gateway = gateway_for(
            server.port(),
            json!([{"name": "probe", "config": {"mode": "inspect"}}]),
        )
        .await;
        every_kind_of_call(&gateway, false).await;
        // The plugin did read the bodies it was given.
        let response = client(&gateway)
            .await
            .unary(ask("seen"))
            .await
            .expect("unary");
        let bytes: usize = response
            .metadata()
            .get("x-response-body-bytes")
            .unwrap()
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(bytes > 5, "the buffered reply: {bytes} bytes");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_reads_the_gateways_own_error_as_unavailable() {
        let dead = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let gateway = gateway_for(dead, json!([])).await;
        let status = client(&gateway)
            .await
            .unary(ask("anyone?"))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert_eq!(status.message(), "upstream unavailable");
    }
}

mod grpc_web {
    //! gRPC-Web from a browser (the wire format built here, over HTTP/1.1) to a tonic server
    //! that speaks only gRPC.

    use bytes::{Buf, Bytes};
    use http::{Method, StatusCode};
    use http_body_util::{BodyExt, Full};
    use prost::Message;
    use serde_json::json;
    use weir_tests::grpc::echo::{EchoReply, EchoRequest};
    use weir_tests::grpc::echo_server;
    use weir_tests::{TestGateway, request, yaml};

    /// One gRPC-Web frame: flag, length, payload.
    fn frame(flag: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![flag];
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// The frames of a gRPC-Web body, as (flag, payload).
    fn frames(mut body: Bytes) -> Vec<(u8, Bytes)> {
        let mut out = Vec::new();
        while body.has_remaining() {
            let flag = body.get_u8();
            let length = body.get_u32() as usize;
            out.push((flag, body.split_to(length)));
        }
        out
    }

    async fn call(
        gateway: &TestGateway,
        path: &str,
        message: EchoRequest,
    ) -> (StatusCode, http::HeaderMap, Vec<(u8, Bytes)>) {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<Full<Bytes>>();
        let body = frame(0, &message.encode_to_vec());
        let call = request(Method::POST, &gateway.url(path))
            .header("content-type", "application/grpc-web+proto")
            .header("x-grpc-web", "1")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let response = client.request(call).await.expect("a response");
        let (parts, body) = response.into_parts();
        let collected = body.collect().await.unwrap();
        assert!(
            collected.trailers().is_none(),
            "no HTTP trailers for a browser"
        );
        (parts.status, parts.headers, frames(collected.to_bytes()))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_grpc_web_call_gets_its_trailers_as_the_last_frame() {
        let server = echo_server().await;
        let gateway = TestGateway::start(&yaml(json!({
            "upstreams": [{"id": "echo", "scheme": "grpc", "nodes": [{"host": "127.0.0.1", "port": server.port()}]}],
            "routes": [{"id": "echo", "uri": "/weir.test.Echo/*", "upstream_id": "echo", "grpc_web": true}],
        })))
        .await;

        let ask = EchoRequest {
            message: "from a browser".into(),
            ..EchoRequest::default()
        };
        let (status, headers, frames) = call(&gateway, "/weir.test.Echo/Unary", ask).await;
        assert_eq!(status, StatusCode::OK);
        // tonic answers `application/grpc`, which becomes `application/grpc-web`.
        assert_eq!(headers["content-type"], "application/grpc-web");
        assert_eq!(frames.len(), 2, "a message, then the trailers: {frames:?}");
        assert_eq!(frames[0].0, 0);
        let reply = EchoReply::decode(frames[0].1.clone()).unwrap();
        assert_eq!(reply.message, "from a browser");
        assert_eq!(frames[1].0, 0x80);
        let trailers = String::from_utf8(frames[1].1.to_vec()).unwrap();
        assert!(trailers.contains("grpc-status:0\r\n"), "{trailers:?}");

        // Messages, then an error: its status and metadata are in the trailers frame.
        let ask = EchoRequest {
            message: "s".into(),
            count: 2,
            fail: "stop".into(),
            ..EchoRequest::default()
        };
        let (_, _, frames) = call(&gateway, "/weir.test.Echo/ServerStream", ask).await;
        assert_eq!(frames.len(), 3, "{frames:?}");
        let trailers = String::from_utf8(frames[2].1.to_vec()).unwrap();
        assert!(trailers.contains("grpc-status:10\r\n"), "{trailers:?}");
        assert!(trailers.contains("grpc-message:stop\r\n"), "{trailers:?}");
        assert!(
            trailers.contains("x-trailer:from-the-server\r\n"),
            "{trailers:?}"
        );
    }
}
