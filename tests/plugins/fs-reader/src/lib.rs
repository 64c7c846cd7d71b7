//! fs-reader: a hostile plugin that tries to read /etc/passwd. Reading a file makes the
//! component import wasi:filesystem, which the gateway refuses to load.

use serde::Deserialize;
use weir_sdk::{Action, Plugin, Reply, Request, schemars};

#[derive(Deserialize, schemars::JsonSchema)]
struct Config {}

struct FsReader;

impl Plugin for FsReader {
    type Config = Config;

    fn new(_: Config) -> Result<Self, String> {
        Ok(FsReader)
    }

    fn on_request(&self, _req: &Request) -> Action {
        match std::fs::read_to_string("/etc/passwd") {
            Ok(text) => Action::Respond(Reply::text(200, text)),
            Err(error) => Action::Respond(Reply::error(500, &error.to_string())),
        }
    }
}

weir_sdk::export_plugin!(FsReader);
