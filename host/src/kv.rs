//! The plugin key/value store: namespaced per plugin, with per-entry TTLs and atomic counters.

use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::ops::compute::Op;
use moka::sync::Cache;

type Key = (Arc<str>, String);

#[derive(Clone, Debug)]
struct Value {
    bytes: Arc<[u8]>,
    ttl: Option<Duration>,
    /// An increment keeps the expiry the key already had.
    keep_expiry: bool,
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

/// Why an increment failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KvError {
    /// The key holds bytes that are not a decimal integer.
    #[error("value under {0:?} is not an integer")]
    NotAnInteger(String),
    /// The result does not fit in an i64.
    #[error("increment of {0:?} overflows")]
    Overflow(String),
}

/// One store shared by all plugins; each plugin sees only its own namespace.
#[derive(Clone)]
pub struct KvStore {
    cache: Cache<Key, Value>,
}

impl KvStore {
    /// A store that evicts once its keys and values pass `max_bytes`.
    pub fn new(max_bytes: u64) -> Self {
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|key: &Key, value: &Value| {
                u32::try_from(key.1.len() + value.bytes.len() + 64).unwrap_or(u32::MAX)
            })
            .expire_after(PerEntryExpiry)
            .build();
        KvStore { cache }
    }

    /// The value under `key` in `namespace`.
    pub fn get(&self, namespace: &Arc<str>, key: &str) -> Option<Arc<[u8]>> {
        self.cache
            .get(&(namespace.clone(), key.to_owned()))
            .map(|v| v.bytes)
    }

    /// Stores `value`, replacing any expiry the key had with `ttl`.
    pub fn set(&self, namespace: &Arc<str>, key: &str, value: &[u8], ttl: Option<Duration>) {
        let value = Value {
            bytes: value.into(),
            ttl,
            keep_expiry: false,
        };
        self.cache
            .insert((namespace.clone(), key.to_owned()), value);
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
    ) -> Result<i64, KvError> {
        let mut outcome = Ok(0);
        self.cache
            .entry((namespace.clone(), key.to_owned()))
            .and_compute_with(|existing| {
                let (current, keep_expiry) = match &existing {
                    None => (Ok(0), false),
                    Some(entry) => (parse_counter(&entry.value().bytes, key), true),
                };
                outcome = current.and_then(|n: i64| {
                    n.checked_add(delta)
                        .ok_or_else(|| KvError::Overflow(key.into()))
                });
                match &outcome {
                    Ok(n) => Op::Put(Value {
                        bytes: n.to_string().into_bytes().into(),
                        ttl,
                        keep_expiry,
                    }),
                    Err(_) => Op::Nop,
                }
            });
        outcome
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_do_not_see_each_other() {
        let kv = KvStore::new(1 << 20);
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        kv.set(&a, "k", b"one", None);
        assert_eq!(kv.get(&a, "k").as_deref(), Some(&b"one"[..]));
        assert_eq!(kv.get(&b, "k"), None);
        kv.delete(&a, "k");
        assert_eq!(kv.get(&a, "k"), None);
    }

    #[test]
    fn incr_counts_atomically_across_threads() {
        let kv = KvStore::new(1 << 20);
        let ns: Arc<str> = "rate".into();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..250 {
                        kv.incr(&ns, "hits", 1, None).unwrap();
                    }
                });
            }
        });
        assert_eq!(kv.incr(&ns, "hits", 0, None), Ok(1000));
        assert_eq!(kv.get(&ns, "hits").as_deref(), Some(&b"1000"[..]));
        kv.set(&ns, "word", b"x", None);
        assert_eq!(
            kv.incr(&ns, "word", 1, None),
            Err(KvError::NotAnInteger("word".into()))
        );
        kv.set(&ns, "max", i64::MAX.to_string().as_bytes(), None);
        assert_eq!(
            kv.incr(&ns, "max", 1, None),
            Err(KvError::Overflow("max".into()))
        );
    }

    #[test]
    fn ttl_expires_and_incr_keeps_the_first_expiry() {
        let kv = KvStore::new(1 << 20);
        let ns: Arc<str> = "t".into();
        kv.set(&ns, "short", b"v", Some(Duration::from_millis(50)));
        kv.incr(&ns, "window", 1, Some(Duration::from_millis(150)))
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(kv.get(&ns, "short"), None);
        // A later increment with a long TTL does not extend the window.
        assert_eq!(
            kv.incr(&ns, "window", 1, Some(Duration::from_secs(60))),
            Ok(2)
        );
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(kv.get(&ns, "window"), None);
    }
}
