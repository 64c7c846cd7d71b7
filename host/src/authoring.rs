//! Tools for plugin authors in any language: `weir plugin check` says what a component is and
//! whether it would load; `weir plugin test` runs it against a described request, without a
//! gateway, and reports what it did.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use serde::Serialize;

use crate::body::ProxyBody;
use crate::config::{Grants, Isolation, PluginConfig};
use crate::error::GatewayError;
use crate::metrics::Metrics;
use crate::plugin::{Bound, PluginError, PluginRuntime, Summary, grants};
use crate::proxy::{self, Decision};
use crate::snapshot::{self, ChainLink};
use crate::view::{BufferedBody, Directory, RequestView, headers};

/// The filter interface every plugin exports.
const FILTER_EXPORT: &str = "weir:plugin/filter";

/// What a plugin module is, and whether it would load.
#[derive(Debug, Serialize)]
pub struct CheckReport {
    /// The sha256 of its bytes.
    pub sha256: String,
    /// `component` or `proxy-wasm`, once it compiled.
    pub kind: Option<&'static str>,
    /// A filter's proxy-wasm ABI version (`0.2.1`).
    pub abi: Option<&'static str>,
    /// The filter interface it exports, with its version (`weir:plugin/filter@0.1.0`), if any.
    pub exports: Option<String>,
    /// Every import, and whether the given grants allow it.
    pub imports: Vec<ImportVerdict>,
    /// Whether it would load under the given grants, or why not.
    pub loads: Result<(), String>,
}

/// One import and its verdict.
#[derive(Debug, Serialize)]
pub struct ImportVerdict {
    /// The interface, such as `weir:plugin/kv@0.1.0`.
    pub import: String,
    /// `ok`, or what would allow it.
    #[serde(serialize_with = "as_text")]
    pub verdict: grants::Verdict,
}

impl std::fmt::Display for CheckReport {
    /// The report `weir plugin check` prints, without its first line (which names the file).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.exports, self.abi) {
            (_, Some(abi)) => {
                writeln!(f, "implements: proxy-wasm ABI {abi} (a proxy-wasm filter)")?
            }
            (Some(export), None) => writeln!(f, "implements: {export} (world weir:plugin/plugin)")?,
            (None, None) => writeln!(f, "implements: no weir:plugin/filter export")?,
        }
        writeln!(f, "imports:")?;
        for import in &self.imports {
            writeln!(f, "  {:<40} {}", import.import, import.verdict)?;
        }
        match &self.loads {
            Ok(()) => write!(f, "loads with these grants: yes"),
            Err(reason) => {
                let refused = self
                    .imports
                    .iter()
                    .filter(|i| i.verdict != grants::Verdict::Allowed)
                    .count();
                if refused > 0 {
                    write!(
                        f,
                        "loads with these grants: no: {refused} imports above are not granted"
                    )
                } else {
                    write!(f, "loads with these grants: no: {reason}")
                }
            }
        }
    }
}

/// Compiles a component and checks it against `grants` the way the gateway does.
pub async fn check(bytes: Vec<u8>, grants: &Grants) -> Result<CheckReport, PluginError> {
    let runtime = PluginRuntime::new(Arc::new(Metrics::new()), None)?;
    let sha256 = crate::digest::sha256_hex(&bytes);
    match runtime.load(bytes).await {
        Ok(module) => {
            let imports = module
                .imports
                .iter()
                .map(|import| ImportVerdict {
                    import: import.clone(),
                    verdict: grants::verdict(import, grants),
                })
                .collect();
            let filter = module.kind() == "proxy-wasm";
            Ok(CheckReport {
                sha256,
                kind: Some(module.kind()),
                abi: filter.then(|| module.world()),
                exports: module
                    .exports
                    .iter()
                    .find(|e| e.starts_with(FILTER_EXPORT))
                    .cloned(),
                imports,
                loads: grants::check(&module.imports, grants),
            })
        }
        Err(error @ (PluginError::Instantiate(_) | PluginError::Compile(_))) => Ok(CheckReport {
            sha256,
            kind: None,
            abi: None,
            exports: None,
            imports: Vec::new(),
            loads: Err(error.to_string()),
        }),
        Err(other) => Err(other),
    }
}

/// A request to run a plugin against.
#[derive(Debug, Clone)]
pub struct TestRequest {
    /// The method.
    pub method: String,
    /// The path, with its query.
    pub target: String,
    /// The headers, in order.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
    /// The client's address.
    pub client_ip: IpAddr,
}

/// What the plugin did with a request.
#[derive(Debug, Default, Serialize)]
pub struct TestReport {
    /// What `init` asked for, or why it refused the config.
    pub init: Option<Result<String, String>>,
    /// What `on-request` decided: `continue`, or the reply it gave.
    pub action: Option<String>,
    /// Every change `on-request` made to the request.
    pub request_edits: Vec<String>,
    /// Every change `on-response` made to the upstream's response.
    pub response_edits: Vec<String>,
    /// The plugin's kv namespace after the request: (key, value as text).
    pub kv: Vec<(String, String)>,
    /// What the plugin logged: (level, message).
    pub logs: Vec<(String, String)>,
    /// A failure (trap, timeout, limit), if one ended the run.
    pub failure: Option<String>,
}

impl TestReport {
    /// Whether the plugin failed or refused its config.
    pub fn failed(&self) -> bool {
        self.failure.is_some() || matches!(self.init, Some(Err(_)))
    }
}

impl std::fmt::Display for TestReport {
    /// The report `weir plugin test` prints.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.init {
            Some(Ok(wants)) => writeln!(f, "init: ok ({wants})")?,
            Some(Err(reason)) => writeln!(f, "init: rejected the config: {reason}")?,
            None => {}
        }
        if let Some(action) = &self.action {
            writeln!(f, "on-request: {action}")?;
        }
        for edit in &self.request_edits {
            writeln!(f, "  request  {edit}")?;
        }
        for edit in &self.response_edits {
            writeln!(f, "  response {edit}")?;
        }
        if !self.kv.is_empty() {
            writeln!(f, "kv:")?;
            for (key, value) in &self.kv {
                writeln!(f, "  {key} = {value}")?;
            }
        }
        if !self.logs.is_empty() {
            writeln!(f, "logs:")?;
            for (level, message) in &self.logs {
                writeln!(f, "  {level:<5} {message}")?;
            }
        }
        if let Some(failure) = &self.failure {
            writeln!(f, "failed: {failure}")?;
        }
        Ok(())
    }
}

/// The upstream response a test run pretends to get.
#[derive(Debug, Clone)]
pub struct TestUpstream {
    /// Its status.
    pub status: u16,
    /// Its headers.
    pub headers: Vec<(String, String)>,
    /// Its body.
    pub body: Vec<u8>,
}

fn header_map(pairs: &[(String, String)]) -> Result<HeaderMap, String> {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("{name:?} is not a header name"))?;
        let value = HeaderValue::from_str(value).map_err(|_| format!("bad value for {name}"))?;
        map.append(name, value);
    }
    Ok(map)
}

/// Lines describing how `after` differs from `before`.
fn header_edits(before: &HeaderMap, after: &HeaderMap) -> Vec<String> {
    let mut edits = Vec::new();
    let (old, new) = (headers::all(before), headers::all(after));
    for (name, value) in &new {
        if !old.contains(&(name.clone(), value.clone())) {
            edits.push(format!("header {name}: {value}"));
        }
    }
    for (name, value) in &old {
        if !new.contains(&(name.clone(), value.clone())) {
            edits.push(format!("removed header {name}: {value}"));
        }
    }
    edits
}

/// Runs `init`, `on-request`, then (if the request went on) `on-response` against `upstream`,
/// and `on-log`, with `config` and `grants`; reports what the plugin did.
pub async fn run(
    bytes: Vec<u8>,
    config: &str,
    grants: Grants,
    request: TestRequest,
    upstream: TestUpstream,
) -> Result<TestReport, String> {
    let logs: crate::plugin::LogCapture = Arc::new(Mutex::new(Vec::new()));
    let metrics = Arc::new(Metrics::new());
    let mut runtime = PluginRuntime::new(metrics.clone(), None).map_err(|e| e.to_string())?;
    runtime.capture_logs(logs.clone());
    let module = runtime.load(bytes).await.map_err(|e| e.to_string())?;
    grants::check(&module.imports, &grants)?;
    let entry: PluginConfig = serde_json::from_value(serde_json::json!({
        "name": "plugin-under-test",
        "sha256": module.sha256,
        "grants": grants,
        "quarantine": {"traps": 0},
    }))
    .map_err(|e| e.to_string())?;
    let config_json: serde_json::Value = serde_json::from_str(if config.trim().is_empty() {
        "{}"
    } else {
        config
    })
    .map_err(|e| format!("--config is not JSON: {e}"))?;
    let mut report = TestReport::default();
    let pool = match runtime
        .pool(&entry, &module, Isolation::Pooled, &config_json)
        .await
    {
        Ok(pool) => pool,
        Err(PluginError::Config(reason)) => {
            report.init = Some(Err(reason));
            report.logs = logs.lock().expect("log capture lock").clone();
            return Ok(report);
        }
        Err(other) => return Err(other.to_string()),
    };
    let wants = pool.wants();
    report.init = Some(Ok(format!(
        "on-request {}, on-response {}, on-log {}, request-body {}, response-body {}",
        wants.on_request, wants.on_response, wants.on_log, wants.request_body, wants.response_body
    )));

    let chain = [ChainLink {
        pool,
        failure: entry.failure,
        metrics: Arc::new(metrics.plugin(
            "plugin-under-test",
            "test",
            crate::plugin::tenant::DEFAULT_TENANT,
        )),
    }];

    let (path, query) = match request.target.split_once('?') {
        Some((path, query)) => (path.to_owned(), Some(query.to_owned())),
        None => (request.target.clone(), None),
    };
    let headers_before = header_map(&request.headers)?;
    let view = Box::new(RequestView {
        method: Method::from_bytes(request.method.as_bytes())
            .map_err(|_| "bad --method".to_string())?,
        path: path.clone(),
        query: query.clone(),
        headers: headers_before.clone(),
        id: uuid::Uuid::new_v4().to_string(),
        route_id: "test".into(),
        client_ip: request.client_ip,
        body: BufferedBody::Buffered(Bytes::from(request.body.clone())),
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
    });
    // The gateway's own phases, in its order: see proxy.rs.
    let mut plugin_time = Duration::ZERO;
    // Each plugin keeps one instance for the request's phases, as the gateway binds them: a
    // proxy-wasm filter's HTTP context lives in it.
    let mut bound: Vec<Bound> = chain.iter().map(|_| Bound::default()).collect();
    let (mut view, entered, decided) =
        proxy::request_phase(&chain, view, &mut plugin_time, &mut bound, None).await;
    if view.method.as_str() != request.method {
        report.request_edits.push(format!("method {}", view.method));
    }
    if view.path != path {
        report.request_edits.push(format!("path {}", view.path));
    }
    if view.query != query {
        report.request_edits.push(format!(
            "query {}",
            view.query.as_deref().unwrap_or("(none)")
        ));
    }
    report
        .request_edits
        .extend(header_edits(&headers_before, &view.headers));
    if let BufferedBody::Buffered(body) = &view.body
        && body.as_ref() != request.body.as_slice()
    {
        report
            .request_edits
            .push(format!("body {}", String::from_utf8_lossy(body)));
    }
    let queued = std::mem::take(&mut view.response_edits);
    let answer = match decided {
        Ok(Decision::Reply(reply)) => {
            report.action = Some(format!(
                "respond {} {:?} {}",
                reply.status,
                reply.headers,
                String::from_utf8_lossy(&reply.body)
            ));
            proxy::reply_response(reply, false)
        }
        Ok(Decision::Forward) => {
            report.action = Some("continue".into());
            let mut answer = http::Response::new(ProxyBody::full(upstream.body.clone()));
            *answer.status_mut() = StatusCode::from_u16(upstream.status)
                .map_err(|_| "bad upstream status".to_string())?;
            *answer.headers_mut() = header_map(&upstream.headers)?;
            answer
        }
        Err(error) => {
            report.failure = Some(failure(error));
            report.logs = logs.lock().expect("log capture lock").clone();
            return Ok(report);
        }
    };
    let (status_before, headers_before) = (answer.status(), answer.headers().clone());
    let body_before = body_of(&answer);
    let (kept, answered) = proxy::response_phase(
        &chain[..entered],
        snapshot::response_body_limit(&chain),
        Some(view),
        answer,
        &mut plugin_time,
        &mut bound,
        None,
    )
    .await;
    let view = kept.expect("the request phase's view comes back");
    let status = match answered {
        Ok(mut answer) => {
            proxy::apply_queued_edits(answer.headers_mut(), &queued);
            if answer.status() != status_before {
                report
                    .response_edits
                    .push(format!("status {}", answer.status().as_u16()));
            }
            report
                .response_edits
                .extend(header_edits(&headers_before, answer.headers()));
            // A body through filters' body callbacks is read through them, as a client reads it.
            let body = match answer.body_mut() {
                ProxyBody::Filtered(_) => {
                    let filtered = std::mem::replace(answer.body_mut(), ProxyBody::Empty);
                    match http_body_util::BodyExt::collect(filtered).await {
                        Ok(collected) => Some(collected.to_bytes()),
                        Err(error) => {
                            report.failure = Some(error.to_string());
                            None
                        }
                    }
                }
                _ => body_of(&answer),
            };
            if body != body_before {
                report.response_edits.push(format!(
                    "body {}",
                    String::from_utf8_lossy(&body.unwrap_or_default())
                ));
            }
            answer.status().as_u16()
        }
        Err(error) => {
            report.failure = Some(failure(error));
            StatusCode::INTERNAL_SERVER_ERROR.as_u16()
        }
    };
    let summary = Summary {
        status,
        latency_us: 0,
        upstream: Some("test-upstream".into()),
    };
    // The gateway logs failures in on-log and goes on; a test run reports them.
    if let Some(error) = proxy::log_phase(&chain, view, &summary, &mut bound)
        .await
        .pop()
    {
        report.failure = Some(error.to_string());
    }
    let namespace = format!(
        "{}/plugin-under-test",
        crate::plugin::tenant::DEFAULT_TENANT
    );
    report.kv = runtime
        .kv()
        .entries(&namespace)
        .into_iter()
        .map(|(key, value)| (key, String::from_utf8_lossy(&value).into_owned()))
        .collect();
    report.logs = logs.lock().expect("log capture lock").clone();
    Ok(report)
}

/// A failure as a test run reports it: a plugin's own failure without the gateway's wrapping.
fn failure(error: GatewayError) -> String {
    match error {
        GatewayError::Plugin { error, .. } => error.to_string(),
        other => other.to_string(),
    }
}

/// The bytes of an answer held in memory; `None` for one that streams.
fn body_of(answer: &http::Response<ProxyBody>) -> Option<Bytes> {
    match answer.body() {
        ProxyBody::Empty => Some(Bytes::new()),
        ProxyBody::Full(bytes) | ProxyBody::Trailed(bytes, _) => {
            Some(bytes.clone().unwrap_or_default())
        }
        _ => None,
    }
}

/// A verdict in a JSON report: its text, as the printed report shows it.
fn as_text<S: serde::Serializer>(
    verdict: &grants::Verdict,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_str(verdict)
}
