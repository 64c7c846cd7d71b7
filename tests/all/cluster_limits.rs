//! Counters across gateways: limit-count with `policy: cluster` on a kv kept in a real Redis,
//! shared by two gateway processes; what happens when Redis goes away; and the configs that
//! would count somewhere other than where they say.

use std::time::Duration;

use http::StatusCode;
use serde_json::{Value, json};
use weir_tests::redis::Redis;
use weir_tests::{ChildGateway, TestGateway, Upstream, eventually, get, node, plugins, yaml};

/// A limit-count entry named `name` whose kv is on Redis, failing as `failure` says.
fn redis_entry(name: &str, failure: &str) -> Value {
    json!({"name": name, "module": plugins::LIMIT_COUNT, "failure": failure,
           "grants": {"kv": true, "clock": true}, "kv": {"backend": "redis"}})
}

/// `requests` GETs of `path` with `x-client: client`, alternating between `gateways`; the
/// statuses, and whether every answer was counted in one window (`x-ratelimit-reset` only
/// falls within a window; a rise means a new one began).
async fn alternate(
    gateways: &[&ChildGateway],
    path: &str,
    client: &str,
    requests: usize,
) -> (Vec<StatusCode>, bool) {
    let mut statuses = Vec::new();
    let mut resets = Vec::new();
    for i in 0..requests {
        let url = format!("{}{path}", gateways[i % gateways.len()].url);
        let reply = super::plugins::get_with(&url, &[("x-client", client)]).await;
        statuses.push(reply.status);
        if let Some(reset) = reply.header("x-ratelimit-reset") {
            resets.push(reset.parse::<u64>().expect("a number of seconds"));
        }
    }
    let one_window = resets.windows(2).all(|pair| pair[1] <= pair[0]);
    (statuses, one_window)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateway_processes_share_one_cluster_limit() {
    let redis = Redis::start().await;
    let up = Upstream::start("u").await;
    let config = yaml(json!({
        "server": {"redis_url": redis.url},
        "upstreams": [{"id": "u", "nodes": [node(&up)]}],
        "plugins": [redis_entry("limit-count", "closed")],
        "routes": [{"id": "r", "uri": "/r", "upstream_id": "u", "plugins": [
            {"name": "limit-count", "config": {
                "count": 3, "window_s": 86400, "policy": "cluster", "key": "header:x-client"}},
        ]}],
    }));
    let a = ChildGateway::start(&config).await;
    let b = ChildGateway::start(&config).await;

    // A day-long window; should the day turn during the run, it starts over with a new client.
    let mut attempt = 0;
    let (statuses, hits_before) = loop {
        attempt += 1;
        let hits_before = up.hits();
        let (statuses, one_window) =
            alternate(&[&a, &b], "/r", &format!("client-{attempt}"), 8).await;
        if one_window || attempt == 3 {
            break (statuses, hits_before);
        }
    };
    let ok = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    assert_eq!(
        ok,
        3,
        "3 requests in total, not 3 per gateway: {statuses:?}\n{}\n{}",
        a.log(),
        b.log()
    );
    assert_eq!(
        &statuses[..3],
        &[StatusCode::OK; 3],
        "the first three pass, from both gateways"
    );
    assert!(
        statuses[3..]
            .iter()
            .all(|s| *s == StatusCode::TOO_MANY_REQUESTS),
        "then both gateways refuse: {statuses:?}"
    );
    assert_eq!(
        up.hits() - hits_before,
        3,
        "refused requests never reach the upstream"
    );

    // Each gateway counted in the same Redis key (weir:kv:<tenant>/<plugin>:<key>).
    let keys = redis
        .command(&["KEYS", "weir:kv:default/limit-count:*"])
        .unwrap();
    assert!(keys.contains(&format!("client-{attempt}")), "{keys}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_redis_is_down_the_failure_policy_answers_and_a_metric_counts_it() {
    let mut redis = Redis::start().await;
    let up = Upstream::start("u").await;
    let limit = |name: &str| json!([{"name": name, "config": {"count": 1000, "window_s": 60}}]);
    let gateway = TestGateway::start(&yaml(json!({
        "server": {"redis_url": redis.url, "redis_timeout_ms": 1000},
        "upstreams": [{"id": "u", "nodes": [node(&up)]}],
        "plugins": [redis_entry("limit-closed", "closed"), redis_entry("limit-open", "open")],
        "routes": [
            {"id": "closed", "uri": "/closed", "upstream_id": "u", "plugins": limit("limit-closed")},
            {"id": "open", "uri": "/open", "upstream_id": "u", "plugins": limit("limit-open")},
        ],
    })))
    .await;
    assert!(gateway.errors().is_empty(), "{:?}", gateway.errors());
    assert_eq!(get(&gateway.url("/closed")).await.status, StatusCode::OK);
    assert_eq!(get(&gateway.url("/open")).await.status, StatusCode::OK);

    redis.kill();
    // More failures than a quarantine takes (5): an unreachable Redis is not the plugin's
    // fault, so it must not be quarantined for it.
    for _ in 0..8 {
        let closed = get(&gateway.url("/closed")).await;
        assert_eq!(closed.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(closed.json()["error"], "plugin limit-closed failed");
        assert!(
            !closed.text().contains("127.0.0.1") && !closed.text().contains("refused"),
            "no address or OS error reaches the client: {}",
            closed.text()
        );
        assert_eq!(get(&gateway.url("/open")).await.status, StatusCode::OK);
    }
    let metrics = get(&gateway.admin_url("/metrics")).await.text();
    for plugin in ["limit-closed", "limit-open"] {
        let line = metrics
            .lines()
            .find(|l| {
                l.starts_with("weir_kv_unavailable_total{")
                    && l.contains(&format!(r#"plugin="{plugin}""#))
                    && l.contains(r#"backend="redis""#)
            })
            .unwrap_or_else(|| panic!("no kv_unavailable series for {plugin}:\n{metrics}"));
        let count: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(count >= 1.0, "{line}");
    }

    // Redis comes back (empty), and the same gateway counts on it again.
    redis.restart().await;
    eventually(
        "the closed route passes again",
        Duration::from_secs(20),
        || async { get(&gateway.url("/closed")).await.status == StatusCode::OK },
    )
    .await;
    let counted = redis
        .command(&["KEYS", "weir:kv:default/limit-closed:*"])
        .unwrap();
    assert!(counted.starts_with("*1\r\n"), "{counted}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configs_that_would_count_elsewhere_than_they_say_are_refused_with_the_reason() {
    let redis = Redis::start().await;
    let up = Upstream::start("u").await;
    let memory_entry = json!({"name": "limit-memory", "module": plugins::LIMIT_COUNT,
                              "grants": {"kv": true, "clock": true}});
    let routes = json!([
        {"id": "cluster-on-memory", "uri": "/a", "upstream_id": "u", "plugins": [
            {"name": "limit-memory", "config": {"count": 1, "window_s": 60, "policy": "cluster"}}]},
        {"id": "local-on-redis", "uri": "/b", "upstream_id": "u", "plugins": [
            {"name": "limit-redis", "config": {"count": 1, "window_s": 60, "policy": "local"}}]},
        {"id": "default-on-redis", "uri": "/c", "upstream_id": "u", "plugins": [
            {"name": "limit-redis", "config": {"count": 1, "window_s": 60}}]},
    ]);
    let mut without_grant = redis_entry("limit-nogrant", "closed");
    without_grant["grants"] = json!({"clock": true});
    let gateway = TestGateway::start(&yaml(json!({
        "server": {"redis_url": redis.url},
        "upstreams": [{"id": "u", "nodes": [node(&up)]}],
        "plugins": [memory_entry, redis_entry("limit-redis", "closed"), without_grant],
        "routes": routes,
    })))
    .await;
    let reason = |id: &str| gateway.refusal(id);
    assert!(
        reason("cluster-on-memory").contains("give the entry `kv: {backend: redis}`"),
        "{}",
        reason("cluster-on-memory")
    );
    assert!(
        reason("local-on-redis").contains("say `policy: cluster`"),
        "{}",
        reason("local-on-redis")
    );
    assert!(
        !gateway.errors().iter().any(|e| e.id == "default-on-redis"),
        "no policy means the entry's own: {:?}",
        gateway.errors()
    );
    assert!(
        reason("limit-nogrant").contains("add grants: {kv: true}"),
        "{}",
        reason("limit-nogrant")
    );
    assert_eq!(get(&gateway.url("/c")).await.status, StatusCode::OK);

    // Without server.redis_url, a Redis entry does not load, and says why; a bad URL is
    // refused, and the server section keeps what it had.
    gateway
        .reload(&yaml(json!({
            "upstreams": [{"id": "u", "nodes": [node(&up)]}],
            "plugins": [redis_entry("limit-redis", "closed")],
            "routes": [],
        })))
        .await;
    assert!(
        reason("limit-redis").contains("needs server.redis_url"),
        "{}",
        reason("limit-redis")
    );
    for (url, expected) in [
        ("rediss://127.0.0.1:6379", "TLS to Redis"),
        ("http://127.0.0.1:6379", "not a Redis URL"),
    ] {
        gateway
            .reload(&yaml(json!({
                "server": {"redis_url": url},
                "upstreams": [{"id": "u", "nodes": [node(&up)]}],
                "routes": [],
            })))
            .await;
        assert!(
            reason("server").contains(expected),
            "{url}: {}",
            reason("server")
        );
    }
}
