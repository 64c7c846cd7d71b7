//! The dashboard's charts' data: a fixed window of samples the gateway takes of its own request
//! and plugin metrics on a timer, kept as one point per interval (requests, status classes,
//! latency percentiles; plugin calls, failures and call time).
//!
//! Each sample reads the cumulative counters and histograms of [`Metrics`] (`requests`,
//! `latency`, `plugin_calls`, `plugin_latency`, `plugin_failures`) and keeps what changed since
//! the sample before. Percentiles come from the histograms' bucket differences, interpolated
//! within a bucket as Prometheus's `histogram_quantile` does. Everything is bounded: the window
//! keeps [`POINTS`] points, and the window names at most [`MAX_SERIES`] routes and as many
//! plugins; the rest are folded into [`OTHER`]. The sampler (`Admin::record_history`) runs on
//! the control runtime, so a page opened now shows the last minutes at once.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use http::{HeaderValue, Response, header};
use prometheus_client::registry::Registry;
use serde_json::{Map, Value, json};

use crate::body::ProxyBody;
use crate::metrics::Metrics;

/// Points the window keeps: 15 minutes at the default interval of 10 s.
pub const POINTS: usize = 90;
/// Routes, and plugins, the window names at most; the others' traffic is folded into [`OTHER`].
pub const MAX_SERIES: usize = 200;
/// The series the routes or plugins beyond [`MAX_SERIES`] are folded into. No route or plugin
/// id can take this name: ids are letters, digits, `-`, `_` and `.`.
pub const OTHER: &str = "(other)";

/// A histogram's buckets as Prometheus shows them: each upper bound with the count of values
/// at or below it, by ascending bound, the last one `+Inf`.
#[derive(Clone, Debug, Default, PartialEq)]
struct Buckets(Vec<(f64, u64)>);

impl Buckets {
    /// Adds `count` to the bucket bounded by `le`.
    fn add(&mut self, le: f64, count: u64) {
        match self.0.iter().position(|(bound, _)| *bound >= le) {
            Some(at) if self.0[at].0 == le => self.0[at].1 += count,
            Some(at) => self.0.insert(at, (le, count)),
            None => self.0.push((le, count)),
        }
    }

    /// Adds every bucket of `other`.
    fn merge(&mut self, other: &Buckets) {
        for &(le, count) in &other.0 {
            self.add(le, count);
        }
    }

    /// The values observed since `before` was read, as buckets. A bucket that shrank (a
    /// series that started again) counts from zero.
    fn since(&self, before: Option<&Buckets>) -> Buckets {
        let earlier = |le: f64| {
            before
                .and_then(|b| b.0.iter().find(|(bound, _)| *bound == le))
                .map_or(0, |(_, count)| *count)
        };
        Buckets(
            self.0
                .iter()
                .map(|&(le, count)| (le, count.saturating_sub(earlier(le))))
                .collect(),
        )
    }

    /// How many values there are.
    fn count(&self) -> u64 {
        self.0.last().map_or(0, |(_, count)| *count)
    }

    /// The `q` quantile (0 < q ≤ 1), interpolated linearly within its bucket; a quantile in the
    /// `+Inf` bucket is the largest finite bound. `None` without values.
    fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = q * total as f64;
        let at = self.0.iter().position(|(_, count)| *count as f64 >= rank)?;
        let (lower, below) = match at {
            0 => (0.0, 0),
            _ => self.0[at - 1],
        };
        let (upper, count) = self.0[at];
        if upper.is_infinite() {
            return (at > 0).then_some(lower);
        }
        let inside = (count - below) as f64;
        Some(lower + (upper - lower) * (rank - below as f64) / inside)
    }
}

/// One route's cumulative counts, as read.
#[derive(Clone, Debug, Default, PartialEq)]
struct RouteTotals {
    requests: u64,
    status_4xx: u64,
    status_5xx: u64,
    latency: Buckets,
}

impl RouteTotals {
    fn since(&self, before: Option<&RouteTotals>) -> RouteTotals {
        RouteTotals {
            requests: self
                .requests
                .saturating_sub(before.map_or(0, |b| b.requests)),
            status_4xx: self
                .status_4xx
                .saturating_sub(before.map_or(0, |b| b.status_4xx)),
            status_5xx: self
                .status_5xx
                .saturating_sub(before.map_or(0, |b| b.status_5xx)),
            latency: self.latency.since(before.map(|b| &b.latency)),
        }
    }

    fn merge(&mut self, other: &RouteTotals) {
        self.requests += other.requests;
        self.status_4xx += other.status_4xx;
        self.status_5xx += other.status_5xx;
        self.latency.merge(&other.latency);
    }

    fn active(&self) -> bool {
        self.requests > 0 || self.latency.count() > 0
    }

    fn stats(&self) -> RouteStats {
        RouteStats {
            requests: self.requests,
            status_4xx: self.status_4xx,
            status_5xx: self.status_5xx,
            p50: self.latency.quantile(0.5),
            p99: self.latency.quantile(0.99),
        }
    }
}

/// One plugin's cumulative counts over every route and tenant, as read.
#[derive(Clone, Debug, Default, PartialEq)]
struct PluginTotals {
    calls: u64,
    failures: u64,
    seconds: f64,
    latency: Buckets,
}

impl PluginTotals {
    fn since(&self, before: Option<&PluginTotals>) -> PluginTotals {
        PluginTotals {
            calls: self.calls.saturating_sub(before.map_or(0, |b| b.calls)),
            failures: self
                .failures
                .saturating_sub(before.map_or(0, |b| b.failures)),
            seconds: (self.seconds - before.map_or(0.0, |b| b.seconds)).max(0.0),
            latency: self.latency.since(before.map(|b| &b.latency)),
        }
    }

    fn merge(&mut self, other: &PluginTotals) {
        self.calls += other.calls;
        self.failures += other.failures;
        self.seconds += other.seconds;
        self.latency.merge(&other.latency);
    }

    fn active(&self) -> bool {
        self.calls > 0 || self.failures > 0
    }

    fn stats(&self) -> PluginStats {
        let timed = self.latency.count();
        PluginStats {
            calls: self.calls,
            failures: self.failures,
            mean: (timed > 0).then(|| self.seconds / timed as f64),
            p50: self.latency.quantile(0.5),
            p99: self.latency.quantile(0.99),
        }
    }
}

/// The cumulative counts of every route and plugin at one instant.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Totals {
    routes: HashMap<String, RouteTotals>,
    plugins: HashMap<String, PluginTotals>,
}

impl Totals {
    /// Reads the request and plugin families of `metrics`, through their OpenMetrics text
    /// (prometheus-client has no other way to list a family's series), a line at a time.
    pub fn read(metrics: &Metrics) -> Totals {
        let mut registry = Registry::default();
        registry.register("requests", "", metrics.requests.clone());
        registry.register("latency", "", metrics.latency.clone());
        registry.register("plugin_calls", "", metrics.plugin_calls.clone());
        registry.register("plugin_latency", "", metrics.plugin_latency.clone());
        registry.register("plugin_failures", "", metrics.plugin_failures.clone());
        let mut reader = Reader::default();
        // Writing to the reader cannot fail, nor can encoding these classic histograms.
        let _ = prometheus_client::encoding::text::encode(&mut reader, &registry);
        reader.totals
    }

    /// Totals from the OpenMetrics text of the families [`Totals::read`] registers.
    #[cfg(test)]
    fn parse(text: &str) -> Totals {
        let mut totals = Totals::default();
        for line in text.lines() {
            totals.line(line);
        }
        totals
    }

    /// Adds one line of the text; comments and other series are passed over.
    fn line(&mut self, line: &str) {
        let Some((name, labels, value)) = sample(line) else {
            return;
        };
        let label = |key: &str| labels.iter().find(|(k, _)| *k == key).map(|(_, v)| v);
        let count = value as u64;
        let le = || match label("le").map(String::as_str) {
            Some("+Inf") => Some(f64::INFINITY),
            Some(bound) => bound.parse::<f64>().ok(),
            None => None,
        };
        match name {
            "requests_total" | "latency_bucket" => {
                let Some(route) = label("route") else { return };
                let totals = entry(&mut self.routes, route);
                if name == "latency_bucket" {
                    if let Some(le) = le() {
                        totals.latency.add(le, count);
                    }
                    return;
                }
                totals.requests += count;
                match label("class").map(String::as_str) {
                    Some("4xx") => totals.status_4xx += count,
                    Some("5xx") => totals.status_5xx += count,
                    _ => {}
                }
            }
            "plugin_calls_total"
            | "plugin_failures_total"
            | "plugin_latency_bucket"
            | "plugin_latency_sum" => {
                let Some(plugin) = label("plugin") else {
                    return;
                };
                let totals = entry(&mut self.plugins, plugin);
                match name {
                    "plugin_calls_total" => totals.calls += count,
                    "plugin_failures_total" => totals.failures += count,
                    "plugin_latency_sum" => totals.seconds += value,
                    _ => {
                        if let Some(le) = le() {
                            totals.latency.add(le, count);
                        }
                    }
                }
            }
            _ => {}
        }
    }
}

/// The entry of `key`, made on first use (without a copy of the key after that).
fn entry<'a, T: Default>(map: &'a mut HashMap<String, T>, key: &str) -> &'a mut T {
    if !map.contains_key(key) {
        map.insert(key.to_owned(), T::default());
    }
    map.get_mut(key).expect("just inserted")
}

/// A sample line's labels: each key with its value, unescaped.
type Labels<'a> = Vec<(&'a str, String)>;

/// One sample line, `name{key="value",...} value`, split; `None` for a comment or a line that
/// does not parse.
fn sample(line: &str) -> Option<(&str, Labels<'_>, f64)> {
    if line.starts_with('#') {
        return None;
    }
    let name_end = line.find(['{', ' '])?;
    let name = &line[..name_end];
    let mut labels = Vec::new();
    let mut rest = &line[name_end..];
    if let Some(mut inside) = rest.strip_prefix('{') {
        loop {
            if let Some(after) = inside.strip_prefix('}') {
                rest = after;
                break;
            }
            let (key, after) = inside.split_once("=\"")?;
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next()? {
                    (at, '"') => break at,
                    (_, '\\') => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    (_, c) => value.push(c),
                }
            };
            labels.push((key.trim_start_matches(','), value));
            inside = &after[end + 1..];
        }
    }
    let value = rest.split_whitespace().next()?.parse::<f64>().ok()?;
    Some((name, labels, value))
}

/// Parses the text as the encoder writes it, a line at a time, so that no copy of the whole
/// text is ever held.
#[derive(Default)]
struct Reader {
    line: String,
    totals: Totals,
}

impl std::fmt::Write for Reader {
    fn write_str(&mut self, text: &str) -> std::fmt::Result {
        let mut text = text;
        while let Some((head, tail)) = text.split_once('\n') {
            self.line.push_str(head);
            self.totals.line(&self.line);
            self.line.clear();
            text = tail;
        }
        self.line.push_str(text);
        Ok(())
    }
}

/// One route's traffic in one interval.
#[derive(Clone, Debug, Default, PartialEq)]
struct RouteStats {
    requests: u64,
    status_4xx: u64,
    status_5xx: u64,
    /// Seconds.
    p50: Option<f64>,
    p99: Option<f64>,
}

/// One plugin's calls in one interval.
#[derive(Clone, Debug, Default, PartialEq)]
struct PluginStats {
    calls: u64,
    failures: u64,
    /// Seconds.
    mean: Option<f64>,
    p50: Option<f64>,
    p99: Option<f64>,
}

/// One interval: when it ended, how long it was, and what happened in it. Routes and plugins
/// without traffic in it are left out; both lists are sorted by name.
#[derive(Clone, Debug)]
struct Point {
    /// Unix seconds.
    at: u64,
    seconds: f64,
    overall: RouteStats,
    routes: Vec<(Arc<str>, RouteStats)>,
    plugins: Vec<(Arc<str>, PluginStats)>,
}

/// The last [`POINTS`] intervals, and the totals the next one is measured from.
#[derive(Debug, Default)]
pub struct Window {
    previous: Option<Totals>,
    points: VecDeque<Point>,
}

impl Window {
    /// Records `totals`, read at `at` (Unix seconds) and `seconds` after the read before, as
    /// one point. The first read is only where the first point starts.
    pub fn record(&mut self, totals: Totals, at: u64, seconds: f64) {
        let Some(previous) = self.previous.take() else {
            self.previous = Some(totals);
            return;
        };
        let routes: Vec<(&str, RouteTotals)> = totals
            .routes
            .iter()
            .map(|(name, now)| (name.as_str(), now.since(previous.routes.get(name))))
            .filter(|(_, delta)| delta.active())
            .collect();
        let plugins: Vec<(&str, PluginTotals)> = totals
            .plugins
            .iter()
            .map(|(name, now)| (name.as_str(), now.since(previous.plugins.get(name))))
            .filter(|(_, delta)| delta.active())
            .collect();
        let mut overall = RouteTotals::default();
        for (_, delta) in &routes {
            overall.merge(delta);
        }
        let known_routes = self.names(|p| &p.routes);
        let known_plugins = self.names(|p| &p.plugins);
        let point = Point {
            at,
            seconds,
            overall: overall.stats(),
            routes: bounded(routes, &known_routes, |d| d.requests, RouteTotals::merge)
                .into_iter()
                .map(|(name, delta)| (name, delta.stats()))
                .collect(),
            plugins: bounded(plugins, &known_plugins, |d| d.calls, PluginTotals::merge)
                .into_iter()
                .map(|(name, delta)| (name, delta.stats()))
                .collect(),
        };
        self.points.push_back(point);
        while self.points.len() > POINTS {
            self.points.pop_front();
        }
        self.previous = Some(totals);
    }

    /// The names the window's points hold (without [`OTHER`]), each once.
    fn names<S>(&self, list: impl Fn(&Point) -> &Vec<(Arc<str>, S)>) -> HashSet<Arc<str>> {
        self.points
            .iter()
            .flat_map(|p| list(p).iter())
            .filter(|(name, _)| &**name != OTHER)
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// The window as the API answers it: columns that line up with `timestamps`.
    pub fn to_json(&self, interval_s: u64) -> Value {
        let column = |f: &dyn Fn(&Point) -> Value| -> Value {
            Value::Array(self.points.iter().map(f).collect())
        };
        let route_series = |find: &dyn Fn(&Point) -> Option<RouteStats>| {
            let at = |p: &Point| find(p).unwrap_or_default();
            json!({
                "requests": column(&|p| at(p).requests.into()),
                "status_4xx": column(&|p| at(p).status_4xx.into()),
                "status_5xx": column(&|p| at(p).status_5xx.into()),
                "p50_ms": column(&|p| scaled(at(p).p50, 1e3)),
                "p99_ms": column(&|p| scaled(at(p).p99, 1e3)),
            })
        };
        let plugin_series = |name: &str| {
            let at = |p: &Point| stats_of(&p.plugins, name).unwrap_or_default();
            json!({
                "calls": column(&|p| at(p).calls.into()),
                "failures": column(&|p| at(p).failures.into()),
                "mean_us": column(&|p| scaled(at(p).mean, 1e6)),
                "p50_us": column(&|p| scaled(at(p).p50, 1e6)),
                "p99_us": column(&|p| scaled(at(p).p99, 1e6)),
            })
        };
        let route_names = self.all_names(|p| &p.routes);
        let plugin_names = self.all_names(|p| &p.plugins);
        json!({
            "interval_s": interval_s,
            "capacity": POINTS,
            "timestamps": column(&|p| p.at.into()),
            "seconds": column(&|p| scaled(Some(p.seconds), 1.0)),
            "overall": route_series(&|p| Some(p.overall.clone())),
            "routes": route_names
                .iter()
                .map(|name| (name.to_string(), route_series(&|p| stats_of(&p.routes, name))))
                .collect::<Map<String, Value>>(),
            "plugins": plugin_names
                .iter()
                .map(|name| (name.to_string(), plugin_series(name)))
                .collect::<Map<String, Value>>(),
        })
    }

    /// Every name in the window, [`OTHER`] included, sorted.
    fn all_names<S>(&self, list: impl Fn(&Point) -> &Vec<(Arc<str>, S)>) -> BTreeSet<Arc<str>> {
        self.points
            .iter()
            .flat_map(|p| list(p).iter().map(|(name, _)| name.clone()))
            .collect()
    }
}

/// The stats of `name` in a point's sorted list.
fn stats_of<S: Clone>(list: &[(Arc<str>, S)], name: &str) -> Option<S> {
    list.binary_search_by(|(n, _)| (**n).cmp(name))
        .ok()
        .map(|at| list[at].1.clone())
}

/// `seconds` times `scale`, to a thousandth, or null.
fn scaled(seconds: Option<f64>, scale: f64) -> Value {
    seconds.map_or(Value::Null, |s| json!((s * scale * 1e3).round() / 1e3))
}

/// `deltas` as a point keeps them: a name the window holds keeps its own entry; new names get
/// one, busiest first, while the window names fewer than [`MAX_SERIES`]; the rest are summed
/// into [`OTHER`]. Sorted by name.
fn bounded<D: Default>(
    mut deltas: Vec<(&str, D)>,
    known: &HashSet<Arc<str>>,
    size: impl Fn(&D) -> u64,
    merge: impl Fn(&mut D, &D),
) -> Vec<(Arc<str>, D)> {
    // Known names first, then the busiest; by name among equals, so the choice is stable.
    deltas.sort_by(|(a, da), (b, db)| {
        let (ka, kb) = (known.contains(*a), known.contains(*b));
        kb.cmp(&ka).then(size(db).cmp(&size(da))).then(a.cmp(b))
    });
    let mut named = known.len();
    let mut kept = Vec::new();
    let mut other: Option<D> = None;
    for (name, delta) in deltas {
        if let Some(known) = known.get(name) {
            kept.push((known.clone(), delta));
        } else if named < MAX_SERIES && name != OTHER {
            named += 1;
            kept.push((Arc::from(name), delta));
        } else {
            merge(other.get_or_insert_with(D::default), &delta);
        }
    }
    if let Some(other) = other {
        kept.push((Arc::from(OTHER), other));
    }
    kept.sort_by(|(a, _), (b, _)| a.cmp(b));
    kept
}

/// The window, shared by the sampler and the admin API.
#[derive(Debug, Default)]
pub struct History {
    state: Mutex<(Window, Option<Instant>)>,
}

impl History {
    /// Reads `metrics` now and records the interval since the last read.
    pub fn sample(&self, metrics: &Metrics) {
        let totals = Totals::read(metrics);
        let now = Instant::now();
        let at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let seconds = state.1.map_or(0.0, |last| (now - last).as_secs_f64());
        state.0.record(totals, at, seconds);
        state.1 = Some(now);
    }

    /// `GET /v1/metrics/history`: the window as compact JSON (it is charted, not read).
    pub(super) fn response(&self, interval_s: u64) -> Response<ProxyBody> {
        let body = {
            let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            state.0.to_json(interval_s).to_string()
        };
        let mut response = super::status::text(body, "application/json");
        response
            .headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buckets(list: &[(f64, u64)]) -> Buckets {
        Buckets(list.to_vec())
    }

    #[test]
    fn a_quantile_is_interpolated_within_its_bucket() {
        // 10 values: 4 at or below 1, 8 at or below 2, all 10 at or below 4.
        let b = buckets(&[(1.0, 4), (2.0, 8), (4.0, 10), (f64::INFINITY, 10)]);
        // The 5th value is a quarter of the way into (1, 2].
        assert_eq!(b.quantile(0.5), Some(1.25));
        // The 2nd is half way into [0, 1].
        assert_eq!(b.quantile(0.2), Some(0.5));
        // 9.9 of 10 is 95% of the way into (2, 4].
        assert!((b.quantile(0.99).unwrap() - 3.9).abs() < 1e-9);
        assert_eq!(b.quantile(1.0), Some(4.0));
    }

    #[test]
    fn a_quantile_beyond_the_last_bound_is_that_bound_and_none_without_values() {
        let b = buckets(&[(1.0, 1), (2.0, 1), (f64::INFINITY, 10)]);
        assert_eq!(b.quantile(0.99), Some(2.0));
        assert_eq!(b.quantile(0.05), Some(0.5));
        assert_eq!(buckets(&[(1.0, 0), (f64::INFINITY, 0)]).quantile(0.5), None);
        assert_eq!(Buckets::default().quantile(0.5), None);
        assert_eq!(buckets(&[(f64::INFINITY, 3)]).quantile(0.5), None);
    }

    #[test]
    fn bucket_differences_are_what_was_observed_in_between() {
        let before = buckets(&[(1.0, 2), (2.0, 5), (f64::INFINITY, 6)]);
        let now = buckets(&[(1.0, 2), (2.0, 9), (f64::INFINITY, 12)]);
        assert_eq!(
            now.since(Some(&before)),
            buckets(&[(1.0, 0), (2.0, 4), (f64::INFINITY, 6)])
        );
        assert_eq!(now.since(None), now);
        // A series that started again counts from zero, never below.
        assert_eq!(before.since(Some(&now)).count(), 0);
        let mut sum = before.clone();
        sum.merge(&now);
        assert_eq!(sum, buckets(&[(1.0, 4), (2.0, 14), (f64::INFINITY, 18)]));
    }

    const TEXT: &str = r#"# HELP requests .
# TYPE requests counter
requests_total{route="shop",class="2xx"} 7
requests_total{route="shop",class="5xx"} 3
requests_total{route="shop",class="4xx"} 1
requests_total{route="odd\"name\\x",class="2xx"} 2
# TYPE latency histogram
latency_sum{route="shop"} 1.5
latency_count{route="shop"} 11
latency_bucket{le="0.001",route="shop"} 4
latency_bucket{le="0.01",route="shop"} 10
latency_bucket{le="+Inf",route="shop"} 11
plugin_calls_total{plugin="auth",route="shop",tenant="t"} 5
plugin_calls_total{plugin="auth",route="cart",tenant="t"} 3
plugin_failures_total{plugin="auth",route="shop",tenant="t",kind="trap"} 2
plugin_latency_sum{plugin="auth",route="shop",tenant="t"} 0.0004
plugin_latency_bucket{plugin="auth",route="shop",tenant="t",le="0.0001"} 5
plugin_latency_bucket{plugin="auth",route="shop",tenant="t",le="+Inf"} 5
plugin_latency_bucket{plugin="auth",route="cart",tenant="t",le="0.0001"} 1
plugin_latency_bucket{plugin="auth",route="cart",tenant="t",le="+Inf"} 3
# EOF
"#;

    #[test]
    fn the_text_is_read_into_totals_per_route_and_per_plugin() {
        let totals = Totals::parse(TEXT);
        let shop = &totals.routes["shop"];
        assert_eq!(
            (shop.requests, shop.status_4xx, shop.status_5xx),
            (11, 1, 3)
        );
        assert_eq!(
            shop.latency,
            buckets(&[(0.001, 4), (0.01, 10), (f64::INFINITY, 11)])
        );
        // Escaped label values are read back as they were.
        assert_eq!(totals.routes[r#"odd"name\x"#].requests, 2);
        // A plugin is summed over the routes it runs on.
        let auth = &totals.plugins["auth"];
        assert_eq!((auth.calls, auth.failures), (8, 2));
        assert_eq!(auth.latency, buckets(&[(0.0001, 6), (f64::INFINITY, 8)]));
        assert!((auth.seconds - 0.0004).abs() < 1e-12);
    }

    #[test]
    fn reading_the_live_metrics_finds_what_was_recorded() {
        let metrics = Metrics::new();
        let route = metrics.route("shop");
        route.record(200, 0.002);
        route.record(503, 0.004);
        let plugin = metrics.plugin("auth", "shop", "t");
        plugin.record(std::time::Duration::from_micros(3), Some("trap"));
        let totals = Totals::read(&metrics);
        let shop = &totals.routes["shop"];
        assert_eq!((shop.requests, shop.status_5xx), (2, 1));
        assert_eq!(shop.latency.count(), 2);
        let auth = &totals.plugins["auth"];
        assert_eq!((auth.calls, auth.failures, auth.latency.count()), (1, 1, 1));
    }

    fn route(requests: u64, latency: &[(f64, u64)]) -> RouteTotals {
        RouteTotals {
            requests,
            status_5xx: requests / 2,
            latency: buckets(latency),
            ..RouteTotals::default()
        }
    }

    fn totals(routes: &[(&str, RouteTotals)]) -> Totals {
        Totals {
            routes: routes
                .iter()
                .map(|(name, t)| ((*name).to_owned(), t.clone()))
                .collect(),
            plugins: HashMap::new(),
        }
    }

    #[test]
    fn a_point_is_the_difference_between_two_reads_and_the_first_read_is_a_baseline() {
        let mut window = Window::default();
        window.record(totals(&[("a", route(10, &[(1.0, 10)]))]), 100, 0.0);
        assert!(window.points.is_empty());
        window.record(
            totals(&[("a", route(14, &[(1.0, 14)])), ("b", route(2, &[(1.0, 2)]))]),
            110,
            10.0,
        );
        let json = window.to_json(10);
        assert_eq!(json["timestamps"], json!([110]));
        assert_eq!(json["seconds"], json!([10.0]));
        assert_eq!(json["routes"]["a"]["requests"], json!([4]));
        assert_eq!(json["routes"]["a"]["status_5xx"], json!([2]));
        assert_eq!(json["routes"]["b"]["requests"], json!([2]));
        assert_eq!(json["overall"]["requests"], json!([6]));
        assert_eq!(json["overall"]["p50_ms"], json!([500.0]));
        // No traffic: zero requests and no latency, so the chart shows a gap, not a zero.
        window.record(
            totals(&[("a", route(14, &[(1.0, 14)])), ("b", route(2, &[(1.0, 2)]))]),
            120,
            10.0,
        );
        let json = window.to_json(10);
        assert_eq!(json["overall"]["requests"], json!([6, 0]));
        assert_eq!(json["routes"]["a"]["p99_ms"], json!([990.0, null]));
    }

    #[test]
    fn the_window_keeps_a_fixed_number_of_points() {
        let mut window = Window::default();
        for step in 0..(POINTS as u64 + 20) {
            let read = totals(&[("a", route(step, &[(1.0, step)]))]);
            window.record(read, step * 10, 10.0);
        }
        assert_eq!(window.points.len(), POINTS);
        let json = window.to_json(10);
        assert_eq!(json["timestamps"].as_array().unwrap().len(), POINTS);
        assert_eq!(json["timestamps"][0], json!(200));
        assert_eq!(json["routes"]["a"]["requests"][POINTS - 1], json!(1));
    }

    #[test]
    fn routes_beyond_the_bound_are_folded_into_other_and_the_fold_keeps_percentiles() {
        let mut window = Window::default();
        let names: Vec<String> = (0..MAX_SERIES + 50).map(|i| format!("r{i:03}")).collect();
        let read = |count: u64| {
            Totals {
                routes: names
                    .iter()
                    .enumerate()
                    // r000 is the busiest, r249 the quietest.
                    .map(|(i, name)| {
                        let n = count * (1000 - i as u64);
                        (name.clone(), route(n, &[(0.5, n), (1.0, 2 * n)]))
                    })
                    .collect(),
                plugins: HashMap::new(),
            }
        };
        window.record(read(0), 0, 0.0);
        window.record(read(1), 10, 10.0);
        let json = window.to_json(10);
        let routes = json["routes"].as_object().unwrap();
        assert_eq!(routes.len(), MAX_SERIES + 1);
        assert!(routes.contains_key("r000") && routes.contains_key("r199"));
        assert!(!routes.contains_key("r200"));
        let folded: u64 = (200..250).map(|i| 1000 - i).sum();
        assert_eq!(routes[OTHER]["requests"], json!([folded]));
        assert_eq!(routes[OTHER]["p50_ms"], json!([500.0]));
        let all: u64 = (0..250).map(|i| 1000 - i).sum();
        assert_eq!(json["overall"]["requests"], json!([all]));

        // A route that appears later finds no free name while the window names 200: it is
        // folded too, and the window still names at most 200.
        let mut later = read(2);
        later
            .routes
            .insert("newcomer".into(), route(10_000, &[(1.0, 10_000)]));
        window.record(later, 20, 10.0);
        let json = window.to_json(10);
        let routes = json["routes"].as_object().unwrap();
        assert_eq!(routes.len(), MAX_SERIES + 1);
        assert!(!routes.contains_key("newcomer"));
        assert_eq!(routes["r000"]["requests"], json!([1000, 1000]));
    }

    #[test]
    fn plugins_are_charted_with_calls_failures_and_call_time() {
        let mut window = Window::default();
        window.record(Totals::parse(""), 0, 0.0);
        window.record(Totals::parse(TEXT), 10, 10.0);
        let json = window.to_json(10);
        let auth = &json["plugins"]["auth"];
        assert_eq!(auth["calls"], json!([8]));
        assert_eq!(auth["failures"], json!([2]));
        assert_eq!(auth["mean_us"], json!([50.0]));
        assert_eq!(auth["p50_us"], json!([66.667]));
    }

    #[test]
    fn a_sample_of_live_metrics_becomes_a_point() {
        let metrics = Metrics::new();
        let history = History::default();
        history.sample(&metrics);
        metrics.route("shop").record(200, 0.001);
        history.sample(&metrics);
        let state = history.state.lock().unwrap();
        assert_eq!(
            state.0.to_json(10)["routes"]["shop"]["requests"],
            json!([1])
        );
    }
}
