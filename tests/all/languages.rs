//! Plugins in three languages, each built from source by tests/build.rs (cargo, componentize-py,
//! componentize-js) and run through a gateway process with config, kv and log; and the module
//! cache that keeps big components from being compiled again on restart.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::Full;
use serde_json::{Value, json};
use weir_tests::admin_get;
use weir_tests::{
    Behaviour, ChildGateway, TestGateway, Upstream, eventually, get, node, plugins, request, send,
    yaml,
};

/// Grants for a component built with a language runtime: it imports every weir interface, and
/// WASI files, sockets (linked with nothing behind them), clocks and random.
fn runtime_grants() -> Value {
    json!({"log": true, "clock": true, "kv": true, "metrics": true, "http": {"hosts": []},
           "wasi": ["runtime", "clocks", "random"]})
}

fn python_entry() -> Value {
    json!({"name": "ab", "module": plugins::PYTHON_EXAMPLE, "grants": runtime_grants(),
           "limits": {"memory_mb": 128, "timeout_ms": 1000}})
}

fn js_entry() -> Value {
    json!({"name": "redact", "module": plugins::JS_EXAMPLE, "grants": runtime_grants(),
           "limits": {"memory_mb": 128, "timeout_ms": 1000}})
}

async fn get_as(url: &str, user: &str) -> weir_tests::Reply {
    send(
        request(Method::GET, url)
            .header("x-user", user)
            .body(Full::<Bytes>::default())
            .unwrap(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_example_counts_in_the_kv_and_logs() {
    let up = Upstream::start("u").await;
    let gateway = ChildGateway::start(&yaml(json!({
        "upstreams": [{"id": "u", "nodes": [node(&up)]}],
        "plugins": [{"name": "stamp", "module": plugins::RUST_EXAMPLE, "grants": {"kv": true, "log": true}}],
        "routes": [{"id": "r", "uri": "/*", "upstream_id": "u", "plugins": [
            {"name": "stamp", "config": {"header": "x-stamp", "block_path": "/admin"}},
        ]}],
    })))
    .await;
    for expected in 1..=3 {
        let reply = get(&format!("{}/hello", gateway.url)).await;
        assert_eq!(reply.header("x-stamped"), Some("yes"));
        assert_eq!(reply.json()["headers"]["x-stamp"], expected.to_string());
    }
    assert_eq!(
        get(&format!("{}/admin", gateway.url)).await.status,
        StatusCode::FORBIDDEN
    );
    assert!(
        gateway.log().contains("stamp has seen 1 requests"),
        "{}",
        gateway.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_example_splits_users_and_keeps_them_sticky() {
    let up = Upstream::start("u").await;
    let gateway = ChildGateway::start(&yaml(json!({
        "upstreams": [{"id": "u", "nodes": [node(&up)]}],
        "plugins": [python_entry()],
        "routes": [
            {"id": "ab", "uri": "/*", "upstream_id": "u", "plugins": [{"name": "ab", "config": {"header": "x-user", "percent_b": 50}}]},
            {"id": "bad", "uri": "/bad", "upstream_id": "u", "plugins": [{"name": "ab", "config": {"percent_b": 200}}]},
        ],
    })))
    .await;
    let url = format!("{}/page", gateway.url);
    let mut variants = std::collections::HashMap::new();
    for round in 0..2 {
        for user in [
            "ada", "grace", "alan", "barbara", "edsger", "donald", "frances", "john",
        ] {
            let reply = get_as(&url, user).await;
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
            let variant = reply.header("x-ab-variant").unwrap().to_owned();
            // The upstream saw the same variant the client is told.
            assert_eq!(reply.json()["headers"]["x-ab-variant"], variant.as_str());
            if round == 0 {
                variants.insert(user, variant);
            } else {
                assert_eq!(variants[user], variant, "{user} changed variant");
            }
        }
    }
    let seen: std::collections::HashSet<_> = variants.values().collect();
    assert_eq!(
        seen.len(),
        2,
        "8 users should land in both variants: {variants:?}"
    );
    assert!(
        gateway.log().contains("assigned ada to variant"),
        "{}",
        gateway.log()
    );
    // The plugin's init refused the other route's config, with its reason.
    let status = admin_get(&format!("{}/v1/status", gateway.admin))
        .await
        .json();
    let bad = status["errors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == "bad")
        .unwrap()
        .clone();
    assert!(
        bad["reason"]
            .as_str()
            .unwrap()
            .contains("percent_b must be a whole number from 0 to 100"),
        "{bad}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_javascript_example_redacts_json_fields() {
    let document = json!({"user": "ada", "password": "hunter2", "profile": {"token": "t", "items": [{"password": "x"}]}});
    let up = Upstream::start_with(
        "json",
        Behaviour {
            body: Some(Bytes::from(document.to_string())),
            content_type: Some("application/json"),
            ..Behaviour::default()
        },
    )
    .await;
    let text = Upstream::start_with(
        "text",
        Behaviour {
            body: Some(Bytes::from_static(b"{not json")),
            content_type: Some("application/json"),
            ..Behaviour::default()
        },
    )
    .await;
    let gateway = ChildGateway::start(&yaml(json!({
        "upstreams": [{"id": "json", "nodes": [node(&up)]}, {"id": "text", "nodes": [node(&text)]}],
        "plugins": [js_entry()],
        "routes": [
            {"id": "json", "uri": "/json", "upstream_id": "json",
             "plugins": [{"name": "redact", "config": {"fields": ["password", "token"]}}]},
            {"id": "text", "uri": "/text", "upstream_id": "text",
             "plugins": [{"name": "redact", "config": {"fields": ["password", "token"]}}]},
        ],
    })))
    .await;
    let reply = get(&format!("{}/json", gateway.url)).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.json(),
        json!({"user": "ada", "password": "[redacted]", "profile": {"token": "[redacted]", "items": [{"password": "[redacted]"}]}})
    );
    assert_eq!(reply.header("x-redacted-fields"), Some("3"));
    assert_eq!(
        reply.header("content-length"),
        Some(reply.body.len().to_string().as_str())
    );
    // The kv total is shared by every request.
    assert_eq!(
        get(&format!("{}/json", gateway.url))
            .await
            .header("x-redacted-total"),
        Some("6")
    );
    // A body that only claims to be JSON passes untouched; the plugin says so in the log.
    let plain = get(&format!("{}/text", gateway.url)).await;
    assert_eq!(plain.status, StatusCode::OK);
    assert_eq!(plain.header("x-redacted-fields"), None);
    assert_eq!(plain.text(), "{not json");
    let log = gateway.log();
    assert!(log.contains("response is not JSON, left as it is"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_loads_the_python_plugin_from_the_disk_cache() {
    let up = Upstream::start("u").await;
    let cache = tempfile::tempdir().unwrap();
    let config = yaml(json!({
        "upstreams": [{"id": "u", "nodes": [node(&up)]}],
        "plugins": [python_entry()],
        "routes": [{"id": "ab", "uri": "/*", "upstream_id": "u", "plugins": [{"name": "ab", "config": {}}]}],
    }));
    // How much time the cache saves is a benchmark's question; this test checks that the
    // restart loaded the artifact instead of compiling.
    for (start, expected) in [("first", "compiled"), ("restart", "disk")] {
        let gateway = TestGateway::start_cached(&config, cache.path()).await;
        assert_eq!(get(&gateway.url("/x")).await.status, StatusCode::OK);
        let metrics = get(&gateway.admin_url("/metrics")).await.text();
        let line = format!(r#"weir_module_loads_total{{source="{expected}"}} 1"#);
        assert!(metrics.contains(&line), "{start}: {line} in {metrics}");
        if expected == "disk" {
            assert!(
                !metrics.contains(r#"source="compiled""#),
                "the restart compiled again: {metrics}"
            );
        }
        gateway.stop().await;
    }
    // A damaged artifact is not trusted: it is compiled again and replaced.
    let artifact = walk(cache.path())
        .into_iter()
        .find(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .unwrap();
    std::fs::write(&artifact, b"not a compiled module").unwrap();
    let gateway = TestGateway::start_cached(&config, cache.path()).await;
    let metrics = get(&gateway.admin_url("/metrics")).await.text();
    assert!(
        metrics.contains(r#"weir_module_loads_total{source="compiled"} 1"#),
        "{metrics}"
    );
    eventually("the artifact is rewritten", Duration::from_secs(5), || {
        let size = std::fs::metadata(&artifact).map(|m| m.len()).unwrap_or(0);
        async move { size > 1_000_000 }
    })
    .await;
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}
