//! The edge as the first hop from the internet: paths that would slip past a route's plugins,
//! clients that hold connections open, headers that lie about the client, and errors that
//! would tell a client where the nodes are.

use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weir_tests::{
    Behaviour, TestGateway, Upstream, all_plugins, eventually, get, metric, node, raw_get,
    raw_request, request, send, yaml,
};

const SOON: Duration = Duration::from_secs(10);

/// examples/weir.yaml's shape: a public catch-all, and `/private/*` behind key-auth.
fn example(upstream: &Upstream, server: Value) -> String {
    yaml(json!({
        "server": server,
        "upstreams": [{"id": "u", "nodes": [node(upstream)]}],
        "plugins": all_plugins(),
        "routes": [
            {"id": "public", "uri": "/*", "upstream_id": "u"},
            {"id": "private", "uri": "/private/*", "strip_prefix": true, "upstream_id": "u",
             "plugins": [{"name": "key-auth", "config": {"keys": ["demo-key"], "hide_credentials": true}}]},
            {"id": "raw", "uri": "/raw/*", "upstream_id": "u", "path_normalization": "off"},
        ],
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_spelling_of_a_path_slips_past_the_key_check() {
    let up = Upstream::start("u").await;
    let gateway = TestGateway::start(&example(&up, json!({}))).await;
    let addr = gateway.addr();
    // Each path the upstream would read as /private/x gets the key check or a 400.
    let attacks = [
        ("//private/x", 401),
        ("/hello/../private/x", 401),
        ("/%70rivate/x", 401),
        ("/./private/x", 401),
        ("/private/%2e%2e/private/x", 401),
        ("/private/./x", 401),
        ("/private//x", 401),
        ("/private%2fx", 400),
        ("/private%2Fx", 400),
        ("/private%5cx", 400),
        ("/private\\x", 400),
        ("/../private/x", 400),
        ("/private/x%00", 400),
        ("/private/%zz", 400),
        // Tomcat, Jetty and Spring drop the `;` parameter, then read `..` as a dot segment.
        ("/hello/..;/private/x", 400),
        ("/hello/.;/../private/x", 400),
        ("/hello/%2e%2e;/private/x", 400),
        ("/hello/.%2E;/private/x", 400),
        ("/hello/..%3b/private/x", 400),
        // hyper refuses this one itself, before the gateway sees it.
        ("private/x", 400),
    ];
    for (path, expected) in attacks {
        let reply = raw_request(addr, &raw_get(path, &[])).await;
        assert_eq!(reply.status, expected, "{path}: {}", reply.head);
        if expected == 400 && path.starts_with('/') {
            let body: Value = serde_json::from_slice(&reply.body)
                .unwrap_or_else(|e| panic!("{path}: {e}: {}", reply.head));
            assert!(
                body["request_id"].as_str().is_some_and(|id| !id.is_empty()),
                "{body}"
            );
        }
    }
    assert_eq!(up.hits(), 0, "the upstream saw a request without a key");

    // With the key, the normal form is what routes and what the upstream gets (stripped).
    let key = [("x-api-key", "demo-key")];
    for path in [
        "//private/x",
        "/hello/../private/x",
        "/%70rivate/x",
        "/./private//x",
    ] {
        let reply = raw_request(addr, &raw_get(path, &key)).await;
        assert_eq!(reply.status, 200, "{path}: {}", reply.head);
        let echo: Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(echo["path"], "/x", "{path}");
    }

    // Case matters (the route is case-sensitive), and it is no bypass: /PRIVATE/x is not the
    // private route, so it goes to the public one unstripped.
    let reply = raw_request(addr, &raw_get("/PRIVATE/x", &[])).await;
    assert_eq!(reply.status, 200);
    let echo: Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(echo["path"], "/PRIVATE/x");
    let log = gateway.access_log(1 + 4 + attacks.len() - 1).await;
    let line = log.iter().find(|l| l["path"] == "/PRIVATE/x").unwrap();
    assert_eq!(line["route"], "public");
    // The log has the normal form the request was routed on.
    assert!(
        log.iter()
            .any(|l| l["path"] == "/private/x" && l["status"] == 401)
    );
    let bad_paths = r#"weir_client_errors_total{kind="bad_request"}"#;
    let rejected = metric(&gateway.admin_url("/metrics"), bad_paths).await;
    assert_eq!(rejected, 12.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_with_normalization_off_gets_the_raw_path() {
    let up = Upstream::start("u").await;
    let gateway = TestGateway::start(&example(&up, json!({}))).await;
    // Matched on the normal form, sent as the client wrote it, encoded slash and all.
    for path in ["/raw/a%2Fb", "/raw//a/./b", "/raw/%61"] {
        let reply = raw_request(gateway.addr(), &raw_get(path, &[])).await;
        assert_eq!(reply.status, 200, "{path}: {}", reply.head);
        let echo: Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(echo["path"], path);
    }
    // What has no normal form at all is still refused, and so is a raw path a Java backend
    // would climb out of.
    for path in [
        "/raw/../../x",
        "/raw/..;/private/x",
        "/raw/%2e%2e%3B/private/x",
    ] {
        let reply = raw_request(gateway.addr(), &raw_get(path, &[])).await;
        assert_eq!(reply.status, 400, "{path}: {}", reply.head);
    }
    assert_eq!(up.hits(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_sent_header_is_closed_by_the_header_timeout() {
    let up = Upstream::start("u").await;
    let gateway = TestGateway::start(&example(&up, json!({"header_timeout_ms": 300}))).await;
    let mut half = TcpStream::connect(gateway.addr()).await.unwrap();
    half.write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // The gateway closes it: the read ends without a response.
    let mut answer = Vec::new();
    let read = tokio::time::timeout(SOON, half.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the connection is still open");
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    // A connection that says nothing at all gets the same bound.
    let mut silent = TcpStream::connect(gateway.addr()).await.unwrap();
    let read = tokio::time::timeout(SOON, silent.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the silent connection is still open");
    let timeouts = r#"weir_client_timeouts_total{phase="header"}"#;
    assert_eq!(metric(&gateway.admin_url("/metrics"), timeouts).await, 2.0);
    assert_eq!(up.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed() {
    let up = Upstream::start("u").await;
    let gateway = TestGateway::start(&example(&up, json!({"keepalive_timeout_ms": 300}))).await;
    let mut client = TcpStream::connect(gateway.addr()).await.unwrap();
    client
        .write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(SOON, client.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the idle connection is still open");
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    let timeouts = r#"weir_client_timeouts_total{phase="keepalive"}"#;
    assert_eq!(metric(&gateway.admin_url("/metrics"), timeouts).await, 1.0);
}

/// One HTTP/1.1 request over `client`'s connection, answered in full.
async fn over(
    client: &mut hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    path: &str,
) -> (StatusCode, String) {
    use http_body_util::BodyExt;
    let request = http::Request::get(path)
        .header("host", "x")
        .body(http_body_util::Empty::new())
        .unwrap();
    let response = client.send_request(request).await.expect("an answer");
    let status = response.status();
    let body = response.into_body().collect().await.expect("a body");
    (
        status,
        String::from_utf8_lossy(&body.to_bytes()).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_parked_and_wakes_for_its_next_request() {
    let up = Upstream::start("u").await;
    let server = json!({"keepalive_timeout_ms": 4000});
    let gateway = TestGateway::start(&example(&up, server)).await;
    let metrics = gateway.admin_url("/metrics");
    let parked = r#"weir_connections_parked{listener="proxy"}"#;
    // 20 keep-alive clients that each made a request, then went quiet.
    let mut clients = Vec::new();
    for i in 0..20 {
        let stream = TcpStream::connect(gateway.addr()).await.unwrap();
        let (mut client, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        assert_eq!(
            over(&mut client, &format!("/first/{i}")).await.0,
            StatusCode::OK
        );
        clients.push(client);
    }
    // And one that sent the start of its next request in the same write as the first.
    let mut split = TcpStream::connect(gateway.addr()).await.unwrap();
    split
        .write_all(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\nGET /two HTTP/1.1\r\nHo")
        .await
        .unwrap();
    eventually("the idle connections are parked", SOON, || async {
        metric(&metrics, parked).await == 20.0
    })
    .await;
    // Each wakes for its next request, served in full on the same connection.
    for (i, client) in clients.iter_mut().enumerate() {
        let (status, body) = over(client, &format!("/again/{i}")).await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains(&format!("/again/{i}")), "{body}");
    }
    // The half-sent request was not lost to parking: its end completes it.
    split
        .write_all(b"st: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answers = Vec::new();
    tokio::time::timeout(SOON, split.read_to_end(&mut answers))
        .await
        .expect("both answers")
        .unwrap();
    let answers = String::from_utf8_lossy(&answers);
    assert_eq!(answers.matches("HTTP/1.1 200").count(), 2, "{answers}");
    assert!(answers.contains("/two"), "{answers}");
    // Parked again, then closed by the keep-alive timeout like any idle connection.
    eventually("the connections are parked again", SOON, || async {
        metric(&metrics, parked).await == 20.0
    })
    .await;
    eventually("the parked connections time out", SOON, || async {
        metric(&metrics, r#"weir_client_timeouts_total{phase="keepalive"}"#).await >= 20.0
    })
    .await;
    assert_eq!(metric(&metrics, parked).await, 0.0);
    for client in &mut clients {
        client
            .ready()
            .await
            .expect_err("the gateway closed the connection");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_get_431() {
    let up = Upstream::start("u").await;
    let gateway = TestGateway::start(&example(
        &up,
        json!({"max_header_bytes": 16384, "max_headers": 20}),
    ))
    .await;
    let big = "x".repeat(20_000);
    let reply = raw_request(gateway.addr(), &raw_get("/hello", &[("x-big", &big)])).await;
    assert_eq!(reply.status, 431, "{}", reply.head);
    let many: Vec<(String, &str)> = (0..30).map(|i| (format!("x-h{i}"), "1")).collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(n, v)| (n.as_str(), *v)).collect();
    let reply = raw_request(gateway.addr(), &raw_get("/hello", &many)).await;
    assert_eq!(reply.status, 431, "{}", reply.head);
    // Just under both bounds is fine.
    let fits = "x".repeat(15_000);
    let reply = raw_request(gateway.addr(), &raw_get("/hello", &[("x-big", &fits)])).await;
    assert_eq!(reply.status, 200, "{}", reply.head);
    let too_large = r#"weir_client_errors_total{kind="header_too_large"}"#;
    assert_eq!(metric(&gateway.admin_url("/metrics"), too_large).await, 2.0);
    assert_eq!(up.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_and_a_slowloris_do_not_stop_a_normal_client() {
    weir::server::raise_open_file_limit();
    let up = Upstream::start("u").await;
    let gateway = TestGateway::start(&example(&up, json!({"header_timeout_ms": 2000}))).await;
    let metrics = gateway.admin_url("/metrics");
    // 2,000 connections that each made one request and now sit idle.
    let mut idle = Vec::new();
    for _ in 0..2000 {
        let mut stream = TcpStream::connect(gateway.addr()).await.unwrap();
        stream
            .write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        idle.push(stream);
    }
    for stream in &mut idle {
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.unwrap();
        assert_eq!(&head, b"HTTP/1.1 200");
    }
    // And a slowloris: one header byte at a time, never finishing.
    let mut slow = TcpStream::connect(gateway.addr()).await.unwrap();
    slow.write_all(b"GET /hello HTTP/1.1\r\n").await.unwrap();
    let dripping = tokio::spawn(async move {
        for byte in b"X-Drip: ".iter().cycle() {
            if slow.write_all(&[*byte]).await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    });
    eventually("every connection is open", SOON, || async {
        metric(&metrics, r#"weir_connections_open{listener="proxy"}"#).await >= 2001.0
    })
    .await;
    // A normal client is served all the while.
    for _ in 0..20 {
        assert_eq!(get(&gateway.url("/hello")).await.status, StatusCode::OK);
    }
    // The slowloris is cut off by the header timeout, however busy it keeps the socket.
    assert!(
        tokio::time::timeout(SOON * 3, dripping)
            .await
            .unwrap()
            .unwrap()
    );
    assert_eq!(
        metric(&metrics, r#"weir_client_timeouts_total{phase="header"}"#).await,
        1.0
    );
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_are_closed_at_accept() {
    let up = Upstream::start("u").await;
    let gateway = TestGateway::start(&example(&up, json!({"max_connections": 5}))).await;
    let metrics = gateway.admin_url("/metrics");
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(TcpStream::connect(gateway.addr()).await.unwrap());
    }
    eventually("five connections are open", SOON, || async {
        metric(&metrics, r#"weir_connections_open{listener="proxy"}"#).await == 5.0
    })
    .await;
    // The sixth is accepted by the kernel, then closed by the gateway without a word.
    let reply = raw_request(gateway.addr(), &raw_get("/hello", &[])).await;
    assert_eq!(reply.status, 0, "{}", reply.head);
    assert_eq!(
        metric(
            &metrics,
            r#"weir_connections_refused_total{listener="proxy"}"#
        )
        .await,
        1.0
    );
    // Once one goes, a new client is served.
    held.pop();
    eventually("a connection slot frees up", SOON, || async {
        metric(&metrics, r#"weir_connections_open{listener="proxy"}"#).await == 4.0
    })
    .await;
    let reply = raw_request(gateway.addr(), &raw_get("/hello", &[])).await;
    assert_eq!(reply.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_sending_its_body_gets_408() {
    let up = Upstream::start("u").await;
    let gateway = TestGateway::start(&example(&up, json!({"body_timeout_ms": 300}))).await;
    let mut client = TcpStream::connect(gateway.addr()).await.unwrap();
    client
        .write_all(b"POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly-part")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(SOON, client.read_to_end(&mut answer))
        .await
        .expect("the gateway answers")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.contains("the request body stopped arriving"),
        "{answer}"
    );
    let body_timeouts = r#"weir_client_timeouts_total{phase="body"}"#;
    assert_eq!(
        metric(&gateway.admin_url("/metrics"), body_timeouts).await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off() {
    let big = Upstream::start_with(
        "big",
        Behaviour {
            body: Some(vec![b'z'; 32 << 20].into()),
            ..Behaviour::default()
        },
    )
    .await;
    let gateway = TestGateway::start(&example(&big, json!({"send_timeout_ms": 300}))).await;
    let mut client = TcpStream::connect(gateway.addr()).await.unwrap();
    client
        .write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    // Never read: the gateway's writes stall until it gives up on the client.
    let metrics = gateway.admin_url("/metrics");
    eventually("the send timeout fires", SOON, || async {
        metric(&metrics, r#"weir_client_timeouts_total{phase="send"}"#).await == 1.0
    })
    .await;
    drop(client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_go_no_further_than_one_hop() {
    let up = Upstream::start_with(
        "u",
        Behaviour {
            headers: vec![
                ("connection", "x-upstream-secret"),
                ("x-upstream-secret", "1"),
                ("x-kept", "1"),
            ],
            ..Behaviour::default()
        },
    )
    .await;
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "u", "nodes": [node(&up)]}],
        "plugins": all_plugins(),
        "routes": [{"id": "r", "uri": "/*", "upstream_id": "u", "plugins": [
            {"name": "headers", "config": {"request": {"set": {"x-set-by-plugin": "yes"}}}},
        ]}],
    })))
    .await;
    let reply = raw_request(
        gateway.addr(),
        &raw_get(
            "/",
            &[
                ("connection", "close, x-client-secret, x-set-by-plugin"),
                ("x-client-secret", "1"),
                ("keep-alive", "timeout=5"),
                ("te", "trailers"),
                ("proxy-authorization", "Basic eDp5"),
            ],
        ),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.head);
    let echo: Value = serde_json::from_slice(&reply.body).unwrap();
    let seen = echo["headers"].as_object().unwrap();
    for name in ["x-client-secret", "keep-alive", "te", "proxy-authorization"] {
        assert!(
            !seen.contains_key(name),
            "{name} reached the upstream: {echo}"
        );
    }
    // The client's Connection header cannot remove what a plugin sets.
    assert_eq!(seen["x-set-by-plugin"], "yes");
    let head = reply.head.to_ascii_lowercase();
    assert!(!head.contains("x-upstream-secret"), "{head}");
    assert!(head.contains("x-kept: 1"), "{head}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_are_the_gateways_unless_a_trusted_proxy_sent_them() {
    let up = Upstream::start("u").await;
    let routes = json!([{"id": "r", "uri": "/*", "upstream_id": "u"},
        {"id": "deny", "uri": "/deny/*", "upstream_id": "u", "plugins": [
            {"name": "ip-restriction", "config": {"deny": ["203.0.113.0/24"]}}]}]);
    let config = |server: Value| {
        yaml(json!({
            "server": server,
            "upstreams": [{"id": "u", "nodes": [node(&up)]}],
            "plugins": all_plugins(),
            "routes": routes.clone(),
        }))
    };
    let lying = [
        ("x-forwarded-for", "203.0.113.9"),
        ("x-forwarded-for", "198.51.100.1, 203.0.113.7"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "forged.example"),
    ];
    let gateway = TestGateway::start(&config(json!({}))).await;
    let reply = raw_request(gateway.addr(), &raw_get("/", &lying)).await;
    let echo: Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(
        echo["headers"]["x-forwarded-for"],
        "203.0.113.9, 198.51.100.1, 203.0.113.7, 127.0.0.1"
    );
    assert_eq!(echo["headers"]["x-forwarded-proto"], "http");
    assert_eq!(echo["headers"]["x-forwarded-host"], "gateway.test");
    // The peer is not trusted: the forged addresses decide nothing.
    let reply = raw_request(gateway.addr(), &raw_get("/deny/x", &lying)).await;
    assert_eq!(reply.status, 200, "{}", reply.head);
    let log = gateway.access_log(2).await;
    assert!(log.iter().all(|l| l["client_ip"] == "127.0.0.1"), "{log:?}");

    // Behind a trusted proxy, the last address it did not add is the client.
    gateway
        .reload(&config(
            json!({"trusted_proxies": ["127.0.0.1/32", "198.51.100.0/24"]}),
        ))
        .await;
    let reply = raw_request(gateway.addr(), &raw_get("/", &lying)).await;
    let echo: Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(echo["headers"]["x-forwarded-proto"], "https");
    assert_eq!(echo["headers"]["x-forwarded-host"], "forged.example");
    let reply = raw_request(gateway.addr(), &raw_get("/deny/x", &lying)).await;
    assert_eq!(reply.status, 403, "{}", reply.head);
    let log = gateway.access_log(4).await;
    assert_eq!(log[3]["client_ip"], "203.0.113.7", "{log:?}");
    // A bad entry is refused with a reason, and the settings that were serving stay.
    gateway
        .reload(&config(json!({"trusted_proxies": ["10.0.0.0/33"]})))
        .await;
    let errors = gateway.errors();
    assert!(errors[0].reason.contains("trusted_proxies"), "{errors:?}");
    let reply = raw_request(gateway.addr(), &raw_get("/deny/x", &lying)).await;
    assert_eq!(reply.status, 403, "{}", reply.head);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_host_headers_are_refused() {
    let up = Upstream::start("u").await;
    let gateway = TestGateway::start(&example(&up, json!({}))).await;
    let reply = raw_request(
        gateway.addr(),
        b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(reply.status, 400, "{}", reply.head);
    assert_eq!(up.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrouted_requests_are_counted_as_route_none() {
    let gateway = TestGateway::start(&yaml(json!({}))).await;
    assert_eq!(
        get(&gateway.url("/nowhere")).await.status,
        StatusCode::NOT_FOUND
    );
    let reply = raw_request(gateway.addr(), &raw_get("/../x", &[])).await;
    assert_eq!(reply.status, 400);
    let metrics = gateway.admin_url("/metrics");
    eventually("both are counted", SOON, || async {
        metric(
            &metrics,
            r#"weir_http_requests_total{route="none",class="4xx"}"#,
        )
        .await
            == 2.0
    })
    .await;
    let text = get(&metrics).await.text();
    assert!(
        text.contains("response was sent in full"),
        "the duration histogram says what it measures: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_gets_the_same_edge() {
    let up = Upstream::start("u").await;
    let gateway = TestGateway::start(&example(&up, json!({"max_headers": 10}))).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let send_h2 = |path: &str, headers: usize| {
        let mut builder = request(Method::GET, &gateway.url(path));
        for i in 0..headers {
            builder = builder.header(format!("x-h{i}"), "1");
        }
        client.request(builder.body(Default::default()).unwrap())
    };
    let reply = send_h2("/%70rivate/x", 0).await.unwrap();
    assert_eq!(reply.status(), StatusCode::UNAUTHORIZED);
    let reply = send_h2("/private%2fx", 0).await.unwrap();
    assert_eq!(reply.status(), StatusCode::BAD_REQUEST);
    let reply = send_h2("/hello", 20).await.unwrap();
    assert_eq!(reply.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    let reply = send(
        request(Method::GET, &gateway.url("/hello"))
            .body(Default::default())
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(up.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_on_ip_follows_the_client_a_trusted_proxy_names() {
    let nodes = [
        Upstream::start("n0").await,
        Upstream::start("n1").await,
        Upstream::start("n2").await,
    ];
    let gateway = TestGateway::start(&yaml(json!({
        "server": {"trusted_proxies": ["127.0.0.1"]},
        "upstreams": [{"id": "u", "type": "chash", "hash_on": "ip",
                       "nodes": nodes.iter().map(node).collect::<Vec<_>>()}],
        "routes": [{"id": "r", "uri": "/*", "upstream_id": "u"}],
    })))
    .await;
    // Every request comes from 127.0.0.1; the client behind it decides the node.
    let mut used = std::collections::HashSet::new();
    for client in 0..30 {
        let xff = format!("198.51.100.{client}");
        let mut seen = std::collections::HashSet::new();
        for _ in 0..3 {
            let reply =
                raw_request(gateway.addr(), &raw_get("/", &[("x-forwarded-for", &xff)])).await;
            let echo: Value = serde_json::from_slice(&reply.body).unwrap();
            seen.insert(echo["upstream"].as_str().unwrap().to_owned());
        }
        assert_eq!(seen.len(), 1, "{xff} moved between nodes: {seen:?}");
        used.extend(seen);
    }
    assert_eq!(
        used.len(),
        3,
        "30 clients should spread over all 3 nodes: {used:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trailing_dot_host_reaches_its_route_and_user_info_is_refused() {
    let api = Upstream::start("api").await;
    let internal = Upstream::start("internal").await;
    let other = Upstream::start("other").await;
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [
            {"id": "api", "nodes": [node(&api)]},
            {"id": "internal", "nodes": [node(&internal)]},
            {"id": "other", "nodes": [node(&other)]},
        ],
        "routes": [
            {"id": "api", "uri": "/*", "hosts": ["api.example.com"], "upstream_id": "api"},
            {"id": "internal", "uri": "/*", "hosts": ["internal.example"], "upstream_id": "internal"},
            {"id": "any", "uri": "/*", "upstream_id": "other"},
        ],
    })))
    .await;
    let with_host = |host: &str| {
        format!("GET /x HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n").into_bytes()
    };
    for host in [
        "api.example.com.",
        "API.example.com.:8080",
        "api.example.com",
    ] {
        let reply = raw_request(gateway.addr(), &with_host(host)).await;
        assert_eq!(reply.status, 200, "{host}: {}", reply.head);
        let echo: Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(echo["upstream"], "api", "{host}");
    }
    for host in [
        "x@internal.example",
        "internal.example:x@api.example.com",
        "internal.example:",
        "internal.example:abc",
        "a:b:c",
    ] {
        let reply = raw_request(gateway.addr(), &with_host(host)).await;
        assert_eq!(reply.status, 400, "{host}: {}", reply.head);
        assert!(!reply.head.contains("internal.example"), "{}", reply.head);
    }
    // The same in an absolute-form target, whose authority overrides Host.
    let reply = raw_request(
        gateway.addr(),
        b"GET http://x@internal.example/x HTTP/1.1\r\nhost: internal.example\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(reply.status, 400, "{}", reply.head);
    assert_eq!(internal.hits() + other.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cannot_remove_the_chain_a_trusted_proxy_built() {
    let up = Upstream::start("u").await;
    let gateway = TestGateway::start(&yaml(json!({
        "server": {"trusted_proxies": ["127.0.0.1/32"]},
        "upstreams": [{"id": "u", "nodes": [node(&up)]}],
        "plugins": all_plugins(),
        "routes": [{"id": "deny", "uri": "/*", "upstream_id": "u", "plugins": [
            {"name": "ip-restriction", "config": {"deny": ["203.0.113.0/24"]}}]}],
    })))
    .await;
    // The trusted proxy vouches for 203.0.113.7; the client asks the hop to drop the chain.
    let forwarded = [
        ("x-forwarded-for", "203.0.113.7"),
        (
            "connection",
            "x-forwarded-for, x-real-ip, forwarded, x-forwarded-host",
        ),
        ("x-forwarded-host", "public.example"),
    ];
    let reply = raw_request(gateway.addr(), &raw_get("/x", &forwarded)).await;
    assert_eq!(reply.status, 403, "{}", reply.head);
    assert_eq!(up.hits(), 0);
    let log = gateway.access_log(1).await;
    assert_eq!(log[0]["client_ip"], "203.0.113.7", "{log:?}");
    // A client the rule allows has its chain and host go on intact.
    let forwarded = [
        ("x-forwarded-for", "198.51.100.1"),
        ("connection", "x-forwarded-for, x-forwarded-host"),
        ("x-forwarded-host", "public.example"),
    ];
    let reply = raw_request(gateway.addr(), &raw_get("/x", &forwarded)).await;
    assert_eq!(reply.status, 200, "{}", reply.head);
    let echo: Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(
        echo["headers"]["x-forwarded-for"],
        "198.51.100.1, 127.0.0.1"
    );
    assert_eq!(echo["headers"]["x-forwarded-host"], "public.example");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_session_cookie_reaches_no_plugin_and_no_upstream() {
    let up = Upstream::start("u").await;
    let probe = weir_tests::probe_entry("probe", json!({}));
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "u", "nodes": [node(&up)]}],
        "plugins": [probe],
        "routes": [{"id": "r", "uri": "/*", "upstream_id": "u", "plugins": [
            {"name": "probe", "config": {"mode": "see-header", "name": "cookie"}}]}],
    })))
    .await;
    let cookie = [("cookie", "a=1; weir_session=SECRET; b=2")];
    let reply = raw_request(gateway.addr(), &raw_get("/x", &cookie)).await;
    assert_eq!(reply.status, 200, "{}", reply.head);
    let echo: Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(echo["headers"]["cookie"], "a=1; b=2", "{echo}");
    assert_eq!(echo["headers"]["x-probe-saw"], "a=1; b=2", "{echo}");
    // With only the session cookie, no Cookie header is left at all.
    let cookie = [("cookie", "__Host-weir_session=SECRET")];
    let reply = raw_request(gateway.addr(), &raw_get("/x", &cookie)).await;
    let echo: Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(echo["headers"].get("cookie"), None, "{echo}");
    assert_eq!(echo["headers"]["x-probe-saw"], "none", "{echo}");
    let log = serde_json::to_string(&gateway.access_log(2).await).unwrap();
    assert!(!log.contains("SECRET"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_trailers_cannot_name_a_consumer_to_the_upstream() {
    let up = Upstream::start("u").await;
    let config = |trailers: Option<Value>| {
        let mut route = json!({"id": "r", "uri": "/*", "upstream_id": "u"});
        if let Some(trailers) = trailers {
            route["request_trailers"] = trailers;
        }
        yaml(json!({
            "upstreams": [{"id": "u", "scheme": "grpc", "nodes": [node(&up)]}],
            "plugins": [weir_tests::probe_entry("probe", json!({}))],
            "routes": [
                route,
                {"id": "buffered", "uri": "/buffered/*", "upstream_id": "u",
                 "plugins": [{"name": "probe", "config": {"mode": "inspect"}}]},
            ],
        }))
    };
    let gateway = TestGateway::start(&config(None)).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let send_trailed = |path: &str| {
        let mut trailers = http::HeaderMap::new();
        for (name, value) in [
            ("x-consumer-username", "admin"),
            ("x-forwarded-for", "10.0.0.1"),
            ("x-real-ip", "10.0.0.1"),
            ("x-request-id", "forged"),
            ("grpc-previous-rpc-attempts", "1"),
            ("x-checksum", "abc"),
            ("x-other", "1"),
        ] {
            trailers.insert(name, value.parse().unwrap());
        }
        let frames = [
            Ok::<_, std::convert::Infallible>(http_body::Frame::data(bytes::Bytes::from_static(
                b"hi",
            ))),
            Ok(http_body::Frame::trailers(trailers)),
        ];
        let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
        client.request(
            request(Method::POST, &gateway.url(path))
                .body(body)
                .unwrap(),
        )
    };
    let echo_of = |reply: http::Response<hyper::body::Incoming>| async move {
        assert_eq!(reply.status(), StatusCode::OK);
        let bytes = http_body_util::BodyExt::collect(reply.into_body())
            .await
            .unwrap()
            .to_bytes();
        serde_json::from_slice::<Value>(&bytes).unwrap()
    };
    // Streaming, and buffered for a plugin: only gRPC's own trailers go on.
    for path in ["/x", "/buffered/x"] {
        let echo = echo_of(send_trailed(path).await.unwrap()).await;
        assert_eq!(echo["body"], "hi", "{path}: {echo}");
        assert_eq!(
            echo["trailers"],
            json!({"grpc-previous-rpc-attempts": "1"}),
            "{path}: {echo}"
        );
    }
    // A route may allow a name of its own, never the gateway's.
    gateway.reload(&config(Some(json!(["X-Checksum"])))).await;
    let echo = echo_of(send_trailed("/x").await.unwrap()).await;
    assert_eq!(
        echo["trailers"],
        json!({"grpc-previous-rpc-attempts": "1", "x-checksum": "abc"}),
        "{echo}"
    );
    gateway
        .reload(&config(Some(json!(["x-consumer-username"]))))
        .await;
    let errors = gateway.errors();
    assert!(
        errors[0]
            .reason
            .contains("request trailer \"x-consumer-username\""),
        "{errors:?}"
    );
}
