//! fallback: a test plugin for world 0.3.0's `fallbacks`. Each request gets the targets of the
//! config, to be tried in turn; the answer says which one answered, in `x-answered-by`
//! (`none` when none did). A refused `set-targets` answers 500 with the host's reason.

use std::collections::BTreeMap;

use serde::Deserialize;
use weir_sdk::fallbacks::{self, Target};
use weir_sdk::{Action, Plugin, Reply, Request, Response, Wants, schemars};

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct Config {
    targets: Vec<TargetConfig>,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct TargetConfig {
    upstream: String,
    #[serde(default)]
    set: BTreeMap<String, String>,
    path: Option<String>,
    body: Option<String>,
}

struct Fallback(Vec<Target>);

impl Plugin for Fallback {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        let targets = config
            .targets
            .into_iter()
            .map(|target| Target {
                upstream: target.upstream,
                set_headers: target.set.into_iter().collect(),
                path: target.path,
                body: target.body.map(String::into_bytes),
            })
            .collect();
        Ok(Fallback(targets))
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
        match fallbacks::set_targets(req, &self.0) {
            Ok(()) => Action::Continue,
            Err(refused) => Action::Respond(Reply::text(500, refused)),
        }
    }

    fn on_response(&self, req: &Request, resp: &Response) {
        let answered = fallbacks::answered_by(req).map_or("none".to_owned(), |i| i.to_string());
        let _ = resp.set_header("x-answered-by", &answered);
    }
}

weir_sdk::export_plugin!(Fallback);
