//! One table, [`KINDS`], of what the stores and the admin API know about each [`Kind`] of
//! config object: its YAML section, its etcd key, its `/v1` path, what names it, its schema,
//! what it refers to, and which field of [`ConfigObjects`] holds it. Everything outside config/
//! that treats kinds alike reads the table, so that a new kind is a variant of [`Kind`], a row
//! here, a field of [`ConfigObjects`], and its type.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;

use super::{
    AdminConfig, ConfigObject, ConfigObjects, ConsumerConfig, FieldError, Kind, PluginConfig,
    RouteConfig, ServerConfig, ServiceNode, ServiceSettings, SslConfig, TenantConfig,
    UpstreamConfig, parse,
};

/// What the stores and the admin API know about one kind.
pub struct KindInfo {
    /// The kind.
    pub kind: Kind,
    /// What messages call one of its objects: `service settings`.
    pub noun: &'static str,
    /// Its top-level key in the YAML file: `service_settings`.
    pub section: Option<&'static str>,
    /// Its segment of etcd keys, under the prefix: `service-settings`.
    pub key: Option<&'static str>,
    /// Its segment of admin API paths, after `/v1/`: `service-settings`.
    pub path: Option<&'static str>,
    /// How its objects are named.
    pub layout: Layout,
    /// Its JSON Schema, as `GET /v1/schema/<path>` serves it.
    pub schema: Option<fn() -> schemars::Schema>,
    /// Parses and checks one of its objects, keeping nothing.
    pub check: Option<Check>,
    /// The other objects that one of its objects names.
    pub references: &'static [Reference],
    /// The field of [`ConfigObjects`] that holds its parsed objects.
    held: Option<Held>,
}

/// Parses and checks an object of one kind, keeping nothing.
pub type Check = fn(&Value) -> Result<(), Vec<FieldError>>;

/// How the objects of a kind are named.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Any number of objects, each named by this field (`id` or `name`), whose value also ends
    /// its etcd key and its admin API path.
    Keyed(&'static str),
    /// At most one object, named after its section.
    Single,
    /// Service nodes: `<service>/<node>`, named by their key rather than by a field.
    Nested,
    /// Not a config object.
    Unlisted,
}

/// A place where an object names another one.
pub struct Reference {
    /// A JSON pointer into the object; a `*` segment stands for each index of an array.
    pub at: &'static str,
    /// The kind of what it names.
    pub to: Kind,
}

/// The field of [`ConfigObjects`] that holds a kind's objects, seen through [`Slot`].
#[derive(Clone, Copy)]
struct Held {
    read: fn(&ConfigObjects) -> &dyn Slot,
    write: fn(&mut ConfigObjects) -> &mut dyn Slot,
}

/// `held!(routes)`: the kind's objects are `ConfigObjects::routes`.
macro_rules! held {
    ($field:ident) => {
        Some(Held {
            read: |objects| &objects.$field,
            write: |objects| &mut objects.$field,
        })
    };
}

/// The schema of `T`, for [`KindInfo::schema`].
fn schema<T: schemars::JsonSchema>() -> schemars::Schema {
    schemars::schema_for!(T)
}

/// Parses `json` as a `T` and drops it, for [`KindInfo::check`].
fn check<T: ConfigObject>(json: &Value) -> Result<(), Vec<FieldError>> {
    parse::<T>(json).map(drop)
}

/// Every kind, in the order the YAML file's sections are listed in messages.
pub const KINDS: &[KindInfo] = &[
    KindInfo {
        kind: Kind::Route,
        noun: "route",
        section: Some("routes"),
        key: Some("routes"),
        path: Some("routes"),
        layout: Layout::Keyed("id"),
        schema: Some(schema::<RouteConfig>),
        check: Some(check::<RouteConfig>),
        references: &[
            Reference {
                at: "/upstream_id",
                to: Kind::Upstream,
            },
            Reference {
                at: "/plugins/*/name",
                to: Kind::Plugin,
            },
        ],
        held: held!(routes),
    },
    KindInfo {
        kind: Kind::Upstream,
        noun: "upstream",
        section: Some("upstreams"),
        key: Some("upstreams"),
        path: Some("upstreams"),
        layout: Layout::Keyed("id"),
        schema: Some(schema::<UpstreamConfig>),
        check: Some(check::<UpstreamConfig>),
        references: &[],
        held: held!(upstreams),
    },
    KindInfo {
        kind: Kind::Plugin,
        noun: "plugin",
        section: Some("plugins"),
        key: Some("plugins"),
        path: Some("plugins"),
        layout: Layout::Keyed("name"),
        schema: Some(schema::<PluginConfig>),
        check: Some(check::<PluginConfig>),
        references: &[
            Reference {
                at: "/tenant",
                to: Kind::Tenant,
            },
            Reference {
                at: "/sha256",
                to: Kind::Module,
            },
        ],
        held: held!(plugins),
    },
    KindInfo {
        kind: Kind::Tenant,
        noun: "tenant",
        section: Some("tenants"),
        key: Some("tenants"),
        path: Some("tenants"),
        layout: Layout::Keyed("name"),
        schema: Some(schema::<TenantConfig>),
        check: Some(check::<TenantConfig>),
        references: &[],
        held: held!(tenants),
    },
    KindInfo {
        kind: Kind::Consumer,
        noun: "consumer",
        section: Some("consumers"),
        key: Some("consumers"),
        path: Some("consumers"),
        layout: Layout::Keyed("name"),
        schema: Some(schema::<ConsumerConfig>),
        check: Some(check::<ConsumerConfig>),
        references: &[],
        held: held!(consumers),
    },
    KindInfo {
        kind: Kind::ServiceSettings,
        noun: "service settings",
        section: Some("service_settings"),
        key: Some("service-settings"),
        path: Some("service-settings"),
        layout: Layout::Keyed("name"),
        schema: Some(schema::<ServiceSettings>),
        check: Some(check::<ServiceSettings>),
        references: &[],
        held: held!(service_settings),
    },
    KindInfo {
        kind: Kind::Ssl,
        noun: "ssl",
        section: Some("ssl"),
        key: Some("ssl"),
        path: Some("ssl"),
        layout: Layout::Keyed("id"),
        schema: Some(schema::<SslConfig>),
        check: Some(check::<SslConfig>),
        references: &[],
        held: held!(ssl),
    },
    KindInfo {
        kind: Kind::Server,
        noun: "server",
        section: Some("server"),
        key: Some("server"),
        path: Some("server"),
        layout: Layout::Single,
        schema: Some(schema::<ServerConfig>),
        check: Some(check::<ServerConfig>),
        references: &[],
        held: held!(server),
    },
    // Not served by the admin API: who may use it is not the API's to change.
    KindInfo {
        kind: Kind::Admin,
        noun: "admin",
        section: Some("admin"),
        key: Some("admin"),
        path: None,
        layout: Layout::Single,
        schema: None,
        check: Some(check::<AdminConfig>),
        references: &[],
        held: held!(admin),
    },
    // Registered by the backends themselves, in etcd only.
    KindInfo {
        kind: Kind::ServiceNode,
        noun: "service node",
        section: None,
        key: Some("services"),
        path: Some("services"),
        layout: Layout::Nested,
        schema: Some(schema::<ServiceNode>),
        check: Some(check::<ServiceNode>),
        references: &[],
        held: held!(services),
    },
    // Modules have keys and endpoints of their own (`modules/<sha256>/<chunk>`, `/v1/modules`);
    // they are named here so that plugin entries can refer to them.
    KindInfo {
        kind: Kind::Module,
        noun: "module",
        section: None,
        key: Some("modules"),
        path: None,
        layout: Layout::Unlisted,
        schema: None,
        check: None,
        references: &[],
        held: None,
    },
    KindInfo {
        kind: Kind::Key,
        noun: "key",
        section: None,
        key: None,
        path: None,
        layout: Layout::Unlisted,
        schema: None,
        check: None,
        references: &[],
        held: None,
    },
];

impl Kind {
    /// Its row of [`KINDS`].
    pub fn info(self) -> &'static KindInfo {
        KINDS
            .iter()
            .find(|info| info.kind == self)
            .expect("every kind has a row in KINDS")
    }

    /// The kind whose etcd keys start with `key`.
    pub fn under_key(key: &str) -> Option<Kind> {
        KINDS
            .iter()
            .find(|info| info.key == Some(key))
            .map(|info| info.kind)
    }

    /// The kind whose YAML section is `section`.
    pub fn in_section(section: &str) -> Option<Kind> {
        KINDS
            .iter()
            .find(|info| info.section == Some(section))
            .map(|info| info.kind)
    }

    /// The kind the admin API serves at `/v1/<path>`.
    pub fn at_path(path: &str) -> Option<Kind> {
        KINDS
            .iter()
            .find(|info| info.path == Some(path))
            .map(|info| info.kind)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.info().noun)
    }
}

impl KindInfo {
    /// The field that names its objects, for a kind with many.
    pub fn id_field(&self) -> Option<&'static str> {
        match self.layout {
            Layout::Keyed(field) => Some(field),
            _ => None,
        }
    }

    /// What `value`, one of its objects, names: a JSON pointer, a kind and an id for each
    /// string at one of its [`references`](KindInfo::references), in the table's order.
    pub fn references_in(&self, value: &Value) -> Vec<(String, Kind, String)> {
        let mut found = Vec::new();
        for reference in self.references {
            let segments: Vec<&str> = reference.at.split('/').skip(1).collect();
            named_at(value, &segments, String::new(), reference.to, &mut found);
        }
        found
    }
}

/// Adds each string that `segments` leads to from `value` (whose pointer is `at`) to `found`.
fn named_at(
    value: &Value,
    segments: &[&str],
    at: String,
    to: Kind,
    found: &mut Vec<(String, Kind, String)>,
) {
    let Some((first, rest)) = segments.split_first() else {
        if let Value::String(id) = value {
            found.push((at, to, id.clone()));
        }
        return;
    };
    match (*first, value) {
        ("*", Value::Array(items)) => {
            for (index, item) in items.iter().enumerate() {
                named_at(item, rest, format!("{at}/{index}"), to, found);
            }
        }
        (field, Value::Object(object)) => {
            if let Some(inner) = object.get(field) {
                named_at(inner, rest, format!("{at}/{field}"), to, found);
            }
        }
        _ => {}
    }
}

/// Why [`Slot::insert`] left an object out.
#[derive(Debug, PartialEq)]
pub enum Refused {
    /// It does not parse, or its checks fail.
    Invalid(Vec<FieldError>),
    /// It is valid, but an object with its id (this one) is there already.
    Taken(String),
}

/// A field of [`ConfigObjects`] holding the objects of one kind, whatever its shape: a map by
/// id, a shared map (routes), one optional object, or nodes by service.
pub trait Slot {
    /// Parses `json` and puts the object in, unless one with its id is there already. `id`
    /// names it where its JSON does not: a service node's `<service>/<node>`.
    fn insert(&mut self, id: &str, json: &Value) -> Result<(), Refused>;

    /// Takes out the object named `id`, if there is one.
    fn remove(&mut self, id: &str);

    /// Takes out every object.
    fn clear(&mut self);

    /// Each object with its id, as JSON.
    fn list(&self) -> Vec<(String, Value)>;
}

impl ConfigObjects {
    /// The objects of `kind`, unless it is not a kind of object.
    pub fn slot(&self, kind: Kind) -> Option<&dyn Slot> {
        kind.info().held.map(|held| (held.read)(self))
    }

    /// The objects of `kind`, to change, unless it is not a kind of object.
    pub fn slot_mut(&mut self, kind: Kind) -> Option<&mut dyn Slot> {
        kind.info().held.map(|held| (held.write)(self))
    }
}

fn to_json(object: &impl Serialize) -> Value {
    serde_json::to_value(object).expect("config objects serialize")
}

impl<T: ConfigObject> Slot for BTreeMap<String, T> {
    fn insert(&mut self, _: &str, json: &Value) -> Result<(), Refused> {
        let object = parse::<T>(json).map_err(Refused::Invalid)?;
        match self.entry(object.id().to_owned()) {
            std::collections::btree_map::Entry::Vacant(slot) => {
                slot.insert(object);
                Ok(())
            }
            std::collections::btree_map::Entry::Occupied(taken) => {
                Err(Refused::Taken(taken.key().clone()))
            }
        }
    }

    fn remove(&mut self, id: &str) {
        BTreeMap::remove(self, id);
    }

    fn clear(&mut self) {
        BTreeMap::clear(self);
    }

    fn list(&self) -> Vec<(String, Value)> {
        self.iter()
            .map(|(id, o)| (id.clone(), to_json(o)))
            .collect()
    }
}

// Routes are shared, so that a store can publish 100,000 of them after each change without
// copying them.
impl<T: ConfigObject + Clone> Slot for imbl::OrdMap<String, Arc<T>> {
    fn insert(&mut self, _: &str, json: &Value) -> Result<(), Refused> {
        let object = parse::<T>(json).map_err(Refused::Invalid)?;
        if self.contains_key(object.id()) {
            return Err(Refused::Taken(object.id().to_owned()));
        }
        imbl::OrdMap::insert(self, object.id().to_owned(), Arc::new(object));
        Ok(())
    }

    fn remove(&mut self, id: &str) {
        imbl::OrdMap::remove(self, id);
    }

    fn clear(&mut self) {
        imbl::OrdMap::clear(self);
    }

    fn list(&self) -> Vec<(String, Value)> {
        self.iter()
            .map(|(id, o)| (id.clone(), to_json(&**o)))
            .collect()
    }
}

impl<T: ConfigObject> Slot for Option<T> {
    fn insert(&mut self, _: &str, json: &Value) -> Result<(), Refused> {
        let object = parse::<T>(json).map_err(Refused::Invalid)?;
        if self.is_some() {
            return Err(Refused::Taken(object.id().to_owned()));
        }
        *self = Some(object);
        Ok(())
    }

    fn remove(&mut self, _: &str) {
        *self = None;
    }

    fn clear(&mut self) {
        *self = None;
    }

    fn list(&self) -> Vec<(String, Value)> {
        self.iter()
            .map(|o| (o.id().to_owned(), to_json(o)))
            .collect()
    }
}

impl Slot for BTreeMap<String, BTreeMap<String, ServiceNode>> {
    fn insert(&mut self, id: &str, json: &Value) -> Result<(), Refused> {
        let Some((service, node)) = id.split_once('/') else {
            return Err(Refused::Invalid(vec![FieldError {
                path: String::new(),
                message: "expected services/<name>/<node-id>".into(),
            }]));
        };
        let value = parse::<ServiceNode>(json).map_err(Refused::Invalid)?;
        let nodes = self.entry(service.to_owned()).or_default();
        if nodes.contains_key(node) {
            return Err(Refused::Taken(id.to_owned()));
        }
        nodes.insert(node.to_owned(), value);
        Ok(())
    }

    fn remove(&mut self, id: &str) {
        let Some((service, node)) = id.split_once('/') else {
            return;
        };
        if let Some(nodes) = self.get_mut(service) {
            nodes.remove(node);
            if nodes.is_empty() {
                BTreeMap::remove(self, service);
            }
        }
    }

    fn clear(&mut self) {
        BTreeMap::clear(self);
    }

    fn list(&self) -> Vec<(String, Value)> {
        self.iter()
            .flat_map(|(service, nodes)| {
                nodes
                    .iter()
                    .map(move |(node, o)| (format!("{service}/{node}"), to_json(o)))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_kind_has_one_consistent_row() {
        let kinds = [
            Kind::Route,
            Kind::Upstream,
            Kind::Plugin,
            Kind::Tenant,
            Kind::Server,
            Kind::ServiceNode,
            Kind::ServiceSettings,
            Kind::Admin,
            Kind::Ssl,
            Kind::Consumer,
            Kind::Module,
            Kind::Key,
        ];
        assert_eq!(KINDS.len(), kinds.len(), "one row per kind");
        for kind in kinds {
            let info = kind.info();
            assert_eq!(info.kind, kind);
            assert_eq!(KINDS.iter().filter(|i| i.kind == kind).count(), 1, "{kind}");
            if let Some(section) = info.section {
                assert_eq!(Kind::in_section(section), Some(kind), "{kind}");
            }
            if let Some(key) = info.key {
                assert_eq!(Kind::under_key(key), Some(kind), "{kind}");
                assert!(!key.is_empty() && !key.contains('/'), "{kind}");
            }
            if let Some(path) = info.path {
                assert_eq!(Kind::at_path(path), Some(kind), "{kind}");
            }
            if let Some(schema) = info.schema {
                assert!(schema().as_object().is_some(), "{kind}");
            }
            // What stores hold is what can be checked, and the other way round.
            assert_eq!(info.held.is_some(), info.check.is_some(), "{kind}");
            let listed = info.layout != Layout::Unlisted;
            assert_eq!(listed, info.check.is_some(), "{kind}");
            // Served by the API means a schema to write it by, and the other way round.
            assert_eq!(info.path.is_some(), info.schema.is_some(), "{kind}");
            if let Layout::Keyed(field) = info.layout {
                assert!(info.section.is_some() && info.path.is_some(), "{kind}");
                assert!(matches!(field, "id" | "name"), "{kind}");
            }
            for reference in info.references {
                assert!(reference.at.starts_with('/'), "{kind}");
                let to = reference.to.info();
                assert!(to.key.is_some(), "{kind} refers to {} by key", to.kind);
            }
            if listed {
                let mut objects = ConfigObjects::default();
                assert!(objects.slot(kind).unwrap().list().is_empty());
                let slot = objects.slot_mut(kind).unwrap();
                assert!(matches!(
                    slot.insert("s/n", &json!(1)),
                    Err(Refused::Invalid(_))
                ));
            }
        }
    }

    #[test]
    fn a_kind_is_named_alike_everywhere_but_in_spelling() {
        let settings = Kind::ServiceSettings.info();
        assert_eq!(settings.section, Some("service_settings"));
        assert_eq!(settings.key, Some("service-settings"));
        assert_eq!(settings.path, Some("service-settings"));
        assert_eq!(Kind::ServiceSettings.to_string(), "service settings");
        assert_eq!(Kind::under_key(""), None);
        assert_eq!(Kind::at_path("modules"), None);
    }

    #[test]
    fn references_are_found_at_their_pointers() {
        let route = json!({"id": "r", "upstream_id": "u",
            "plugins": [{"name": "a"}, {"config": {}}, {"name": "b"}]});
        assert_eq!(
            Kind::Route.info().references_in(&route),
            [
                ("/upstream_id".to_owned(), Kind::Upstream, "u".to_owned()),
                ("/plugins/0/name".to_owned(), Kind::Plugin, "a".to_owned()),
                ("/plugins/2/name".to_owned(), Kind::Plugin, "b".to_owned()),
            ]
        );
        let plugin = json!({"name": "p", "tenant": "t", "sha256": null});
        assert_eq!(
            Kind::Plugin.info().references_in(&plugin),
            [("/tenant".to_owned(), Kind::Tenant, "t".to_owned())]
        );
        assert!(Kind::Upstream.info().references_in(&route).is_empty());
    }

    #[test]
    fn slots_keep_the_first_object_of_an_id_and_give_it_back() {
        let mut objects = ConfigObjects::default();
        let upstream = json!({"id": "u", "nodes": [{"host": "h", "port": 1}]});
        let slot = objects.slot_mut(Kind::Upstream).unwrap();
        slot.insert("", &upstream).unwrap();
        assert_eq!(
            slot.insert("", &upstream),
            Err(Refused::Taken("u".to_owned()))
        );
        let node = json!({"host": "10.0.0.1", "port": 80});
        let nodes = objects.slot_mut(Kind::ServiceNode).unwrap();
        nodes.insert("users/n1", &node).unwrap();
        assert_eq!(nodes.list()[0].0, "users/n1");
        nodes.remove("users/n1");
        assert!(objects.services.is_empty(), "an empty service goes too");
        let route = json!({"id": "r", "uri": "/", "upstream_id": "u"});
        objects
            .slot_mut(Kind::Route)
            .unwrap()
            .insert("", &route)
            .unwrap();
        objects
            .slot_mut(Kind::Server)
            .unwrap()
            .insert("", &json!({}))
            .unwrap();
        assert_eq!(objects.slot(Kind::Server).unwrap().list()[0].0, "server");
        assert_eq!(objects.routes["r"].uri.as_deref(), Some("/"));
        assert_eq!(objects.slot(Kind::Upstream).unwrap().list()[0].1["id"], "u");
    }
}
