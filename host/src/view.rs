//! The request and response as plugins see them: the data behind the WIT `request` and `response`
//! resources, and the edits plugins may make to them.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, StatusCode};

use crate::config::Consumers;
use crate::edge::trace::TraceContext;
use crate::spans::CallNotes;

/// Headers that a plugin may not set or remove, because the gateway owns the framing.
const FRAMING_HEADERS: &[&str] = &["content-length", "transfer-encoding", "connection"];

/// A request body held in memory for plugins that asked for it.
#[derive(Clone, Debug, Default)]
pub enum BufferedBody {
    /// The body streams straight through; no plugin asked to see it.
    #[default]
    Streaming,
    /// The whole body, read up to the plugins' bound.
    Buffered(Bytes),
}

/// The request head and the per-request state that plugins read and edit.
#[derive(Debug)]
pub struct RequestView {
    /// The method.
    pub method: Method,
    /// The path without the query, as the upstream will see it.
    pub path: String,
    /// The query string, without `?`.
    pub query: Option<String>,
    /// The headers.
    pub headers: HeaderMap,
    /// The request id, as logged.
    pub id: String,
    /// The matched route's id.
    pub route_id: Arc<str>,
    /// The client's address.
    pub client_ip: IpAddr,
    /// The body, when a plugin asked for it.
    pub body: BufferedBody,
    /// Values plugins pass to later plugins and phases.
    pub vars: HashMap<String, String>,
    /// Whether edits are allowed: only in `on-request`.
    pub writable: bool,
    /// Whether the plugin being called may read and replace the body.
    pub body_access: bool,
    /// The largest body the plugin being called may write.
    pub body_limit: u64,
    /// The consumer a plugin marked the request as made by.
    pub consumer: Option<Arc<str>>,
    /// The upstream a plugin chose instead of the route's.
    pub upstream: Option<String>,
    /// The upstreams a plugin chose to try in turn, each with its edits; these win over
    /// `upstream`.
    pub targets: Vec<Fallback>,
    /// Which of `targets` answered, once one did.
    pub answered_by: Option<u32>,
    /// Response header edits plugins queued in `on-request`, applied when the answer is sent.
    pub response_edits: Vec<ResponseEdit>,
    /// What plugins look consumers and upstreams up in, from the snapshot the request was
    /// routed by.
    pub directory: Directory,
    /// Where and how the request arrived.
    pub origin: Origin,
    /// The request's place in a trace, under `server.tracing`: during a plugin's call, with
    /// that call's span (when it is recorded) as the parent of the plugin's outbound calls.
    pub trace: Option<TraceContext>,
    /// What the plugin call in progress adds to its span, when the request's spans are
    /// recorded.
    pub notes: Option<Box<CallNotes>>,
}

/// One upstream a plugin chose for the request to try, with the edits that go with it, checked.
#[derive(Clone, Debug)]
pub struct Fallback {
    /// The upstream's id.
    pub upstream: String,
    /// Headers to set, replacing the request's values.
    pub set_headers: Vec<(HeaderName, HeaderValue)>,
    /// The path and query to send instead of the request's.
    pub path: Option<(String, Option<String>)>,
    /// The body to send instead of the request's.
    pub body: Option<Bytes>,
}

impl Fallback {
    /// Checks a plugin's target as the same edits of the request itself would be checked:
    /// `body_limit` bounds its body.
    pub fn checked(
        upstream: String,
        set_headers: &[(String, String)],
        path: Option<&str>,
        body: Option<Vec<u8>>,
        body_limit: u64,
    ) -> Result<Fallback, String> {
        if set_headers.len() > MAX_TARGET_HEADERS {
            return Err(format!(
                "more than {MAX_TARGET_HEADERS} headers for one target"
            ));
        }
        let set_headers = set_headers
            .iter()
            .map(|(name, value)| {
                let (name, value) = headers::parse(name, Some(value))?;
                Ok((name, value.expect("parsed with a value")))
            })
            .collect::<Result<Vec<_>, String>>()?;
        let path = path
            .map(|path| {
                let (path, query) = match path.split_once('?') {
                    Some((path, query)) => (path, Some(query)),
                    None => (path, None),
                };
                if !path.starts_with('/') {
                    return Err(format!("path {path:?} does not start with /"));
                }
                if path.contains('#') || query.is_some_and(|query| query.contains('#')) {
                    return Err(format!("path {path:?} holds a #"));
                }
                check_uri_part(path, "path")?;
                if let Some(query) = query {
                    check_uri_part(query, "query")?;
                }
                Ok((path.to_owned(), query.map(str::to_owned)))
            })
            .transpose()?;
        if let Some(body) = &body {
            check_body_size(body.len(), body_limit)?;
        }
        Ok(Fallback {
            upstream,
            set_headers,
            path,
            body: body.map(Bytes::from),
        })
    }
}

/// The most headers one target may set.
const MAX_TARGET_HEADERS: usize = 64;

/// Where and how a request arrived: what proxy-wasm's properties report.
#[derive(Clone, Debug)]
pub struct Origin {
    /// `http` or `https`.
    pub scheme: &'static str,
    /// The host the request was routed by.
    pub host: String,
    /// The HTTP version.
    pub version: http::Version,
    /// The TCP peer.
    pub peer: Option<std::net::SocketAddr>,
    /// The listener's address.
    pub local: Option<std::net::SocketAddr>,
    /// When the request arrived.
    pub received: std::time::SystemTime,
}

impl Default for Origin {
    fn default() -> Self {
        Origin {
            scheme: "http",
            host: String::new(),
            version: http::Version::HTTP_11,
            peer: None,
            local: None,
            received: std::time::SystemTime::now(),
        }
    }
}

/// What plugins may look up during a request, from the snapshot it was routed by: the
/// consumers, and which upstreams exist. Narrow on purpose: the plugin runtime sits below the
/// snapshot, and sees no more of it than this.
#[derive(Clone, Default)]
pub struct Directory(Arc<Listing>);

#[derive(Default)]
struct Listing {
    generation: u64,
    consumers: Arc<Consumers>,
    /// Each upstream's id, with its first node's `host:port` when it has one.
    upstreams: HashMap<String, Option<String>>,
}

impl Directory {
    /// The directory of snapshot `generation`, holding `consumers` and `upstreams`: each
    /// upstream's id, with its first node's `host:port` (where a proxy-wasm filter's http call
    /// naming it goes).
    pub fn new(
        generation: u64,
        consumers: Arc<Consumers>,
        upstreams: impl IntoIterator<Item = (String, Option<String>)>,
    ) -> Self {
        Directory(Arc::new(Listing {
            generation,
            consumers,
            upstreams: upstreams.into_iter().collect(),
        }))
    }

    /// The consumers index.
    pub fn consumers(&self) -> &Consumers {
        &self.0.consumers
    }

    /// Whether an upstream with this id exists.
    pub fn has_upstream(&self, id: &str) -> bool {
        self.0.upstreams.contains_key(id)
    }

    /// The `host:port` of upstream `id`'s first node.
    pub fn upstream_address(&self, id: &str) -> Option<&str> {
        self.0.upstreams.get(id)?.as_deref()
    }
}

impl std::fmt::Debug for Directory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Directory(generation {})", self.0.generation)
    }
}

/// One response header edit a plugin queued in `on-request`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResponseEdit {
    /// Replace the header's values with this one.
    Set(HeaderName, HeaderValue),
    /// Add this value.
    Append(HeaderName, HeaderValue),
    /// Remove every value.
    Remove(HeaderName),
}

impl ResponseEdit {
    /// A checked edit: a valid name the gateway does not own, and a valid value.
    pub fn new(
        kind: fn(HeaderName, HeaderValue) -> Self,
        name: &str,
        value: &str,
    ) -> Result<Self, String> {
        let (name, value) = headers::parse(name, Some(value))?;
        Ok(kind(name, value.expect("parsed with a value")))
    }

    /// A checked removal.
    pub fn remove(name: &str) -> Result<Self, String> {
        headers::parse(name, None).map(|(name, _)| ResponseEdit::Remove(name))
    }

    /// Applies the edit to a response's headers.
    pub fn apply(&self, map: &mut HeaderMap) {
        match self {
            ResponseEdit::Set(name, value) => {
                map.insert(name.clone(), value.clone());
            }
            ResponseEdit::Append(name, value) => {
                map.append(name.clone(), value.clone());
            }
            ResponseEdit::Remove(name) => {
                map.remove(name);
            }
        }
    }
}

/// The response head and body as plugins see them in `on-response`.
#[derive(Debug)]
pub struct ResponseView {
    /// The status code.
    pub status: StatusCode,
    /// The headers.
    pub headers: HeaderMap,
    /// The body, when a plugin asked for it.
    pub body: Option<Bytes>,
    /// Whether a plugin replaced the body.
    pub body_replaced: bool,
    /// Whether the plugin being called may read and replace the body.
    pub body_access: bool,
    /// The largest body the plugin being called may write.
    pub body_limit: u64,
}

/// Why a plugin's edit was refused; the text goes back to the plugin as the WIT error.
pub type EditResult = Result<(), String>;

/// What a request looked like before a plugin call's first edit, so that a call that fails can
/// be undone: a failed call leaves no edit behind.
#[derive(Debug)]
pub struct RequestBefore {
    method: Method,
    path: String,
    query: Option<String>,
    headers: HeaderMap,
    id: String,
    body: BufferedBody,
    vars: HashMap<String, String>,
    consumer: Option<Arc<str>>,
    upstream: Option<String>,
    targets: Vec<Fallback>,
    /// Queued edits are only ever added during a call, so their count is enough.
    response_edits: usize,
}

impl RequestView {
    /// Everything a plugin can edit, as it is now.
    pub fn before_edits(&self) -> RequestBefore {
        RequestBefore {
            method: self.method.clone(),
            path: self.path.clone(),
            query: self.query.clone(),
            headers: self.headers.clone(),
            id: self.id.clone(),
            body: self.body.clone(),
            vars: self.vars.clone(),
            consumer: self.consumer.clone(),
            upstream: self.upstream.clone(),
            targets: self.targets.clone(),
            response_edits: self.response_edits.len(),
        }
    }

    /// Puts back what `before` saw, undoing every edit made since.
    pub fn undo_edits(&mut self, before: RequestBefore) {
        self.method = before.method;
        self.path = before.path;
        self.query = before.query;
        self.headers = before.headers;
        self.id = before.id;
        self.body = before.body;
        self.vars = before.vars;
        self.consumer = before.consumer;
        self.upstream = before.upstream;
        self.targets = before.targets;
        self.response_edits.truncate(before.response_edits);
    }

    /// Fails unless edits are allowed in the current phase.
    pub fn check_writable(&self) -> EditResult {
        if self.writable {
            Ok(())
        } else {
            Err("the request is read-only after on-request".into())
        }
    }

    /// Replaces the method.
    pub fn set_method(&mut self, method: &str) -> EditResult {
        self.check_writable()?;
        self.method = Method::from_bytes(method.as_bytes())
            .map_err(|_| format!("{method:?} is not a method"))?;
        Ok(())
    }

    /// Replaces the path.
    pub fn set_path(&mut self, path: &str) -> EditResult {
        self.check_writable()?;
        if !path.starts_with('/') {
            return Err(format!("path {path:?} must start with /"));
        }
        check_uri_part(path, "path")?;
        if path.contains(['?', '#']) {
            return Err(format!("path {path:?} must not hold ? or #; use set-query"));
        }
        self.path = path.to_owned();
        Ok(())
    }

    /// Replaces or removes the query.
    pub fn set_query(&mut self, query: Option<&str>) -> EditResult {
        self.check_writable()?;
        if let Some(q) = query {
            check_uri_part(q, "query")?;
            if q.contains('#') {
                return Err(format!("query {q:?} must not hold #"));
            }
        }
        self.query = query.filter(|q| !q.is_empty()).map(str::to_owned);
        Ok(())
    }

    /// The body, for a plugin that asked for it.
    pub fn body(&self) -> Result<&Bytes, String> {
        if !self.body_access {
            return Err("this plugin did not ask for the request body (wants.request-body)".into());
        }
        match &self.body {
            BufferedBody::Buffered(bytes) => Ok(bytes),
            BufferedBody::Streaming => Err("the request body is not buffered".into()),
        }
    }

    /// Replaces the body, for a plugin that asked for it.
    pub fn set_body(&mut self, body: Vec<u8>) -> EditResult {
        self.check_writable()?;
        self.body()?;
        check_body_size(body.len(), self.body_limit)?;
        self.body = BufferedBody::Buffered(Bytes::from(body));
        Ok(())
    }
}

/// What a response looked like before a plugin call's first edit (see [`RequestBefore`]).
#[derive(Debug)]
pub struct ResponseBefore {
    status: StatusCode,
    headers: HeaderMap,
    body: Option<Bytes>,
    body_replaced: bool,
}

impl ResponseView {
    /// Everything a plugin can edit, as it is now.
    pub fn before_edits(&self) -> ResponseBefore {
        ResponseBefore {
            status: self.status,
            headers: self.headers.clone(),
            body: self.body.clone(),
            body_replaced: self.body_replaced,
        }
    }

    /// Puts back what `before` saw, undoing every edit made since.
    pub fn undo_edits(&mut self, before: ResponseBefore) {
        self.status = before.status;
        self.headers = before.headers;
        self.body = before.body;
        self.body_replaced = before.body_replaced;
    }

    /// Replaces the status code.
    pub fn set_status(&mut self, status: u16) -> EditResult {
        self.status =
            StatusCode::from_u16(status).map_err(|_| format!("{status} is not a status code"))?;
        Ok(())
    }

    /// The body, for a plugin that asked for it.
    pub fn body(&self) -> Result<&Bytes, String> {
        if !self.body_access {
            return Err(
                "this plugin did not ask for the response body (wants.response-body)".into(),
            );
        }
        self.body
            .as_ref()
            .ok_or_else(|| "the response body is not buffered".to_string())
    }

    /// Replaces the body, for a plugin that asked for it.
    pub fn set_body(&mut self, body: Vec<u8>) -> EditResult {
        self.body()?;
        check_body_size(body.len(), self.body_limit)?;
        self.body = Some(Bytes::from(body));
        self.body_replaced = true;
        Ok(())
    }
}

fn check_body_size(len: usize, limit: u64) -> EditResult {
    if len as u64 > limit {
        return Err(format!(
            "a body of {len} bytes is over this plugin's limit of {limit}"
        ));
    }
    Ok(())
}

fn check_uri_part(text: &str, what: &str) -> EditResult {
    if text.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(format!("{what} {text:?} has a space or control character"));
    }
    Ok(())
}

/// Header reads and edits, shared by requests and responses.
pub mod headers {
    use super::*;

    /// The first value of `name`, as text (invalid UTF-8 is replaced).
    pub fn get(map: &HeaderMap, name: &str) -> Option<String> {
        map.get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }

    /// Every header as (name, value) text pairs, in order.
    pub fn all(map: &HeaderMap) -> Vec<(String, String)> {
        map.iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect()
    }

    /// A header name the gateway does not own, and a value, both checked.
    pub(super) fn parse(
        name: &str,
        value: Option<&str>,
    ) -> Result<(HeaderName, Option<HeaderValue>), String> {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("{name:?} is not a header name"))?;
        if FRAMING_HEADERS.contains(&name.as_str()) {
            return Err(format!("{name} is managed by the gateway"));
        }
        let value = value
            .map(|v| {
                HeaderValue::from_str(v)
                    .map_err(|_| format!("the value for {name} has a forbidden character"))
            })
            .transpose()?;
        Ok((name, value))
    }

    /// Sets `name` to `value`, replacing its values.
    pub fn set(map: &mut HeaderMap, name: &str, value: &str) -> EditResult {
        let (name, value) = parse(name, Some(value))?;
        map.insert(name, value.expect("parsed with a value"));
        Ok(())
    }

    /// Adds a value to `name`.
    pub fn append(map: &mut HeaderMap, name: &str, value: &str) -> EditResult {
        let (name, value) = parse(name, Some(value))?;
        map.append(name, value.expect("parsed with a value"));
        Ok(())
    }

    /// Removes every value of `name`; an invalid or gateway-owned name is ignored.
    pub fn remove(map: &mut HeaderMap, name: &str) {
        if let Ok((name, _)) = parse(name, None) {
            map.remove(name);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A request view for tests.
    pub(crate) fn view() -> RequestView {
        RequestView {
            method: Method::GET,
            path: "/a".into(),
            query: None,
            headers: HeaderMap::new(),
            id: "id".into(),
            route_id: "r".into(),
            client_ip: "127.0.0.1".parse().unwrap(),
            body: BufferedBody::Streaming,
            vars: HashMap::new(),
            writable: true,
            body_access: false,
            body_limit: 4,
            consumer: None,
            upstream: None,
            targets: Vec::new(),
            answered_by: None,
            response_edits: Vec::new(),
            directory: Directory::default(),
            trace: None,
            notes: None,
            origin: Origin::default(),
        }
    }

    #[test]
    fn queued_response_edits_are_checked_then_applied_in_order() {
        assert!(ResponseEdit::new(ResponseEdit::Set, "content-length", "1").is_err());
        assert!(ResponseEdit::new(ResponseEdit::Set, "x-a", "a\nb").is_err());
        assert!(ResponseEdit::remove("transfer-encoding").is_err());
        let edits = [
            ResponseEdit::new(ResponseEdit::Set, "X-A", "1").unwrap(),
            ResponseEdit::new(ResponseEdit::Append, "x-a", "2").unwrap(),
            ResponseEdit::remove("x-b").unwrap(),
        ];
        let mut map = HeaderMap::new();
        map.insert("x-a", HeaderValue::from_static("0"));
        map.insert("x-b", HeaderValue::from_static("0"));
        edits.iter().for_each(|edit| edit.apply(&mut map));
        assert_eq!(
            headers::all(&map),
            vec![("x-a".into(), "1".into()), ("x-a".into(), "2".into())]
        );
    }

    #[test]
    fn edits_are_validated() {
        let mut v = view();
        v.set_path("/b/c").unwrap();
        assert!(v.set_path("b").is_err());
        assert!(v.set_path("/a b").is_err());
        assert!(v.set_path("/a?x=1").is_err());
        v.set_query(Some("x=1")).unwrap();
        assert_eq!(v.query.as_deref(), Some("x=1"));
        v.set_query(Some("")).unwrap();
        assert_eq!(v.query, None);
        assert!(v.set_method("GE T").is_err());
        v.set_method("PURGE").unwrap();
        assert_eq!(v.method.as_str(), "PURGE");
        headers::set(&mut v.headers, "X-A", "1").unwrap();
        headers::append(&mut v.headers, "x-a", "2").unwrap();
        assert_eq!(
            headers::all(&v.headers),
            vec![("x-a".into(), "1".into()), ("x-a".into(), "2".into())]
        );
        assert!(headers::set(&mut v.headers, "bad name", "1").is_err());
        assert!(headers::set(&mut v.headers, "x-b", "a\r\nb").is_err());
        assert!(
            headers::set(&mut v.headers, "content-length", "5")
                .unwrap_err()
                .contains("managed")
        );
        headers::remove(&mut v.headers, "X-A");
        assert!(v.headers.is_empty());
    }

    #[test]
    fn undoing_puts_back_every_edit_and_drops_the_queued_headers() {
        let mut v = view();
        v.response_edits
            .push(ResponseEdit::new(ResponseEdit::Set, "x-earlier", "1").unwrap());
        let before = v.before_edits();
        v.set_path("/b").unwrap();
        v.set_query(Some("q=1")).unwrap();
        v.set_method("PUT").unwrap();
        headers::set(&mut v.headers, "x-a", "1").unwrap();
        v.vars.insert("k".into(), "v".into());
        v.id = "other".into();
        v.consumer = Some("alice".into());
        v.upstream = Some("u2".into());
        v.response_edits
            .push(ResponseEdit::new(ResponseEdit::Set, "set-cookie", "s=1").unwrap());
        v.undo_edits(before);
        assert_eq!((v.method.as_str(), v.path.as_str()), ("GET", "/a"));
        assert_eq!((v.query, v.consumer, v.upstream), (None, None, None));
        assert!(v.headers.is_empty() && v.vars.is_empty());
        assert_eq!(v.id, "id");
        assert_eq!(
            v.response_edits.len(),
            1,
            "only the call's own queued edits go"
        );

        let mut r = ResponseView {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: Some(Bytes::from_static(b"up")),
            body_replaced: false,
            body_access: true,
            body_limit: 8,
        };
        let before = r.before_edits();
        r.set_status(299).unwrap();
        headers::set(&mut r.headers, "x-b", "1").unwrap();
        r.set_body(b"mine".to_vec()).unwrap();
        r.undo_edits(before);
        assert_eq!(r.status, StatusCode::OK);
        assert!(r.headers.is_empty() && !r.body_replaced);
        assert_eq!(r.body.as_deref(), Some(&b"up"[..]));
    }

    #[test]
    fn body_needs_access_and_respects_the_limit() {
        let mut v = view();
        v.body = BufferedBody::Buffered(Bytes::from_static(b"hi"));
        assert!(v.body().unwrap_err().contains("did not ask"));
        v.body_access = true;
        assert_eq!(v.body().unwrap().as_ref(), b"hi");
        assert!(v.set_body(b"12345".to_vec()).unwrap_err().contains("over"));
        v.set_body(b"1234".to_vec()).unwrap();
        v.writable = false;
        assert!(v.set_body(b"1".to_vec()).unwrap_err().contains("read-only"));
    }
}
