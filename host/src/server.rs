//! Starting and stopping a gateway: listeners, connection handling, and the config store task.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::access_log::AccessLogTarget;
use crate::admin;
use crate::gateway::{Gateway, GatewayInitError};
use crate::proxy::{self, ResponseBody};
use crate::store::etcd::{EtcdOptions, EtcdStore};
use crate::store::file::FileStore;
use crate::store::{ConfigStore, StoreError};

/// How long shutdown waits for open connections to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the config comes from.
#[derive(Clone, Debug)]
pub enum ConfigSource {
    /// A YAML file, watched for changes.
    File(PathBuf),
    /// etcd, watched for changes.
    Etcd(EtcdOptions),
}

/// What `weir run` needs to start a gateway.
#[derive(Clone, Debug)]
pub struct GatewayOptions {
    /// The config store.
    pub config: ConfigSource,
    /// The proxy listener's address.
    pub listen: SocketAddr,
    /// The admin listener's address (metrics, status), if any.
    pub admin_listen: Option<SocketAddr>,
    /// Where access-log lines go.
    pub access_log: AccessLogTarget,
    /// Where compiled plugin modules are kept, so that a restart does not compile them again.
    pub module_cache: Option<PathBuf>,
}

/// Why a gateway did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not bind.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The config could not be read at all.
    #[error(transparent)]
    Config(#[from] StoreError),
    /// The gateway's state could not be created.
    #[error(transparent)]
    Init(#[from] GatewayInitError),
}

/// A gateway that is serving; drop it or call [`RunningGateway::shutdown`] to stop.
pub struct RunningGateway {
    /// The proxy listener's address (useful with port 0).
    pub addr: SocketAddr,
    /// The admin listener's address.
    pub admin_addr: Option<SocketAddr>,
    gateway: Arc<Gateway>,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningGateway {
    /// The gateway's shared state.
    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gateway
    }

    /// Stops accepting, lets open connections finish (up to 10 s), and stops the config watch.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
    }

    /// Waits until the gateway stops (it stops only through [`RunningGateway::shutdown`] or a
    /// signal handled by the caller).
    pub async fn stopped(&self) {
        self.shutdown.cancelled().await;
    }

    /// A token that stops the gateway when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}

impl Drop for RunningGateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Loads the config, binds the listeners and starts serving.
pub async fn start(options: GatewayOptions) -> Result<RunningGateway, StartError> {
    let gateway = Gateway::new(&options.access_log, options.module_cache.clone())?;
    let shutdown = CancellationToken::new();
    let mut tasks = Vec::new();

    let store: Arc<dyn ConfigStore> = match &options.config {
        ConfigSource::File(path) => Arc::new(FileStore::new(path.clone())),
        ConfigSource::Etcd(etcd) => Arc::new(EtcdStore::new(etcd.clone())),
    };
    store.clone().load(gateway.clone()).await?;
    tasks.push(tokio::spawn(store.watch(gateway.clone(), shutdown.clone())));

    let listener = bind(options.listen).await?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: options.listen,
        source,
    })?;
    let proxy_gateway = gateway.clone();
    tasks.push(tokio::spawn(serve(
        listener,
        shutdown.clone(),
        move |request, client| proxy::handle(proxy_gateway.clone(), request, client),
    )));

    let mut admin_addr = None;
    if let Some(listen) = options.admin_listen {
        let listener = bind(listen).await?;
        admin_addr = Some(listener.local_addr().map_err(|source| StartError::Bind {
            addr: listen,
            source,
        })?);
        let admin_gateway = gateway.clone();
        tasks.push(tokio::spawn(serve(
            listener,
            shutdown.clone(),
            move |request, _| admin::handle(admin_gateway.clone(), request),
        )));
    }
    tracing::info!(%addr, admin = ?admin_addr, "weir is serving");
    Ok(RunningGateway {
        addr,
        admin_addr,
        gateway,
        shutdown,
        tasks,
    })
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })
}

/// Accepts connections until `shutdown`, serving HTTP/1.1 and HTTP/2 on each, then drains them.
async fn serve<H, F>(listener: TcpListener, shutdown: CancellationToken, handler: H)
where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ResponseBody>> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let service = service_fn(move |request| {
            // Boxed once here, so that hyper moves a pointer rather than the whole request future.
            let response = Box::pin(handler(request, peer));
            async move { Ok::<_, Infallible>(response.await) }
        });
        let connection = auto::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the drain timeout");
    }
}
