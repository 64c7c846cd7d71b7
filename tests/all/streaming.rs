//! Bodies that stream: server-sent events reach the client one by one, as the upstream sends
//! them, whether or not a plugin on the route reads whole bodies; world 0.3.0's chunk hooks
//! see them as they pass, and change, hold or refuse them.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use serde_json::json;
use tokio::sync::mpsc;
use weir_tests::{TestGateway, yaml};

/// How long a test waits for the next event before it says the gateway held it back.
const EVENT_WAIT: Duration = Duration::from_secs(10);

/// An upstream that answers every request with `text/event-stream`, and hands the test a
/// sender for each answer's events; the answer ends when the test drops it.
async fn event_source() -> (u16, mpsc::UnboundedReceiver<mpsc::UnboundedSender<Bytes>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (answers, handed) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let answers = answers.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_request| {
                    let (events, queued) = mpsc::unbounded_channel::<Bytes>();
                    let _ = answers.send(events);
                    let frames = futures_util::stream::unfold(queued, |mut queued| async move {
                        let event = queued.recv().await?;
                        let frame =
                            Ok::<_, std::convert::Infallible>(http_body::Frame::data(event));
                        Some((frame, queued))
                    });
                    let response = http::Response::builder()
                        .header("content-type", "text/event-stream; charset=utf-8")
                        .header("cache-control", "no-cache")
                        .body(StreamBody::new(frames))
                        .unwrap();
                    async move { Ok::<_, std::convert::Infallible>(response) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            });
        }
    });
    (port, handed)
}

/// Reads `body` until what it has read ends with `event`; fails if that takes longer than
/// [`EVENT_WAIT`] (the event was held back) or the body ends first.
async fn read_until(body: &mut hyper::body::Incoming, read: &mut String, event: &str) {
    let wait = tokio::time::timeout(EVENT_WAIT, async {
        while !read.ends_with(event) {
            let Some(frame) = body.frame().await else {
                panic!("the stream ended before {event:?}; it had {read:?}");
            };
            if let Ok(data) = frame.unwrap().into_data() {
                read.push_str(std::str::from_utf8(&data).unwrap());
            }
        }
    });
    if wait.await.is_err() {
        panic!("{event:?} did not reach the client, which had {read:?}: the gateway held it");
    }
}

/// An event stream opened through `path`: the sender of the upstream's events, and the
/// response once its head has reached the client (the upstream sends `first` to get it there).
async fn open_stream(
    gateway: &TestGateway,
    answers: &mut mpsc::UnboundedReceiver<mpsc::UnboundedSender<Bytes>>,
    path: &str,
    http2: bool,
    first: &str,
) -> (
    mpsc::UnboundedSender<Bytes>,
    http::response::Parts,
    hyper::body::Incoming,
) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(http2)
        .build_http::<http_body_util::Empty<Bytes>>();
    let request = weir_tests::request(http::Method::GET, &gateway.url(path))
        .header("accept", "text/event-stream")
        .body(http_body_util::Empty::new())
        .unwrap();
    let asked = tokio::spawn(client.request(request));
    let events = tokio::time::timeout(EVENT_WAIT, answers.recv())
        .await
        .unwrap_or_else(|_| panic!("the upstream was not asked for {path}"))
        .expect("the upstream was asked");
    events.send(Bytes::from(first.to_owned())).unwrap();
    let response = tokio::time::timeout(EVENT_WAIT, asked)
        .await
        .expect("the response head reached the client")
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), http::StatusCode::OK);
    let (head, body) = response.into_parts();
    (events, head, body)
}

/// Through `path`, the upstream sends each event only once the client has read the one before:
/// a gateway that held any of them back would never see the stream end. The client reads
/// each event as `seen` makes it.
async fn events_arrive_one_by_one(
    gateway: &TestGateway,
    answers: &mut mpsc::UnboundedReceiver<mpsc::UnboundedSender<Bytes>>,
    path: &str,
    http2: bool,
    seen: fn(&str) -> String,
) -> http::HeaderMap {
    let (events, head, mut body) = open_stream(gateway, answers, path, http2, "data: 1\n\n").await;
    let mut read = String::new();
    read_until(&mut body, &mut read, &seen("data: 1\n\n")).await;
    for n in 2..=3 {
        let event = format!("data: {n}\n\n");
        events.send(Bytes::from(event.clone())).unwrap();
        read_until(&mut body, &mut read, &seen(&event)).await;
    }
    drop(events);
    let rest = body.collect().await.unwrap().to_bytes();
    assert!(rest.is_empty(), "after the last event: {rest:?}");
    assert_eq!(read, seen("data: 1\n\ndata: 2\n\ndata: 3\n\n"));
    head.headers
}

/// An event as it left the upstream.
fn unchanged(event: &str) -> String {
    event.to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sent_events_reach_the_client_as_they_are_sent_even_past_a_body_reading_plugin() {
    let (port, mut answers) = event_source().await;
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "u", "nodes": [{"host": "127.0.0.1", "port": port}]}],
        "plugins": [weir_tests::probe_entry("probe", json!({}))],
        "routes": [
            {"id": "plain", "uri": "/plain", "upstream_id": "u"},
            {"id": "inspected", "uri": "/inspected", "upstream_id": "u",
             "plugins": [{"name": "probe", "config": {"mode": "inspect"}}]},
        ],
    })))
    .await;
    for http2 in [false, true] {
        events_arrive_one_by_one(&gateway, &mut answers, "/plain", http2, unchanged).await;
        // The plugin asked for whole response bodies; an event stream is not held for it, and
        // its `body()` says so (the probe reads that as an empty body).
        let head =
            events_arrive_one_by_one(&gateway, &mut answers, "/inspected", http2, unchanged).await;
        assert_eq!(
            head.get("x-response-body-bytes")
                .map(|v| v.to_str().unwrap()),
            Some("0"),
            "{head:?}"
        );
    }
}

/// A gateway in front of an event source, with `chunker` entries named by `routes`' ids: each
/// route `/<id>` runs chunker with config `{"mode": <id's mode>, ...}`.
async fn chunked_gateway(
    routes: &[(&str, serde_json::Value)],
    extra: serde_json::Value,
) -> (
    TestGateway,
    mpsc::UnboundedReceiver<mpsc::UnboundedSender<Bytes>>,
) {
    let (port, answers) = event_source().await;
    let mut entry = json!({"name": "chunker", "module": weir_tests::plugins::CHUNKER, "quarantine": {"traps": 0}});
    for (key, value) in extra.as_object().unwrap() {
        entry[key] = value.clone();
    }
    let routes: Vec<_> = routes
        .iter()
        .map(|(id, config)| {
            json!({"id": id, "uri": format!("/{id}"), "upstream_id": "u",
                   "plugins": [{"name": "chunker", "config": config}]})
        })
        .collect();
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "u", "nodes": [{"host": "127.0.0.1", "port": port}]}],
        "plugins": [entry],
        "routes": routes,
    })))
    .await;
    (gateway, answers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_hook_changes_each_event_as_it_streams() {
    let (gateway, mut answers) =
        chunked_gateway(&[("upper", json!({"mode": "upper"}))], json!({})).await;
    for http2 in [false, true] {
        events_arrive_one_by_one(&gateway, &mut answers, "/upper", http2, |event| {
            event.to_ascii_uppercase()
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_chunk_hook_meets_its_own_requests_state_while_another_request_streams() {
    let (gateway, mut answers) =
        chunked_gateway(&[("tag", json!({"mode": "tag"}))], json!({})).await;
    let (a, _, mut a_body) =
        open_stream(&gateway, &mut answers, "/tag?a", false, "data: 1\n\n").await;
    let mut a_read = String::new();
    read_until(&mut a_body, &mut a_read, "[a]data: 1\n\n").await;
    // Another request's `on-request` runs between A's chunks, on the pool's warm instance.
    let (b, _, mut b_body) =
        open_stream(&gateway, &mut answers, "/tag?b", true, "data: 1\n\n").await;
    let mut b_read = String::new();
    read_until(&mut b_body, &mut b_read, "[b]data: 1\n\n").await;
    a.send(Bytes::from_static(b"data: 2\n\n")).unwrap();
    read_until(&mut a_body, &mut a_read, "data: 2\n\n").await;
    b.send(Bytes::from_static(b"data: 2\n\n")).unwrap();
    read_until(&mut b_body, &mut b_read, "data: 2\n\n").await;
    assert_eq!(a_read, "[a]data: 1\n\n[a]data: 2\n\n");
    assert_eq!(b_read, "[b]data: 1\n\n[b]data: 2\n\n");
}

/// How many times the chunker plugin was called on `route`.
async fn chunker_calls(gateway: &TestGateway, route: &str) -> f64 {
    let name =
        format!(r#"weir_plugin_calls_total{{plugin="chunker",route="{route}",tenant="default"}}"#);
    weir_tests::metric(&gateway.admin_url("/metrics"), &name).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_hook_holds_chunks_until_its_delimiter_then_passes_them_as_one() {
    let (gateway, mut answers) = chunked_gateway(
        &[("until", json!({"mode": "until", "delimiter": "\n\n"}))],
        json!({}),
    )
    .await;
    let (events, _, mut body) =
        open_stream(&gateway, &mut answers, "/until", false, "data: ").await;
    // Once the hook has had the first half of an event (and held it), the second goes.
    weir_tests::eventually("the hook to see the first half", EVENT_WAIT, || async {
        chunker_calls(&gateway, "until").await >= 1.0
    })
    .await;
    events.send(Bytes::from("1\n\n")).unwrap();
    let frame = tokio::time::timeout(EVENT_WAIT, body.frame())
        .await
        .expect("the event reached the client")
        .expect("a frame")
        .unwrap();
    let data = frame.into_data().expect("a data frame");
    assert_eq!(data, "data: 1\n\n", "the event came whole");
    drop(events);
    let rest = body.collect().await.unwrap().to_bytes();
    assert!(rest.is_empty(), "{rest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_hook_that_refuses_mid_stream_resets_it_and_the_gateway_keeps_serving() {
    let (gateway, mut answers) = chunked_gateway(
        &[("refuse", json!({"mode": "refuse", "marker": "stop"}))],
        json!({}),
    )
    .await;
    for http2 in [false, true] {
        let (events, _, mut body) =
            open_stream(&gateway, &mut answers, "/refuse", http2, "data: 1\n\n").await;
        let mut read = String::new();
        read_until(&mut body, &mut read, "data: 1\n\n").await;
        events.send(Bytes::from("data: stop\n\n")).unwrap();
        // The client sees the stream fail, not end: it never gets the refused event.
        let ended = tokio::time::timeout(EVENT_WAIT, body.collect())
            .await
            .expect("the stream was cut");
        assert!(
            ended.is_err(),
            "http2 {http2}: the stream ended cleanly: {ended:?}"
        );
        // The gateway goes on serving the route.
        events_arrive_one_by_one(&gateway, &mut answers, "/refuse", http2, unchanged).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_hook_that_refuses_a_request_body_answers_with_its_reply() {
    let up = weir_tests::Upstream::start("u").await;
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "u", "nodes": [weir_tests::node(&up)]}],
        "plugins": [{"name": "chunker", "module": weir_tests::plugins::CHUNKER}],
        "routes": [
            {"id": "refuse", "uri": "/refuse", "upstream_id": "u",
             "plugins": [{"name": "chunker", "config": {"mode": "refuse", "marker": "stop"}}]},
            {"id": "upper", "uri": "/upper", "upstream_id": "u",
             "plugins": [{"name": "chunker", "config": {"mode": "upper-request"}}]},
        ],
    })))
    .await;
    let post = |path: &str, chunks: &'static [&'static str]| {
        let frames = chunks.iter().map(|c| {
            Ok::<_, std::convert::Infallible>(http_body::Frame::data(Bytes::from_static(
                c.as_bytes(),
            )))
        });
        let request = weir_tests::request(http::Method::POST, &gateway.url(path))
            .body(StreamBody::new(futures_util::stream::iter(frames)))
            .unwrap();
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http()
            .request(request)
    };
    let reply = post("/refuse", &["fine, ", "then stop"]).await.unwrap();
    assert_eq!(reply.status(), http::StatusCode::PAYLOAD_TOO_LARGE);
    let body = reply.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "refused by chunker");
    // Every chunk of a request body goes through the hook on its way up.
    let reply = post("/upper", &["first ", "second"]).await.unwrap();
    assert_eq!(reply.status(), http::StatusCode::OK);
    let body = reply.into_body().collect().await.unwrap().to_bytes();
    let echo: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(echo["body"], "FIRST SECOND", "{echo}");
}

/// How many failures of `kind` the chunker had on `route`.
async fn chunker_failures(gateway: &TestGateway, route: &str, kind: &str) -> f64 {
    let name = format!(
        r#"weir_plugin_failures_total{{plugin="chunker",route="{route}",tenant="default",kind="{kind}"}}"#
    );
    weir_tests::metric(&gateway.admin_url("/metrics"), &name).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_chunk_hooks_meet_the_deadline_the_growth_bound_and_max_body_bytes() {
    let (gateway, mut answers) = chunked_gateway(
        &[
            ("spin", json!({"mode": "spin"})),
            ("flood", json!({"mode": "flood"})),
            ("hoard", json!({"mode": "hoard"})),
        ],
        json!({"limits": {"timeout_ms": 50, "max_body_bytes": 4096}, "failure": "closed"}),
    )
    .await;
    let chunk = format!("data: {}\n\n", "x".repeat(1000));
    for (route, kind) in [("spin", "timeout"), ("flood", "limit"), ("hoard", "limit")] {
        let (events, _, body) =
            open_stream(&gateway, &mut answers, &format!("/{route}"), false, &chunk).await;
        // The hoarder is sent chunks until what it holds is over its max_body_bytes.
        for _ in 0..8 {
            let _ = events.send(Bytes::from(chunk.clone()));
        }
        let ended = tokio::time::timeout(EVENT_WAIT, body.collect())
            .await
            .expect("the stream was cut");
        assert!(ended.is_err(), "{route}: the stream ended cleanly");
        assert_eq!(
            chunker_failures(&gateway, route, kind).await,
            1.0,
            "{route}"
        );
    }
    // The gateway goes on serving.
    let reply = weir_tests::get(&gateway.admin_url("/metrics")).await;
    assert_eq!(reply.status, http::StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn components_of_worlds_0_1_0_0_2_0_and_0_3_0_serve_in_one_chain_over_a_stream() {
    let (port, mut answers) = event_source().await;
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "u", "nodes": [{"host": "127.0.0.1", "port": port}]}],
        "plugins": [
            {"name": "ab", "module": weir_tests::plugins::PYTHON_EXAMPLE,
             "grants": {"log": true, "clock": true, "kv": true, "metrics": true, "http": {"hosts": []},
                        "wasi": ["runtime", "clocks", "random"]},
             "limits": {"memory_mb": 128, "timeout_ms": 1000}},
            {"name": "world-020", "module": weir_tests::plugins::WORLD_020},
            {"name": "chunker", "module": weir_tests::plugins::CHUNKER},
        ],
        "routes": [{"id": "mixed", "uri": "/mixed", "upstream_id": "u", "plugins": [
            {"name": "ab", "config": {"header": "x-user", "percent_b": 100}},
            {"name": "world-020", "config": {}},
            {"name": "chunker", "config": {"mode": "upper"}},
        ]}],
    })))
    .await;
    let head = events_arrive_one_by_one(&gateway, &mut answers, "/mixed", false, |event| {
        event.to_ascii_uppercase()
    })
    .await;
    let header = |name: &str| head.get(name).map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(header("x-ab-variant").as_deref(), Some("b"), "{head:?}");
    assert_eq!(header("x-world").as_deref(), Some("0.2.0"), "{head:?}");
    let status = weir_tests::admin_get(&gateway.admin_url("/v1/status"))
        .await
        .json();
    let world = |name: &str| weir_tests::plugin_world(&status, name);
    assert_eq!(world("ab"), Some(json!("0.1.0")), "{status}");
    assert_eq!(world("world-020"), Some(json!("0.2.0")), "{status}");
    assert_eq!(world("chunker"), Some(json!("0.3.0")), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_hooks_written_in_python_and_javascript_mask_and_number_a_stream() {
    let (port, mut answers) = event_source().await;
    let grants = json!({"log": true, "clock": true, "kv": true, "metrics": true, "routing": true,
                        "tracing": true, "http": {"hosts": []}, "wasi": ["runtime", "clocks", "random"]});
    let limits = json!({"memory_mb": 128, "timeout_ms": 1000});
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "u", "nodes": [{"host": "127.0.0.1", "port": port}]}],
        "plugins": [
            {"name": "mask", "module": weir_tests::plugins::PYTHON_CHUNKS, "grants": grants, "limits": limits},
            {"name": "number", "module": weir_tests::plugins::JS_CHUNKS, "grants": grants, "limits": limits,
             "isolation": "per-request"},
        ],
        "routes": [
            {"id": "masked", "uri": "/masked", "upstream_id": "u",
             "plugins": [{"name": "mask", "config": {"words": ["secret"]}}]},
            {"id": "numbered", "uri": "/numbered", "upstream_id": "u",
             "plugins": [{"name": "number", "config": {"prefix": ": "}}]},
        ],
    })))
    .await;

    // Python: a word split across two chunks is masked all the same.
    let (events, _, mut body) = open_stream(
        &gateway,
        &mut answers,
        "/masked",
        false,
        "data: a secret\n\n",
    )
    .await;
    let mut read = String::new();
    read_until(&mut body, &mut read, "data: a ******\n\n").await;
    events.send(Bytes::from("data: sec")).unwrap();
    events.send(Bytes::from("ret kept\n\n")).unwrap();
    read_until(&mut body, &mut read, "data: ****** kept\n\n").await;
    drop(events);
    assert!(body.collect().await.unwrap().to_bytes().is_empty());
    assert_eq!(read, "data: a ******\n\ndata: ****** kept\n\n");

    // JavaScript: lines are numbered across chunks, from 1 in each request's own instance.
    for _ in 0..2 {
        let (events, _, mut body) =
            open_stream(&gateway, &mut answers, "/numbered", false, "alpha\n").await;
        let mut read = String::new();
        read_until(&mut body, &mut read, "1: alpha\n").await;
        events.send(Bytes::from("beta\ngam")).unwrap();
        events.send(Bytes::from("ma\n")).unwrap();
        read_until(&mut body, &mut read, "3: gamma\n").await;
        drop(events);
        assert!(body.collect().await.unwrap().to_bytes().is_empty());
        assert_eq!(read, "1: alpha\n2: beta\n3: gamma\n");
    }
}
