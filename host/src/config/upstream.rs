//! Upstreams: a set of nodes, and how to balance, time out and retry across them.

use serde::{Deserialize, Deserializer, Serialize};

use super::{
    Checks, ConfigObject, Kind, MAX_TIMEOUT_MS, check_host, check_id, check_timeout, checked_serde,
    one,
};

/// Hands `$then!` its own arguments followed by the fields that an upstream and a service's
/// settings share, each as `$(#[$attr])* $field: $type = $default,`, so that they are declared
/// and documented once. serde's `flatten` would share them as a struct, but it does not work
/// with `deny_unknown_fields`. Each `$default` is what serde fills in when the field is absent.
macro_rules! upstream_settings {
    ($then:ident! { $($args:tt)* }) => { $then! { $($args)*
        /// `type: roundrobin | chash | least_conn`
        #[serde(rename = "type", default)]
        balancer: BalancerKind = BalancerKind::default(),
        /// `hash_on: ip | uri | header:x-user-id`, for `type: chash`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        hash_on: Option<HashOn> = None,
        /// `scheme: http | https | grpc | grpcs`: grpc speaks HTTP/2 without TLS (h2c), grpcs
        /// HTTP/2 over TLS.
        #[serde(default)]
        scheme: Scheme = Scheme::default(),
        /// `tls: {ca: PEM, sni: api.internal, verify: true}`: for https and grpcs.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tls: Option<UpstreamTls> = None,
        /// `timeout: {connect_ms: 1000, read_ms: 15000}`
        #[serde(default)]
        timeout: Timeouts = Timeouts::default(),
        /// `retries: 2`: extra attempts after the first, each on another node while there is one.
        /// By default, one per other node.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retries: Option<u32> = None,
        /// `retry_on: [connect-failure, timeout, reset, 502, 503, 504]`: what sends a request to
        /// another node; by default `[connect-failure, timeout]`.
        #[serde(
            default = "default_retry_on",
            skip_serializing_if = "is_default_retry_on"
        )]
        retry_on: Vec<RetryOn> = default_retry_on(),
        /// `retry_methods: [GET, HEAD, OPTIONS, PUT, DELETE]` (the default): the methods that may
        /// go to another node after one took the request (a timeout, a reset or a status).
        #[serde(
            default = "default_retry_methods",
            skip_serializing_if = "is_default_retry_methods"
        )]
        retry_methods: Vec<String> = default_retry_methods(),
        /// `retry_budget: {percent: 20, min_per_second: 3}`: retries after a node took the request
        /// stay under this share of the upstream's requests over 10 s, so that they never multiply
        /// an overload.
        #[serde(default, skip_serializing_if = "RetryBudgetConfig::is_default")]
        retry_budget: RetryBudgetConfig = RetryBudgetConfig::default(),
        /// `max_connections: 100`: requests in flight to each node at once; more wait up to
        /// `timeout.queue_ms` for one to finish, then get 503. No limit by default.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_connections: Option<u32> = None,
        /// `checks: {passive: {..}}`: how the gateway tells that a node is unwell, and leaves it
        /// out of rotation for a while.
        #[serde(default, skip_serializing_if = "HealthChecks::is_empty")]
        checks: HealthChecks = HealthChecks::default(),
    }};
}
pub(super) use upstream_settings;

/// Declares a struct with its own fields first, then the shared ones of [`upstream_settings`]
/// (which hands them over), all public.
macro_rules! with_upstream_settings {
    (
        $(#[$meta:meta])*
        pub struct $name:ident { $($own:tt)* }
        $($(#[$attr:meta])* $field:ident: $type:ty = $default:expr,)*
    ) => {
        $(#[$meta])*
        pub struct $name {
            $($own)*
            $($(#[$attr])* pub $field: $type,)*
        }
    };
}
pub(super) use with_upstream_settings;

/// `$target { $own: $value, .. }` with each shared field of [`upstream_settings`] cloned from
/// `$source`, or, for `$target { .. } from defaults`, set to what serde fills in.
macro_rules! build_with_upstream_settings {
    (
        $target:ident { $($own:ident: $value:expr),* $(,)? } from defaults;
        $($(#[$attr:meta])* $field:ident: $type:ty = $default:expr,)*
    ) => {
        $target { $($own: $value,)* $($field: $default,)* }
    };
    (
        $target:ident { $($own:ident: $value:expr),* $(,)? } from $source:ident;
        $($(#[$attr:meta])* $field:ident: $type:ty = $default:expr,)*
    ) => {
        $target { $($own: $value,)* $($field: Clone::clone(&$source.$field),)* }
    };
}
pub(super) use build_with_upstream_settings;

upstream_settings! { with_upstream_settings! {
    /// An upstream: a set of nodes and how to balance, time out and retry across them.
    #[derive(Clone, Debug, PartialEq, Deserialize, Serialize, schemars::JsonSchema)]
    #[serde(remote = "Self", deny_unknown_fields)]
    pub struct UpstreamConfig {
        /// `id: backend`
        pub id: String,
        /// `nodes: [{host: 10.0.0.1, port: 8080, weight: 2}]`
        pub nodes: Vec<NodeConfig>,
    }
}}

/// One thing that sends a request to another node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RetryOn {
    /// `connect-failure`: no connection could be made; nothing reached the node.
    ConnectFailure,
    /// `timeout`: the node took the request and sent no response head within `read_ms`.
    Timeout,
    /// `reset`: the connection failed after the request was (partly) sent.
    Reset,
    /// `503`: the node answered this status.
    Status(u16),
}

impl RetryOn {
    /// Whether the request reached a node before this happened, so that sending it again
    /// depends on its method and on the budget.
    pub fn after_send(self) -> bool {
        !matches!(self, RetryOn::ConnectFailure)
    }
}

impl Serialize for RetryOn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            RetryOn::ConnectFailure => s.serialize_str("connect-failure"),
            RetryOn::Timeout => s.serialize_str("timeout"),
            RetryOn::Reset => s.serialize_str("reset"),
            RetryOn::Status(status) => s.serialize_u16(*status),
        }
    }
}

impl<'de> Deserialize<'de> for RetryOn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Spelled {
            Status(u64),
            Word(String),
        }
        let refused = |what: String| {
            serde::de::Error::custom(format!(
                "retry_on {what} is not one of connect-failure, timeout, reset or a status 400..=599"
            ))
        };
        match Spelled::deserialize(d)? {
            Spelled::Status(status) => match u16::try_from(status) {
                Ok(status @ 400..=599) => Ok(RetryOn::Status(status)),
                _ => Err(refused(status.to_string())),
            },
            Spelled::Word(word) => match word.as_str() {
                "connect-failure" => Ok(RetryOn::ConnectFailure),
                "timeout" => Ok(RetryOn::Timeout),
                "reset" => Ok(RetryOn::Reset),
                other => match other.parse::<u16>() {
                    Ok(status @ 400..=599) => Ok(RetryOn::Status(status)),
                    _ => Err(refused(format!("{other:?}"))),
                },
            },
        }
    }
}

impl schemars::JsonSchema for RetryOn {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "RetryOn".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "oneOf": [
                {"type": "string", "enum": ["connect-failure", "timeout", "reset"]},
                {"type": "integer", "minimum": 400, "maximum": 599}
            ],
            "description": "`connect-failure`, `timeout`, `reset`, or a status such as 503"
        })
    }
}

pub(super) fn default_retry_on() -> Vec<RetryOn> {
    vec![RetryOn::ConnectFailure, RetryOn::Timeout]
}

pub(super) fn is_default_retry_on(on: &Vec<RetryOn>) -> bool {
    *on == default_retry_on()
}

/// The methods retried after a node took the request by default: the idempotent ones.
const IDEMPOTENT_METHODS: [&str; 5] = ["GET", "HEAD", "OPTIONS", "PUT", "DELETE"];

pub(super) fn default_retry_methods() -> Vec<String> {
    IDEMPOTENT_METHODS.iter().map(|m| (*m).to_owned()).collect()
}

pub(super) fn is_default_retry_methods(methods: &Vec<String>) -> bool {
    *methods == default_retry_methods()
}

/// How many retries after a node took the request an upstream allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryBudgetConfig {
    /// `percent: 20`: retries as a share of requests over the last 10 s.
    #[serde(default = "default_budget_percent")]
    pub percent: u32,
    /// `min_per_second: 3`: retries allowed each second whatever the share, so that a quiet
    /// upstream can still retry.
    #[serde(default = "default_budget_min_per_second")]
    pub min_per_second: u32,
}

impl Default for RetryBudgetConfig {
    fn default() -> Self {
        RetryBudgetConfig {
            percent: default_budget_percent(),
            min_per_second: default_budget_min_per_second(),
        }
    }
}

impl RetryBudgetConfig {
    pub(super) fn is_default(&self) -> bool {
        *self == RetryBudgetConfig::default()
    }
}

fn default_budget_percent() -> u32 {
    20
}

fn default_budget_min_per_second() -> u32 {
    3
}

/// An upstream's health checks.
#[derive(
    Clone, Debug, Default, PartialEq, Eq, Hash, Deserialize, Serialize, schemars::JsonSchema,
)]
#[serde(deny_unknown_fields)]
pub struct HealthChecks {
    /// `active: {type: http, path: /healthz, interval_ms: 2000}`: probes each node on an
    /// interval, from one task per upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<ActiveCheck>,
    /// `passive: {unhealthy: {statuses: [502, 503, 504], failures: 5, timeouts: 3},
    /// eject_ms: 30000}`: judged on real traffic; a node that fails too often in a row is
    /// ejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passive: Option<PassiveCheck>,
}

impl HealthChecks {
    pub(super) fn is_empty(&self) -> bool {
        self.active.is_none() && self.passive.is_none()
    }
}

/// Probes of each node on an interval.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ActiveCheck {
    /// `type: http` (a GET of `path`, plain HTTP/1.1) or `tcp` (a connection is made).
    #[serde(rename = "type", default)]
    pub kind: ProbeKind,
    /// `path: /healthz`: what an http probe asks for.
    #[serde(default = "default_probe_path")]
    pub path: String,
    /// `interval_ms: 2000`: between one round of probes and the next.
    #[serde(default = "default_probe_interval_ms")]
    pub interval_ms: u64,
    /// `timeout_ms: 1000`: for one probe, connection included.
    #[serde(default = "default_probe_timeout_ms")]
    pub timeout_ms: u64,
    /// What brings an unhealthy node back.
    #[serde(default)]
    pub healthy: ActiveHealthy,
    /// What takes a healthy node out.
    #[serde(default)]
    pub unhealthy: ActiveUnhealthy,
}

/// How a node is probed.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize, Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum ProbeKind {
    /// A GET of `path`; healthy when the status is one of `healthy.statuses`.
    #[default]
    Http,
    /// A TCP connection; healthy when it is made.
    Tcp,
}

/// Probes in a row that bring an unhealthy node back.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ActiveHealthy {
    /// `successes: 2`: successful probes in a row.
    #[serde(default = "default_probe_successes")]
    pub successes: u32,
    /// `statuses: [200, 302]`: what an http probe must answer.
    #[serde(default = "default_probe_statuses")]
    pub statuses: Vec<u16>,
}

impl Default for ActiveHealthy {
    fn default() -> Self {
        ActiveHealthy {
            successes: default_probe_successes(),
            statuses: default_probe_statuses(),
        }
    }
}

/// Probes in a row that take a healthy node out.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ActiveUnhealthy {
    /// `failures: 3`: refused connections or other statuses, in a row.
    #[serde(default = "default_probe_failures")]
    pub failures: u32,
    /// `timeouts: 3`: probes that timed out, in a row.
    #[serde(default = "default_probe_failures")]
    pub timeouts: u32,
}

impl Default for ActiveUnhealthy {
    fn default() -> Self {
        ActiveUnhealthy {
            failures: default_probe_failures(),
            timeouts: default_probe_failures(),
        }
    }
}

fn default_probe_path() -> String {
    "/".into()
}

fn default_probe_interval_ms() -> u64 {
    2000
}

fn default_probe_timeout_ms() -> u64 {
    1000
}

fn default_probe_successes() -> u32 {
    2
}

fn default_probe_statuses() -> Vec<u16> {
    vec![200, 302]
}

fn default_probe_failures() -> u32 {
    3
}

/// Outlier ejection on real traffic.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PassiveCheck {
    /// What makes a node unhealthy, in a row.
    #[serde(default)]
    pub unhealthy: PassiveUnhealthy,
    /// `eject_ms: 30000`: how long an ejected node is left out; doubled each time it is
    /// ejected again (up to 10 minutes, or `eject_ms` if longer), reset by a success.
    #[serde(default = "default_eject_ms")]
    pub eject_ms: u64,
    /// `max_ejected_percent: 50`: never more of the upstream's nodes than this are out at once,
    /// so that an outage of every node is still tried rather than answered by the gateway.
    #[serde(default = "default_max_ejected_percent")]
    pub max_ejected_percent: u8,
}

/// The consecutive outcomes that eject a node.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PassiveUnhealthy {
    /// `statuses: [502, 503, 504]`: answers that count as failures.
    #[serde(default = "default_unhealthy_statuses")]
    pub statuses: Vec<u16>,
    /// `failures: 5`: failures in a row (a refused or reset connection, or a status above)
    /// that eject the node; 0 never does.
    #[serde(default = "default_unhealthy_failures")]
    pub failures: u32,
    /// `timeouts: 3`: timeouts in a row (connecting, or waiting for the answer) that eject it;
    /// 0 never does.
    #[serde(default = "default_unhealthy_timeouts")]
    pub timeouts: u32,
}

impl Default for PassiveUnhealthy {
    fn default() -> Self {
        PassiveUnhealthy {
            statuses: default_unhealthy_statuses(),
            failures: default_unhealthy_failures(),
            timeouts: default_unhealthy_timeouts(),
        }
    }
}

fn default_eject_ms() -> u64 {
    30_000
}

fn default_max_ejected_percent() -> u8 {
    50
}

fn default_unhealthy_statuses() -> Vec<u16> {
    vec![502, 503, 504]
}

fn default_unhealthy_failures() -> u32 {
    5
}

fn default_unhealthy_timeouts() -> u32 {
    3
}

/// A backend address.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// `host: 10.0.0.1` (an IP address or a DNS name)
    pub host: String,
    /// `port: 8080`
    pub port: u16,
    /// `weight: 2`: its share of traffic; 0 takes it out of rotation.
    #[serde(default = "one")]
    pub weight: u32,
    /// `status: offline` takes it out of rotation and keeps its weight for when it is back.
    #[serde(default, skip_serializing_if = "NodeStatus::is_online")]
    pub status: NodeStatus,
}

/// Whether a node takes traffic: the dashboard's switch per node.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize, Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum NodeStatus {
    /// It takes its share (the default).
    #[default]
    Online,
    /// It takes none.
    Offline,
}

impl NodeStatus {
    fn is_online(&self) -> bool {
        *self == NodeStatus::Online
    }
}

impl NodeConfig {
    /// Its share of traffic now: its weight while online, 0 while offline.
    pub fn effective_weight(&self) -> u32 {
        match self.status {
            NodeStatus::Online => self.weight,
            NodeStatus::Offline => 0,
        }
    }
}

/// How an upstream picks a node.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema,
)]
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
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize, Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Scheme {
    /// HTTP/1.1.
    #[default]
    Http,
    /// HTTP/2 without TLS (h2c), for gRPC.
    Grpc,
    /// HTTP/1.1 over TLS.
    Https,
    /// HTTP/2 over TLS, for gRPC.
    Grpcs,
}

impl Scheme {
    /// Whether connections speak HTTP/2.
    pub fn is_http2(self) -> bool {
        matches!(self, Scheme::Grpc | Scheme::Grpcs)
    }

    /// Whether connections are TLS.
    pub fn is_tls(self) -> bool {
        matches!(self, Scheme::Https | Scheme::Grpcs)
    }
}

/// How connections to an https or grpcs upstream are verified and identified.
#[derive(Clone, PartialEq, Eq, Hash, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    /// `ca: "-----BEGIN CERTIFICATE-----..."`: the PEM roots to trust instead of the system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
    /// `sni: api.internal`: the name to ask for and verify, instead of the node's host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    /// `verify: false` accepts any certificate; weir logs a warning when it loads one.
    #[serde(default = "super::yes")]
    pub verify: bool,
    /// `client_cert: PEM`: a chain to present (mutual TLS), with `client_key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert: Option<String>,
    /// `client_key: PEM`: the key of `client_cert`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key: Option<String>,
}

impl Default for UpstreamTls {
    fn default() -> Self {
        UpstreamTls {
            ca: None,
            sni: None,
            verify: true,
            client_cert: None,
            client_key: None,
        }
    }
}

impl UpstreamTls {
    /// These settings as the TLS client config takes them.
    pub fn client(&self) -> crate::tls::ClientTls<'_> {
        crate::tls::ClientTls {
            ca: self.ca.as_deref(),
            verify: self.verify,
            client_cert: self.client_cert.as_deref().zip(self.client_key.as_deref()),
        }
    }
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The client key never reaches a log line.
        f.debug_struct("UpstreamTls")
            .field("sni", &self.sni)
            .field("verify", &self.verify)
            .field("ca", &self.ca.is_some())
            .field("client_cert", &self.client_cert.is_some())
            .finish_non_exhaustive()
    }
}

/// Upstream timeouts; each bounds one thing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    /// `connect_ms: 1000`: one attempt to open a connection to one node.
    #[serde(default = "default_connect_ms")]
    pub connect_ms: u64,
    /// `send_ms: 60000`: the longest the node may leave the request's writes waiting.
    #[serde(default = "super::default_stream_ms")]
    pub send_ms: u64,
    /// `read_ms: 15000`: from the request's last byte to the response headers.
    #[serde(default = "default_read_ms")]
    pub read_ms: u64,
    /// `idle_ms: 60000`: the longest a body may stop moving, in either direction.
    #[serde(default = "super::default_stream_ms")]
    pub idle_ms: u64,
    /// `queue_ms: 1000`: the longest a request waits for a node under `max_connections`.
    #[serde(default = "default_queue_ms")]
    pub queue_ms: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect_ms: default_connect_ms(),
            send_ms: super::default_stream_ms(),
            read_ms: default_read_ms(),
            idle_ms: super::default_stream_ms(),
            queue_ms: default_queue_ms(),
        }
    }
}

fn default_queue_ms() -> u64 {
    1_000
}

fn default_connect_ms() -> u64 {
    2_000
}

fn default_read_ms() -> u64 {
    30_000
}

checked_serde!(UpstreamConfig);

/// The largest node weight: shares beyond a million to one mean nothing.
pub const MAX_WEIGHT: u32 = 1_000_000;

/// A node's weight, or why not.
pub(super) fn check_weight(weight: u32) -> Result<(), String> {
    if weight > MAX_WEIGHT {
        return Err(format!("weight {weight} is over {MAX_WEIGHT}"));
    }
    Ok(())
}

impl ConfigObject for UpstreamConfig {
    const KIND: Kind = Kind::Upstream;

    fn deserialize_unchecked<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        UpstreamConfig::deserialize(d)
    }

    fn id(&self) -> &str {
        &self.id
    }

    fn check(&self, checks: &mut Checks) {
        checks.check("/id", check_id(&self.id));
        if self.nodes.is_empty() {
            checks.fail(
                "/nodes",
                "`nodes` is empty: an upstream needs at least one node",
            );
        }
        for (index, node) in self.nodes.iter().enumerate() {
            checks.check(format!("/nodes/{index}/host"), check_host(&node.host));
            if node.port == 0 {
                checks.fail(
                    format!("/nodes/{index}/port"),
                    format!("node {}: port 0 is not a port", node.host),
                );
            }
            checks.check(format!("/nodes/{index}/weight"), check_weight(node.weight));
        }
        if !self.nodes.is_empty() && self.nodes.iter().all(|n| n.weight == 0) {
            checks.fail("/nodes", "every node has weight 0");
        }
        match (self.balancer, &self.hash_on) {
            (BalancerKind::Chash, None) => {
                checks.fail(
                    "/hash_on",
                    "type chash needs `hash_on` (ip, uri or header:NAME)",
                );
            }
            (BalancerKind::Roundrobin | BalancerKind::LeastConn, Some(_)) => {
                checks.fail("/hash_on", "`hash_on` only applies to type chash");
            }
            _ => {}
        }
        let Timeouts {
            connect_ms,
            send_ms,
            read_ms,
            idle_ms,
            queue_ms,
        } = self.timeout;
        for (name, ms) in [
            ("connect_ms", connect_ms),
            ("send_ms", send_ms),
            ("read_ms", read_ms),
            ("idle_ms", idle_ms),
            ("queue_ms", queue_ms),
        ] {
            checks.check(
                format!("/timeout/{name}"),
                check_timeout(&format!("timeout.{name}"), ms),
            );
        }
        let _ = MAX_TIMEOUT_MS;
        self.check_retries(checks);
        if let Some(active) = &self.checks.active {
            self.check_active(active, checks);
        }
        if let Some(passive) = &self.checks.passive {
            checks.check(
                "/checks/passive/eject_ms",
                check_timeout("checks.passive.eject_ms", passive.eject_ms),
            );
            if passive.max_ejected_percent > 100 {
                checks.fail(
                    "/checks/passive/max_ejected_percent",
                    "max_ejected_percent is a share of the nodes, 0 to 100",
                );
            }
            for (index, status) in passive.unhealthy.statuses.iter().enumerate() {
                if !(100..=599).contains(status) {
                    checks.fail(
                        format!("/checks/passive/unhealthy/statuses/{index}"),
                        format!("{status} is not an HTTP status"),
                    );
                }
            }
        }
        if self.tls.is_some() && !self.scheme.is_tls() {
            checks.fail("/tls", "`tls` applies to scheme https or grpcs");
        }
        if self.scheme.is_tls() {
            self.check_tls(checks);
        }
    }
}

impl UpstreamConfig {
    /// `retry_on`, `retry_methods`, `retry_budget` and `max_connections`.
    fn check_retries(&self, checks: &mut Checks) {
        for (index, method) in self.retry_methods.iter().enumerate() {
            let token = !method.is_empty()
                && method.len() <= 32
                && method.bytes().all(|b| b.is_ascii_uppercase() || b == b'-');
            if !token {
                checks.fail(
                    format!("/retry_methods/{index}"),
                    format!("{method:?} is not a method name in capitals, such as GET"),
                );
            }
        }
        if self.retry_budget.percent > 100 {
            checks.fail(
                "/retry_budget/percent",
                "percent is a share of requests, 0 to 100",
            );
        }
        if self.max_connections == Some(0) {
            checks.fail(
                "/max_connections",
                "max_connections 0 would refuse every request; leave it out for no limit",
            );
        }
    }

    /// `checks.active`: a probe that can be made, on an interval that does not flood the nodes.
    fn check_active(&self, active: &ActiveCheck, checks: &mut Checks) {
        if !(100..=MAX_TIMEOUT_MS).contains(&active.interval_ms) {
            checks.fail(
                "/checks/active/interval_ms",
                format!("checks.active.interval_ms is not in 100..={MAX_TIMEOUT_MS}"),
            );
        }
        checks.check(
            "/checks/active/timeout_ms",
            check_timeout("checks.active.timeout_ms", active.timeout_ms),
        );
        if active.kind == ProbeKind::Http {
            if self.scheme != Scheme::Http {
                checks.fail(
                    "/checks/active/type",
                    "http probes are plain HTTP/1.1; for this scheme use type: tcp",
                );
            }
            if !active.path.starts_with('/')
                || active.path.len() > 1024
                || active.path.bytes().any(|b| b <= b' ' || b == 0x7f)
            {
                checks.fail(
                    "/checks/active/path",
                    "path must start with / and hold no spaces or control characters",
                );
            }
        }
        for (index, status) in active.healthy.statuses.iter().enumerate() {
            if !(100..=599).contains(status) {
                checks.fail(
                    format!("/checks/active/healthy/statuses/{index}"),
                    format!("{status} is not an HTTP status"),
                );
            }
        }
        if active.healthy.successes == 0 {
            checks.fail(
                "/checks/active/healthy/successes",
                "successes must be at least 1",
            );
        }
    }

    /// The TLS settings of an https or grpcs upstream: they must build a client config, and
    /// each node must have a name to verify (its host, or `tls.sni`).
    fn check_tls(&self, checks: &mut Checks) {
        let tls = self.tls.clone().unwrap_or_default();
        if let Err(error) = crate::tls::client_config(tls.client(), crate::tls::ALPN_H2) {
            checks.fail("/tls", error.to_string());
        }
        if tls.client_cert.is_some() != tls.client_key.is_some() {
            checks.fail(
                "/tls",
                "set both `client_cert` and `client_key`, or neither",
            );
        }
        match &tls.sni {
            Some(sni) => checks.check(
                "/tls/sni",
                crate::tls::server_name(Some(sni), sni)
                    .map(drop)
                    .map_err(|e| e.to_string()),
            ),
            None => {
                for (index, node) in self.nodes.iter().enumerate() {
                    if crate::tls::server_name(None, &node.host).is_err() {
                        checks.fail(
                            format!("/nodes/{index}/host"),
                            format!(
                                "{:?} is not a name TLS can verify; set `tls.sni`",
                                node.host
                            ),
                        );
                    }
                }
            }
        }
    }
}

impl schemars::JsonSchema for HashOn {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "HashOn".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": "^(ip|uri|header:.+)$",
            "description": "`ip`, `uri`, or `header:NAME`"
        })
    }
}
