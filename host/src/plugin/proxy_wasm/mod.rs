//! proxy-wasm filters: core Wasm modules written for Envoy's ABI (0.2.0 and 0.2.1), run as a
//! second kind of plugin under the same sandbox as components.
//!
//! A filter instance has one root context, started when the instance is made (`_initialize`,
//! `proxy_on_vm_start`, `proxy_on_configure`). A request gets an HTTP context in the instance
//! it is bound to for its whole life, so that the context's state carries from its headers to
//! its log. A filter that pauses waits here, off the guest, for the http call it made; each
//! callback runs under its own CPU deadline. Ticks and queue callbacks run on one instance per
//! pool, its control instance, in a task of their own.

pub mod abi;
pub mod batch;
pub mod imports;
pub mod properties;
pub mod queues;
pub mod state;

use std::time::Duration;

use bytes::Bytes;
use wasmtime::{Instance, Store, TypedFunc};

use self::abi::{ACTION_CONTINUE, StreamType};
use self::batch::{Batch, rearm};
pub use self::state::{CallResponse, FilterShared, FilterState, PendingCall};
use super::Reply;
use super::callout::Callouts;
use super::host::{InstanceState, LimitExceeded};

/// The exports that mark a module as a proxy-wasm filter, newest first.
pub const ABI_MARKERS: [(&str, &str); 2] = [
    ("proxy_abi_version_0_2_1", "0.2.1"),
    ("proxy_abi_version_0_2_0", "0.2.0"),
];

pub use self::state::ROOT_CONTEXT;
/// The most http calls one context may have out at once.
pub const MAX_PENDING_CALLS: usize = 8;
/// The shortest tick period a filter may ask for.
pub const MIN_TICK: Duration = Duration::from_millis(10);
/// The most metrics one filter may define (as many as the counters a component may create).
pub const MAX_METRICS: usize = 64;

/// Why a filter call failed in a way the ABI has no status for.
#[derive(Debug, thiserror::Error)]
pub enum FilterFault {
    /// The filter paused a request, but made no call that could resume it.
    #[error("the filter paused the {0} with nothing out that could resume it")]
    Stuck(&'static str),
    /// The filter refused its configuration.
    #[error("the filter's proxy_on_{0} returned false")]
    Refused(&'static str),
    /// The filter sent a local response once the response had begun.
    #[error("the filter sent a local response once the response had begun")]
    LateReply,
    /// The filter closed the stream in a body callback.
    #[error("the filter closed the stream")]
    Closed,
}

/// `proxy_on_http_call_response(context, token, headers, body size, trailers)`.
type CallResponseFunc = TypedFunc<(u32, u32, u32, u32, u32), ()>;

/// The functions a filter exports that the gateway calls; the ones it does not export are
/// simply not called, as the ABI says.
#[derive(Clone)]
pub struct FilterExports {
    initialize: Option<TypedFunc<(), ()>>,
    context_create: TypedFunc<(u32, u32), ()>,
    vm_start: Option<TypedFunc<(u32, u32), u32>>,
    configure: Option<TypedFunc<(u32, u32), u32>>,
    tick: Option<TypedFunc<u32, ()>>,
    request_body: Option<TypedFunc<(u32, u32, u32), u32>>,
    response_body: Option<TypedFunc<(u32, u32, u32), u32>>,
    request_trailers: Option<TypedFunc<(u32, u32), u32>>,
    response_trailers: Option<TypedFunc<(u32, u32), u32>>,
    call_response: Option<CallResponseFunc>,
    queue_ready: Option<TypedFunc<(u32, u32), ()>>,
    /// The callbacks run back to back (a request's first, its response's, its last), each
    /// group in one guest entry.
    batch: Batch,
}

impl FilterExports {
    /// Whether the filter has a body callback for `stream`.
    pub fn reads_body(&self, stream: StreamType) -> bool {
        match stream {
            StreamType::Request => self.request_body.is_some(),
            StreamType::Response => self.response_body.is_some(),
        }
    }

    /// Finds the exports of a new instance, keeps its memory and allocator in `store`, and
    /// links its batched entries.
    pub async fn load(
        store: &mut Store<InstanceState>,
        instance: &Instance,
    ) -> Result<Self, String> {
        let memory = instance
            .get_memory(&mut *store, "memory")
            .ok_or("it exports no memory")?;
        let allocate = ["proxy_on_memory_allocate", "malloc"]
            .iter()
            .find_map(|name| instance.get_typed_func::<u32, u32>(&mut *store, name).ok())
            .ok_or("it exports neither proxy_on_memory_allocate nor malloc")?;
        let state = store
            .data_mut()
            .filter
            .as_mut()
            .expect("a filter instance has filter state");
        state.memory = Some(memory);
        state.allocate = Some(allocate);
        macro_rules! optional {
            ($name:literal) => {
                match instance.get_func(&mut *store, $name) {
                    None => None,
                    Some(func) => Some(
                        func.typed(&*store)
                            .map_err(|e| format!("its {} has the wrong type: {e}", $name))?,
                    ),
                }
            };
        }
        // The batched callbacks are called through the batch module; their types are checked
        // here, for an error that names them.
        let _: Option<TypedFunc<(u32, u32, u32), u32>> = optional!("proxy_on_request_headers");
        let _: Option<TypedFunc<(u32, u32, u32), u32>> = optional!("proxy_on_response_headers");
        let _: Option<TypedFunc<u32, u32>> = optional!("proxy_on_done");
        let _: Option<TypedFunc<u32, ()>> = optional!("proxy_on_log");
        let _: Option<TypedFunc<u32, ()>> = optional!("proxy_on_delete");
        let initialize = match optional!("_initialize") {
            Some(f) => Some(f),
            None => optional!("_start"),
        };
        Ok(FilterExports {
            initialize,
            context_create: optional!("proxy_on_context_create")
                .ok_or("it exports no proxy_on_context_create")?,
            vm_start: optional!("proxy_on_vm_start"),
            configure: optional!("proxy_on_configure"),
            tick: optional!("proxy_on_tick"),
            request_body: optional!("proxy_on_request_body"),
            response_body: optional!("proxy_on_response_body"),
            request_trailers: optional!("proxy_on_request_trailers"),
            response_trailers: optional!("proxy_on_response_trailers"),
            call_response: optional!("proxy_on_http_call_response"),
            queue_ready: optional!("proxy_on_queue_ready"),
            batch: Batch::link(store, instance)
                .await
                .map_err(|e| format!("linking its callbacks: {e}"))?,
        })
    }
}

fn state(store: &mut Store<InstanceState>) -> &mut FilterState {
    store
        .data_mut()
        .filter
        .as_mut()
        .expect("a filter instance has filter state")
}

/// Starts a new instance: `_initialize`, the root context, `proxy_on_vm_start` and
/// `proxy_on_configure`.
pub async fn start(
    store: &mut Store<InstanceState>,
    exports: &FilterExports,
) -> wasmtime::Result<()> {
    if let Some(initialize) = &exports.initialize {
        initialize.call_async(&mut *store, ()).await?;
    }
    rearm(&mut *store);
    exports
        .context_create
        .call_async(&mut *store, (ROOT_CONTEXT, 0))
        .await?;
    let shared = state(store).shared.clone();
    if let Some(vm_start) = &exports.vm_start {
        rearm(&mut *store);
        let size = shared.vm_config.len() as u32;
        if vm_start
            .call_async(&mut *store, (ROOT_CONTEXT, size))
            .await?
            == 0
        {
            return Err(FilterFault::Refused("vm_start").into());
        }
    }
    if let Some(configure) = &exports.configure {
        rearm(&mut *store);
        let size = shared.plugin_config.len() as u32;
        if configure
            .call_async(&mut *store, (ROOT_CONTEXT, size))
            .await?
            == 0
        {
            return Err(FilterFault::Refused("configure").into());
        }
    }
    // A call made while starting has no callback to run: the instance serves no one yet.
    state(store).calls.clear();
    Ok(())
}

/// Runs `proxy_on_request_headers` in a new HTTP context: the filter's local response, if it
/// sent one, or its pause.
pub async fn request_headers(
    store: &mut Store<InstanceState>,
    exports: &FilterExports,
) -> wasmtime::Result<Settled> {
    let context = state(store).begin_request();
    let (count, end_of_stream) = {
        let request = store
            .data()
            .request
            .as_deref()
            .expect("the request is lent for on-request");
        (
            request.headers.len() as u32 + 4,
            !has_body(&request.headers),
        )
    };
    rearm(&mut *store);
    let action = exports
        .batch
        .begin
        .call_async(
            &mut *store,
            (context, ROOT_CONTEXT, count, end_of_stream as u32),
        )
        .await?;
    settle(store, action, StreamType::Request)
}

/// Runs `proxy_on_response_headers` in the request's HTTP context. With `body`, a response
/// body that arrived whole with its head, it also runs `proxy_on_response_body` over it (with
/// the end of the stream) in the same entry, if the headers went on: the bytes the filter
/// passed on come back with the outcome.
pub async fn response_headers(
    store: &mut Store<InstanceState>,
    exports: &FilterExports,
    body: Option<&Bytes>,
    limit: usize,
) -> wasmtime::Result<(Settled, Option<Bytes>)> {
    let Some(context) = state(store).http_context else {
        return Ok((Settled::Done(None), None));
    };
    let (count, status) = {
        let response = store
            .data()
            .response
            .as_deref()
            .expect("the response is lent for on-response");
        (response.headers.len() as u32 + 1, response.status.as_u16())
    };
    let offered = body.filter(|_| exports.reads_body(StreamType::Response));
    let filter = state(store);
    filter.response_code = Some(status);
    filter.effective = context;
    filter.next_body = offered.map(|body| state::BodyBuffer {
        stream: StreamType::Response,
        bytes: body.to_vec(),
        limit,
    });
    let size = offered.map_or(0, |body| body.len() as u32);
    rearm(&mut *store);
    let action = exports
        .batch
        .respond
        .call_async(&mut *store, (context, count, size))
        .await;
    let filter = state(store);
    filter.next_body = None;
    let ran = filter.body.take();
    let action = action?;
    let Some(ran) = ran else {
        return Ok((settle(store, action, StreamType::Response)?, None));
    };
    // The headers went on, and the body callback ran: as at the end of a streamed body.
    filter.calls.clear();
    after_body(filter)?;
    Ok((Settled::Done(None), Some(Bytes::from(ran.bytes))))
}

/// Runs `proxy_on_log`, then ends the HTTP context (`proxy_on_done`, `proxy_on_delete`), so
/// that the instance can serve another request.
pub async fn log(
    store: &mut Store<InstanceState>,
    exports: &FilterExports,
    status: u16,
) -> wasmtime::Result<()> {
    let Some(context) = state(store).http_context else {
        return Ok(());
    };
    let filter = state(store);
    filter.effective = context;
    filter.response_code.get_or_insert(status);
    rearm(&mut *store);
    exports.batch.end.call_async(&mut *store, context).await?;
    let filter = state(store);
    filter.http_context = None;
    filter.effective = ROOT_CONTEXT;
    filter.calls.clear();
    Ok(())
}

/// What a body callback (or a component's chunk hook) made of a chunk.
pub enum ChunkOutcome {
    /// Send these bytes on (the chunk, with what was held, as the filter left them).
    Pass(Bytes),
    /// Hold them, to be joined with the next chunk (the filter paused).
    Hold,
    /// The plugin refused the body, with this reply (a component's hook only).
    Refuse(Reply),
}

/// Runs `proxy_on_request_body` or `proxy_on_response_body` over `chunk`, joined to what the
/// filter held from earlier chunks (`held`), with `end` for the last one.
pub async fn body_chunk(
    store: &mut Store<InstanceState>,
    exports: &FilterExports,
    stream: StreamType,
    held: Vec<u8>,
    limit: usize,
    end: bool,
) -> wasmtime::Result<(ChunkOutcome, Vec<u8>)> {
    let callback = match stream {
        StreamType::Request => &exports.request_body,
        StreamType::Response => &exports.response_body,
    };
    let (Some(callback), Some(context)) = (callback, state(store).http_context) else {
        return Ok((ChunkOutcome::Pass(Bytes::from(held)), Vec::new()));
    };
    let size = held.len() as u32;
    let filter = state(store);
    filter.effective = context;
    filter.body = Some(state::BodyBuffer {
        stream,
        bytes: held,
        limit,
    });
    rearm(&mut *store);
    let outcome = callback
        .call_async(&mut *store, (context, size, end as u32))
        .await;
    let filter = state(store);
    let bytes = filter
        .body
        .take()
        .map(|body| body.bytes)
        .unwrap_or_default();
    // A body callback cannot pause for a call: calls made in one get no callback.
    filter.calls.clear();
    let action = outcome?;
    after_body(filter)?;
    // A pause on the last chunk has nothing more to wait for: what is held goes on.
    if action == ACTION_CONTINUE || end {
        Ok((ChunkOutcome::Pass(Bytes::from(bytes)), Vec::new()))
    } else if bytes.len() > limit {
        Err(LimitExceeded(format!(
            "held body of {} bytes, over its max_body_bytes of {limit}",
            bytes.len()
        ))
        .into())
    } else {
        Ok((ChunkOutcome::Hold, bytes))
    }
}

/// Runs `proxy_on_request_trailers` or `proxy_on_response_trailers` over `map`, a stream's
/// trailers, once its body callbacks have seen the end: the trailers as the filter left them.
/// A pause has nothing left to wait for, as on a body's last chunk: the trailers go on.
pub async fn trailers(
    store: &mut Store<InstanceState>,
    exports: &FilterExports,
    stream: StreamType,
    map: http::HeaderMap,
) -> wasmtime::Result<http::HeaderMap> {
    let callback = match stream {
        StreamType::Request => &exports.request_trailers,
        StreamType::Response => &exports.response_trailers,
    };
    let (Some(callback), Some(context)) = (callback, state(store).http_context) else {
        return Ok(map);
    };
    let count = map.len() as u32;
    let filter = state(store);
    filter.effective = context;
    filter.trailers = Some(state::Trailers { stream, map });
    rearm(&mut *store);
    let outcome = callback.call_async(&mut *store, (context, count)).await;
    let filter = state(store);
    let map = filter
        .trailers
        .take()
        .map(|trailers| trailers.map)
        .unwrap_or_default();
    // As in a body callback, calls made here get no callback.
    filter.calls.clear();
    outcome?;
    after_body(filter)?;
    Ok(map)
}

/// After a body or trailers callback: a local response or a closed stream is a fault there, where the
/// response has begun.
fn after_body(filter: &mut FilterState) -> Result<(), FilterFault> {
    if filter.local_reply.take().is_some() {
        return Err(FilterFault::LateReply);
    }
    if filter.closed {
        return Err(FilterFault::Closed);
    }
    Ok(())
}

/// Whether a request head says a body follows.
fn has_body(headers: &http::HeaderMap) -> bool {
    headers.contains_key(http::header::TRANSFER_ENCODING)
        || headers
            .get(http::header::CONTENT_LENGTH)
            .is_some_and(|length| length.as_bytes() != b"0")
}

/// Where a stream callback left its request.
pub enum Settled {
    /// It went on, or answered with the filter's local response.
    Done(Option<Reply>),
    /// It paused for the http calls it made (in the instance's `calls`): send the first with
    /// [`send_call`], off the instance, then run its callback with [`resume`].
    Waiting,
}

/// After a stream callback: the local response the filter sent, or whether it paused for its
/// calls.
fn settle(
    store: &mut Store<InstanceState>,
    action: u32,
    stream: StreamType,
) -> wasmtime::Result<Settled> {
    let filter = state(store);
    if let Some(reply) = filter.local_reply.take() {
        filter.calls.clear();
        return Ok(Settled::Done(Some(reply)));
    }
    if filter.closed {
        filter.calls.clear();
        return Ok(Settled::Done(Some(closed_reply())));
    }
    if action == ACTION_CONTINUE || filter.resumed(stream) {
        // Calls made without pausing get no callback: nothing waits for their answer.
        filter.calls.clear();
        return Ok(Settled::Done(None));
    }
    if filter.calls.is_empty() {
        return Err(FilterFault::Stuck(match stream {
            StreamType::Request => "request",
            StreamType::Response => "response",
        })
        .into());
    }
    Ok(Settled::Waiting)
}

/// Sends one call the filter made and reads its answer: no headers when it failed or timed
/// out. It needs no instance, so that the instance serves other requests meanwhile.
pub async fn send_call(callouts: &Callouts, plugin: &str, call: PendingCall) -> CallResponse {
    match tokio::time::timeout(call.timeout, callouts.send_call(call.request)).await {
        Ok(Ok(response)) => {
            let mut headers = vec![(":status".to_owned(), response.status.to_string())];
            headers.extend(response.headers);
            CallResponse {
                headers,
                body: Bytes::from(response.body),
            }
        }
        Ok(Err(error)) => {
            tracing::debug!(plugin, %error, "filter's http call failed");
            CallResponse::default()
        }
        Err(_) => CallResponse::default(),
    }
}

/// Runs `proxy_on_http_call_response` in `context` with what call `token` brought back,
/// under a fresh deadline, then sees where that left the paused `stream`.
pub async fn resume(
    store: &mut Store<InstanceState>,
    exports: &FilterExports,
    context: u32,
    token: u32,
    response: CallResponse,
    stream: StreamType,
) -> wasmtime::Result<Settled> {
    answer(store, exports, context, token, response).await?;
    settle(store, 1, stream)
}

/// Runs the callback of call `token` with what it brought back.
async fn answer(
    store: &mut Store<InstanceState>,
    exports: &FilterExports,
    context: u32,
    token: u32,
    response: CallResponse,
) -> wasmtime::Result<()> {
    let Some(callback) = &exports.call_response else {
        return Ok(());
    };
    let (headers, body) = (response.headers.len() as u32, response.body.len() as u32);
    let filter = state(store);
    filter.call_response = Some(response);
    filter.effective = context;
    rearm(&mut *store);
    let outcome = callback
        .call_async(&mut *store, (context, token, headers, body, 0))
        .await;
    state(store).call_response = None;
    outcome
}

/// What a closed request stream answers: the filter ended it without a response of its own.
fn closed_reply() -> Reply {
    Reply {
        status: 502,
        headers: Vec::new(),
        body: Vec::new(),
    }
}

/// Runs the root context's `proxy_on_tick`, then the calls it made.
pub async fn tick(
    store: &mut Store<InstanceState>,
    exports: &FilterExports,
) -> wasmtime::Result<()> {
    if let Some(tick) = &exports.tick {
        state(store).effective = ROOT_CONTEXT;
        rearm(&mut *store);
        tick.call_async(&mut *store, ROOT_CONTEXT).await?;
    }
    root_calls(store, exports).await
}

/// Runs `proxy_on_queue_ready` for each of `queues`, then the calls it made.
pub async fn queues_ready(
    store: &mut Store<InstanceState>,
    exports: &FilterExports,
    queues: &[u32],
) -> wasmtime::Result<()> {
    if let Some(ready) = &exports.queue_ready {
        for queue in queues {
            state(store).effective = ROOT_CONTEXT;
            rearm(&mut *store);
            ready
                .call_async(&mut *store, (ROOT_CONTEXT, *queue))
                .await?;
        }
    }
    root_calls(store, exports).await
}

/// Answers the calls the root context made, each with its callback.
async fn root_calls(
    store: &mut Store<InstanceState>,
    exports: &FilterExports,
) -> wasmtime::Result<()> {
    while let Some(call) = state(store).calls.pop_front() {
        let (callouts, token) = (store.data().callouts(), call.token);
        let response = send_call(&callouts, store.data().plugin_name(), call).await;
        answer(store, exports, ROOT_CONTEXT, token, response).await?;
    }
    Ok(())
}
