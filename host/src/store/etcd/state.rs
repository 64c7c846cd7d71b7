//! `--state-dir`: the last config read from etcd and its modules, kept so that a gateway can
//! start while etcd is down.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::EtcdError;

/// The file in `--state-dir` that holds the last config read.
pub(crate) const STATE_FILE: &str = "etcd-state.json";

/// What `--state-dir` keeps: the raw config keys at a revision.
#[derive(Serialize, Deserialize)]
pub(crate) struct SavedState {
    pub(crate) revision: i64,
    pub(crate) keys: BTreeMap<String, String>,
}

pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), EtcdError> {
    let io = |source| EtcdError::State {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let staging = path.with_extension("tmp");
    std::fs::write(&staging, bytes).map_err(io)?;
    std::fs::rename(&staging, path).map_err(io)
}
