//! TLS: the proxy listener serves certificates from the store, picked by SNI; certificates
//! change live without closing open connections; a bad one is refused and the old one keeps
//! serving; and upstreams can be HTTPS, verified against a CA of their own.

use std::time::Duration;

use http::StatusCode;
use serde_json::json;
use weir_tests::etcd::Etcd;
use weir_tests::tls::{Http1, Leaf, TestCa, TlsUpstream, client_config, connect};
use weir_tests::{TestGateway, Upstream, admin_get, eventually, get, metric, node, yaml};

const SOON: Duration = Duration::from_secs(30);

fn ssl(id: &str, leaf: &Leaf, snis: &[&str]) -> serde_json::Value {
    json!({"id": id, "cert": leaf.cert_pem, "key": leaf.key_pem, "snis": snis})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_name_gets_its_certificate_and_requests_arrive_as_https() {
    let ca = TestCa::new("weir test CA");
    let api = ca.leaf(&["api.test"]);
    let wild = ca.leaf(&["*.wild.test"]);
    let fallback = ca.leaf(&["fallback.test"]);
    let up = Upstream::start("u").await;
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "u", "nodes": [node(&up)]}],
        "routes": [{"id": "r", "uri": "/*", "upstream_id": "u"}],
        "ssl": [
            ssl("api", &api, &["api.test"]),
            ssl("wild", &wild, &["*.wild.test"]),
        ],
    })))
    .await;
    let config = client_config(&ca.pem(), &[b"http/1.1"]);

    let (stream, shown) = connect(gateway.tls_addr(), "api.test", config.clone())
        .await
        .expect("a handshake for api.test");
    assert_eq!(shown, api.der, "api.test gets its own certificate");
    let mut http = Http1::over(stream).await;
    let reply = http.get("api.test", "/hello").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let echo = reply.json();
    assert_eq!(echo["path"], "/hello");
    assert_eq!(echo["headers"]["x-forwarded-proto"], "https");

    let (_, shown) = connect(gateway.tls_addr(), "www.wild.test", config.clone())
        .await
        .expect("a handshake for www.wild.test");
    assert_eq!(shown, wild.der, "a wildcard covers one label");

    // No certificate for the name and no default: the handshake fails, and is counted.
    let refused = connect(gateway.tls_addr(), "other.test", config.clone()).await;
    assert!(refused.is_err(), "no certificate, no handshake");
    let admin = gateway.admin_url("/metrics");
    eventually("the failed handshake is counted", SOON, || {
        let admin = admin.clone();
        async move {
            metric(&admin, "weir_tls_handshake_failures_total{kind=\"error\"}").await >= 1.0
        }
    })
    .await;

    // The plain listener still serves, as http.
    let echo = get(&gateway.url("/plain")).await.json();
    assert_eq!(echo["headers"]["x-forwarded-proto"], "http");

    // A default certificate answers names nobody has, and clients that send none. In the
    // file, a key may be a path relative to the file.
    std::fs::write(gateway.dir().join("fallback-key.pem"), &fallback.key_pem).unwrap();
    let yaml_with_default = yaml(json!({
        "upstreams": [{"id": "u", "nodes": [node(&up)]}],
        "routes": [{"id": "r", "uri": "/*", "upstream_id": "u"}],
        "ssl": [
            ssl("api", &api, &["api.test"]),
            ssl("wild", &wild, &["*.wild.test"]),
            {"id": "fallback", "cert": fallback.cert_pem, "key": "fallback-key.pem", "default": true},
        ],
    }));
    gateway.reload(&yaml_with_default).await;
    let lenient = client_config_without_name_check(&ca.pem());
    let (_, shown) = connect(gateway.tls_addr(), "other.test", lenient)
        .await
        .expect("the default answers an unknown name");
    assert_eq!(shown, fallback.der);

    // Expiry is reported per certificate, in the status and as a metric.
    let status = admin_get(&gateway.admin_url("/v1/status")).await.json();
    let certificates = status["certificates"].as_array().expect("certificates");
    assert_eq!(certificates.len(), 3, "{status}");
    assert!(certificates[0]["expires_in_seconds"].as_i64().unwrap() > 86_400);
    let expiry = metric(&admin, "weir_tls_cert_expiry_seconds{id=\"api\"}").await;
    assert!(expiry > 1.7e9, "{expiry}");
}

/// A client that trusts `ca_pem` but accepts a certificate for any name (to see which
/// certificate a server picks for a name it has none for).
fn client_config_without_name_check(ca_pem: &str) -> std::sync::Arc<rustls::ClientConfig> {
    use rustls::client::WebPkiServerVerifier;
    use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};

    #[derive(Debug)]
    struct AnyName(std::sync::Arc<WebPkiServerVerifier>);

    impl ServerCertVerifier for AnyName {
        fn verify_server_cert(
            &self,
            end_entity: &rustls_pki_types::CertificateDer<'_>,
            intermediates: &[rustls_pki_types::CertificateDer<'_>],
            _name: &rustls_pki_types::ServerName<'_>,
            ocsp: &[u8],
            now: rustls_pki_types::UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            // Verify the chain under the name the certificate itself carries.
            let name = rustls_pki_types::ServerName::try_from("fallback.test").unwrap();
            self.0
                .verify_server_cert(end_entity, intermediates, &name, ocsp, now)
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &rustls_pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            self.0.verify_tls12_signature(message, cert, dss)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &rustls_pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            self.0.verify_tls13_signature(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.supported_verify_schemes()
        }
    }

    let mut roots = rustls::RootCertStore::empty();
    use rustls_pki_types::pem::PemObject;
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        WebPkiServerVerifier::builder_with_provider(std::sync::Arc::new(roots), provider.clone())
            .build()
            .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(AnyName(verifier)))
        .with_no_client_auth();
    std::sync::Arc::new(config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_is_negotiated_over_tls_and_plugins_behave_as_over_http1() {
    let ca = TestCa::new("weir test CA");
    let api = ca.leaf(&["api.test"]);
    let up = Upstream::start("u").await;
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [{"id": "u", "nodes": [node(&up)]}],
        "plugins": weir_tests::all_plugins(),
        "routes": [{"id": "r", "uri": "/*", "upstream_id": "u",
                    "plugins": [{"name": "key-auth", "config": {"keys": ["k"]}}]}],
        "ssl": [ssl("api", &api, &["api.test"])],
    })))
    .await;
    let config = client_config(&ca.pem(), &[b"h2", b"http/1.1"]);
    let (stream, _) = connect(gateway.tls_addr(), "api.test", config)
        .await
        .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let mut over_h2 = Vec::new();
    for key in [None, Some("wrong"), Some("k")] {
        let mut request = http::Request::get("https://api.test/over-h2");
        if let Some(key) = key {
            request = request.header("x-api-key", key);
        }
        let request = request
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.version(), http::Version::HTTP_2);
        over_h2.push(response.status());
    }
    // The same requests over HTTP/1.1 on the plain listener get the same answers.
    let mut over_h1 = Vec::new();
    for key in [None, Some("wrong"), Some("k")] {
        let mut request = weir_tests::request(http::Method::GET, &gateway.url("/over-h1"));
        if let Some(key) = key {
            request = request.header("x-api-key", key);
        }
        let reply = weir_tests::send(
            request
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap(),
        )
        .await;
        over_h1.push(reply.status);
    }
    assert_eq!(
        over_h2,
        [
            StatusCode::UNAUTHORIZED,
            StatusCode::UNAUTHORIZED,
            StatusCode::OK
        ]
    );
    assert_eq!(over_h1, over_h2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_replaced_in_etcd_serves_at_the_next_handshake_and_a_bad_one_is_refused() {
    let etcd = Etcd::start().await;
    let ca = TestCa::new("weir test CA");
    let first = ca.leaf(&["api.test"]);
    let second = ca.leaf(&["api.test"]);
    let stranger = ca.leaf(&["api.test"]);
    let up = Upstream::start("u").await;
    etcd.put(
        "/weir/upstreams/u",
        json!({"nodes": [{"host": "127.0.0.1", "port": up.port()}]}),
    )
    .await;
    etcd.put("/weir/routes/r", json!({"uri": "/*", "upstream_id": "u"}))
        .await;
    let put_cert =
        |leaf: &Leaf| json!({"cert": leaf.cert_pem, "key": leaf.key_pem, "snis": ["api.test"]});
    etcd.put("/weir/ssl/api", put_cert(&first)).await;
    let gateway = TestGateway::start_etcd(&etcd.url, None).await;
    let config = client_config(&ca.pem(), &[b"http/1.1"]);

    let (stream, shown) = connect(gateway.tls_addr(), "api.test", config.clone())
        .await
        .unwrap();
    assert_eq!(shown, first.der);
    let mut open = Http1::over(stream).await;
    assert_eq!(open.get("api.test", "/a").await.status, StatusCode::OK);

    etcd.put("/weir/ssl/api", put_cert(&second)).await;
    let addr = gateway.tls_addr();
    eventually("the new certificate is served", SOON, || {
        let config = config.clone();
        let der = second.der.clone();
        async move {
            matches!(connect(addr, "api.test", config).await, Ok((_, shown)) if shown == der)
        }
    })
    .await;
    // The connection opened under the old certificate is still open and serving.
    assert_eq!(open.get("api.test", "/b").await.status, StatusCode::OK);

    // A key that is not the certificate's: refused, with the reason in the status; the
    // second certificate keeps serving.
    let mismatched = json!({"cert": stranger.cert_pem, "key": first.key_pem, "snis": ["api.test"]});
    etcd.put("/weir/ssl/api", mismatched).await;
    let status_url = gateway.admin_url("/v1/status");
    ssl_error_reported(&status_url, "does not match the certificate").await;
    let (_, shown) = connect(gateway.tls_addr(), "api.test", config.clone())
        .await
        .unwrap();
    assert_eq!(shown, second.der, "the last good certificate keeps serving");

    // Garbage is refused the same way.
    etcd.put(
        "/weir/ssl/api",
        json!({"cert": "not a certificate", "key": "nor a key", "snis": ["api.test"]}),
    )
    .await;
    ssl_error_reported(&status_url, "holds no certificate").await;
    let (_, shown) = connect(gateway.tls_addr(), "api.test", config.clone())
        .await
        .unwrap();
    assert_eq!(shown, second.der);

    // Deleting the certificate stops serving the name.
    etcd.delete("/weir/ssl/api").await;
    eventually("the name is no longer served", SOON, || {
        let config = config.clone();
        async move { connect(addr, "api.test", config).await.is_err() }
    })
    .await;
}

/// Waits until `/v1/status` (at `status_url`) reports an `ssl` object refused for `reason`.
async fn ssl_error_reported(status_url: &str, reason: &str) {
    eventually(&format!("an ssl error: {reason}"), SOON, || async {
        let status = admin_get(status_url).await.json();
        status["errors"].as_array().is_some_and(|errors| {
            errors.iter().any(|e| {
                e["kind"] == "ssl" && e["reason"].as_str().is_some_and(|r| r.contains(reason))
            })
        })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstreams_are_verified_against_their_ca() {
    let upstream_ca = TestCa::new("upstream CA");
    let other_ca = TestCa::new("some other CA");
    let leaf = upstream_ca.leaf(&["backend.internal"]);
    let https = TlsUpstream::start("secure", &leaf).await;
    let h = |ca: &TestCa, scheme: &str| {
        json!({"id": format!("{scheme}-{}", ca.pem().len()), "scheme": scheme,
               "nodes": [{"host": "127.0.0.1", "port": https.port()}],
               "tls": {"ca": ca.pem(), "sni": "backend.internal"}})
    };
    let mut good = h(&upstream_ca, "https");
    good["id"] = json!("good");
    let mut good_h2 = h(&upstream_ca, "grpcs");
    good_h2["id"] = json!("good-h2");
    let mut wrong = h(&other_ca, "https");
    wrong["id"] = json!("wrong");
    let mut unverified = h(&other_ca, "https");
    unverified["id"] = json!("unverified");
    unverified["tls"]["verify"] = json!(false);
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [good, good_h2, wrong, unverified],
        "routes": [
            {"id": "good", "uri": "/good", "upstream_id": "good"},
            {"id": "good-h2", "uri": "/good-h2", "upstream_id": "good-h2"},
            {"id": "wrong", "uri": "/wrong", "upstream_id": "wrong"},
            {"id": "unverified", "uri": "/unverified", "upstream_id": "unverified"},
        ],
    })))
    .await;
    assert!(gateway.errors().is_empty(), "{:?}", gateway.errors());

    let reply = get(&gateway.url("/good")).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["upstream"], "secure");
    let reply = get(&gateway.url("/good-h2")).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());

    // A certificate the upstream's CA did not sign: 502, and the log says why.
    let reply = get(&gateway.url("/wrong")).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert!(
        !reply.text().contains("certificate"),
        "no TLS detail to the client: {}",
        reply.text()
    );
    let line = gateway
        .access_log(4)
        .await
        .into_iter()
        .find(|line| line["route"] == "wrong")
        .expect("an access-log line for /wrong");
    assert_eq!(line["status"], 502);

    // verify: false is an explicit choice, and then any certificate will do.
    assert_eq!(
        get(&gateway.url("/unverified")).await.status,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_wants_a_client_certificate_gets_the_configured_one() {
    let ca = TestCa::new("upstream CA");
    let clients = TestCa::new("client CA");
    let leaf = ca.leaf(&["backend.internal"]);
    let client = clients.leaf(&["weir.gateway"]);
    let mtls = TlsUpstream::start_with("mtls", &leaf, Some(&clients.pem())).await;
    let upstream = |id: &str, tls: serde_json::Value| {
        json!({"id": id, "scheme": "https",
               "nodes": [{"host": "127.0.0.1", "port": mtls.port()}], "tls": tls})
    };
    let gateway = TestGateway::start(&yaml(json!({
        "upstreams": [
            upstream("with", json!({"ca": ca.pem(), "sni": "backend.internal",
                                    "client_cert": client.cert_pem, "client_key": client.key_pem})),
            upstream("without", json!({"ca": ca.pem(), "sni": "backend.internal"})),
        ],
        "routes": [
            {"id": "with", "uri": "/with", "upstream_id": "with"},
            {"id": "without", "uri": "/without", "upstream_id": "without"},
        ],
    })))
    .await;
    assert!(gateway.errors().is_empty(), "{:?}", gateway.errors());
    let reply = get(&gateway.url("/with")).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["upstream"], "mtls");
    assert_eq!(
        get(&gateway.url("/without")).await.status,
        StatusCode::BAD_GATEWAY
    );

    // Half a client identity is refused when the config is read.
    gateway
        .reload(&yaml(json!({
            "upstreams": [upstream("half", json!({"ca": ca.pem(), "client_cert": client.cert_pem}))],
        })))
        .await;
    let errors = gateway.errors();
    assert!(
        errors
            .iter()
            .any(|e| e.id == "half" && e.reason.contains("client_key")),
        "{errors:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plain_and_tls_listeners_share_one_max_connections() {
    let ca = TestCa::new("weir test CA");
    let api = ca.leaf(&["api.test"]);
    let up = Upstream::start("u").await;
    let gateway = TestGateway::start(&yaml(json!({
        "server": {"max_connections": 1},
        "upstreams": [{"id": "u", "nodes": [node(&up)]}],
        "routes": [{"id": "r", "uri": "/*", "upstream_id": "u"}],
        "ssl": [ssl("api", &api, &["api.test"])],
    })))
    .await;
    let open = |listener: &'static str| {
        gateway
            .gateway()
            .metrics()
            .connections_open
            .get_or_create(&weir::metrics::ListenerLabels { listener })
            .get()
    };
    // One plain connection, held open, uses the whole budget...
    let held = tokio::net::TcpStream::connect(gateway.addr())
        .await
        .unwrap();
    eventually("the plain connection is counted", SOON, || async {
        open("proxy") == 1
    })
    .await;
    // ...so a TLS client is turned away at accept.
    let config = client_config(&ca.pem(), &[b"http/1.1"]);
    assert!(
        connect(gateway.tls_addr(), "api.test", config.clone())
            .await
            .is_err(),
        "over the shared max_connections"
    );
    assert_eq!(open("proxy_tls"), 0);
    drop(held);
    let addr = gateway.tls_addr();
    eventually("a TLS client gets in once the plain one left", SOON, || {
        let config = config.clone();
        async move { connect(addr, "api.test", config).await.is_ok() }
    })
    .await;
}
