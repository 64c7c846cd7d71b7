//! Why a config store could not be used: the file's errors and the store's one error type,
//! below every store.

use std::path::PathBuf;

use super::etcd::error::EtcdError;

/// Why a store could not load its config at start-up.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The YAML file.
    #[error(transparent)]
    File(#[from] FileStoreError),
    /// etcd.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
}

/// Why the file as a whole could not be used; the previous config keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum FileStoreError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not YAML, or not the expected shape.
    #[error("config file {path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}
