//! The dashboard in a real headless Chromium, against a real gateway on a real etcd: log in,
//! create a route with plugins through forms built from their schemas and see it serve, see a validation error
//! next to its field, switch a node offline and see traffic move, see the traffic and the
//! plugins' calls charted from the gateway's own history, visit every page, log out.
//! Each page's screenshot lands in target/screenshots (and docs/img with
//! `WEIR_UPDATE_SCREENSHOTS=1`).

use std::time::Duration;

use http::{Method, StatusCode};
use http_body_util::Full;
use serde_json::json;
use weir_tests::browser::Browser;
use weir_tests::etcd::Etcd;
use weir_tests::{ADMIN_KEY, TestGateway, Upstream, eventually, get, plugins, request, send};

const SOON: Duration = Duration::from_secs(30);

/// Writes through the API with the test key, for the set-up the browser does not do.
async fn admin_put(gateway: &TestGateway, path: &str, body: serde_json::Value) {
    let reply = send(
        request(Method::PUT, &gateway.admin_url(path))
            .header("x-api-key", ADMIN_KEY)
            .body(Full::new(body.to_string().into()))
            .unwrap(),
    )
    .await;
    assert!(reply.status.is_success(), "{path}: {}", reply.text());
}

/// The gateway's window of samples, `GET /v1/metrics/history`.
async fn history(gateway: &TestGateway) -> serde_json::Value {
    let reply = send(
        request(Method::GET, &gateway.admin_url("/v1/metrics/history"))
            .header("x-api-key", ADMIN_KEY)
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    reply.json()
}

/// Whether a column of the history has a value above zero.
fn above_zero(column: &serde_json::Value) -> bool {
    column
        .as_array()
        .is_some_and(|values| values.iter().any(|v| v.as_f64().is_some_and(|v| v > 0.0)))
}

/// Waits until the chart `id` is drawn (a uPlot canvas) with a value above zero in its
/// `series`th line: the page keeps each chart's uPlot instance on its element, and this reads
/// the data the chart draws.
async fn chart_draws(browser: &Browser, id: &str, series: usize) {
    browser.find(&format!("#{id} canvas")).await;
    let script = format!(
        "const u = document.getElementById('{id}').uplot; \
         return !!u && u.data[{series}].some((v) => v > 0);"
    );
    eventually(&format!("the chart {id} draws data"), SOON, || async {
        browser.client.execute(&script, vec![]).await.ok() == Some(json!(true))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_logs_in_creates_a_route_moves_traffic_and_logs_out() {
    let etcd = Etcd::start().await;
    let password = "correct horse battery";
    etcd.put(
        "/weir/admin",
        // A sample every second, so that the charts have points soon.
        json!({"accounts": [{"username": "alice", "role": "admin",
                             "password_hash": weir::admin::auth::hash_password(password)}],
               "metrics_history": {"interval_s": 1}}),
    )
    .await;
    let gateway = TestGateway::start_etcd(&etcd.url, None).await;
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    admin_put(
        &gateway,
        "/v1/upstreams/web",
        json!({"nodes": [{"host": "127.0.0.1", "port": a.port()}, {"host": "127.0.0.1", "port": b.port()}]}),
    )
    .await;
    let ca = weir_tests::tls::TestCa::new("dashboard CA");
    let leaf = ca.leaf(&["shop.test", "www.shop.test"]);
    admin_put(
        &gateway,
        "/v1/ssl/shop",
        json!({"cert": leaf.cert_pem, "key": leaf.key_pem, "snis": ["shop.test"]}),
    )
    .await;
    let browser = Browser::start().await;
    browser
        .client
        .goto(&gateway.admin_url("/ui/"))
        .await
        .unwrap();
    browser.screenshot("login").await;
    // A wrong password is refused where the form is.
    browser.fill("#username", "alice").await;
    browser.fill("#password", "wrong").await;
    browser.click("#login-button").await;
    browser
        .find_text("#form-error", "wrong username or password")
        .await;
    browser.fill("#password", password).await;
    browser.click("#login-button").await;
    browser.find_text("header .who", "alice (admin)").await;

    // Modules uploaded on the Plugins page; their entries are put through the API (the
    // dashboard has no entry form yet).
    browser.click("#nav-plugins").await;
    let mut uploaded = Vec::new();
    for module in [plugins::HEADERS, plugins::LIMIT_COUNT] {
        let wasm = std::fs::canonicalize(module).unwrap();
        browser
            .find("#module-file")
            .await
            .send_keys(&wasm.display().to_string())
            .await
            .unwrap();
        browser.click("#upload-module").await;
        let sha256 = weir::digest::sha256_hex(&std::fs::read(&wasm).unwrap());
        browser.find_text("#uploaded", &sha256).await;
        uploaded.push(sha256);
    }
    admin_put(
        &gateway,
        "/v1/plugins/headers",
        json!({"sha256": uploaded[0]}),
    )
    .await;
    admin_put(
        &gateway,
        "/v1/plugins/limit-count",
        json!({"sha256": uploaded[1], "grants": {"kv": true, "clock": true}}),
    )
    .await;

    // A route with two plugins, through the form. Each plugin's fields come from the schema
    // it described itself with: typed inputs with the field's doc, JSON for objects.
    browser.click("#nav-routes").await;
    browser.click("#new-route").await;
    browser.fill("#route-id", "shop").await;
    browser.fill("#route-uri", "/shop/*").await;
    browser
        .find("#route-upstream")
        .await
        .select_by_value("web")
        .await
        .unwrap();
    for (index, plugin) in ["headers", "limit-count"].iter().enumerate() {
        browser.click("#add-plugin").await;
        browser
            .find(&format!("#plugin-name-{index}"))
            .await
            .select_by_value(plugin)
            .await
            .unwrap();
    }
    browser
        .fill(
            "#plugin-0-field-response",
            r#"{"set": {"x-made-by": "dashboard"}}"#,
        )
        .await;
    browser
        .find_text(
            ".plugin-row[data-plugin=limit-count]",
            "Requests allowed per window",
        )
        .await;
    browser.fill("#plugin-1-field-count", "1000").await;
    browser.fill("#plugin-1-field-window_s", "86400").await;
    browser
        .find("#plugin-1-field-window_type")
        .await
        .select_by_value("sliding")
        .await
        .unwrap();
    browser.screenshot("route-plugin-form").await;
    // The same config as JSON, which is what is saved.
    browser.click("#plugin-1-mode-json").await;
    let config = browser
        .find("#plugin-config-1")
        .await
        .prop("value")
        .await
        .unwrap();
    let config: serde_json::Value = serde_json::from_str(&config.unwrap()).unwrap();
    assert_eq!(
        config,
        json!({"count": 1000, "window_s": 86400, "window_type": "sliding"})
    );
    browser.click("#save-route").await;
    browser.find("#routes tr[data-route=shop]").await;
    eventually("the new route serves with its plugin", SOON, || async {
        let reply = get(&gateway.url("/shop/cart")).await;
        reply.status == StatusCode::OK
            && reply.header("x-made-by") == Some("dashboard")
            && reply.header("x-ratelimit-limit") == Some("1000")
    })
    .await;
    browser.screenshot("routes").await;

    // A validation error shows next to its field, and nothing is stored.
    browser.click("#new-route").await;
    browser.fill("#route-id", "broken").await;
    browser.fill("#route-uri", "no-slash").await;
    browser.click("#save-route").await;
    let error = browser.find(r#".field-error[data-path="/uri"]"#).await;
    assert!(error.text().await.unwrap().contains("must start with /"));
    let field = browser.find("label.has-error #route-uri").await;
    assert_eq!(
        field.prop("value").await.unwrap().as_deref(),
        Some("no-slash")
    );
    browser.screenshot("route-error").await;
    let stored = send(
        request(Method::GET, &gateway.admin_url("/v1/routes/broken"))
            .header("x-api-key", ADMIN_KEY)
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(stored.status, StatusCode::NOT_FOUND);

    // An upstream through the JSON editor: refused at its pointer, then stored.
    browser.click("#nav-upstreams").await;
    browser.click("#new-upstream").await;
    browser.fill("#object-name", "spare").await;
    browser.fill("#object-json", r#"{"nodes": []}"#).await;
    browser.click("#save-object").await;
    browser
        .find_text(r#".field-error[data-path="/nodes"]"#, "empty")
        .await;
    browser
        .fill(
            "#object-json",
            r#"{"nodes": [{"host": "127.0.0.1", "port": 9}]}"#,
        )
        .await;
    browser.click("#save-object").await;
    browser.find("table[data-upstream=spare]").await;

    // Node a switched offline: traffic moves to b alone.
    browser
        .click(r#"input.node-status[data-upstream="web"][data-node="0"]"#)
        .await;
    eventually("node a leaves the rotation", SOON, || async {
        let before = (a.hits(), b.hits());
        for _ in 0..4 {
            get(&gateway.url("/shop/cart")).await;
        }
        a.hits() == before.0 && b.hits() == before.1 + 4
    })
    .await;
    // The page shows what the store now holds.
    browser
        .find(r#"input.node-status[data-upstream="web"][data-node="0"]:not(:checked)"#)
        .await;
    browser.screenshot("upstreams").await;

    // The gateway samples its own metrics: once its history holds the traffic above, the
    // charts show it.
    eventually(
        "the gateway's history holds shop's requests and its plugins' calls",
        SOON,
        || async {
            let history = history(&gateway).await;
            above_zero(&history["routes"]["shop"]["requests"])
                && above_zero(&history["overall"]["p99_ms"])
                && above_zero(&history["plugins"]["headers"]["calls"])
        },
    )
    .await;

    // The other pages render what the API holds.
    browser.click("#nav-plugins").await;
    browser
        .find_text("#plugins tr[data-plugin=headers]", "shop")
        .await;
    browser
        .find("#history-plugin")
        .await
        .select_by_value("headers")
        .await
        .unwrap();
    chart_draws(&browser, "chart-plugin-calls", 1).await;
    // p50 and p99 of the time per call.
    chart_draws(&browser, "chart-plugin-time", 1).await;
    chart_draws(&browser, "chart-plugin-time", 2).await;
    browser.find("#chart-plugin-failures canvas").await;
    browser.screenshot("plugins").await;
    browser.click("#nav-tenants").await;
    browser.find_text("main", "Tenants").await;
    browser.screenshot("tenants").await;

    // Certificates: listed with their expiry; edited without ever showing the key.
    eventually("the certificate serves", SOON, || async {
        !gateway.gateway().snapshot().ssl.is_empty()
    })
    .await;
    browser.click("#nav-certificates").await;
    browser
        .find_text("#certificates tr[data-certificate=shop]", "days")
        .await;
    browser.screenshot("certificates").await;
    browser
        .click("#certificates tr[data-certificate=shop] a")
        .await;
    browser.find("#object-json").await;
    let shown = browser
        .client
        .execute(
            "return document.getElementById('object-json').value",
            vec![],
        )
        .await
        .unwrap();
    let shown = shown.as_str().unwrap_or_default().to_owned();
    assert!(shown.contains("shop.test"), "{shown}");
    assert!(
        !shown.contains("PRIVATE KEY") && !shown.contains("\"key\""),
        "{shown}"
    );
    let edited = shown.replace(r#""shop.test""#, r#""shop.test", "www.shop.test""#);
    browser.fill("#object-json", &edited).await;
    browser.click("#save-object").await;
    browser
        .find_text("#certificates tr[data-certificate=shop]", "www.shop.test")
        .await;
    browser.click("#nav-overview").await;
    browser.find_text("#store-state", "etcd connected").await;
    browser.find("#traffic tr[data-route=shop]").await;
    chart_draws(&browser, "chart-rps", 1).await;
    chart_draws(&browser, "chart-latency", 1).await;
    chart_draws(&browser, "chart-latency", 2).await;
    browser.find("#chart-errors canvas").await;
    // One route's charts.
    browser
        .find("#history-route")
        .await
        .select_by_value("shop")
        .await
        .unwrap();
    browser.find("#traffic tr.chosen[data-route=shop]").await;
    chart_draws(&browser, "chart-rps", 1).await;
    browser.screenshot("overview").await;

    // Log out: the login form again, and the session no longer opens the API.
    browser.click("#logout").await;
    browser.find("#login-button").await;
    let after = browser
        .client
        .execute(
            "return fetch('/v1/routes', {credentials: 'same-origin'}).then(r => r.status)",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(after, json!(401));
    browser.close().await;
}
