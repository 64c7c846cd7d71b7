//! Warm instances of one plugin module with one config, and the calls into each phase.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_queue::ArrayQueue;
use wasmtime::component::Resource;
use wasmtime::{Engine, Store, Trap, UpdateDeadline};

use super::bindings::exports::weir::plugin0_1_0::filter::{Guest as Filter, Wants};
use super::bindings::exports::weir::plugin0_3_0::chunks::{ChunkAction, Guest as Chunks};
use super::health::Admission;
use super::host::{
    InstanceSlot, InstanceState, LimitExceeded, MAX_HEADER_BYTES, MAX_HEADER_EDITS, MemoryHit,
    NotGranted, PluginScope, REQUEST_REP, RESPONSE_REP,
};
pub use super::proxy_wasm::ChunkOutcome;
use super::proxy_wasm::abi::StreamType;
use super::proxy_wasm::{self, FilterExports, FilterFault, FilterShared, FilterState, Settled};
use super::tenant::QuotaExceeded;
use super::{Action, EPOCH_TICK, GuestModule, Module, PluginError, PluginInfo, Reply, Summary};
use crate::config::{Isolation, Limits};
use crate::kv::KvUnavailable;
use crate::view::{RequestBefore, RequestView, ResponseBefore, ResponseView};

/// Idle instances kept per pool; instances beyond this are dropped after use.
const MAX_IDLE: usize = 64;
/// The most shared slots a pooled filter's pool opens: another opens only when a new request
/// finds every one busy (a call running on another worker, or a filter waiting on its http
/// call), and requests wait their turn beyond this.
const MAX_SHARED_SLOTS: usize = 16;

/// What a proxy-wasm filter is called for: every phase but the whole bodies, which it is not
/// offered yet.
const FILTER_WANTS: Wants = Wants {
    on_request: true,
    on_response: true,
    on_log: true,
    request_body: false,
    response_body: false,
};

/// One live instance and its store.
struct PluginInstance {
    store: Store<InstanceState>,
    guest: Guest,
    /// Which of its pool's instances this is, counting from 1.
    serial: u64,
}

/// What an instance's calls go through, by kind.
enum Guest {
    /// A component's instance, its filter interface and (for a 0.3.0 plugin) its chunk hooks.
    Component {
        instance: wasmtime::component::Instance,
        filter: Filter,
        chunks: Option<Chunks>,
    },
    /// A proxy-wasm filter's exports, shared: each call takes them out of the instance, and a
    /// typed function's clone registers its type again.
    Filter(Arc<FilterExports>),
}

/// Where one request's calls to a plugin go, when its phases share an instance.
///
/// Under `isolation: per-request`, a slot of the request's own: its instance is made fresh
/// for the request's first call and dropped with the request (or once the plugin has no phase
/// left to run), so that state carries from `on-request` to `on-log` and never to another
/// request. A pooled proxy-wasm filter's request is sent to one of its pool's shared slots
/// instead, whose instance holds many requests' HTTP contexts at once, as Envoy's VM per worker
/// does; `context` says which one is this request's. Pooled components leave it empty.
///
/// A filter's body stream shares it (see [`Bound::share`]). Each call holds the slot from
/// checkout to checkin, so that a body callback and a phase of the same request (or, in a
/// shared slot, of another request) take turns rather than miss each other.
#[derive(Default)]
pub struct Bound {
    slot: Slot,
    context: Option<BoundContext>,
}

/// A place for one instance, held by one call at a time.
type Slot = Arc<tokio::sync::Mutex<Option<PluginInstance>>>;

/// A bound instance's place, held for one call.
type Held = tokio::sync::OwnedMutexGuard<Option<PluginInstance>>;

/// A request's HTTP context in a filter instance.
#[derive(Clone, Copy, Debug)]
struct BoundContext {
    /// The instance that holds it: a replaced instance never knew it.
    serial: u64,
    /// The context's id in that instance.
    id: u32,
    /// The response status, once the response phase has seen it.
    response_code: Option<u16>,
}

impl Bound {
    /// The same binding, for a body stream that calls the request's instance.
    pub fn share(&self) -> Bound {
        Bound {
            slot: self.slot.clone(),
            context: self.context,
        }
    }

    /// Waits for the binding's turn.
    async fn hold(&self) -> Held {
        match self.slot.clone().try_lock_owned() {
            Ok(held) => held,
            Err(_) => self.slot.clone().lock_owned().await,
        }
    }
}

impl std::fmt::Debug for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let bound = self.slot.try_lock().map(|slot| slot.is_some());
        f.debug_struct("Bound")
            .field("instance", &bound.ok())
            .field("context", &self.context)
            .finish()
    }
}

/// The most bytes a chunk hook may replace a chunk of `len` bytes with: 64 KiB more, or twice
/// as many, whichever is more, so that a hook can grow a stream but not flood it.
fn grown_chunk_bound(len: usize) -> usize {
    len.saturating_mul(2).max(len.saturating_add(64 << 10))
}

/// Holds `bound` for a call, if the caller keeps one.
async fn hold(bound: Option<&Bound>) -> Option<Held> {
    match bound {
        Some(bound) => Some(bound.hold().await),
        None => None,
    }
}

/// How a filter's stream callback ended, after any pause: the instance and the outcome, or,
/// when the instance was lost meanwhile, what the call had lent it.
type Waited = Result<(PluginInstance, wasmtime::Result<Option<Reply>>), Lent>;

/// What a call lends its instance's store, taken out while a paused filter's instance
/// serves other requests.
struct Lent {
    request: Option<Box<RequestView>>,
    request_before: Option<RequestBefore>,
    response: Option<Box<ResponseView>>,
    response_before: Option<ResponseBefore>,
}

impl Lent {
    fn take(state: &mut InstanceState) -> Lent {
        Lent {
            request: state.request.take(),
            request_before: state.request_before.take(),
            response: state.response.take(),
            response_before: state.response_before.take(),
        }
    }

    fn put(self, state: &mut InstanceState) {
        state.request = self.request;
        state.request_before = self.request_before;
        state.response = self.response;
        state.response_before = self.response_before;
    }
}

/// Which phase a call is, so that a bound instance is kept only while a later phase needs it.
#[derive(Clone, Copy)]
enum Phase {
    Request,
    Response,
    Log,
}

/// Instances of one module, each initialised with the same config.
pub struct PluginPool {
    engine: Engine,
    module: Arc<Module>,
    scope: Arc<PluginScope>,
    limits: Limits,
    isolation: Isolation,
    config: String,
    wants: Wants,
    /// Which bodies a 0.3.0 component follows chunk by chunk, by [`StreamType`].
    chunk_wants: [bool; 2],
    idle: ArrayQueue<PluginInstance>,
    /// A proxy-wasm filter's shared state; `None` for a component.
    filter: Option<Arc<FilterShared>>,
    /// Stops the control instance's task when the pool goes.
    control: std::sync::Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    /// A pooled filter's shared slots (see [`Bound`]).
    shared: std::sync::Mutex<Vec<Slot>>,
    /// The serial of the pool's last instance.
    serials: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for PluginPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginPool")
            .field("plugin", &self.scope.name())
            .field("module", &self.module.sha256)
            .field("config", &self.config)
            .finish()
    }
}

fn ticks(budget: Duration) -> u64 {
    (budget.as_millis() as u64)
        .div_ceil(EPOCH_TICK.as_millis() as u64)
        .max(1)
}

impl PluginPool {
    /// Creates the pool and its first instance; the plugin's schema (for a 0.2.0 plugin) and
    /// then its `init` validate `config` here. `config` is `json` as text, as `init` takes it.
    /// A filter's pool gets `filter`, what its instances share.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn new(
        engine: Engine,
        module: Arc<Module>,
        scope: Arc<PluginScope>,
        limits: Limits,
        isolation: Isolation,
        json: &serde_json::Value,
        config: String,
        filter: Option<Arc<FilterShared>>,
    ) -> Result<Self, PluginError> {
        let mut pool = Self::unstarted(engine, module, scope, limits, isolation, config);
        pool.filter = filter;
        let mut instance = pool.instantiate_bare().await?;
        if let Some(info) = pool.described(&mut instance).await? {
            info.validate(json).map_err(PluginError::Config)?;
        }
        pool.wants = pool.init(&mut instance).await?;
        pool.chunk_wants = pool.chunk_wants(&mut instance).await?;
        if isolation == Isolation::Pooled {
            let _ = pool.idle.push(instance);
        }
        Ok(pool)
    }

    /// A pool with no instance yet, which has not called `init`.
    fn unstarted(
        engine: Engine,
        module: Arc<Module>,
        scope: Arc<PluginScope>,
        limits: Limits,
        isolation: Isolation,
        config: String,
    ) -> Self {
        PluginPool {
            engine,
            module,
            scope,
            limits,
            isolation,
            config,
            wants: Wants {
                on_request: false,
                on_response: false,
                on_log: false,
                request_body: false,
                response_body: false,
            },
            chunk_wants: [false; 2],
            idle: ArrayQueue::new(MAX_IDLE),
            filter: None,
            control: std::sync::Mutex::new(None),
            shared: std::sync::Mutex::new(Vec::new()),
            serials: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// What `module` says of itself, asked on an instance that is then dropped (`described`
    /// keeps the answer on the module). A 0.1.0 plugin says nothing.
    pub(super) async fn describe(
        engine: Engine,
        module: Arc<Module>,
        scope: Arc<PluginScope>,
        limits: Limits,
    ) -> Result<Option<Arc<PluginInfo>>, PluginError> {
        let pool = Self::unstarted(
            engine,
            module,
            scope,
            limits,
            Isolation::PerRequest,
            String::new(),
        );
        let mut instance = pool.instantiate_bare().await?;
        pool.described(&mut instance).await
    }

    /// What the plugin says of itself: asked once per module, on its first instance, before
    /// any `init`. A 0.1.0 plugin says nothing.
    async fn described(
        &self,
        instance: &mut PluginInstance,
    ) -> Result<Option<Arc<PluginInfo>>, PluginError> {
        let (
            GuestModule::Component {
                describe: Some(indices),
                ..
            },
            Guest::Component {
                instance: component,
                ..
            },
        ) = (&self.module.guest, &instance.guest)
        else {
            return Ok(None);
        };
        let component = *component;
        let info = self
            .module
            .info
            .get_or_try_init(|| async {
                let describe = indices
                    .load(&mut instance.store, &component)
                    .map_err(|e| PluginError::Instantiate(format!("{e:#}")))?;
                self.arm(instance);
                let raw = describe
                    .call_describe(&mut instance.store)
                    .await
                    .map_err(|e| self.classify(e, &instance.store, PluginError::Trap))?;
                let info = PluginInfo::checked(raw)
                    .map_err(|reason| PluginError::Instantiate(format!("describe: {reason}")))?;
                Ok::<_, PluginError>(Some(Arc::new(info)))
            })
            .await?;
        Ok(info.clone())
    }

    /// The plugin's name.
    pub fn name(&self) -> &str {
        self.scope.name()
    }

    /// The plugin's tenant.
    pub fn tenant(&self) -> &str {
        self.scope.tenant().name()
    }

    /// What the plugin asked for in `init`.
    pub fn wants(&self) -> &Wants {
        &self.wants
    }

    /// Whether instances are pooled or made per request.
    pub fn isolation(&self) -> Isolation {
        self.isolation
    }

    /// Whether a request keeps one instance for all of its phases: under per-request
    /// isolation; for a proxy-wasm filter, whose HTTP context lives in one instance; and for a
    /// component with chunk hooks, whose state from `on-request` must reach its chunks.
    pub fn binds_instances(&self) -> bool {
        self.isolation == Isolation::PerRequest
            || self.filter.is_some()
            || self.chunk_wants.contains(&true)
    }

    /// The plugin's limits.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The module's sha256.
    pub fn sha256(&self) -> &str {
        &self.module.sha256
    }

    fn budget_ticks(&self) -> u64 {
        ticks(Duration::from_millis(self.limits.timeout_ms))
    }

    /// A new instance, initialised with the pool's config.
    async fn instantiate(&self) -> Result<PluginInstance, PluginError> {
        let mut instance = self.instantiate_bare().await?;
        self.init(&mut instance).await?;
        Ok(instance)
    }

    /// Calls `init` with the pool's config: what the plugin wants, or why it refused.
    async fn init(&self, instance: &mut PluginInstance) -> Result<Wants, PluginError> {
        self.arm(instance);
        let filter = match &instance.guest {
            Guest::Component { filter, .. } => filter,
            Guest::Filter(exports) => {
                let exports = Arc::clone(exports);
                return match proxy_wasm::start(&mut instance.store, &exports).await {
                    Ok(()) => Ok(FILTER_WANTS),
                    Err(e) => match e.downcast::<FilterFault>() {
                        Ok(fault) => Err(PluginError::Config(fault.to_string())),
                        Err(e) => Err(self.classify(e, &instance.store, PluginError::Trap)),
                    },
                };
            }
        };
        let init = filter.call_init(&mut instance.store, &self.config).await;
        match init {
            Ok(Ok(wants)) => Ok(wants),
            Ok(Err(reason)) => Err(PluginError::Config(reason)),
            Err(e) => Err(self.classify(e, &instance.store, PluginError::Trap)),
        }
    }

    /// Which bodies a 0.3.0 component follows chunk by chunk, asked once `init` has taken the
    /// config; none for an older component or a filter (whose body callbacks say it).
    async fn chunk_wants(&self, instance: &mut PluginInstance) -> Result<[bool; 2], PluginError> {
        self.arm(instance);
        let Guest::Component {
            chunks: Some(chunks),
            ..
        } = &instance.guest
        else {
            return Ok([false; 2]);
        };
        match chunks.call_wants_chunks(&mut instance.store).await {
            Ok(wants) => Ok([wants.request, wants.response]),
            Err(e) => Err(self.classify(e, &instance.store, PluginError::Trap)),
        }
    }

    /// A new instance, before `init`.
    async fn instantiate_bare(&self) -> Result<PluginInstance, PluginError> {
        let slot = InstanceSlot::take(self.scope.tenant())
            .map_err(|e| PluginError::Quota(e.to_string()))?;
        let memory_limit = usize::try_from(self.limits.memory_mb).unwrap_or(usize::MAX) << 20;
        let mut state =
            InstanceState::new(self.scope.clone(), memory_limit, self.budget_ticks(), slot);
        if let Some(shared) = &self.filter {
            state.filter = Some(Box::new(FilterState::new(shared.clone())));
        }
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| &mut state.memory);
        // At every tick a running plugin yields to the executor, so that a long call cannot
        // hold a worker thread; once it has run through its budget of ticks, it is interrupted.
        store.epoch_deadline_callback(|mut store| {
            let clock = &mut store.data_mut().clock;
            clock.ticks_used += 1;
            if clock.ticks_used >= clock.budget_ticks {
                Ok(UpdateDeadline::Interrupt)
            } else {
                Ok(UpdateDeadline::Yield(1))
            }
        });
        store.data_mut().begin_call();
        store.set_epoch_deadline(1);
        let guest = match &self.module.guest {
            GuestModule::Component {
                pre,
                filter,
                chunks,
                ..
            } => {
                let instance = match pre.instantiate_async(&mut store).await {
                    Ok(instance) => instance,
                    Err(e) => return Err(self.classify(e, &store, PluginError::Instantiate)),
                };
                let unloaded = |e: wasmtime::Error| PluginError::Instantiate(format!("{e:#}"));
                let filter = filter.load(&mut store, &instance).map_err(unloaded)?;
                let chunks = match chunks {
                    Some(chunks) => Some(chunks.load(&mut store, &instance).map_err(unloaded)?),
                    None => None,
                };
                Guest::Component {
                    instance,
                    filter,
                    chunks,
                }
            }
            GuestModule::Filter { pre, .. } => {
                let instance = match pre.instantiate_async(&mut store).await {
                    Ok(instance) => instance,
                    Err(e) => return Err(self.classify(e, &store, PluginError::Instantiate)),
                };
                Guest::Filter(Arc::new(
                    FilterExports::load(&mut store, &instance)
                        .await
                        .map_err(PluginError::Instantiate)?,
                ))
            }
        };
        let serial = self
            .serials
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        Ok(PluginInstance {
            store,
            guest,
            serial,
        })
    }

    /// An instance for one call, unless the plugin is quarantined: the request's own under
    /// per-request isolation (a fresh one for its first call, or when the caller keeps no
    /// `bound`), else a warm one.
    async fn checkout(
        &self,
        bound: Option<&mut Option<PluginInstance>>,
    ) -> Result<PluginInstance, PluginError> {
        if let Admission::Quarantined(left) = self.scope.health().admit_at(Instant::now) {
            return Err(PluginError::Quarantined(left));
        }
        let kept = if self.binds_instances() {
            bound.and_then(Option::take)
        } else {
            None
        };
        let reused = match self.isolation {
            Isolation::PerRequest => kept,
            Isolation::Pooled => kept.or_else(|| self.idle.pop()),
        };
        let instance = match reused {
            Some(instance) => Ok(instance),
            // Boxed: instantiating is the cold path (or per-request isolation's), and its
            // future would otherwise make every call's future, moved whole, a kilobyte larger.
            None => Box::pin(self.instantiate()).await,
        };
        instance.map_err(|e| self.record(e))
    }

    /// Keeps a healthy instance after a call: with the request while a later phase of this
    /// plugin may run, or warm in the pool.
    fn checkin(
        &self,
        mut instance: PluginInstance,
        bound: Option<&mut Option<PluginInstance>>,
        phase: Phase,
    ) {
        if let Some(filter) = instance.store.data_mut().filter.as_mut() {
            // The request's context is the call's only: the next call may be another's.
            filter.http_context = None;
            filter.response_code = None;
            match (bound, phase, self.isolation) {
                // A shared instance stays in its slot; a request's own, until its log.
                (Some(bound), _, Isolation::Pooled) => *bound = Some(instance),
                (Some(bound), Phase::Request | Phase::Response, _) => *bound = Some(instance),
                (_, _, Isolation::Pooled) => {
                    let _ = self.idle.push(instance);
                }
                _ => {}
            }
            return;
        }
        // Chunk hooks run while a body streams, after the phase that began it.
        let chunks = self.chunk_wants.contains(&true);
        let later = match phase {
            Phase::Request => self.wants.on_response || self.wants.on_log || chunks,
            Phase::Response => self.wants.on_log || chunks,
            Phase::Log => false,
        };
        match (self.isolation, bound) {
            (Isolation::PerRequest, Some(bound)) if later => *bound = Some(instance),
            (Isolation::PerRequest, _) => {}
            // A pooled instance with chunk hooks stays the request's until its last call, so
            // that what `on-request` kept reaches the chunks, and no other request's does.
            (Isolation::Pooled, Some(bound)) if chunks && later => *bound = Some(instance),
            (Isolation::Pooled, _) => {
                // A full queue drops the instance; its slot returns to the engine's pool.
                let _ = self.idle.push(instance);
            }
        }
    }

    /// Whether a request's calls go to one of the pool's shared slots.
    fn shares_instances(&self) -> bool {
        self.filter.is_some() && self.isolation == Isolation::Pooled
    }

    /// The shared slot a new request's HTTP context goes to, held: the first one free, a new
    /// one while there are fewer than [`MAX_SHARED_SLOTS`], or else the turn of one of them.
    async fn free_slot(&self) -> Held {
        let busy = {
            let mut slots = self
                .shared
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for slot in slots.iter() {
                if let Ok(held) = slot.clone().try_lock_owned() {
                    return held;
                }
            }
            if slots.len() < MAX_SHARED_SLOTS {
                let slot = Slot::default();
                slots.push(slot.clone());
                return slot.try_lock_owned().expect("a new slot is held by no one");
            }
            let turn = self.serials.load(std::sync::atomic::Ordering::Relaxed) as usize;
            slots[turn % slots.len()].clone()
        };
        busy.lock_owned().await
    }

    /// For a filter's phase after the request's: whether `slot` holds the instance with the
    /// request's HTTP context, which then becomes the call's. `Err` when the context was lost
    /// with an instance that failed serving another request.
    fn resume_context(
        &self,
        slot: Option<&mut Option<PluginInstance>>,
        context: Option<BoundContext>,
    ) -> Result<bool, PluginError> {
        if self.filter.is_none() {
            return Ok(true);
        }
        // No context: the request phase failed (and its instance went) or never ran.
        let Some(context) = context else {
            return Ok(false);
        };
        match slot.and_then(|slot| slot.as_mut()) {
            Some(instance) if instance.serial == context.serial => {
                instance
                    .store
                    .data_mut()
                    .filter
                    .as_mut()
                    .expect("a filter instance has filter state")
                    .enter(context.id, context.response_code);
                Ok(true)
            }
            _ if self.shares_instances() => Err(PluginError::ContextLost),
            _ => Ok(false),
        }
    }

    /// Waits out a filter's pause. Each http call it made is sent with the instance back in
    /// its slot, serving other requests' calls meanwhile, and answered once this request has
    /// its turn again. `Err` gives back what the call lent when the instance was lost while
    /// the call was out (it failed serving another request).
    async fn wait_out(
        &self,
        held: &mut Option<Held>,
        instance: PluginInstance,
        exports: &FilterExports,
        settled: wasmtime::Result<Settled>,
        stream: StreamType,
    ) -> Waited {
        match settled {
            Ok(Settled::Done(reply)) => Ok((instance, Ok(reply))),
            Err(e) => Ok((instance, Err(e))),
            // Boxed: a pause is the rare case, and its wait (an http call) would otherwise make
            // every call's future, moved whole, that much larger.
            Ok(Settled::Waiting) => Box::pin(self.paused(held, instance, exports, stream)).await,
        }
    }

    /// [`Self::wait_out`]'s loop, from a pause until the filter goes on or answers.
    async fn paused(
        &self,
        held: &mut Option<Held>,
        mut instance: PluginInstance,
        exports: &FilterExports,
        stream: StreamType,
    ) -> Waited {
        loop {
            let serial = instance.serial;
            let state = instance.store.data_mut();
            let callouts = state.callouts();
            let lent = Lent::take(state);
            let filter = state
                .filter
                .as_mut()
                .expect("a filter instance has filter state");
            let context = filter
                .http_context
                .take()
                .expect("a paused request has its context");
            let response_code = filter.response_code;
            let mut calls = std::mem::take(&mut filter.calls);
            let call = calls.pop_front().expect("a paused filter made a call");
            let token = call.token;
            let (slot, kept) = match held.take() {
                Some(mut guard) => {
                    let slot = tokio::sync::OwnedMutexGuard::mutex(&guard).clone();
                    *guard = Some(instance);
                    (Some(slot), None)
                }
                None => (None, Some(instance)),
            };
            let response = proxy_wasm::send_call(&callouts, self.name(), call).await;
            instance = match (slot, kept) {
                (_, Some(kept)) => kept,
                (Some(slot), None) => {
                    let mut guard = slot.lock_owned().await;
                    let back = match guard.take() {
                        Some(back) if back.serial == serial => back,
                        other => {
                            *guard = other;
                            *held = Some(guard);
                            return Err(lent);
                        }
                    };
                    *held = Some(guard);
                    back
                }
                (None, None) => unreachable!("the instance is either kept or in its slot"),
            };
            let state = instance.store.data_mut();
            lent.put(state);
            let filter = state
                .filter
                .as_mut()
                .expect("a filter instance has filter state");
            filter.enter(context, response_code);
            filter.calls = calls;
            let settled = proxy_wasm::resume(
                &mut instance.store,
                exports,
                context,
                token,
                response,
                stream,
            )
            .await;
            match settled {
                Ok(Settled::Done(reply)) => return Ok((instance, Ok(reply))),
                Err(e) => return Ok((instance, Err(e))),
                Ok(Settled::Waiting) => {}
            }
        }
    }

    fn arm(&self, instance: &mut PluginInstance) {
        instance.store.data_mut().begin_call();
        instance.store.set_epoch_deadline(1);
    }

    /// Turns a wasmtime error into the plugin failure it stands for.
    fn classify(
        &self,
        error: wasmtime::Error,
        store: &Store<InstanceState>,
        otherwise: fn(String) -> PluginError,
    ) -> PluginError {
        if let Some(quota) = error.downcast_ref::<QuotaExceeded>() {
            return PluginError::Quota(quota.to_string());
        }
        if let Some(limit) = error.downcast_ref::<LimitExceeded>() {
            return PluginError::Limit(limit.0.clone());
        }
        if let Some(refused) = error.downcast_ref::<NotGranted>() {
            return PluginError::NotGranted(refused.to_string());
        }
        if let Some(fault) = error.downcast_ref::<FilterFault>() {
            return PluginError::Limit(fault.to_string());
        }
        if let Some(unavailable) = error.downcast_ref::<KvUnavailable>() {
            return PluginError::KvUnavailable(unavailable.to_string());
        }
        match &store.data().memory.hit {
            Some(MemoryHit::Plugin) => return PluginError::Memory(self.limits.memory_mb),
            Some(MemoryHit::Tenant(quota)) => return PluginError::Quota(quota.to_string()),
            None => {}
        }
        if matches!(error.downcast_ref::<Trap>(), Some(Trap::Interrupt)) {
            return PluginError::Timeout(self.limits.timeout_ms);
        }
        otherwise(format!("{error:#}"))
    }

    /// Counts a failure against the plugin's health, logs it, and hands it on.
    fn record(&self, failure: PluginError) -> PluginError {
        if failure.counts_against_plugin() && self.scope.health().failed(Instant::now()) {
            tracing::warn!(
                plugin = self.name(),
                tenant = self.tenant(),
                "plugin quarantined after repeated failures"
            );
            self.scope
                .metrics()
                .plugin_quarantines(self.name(), self.tenant())
                .inc();
        }
        tracing::debug!(plugin = self.name(), error = %failure, "plugin call failed");
        failure
    }

    /// Returns a healthy instance to the pool, or classifies the failure and drops it.
    fn settle<T>(
        &self,
        instance: PluginInstance,
        outcome: wasmtime::Result<T>,
        bound: Option<&mut Option<PluginInstance>>,
        phase: Phase,
    ) -> Result<T, PluginError> {
        match outcome {
            Ok(value) => {
                self.scope.health().succeeded();
                self.checkin(instance, bound, phase);
                Ok(value)
            }
            Err(e) => Err(self.record(self.classify(e, &instance.store, PluginError::Trap))),
        }
    }

    /// Calls `on-request`. The request comes back whatever happens; a failed instance is dropped.
    pub async fn on_request(
        &self,
        mut request: Box<RequestView>,
        mut bound: Option<&mut Bound>,
    ) -> (Box<RequestView>, Result<Action, PluginError>) {
        let mut held = match bound.as_deref_mut() {
            Some(bound) if self.shares_instances() => {
                let held = self.free_slot().await;
                bound.slot = tokio::sync::OwnedMutexGuard::mutex(&held).clone();
                Some(held)
            }
            bound => hold(bound.map(|bound| &*bound)).await,
        };
        let mut instance = match self.checkout(held.as_deref_mut()).await {
            Ok(instance) => instance,
            Err(e) => return (request, Err(e)),
        };
        request.body_access = self.wants.request_body;
        request.body_limit = self.limits.max_body_bytes;
        instance.store.data_mut().request = Some(request);
        self.arm(&mut instance);
        let outcome = match &instance.guest {
            Guest::Component { filter, .. } => {
                filter
                    .call_on_request(&mut instance.store, Resource::new_borrow(REQUEST_REP))
                    .await
            }
            Guest::Filter(exports) => {
                let exports = Arc::clone(exports);
                let settled = proxy_wasm::request_headers(&mut instance.store, &exports).await;
                let waited = self
                    .wait_out(&mut held, instance, &exports, settled, StreamType::Request)
                    .await;
                match waited {
                    Ok((back, outcome)) => {
                        instance = back;
                        outcome.map(|reply| reply.map_or(Action::Continue, Action::Respond))
                    }
                    Err(lent) => {
                        let mut request = lent.request.expect("the request was lent");
                        undo(&mut request, lent.request_before);
                        return (request, Err(self.record(PluginError::ContextLost)));
                    }
                }
            }
        };
        let serial = instance.serial;
        let state = instance.store.data_mut();
        let context = state.filter.as_ref().and_then(|filter| filter.http_context);
        let (mut request, before) = (take(&mut state.request), state.request_before.take());
        let outcome = self.settle(instance, outcome, held.as_deref_mut(), Phase::Request);
        if let Some(bound) = bound {
            // A failed call's instance went, and the context with it.
            bound.context = context.filter(|_| outcome.is_ok()).map(|id| BoundContext {
                serial,
                id,
                response_code: None,
            });
        }
        let outcome = outcome.and_then(|action| self.check_reply(action));
        if outcome.is_err() {
            undo(&mut request, before);
        }
        (request, outcome)
    }

    /// The most body bytes a filter may hold or write: its `max_body_bytes`.
    fn body_limit(&self) -> usize {
        usize::try_from(self.limits.max_body_bytes).unwrap_or(usize::MAX)
    }

    /// Runs a filter's response body callback over `body`, all of which has arrived, with
    /// `end_of_stream`, right after its headers callback; `body` becomes what it passed on.
    async fn whole_body(
        &self,
        instance: &mut PluginInstance,
        exports: &FilterExports,
        body: &mut Bytes,
    ) -> wasmtime::Result<()> {
        if !exports.reads_body(StreamType::Response) {
            return Ok(());
        }
        let stream = StreamType::Response;
        let limit = self.body_limit();
        let chunk = proxy_wasm::body_chunk(
            &mut instance.store,
            exports,
            stream,
            body.to_vec(),
            limit,
            true,
        );
        // At the end a filter cannot hold: what it had goes on.
        if let (ChunkOutcome::Pass(bytes), _) = chunk.await? {
            *body = bytes;
        }
        Ok(())
    }

    /// Whether this is a filter with a body callback for `stream`, or a component with a chunk
    /// hook it wants called for it.
    pub fn reads_body(&self, stream: StreamType) -> bool {
        match &self.module.guest {
            GuestModule::Filter { reads_body, .. } => reads_body[stream as usize],
            GuestModule::Component { .. } => self.chunk_wants[stream as usize],
        }
    }

    /// Whether this is a component with a chunk hook for `stream`: one that may change the
    /// body's length as it streams, so that the body's `content-length` cannot stand.
    pub fn hooks_chunks(&self, stream: StreamType) -> bool {
        match &self.module.guest {
            GuestModule::Filter { .. } => false,
            GuestModule::Component { .. } => self.chunk_wants[stream as usize],
        }
    }

    /// Whether this is a filter with a trailers callback for `stream`.
    pub fn reads_trailers(&self, stream: StreamType) -> bool {
        match &self.module.guest {
            GuestModule::Filter { reads_trailers, .. } => reads_trailers[stream as usize],
            GuestModule::Component { .. } => false,
        }
    }

    /// Whether this is a filter with a body or trailers callback for `stream`: a body it sees
    /// goes through it as it streams, chunk by chunk, then its trailers.
    pub fn follows_body(&self, stream: StreamType) -> bool {
        self.reads_body(stream) || self.reads_trailers(stream)
    }

    /// Runs a filter's body callback over `held` (what it held, then the new chunk) in the
    /// request's instance; a request with no context for it passes the bytes on untouched.
    pub async fn on_body_chunk(
        &self,
        bound: &Bound,
        stream: StreamType,
        held: Vec<u8>,
        end: bool,
    ) -> Result<(ChunkOutcome, Vec<u8>), PluginError> {
        if self.filter.is_none() {
            return self.component_chunk(bound, stream, held, end).await;
        }
        let limit = self.body_limit();
        let untouched = |held: Vec<u8>| (ChunkOutcome::Pass(held.into()), Vec::new());
        let call = async |store: &mut Store<InstanceState>, exports: &FilterExports, held| {
            proxy_wasm::body_chunk(store, exports, stream, held, limit, end).await
        };
        self.in_context(bound, held, untouched, call).await
    }

    /// Runs a component's chunk hook over `held` (what it held, then the new chunk) in the
    /// request's own instance, so that state carries from `on-request` to its chunks.
    async fn component_chunk(
        &self,
        bound: &Bound,
        stream: StreamType,
        held: Vec<u8>,
        end: bool,
    ) -> Result<(ChunkOutcome, Vec<u8>), PluginError> {
        let mut slot = bound.hold().await;
        let mut instance = self.checkout(Some(&mut *slot)).await?;
        self.arm(&mut instance);
        let Guest::Component {
            chunks: Some(chunks),
            ..
        } = &instance.guest
        else {
            self.checkin(instance, Some(&mut *slot), Phase::Response);
            return Ok((ChunkOutcome::Pass(held.into()), Vec::new()));
        };
        let call = match stream {
            StreamType::Request => {
                chunks
                    .call_on_request_chunk(&mut instance.store, &held, end)
                    .await
            }
            StreamType::Response => {
                chunks
                    .call_on_response_chunk(&mut instance.store, &held, end)
                    .await
            }
        };
        let action = match call {
            Ok(action) => action,
            Err(e) => {
                return Err(self.record(self.classify(e, &instance.store, PluginError::Trap)));
            }
        };
        self.scope.health().succeeded();
        // The response body's end is the request's last call unless `on-log` follows.
        let last = end && stream == StreamType::Response && !self.wants.on_log;
        let phase = if last { Phase::Log } else { Phase::Response };
        self.checkin(instance, Some(&mut *slot), phase);
        let outcome = match action {
            ChunkAction::Pass => (ChunkOutcome::Pass(held.into()), Vec::new()),
            ChunkAction::Replace(bytes) => {
                let bound = grown_chunk_bound(held.len());
                if bytes.len() > bound {
                    let grown = format!(
                        "chunk replaced with {} bytes, over the {bound} a chunk of {} may grow to",
                        bytes.len(),
                        held.len()
                    );
                    return Err(self.record(PluginError::Limit(grown)));
                }
                (ChunkOutcome::Pass(bytes.into()), Vec::new())
            }
            // At the end there is nothing left to wait for: what is held goes on.
            ChunkAction::Hold if end => (ChunkOutcome::Pass(held.into()), Vec::new()),
            ChunkAction::Hold if held.len() > self.body_limit() => {
                let limit = self.body_limit();
                let over = format!(
                    "held body of {} bytes, over its max_body_bytes of {limit}",
                    held.len()
                );
                return Err(self.record(PluginError::Limit(over)));
            }
            ChunkAction::Hold => (ChunkOutcome::Hold, held),
            ChunkAction::Refuse(reply) => {
                let reply = match self.check_reply(Action::Respond(reply))? {
                    Action::Respond(reply) => reply,
                    Action::Continue => unreachable!("checked as a reply"),
                };
                (ChunkOutcome::Refuse(reply), Vec::new())
            }
        };
        Ok(outcome)
    }

    /// Runs a filter's trailers callback over `trailers`, at the end of a body the filter
    /// followed, in the request's instance: the trailers as it left them.
    pub async fn on_trailers(
        &self,
        bound: &Bound,
        stream: StreamType,
        trailers: http::HeaderMap,
    ) -> Result<http::HeaderMap, PluginError> {
        let call = async |store: &mut Store<InstanceState>, exports: &FilterExports, trailers| {
            proxy_wasm::trailers(store, exports, stream, trailers).await
        };
        self.in_context(bound, trailers, |trailers| trailers, call)
            .await
    }

    /// Makes a body stream's `call` with `lent` in the request's context, in the instance
    /// `bound` holds; a request with no context there gets `untouched(lent)`.
    async fn in_context<T, R>(
        &self,
        bound: &Bound,
        lent: T,
        untouched: impl FnOnce(T) -> R,
        call: impl AsyncFnOnce(&mut Store<InstanceState>, &FilterExports, T) -> wasmtime::Result<R>,
    ) -> Result<R, PluginError> {
        let mut slot = bound.hold().await;
        if !self.resume_context(Some(&mut *slot), bound.context)? {
            return Ok(untouched(lent));
        }
        let Some(mut instance) = slot.take() else {
            return Ok(untouched(lent));
        };
        let Guest::Filter(exports) = &instance.guest else {
            *slot = Some(instance);
            return Ok(untouched(lent));
        };
        let exports = Arc::clone(exports);
        self.arm(&mut instance);
        match call(&mut instance.store, &exports, lent).await {
            Ok(outcome) => {
                self.scope.health().succeeded();
                self.checkin(instance, Some(&mut *slot), Phase::Response);
                Ok(outcome)
            }
            Err(e) => Err(self.record(self.classify(e, &instance.store, PluginError::Trap))),
        }
    }

    /// A reply is held to the same bounds as edits: a bounded number and size of headers, and
    /// a body no larger than the plugin's `max_body_bytes`.
    fn check_reply(&self, action: Action) -> Result<Action, PluginError> {
        let Action::Respond(reply) = &action else {
            return Ok(action);
        };
        let header_bytes: usize = reply.headers.iter().map(|(n, v)| n.len() + v.len()).sum();
        let failure =
            if reply.headers.len() > MAX_HEADER_EDITS as usize || header_bytes > MAX_HEADER_BYTES {
                format!(
                    "reply with {} headers ({header_bytes} bytes)",
                    reply.headers.len()
                )
            } else if reply.body.len() as u64 > self.limits.max_body_bytes {
                let limit = self.limits.max_body_bytes;
                format!(
                    "reply body of {} bytes, over its max_body_bytes of {limit}",
                    reply.body.len()
                )
            } else {
                return Ok(action);
            };
        Err(self.record(PluginError::Limit(failure)))
    }

    /// Calls `on-response` with the request as it was sent and the response to edit.
    ///
    /// `body` is the whole response body when it has all arrived: a filter with a response body
    /// callback then runs it over the body in the same call, right after its headers callback,
    /// and `body` becomes what it made of it.
    pub async fn on_response(
        &self,
        request: Box<RequestView>,
        mut response: Box<ResponseView>,
        bound: Option<&mut Bound>,
        body: Option<&mut Bytes>,
    ) -> (Box<RequestView>, Box<ResponseView>, Result<(), PluginError>) {
        let mut held = hold(bound.as_deref()).await;
        let context = bound.as_ref().and_then(|bound| bound.context);
        match self.resume_context(held.as_deref_mut(), context) {
            Ok(true) => {}
            Ok(false) => return (request, response, Ok(())),
            Err(lost) => return (request, response, Err(lost)),
        }
        let mut instance = match self.checkout(held.as_deref_mut()).await {
            Ok(instance) => instance,
            Err(e) => return (request, response, Err(e)),
        };
        response.body_access = self.wants.response_body;
        response.body_limit = self.limits.max_body_bytes;
        let state = instance.store.data_mut();
        state.request = Some(request);
        state.response = Some(response);
        self.arm(&mut instance);
        let outcome = match &instance.guest {
            Guest::Component { filter, .. } => {
                filter
                    .call_on_response(
                        &mut instance.store,
                        Resource::new_borrow(REQUEST_REP),
                        Resource::new_borrow(RESPONSE_REP),
                    )
                    .await
            }
            Guest::Filter(exports) => {
                let exports = Arc::clone(exports);
                let limit = self.body_limit();
                let headers = proxy_wasm::response_headers(
                    &mut instance.store,
                    &exports,
                    body.as_deref(),
                    limit,
                )
                .await;
                let (settled, passed) = match headers {
                    Ok((settled, passed)) => (Ok(settled), passed),
                    Err(e) => (Err(e), None),
                };
                let waited = self
                    .wait_out(&mut held, instance, &exports, settled, StreamType::Response)
                    .await;
                match waited {
                    Ok((back, outcome)) => {
                        instance = back;
                        match (outcome, passed, body) {
                            // The body went through in the headers' entry.
                            (Ok(None), Some(passed), Some(body)) => {
                                *body = passed;
                                Ok(())
                            }
                            // The headers paused first: the body goes through once they went on.
                            (Ok(None), None, Some(body)) => {
                                self.whole_body(&mut instance, &exports, body).await
                            }
                            (Ok(None), _, None) => Ok(()),
                            (Ok(Some(_)), ..) => Err(wasmtime::Error::new(LimitExceeded(
                                "a local response once the response has begun, which Weir \
                                 does not offer yet"
                                    .into(),
                            ))),
                            (Err(e), ..) => Err(e),
                        }
                    }
                    Err(lent) => {
                        let mut request = lent.request.expect("the request was lent");
                        let mut response = lent.response.expect("the response was lent");
                        undo(&mut request, lent.request_before);
                        if let Some(before) = lent.response_before {
                            response.undo_edits(before);
                        }
                        return (
                            request,
                            response,
                            Err(self.record(PluginError::ContextLost)),
                        );
                    }
                }
            }
        };
        let state = instance.store.data_mut();
        let response_code = state
            .filter
            .as_ref()
            .and_then(|filter| filter.response_code);
        let (mut request, mut response) = (take(&mut state.request), take(&mut state.response));
        let before = (state.request_before.take(), state.response_before.take());
        let outcome = self.settle(instance, outcome, held.as_deref_mut(), Phase::Response);
        if let Some(context) = bound.and_then(|bound| bound.context.as_mut()) {
            context.response_code = response_code;
        }
        if outcome.is_err() {
            undo(&mut request, before.0);
            if let Some(before) = before.1 {
                response.undo_edits(before);
            }
        }
        (request, response, outcome)
    }

    /// Calls `on-log`.
    pub async fn on_log(
        &self,
        request: Box<RequestView>,
        summary: &Summary,
        bound: Option<&mut Bound>,
    ) -> (Box<RequestView>, Result<(), PluginError>) {
        let mut held = hold(bound.as_deref()).await;
        let context = bound.and_then(|bound| bound.context.take());
        match self.resume_context(held.as_deref_mut(), context) {
            Ok(true) => {}
            // A lost context has nothing left to log.
            Ok(false) | Err(_) => return (request, Ok(())),
        }
        let mut instance = match self.checkout(held.as_deref_mut()).await {
            Ok(instance) => instance,
            Err(e) => return (request, Err(e)),
        };
        instance.store.data_mut().request = Some(request);
        self.arm(&mut instance);
        let outcome = match &instance.guest {
            Guest::Component { filter, .. } => {
                filter
                    .call_on_log(
                        &mut instance.store,
                        Resource::new_borrow(REQUEST_REP),
                        summary,
                    )
                    .await
            }
            Guest::Filter(exports) => {
                let exports = Arc::clone(exports);
                proxy_wasm::log(&mut instance.store, &exports, summary.status).await
            }
        };
        let state = instance.store.data_mut();
        let (mut request, before) = (take(&mut state.request), state.request_before.take());
        let outcome = self.settle(instance, outcome, held.as_deref_mut(), Phase::Log);
        if outcome.is_err() {
            undo(&mut request, before);
        }
        (request, outcome)
    }
}

impl PluginPool {
    /// For a proxy-wasm filter, starts the task that runs its control instance: the root
    /// context's ticks and queue callbacks, each under the CPU deadline. It ends with the pool.
    pub fn start_control(self: &Arc<Self>) {
        let Some(shared) = self.filter.clone() else {
            return;
        };
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        *self.control.lock().expect("control lock") = Some(stop);
        let pool = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut control: Option<PluginInstance> = None;
            let mut next_tick: Option<tokio::time::Instant> = None;
            loop {
                let period = *shared.tick.lock().expect("tick lock");
                next_tick = match (period, next_tick) {
                    (None, _) => None,
                    (Some(period), None) => Some(tokio::time::Instant::now() + period),
                    (Some(_), Some(at)) => Some(at),
                };
                let ticked = tokio::select! {
                    _ = &mut stopped => return,
                    () = shared.wake.notified() => false,
                    () = sleep_until(next_tick) => true,
                };
                let Some(pool) = pool.upgrade() else { return };
                if ticked {
                    // The next tick is a period away whatever this one does: a quarantined
                    // or failing filter is not retried in a tight loop.
                    next_tick = period.map(|p| tokio::time::Instant::now() + p);
                }
                if control.is_none() {
                    control = pool.checkout(None).await.ok();
                }
                let Some(mut instance) = control.take() else {
                    continue;
                };
                let Guest::Filter(exports) = &instance.guest else {
                    return;
                };
                let exports = Arc::clone(exports);
                pool.arm(&mut instance);
                let began = Instant::now();
                let outcome = if ticked {
                    proxy_wasm::tick(&mut instance.store, &exports).await
                } else {
                    let ready = shared.queues.ready_for(&shared.wake);
                    proxy_wasm::queues_ready(&mut instance.store, &exports, &ready).await
                };
                // Counted as calls of the plugin on the route `:root` (no route id has a
                // colon), so that a failing tick shows beside the routes' calls.
                let metrics = pool
                    .scope
                    .metrics()
                    .plugin(pool.name(), ":root", pool.tenant());
                match outcome {
                    Ok(()) => {
                        metrics.record(began.elapsed(), None);
                        control = Some(instance);
                    }
                    // A failed instance is dropped; the next event makes a new one, unless
                    // the plugin is quarantined by then.
                    Err(e) => {
                        let failure = pool.classify(e, &instance.store, PluginError::Trap);
                        metrics.record(began.elapsed(), Some(failure.kind()));
                        tracing::warn!(plugin = pool.name(), error = %failure, "filter's tick or queue callback failed");
                        pool.record(failure);
                    }
                }
            }
        });
    }
}

/// Waits until `at`, or forever when there is no tick.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Undoes the edits a failed call made to the request: a failed call leaves no trace, so that
/// neither the upstream nor the client sees what a plugin did before it trapped, ran out of time
/// or went past a limit.
fn undo(request: &mut RequestView, before: Option<RequestBefore>) {
    if let Some(before) = before {
        request.undo_edits(before);
    }
}

/// Takes back what a call lent its instance; the guest cannot take it, as it holds only a borrow.
fn take<T>(lent: &mut Option<T>) -> T {
    lent.take()
        .expect("the host's own request and response stay with the instance")
}
