//! Answers one admin request: the `Host` check first, then which part serves the path (the
//! open probes and `/metrics`, the `/v1` API, or the dashboard's files).

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;

use super::{Admin, api, origin, status, ui};
use crate::body::{ProxyBody, ResponseBody};
use crate::config::OPENABLE;
use crate::edge::Peer;

/// Answers one admin request from `peer`.
pub async fn handle(
    admin: Arc<Admin>,
    request: Request<Incoming>,
    peer: Peer,
) -> Response<ResponseBody> {
    let response = route(&admin, request, peer).await;
    response.map(ResponseBody::plain)
}

async fn route(admin: &Admin, request: Request<Incoming>, peer: Peer) -> Response<ProxyBody> {
    let path = request.uri().path().to_owned();
    let settings = admin.auth.settings(&admin.gateway.snapshot().admin);
    // A page on a name the attacker controls that resolves to this listener (DNS rebinding)
    // sends that name; everything else is answered only for the listener's own names.
    let authority = origin::authority(request.uri(), request.headers());
    if !origin::host_allowed(authority, admin.listener_ip, &settings.hosts) {
        return api::error(
            StatusCode::MISDIRECTED_REQUEST,
            "this admin listener does not serve that host: add it to admin.hosts",
        );
    }
    if OPENABLE.contains(&path.as_str()) {
        if request.method() != Method::GET && request.method() != Method::HEAD {
            return api::error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
        }
        if !settings.open.contains(&path)
            && let Err(refused) = admin
                .auth
                .authenticate(
                    &settings,
                    request.headers(),
                    false,
                    peer.tls,
                    admin.store.writer(),
                )
                .await
        {
            return api::refusal(refused);
        }
        return match path.as_str() {
            "/metrics" => status::metrics(&admin.gateway),
            "/healthz" => status::text("ok\n".into(), "text/plain"),
            _ => status::ready(&admin.gateway),
        };
    }
    if path == "/v1" || path.starts_with("/v1/") {
        return api::handle(admin, &settings, request, peer).await;
    }
    if path == "/" {
        let mut response = Response::new(ProxyBody::Empty);
        *response.status_mut() = StatusCode::FOUND;
        response
            .headers_mut()
            .insert(header::LOCATION, http::HeaderValue::from_static("/ui/"));
        return response;
    }
    if path == "/ui" || path.starts_with("/ui/") {
        return ui::serve(request.method(), &path);
    }
    api::error(StatusCode::NOT_FOUND, "no such admin endpoint")
}
