//! The `server` section: how the gateway treats its clients.

use serde::{Deserialize, Deserializer, Serialize};

use super::{Checks, ConfigObject, Kind, check_timeout, checked_serde};
use crate::plugin::signature::{TrustedKey, public_key_bytes};

/// How the gateway treats its clients: timeouts, limits and which proxies to believe. The
/// `server:` section of the file, or `/weir/server` in etcd. Limits apply to connections
/// accepted after a change; `trusted_proxies` to requests that arrive after it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct ServerConfig {
    /// `header_timeout_ms: 10000`: to send a whole request head, from its first byte (or from
    /// the connection's start).
    #[serde(default = "default_header_timeout_ms")]
    pub header_timeout_ms: u64,
    /// `keepalive_timeout_ms: 60000`: how long a connection may sit idle between requests.
    #[serde(default = "super::default_stream_ms")]
    pub keepalive_timeout_ms: u64,
    /// `body_timeout_ms: 60000`: the longest a client may pause while sending a request body.
    #[serde(default = "super::default_stream_ms")]
    pub body_timeout_ms: u64,
    /// `send_timeout_ms: 60000`: the longest a client may leave a response unread.
    #[serde(default = "super::default_stream_ms")]
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
    pub trusted_proxies: Vec<TrustedProxy>,
    /// `tls_listen: 0.0.0.0:9443`: where the TLS listener binds, when `--tls-listen` is not
    /// given. Read at start; a change takes effect at the next restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub tls_listen: Option<std::net::SocketAddr>,
    /// `tls_handshake_timeout_ms: 10000`: for a client to finish its TLS handshake.
    #[serde(default = "default_header_timeout_ms")]
    pub tls_handshake_timeout_ms: u64,
    /// `trusted_keys: [{name: ci, public_key: "-----BEGIN PUBLIC KEY-----..."}]`: when set,
    /// only modules signed by one of these Ed25519 keys load (`weir plugin sign`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_keys: Vec<TrustedKey>,
    /// `redis_url: redis://10.0.0.7:6379/0`: the Redis server behind plugin entries that say
    /// `kv: {backend: redis}`. A password goes in the URL (`redis://:secret@host:6379`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_url: Option<String>,
    /// `redis_timeout_ms: 500`: to connect to Redis, and for each of its answers. Past it the
    /// kv call fails, and the plugin's `failure` policy answers.
    #[serde(default = "default_redis_timeout_ms")]
    pub redis_timeout_ms: u64,
    /// `metrics_per_consumer: true`: also count requests by the consumer an auth plugin found,
    /// in `weir_consumer_http_requests_total{route, consumer, class}`. That is a series per
    /// consumer and route, so it is off by default.
    #[serde(default, skip_serializing_if = "super::is_false")]
    pub metrics_per_consumer: bool,
    /// `tracing: {sample_ratio: 0.1}`: W3C trace context on every request (`traceparent` read
    /// or started, sent upstream, and its trace id in the access log and the gateway's errors).
    /// Off when absent: a client's `traceparent` then passes through untouched.
    #[serde(default)]
    pub tracing: Option<TracingConfig>,
}

/// `server.tracing`: how requests join traces, and where their spans go.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TracingConfig {
    /// `sample_ratio: 1.0`: the share of new traces sampled, and of traces a client began that
    /// the gateway does not take the client's word for, decided by the trace id.
    #[serde(default = "one")]
    pub sample_ratio: f64,
    /// `respect_client_sampling: false`: follow the `sampled` flag of any client's
    /// `traceparent`, not only of a peer in `trusted_proxies`. Off, so that a client cannot
    /// have every one of its requests traced.
    #[serde(default)]
    pub respect_client_sampling: bool,
    /// `endpoint: http://collector:4317`: where sampled requests' spans are sent over OTLP.
    /// Without one, trace context is passed on but no span is recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// `protocol: grpc`: OTLP over gRPC (`grpc`, usually port 4317) or HTTP with protobuf
    /// bodies (`http`, usually port 4318, to the endpoint's `/v1/traces`).
    #[serde(default)]
    pub protocol: OtlpProtocol,
    /// `service_name: weir`: the `service.name` the spans are reported under.
    #[serde(default = "default_service_name")]
    pub service_name: String,
    /// `headers: {x-honeycomb-team: ...}`: sent with every export, such as a vendor's key.
    /// Secret: the admin API never shows their values.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub headers: std::collections::BTreeMap<String, String>,
}

/// How spans travel to the collector.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum OtlpProtocol {
    /// OTLP/gRPC.
    #[default]
    Grpc,
    /// OTLP/HTTP with protobuf bodies.
    Http,
}

/// The most headers `server.tracing.headers` may name.
const MAX_TRACING_HEADERS: usize = 16;

impl TracingConfig {
    /// Adds a failure to `checks` for each field out of bounds.
    fn check(&self, checks: &mut Checks) {
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            checks.fail(
                "/tracing/sample_ratio",
                format!("sample_ratio {} is not in 0..=1", self.sample_ratio),
            );
        }
        if let Some(endpoint) = &self.endpoint {
            let parsed = endpoint.parse::<http::Uri>();
            let usable = parsed.as_ref().is_ok_and(|uri| {
                matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some()
            });
            if !usable || endpoint.len() > 2048 {
                checks.fail(
                    "/tracing/endpoint",
                    "endpoint must be an http:// or https:// URL with a host",
                );
            }
            if self.protocol == OtlpProtocol::Http
                && parsed
                    .as_ref()
                    .is_ok_and(|uri| uri.scheme_str() == Some("https"))
            {
                checks.fail(
                    "/tracing/endpoint",
                    "protocol http sends to http:// endpoints only; use protocol grpc for TLS",
                );
            }
        }
        let name_fits = |name: &str| {
            !name.is_empty() && name.len() <= 128 && name.bytes().all(|b| b.is_ascii_graphic())
        };
        if !name_fits(&self.service_name) {
            checks.fail(
                "/tracing/service_name",
                "service_name must be 1 to 128 printable bytes",
            );
        }
        if self.headers.len() > MAX_TRACING_HEADERS {
            checks.fail(
                "/tracing/headers",
                format!("at most {MAX_TRACING_HEADERS} headers"),
            );
        }
        for (name, value) in &self.headers {
            let lower = name.to_ascii_lowercase();
            let valid = http::HeaderName::from_bytes(lower.as_bytes()).is_ok()
                && http::HeaderValue::from_str(value).is_ok()
                && value.len() <= 4096;
            if !valid {
                // The name only: the value is a secret.
                let mut shown = name.clone();
                shown.truncate(64);
                checks.fail(
                    "/tracing/headers",
                    format!("header {shown:?} is not a valid header name and value"),
                );
            }
        }
    }
}

// `check` refuses a NaN ratio, the one value that is not equal to itself.
impl Eq for TracingConfig {}

impl Default for TracingConfig {
    fn default() -> Self {
        TracingConfig {
            sample_ratio: one(),
            respect_client_sampling: false,
            endpoint: None,
            protocol: OtlpProtocol::Grpc,
            service_name: default_service_name(),
            headers: std::collections::BTreeMap::new(),
        }
    }
}

fn default_service_name() -> String {
    "weir".to_owned()
}

fn one() -> f64 {
    1.0
}

/// A network whose `X-Forwarded-*` headers are believed: `10.0.0.0/8`, or one address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrustedProxy(pub ipnet::IpNet);

impl Serialize for TrustedProxy {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for TrustedProxy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse::<ipnet::IpNet>()
            .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
            .map(|net| TrustedProxy(net.trunc()))
            .map_err(|_| {
                serde::de::Error::custom(format!(
                    "trusted_proxies: {text:?} is not an IP address or CIDR such as 10.0.0.0/8"
                ))
            })
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            header_timeout_ms: default_header_timeout_ms(),
            keepalive_timeout_ms: super::default_stream_ms(),
            body_timeout_ms: super::default_stream_ms(),
            send_timeout_ms: super::default_stream_ms(),
            max_header_bytes: default_max_header_bytes(),
            max_headers: default_max_headers(),
            max_connections: default_max_connections(),
            http2_max_streams: default_http2_max_streams(),
            trusted_proxies: Vec::new(),
            tls_listen: None,
            tls_handshake_timeout_ms: default_header_timeout_ms(),
            trusted_keys: Vec::new(),
            redis_url: None,
            redis_timeout_ms: default_redis_timeout_ms(),
            metrics_per_consumer: false,
            tracing: None,
        }
    }
}

fn default_header_timeout_ms() -> u64 {
    10_000
}

fn default_redis_timeout_ms() -> u64 {
    500
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

checked_serde!(ServerConfig);

impl ConfigObject for ServerConfig {
    const KIND: Kind = Kind::Server;

    fn deserialize_unchecked<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        ServerConfig::deserialize(d)
    }

    fn id(&self) -> &str {
        "server"
    }

    fn check(&self, checks: &mut Checks) {
        for (name, ms) in [
            ("header_timeout_ms", self.header_timeout_ms),
            ("keepalive_timeout_ms", self.keepalive_timeout_ms),
            ("body_timeout_ms", self.body_timeout_ms),
            ("send_timeout_ms", self.send_timeout_ms),
            ("tls_handshake_timeout_ms", self.tls_handshake_timeout_ms),
            ("redis_timeout_ms", self.redis_timeout_ms),
        ] {
            checks.check(format!("/{name}"), check_timeout(name, ms));
        }
        if !(MIN_HEADER_BYTES..=1 << 20).contains(&self.max_header_bytes) {
            checks.fail(
                "/max_header_bytes",
                format!(
                    "max_header_bytes {} is not in {MIN_HEADER_BYTES}..=1048576",
                    self.max_header_bytes
                ),
            );
        }
        if !(1..=10_000).contains(&self.max_headers) {
            checks.fail(
                "/max_headers",
                format!("max_headers {} is not in 1..=10000", self.max_headers),
            );
        }
        let mut names = std::collections::BTreeSet::new();
        for (index, key) in self.trusted_keys.iter().enumerate() {
            if key.name.is_empty() || key.name.len() > 64 || !names.insert(&key.name) {
                checks.fail(
                    format!("/trusted_keys/{index}/name"),
                    "a trusted key's name is 1 to 64 bytes and unique",
                );
            }
            if let Err(error) = public_key_bytes(&key.public_key) {
                checks.fail(
                    format!("/trusted_keys/{index}/public_key"),
                    error.to_string(),
                );
            }
        }
        if let Some(url) = &self.redis_url
            && let Err(error) = crate::kv::RedisStore::check_url(url)
        {
            checks.fail("/redis_url", error);
        }
        if self.max_connections == 0 {
            checks.fail("/max_connections", "max_connections must be at least 1");
        }
        if let Some(tracing) = &self.tracing {
            tracing.check(checks);
        }
        if !(1..=10_000).contains(&self.http2_max_streams) {
            checks.fail(
                "/http2_max_streams",
                format!(
                    "http2_max_streams {} is not in 1..=10000",
                    self.http2_max_streams
                ),
            );
        }
    }
}

impl schemars::JsonSchema for TrustedProxy {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "TrustedProxy".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "a network (`10.0.0.0/8`) or one address"
        })
    }
}
