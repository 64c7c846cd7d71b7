//! noop: a test plugin that does nothing, so that a call into it costs only the entry itself.
//!
//! It keeps the SDK's defaults: it wants `on-request` only, and `on-request` returns
//! `Action::Continue` without reading or changing the request (tests/benches/micro.rs measures
//! the bare cost of entering a plugin).

use weir_sdk::{NoConfig, Plugin};

struct Noop;

impl Plugin for Noop {
    type Config = NoConfig;

    fn new(_config: NoConfig) -> Result<Self, String> {
        Ok(Noop)
    }
}

weir_sdk::export_plugin!(Noop);
