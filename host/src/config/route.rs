//! Routes: which requests they match, where they go, and the plugins they pass through.

use serde::{Deserialize, Serialize};

use super::{Checks, ConfigObject, Isolation, Kind, check_id, check_method, checked_serde};

/// A route: which requests it matches, where they go, and the plugins they pass through.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct RouteConfig {
    /// `id: api`
    pub id: String,
    /// `uri: /api/*`: an exact path, a prefix ending in `/*`, or a pattern with `{param}`s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    /// `uris: [/a, /b/*]`: several paths for one route.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uris: Vec<String>,
    /// `methods: [GET, POST]`: any method when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// `hosts: [api.example.com, "*.example.com"]`: any host when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// `priority: 10`: among routes with the same path, the higher wins.
    #[serde(default)]
    pub priority: i32,
    /// `upstream_id: backend`
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_id: Option<String>,
    /// `service: user-svc`, or `"*"` to take the service from the first path segment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// `strip_prefix: true` removes the route's literal prefix; `strip_prefix: /api` removes that.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strip_prefix: Option<StripPrefix>,
    /// `plugins: [{name: key-auth, config: {..}}]`, run in this order.
    #[serde(default)]
    pub plugins: Vec<PluginRef>,
    /// `path_normalization: off` sends the client's raw path upstream instead of its normal
    /// form, and lets through encoded slashes and backslashes; the route is still matched on
    /// the normal form. For backends that need `%2F` kept; see docs/security.md for the risk.
    #[serde(default, skip_serializing_if = "PathNormalization::is_on")]
    pub path_normalization: PathNormalization,
    /// `status: disabled` answers 404 as if the route were absent, and keeps it stored.
    #[serde(default, skip_serializing_if = "RouteStatus::is_enabled")]
    pub status: RouteStatus,
    /// `websocket: true` forwards `Upgrade` requests (WebSocket and others) and splices the
    /// connections after the upstream's 101. Elsewhere an upgrade request goes upstream as a
    /// plain request, without its upgrade headers.
    #[serde(default, skip_serializing_if = "super::is_false")]
    pub websocket: bool,
    /// `grpc_web: true` translates browsers' gRPC-Web requests (`application/grpc-web`,
    /// `application/grpc-web+proto`) to gRPC for the upstream, and the answers back.
    #[serde(default, skip_serializing_if = "super::is_false")]
    pub grpc_web: bool,
    /// `request_trailers: [x-checksum]`: the request trailers the upstream may see besides
    /// `grpc-*`; a client's other trailers are dropped. The gateway's own headers
    /// (`x-consumer-*`, `x-forwarded-*`, ...) and hop-by-hop ones cannot be allowed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_trailers: Vec<String>,
}

/// Whether a route serves: the dashboard's switch per route.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum RouteStatus {
    /// It serves (the default).
    #[default]
    Enabled,
    /// It answers 404, as if absent.
    Disabled,
}

impl RouteStatus {
    fn is_enabled(&self) -> bool {
        *self == RouteStatus::Enabled
    }
}

/// Whether a route's upstream gets the normal form of the path.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum PathNormalization {
    /// The normal form (the default).
    #[default]
    On,
    /// The path as the client sent it.
    Off,
}

impl PathNormalization {
    fn is_on(&self) -> bool {
        *self == PathNormalization::On
    }
}

/// How much of the path to remove before the request goes upstream.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum StripPrefix {
    /// `true`: the matched pattern's literal prefix, such as `/api` for `/api/*`.
    Route(bool),
    /// `/api`: exactly this prefix.
    Literal(String),
}

/// One plugin in a route's chain.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PluginRef {
    /// `name: key-auth`: a plugin entry's name.
    pub name: String,
    /// `config: {keys: [..]}`: passed as JSON to the plugin's `init`.
    #[serde(default = "empty_object")]
    pub config: serde_json::Value,
    /// `isolation: per-request`: overrides the plugin entry's isolation on this route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isolation: Option<Isolation>,
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}

checked_serde!(RouteConfig);

impl RouteConfig {
    /// Every path pattern of the route, `uri` first.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.uri.iter().chain(self.uris.iter()).map(String::as_str)
    }
}

impl ConfigObject for RouteConfig {
    const KIND: Kind = Kind::Route;

    fn deserialize_unchecked<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        RouteConfig::deserialize(d)
    }

    fn id(&self) -> &str {
        &self.id
    }

    fn check(&self, checks: &mut Checks) {
        checks.check("/id", check_id(&self.id));
        if self.paths().next().is_none() {
            checks.fail("/uri", "set `uri` or `uris`");
        }
        if let Some(uri) = &self.uri {
            checks.check("/uri", check_path_pattern(uri));
        }
        for (index, path) in self.uris.iter().enumerate() {
            checks.check(format!("/uris/{index}"), check_path_pattern(path));
        }
        for (index, method) in self.methods.iter().enumerate() {
            checks.check(format!("/methods/{index}"), check_method(method));
        }
        for (index, host) in self.hosts.iter().enumerate() {
            let bare = host.strip_prefix("*.").unwrap_or(host);
            if bare.is_empty()
                || !bare
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            {
                checks.fail(
                    format!("/hosts/{index}"),
                    format!("host {host:?} is not a host name"),
                );
            } else if bare.ends_with('.') {
                // Requests are matched without their trailing dot: this could never match.
                checks.fail(
                    format!("/hosts/{index}"),
                    format!("host {host:?} never matches: write it without the trailing dot"),
                );
            }
        }
        match (&self.upstream_id, &self.service) {
            (Some(_), Some(_)) => checks.fail("", "set `upstream_id` or `service`, not both"),
            (None, None) => checks.fail("", "set `upstream_id` or `service`"),
            (Some(id), None) => checks.check("/upstream_id", check_id(id)),
            (None, Some(service)) if service.is_empty() => {
                checks.fail("/service", "`service` is empty")
            }
            (None, Some(_)) => {}
        }
        if let Some(StripPrefix::Literal(prefix)) = &self.strip_prefix
            && (!prefix.starts_with('/') || prefix.len() < 2)
        {
            checks.fail(
                "/strip_prefix",
                format!("strip_prefix {prefix:?} must start with / and name a segment"),
            );
        }
        for (index, name) in self.request_trailers.iter().enumerate() {
            let refusal = match http::HeaderName::from_bytes(name.as_bytes()) {
                Err(_) => Some("it is not a header name"),
                Ok(header) => crate::edge::trailers::refused_trailer(&header),
            };
            if let Some(reason) = refusal {
                checks.fail(
                    format!("/request_trailers/{index}"),
                    format!("request trailer {name:?} cannot be allowed: {reason}"),
                );
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (index, plugin) in self.plugins.iter().enumerate() {
            if plugin.name.is_empty() {
                checks.fail(
                    format!("/plugins/{index}/name"),
                    "a plugin in `plugins` has no name",
                );
            } else if !seen.insert(plugin.name.as_str()) {
                checks.fail(
                    format!("/plugins/{index}/name"),
                    format!("plugin {:?} is listed twice", plugin.name),
                );
            }
        }
    }
}

/// A path pattern is `/exact`, `/prefix/*` or `/a/{param}/b`, with no empty `{}`, written in
/// the normal form requests are matched in (no `//`, dot segments or needless escapes).
fn check_path_pattern(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("uri {path:?} must start with /"));
    }
    if !path.is_ascii() {
        return Err(format!(
            "uri {path:?}: write characters outside ASCII percent-encoded (é is %C3%A9)"
        ));
    }
    match crate::edge::normalise::normalise(path) {
        Ok(normal) if normal.raw_only.is_none() && normal.path == path => {}
        Ok(normal) if normal.raw_only.is_none() => {
            return Err(format!(
                "uri {path:?} never matches: requests are matched in normal form; write {:?}",
                normal.path
            ));
        }
        Ok(normal) => {
            return Err(format!(
                "uri {path:?}: {}",
                normal.raw_only.expect("checked above")
            ));
        }
        Err(error) => return Err(format!("uri {path:?}: {error}")),
    }
    if path.contains(['?', '#']) {
        return Err(format!("uri {path:?} must not hold a query or fragment"));
    }
    let body = path.strip_suffix("/*").unwrap_or(path);
    if body.contains('*') {
        return Err(format!(
            "uri {path:?}: `*` may only end a prefix, as in /api/*"
        ));
    }
    for segment in body.split('/') {
        let opens = segment.matches('{').count();
        let closes = segment.matches('}').count();
        if opens != closes || opens > 1 {
            return Err(format!("uri {path:?}: unbalanced or repeated {{param}}"));
        }
        if opens == 1 {
            let inner = segment
                .strip_prefix('{')
                .and_then(|s| s.strip_suffix('}'))
                .ok_or_else(|| format!("uri {path:?}: a {{param}} must fill its whole segment"))?;
            if inner.is_empty()
                || !inner
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_')
            {
                return Err(format!("uri {path:?}: bad parameter name {inner:?}"));
            }
        }
    }
    Ok(())
}
