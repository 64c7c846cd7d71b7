//! Tenants: the quotas that all of one tenant's plugins count against together.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::config::{Quotas, TenantConfig};

/// The tenant of plugins whose entry names none.
pub const DEFAULT_TENANT: &str = "default";

/// One tenant's quotas and what its plugins hold right now.
#[derive(Debug)]
pub struct Tenant {
    name: Arc<str>,
    memory_limit: AtomicU64,
    instances_limit: AtomicU64,
    kv_entries_limit: AtomicU64,
    kv_bytes_limit: AtomicU64,
    memory: AtomicU64,
    instances: AtomicU64,
    kv_entries: AtomicU64,
    kv_bytes: AtomicU64,
}

/// Which quota a request went over.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("tenant {tenant} is at its {what} quota of {limit}")]
pub struct QuotaExceeded {
    /// The tenant.
    pub tenant: String,
    /// `memory bytes`, `instances`, `kv entries` or `kv bytes`.
    pub what: &'static str,
    /// The quota.
    pub limit: u64,
}

/// Adds `amount` to `used` unless that passes `limit`.
fn take(used: &AtomicU64, amount: u64, limit: u64) -> bool {
    used.fetch_update(Ordering::AcqRel, Ordering::Acquire, |now| {
        now.checked_add(amount).filter(|next| *next <= limit)
    })
    .is_ok()
}

fn give_back(used: &AtomicU64, amount: u64) {
    let _ = used.fetch_update(Ordering::AcqRel, Ordering::Acquire, |now| {
        Some(now.saturating_sub(amount))
    });
}

impl Tenant {
    fn new(name: &str, quotas: Quotas) -> Self {
        let tenant = Tenant {
            name: name.into(),
            memory_limit: AtomicU64::new(0),
            instances_limit: AtomicU64::new(0),
            kv_entries_limit: AtomicU64::new(0),
            kv_bytes_limit: AtomicU64::new(0),
            memory: AtomicU64::new(0),
            instances: AtomicU64::new(0),
            kv_entries: AtomicU64::new(0),
            kv_bytes: AtomicU64::new(0),
        };
        tenant.set_quotas(quotas);
        tenant
    }

    fn set_quotas(&self, quotas: Quotas) {
        self.memory_limit
            .store(quotas.memory_mb.saturating_mul(1 << 20), Ordering::Release);
        self.instances_limit
            .store(quotas.instances, Ordering::Release);
        self.kv_entries_limit
            .store(quotas.kv_entries, Ordering::Release);
        self.kv_bytes_limit
            .store(quotas.kv_bytes, Ordering::Release);
    }

    /// The tenant's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn exceeded(&self, what: &'static str, limit: &AtomicU64) -> QuotaExceeded {
        QuotaExceeded {
            tenant: self.name.to_string(),
            what,
            limit: limit.load(Ordering::Acquire),
        }
    }

    /// Counts a new live instance.
    pub fn add_instance(&self) -> Result<(), QuotaExceeded> {
        if take(
            &self.instances,
            1,
            self.instances_limit.load(Ordering::Acquire),
        ) {
            Ok(())
        } else {
            Err(self.exceeded("instances", &self.instances_limit))
        }
    }

    /// Uncounts an instance that went away.
    pub fn remove_instance(&self) {
        give_back(&self.instances, 1);
    }

    /// Counts `bytes` more linear memory.
    pub fn grow_memory(&self, bytes: u64) -> Result<(), QuotaExceeded> {
        if take(
            &self.memory,
            bytes,
            self.memory_limit.load(Ordering::Acquire),
        ) {
            Ok(())
        } else {
            Err(self.exceeded("memory bytes", &self.memory_limit))
        }
    }

    /// Uncounts memory that was freed.
    pub fn release_memory(&self, bytes: u64) {
        give_back(&self.memory, bytes);
    }

    /// Counts a kv change: `entries` new keys and a change of `bytes` in keys and values.
    pub fn charge_kv(&self, entries: u64, bytes: i64) -> Result<(), QuotaExceeded> {
        if entries > 0
            && !take(
                &self.kv_entries,
                entries,
                self.kv_entries_limit.load(Ordering::Acquire),
            )
        {
            return Err(self.exceeded("kv entries", &self.kv_entries_limit));
        }
        if bytes > 0
            && !take(
                &self.kv_bytes,
                bytes as u64,
                self.kv_bytes_limit.load(Ordering::Acquire),
            )
        {
            give_back(&self.kv_entries, entries);
            return Err(self.exceeded("kv bytes", &self.kv_bytes_limit));
        }
        if bytes < 0 {
            give_back(&self.kv_bytes, bytes.unsigned_abs());
        }
        Ok(())
    }

    /// Uncounts kv keys that went away.
    pub fn release_kv(&self, entries: u64, bytes: u64) {
        give_back(&self.kv_entries, entries);
        give_back(&self.kv_bytes, bytes);
    }

    /// What the tenant holds now: (memory bytes, instances, kv entries, kv bytes).
    pub fn usage(&self) -> (u64, u64, u64, u64) {
        (
            self.memory.load(Ordering::Acquire),
            self.instances.load(Ordering::Acquire),
            self.kv_entries.load(Ordering::Acquire),
            self.kv_bytes.load(Ordering::Acquire),
        )
    }
}

/// Every tenant, by name; usage survives config changes, quotas follow them.
#[derive(Debug, Default)]
pub struct Tenants {
    tenants: Mutex<HashMap<String, Arc<Tenant>>>,
}

impl Tenants {
    /// The tenant called `name` (the default tenant for `None`), if it is configured.
    pub fn get(&self, name: Option<&str>) -> Option<Arc<Tenant>> {
        let name = name.unwrap_or(DEFAULT_TENANT);
        let mut tenants = self.tenants.lock().expect("tenant registry lock");
        if name == DEFAULT_TENANT {
            let default = tenants
                .entry(DEFAULT_TENANT.to_owned())
                .or_insert_with(|| Arc::new(Tenant::new(DEFAULT_TENANT, Quotas::default())));
            return Some(default.clone());
        }
        tenants.get(name).cloned()
    }

    /// Makes the configured tenants current; removed tenants are forgotten once unused.
    pub fn update(&self, configs: impl IntoIterator<Item = TenantConfig>) {
        let mut tenants = self.tenants.lock().expect("tenant registry lock");
        let mut seen = vec![DEFAULT_TENANT.to_owned()];
        for config in configs {
            match tenants.get(&config.name) {
                Some(tenant) => tenant.set_quotas(config.quotas),
                None => {
                    let tenant = Arc::new(Tenant::new(&config.name, config.quotas));
                    tenants.insert(config.name.clone(), tenant);
                }
            }
            seen.push(config.name);
        }
        tenants.retain(|name, tenant| seen.contains(name) || Arc::strong_count(tenant) > 1);
    }

    /// Every tenant and what it holds.
    pub fn all(&self) -> Vec<Arc<Tenant>> {
        self.tenants
            .lock()
            .expect("tenant registry lock")
            .values()
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(quotas: Quotas) -> Tenant {
        Tenant::new("t", quotas)
    }

    #[test]
    fn instance_and_memory_quotas_hold() {
        let t = tenant(Quotas {
            instances: 2,
            memory_mb: 1,
            ..Quotas::default()
        });
        t.add_instance().unwrap();
        t.add_instance().unwrap();
        assert_eq!(t.add_instance().unwrap_err().what, "instances");
        t.remove_instance();
        t.add_instance().unwrap();
        t.grow_memory(1 << 19).unwrap();
        t.grow_memory(1 << 19).unwrap();
        assert!(t.grow_memory(1).is_err());
        t.release_memory(1 << 20);
        assert_eq!(t.usage().0, 0);
    }

    #[test]
    fn kv_quotas_count_entries_and_bytes() {
        let t = tenant(Quotas {
            kv_entries: 2,
            kv_bytes: 100,
            ..Quotas::default()
        });
        t.charge_kv(1, 60).unwrap();
        assert_eq!(t.charge_kv(1, 60).unwrap_err().what, "kv bytes");
        assert_eq!(t.usage().2, 1, "a refused charge takes nothing");
        t.charge_kv(1, 30).unwrap();
        assert_eq!(t.charge_kv(1, 1).unwrap_err().what, "kv entries");
        t.charge_kv(0, -50).unwrap();
        t.release_kv(2, 40);
        assert_eq!(t.usage(), (0, 0, 0, 0));
    }

    #[test]
    fn the_registry_knows_configured_tenants_and_the_default() {
        let tenants = Tenants::default();
        assert!(tenants.get(Some("a")).is_none());
        assert_eq!(tenants.get(None).unwrap().name(), DEFAULT_TENANT);
        tenants.update([TenantConfig {
            name: "a".into(),
            quotas: Quotas {
                instances: 1,
                ..Quotas::default()
            },
        }]);
        let a = tenants.get(Some("a")).unwrap();
        a.add_instance().unwrap();
        tenants.update([TenantConfig {
            name: "a".into(),
            quotas: Quotas {
                instances: 3,
                ..Quotas::default()
            },
        }]);
        a.add_instance().unwrap();
    }
}
