//! `weir plugin push`: a module's bytes into etcd, and a plugin entry pointing at them.

use etcd_client::{Compare, CompareOp, Txn, TxnOp};

use crate::config::PluginConfig;
use crate::digest::sha256_hex;
use crate::store::etcd::keys::{CHUNK_BYTES, parse_object};
use crate::store::etcd::writer::{manifest, store_chunks};
use crate::store::etcd::{EtcdError, EtcdOptions, client_error, connect};

/// Settings for `weir plugin push`; unset ones keep the existing entry's value.
#[derive(Clone, Debug, Default)]
pub struct PushSettings {
    /// `limits.memory_mb`.
    pub memory_mb: Option<u32>,
    /// `limits.timeout_ms`.
    pub timeout_ms: Option<u64>,
    /// `limits.max_body_bytes`.
    pub max_body_bytes: Option<u64>,
    /// `failure`.
    pub failure: Option<crate::config::FailurePolicy>,
    /// `grants`, replacing the entry's.
    pub grants: Option<crate::config::Grants>,
    /// `signature`: the module's, made with `--sign KEY`.
    pub signature: Option<crate::plugin::signature::ModuleSignature>,
}

/// What `weir plugin push` did.
#[derive(Debug)]
pub struct Pushed {
    /// The module's sha256.
    pub sha256: String,
    /// Its size in bytes.
    pub size: usize,
    /// How many chunks it has.
    pub chunks: usize,
    /// Whether the module was already stored (only the entry changed).
    pub already_stored: bool,
    /// The plugin entry as written.
    pub entry: PluginConfig,
}

impl std::fmt::Display for Pushed {
    /// What `weir plugin push` prints: what was stored, then the entry as written.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let stored = if self.already_stored {
            "already stored"
        } else {
            "stored"
        };
        writeln!(
            f,
            "plugin {} -> sha256 {} ({} bytes in {} chunks, {stored})",
            self.entry.name, self.sha256, self.size, self.chunks
        )?;
        write!(
            f,
            "{}",
            serde_json::to_string(&self.entry).expect("an entry serializes")
        )
    }
}

/// Stores a module's bytes (unless already stored), then in one transaction writes its
/// manifest and points plugin `name` at it, keeping the entry's other settings.
pub async fn push_plugin(
    options: &EtcdOptions,
    name: &str,
    bytes: &[u8],
    settings: &PushSettings,
) -> Result<Pushed, EtcdError> {
    let root = options.root();
    let sha256 = sha256_hex(bytes);
    let manifest_key = format!("{root}/modules/{sha256}");
    let entry_key = format!("{root}/plugins/{name}");
    if bytes.len() as u64 > options.max_module_bytes {
        // Gateways would refuse it: say so before storing it.
        return Err(EtcdError::Layout {
            key: manifest_key,
            reason: format!(
                "the module is {} bytes, over the {}-byte bound (--max-module-mb)",
                bytes.len(),
                options.max_module_bytes
            ),
        });
    }
    let mut client = connect(options).await?;
    let client_err = |source| client_error(options, source);
    let chunks = bytes.len().div_ceil(CHUNK_BYTES).max(1);

    let already_stored = store_chunks(&mut client, &root, &sha256, bytes)
        .await
        .map_err(client_err)?;

    let existing = client
        .get(entry_key.clone(), None)
        .await
        .map_err(client_err)?;
    let (mut entry, compare) = match existing.kvs().first() {
        Some(kv) => {
            let entry: PluginConfig =
                parse_object(kv.value(), name).map_err(|e| EtcdError::Layout {
                    key: entry_key.clone(),
                    reason: e.reason,
                })?;
            (
                entry,
                Compare::mod_revision(entry_key.clone(), CompareOp::Equal, kv.mod_revision()),
            )
        }
        None => (
            PluginConfig {
                name: name.to_owned(),
                module: None,
                sha256: None,
                limits: Default::default(),
                failure: Default::default(),
                isolation: Default::default(),
                grants: Default::default(),
                tenant: None,
                quarantine: Default::default(),
                signature: None,
                kv: Default::default(),
                root_id: None,
                vm_config: None,
            },
            Compare::version(entry_key.clone(), CompareOp::Equal, 0),
        ),
    };
    entry.module = None;
    entry.sha256 = Some(sha256.clone());
    // A signature is of one module's bytes: a new one replaces it, and other bytes drop it.
    if settings.signature.is_some() {
        entry.signature = settings.signature.clone();
    } else if entry.signature.as_ref().is_some_and(|s| s.sha256 != sha256) {
        entry.signature = None;
    }
    if let Some(memory_mb) = settings.memory_mb {
        entry.limits.memory_mb = memory_mb;
    }
    if let Some(timeout_ms) = settings.timeout_ms {
        entry.limits.timeout_ms = timeout_ms;
    }
    if let Some(max_body_bytes) = settings.max_body_bytes {
        entry.limits.max_body_bytes = max_body_bytes;
    }
    if let Some(failure) = settings.failure {
        entry.failure = failure;
    }
    if let Some(grants) = &settings.grants {
        entry.grants = grants.clone();
    }
    crate::config::verify(&entry).map_err(|errors| EtcdError::Layout {
        key: entry_key.clone(),
        reason: crate::config::describe(&errors),
    })?;
    let manifest = manifest(bytes.len());
    let txn = Txn::new().when([compare]).and_then([
        TxnOp::put(manifest_key, manifest, None),
        TxnOp::put(
            entry_key.clone(),
            serde_json::to_vec(&entry).expect("an entry serializes"),
            None,
        ),
    ]);
    let response = client.txn(txn).await.map_err(client_err)?;
    if !response.succeeded() {
        return Err(EtcdError::Layout {
            key: entry_key,
            reason: "the entry changed while pushing; run the push again".into(),
        });
    }
    Ok(Pushed {
        sha256,
        size: bytes.len(),
        chunks,
        already_stored,
        entry,
    })
}
