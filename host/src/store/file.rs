//! The file store: a YAML file with top-level `routes`, `upstreams` and `plugins` lists, watched
//! for changes. This is the embedded default, so that one command runs a gateway.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use serde_norway::Value;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::error::{FileStoreError, StoreError};
use crate::config::{ConfigObjects, KINDS, Kind, Layout, ObjectError, PluginConfig, Refused, Slot};
use crate::plugin::signature::ModuleSignature;
use crate::snapshot::{BoxFuture, Desired, ModuleSource};
use crate::store::{ConfigStore, Published, Publisher};

/// Editors save in bursts (truncate, write, rename); wait this long for the burst to end.
const SETTLE: Duration = Duration::from_millis(100);

/// A YAML config file.
pub struct FileStore {
    path: PathBuf,
    base: PathBuf,
    max_module_bytes: u64,
    /// The text last read, to tell whether the file changed before the watch began.
    last_read: std::sync::Mutex<Option<String>>,
    publisher: Publisher,
}

impl FileStore {
    /// The store for `path`; module paths in it are relative to its folder, and a module file
    /// over `max_module_bytes` is refused.
    pub fn new(path: PathBuf, max_module_bytes: u64) -> Self {
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        FileStore {
            path,
            base,
            max_module_bytes,
            last_read: std::sync::Mutex::new(None),
            publisher: Publisher::new("file"),
        }
    }

    /// Reads and parses the file.
    pub async fn read(&self) -> Result<Desired, FileStoreError> {
        let text = self.read_text().await?;
        parse_in(&text, &self.base).map_err(|reason| FileStoreError::Invalid {
            path: self.path.clone(),
            reason,
        })
    }

    async fn read_text(&self) -> Result<String, FileStoreError> {
        let text = tokio::fs::read_to_string(&self.path)
            .await
            .map_err(|source| FileStoreError::Read {
                path: self.path.clone(),
                source,
            })?;
        *self.last_read.lock().expect("last read lock") = Some(text.clone());
        Ok(text)
    }

    /// Starts watching the file's folder. It runs before the gateway starts serving, so that no
    /// change written after start-up can be missed; a change written between the first read and
    /// now is queued as well.
    fn start_watching(&self) -> Result<Watching, notify::Error> {
        let (events, changes) = mpsc::unbounded_channel();
        let name = self.path.file_name().map(|n| n.to_owned());
        let sender = events.clone();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
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
                    let _ = sender.send(());
                }
            })?;
        // Watch the folder, not the file: an editor's atomic save replaces the file's inode.
        watcher.watch(&self.base, RecursiveMode::NonRecursive)?;
        let current = std::fs::read_to_string(&self.path).ok();
        if current != *self.last_read.lock().expect("last read lock") {
            let _ = events.send(());
        }
        Ok(Watching {
            _watcher: watcher,
            changes,
        })
    }

    /// Publishes every change to the file until `shutdown`.
    async fn follow(self: Arc<Self>, watching: Watching, shutdown: CancellationToken) {
        let Watching {
            _watcher,
            mut changes,
        } = watching;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                change = changes.recv() => if change.is_none() { return },
            }
            tokio::time::sleep(SETTLE).await;
            while changes.try_recv().is_ok() {}
            match self.read().await {
                Ok(desired) => self.publisher.objects(desired),
                Err(error) => {
                    self.publisher.failure();
                    tracing::error!(%error, "config change ignored; the previous config keeps serving");
                }
            }
        }
    }
}

/// A live watch on the config file's folder, and the changes it reports.
struct Watching {
    _watcher: notify::RecommendedWatcher,
    changes: mpsc::UnboundedReceiver<()>,
}

impl ConfigStore for FileStore {
    fn load(self: Arc<Self>) -> BoxFuture<'static, Result<(), StoreError>> {
        Box::pin(async move {
            let desired = self.read().await?;
            self.publisher.objects(desired);
            Ok(())
        })
    }

    fn watch(self: Arc<Self>, shutdown: CancellationToken) -> BoxFuture<'static, ()> {
        match self.start_watching() {
            Ok(watching) => Box::pin(self.follow(watching, shutdown)),
            Err(error) => {
                tracing::error!(path = %self.path.display(), %error, "cannot watch the config file; changes will not apply");
                Box::pin(async {})
            }
        }
    }

    fn subscribe(&self) -> watch::Receiver<Arc<Published>> {
        self.publisher.subscribe()
    }

    fn describe(&self) -> String {
        format!("the file {}", self.path.display())
    }
}

/// The largest `.sig` file read beside a module.
const MAX_SIGNATURE_FILE_BYTES: u64 = 4 << 10;

impl ModuleSource for FileStore {
    fn signature<'a>(
        &'a self,
        plugin: &'a PluginConfig,
    ) -> BoxFuture<'a, Result<Option<ModuleSignature>, String>> {
        Box::pin(async move {
            if plugin.signature.is_some() {
                return Ok(plugin.signature.clone());
            }
            let Some(module) = &plugin.module else {
                return Ok(None);
            };
            let mut path = self.base.join(module).into_os_string();
            path.push(".sig");
            let path = std::path::PathBuf::from(path);
            let text = match tokio::fs::metadata(&path).await {
                Ok(meta) if meta.len() > MAX_SIGNATURE_FILE_BYTES => {
                    return Err(format!(
                        "{} is over {MAX_SIGNATURE_FILE_BYTES} bytes",
                        path.display()
                    ));
                }
                Ok(_) => tokio::fs::read_to_string(&path)
                    .await
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?,
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(error) => return Err(format!("cannot read {}: {error}", path.display())),
            };
            serde_json::from_str(&text).map(Some).map_err(|e| {
                format!(
                    "{} is not a signature `weir plugin sign` wrote: {e}",
                    path.display()
                )
            })
        })
    }

    fn fetch<'a>(&'a self, plugin: &'a PluginConfig) -> BoxFuture<'a, Result<Vec<u8>, String>> {
        Box::pin(async move {
            let module = plugin
                .module
                .as_ref()
                .ok_or("the file store loads modules from `module` paths, not `sha256`")?;
            let path = self.base.join(module);
            let size = tokio::fs::metadata(&path)
                .await
                .map_err(|e| format!("cannot read module {}: {e}", path.display()))?
                .len();
            if size > self.max_module_bytes {
                return Err(format!(
                    "module {} is {size} bytes, over the {}-byte bound (--max-module-mb)",
                    path.display(),
                    self.max_module_bytes
                ));
            }
            tokio::fs::read(&path)
                .await
                .map_err(|e| format!("cannot read module {}: {e}", path.display()))
        })
    }
}

/// Parses the YAML text into objects, reading certificate files relative to the current
/// folder.
pub fn parse(text: &str) -> Result<Desired, String> {
    parse_in(text, Path::new("."))
}

/// Parses the YAML text into objects; an `ssl` object's `cert` or `key` that is not PEM is
/// a path relative to `base`. Only a file that is not YAML, or not a mapping of the known
/// lists, fails as a whole; a bad object is reported alone.
pub fn parse_in(text: &str, base: &Path) -> Result<Desired, String> {
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
        let Some(kind) = key.as_str().and_then(Kind::in_section) else {
            let sections: Vec<&str> = KINDS.iter().filter_map(|info| info.section).collect();
            return Err(format!(
                "unknown top-level key {}; expected {}",
                serde_norway::to_string(&key).unwrap_or_default().trim(),
                sections.join(", ")
            ));
        };
        let slot = objects
            .slot_mut(kind)
            .expect("sections hold kinds of object");
        match kind.info().layout {
            Layout::Keyed(id_field) => {
                let value = match kind {
                    Kind::Ssl => read_pem_files(value, base, &mut unparsed),
                    _ => value,
                };
                // A section given twice counts once, as given the last time.
                slot.clear();
                collect(kind, id_field, value, slot, &mut unparsed)?;
            }
            _ if value.is_null() => {}
            _ => {
                slot.clear();
                let id = kind.info().section.unwrap_or_default();
                let parsed = as_json(value).and_then(|json| {
                    slot.insert(id, &json).map_err(|refused| match refused {
                        Refused::Invalid(errors) => ObjectError::fields(kind, id, errors),
                        Refused::Taken(_) => unreachable!("the slot was just emptied"),
                    })
                });
                if let Err(error) = parsed {
                    unparsed.push(error.with_id(kind, id));
                }
            }
        }
    }
    Ok(Desired {
        objects: Arc::new(objects),
        unparsed,
    })
}

/// The largest certificate or key file read.
const MAX_PEM_FILE_BYTES: u64 = 1 << 20;

/// The `ssl` list with each `cert` and `key` that names a file replaced by the file's text. An
/// object whose file cannot be read is reported and left out.
fn read_pem_files(list: Value, base: &Path, errors: &mut Vec<ObjectError>) -> Value {
    let Value::Sequence(items) = list else {
        return list;
    };
    let mut kept = Vec::new();
    for (index, mut item) in items.into_iter().enumerate() {
        let label = item
            .get("id")
            .and_then(Value::as_str)
            .map_or_else(|| format!("#{index}"), str::to_owned);
        let mut failed = None;
        for field in ["cert", "key"] {
            let Some(Value::String(text)) = item.get_mut(field) else {
                continue;
            };
            if text.contains("-----BEGIN") {
                continue;
            }
            match read_pem_file(&base.join(&*text)) {
                Ok(contents) => *text = contents,
                Err(reason) => failed = Some(format!("/{field}: {reason}")),
            }
        }
        match failed {
            Some(reason) => errors.push(ObjectError::new(Kind::Ssl, label, reason)),
            None => kept.push(item),
        }
    }
    Value::Sequence(kept)
}

fn read_pem_file(path: &Path) -> Result<String, String> {
    let size = std::fs::metadata(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .len();
    if size > MAX_PEM_FILE_BYTES {
        return Err(format!(
            "{} is {size} bytes, over the {MAX_PEM_FILE_BYTES}-byte bound",
            path.display()
        ));
    }
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// A YAML value as the JSON the validator reads; YAML that JSON cannot hold (a mapping key
/// that is not a string, a tagged value) is refused here.
fn as_json(value: Value) -> Result<serde_json::Value, ObjectError> {
    serde_json::to_value(&value).map_err(|e| ObjectError::new(Kind::Key, "", e.to_string()))
}

/// Puts each object of `list`, a section of objects of `kind`, into `slot`, and each that is
/// refused into `errors`; fails when `list` is not a list.
fn collect(
    kind: Kind,
    id_field: &str,
    list: Value,
    slot: &mut dyn Slot,
    errors: &mut Vec<ObjectError>,
) -> Result<(), String> {
    let items = match list {
        Value::Null => return Ok(()),
        Value::Sequence(items) => items,
        _ => {
            let section = kind.info().section.unwrap_or_default();
            return Err(format!("`{section}` must be a list"));
        }
    };
    for (index, item) in items.into_iter().enumerate() {
        let label = item
            .get(id_field)
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| format!("#{index}"));
        let error = match as_json(item) {
            Err(error) => error.with_id(kind, label),
            Ok(json) => match slot.insert("", &json) {
                Ok(()) => continue,
                Err(Refused::Invalid(fields)) => ObjectError::fields(kind, label, fields),
                Err(Refused::Taken(id)) => {
                    let reason =
                        format!("a second {kind} has this {id_field}; only the first loads");
                    ObjectError::new(kind, id, reason)
                }
            },
        };
        errors.push(error);
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::Value as Json;

    use crate::config::{self, UpstreamConfig};

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

    /// One of the `|`-separated strings, as JSON.
    fn one_of(alternatives: &'static str) -> BoxedStrategy<Json> {
        prop::sample::select(alternatives.split('|').collect::<Vec<_>>())
            .prop_map(|s| Json::String(s.into()))
            .boxed()
    }

    /// Mostly one of `good`, sometimes one of `bad`.
    fn pick(good: &'static str, bad: &'static str) -> BoxedStrategy<Json> {
        prop_oneof![4 => one_of(good), 1 => one_of(bad)].boxed()
    }

    /// Any JSON, a few levels deep, with object keys mostly the config's own field names.
    fn json() -> BoxedStrategy<Json> {
        let leaf = prop_oneof![
            Just(Json::Null),
            any::<bool>().prop_map(Json::Bool),
            any::<i64>().prop_map(Json::from),
            any::<u64>().prop_map(Json::from),
            any::<f64>().prop_filter_map("finite", |f| {
                serde_json::Number::from_f64(f).map(Json::Number)
            }),
            any::<String>().prop_map(Json::String),
            fields().prop_map(Json::from),
        ];
        let key = prop_oneof![fields().prop_map(str::to_owned), any::<String>()];
        leaf.prop_recursive(4, 48, 6, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Json::Array),
                prop::collection::btree_map(key.clone(), inner, 0..6)
                    .prop_map(|m| Json::Object(m.into_iter().collect())),
            ]
        })
        .boxed()
    }

    /// Any config object's field name.
    fn fields() -> impl Strategy<Value = &'static str> {
        prop::sample::select(FIELDS.split_whitespace().collect::<Vec<_>>())
    }

    const FIELDS: &str = "\
        id uri uris methods hosts priority upstream_id service strip_prefix plugins \
        path_normalization request_trailers nodes host port weight type hash_on scheme timeout \
        connect_ms send_ms read_ms idle_ms retries name config isolation module sha256 \
        limits memory_mb timeout_ms max_body_bytes failure grants log clock kv metrics \
        http wasi max_response_bytes tenant quarantine traps window_ms backoff_ms \
        quotas instances kv_entries kv_bytes header_timeout_ms keepalive_timeout_ms \
        body_timeout_ms send_timeout_ms max_header_bytes max_headers max_connections \
        http2_max_streams trusted_proxies meta";

    /// Numbers: mostly small, some at and around the bounds that some field has.
    fn number() -> BoxedStrategy<Json> {
        prop_oneof![
            20 => (1..50u64).prop_map(Json::from),
            2 => prop::sample::select(vec![
                0, 1, 100, 8192, 65_535, 65_536, 10_000, 10_001, 60_000, 60_001, 86_400_000,
                86_400_001, 1 << 20, 1 << 30, (1 << 30) + 1, 26_843_545, 26_843_546,
                u32::MAX as u64, u32::MAX as u64 + 1, u64::MAX,
            ])
            .prop_map(Json::from),
            1 => any::<u32>().prop_map(Json::from),
            1 => prop_oneof![Just(Json::from(-1)), Just(Json::from(1.5))],
        ]
        .boxed()
    }

    /// A value for the field `name`: mostly of the type and kind the field wants.
    fn value_for(name: &'static str) -> BoxedStrategy<Json> {
        let list = |item: BoxedStrategy<Json>| {
            prop::collection::vec(item, 0..4)
                .prop_map(Json::Array)
                .boxed()
        };
        let typed = match name {
            "id" | "name" | "upstream_id" | "service" | "tenant" => prop_oneof![
                4 => "[a-z0-9._-]{1,6}".prop_map(Json::String),
                1 => one_of("|*|a b|é|a/b"),
            ]
            .boxed(),
            "uri" | "strip_prefix" => prop_oneof![
                4 => "/|(/(a|b|\\{id\\}|\\{x\\})){1,3}(/\\*)?".prop_map(Json::String),
                2 => "(/(a|\\{id\\}|\\{\\}|x\\{y\\}|\\*|\\.|\\.\\.|%2F|%41|é|\\?q|)){1,4}"
                    .prop_map(Json::String),
                1 => any::<bool>().prop_map(Json::Bool),
            ]
            .boxed(),
            "uris" => list(value_for("uri")),
            "methods" => list(pick("GET|POST|PUT", "get|GRAB|")),
            "hosts" => list(pick(
                "a.example|*.example|api.internal:8080|10.0.0.5",
                "*.|a@b|é.example|a b||http://a|a:b:c",
            )),
            "host" => pick(
                "a.example|127.0.0.1|::1|localhost",
                "[::1]|::ffff:1.2.3.4|a:b|1::2::3|fe80::1%eth0|a@b|a/b||é.example|a b|a:80|\
                 host:99999|-|.|a..b|[|%41|*|a%|a\\b|a?b|a#b",
            ),
            "trusted_proxies" => list(pick(
                "10.0.0.0/8|10.0.0.1|::1|fe80::/10",
                "10.0.0.0/33|a||1.2.3.4/0|::/129|10.0.0.1/8/8",
            )),
            "type" => pick("roundrobin|chash|least_conn", "random"),
            "hash_on" => pick("ip|uri|header:x-user", "header:|cookie"),
            "scheme" => pick("http|grpc", "https"),
            "path_normalization" => pick("on|off", "raw"),
            "request_trailers" => list(pick("x-checksum|grpc-x", "x-consumer-username|te|a b|")),
            "status" => pick("enabled|disabled|online|offline", "off"),
            "keys" => list(object("name key_sha256", "role")),
            "accounts" => list(object("username password_hash", "role")),
            "role" => pick("admin|viewer", "root"),
            "key_sha256" => pick(
                "0000000000000000000000000000000000000000000000000000000000000000",
                "abc|",
            ),
            "password_hash" => pick(
                "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$YWJjZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXo",
                "$2b$10$abc|plain",
            ),
            "open" => list(pick("/metrics|/healthz|/readyz", "/v1/status|/")),
            "username" => pick("alice|bob", ""),
            "failure" => pick("closed|open", "maybe"),
            "isolation" => pick("pooled|per-request", "per_request"),
            "wasi" => list(pick("clocks|random|stdio|runtime", "files")),
            "module" => pick("a.wasm", "|../a.wasm|/dev/zero"),
            "sha256" => pick(
                "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
                "9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08|abc|",
            ),
            "log" | "clock" | "kv" | "metrics" => any::<bool>().prop_map(Json::Bool).boxed(),
            "nodes" => prop::collection::vec(object("host port", "weight status"), 1..4)
                .prop_map(Json::Array)
                .boxed(),
            "timeout" => object("", "connect_ms send_ms read_ms idle_ms queue_ms"),
            "retry_on" => list(
                prop_oneof![
                    pick("connect-failure|timeout|reset|503", "connect_failure|200|"),
                    number(),
                ]
                .boxed(),
            ),
            "retry_methods" => list(pick("GET|POST|PUT", "get|GRAB GRAB|")),
            "checks" => object("", "passive"),
            "passive" => object("", "eject_ms max_ejected_percent"),
            "plugins" => list(object("name", "config isolation")),
            "limits" => object("", "memory_mb timeout_ms max_body_bytes"),
            "grants" => object("", "log clock kv metrics http wasi"),
            "http" => object("", "hosts methods timeout_ms max_response_bytes private"),
            "quarantine" => object("", "traps window_ms backoff_ms"),
            "quotas" => object("", "memory_mb instances kv_entries kv_bytes"),
            "config" | "meta" => json(),
            _ => number(),
        };
        prop_oneof![60 => typed, 1 => json()].boxed()
    }

    /// An object with its `required` fields (now and then one is left out), some of its
    /// `optional` ones, and now and then an unknown one.
    fn object(required: &'static str, optional: &'static str) -> BoxedStrategy<Json> {
        let field = |name: &'static str| value_for(name).prop_map(move |v| (name.to_owned(), v));
        let required: Vec<_> = required
            .split_whitespace()
            .map(|name| prop::option::weighted(0.97, field(name)))
            .collect();
        let optional: Vec<_> = optional.split_whitespace().map(field).collect();
        let count = optional.len() / 2 + 1;
        let optional = prop::collection::vec(prop::strategy::Union::new(optional), 0..=count);
        let stray = prop::option::weighted(0.03, (any::<String>(), json()));
        (required, optional, stray)
            .prop_map(|(required, optional, stray)| {
                Json::Object(
                    required
                        .into_iter()
                        .flatten()
                        .chain(optional)
                        .chain(stray)
                        .collect(),
                )
            })
            .boxed()
    }

    /// A config object of `kind`, in the shape the stores hold it. (The etcd store's tests
    /// use it too.)
    pub(crate) fn config_object(kind: Kind) -> BoxedStrategy<Json> {
        match kind {
            Kind::Route => object(
                "id uri upstream_id",
                "uris methods hosts priority service strip_prefix plugins path_normalization \
                 status request_trailers",
            ),
            Kind::Upstream => object(
                "id nodes",
                "type type hash_on scheme timeout retries retry_on retry_methods max_connections \
                 checks",
            ),
            Kind::ServiceSettings => object(
                "name",
                "type hash_on scheme timeout retries retry_on retry_methods checks",
            ),
            Kind::Plugin => object(
                "name",
                "module sha256 sha256 limits failure isolation grants tenant quarantine",
            ),
            Kind::Tenant => object("name", "quotas"),
            Kind::Server => object(
                "",
                "header_timeout_ms keepalive_timeout_ms body_timeout_ms send_timeout_ms \
                 max_header_bytes max_headers max_connections http2_max_streams trusted_proxies",
            ),
            Kind::ServiceNode => object("host port", "weight meta status"),
            Kind::Admin => object("", "keys accounts open session_minutes"),
            Kind::Ssl => object("id cert key", "snis default"),
            Kind::Consumer => object("name", "labels credentials"),
            Kind::Module | Kind::Key => json(),
        }
    }

    /// A top-level section and what it holds: mostly a list of objects of its kind.
    fn section() -> impl Strategy<Value = (String, Json)> {
        let list = |kind| {
            prop_oneof![
                12 => prop::collection::vec(config_object(kind), 0..4).prop_map(Json::Array),
                1 => json(),
            ]
        };
        prop_oneof![
            4 => list(Kind::Route).prop_map(|v| ("routes", v)),
            4 => list(Kind::Upstream).prop_map(|v| ("upstreams", v)),
            4 => list(Kind::Plugin).prop_map(|v| ("plugins", v)),
            4 => list(Kind::Tenant).prop_map(|v| ("tenants", v)),
            4 => prop_oneof![12 => config_object(Kind::Server), 1 => json()]
                .prop_map(|v| ("server", v)),
            2 => prop_oneof![12 => config_object(Kind::Admin), 1 => json()]
                .prop_map(|v| ("admin", v)),
            1 => (prop::sample::select(vec!["route", "services", ""]), json()),
        ]
        .prop_map(|(key, value)| (key.to_owned(), value))
    }

    /// Checks that a parsed upstream is valid and builds it as a snapshot does: `Upstream::new`
    /// trusts that parsing checked it (it `expect`s every node address to parse). The etcd
    /// store's tests use it too.
    pub(crate) fn check_upstream(upstream: &UpstreamConfig) {
        config::verify(upstream).unwrap();
        let metrics = crate::metrics::Metrics::new();
        let pool = crate::upstream::ClientPool::default();
        let built = crate::upstream::Upstream::new(upstream.clone(), &pool, &metrics).unwrap();
        assert_eq!(built.nodes.nodes().len(), upstream.nodes.len());
    }

    /// Found by `fuzz_file_parse_never_panics_on_structured_documents`: a ring's point count
    /// was weight × 160 in u32, which overflowed.
    #[test]
    fn a_heavy_chash_node_is_refused_or_built_without_panicking() {
        let upstream = |weight: u32| {
            parse(&format!(
                "upstreams: [{{id: u, type: chash, hash_on: ip,\
                 nodes: [{{host: a, port: 1, weight: {weight}}}]}}]"
            ))
            .unwrap()
        };
        let refused = upstream(26_843_546);
        assert_eq!(refused.unparsed[0].errors[0].path, "/nodes/0/weight");
        assert!(
            refused.unparsed[0].reason.contains("over 1000000"),
            "{refused:?}"
        );
        let heaviest = upstream(crate::config::MAX_WEIGHT).objects.upstreams["u"].clone();
        let metrics = crate::metrics::Metrics::new();
        let pool = crate::upstream::ClientPool::default();
        crate::upstream::Upstream::new(heaviest, &pool, &metrics).unwrap();
    }

    /// Everything the gateway does with a parsed document before it serves it, that could
    /// panic: building each upstream (parsing already checked every object).
    fn check_everything(desired: &Desired) {
        let objects = &desired.objects;
        for route in objects.routes.values() {
            config::verify(&**route).unwrap();
        }
        for upstream in objects.upstreams.values() {
            check_upstream(upstream);
        }
        for plugin in objects.plugins.values() {
            config::verify(plugin).unwrap();
        }
        for tenant in objects.tenants.values() {
            config::verify(tenant).unwrap();
        }
        if let Some(server) = &objects.server {
            config::verify(server).unwrap();
        }
    }

    /// Parses `text` and checks what comes out; a parse must not take seconds.
    fn parse_quickly(text: &str) -> Result<Desired, String> {
        let started = std::time::Instant::now();
        let parsed = parse(text);
        if let Ok(desired) = &parsed {
            check_everything(desired);
        }
        let took = started.elapsed();
        assert!(took < Duration::from_secs(10), "took {took:?}");
        parsed
    }

    #[test]
    fn yaml_bombs_fail_quickly() {
        // Billion laughs: nine levels of nine aliases each.
        let mut laughs =
            String::from("routes:\n  - &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
        for level in 1..10 {
            let previous = format!("*a{}", level - 1);
            let row = [previous.as_str(); 9].join(", ");
            laughs.push_str(&format!("  - &a{level} [{row}]\n"));
        }
        let error = parse_quickly(&laughs).unwrap_err();
        assert!(error.contains("repetition limit"), "{error}");

        // Aliases of a mapping merged into many routes.
        let mut merges = String::from(
            "routes:\n  - &r {id: r, uri: /a, upstream_id: u,\
             plugins: &p [{name: a, config: {x: [1, 2, 3]}}]}\n",
        );
        for index in 0..2_000 {
            merges.push_str(&format!("  - {{<<: *r, id: r{index}, plugins: *p}}\n"));
        }
        let _ = parse_quickly(&merges);

        for deep in [
            "[".repeat(10_000),
            "{".repeat(10_000),
            format!("routes: {}{}", "[".repeat(10_000), "]".repeat(10_000)),
            format!(
                "routes:\n  - {{id: a, uri: /a, upstream_id: u,\
                 plugins: [{{name: p, config: {}1{}}}]}}",
                "[".repeat(10_000),
                "]".repeat(10_000)
            ),
            format!("server: {}", "{a: ".repeat(10_000)),
            (0..10_000)
                .map(|i| format!("{}- \n", " ".repeat(i % 200)))
                .collect(),
            format!(
                "routes:\n{}",
                (0..200)
                    .map(|i| format!("{}-\n", " ".repeat(2 + 2 * i)))
                    .collect::<String>()
            ),
        ] {
            let error = parse_quickly(&deep).unwrap_err();
            assert!(
                error.contains("recursion limit") || error.contains("not valid YAML"),
                "{error}"
            );
        }

        // Very long scalars and very many keys are fine, just large.
        let long = format!(
            "routes: [{{id: a, uri: /{}, upstream_id: u}}]",
            "a".repeat(1 << 20)
        );
        assert!(parse_quickly(&long).unwrap().unparsed.is_empty());
        let wide: String = (0..20_000)
            .map(|i| format!("  - {{id: r{i}, uri: /{i}, upstream_id: u}}\n"))
            .collect();
        assert_eq!(
            parse_quickly(&format!("routes:\n{wide}"))
                .unwrap()
                .objects
                .routes
                .len(),
            20_000
        );
    }

    proptest! {
        #![proptest_config(crate::proptest_cases(20_000))]

        #[test]
        fn fuzz_file_parse_never_panics_on_any_string(
            text in prop_oneof![
                any::<String>(),
                // YAML's own punctuation, to get past the first character more often.
                "[\\[\\]{}:,&*!|>'\"#%@`? \\n\\t-a1<]{0,48}",
            ],
        ) {
            let _ = parse_quickly(&text);
        }
    }

    proptest! {
        // Generating a document costs more than parsing it (the strategies run unoptimised
        // in a debug build): 10_000 cases take about 4 s.
        #![proptest_config(crate::proptest_cases(10_000))]

        #[test]
        fn fuzz_file_parse_never_panics_on_structured_documents(
            sections in prop::collection::vec(section(), 0..5),
            as_yaml in any::<bool>(),
            repeat in prop::bool::weighted(0.05),
        ) {
            let text = if as_yaml {
                // Block YAML, with each key once.
                let map: serde_json::Map<String, Json> = sections.into_iter().collect();
                serde_norway::to_string(&map).expect("JSON serializes as YAML")
            } else {
                // A JSON document is YAML too; now and then this one repeats a key.
                let mut sections = sections;
                if !repeat {
                    let mut seen = std::collections::HashSet::new();
                    sections.retain(|(key, _)| seen.insert(key.clone()));
                }
                let entries: Vec<String> = sections
                    .iter()
                    .map(|(key, value)| format!("{}: {value}", Json::from(key.as_str())))
                    .collect();
                format!("{{{}}}", entries.join(", "))
            };
            let _ = parse_quickly(&text);
        }
    }
}
