//! noop: a test plugin that does nothing, so that a call into it costs only the entry itself.
//!
//! It wants `on-request` only, and `on-request` returns `Action::Continue` without reading or
//! changing the request (tests/benches/micro.rs measures the bare cost of entering a plugin).

use weir_sdk::{Action, NoConfig, Plugin, Request, Wants};

struct Noop;

impl Plugin for Noop {
    type Config = NoConfig;

    fn new(_config: NoConfig) -> Result<Self, String> {
        Ok(Noop)
    }

    fn wants(&self) -> Wants {
        Wants {
            on_request: true,
            on_response: false,
            on_log: false,
            request_body: false,
            response_body: false,
        }
    }

    fn on_request(&self, _req: &Request) -> Action {
        Action::Continue
    }
}

weir_sdk::export_plugin!(Noop);
