//! Balancing across nodes: weighted round robin, consistent hash, least-connections, retries
//! and timeouts.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::Full;
use serde_json::json;
use weir_tests::{
    Behaviour, BlackHole, TestGateway, Upstream, eventually, get, metric, node, request, send,
    send_body, yaml,
};

/// A loopback port with nothing listening on it.
async fn closed_port() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_follows_weights() {
    let (heavy, light) = (
        Upstream::start("heavy").await,
        Upstream::start("light").await,
    );
    let mut heavy_node = node(&heavy);
    heavy_node["weight"] = json!(3);
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "u", "nodes": [heavy_node, node(&light)]}],
        "routes": [{"id": "r", "uri": "/*", "upstream_id": "u"}],
    })))
    .await;
    for _ in 0..40 {
        assert_eq!(get(&gateway.url("/")).await.status, StatusCode::OK);
    }
    assert_eq!((heavy.hits(), light.hits()), (30, 10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_keeps_a_key_on_one_node() {
    let nodes = [
        Upstream::start("n0").await,
        Upstream::start("n1").await,
        Upstream::start("n2").await,
    ];
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [{
            "id": "u", "type": "chash", "hash_on": "header:x-user",
            "nodes": nodes.iter().map(node).collect::<Vec<_>>(),
        }],
        "routes": [{"id": "r", "uri": "/*", "upstream_id": "u"}],
    })))
    .await;
    let mut used = std::collections::HashSet::new();
    for user in 0..30 {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..3 {
            let reply = send(
                request(Method::GET, &gateway.url("/"))
                    .header("x-user", format!("user-{user}"))
                    .body(Full::<Bytes>::default())
                    .unwrap(),
            )
            .await;
            seen.insert(reply.header("x-upstream").unwrap().to_owned());
        }
        assert_eq!(seen.len(), 1, "user-{user} moved between nodes: {seen:?}");
        used.extend(seen);
    }
    assert_eq!(
        used.len(),
        3,
        "30 users should spread over all 3 nodes: {used:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_conn_avoids_the_busy_node() {
    let (slow, gate) = Upstream::gated("slow").await;
    let fast = Upstream::start("fast").await;
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "u", "type": "least_conn", "nodes": [node(&slow), node(&fast)]}],
        "routes": [{"id": "r", "uri": "/*", "upstream_id": "u"}],
    })))
    .await;
    // One request at a time: each either comes back from fast, or is held at slow.
    let mut held = Vec::new();
    for sent in 1..=20 {
        let url = gateway.url("/");
        let mut request = tokio::spawn(async move { get(&url).await.status });
        let (slow, fast, already_held) = (&slow, &fast, held.len());
        let at_slow = eventually("the request reaches slow", Duration::from_secs(10), || {
            let arrived = slow.hits() + fast.hits() >= sent && slow.hits() > already_held;
            async move { arrived }
        });
        tokio::select! {
            status = &mut request => assert_eq!(status.unwrap(), StatusCode::OK),
            _ = at_slow => held.push(request),
        }
    }
    // Round robin would hold 10 at slow; least-conn sends there only while it is idle.
    assert!(held.len() <= 1, "slow took {} requests", held.len());
    assert_eq!(fast.hits() + slow.hits(), 20);
    gate.open();
    for request in held {
        assert_eq!(request.await.unwrap(), StatusCode::OK);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_connect_is_retried_on_another_node_with_the_body() {
    let alive = Upstream::start("alive").await;
    let dead = json!({"host": "127.0.0.1", "port": closed_port().await});
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [
            {"id": "mixed", "nodes": [dead.clone(), node(&alive)]},
            {"id": "only-dead", "nodes": [dead], "retries": 0},
        ],
        "routes": [
            {"id": "r", "uri": "/*", "upstream_id": "mixed"},
            {"id": "d", "uri": "/dead", "upstream_id": "only-dead"},
        ],
    })))
    .await;
    for i in 0..10 {
        let reply = send_body(Method::POST, &gateway.url("/echo"), format!("payload-{i}")).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.json()["body"], format!("payload-{i}"));
    }
    assert_eq!(alive.hits(), 10);

    let reply = get(&gateway.url("/dead")).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    // What happened, not where: no node address, no OS error.
    let body = reply.json();
    assert_eq!(body["error"], "upstream unavailable", "{body}");
    assert!(!body["request_id"].as_str().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_never_answers_gets_504() {
    let silent = BlackHole::accepting().await;
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "u", "nodes": [silent.node()], "timeout": {"connect_ms": 500, "read_ms": 200}}],
        "routes": [{"id": "r", "uri": "/*", "upstream_id": "u"}],
    })))
    .await;
    let reply = get(&gateway.url("/")).await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    // What happened, not where.
    assert_eq!(reply.json()["error"], "upstream timed out");
    assert!(
        !reply.text().contains(&silent.addr.port().to_string()),
        "{}",
        reply.text()
    );
}

/// A node that reads a request head, writes `answer` and then holds the connection open.
async fn scripted_node(answer: &'static [u8]) -> (u16, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && stream.read_exact(&mut byte).await.is_ok() {
                head.push(byte[0]);
            }
            let _ = stream.write_all(answer).await;
            held.push(stream);
        }
    });
    (port, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_never_answers_is_skipped_only_when_the_request_can_go_again() {
    let silent = BlackHole::accepting().await;
    let alive = Upstream::start("alive").await;
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "u", "nodes": [silent.node(), node(&alive)],
                       "timeout": {"read_ms": 300}}],
        "routes": [{"id": "r", "uri": "/*", "upstream_id": "u"}],
    })))
    .await;
    // Round robin sends every other request to the silent node first: a GET goes on to the
    // next, and the retry does not shift the schedule.
    for _ in 0..4 {
        assert_eq!(get(&gateway.url("/")).await.status, StatusCode::OK);
    }
    assert_eq!(alive.hits(), 4);
    let metrics = gateway.admin_url("/metrics");
    let timeouts = r#"weir_upstream_failures_total{upstream="u",kind="read_timeout"}"#;
    assert_eq!(metric(&metrics, timeouts).await, 2.0);
    // A POST that the silent node took may have been acted on: it is not sent again.
    let mut statuses = Vec::new();
    for i in 0..2 {
        statuses.push(
            send_body(Method::POST, &gateway.url("/"), format!("order-{i}"))
                .await
                .status,
        );
    }
    statuses.sort();
    assert_eq!(statuses, [StatusCode::OK, StatusCode::GATEWAY_TIMEOUT]);
    assert_eq!(alive.hits(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_stops_reading_the_request_times_out_on_send() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let silent = BlackHole::accepting().await;
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "u", "nodes": [silent.node()],
                       "timeout": {"send_ms": 300, "read_ms": 60000}}],
        "routes": [{"id": "r", "uri": "/*", "upstream_id": "u"}],
    })))
    .await;
    let stream = tokio::net::TcpStream::connect(gateway.addr())
        .await
        .unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let size = 64 << 20;
    let uploading = tokio::spawn(async move {
        let head = format!("POST / HTTP/1.1\r\nhost: x\r\ncontent-length: {size}\r\n\r\n");
        writer.write_all(head.as_bytes()).await.unwrap();
        let chunk = vec![b'u'; 1 << 16];
        for _ in 0..size / chunk.len() {
            if writer.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    let mut answer = Vec::new();
    let _ = reader.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
    assert!(answer.contains("upstream timed out"), "{answer}");
    let metrics = gateway.admin_url("/metrics");
    let stalls = r#"weir_upstream_failures_total{upstream="u",kind="send_timeout"}"#;
    assert_eq!(metric(&metrics, stalls).await, 1.0);
    uploading.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_body_that_stops_moving_is_cut_off() {
    let (port, _node) =
        scripted_node(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nthe first part").await;
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "u", "nodes": [{"host": "127.0.0.1", "port": port}],
                       "timeout": {"idle_ms": 300}}],
        "routes": [{"id": "r", "uri": "/*", "upstream_id": "u"}],
    })))
    .await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let response = client
        .request(
            request(Method::GET, &gateway.url("/"))
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // The head went out; the body stops after its first part, and the gateway gives up.
    let body = http_body_util::BodyExt::collect(response.into_body()).await;
    assert!(
        body.is_err(),
        "the truncated body was delivered as complete"
    );
    let metrics = gateway.admin_url("/metrics");
    let idle = r#"weir_upstream_failures_total{upstream="u",kind="idle_timeout"}"#;
    assert_eq!(metric(&metrics, idle).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_never_completes_the_handshake_times_out_on_connect() {
    // A listener whose accept queue is full: the kernel drops further handshakes, as a
    // black-holed address does.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let full = socket.listen(0).unwrap();
    let port = full.local_addr().unwrap().port();
    let mut queued = Vec::new();
    loop {
        let connect = tokio::net::TcpStream::connect(("127.0.0.1", port));
        match tokio::time::timeout(Duration::from_millis(200), connect).await {
            Ok(Ok(stream)) => queued.push(stream),
            _ => break,
        }
        assert!(queued.len() < 64, "the accept queue never filled");
    }
    let alive = Upstream::start("alive").await;
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [
            {"id": "u", "nodes": [{"host": "127.0.0.1", "port": port}, node(&alive)],
             "timeout": {"connect_ms": 200}},
            {"id": "only", "nodes": [{"host": "127.0.0.1", "port": port}],
             "timeout": {"connect_ms": 200}},
        ],
        "routes": [
            {"id": "r", "uri": "/*", "upstream_id": "u"},
            {"id": "o", "uri": "/only", "upstream_id": "only"},
        ],
    })))
    .await;
    // Nothing was sent, so even a POST goes on to the next node.
    for i in 0..4 {
        let reply = send_body(Method::POST, &gateway.url("/"), format!("p{i}")).await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    assert_eq!(alive.hits(), 4);
    let reply = get(&gateway.url("/only")).await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(reply.json()["error"], "upstream timed out");
    let metrics = gateway.admin_url("/metrics");
    let connects = r#"weir_upstream_failures_total{upstream="u",kind="connect_timeout"}"#;
    assert_eq!(metric(&metrics, connects).await, 2.0);
    drop(queued);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_kept_and_reused() {
    let up = Upstream::start("u").await;
    let empty = Upstream::start_with(
        "empty",
        Behaviour {
            status: StatusCode::NO_CONTENT,
            body: Some(Bytes::new()),
            ..Behaviour::default()
        },
    )
    .await;
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "u", "nodes": [node(&up)]}, {"id": "e", "nodes": [node(&empty)]}],
        "routes": [
            {"id": "r", "uri": "/*", "upstream_id": "u"},
            {"id": "e", "uri": "/empty", "upstream_id": "e"},
        ],
    })))
    .await;
    for i in 0..20 {
        let reply = send_body(Method::POST, &gateway.url("/"), format!("body-{i}")).await;
        assert_eq!(reply.json()["body"], format!("body-{i}"));
        let head = send(
            request(Method::HEAD, &gateway.url("/"))
                .body(Full::default())
                .unwrap(),
        )
        .await;
        assert_eq!(head.status, StatusCode::OK);
        assert_eq!(
            get(&gateway.url("/empty")).await.status,
            StatusCode::NO_CONTENT
        );
    }
    // One request at a time: one connection each, reused, bodiless answers included.
    assert_eq!((up.hits(), up.connections()), (40, 1));
    assert_eq!((empty.hits(), empty.connections()), (20, 1));
}

/// A node that answers one request per connection and then closes it without saying so
/// (no `Connection: close`): a connection the gateway keeps is dead by its next request.
/// Returns the node's port and how many connections it has taken.
async fn node_closing_each_connection() -> (u16, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let taken = Arc::new(AtomicUsize::new(0));
    let counter = taken.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                let _ = stream.write_all(answer).await;
            });
        }
    });
    (port, taken)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_connection_the_node_closed_is_replaced_without_a_failed_request() {
    let (port, connections) = node_closing_each_connection().await;
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "u", "nodes": [{"host": "127.0.0.1", "port": port}]}],
        "routes": [{"id": "r", "uri": "/*", "upstream_id": "u"}],
    })))
    .await;
    for i in 0..20 {
        let reply = get(&gateway.url(&format!("/{i}"))).await;
        assert_eq!(
            (reply.status, &reply.body[..]),
            (StatusCode::OK, &b"ok"[..])
        );
    }
    // Every request after the first found its kept connection closed, and went on a new one.
    assert_eq!(connections.load(Ordering::SeqCst), 20);
    let metrics = gateway.admin_url("/metrics");
    let failed = r#"weir_upstream_failures_total{upstream="u",kind="connect"}"#;
    assert_eq!(metric(&metrics, failed).await, 0.0);
}
