//! The file store: a YAML file with top-level `routes`, `upstreams` and `plugins` lists, watched
//! for changes. This is the embedded default, so that one command runs a gateway.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use serde::de::DeserializeOwned;
use serde_norway::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{ConfigObjects, Kind, ObjectError, PluginConfig};
use crate::gateway::Gateway;
use crate::snapshot::{BoxFuture, Desired, ModuleSource};
use crate::store::{ConfigStore, StoreError};

/// Editors save in bursts (truncate, write, rename); wait this long for the burst to end.
const SETTLE: Duration = Duration::from_millis(100);

/// Why the file as a whole could not be used; the previous config keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum FileStoreError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not YAML, or not the expected shape.
    #[error("config file {path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// A YAML config file.
pub struct FileStore {
    path: PathBuf,
    base: PathBuf,
}

impl FileStore {
    /// The store for `path`; module paths in it are relative to its folder.
    pub fn new(path: PathBuf) -> Self {
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        FileStore { path, base }
    }

    /// Reads and parses the file.
    pub async fn read(&self) -> Result<Desired, FileStoreError> {
        let text = tokio::fs::read_to_string(&self.path)
            .await
            .map_err(|source| FileStoreError::Read {
                path: self.path.clone(),
                source,
            })?;
        parse(&text).map_err(|reason| FileStoreError::Invalid {
            path: self.path.clone(),
            reason,
        })
    }

    /// Applies every change to the file until `shutdown`.
    async fn follow(self: Arc<Self>, gateway: Arc<Gateway>, shutdown: CancellationToken) {
        let (events, mut changes) = mpsc::unbounded_channel();
        let name = self.path.file_name().map(|n| n.to_owned());
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            let relevant = match &event {
                // Reading the file is an access event too: reacting to those would make every
                // reload schedule the next one.
                Ok(event) if event.kind.is_access() => false,
                Ok(event) => {
                    event.paths.is_empty()
                        || event.paths.iter().any(|p| p.file_name() == name.as_deref())
                }
                Err(_) => true,
            };
            if relevant {
                let _ = events.send(());
            }
        });
        // Watch the folder, not the file: an editor's atomic save replaces the file's inode.
        let watching =
            watcher.and_then(|mut w| w.watch(&self.base, RecursiveMode::NonRecursive).map(|_| w));
        let _watcher = match watching {
            Ok(watcher) => watcher,
            Err(error) => {
                tracing::error!(path = %self.path.display(), %error, "cannot watch the config file; changes will not apply");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                change = changes.recv() => if change.is_none() { return },
            }
            tokio::time::sleep(SETTLE).await;
            while changes.try_recv().is_ok() {}
            match self.read().await {
                Ok(desired) => {
                    gateway.apply(desired, self.as_ref()).await;
                }
                Err(error) => {
                    gateway.record_failed_reload();
                    tracing::error!(%error, "config change ignored; the previous config keeps serving");
                }
            }
        }
    }
}

impl ConfigStore for FileStore {
    fn load(self: Arc<Self>, gateway: Arc<Gateway>) -> BoxFuture<'static, Result<(), StoreError>> {
        Box::pin(async move {
            let desired = self.read().await?;
            gateway.apply(desired, self.as_ref()).await;
            Ok(())
        })
    }

    fn watch(
        self: Arc<Self>,
        gateway: Arc<Gateway>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, ()> {
        Box::pin(self.follow(gateway, shutdown))
    }
}

impl ModuleSource for FileStore {
    fn fetch<'a>(&'a self, plugin: &'a PluginConfig) -> BoxFuture<'a, Result<Vec<u8>, String>> {
        Box::pin(async move {
            let module = plugin
                .module
                .as_ref()
                .ok_or("the file store loads modules from `module` paths, not `sha256`")?;
            let path = self.base.join(module);
            tokio::fs::read(&path)
                .await
                .map_err(|e| format!("cannot read module {}: {e}", path.display()))
        })
    }
}

/// Parses the YAML text into objects. Only a file that is not YAML, or not a mapping of the
/// known lists, fails as a whole; a bad object is reported alone.
pub fn parse(text: &str) -> Result<Desired, String> {
    let document: Value =
        serde_norway::from_str(text).map_err(|e| format!("not valid YAML: {e}"))?;
    let mapping = match document {
        Value::Null => return Ok(Desired::default()),
        Value::Mapping(mapping) => mapping,
        _ => return Err("the top level must be a mapping of routes, upstreams and plugins".into()),
    };
    let mut objects = ConfigObjects::default();
    let mut unparsed = Vec::new();
    for (key, value) in mapping {
        match key.as_str() {
            Some("routes") => {
                objects.routes = collect(value, Kind::Route, "id", &mut unparsed)?;
            }
            Some("upstreams") => {
                objects.upstreams = collect(value, Kind::Upstream, "id", &mut unparsed)?;
            }
            Some("plugins") => {
                objects.plugins = collect(value, Kind::Plugin, "name", &mut unparsed)?;
            }
            Some("tenants") => {
                objects.tenants = collect(value, Kind::Tenant, "name", &mut unparsed)?;
            }
            _ => {
                return Err(format!(
                    "unknown top-level key {}; expected routes, upstreams, plugins, tenants",
                    serde_norway::to_string(&key).unwrap_or_default().trim()
                ));
            }
        }
    }
    Ok(Desired { objects, unparsed })
}

/// Objects that carry their own id in `id_field`.
trait Identified {
    fn identity(&self) -> &str;
}

impl Identified for crate::config::RouteConfig {
    fn identity(&self) -> &str {
        &self.id
    }
}

impl Identified for crate::config::UpstreamConfig {
    fn identity(&self) -> &str {
        &self.id
    }
}

impl Identified for PluginConfig {
    fn identity(&self) -> &str {
        &self.name
    }
}

impl Identified for crate::config::TenantConfig {
    fn identity(&self) -> &str {
        &self.name
    }
}

fn collect<T: DeserializeOwned + Identified>(
    list: Value,
    kind: Kind,
    id_field: &str,
    errors: &mut Vec<ObjectError>,
) -> Result<BTreeMap<String, T>, String> {
    let items = match list {
        Value::Null => return Ok(BTreeMap::new()),
        Value::Sequence(items) => items,
        _ => return Err(format!("`{kind}s` must be a list")),
    };
    let mut objects = BTreeMap::new();
    for (index, item) in items.into_iter().enumerate() {
        let label = item
            .get(id_field)
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| format!("#{index}"));
        match serde_norway::from_value::<T>(item) {
            Ok(object) => {
                let id = object.identity().to_owned();
                match objects.entry(id) {
                    std::collections::btree_map::Entry::Vacant(slot) => {
                        slot.insert(object);
                    }
                    std::collections::btree_map::Entry::Occupied(taken) => {
                        let reason =
                            format!("a second {kind} has this {id_field}; only the first loads");
                        errors.push(ObjectError::new(kind, taken.key().clone(), reason));
                    }
                }
            }
            Err(e) => errors.push(ObjectError::new(kind, label, e.to_string())),
        }
    }
    Ok(objects)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_shape() {
        let desired = parse(
            r#"
upstreams:
  - id: backend
    nodes: [{host: 127.0.0.1, port: 8080}]
plugins:
  - name: request-id
    module: request_id.wasm
routes:
  - id: api
    uri: /api/*
    upstream_id: backend
    plugins:
      - name: request-id
        config: {header: x-trace-id}
"#,
        )
        .unwrap();
        assert!(desired.unparsed.is_empty(), "{:?}", desired.unparsed);
        let route = &desired.objects.routes["api"];
        assert_eq!(route.plugins[0].config["header"], "x-trace-id");
        assert_eq!(desired.objects.upstreams["backend"].nodes[0].port, 8080);
        assert!(desired.objects.plugins.contains_key("request-id"));
    }

    #[test]
    fn a_bad_object_is_reported_alone() {
        let desired = parse(
            r#"
routes:
  - id: good
    uri: /a
    upstream_id: u
  - id: typo
    uri: /b
    upstream_id: u
    pluginz: []
  - uri: /no-id
    upstream_id: u
  - id: good
    uri: /dup
    upstream_id: u
"#,
        )
        .unwrap();
        assert_eq!(desired.objects.routes.len(), 1);
        assert_eq!(desired.objects.routes["good"].uri.as_deref(), Some("/a"));
        let errors: Vec<_> = desired
            .unparsed
            .iter()
            .map(|e| (e.id.as_str(), e.reason.as_str()))
            .collect();
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(
            errors[0].0 == "typo" && errors[0].1.contains("unknown field `pluginz`"),
            "{errors:?}"
        );
        assert!(
            errors[1].0 == "#2" && errors[1].1.contains("missing field `id`"),
            "{errors:?}"
        );
        assert!(
            errors[2].0 == "good" && errors[2].1.contains("second route"),
            "{errors:?}"
        );
    }

    #[test]
    fn a_broken_file_fails_as_a_whole() {
        assert!(parse("routes: [").unwrap_err().contains("not valid YAML"));
        assert!(parse("- 1\n- 2").unwrap_err().contains("top level"));
        assert!(
            parse("route: []")
                .unwrap_err()
                .contains("unknown top-level key route")
        );
        assert!(parse("routes: {}").unwrap_err().contains("must be a list"));
        assert!(parse("").unwrap().objects.routes.is_empty());
    }
}
