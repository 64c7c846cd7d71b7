//! `weir register`: a backend under `services/<name>/<node>`, kept alive by a lease.

use std::time::Duration;

use etcd_client::PutOptions;
use tokio_util::sync::CancellationToken;

use crate::config::ServiceNode;
use crate::store::etcd::{BACKOFF_MAX, BACKOFF_MIN, EtcdError, EtcdOptions, client_error, connect};

/// Registers a backend under `services/<service>/<node_id>` with a lease, and keeps the lease
/// alive until `shutdown`, when it is revoked (so the node leaves at once). When etcd goes away
/// it registers again once etcd is back.
pub async fn register(
    options: &EtcdOptions,
    service: &str,
    node_id: &str,
    node: &ServiceNode,
    ttl_secs: i64,
    shutdown: CancellationToken,
) -> Result<(), EtcdError> {
    crate::config::verify(node).map_err(|errors| EtcdError::Layout {
        key: format!("services/{service}/{node_id}"),
        reason: crate::config::describe(&errors),
    })?;
    let key = format!("{}/services/{service}/{node_id}", options.root());
    let value = serde_json::to_vec(node).expect("a node serializes");
    let mut backoff = BACKOFF_MIN;
    loop {
        let outcome = keep_registered(options, &key, &value, ttl_secs, &shutdown).await;
        match outcome {
            Ok(()) => return Ok(()),
            Err(error) => {
                tracing::warn!(%error, retry_in = ?backoff, "registration lost; registering again");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

async fn keep_registered(
    options: &EtcdOptions,
    key: &str,
    value: &[u8],
    ttl_secs: i64,
    shutdown: &CancellationToken,
) -> Result<(), EtcdError> {
    let client_err = |source| client_error(options, source);
    let mut client = connect(options).await?;
    let lease = client
        .lease_grant(ttl_secs, None)
        .await
        .map_err(client_err)?
        .id();
    client
        .put(key, value, Some(PutOptions::new().with_lease(lease)))
        .await
        .map_err(client_err)?;
    tracing::info!(key, lease, ttl_secs, "registered");
    let (mut keeper, mut responses) = client.lease_keep_alive(lease).await.map_err(client_err)?;
    let interval = Duration::from_millis((ttl_secs.max(1) as u64 * 1000) / 3);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = client.lease_revoke(lease).await;
                tracing::info!(key, "deregistered");
                return Ok(());
            }
            _ = tokio::time::sleep(interval) => {}
        }
        keeper.keep_alive().await.map_err(client_err)?;
        match responses.message().await.map_err(client_err)? {
            Some(response) if response.ttl() > 0 => {}
            _ => {
                return Err(EtcdError::Layout {
                    key: key.to_owned(),
                    reason: "the lease expired".into(),
                });
            }
        }
    }
}
