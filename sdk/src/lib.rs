//! The Rust SDK for Weir plugins: implement [`Plugin`], then call [`export_plugin!`].
//!
//! ```ignore
//! use weir_sdk::schemars;
//! use weir_sdk::{Action, Plugin, Request};
//!
//! #[derive(serde::Deserialize, schemars::JsonSchema)]
//! struct Config { header: String }
//!
//! struct Stamp { header: String }
//!
//! impl Plugin for Stamp {
//!     type Config = Config;
//!     fn new(config: Config) -> Result<Self, String> {
//!         Ok(Stamp { header: config.header })
//!     }
//!     fn on_request(&self, req: &Request) -> Action {
//!         req.set_header(&self.header, "yes").ok();
//!         Action::Continue
//!     }
//! }
//!
//! weir_sdk::export_plugin!(Stamp);
//! ```

#![deny(unsafe_code)]

use std::sync::OnceLock;

use schemars::JsonSchema;
use serde::de::DeserializeOwned;

/// The schemars the SDK derives config schemas with: `use weir_sdk::schemars;` and then
/// `#[derive(schemars::JsonSchema)]` needs no schemars dependency of the plugin's own.
///
/// The derive's code names `schemars::…`, so the `use` (not only `use
/// weir_sdk::schemars::JsonSchema`) is what points it here.
pub use schemars;

/// The bindings that wit-bindgen generates from wit/; plugins use the re-exports below.
#[doc(hidden)]
#[allow(unsafe_code, clippy::all, missing_docs)]
pub mod wit {
    wit_bindgen::generate!({
        path: "../wit",
        world: "weir:plugin/plugin@0.3.0",
        // 0.3.0 includes 0.2.0's and 0.1.0's interfaces, which live in other packages
        // (wit/deps).
        generate_all,
        pub_export_macro: true,
        export_macro_name: "export_bindings",
        default_bindings_module: "weir_sdk::wit",
    });
}

pub use wit::exports::weir::plugin0_1_0::filter::Wants;
pub use wit::exports::weir::plugin0_3_0::chunks::{ChunkAction, ChunkWants};
pub use wit::weir::plugin0_1_0::http::{Action, Reply, Request, Response, Summary};
pub use wit::weir::plugin0_1_0::log::Level;

/// A Weir plugin. One value is built per instance from the route's config, then serves requests.
///
/// Only `new` is required; every phase has a default that lets the request through.
pub trait Plugin: Sized + Send + Sync + 'static {
    /// The route's `config` object, parsed from JSON; an error in it rejects the route.
    ///
    /// Its JSON Schema (derived with `schemars::JsonSchema`, through [`schemars`]) is what the
    /// plugin's `describe` gives the gateway, which checks each route's config against it
    /// before `init`.
    type Config: DeserializeOwned + JsonSchema;

    /// Builds the plugin from its config, or says why the config is wrong.
    fn new(config: Self::Config) -> Result<Self, String>;

    /// The phases and bodies this plugin needs; by default only `on_request`.
    fn wants(&self) -> Wants {
        Wants {
            on_request: true,
            on_response: false,
            on_log: false,
            request_body: false,
            response_body: false,
        }
    }

    /// Runs before the upstream is called: edit the request, or answer it with `Action::Respond`.
    fn on_request(&self, _req: &Request) -> Action {
        Action::Continue
    }

    /// Runs when the response arrives (only if `wants().on_response`): the upstream's, a reply
    /// from this plugin or a later one in the chain, or the gateway's own error (no upstream
    /// answer, or a later plugin that failed).
    fn on_response(&self, _req: &Request, _resp: &Response) {}

    /// Runs after the response was sent (only if `wants().on_log`).
    fn on_log(&self, _req: &Request, _summary: &Summary) {}

    /// The bodies this plugin sees chunk by chunk as they stream; by default neither.
    fn chunk_wants(&self) -> ChunkWants {
        ChunkWants {
            request: false,
            response: false,
        }
    }

    /// Runs for each chunk of the request body on its way upstream (only if
    /// `chunk_wants().request`), with what the plugin held joined in front; `end_of_stream` on
    /// the last. State kept across chunks needs `isolation: per-request`, which gives each
    /// request an instance of its own.
    fn on_request_chunk(&self, _chunk: &[u8], _end_of_stream: bool) -> ChunkAction {
        ChunkAction::Pass
    }

    /// Runs for each chunk of the response body on its way to the client (only if
    /// `chunk_wants().response`), as [`Plugin::on_request_chunk`] does for the request's.
    fn on_response_chunk(&self, _chunk: &[u8], _end_of_stream: bool) -> ChunkAction {
        ChunkAction::Pass
    }
}

impl Reply {
    /// A reply with a plain-text body.
    pub fn text(status: u16, body: impl Into<String>) -> Reply {
        Reply {
            status,
            headers: vec![("content-type".into(), "text/plain; charset=utf-8".into())],
            body: body.into().into_bytes(),
        }
    }

    /// A reply whose body is `{"error": message}`, the shape of the gateway's own errors.
    pub fn error(status: u16, message: &str) -> Reply {
        let body = serde_json::json!({ "error": message }).to_string();
        Reply {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.into_bytes(),
        }
    }

    /// Adds a header to the reply.
    pub fn with_header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// The config of a plugin that takes none: any object, or nothing, is accepted.
#[derive(Debug, Default, serde::Deserialize, JsonSchema)]
pub struct NoConfig {}

/// The first value of query parameter `name` (percent- and `+`-decoded), if the query has it.
pub fn query_param(req: &Request, name: &str) -> Option<String> {
    let query = req.query()?;
    form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

/// The value of cookie `name` among the request's `cookie` headers (quotes removed).
pub fn cookie(req: &Request, name: &str) -> Option<String> {
    req.headers()
        .into_iter()
        .filter(|(header, _)| header == "cookie")
        .find_map(|(_, value)| {
            value.split(';').find_map(|pair| {
                let (key, value) = pair.trim().split_once('=')?;
                (key.trim() == name).then(|| value.trim().trim_matches('"').to_owned())
            })
        })
}

/// Writes a line to the gateway's log, tagged with the plugin's name.
pub fn log(level: Level, message: &str) {
    wit::weir::plugin0_1_0::log::write(level, message);
}

/// The plugin's key/value store, shared by all of its instances and namespaced to it.
pub mod kv {
    use crate::wit::weir::plugin0_1_0::kv as raw;
    use std::time::Duration;

    /// Returns the bytes under `key`, if present and not expired.
    pub fn get(key: &str) -> Option<Vec<u8>> {
        raw::get(key)
    }

    /// Returns the value under `key` as text, if present, not expired, and UTF-8.
    pub fn get_string(key: &str) -> Option<String> {
        raw::get(key).and_then(|bytes| String::from_utf8(bytes).ok())
    }

    /// Stores `value` under `key`, expiring after `ttl` (or living until evicted).
    pub fn set(key: &str, value: impl AsRef<[u8]>, ttl: Option<Duration>) {
        raw::set(key, value.as_ref(), ttl.map(millis));
    }

    /// Removes `key`.
    pub fn delete(key: &str) {
        raw::delete(key);
    }

    /// Atomically adds `delta` to the counter under `key`; a new key starts at 0 and takes `ttl`.
    pub fn incr(key: &str, delta: i64, ttl: Option<Duration>) -> Result<i64, String> {
        raw::incr(key, delta, ttl.map(millis))
    }

    /// Whether every gateway on the store shares this kv (the plugin entry says
    /// `kv: {backend: redis}`), so that its counters count across gateways.
    pub fn shared() -> bool {
        crate::wit::weir::plugin0_2_0::kv_scope::shared()
    }

    fn millis(ttl: Duration) -> u64 {
        u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)
    }
}

/// Outbound HTTP calls, to the hosts the plugin's `grants.http` lists.
pub mod http {
    pub use crate::wit::weir::plugin0_1_0::http_client::{IncomingResponse, OutgoingRequest};

    /// Sends a request and waits for the whole response. A host or method the grant does not
    /// list, a timeout, or a response over the grant's size comes back as an error.
    pub fn send(request: &OutgoingRequest) -> Result<IncomingResponse, String> {
        crate::wit::weir::plugin0_1_0::http_client::send(request)
    }

    /// A GET of `url` with no headers.
    pub fn get(url: &str) -> Result<IncomingResponse, String> {
        send(&OutgoingRequest {
            method: "GET".into(),
            url: url.into(),
            headers: Vec::new(),
            body: Vec::new(),
        })
    }
}

/// The consumers the store knows; a plugin needs `grants.consumers` listing the credential
/// sections it may read.
pub mod consumers {
    use crate::Request;
    use crate::wit::weir::plugin0_2_0::consumers as raw;
    pub use raw::Consumer;

    /// Finds the consumer whose `plugin` credential has `field` equal to `value`.
    ///
    /// `Ok(None)` when no consumer has it; an error when the grant does not list `plugin` or
    /// when several consumers share the value (an auth plugin should then refuse).
    pub fn lookup(plugin: &str, field: &str, value: &str) -> Result<Option<Consumer>, String> {
        raw::lookup(plugin, field, value)
    }

    /// Marks the request as made by consumer `name` (in `on_request`); the upstream sees it as
    /// `x-consumer-username`, the access log as `consumer`.
    ///
    /// `name` must have a credential in a section the grant lists (a consumer this plugin could
    /// have found); any other is refused with the same error as a name no consumer has.
    pub fn set(req: &Request, name: &str) -> Result<(), String> {
        raw::set_consumer(req, name)
    }

    /// The consumer an earlier plugin marked the request as made by.
    pub fn current(req: &Request) -> Option<String> {
        raw::current(req)
    }

    /// The `plugin` credential of the request's consumer, as a JSON object (world 0.3.0):
    /// `Ok(None)` without a consumer or without that credential; an error when the grant does
    /// not list `plugin`.
    pub fn credential(req: &Request, plugin: &str) -> Result<Option<String>, String> {
        crate::wit::weir::plugin0_3_0::consumer_credentials::credential(req, plugin)
    }
}

/// Sends the request to the upstream `id` instead of the route's own (in `on_request`).
pub fn set_upstream(req: &Request, id: &str) -> Result<(), String> {
    wit::weir::plugin0_2_0::routing::set_upstream(req, id)
}

pub mod sse;

/// Upstreams to try in turn, each with its own edits of the request (world 0.3.0); needs the
/// `routing` grant.
pub mod fallbacks {
    use crate::Request;
    use crate::wit::weir::plugin0_3_0::fallbacks as raw;
    pub use raw::Target;

    /// Sends the request to `targets` in order (in `on_request`): the next is tried when one
    /// cannot be reached, times out or answers 429 or 5xx, before any byte of its answer has
    /// reached the client.
    pub fn set_targets(req: &Request, targets: &[Target]) -> Result<(), String> {
        raw::set_targets(req, targets)
    }

    /// Which target answered, counting from 0 (in `on_response` and `on_log`).
    pub fn answered_by(req: &Request) -> Option<u32> {
        raw::answered_by(req)
    }
}

/// The AI gateway's metrics (world 0.3.0): the tokens a request's model used, and how soon
/// its first token came; needs the `metrics` grant.
pub mod ai_metrics {
    use crate::Request;
    use crate::wit::weir::plugin0_3_0::ai_metrics as raw;
    pub use raw::ModelUse;

    /// Counts `used` in `weir_ai_tokens_total` and `weir_ai_first_token_seconds`, labelled
    /// with the request's route and consumer.
    pub fn record(req: &Request, used: &ModelUse) -> Result<(), String> {
        raw::record_use(req, used)
    }
}

/// The plugin's own span in the request's trace (world 0.3.0): attributes and events on the
/// span of the call in progress; needs the `tracing` grant. Each returns `Ok(false)` when the
/// request's spans are not recorded, and an error past the bounds (16 attributes, 8 events,
/// 4 KiB per call; names 1 to 256 printable bytes, values at most 256 bytes).
pub mod span {
    use crate::Request;
    use crate::wit::weir::plugin0_3_0::tracing as raw;

    /// Sets attribute `key` to `value` on this call's span.
    pub fn set_attribute(req: &Request, key: &str, value: &str) -> Result<bool, String> {
        raw::set_attribute(req, key, value)
    }

    /// Adds event `name`, now, with `attributes`, to this call's span.
    pub fn add_event(
        req: &Request,
        name: &str,
        attributes: &[(&str, &str)],
    ) -> Result<bool, String> {
        let attributes: Vec<(String, String)> = attributes
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        raw::add_event(req, name, &attributes)
    }
}

/// Response headers set from `on_request`, applied when the response arrives (upstream answer,
/// plugin reply or gateway error alike), so that a plugin needs no `on_response` for them.
pub mod response {
    use crate::Request;
    use crate::wit::weir::plugin0_2_0::response_edits as raw;

    /// Sets response header `name` to `value`, replacing any values it had.
    pub fn set_header(req: &Request, name: &str, value: &str) -> Result<(), String> {
        raw::set_response_header(req, name, value)
    }

    /// Adds a value to response header `name`.
    pub fn append_header(req: &Request, name: &str, value: &str) -> Result<(), String> {
        raw::append_response_header(req, name, value)
    }

    /// Removes every value of response header `name`.
    pub fn remove_header(req: &Request, name: &str) -> Result<(), String> {
        raw::remove_response_header(req, name)
    }
}

/// Adds `value` to the plugin's counter `name`, exported as `weir_plugin_events_total`.
pub fn counter_add(name: &str, value: u64) {
    wit::weir::plugin0_1_0::metrics::counter_add(name, value);
}

/// Milliseconds since the Unix epoch, from the gateway's clock.
pub fn now_ms() -> u64 {
    wit::weir::plugin0_1_0::clock::now_ms()
}

/// Glue between the generated `Guest` trait and [`Plugin`]; used by [`export_plugin!`].
#[doc(hidden)]
pub mod __private {
    use super::*;
    use crate::wit::exports::weir::plugin0_1_0::filter::Guest;
    use crate::wit::exports::weir::plugin0_2_0::describe::{Guest as Describe, PluginInfo};
    use crate::wit::exports::weir::plugin0_3_0::chunks::Guest as Chunks;

    /// Ties an exported type to the plugin type and the instance's one plugin value.
    pub trait Exported: 'static {
        /// The user's plugin type.
        type Plugin: Plugin;
        /// The plugin crate's name.
        const NAME: &'static str;
        /// The plugin crate's version.
        const VERSION: &'static str;
        /// Where this instance keeps its plugin value.
        fn slot() -> &'static OnceLock<Self::Plugin>;
    }

    fn plugin<E: Exported>() -> &'static E::Plugin {
        // The host calls `init` before any phase; a phase without it is a host bug.
        E::slot()
            .get()
            .expect("weir host called a phase before init")
    }

    impl<E: Exported> Guest for E {
        fn init(config: String) -> Result<Wants, String> {
            let config = if config.trim().is_empty() {
                "{}"
            } else {
                config.as_str()
            };
            let parsed: <E::Plugin as Plugin>::Config =
                serde_json::from_str(config).map_err(|e| format!("invalid config: {e}"))?;
            let plugin = E::Plugin::new(parsed)?;
            let wants = plugin.wants();
            E::slot()
                .set(plugin)
                .map_err(|_| "init called twice on one instance".to_string())?;
            Ok(wants)
        }

        fn on_request(req: &Request) -> Action {
            plugin::<E>().on_request(req)
        }

        fn on_response(req: &Request, resp: &Response) {
            plugin::<E>().on_response(req, resp)
        }

        fn on_log(req: &Request, summary: Summary) {
            plugin::<E>().on_log(req, &summary)
        }
    }

    impl<E: Exported> Chunks for E {
        fn wants_chunks() -> ChunkWants {
            plugin::<E>().chunk_wants()
        }

        fn on_request_chunk(chunk: Vec<u8>, end_of_stream: bool) -> ChunkAction {
            plugin::<E>().on_request_chunk(&chunk, end_of_stream)
        }

        fn on_response_chunk(chunk: Vec<u8>, end_of_stream: bool) -> ChunkAction {
            plugin::<E>().on_response_chunk(&chunk, end_of_stream)
        }
    }

    impl<E: Exported> Describe for E {
        fn describe() -> PluginInfo {
            let schema = schemars::schema_for!(<E::Plugin as Plugin>::Config);
            PluginInfo {
                name: E::NAME.into(),
                version: E::VERSION.into(),
                config_schema: serde_json::to_string(&schema).unwrap_or_default(),
            }
        }
    }
}

/// Exports a [`Plugin`] type as the component's filter.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        #[doc(hidden)]
        struct __WeirExport;

        impl $crate::__private::Exported for __WeirExport {
            type Plugin = $plugin;
            const NAME: &'static str = env!("CARGO_PKG_NAME");
            const VERSION: &'static str = env!("CARGO_PKG_VERSION");
            fn slot() -> &'static ::std::sync::OnceLock<$plugin> {
                static SLOT: ::std::sync::OnceLock<$plugin> = ::std::sync::OnceLock::new();
                &SLOT
            }
        }

        $crate::wit::export_bindings!(__WeirExport with_types_in $crate::wit);
    };
}
