//! The host functions plugins import, and the per-instance state they work on.

use std::sync::Arc;
use std::sync::LazyLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use wasmtime::component::{Resource, ResourceTable};
use wasmtime::{ResourceLimiter, Result};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::weir::plugin::{clock, http, kv, log, metrics};
use crate::exchange::{RequestView, ResponseView, headers};
use crate::kv::KvStore;
use crate::metrics::{Metrics, PluginEventLabels};

/// The longest log line a plugin may write; longer ones are cut.
const MAX_LOG_LINE: usize = 4096;
/// The longest kv key.
const MAX_KV_KEY: usize = 1024;
/// The largest kv value.
const MAX_KV_VALUE: usize = 1 << 20;

/// What every instance of one plugin shares: its name, kv namespace and metrics.
pub struct PluginScope {
    name: Arc<str>,
    kv: KvStore,
    metrics: Arc<Metrics>,
}

impl PluginScope {
    /// The scope of plugin `name`.
    pub fn new(name: &str, kv: KvStore, metrics: Arc<Metrics>) -> Self {
        PluginScope {
            name: name.into(),
            kv,
            metrics,
        }
    }

    /// The plugin's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The gateway's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

/// Caps an instance's linear memory and remembers whether the cap was hit.
pub struct MemoryCap {
    limit: usize,
    /// Set when the guest asked for more than `limit`.
    pub hit: bool,
}

impl MemoryCap {
    /// A cap of `limit` bytes.
    pub fn new(limit: usize) -> Self {
        MemoryCap { limit, hit: false }
    }
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> Result<bool> {
        if desired > self.limit || maximum.is_some_and(|max| desired > max) {
            self.hit = true;
            // Trapping here, rather than failing the grow, stops the guest at the real cause.
            wasmtime::bail!("memory limit: the plugin asked for {desired} bytes");
        }
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

/// The data of one instance's store.
pub struct InstanceState {
    /// Resources the guest holds: the request and response being filtered, and WASI handles.
    pub table: ResourceTable,
    /// WASI with nothing granted: no files, no sockets, no environment; output is discarded.
    wasi: WasiCtx,
    /// The memory cap.
    pub memory: MemoryCap,
    scope: Arc<PluginScope>,
}

impl InstanceState {
    /// State for a new instance of the plugin in `scope`, with `memory_limit` bytes of memory.
    pub fn new(scope: Arc<PluginScope>, memory_limit: usize) -> Self {
        InstanceState {
            table: ResourceTable::new(),
            wasi: WasiCtx::builder().build(),
            memory: MemoryCap::new(memory_limit),
            scope,
        }
    }
}

impl WasiView for InstanceState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl log::Host for InstanceState {
    fn write(&mut self, level: log::Level, message: String) -> Result<()> {
        let mut message = message;
        if message.len() > MAX_LOG_LINE {
            let mut cut = MAX_LOG_LINE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push('…');
        }
        let plugin = &*self.scope.name;
        match level {
            log::Level::Trace => tracing::trace!(target: "weir::plugin", plugin, "{message}"),
            log::Level::Debug => tracing::debug!(target: "weir::plugin", plugin, "{message}"),
            log::Level::Info => tracing::info!(target: "weir::plugin", plugin, "{message}"),
            log::Level::Warn => tracing::warn!(target: "weir::plugin", plugin, "{message}"),
            log::Level::Error => tracing::error!(target: "weir::plugin", plugin, "{message}"),
        }
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
        wasmtime::bail!(
            "kv key of {} bytes is over the {MAX_KV_KEY}-byte limit",
            key.len()
        );
    }
    Ok(())
}

fn ttl(ms: Option<u64>) -> Option<Duration> {
    ms.map(Duration::from_millis)
}

impl kv::Host for InstanceState {
    fn get(&mut self, key: String) -> Result<Option<Vec<u8>>> {
        check_key(&key)?;
        Ok(self
            .scope
            .kv
            .get(&self.scope.name, &key)
            .map(|v| v.to_vec()))
    }

    fn set(&mut self, key: String, value: Vec<u8>, ttl_ms: Option<u64>) -> Result<()> {
        check_key(&key)?;
        if value.len() > MAX_KV_VALUE {
            wasmtime::bail!(
                "kv value of {} bytes is over the {MAX_KV_VALUE}-byte limit",
                value.len()
            );
        }
        self.scope
            .kv
            .set(&self.scope.name, &key, &value, ttl(ttl_ms));
        Ok(())
    }

    fn delete(&mut self, key: String) -> Result<()> {
        check_key(&key)?;
        self.scope.kv.delete(&self.scope.name, &key);
        Ok(())
    }

    fn incr(
        &mut self,
        key: String,
        delta: i64,
        ttl_ms: Option<u64>,
    ) -> Result<Result<i64, String>> {
        check_key(&key)?;
        Ok(self
            .scope
            .kv
            .incr(&self.scope.name, &key, delta, ttl(ttl_ms))
            .map_err(|e| e.to_string()))
    }
}

impl metrics::Host for InstanceState {
    fn counter_add(&mut self, name: String, value: u64) -> Result<()> {
        if name.is_empty() || name.len() > 64 {
            wasmtime::bail!("metric name must be 1 to 64 bytes");
        }
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

impl http::Host for InstanceState {}

impl http::HostRequest for InstanceState {
    fn id(&mut self, req: Resource<RequestView>) -> Result<String> {
        Ok(self.table.get(&req)?.id.clone())
    }

    fn set_id(&mut self, req: Resource<RequestView>, id: String) -> Result<()> {
        // An id goes into headers and logs: keep it short and printable.
        if !id.is_empty() && id.len() <= 200 && id.bytes().all(|b| b.is_ascii_graphic()) {
            self.table.get_mut(&req)?.id = id;
        }
        Ok(())
    }

    fn route_id(&mut self, req: Resource<RequestView>) -> Result<String> {
        Ok(self.table.get(&req)?.route_id.to_string())
    }

    fn client_ip(&mut self, req: Resource<RequestView>) -> Result<String> {
        Ok(self.table.get(&req)?.client_ip.to_string())
    }

    fn method(&mut self, req: Resource<RequestView>) -> Result<String> {
        Ok(self.table.get(&req)?.method.to_string())
    }

    fn set_method(
        &mut self,
        req: Resource<RequestView>,
        method: String,
    ) -> Result<Result<(), String>> {
        Ok(self.table.get_mut(&req)?.set_method(&method))
    }

    fn path(&mut self, req: Resource<RequestView>) -> Result<String> {
        Ok(self.table.get(&req)?.path.clone())
    }

    fn set_path(&mut self, req: Resource<RequestView>, path: String) -> Result<Result<(), String>> {
        Ok(self.table.get_mut(&req)?.set_path(&path))
    }

    fn query(&mut self, req: Resource<RequestView>) -> Result<Option<String>> {
        Ok(self.table.get(&req)?.query.clone())
    }

    fn set_query(
        &mut self,
        req: Resource<RequestView>,
        query: Option<String>,
    ) -> Result<Result<(), String>> {
        Ok(self.table.get_mut(&req)?.set_query(query.as_deref()))
    }

    fn header(&mut self, req: Resource<RequestView>, name: String) -> Result<Option<String>> {
        Ok(headers::get(&self.table.get(&req)?.headers, &name))
    }

    fn headers(&mut self, req: Resource<RequestView>) -> Result<Vec<(String, String)>> {
        Ok(headers::all(&self.table.get(&req)?.headers))
    }

    fn set_header(
        &mut self,
        req: Resource<RequestView>,
        name: String,
        value: String,
    ) -> Result<Result<(), String>> {
        let view = self.table.get_mut(&req)?;
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
        let view = self.table.get_mut(&req)?;
        Ok(view
            .check_writable()
            .and_then(|_| headers::append(&mut view.headers, &name, &value)))
    }

    fn remove_header(&mut self, req: Resource<RequestView>, name: String) -> Result<()> {
        let view = self.table.get_mut(&req)?;
        if view.writable {
            headers::remove(&mut view.headers, &name);
        }
        Ok(())
    }

    fn body(&mut self, req: Resource<RequestView>) -> Result<Result<Vec<u8>, String>> {
        Ok(self.table.get(&req)?.body().map(|b| b.to_vec()))
    }

    fn set_body(
        &mut self,
        req: Resource<RequestView>,
        body: Vec<u8>,
    ) -> Result<Result<(), String>> {
        Ok(self.table.get_mut(&req)?.set_body(body))
    }

    fn get_var(&mut self, req: Resource<RequestView>, name: String) -> Result<Option<String>> {
        Ok(self.table.get(&req)?.vars.get(&name).cloned())
    }

    fn set_var(&mut self, req: Resource<RequestView>, name: String, value: String) -> Result<()> {
        self.table.get_mut(&req)?.vars.insert(name, value);
        Ok(())
    }

    fn drop(&mut self, req: Resource<RequestView>) -> Result<()> {
        // The host owns the request and takes it back after each call; a guest drop is a no-op.
        let _ = req;
        Ok(())
    }
}

impl http::HostResponse for InstanceState {
    fn status(&mut self, resp: Resource<ResponseView>) -> Result<u16> {
        Ok(self.table.get(&resp)?.status.as_u16())
    }

    fn set_status(
        &mut self,
        resp: Resource<ResponseView>,
        status: u16,
    ) -> Result<Result<(), String>> {
        Ok(self.table.get_mut(&resp)?.set_status(status))
    }

    fn header(&mut self, resp: Resource<ResponseView>, name: String) -> Result<Option<String>> {
        Ok(headers::get(&self.table.get(&resp)?.headers, &name))
    }

    fn headers(&mut self, resp: Resource<ResponseView>) -> Result<Vec<(String, String)>> {
        Ok(headers::all(&self.table.get(&resp)?.headers))
    }

    fn set_header(
        &mut self,
        resp: Resource<ResponseView>,
        name: String,
        value: String,
    ) -> Result<Result<(), String>> {
        Ok(headers::set(
            &mut self.table.get_mut(&resp)?.headers,
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
        Ok(headers::append(
            &mut self.table.get_mut(&resp)?.headers,
            &name,
            &value,
        ))
    }

    fn remove_header(&mut self, resp: Resource<ResponseView>, name: String) -> Result<()> {
        headers::remove(&mut self.table.get_mut(&resp)?.headers, &name);
        Ok(())
    }

    fn body(&mut self, resp: Resource<ResponseView>) -> Result<Result<Vec<u8>, String>> {
        Ok(self.table.get(&resp)?.body().map(|b| b.to_vec()))
    }

    fn set_body(
        &mut self,
        resp: Resource<ResponseView>,
        body: Vec<u8>,
    ) -> Result<Result<(), String>> {
        Ok(self.table.get_mut(&resp)?.set_body(body))
    }

    fn drop(&mut self, resp: Resource<ResponseView>) -> Result<()> {
        let _ = resp;
        Ok(())
    }
}
