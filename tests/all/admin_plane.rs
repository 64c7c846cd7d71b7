//! The admin plane against a browser's attacks: a rebound name (`Host`), a page on another
//! site (`Origin`, `Sec-Fetch-Site`), the session cookie on a TLS listener, password checks
//! that do not hold up the listener, and sessions shared by every gateway of a cluster.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use serde_json::{Value, json};
use weir::{AdminOptions, ConfigSource};
use weir_tests::etcd::Etcd;
use weir_tests::tls::{Http1, TestCa, client_config, connect};
use weir_tests::{ADMIN_KEY, Reply, TestGateway, eventually, get, request, send, yaml};

/// A bound on waits for an event, not an expected time.
const SOON: Duration = Duration::from_secs(30);

/// Sends `method path` to the admin listener at `base` with `headers` and a JSON `body`.
async fn call(
    base: &str,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> Reply {
    let mut builder = request(method, &format!("{base}{path}"));
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
    send(builder.body(Full::new(body)).expect("a request")).await
}

fn alice(password: &str) -> Value {
    let hash = weir::admin::auth::hash_password(password);
    json!({"username": "alice", "password_hash": hash, "role": "admin"})
}

/// Logs in as alice at `base`; returns the `name=value` cookie and the CSRF token.
async fn login(base: &str) -> (String, String) {
    let reply = call(
        base,
        Method::POST,
        "/v1/login",
        &[],
        Some(json!({"username": "alice", "password": "correct horse"})),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let cookie = reply.header("set-cookie").expect("a session cookie");
    let pair = cookie.split(';').next().unwrap().to_owned();
    let csrf = reply.json()["csrf_token"].as_str().unwrap().to_owned();
    (pair, csrf)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebound_host_is_misdirected_and_the_listeners_own_names_are_served() {
    let gateway = TestGateway::start(&yaml(json!({"admin": {"hosts": ["gw.example"]}}))).await;
    let base = gateway.admin_url("");
    let port = base.rsplit(':').next().unwrap().to_owned();
    for (host, status) in [
        (
            format!("attacker.example:{port}"),
            StatusCode::MISDIRECTED_REQUEST,
        ),
        (format!("127.0.0.2:{port}"), StatusCode::MISDIRECTED_REQUEST),
        (
            format!("x@127.0.0.1:{port}"),
            StatusCode::MISDIRECTED_REQUEST,
        ),
        (format!("127.0.0.1:{port}"), StatusCode::OK),
        (format!("localhost:{port}"), StatusCode::OK),
        (format!("gw.example:{port}"), StatusCode::OK),
        (format!("GW.example.:{port}"), StatusCode::OK),
    ] {
        for path in ["/healthz", "/v1/routes"] {
            let headers = [("host", host.as_str()), ("x-api-key", ADMIN_KEY)];
            let reply = call(&base, Method::GET, path, &headers, None).await;
            assert_eq!(reply.status, status, "{host} {path}: {}", reply.text());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_on_another_site_can_neither_write_nor_read_the_csrf_token() {
    let etcd = Etcd::start().await;
    etcd.put("/weir/admin", json!({"accounts": [alice("correct horse")]}))
        .await;
    let gateway = TestGateway::start_etcd(&etcd.url, None).await;
    let base = gateway.admin_url("");
    let own = base.clone();
    let credentials = json!({"username": "alice", "password": "correct horse"});
    for (name, value) in [
        ("origin", "http://evil.example"),
        ("origin", "null"),
        ("sec-fetch-site", "cross-site"),
    ] {
        let headers = [(name, value)];
        let reply = call(
            &base,
            Method::POST,
            "/v1/login",
            &headers,
            Some(credentials.clone()),
        )
        .await;
        assert_eq!(
            reply.status,
            StatusCode::FORBIDDEN,
            "login with {name}: {value}"
        );
        assert!(reply.header("set-cookie").is_none());
    }
    // The dashboard's own page logs in, and reads its CSRF token.
    let page = [("origin", own.as_str()), ("sec-fetch-site", "same-origin")];
    let reply = call(&base, Method::POST, "/v1/login", &page, Some(credentials)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let cookie = reply
        .header("set-cookie")
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let session = call(
        &base,
        Method::GET,
        "/v1/session",
        &[("cookie", &cookie)],
        None,
    )
    .await;
    assert_eq!(session.status, StatusCode::OK);
    let csrf = session.json()["csrf_token"].as_str().unwrap().to_owned();
    // Another site's page gets neither the token nor a write, even with it.
    let cross = [
        ("cookie", cookie.as_str()),
        ("sec-fetch-site", "cross-site"),
    ];
    let stolen = call(&base, Method::GET, "/v1/session", &cross, None).await;
    assert_eq!(stolen.status, StatusCode::FORBIDDEN);
    assert!(!stolen.text().contains(&csrf));
    let upstream = json!({"nodes": [{"host": "h", "port": 1}]});
    let forged = [
        ("cookie", cookie.as_str()),
        ("x-csrf-token", csrf.as_str()),
        ("origin", "http://evil.example"),
    ];
    let reply = call(
        &base,
        Method::PUT,
        "/v1/upstreams/u",
        &forged,
        Some(upstream.clone()),
    )
    .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());
    // A key from another origin is refused too; from the page, or from no page, it writes.
    let keyed = [("x-api-key", ADMIN_KEY), ("origin", "http://evil.example")];
    let reply = call(
        &base,
        Method::PUT,
        "/v1/upstreams/u",
        &keyed,
        Some(upstream.clone()),
    )
    .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    let from_page = [
        ("cookie", cookie.as_str()),
        ("x-csrf-token", csrf.as_str()),
        ("origin", own.as_str()),
    ];
    let reply = call(
        &base,
        Method::PUT,
        "/v1/upstreams/u",
        &from_page,
        Some(upstream.clone()),
    )
    .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    let curl = [("x-api-key", ADMIN_KEY)];
    let reply = call(&base, Method::PUT, "/v1/upstreams/v", &curl, Some(upstream)).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_admin_listener_sets_a_host_prefixed_secure_cookie() {
    let ca = TestCa::new("weir admin CA");
    let leaf = ca.leaf(&["localhost"]);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("weir.yaml");
    std::fs::write(
        &config,
        yaml(json!({
            "ssl": [{"id": "admin", "cert": leaf.cert_pem, "key": leaf.key_pem,
                     "snis": ["localhost"], "default": true}],
            "admin": {"accounts": [alice("correct horse")]},
        })),
    )
    .unwrap();
    let options = AdminOptions {
        tls: true,
        ..weir_tests::test_admin()
    };
    let gateway = TestGateway::start_admin(ConfigSource::File(config), options).await;
    let addr: std::net::SocketAddr = gateway
        .admin_url("")
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let host = format!("localhost:{}", addr.port());
    let tls = client_config(&ca.pem(), &[b"http/1.1"]);
    let (stream, _) = connect(addr, "localhost", tls)
        .await
        .expect("a TLS handshake");
    let mut admin = Http1::over(stream).await;
    let login = Request::post("/v1/login")
        .header("host", &host)
        .body(Full::new(Bytes::from(
            json!({"username": "alice", "password": "correct horse"}).to_string(),
        )))
        .unwrap();
    let reply = admin.send(login).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let cookie = reply.header("set-cookie").unwrap().to_owned();
    assert!(cookie.starts_with("__Host-weir_session="), "{cookie}");
    for attribute in ["Secure", "HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(
            cookie.split("; ").any(|a| a == attribute),
            "{attribute}: {cookie}"
        );
    }
    let pair = cookie.split(';').next().unwrap().to_owned();
    let session = Request::get("/v1/session")
        .header("host", &host)
        .header("cookie", &pair)
        .body(Full::default())
        .unwrap();
    assert_eq!(admin.send(session).await.json()["username"], "alice");
    // The plain cookie's name means nothing over TLS.
    let plain = pair.replacen("__Host-", "", 1);
    let session = Request::get("/v1/session")
        .header("host", &host)
        .header("cookie", &plain)
        .body(Full::default())
        .unwrap();
    assert_eq!(admin.send(session).await.status, StatusCode::UNAUTHORIZED);
}

/// An argon2id hash with enough passes that checking it takes a noticeable while.
fn slow_hash(password: &str) -> String {
    use argon2::PasswordHasher;
    let params = argon2::Params::new(19_456, 60, 1, None).unwrap();
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let salt = argon2::password_hash::SaltString::encode_b64(b"weir-test-salt16").unwrap();
    argon
        .hash_password(password.as_bytes(), &salt)
        .unwrap()
        .to_string()
}

// One thread for the gateway and the test: a password check on it would stop both.
#[tokio::test(flavor = "current_thread")]
async fn a_password_check_does_not_hold_up_the_admin_listener() {
    let account =
        json!({"username": "alice", "password_hash": slow_hash("correct horse"), "role": "admin"});
    let gateway = TestGateway::start(&yaml(json!({"admin": {"accounts": [account]}}))).await;
    let base = gateway.admin_url("");
    let logging_in = tokio::spawn(async move {
        let credentials = json!({"username": "alice", "password": "correct horse"});
        call(&base, Method::POST, "/v1/login", &[], Some(credentials)).await
    });
    // The listener answers while the check runs.
    let metrics = gateway.admin_url("/metrics");
    eventually(
        "/metrics shows a password check in flight",
        SOON,
        || async {
            get(&metrics)
                .await
                .text()
                .contains("weir_admin_password_checks_in_flight 1")
        },
    )
    .await;
    assert!(!logging_in.is_finished());
    assert_eq!(logging_in.await.unwrap().status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_works_on_every_gateway_survives_rotation_and_ends_everywhere() {
    let etcd = Etcd::start().await;
    etcd.put("/weir/admin", json!({"accounts": [alice("correct horse")]}))
        .await;
    let a = TestGateway::start_etcd(&etcd.url, None).await;
    let b = TestGateway::start_etcd(&etcd.url, None).await;
    let (base_a, base_b) = (a.admin_url(""), b.admin_url(""));
    let routes = |base: String, cookie: String| async move {
        call(
            &base,
            Method::GET,
            "/v1/routes",
            &[("cookie", &cookie)],
            None,
        )
        .await
        .status
    };
    let (first, csrf) = login(&base_a).await;
    assert_eq!(routes(base_b.clone(), first.clone()).await, StatusCode::OK);
    // The CSRF token is the same on the other gateway: it can write there.
    let write = [("cookie", first.as_str()), ("x-csrf-token", csrf.as_str())];
    let upstream = json!({"nodes": [{"host": "h", "port": 1}]});
    let reply = call(
        &base_b,
        Method::PUT,
        "/v1/upstreams/u",
        &write,
        Some(upstream),
    )
    .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());

    // A rotation: the session signed before it still works everywhere, and one signed after
    // it on the other gateway works here.
    let key = [("x-api-key", ADMIN_KEY)];
    let rotated = call(&base_a, Method::POST, "/v1/session-keys/rotate", &key, None).await;
    assert_eq!(rotated.status, StatusCode::OK, "{}", rotated.text());
    assert_eq!(routes(base_a.clone(), first.clone()).await, StatusCode::OK);
    assert_eq!(routes(base_b.clone(), first.clone()).await, StatusCode::OK);
    let (second, _) = login(&base_b).await;
    assert_eq!(routes(base_a.clone(), second.clone()).await, StatusCode::OK);

    // A logout on one gateway ends the session on the other.
    let out = call(
        &base_b,
        Method::POST,
        "/v1/logout",
        &[("cookie", &first)],
        None,
    )
    .await;
    assert_eq!(out.status, StatusCode::OK);
    assert_eq!(
        routes(base_a.clone(), first).await,
        StatusCode::UNAUTHORIZED
    );

    // A restarted gateway keeps the cluster's sessions.
    a.stop().await;
    let again = TestGateway::start_etcd(&etcd.url, None).await;
    assert_eq!(routes(again.admin_url(""), second).await, StatusCode::OK);
}
