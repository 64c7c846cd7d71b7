//! The `admin` section: who may use the admin API and the dashboard, and which admin paths are
//! open to anyone (scrapers and probes).

use serde::{Deserialize, Deserializer, Serialize};

use super::{Checks, ConfigObject, Kind, checked_serde, is_sha256_hex};

/// Who may use the admin listener. The `admin:` section of the file, `<prefix>/admin` in etcd,
/// or the file named by `--admin-config`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct AdminConfig {
    /// `keys: [{name, key_sha256, role}]`: API keys, sent as `X-API-KEY`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<ApiKey>,
    /// `accounts: [{username, password_hash, role}]`: dashboard logins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub accounts: Vec<Account>,
    /// `open: [/metrics, /healthz, /readyz]`: the paths anyone may read (the default is all
    /// three; `[]` closes them).
    #[serde(default = "default_open")]
    pub open: Vec<String>,
    /// `session_minutes: 480`: how long a dashboard login lasts.
    #[serde(default = "default_session_minutes")]
    pub session_minutes: u64,
    /// `hosts: [admin.example.com]`: names the admin listener answers to, besides its own
    /// address and `localhost`; a request for any other `Host` gets 421 (DNS rebinding).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// `session_keys: [base64, ...]`: the keys that sign dashboard sessions, newest first; the
    /// first signs, the others are accepted for one session lifetime after they stop being
    /// first. Without any, weir keeps its own (in etcd, shared by every gateway).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub session_keys: Vec<String>,
    /// `metrics_history: {interval_s: 10}`: how often the gateway samples its request and
    /// plugin metrics for the dashboard's charts (`GET /v1/metrics/history`).
    #[serde(default, skip_serializing_if = "MetricsHistory::is_default")]
    pub metrics_history: MetricsHistory,
}

/// The window of metrics the dashboard charts: the last 90 samples, taken every `interval_s`
/// (15 minutes at the default 10 s).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsHistory {
    /// `interval_s: 10`: seconds between two samples, 1 to 60.
    #[serde(default = "default_history_interval_s")]
    pub interval_s: u64,
}

fn default_history_interval_s() -> u64 {
    10
}

impl Default for MetricsHistory {
    fn default() -> Self {
        MetricsHistory {
            interval_s: default_history_interval_s(),
        }
    }
}

impl MetricsHistory {
    fn is_default(&self) -> bool {
        *self == MetricsHistory::default()
    }

    /// The time between two samples.
    pub fn interval(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.interval_s)
    }
}

/// What a key or an account may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Read and write.
    Admin,
    /// Read only.
    Viewer,
}

/// An API key, stored as the sha256 of the key.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    /// Who holds it, for the audit log.
    pub name: String,
    /// The key's sha256, in lower-case hex (`printf %s KEY | sha256sum`).
    pub key_sha256: String,
    /// What it may do.
    pub role: Role,
}

/// A dashboard account.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Account {
    /// The login name.
    pub username: String,
    /// An argon2id hash in PHC form (`weir admin hash-password` makes one).
    pub password_hash: String,
    /// What it may do.
    pub role: Role,
}

/// The admin paths that may be left open.
pub const OPENABLE: &[&str] = &["/metrics", "/healthz", "/readyz"];

fn default_open() -> Vec<String> {
    OPENABLE.iter().map(|p| (*p).to_owned()).collect()
}

/// The bytes of a `session_keys` entry: standard or URL-safe base64 of at least 32 bytes.
pub fn session_key_bytes(key: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    let key = key.trim();
    let bytes = STANDARD
        .decode(key)
        .or_else(|_| URL_SAFE_NO_PAD.decode(key))
        .ok()?;
    (bytes.len() >= 32).then_some(bytes)
}

fn default_session_minutes() -> u64 {
    480
}

checked_serde!(AdminConfig);

impl Default for AdminConfig {
    /// No keys and no accounts; the probes and `/metrics` open.
    fn default() -> Self {
        AdminConfig {
            keys: Vec::new(),
            accounts: Vec::new(),
            open: default_open(),
            session_minutes: default_session_minutes(),
            hosts: Vec::new(),
            session_keys: Vec::new(),
            metrics_history: MetricsHistory::default(),
        }
    }
}

impl ConfigObject for AdminConfig {
    const KIND: Kind = Kind::Admin;

    fn deserialize_unchecked<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        AdminConfig::deserialize(d)
    }

    fn id(&self) -> &str {
        "admin"
    }

    fn check(&self, checks: &mut Checks) {
        let mut names = std::collections::HashSet::new();
        for (index, key) in self.keys.iter().enumerate() {
            if key.name.is_empty() || key.name.len() > 64 {
                checks.fail(
                    format!("/keys/{index}/name"),
                    "a key needs a name of 1 to 64 bytes",
                );
            }
            if !names.insert(key.name.as_str()) {
                checks.fail(format!("/keys/{index}/name"), "another key has this name");
            }
            if !is_sha256_hex(&key.key_sha256) {
                checks.fail(
                    format!("/keys/{index}/key_sha256"),
                    "not 64 lower-case hex digits (the key's sha256, not the key)",
                );
            }
        }
        let mut users = std::collections::HashSet::new();
        for (index, account) in self.accounts.iter().enumerate() {
            if account.username.is_empty() || account.username.len() > 64 {
                checks.fail(
                    format!("/accounts/{index}/username"),
                    "a username has 1 to 64 bytes",
                );
            }
            if !users.insert(account.username.as_str()) {
                checks.fail(
                    format!("/accounts/{index}/username"),
                    "another account has this username",
                );
            }
            let argon2id = argon2::PasswordHash::new(&account.password_hash)
                .is_ok_and(|hash| hash.algorithm.as_str() == "argon2id");
            if !argon2id {
                checks.fail(
                    format!("/accounts/{index}/password_hash"),
                    "not an argon2id hash in PHC form (make one with `weir admin hash-password`)",
                );
            }
        }
        for (index, path) in self.open.iter().enumerate() {
            if !OPENABLE.contains(&path.as_str()) {
                checks.fail(
                    format!("/open/{index}"),
                    format!("only {} may be open", OPENABLE.join(", ")),
                );
            }
        }
        for (index, host) in self.hosts.iter().enumerate() {
            let valid = !host.is_empty()
                && host.len() <= 253
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.'));
            if !valid {
                checks.fail(
                    format!("/hosts/{index}"),
                    "a host name: letters, digits, '-' and '.', without port or scheme",
                );
            }
        }
        for (index, key) in self.session_keys.iter().enumerate() {
            if session_key_bytes(key).is_none() {
                checks.fail(
                    format!("/session_keys/{index}"),
                    "not a key of at least 32 bytes in base64 (`openssl rand -base64 32`)",
                );
            }
        }
        if !(1..=10_080).contains(&self.session_minutes) {
            checks.fail("/session_minutes", "not in 1..=10080 (a week)");
        }
        if !(1..=60).contains(&self.metrics_history.interval_s) {
            checks.fail(
                "/metrics_history/interval_s",
                "not in 1..=60 (seconds between the dashboard's samples; it keeps the last 90)",
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_history_interval_defaults_to_10_s_and_is_refused_outside_1_to_60() {
        let parsed = crate::config::parse::<AdminConfig>(&serde_json::json!({})).unwrap();
        assert_eq!(parsed.metrics_history.interval_s, 10);
        // Left out when it is the default, so a stored section reads as it was written.
        assert!(
            serde_json::to_value(&parsed)
                .unwrap()
                .get("metrics_history")
                .is_none()
        );
        let one = serde_json::json!({"metrics_history": {"interval_s": 1}});
        let parsed = crate::config::parse::<AdminConfig>(&one).unwrap();
        assert_eq!(
            parsed.metrics_history.interval(),
            std::time::Duration::from_secs(1)
        );
        for bad in [0, 61] {
            let json = serde_json::json!({"metrics_history": {"interval_s": bad}});
            let errors = crate::config::parse::<AdminConfig>(&json).unwrap_err();
            assert_eq!(errors[0].path, "/metrics_history/interval_s", "{errors:?}");
            assert!(errors[0].message.contains("1..=60"), "{errors:?}");
        }
        let unknown = serde_json::json!({"metrics_history": {"every": 5}});
        assert!(crate::config::parse::<AdminConfig>(&unknown).is_err());
    }
}
