//! limit-count: at most `count` requests per `window_s` seconds for each key (the client's
//! address, a header, the route, or several of these together), counted in fixed windows in
//! the plugin's kv.

use std::time::Duration;

use limit_key::{KeySpec, LimitKey};
use serde::Deserialize;
use weir_sdk::{Action, Plugin, Reply, Request, Wants, kv, response, schemars};

/// `{"count": 100, "window_s": 60, "key": "ip"}`.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Requests allowed per window.
    count: u64,
    /// The window's length in seconds.
    window_s: u64,
    /// What is counted: `ip`, `route`, `header:NAME`, or a list of these (counted together).
    #[serde(default)]
    key: KeySpec,
    /// Routes that name the same group share one counter; by default each route has its own.
    #[serde(default)]
    group: Option<String>,
    /// The status of a refused request.
    #[serde(default = "default_rejected_code")]
    rejected_code: u16,
    /// The message of a refused request.
    #[serde(default = "default_rejected_msg")]
    rejected_msg: String,
    /// `local`: counted on this gateway, in its memory. `cluster`: counted across every
    /// gateway, on the Redis server the plugin entry's `kv: {backend: redis}` names. By default,
    /// whichever the entry's kv is.
    #[serde(default)]
    policy: Option<Policy>,
    /// Send the `X-RateLimit-*` and `RateLimit*` headers (on by default).
    #[serde(default = "yes")]
    show_limit_headers: bool,
    /// `fixed` windows, or `sliding`: the previous window's count, weighted by how much of it
    /// the sliding window still covers, counts too.
    #[serde(default)]
    window_type: WindowType,
}

#[derive(Clone, Copy, Debug, Deserialize, schemars::JsonSchema, PartialEq)]
#[serde(rename_all = "snake_case")]
enum Policy {
    Local,
    Cluster,
}

#[derive(Clone, Copy, Default, Deserialize, schemars::JsonSchema, PartialEq)]
#[serde(rename_all = "snake_case")]
enum WindowType {
    #[default]
    Fixed,
    Sliding,
}

fn default_rejected_code() -> u16 {
    429
}

fn default_rejected_msg() -> String {
    "too many requests".into()
}

fn yes() -> bool {
    true
}

struct LimitCount {
    count: u64,
    window_s: u64,
    key: LimitKey,
    group: Option<String>,
    rejected_code: u16,
    rejected_msg: String,
    show_limit_headers: bool,
    window_type: WindowType,
}

/// The longest window: a day.
const MAX_WINDOW_S: u64 = 86_400;

impl LimitCount {
    /// The counter's key for `req` in the window that starts at `window_start`.
    fn counter(&self, req: &Request, window_start: u64) -> String {
        let mut key = match &self.group {
            Some(group) => format!("g:{group}"),
            None => format!("r:{}", req.route_id()),
        };
        key.push_str(&format!("|{window_start}"));
        key.push_str(&self.key.of(req));
        key
    }

    /// The limit headers for `remaining` requests left and `reset` seconds to the window's end.
    fn headers(&self, remaining: u64, reset: u64) -> Vec<(String, String)> {
        if !self.show_limit_headers {
            return Vec::new();
        }
        vec![
            ("x-ratelimit-limit".into(), self.count.to_string()),
            ("x-ratelimit-remaining".into(), remaining.to_string()),
            ("x-ratelimit-reset".into(), reset.to_string()),
            (
                "ratelimit-policy".into(),
                format!("{};w={}", self.count, self.window_s),
            ),
            (
                "ratelimit".into(),
                format!("limit={}, remaining={remaining}, reset={reset}", self.count),
            ),
        ]
    }
}

impl Plugin for LimitCount {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        if config.count == 0 {
            return Err("`count` must be at least 1".into());
        }
        if !(1..=MAX_WINDOW_S).contains(&config.window_s) {
            return Err(format!("`window_s` must be in 1..={MAX_WINDOW_S}"));
        }
        if !(200..=599).contains(&config.rejected_code) {
            return Err("`rejected_code` must be a status in 200..=599".into());
        }
        // The counters are wherever the entry's kv is, so a policy that says otherwise would
        // count in a way the operator did not ask for.
        match (config.policy, kv::shared()) {
            (Some(Policy::Cluster), false) => {
                return Err(
                    "policy `cluster` counts across gateways on Redis, but this \
                     plugin entry's kv is this gateway's memory: give the entry \
                     `kv: {backend: redis}` and set `server.redis_url`"
                        .into(),
                );
            }
            (Some(Policy::Local), true) => {
                return Err(
                    "policy `local` counts on this gateway, but this plugin entry's kv \
                     is on Redis and shared by every gateway: say `policy: cluster`, or use \
                     an entry without `kv: {backend: redis}`"
                        .into(),
                );
            }
            _ => {}
        }
        let key = LimitKey::parse(config.key)?;
        Ok(LimitCount {
            count: config.count,
            window_s: config.window_s,
            key,
            group: config.group,
            rejected_code: config.rejected_code,
            rejected_msg: config.rejected_msg,
            show_limit_headers: config.show_limit_headers,
            window_type: config.window_type,
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
        let now_ms = weir_sdk::now_ms();
        let window_ms = self.window_s * 1000;
        let window_start = now_ms / 1000 / self.window_s * self.window_s;
        let into_window_ms = now_ms - window_start * 1000;
        let reset = (window_ms - into_window_ms).div_ceil(1000);
        let key = self.counter(req, window_start);
        // A counter outlives its window (by one more window when it will be read as the
        // previous one), so that a late request never restarts it.
        let keep = match self.window_type {
            WindowType::Fixed => reset + 1,
            WindowType::Sliding => reset + self.window_s + 1,
        };
        let counted = match kv::incr(&key, 1, Some(Duration::from_secs(keep))) {
            Ok(counted) => u64::try_from(counted).unwrap_or(0),
            // The kv is full or failing: the plugin's failure policy is the operator's choice,
            // so fail the call rather than guess.
            Err(error) => panic!("limit-count: the counter failed: {error}"),
        };
        let used = match self.window_type {
            WindowType::Fixed => counted,
            WindowType::Sliding => {
                let previous = self.counter(req, window_start.saturating_sub(self.window_s));
                let before = kv::get_string(&previous)
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0);
                // The share of the previous window the sliding window still covers.
                let weight = window_ms - into_window_ms;
                counted + (before * weight).div_ceil(window_ms)
            }
        };
        if used > self.count {
            // Only requests let through count, so a client that keeps retrying is not held
            // off longer than the limit says.
            let _ = kv::incr(&key, -1, None);
            let mut reply = Reply::error(self.rejected_code, &self.rejected_msg)
                .with_header("retry-after", &reset.to_string());
            for (name, value) in self.headers(0, reset) {
                reply = reply.with_header(&name, &value);
            }
            return Action::Respond(reply);
        }
        // Queued for the answer, whoever gives it; no on-response call.
        for (name, value) in self.headers(self.count.saturating_sub(used), reset) {
            let _ = response::set_header(req, &name, &value);
        }
        Action::Continue
    }
}

weir_sdk::export_plugin!(LimitCount);
