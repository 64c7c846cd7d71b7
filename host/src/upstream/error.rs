//! Why an upstream gave no response, and what each failure means for the balancer and for
//! retries.

use super::balancer::Outcome;
use crate::config::RetryOn;

/// Why the upstream gave no response. The texts name nodes and OS errors: they go to the log,
/// never to the client.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Every node that was tried refused or failed the connection.
    #[error("could not connect to {node}: {reason}")]
    Connect {
        /// The last node tried.
        node: String,
        /// Why.
        reason: String,
    },
    /// The connection attempt to the last node tried timed out.
    #[error("connecting to {node} timed out after {ms} ms")]
    ConnectTimeout {
        /// The last node tried.
        node: String,
        /// The connect timeout.
        ms: u64,
    },
    /// The node stopped reading the request.
    #[error("{node} stopped reading the request for {ms} ms")]
    SendTimeout {
        /// The node.
        node: String,
        /// The send timeout.
        ms: u64,
    },
    /// The node did not send response headers in time.
    #[error("{node} did not answer within {ms} ms")]
    Timeout {
        /// The node.
        node: String,
        /// The read timeout.
        ms: u64,
    },
    /// The exchange failed after the request was sent.
    #[error("{node} failed: {reason}")]
    Failed {
        /// The node.
        node: String,
        /// Why.
        reason: String,
    },
    /// The client's request body failed on its way to the node.
    #[error("the request body failed on its way to {node}: {reason}")]
    RequestBody {
        /// The node.
        node: String,
        /// Whether the client stopped sending (rather than going away).
        stalled: bool,
        /// Why.
        reason: String,
        /// A plugin's chunk hook refused the body with this answer for the client.
        refused: Option<Box<crate::plugin::Reply>>,
    },
    /// No node can be selected.
    #[error("no node is available")]
    NoNodes,
    /// Every candidate node had `max_connections` requests in flight for `queue_ms`.
    #[error("every node of {upstream} stayed at max_connections for {ms} ms")]
    Saturated {
        /// The upstream.
        upstream: String,
        /// The queue timeout.
        ms: u64,
    },
}

impl UpstreamError {
    /// The failure's kind, with no node or OS detail in it: what a span's `error.type` says.
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::Connect { .. } => "connect",
            UpstreamError::ConnectTimeout { .. } => "connect_timeout",
            UpstreamError::SendTimeout { .. } => "send_timeout",
            UpstreamError::Timeout { .. } => "read_timeout",
            UpstreamError::Failed { .. } => "failed",
            UpstreamError::NoNodes => "no_nodes",
            UpstreamError::RequestBody { .. } => "request_body",
            UpstreamError::Saturated { .. } => "saturated",
        }
    }

    /// How the failure counts against its node, for passive health checks.
    pub(super) fn outcome(&self) -> Outcome {
        match self {
            UpstreamError::Connect { .. } | UpstreamError::Failed { .. } => Outcome::Failure,
            UpstreamError::ConnectTimeout { .. }
            | UpstreamError::Timeout { .. }
            | UpstreamError::SendTimeout { .. } => Outcome::Timeout,
            UpstreamError::NoNodes
            | UpstreamError::RequestBody { .. }
            | UpstreamError::Saturated { .. } => Outcome::Neither,
        }
    }

    /// What `retry_on` calls this failure, if it names it at all.
    pub(super) fn retry_on(&self) -> Option<RetryOn> {
        match self {
            UpstreamError::Connect { .. } | UpstreamError::ConnectTimeout { .. } => {
                Some(RetryOn::ConnectFailure)
            }
            UpstreamError::Timeout { .. } => Some(RetryOn::Timeout),
            UpstreamError::Failed { .. } => Some(RetryOn::Reset),
            // A send timeout means the node is not reading: the body may be half gone.
            UpstreamError::SendTimeout { .. }
            | UpstreamError::NoNodes
            | UpstreamError::RequestBody { .. }
            | UpstreamError::Saturated { .. } => None,
        }
    }

    /// Whether the client should get 504 rather than 502.
    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            UpstreamError::Timeout { .. }
                | UpstreamError::ConnectTimeout { .. }
                | UpstreamError::SendTimeout { .. }
        )
    }
}

/// `error` and its sources, as one line.
pub(super) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}
