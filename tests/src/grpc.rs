//! A real gRPC service for the tests (tonic, from tests/proto/echo.proto): one method per
//! kind of call, answering as the request says.

use std::net::SocketAddr;
use std::pin::Pin;

use futures_util::{Stream, StreamExt};
use tokio::net::TcpListener;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status, Streaming};

/// The generated messages, client and server.
pub mod echo {
    tonic::include_proto!("weir.test");
}

use echo::echo_server::{Echo, EchoServer};
use echo::{EchoReply, EchoRequest};

/// The echo service.
#[derive(Debug, Default)]
pub struct EchoService;

type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

/// `fail` as an error status, with `x-trailer` in its (trailing) metadata.
fn failure(fail: &str) -> Status {
    let mut metadata = tonic::metadata::MetadataMap::new();
    metadata.insert("x-trailer", MetadataValue::from_static("from-the-server"));
    Status::with_metadata(tonic::Code::Aborted, fail, metadata)
}

#[tonic::async_trait]
impl Echo for EchoService {
    async fn unary(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let seen = request.metadata().get("x-client-meta").cloned();
        let message = request.into_inner();
        if !message.fail.is_empty() {
            return Err(failure(&message.fail));
        }
        let mut response = Response::new(EchoReply {
            message: message.message,
            payload: message.payload,
        });
        if let Some(seen) = seen {
            response.metadata_mut().insert("x-server-meta", seen);
        }
        Ok(response)
    }

    type ServerStreamStream = ReplyStream;

    async fn server_stream(
        &self,
        request: Request<EchoRequest>,
    ) -> Result<Response<ReplyStream>, Status> {
        let message = request.into_inner();
        let replies = (0..message.count).map(move |i| {
            Ok(EchoReply {
                message: format!("{} {i}", message.message),
                payload: Vec::new(),
            })
        });
        let end = (!message.fail.is_empty()).then(|| Err(failure(&message.fail)));
        let stream = futures_util::stream::iter(replies.chain(end));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn client_stream(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoReply>, Status> {
        let mut stream = request.into_inner();
        let mut joined = Vec::new();
        while let Some(message) = stream.next().await {
            joined.push(message?.message);
        }
        Ok(Response::new(EchoReply {
            message: joined.join(","),
            payload: Vec::new(),
        }))
    }

    type BidiStream = ReplyStream;

    async fn bidi(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<ReplyStream>, Status> {
        let stream = request.into_inner().map(|message| {
            message.map(|m| EchoReply {
                message: m.message.to_uppercase(),
                payload: Vec::new(),
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Serves the echo service (h2c) on a loopback port until the test ends.
pub async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding");
    let addr = listener.local_addr().expect("an address");
    let incoming = tokio_stream_from(listener);
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(
                EchoServer::new(EchoService)
                    .max_decoding_message_size(8 << 20)
                    .max_encoding_message_size(8 << 20),
            )
            .serve_with_incoming(incoming)
            .await;
    });
    addr
}

/// The listener's connections as the stream tonic serves.
fn tokio_stream_from(
    listener: TcpListener,
) -> impl Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures_util::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| stream);
        Some((accepted, listener))
    })
}
