//! The host functions a proxy-wasm filter imports (`env.proxy_*`), each mapped onto what a
//! component has: the request and response views, the kv, the http grant's client, plugin
//! metrics and the log. Every one answers a status; only the sandbox's own limits (a full
//! quota, an edit budget spent, an unreachable kv backend) fail the call.

use std::sync::Arc;

use bytes::Bytes;
use wasmtime::{Caller, Linker};

use super::abi::{
    self, BufferType, MapType, MetricType, Status, StreamType, decode_map, encode_map,
    property_path,
};
use super::properties::{self, Naming};
use super::queues::QueueError;
use super::state::{FilterState, PendingCall};
use super::{MAX_METRICS, MAX_PENDING_CALLS, MIN_TICK};
use crate::edge::trailers::refused_trailer;
use crate::kv::cas_of;
use crate::metrics::PluginEventLabels;
use crate::plugin::Reply;
use crate::plugin::bindings::weir::plugin0_1_0::http_client::OutgoingRequest;
use crate::plugin::callout::Call;
use crate::plugin::host::{InstanceState, LimitExceeded, NotGranted};
use crate::view::{RequestView, headers};

type Ctx<'a> = Caller<'a, InstanceState>;
type Answer = wasmtime::Result<u32>;

/// The largest value a filter may hand the host in one argument.
const MAX_ARGUMENT: u32 = 1 << 20;
/// The largest shared-data key.
const MAX_KEY: usize = 1024;

/// Fails the call unless `granted`: a filter imports every host function, so its grants are
/// checked when it calls one.
fn need(granted: bool, function: &'static str, grant: &'static str) -> wasmtime::Result<()> {
    if granted {
        Ok(())
    } else {
        Err(NotGranted { function, grant }.into())
    }
}

fn ok() -> Answer {
    Ok(Status::Ok as u32)
}

fn status(status: Status) -> Answer {
    Ok(status as u32)
}

fn filter<'a>(caller: &'a mut Ctx<'_>) -> &'a mut FilterState {
    caller
        .data_mut()
        .filter
        .as_mut()
        .expect("a filter instance has filter state")
}

/// Reads `len` bytes at `ptr` of the guest's memory.
fn read(caller: &mut Ctx<'_>, ptr: u32, len: u32) -> Result<Vec<u8>, Status> {
    if len > MAX_ARGUMENT {
        return Err(Status::BadArgument);
    }
    let memory = filter(caller).memory.ok_or(Status::InternalFailure)?;
    let mut bytes = vec![0; len as usize];
    memory
        .read(&*caller, ptr as usize, &mut bytes)
        .map_err(|_| Status::InvalidMemoryAccess)?;
    Ok(bytes)
}

fn read_text(caller: &mut Ctx<'_>, ptr: u32, len: u32) -> Result<String, Status> {
    String::from_utf8(read(caller, ptr, len)?).map_err(|_| Status::BadArgument)
}

fn write(caller: &mut Ctx<'_>, ptr: u32, bytes: &[u8]) -> Result<(), Status> {
    let memory = filter(caller).memory.ok_or(Status::InternalFailure)?;
    memory
        .write(&mut *caller, ptr as usize, bytes)
        .map_err(|_| Status::InvalidMemoryAccess)
}

/// Copies `bytes` into memory the guest's allocator gives, and writes where and how long at
/// `ptr_at` and `size_at`.
async fn give(caller: &mut Ctx<'_>, bytes: &[u8], ptr_at: u32, size_at: u32) -> Answer {
    let mut at = 0u32;
    if !bytes.is_empty() {
        let Some(allocate) = filter(caller).allocate.clone() else {
            return status(Status::InternalFailure);
        };
        at = allocate
            .call_async(&mut *caller, bytes.len() as u32)
            .await?;
        if at == 0 {
            return status(Status::InternalFailure);
        }
        if let Err(refused) = write(caller, at, bytes) {
            return status(refused);
        }
    }
    let outcome = write(caller, ptr_at, &at.to_le_bytes())
        .and_then(|()| write(caller, size_at, &(bytes.len() as u32).to_le_bytes()));
    match outcome {
        Ok(()) => ok(),
        Err(refused) => status(refused),
    }
}

/// A status as the function's answer: an `Err(Status)` from a helper is still an answer.
macro_rules! attempt {
    ($e:expr) => {
        match $e {
            Ok(value) => value,
            Err(refused) => return status(refused),
        }
    };
}

/// Whether the map can be edited now: request maps in the request phase only, response maps
/// in the response phase only; an http call's answer is read-only.
fn pairs(caller: &Ctx<'_>, map: MapType) -> Option<Vec<(String, String)>> {
    let state = caller.data();
    match map {
        MapType::RequestHeaders => {
            let request = state.request.as_deref()?;
            let mut out: Vec<(String, String)> = request_pseudo(request)
                .into_iter()
                .map(|(name, value)| (name.to_owned(), value))
                .collect();
            out.extend(headers::all(&request.headers));
            Some(out)
        }
        MapType::ResponseHeaders => {
            let response = state.response.as_deref()?;
            let mut out = vec![(":status".to_owned(), response.status.as_u16().to_string())];
            out.extend(headers::all(&response.headers));
            Some(out)
        }
        MapType::CallResponseHeaders => Some(
            state
                .filter
                .as_ref()?
                .call_response
                .as_ref()?
                .headers
                .clone(),
        ),
        // Outside their stream's trailers callback (and on an http call's answer, whose
        // trailers are not kept) trailers read as empty.
        MapType::RequestTrailers | MapType::ResponseTrailers => Some(
            trailers(state.filter.as_deref(), map)
                .map(headers::all)
                .unwrap_or_default(),
        ),
        MapType::CallResponseTrailers => Some(Vec::new()),
    }
}

/// The trailers `map` names, while its stream's trailers callback runs.
fn trailers(filter: Option<&FilterState>, map: MapType) -> Option<&http::HeaderMap> {
    let trailers = filter?.trailers.as_ref()?;
    (trailers_stream(map) == Some(trailers.stream)).then_some(&trailers.map)
}

/// The stream whose trailers `map` is, if it is a stream's trailers.
fn trailers_stream(map: MapType) -> Option<StreamType> {
    match map {
        MapType::RequestTrailers => Some(StreamType::Request),
        MapType::ResponseTrailers => Some(StreamType::Response),
        _ => None,
    }
}

/// The request's pseudo-headers, which come first in its map.
fn request_pseudo(request: &RequestView) -> [(&'static str, String); 4] {
    let mut path = request.path.clone();
    if let Some(query) = &request.query {
        path.push('?');
        path.push_str(query);
    }
    [
        (":method", request.method.to_string()),
        (":path", path),
        (":authority", request.origin.host.clone()),
        (":scheme", request.origin.scheme.to_owned()),
    ]
}

/// The first value of `name` (lower-case) in `map`, as [`pairs`] would list it, looked up
/// without copying the whole map: filters read single headers on every request.
fn value(caller: &Ctx<'_>, map: MapType, name: &str) -> Option<String> {
    let state = caller.data();
    match map {
        MapType::RequestHeaders => {
            let request = state.request.as_deref()?;
            if name.starts_with(':') {
                let pseudo = request_pseudo(request)
                    .into_iter()
                    .find(|(n, _)| *n == name);
                return pseudo.map(|(_, value)| value);
            }
            headers::get(&request.headers, name)
        }
        MapType::ResponseHeaders => {
            let response = state.response.as_deref()?;
            if name == ":status" {
                return Some(response.status.as_u16().to_string());
            }
            headers::get(&response.headers, name)
        }
        _ => pairs(caller, map)?
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v),
    }
}

/// One edit to a map: set (replace), add, or remove.
enum Edit<'a> {
    Replace(&'a str),
    Add(&'a str),
    Remove,
}

/// An edit of an ordinary header (or a pseudo-header the map does not let be set), the same for
/// requests and responses.
fn edit_plain(map: &mut http::HeaderMap, name: &str, change: &Edit<'_>) -> Result<(), String> {
    match (name, change) {
        (pseudo, _) if pseudo.starts_with(':') => Err("a pseudo-header".into()),
        // A filter that will change the body drops its length, as Envoy's do; the gateway then
        // frames it (chunked, or HTTP/2's own). Setting one stays refused.
        ("content-length", Edit::Remove) => {
            map.remove(http::header::CONTENT_LENGTH);
            Ok(())
        }
        (_, Edit::Replace(value)) => headers::set(map, name, value),
        (_, Edit::Add(value)) => headers::append(map, name, value),
        (_, Edit::Remove) => {
            headers::remove(map, name);
            Ok(())
        }
    }
}

/// Applies an edit through the same checks a component's edits go through: a CR, LF or NUL in
/// a value, a bad name or a header the gateway owns is refused with `BadArgument`.
fn edit(caller: &mut Ctx<'_>, map: MapType, name: &str, change: Edit<'_>) -> Answer {
    let name = name.to_ascii_lowercase();
    if let Edit::Replace(value) | Edit::Add(value) = change {
        caller.data_mut().edits.spend(&name, value)?;
    }
    let state = caller.data_mut();
    let outcome = match map {
        MapType::RequestHeaders => {
            let Some(request) = state.request.as_deref_mut() else {
                return status(Status::NotFound);
            };
            if !request.writable {
                return status(Status::BadArgument);
            }
            if state.request_before.is_none() {
                state.request_before = Some(request.before_edits());
            }
            let request = state.request.as_deref_mut().expect("checked above");
            match (name.as_str(), &change) {
                (":path", Edit::Replace(value)) => {
                    let (path, query) = match value.split_once('?') {
                        Some((path, query)) => (path, Some(query)),
                        None => (*value, None),
                    };
                    request
                        .set_path(path)
                        .and_then(|()| request.set_query(query))
                }
                (":method", Edit::Replace(value)) => request.set_method(value),
                (":authority", Edit::Replace(value)) => {
                    headers::set(&mut request.headers, "host", value)
                }
                _ => edit_plain(&mut request.headers, &name, &change),
            }
        }
        MapType::ResponseHeaders => {
            let Some(response) = state.response.as_deref_mut() else {
                return status(Status::NotFound);
            };
            if state.response_before.is_none() {
                state.response_before = Some(response.before_edits());
            }
            let response = state.response.as_deref_mut().expect("checked above");
            match (name.as_str(), &change) {
                (":status", Edit::Replace(value)) => match value.parse::<u16>() {
                    Ok(code) => response.set_status(code),
                    Err(_) => Err("not a status".into()),
                },
                _ => edit_plain(&mut response.headers, &name, &change),
            }
        }
        MapType::RequestTrailers | MapType::ResponseTrailers => {
            let stream = trailers_stream(map);
            let lent = state
                .filter
                .as_mut()
                .and_then(|filter| filter.trailers.as_mut());
            match lent {
                Some(trailers) if Some(trailers.stream) == stream => {
                    // The names the edge drops from a client's trailers: the gateway's own,
                    // hop-by-hop ones, and those of the head.
                    let refused = http::HeaderName::from_bytes(name.as_bytes())
                        .ok()
                        .and_then(|name| refused_trailer(&name));
                    match (refused, &change) {
                        (Some(why), Edit::Replace(_) | Edit::Add(_)) => {
                            Err(format!("{name} as a trailer: {why}"))
                        }
                        _ => edit_plain(&mut trailers.map, &name, &change),
                    }
                }
                // No trailers are lent outside their callback: there is nothing to edit.
                _ => return status(Status::NotFound),
            }
        }
        MapType::CallResponseHeaders | MapType::CallResponseTrailers => {
            return status(Status::BadArgument);
        }
    };
    match outcome {
        Ok(()) => ok(),
        Err(refused) => {
            tracing::debug!(plugin = caller.data().plugin_name(), %refused, "filter's header edit refused");
            status(Status::BadArgument)
        }
    }
}

fn buffer(caller: &Ctx<'_>, kind: BufferType) -> Option<Bytes> {
    let state = caller.data();
    let filter = state.filter.as_ref()?;
    match kind {
        BufferType::PluginConfiguration => Some(filter.shared.plugin_config.clone()),
        BufferType::VmConfiguration => Some(filter.shared.vm_config.clone()),
        BufferType::CallResponseBody => Some(filter.call_response.as_ref()?.body.clone()),
        BufferType::RequestBody | BufferType::ResponseBody => {
            let stream = match kind {
                BufferType::RequestBody => StreamType::Request,
                _ => StreamType::Response,
            };
            let body = filter.body.as_ref().filter(|body| body.stream == stream)?;
            Some(Bytes::copy_from_slice(&body.bytes))
        }
    }
}

/// The shared-data namespace: the tenant's, which every filter of the tenant shares and no
/// other tenant can name.
fn shared_namespace(caller: &Ctx<'_>) -> Arc<str> {
    format!("{}/:shared", caller.data().tenant_name()).into()
}

fn queue_status(error: QueueError) -> Answer {
    status(match error {
        QueueError::NotFound => Status::NotFound,
        QueueError::Full => Status::InternalFailure,
    })
}

/// Links every `env.proxy_*` function of ABI 0.2.0 and 0.2.1, and WASI preview 1.
pub fn add_to_linker(linker: &mut Linker<InstanceState>) -> wasmtime::Result<()> {
    wasmtime_wasi::p1::add_to_linker_async(linker, |state: &mut InstanceState| state.wasi_p1())?;
    // AssemblyScript's runtime imports its exit from the pre-preview-1 module name.
    linker.func_wrap(
        "wasi_unstable",
        "proc_exit",
        |_: Ctx<'_>, code: i32| -> wasmtime::Result<()> {
            Err(wasmtime::Error::msg(format!(
                "the filter exited with code {code}"
            )))
        },
    )?;
    let env = "env";

    linker.func_wrap(
        env,
        "proxy_log",
        |mut c: Ctx<'_>, level: u32, ptr: u32, len: u32| {
            let level = attempt!(abi::log_level(level).ok_or(Status::BadArgument));
            let message = attempt!(read(&mut c, ptr, len.min(8 << 10)));
            if c.data().grants().log {
                let level = if level == "critical" { "error" } else { level };
                c.data()
                    .log_line(level, String::from_utf8_lossy(&message).into_owned());
            }
            ok()
        },
    )?;
    linker.func_wrap(env, "proxy_get_log_level", |mut c: Ctx<'_>, at: u32| {
        let level = match tracing::level_filters::LevelFilter::current() {
            tracing::level_filters::LevelFilter::TRACE => 0u32,
            tracing::level_filters::LevelFilter::DEBUG => 1,
            tracing::level_filters::LevelFilter::INFO => 2,
            tracing::level_filters::LevelFilter::WARN => 3,
            _ => 4,
        };
        attempt!(write(&mut c, at, &level.to_le_bytes()));
        ok()
    })?;
    linker.func_wrap(
        env,
        "proxy_get_current_time_nanoseconds",
        |mut c: Ctx<'_>, at: u32| {
            need(
                c.data().grants().clock,
                "proxy_get_current_time_nanoseconds",
                "clock: true",
            )?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos() as u64;
            attempt!(write(&mut c, at, &now.to_le_bytes()));
            ok()
        },
    )?;
    linker.func_wrap(
        env,
        "proxy_set_tick_period_milliseconds",
        |mut c: Ctx<'_>, ms: u32| {
            let period =
                (ms > 0).then(|| std::time::Duration::from_millis(ms.into()).max(MIN_TICK));
            let shared = filter(&mut c).shared.clone();
            let before = std::mem::replace(&mut *shared.tick.lock().expect("tick lock"), period);
            // Every instance's root context asks at its start; only a change wakes the
            // control instance.
            if before != period {
                shared.wake.notify_one();
            }
            ok()
        },
    )?;

    // Buffers.
    linker.func_wrap_async(
        env,
        "proxy_get_buffer_bytes",
        |mut c: Ctx<'_>, (kind, start, max, ptr_at, size_at): (u32, u32, u32, u32, u32)| {
            Box::new(async move {
                let kind = attempt!(BufferType::from_id(kind).ok_or(Status::BadArgument));
                let bytes = attempt!(buffer(&c, kind).ok_or(Status::NotFound));
                let start = (start as usize).min(bytes.len());
                let end = start.saturating_add(max as usize).min(bytes.len());
                give(&mut c, &bytes[start..end], ptr_at, size_at).await
            })
        },
    )?;
    linker.func_wrap(
        env,
        "proxy_get_buffer_status",
        |mut c: Ctx<'_>, kind: u32, size_at: u32, _flags_at: u32| {
            let kind = attempt!(BufferType::from_id(kind).ok_or(Status::BadArgument));
            let bytes = attempt!(buffer(&c, kind).ok_or(Status::NotFound));
            attempt!(write(&mut c, size_at, &(bytes.len() as u32).to_le_bytes()));
            ok()
        },
    )?;
    linker.func_wrap(
        env,
        "proxy_set_buffer_bytes",
        |mut c: Ctx<'_>, kind: u32, start: u32, size: u32, ptr: u32, len: u32| {
            let stream = match BufferType::from_id(kind) {
                Some(BufferType::RequestBody) => StreamType::Request,
                Some(BufferType::ResponseBody) => StreamType::Response,
                // Configurations and an http call's answer are read-only.
                Some(_) => return status(Status::BadArgument),
                None => return status(Status::BadArgument),
            };
            let bytes = attempt!(read(&mut c, ptr, len));
            let Some(body) = filter(&mut c)
                .body
                .as_mut()
                .filter(|body| body.stream == stream)
            else {
                return status(Status::NotFound);
            };
            // Envoy's reading: replace `size` bytes at `start` (clamped to the body).
            let start = (start as usize).min(body.bytes.len());
            let end = start.saturating_add(size as usize).min(body.bytes.len());
            let after = body.bytes.len() - (end - start) + bytes.len();
            if after > body.limit {
                return Err(LimitExceeded(format!(
                    "body of {after} bytes, over its max_body_bytes of {}",
                    body.limit
                ))
                .into());
            }
            body.bytes.splice(start..end, bytes);
            ok()
        },
    )?;

    // Header maps.
    linker.func_wrap_async(
        env,
        "proxy_get_header_map_pairs",
        |mut c: Ctx<'_>, (map, ptr_at, size_at): (u32, u32, u32)| {
            Box::new(async move {
                let map = attempt!(MapType::from_id(map).ok_or(Status::BadArgument));
                let pairs = attempt!(pairs(&c, map).ok_or(Status::NotFound));
                let bytes = encode_map(pairs.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())));
                give(&mut c, &bytes, ptr_at, size_at).await
            })
        },
    )?;
    linker.func_wrap(
        env,
        "proxy_get_header_map_size",
        |mut c: Ctx<'_>, map: u32, at: u32| {
            let map = attempt!(MapType::from_id(map).ok_or(Status::BadArgument));
            let pairs = attempt!(pairs(&c, map).ok_or(Status::NotFound));
            let size = encode_map(pairs.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes()))).len();
            attempt!(write(&mut c, at, &(size as u32).to_le_bytes()));
            ok()
        },
    )?;
    linker.func_wrap_async(
        env,
        "proxy_get_header_map_value",
        |mut c: Ctx<'_>, (map, key, key_len, ptr_at, size_at): (u32, u32, u32, u32, u32)| {
            Box::new(async move {
                let map = attempt!(MapType::from_id(map).ok_or(Status::BadArgument));
                let name = attempt!(read_text(&mut c, key, key_len)).to_ascii_lowercase();
                let value = attempt!(value(&c, map, &name).ok_or(Status::NotFound));
                give(&mut c, value.as_bytes(), ptr_at, size_at).await
            })
        },
    )?;
    linker.func_wrap(
        env,
        "proxy_replace_header_map_value",
        |mut c: Ctx<'_>, map: u32, key: u32, key_len: u32, value: u32, value_len: u32| {
            let map = attempt!(MapType::from_id(map).ok_or(Status::BadArgument));
            let name = attempt!(read_text(&mut c, key, key_len));
            let value = attempt!(read_text(&mut c, value, value_len));
            edit(&mut c, map, &name, Edit::Replace(&value))
        },
    )?;
    linker.func_wrap(
        env,
        "proxy_add_header_map_value",
        |mut c: Ctx<'_>, map: u32, key: u32, key_len: u32, value: u32, value_len: u32| {
            let map = attempt!(MapType::from_id(map).ok_or(Status::BadArgument));
            let name = attempt!(read_text(&mut c, key, key_len));
            let value = attempt!(read_text(&mut c, value, value_len));
            edit(&mut c, map, &name, Edit::Add(&value))
        },
    )?;
    linker.func_wrap(
        env,
        "proxy_remove_header_map_value",
        |mut c: Ctx<'_>, map: u32, key: u32, key_len: u32| {
            let map = attempt!(MapType::from_id(map).ok_or(Status::BadArgument));
            let name = attempt!(read_text(&mut c, key, key_len));
            edit(&mut c, map, &name, Edit::Remove)
        },
    )?;
    linker.func_wrap(
        env,
        "proxy_set_header_map_pairs",
        |mut c: Ctx<'_>, map: u32, ptr: u32, len: u32| {
            let map = attempt!(MapType::from_id(map).ok_or(Status::BadArgument));
            let bytes = attempt!(read(&mut c, ptr, len));
            let wanted = attempt!(decode_map(&bytes).ok_or(Status::ParseFailure));
            let mut wanted_text = Vec::with_capacity(wanted.len());
            for (name, value) in wanted {
                let name = attempt!(String::from_utf8(name).map_err(|_| Status::BadArgument));
                let value = attempt!(String::from_utf8(value).map_err(|_| Status::BadArgument));
                wanted_text.push((name.to_ascii_lowercase(), value));
            }
            let current = attempt!(pairs(&c, map).ok_or(Status::NotFound));
            // Every header the new map leaves out goes; pseudo-headers stay unless set.
            for (name, _) in current {
                if !name.starts_with(':') && !wanted_text.iter().any(|(n, _)| *n == name) {
                    let answer = edit(&mut c, map, &name, Edit::Remove)?;
                    if answer != Status::Ok as u32 {
                        return Ok(answer);
                    }
                }
            }
            let mut seen = std::collections::HashSet::new();
            for (name, value) in &wanted_text {
                let change = if seen.insert(name.clone()) {
                    Edit::Replace(value)
                } else {
                    Edit::Add(value)
                };
                let answer = edit(&mut c, map, name, change)?;
                if answer != Status::Ok as u32 {
                    return Ok(answer);
                }
            }
            ok()
        },
    )?;

    // Properties.
    linker.func_wrap_async(
        env,
        "proxy_get_property",
        |mut c: Ctx<'_>, (ptr, len, ptr_at, size_at): (u32, u32, u32, u32)| {
            Box::new(async move {
                let path = property_path(&attempt!(read(&mut c, ptr, len)));
                let value = {
                    let state = c.data();
                    let filter = state.filter.as_ref().expect("a filter instance");
                    let naming = Naming {
                        plugin: state.plugin_name(),
                        root_id: &filter.shared.root_id,
                    };
                    properties::lookup(
                        &path,
                        state.request.as_deref(),
                        filter.response_code,
                        &naming,
                    )
                };
                let value = attempt!(value.ok_or(Status::NotFound));
                give(&mut c, &value, ptr_at, size_at).await
            })
        },
    )?;
    linker.func_wrap(
        env,
        "proxy_set_property",
        |_: Ctx<'_>, _ptr: u32, _len: u32, _value: u32, _value_len: u32| {
            status(Status::Unimplemented)
        },
    )?;

    // Flow.
    linker.func_wrap(
        env,
        "proxy_continue_stream",
        |mut c: Ctx<'_>, stream: u32| {
            let stream = attempt!(StreamType::from_id(stream).ok_or(Status::BadArgument));
            filter(&mut c).resume(stream);
            ok()
        },
    )?;
    linker.func_wrap(env, "proxy_continue_request", |mut c: Ctx<'_>| {
        filter(&mut c).resume(StreamType::Request);
        ok()
    })?;
    linker.func_wrap(env, "proxy_continue_response", |mut c: Ctx<'_>| {
        filter(&mut c).resume(StreamType::Response);
        ok()
    })?;
    linker.func_wrap(env, "proxy_close_stream", |mut c: Ctx<'_>, stream: u32| {
        attempt!(StreamType::from_id(stream).ok_or(Status::BadArgument));
        filter(&mut c).closed = true;
        ok()
    })?;
    linker.func_wrap(
        env,
        "proxy_send_local_response",
        |mut c: Ctx<'_>,
         code: u32,
         _details: u32,
         _details_len: u32,
         body: u32,
         body_len: u32,
         headers_at: u32,
         headers_len: u32,
         grpc_status: i32| {
            if !(200..=599).contains(&code) {
                return status(Status::BadArgument);
            }
            let body = attempt!(read(&mut c, body, body_len));
            let raw = attempt!(read(&mut c, headers_at, headers_len));
            let pairs = attempt!(decode_map(&raw).ok_or(Status::ParseFailure));
            let mut headers = Vec::with_capacity(pairs.len() + 1);
            for (name, value) in pairs {
                let name = attempt!(String::from_utf8(name).map_err(|_| Status::BadArgument));
                let value = attempt!(String::from_utf8(value).map_err(|_| Status::BadArgument));
                // The same checks as any header edit: a CR or LF never reaches the client.
                let mut probe = http::HeaderMap::new();
                if headers::set(&mut probe, &name, &value).is_err() {
                    return status(Status::BadArgument);
                }
                headers.push((name.to_ascii_lowercase(), value));
            }
            if (0..=16).contains(&grpc_status) {
                headers.push(("grpc-status".into(), grpc_status.to_string()));
            }
            filter(&mut c).local_reply = Some(Reply {
                status: code as u16,
                headers,
                body,
            });
            ok()
        },
    )?;
    linker.func_wrap(
        env,
        "proxy_set_effective_context",
        |mut c: Ctx<'_>, id: u32| {
            let filter = filter(&mut c);
            if id == super::ROOT_CONTEXT || filter.http_context == Some(id) {
                filter.effective = id;
                ok()
            } else {
                status(Status::BadArgument)
            }
        },
    )?;
    linker.func_wrap(env, "proxy_done", |_: Ctx<'_>| ok())?;

    // HTTP calls, under the http grant.
    linker.func_wrap(
        env,
        "proxy_http_call",
        |mut c: Ctx<'_>,
         cluster: u32,
         cluster_len: u32,
         headers_at: u32,
         headers_len: u32,
         body: u32,
         body_len: u32,
         _trailers: u32,
         _trailers_len: u32,
         timeout_ms: u32,
         token_at: u32| {
            let Some(grant) = c.data().grants().http.clone() else {
                return Err(NotGranted {
                    function: "proxy_http_call",
                    grant: "http: {hosts: [..]}",
                }
                .into());
            };
            let cluster = attempt!(read_text(&mut c, cluster, cluster_len));
            let raw = attempt!(read(&mut c, headers_at, headers_len));
            let pairs = attempt!(decode_map(&raw).ok_or(Status::ParseFailure));
            let body = attempt!(read(&mut c, body, body_len));
            let address = match c.data().request.as_deref() {
                Some(request) => request
                    .directory
                    .upstream_address(&cluster)
                    .map(str::to_owned),
                None => None,
            }
            .unwrap_or(cluster);
            let (mut method, mut path) = ("GET".to_owned(), "/".to_owned());
            let mut outgoing = Vec::new();
            for (name, value) in pairs {
                let name = String::from_utf8_lossy(&name).to_ascii_lowercase();
                let value = String::from_utf8_lossy(&value).into_owned();
                match name.as_str() {
                    ":method" => method = value,
                    ":path" => path = value,
                    ":authority" | ":scheme" => {}
                    _ => outgoing.push((name, value)),
                }
            }
            if !path.starts_with('/') {
                return status(Status::BadArgument);
            }
            let request = OutgoingRequest {
                method,
                url: format!("http://{address}{path}"),
                headers: outgoing,
                body,
            };
            let call = match Call::new(&grant, request) {
                Ok(call) => call,
                Err(refused) => {
                    tracing::debug!(plugin = c.data().plugin_name(), %refused, "filter's http call refused");
                    return status(Status::BadArgument);
                }
            };
            let filter = filter(&mut c);
            if filter.calls.len() >= MAX_PENDING_CALLS {
                return Err(LimitExceeded(format!(
                    "a context may have at most {MAX_PENDING_CALLS} http calls out"
                ))
                .into());
            }
            let token = filter.take_token();
            let timeout = std::time::Duration::from_millis(timeout_ms.max(1).into())
                .min(std::time::Duration::from_millis(grant.timeout_ms));
            filter.calls.push_back(PendingCall {
                token,
                request: call,
                timeout,
            });
            attempt!(write(&mut c, token_at, &token.to_le_bytes()));
            ok()
        },
    )?;

    // Shared data: the tenant's kv, with compare-and-swap.
    linker.func_wrap_async(
        env,
        "proxy_get_shared_data",
        |mut c: Ctx<'_>, (key, key_len, ptr_at, size_at, cas_at): (u32, u32, u32, u32, u32)| {
            Box::new(async move {
                need(c.data().grants().kv, "proxy_get_shared_data", "kv: true")?;
                let key = attempt!(read_text(&mut c, key, key_len.min(MAX_KEY as u32 + 1)));
                if key.len() > MAX_KEY {
                    return status(Status::BadArgument);
                }
                let namespace = shared_namespace(&c);
                let found = match c.data().kv_redis() {
                    Some(redis) => redis?
                        .get_with_cas(&namespace, &key)
                        .await
                        .map_err(wasmtime::Error::new)?
                        .map(|(value, cas)| (Bytes::from(value), cas)),
                    None => {
                        let (kv, _, _) = c.data().kv_scope();
                        kv.get(&namespace, &key)
                            .map(|v| (Bytes::copy_from_slice(&v), cas_of(&v)))
                    }
                };
                let (value, cas) = attempt!(found.ok_or(Status::NotFound));
                attempt!(write(&mut c, cas_at, &cas.to_le_bytes()));
                give(&mut c, &value, ptr_at, size_at).await
            })
        },
    )?;
    linker.func_wrap_async(
        env,
        "proxy_set_shared_data",
        |mut c: Ctx<'_>, (key, key_len, value, value_len, cas): (u32, u32, u32, u32, u32)| {
            Box::new(async move {
                need(c.data().grants().kv, "proxy_set_shared_data", "kv: true")?;
                let key = attempt!(read_text(&mut c, key, key_len.min(MAX_KEY as u32 + 1)));
                if key.len() > MAX_KEY {
                    return status(Status::BadArgument);
                }
                let value = attempt!(read(&mut c, value, value_len));
                let namespace = shared_namespace(&c);
                if let Some(redis) = c.data().kv_redis() {
                    let redis = redis?;
                    if cas == 0 {
                        redis
                            .set(&namespace, &key, &value, None)
                            .await
                            .map_err(wasmtime::Error::new)?;
                        return ok();
                    }
                    let stored = redis
                        .set_if(&namespace, &key, &value, cas)
                        .await
                        .map_err(wasmtime::Error::new)?;
                    return if stored {
                        ok()
                    } else {
                        status(Status::CasMismatch)
                    };
                }
                let (kv, _, tenant) = c.data().kv_scope();
                if cas == 0 {
                    kv.set(&namespace, &key, &value, None, tenant)?;
                    return ok();
                }
                match kv.set_if(&namespace, &key, &value, cas, tenant)? {
                    true => ok(),
                    false => status(Status::CasMismatch),
                }
            })
        },
    )?;

    // Shared queues: in this gateway, per tenant.
    linker.func_wrap(
        env,
        "proxy_register_shared_queue",
        |mut c: Ctx<'_>, name: u32, name_len: u32, id_at: u32| {
            need(
                c.data().grants().kv,
                "proxy_register_shared_queue",
                "kv: true",
            )?;
            let name = attempt!(read_text(&mut c, name, name_len.min(256)));
            let tenant: Arc<str> = c.data().tenant_name().into();
            let shared = filter(&mut c).shared.clone();
            let id = match shared.queues.register(&tenant, &name, &shared.wake) {
                Ok(id) => id,
                Err(error) => return queue_status(error),
            };
            attempt!(write(&mut c, id_at, &id.to_le_bytes()));
            ok()
        },
    )?;
    linker.func_wrap(
        env,
        "proxy_resolve_shared_queue",
        |mut c: Ctx<'_>, _vm: u32, _vm_len: u32, name: u32, name_len: u32, id_at: u32| {
            need(
                c.data().grants().kv,
                "proxy_resolve_shared_queue",
                "kv: true",
            )?;
            let name = attempt!(read_text(&mut c, name, name_len.min(256)));
            let tenant: Arc<str> = c.data().tenant_name().into();
            let shared = filter(&mut c).shared.clone();
            let id = attempt!(
                shared
                    .queues
                    .resolve(&tenant, &name)
                    .ok_or(Status::NotFound)
            );
            attempt!(write(&mut c, id_at, &id.to_le_bytes()));
            ok()
        },
    )?;
    linker.func_wrap(
        env,
        "proxy_enqueue_shared_queue",
        |mut c: Ctx<'_>, id: u32, value: u32, value_len: u32| {
            need(
                c.data().grants().kv,
                "proxy_enqueue_shared_queue",
                "kv: true",
            )?;
            let value = attempt!(read(&mut c, value, value_len));
            let tenant = c.data().tenant_name().to_owned();
            let shared = filter(&mut c).shared.clone();
            match shared.queues.enqueue(&tenant, id, Bytes::from(value)) {
                Ok(()) => ok(),
                Err(error) => queue_status(error),
            }
        },
    )?;
    linker.func_wrap_async(
        env,
        "proxy_dequeue_shared_queue",
        |mut c: Ctx<'_>, (id, ptr_at, size_at): (u32, u32, u32)| {
            Box::new(async move {
                need(
                    c.data().grants().kv,
                    "proxy_dequeue_shared_queue",
                    "kv: true",
                )?;
                let tenant = c.data().tenant_name().to_owned();
                let shared = filter(&mut c).shared.clone();
                match shared.queues.dequeue(&tenant, id) {
                    Ok(Some(item)) => give(&mut c, &item, ptr_at, size_at).await,
                    Ok(None) => status(Status::Empty),
                    Err(error) => queue_status(error),
                }
            })
        },
    )?;

    // Metrics: plugin metrics, under the plugin's label.
    linker.func_wrap(
        env,
        "proxy_define_metric",
        |mut c: Ctx<'_>, kind: u32, name: u32, name_len: u32, id_at: u32| {
            need(
                c.data().grants().metrics,
                "proxy_define_metric",
                "metrics: true",
            )?;
            let kind = attempt!(MetricType::from_id(kind).ok_or(Status::BadArgument));
            let name = attempt!(read_text(&mut c, name, name_len.min(65)));
            c.data().admit_metric(&name)?;
            let shared = filter(&mut c).shared.clone();
            let id = {
                let mut metrics = shared.metrics.lock().expect("metrics lock");
                match metrics.iter().position(|(k, n)| *k == kind && *n == name) {
                    Some(at) => at + 1,
                    None if metrics.len() >= MAX_METRICS => {
                        return Err(LimitExceeded(format!(
                            "a filter may define at most {MAX_METRICS} metrics"
                        ))
                        .into());
                    }
                    None => {
                        metrics.push((kind, name));
                        metrics.len()
                    }
                }
            };
            attempt!(write(&mut c, id_at, &(id as u32).to_le_bytes()));
            ok()
        },
    )?;
    linker.func_wrap(
        env,
        "proxy_increment_metric",
        |mut c: Ctx<'_>, id: u32, by: i64| {
            let (kind, labels) = attempt!(metric(&mut c, id));
            let metrics = c.data().metrics();
            match kind {
                MetricType::Counter if by >= 0 => {
                    metrics
                        .plugin_events
                        .get_or_create(&labels)
                        .inc_by(by as u64);
                }
                MetricType::Gauge => {
                    metrics.plugin_gauges.get_or_create(&labels).inc_by(by);
                }
                _ => return status(Status::BadArgument),
            }
            ok()
        },
    )?;
    linker.func_wrap(
        env,
        "proxy_record_metric",
        |mut c: Ctx<'_>, id: u32, value: u64| {
            let (kind, labels) = attempt!(metric(&mut c, id));
            let metrics = c.data().metrics();
            match kind {
                MetricType::Counter => {
                    let counter = metrics.plugin_events.get_or_create(&labels);
                    let now = counter.get();
                    if value >= now {
                        counter.inc_by(value - now);
                    }
                }
                MetricType::Gauge => {
                    metrics
                        .plugin_gauges
                        .get_or_create(&labels)
                        .set(i64::try_from(value).unwrap_or(i64::MAX));
                }
                MetricType::Histogram => {
                    metrics
                        .plugin_histograms
                        .get_or_create(&labels)
                        .observe(value as f64);
                }
            }
            ok()
        },
    )?;
    linker.func_wrap(
        env,
        "proxy_get_metric",
        |mut c: Ctx<'_>, id: u32, at: u32| {
            let (kind, labels) = attempt!(metric(&mut c, id));
            let metrics = c.data().metrics();
            let value = match kind {
                MetricType::Counter => metrics.plugin_events.get_or_create(&labels).get(),
                MetricType::Gauge => {
                    metrics.plugin_gauges.get_or_create(&labels).get().max(0) as u64
                }
                MetricType::Histogram => return status(Status::Unimplemented),
            };
            attempt!(write(&mut c, at, &value.to_le_bytes()));
            ok()
        },
    )?;

    // Not offered: gRPC calls, foreign functions, gRPC status.
    linker.func_wrap(
        env,
        "proxy_grpc_call",
        |_: Ctx<'_>,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32| status(Status::Unimplemented),
    )?;
    linker.func_wrap(
        env,
        "proxy_grpc_stream",
        |_: Ctx<'_>, _: u32, _: u32, _: u32, _: u32, _: u32, _: u32, _: u32, _: u32, _: u32| {
            status(Status::Unimplemented)
        },
    )?;
    linker.func_wrap(
        env,
        "proxy_grpc_send",
        |_: Ctx<'_>, _: u32, _: u32, _: u32, _: u32| status(Status::Unimplemented),
    )?;
    linker.func_wrap(env, "proxy_grpc_cancel", |_: Ctx<'_>, _: u32| {
        status(Status::Unimplemented)
    })?;
    linker.func_wrap(env, "proxy_grpc_close", |_: Ctx<'_>, _: u32| {
        status(Status::Unimplemented)
    })?;
    linker.func_wrap(
        env,
        "proxy_get_status",
        |_: Ctx<'_>, _: u32, _: u32, _: u32| status(Status::Unimplemented),
    )?;
    linker.func_wrap(
        env,
        "proxy_call_foreign_function",
        |_: Ctx<'_>, _: u32, _: u32, _: u32, _: u32, _: u32, _: u32| status(Status::Unimplemented),
    )?;
    Ok(())
}

/// The kind and labels of metric `id`.
fn metric(caller: &mut Ctx<'_>, id: u32) -> Result<(MetricType, PluginEventLabels), Status> {
    let plugin = caller.data().plugin_name().to_owned();
    let shared = filter(caller).shared.clone();
    let metrics = shared.metrics.lock().expect("metrics lock");
    let (kind, name) = metrics
        .get((id as usize).checked_sub(1).ok_or(Status::NotFound)?)
        .ok_or(Status::NotFound)?;
    Ok((
        *kind,
        PluginEventLabels {
            plugin,
            name: name.clone(),
        },
    ))
}
