//! key-auth: requires a known API key in a request header: one of the route's inline `keys`, or
//! a consumer's `key-auth` credential (`credentials: {key-auth: {key: ...}}`).

use serde::Deserialize;
use weir_sdk::{Action, Plugin, Reply, Request, consumers, schemars};

/// `{"header": "x-api-key", "keys": ["k1", "k2"]}`; without `keys`, only consumers' keys.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_header")]
    header: String,
    /// Keys that let a request through without naming a consumer. Secrets: the admin API
    /// answers with a placeholder.
    #[serde(default)]
    #[schemars(extend("writeOnly" = true))]
    keys: Vec<String>,
    /// Remove the key header before the request goes upstream.
    #[serde(default)]
    hide_credentials: bool,
}

fn default_header() -> String {
    "x-api-key".into()
}

struct KeyAuth {
    header: String,
    keys: Vec<String>,
    hide_credentials: bool,
}

/// Compares in time that depends only on the lengths, so a key cannot be guessed byte by byte.
fn same_key(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl Plugin for KeyAuth {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        if config.keys.iter().any(|k| k.is_empty()) {
            return Err("`keys` has an empty key".into());
        }
        Ok(KeyAuth {
            header: config.header.to_ascii_lowercase(),
            keys: config.keys,
            hide_credentials: config.hide_credentials,
        })
    }

    fn on_request(&self, req: &Request) -> Action {
        let Some(given) = req.header(&self.header) else {
            return Action::Respond(
                Reply::error(401, "missing API key").with_header("www-authenticate", "ApiKey"),
            );
        };
        if !self.keys.iter().any(|key| same_key(key, &given)) {
            // The store indexes consumers' keys; the lookup is one hash probe.
            match consumers::lookup("key-auth", "key", &given) {
                Ok(Some(consumer)) if consumers::set(req, &consumer.name).is_ok() => {}
                // No such key; or not granted, or a key two consumers share (the gateway logs
                // which): refuse rather than guess.
                _ => return Action::Respond(Reply::error(401, "invalid API key")),
            }
        }
        if self.hide_credentials {
            req.remove_header(&self.header);
        }
        Action::Continue
    }
}

weir_sdk::export_plugin!(KeyAuth);
