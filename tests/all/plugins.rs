//! Each first-party plugin through the gateway, plus short-circuits, body edits and the kv.

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::Full;
use serde_json::{Value, json};
use weir_tests::{TestGateway, Upstream, all_plugins, get, node, request, send, send_body, yaml};

/// A gateway whose one upstream is `up` and whose routes are `routes`.
async fn gateway_with(up: &Upstream, routes: Value) -> TestGateway {
    TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "u", "nodes": [node(up)]}],
        "plugins": all_plugins(),
        "routes": routes,
    })))
    .await
}

/// `method url` with `headers` and no body.
async fn call_with(method: Method, url: &str, headers: &[(&str, &str)]) -> weir_tests::Reply {
    let mut builder = request(method, url);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    send(builder.body(Full::<Bytes>::default()).unwrap()).await
}

/// GET `url` with `headers`.
pub(crate) async fn get_with(url: &str, headers: &[(&str, &str)]) -> weir_tests::Reply {
    call_with(Method::GET, url, headers).await
}

/// Checks that each config in `cases` is refused when a route using `plugin` with it loads,
/// with a reason that contains the case's words.
pub(crate) async fn assert_refused_at_load(plugin: &str, cases: &[(Value, &str)]) {
    let up = Upstream::start("u").await;
    let routes: Vec<Value> = cases
        .iter()
        .enumerate()
        .map(|(i, (config, _))| {
            json!({"id": format!("r{i}"), "uri": format!("/r{i}"), "upstream_id": "u",
                   "plugins": [{"name": plugin, "config": config}]})
        })
        .collect();
    let gateway = gateway_with(&up, Value::Array(routes)).await;
    let errors = gateway.errors();
    for (i, (_, expected)) in cases.iter().enumerate() {
        let error = errors
            .iter()
            .find(|e| e.id == format!("r{i}"))
            .unwrap_or_else(|| panic!("route r{i} was not refused: {errors:?}"));
        assert!(error.reason.contains(expected), "r{i}: {}", error.reason);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_id_reaches_the_upstream_the_client_and_the_access_log() {
    let up = Upstream::start("u").await;
    let gateway = gateway_with(
        &up,
        json!([
            {"id": "default", "uri": "/d", "upstream_id": "u", "plugins": [{"name": "request-id"}]},
            {"id": "custom", "uri": "/c", "upstream_id": "u",
             "plugins": [{"name": "request-id", "config": {"header": "x-trace-id"}}]},
        ]),
    )
    .await;

    let reply = get(&gateway.url("/d")).await;
    let id = reply
        .header("x-request-id")
        .expect("the plugin sets the response header")
        .to_owned();
    assert_eq!(id.len(), 36);
    assert_eq!(reply.json()["headers"]["x-request-id"], id.as_str());

    let reply = get_with(&gateway.url("/c"), &[("x-trace-id", "trace-from-client")]).await;
    assert_eq!(reply.header("x-trace-id"), Some("trace-from-client"));
    assert_eq!(reply.json()["headers"]["x-trace-id"], "trace-from-client");

    // An id too long to log is the client's header upstream, but not the request's id: the
    // client gets the gateway's own id back, the one logged.
    let long = "t".repeat(201);
    let reply = get_with(&gateway.url("/c"), &[("x-trace-id", long.as_str())]).await;
    let own = reply
        .header("x-trace-id")
        .expect("the id is stamped")
        .to_owned();
    assert_eq!(own.len(), 36);
    assert_eq!(reply.json()["headers"]["x-trace-id"], long.as_str());

    let log = gateway.access_log(3).await;
    assert_eq!(log[0]["request_id"], id.as_str());
    assert_eq!(log[0]["route"], "default");
    assert_eq!(log[1]["request_id"], "trace-from-client");
    assert!(log[1]["plugin_us"].as_u64().unwrap() > 0);
    assert_eq!(log[2]["request_id"], own.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_edits_both_directions() {
    let up = Upstream::start("u").await;
    let gateway = gateway_with(
        &up,
        json!([{"id": "r", "uri": "/*", "upstream_id": "u", "plugins": [{"name": "headers", "config": {
            "request": {"set": {"x-env": "prod"}, "remove": ["x-debug"], "add": {"x-tag": "gw"}},
            "response": {"set": {"x-frame-options": "DENY"}, "remove": ["x-upstream"]},
        }}]}]),
    )
    .await;
    let reply = get_with(
        &gateway.url("/"),
        &[("x-env", "dev"), ("x-debug", "1"), ("x-tag", "client")],
    )
    .await;
    let seen = &reply.json()["headers"];
    assert_eq!(seen["x-env"], "prod");
    assert!(seen.get("x-debug").is_none());
    assert_eq!(seen["x-tag"], "client, gw");
    assert_eq!(reply.header("x-frame-options"), Some("DENY"));
    assert_eq!(reply.header("x-upstream"), None);

    // A config that names an invalid header is refused when the route loads.
    let status = gateway_with(
        &up,
        json!([{"id": "bad", "uri": "/*", "upstream_id": "u", "plugins": [{"name": "headers", "config": {
            "request": {"set": {"bad header": "x"}},
        }}]}]),
    )
    .await;
    let errors = status.errors();
    assert!(
        errors
            .iter()
            .any(|e| e.id == "bad" && e.reason.contains("not a valid header name")),
        "{errors:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_restriction_allows_and_denies_by_cidr() {
    let up = Upstream::start("u").await;
    let gateway = gateway_with(
        &up,
        json!([
            {"id": "allowed", "uri": "/allowed", "upstream_id": "u",
             "plugins": [{"name": "ip-restriction", "config": {"allow": ["127.0.0.0/8"]}}]},
            {"id": "denied", "uri": "/denied", "upstream_id": "u",
             "plugins": [{"name": "ip-restriction", "config": {"deny": ["127.0.0.1"]}}]},
            {"id": "elsewhere", "uri": "/elsewhere", "upstream_id": "u",
             "plugins": [{"name": "ip-restriction", "config": {"allow": ["10.0.0.0/8"]}}]},
        ]),
    )
    .await;
    assert_eq!(get(&gateway.url("/allowed")).await.status, StatusCode::OK);
    let denied = get(&gateway.url("/denied")).await;
    assert_eq!(denied.status, StatusCode::FORBIDDEN);
    assert_eq!(denied.json()["error"], "your IP address is not allowed");
    assert_eq!(
        get(&gateway.url("/elsewhere")).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(up.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_auth_needs_a_known_key() {
    let up = Upstream::start("u").await;
    let gateway = gateway_with(
        &up,
        json!([{"id": "r", "uri": "/*", "upstream_id": "u", "plugins": [{"name": "key-auth", "config": {
            "header": "x-api-key", "keys": ["k-one", "k-two"], "hide_credentials": true,
        }}]}]),
    )
    .await;
    let missing = get(&gateway.url("/")).await;
    assert_eq!(missing.status, StatusCode::UNAUTHORIZED);
    assert_eq!(missing.json()["error"], "missing API key");
    let wrong = get_with(&gateway.url("/"), &[("x-api-key", "k-three")]).await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert_eq!(wrong.json()["error"], "invalid API key");
    let right = get_with(&gateway.url("/"), &[("x-api-key", "k-two")]).await;
    assert_eq!(right.status, StatusCode::OK);
    assert!(
        right.json()["headers"].get("x-api-key").is_none(),
        "hide_credentials keeps the key from the upstream"
    );
    assert_eq!(up.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_reply_short_circuits_the_chain_and_the_upstream() {
    let up = Upstream::start("u").await;
    let gateway = gateway_with(
        &up,
        json!([{"id": "r", "uri": "/*", "upstream_id": "u", "plugins": [
            {"name": "request-id"},
            {"name": "probe", "config": {"mode": "reply", "status": 418, "body": "short and stout"}},
            {"name": "key-auth", "config": {"keys": ["never-reached"]}},
        ]}]),
    )
    .await;
    let reply = get(&gateway.url("/")).await;
    assert_eq!(reply.status, StatusCode::IM_A_TEAPOT);
    assert_eq!(reply.text(), "short and stout");
    assert_eq!(reply.header("x-probe"), Some("replied"));
    // Plugins before the one that replied still see the response.
    assert_eq!(reply.header("x-request-id").map(str::len), Some(36));
    assert_eq!(up.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_edits_request_and_response_bodies_within_the_bound() {
    let up = Upstream::start("u").await;
    let mut plugins = all_plugins();
    for plugin in plugins.as_array_mut().unwrap() {
        if plugin["name"] == "probe" {
            plugin["limits"] = json!({"max_body_bytes": 2048});
        }
    }
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [
            {"id": "u", "nodes": [node(&up)]},
        ],
        "plugins": plugins,
        "routes": [{"id": "r", "uri": "/*", "upstream_id": "u", "plugins": [
            {"name": "probe", "config": {"mode": "body", "suffix": "-signed"}},
        ]}],
    })))
    .await;

    let reply = send_body(Method::POST, &gateway.url("/b"), "hello body").await;
    assert_eq!(reply.status, StatusCode::OK);
    let text = reply.text();
    assert!(text.ends_with("-signed"), "{text}");
    let echo: Value = serde_json::from_str(text.trim_end_matches("-signed")).unwrap();
    assert_eq!(echo["body"], "HELLO BODY");
    assert_eq!(echo["headers"]["content-length"], "10");
    assert_eq!(
        reply.header("content-length").unwrap(),
        text.len().to_string()
    );

    // Over the bound: the request gets 413 and never reaches the upstream.
    let hits = up.hits();
    let big = send_body(Method::POST, &gateway.url("/b"), vec![b'x'; 4096]).await;
    assert_eq!(big.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(
        big.json()["error"]
            .as_str()
            .unwrap()
            .contains("over 2048 bytes")
    );
    assert_eq!(up.hits(), hits);

    // A response over the bound gets 502: the echo of a 1900-byte body is over 2048.
    let reply = send_body(Method::POST, &gateway.url("/b"), vec![b'y'; 1900]).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert!(
        reply.json()["error"]
            .as_str()
            .unwrap()
            .contains("response body is over 2048")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kv_is_shared_by_every_instance_of_a_plugin() {
    let up = Upstream::start("u").await;
    let gateway = gateway_with(
        &up,
        json!([{"id": "r", "uri": "/*", "upstream_id": "u", "plugins": [
            {"name": "probe", "config": {"mode": "count", "key": "hits"}},
        ]}]),
    )
    .await;
    // Concurrent requests use several instances; the count still goes up by one each.
    let mut handles = Vec::new();
    for _ in 0..20 {
        let url = gateway.url("/");
        handles.push(tokio::spawn(async move {
            get(&url).await.json()["headers"]["x-count"].clone()
        }));
    }
    let mut counts: Vec<u64> = Vec::new();
    for h in handles {
        counts.push(h.await.unwrap().as_str().unwrap().parse().unwrap());
    }
    counts.sort();
    assert_eq!(counts, (1..=20).collect::<Vec<u64>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vars_carry_from_on_request_to_on_response_and_on_log() {
    let up = Upstream::start("u").await;
    let gateway = gateway_with(
        &up,
        json!([{"id": "r", "uri": "/*", "upstream_id": "u", "plugins": [
            {"name": "probe", "config": {"mode": "trace", "tag": "t1"}},
        ]}]),
    )
    .await;
    for _ in 0..3 {
        assert_eq!(
            get(&gateway.url("/x")).await.header("x-probe-tag"),
            Some("t1")
        );
    }
    // on-log runs after the response; its counter shows up in the metrics.
    let metrics_url = gateway.admin_url("/metrics");
    weir_tests::eventually(
        "on-log to count 3",
        std::time::Duration::from_secs(5),
        || async {
            get(&metrics_url)
                .await
                .text()
                .contains(r#"weir_plugin_events_total{plugin="probe",name="t1-logged"} 3"#)
        },
    )
    .await;
}

mod limit_count {
    //! limit-count through a real gateway: the count, the headers, keys, groups, and configs
    //! refused at load.

    use http::StatusCode;
    use serde_json::json;
    use weir_tests::{Upstream, get};

    async fn get_as(url: &str, user: &str) -> weir_tests::Reply {
        super::get_with(url, &[("x-user", user)]).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_count_holds_per_key_and_the_headers_say_so() {
        let up = Upstream::start("u").await;
        // A day-long window, so that no window ends during the test.
        let limit = |extra: serde_json::Value| {
            let mut config = json!({"count": 3, "window_s": 86400});
            for (k, v) in extra.as_object().unwrap() {
                config[k] = v.clone();
            }
            json!([{"name": "limit-count", "config": config}])
        };
        let gateway = super::gateway_with(
            &up,
            json!([
                {"id": "by-ip", "uri": "/ip", "upstream_id": "u", "plugins": limit(json!({}))},
                {"id": "by-user", "uri": "/user", "upstream_id": "u",
                 "plugins": limit(json!({"key": "header:x-user"}))},
                {"id": "shared-a", "uri": "/a", "upstream_id": "u",
                 "plugins": limit(json!({"group": "ab", "count": 2}))},
                {"id": "shared-b", "uri": "/b", "upstream_id": "u",
                 "plugins": limit(json!({"group": "ab", "count": 2}))},
            ]),
        )
        .await;
        assert!(gateway.errors().is_empty(), "{:?}", gateway.errors());

        for remaining in ["2", "1", "0"] {
            let reply = get(&gateway.url("/ip")).await;
            assert_eq!(reply.status, StatusCode::OK);
            assert_eq!(reply.header("x-ratelimit-limit"), Some("3"));
            assert_eq!(reply.header("x-ratelimit-remaining"), Some(remaining));
            assert_eq!(reply.header("ratelimit-policy"), Some("3;w=86400"));
        }
        let refused = get(&gateway.url("/ip")).await;
        assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(refused.json()["error"], "too many requests");
        assert_eq!(refused.header("x-ratelimit-remaining"), Some("0"));
        let reset: u64 = refused.header("retry-after").unwrap().parse().unwrap();
        assert!((1..=86400).contains(&reset), "{reset}");
        assert!(
            refused
                .header("ratelimit")
                .is_some_and(|v| v.starts_with("limit=3, remaining=0, reset=")),
            "{:?}",
            refused.headers
        );
        assert_eq!(
            up.hits(),
            3,
            "the refused request never reached the upstream"
        );

        // Each user has a counter of their own.
        for _ in 0..3 {
            assert_eq!(
                get_as(&gateway.url("/user"), "ann").await.status,
                StatusCode::OK
            );
        }
        assert_eq!(
            get_as(&gateway.url("/user"), "ann").await.status,
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(
            get_as(&gateway.url("/user"), "bob").await.status,
            StatusCode::OK
        );

        // A group is one counter across its routes.
        assert_eq!(get(&gateway.url("/a")).await.status, StatusCode::OK);
        assert_eq!(get(&gateway.url("/b")).await.status, StatusCode::OK);
        assert_eq!(
            get(&gateway.url("/a")).await.status,
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(
            get(&gateway.url("/b")).await.status,
            StatusCode::TOO_MANY_REQUESTS
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_window_ends_and_the_count_starts_again() {
        let up = Upstream::start("u").await;
        let gateway = super::gateway_with(&up, json!([{"id": "r", "uri": "/r", "upstream_id": "u",
                        "plugins": [{"name": "limit-count", "config": {"count": 1, "window_s": 1}}]}])).await;
        // Waits for a refusal, then for the next window to let one through again: the event
        // itself, not a guess at the time.
        weir_tests::eventually("a refusal", std::time::Duration::from_secs(10), || async {
            get(&gateway.url("/r")).await.status == StatusCode::TOO_MANY_REQUESTS
        })
        .await;
        weir_tests::eventually(
            "the next window",
            std::time::Duration::from_secs(10),
            || async { get(&gateway.url("/r")).await.status == StatusCode::OK },
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sliding_window_still_counts_the_previous_window_when_a_fixed_one_has_forgotten() {
        let up = Upstream::start("u").await;
        let limit = |window_type: &str| {
            json!([{"name": "limit-count",
                    "config": {"count": 2, "window_s": 2, "window_type": window_type}}])
        };
        let gateway = super::gateway_with(&up, json!([
                {"id": "fixed", "uri": "/fixed", "upstream_id": "u", "plugins": limit("fixed")},
                {"id": "sliding", "uri": "/sliding", "upstream_id": "u", "plugins": limit("sliding")},
            ])).await;
        let soon = std::time::Duration::from_secs(20);
        // Both routes used up in the same window (retried until they are).
        weir_tests::eventually("both limits reached in one window", soon, || async {
            for _ in 0..3 {
                get(&gateway.url("/fixed")).await;
                get(&gateway.url("/sliding")).await;
            }
            get(&gateway.url("/fixed")).await.status == StatusCode::TOO_MANY_REQUESTS
                && get(&gateway.url("/sliding")).await.status == StatusCode::TOO_MANY_REQUESTS
        })
        .await;
        // The moment the fixed window lets a request through again, a new window has begun;
        // the sliding one still weighs the previous window's requests, so it refuses.
        weir_tests::eventually("a new fixed window", soon, || async {
            get(&gateway.url("/fixed")).await.status == StatusCode::OK
        })
        .await;
        assert_eq!(
            get(&gateway.url("/sliding")).await.status,
            StatusCode::TOO_MANY_REQUESTS
        );
        // As the window slides on, the old requests weigh less, and one gets through.
        weir_tests::eventually("the sliding window lets one through", soon, || async {
            get(&gateway.url("/sliding")).await.status == StatusCode::OK
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_configs_are_refused_at_load_with_their_reason() {
        let cases = [
            (
                json!({"count": 0, "window_s": 60}),
                "`count` must be at least 1",
            ),
            (json!({"count": 1, "window_s": 0}), "`window_s` must be in"),
            (
                json!({"count": 1, "window_s": 60, "key": "cookie"}),
                "not ip, route, consumer or header",
            ),
            (
                json!({"count": 1, "window_s": 60, "policy": "cluster"}),
                "this plugin entry's kv is this gateway's memory",
            ),
            (
                json!({"count": 1, "window_s": 60, "rejected_code": 99}),
                "rejected_code",
            ),
            (
                json!({"count": 1, "window_s": 60, "colour": "red"}),
                "colour",
            ),
            (
                json!({"count": 1, "window_s": 60, "window_type": "rolling"}),
                "/window_type: the value is not one of",
            ),
        ];
        super::assert_refused_at_load("limit-count", &cases).await;
    }
}

mod rewrite {
    //! rewrite through a real gateway: regex captures, a fixed path, host and method, and
    //! configs refused at load.

    use http::StatusCode;
    use serde_json::json;
    use weir_tests::{Upstream, get};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn paths_hosts_and_methods_are_rewritten() {
        let up = Upstream::start("u").await;
        let rewrite = |config: serde_json::Value| json!([{"name": "rewrite", "config": config}]);
        let gateway = super::gateway_with(&up, json!([
                {"id": "regex", "uri": "/api/v1/*", "upstream_id": "u",
                 "plugins": rewrite(json!({"regex_uri": ["^/api/v1/users/(?P<id>[0-9]+)$", "/v2/people/${id}"]}))},
                {"id": "fixed", "uri": "/old/*", "upstream_id": "u",
                 "plugins": rewrite(json!({"uri": "/new", "regex_uri": ["^/old/(.*)", "/ignored/$1"],
                                           "host": "backend.internal", "method": "POST"}))},
                {"id": "broken", "uri": "/broken/*", "upstream_id": "u",
                 "plugins": rewrite(json!({"regex_uri": ["^/broken/(.*)", "/x?$1"]}))},
            ])).await;
        assert!(gateway.errors().is_empty(), "{:?}", gateway.errors());

        let echo = get(&gateway.url("/api/v1/users/42?full=1")).await.json();
        assert_eq!(echo["path"], "/v2/people/42");
        assert_eq!(echo["query"], "full=1", "the query is kept");
        // A path the pattern does not match goes up as it came.
        let echo = get(&gateway.url("/api/v1/teams/7")).await.json();
        assert_eq!(echo["path"], "/api/v1/teams/7");

        let echo = get(&gateway.url("/old/thing")).await.json();
        assert_eq!(echo["path"], "/new", "a fixed uri wins over regex_uri");
        assert_eq!(echo["method"], "POST");
        assert_eq!(echo["headers"]["host"], "backend.internal");

        // A replacement that makes something that is not a path is the config's mistake: 500
        // with the reason, and nothing goes upstream.
        let hits = up.hits();
        let reply = get(&gateway.url("/broken/a")).await;
        assert_eq!(
            reply.status,
            StatusCode::INTERNAL_SERVER_ERROR,
            "{}",
            reply.text()
        );
        assert!(reply.text().contains("invalid path"), "{}", reply.text());
        assert_eq!(up.hits(), hits);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_configs_are_refused_at_load_with_their_reason() {
        let cases = [
            (json!({}), "set at least one"),
            (json!({"regex_uri": ["^/(", "/x"]}), "`regex_uri` pattern"),
            (json!({"regex_uri": ["^/a"]}), "[pattern, replacement]"),
            (json!({"regex_uri": ["^/a", "b"]}), "must start with /"),
            (
                json!({"regex_uri": ["a".repeat(2000), "/b"]}),
                "over 1024 bytes",
            ),
            (json!({"uri": "relative"}), "`uri` must start with /"),
            (json!({"method": "BREW"}), "is not one of"),
            (json!({"host": "a/b"}), "is not a host"),
        ];
        super::assert_refused_at_load("rewrite", &cases).await;
    }
}

mod cors {
    //! cors through a real gateway: preflights answered by the plugin, responses marked for
    //! allowed origins only, and configs refused at load.

    use http::{Method, StatusCode};
    use serde_json::json;
    use weir_tests::Upstream;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn allowed_origins_get_the_headers_and_others_do_not() {
        let up = Upstream::start("u").await;
        let gateway = super::gateway_with(
            &up,
            json!([
                {"id": "listed", "uri": "/listed", "upstream_id": "u",
                 "plugins": [{"name": "cors", "config": {
                     "allow_origins": "https://app.example.com",
                     "allow_origins_by_regex": ["https://[a-z]+\\.preview\\.example\\.com"],
                     "allow_methods": "GET,POST", "allow_headers": "x-token",
                     "expose_headers": "x-request-id", "max_age": 600, "allow_credential": true}}]},
                {"id": "any", "uri": "/any", "upstream_id": "u",
                 "plugins": [{"name": "cors", "config": {}}]},
                {"id": "guarded", "uri": "/guarded", "upstream_id": "u",
                 "plugins": [{"name": "cors", "config": {}},
                             {"name": "key-auth", "config": {"keys": ["k"]}}]},
            ]),
        )
        .await;
        assert!(gateway.errors().is_empty(), "{:?}", gateway.errors());
        let hits = up.hits();

        // A later plugin's refusal carries the headers too, so the page can read why.
        let refused = super::call_with(
            Method::GET,
            &gateway.url("/guarded"),
            &[("origin", "https://app.example.com")],
        )
        .await;
        assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
        assert_eq!(refused.header("access-control-allow-origin"), Some("*"));

        // A preflight from an allowed origin is answered by the plugin.
        let preflight = super::call_with(
            Method::OPTIONS,
            &gateway.url("/listed"),
            &[
                ("origin", "https://app.example.com"),
                ("access-control-request-method", "POST"),
                ("access-control-request-headers", "x-token"),
            ],
        )
        .await;
        assert_eq!(preflight.status, StatusCode::OK);
        assert_eq!(
            preflight.header("access-control-allow-origin"),
            Some("https://app.example.com")
        );
        assert_eq!(
            preflight.header("access-control-allow-methods"),
            Some("GET,POST")
        );
        assert_eq!(
            preflight.header("access-control-allow-headers"),
            Some("x-token")
        );
        assert_eq!(preflight.header("access-control-max-age"), Some("600"));
        assert_eq!(
            preflight.header("access-control-allow-credentials"),
            Some("true")
        );
        assert_eq!(up.hits(), hits, "a preflight never reaches the upstream");

        // The actual request goes upstream and comes back marked.
        let reply = super::call_with(
            Method::GET,
            &gateway.url("/listed"),
            &[("origin", "https://pr-7.preview.example.com")],
        )
        .await;
        // `pr-7` has a digit and a dash: the pattern is [a-z]+, anchored, so it is refused.
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.header("access-control-allow-origin"), None);
        let reply = super::call_with(
            Method::GET,
            &gateway.url("/listed"),
            &[("origin", "https://blue.preview.example.com")],
        )
        .await;
        assert_eq!(
            reply.header("access-control-allow-origin"),
            Some("https://blue.preview.example.com")
        );
        assert_eq!(
            reply.header("access-control-expose-headers"),
            Some("x-request-id")
        );
        assert_eq!(
            reply.header("access-control-allow-credentials"),
            Some("true")
        );

        // An origin that only contains an allowed one is not allowed.
        for origin in [
            "https://app.example.com.evil.test",
            "https://evil.test",
            "https://blue.preview.example.com.evil.test",
        ] {
            let reply =
                super::call_with(Method::GET, &gateway.url("/listed"), &[("origin", origin)]).await;
            assert_eq!(
                reply.header("access-control-allow-origin"),
                None,
                "{origin}"
            );
            let preflight = super::call_with(
                Method::OPTIONS,
                &gateway.url("/listed"),
                &[("origin", origin), ("access-control-request-method", "GET")],
            )
            .await;
            assert_eq!(
                preflight.header("access-control-allow-origin"),
                None,
                "{origin}"
            );
        }

        // The defaults: any origin, answered with `*`, every method, the asked-for headers.
        let preflight = super::call_with(
            Method::OPTIONS,
            &gateway.url("/any"),
            &[
                ("origin", "https://anyone.test"),
                ("access-control-request-method", "DELETE"),
                ("access-control-request-headers", "x-a, x-b"),
            ],
        )
        .await;
        assert_eq!(preflight.header("access-control-allow-origin"), Some("*"));
        assert_eq!(
            preflight.header("access-control-allow-headers"),
            Some("x-a, x-b")
        );
        assert!(
            preflight
                .header("access-control-allow-methods")
                .is_some_and(|m| m.contains("DELETE"))
        );
        assert_eq!(preflight.header("access-control-allow-credentials"), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_configs_are_refused_at_load_with_their_reason() {
        let cases = [
            (json!({"allow_credential": true}), "refused by browsers"),
            (
                json!({"allow_origins": "app.example.com"}),
                "is not scheme://host",
            ),
            (
                json!({"allow_origins": "https://a.test/path"}),
                "is not scheme://host",
            ),
            (
                json!({"allow_origins": ",", "allow_origins_by_regex": []}),
                "lists no origin",
            ),
            (
                json!({"allow_origins": "https://a.test", "allow_origins_by_regex": ["("]}),
                "allow_origins_by_regex",
            ),
            (json!({"max_age": -1}), "/max_age"),
        ];
        super::assert_refused_at_load("cors", &cases).await;
    }
}

mod limit_req {
    //! limit-req through a real gateway: the burst, refusal with Retry-After, the rate
    //! refilling, keys, and configs refused at load.

    use http::StatusCode;
    use serde_json::json;
    use weir_tests::{Upstream, get};

    async fn get_as(url: &str, user: &str) -> StatusCode {
        super::get_with(url, &[("x-user", user)]).await.status
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_goes_through_then_the_rate_holds() {
        let up = Upstream::start("u").await;
        let gateway = super::gateway_with(
            &up,
            json!([
                // One a minute, so that the schedule does not move during the burst.
                {"id": "slow", "uri": "/slow", "upstream_id": "u",
                 "plugins": [{"name": "limit-req", "config": {"rate": 0.0166667, "burst": 2,
                                                              "key": "header:x-user"}}]},
                {"id": "fast", "uri": "/fast", "upstream_id": "u",
                 "plugins": [{"name": "limit-req", "config": {"rate": 1, "burst": 0}}]},
            ]),
        )
        .await;
        assert!(gateway.errors().is_empty(), "{:?}", gateway.errors());

        // The first request and a burst of two more; then refused.
        for _ in 0..3 {
            assert_eq!(get_as(&gateway.url("/slow"), "ann").await, StatusCode::OK);
        }
        let refused = super::get_with(&gateway.url("/slow"), &[("x-user", "ann")]).await;
        assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
        let wait: u64 = refused.header("retry-after").unwrap().parse().unwrap();
        assert!((1..=60).contains(&wait), "{wait}");
        // Refused requests do not use up the schedule: still refused, not further behind.
        assert_eq!(
            get_as(&gateway.url("/slow"), "ann").await,
            StatusCode::SERVICE_UNAVAILABLE
        );
        // Another key has its own bucket.
        assert_eq!(get_as(&gateway.url("/slow"), "bob").await, StatusCode::OK);

        // One a second with no burst: a quick second request is refused, and a later one
        // gets through as the bucket drains.
        let mut statuses = Vec::new();
        for _ in 0..3 {
            statuses.push(get(&gateway.url("/fast")).await.status);
        }
        assert!(
            statuses.contains(&StatusCode::SERVICE_UNAVAILABLE),
            "{statuses:?}"
        );
        weir_tests::eventually(
            "the rate lets one more through",
            std::time::Duration::from_secs(10),
            || async { get(&gateway.url("/fast")).await.status == StatusCode::OK },
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_configs_are_refused_at_load_with_their_reason() {
        let cases = [
            (json!({"rate": 0}), "`rate` must be in"),
            (json!({"rate": 1e9}), "`rate` must be in"),
            (json!({"rate": 1, "nodelay": false}), "not supported yet"),
            (
                json!({"rate": 1, "key": "cookie:x"}),
                "not ip, route, consumer or header",
            ),
            (json!({"rate": 1, "rejected_code": 700}), "rejected_code"),
            (json!({"burst": 1}), "\"rate\" is a required property"),
        ];
        super::assert_refused_at_load("limit-req", &cases).await;
    }
}

mod body_crypt {
    //! body-crypt through a real gateway: JWE (dir, A256GCM) made and opened here with
    //! RustCrypto's aes-gcm, tampering, key rotation, and configs refused at load.

    use aes_gcm::aead::{Aead, KeyInit, Payload};
    use aes_gcm::{Aes256Gcm, Nonce};
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use http::{Method, StatusCode};
    use serde_json::json;
    use weir_tests::{Upstream, request, send};

    const OLD: [u8; 32] = [7; 32];
    const NEW: [u8; 32] = [9; 32];

    fn seal(key: &[u8; 32], kid: &str, plain: &[u8], iv: [u8; 12]) -> String {
        let protected = B64.encode(
            json!({"alg": "dir", "enc": "A256GCM", "kid": kid, "cty": "application/json"})
                .to_string(),
        );
        let sealed = Aes256Gcm::new_from_slice(key)
            .unwrap()
            .encrypt(
                Nonce::from_slice(&iv),
                Payload {
                    msg: plain,
                    aad: protected.as_bytes(),
                },
            )
            .unwrap();
        let (ciphertext, tag) = sealed.split_at(sealed.len() - 16);
        format!(
            "{protected}..{}.{}.{}",
            B64.encode(iv),
            B64.encode(ciphertext),
            B64.encode(tag)
        )
    }

    /// Opens a JWE with `key`; returns the plaintext and the protected header.
    fn open(key: &[u8; 32], jwe: &str) -> (Vec<u8>, serde_json::Value) {
        let parts: Vec<&str> = jwe.split('.').collect();
        assert_eq!(parts.len(), 5, "{jwe}");
        assert!(parts[1].is_empty(), "dir has no encrypted key");
        let header: serde_json::Value =
            serde_json::from_slice(&B64.decode(parts[0]).unwrap()).unwrap();
        let mut sealed = B64.decode(parts[3]).unwrap();
        sealed.extend(B64.decode(parts[4]).unwrap());
        let iv = B64.decode(parts[2]).unwrap();
        let plain = Aes256Gcm::new_from_slice(key)
            .unwrap()
            .decrypt(
                Nonce::from_slice(&iv),
                Payload {
                    msg: &sealed,
                    aad: parts[0].as_bytes(),
                },
            )
            .expect("the gateway's JWE opens");
        (plain, header)
    }

    async fn post(url: &str, body: String) -> weir_tests::Reply {
        send(
            request(Method::POST, url)
                .header("content-type", "application/jose")
                .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                .unwrap(),
        )
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bodies_are_decrypted_for_the_upstream_and_encrypted_for_the_client() {
        let up = Upstream::start("u").await;
        let config = json!({
            "keys": {"old": B64.encode(OLD), "new": B64.encode(NEW)},
            "active": "new", "request": "decrypt", "response": "encrypt"
        });
        let gateway = super::gateway_with(
            &up,
            json!([{"id": "r", "uri": "/secret", "upstream_id": "u",
                        "plugins": [{"name": "body-crypt", "config": config}]}]),
        )
        .await;
        assert!(gateway.errors().is_empty(), "{:?}", gateway.errors());

        // A body sealed with the old key (rotation: it still opens) reaches the upstream in
        // the clear, with the content type it had inside.
        let reply = post(
            &gateway.url("/secret"),
            seal(&OLD, "old", br#"{"card":"4111"}"#, [1; 12]),
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(reply.header("content-type"), Some("application/jose"));
        // The answer is sealed with the active key; inside is the upstream's echo.
        let (plain, header) = open(&NEW, &reply.text());
        assert_eq!(header["kid"], "new");
        assert_eq!(header["alg"], "dir");
        assert_eq!(header["enc"], "A256GCM");
        let echo: serde_json::Value = serde_json::from_slice(&plain).unwrap();
        assert_eq!(echo["body"], r#"{"card":"4111"}"#);
        assert_eq!(echo["headers"]["content-type"], "application/json");
        // A fresh nonce each time: the same answer never seals the same way twice.
        let again = post(&gateway.url("/secret"), seal(&NEW, "new", b"x", [2; 12])).await;
        let third = post(&gateway.url("/secret"), seal(&NEW, "new", b"x", [2; 12])).await;
        let iv = |jwe: &str| jwe.split('.').nth(2).unwrap().to_owned();
        assert_ne!(iv(&again.text()), iv(&third.text()));

        // Tampered, under an unknown key, with alg none, or not a JWE at all: 400, and the
        // upstream never sees it.
        let hits = up.hits();
        let good = seal(&NEW, "new", b"hello", [3; 12]);
        let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
        let mut ciphertext = B64.decode(&parts[3]).unwrap();
        ciphertext[0] ^= 1;
        parts[3] = B64.encode(ciphertext);
        let tampered = parts.join(".");
        let none = format!(
            "{}..{}.{}.{}",
            B64.encode(r#"{"alg":"none","enc":"A256GCM","kid":"new"}"#),
            parts[2],
            parts[3],
            parts[4]
        );
        for (what, body) in [
            ("tampered", tampered),
            ("unknown kid", seal(&[1; 32], "other", b"hello", [4; 12])),
            (
                "wrong key under a known kid",
                seal(&[1; 32], "new", b"hello", [4; 12]),
            ),
            ("alg none", none),
            ("not a JWE", "hello".to_owned()),
        ] {
            let reply = post(&gateway.url("/secret"), body).await;
            assert_eq!(
                reply.status,
                StatusCode::BAD_REQUEST,
                "{what}: {}",
                reply.text()
            );
            assert!(reply.text().contains("could not be decrypted"), "{what}");
        }
        assert_eq!(up.hits(), hits, "nothing refused reached the upstream");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_configs_are_refused_at_load_with_their_reason() {
        let key = B64.encode(OLD);
        let cases = [
            (
                json!({"keys": {}, "active": "a", "request": "decrypt"}),
                "`keys` is empty",
            ),
            (
                json!({"keys": {"a": B64.encode([1u8; 5])}, "active": "a", "request": "decrypt"}),
                "not 32",
            ),
            (
                json!({"keys": {"a": "***"}, "active": "a", "request": "decrypt"}),
                "not base64url",
            ),
            (
                json!({"keys": {"a": key}, "active": "b", "request": "decrypt"}),
                "is not one of `keys`",
            ),
            (
                json!({"keys": {"a": key}, "active": "a"}),
                "set `request: decrypt`",
            ),
            (
                json!({"keys": {"a": key}, "active": "a", "request": "encrypt"}),
                "can only be decrypt",
            ),
        ];
        super::assert_refused_at_load("body-crypt", &cases).await;
    }
}
