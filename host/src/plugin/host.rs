//! The host functions plugins import, and the per-instance state they work on.

use std::sync::Arc;
use std::sync::LazyLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use wasmtime::component::{Resource, ResourceTable};
use wasmtime::{ResourceLimiter, Result};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::weir::plugin0_1_0::{clock, http, http_client, kv, log, metrics};
use super::bindings::weir::plugin0_2_0::{consumers, kv_scope, response_edits, routing};
use super::bindings::weir::plugin0_3_0::{
    ai_metrics, consumer_credentials, fallbacks, tracing as span_notes,
};
use super::callout::Callouts;
use super::health::PluginHealth;
use super::tenant::{QuotaExceeded, Tenant};
use crate::config::{Grants, KvBackend, WasiGrant};
use crate::kv::{KvError, KvStore, KvUnavailable, RedisSlot, RedisStore};
use crate::metrics::{Metrics, PluginEventLabels};
use crate::view::{
    Fallback, RequestBefore, RequestView, ResponseBefore, ResponseEdit, ResponseView, headers,
};

/// The longest log line a plugin may write; longer ones are cut.
const MAX_LOG_LINE: usize = 4096;
/// The longest kv key.
const MAX_KV_KEY: usize = 1024;
/// The largest kv value.
const MAX_KV_VALUE: usize = 1 << 20;
/// Headers one call may set or add.
pub const MAX_HEADER_EDITS: u32 = 100;
/// Bytes of header names and values one call may set or add.
pub const MAX_HEADER_BYTES: usize = 32 << 10;
/// Distinct counter names one plugin may create (each is a metric series the gateway keeps).
const MAX_COUNTER_NAMES: usize = 64;
/// The most provider and model pairs one plugin may report AI metrics for; later ones count
/// as model `other`, so that model names a client chose cannot grow the metrics without end.
const MAX_AI_MODELS: usize = 64;

/// A plugin went past a per-call limit; the call fails under the plugin's policy.
#[derive(Debug, thiserror::Error)]
#[error("limit: {0}")]
pub struct LimitExceeded(pub String);

/// A proxy-wasm filter called a host function its entry does not grant; the call fails.
#[derive(Debug, thiserror::Error)]
#[error("the filter called {function}, which needs grants: {{{grant}}}")]
pub struct NotGranted {
    /// The host function.
    pub function: &'static str,
    /// The grant, as YAML.
    pub grant: &'static str,
}

/// What every instance of one plugin shares.
pub struct PluginScope {
    name: Arc<str>,
    /// `tenant/plugin`: the kv namespace, which no other plugin or tenant can name.
    namespace: Arc<str>,
    tenant: Arc<Tenant>,
    grants: Grants,
    health: Arc<PluginHealth>,
    kv: KvStore,
    kv_backend: KvBackend,
    redis: RedisSlot,
    metrics: Arc<Metrics>,
    callouts: Callouts,
    counter_names: std::sync::Mutex<std::collections::HashSet<String>>,
    /// The provider and model pairs the plugin has reported AI metrics for.
    ai_models: std::sync::Mutex<std::collections::HashSet<(String, String)>>,
    log_capture: Option<LogCapture>,
}

/// What the runtime gives every plugin scope.
#[derive(Clone)]
pub struct Shared {
    /// The kv store.
    pub kv: KvStore,
    /// The Redis server behind `kv: {backend: redis}`.
    pub redis: RedisSlot,
    /// The gateway's metrics.
    pub metrics: Arc<Metrics>,
    /// The client for outbound calls.
    pub callouts: Callouts,
    /// Where log lines are also kept, for `weir plugin test`.
    pub log_capture: Option<LogCapture>,
}

/// Log lines kept for a plugin author's harness: (level, message).
pub type LogCapture = Arc<std::sync::Mutex<Vec<(String, String)>>>;

impl PluginScope {
    /// The scope of plugin `name` belonging to `tenant`, with its kv on `kv_backend`.
    pub fn new(
        name: &str,
        tenant: Arc<Tenant>,
        grants: Grants,
        kv_backend: KvBackend,
        health: Arc<PluginHealth>,
        shared: &Shared,
    ) -> Self {
        PluginScope {
            name: name.into(),
            namespace: format!("{}/{name}", tenant.name()).into(),
            tenant,
            grants,
            health,
            kv: shared.kv.clone(),
            kv_backend,
            redis: shared.redis.clone(),
            metrics: shared.metrics.clone(),
            callouts: shared.callouts.clone(),
            counter_names: Default::default(),
            ai_models: Default::default(),
            log_capture: shared.log_capture.clone(),
        }
    }

    /// The plugin's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The plugin's kv namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The plugin's tenant.
    pub fn tenant(&self) -> &Arc<Tenant> {
        &self.tenant
    }

    /// The plugin's failure record and quarantine.
    pub fn health(&self) -> &PluginHealth {
        &self.health
    }

    /// The gateway's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

/// Why an instance's memory could not grow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemoryHit {
    /// Past the plugin's own `memory_mb`.
    Plugin,
    /// Past the tenant's memory quota.
    Tenant(QuotaExceeded),
}

/// Caps an instance's linear memory, counts it against the tenant, and remembers a refusal.
pub struct MemoryCap {
    limit: usize,
    held: usize,
    tenant: Arc<Tenant>,
    /// Set when the guest asked for more than it may have.
    pub hit: Option<MemoryHit>,
}

impl MemoryCap {
    /// A cap of `limit` bytes, counted against `tenant`.
    pub fn new(limit: usize, tenant: Arc<Tenant>) -> Self {
        MemoryCap {
            limit,
            held: 0,
            tenant,
            hit: None,
        }
    }
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> Result<bool> {
        if desired > self.limit || maximum.is_some_and(|max| desired > max) {
            self.hit = Some(MemoryHit::Plugin);
            // Trapping here, rather than failing the grow, stops the guest at the real cause.
            wasmtime::bail!("memory limit: the plugin asked for {desired} bytes");
        }
        let more = desired.saturating_sub(current) as u64;
        if let Err(quota) = self.tenant.grow_memory(more) {
            self.hit = Some(MemoryHit::Tenant(quota.clone()));
            return Err(wasmtime::Error::new(quota));
        }
        self.held += more as usize;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> Result<bool> {
        Ok(maximum.is_none_or(|max| desired <= max))
    }
}

impl Drop for MemoryCap {
    fn drop(&mut self) {
        self.tenant.release_memory(self.held as u64);
    }
}

/// Counts an instance against its tenant for as long as it lives.
pub struct InstanceSlot(Arc<Tenant>);

impl InstanceSlot {
    /// Takes a slot, or says which quota is full.
    pub fn take(tenant: &Arc<Tenant>) -> Result<Self, QuotaExceeded> {
        tenant.add_instance()?;
        Ok(InstanceSlot(tenant.clone()))
    }
}

impl Drop for InstanceSlot {
    fn drop(&mut self) {
        self.0.remove_instance();
    }
}

/// The CPU budget of the call in progress, in epoch ticks the plugin spent running. A tick
/// counts when it passes while the plugin runs; time spent yielded to other tasks, or awaiting
/// an outbound call, is not counted.
pub struct CallClock {
    /// Ticks the call has run through.
    pub ticks_used: u64,
    /// Ticks it may run through.
    pub budget_ticks: u64,
}

/// What one call may still add to the headers.
pub struct EditBudget {
    edits: u32,
    bytes: usize,
}

impl EditBudget {
    /// A full budget.
    pub fn full() -> Self {
        EditBudget {
            edits: MAX_HEADER_EDITS,
            bytes: MAX_HEADER_BYTES,
        }
    }

    /// Spends one edit of `name: value`, or fails the call past the budget.
    pub(super) fn spend(&mut self, name: &str, value: &str) -> Result<()> {
        let size = name.len() + value.len();
        if self.edits == 0 || size > self.bytes {
            return Err(wasmtime::Error::new(LimitExceeded(format!(
                "a call may set or add at most {MAX_HEADER_EDITS} headers and {MAX_HEADER_BYTES} bytes of them"
            ))));
        }
        self.edits -= 1;
        self.bytes -= size;
        Ok(())
    }
}

/// The data of one instance's store.
pub struct InstanceState {
    /// WASI's resources the guest holds.
    pub table: ResourceTable,
    /// The request the call in progress filters, reached by the guest as [`REQUEST_REP`].
    /// Kept here rather than in `table`: a table entry is a fresh box and a downcast per call.
    pub request: Option<Box<RequestView>>,
    /// The response the call in progress filters, reached by the guest as [`RESPONSE_REP`].
    pub response: Option<Box<ResponseView>>,
    /// The request as it was before the call in progress first edited it, to undo its edits
    /// if the call fails. Taken at the first edit, so that a call that edits nothing copies
    /// nothing.
    pub request_before: Option<RequestBefore>,
    /// The response as it was before the call in progress first edited it.
    pub response_before: Option<ResponseBefore>,
    /// WASI with nothing reachable: no files, no sockets, no environment, no arguments. Built
    /// at the instance's first WASI call: most plugins make none, and building one costs a
    /// random seed from the OS.
    wasi: Option<WasiCtx>,
    /// The same WASI for a proxy-wasm filter, which imports preview 1; built as lazily.
    wasi_p1: Option<wasmtime_wasi::p1::WasiP1Ctx>,
    /// A proxy-wasm filter's contexts, calls and buffers; `None` for a component.
    pub filter: Option<Box<super::proxy_wasm::state::FilterState>>,
    /// The memory cap.
    pub memory: MemoryCap,
    /// The CPU budget of the call in progress.
    pub clock: CallClock,
    /// What the call in progress may still add to headers.
    pub edits: EditBudget,
    scope: Arc<PluginScope>,
    _slot: InstanceSlot,
}

impl InstanceState {
    /// State for a new instance of the plugin in `scope`.
    pub fn new(
        scope: Arc<PluginScope>,
        memory_limit: usize,
        budget_ticks: u64,
        slot: InstanceSlot,
    ) -> Self {
        InstanceState {
            table: ResourceTable::new(),
            request: None,
            response: None,
            request_before: None,
            response_before: None,
            wasi: None,
            wasi_p1: None,
            filter: None,
            memory: MemoryCap::new(memory_limit, scope.tenant.clone()),
            clock: CallClock {
                ticks_used: 0,
                budget_ticks,
            },
            edits: EditBudget::full(),
            scope,
            _slot: slot,
        }
    }

    /// The plugin's name.
    pub fn plugin_name(&self) -> &str {
        &self.scope.name
    }

    /// The plugin's tenant's name.
    pub fn tenant_name(&self) -> &str {
        self.scope.tenant.name()
    }

    /// The plugin's grants.
    pub fn grants(&self) -> &Grants {
        &self.scope.grants
    }

    /// The client for outbound calls.
    pub fn callouts(&self) -> Callouts {
        self.scope.callouts.clone()
    }

    /// The plugin's kv: the store, its namespace, its tenant, and Redis when it lives there.
    pub fn kv_scope(&self) -> (&KvStore, &Arc<str>, &Arc<Tenant>) {
        (&self.scope.kv, &self.scope.namespace, &self.scope.tenant)
    }

    /// The Redis store behind the kv, when the entry puts it there: an unreachable one is
    /// the error that fails the call.
    pub fn kv_redis(&self) -> Option<Result<Arc<RedisStore>>> {
        self.redis()
    }

    /// Admits a metric name against the plugin's bound on distinct names.
    pub fn admit_metric(&self, name: &str) -> Result<()> {
        if name.is_empty() || name.len() > 64 {
            return Err(wasmtime::Error::new(LimitExceeded(
                "a metric name must be 1 to 64 bytes".into(),
            )));
        }
        let mut names = self.scope.counter_names.lock().expect("counter names lock");
        if !names.contains(name) {
            if names.len() >= MAX_COUNTER_NAMES {
                return Err(wasmtime::Error::new(LimitExceeded(format!(
                    "a plugin may create at most {MAX_COUNTER_NAMES} metrics"
                ))));
            }
            names.insert(name.to_owned());
        }
        Ok(())
    }

    /// The gateway's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.scope.metrics
    }

    /// WASI preview 1, for a filter: as sealed as a component's.
    pub fn wasi_p1(&mut self) -> &mut wasmtime_wasi::p1::WasiP1Ctx {
        let grants = &self.scope.grants;
        self.wasi_p1
            .get_or_insert_with(|| sealed_wasi_builder(grants).build_p1())
    }

    /// Writes a plugin's log line at `level`, cut to the longest line allowed.
    pub fn log_line(&self, level: &str, mut message: String) {
        if message.len() > MAX_LOG_LINE {
            let mut cut = MAX_LOG_LINE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push('…');
        }
        if let Some(capture) = &self.scope.log_capture {
            capture
                .lock()
                .expect("log capture lock")
                .push((level.to_owned(), message.clone()));
        }
        let plugin = &*self.scope.name;
        let tenant = self.scope.tenant.name();
        match level {
            "trace" => tracing::trace!(target: "weir::plugin", plugin, tenant, "{message}"),
            "debug" => tracing::debug!(target: "weir::plugin", plugin, tenant, "{message}"),
            "info" => tracing::info!(target: "weir::plugin", plugin, tenant, "{message}"),
            "warn" => tracing::warn!(target: "weir::plugin", plugin, tenant, "{message}"),
            _ => tracing::error!(target: "weir::plugin", plugin, tenant, "{message}"),
        }
    }

    /// Resets the per-call budgets before a call.
    pub fn begin_call(&mut self) {
        self.clock.ticks_used = 0;
        self.edits = EditBudget::full();
        self.request_before = None;
        self.response_before = None;
    }

    /// The request `handle` names, which exists only while a call filters it.
    fn request(&self, handle: &Resource<RequestView>) -> Result<&RequestView> {
        match &self.request {
            Some(request) if handle.rep() == REQUEST_REP => Ok(request),
            _ => Err(wasmtime::Error::new(StaleHandle("request"))),
        }
    }

    /// The request `handle` names, to edit; the first edit of a call keeps what it was.
    fn request_mut(&mut self, handle: &Resource<RequestView>) -> Result<&mut RequestView> {
        match &mut self.request {
            Some(request) if handle.rep() == REQUEST_REP => {
                if self.request_before.is_none() {
                    self.request_before = Some(request.before_edits());
                }
                Ok(request)
            }
            _ => Err(wasmtime::Error::new(StaleHandle("request"))),
        }
    }

    /// The response `handle` names, which exists only while a call filters it.
    fn response(&self, handle: &Resource<ResponseView>) -> Result<&ResponseView> {
        match &self.response {
            Some(response) if handle.rep() == RESPONSE_REP => Ok(response),
            _ => Err(wasmtime::Error::new(StaleHandle("response"))),
        }
    }

    /// The response `handle` names, to edit; the first edit of a call keeps what it was.
    fn response_mut(&mut self, handle: &Resource<ResponseView>) -> Result<&mut ResponseView> {
        match &mut self.response {
            Some(response) if handle.rep() == RESPONSE_REP => {
                if self.response_before.is_none() {
                    self.response_before = Some(response.before_edits());
                }
                Ok(response)
            }
            _ => Err(wasmtime::Error::new(StaleHandle("response"))),
        }
    }
}

/// The handle by which a call's guest reaches its request.
pub const REQUEST_REP: u32 = 1;
/// The handle by which a call's guest reaches its response.
pub const RESPONSE_REP: u32 = 2;

/// A guest named a request or response that no call in progress filters: it traps.
#[derive(Debug, thiserror::Error)]
#[error("the plugin used a {0} handle outside the call that lent it")]
pub struct StaleHandle(&'static str);

impl WasiView for InstanceState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        let grants = &self.scope.grants;
        WasiCtxView {
            ctx: self.wasi.get_or_insert_with(|| sealed_wasi(grants)),
            table: &mut self.table,
        }
    }
}

/// WASI with nothing reachable but what `grants` allow.
fn sealed_wasi(grants: &Grants) -> WasiCtx {
    sealed_wasi_builder(grants).build()
}

fn sealed_wasi_builder(grants: &Grants) -> wasmtime_wasi::WasiCtxBuilder {
    let mut wasi = WasiCtx::builder();
    // No preopened directory, and no network even when `runtime` links the interfaces.
    wasi.allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false);
    if grants.wasi.contains(&WasiGrant::Stdio) {
        // The gateway's stderr is its log; stdout may carry the access log.
        wasi.stdout(std::io::stderr()).stderr(std::io::stderr());
    }
    wasi
}

impl log::Host for InstanceState {
    fn write(&mut self, level: log::Level, message: String) -> Result<()> {
        let name = match level {
            log::Level::Trace => "trace",
            log::Level::Debug => "debug",
            log::Level::Info => "info",
            log::Level::Warn => "warn",
            log::Level::Error => "error",
        };
        self.log_line(name, message);
        Ok(())
    }
}

static PROCESS_START: LazyLock<Instant> = LazyLock::new(Instant::now);

impl clock::Host for InstanceState {
    fn now_ms(&mut self) -> Result<u64> {
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Ok(u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX))
    }

    fn monotonic_ns(&mut self) -> Result<u64> {
        Ok(u64::try_from(PROCESS_START.elapsed().as_nanos()).unwrap_or(u64::MAX))
    }
}

fn check_key(key: &str) -> Result<()> {
    if key.len() > MAX_KV_KEY {
        return Err(wasmtime::Error::new(LimitExceeded(format!(
            "a kv key of {} bytes is over the {MAX_KV_KEY}-byte limit",
            key.len()
        ))));
    }
    Ok(())
}

fn ttl(ms: Option<u64>) -> Option<Duration> {
    ms.map(Duration::from_millis)
}

impl InstanceState {
    /// The Redis store, when this plugin's kv lives there.
    fn redis(&self) -> Option<Result<Arc<RedisStore>>> {
        (self.scope.kv_backend == KvBackend::Redis).then(|| {
            self.scope
                .redis
                .current()
                .map_err(|e| self.kv_unavailable(e))
        })
    }

    /// Counts an unreachable kv backend and turns it into the error that fails the call.
    fn kv_unavailable(&self, error: KvUnavailable) -> wasmtime::Error {
        let scope = &self.scope;
        scope
            .metrics
            .kv_unavailable(&scope.name, scope.tenant.name(), "redis")
            .inc();
        tracing::warn!(plugin = %scope.name, tenant = scope.tenant.name(), "{error}");
        wasmtime::Error::new(error)
    }
}

impl kv::Host for InstanceState {
    async fn get(&mut self, key: String) -> Result<Option<Vec<u8>>> {
        check_key(&key)?;
        let scope = &self.scope;
        if let Some(redis) = self.redis() {
            return redis?
                .get(&scope.namespace, &key)
                .await
                .map_err(|e| self.kv_unavailable(e));
        }
        Ok(scope.kv.get(&scope.namespace, &key).map(|v| v.to_vec()))
    }

    async fn set(&mut self, key: String, value: Vec<u8>, ttl_ms: Option<u64>) -> Result<()> {
        check_key(&key)?;
        if value.len() > MAX_KV_VALUE {
            return Err(wasmtime::Error::new(LimitExceeded(format!(
                "a kv value of {} bytes is over the {MAX_KV_VALUE}-byte limit",
                value.len()
            ))));
        }
        let scope = &self.scope;
        if let Some(redis) = self.redis() {
            return redis?
                .set(&scope.namespace, &key, &value, ttl(ttl_ms))
                .await
                .map_err(|e| self.kv_unavailable(e));
        }
        scope
            .kv
            .set(&scope.namespace, &key, &value, ttl(ttl_ms), &scope.tenant)
            .map_err(wasmtime::Error::new)
    }

    async fn delete(&mut self, key: String) -> Result<()> {
        check_key(&key)?;
        let scope = &self.scope;
        if let Some(redis) = self.redis() {
            return redis?
                .delete(&scope.namespace, &key)
                .await
                .map_err(|e| self.kv_unavailable(e));
        }
        scope.kv.delete(&scope.namespace, &key);
        Ok(())
    }

    async fn incr(
        &mut self,
        key: String,
        delta: i64,
        ttl_ms: Option<u64>,
    ) -> Result<Result<i64, String>> {
        check_key(&key)?;
        let scope = &self.scope;
        let counted = match self.redis() {
            Some(redis) => redis?
                .incr(&scope.namespace, &key, delta, ttl(ttl_ms))
                .await
                .map_err(|e| self.kv_unavailable(e))?,
            None => scope
                .kv
                .incr(&scope.namespace, &key, delta, ttl(ttl_ms), &scope.tenant),
        };
        match counted {
            Ok(value) => Ok(Ok(value)),
            Err(KvError::Quota(quota)) => Err(wasmtime::Error::new(quota)),
            Err(other) => Ok(Err(other.to_string())),
        }
    }
}

impl kv_scope::Host for InstanceState {
    fn shared(&mut self) -> Result<bool> {
        Ok(self.scope.kv_backend == KvBackend::Redis)
    }
}

impl metrics::Host for InstanceState {
    fn counter_add(&mut self, name: String, value: u64) -> Result<()> {
        self.admit_metric(&name)?;
        let labels = PluginEventLabels {
            plugin: self.scope.name.to_string(),
            name,
        };
        self.scope
            .metrics
            .plugin_events
            .get_or_create(&labels)
            .inc_by(value);
        Ok(())
    }
}

impl http_client::Host for InstanceState {
    async fn send(
        &mut self,
        request: http_client::OutgoingRequest,
    ) -> Result<Result<http_client::IncomingResponse, String>> {
        let Some(grant) = self.scope.grants.http.clone() else {
            return Ok(Err("this plugin has no http grant".into()));
        };
        // The call joins the request's trace: a span of its own, under the plugin call's.
        let trace = self.request.as_deref_mut().and_then(outbound_trace);
        let started = std::time::SystemTime::now();
        let method = request.method.clone();
        // While this awaits, the plugin does not run, so no tick is counted against it.
        let answered = self
            .scope
            .callouts
            .send(&grant, request, trace.map(|(context, _)| context))
            .await;
        if let Some((context, parent)) = trace
            && let Some(notes) = self.request.as_deref_mut().and_then(|r| r.notes.as_mut())
        {
            let mut span = crate::spans::SpanRecord::ending_now(
                format!("plugin call {method}"),
                crate::spans::Kind::Client,
                context.span_id,
                Some(parent),
                started,
            );
            span.set("http.request.method", method);
            match &answered {
                Ok(response) => span.set("http.response.status_code", i64::from(response.status)),
                Err(_) => span.failed = Some("the call failed".into()),
            }
            notes.push_outbound(span);
        }
        Ok(answered)
    }
}

/// The trace context an outbound call carries, and the span it is a child of: the plugin
/// call's when the request's spans are recorded (the call then gets a span id of its own),
/// or the gateway's.
fn outbound_trace(
    request: &mut RequestView,
) -> Option<(crate::edge::trace::TraceContext, [u8; 8])> {
    let mut context = request.trace?;
    let parent = context.span_id;
    if let Some(notes) = request.notes.as_mut() {
        context.span_id = notes.new_id();
    }
    Some((context, parent))
}

/// The most response edits one request may queue, across all of its plugins.
const MAX_QUEUED_EDITS: usize = 100;

impl InstanceState {
    /// Queues a checked response edit on the request, within the call's edit budget.
    fn queue(
        &mut self,
        req: &Resource<RequestView>,
        edit: Result<ResponseEdit, String>,
    ) -> Result<Result<(), String>> {
        let view = self.request_mut(req)?;
        if let Err(refused) = view.check_writable() {
            return Ok(Err(refused));
        }
        let edit = match edit {
            Ok(edit) => edit,
            Err(refused) => return Ok(Err(refused)),
        };
        if view.response_edits.len() >= MAX_QUEUED_EDITS {
            return Err(wasmtime::Error::new(LimitExceeded(format!(
                "a request may queue at most {MAX_QUEUED_EDITS} response edits"
            ))));
        }
        view.response_edits.push(edit);
        Ok(Ok(()))
    }
}

impl response_edits::Host for InstanceState {
    fn set_response_header(
        &mut self,
        req: Resource<RequestView>,
        name: String,
        value: String,
    ) -> Result<Result<(), String>> {
        self.edits.spend(&name, &value)?;
        let edit = ResponseEdit::new(ResponseEdit::Set, &name, &value);
        self.queue(&req, edit)
    }

    fn append_response_header(
        &mut self,
        req: Resource<RequestView>,
        name: String,
        value: String,
    ) -> Result<Result<(), String>> {
        self.edits.spend(&name, &value)?;
        let edit = ResponseEdit::new(ResponseEdit::Append, &name, &value);
        self.queue(&req, edit)
    }

    fn remove_response_header(
        &mut self,
        req: Resource<RequestView>,
        name: String,
    ) -> Result<Result<(), String>> {
        self.edits.spend(&name, "")?;
        let edit = ResponseEdit::remove(&name);
        self.queue(&req, edit)
    }
}

impl routing::Host for InstanceState {
    fn set_upstream(
        &mut self,
        req: Resource<RequestView>,
        id: String,
    ) -> Result<Result<(), String>> {
        let view = self.request_mut(&req)?;
        if let Err(refused) = view.check_writable() {
            return Ok(Err(refused));
        }
        if !view.directory.has_upstream(&id) {
            let mut shown = id;
            shown.truncate(128);
            return Ok(Err(format!("there is no upstream {shown:?}")));
        }
        view.upstream = Some(id);
        Ok(Ok(()))
    }
}

/// The most targets one request may be given.
const MAX_TARGETS: usize = 8;

impl fallbacks::Host for InstanceState {
    fn set_targets(
        &mut self,
        req: Resource<RequestView>,
        targets: Vec<fallbacks::Target>,
    ) -> Result<Result<(), String>> {
        let view = self.request_mut(&req)?;
        if let Err(refused) = view.check_writable() {
            return Ok(Err(refused));
        }
        if targets.is_empty() || targets.len() > MAX_TARGETS {
            return Ok(Err(format!(
                "{} targets: give 1 to {MAX_TARGETS}",
                targets.len()
            )));
        }
        let body_limit = view.body_limit;
        // Each header a target sets is an edit of the request, from the same budget.
        for (name, value) in targets.iter().flat_map(|target| &target.set_headers) {
            self.edits.spend(name, value)?;
        }
        let view = self.request_mut(&req)?;
        let mut checked = Vec::with_capacity(targets.len());
        for (index, target) in targets.into_iter().enumerate() {
            if !view.directory.has_upstream(&target.upstream) {
                let mut shown = target.upstream;
                shown.truncate(128);
                return Ok(Err(format!(
                    "target {index}: there is no upstream {shown:?}"
                )));
            }
            let target = Fallback::checked(
                target.upstream,
                &target.set_headers,
                target.path.as_deref(),
                target.body,
                body_limit,
            );
            match target {
                Ok(target) => checked.push(target),
                Err(refused) => return Ok(Err(format!("target {index}: {refused}"))),
            }
        }
        self.request_mut(&req)?.targets = checked;
        Ok(Ok(()))
    }

    fn answered_by(&mut self, req: Resource<RequestView>) -> Result<Option<u32>> {
        Ok(self.request(&req)?.answered_by)
    }
}

/// Whether `name` may be a label: 1 to `max` printable ASCII bytes.
fn label_fits(name: &str, max: usize) -> bool {
    !name.is_empty() && name.len() <= max && name.bytes().all(|b| b.is_ascii_graphic())
}

impl ai_metrics::Host for InstanceState {
    fn record_use(
        &mut self,
        req: Resource<RequestView>,
        used: ai_metrics::ModelUse,
    ) -> Result<Result<(), String>> {
        if !label_fits(&used.provider, 64) || !label_fits(&used.model, 128) {
            return Ok(Err(
                "the provider must be 1 to 64 and the model 1 to 128 printable bytes".into(),
            ));
        }
        let model = {
            let mut models = self.scope.ai_models.lock().expect("ai models lock");
            let pair = (used.provider.clone(), used.model);
            if models.contains(&pair) || models.len() < MAX_AI_MODELS {
                models.insert(pair.clone());
                pair.1
            } else {
                "other".to_owned()
            }
        };
        let view = self.request(&req)?;
        let route = view.route_id.to_string();
        let consumer = view.consumer.as_deref().unwrap_or_default().to_owned();
        let metrics = &self.scope.metrics;
        for (kind, tokens) in [
            ("prompt", used.prompt_tokens),
            ("completion", used.completion_tokens),
        ] {
            let labels = crate::metrics::AiTokenLabels {
                route: route.clone(),
                provider: used.provider.clone(),
                model: model.clone(),
                consumer: consumer.clone(),
                kind,
            };
            metrics.ai_tokens.get_or_create(&labels).inc_by(tokens);
        }
        if let Some(ms) = used.first_token_ms {
            let labels = crate::metrics::AiModelLabels {
                route,
                provider: used.provider,
                model,
            };
            // Milliseconds as seconds; u64 to f64 loses nothing below 2^53 ms.
            #[allow(clippy::cast_precision_loss)]
            let seconds = ms as f64 / 1000.0;
            metrics
                .ai_first_token
                .get_or_create(&labels)
                .observe(seconds);
        }
        Ok(Ok(()))
    }
}

impl span_notes::Host for InstanceState {
    fn set_attribute(
        &mut self,
        req: Resource<RequestView>,
        key: String,
        value: String,
    ) -> Result<Result<bool, String>> {
        let Some(notes) = self.request_mut(&req)?.notes.as_mut() else {
            return Ok(Ok(false));
        };
        Ok(notes
            .set_attribute(&key, &value)
            .map(|()| true)
            .map_err(|refused| refused.to_string()))
    }

    fn add_event(
        &mut self,
        req: Resource<RequestView>,
        name: String,
        attributes: Vec<(String, String)>,
    ) -> Result<Result<bool, String>> {
        let Some(notes) = self.request_mut(&req)?.notes.as_mut() else {
            return Ok(Ok(false));
        };
        Ok(notes
            .add_event(&name, &attributes)
            .map(|()| true)
            .map_err(|refused| refused.to_string()))
    }
}

impl consumer_credentials::Host for InstanceState {
    fn credential(
        &mut self,
        req: Resource<RequestView>,
        plugin: String,
    ) -> Result<Result<Option<String>, String>> {
        if !self.scope.grants.consumers.contains(&plugin) {
            tracing::debug!(plugin = %self.scope.name, section = %plugin, "credential read not granted");
            let mut shown = plugin;
            shown.truncate(64);
            return Ok(Err(format!(
                "this plugin's grant does not list the {shown:?} credentials"
            )));
        }
        let view = self.request(&req)?;
        let credential = view
            .consumer
            .as_deref()
            .and_then(|name| view.directory.consumers().get(name))
            .and_then(|consumer| consumer.credentials.get(&plugin))
            .map(|credential| serde_json::Value::Object(credential.clone()).to_string());
        Ok(Ok(credential))
    }
}

impl consumers::Host for InstanceState {
    fn lookup(
        &mut self,
        plugin: String,
        field: String,
        value: String,
    ) -> Result<Result<Option<consumers::Consumer>, String>> {
        if !self.scope.grants.consumers.contains(&plugin) {
            tracing::debug!(plugin = %self.scope.name, section = %plugin, "consumer lookup not granted");
            return Ok(Err(format!(
                "this plugin's grant does not list the {plugin:?} credentials"
            )));
        }
        // Only in on-request, where who made the request is decided.
        let Some(directory) = self
            .request
            .as_ref()
            .filter(|r| r.writable)
            .map(|r| &r.directory)
        else {
            return Ok(Err("consumers are looked up during a request".into()));
        };
        let found = match directory.consumers().lookup(&plugin, &field, &value) {
            Ok(found) => found,
            Err(ambiguous) => {
                // Two consumers share a credential: the operator's to fix, so say so.
                tracing::warn!(plugin = %self.scope.name, %ambiguous, "consumer lookup refused");
                return Ok(Err(ambiguous.to_string()));
            }
        };
        Ok(Ok(found.map(|consumer| consumers::Consumer {
            name: consumer.name.clone(),
            labels: consumer
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            credential: consumer
                .credentials
                .get(&plugin)
                .map(|c| serde_json::Value::Object(c.clone()).to_string())
                .unwrap_or_default(),
        })))
    }

    fn set_consumer(
        &mut self,
        req: Resource<RequestView>,
        name: String,
    ) -> Result<Result<(), String>> {
        let granted = &self.scope.grants.consumers;
        if granted.is_empty() {
            return Ok(Err("this plugin has no consumers grant".into()));
        }
        // Only a consumer the plugin could have found itself: one with a credential in a
        // section its grant lists. Any other (another tenant's, say) gets the same answer as a
        // consumer that does not exist, so that the refusal says nothing about who does.
        let found = self
            .request(&req)?
            .directory
            .consumers()
            .get(&name)
            .filter(|consumer| consumer.credentials.keys().any(|s| granted.contains(s)))
            .map(|consumer| Arc::<str>::from(consumer.name.as_str()));
        let view = self.request_mut(&req)?;
        if let Err(refused) = view.check_writable() {
            return Ok(Err(refused));
        }
        match found {
            Some(consumer) => {
                view.consumer = Some(consumer);
                Ok(Ok(()))
            }
            None => Ok(Err(
                "no consumer of that name has a credential this plugin's grant lists".into(),
            )),
        }
    }

    fn current(&mut self, req: Resource<RequestView>) -> Result<Option<String>> {
        Ok(self.request(&req)?.consumer.as_deref().map(str::to_owned))
    }
}

impl http::Host for InstanceState {}

impl http::HostRequest for InstanceState {
    fn id(&mut self, req: Resource<RequestView>) -> Result<String> {
        Ok(self.request(&req)?.id.clone())
    }

    fn set_id(&mut self, req: Resource<RequestView>, id: String) -> Result<()> {
        // An id goes into headers and logs: keep it short and printable.
        if !id.is_empty() && id.len() <= 200 && id.bytes().all(|b| b.is_ascii_graphic()) {
            self.request_mut(&req)?.id = id;
        }
        Ok(())
    }

    fn route_id(&mut self, req: Resource<RequestView>) -> Result<String> {
        Ok(self.request(&req)?.route_id.to_string())
    }

    fn client_ip(&mut self, req: Resource<RequestView>) -> Result<String> {
        Ok(self.request(&req)?.client_ip.to_string())
    }

    fn method(&mut self, req: Resource<RequestView>) -> Result<String> {
        Ok(self.request(&req)?.method.to_string())
    }

    fn set_method(
        &mut self,
        req: Resource<RequestView>,
        method: String,
    ) -> Result<Result<(), String>> {
        Ok(self.request_mut(&req)?.set_method(&method))
    }

    fn path(&mut self, req: Resource<RequestView>) -> Result<String> {
        Ok(self.request(&req)?.path.clone())
    }

    fn set_path(&mut self, req: Resource<RequestView>, path: String) -> Result<Result<(), String>> {
        Ok(self.request_mut(&req)?.set_path(&path))
    }

    fn query(&mut self, req: Resource<RequestView>) -> Result<Option<String>> {
        Ok(self.request(&req)?.query.clone())
    }

    fn set_query(
        &mut self,
        req: Resource<RequestView>,
        query: Option<String>,
    ) -> Result<Result<(), String>> {
        Ok(self.request_mut(&req)?.set_query(query.as_deref()))
    }

    fn header(&mut self, req: Resource<RequestView>, name: String) -> Result<Option<String>> {
        Ok(headers::get(&self.request(&req)?.headers, &name))
    }

    fn headers(&mut self, req: Resource<RequestView>) -> Result<Vec<(String, String)>> {
        Ok(headers::all(&self.request(&req)?.headers))
    }

    fn set_header(
        &mut self,
        req: Resource<RequestView>,
        name: String,
        value: String,
    ) -> Result<Result<(), String>> {
        self.edits.spend(&name, &value)?;
        let view = self.request_mut(&req)?;
        Ok(view
            .check_writable()
            .and_then(|_| headers::set(&mut view.headers, &name, &value)))
    }

    fn append_header(
        &mut self,
        req: Resource<RequestView>,
        name: String,
        value: String,
    ) -> Result<Result<(), String>> {
        self.edits.spend(&name, &value)?;
        let view = self.request_mut(&req)?;
        Ok(view
            .check_writable()
            .and_then(|_| headers::append(&mut view.headers, &name, &value)))
    }

    fn remove_header(&mut self, req: Resource<RequestView>, name: String) -> Result<()> {
        let view = self.request_mut(&req)?;
        if view.writable {
            headers::remove(&mut view.headers, &name);
        }
        Ok(())
    }

    fn body(&mut self, req: Resource<RequestView>) -> Result<Result<Vec<u8>, String>> {
        Ok(self.request(&req)?.body().map(|b| b.to_vec()))
    }

    fn set_body(
        &mut self,
        req: Resource<RequestView>,
        body: Vec<u8>,
    ) -> Result<Result<(), String>> {
        let view = self.request_mut(&req)?;
        if let Err(refused) = view.check_writable().and_then(|_| view.body().map(drop)) {
            return Ok(Err(refused));
        }
        check_body_output(body.len(), view.body_limit)?;
        Ok(view.set_body(body))
    }

    fn get_var(&mut self, req: Resource<RequestView>, name: String) -> Result<Option<String>> {
        Ok(self.request(&req)?.vars.get(&name).cloned())
    }

    fn set_var(&mut self, req: Resource<RequestView>, name: String, value: String) -> Result<()> {
        self.edits.spend(&name, &value)?;
        self.request_mut(&req)?.vars.insert(name, value);
        Ok(())
    }

    fn drop(&mut self, req: Resource<RequestView>) -> Result<()> {
        // The host owns the request and takes it back after each call; a guest drop is a no-op.
        let _ = req;
        Ok(())
    }
}

/// A body written past the plugin's bound fails the call (rather than being cut).
fn check_body_output(len: usize, limit: u64) -> Result<()> {
    if len as u64 > limit {
        return Err(wasmtime::Error::new(LimitExceeded(format!(
            "a body of {len} bytes is over the plugin's max_body_bytes of {limit}"
        ))));
    }
    Ok(())
}

impl http::HostResponse for InstanceState {
    fn status(&mut self, resp: Resource<ResponseView>) -> Result<u16> {
        Ok(self.response(&resp)?.status.as_u16())
    }

    fn set_status(
        &mut self,
        resp: Resource<ResponseView>,
        status: u16,
    ) -> Result<Result<(), String>> {
        Ok(self.response_mut(&resp)?.set_status(status))
    }

    fn header(&mut self, resp: Resource<ResponseView>, name: String) -> Result<Option<String>> {
        Ok(headers::get(&self.response(&resp)?.headers, &name))
    }

    fn headers(&mut self, resp: Resource<ResponseView>) -> Result<Vec<(String, String)>> {
        Ok(headers::all(&self.response(&resp)?.headers))
    }

    fn set_header(
        &mut self,
        resp: Resource<ResponseView>,
        name: String,
        value: String,
    ) -> Result<Result<(), String>> {
        self.edits.spend(&name, &value)?;
        Ok(headers::set(
            &mut self.response_mut(&resp)?.headers,
            &name,
            &value,
        ))
    }

    fn append_header(
        &mut self,
        resp: Resource<ResponseView>,
        name: String,
        value: String,
    ) -> Result<Result<(), String>> {
        self.edits.spend(&name, &value)?;
        Ok(headers::append(
            &mut self.response_mut(&resp)?.headers,
            &name,
            &value,
        ))
    }

    fn remove_header(&mut self, resp: Resource<ResponseView>, name: String) -> Result<()> {
        headers::remove(&mut self.response_mut(&resp)?.headers, &name);
        Ok(())
    }

    fn body(&mut self, resp: Resource<ResponseView>) -> Result<Result<Vec<u8>, String>> {
        Ok(self.response(&resp)?.body().map(|b| b.to_vec()))
    }

    fn set_body(
        &mut self,
        resp: Resource<ResponseView>,
        body: Vec<u8>,
    ) -> Result<Result<(), String>> {
        let view = self.response_mut(&resp)?;
        if let Err(refused) = view.body().map(drop) {
            return Ok(Err(refused));
        }
        check_body_output(body.len(), view.body_limit)?;
        Ok(view.set_body(body))
    }

    fn drop(&mut self, resp: Resource<ResponseView>) -> Result<()> {
        let _ = resp;
        Ok(())
    }
}
