//! Chaos under load: a node killed, a node black-holed, nodes answering 503, etcd going away
//! and a discovered node's lease ending, each while clients keep sending requests through a
//! real gateway. Only the requests the fault caught in flight may fail, and each test says how
//! many that can be.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use weir_tests::etcd::Etcd;
use weir_tests::{BlackHole, TestGateway, Upstream, eventually, get, metric, node, send_body};

/// Clients sending requests at once: the most requests a fault can catch in flight.
const CLIENTS: usize = 4;

/// A bound on each wait for an event, not an expected time: the tests share two cores.
const SOON: Duration = Duration::from_secs(15);

/// The longest one request of the load may take before it counts as failed.
const PATIENCE: Duration = Duration::from_secs(10);

/// The sample of per-node metric `name` for node `addr` of upstream `u`.
fn node_metric(name: &str, addr: SocketAddr) -> String {
    format!(r#"{name}{{upstream="u",node="127.0.0.1:{}"}}"#, addr.port())
}

/// Attempts on upstream `u` that found no node to take them: refused connections and
/// connections that failed under the request.
async fn attempts_refused(metrics: &str) -> f64 {
    let kind = |kind| format!(r#"weir_upstream_failures_total{{upstream="u",kind="{kind}"}}"#);
    metric(metrics, &kind("connect")).await + metric(metrics, &kind("failed")).await
}

/// One request of the load that did not get a 200.
#[derive(Clone, Debug)]
struct Failure {
    /// Its status; 0 when no answer came.
    status: u16,
    /// The node that answered it (its `x-upstream`); `None` for the gateway's own answer.
    from: Option<String>,
}

/// What the load's clients got back so far.
#[derive(Default)]
struct Tally {
    sent: AtomicUsize,
    /// Answers with 200, by the node that gave them.
    served_by: Mutex<HashMap<String, usize>>,
    failures: Mutex<Vec<Failure>>,
}

/// What the load got, once it stopped.
#[derive(Debug)]
struct Outcome {
    sent: usize,
    served_by: HashMap<String, usize>,
    failures: Vec<Failure>,
}

impl Outcome {
    fn failed(&self) -> usize {
        self.failures.len()
    }

    /// 200s that node `name` gave.
    fn served_by(&self, name: &str) -> usize {
        self.served_by.get(name).copied().unwrap_or(0)
    }
}

/// [`CLIENTS`] tasks, each sending `method` to one URL as soon as its last request got its
/// answer, over a keep-alive connection of its own, until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
    clients: Vec<JoinHandle<()>>,
}

impl Load {
    /// GETs of `url`.
    fn start(url: String) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Tally::default());
        let clients = (0..CLIENTS)
            .map(|_| {
                let (url, stop, tally) = (url.clone(), stop.clone(), tally.clone());
                tokio::spawn(async move {
                    let client: Client<HttpConnector, Full<Bytes>> =
                        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
                    while !stop.load(Ordering::Relaxed) {
                        let request = Request::get(url.as_str())
                            .body(Full::default())
                            .expect("a request");
                        let answer = tokio::time::timeout(PATIENCE, async {
                            let response = client.request(request).await.ok()?;
                            let (parts, body) = response.into_parts();
                            body.collect().await.ok()?;
                            let from = parts
                                .headers
                                .get("x-upstream")
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_owned);
                            Some((parts.status, from))
                        })
                        .await
                        .ok()
                        .flatten();
                        match answer {
                            Some((StatusCode::OK, Some(from))) => {
                                *tally.served_by.lock().unwrap().entry(from).or_default() += 1;
                            }
                            Some((status, from)) => tally.failures.lock().unwrap().push(Failure {
                                status: status.as_u16(),
                                from,
                            }),
                            None => tally.failures.lock().unwrap().push(Failure {
                                status: 0,
                                from: None,
                            }),
                        }
                        tally.sent.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        Load {
            stop,
            tally,
            clients,
        }
    }

    /// Requests answered (or given up on) so far.
    fn sent(&self) -> usize {
        self.tally.sent.load(Ordering::SeqCst)
    }

    /// Requests that did not get a 200 so far.
    fn failed(&self) -> usize {
        self.tally.failures.lock().unwrap().len()
    }

    /// 200s that node `name` gave so far.
    fn served_by(&self, name: &str) -> usize {
        self.tally
            .served_by
            .lock()
            .unwrap()
            .get(name)
            .copied()
            .unwrap_or(0)
    }

    /// Waits until `n` more requests have come back.
    async fn more(&self, n: usize) {
        let target = self.sent() + n;
        eventually(
            &format!("{n} more requests through the gateway"),
            SOON,
            || async move { self.sent() >= target },
        )
        .await;
    }

    /// Waits until node `name` has given `n` 200s in all.
    async fn served(&self, name: &str, n: usize) {
        eventually(&format!("{n} answers from {name}"), SOON, || async {
            self.served_by(name) >= n
        })
        .await;
    }

    /// Stops the clients, lets each finish the request it was sending, and tells what came back.
    async fn stop(self) -> Outcome {
        self.stop.store(true, Ordering::Relaxed);
        for client in self.clients {
            client.await.expect("a load client panicked");
        }
        Outcome {
            sent: self.tally.sent.load(Ordering::SeqCst),
            served_by: self.tally.served_by.lock().unwrap().clone(),
            failures: self.tally.failures.lock().unwrap().clone(),
        }
    }
}

/// A node whose status the test can change while it serves, counting the requests it gets.
/// It answers with an `x-upstream` header naming it.
struct Switchable {
    addr: SocketAddr,
    status: Arc<AtomicU16>,
    hits: Arc<AtomicUsize>,
    server: JoinHandle<()>,
}

impl Switchable {
    async fn start(name: &'static str, status: StatusCode) -> Switchable {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding");
        let addr = listener.local_addr().expect("an address");
        let answer = Arc::new(AtomicU16::new(status.as_u16()));
        let hits = Arc::new(AtomicUsize::new(0));
        let (status, counter) = (answer.clone(), hits.clone());
        let server = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (status, counter) = (status.clone(), counter.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |_: Request<Incoming>| {
                        counter.fetch_add(1, Ordering::SeqCst);
                        let mut response = Response::new(Full::new(Bytes::from_static(b"{}")));
                        *response.status_mut() =
                            StatusCode::from_u16(status.load(Ordering::SeqCst)).expect("a status");
                        response
                            .headers_mut()
                            .insert("x-upstream", http::HeaderValue::from_static(name));
                        async move { Ok::<_, Infallible>(response) }
                    });
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let _ = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Switchable {
            addr,
            status: answer,
            hits,
            server,
        }
    }

    /// Answers `status` from the next request on.
    fn answer(&self, status: StatusCode) {
        self.status.store(status.as_u16(), Ordering::SeqCst);
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    fn node(&self) -> Value {
        json!({"host": "127.0.0.1", "port": self.addr.port()})
    }
}

impl Drop for Switchable {
    fn drop(&mut self) {
        self.server.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_under_load_is_ejected_and_its_probes_bring_it_back() {
    let (a, b, c) = (
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    );
    let c_addr = c.addr;
    let gateway = TestGateway::fronting(json!({
        "nodes": [node(&a), node(&b), node(&c)],
        "checks": {
            // Probes need ten misses 400 ms apart, traffic three refusals in a row: the
            // passive threshold is what takes the node out, and probes are what bring it back.
            // (With three misses, a machine slow enough to send fewer than ten requests in
            // 600 ms let the probes mark the node down first, and nothing was ever ejected;
            // with ten misses 200 ms apart, the full suite on two cores once did the same.)
            "active": {"type": "http", "path": "/healthz", "interval_ms": 400, "timeout_ms": 1000,
                       "healthy": {"successes": 2}, "unhealthy": {"failures": 10}},
            "passive": {"unhealthy": {"failures": 3}, "eject_ms": 600000},
        },
    }))
    .await;
    let metrics = gateway.admin_url("/metrics");
    let healthy = node_metric("weir_upstream_node_healthy", c_addr);
    let load = Load::start(gateway.url("/x"));
    load.served("c", 20).await;

    drop(c);
    eventually("c is ejected", SOON, || async {
        metric(
            &metrics,
            &node_metric("weir_upstream_ejections_total", c_addr),
        )
        .await
            == 1.0
    })
    .await;
    // Once the requests that picked c before its ejection are done, none is sent to it: no
    // attempt is refused any more.
    load.more(100).await;
    let refused = attempts_refused(&metrics).await;
    load.more(300).await;
    assert_eq!(
        attempts_refused(&metrics).await,
        refused,
        "an ejected node was still dialled"
    );

    // Probes see it gone too; once it is back on its port they return it to rotation.
    eventually("probes find c down", SOON, || async {
        metric(&metrics, &healthy).await == 0.0
    })
    .await;
    let c = Upstream::start_at("c-again", c_addr).await;
    eventually("probes find c back", SOON, || async {
        metric(&metrics, &healthy).await == 1.0
    })
    .await;
    load.served("c-again", 10).await;
    let outcome = load.stop().await;
    drop(c);

    eprintln!(
        "chaos kill-node: sent {}, failed {} (only requests on the killed node's open \
         connections may fail, one per connection: at most {CLIENTS}; refused connections are \
         retried on another node)",
        outcome.sent,
        outcome.failed()
    );
    assert!(outcome.failed() <= CLIENTS, "{outcome:?}");
    assert!(a.hits() > 0 && b.hits() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_node_is_ejected_and_only_idempotent_requests_retry_its_timeouts() {
    let timed_out = r#"weir_upstream_failures_total{upstream="u",kind="read_timeout"}"#;
    let retried = r#"weir_upstream_retries_total{upstream="u",on="timeout"}"#;

    // retry_on without `timeout`: a request the hole took gets 504 after read_ms, on its one
    // attempt, until the hole's timeouts in a row eject it. read_ms is long enough that a
    // healthy node never comes near it on a busy machine.
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let hole = BlackHole::accepting().await;
    let ejecting = TestGateway::fronting(json!({
        "nodes": [node(&a), node(&b), hole.node()],
        "timeout": {"read_ms": 1000},
        "retry_on": ["connect-failure"],
        "checks": {"passive": {"unhealthy": {"timeouts": 2}, "eject_ms": 600000}},
    }))
    .await;
    let metrics = ejecting.admin_url("/metrics");
    let load = Load::start(ejecting.url("/x"));
    eventually("the hole is ejected", SOON, || async {
        metric(
            &metrics,
            &node_metric("weir_upstream_ejections_total", hole.addr),
        )
        .await
            == 1.0
    })
    .await;
    load.more(200).await;
    let first = load.stop().await;
    let served = first.sent - first.failed();
    assert!(
        first
            .failures
            .iter()
            .all(|f| f.status == 504 && f.from.is_none()),
        "only the gateway's 504s: {first:?}"
    );
    // Each 504 is one attempt that timed out, and no request went to a second node.
    assert_eq!(metric(&metrics, timed_out).await as usize, first.failed());
    assert_eq!(metric(&metrics, retried).await, 0.0);
    assert_eq!(a.hits() + b.hits(), served);
    // Two timeouts eject it; past those, only requests that were on it already time out: one
    // per client, and the first client's next one if it came back before the second timeout.
    assert!(
        (2..=CLIENTS + 1).contains(&first.failed()),
        "{} timed out",
        first.failed()
    );

    // retry_on with `timeout`: a GET the hole took goes on to another node; a POST does not.
    let (c, d) = (Upstream::start("c").await, Upstream::start("d").await);
    let hole = BlackHole::accepting().await;
    let retrying = TestGateway::fronting(json!({
        "nodes": [node(&c), node(&d), hole.node()],
        "timeout": {"read_ms": 1000},
        "retry_on": ["connect-failure", "timeout"],
        "retry_budget": {"percent": 100, "min_per_second": 100},
    }))
    .await;
    let metrics = retrying.admin_url("/metrics");
    let load = Load::start(retrying.url("/x"));
    eventually("the hole took four GETs", SOON, || async {
        metric(&metrics, timed_out).await >= 4.0
    })
    .await;
    let gets = load.stop().await;
    assert_eq!(gets.failed(), 0, "{gets:?}");
    let timeouts = metric(&metrics, timed_out).await;
    assert_eq!(metric(&metrics, retried).await, timeouts);
    // Every GET was answered by c or d exactly once, the hole's after their timeout.
    assert_eq!(c.hits() + d.hits(), gets.sent);

    // One request at a time, round robin: two POSTs in six are the hole's turn.
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let reply = send_body(Method::POST, &retrying.url("/x"), "once").await;
        if reply.status == StatusCode::GATEWAY_TIMEOUT {
            assert!(reply.header("x-upstream").is_none(), "the gateway's 504");
        }
        statuses.push(reply.status);
    }
    let posts_timed_out = statuses
        .iter()
        .filter(|s| **s == StatusCode::GATEWAY_TIMEOUT)
        .count();
    assert_eq!(posts_timed_out, 2, "{statuses:?}");
    assert_eq!(metric(&metrics, timed_out).await, timeouts + 2.0);
    assert_eq!(metric(&metrics, retried).await, timeouts);
    assert_eq!(c.hits() + d.hits(), gets.sent + 4);

    eprintln!(
        "chaos black-hole: sent {}, failed {} (with timeouts not retried, requests the hole took \
         before its ejection get 504, at most {}: the {CLIENTS} clients' requests on it when \
         its second timeout in a row ejects it, one per client, and the first client's next one \
         if it came back before that; with timeouts retried, no GET fails and the 2 POSTs of 6 that it took get \
         504)",
        first.sent + gets.sent + statuses.len(),
        first.failed() + gets.failed() + posts_timed_out,
        CLIENTS + 1,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_answering_503_is_ejected_and_when_every_node_does_clients_get_their_503s() {
    let a = Switchable::start("a", StatusCode::OK).await;
    let b = Switchable::start("b", StatusCode::OK).await;
    let bad = Switchable::start("bad", StatusCode::SERVICE_UNAVAILABLE).await;
    let gateway = TestGateway::fronting(json!({
        "nodes": [a.node(), b.node(), bad.node()],
        "checks": {"passive": {
            "unhealthy": {"failures": 3}, "eject_ms": 600000, "max_ejected_percent": 100,
        }},
    }))
    .await;
    let metrics = gateway.admin_url("/metrics");
    let ejected = |node: &Switchable| {
        let sample = node_metric("weir_upstream_ejections_total", node.addr);
        let metrics = metrics.clone();
        async move { metric(&metrics, &sample).await == 1.0 }
    };
    let load = Load::start(gateway.url("/x"));
    eventually("bad is ejected", SOON, || ejected(&bad)).await;
    // Once the requests that picked it before its ejection are done, none reaches it.
    load.more(100).await;
    let bad_hits = bad.hits();
    load.more(300).await;
    assert_eq!(bad.hits(), bad_hits, "an ejected node still got requests");
    let before_outage = load.failed();

    // Every node fails: they are ejected too, and then every request is sent to one of them
    // regardless (failing open), whose 503 the client gets.
    a.answer(StatusCode::SERVICE_UNAVAILABLE);
    b.answer(StatusCode::SERVICE_UNAVAILABLE);
    eventually("a and b are ejected", SOON, || async {
        ejected(&a).await && ejected(&b).await
    })
    .await;
    let fail_open = r#"weir_upstream_fail_open_total{upstream="u"}"#;
    let opened = metric(&metrics, fail_open).await;
    load.more(200).await;
    let outcome = load.stop().await;
    // All but the requests already on their way when the last node went out failed open.
    assert!(metric(&metrics, fail_open).await >= opened + (200 - CLIENTS) as f64);
    // Each request reached exactly one node: none was answered by the gateway or retried.
    assert_eq!(a.hits() + b.hits() + bad.hits(), outcome.sent);
    assert!(
        outcome
            .failures
            .iter()
            .all(|f| f.status == 503 && f.from.is_some()),
        "only the nodes' own 503s: {outcome:?}"
    );
    let hits = a.hits() + b.hits() + bad.hits();
    let opened = metric(&metrics, fail_open).await;
    for _ in 0..6 {
        let reply = get(&gateway.url("/x")).await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(reply.header("x-upstream").is_some(), "the node's answer");
    }
    assert_eq!(a.hits() + b.hits() + bad.hits(), hits + 6);
    assert_eq!(metric(&metrics, fail_open).await, opened + 6.0);

    eprintln!(
        "chaos all-503: sent {}, failed {} ({} 503s from the bad node before its ejection, at \
         most {}: the 2 before the third in a row that ejects it, and the {CLIENTS} clients' \
         requests on it then; once every node fails, each request gets a node's own 503)",
        outcome.sent,
        outcome.failed(),
        before_outage,
        2 + CLIENTS,
    );
    assert!(
        (3..=2 + CLIENTS).contains(&before_outage),
        "{before_outage} 503s before ejection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_killed_and_restarted_under_load_fails_no_request() {
    let mut etcd = Etcd::start().await;
    let up = Upstream::start("u").await;
    etcd.put("/weir/upstreams/u", json!({"nodes": [node(&up)]}))
        .await;
    etcd.put("/weir/routes/a", json!({"uri": "/a", "upstream_id": "u"}))
        .await;
    let gateway = TestGateway::start_etcd(&etcd.url, None).await;
    let load = Load::start(gateway.url("/a"));
    load.more(50).await;

    etcd.kill();
    let ready = gateway.admin_url("/readyz");
    eventually("the gateway sees etcd gone", SOON, || async {
        get(&ready).await.status == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    load.more(200).await;
    etcd.restart().await;
    eventually("the gateway follows etcd again", SOON, || async {
        get(&ready).await.status == StatusCode::OK
    })
    .await;
    etcd.put("/weir/routes/b", json!({"uri": "/b", "upstream_id": "u"}))
        .await;
    let url = gateway.url("/b");
    eventually("a route put after the restart serves", SOON, || async {
        get(&url).await.status == StatusCode::OK
    })
    .await;
    load.more(50).await;
    let outcome = load.stop().await;

    eprintln!(
        "chaos etcd-restart: sent {}, failed {} (none may: serving never waits on etcd)",
        outcome.sent,
        outcome.failed()
    );
    assert_eq!(outcome.failed(), 0, "{outcome:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_discovered_node_whose_lease_expires_under_load_leaves_without_a_failed_request() {
    let etcd = Etcd::start().await;
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    etcd.put(
        "/weir/routes/users",
        json!({"uri": "/users/*", "service": "users"}),
    )
    .await;
    etcd.put("/weir/services/users/a", node(&a)).await;
    let keeper = etcd
        .put_kept_alive("/weir/services/users/b", node(&b), 2)
        .await;
    let gateway = TestGateway::start_etcd(&etcd.url, None).await;
    let load = Load::start(gateway.url("/users/1"));
    load.served("b", 20).await;

    // b's registrar dies: nobody keeps its lease alive, and it expires within its 2 s TTL.
    keeper.abort();
    let registered = |port: u16| {
        let snapshot = gateway.gateway().snapshot();
        snapshot
            .services
            .get("users")
            .is_some_and(|users| users.config.nodes.iter().any(|n| n.port == port))
    };
    eventually("b leaves the service", SOON, || async {
        !registered(b.port())
    })
    .await;
    assert!(registered(a.port()));
    let at_removal = load.served_by("b");
    load.more(100).await;
    let settled = load.served_by("b");
    load.more(300).await;
    let outcome = load.stop().await;
    assert_eq!(
        outcome.served_by("b"),
        settled,
        "b still got requests after it left"
    );

    eprintln!(
        "chaos lease-expiry: sent {}, failed {} (none may: b's server stays up, so requests \
         on it when it left still get answers; it served {} after the removal was seen)",
        outcome.sent,
        outcome.failed(),
        settled - at_removal,
    );
    assert_eq!(outcome.failed(), 0, "{outcome:?}");
    assert!(settled - at_removal <= CLIENTS);
}
