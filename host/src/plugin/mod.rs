//! The plugin runtime: one wasmtime engine, compiled modules cached by sha256, and warm
//! instance pools for each (module, config).

mod bindings;
mod host;
mod pool;

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

pub use self::bindings::exports::weir::plugin::filter::Wants;
pub use self::bindings::weir::plugin::http::{Action, Reply, Summary};
use self::host::InstanceState;
pub use self::host::PluginScope;
pub use self::pool::PluginPool;
use crate::config::{Isolation, Limits};
use crate::kv::KvStore;
use crate::metrics::Metrics;

/// How often the engine's epoch advances; CPU deadlines are counted in these ticks.
const EPOCH_TICK: Duration = Duration::from_millis(2);
/// The most memory any one plugin instance may be configured with.
const MAX_INSTANCE_MEMORY: usize = 4 << 30;
/// Modules kept after their last user goes, so that a rollback does not recompile.
const RECENT_MODULES: u64 = 4;
/// How much the shared plugin key/value store may hold.
const KV_CAPACITY_BYTES: u64 = 64 << 20;

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
    /// The guest trapped (a panic, an unreachable, an out-of-bounds access...).
    #[error("plugin trapped: {0}")]
    Trap(String),
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
            PluginError::Trap(_) => "trap",
        }
    }
}

/// A compiled component, ready to instantiate.
pub struct Module {
    /// The sha256 of its bytes, in hex.
    pub sha256: String,
    pre: bindings::PluginPre<InstanceState>,
}

impl std::fmt::Debug for Module {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Module")
            .field("sha256", &self.sha256)
            .finish()
    }
}

/// The hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
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
        .max_memory_size(MAX_INSTANCE_MEMORY);
    let mut config = Config::new();
    config
        .wasm_component_model(true)
        .epoch_interruption(true)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
        .cranelift_opt_level(wasmtime::OptLevel::Speed);
    config
}

/// Loads plugin modules and hands out instance pools.
pub struct PluginRuntime {
    engine: Engine,
    linker: Linker<InstanceState>,
    /// Every module some pool still uses, by sha256: compiled once, dropped with its last user.
    modules: Mutex<HashMap<String, Weak<Module>>>,
    /// The last few modules loaded, kept a while longer so that a rollback does not recompile.
    recent: moka::sync::Cache<String, Arc<Module>>,
    pools: Mutex<HashMap<PoolKey, Weak<PluginPool>>>,
    kv: KvStore,
    metrics: Arc<Metrics>,
}

/// What makes two pools interchangeable.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PoolKey {
    plugin: String,
    sha256: String,
    limits: Limits,
    isolation: Isolation,
    config: String,
}

impl PluginRuntime {
    /// A runtime that reports plugin metrics into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Result<Self, PluginError> {
        let engine = ENGINE.clone();
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(|e| PluginError::Instantiate(e.to_string()))?;
        bindings::Plugin::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)
            .map_err(|e| PluginError::Instantiate(e.to_string()))?;
        Ok(PluginRuntime {
            engine,
            linker,
            modules: Mutex::new(HashMap::new()),
            recent: moka::sync::Cache::builder()
                .max_capacity(RECENT_MODULES)
                .time_to_idle(Duration::from_secs(600))
                .build(),
            pools: Mutex::new(HashMap::new()),
            kv: KvStore::new(KV_CAPACITY_BYTES),
            metrics,
        })
    }

    /// The key/value store plugins share.
    pub fn kv(&self) -> &KvStore {
        &self.kv
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
            return Ok(module);
        }
        let engine = self.engine.clone();
        let component = tokio::task::spawn_blocking(move || Component::new(&engine, &bytes))
            .await
            .map_err(|e| PluginError::Compile(e.to_string()))?
            .map_err(|e| PluginError::Compile(format!("{e:#}")))?;
        let instance_pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| PluginError::Instantiate(format!("{e:#}")))?;
        let pre = bindings::PluginPre::new(instance_pre).map_err(|e| {
            PluginError::Instantiate(format!("it does not implement weir:plugin/filter: {e:#}"))
        })?;
        let module = Arc::new(Module {
            sha256: sha256.clone(),
            pre,
        });
        let mut modules = self.modules.lock().expect("module registry lock");
        modules.retain(|_, weak| weak.strong_count() > 0);
        modules.insert(sha256.clone(), Arc::downgrade(&module));
        drop(modules);
        self.recent.insert(sha256, module.clone());
        // moka evicts lazily; evict now so that an old module's memory goes with it.
        self.recent.run_pending_tasks();
        Ok(module)
    }

    /// How many compiled modules are alive (in use, or kept for a quick rollback).
    pub fn live_modules(&self) -> usize {
        let mut modules = self.modules.lock().expect("module registry lock");
        modules.retain(|_, weak| weak.strong_count() > 0);
        modules.len()
    }

    /// A pool of instances of `module` initialised with `config`, shared with any pool
    /// that has the same plugin, module, limits and config.
    pub async fn pool(
        &self,
        plugin: &str,
        module: &Arc<Module>,
        limits: Limits,
        isolation: Isolation,
        config: &serde_json::Value,
    ) -> Result<Arc<PluginPool>, PluginError> {
        let key = PoolKey {
            plugin: plugin.to_owned(),
            sha256: module.sha256.clone(),
            limits,
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
        let scope = Arc::new(PluginScope::new(
            plugin,
            self.kv.clone(),
            self.metrics.clone(),
        ));
        let pool = Arc::new(
            PluginPool::new(
                self.engine.clone(),
                module.clone(),
                scope,
                limits,
                isolation,
                key.config.clone(),
            )
            .await?,
        );
        let mut pools = self.pools.lock().expect("pool registry lock");
        pools.retain(|_, weak| weak.strong_count() > 0);
        pools.insert(key, Arc::downgrade(&pool));
        Ok(pool)
    }
}
