//! `--state-dir`: the last config read from etcd and its modules, kept so that a gateway can
//! start while etcd is down.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::error::EtcdError;

/// The file in `--state-dir` that holds the last config read.
pub(crate) const STATE_FILE: &str = "etcd-state.json";

/// What `--state-dir` keeps: the raw config keys at a revision.
#[derive(Serialize, Deserialize)]
pub(crate) struct SavedState {
    pub(crate) revision: i64,
    pub(crate) keys: BTreeMap<String, String>,
}

/// Writes a `--state-dir` file as the gateway's own: 0600, in a folder closed to others.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), EtcdError> {
    crate::private_file::write(path, bytes).map_err(|source| EtcdError::State {
        path: path.to_owned(),
        source,
    })
}

/// Reads the saved state, if there is one: `Ok(None)` when there is none, an error when the
/// file is there but someone else could have written or read it.
pub(crate) fn read_state(path: &Path) -> std::io::Result<Option<Vec<u8>>> {
    match crate::private_file::read(path, crate::private_file::Closed::ToEveryone, u64::MAX) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error),
    }
}
