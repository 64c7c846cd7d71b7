//! The request path, one function per phase, in the order they run:
//!
//! 1. [`arrive`]: the edge puts the path in normal form, drops hop-by-hop headers and names
//!    the client; nothing after it sees the raw forms;
//! 2. [`route`]: the current snapshot's route for the request, and the request as plugins
//!    see it;
//! 3. [`request_phase`]: each plugin's `on-request`, in the route's order (after
//!    [`read_request_body`] when a plugin reads the body);
//! 4. [`upstream_phase`]: picks the upstream and a node, and forwards, trying other nodes
//!    when nothing was sent (or when an idempotent request that can go again was not
//!    answered); a request a plugin gave targets goes to them in turn;
//! 5. [`response_phase`]: `on-response` in reverse order, over the plugins that had their
//!    turn in `on-request`, for every answer: the upstream's, a plugin's reply, or an error;
//!    the body then streams through the filters' body callbacks and the chunk hooks;
//! 6. [`Finish`]: applies the response headers plugins queued in `on-request`, and once the
//!    response body is done (or the client went away) writes the access log, records
//!    metrics and runs [`log_phase`]; for an upgrade the upstream accepted (WebSocket),
//!    `Finish::splice` answers 101 and finishes when the spliced connection ends.
//!
//! One error path: an error before a route is found is answered at once (no plugin has a
//! turn); from routing on, an error becomes the answer that the response phase runs over, and
//! every request that reached a route gets its `on-log`.
//!
//! A route can also translate: `grpc_web` turns a browser's gRPC-Web into gRPC on the way in
//! and back in `Finish::respond`. `weir plugin test` (authoring.rs) runs these same phase
//! functions.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;

use crate::access_log::{AccessRecord, now_rfc3339};
use crate::body::filtered::{Arrived, ChunkLink, FilteredBody, arrived};
use crate::body::{CollectError, ProxyBody, ResponseBody, Stalled, collect_bounded};
use crate::config::{FailurePolicy, PathNormalization};
use crate::edge::trace::TraceContext;
use crate::edge::trailers::RequestTrailers;
use crate::edge::{self, Peer, strip_hop_by_hop};
use crate::error::{GatewayError, grpc_error, is_grpc};
use crate::gateway::Gateway;
use crate::grpc_web;
use crate::plugin::{Action, Bound, PluginError, Reply, StreamType, Summary};
use crate::snapshot::{ChainLink, Route, Snapshot, Target};
use crate::spans::export::SpanSink;
use crate::spans::{CallNotes, Kind, RequestSpans, SpanRecord};
use crate::timeouts::IdleBody;
use crate::upgrade::{self, Spliced};
use crate::upstream::balancer::InFlight;
use crate::upstream::{self, ClientBody, Outbound, OutboundBody, UpstreamBody, UpstreamError};
use crate::view::{BufferedBody, Fallback, Origin, RequestView, ResponseEdit, ResponseView};

/// The header a request id is read from when the client sends one.
const REQUEST_ID_HEADER: &str = "x-request-id";
/// The metadata a gRPC error gives its trace id in, under `server.tracing`.
const TRACE_ID_HEADER: HeaderName = HeaderName::from_static("x-trace-id");
/// The header that tells the upstream which consumer an auth plugin found; a client's own
/// copy is dropped on arrival, so the upstream can trust it.
const CONSUMER_HEADER: HeaderName = HeaderName::from_static("x-consumer-username");

/// Handles one request from arrival to the response head; the body streams afterwards.
pub async fn handle(
    gateway: Arc<Gateway>,
    request: Request<Incoming>,
    peer: Peer,
) -> Response<ResponseBody<Finish>> {
    let snapshot = gateway.snapshot();
    let (mut parts, body) = request.into_parts();
    let mut finish = Finish::new(gateway, &parts, peer);
    // Read before the edge drops `Connection` and `Upgrade` as hop-by-hop.
    let upgrade = upgrade::requested(&parts.method, parts.version, &parts.headers);
    // A clone shares the URI's bytes; the arrival borrows it while `parts` moves on.
    let uri = parts.uri.clone();
    let arrival = match arrive(&snapshot, &mut finish, &uri, &mut parts.headers, peer) {
        Ok(arrival) => arrival,
        Err(error) => return finish.fail(error),
    };
    let routed = match route(&snapshot, &mut finish, parts, arrival, body, upgrade) {
        Ok(routed) => routed,
        Err(error) => return finish.fail(error),
    };
    let Routed {
        route,
        mut request,
        body,
        service,
        upgrade,
    } = routed;

    let (answer, entered, kept) = match read_request_body(&route, &mut request, body).await {
        Err(error) => (Err(error), 0, Some(request)),
        Ok(rest) => {
            let (mut request, entered, decided) = request_phase(
                &route.chain,
                request,
                &mut finish.plugin_time,
                &mut finish.bound,
                finish.spans.as_deref_mut(),
            )
            .await;
            finish.after_request_phase(&snapshot, &mut request);
            match decided {
                Ok(Decision::Reply(reply)) => (
                    Ok(reply_response(reply, finish.grpc)),
                    entered,
                    Some(request),
                ),
                Ok(Decision::Forward) => {
                    let mut kept = route.keeps_request.then(|| read_only_copy(&request));
                    // Boxed: the exchange's future is most of a request's, and hyper copies
                    // the request's future whole when it starts it.
                    let phase = upstream_phase(
                        &snapshot,
                        &route,
                        &mut finish,
                        request,
                        rest,
                        service,
                        upgrade,
                    );
                    let answer = Box::pin(phase).await;
                    if let Some(kept) = &mut kept {
                        kept.answered_by = finish.answered_by;
                    }
                    (answer, entered, kept)
                }
                Err(error) => (Err(error), entered, Some(request)),
            }
        }
    };
    let response = answer.unwrap_or_else(|error| finish.answer_error(error));
    let links = &route.chain[..entered.min(route.chain.len())];
    let (kept, answered) = response_phase(
        links,
        route.response_body_limit,
        kept,
        response,
        &mut finish.plugin_time,
        &mut finish.bound,
        finish.spans.as_deref_mut(),
    )
    .await;
    finish.kept_request = kept;
    match answered {
        Ok(response) => match finish.switched.take() {
            Some(switch) => finish.splice(response, switch),
            None => finish.respond(response),
        },
        Err(error) => finish.fail(error),
    }
}

/// Phase 1: the edge's decisions, before anything else sees the request.
fn arrive<'a>(
    snapshot: &Snapshot,
    finish: &mut Finish,
    uri: &'a Uri,
    headers: &mut HeaderMap,
    peer: Peer,
) -> Result<edge::Arrival<'a>, GatewayError> {
    let arrival = edge::arrive(&snapshot.server, uri, headers, peer)?;
    finish.client_ip = arrival.client_ip;
    finish.trace = arrival.trace;
    if let Some(trace) = arrival.trace.filter(|trace| trace.sampled)
        && let Some(sink) = finish.gateway.span_sink()
    {
        let arrived = SystemTime::now() - finish.started.elapsed();
        finish.spans = Some(Box::new(RequestSpans::new(trace, arrived)));
        finish.span_sink = Some(sink);
    }
    headers.remove(CONSUMER_HEADER);
    if let Cow::Owned(normal) = &arrival.path {
        finish.normal_path = Some(normal.clone());
    }
    Ok(arrival)
}

/// A request with its route.
struct Routed {
    route: Arc<Route>,
    request: Box<RequestView>,
    body: ClientBody,
    /// The service named by the path, for a route to any service.
    service: Option<String>,
    /// The protocol asked for and the client's side of the connection, when the route lets
    /// the request upgrade.
    upgrade: Option<(HeaderValue, hyper::upgrade::OnUpgrade)>,
}

/// Phase 2: the route for the request, and the request as plugins see it.
fn route(
    snapshot: &Snapshot,
    finish: &mut Finish,
    mut parts: Parts,
    arrival: edge::Arrival<'_>,
    body: Incoming,
    upgrade: Option<HeaderValue>,
) -> Result<Routed, GatewayError> {
    let host = edge::request_host(&parts.uri, &parts.headers);
    let routing_host = host.unwrap_or_default().to_owned();
    let Some(matched) = snapshot.routes.lookup(&parts.method, host, &arrival.path) else {
        return Err(GatewayError::NoRoute {
            method: finish.method.to_string(),
            path: arrival.path.into_owned(),
        });
    };
    let route = matched.route.clone();
    finish.route = Some(route.clone());
    if route.binds_instances {
        finish.bound = route.chain.iter().map(|_| Bound::default()).collect();
    }
    // Translated only where the route says so; elsewhere gRPC-Web goes upstream as it came.
    finish.grpc_web &= route.config.grpc_web;
    if finish.grpc_web {
        grpc_web::request_to_grpc(&mut parts.headers);
    }
    // Only a route that allows it upgrades; elsewhere the request goes on as plain HTTP.
    let upgrade = upgrade
        .filter(|_| route.config.websocket)
        .and_then(|protocol| {
            let client = parts.extensions.remove::<hyper::upgrade::OnUpgrade>()?;
            Some((protocol, client))
        });
    let routed_path = match route.config.path_normalization {
        PathNormalization::On => {
            if let Some(unsafe_form) = arrival.raw_only {
                return Err(GatewayError::BadRequest(unsafe_form.to_string()));
            }
            &*arrival.path
        }
        PathNormalization::Off => parts.uri.path(),
    };
    let (path, service) = match &route.target {
        Target::AnyService => split_service(routed_path),
        _ => (route.upstream_path(routed_path, matched.prefix), None),
    };
    let body_timeout = Duration::from_millis(snapshot.server.config.body_timeout_ms);
    // Trailers arrive after the edge and the plugins have read the head: they are held to the
    // route's list as they pass, buffered or streaming.
    let body = RequestTrailers::new(body, route.request_trailers.clone());
    let body = IdleBody::new(body, body_timeout, Stalled::Client);
    // Boxed once: the view travels through every phase and into each plugin call.
    let request = Box::new(RequestView {
        method: parts.method,
        path,
        query: parts.uri.query().map(str::to_owned),
        headers: parts.headers,
        id: std::mem::take(&mut finish.request_id),
        route_id: route.id.clone(),
        client_ip: arrival.client_ip,
        body: BufferedBody::Streaming,
        vars: HashMap::new(),
        writable: true,
        body_access: false,
        body_limit: 0,
        consumer: None,
        upstream: None,
        targets: Vec::new(),
        answered_by: None,
        response_edits: Vec::new(),
        directory: snapshot.directory.clone(),
        trace: finish.trace,
        notes: None,
        origin: Origin {
            scheme: if arrival.peer.tls { "https" } else { "http" },
            host: routing_host,
            version: parts.version,
            peer: Some(arrival.peer.addr),
            local: arrival.peer.local,
            received: std::time::SystemTime::now(),
        },
    });
    Ok(Routed {
        route,
        request,
        body,
        service,
        upgrade,
    })
}

/// What is left of the client's body for the upstream once plugins had their turn.
enum BodyRest {
    /// The client's stream, untouched.
    Streaming(ClientBody),
    /// The body was buffered into the request view; these trailers came after it.
    Buffered(Option<HeaderMap>),
}

/// Before phase 3, when a plugin of the route reads the request body: buffers it, up to the
/// smallest bound among them.
async fn read_request_body(
    route: &Route,
    request: &mut RequestView,
    body: ClientBody,
) -> Result<BodyRest, GatewayError> {
    let Some(limit) = route.request_body_limit else {
        return Ok(BodyRest::Streaming(body));
    };
    match collect_bounded(body, limit).await {
        Ok((bytes, trailers)) => {
            request.body = BufferedBody::Buffered(bytes);
            Ok(BodyRest::Buffered(trailers))
        }
        Err(CollectError::TooLarge(limit)) => Err(GatewayError::RequestTooLarge(limit)),
        Err(CollectError::Read(e)) if e.stalled().is_some() => {
            Err(GatewayError::RequestBodyTimeout(e.to_string()))
        }
        Err(CollectError::Read(e)) => Err(GatewayError::RequestBody(e.to_string())),
    }
}

/// What the request phase decided.
pub enum Decision {
    /// Send the request upstream.
    Forward,
    /// A plugin answered with this.
    Reply(Reply),
}

/// Phase 3: runs `on-request` over `chain` in order, until a plugin answers or fails closed.
/// Also says how many links had their turn: those whose `on-response` runs over the answer.
pub async fn request_phase(
    chain: &[ChainLink],
    mut request: Box<RequestView>,
    plugin_time: &mut Duration,
    bound: &mut [Bound],
    mut spans: Option<&mut RequestSpans>,
) -> (Box<RequestView>, usize, Result<Decision, GatewayError>) {
    for (index, link) in chain.iter().enumerate() {
        if !link.pool.wants().on_request {
            continue;
        }
        let call_span = spans
            .as_deref_mut()
            .map(|spans| CallSpan::begin(spans, &mut request));
        let started = Instant::now();
        // Boxed: a plugin call's future is kilobytes, and inline it would make every request's
        // future that large, plugins or not, and be copied with it.
        let call = Box::pin(link.pool.on_request(request, bound.get_mut(index)));
        let (returned, outcome) = call.await;
        let elapsed = started.elapsed();
        *plugin_time += elapsed;
        link.metrics
            .record(elapsed, outcome.as_ref().err().map(PluginError::kind));
        request = returned;
        if let (Some(call_span), Some(spans)) = (call_span, spans.as_deref_mut()) {
            let ended = match &outcome {
                Ok(Action::Continue) => "ok",
                Ok(Action::Respond(_)) => "reply",
                Err(error) => call_outcome(error),
            };
            call_span.end(spans, link, "on-request", ended, &mut request);
        }
        match outcome {
            Ok(Action::Continue) => {}
            Ok(Action::Respond(reply)) => {
                request.writable = false;
                return (request, index + 1, Ok(Decision::Reply(reply)));
            }
            Err(error) if link.failure == FailurePolicy::Open => {
                tracing::debug!(plugin = link.pool.name(), %error, "plugin failed open; skipping it");
            }
            Err(error) => {
                request.writable = false;
                let plugin = link.pool.name().to_owned();
                return (request, index, Err(GatewayError::Plugin { plugin, error }));
            }
        }
    }
    request.writable = false;
    (request, chain.len(), Ok(Decision::Forward))
}

/// Phase 4: picks the upstream (a plugin's choice, the route's, or its service's) and a node
/// of it, and forwards the request; a 101 the client asked for is kept in `finish` to be
/// spliced. A request a plugin gave targets goes to them in turn ([`to_targets`]).
async fn upstream_phase(
    snapshot: &Snapshot,
    route: &Route,
    finish: &mut Finish,
    request: Box<RequestView>,
    rest: BodyRest,
    service: Option<String>,
    upgrade: Option<(HeaderValue, hyper::upgrade::OnUpgrade)>,
) -> Result<Response<ProxyBody>, GatewayError> {
    let RequestView {
        method,
        path,
        query,
        mut headers,
        client_ip,
        body,
        upstream: chosen,
        targets,
        ..
    } = *request;
    let body = match (body, rest) {
        (BufferedBody::Buffered(bytes), BodyRest::Buffered(trailers)) => {
            OutboundBody::Full(bytes, trailers)
        }
        (BufferedBody::Buffered(bytes), BodyRest::Streaming(_)) => OutboundBody::Full(bytes, None),
        (BufferedBody::Streaming, BodyRest::Streaming(body)) => OutboundBody::Streaming(body),
        (BufferedBody::Streaming, BodyRest::Buffered(_)) => {
            unreachable!("a buffered body stays in the view")
        }
    };
    // An empty body keeps its replay for retries: no filter has a chunk of it to see.
    let readers = (!body.is_empty())
        .then(|| body_readers(&route.chain, &finish.bound, StreamType::Request))
        .flatten();
    let body = match readers {
        Some(readers) => {
            if route
                .chain
                .iter()
                .any(|link| link.pool.hooks_chunks(StreamType::Request))
            {
                // A component's chunk hook may change the body's length as it streams.
                headers.remove(header::CONTENT_LENGTH);
            }
            body.through(readers)
        }
        None => body,
    };
    let head = Head {
        method,
        path,
        query,
        headers,
        client_ip,
    };
    if !targets.is_empty() && upgrade.is_none() {
        // Boxed: the rare path's future stays out of every request's.
        return Box::pin(to_targets(snapshot, route, finish, head, body, targets)).await;
    }
    let upstream = snapshot.upstream_for(route, chosen.as_deref(), service.as_deref())?;
    send_to(upstream, finish, head, body, upgrade).await
}

/// What of the request goes upstream besides its body.
#[derive(Clone)]
struct Head {
    method: Method,
    path: String,
    query: Option<String>,
    headers: HeaderMap,
    client_ip: std::net::IpAddr,
}

/// Sends the request to each of `targets` in turn, each with its edits, until one answers
/// with neither 429 nor 5xx, or could be reached at all; the last one tried answers. A body
/// that cannot be sent twice goes to the first target only (unless a target has its own).
/// `finish` records which target answered.
async fn to_targets(
    snapshot: &Snapshot,
    route: &Route,
    finish: &mut Finish,
    head: Head,
    body: OutboundBody,
    targets: Vec<Fallback>,
) -> Result<Response<ProxyBody>, GatewayError> {
    // Whether a target after each one has a body of its own to send.
    let mut own_body_later: Vec<bool> = targets
        .iter()
        .rev()
        .scan(false, |later, target| {
            let this = *later;
            *later |= target.body.is_some();
            Some(this)
        })
        .collect();
    own_body_later.reverse();
    let mut body = Some(body);
    for (index, target) in targets.into_iter().enumerate() {
        let replay = body.as_ref().and_then(OutboundBody::replay);
        let attempt_body = match (target.body, replay) {
            (Some(bytes), _) => OutboundBody::Full(bytes, None),
            (None, Some(replay)) => replay,
            // The one send of a body that cannot be repeated.
            (None, None) => match body.take() {
                Some(body) => body,
                None => continue,
            },
        };
        let mut head = head.clone();
        // A target is a service of its own (a provider's API): the client's host is not its
        // name, so its node's is sent, unless the target sets one.
        head.headers.remove(header::HOST);
        for (name, value) in target.set_headers {
            head.headers.insert(name, value);
        }
        if let Some((path, query)) = target.path {
            (head.path, head.query) = (path, query);
        }
        let upstream = snapshot.upstream_for(route, Some(&target.upstream), None);
        let answered = match upstream {
            Ok(upstream) => send_to(upstream, finish, head, attempt_body, None).await,
            Err(error) => Err(error),
        };
        finish.answered_by = answered.is_ok().then_some(index as u32);
        let fell_through = match &answered {
            Ok(response) => {
                response.status() == StatusCode::TOO_MANY_REQUESTS
                    || response.status().is_server_error()
            }
            Err(GatewayError::Upstream(UpstreamError::RequestBody { .. })) => false,
            Err(GatewayError::Upstream(_) | GatewayError::NoService { .. }) => true,
            Err(_) => false,
        };
        let last = index + 1 == own_body_later.len();
        let more = !last && (body.is_some() || own_body_later[index]);
        if !fell_through || !more {
            return answered;
        }
        tracing::debug!(target = index, "a plugin's target failed; trying the next");
        finish.in_flight = None;
    }
    // Every target was passed over (none could be sent the body): as if none could be reached.
    Err(GatewayError::Upstream(UpstreamError::NoNodes))
}

/// Sends the request to `upstream`, as it is after the plugins' edits.
async fn send_to(
    upstream: &upstream::Upstream,
    finish: &mut Finish,
    head: Head,
    body: OutboundBody,
    upgrade: Option<(HeaderValue, hyper::upgrade::OnUpgrade)>,
) -> Result<Response<ProxyBody>, GatewayError> {
    let Head {
        method,
        path,
        query,
        mut headers,
        client_ip,
    } = head;
    let key = upstream.hash_key(client_ip, &path, query.as_deref(), &headers);
    // The client's were dropped at the edge; these are any a plugin added.
    strip_hop_by_hop(&mut headers);
    if let Some((protocol, _)) = &upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, protocol.clone());
    }
    if matches!(body, OutboundBody::Full(..)) {
        // The body may have been replaced; hyper sets the length of the one it sends.
        headers.remove(header::CONTENT_LENGTH);
    }
    if upstream.config.scheme.is_http2() {
        // HTTP/2 carries the authority in the URI; gRPC needs `te: trailers`.
        headers.remove(header::HOST);
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    let path_and_query = match query {
        Some(query) => format!("{path}?{query}"),
        None => path,
    };
    let read_within = headers.get("grpc-timeout").and_then(grpc_timeout);
    let outbound = Outbound {
        method,
        path_and_query,
        headers,
        body,
        read_within,
        upgrade: upgrade.is_some(),
    };
    let attempts = finish.spans.as_deref_mut();
    let (mut response, in_flight) = upstream::send(upstream, key, outbound, attempts).await?;
    finish.upstream = Some(in_flight.node().addr.clone());
    finish.in_flight = Some(in_flight);
    finish.switched = accepted_upgrade(&mut response, upgrade, upstream.idle_timeout())?;
    Ok(response.map(ProxyBody::Upstream))
}

/// The upgrade an upstream's 101 accepted, if it answered 101; a 101 to a request that asked
/// for no upgrade (or one that names no protocol) is the upstream's failure.
fn accepted_upgrade(
    response: &mut Response<UpstreamBody>,
    asked: Option<(HeaderValue, hyper::upgrade::OnUpgrade)>,
    idle: Duration,
) -> Result<Option<Switch>, GatewayError> {
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Ok(None);
    }
    let upstream = response
        .extensions_mut()
        .remove::<hyper::upgrade::OnUpgrade>();
    let protocol = response.headers().get(header::UPGRADE).cloned();
    match (asked, upstream, protocol) {
        (Some((_, client)), Some(upstream), Some(protocol)) => Ok(Some(Switch {
            client,
            upstream,
            protocol,
            idle,
        })),
        _ => Err(GatewayError::UnaskedUpgrade),
    }
}

/// An upgrade the upstream accepted: both connections, once hyper lets go of them.
struct Switch {
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    /// The upstream's `Upgrade` answer.
    protocol: HeaderValue,
    /// How long the spliced connections may both be quiet.
    idle: Duration,
}

/// Phase 5: runs `on-response` in reverse order over `links` (the plugins that had their
/// turn in `on-request`), buffering the body, up to `body_limit`, if one of them reads it.
/// It runs for upstream responses, plugin replies and errors alike, so that plugins such as
/// request-id mark every answer. `request` is `None` when no plugin runs after `on-request`.
pub async fn response_phase(
    links: &[ChainLink],
    body_limit: Option<u64>,
    request: Option<Box<RequestView>>,
    response: Response<ProxyBody>,
    plugin_time: &mut Duration,
    bound: &mut [Bound],
    mut spans: Option<&mut RequestSpans>,
) -> (
    Option<Box<RequestView>>,
    Result<Response<ProxyBody>, GatewayError>,
) {
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    // The client's connection has its own version; hyper uses it when this is the default.
    parts.version = http::Version::default();
    let wants_response = links.iter().any(|link| link.pool.wants().on_response);
    // A component's chunk hook may change the body's length as it streams.
    let hooked = links
        .iter()
        .any(|link| link.pool.hooks_chunks(StreamType::Response));
    if hooked {
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    let mut request = match request {
        Some(request) if wants_response => request,
        request => {
            // Chunk hooks still see the body, which no `on-response` has held.
            let body = through_readers(links, bound, body, None);
            return (request, Ok(Response::from_parts(parts, body)));
        }
    };
    // An event stream is never held whole: it may never end, and each event is due when sent.
    let wants_body = links
        .iter()
        .any(|link| link.pool.wants().on_response && link.pool.wants().response_body)
        && !is_event_stream(&parts.headers);
    let mut trailers = None;
    let (body, mut streaming) = match body_limit.filter(|_| wants_body) {
        Some(limit) => match collect_bounded(body, limit).await {
            Ok((bytes, collected)) => {
                trailers = collected;
                (Some(bytes), None)
            }
            Err(CollectError::TooLarge(limit)) => {
                return (Some(request), Err(GatewayError::ResponseTooLarge(limit)));
            }
            Err(CollectError::Read(e)) => {
                return (
                    Some(request),
                    Err(GatewayError::ResponseBody(e.to_string())),
                );
            }
        },
        None => (None, Some(body)),
    };
    let mut view = Box::new(ResponseView {
        status: parts.status,
        headers: std::mem::take(&mut parts.headers),
        body,
        body_replaced: false,
        body_access: false,
        body_limit: 0,
    });
    // A body that has all arrived with its head goes through the filters' body callbacks in
    // their response calls: one call each rather than two, and no stream to wrap.
    let (mut whole, mut first) = (None, None);
    let reads_body = links
        .iter()
        .any(|link| link.pool.wants().on_response && link.pool.reads_body(StreamType::Response));
    // A body that is over before it begins (a HEAD's, a 204's) has no chunk for a filter.
    let unfinished = streaming
        .as_mut()
        .filter(|body| reads_body && !http_body::Body::is_end_stream(&**body));
    // A component's chunk hooks see a body only as it streams: one that arrived whole is
    // streamed to them, as one chunk.
    if let Some(body) = unfinished {
        match arrived(body) {
            Arrived::Whole(bytes) if hooked => first = Some(Ok(http_body::Frame::data(bytes))),
            Arrived::Whole(bytes) => whole = Some(bytes),
            Arrived::First(frame) => first = Some(frame),
            Arrived::Nothing => {}
        }
    }
    let arrived_length = whole.as_ref().map(bytes::Bytes::len);
    for (index, link) in links
        .iter()
        .enumerate()
        .rev()
        .filter(|(_, link)| link.pool.wants().on_response)
    {
        let call_span = spans
            .as_deref_mut()
            .map(|spans| CallSpan::begin(spans, &mut request));
        let started = Instant::now();
        // Boxed, as in the request phase.
        let call = link
            .pool
            .on_response(request, view, bound.get_mut(index), whole.as_mut());
        let (returned_request, returned_view, outcome) = Box::pin(call).await;
        let elapsed = started.elapsed();
        *plugin_time += elapsed;
        link.metrics
            .record(elapsed, outcome.as_ref().err().map(PluginError::kind));
        (request, view) = (returned_request, returned_view);
        if let (Some(call_span), Some(spans)) = (call_span, spans.as_deref_mut()) {
            let ended = outcome.as_ref().err().map_or("ok", call_outcome);
            call_span.end(spans, link, "on-response", ended, &mut request);
        }
        if let Err(error) = outcome {
            if link.failure == FailurePolicy::Closed {
                let plugin = link.pool.name().to_owned();
                return (Some(request), Err(GatewayError::Plugin { plugin, error }));
            }
            tracing::debug!(plugin = link.pool.name(), %error, "plugin failed open; skipping it");
        }
    }
    parts.status = view.status;
    parts.headers = view.headers;
    if let Some(bytes) = whole {
        if Some(bytes.len()) != arrived_length {
            // The filters changed its length; hyper frames the body it now knows whole.
            parts.headers.remove(header::CONTENT_LENGTH);
        }
        return (
            Some(request),
            Ok(Response::from_parts(parts, ProxyBody::full(bytes))),
        );
    }
    let body = match (view.body, streaming.take()) {
        (Some(bytes), _) => {
            if view.body_replaced || trailers.is_some() {
                parts.headers.remove(header::CONTENT_LENGTH);
            }
            ProxyBody::trailed(bytes, trailers)
        }
        (None, Some(body)) => body,
        (None, None) => ProxyBody::Empty,
    };
    let body = through_readers(links, bound, body, first);
    (Some(request), Ok(Response::from_parts(parts, body)))
}

/// The response body through the body callbacks and chunk hooks of `links` that read it, with
/// `first`, a frame already taken from it, back in front.
fn through_readers(
    links: &[ChainLink],
    bound: &[Bound],
    body: ProxyBody,
    first: Option<Result<http_body::Frame<bytes::Bytes>, crate::body::BodyError>>,
) -> ProxyBody {
    // A body that is over before it begins has no chunk for a filter to see.
    let readers = (first.is_some() || !http_body::Body::is_end_stream(&body))
        .then(|| body_readers(links, bound, StreamType::Response))
        .flatten();
    match (readers, first) {
        (Some(readers), first) => ProxyBody::Filtered(Box::new(
            FilteredBody::new(body, StreamType::Response, readers).with_first(first),
        )),
        // The frame taken goes back in front, through no filter.
        (None, Some(first)) => ProxyBody::Filtered(Box::new(
            FilteredBody::new(body, StreamType::Response, Vec::new()).with_first(Some(first)),
        )),
        (None, None) => body,
    }
}

/// Whether a response's head says its body is server-sent events (`text/event-stream`, with
/// any parameters, in any case).
fn is_event_stream(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return false;
    };
    let essence = value
        .as_bytes()
        .split(|b| *b == b';')
        .next()
        .unwrap_or_default();
    essence
        .trim_ascii()
        .eq_ignore_ascii_case(b"text/event-stream")
}

/// The proxy-wasm filters among `links` with a body or trailers callback for `stream`, in the
/// order the body meets them (the chain's for a request, reverse for a response); `None` when
/// there is none, and the body is left as it is.
fn body_readers(
    links: &[ChainLink],
    bound: &[Bound],
    stream: StreamType,
) -> Option<Vec<ChunkLink>> {
    let readers = links
        .iter()
        .enumerate()
        .filter(|(_, link)| link.pool.follows_body(stream));
    let mut readers: Vec<ChunkLink> = readers
        .map(|(index, link)| {
            let metrics = link.metrics.clone();
            let bound = bound.get(index).map(Bound::share).unwrap_or_default();
            ChunkLink::new(link.pool.clone(), bound, link.failure, metrics)
        })
        .collect();
    if stream == StreamType::Response {
        readers.reverse();
    }
    (!readers.is_empty()).then_some(readers)
}

/// Phase 6's first step, on every answer (upstream, plugin reply or error alike), after every
/// `on-response`: the response header edits plugins queued in `on-request`.
pub fn apply_queued_edits(headers: &mut HeaderMap, edits: &[ResponseEdit]) {
    for edit in edits {
        edit.apply(headers);
    }
}

/// Phase 6's last step: runs `on-log` in reverse order over `chain`, once the response is
/// over. A failure is logged and changes nothing; the failures are returned for
/// `weir plugin test` to report.
pub async fn log_phase(
    chain: &[ChainLink],
    mut request: Box<RequestView>,
    summary: &Summary,
    bound: &mut [Bound],
) -> Vec<PluginError> {
    let mut failures = Vec::new();
    for (index, link) in chain
        .iter()
        .enumerate()
        .rev()
        .filter(|(_, link)| link.pool.wants().on_log)
    {
        let started = Instant::now();
        // Boxed, as in the request phase: this runs in a task of its own, moved whole.
        let (returned, outcome) =
            Box::pin(link.pool.on_log(request, summary, bound.get_mut(index))).await;
        link.metrics.record(
            started.elapsed(),
            outcome.as_ref().err().map(PluginError::kind),
        );
        request = returned;
        if let Err(error) = outcome {
            tracing::debug!(plugin = link.pool.name(), %error, "on-log failed");
            failures.push(error);
        }
    }
    failures
}

/// Phase 6: everything that happens once the response is over. It runs when the response body
/// is dropped, which hyper does after the last byte is written or when the client goes away.
pub struct Finish {
    gateway: Arc<Gateway>,
    started: Instant,
    request_id: String,
    /// The request's trace, under `server.tracing`.
    trace: Option<TraceContext>,
    /// The spans recorded so far, when the request is sampled and a collector is configured.
    spans: Option<Box<RequestSpans>>,
    /// Where those spans go when the request is over.
    span_sink: Option<Arc<SpanSink>>,
    /// The client's address, as the edge decided it.
    client_ip: IpAddr,
    method: Method,
    uri: Uri,
    /// The path's normal form, when it differs from the URI's.
    normal_path: Option<String>,
    status: StatusCode,
    route: Option<Arc<Route>>,
    upstream: Option<String>,
    /// Which of a plugin's targets answered, when it gave the request some.
    answered_by: Option<u32>,
    plugin_time: Duration,
    /// The request as sent, for plugins' `on-log`.
    kept_request: Option<Box<RequestView>>,
    /// Keeps the node's in-flight count up while the response streams.
    in_flight: Option<InFlight>,
    /// Whether the client speaks gRPC: then errors are gRPC statuses, not JSON.
    grpc: bool,
    /// Whether the client speaks gRPC-Web: then the answer is translated back to it.
    grpc_web: bool,
    /// How an upgraded connection went, once it is over.
    upgraded: Option<Spliced>,
    /// The consumer an auth plugin found.
    consumer: Option<Arc<str>>,
    /// Whether requests are also counted by consumer (`server.metrics_per_consumer`).
    consumer_metrics: bool,
    /// Response header edits plugins queued in `on-request`, applied to whatever is answered.
    response_edits: Vec<ResponseEdit>,
    /// The request's own instance of each plugin isolated per request, by chain position
    /// (empty when the route has none).
    bound: Vec<Bound>,
    /// The upgrade the upstream accepted, until the answer splices it.
    switched: Option<Switch>,
}

impl Finish {
    /// The finishing work of a request that just arrived with `parts`, from `peer`.
    fn new(gateway: Arc<Gateway>, parts: &Parts, peer: Peer) -> Self {
        Finish {
            gateway,
            started: Instant::now(),
            request_id: request_id(&parts.headers),
            trace: None,
            spans: None,
            span_sink: None,
            client_ip: peer.addr.ip().to_canonical(),
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            normal_path: None,
            status: StatusCode::OK,
            route: None,
            upstream: None,
            answered_by: None,
            plugin_time: Duration::ZERO,
            kept_request: None,
            in_flight: None,
            grpc: is_grpc(&parts.headers),
            grpc_web: grpc_web::is_grpc_web(&parts.headers),
            upgraded: None,
            consumer: None,
            consumer_metrics: false,
            response_edits: Vec::new(),
            bound: Vec::new(),
            switched: None,
        }
    }

    /// Takes what the request phase decided that outlives it: the request id, the consumer
    /// (also told to the upstream in `x-consumer-username`) and the queued response edits.
    fn after_request_phase(&mut self, snapshot: &Snapshot, request: &mut RequestView) {
        self.request_id = request.id.clone();
        self.consumer = request.consumer.clone();
        self.consumer_metrics = snapshot.server.config.metrics_per_consumer;
        self.response_edits = std::mem::take(&mut request.response_edits);
        if let Some(consumer) = &request.consumer
            && let Ok(value) = HeaderValue::from_str(consumer)
        {
            request.headers.insert(CONSUMER_HEADER, value);
        }
    }

    /// Answers 101 and splices the two connections in a task of their own, which finishes
    /// (access log, metrics, `on-log`) when the spliced connection ends.
    fn splice(
        mut self,
        response: Response<ProxyBody>,
        switch: Switch,
    ) -> Response<ResponseBody<Finish>> {
        self.status = StatusCode::SWITCHING_PROTOCOLS;
        let (mut parts, _) = response.into_parts();
        parts.status = StatusCode::SWITCHING_PROTOCOLS;
        apply_queued_edits(&mut parts.headers, &self.response_edits);
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, switch.protocol);
        let (serving, held) = tokio::sync::oneshot::channel();
        // Tracked with the `on-log` calls, so that a drain waits for the spliced connection
        // (up to its timeout) and its access-log line is written before the log closes.
        let tracker = self.gateway.pending_on_log().clone();
        tracker.spawn(async move {
            // The connection counts as serving a request while spliced, so that its
            // between-requests timeouts do not apply.
            let _serving = held.await.ok();
            let (client, upstream) = tokio::join!(switch.client, switch.upstream);
            let spliced = match (client, upstream) {
                (Ok(client), Ok(upstream)) => {
                    upgrade::splice(
                        hyper_util::rt::TokioIo::new(client),
                        hyper_util::rt::TokioIo::new(upstream),
                        switch.idle,
                    )
                    .await
                }
                (client, upstream) => {
                    let error = client.err().or(upstream.err());
                    tracing::debug!(request_id = %self.request_id, ?error, "upgrade did not complete");
                    Spliced {
                        ended: "error",
                        ..Spliced::default()
                    }
                }
            };
            self.upgraded.replace(spliced);
        });
        Response::from_parts(parts, ResponseBody::upgrading(serving))
    }

    fn respond(mut self, response: Response<ProxyBody>) -> Response<ResponseBody<Finish>> {
        self.status = response.status();
        let (mut parts, mut body) = response.into_parts();
        apply_queued_edits(&mut parts.headers, &self.response_edits);
        if self.grpc_web {
            grpc_web::response_to_web(&mut parts.headers);
            body = ProxyBody::GrpcWeb(Box::new(grpc_web::WebBody::new(body)));
        }
        Response::from_parts(parts, ResponseBody::finishing(body, Some(self)))
    }

    /// The trace id as the access log and error answers give it.
    fn trace_hex(&self) -> Option<String> {
        self.trace.as_ref().map(TraceContext::trace_id_hex)
    }

    /// Records the server span, the request's own, and sends the request's spans on.
    fn end_trace(&mut self, status: u16) {
        let (Some(mut spans), Some(sink)) = (self.spans.take(), self.span_sink.take()) else {
            return;
        };
        let route = self.route.as_ref().map(|route| route.id.to_string());
        let name = match &route {
            Some(route) => format!("{} {route}", self.method),
            None => self.method.to_string(),
        };
        let context = spans.context;
        let mut span =
            SpanRecord::ending_now(name, Kind::Server, context.span_id, None, spans.started);
        span.set("http.request.method", self.method.to_string());
        // The normal form, never the query string: it may carry what a client wants private.
        let path = self.normal_path.as_deref().unwrap_or(self.uri.path());
        span.set("url.path", path.to_owned());
        span.set("http.response.status_code", i64::from(status));
        span.set("client.address", self.client_ip.to_string());
        span.set("weir.request_id", self.request_id.clone());
        if let Some(route) = route {
            span.set("http.route", route);
        }
        if let Some(consumer) = &self.consumer {
            span.set("weir.consumer", consumer.to_string());
        }
        if status >= 500 {
            span.failed = Some(format!("answered {status}").into());
        }
        spans.push(span);
        sink.send(*spans);
    }

    fn fail(self, error: GatewayError) -> Response<ResponseBody<Finish>> {
        let response = self.answer_error(error);
        self.respond(response)
    }

    /// The client's answer for `error`; the detail (which node, which OS error) goes to the log
    /// with the request id, never to the client.
    fn answer_error(&self, error: GatewayError) -> Response<ProxyBody> {
        if let GatewayError::Upstream(UpstreamError::RequestBody {
            refused: Some(reply),
            ..
        }) = error
        {
            // A plugin refused the request's body: its answer is the client's.
            return reply_response(*reply, self.grpc);
        }
        let metrics = self.gateway.metrics();
        match &error {
            GatewayError::Upstream(UpstreamError::RequestBody { stalled: true, .. })
            | GatewayError::RequestBodyTimeout(_) => metrics.client_timeout("body").inc(),
            GatewayError::BadRequest(_) => metrics.client_error("bad_request").inc(),
            GatewayError::HeadersTooLarge => metrics.client_error("header_too_large").inc(),
            _ => 0,
        };
        if error.status().is_server_error() {
            tracing::warn!(request_id = %self.request_id, %error, "gateway answered with an error");
        } else {
            tracing::debug!(request_id = %self.request_id, %error, "gateway answered with an error");
        }
        if self.grpc {
            let mut response =
                grpc_error(error.status(), &error.public_message(), &self.request_id);
            // Beside the request id, as metadata: a gRPC error has no body to carry it.
            if let Some(trace_id) = self.trace_hex()
                && let Ok(value) = HeaderValue::from_str(&trace_id)
            {
                response.headers_mut().insert(TRACE_ID_HEADER, value);
            }
            response
        } else {
            error.response(&self.request_id, self.trace_hex().as_deref())
        }
    }
}

impl Drop for Finish {
    fn drop(&mut self) {
        let latency = self.started.elapsed();
        let status = self.status.as_u16();
        self.end_trace(status);
        let route_id = self.route.as_ref().map(|r| &*r.id);
        let access_log = self.gateway.access_log();
        if access_log.enabled() {
            access_log.write(&AccessRecord {
                time: now_rfc3339(),
                request_id: &self.request_id,
                trace_id: self.trace_hex(),
                client_ip: self.client_ip.to_string(),
                method: self.method.as_str(),
                path: self.normal_path.as_deref().unwrap_or(self.uri.path()),
                route: route_id,
                upstream: self.upstream.as_deref(),
                status,
                latency_us: latency.as_micros() as u64,
                plugin_us: self.plugin_time.as_micros() as u64,
                consumer: self.consumer.as_deref(),
                upgraded: self.upgraded,
            });
        }
        let Some(route) = self.route.take() else {
            self.gateway
                .metrics()
                .unrouted
                .record(status, latency.as_secs_f64());
            return;
        };
        route.metrics.record(status, latency.as_secs_f64());
        if self.consumer_metrics
            && let Some(consumer) = &self.consumer
        {
            self.gateway
                .metrics()
                .consumer_request(&route.id, consumer, status);
        }
        let Some(request) = self.kept_request.take() else {
            return;
        };
        if !route.chain.iter().any(|link| link.pool.wants().on_log) {
            return;
        }
        let summary = Summary {
            status,
            latency_us: latency.as_micros() as u64,
            upstream: self.upstream.clone(),
        };
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let mut bound = std::mem::take(&mut self.bound);
        let mut phase = Box::pin(async move {
            // Each failure was logged where it happened.
            let _ = log_phase(&route.chain, request, &summary, &mut bound).await;
        });
        // Most log phases end in their first poll (no plugin waits or yields): that poll runs
        // here, and only what is left gets a task. The task's first poll gives the phase its
        // own waker, in place of this one.
        let mut context = std::task::Context::from_waker(std::task::Waker::noop());
        if phase.as_mut().poll(&mut context).is_pending() {
            // Tracked, so that a drain waits for it.
            self.gateway.pending_on_log().spawn(phase);
        }
    }
}

/// A plugin call's span while the call runs: its id is the parent the call's outbound calls
/// name, and what the plugin adds to it gathers in the request's `notes`.
struct CallSpan {
    id: [u8; 8],
    start: SystemTime,
}

impl CallSpan {
    fn begin(spans: &mut RequestSpans, request: &mut RequestView) -> Self {
        let id = spans.new_id();
        request.notes = Some(Box::new(CallNotes::new(id)));
        if let Some(trace) = &mut request.trace {
            trace.span_id = id;
        }
        CallSpan {
            id,
            start: SystemTime::now(),
        }
    }

    /// Records the call's span (and its outbound calls') as `phase` of `link`'s plugin, ended
    /// as `outcome`.
    fn end(
        self,
        spans: &mut RequestSpans,
        link: &ChainLink,
        phase: &'static str,
        outcome: &'static str,
        request: &mut RequestView,
    ) {
        let server = spans.context.span_id;
        if let Some(trace) = &mut request.trace {
            trace.span_id = server;
        }
        let notes = request.notes.take().map(|notes| *notes).unwrap_or_default();
        let name = format!("plugin {} {phase}", link.pool.name());
        let mut span =
            SpanRecord::ending_now(name, Kind::Internal, self.id, Some(server), self.start);
        span.set("weir.plugin", link.pool.name().to_owned());
        span.set("weir.tenant", link.pool.tenant().to_owned());
        span.set("weir.phase", phase);
        span.set("weir.outcome", outcome);
        let used = span.end.duration_since(span.start).unwrap_or_default();
        span.set("weir.plugin.time_us", used.as_micros() as i64);
        span.set("weir.plugin.outbound_calls", notes.outbound.len() as i64);
        if outcome != "ok" && outcome != "reply" {
            span.failed = Some(outcome.into());
        }
        span.attributes.extend(notes.attributes);
        span.events = notes.events;
        for outbound in notes.outbound {
            spans.push(outbound);
        }
        spans.push(span);
    }
}

/// A failed plugin call's outcome, as its span names it.
fn call_outcome(error: &PluginError) -> &'static str {
    match error {
        PluginError::Timeout(_) => "timeout",
        PluginError::Memory(_) | PluginError::Limit(_) | PluginError::Quota(_) => "over-limit",
        PluginError::Quarantined(_) => "quarantined",
        PluginError::Trap(_) => "trap",
        other => other.kind(),
    }
}

/// Splits `/user-svc/api/x` into the path `/api/x` and the service `user-svc`.
fn split_service(path: &str) -> (String, Option<String>) {
    let rest = path.trim_start_matches('/');
    let (service, remainder) = rest.split_once('/').unwrap_or((rest, ""));
    if service.is_empty() {
        return (path.to_owned(), None);
    }
    (format!("/{remainder}"), Some(service.to_owned()))
}

/// The client's request id if it sent a usable one, or a new one.
fn request_id(headers: &HeaderMap) -> String {
    headers
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|id| !id.is_empty() && id.len() <= 200 && id.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| {
            let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
            uuid::Uuid::new_v4()
                .hyphenated()
                .encode_lower(&mut text)
                .to_owned()
        })
}

fn read_only_copy(request: &RequestView) -> Box<RequestView> {
    Box::new(RequestView {
        method: request.method.clone(),
        path: request.path.clone(),
        query: request.query.clone(),
        headers: request.headers.clone(),
        id: request.id.clone(),
        route_id: request.route_id.clone(),
        client_ip: request.client_ip,
        origin: request.origin.clone(),
        body: BufferedBody::Streaming,
        vars: request.vars.clone(),
        writable: false,
        body_access: false,
        body_limit: 0,
        consumer: request.consumer.clone(),
        upstream: request.upstream.clone(),
        targets: Vec::new(),
        answered_by: request.answered_by,
        response_edits: Vec::new(),
        directory: request.directory.clone(),
        trace: request.trace,
        notes: None,
    })
}

/// A plugin's answer. To a gRPC client, an answer that is not a gRPC response (no
/// `grpc-status`) becomes a trailers-only gRPC status, with the body as its message.
pub fn reply_response(reply: Reply, grpc: bool) -> Response<ProxyBody> {
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let grpc_error_reply = grpc
        && !reply
            .headers
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case("grpc-status"));
    let mut response = if grpc_error_reply {
        grpc_error(status, String::from_utf8_lossy(&reply.body).trim(), "")
    } else {
        let mut response = Response::new(ProxyBody::full(reply.body));
        *response.status_mut() = status;
        response
    };
    for (name, value) in reply.headers {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&value),
        ) else {
            tracing::debug!(header = name, "plugin reply header dropped: invalid");
            continue;
        };
        // The gateway frames the body (and, for a gRPC status, says what it is).
        let framing = name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING;
        if framing || (grpc_error_reply && name == header::CONTENT_TYPE) {
            continue;
        }
        response.headers_mut().append(name, value);
    }
    response
}

/// A gRPC client's `grpc-timeout` (`100m`, `5S`: at most 8 digits and a unit of H, M, S, m, u
/// or n), or `None` when it is not one.
fn grpc_timeout(value: &HeaderValue) -> Option<Duration> {
    let text = value.to_str().ok()?;
    let (digits, unit) = text.split_at(text.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_as_the_spec_writes_them() {
        let parse = |text: &str| grpc_timeout(&HeaderValue::from_str(text).unwrap());
        assert_eq!(parse("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse("99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(parse("7n"), Some(Duration::from_nanos(7)));
        for bad in ["", "m", "100", "100x", "123456789S", "-1S", "1.5S", "１S"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn an_event_stream_is_told_by_its_content_types_essence() {
        let typed = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_str(value).unwrap());
            is_event_stream(&headers)
        };
        assert!(typed("text/event-stream"));
        assert!(typed("Text/Event-Stream; charset=utf-8"));
        assert!(typed(" text/event-stream ;charset=utf-8"));
        assert!(!typed("text/event-streams"));
        assert!(!typed("application/json; x=text/event-stream"));
        assert!(!is_event_stream(&HeaderMap::new()));
    }
}
