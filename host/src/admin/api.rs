//! The `/v1` admin API: config objects by kind, modules, validation and schemas, and the
//! dashboard's login. docs/admin-api.md documents every endpoint.
//!
//! Writes go to the store's [`ConfigWriter`] with a compare on the object's revision (its
//! `ETag`), and are checked by the same parser every store uses, so a write is refused with
//! the words `/v1/status` would have shown after it.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::{Value, json};

use super::Admin;
use super::auth::{CSRF_HEADER, LoginError, Principal, Refusal, cookie, session_cookie};
use super::origin::same_origin;
use super::secrets::{REDACTED, Secrets};
use crate::body::ProxyBody;
use crate::config::{
    self, AdminConfig, FieldError, KINDS, Kind, Layout, PluginConfig, RouteConfig,
};
use crate::edge::Peer;
use crate::store::{ConfigWriter, Expect, StoredObject, WriteError};

/// The largest JSON body the API reads.
const MAX_JSON_BYTES: usize = 1 << 20;
/// The page size when none is asked for, and the largest one may ask for.
const DEFAULT_PAGE_SIZE: usize = 50;
const MAX_PAGE_SIZE: usize = 500;
/// How a component's bytes begin: the wasm magic, then the component version and layer.
const COMPONENT_PREAMBLE: &[u8] = b"\0asm\x0d\0\x01\0";

/// A JSON error answer.
pub(crate) fn error(status: StatusCode, message: &str) -> Response<ProxyBody> {
    answer(status, &json!({ "error": message }))
}

/// A JSON answer.
fn answer(status: StatusCode, body: &Value) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::full(
        serde_json::to_string_pretty(body).expect("JSON serializes"),
    ));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The answer to a request that is not let in.
pub(crate) fn refusal(refused: Refusal) -> Response<ProxyBody> {
    let status = match refused {
        Refusal::Missing | Refusal::Invalid => StatusCode::UNAUTHORIZED,
        Refusal::Csrf | Refusal::ReadOnly => StatusCode::FORBIDDEN,
    };
    error(status, &refused.to_string())
}

/// Why a request could not be answered as asked; each becomes a JSON error.
enum Failure {
    Status(StatusCode, String),
    Invalid(Kind, Vec<FieldError>),
    Referenced(Kind, String, Vec<(Kind, String)>),
    Changed(Kind, Option<i64>),
}

impl Failure {
    fn into_response(self) -> Response<ProxyBody> {
        match self {
            Failure::Status(status, message) => error(status, &message),
            Failure::Invalid(kind, errors) => answer(
                StatusCode::BAD_REQUEST,
                &json!({"error": format!("invalid {kind}"), "errors": errors}),
            ),
            Failure::Referenced(kind, id, by) => answer(
                StatusCode::CONFLICT,
                &json!({
                    "error": format!(
                        "{kind} {id:?} is in use; delete what uses it first, or add ?force=true"
                    ),
                    "referenced_by": by
                        .iter()
                        .map(|(kind, id)| json!({"kind": kind, "id": id}))
                        .collect::<Vec<_>>(),
                }),
            ),
            Failure::Changed(kind, current) => answer(
                StatusCode::PRECONDITION_FAILED,
                &json!({
                    "error": format!("the {kind} changed since it was read (If-Match)"),
                    "revision": current,
                }),
            ),
        }
    }
}

impl Failure {
    /// Why a write of a `kind` did not happen.
    fn write(kind: Kind) -> impl FnOnce(WriteError) -> Failure {
        move |error| match error {
            WriteError::Conflict { current } => Failure::Changed(kind, current),
            WriteError::Unavailable(reason) => {
                Failure::Status(StatusCode::SERVICE_UNAVAILABLE, reason)
            }
            WriteError::TooLarge(reason) => Failure::Status(StatusCode::PAYLOAD_TOO_LARGE, reason),
        }
    }
}

impl From<WriteError> for Failure {
    /// For reads and module writes, which compare no revision.
    fn from(error: WriteError) -> Self {
        Failure::write(Kind::Key)(error)
    }
}

fn no_endpoint() -> Failure {
    Failure::Status(StatusCode::NOT_FOUND, "no such admin endpoint".into())
}

fn not_found(kind: Kind, id: &str) -> Failure {
    Failure::Status(StatusCode::NOT_FOUND, format!("no {kind} {id:?}"))
}

fn bad_request(message: impl Into<String>) -> Failure {
    Failure::Status(StatusCode::BAD_REQUEST, message.into())
}

type Answer = Result<Response<ProxyBody>, Failure>;

/// Answers one request under `/v1`.
pub(super) async fn handle(
    admin: &Admin,
    settings: &AdminConfig,
    request: Request<Incoming>,
    peer: Peer,
) -> Response<ProxyBody> {
    let path = request.uri().path().to_owned();
    let segments: Vec<&str> = path
        .strip_prefix("/v1")
        .unwrap_or_default()
        .split('/')
        .skip(1)
        .collect();
    let method = request.method().clone();
    let reads = matches!(method, Method::GET | Method::HEAD)
        || (method == Method::POST && segments.first() == Some(&"validate"));
    // A page on another site may make the browser send a write, or read the CSRF token,
    // with the session cookie; only the listener's own pages (or no page) may.
    if (!reads || segments == ["session"])
        && let Err(refused) = same_origin(request.uri(), request.headers(), peer.tls)
    {
        return error(StatusCode::FORBIDDEN, &refused.to_string());
    }
    let shared = admin.store.writer();
    // Sign-in needs no credentials; everything else does.
    match (&method, segments.as_slice()) {
        (&Method::POST, ["login"]) => return login(admin, settings, request, peer).await,
        (&Method::POST, ["logout"]) => {
            return logout(admin, settings, request.headers(), peer.tls, shared).await;
        }
        (&Method::GET, ["session"]) => {
            return session(admin, settings, request.headers(), peer.tls, shared).await;
        }
        _ => {}
    }
    let principal = match admin
        .auth
        .authenticate(settings, request.headers(), !reads, peer.tls, shared)
        .await
    {
        Ok(principal) => principal,
        Err(refused) => return refusal(refused),
    };
    if segments
        .iter()
        .any(|s| s.is_empty() || config::check_id(s).is_err())
    {
        return error(StatusCode::NOT_FOUND, "no such admin endpoint");
    }
    let call = Call {
        admin,
        principal,
        request,
    };
    let answered = match (&method, segments.as_slice()) {
        (&Method::GET, ["status"]) => Ok(super::status::status(&admin.gateway)),
        (&Method::GET, ["metrics", "history"]) => {
            Ok(admin.history.response(settings.metrics_history.interval_s))
        }
        (&Method::GET, ["schema", kind]) => schema(kind),
        (&Method::GET, ["schema", "plugins", name]) => plugin_schema(&admin.gateway, name),
        (&Method::POST, ["validate", kind]) => call.validate(kind).await,
        (&Method::GET, ["modules"]) => call.modules().await,
        (&Method::POST, ["modules"]) => call.upload().await,
        (&Method::DELETE, ["modules", sha256]) => call.delete_module(sha256).await,
        (&Method::GET, ["services"]) => call.services().await,
        (&Method::POST, ["session-keys", "rotate"]) => call.rotate_session_keys().await,
        (_, ["services", service, node]) => {
            call.object(Kind::ServiceNode, &format!("{service}/{node}"))
                .await
        }
        (_, [path]) => match Kind::at_path(path).map(|kind| (kind, kind.info().layout)) {
            // A kind of one object is named after it: `/v1/server`.
            Some((kind, Layout::Single)) => call.object(kind, path).await,
            Some((kind, Layout::Keyed(_))) if method == Method::GET => call.list(kind).await,
            _ => Err(no_endpoint()),
        },
        (_, [kind, id]) => match kind_of(kind) {
            Some(kind) => call.object(kind, id).await,
            None => Err(no_endpoint()),
        },
        _ => Err(no_endpoint()),
    };
    answered.unwrap_or_else(Failure::into_response)
}

/// The kinds that live at `/v1/<kind>/<id>`.
fn kind_of(segment: &str) -> Option<Kind> {
    Kind::at_path(segment).filter(|kind| kind.info().id_field().is_some())
}

/// One authenticated request.
struct Call<'a> {
    admin: &'a Admin,
    principal: Principal,
    request: Request<Incoming>,
}

impl<'a> Call<'a> {
    fn writer(&self) -> Result<&'a dyn ConfigWriter, Failure> {
        let admin: &'a Admin = self.admin;
        admin.store.writer().ok_or_else(|| {
            Failure::Status(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("config is managed by {}", admin.store.describe()),
            )
        })
    }

    /// What is secret in the objects this call reads or writes.
    fn secrets(&self) -> Secrets {
        Secrets::of(&self.admin.gateway.snapshot())
    }

    fn query(&self, name: &str) -> Option<String> {
        let query = self.request.uri().query()?;
        query.split('&').find_map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (key == name).then(|| value.to_owned())
        })
    }

    async fn body(self, limit: usize) -> Result<Bytes, Failure> {
        let body = Limited::new(self.request.into_body(), limit);
        match body.collect().await {
            Ok(collected) => Ok(collected.to_bytes()),
            Err(error) if error.is::<http_body_util::LengthLimitError>() => Err(Failure::Status(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body is over {limit} bytes"),
            )),
            Err(_) => Err(bad_request("the body could not be read")),
        }
    }

    async fn json_body(self) -> Result<Value, Failure> {
        let bytes = self.body(MAX_JSON_BYTES).await?;
        serde_json::from_slice(&bytes)
            .map_err(|e| Failure::Invalid(Kind::Key, vec![field("", format!("invalid JSON: {e}"))]))
    }

    /// `If-Match`, as what a write expects to find.
    fn expect(&self, kind: Kind) -> Result<Expect, Failure> {
        let headers = self.request.headers();
        if headers
            .get(header::IF_NONE_MATCH)
            .is_some_and(|v| v.as_bytes() == b"*")
        {
            return Ok(Expect::Absent);
        }
        let Some(value) = headers.get(header::IF_MATCH) else {
            return Ok(Expect::Anything);
        };
        let text = value.to_str().unwrap_or_default().trim();
        if text == "*" {
            return Ok(Expect::Anything);
        }
        text.trim_start_matches("W/")
            .trim_matches('"')
            .parse()
            .map(Expect::Revision)
            .map_err(|_| Failure::Changed(kind, None))
    }

    async fn list(self, kind: Kind) -> Answer {
        let page = page_param(self.query("page").as_deref(), 1, "page")?;
        let page_size = page_param(
            self.query("page_size").as_deref(),
            DEFAULT_PAGE_SIZE,
            "page_size",
        )?;
        if page_size > MAX_PAGE_SIZE {
            return Err(bad_request(format!("page_size is at most {MAX_PAGE_SIZE}")));
        }
        let objects = self.read_all(kind).await?;
        let total = objects.len();
        let secrets = self.secrets();
        let list: Vec<Value> = objects
            .into_iter()
            .skip((page - 1).saturating_mul(page_size))
            .take(page_size)
            .map(|object| envelope(&secrets, kind, &object))
            .collect();
        Ok(answer(
            StatusCode::OK,
            &json!({"list": list, "total": total, "page": page, "page_size": page_size}),
        ))
    }

    /// Every object of `kind`: from the store when it takes writes (so that a read follows a
    /// write), else from what the store published.
    async fn read_all(&self, kind: Kind) -> Result<Vec<StoredObject>, Failure> {
        if let Some(writer) = self.admin.store.writer() {
            let mut objects = writer.list(kind).await?;
            objects.sort_by(|a, b| a.id.cmp(&b.id));
            return Ok(objects);
        }
        let published = self.admin.store.subscribe().borrow().clone();
        let objects = &published.desired.objects;
        let list = objects
            .slot(kind)
            .map(|slot| slot.list())
            .unwrap_or_default();
        Ok(list
            .into_iter()
            .map(|(id, value)| StoredObject {
                id,
                value,
                revision: 0,
                created: 0,
            })
            .collect())
    }

    async fn read_one(&self, kind: Kind, id: &str) -> Result<Option<StoredObject>, Failure> {
        if let Some(writer) = self.admin.store.writer() {
            return Ok(writer.get(kind, id).await?);
        }
        Ok(self
            .read_all(kind)
            .await?
            .into_iter()
            .find(|object| object.id == id))
    }

    async fn object(self, kind: Kind, id: &str) -> Answer {
        let method = self.request.method().clone();
        match method {
            Method::GET | Method::HEAD => {
                let object = self
                    .read_one(kind, id)
                    .await?
                    .ok_or_else(|| not_found(kind, id))?;
                Ok(with_etag(
                    answer(StatusCode::OK, &envelope(&self.secrets(), kind, &object)),
                    &object,
                ))
            }
            Method::PUT => self.put(kind, id, false).await,
            Method::PATCH => self.put(kind, id, true).await,
            Method::DELETE => self.delete(kind, id).await,
            _ => Err(Failure::Status(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed".into(),
            )),
        }
    }

    async fn put(self, kind: Kind, id: &str, patch: bool) -> Answer {
        let writer = self.writer()?;
        let mut expect = self.expect(kind)?;
        let principal = self.principal.clone();
        let admin = self.admin;
        let secrets = self.secrets();
        let existing = writer.get(kind, id).await?;
        if let (Expect::Revision(wanted), current) = (expect, existing.as_ref().map(|e| e.revision))
            && current != Some(wanted)
        {
            return Err(Failure::Changed(kind, current));
        }
        if expect == Expect::Absent && existing.is_some() {
            return Err(Failure::Changed(kind, existing.map(|e| e.revision)));
        }
        let mut value = self.json_body().await?;
        if patch {
            let existing = existing.as_ref().ok_or_else(|| not_found(kind, id))?;
            let mut merged = existing.value.clone();
            merge_patch(&mut merged, &value);
            value = merged;
            if expect == Expect::Anything {
                // Two PATCHes at once must not lose one: compare on what was patched.
                expect = Expect::Revision(existing.revision);
            }
        }
        let now = now_secs();
        let object = value.as_object_mut().ok_or_else(|| {
            Failure::Invalid(kind, vec![field("", "the body must be a JSON object")])
        })?;
        for time in config::TIMES {
            object.remove(*time);
        }
        name_it(kind, id, &mut value)?;
        // What a read answered with, written back, keeps the secrets it was read without.
        secrets
            .restore(kind, &mut value, existing.as_ref().map(|e| &e.value))
            .map_err(|errors| Failure::Invalid(kind, errors))?;
        check(writer, kind, &value).await?;
        check_plugin_configs(&admin.gateway.snapshot(), kind, &value)?;
        let created = existing
            .as_ref()
            .and_then(|e| e.value.get("create_time").cloned())
            .unwrap_or_else(|| json!(now));
        let object = value.as_object_mut().expect("checked to be an object");
        object.insert("create_time".into(), created);
        object.insert("update_time".into(), json!(now));
        let before = existing.as_ref().map(|e| e.revision);
        let revision = writer
            .put(kind, id, &value, expect)
            .await
            .map_err(Failure::write(kind))?;
        audit(
            &principal,
            if patch { "patch" } else { "put" },
            kind,
            id,
            before,
            Some(revision),
        );
        let stored = StoredObject {
            id: id.to_owned(),
            value,
            revision,
            created: existing.map_or(revision, |e| e.created),
        };
        let status = if before.is_some() {
            StatusCode::OK
        } else {
            StatusCode::CREATED
        };
        Ok(with_etag(
            answer(status, &envelope(&secrets, kind, &stored)),
            &stored,
        ))
    }

    async fn delete(self, kind: Kind, id: &str) -> Answer {
        let writer = self.writer()?;
        let expect = self.expect(kind)?;
        let force = self.query("force").as_deref() == Some("true");
        let existing = writer
            .get(kind, id)
            .await?
            .ok_or_else(|| not_found(kind, id))?;
        if !force {
            let users = referrers(writer, kind, id).await?;
            if !users.is_empty() {
                return Err(Failure::Referenced(kind, id.to_owned(), users));
            }
        }
        let revision = writer
            .delete(kind, id, expect)
            .await
            .map_err(Failure::write(kind))?;
        audit(
            &self.principal,
            "delete",
            kind,
            id,
            Some(existing.revision),
            None,
        );
        Ok(answer(
            StatusCode::OK,
            &json!({"deleted": id, "kind": kind, "revision": revision}),
        ))
    }

    async fn validate(self, kind: &str) -> Answer {
        let kind = Kind::at_path(kind)
            .ok_or_else(|| Failure::Status(StatusCode::NOT_FOUND, format!("no kind {kind:?}")))?;
        let admin = self.admin;
        let value = self.json_body().await?;
        match admin.store.writer() {
            Some(writer) => check(writer, kind, &value).await?,
            None => check_object(kind, &value).map(drop)?,
        }
        check_plugin_configs(&admin.gateway.snapshot(), kind, &value)?;
        Ok(answer(StatusCode::OK, &json!({"valid": true})))
    }

    async fn modules(self) -> Answer {
        let Some(writer) = self.admin.store.writer() else {
            // The file store names modules by path; show what is loaded.
            let snapshot = self.admin.gateway.snapshot();
            let list: Vec<Value> = snapshot
                .plugins
                .values()
                .map(|p| json!({"sha256": p.module.sha256, "plugins": [p.config.name]}))
                .collect();
            return Ok(answer(
                StatusCode::OK,
                &json!({"total": list.len(), "list": list}),
            ));
        };
        let modules = writer.modules().await?;
        let plugins = parsed::<PluginConfig>(writer, Kind::Plugin).await?;
        let list: Vec<Value> = modules
            .iter()
            .map(|m| {
                let users: Vec<&str> = plugins
                    .iter()
                    .filter(|p| p.sha256.as_deref() == Some(m.sha256.as_str()))
                    .map(|p| p.name.as_str())
                    .collect();
                json!({"sha256": m.sha256, "size": m.size, "plugins": users})
            })
            .collect();
        Ok(answer(
            StatusCode::OK,
            &json!({"total": list.len(), "list": list}),
        ))
    }

    async fn upload(self) -> Answer {
        let admin = self.admin;
        let principal = self.principal.clone();
        let writer = self.writer()?;
        let limit = usize::try_from(admin.max_module_bytes).unwrap_or(usize::MAX);
        let bytes = self.body(limit).await?;
        if bytes.is_empty() {
            return Err(bad_request("the body must be a component's .wasm bytes"));
        }
        // Refuse what no gateway could load, before it is stored. With trusted keys only a
        // signed module is ever compiled, and an upload carries no signature: its entry does, so
        // the module is checked and compiled when an entry names it.
        if admin
            .gateway
            .snapshot()
            .server
            .config
            .trusted_keys
            .is_empty()
        {
            if let Err(error) = admin.gateway.runtime().load(bytes.to_vec()).await {
                return Err(bad_request(format!("not a weir plugin component: {error}")));
            }
        } else if !bytes.starts_with(COMPONENT_PREAMBLE) {
            return Err(bad_request(
                "not a weir plugin component: it does not start as a component does",
            ));
        }
        let stored = writer.store_module(&bytes).await?;
        audit(
            &principal,
            "upload",
            Kind::Module,
            &stored.sha256,
            None,
            None,
        );
        let status = if stored.already_stored {
            StatusCode::OK
        } else {
            StatusCode::CREATED
        };
        Ok(answer(
            status,
            &serde_json::to_value(&stored).expect("JSON serializes"),
        ))
    }

    async fn delete_module(self, sha256: &str) -> Answer {
        let writer = self.writer()?;
        let force = self.query("force").as_deref() == Some("true");
        if !force {
            let users = referrers(writer, Kind::Module, sha256).await?;
            if !users.is_empty() {
                return Err(Failure::Referenced(Kind::Module, sha256.to_owned(), users));
            }
        }
        if !writer.delete_module(sha256).await? {
            return Err(Failure::Status(
                StatusCode::NOT_FOUND,
                format!("no module {sha256}"),
            ));
        }
        audit(&self.principal, "delete", Kind::Module, sha256, None, None);
        Ok(answer(StatusCode::OK, &json!({"deleted": sha256})))
    }

    /// `POST /v1/session-keys/rotate`: a new key signs sessions from now on; sessions signed
    /// with the one before stay valid until they expire.
    async fn rotate_session_keys(self) -> Answer {
        let writer = self.writer()?;
        self.admin.auth.rotate(writer).await?;
        tracing::info!(target: "weir::audit", who = %self.principal.name, "rotated the session keys");
        Ok(answer(StatusCode::OK, &json!({"rotated": true})))
    }

    async fn services(self) -> Answer {
        let nodes = self.read_all(Kind::ServiceNode).await?;
        let mut services: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        for node in &nodes {
            let (service, id) = node.id.split_once('/').unwrap_or((&node.id, ""));
            let mut item = envelope(&Secrets::default(), Kind::ServiceNode, node);
            item["id"] = json!(id);
            services.entry(service.to_owned()).or_default().push(item);
        }
        let list: Vec<Value> = services
            .into_iter()
            .map(|(name, nodes)| json!({"name": name, "nodes": nodes}))
            .collect();
        Ok(answer(
            StatusCode::OK,
            &json!({"total": list.len(), "list": list}),
        ))
    }
}

/// A positive number from the query, or `default`.
fn page_param(text: Option<&str>, default: usize, name: &str) -> Result<usize, Failure> {
    match text {
        None | Some("") => Ok(default),
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|n| *n >= 1)
            .ok_or_else(|| bad_request(format!("{name} must be a whole number from 1"))),
    }
}

/// How an object of `kind` is answered: `{id, revision, value}`, secrets left out.
fn envelope(secrets: &Secrets, kind: Kind, object: &StoredObject) -> Value {
    let mut value = object.value.clone();
    secrets.redact(kind, &mut value);
    json!({
        "id": object.id,
        "revision": (object.revision > 0).then_some(object.revision),
        "value": value,
    })
}

/// A server section written back with the redacted Redis URL would store the placeholder as
/// its password: refuse it.
fn refuse_url_placeholder(value: &Value) -> Result<(), Vec<FieldError>> {
    match value.pointer("/redis_url").and_then(Value::as_str) {
        Some(url) if url.contains(REDACTED) => Err(vec![field(
            "/redis_url",
            "holds the redacted placeholder; send the password, or PATCH without redis_url to keep the stored one",
        )]),
        _ => Ok(()),
    }
}

fn with_etag(mut response: Response<ProxyBody>, object: &StoredObject) -> Response<ProxyBody> {
    if object.revision > 0
        && let Ok(value) = HeaderValue::from_str(&format!("\"{}\"", object.revision))
    {
        response.headers_mut().insert(header::ETAG, value);
    }
    response
}

fn field(path: &str, message: impl Into<String>) -> FieldError {
    FieldError {
        path: path.to_owned(),
        message: message.into(),
    }
}

/// Puts the URL's id into the body (or checks the body's against it).
fn name_it(kind: Kind, id: &str, value: &mut Value) -> Result<(), Failure> {
    let id_field = match kind.info().layout {
        Layout::Keyed(id_field) => id_field,
        Layout::Nested => {
            return id
                .split('/')
                .try_for_each(config::check_id)
                .map_err(|message| Failure::Invalid(kind, vec![field("", message)]));
        }
        Layout::Single | Layout::Unlisted => return Ok(()),
    };
    let object = value.as_object_mut().expect("checked to be an object");
    match object.get(id_field) {
        None => {
            object.insert(id_field.into(), json!(id));
            Ok(())
        }
        Some(Value::String(inner)) if inner == id => Ok(()),
        Some(other) => Err(Failure::Invalid(
            kind,
            vec![field(
                &format!("/{id_field}"),
                format!("{other} does not match the {id_field} in the URL, {id:?}"),
            )],
        )),
    }
}

/// Parses `value` as a `kind`; returns what it refers to (JSON pointer, kind, id).
fn check_object(kind: Kind, value: &Value) -> Result<Vec<(String, Kind, String)>, Failure> {
    let invalid = |errors| Failure::Invalid(kind, errors);
    let info = kind.info();
    let check = info
        .check
        .filter(|_| info.path.is_some())
        .ok_or_else(|| bad_request("not a kind of object"))?;
    // What the admin API adds to a kind's own checks.
    if kind == Kind::Server {
        refuse_url_placeholder(value).map_err(invalid)?;
    }
    check(value).map_err(invalid)?;
    if kind == Kind::Plugin && value.get("module").is_some_and(|module| !module.is_null()) {
        return Err(invalid(vec![field(
            "/module",
            "in etcd a plugin names its module by `sha256` (upload it with POST /v1/modules)",
        )]));
    }
    Ok(info.references_in(value))
}

/// Parses `value` and checks that what it refers to exists in the store.
async fn check(writer: &dyn ConfigWriter, kind: Kind, value: &Value) -> Result<(), Failure> {
    let references = check_object(kind, value)?;
    let mut errors = Vec::new();
    for (path, referred, id) in references {
        let exists = if referred == Kind::Module {
            writer.module(&id).await?.is_some()
        } else {
            writer.get(referred, &id).await?.is_some()
        };
        if !exists {
            let what = if referred == Kind::Module {
                format!("module {id} is not stored (upload it with POST /v1/modules)")
            } else {
                format!("{referred} {id:?} does not exist")
            };
            errors.push(field(&path, what));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(Failure::Invalid(kind, errors))
    }
}

/// Checks each plugin config of a route against the schema its plugin described itself with
/// (when the plugin is loaded and is a 0.2.0 one), so that a bad field is refused at its pointer
/// now rather than reported when the route fails to load.
fn check_plugin_configs(
    snapshot: &crate::snapshot::Snapshot,
    kind: Kind,
    value: &Value,
) -> Result<(), Failure> {
    if kind != Kind::Route {
        return Ok(());
    }
    let Ok(route) = config::parse::<RouteConfig>(value) else {
        return Ok(());
    };
    let mut errors = Vec::new();
    for (index, plugin) in route.plugins.iter().enumerate() {
        let Some(info) = snapshot
            .plugins
            .get(&plugin.name)
            .and_then(|loaded| loaded.module.info())
        else {
            continue;
        };
        for (at, message) in info.errors(&plugin.config) {
            errors.push(field(&format!("/plugins/{index}/config{at}"), message));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(Failure::Invalid(kind, errors))
    }
}

/// The objects of `kind` that parse.
async fn parsed<T: config::ConfigObject>(
    writer: &dyn ConfigWriter,
    kind: Kind,
) -> Result<Vec<T>, Failure> {
    Ok(writer
        .list(kind)
        .await?
        .iter()
        .filter_map(|o| config::parse::<T>(&o.value).ok())
        .collect())
}

/// What refers to `kind`/`id`, and so would break if it went: the objects that parse and name
/// it at one of their kind's references.
async fn referrers(
    writer: &dyn ConfigWriter,
    kind: Kind,
    id: &str,
) -> Result<Vec<(Kind, String)>, Failure> {
    let mut found = Vec::new();
    for info in KINDS {
        let Some(check) = info.check else { continue };
        if !info.references.iter().any(|r| r.to == kind) {
            continue;
        }
        for object in writer.list(info.kind).await? {
            let names_it = info
                .references_in(&object.value)
                .iter()
                .any(|(_, to, named)| *to == kind && named == id);
            if names_it && check(&object.value).is_ok() {
                found.push((info.kind, object.id));
            }
        }
    }
    Ok(found)
}

/// RFC 7396: a JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Default::default());
    }
    let target = target.as_object_mut().expect("made an object");
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// One line per write, for whoever audits who changed what.
fn audit(
    principal: &Principal,
    action: &str,
    kind: Kind,
    id: &str,
    before: Option<i64>,
    after: Option<i64>,
) {
    tracing::info!(
        target: "weir::audit",
        who = %principal.name,
        role = ?principal.role,
        action,
        kind = %kind,
        id,
        before = ?before,
        after = ?after,
        "admin write"
    );
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// `GET /v1/schema/plugins/<name>`: the config schema a 0.2.0 plugin described itself with.
fn plugin_schema(gateway: &crate::gateway::Gateway, name: &str) -> Answer {
    let snapshot = gateway.snapshot();
    let Some(plugin) = snapshot.plugins.get(name) else {
        return Err(Failure::Status(
            StatusCode::NOT_FOUND,
            format!("no plugin {name:?} is loaded"),
        ));
    };
    match plugin.module.info() {
        Some(info) => Ok(answer(StatusCode::OK, &info.schema)),
        None => Err(Failure::Status(
            StatusCode::NOT_FOUND,
            format!(
                "plugin {name:?} does not describe its config: it is built against \
                 weir:plugin@{}",
                plugin.module.world()
            ),
        )),
    }
}

/// `GET /v1/schema/<kind>`: the JSON Schema of a kind of object.
fn schema(kind: &str) -> Answer {
    let Some(schema) = Kind::at_path(kind).and_then(|kind| kind.info().schema) else {
        return Err(Failure::Status(
            StatusCode::NOT_FOUND,
            format!("no kind {kind:?}"),
        ));
    };
    Ok(answer(
        StatusCode::OK,
        &serde_json::to_value(schema()).expect("JSON serializes"),
    ))
}

/// `POST /v1/login`: `{username, password}` opens a session.
async fn login(
    admin: &Admin,
    settings: &AdminConfig,
    request: Request<Incoming>,
    peer: Peer,
) -> Response<ProxyBody> {
    let body = match Limited::new(request.into_body(), 16 * 1024).collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => return error(StatusCode::PAYLOAD_TOO_LARGE, "the body is too large"),
    };
    #[derive(serde::Deserialize)]
    struct Login {
        username: String,
        password: String,
    }
    let Ok(form) = serde_json::from_slice::<Login>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "send {\"username\": ..., \"password\": ...}",
        );
    };
    let from = peer.addr.ip();
    match admin
        .auth
        .login(
            settings,
            admin.store.writer(),
            from,
            &form.username,
            &form.password,
        )
        .await
    {
        Ok(session) => {
            tracing::info!(target: "weir::audit", who = %session.username, peer = %from, "login");
            let mut response = answer(
                StatusCode::OK,
                &json!({
                    "username": session.username,
                    "role": session.role,
                    "csrf_token": session.csrf,
                    "expires": session.expires,
                }),
            );
            let cookie = format!(
                "{}={}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
                session_cookie(peer.tls),
                session.token,
                settings.session_minutes * 60,
                if peer.tls { "; Secure" } else { "" },
            );
            response.headers_mut().insert(
                header::SET_COOKIE,
                HeaderValue::from_str(&cookie).expect("a cookie is a header value"),
            );
            response
        }
        Err(LoginError::Wrong) => {
            // The name as typed may be a password typed in the wrong box: log a bounded,
            // printable form only.
            let user: String = form
                .username
                .chars()
                .take(64)
                .filter(|c| !c.is_control())
                .collect();
            tracing::warn!(target: "weir::audit", %user, peer = %from, "failed login");
            error(StatusCode::UNAUTHORIZED, &LoginError::Wrong.to_string())
        }
        Err(unavailable @ (LoginError::Busy | LoginError::Unavailable)) => {
            error(StatusCode::SERVICE_UNAVAILABLE, &unavailable.to_string())
        }
        Err(locked @ LoginError::LockedOut(seconds)) => {
            let mut response = error(StatusCode::TOO_MANY_REQUESTS, &locked.to_string());
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_str(&seconds.to_string()).expect("digits"),
            );
            response
        }
    }
}

/// `POST /v1/logout`: ends the session, on every gateway, and clears its cookie.
async fn logout(
    admin: &Admin,
    settings: &AdminConfig,
    headers: &HeaderMap,
    tls: bool,
    shared: Option<&dyn ConfigWriter>,
) -> Response<ProxyBody> {
    let name = session_cookie(tls);
    if let Some(token) = cookie(headers, name) {
        admin.auth.logout(settings, token, shared).await;
    }
    let mut response = answer(StatusCode::OK, &json!({"logged_out": true}));
    let clear = format!(
        "{name}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{}",
        if tls { "; Secure" } else { "" }
    );
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&clear).expect("a cookie is a header value"),
    );
    response
}

/// `GET /v1/session`: who the session cookie belongs to, and its CSRF token.
async fn session(
    admin: &Admin,
    settings: &AdminConfig,
    headers: &HeaderMap,
    tls: bool,
    shared: Option<&dyn ConfigWriter>,
) -> Response<ProxyBody> {
    let Some(token) = cookie(headers, session_cookie(tls)) else {
        return refusal(Refusal::Missing);
    };
    match admin.auth.session(settings, token, shared).await {
        Ok((principal, csrf)) => answer(
            StatusCode::OK,
            &json!({
                "username": principal.name,
                "role": principal.role,
                "csrf_token": csrf,
                "csrf_header": CSRF_HEADER,
            }),
        ),
        Err(refused) => refusal(refused),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redis_url_written_back_with_the_placeholder_is_refused() {
        let server = json!({"redis_url": "redis://app:<redacted>@10.0.0.7:6379/0"});
        assert!(refuse_url_placeholder(&server).is_err());
        let plain = json!({"redis_url": "redis://10.0.0.7:6379/0"});
        assert!(refuse_url_placeholder(&plain).is_ok());
    }

    #[test]
    fn merge_patch_follows_rfc_7396() {
        // The RFC's own example (appendix A, in part).
        let mut target = json!({"a": "b", "c": {"d": "e", "f": "g"}});
        merge_patch(&mut target, &json!({"a": "z", "c": {"f": null}}));
        assert_eq!(target, json!({"a": "z", "c": {"d": "e"}}));
        let mut target = json!({"a": [{"b": "c"}]});
        merge_patch(&mut target, &json!({"a": [1]}));
        assert_eq!(target, json!({"a": [1]}));
        let mut target = json!(["a", "b"]);
        merge_patch(&mut target, &json!({"a": "c"}));
        assert_eq!(target, json!({"a": "c"}));
        let mut target = json!({"e": null});
        merge_patch(&mut target, &json!({"a": 1}));
        assert_eq!(target, json!({"e": null, "a": 1}));
    }

    #[test]
    fn an_object_refers_to_its_upstream_plugins_tenant_and_module() {
        let refs = check_object(
            Kind::Route,
            &json!({"id": "r", "uri": "/a", "upstream_id": "u", "plugins": [{"name": "p"}]}),
        )
        .ok()
        .unwrap();
        let refs: Vec<(&str, Kind, &str)> = refs
            .iter()
            .map(|(p, k, i)| (p.as_str(), *k, i.as_str()))
            .collect();
        assert_eq!(
            refs,
            [
                ("/upstream_id", Kind::Upstream, "u"),
                ("/plugins/0/name", Kind::Plugin, "p")
            ]
        );
        let Err(Failure::Invalid(_, errors)) =
            check_object(Kind::Plugin, &json!({"name": "p", "module": "p.wasm"}))
        else {
            panic!("a module path is refused in etcd");
        };
        assert_eq!(errors[0].path, "/module");
    }

    #[test]
    fn the_url_names_the_object() {
        let mut value = json!({"uri": "/a"});
        name_it(Kind::Route, "r1", &mut value).ok().unwrap();
        assert_eq!(value["id"], "r1");
        let mut value = json!({"id": "other"});
        let Err(Failure::Invalid(_, errors)) = name_it(Kind::Route, "r1", &mut value) else {
            panic!("a different id is refused");
        };
        assert_eq!(errors[0].path, "/id");
    }
}
