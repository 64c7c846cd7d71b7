//! WebSocket through weir: a real WebSocket server (tokio-tungstenite) behind a route with
//! `websocket: true`, a client that exchanges a thousand messages, key-auth guarding the
//! upgrade, and the access log's byte counts once the connection ends.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use weir_tests::{TestGateway, Upstream, all_plugins, node, raw_get, raw_request, yaml};

/// A WebSocket server that echoes every text and binary message.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut socket) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(message)) = socket.next().await {
                    if (message.is_text() || message.is_binary())
                        && socket.send(message).await.is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    addr
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Sends `text` and returns the next text message that comes back.
async fn round_trip(socket: &mut Socket, text: &str) -> String {
    socket.send(Message::text(text)).await.unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(10), socket.next())
        .await
        .expect("an echo in time")
        .expect("the socket is open")
        .expect("a message");
    echoed.into_text().unwrap().as_str().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_route_carries_a_thousand_messages_behind_key_auth() {
    let server = echo_server().await;
    let plain = Upstream::start("plain").await;
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [
            {"id": "ws", "nodes": [{"host": "127.0.0.1", "port": server.port()}]},
            {"id": "plain", "nodes": [node(&plain)]},
        ],
        "plugins": all_plugins(),
        "routes": [
            {"id": "ws", "uri": "/ws", "upstream_id": "ws", "websocket": true,
             "plugins": [{"name": "key-auth", "config": {"keys": ["secret"]}},
                         {"name": "probe", "config": {"mode": "trace", "tag": "ws"}}]},
            {"id": "plain", "uri": "/plain", "upstream_id": "plain"},
        ],
    })))
    .await;
    let url = format!("ws://{}/ws", gateway.addr());

    // Without a key, key-auth answers before any upgrade.
    let refused = tokio_tungstenite::connect_async(url.as_str()).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 401)
        }
        other => panic!("expected a 401, got {other:?}"),
    }

    let mut request = url.as_str().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("x-api-key", "secret".parse().unwrap());
    let (mut socket, response) = tokio_tungstenite::connect_async(request)
        .await
        .expect("the upgrade goes through");
    assert_eq!(response.status(), 101);
    let mut sent = 0usize;
    for i in 0..1000 {
        let text = format!("message {i} {}", "x".repeat(i % 100));
        sent += text.len();
        assert_eq!(round_trip(&mut socket, &text).await, text);
    }
    let payload = vec![7u8; 200_000];
    socket.send(Message::binary(payload.clone())).await.unwrap();
    let echoed = socket.next().await.unwrap().unwrap();
    assert_eq!(echoed.into_data().as_ref(), &payload[..]);
    socket.close(None).await.unwrap();
    while socket.next().await.is_some() {}
    drop(socket);

    // The connection's line is written when it ends, with the bytes each way.
    let lines = gateway.access_log(2).await;
    let line = lines
        .iter()
        .find(|l| l["route"] == "ws" && l["status"] == 101)
        .unwrap_or_else(|| panic!("no line for the upgraded connection: {lines:?}"));
    let from_client = line["upgraded"]["bytes_from_client"].as_u64().unwrap();
    let to_client = line["upgraded"]["bytes_to_client"].as_u64().unwrap();
    // Frames add headers (and the client's are masked), so more than the payloads went by.
    assert!(from_client as usize > sent + payload.len(), "{line}");
    assert!(to_client as usize > sent + payload.len(), "{line}");
    assert_eq!(line["upgraded"]["ended"], "closed");
    // on-log ran for the upgraded connection when it ended, and for the request key-auth
    // refused: every request that reached a route gets its on-log.
    let metrics = gateway.admin_url("/metrics");
    weir_tests::eventually("on-log ran twice", Duration::from_secs(30), || {
        let metrics = metrics.clone();
        async move {
            weir_tests::metric(
                &metrics,
                r#"weir_plugin_events_total{plugin="probe",name="ws-logged"}"#,
            )
            .await
                == 2.0
        }
    })
    .await;

    // On a route without `websocket: true`, an upgrade request goes upstream as plain HTTP,
    // without its upgrade headers.
    let request = raw_get(
        "/plain",
        &[("connection", "upgrade"), ("upgrade", "websocket")],
    );
    let reply = raw_request(gateway.addr(), &request).await;
    assert_eq!(reply.status, 200, "{}", reply.head);
    let echo: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    assert!(echo["headers"].get("upgrade").is_none(), "{echo}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_declines_the_upgrade_is_answered_as_it_said() {
    // A plain HTTP server: it answers the upgrade request with 200, not 101.
    let plain = Upstream::start("plain").await;
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "plain", "nodes": [node(&plain)]}],
        "routes": [{"id": "ws", "uri": "/ws", "upstream_id": "plain", "websocket": true}],
    })))
    .await;
    let url = format!("ws://{}/ws", gateway.addr());
    match tokio_tungstenite::connect_async(url.as_str()).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 200)
        }
        other => panic!("expected the upstream's 200, got {other:?}"),
    }
    // It did see the upgrade headers: the route allows them through.
    let request = raw_get(
        "/ws",
        &[("connection", "upgrade"), ("upgrade", "websocket")],
    );
    let reply = raw_request(gateway.addr(), &request).await;
    let echo: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(echo["headers"]["upgrade"], "websocket", "{echo}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_websocket_outlives_the_between_requests_timeouts_and_ends_at_idle_ms() {
    let server = echo_server().await;
    let gateway = TestGateway::start(&yaml(json!({
        "server": {"header_timeout_ms": 100, "keepalive_timeout_ms": 100},
        "upstreams": [{"id": "ws", "nodes": [{"host": "127.0.0.1", "port": server.port()}],
                       "timeout": {"idle_ms": 1500}}],
        "routes": [{"id": "ws", "uri": "/ws", "upstream_id": "ws", "websocket": true}],
    })))
    .await;
    let url = format!("ws://{}/ws", gateway.addr());
    let (mut socket, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .unwrap();
    assert_eq!(round_trip(&mut socket, "first").await, "first");
    // Quiet for several times the head and keep-alive timeouts, but within idle_ms: those
    // bound a connection between requests, not a spliced one.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(round_trip(&mut socket, "second").await, "second");
    // Then quiet past idle_ms: the gateway closes both sides.
    let closed = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match socket.next().await {
                None | Some(Err(_)) => return,
                Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the idle connection was closed");
    let lines = gateway.access_log(1).await;
    let line = lines.iter().find(|l| l["status"] == 101).expect("a line");
    assert_eq!(line["upgraded"]["ended"], "idle", "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_websocket_counts_against_max_connections() {
    let server = echo_server().await;
    let gateway = TestGateway::start(&yaml(json!({
        "server": {"max_connections": 1},
        "upstreams": [{"id": "ws", "nodes": [{"host": "127.0.0.1", "port": server.port()}]}],
        "routes": [{"id": "ws", "uri": "/ws", "upstream_id": "ws", "websocket": true}],
    })))
    .await;
    let url = format!("ws://{}/ws", gateway.addr());
    let (mut socket, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .unwrap();
    assert_eq!(round_trip(&mut socket, "hi").await, "hi");
    // Read in-process: the admin listener has the same one-connection limit.
    let open = || {
        gateway
            .gateway()
            .metrics()
            .connections_open
            .get_or_create(&weir::metrics::ListenerLabels { listener: "proxy" })
            .get()
    };
    assert_eq!(open(), 1);
    // The spliced connection is still one of the listener's: a second one is turned away.
    assert!(
        tokio_tungstenite::connect_async(url.as_str())
            .await
            .is_err(),
        "over max_connections"
    );
    drop(socket);
    weir_tests::eventually(
        "the closed socket is no longer counted",
        Duration::from_secs(30),
        || async { open() == 0 },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_waits_for_an_open_websocket_and_logs_it() {
    let server = echo_server().await;
    let mut gateway = TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "ws", "nodes": [{"host": "127.0.0.1", "port": server.port()}]}],
        "routes": [{"id": "ws", "uri": "/ws", "upstream_id": "ws", "websocket": true}],
    })))
    .await;
    let url = format!("ws://{}/ws", gateway.addr());
    let (mut socket, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .unwrap();
    assert_eq!(round_trip(&mut socket, "before").await, "before");
    let state = gateway.gateway().clone();
    let log = gateway.dir().join("access.log");
    // The client goes on talking once the drain has begun, then closes.
    let client = tokio::spawn(async move {
        weir_tests::eventually("the drain begins", Duration::from_secs(30), || async {
            state.draining()
        })
        .await;
        assert_eq!(round_trip(&mut socket, "during").await, "during");
        socket.close(None).await.unwrap();
        while socket.next().await.is_some() {}
    });
    gateway
        .drain(weir::DrainOptions {
            delay: Duration::ZERO,
            timeout: Duration::from_secs(30),
        })
        .await;
    client.await.unwrap();
    // The drain returned only after the connection ended, and its line made it into the log
    // before the log closed.
    let text = std::fs::read_to_string(log).unwrap();
    let line: serde_json::Value = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|l| l["status"] == 101)
        .unwrap_or_else(|| panic!("no line for the WebSocket: {text}"));
    assert_eq!(line["upgraded"]["ended"], "closed", "{line}");
}
