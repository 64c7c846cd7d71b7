//! gRPC-Web, as Envoy's grpc_web filter does it: a browser's `application/grpc-web` request
//! goes to the upstream as gRPC, and the upstream's trailers come back to the browser as the
//! body's last frame (flag `0x80`), since browsers cannot read HTTP trailers.
//!
//! Only the binary forms (`application/grpc-web`, `application/grpc-web+proto`) are
//! translated; the base64 `application/grpc-web-text` is not.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderValue};
use http_body::{Body, Frame, SizeHint};

use crate::body::stream::BodyError;

/// The flag byte of a frame that carries trailers rather than a message.
const TRAILERS_FLAG: u8 = 0x80;

/// The content-type prefix of a gRPC-Web request.
const WEB: &str = "application/grpc-web";

/// What follows `application/grpc-web` in a request's content type, when it is binary
/// gRPC-Web: `""`, `+proto`, or parameters after `;`.
fn web_suffix(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix(WEB))
        .filter(|rest| rest.is_empty() || rest.starts_with('+') || rest.starts_with(';'))
}

/// Whether a request is binary gRPC-Web.
pub fn is_grpc_web(headers: &HeaderMap) -> bool {
    web_suffix(headers).is_some()
}

/// Makes a gRPC-Web request's head a gRPC one: `application/grpc-web+proto` becomes
/// `application/grpc+proto`. The body's framing is the same in both.
pub fn request_to_grpc(headers: &mut HeaderMap) {
    let Some(value) = web_suffix(headers)
        .and_then(|rest| HeaderValue::from_str(&format!("application/grpc{rest}")).ok())
    else {
        return;
    };
    headers.insert(header::CONTENT_TYPE, value);
    // The length stays right (the body is unchanged), but HTTP/2 does not need it.
    headers.remove(header::CONTENT_LENGTH);
}

/// Makes a gRPC response's head a gRPC-Web one: `application/grpc+proto` becomes
/// `application/grpc-web+proto` (and an answer with no gRPC content type gets
/// `application/grpc-web+proto`, so that the browser's client reads its status).
pub fn response_to_web(headers: &mut HeaderMap) {
    let suffix = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("application/grpc"))
        .filter(|rest| !rest.starts_with('-'))
        .map(str::to_owned)
        .unwrap_or_else(|| "+proto".into());
    if let Ok(value) = HeaderValue::from_str(&format!("{WEB}{suffix}")) {
        headers.insert(header::CONTENT_TYPE, value);
    }
    // The trailers frame makes the body longer than the upstream said.
    headers.remove(header::CONTENT_LENGTH);
}

/// The trailers as gRPC-Web's last frame: the flag, a 4-byte length, then `name:value\r\n`
/// lines.
pub fn trailers_frame(trailers: &HeaderMap) -> Bytes {
    let mut block = Vec::new();
    for (name, value) in trailers {
        block.extend_from_slice(name.as_str().as_bytes());
        block.push(b':');
        block.extend_from_slice(value.as_bytes());
        block.extend_from_slice(b"\r\n");
    }
    let mut frame = BytesMut::with_capacity(5 + block.len());
    frame.put_u8(TRAILERS_FLAG);
    frame.put_u32(u32::try_from(block.len()).unwrap_or(u32::MAX));
    frame.extend_from_slice(&block);
    frame.freeze()
}

/// A gRPC response body as a gRPC-Web one: messages as they are, then the trailers as a
/// frame.
#[derive(Debug)]
pub struct WebBody<B> {
    inner: B,
    done: bool,
}

impl<B> WebBody<B> {
    /// The gRPC-Web form of `inner`.
    pub fn new(inner: B) -> Self {
        WebBody { inner, done: false }
    }
}

impl<B> Body for WebBody<B>
where
    B: Body<Data = Bytes, Error = BodyError> + Unpin,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => match frame.into_trailers() {
                Ok(trailers) => {
                    this.done = true;
                    Poll::Ready(Some(Ok(Frame::data(trailers_frame(&trailers)))))
                }
                Err(frame) => Poll::Ready(Some(Ok(frame))),
            },
            Poll::Ready(None) => {
                this.done = true;
                Poll::Ready(None)
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = SizeHint::new();
        hint.set_lower(self.inner.size_hint().lower());
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::ProxyBody;
    use http_body_util::BodyExt;

    fn content_type(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, value.parse().unwrap());
        headers
    }

    #[test]
    fn only_binary_grpc_web_is_translated() {
        assert!(is_grpc_web(&content_type("application/grpc-web")));
        assert!(is_grpc_web(&content_type("application/grpc-web+proto")));
        assert!(!is_grpc_web(&content_type("application/grpc-web-text")));
        assert!(!is_grpc_web(&content_type("application/grpc")));
        assert!(!is_grpc_web(&content_type("application/grpc-webby")));
        let mut headers = content_type("application/grpc-web+proto");
        headers.insert(header::CONTENT_LENGTH, "5".parse().unwrap());
        request_to_grpc(&mut headers);
        assert_eq!(headers[header::CONTENT_TYPE], "application/grpc+proto");
        assert!(!headers.contains_key(header::CONTENT_LENGTH));
        let mut headers = content_type("application/grpc");
        response_to_web(&mut headers);
        assert_eq!(headers[header::CONTENT_TYPE], "application/grpc-web");
        let mut headers = content_type("application/json");
        response_to_web(&mut headers);
        assert_eq!(headers[header::CONTENT_TYPE], "application/grpc-web+proto");
    }

    #[tokio::test]
    async fn trailers_become_the_last_frame() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        trailers.insert("grpc-message", "ok".parse().unwrap());
        let message = Bytes::from_static(b"\0\0\0\0\x02hi");
        let body = WebBody::new(ProxyBody::trailed(message.clone(), Some(trailers)));
        let bytes = body.collect().await.unwrap().to_bytes();
        let (first, last) = bytes.split_at(message.len());
        assert_eq!(first, &message[..]);
        assert_eq!(last[0], TRAILERS_FLAG);
        let length = u32::from_be_bytes(last[1..5].try_into().unwrap()) as usize;
        assert_eq!(length, last.len() - 5);
        assert_eq!(&last[5..], b"grpc-status:0\r\ngrpc-message:ok\r\n");
    }
}
