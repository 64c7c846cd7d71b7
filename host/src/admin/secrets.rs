//! Which values of a config object are secrets, so that no admin answer carries one, and so
//! that a write which sends the placeholder back keeps the stored secret.
//!
//! A secret is: a private key (`ssl.key`, an upstream's `tls.client_key`); any value of a
//! route's plugin config that the plugin's `describe` schema marks `writeOnly: true` (or, for a
//! plugin whose schema is not known, whose field name looks like a credential); and every
//! consumer credential field but the ones a plugin finds the consumer by.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::config::{FieldError, Kind};
use crate::snapshot::Snapshot;

/// What stands in for a secret in an answer: secrets are written, never read back.
pub const REDACTED: &str = "<redacted>";

/// Fixed places that hold a private key, in any kind of object.
const KEY_POINTERS: &[&str] = &["/key", "/tls/client_key"];

/// How deep a schema is followed (through `$ref`s, combinators and nesting) before the rest
/// of the value is taken as secret: a plugin's schema may be hostile, and may loop.
const MAX_DEPTH: usize = 64;

/// The credential fields shown in every section: what a plugin finds a consumer by.
const ID_FIELDS: &[&str] = &["id", "username"];

/// Per credential section, the further fields that are ids, not secrets.
const SECTION_ID_FIELDS: &[(&str, &[&str])] = &[("jwt-auth", &["key", "algorithm"])];

/// Parts of a field name (lower-cased) that make a value a secret when its plugin's schema is
/// not known.
const SECRET_WORDS: &[&str] = &[
    "secret",
    "passw",
    "token",
    "private",
    "credential",
    "auth",
    "cookie",
    "key",
    "session",
    "signature",
];

/// The config schemas of the plugins the gateway has loaded, by plugin name.
#[derive(Default)]
pub struct Secrets {
    schemas: BTreeMap<String, Value>,
}

impl Secrets {
    /// The schemas the plugins in `snapshot` described themselves with.
    pub fn of(snapshot: &Snapshot) -> Self {
        let schemas = snapshot
            .plugins
            .iter()
            .filter_map(|(name, plugin)| Some((name.clone(), plugin.module.info()?.schema.clone())))
            .collect();
        Secrets { schemas }
    }

    /// Secrets from these schemas, by plugin name.
    #[cfg(test)]
    fn from_schemas(schemas: BTreeMap<String, Value>) -> Self {
        Secrets { schemas }
    }

    /// The JSON pointers of the secret values in `value`, an object of `kind`.
    pub fn pointers(&self, kind: Kind, value: &Value) -> Vec<String> {
        let mut found: Vec<String> = KEY_POINTERS
            .iter()
            .filter(|pointer| value.pointer(pointer).is_some_and(|v| !v.is_null()))
            .map(|pointer| (*pointer).to_owned())
            .collect();
        match kind {
            Kind::Route => self.route_pointers(value, &mut found),
            Kind::Consumer => credential_pointers(value, &mut found),
            Kind::Server => tracing_header_pointers(value, &mut found),
            _ => {}
        }
        found.sort();
        found.dedup();
        found
    }

    fn route_pointers(&self, route: &Value, found: &mut Vec<String>) {
        let Some(plugins) = route.get("plugins").and_then(Value::as_array) else {
            return;
        };
        for (index, plugin) in plugins.iter().enumerate() {
            let Some(config) = plugin.get("config") else {
                continue;
            };
            let at = format!("/plugins/{index}/config");
            let schema = plugin
                .get("name")
                .and_then(Value::as_str)
                .and_then(|name| self.schemas.get(name));
            match schema {
                Some(schema) => Walk {
                    root: schema,
                    found: &mut *found,
                    steps: 0,
                }
                .visit(schema, config, &at, 0),
                None => by_name(config, &at, found),
            }
        }
    }

    /// Replaces every secret in `value` with [`REDACTED`], and the password of a `redis_url`.
    pub fn redact(&self, kind: Kind, value: &mut Value) {
        for pointer in self.pointers(kind, value) {
            if let Some(secret) = value.pointer_mut(&pointer) {
                *secret = Value::String(REDACTED.into());
            }
        }
        if let Some(Value::String(url)) = value.pointer_mut("/redis_url")
            && let Some(redacted) = redact_url_password(url)
        {
            *url = redacted;
        }
    }

    /// Puts back the stored secret wherever `value` (about to be written) holds the
    /// placeholder at a place that is secret in both it and `stored`, under the same plugin;
    /// refuses a placeholder there is nothing to put back for, so that it is never stored as
    /// a secret.
    pub fn restore(
        &self,
        kind: Kind,
        value: &mut Value,
        stored: Option<&Value>,
    ) -> Result<(), Vec<FieldError>> {
        let was_secret = stored.map(|stored| self.pointers(kind, stored));
        let mut errors = Vec::new();
        for pointer in self.pointers(kind, value) {
            if value.pointer(&pointer).and_then(Value::as_str) != Some(REDACTED) {
                continue;
            }
            let kept = stored
                .zip(was_secret.as_ref())
                .filter(|(_, secret)| secret.contains(&pointer))
                .filter(|(stored, _)| same_plugin(&pointer, value, stored))
                .and_then(|(stored, _)| stored.pointer(&pointer))
                .filter(|kept| kept.as_str() != Some(REDACTED))
                .cloned();
            match kept {
                Some(kept) => *value.pointer_mut(&pointer).expect("found above") = kept,
                None => errors.push(FieldError {
                    path: pointer,
                    message: "is the redacted placeholder, and no secret is stored there to keep; \
                              send the secret"
                        .into(),
                }),
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
}

/// Every value of `server.tracing.headers`: they carry a tracing vendor's key.
fn tracing_header_pointers(server: &Value, found: &mut Vec<String>) {
    let Some(headers) = server
        .pointer("/tracing/headers")
        .and_then(Value::as_object)
    else {
        return;
    };
    for name in headers.keys() {
        let escaped = name.replace('~', "~0").replace('/', "~1");
        found.push(format!("/tracing/headers/{escaped}"));
    }
}

/// Whether a pointer into a route's plugin config names the same plugin in both objects (a
/// secret is never carried over to another plugin, which might show it).
fn same_plugin(pointer: &str, value: &Value, stored: &Value) -> bool {
    let Some(rest) = pointer.strip_prefix("/plugins/") else {
        return true;
    };
    let index = rest.split('/').next().unwrap_or_default();
    let name = format!("/plugins/{index}/name");
    value
        .pointer(&name)
        .is_some_and(|new| Some(new) == stored.pointer(&name))
}

/// A consumer's credential fields, but for the ids a plugin looks consumers up by.
fn credential_pointers(consumer: &Value, found: &mut Vec<String>) {
    let Some(Value::Object(sections)) = consumer.get("credentials") else {
        return;
    };
    for (plugin, section) in sections {
        let Some(section) = section.as_object() else {
            found.push(format!("/credentials/{}", escape(plugin)));
            continue;
        };
        let ids = SECTION_ID_FIELDS
            .iter()
            .find(|(name, _)| name == plugin)
            .map_or(&[][..], |(_, ids)| *ids);
        for (name, value) in section {
            let shown = value.is_string()
                && (ID_FIELDS.contains(&name.as_str()) || ids.contains(&name.as_str()));
            if !shown && !value.is_null() {
                found.push(format!("/credentials/{}/{}", escape(plugin), escape(name)));
            }
        }
    }
}

/// For a config whose plugin described no schema: the values whose field name looks like a
/// credential.
fn by_name(value: &Value, at: &str, found: &mut Vec<String>) {
    match value {
        Value::Object(fields) => {
            for (name, inner) in fields {
                let here = format!("{at}/{}", escape(name));
                let lower = name.to_ascii_lowercase();
                let secret = SECRET_WORDS.iter().any(|word| lower.contains(word));
                if secret && (inner.is_string() || inner.is_array() || inner.is_object()) {
                    found.push(here);
                } else {
                    by_name(inner, &here, found);
                }
            }
        }
        Value::Array(items) => {
            for (index, inner) in items.iter().enumerate() {
                by_name(inner, &format!("{at}/{index}"), found);
            }
        }
        _ => {}
    }
}

/// How many schema nodes one object's walk visits at most: combinators that branch into
/// `$ref`s could otherwise make a hostile schema's walk exponential.
const MAX_STEPS: usize = 100_000;

/// One walk of a plugin's schema along its config.
struct Walk<'a> {
    /// The schema `$ref`s resolve in.
    root: &'a Value,
    found: &'a mut Vec<String>,
    steps: usize,
}

impl Walk<'_> {
    /// Follows `schema` along `value` (at pointer `at`), noting each value a `writeOnly`
    /// schema covers. What lies past the depth or step limit is taken as secret.
    fn visit(&mut self, schema: &Value, value: &Value, at: &str, depth: usize) {
        if value.is_null() {
            return;
        }
        self.steps += 1;
        if depth > MAX_DEPTH || self.steps > MAX_STEPS {
            self.found.push(at.to_owned());
            return;
        }
        let Some(schema) = schema.as_object() else {
            return;
        };
        if schema.get("writeOnly") == Some(&Value::Bool(true)) {
            self.found.push(at.to_owned());
            return;
        }
        let deeper = depth + 1;
        if let Some(reference) = schema.get("$ref").and_then(Value::as_str) {
            let root = self.root;
            match reference
                .strip_prefix('#')
                .and_then(|pointer| root.pointer(pointer))
            {
                Some(target) => self.visit(target, value, at, deeper),
                // A reference the gateway cannot follow could hide anything.
                None => self.found.push(at.to_owned()),
            }
        }
        for combinator in ["allOf", "anyOf", "oneOf"] {
            for branch in schema
                .get(combinator)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                self.visit(branch, value, at, deeper);
            }
        }
        match value {
            Value::Object(fields) => {
                let properties = schema.get("properties").and_then(Value::as_object);
                let patterns = schema.get("patternProperties").and_then(Value::as_object);
                for (name, inner) in fields {
                    let here = format!("{at}/{}", escape(name));
                    let mut matched = false;
                    if let Some(property) = properties.and_then(|p| p.get(name)) {
                        matched = true;
                        self.visit(property, inner, &here, deeper);
                    }
                    for (pattern, property) in patterns.into_iter().flatten() {
                        // Each pattern is compiled for each name: count it as a step.
                        self.steps += 1;
                        if self.steps > MAX_STEPS || pattern_matches(pattern, name) {
                            matched = true;
                            self.visit(property, inner, &here, deeper);
                        }
                    }
                    if !matched && let Some(additional) = schema.get("additionalProperties") {
                        self.visit(additional, inner, &here, deeper);
                    }
                }
            }
            Value::Array(items) => {
                let prefix = schema.get("prefixItems").and_then(Value::as_array);
                for (index, inner) in items.iter().enumerate() {
                    let here = format!("{at}/{index}");
                    match prefix.and_then(|p| p.get(index)) {
                        Some(item) => self.visit(item, inner, &here, deeper),
                        None => {
                            if let Some(item) = schema.get("items") {
                                self.visit(item, inner, &here, deeper);
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }
}

/// Whether a `patternProperties` pattern matches a field name, either as written or
/// lower-cased (config keys such as header names are case-insensitive). A pattern that does
/// not compile matches every name: what it covers is taken as secret.
fn pattern_matches(pattern: &str, name: &str) -> bool {
    match regex::Regex::new(pattern) {
        Ok(regex) => regex.is_match(name) || regex.is_match(&name.to_ascii_lowercase()),
        Err(_) => true,
    }
}

/// A field name as a JSON pointer segment.
fn escape(name: &str) -> String {
    name.replace('~', "~0").replace('/', "~1")
}

/// `redis://user:secret@host:6379` → `redis://user:<redacted>@host:6379`; `None` for a URL
/// with no password.
pub fn redact_url_password(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or(rest);
    let (userinfo, host) = authority.rsplit_once('@')?;
    let (user, _password) = userinfo.split_once(':')?;
    let tail = &rest[authority.len()..];
    Some(format!("{scheme}://{user}:{REDACTED}@{host}{tail}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn secrets() -> Secrets {
        Secrets::from_schemas(BTreeMap::from([
            (
                "key-auth".to_owned(),
                json!({"type": "object", "properties": {
                    "header": {"type": "string"},
                    "keys": {"type": "array", "items": {"type": "string"}, "writeOnly": true}}}),
            ),
            (
                "body-crypt".to_owned(),
                json!({"type": "object", "properties": {"keys": {"$ref": "#/$defs/Keys"},
                    "active": {"type": "string"}},
                    "$defs": {"Keys": {"type": "object",
                        "additionalProperties": {"type": "string", "writeOnly": true}}}}),
            ),
            (
                "headers".to_owned(),
                json!({"type": "object", "properties": {"request": {"anyOf": [{"$ref": "#/$defs/Edits"}]}},
                    "$defs": {"Edits": {"type": "object", "properties": {"set": {"type": "object",
                        "patternProperties": {"auth|key": {"type": "string", "writeOnly": true}},
                        "additionalProperties": {"type": "string"}}}}}}),
            ),
            (
                "loop".to_owned(),
                json!({"type": "object", "anyOf": [{"$ref": "#"}, {"$ref": "#"}]}),
            ),
        ]))
    }

    fn route() -> Value {
        json!({"id": "r", "uri": "/a", "plugins": [
            {"name": "key-auth", "config": {"header": "x-key", "keys": ["k-1", "k-2"]}},
            {"name": "body-crypt", "config": {"active": "a", "keys": {"a": "AAAA", "b": "BBBB"}}},
            {"name": "headers", "config": {"request": {"set": {"Authorization": "Bearer t", "x-env": "prod"}}}},
            {"name": "unknown", "config": {"api_token": "t0k", "mode": "fast", "nested": [{"password": "pw"}]}},
            {"name": "loop", "config": {"a": {"b": "c"}}}
        ]})
    }

    #[test]
    fn every_value_a_plugin_schema_marks_write_only_is_redacted() {
        let mut route = route();
        secrets().redact(Kind::Route, &mut route);
        let text = route.to_string();
        for secret in ["k-1", "AAAA", "BBBB", "Bearer t", "t0k", "\"pw\""] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        assert_eq!(route.pointer("/plugins/0/config/keys").unwrap(), REDACTED);
        assert_eq!(route.pointer("/plugins/0/config/header").unwrap(), "x-key");
        assert_eq!(route.pointer("/plugins/1/config/active").unwrap(), "a");
        assert_eq!(
            route
                .pointer("/plugins/2/config/request/set/x-env")
                .unwrap(),
            "prod"
        );
        assert_eq!(route.pointer("/plugins/3/config/mode").unwrap(), "fast");
        // A schema that refers to itself ends in secrecy, not in a stack overflow.
        assert_eq!(route.pointer("/plugins/4/config").unwrap(), REDACTED);
    }

    #[test]
    fn consumer_credentials_are_redacted_but_for_their_lookup_ids() {
        let mut consumer = json!({"name": "alice", "labels": {"team": "a"}, "credentials": {
            "key-auth": {"key": "k-alice"},
            "jwt-auth": {"key": "user-a", "secret": "s3", "algorithm": "HS256"},
            "basic-auth": {"username": "alice", "password": "$argon2id$x"},
            "my-auth": {"id": "me", "token": "tok", "scopes": ["a", "b"], "pin": 1234}}});
        secrets().redact(Kind::Consumer, &mut consumer);
        assert_eq!(
            consumer["credentials"],
            json!({
                "key-auth": {"key": REDACTED},
                "jwt-auth": {"key": "user-a", "secret": REDACTED, "algorithm": "HS256"},
                "basic-auth": {"username": "alice", "password": REDACTED},
                "my-auth": {"id": "me", "token": REDACTED, "scopes": REDACTED, "pin": REDACTED}})
        );
    }

    #[test]
    fn the_placeholder_written_back_keeps_the_stored_secret() {
        let secrets = secrets();
        let stored = route();
        let mut read = stored.clone();
        secrets.redact(Kind::Route, &mut read);
        let mut written = read.clone();
        secrets
            .restore(Kind::Route, &mut written, Some(&stored))
            .unwrap();
        assert_eq!(written, stored);
    }

    #[test]
    fn a_placeholder_with_no_secret_behind_it_is_refused() {
        let secrets = secrets();
        let stored = route();
        let mut read = stored.clone();
        secrets.redact(Kind::Route, &mut read);
        // Nothing stored.
        let errors = secrets
            .restore(Kind::Route, &mut read.clone(), None)
            .unwrap_err();
        assert!(
            errors.iter().any(|e| e.path == "/plugins/0/config/keys"),
            "{errors:?}"
        );
        // The secret moved to another plugin, which might show it.
        let mut moved = read.clone();
        moved["plugins"][1]["name"] = json!("key-auth");
        moved["plugins"][1]["config"] = json!({"keys": REDACTED});
        let errors = secrets
            .restore(Kind::Route, &mut moved, Some(&stored))
            .unwrap_err();
        assert_eq!(errors[0].path, "/plugins/1/config/keys", "{errors:?}");
        // A consumer credential that was never stored.
        let mut consumer = json!({"name": "a", "credentials": {"key-auth": {"key": REDACTED}}});
        let errors = secrets
            .restore(Kind::Consumer, &mut consumer, Some(&json!({"name": "a"})))
            .unwrap_err();
        assert_eq!(errors[0].path, "/credentials/key-auth/key");
    }

    #[test]
    fn a_tracing_vendors_header_values_are_never_read_back() {
        let mut server = json!({"tracing": {"endpoint": "https://otlp.example",
            "headers": {"x-api-key": "k3y", "a/b": "v"}}});
        Secrets::default().redact(Kind::Server, &mut server);
        assert_eq!(server["tracing"]["headers"]["x-api-key"], REDACTED);
        assert_eq!(server["tracing"]["headers"]["a/b"], REDACTED);
        assert_eq!(server["tracing"]["endpoint"], "https://otlp.example");
    }

    #[test]
    fn a_redis_password_is_never_read_back() {
        let mut server = json!({"redis_url": "redis://app:s3cret@10.0.0.7:6379/0?protocol=resp3"});
        Secrets::default().redact(Kind::Server, &mut server);
        assert_eq!(
            server["redis_url"],
            "redis://app:<redacted>@10.0.0.7:6379/0?protocol=resp3"
        );
        let mut plain = json!({"redis_url": "redis://10.0.0.7:6379/0"});
        Secrets::default().redact(Kind::Server, &mut plain);
        assert_eq!(plain["redis_url"], "redis://10.0.0.7:6379/0");
        assert_eq!(
            redact_url_password("redis://:p@ss@host").as_deref(),
            Some("redis://:<redacted>@host"),
            "the last @ ends the userinfo"
        );
    }
}
