//! The etcd store: config objects, service nodes and plugin modules under one key prefix,
//! followed with a watch so that every gateway on the cluster converges.
//!
//! Layout (the prefix defaults to `/weir`; docs/etcd.md has every schema):
//!
//! ```text
//! /weir/routes/<id>            route JSON
//! /weir/upstreams/<id>         upstream JSON
//! /weir/plugins/<name>         plugin entry JSON, naming its module by sha256
//! /weir/tenants/<name>         tenant JSON: quotas
//! /weir/server                 server JSON: client timeouts, limits, trusted proxies
//! /weir/services/<name>/<node> node JSON {host, port, weight?, meta?}, under a lease
//! /weir/modules/<sha256>       {"size": N, "chunks": C}
//! /weir/modules/<sha256>/<n>   chunk n of the module's bytes (n zero-padded to 6 digits)
//! ```
//!
//! Start-up reads every config key at one revision, then watches from the next one, so that
//! nothing written in between is lost. Module keys are left out of both: a gateway reads a
//! module's chunks only when a plugin entry names it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue, PutOptions, Txn,
    TxnOp, WatchOptions,
};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::access_log::now_rfc3339;
use crate::config::{
    Kind, ObjectError, PluginConfig, RouteConfig, ServerConfig, ServiceNode, TenantConfig,
    UpstreamConfig,
};
use crate::gateway::{Gateway, StoreHealth};
use crate::plugin::sha256_hex;
use crate::snapshot::{BoxFuture, Desired, ModuleSource};
use crate::store::{ConfigStore, StoreError};

/// Module chunks stay well under etcd's default 1.5 MiB request limit.
pub const CHUNK_BYTES: usize = 1 << 20;
/// Reconnect backoff bounds.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// The file in `--state-dir` that holds the last config applied.
const STATE_FILE: &str = "etcd-state.json";

/// Why an etcd operation failed.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// etcd could not be reached, or refused the request.
    #[error("etcd at {endpoints}: {source}")]
    Client {
        /// The endpoints tried.
        endpoints: String,
        /// What the client said.
        source: etcd_client::Error,
    },
    /// etcd is unreachable and there is no saved state to serve from.
    #[error("cannot reach etcd at {endpoints} ({reason}), and no saved state is in --state-dir")]
    Unreachable {
        /// The endpoints tried.
        endpoints: String,
        /// Why.
        reason: String,
    },
    /// A stored value is not what the layout says.
    #[error("{key}: {reason}")]
    Layout {
        /// The key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// The `--state-dir` could not be written or read.
    #[error("state dir {path}: {source}")]
    State {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

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

    fn endpoints_text(&self) -> String {
        self.endpoints.join(",")
    }

    /// The prefix without a trailing slash.
    fn root(&self) -> String {
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

fn client_error(options: &EtcdOptions, source: etcd_client::Error) -> EtcdError {
    EtcdError::Client {
        endpoints: options.endpoints_text(),
        source,
    }
}

/// One config key, parsed.
#[derive(Clone, Debug)]
enum Entry {
    Route(RouteConfig),
    Upstream(UpstreamConfig),
    Plugin(PluginConfig),
    Tenant(TenantConfig),
    Server(ServerConfig),
    Node {
        service: String,
        node: String,
        value: ServiceNode,
    },
    Invalid(ObjectError),
}

/// One config key as stored.
struct Stored {
    raw: Vec<u8>,
    entry: Entry,
    revision: i64,
}

/// The store's copy of the config keys.
#[derive(Default)]
struct Mirror {
    /// Every event up to this revision has been applied: a new watch resumes after it.
    revision: i64,
    entries: BTreeMap<String, Stored>,
    /// When deleted keys went, so that a replayed older event cannot bring them back.
    tombstones: std::collections::HashMap<String, i64>,
}

impl Mirror {
    /// Applies one event unless the key already reflects a later one.
    fn apply(&mut self, root: &str, event: EventType, kv: &KeyValue) {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        let revision = kv.mod_revision();
        let newer_known = self
            .entries
            .get(&key)
            .map(|s| s.revision)
            .max(self.tombstones.get(&key).copied());
        if newer_known.is_some_and(|known| known >= revision) {
            return;
        }
        match event {
            EventType::Put => {
                if let Some(entry) = parse_entry(root, &key, kv.value()) {
                    self.tombstones.remove(&key);
                    self.entries.insert(
                        key,
                        Stored {
                            raw: kv.value().to_vec(),
                            entry,
                            revision,
                        },
                    );
                }
            }
            EventType::Delete => {
                self.entries.remove(&key);
                self.tombstones.insert(key, revision);
            }
        }
    }
}

/// What `--state-dir` keeps: the raw config keys at a revision.
#[derive(Serialize, Deserialize)]
struct SavedState {
    revision: i64,
    keys: BTreeMap<String, String>,
}

/// The etcd config store.
pub struct EtcdStore {
    options: EtcdOptions,
    root: String,
    mirror: Mutex<Mirror>,
    /// Set while connected, for module fetches.
    client: Mutex<Option<Client>>,
    changed: Notify,
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
        let head = client
            .get(first, Some(GetOptions::new().with_range(first_end)))
            .await
            .map_err(|e| client_error(&self.options, e))?;
        let revision = head.header().map(|h| h.revision()).unwrap_or_default();
        let tail = client
            .get(
                second,
                Some(
                    GetOptions::new()
                        .with_range(second_end)
                        .with_revision(revision),
                ),
            )
            .await
            .map_err(|e| client_error(&self.options, e))?;
        let mut mirror = Mirror {
            revision,
            ..Mirror::default()
        };
        for kv in head.kvs().iter().chain(tail.kvs()) {
            mirror.apply(&self.root, EventType::Put, kv);
        }
        *self.mirror.lock().expect("mirror lock") = mirror;
        self.changed.notify_one();
        Ok(())
    }

    /// The objects the mirror holds, as the snapshot builder wants them.
    fn desired(&self) -> (Desired, i64) {
        let mirror = self.mirror.lock().expect("mirror lock");
        let mut desired = Desired::default();
        for (key, stored) in &mirror.entries {
            let objects = &mut desired.objects;
            match stored.entry.clone() {
                Entry::Route(route) => {
                    objects.routes.insert(route.id.clone(), route);
                }
                Entry::Upstream(upstream) => {
                    objects.upstreams.insert(upstream.id.clone(), upstream);
                }
                Entry::Plugin(plugin) => {
                    objects.plugins.insert(plugin.name.clone(), plugin);
                }
                Entry::Tenant(tenant) => {
                    objects.tenants.insert(tenant.name.clone(), tenant);
                }
                Entry::Server(server) => objects.server = Some(server),
                Entry::Node {
                    service,
                    node,
                    value,
                } => {
                    objects
                        .services
                        .entry(service)
                        .or_default()
                        .insert(node, value);
                }
                Entry::Invalid(error) => desired.unparsed.push(error.at_key(key.clone())),
            }
        }
        (desired, mirror.revision)
    }

    /// Applies the mirror whenever it changes. Changes that arrive during a build coalesce into
    /// the next one, so a burst of puts costs a few builds, not one each.
    async fn apply_changes(self: Arc<Self>, gateway: Arc<Gateway>, shutdown: CancellationToken) {
        let mut saved_revision = 0;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.changed.notified() => {}
            }
            let (desired, revision) = self.desired();
            gateway.apply(desired, self.as_ref()).await;
            let mut health = (*gateway.health()).clone();
            health.revision = Some(revision);
            gateway.set_health(health);
            if revision != saved_revision {
                match self.save_state() {
                    Ok(()) => saved_revision = revision,
                    Err(error) => tracing::warn!(%error, "could not save the etcd state"),
                }
            }
        }
    }

    /// Connects, catches up, and follows the watch until it breaks or `shutdown`.
    async fn follow(
        &self,
        gateway: &Gateway,
        shutdown: &CancellationToken,
        resync: &mut bool,
    ) -> Result<(), EtcdError> {
        let mut client = connect(&self.options).await?;
        if *resync {
            self.resync(&mut client).await?;
            gateway.metrics().store_resyncs.inc();
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
        gateway.set_health(StoreHealth {
            store: "etcd",
            connected: true,
            reason: None,
            since: None,
            revision: Some(start - 1),
        });
        tracing::info!(revision = start - 1, "following etcd");
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
                        mirror.apply(&self.root, event.event_type(), kv);
                    }
                }
                if delivered.len() == 2 {
                    let caught_up = *delivered.values().min().expect("two watchers");
                    mirror.revision = mirror.revision.max(caught_up);
                }
            }
            let changed = !response.events().is_empty();
            if changed {
                self.changed.notify_one();
                // Ask where the other watcher stands, so the resume point moves for both.
                stream
                    .request_progress()
                    .await
                    .map_err(|e| client_error(&self.options, e))?;
            }
        }
    }

    async fn keep_following(
        self: Arc<Self>,
        gateway: Arc<Gateway>,
        shutdown: CancellationToken,
        mut resync: bool,
    ) {
        let mut backoff = BACKOFF_MIN;
        let mut since = None;
        while !shutdown.is_cancelled() {
            let result = self.follow(&gateway, &shutdown, &mut resync).await;
            *self.client.lock().expect("client lock") = None;
            let Err(error) = result else { return };
            if resync {
                // A compaction, not an outage: resync at once.
                continue;
            }
            let since = since.get_or_insert_with(now_rfc3339).clone();
            tracing::warn!(%error, retry_in = ?backoff, "etcd unreachable; serving the last good config");
            gateway.set_health(StoreHealth {
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

    fn load_state(&self) -> Option<Mirror> {
        let path = self.state_path()?;
        let text = std::fs::read(&path).ok()?;
        let state: SavedState = match serde_json::from_slice(&text) {
            Ok(state) => state,
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "saved etcd state is unreadable");
                return None;
            }
        };
        let mut mirror = Mirror {
            revision: state.revision,
            ..Mirror::default()
        };
        for (key, value) in state.keys {
            if let Some(entry) = parse_entry(&self.root, &key, value.as_bytes()) {
                let stored = Stored {
                    raw: value.into_bytes(),
                    entry,
                    revision: state.revision,
                };
                mirror.entries.insert(key, stored);
            }
        }
        Some(mirror)
    }

    async fn fetch_module(&self, sha256: &str) -> Result<Vec<u8>, String> {
        let max = self.options.max_module_bytes;
        if let Some(path) = self.module_path(sha256)
            && let Ok(bytes) = read_bounded(&path, max).await
            && sha256_hex(&bytes) == sha256
        {
            return Ok(bytes);
        }
        let client = self.client.lock().expect("client lock").clone();
        let mut client =
            client.ok_or("etcd is unreachable and the module is not in --state-dir")?;
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
    fn load(self: Arc<Self>, gateway: Arc<Gateway>) -> BoxFuture<'static, Result<(), StoreError>> {
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
                    let Some(mirror) = self.load_state() else {
                        return Err(EtcdError::Unreachable {
                            endpoints: self.options.endpoints_text(),
                            reason: error.to_string(),
                        }
                        .into());
                    };
                    tracing::warn!(%error, revision = mirror.revision, "etcd unreachable; serving the saved state");
                    *self.mirror.lock().expect("mirror lock") = mirror;
                    false
                }
            };
            let (desired, revision) = self.desired();
            gateway.set_health(StoreHealth {
                store: "etcd",
                connected,
                reason: (!connected)
                    .then(|| "etcd unreachable at start-up; serving --state-dir".to_owned()),
                since: (!connected).then(now_rfc3339),
                revision: Some(revision),
            });
            gateway.apply(desired, self.as_ref()).await;
            // The first apply already happened; drop the notification the resync left.
            let _ = tokio::time::timeout(Duration::ZERO, self.changed.notified()).await;
            if connected && let Err(error) = self.save_state() {
                tracing::warn!(%error, "could not save the etcd state");
            }
            Ok(())
        })
    }

    fn watch(
        self: Arc<Self>,
        gateway: Arc<Gateway>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let applier = tokio::spawn(
                self.clone()
                    .apply_changes(gateway.clone(), shutdown.clone()),
            );
            self.keep_following(gateway, shutdown, false).await;
            let _ = applier.await;
        })
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

/// Parses one config key. Module keys give `None`; everything else gives an entry, perhaps
/// an invalid one that names its key and reason.
fn parse_entry(root: &str, key: &str, value: &[u8]) -> Option<Entry> {
    let rest = key.strip_prefix(root)?.strip_prefix('/')?;
    let (section, name) = rest.split_once('/').unwrap_or((rest, ""));
    let invalid =
        |kind, id: &str, reason: String| Some(Entry::Invalid(ObjectError::new(kind, id, reason)));
    match section {
        "modules" => None,
        "routes" => Some(
            parse_object(value, Kind::Route, "id", name).map_or_else(Entry::Invalid, Entry::Route),
        ),
        "upstreams" => Some(
            parse_object(value, Kind::Upstream, "id", name)
                .map_or_else(Entry::Invalid, Entry::Upstream),
        ),
        "plugins" => Some(
            parse_object(value, Kind::Plugin, "name", name)
                .map_or_else(Entry::Invalid, Entry::Plugin),
        ),
        "tenants" => Some(
            parse_object(value, Kind::Tenant, "name", name)
                .map_or_else(Entry::Invalid, Entry::Tenant),
        ),
        "server" if rest == "server" => Some(match serde_json::from_slice::<ServerConfig>(value) {
            Ok(server) => Entry::Server(server),
            Err(e) => Entry::Invalid(ObjectError::new(
                Kind::Server,
                "server",
                format!("invalid server JSON: {e}"),
            )),
        }),
        "services" => {
            let Some((service, node)) = name
                .split_once('/')
                .filter(|(s, n)| !s.is_empty() && !n.is_empty() && !n.contains('/'))
            else {
                return invalid(
                    Kind::ServiceNode,
                    name,
                    "expected services/<name>/<node-id>".into(),
                );
            };
            let id = format!("{service}/{node}");
            match serde_json::from_slice::<ServiceNode>(value) {
                Ok(node_value) => Some(Entry::Node {
                    service: service.to_owned(),
                    node: node.to_owned(),
                    value: node_value,
                }),
                Err(e) => invalid(Kind::ServiceNode, &id, format!("invalid node JSON: {e}")),
            }
        }
        "consumers" | "ssl" => invalid(
            Kind::Key,
            name,
            format!("{section} are not supported by this version of weir"),
        ),
        _ => invalid(Kind::Key, rest, format!("unknown key under {root}/")),
    }
}

/// Parses an object whose key ends in its id; a JSON `id` (or `name`) must match the key.
fn parse_object<T: serde::de::DeserializeOwned>(
    value: &[u8],
    kind: Kind,
    id_field: &str,
    id: &str,
) -> Result<T, ObjectError> {
    let error = |reason: String| ObjectError::new(kind, id, reason);
    if id.is_empty() || id.contains('/') {
        return Err(error(format!("a {kind} key must end in one id segment")));
    }
    let mut json: serde_json::Value =
        serde_json::from_slice(value).map_err(|e| error(format!("invalid JSON: {e}")))?;
    let object = json
        .as_object_mut()
        .ok_or_else(|| error("the value must be a JSON object".into()))?;
    match object.get(id_field).map(|v| v.as_str()) {
        None => {
            object.insert(
                id_field.to_owned(),
                serde_json::Value::String(id.to_owned()),
            );
        }
        Some(Some(inner)) if inner == id => {}
        Some(inner) => {
            return Err(error(format!(
                "its {id_field} {inner:?} does not match the key's {id:?}"
            )));
        }
    }
    serde_json::from_value(json).map_err(|e| error(e.to_string()))
}

/// A module's manifest, at `modules/<sha256>`.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModuleManifest {
    size: u64,
    chunks: u64,
}

impl ModuleManifest {
    /// Parses a manifest and checks that it describes a module of at most `max` bytes in
    /// chunks of [`CHUNK_BYTES`], before anything is read or allocated for it.
    fn parse(value: &[u8], max: u64) -> Result<Self, String> {
        let manifest: ModuleManifest =
            serde_json::from_slice(value).map_err(|e| format!("bad manifest: {e}"))?;
        if manifest.size > max {
            return Err(format!(
                "the module is {} bytes, over the {max}-byte bound (--max-module-mb)",
                manifest.size
            ));
        }
        let expected = manifest.size.div_ceil(CHUNK_BYTES as u64).max(1);
        if manifest.chunks != expected {
            return Err(format!(
                "a {}-byte module has {expected} chunks, not {}",
                manifest.size, manifest.chunks
            ));
        }
        Ok(manifest)
    }
}

/// Reads a file of at most `max` bytes.
async fn read_bounded(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let file = tokio::fs::File::open(path).await?;
    let mut bytes = Vec::new();
    file.take(max + 1).read_to_end(&mut bytes).await?;
    if bytes.len() as u64 > max {
        return Err(std::io::Error::other(format!(
            "{} is over {max} bytes",
            path.display()
        )));
    }
    Ok(bytes)
}

fn chunk_key(root: &str, sha256: &str, index: usize) -> String {
    format!("{root}/modules/{sha256}/{index:06}")
}

/// Reads a module's chunks and checks them against its sha256; `max` bounds its size.
async fn read_module(
    client: &mut Client,
    root: &str,
    sha256: &str,
    max: u64,
) -> Result<Vec<u8>, EtcdError> {
    let manifest_key = format!("{root}/modules/{sha256}");
    let layout = |reason: String| EtcdError::Layout {
        key: manifest_key.clone(),
        reason,
    };
    let client_err = |source| EtcdError::Client {
        endpoints: "etcd".into(),
        source,
    };
    let response = client
        .get(manifest_key.clone(), None)
        .await
        .map_err(client_err)?;
    let kv = response
        .kvs()
        .first()
        .ok_or_else(|| layout("no such module (push it with `weir plugin push`)".into()))?;
    let manifest = ModuleManifest::parse(kv.value(), max).map_err(layout)?;
    let size = usize::try_from(manifest.size).map_err(|_| layout("size overflows".into()))?;
    let mut bytes = Vec::with_capacity(size);
    for index in 0..manifest.chunks {
        let key = chunk_key(root, sha256, index as usize);
        let response = client.get(key.clone(), None).await.map_err(client_err)?;
        let chunk = response
            .kvs()
            .first()
            .ok_or_else(|| layout(format!("chunk {key} is missing")))?;
        if bytes.len() + chunk.value().len() > size {
            return Err(layout(format!(
                "the chunks hold more than the manifest's {size} bytes"
            )));
        }
        bytes.extend_from_slice(chunk.value());
    }
    let actual = sha256_hex(&bytes);
    if bytes.len() != size || actual != sha256 {
        return Err(layout(format!(
            "the chunks hold {} bytes with sha256 {actual}, not {} bytes with sha256 {sha256}",
            bytes.len(),
            manifest.size
        )));
    }
    Ok(bytes)
}

/// Settings for `weir plugin push`; unset ones keep the existing entry's value.
#[derive(Clone, Debug, Default)]
pub struct PushSettings {
    /// `limits.memory_mb`.
    pub memory_mb: Option<u32>,
    /// `limits.timeout_ms`.
    pub timeout_ms: Option<u64>,
    /// `limits.max_body_bytes`.
    pub max_body_bytes: Option<u64>,
    /// `failure`.
    pub failure: Option<crate::config::FailurePolicy>,
    /// `grants`, replacing the entry's.
    pub grants: Option<crate::config::Grants>,
}

/// What `weir plugin push` did.
#[derive(Debug)]
pub struct Pushed {
    /// The module's sha256.
    pub sha256: String,
    /// How many chunks it has.
    pub chunks: usize,
    /// Whether the module was already stored (only the entry changed).
    pub already_stored: bool,
    /// The plugin entry as written.
    pub entry: PluginConfig,
}

/// Stores a module's bytes (unless already stored), then in one transaction writes its
/// manifest and points plugin `name` at it, keeping the entry's other settings.
pub async fn push_plugin(
    options: &EtcdOptions,
    name: &str,
    bytes: &[u8],
    settings: &PushSettings,
) -> Result<Pushed, EtcdError> {
    let root = options.root();
    let sha256 = sha256_hex(bytes);
    let manifest_key = format!("{root}/modules/{sha256}");
    let entry_key = format!("{root}/plugins/{name}");
    if bytes.len() as u64 > options.max_module_bytes {
        // Gateways would refuse it: say so before storing it.
        return Err(EtcdError::Layout {
            key: manifest_key,
            reason: format!(
                "the module is {} bytes, over the {}-byte bound (--max-module-mb)",
                bytes.len(),
                options.max_module_bytes
            ),
        });
    }
    let mut client = connect(options).await?;
    let client_err = |source| client_error(options, source);
    let chunks = bytes.len().div_ceil(CHUNK_BYTES).max(1);

    let stored = client
        .get(manifest_key.clone(), None)
        .await
        .map_err(client_err)?;
    let already_stored = !stored.kvs().is_empty();
    if !already_stored {
        // Each chunk is its own request: a transaction holding them all would pass etcd's
        // request limit. The manifest, written last, is what makes the module visible.
        for (index, chunk) in bytes.chunks(CHUNK_BYTES).enumerate() {
            client
                .put(chunk_key(&root, &sha256, index), chunk, None)
                .await
                .map_err(client_err)?;
        }
    }

    let existing = client
        .get(entry_key.clone(), None)
        .await
        .map_err(client_err)?;
    let (mut entry, compare) = match existing.kvs().first() {
        Some(kv) => {
            let entry: PluginConfig = parse_object(kv.value(), Kind::Plugin, "name", name)
                .map_err(|e| EtcdError::Layout {
                    key: entry_key.clone(),
                    reason: e.reason,
                })?;
            (
                entry,
                Compare::mod_revision(entry_key.clone(), CompareOp::Equal, kv.mod_revision()),
            )
        }
        None => (
            PluginConfig {
                name: name.to_owned(),
                module: None,
                sha256: None,
                limits: Default::default(),
                failure: Default::default(),
                isolation: Default::default(),
                grants: Default::default(),
                tenant: None,
                quarantine: Default::default(),
            },
            Compare::version(entry_key.clone(), CompareOp::Equal, 0),
        ),
    };
    entry.module = None;
    entry.sha256 = Some(sha256.clone());
    if let Some(memory_mb) = settings.memory_mb {
        entry.limits.memory_mb = memory_mb;
    }
    if let Some(timeout_ms) = settings.timeout_ms {
        entry.limits.timeout_ms = timeout_ms;
    }
    if let Some(max_body_bytes) = settings.max_body_bytes {
        entry.limits.max_body_bytes = max_body_bytes;
    }
    if let Some(failure) = settings.failure {
        entry.failure = failure;
    }
    if let Some(grants) = &settings.grants {
        entry.grants = grants.clone();
    }
    entry.validate().map_err(|reason| EtcdError::Layout {
        key: entry_key.clone(),
        reason,
    })?;
    let manifest = serde_json::to_vec(&ModuleManifest {
        size: bytes.len() as u64,
        chunks: chunks as u64,
    })
    .expect("a manifest serializes");
    let txn = Txn::new().when([compare]).and_then([
        TxnOp::put(manifest_key, manifest, None),
        TxnOp::put(
            entry_key.clone(),
            serde_json::to_vec(&entry).expect("an entry serializes"),
            None,
        ),
    ]);
    let response = client.txn(txn).await.map_err(client_err)?;
    if !response.succeeded() {
        return Err(EtcdError::Layout {
            key: entry_key,
            reason: "the entry changed while pushing; run the push again".into(),
        });
    }
    Ok(Pushed {
        sha256,
        chunks,
        already_stored,
        entry,
    })
}

/// Registers a backend under `services/<service>/<node_id>` with a lease, and keeps the lease
/// alive until `shutdown`, when it is revoked (so the node leaves at once). When etcd goes away
/// it registers again once etcd is back.
pub async fn register(
    options: &EtcdOptions,
    service: &str,
    node_id: &str,
    node: &ServiceNode,
    ttl_secs: i64,
    shutdown: CancellationToken,
) -> Result<(), EtcdError> {
    node.validate().map_err(|reason| EtcdError::Layout {
        key: format!("services/{service}/{node_id}"),
        reason,
    })?;
    let key = format!("{}/services/{service}/{node_id}", options.root());
    let value = serde_json::to_vec(node).expect("a node serializes");
    let mut backoff = BACKOFF_MIN;
    loop {
        let outcome = keep_registered(options, &key, &value, ttl_secs, &shutdown).await;
        match outcome {
            Ok(()) => return Ok(()),
            Err(error) => {
                tracing::warn!(%error, retry_in = ?backoff, "registration lost; registering again");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

async fn keep_registered(
    options: &EtcdOptions,
    key: &str,
    value: &[u8],
    ttl_secs: i64,
    shutdown: &CancellationToken,
) -> Result<(), EtcdError> {
    let client_err = |source| client_error(options, source);
    let mut client = connect(options).await?;
    let lease = client
        .lease_grant(ttl_secs, None)
        .await
        .map_err(client_err)?
        .id();
    client
        .put(key, value, Some(PutOptions::new().with_lease(lease)))
        .await
        .map_err(client_err)?;
    tracing::info!(key, lease, ttl_secs, "registered");
    let (mut keeper, mut responses) = client.lease_keep_alive(lease).await.map_err(client_err)?;
    let interval = Duration::from_millis((ttl_secs.max(1) as u64 * 1000) / 3);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = client.lease_revoke(lease).await;
                tracing::info!(key, "deregistered");
                return Ok(());
            }
            _ = tokio::time::sleep(interval) => {}
        }
        keeper.keep_alive().await.map_err(client_err)?;
        match responses.message().await.map_err(client_err)? {
            Some(response) if response.ttl() > 0 => {}
            _ => {
                return Err(EtcdError::Layout {
                    key: key.to_owned(),
                    reason: "the lease expired".into(),
                });
            }
        }
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), EtcdError> {
    let io = |source| EtcdError::State {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let staging = path.with_extension("tmp");
    std::fs::write(&staging, bytes).map_err(io)?;
    std::fs::rename(&staging, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::Value as Json;

    #[test]
    fn keys_map_to_objects_with_their_reasons() {
        let route = parse_entry(
            "/weir",
            "/weir/routes/api",
            br#"{"uri": "/api/*", "upstream_id": "u"}"#,
        );
        assert!(matches!(route, Some(Entry::Route(r)) if r.id == "api"));
        let mismatch = parse_entry(
            "/weir",
            "/weir/routes/api",
            br#"{"id": "other", "uri": "/a", "upstream_id": "u"}"#,
        );
        assert!(matches!(mismatch, Some(Entry::Invalid(e)) if e.reason.contains("does not match")));
        let bad_json = parse_entry("/weir", "/weir/upstreams/u", b"{nope");
        assert!(
            matches!(bad_json, Some(Entry::Invalid(e)) if e.kind == Kind::Upstream && e.reason.contains("invalid JSON"))
        );
        let unknown_field = parse_entry(
            "/weir",
            "/weir/plugins/p",
            br#"{"sha256": "x", "colour": 1}"#,
        );
        assert!(
            matches!(unknown_field, Some(Entry::Invalid(e)) if e.reason.contains("unknown field `colour`"))
        );
        let node = parse_entry(
            "/weir",
            "/weir/services/users/n1",
            br#"{"host": "10.0.0.1", "port": 80}"#,
        );
        assert!(
            matches!(node, Some(Entry::Node { service, node, .. }) if service == "users" && node == "n1")
        );
        let bad_node = parse_entry("/weir", "/weir/services/users", br#"{}"#);
        assert!(matches!(bad_node, Some(Entry::Invalid(e)) if e.kind == Kind::ServiceNode));
        assert!(parse_entry("/weir", "/weir/modules/abc", b"..").is_none());
        assert!(parse_entry("/weir", "/weir/modules/abc/000001", b"..").is_none());
        assert!(parse_entry("/weir", "/other/routes/x", b"{}").is_none());
        assert!(
            matches!(parse_entry("/weir", "/weir/ssl/x", b"{}"), Some(Entry::Invalid(e)) if e.reason.contains("not supported"))
        );
        assert!(
            matches!(parse_entry("/weir", "/weir/colours/x", b"{}"), Some(Entry::Invalid(e)) if e.kind == Kind::Key)
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

    /// Validates what came out of `key`, and builds it where the gateway would (upstreams),
    /// so that nothing a key holds is shown to panic there either.
    fn check_entry(key: &str, entry: Option<Entry>) {
        let section = key
            .strip_prefix("/weir/")
            .and_then(|rest| rest.split('/').next());
        let Some(entry) = entry else {
            // Only module keys, and keys outside the root, are left out.
            assert!(matches!(section, None | Some("modules")), "{key}");
            return;
        };
        match entry {
            Entry::Route(route) => {
                assert_eq!(section, Some("routes"));
                let _ = route.validate();
            }
            Entry::Upstream(upstream) => {
                assert_eq!(section, Some("upstreams"));
                crate::store::file::tests::check_upstream(&upstream);
            }
            Entry::Plugin(plugin) => {
                assert_eq!(section, Some("plugins"));
                let _ = plugin.validate();
            }
            Entry::Tenant(tenant) => {
                assert_eq!(section, Some("tenants"));
                let _ = tenant.validate();
            }
            Entry::Server(server) => {
                assert_eq!(key, "/weir/server");
                let _ = server.validate();
            }
            Entry::Node { service, value, .. } => {
                assert_eq!(section, Some("services"));
                if value.validate().is_ok() {
                    // What `Snapshot::build_services` makes of a service's live nodes.
                    use crate::config::{BalancerKind, NodeConfig, Scheme};
                    let config = UpstreamConfig {
                        id: service,
                        nodes: vec![NodeConfig {
                            host: value.host,
                            port: value.port,
                            weight: value.weight,
                        }],
                        balancer: BalancerKind::Roundrobin,
                        hash_on: None,
                        scheme: Scheme::Http,
                        timeout: Default::default(),
                        retries: None,
                    };
                    let metrics = crate::metrics::Metrics::new();
                    let pool = crate::upstream::ClientPool::default();
                    crate::upstream::Upstream::new(config, &pool, &metrics);
                }
            }
            Entry::Invalid(error) => {
                let _ = error.at_key(key).to_string();
            }
        }
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
            check_entry(&key, parse_entry("/weir", &key, &value));
            // A key that is not under the root is ignored, not refused.
            prop_assert!(
                parse_entry("/weir/routes", &key, &value).is_none()
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
        fn fuzz_etcd_parse_entry_never_panics_on_structured_json(
            objects in prop::collection::vec(keyed_object(), 1..5),
        ) {
            let store = EtcdStore::new(EtcdOptions::new(vec![]));
            for (revision, (key, value)) in objects.into_iter().enumerate() {
                let entry = parse_entry(&store.root, &key, &value);
                check_entry(&key, entry.clone());
                if let Some(entry) = entry {
                    let stored = Stored { raw: value, entry, revision: revision as i64 };
                    store.mirror.lock().unwrap().entries.insert(key, stored);
                }
            }
            // What the store hands the gateway: at most one thing for each key.
            let held = store.mirror.lock().unwrap().entries.len();
            let (desired, _) = store.desired();
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
                    check_entry(&key, parse_entry("/weir", &key, value.as_bytes()));
                }
            }
        }
    }
}
