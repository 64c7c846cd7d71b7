//! Config stores: where the gateway's config objects come from, and how changes reach it.
//!
//! Both stores produce the same [`Desired`](crate::snapshot::Desired) objects, and the gateway
//! builds and swaps in a validated snapshot from them.

pub mod etcd;
pub mod file;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::gateway::Gateway;
use crate::snapshot::{BoxFuture, ModuleSource};

/// Why a store could not load its config at start-up.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The YAML file.
    #[error(transparent)]
    File(#[from] file::FileStoreError),
    /// etcd.
    #[error(transparent)]
    Etcd(#[from] etcd::EtcdError),
}

/// A source of config objects that keeps a gateway's snapshot current.
pub trait ConfigStore: ModuleSource + 'static {
    /// Loads the config once and applies it; the gateway starts serving only after this.
    fn load(self: Arc<Self>, gateway: Arc<Gateway>) -> BoxFuture<'static, Result<(), StoreError>>;

    /// Applies every later change until `shutdown`. What it needs to notice changes is set up
    /// before it returns (the gateway serves only after), so no change made after start-up is
    /// missed.
    fn watch(
        self: Arc<Self>,
        gateway: Arc<Gateway>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, ()>;
}
