//! The one way config reaches the data path: what a store publishes is built into a validated
//! snapshot and swapped in, one build at a time. Changes published during a build fold into the
//! next one, so a burst of writes costs a few builds, not one each.

use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::gateway::Gateway;
use crate::store::{ConfigStore, Published};

/// Follows one store's publications into one gateway.
pub struct Reconciler {
    gateway: Arc<Gateway>,
    store: Arc<dyn ConfigStore>,
    published: watch::Receiver<Arc<Published>>,
    applied_version: u64,
    counted_failures: u64,
    counted_resyncs: u64,
}

impl Reconciler {
    /// A reconciler that has applied nothing yet.
    pub fn new(gateway: Arc<Gateway>, store: Arc<dyn ConfigStore>) -> Self {
        let published = store.subscribe();
        Reconciler {
            gateway,
            store,
            published,
            applied_version: 0,
            counted_failures: 0,
            counted_resyncs: 0,
        }
    }

    /// Applies what the store publishes now, if it has not been applied yet.
    pub async fn apply_current(&mut self) {
        let published = self.published.borrow_and_update().clone();
        self.gateway.set_health(published.health.clone());
        while self.counted_failures < published.failures {
            self.gateway.record_failed_reload();
            self.counted_failures += 1;
        }
        let resyncs = published.resyncs - self.counted_resyncs.min(published.resyncs);
        self.gateway.metrics().store_resyncs.inc_by(resyncs);
        self.counted_resyncs = published.resyncs;
        if published.version != self.applied_version {
            self.gateway
                .apply(&published.desired, self.store.as_ref())
                .await;
            self.applied_version = published.version;
        }
    }

    /// Applies every later publication until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = self.published.changed() => if changed.is_err() { return },
            }
            self.apply_current().await;
        }
    }
}
