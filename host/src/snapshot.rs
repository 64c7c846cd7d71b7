//! The live config: a validated, immutable `Snapshot`, and how one is built from config objects.
//!
//! Building never loses what is serving. An object that fails validation keeps its previous
//! version (if there was one), its error is reported, and every other object still loads.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use http::Method;
use imbl::ordmap::DiffItem;

use crate::config::{
    AdminConfig, ConfigObjects, ConsumerConfig, Consumers, FailurePolicy, Kind, KvBackend,
    NodeConfig, ObjectError, PluginConfig, RouteConfig, RouteStatus, ServerConfig, ServiceNode,
    ServiceSettings, SslConfig, StripPrefix, TenantConfig,
};
use crate::edge::ServerSettings;
use crate::error::GatewayError;
use crate::metrics::{Metrics, PluginMetrics, RouteMetrics};
use crate::plugin::signature::{self, ModuleSignature};
use crate::plugin::{Module, PluginPool, PluginRuntime};
use crate::router::{RouteFilter, RouteTable};
use crate::tls::{CertTable, Certified};
use crate::upstream::{ClientPool, Upstream};
use crate::view::Directory;

/// A plugin entry whose module compiled.
#[derive(Debug)]
pub struct LoadedPlugin {
    /// Its config entry.
    pub config: PluginConfig,
    /// The compiled module.
    pub module: Arc<Module>,
    /// The trusted key that signed it, when `server.trusted_keys` is set.
    pub signed_by: Option<String>,
}

/// One plugin in a route's chain.
#[derive(Debug)]
pub struct ChainLink {
    /// The warm instances, initialised with this route's config for the plugin.
    pub pool: Arc<PluginPool>,
    /// What happens when the plugin fails.
    pub failure: FailurePolicy,
    /// Calls, failures and latency of this plugin on this route; shared with the filter body
    /// streams that call it.
    pub metrics: Arc<PluginMetrics>,
}

/// A certificate that loaded.
#[derive(Debug)]
pub struct LoadedCert {
    /// Its config object.
    pub config: SslConfig,
    /// The chain and key, ready to serve.
    pub certified: Certified,
}

/// Where a route sends its requests.
#[derive(Debug)]
pub enum Target {
    /// A configured upstream.
    Upstream(Arc<Upstream>),
    /// The live nodes of a discovered service.
    Service(String),
    /// The service named by the path's first segment, which is stripped (`service: "*"`).
    AnyService,
}

/// A route ready to serve.
#[derive(Debug)]
pub struct Route {
    /// The route id.
    pub id: Arc<str>,
    /// The config it was built from (the store's own, compared by pointer to tell a change).
    pub config: Arc<RouteConfig>,
    /// Where requests go.
    pub target: Target,
    /// The plugin chain, in `on-request` order.
    pub chain: Vec<ChainLink>,
    /// The plugin entries the chain was built from, to tell when it must be rebuilt.
    pub built_from: Vec<Arc<LoadedPlugin>>,
    /// The largest request body to buffer, when a plugin wants it.
    pub request_body_limit: Option<u64>,
    /// The largest response body to buffer, when a plugin wants it.
    pub response_body_limit: Option<u64>,
    /// Whether any plugin runs after `on-request`, so the request head must be kept.
    pub keeps_request: bool,
    /// Whether a plugin of the chain is isolated per request, so the request carries its own
    /// instances from phase to phase.
    pub binds_instances: bool,
    /// `request_trailers`, parsed: the trailers that go upstream besides `grpc-*`.
    pub request_trailers: Arc<[http::HeaderName]>,
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
    /// Discovered services by name, as upstreams over their live nodes.
    pub services: BTreeMap<String, Arc<Upstream>>,
    /// Loaded plugin entries by name.
    pub plugins: BTreeMap<String, Arc<LoadedPlugin>>,
    /// Tenants by name.
    pub tenants: BTreeMap<String, TenantConfig>,
    /// How clients are treated: timeouts, limits, trusted proxies.
    pub server: Arc<ServerSettings>,
    /// Who may use the admin listener (the store's `admin` section).
    pub admin: Arc<AdminConfig>,
    /// Certificates that loaded, by id.
    pub ssl: BTreeMap<String, Arc<LoadedCert>>,
    /// Which certificate answers which server name.
    pub certs: Arc<CertTable>,
    /// Consumers, indexed by their credentials.
    pub consumers: Arc<Consumers>,
    /// Routes by id (the same values as in `routes`), in a persistent map: the next build edits a
    /// copy, so a change costs the routes it touches.
    pub route_list: imbl::OrdMap<Arc<str>, Arc<Route>>,
    /// The route configs this snapshot was built from: what the next build diffs against.
    pub route_configs: imbl::OrdMap<String, Arc<RouteConfig>>,
    /// Objects refused in the build that made this snapshot.
    pub errors: Vec<ObjectError>,
    /// Counts builds, starting at 0 for the empty snapshot.
    pub generation: u64,
    /// What plugins may look up during a request routed by this snapshot.
    pub directory: Directory,
}

impl Snapshot {
    /// A snapshot with nothing in it: every request gets 404.
    pub fn empty() -> Self {
        Snapshot {
            routes: RouteTable::builder().build(),
            upstreams: BTreeMap::new(),
            services: BTreeMap::new(),
            plugins: BTreeMap::new(),
            tenants: BTreeMap::new(),
            server: Arc::new(ServerSettings::default()),
            admin: Arc::new(AdminConfig::default()),
            ssl: BTreeMap::new(),
            certs: Arc::new(CertTable::default()),
            consumers: Arc::default(),
            directory: Directory::default(),
            route_list: imbl::OrdMap::new(),
            route_configs: imbl::OrdMap::new(),
            errors: Vec::new(),
            generation: 0,
        }
    }
}

/// A boxed future, for the module source.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where a store finds a plugin entry's module bytes.
pub trait ModuleSource: Send + Sync {
    /// The bytes of `plugin`'s module, or why they cannot be had.
    fn fetch<'a>(&'a self, plugin: &'a PluginConfig) -> BoxFuture<'a, Result<Vec<u8>, String>>;

    /// The module's signature: the entry's own `signature`, unless the store keeps it
    /// elsewhere (the file store also reads `<module>.sig` beside the module).
    fn signature<'a>(
        &'a self,
        plugin: &'a PluginConfig,
    ) -> BoxFuture<'a, Result<Option<ModuleSignature>, String>> {
        Box::pin(async move { Ok(plugin.signature.clone()) })
    }
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
    /// The parsed objects (shared: a store may keep them and publish them again).
    pub objects: Arc<ConfigObjects>,
    /// Objects that did not parse: each keeps its previous version, if it had one.
    pub unparsed: Vec<ObjectError>,
}

/// Which routes a build looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Routes {
    /// Those whose config changed, and those refused last time, when plugins and upstreams are
    /// unchanged; every route otherwise.
    Changed,
    /// Every route: what `Changed` must agree with.
    #[cfg(test)]
    All,
}

impl BuildContext<'_> {
    /// Builds the next snapshot from `desired`, falling back to `previous` object by object.
    pub async fn build(&self, desired: &Desired, previous: &Snapshot) -> Snapshot {
        self.build_routes_from(desired, previous, Routes::Changed)
            .await
    }

    /// [`BuildContext::build`], looking at the routes `routes` says.
    async fn build_routes_from(
        &self,
        desired: &Desired,
        previous: &Snapshot,
        routes: Routes,
    ) -> Snapshot {
        let Desired { objects, unparsed } = desired;
        let mut errors = unparsed.clone();
        let keep = |kind: Kind, id: &str| unparsed.iter().any(|e| e.kind == kind && e.id == id);

        // Tenants first: plugins count against them.
        let mut tenants = Vec::new();
        tenants.extend(objects.tenants.values().cloned());
        for (name, old) in &previous.tenants {
            if keep(Kind::Tenant, name) && !objects.tenants.contains_key(name) {
                tenants.push(old.clone());
            }
        }
        self.runtime.tenants().update(tenants.iter().cloned());
        let tenants = tenants.into_iter().map(|t| (t.name.clone(), t)).collect();

        let server = self.build_server(objects, previous, &keep);
        let redis_timeout = std::time::Duration::from_millis(server.config.redis_timeout_ms);
        if let Err(error) = self
            .runtime
            .redis()
            .configure(server.config.redis_url.as_deref(), redis_timeout)
        {
            // The URL was checked when the section parsed; this is only a belt to those braces.
            tracing::warn!("server.redis_url: {error}");
        }
        let admin = match &objects.admin {
            Some(config) if *config == *previous.admin => previous.admin.clone(),
            Some(config) => Arc::new(config.clone()),
            // A broken section keeps the previous one: it must neither lock everyone out nor
            // open what it closed.
            None if keep(Kind::Admin, "admin") => previous.admin.clone(),
            None => Arc::new(AdminConfig::default()),
        };

        // Plugins next: routes need them.
        let mut plugins = BTreeMap::new();
        for (name, config) in &objects.plugins {
            let old = previous.plugins.get(name);
            // A module named by sha256 cannot change; a module file may have been rebuilt, so
            // it is read again (unchanged bytes hit the runtime's module cache).
            // A change of trusted keys or of Redis checks every module again.
            let unchanged = old.filter(|old| {
                old.config == *config
                    && config.sha256.is_some()
                    && same_plugin_settings(&server, previous)
            });
            let loaded = match unchanged {
                Some(old) => Ok(old.clone()),
                None => self.load_plugin(config, &server.config).await,
            };
            accept(&mut plugins, &mut errors, Kind::Plugin, name, loaded, old);
        }
        keep_unparsed(&mut plugins, &previous.plugins, Kind::Plugin, &keep);

        let mut upstreams = BTreeMap::new();
        for (id, config) in &objects.upstreams {
            let old = previous.upstreams.get(id);
            // Keep the running upstream when nothing changed: its counters and pools live on.
            let built = match old {
                Some(old) if old.config == *config => Ok(old.clone()),
                _ => Upstream::new(config.clone(), self.clients, self.metrics).map(Arc::new),
            };
            accept(&mut upstreams, &mut errors, Kind::Upstream, id, built, old);
        }
        keep_unparsed(&mut upstreams, &previous.upstreams, Kind::Upstream, &keep);

        let services = self.build_services(objects, previous, &keep);
        let (ssl, certs) = self.build_certificates(objects, previous, &keep, &mut errors);
        let consumers = build_consumers(objects, previous, &keep);

        // With the same plugins and upstreams, only the routes whose config changed are built
        // (imbl's diff skips what the two maps share), and those refused last time, which a
        // build from scratch would try again. Otherwise every route is looked at; one whose
        // config and dependencies are the very objects it was built from is still kept as is.
        let same_dependencies = same_entries(&plugins, &previous.plugins)
            && same_entries(&upstreams, &previous.upstreams);
        let mut route_list;
        let changed: Vec<&str> = if same_dependencies && routes == Routes::Changed {
            let mut ids: BTreeSet<&str> = previous
                .route_configs
                .diff(&objects.routes)
                .map(|item| match item {
                    DiffItem::Add(id, _) | DiffItem::Remove(id, _) => id.as_str(),
                    DiffItem::Update { new: (id, _), .. } => id.as_str(),
                })
                .collect();
            ids.extend(
                previous
                    .errors
                    .iter()
                    .chain(unparsed)
                    .filter(|error| error.kind == Kind::Route)
                    .map(|error| error.id.as_str()),
            );
            route_list = previous.route_list.clone();
            ids.into_iter().collect()
        } else {
            route_list = imbl::OrdMap::new();
            merge_by_id(&previous.route_list, &objects.routes)
                .map(|pair| match pair {
                    (_, Some(config)) => config.id.as_str(),
                    (Some(old), None) => &old.id,
                    (None, None) => unreachable!("a merge yields one side or both"),
                })
                .collect()
        };
        // Each looked-at id's previous route and new one, for the route table.
        let mut changes = Vec::with_capacity(changed.len());
        for id in changed {
            let old = previous.route_list.get(id);
            let wanted = objects.routes.get(id);
            let built = self
                .rebuild_route(old, wanted, same_dependencies, &keep, &plugins, &upstreams)
                .await;
            let route = match built {
                Ok(route) => route,
                Err((error, fallback)) => {
                    errors.push(error);
                    fallback
                }
            };
            match &route {
                Some(route) => route_list.insert(route.id.clone(), route.clone()),
                None => route_list.remove(id),
            };
            changes.push((old, route));
        }

        let routes = route_table(
            changes.iter().map(|(old, new)| (*old, new.as_ref())),
            &route_list,
            previous,
        );
        for error in &errors {
            tracing::warn!(kind = %error.kind, id = %error.id, reason = %error.reason, "config object rejected");
        }
        self.metrics.config_errors.set(errors.len() as i64);
        self.metrics.routes.set(route_list.len() as i64);
        let directory = Directory::new(
            previous.generation + 1,
            consumers.clone(),
            upstreams.iter().map(|(id, upstream)| {
                let first = upstream.nodes.nodes().first();
                (id.clone(), first.map(|node| node.addr.clone()))
            }),
        );
        Snapshot {
            routes,
            upstreams,
            services,
            plugins,
            tenants,
            server,
            admin,
            ssl,
            certs,
            directory,
            consumers,
            route_list,
            route_configs: objects.routes.clone(),
            errors,
            generation: previous.generation + 1,
        }
    }

    /// The `server` settings: the store's, the defaults when it has none, or the previous ones
    /// when the store's did not parse.
    fn build_server(
        &self,
        objects: &ConfigObjects,
        previous: &Snapshot,
        keep: &impl Fn(Kind, &str) -> bool,
    ) -> Arc<ServerSettings> {
        let Some(config) = &objects.server else {
            if keep(Kind::Server, "server") {
                return previous.server.clone();
            }
            return Arc::new(ServerSettings::default());
        };
        if previous.server.config == *config {
            return previous.server.clone();
        }
        Arc::new(ServerSettings::new(config.clone()))
    }

    /// The certificates that load, and the table that picks one by server name. A certificate
    /// that fails keeps its previous version serving; one that claims a name another already
    /// has is left out.
    fn build_certificates(
        &self,
        objects: &ConfigObjects,
        previous: &Snapshot,
        keep: &impl Fn(Kind, &str) -> bool,
        errors: &mut Vec<ObjectError>,
    ) -> (BTreeMap<String, Arc<LoadedCert>>, Arc<CertTable>) {
        let mut loaded = BTreeMap::new();
        for (id, config) in &objects.ssl {
            let old = previous.ssl.get(id);
            let built = match old {
                Some(old) if old.config == *config => Ok(old.clone()),
                _ => crate::tls::certified_key(&config.cert, &config.key)
                    .map(|certified| {
                        Arc::new(LoadedCert {
                            config: config.clone(),
                            certified,
                        })
                    })
                    .map_err(|e| e.to_string()),
            };
            accept(&mut loaded, errors, Kind::Ssl, id, built, old);
        }
        keep_unparsed(&mut loaded, &previous.ssl, Kind::Ssl, keep);
        if loaded.len() == previous.ssl.len()
            && loaded
                .iter()
                .zip(&previous.ssl)
                .all(|((a, x), (b, y))| a == b && Arc::ptr_eq(x, y))
        {
            return (loaded, previous.certs.clone());
        }
        let (table, refused) = CertTable::build(
            loaded
                .values()
                .map(|cert| (cert.config.claim(), cert.certified.key.clone())),
        );
        for (id, reason) in refused {
            loaded.remove(&id);
            errors.push(ObjectError::new(Kind::Ssl, id, reason));
        }
        for id in previous.ssl.keys().filter(|id| !loaded.contains_key(*id)) {
            self.metrics
                .cert_expiry
                .remove(&crate::metrics::CertLabels { id: id.clone() });
        }
        for (id, cert) in &loaded {
            self.metrics
                .cert_expiry
                .get_or_create(&crate::metrics::CertLabels { id: id.clone() })
                .set(cert.certified.not_after);
        }
        (loaded, Arc::new(table))
    }

    /// Each service with live nodes becomes an upstream over them, with its stored settings
    /// (round robin and the defaults without any).
    /// Settings that no longer parse keep the previous ones, as any other object does.
    fn build_services(
        &self,
        objects: &ConfigObjects,
        previous: &Snapshot,
        keep: &impl Fn(Kind, &str) -> bool,
    ) -> BTreeMap<String, Arc<Upstream>> {
        let mut services = BTreeMap::new();
        for (name, nodes) in &objects.services {
            let live: Vec<NodeConfig> = nodes.values().map(ServiceNode::upstream_node).collect();
            if live.is_empty() {
                continue;
            }
            let config = match objects.service_settings.get(name) {
                Some(settings) => settings.upstream(live),
                None => match previous.services.get(name) {
                    Some(old) if keep(Kind::ServiceSettings, name) => {
                        ServiceSettings::of(&old.config).upstream(live)
                    }
                    _ => ServiceSettings::plain(name).upstream(live),
                },
            };
            let upstream = match previous.services.get(name) {
                Some(old) if old.config == config => old.clone(),
                _ => match Upstream::new(config, self.clients, self.metrics) {
                    Ok(upstream) => Arc::new(upstream),
                    Err(reason) => {
                        tracing::warn!(service = %name, %reason, "service not served");
                        continue;
                    }
                },
            };
            services.insert(name.clone(), upstream);
        }
        services
    }

    async fn load_plugin(
        &self,
        config: &PluginConfig,
        server: &ServerConfig,
    ) -> Result<Arc<LoadedPlugin>, String> {
        if config.kv.backend == KvBackend::Redis && server.redis_url.is_none() {
            return Err(
                "kv: {backend: redis} needs server.redis_url, the Redis server the gateways share"
                    .into(),
            );
        }
        let trusted_keys = &server.trusted_keys;
        let bytes = self.modules.fetch(config).await?;
        let actual = crate::digest::sha256_hex(&bytes);
        if let Some(expected) = &config.sha256
            && &actual != expected
        {
            return Err(format!("module bytes have sha256 {actual}, not {expected}"));
        }
        // With trusted keys, only a module one of them signed loads; without, nothing changes.
        // Checked on the bytes' hash before they are compiled: Cranelift and the disk cache
        // only ever see a module a trusted key signed.
        let signed_by = if trusted_keys.is_empty() {
            None
        } else {
            let signature = self.modules.signature(config).await?;
            let signer = signature::verify(trusted_keys, &actual, signature.as_ref())
                .map_err(|e| e.to_string())?;
            Some(signer.to_owned())
        };
        let module = self.runtime.load(bytes).await.map_err(|e| e.to_string())?;
        crate::plugin::grants::check(&module.imports, &config.grants)?;
        if self
            .runtime
            .tenants()
            .get(config.tenant.as_deref())
            .is_none()
        {
            let tenant = config.tenant.as_deref().unwrap_or_default();
            return Err(format!(
                "tenant {tenant:?} does not exist (add it under tenants)"
            ));
        }
        // Asked now, so that the admin API can serve the schema before any route uses the
        // plugin, and a module whose description is broken fails here rather than on a route.
        self.runtime
            .describe(config, &module)
            .await
            .map_err(|e| e.to_string())?;
        Ok(Arc::new(LoadedPlugin {
            config: config.clone(),
            module,
            signed_by,
        }))
    }

    /// The route to serve for one id: `old` is what served it, `wanted` what the store holds.
    /// `None` when it is gone. A route that cannot be built is an error, with the version
    /// that keeps serving in its place (the old one rebuilt against the new objects), if any.
    async fn rebuild_route(
        &self,
        old: Option<&Arc<Route>>,
        wanted: Option<&Arc<RouteConfig>>,
        same_dependencies: bool,
        keep: &impl Fn(Kind, &str) -> bool,
        plugins: &BTreeMap<String, Arc<LoadedPlugin>>,
        upstreams: &BTreeMap<String, Arc<Upstream>>,
    ) -> Result<Option<Arc<Route>>, (ObjectError, Option<Arc<Route>>)> {
        let (old, config) = match (old, wanted) {
            (old, Some(config)) => (old, config),
            // Gone from the store; kept (rebuilt against the new objects, as any other) only
            // while its new version does not parse.
            (Some(old), None) if keep(Kind::Route, &old.id) => (Some(old), &old.config),
            (_, None) => return Ok(None),
        };
        if let Some(old) = old
            && same_dependencies
            && Arc::ptr_eq(&old.config, config)
        {
            return Ok(Some(old.clone()));
        }
        match self.build_route(config, old, plugins, upstreams).await {
            Ok(route) => Ok(Some(route)),
            Err(reason) => {
                // Fall back to the version that was serving, rebuilt against the new objects.
                let rebuilt = match old.filter(|old| !Arc::ptr_eq(&old.config, config)) {
                    Some(old) => self
                        .build_route(&old.config, Some(old), plugins, upstreams)
                        .await
                        .ok(),
                    None => None,
                };
                let error = kept(
                    ObjectError::new(Kind::Route, &config.id, reason),
                    rebuilt.is_some(),
                );
                Err((error, rebuilt))
            }
        }
    }

    async fn build_route(
        &self,
        config: &Arc<RouteConfig>,
        old: Option<&Arc<Route>>,
        plugins: &BTreeMap<String, Arc<LoadedPlugin>>,
        upstreams: &BTreeMap<String, Arc<Upstream>>,
    ) -> Result<Arc<Route>, String> {
        let target = match (&config.upstream_id, &config.service) {
            (Some(id), _) => Target::Upstream(
                upstreams
                    .get(id)
                    .cloned()
                    .ok_or_else(|| format!("upstream {id:?} does not exist"))?,
            ),
            (None, Some(service)) if service == "*" => Target::AnyService,
            (None, Some(service)) => Target::Service(service.clone()),
            (None, None) => return Err("set `upstream_id` or `service`".into()),
        };
        if let Some(old) = old
            && (Arc::ptr_eq(&old.config, config) || old.config == *config)
            && old.target.same_as(&target)
            && old.built_from.len() == config.plugins.len()
            && old
                .built_from
                .iter()
                .zip(&config.plugins)
                .all(|(used, reference)| {
                    plugins
                        .get(&reference.name)
                        .is_some_and(|p| Arc::ptr_eq(p, used))
                })
        {
            // Nothing it depends on changed: keep it, with its warm pools and metric handles.
            return Ok(old.clone());
        }
        let mut chain = Vec::with_capacity(config.plugins.len());
        let mut built_from = Vec::with_capacity(config.plugins.len());
        let mut seen = HashMap::new();
        for reference in &config.plugins {
            if seen.insert(reference.name.as_str(), ()).is_some() {
                return Err(format!("plugin {:?} is listed twice", reference.name));
            }
            let plugin = plugins
                .get(&reference.name)
                .ok_or_else(|| format!("plugin {:?} is not loaded", reference.name))?;
            let isolation = reference.isolation.unwrap_or(plugin.config.isolation);
            let pool = self
                .runtime
                .pool(&plugin.config, &plugin.module, isolation, &reference.config)
                .await
                .map_err(|e| format!("plugin {:?}: {e}", reference.name))?;
            let metrics = self
                .metrics
                .plugin(&reference.name, &config.id, pool.tenant());
            chain.push(ChainLink {
                pool,
                failure: plugin.config.failure,
                metrics: Arc::new(metrics),
            });
            built_from.push(plugin.clone());
        }
        let request_body_limit = request_body_limit(&chain);
        let response_body_limit = response_body_limit(&chain);
        let keeps_request = chain
            .iter()
            .any(|l| l.pool.wants().on_response || l.pool.wants().on_log);
        let binds_instances = chain.iter().any(|l| l.pool.binds_instances());
        // Checked with the config; a name that does not parse could not match a trailer anyway.
        let request_trailers = config
            .request_trailers
            .iter()
            .filter_map(|name| http::HeaderName::from_bytes(name.as_bytes()).ok())
            .collect();
        Ok(Arc::new(Route {
            id: config.id.as_str().into(),
            metrics: self.metrics.route(&config.id),
            config: config.clone(),
            target,
            chain,
            built_from,
            request_body_limit,
            response_body_limit,
            keeps_request,
            binds_instances,
            request_trailers,
        }))
    }
}

/// The largest request body `chain` buffers: the smallest bound among the plugins that read
/// it in `on-request`, or `None` when none does.
pub fn request_body_limit(chain: &[ChainLink]) -> Option<u64> {
    body_limit(chain, |l| {
        l.pool.wants().request_body && l.pool.wants().on_request
    })
}

/// The largest response body `chain` buffers, as [`request_body_limit`] for `on-response`.
pub fn response_body_limit(chain: &[ChainLink]) -> Option<u64> {
    body_limit(chain, |l| {
        l.pool.wants().response_body && l.pool.wants().on_response
    })
}

fn body_limit(chain: &[ChainLink], wanted: fn(&ChainLink) -> bool) -> Option<u64> {
    chain
        .iter()
        .filter(|link| wanted(link))
        .map(|link| link.pool.limits().max_body_bytes)
        .min()
}

impl Snapshot {
    /// The upstream a request on `route` goes to: the one a plugin `chose` (checked against
    /// this snapshot when it chose it), the route's, or the live nodes of its service
    /// (`service_from_path` for a route to any service).
    pub fn upstream_for<'a>(
        &'a self,
        route: &'a Route,
        chose: Option<&str>,
        service_from_path: Option<&str>,
    ) -> Result<&'a Arc<Upstream>, GatewayError> {
        let service = match (chose, &route.target) {
            (Some(id), _) => {
                return self
                    .upstreams
                    .get(id)
                    .ok_or_else(|| GatewayError::NoService {
                        service: id.to_owned(),
                    });
            }
            (None, Target::Upstream(upstream)) => return Ok(upstream),
            (None, Target::Service(name)) => name.as_str(),
            (None, Target::AnyService) => service_from_path.unwrap_or_default(),
        };
        self.services
            .get(service)
            .ok_or_else(|| GatewayError::NoService {
                service: service.to_owned(),
            })
    }
}

impl Target {
    /// Whether two targets send requests to the same place.
    fn same_as(&self, other: &Target) -> bool {
        match (self, other) {
            (Target::Upstream(a), Target::Upstream(b)) => Arc::ptr_eq(a, b),
            (Target::Service(a), Target::Service(b)) => a == b,
            (Target::AnyService, Target::AnyService) => true,
            _ => false,
        }
    }
}

/// Takes a freshly built object, or on failure reports it and keeps the previous version.
fn accept<T: Clone>(
    into: &mut BTreeMap<String, T>,
    errors: &mut Vec<ObjectError>,
    kind: Kind,
    id: &str,
    built: Result<T, String>,
    previous: Option<&T>,
) {
    match built {
        Ok(object) => {
            into.insert(id.to_owned(), object);
        }
        Err(reason) => {
            errors.push(kept(ObjectError::new(kind, id, reason), previous.is_some()));
            if let Some(old) = previous {
                into.insert(id.to_owned(), old.clone());
            }
        }
    }
}

/// Objects the store could not parse keep the version that was serving.
/// Whether the server settings that decide if a module loads (the trusted keys, and whether
/// Redis is configured) are the ones `previous` was built with.
fn same_plugin_settings(server: &ServerSettings, previous: &Snapshot) -> bool {
    let (now, before) = (&server.config, &previous.server.config);
    now.trusted_keys == before.trusted_keys && now.redis_url.is_some() == before.redis_url.is_some()
}

/// The consumers index: the previous one when no consumer changed (re-indexing many thousands
/// costs real time), else a new one. A consumer whose new version did not parse keeps its old.
fn build_consumers(
    objects: &ConfigObjects,
    previous: &Snapshot,
    keep: &impl Fn(Kind, &str) -> bool,
) -> Arc<Consumers> {
    let mut wanted: BTreeMap<&str, &ConsumerConfig> = objects
        .consumers
        .iter()
        .map(|(name, consumer)| (name.as_str(), consumer))
        .collect();
    for name in previous.consumers.names() {
        if keep(Kind::Consumer, name)
            && !wanted.contains_key(name)
            && let Some(old) = previous.consumers.get(name)
        {
            wanted.insert(name, old);
        }
    }
    if previous.consumers.same_as(wanted.values().copied()) {
        return previous.consumers.clone();
    }
    Arc::new(Consumers::new(wanted.into_values()))
}

/// The route table for `route_list`: the previous table with the routes that changed (`changes`:
/// each id's previous route and new one) taken out and put back, so that a change costs the
/// paths it touches; a new table when most changed.
/// A disabled route stays listed (and warm) but is not in the table: it answers 404.
fn route_table<'a>(
    changes: impl Iterator<Item = (Option<&'a Arc<Route>>, Option<&'a Arc<Route>>)>,
    route_list: &imbl::OrdMap<Arc<str>, Arc<Route>>,
    previous: &Snapshot,
) -> RouteTable<Route> {
    let serving = |route: &Arc<Route>| route.config.status == RouteStatus::Enabled;
    let (mut gone, mut came) = (Vec::new(), Vec::new());
    for pair in changes {
        match pair {
            (Some(was), Some(is)) if Arc::ptr_eq(was, is) => {}
            (was, is) => {
                gone.extend(was);
                came.extend(is);
            }
        }
    }
    gone.retain(|route| serving(route));
    came.retain(|route| serving(route));
    if gone.is_empty() && came.is_empty() {
        return previous.routes.clone();
    }
    let mut table = if came.len() + gone.len() > route_list.len() / 2 {
        came = route_list.values().filter(|route| serving(route)).collect();
        RouteTable::builder()
    } else {
        let mut table = previous.routes.edit();
        for route in gone {
            let paths: Vec<&str> = route.config.paths().collect();
            table.remove(&paths, &route.id);
        }
        table
    };
    for route in came {
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
        table.add(&paths, filter, route.clone(), &route.id);
    }
    table.build()
}

/// Whether two maps hold the same objects: the same keys, and values that are one object.
fn same_entries<T>(a: &BTreeMap<String, Arc<T>>, b: &BTreeMap<String, Arc<T>>) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|((a_id, a), (b_id, b))| a_id == b_id && Arc::ptr_eq(a, b))
}

/// Two maps keyed by id side by side, in id order: `(Some, None)` for an id only the first
/// holds, `(None, Some)` for one only the second holds, both for one they share.
fn merge_by_id<'a, J, K, A, B>(
    first: impl IntoIterator<Item = (&'a J, &'a A)>,
    second: impl IntoIterator<Item = (&'a K, &'a B)>,
) -> impl Iterator<Item = (Option<&'a A>, Option<&'a B>)>
where
    J: std::ops::Deref<Target = str> + 'a,
    K: std::ops::Deref<Target = str> + 'a,
    A: 'a,
    B: 'a,
{
    let mut old = first.into_iter().peekable();
    let mut new = second.into_iter().peekable();
    std::iter::from_fn(move || {
        let order = match (old.peek(), new.peek()) {
            (None, None) => return None,
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some((old_id, _)), Some((new_id, _))) => (***old_id).cmp(&***new_id),
        };
        Some(match order {
            std::cmp::Ordering::Less => (old.next().map(|(_, a)| a), None),
            std::cmp::Ordering::Greater => (None, new.next().map(|(_, b)| b)),
            std::cmp::Ordering::Equal => (old.next().map(|(_, a)| a), new.next().map(|(_, b)| b)),
        })
    })
}

fn keep_unparsed<T: Clone>(
    into: &mut BTreeMap<String, T>,
    previous: &BTreeMap<String, T>,
    kind: Kind,
    keep: &impl Fn(Kind, &str) -> bool,
) {
    for (id, old) in previous {
        if keep(kind, id) && !into.contains_key(id) {
            into.insert(id.clone(), old.clone());
        }
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
    use crate::config::UpstreamConfig;

    #[test]
    fn strip_prefix_forms() {
        let route = |strip: Option<StripPrefix>| Route {
            id: "r".into(),
            config: Arc::new(RouteConfig {
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
                path_normalization: Default::default(),
                status: Default::default(),
                websocket: false,
                grpc_web: false,
                request_trailers: vec![],
            }),
            target: Target::Upstream(Arc::new(
                Upstream::new(
                    serde_json::from_value(
                        serde_json::json!({"id": "u", "nodes": [{"host": "h", "port": 1}]}),
                    )
                    .unwrap(),
                    &ClientPool::default(),
                    &Metrics::new(),
                )
                .unwrap(),
            )),
            chain: vec![],
            built_from: vec![],
            request_body_limit: None,
            response_body_limit: None,
            keeps_request: false,
            binds_instances: false,
            request_trailers: Arc::from([]),
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

    /// A store with no modules: the routes of these tests run no plugins.
    struct NoModules;

    impl ModuleSource for NoModules {
        fn fetch<'a>(&'a self, plugin: &'a PluginConfig) -> BoxFuture<'a, Result<Vec<u8>, String>> {
            Box::pin(async move { Err(format!("no module for {}", plugin.name)) })
        }
    }

    /// One change to the store, as the etcd mirror makes it.
    #[derive(Clone, Debug)]
    enum Change {
        /// Route `id` is written: a path, an upstream (`u3` never exists), enabled or not.
        Put(usize, usize, usize, bool),
        /// Route `id`'s key is deleted.
        Delete(usize),
        /// Route `id`'s key is overwritten with something that does not parse.
        Break(usize),
        /// Upstream `u2` is written or deleted.
        SecondUpstream(bool),
    }

    const PATHS: [&str; 4] = ["/a", "/a/*", "/b/{x}", "/c/*"];
    const REQUESTS: [&str; 6] = ["/a", "/a/x", "/b/y", "/c", "/c/z", "/d"];

    fn change() -> impl proptest::strategy::Strategy<Value = Change> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (0..6usize, 0..PATHS.len(), 0..3usize, proptest::bool::weighted(0.2))
                .prop_map(|(id, path, upstream, disabled)| Change::Put(id, path, upstream, disabled)),
            1 => (0..6usize).prop_map(Change::Delete),
            1 => (0..6usize).prop_map(Change::Break),
            1 => any::<bool>().prop_map(Change::SecondUpstream),
        ]
    }

    fn upstream(id: &str) -> UpstreamConfig {
        serde_json::from_value(serde_json::json!({"id": id, "nodes": [{"host": "h", "port": 1}]}))
            .unwrap()
    }

    /// What a snapshot serves, in a form two builds can be compared by: each route's config
    /// (the object itself) and upstream, the errors, and the route each request finds.
    fn served(snapshot: &Snapshot) -> impl PartialEq + std::fmt::Debug + use<> {
        let routes: Vec<_> = snapshot
            .route_list
            .iter()
            .map(|(id, route)| {
                let upstream = match &route.target {
                    Target::Upstream(upstream) => upstream.config.id.clone(),
                    _ => String::new(),
                };
                (
                    id.to_string(),
                    Arc::as_ptr(&route.config) as usize,
                    upstream,
                )
            })
            .collect();
        let errors: Vec<_> = snapshot
            .errors
            .iter()
            .map(|e| (e.kind, e.id.clone(), e.reason.clone()))
            .collect();
        let found: Vec<_> = REQUESTS
            .iter()
            .map(|path| {
                snapshot
                    .routes
                    .lookup(&Method::GET, None, path)
                    .map(|found| found.route.id.to_string())
            })
            .collect();
        (routes, errors, found)
    }

    /// Building only the routes that changed serves what looking at every route serves, after
    /// any sequence of writes, deletes, broken keys and upstream changes.
    #[test]
    fn fuzz_building_the_changed_routes_agrees_with_building_all() {
        use proptest::test_runner::{Config, TestRunner};
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let metrics = Arc::new(Metrics::new());
        let plugins = PluginRuntime::new(metrics.clone(), None).unwrap();
        let clients = ClientPool::default();
        let context = BuildContext {
            runtime: &plugins,
            clients: &clients,
            metrics: &metrics,
            modules: &NoModules,
        };
        let mut runner = TestRunner::new(Config::with_cases(200));
        let changes = proptest::collection::vec(change(), 1..24);
        runner
            .run(&changes, |changes| {
                runtime.block_on(async {
                    let mut objects = ConfigObjects::default();
                    objects.upstreams.insert("u1".into(), upstream("u1"));
                    let mut broken = BTreeSet::new();
                    let mut previous = Snapshot::empty();
                    for change in changes {
                        match change {
                            Change::Put(id, path, to, disabled) => {
                                let config = serde_json::json!({
                                    "id": format!("r{id}"),
                                    "uri": PATHS[path],
                                    "upstream_id": format!("u{}", to + 1),
                                    "status": if disabled { "disabled" } else { "enabled" },
                                });
                                let config: RouteConfig = serde_json::from_value(config).unwrap();
                                objects.routes.insert(format!("r{id}"), Arc::new(config));
                                broken.remove(&id);
                            }
                            Change::Delete(id) => {
                                objects.routes.remove(&format!("r{id}"));
                                broken.remove(&id);
                            }
                            Change::Break(id) => {
                                objects.routes.remove(&format!("r{id}"));
                                broken.insert(id);
                            }
                            Change::SecondUpstream(true) => {
                                objects.upstreams.insert("u2".into(), upstream("u2"));
                            }
                            Change::SecondUpstream(false) => {
                                objects.upstreams.remove("u2");
                            }
                        }
                        let desired = Desired {
                            objects: Arc::new(objects.clone()),
                            unparsed: broken
                                .iter()
                                .map(|id| {
                                    ObjectError::new(Kind::Route, format!("r{id}"), "not JSON")
                                })
                                .collect(),
                        };
                        let changed = context
                            .build_routes_from(&desired, &previous, Routes::Changed)
                            .await;
                        let all = context
                            .build_routes_from(&desired, &previous, Routes::All)
                            .await;
                        proptest::prop_assert_eq!(served(&changed), served(&all));
                        previous = changed;
                    }
                    Ok(())
                })
            })
            .unwrap();
    }
}
