//! A collector for bench/run's tracing cases (T and Te): it takes every OTLP/gRPC trace export
//! it is sent and counts the spans in it, by the `service.name` of their resource.
//!
//! ```sh
//! otlp-sink --port 4317 --count-port 4400
//! ```
//!
//! Every export is accepted (no partial success, nothing kept but the counts). A plain HTTP GET
//! of anything on `--count-port` answers the counts so far as JSON,
//! `{"weir-T":{"spans":N,"exports":M},...}`, and closes. On SIGTERM or SIGINT the same counts go
//! to stderr and it exits. One thread: bench/run pins it to a core.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Spans and export requests received, by service name.
#[derive(Default)]
struct Counts(Mutex<BTreeMap<String, (u64, u64)>>);

impl Counts {
    fn take(&self, request: &ExportTraceServiceRequest) {
        let mut counts = self.0.lock().expect("counts lock");
        let mut services = Vec::new();
        for resource in &request.resource_spans {
            let service = resource
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
                .and_then(|kv| kv.value.as_ref())
                .and_then(|value| match &value.value {
                    Some(Value::StringValue(name)) => Some(name.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            let spans: usize = resource.scope_spans.iter().map(|s| s.spans.len()).sum();
            counts.entry(service.clone()).or_default().0 += spans as u64;
            services.push(service);
        }
        // An export counts once for each service it carried spans of.
        services.sort();
        services.dedup();
        for service in services {
            counts.entry(service).or_default().1 += 1;
        }
    }

    /// `{"service":{"spans":N,"exports":M},...}`.
    fn json(&self) -> String {
        let counts = self.0.lock().expect("counts lock");
        let entries: Vec<String> = counts
            .iter()
            .map(|(service, (spans, exports))| {
                let name: String = service
                    .chars()
                    .filter(|c| *c != '"' && *c != '\\' && !c.is_control())
                    .collect();
                format!("\"{name}\":{{\"spans\":{spans},\"exports\":{exports}}}")
            })
            .collect();
        format!("{{{}}}", entries.join(","))
    }
}

struct Sink(Arc<Counts>);

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.take(request.get_ref());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// Answers each connection to the count port with the counts, whatever it asked.
async fn serve_counts(listener: tokio::net::TcpListener, counts: Arc<Counts>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let counts = counts.clone();
        tokio::spawn(async move {
            // Reads the request head (a GET has no body), then answers and closes.
            let mut head = Vec::new();
            let mut buffer = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                match stream.read(&mut buffer).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buffer[..n]),
                }
            }
            let body = counts.json();
            let response = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
                 connection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

/// `--port` and `--count-port` from the command line.
fn arguments() -> Result<(u16, u16), String> {
    let (mut port, mut count_port) = (None, None);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().ok_or(format!("{arg} needs a value"))?;
        let parsed = value.parse().map_err(|e| format!("{arg} {value}: {e}"))?;
        match arg.as_str() {
            "--port" => port = Some(parsed),
            "--count-port" => count_port = Some(parsed),
            _ => return Err(format!("unknown argument {arg}")),
        }
    }
    Ok((
        port.ok_or("--port is required")?,
        count_port.ok_or("--count-port is required")?,
    ))
}

/// Resolves on SIGTERM or SIGINT.
async fn terminated() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("a SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let (port, count_port) = arguments().unwrap_or_else(|e| {
        eprintln!("otlp-sink: {e}\nusage: otlp-sink --port PORT --count-port PORT");
        std::process::exit(2);
    });
    let counts = Arc::new(Counts::default());
    // The count port first, so that it answers by the time the gRPC port listens.
    let count_listener = tokio::net::TcpListener::bind(("127.0.0.1", count_port))
        .await
        .unwrap_or_else(|e| {
            eprintln!("otlp-sink: binding 127.0.0.1:{count_port}: {e}");
            std::process::exit(1);
        });
    tokio::spawn(serve_counts(count_listener, counts.clone()));
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let served = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(Sink(counts.clone())))
        .serve_with_shutdown(addr, terminated())
        .await;
    if let Err(e) = served {
        eprintln!("otlp-sink: serving 127.0.0.1:{port}: {e}");
        std::process::exit(1);
    }
    eprintln!("otlp-sink: received {}", counts.json());
}
