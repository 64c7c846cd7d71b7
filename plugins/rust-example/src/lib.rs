//! rust-example: the plugin docs/plugins/rust.md builds. It counts requests in the kv, tells the
//! upstream the count in a header, logs every hundredth, and can block one path.

use serde::Deserialize;
use weir_sdk::{Action, Level, Plugin, Reply, Request, Response, Wants, kv, schemars};

/// The route's `config` object. Unknown fields are errors, reported when the route loads.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct Config {
    /// The header that carries the count to the upstream.
    header: String,
    /// A path to answer with 403 instead of forwarding.
    #[serde(default)]
    block_path: Option<String>,
}

struct Stamp {
    config: Config,
}

impl Plugin for Stamp {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        if config.header.is_empty() {
            return Err("`header` must not be empty".into());
        }
        Ok(Stamp { config })
    }

    fn wants(&self) -> Wants {
        Wants {
            on_request: true,
            on_response: true,
            on_log: false,
            request_body: false,
            response_body: false,
        }
    }

    fn on_request(&self, req: &Request) -> Action {
        if self.config.block_path.as_deref() == Some(req.path().as_str()) {
            return Action::Respond(Reply::error(403, "blocked by stamp"));
        }
        let seen = kv::incr("requests", 1, None).unwrap_or(0);
        if seen % 100 == 1 {
            weir_sdk::log(Level::Info, &format!("stamp has seen {seen} requests"));
        }
        let _ = req.set_header(&self.config.header, &seen.to_string());
        Action::Continue
    }

    fn on_response(&self, _req: &Request, resp: &Response) {
        let _ = resp.set_header("x-stamped", "yes");
    }
}

weir_sdk::export_plugin!(Stamp);
