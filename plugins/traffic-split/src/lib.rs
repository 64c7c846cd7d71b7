//! traffic-split: sends a share of a route's requests to other upstreams, by weight, for the
//! requests that match a rule's header, query and cookie conditions (canaries, blue/green).

use serde::Deserialize;
use weir_sdk::schemars::{self, JsonSchema};
use weir_sdk::{Action, Level, Plugin, Reply, Request, cookie, query_param};

/// `{"rules": [{"match": [{"header": "x-canary", "value": "1"}],
/// "upstreams": [{"id": "canary", "weight": 1}, {"weight": 9}]}]}`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct Config {
    /// The rules, tried in order; the first whose `match` holds picks the upstream.
    rules: Vec<RuleConfig>,
}

/// `{"match": [..], "upstreams": [{"id": "canary", "weight": 1}, {"weight": 9}]}`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct RuleConfig {
    /// `match: [{header: x-canary, value: "1"}]`: conditions that must all hold; a rule
    /// without any holds for every request.
    #[serde(rename = "match", default)]
    conditions: Vec<ConditionConfig>,
    /// `upstreams: [{id: canary, weight: 1}, {weight: 9}]`: where matching requests go, in
    /// proportion to the weights; an entry without `id` is the route's own upstream.
    upstreams: Vec<UpstreamConfig>,
}

/// `{"header": "x-canary", "value": "1"}`, `{"query": "v", "values": ["2", "3"]}` or
/// `{"cookie": "beta"}` (present, whatever its value).
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct ConditionConfig {
    /// `header: x-canary`: the request header (its first value) to test.
    #[serde(default)]
    header: Option<String>,
    /// `query: v`: the query parameter (decoded) to test.
    #[serde(default)]
    query: Option<String>,
    /// `cookie: beta`: the cookie to test.
    #[serde(default)]
    cookie: Option<String>,
    /// `value: "1"`: it must equal this. Without `value` or `values`, it must be present.
    #[serde(default)]
    value: Option<String>,
    /// `values: ["2", "3"]`: it must equal one of these.
    #[serde(default)]
    values: Option<Vec<String>>,
}

/// `{"id": "canary", "weight": 1}`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct UpstreamConfig {
    /// `id: canary`: an upstream in the store; left out, the route's own upstream.
    #[serde(default)]
    id: Option<String>,
    /// `weight: 1`: its share, 0 to 100000 (default 1); 0 sends it nothing.
    #[serde(default = "default_weight")]
    weight: u32,
}

fn default_weight() -> u32 {
    1
}

/// The largest weight.
const MAX_WEIGHT: u32 = 100_000;

/// What a condition reads.
enum Place {
    Header(String),
    Query(String),
    Cookie(String),
}

struct Condition {
    place: Place,
    /// The accepted values; empty: any value, as long as it is there.
    values: Vec<String>,
}

struct Rule {
    conditions: Vec<Condition>,
    /// The upstreams with a weight above 0 (`None`: the route's own), and their weights.
    upstreams: Vec<(Option<String>, u64)>,
    total: u64,
}

struct TrafficSplit {
    rules: Vec<Rule>,
}

impl Condition {
    fn parse(config: ConditionConfig) -> Result<Condition, String> {
        let place = match (config.header, config.query, config.cookie) {
            (Some(name), None, None) => Place::Header(name.to_ascii_lowercase()),
            (None, Some(name), None) => Place::Query(name),
            (None, None, Some(name)) => Place::Cookie(name),
            _ => return Err("name exactly one of `header`, `query` or `cookie`".into()),
        };
        let (Place::Header(name) | Place::Query(name) | Place::Cookie(name)) = &place;
        if name.is_empty() {
            return Err("the header, query parameter or cookie name is empty".into());
        }
        let values = match (config.value, config.values) {
            (Some(_), Some(_)) => return Err("give `value` or `values`, not both".into()),
            (Some(value), None) => vec![value],
            (None, Some(values)) if values.is_empty() => {
                return Err("`values` is empty: leave it out to test presence only".into());
            }
            (None, Some(values)) => values,
            (None, None) => Vec::new(),
        };
        Ok(Condition { place, values })
    }

    fn holds(&self, req: &Request) -> bool {
        let found = match &self.place {
            Place::Header(name) => req.header(name),
            Place::Query(name) => query_param(req, name),
            Place::Cookie(name) => cookie(req, name),
        };
        found.is_some_and(|found| self.values.is_empty() || self.values.contains(&found))
    }
}

impl Rule {
    fn parse(config: RuleConfig) -> Result<Rule, String> {
        let conditions = config
            .conditions
            .into_iter()
            .enumerate()
            .map(|(i, c)| Condition::parse(c).map_err(|e| format!("match[{i}]: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let mut upstreams = Vec::new();
        for (i, upstream) in config.upstreams.into_iter().enumerate() {
            if upstream.weight > MAX_WEIGHT {
                return Err(format!(
                    "upstreams[{i}]: weight {} is over {MAX_WEIGHT}",
                    upstream.weight
                ));
            }
            if upstream.id.as_deref().is_some_and(str::is_empty) {
                return Err(format!(
                    "upstreams[{i}]: `id` is empty; leave it out for the route's own upstream"
                ));
            }
            if upstream.weight > 0 {
                upstreams.push((upstream.id, u64::from(upstream.weight)));
            }
        }
        if upstreams.is_empty() {
            return Err("no upstream has a weight above 0".into());
        }
        let total = upstreams.iter().map(|(_, weight)| weight).sum();
        Ok(Rule {
            conditions,
            upstreams,
            total,
        })
    }

    /// An upstream by weight: a uniform draw from 0..total lands in one upstream's share.
    fn pick(&self) -> Option<&str> {
        let mut draw = match self.upstreams.as_slice() {
            [(only, _)] => return only.as_deref(),
            // Weights are at most 100000 each, so the modulo's bias (about total / 2^64) is nil.
            _ => getrandom::u64().expect("traffic-split: no randomness from the host") % self.total,
        };
        for (id, weight) in &self.upstreams {
            if draw < *weight {
                return id.as_deref();
            }
            draw -= weight;
        }
        unreachable!("the draw is below the total of the weights")
    }
}

impl Plugin for TrafficSplit {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        if config.rules.is_empty() {
            return Err("`rules` is empty: give at least one".into());
        }
        let rules = config
            .rules
            .into_iter()
            .enumerate()
            .map(|(i, rule)| Rule::parse(rule).map_err(|e| format!("rules[{i}]: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TrafficSplit { rules })
    }

    fn on_request(&self, req: &Request) -> Action {
        let Some(rule) = self
            .rules
            .iter()
            .find(|rule| rule.conditions.iter().all(|c| c.holds(req)))
        else {
            return Action::Continue;
        };
        let Some(id) = rule.pick() else {
            return Action::Continue;
        };
        if let Err(error) = weir_sdk::set_upstream(req, id) {
            weir_sdk::log(
                Level::Warn,
                &format!("could not send the request to upstream {id:?}: {error}"),
            );
            return Action::Respond(Reply::error(
                503,
                &format!("traffic-split: upstream {id} is not available"),
            ));
        }
        Action::Continue
    }
}

weir_sdk::export_plugin!(TrafficSplit);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn parsed(config: Value) -> Result<TrafficSplit, String> {
        TrafficSplit::new(serde_json::from_value(config).map_err(|e| e.to_string())?)
    }

    fn refusal(config: Value) -> String {
        parsed(config).err().expect("refused")
    }

    #[test]
    fn weights_split_the_draws_in_proportion() {
        let split = parsed(json!({"rules": [{"upstreams": [
            {"id": "a", "weight": 3}, {"weight": 1}, {"id": "never", "weight": 0},
        ]}]}))
        .unwrap();
        let rule = &split.rules[0];
        assert_eq!(rule.total, 4);
        let mut a = 0;
        for _ in 0..4000 {
            match rule.pick() {
                Some("a") => a += 1,
                None => {}
                other => panic!("picked {other:?}"),
            }
        }
        assert!((2700..3300).contains(&a), "{a} of 4000 went to a");
    }

    #[test]
    fn one_upstream_with_weight_is_picked_without_a_draw() {
        let split = parsed(json!({"rules": [{"upstreams": [
            {"id": "b", "weight": 0}, {"id": "c", "weight": 7},
        ]}]}))
        .unwrap();
        assert_eq!(split.rules[0].pick(), Some("c"));
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        assert!(refusal(json!({"rules": []})).contains("`rules` is empty"));
        assert!(
            refusal(json!({"rules": [{"upstreams": [{"id": "a", "weight": 0}]}]}))
                .contains("rules[0]: no upstream has a weight above 0")
        );
        assert!(refusal(json!({"rules": [{"upstreams": []}]})).contains("no upstream"));
        assert!(
            refusal(json!({"rules": [{"upstreams": [{"id": "a", "weight": 100001}]}]}))
                .contains("weight 100001 is over 100000")
        );
        assert!(
            refusal(json!({"rules": [{"upstreams": [{"weight": 1}]},
                                     {"upstreams": [{"id": "", "weight": 1}]}]}))
            .contains("rules[1]: upstreams[0]: `id` is empty")
        );
        assert!(
            refusal(json!({"rules": [{"match": [{"header": "a", "query": "b"}],
                                      "upstreams": [{"weight": 1}]}]}))
            .contains("match[0]: name exactly one")
        );
        assert!(
            refusal(json!({"rules": [{"match": [{"value": "1"}], "upstreams": [{"weight": 1}]}]}))
                .contains("name exactly one")
        );
        assert!(
            refusal(
                json!({"rules": [{"match": [{"cookie": "c", "value": "1", "values": ["2"]}],
                                      "upstreams": [{"weight": 1}]}]})
            )
            .contains("not both")
        );
        assert!(
            refusal(json!({"rules": [{"match": [{"query": "q", "values": []}],
                                      "upstreams": [{"weight": 1}]}]}))
            .contains("`values` is empty")
        );
        assert!(
            refusal(json!({"rules": [{"upstreams": [{"id": "a", "weigth": 1}]}]}))
                .contains("unknown field")
        );
    }
}
