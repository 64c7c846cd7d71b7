//! What the admin listener reports: Prometheus metrics, health, and the config status.

use http::{HeaderValue, Response, StatusCode, header};

use crate::body::ProxyBody;
use crate::gateway::Gateway;

/// A response with `body` of `content_type`.
pub(super) fn text(body: String, content_type: &'static str) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::full(body));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// 200 while the store delivers changes; 503 while the gateway serves its last good snapshot,
/// or once it has started to drain.
pub(super) fn ready(gateway: &Gateway) -> Response<ProxyBody> {
    let health = gateway.health();
    let draining = gateway.draining();
    let mut body = serde_json::to_value(&*health).expect("health serializes");
    if draining {
        body["draining"] = serde_json::Value::Bool(true);
    }
    let mut response = text(
        serde_json::to_string_pretty(&body).expect("health serializes"),
        "application/json",
    );
    if !health.connected || draining {
        *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    }
    response
}

/// The state of each node of the upstreams (or services) that have health checks: whether its
/// probes find it healthy, how long it stays ejected, and why its last probe failed.
fn health_of(
    upstreams: &std::collections::BTreeMap<String, std::sync::Arc<crate::upstream::Upstream>>,
) -> serde_json::Value {
    let now = crate::upstream::balancer::now_ms();
    let checked = upstreams
        .iter()
        .filter(|(_, u)| u.config.checks.active.is_some() || u.config.checks.passive.is_some());
    serde_json::Value::Object(
        checked
            .map(|(id, upstream)| {
                let nodes = upstream.nodes.nodes().iter().map(|node| {
                    serde_json::json!({
                        "node": node.addr,
                        "healthy": node.is_up(),
                        "ejected_for_ms": node.ejected_for_ms(now),
                        "last_probe_error": node.last_probe_error(),
                    })
                });
                (id.clone(), serde_json::Value::Array(nodes.collect()))
            })
            .collect(),
    )
}

pub(super) fn status(gateway: &Gateway) -> Response<ProxyBody> {
    let snapshot = gateway.snapshot();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let body = serde_json::json!({
        "store": *gateway.health(),
        "generation": snapshot.generation,
        "routes": snapshot.route_list.keys().collect::<Vec<_>>(),
        "upstreams": snapshot.upstreams.keys().collect::<Vec<_>>(),
        "upstream_health": health_of(&snapshot.upstreams),
        "service_health": health_of(&snapshot.services),
        "services": snapshot.services.iter().map(|(name, service)| (name.clone(), service
            .nodes
            .nodes()
            .iter()
            .map(|n| n.addr.clone())
            .collect::<Vec<_>>())).collect::<std::collections::BTreeMap<_, _>>(),
        "plugins": snapshot.plugins.iter().map(|(name, p)| serde_json::json!({
            "name": name,
            "sha256": p.module.sha256,
            "kind": p.module.kind(),
            "world": p.module.world(),
            "signed_by": p.signed_by,
            "describes": p.module.info().map(|info| serde_json::json!({
                "name": info.name, "version": info.version,
            })),
        })).collect::<Vec<_>>(),
        "consumers": snapshot.consumers.len(),
        "tenants": gateway.runtime().tenants().all().iter().map(|tenant| {
            let (memory, instances, kv_entries, kv_bytes) = tenant.usage();
            serde_json::json!({
                "name": tenant.name(),
                "quotas": snapshot.tenants.get(tenant.name()).map(|t| t.quotas),
                "usage": {"memory_bytes": memory, "instances": instances, "kv_entries": kv_entries, "kv_bytes": kv_bytes},
            })
        }).collect::<Vec<_>>(),
        "certificates": snapshot.ssl.iter().map(|(id, cert)| serde_json::json!({
            "id": id,
            "snis": cert.config.snis,
            "default": cert.config.default,
            "not_after": cert.certified.not_after,
            "expires_in_seconds": cert.certified.not_after - now,
        })).collect::<Vec<_>>(),
        "quarantined": gateway.runtime().quarantined().iter().map(|(plugin, left)| serde_json::json!({
            "plugin": plugin,
            // Rounded up: 0 means the next call probes the plugin, not "in under 1 ms".
            "retry_in_ms": left.as_micros().div_ceil(1000) as u64,
        })).collect::<Vec<_>>(),
        "errors": snapshot.errors,
    });
    text(
        serde_json::to_string_pretty(&body).expect("status serializes"),
        "application/json",
    )
}

/// `/metrics`, in the OpenMetrics text format.
pub(super) fn metrics(gateway: &Gateway) -> Response<ProxyBody> {
    text(
        gateway.metrics().encode(),
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
    )
}
