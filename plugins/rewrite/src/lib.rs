//! rewrite: changes the path, host or method before the request goes upstream; the seed's
//! regex URI rewrite, with APISIX's `proxy-rewrite` fields.

use regex::Regex;
use serde::Deserialize;
use weir_sdk::{Action, Plugin, Reply, Request, schemars};

/// `{"regex_uri": ["^/api/v1/(.*)", "/$1"], "host": "backend.internal", "method": "POST"}`.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct Config {
    /// `[pattern, replacement]`: the path, where the pattern matches, becomes the replacement
    /// (`$1`, `${name}` name the captures).
    #[serde(default)]
    regex_uri: Option<Vec<String>>,
    /// A fixed new path; it wins over `regex_uri`.
    #[serde(default)]
    uri: Option<String>,
    /// The `Host` the upstream hears.
    #[serde(default)]
    host: Option<String>,
    /// The method the upstream hears.
    #[serde(default)]
    method: Option<String>,
}

struct Rewrite {
    regex_uri: Option<(Regex, String)>,
    uri: Option<String>,
    host: Option<String>,
    method: Option<String>,
}

/// The longest pattern accepted: a config is not a place for a program.
const MAX_PATTERN: usize = 1024;

const METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "TRACE", "PATCH",
];

impl Plugin for Rewrite {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        let regex_uri = match config.regex_uri {
            None => None,
            Some(pair) => {
                let [pattern, replacement]: [String; 2] = pair
                    .try_into()
                    .map_err(|_| "`regex_uri` must be [pattern, replacement]".to_owned())?;
                if pattern.len() > MAX_PATTERN {
                    return Err(format!(
                        "the `regex_uri` pattern is over {MAX_PATTERN} bytes"
                    ));
                }
                let regex =
                    Regex::new(&pattern).map_err(|e| format!("`regex_uri` pattern: {e}"))?;
                if !replacement.starts_with('/') {
                    return Err("the `regex_uri` replacement must start with /".into());
                }
                Some((regex, replacement))
            }
        };
        if let Some(uri) = &config.uri
            && !uri.starts_with('/')
        {
            return Err("`uri` must start with /".into());
        }
        if let Some(method) = &config.method
            && !METHODS.contains(&method.as_str())
        {
            return Err(format!(
                "`method` {method:?} is not one of {}",
                METHODS.join(", ")
            ));
        }
        if let Some(host) = &config.host
            && (host.is_empty() || host.contains(['/', ' ', '@']))
        {
            return Err(format!("`host` {host:?} is not a host"));
        }
        if regex_uri.is_none()
            && config.uri.is_none()
            && config.host.is_none()
            && config.method.is_none()
        {
            return Err("set at least one of `regex_uri`, `uri`, `host`, `method`".into());
        }
        Ok(Rewrite {
            regex_uri,
            uri: config.uri,
            host: config.host,
            method: config.method,
        })
    }

    fn on_request(&self, req: &Request) -> Action {
        let path = match (&self.uri, &self.regex_uri) {
            (Some(uri), _) => Some(uri.clone()),
            (None, Some((regex, replacement))) => {
                let path = req.path();
                regex
                    .is_match(&path)
                    .then(|| regex.replace(&path, replacement.as_str()).into_owned())
            }
            (None, None) => None,
        };
        if let Some(path) = path
            && let Err(error) = req.set_path(&path)
        {
            // The replacement made something that is not a path: a config mistake that only
            // some requests reveal.
            return Action::Respond(Reply::error(
                500,
                &format!("rewrite made an invalid path: {error}"),
            ));
        }
        if let Some(host) = &self.host
            && let Err(error) = req.set_header("host", host)
        {
            return Action::Respond(Reply::error(500, &format!("rewrite: host: {error}")));
        }
        if let Some(method) = &self.method
            && let Err(error) = req.set_method(method)
        {
            return Action::Respond(Reply::error(500, &format!("rewrite: method: {error}")));
        }
        Action::Continue
    }
}

weir_sdk::export_plugin!(Rewrite);
