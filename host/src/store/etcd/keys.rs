//! The etcd key layout: which key holds what, how each value parses, and how modules are
//! chunked.
//!
//! ```text
//! <prefix>/routes/<id>            route JSON
//! <prefix>/upstreams/<id>         upstream JSON
//! <prefix>/plugins/<name>         plugin entry JSON, naming its module by sha256
//! <prefix>/tenants/<name>         tenant JSON: quotas
//! <prefix>/ssl/<id>               certificate JSON {cert, key, snis, default?}
//! <prefix>/consumers/<name>       consumer JSON {name, labels?, credentials}
//! <prefix>/server                 server JSON: client timeouts, limits, trusted proxies
//! <prefix>/services/<name>/<node> node JSON {host, port, weight?, meta?}, under a lease
//! <prefix>/service-settings/<name> how service <name> is reached: an upstream without nodes
//! <prefix>/modules/<sha256>       {"size": N, "chunks": C}
//! <prefix>/modules/<sha256>/<n>   chunk n of the module's bytes (n zero-padded to 6 digits)
//! <prefix>/admin_generated_key    the sha256 of the admin key weir generated
//! <prefix>/admin_session_keys     the keys that sign dashboard sessions (secret)
//! <prefix>/admin_revoked_sessions/<nonce>   a session that logged out, under a lease
//! ```

use std::path::Path;

use etcd_client::Client;
use serde::{Deserialize, Serialize};

use super::error::EtcdError;
use crate::config::{ConfigObject, ConfigObjects, FieldError, Kind, Layout, ObjectError, Refused};
use crate::digest::sha256_hex;

/// The key, under the prefix, that holds the sha256 of the admin key weir generated.
pub const GENERATED_KEY: &str = "admin_generated_key";

/// The key, under the prefix, that holds the keys signing dashboard sessions (JSON).
pub const SESSION_KEYS: &str = "admin_session_keys";

/// The folder, under the prefix, of sessions that logged out: `<nonce>`, under a lease.
pub const REVOKED_SESSIONS: &str = "admin_revoked_sessions";

/// Module chunks stay well under etcd's default 1.5 MiB request limit.
pub const CHUNK_BYTES: usize = 1 << 20;

/// What a config key names: the kind and id of an object, or why it names none.
pub(crate) type Place = Result<(Kind, String), ObjectError>;

/// What `key` names, from its layout alone. `None` for keys that are not config (modules, the
/// admin listener's own state) or not under `root`.
pub(crate) fn locate(root: &str, key: &str) -> Option<Place> {
    let rest = key.strip_prefix(root)?.strip_prefix('/')?;
    let (section, name) = rest.split_once('/').unwrap_or((rest, ""));
    match section {
        // The hash of a key weir generated itself; the admin listener reads it, not the store.
        GENERATED_KEY if rest == GENERATED_KEY => return None,
        // The admin listener's own state, read by it directly, never config.
        SESSION_KEYS if rest == SESSION_KEYS => return None,
        REVOKED_SESSIONS => return None,
        _ => {}
    }
    let unknown = || {
        let reason = format!("unknown key under {root}/");
        Some(Err(ObjectError::new(Kind::Key, rest, reason)))
    };
    let Some(kind) = Kind::under_key(section) else {
        return unknown();
    };
    Some(match kind.info().layout {
        Layout::Unlisted => return None,
        Layout::Single if rest == section => Ok((kind, section.to_owned())),
        Layout::Single => return unknown(),
        // A key that does not end in one id is refused when its value is parsed, which says so.
        Layout::Keyed(_) => Ok((kind, name.to_owned())),
        Layout::Nested => match name
            .split_once('/')
            .filter(|(s, n)| !s.is_empty() && !n.is_empty() && !n.contains('/'))
        {
            Some(_) => Ok((kind, name.to_owned())),
            None => Err(ObjectError::new(
                kind,
                name,
                "expected services/<name>/<node-id>",
            )),
        },
    })
}

/// Parses `value`, the object `kind`/`id`, into `objects`.
pub(crate) fn parse_into(
    objects: &mut ConfigObjects,
    kind: Kind,
    id: &str,
    value: &[u8],
) -> Result<(), ObjectError> {
    let mut json = parse_json(value, kind, id)?;
    if kind.info().id_field().is_some() {
        with_key_id(kind, &mut json, id)?;
    }
    let slot = objects.slot_mut(kind).expect("keys name kinds of object");
    slot.insert(id, &json).map_err(|refused| match refused {
        Refused::Invalid(errors) => ObjectError::fields(kind, id, errors),
        // Each key names its own object, and the mirror takes out what a key held before
        // it puts in what the key holds now.
        Refused::Taken(_) => ObjectError::new(kind, id, "another key holds this object"),
    })
}

/// A stored value as JSON, or why not.
fn parse_json(value: &[u8], kind: Kind, id: &str) -> Result<serde_json::Value, ObjectError> {
    serde_json::from_slice(value)
        .map_err(|e| ObjectError::new(kind, id, format!("invalid JSON: {e}")))
}

/// Parses an object whose key ends in its id; a JSON `id` (or `name`) must match the key.
pub(crate) fn parse_object<T: ConfigObject>(value: &[u8], id: &str) -> Result<T, ObjectError> {
    let mut json = parse_json(value, T::KIND, id)?;
    with_key_id(T::KIND, &mut json, id)?;
    crate::config::parse(&json).map_err(|errors| ObjectError::fields(T::KIND, id, errors))
}

/// Puts the key's id into `json`, an object of `kind`, when it has none; refuses one that
/// differs.
fn with_key_id(kind: Kind, json: &mut serde_json::Value, id: &str) -> Result<(), ObjectError> {
    let id_field = kind.info().id_field().expect("a kind named by a field");
    let error = |path: &str, message: String| {
        ObjectError::fields(
            kind,
            id,
            vec![FieldError {
                path: path.to_owned(),
                message,
            }],
        )
    };
    if id.is_empty() || id.contains('/') {
        return Err(error(
            "",
            format!("a {kind} key must end in one id segment"),
        ));
    }
    let object = json
        .as_object_mut()
        .ok_or_else(|| error("", "the value must be a JSON object".into()))?;
    match object.get(id_field).map(|v| v.as_str()) {
        None => {
            object.insert(
                id_field.to_owned(),
                serde_json::Value::String(id.to_owned()),
            );
        }
        Some(Some(inner)) if inner == id => {}
        Some(inner) => {
            return Err(error(
                &format!("/{id_field}"),
                format!("its {id_field} {inner:?} does not match the key's {id:?}"),
            ));
        }
    }
    Ok(())
}

/// A module's manifest, at `modules/<sha256>`.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ModuleManifest {
    pub(crate) size: u64,
    pub(crate) chunks: u64,
}

impl ModuleManifest {
    /// Parses a manifest and checks that it describes a module of at most `max` bytes in
    /// chunks of [`CHUNK_BYTES`], before anything is read or allocated for it.
    pub(crate) fn parse(value: &[u8], max: u64) -> Result<Self, String> {
        let manifest: ModuleManifest =
            serde_json::from_slice(value).map_err(|e| format!("bad manifest: {e}"))?;
        if manifest.size > max {
            return Err(format!(
                "the module is {} bytes, over the {max}-byte bound (--max-module-mb)",
                manifest.size
            ));
        }
        let expected = manifest.size.div_ceil(CHUNK_BYTES as u64).max(1);
        if manifest.chunks != expected {
            return Err(format!(
                "a {}-byte module has {expected} chunks, not {}",
                manifest.size, manifest.chunks
            ));
        }
        Ok(manifest)
    }
}

/// Reads a file of at most `max` bytes.
pub(crate) async fn read_bounded(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let file = tokio::fs::File::open(path).await?;
    let mut bytes = Vec::new();
    file.take(max + 1).read_to_end(&mut bytes).await?;
    if bytes.len() as u64 > max {
        return Err(std::io::Error::other(format!(
            "{} is over {max} bytes",
            path.display()
        )));
    }
    Ok(bytes)
}

pub(crate) fn chunk_key(root: &str, sha256: &str, index: usize) -> String {
    format!("{root}/modules/{sha256}/{index:06}")
}

/// Reads a module's chunks and checks them against its sha256; `max` bounds its size.
pub(crate) async fn read_module(
    client: &mut Client,
    root: &str,
    sha256: &str,
    max: u64,
) -> Result<Vec<u8>, EtcdError> {
    let manifest_key = format!("{root}/modules/{sha256}");
    let layout = |reason: String| EtcdError::Layout {
        key: manifest_key.clone(),
        reason,
    };
    let client_err = |source| EtcdError::Client {
        endpoints: "etcd".into(),
        source,
    };
    let response = client
        .get(manifest_key.clone(), None)
        .await
        .map_err(client_err)?;
    let kv = response
        .kvs()
        .first()
        .ok_or_else(|| layout("no such module (push it with `weir plugin push`)".into()))?;
    let manifest = ModuleManifest::parse(kv.value(), max).map_err(layout)?;
    let size = usize::try_from(manifest.size).map_err(|_| layout("size overflows".into()))?;
    let mut bytes = Vec::with_capacity(size);
    for index in 0..manifest.chunks {
        let key = chunk_key(root, sha256, index as usize);
        let response = client.get(key.clone(), None).await.map_err(client_err)?;
        let chunk = response
            .kvs()
            .first()
            .ok_or_else(|| layout(format!("chunk {key} is missing")))?;
        if bytes.len() + chunk.value().len() > size {
            return Err(layout(format!(
                "the chunks hold more than the manifest's {size} bytes"
            )));
        }
        bytes.extend_from_slice(chunk.value());
    }
    let actual = sha256_hex(&bytes);
    if bytes.len() != size || actual != sha256 {
        return Err(layout(format!(
            "the chunks hold {} bytes with sha256 {actual}, not {} bytes with sha256 {sha256}",
            bytes.len(),
            manifest.size
        )));
    }
    Ok(bytes)
}
