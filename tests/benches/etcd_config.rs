//! Benchmark (not a test): how fast etcd changes go live, how long 10,000 routes take to load
//! at start-up, and whether memory stays flat across 1,000 plugin module swaps.
//!
//! `cargo bench -p weir-tests --bench etcd_config` (needs etcd-server, like the tests).

use std::time::{Duration, Instant};

use http::StatusCode;
use serde_json::json;
use weir::client::{PushSettings, push_plugin};
use weir::store::etcd::EtcdOptions;
use weir_tests::etcd::Etcd;
use weir_tests::{TestGateway, Upstream, get, plugins, rss_kib, with_custom_section};

const SAMPLES: usize = 50;
const SWAPS: usize = 1000;

async fn load_routes(etcd: &Etcd, count: usize) {
    let mut client = etcd.client().await;
    for start in (0..count).step_by(100) {
        let ops: Vec<etcd_client::TxnOp> = (start..(start + 100).min(count))
            .map(|i| {
                let route = json!({"uri": format!("/r{i}/*"), "upstream_id": "u"});
                etcd_client::TxnOp::put(format!("/weir/routes/r{i}"), route.to_string(), None)
            })
            .collect();
        client
            .txn(etcd_client::Txn::new().and_then(ops))
            .await
            .expect("loading routes");
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let etcd = Etcd::start().await;
    let up = Upstream::start("u").await;
    etcd.put(
        "/weir/upstreams/u",
        json!({"nodes": [{"host": "127.0.0.1", "port": up.port()}]}),
    )
    .await;
    println!("| routes loaded | start-up load | put → live p50 | put → live p99 |");
    println!("|---:|---:|---:|---:|");
    let mut loaded = 0;
    for count in [10, 10_000] {
        load_routes(&etcd, count).await;
        loaded = count;
        let started = Instant::now();
        let gateway = TestGateway::start_etcd(&etcd.url, None).await;
        let startup = started.elapsed();
        // The routes of this size, plus the ones earlier rounds put live.
        assert!(gateway.gateway().snapshot().route_list.len() >= count);
        let mut samples = Vec::with_capacity(SAMPLES);
        for i in 0..SAMPLES {
            let path = format!("/live-{count}-{i}");
            let url = gateway.url(&path);
            let started = Instant::now();
            etcd.put(
                &format!("/weir/routes/live-{count}-{i}"),
                json!({"uri": path, "upstream_id": "u"}),
            )
            .await;
            while get(&url).await.status != StatusCode::OK {
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "{path} never went live"
                );
            }
            samples.push(started.elapsed());
        }
        samples.sort();
        println!(
            "| {count} | {:.1} ms | {:.2} ms | {:.2} ms |",
            startup.as_secs_f64() * 1e3,
            percentile(&samples, 0.5).as_secs_f64() * 1e3,
            percentile(&samples, 0.99).as_secs_f64() * 1e3,
        );
        gateway.stop().await;
    }

    // Module swaps: every push is a new module (a custom section changes its sha256).
    let options = EtcdOptions::new(vec![etcd.url.clone()]);
    let probe = std::fs::read(plugins::PROBE).expect("the probe component");
    let settings = PushSettings {
        grants: Some(serde_json::from_value(weir_tests::probe_grants()).unwrap()),
        ..PushSettings::default()
    };
    push_plugin(&options, "variant", &probe, &settings)
        .await
        .unwrap();
    etcd.put(
        "/weir/routes/v",
        json!({"uri": "/v", "upstream_id": "u", "plugins": [{"name": "variant", "config": {"mode": "variant"}}]}),
    )
    .await;
    let gateway = TestGateway::start_etcd(&etcd.url, None).await;
    let mut rss_at = Vec::new();
    let started = Instant::now();
    for swap in 1..=SWAPS {
        let module = with_custom_section(&probe, "weir-bench-swap", &swap.to_le_bytes());
        let sha = push_plugin(&options, "variant", &module, &settings)
            .await
            .unwrap()
            .sha256;
        while gateway.gateway().snapshot().plugins["variant"]
            .module
            .sha256
            != sha
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(get(&gateway.url("/v")).await.text(), "a");
        if swap == 100 || swap == SWAPS {
            rss_at.push((swap, rss_kib()));
        }
    }
    println!();
    println!(
        "{SWAPS} module swaps with {loaded} routes loaded, in {:.1} s: RSS {} MiB after swap {}, {} MiB after swap {}; {} compiled modules alive",
        started.elapsed().as_secs_f64(),
        rss_at[0].1 / 1024,
        rss_at[0].0,
        rss_at[1].1 / 1024,
        rss_at[1].0,
        gateway.gateway().runtime().live_modules(),
    );
}
