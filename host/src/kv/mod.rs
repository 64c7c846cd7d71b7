//! The plugin key/value store: namespaced per tenant and plugin, with per-entry TTLs, atomic
//! counters, and every entry counted against its tenant's quotas. A plugin entry may keep its
//! kv on Redis instead ([`RedisStore`]), shared by every gateway.
//!
//! The tenants' quotas are the store's only bound: it never evicts an entry to make room, so
//! one tenant filling its quota cannot push out another's entries (its rate-limit counters,
//! say), and a write is either kept or refused, never accepted and then dropped.

mod redis_store;

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;

use moka::notification::RemovalCause;
use moka::ops::compute::Op;
use moka::sync::Cache;

use crate::plugin::tenant::{QuotaExceeded, Tenant};

type Key = (Arc<str>, String);

#[derive(Clone, Debug)]
struct Value {
    bytes: Arc<[u8]>,
    ttl: Option<Duration>,
    /// An increment keeps the expiry the key already had.
    keep_expiry: bool,
    /// The tenant the entry counts against, and by how many bytes.
    owner: Arc<Tenant>,
    size: u64,
}

struct PerEntryExpiry;

impl moka::Expiry<Key, Value> for PerEntryExpiry {
    fn expire_after_create(&self, _: &Key, value: &Value, _: Instant) -> Option<Duration> {
        value.ttl
    }

    fn expire_after_update(
        &self,
        _: &Key,
        value: &Value,
        _: Instant,
        remaining: Option<Duration>,
    ) -> Option<Duration> {
        if value.keep_expiry {
            remaining
        } else {
            value.ttl
        }
    }
}

/// Why a write or an increment failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KvError {
    /// The key holds bytes that are not a decimal integer.
    #[error("value under {0:?} is not an integer")]
    NotAnInteger(String),
    /// The result does not fit in an i64.
    #[error("increment of {0:?} overflows")]
    Overflow(String),
    /// The tenant is at its kv quota.
    #[error(transparent)]
    Quota(#[from] QuotaExceeded),
    /// Redis refused the increment (the value is not an integer, or it would overflow).
    #[error("{0}")]
    Refused(String),
}

pub use redis_store::RedisStore;

/// The kv's backend could not be reached; the plugin call fails under its `failure` policy.
#[derive(Debug, thiserror::Error)]
#[error("the kv backend is unavailable: {0}")]
pub struct KvUnavailable(pub String);

/// The Redis server that plugin entries with `kv: {backend: redis}` use, replaced when
/// `server.redis_url` changes; running plugins see the change at their next call.
#[derive(Clone, Default)]
pub struct RedisSlot(Arc<ArcSwapOption<RedisStore>>);

impl RedisSlot {
    /// Points the slot at `url` (keeping the open store when nothing changed), or empties it.
    pub fn configure(&self, url: Option<&str>, timeout: Duration) -> Result<(), String> {
        let current = self.0.load();
        match (url, current.as_deref()) {
            (Some(url), Some(store)) if store.is(url, timeout) => Ok(()),
            (Some(url), _) => {
                self.0.store(Some(Arc::new(RedisStore::new(url, timeout)?)));
                Ok(())
            }
            (None, _) => {
                self.0.store(None);
                Ok(())
            }
        }
    }

    /// The store, if `server.redis_url` is set.
    pub fn current(&self) -> Result<Arc<RedisStore>, KvUnavailable> {
        self.0
            .load_full()
            .ok_or_else(|| KvUnavailable("server.redis_url is not set".into()))
    }
}

/// One store shared by all plugins; each plugin sees only its own namespace, and each tenant's
/// entries are bounded by its own quotas alone.
#[derive(Clone)]
pub struct KvStore {
    cache: Cache<Key, Value>,
}

impl Default for KvStore {
    fn default() -> Self {
        Self::new()
    }
}

fn entry_size(key: &str, value: &[u8]) -> u64 {
    (key.len() + value.len()) as u64
}

impl KvStore {
    /// An empty store. It has no capacity of its own to evict by: a shared capacity would let
    /// one tenant's writes evict another's entries, and an eviction would drop a write the
    /// plugin was told was kept. The tenants' `kv_entries` and `kv_bytes` quotas bound it.
    pub fn new() -> Self {
        let cache = Cache::builder()
            .expire_after(PerEntryExpiry)
            .eviction_listener(|_, value: Value, cause| {
                // A replaced value was already charged as a difference when it was replaced.
                if cause != RemovalCause::Replaced {
                    value.owner.release_kv(1, value.size);
                }
            })
            .build();
        KvStore { cache }
    }

    /// The value under `key` in `namespace`.
    pub fn get(&self, namespace: &Arc<str>, key: &str) -> Option<Arc<[u8]>> {
        self.cache
            .get(&(namespace.clone(), key.to_owned()))
            .map(|v| v.bytes)
    }

    /// Stores `value`, replacing any expiry the key had with `ttl`; counted against `owner`.
    pub fn set(
        &self,
        namespace: &Arc<str>,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
        owner: &Arc<Tenant>,
    ) -> Result<(), QuotaExceeded> {
        let size = entry_size(key, value);
        let mut outcome = Ok(());
        self.cache
            .entry((namespace.clone(), key.to_owned()))
            .and_compute_with(|existing| {
                let (entries, old) = existing.map_or((1, 0), |e| (0, e.value().size));
                match owner.charge_kv(entries, size as i64 - old as i64) {
                    Ok(()) => Op::Put(Value {
                        bytes: value.into(),
                        ttl,
                        keep_expiry: false,
                        owner: owner.clone(),
                        size,
                    }),
                    Err(quota) => {
                        outcome = Err(quota);
                        Op::Nop
                    }
                }
            });
        outcome
    }

    /// Stores `value` only if the key's value still has CAS value `expected` (see [`cas_of`]):
    /// `Ok(false)` when it changed or went.
    pub fn set_if(
        &self,
        namespace: &Arc<str>,
        key: &str,
        value: &[u8],
        expected: u32,
        owner: &Arc<Tenant>,
    ) -> Result<bool, QuotaExceeded> {
        let size = entry_size(key, value);
        let mut outcome = Ok(false);
        self.cache
            .entry((namespace.clone(), key.to_owned()))
            .and_compute_with(|existing| {
                let Some(existing) = existing else {
                    return Op::Nop;
                };
                if cas_of(&existing.value().bytes) != expected {
                    return Op::Nop;
                }
                let old = existing.value().size;
                match owner.charge_kv(0, size as i64 - old as i64) {
                    Ok(()) => {
                        outcome = Ok(true);
                        Op::Put(Value {
                            bytes: value.into(),
                            ttl: existing.value().ttl,
                            keep_expiry: true,
                            owner: owner.clone(),
                            size,
                        })
                    }
                    Err(quota) => {
                        outcome = Err(quota);
                        Op::Nop
                    }
                }
            });
        outcome
    }

    /// Removes `key`.
    pub fn delete(&self, namespace: &Arc<str>, key: &str) {
        self.cache.invalidate(&(namespace.clone(), key.to_owned()));
    }

    /// Atomically adds `delta` and returns the new value; a new key starts at 0 with `ttl`.
    pub fn incr(
        &self,
        namespace: &Arc<str>,
        key: &str,
        delta: i64,
        ttl: Option<Duration>,
        owner: &Arc<Tenant>,
    ) -> Result<i64, KvError> {
        let mut outcome = Ok(0);
        self.cache
            .entry((namespace.clone(), key.to_owned()))
            .and_compute_with(|existing| {
                let (current, keep_expiry, old) = match &existing {
                    None => (Ok(0), false, None),
                    Some(entry) => (
                        parse_counter(&entry.value().bytes, key),
                        true,
                        Some(entry.value().size),
                    ),
                };
                outcome = current.and_then(|n: i64| {
                    n.checked_add(delta)
                        .ok_or_else(|| KvError::Overflow(key.into()))
                });
                let Ok(n) = &outcome else { return Op::Nop };
                let bytes = n.to_string().into_bytes();
                let size = entry_size(key, &bytes);
                let charge = owner.charge_kv(
                    u64::from(old.is_none()),
                    size as i64 - old.unwrap_or(0) as i64,
                );
                if let Err(quota) = charge {
                    outcome = Err(KvError::Quota(quota));
                    return Op::Nop;
                }
                Op::Put(Value {
                    bytes: bytes.into(),
                    ttl,
                    keep_expiry,
                    owner: owner.clone(),
                    size,
                })
            });
        outcome
    }

    /// Every live key in `namespace` with its value, sorted by key.
    pub fn entries(&self, namespace: &str) -> Vec<(String, Vec<u8>)> {
        let mut entries: Vec<_> = self
            .cache
            .iter()
            .filter(|(key, _)| &*key.0 == namespace)
            .map(|(key, value)| (key.1.clone(), value.bytes.to_vec()))
            .collect();
        entries.sort();
        entries
    }

    /// Entries in the store (approximate: expired entries leave lazily).
    pub fn entry_count(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.cache.entry_count()
    }
}

fn parse_counter(bytes: &[u8], key: &str) -> Result<i64, KvError> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| KvError::NotAnInteger(key.into()))
}

/// The compare-and-swap value of a stored value (never 0, which means "no CAS"): a hash of
/// the bytes, so that it changes whenever they do.
pub fn cas_of(bytes: &[u8]) -> u32 {
    (xxhash_rust::xxh3::xxh3_64(bytes) as u32).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Quotas, TenantConfig};
    use crate::plugin::tenant::Tenants;

    fn tenant(name: &str, quotas: Quotas) -> Arc<Tenant> {
        let tenants = Tenants::default();
        tenants.update([TenantConfig {
            name: name.into(),
            quotas,
        }]);
        tenants.get(Some(name)).unwrap()
    }

    fn anyone() -> Arc<Tenant> {
        tenant("t", Quotas::default())
    }

    #[test]
    fn namespaces_do_not_see_each_other() {
        let kv = KvStore::new();
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let owner = anyone();
        kv.set(&a, "k", b"one", None, &owner).unwrap();
        assert_eq!(kv.get(&a, "k").as_deref(), Some(&b"one"[..]));
        assert_eq!(kv.get(&b, "k"), None);
        kv.delete(&a, "k");
        assert_eq!(kv.get(&a, "k"), None);
    }

    #[test]
    fn incr_counts_atomically_across_threads() {
        let kv = KvStore::new();
        let ns: Arc<str> = "rate".into();
        let owner = anyone();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..250 {
                        kv.incr(&ns, "hits", 1, None, &owner).unwrap();
                    }
                });
            }
        });
        assert_eq!(kv.incr(&ns, "hits", 0, None, &owner), Ok(1000));
        assert_eq!(kv.get(&ns, "hits").as_deref(), Some(&b"1000"[..]));
        kv.set(&ns, "word", b"x", None, &owner).unwrap();
        assert_eq!(
            kv.incr(&ns, "word", 1, None, &owner),
            Err(KvError::NotAnInteger("word".into()))
        );
        kv.set(&ns, "max", i64::MAX.to_string().as_bytes(), None, &owner)
            .unwrap();
        assert_eq!(
            kv.incr(&ns, "max", 1, None, &owner),
            Err(KvError::Overflow("max".into()))
        );
    }

    #[test]
    fn ttl_expires_and_incr_keeps_the_first_expiry() {
        let kv = KvStore::new();
        let ns: Arc<str> = "t".into();
        let owner = anyone();
        kv.set(&ns, "short", b"v", Some(Duration::from_millis(50)), &owner)
            .unwrap();
        kv.incr(&ns, "window", 1, Some(Duration::from_millis(150)), &owner)
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(kv.get(&ns, "short"), None);
        // A later increment with a long TTL does not extend the window.
        assert_eq!(
            kv.incr(&ns, "window", 1, Some(Duration::from_secs(60)), &owner),
            Ok(2)
        );
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(kv.get(&ns, "window"), None);
    }

    #[test]
    fn a_tenant_at_its_quota_evicts_nothing_of_another() {
        let kv = KvStore::new();
        let (a_ns, b_ns): (Arc<str>, Arc<str>) = ("a/p".into(), "b/p".into());
        let a = tenant("a", Quotas::default());
        let b = tenant("b", Quotas::default());
        kv.incr(&b_ns, "hits", 3, None, &b).unwrap();
        let value = vec![b'v'; 1 << 20];
        let mut kept = 0;
        for i in 0..70 {
            match kv.set(&a_ns, &format!("flood-{i}"), &value, None, &a) {
                Ok(()) => kept += 1,
                Err(quota) => assert_eq!(quota.what, "kv bytes"),
            }
        }
        assert_eq!(kept, 63, "63 values of 1 MiB and their keys fit in 64 MiB");
        kv.cache.run_pending_tasks();
        assert_eq!(kv.incr(&b_ns, "hits", 1, None, &b), Ok(4));
        let held = (0..70)
            .filter(|i| kv.get(&a_ns, &format!("flood-{i}")).is_some())
            .count();
        assert_eq!(held, 63, "every write that was not refused is kept");
        assert_eq!(a.usage().2, 63);
    }

    #[test]
    fn entries_count_against_their_tenant_until_they_go() {
        let kv = KvStore::new();
        let ns: Arc<str> = "q/p".into();
        let small = tenant(
            "q",
            Quotas {
                kv_entries: 2,
                kv_bytes: 20,
                ..Quotas::default()
            },
        );
        kv.set(&ns, "a", b"12345", None, &small).unwrap();
        kv.set(&ns, "b", b"12345", None, &small).unwrap();
        assert_eq!(
            kv.set(&ns, "c", b"1", None, &small).unwrap_err().what,
            "kv entries"
        );
        // Replacing a value charges only the difference.
        kv.set(&ns, "a", b"123456789", None, &small).unwrap();
        assert_eq!(small.usage().3, 16);
        assert_eq!(
            kv.set(&ns, "b", b"1234567890123", None, &small)
                .unwrap_err()
                .what,
            "kv bytes"
        );
        kv.delete(&ns, "a");
        kv.cache.run_pending_tasks();
        assert_eq!(small.usage().2, 1);
        kv.set(&ns, "c", b"1", None, &small).unwrap();
        assert!(matches!(
            kv.incr(&ns, "d", 1, None, &small),
            Err(KvError::Quota(_))
        ));
    }
}
