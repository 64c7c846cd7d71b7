//! Tenants: parties whose plugins share quotas, and whose kv namespaces no other tenant sees.

use serde::{Deserialize, Deserializer, Serialize};

use super::{Checks, ConfigObject, Kind, check_id, checked_serde};

/// A tenant: a party whose plugins share quotas, and whose kv namespaces no other tenant sees.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct TenantConfig {
    /// `name: team-a`
    pub name: String,
    /// `quotas: {memory_mb: 256, instances: 64, kv_entries: 10000, kv_bytes: 10485760}`
    #[serde(default)]
    pub quotas: Quotas,
}

/// Limits on everything one tenant's plugins hold at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Quotas {
    /// `memory_mb: 256`: the linear memory of all its live instances together.
    #[serde(default = "default_quota_memory_mb")]
    pub memory_mb: u64,
    /// `instances: 64`: its live instances.
    #[serde(default = "default_quota_instances")]
    pub instances: u64,
    /// `kv_entries: 10000`: keys in its kv namespaces.
    #[serde(default = "default_quota_kv_entries")]
    pub kv_entries: u64,
    /// `kv_bytes: 10485760`: bytes of keys and values in its kv namespaces.
    #[serde(default = "default_quota_kv_bytes")]
    pub kv_bytes: u64,
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas {
            memory_mb: default_quota_memory_mb(),
            instances: default_quota_instances(),
            kv_entries: default_quota_kv_entries(),
            kv_bytes: default_quota_kv_bytes(),
        }
    }
}

fn default_quota_memory_mb() -> u64 {
    1024
}

fn default_quota_instances() -> u64 {
    256
}

fn default_quota_kv_entries() -> u64 {
    100_000
}

fn default_quota_kv_bytes() -> u64 {
    64 << 20
}

checked_serde!(TenantConfig);

impl ConfigObject for TenantConfig {
    const KIND: Kind = Kind::Tenant;

    fn deserialize_unchecked<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        TenantConfig::deserialize(d)
    }

    fn id(&self) -> &str {
        &self.name
    }

    fn check(&self, checks: &mut Checks) {
        checks.check("/name", check_id(&self.name));
        let q = self.quotas;
        for (name, value) in [
            ("memory_mb", q.memory_mb),
            ("instances", q.instances),
            ("kv_entries", q.kv_entries),
            ("kv_bytes", q.kv_bytes),
        ] {
            if value == 0 {
                checks.fail(format!("/quotas/{name}"), "every quota must be at least 1");
            }
        }
    }
}
