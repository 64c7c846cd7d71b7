//! Config objects: the same JSON in etcd, in the YAML file and in the admin API, one file per
//! kind. Each is valid by construction: deserialising one runs its checks, so nothing
//! downstream relies on a separate pass having run. [`parse`] is the one way in for every
//! source, and says what is wrong as JSON pointers into the object.

mod admin;
mod consumer;
mod kind;
mod node;
mod plugin;
mod route;
mod server;
mod service;
mod ssl;
mod tenant;
mod upstream;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::Serialize;

pub use self::admin::{
    Account, AdminConfig, ApiKey, MetricsHistory, OPENABLE, Role, session_key_bytes,
};
pub use self::consumer::{ConsumerConfig, Consumers, LookupError};
pub use self::kind::{Check, KINDS, KindInfo, Layout, Reference, Refused, Slot};
pub use self::node::ServiceNode;
pub use self::plugin::{
    FailurePolicy, Grants, HttpGrant, Isolation, KvBackend, KvConfig, Limits, PluginConfig,
    Quarantine, WasiGrant, is_sha256_hex,
};
pub use self::route::{PathNormalization, PluginRef, RouteConfig, RouteStatus, StripPrefix};
pub use self::server::{MIN_HEADER_BYTES, OtlpProtocol, ServerConfig, TracingConfig, TrustedProxy};
pub use self::service::ServiceSettings;
pub use self::ssl::SslConfig;
pub use self::tenant::{Quotas, TenantConfig};
pub use self::upstream::{
    ActiveCheck, ActiveHealthy, ActiveUnhealthy, BalancerKind, HashOn, HealthChecks, MAX_WEIGHT,
    NodeConfig, NodeStatus, PassiveCheck, PassiveUnhealthy, ProbeKind, RetryBudgetConfig, RetryOn,
    Scheme, Timeouts, UpstreamConfig, UpstreamTls,
};

/// The kinds of config object, as they appear in error reports and the etcd layout. Its row of
/// [`KINDS`] says how each is stored, named and served; the table has a file of its own because
/// it names every type, and every type names its kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// `routes`
    Route,
    /// `upstreams`
    Upstream,
    /// `plugins`
    Plugin,
    /// `tenants`
    Tenant,
    /// `server`
    Server,
    /// A node registered under `services/<name>/<node>`.
    ServiceNode,
    /// `service_settings`: how a discovered service's nodes are reached.
    ServiceSettings,
    /// `admin`: who may use the admin listener.
    Admin,
    /// `ssl`: a certificate the TLS listener serves.
    Ssl,
    /// `consumers`: a caller with credentials.
    Consumer,
    /// A plugin module, by sha256.
    Module,
    /// A key the store does not understand.
    Key,
}

/// One thing wrong with an object: where (a JSON pointer into it, `""` for the whole object)
/// and what.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FieldError {
    /// A JSON pointer, such as `/nodes/0/host`.
    pub path: String,
    /// What is wrong there.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// The errors of one object, as one line.
pub fn describe(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(FieldError::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Collects what is wrong with an object, each at its JSON pointer.
#[derive(Debug, Default)]
pub struct Checks {
    errors: Vec<FieldError>,
}

impl Checks {
    /// Records that the value at `path` is wrong.
    pub fn fail(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(FieldError {
            path: path.into(),
            message: message.into(),
        });
    }

    /// Records `result`'s error, if any, at `path`.
    pub fn check(&mut self, path: impl Into<String>, result: Result<(), String>) {
        if let Err(message) = result {
            self.fail(path, message);
        }
    }

    /// What was found.
    pub fn into_errors(self) -> Vec<FieldError> {
        self.errors
    }
}

/// A kind of config object: how it deserialises without its checks, and the checks.
pub trait ConfigObject: Sized + Serialize {
    /// Its kind: its row of [`KINDS`] says how it is stored and named.
    const KIND: Kind;

    /// serde's derived deserialisation, before the checks.
    fn deserialize_unchecked<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error>;

    /// Everything that can be checked without the other objects.
    fn check(&self, checks: &mut Checks);

    /// Its id or name.
    fn id(&self) -> &str;
}

/// Implements `Serialize` and a checking `Deserialize` for a type declared with
/// `#[serde(remote = "Self")]`, whose derived functions are then inherent.
macro_rules! checked_serde {
    ($type:ty) => {
        impl serde::Serialize for $type {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                <$type>::serialize(self, s)
            }
        }

        impl<'de> serde::Deserialize<'de> for $type {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let object = <$type>::deserialize(d)?;
                let mut checks = $crate::config::Checks::default();
                $crate::config::ConfigObject::check(&object, &mut checks);
                let errors = checks.into_errors();
                if errors.is_empty() {
                    Ok(object)
                } else {
                    Err(<D::Error as serde::de::Error>::custom(
                        $crate::config::describe(&errors),
                    ))
                }
            }
        }
    };
}
pub(crate) use checked_serde;

/// Parses and checks one object: the way in for the file, etcd and the admin API alike. Errors
/// point into the object: `/nodes/0/port` for a port that is not a number, `/uri` for a bad
/// path pattern.
pub fn parse<T: ConfigObject>(json: &serde_json::Value) -> Result<T, Vec<FieldError>> {
    // The times the admin API stamps on what it writes are the store's, not the object's.
    if let Some(object) = json.as_object()
        && TIMES.iter().any(|time| object.contains_key(*time))
    {
        let mut object = object.clone();
        for time in TIMES {
            object.remove(*time);
        }
        return parse_plain(&serde_json::Value::Object(object));
    }
    parse_plain(json)
}

/// The fields the admin API sets on every object it writes: seconds since the epoch.
pub const TIMES: &[&str] = &["create_time", "update_time"];

fn parse_plain<T: ConfigObject>(json: &serde_json::Value) -> Result<T, Vec<FieldError>> {
    let mut track = serde_path_to_error::Track::new();
    let deserializer = serde_path_to_error::Deserializer::new(json, &mut track);
    let object = match T::deserialize_unchecked(deserializer) {
        Ok(object) => object,
        Err(error) => {
            return Err(vec![FieldError {
                path: pointer(&track.path()),
                message: without_value(&error.to_string()),
            }]);
        }
    };
    let mut checks = Checks::default();
    object.check(&mut checks);
    let errors = checks.into_errors();
    if errors.is_empty() {
        Ok(object)
    } else {
        Err(errors)
    }
}

/// Runs an object's checks again, for one built in code (`weir plugin push` edits an entry).
pub fn verify<T: ConfigObject>(object: &T) -> Result<(), Vec<FieldError>> {
    let mut checks = Checks::default();
    object.check(&mut checks);
    let errors = checks.into_errors();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// serde's message without the value it quotes: `invalid type: string "k-123", expected a map`
/// becomes `invalid type: string, expected a map`. The value may be a secret (a credential, a
/// key), and the message goes into answers, logs and `/v1/status`; the pointer says where.
fn without_value(message: &str) -> String {
    for prefix in ["invalid type: ", "invalid value: ", "unknown variant "] {
        let Some(rest) = message.strip_prefix(prefix) else {
            continue;
        };
        // The value comes first and may itself hold ", expected ": the last one is serde's.
        let Some(at) = rest.rfind(", expected ") else {
            return prefix.trim_end().to_owned();
        };
        let what = rest[..at]
            .split(['"', '`'])
            .next()
            .unwrap_or_default()
            .trim();
        return if what.is_empty() {
            format!("{}{}", prefix.trim_end(), &rest[at..])
        } else {
            format!("{prefix}{what}{}", &rest[at..])
        };
    }
    message.to_owned()
}

/// A serde path as a JSON pointer (RFC 6901).
fn pointer(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for segment in path.iter() {
        out.push('/');
        match segment {
            Segment::Seq { index } => out.push_str(&index.to_string()),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                out.push_str(&key.replace('~', "~0").replace('/', "~1"));
            }
            Segment::Unknown => out.push('?'),
        }
    }
    out
}

/// Why one config object was refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ObjectError {
    /// What kind of object.
    pub kind: Kind,
    /// Its id or name (or its position, when it has none).
    pub id: String,
    /// What is wrong with it, in one line.
    pub reason: String,
    /// Each thing wrong with it, where that is known.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
    /// The store key it came from, for stores that have keys (etcd).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

impl fmt::Display for ObjectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.key {
            Some(key) => write!(f, "{} {:?} ({key}): {}", self.kind, self.id, self.reason),
            None => write!(f, "{} {:?}: {}", self.kind, self.id, self.reason),
        }
    }
}

impl ObjectError {
    /// An error about the object `kind`/`id`.
    pub fn new(kind: Kind, id: impl Into<String>, reason: impl Into<String>) -> Self {
        ObjectError {
            kind,
            id: id.into(),
            reason: reason.into(),
            errors: Vec::new(),
            key: None,
        }
    }

    /// The field errors of the object `kind`/`id`.
    pub fn fields(kind: Kind, id: impl Into<String>, errors: Vec<FieldError>) -> Self {
        ObjectError {
            kind,
            id: id.into(),
            reason: describe(&errors),
            errors,
            key: None,
        }
    }

    /// The same error about the object `kind`/`id` (for an error found before the object's id
    /// was known).
    pub fn with_id(mut self, kind: Kind, id: impl Into<String>) -> Self {
        self.kind = kind;
        self.id = id.into();
        self
    }

    /// The same error, naming the store key it came from.
    pub fn at_key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }
}

/// The set of config objects that a store holds, keyed by id (or name, for plugins).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ConfigObjects {
    /// Routes by id, in a persistent map (a copy shares all but what later changes) of shared
    /// configs, so that a store can keep 100,000 routes and publish them after each change
    /// without copying them, and an unchanged route is the same object from one change to the
    /// next.
    pub routes: imbl::OrdMap<String, Arc<RouteConfig>>,
    /// Upstreams by id.
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    /// Plugin entries by name.
    pub plugins: BTreeMap<String, PluginConfig>,
    /// Tenants by name.
    pub tenants: BTreeMap<String, TenantConfig>,
    /// Live service nodes: service name, then node id.
    pub services: BTreeMap<String, BTreeMap<String, ServiceNode>>,
    /// Settings of discovered services, by service name.
    pub service_settings: BTreeMap<String, ServiceSettings>,
    /// The `server` section, when the store has one (otherwise the defaults apply).
    pub server: Option<ServerConfig>,
    /// The `admin` section, when the store has one.
    pub admin: Option<AdminConfig>,
    /// Certificates by id.
    pub ssl: BTreeMap<String, SslConfig>,
    /// Consumers by name.
    pub consumers: BTreeMap<String, ConsumerConfig>,
}

/// The longest any configured timeout may be: one day.
pub const MAX_TIMEOUT_MS: u64 = 86_400_000;

/// The methods a route or a grant may name.
const METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// A method name, or why not.
fn check_method(method: &str) -> Result<(), String> {
    if METHODS.contains(&method) {
        Ok(())
    } else {
        Err(format!(
            "method {method:?} is not one of {}",
            METHODS.join(", ")
        ))
    }
}

/// An id: letters, digits, `-`, `_` and `.`.
pub fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("id is empty".into());
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(format!("id {id:?} may only use letters, digits, - _ ."));
    }
    Ok(())
}

/// A host name or IP address that can stand in a URI's authority.
fn check_host(host: &str) -> Result<(), String> {
    let bracketed = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    if host.is_empty()
        || host.contains(['/', '@', '[', ']'])
        || bracketed.parse::<http::uri::Authority>().is_err()
    {
        return Err(format!(
            "node host {host:?} is not a host name or IP address"
        ));
    }
    Ok(())
}

/// A timeout in 1 ms..=1 day.
fn check_timeout(name: &str, ms: u64) -> Result<(), String> {
    if (1..=MAX_TIMEOUT_MS).contains(&ms) {
        Ok(())
    } else {
        Err(format!("{name} {ms} is not in 1..={MAX_TIMEOUT_MS}"))
    }
}

fn one() -> u32 {
    1
}

/// The default of the timeouts that bound a stream's pauses: a minute.
fn default_stream_ms() -> u64 {
    60_000
}

fn yes() -> bool {
    true
}

fn is_false(value: &bool) -> bool {
    !*value
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parse_points_at_what_is_wrong() {
        let errors =
            parse::<UpstreamConfig>(&json!({"id": "u", "nodes": [{"host": "h", "port": "x"}]}))
                .unwrap_err();
        assert_eq!(errors[0].path, "/nodes/0/port", "{errors:?}");
        let errors =
            parse::<UpstreamConfig>(&json!({"id": "u", "nodes": [{"host": "h", "port": 0}]}))
                .unwrap_err();
        assert_eq!(errors[0].path, "/nodes/0/port", "{errors:?}");
        let errors = parse::<RouteConfig>(&json!({"id": "bad id", "uri": "api"})).unwrap_err();
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["/id", "/uri", ""], "{errors:?}");
        let errors = parse::<RouteConfig>(&json!({"id": "r", "colour": 1})).unwrap_err();
        assert!(
            errors[0].message.contains("unknown field `colour`"),
            "{errors:?}"
        );
    }

    #[test]
    fn a_refused_value_is_named_by_its_pointer_never_quoted() {
        let errors = parse::<ConsumerConfig>(
            &json!({"name": "a", "credentials": {"key-auth": "SECRET-123, expected x"}}),
        )
        .unwrap_err();
        assert_eq!(errors[0].path, "/credentials/key-auth", "{errors:?}");
        assert_eq!(
            errors[0].message, "invalid type: string, expected a map",
            "{errors:?}"
        );
        let errors =
            parse::<UpstreamConfig>(&json!({"id": "u", "nodes": [{"host": "h", "port": 1.5}]}))
                .unwrap_err();
        assert!(!errors[0].message.contains("1.5"), "{errors:?}");
        assert!(errors[0].message.contains("floating point"), "{errors:?}");
        let errors = parse::<PluginConfig>(&json!({"name": "p", "module": "p.wasm",
            "failure": "SECRET-variant"}))
        .unwrap_err();
        assert_eq!(errors[0].path, "/failure", "{errors:?}");
        assert!(!errors[0].message.contains("SECRET"), "{errors:?}");
        assert!(
            errors[0].message.contains("expected `closed` or `open`"),
            "{errors:?}"
        );
    }

    #[test]
    fn deserialising_runs_the_same_checks() {
        let error = serde_json::from_value::<UpstreamConfig>(json!({"id": "u", "nodes": []}))
            .unwrap_err()
            .to_string();
        assert!(error.contains("/nodes: `nodes` is empty"), "{error}");
    }

    /// What `parse` says is wrong with `json`, in one line.
    fn refused<T: ConfigObject + fmt::Debug>(json: &serde_json::Value) -> String {
        describe(&parse::<T>(json).unwrap_err())
    }

    #[test]
    fn route_accepts_the_documented_forms() {
        let r = parse::<RouteConfig>(&serde_json::json!({
            "id": "api", "uri": "/api/*", "methods": ["GET"], "hosts": ["*.example.com"],
            "upstream_id": "b", "strip_prefix": true,
            "plugins": [{"name": "key-auth", "config": {"keys": ["k"]}}]
        }))
        .unwrap();
        assert_eq!(r.strip_prefix, Some(StripPrefix::Route(true)));
        assert_eq!(r.plugins[0].config["keys"][0], "k");
        let r = parse::<RouteConfig>(&serde_json::json!({
            "id": "u", "uris": ["/users/{id}", "/u/{id}/*"], "service": "*", "strip_prefix": "/u"
        }))
        .unwrap();
        assert_eq!(r.paths().count(), 2);
        assert_eq!(r.plugins, vec![]);
    }

    #[test]
    fn route_rejects_bad_input_with_a_reason() {
        let cases = [
            (
                serde_json::json!({"id": "a", "upstream_id": "b"}),
                "set `uri`",
            ),
            (
                serde_json::json!({"id": "a", "uri": "api", "upstream_id": "b"}),
                "start with /",
            ),
            (
                serde_json::json!({"id": "a", "uri": "/a/*/b", "upstream_id": "b"}),
                "`*` may only",
            ),
            (
                serde_json::json!({"id": "a", "uri": "/a/{}", "upstream_id": "b"}),
                "bad parameter",
            ),
            (
                serde_json::json!({"id": "a", "uri": "/a/x{id}", "upstream_id": "b"}),
                "whole segment",
            ),
            (
                serde_json::json!({"id": "a", "uri": "/a", "methods": ["GRAB"], "upstream_id": "b"}),
                "GRAB",
            ),
            (
                serde_json::json!({"id": "a", "uri": "/a"}),
                "set `upstream_id` or `service`",
            ),
            (
                serde_json::json!({"id": "a", "uri": "/a", "upstream_id": "b", "service": "s"}),
                "not both",
            ),
            (
                serde_json::json!({"id": "a b", "uri": "/a", "upstream_id": "b"}),
                "may only use",
            ),
            (
                serde_json::json!({"id": "a", "uri": "/a", "upstream_id": "b", "colour": 1}),
                "unknown field `colour`",
            ),
            (
                serde_json::json!({"id": "a", "uri": "/a", "upstream_id": "b", "hosts": ["a.example."]}),
                "without the trailing dot",
            ),
            (
                serde_json::json!({"id": "a", "uri": "/a", "upstream_id": "b",
                                   "request_trailers": ["x-checksum", "X-Consumer-Username"]}),
                "/request_trailers/1: request trailer \"X-Consumer-Username\" cannot be allowed: the gateway sets it",
            ),
            (
                serde_json::json!({"id": "a", "uri": "/a", "upstream_id": "b", "request_trailers": ["te"]}),
                "hop-by-hop",
            ),
            (
                serde_json::json!({"id": "a", "uri": "/a", "upstream_id": "b", "request_trailers": ["a b"]}),
                "not a header name",
            ),
        ];
        for (json, expected) in cases {
            let err = refused::<RouteConfig>(&json);
            assert!(err.contains(expected), "{json}: {err}");
        }
    }

    #[test]
    fn upstream_rejects_empty_nodes_and_a_chash_without_key() {
        let up = |json| parse::<UpstreamConfig>(&json).map_err(|e| describe(&e));
        assert!(
            up(serde_json::json!({"id": "u", "nodes": []}))
                .unwrap_err()
                .contains("at least one node")
        );
        assert!(
            up(
                serde_json::json!({"id": "u", "nodes": [{"host": "h", "port": 1}], "type": "chash"})
            )
            .unwrap_err()
            .contains("hash_on")
        );
        up(serde_json::json!({"id": "u", "nodes": [{"host": "h", "port": 1}], "type": "chash", "hash_on": "header:X-User"})).unwrap();
        let parsed: UpstreamConfig = serde_json::from_value(serde_json::json!({
            "id": "u", "nodes": [{"host": "h", "port": 1}], "type": "chash", "hash_on": "header:X-User"
        }))
        .unwrap();
        assert_eq!(parsed.hash_on, Some(HashOn::Header("x-user".into())));
        assert!(
            serde_json::from_value::<UpstreamConfig>(serde_json::json!({
                "id": "u", "nodes": [{"host": "h", "port": 1}], "type": "chash", "hash_on": "cookie"
            }))
            .unwrap_err()
            .to_string()
            .contains("not one of ip, uri")
        );
    }

    #[test]
    fn plugin_needs_exactly_one_source_and_sane_limits() {
        let p = |json| parse::<PluginConfig>(&json).map_err(|e| describe(&e));
        assert!(
            p(serde_json::json!({"name": "a"}))
                .unwrap_err()
                .contains("set `module`")
        );
        p(serde_json::json!({"name": "a", "module": "a.wasm"})).unwrap();
        assert!(
            p(serde_json::json!({"name": "a", "sha256": "abc"}))
                .unwrap_err()
                .contains("64")
        );
        assert!(
            p(serde_json::json!({"name": "a", "module": "a.wasm", "limits": {"memory_mb": 0}}))
                .unwrap_err()
                .contains("memory_mb")
        );
        let parsed: PluginConfig = serde_json::from_value(
            serde_json::json!({"name": "a", "module": "a.wasm", "failure": "open"}),
        )
        .unwrap();
        assert_eq!(parsed.failure, FailurePolicy::Open);
        assert_eq!(parsed.limits, Limits::default());
    }
}
