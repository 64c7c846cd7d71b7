//! What weir's rate-limiting plugins count by: the client's address, the route, a header, the
//! consumer an auth plugin found, or several of these together. Shared by limit-count and limit-req.

use serde::Deserialize;
use weir_sdk::{Request, schemars};

/// `key` as configured: `"ip"`, or `["ip", "header:x-user"]`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum KeySpec {
    /// One part.
    One(String),
    /// Several parts, counted together.
    Several(Vec<String>),
}

impl Default for KeySpec {
    fn default() -> Self {
        KeySpec::One("ip".into())
    }
}

/// One part of a key.
#[derive(Debug)]
enum KeyPart {
    Ip,
    Route,
    Header(String),
    Consumer,
}

/// A parsed key: what a request is counted under.
#[derive(Debug)]
pub struct LimitKey {
    parts: Vec<KeyPart>,
}

/// How much of a header's value goes into a key, so that a client cannot grow the kv's keys
/// without bound.
const MAX_HEADER_CHARS: usize = 256;

impl LimitKey {
    /// The key `spec` describes, or why it is not one.
    pub fn parse(spec: KeySpec) -> Result<Self, String> {
        let texts = match spec {
            KeySpec::One(one) => vec![one],
            KeySpec::Several(several) => several,
        };
        if texts.is_empty() {
            return Err("`key` lists nothing to count by".into());
        }
        let parts = texts
            .iter()
            .map(|text| match text.as_str() {
                "ip" => Ok(KeyPart::Ip),
                "route" => Ok(KeyPart::Route),
                "consumer" => Ok(KeyPart::Consumer),
                other => match other.strip_prefix("header:") {
                    Some(name) if !name.is_empty() => {
                        Ok(KeyPart::Header(name.to_ascii_lowercase()))
                    }
                    _ => Err(format!(
                        "key {other:?} is not ip, route, consumer or header:NAME"
                    )),
                },
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(LimitKey { parts })
    }

    /// `req`'s key: its parts, each after a `|`. A missing header counts as empty; so does a
    /// missing consumer (put the auth plugin first, so that every request has one).
    pub fn of(&self, req: &Request) -> String {
        let mut key = String::new();
        for part in &self.parts {
            key.push('|');
            match part {
                KeyPart::Ip => key.push_str(&req.client_ip()),
                KeyPart::Route => key.push_str(&req.route_id()),
                KeyPart::Header(name) => {
                    let value = req.header(name).unwrap_or_default();
                    key.extend(value.chars().take(MAX_HEADER_CHARS));
                }
                KeyPart::Consumer => {
                    key.push_str(&weir_sdk::consumers::current(req).unwrap_or_default());
                }
            }
        }
        key
    }
}
