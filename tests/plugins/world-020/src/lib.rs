//! world-020: a plugin built against `weir:plugin@0.2.0` with wit-bindgen alone, as a plugin
//! of that release was, so that the tests show a 0.2.0 component still loads and serves beside
//! newer ones. It queues the response header `x-world: 0.2.0` (0.2.0's `response-edits`) and
//! appends `0.2.0` to the request header `x-chain`.

#![allow(unsafe_code, missing_docs)]

wit_bindgen::generate!({
    path: "../../../wit",
    world: "weir:plugin/plugin@0.2.0",
    generate_all,
});

use exports::weir::plugin0_1_0::filter::{Guest, Wants};
use exports::weir::plugin0_2_0::describe::{Guest as Describe, PluginInfo};
use weir::plugin0_1_0::http::{Action, Request, Response, Summary};

struct World020;

impl Guest for World020 {
    fn init(_config: String) -> Result<Wants, String> {
        Ok(Wants {
            on_request: true,
            on_response: false,
            on_log: false,
            request_body: false,
            response_body: false,
        })
    }

    fn on_request(req: &Request) -> Action {
        let chain = match req.header("x-chain") {
            Some(chain) if !chain.is_empty() => format!("{chain},0.2.0"),
            _ => "0.2.0".to_owned(),
        };
        let _ = req.set_header("x-chain", &chain);
        let _ = weir::plugin0_2_0::response_edits::set_response_header(req, "x-world", "0.2.0");
        Action::Continue
    }

    fn on_response(_req: &Request, _resp: &Response) {}

    fn on_log(_req: &Request, _summary: Summary) {}
}

impl Describe for World020 {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "world-020".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            config_schema: r#"{"type": "object"}"#.into(),
        }
    }
}

export!(World020);
