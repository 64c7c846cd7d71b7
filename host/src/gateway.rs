//! The gateway's shared state: the live snapshot and what builds and serves it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;
use tokio_util::task::TaskTracker;

use crate::access_log::{AccessLog, AccessLogTarget};
use crate::metrics::{Metrics, ReloadLabels};
use crate::plugin::{PluginError, PluginRuntime};
use crate::snapshot::{BuildContext, Desired, ModuleSource, Snapshot};
use crate::spans::export::{SpanExport, SpanSink};
use crate::store::StoreHealth;
use crate::upstream::ClientPool;

/// Why a gateway could not be created.
#[derive(Debug, thiserror::Error)]
pub enum GatewayInitError {
    /// The plugin engine could not start.
    #[error("plugin runtime: {0}")]
    Runtime(#[from] PluginError),
    /// The access log could not be opened.
    #[error("access log: {0}")]
    AccessLog(#[from] std::io::Error),
}

/// The state every request and every config change goes through.
pub struct Gateway {
    snapshot: ArcSwap<Snapshot>,
    health: ArcSwap<StoreHealth>,
    runtime: PluginRuntime,
    clients: ClientPool,
    metrics: Arc<Metrics>,
    access_log: AccessLog,
    /// Where sampled requests' spans go, while `server.tracing` names a collector.
    spans: SpanExport,
    /// Builds run one at a time, so that a slow build cannot overwrite a newer one.
    build_lock: tokio::sync::Mutex<()>,
    /// Set once a drain starts: `/readyz` answers 503 from then on.
    draining: AtomicBool,
    /// `on-log` calls still running, which a drain waits for.
    on_log: TaskTracker,
}

impl Gateway {
    /// A gateway serving the empty snapshot, not ready until `store` (`file` or `etcd`) has
    /// been read; compiled modules are kept in `module_cache`.
    pub fn new(
        store: &'static str,
        access_log: &AccessLogTarget,
        module_cache: Option<std::path::PathBuf>,
    ) -> Result<Arc<Self>, GatewayInitError> {
        let metrics = Arc::new(Metrics::new());
        let spans = SpanExport::new(
            metrics.tracing_spans_dropped.clone(),
            metrics.tracing_spans_exported.clone(),
        );
        Ok(Arc::new(Gateway {
            snapshot: ArcSwap::from_pointee(Snapshot::empty()),
            // Not ready until the store's first publication says how it is doing.
            health: ArcSwap::from_pointee(StoreHealth::loading(store)),
            runtime: PluginRuntime::new(metrics.clone(), module_cache)?,
            clients: ClientPool::default(),
            metrics,
            access_log: AccessLog::open(access_log)?,
            spans,
            build_lock: tokio::sync::Mutex::new(()),
            draining: AtomicBool::new(false),
            on_log: TaskTracker::new(),
        }))
    }

    /// Marks the gateway as draining: it is about to stop, and says so on `/readyz`.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Whether a drain has started.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// The `on-log` calls still running.
    pub fn pending_on_log(&self) -> &TaskTracker {
        &self.on_log
    }

    /// Flushes the access log and stops writing it.
    pub fn close_access_log(&self) {
        self.access_log.close();
    }

    /// The snapshot that new requests use.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// How the config store is doing.
    pub fn health(&self) -> Arc<StoreHealth> {
        self.health.load_full()
    }

    /// Records how the config store is doing.
    pub fn set_health(&self, health: StoreHealth) {
        self.health.store(Arc::new(health));
    }

    /// The gateway's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The plugin runtime.
    pub fn runtime(&self) -> &PluginRuntime {
        &self.runtime
    }

    pub(crate) fn access_log(&self) -> &AccessLog {
        &self.access_log
    }

    /// Where a sampled request's spans go, when `server.tracing` names a collector.
    pub(crate) fn span_sink(&self) -> Option<Arc<SpanSink>> {
        self.spans.sink()
    }

    /// Builds a snapshot from `desired` on top of the current one and swaps it in.
    /// Requests in flight finish on the snapshot they started with.
    pub async fn apply(&self, desired: &Desired, modules: &dyn ModuleSource) -> Arc<Snapshot> {
        let _one_at_a_time = self.build_lock.lock().await;
        let started = std::time::Instant::now();
        let previous = self.snapshot();
        let context = BuildContext {
            runtime: &self.runtime,
            clients: &self.clients,
            metrics: &self.metrics,
            modules,
        };
        let next = Arc::new(context.build(desired, &previous).await);
        let outcome = if next.errors.is_empty() {
            "applied"
        } else {
            "applied_with_errors"
        };
        self.metrics
            .reloads
            .get_or_create(&ReloadLabels { outcome })
            .inc();
        tracing::info!(
            generation = next.generation,
            routes = next.route_list.len(),
            upstreams = next.upstreams.len(),
            plugins = next.plugins.len(),
            errors = next.errors.len(),
            build_us = started.elapsed().as_micros() as u64,
            "config snapshot swapped in"
        );
        // Checked with the rest of `server`, so this fails only when the exporter cannot
        // start; requests then carry trace context without recording spans.
        if let Err(error) = self.spans.configure(next.server.config.tracing.as_ref()) {
            tracing::warn!(%error, "traces are not exported");
        }
        self.snapshot.store(next.clone());
        next
    }

    /// Counts a change that could not be applied at all, such as a file that is not YAML.
    pub fn record_failed_reload(&self) {
        self.metrics
            .reloads
            .get_or_create(&ReloadLabels { outcome: "failed" })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_gateway_names_its_store_and_is_not_ready_before_reading_it() {
        let gateway = Gateway::new("etcd", &AccessLogTarget::Off, None).unwrap();
        let health = gateway.health();
        assert_eq!(health.store, "etcd");
        assert!(!health.connected);
    }
}
