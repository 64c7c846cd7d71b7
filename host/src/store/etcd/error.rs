//! Why an etcd operation failed: the store's one error type, below everything that reads or
//! writes etcd.

use std::path::PathBuf;

/// Why an etcd operation failed.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// etcd could not be reached, or refused the request.
    #[error("etcd at {endpoints}: {source}")]
    Client {
        /// The endpoints tried.
        endpoints: String,
        /// What the client said.
        source: etcd_client::Error,
    },
    /// etcd is unreachable and there is no saved state to serve from.
    #[error("cannot reach etcd at {endpoints} ({reason}), and no saved state is in --state-dir")]
    Unreachable {
        /// The endpoints tried.
        endpoints: String,
        /// Why.
        reason: String,
    },
    /// etcd is unreachable, and the saved state is there but another user could have written
    /// or read it.
    #[error(
        "cannot reach etcd at {endpoints} ({reason}), and the saved state in --state-dir is not \
         used: {refused}"
    )]
    UntrustedState {
        /// The endpoints tried.
        endpoints: String,
        /// Why etcd could not be reached.
        reason: String,
        /// Why the saved state is not used.
        refused: String,
    },
    /// A stored value is not what the layout says.
    #[error("{key}: {reason}")]
    Layout {
        /// The key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// The `--state-dir` could not be written or read.
    #[error("state dir {path}: {source}")]
    State {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}
