//! The plugin runtime: one wasmtime engine, compiled modules cached by sha256, and warm
//! instance pools for each (module, config).

mod bindings;
mod callout;
pub mod grants;
pub mod health;
mod host;
mod pool;
pub mod proxy_wasm;
pub mod signature;
pub mod tenant;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::Duration;

use crate::digest::sha256_hex;
use wasmtime::component::{Component, HasSelf, InstancePre, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};
use wasmtime::{InstancePre as CoreInstancePre, Linker as CoreLinker, Module as CoreModule};

use self::bindings::exports::weir::plugin0_1_0::filter::GuestIndices as FilterIndices;
pub use self::bindings::exports::weir::plugin0_1_0::filter::Wants;
use self::bindings::exports::weir::plugin0_2_0::describe::{
    GuestIndices as DescribeIndices, PluginInfo as RawPluginInfo,
};
use self::bindings::exports::weir::plugin0_3_0::chunks::GuestIndices as ChunksIndices;
pub use self::bindings::weir::plugin0_1_0::http::{Action, Reply, Summary};
use self::callout::Callouts;
use self::health::PluginHealth;
use self::host::{InstanceState, Shared};
pub use self::host::{LogCapture, MAX_HEADER_BYTES, MAX_HEADER_EDITS, PluginScope};
pub use self::pool::{Bound, ChunkOutcome, PluginPool};
pub use self::proxy_wasm::abi::StreamType;
use self::tenant::Tenants;
use crate::config::{Isolation, PluginConfig};
use crate::kv::{KvStore, RedisSlot};
use crate::metrics::Metrics;
use crate::private_file::{self, Closed};

/// How often the engine's epoch advances; CPU deadlines are counted in these ticks.
const EPOCH_TICK: Duration = Duration::from_millis(2);
/// The deepest a plugin's WebAssembly stack may grow (for every plugin: it is an engine setting).
pub const MAX_WASM_STACK: usize = 512 << 10;
/// The most memory any one plugin instance may be configured with.
const MAX_INSTANCE_MEMORY: usize = 4 << 30;
/// Modules kept after their last user goes, so that a rollback does not recompile.
const RECENT_MODULES: u64 = 4;

/// Why a plugin could not be loaded or called.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The bytes are not a component, or not one that implements weir:plugin.
    #[error("module does not compile: {0}")]
    Compile(String),
    /// The component's imports or exports do not match what the gateway offers.
    #[error("module cannot be instantiated: {0}")]
    Instantiate(String),
    /// The plugin's `init` refused the route's config.
    #[error("plugin rejected its config: {0}")]
    Config(String),
    /// The call ran past its CPU deadline.
    #[error("plugin ran past its {0} ms deadline")]
    Timeout(u64),
    /// The instance tried to grow its memory past its limit.
    #[error("plugin went over its memory limit of {0} MiB")]
    Memory(u32),
    /// The plugin's tenant is at a quota.
    #[error("{0}")]
    Quota(String),
    /// The plugin went past a per-call limit (headers, body output, kv sizes).
    #[error("plugin went past a {0}")]
    Limit(String),
    /// A proxy-wasm filter called a host function its entry does not grant.
    #[error("{0}")]
    NotGranted(String),
    /// The guest trapped (a panic, an unreachable, an out-of-bounds access...).
    #[error("plugin trapped: {0}")]
    Trap(String),
    /// The plugin's kv backend (Redis) could not be reached.
    #[error("{0}")]
    KvUnavailable(String),
    /// The plugin failed too often and is not being called for now.
    #[error("plugin is quarantined for {} ms more", .0.as_millis())]
    Quarantined(Duration),
    /// A filter's instance failed serving another request, and this request's HTTP context,
    /// which it held, went with it.
    #[error("the filter's instance that held this request's context failed")]
    ContextLost,
}

impl PluginError {
    /// A short label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            PluginError::Compile(_) => "compile",
            PluginError::Instantiate(_) => "instantiate",
            PluginError::Config(_) => "config",
            PluginError::Timeout(_) => "timeout",
            PluginError::Memory(_) => "memory",
            PluginError::Quota(_) => "quota",
            PluginError::Limit(_) => "limit",
            PluginError::NotGranted(_) => "not_granted",
            PluginError::Trap(_) => "trap",
            PluginError::KvUnavailable(_) => "kv_unavailable",
            PluginError::Quarantined(_) => "quarantined",
            PluginError::ContextLost => "context_lost",
        }
    }

    /// Whether the failure counts towards a quarantine: the plugin's own misbehaviour does,
    /// a full tenant quota, an unreachable kv backend or a quarantine does not.
    pub fn counts_against_plugin(&self) -> bool {
        matches!(
            self,
            PluginError::Timeout(_)
                | PluginError::Memory(_)
                | PluginError::Limit(_)
                | PluginError::NotGranted(_)
                | PluginError::Trap(_)
        )
    }
}

/// A compiled plugin, ready to instantiate: a component, or a proxy-wasm filter.
pub struct Module {
    /// The sha256 of its bytes, in hex.
    pub sha256: String,
    /// What it imports: interfaces such as `weir:plugin/kv@0.1.0` for a component, functions
    /// such as `env.proxy_log` for a filter.
    pub imports: Vec<String>,
    /// What it exports: interfaces for a component, functions for a filter.
    pub exports: Vec<String>,
    guest: GuestModule,
    /// What the plugin said of itself, once asked (by the first pool to use it).
    info: tokio::sync::OnceCell<Option<Arc<PluginInfo>>>,
}

/// The two kinds of plugin, compiled.
enum GuestModule {
    /// A component of the weir:plugin world.
    Component {
        pre: InstancePre<InstanceState>,
        /// Where `weir:plugin/filter@0.1.0`'s functions are, which every plugin exports.
        filter: FilterIndices,
        /// Where `describe` is, for a 0.2.0 plugin.
        describe: Option<DescribeIndices>,
        /// Where the chunk hooks are, for a 0.3.0 plugin.
        chunks: Option<ChunksIndices>,
    },
    /// A core module exporting a proxy-wasm ABI version.
    Filter {
        pre: CoreInstancePre<InstanceState>,
        /// `0.2.1` or `0.2.0`.
        abi: &'static str,
        /// Whether it exports `proxy_on_request_body` and `proxy_on_response_body`.
        reads_body: [bool; 2],
        /// Whether it exports `proxy_on_request_trailers` and `proxy_on_response_trailers`.
        reads_trailers: [bool; 2],
    },
}

impl Module {
    /// The world version a component was built against (`0.3.0` when it exports `chunks`,
    /// `0.2.0` when it exports `describe`), or the proxy-wasm ABI version a filter exports.
    pub fn world(&self) -> &'static str {
        match &self.guest {
            GuestModule::Component {
                chunks: Some(_), ..
            } => "0.3.0",
            GuestModule::Component {
                describe: Some(_), ..
            } => "0.2.0",
            GuestModule::Component { .. } => "0.1.0",
            GuestModule::Filter { abi, .. } => abi,
        }
    }

    /// `component` or `proxy-wasm`, as the status page and `weir plugin check` say it.
    pub fn kind(&self) -> &'static str {
        match &self.guest {
            GuestModule::Component { .. } => "component",
            GuestModule::Filter { .. } => "proxy-wasm",
        }
    }

    fn describes(&self) -> bool {
        matches!(
            self.guest,
            GuestModule::Component {
                describe: Some(_),
                ..
            }
        )
    }

    /// What the plugin said of itself, if it has been asked (0.1.0 plugins say nothing).
    pub fn info(&self) -> Option<Arc<PluginInfo>> {
        self.info.get().cloned().flatten()
    }
}

/// The largest config schema a plugin may describe itself with.
const MAX_SCHEMA_BYTES: usize = 256 << 10;

/// What a 0.2.0 plugin's `describe` said, checked: its name, version and config schema.
pub struct PluginInfo {
    /// The plugin's own name for itself.
    pub name: String,
    /// Its version.
    pub version: String,
    /// The JSON Schema of its route config.
    pub schema: serde_json::Value,
    validator: jsonschema::Validator,
}

impl std::fmt::Debug for PluginInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginInfo")
            .field("name", &self.name)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl PluginInfo {
    /// Checks what the guest returned: bounded strings, and a schema that compiles (with no
    /// remote references: the gateway fetches nothing a plugin names).
    fn checked(raw: RawPluginInfo) -> Result<Self, String> {
        let short = |s: &str| s.len() <= 128 && s.chars().all(|c| !c.is_control());
        if !short(&raw.name) || !short(&raw.version) {
            return Err("its name or version is over 128 bytes or holds control characters".into());
        }
        if raw.config_schema.len() > MAX_SCHEMA_BYTES {
            return Err(format!(
                "its config schema of {} bytes is over the {MAX_SCHEMA_BYTES}-byte limit",
                raw.config_schema.len()
            ));
        }
        let schema: serde_json::Value = serde_json::from_str(&raw.config_schema)
            .map_err(|e| format!("its config schema is not JSON: {e}"))?;
        let validator = jsonschema::validator_for(&schema)
            .map_err(|e| format!("its config schema is not a JSON Schema: {e}"))?;
        Ok(PluginInfo {
            name: raw.name,
            version: raw.version,
            schema,
            validator,
        })
    }

    /// Checks a route's config against the schema: each error with its JSON pointer.
    pub fn validate(&self, config: &serde_json::Value) -> Result<(), String> {
        let errors: Vec<String> = self
            .errors(config)
            .into_iter()
            .map(|(at, error)| {
                if at.is_empty() {
                    error
                } else {
                    format!("{at}: {error}")
                }
            })
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "config does not match the plugin's schema: {}",
                errors.join("; ")
            ))
        }
    }

    /// Where `config` breaks the schema (a JSON pointer, empty for the whole) and how; at most
    /// eight of them. The message never quotes the value, which may be a secret: the pointer
    /// says where it is.
    pub fn errors(&self, config: &serde_json::Value) -> Vec<(String, String)> {
        self.validator
            .iter_errors(config)
            .take(8)
            .map(|error| {
                (
                    error.instance_path().to_string(),
                    error.masked_with("the value").to_string(),
                )
            })
            .collect()
    }
}

impl std::fmt::Debug for Module {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Module")
            .field("sha256", &self.sha256)
            .finish()
    }
}

/// One engine for the whole process: it owns the instance pool and the epoch ticker.
static ENGINE: LazyLock<Engine> = LazyLock::new(|| {
    let engine = Engine::new(&engine_config()).expect("the plugin engine's config is valid");
    let ticker = engine.clone();
    std::thread::Builder::new()
        .name("weir-epoch".into())
        .spawn(move || {
            loop {
                std::thread::sleep(EPOCH_TICK);
                ticker.increment_epoch();
            }
        })
        .expect("spawning the epoch thread");
    engine
});

/// How much of a freed instance's memory stays mapped for the next instance in its slot.
const KEEP_RESIDENT: usize = 2 << 20;

fn engine_config() -> Config {
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(2000)
        .total_core_instances(4000)
        .total_memories(2000)
        .total_tables(4000)
        .total_stacks(2000)
        .max_core_instances_per_component(64)
        .max_memories_per_component(16)
        .max_tables_per_component(32)
        .max_tables_per_module(8)
        .table_elements(100_000)
        .max_core_instance_size(8 << 20)
        .max_component_instance_size(8 << 20)
        .max_memory_size(MAX_INSTANCE_MEMORY)
        // A freed slot keeps its first pages mapped and is reset with memset, so that the next
        // instance (every request, under `isolation: per-request`) does not page-fault them
        // back in; PAGEMAP_SCAN (Linux 6.7+) resets only the pages the last instance touched.
        .linear_memory_keep_resident(KEEP_RESIDENT)
        .table_keep_resident(64 << 10)
        .pagemap_scan(wasmtime::Enabled::Auto);
    let mut config = Config::new();
    config
        .wasm_component_model(true)
        .epoch_interruption(true)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
        .cranelift_opt_level(wasmtime::OptLevel::Speed)
        // A plugin's stack depth: runaway recursion traps here, well inside its fiber's stack.
        .max_wasm_stack(MAX_WASM_STACK)
        .async_stack_size(MAX_WASM_STACK + (256 << 10));
    config
}

/// Loads plugin modules and hands out instance pools.
pub struct PluginRuntime {
    engine: Engine,
    linker: Linker<InstanceState>,
    /// proxy-wasm's `env` functions and WASI preview 1, for filters.
    core_linker: CoreLinker<InstanceState>,
    queues: proxy_wasm::queues::SharedQueues,
    /// Every module some pool still uses, by sha256: compiled once, dropped with its last user.
    modules: Mutex<HashMap<String, Weak<Module>>>,
    /// The last few modules loaded, kept a while longer so that a rollback does not recompile.
    recent: moka::sync::Cache<String, Arc<Module>>,
    pools: Mutex<HashMap<PoolKey, Weak<PluginPool>>>,
    kv: KvStore,
    redis: RedisSlot,
    metrics: Arc<Metrics>,
    tenants: Tenants,
    health: Mutex<HashMap<String, Arc<PluginHealth>>>,
    callouts: Callouts,
    cache_dir: Option<PathBuf>,
    log_capture: Option<LogCapture>,
}

/// What makes two pools interchangeable: the same entry, module, isolation and route config.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PoolKey {
    entry: PluginConfig,
    sha256: String,
    isolation: Isolation,
    config: String,
}

impl PluginRuntime {
    /// A runtime that reports plugin metrics into `metrics`, and keeps compiled modules in
    /// `cache_dir` (if given) so that a restart does not compile them again.
    pub fn new(metrics: Arc<Metrics>, cache_dir: Option<PathBuf>) -> Result<Self, PluginError> {
        let engine = ENGINE.clone();
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(|e| PluginError::Instantiate(e.to_string()))?;
        bindings::Plugin::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)
            .map_err(|e| PluginError::Instantiate(e.to_string()))?;
        let mut core_linker = CoreLinker::new(&engine);
        proxy_wasm::imports::add_to_linker(&mut core_linker)
            .map_err(|e| PluginError::Instantiate(e.to_string()))?;
        Ok(PluginRuntime {
            engine,
            linker,
            core_linker,
            queues: Default::default(),
            modules: Mutex::new(HashMap::new()),
            recent: moka::sync::Cache::builder()
                .max_capacity(RECENT_MODULES)
                .time_to_idle(Duration::from_secs(600))
                .build(),
            pools: Mutex::new(HashMap::new()),
            kv: KvStore::new(),
            redis: RedisSlot::default(),
            metrics,
            tenants: Tenants::default(),
            health: Mutex::new(HashMap::new()),
            callouts: Callouts::default(),
            cache_dir,
            log_capture: None,
        })
    }

    /// The key/value store plugins share.
    pub fn kv(&self) -> &KvStore {
        &self.kv
    }

    /// The Redis server behind plugin entries with `kv: {backend: redis}`.
    pub fn redis(&self) -> &RedisSlot {
        &self.redis
    }

    /// Compiles `bytes` off the async threads, or returns the module compiled earlier.
    pub async fn load(&self, bytes: Vec<u8>) -> Result<Arc<Module>, PluginError> {
        let sha256 = sha256_hex(&bytes);
        let in_use = self
            .modules
            .lock()
            .expect("module registry lock")
            .get(&sha256)
            .and_then(Weak::upgrade);
        if let Some(module) = in_use.or_else(|| self.recent.get(&sha256)) {
            self.metrics.module_loads("memory").inc();
            return Ok(module);
        }
        let engine = self.engine.clone();
        let cached = self.cache_path(&sha256);
        let (compiled, source) =
            tokio::task::spawn_blocking(move || compile_or_reuse(&engine, &bytes, cached))
                .await
                .map_err(|e| PluginError::Compile(e.to_string()))??;
        self.metrics.module_loads(source).inc();
        let module = match compiled {
            Compiled::Component(component) => self.component_module(sha256.clone(), component)?,
            Compiled::Core(core) => self.filter_module(sha256.clone(), core)?,
        };
        let module = Arc::new(module);
        let mut modules = self.modules.lock().expect("module registry lock");
        modules.retain(|_, weak| weak.strong_count() > 0);
        modules.insert(sha256.clone(), Arc::downgrade(&module));
        drop(modules);
        self.recent.insert(sha256, module.clone());
        // moka evicts lazily; evict now so that an old module's memory goes with it.
        self.recent.run_pending_tasks();
        Ok(module)
    }

    fn component_module(
        &self,
        sha256: String,
        component: Component,
    ) -> Result<Module, PluginError> {
        let imports: Vec<String> = component
            .component_type()
            .imports(&self.engine)
            .map(|(name, _)| name.to_owned())
            .collect();
        let exports: Vec<String> = component
            .component_type()
            .exports(&self.engine)
            .map(|(name, _)| name.to_owned())
            .collect();
        let instance_pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| unlinked(&e, &imports))?;
        let filter = FilterIndices::new(&instance_pre).map_err(|e| {
            PluginError::Instantiate(format!("it does not implement weir:plugin/filter: {e:#}"))
        })?;
        // Only 0.2.0 plugins describe themselves; for them it is part of the contract.
        let describe = if exports
            .iter()
            .any(|e| e.starts_with("weir:plugin/describe@"))
        {
            Some(DescribeIndices::new(&instance_pre).map_err(|e| {
                PluginError::Instantiate(format!("its weir:plugin/describe is not 0.2.0's: {e:#}"))
            })?)
        } else {
            None
        };
        let chunks = if exports.iter().any(|e| e.starts_with("weir:plugin/chunks@")) {
            Some(ChunksIndices::new(&instance_pre).map_err(|e| {
                PluginError::Instantiate(format!("its weir:plugin/chunks is not 0.3.0's: {e:#}"))
            })?)
        } else {
            None
        };
        Ok(Module {
            sha256,
            imports,
            exports,
            guest: GuestModule::Component {
                pre: instance_pre,
                filter,
                describe,
                chunks,
            },
            info: tokio::sync::OnceCell::new(),
        })
    }

    /// A core module: a proxy-wasm filter if it exports an ABI version Weir speaks.
    fn filter_module(&self, sha256: String, core: CoreModule) -> Result<Module, PluginError> {
        let imports: Vec<String> = core
            .imports()
            .map(|import| format!("{}.{}", import.module(), import.name()))
            .collect();
        let exports: Vec<String> = core.exports().map(|e| e.name().to_owned()).collect();
        let abi = proxy_wasm::ABI_MARKERS
            .iter()
            .find(|(marker, _)| exports.iter().any(|e| e == marker))
            .map(|(_, version)| *version)
            .ok_or_else(|| {
                PluginError::Instantiate(
                    "it is a core module that exports neither proxy_abi_version_0_2_1 nor \
                     proxy_abi_version_0_2_0, so it is not a proxy-wasm filter"
                        .into(),
                )
            })?;
        let pre = self
            .core_linker
            .instantiate_pre(&core)
            .map_err(|e| unlinked(&e, &imports))?;
        let reads_body = ["proxy_on_request_body", "proxy_on_response_body"]
            .map(|callback| exports.iter().any(|e| e == callback));
        let reads_trailers = ["proxy_on_request_trailers", "proxy_on_response_trailers"]
            .map(|callback| exports.iter().any(|e| e == callback));
        Ok(Module {
            sha256,
            imports,
            exports,
            guest: GuestModule::Filter {
                pre,
                abi,
                reads_body,
                reads_trailers,
            },
            info: tokio::sync::OnceCell::new(),
        })
    }

    /// How many compiled modules are alive (in use, or kept for a quick rollback).
    pub fn live_modules(&self) -> usize {
        let mut modules = self.modules.lock().expect("module registry lock");
        modules.retain(|_, weak| weak.strong_count() > 0);
        modules.len()
    }

    /// Where a compiled module is kept on disk: one folder per engine configuration, so that
    /// artifacts from another wasmtime version or setting are never loaded.
    fn cache_path(&self, sha256: &str) -> Option<PathBuf> {
        let dir = self.cache_dir.as_ref()?;
        let mut hasher = xxhash_rust::xxh3::Xxh3Default::new();
        std::hash::Hash::hash(&self.engine.precompile_compatibility_hash(), &mut hasher);
        let engine = std::hash::Hasher::finish(&hasher);
        Some(
            dir.join(format!("engine-{engine:016x}"))
                .join(format!("{sha256}.cwasm")),
        )
    }

    /// Keeps every plugin log line in `capture` as well (for `weir plugin test`).
    pub fn capture_logs(&mut self, capture: LogCapture) {
        self.log_capture = Some(capture);
    }

    /// The tenants, their quotas and usage.
    pub fn tenants(&self) -> &Tenants {
        &self.tenants
    }

    /// Plugins in quarantine now, with how long each has left.
    pub fn quarantined(&self) -> Vec<(String, Duration)> {
        let now = std::time::Instant::now();
        let health = self.health.lock().expect("health registry lock");
        let mut list: Vec<_> = health
            .iter()
            .filter_map(|(name, h)| h.quarantined_for(now).map(|left| (name.clone(), left)))
            .collect();
        list.sort();
        list
    }

    fn health_of(&self, entry: &PluginConfig) -> Arc<PluginHealth> {
        let mut health = self.health.lock().expect("health registry lock");
        match health.get(&entry.name) {
            Some(existing) if existing.policy() == entry.quarantine => existing.clone(),
            _ => {
                let fresh = Arc::new(PluginHealth::new(entry.quarantine));
                health.insert(entry.name.clone(), fresh.clone());
                fresh
            }
        }
    }

    /// What every instance of plugin `entry` shares: its tenant, grants, kv and health.
    fn scope(&self, entry: &PluginConfig) -> Result<Arc<PluginScope>, PluginError> {
        let tenant = self.tenants.get(entry.tenant.as_deref()).ok_or_else(|| {
            PluginError::Config(format!(
                "tenant {:?} does not exist",
                entry.tenant.as_deref().unwrap_or_default()
            ))
        })?;
        let shared = Shared {
            kv: self.kv.clone(),
            redis: self.redis.clone(),
            metrics: self.metrics.clone(),
            callouts: self.callouts.clone(),
            log_capture: self.log_capture.clone(),
        };
        Ok(Arc::new(PluginScope::new(
            &entry.name,
            tenant,
            entry.grants.clone(),
            entry.kv.backend,
            self.health_of(entry),
            &shared,
        )))
    }

    /// What `module` says of itself (a 0.2.0 plugin's `describe`), asked once per module on an
    /// instance of plugin `entry` that serves no request, so that its schema is known and
    /// checked when the module loads rather than when a route first uses it.
    pub async fn describe(
        &self,
        entry: &PluginConfig,
        module: &Arc<Module>,
    ) -> Result<Option<Arc<PluginInfo>>, PluginError> {
        // Asked before (or a 0.1.0 plugin, or a filter): no scope, no instance.
        if !module.describes() {
            return Ok(None);
        }
        if let Some(info) = module.info.get() {
            return Ok(info.clone());
        }
        PluginPool::describe(
            self.engine.clone(),
            module.clone(),
            self.scope(entry)?,
            entry.limits,
        )
        .await
    }

    /// A pool of instances of `module` for plugin `entry`, initialised with a route's `config`,
    /// shared with any pool that has the same entry, module, isolation and config.
    pub async fn pool(
        &self,
        entry: &PluginConfig,
        module: &Arc<Module>,
        isolation: Isolation,
        config: &serde_json::Value,
    ) -> Result<Arc<PluginPool>, PluginError> {
        let key = PoolKey {
            entry: entry.clone(),
            sha256: module.sha256.clone(),
            isolation,
            config: config.to_string(),
        };
        if let Some(pool) = self
            .pools
            .lock()
            .expect("pool registry lock")
            .get(&key)
            .and_then(Weak::upgrade)
        {
            return Ok(pool);
        }
        let filter = matches!(module.guest, GuestModule::Filter { .. }).then(|| {
            Arc::new(proxy_wasm::FilterShared {
                root_id: entry.root_id.clone().unwrap_or_else(|| entry.name.clone()),
                // A string is handed over as it is (as Envoy's StringValue configuration is);
                // anything else as its JSON text.
                plugin_config: bytes::Bytes::from(match config {
                    serde_json::Value::String(text) => text.clone(),
                    other => other.to_string(),
                }),
                vm_config: bytes::Bytes::from(entry.vm_config.clone().unwrap_or_default()),
                wake: Arc::new(tokio::sync::Notify::new()),
                metrics: Mutex::new(Vec::new()),
                queues: self.queues.clone(),
                tick: Mutex::new(None),
            })
        });
        let pool = PluginPool::new(
            self.engine.clone(),
            module.clone(),
            self.scope(entry)?,
            entry.limits,
            isolation,
            config,
            key.config.clone(),
            filter,
        );
        let pool = Arc::new(pool.await?);
        pool.start_control();
        let mut pools = self.pools.lock().expect("pool registry lock");
        pools.retain(|_, weak| weak.strong_count() > 0);
        pools.insert(key, Arc::downgrade(&pool));
        Ok(pool)
    }
}

/// Why a module could not be linked: the imports the gateway does not provide, when that is
/// why, rather than wasmtime's first one.
fn unlinked(error: &wasmtime::Error, imports: &[String]) -> PluginError {
    let unknown = grants::unknown(imports);
    if unknown.is_empty() {
        PluginError::Instantiate(format!("{error:#}"))
    } else {
        PluginError::Instantiate(format!(
            "it imports {}, which the gateway does not provide",
            unknown.join(", ")
        ))
    }
}

/// A module compiled from a plugin's bytes.
enum Compiled {
    /// A component.
    Component(Component),
    /// A core module (a proxy-wasm filter, once its exports say so).
    Core(CoreModule),
}

/// Whether `bytes` are a core module (version 1) rather than a component (its layer is 1).
fn is_core_module(bytes: &[u8]) -> bool {
    bytes.get(4..8) == Some(&[1, 0, 0, 0])
}

/// Loads a precompiled module from `cached` when it is there and safe to trust, or compiles
/// `bytes` and writes it there. Returns where the module came from (`disk` or `compiled`).
fn compile_or_reuse(
    engine: &Engine,
    bytes: &[u8],
    cached: Option<PathBuf>,
) -> Result<(Compiled, &'static str), PluginError> {
    let core = is_core_module(bytes);
    if let Some(path) = &cached
        && path.exists()
    {
        match load_precompiled(engine, path, core) {
            Ok(compiled) => return Ok((compiled, "disk")),
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "cached module not used; compiling again");
            }
        }
    }
    let compiled = if core {
        Compiled::Core(
            CoreModule::new(engine, bytes).map_err(|e| PluginError::Compile(format!("{e:#}")))?,
        )
    } else {
        Compiled::Component(
            Component::new(engine, bytes).map_err(|e| PluginError::Compile(format!("{e:#}")))?,
        )
    };
    if let Some(path) = &cached
        && let Err(error) = store_precompiled(&compiled, path)
    {
        tracing::warn!(path = %path.display(), %error, "could not keep the compiled module on disk");
    }
    Ok((compiled, "compiled"))
}

/// Reads a cached artifact only if it is a regular file (not a link) of this process's user
/// that neither group nor others may write, in the engine's own folder closed to others (the
/// folder the operator gave is created if missing but its mode is never changed): anyone who
/// can write it can run code in the gateway.
#[allow(unsafe_code)]
fn load_precompiled(engine: &Engine, path: &Path, core: bool) -> Result<Compiled, CacheRefusal> {
    let bytes = private_file::read(path, Closed::ToWriters, u64::MAX)?;
    // SAFETY: the file belongs to this user, nobody else may write it or its folder, and only
    // this process writes there, always through a rename of a complete file; its folder name
    // pins the engine configuration, and wasmtime still checks the artifact's header and
    // compatibility (a component's artifact does not load as a core module's) before using it.
    let compiled = if core {
        unsafe { CoreModule::deserialize(engine, &bytes) }.map(Compiled::Core)
    } else {
        unsafe { Component::deserialize(engine, &bytes) }.map(Compiled::Component)
    };
    compiled.map_err(|e| format!("{e:#}").into())
}

fn store_precompiled(compiled: &Compiled, path: &Path) -> std::io::Result<()> {
    let bytes = match compiled {
        Compiled::Component(component) => component.serialize(),
        Compiled::Core(core) => core.serialize(),
    }
    .map_err(std::io::Error::other)?;
    private_file::write(path, &bytes)
}

/// Why a cached artifact was not used: an I/O error, a failed check, or wasmtime's refusal.
type CacheRefusal = Box<dyn std::error::Error + Send + Sync>;
