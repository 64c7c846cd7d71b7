//! The etcd control plane against a real etcd-server: live routes, service discovery, plugin
//! modules hot-loaded from etcd, outages, compaction, restarts from --state-dir, and two
//! gateway processes converging.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use http::StatusCode;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use weir::client::{PushSettings, push_plugin, register};
use weir::config::ServiceNode;
use weir::store::etcd::EtcdOptions;
use weir_tests::admin_get;
use weir_tests::etcd::Etcd;
use weir_tests::{TestGateway, Upstream, eventually, get, plugins};

/// A bound on waits for an event, not an expected time: plugin compiles share two cores with
/// every other test.
const SOON: Duration = Duration::from_secs(30);

fn options(etcd: &Etcd) -> EtcdOptions {
    EtcdOptions::new(vec![etcd.url.clone()])
}

async fn answers(url: String, status: StatusCode) -> bool {
    get(&url).await.status == status
}

async fn put_upstream(etcd: &Etcd, id: &str, upstream: &Upstream) {
    etcd.put(
        &format!("/weir/upstreams/{id}"),
        json!({"nodes": [{"host": "127.0.0.1", "port": upstream.port()}]}),
    )
    .await;
}

/// Pushes probe (or its variant) with the grants it needs to load.
fn probe_settings() -> PushSettings {
    PushSettings {
        grants: Some(serde_json::from_value(weir_tests::probe_grants()).unwrap()),
        ..PushSettings::default()
    }
}

async fn push(etcd: &Etcd, name: &str, file: &str) -> String {
    let bytes = std::fs::read(file).expect("a built component");
    push_plugin(&options(etcd), name, &bytes, &probe_settings())
        .await
        .expect("push")
        .sha256
}

/// An upstream, probe pushed as plugin `variant`, and route `/v` through it; returns the
/// upstream (keep it alive) and the module's sha256.
async fn variant_route(etcd: &Etcd) -> (Upstream, String) {
    let up = Upstream::start("u").await;
    put_upstream(etcd, "u", &up).await;
    let sha = push(etcd, "variant", plugins::PROBE).await;
    etcd.put(
        "/weir/routes/v",
        json!({"uri": "/v", "upstream_id": "u", "plugins": [{"name": "variant", "config": {"mode": "variant"}}]}),
    )
    .await;
    (up, sha)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_put_before_and_after_start_go_live() {
    let etcd = Etcd::start().await;
    let up = Upstream::start("u").await;
    put_upstream(&etcd, "u", &up).await;
    etcd.put(
        "/weir/routes/first",
        json!({"uri": "/first", "upstream_id": "u"}),
    )
    .await;
    let gateway = TestGateway::start_etcd(&etcd.url, None).await;
    assert_eq!(get(&gateway.url("/first")).await.status, StatusCode::OK);

    etcd.put(
        "/weir/routes/second",
        json!({"uri": "/second/*", "upstream_id": "u", "strip_prefix": true}),
    )
    .await;
    let url = gateway.url("/second/x");
    eventually("the new route serves", SOON, || {
        answers(url.clone(), StatusCode::OK)
    })
    .await;
    assert_eq!(get(&gateway.url("/second/x")).await.json()["path"], "/x");

    etcd.delete("/weir/routes/first").await;
    let url = gateway.url("/first");
    eventually("the deleted route is gone", SOON, || {
        answers(url.clone(), StatusCode::NOT_FOUND)
    })
    .await;
    let ready = get(&gateway.admin_url("/readyz")).await;
    assert_eq!(ready.status, StatusCode::OK);
    assert_eq!(ready.json()["store"], "etcd");
}

/// The whole config is read in pages at one revision: a config over the client's 4 MiB
/// response bound, in more keys than a page holds, loads whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_larger_than_a_page_loads_whole() {
    const ROUTES: usize = 2500;
    let etcd = Etcd::start().await;
    let up = Upstream::start("u").await;
    put_upstream(&etcd, "u", &up).await;
    let mut client = etcd.client().await;
    for start in (0..ROUTES).step_by(100) {
        let ops: Vec<etcd_client::TxnOp> = (start..start + 100)
            .map(|i| {
                // About 1.8 KB each, 4.4 MB in all.
                let mut uris = vec![format!("/r{i}/*")];
                uris.extend(
                    (0..14).map(|n| format!("/r{i}/{n}/{}", "long-path-segment".repeat(7))),
                );
                let route = json!({"uris": uris, "upstream_id": "u"});
                etcd_client::TxnOp::put(format!("/weir/routes/r{i:05}"), route.to_string(), None)
            })
            .collect();
        client
            .txn(etcd_client::Txn::new().and_then(ops))
            .await
            .expect("loading routes");
    }
    let gateway = TestGateway::start_etcd(&etcd.url, None).await;
    assert_eq!(gateway.gateway().snapshot().route_list.len(), ROUTES);
    for i in [0, 999, 1000, 2001, ROUTES - 1] {
        let reply = get(&gateway.url(&format!("/r{i}/x"))).await;
        assert_eq!(reply.status, StatusCode::OK, "route r{i:05}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_node_serves_until_its_lease_ends() {
    let etcd = Etcd::start().await;
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    etcd.put(
        "/weir/routes/users",
        json!({"uri": "/users/*", "service": "users"}),
    )
    .await;
    let gateway = TestGateway::start_etcd(&etcd.url, None).await;
    let url = gateway.url("/users/1");
    assert_eq!(get(&url).await.status, StatusCode::SERVICE_UNAVAILABLE);

    // Node a: registered with `register`, which keeps its lease alive until cancelled.
    let stop_a = CancellationToken::new();
    let node = ServiceNode {
        status: Default::default(),
        host: "127.0.0.1".into(),
        port: a.port(),
        weight: 1,
        meta: Default::default(),
    };
    let registration = tokio::spawn({
        let (options, stop) = (options(&etcd), stop_a.clone());
        async move { register(&options, "users", "a", &node, 2, stop).await }
    });
    eventually("node a serves", SOON, || async {
        get(&url).await.header("x-upstream") == Some("a")
    })
    .await;
    // Past its 2 s TTL, the kept-alive lease still holds.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(get(&url).await.header("x-upstream"), Some("a"));

    // Node b: a lease nobody keeps alive, as when a backend dies.
    etcd.put_with_lease(
        "/weir/services/users/b",
        json!({"host": "127.0.0.1", "port": b.port()}),
        2,
    )
    .await;
    eventually("both nodes serve", SOON, || async {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..4 {
            seen.insert(
                get(&url)
                    .await
                    .header("x-upstream")
                    .unwrap_or_default()
                    .to_owned(),
            );
        }
        seen.len() == 2
    })
    .await;
    eventually("b's lease expires and only a serves", SOON, || async {
        let mut only_a = true;
        for _ in 0..4 {
            only_a &= get(&url).await.header("x-upstream") == Some("a");
        }
        only_a
    })
    .await;
    assert!(b.hits() > 0);

    // Stopping the registration revokes the lease: a leaves at once.
    stop_a.cancel();
    registration.await.unwrap().unwrap();
    eventually("no node is left", Duration::from_secs(2), || async {
        get(&url).await.status == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    let body = get(&url).await.json();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("no live node for the route's service"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_star_takes_the_service_from_the_first_path_segment() {
    let etcd = Etcd::start().await;
    let (users, orders) = (
        Upstream::start("users").await,
        Upstream::start("orders").await,
    );
    etcd.put(
        "/weir/routes/discover",
        json!({"uri": "/*", "service": "*"}),
    )
    .await;
    for (name, up) in [("user-svc", &users), ("order-svc", &orders)] {
        etcd.put(
            &format!("/weir/services/{name}/n1"),
            json!({"host": "127.0.0.1", "port": up.port(), "meta": {"zone": "a"}}),
        )
        .await;
    }
    let gateway = TestGateway::start_etcd(&etcd.url, None).await;
    let reply = get(&gateway.url("/user-svc/api/x?q=1")).await;
    assert_eq!(reply.header("x-upstream"), Some("users"));
    assert_eq!(reply.json()["path"], "/api/x");
    assert_eq!(reply.json()["query"], "q=1");
    assert_eq!(get(&gateway.url("/order-svc")).await.json()["path"], "/");
    assert_eq!(
        get(&gateway.url("/order-svc")).await.header("x-upstream"),
        Some("orders")
    );
    assert_eq!(
        get(&gateway.url("/nobody/x")).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_plugin_swaps_under_load_without_a_failed_request_and_rolls_back() {
    let etcd = Etcd::start().await;
    let (_up, sha_a) = variant_route(&etcd).await;
    let gateway = TestGateway::start_etcd(&etcd.url, None).await;
    assert_eq!(get(&gateway.url("/v")).await.text(), "a");

    // Four clients hammer the route through the swap and the rollback.
    let stop = Arc::new(AtomicBool::new(false));
    let (served, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (url, stop, served, failed) = (
            gateway.url("/v"),
            stop.clone(),
            served.clone(),
            failed.clone(),
        );
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let reply = get(&url).await;
                let ok =
                    reply.status == StatusCode::OK && matches!(reply.text().as_str(), "a" | "b");
                if ok { &served } else { &failed }.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let sha_b = push(&etcd, "variant", plugins::PROBE_B).await;
    assert_ne!(sha_a, sha_b);
    let url = gateway.url("/v");
    eventually("variant b serves", SOON, || async {
        get(&url).await.text() == "b"
    })
    .await;
    let rolled_back = push(&etcd, "variant", plugins::PROBE).await;
    assert_eq!(rolled_back, sha_a);
    eventually("variant a serves again", SOON, || async {
        get(&url).await.text() == "a"
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0);
    assert!(
        served.load(Ordering::Relaxed) > 20,
        "only {} requests ran",
        served.load(Ordering::Relaxed)
    );
    let status = admin_get(&gateway.admin_url("/v1/status")).await.json();
    assert_eq!(status["plugins"][0]["sha256"], sha_a.as_str(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modules_no_entry_uses_are_dropped_from_memory() {
    let etcd = Etcd::start().await;
    let (_up, _) = variant_route(&etcd).await;
    let probe = std::fs::read(plugins::PROBE).unwrap();
    let gateway = TestGateway::start_etcd(&etcd.url, None).await;
    for swap in 0..12 {
        let module = weir_tests::with_custom_section(&probe, "weir-test-swap", &[swap]);
        let sha = push_plugin(&options(&etcd), "variant", &module, &probe_settings())
            .await
            .unwrap()
            .sha256;
        eventually("the swapped module serves", SOON, || {
            let live = gateway.gateway().snapshot().plugins["variant"]
                .module
                .sha256
                == sha;
            async move { live }
        })
        .await;
        assert_eq!(get(&gateway.url("/v")).await.text(), "a");
    }
    // One module in use, and at most four kept for quick rollbacks.
    let live = gateway.gateway().runtime().live_modules();
    assert!(
        live <= 5,
        "{live} compiled modules are still alive after 12 swaps"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_module_and_a_bad_route_are_rejected_while_the_old_config_serves() {
    let etcd = Etcd::start().await;
    let (_up, _) = variant_route(&etcd).await;
    let gateway = TestGateway::start_etcd(&etcd.url, None).await;
    assert_eq!(get(&gateway.url("/v")).await.text(), "a");

    // Bytes that are not a component.
    let options = options(&etcd);
    push_plugin(
        &options,
        "variant",
        b"\0asm not a component",
        &probe_settings(),
    )
    .await
    .unwrap();
    let admin = gateway.admin_url("/v1/status");
    eventually("the bad module is reported", SOON, || async {
        let status = admin_get(&admin).await.json();
        status["errors"].as_array().unwrap().iter().any(|e| {
            e["id"] == "variant"
                && e["reason"]
                    .as_str()
                    .unwrap()
                    .contains("module does not compile")
        })
    })
    .await;
    assert_eq!(get(&gateway.url("/v")).await.text(), "a");

    // A plugin entry naming a module that is not stored.
    etcd.put("/weir/plugins/ghost", json!({"sha256": "0".repeat(64)}))
        .await;
    // A route with an unknown field, over a route that was serving.
    etcd.put(
        "/weir/routes/v",
        json!({"uri": "/v", "upstream_id": "u", "colour": "red"}),
    )
    .await;
    eventually("both are reported", SOON, || async {
        let status = admin_get(&admin).await.json();
        let errors = status["errors"].as_array().unwrap().clone();
        let has = |id: &str, text: &str| {
            errors
                .iter()
                .any(|e| e["id"] == id && e["reason"].as_str().unwrap().contains(text))
        };
        has("ghost", "no such module") && has("v", "unknown field `colour`")
    })
    .await;
    let status = admin_get(&admin).await.json();
    let route_error = status["errors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == "v")
        .unwrap()
        .clone();
    assert_eq!(route_error["key"], "/weir/routes/v");
    // The route keeps its previous version, plugin and all.
    assert_eq!(get(&gateway.url("/v")).await.text(), "a");
    assert_eq!(
        get(&gateway.admin_url("/readyz")).await.status,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_survives_etcd_going_away_and_the_watch_resumes() {
    let mut etcd = Etcd::start().await;
    let up = Upstream::start("u").await;
    put_upstream(&etcd, "u", &up).await;
    etcd.put("/weir/routes/a", json!({"uri": "/a", "upstream_id": "u"}))
        .await;
    let gateway = TestGateway::start_etcd(&etcd.url, None).await;
    assert_eq!(get(&gateway.url("/a")).await.status, StatusCode::OK);

    etcd.kill();
    let ready = gateway.admin_url("/readyz");
    eventually("readyz reports the outage", SOON, || async {
        get(&ready).await.status == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    let health = get(&ready).await.json();
    assert_eq!(health["connected"], false);
    assert!(!health["reason"].as_str().unwrap().is_empty());
    for _ in 0..10 {
        assert_eq!(get(&gateway.url("/a")).await.status, StatusCode::OK);
    }

    etcd.restart().await;
    eventually("readyz recovers", Duration::from_secs(15), || async {
        get(&ready).await.status == StatusCode::OK
    })
    .await;
    etcd.put("/weir/routes/b", json!({"uri": "/b", "upstream_id": "u"}))
        .await;
    let url = gateway.url("/b");
    eventually("a change after the outage applies", SOON, || {
        answers(url.clone(), StatusCode::OK)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_etcd_down_serves_from_the_state_dir_then_resyncs_after_compaction() {
    let mut etcd = Etcd::start().await;
    let (_up, _) = variant_route(&etcd).await;
    let state = tempfile::tempdir().unwrap();
    let first = TestGateway::start_etcd(&etcd.url, Some(state.path().to_owned())).await;
    assert_eq!(get(&first.url("/v")).await.text(), "a");
    first.stop().await;

    // While no gateway watches: two changes, then a compaction past the first of them, so the
    // history after the saved revision is gone.
    etcd.put(
        "/weir/routes/new",
        json!({"uri": "/new", "upstream_id": "u"}),
    )
    .await;
    etcd.put(
        "/weir/routes/newer",
        json!({"uri": "/newer", "upstream_id": "u"}),
    )
    .await;
    etcd.compact().await;
    etcd.kill();

    // etcd is down: the new gateway starts from the saved config and module.
    let second = TestGateway::start_etcd(&etcd.url, Some(state.path().to_owned())).await;
    assert_eq!(get(&second.url("/v")).await.text(), "a");
    assert_eq!(get(&second.url("/new")).await.status, StatusCode::NOT_FOUND);
    assert_eq!(
        get(&second.url("/newer")).await.status,
        StatusCode::NOT_FOUND
    );
    let ready = get(&second.admin_url("/readyz")).await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);

    // etcd returns: resuming from the saved revision hits the compaction, so it resyncs.
    etcd.restart().await;
    let url = second.url("/new");
    eventually(
        "the change made while down applies",
        Duration::from_secs(15),
        || answers(url.clone(), StatusCode::OK),
    )
    .await;
    assert_eq!(get(&second.url("/newer")).await.status, StatusCode::OK);
    let metrics = get(&second.admin_url("/metrics")).await.text();
    assert!(metrics.contains("weir_store_resyncs_total 1"), "{metrics}");
    assert_eq!(
        get(&second.admin_url("/readyz")).await.status,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_gateway_saves_each_change_to_the_state_dir() {
    let etcd = Etcd::start().await;
    let (_up, _) = variant_route(&etcd).await;
    let state = tempfile::tempdir().unwrap();
    let gateway = TestGateway::start_etcd(&etcd.url, Some(state.path().to_owned())).await;
    let saved = state.path().join("etcd-state.json");
    // Two changes one after the other: the second is saved after the first's save is done.
    for id in ["saved-first", "saved-second"] {
        etcd.put(
            &format!("/weir/routes/{id}"),
            json!({"uri": format!("/{id}"), "upstream_id": "u"}),
        )
        .await;
        let key = format!("/weir/routes/{id}");
        eventually("the change is in the saved state", SOON, || {
            let saved = saved.clone();
            let key = key.clone();
            async move { std::fs::read_to_string(&saved).is_ok_and(|text| text.contains(&key)) }
        })
        .await;
    }
    assert_eq!(
        get(&gateway.url("/saved-second")).await.status,
        StatusCode::OK
    );
    gateway.stop().await;
}

/// The permission bits of `path`.
fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Starts a gateway on etcd at `url` (down) with `state` as its --state-dir, and says why it
/// could not start.
async fn refused_with_etcd_down(url: &str, state: &std::path::Path) -> String {
    let options = weir::GatewayOptions {
        config: weir::ConfigSource::Etcd(EtcdOptions {
            state_dir: Some(state.to_owned()),
            ..EtcdOptions::new(vec![url.to_owned()])
        }),
        listen: "127.0.0.1:0".parse().unwrap(),
        tls_listen: None,
        admin_listen: None,
        access_log: weir::AccessLogTarget::Off,
        module_cache: None,
        max_module_bytes: weir::store::etcd::DEFAULT_MAX_MODULE_BYTES,
        admin: weir_tests::test_admin(),
        workers: 0,
    };
    match weir::start(options).await {
        Ok(running) => {
            running.shutdown().await;
            panic!("the gateway started from a saved state it should not trust")
        }
        Err(error) => error.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_dir_is_the_gateways_alone_and_a_state_others_could_touch_is_not_served() {
    use std::os::unix::fs::PermissionsExt;
    let mut etcd = Etcd::start().await;
    let (_up, sha256) = variant_route(&etcd).await;
    let parent = tempfile::tempdir().unwrap();
    let state = parent.path().join("state");
    let gateway = TestGateway::start_etcd(&etcd.url, Some(state.clone())).await;
    assert_eq!(get(&gateway.url("/v")).await.text(), "a");
    gateway.stop().await;

    // It holds every secret in the store: made closed, not opened by the umask.
    let saved = state.join("etcd-state.json");
    let module = state.join("modules").join(format!("{sha256}.wasm"));
    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(&saved), 0o600);
    assert_eq!(mode(&state.join("modules")), 0o700);
    assert_eq!(mode(&module), 0o600);
    etcd.kill();

    // Readable by others: its secrets may be known, and it is not what this gateway wrote.
    std::fs::set_permissions(&saved, std::fs::Permissions::from_mode(0o644)).unwrap();
    let refused = refused_with_etcd_down(&etcd.url, &state).await;
    assert!(
        refused.contains("saved state in --state-dir is not used"),
        "{refused}"
    );
    assert!(refused.contains("etcd-state.json"), "{refused}");
    assert!(refused.contains("chmod 600"), "{refused}");
    std::fs::set_permissions(&saved, std::fs::Permissions::from_mode(0o600)).unwrap();

    // The folder opened to the group's writes: anyone in it could have replaced the file.
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o775)).unwrap();
    let refused = refused_with_etcd_down(&etcd.url, &state).await;
    assert!(refused.contains("that only it may write"), "{refused}");
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();

    // Another user's file, when this test can make one (as root, who owns what it made).
    if std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&saved).unwrap()) == 0 {
        std::os::unix::fs::chown(&saved, Some(65534), Some(65534)).unwrap();
        let refused = refused_with_etcd_down(&etcd.url, &state).await;
        assert!(refused.contains("owned by uid 65534"), "{refused}");
        std::os::unix::fs::chown(&saved, Some(0), Some(0)).unwrap();
    }

    // Closed again, it is served.
    let restarted = TestGateway::start_etcd(&etcd.url, Some(state.clone())).await;
    assert_eq!(get(&restarted.url("/v")).await.text(), "a");
    restarted.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateway_processes_converge() {
    let etcd = Etcd::start().await;
    let up = Upstream::start("u").await;
    put_upstream(&etcd, "u", &up).await;
    let here = TestGateway::start_etcd(&etcd.url, None).await;

    let child = weir_tests::ChildGateway::start_etcd(&etcd.url).await;
    let there = child.url.clone();
    assert_ne!(there, here.url(""));

    etcd.put(
        "/weir/routes/shared",
        json!({"uri": "/shared", "upstream_id": "u"}),
    )
    .await;
    for base in [here.url(""), there.clone()] {
        let url = format!("{base}/shared");
        eventually("both gateways serve the route", SOON, || {
            answers(url.clone(), StatusCode::OK)
        })
        .await;
    }
    etcd.delete("/weir/routes/shared").await;
    for base in [here.url(""), there.clone()] {
        let url = format!("{base}/shared");
        eventually("both gateways drop the route", SOON, || {
            answers(url.clone(), StatusCode::NOT_FOUND)
        })
        .await;
    }
    drop(child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_module_manifests_are_refused_before_anything_is_allocated() {
    let etcd = Etcd::start().await;
    let up = Upstream::start("u").await;
    put_upstream(&etcd, "u", &up).await;
    etcd.put("/weir/routes/r", json!({"uri": "/r", "upstream_id": "u"}))
        .await;
    let gateway = TestGateway::start_etcd(&etcd.url, None).await;
    let url = gateway.url("/r");
    assert_eq!(get(&url).await.status, StatusCode::OK);
    let cases = [
        // 100 GiB: reading it would exhaust memory before the sha256 could be checked.
        (
            json!({"size": 107_374_182_400u64, "chunks": 102_400}),
            "over the 67108864-byte bound",
        ),
        (
            json!({"size": 10, "chunks": 1_000_000}),
            "has 1 chunks, not 1000000",
        ),
        (
            json!({"size": 18_446_744_073_709_551_615u64, "chunks": 0}),
            "over the",
        ),
        (json!({"size": -1, "chunks": 1}), "bad manifest"),
        (
            json!({"size": 10, "chunks": 1, "extra": true}),
            "bad manifest",
        ),
    ];
    for (index, (manifest, reason)) in cases.iter().enumerate() {
        let sha = format!("{index:064x}");
        etcd.put(&format!("/weir/modules/{sha}"), manifest.clone())
            .await;
        etcd.put(
            &format!("/weir/plugins/hostile-{index}"),
            json!({"sha256": sha}),
        )
        .await;
        eventually("the manifest is refused", SOON, || async {
            gateway
                .errors()
                .iter()
                .any(|e| e.id == format!("hostile-{index}") && e.reason.contains(reason))
        })
        .await;
    }
    // A chunk longer than its manifest says is refused as it arrives.
    let sha = format!("{:064x}", 99);
    etcd.put(
        &format!("/weir/modules/{sha}"),
        json!({"size": 4, "chunks": 1}),
    )
    .await;
    etcd.put_raw(&format!("/weir/modules/{sha}/000000"), vec![0u8; 1 << 20])
        .await;
    etcd.put("/weir/plugins/long-chunk", json!({"sha256": sha}))
        .await;
    eventually("the long chunk is refused", SOON, || async {
        gateway
            .errors()
            .iter()
            .any(|e| e.id == "long-chunk" && e.reason.contains("more than the manifest's 4 bytes"))
    })
    .await;
    assert_eq!(get(&url).await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_section_lives_at_weir_server() {
    let etcd = Etcd::start().await;
    let up = Upstream::start("u").await;
    put_upstream(&etcd, "u", &up).await;
    etcd.put("/weir/routes/r", json!({"uri": "/*", "upstream_id": "u"}))
        .await;
    let gateway = TestGateway::start_etcd(&etcd.url, None).await;
    let many: Vec<(String, &str)> = (0..12).map(|i| (format!("x-h{i}"), "1")).collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(n, v)| (n.as_str(), *v)).collect();
    let reply = weir_tests::raw_request(gateway.addr(), &weir_tests::raw_get("/", &many)).await;
    assert_eq!(reply.status, 200);
    etcd.put("/weir/server", json!({"max_headers": 10})).await;
    eventually("the limit applies", SOON, || async {
        weir_tests::raw_request(gateway.addr(), &weir_tests::raw_get("/", &many))
            .await
            .status
            == 431
    })
    .await;
    // A bad value is reported, and the limit that was serving stays.
    etcd.put("/weir/server", json!({"max_headers": 0})).await;
    eventually("the bad server object is reported", SOON, || async {
        gateway
            .errors()
            .iter()
            .any(|e| e.kind == weir::config::Kind::Server && e.reason.contains("max_headers 0"))
    })
    .await;
    let reply = weir_tests::raw_request(gateway.addr(), &weir_tests::raw_get("/", &many)).await;
    assert_eq!(reply.status, 431);
}

/// The seed's "dynamic IP firewall": ip-restriction's lists change in etcd and the next
/// requests see the change, with no restart and nothing else touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ip_restriction_list_changed_in_etcd_is_live() {
    let etcd = Etcd::start().await;
    let up = Upstream::start("u").await;
    put_upstream(&etcd, "u", &up).await;
    let bytes = std::fs::read(plugins::IP_RESTRICTION).expect("a built component");
    push_plugin(
        &options(&etcd),
        "ip-restriction",
        &bytes,
        &PushSettings::default(),
    )
    .await
    .expect("push");
    let route = |deny: &str| {
        json!({"uri": "/fw", "upstream_id": "u",
               "plugins": [{"name": "ip-restriction", "config": {"deny": [deny]}}]})
    };
    etcd.put("/weir/routes/fw", route("192.0.2.0/24")).await;
    let gateway = TestGateway::start_etcd(&etcd.url, None).await;
    let url = gateway.url("/fw");
    assert_eq!(get(&url).await.status, StatusCode::OK);

    // The test's own address goes on the deny list: refused from the next request on.
    etcd.put("/weir/routes/fw", route("127.0.0.0/8")).await;
    eventually("127.0.0.1 is denied", SOON, || {
        answers(url.clone(), StatusCode::FORBIDDEN)
    })
    .await;
    // And off it again.
    etcd.put("/weir/routes/fw", route("198.51.100.7")).await;
    eventually("127.0.0.1 is allowed again", SOON, || {
        answers(url.clone(), StatusCode::OK)
    })
    .await;
}
