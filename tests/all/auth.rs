//! jwt-auth, basic-auth and traffic-split through a real gateway: tokens signed here and by
//! PyJWT, password hashes made here, forged and expired credentials refused, and traffic sent
//! to upstreams by weight and by header, query and cookie.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use http::StatusCode;
use rsa::pkcs8::{EncodePublicKey, LineEnding};
use rsa::signature::{SignatureEncoding, Signer};
use serde_json::{Value, json};
use weir_tests::{TestGateway, Upstream, all_plugins, node, yaml};

use crate::plugins::{assert_refused_at_load, get_with};

/// A gateway whose upstreams are `u` (`up`) and `canary`, with `consumers` and `routes`.
async fn gateway_with(
    up: &Upstream,
    canary: &Upstream,
    consumers: Value,
    routes: Value,
) -> TestGateway {
    TestGateway::start(&yaml(json!({
        "upstreams": [
            {"id": "u", "nodes": [node(up)]},
            {"id": "canary", "nodes": [node(canary)]},
        ],
        "plugins": all_plugins(),
        "consumers": consumers,
        "routes": routes,
    })))
    .await
}

/// Asserts a 401 with `message` and a `WWW-Authenticate` that starts with `challenge`.
fn assert_unauthorized(reply: &weir_tests::Reply, message: &str, challenge: &str) {
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{}", reply.text());
    assert_eq!(reply.json()["error"], message);
    let www = reply.header("www-authenticate").unwrap_or_default();
    assert!(www.starts_with(challenge), "www-authenticate: {www:?}");
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

fn b64url(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// `header.claims`, the part of a JWT its signature covers.
fn signing_input(header: &Value, claims: &Value) -> String {
    format!(
        "{}.{}",
        b64url(header.to_string()),
        b64url(claims.to_string())
    )
}

/// An HS256 JWT, signed with `secret` here (not with the crate jwt-auth verifies with).
fn hs256(secret: &[u8], claims: Value) -> String {
    let input = signing_input(&json!({"alg": "HS256", "typ": "JWT"}), &claims);
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).expect("any key length");
    mac.update(input.as_bytes());
    format!("{input}.{}", b64url(mac.finalize().into_bytes()))
}

/// An RS256 JWT (RSASSA-PKCS1-v1_5 with SHA-256) signed with `key`.
fn rs256(key: &rsa::RsaPrivateKey, claims: Value) -> String {
    let input = signing_input(&json!({"alg": "RS256", "typ": "JWT"}), &claims);
    let signer = rsa::pkcs1v15::SigningKey::<rsa::sha2::Sha256>::new(key.clone());
    format!("{input}.{}", b64url(signer.sign(input.as_bytes()).to_vec()))
}

/// A fresh 2048-bit RSA key and its public key as SPKI PEM.
fn rsa_key() -> (rsa::RsaPrivateKey, String) {
    let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).expect("an RSA key");
    let public = key
        .to_public_key()
        .to_public_key_pem(LineEnding::LF)
        .expect("a PEM public key");
    (key, public)
}

const ALICE_SECRET: &str = "alice-secret-of-at-least-thirty-two-bytes";

/// jwt-auth consumers: alice (HS256, key `user-a`) and billing (RS256 with `public_key`).
fn jwt_consumers(billing_public: &str) -> Value {
    json!([
        {"name": "alice", "labels": {"team": "a"},
         "credentials": {"jwt-auth": {"key": "user-a", "secret": ALICE_SECRET, "algorithm": "HS256"}}},
        {"name": "billing",
         "credentials": {"jwt-auth": {"key": "billing", "algorithm": "RS256", "public_key": billing_public}}},
    ])
}

fn jwt_route(config: Value) -> Value {
    json!([{"id": "jwt", "uri": "/*", "upstream_id": "u",
            "plugins": [{"name": "jwt-auth", "config": config}]}])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_auth_accepts_hs256_and_rs256_tokens_and_names_the_consumer() {
    let (up, canary) = (Upstream::start("u").await, Upstream::start("canary").await);
    let (billing_key, billing_public) = rsa_key();
    let gateway = gateway_with(
        &up,
        &canary,
        jwt_consumers(&billing_public),
        jwt_route(json!({"hide_credentials": true})),
    )
    .await;
    assert!(gateway.errors().is_empty(), "{:?}", gateway.errors());

    let token = hs256(
        ALICE_SECRET.as_bytes(),
        json!({"key": "user-a", "exp": now_s() + 60}),
    );
    let reply = get_with(
        &gateway.url("/orders"),
        &[
            ("authorization", &format!("Bearer {token}")),
            ("x-consumer-username", "mallory"),
        ],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let seen = &reply.json()["headers"];
    assert_eq!(seen["x-consumer-username"], "alice");
    assert!(
        seen.get("authorization").is_none(),
        "hide_credentials keeps the token from the upstream: {seen}"
    );

    // The query parameter and the cookie carry it too, and are taken out as well.
    let reply = get_with(&gateway.url(&format!("/orders?page=2&jwt={token}")), &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["query"], "page=2");
    assert_eq!(reply.json()["headers"]["x-consumer-username"], "alice");
    let reply = get_with(
        &gateway.url("/orders"),
        &[("cookie", &format!("theme=dark; jwt={token}"))],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["headers"]["cookie"], "theme=dark");

    // A consumer whose credential pins RS256, with a key made for this test.
    let token = rs256(&billing_key, json!({"key": "billing", "exp": now_s() + 60}));
    let reply = get_with(
        &gateway.url("/invoices"),
        &[("authorization", &format!("Bearer {token}"))],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["headers"]["x-consumer-username"], "billing");

    let log = gateway.access_log(4).await;
    assert_eq!(log[0]["consumer"], "alice", "{}", log[0]);
    assert_eq!(log[3]["consumer"], "billing", "{}", log[3]);
    assert_eq!(up.hits(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_auth_refuses_alg_none_wrong_keys_expired_and_confused_tokens() {
    let (up, canary) = (Upstream::start("u").await, Upstream::start("canary").await);
    let (billing_key, billing_public) = rsa_key();
    let gateway = gateway_with(
        &up,
        &canary,
        jwt_consumers(&billing_public),
        jwt_route(json!({})),
    )
    .await;
    let bearer = |token: &str| format!("Bearer {token}");
    let call = |token: String| {
        let url = gateway.url("/");
        async move { get_with(&url, &[("authorization", &bearer(&token))]).await }
    };
    let invalid = "Bearer error=\"invalid_token\"";

    let missing = get_with(&gateway.url("/"), &[]).await;
    assert_unauthorized(&missing, "missing JWT", "Bearer");

    // alg none: no signature at all, for alice's key.
    let claims = json!({"key": "user-a", "exp": now_s() + 60});
    let none = format!(
        "{}.",
        signing_input(&json!({"alg": "none", "typ": "JWT"}), &claims)
    );
    assert_unauthorized(&call(none).await, "invalid JWT", invalid);

    // Signed with the wrong secret; signed for a key nobody has.
    let wrong = hs256(b"not-alices-secret-but-just-as-long!!!!", claims.clone());
    assert_unauthorized(&call(wrong).await, "invalid JWT", invalid);
    let stranger = hs256(
        ALICE_SECRET.as_bytes(),
        json!({"key": "user-z", "exp": now_s() + 60}),
    );
    assert_unauthorized(&call(stranger).await, "invalid JWT", invalid);

    // Expired two minutes ago (clock_skew_s is 0).
    let expired = hs256(
        ALICE_SECRET.as_bytes(),
        json!({"key": "user-a", "exp": now_s() - 120}),
    );
    assert_unauthorized(&call(expired).await, "JWT has expired", invalid);

    // An RS256 token presented for alice, whose credential pins HS256.
    let (other_key, _) = rsa_key();
    let rs = rs256(&other_key, claims.clone());
    assert_unauthorized(&call(rs).await, "invalid JWT", invalid);
    let rs = rs256(&billing_key, claims);
    assert_unauthorized(&call(rs).await, "invalid JWT", invalid);

    // The classic confusion: billing's public key (which anyone may know) as an HMAC secret.
    let confused = hs256(
        billing_public.as_bytes(),
        json!({"key": "billing", "exp": now_s() + 60}),
    );
    assert_unauthorized(&call(confused).await, "invalid JWT", invalid);

    // Garbage, and a token over 8 KiB.
    assert_unauthorized(&call("a.b.c".into()).await, "invalid JWT", invalid);
    let huge = hs256(
        ALICE_SECRET.as_bytes(),
        json!({"key": "user-a", "pad": "x".repeat(9000)}),
    );
    assert_unauthorized(&call(huge).await, "invalid JWT", invalid);

    assert_eq!(up.hits(), 0);
    // No refusal tells the client a secret or a key.
    assert!(!missing.text().contains(ALICE_SECRET));
}

/// Signs tokens with PyJWT: HS256 with argv[1], and ES256 and EdDSA with fresh keys whose
/// public PEMs it prints.
const PYJWT: &str = r#"
import json, sys, time
try:
    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519
except ImportError as error:
    print(f"import failed: {error}", file=sys.stderr)
    sys.exit(3)

exp = int(time.time()) + 300
es256 = ec.generate_private_key(ec.SECP256R1())
eddsa = ed25519.Ed25519PrivateKey.generate()

def public(key):
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()

print(json.dumps({
    "version": jwt.__version__,
    "hs256": jwt.encode({"key": "py-hs", "exp": exp}, sys.argv[1], algorithm="HS256"),
    "es256": jwt.encode({"key": "py-es", "exp": exp}, es256, algorithm="ES256"),
    "es256_public": public(es256),
    "eddsa": jwt.encode({"key": "py-ed", "exp": exp}, eddsa, algorithm="EdDSA"),
    "eddsa_public": public(eddsa),
}))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_auth_accepts_tokens_signed_by_pyjwt() {
    let secret = "a-python-secret-of-more-than-thirty-two-bytes";
    let python = weir_tests::python();
    let output = std::process::Command::new(&python)
        .args(["-c", PYJWT, secret])
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", python.display()));
    assert!(
        output.status.success(),
        "PyJWT could not sign ({}): {}\nInstall it with:  target/tools/python/bin/pip install \
         pyjwt==2.10.1 cryptography   (or run ./.ci/run)",
        python.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let signed: Value = serde_json::from_slice(&output.stdout).expect("the script prints JSON");

    let (up, canary) = (Upstream::start("u").await, Upstream::start("canary").await);
    let consumers = json!([
        {"name": "py-hs", "credentials": {"jwt-auth": {"key": "py-hs", "secret": secret}}},
        {"name": "py-es", "credentials": {"jwt-auth":
            {"key": "py-es", "algorithm": "ES256", "public_key": signed["es256_public"]}}},
        {"name": "py-ed", "credentials": {"jwt-auth":
            {"key": "py-ed", "algorithm": "EdDSA", "public_key": signed["eddsa_public"]}}},
    ]);
    let gateway = gateway_with(&up, &canary, consumers, jwt_route(json!({}))).await;
    assert!(gateway.errors().is_empty(), "{:?}", gateway.errors());
    for (token, consumer) in [("hs256", "py-hs"), ("es256", "py-es"), ("eddsa", "py-ed")] {
        let token = signed[token].as_str().expect("a token");
        let reply = get_with(
            &gateway.url("/"),
            &[("authorization", &format!("Bearer {token}"))],
        )
        .await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "PyJWT {} {consumer}: {}",
            signed["version"],
            reply.text()
        );
        assert_eq!(reply.json()["headers"]["x-consumer-username"], consumer);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_auth_refuses_bad_configs_at_load() {
    assert_refused_at_load(
        "jwt-auth",
        &[
            (json!({"clock_skew_s": 301}), "at most 300"),
            (json!({"algorithms": []}), "`algorithms` is empty"),
            (
                json!({"algorithms": ["none"]}),
                "does not match the plugin's schema",
            ),
            (
                json!({"header": null, "query": null, "cookie": null}),
                "set at least one",
            ),
            (
                json!({"secret": "inline"}),
                "does not match the plugin's schema",
            ),
        ],
    )
    .await;
}

fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{user}:{password}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_checks_argon2id_and_bcrypt_hashes() {
    use argon2::password_hash::{PasswordHasher, SaltString};
    // The crate's default parameters: m=19456 KiB, t=2, p=1 (OWASP's minimum for argon2id).
    let salt = SaltString::encode_b64(&now_s().to_be_bytes().repeat(2)).expect("a salt");
    let alice_hash = argon2::Argon2::default()
        .hash_password(b"alice's password", &salt)
        .expect("hashing")
        .to_string();
    assert!(alice_hash.starts_with("$argon2id$"), "{alice_hash}");
    let bob_hash = bcrypt::hash("bob's password", 6).expect("hashing");
    assert!(bob_hash.starts_with("$2b$06$"), "{bob_hash}");

    let (up, canary) = (Upstream::start("u").await, Upstream::start("canary").await);
    let consumers = json!([
        {"name": "alice", "credentials": {"basic-auth": {"username": "alice", "password": alice_hash}}},
        {"name": "bob", "credentials": {"basic-auth": {"username": "bob", "password": bob_hash}}},
        // A plaintext password is never compared, even when the client sends exactly it.
        {"name": "carol", "credentials": {"basic-auth": {"username": "carol", "password": "hunter2"}}},
    ]);
    let routes = json!([{"id": "staff", "uri": "/*", "upstream_id": "u", "plugins": [
        {"name": "basic-auth", "config": {"realm": "staff", "hide_credentials": true}},
    ]}]);
    let gateway = gateway_with(&up, &canary, consumers, routes).await;
    assert!(gateway.errors().is_empty(), "{:?}", gateway.errors());
    let url = gateway.url("/");
    let challenge = "Basic realm=\"staff\"";

    let started = Instant::now();
    let alice = get_with(
        &url,
        &[("authorization", &basic("alice", "alice's password"))],
    )
    .await;
    let argon2_request = started.elapsed();
    assert_eq!(alice.status, StatusCode::OK, "{}", alice.text());
    assert_eq!(alice.json()["headers"]["x-consumer-username"], "alice");
    assert!(alice.json()["headers"].get("authorization").is_none());

    let bob = get_with(&url, &[("authorization", &basic("bob", "bob's password"))]).await;
    assert_eq!(bob.status, StatusCode::OK, "{}", bob.text());
    assert_eq!(bob.json()["headers"]["x-consumer-username"], "bob");

    let wrong = get_with(&url, &[("authorization", &basic("alice", "guess"))]).await;
    assert_unauthorized(&wrong, "invalid credentials", challenge);
    assert_eq!(wrong.header("www-authenticate"), Some(challenge));
    let wrong = get_with(&url, &[("authorization", &basic("bob", "guess"))]).await;
    assert_unauthorized(&wrong, "invalid credentials", challenge);

    let started = Instant::now();
    let unknown = get_with(&url, &[("authorization", &basic("mallory", "x"))]).await;
    let lookup_request = started.elapsed();
    assert_unauthorized(&unknown, "invalid credentials", challenge);
    let plaintext = get_with(&url, &[("authorization", &basic("carol", "hunter2"))]).await;
    assert_unauthorized(&plaintext, "invalid credentials", challenge);

    for malformed in [
        "Basic !!!not base64!!!".to_owned(),
        format!("Basic {}", STANDARD.encode("no-colon-here")),
        format!("Basic {}", STANDARD.encode(":no-user")),
        "Bearer abc.def.ghi".to_owned(),
        format!("Basic {}", "QUFB".repeat(2000)),
    ] {
        let reply = get_with(&url, &[("authorization", &malformed)]).await;
        assert_unauthorized(&reply, "invalid credentials", challenge);
    }
    let missing = get_with(&url, &[]).await;
    assert_unauthorized(&missing, "missing credentials", challenge);
    assert_eq!(up.hits(), 2);

    // Not an assertion: what one argon2id check costs through the gateway, for the README.
    eprintln!(
        "basic-auth: argon2id (m=19456,t=2,p=1) request {argon2_request:?}, unknown user \
         {lookup_request:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_refuses_bad_configs_at_load() {
    assert_refused_at_load(
        "basic-auth",
        &[
            (json!({"realm": "a\"b"}), "`realm` must be"),
            (json!({"realm": ""}), "`realm` must be"),
            (json!({"users": {}}), "does not match the plugin's schema"),
        ],
    )
    .await;
}

/// Which upstream answered `reply`.
fn answered_by(reply: &weir_tests::Reply) -> String {
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    reply.json()["upstream"]
        .as_str()
        .expect("the echo names its upstream")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_split_sends_requests_by_weight_and_by_match() {
    let (up, canary) = (Upstream::start("u").await, Upstream::start("canary").await);
    let split = |uri: &str, rules: Value| {
        json!({"id": uri.trim_matches(&['/', '*'][..]), "uri": uri, "upstream_id": "u",
               "plugins": [{"name": "traffic-split", "config": {"rules": rules}}]})
    };
    let routes = json!([
        split(
            "/all/*",
            json!([{"upstreams": [{"id": "canary", "weight": 1}, {"weight": 0}]}])
        ),
        split(
            "/none/*",
            json!([{"upstreams": [{"id": "canary", "weight": 0}, {"weight": 1}]}])
        ),
        split(
            "/half/*",
            json!([{"upstreams": [{"id": "canary", "weight": 50}, {"weight": 50}]}])
        ),
        split(
            "/match/*",
            json!([
                {"match": [{"header": "x-canary", "value": "1"}], "upstreams": [{"id": "canary"}]},
                {"match": [{"query": "v", "values": ["2", "3"]}, {"cookie": "beta"}],
                 "upstreams": [{"id": "canary"}]},
            ])
        ),
        split("/gone/*", json!([{"upstreams": [{"id": "gone"}]}])),
    ]);
    let gateway = gateway_with(&up, &canary, json!([]), routes).await;
    assert!(gateway.errors().is_empty(), "{:?}", gateway.errors());

    for _ in 0..10 {
        assert_eq!(
            answered_by(&get_with(&gateway.url("/all/x"), &[]).await),
            "canary"
        );
        assert_eq!(
            answered_by(&get_with(&gateway.url("/none/x"), &[]).await),
            "u"
        );
    }

    // 50:50 over 100 requests: each side gets some (all on one side: 2 in 2^100).
    let mut to_canary = 0;
    for _ in 0..100 {
        if answered_by(&get_with(&gateway.url("/half/x"), &[]).await) == "canary" {
            to_canary += 1;
        }
    }
    assert!(
        (1..100).contains(&to_canary),
        "{to_canary} of 100 went to the canary"
    );

    // Rules by header, and by query and cookie together; otherwise the route's own upstream.
    let url = gateway.url("/match/x");
    assert_eq!(
        answered_by(&get_with(&url, &[("x-canary", "1")]).await),
        "canary"
    );
    assert_eq!(
        answered_by(&get_with(&url, &[("x-canary", "2")]).await),
        "u"
    );
    assert_eq!(answered_by(&get_with(&url, &[]).await), "u");
    let beta = [("cookie", "theme=dark; beta=yes")];
    assert_eq!(
        answered_by(&get_with(&gateway.url("/match/x?v=3"), &beta).await),
        "canary"
    );
    assert_eq!(
        answered_by(&get_with(&gateway.url("/match/x?v=3"), &[]).await),
        "u"
    );
    assert_eq!(
        answered_by(&get_with(&gateway.url("/match/x?v=4"), &beta).await),
        "u"
    );

    // An upstream the store does not have: 503 with its id, nothing sent anywhere.
    let (u_hits, canary_hits) = (up.hits(), canary.hits());
    let gone = get_with(&gateway.url("/gone/x"), &[]).await;
    assert_eq!(
        gone.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        gone.text()
    );
    assert_eq!(
        gone.json()["error"],
        "traffic-split: upstream gone is not available"
    );
    assert_eq!((up.hits(), canary.hits()), (u_hits, canary_hits));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_split_refuses_bad_configs_at_load() {
    let one = || json!([{"weight": 1}]);
    assert_refused_at_load(
        "traffic-split",
        &[
            (json!({"rules": []}), "`rules` is empty"),
            (
                json!({"rules": [{"upstreams": [{"id": "canary", "weight": 0}]}]}),
                "rules[0]: no upstream has a weight above 0",
            ),
            (
                json!({"rules": [{"upstreams": [{"id": "canary", "weight": 100001}]}]}),
                "weight 100001 is over 100000",
            ),
            (
                json!({"rules": [{"upstreams": one()}, {"upstreams": [{"id": ""}]}]}),
                "rules[1]: upstreams[0]: `id` is empty",
            ),
            (
                json!({"rules": [{"match": [{"header": "a", "cookie": "b"}], "upstreams": one()}]}),
                "match[0]: name exactly one of",
            ),
            (
                json!({"rules": [{"match": [{"query": "q", "value": "1", "values": ["2"]}],
                                  "upstreams": one()}]}),
                "not both",
            ),
            (json!({}), "does not match the plugin's schema"),
            (
                json!({"rules": [{"upstreams": [{"id": "canary", "wieght": 1}]}]}),
                "does not match the plugin's schema",
            ),
        ],
    )
    .await;
}
