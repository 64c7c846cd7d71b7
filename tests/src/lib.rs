//! The integration-test harness: a gateway in-process on port 0, upstreams the test owns, and a
//! small HTTP client.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::watch;
use weir::{AccessLogTarget, ConfigSource, GatewayOptions, RunningGateway};

pub mod ai;
pub mod browser;
pub mod etcd;
pub mod grpc;
pub mod otlp;
pub mod redis;
pub mod structure;
pub mod tls;

/// Paths of the plugin components that build.rs built.
pub mod plugins {
    include!(concat!(env!("OUT_DIR"), "/plugins.rs"));
}

/// The Python the tests use (with PyJWT and `openai`): the one .ci/run makes, else the first
/// `python3` on PATH.
pub fn python() -> PathBuf {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/tools/python/bin/python3");
    if venv.exists() {
        venv
    } else {
        PathBuf::from("python3")
    }
}

/// Every built component as a `plugins` list, with default limits and failure policy.
pub fn all_plugins() -> serde_json::Value {
    let entries: Vec<serde_json::Value> = [
        ("request-id", plugins::REQUEST_ID),
        ("headers", plugins::HEADERS),
        ("ip-restriction", plugins::IP_RESTRICTION),
        ("key-auth", plugins::KEY_AUTH),
        ("limit-count", plugins::LIMIT_COUNT),
        ("limit-req", plugins::LIMIT_REQ),
        ("rewrite", plugins::REWRITE),
        ("cors", plugins::CORS),
        ("body-crypt", plugins::BODY_CRYPT),
        ("jwt-auth", plugins::JWT_AUTH),
        ("basic-auth", plugins::BASIC_AUTH),
        ("traffic-split", plugins::TRAFFIC_SPLIT),
        ("probe", plugins::PROBE),
    ]
    .iter()
    .map(|(name, path)| match *name {
        "probe" => probe_entry(name, serde_json::json!({})),
        "limit-count" | "limit-req" => {
            serde_json::json!({ "name": name, "module": path, "grants": {"kv": true, "clock": true} })
        }
        "rewrite" | "cors" | "body-crypt" => {
            serde_json::json!({ "name": name, "module": path, "grants": {"wasi": ["random"]} })
        }
        // wasi random: jsonwebtoken links its (never called) signing code, which draws randoms.
        "jwt-auth" => serde_json::json!({ "name": name, "module": path, "grants": {
            "consumers": ["jwt-auth"], "clock": true, "log": true, "wasi": ["random"],
        }}),
        // A password hash costs tens of ms and argon2id's default 19 MiB, more on a busy machine.
        "basic-auth" => serde_json::json!({ "name": name, "module": path,
            "grants": {"consumers": ["basic-auth"], "log": true},
            "limits": {"timeout_ms": 2000, "memory_mb": 64},
        }),
        "traffic-split" => serde_json::json!({ "name": name, "module": path,
            "grants": {"routing": true, "log": true, "wasi": ["random"]},
        }),
        _ => serde_json::json!({ "name": name, "module": path }),
    })
    .collect();
    serde_json::Value::Array(entries)
}

/// The grants the probe component needs to load: it imports log, kv, metrics and http-client.
pub fn probe_grants() -> serde_json::Value {
    serde_json::json!({"log": true, "kv": true, "metrics": true, "http": {"hosts": []}})
}

/// A plugin entry for probe called `name`, with its grants and the fields in `extra`.
pub fn probe_entry(name: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut entry =
        serde_json::json!({"name": name, "module": plugins::PROBE, "grants": probe_grants()});
    for (key, value) in extra.as_object().expect("extra fields are an object") {
        entry[key] = value.clone();
    }
    entry
}

/// The world `/v1/status` (its JSON, `status`) says plugin `name` was built against.
pub fn plugin_world(status: &serde_json::Value, name: &str) -> Option<serde_json::Value> {
    status["plugins"]
        .as_array()?
        .iter()
        .find(|plugin| plugin["name"] == name)
        .map(|plugin| plugin["world"].clone())
}

/// A config file's text. JSON is YAML, so tests build configs with `json!`.
pub fn yaml(config: serde_json::Value) -> String {
    serde_json::to_string_pretty(&config).expect("a JSON value serializes")
}

/// A node entry for an upstream the test owns.
pub fn node(upstream: &Upstream) -> serde_json::Value {
    serde_json::json!({ "host": "127.0.0.1", "port": upstream.port() })
}

/// How a test upstream answers.
#[derive(Clone, Debug)]
pub struct Behaviour {
    /// Wait this long before answering.
    pub delay: Duration,
    /// The status to answer with.
    pub status: StatusCode,
    /// Answer with this body instead of the JSON echo.
    pub body: Option<Bytes>,
    /// The content type of the answer, if any.
    pub content_type: Option<&'static str>,
    /// Extra response headers.
    pub headers: Vec<(&'static str, &'static str)>,
    /// Answer only once this gate opens.
    pub gate: Option<Gate>,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            delay: Duration::ZERO,
            status: StatusCode::OK,
            body: None,
            content_type: None,
            headers: Vec::new(),
            gate: None,
        }
    }
}

/// Holds an upstream's answers until the test opens it.
#[derive(Clone, Debug)]
pub struct Gate(watch::Sender<bool>);

impl Default for Gate {
    fn default() -> Self {
        Gate(watch::channel(false).0)
    }
}

impl Gate {
    /// Lets every held answer (and every later one) go.
    pub fn open(&self) {
        self.0.send_replace(true);
    }

    async fn passed(&self) {
        let mut open = self.0.subscribe();
        let _ = open.wait_for(|open| *open).await;
    }
}

/// An HTTP upstream owned by the test. It answers with a JSON echo of the request:
/// `{"upstream", "method", "path", "query", "headers", "body"}` (and `"trailers"` when the
/// request had some), and an `x-upstream` header.
pub struct Upstream {
    /// Where it listens.
    pub addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    connections: Arc<AtomicUsize>,
    stop: watch::Sender<bool>,
}

impl Upstream {
    /// An echo upstream called `name`.
    pub async fn start(name: &str) -> Upstream {
        Self::start_with(name, Behaviour::default()).await
    }

    /// An upstream called `name` that behaves as told.
    pub async fn start_with(name: &str, behaviour: Behaviour) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding an upstream");
        Self::serve(name, behaviour, listener)
    }

    /// An echo upstream called `name` on `addr`: one that went away, back on its port.
    pub async fn start_at(name: &str, addr: SocketAddr) -> Upstream {
        let listener = TcpListener::bind(addr)
            .await
            .expect("binding an upstream where one was");
        Self::serve(name, Behaviour::default(), listener)
    }

    fn serve(name: &str, behaviour: Behaviour, listener: TcpListener) -> Upstream {
        let addr = listener.local_addr().expect("upstream address");
        let hits = Arc::new(AtomicUsize::new(0));
        let connections = Arc::new(AtomicUsize::new(0));
        let (stop, mut stopped) = watch::channel(false);
        let name: Arc<str> = name.into();
        let counter = hits.clone();
        let accepted_count = connections.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = stopped.changed() => return,
                    accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => continue },
                };
                accepted_count.fetch_add(1, Ordering::SeqCst);
                let (name, behaviour, counter) = (name.clone(), behaviour.clone(), counter.clone());
                let mut gone = stopped.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        counter.fetch_add(1, Ordering::SeqCst);
                        answer(name.clone(), behaviour.clone(), request)
                    });
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let connection = builder.serve_connection(TokioIo::new(stream), service);
                    // A stopped upstream closes its open connections too, as a node that
                    // went away would.
                    tokio::select! {
                        _ = connection => {}
                        _ = gone.changed() => {}
                    }
                });
            }
        });
        Upstream {
            addr,
            hits,
            connections,
            stop,
        }
    }

    /// An echo upstream called `name` that holds every answer until the gate opens.
    pub async fn gated(name: &str) -> (Upstream, Gate) {
        let gate = Gate::default();
        let behaviour = Behaviour {
            gate: Some(gate.clone()),
            ..Behaviour::default()
        };
        (Self::start_with(name, behaviour).await, gate)
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// How many requests it has received.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// How many connections it has accepted.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

async fn answer(
    name: Arc<str>,
    behaviour: Behaviour,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = request.into_parts();
    let collected = body.collect().await.ok();
    let trailers = collected.as_ref().and_then(|c| c.trailers().cloned());
    let body = collected.map(|c| c.to_bytes()).unwrap_or_default();
    if !behaviour.delay.is_zero() {
        tokio::time::sleep(behaviour.delay).await;
    }
    if let Some(gate) = &behaviour.gate {
        gate.passed().await;
    }
    let body = behaviour.body.clone().unwrap_or_else(|| {
        let mut headers: BTreeMap<String, String> = BTreeMap::new();
        for (name, value) in &parts.headers {
            let value = String::from_utf8_lossy(value.as_bytes());
            headers
                .entry(name.to_string())
                .and_modify(|earlier| *earlier = format!("{earlier}, {value}"))
                .or_insert_with(|| value.into_owned());
        }
        let mut echo = serde_json::json!({
            "upstream": &*name,
            "method": parts.method.as_str(),
            "path": parts.uri.path(),
            "query": parts.uri.query(),
            "headers": headers,
            "body": String::from_utf8_lossy(&body),
        });
        if let Some(trailers) = &trailers {
            let trailers: BTreeMap<&str, String> = trailers
                .iter()
                .map(|(name, value)| (name.as_str(), value.to_str().unwrap_or("?").to_owned()))
                .collect();
            echo["trailers"] = serde_json::json!(trailers);
        }
        Bytes::from(echo.to_string())
    });
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = behaviour.status;
    response.headers_mut().insert(
        "x-upstream",
        name.parse().expect("upstream names are header-safe"),
    );
    if let Some(content_type) = behaviour.content_type {
        response
            .headers_mut()
            .insert("content-type", http::HeaderValue::from_static(content_type));
    }
    for (name, value) in &behaviour.headers {
        response
            .headers_mut()
            .append(*name, http::HeaderValue::from_static(value));
    }
    Ok(response)
}

/// A loopback port nothing listens on now, for a server a test starts.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// Kills a server process a test started, if it runs, and reaps it.
pub(crate) fn kill_child(child: &mut Option<std::process::Child>) {
    if let Some(mut child) = child.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// The whole lines of an access log, parsed. A line the gateway is still writing has no newline
/// yet, and is left for the next read.
fn access_log_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let whole = text.rfind('\n').map_or("", |end| &text[..end]);
    whole
        .lines()
        .map(|l| serde_json::from_str(l).expect("each access-log line is JSON"))
        .collect()
}

/// A gateway running in this process on port 0, with its config file in a temporary folder.
pub struct TestGateway {
    running: Option<RunningGateway>,
    dir: tempfile::TempDir,
    config: PathBuf,
    access_log: PathBuf,
}

impl TestGateway {
    /// Starts a gateway with this YAML config.
    pub async fn start(yaml: &str) -> TestGateway {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let config = dir.path().join("weir.yaml");
        std::fs::write(&config, yaml).expect("writing the config");
        Self::start_in(dir, ConfigSource::File(config)).await
    }

    /// Starts a gateway with one route, `/*`, to one upstream `u` whose fields besides `id` are
    /// `upstream`; the config must load without errors.
    pub async fn fronting(mut upstream: serde_json::Value) -> TestGateway {
        upstream["id"] = serde_json::json!("u");
        let gateway = Self::start(&yaml(serde_json::json!({
            "upstreams": [upstream],
            "routes": [{"id": "r", "uri": "/*", "upstream_id": "u"}],
        })))
        .await;
        assert!(gateway.errors().is_empty(), "{:?}", gateway.errors());
        gateway
    }

    /// Starts a gateway that follows etcd at `url`, keeping its state in `state_dir` if given.
    pub async fn start_etcd(url: &str, state_dir: Option<PathBuf>) -> TestGateway {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let options = weir::store::etcd::EtcdOptions {
            state_dir,
            ..weir::store::etcd::EtcdOptions::new(vec![url.to_owned()])
        };
        Self::start_in(dir, ConfigSource::Etcd(options)).await
    }

    /// Starts a gateway with this YAML config that keeps compiled modules in `module_cache`.
    pub async fn start_cached(yaml: &str, module_cache: &std::path::Path) -> TestGateway {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let config = dir.path().join("weir.yaml");
        std::fs::write(&config, yaml).expect("writing the config");
        Self::start_with(
            dir,
            ConfigSource::File(config),
            Some(module_cache.to_owned()),
            test_admin(),
        )
        .await
    }

    /// Starts a gateway on `source` with these admin options.
    pub async fn start_admin(source: ConfigSource, admin: weir::AdminOptions) -> TestGateway {
        let dir = tempfile::tempdir().expect("a temporary folder");
        Self::start_with(dir, source, None, admin).await
    }

    async fn start_in(dir: tempfile::TempDir, source: ConfigSource) -> TestGateway {
        Self::start_with(dir, source, None, test_admin()).await
    }

    async fn start_with(
        dir: tempfile::TempDir,
        source: ConfigSource,
        module_cache: Option<PathBuf>,
        admin: weir::AdminOptions,
    ) -> TestGateway {
        let access_log = dir.path().join("access.log");
        let config = dir.path().join("weir.yaml");
        let options = GatewayOptions {
            config: source,
            listen: "127.0.0.1:0".parse().expect("an address"),
            tls_listen: Some("127.0.0.1:0".parse().expect("an address")),
            admin_listen: Some("127.0.0.1:0".parse().expect("an address")),
            access_log: AccessLogTarget::File(access_log.clone()),
            module_cache,
            max_module_bytes: weir::store::etcd::DEFAULT_MAX_MODULE_BYTES,
            admin,
            workers: 0,
        };
        let running = weir::start(options).await.expect("the gateway starts");
        TestGateway {
            running: Some(running),
            dir,
            config,
            access_log,
        }
    }

    /// The admin key this gateway generated at start, if it did.
    pub fn generated_admin_key(&self) -> Option<&str> {
        self.running().generated_admin_key.as_deref()
    }

    /// The gateway's shared state.
    pub fn gateway(&self) -> &std::sync::Arc<weir::Gateway> {
        self.running().gateway()
    }

    fn running(&self) -> &RunningGateway {
        self.running.as_ref().expect("the gateway is running")
    }

    /// The proxy listener's address.
    pub fn addr(&self) -> SocketAddr {
        self.running().addr
    }

    /// The TLS proxy listener's address.
    pub fn tls_addr(&self) -> SocketAddr {
        self.running()
            .tls_addr
            .expect("test gateways listen for TLS")
    }

    /// The proxy URL for `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.running().addr)
    }

    /// The admin URL for `path`.
    pub fn admin_url(&self, path: &str) -> String {
        format!(
            "http://{}{path}",
            self.running().admin_addr.expect("an admin listener")
        )
    }

    /// The folder the config lives in.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// The live snapshot's generation.
    pub fn generation(&self) -> u64 {
        self.running().gateway().snapshot().generation
    }

    /// The errors the live snapshot reports.
    pub fn errors(&self) -> Vec<weir::config::ObjectError> {
        self.running().gateway().snapshot().errors.clone()
    }

    /// Why the object `id` was refused; panics, listing what was refused, if it was not.
    pub fn refusal(&self, id: &str) -> String {
        let errors = self.errors();
        errors
            .iter()
            .find(|e| e.id == id)
            .map(|e| e.reason.clone())
            .unwrap_or_else(|| panic!("{id} was not refused: {errors:?}"))
    }

    /// Rewrites the config file and waits until a new snapshot is live.
    pub async fn reload(&self, yaml: &str) {
        let before = self.generation();
        self.write_config(yaml);
        eventually(
            "the new config to go live",
            Duration::from_secs(30),
            || async { self.generation() != before },
        )
        .await;
    }

    /// Writes the config file without waiting (for changes that must not apply).
    pub fn write_config(&self, text: &str) {
        let staging = self.dir.path().join(".weir.yaml.new");
        std::fs::write(&staging, text).expect("writing the new config");
        std::fs::rename(&staging, &self.config).expect("replacing the config");
    }

    /// The access log's lines, parsed, once at least `at_least` are there.
    pub async fn access_log(&self, at_least: usize) -> Vec<serde_json::Value> {
        let read = || access_log_lines(&self.access_log);
        // Fewer lines than asked for, after the wait, are the caller's to judge.
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while read().len() < at_least {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        read()
    }

    /// Stops the gateway and waits for it to drain.
    pub async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown().await;
        }
    }

    /// Drains as on SIGTERM, then stops; the temporary folder (and its access log) stays
    /// until the value is dropped.
    pub async fn drain(&mut self, options: weir::DrainOptions) {
        if let Some(running) = self.running.take() {
            running.drain(options).await;
        }
    }
}

/// A gateway running in a child process: the `weir-test-gateway` binary of this package,
/// which reads its config from the environment and drains on SIGTERM as `weir run` does.
pub struct ChildGateway {
    child: std::process::Child,
    /// The proxy's base URL.
    pub url: String,
    /// The admin listener's base URL.
    pub admin: String,
    /// The proxy's address.
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
}

/// How a [`ChildGateway`] drains on SIGTERM.
#[derive(Clone, Copy, Debug, Default)]
pub struct ChildDrain {
    /// `--drain-delay`.
    pub delay: Duration,
    /// `--drain-timeout`.
    pub timeout: Duration,
}

/// The `weir-test-gateway` binary: cargo builds a package's binaries before its tests and
/// benches, into the folder above theirs.
fn child_program() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test binary lives in target/<profile>/deps");
    let program = profile_dir.join("weir-test-gateway");
    assert!(
        program.exists(),
        "{} is missing: build it with `cargo build -p weir-tests --bins`",
        program.display()
    );
    program
}

impl ChildGateway {
    /// A child gateway serving this YAML config.
    pub async fn start(yaml: &str) -> ChildGateway {
        Self::start_draining(yaml, ChildDrain::default()).await
    }

    /// A child gateway serving this YAML config, draining as `drain` says on SIGTERM.
    pub async fn start_draining(yaml: &str, drain: ChildDrain) -> ChildGateway {
        Self::start_workers(yaml, drain, 0).await
    }

    /// A child gateway serving this YAML config on `workers` worker threads, draining as
    /// `drain` says on SIGTERM.
    pub async fn start_workers(yaml: &str, drain: ChildDrain, workers: usize) -> ChildGateway {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let config = dir.path().join("weir.yaml");
        std::fs::write(&config, yaml).expect("writing the config");
        let config = config.display().to_string();
        Self::spawn(dir, "WEIR_CHILD_CONFIG", config, drain, workers).await
    }

    /// A child gateway following etcd at `url`.
    pub async fn start_etcd(url: &str) -> ChildGateway {
        let dir = tempfile::tempdir().expect("a temporary folder");
        Self::spawn(
            dir,
            "WEIR_CHILD_ETCD",
            url.to_owned(),
            ChildDrain::default(),
            0,
        )
        .await
    }

    async fn spawn(
        dir: tempfile::TempDir,
        variable: &str,
        value: String,
        drain: ChildDrain,
        workers: usize,
    ) -> ChildGateway {
        let addr_file = dir.path().join("addresses");
        let log = std::fs::File::create(dir.path().join("gateway.log")).expect("a log file");
        let child = std::process::Command::new(child_program())
            .env(variable, value)
            .env("WEIR_CHILD_ADDR_FILE", &addr_file)
            .env("WEIR_CHILD_ACCESS_LOG", dir.path().join("access.log"))
            .env(
                "WEIR_CHILD_DRAIN_DELAY_MS",
                drain.delay.as_millis().to_string(),
            )
            .env(
                "WEIR_CHILD_DRAIN_TIMEOUT_MS",
                drain.timeout.as_millis().to_string(),
            )
            .env("WEIR_CHILD_WORKERS", workers.to_string())
            .env("WEIR_LOG", "info")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting the child gateway");
        let addresses = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                if let Ok(text) = std::fs::read_to_string(&addr_file)
                    && text.ends_with('\n')
                {
                    return text;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the child gateway wrote its addresses");
        let mut lines = addresses.lines();
        let url = lines.next().expect("the proxy address").to_owned();
        let admin = lines.next().expect("the admin address").to_owned();
        let addr = url
            .trim_start_matches("http://")
            .parse()
            .expect("the proxy address is host:port");
        ChildGateway {
            child,
            url,
            admin,
            addr,
            dir,
        }
    }

    /// What the gateway has logged so far (its stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("gateway.log")).unwrap_or_default()
    }

    /// The access log's lines so far.
    pub fn access_log(&self) -> Vec<serde_json::Value> {
        access_log_lines(&self.dir.path().join("access.log"))
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends SIGTERM, as a service manager does to stop it.
    pub fn terminate(&self) {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -TERM failed");
    }

    /// Waits for the process to exit and returns whether it exited cleanly.
    pub async fn exited(&mut self) -> bool {
        loop {
            if let Some(status) = self.child.try_wait().expect("the child's status") {
                return status.success();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The process's resident memory, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for ChildGateway {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `weir-test-gateway` binary's body: serves the config its environment names until its
/// stdin closes (the parent went away), or drains and exits on SIGTERM.
pub async fn serve_as_child() {
    let addr_file = std::env::var("WEIR_CHILD_ADDR_FILE")
        .expect("weir-test-gateway is started by the tests (WEIR_CHILD_ADDR_FILE)");
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("WEIR_LOG"))
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let config = match (
        std::env::var("WEIR_CHILD_CONFIG"),
        std::env::var("WEIR_CHILD_ETCD"),
    ) {
        (Ok(config), _) => ConfigSource::File(config.into()),
        (_, Ok(etcd)) => ConfigSource::Etcd(weir::store::etcd::EtcdOptions::new(vec![etcd])),
        _ => panic!("a child gateway needs WEIR_CHILD_CONFIG or WEIR_CHILD_ETCD"),
    };
    let millis = |name: &str| {
        Duration::from_millis(
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        )
    };
    let access_log = std::env::var("WEIR_CHILD_ACCESS_LOG")
        .map(|path| AccessLogTarget::File(path.into()))
        .unwrap_or(AccessLogTarget::Off);
    let options = GatewayOptions {
        config,
        listen: "127.0.0.1:0".parse().expect("an address"),
        tls_listen: None,
        admin_listen: Some("127.0.0.1:0".parse().expect("an address")),
        access_log,
        module_cache: None,
        max_module_bytes: weir::store::etcd::DEFAULT_MAX_MODULE_BYTES,
        admin: test_admin(),
        workers: std::env::var("WEIR_CHILD_WORKERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    };
    weir::server::raise_open_file_limit();
    let running = weir::start(options).await.expect("the gateway starts");
    // Written whole, then renamed, so the parent never reads half of it.
    let staging = format!("{addr_file}.new");
    std::fs::write(
        &staging,
        format!(
            "http://{}\nhttp://{}\n",
            running.addr,
            running.admin_addr.expect("an admin listener")
        ),
    )
    .expect("writing addresses");
    std::fs::rename(&staging, &addr_file).expect("publishing addresses");
    let parent_gone = tokio::task::spawn_blocking(|| {
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new())
    });
    tokio::select! {
        _ = parent_gone => {}
        signal = weir::server::stop_signal() => {
            signal.expect("listening for signals");
            let timeout = millis("WEIR_CHILD_DRAIN_TIMEOUT_MS");
            let drain = weir::DrainOptions {
                delay: millis("WEIR_CHILD_DRAIN_DELAY_MS"),
                timeout: if timeout.is_zero() { weir::DrainOptions::default().timeout } else { timeout },
            };
            running.drain(drain).await;
            // The stdin reader blocks a thread that the runtime would wait for.
            std::process::exit(0);
        }
    }
}

/// A node that takes connections but never answers: it accepts them (or, `listen_only`, leaves
/// them in the kernel's queue) and reads nothing.
pub struct BlackHole {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: watch::Sender<bool>,
}

impl BlackHole {
    /// A node that accepts connections and never reads or answers.
    pub async fn accepting() -> BlackHole {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding");
        let addr = listener.local_addr().expect("an address");
        let (stop, mut stopped) = watch::channel(false);
        tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                tokio::select! {
                    _ = stopped.changed() => return,
                    accepted = listener.accept() => if let Ok((stream, _)) = accepted {
                        held.push(stream);
                    },
                }
            }
        });
        BlackHole { addr, stop }
    }

    /// Its node entry.
    pub fn node(&self) -> serde_json::Value {
        serde_json::json!({ "host": "127.0.0.1", "port": self.addr.port() })
    }
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// A response read off a raw connection.
#[derive(Debug)]
pub struct RawReply {
    /// The status code, or 0 when the connection closed without one.
    pub status: u16,
    /// The head, as text.
    pub head: String,
    /// The body (whatever came after the head).
    pub body: Vec<u8>,
}

/// Writes `request` as it is onto a new connection to `addr`, then reads until the peer closes.
/// For requests that a well-behaved client library would refuse or rewrite.
pub async fn raw_request(addr: SocketAddr, request: &[u8]) -> RawReply {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connecting");
    stream.write_all(request).await.expect("writing");
    let mut bytes = Vec::new();
    let _ = stream.read_to_end(&mut bytes).await;
    let split = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(bytes.len(), |i| i + 4);
    let head = String::from_utf8_lossy(&bytes[..split]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    RawReply {
        status,
        head,
        body: bytes[split..].to_vec(),
    }
}

/// `GET path` with `headers`, closing the connection after the answer.
pub fn raw_get(path: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut request = format!("GET {path} HTTP/1.1\r\nhost: gateway.test\r\nconnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.into_bytes()
}

/// The value of the sample `metric` (its whole name with labels, as the text format writes it)
/// on the admin listener at `admin`, or 0 when it is not there yet.
pub async fn metric(admin_url: &str, metric: &str) -> f64 {
    let text = get(admin_url).await.text();
    text.lines()
        .find_map(|line| line.strip_prefix(metric)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A response, fully read.
#[derive(Debug)]
pub struct Reply {
    /// The status.
    pub status: StatusCode,
    /// The headers.
    pub headers: HeaderMap,
    /// The body.
    pub body: Bytes,
}

impl Reply {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(HttpConnector::new())
}

/// Sends `request` and reads the whole response.
pub async fn send(request: Request<Full<Bytes>>) -> Reply {
    let response = client()
        .request(request)
        .await
        .expect("the request gets a response");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("the body arrives").to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// `component` with a custom section appended: the same behaviour under a different sha256.
pub fn with_custom_section(component: &[u8], name: &str, payload: &[u8]) -> Vec<u8> {
    fn leb128(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    let mut content = Vec::new();
    leb128(name.len(), &mut content);
    content.extend_from_slice(name.as_bytes());
    content.extend_from_slice(payload);
    let mut bytes = component.to_vec();
    bytes.push(0); // custom section id
    leb128(content.len(), &mut bytes);
    bytes.extend_from_slice(&content);
    bytes
}

/// The process's resident memory, in KiB (Linux).
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Waits until `check` returns true, polling every 10 ms; panics with `what` after `limit`.
pub async fn eventually<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let happened = tokio::time::timeout(limit, async {
        while !check().await {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(
        happened.is_ok(),
        "gave up after {limit:?} waiting for: {what}"
    );
}

/// GETs `url`.
/// The admin key test gateways accept (as `WEIR_ADMIN_KEY` would set it).
pub const ADMIN_KEY: &str = "weir-test-admin-key";

/// Admin options with [`ADMIN_KEY`] as the environment's key.
pub fn test_admin() -> weir::AdminOptions {
    weir::AdminOptions {
        env_key: Some(ADMIN_KEY.into()),
        ..Default::default()
    }
}

/// GET `url` on an admin listener, with [`ADMIN_KEY`].
pub async fn admin_get(url: &str) -> Reply {
    send(
        request(Method::GET, url)
            .header("x-api-key", ADMIN_KEY)
            .body(Full::default())
            .expect("a request"),
    )
    .await
}

pub async fn get(url: &str) -> Reply {
    send(
        request(Method::GET, url)
            .body(Full::default())
            .expect("a request"),
    )
    .await
}

/// A request builder for `method` and `url`.
pub fn request(method: Method, url: &str) -> http::request::Builder {
    Request::builder().method(method).uri(url)
}

/// Sends `method` to `url` with a body.
pub async fn send_body(method: Method, url: &str, body: impl Into<Bytes>) -> Reply {
    send(
        request(method, url)
            .body(Full::new(body.into()))
            .expect("a request"),
    )
    .await
}
