//! The compiled-module cache on disk: whoever can write an artifact can run code in the
//! gateway, so weir keeps its own folder and trusts only files no one else could have written.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use http::StatusCode;
use serde_json::json;
use weir_tests::{TestGateway, Upstream, get, metric, node, plugins, yaml};

/// Starts a gateway with the cache in `cache`, serves one request through request-id, stops,
/// and says where the module came from.
async fn load_once(config: &str, cache: &Path) -> &'static str {
    let gateway = TestGateway::start_cached(config, cache).await;
    assert_eq!(get(&gateway.url("/")).await.status, StatusCode::OK);
    let metrics = gateway.admin_url("/metrics");
    let disk = metric(&metrics, r#"weir_module_loads_total{source="disk"}"#).await;
    let compiled = metric(&metrics, r#"weir_module_loads_total{source="compiled"}"#).await;
    gateway.stop().await;
    match (disk, compiled) {
        (1.0, 0.0) => "disk",
        (0.0, 1.0) => "compiled",
        other => panic!("unexpected module loads {other:?}"),
    }
}

fn artifact(cache: &Path) -> PathBuf {
    let engine = std::fs::read_dir(cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("engine-")
        })
        .expect("weir's own folder in the cache");
    std::fs::read_dir(&engine)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .expect("the compiled module")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_trusts_only_files_nobody_else_could_have_written() {
    let up = Upstream::start("u").await;
    let config = yaml(json!({
        "upstreams": [{"id": "u", "nodes": [node(&up)]}],
        "plugins": [{"name": "request-id", "module": plugins::REQUEST_ID}],
        "routes": [{"id": "r", "uri": "/*", "upstream_id": "u", "plugins": [{"name": "request-id"}]}],
    }));
    let parent = tempfile::tempdir().unwrap();
    let cache = parent.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o755)).unwrap();

    assert_eq!(load_once(&config, &cache).await, "compiled");
    // The folder it was given keeps its mode; weir's own folder and files are closed.
    let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().mode() & 0o777;
    assert_eq!(mode(&cache), 0o755);
    let file = artifact(&cache);
    assert_eq!(mode(file.parent().unwrap()), 0o700);
    assert_eq!(mode(&file), 0o600);
    assert_eq!(load_once(&config, &cache).await, "disk");

    // Writable by others: compiled again (and the file replaced by a closed one).
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).unwrap();
    assert_eq!(load_once(&config, &cache).await, "compiled");
    assert_eq!(mode(&artifact(&cache)), 0o600);
    assert_eq!(load_once(&config, &cache).await, "disk");

    // A link, even to a good artifact, is not followed.
    let elsewhere = parent.path().join("elsewhere.cwasm");
    std::fs::rename(artifact(&cache), &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &file).unwrap();
    assert_eq!(load_once(&config, &cache).await, "compiled");

    // Owned by another user (only root can make such a file; the check itself is unit-tested
    // in host/src/plugin/mod.rs for every user).
    if std::fs::metadata(&cache).unwrap().uid() == 0 {
        std::os::unix::fs::chown(artifact(&cache), Some(65534), Some(65534)).unwrap();
        assert_eq!(load_once(&config, &cache).await, "compiled");
    }

    // weir's own folder, opened up by someone: the cache is not used at all.
    let engine = artifact(&cache).parent().unwrap().to_owned();
    std::fs::set_permissions(&engine, std::fs::Permissions::from_mode(0o777)).unwrap();
    assert_eq!(load_once(&config, &cache).await, "compiled");
    assert_eq!(load_once(&config, &cache).await, "compiled");
}
