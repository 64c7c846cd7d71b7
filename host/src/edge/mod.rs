//! The edge: what happens to a request before anything else sees it. Its path is put in normal
//! form, its host decided, connection-scoped headers dropped, and its client named (through
//! trusted proxies), so that routing, plugins and the upstream all read the same request.

pub mod forwarded;
pub mod normalise;

use std::borrow::Cow;
use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;

use crate::config::ServerConfig;
use crate::error::GatewayError;
use crate::server::Peer;

use self::normalise::{PathError, normalise};

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
    strip_hop_by_hop(headers);
    let proto = if peer.tls { "https" } else { "http" };
    let peer = peer.addr.ip().to_canonical();
    let trusted = &settings.trusted_proxies;
    let client_ip = forwarded::client_ip(peer, headers, trusted);
    let host = request_authority(uri, headers);
    if uri.authority().is_some()
        && let Some(host) = &host
    {
        // The authority the request was routed on is the one the upstream hears about.
        headers.insert(header::HOST, host.clone());
    }
    forwarded::set_headers(
        headers,
        peer,
        forwarded::is_trusted(peer, trusted),
        proto,
        host.as_ref(),
    );
    Ok(Arrival {
        path: normal.path,
        raw_only: normal.raw_only,
        client_ip,
    })
}

/// The authority the client asked for, without user info: the absolute URI's (HTTP/2, or an
/// absolute-form HTTP/1.1 request, where it overrides `Host`), or the `Host` header.
fn request_authority(uri: &http::Uri, headers: &HeaderMap) -> Option<HeaderValue> {
    match uri.authority() {
        Some(authority) => {
            let host = authority.as_str();
            let host = host.rsplit_once('@').map_or(host, |(_, host)| host);
            HeaderValue::from_str(host).ok()
        }
        None => headers.get(header::HOST).cloned(),
    }
}

/// The host the client asked for, without its port, for routing.
pub fn request_host<'a>(uri: &'a http::Uri, headers: &'a HeaderMap) -> Option<&'a str> {
    let raw = match uri.authority() {
        Some(authority) => authority.as_str(),
        None => headers.get(header::HOST).and_then(|v| v.to_str().ok())?,
    };
    let raw = raw.rsplit_once('@').map_or(raw, |(_, host)| host);
    Some(match raw.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(v6),
        None => raw.split(':').next().unwrap_or(raw),
    })
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1).
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name)
}

/// Removes hop-by-hop headers, and those the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages have none: one pass over the names beats a removal attempt for each.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    // Only names that are there are removed: each removal hashes its name.
    let mut doomed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .filter(|name| headers.contains_key(name))
        .collect();
    doomed.extend(headers.keys().filter(|name| is_hop_by_hop(name)).cloned());
    for name in doomed {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            };
            let mut h = HeaderMap::new();
            // An untrusted peer's own claim is replaced.
            h.insert(&forwarded::X_FORWARDED_PROTO, "gopher".parse().unwrap());
            arrive(&settings, &uri, &mut h, peer).unwrap();
            assert_eq!(h[&forwarded::X_FORWARDED_PROTO], proto);
        }
    }
}
