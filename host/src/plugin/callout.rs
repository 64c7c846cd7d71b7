//! The outbound HTTP call plugins make: only to granted hosts, with granted methods, bounded
//! in time and response size.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::bindings::weir::plugin0_1_0::http_client::{IncomingResponse, OutgoingRequest};
use crate::config::HttpGrant;
use crate::edge::trace::{TRACEPARENT, TRACESTATE, TraceContext};

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

/// Whether an address is on the public internet: not loopback, link-local, private, shared
/// (CGNAT), unspecified, multicast, broadcast, documentation or reserved, including such an
/// address carried inside an IPv6 one (IPv4-mapped, NAT64, 6to4).
fn public(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => public_v4(v4),
        IpAddr::V6(v6) => public_v6(v6),
    }
}

fn public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(a == 0 // "this network", and 0.0.0.0
        || a == 10
        || a == 127
        || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
        || (a == 169 && b == 254)
        || (a == 172 && (16..32).contains(&b))
        || (a == 192 && b == 168)
        || (a == 192 && b == 0 && (c == 0 || c == 2)) // IETF assignments, TEST-NET-1
        || (a == 198 && (b == 18 || b == 19)) // benchmarking
        || (a == 198 && b == 51 && c == 100)
        || (a == 203 && b == 0 && c == 113)
        || a >= 224) // multicast, reserved, broadcast
}

fn public_v6(ip: Ipv6Addr) -> bool {
    let segments = ip.segments();
    let embedded = |high: u16, low: u16| {
        let [a, b] = high.to_be_bytes();
        let [c, d] = low.to_be_bytes();
        Ipv4Addr::new(a, b, c, d)
    };
    if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
        return false;
    }
    match segments[0] {
        // Unique local (fc00::/7), link-local (fe80::/10) and the old site-local (fec0::/10).
        first
            if first & 0xfe00 == 0xfc00 || first & 0xffc0 == 0xfe80 || first & 0xffc0 == 0xfec0 =>
        {
            false
        }
        // IPv4-compatible (::a.b.c.d), which some stacks still route to the IPv4 address.
        0 if segments[1..6] == [0; 5] => public_v4(embedded(segments[6], segments[7])),
        // NAT64 (64:ff9b::/96 and the local-use 64:ff9b:1::/48) reach the IPv4 address inside.
        0x64 if segments[1] == 0xff9b => {
            segments[2] == 0
                && segments[3..6] == [0; 3]
                && public_v4(embedded(segments[6], segments[7]))
        }
        // 6to4 carries an IPv4 address in its second and third segments.
        0x2002 => public_v4(embedded(segments[1], segments[2])),
        // Documentation (2001:db8::/32), and Teredo (2001::/32), which tunnels anywhere.
        0x2001 => segments[1] != 0x0db8 && segments[1] != 0,
        _ => true,
    }
}

/// Where a permitted call to `uri` may connect: the granted IP literal itself, or every address
/// its host name resolves to, each of them public unless the grant says `private: true`. The
/// call connects only to these, so DNS cannot move it after the check.
async fn destinations(grant: &HttpGrant, uri: &Uri) -> Result<Vec<SocketAddr>, String> {
    let host = uri.host().unwrap_or_default();
    let port = uri.port_u16().unwrap_or(80);
    let literal = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    // The grant named this very address (it matched the URL's host), so it is what the
    // operator allowed, private or not.
    if let Ok(ip) = literal.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    // The resolver's error names the OS's reason; the plugin needs only the fact.
    let resolved: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|_| format!("host {host} could not be resolved"))?
        .map(|addr| SocketAddr::new(addr.ip().to_canonical(), addr.port()))
        .collect();
    if resolved.is_empty() {
        return Err(format!("host {host} could not be resolved"));
    }
    if !grant.private && !resolved.iter().all(|addr| public(addr.ip())) {
        return Err(format!(
            "host {host} resolves to an address that is not public (loopback, private, \
             link-local...); the grant needs private: true to call it"
        ));
    }
    Ok(resolved)
}

/// A call checked against its grant when it was made, to be sent later (a proxy-wasm
/// filter's `proxy_http_call`, sent once the filter's callback can run).
pub struct Call {
    grant: HttpGrant,
    request: OutgoingRequest,
}

impl Call {
    /// The call, if `grant` permits it; the error says why not.
    pub fn new(grant: &HttpGrant, request: OutgoingRequest) -> Result<Self, String> {
        permitted(grant, &request.method, &request.url)?;
        Ok(Call {
            grant: grant.clone(),
            request,
        })
    }
}

impl Callouts {
    /// Sends a call made earlier, as [`Callouts::send`] does.
    pub async fn send_call(&self, call: Call) -> Result<IncomingResponse, String> {
        self.send(&call.grant, call.request, None).await
    }

    /// Sends a permitted call and reads the whole response; every failure is a message. In a
    /// traced request, the call carries `trace` as its `traceparent`, in place of any the
    /// plugin set.
    pub async fn send(
        &self,
        grant: &HttpGrant,
        request: OutgoingRequest,
        trace: Option<TraceContext>,
    ) -> Result<IncomingResponse, String> {
        let (method, uri) = permitted(grant, &request.method, &request.url)?;
        let authority = uri.authority().expect("a permitted URL has a host").clone();
        let mut headers = HeaderMap::new();
        // The name the grant matched, not the address the call goes to.
        headers.insert(
            http::header::HOST,
            HeaderValue::from_str(authority.as_str())
                .map_err(|_| format!("{authority} is not a valid host"))?,
        );
        for (name, value) in request.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("{name:?} is not a header name"))?;
            if MANAGED.contains(&name.as_str()) {
                continue;
            }
            let value = HeaderValue::from_str(&value)
                .map_err(|_| format!("the value of {name} is not valid"))?;
            headers.append(name, value);
        }
        if let Some(trace) = trace {
            headers.insert(TRACEPARENT, trace.traceparent());
            headers.remove(TRACESTATE);
        }
        let body = Bytes::from(request.body);
        let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
        let limit = usize::try_from(grant.max_response_bytes).unwrap_or(usize::MAX);
        let call = async {
            let addresses = destinations(grant, &uri).await?;
            let mut last = None;
            let mut answered = None;
            for address in addresses {
                let mut outgoing = Request::new(Full::new(body.clone()));
                *outgoing.method_mut() = method.clone();
                *outgoing.uri_mut() = Uri::builder()
                    .scheme("http")
                    .authority(address.to_string())
                    .path_and_query(path.as_str())
                    .build()
                    .map_err(|_| format!("{} is not a URL", request.url))?;
                *outgoing.headers_mut() = headers.clone();
                match self.client.request(outgoing).await {
                    Ok(response) => {
                        answered = Some(response);
                        break;
                    }
                    // Nothing was sent: the next address the name resolved to may answer.
                    Err(error) if error.is_connect() => last = Some(error),
                    Err(error) => return Err(format!("call failed: {error}")),
                }
            }
            let response = match (answered, last) {
                (Some(response), _) => response,
                (None, Some(error)) => return Err(format!("call failed: {error}")),
                (None, None) => return Err("call failed: no address to call".to_owned()),
            };
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
            private: false,
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

    #[test]
    fn addresses_inside_or_reserved_are_not_public() {
        let inside = [
            "127.0.0.1",
            "127.1.2.3",
            "0.0.0.0",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.255",
            "192.0.2.1",
            "224.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "fe80::1",
            "fc00::1",
            "fd12:3456::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::",
            "2001:db8::1",
            "ff02::1",
        ];
        for ip in inside {
            assert!(!public(ip.parse().unwrap()), "{ip} passed as public");
        }
        let outside = [
            "8.8.8.8",
            "1.1.1.1",
            "100.128.0.1",
            "172.32.0.1",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
        ];
        for ip in outside {
            assert!(public(ip.parse().unwrap()), "{ip} refused as not public");
        }
    }

    #[tokio::test]
    async fn a_granted_name_that_resolves_inside_is_refused_unless_the_grant_says_private() {
        let uri: Uri = "http://localhost:8080/x".parse().unwrap();
        let mut g = grant(&["localhost:8080"], &["GET"]);
        let refused = destinations(&g, &uri).await.unwrap_err();
        assert!(refused.contains("not public"), "{refused}");
        assert!(refused.contains("private: true"), "{refused}");
        assert!(
            !refused.contains("127.0.0.1") && !refused.contains("::1"),
            "the resolved address stays inside the gateway: {refused}"
        );
        g.private = true;
        let allowed = destinations(&g, &uri).await.unwrap();
        assert!(!allowed.is_empty());
        assert!(
            allowed
                .iter()
                .all(|a| a.ip().is_loopback() && a.port() == 8080)
        );
    }

    #[tokio::test]
    async fn a_granted_ip_literal_is_called_as_it_is() {
        let g = grant(&["127.0.0.1:8080", "[::1]:81"], &["GET"]);
        let v4: Uri = "http://127.0.0.1:8080/".parse().unwrap();
        assert_eq!(
            destinations(&g, &v4).await.unwrap(),
            vec!["127.0.0.1:8080".parse().unwrap()]
        );
        let v6: Uri = "http://[::1]:81/".parse().unwrap();
        assert_eq!(
            destinations(&g, &v6).await.unwrap(),
            vec!["[::1]:81".parse().unwrap()]
        );
    }

    #[tokio::test]
    async fn a_name_that_does_not_resolve_says_so_and_nothing_more() {
        let g = grant(&["no-such-host.invalid"], &["GET"]);
        let uri: Uri = "http://no-such-host.invalid/".parse().unwrap();
        assert_eq!(
            destinations(&g, &uri).await.unwrap_err(),
            "host no-such-host.invalid could not be resolved"
        );
    }
}
