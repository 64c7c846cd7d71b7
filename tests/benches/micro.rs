//! Micro-benchmarks (criterion):
//!
//! - `plugin/…`: `on-request` through weir's `PluginPool` on a warm instance (request-id, and
//!   the no-op plugin for the bare cost of entering a plugin), on a fresh instance per request
//!   (request-id: instantiate, `init`, call, drop), and through a chain of three plugins
//!   (request-id, headers, key-auth). The request each call takes is built outside the timing.
//! - `wasmtime/no-op on-request/{call,call_async}`: the no-op component's `on-request` export
//!   entered with plain wasmtime, outside weir's pool (no request lent to the instance, no
//!   quarantine, no checkout): `call` on a store used synchronously, `call_async` (on a fiber) on a
//!   current-thread tokio runtime, on an engine configured as weir's is.
//! - `router/lookup`: route lookup at 10, 1,000 and 10,000 routes, for a `{param}` route and a
//!   prefix (`*`) route.
//! - `edge/normalise`: the path normaliser on a path already in normal form and on two that are
//!   not.
//!
//! `cargo bench -p weir-tests --bench micro`
//!
//! The allocator is the gateway's (mimalloc): glibc's would add its own costs to every figure.

use std::collections::HashMap;
use std::sync::Arc;

use criterion::{BatchSize, BenchmarkId, Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Method};
use serde_json::json;
use wasmtime::component::{Component, Linker, Resource, TypedFunc};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store};
use weir::config::{Isolation, PluginConfig};
use weir::edge::normalise::normalise;
use weir::metrics::Metrics;
use weir::plugin::{Action, PluginPool, PluginRuntime, Wants};
use weir::router::{RouteFilter, RouteTable};
use weir::view::{BufferedBody, Directory, RequestView};
use weir_tests::plugins;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn request() -> Box<RequestView> {
    let mut headers = HeaderMap::new();
    headers.insert("host", HeaderValue::from_static("bench.local"));
    headers.insert("user-agent", HeaderValue::from_static("criterion"));
    headers.insert("x-api-key", HeaderValue::from_static("bench-key"));
    Box::new(RequestView {
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
        targets: Vec::new(),
        answered_by: None,
        response_edits: Vec::new(),
        directory: Directory::default(),
        trace: None,
        notes: None,
        origin: Default::default(),
    })
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

    let noop = pool(
        &rt,
        &runtime,
        "noop",
        plugins::NOOP,
        Isolation::Pooled,
        json!({}),
    );

    // The request is built in criterion's setup, outside the timing, and each call's
    // (request, outcome) is dropped outside it too.
    c.bench_function("plugin/warm instance, on-request", |b| {
        b.to_async(&rt).iter_batched(
            request,
            |view| async {
                let (view, outcome) = request_id.on_request(view, None).await;
                (view, outcome.unwrap())
            },
            BatchSize::SmallInput,
        )
    });
    c.bench_function("plugin/no-op, warm instance, on-request", |b| {
        b.to_async(&rt).iter_batched(
            request,
            |view| async {
                let (view, outcome) = noop.on_request(view, None).await;
                (view, outcome.unwrap())
            },
            BatchSize::SmallInput,
        )
    });
    // The fresh instance is made, used and dropped inside the timing.
    c.bench_function("plugin/fresh instance, on-request", |b| {
        b.to_async(&rt).iter_batched(
            request,
            |view| async {
                let (view, outcome) = fresh.on_request(view, None).await;
                (view, outcome.unwrap())
            },
            BatchSize::SmallInput,
        )
    });
    c.bench_function("plugin/chain of 3, on-request", |b| {
        b.to_async(&rt).iter_batched(
            request,
            |mut view| async {
                for pool in [&request_id, &headers, &key_auth] {
                    let (returned, outcome) = pool.on_request(view, None).await;
                    outcome.unwrap();
                    view = returned;
                }
                view
            },
            BatchSize::SmallInput,
        )
    });
}

/// An engine configured as weir's (host/src/plugin/mod.rs, `engine_config`) where it matters to
/// a call: the same compiler settings, epoch interruption, the pooling allocator with weir's
/// per-component limits (on a small pool) and weir's stack sizes. In wasmtime 48
/// `Config::async_support` is deprecated and does nothing: an engine serves `call` and
/// `call_async` alike, so the one engine serves both stores below.
fn bare_engine() -> Engine {
    const MAX_WASM_STACK: usize = weir::plugin::MAX_WASM_STACK;
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(8)
        .total_core_instances(64)
        .total_memories(8)
        .total_tables(64)
        .total_stacks(8)
        .max_core_instances_per_component(64)
        .max_memories_per_component(16)
        .max_tables_per_component(32)
        .max_tables_per_module(8)
        .table_elements(100_000)
        .max_core_instance_size(8 << 20)
        .max_component_instance_size(8 << 20)
        .max_memory_size(4 << 30)
        .linear_memory_keep_resident(2 << 20)
        .table_keep_resident(64 << 10)
        .pagemap_scan(wasmtime::Enabled::Auto);
    let mut config = Config::new();
    config
        .wasm_component_model(true)
        .epoch_interruption(true)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
        .cranelift_opt_level(wasmtime::OptLevel::Speed)
        .max_wasm_stack(MAX_WASM_STACK)
        .async_stack_size(MAX_WASM_STACK + (256 << 10));
    Engine::new(&config).unwrap()
}

/// The `weir:plugin/filter@0.1.0` exports the bench calls: `init` once, then `on-request`.
type Init = TypedFunc<(String,), (Result<Wants, String>,)>;
/// `on-request`; every import, the `request` resource among them, is a stub, so the request
/// is a borrow of the stub resource type `()` (the no-op plugin never calls its methods).
type OnRequest = TypedFunc<(Resource<()>,), (Action,)>;

fn bare_calls(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let engine = bare_engine();
    let component = Component::new(&engine, std::fs::read(plugins::NOOP).unwrap()).unwrap();
    let mut linker = Linker::<()>::new(&engine);
    // Neither instantiation nor `init("{}")` nor `on-request` of the no-op plugin calls an
    // import (WASI included), so stubs that trap suffice; one that did would fail here with
    // "unknown import".
    linker.define_unknown_imports_as_traps(&component).unwrap();
    let filter = component
        .get_export_index(None, "weir:plugin/filter@0.1.0")
        .expect("the component exports weir:plugin/filter@0.1.0");
    let init_index = component
        .get_export_index(Some(&filter), "init")
        .expect("the filter exports init");
    let on_request_index = component
        .get_export_index(Some(&filter), "on-request")
        .expect("the filter exports on-request");
    let wants_on_request = |wants: Result<Wants, String>| {
        assert!(wants.expect("init accepts {}").on_request);
    };
    // Epoch checks run in the compiled code as in weir, but this engine's epoch never advances
    // (no ticker thread), so the deadline is never reached (weir's one 2 ms tick is, in effect,
    // not reached within a call this short either).
    const DEADLINE: u64 = 1 << 40;

    let mut sync_store = Store::new(&engine, ());
    sync_store.set_epoch_deadline(DEADLINE);
    let instance = linker.instantiate(&mut sync_store, &component).unwrap();
    let init: Init = instance
        .get_typed_func(&mut sync_store, init_index)
        .unwrap();
    let on_request: OnRequest = instance
        .get_typed_func(&mut sync_store, on_request_index)
        .unwrap();
    let (wants,) = init.call(&mut sync_store, ("{}".into(),)).unwrap();
    wants_on_request(wants);

    let mut async_store = Store::new(&engine, ());
    async_store.set_epoch_deadline(DEADLINE);
    let (on_request_async, wants) = rt.block_on(async {
        let instance = linker
            .instantiate_async(&mut async_store, &component)
            .await
            .unwrap();
        let init: Init = instance
            .get_typed_func(&mut async_store, init_index)
            .unwrap();
        let on_request: OnRequest = instance
            .get_typed_func(&mut async_store, on_request_index)
            .unwrap();
        let (wants,) = init
            .call_async(&mut async_store, ("{}".into(),))
            .await
            .unwrap();
        (on_request, wants)
    });
    wants_on_request(wants);

    let mut group = c.benchmark_group("wasmtime/no-op on-request");
    group.bench_function("call", |b| {
        b.iter(|| {
            let (action,) = on_request
                .call(&mut sync_store, (Resource::new_borrow(0),))
                .unwrap();
            action
        })
    });
    group.bench_function("call_async", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = std::time::Instant::now();
                for _ in 0..iters {
                    let (action,) = on_request_async
                        .call_async(&mut async_store, (Resource::new_borrow(0),))
                        .await
                        .unwrap();
                    std::hint::black_box(action);
                }
                start.elapsed()
            })
        })
    });
    group.finish();
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

criterion_group!(
    benches,
    plugin_calls,
    bare_calls,
    route_lookup,
    path_normalisation
);
criterion_main!(benches);
