//! Consumers and the 0.2.0 world through a real gateway: key-auth finding consumers by their
//! keys, the consumer name reaching the upstream, the access log and (where configured) the
//! metrics, live consumer changes,
//! config schemas checked before `init`, queued response edits on every answer, and a 0.1.0
//! component still loading beside 0.2.0 ones.

use http::StatusCode;
use serde_json::{Value, json};
use weir_tests::{TestGateway, Upstream, admin_get, all_plugins, get, node, plugins, yaml};

use crate::plugins::get_with;

/// A config with one upstream, every first-party plugin (key-auth granted the `key-auth`
/// credentials), `consumers` and `routes`.
fn config(up: &Upstream, consumers: Value, routes: Value) -> String {
    let mut entries = all_plugins();
    for entry in entries.as_array_mut().unwrap() {
        if entry["name"] == "key-auth" {
            entry["grants"] = json!({"consumers": ["key-auth"]});
        }
    }
    yaml(json!({
        "upstreams": [{"id": "u", "nodes": [node(up)]}],
        "plugins": entries,
        "consumers": consumers,
        "routes": routes,
    }))
}

fn key_auth_route(config: Value) -> Value {
    json!([{"id": "r", "uri": "/*", "upstream_id": "u",
            "plugins": [{"name": "key-auth", "config": config}]}])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_auth_finds_the_consumer_and_the_upstream_and_log_see_its_name() {
    let up = Upstream::start("u").await;
    let consumers = json!([
        {"name": "alice", "labels": {"team": "a"}, "credentials": {"key-auth": {"key": "alice-key"}}},
        {"name": "bob", "credentials": {"key-auth": {"key": "bob-key"}}},
    ]);
    let gateway = TestGateway::start(&config(
        &up,
        consumers.clone(),
        key_auth_route(json!({"keys": ["inline-key"]})),
    ))
    .await;
    assert!(gateway.errors().is_empty(), "{:?}", gateway.errors());

    // A consumer's key: the upstream learns who, and a client's own claim is dropped.
    let reply = get_with(
        &gateway.url("/a"),
        &[
            ("x-api-key", "alice-key"),
            ("x-consumer-username", "mallory"),
        ],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["headers"]["x-consumer-username"], "alice");

    // An inline key still works, names no consumer, and a forged name never reaches upstream.
    let reply = get_with(
        &gateway.url("/b"),
        &[("x-api-key", "inline-key"), ("x-consumer-username", "bob")],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert!(reply.json()["headers"].get("x-consumer-username").is_none());

    // Unknown keys, and another plugin's credential fields, let nobody in.
    for key in ["nobody", "team", "a"] {
        let reply = get_with(&gateway.url("/c"), &[("x-api-key", key)]).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{key}");
    }

    let log = gateway.access_log(5).await;
    assert_eq!(log[0]["consumer"], "alice");
    assert!(log[1].get("consumer").is_none(), "{}", log[1]);

    // Requests are counted by consumer only where the server section says so.
    let by_consumer = "weir_consumer_http_requests_total{";
    let metrics = get(&gateway.admin_url("/metrics")).await.text();
    assert!(!metrics.contains(by_consumer), "{metrics}");

    // Consumers change live: bob's key goes, carol comes, and two consumers sharing a key is
    // refused for both rather than guessed. Counting by consumer is switched on.
    let mut reloaded: Value = serde_json::from_str(&config(
        &up,
        json!([
            {"name": "alice", "credentials": {"key-auth": {"key": "alice-key"}}},
            {"name": "carol", "credentials": {"key-auth": {"key": "carol-key"}}},
            {"name": "dave", "credentials": {"key-auth": {"key": "shared"}}},
            {"name": "erin", "credentials": {"key-auth": {"key": "shared"}}},
        ]),
        key_auth_route(json!({"keys": ["inline-key"]})),
    ))
    .unwrap();
    reloaded["server"] = json!({"metrics_per_consumer": true});
    gateway.reload(&yaml(reloaded)).await;
    let status = |key: &'static str| {
        let url = gateway.url("/d");
        async move { get_with(&url, &[("x-api-key", key)]).await }
    };
    assert_eq!(status("bob-key").await.status, StatusCode::UNAUTHORIZED);
    let carol = status("carol-key").await;
    assert_eq!(carol.json()["headers"]["x-consumer-username"], "carol");
    assert_eq!(status("shared").await.status, StatusCode::UNAUTHORIZED);
    let metrics = get(&gateway.admin_url("/metrics")).await.text();
    assert!(
        metrics.contains(
            r#"weir_consumer_http_requests_total{route="r",consumer="carol",class="2xx"} 1"#
        ),
        "{metrics}"
    );
    assert!(
        !metrics.contains(r#"consumer="bob""#),
        "a refused key names no consumer: {metrics}"
    );

    let status = admin_get(&gateway.admin_url("/v1/status")).await.json();
    assert_eq!(status["consumers"], 4, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_consumers_grant_only_inline_keys_work() {
    let up = Upstream::start("u").await;
    let yaml = yaml(json!({
        "upstreams": [{"id": "u", "nodes": [node(&up)]}],
        "plugins": [{"name": "key-auth", "module": plugins::KEY_AUTH}],
        "consumers": [{"name": "alice", "credentials": {"key-auth": {"key": "alice-key"}}}],
        "routes": key_auth_route(json!({"keys": ["inline-key"]})),
    }));
    let gateway = TestGateway::start(&yaml).await;
    assert!(gateway.errors().is_empty(), "{:?}", gateway.errors());
    let inline = get_with(&gateway.url("/"), &[("x-api-key", "inline-key")]).await;
    assert_eq!(inline.status, StatusCode::OK);
    let consumer = get_with(&gateway.url("/"), &[("x-api-key", "alice-key")]).await;
    assert_eq!(consumer.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_consumer_is_refused_at_its_field_and_the_rest_load() {
    let up = Upstream::start("u").await;
    let gateway = TestGateway::start(&config(
        &up,
        json!([
            {"name": "ok", "credentials": {"key-auth": {"key": "ok-key"}}},
            {"name": "bad name", "credentials": {"key-auth": {"key": "k"}}},
            {"name": "flat", "credentials": {"key-auth": "not an object"}},
        ]),
        key_auth_route(json!({})),
    ))
    .await;
    let errors = gateway.errors();
    let reason = |id: &str| {
        errors
            .iter()
            .find(|e| e.id == id || e.reason.contains(id))
            .map(|e| e.reason.clone())
            .unwrap_or_else(|| panic!("{id} was not refused: {errors:?}"))
    };
    assert!(reason("bad name").contains("/name"));
    assert!(reason("flat").contains("/credentials/key-auth"));
    let ok = get_with(&gateway.url("/"), &[("x-api-key", "ok-key")]).await;
    assert_eq!(ok.json()["headers"]["x-consumer-username"], "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_config_is_checked_against_the_plugins_own_schema_before_init() {
    let up = Upstream::start("u").await;
    let routes = json!([
        {"id": "good", "uri": "/good", "upstream_id": "u",
         "plugins": [{"name": "request-id", "config": {"header": "x-trace-id"}}]},
        {"id": "typo", "uri": "/typo", "upstream_id": "u",
         "plugins": [{"name": "request-id", "config": {"haeder": "x-trace-id"}}]},
        {"id": "wrong-type", "uri": "/wrong", "upstream_id": "u",
         "plugins": [{"name": "limit-count", "config": {"count": "three", "window_s": 60}}]},
        {"id": "py", "uri": "/py", "upstream_id": "u", "plugins": [{"name": "ab", "config": {"header": "x-user", "percent_b": 50}}]},
    ]);
    let mut entries = all_plugins();
    entries.as_array_mut().unwrap().push(json!({
        "name": "ab", "module": plugins::PYTHON_EXAMPLE,
        "grants": {"log": true, "clock": true, "kv": true, "metrics": true, "http": {"hosts": []},
                   "wasi": ["runtime", "clocks", "random"]},
        "limits": {"memory_mb": 128, "timeout_ms": 1000},
    }));
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "u", "nodes": [node(&up)]}],
        "plugins": entries,
        "routes": routes,
    })))
    .await;
    let errors = gateway.errors();
    let reason = |id: &str| gateway.refusal(id);
    assert!(
        reason("typo").contains("does not match the plugin's schema"),
        "{}",
        reason("typo")
    );
    assert!(reason("typo").contains("haeder"), "{}", reason("typo"));
    assert!(
        reason("wrong-type").contains("/count"),
        "{}",
        reason("wrong-type")
    );
    assert!(
        !errors.iter().any(|e| e.id == "good" || e.id == "py"),
        "{errors:?}"
    );

    // The admin API serves the schema the plugin described itself with.
    let schema = admin_get(&gateway.admin_url("/v1/schema/plugins/request-id")).await;
    assert_eq!(schema.status, StatusCode::OK, "{}", schema.text());
    assert!(
        schema.json()["properties"]["header"].is_object(),
        "{}",
        schema.text()
    );
    // So is the schema of a plugin no route uses: it described itself when its entry loaded,
    // which a form that builds the first route using it needs.
    let unused = admin_get(&gateway.admin_url("/v1/schema/plugins/body-crypt")).await;
    assert_eq!(unused.status, StatusCode::OK, "{}", unused.text());
    assert!(
        unused.json()["properties"]["keys"].is_object(),
        "{}",
        unused.text()
    );

    // Status says which world each plugin was built against: the Python example (built by
    // the tests with componentize-py against 0.1.0) loads and serves beside the SDK's plugins
    // (0.3.0, which includes 0.2.0's consumers and schemas).
    let status = admin_get(&gateway.admin_url("/v1/status")).await.json();
    let world = |name: &str| weir_tests::plugin_world(&status, name);
    assert_eq!(world("request-id"), Some(json!("0.3.0")));
    assert_eq!(world("ab"), Some(json!("0.1.0")));
    let py = admin_get(&gateway.admin_url("/v1/schema/plugins/ab")).await;
    assert_eq!(py.status, StatusCode::NOT_FOUND);
    assert!(py.text().contains("0.1.0"), "{}", py.text());
    let reply = get_with(&gateway.url("/py"), &[("x-user", "u1")]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_response_headers_mark_replies_and_gateway_errors_too() {
    let up = Upstream::start("u").await;
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [
            {"id": "u", "nodes": [node(&up)]},
            // Nothing listens on port 1: the gateway answers 502 itself.
            {"id": "down", "nodes": [{"host": "127.0.0.1", "port": 1}], "retries": 0},
        ],
        "plugins": all_plugins(),
        "routes": [
            {"id": "refused", "uri": "/refused", "upstream_id": "u", "plugins": [
                {"name": "request-id"},
                {"name": "key-auth", "config": {"keys": ["k"]}},
            ]},
            {"id": "down", "uri": "/down", "upstream_id": "down",
             "plugins": [{"name": "request-id"}, {"name": "headers", "config": {
                 "response": {"set": {"x-frame-options": "DENY"}}}}]},
        ],
    })))
    .await;
    // key-auth answers 401 after request-id ran: the reply still carries the id.
    let reply = get_with(&gateway.url("/refused"), &[]).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(reply.header("x-request-id").map(str::len), Some(36));
    // The gateway's own 502 carries both plugins' queued headers.
    let reply = get_with(&gateway.url("/down"), &[]).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.text());
    assert_eq!(reply.header("x-frame-options"), Some("DENY"));
    let id = reply.header("x-request-id").expect("the id is stamped");
    assert!(reply.text().contains(id), "{}", reply.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_count_counts_each_consumer_on_its_own() {
    let up = Upstream::start("u").await;
    let gateway = TestGateway::start(&config(
        &up,
        json!([
            {"name": "alice", "credentials": {"key-auth": {"key": "alice-key"}}},
            {"name": "bob", "credentials": {"key-auth": {"key": "bob-key"}}},
        ]),
        json!([{"id": "r", "uri": "/*", "upstream_id": "u", "plugins": [
            {"name": "key-auth", "config": {}},
            {"name": "limit-count", "config": {"count": 2, "window_s": 60, "key": "consumer"}},
        ]}]),
    ))
    .await;
    assert!(gateway.errors().is_empty(), "{:?}", gateway.errors());
    let call = |key: &'static str| {
        let url = gateway.url("/");
        async move { get_with(&url, &[("x-api-key", key)]).await.status }
    };
    // Both come from one address: only the consumer tells them apart.
    for _ in 0..2 {
        assert_eq!(call("alice-key").await, StatusCode::OK);
    }
    assert_eq!(call("alice-key").await, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(call("bob-key").await, StatusCode::OK);
    assert_eq!(call("bob-key").await, StatusCode::OK);
    assert_eq!(call("bob-key").await, StatusCode::TOO_MANY_REQUESTS);
}

/// A plugin may mark a request only as a consumer with a credential in a section its grant
/// lists: a `key-auth` plugin cannot claim a consumer that only `jwt-auth` knows (another
/// tenant's, say), and the refusal does not tell that consumer from one that does not exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_can_set_only_consumers_of_its_granted_credentials() {
    let up = Upstream::start("u").await;
    let mut grants = weir_tests::probe_grants();
    grants["consumers"] = json!(["key-auth"]);
    let claim = |id: &str, name: &str| {
        json!({"id": id, "uri": format!("/{id}"), "upstream_id": "u",
               "plugins": [{"name": "claimer", "config": {"mode": "set-consumer", "name": name}}]})
    };
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "u", "nodes": [node(&up)]}],
        "plugins": [weir_tests::probe_entry("claimer", json!({"grants": grants}))],
        "consumers": [
            {"name": "alice", "credentials": {"key-auth": {"key": "alice-key"}}},
            {"name": "bob", "credentials": {"jwt-auth": {"key": "bob", "secret": "s"}}},
            {"name": "carol"},
        ],
        "routes": [claim("alice", "alice"), claim("bob", "bob"), claim("carol", "carol"), claim("nobody", "nobody")],
    })))
    .await;
    assert!(gateway.errors().is_empty(), "{:?}", gateway.errors());

    let reply = get(&gateway.url("/alice")).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["headers"]["x-consumer-username"], "alice");

    let mut refusals = Vec::new();
    for id in ["bob", "carol", "nobody"] {
        let reply = get(&gateway.url(&format!("/{id}"))).await;
        assert_eq!(
            reply.status,
            StatusCode::FORBIDDEN,
            "{id}: {}",
            reply.text()
        );
        refusals.push(reply.json()["error"].clone());
    }
    assert_eq!(refusals[0], refusals[1], "{refusals:?}");
    assert_eq!(refusals[0], refusals[2], "{refusals:?}");
    assert_eq!(up.hits(), 1);
}
