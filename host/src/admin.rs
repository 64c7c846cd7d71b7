//! The admin listener: Prometheus metrics, health, and the config status.

use std::sync::Arc;

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;

use crate::body::ProxyBody;
use crate::error::json_error;
use crate::gateway::Gateway;
use crate::proxy::ResponseBody;

/// Answers one admin request.
pub async fn handle(gateway: Arc<Gateway>, request: Request<Incoming>) -> Response<ResponseBody> {
    let response = match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => text(
            gateway.metrics().encode(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        (&Method::GET, "/healthz") => text("ok\n".into(), "text/plain"),
        (&Method::GET, "/v1/status") => status(&gateway),
        (&Method::GET, "/readyz") => ready(&gateway),
        (_, "/metrics" | "/healthz" | "/readyz" | "/v1/status") => {
            json_error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed", "")
        }
        (_, path) => json_error(
            StatusCode::NOT_FOUND,
            &format!("no admin endpoint {path}"),
            "",
        ),
    };
    response.map(ResponseBody::plain)
}

fn text(body: String, content_type: &'static str) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::full(body));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// 200 while the store delivers changes; 503 while the gateway serves its last good snapshot,
/// or once it has started to drain.
fn ready(gateway: &Gateway) -> Response<ProxyBody> {
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

fn status(gateway: &Gateway) -> Response<ProxyBody> {
    let snapshot = gateway.snapshot();
    let body = serde_json::json!({
        "store": *gateway.health(),
        "generation": snapshot.generation,
        "routes": snapshot.route_list.keys().collect::<Vec<_>>(),
        "upstreams": snapshot.upstreams.keys().collect::<Vec<_>>(),
        "services": snapshot.services.iter().map(|(name, service)| (name.clone(), service
            .nodes
            .nodes()
            .iter()
            .map(|n| n.addr.clone())
            .collect::<Vec<_>>())).collect::<std::collections::BTreeMap<_, _>>(),
        "plugins": snapshot.plugins.iter().map(|(name, p)| serde_json::json!({
            "name": name,
            "sha256": p.module.sha256,
        })).collect::<Vec<_>>(),
        "tenants": gateway.runtime().tenants().all().iter().map(|tenant| {
            let (memory, instances, kv_entries, kv_bytes) = tenant.usage();
            serde_json::json!({
                "name": tenant.name(),
                "quotas": snapshot.tenants.get(tenant.name()).map(|t| t.quotas),
                "usage": {"memory_bytes": memory, "instances": instances, "kv_entries": kv_entries, "kv_bytes": kv_bytes},
            })
        }).collect::<Vec<_>>(),
        "quarantined": gateway.runtime().quarantined().iter().map(|(plugin, left)| serde_json::json!({
            "plugin": plugin,
            "retry_in_ms": left.as_millis() as u64,
        })).collect::<Vec<_>>(),
        "errors": snapshot.errors,
    });
    text(
        serde_json::to_string_pretty(&body).expect("status serializes"),
        "application/json",
    )
}
