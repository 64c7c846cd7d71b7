//! Weir's own proxy-wasm test filter: one module for many tests, whose plugin configuration
//! (JSON, read in `on_configure`) picks what it does, e.g. `{"mode":"tag","tag":"f"}`.
//!
//! - `tag` (`tag`): sets the request's `x-chain` header to `<old>,<tag>` (or `<tag>` when it is
//!   absent), and the response's `x-chain` the same way, so a test can see that a component and a
//!   filter in one chain each see the other's edits, in order.
//! - `shared` (`key`, and `vm_id`, "" unless given): on request headers, adds one to a decimal
//!   counter in shared data at `key` with a compare-and-swap loop (at most 16 tries), then sets
//!   it once more with the stale CAS its first read returned; resolves the queue `weir-q` (which
//!   the root context registers in `on_configure`) under `vm_id` and enqueues the request's
//!   `:path`. The root context's `on_queue_ready` dequeues everything and writes the last item
//!   to shared data at `last-dequeued`. The response gets `x-count: <n+1>` (`failed` if every try
//!   met a CAS mismatch), `x-stale-cas: refused|accepted` (`none` when the first read found no
//!   value, so there was no CAS to go stale: the first request), `x-queue: enqueued|unresolved|
//!   <status>` and `x-last-dequeued: <value or "none">`. Metrics, defined in `on_configure`:
//!   counter `weir_filter_requests` (one per request), gauge `weir_filter_last_count` (n+1) and
//!   histogram `weir_filter_path_bytes` (the path's length).
//! - `shared-read` (`key`): the response gets `x-shared: <shared data at key, or "missing">`.
//! - `loop-headers`: never returns from `on_http_request_headers`.
//! - `loop-tick`: sets a tick period of 10 ms in `on_configure`, and never returns from
//!   `on_tick`; requests otherwise pass, with response header `x-ticking: yes`.
//! - `grow` (`mb`): on request headers, allocates and writes `mb` MiB in 1 MiB chunks that it
//!   keeps for the life of the module; the response gets `x-held-mb` (MiB held in all).
//! - `trap`: panics in `on_http_request_headers` (the panic aborts: a wasm trap).
//! - `trap-trailers`: panics in `on_http_response_trailers`; requests otherwise pass.
//! - `spin-end` (`ms`): spins for `ms` of wall-clock time (read through the host, so it needs
//!   the `clock` grant) in each of `on_done`, `on_log` and the context's delete, which then
//!   counts one more finished end in the instance. The response gets `x-ends`: how many ends
//!   the instance had finished when its headers came.
//! - `callout` (`cluster`, `path`, and `authority`, the cluster unless given): dispatches a GET
//!   of `path` to `cluster` (timeout 5 s) and pauses the request; when the answer comes, adds
//!   request headers `x-callout-status` (its `:status`, or `missing`) and `x-callout-body` (its
//!   body as UTF-8, lossy) and resumes. If the dispatch itself fails, answers 502 with
//!   `x-callout-error: <status>`.
//! - `crlf`: replaces request header `x-evil` with `a\r\nb: c` through the raw hostcall, and
//!   answers 200 itself with `x-crlf-status: ok` or `x-crlf-status: <status>`.
//! - `version`: the response gets `x-filter-version: a`, or `b` built with `--features variant-b`.
//! - `headers` (`request`, `response`, each `{remove: [..], set: {..}, add: {..}}`): what the
//!   `headers` component plugin (plugins/headers) does with the same config, for bench/run's
//!   comparison of the two kinds: on each side, removes, then sets (replacing), then adds
//!   (appending) headers; request edits on request headers, response edits on response headers.
//!   Names and values are checked as that plugin checks them (a name of visible ASCII but `:`,
//!   a value without CR, LF or NUL), and a bad one refuses the configuration. Like that plugin,
//!   it goes on past an edit the host refuses.
//!
//! - `contexts`: the response gets `x-live-contexts`: how many HTTP contexts this instance held
//!   (this request's among them) when the request's headers came, so that a test can see
//!   requests share an instance and that each context is deleted once its request ends.
//! - `trailers`: in the request's trailers, upper-cases `x-checksum`, tries to set
//!   `x-consumer-username: forged` and to add `x-evil: a\r\nb: c`, and adds
//!   `x-request-trailers-seen: <count>:<names, sorted>` and `x-refused: <the two edits'
//!   statuses>`. In the response's trailers, tries to add `connection: close`, removes
//!   `x-drop-me`, and adds `x-grpc-status-seen: <grpc-status, or "missing">`,
//!   `x-response-trailers-seen: <count>` and `x-refused: <the connection edit's status>`. Its
//!   response headers get `x-trailers-in-headers: <response trailers there>/<status of adding
//!   one there>`.
//!
//! A `<status>` is the proxy-wasm status's name, as the SDK's `Status` prints it (`BadArgument`).

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MapType, MetricType, Status};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

/// What `version` mode answers: this build's variant.
const VERSION: &str = if cfg!(feature = "variant-b") {
    "b"
} else {
    "a"
};
/// The shared queue `shared` mode enqueues request paths on.
const QUEUE: &str = "weir-q";
/// The shared data key `on_queue_ready` writes the last dequeued item to.
const LAST_DEQUEUED: &str = "last-dequeued";
/// How many times `shared` mode tries its compare-and-swap before it gives up.
const CAS_TRIES: usize = 16;
const MIB: usize = 1 << 20;
/// The HTTP contexts this instance holds now (for `contexts`).
/// The ends `spin-end` mode finished in this instance.
static ENDS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static LIVE_CONTEXTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
/// The VM configuration on_vm_start read (for `vm-config`).
static VM_CONFIG: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

/// The plugin configuration: the mode and its settings.
#[derive(Debug, Deserialize)]
#[serde(tag = "mode", rename_all = "kebab-case")]
enum Mode {
    Tag {
        tag: String,
    },
    Shared {
        key: String,
        #[serde(default)]
        vm_id: String,
    },
    SharedRead {
        key: String,
    },
    LoopHeaders,
    LoopTick,
    Grow {
        mb: usize,
    },
    Trap,
    TrapTrailers,
    SpinEnd {
        ms: u64,
    },
    Callout {
        cluster: String,
        path: String,
        authority: Option<String>,
    },
    Crlf,
    Contexts,
    Version,
    /// Holds the request body to its end, then sends it upper-cased; says in the response's
    /// `x-body-calls` how many request body callbacks it had.
    UpperBody,
    /// Answers with the VM configuration it read in on_vm_start, in `x-vm-config`.
    VmConfig,
    /// Reads and edits both sides' trailers, saying in trailers of its own what it saw and
    /// which edits were refused; its response headers say what the trailers maps are there.
    Trailers,
    Headers {
        #[serde(default)]
        request: Edits,
        #[serde(default)]
        response: Edits,
    },
}

/// `headers` mode's edits on one side, as plugins/headers's config has them.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Edits {
    #[serde(default)]
    remove: Vec<String>,
    #[serde(default)]
    set: BTreeMap<String, String>,
    #[serde(default)]
    add: BTreeMap<String, String>,
}

impl Edits {
    /// plugins/headers's checks: why the edits are refused, if they are.
    fn invalid(&self, side: &str) -> Option<String> {
        let names = self
            .remove
            .iter()
            .chain(self.set.keys())
            .chain(self.add.keys());
        for name in names {
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
                return Some(format!("{side}: {name:?} is not a valid header name"));
            }
        }
        let values = self.set.values().chain(self.add.values());
        for value in values {
            if value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
                return Some(format!(
                    "{side}: header value {value:?} has a control character"
                ));
            }
        }
        None
    }

    /// Applies the edits to `map`: removes, then sets, then adds. A refused edit is skipped.
    fn apply(&self, map: MapType) {
        for name in &self.remove {
            edit_header(map, name, HeaderEdit::Remove);
        }
        for (name, value) in &self.set {
            edit_header(map, name, HeaderEdit::Replace(value));
        }
        for (name, value) in &self.add {
            edit_header(map, name, HeaderEdit::Add(value));
        }
    }
}

/// The ids of `shared` mode's metrics.
#[derive(Clone, Copy)]
struct Metrics {
    requests: u32,
    last_count: u32,
    path_bytes: u32,
}

#[derive(Default)]
struct Root {
    /// None until `on_configure` has read a valid configuration.
    mode: Option<Rc<Mode>>,
    metrics: Option<Metrics>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_vm_start(&mut self, _: usize) -> bool {
        if let Some(config) = self.get_vm_configuration() {
            *VM_CONFIG.lock().unwrap_or_else(PoisonError::into_inner) =
                String::from_utf8_lossy(&config).into_owned();
        }
        true
    }

    fn on_configure(&mut self, _: usize) -> bool {
        let Some(config) = self.get_plugin_configuration() else {
            log::error!("weir-filter needs a configuration, such as {{\"mode\":\"version\"}}");
            return false;
        };
        let mode: Mode = match serde_json::from_slice(&config) {
            Ok(mode) => mode,
            Err(e) => {
                log::error!("weir-filter: invalid configuration: {e}");
                return false;
            }
        };
        match &mode {
            Mode::Headers { request, response } => {
                let invalid = request
                    .invalid("request")
                    .or_else(|| response.invalid("response"));
                if let Some(reason) = invalid {
                    log::error!("weir-filter: invalid configuration: {reason}");
                    return false;
                }
            }
            Mode::Shared { .. } => {
                // on_queue_ready tells this context which queue has items, so the id is not kept.
                self.register_shared_queue(QUEUE);
                self.metrics = Some(Metrics {
                    requests: define_metric(MetricType::Counter, "weir_filter_requests"),
                    last_count: define_metric(MetricType::Gauge, "weir_filter_last_count"),
                    path_bytes: define_metric(MetricType::Histogram, "weir_filter_path_bytes"),
                });
            }
            Mode::LoopTick => self.set_tick_period(Duration::from_millis(10)),
            _ => {}
        }
        log::info!("weir-filter {VERSION}: {mode:?}");
        self.mode = Some(Rc::new(mode));
        true
    }

    fn on_tick(&mut self) {
        if let Some(Mode::LoopTick) = self.mode.as_deref() {
            spin();
        }
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        let mut last = None;
        loop {
            match self.dequeue_shared_queue(queue_id) {
                Ok(Some(item)) => last = Some(item),
                Ok(None) => break,
                Err(status) => {
                    log::warn!("weir-filter: dequeueing from queue {queue_id}: {status:?}");
                    break;
                }
            }
        }
        if let Some(last) = last
            && let Err(status) = self.set_shared_data(LAST_DEQUEUED, Some(&last), None)
        {
            log::warn!("weir-filter: writing {LAST_DEQUEUED}: {status:?}");
        }
    }

    fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
        let live = LIVE_CONTEXTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        Some(Box::new(Filter {
            mode: self.mode.clone(),
            metrics: self.metrics,
            shared: None,
            body_calls: 0,
            live,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Filter {
    /// None if the root context was never configured: then requests pass untouched.
    mode: Option<Rc<Mode>>,
    metrics: Option<Metrics>,
    /// What `shared` mode did on the request, for the response's headers.
    shared: Option<SharedOutcome>,
    /// Request body callbacks so far (for `upper-body`).
    body_calls: u32,
    /// The HTTP contexts the instance held when this one was made (for `contexts`).
    live: usize,
}

impl Drop for Filter {
    fn drop(&mut self) {
        // The SDK drops a context in proxy_on_delete.
        LIVE_CONTEXTS.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(Mode::SpinEnd { ms }) = self.mode.as_deref() {
            spin_for(*ms);
            ENDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Spins for `ms` of wall-clock time, as the host's clock tells it.
fn spin_for(ms: u64) {
    let now = || hostcalls::get_current_time().expect("spin-end needs the clock grant");
    let until = now() + Duration::from_millis(ms);
    while now() < until {}
}

struct SharedOutcome {
    count: String,
    stale_cas: &'static str,
    queue: String,
}

impl Context for Filter {
    fn on_done(&mut self) -> bool {
        if let Some(Mode::SpinEnd { ms }) = self.mode.as_deref() {
            spin_for(*ms);
        }
        true
    }

    fn on_http_call_response(&mut self, _: u32, _: usize, body_size: usize, _: usize) {
        let status = self
            .get_http_call_response_header(":status")
            .unwrap_or_else(|| "missing".into());
        let body = self
            .get_http_call_response_body(0, body_size)
            .map(|body| String::from_utf8_lossy(&body).into_owned())
            .unwrap_or_default();
        self.add_http_request_header("x-callout-status", &status);
        self.add_http_request_header("x-callout-body", &body);
        self.resume_http_request();
    }
}

impl HttpContext for Filter {
    fn on_log(&mut self) {
        if let Some(Mode::SpinEnd { ms }) = self.mode.as_deref() {
            spin_for(*ms);
        }
    }

    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        let Some(mode) = self.mode.clone() else {
            return Action::Continue;
        };
        match &*mode {
            Mode::Tag { tag } => {
                let chain = append(self.get_http_request_header("x-chain"), tag);
                self.set_http_request_header("x-chain", Some(&chain));
            }
            Mode::Shared { key, vm_id } => self.shared = Some(self.count(key, vm_id)),
            Mode::LoopHeaders => spin(),
            Mode::Grow { mb } => grow(*mb),
            Mode::Trap => panic!("weir-filter: trap mode panics in on_http_request_headers"),
            Mode::Callout {
                cluster,
                path,
                authority,
            } => return self.call_out(cluster, path, authority.as_deref().unwrap_or(cluster)),
            Mode::Crlf => {
                let status = edit_header(
                    MapType::HttpRequestHeaders,
                    "x-evil",
                    HeaderEdit::Replace("a\r\nb: c"),
                );
                let status = match status {
                    0 => "ok".to_owned(),
                    other => status_name(other),
                };
                self.send_http_response(200, vec![("x-crlf-status", &status)], None);
                return Action::Pause;
            }
            Mode::Headers { request, .. } => request.apply(MapType::HttpRequestHeaders),
            // The body will change length: the gateway frames it instead.
            Mode::UpperBody => self.set_http_request_header("content-length", None),
            Mode::SharedRead { .. }
            | Mode::LoopTick
            | Mode::Version
            | Mode::VmConfig
            | Mode::Trailers
            | Mode::TrapTrailers
            | Mode::SpinEnd { .. }
            | Mode::Contexts => {}
        }
        Action::Continue
    }

    fn on_http_request_trailers(&mut self, count: usize) -> Action {
        if !matches!(self.mode.as_deref(), Some(Mode::Trailers)) {
            return Action::Continue;
        }
        let map = MapType::HttpRequestTrailers;
        let mut names: Vec<String> = self
            .get_http_request_trailers()
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        names.sort();
        let checksum = self.get_http_request_trailer("x-checksum");
        if let Some(checksum) = checksum {
            edit_header(
                map,
                "x-checksum",
                HeaderEdit::Replace(&checksum.to_uppercase()),
            );
        }
        let forged = edit_header(map, "x-consumer-username", HeaderEdit::Replace("forged"));
        let split = edit_header(map, "x-evil", HeaderEdit::Add("a\r\nb: c"));
        let seen = format!("{count}:{}", names.join(","));
        edit_header(map, "x-request-trailers-seen", HeaderEdit::Add(&seen));
        let refused = format!("{},{}", status_name(forged), status_name(split));
        edit_header(map, "x-refused", HeaderEdit::Add(&refused));
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, count: usize) -> Action {
        match self.mode.as_deref() {
            Some(Mode::Trailers) => {}
            Some(Mode::TrapTrailers) => {
                panic!("weir-filter: trap-trailers mode panics in on_http_response_trailers")
            }
            _ => return Action::Continue,
        }
        let map = MapType::HttpResponseTrailers;
        let status = self
            .get_http_response_trailer("grpc-status")
            .unwrap_or_else(|| "missing".into());
        let hop = edit_header(map, "connection", HeaderEdit::Add("close"));
        edit_header(map, "x-grpc-status-seen", HeaderEdit::Add(&status));
        edit_header(
            map,
            "x-response-trailers-seen",
            HeaderEdit::Add(&count.to_string()),
        );
        edit_header(map, "x-refused", HeaderEdit::Add(&status_name(hop)));
        edit_header(map, "x-drop-me", HeaderEdit::Remove);
        Action::Continue
    }

    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        if !matches!(self.mode.as_deref(), Some(Mode::UpperBody)) {
            return Action::Continue;
        }
        self.body_calls += 1;
        if !end_of_stream {
            return Action::Pause;
        }
        if let Some(body) = self.get_http_request_body(0, size) {
            self.set_http_request_body(0, size, &body.to_ascii_uppercase());
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        let Some(mode) = self.mode.clone() else {
            return Action::Continue;
        };
        match &*mode {
            Mode::Tag { tag } => {
                let chain = append(self.get_http_response_header("x-chain"), tag);
                self.set_http_response_header("x-chain", Some(&chain));
            }
            Mode::Shared { .. } => {
                if let Some(outcome) = &self.shared {
                    self.add_http_response_header("x-count", &outcome.count);
                    self.add_http_response_header("x-stale-cas", outcome.stale_cas);
                    self.add_http_response_header("x-queue", &outcome.queue);
                }
                let last = shared_text(self.get_shared_data(LAST_DEQUEUED).0);
                self.add_http_response_header("x-last-dequeued", last.as_deref().unwrap_or("none"));
            }
            Mode::SharedRead { key } => {
                let value = shared_text(self.get_shared_data(key).0);
                self.add_http_response_header("x-shared", value.as_deref().unwrap_or("missing"));
            }
            Mode::LoopTick => self.add_http_response_header("x-ticking", "yes"),
            Mode::Grow { .. } => {
                let held = HELD.lock().unwrap_or_else(PoisonError::into_inner).len();
                self.add_http_response_header("x-held-mb", &held.to_string());
            }
            Mode::Version => self.add_http_response_header("x-filter-version", VERSION),
            Mode::Contexts => {
                self.add_http_response_header("x-live-contexts", &self.live.to_string())
            }
            Mode::Headers { response, .. } => response.apply(MapType::HttpResponseHeaders),
            Mode::UpperBody => {
                self.add_http_response_header("x-body-calls", &self.body_calls.to_string())
            }
            Mode::VmConfig => {
                let vm = VM_CONFIG
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone();
                self.add_http_response_header("x-vm-config", &vm);
            }
            Mode::Trailers => {
                // No trailers are lent here: they read as empty and cannot be edited.
                let count = self.get_http_response_trailers().len();
                let edit = edit_header(
                    MapType::HttpResponseTrailers,
                    "x-early",
                    HeaderEdit::Add("1"),
                );
                let early = format!("{count}/{}", status_name(edit));
                self.add_http_response_header("x-trailers-in-headers", &early);
            }
            Mode::SpinEnd { .. } => {
                let ends = ENDS.load(std::sync::atomic::Ordering::Relaxed);
                self.add_http_response_header("x-ends", &ends.to_string());
            }
            Mode::LoopHeaders
            | Mode::Trap
            | Mode::TrapTrailers
            | Mode::Callout { .. }
            | Mode::Crlf => {}
        }
        Action::Continue
    }
}

impl Filter {
    /// `shared` mode's work on request headers.
    fn count(&self, key: &str, vm_id: &str) -> SharedOutcome {
        let path = self.get_http_request_header(":path").unwrap_or_default();
        let mut first_cas = None;
        let mut count = None;
        for attempt in 0..CAS_TRIES {
            let (value, cas) = self.get_shared_data(key);
            if attempt == 0 {
                first_cas = cas;
            }
            let next = shared_text(value)
                .and_then(|text| text.parse::<u64>().ok())
                .unwrap_or(0)
                + 1;
            match self.set_shared_data(key, Some(next.to_string().as_bytes()), cas) {
                Ok(()) => {
                    count = Some(next);
                    break;
                }
                Err(Status::CasMismatch) => continue,
                Err(status) => {
                    log::warn!("weir-filter: setting {key}: {status:?}");
                    break;
                }
            }
        }
        // The first read's CAS is stale now: this request, if no other, has written since. The
        // value is the one just written, so a host that wrongly accepts it changes nothing.
        let stale_cas = match (count, first_cas) {
            (Some(count), Some(cas)) => {
                match self.set_shared_data(key, Some(count.to_string().as_bytes()), Some(cas)) {
                    Err(Status::CasMismatch) => "refused",
                    Ok(()) => "accepted",
                    Err(_) => "error",
                }
            }
            _ => "none",
        };
        if let Some(metrics) = self.metrics {
            report(hostcalls::increment_metric(metrics.requests, 1));
            if let Some(count) = count {
                report(hostcalls::record_metric(metrics.last_count, count));
            }
            report(hostcalls::record_metric(
                metrics.path_bytes,
                path.len() as u64,
            ));
        }
        let queue = match hostcalls::resolve_shared_queue(vm_id, QUEUE) {
            Ok(Some(queue)) => match self.enqueue_shared_queue(queue, Some(path.as_bytes())) {
                Ok(()) => "enqueued".to_owned(),
                Err(status) => format!("{status:?}"),
            },
            Ok(None) => "unresolved".to_owned(),
            Err(status) => format!("{status:?}"),
        };
        SharedOutcome {
            count: count.map_or_else(|| "failed".to_owned(), |count| count.to_string()),
            stale_cas,
            queue,
        }
    }

    /// `callout` mode: dispatches the call and waits for `on_http_call_response`.
    fn call_out(&self, cluster: &str, path: &str, authority: &str) -> Action {
        let headers = vec![
            (":method", "GET"),
            (":path", path),
            (":authority", authority),
        ];
        if let Err(status) =
            self.dispatch_http_call(cluster, headers, None, vec![], Duration::from_secs(5))
        {
            let status = format!("{status:?}");
            self.send_http_response(502, vec![("x-callout-error", &status)], None);
        }
        Action::Pause
    }
}

/// `x-chain`'s new value: `tag` after the old one.
fn append(chain: Option<String>, tag: &str) -> String {
    match chain {
        Some(chain) if !chain.is_empty() => format!("{chain},{tag}"),
        _ => tag.to_owned(),
    }
}

/// A shared data value as text.
fn shared_text(value: Option<Vec<u8>>) -> Option<String> {
    value.map(|value| String::from_utf8_lossy(&value).into_owned())
}

fn define_metric(kind: MetricType, name: &str) -> u32 {
    hostcalls::define_metric(kind, name).unwrap_or_else(|status| {
        panic!("weir-filter: defining metric {name}: {status:?}");
    })
}

fn report(result: Result<(), Status>) {
    if let Err(status) = result {
        log::warn!("weir-filter: metric: {status:?}");
    }
}

/// Never returns, and does work the optimiser cannot prove useless.
fn spin() -> ! {
    let mut turns: u64 = 0;
    loop {
        turns = std::hint::black_box(turns.wrapping_add(1));
    }
}

/// What `grow` mode holds: it is never freed.
static HELD: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// Allocates `mb` more MiB, writing every byte.
fn grow(mb: usize) {
    let mut held = HELD.lock().unwrap_or_else(PoisonError::into_inner);
    for _ in 0..mb {
        // Not zero, so the allocation cannot be left to fresh (already zero) pages.
        held.push(std::hint::black_box(vec![0xa5; MIB]));
    }
}

// The SDK's header setters (`hostcalls::set_map_value` and the rest) panic on any status but
// Ok; these are the same imports, declared so that the status comes back as a number.
#[link(wasm_import_module = "env")]
unsafe extern "C" {
    fn proxy_replace_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_add_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(map_type: u32, key_data: *const u8, key_size: usize) -> u32;
}

/// One edit of a header map.
enum HeaderEdit<'a> {
    /// Replace the header's values with this one.
    Replace(&'a str),
    /// Add this value.
    Add(&'a str),
    /// Remove the header.
    Remove,
}

/// Edits a header through the raw hostcalls: the status, 0 for Ok.
fn edit_header(map: MapType, name: &str, edit: HeaderEdit<'_>) -> u32 {
    let map = map as u32;
    // SAFETY: the slices are valid for their lengths for the whole call, and the host only
    // reads them.
    unsafe {
        match edit {
            HeaderEdit::Replace(value) => proxy_replace_header_map_value(
                map,
                name.as_ptr(),
                name.len(),
                value.as_ptr(),
                value.len(),
            ),
            HeaderEdit::Add(value) => proxy_add_header_map_value(
                map,
                name.as_ptr(),
                name.len(),
                value.as_ptr(),
                value.len(),
            ),
            HeaderEdit::Remove => proxy_remove_header_map_value(map, name.as_ptr(), name.len()),
        }
    }
}

/// A proxy-wasm status's name, as the SDK's `Status` prints it; the spec's statuses the SDK
/// lacks too.
fn status_name(status: u32) -> String {
    let name = match status {
        0 => "Ok",
        1 => "NotFound",
        2 => "BadArgument",
        3 => "SerializationFailure",
        4 => "ParseFailure",
        6 => "InvalidMemoryAccess",
        7 => "Empty",
        8 => "CasMismatch",
        10 => "InternalFailure",
        12 => "Unimplemented",
        other => return format!("Status({other})"),
    };
    name.to_owned()
}
