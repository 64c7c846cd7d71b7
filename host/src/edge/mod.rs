//! The edge: what happens to a request before anything else sees it. Its path is put in normal
//! form, its host decided, connection-scoped headers dropped, and its client named (through
//! trusted proxies), so that routing, plugins and the upstream all read the same request.

pub mod forwarded;
pub mod hop;
pub mod normalise;
pub mod trace;
pub mod trailers;

use std::borrow::Cow;
use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderValue};
use ipnet::IpNet;

use crate::config::ServerConfig;
use crate::error::GatewayError;

pub use self::hop::strip_hop_by_hop;
use self::normalise::{PathError, normalise};

/// Who is at the other end of a client connection.
#[derive(Clone, Copy, Debug)]
pub struct Peer {
    /// The TCP peer's address.
    pub addr: std::net::SocketAddr,
    /// Whether the connection is TLS.
    pub tls: bool,
    /// The listener's side of the connection.
    pub local: Option<std::net::SocketAddr>,
}

/// The admin listener's session cookies: browsers send a host's cookies to every port, so the
/// proxy drops these before a plugin, the access log or an upstream could read them.
pub const ADMIN_SESSION_COOKIES: [&str; 2] = ["weir_session", "__Host-weir_session"];

/// The live `server` settings, validated.
#[derive(Debug)]
pub struct ServerSettings {
    /// The config they came from.
    pub config: ServerConfig,
    /// `trusted_proxies`, parsed.
    pub trusted_proxies: Vec<IpNet>,
}

impl ServerSettings {
    /// The settings of `config`.
    pub fn new(config: ServerConfig) -> Self {
        let trusted_proxies = config.trusted_proxies.iter().map(|t| t.0).collect();
        ServerSettings {
            config,
            trusted_proxies,
        }
    }
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings::new(ServerConfig::default())
    }
}

/// A request as the rest of the gateway sees it.
#[derive(Debug)]
pub struct Arrival<'a> {
    /// The path's normal form: what routes match.
    pub path: Cow<'a, str>,
    /// Set when the path may go upstream only raw (see [`normalise::NormalPath::raw_only`]).
    pub raw_only: Option<PathError>,
    /// The client's address (behind trusted proxies, the one they vouch for).
    pub client_ip: IpAddr,
    /// The connection it came on.
    pub peer: Peer,
    /// Its place in a trace, under `server.tracing`.
    pub trace: Option<trace::TraceContext>,
}

/// Phase 0: checks and normalises the request head in place. `peer` is the connection's
/// other end.
pub fn arrive<'a>(
    settings: &ServerSettings,
    uri: &'a http::Uri,
    headers: &mut HeaderMap,
    peer: Peer,
) -> Result<Arrival<'a>, GatewayError> {
    // HTTP/1.1 refuses a request head this large before it gets here; HTTP/2 does not count.
    if headers.len() > settings.config.max_headers {
        return Err(GatewayError::HeadersTooLarge);
    }
    let mut hosts = headers.get_all(header::HOST).iter();
    if hosts.next().is_some() && hosts.next().is_some() {
        return Err(GatewayError::BadRequest("more than one Host header".into()));
    }
    let normal = normalise(uri.path()).map_err(|e| GatewayError::BadRequest(e.to_string()))?;
    check_authority(uri, headers)?;
    let proto = if peer.tls { "https" } else { "http" };
    let connection = peer;
    let peer = peer.addr.ip().to_canonical();
    let trusted = &settings.trusted_proxies;
    // Decided before `Connection` is read, so no header it names can change who the client is.
    let client_ip = forwarded::client_ip(peer, headers, trusted);
    strip_hop_by_hop(headers);
    drop_session_cookies(headers);
    let host = request_authority(uri, headers);
    if uri.authority().is_some()
        && let Some(host) = &host
    {
        // The authority the request was routed on is the one the upstream hears about.
        headers.insert(header::HOST, host.clone());
    }
    let vouched = forwarded::is_trusted(peer, trusted);
    forwarded::set_headers(headers, peer, vouched, proto, host.as_ref());
    let trace = settings
        .config
        .tracing
        .as_ref()
        .map(|tracing| trace::arrive(headers, vouched, tracing, fresh_ids));
    Ok(Arrival {
        path: normal.path,
        raw_only: normal.raw_only,
        client_ip,
        peer: connection,
        trace,
    })
}

/// Random bytes for a new trace id and span id.
fn fresh_ids() -> [u8; 24] {
    let mut bytes = [0; 24];
    // The OS's generator does not fail once the process runs; a zero id is made valid anyway.
    let _ = getrandom::fill(&mut bytes);
    bytes
}

/// The authority the client asked for: the absolute URI's (HTTP/2, or an absolute-form
/// HTTP/1.1 request, where it overrides `Host`), or the `Host` header.
fn request_authority(uri: &http::Uri, headers: &HeaderMap) -> Option<HeaderValue> {
    match uri.authority() {
        Some(authority) => HeaderValue::from_str(authority.as_str()).ok(),
        None => headers.get(header::HOST).cloned(),
    }
}

/// Refuses an authority that the router and an upstream could read as two hosts: one with
/// user info (`x@internal.example`), or with a colon that does not start a port.
fn check_authority(uri: &http::Uri, headers: &HeaderMap) -> Result<(), GatewayError> {
    let raw = match uri.authority() {
        Some(authority) => authority.as_str().as_bytes(),
        None => match headers.get(header::HOST) {
            Some(host) => host.as_bytes(),
            None => return Ok(()),
        },
    };
    authority_form(raw).map_err(|reason| GatewayError::BadRequest(reason.to_owned()))
}

/// Why `raw` is no `host[:port]` (a bracketed IPv6 address for host), if it is not.
fn authority_form(raw: &[u8]) -> Result<(), &'static str> {
    if raw.contains(&b'@') {
        return Err("the host holds user info (@)");
    }
    let port = match raw.strip_prefix(b"[") {
        Some(v6) => {
            let end = v6
                .iter()
                .position(|b| *b == b']')
                .ok_or("the host's [ is not closed")?;
            match &v6[end + 1..] {
                [] => return Ok(()),
                [b':', port @ ..] => port,
                _ => return Err("the host has text after its ]"),
            }
        }
        None => match raw.iter().position(|b| *b == b':') {
            None => return Ok(()),
            Some(0) => return Err("the host is empty before its port"),
            Some(colon) => &raw[colon + 1..],
        },
    };
    if port.is_empty() || !port.iter().all(u8::is_ascii_digit) {
        return Err("the host has a colon that does not start a port");
    }
    Ok(())
}

/// The host the client asked for, without its port or a trailing dot, for routing. The edge
/// has refused user info already.
pub fn request_host<'a>(uri: &'a http::Uri, headers: &'a HeaderMap) -> Option<&'a str> {
    let raw = match uri.authority() {
        Some(authority) => authority.as_str(),
        None => headers.get(header::HOST).and_then(|v| v.to_str().ok())?,
    };
    let host = match raw.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(v6),
        None => raw.split(':').next().unwrap_or(raw),
    };
    // `api.example.com.` is the same name, fully qualified.
    Some(host.strip_suffix('.').unwrap_or(host))
}

/// Removes the admin session cookies from every `Cookie` header. The other pairs stay as they
/// came; a header with nothing left goes.
fn drop_session_cookies(headers: &mut HeaderMap) {
    // Most requests carry none: look before rebuilding anything.
    let mut values = headers.get_all(header::COOKIE).iter();
    if !values.any(|v| cookie_pairs(v.as_bytes()).any(is_session_pair)) {
        return;
    }
    let kept: Vec<HeaderValue> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(without_session_cookies)
        .collect();
    headers.remove(header::COOKIE);
    for value in kept {
        headers.append(header::COOKIE, value);
    }
}

/// A `Cookie` value's `name=value` pairs, without the spaces around them.
fn cookie_pairs(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|b| *b == b';').map(<[u8]>::trim_ascii)
}

/// Whether a pair is an admin session cookie (names are case-sensitive, RFC 6265).
fn is_session_pair(pair: &[u8]) -> bool {
    let name = pair.split(|b| *b == b'=').next().unwrap_or_default();
    let name = name.trim_ascii();
    ADMIN_SESSION_COOKIES.iter().any(|c| c.as_bytes() == name)
}

/// `value` without its session pairs, or nothing when no pair is left.
fn without_session_cookies(value: &HeaderValue) -> Option<HeaderValue> {
    if !cookie_pairs(value.as_bytes()).any(is_session_pair) {
        return Some(value.clone());
    }
    let kept: Vec<&[u8]> = cookie_pairs(value.as_bytes())
        .filter(|pair| !pair.is_empty() && !is_session_pair(pair))
        .collect();
    if kept.is_empty() {
        return None;
    }
    // Bytes of a valid value, joined by valid bytes: still valid.
    HeaderValue::from_bytes(&kept.join(&b"; "[..])).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::HeaderName;

    #[test]
    fn connection_and_the_headers_it_names_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "x-secret, keep-alive".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert(header::TE, "trailers".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().collect::<Vec<_>>(), ["x-kept"]);
    }

    #[test]
    fn hop_by_hop_headers_go_without_being_listed_and_listed_ones_in_any_case() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "X-Listed ,close".parse().unwrap());
        h.insert("x-listed", "1".parse().unwrap());
        h.insert("proxy-connection", "keep-alive".parse().unwrap());
        h.append("keep-alive", "timeout=5".parse().unwrap());
        h.append("keep-alive", "max=9".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().collect::<Vec<_>>(), ["x-kept"]);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn the_uri_authority_wins_over_host_and_ports_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "b.example:8080".parse().unwrap());
        let origin: http::Uri = "/x".parse().unwrap();
        assert_eq!(request_host(&origin, &h), Some("b.example"));
        let absolute: http::Uri = "http://a.example/x".parse().unwrap();
        assert_eq!(request_host(&absolute, &h), Some("a.example"));
        let v6: http::Uri = "http://[::1]:80/x".parse().unwrap();
        assert_eq!(request_host(&v6, &h), Some("::1"));
    }

    #[test]
    fn arrival_refuses_two_hosts_and_bad_paths() {
        let settings = ServerSettings::default();
        let peer = Peer {
            addr: "127.0.0.1:5000".parse().unwrap(),
            tls: false,
            local: None,
        };
        let mut h = HeaderMap::new();
        h.append(header::HOST, "a".parse().unwrap());
        h.append(header::HOST, "b".parse().unwrap());
        let uri: http::Uri = "/x".parse().unwrap();
        let error = arrive(&settings, &uri, &mut h, peer).unwrap_err();
        assert_eq!(error.status(), http::StatusCode::BAD_REQUEST);

        let mut h = HeaderMap::new();
        let uri: http::Uri = "/a/../../x".parse().unwrap();
        let error = arrive(&settings, &uri, &mut h, peer).unwrap_err();
        assert!(error.to_string().contains("above the root"), "{error}");

        let uri: http::Uri = "//a/./b".parse().unwrap();
        let arrival = arrive(&settings, &uri, &mut HeaderMap::new(), peer).unwrap();
        assert_eq!(arrival.path, "/a/b");
    }

    #[test]
    fn a_tls_connection_is_forwarded_as_https() {
        let settings = ServerSettings::default();
        let uri: http::Uri = "/x".parse().unwrap();
        for (tls, proto) in [(false, "http"), (true, "https")] {
            let peer = Peer {
                addr: "192.0.2.1:5000".parse().unwrap(),
                tls,
                local: None,
            };
            let mut h = HeaderMap::new();
            // An untrusted peer's own claim is replaced.
            h.insert(&forwarded::X_FORWARDED_PROTO, "gopher".parse().unwrap());
            arrive(&settings, &uri, &mut h, peer).unwrap();
            assert_eq!(h[&forwarded::X_FORWARDED_PROTO], proto);
        }
    }
    fn peer(addr: &str) -> Peer {
        Peer {
            addr: addr.parse().unwrap(),
            tls: false,
            local: None,
        }
    }

    fn arrive_with(
        settings: &ServerSettings,
        uri: &str,
        headers: &[(&str, &str)],
    ) -> (Result<IpAddr, GatewayError>, HeaderMap) {
        let uri: http::Uri = uri.parse().unwrap();
        let mut h = HeaderMap::new();
        for (name, value) in headers {
            h.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        let arrived = arrive(settings, &uri, &mut h, peer("127.0.0.1:5000")).map(|a| a.client_ip);
        (arrived, h)
    }

    #[test]
    fn a_trailing_dot_host_matches_its_route() {
        let origin: http::Uri = "/x".parse().unwrap();
        for (raw, host) in [
            ("api.example.com.", "api.example.com"),
            ("api.example.com.:8080", "api.example.com"),
            ("api.example.com", "api.example.com"),
            // Only one dot goes: `a..` is no name a route could hold.
            ("a..", "a."),
            ("[::1]:80", "::1"),
        ] {
            let mut h = HeaderMap::new();
            h.insert(header::HOST, raw.parse().unwrap());
            assert_eq!(request_host(&origin, &h), Some(host), "{raw}");
        }
        let absolute: http::Uri = "http://api.example.com./x".parse().unwrap();
        assert_eq!(
            request_host(&absolute, &HeaderMap::new()),
            Some("api.example.com")
        );
    }

    #[test]
    fn user_info_and_stray_colons_in_the_host_are_refused() {
        let settings = ServerSettings::default();
        for host in [
            "x@internal.example",
            "@internal.example",
            "a:b:c",
            "host:",
            "host:abc",
            ":80",
            "[::1]x",
            "[::1]:",
            "[::1",
            "host:80:80",
        ] {
            let (arrived, _) = arrive_with(&settings, "/x", &[("host", host)]);
            let error = arrived.unwrap_err();
            assert_eq!(error.status(), http::StatusCode::BAD_REQUEST, "{host}");
        }
        let (arrived, _) = arrive_with(&settings, "http://x@internal.example/x", &[]);
        assert_eq!(arrived.unwrap_err().status(), http::StatusCode::BAD_REQUEST);
        for host in [
            "host",
            "host:80",
            "[::1]",
            "[::1]:8080",
            "api.example.com.",
            "127.0.0.1:1",
        ] {
            let (arrived, _) = arrive_with(&settings, "/x", &[("host", host)]);
            assert!(arrived.is_ok(), "{host}");
        }
    }

    #[test]
    fn connection_cannot_name_the_headers_the_gateway_reads_or_writes() {
        let mut h = HeaderMap::new();
        let protected = [
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-forwarded-host",
            "x-forwarded-port",
            "forwarded",
            "x-real-ip",
            "host",
        ];
        h.insert(
            header::CONNECTION,
            format!("{}, x-other", protected.join(", ").to_uppercase())
                .parse()
                .unwrap(),
        );
        for name in protected {
            h.insert(HeaderName::from_static(name), "1".parse().unwrap());
        }
        h.insert("x-other", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        let mut kept: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        kept.sort_unstable();
        let mut expected = protected.to_vec();
        expected.sort_unstable();
        assert_eq!(kept, expected);
    }

    #[test]
    fn the_client_behind_a_trusted_proxy_survives_a_connection_header_naming_the_chain() {
        let settings = ServerSettings {
            config: ServerConfig::default(),
            trusted_proxies: vec!["127.0.0.1/32".parse().unwrap()],
        };
        let (arrived, h) = arrive_with(
            &settings,
            "/x",
            &[
                ("x-forwarded-for", "203.0.113.7"),
                ("connection", "x-forwarded-for"),
            ],
        );
        assert_eq!(arrived.unwrap(), "203.0.113.7".parse::<IpAddr>().unwrap());
        assert_eq!(h[&forwarded::X_FORWARDED_FOR], "203.0.113.7, 127.0.0.1");
    }

    fn cookies(headers: &HeaderMap) -> Vec<&[u8]> {
        headers
            .get_all(header::COOKIE)
            .iter()
            .map(HeaderValue::as_bytes)
            .collect()
    }

    #[test]
    fn the_admin_session_cookie_never_gets_past_the_edge() {
        let settings = ServerSettings::default();
        let (_, h) = arrive_with(
            &settings,
            "/x",
            &[("cookie", "a=1; weir_session=SECRET; b=2")],
        );
        assert_eq!(cookies(&h), [&b"a=1; b=2"[..]]);
        // HTTP/2 may split cookies over several headers; each keeps its other pairs untouched,
        // and one left with nothing goes.
        let (_, h) = arrive_with(
            &settings,
            "/x",
            &[
                ("cookie", "weir_session=S"),
                ("cookie", "c=3;d=4"),
                ("cookie", "__Host-weir_session=S;e=5 ;  weir_session = S"),
                ("cookie", "weir_session"),
            ],
        );
        assert_eq!(cookies(&h), [&b"c=3;d=4"[..], b"e=5"]);
        // Cookie names are case-sensitive, and a longer name is another cookie.
        let kept = "WEIR_SESSION=1; weir_session2=2; x_weir_session=3";
        let (_, h) = arrive_with(&settings, "/x", &[("cookie", kept)]);
        assert_eq!(cookies(&h), [kept.as_bytes()]);
        let (_, h) = arrive_with(
            &settings,
            "/x",
            &[("cookie", "weir_session=S; __Host-weir_session=T")],
        );
        assert!(!h.contains_key(header::COOKIE));
    }
}
