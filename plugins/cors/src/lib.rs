//! cors: answers browsers' preflight requests and marks responses for allowed origins, with
//! APISIX `cors`'s fields.

use regex::Regex;
use serde::Deserialize;
use weir_sdk::{Action, Plugin, Reply, Request, Wants, response, schemars};

/// `{"allow_origins": "https://app.example.com", "allow_credential": true}`.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct Config {
    /// `*` (any origin), `**` (any, even with credentials), or a comma-separated list of
    /// origins such as `https://a.example.com,https://b.example.com:8443`.
    #[serde(default = "star")]
    allow_origins: String,
    /// Origins that match any of these patterns are allowed too.
    #[serde(default)]
    allow_origins_by_regex: Vec<String>,
    /// `*`, or a comma-separated list of methods.
    #[serde(default = "star")]
    allow_methods: String,
    /// `*` (whatever the preflight asks for), or a comma-separated list.
    #[serde(default = "star")]
    allow_headers: String,
    /// Response headers a page may read, comma-separated.
    #[serde(default)]
    expose_headers: String,
    /// Seconds a browser may cache a preflight's answer.
    #[serde(default = "five")]
    max_age: u32,
    /// Whether requests with credentials (cookies) are allowed.
    #[serde(default)]
    allow_credential: bool,
}

fn star() -> String {
    "*".into()
}

fn five() -> u32 {
    5
}

/// Which origins are allowed.
enum Origins {
    /// `*`: any, answered with `*`.
    Any,
    /// `**`: any, answered with the origin itself (so credentials work).
    AnyEchoed,
    /// These exact origins, or these patterns.
    Listed(Vec<String>, Vec<Regex>),
}

struct Cors {
    origins: Origins,
    methods: String,
    headers: Option<String>,
    expose: String,
    max_age: String,
    credentials: bool,
}

const ALL_METHODS: &str = "GET,POST,PUT,DELETE,PATCH,HEAD,OPTIONS,CONNECT,TRACE";

/// A comma-separated list, trimmed, without empty items.
fn list(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(str::to_owned)
        .collect()
}

impl Cors {
    /// The `Access-Control-Allow-Origin` value for `origin`, if it is allowed.
    fn allow(&self, origin: &str) -> Option<String> {
        match &self.origins {
            Origins::Any => Some("*".into()),
            Origins::AnyEchoed => Some(origin.to_owned()),
            Origins::Listed(exact, patterns) => {
                let allowed = exact.iter().any(|o| o.eq_ignore_ascii_case(origin))
                    || patterns.iter().any(|p| p.is_match(origin));
                allowed.then(|| origin.to_owned())
            }
        }
    }
}

impl Plugin for Cors {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        let origins = match config.allow_origins.trim() {
            "*" => Origins::Any,
            "**" => Origins::AnyEchoed,
            listed => {
                let exact = list(listed);
                for origin in &exact {
                    if !(origin.starts_with("http://") || origin.starts_with("https://"))
                        || origin
                            .trim_start_matches("http://")
                            .trim_start_matches("https://")
                            .contains('/')
                    {
                        return Err(format!(
                            "origin {origin:?} is not scheme://host[:port] (http or https)"
                        ));
                    }
                }
                let patterns = config
                    .allow_origins_by_regex
                    .iter()
                    .map(|p| {
                        if p.len() > 1024 {
                            return Err("an origin pattern is over 1024 bytes".to_owned());
                        }
                        // Anchored, so `example\.com` cannot match `example.com.evil.test`.
                        Regex::new(&format!("^(?:{p})$"))
                            .map_err(|e| format!("`allow_origins_by_regex` {p:?}: {e}"))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                if exact.is_empty() && patterns.is_empty() {
                    return Err("`allow_origins` lists no origin".into());
                }
                Origins::Listed(exact, patterns)
            }
        };
        if config.allow_credential && matches!(origins, Origins::Any) {
            return Err(
                "`allow_credential` with `allow_origins: \"*\"` is refused by browsers; use `**` or list the origins"
                    .into(),
            );
        }
        let methods = match config.allow_methods.trim() {
            "*" => ALL_METHODS.to_owned(),
            listed => list(listed).join(","),
        };
        let headers = match config.allow_headers.trim() {
            "*" => None,
            listed => Some(list(listed).join(",")),
        };
        Ok(Cors {
            origins,
            methods,
            headers,
            expose: list(&config.expose_headers).join(","),
            max_age: config.max_age.to_string(),
            credentials: config.allow_credential,
        })
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
        let Some(origin) = req.header("origin") else {
            return Action::Continue;
        };
        let allowed = self.allow(&origin);
        let preflight =
            req.method() == "OPTIONS" && req.header("access-control-request-method").is_some();
        if !preflight {
            // Queued for the answer, whoever gives it (the upstream, a later plugin, or the
            // gateway's own error), so that the browser can read it; no on-response call.
            if let Some(allowed) = allowed {
                let _ = response::set_header(req, "access-control-allow-origin", &allowed);
                let _ = response::append_header(req, "vary", "Origin");
                if !self.expose.is_empty() {
                    let _ =
                        response::set_header(req, "access-control-expose-headers", &self.expose);
                }
                if self.credentials {
                    let _ = response::set_header(req, "access-control-allow-credentials", "true");
                }
            }
            return Action::Continue;
        }
        // A preflight is answered here, allowed or not; without the headers the browser stops.
        let mut reply = Reply::text(200, "").with_header("vary", "Origin");
        if let Some(allowed) = allowed {
            let headers = self.headers.clone().unwrap_or_else(|| {
                req.header("access-control-request-headers")
                    .unwrap_or_default()
            });
            reply = reply
                .with_header("access-control-allow-origin", &allowed)
                .with_header("access-control-allow-methods", &self.methods)
                .with_header("access-control-max-age", &self.max_age);
            if !headers.is_empty() {
                reply = reply.with_header("access-control-allow-headers", &headers);
            }
            if self.credentials {
                reply = reply.with_header("access-control-allow-credentials", "true");
            }
        }
        Action::Respond(reply)
    }
}

weir_sdk::export_plugin!(Cors);
