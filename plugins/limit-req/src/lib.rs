//! limit-req: a rate with a burst for each key, by the generic cell rate algorithm (GCRA, the
//! leaky bucket as a virtual schedule): requests beyond the burst are refused at once.

use std::time::Duration;

use limit_key::{KeySpec, LimitKey};
use serde::Deserialize;
use weir_sdk::{Action, Plugin, Reply, Request, kv, schemars};

/// `{"rate": 10, "burst": 20, "key": "ip"}`.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Requests per second, on average.
    rate: f64,
    /// Requests allowed beyond the rate, in a burst.
    #[serde(default)]
    burst: u32,
    /// What is limited: `ip`, `route`, `header:NAME`, or a list of these.
    #[serde(default)]
    key: KeySpec,
    /// The status of a refused request (APISIX's default, 503).
    #[serde(default = "default_rejected_code")]
    rejected_code: u16,
    /// The message of a refused request.
    #[serde(default = "default_rejected_msg")]
    rejected_msg: String,
    /// Refuse excess at once. `false` (delay excess requests until their turn) needs a host
    /// timer that plugins do not have yet, so it is refused.
    #[serde(default = "yes")]
    nodelay: bool,
}

fn default_rejected_code() -> u16 {
    503
}

fn default_rejected_msg() -> String {
    "too many requests".into()
}

fn yes() -> bool {
    true
}

struct LimitReq {
    /// The time one request's share of the rate takes, in µs.
    interval_us: u64,
    /// How far ahead of now the schedule may run: the burst, in µs.
    tolerance_us: u64,
    key: LimitKey,
    rejected_code: u16,
    rejected_msg: String,
}

/// The slowest rate: one request a day.
const MIN_RATE: f64 = 1.0 / 86_400.0;
/// The fastest rate: a million a second.
const MAX_RATE: f64 = 1_000_000.0;

impl Plugin for LimitReq {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        if !(MIN_RATE..=MAX_RATE).contains(&config.rate) {
            return Err(format!(
                "`rate` must be in {MIN_RATE:e}..={MAX_RATE} per second"
            ));
        }
        if !(200..=599).contains(&config.rejected_code) {
            return Err("`rejected_code` must be a status in 200..=599".into());
        }
        if !config.nodelay {
            return Err(
                "`nodelay: false` (delaying excess requests) is not supported yet; excess is refused"
                    .into(),
            );
        }
        let interval_us = ((1_000_000.0 / config.rate) as u64).max(1);
        Ok(LimitReq {
            interval_us,
            tolerance_us: interval_us.saturating_mul(u64::from(config.burst)),
            key: LimitKey::parse(config.key)?,
            rejected_code: config.rejected_code,
            rejected_msg: config.rejected_msg,
        })
    }

    fn on_request(&self, req: &Request) -> Action {
        let now_us = weir_sdk::now_ms().saturating_mul(1000);
        let key = format!("r:{}{}", req.route_id(), self.key.of(req));
        // The key holds the theoretical arrival time (TAT) of the next request, in µs. It
        // moves forward atomically by one interval per request, so concurrent instances never
        // let the same slot through twice.
        let keep = Duration::from_micros(self.tolerance_us + self.interval_us)
            .max(Duration::from_secs(3600));
        let advanced = match kv::incr(&key, self.interval_us as i64, Some(keep)) {
            Ok(tat) => u64::try_from(tat).unwrap_or(0),
            Err(error) => panic!("limit-req: the schedule failed: {error}"),
        };
        let tat = advanced - self.interval_us;
        if tat < now_us {
            // The bucket had drained: the schedule restarts from now. Two requests that both
            // find it drained at once may both restart it; each is one request.
            kv::set(&key, (now_us + self.interval_us).to_string(), Some(keep));
            return Action::Continue;
        }
        if tat - now_us > self.tolerance_us {
            let _ = kv::incr(&key, -(self.interval_us as i64), None);
            let wait_s = (tat - now_us - self.tolerance_us).div_ceil(1_000_000);
            return Action::Respond(
                Reply::error(self.rejected_code, &self.rejected_msg)
                    .with_header("retry-after", &wait_s.max(1).to_string()),
            );
        }
        Action::Continue
    }
}

weir_sdk::export_plugin!(LimitReq);
