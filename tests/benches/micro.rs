//! Micro-benchmarks (criterion): a call into a warm plugin instance, a call on a fresh
//! instance, a chain of three plugins, route lookup at 10, 1,000 and 10,000 routes, and the
//! path normaliser on a path already in normal form and on two that are not.
//!
//! `cargo bench -p weir-tests --bench micro`

use std::collections::HashMap;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Method};
use serde_json::json;
use weir::config::{Isolation, PluginConfig};
use weir::edge::normalise::normalise;
use weir::exchange::{BufferedBody, Directory, RequestView};
use weir::metrics::Metrics;
use weir::plugin::{Bound, PluginPool, PluginRuntime};
use weir::router::{RouteFilter, RouteTable};
use weir_tests::plugins;

fn request() -> RequestView {
    let mut headers = HeaderMap::new();
    headers.insert("host", HeaderValue::from_static("bench.local"));
    headers.insert("user-agent", HeaderValue::from_static("criterion"));
    headers.insert("x-api-key", HeaderValue::from_static("bench-key"));
    RequestView {
        method: Method::GET,
        path: "/bench".into(),
        query: None,
        headers,
        id: "0b0f4f0e-4a7e-4a2b-9b1c-3b2a1f0e9d8c".into(),
        route_id: "bench".into(),
        client_ip: "127.0.0.1".parse().unwrap(),
        body: BufferedBody::Streaming,
        vars: HashMap::new(),
        writable: true,
        body_access: false,
        body_limit: 0,
        consumer: None,
        upstream: None,
        response_edits: Vec::new(),
        directory: Directory::default(),
    }
}

fn entry(name: &str, file: &str) -> PluginConfig {
    serde_json::from_value(json!({"name": name, "module": file})).unwrap()
}

fn pool(
    rt: &tokio::runtime::Runtime,
    runtime: &PluginRuntime,
    name: &str,
    file: &str,
    isolation: Isolation,
    config: serde_json::Value,
) -> Arc<PluginPool> {
    rt.block_on(async {
        let module = runtime.load(std::fs::read(file).unwrap()).await.unwrap();
        runtime
            .pool(&entry(name, file), &module, isolation, &config)
            .await
            .unwrap()
    })
}

fn plugin_calls(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let runtime = PluginRuntime::new(Arc::new(Metrics::new()), None).unwrap();
    let request_id = pool(
        &rt,
        &runtime,
        "request-id",
        plugins::REQUEST_ID,
        Isolation::Pooled,
        json!({}),
    );
    let fresh = pool(
        &rt,
        &runtime,
        "request-id",
        plugins::REQUEST_ID,
        Isolation::PerRequest,
        json!({}),
    );
    let headers = pool(
        &rt,
        &runtime,
        "headers",
        plugins::HEADERS,
        Isolation::Pooled,
        json!({"request": {"set": {"x-env": "bench"}}}),
    );
    let key_auth = pool(
        &rt,
        &runtime,
        "key-auth",
        plugins::KEY_AUTH,
        Isolation::Pooled,
        json!({"keys": ["bench-key"]}),
    );

    c.bench_function("plugin/warm instance, on-request", |b| {
        b.to_async(&rt).iter(|| async {
            let (_, outcome) = request_id
                .on_request(request(), &mut Bound::default())
                .await;
            outcome.unwrap()
        })
    });
    c.bench_function("plugin/fresh instance, on-request", |b| {
        b.to_async(&rt).iter(|| async {
            let (_, outcome) = fresh.on_request(request(), &mut Bound::default()).await;
            outcome.unwrap()
        })
    });
    c.bench_function("plugin/chain of 3, on-request", |b| {
        b.to_async(&rt).iter(|| async {
            let mut view = request();
            for pool in [&request_id, &headers, &key_auth] {
                let (returned, outcome) = pool.on_request(view, &mut Bound::default()).await;
                outcome.unwrap();
                view = returned;
            }
            view
        })
    });
}

fn route_lookup(c: &mut Criterion) {
    let mut group = c.benchmark_group("router/lookup");
    for count in [10usize, 1_000, 10_000] {
        let mut builder = RouteTable::builder();
        for i in 0..count {
            let patterns = [format!("/svc{i}/items/{{id}}"), format!("/svc{i}/static/*")];
            let patterns: Vec<&str> = patterns.iter().map(String::as_str).collect();
            builder.add(
                &patterns,
                RouteFilter::default(),
                Arc::new(i),
                &format!("r{i}"),
            );
        }
        let table = builder.build();
        let param = format!("/svc{}/items/42", count / 2);
        let prefix = format!("/svc{}/static/css/site.css", count / 2);
        group.bench_with_input(BenchmarkId::new("param", count), &param, |b, path| {
            b.iter(|| {
                table
                    .lookup(&Method::GET, Some("bench.local"), path)
                    .unwrap()
                    .route
            })
        });
        group.bench_with_input(BenchmarkId::new("prefix", count), &prefix, |b, path| {
            b.iter(|| {
                table
                    .lookup(&Method::GET, Some("bench.local"), path)
                    .unwrap()
                    .route
            })
        });
    }
    group.finish();
}

fn path_normalisation(c: &mut Criterion) {
    let mut group = c.benchmark_group("edge/normalise");
    for (name, path) in [
        ("normal", "/api/v1/users/42/orders"),
        ("dot-segments", "/api/v1/../v1/./users//42/orders"),
        ("escapes", "/api/v1/%75sers/42/caf%c3%a9"),
    ] {
        group.bench_with_input(BenchmarkId::new(name, path.len()), &path, |b, path| {
            b.iter(|| normalise(path).unwrap().path.len())
        });
    }
    group.finish();
}

criterion_group!(benches, plugin_calls, route_lookup, path_normalisation);
criterion_main!(benches);
