//! Warm instances of one plugin module with one config, and the calls into each phase.

use std::sync::Arc;

use crossbeam_queue::ArrayQueue;
use wasmtime::component::Resource;
use wasmtime::{Engine, Store, Trap};

use super::bindings::{self, exports::weir::plugin::filter::Wants};
use super::host::{InstanceState, PluginScope};
use super::{Action, EPOCH_TICK, Module, PluginError, Summary};
use crate::config::{Isolation, Limits};
use crate::exchange::{RequestView, ResponseView};
use crate::metrics::PluginFailureLabels;

/// Idle instances kept per pool; instances beyond this are dropped after use.
const MAX_IDLE: usize = 64;

/// One live instance and its store.
struct PluginInstance {
    store: Store<InstanceState>,
    plugin: bindings::Plugin,
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

impl PluginPool {
    /// Creates the pool and its first instance; the plugin's `init` validates `config` here.
    pub(super) async fn new(
        engine: Engine,
        module: Arc<Module>,
        scope: Arc<PluginScope>,
        limits: Limits,
        isolation: Isolation,
        config: String,
    ) -> Result<Self, PluginError> {
        let mut pool = PluginPool {
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
        };
        let (instance, wants) = pool.instantiate().await?;
        pool.wants = wants;
        pool.checkin(instance);
        Ok(pool)
    }

    /// The plugin's name.
    pub fn name(&self) -> &str {
        self.scope.name()
    }

    /// What the plugin asked for in `init`.
    pub fn wants(&self) -> &Wants {
        &self.wants
    }

    /// The plugin's limits.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The module's sha256.
    pub fn sha256(&self) -> &str {
        &self.module.sha256
    }

    async fn instantiate(&self) -> Result<(PluginInstance, Wants), PluginError> {
        let memory_limit = usize::try_from(self.limits.memory_mb).unwrap_or(usize::MAX) << 20;
        let state = InstanceState::new(self.scope.clone(), memory_limit);
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| &mut state.memory);
        store.set_epoch_deadline(self.deadline_ticks());
        let plugin = match self.module.pre.instantiate_async(&mut store).await {
            Ok(plugin) => plugin,
            Err(e) => return Err(self.classify(e, &store, PluginError::Instantiate)),
        };
        let mut instance = PluginInstance { store, plugin };
        instance.store.set_epoch_deadline(self.deadline_ticks());
        let init = instance
            .plugin
            .weir_plugin_filter()
            .call_init(&mut instance.store, &self.config)
            .await;
        match init {
            Ok(Ok(wants)) => Ok((instance, wants)),
            Ok(Err(reason)) => Err(PluginError::Config(reason)),
            Err(e) => Err(self.classify(e, &instance.store, PluginError::Trap)),
        }
    }

    async fn checkout(&self) -> Result<PluginInstance, PluginError> {
        match self.idle.pop() {
            Some(instance) => Ok(instance),
            None => self.instantiate().await.map(|(instance, _)| instance),
        }
    }

    fn checkin(&self, instance: PluginInstance) {
        if self.isolation == Isolation::PerRequest {
            return;
        }
        // A full queue drops the instance; its slot returns to the engine's pool.
        let _ = self.idle.push(instance);
    }

    fn deadline_ticks(&self) -> u64 {
        self.limits
            .timeout_ms
            .div_ceil(EPOCH_TICK.as_millis() as u64)
            + 1
    }

    /// Turns a wasmtime error into the plugin failure it stands for, and counts it.
    fn classify(
        &self,
        error: wasmtime::Error,
        store: &Store<InstanceState>,
        otherwise: fn(String) -> PluginError,
    ) -> PluginError {
        let failure = if store.data().memory.hit {
            PluginError::Memory(self.limits.memory_mb)
        } else if matches!(error.downcast_ref::<Trap>(), Some(Trap::Interrupt)) {
            PluginError::Timeout(self.limits.timeout_ms)
        } else {
            otherwise(format!("{error:#}"))
        };
        self.scope
            .metrics()
            .plugin_failures
            .get_or_create(&PluginFailureLabels {
                plugin: self.name().to_owned(),
                kind: failure.kind(),
            })
            .inc();
        tracing::warn!(plugin = self.name(), error = %failure, "plugin call failed");
        failure
    }

    /// Calls `on-request`. The request comes back whatever happens; a failed instance is dropped.
    pub async fn on_request(
        &self,
        mut request: RequestView,
    ) -> (RequestView, Result<Action, PluginError>) {
        let mut instance = match self.checkout().await {
            Ok(instance) => instance,
            Err(e) => return (request, Err(e)),
        };
        request.body_access = self.wants.request_body;
        request.body_limit = self.limits.max_body_bytes;
        let handle = push(&mut instance.store, request);
        instance.store.set_epoch_deadline(self.deadline_ticks());
        let outcome = instance
            .plugin
            .weir_plugin_filter()
            .call_on_request(&mut instance.store, Resource::new_borrow(handle.rep()))
            .await;
        let request = take(&mut instance.store, handle);
        (request, self.settle(instance, outcome))
    }

    /// Calls `on-response` with the request as it was sent and the response to edit.
    pub async fn on_response(
        &self,
        request: RequestView,
        mut response: ResponseView,
    ) -> (RequestView, ResponseView, Result<(), PluginError>) {
        let mut instance = match self.checkout().await {
            Ok(instance) => instance,
            Err(e) => return (request, response, Err(e)),
        };
        response.body_access = self.wants.response_body;
        response.body_limit = self.limits.max_body_bytes;
        let req = push(&mut instance.store, request);
        let resp = push(&mut instance.store, response);
        instance.store.set_epoch_deadline(self.deadline_ticks());
        let outcome = instance
            .plugin
            .weir_plugin_filter()
            .call_on_response(
                &mut instance.store,
                Resource::new_borrow(req.rep()),
                Resource::new_borrow(resp.rep()),
            )
            .await;
        let request = take(&mut instance.store, req);
        let response = take(&mut instance.store, resp);
        (request, response, self.settle(instance, outcome))
    }

    /// Calls `on-log`.
    pub async fn on_log(
        &self,
        request: RequestView,
        summary: &Summary,
    ) -> (RequestView, Result<(), PluginError>) {
        let mut instance = match self.checkout().await {
            Ok(instance) => instance,
            Err(e) => return (request, Err(e)),
        };
        let handle = push(&mut instance.store, request);
        instance.store.set_epoch_deadline(self.deadline_ticks());
        let outcome = instance
            .plugin
            .weir_plugin_filter()
            .call_on_log(
                &mut instance.store,
                Resource::new_borrow(handle.rep()),
                summary,
            )
            .await;
        let request = take(&mut instance.store, handle);
        (request, self.settle(instance, outcome))
    }

    /// Returns a healthy instance to the pool, or classifies the failure and drops it.
    fn settle<T>(
        &self,
        instance: PluginInstance,
        outcome: wasmtime::Result<T>,
    ) -> Result<T, PluginError> {
        match outcome {
            Ok(value) => {
                self.checkin(instance);
                Ok(value)
            }
            Err(e) => Err(self.classify(e, &instance.store, PluginError::Trap)),
        }
    }
}

fn push<T: Send + 'static>(store: &mut Store<InstanceState>, value: T) -> Resource<T> {
    store
        .data_mut()
        .table
        .push(value)
        .expect("a fresh call's resource table has room")
}

fn take<T: 'static>(store: &mut Store<InstanceState>, handle: Resource<T>) -> T {
    store
        .data_mut()
        .table
        .delete(handle)
        .expect("the host's own resource is still in the table")
}
