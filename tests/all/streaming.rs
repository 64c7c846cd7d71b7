//! Bodies that stream: server-sent events reach the client one by one, as the upstream sends
//! them, whether or not a plugin on the route reads whole bodies.

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

/// Through `path`, the upstream sends each event only once the client has read the one before:
/// a gateway that held any of them back would never see the stream end.
async fn events_arrive_one_by_one(
    gateway: &TestGateway,
    answers: &mut mpsc::UnboundedReceiver<mpsc::UnboundedSender<Bytes>>,
    path: &str,
    http2: bool,
) -> http::HeaderMap {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(http2)
        .build_http::<http_body_util::Empty<Bytes>>();
    let request = weir_tests::request(http::Method::GET, &gateway.url(path))
        .header("accept", "text/event-stream")
        .body(http_body_util::Empty::new())
        .unwrap();
    let asked = tokio::spawn(client.request(request));
    let events = answers.recv().await.expect("the upstream was asked");
    events.send(Bytes::from("data: 1\n\n")).unwrap();
    let response = tokio::time::timeout(EVENT_WAIT, asked)
        .await
        .expect("the response head reached the client")
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), http::StatusCode::OK);
    let (head, mut body) = response.into_parts();
    let mut read = String::new();
    read_until(&mut body, &mut read, "data: 1\n\n").await;
    for n in 2..=3 {
        let event = format!("data: {n}\n\n");
        events.send(Bytes::from(event.clone())).unwrap();
        read_until(&mut body, &mut read, &event).await;
    }
    drop(events);
    let rest = body.collect().await.unwrap().to_bytes();
    assert!(rest.is_empty(), "after the last event: {rest:?}");
    assert_eq!(read, "data: 1\n\ndata: 2\n\ndata: 3\n\n");
    head.headers
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
        events_arrive_one_by_one(&gateway, &mut answers, "/plain", http2).await;
        // The plugin asked for whole response bodies; an event stream is not held for it, and
        // its `body()` says so (the probe reads that as an empty body).
        let head = events_arrive_one_by_one(&gateway, &mut answers, "/inspected", http2).await;
        assert_eq!(
            head.get("x-response-body-bytes")
                .map(|v| v.to_str().unwrap()),
            Some("0"),
            "{head:?}"
        );
    }
}
