//! Hop-by-hop headers: those that describe one connection, not the message, and so never
//! cross the gateway.

use http::header::{self, HeaderMap, HeaderName};

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

/// Whether `name` describes one connection rather than the message.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name)
}

/// Headers the gateway reads or writes itself: a client's `Connection` cannot remove them.
pub fn is_kept_whatever_connection_says(name: &HeaderName) -> bool {
    let name = name.as_str();
    name.starts_with("x-forwarded-") || matches!(name, "forwarded" | "x-real-ip" | "host")
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
        .filter(|name| !is_kept_whatever_connection_says(name) && headers.contains_key(name))
        .collect();
    doomed.extend(headers.keys().filter(|name| is_hop_by_hop(name)).cloned());
    for name in doomed {
        headers.remove(name);
    }
}
