//! The etcd store's write side: each object at its key, written with a compare on its
//! revision so that two writers cannot overwrite each other unseen.

use etcd_client::{Client, Compare, CompareOp, DeleteOptions, GetOptions, Txn, TxnOp};

use super::EtcdStore;
use super::keys::{CHUNK_BYTES, ModuleManifest, chunk_key};
use crate::config::{Kind, Layout};
use crate::digest::sha256_hex;
use crate::snapshot::BoxFuture;
use crate::store::{ConfigWriter, Expect, StoredModule, StoredObject, WriteError};

/// The largest value written, well under etcd's default 1.5 MiB request limit.
const MAX_VALUE_BYTES: usize = 1 << 20;

impl EtcdStore {
    /// The key of `kind`/`id`, or why there is none.
    fn key_of(&self, kind: Kind, id: &str) -> Result<String, WriteError> {
        let root = &self.root;
        let info = kind.info();
        match (info.layout, info.key) {
            (Layout::Single, Some(key)) => Ok(format!("{root}/{key}")),
            (Layout::Keyed(_) | Layout::Nested, Some(key)) => Ok(format!("{root}/{key}/{id}")),
            _ => Err(WriteError::Unavailable("not a kind of object".into())),
        }
    }

    /// A connected client, or `Unavailable`.
    fn writing_client(&self) -> Result<Client, WriteError> {
        self.client()
            .ok_or_else(|| WriteError::Unavailable("etcd is unreachable".into()))
    }
}

fn unavailable(error: etcd_client::Error) -> WriteError {
    tracing::warn!(%error, "an admin write could not reach etcd");
    WriteError::Unavailable("etcd did not answer".into())
}

/// The stored object at `kv`, named `id`.
fn stored(id: String, kv: &etcd_client::KeyValue) -> StoredObject {
    let value = serde_json::from_slice(kv.value())
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(kv.value()).into()));
    StoredObject {
        id,
        value,
        revision: kv.mod_revision(),
        created: kv.create_revision(),
    }
}

/// The compare that `expect` asks for on `key`.
fn compare(key: &str, expect: Expect) -> Option<Compare> {
    match expect {
        Expect::Anything => None,
        Expect::Absent => Some(Compare::version(key, CompareOp::Equal, 0)),
        Expect::Revision(revision) => Some(Compare::mod_revision(key, CompareOp::Equal, revision)),
    }
}

impl EtcdStore {
    /// The keys under `prefix`, each with what follows the prefix, with their values unless
    /// `keys_only`.
    async fn keys_under(
        &self,
        prefix: &str,
        keys_only: bool,
    ) -> Result<Vec<(String, etcd_client::KeyValue)>, WriteError> {
        let mut client = self.writing_client()?;
        let mut options = GetOptions::new().with_prefix();
        if keys_only {
            options = options.with_keys_only();
        }
        let response = client
            .get(prefix, Some(options))
            .await
            .map_err(unavailable)?;
        Ok(response
            .kvs()
            .iter()
            .filter_map(|kv| {
                let rest = std::str::from_utf8(kv.key()).ok()?.strip_prefix(prefix)?;
                Some((rest.to_owned(), kv.clone()))
            })
            .collect())
    }

    /// Runs `op` on `key` if `expect` holds; returns the revision it was written at.
    async fn write_if(&self, key: String, op: TxnOp, expect: Expect) -> Result<i64, WriteError> {
        let mut client = self.writing_client()?;
        let txn = Txn::new()
            .when(compare(&key, expect).into_iter().collect::<Vec<_>>())
            .and_then([op])
            .or_else([TxnOp::get(key, None)]);
        let response = client.txn(txn).await.map_err(unavailable)?;
        let revision = response.header().map(|h| h.revision()).unwrap_or_default();
        if response.succeeded() {
            return Ok(revision);
        }
        let current = response.op_responses().into_iter().find_map(|op| match op {
            etcd_client::TxnOpResponse::Get(get) => get.kvs().first().map(|kv| kv.mod_revision()),
            _ => None,
        });
        Err(WriteError::Conflict { current })
    }
}

impl ConfigWriter for EtcdStore {
    fn get<'a>(
        &'a self,
        kind: Kind,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<StoredObject>, WriteError>> {
        Box::pin(async move {
            let key = self.key_of(kind, id)?;
            let mut client = self.writing_client()?;
            let response = client.get(key, None).await.map_err(unavailable)?;
            Ok(response.kvs().first().map(|kv| stored(id.to_owned(), kv)))
        })
    }

    fn list(&self, kind: Kind) -> BoxFuture<'_, Result<Vec<StoredObject>, WriteError>> {
        Box::pin(async move {
            let mut client = self.writing_client()?;
            let key = self.key_of(kind, "")?;
            if kind.info().layout == Layout::Single {
                let response = client.get(key, None).await.map_err(unavailable)?;
                // The one object is named after its key.
                let id = kind.info().key.unwrap_or_default();
                return Ok(response
                    .kvs()
                    .first()
                    .map(|kv| stored(id.into(), kv))
                    .into_iter()
                    .collect());
            }
            let prefix = key;
            Ok(self
                .keys_under(&prefix, false)
                .await?
                .into_iter()
                .map(|(id, kv)| stored(id, &kv))
                .collect())
        })
    }

    fn put<'a>(
        &'a self,
        kind: Kind,
        id: &'a str,
        value: &'a serde_json::Value,
        expect: Expect,
    ) -> BoxFuture<'a, Result<i64, WriteError>> {
        Box::pin(async move {
            let key = self.key_of(kind, id)?;
            let bytes = serde_json::to_vec(value).expect("JSON serializes");
            if bytes.len() > MAX_VALUE_BYTES {
                return Err(WriteError::TooLarge(format!(
                    "the object is {} bytes, over the {MAX_VALUE_BYTES}-byte bound",
                    bytes.len()
                )));
            }
            self.write_if(key.clone(), TxnOp::put(key, bytes, None), expect)
                .await
        })
    }

    fn claim_generated_key<'a>(
        &'a self,
        hash: &'a str,
    ) -> BoxFuture<'a, Result<String, WriteError>> {
        Box::pin(async move {
            let key = format!("{}/{}", self.root, super::keys::GENERATED_KEY);
            match self
                .write_if(
                    key.clone(),
                    TxnOp::put(key.clone(), hash, None),
                    Expect::Absent,
                )
                .await
            {
                Ok(_) => Ok(hash.to_owned()),
                Err(WriteError::Conflict { .. }) => {
                    let mut client = self.writing_client()?;
                    let response = client.get(key, None).await.map_err(unavailable)?;
                    let kept = response
                        .kvs()
                        .first()
                        .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
                        .unwrap_or_default();
                    Ok(kept)
                }
                Err(other) => Err(other),
            }
        })
    }

    fn session_keys(&self) -> BoxFuture<'_, Result<Option<(String, i64)>, WriteError>> {
        Box::pin(async move {
            let key = format!("{}/{}", self.root, super::keys::SESSION_KEYS);
            let mut client = self.writing_client()?;
            let response = client.get(key, None).await.map_err(unavailable)?;
            Ok(response.kvs().first().map(|kv| {
                (
                    String::from_utf8_lossy(kv.value()).into_owned(),
                    kv.mod_revision(),
                )
            }))
        })
    }

    fn put_session_keys<'a>(
        &'a self,
        document: &'a str,
        expect: Expect,
    ) -> BoxFuture<'a, Result<i64, WriteError>> {
        Box::pin(async move {
            let key = format!("{}/{}", self.root, super::keys::SESSION_KEYS);
            self.write_if(key.clone(), TxnOp::put(key, document, None), expect)
                .await
        })
    }

    fn revoke_session<'a>(
        &'a self,
        nonce: &'a str,
        ttl_secs: u64,
    ) -> BoxFuture<'a, Result<(), WriteError>> {
        Box::pin(async move {
            let mut client = self.writing_client()?;
            // The lease takes the record away once the session would have expired anyway.
            let ttl = i64::try_from(ttl_secs.max(1)).unwrap_or(i64::MAX);
            let lease = client.lease_grant(ttl, None).await.map_err(unavailable)?;
            let key = format!("{}/{}/{nonce}", self.root, super::keys::REVOKED_SESSIONS);
            client
                .put(
                    key,
                    "revoked",
                    Some(etcd_client::PutOptions::new().with_lease(lease.id())),
                )
                .await
                .map_err(unavailable)?;
            Ok(())
        })
    }

    fn session_revoked<'a>(&'a self, nonce: &'a str) -> BoxFuture<'a, Result<bool, WriteError>> {
        Box::pin(async move {
            let mut client = self.writing_client()?;
            let key = format!("{}/{}/{nonce}", self.root, super::keys::REVOKED_SESSIONS);
            let response = client
                .get(key, Some(GetOptions::new().with_count_only()))
                .await
                .map_err(unavailable)?;
            Ok(response.count() > 0)
        })
    }

    fn modules(&self) -> BoxFuture<'_, Result<Vec<StoredModule>, WriteError>> {
        Box::pin(async move {
            // Keys only: the values under this prefix are every module's bytes.
            let names = self
                .keys_under(&format!("{}/modules/", self.root), true)
                .await?;
            let mut modules = Vec::new();
            // Chunks sit under their manifest's key; only manifests name modules.
            for (sha256, _) in names.iter().filter(|(name, _)| !name.contains('/')) {
                if let Some(module) = self.module(sha256).await? {
                    modules.push(module);
                }
            }
            Ok(modules)
        })
    }

    fn module<'a>(
        &'a self,
        sha256: &'a str,
    ) -> BoxFuture<'a, Result<Option<StoredModule>, WriteError>> {
        Box::pin(async move {
            let mut client = self.writing_client()?;
            let response = client
                .get(format!("{}/modules/{sha256}", self.root), None)
                .await
                .map_err(unavailable)?;
            Ok(response.kvs().first().and_then(|kv| {
                let manifest = ModuleManifest::parse(kv.value(), u64::MAX).ok()?;
                Some(StoredModule {
                    sha256: sha256.to_owned(),
                    size: manifest.size,
                    already_stored: true,
                })
            }))
        })
    }

    fn store_module<'a>(
        &'a self,
        bytes: &'a [u8],
    ) -> BoxFuture<'a, Result<StoredModule, WriteError>> {
        Box::pin(async move {
            let max = self.options.max_module_bytes;
            if bytes.len() as u64 > max {
                return Err(WriteError::TooLarge(format!(
                    "the module is {} bytes, over the {max}-byte bound (--max-module-mb)",
                    bytes.len()
                )));
            }
            let mut client = self.writing_client()?;
            let sha256 = sha256_hex(bytes);
            let already_stored = store_chunks(&mut client, &self.root, &sha256, bytes)
                .await
                .map_err(unavailable)?;
            if !already_stored {
                let manifest = manifest(bytes.len());
                client
                    .put(format!("{}/modules/{sha256}", self.root), manifest, None)
                    .await
                    .map_err(unavailable)?;
            }
            Ok(StoredModule {
                sha256,
                size: bytes.len() as u64,
                already_stored,
            })
        })
    }

    fn delete_module<'a>(&'a self, sha256: &'a str) -> BoxFuture<'a, Result<bool, WriteError>> {
        Box::pin(async move {
            let mut client = self.writing_client()?;
            let key = format!("{}/modules/{sha256}", self.root);
            // The manifest first: without it the chunks are invisible, so a crash in between
            // leaves garbage, never a half module.
            let manifest = client
                .delete(key.clone(), None)
                .await
                .map_err(unavailable)?;
            client
                .delete(format!("{key}/"), Some(DeleteOptions::new().with_prefix()))
                .await
                .map_err(unavailable)?;
            Ok(manifest.deleted() > 0)
        })
    }

    fn delete<'a>(
        &'a self,
        kind: Kind,
        id: &'a str,
        expect: Expect,
    ) -> BoxFuture<'a, Result<i64, WriteError>> {
        Box::pin(async move {
            let key = self.key_of(kind, id)?;
            self.write_if(key.clone(), TxnOp::delete(key, None), expect)
                .await
        })
    }
}

/// Writes a module's chunks unless its manifest is already stored; returns whether it was.
/// Each chunk is its own request: a transaction holding them all would pass etcd's request
/// limit. The manifest, written after, is what makes the module visible.
pub(crate) async fn store_chunks(
    client: &mut Client,
    root: &str,
    sha256: &str,
    bytes: &[u8],
) -> Result<bool, etcd_client::Error> {
    let stored = client.get(format!("{root}/modules/{sha256}"), None).await?;
    if !stored.kvs().is_empty() {
        return Ok(true);
    }
    for (index, chunk) in bytes.chunks(CHUNK_BYTES).enumerate() {
        client
            .put(chunk_key(root, sha256, index), chunk, None)
            .await?;
    }
    Ok(false)
}

/// The manifest of a module of `size` bytes.
pub(crate) fn manifest(size: usize) -> Vec<u8> {
    serde_json::to_vec(&ModuleManifest {
        size: size as u64,
        chunks: size.div_ceil(CHUNK_BYTES).max(1) as u64,
    })
    .expect("a manifest serializes")
}
