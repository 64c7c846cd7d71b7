//! spanner: a test plugin that writes on its own span of a traced request through the
//! `tracing` interface, and may make an outbound call that joins the trace.
//!
//! In `on-request` it sets attribute `spanner.tag` to its config's `tag`, adds event
//! `spanner.checked` with `{rule: allow}`, and, with `call` set, GETs that URL. It reports what
//! the host said in `x-spanner-recorded` on the request (`true`, `false`, or the error).

use serde::Deserialize;
use weir_sdk::{Action, Plugin, Request, schemars, span};

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct Config {
    /// The value of `spanner.tag`.
    tag: String,
    /// A URL to GET during the call.
    #[serde(default)]
    call: Option<String>,
    /// Sets this many more attributes, to reach the bound.
    #[serde(default)]
    flood: u32,
}

struct Spanner {
    config: Config,
}

impl Plugin for Spanner {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        Ok(Spanner { config })
    }

    fn on_request(&self, req: &Request) -> Action {
        let mut said = match span::set_attribute(req, "spanner.tag", &self.config.tag) {
            Ok(recorded) => recorded.to_string(),
            Err(error) => error,
        };
        if let Err(error) = span::add_event(req, "spanner.checked", &[("rule", "allow")]) {
            said = error;
        }
        for index in 0..self.config.flood {
            if let Err(error) = span::set_attribute(req, &format!("flood.{index}"), "x") {
                said = format!("flood {index}: {error}");
                break;
            }
        }
        if let Some(url) = &self.config.call {
            let _ = weir_sdk::http::get(url);
        }
        let _ = req.set_header("x-spanner-recorded", &said);
        Action::Continue
    }
}

weir_sdk::export_plugin!(Spanner);
