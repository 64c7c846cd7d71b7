//! Weir: an API gateway whose plugins are sandboxed WebAssembly components.
//!
//! The request path lives in [`proxy`]; the live config in [`snapshot`]; plugins in [`plugin`].
//! ARCHITECTURE.md, at the repository's root, is the map: what each file owns, what it may
//! import, and the invariants that hold across them.

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod access_log;
pub mod admin;
pub mod authoring;
pub mod body;
pub mod client;
pub mod client_conn;
pub mod config;
pub mod digest;
pub mod edge;
pub mod error;
pub mod gateway;
pub mod grpc_web;
pub mod kv;
pub mod metrics;
pub mod plugin;
pub mod private_file;
pub mod proxy;
pub mod reconcile;
pub mod router;
pub mod server;
pub mod snapshot;
pub mod spans;
pub mod store;
pub mod timeouts;
pub mod tls;
pub mod upgrade;
pub mod upstream;
pub mod view;
pub mod workers;

pub use access_log::AccessLogTarget;
pub use admin::AdminOptions;
pub use gateway::Gateway;
pub use server::{ConfigSource, DrainOptions, GatewayOptions, RunningGateway, StartError, start};

/// Inputs per property of the fuzz tests (`fuzz_*`): `default` in CI, or `PROPTEST_CASES` for a
/// longer run (docs/security.md has the command).
#[cfg(test)]
fn proptest_cases(default: u32) -> proptest::prelude::ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(default);
    proptest::prelude::ProptestConfig::with_cases(cases)
}
