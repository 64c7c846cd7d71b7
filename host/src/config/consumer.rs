//! Consumers: the callers the gateway knows, each with the credentials auth plugins check.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize};

use super::{Checks, ConfigObject, Kind, check_id, checked_serde};

/// The most labels one consumer may carry.
const MAX_LABELS: usize = 64;
/// The most credential sections (one per auth plugin) one consumer may hold.
const MAX_CREDENTIALS: usize = 16;
/// The largest one consumer may be, as JSON: credentials are keys and hashes, not documents.
const MAX_CONSUMER_BYTES: usize = 64 << 10;

/// A caller the gateway knows: `/weir/consumers/<name>` in etcd, `consumers:` in the file.
#[derive(Clone, PartialEq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct ConsumerConfig {
    /// `name: alice`: unique; the upstream sees it as `x-consumer-username`.
    pub name: String,
    /// `labels: {team: payments}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// `credentials: {key-auth: {key: "..."}, jwt-auth: {key: user-a, secret: "..."}}`: one
    /// object per auth plugin, which finds the consumer by one of its string fields.
    #[serde(default)]
    pub credentials: BTreeMap<String, serde_json::Map<String, serde_json::Value>>,
}

impl std::fmt::Debug for ConsumerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Credentials are secrets: a log line names the sections, never their values.
        f.debug_struct("ConsumerConfig")
            .field("name", &self.name)
            .field("labels", &self.labels)
            .field("credentials", &self.credentials.keys().collect::<Vec<_>>())
            .finish()
    }
}

checked_serde!(ConsumerConfig);

impl ConfigObject for ConsumerConfig {
    const KIND: Kind = Kind::Consumer;

    fn deserialize_unchecked<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        ConsumerConfig::deserialize(d)
    }

    fn id(&self) -> &str {
        &self.name
    }

    fn check(&self, checks: &mut Checks) {
        checks.check("/name", check_id(&self.name));
        if self.labels.len() > MAX_LABELS {
            checks.fail("/labels", format!("more than {MAX_LABELS} labels"));
        }
        for (name, value) in &self.labels {
            if name.is_empty() || name.len() > 64 || value.len() > 256 {
                checks.fail(
                    format!("/labels/{name}"),
                    "a label's name is 1 to 64 bytes and its value at most 256",
                );
            }
        }
        if self.credentials.len() > MAX_CREDENTIALS {
            checks.fail(
                "/credentials",
                format!("more than {MAX_CREDENTIALS} credentials"),
            );
        }
        for plugin in self.credentials.keys() {
            checks.check(format!("/credentials/{plugin}"), check_id(plugin));
        }
        let size = serde_json::to_vec(&self.credentials).map_or(usize::MAX, |json| json.len());
        if size > MAX_CONSUMER_BYTES {
            checks.fail(
                "/credentials",
                format!("{size} bytes of credentials, over the {MAX_CONSUMER_BYTES}-byte limit"),
            );
        }
    }
}

/// Every consumer, indexed by each string field of each credential, so that an auth plugin
/// finds the consumer for a credential with one hash lookup however many there are.
#[derive(Debug, Default)]
pub struct Consumers {
    by_name: HashMap<String, Arc<ConsumerConfig>>,
    /// `(plugin, field, value)` → the consumers whose credential has it.
    index: HashMap<(String, String, String), Vec<Arc<ConsumerConfig>>>,
}

/// Why a lookup found no single consumer.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// More than one consumer holds the value; an auth plugin must not pick one.
    #[error("{count} consumers share {plugin}.{field}; none is chosen")]
    Ambiguous {
        /// The credential's plugin.
        plugin: String,
        /// The field.
        field: String,
        /// How many consumers share the value.
        count: usize,
    },
}

impl Consumers {
    /// Indexes `consumers`.
    pub fn new<'a>(consumers: impl IntoIterator<Item = &'a ConsumerConfig>) -> Self {
        let mut by_name = HashMap::new();
        let mut index: HashMap<_, Vec<_>> = HashMap::new();
        for consumer in consumers {
            let consumer = Arc::new(consumer.clone());
            for (plugin, credential) in &consumer.credentials {
                for (field, value) in credential {
                    if let Some(value) = value.as_str() {
                        index
                            .entry((plugin.clone(), field.clone(), value.to_owned()))
                            .or_default()
                            .push(consumer.clone());
                    }
                }
            }
            by_name.insert(consumer.name.clone(), consumer);
        }
        Consumers { by_name, index }
    }

    /// The consumer called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<ConsumerConfig>> {
        self.by_name.get(name)
    }

    /// Every consumer's name.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }

    /// Whether `consumers` are exactly the ones indexed.
    pub fn same_as<'a>(
        &self,
        consumers: impl ExactSizeIterator<Item = &'a ConsumerConfig>,
    ) -> bool {
        consumers.len() == self.by_name.len()
            && consumers
                .into_iter()
                .all(|c| self.by_name.get(&c.name).is_some_and(|old| **old == *c))
    }

    /// How many consumers there are.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// The one consumer whose `plugin` credential has `field` equal to `value`.
    pub fn lookup(
        &self,
        plugin: &str,
        field: &str,
        value: &str,
    ) -> Result<Option<&Arc<ConsumerConfig>>, LookupError> {
        // A tuple key of borrowed strs cannot query a map of owned ones; building the owned
        // key costs three short copies, still one hash lookup.
        let key = (plugin.to_owned(), field.to_owned(), value.to_owned());
        match self.index.get(&key).map(Vec::as_slice) {
            None | Some([]) => Ok(None),
            Some([one]) => Ok(Some(one)),
            Some(many) => Err(LookupError::Ambiguous {
                plugin: plugin.to_owned(),
                field: field.to_owned(),
                count: many.len(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn consumer(value: serde_json::Value) -> ConsumerConfig {
        super::super::parse(&value).unwrap()
    }

    #[test]
    fn a_credential_value_finds_its_one_consumer() {
        let alice = consumer(json!({"name": "alice", "credentials": {
            "key-auth": {"key": "k-alice"}, "jwt-auth": {"key": "user-a", "algorithm": "HS256"}}}));
        let bob = consumer(json!({"name": "bob", "credentials": {
            "jwt-auth": {"key": "user-b", "algorithm": "HS256"}, "key-auth": {"key": "k-bob"}}}));
        let consumers = Consumers::new([&alice, &bob]);
        let found = |plugin, field, value| {
            consumers
                .lookup(plugin, field, value)
                .map(|c| c.map(|c| c.name.clone()))
        };
        assert_eq!(found("key-auth", "key", "k-bob"), Ok(Some("bob".into())));
        assert_eq!(found("jwt-auth", "key", "user-a"), Ok(Some("alice".into())));
        // Another plugin's section, a missing value and a non-string never match.
        assert_eq!(found("jwt-auth", "key", "k-bob"), Ok(None));
        assert_eq!(found("key-auth", "key", "nobody"), Ok(None));
        // A value two consumers share names no one.
        assert!(matches!(
            found("jwt-auth", "algorithm", "HS256"),
            Err(LookupError::Ambiguous { count: 2, .. })
        ));
        assert_eq!(consumers.get("alice").unwrap().name, "alice");
        assert_eq!(consumers.len(), 2);
    }

    #[test]
    fn bad_consumers_are_refused_at_their_field() {
        let refused = |value: serde_json::Value| {
            super::super::describe(&super::super::parse::<ConsumerConfig>(&value).unwrap_err())
        };
        assert!(refused(json!({"name": "a b"})).contains("/name"));
        assert!(
            refused(json!({"name": "a", "credentials": {"key-auth": "k"}}))
                .contains("/credentials")
        );
        assert!(
            refused(json!({"name": "a", "credentials": {"key auth": {}}}))
                .contains("/credentials/key auth")
        );
        let huge = "x".repeat(70_000);
        assert!(
            refused(json!({"name": "a", "credentials": {"key-auth": {"key": huge}}}))
                .contains("over the")
        );
        assert!(refused(json!({"name": "a", "password": "x"})).contains("unknown field"));
    }
}
