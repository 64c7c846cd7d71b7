//! Hostile tenant plugins, each run through a gateway process while a well-behaved route serves
//! concurrent load. For each, the hostile route answers as its policy says, the well-behaved
//! route has no failure, the process stays up, and its RSS after 10,000 hostile requests is
//! within 20% of what it was before them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use http::StatusCode;
use serde_json::{Value, json};
use weir_tests::admin_get;
use weir_tests::{ChildGateway, Reply, Upstream, get, node, plugins, probe_entry, yaml};

const HOSTILE_REQUESTS: usize = 10_000;
const HOSTILE_CLIENTS: usize = 16;

/// One hostile plugin: its entries, the route config it runs with, and what its route must answer.
struct Hostile {
    plugins: Vec<Value>,
    tenants: Vec<Value>,
    /// The chain of the hostile route.
    chain: Value,
    /// A route to call once before the siege: (path, plugin, its config).
    setup: Option<(&'static str, &'static str, Value)>,
    expect: fn(&Reply) -> Result<(), String>,
}

/// A fail-closed plugin's failure: 500, or 503 once it is quarantined.
fn failed_closed(reply: &Reply) -> Result<(), String> {
    let status = reply.status;
    if status != StatusCode::INTERNAL_SERVER_ERROR && status != StatusCode::SERVICE_UNAVAILABLE {
        return Err(format!(
            "expected 500 or 503, got {status}: {}",
            reply.text()
        ));
    }
    let body = reply.json();
    if !body["error"]
        .as_str()
        .unwrap_or_default()
        .starts_with("plugin hostile failed")
    {
        return Err(format!("unexpected error body {body}"));
    }
    Ok(())
}

async fn siege(upstream: &Upstream, hostile: Hostile) -> ChildGateway {
    let mut plugins = hostile.plugins;
    plugins.push(probe_entry("counter", json!({})));
    let mut routes = vec![
        json!({"id": "ok", "uri": "/ok", "upstream_id": "u",
               "plugins": [{"name": "counter", "config": {"mode": "count", "key": "ok"}}]}),
        json!({"id": "hostile", "uri": "/hostile", "upstream_id": "u", "plugins": hostile.chain}),
    ];
    if let Some((path, plugin, config)) = &hostile.setup {
        routes.push(json!({"id": "setup", "uri": path, "upstream_id": "u",
                           "plugins": [{"name": plugin, "config": config}]}));
    }
    let config = yaml(json!({
        "upstreams": [{"id": "u", "nodes": [node(upstream)]}],
        "tenants": hostile.tenants,
        "plugins": plugins,
        "routes": routes,
    }));
    let mut gateway = ChildGateway::start(&config).await;
    let ok_url = format!("{}/ok", gateway.url);
    let hostile_url = format!("{}/hostile", gateway.url);
    if let Some((path, _, _)) = &hostile.setup {
        let reply = get(&format!("{}{path}", gateway.url)).await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "setup {path}: {}",
            reply.text()
        );
    }
    for _ in 0..200 {
        assert_eq!(get(&ok_url).await.status, StatusCode::OK);
    }
    // A first burst at the siege's concurrency: what the gateway allocates once for that
    // (instances, connection buffers, kv contents up to quota) is not growth.
    let burst: Vec<_> = (0..HOSTILE_CLIENTS * 2)
        .map(|_| tokio::spawn(get_owned(hostile_url.clone())))
        .collect();
    for reply in burst {
        (hostile.expect)(&reply.await.unwrap()).unwrap();
    }
    let rss_before = gateway.rss_kib();

    // The well-behaved route serves throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let (served, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let neighbours: Vec<_> = (0..2)
        .map(|_| {
            let (url, stop, served, failed) =
                (ok_url.clone(), stop.clone(), served.clone(), failed.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let ok = get(&url).await.status == StatusCode::OK;
                    if ok { &served } else { &failed }.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();

    let sent = Arc::new(AtomicUsize::new(0));
    let attackers: Vec<_> = (0..HOSTILE_CLIENTS)
        .map(|_| {
            let (url, sent, expect) = (hostile_url.clone(), sent.clone(), hostile.expect);
            tokio::spawn(async move {
                while sent.fetch_add(1, Ordering::Relaxed) < HOSTILE_REQUESTS {
                    let reply = get(&url).await;
                    expect(&reply)?;
                }
                Ok::<(), String>(())
            })
        })
        .collect();
    for attacker in attackers {
        attacker.await.unwrap().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for neighbour in neighbours {
        neighbour.await.unwrap();
    }

    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "the well-behaved route failed"
    );
    assert!(served.load(Ordering::Relaxed) > 0);
    assert!(gateway.alive(), "the gateway process died");
    assert_eq!(
        get(&format!("{}/healthz", gateway.admin)).await.status,
        StatusCode::OK
    );
    let rss_after = gateway.rss_kib();
    assert!(
        rss_after as f64 <= rss_before as f64 * 1.2,
        "RSS grew from {rss_before} KiB to {rss_after} KiB over {HOSTILE_REQUESTS} hostile requests"
    );
    gateway
}

async fn get_owned(url: String) -> Reply {
    get(&url).await
}

fn hostile_probe(extra: Value) -> Vec<Value> {
    vec![probe_entry("hostile", extra)]
}

fn chain(config: Value) -> Value {
    json!([{"name": "hostile", "config": config}])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_infinite_loop() {
    let up = Upstream::start("u").await;
    siege(
        &up,
        Hostile {
            plugins: hostile_probe(json!({"limits": {"timeout_ms": 20}})),
            tenants: vec![],
            chain: chain(json!({"mode": "loop"})),
            setup: None,
            expect: failed_closed,
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_bomb() {
    let up = Upstream::start("u").await;
    siege(
        &up,
        Hostile {
            plugins: hostile_probe(json!({"limits": {"memory_mb": 16}})),
            tenants: vec![],
            chain: chain(json!({"mode": "alloc"})),
            setup: None,
            expect: failed_closed,
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbounded_recursion() {
    let up = Upstream::start("u").await;
    siege(
        &up,
        Hostile {
            plugins: hostile_probe(json!({})),
            tenants: vec![],
            chain: chain(json!({"mode": "recurse"})),
            setup: None,
            expect: failed_closed,
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic() {
    let up = Upstream::start("u").await;
    siege(
        &up,
        Hostile {
            plugins: hostile_probe(json!({})),
            tenants: vec![],
            chain: chain(json!({"mode": "panic"})),
            setup: None,
            expect: failed_closed,
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_added_headers() {
    let up = Upstream::start("u").await;
    siege(
        &up,
        Hostile {
            plugins: hostile_probe(json!({})),
            tenants: vec![],
            chain: chain(json!({"mode": "header-flood", "count": 10_000})),
            setup: None,
            expect: failed_closed,
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_megabyte_body_write() {
    let up = Upstream::start("u").await;
    siege(
        &up,
        Hostile {
            // Memory enough to build the body, so that the body bound is what stops it.
            plugins: hostile_probe(
                json!({"limits": {"memory_mb": 256, "max_body_bytes": 1_048_576}}),
            ),
            tenants: vec![],
            chain: chain(json!({"mode": "body-flood", "bytes": 100_000_000})),
            setup: None,
            expect: failed_closed,
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kv_flood() {
    let up = Upstream::start("u").await;
    siege(
        &up,
        Hostile {
            plugins: hostile_probe(json!({"tenant": "flooders"})),
            tenants: vec![
                json!({"name": "flooders", "quotas": {"kv_entries": 50, "kv_bytes": 1_048_576}}),
            ],
            chain: chain(json!({"mode": "kv-flood", "count": 100_000, "size": 1024})),
            setup: None,
            expect: failed_closed,
        },
    )
    .await;
}

/// Probe's grants, with outbound calls allowed to `upstream` only.
fn granted_one_host(upstream: &Upstream) -> Value {
    let mut grants = weir_tests::probe_grants();
    grants["http"] = json!({"hosts": [format!("127.0.0.1:{}", upstream.port())]});
    grants
}

fn callout_refused(reply: &Reply) -> Result<(), String> {
    let body = reply.json();
    let error = body["error"].as_str().unwrap_or_default();
    if reply.status != StatusCode::BAD_GATEWAY || !error.contains("is not granted") {
        return Err(format!(
            "expected the plugin's 502 naming the refused host, got {}: {body}",
            reply.status
        ));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callout_to_a_host_that_is_not_granted() {
    let up = Upstream::start("u").await;
    let target = Upstream::start("not-granted").await;
    let url = format!("http://127.0.0.1:{}/steal", target.port());
    siege(
        &up,
        Hostile {
            // Granted one host; it calls another.
            plugins: vec![probe_entry(
                "hostile",
                json!({"grants": granted_one_host(&up)}),
            )],
            tenants: vec![],
            chain: chain(json!({"mode": "callout", "url": url})),
            setup: None,
            expect: callout_refused,
        },
    )
    .await;
    assert_eq!(target.hits(), 0, "the call must never leave the gateway");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callout_to_a_granted_host_goes_through() {
    let up = Upstream::start("granted").await;
    let gateway = weir_tests::TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "u", "nodes": [node(&up)]}],
        "plugins": [probe_entry("caller", json!({"grants": granted_one_host(&up)}))],
        "routes": [{"id": "call", "uri": "/call", "upstream_id": "u", "plugins": [
            {"name": "caller", "config": {"mode": "callout", "url": format!("http://127.0.0.1:{}/fetched", up.port())}},
        ]}],
    })))
    .await;
    let reply = get(&gateway.url("/call")).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.header("x-callout-status"), Some("200"));
    assert_eq!(reply.json()["path"], "/fetched");
    assert_eq!(
        up.hits(),
        1,
        "only the callout reached the upstream: the plugin answered the client"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_granted_name_that_resolves_to_loopback_is_refused_unless_the_grant_says_private() {
    let up = Upstream::start("granted").await;
    // `localhost` is a name, as `hooks.team-a.example` is: whoever runs its DNS chooses where
    // it points, here at the gateway's own loopback.
    let host = format!("localhost:{}", up.port());
    let grants = |private: bool| {
        let mut grants = weir_tests::probe_grants();
        grants["http"] = json!({"hosts": [host.clone()]});
        if private {
            grants["http"]["private"] = json!(true);
        }
        grants
    };
    let call = |plugin: &str| json!([{"name": plugin, "config": {"mode": "callout", "url": format!("http://{host}/fetched")}}]);
    let gateway = weir_tests::TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "u", "nodes": [node(&up)]}],
        "plugins": [probe_entry("public-only", json!({"grants": grants(false)})),
                    probe_entry("private-too", json!({"grants": grants(true)}))],
        "routes": [
            {"id": "public-only", "uri": "/public-only", "upstream_id": "u", "plugins": call("public-only")},
            {"id": "private-too", "uri": "/private-too", "upstream_id": "u", "plugins": call("private-too")},
        ],
    })))
    .await;

    let refused = get(&gateway.url("/public-only")).await;
    assert_eq!(
        refused.status,
        StatusCode::BAD_GATEWAY,
        "{}",
        refused.text()
    );
    let error = refused.json()["error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(error.contains("not public"), "{error}");
    assert!(error.contains("private: true"), "{error}");
    assert!(
        !error.contains("127.0.0.1") && !error.contains("::1"),
        "the address it resolved to stays in the gateway: {error}"
    );
    assert_eq!(up.hits(), 0, "the call must never leave the gateway");

    assert!(gateway.errors().is_empty(), "{:?}", gateway.errors());
    let allowed = get(&gateway.url("/private-too")).await;
    assert_eq!(allowed.status, StatusCode::OK, "{}", allowed.text());
    assert_eq!(allowed.header("x-callout-status"), Some("200"));
    assert_eq!(allowed.json()["path"], "/fetched");
    assert_eq!(up.hits(), 1);
    // The upstream is asked for the granted name, not the address it was reached at.
    assert_eq!(allowed.json()["headers"]["host"], host.as_str());
}

fn refused_at_load(reply: &Reply) -> Result<(), String> {
    if reply.status != StatusCode::NOT_FOUND {
        return Err(format!(
            "the route should not exist, got {}: {}",
            reply.status,
            reply.text()
        ));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_that_imports_the_wasi_filesystem() {
    let up = Upstream::start("u").await;
    let gateway = siege(
        &up,
        Hostile {
            plugins: vec![json!({"name": "hostile", "module": plugins::FS_READER})],
            tenants: vec![],
            chain: json!([{"name": "hostile"}]),
            setup: None,
            expect: refused_at_load,
        },
    )
    .await;
    let status = admin_get(&format!("{}/v1/status", gateway.admin))
        .await
        .json();
    let reason = status["errors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "plugin" && e["id"] == "hostile")
        .map(|e| e["reason"].as_str().unwrap().to_owned())
        .unwrap_or_default();
    assert!(
        reason
            .contains("wasi:filesystem/preopens@0.2.6 (not granted; add grants: {wasi: [runtime]}"),
        "{status}"
    );
}

fn sees_nothing(reply: &Reply) -> Result<(), String> {
    if reply.status != StatusCode::OK || reply.text() != "none" {
        return Err(format!(
            "another tenant's key was visible: {} {}",
            reply.status,
            reply.text()
        ));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_reads_another_tenants_kv() {
    let up = Upstream::start("u").await;
    siege(
        &up,
        Hostile {
            plugins: vec![
                probe_entry("writer", json!({"tenant": "tenant-a"})),
                probe_entry("hostile", json!({"tenant": "tenant-b"})),
            ],
            tenants: vec![json!({"name": "tenant-a"}), json!({"name": "tenant-b"})],
            chain: chain(json!({"mode": "kv-read", "key": "secret"})),
            setup: Some((
                "/setup",
                "writer",
                json!({"mode": "kv-write", "key": "secret", "value": "a-only"}),
            )),
            expect: sees_nothing,
        },
    )
    .await;
}
