//! A real OTLP receiver for the tracing tests, built on OpenTelemetry's own protos
//! (`opentelemetry-proto` with tonic): it takes traces over gRPC and over HTTP/protobuf, and
//! keeps every span it got, for a test to wait on and look at.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};

/// One span as the receiver got it, flattened for asserting.
#[derive(Clone, Debug)]
pub struct ReceivedSpan {
    /// The trace id, as 32 hex digits.
    pub trace_id: String,
    /// The span id, as 16 hex digits.
    pub span_id: String,
    /// The parent's span id, as 16 hex digits; empty for a root.
    pub parent_id: String,
    /// Its name.
    pub name: String,
    /// Its kind (OTLP's numbering: 1 internal, 2 server, 3 client).
    pub kind: i32,
    /// Its attributes, each value as text.
    pub attributes: Vec<(String, String)>,
    /// Its events' names.
    pub events: Vec<String>,
    /// Its status code (OTLP's: 0 unset, 1 ok, 2 error).
    pub status: i32,
    /// The `service.name` of its resource.
    pub service: String,
    /// Its start, in nanoseconds since the epoch.
    pub start_ns: u64,
    /// Its end, in nanoseconds since the epoch.
    pub end_ns: u64,
}

impl ReceivedSpan {
    /// The value of attribute `key`, if it has one.
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct Received {
    spans: Mutex<Vec<ReceivedSpan>>,
    /// Export requests taken, over either protocol.
    requests: Mutex<(usize, Vec<http::HeaderMap>)>,
    arrived: Notify,
}

impl Received {
    fn take(&self, request: ExportTraceServiceRequest, headers: http::HeaderMap) {
        let mut flat = Vec::new();
        for resource in request.resource_spans {
            let service = resource
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
                .and_then(|kv| kv.value.as_ref())
                .map(text)
                .unwrap_or_default();
            for scope in resource.scope_spans {
                for span in scope.spans {
                    flat.push(ReceivedSpan {
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_id: hex(&span.parent_span_id),
                        name: span.name,
                        kind: span.kind,
                        attributes: span
                            .attributes
                            .iter()
                            .map(|kv| {
                                (
                                    kv.key.clone(),
                                    kv.value.as_ref().map(text).unwrap_or_default(),
                                )
                            })
                            .collect(),
                        events: span.events.iter().map(|e| e.name.clone()).collect(),
                        status: span.status.map_or(0, |s| s.code),
                        service: service.clone(),
                        start_ns: span.start_time_unix_nano,
                        end_ns: span.end_time_unix_nano,
                    });
                }
            }
        }
        self.spans.lock().unwrap().extend(flat);
        let mut requests = self.requests.lock().unwrap();
        requests.0 += 1;
        requests.1.push(headers);
        self.arrived.notify_waiters();
    }
}

fn text(value: &opentelemetry_proto::tonic::common::v1::AnyValue) -> String {
    match &value.value {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

struct Service(Arc<Received>);

#[tonic::async_trait]
impl TraceService for Service {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let headers = request.metadata().clone().into_headers();
        self.0.take(request.into_inner(), headers);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// The receiver: a gRPC or an HTTP/protobuf OTLP endpoint on a port of its own.
pub struct OtlpReceiver {
    addr: SocketAddr,
    received: Arc<Received>,
    stop: watch::Sender<bool>,
}

impl OtlpReceiver {
    /// A receiver of OTLP/gRPC.
    pub async fn grpc() -> OtlpReceiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding");
        let addr = listener.local_addr().expect("an address");
        let received = Arc::new(Received::default());
        let (stop, mut stopped) = watch::channel(false);
        let service = TraceServiceServer::new(Service(received.clone()));
        tokio::spawn(async move {
            let incoming = tokio_stream_listener(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stopped.changed().await;
                })
                .await;
        });
        OtlpReceiver {
            addr,
            received,
            stop,
        }
    }

    /// A receiver of OTLP/HTTP with protobuf bodies, at `/v1/traces`.
    pub async fn http() -> OtlpReceiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding");
        let addr = listener.local_addr().expect("an address");
        let received = Arc::new(Received::default());
        let (stop, mut stopped) = watch::channel(false);
        let shared = received.clone();
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    _ = stopped.changed() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => continue,
                    },
                };
                let received = shared.clone();
                tokio::spawn(async move {
                    let service =
                        service_fn(move |request: http::Request<hyper::body::Incoming>| {
                            let received = received.clone();
                            async move {
                                let ok = request.uri().path() == "/v1/traces"
                                    && request.headers().get("content-type").map(|v| v.as_bytes())
                                        == Some(b"application/x-protobuf");
                                let (parts, body) = request.into_parts();
                                let bytes = body
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                let decoded = ExportTraceServiceRequest::decode(bytes);
                                let status = match decoded {
                                    Ok(decoded) if ok => {
                                        received.take(decoded, parts.headers);
                                        200
                                    }
                                    _ => 400,
                                };
                                let answer = ExportTraceServiceResponse {
                                    partial_success: None,
                                };
                                let mut response = http::Response::new(Full::new(Bytes::from(
                                    answer.encode_to_vec(),
                                )));
                                *response.status_mut() =
                                    http::StatusCode::from_u16(status).unwrap();
                                response.headers_mut().insert(
                                    "content-type",
                                    http::HeaderValue::from_static("application/x-protobuf"),
                                );
                                Ok::<_, std::convert::Infallible>(response)
                            }
                        });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        OtlpReceiver {
            addr,
            received,
            stop,
        }
    }

    /// The endpoint to configure: `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.received.spans.lock().unwrap().clone()
    }

    /// The headers of every export request received so far.
    pub fn request_headers(&self) -> Vec<http::HeaderMap> {
        self.received.requests.lock().unwrap().1.clone()
    }

    /// Waits until the spans received satisfy `done`, and returns them; panics with `what`
    /// after `limit`.
    pub async fn wait_for(
        &self,
        what: &str,
        limit: Duration,
        mut done: impl FnMut(&[ReceivedSpan]) -> bool,
    ) -> Vec<ReceivedSpan> {
        let waited = tokio::time::timeout(limit, async {
            loop {
                // Registered before the check, so that spans arriving after it still wake us.
                let arrived = self.received.arrived.notified();
                let mut arrived = std::pin::pin!(arrived);
                arrived.as_mut().enable();
                let spans = self.spans();
                if done(&spans) {
                    return spans;
                }
                arrived.await;
            }
        })
        .await;
        match waited {
            Ok(spans) => spans,
            Err(_) => panic!(
                "gave up after {limit:?} waiting for spans: {what}; got {:#?}",
                self.spans()
            ),
        }
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// `listener`'s connections as the stream tonic serves.
fn tokio_stream_listener(
    listener: TcpListener,
) -> impl futures_util::Stream<Item = Result<tokio::net::TcpStream, std::io::Error>> {
    futures_util::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| stream);
        Some((accepted, listener))
    })
}
