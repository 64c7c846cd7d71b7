//! Benchmark (not a test): a well-behaved route's latency alone, and next to a hostile plugin
//! that loops until its deadline on every call, with and without quarantine.
//!
//! `cargo bench -p weir-tests --bench hostile_neighbour` (the gateway runs in a child process).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use http::StatusCode;
use serde_json::json;
use weir_tests::{ChildGateway, Upstream, get, node, probe_entry, yaml};

const GOOD_CLIENTS: usize = 8;
const HOSTILE_CLIENTS: usize = 4;
const SECONDS: u64 = 8;

/// Drives the good route for `SECONDS` and returns sorted latencies and failures.
async fn measure(gateway: &ChildGateway, hostile: bool) -> (Vec<Duration>, usize) {
    let stop = Arc::new(AtomicBool::new(false));
    let attackers: Vec<_> = (0..if hostile { HOSTILE_CLIENTS } else { 0 })
        .map(|_| {
            let (url, stop) = (format!("{}/hostile", gateway.url), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    get(&url).await;
                }
            })
        })
        .collect();
    let clients: Vec<_> = (0..GOOD_CLIENTS)
        .map(|_| {
            let (url, stop) = (format!("{}/good", gateway.url), stop.clone());
            tokio::spawn(async move {
                let (mut latencies, mut failures) = (Vec::new(), 0);
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    if get(&url).await.status != StatusCode::OK {
                        failures += 1;
                    }
                    latencies.push(started.elapsed());
                }
                (latencies, failures)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(SECONDS)).await;
    stop.store(true, Ordering::Relaxed);
    let (mut all, mut failed) = (Vec::new(), 0);
    for client in clients {
        let (latencies, failures) = client.await.unwrap();
        all.extend(latencies);
        failed += failures;
    }
    for attacker in attackers {
        attacker.await.unwrap();
    }
    all.sort();
    (all, failed)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1e3
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let up = Upstream::start("u").await;
    println!("| hostile neighbour | good route req/s | p50 ms | p99 ms | good-route failures |");
    println!("|---|---:|---:|---:|---:|");
    for (label, quarantine) in [
        ("none", json!({})),
        (
            "loops to its 50 ms deadline, quarantine on (default)",
            json!({}),
        ),
        (
            "loops to its 50 ms deadline, quarantine off",
            json!({"traps": 0}),
        ),
    ] {
        let config = yaml(json!({
            "upstreams": [{"id": "u", "nodes": [node(&up)]}],
            "plugins": [
                probe_entry("good", json!({})),
                probe_entry("hostile", json!({"limits": {"timeout_ms": 50}, "quarantine": quarantine})),
            ],
            "routes": [
                {"id": "good", "uri": "/good", "upstream_id": "u", "plugins": [{"name": "good", "config": {"mode": "count", "key": "n"}}]},
                {"id": "hostile", "uri": "/hostile", "upstream_id": "u", "plugins": [{"name": "hostile", "config": {"mode": "loop"}}]},
            ],
        }));
        let gateway = ChildGateway::start(&config).await;
        let (latencies, failures) = measure(&gateway, label != "none").await;
        println!(
            "| {label} | {:.0} | {:.2} | {:.2} | {failures} |",
            latencies.len() as f64 / SECONDS as f64,
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.99),
        );
    }
}
