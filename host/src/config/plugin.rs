//! Plugin entries: a Wasm component, what it may import, its limits, and what happens when it
//! fails.

use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize};

use super::{Checks, ConfigObject, Kind, check_id, check_method, checked_serde, is_false};

/// A plugin entry: a Wasm component, its limits and what happens when it fails.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(remote = "Self", deny_unknown_fields)]
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
    /// `kv: {backend: redis}`: where the plugin's kv keeps its keys. `memory` (the default) is
    /// this gateway's own; `redis` is the server at `server.redis_url`, which every gateway
    /// naming it shares, so that a counter counts across gateways.
    #[serde(default, skip_serializing_if = "KvConfig::is_default")]
    pub kv: KvConfig,
    /// `signature: {sha256, public_key, signature}`: the module's signature, as `weir plugin
    /// sign` writes it. Needed when `server.trusted_keys` is set; in the file store a
    /// `<module>.sig` beside the module does as well.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<crate::plugin::signature::ModuleSignature>,
    /// `root_id: my_root`: for a proxy-wasm filter, what `plugin_root_id` answers (SDKs that
    /// register several root contexts pick theirs by it); the plugin's name when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_id: Option<String>,
    /// `vm_config: '{"a": 1}'`: for a proxy-wasm filter, the VM configuration it reads in
    /// `proxy_on_vm_start` (text, up to 64 KiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_config: Option<String>,
}

/// The host functions a plugin may import. Nothing but the request and response is granted
/// unless listed here.
#[derive(
    Clone, Debug, Default, PartialEq, Eq, Hash, Deserialize, Serialize, schemars::JsonSchema,
)]
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
    /// `consumers: [jwt-auth]`: look consumers up by these credential sections, and mark a
    /// request as made by a consumer. Credentials are secrets: grant only the sections the
    /// plugin checks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub consumers: Vec<String>,
    /// `routing: true`: send a request to another upstream than its route's (traffic-split).
    #[serde(default, skip_serializing_if = "is_false")]
    pub routing: bool,
    /// `tracing: true`: add attributes and events to the plugin's own span of a traced
    /// request.
    #[serde(default, skip_serializing_if = "is_false")]
    pub tracing: bool,
}

/// Where a plugin's outbound HTTP calls may go.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Deserialize, Serialize, schemars::JsonSchema)]
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
    /// `private: true`: a granted host name may resolve to a loopback, link-local, private or
    /// otherwise non-public address. Off by default, so that whoever controls a granted name's
    /// DNS cannot point it inside; a granted IP literal is always called.
    #[serde(default, skip_serializing_if = "is_false")]
    pub private: bool,
}

fn get_only() -> Vec<String> {
    vec!["GET".into()]
}

fn default_call_timeout_ms() -> u64 {
    1_000
}

/// A WASI interface family that a grant enables.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize, schemars::JsonSchema)]
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize, schemars::JsonSchema)]
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

/// Whether a plugin's instances serve many requests or one.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize, Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum Isolation {
    /// Warm instances are reused across requests.
    #[default]
    Pooled,
    /// Each request gets a fresh instance, dropped afterwards.
    PerRequest,
}

/// Per-plugin resource limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize, schemars::JsonSchema)]
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
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize, Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum FailurePolicy {
    /// Answer 500 with a JSON error.
    #[default]
    Closed,
    /// Skip the plugin and go on with the chain.
    Open,
}

/// Where a plugin entry's kv lives.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize, Serialize, schemars::JsonSchema,
)]
#[serde(deny_unknown_fields)]
pub struct KvConfig {
    /// `backend: memory` (the default) or `redis`.
    #[serde(default)]
    pub backend: KvBackend,
}

impl KvConfig {
    fn is_default(&self) -> bool {
        *self == KvConfig::default()
    }
}

/// The store behind a plugin's kv.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize, Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum KvBackend {
    /// This gateway's memory: fast, and lost on restart.
    #[default]
    Memory,
    /// The Redis server at `server.redis_url`, shared by every gateway that names it.
    Redis,
}

checked_serde!(PluginConfig);

impl std::hash::Hash for PluginConfig {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.name.hash(state);
        self.module.hash(state);
        self.sha256.hash(state);
        self.limits.hash(state);
        self.failure.hash(state);
        self.isolation.hash(state);
        self.grants.hash(state);
        self.tenant.hash(state);
        self.quarantine.hash(state);
        self.signature.hash(state);
        self.kv.hash(state);
        self.root_id.hash(state);
        self.vm_config.hash(state);
    }
}

impl ConfigObject for PluginConfig {
    const KIND: Kind = Kind::Plugin;

    fn deserialize_unchecked<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        PluginConfig::deserialize(d)
    }

    fn id(&self) -> &str {
        &self.name
    }

    fn check(&self, checks: &mut Checks) {
        checks.check("/name", check_id(&self.name));
        // Empty is a root id some SDKs register under (AssemblyScript's runtime does).
        if let Some(root_id) = self.root_id.as_deref().filter(|id| !id.is_empty()) {
            checks.check("/root_id", check_id(root_id));
        }
        if self.vm_config.as_ref().is_some_and(|c| c.len() > 64 << 10) {
            checks.fail("/vm_config", "vm_config is over 64 KiB");
        }
        match (&self.module, &self.sha256) {
            (Some(_), Some(_)) => checks.fail("", "set `module` or `sha256`, not both"),
            (None, None) => checks.fail("", "set `module` (a .wasm file) or `sha256`"),
            (None, Some(sha)) if !is_sha256_hex(sha) => checks.fail(
                "/sha256",
                format!("sha256 {sha:?} is not 64 lower-case hex digits"),
            ),
            _ => {}
        }
        let Limits {
            memory_mb,
            timeout_ms,
            max_body_bytes,
        } = self.limits;
        if !(1..=4096).contains(&memory_mb) {
            checks.fail(
                "/limits/memory_mb",
                format!("limits.memory_mb {memory_mb} is not in 1..=4096"),
            );
        }
        if !(1..=60_000).contains(&timeout_ms) {
            checks.fail(
                "/limits/timeout_ms",
                format!("limits.timeout_ms {timeout_ms} is not in 1..=60000"),
            );
        }
        if max_body_bytes == 0 || max_body_bytes > 1 << 30 {
            checks.fail(
                "/limits/max_body_bytes",
                format!("limits.max_body_bytes {max_body_bytes} is not in 1..=1073741824"),
            );
        }
        if self.kv.backend == KvBackend::Redis && !self.grants.kv {
            checks.fail(
                "/kv/backend",
                "kv: {backend: redis} is for a plugin with a kv; add grants: {kv: true}",
            );
        }
        for (index, section) in self.grants.consumers.iter().enumerate() {
            checks.check(
                format!("/grants/consumers/{index}"),
                super::check_id(section).map_err(|e| format!("grants.consumers: {e}")),
            );
        }
        if let Some(http) = &self.grants.http {
            for (index, host) in http.hosts.iter().enumerate() {
                if host.parse::<http::uri::Authority>().is_err() || host.contains('@') {
                    checks.fail(
                        format!("/grants/http/hosts/{index}"),
                        format!("grants.http.hosts: {host:?} is not host or host:port"),
                    );
                }
            }
            for (index, method) in http.methods.iter().enumerate() {
                if check_method(method).is_err() {
                    checks.fail(
                        format!("/grants/http/methods/{index}"),
                        format!("grants.http.methods: {method:?} is not a method"),
                    );
                }
            }
            if !(1..=60_000).contains(&http.timeout_ms) {
                checks.fail(
                    "/grants/http/timeout_ms",
                    "grants.http.timeout_ms is not in 1..=60000",
                );
            }
        }
        if let Some(tenant) = &self.tenant {
            checks.check(
                "/tenant",
                check_id(tenant).map_err(|e| format!("tenant: {e}")),
            );
        }
        if self.quarantine.traps > 0
            && (self.quarantine.window_ms == 0 || self.quarantine.backoff_ms == 0)
        {
            checks.fail(
                "/quarantine",
                "quarantine.window_ms and backoff_ms must be at least 1",
            );
        }
    }
}

/// Whether `text` is a lower-case hex sha256 digest.
pub fn is_sha256_hex(text: &str) -> bool {
    text.len() == 64
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}
