//! Service nodes: backends that registered themselves under `services/<name>/<node-id>`.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

use super::upstream::{NodeConfig, NodeStatus, check_weight};
use super::{Checks, ConfigObject, Kind, check_host, checked_serde, one};

/// A backend that registered itself under `services/<name>/<node-id>`, usually with a lease.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct ServiceNode {
    /// `host: 10.0.0.7`
    pub host: String,
    /// `port: 8080`
    pub port: u16,
    /// `weight: 1`: its share of the service's traffic.
    #[serde(default = "one")]
    pub weight: u32,
    /// `status: offline` takes it out of rotation without deregistering it.
    #[serde(default, skip_serializing_if = "is_online")]
    pub status: NodeStatus,
    /// `meta: {zone: a}`: free-form data, shown by the admin API.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub meta: BTreeMap<String, serde_json::Value>,
}

checked_serde!(ServiceNode);

impl ServiceNode {
    /// The node of its service's upstream (the `meta` stays with the registration).
    pub fn upstream_node(&self) -> NodeConfig {
        NodeConfig {
            host: self.host.clone(),
            port: self.port,
            weight: self.weight,
            status: self.status,
        }
    }
}

fn is_online(status: &NodeStatus) -> bool {
    *status == NodeStatus::Online
}

impl ConfigObject for ServiceNode {
    const KIND: Kind = Kind::ServiceNode;

    fn deserialize_unchecked<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        ServiceNode::deserialize(d)
    }

    fn id(&self) -> &str {
        &self.host
    }

    fn check(&self, checks: &mut Checks) {
        checks.check("/host", check_host(&self.host));
        if self.port == 0 {
            checks.fail("/port", "port 0 is not a port");
        }
        checks.check("/weight", check_weight(self.weight));
    }
}
