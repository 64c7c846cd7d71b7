//! The admin API through a real gateway on a real etcd: every verb on every kind, pages,
//! revisions (`If-Match`), references, validation with JSON pointers, module upload, keys and
//! roles, sessions, and file mode refusing writes.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::Full;
use serde_json::{Value, json};
use weir::{AdminOptions, ConfigSource};
use weir_tests::etcd::Etcd;
use weir_tests::{
    ADMIN_KEY, Reply, TestGateway, Upstream, eventually, get, metric, plugins, request, send, yaml,
};

/// A bound on waits for an event, not an expected time.
const SOON: Duration = Duration::from_secs(30);

/// An admin API client with one set of credentials.
struct Api {
    base: String,
    headers: Vec<(String, String)>,
}

impl Api {
    fn new(gateway: &TestGateway, key: &str) -> Api {
        Api {
            base: gateway.admin_url(""),
            headers: vec![("x-api-key".into(), key.into())],
        }
    }

    fn anonymous(gateway: &TestGateway) -> Api {
        Api {
            base: gateway.admin_url(""),
            headers: vec![],
        }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        extra: &[(&str, &str)],
    ) -> Reply {
        let mut builder = request(method, &format!("{}{path}", self.base));
        for (name, value) in &self.headers {
            builder = builder.header(name, value);
        }
        for (name, value) in extra {
            builder = builder.header(*name, *value);
        }
        if body.is_some() {
            builder = builder.header("content-type", "application/json");
        }
        send(
            builder
                .body(Full::new(body.unwrap_or_default()))
                .expect("a request"),
        )
        .await
    }

    async fn get(&self, path: &str) -> Reply {
        self.call(Method::GET, path, None, &[]).await
    }

    async fn put(&self, path: &str, body: Value) -> Reply {
        self.call(Method::PUT, path, Some(body.to_string().into()), &[])
            .await
    }

    async fn put_if(&self, path: &str, body: Value, etag: &str) -> Reply {
        self.call(
            Method::PUT,
            path,
            Some(body.to_string().into()),
            &[("if-match", etag)],
        )
        .await
    }

    async fn patch(&self, path: &str, body: Value) -> Reply {
        self.call(Method::PATCH, path, Some(body.to_string().into()), &[])
            .await
    }

    async fn delete(&self, path: &str) -> Reply {
        self.call(Method::DELETE, path, None, &[]).await
    }

    async fn post(&self, path: &str, body: impl Into<Bytes>) -> Reply {
        self.call(Method::POST, path, Some(body.into()), &[]).await
    }
}

/// Asserts `reply` has `status`, showing its body when not.
#[track_caller]
fn expect(reply: &Reply, status: StatusCode) -> Value {
    assert_eq!(reply.status, status, "{}", reply.text());
    if reply.header("content-type") == Some("application/json") {
        reply.json()
    } else {
        Value::Null
    }
}

async fn etcd_gateway() -> (Etcd, TestGateway) {
    let etcd = Etcd::start().await;
    let gateway = TestGateway::start_etcd(&etcd.url, None).await;
    (etcd, gateway)
}

async fn answers(url: String, status: StatusCode) -> bool {
    get(&url).await.status == status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_verb_on_every_kind_goes_live() {
    let (_etcd, gateway) = etcd_gateway().await;
    let api = Api::new(&gateway, ADMIN_KEY);
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;

    // Upstreams: create, read, list, patch.
    let created = api
        .put(
            "/v1/upstreams/web",
            json!({"nodes": [{"host": "127.0.0.1", "port": a.port()}]}),
        )
        .await;
    let body = expect(&created, StatusCode::CREATED);
    assert_eq!(body["id"], "web");
    assert_eq!(
        body["value"]["id"], "web",
        "the URL's id is written into the object"
    );
    let created_at = body["value"]["create_time"]
        .as_u64()
        .expect("a create_time");
    assert!(body["value"]["update_time"].as_u64().is_some());
    let etag = created.header("etag").expect("an ETag").to_owned();
    assert_eq!(etag, format!("\"{}\"", body["revision"]));
    let read = api.get("/v1/upstreams/web").await;
    assert_eq!(read.header("etag"), Some(etag.as_str()));
    assert_eq!(
        expect(&read, StatusCode::OK)["value"]["nodes"][0]["port"],
        a.port()
    );
    let list = expect(&api.get("/v1/upstreams").await, StatusCode::OK);
    assert_eq!(list["total"], 1);
    assert_eq!(list["list"][0]["id"], "web");

    // Routes: one through the upstream serves.
    let route = api
        .put(
            "/v1/routes/r1",
            json!({"uri": "/api/*", "upstream_id": "web"}),
        )
        .await;
    expect(&route, StatusCode::CREATED);
    eventually("the route serves", SOON, || {
        answers(gateway.url("/api/x"), StatusCode::OK)
    })
    .await;
    assert_eq!(a.hits(), 1);

    // A merge patch moves the upstream to b; create_time stays, the revision moves on.
    let patched = api
        .patch(
            "/v1/upstreams/web",
            json!({"nodes": [{"host": "127.0.0.1", "port": b.port()}]}),
        )
        .await;
    let patched_body = expect(&patched, StatusCode::OK);
    assert_eq!(
        patched_body["value"]["create_time"].as_u64(),
        Some(created_at)
    );
    assert!(patched_body["revision"].as_i64() > body["revision"].as_i64());
    eventually("traffic moves to b", SOON, || async {
        get(&gateway.url("/api/x")).await;
        b.hits() > 0
    })
    .await;

    // The route switched off answers 404 as if absent, and back on serves again.
    expect(
        &api.patch("/v1/routes/r1", json!({"status": "disabled"}))
            .await,
        StatusCode::OK,
    );
    eventually("the disabled route answers 404", SOON, || {
        answers(gateway.url("/api/x"), StatusCode::NOT_FOUND)
    })
    .await;
    expect(
        &api.patch("/v1/routes/r1", json!({"status": null})).await,
        StatusCode::OK,
    );
    eventually("the route serves again", SOON, || {
        answers(gateway.url("/api/x"), StatusCode::OK)
    })
    .await;

    // Tenants.
    expect(
        &api.put("/v1/tenants/team-a", json!({"quotas": {"memory_mb": 64}}))
            .await,
        StatusCode::CREATED,
    );
    let tenant = expect(&api.get("/v1/tenants/team-a").await, StatusCode::OK);
    assert_eq!(tenant["value"]["quotas"]["memory_mb"], 64);
    expect(&api.delete("/v1/tenants/team-a").await, StatusCode::OK);
    expect(&api.get("/v1/tenants/team-a").await, StatusCode::NOT_FOUND);

    // Services and their nodes: a node switched offline takes no traffic.
    expect(
        &api.put(
            "/v1/services/users/n1",
            json!({"host": "127.0.0.1", "port": a.port()}),
        )
        .await,
        StatusCode::CREATED,
    );
    expect(
        &api.put(
            "/v1/services/users/n2",
            json!({"host": "127.0.0.1", "port": b.port()}),
        )
        .await,
        StatusCode::CREATED,
    );
    let services = expect(&api.get("/v1/services").await, StatusCode::OK);
    assert_eq!(services["list"][0]["name"], "users");
    assert_eq!(
        services["list"][0]["nodes"].as_array().map(Vec::len),
        Some(2)
    );
    expect(
        &api.put(
            "/v1/routes/svc",
            json!({"uri": "/users/*", "service": "users"}),
        )
        .await,
        StatusCode::CREATED,
    );
    eventually("the service route serves", SOON, || {
        answers(gateway.url("/users/1"), StatusCode::OK)
    })
    .await;
    expect(
        &api.patch("/v1/services/users/n1", json!({"status": "offline"}))
            .await,
        StatusCode::OK,
    );
    eventually("n1 leaves the rotation", SOON, || async {
        let before = a.hits();
        for _ in 0..4 {
            get(&gateway.url("/users/1")).await;
        }
        a.hits() == before
    })
    .await;
    expect(&api.delete("/v1/services/users/n1").await, StatusCode::OK);
    let node = api.get("/v1/services/users/n1").await;
    expect(&node, StatusCode::NOT_FOUND);

    // The server section.
    expect(
        &api.put("/v1/server", json!({"max_headers": 50})).await,
        StatusCode::CREATED,
    );
    assert_eq!(
        expect(&api.get("/v1/server").await, StatusCode::OK)["value"]["max_headers"],
        50
    );
    eventually("the server section applies", SOON, || async {
        gateway.gateway().snapshot().server.config.max_headers == 50
    })
    .await;

    // Deletes: the route first, then the upstream it used.
    expect(&api.delete("/v1/routes/r1").await, StatusCode::OK);
    expect(&api.delete("/v1/routes/svc").await, StatusCode::OK);
    expect(&api.delete("/v1/upstreams/web").await, StatusCode::OK);
    eventually("the deleted route is gone", SOON, || {
        answers(gateway.url("/api/x"), StatusCode::NOT_FOUND)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_come_in_pages() {
    let (_etcd, gateway) = etcd_gateway().await;
    let api = Api::new(&gateway, ADMIN_KEY);
    for index in 0..7 {
        let reply = api
            .put(
                &format!("/v1/upstreams/u{index}"),
                json!({"nodes": [{"host": "127.0.0.1", "port": 1}]}),
            )
            .await;
        expect(&reply, StatusCode::CREATED);
    }
    let mut seen = Vec::new();
    for page in 1..=3 {
        let body = expect(
            &api.get(&format!("/v1/upstreams?page={page}&page_size=3"))
                .await,
            StatusCode::OK,
        );
        assert_eq!(body["total"], 7);
        for item in body["list"].as_array().unwrap() {
            seen.push(item["id"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(seen, ["u0", "u1", "u2", "u3", "u4", "u5", "u6"]);
    let past = expect(
        &api.get("/v1/upstreams?page=4&page_size=3").await,
        StatusCode::OK,
    );
    assert_eq!(past["list"], json!([]));
    expect(
        &api.get("/v1/upstreams?page=0").await,
        StatusCode::BAD_REQUEST,
    );
    expect(
        &api.get("/v1/upstreams?page_size=501").await,
        StatusCode::BAD_REQUEST,
    );
    expect(
        &api.get("/v1/upstreams?page=x").await,
        StatusCode::BAD_REQUEST,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_if_match_is_412_and_a_referenced_delete_is_409() {
    let (_etcd, gateway) = etcd_gateway().await;
    let api = Api::new(&gateway, ADMIN_KEY);
    let upstream = json!({"nodes": [{"host": "127.0.0.1", "port": 1}]});
    let first = api.put("/v1/upstreams/u", upstream.clone()).await;
    expect(&first, StatusCode::CREATED);
    let old = first.header("etag").unwrap().to_owned();
    // Someone else writes in between.
    let second = api.put_if("/v1/upstreams/u", upstream.clone(), &old).await;
    expect(&second, StatusCode::OK);
    let current = second.header("etag").unwrap().to_owned();
    let stale = api.put_if("/v1/upstreams/u", upstream.clone(), &old).await;
    let body = expect(&stale, StatusCode::PRECONDITION_FAILED);
    assert_eq!(format!("\"{}\"", body["revision"]), current, "{body}");
    let stale_delete = api
        .call(
            Method::DELETE,
            "/v1/upstreams/u",
            None,
            &[("if-match", &old)],
        )
        .await;
    expect(&stale_delete, StatusCode::PRECONDITION_FAILED);
    // If-None-Match: * creates only.
    let again = api
        .call(
            Method::PUT,
            "/v1/upstreams/u",
            Some(upstream.to_string().into()),
            &[("if-none-match", "*")],
        )
        .await;
    expect(&again, StatusCode::PRECONDITION_FAILED);

    expect(
        &api.put("/v1/routes/r", json!({"uri": "/r", "upstream_id": "u"}))
            .await,
        StatusCode::CREATED,
    );
    let refused = expect(&api.delete("/v1/upstreams/u").await, StatusCode::CONFLICT);
    assert_eq!(
        refused["referenced_by"],
        json!([{"kind": "route", "id": "r"}])
    );
    expect(&api.get("/v1/upstreams/u").await, StatusCode::OK);
    expect(
        &api.delete("/v1/upstreams/u?force=true").await,
        StatusCode::OK,
    );
    expect(&api.get("/v1/upstreams/u").await, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_object_is_refused_with_json_pointers_in_the_words_status_uses() {
    let (etcd, gateway) = etcd_gateway().await;
    let api = Api::new(&gateway, ADMIN_KEY);
    let bad = json!({"nodes": [{"host": "127.0.0.1", "port": 0}], "type": "chash"});
    let refused = expect(
        &api.put("/v1/upstreams/u", bad.clone()).await,
        StatusCode::BAD_REQUEST,
    );
    let paths: Vec<&str> = refused["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert!(paths.contains(&"/nodes/0/port"), "{refused}");
    expect(&api.get("/v1/upstreams/u").await, StatusCode::NOT_FOUND);
    // The same object put behind the API's back is reported by /v1/status in the same words.
    etcd.put("/weir/upstreams/u", bad.clone()).await;
    let status = eventually_status_error(&gateway, "u").await;
    assert_eq!(status["errors"], refused["errors"], "{status}");
    // Validation alone writes nothing.
    let mut named = bad.clone();
    named["id"] = json!("u");
    let validated = expect(
        &api.post("/v1/validate/upstreams", named.to_string()).await,
        StatusCode::BAD_REQUEST,
    );
    assert_eq!(validated["errors"], refused["errors"]);
    let good = json!({"id": "u", "nodes": [{"host": "127.0.0.1", "port": 1}]});
    assert_eq!(
        expect(
            &api.post("/v1/validate/upstreams", good.to_string()).await,
            StatusCode::OK
        )["valid"],
        true
    );

    // Other bad inputs: not JSON, not an object, a mismatched id, a reference to nothing.
    let not_json = api
        .call(Method::PUT, "/v1/routes/r", Some("{nope".into()), &[])
        .await;
    expect(&not_json, StatusCode::BAD_REQUEST);
    expect(
        &api.put("/v1/routes/r", json!([1])).await,
        StatusCode::BAD_REQUEST,
    );
    let mismatched = expect(
        &api.put(
            "/v1/routes/r",
            json!({"id": "other", "uri": "/r", "upstream_id": "u"}),
        )
        .await,
        StatusCode::BAD_REQUEST,
    );
    assert_eq!(mismatched["errors"][0]["path"], "/id");
    let dangling = expect(
        &api.put(
            "/v1/routes/r",
            json!({"uri": "/r", "upstream_id": "nowhere", "plugins": [{"name": "nothing"}]}),
        )
        .await,
        StatusCode::BAD_REQUEST,
    );
    assert_eq!(dangling["errors"][0]["path"], "/upstream_id", "{dangling}");
    assert_eq!(
        dangling["errors"][1]["path"], "/plugins/0/name",
        "{dangling}"
    );
    // An id that is not an id is not an endpoint; a huge body is refused before it is read.
    expect(
        &api.put("/v1/routes/a%20b", json!({})).await,
        StatusCode::NOT_FOUND,
    );
    let huge = format!("{{\"uri\": \"/{}\"}}", "a".repeat(2 << 20));
    expect(
        &api.call(Method::PUT, "/v1/routes/r", Some(huge.into()), &[])
            .await,
        StatusCode::PAYLOAD_TOO_LARGE,
    );
}

/// /v1/status's error for upstream `id`, if it reports one.
async fn status_error(url: &str, id: &str) -> Option<Value> {
    let status = weir_tests::admin_get(url).await.json();
    status["errors"]
        .as_array()
        .and_then(|errors| errors.iter().find(|e| e["id"] == id).cloned())
}

/// /v1/status's error for upstream `id`, once it reports one.
async fn eventually_status_error(gateway: &TestGateway, id: &str) -> Value {
    let url = gateway.admin_url("/v1/status");
    eventually("/v1/status reports the bad upstream", SOON, || async {
        status_error(&url, id).await.is_some()
    })
    .await;
    status_error(&url, id).await.expect("reported")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uploaded_module_serves_through_a_route() {
    let (_etcd, gateway) = etcd_gateway().await;
    let api = Api::new(&gateway, ADMIN_KEY);
    let up = Upstream::start("u").await;
    let bytes = std::fs::read(plugins::HEADERS).expect("a built component");
    let uploaded = api.post("/v1/modules", bytes.clone()).await;
    let module = expect(&uploaded, StatusCode::CREATED);
    let sha256 = module["sha256"].as_str().unwrap().to_owned();
    assert_eq!(sha256, weir::digest::sha256_hex(&bytes));
    assert_eq!(module["size"], bytes.len());
    // The same bytes again store nothing new.
    expect(
        &api.post("/v1/modules", bytes.clone()).await,
        StatusCode::OK,
    );
    // Bytes that are not a component are refused.
    expect(
        &api.post("/v1/modules", &b"\0asm-not-really"[..]).await,
        StatusCode::BAD_REQUEST,
    );

    expect(
        &api.put("/v1/plugins/headers", json!({"sha256": sha256}))
            .await,
        StatusCode::CREATED,
    );
    expect(
        &api.put(
            "/v1/upstreams/u",
            json!({"nodes": [{"host": "127.0.0.1", "port": up.port()}]}),
        )
        .await,
        StatusCode::CREATED,
    );
    expect(
        &api.put(
            "/v1/routes/r",
            json!({"uri": "/h", "upstream_id": "u",
                   "plugins": [{"name": "headers", "config": {"response": {"set": {"x-via": "admin-api"}}}}]}),
        )
        .await,
        StatusCode::CREATED,
    );
    eventually("the plugin's route serves", SOON, || async {
        get(&gateway.url("/h")).await.header("x-via") == Some("admin-api")
    })
    .await;
    // A route whose plugin config breaks the schema the plugin described itself with is
    // refused at the field's pointer, and nothing is stored.
    let bad = expect(
        &api.put(
            "/v1/routes/bad",
            json!({"uri": "/bad", "upstream_id": "u",
                   "plugins": [{"name": "headers", "config": {"response": {"set": "x-via"}}}]}),
        )
        .await,
        StatusCode::BAD_REQUEST,
    );
    assert_eq!(
        bad["errors"][0]["path"], "/plugins/0/config/response/set",
        "{bad}"
    );
    expect(&api.get("/v1/routes/bad").await, StatusCode::NOT_FOUND);
    let modules = expect(&api.get("/v1/modules").await, StatusCode::OK);
    assert_eq!(modules["list"][0]["sha256"], sha256.as_str());
    assert_eq!(modules["list"][0]["plugins"], json!(["headers"]));
    // A module in use, and a plugin in use, are not deleted.
    let in_use = expect(
        &api.delete(&format!("/v1/modules/{sha256}")).await,
        StatusCode::CONFLICT,
    );
    assert_eq!(
        in_use["referenced_by"],
        json!([{"kind": "plugin", "id": "headers"}])
    );
    expect(
        &api.delete("/v1/plugins/headers").await,
        StatusCode::CONFLICT,
    );
    // A plugin naming a module that is not stored is refused.
    let missing = expect(
        &api.put("/v1/plugins/other", json!({"sha256": "0".repeat(64)}))
            .await,
        StatusCode::BAD_REQUEST,
    );
    assert_eq!(missing["errors"][0]["path"], "/sha256");

    // The entry's other verbs: read, list, patch; then everything goes, in order.
    let entry = expect(&api.get("/v1/plugins/headers").await, StatusCode::OK);
    assert_eq!(entry["value"]["sha256"], sha256.as_str());
    let entries = expect(&api.get("/v1/plugins").await, StatusCode::OK);
    assert_eq!(entries["total"], 1);
    let patched = expect(
        &api.patch("/v1/plugins/headers", json!({"limits": {"timeout_ms": 20}}))
            .await,
        StatusCode::OK,
    );
    assert_eq!(patched["value"]["limits"]["timeout_ms"], 20);
    assert_eq!(patched["value"]["sha256"], sha256.as_str());
    expect(&api.delete("/v1/routes/r").await, StatusCode::OK);
    expect(&api.delete("/v1/plugins/headers").await, StatusCode::OK);
    expect(
        &api.delete(&format!("/v1/modules/{sha256}")).await,
        StatusCode::OK,
    );
    let modules = expect(&api.get("/v1/modules").await, StatusCode::OK);
    assert_eq!(modules["total"], 0);
    expect(
        &api.delete(&format!("/v1/modules/{sha256}")).await,
        StatusCode::NOT_FOUND,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_trusted_keys_an_upload_is_stored_without_being_compiled() {
    let (etcd, gateway) = etcd_gateway().await;
    // Any 32 bytes are a key to trust; no module here is signed by it.
    let key = format!("{}=", "A".repeat(43));
    etcd.put(
        "/weir/server",
        json!({"trusted_keys": [{"name": "release", "public_key": key}]}),
    )
    .await;
    eventually("the trusted key is in force", SOON, || async {
        !gateway
            .gateway()
            .snapshot()
            .server
            .config
            .trusted_keys
            .is_empty()
    })
    .await;
    let api = Api::new(&gateway, ADMIN_KEY);
    let bytes = std::fs::read(plugins::HEADERS).expect("a built component");
    expect(&api.post("/v1/modules", bytes).await, StatusCode::CREATED);
    expect(
        &api.post("/v1/modules", &b"\0asm-not-really"[..]).await,
        StatusCode::BAD_REQUEST,
    );
    let compiled = metric(
        &gateway.admin_url("/metrics"),
        r#"weir_module_loads_total{source="compiled"}"#,
    )
    .await;
    assert_eq!(compiled, 0.0, "an unsigned upload went through Cranelift");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_roles_and_open_paths() {
    let etcd = Etcd::start().await;
    let viewer_key = "viewer-secret";
    etcd.put(
        "/weir/admin",
        json!({"keys": [{"name": "grafana", "key_sha256": weir::digest::sha256_hex(viewer_key.as_bytes()), "role": "viewer"}],
               "open": ["/healthz"]}),
    )
    .await;
    let gateway = TestGateway::start_etcd(&etcd.url, None).await;
    let admin = Api::new(&gateway, ADMIN_KEY);
    let viewer = Api::new(&gateway, viewer_key);
    let nobody = Api::anonymous(&gateway);
    let wrong = Api::new(&gateway, "guess");

    expect(&nobody.get("/v1/routes").await, StatusCode::UNAUTHORIZED);
    expect(&wrong.get("/v1/routes").await, StatusCode::UNAUTHORIZED);
    // Whatever a path looks like, under /v1 it is authenticated.
    for path in [
        "/v1/routes/app.js",
        "/v1/status",
        "/v1/metrics/history",
        "/v1/schema/routes",
        "/v1/nothing.css",
        "/v1",
        "/v1/",
        "/v1//routes",
        "/v1/v1/routes",
        "/v1/../ui/app.js",
    ] {
        expect(&nobody.get(path).await, StatusCode::UNAUTHORIZED);
    }
    // A key in the query string is not a key.
    expect(
        &nobody.get(&format!("/v1/routes?api_key={ADMIN_KEY}")).await,
        StatusCode::UNAUTHORIZED,
    );

    expect(&viewer.get("/v1/routes").await, StatusCode::OK);
    // Odd paths are not other names for an endpoint.
    for path in [
        "/v1/v1/routes",
        "/v1//routes",
        "/v1/routes/",
        "/v1/routes/a%2Fb",
    ] {
        expect(&viewer.get(path).await, StatusCode::NOT_FOUND);
    }
    expect(&viewer.get("/v1/status").await, StatusCode::OK);
    let reply = viewer.get("/v1/metrics/history").await;
    // Charted live: a cache in between would freeze the dashboard's charts.
    assert_eq!(reply.header("cache-control"), Some("no-store"));
    let history = expect(&reply, StatusCode::OK);
    assert_eq!(history["interval_s"], 10, "{history}");
    let refused = viewer
        .put(
            "/v1/upstreams/u",
            json!({"nodes": [{"host": "h", "port": 1}]}),
        )
        .await;
    expect(&refused, StatusCode::FORBIDDEN);
    expect(
        &viewer.delete("/v1/upstreams/u").await,
        StatusCode::FORBIDDEN,
    );
    expect(
        &viewer.post("/v1/modules", vec![0u8; 8]).await,
        StatusCode::FORBIDDEN,
    );
    expect(
        &admin
            .put(
                "/v1/upstreams/u",
                json!({"nodes": [{"host": "h", "port": 1}]}),
            )
            .await,
        StatusCode::CREATED,
    );

    // Only /healthz is open here; /metrics and /readyz need a key.
    expect(&nobody.get("/healthz").await, StatusCode::OK);
    expect(&nobody.get("/metrics").await, StatusCode::UNAUTHORIZED);
    expect(&viewer.get("/metrics").await, StatusCode::OK);
    expect(&nobody.get("/readyz").await, StatusCode::UNAUTHORIZED);

    let schema = expect(&viewer.get("/v1/schema/routes").await, StatusCode::OK);
    assert!(schema["properties"]["upstream_id"].is_object(), "{schema}");
    let plugin_schema = expect(
        &viewer.get("/v1/schema/plugins/headers").await,
        StatusCode::NOT_FOUND,
    );
    // Viewers may read a plugin's schema; this store has no `headers` entry, and says so.
    assert!(
        plugin_schema["error"]
            .as_str()
            .unwrap()
            .contains("no plugin \"headers\" is loaded"),
        "{plugin_schema}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_need_csrf_to_write_lock_out_guessers_and_end_at_logout() {
    let etcd = Etcd::start().await;
    let hash = weir::admin::auth::hash_password("correct horse");
    etcd.put(
        "/weir/admin",
        json!({"accounts": [{"username": "alice", "password_hash": hash, "role": "admin"}]}),
    )
    .await;
    let gateway = TestGateway::start_etcd(&etcd.url, None).await;
    let nobody = Api::anonymous(&gateway);
    let login = nobody
        .post(
            "/v1/login",
            json!({"username": "alice", "password": "correct horse"}).to_string(),
        )
        .await;
    let session = expect(&login, StatusCode::OK);
    let cookie = login.header("set-cookie").unwrap().to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let token = cookie.split(';').next().unwrap().to_owned();
    let csrf = session["csrf_token"].as_str().unwrap().to_owned();
    let browser = Api {
        base: gateway.admin_url(""),
        headers: vec![("cookie".into(), token.clone())],
    };
    expect(&browser.get("/v1/routes").await, StatusCode::OK);
    assert_eq!(
        expect(&browser.get("/v1/session").await, StatusCode::OK)["username"],
        "alice"
    );
    let upstream = json!({"nodes": [{"host": "h", "port": 1}]});
    expect(
        &browser.put("/v1/upstreams/u", upstream.clone()).await,
        StatusCode::FORBIDDEN,
    );
    let with_csrf = browser
        .call(
            Method::PUT,
            "/v1/upstreams/u",
            Some(upstream.to_string().into()),
            &[("x-csrf-token", &csrf)],
        )
        .await;
    expect(&with_csrf, StatusCode::CREATED);
    expect(&browser.post("/v1/logout", "").await, StatusCode::OK);
    expect(&browser.get("/v1/routes").await, StatusCode::UNAUTHORIZED);

    // Five wrong passwords lock the address out, even for the right one, for a minute.
    for _ in 0..5 {
        let wrong = nobody
            .post(
                "/v1/login",
                json!({"username": "alice", "password": "guess"}).to_string(),
            )
            .await;
        expect(&wrong, StatusCode::UNAUTHORIZED);
    }
    let locked = nobody
        .post(
            "/v1/login",
            json!({"username": "alice", "password": "correct horse"}).to_string(),
        )
        .await;
    expect(&locked, StatusCode::TOO_MANY_REQUESTS);
    assert!(locked.header("retry-after").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_mode_reads_and_refuses_writes() {
    let up = Upstream::start("u").await;
    let gateway = TestGateway::start(&yaml(json!({
        "routes": [{"id": "r", "uri": "/r", "upstream_id": "u"}],
        "upstreams": [{"id": "u", "nodes": [weir_tests::node(&up)]}],
    })))
    .await;
    let api = Api::new(&gateway, ADMIN_KEY);
    let routes = expect(&api.get("/v1/routes").await, StatusCode::OK);
    assert_eq!(routes["list"][0]["id"], "r");
    let route = expect(&api.get("/v1/routes/r").await, StatusCode::OK);
    assert_eq!(route["value"]["uri"], "/r");
    let file = gateway.dir().join("weir.yaml");
    for reply in [
        api.put("/v1/routes/r", json!({"uri": "/x", "upstream_id": "u"}))
            .await,
        api.patch("/v1/routes/r", json!({"uri": "/x"})).await,
        api.delete("/v1/routes/r").await,
        api.post("/v1/modules", vec![0u8; 8]).await,
    ] {
        let body = expect(&reply, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(
            body["error"],
            format!("config is managed by the file {}", file.display())
        );
    }
    assert_eq!(get(&gateway.url("/r")).await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_key_configured_weir_generates_one_and_refuses_to_listen_beyond_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("weir.yaml");
    std::fs::write(&config, "routes: []\n").unwrap();
    let state = dir.path().join("state");
    let options = AdminOptions {
        state_dir: Some(state.clone()),
        ..AdminOptions::default()
    };
    let gateway =
        TestGateway::start_admin(ConfigSource::File(config.clone()), options.clone()).await;
    let key = gateway
        .generated_admin_key()
        .expect("a generated key")
        .to_owned();
    let kept = std::fs::read_to_string(state.join("admin-key.sha256")).unwrap();
    assert_eq!(
        kept,
        weir::digest::sha256_hex(key.as_bytes()),
        "only the hash is kept"
    );
    assert!(!kept.contains(&key));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(state.join("admin-key.sha256"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "the hash file is the owner's alone");
    expect(
        &Api::new(&gateway, &key).get("/v1/routes").await,
        StatusCode::OK,
    );
    expect(
        &Api::new(&gateway, ADMIN_KEY).get("/v1/routes").await,
        StatusCode::UNAUTHORIZED,
    );
    gateway.stop().await;

    // A restart keeps the key, and does not show it again.
    let again = TestGateway::start_admin(ConfigSource::File(config.clone()), options).await;
    assert_eq!(again.generated_admin_key(), None);
    expect(
        &Api::new(&again, &key).get("/v1/routes").await,
        StatusCode::OK,
    );
    again.stop().await;

    // Beyond loopback, a generated key is not enough.
    let exposed = weir::GatewayOptions {
        config: ConfigSource::File(config.clone()),
        listen: "127.0.0.1:0".parse().unwrap(),
        tls_listen: None,
        admin_listen: Some("0.0.0.0:0".parse().unwrap()),
        access_log: weir::AccessLogTarget::Off,
        module_cache: None,
        max_module_bytes: weir::store::etcd::DEFAULT_MAX_MODULE_BYTES,
        admin: AdminOptions::default(),
        workers: 0,
    };
    let refused = weir::start(exposed.clone()).await.err().expect("refused");
    assert!(
        refused.to_string().contains("no admin key is configured"),
        "{refused}"
    );
    // With WEIR_ADMIN_KEY it starts.
    let keyed = weir::GatewayOptions {
        admin: AdminOptions {
            env_key: Some("set-by-env".into()),
            ..AdminOptions::default()
        },
        ..exposed
    };
    let running = weir::start(keyed).await.expect("starts with a key");
    assert_eq!(running.generated_admin_key, None);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generated_key_hash_file_others_could_write_or_read_is_refused_at_start() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("weir.yaml");
    std::fs::write(&config, "routes: []\n").unwrap();
    let state = dir.path().join("state");
    let options = weir::GatewayOptions {
        config: ConfigSource::File(config),
        listen: "127.0.0.1:0".parse().unwrap(),
        tls_listen: None,
        admin_listen: Some("127.0.0.1:0".parse().unwrap()),
        access_log: weir::AccessLogTarget::Off,
        module_cache: None,
        max_module_bytes: weir::store::etcd::DEFAULT_MAX_MODULE_BYTES,
        admin: AdminOptions {
            state_dir: Some(state.clone()),
            ..AdminOptions::default()
        },
        workers: 0,
    };
    let first = weir::start(options.clone()).await.expect("starts");
    assert!(first.generated_admin_key.is_some());
    first.shutdown().await;
    let hash_file = state.join("admin-key.sha256");
    let mode = |path: &std::path::Path| std::fs::metadata(path).unwrap().mode() & 0o777;
    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(&hash_file), 0o600);

    let refusal = || async {
        match weir::start(options.clone()).await {
            Ok(running) => {
                running.shutdown().await;
                panic!("started with a key hash it should not trust")
            }
            Err(error) => error.to_string(),
        }
    };
    // Someone else's key in a file anyone may write: the admin API would be theirs.
    std::fs::write(&hash_file, weir::digest::sha256_hex(b"the intruder's key")).unwrap();
    std::fs::set_permissions(&hash_file, std::fs::Permissions::from_mode(0o666)).unwrap();
    let refused = refusal().await;
    assert!(refused.contains("admin-key.sha256"), "{refused}");
    assert!(refused.contains("chmod 600"), "{refused}");
    std::fs::set_permissions(&hash_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(refusal().await.contains("lets group or others read"));
    std::fs::set_permissions(&hash_file, std::fs::Permissions::from_mode(0o600)).unwrap();

    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
    assert!(refusal().await.contains("that only it may write"));
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();

    // Another user's file, when this test can make one (as root, who owns what it made).
    if std::fs::metadata(&hash_file).unwrap().uid() == 0 {
        std::os::unix::fs::chown(&hash_file, Some(65534), Some(65534)).unwrap();
        assert!(refusal().await.contains("owned by uid 65534"));
        std::os::unix::fs::chown(&hash_file, Some(0), Some(0)).unwrap();
    }

    // The gateway's own closed file is used: no new key is generated.
    let again = weir::start(options).await.expect("starts");
    assert_eq!(again.generated_admin_key, None);
    again.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_are_written_checked_and_never_read_back() {
    let (_etcd, gateway) = etcd_gateway().await;
    let api = Api::new(&gateway, ADMIN_KEY);
    let ca = weir_tests::tls::TestCa::new("admin test CA");
    let leaf = ca.leaf(&["api.test", "www.test"]);
    let other = ca.leaf(&["api.test"]);

    // A key that is not the certificate's is refused, and says which field.
    let reply = api
        .put(
            "/v1/ssl/api",
            json!({"cert": leaf.cert_pem, "key": other.key_pem, "snis": ["api.test"]}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    let errors = reply.json()["errors"].clone();
    assert_eq!(errors[0]["path"], "/key", "{errors}");
    // So are garbage and a name that is not a DNS name.
    let reply = api
        .put(
            "/v1/ssl/api",
            json!({"cert": "-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n",
                   "key": leaf.key_pem, "snis": ["API.test:443"]}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    let paths: Vec<String> = reply.json()["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap().to_owned())
        .collect();
    assert!(paths.contains(&"/snis/0".to_owned()), "{paths:?}");
    assert!(paths.contains(&"/cert".to_owned()), "{paths:?}");

    let reply = api
        .put(
            "/v1/ssl/api",
            json!({"cert": leaf.cert_pem, "key": leaf.key_pem, "snis": ["api.test"]}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    // No answer carries the key: not the write's, not a read, not a list.
    assert!(!reply.text().contains("PRIVATE KEY"), "{}", reply.text());
    let read = api.get("/v1/ssl/api").await;
    assert_eq!(read.json()["value"]["key"], "<redacted>");
    assert!(!api.get("/v1/ssl").await.text().contains("PRIVATE KEY"));

    // A PATCH without the key keeps the stored one, and the certificate serves the new name.
    let reply = api
        .patch("/v1/ssl/api", json!({"snis": ["api.test", "www.test"]}))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let config = weir_tests::tls::client_config(&ca.pem(), &[b"http/1.1"]);
    let addr = gateway.tls_addr();
    eventually("the patched certificate serves its new name", SOON, || {
        let config = config.clone();
        let der = leaf.der.clone();
        async move {
            let got = weir_tests::tls::connect(addr, "www.test", config).await;
            matches!(got, Ok((_, shown)) if shown == der)
        }
    })
    .await;
    let (_, shown) = weir_tests::tls::connect(addr, "api.test", config)
        .await
        .expect("the stored key still serves");
    assert_eq!(shown, leaf.der);
}

/// Which nodes answer `count` requests to `url` carrying `x-user: user`.
async fn answered_by(url: &str, user: &str, count: usize) -> std::collections::BTreeSet<String> {
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..count {
        let reply = send(
            request(Method::GET, url)
                .header("x-user", user)
                .body(Full::default())
                .expect("a request"),
        )
        .await;
        seen.insert(reply.header("x-upstream").unwrap_or("none").to_owned());
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_settings_change_how_a_discovered_service_is_balanced() {
    let (etcd, gateway) = etcd_gateway().await;
    let api = Api::new(&gateway, ADMIN_KEY);
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    for (id, up) in [("a", &a), ("b", &b)] {
        etcd.put(
            &format!("/weir/services/users/{id}"),
            json!({"host": "127.0.0.1", "port": up.port()}),
        )
        .await;
    }
    expect(
        &api.put(
            "/v1/routes/users",
            json!({"uri": "/users/*", "service": "users"}),
        )
        .await,
        StatusCode::CREATED,
    );
    let url = gateway.url("/users/1");
    // Without settings: round robin over both.
    eventually("both nodes serve", SOON, || async {
        answered_by(&url, "ann", 4).await.len() == 2
    })
    .await;

    // Hashing on a header keeps one user on one node.
    let settings = json!({"type": "chash", "hash_on": "header:x-user", "retry_on": [503]});
    expect(
        &api.put("/v1/service-settings/users", settings).await,
        StatusCode::CREATED,
    );
    eventually("the service hashes on x-user", SOON, || async {
        answered_by(&url, "ann", 10).await.len() == 1
    })
    .await;
    let stored = expect(&api.get("/v1/service-settings/users").await, StatusCode::OK);
    assert_eq!(stored["value"]["hash_on"], "header:x-user", "{stored}");

    // A bad change is refused at its field, and one that reaches etcd past the API is
    // reported while the previous settings keep serving.
    let refused = expect(
        &api.put("/v1/service-settings/users", json!({"type": "chash"}))
            .await,
        StatusCode::BAD_REQUEST,
    );
    assert!(refused.to_string().contains("/hash_on"), "{refused}");
    let refused = expect(
        &api.put("/v1/service-settings/users", json!({"nodes": []}))
            .await,
        StatusCode::BAD_REQUEST,
    );
    assert!(refused.to_string().contains("nodes"), "{refused}");
    let generation = gateway.generation();
    etcd.put_raw("/weir/service-settings/users", "{not json")
        .await;
    eventually("the bad value is seen", SOON, || async {
        gateway.generation() > generation
    })
    .await;
    assert!(
        gateway.refusal("users").contains("invalid JSON"),
        "{:?}",
        gateway.errors()
    );
    assert_eq!(answered_by(&url, "ann", 10).await.len(), 1);

    // Without settings the service is round robin again.
    etcd.delete("/weir/service-settings/users").await;
    eventually("round robin again", SOON, || async {
        answered_by(&url, "ann", 4).await.len() == 2
    })
    .await;
}

/// The stored JSON under an etcd key.
async fn stored(etcd: &Etcd, key: &str) -> Value {
    let mut client = etcd.client().await;
    let got = client.get(key, None).await.expect("etcd get");
    serde_json::from_slice(got.kvs()[0].value()).expect("stored JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_reader_sees_a_secret_and_a_read_written_back_keeps_them() {
    use base64::Engine;
    let etcd = Etcd::start().await;
    let viewer_key = "viewer-secret";
    etcd.put(
        "/weir/admin",
        json!({"keys": [{"name": "grafana", "key_sha256": weir::digest::sha256_hex(viewer_key.as_bytes()), "role": "viewer"}]}),
    )
    .await;
    let gateway = TestGateway::start_etcd(&etcd.url, None).await;
    let admin = Api::new(&gateway, ADMIN_KEY);
    let viewer = Api::new(&gateway, viewer_key);
    let up = Upstream::start("u").await;
    for (name, path, grants) in [
        (
            "key-auth",
            plugins::KEY_AUTH,
            json!({"consumers": ["key-auth"]}),
        ),
        (
            "body-crypt",
            plugins::BODY_CRYPT,
            json!({"wasi": ["random"]}),
        ),
        ("headers", plugins::HEADERS, json!({})),
    ] {
        let module = expect(
            &admin
                .post(
                    "/v1/modules",
                    std::fs::read(path).expect("a built component"),
                )
                .await,
            StatusCode::CREATED,
        );
        expect(
            &admin
                .put(
                    &format!("/v1/plugins/{name}"),
                    json!({"sha256": module["sha256"], "grants": grants}),
                )
                .await,
            StatusCode::CREATED,
        );
    }
    expect(
        &admin
            .put(
                "/v1/upstreams/u",
                json!({"nodes": [{"host": "127.0.0.1", "port": up.port()}]}),
            )
            .await,
        StatusCode::CREATED,
    );
    let aes_key = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(*b"SECRET-AES-KEY-of-thirty-two-by!");
    let route = json!({"uri": "/s", "upstream_id": "u", "plugins": [
        {"name": "key-auth", "config": {"header": "x-api-key", "keys": ["SECRET-route-key"]}},
        {"name": "body-crypt", "config": {"keys": {"k1": aes_key}, "active": "k1",
            "response": "encrypt", "content_types": ["application/x-never"]}},
        {"name": "headers", "config": {"request": {"set": {
            "Authorization": "Bearer SECRET-upstream-token", "x-env": "prod"}}}}]});
    expect(
        &admin.put("/v1/routes/s", route.clone()).await,
        StatusCode::CREATED,
    );
    let consumer = json!({"credentials": {
        "key-auth": {"key": "SECRET-consumer-key"},
        "my-auth": {"id": "carol-id", "token": "SECRET-my-auth-token"}}});
    expect(
        &admin.put("/v1/consumers/carol", consumer).await,
        StatusCode::CREATED,
    );
    let with_key = |key: &'static str| {
        let url = gateway.url("/s");
        async move {
            send(
                request(Method::GET, &url)
                    .header("x-api-key", key)
                    .body(Full::default())
                    .unwrap(),
            )
            .await
        }
    };
    // Once the route serves, its plugins have described their configs.
    eventually("the route serves its key", SOON, || async {
        with_key("SECRET-route-key").await.status == StatusCode::OK
    })
    .await;
    let served = with_key("SECRET-consumer-key").await;
    assert_eq!(served.status, StatusCode::OK, "{}", served.text());
    assert_eq!(
        served.json()["headers"]["authorization"],
        "Bearer SECRET-upstream-token"
    );

    // No reader, viewer or admin, reads a secret anywhere.
    for reader in [&viewer, &admin] {
        for path in [
            "/v1/routes",
            "/v1/routes/s",
            "/v1/consumers",
            "/v1/consumers/carol",
            "/v1/plugins",
            "/v1/status",
        ] {
            let reply = expect(&reader.get(path).await, StatusCode::OK).to_string();
            for secret in ["SECRET", &aes_key] {
                assert!(!reply.contains(secret), "{path}: {reply}");
            }
        }
    }
    let read = expect(&viewer.get("/v1/routes/s").await, StatusCode::OK);
    assert_eq!(read["value"]["plugins"][0]["config"]["keys"], "<redacted>");
    assert_eq!(read["value"]["plugins"][0]["config"]["header"], "x-api-key");
    assert_eq!(
        read["value"]["plugins"][2]["config"]["request"]["set"]["x-env"],
        "prod"
    );
    let carol = expect(&viewer.get("/v1/consumers/carol").await, StatusCode::OK);
    assert_eq!(
        carol["value"]["credentials"],
        json!({"key-auth": {"key": "<redacted>"},
               "my-auth": {"id": "carol-id", "token": "<redacted>"}})
    );

    // What a read answered, written back as it is (as the dashboard's editor does), keeps
    // every secret.
    let read = admin.get("/v1/routes/s").await;
    let etag = read.header("etag").unwrap().to_owned();
    expect(
        &admin
            .put_if("/v1/routes/s", read.json()["value"].clone(), &etag)
            .await,
        StatusCode::OK,
    );
    assert_eq!(
        stored(&etcd, "/weir/routes/s").await["plugins"],
        route["plugins"]
    );
    let read = admin.get("/v1/consumers/carol").await;
    let etag = read.header("etag").unwrap().to_owned();
    expect(
        &admin
            .put_if("/v1/consumers/carol", read.json()["value"].clone(), &etag)
            .await,
        StatusCode::OK,
    );
    assert_eq!(
        stored(&etcd, "/weir/consumers/carol").await["credentials"]["my-auth"]["token"],
        "SECRET-my-auth-token"
    );
    // A PATCH that changes something else leaves them as well, and the keys still let in.
    expect(
        &admin
            .patch("/v1/routes/s", json!({"methods": ["GET"]}))
            .await,
        StatusCode::OK,
    );
    assert_eq!(
        stored(&etcd, "/weir/routes/s").await["plugins"],
        route["plugins"]
    );
    assert_eq!(with_key("SECRET-route-key").await.status, StatusCode::OK);
    assert_eq!(with_key("SECRET-consumer-key").await.status, StatusCode::OK);
    assert_eq!(
        with_key("<redacted>").await.status,
        StatusCode::UNAUTHORIZED
    );

    // The placeholder where no secret is stored is refused, never stored.
    let refused = expect(
        &admin
            .put(
                "/v1/consumers/dave",
                json!({"credentials": {"key-auth": {"key": "<redacted>"}}}),
            )
            .await,
        StatusCode::BAD_REQUEST,
    );
    assert_eq!(refused["errors"][0]["path"], "/credentials/key-auth/key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_typed_secret_is_named_by_its_field_never_echoed() {
    let etcd = Etcd::start().await;
    let child = weir_tests::ChildGateway::start_etcd(&etcd.url).await;
    let admin = Api {
        base: child.admin.clone(),
        headers: vec![("x-api-key".into(), ADMIN_KEY.into())],
    };
    // Through the API: refused with the field and the type it wants.
    let reply = admin
        .put(
            "/v1/consumers/dave",
            json!({"credentials": {"key-auth": "SECRET-123"}}),
        )
        .await;
    let refused = expect(&reply, StatusCode::BAD_REQUEST);
    assert!(!reply.text().contains("SECRET-123"), "{}", reply.text());
    assert_eq!(refused["errors"][0]["path"], "/credentials/key-auth");
    assert!(
        refused["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("expected a map"),
        "{refused}"
    );
    // Straight into the store: reported in /v1/status and the log, the value in neither.
    etcd.put(
        "/weir/consumers/erin",
        json!({"name": "erin", "credentials": {"key-auth": "SECRET-123"}}),
    )
    .await;
    let url = format!("{}/v1/status", child.admin);
    eventually("/v1/status reports the bad consumer", SOON, || async {
        status_error(&url, "erin").await.is_some()
    })
    .await;
    let status = status_error(&url, "erin").await.expect("reported");
    assert!(!status.to_string().contains("SECRET-123"), "{status}");
    eventually("the log reports the consumer", SOON, || async {
        child.log().contains("/credentials/key-auth")
    })
    .await;
    assert!(!child.log().contains("SECRET-123"), "{}", child.log());
    assert!(!admin.get("/v1/status").await.text().contains("SECRET-123"));
}
