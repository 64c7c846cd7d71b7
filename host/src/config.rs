//! Config objects: the same JSON in etcd and in the YAML file, and their stand-alone validation.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize};

/// The kinds of config object, as they appear in error reports and the etcd layout.
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
    /// A key the store does not understand.
    Key,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Route => "route",
            Kind::Upstream => "upstream",
            Kind::Plugin => "plugin",
            Kind::Tenant => "tenant",
            Kind::Server => "server",
            Kind::ServiceNode => "service node",
            Kind::Key => "key",
        })
    }
}

/// A route: which requests it matches, where they go, and the plugins they pass through.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// `id: api`
    pub id: String,
    /// `uri: /api/*`: an exact path, a prefix ending in `/*`, or a pattern with `{param}`s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    /// `uris: [/a, /b/*]`: several paths for one route.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uris: Vec<String>,
    /// `methods: [GET, POST]`: any method when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// `hosts: [api.example.com, "*.example.com"]`: any host when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// `priority: 10`: among routes with the same path, the higher wins.
    #[serde(default)]
    pub priority: i32,
    /// `upstream_id: backend`
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_id: Option<String>,
    /// `service: user-svc`, or `"*"` to take the service from the first path segment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// `strip_prefix: true` removes the route's literal prefix; `strip_prefix: /api` removes that.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strip_prefix: Option<StripPrefix>,
    /// `plugins: [{name: key-auth, config: {..}}]`, run in this order.
    #[serde(default)]
    pub plugins: Vec<PluginRef>,
    /// `path_normalization: off` sends the client's raw path upstream instead of its normal
    /// form, and lets through encoded slashes and backslashes; the route is still matched on
    /// the normal form. For backends that need `%2F` kept; see docs/security.md for the risk.
    #[serde(default, skip_serializing_if = "PathNormalization::is_on")]
    pub path_normalization: PathNormalization,
}

/// Whether a route's upstream gets the normal form of the path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PathNormalization {
    /// The normal form (the default).
    #[default]
    On,
    /// The path as the client sent it.
    Off,
}

impl PathNormalization {
    fn is_on(&self) -> bool {
        *self == PathNormalization::On
    }
}

/// How much of the path to remove before the request goes upstream.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum StripPrefix {
    /// `true`: the matched pattern's literal prefix, such as `/api` for `/api/*`.
    Route(bool),
    /// `/api`: exactly this prefix.
    Literal(String),
}

/// One plugin in a route's chain.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PluginRef {
    /// `name: key-auth`: a plugin entry's name.
    pub name: String,
    /// `config: {keys: [..]}`: passed as JSON to the plugin's `init`.
    #[serde(default = "empty_object")]
    pub config: serde_json::Value,
    /// `isolation: per-request`: overrides the plugin entry's isolation on this route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isolation: Option<Isolation>,
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}

/// An upstream: a set of nodes and how to balance, time out and retry across them.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// `id: backend`
    pub id: String,
    /// `nodes: [{host: 10.0.0.1, port: 8080, weight: 2}]`
    pub nodes: Vec<NodeConfig>,
    /// `type: roundrobin | chash | least_conn`
    #[serde(rename = "type", default)]
    pub balancer: BalancerKind,
    /// `hash_on: ip | uri | header:x-user-id`, for `type: chash`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_on: Option<HashOn>,
    /// `scheme: http | grpc`: grpc speaks HTTP/2 without TLS (h2c).
    #[serde(default)]
    pub scheme: Scheme,
    /// `timeout: {connect_ms: 1000, read_ms: 15000}`
    #[serde(default)]
    pub timeout: Timeouts,
    /// `retries: 2`: extra attempts on other nodes when a connection cannot be made.
    /// By default, one per other node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
}

/// A backend address.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// `host: 10.0.0.1` (an IP address or a DNS name)
    pub host: String,
    /// `port: 8080`
    pub port: u16,
    /// `weight: 2`: its share of traffic; 0 takes it out of rotation.
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

/// How an upstream picks a node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BalancerKind {
    /// Smooth weighted round robin.
    #[default]
    Roundrobin,
    /// A consistent-hash ring, keyed by `hash_on`.
    Chash,
    /// The node with the fewest requests in flight, relative to its weight.
    LeastConn,
}

/// What a consistent-hash upstream hashes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub enum HashOn {
    /// `ip`: the client's address.
    Ip,
    /// `uri`: the request path and query.
    Uri,
    /// `header:NAME`: a request header.
    Header(String),
}

impl From<HashOn> for String {
    fn from(h: HashOn) -> String {
        match h {
            HashOn::Ip => "ip".into(),
            HashOn::Uri => "uri".into(),
            HashOn::Header(name) => format!("header:{name}"),
        }
    }
}

impl<'de> Deserialize<'de> for HashOn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        match text.as_str() {
            "ip" => Ok(HashOn::Ip),
            "uri" => Ok(HashOn::Uri),
            other => match other.strip_prefix("header:") {
                Some(name) if !name.is_empty() => Ok(HashOn::Header(name.to_ascii_lowercase())),
                _ => Err(serde::de::Error::custom(format!(
                    "hash_on {other:?} is not one of ip, uri, header:NAME"
                ))),
            },
        }
    }
}

/// The protocol spoken to an upstream's nodes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scheme {
    /// HTTP/1.1.
    #[default]
    Http,
    /// HTTP/2 without TLS (h2c), for gRPC.
    Grpc,
}

/// Upstream timeouts; each bounds one thing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    /// `connect_ms: 1000`: one attempt to open a connection to one node.
    #[serde(default = "default_connect_ms")]
    pub connect_ms: u64,
    /// `send_ms: 60000`: the longest the node may leave the request's writes waiting.
    #[serde(default = "default_stream_ms")]
    pub send_ms: u64,
    /// `read_ms: 15000`: from the request's last byte to the response headers.
    #[serde(default = "default_read_ms")]
    pub read_ms: u64,
    /// `idle_ms: 60000`: the longest a body may stop moving, in either direction.
    #[serde(default = "default_stream_ms")]
    pub idle_ms: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect_ms: default_connect_ms(),
            send_ms: default_stream_ms(),
            read_ms: default_read_ms(),
            idle_ms: default_stream_ms(),
        }
    }
}

fn default_stream_ms() -> u64 {
    60_000
}

fn default_connect_ms() -> u64 {
    2_000
}

fn default_read_ms() -> u64 {
    30_000
}

/// A plugin entry: a Wasm component, its limits and what happens when it fails.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// `name: key-auth`: what routes call it.
    pub name: String,
    /// `module: plugins/key_auth.wasm`: a component file (file store); relative to the config file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<PathBuf>,
    /// `sha256: 9f86d0..`: a module stored in etcd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// `limits: {memory_mb: 32, timeout_ms: 50, max_body_bytes: 1048576}`
    #[serde(default)]
    pub limits: Limits,
    /// `failure: closed` (the default) answers 500 when the plugin fails; `open` skips it.
    #[serde(default)]
    pub failure: FailurePolicy,
    /// `isolation: pooled` (the default) reuses warm instances; `per-request` gives every
    /// request a fresh instance, so that no state carries from one request to the next.
    #[serde(default)]
    pub isolation: Isolation,
    /// `grants: {kv: true, http: {hosts: [10.0.0.5:8080]}}`: the host functions it may import.
    /// A component that imports one its entry does not grant is refused when it loads.
    #[serde(default)]
    pub grants: Grants,
    /// `tenant: team-a`: the tenant whose quotas it counts against; its kv namespace is the
    /// tenant's and the plugin's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// `quarantine: {traps: 5, window_ms: 10000, backoff_ms: 30000}`: after `traps` failures
    /// within `window_ms`, the plugin is not called for `backoff_ms` (its failure policy answers).
    #[serde(default)]
    pub quarantine: Quarantine,
}

/// The host functions a plugin may import. Nothing but the request and response is granted
/// unless listed here.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Grants {
    /// `log: true`: write to the gateway's log.
    #[serde(default, skip_serializing_if = "is_false")]
    pub log: bool,
    /// `clock: true`: read the wall and monotonic clocks.
    #[serde(default, skip_serializing_if = "is_false")]
    pub clock: bool,
    /// `kv: true`: the plugin's key/value namespace.
    #[serde(default, skip_serializing_if = "is_false")]
    pub kv: bool,
    /// `metrics: true`: add to Prometheus counters.
    #[serde(default, skip_serializing_if = "is_false")]
    pub metrics: bool,
    /// `http: {hosts: [api.internal:8080], methods: [GET]}`: outbound HTTP calls to these hosts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpGrant>,
    /// `wasi: [clocks, random, stdio, runtime]`: WASI interfaces beyond the inert ones every
    /// component may import. Files, sockets and environment variables are never reachable.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub wasi: Vec<WasiGrant>,
}

fn is_false(value: &bool) -> bool {
    !*value
}

/// Where a plugin's outbound HTTP calls may go.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpGrant {
    /// `hosts: [api.internal:8080, 10.0.0.5]`: `host` or `host:port` (port 80 when left out).
    /// An empty list links the interface but lets no call through.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// `methods: [GET, POST]`: GET when left out.
    #[serde(default = "get_only")]
    pub methods: Vec<String>,
    /// `timeout_ms: 1000`: the whole call, from connect to the last body byte.
    #[serde(default = "default_call_timeout_ms")]
    pub timeout_ms: u64,
    /// `max_response_bytes: 1048576`: a longer response body fails the call.
    #[serde(default = "default_max_body_bytes")]
    pub max_response_bytes: u64,
}

fn get_only() -> Vec<String> {
    vec!["GET".into()]
}

fn default_call_timeout_ms() -> u64 {
    1_000
}

/// A WASI interface family that a grant enables.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WasiGrant {
    /// `wasi:clocks/*`.
    Clocks,
    /// `wasi:random/*`.
    Random,
    /// Output on `wasi:cli/stdout` and `stderr` goes to the gateway's log (otherwise it is dropped).
    Stdio,
    /// `wasi:filesystem/*` and `wasi:sockets/*`, which language runtimes (Python, JavaScript)
    /// import whether or not they use them, linked with nothing behind them: no directories,
    /// no network, no name lookups.
    Runtime,
}

/// When a failing plugin stops being called, and for how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Quarantine {
    /// `traps: 5`: failures (traps, timeouts, limit hits) that trigger a quarantine; 0 never does.
    #[serde(default = "default_quarantine_traps")]
    pub traps: u32,
    /// `window_ms: 10000`: the window those failures are counted in.
    #[serde(default = "default_quarantine_window_ms")]
    pub window_ms: u64,
    /// `backoff_ms: 30000`: how long a quarantine lasts; it doubles each time a retry fails.
    #[serde(default = "default_quarantine_backoff_ms")]
    pub backoff_ms: u64,
}

impl Default for Quarantine {
    fn default() -> Self {
        Quarantine {
            traps: default_quarantine_traps(),
            window_ms: default_quarantine_window_ms(),
            backoff_ms: default_quarantine_backoff_ms(),
        }
    }
}

fn default_quarantine_traps() -> u32 {
    5
}

fn default_quarantine_window_ms() -> u64 {
    10_000
}

fn default_quarantine_backoff_ms() -> u64 {
    30_000
}

/// A tenant: a party whose plugins share quotas, and whose kv namespaces no other tenant sees.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// `name: team-a`
    pub name: String,
    /// `quotas: {memory_mb: 256, instances: 64, kv_entries: 10000, kv_bytes: 10485760}`
    #[serde(default)]
    pub quotas: Quotas,
}

/// Limits on everything one tenant's plugins hold at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Quotas {
    /// `memory_mb: 256`: the linear memory of all its live instances together.
    #[serde(default = "default_quota_memory_mb")]
    pub memory_mb: u64,
    /// `instances: 64`: its live instances.
    #[serde(default = "default_quota_instances")]
    pub instances: u64,
    /// `kv_entries: 10000`: keys in its kv namespaces.
    #[serde(default = "default_quota_kv_entries")]
    pub kv_entries: u64,
    /// `kv_bytes: 10485760`: bytes of keys and values in its kv namespaces.
    #[serde(default = "default_quota_kv_bytes")]
    pub kv_bytes: u64,
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas {
            memory_mb: default_quota_memory_mb(),
            instances: default_quota_instances(),
            kv_entries: default_quota_kv_entries(),
            kv_bytes: default_quota_kv_bytes(),
        }
    }
}

fn default_quota_memory_mb() -> u64 {
    1024
}

fn default_quota_instances() -> u64 {
    256
}

fn default_quota_kv_entries() -> u64 {
    100_000
}

fn default_quota_kv_bytes() -> u64 {
    64 << 20
}

impl TenantConfig {
    /// Checks the name and quotas.
    pub fn validate(&self) -> Result<(), String> {
        check_id(&self.name)?;
        let q = self.quotas;
        if q.memory_mb == 0 || q.instances == 0 || q.kv_entries == 0 || q.kv_bytes == 0 {
            return Err("every quota must be at least 1".into());
        }
        Ok(())
    }
}

/// Whether a plugin's instances serve many requests or one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Isolation {
    /// Warm instances are reused across requests.
    #[default]
    Pooled,
    /// Each request gets a fresh instance, dropped afterwards.
    PerRequest,
}

/// Per-plugin resource limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// `memory_mb: 32`: linear memory per instance.
    #[serde(default = "default_memory_mb")]
    pub memory_mb: u32,
    /// `timeout_ms: 50`: CPU deadline for each call into the plugin.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// `max_body_bytes: 1048576`: the largest body buffered for a plugin that wants it.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_mb: default_memory_mb(),
            timeout_ms: default_timeout_ms(),
            max_body_bytes: default_max_body_bytes(),
        }
    }
}

fn default_memory_mb() -> u32 {
    32
}

fn default_timeout_ms() -> u64 {
    50
}

fn default_max_body_bytes() -> u64 {
    1 << 20
}

/// What happens to a request when a plugin traps, times out or hits a limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailurePolicy {
    /// Answer 500 with a JSON error.
    #[default]
    Closed,
    /// Skip the plugin and go on with the chain.
    Open,
}

/// Why one config object was refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ObjectError {
    /// What kind of object.
    pub kind: Kind,
    /// Its id or name (or its position, when it has none).
    pub id: String,
    /// What is wrong with it.
    pub reason: String,
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
            key: None,
        }
    }

    /// The same error, naming the store key it came from.
    pub fn at_key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }
}

/// A backend that registered itself under `services/<name>/<node-id>`, usually with a lease.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceNode {
    /// `host: 10.0.0.7`
    pub host: String,
    /// `port: 8080`
    pub port: u16,
    /// `weight: 1`: its share of the service's traffic.
    #[serde(default = "one")]
    pub weight: u32,
    /// `meta: {zone: a}`: free-form data, shown by the admin API.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub meta: BTreeMap<String, serde_json::Value>,
}

impl ServiceNode {
    /// Checks the address and weight.
    pub fn validate(&self) -> Result<(), String> {
        check_host(&self.host)?;
        if self.port == 0 {
            return Err("port 0 is not a port".into());
        }
        check_weight(self.weight)
    }
}

/// The largest node weight: shares beyond a million to one mean nothing.
pub const MAX_WEIGHT: u32 = 1_000_000;

fn check_weight(weight: u32) -> Result<(), String> {
    if weight > MAX_WEIGHT {
        return Err(format!("weight {weight} is over {MAX_WEIGHT}"));
    }
    Ok(())
}

/// The set of config objects that a store holds, keyed by id (or name, for plugins).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ConfigObjects {
    /// Routes by id.
    pub routes: BTreeMap<String, RouteConfig>,
    /// Upstreams by id.
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    /// Plugin entries by name.
    pub plugins: BTreeMap<String, PluginConfig>,
    /// Tenants by name.
    pub tenants: BTreeMap<String, TenantConfig>,
    /// Live service nodes: service name, then node id.
    pub services: BTreeMap<String, BTreeMap<String, ServiceNode>>,
    /// The `server` section, when the store has one (otherwise the defaults apply).
    pub server: Option<ServerConfig>,
}

/// The longest any configured timeout may be: one day.
pub const MAX_TIMEOUT_MS: u64 = 86_400_000;

/// How the gateway treats its clients: timeouts, limits and which proxies to believe. The
/// `server:` section of the file, or `/weir/server` in etcd. Limits apply to connections
/// accepted after a change; `trusted_proxies` to requests that arrive after it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// `header_timeout_ms: 10000`: to send a whole request head, from its first byte (or from
    /// the connection's start).
    #[serde(default = "default_header_timeout_ms")]
    pub header_timeout_ms: u64,
    /// `keepalive_timeout_ms: 60000`: how long a connection may sit idle between requests.
    #[serde(default = "default_stream_ms")]
    pub keepalive_timeout_ms: u64,
    /// `body_timeout_ms: 60000`: the longest a client may pause while sending a request body.
    #[serde(default = "default_stream_ms")]
    pub body_timeout_ms: u64,
    /// `send_timeout_ms: 60000`: the longest a client may leave a response unread.
    #[serde(default = "default_stream_ms")]
    pub send_timeout_ms: u64,
    /// `max_header_bytes: 32768`: the request line and headers together (431 beyond).
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// `max_headers: 100`: header lines in one request (431 beyond).
    #[serde(default = "default_max_headers")]
    pub max_headers: usize,
    /// `max_connections: 10000`: open client connections; more are closed as they arrive.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// `http2_max_streams: 100`: concurrent streams on one HTTP/2 connection.
    #[serde(default = "default_http2_max_streams")]
    pub http2_max_streams: u32,
    /// `trusted_proxies: [10.0.0.0/8]`: peers whose `X-Forwarded-*` headers are believed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_proxies: Vec<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            header_timeout_ms: default_header_timeout_ms(),
            keepalive_timeout_ms: default_stream_ms(),
            body_timeout_ms: default_stream_ms(),
            send_timeout_ms: default_stream_ms(),
            max_header_bytes: default_max_header_bytes(),
            max_headers: default_max_headers(),
            max_connections: default_max_connections(),
            http2_max_streams: default_http2_max_streams(),
            trusted_proxies: Vec::new(),
        }
    }
}

fn default_header_timeout_ms() -> u64 {
    10_000
}

fn default_max_header_bytes() -> usize {
    32 << 10
}

fn default_max_headers() -> usize {
    100
}

fn default_max_connections() -> usize {
    10_000
}

fn default_http2_max_streams() -> u32 {
    100
}

/// The smallest header block bound: hyper reads a head through a buffer at least this large.
pub const MIN_HEADER_BYTES: usize = 8 << 10;

impl ServerConfig {
    /// Checks every bound, and parses `trusted_proxies`.
    pub fn validate(&self) -> Result<Vec<ipnet::IpNet>, String> {
        for (name, ms) in [
            ("header_timeout_ms", self.header_timeout_ms),
            ("keepalive_timeout_ms", self.keepalive_timeout_ms),
            ("body_timeout_ms", self.body_timeout_ms),
            ("send_timeout_ms", self.send_timeout_ms),
        ] {
            if !(1..=MAX_TIMEOUT_MS).contains(&ms) {
                return Err(format!("{name} {ms} is not in 1..={MAX_TIMEOUT_MS}"));
            }
        }
        if !(MIN_HEADER_BYTES..=1 << 20).contains(&self.max_header_bytes) {
            return Err(format!(
                "max_header_bytes {} is not in {MIN_HEADER_BYTES}..=1048576",
                self.max_header_bytes
            ));
        }
        if !(1..=10_000).contains(&self.max_headers) {
            return Err(format!(
                "max_headers {} is not in 1..=10000",
                self.max_headers
            ));
        }
        if self.max_connections == 0 {
            return Err("max_connections must be at least 1".into());
        }
        if !(1..=10_000).contains(&self.http2_max_streams) {
            return Err(format!(
                "http2_max_streams {} is not in 1..=10000",
                self.http2_max_streams
            ));
        }
        self.trusted_proxies
            .iter()
            .map(|entry| {
                entry
                    .parse::<ipnet::IpNet>()
                    .or_else(|_| entry.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map(|net| net.trunc())
                    .map_err(|_| {
                        format!("trusted_proxies: {entry:?} is not an IP address or CIDR such as 10.0.0.0/8")
                    })
            })
            .collect()
    }
}

const METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

impl RouteConfig {
    /// Every path pattern of the route, `uri` first.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.uri.iter().chain(self.uris.iter()).map(String::as_str)
    }

    /// Checks what can be checked without the other objects.
    pub fn validate(&self) -> Result<(), String> {
        check_id(&self.id)?;
        if self.paths().next().is_none() {
            return Err("set `uri` or `uris`".into());
        }
        for path in self.paths() {
            check_path_pattern(path)?;
        }
        for method in &self.methods {
            if !METHODS.contains(&method.as_str()) {
                return Err(format!(
                    "method {method:?} is not one of {}",
                    METHODS.join(", ")
                ));
            }
        }
        for host in &self.hosts {
            let bare = host.strip_prefix("*.").unwrap_or(host);
            if bare.is_empty()
                || !bare
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            {
                return Err(format!("host {host:?} is not a host name"));
            }
        }
        match (&self.upstream_id, &self.service) {
            (Some(_), Some(_)) => return Err("set `upstream_id` or `service`, not both".into()),
            (None, None) => return Err("set `upstream_id` or `service`".into()),
            (None, Some(service)) if service.is_empty() => {
                return Err("`service` is empty".into());
            }
            _ => {}
        }
        if let Some(StripPrefix::Literal(prefix)) = &self.strip_prefix
            && (!prefix.starts_with('/') || prefix.len() < 2)
        {
            return Err(format!(
                "strip_prefix {prefix:?} must start with / and name a segment"
            ));
        }
        for plugin in &self.plugins {
            if plugin.name.is_empty() {
                return Err("a plugin in `plugins` has no name".into());
            }
        }
        Ok(())
    }
}

/// A path pattern is `/exact`, `/prefix/*` or `/a/{param}/b`, with no empty `{}`, written in
/// the normal form requests are matched in (no `//`, dot segments or needless escapes).
fn check_path_pattern(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("uri {path:?} must start with /"));
    }
    if !path.is_ascii() {
        return Err(format!(
            "uri {path:?}: write characters outside ASCII percent-encoded (é is %C3%A9)"
        ));
    }
    match crate::edge::normalise::normalise(path) {
        Ok(normal) if normal.raw_only.is_none() && normal.path == path => {}
        Ok(normal) if normal.raw_only.is_none() => {
            return Err(format!(
                "uri {path:?} never matches: requests are matched in normal form; write {:?}",
                normal.path
            ));
        }
        Ok(normal) => {
            return Err(format!(
                "uri {path:?}: {}",
                normal.raw_only.expect("checked above")
            ));
        }
        Err(error) => return Err(format!("uri {path:?}: {error}")),
    }
    if path.contains(['?', '#']) {
        return Err(format!("uri {path:?} must not hold a query or fragment"));
    }
    let body = path.strip_suffix("/*").unwrap_or(path);
    if body.contains('*') {
        return Err(format!(
            "uri {path:?}: `*` may only end a prefix, as in /api/*"
        ));
    }
    for segment in body.split('/') {
        let opens = segment.matches('{').count();
        let closes = segment.matches('}').count();
        if opens != closes || opens > 1 {
            return Err(format!("uri {path:?}: unbalanced or repeated {{param}}"));
        }
        if opens == 1 {
            let inner = segment
                .strip_prefix('{')
                .and_then(|s| s.strip_suffix('}'))
                .ok_or_else(|| format!("uri {path:?}: a {{param}} must fill its whole segment"))?;
            if inner.is_empty()
                || !inner
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_')
            {
                return Err(format!("uri {path:?}: bad parameter name {inner:?}"));
            }
        }
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

fn check_id(id: &str) -> Result<(), String> {
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

impl UpstreamConfig {
    /// Checks what can be checked without the other objects.
    pub fn validate(&self) -> Result<(), String> {
        check_id(&self.id)?;
        if self.nodes.is_empty() {
            return Err("`nodes` is empty: an upstream needs at least one node".into());
        }
        for node in &self.nodes {
            check_host(&node.host)?;
            if node.port == 0 {
                return Err(format!("node {}: port 0 is not a port", node.host));
            }
            check_weight(node.weight)?;
        }
        if self.nodes.iter().all(|n| n.weight == 0) {
            return Err("every node has weight 0".into());
        }
        match (self.balancer, &self.hash_on) {
            (BalancerKind::Chash, None) => {
                return Err("type chash needs `hash_on` (ip, uri or header:NAME)".into());
            }
            (BalancerKind::Roundrobin | BalancerKind::LeastConn, Some(_)) => {
                return Err("`hash_on` only applies to type chash".into());
            }
            _ => {}
        }
        let Timeouts {
            connect_ms,
            send_ms,
            read_ms,
            idle_ms,
        } = self.timeout;
        for (name, ms) in [
            ("connect_ms", connect_ms),
            ("send_ms", send_ms),
            ("read_ms", read_ms),
            ("idle_ms", idle_ms),
        ] {
            if !(1..=MAX_TIMEOUT_MS).contains(&ms) {
                return Err(format!(
                    "timeout.{name} {ms} is not in 1..={MAX_TIMEOUT_MS}"
                ));
            }
        }
        Ok(())
    }
}

impl PluginConfig {
    /// Checks what can be checked without loading the module.
    pub fn validate(&self) -> Result<(), String> {
        check_id(&self.name)?;
        match (&self.module, &self.sha256) {
            (Some(_), Some(_)) => return Err("set `module` or `sha256`, not both".into()),
            (None, None) => return Err("set `module` (a .wasm file) or `sha256`".into()),
            (None, Some(sha)) if !is_sha256_hex(sha) => {
                return Err(format!("sha256 {sha:?} is not 64 lower-case hex digits"));
            }
            _ => {}
        }
        let Limits {
            memory_mb,
            timeout_ms,
            max_body_bytes,
        } = self.limits;
        if !(1..=4096).contains(&memory_mb) {
            return Err(format!("limits.memory_mb {memory_mb} is not in 1..=4096"));
        }
        if !(1..=60_000).contains(&timeout_ms) {
            return Err(format!(
                "limits.timeout_ms {timeout_ms} is not in 1..=60000"
            ));
        }
        if max_body_bytes == 0 || max_body_bytes > 1 << 30 {
            return Err(format!(
                "limits.max_body_bytes {max_body_bytes} is not in 1..=1073741824"
            ));
        }
        if let Some(http) = &self.grants.http {
            for host in &http.hosts {
                if host.parse::<http::uri::Authority>().is_err() || host.contains('@') {
                    return Err(format!(
                        "grants.http.hosts: {host:?} is not host or host:port"
                    ));
                }
            }
            for method in &http.methods {
                if !METHODS.contains(&method.as_str()) {
                    return Err(format!("grants.http.methods: {method:?} is not a method"));
                }
            }
            if !(1..=60_000).contains(&http.timeout_ms) {
                return Err("grants.http.timeout_ms is not in 1..=60000".into());
            }
        }
        if let Some(tenant) = &self.tenant {
            check_id(tenant).map_err(|e| format!("tenant: {e}"))?;
        }
        if self.quarantine.traps > 0
            && (self.quarantine.window_ms == 0 || self.quarantine.backoff_ms == 0)
        {
            return Err("quarantine.window_ms and backoff_ms must be at least 1".into());
        }
        Ok(())
    }
}

/// Whether `text` is a lower-case hex sha256 digest.
pub fn is_sha256_hex(text: &str) -> bool {
    text.len() == 64
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(json: serde_json::Value) -> Result<RouteConfig, String> {
        let route: RouteConfig = serde_json::from_value(json).map_err(|e| e.to_string())?;
        route.validate().map(|_| route)
    }

    #[test]
    fn route_accepts_the_documented_forms() {
        let r = route(serde_json::json!({
            "id": "api", "uri": "/api/*", "methods": ["GET"], "hosts": ["*.example.com"],
            "upstream_id": "b", "strip_prefix": true,
            "plugins": [{"name": "key-auth", "config": {"keys": ["k"]}}]
        }))
        .unwrap();
        assert_eq!(r.strip_prefix, Some(StripPrefix::Route(true)));
        assert_eq!(r.plugins[0].config["keys"][0], "k");
        let r = route(serde_json::json!({
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
        ];
        for (json, expected) in cases {
            let err = route(json.clone()).unwrap_err();
            assert!(err.contains(expected), "{json}: {err}");
        }
    }

    #[test]
    fn upstream_rejects_empty_nodes_and_a_chash_without_key() {
        let up = |json| {
            serde_json::from_value::<UpstreamConfig>(json)
                .unwrap()
                .validate()
        };
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
        let p = |json| {
            serde_json::from_value::<PluginConfig>(json)
                .unwrap()
                .validate()
        };
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
