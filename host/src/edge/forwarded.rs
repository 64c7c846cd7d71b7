//! Who the client is, and the `X-Forwarded-*` headers that tell the upstream.
//!
//! The TCP peer is the client unless it is a trusted proxy (`server.trusted_proxies`). Behind
//! trusted proxies, the client is the last address in `X-Forwarded-For` that is not itself a
//! trusted proxy, read from the right, since only the entries the trusted proxies appended can
//! be believed.

use std::net::IpAddr;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;

/// `x-forwarded-for`
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `x-forwarded-proto`
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `x-forwarded-host`
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Whether `ip` is in one of the `trusted` networks.
pub fn is_trusted(ip: IpAddr, trusted: &[IpNet]) -> bool {
    !trusted.is_empty() && trusted.iter().any(|net| net.contains(&ip))
}

/// The client's address: the peer's, or behind trusted proxies, the last untrusted address in
/// `X-Forwarded-For`. An entry that is not an IP address ends the walk at the address to its
/// right, which a trusted proxy vouched for.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    if !is_trusted(peer, trusted) {
        return peer;
    }
    let lines: Vec<&[u8]> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect();
    let mut client = peer;
    for line in lines.iter().rev() {
        for entry in line.rsplit(|b| *b == b',') {
            let Some(ip) = parse_entry(entry) else {
                return client;
            };
            client = ip;
            if !is_trusted(ip, trusted) {
                return ip;
            }
        }
    }
    client
}

/// One `X-Forwarded-For` entry: an IP address, perhaps bracketed (`[::1]`).
fn parse_entry(entry: &[u8]) -> Option<IpAddr> {
    let text = std::str::from_utf8(entry).ok()?.trim();
    let text = text
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or(text);
    text.parse::<IpAddr>().ok().map(|ip| ip.to_canonical())
}

/// Rewrites the `X-Forwarded-*` headers for the upstream: `X-Forwarded-For` gets `peer`
/// appended to every line the client sent (joined into one); `X-Forwarded-Proto` and
/// `X-Forwarded-Host` are the gateway's own (`proto` and `host`), unless the peer is a trusted
/// proxy that already set them.
pub fn set_headers(
    headers: &mut HeaderMap,
    peer: IpAddr,
    peer_trusted: bool,
    proto: &'static str,
    host: Option<&HeaderValue>,
) {
    let peer_text = peer.to_string();
    let mut forwarded_for = Vec::new();
    for line in headers.get_all(&X_FORWARDED_FOR) {
        let line = line.as_bytes().trim_ascii();
        if line.is_empty() {
            continue;
        }
        forwarded_for.extend_from_slice(line);
        forwarded_for.extend_from_slice(b", ");
    }
    forwarded_for.extend_from_slice(peer_text.as_bytes());
    match HeaderValue::from_bytes(&forwarded_for) {
        Ok(value) => {
            headers.insert(&X_FORWARDED_FOR, value);
        }
        Err(_) => {
            // Unreachable for bytes that came from header values, but never forward a guess.
            headers.insert(
                &X_FORWARDED_FOR,
                HeaderValue::from_str(&peer_text).expect("an IP address is a header value"),
            );
        }
    }
    if !(peer_trusted && headers.contains_key(&X_FORWARDED_PROTO)) {
        headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    }
    if !(peer_trusted && headers.contains_key(&X_FORWARDED_HOST)) {
        match host {
            Some(host) => {
                headers.insert(&X_FORWARDED_HOST, host.clone());
            }
            None => {
                headers.remove(&X_FORWARDED_HOST);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn headers(xff: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for line in xff {
            map.append(&X_FORWARDED_FOR, line.parse().unwrap());
        }
        map
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_claims() {
        let h = headers(&["1.2.3.4"]);
        assert_eq!(client_ip(ip("9.9.9.9"), &h, &[]), ip("9.9.9.9"));
        let trusted = nets(&["10.0.0.0/8"]);
        assert_eq!(client_ip(ip("9.9.9.9"), &h, &trusted), ip("9.9.9.9"));
    }

    #[test]
    fn behind_trusted_proxies_the_last_untrusted_entry_is_the_client() {
        let trusted = nets(&["10.0.0.0/8", "fd00::/8"]);
        // The client forged 6.6.6.6; the proxy appended the real 1.2.3.4.
        let h = headers(&["6.6.6.6, 1.2.3.4", "10.0.0.2"]);
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &trusted), ip("1.2.3.4"));
        let h = headers(&["[2001:db8::1], fd00::5"]);
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &trusted), ip("2001:db8::1"));
        // Every entry trusted: the leftmost one.
        let h = headers(&["10.1.1.1, 10.2.2.2"]);
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &trusted), ip("10.1.1.1"));
        // No header: the proxy itself.
        assert_eq!(
            client_ip(ip("10.0.0.1"), &HeaderMap::new(), &trusted),
            ip("10.0.0.1")
        );
        // Garbage stops the walk at the last vouched-for address.
        let h = headers(&["1.1.1.1, nonsense, 10.0.0.9"]);
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &trusted), ip("10.0.0.9"));
        // v4-mapped v6 peers are compared as v4.
        let h = headers(&["::ffff:1.2.3.4"]);
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &trusted), ip("1.2.3.4"));
    }

    #[test]
    fn forwarded_for_appends_to_every_line_and_the_rest_is_the_gateways() {
        let mut h = headers(&["1.1.1.1", "2.2.2.2, 3.3.3.3"]);
        h.insert(&X_FORWARDED_PROTO, "https".parse().unwrap());
        h.insert(&X_FORWARDED_HOST, "evil.example".parse().unwrap());
        let host = HeaderValue::from_static("api.example.com:8080");
        set_headers(&mut h, ip("9.9.9.9"), false, "http", Some(&host));
        assert_eq!(
            h.get_all(&X_FORWARDED_FOR).iter().collect::<Vec<_>>(),
            ["1.1.1.1, 2.2.2.2, 3.3.3.3, 9.9.9.9"]
        );
        assert_eq!(h[&X_FORWARDED_PROTO], "http");
        assert_eq!(h[&X_FORWARDED_HOST], "api.example.com:8080");

        let mut h = HeaderMap::new();
        h.insert(&X_FORWARDED_PROTO, "https".parse().unwrap());
        h.insert(&X_FORWARDED_HOST, "www.example.com".parse().unwrap());
        set_headers(&mut h, ip("10.0.0.1"), true, "http", Some(&host));
        assert_eq!(h[&X_FORWARDED_FOR], "10.0.0.1");
        assert_eq!(h[&X_FORWARDED_PROTO], "https");
        assert_eq!(h[&X_FORWARDED_HOST], "www.example.com");

        let mut h = HeaderMap::new();
        h.insert(&X_FORWARDED_HOST, "spoofed".parse().unwrap());
        set_headers(&mut h, ip("9.9.9.9"), false, "http", None);
        assert!(!h.contains_key(&X_FORWARDED_HOST));
    }
}
