//! Errors the gateway answers with itself, as JSON `{"error", "request_id"}`.

use http::{HeaderValue, Response, StatusCode, header};

use crate::body::ProxyBody;
use crate::plugin::PluginError;
use crate::upstream::UpstreamError;

/// Why the gateway answered instead of the upstream.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
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
}

impl GatewayError {
    /// The status code the client gets.
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::NoRoute { .. } => StatusCode::NOT_FOUND,
            GatewayError::NoService { .. } => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::RequestTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::RequestBody(_) => StatusCode::BAD_REQUEST,
            GatewayError::Plugin {
                error: PluginError::Quarantined(_),
                ..
            } => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::Plugin { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            GatewayError::Upstream(e) if e.is_timeout() => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::Upstream(_)
            | GatewayError::ResponseTooLarge(_)
            | GatewayError::ResponseBody(_) => StatusCode::BAD_GATEWAY,
        }
    }

    /// The JSON response, carrying `request_id`.
    pub fn response(&self, request_id: &str) -> Response<ProxyBody> {
        json_error(self.status(), &self.to_string(), request_id)
    }
}

/// A JSON error response in the gateway's shape.
pub fn json_error(status: StatusCode, message: &str, request_id: &str) -> Response<ProxyBody> {
    let body = serde_json::json!({ "error": message, "request_id": request_id }).to_string();
    let mut response = Response::new(ProxyBody::full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
