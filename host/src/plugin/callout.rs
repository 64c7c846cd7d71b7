//! The outbound HTTP call plugins make: only to granted hosts, with granted methods, bounded
//! in time and response size.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::bindings::weir::plugin0_1_0::http_client::{IncomingResponse, OutgoingRequest};
use crate::config::HttpGrant;

/// Headers a plugin may not set on a call: the client manages the connection and framing.
const MANAGED: &[&str] = &[
    "host",
    "connection",
    "content-length",
    "transfer-encoding",
    "upgrade",
];

/// The client plugins' calls go through.
#[derive(Clone)]
pub struct Callouts {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Default for Callouts {
    fn default() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        connector.set_nodelay(true);
        Callouts {
            client: Client::builder(TokioExecutor::new()).build(connector),
        }
    }
}

/// `host` or `host:port` (default port 80), lower-case, as grants and URLs are compared.
fn normalise(authority: &str) -> String {
    let lower = authority.to_ascii_lowercase();
    if lower
        .rsplit_once(':')
        .is_some_and(|(_, port)| port.parse::<u16>().is_ok())
        && !lower.ends_with(']')
    {
        lower
    } else {
        format!("{lower}:80")
    }
}

/// Checks a call against the grant; the error goes back to the plugin.
pub fn permitted(grant: &HttpGrant, method: &str, url: &str) -> Result<(Method, Uri), String> {
    let uri: Uri = url.parse().map_err(|_| format!("{url:?} is not a URL"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("{url:?}: only http:// URLs can be called"));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| format!("{url:?} has no host"))?;
    if authority.as_str().contains('@') {
        return Err(format!("{url:?}: credentials in the URL are not allowed"));
    }
    let wanted = normalise(authority.as_str());
    if !grant.hosts.iter().any(|host| normalise(host) == wanted) {
        return Err(format!("host {wanted} is not granted"));
    }
    let method = method.to_ascii_uppercase();
    if !grant
        .methods
        .iter()
        .any(|m| m.eq_ignore_ascii_case(&method))
    {
        return Err(format!("method {method} is not granted"));
    }
    let method =
        Method::from_bytes(method.as_bytes()).map_err(|_| format!("{method:?} is not a method"))?;
    Ok((method, uri))
}

impl Callouts {
    /// Sends a permitted call and reads the whole response; every failure is a message.
    pub async fn send(
        &self,
        grant: &HttpGrant,
        request: OutgoingRequest,
    ) -> Result<IncomingResponse, String> {
        let (method, uri) = permitted(grant, &request.method, &request.url)?;
        let mut outgoing = Request::new(Full::new(Bytes::from(request.body)));
        *outgoing.method_mut() = method;
        *outgoing.uri_mut() = uri;
        for (name, value) in request.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("{name:?} is not a header name"))?;
            if MANAGED.contains(&name.as_str()) {
                continue;
            }
            let value = HeaderValue::from_str(&value)
                .map_err(|_| format!("the value of {name} is not valid"))?;
            outgoing.headers_mut().append(name, value);
        }
        let limit = usize::try_from(grant.max_response_bytes).unwrap_or(usize::MAX);
        let call = async {
            let response = self
                .client
                .request(outgoing)
                .await
                .map_err(|e| format!("call failed: {e}"))?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, limit)
                .collect()
                .await
                .map_err(|e| format!("reading the response failed: {e}"))?
                .to_bytes();
            let headers = parts
                .headers
                .iter()
                .map(|(n, v)| {
                    (
                        n.to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect();
            Ok(IncomingResponse {
                status: parts.status.as_u16(),
                headers,
                body: body.to_vec(),
            })
        };
        match tokio::time::timeout(Duration::from_millis(grant.timeout_ms), call).await {
            Ok(result) => result,
            Err(_) => Err(format!("no answer within {} ms", grant.timeout_ms)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(hosts: &[&str], methods: &[&str]) -> HttpGrant {
        HttpGrant {
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            methods: methods.iter().map(|m| m.to_string()).collect(),
            timeout_ms: 100,
            max_response_bytes: 100,
        }
    }

    #[test]
    fn only_granted_hosts_and_methods_pass() {
        let g = grant(&["api.internal", "10.0.0.5:8080"], &["GET", "POST"]);
        permitted(&g, "get", "http://api.internal/x").unwrap();
        permitted(&g, "GET", "http://API.internal:80/x").unwrap();
        permitted(&g, "POST", "http://10.0.0.5:8080/y?z=1").unwrap();
        let refused = |method: &str, url: &str| permitted(&g, method, url).unwrap_err();
        assert!(refused("GET", "http://10.0.0.5:8081/").contains("not granted"));
        assert!(
            refused("GET", "http://evil.example/").contains("host evil.example:80 is not granted")
        );
        assert!(refused("DELETE", "http://api.internal/").contains("method DELETE is not granted"));
        assert!(refused("GET", "https://api.internal/").contains("only http://"));
        assert!(refused("GET", "http://user:pw@api.internal/").contains("credentials"));
        assert!(refused("GET", "/relative").contains("only http://"));
    }
}
