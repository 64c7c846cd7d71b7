//! Signed modules: with `server.trusted_keys`, a gateway loads only modules one of those keys
//! signed, and says which; unsigned, untrusted and changed modules are refused with the reason.

use http::StatusCode;
use serde_json::{Value, json};
use weir::plugin::signature::sign;
use weir_tests::{
    TestGateway, Upstream, admin_get, get, metric, node, plugins, with_custom_section, yaml,
};

/// An Ed25519 key pair: the private key as PKCS#8 PEM, the public one as SPKI PEM.
fn key_pair() -> (String, String) {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("an Ed25519 key");
    (pair.serialize_pem(), pair.public_key_pem())
}

/// Writes `bytes` as `name.wasm` in `dir`, with `name.wasm.sig` signed by `key` if given.
fn module(dir: &std::path::Path, name: &str, bytes: &[u8], key: Option<&str>) -> String {
    let path = dir.join(format!("{name}.wasm"));
    std::fs::write(&path, bytes).unwrap();
    if let Some(key) = key {
        let sha256 = weir::digest::sha256_hex(bytes);
        let signature = sign(key.as_bytes(), &sha256).unwrap();
        std::fs::write(
            dir.join(format!("{name}.wasm.sig")),
            serde_json::to_string(&signature).unwrap(),
        )
        .unwrap();
    }
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_modules_a_trusted_key_signed_load() {
    let up = Upstream::start("u").await;
    let (trusted_private, trusted_public) = key_pair();
    let (stranger_private, _) = key_pair();
    let dir = tempfile::tempdir().unwrap();
    let request_id = std::fs::read(plugins::REQUEST_ID).unwrap();

    let signed = module(dir.path(), "signed", &request_id, Some(&trusted_private));
    let unsigned = module(dir.path(), "unsigned", &request_id, None);
    let stranger = module(dir.path(), "stranger", &request_id, Some(&stranger_private));
    // Signed, then its bytes changed (a custom section: it would still run the same).
    let changed = module(dir.path(), "changed", &request_id, Some(&trusted_private));
    std::fs::write(&changed, with_custom_section(&request_id, "extra", b"x")).unwrap();
    // Signed with the entry's inline `signature`, as `weir plugin push --sign` stores it.
    let inline = module(dir.path(), "inline", &request_id, None);
    let inline_signature = sign(
        trusted_private.as_bytes(),
        &weir::digest::sha256_hex(&request_id),
    )
    .unwrap();

    let entry = |name: &str, path: &str| json!({"name": name, "module": path});
    let mut inline_entry = entry("inline", &inline);
    inline_entry["signature"] = serde_json::to_value(&inline_signature).unwrap();
    let route = |id: &str| json!({"id": id, "uri": format!("/{id}"), "upstream_id": "u", "plugins": [{"name": id}]});
    let routes: Vec<Value> = ["signed", "unsigned", "stranger", "changed", "inline"]
        .map(route)
        .to_vec();
    let config = |trusted: Value| {
        yaml(json!({
            "server": {"trusted_keys": trusted},
            "upstreams": [{"id": "u", "nodes": [node(&up)]}],
            "plugins": [entry("signed", &signed), entry("unsigned", &unsigned),
                        entry("stranger", &stranger), entry("changed", &changed), inline_entry],
            "routes": routes,
        }))
    };
    let gateway = TestGateway::start(&config(json!([
        {"name": "release", "public_key": trusted_public},
    ])))
    .await;

    let reason = |id: &str| gateway.refusal(id);
    assert!(
        reason("unsigned").contains("not signed"),
        "{}",
        reason("unsigned")
    );
    assert!(
        reason("stranger").contains("trusted_keys does not list"),
        "{}",
        reason("stranger")
    );
    assert!(
        reason("changed").contains("changed after it was signed"),
        "{}",
        reason("changed")
    );
    assert_eq!(get(&gateway.url("/signed")).await.status, StatusCode::OK);
    assert_eq!(get(&gateway.url("/inline")).await.status, StatusCode::OK);
    assert_eq!(
        get(&gateway.url("/unsigned")).await.status,
        StatusCode::NOT_FOUND
    );

    let status = admin_get(&gateway.admin_url("/v1/status")).await.json();
    let signer = |name: &str| {
        status["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .map(|p| p["signed_by"].clone())
    };
    assert_eq!(signer("signed"), Some(json!("release")));
    assert_eq!(signer("inline"), Some(json!("release")));

    // Without trusted keys nothing is checked: every module loads, and none says a signer.
    gateway.reload(&config(json!([]))).await;
    assert_eq!(get(&gateway.url("/unsigned")).await.status, StatusCode::OK);
    assert_eq!(get(&gateway.url("/changed")).await.status, StatusCode::OK);
    assert!(gateway.errors().is_empty(), "{:?}", gateway.errors());

    // A trusted key that is not an Ed25519 public key is refused where it stands.
    gateway
        .reload(&config(json!([{"name": "bad", "public_key": "AAAA"}])))
        .await;
    let errors = gateway.errors();
    assert!(
        errors
            .iter()
            .any(|e| e.reason.contains("/trusted_keys/0/public_key")),
        "{errors:?}"
    );
}

/// Every `.cwasm` file under `dir`, at any depth.
fn artifacts(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .map(|e| e.unwrap().path())
        .flat_map(|path| {
            if path.is_dir() {
                artifacts(&path)
            } else if path.extension().is_some_and(|e| e == "cwasm") {
                vec![path]
            } else {
                Vec::new()
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_refused_for_its_signature_is_never_compiled_or_cached() {
    let up = Upstream::start("u").await;
    let (trusted_private, trusted_public) = key_pair();
    let (stranger_private, _) = key_pair();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let request_id = std::fs::read(plugins::REQUEST_ID).unwrap();

    let unsigned = module(dir.path(), "unsigned", &request_id, None);
    let stranger = module(dir.path(), "stranger", &request_id, Some(&stranger_private));
    let changed = module(dir.path(), "changed", &request_id, Some(&trusted_private));
    std::fs::write(&changed, with_custom_section(&request_id, "extra", b"x")).unwrap();

    let entry = |name: &str, path: &str| json!({"name": name, "module": path});
    let route = |id: &str| json!({"id": id, "uri": format!("/{id}"), "upstream_id": "u", "plugins": [{"name": id}]});
    let routes: Vec<Value> = ["unsigned", "stranger", "changed"].map(route).to_vec();
    let config = yaml(json!({
        "server": {"trusted_keys": [{"name": "release", "public_key": trusted_public}]},
        "upstreams": [{"id": "u", "nodes": [node(&up)]}],
        "plugins": [entry("unsigned", &unsigned), entry("stranger", &stranger),
                    entry("changed", &changed)],
        "routes": routes,
    }));
    let gateway = TestGateway::start_cached(&config, &cache).await;
    assert!(gateway.refusal("unsigned").contains("not signed"));
    assert!(gateway.refusal("stranger").contains("does not list"));
    assert!(gateway.refusal("changed").contains("changed after"));

    let metrics = gateway.admin_url("/metrics");
    assert_eq!(
        metric(&metrics, r#"weir_module_loads_total{source="compiled"}"#).await,
        0.0
    );
    assert_eq!(artifacts(&cache), Vec::<std::path::PathBuf>::new());
}
