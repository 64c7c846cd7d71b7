//! Service settings: how a discovered service's nodes are reached, balanced, timed out, retried
//! and checked. An upstream's settings without `nodes`, which come from registrations.

use serde::{Deserialize, Deserializer, Serialize};

use super::upstream::{
    BalancerKind, HashOn, HealthChecks, NodeConfig, RetryBudgetConfig, RetryOn, Scheme, Timeouts,
    UpstreamConfig, UpstreamTls, build_with_upstream_settings, default_retry_methods,
    default_retry_on, is_default_retry_methods, is_default_retry_on, upstream_settings,
    with_upstream_settings,
};
use super::{Checks, ConfigObject, Kind, check_id, checked_serde};

upstream_settings! { with_upstream_settings! {
    /// The settings of the service `name` (`service-settings/<name>` in etcd,
    /// `service_settings:` in the file): every upstream field but `id` and `nodes`.
    #[derive(Clone, Debug, PartialEq, Deserialize, Serialize, schemars::JsonSchema)]
    #[serde(remote = "Self", deny_unknown_fields)]
    pub struct ServiceSettings {
        /// `name: users`: the service, as routes name it in `service` and backends register it.
        pub name: String,
    }
}}

checked_serde!(ServiceSettings);

impl ServiceSettings {
    /// The settings of a service that has none stored: round robin, HTTP/1.1, the default
    /// timeouts and retries, no checks.
    pub fn plain(name: &str) -> Self {
        upstream_settings! { build_with_upstream_settings! {
            ServiceSettings { name: name.to_owned() } from defaults;
        }}
    }

    /// The settings `upstream` was built with (all but its id and nodes).
    pub fn of(upstream: &UpstreamConfig) -> Self {
        upstream_settings! { build_with_upstream_settings! {
            ServiceSettings { name: upstream.id.clone() } from upstream;
        }}
    }

    /// The upstream the service is with these settings and its live `nodes`.
    pub fn upstream(&self, nodes: Vec<NodeConfig>) -> UpstreamConfig {
        upstream_settings! { build_with_upstream_settings! {
            UpstreamConfig { id: self.name.clone(), nodes: nodes } from self;
        }}
    }
}

impl ConfigObject for ServiceSettings {
    const KIND: Kind = Kind::ServiceSettings;

    fn deserialize_unchecked<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        ServiceSettings::deserialize(d)
    }

    fn id(&self) -> &str {
        &self.name
    }

    fn check(&self, checks: &mut Checks) {
        checks.check("/name", check_id(&self.name));
        // The upstream's own checks, on a stand-in node: the fields mean the same thing, so
        // they are checked the same way. Node errors are the registrations' business.
        let stand_in = NodeConfig {
            host: "127.0.0.1".into(),
            port: 1,
            weight: 1,
            status: Default::default(),
        };
        let mut upstream_checks = Checks::default();
        self.upstream(vec![stand_in]).check(&mut upstream_checks);
        for error in upstream_checks.into_errors() {
            if error.path != "/id" && !error.path.starts_with("/nodes") {
                checks.fail(error.path, error.message);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_checked_as_an_upstream_would_be() {
        let refused = serde_json::from_value::<ServiceSettings>(serde_json::json!({
            "name": "users", "type": "chash", "retry_on": ["sometimes"]
        }))
        .unwrap_err()
        .to_string();
        assert!(refused.contains("retry_on"), "{refused}");
        let refused = crate::config::parse::<ServiceSettings>(&serde_json::json!({
            "name": "users", "type": "chash"
        }))
        .unwrap_err();
        assert_eq!(refused[0].path, "/hash_on");
        let refused = crate::config::parse::<ServiceSettings>(&serde_json::json!({
            "name": "users", "nodes": []
        }))
        .unwrap_err();
        assert!(refused[0].message.contains("nodes"), "{refused:?}");
    }

    #[test]
    fn plain_settings_are_what_serde_fills_in() {
        let parsed: ServiceSettings =
            serde_json::from_value(serde_json::json!({"name": "users"})).unwrap();
        assert_eq!(ServiceSettings::plain("users"), parsed);
    }

    #[test]
    fn a_service_becomes_an_upstream_with_its_settings() {
        let settings: ServiceSettings = serde_json::from_value(serde_json::json!({
            "name": "users", "type": "least_conn", "retries": 1, "max_connections": 8,
            "checks": {"passive": {"eject_ms": 5000}}
        }))
        .unwrap();
        let node = NodeConfig {
            host: "10.0.0.7".into(),
            port: 80,
            weight: 1,
            status: Default::default(),
        };
        let upstream = settings.upstream(vec![node]);
        assert_eq!(upstream.id, "users");
        assert_eq!(upstream.balancer, BalancerKind::LeastConn);
        assert_eq!(upstream.max_connections, Some(8));
        assert_eq!(ServiceSettings::of(&upstream), settings);
        assert_eq!(upstream.checks.passive.unwrap().eject_ms, 5000);
        assert_eq!(
            ServiceSettings::plain("users").upstream(vec![]).retry_on,
            default_retry_on()
        );
    }
}
