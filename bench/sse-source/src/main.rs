//! An upstream that answers every request with a stream of server-sent events, as fast as it
//! can: bench/run's streaming cases (S, Sh and Sn) proxy it.
//!
//! ```sh
//! sse-source --port 8080 --events 1000
//! ```
//!
//! Every response is `200`, `content-type: text/event-stream`, chunked, with `--events` events
//! `data: {"n":N,"text":"token"}\n\n` (N from 0), each its own chunk and its own write to the
//! socket, like a language model's token stream. HTTP/1.1, keep-alive; the request's method,
//! path and body are ignored. One thread: bench/run pins it to a core.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

/// The body of one response: `left` more events, numbered on from `next`.
struct Events {
    next: u32,
    left: u32,
    /// Whether the last poll handed out an event: the next one returns `Pending` first (and
    /// wakes itself), so that hyper writes each event before it asks for the next, rather than
    /// gathering several into one write.
    handed: bool,
}

impl Body for Events {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.left == 0 {
            return Poll::Ready(None);
        }
        if this.handed {
            this.handed = false;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        this.handed = true;
        let event = format!("data: {{\"n\":{},\"text\":\"token\"}}\n\n", this.next);
        this.next += 1;
        this.left -= 1;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(event)))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        // Unknown: the response goes out chunked, as an event stream does.
        SizeHint::default()
    }
}

/// `--port` and `--events` from the command line.
fn arguments() -> Result<(u16, u32), String> {
    let (mut port, mut events) = (None, 1000);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().ok_or(format!("{arg} needs a value"))?;
        match arg.as_str() {
            "--port" => port = Some(value.parse().map_err(|e| format!("--port {value}: {e}"))?),
            "--events" => {
                events = value
                    .parse()
                    .map_err(|e| format!("--events {value}: {e}"))?
            }
            _ => return Err(format!("unknown argument {arg}")),
        }
    }
    Ok((port.ok_or("--port is required")?, events))
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let (port, events) = arguments().unwrap_or_else(|e| {
        eprintln!("sse-source: {e}\nusage: sse-source --port PORT [--events N (default 1000)]");
        std::process::exit(2);
    });
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap_or_else(|e| {
            eprintln!("sse-source: binding 127.0.0.1:{port}: {e}");
            std::process::exit(1);
        });
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                eprintln!("sse-source: accept: {e}");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |_request| async move {
                let body = Events {
                    next: 0,
                    left: events,
                    handed: false,
                };
                http::Response::builder()
                    .header("content-type", "text/event-stream")
                    .header("cache-control", "no-cache")
                    .body(body)
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}
