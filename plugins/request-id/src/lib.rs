//! request-id: gives every request an id header, sends it upstream and back to the client.

use serde::Deserialize;
use weir_sdk::{Action, Plugin, Request, Wants, schemars};

/// `{}` or `{"header": "x-trace-id"}`.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_header")]
    header: String,
}

fn default_header() -> String {
    "x-request-id".into()
}

struct RequestId {
    header: String,
}

impl Plugin for RequestId {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        let header = config.header.trim().to_ascii_lowercase();
        if header.is_empty()
            || !header
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(format!(
                "header {:?} is not a valid header name",
                config.header
            ));
        }
        Ok(RequestId { header })
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

    fn on_request(&self, req: &Request) -> Action {
        // Each host call costs a crossing into the gateway: the id is read once.
        let id = match req.header(&self.header) {
            // The client's id wins, so that its logs and ours correlate; the gateway keeps its
            // own if the client's is unusable, so the id is read back.
            Some(id) if !id.is_empty() => {
                req.set_id(&id);
                req.id()
            }
            _ => {
                let id = req.id();
                // The header name was checked in `new`, and the gateway's id is always a valid value.
                let _ = req.set_header(&self.header, &id);
                id
            }
        };
        // Queued for whatever is answered: the upstream's response, a reply, or an error.
        let _ = weir_sdk::response::set_header(req, &self.header, &id);
        Action::Continue
    }
}

weir_sdk::export_plugin!(RequestId);
