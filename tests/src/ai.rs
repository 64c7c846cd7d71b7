//! Fake AI providers on loopback: an OpenAI-compatible one and an Anthropic one, each
//! answering chat requests whole or as server-sent events the way the real ones do (OpenAI's
//! `data:` chunks and `[DONE]`, Anthropic's typed events), with `usage`; and the Python with the
//! `openai` package that the tests use as a client is [`crate::python`].

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// The API a fake provider speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    /// OpenAI's chat completions (`POST /v1/chat/completions`, `Authorization: Bearer`).
    OpenAi,
    /// Anthropic's Messages API (`POST /v1/messages`, `x-api-key`).
    Anthropic,
}

/// A request a fake provider received.
#[derive(Clone, Debug)]
pub struct Received {
    /// The path, with any query.
    pub path: String,
    /// The request's headers.
    pub headers: HeaderMap,
    /// The request's body, parsed.
    pub body: Value,
}

/// What a fake provider answers.
#[derive(Clone, Debug)]
pub enum Answering {
    /// A completion of its reply, whole or streamed as the request asks.
    Completion,
    /// This status, with the provider's error body (which names the key it was sent, as
    /// OpenAI's does for a wrong key).
    Fail(u16),
}

struct Shared {
    api: Api,
    key: String,
    reply: Vec<String>,
    answering: Mutex<Answering>,
    received: Mutex<Vec<Received>>,
}

/// A fake provider: what it answers, and what it received.
pub struct FakeProvider {
    shared: Arc<Shared>,
    port: u16,
}

impl FakeProvider {
    /// A provider of `api` on a loopback port that accepts only `key`, and whose completions
    /// say `reply` (streamed one word per event).
    pub async fn start(api: Api, key: &str, reply: &str) -> FakeProvider {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared {
            api,
            key: key.to_owned(),
            reply: reply.split_inclusive(' ').map(str::to_owned).collect(),
            answering: Mutex::new(Answering::Completion),
            received: Mutex::default(),
        });
        let serving = shared.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let shared = serving.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(answer(&shared, request).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
                });
            }
        });
        FakeProvider { shared, port }
    }

    /// The provider's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The gateway's upstream `id` for this provider.
    pub fn upstream(&self, id: &str) -> Value {
        json!({"id": id, "nodes": [{"host": "127.0.0.1", "port": self.port, "weight": 1}]})
    }

    /// Answers every later request with `answering`.
    pub fn answer_with(&self, answering: Answering) {
        *self.shared.answering.lock().unwrap() = answering;
    }

    /// Every request received so far.
    pub fn received(&self) -> Vec<Received> {
        self.shared.received.lock().unwrap().clone()
    }

    /// The words of this provider's reply, as its stream sends them.
    pub fn reply_words(&self) -> Vec<String> {
        self.shared.reply.clone()
    }

    /// The whole reply.
    pub fn reply(&self) -> String {
        self.shared.reply.concat()
    }
}

/// A fake provider's answer body: whole (with its length) or streamed.
type Body = BoxBody<Bytes, Infallible>;

/// The prompt and completion tokens every fake completion reports.
pub const USAGE: (u64, u64) = (11, 7);

async fn answer(shared: &Shared, request: http::Request<Incoming>) -> Response<Body> {
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    shared.received.lock().unwrap().push(Received {
        path: path.clone(),
        headers: parts.headers.clone(),
        body: body.clone(),
    });
    let sent_key = match shared.api {
        Api::OpenAi => parts
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default()
            .to_owned(),
        Api::Anthropic => parts
            .headers
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned(),
    };
    let expected = match shared.api {
        Api::OpenAi => "/v1/chat/completions",
        Api::Anthropic => "/v1/messages",
    };
    let answering = shared.answering.lock().unwrap().clone();
    let failed = match answering {
        Answering::Fail(status) => Some(status),
        Answering::Completion if sent_key != shared.key => Some(401),
        Answering::Completion if path != expected => Some(404),
        Answering::Completion => None,
    };
    if let Some(status) = failed {
        let message = format!("refused the request with key {sent_key}");
        let error = match shared.api {
            Api::OpenAi => json!({"error": {"message": message, "type": "requests",
                                  "param": null, "code": "rate_limit_exceeded"}}),
            Api::Anthropic => json!({"type": "error",
                                     "error": {"type": "rate_limit_error", "message": message}}),
        };
        return whole(StatusCode::from_u16(status).unwrap(), &error);
    }
    let model = body["model"].as_str().unwrap_or_default().to_owned();
    let streamed = body["stream"] == true;
    let (prompt, completion) = USAGE;
    match (shared.api, streamed) {
        (Api::OpenAi, false) => whole(
            StatusCode::OK,
            &json!({
                "id": "chatcmpl-fake", "object": "chat.completion", "created": 1_700_000_000,
                "model": model,
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": shared.reply.concat()}}],
                "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                          "total_tokens": prompt + completion},
            }),
        ),
        (Api::OpenAi, true) => {
            let chunk = |delta: Value, finish: Value| {
                json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk",
                       "created": 1_700_000_000, "model": model,
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
            };
            let mut events = vec![chunk(
                json!({"role": "assistant", "content": ""}),
                Value::Null,
            )];
            for word in &shared.reply {
                events.push(chunk(json!({"content": word}), Value::Null));
            }
            events.push(chunk(json!({}), json!("stop")));
            if body["stream_options"]["include_usage"] == true {
                events.push(
                    json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk",
                    "created": 1_700_000_000, "model": model, "choices": [],
                    "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                              "total_tokens": prompt + completion}}),
                );
            }
            let mut frames: Vec<String> = events
                .iter()
                .map(|event| format!("data: {event}\n\n"))
                .collect();
            frames.push("data: [DONE]\n\n".into());
            event_stream(frames)
        }
        (Api::Anthropic, false) => whole(
            StatusCode::OK,
            &json!({
                "id": "msg_fake", "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": shared.reply.concat()}],
                "stop_reason": "end_turn", "stop_sequence": null,
                "usage": {"input_tokens": prompt, "output_tokens": completion},
            }),
        ),
        (Api::Anthropic, true) => {
            let mut events = vec![
                (
                    "message_start",
                    json!({"type": "message_start", "message": {
                    "id": "msg_fake", "type": "message", "role": "assistant", "model": model,
                    "content": [], "stop_reason": null,
                    "usage": {"input_tokens": prompt, "output_tokens": 1}}}),
                ),
                (
                    "content_block_start",
                    json!({"type": "content_block_start", "index": 0,
                    "content_block": {"type": "text", "text": ""}}),
                ),
                ("ping", json!({"type": "ping"})),
            ];
            for word in &shared.reply {
                events.push((
                    "content_block_delta",
                    json!({"type": "content_block_delta",
                    "index": 0, "delta": {"type": "text_delta", "text": word}}),
                ));
            }
            events.push((
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 0}),
            ));
            events.push((
                "message_delta",
                json!({"type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                "usage": {"output_tokens": completion}}),
            ));
            events.push(("message_stop", json!({"type": "message_stop"})));
            let frames = events
                .into_iter()
                .map(|(name, data)| format!("event: {name}\ndata: {data}\n\n"))
                .collect();
            event_stream(frames)
        }
    }
}

fn whole(status: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .unwrap()
}

/// Sends each of `frames` as a frame of its own, as a provider flushes each event.
fn event_stream(frames: Vec<String>) -> Response<Body> {
    let frames = futures_util::stream::iter(
        frames
            .into_iter()
            .map(|frame| Ok(http_body::Frame::data(Bytes::from(frame)))),
    );
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(StreamBody::new(frames).boxed())
        .unwrap()
}
