//! The live config: a validated, immutable `Snapshot`, and how one is built from config objects.
//!
//! Building never loses what is serving. An object that fails validation keeps its previous
//! version (if there was one), its error is reported, and every other object still loads.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use http::Method;

use crate::config::{
    ConfigObjects, FailurePolicy, Kind, ObjectError, PluginConfig, RouteConfig, StripPrefix,
};
use crate::metrics::{Metrics, RouteMetrics};
use crate::plugin::{Module, PluginPool, PluginRuntime};
use crate::router::{RouteFilter, RouteTable};
use crate::upstream::{ClientPool, Upstream};

/// A plugin entry whose module compiled.
#[derive(Debug)]
pub struct LoadedPlugin {
    /// Its config entry.
    pub config: PluginConfig,
    /// The compiled module.
    pub module: Arc<Module>,
}

/// One plugin in a route's chain.
#[derive(Debug)]
pub struct ChainLink {
    /// The warm instances, initialised with this route's config for the plugin.
    pub pool: Arc<PluginPool>,
    /// What happens when the plugin fails.
    pub failure: FailurePolicy,
}

/// Where a route sends its requests.
#[derive(Debug)]
pub enum Target {
    /// A configured upstream.
    Upstream(Arc<Upstream>),
}

/// A route ready to serve.
#[derive(Debug)]
pub struct Route {
    /// The route id.
    pub id: Arc<str>,
    /// The config it was built from.
    pub config: RouteConfig,
    /// Where requests go.
    pub target: Target,
    /// The plugin chain, in `on-request` order.
    pub chain: Vec<ChainLink>,
    /// The largest request body to buffer, when a plugin wants it.
    pub request_body_limit: Option<u64>,
    /// The largest response body to buffer, when a plugin wants it.
    pub response_body_limit: Option<u64>,
    /// Whether any plugin runs after `on-request`, so the request head must be kept.
    pub keeps_request: bool,
    /// The route's metric handles.
    pub metrics: RouteMetrics,
}

impl Route {
    /// The path the upstream should see, after `strip_prefix`. `prefix` is the matched pattern's.
    pub fn upstream_path(&self, path: &str, prefix: &str) -> String {
        let strip = match &self.config.strip_prefix {
            None | Some(StripPrefix::Route(false)) => return path.to_owned(),
            Some(StripPrefix::Route(true)) => prefix,
            Some(StripPrefix::Literal(literal)) => literal.trim_end_matches('/'),
        };
        match path.strip_prefix(strip) {
            Some("") => "/".to_owned(),
            Some(rest) if rest.starts_with('/') => rest.to_owned(),
            _ => path.to_owned(),
        }
    }
}

/// Everything the data path reads, swapped whole on every config change.
pub struct Snapshot {
    /// Routes, by path, method and host.
    pub routes: RouteTable<Route>,
    /// Upstreams by id.
    pub upstreams: BTreeMap<String, Arc<Upstream>>,
    /// Loaded plugin entries by name.
    pub plugins: BTreeMap<String, Arc<LoadedPlugin>>,
    /// Routes by id (the same values as in `routes`).
    pub route_list: BTreeMap<String, Arc<Route>>,
    /// Objects refused in the build that made this snapshot.
    pub errors: Vec<ObjectError>,
    /// Counts builds, starting at 0 for the empty snapshot.
    pub generation: u64,
}

impl Snapshot {
    /// A snapshot with nothing in it: every request gets 404.
    pub fn empty() -> Self {
        Snapshot {
            routes: RouteTable::builder().build(),
            upstreams: BTreeMap::new(),
            plugins: BTreeMap::new(),
            route_list: BTreeMap::new(),
            errors: Vec::new(),
            generation: 0,
        }
    }

    /// The config objects this snapshot serves.
    pub fn objects(&self) -> ConfigObjects {
        ConfigObjects {
            routes: self
                .route_list
                .iter()
                .map(|(id, r)| (id.clone(), r.config.clone()))
                .collect(),
            upstreams: self
                .upstreams
                .iter()
                .map(|(id, u)| (id.clone(), u.config.clone()))
                .collect(),
            plugins: self
                .plugins
                .iter()
                .map(|(n, p)| (n.clone(), p.config.clone()))
                .collect(),
        }
    }
}

/// A boxed future, for the module source.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where a store finds a plugin entry's module bytes.
pub trait ModuleSource: Send + Sync {
    /// The bytes of `plugin`'s module, or why they cannot be had.
    fn fetch<'a>(&'a self, plugin: &'a PluginConfig) -> BoxFuture<'a, Result<Vec<u8>, String>>;
}

/// What a snapshot build needs from the gateway.
pub struct BuildContext<'a> {
    /// Compiles modules and creates instance pools.
    pub runtime: &'a PluginRuntime,
    /// Hands out upstream clients.
    pub clients: &'a ClientPool,
    /// Registers per-route metrics.
    pub metrics: &'a Metrics,
    /// Fetches module bytes.
    pub modules: &'a dyn ModuleSource,
}

/// The objects a store wants served, and the ones it could not even parse.
#[derive(Debug, Default)]
pub struct Desired {
    /// The parsed objects.
    pub objects: ConfigObjects,
    /// Objects that did not parse: each keeps its previous version, if it had one.
    pub unparsed: Vec<ObjectError>,
}

impl BuildContext<'_> {
    /// Builds the next snapshot from `desired`, falling back to `previous` object by object.
    pub async fn build(&self, desired: Desired, previous: &Snapshot) -> Snapshot {
        let Desired { objects, unparsed } = desired;
        let mut errors = Vec::new();
        let keep = |kind: Kind, id: &str| unparsed.iter().any(|e| e.kind == kind && e.id == id);
        for error in &unparsed {
            errors.push(error.clone());
        }

        // Plugins first: routes need them.
        let mut plugins = BTreeMap::new();
        for (name, config) in &objects.plugins {
            // Even an unchanged entry is loaded again: its module file may have been rebuilt.
            // Unchanged bytes hit the runtime's module cache.
            match (self.load_plugin(config).await, previous.plugins.get(name)) {
                (Ok(plugin), _) => {
                    plugins.insert(name.clone(), plugin);
                }
                (Err(reason), fallback) => {
                    errors.push(kept(
                        ObjectError::new(Kind::Plugin, name, reason),
                        fallback.is_some(),
                    ));
                    if let Some(old) = fallback {
                        plugins.insert(name.clone(), old.clone());
                    }
                }
            }
        }
        for (name, old) in &previous.plugins {
            if keep(Kind::Plugin, name) && !plugins.contains_key(name) {
                plugins.insert(name.clone(), old.clone());
            }
        }

        let mut upstreams = BTreeMap::new();
        for (id, config) in &objects.upstreams {
            let fallback = previous.upstreams.get(id);
            match config.validate() {
                Ok(()) => {
                    // Keep the running upstream when nothing changed: its counters and pools live on.
                    let upstream = match fallback {
                        Some(old) if &old.config == config => old.clone(),
                        _ => Arc::new(Upstream::new(config.clone(), self.clients)),
                    };
                    upstreams.insert(id.clone(), upstream);
                }
                Err(reason) => {
                    errors.push(kept(
                        ObjectError::new(Kind::Upstream, id, reason),
                        fallback.is_some(),
                    ));
                    if let Some(old) = fallback {
                        upstreams.insert(id.clone(), old.clone());
                    }
                }
            }
        }
        for (id, old) in &previous.upstreams {
            if keep(Kind::Upstream, id) && !upstreams.contains_key(id) {
                upstreams.insert(id.clone(), old.clone());
            }
        }

        let mut route_list = BTreeMap::new();
        let mut candidates: Vec<(&String, &RouteConfig)> = objects.routes.iter().collect();
        for (id, old) in &previous.route_list {
            if keep(Kind::Route, id) && !objects.routes.contains_key(id) {
                candidates.push((id, &old.config));
            }
        }
        for (id, config) in candidates {
            match self.build_route(config, &plugins, &upstreams).await {
                Ok(route) => {
                    route_list.insert(id.clone(), Arc::new(route));
                }
                Err(reason) => {
                    // Fall back to the version that was serving, rebuilt against the new objects.
                    let old = previous
                        .route_list
                        .get(id)
                        .filter(|old| &old.config != config);
                    let rebuilt = match old {
                        Some(old) => self
                            .build_route(&old.config, &plugins, &upstreams)
                            .await
                            .ok(),
                        None => None,
                    };
                    errors.push(kept(
                        ObjectError::new(Kind::Route, id, reason),
                        rebuilt.is_some(),
                    ));
                    if let Some(route) = rebuilt {
                        route_list.insert(id.clone(), Arc::new(route));
                    }
                }
            }
        }

        let mut table = RouteTable::builder();
        for (index, route) in route_list.values().enumerate() {
            let paths: Vec<&str> = route.config.paths().collect();
            let filter = RouteFilter {
                methods: route
                    .config
                    .methods
                    .iter()
                    .filter_map(|m| Method::from_bytes(m.as_bytes()).ok())
                    .collect(),
                hosts: route
                    .config
                    .hosts
                    .iter()
                    .map(|h| h.to_ascii_lowercase())
                    .collect(),
                priority: route.config.priority,
            };
            table.add(&paths, filter, route.clone(), index);
        }
        let routes = table.build();
        for error in &errors {
            tracing::warn!(kind = %error.kind, id = %error.id, reason = %error.reason, "config object rejected");
        }
        self.metrics.config_errors.set(errors.len() as i64);
        self.metrics.routes.set(route_list.len() as i64);
        Snapshot {
            routes,
            upstreams,
            plugins,
            route_list,
            errors,
            generation: previous.generation + 1,
        }
    }

    async fn load_plugin(&self, config: &PluginConfig) -> Result<Arc<LoadedPlugin>, String> {
        config.validate()?;
        let bytes = self.modules.fetch(config).await?;
        if let Some(expected) = &config.sha256 {
            let actual = crate::plugin::sha256_hex(&bytes);
            if &actual != expected {
                return Err(format!("module bytes have sha256 {actual}, not {expected}"));
            }
        }
        let module = self.runtime.load(bytes).await.map_err(|e| e.to_string())?;
        Ok(Arc::new(LoadedPlugin {
            config: config.clone(),
            module,
        }))
    }

    async fn build_route(
        &self,
        config: &RouteConfig,
        plugins: &BTreeMap<String, Arc<LoadedPlugin>>,
        upstreams: &BTreeMap<String, Arc<Upstream>>,
    ) -> Result<Route, String> {
        config.validate()?;
        let target = match (&config.upstream_id, &config.service) {
            (Some(id), _) => Target::Upstream(
                upstreams
                    .get(id)
                    .cloned()
                    .ok_or_else(|| format!("upstream {id:?} does not exist"))?,
            ),
            (None, Some(service)) => {
                return Err(format!(
                    "service {service:?}: service discovery needs the etcd store (weir run --etcd)"
                ));
            }
            (None, None) => unreachable!("validate() requires a target"),
        };
        let mut chain = Vec::with_capacity(config.plugins.len());
        let mut seen = HashMap::new();
        for reference in &config.plugins {
            if seen.insert(reference.name.as_str(), ()).is_some() {
                return Err(format!("plugin {:?} is listed twice", reference.name));
            }
            let plugin = plugins
                .get(&reference.name)
                .ok_or_else(|| format!("plugin {:?} is not loaded", reference.name))?;
            let pool = self
                .runtime
                .pool(
                    &reference.name,
                    &plugin.module,
                    plugin.config.limits,
                    &reference.config,
                )
                .await
                .map_err(|e| format!("plugin {:?}: {e}", reference.name))?;
            chain.push(ChainLink {
                pool,
                failure: plugin.config.failure,
            });
        }
        let limit = |wanted: fn(&ChainLink) -> bool| {
            chain
                .iter()
                .filter(|link| wanted(link))
                .map(|link| link.pool.limits().max_body_bytes)
                .min()
        };
        let request_body_limit =
            limit(|l| l.pool.wants().request_body && l.pool.wants().on_request);
        let response_body_limit =
            limit(|l| l.pool.wants().response_body && l.pool.wants().on_response);
        let keeps_request = chain
            .iter()
            .any(|l| l.pool.wants().on_response || l.pool.wants().on_log);
        Ok(Route {
            id: config.id.as_str().into(),
            metrics: self.metrics.route(&config.id),
            config: config.clone(),
            target,
            chain,
            request_body_limit,
            response_body_limit,
            keeps_request,
        })
    }
}

fn kept(mut error: ObjectError, serving_previous: bool) -> ObjectError {
    if serving_previous {
        error
            .reason
            .push_str(" (the previous version keeps serving)");
    }
    error
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strip_prefix_forms() {
        let route = |strip: Option<StripPrefix>| Route {
            id: "r".into(),
            config: RouteConfig {
                id: "r".into(),
                uri: Some("/api/*".into()),
                uris: vec![],
                methods: vec![],
                hosts: vec![],
                priority: 0,
                upstream_id: Some("u".into()),
                service: None,
                strip_prefix: strip,
                plugins: vec![],
            },
            target: Target::Upstream(Arc::new(Upstream::new(
                serde_json::from_value(
                    serde_json::json!({"id": "u", "nodes": [{"host": "h", "port": 1}]}),
                )
                .unwrap(),
                &ClientPool::default(),
            ))),
            chain: vec![],
            request_body_limit: None,
            response_body_limit: None,
            keeps_request: false,
            metrics: Metrics::new().route("r"),
        };
        assert_eq!(route(None).upstream_path("/api/x", "/api"), "/api/x");
        assert_eq!(
            route(Some(StripPrefix::Route(true))).upstream_path("/api/x/y", "/api"),
            "/x/y"
        );
        assert_eq!(
            route(Some(StripPrefix::Route(true))).upstream_path("/api", "/api"),
            "/"
        );
        assert_eq!(
            route(Some(StripPrefix::Literal("/api/".into()))).upstream_path("/api/x", "/api"),
            "/x"
        );
        // Only whole segments are stripped.
        assert_eq!(
            route(Some(StripPrefix::Literal("/ap".into()))).upstream_path("/api/x", "/api"),
            "/api/x"
        );
    }
}
