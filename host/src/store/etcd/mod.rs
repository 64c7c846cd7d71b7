//! The etcd store: config objects, service nodes and plugin modules under one key prefix,
//! followed with a watch so that every gateway on the cluster converges. [`keys`] has the
//! layout; docs/etcd.md has every schema.
//!
//! Start-up reads every config key at one revision, then watches from the next one, so that
//! nothing written in between is lost. Module keys are left out of both: a gateway reads a
//! module's chunks only when a plugin entry names it. The store keeps a mirror of the keys and
//! publishes it; it never touches the gateway.

pub mod error;
pub mod keys;
mod state;
pub(crate) mod writer;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, EventType, GetOptions, KeyValue, WatchOptions};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use self::keys::{Place, locate, parse_into, read_bounded, read_module};
use self::state::{STATE_FILE, SavedState, read_state, write_atomically};
use crate::access_log::now_rfc3339;
use crate::config::{ConfigObjects, ObjectError, PluginConfig};
use crate::digest::sha256_hex;
use crate::snapshot::{BoxFuture, Desired, ModuleSource};
use crate::store::{ConfigStore, ConfigWriter, Published, Publisher, StoreError, StoreHealth};

pub use self::error::EtcdError;
pub use self::keys::CHUNK_BYTES;

/// Reconnect backoff bounds.
pub(crate) const BACKOFF_MIN: Duration = Duration::from_millis(200);
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long changes must pause before `--state-dir` is written.
const SAVE_QUIET: Duration = Duration::from_millis(250);
/// The longest `--state-dir` lags behind a stream of changes that never pauses.
const SAVE_MAX_DELAY: Duration = Duration::from_secs(5);
/// Keys read per request when the whole config is read: small enough that a page of ordinary
/// objects stays far under the client's 4 MiB response bound.
const PAGE_KEYS: i64 = 1000;

/// Where to find etcd and what to keep on disk.
#[derive(Clone, Debug)]
pub struct EtcdOptions {
    /// Client URLs, such as `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// The key prefix, such as `/weir`.
    pub prefix: String,
    /// Where the last good config and its modules are kept, to start while etcd is down.
    pub state_dir: Option<PathBuf>,
    /// The largest module accepted from the store; a manifest claiming more is refused before
    /// anything is read or allocated.
    pub max_module_bytes: u64,
}

/// The default bound on a module's size: 64 MiB.
pub const DEFAULT_MAX_MODULE_BYTES: u64 = 64 << 20;

impl EtcdOptions {
    /// Options for `endpoints` with the default prefix (`/weir`) and bounds, and no state dir.
    pub fn new(endpoints: Vec<String>) -> Self {
        EtcdOptions {
            endpoints,
            prefix: "/weir".into(),
            state_dir: None,
            max_module_bytes: DEFAULT_MAX_MODULE_BYTES,
        }
    }

    pub(crate) fn endpoints_text(&self) -> String {
        self.endpoints.join(",")
    }

    /// The prefix without a trailing slash.
    pub(crate) fn root(&self) -> String {
        let trimmed = self.prefix.trim_end_matches('/');
        if trimmed.starts_with('/') {
            trimmed.to_owned()
        } else {
            format!("/{trimmed}")
        }
    }
}

/// Connects to etcd with the timeouts a gateway wants: fail fast, and notice a dead peer.
pub async fn connect(options: &EtcdOptions) -> Result<Client, EtcdError> {
    let connect = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(5))
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
        .with_keep_alive_while_idle(true);
    Client::connect(&options.endpoints, Some(connect))
        .await
        .map_err(|source| client_error(options, source))
}

pub(crate) fn client_error(options: &EtcdOptions, source: etcd_client::Error) -> EtcdError {
    EtcdError::Client {
        endpoints: options.endpoints_text(),
        source,
    }
}

/// One config key as stored.
struct Stored {
    raw: Vec<u8>,
    revision: i64,
    /// Whether its object is in the mirror's objects (else it is in `invalid`).
    held: bool,
}

/// The store's copy of the config keys.
#[derive(Default)]
struct Mirror {
    /// Every event up to this revision has been applied: a new watch resumes after it.
    revision: i64,
    entries: BTreeMap<String, Stored>,
    /// When deleted keys went, so that a replayed older event cannot bring them back.
    tombstones: std::collections::HashMap<String, i64>,
    /// Counts changes to `entries`, so that a publication can tell whether it has news.
    changes: u64,
    /// `changes` as last published.
    published: u64,
    /// The parsed objects of `entries`, kept up to date event by event, so that publishing
    /// them copies a pointer, not 100,000 routes.
    objects: Arc<ConfigObjects>,
    /// The keys of `entries` that did not parse, and why.
    invalid: BTreeMap<String, ObjectError>,
}

impl Mirror {
    /// Applies one event (`value` is `None` for a delete) unless the key already reflects a
    /// later one.
    fn apply(&mut self, root: &str, key: String, value: Option<&[u8]>, revision: i64) {
        let newer_known = self
            .entries
            .get(&key)
            .map(|s| s.revision)
            .max(self.tombstones.get(&key).copied());
        if newer_known.is_some_and(|known| known >= revision) {
            return;
        }
        let Some(place) = locate(root, &key) else {
            return;
        };
        match value {
            Some(value) => {
                self.tombstones.remove(&key);
                if let Some(old) = self.entries.remove(&key) {
                    self.withdraw(&key, &place, old.held);
                }
                let held = self.add(&key, place, value);
                let stored = Stored {
                    raw: value.to_vec(),
                    revision,
                    held,
                };
                self.entries.insert(key, stored);
                self.changes += 1;
            }
            None => {
                if let Some(old) = self.entries.remove(&key) {
                    self.withdraw(&key, &place, old.held);
                    self.changes += 1;
                }
                self.tombstones.insert(key, revision);
            }
        }
    }

    /// Puts what `key` now holds into the published objects, or records why it cannot;
    /// returns whether it went in.
    fn add(&mut self, key: &str, place: Place, value: &[u8]) -> bool {
        let added = place
            .and_then(|(kind, id)| parse_into(Arc::make_mut(&mut self.objects), kind, &id, value));
        match added {
            Ok(()) => {
                self.invalid.remove(key);
                true
            }
            Err(error) => {
                self.invalid.insert(key.to_owned(), error.at_key(key));
                false
            }
        }
    }

    /// Takes what `key` held out of the published objects (`held`) or the invalid ones.
    fn withdraw(&mut self, key: &str, place: &Place, held: bool) {
        match place {
            Ok((kind, id)) if held => {
                let objects = Arc::make_mut(&mut self.objects);
                if let Some(slot) = objects.slot_mut(*kind) {
                    slot.remove(id);
                }
            }
            _ => {
                self.invalid.remove(key);
            }
        }
    }

    /// Applies one watch event.
    fn apply_event(&mut self, root: &str, event: EventType, kv: &KeyValue) {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        let value = (event == EventType::Put).then(|| kv.value());
        self.apply(root, key, value, kv.mod_revision());
    }

    /// The objects the mirror holds, as the snapshot builder wants them.
    fn desired(&self) -> Desired {
        Desired {
            objects: self.objects.clone(),
            unparsed: self.invalid.values().cloned().collect(),
        }
    }
}

/// The etcd config store.
pub struct EtcdStore {
    options: EtcdOptions,
    root: String,
    mirror: Mutex<Mirror>,
    /// Set while connected, for module fetches and writes.
    client: Mutex<Option<Client>>,
    /// Woken when the mirror changes.
    changed: Notify,
    /// Set once the first watch exists, or the first attempt to create it failed.
    following: watch::Sender<bool>,
    publisher: Publisher,
}

impl EtcdStore {
    /// A store for `options`; nothing connects until [`ConfigStore::load`].
    pub fn new(options: EtcdOptions) -> Self {
        let root = options.root();
        EtcdStore {
            options,
            root,
            mirror: Mutex::new(Mirror::default()),
            client: Mutex::new(None),
            changed: Notify::new(),
            following: watch::Sender::new(false),
            publisher: Publisher::new("etcd"),
        }
    }

    /// The two key ranges that hold config: everything under the prefix except `modules/`.
    fn config_ranges(&self) -> [(String, String); 2] {
        let root = &self.root;
        [
            (format!("{root}/"), format!("{root}/modules/")),
            (format!("{root}/modules0"), format!("{root}0")),
        ]
    }

    /// Reads every config key at one revision and replaces the mirror.
    async fn resync(&self, client: &mut Client) -> Result<(), EtcdError> {
        let [(first, first_end), (second, second_end)] = self.config_ranges();
        let (revision, mut kvs) = self.read_range(client, first, first_end, None).await?;
        let (_, tail) = self
            .read_range(client, second, second_end, Some(revision))
            .await?;
        kvs.extend(tail);
        let kvs = kvs.iter().map(|kv| {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            (key, kv.value(), kv.mod_revision())
        });
        self.replace_mirror(revision, kvs);
        Ok(())
    }

    /// Every key from `start` up to `end`, read in pages (one response for 100,000 routes would
    /// be over the client's 4 MiB bound), all at one revision: `revision`, or the first
    /// page's, which is returned.
    async fn read_range(
        &self,
        client: &mut Client,
        start: String,
        end: String,
        revision: Option<i64>,
    ) -> Result<(i64, Vec<KeyValue>), EtcdError> {
        let mut from = start.into_bytes();
        let mut revision = revision;
        let mut kvs = Vec::new();
        loop {
            let mut options = GetOptions::new()
                .with_range(end.as_bytes())
                .with_limit(PAGE_KEYS);
            if let Some(revision) = revision {
                options = options.with_revision(revision);
            }
            let mut page = client
                .get(from.clone(), Some(options))
                .await
                .map_err(|e| client_error(&self.options, e))?;
            let at =
                *revision.get_or_insert(page.header().map(|h| h.revision()).unwrap_or_default());
            let more = page.more();
            let taken = page.take_kvs();
            let Some(last) = taken.last() else {
                return Ok((at, kvs));
            };
            // The next page starts just after the last key of this one.
            from = last.key().to_vec();
            from.push(0);
            kvs.extend(taken);
            if !more {
                return Ok((at, kvs));
            }
        }
    }

    /// Replaces the mirror with `kvs` at `revision`.
    fn replace_mirror<'a>(
        &self,
        revision: i64,
        kvs: impl Iterator<Item = (String, &'a [u8], i64)>,
    ) {
        let mut mirror = self.mirror.lock().expect("mirror lock");
        let changes = mirror.changes + 1;
        let published = mirror.published;
        *mirror = Mirror {
            revision,
            changes,
            published,
            ..Mirror::default()
        };
        for (key, value, revision) in kvs {
            mirror.apply(&self.root, key, Some(value), revision);
        }
        drop(mirror);
        self.changed.notify_one();
    }

    /// Publishes the mirror if it changed since it was last published; returns its revision.
    fn publish_mirror(&self) -> Option<i64> {
        let (desired, revision) = {
            let mut mirror = self.mirror.lock().expect("mirror lock");
            if mirror.changes == mirror.published {
                return None;
            }
            mirror.published = mirror.changes;
            (mirror.desired(), mirror.revision)
        };
        let mut health = self.publisher.current().health.clone();
        health.revision = Some(revision);
        self.publisher.objects_and_health(desired, health);
        Some(revision)
    }

    /// Publishes the mirror whenever it changes, and keeps `--state-dir` up to date. The state
    /// is saved once changes pause for [`SAVE_QUIET`] (at most [`SAVE_MAX_DELAY`] after the
    /// first unsaved one), not after each, and on a blocking thread: writing 100,000 keys takes
    /// longer than applying a change, and changes go on being published while it is written.
    async fn publish_changes(self: Arc<Self>, shutdown: CancellationToken) {
        let mut saved_revision = 0;
        // The first and the last publication not saved yet.
        let mut unsaved: Option<(tokio::time::Instant, tokio::time::Instant)> = None;
        // One save at a time, so that an older state never lands after a newer one.
        let mut saving: Option<tokio::task::JoinHandle<()>> = None;
        loop {
            let save_at = unsaved
                .filter(|_| saving.is_none())
                .map(|(first, last)| (last + SAVE_QUIET).min(first + SAVE_MAX_DELAY));
            tokio::select! {
                _ = shutdown.cancelled() => {
                    if let Some(save) = saving.take() {
                        let _ = save.await;
                    }
                    if unsaved.is_some() {
                        self.save_now();
                    }
                    return;
                }
                _ = self.changed.notified() => {
                    // Let the rest of a burst of events land in the mirror first.
                    tokio::task::yield_now().await;
                    if let Some(revision) = self.publish_mirror()
                        && revision != saved_revision
                    {
                        let now = tokio::time::Instant::now();
                        let first = unsaved.map_or(now, |(first, _)| first);
                        unsaved = Some((first, now));
                        saved_revision = revision;
                    }
                }
                _ = tokio::time::sleep_until(save_at.unwrap_or_else(tokio::time::Instant::now)), if save_at.is_some() => {
                    let store = self.clone();
                    saving = Some(tokio::task::spawn_blocking(move || store.save_now()));
                    unsaved = None;
                }
                _ = async { saving.as_mut().expect("a save is in flight").await }, if saving.is_some() => {
                    saving = None;
                }
            }
        }
    }

    /// Saves the state, or says why it could not.
    fn save_now(&self) {
        if let Err(error) = self.save_state() {
            tracing::warn!(%error, "could not save the etcd state");
        }
    }

    /// Connects, catches up, and follows the watch until it breaks or `shutdown`.
    async fn follow(
        &self,
        shutdown: &CancellationToken,
        resync: &mut bool,
    ) -> Result<(), EtcdError> {
        let mut client = connect(&self.options).await?;
        if *resync {
            self.resync(&mut client).await?;
            self.publisher.resynced();
            *resync = false;
        }
        let start = self.mirror.lock().expect("mirror lock").revision + 1;
        let mut stream = None;
        for (from, to) in self.config_ranges() {
            let options = WatchOptions::new()
                .with_range(to)
                .with_start_revision(start)
                .with_progress_notify();
            match &mut stream {
                None => {
                    stream = Some(
                        client
                            .watch(from, Some(options))
                            .await
                            .map_err(|e| client_error(&self.options, e))?,
                    );
                }
                Some(stream) => stream
                    .watch(from, Some(options))
                    .await
                    .map_err(|e| client_error(&self.options, e))?,
            }
        }
        let mut stream = stream.expect("two ranges are watched");
        *self.client.lock().expect("client lock") = Some(client.clone());
        self.publisher.health(StoreHealth {
            revision: Some(start - 1),
            ..StoreHealth::connected("etcd")
        });
        tracing::info!(revision = start - 1, "following etcd");
        self.following.send_replace(true);
        // How far each watcher has delivered; the mirror is complete up to the lower of the two.
        let mut delivered: BTreeMap<i64, i64> = BTreeMap::new();
        loop {
            let message = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                message = stream.message() => message,
            };
            let response = match message {
                Ok(Some(response)) => response,
                Ok(None) => {
                    return Err(EtcdError::Unreachable {
                        endpoints: self.options.endpoints_text(),
                        reason: "the watch stream ended".into(),
                    });
                }
                Err(e) => return Err(client_error(&self.options, e)),
            };
            if response.compact_revision() > 0 || response.canceled() {
                // The revisions we missed are gone: read everything again.
                tracing::warn!(
                    compacted = response.compact_revision(),
                    reason = response.cancel_reason(),
                    "etcd watch was cancelled; resyncing"
                );
                *resync = true;
                return Err(EtcdError::Unreachable {
                    endpoints: self.options.endpoints_text(),
                    reason: format!(
                        "watch cancelled at compacted revision {}",
                        response.compact_revision()
                    ),
                });
            }
            if response.created() {
                delivered.insert(response.watch_id(), start - 1);
                continue;
            }
            let revision = response.header().map(|h| h.revision()).unwrap_or_default();
            match delivered.get_mut(&response.watch_id()) {
                Some(watcher) => *watcher = (*watcher).max(revision),
                // A progress report for the whole stream: every watcher is caught up.
                None => delivered.values_mut().for_each(|w| *w = (*w).max(revision)),
            }
            {
                let mut mirror = self.mirror.lock().expect("mirror lock");
                for event in response.events() {
                    if let Some(kv) = event.kv() {
                        mirror.apply_event(&self.root, event.event_type(), kv);
                    }
                }
                if delivered.len() == 2 {
                    let caught_up = *delivered.values().min().expect("two watchers");
                    mirror.revision = mirror.revision.max(caught_up);
                }
            }
            if !response.events().is_empty() {
                self.changed.notify_one();
                // Ask where the other watcher stands, so the resume point moves for both.
                stream
                    .request_progress()
                    .await
                    .map_err(|e| client_error(&self.options, e))?;
            }
        }
    }

    async fn keep_following(self: Arc<Self>, shutdown: CancellationToken, mut resync: bool) {
        let mut backoff = BACKOFF_MIN;
        let mut since = None;
        while !shutdown.is_cancelled() {
            let result = self.follow(&shutdown, &mut resync).await;
            self.following.send_replace(true);
            *self.client.lock().expect("client lock") = None;
            let Err(error) = result else { return };
            if resync {
                // A compaction, not an outage: resync at once.
                continue;
            }
            let since = since.get_or_insert_with(now_rfc3339).clone();
            tracing::warn!(%error, retry_in = ?backoff, "etcd unreachable; serving the last good config");
            self.publisher.health(StoreHealth {
                store: "etcd",
                connected: false,
                reason: Some(error.to_string()),
                since: Some(since),
                revision: Some(self.mirror.lock().expect("mirror lock").revision),
            });
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    fn state_path(&self) -> Option<PathBuf> {
        self.options
            .state_dir
            .as_ref()
            .map(|dir| dir.join(STATE_FILE))
    }

    fn module_path(&self, sha256: &str) -> Option<PathBuf> {
        self.options
            .state_dir
            .as_ref()
            .map(|dir| dir.join("modules").join(format!("{sha256}.wasm")))
    }

    fn save_state(&self) -> Result<(), EtcdError> {
        let Some(path) = self.state_path() else {
            return Ok(());
        };
        let state = {
            let mirror = self.mirror.lock().expect("mirror lock");
            SavedState {
                revision: mirror.revision,
                keys: mirror
                    .entries
                    .iter()
                    .map(|(key, stored)| {
                        (
                            key.clone(),
                            String::from_utf8_lossy(&stored.raw).into_owned(),
                        )
                    })
                    .collect(),
            }
        };
        let text = serde_json::to_vec(&state).expect("state serializes");
        write_atomically(&path, &text)
    }

    /// The saved state: `Ok(None)` without one, and an error (for the operator) when there is
    /// one that cannot be trusted.
    fn load_state(&self) -> Result<Option<SavedState>, String> {
        let Some(path) = self.state_path() else {
            return Ok(None);
        };
        let Some(text) = read_state(&path).map_err(|e| format!("{}: {e}", path.display()))? else {
            return Ok(None);
        };
        let state: SavedState = match serde_json::from_slice(&text) {
            Ok(state) => state,
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "saved etcd state is unreadable");
                return Ok(None);
            }
        };
        Ok(Some(state))
    }

    /// A client, while connected.
    fn client(&self) -> Option<Client> {
        self.client.lock().expect("client lock").clone()
    }

    async fn fetch_module(&self, sha256: &str) -> Result<Vec<u8>, String> {
        let max = self.options.max_module_bytes;
        if let Some(path) = self.module_path(sha256)
            && let Ok(bytes) = read_bounded(&path, max).await
            && sha256_hex(&bytes) == sha256
        {
            return Ok(bytes);
        }
        let mut client = self
            .client()
            .ok_or("etcd is unreachable and the module is not in --state-dir")?;
        let bytes = read_module(&mut client, &self.root, sha256, max)
            .await
            .map_err(|e| e.to_string())?;
        if let Some(path) = self.module_path(sha256)
            && let Err(error) = write_atomically(&path, &bytes)
        {
            tracing::warn!(%error, "could not keep the module in --state-dir");
        }
        Ok(bytes)
    }
}

impl ConfigStore for EtcdStore {
    fn load(self: Arc<Self>) -> BoxFuture<'static, Result<(), StoreError>> {
        Box::pin(async move {
            let loaded = async {
                let mut client = connect(&self.options).await?;
                self.resync(&mut client).await?;
                *self.client.lock().expect("client lock") = Some(client);
                Ok::<_, EtcdError>(())
            }
            .await;
            let connected = match loaded {
                Ok(()) => true,
                Err(error) => {
                    let state = match self.load_state() {
                        Ok(Some(state)) => state,
                        Ok(None) => {
                            return Err(EtcdError::Unreachable {
                                endpoints: self.options.endpoints_text(),
                                reason: error.to_string(),
                            }
                            .into());
                        }
                        Err(refused) => {
                            return Err(EtcdError::UntrustedState {
                                endpoints: self.options.endpoints_text(),
                                reason: error.to_string(),
                                refused,
                            }
                            .into());
                        }
                    };
                    let revision = state.revision;
                    tracing::warn!(%error, revision, "etcd unreachable; serving the saved state");
                    let kvs = state
                        .keys
                        .iter()
                        .map(|(key, value)| (key.clone(), value.as_bytes(), revision));
                    self.replace_mirror(revision, kvs);
                    // Nothing to wait for before serving: the watch will retry in the background.
                    self.following.send_replace(true);
                    false
                }
            };
            let revision = self.mirror.lock().expect("mirror lock").revision;
            self.publisher.health(StoreHealth {
                store: "etcd",
                connected,
                reason: (!connected)
                    .then(|| "etcd unreachable at start-up; serving --state-dir".to_owned()),
                since: (!connected).then(now_rfc3339),
                revision: Some(revision),
            });
            self.publish_mirror();
            if connected && let Err(error) = self.save_state() {
                tracing::warn!(%error, "could not save the etcd state");
            }
            Ok(())
        })
    }

    fn watch(self: Arc<Self>, shutdown: CancellationToken) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let publishing = tokio::spawn(self.clone().publish_changes(shutdown.clone()));
            self.keep_following(shutdown, false).await;
            let _ = publishing.await;
        })
    }

    fn subscribe(&self) -> watch::Receiver<Arc<Published>> {
        self.publisher.subscribe()
    }

    fn following(&self) -> BoxFuture<'_, ()> {
        let mut following = self.following.subscribe();
        Box::pin(async move {
            // An error means the store is gone, and there is nothing to wait for.
            let _ = following.wait_for(|following| *following).await;
        })
    }

    fn writer(&self) -> Option<&dyn ConfigWriter> {
        Some(self)
    }

    fn describe(&self) -> String {
        format!(
            "etcd at {} under {}",
            self.options.endpoints_text(),
            self.root
        )
    }
}

impl ModuleSource for EtcdStore {
    fn fetch<'a>(&'a self, plugin: &'a PluginConfig) -> BoxFuture<'a, Result<Vec<u8>, String>> {
        Box::pin(async move {
            let sha256 = plugin.sha256.as_deref().ok_or(
                "the etcd store loads modules by `sha256` (push them with `weir plugin push`)",
            )?;
            self.fetch_module(sha256).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::keys::ModuleManifest;
    use super::*;
    use crate::config::{self, Kind};
    use proptest::prelude::*;
    use serde_json::Value as Json;

    /// What a fresh mirror makes of the one key `key` holding `value`: its objects and what it
    /// refused, or `None` when it ignores the key.
    fn apply_one(key: &str, value: &[u8]) -> Option<Desired> {
        let mut mirror = Mirror::default();
        mirror.apply("/weir", key.to_owned(), Some(value), 1);
        (!mirror.entries.is_empty()).then(|| mirror.desired())
    }

    /// Why a fresh mirror refuses `key` holding `value`.
    fn refused(key: &str, value: &[u8]) -> ObjectError {
        let desired = apply_one(key, value).expect("a config key");
        assert_eq!(desired.unparsed.len(), 1, "{key}: {:?}", desired.objects);
        desired.unparsed[0].clone()
    }

    #[test]
    fn keys_map_to_objects_with_their_reasons() {
        let route = apply_one(
            "/weir/routes/api",
            br#"{"uri": "/api/*", "upstream_id": "u"}"#,
        )
        .unwrap();
        assert_eq!(route.objects.routes["api"].id, "api");
        assert!(route.unparsed.is_empty());
        let mismatch = refused(
            "/weir/routes/api",
            br#"{"id": "other", "uri": "/a", "upstream_id": "u"}"#,
        );
        assert!(mismatch.reason.contains("does not match"), "{mismatch}");
        assert_eq!(mismatch.key.as_deref(), Some("/weir/routes/api"));
        let bad_json = refused("/weir/upstreams/u", b"{nope");
        assert!(bad_json.kind == Kind::Upstream && bad_json.reason.contains("invalid JSON"));
        let unknown_field = refused("/weir/plugins/p", br#"{"sha256": "x", "colour": 1}"#);
        assert!(unknown_field.reason.contains("unknown field `colour`"));
        let node = apply_one(
            "/weir/services/users/n1",
            br#"{"host": "10.0.0.1", "port": 80}"#,
        )
        .unwrap();
        assert_eq!(node.objects.services["users"]["n1"].port, 80);
        let bad_node = refused("/weir/services/users", br#"{}"#);
        assert_eq!(bad_node.kind, Kind::ServiceNode);
        assert!(apply_one("/weir/modules/abc", b"..").is_none());
        assert!(apply_one("/weir/modules/abc/000001", b"..").is_none());
        assert!(apply_one("/other/routes/x", b"{}").is_none());
        assert!(apply_one("/weir/admin_generated_key", b"..").is_none());
        let consumer = apply_one("/weir/consumers/x", b"{}").unwrap();
        assert_eq!(consumer.objects.consumers["x"].name, "x");
        let consumer = refused(
            "/weir/consumers/x",
            br#"{"credentials": {"key-auth": "k"}}"#,
        );
        assert!(
            consumer.kind == Kind::Consumer && consumer.reason.contains("/credentials/key-auth")
        );
        let ssl = refused("/weir/ssl/x", b"{}");
        assert!(ssl.kind == Kind::Ssl && ssl.reason.contains("missing field `cert`"));
        assert_eq!(refused("/weir/colours/x", b"{}").kind, Kind::Key);
        let settings = apply_one("/weir/service-settings/users", b"{}").unwrap();
        assert_eq!(settings.objects.service_settings["users"].name, "users");
        assert!(
            apply_one("/weir/server", b"{}")
                .unwrap()
                .objects
                .server
                .is_some()
        );
        assert_eq!(refused("/weir/server/x", b"{}").kind, Kind::Key);
        let nested = refused("/weir/routes/a/b", br#"{"uri": "/", "upstream_id": "u"}"#);
        assert!(
            nested.reason.contains("must end in one id segment"),
            "{nested}"
        );
    }

    #[test]
    fn prefixes_are_normalised_and_ranges_skip_modules() {
        let store = |prefix: &str| {
            EtcdStore::new(EtcdOptions {
                prefix: prefix.into(),
                ..EtcdOptions::new(vec![])
            })
        };
        assert_eq!(store("/weir/").root, "/weir");
        assert_eq!(store("weir").root, "/weir");
        let ranges = store("/weir").config_ranges();
        let module = "/weir/modules/abc/000000";
        for (start, end) in &ranges {
            assert!(
                !(module >= start.as_str() && module < end.as_str()),
                "{start}..{end} holds {module}"
            );
        }
        for key in [
            "/weir/consumers/a",
            "/weir/plugins/a",
            "/weir/routes/a",
            "/weir/services/s/n",
            "/weir/upstreams/u",
        ] {
            assert!(
                ranges
                    .iter()
                    .any(|(s, e)| key >= s.as_str() && key < e.as_str()),
                "{key}"
            );
        }
    }
    /// Any JSON, a few levels deep.
    fn json() -> BoxedStrategy<Json> {
        let leaf = prop_oneof![
            Just(Json::Null),
            any::<bool>().prop_map(Json::Bool),
            any::<i64>().prop_map(Json::from),
            any::<u64>().prop_map(Json::from),
            any::<f64>().prop_filter_map("finite", |f| {
                serde_json::Number::from_f64(f).map(Json::Number)
            }),
            "[a-z_]{0,8}".prop_map(Json::String),
            any::<String>().prop_map(Json::String),
        ];
        let key = prop_oneof!["id|name|size|chunks|[a-z_]{1,8}", any::<String>()];
        leaf.prop_recursive(4, 48, 6, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Json::Array),
                prop::collection::btree_map(key.clone(), inner, 0..6)
                    .prop_map(|m| Json::Object(m.into_iter().collect())),
            ]
        })
        .boxed()
    }

    /// Every key section the layout has, some it refuses, and some it does not know.
    const SECTIONS: &[&str] = &[
        "routes",
        "service-settings",
        "upstreams",
        "plugins",
        "tenants",
        "services",
        "server",
        "modules",
        "consumers",
        "ssl",
        "unknown",
        "",
    ];

    /// A key under `/weir/`: a section, then anything (often nothing, or more slashes).
    fn key() -> impl Strategy<Value = String> {
        let tail = prop_oneof![
            Just(String::new()),
            "(/[a-z0-9._]{0,4}){1,3}/?",
            any::<String>().prop_map(|s| format!("/{s}")),
            any::<String>(),
        ];
        (prop::sample::select(SECTIONS), tail)
            .prop_map(|(section, tail)| format!("/weir/{section}{tail}"))
    }

    /// Checks what a fresh mirror makes of `key` holding `value`: what it keeps is valid
    /// (parsing is the validation), of the kind the key names, and builds where the gateway
    /// would build it (upstreams), so that nothing a key holds is shown to panic there either.
    fn check_key(key: &str, value: &[u8]) {
        let section = key
            .strip_prefix("/weir/")
            .and_then(|rest| rest.split('/').next());
        let Some(desired) = apply_one(key, value) else {
            // Only module keys, and keys outside the root, are left out.
            assert!(matches!(section, None | Some("modules")), "{key}");
            return;
        };
        for error in &desired.unparsed {
            let _ = error.to_string();
        }
        let objects = &desired.objects;
        for info in config::KINDS {
            let Some(slot) = objects.slot(info.kind) else {
                continue;
            };
            if slot.list().is_empty() {
                continue;
            }
            assert_eq!(section, info.key, "{key}");
            if info.layout == config::Layout::Single {
                assert_eq!(key.strip_prefix("/weir/"), info.key);
            }
        }
        for route in objects.routes.values() {
            config::verify(&**route).unwrap();
        }
        for upstream in objects.upstreams.values() {
            crate::store::file::tests::check_upstream(upstream);
        }
        for plugin in objects.plugins.values() {
            config::verify(plugin).unwrap();
        }
        for tenant in objects.tenants.values() {
            config::verify(tenant).unwrap();
        }
        for ssl in objects.ssl.values() {
            config::verify(ssl).unwrap();
        }
        for consumer in objects.consumers.values() {
            config::verify(consumer).unwrap();
        }
        for settings in objects.service_settings.values() {
            config::verify(settings).unwrap();
        }
        if let Some(server) = &objects.server {
            config::verify(server).unwrap();
        }
        if let Some(admin) = &objects.admin {
            config::verify(admin).unwrap();
        }
        for (service, nodes) in &objects.services {
            for value in nodes.values() {
                config::verify(value).unwrap();
                // What `Snapshot::build_services` makes of a service's live nodes.
                let config = crate::config::ServiceSettings::plain(service)
                    .upstream(vec![value.upstream_node()]);
                let metrics = crate::metrics::Metrics::new();
                let pool = crate::upstream::ClientPool::default();
                crate::upstream::Upstream::new(config, &pool, &metrics).unwrap();
            }
        }
    }

    /// What `mirror.desired()` must equal: what a fresh mirror makes of its entries' values.
    fn desired_from_entries(mirror: &Mirror) -> Desired {
        let mut fresh = Mirror::default();
        for (key, stored) in &mirror.entries {
            fresh.apply("/weir", key.clone(), Some(&stored.raw), stored.revision);
        }
        fresh.desired()
    }

    /// A config object with a key that names it (now and then one that does not), and the
    /// value's bytes, now and then cut short.
    fn keyed_object() -> impl Strategy<Value = (String, Vec<u8>)> {
        use crate::store::file::tests::config_object;
        let object = prop_oneof![
            config_object(Kind::Route).prop_map(|v| ("routes", "id", v)),
            config_object(Kind::Upstream).prop_map(|v| ("upstreams", "id", v)),
            config_object(Kind::Plugin).prop_map(|v| ("plugins", "name", v)),
            config_object(Kind::Tenant).prop_map(|v| ("tenants", "name", v)),
            config_object(Kind::Server).prop_map(|v| ("server", "", v)),
            config_object(Kind::ServiceNode).prop_map(|v| ("services", "", v)),
            config_object(Kind::ServiceSettings).prop_map(|v| ("service-settings", "name", v)),
            (prop::sample::select(SECTIONS), json()).prop_map(|(s, v)| (s, "", v)),
        ];
        let other_name = prop_oneof![
            "[a-z0-9]{1,4}(/[a-z0-9]{1,4})?".prop_map(Some),
            Just(None),
            Just(Some(String::new())),
            any::<String>().prop_map(Some),
        ];
        (
            object,
            prop::option::weighted(0.1, other_name),
            prop::option::weighted(0.05, any::<prop::sample::Index>()),
        )
            .prop_map(|((section, id_field, value), other_name, cut)| {
                let own_name = match section {
                    "services" => Some("svc/node".to_owned()),
                    _ => value
                        .get(id_field)
                        .and_then(Json::as_str)
                        .map(str::to_owned),
                };
                let key = match other_name.unwrap_or(own_name) {
                    Some(name) => format!("/weir/{section}/{name}"),
                    None => format!("/weir/{section}"),
                };
                let mut bytes = serde_json::to_vec(&value).expect("JSON serializes");
                if let Some(cut) = cut {
                    bytes.truncate(cut.index(bytes.len() + 1));
                }
                (key, bytes)
            })
    }

    /// A module manifest: mostly a consistent one, near the chunk and size bounds.
    fn manifest() -> impl Strategy<Value = Vec<u8>> {
        let chunk = CHUNK_BYTES as u64;
        let size = prop_oneof![
            prop::sample::select(vec![
                0,
                1,
                chunk - 1,
                chunk,
                chunk + 1,
                DEFAULT_MAX_MODULE_BYTES,
                DEFAULT_MAX_MODULE_BYTES + 1,
                u64::MAX - 1,
                u64::MAX,
            ]),
            any::<u64>(),
        ];
        let consistent = size.clone().prop_map(
            move |size| serde_json::json!({"size": size, "chunks": size.div_ceil(chunk).max(1)}),
        );
        let loose = (size, any::<u64>())
            .prop_map(|(size, chunks)| serde_json::json!({"size": size, "chunks": chunks}));
        prop_oneof![
            4 => consistent.prop_map(|v| v.to_string().into_bytes()),
            2 => loose.prop_map(|v| v.to_string().into_bytes()),
            1 => json().prop_map(|v| v.to_string().into_bytes()),
            1 => prop::collection::vec(any::<u8>(), 0..48),
            1 => "\\{\"size\": -?[0-9]{1,22}(\\.[0-9])?(e[0-9]{1,3})?, \"chunks\": [0-9]{1,3}\\}"
                .prop_map(String::into_bytes),
        ]
    }

    fn saved_state() -> impl Strategy<Value = Vec<u8>> {
        let keys = prop::collection::btree_map(key(), any::<String>(), 0..4);
        let structured = (
            any::<i64>(),
            keys,
            prop::collection::vec(keyed_object(), 0..4),
        )
            .prop_map(|(revision, mut keys, objects)| {
                for (key, value) in objects {
                    keys.insert(key, String::from_utf8_lossy(&value).into_owned());
                }
                serde_json::to_vec(&SavedState { revision, keys }).expect("state serializes")
            });
        prop_oneof![
            4 => structured,
            1 => json().prop_map(|v| v.to_string().into_bytes()),
            1 => prop::collection::vec(any::<u8>(), 0..64),
        ]
    }

    proptest! {
        #![proptest_config(crate::proptest_cases(20_000))]

        #[test]
        fn fuzz_etcd_parse_entry_never_panics_on_any_bytes(
            key in key(),
            value in prop::collection::vec(any::<u8>(), 0..64),
        ) {
            check_key(&key, &value);
            // A key that is not under the root is ignored, not refused.
            prop_assert!(
                super::keys::locate("/weir/routes", &key).is_none()
                    || key.starts_with("/weir/routes/")
            );
        }

        #[test]
        fn fuzz_etcd_module_manifest_never_panics_and_holds_its_bounds(
            value in manifest(),
            max in prop_oneof![
                prop::sample::select(vec![
                    0,
                    1,
                    CHUNK_BYTES as u64,
                    DEFAULT_MAX_MODULE_BYTES,
                    u64::MAX,
                ]),
                any::<u64>(),
            ],
        ) {
            if let Ok(manifest) = ModuleManifest::parse(&value, max) {
                prop_assert!(manifest.size <= max);
                let chunks = manifest.size.div_ceil(CHUNK_BYTES as u64).max(1);
                prop_assert_eq!(manifest.chunks, chunks);
            }
        }
    }

    proptest! {
        // Generating the objects costs more than parsing them (the strategies run unoptimised
        // in a debug build): 10_000 cases take 2 to 4 s each.
        #![proptest_config(crate::proptest_cases(10_000))]

        #[test]
        fn fuzz_the_mirror_kept_event_by_event_publishes_what_its_keys_hold(
            objects in prop::collection::vec(keyed_object(), 1..6),
            events in prop::collection::vec((any::<prop::sample::Index>(), 0..3u8), 1..24),
        ) {
            let root = "/weir";
            let mut mirror = Mirror::default();
            for (revision, (pick, op)) in events.into_iter().enumerate() {
                let (key, value) = pick.get(&objects).clone();
                let value = match op {
                    0 => Some(value),
                    1 => Some(b"{not json".to_vec()),
                    _ => None,
                };
                mirror.apply(root, key, value.as_deref(), revision as i64 + 1);
                let kept = mirror.desired();
                let rebuilt = desired_from_entries(&mirror);
                prop_assert_eq!(&*kept.objects, &*rebuilt.objects);
                prop_assert_eq!(kept.unparsed, rebuilt.unparsed);
            }
        }

        #[test]
        fn fuzz_etcd_parse_entry_never_panics_on_structured_json(
            objects in prop::collection::vec(keyed_object(), 1..5),
        ) {
            let store = EtcdStore::new(EtcdOptions::new(vec![]));
            for (revision, (key, value)) in objects.into_iter().enumerate() {
                check_key(&key, &value);
                store.mirror.lock().unwrap().apply(&store.root, key, Some(&value), revision as i64 + 1);
            }
            // What the store hands the gateway: at most one thing for each key.
            let held = store.mirror.lock().unwrap().entries.len();
            let desired = store.mirror.lock().unwrap().desired();
            let o = &desired.objects;
            let nodes: usize = o.services.values().map(|s| s.len()).sum();
            let objects = o.routes.len() + o.upstreams.len() + o.plugins.len() + o.tenants.len();
            let total = objects + nodes + usize::from(o.server.is_some()) + desired.unparsed.len();
            prop_assert!(total <= held, "{total} from {held} keys");
        }

        #[test]
        fn fuzz_etcd_saved_state_never_panics(bytes in saved_state()) {
            // What `load_state` does with the file.
            if let Ok(state) = serde_json::from_slice::<SavedState>(&bytes) {
                for (key, value) in state.keys {
                    check_key(&key, value.as_bytes());
                }
            }
        }
    }
}
