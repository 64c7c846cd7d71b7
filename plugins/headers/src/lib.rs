//! headers: adds, sets and removes request and response headers.

use std::collections::BTreeMap;

use serde::Deserialize;
use weir_sdk::{Action, Plugin, Request, Wants, schemars};

/// `{"request": {..}, "response": {..}}`, each an [`Edits`].
#[derive(Deserialize, schemars::JsonSchema, Default)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    request: Edits,
    #[serde(default)]
    response: Edits,
}

/// Edits applied in this order: remove, then set, then add.
#[derive(Deserialize, schemars::JsonSchema, Default)]
#[serde(deny_unknown_fields)]
struct Edits {
    /// Headers to remove: `remove: [x-internal]`.
    #[serde(default)]
    remove: Vec<String>,
    /// Headers to set, replacing any value: `set: {x-env: prod}`.
    #[serde(default)]
    #[schemars(schema_with = "header_values")]
    set: BTreeMap<String, String>,
    /// Headers to append, keeping existing values: `add: {via: weir}`.
    #[serde(default)]
    #[schemars(schema_with = "header_values")]
    add: BTreeMap<String, String>,
}

/// Names of headers whose values are credentials (matched in lower case, anywhere in the
/// name): `authorization`, `proxy-authorization`, `cookie`, `x-api-key`, `x-auth-token`...
const CREDENTIAL_HEADERS: &str = "auth|cookie|token|secret|passw|key|session|credential|signature";

/// A map of header name to value, where the value of a credential header is `writeOnly`: the
/// admin API answers with a placeholder for it, and shows every other value.
fn header_values(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "patternProperties": {
            CREDENTIAL_HEADERS: {"type": "string", "writeOnly": true}
        },
        "additionalProperties": {"type": "string"}
    })
}

impl Edits {
    fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty() && self.add.is_empty()
    }

    fn validate(&self, side: &str) -> Result<(), String> {
        let names = self
            .remove
            .iter()
            .chain(self.set.keys())
            .chain(self.add.keys());
        for name in names {
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
                return Err(format!("{side}: {name:?} is not a valid header name"));
            }
        }
        for value in self.set.values().chain(self.add.values()) {
            if value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
                return Err(format!(
                    "{side}: header value {value:?} has a control character"
                ));
            }
        }
        Ok(())
    }
}

/// The operations both `Request` and `Response` offer for headers.
trait HeaderEdit {
    fn remove(&self, name: &str);
    fn set(&self, name: &str, value: &str) -> Result<(), String>;
    fn append(&self, name: &str, value: &str) -> Result<(), String>;
}

impl HeaderEdit for Request {
    fn remove(&self, name: &str) {
        self.remove_header(name)
    }
    fn set(&self, name: &str, value: &str) -> Result<(), String> {
        self.set_header(name, value)
    }
    fn append(&self, name: &str, value: &str) -> Result<(), String> {
        self.append_header(name, value)
    }
}

/// The response's headers, edited from `on_request`: the gateway applies the queued edits to
/// whatever is answered, so no `on_response` call is needed.
struct Queued<'a>(&'a Request);

impl HeaderEdit for Queued<'_> {
    fn remove(&self, name: &str) {
        let _ = weir_sdk::response::remove_header(self.0, name);
    }
    fn set(&self, name: &str, value: &str) -> Result<(), String> {
        weir_sdk::response::set_header(self.0, name, value)
    }
    fn append(&self, name: &str, value: &str) -> Result<(), String> {
        weir_sdk::response::append_header(self.0, name, value)
    }
}

fn apply(edits: &Edits, target: &impl HeaderEdit) {
    for name in &edits.remove {
        target.remove(name);
    }
    // Names and values were validated in `new`, so the host accepts them.
    for (name, value) in &edits.set {
        let _ = target.set(name, value);
    }
    for (name, value) in &edits.add {
        let _ = target.append(name, value);
    }
}

struct Headers {
    config: Config,
}

impl Plugin for Headers {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        config.request.validate("request")?;
        config.response.validate("response")?;
        Ok(Headers { config })
    }

    fn wants(&self) -> Wants {
        Wants {
            on_request: !self.config.request.is_empty() || !self.config.response.is_empty(),
            on_response: false,
            on_log: false,
            request_body: false,
            response_body: false,
        }
    }

    fn on_request(&self, req: &Request) -> Action {
        apply(&self.config.request, req);
        apply(&self.config.response, &Queued(req));
        Action::Continue
    }
}

weir_sdk::export_plugin!(Headers);
