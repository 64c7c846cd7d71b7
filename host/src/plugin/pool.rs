//! Warm instances of one plugin module with one config, and the calls into each phase.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use wasmtime::component::Resource;
use wasmtime::{Engine, Store, Trap, UpdateDeadline};

use super::bindings::exports::weir::plugin0_1_0::filter::{Guest as Filter, Wants};
use super::health::Admission;
use super::host::{
    InstanceSlot, InstanceState, LimitExceeded, MAX_HEADER_BYTES, MAX_HEADER_EDITS, MemoryHit,
    PluginScope, REQUEST_REP, RESPONSE_REP,
};
use super::tenant::QuotaExceeded;
use super::{Action, EPOCH_TICK, Module, PluginError, PluginInfo, Summary};
use crate::config::{Isolation, Limits};
use crate::kv::KvUnavailable;
use crate::view::{RequestBefore, RequestView, ResponseView};

/// Idle instances kept per pool; instances beyond this are dropped after use.
const MAX_IDLE: usize = 64;

/// One live instance and its store.
struct PluginInstance {
    store: Store<InstanceState>,
    instance: wasmtime::component::Instance,
    filter: Filter,
}

/// The instance of a plugin that one request's phases share under `isolation: per-request`:
/// made fresh for the request's first call, and dropped with the request (or once the plugin
/// has no phase left to run), so that state carries from `on-request` to `on-log` and never to
/// another request. Pooled plugins leave it empty.
#[derive(Default)]
pub struct Bound(Option<PluginInstance>);

impl std::fmt::Debug for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Bound").field(&self.0.is_some()).finish()
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
    idle: ArrayQueue<PluginInstance>,
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
    pub(super) async fn new(
        engine: Engine,
        module: Arc<Module>,
        scope: Arc<PluginScope>,
        limits: Limits,
        isolation: Isolation,
        json: &serde_json::Value,
        config: String,
    ) -> Result<Self, PluginError> {
        let mut pool = Self::unstarted(engine, module, scope, limits, isolation, config);
        let mut instance = pool.instantiate_bare().await?;
        if let Some(info) = pool.described(&mut instance).await? {
            info.validate(json).map_err(PluginError::Config)?;
        }
        pool.wants = pool.init(&mut instance).await?;
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
            idle: ArrayQueue::new(MAX_IDLE),
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
        let Some(indices) = &self.module.describe else {
            return Ok(None);
        };
        let info = self
            .module
            .info
            .get_or_try_init(|| async {
                let describe = indices
                    .load(&mut instance.store, &instance.instance)
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
        let init = instance
            .filter
            .call_init(&mut instance.store, &self.config)
            .await;
        match init {
            Ok(Ok(wants)) => Ok(wants),
            Ok(Err(reason)) => Err(PluginError::Config(reason)),
            Err(e) => Err(self.classify(e, &instance.store, PluginError::Trap)),
        }
    }

    /// A new instance, before `init`.
    async fn instantiate_bare(&self) -> Result<PluginInstance, PluginError> {
        let slot = InstanceSlot::take(self.scope.tenant())
            .map_err(|e| PluginError::Quota(e.to_string()))?;
        let memory_limit = usize::try_from(self.limits.memory_mb).unwrap_or(usize::MAX) << 20;
        let state = InstanceState::new(self.scope.clone(), memory_limit, self.budget_ticks(), slot);
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
        let instance = match self.module.pre.instantiate_async(&mut store).await {
            Ok(instance) => instance,
            Err(e) => return Err(self.classify(e, &store, PluginError::Instantiate)),
        };
        let filter = self
            .module
            .filter
            .load(&mut store, &instance)
            .map_err(|e| PluginError::Instantiate(format!("{e:#}")))?;
        Ok(PluginInstance {
            store,
            instance,
            filter,
        })
    }

    /// An instance for one call, unless the plugin is quarantined: the request's own under
    /// per-request isolation (a fresh one for its first call, or when the caller keeps no
    /// `bound`), else a warm one.
    async fn checkout(&self, bound: Option<&mut Bound>) -> Result<PluginInstance, PluginError> {
        if let Admission::Quarantined(left) = self.scope.health().admit(Instant::now()) {
            return Err(PluginError::Quarantined(left));
        }
        let reused = match self.isolation {
            Isolation::PerRequest => bound.and_then(|bound| bound.0.take()),
            Isolation::Pooled => self.idle.pop(),
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
    fn checkin(&self, instance: PluginInstance, bound: Option<&mut Bound>, phase: Phase) {
        match self.isolation {
            Isolation::PerRequest => {
                let later = match phase {
                    Phase::Request => self.wants.on_response || self.wants.on_log,
                    Phase::Response => self.wants.on_log,
                    Phase::Log => false,
                };
                if later && let Some(bound) = bound {
                    bound.0 = Some(instance);
                }
            }
            Isolation::Pooled => {
                // A full queue drops the instance; its slot returns to the engine's pool.
                let _ = self.idle.push(instance);
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
        bound: Option<&mut Bound>,
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
        let mut instance = match self.checkout(bound.as_deref_mut()).await {
            Ok(instance) => instance,
            Err(e) => return (request, Err(e)),
        };
        request.body_access = self.wants.request_body;
        request.body_limit = self.limits.max_body_bytes;
        instance.store.data_mut().request = Some(request);
        self.arm(&mut instance);
        let outcome = instance
            .filter
            .call_on_request(&mut instance.store, Resource::new_borrow(REQUEST_REP))
            .await;
        let state = instance.store.data_mut();
        let (mut request, before) = (take(&mut state.request), state.request_before.take());
        let outcome = self
            .settle(instance, outcome, bound, Phase::Request)
            .and_then(|action| self.check_reply(action));
        if outcome.is_err() {
            undo(&mut request, before);
        }
        (request, outcome)
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
    pub async fn on_response(
        &self,
        request: Box<RequestView>,
        mut response: Box<ResponseView>,
        mut bound: Option<&mut Bound>,
    ) -> (Box<RequestView>, Box<ResponseView>, Result<(), PluginError>) {
        let mut instance = match self.checkout(bound.as_deref_mut()).await {
            Ok(instance) => instance,
            Err(e) => return (request, response, Err(e)),
        };
        response.body_access = self.wants.response_body;
        response.body_limit = self.limits.max_body_bytes;
        let state = instance.store.data_mut();
        state.request = Some(request);
        state.response = Some(response);
        self.arm(&mut instance);
        let outcome = instance
            .filter
            .call_on_response(
                &mut instance.store,
                Resource::new_borrow(REQUEST_REP),
                Resource::new_borrow(RESPONSE_REP),
            )
            .await;
        let state = instance.store.data_mut();
        let (mut request, mut response) = (take(&mut state.request), take(&mut state.response));
        let before = (state.request_before.take(), state.response_before.take());
        let outcome = self.settle(instance, outcome, bound, Phase::Response);
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
        mut bound: Option<&mut Bound>,
    ) -> (Box<RequestView>, Result<(), PluginError>) {
        let mut instance = match self.checkout(bound.as_deref_mut()).await {
            Ok(instance) => instance,
            Err(e) => return (request, Err(e)),
        };
        instance.store.data_mut().request = Some(request);
        self.arm(&mut instance);
        let outcome = instance
            .filter
            .call_on_log(
                &mut instance.store,
                Resource::new_borrow(REQUEST_REP),
                summary,
            )
            .await;
        let state = instance.store.data_mut();
        let (mut request, before) = (take(&mut state.request), state.request_before.take());
        let outcome = self.settle(instance, outcome, bound, Phase::Log);
        if outcome.is_err() {
            undo(&mut request, before);
        }
        (request, outcome)
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
