//! probe: a test plugin whose config picks what it does, from well-behaved to hostile.

use serde::Deserialize;
use weir_sdk::{
    Action, Level, Plugin, Reply, Request, Response, Summary, Wants, kv, response, schemars,
};

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(tag = "mode", rename_all = "kebab-case", deny_unknown_fields)]
enum Config {
    /// Answers with this status and body; the upstream is never called.
    Reply { status: u16, body: String },
    /// Upper-cases the request body and appends `suffix` to the response body.
    Body { suffix: String },
    /// Counts requests in the kv and reports the count in `x-count`.
    Count { key: String },
    /// Loops forever in on-request.
    Loop,
    /// Allocates without bound in on-request.
    Alloc,
    /// Panics in on-request.
    Panic,
    /// Recurses without bound in on-request.
    Recurse,
    /// Writes a log line and marks the request with a var that on-response and on-log read.
    Trace { tag: String },
    /// Panics in init, so the config can never load.
    PanicInInit,
    /// Answers 200 with the variant this component was built as (`PROBE_VARIANT`, default `a`).
    Variant,
    /// Sets `count` headers on the request.
    HeaderFlood { count: u32 },
    /// Replaces the request body with `bytes` bytes.
    BodyFlood { bytes: u64 },
    /// Writes `count` kv keys of `size` bytes each.
    KvFlood { count: u32, size: u32 },
    /// Calls `url` and answers with what came back, or 502 with the error.
    Callout { url: String },
    /// Writes `value` under `key` in the kv, then answers with what the kv holds there.
    KvWrite { key: String, value: String },
    /// Answers with what the kv holds under `key` (`none` when nothing).
    KvRead { key: String },
    /// Answers with how many requests this instance has seen (state kept in the instance).
    InstanceCounter,
    /// Holds `mb` MiB in the instance from the first request on, then answers 200.
    Hold { mb: u32 },
    /// Buffers both bodies without changing them, and says how long they were in
    /// `x-request-body-bytes` (to the upstream) and `x-response-body-bytes` (to the client).
    Inspect,
    /// Remembers the request id in the instance in on-request; on-response says whether the
    /// instance it runs on saw this request (`x-remembered: same|other`) and how many it saw
    /// (`x-instance-seen`); on-log counts `remember-same` or `remember-other`.
    Remember,
    /// Answers how many of the keys `kv-flood` writes (`flood-0` to `flood-{count - 1}`) the kv
    /// still holds.
    KvCensus { count: u32 },
    /// Marks the request as made by consumer `name`; answers 403 with the error when refused.
    SetConsumer { name: String },
    /// Edits what it can, then goes past the header bound and fails: in on-request it sets
    /// `x-probe-edited` and the var that `trace` reads (to `edited`), queues a `set-cookie` and then 100,000
    /// response headers; in on-response it sets the status to 299 and `x-probe-edited`, then
    /// sets 100,000 headers.
    EditThenFail,
    /// Tells the upstream what it saw of request header `name`, in `x-probe-saw` (`none` when
    /// absent).
    SeeHeader { name: String },
    /// In on-request, queues the response header `x-probe-queued: request` and answers 403
    /// when the path is `deny`; in on-response, sets `x-probe-marked: <status>`.
    MarkAndDeny { deny: String },
    /// Appends `tag` to the request header `x-chain` in on-request and to the response header
    /// `x-chain` in on-response (comma-separated), so that a chain shows its order.
    Chain { tag: String },
}

/// Requests this instance has seen (for `instance-counter`).
static SEEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// The id of the last request this instance saw in on-request (for `remember`).
static REMEMBERED: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());
/// Memory held by this instance (for `hold`).
static HELD: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

/// Which build of probe this is: tests/build.rs builds it twice, to swap one for the other.
const VARIANT: &str = match option_env!("PROBE_VARIANT") {
    Some(variant) => variant,
    None => "a",
};

struct Probe(Config);

impl Plugin for Probe {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        match &config {
            Config::PanicInInit => panic!("probe: panic in init"),
            Config::Reply { status, .. } if *status < 100 => {
                Err(format!("status {status} is not a status"))
            }
            _ => Ok(Probe(config)),
        }
    }

    fn wants(&self) -> Wants {
        let both = matches!(self.0, Config::Body { .. } | Config::Inspect);
        let body = both || matches!(self.0, Config::BodyFlood { .. });
        let trace = matches!(
            self.0,
            Config::Trace { .. }
                | Config::Remember
                | Config::EditThenFail
                | Config::MarkAndDeny { .. }
                | Config::Chain { .. }
        );
        Wants {
            on_request: true,
            on_response: both || trace,
            on_log: trace,
            request_body: body,
            response_body: both,
        }
    }

    fn on_request(&self, req: &Request) -> Action {
        match &self.0 {
            Config::MarkAndDeny { deny } => {
                let _ = response::set_header(req, "x-probe-queued", "request");
                if req.path() == *deny {
                    Action::Respond(Reply::text(403, "denied"))
                } else {
                    Action::Continue
                }
            }
            Config::Reply { status, body } => Action::Respond(
                Reply::text(*status, body.clone()).with_header("x-probe", "replied"),
            ),
            Config::Body { .. } => {
                let body = req.body().unwrap_or_default();
                let _ = req.set_body(&body.to_ascii_uppercase());
                Action::Continue
            }
            Config::Count { key } => {
                let count = kv::incr(key, 1, None).unwrap_or(-1);
                let _ = req.set_header("x-count", &count.to_string());
                Action::Continue
            }
            Config::Loop => {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            Config::Alloc => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            Config::Panic => panic!("probe: deliberate panic"),
            Config::Recurse => {
                #[allow(unconditional_recursion)] // Unbounded on purpose: this is the hostile case.
                fn deeper(n: u64) -> u64 {
                    std::hint::black_box(deeper(std::hint::black_box(n + 1)) + 1)
                }
                let _ = req.set_header("x-depth", &deeper(0).to_string());
                Action::Continue
            }
            Config::Chain { tag } => {
                let chain = match req.header("x-chain") {
                    Some(before) => format!("{before},{tag}"),
                    None => tag.clone(),
                };
                let _ = req.set_header("x-chain", &chain);
                Action::Continue
            }
            Config::SeeHeader { name } => {
                let seen = req.header(name).unwrap_or_else(|| "none".into());
                let _ = req.set_header("x-probe-saw", &seen);
                Action::Continue
            }
            Config::Trace { tag } => {
                weir_sdk::log(Level::Info, &format!("probe {tag} saw {}", req.path()));
                req.set_var("probe-tag", tag);
                Action::Continue
            }
            Config::PanicInInit => unreachable!("init never succeeds"),
            Config::Variant => Action::Respond(Reply::text(200, VARIANT)),
            Config::HeaderFlood { count } => {
                for i in 0..*count {
                    let _ = req.set_header(&format!("x-flood-{i}"), "x");
                }
                Action::Continue
            }
            Config::BodyFlood { bytes } => {
                let _ = req.set_body(&vec![b'x'; *bytes as usize]);
                Action::Continue
            }
            Config::KvFlood { count, size } => {
                let value = vec![b'v'; *size as usize];
                for i in 0..*count {
                    kv::set(&format!("flood-{i}"), &value, None);
                }
                Action::Continue
            }
            Config::Callout { url } => match weir_sdk::http::get(url) {
                Ok(response) => Action::Respond(Reply {
                    status: 200,
                    headers: vec![("x-callout-status".into(), response.status.to_string())],
                    body: response.body,
                }),
                Err(error) => {
                    Action::Respond(Reply::error(502, &format!("callout refused: {error}")))
                }
            },
            Config::KvWrite { key, value } => {
                kv::set(key, value, None);
                let seen = kv::get_string(key).unwrap_or_else(|| "none".into());
                Action::Respond(Reply::text(200, seen))
            }
            Config::InstanceCounter => {
                let seen = SEEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                Action::Respond(Reply::text(200, seen.to_string()))
            }
            Config::Hold { mb } => {
                let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
                if held.is_empty() {
                    *held = vec![1u8; *mb as usize * 1024 * 1024];
                }
                Action::Respond(Reply::text(200, held.len().to_string()))
            }
            Config::Inspect => {
                let length = req.body().unwrap_or_default().len();
                let _ = req.set_header("x-request-body-bytes", &length.to_string());
                Action::Continue
            }
            Config::Remember => {
                SEEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                *REMEMBERED.lock().unwrap_or_else(|e| e.into_inner()) = req.id();
                Action::Continue
            }
            Config::KvRead { key } => Action::Respond(Reply::text(
                200,
                kv::get_string(key).unwrap_or_else(|| "none".into()),
            )),
            Config::KvCensus { count } => {
                let kept = (0..*count)
                    .filter(|i| kv::get(&format!("flood-{i}")).is_some())
                    .count();
                Action::Respond(Reply::text(200, kept.to_string()))
            }
            Config::SetConsumer { name } => match weir_sdk::consumers::set(req, name) {
                Ok(()) => Action::Continue,
                Err(error) => Action::Respond(Reply::error(403, &error)),
            },
            Config::EditThenFail => {
                let _ = req.set_header("x-probe-edited", "request");
                req.set_var("probe-tag", "edited");
                let _ = response::set_header(req, "set-cookie", "session=probe");
                for i in 0..100_000 {
                    let _ = response::append_header(req, "x-probe-queued", &i.to_string());
                }
                Action::Continue
            }
        }
    }

    fn on_response(&self, req: &Request, resp: &Response) {
        match &self.0 {
            Config::Body { suffix } => {
                let mut body = resp.body().unwrap_or_default();
                body.extend_from_slice(suffix.as_bytes());
                let _ = resp.set_body(&body);
            }
            Config::Trace { .. } => {
                let tag = req.get_var("probe-tag").unwrap_or_default();
                let _ = resp.set_header("x-probe-tag", &tag);
            }
            Config::Inspect => {
                let length = resp.body().unwrap_or_default().len();
                let _ = resp.set_header("x-response-body-bytes", &length.to_string());
            }
            Config::EditThenFail => {
                let _ = resp.set_status(299);
                let _ = resp.set_header("x-probe-edited", "response");
                for i in 0..100_000 {
                    let _ = resp.set_header(&format!("x-probe-flood-{i}"), "x");
                }
            }
            Config::MarkAndDeny { .. } => {
                let _ = resp.set_header("x-probe-marked", &resp.status().to_string());
            }
            Config::Chain { tag } => {
                let chain = match resp.header("x-chain") {
                    Some(before) => format!("{before},{tag}"),
                    None => tag.clone(),
                };
                let _ = resp.set_header("x-chain", &chain);
            }
            Config::Remember => {
                let seen = SEEN.load(std::sync::atomic::Ordering::Relaxed);
                let _ = resp.set_header("x-remembered", remembered(&req.id()));
                let _ = resp.set_header("x-instance-seen", &seen.to_string());
            }
            _ => {}
        }
    }

    fn on_log(&self, req: &Request, summary: &Summary) {
        if let Config::Trace { tag } = &self.0 {
            weir_sdk::counter_add(&format!("{tag}-logged"), 1);
            let _ = kv::incr(&format!("{tag}-status-{}", summary.status), 1, None);
            let _ = req.id();
        }
        if let Config::Remember = &self.0 {
            weir_sdk::counter_add(&format!("remember-{}", remembered(&req.id())), 1);
        }
    }
}

/// Whether this instance's on-request saw the request `id`.
fn remembered(id: &str) -> &'static str {
    if *REMEMBERED.lock().unwrap_or_else(|e| e.into_inner()) == id {
        "same"
    } else {
        "other"
    }
}

weir_sdk::export_plugin!(Probe);
