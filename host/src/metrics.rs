//! Prometheus metrics: the registry the admin listener serves, and per-route handles.

use std::sync::OnceLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of `weir_http_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The route id, or `none` when no route matched.
    pub route: String,
    /// `2xx`, `3xx`, `4xx` or `5xx`.
    pub class: &'static str,
}

/// Labels of `weir_consumer_http_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConsumerRequestLabels {
    /// The route id.
    pub route: String,
    /// The consumer an auth plugin found.
    pub consumer: String,
    /// `2xx`, `3xx`, `4xx` or `5xx` (1xx counts as `1xx`).
    pub class: &'static str,
}

/// The class label of a status: `1xx` to `5xx`.
fn status_class(status: u16) -> &'static str {
    ["1xx", "2xx", "3xx", "4xx", "5xx"][usize::from((status / 100).clamp(1, 5)) - 1]
}

/// Labels of the per-route latency histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// The route id.
    pub route: String,
}

/// Labels of `weir_ai_tokens_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AiTokenLabels {
    /// The route id.
    pub route: String,
    /// The provider's API, as the plugin names it (`openai`, `anthropic`).
    pub provider: String,
    /// The model asked for.
    pub model: String,
    /// The request's consumer, or empty.
    pub consumer: String,
    /// `prompt` or `completion`.
    pub kind: &'static str,
}

/// Labels of `weir_ai_first_token_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AiModelLabels {
    /// The route id.
    pub route: String,
    /// The provider's API.
    pub provider: String,
    /// The model asked for.
    pub model: String,
}

/// Labels of the per-plugin call metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginLabels {
    /// The plugin name.
    pub plugin: String,
    /// The route it ran on.
    pub route: String,
    /// The plugin's tenant.
    pub tenant: String,
}

/// Labels of `weir_plugin_failures_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginFailureLabels {
    /// The plugin name.
    pub plugin: String,
    /// The route it ran on.
    pub route: String,
    /// The plugin's tenant.
    pub tenant: String,
    /// `trap`, `timeout`, `memory`, `limit`, `quota`, `instantiate`, `kv_unavailable`,
    /// `not_granted`, `context_lost` or `quarantined`.
    pub kind: &'static str,
}

/// Labels of `weir_plugin_quarantines_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QuarantineLabels {
    /// The plugin name.
    pub plugin: String,
    /// The plugin's tenant.
    pub tenant: String,
}

/// Labels of `weir_kv_unavailable_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KvUnavailableLabels {
    /// The plugin name.
    pub plugin: String,
    /// The plugin's tenant.
    pub tenant: String,
    /// The backend that could not be reached: `redis`.
    pub backend: &'static str,
}

/// Labels of `weir_plugin_events_total`, the counters plugins add to.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginEventLabels {
    /// The plugin name.
    pub plugin: String,
    /// The name the plugin gave.
    pub name: String,
}

/// Labels of `weir_config_reloads_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `applied` or `failed`.
    pub outcome: &'static str,
}

/// Labels of `weir_upstream_failures_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamFailureLabels {
    /// The upstream (or service) id.
    pub upstream: String,
    /// `connect`, `connect_timeout`, `send_timeout`, `read_timeout`, `idle_timeout` or `failed`.
    pub kind: &'static str,
}

/// Labels of the per-node upstream metrics (`weir_upstream_ejections_total`,
/// `weir_upstream_node_healthy`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabels {
    /// The upstream id.
    pub upstream: String,
    /// The node, `host:port`.
    pub node: String,
}

/// Labels of `weir_upstream_fail_open_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    /// The upstream id.
    pub upstream: String,
}

/// Labels of `weir_upstream_retries_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    /// The upstream id.
    pub upstream: String,
    /// What sent the request to another node: connect_failure, timeout, reset or status.
    pub on: &'static str,
}

/// Labels of the per-listener connection metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    /// `proxy` or `admin`.
    pub listener: &'static str,
}

/// Labels of `weir_connections_accepted_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AcceptLabels {
    /// `proxy`, `proxy_tls` or `admin`.
    pub listener: &'static str,
    /// The worker that accepted: 1 to N, or 0 when the gateway runs without workers.
    pub worker: usize,
}

/// Labels of `weir_tls_cert_expiry_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertLabels {
    /// The `ssl` object's id.
    pub id: String,
}

/// Labels of `weir_tls_handshake_failures_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeFailureLabels {
    /// `timeout`, or `error` (no certificate for the name, a protocol the client cannot
    /// speak, a reset).
    pub kind: &'static str,
}

/// Labels of `weir_client_timeouts_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClientTimeoutLabels {
    /// `header`, `keepalive`, `body` or `send`.
    pub phase: &'static str,
}

/// Labels of `weir_client_errors_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClientErrorLabels {
    /// `header_too_large` (431), `bad_request` (400 from the edge), `protocol` (a malformed
    /// HTTP/1 message or an HTTP/2 protocol error, such as a reset flood).
    pub kind: &'static str,
}

type HistogramFamily<S> = Family<S, Histogram, fn() -> Histogram>;

fn plugin_histogram() -> Histogram {
    // 1 µs to ~65 ms.
    Histogram::new(exponential_buckets(0.000001, 2.0, 17))
}

/// Buckets for values a filter records, whose unit Weir does not know: powers of 4 up to 4^15.
fn value_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 4.0, 16))
}

fn latency_histogram() -> Histogram {
    // 100 µs to ~13 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

/// Every metric the gateway exports.
pub struct Metrics {
    registry: Registry,
    /// Requests by route and status class.
    pub requests: Family<RequestLabels, Counter>,
    /// Requests by route, consumer and status class, where `server.metrics_per_consumer` says.
    pub consumer_requests: Family<ConsumerRequestLabels, Counter>,
    /// Request latency by route, in seconds.
    pub latency: HistogramFamily<RouteLabels>,
    /// Plugin calls by plugin, route and tenant.
    pub plugin_calls: Family<PluginLabels, Counter>,
    /// Plugin call latency by plugin, route and tenant, in seconds.
    pub plugin_latency: HistogramFamily<PluginLabels>,
    /// Plugin failures by plugin, route, tenant and kind.
    pub plugin_failures: Family<PluginFailureLabels, Counter>,
    /// Times a plugin was quarantined.
    pub quarantines: Family<QuarantineLabels, Counter>,
    /// Counters that plugins add to.
    pub plugin_events: Family<PluginEventLabels, Counter>,
    /// Gauges that proxy-wasm filters set.
    pub plugin_gauges: Family<PluginEventLabels, Gauge>,
    /// Histograms that proxy-wasm filters record into.
    pub plugin_histograms: HistogramFamily<PluginEventLabels>,
    /// Plugin kv calls that failed because the kv's backend could not be reached.
    pub kv_unavailable: Family<KvUnavailableLabels, Counter>,
    /// Config reloads by outcome.
    pub reloads: Family<ReloadLabels, Counter>,
    /// Config objects currently rejected.
    pub config_errors: Gauge,
    /// Routes currently loaded.
    pub routes: Gauge,
    /// Full re-reads of the store after its history was compacted.
    pub store_resyncs: Counter,
    /// Modules loaded, by where they came from: memory, disk (precompiled) or compiled.
    pub module_loads: Family<ModuleLoadLabels, Counter>,
    /// Failed attempts to reach an upstream's nodes, by kind.
    pub upstream_failures: Family<UpstreamFailureLabels, Counter>,
    /// Nodes ejected by passive health checks, by upstream and node.
    pub upstream_ejections: Family<NodeLabels, Counter>,
    /// Tokens AI plugins report a model used, by route, provider, model, consumer and kind.
    pub ai_tokens: Family<AiTokenLabels, Counter>,
    /// Seconds from a request's arrival to the first token of a streamed answer.
    pub ai_first_token: HistogramFamily<AiModelLabels>,
    /// 1 while active probes find a node healthy, 0 while they do not.
    pub upstream_node_healthy: Family<NodeLabels, Gauge>,
    /// Picks made among ejected nodes because every candidate was ejected, by upstream.
    pub upstream_fail_open: Family<UpstreamLabels, Counter>,
    /// Requests sent again to another node, by upstream and why.
    pub upstream_retries: Family<RetryLabels, Counter>,
    /// Retries the retry budget refused, by upstream.
    pub upstream_retry_budget_exhausted: Family<UpstreamLabels, Counter>,
    /// Requests that found every node at `max_connections` for `queue_ms`, by upstream.
    pub upstream_queue_full: Family<UpstreamLabels, Counter>,
    /// Client connections open now, by listener.
    pub connections_open: Family<ListenerLabels, Gauge>,
    /// Idle HTTP/1 client connections parked now (holding no HTTP state), by listener.
    pub connections_parked: Family<ListenerLabels, Gauge>,
    /// Client connections closed at accept because `server.max_connections` were open.
    pub connections_refused: Family<ListenerLabels, Counter>,
    /// Client connections accepted, by listener and worker (how evenly the kernel spreads them).
    pub connections_accepted: Family<AcceptLabels, Counter>,
    /// Client connections and requests ended by a client-side timeout, by phase.
    pub client_timeouts: Family<ClientTimeoutLabels, Counter>,
    /// Requests refused for their shape before routing, by kind.
    pub client_errors: Family<ClientErrorLabels, Counter>,
    /// When each served certificate expires, as seconds since the epoch.
    pub cert_expiry: Family<CertLabels, Gauge>,
    /// TLS handshakes that failed, by kind.
    pub handshake_failures: Family<HandshakeFailureLabels, Counter>,
    /// Requests that matched no route (or were refused before routing), as `route="none"`.
    pub unrouted: RouteMetrics,
    /// Dashboard password checks running now.
    pub admin_password_checks_in_flight: Gauge,
    /// Dashboard password checks done.
    pub admin_password_checks: Counter,
    /// Spans left out of the export: the collector was slow or down, or a request had more
    /// than its bound.
    pub tracing_spans_dropped: Counter,
    /// Spans the collector accepted.
    pub tracing_spans_exported: Counter,
}

/// Labels of `weir_module_loads_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModuleLoadLabels {
    /// `memory`, `disk` or `compiled`.
    pub source: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The counter of `family` for `upstream`.
fn per_upstream(family: &Family<UpstreamLabels, Counter>, upstream: &str) -> Counter {
    family.get_or_create_owned(&UpstreamLabels {
        upstream: upstream.to_owned(),
    })
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("weir");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "Requests by route and status class",
            requests.clone(),
        );
        let consumer_requests = Family::<ConsumerRequestLabels, Counter>::default();
        registry.register(
            "consumer_http_requests",
            "Requests by route, consumer and status class (with server.metrics_per_consumer)",
            consumer_requests.clone(),
        );
        let latency: HistogramFamily<RouteLabels> = Family::new_with_constructor(latency_histogram);
        registry.register(
            "http_request_duration_seconds",
            "Time from a request's arrival until its response was sent in full (or the client went away)",
            latency.clone(),
        );
        let plugin_calls = Family::<PluginLabels, Counter>::default();
        registry.register("plugin_calls", "Calls into plugins", plugin_calls.clone());
        let plugin_latency: HistogramFamily<PluginLabels> =
            Family::new_with_constructor(plugin_histogram);
        registry.register(
            "plugin_call_duration_seconds",
            "Time spent in one call into a plugin",
            plugin_latency.clone(),
        );
        let plugin_failures = Family::<PluginFailureLabels, Counter>::default();
        registry.register(
            "plugin_failures",
            "Plugin calls that trapped, timed out, hit a limit or quota, or were skipped in quarantine",
            plugin_failures.clone(),
        );
        let quarantines = Family::<QuarantineLabels, Counter>::default();
        registry.register(
            "plugin_quarantines",
            "Times a plugin was quarantined",
            quarantines.clone(),
        );
        let kv_unavailable = Family::<KvUnavailableLabels, Counter>::default();
        registry.register(
            "kv_unavailable",
            "Plugin kv calls that failed because the kv's backend (Redis) could not be reached",
            kv_unavailable.clone(),
        );
        let plugin_events = Family::<PluginEventLabels, Counter>::default();
        registry.register(
            "plugin_events",
            "Counters that plugins add to",
            plugin_events.clone(),
        );
        let plugin_gauges = Family::<PluginEventLabels, Gauge>::default();
        registry.register(
            "plugin_gauges",
            "Gauges that proxy-wasm filters set",
            plugin_gauges.clone(),
        );
        let plugin_histograms: HistogramFamily<PluginEventLabels> =
            Family::new_with_constructor(value_histogram);
        registry.register(
            "plugin_values",
            "Values that proxy-wasm filters record",
            plugin_histograms.clone(),
        );
        let reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "config_reloads",
            "Config snapshots built, by outcome",
            reloads.clone(),
        );
        let config_errors = Gauge::default();
        registry.register(
            "config_errors",
            "Config objects currently rejected",
            config_errors.clone(),
        );
        let routes = Gauge::default();
        registry.register("routes", "Routes currently loaded", routes.clone());
        let store_resyncs = Counter::default();
        let module_loads = Family::<ModuleLoadLabels, Counter>::default();
        registry.register(
            "module_loads",
            "Plugin modules loaded, by where they came from: memory, disk (precompiled) or compiled",
            module_loads.clone(),
        );
        registry.register(
            "store_resyncs",
            "Full re-reads of the config store after a compaction",
            store_resyncs.clone(),
        );
        let ai_tokens = Family::<AiTokenLabels, Counter>::default();
        registry.register(
            "ai_tokens",
            "Tokens AI plugins report a model used, by kind (prompt or completion)",
            ai_tokens.clone(),
        );
        let ai_first_token: HistogramFamily<AiModelLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "ai_first_token_seconds",
            "Seconds from a request's arrival to the first token of a streamed answer",
            ai_first_token.clone(),
        );
        let upstream_ejections = Family::<NodeLabels, Counter>::default();
        registry.register(
            "upstream_ejections",
            "Nodes ejected by passive health checks",
            upstream_ejections.clone(),
        );
        let upstream_node_healthy = Family::<NodeLabels, Gauge>::default();
        registry.register(
            "upstream_node_healthy",
            "1 while active health checks find a node healthy, 0 while they do not",
            upstream_node_healthy.clone(),
        );
        let upstream_fail_open = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "upstream_fail_open",
            "Requests sent to an ejected node because every candidate node was ejected",
            upstream_fail_open.clone(),
        );
        let upstream_retries = Family::<RetryLabels, Counter>::default();
        registry.register(
            "upstream_retries",
            "Requests sent again to another node, by why",
            upstream_retries.clone(),
        );
        let upstream_retry_budget_exhausted = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "upstream_retry_budget_exhausted",
            "Retries not made because the upstream's retry budget was spent",
            upstream_retry_budget_exhausted.clone(),
        );
        let upstream_queue_full = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "upstream_queue_full",
            "Requests answered 503 after waiting queue_ms for a node under max_connections",
            upstream_queue_full.clone(),
        );
        let upstream_failures = Family::<UpstreamFailureLabels, Counter>::default();
        registry.register(
            "upstream_failures",
            "Failed attempts to reach an upstream node, by kind",
            upstream_failures.clone(),
        );
        let connections_open = Family::<ListenerLabels, Gauge>::default();
        registry.register(
            "connections_open",
            "Client connections open now",
            connections_open.clone(),
        );
        let connections_parked = Family::<ListenerLabels, Gauge>::default();
        registry.register(
            "connections_parked",
            "Idle HTTP/1 client connections parked now, holding no HTTP buffers",
            connections_parked.clone(),
        );
        let connections_refused = Family::<ListenerLabels, Counter>::default();
        registry.register(
            "connections_refused",
            "Client connections closed at accept because server.max_connections were open",
            connections_refused.clone(),
        );
        let connections_accepted = Family::<AcceptLabels, Counter>::default();
        registry.register(
            "connections_accepted",
            "Client connections accepted, by listener and worker",
            connections_accepted.clone(),
        );
        let client_timeouts = Family::<ClientTimeoutLabels, Counter>::default();
        registry.register(
            "client_timeouts",
            "Client connections or requests ended by a timeout, by phase (header, keepalive, body, send)",
            client_timeouts.clone(),
        );
        let client_errors = Family::<ClientErrorLabels, Counter>::default();
        registry.register(
            "client_errors",
            "Requests refused for their shape before routing (header_too_large, bad_request, protocol)",
            client_errors.clone(),
        );
        let cert_expiry = Family::<CertLabels, Gauge>::default();
        registry.register(
            "tls_cert_expiry_seconds",
            "When each served certificate expires, as seconds since the epoch",
            cert_expiry.clone(),
        );
        let handshake_failures = Family::<HandshakeFailureLabels, Counter>::default();
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes on the proxy listener that failed, by kind (timeout, error)",
            handshake_failures.clone(),
        );
        let admin_password_checks_in_flight = Gauge::default();
        registry.register(
            "admin_password_checks_in_flight",
            "Dashboard login password checks running now (on the blocking pool)",
            admin_password_checks_in_flight.clone(),
        );
        let admin_password_checks = Counter::default();
        registry.register(
            "admin_password_checks",
            "Dashboard login password checks done, for known and unknown usernames alike",
            admin_password_checks.clone(),
        );
        let tracing_spans_dropped = Counter::default();
        registry.register(
            "tracing_spans_dropped",
            "Spans left out of the export because the collector was slow or down, or a request had too many",
            tracing_spans_dropped.clone(),
        );
        let tracing_spans_exported = Counter::default();
        registry.register(
            "tracing_spans_exported",
            "Spans the collector accepted",
            tracing_spans_exported.clone(),
        );
        let unrouted = RouteMetrics {
            route: "none".to_owned(),
            requests: requests.clone(),
            latency: latency.clone(),
            handles: OnceLock::new(),
        };
        Metrics {
            registry,
            requests,
            consumer_requests,
            latency,
            plugin_calls,
            plugin_latency,
            plugin_failures,
            quarantines,
            plugin_events,
            plugin_gauges,
            plugin_histograms,
            kv_unavailable,
            reloads,
            config_errors,
            routes,
            store_resyncs,
            module_loads,
            upstream_failures,
            upstream_ejections,
            ai_tokens,
            ai_first_token,
            upstream_node_healthy,
            upstream_fail_open,
            upstream_retries,
            upstream_retry_budget_exhausted,
            upstream_queue_full,
            connections_open,
            connections_parked,
            connections_refused,
            connections_accepted,
            client_timeouts,
            client_errors,
            cert_expiry,
            handshake_failures,
            unrouted,
            admin_password_checks_in_flight,
            admin_password_checks,
            tracing_spans_dropped,
            tracing_spans_exported,
        }
    }

    /// The counter of `upstream`'s retries for `on`.
    pub fn upstream_retries(&self, upstream: &str, on: &'static str) -> Counter {
        self.upstream_retries.get_or_create_owned(&RetryLabels {
            upstream: upstream.to_owned(),
            on,
        })
    }

    /// The counter of `upstream`'s retries refused by its budget.
    pub fn upstream_retry_budget_exhausted(&self, upstream: &str) -> Counter {
        per_upstream(&self.upstream_retry_budget_exhausted, upstream)
    }

    /// The counter of `upstream`'s requests that waited out `queue_ms`.
    pub fn upstream_queue_full(&self, upstream: &str) -> Counter {
        per_upstream(&self.upstream_queue_full, upstream)
    }

    /// The counter of `node`'s ejections from `upstream`.
    pub fn upstream_ejections(&self, upstream: &str, node: &str) -> Counter {
        self.upstream_ejections.get_or_create_owned(&NodeLabels {
            upstream: upstream.to_owned(),
            node: node.to_owned(),
        })
    }

    /// The gauge of whether `node` of `upstream` is healthy by its probes.
    pub fn upstream_node_healthy(&self, upstream: &str, node: &str) -> Gauge {
        self.upstream_node_healthy.get_or_create_owned(&NodeLabels {
            upstream: upstream.to_owned(),
            node: node.to_owned(),
        })
    }

    /// The counter of `upstream`'s picks made among ejected nodes.
    pub fn upstream_fail_open(&self, upstream: &str) -> Counter {
        per_upstream(&self.upstream_fail_open, upstream)
    }

    /// The counter of `upstream`'s failed attempts of `kind`.
    pub fn upstream_failures(&self, upstream: &str, kind: &'static str) -> Counter {
        self.upstream_failures
            .get_or_create_owned(&UpstreamFailureLabels {
                upstream: upstream.to_owned(),
                kind,
            })
    }

    /// The counter of client timeouts in `phase`.
    pub fn client_timeout(&self, phase: &'static str) -> Counter {
        self.client_timeouts
            .get_or_create_owned(&ClientTimeoutLabels { phase })
    }

    /// The counter of requests refused before routing for `kind`.
    pub fn client_error(&self, kind: &'static str) -> Counter {
        self.client_errors
            .get_or_create_owned(&ClientErrorLabels { kind })
    }

    /// The metrics in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// The counter of modules loaded from `source`.
    pub fn module_loads(&self, source: &'static str) -> Counter {
        self.module_loads
            .get_or_create_owned(&ModuleLoadLabels { source })
    }

    /// The counter of `plugin`'s quarantines.
    pub fn plugin_quarantines(&self, plugin: &str, tenant: &str) -> Counter {
        self.quarantines.get_or_create_owned(&QuarantineLabels {
            plugin: plugin.to_owned(),
            tenant: tenant.to_owned(),
        })
    }

    /// Counts a request on `route` by `consumer` that ended with `status`.
    pub fn consumer_request(&self, route: &str, consumer: &str, status: u16) {
        self.consumer_requests
            .get_or_create(&ConsumerRequestLabels {
                route: route.to_owned(),
                consumer: consumer.to_owned(),
                class: status_class(status),
            })
            .inc();
    }

    /// The counter of `plugin`'s kv calls that found its `backend` unreachable.
    pub fn kv_unavailable(&self, plugin: &str, tenant: &str, backend: &'static str) -> Counter {
        self.kv_unavailable
            .get_or_create_owned(&KvUnavailableLabels {
                plugin: plugin.to_owned(),
                tenant: tenant.to_owned(),
                backend,
            })
    }

    /// Handles for one plugin on one route, registered at the plugin's first call on it.
    pub fn plugin(&self, plugin: &str, route: &str, tenant: &str) -> PluginMetrics {
        PluginMetrics {
            labels: PluginLabels {
                plugin: plugin.to_owned(),
                route: route.to_owned(),
                tenant: tenant.to_owned(),
            },
            calls: self.plugin_calls.clone(),
            latency: self.plugin_latency.clone(),
            failures: self.plugin_failures.clone(),
            handles: OnceLock::new(),
        }
    }

    /// Handles for one route, registered at its first request.
    pub fn route(&self, route: &str) -> RouteMetrics {
        RouteMetrics {
            route: route.to_owned(),
            requests: self.requests.clone(),
            latency: self.latency.clone(),
            handles: OnceLock::new(),
        }
    }
}

/// One route's request counters and latency histogram. Its series are registered at the
/// route's first request, not when it is built: a route that serves nothing costs no series,
/// and loading 100,000 routes does not hash 600,000 label sets.
#[derive(Clone, Debug)]
pub struct RouteMetrics {
    route: String,
    requests: Family<RequestLabels, Counter>,
    latency: HistogramFamily<RouteLabels>,
    handles: OnceLock<RouteHandles>,
}

#[derive(Clone, Debug)]
struct RouteHandles {
    by_class: [Counter; 5],
    latency: Histogram,
}

impl RouteMetrics {
    /// Counts a finished request.
    pub fn record(&self, status: u16, seconds: f64) {
        let handles = self.handles.get_or_init(|| {
            let class = |class| {
                self.requests.get_or_create_owned(&RequestLabels {
                    route: self.route.clone(),
                    class,
                })
            };
            RouteHandles {
                by_class: [
                    class("1xx"),
                    class("2xx"),
                    class("3xx"),
                    class("4xx"),
                    class("5xx"),
                ],
                latency: self.latency.get_or_create_owned(&RouteLabels {
                    route: self.route.clone(),
                }),
            }
        });
        let class = usize::from((status / 100).clamp(1, 5)) - 1;
        handles.by_class[class].inc();
        handles.latency.observe(seconds);
    }
}

/// One plugin's call metrics on one route, registered at its first call there.
#[derive(Clone, Debug)]
pub struct PluginMetrics {
    labels: PluginLabels,
    calls: Family<PluginLabels, Counter>,
    latency: HistogramFamily<PluginLabels>,
    failures: Family<PluginFailureLabels, Counter>,
    handles: OnceLock<(Counter, Histogram)>,
}

impl PluginMetrics {
    /// Counts a call that took `elapsed`, and its failure if it failed.
    pub fn record(&self, elapsed: std::time::Duration, failure: Option<&'static str>) {
        let (calls, latency) = self.handles.get_or_init(|| {
            (
                self.calls.get_or_create_owned(&self.labels),
                self.latency.get_or_create_owned(&self.labels),
            )
        });
        calls.inc();
        latency.observe(elapsed.as_secs_f64());
        if let Some(kind) = failure {
            let labels = PluginFailureLabels {
                plugin: self.labels.plugin.clone(),
                route: self.labels.route.clone(),
                tenant: self.labels.tenant.clone(),
                kind,
            };
            self.failures.get_or_create(&labels).inc();
        }
    }
}
