//! Errors the gateway answers with itself, as JSON `{"error", "request_id"}`.

use http::{HeaderValue, Response, StatusCode, header};

use crate::body::ProxyBody;
use crate::plugin::PluginError;
use crate::upstream::UpstreamError;

/// Why the gateway answered instead of the upstream. The `Display` text is for the log; the
/// client gets [`GatewayError::public_message`], which never names a node or an OS error.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The request cannot be served safely as sent (its path, its host).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The request has more header lines than `server.max_headers`.
    #[error("too many request headers")]
    HeadersTooLarge,
    /// No route matches the request.
    #[error("no route matches {method} {path}")]
    NoRoute {
        /// The request's method.
        method: String,
        /// The request's path.
        path: String,
    },
    /// The route's service has no live node (or the path names no service).
    #[error("no live node for service {service:?}")]
    NoService {
        /// The service's name.
        service: String,
    },
    /// The request body is over the bound that a plugin buffers.
    #[error("request body is over {0} bytes")]
    RequestTooLarge(u64),
    /// The client failed while sending its body.
    #[error("could not read the request body: {0}")]
    RequestBody(String),
    /// The client stopped sending its body for longer than `server.body_timeout_ms`.
    #[error("the client stopped sending its request body: {0}")]
    RequestBodyTimeout(String),
    /// A fail-closed plugin failed.
    #[error("plugin {plugin} failed")]
    Plugin {
        /// The plugin's name.
        plugin: String,
        /// What went wrong.
        #[source]
        error: PluginError,
    },
    /// The upstream gave no response.
    #[error("upstream failed: {0}")]
    Upstream(#[from] UpstreamError),
    /// The response body is over the bound that a plugin buffers.
    #[error("upstream response body is over {0} bytes")]
    ResponseTooLarge(u64),
    /// The upstream failed while sending a body that a plugin buffers.
    #[error("could not read the upstream response body: {0}")]
    ResponseBody(String),
    /// The upstream answered 101 to a request that did not ask to upgrade (or named no
    /// protocol).
    #[error("the upstream switched protocols unasked")]
    UnaskedUpgrade,
}

impl GatewayError {
    /// The status code the client gets.
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::BadRequest(_) => StatusCode::BAD_REQUEST,
            GatewayError::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            GatewayError::RequestBodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            GatewayError::Upstream(UpstreamError::RequestBody { stalled: true, .. }) => {
                StatusCode::REQUEST_TIMEOUT
            }
            GatewayError::Upstream(UpstreamError::RequestBody { .. }) => StatusCode::BAD_REQUEST,
            GatewayError::NoRoute { .. } => StatusCode::NOT_FOUND,
            GatewayError::NoService { .. } => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::RequestTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::RequestBody(_) => StatusCode::BAD_REQUEST,
            GatewayError::Plugin {
                error: PluginError::Quarantined(_) | PluginError::KvUnavailable(_),
                ..
            } => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::Plugin { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            GatewayError::Upstream(e) if e.is_timeout() => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::Upstream(UpstreamError::Saturated { .. }) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            GatewayError::Upstream(_)
            | GatewayError::ResponseTooLarge(_)
            | GatewayError::ResponseBody(_)
            | GatewayError::UnaskedUpgrade => StatusCode::BAD_GATEWAY,
        }
    }

    /// What the client is told: what happened, never where (no node address, no OS error).
    pub fn public_message(&self) -> String {
        match self {
            GatewayError::BadRequest(reason) => reason.clone(),
            GatewayError::HeadersTooLarge => "too many request headers".into(),
            // The client's own method and (normalised) path: nothing of the gateway's.
            GatewayError::NoRoute { .. } => self.to_string(),
            GatewayError::NoService { .. } => "no live node for the route's service".into(),
            GatewayError::RequestTooLarge(limit) => format!("request body is over {limit} bytes"),
            GatewayError::RequestBody(_)
            | GatewayError::Upstream(UpstreamError::RequestBody { stalled: false, .. }) => {
                "could not read the request body".into()
            }
            GatewayError::RequestBodyTimeout(_)
            | GatewayError::Upstream(UpstreamError::RequestBody { stalled: true, .. }) => {
                "the request body stopped arriving".into()
            }
            GatewayError::Plugin { plugin, .. } => format!("plugin {plugin} failed"),
            GatewayError::Upstream(e) if e.is_timeout() => "upstream timed out".into(),
            GatewayError::Upstream(UpstreamError::Saturated { .. }) => "upstream is busy".into(),
            GatewayError::Upstream(_) => "upstream unavailable".into(),
            GatewayError::ResponseTooLarge(limit) => {
                format!("upstream response body is over {limit} bytes")
            }
            GatewayError::ResponseBody(_) | GatewayError::UnaskedUpgrade => {
                "upstream failed while sending its response".into()
            }
        }
    }

    /// The JSON response, carrying `request_id`, and `trace_id` under tracing.
    pub fn response(&self, request_id: &str, trace_id: Option<&str>) -> Response<ProxyBody> {
        json_error(self.status(), &self.public_message(), request_id, trace_id)
    }
}

/// A JSON error response in the gateway's shape.
pub fn json_error(
    status: StatusCode,
    message: &str,
    request_id: &str,
    trace_id: Option<&str>,
) -> Response<ProxyBody> {
    let mut body = serde_json::json!({ "error": message, "request_id": request_id });
    if let Some(trace_id) = trace_id {
        body["trace_id"] = trace_id.into();
    }
    let body = body.to_string();
    let mut response = Response::new(ProxyBody::full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Whether a request speaks gRPC (or gRPC-Web): its errors must be gRPC statuses, since a gRPC
/// client cannot read a JSON body.
pub fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// The gRPC status for an HTTP status the gateway (or a plugin) answered with.
pub fn grpc_code(status: StatusCode) -> u8 {
    match status.as_u16() {
        400 => 3,             // INVALID_ARGUMENT
        401 => 16,            // UNAUTHENTICATED
        403 => 7,             // PERMISSION_DENIED
        404 => 5,             // NOT_FOUND
        408 | 504 => 4,       // DEADLINE_EXCEEDED
        413 | 429 | 431 => 8, // RESOURCE_EXHAUSTED
        500 => 13,            // INTERNAL
        502 | 503 => 14,      // UNAVAILABLE
        _ => 2,               // UNKNOWN
    }
}

/// A gRPC trailers-only response: HTTP 200 with `grpc-status` and `grpc-message` in the only
/// HEADERS frame, and no body.
pub fn grpc_error(status: StatusCode, message: &str, request_id: &str) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::Empty);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert(
        "grpc-status",
        HeaderValue::from(u16::from(grpc_code(status))),
    );
    headers.insert(
        "grpc-message",
        HeaderValue::from_str(&grpc_message(message)).expect("percent-encoded ASCII"),
    );
    if let Ok(id) = HeaderValue::from_str(request_id)
        && !request_id.is_empty()
    {
        headers.insert("x-request-id", id);
    }
    response
}

/// `grpc-message`'s encoding: bytes outside printable ASCII, and `%`, percent-encoded; at most
/// 1 KiB of the message.
fn grpc_message(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for byte in message.bytes().take(1024) {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_errors_are_trailers_only_with_a_mapped_status() {
        let response = grpc_error(StatusCode::BAD_GATEWAY, "upstream unavailable", "id-1");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["grpc-status"], "14");
        assert_eq!(response.headers()["grpc-message"], "upstream unavailable");
        assert_eq!(response.headers()["x-request-id"], "id-1");
        assert!(matches!(response.body(), ProxyBody::Empty));
        for (status, code) in [
            (401, 16),
            (403, 7),
            (404, 5),
            (429, 8),
            (500, 13),
            (503, 14),
            (504, 4),
        ] {
            assert_eq!(
                grpc_code(StatusCode::from_u16(status).unwrap()),
                code,
                "{status}"
            );
        }
        // A message with bytes a header cannot hold is percent-encoded, and bounded.
        assert_eq!(grpc_message("50% é\n"), "50%25 %C3%A9%0A");
        assert_eq!(grpc_message(&"a".repeat(5000)).len(), 1024);
    }

    #[test]
    fn grpc_requests_are_told_by_content_type() {
        let mut headers = http::HeaderMap::new();
        assert!(!is_grpc(&headers));
        headers.insert(
            header::CONTENT_TYPE,
            "application/grpc+proto".parse().unwrap(),
        );
        assert!(is_grpc(&headers));
        headers.insert(
            header::CONTENT_TYPE,
            "application/grpc-web".parse().unwrap(),
        );
        assert!(is_grpc(&headers));
        headers.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        assert!(!is_grpc(&headers));
    }
}
