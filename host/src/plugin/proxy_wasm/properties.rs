//! The properties a filter can read (`proxy_get_property`), as Envoy encodes them: text as its
//! bytes, numbers as 8-byte little-endian integers, and maps as header maps. Pure code.
//!
//! | path | value |
//! |---|---|
//! | `request.path` | the path with the query |
//! | `request.url_path` | the path without the query |
//! | `request.method`, `request.scheme`, `request.host`, `request.id` | text |
//! | `request.headers` | a header map |
//! | `request.protocol` | `HTTP/1.0`, `HTTP/1.1` or `HTTP/2` |
//! | `request.time` | nanoseconds since the Unix epoch, when the request arrived |
//! | `source.address`, `source.port` | the client's address (as the gateway decided it) |
//! | `destination.address`, `destination.port` | the listener's address |
//! | `response.code` | the response status, once there is one |
//! | `plugin_name`, `plugin_root_id`, `route_name` | text |

use std::time::UNIX_EPOCH;

use super::abi::encode_map;
use crate::view::RequestView;

/// What the filter being called is, for the properties that name it.
pub struct Naming<'a> {
    /// The plugin entry's name.
    pub plugin: &'a str,
    /// The entry's `root_id`.
    pub root_id: &'a str,
}

fn int(value: i64) -> Vec<u8> {
    value.to_le_bytes().to_vec()
}

/// The value at `path`, or `None` when there is none: an unknown path is not found, never a
/// failure.
pub fn lookup(
    path: &[String],
    request: Option<&RequestView>,
    response_code: Option<u16>,
    naming: &Naming<'_>,
) -> Option<Vec<u8>> {
    let path: Vec<&str> = path.iter().map(String::as_str).collect();
    match path.as_slice() {
        ["plugin_name"] => return Some(naming.plugin.as_bytes().to_vec()),
        ["plugin_root_id"] => return Some(naming.root_id.as_bytes().to_vec()),
        ["response", "code"] => return response_code.map(|code| int(code.into())),
        _ => {}
    }
    let request = request?;
    let origin = &request.origin;
    Some(match path.as_slice() {
        ["route_name"] => request.route_id.as_bytes().to_vec(),
        ["request", "path"] => match &request.query {
            Some(query) => format!("{}?{query}", request.path).into_bytes(),
            None => request.path.as_bytes().to_vec(),
        },
        ["request", "url_path"] => request.path.as_bytes().to_vec(),
        ["request", "method"] => request.method.as_str().as_bytes().to_vec(),
        ["request", "scheme"] => origin.scheme.as_bytes().to_vec(),
        ["request", "host"] => origin.host.as_bytes().to_vec(),
        ["request", "id"] => request.id.as_bytes().to_vec(),
        ["request", "protocol"] => protocol(origin.version).as_bytes().to_vec(),
        ["request", "time"] => {
            let since = origin.received.duration_since(UNIX_EPOCH).ok()?;
            int(i64::try_from(since.as_nanos()).ok()?)
        }
        ["request", "headers"] => {
            let pairs: Vec<(&[u8], &[u8])> = request
                .headers
                .iter()
                .map(|(name, value)| (name.as_str().as_bytes(), value.as_bytes()))
                .collect();
            encode_map(pairs.iter().copied())
        }
        ["source", "address"] => match origin.peer {
            Some(peer) if peer.ip() == request.client_ip => peer.to_string().into_bytes(),
            _ => request.client_ip.to_string().into_bytes(),
        },
        // The port is the TCP peer's, known only when the client is that peer.
        ["source", "port"] => match origin.peer {
            Some(peer) if peer.ip() == request.client_ip => int(peer.port().into()),
            _ => return None,
        },
        ["destination", "address"] => origin.local?.to_string().into_bytes(),
        ["destination", "port"] => int(origin.local?.port().into()),
        _ => return None,
    })
}

fn protocol(version: http::Version) -> &'static str {
    match version {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_2 => "HTTP/2",
        http::Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::Origin;

    fn path(text: &str) -> Vec<String> {
        text.split('.').map(str::to_owned).collect()
    }

    #[test]
    fn properties_read_the_request_and_unknown_ones_are_not_found() {
        let mut request = crate::view::tests::view();
        request.path = "/a".into();
        request.query = Some("b=1".into());
        request.client_ip = "192.0.2.7".parse().unwrap();
        request.origin = Origin {
            scheme: "https",
            host: "example.com".into(),
            version: http::Version::HTTP_2,
            peer: Some("192.0.2.7:4000".parse().unwrap()),
            local: Some("127.0.0.1:9080".parse().unwrap()),
            received: UNIX_EPOCH + std::time::Duration::from_nanos(5),
        };
        let naming = Naming {
            plugin: "f",
            root_id: "root",
        };
        let get = |p: &str| lookup(&path(p), Some(&request), Some(204), &naming);
        assert_eq!(get("request.path").unwrap(), b"/a?b=1");
        assert_eq!(get("request.url_path").unwrap(), b"/a");
        assert_eq!(get("request.scheme").unwrap(), b"https");
        assert_eq!(get("request.host").unwrap(), b"example.com");
        assert_eq!(get("request.protocol").unwrap(), b"HTTP/2");
        assert_eq!(get("request.time").unwrap(), 5i64.to_le_bytes());
        assert_eq!(get("source.address").unwrap(), b"192.0.2.7:4000");
        assert_eq!(get("source.port").unwrap(), 4000i64.to_le_bytes());
        assert_eq!(get("destination.port").unwrap(), 9080i64.to_le_bytes());
        assert_eq!(get("response.code").unwrap(), 204i64.to_le_bytes());
        assert_eq!(get("plugin_root_id").unwrap(), b"root");
        assert_eq!(get("no.such.thing"), None);
        assert_eq!(get("request"), None);
        // A client behind a trusted proxy: its address, and no port that is not its own.
        request.client_ip = "198.51.100.1".parse().unwrap();
        let get = |p: &str| lookup(&path(p), Some(&request), None, &naming);
        assert_eq!(get("source.address").unwrap(), b"198.51.100.1");
        assert_eq!(get("source.port"), None);
        assert_eq!(get("response.code"), None);
    }
}
