//! Config stores: where the gateway's config objects come from.
//!
//! A store publishes what it wants served (a [`watch`] of [`Published`]); it never reaches into
//! the gateway. One reconciler (reconcile.rs, above the stores) builds, validates and swaps the
//! snapshot from whatever the store publishes. A store that takes writes (etcd) offers a
//! [`ConfigWriter`], which the admin API uses; the file store takes none, since the file is
//! the source of truth.

mod error;
pub mod etcd;
pub mod file;

pub use self::error::{FileStoreError, StoreError};

use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::Kind;
use crate::snapshot::{BoxFuture, Desired, ModuleSource};

/// How the config store is doing, as `/readyz` reports it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct StoreHealth {
    /// `file` or `etcd`.
    pub store: &'static str,
    /// Whether changes are reaching the gateway.
    pub connected: bool,
    /// Why not, when not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the store last became unreachable, RFC 3339.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// The last store revision read (etcd).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<i64>,
}

impl StoreHealth {
    /// A store nothing has been read from yet: not ready.
    pub fn loading(store: &'static str) -> Self {
        StoreHealth {
            store,
            connected: false,
            reason: Some("the config is not loaded yet".into()),
            since: None,
            revision: None,
        }
    }

    /// A store that is connected.
    pub fn connected(store: &'static str) -> Self {
        StoreHealth {
            store,
            connected: true,
            reason: None,
            since: None,
            revision: None,
        }
    }
}

/// What a store publishes: the objects it wants served, and how it is doing.
#[derive(Clone, Debug)]
pub struct Published {
    /// Goes up each time `desired` changes.
    pub version: u64,
    /// The objects, and the ones that did not parse.
    pub desired: Arc<Desired>,
    /// How the store is doing.
    pub health: StoreHealth,
    /// How many changes could not be read at all (a file that is not YAML) so far.
    pub failures: u64,
    /// How many times the store had to read everything again (etcd compacted its history).
    pub resyncs: u64,
}

/// The sending side of what a store publishes, with the bookkeeping every store needs.
pub struct Publisher {
    sender: watch::Sender<Arc<Published>>,
}

impl Publisher {
    /// Nothing published yet: version 0, no objects, connected.
    pub fn new(store: &'static str) -> Self {
        let (sender, _) = watch::channel(Arc::new(Published {
            version: 0,
            desired: Arc::new(Desired::default()),
            health: StoreHealth::connected(store),
            failures: 0,
            resyncs: 0,
        }));
        Publisher { sender }
    }

    /// A receiver of every later publication (and of the current one).
    pub fn subscribe(&self) -> watch::Receiver<Arc<Published>> {
        self.sender.subscribe()
    }

    /// Publishes what `change` makes of the current publication, unless it returns `false`.
    fn update(&self, change: impl FnOnce(&mut Published) -> bool) {
        self.sender.send_if_modified(|current| {
            let mut next = Published::clone(current);
            let changed = change(&mut next);
            if changed {
                *current = Arc::new(next);
            }
            changed
        });
    }

    /// Publishes new objects.
    pub fn objects(&self, desired: Desired) {
        self.update(|p| {
            p.version += 1;
            p.desired = Arc::new(desired);
            true
        });
    }

    /// Publishes new objects with a new health, at once.
    pub fn objects_and_health(&self, desired: Desired, health: StoreHealth) {
        self.update(|p| {
            p.version += 1;
            p.desired = Arc::new(desired);
            p.health = health;
            true
        });
    }

    /// Publishes a new health, if it changed.
    pub fn health(&self, health: StoreHealth) {
        self.update(|p| {
            let changed = p.health != health;
            p.health = health;
            changed
        });
    }

    /// Counts a change that could not be read at all; the objects stay as they were.
    pub fn failure(&self) {
        self.update(|p| {
            p.failures += 1;
            true
        });
    }

    /// Counts a resync; the objects follow in their own publication.
    pub fn resynced(&self) {
        self.update(|p| {
            p.resyncs += 1;
            true
        });
    }

    /// What is published now.
    pub fn current(&self) -> Arc<Published> {
        self.sender.borrow().clone()
    }
}

/// A source of config objects.
pub trait ConfigStore: ModuleSource + 'static {
    /// Reads the config once and publishes it; the gateway starts serving only after this.
    fn load(self: Arc<Self>) -> BoxFuture<'static, Result<(), StoreError>>;

    /// Publishes every later change until `shutdown`. What it needs to notice changes is set
    /// up before it returns or, for a store that connects first (etcd), before
    /// [`ConfigStore::following`] resolves; the gateway serves only after both.
    fn watch(self: Arc<Self>, shutdown: CancellationToken) -> BoxFuture<'static, ()>;

    /// Resolves once a change made from now on is seen as it happens: the store's watch exists
    /// (or its first attempt failed, and it is retrying). The gateway serves only after this,
    /// so that a write made once it answers is not left to a catch-up (etcd delivers a watch
    /// created behind its current revision on a 100 ms loop).
    fn following(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    /// What the store publishes.
    fn subscribe(&self) -> watch::Receiver<Arc<Published>>;

    /// The store's write side, if it takes writes.
    fn writer(&self) -> Option<&dyn ConfigWriter> {
        None
    }

    /// Where the config lives, for messages (`the file weir.yaml`, `etcd at ...`).
    fn describe(&self) -> String;
}

/// One object as a writable store holds it.
#[derive(Clone, Debug)]
pub struct StoredObject {
    /// Its id (for service nodes, `service/node`).
    pub id: String,
    /// Its JSON, as stored.
    pub value: serde_json::Value,
    /// The store revision of its last change: its ETag.
    pub revision: i64,
    /// The store revision it was created at.
    pub created: i64,
}

/// A plugin module as a writable store holds it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct StoredModule {
    /// The sha256 of its bytes: how plugin entries name it.
    pub sha256: String,
    /// Its size in bytes.
    pub size: u64,
    /// Whether it was stored before this upload.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub already_stored: bool,
}

/// What a write expects to find, for optimistic concurrency.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Whatever is there.
    Anything,
    /// Nothing: the write creates.
    Absent,
    /// The object at this revision (an `If-Match`).
    Revision(i64),
}

/// Why a write did not happen.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The object is not what the write expected.
    #[error("the object changed (its revision is now {current:?})")]
    Conflict {
        /// Its revision now, or `None` if it does not exist.
        current: Option<i64>,
    },
    /// The store could not be reached or refused the request.
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    /// The value is too large for the store.
    #[error("{0}")]
    TooLarge(String),
}

/// The write side of a store: reads at the store's latest revision, and writes that compare
/// revisions.
pub trait ConfigWriter: Send + Sync {
    /// One object of `kind`, if it exists.
    fn get<'a>(
        &'a self,
        kind: Kind,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<StoredObject>, WriteError>>;

    /// Every object of `kind`, by id.
    fn list(&self, kind: Kind) -> BoxFuture<'_, Result<Vec<StoredObject>, WriteError>>;

    /// Writes `value` as the object `kind`/`id` if `expect` holds; returns the new revision.
    fn put<'a>(
        &'a self,
        kind: Kind,
        id: &'a str,
        value: &'a serde_json::Value,
        expect: Expect,
    ) -> BoxFuture<'a, Result<i64, WriteError>>;

    /// Stores `hash` as the generated admin key's hash unless one is stored already; returns
    /// the one in force.
    fn claim_generated_key<'a>(
        &'a self,
        hash: &'a str,
    ) -> BoxFuture<'a, Result<String, WriteError>>;

    /// The document of dashboard session keys and its revision, if one is stored.
    fn session_keys(&self) -> BoxFuture<'_, Result<Option<(String, i64)>, WriteError>>;

    /// Writes the document of dashboard session keys if `expect` holds; returns its revision.
    fn put_session_keys<'a>(
        &'a self,
        document: &'a str,
        expect: Expect,
    ) -> BoxFuture<'a, Result<i64, WriteError>>;

    /// Records that the session with `nonce` ended, for `ttl_secs` (until it would have
    /// expired anyway), where every gateway can see it.
    fn revoke_session<'a>(
        &'a self,
        nonce: &'a str,
        ttl_secs: u64,
    ) -> BoxFuture<'a, Result<(), WriteError>>;

    /// Whether the session with `nonce` was ended on any gateway.
    fn session_revoked<'a>(&'a self, nonce: &'a str) -> BoxFuture<'a, Result<bool, WriteError>>;

    /// Every module stored.
    fn modules(&self) -> BoxFuture<'_, Result<Vec<StoredModule>, WriteError>>;

    /// One module, if it is stored.
    fn module<'a>(
        &'a self,
        sha256: &'a str,
    ) -> BoxFuture<'a, Result<Option<StoredModule>, WriteError>>;

    /// Stores a module's bytes (unless stored already).
    fn store_module<'a>(
        &'a self,
        bytes: &'a [u8],
    ) -> BoxFuture<'a, Result<StoredModule, WriteError>>;

    /// Deletes a module's manifest and chunks; returns whether it existed.
    fn delete_module<'a>(&'a self, sha256: &'a str) -> BoxFuture<'a, Result<bool, WriteError>>;

    /// Deletes the object `kind`/`id` if `expect` holds; returns the revision of the delete.
    fn delete<'a>(
        &'a self,
        kind: Kind,
        id: &'a str,
        expect: Expect,
    ) -> BoxFuture<'a, Result<i64, WriteError>>;
}
