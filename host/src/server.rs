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
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access_log::AccessLogTarget;
use crate::admin::{self, Admin, AdminOptions, AdminSetupError};
use crate::body::ResponseBody;
use crate::client_conn::{self, ClientConn, ConnCounts};
use crate::edge::Peer;
use crate::gateway::{Gateway, GatewayInitError};
use crate::metrics::{AcceptLabels, ListenerLabels};
use crate::proxy;
use crate::reconcile::Reconciler;
use crate::store::etcd::{EtcdOptions, EtcdStore};
use crate::store::file::FileStore;
use crate::store::{ConfigStore, StoreError};
use crate::timeouts::{ConnectionActivity, ReadClock, TimedIo, TimeoutCounters};
use crate::tls::{self, SniResolver};
use crate::workers::{self, Workers};
use tokio_rustls::TlsAcceptor;

/// How long [`RunningGateway::shutdown`] waits for open connections to finish.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// How a gateway stops on SIGTERM: it reports not-ready at once, keeps accepting for `delay`
/// (so that load balancers notice), then lets requests in flight finish for up to `timeout`.
#[derive(Clone, Copy, Debug)]
pub struct DrainOptions {
    /// How long the listener keeps accepting after the drain starts.
    pub delay: Duration,
    /// How long requests in flight (and pending `on-log` calls) may take to finish.
    pub timeout: Duration,
}

impl Default for DrainOptions {
    fn default() -> Self {
        DrainOptions {
            delay: Duration::ZERO,
            timeout: Duration::from_secs(30),
        }
    }
}

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
    /// The TLS proxy listener's address; when `None`, the config's `server.tls_listen`.
    pub tls_listen: Option<SocketAddr>,
    /// The admin listener's address (metrics, status), if any.
    pub admin_listen: Option<SocketAddr>,
    /// Where access-log lines go.
    pub access_log: AccessLogTarget,
    /// Where compiled plugin modules are kept, so that a restart does not compile them again.
    pub module_cache: Option<PathBuf>,
    /// The largest plugin module accepted from the store (for etcd, this replaces the
    /// options' own bound).
    pub max_module_bytes: u64,
    /// How the admin listener is protected.
    pub admin: AdminOptions,
    /// Worker threads for the proxy listeners, each with its own runtime and its own socket on
    /// the shared port. 0 or 1 serves on the caller's runtime.
    pub workers: usize,
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
    /// The admin listener would not be safe, or its settings are invalid.
    #[error(transparent)]
    Admin(#[from] AdminSetupError),
    /// A worker thread could not start.
    #[error("cannot start the worker threads: {0}")]
    Workers(std::io::Error),
}

/// A gateway that is serving; drop it, or call [`RunningGateway::shutdown`] or
/// [`RunningGateway::drain`], to stop.
pub struct RunningGateway {
    /// The proxy listener's address (useful with port 0).
    pub addr: SocketAddr,
    /// The TLS proxy listener's address, when there is one.
    pub tls_addr: Option<SocketAddr>,
    /// The admin listener's address.
    pub admin_addr: Option<SocketAddr>,
    /// The admin key weir generated at this start (no key was configured), to be shown once.
    pub generated_admin_key: Option<String>,
    gateway: Arc<Gateway>,
    /// Stops the proxy listeners (and then drains their connections).
    stop_accepting: CancellationToken,
    /// Stops everything else: the admin listener and the config watch.
    shutdown: CancellationToken,
    /// Sets how long the proxy listener waits for its connections once it stops.
    drain_timeout: Arc<std::sync::Mutex<Duration>>,
    /// The proxy listeners, plain and TLS (one of each per worker).
    proxies: Vec<JoinHandle<()>>,
    tasks: Vec<JoinHandle<()>>,
    /// The worker threads the proxy listeners run on, when there are workers; stopped last.
    workers: Option<Workers>,
}

impl RunningGateway {
    /// The gateway's shared state.
    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gateway
    }

    /// Stops accepting, lets open connections finish (up to 10 s), and stops the config watch.
    pub async fn shutdown(self) {
        self.drain(DrainOptions {
            delay: Duration::ZERO,
            timeout: SHUTDOWN_TIMEOUT,
        })
        .await;
    }

    /// Drains as on SIGTERM: `/readyz` answers 503 at once; the listener keeps accepting for
    /// `options.delay`, then closes; requests in flight and pending `on-log` calls get up to
    /// `options.timeout` to finish; then the access log is flushed and everything stops.
    pub async fn drain(mut self, options: DrainOptions) {
        self.gateway.start_draining();
        tracing::info!(delay = ?options.delay, timeout = ?options.timeout, "draining");
        tokio::time::sleep(options.delay).await;
        let deadline = tokio::time::Instant::now() + options.timeout;
        *self.drain_timeout.lock().expect("drain timeout lock") = options.timeout;
        self.stop_accepting.cancel();
        for proxy in self.proxies.drain(..) {
            let _ = proxy.await;
        }
        let on_log = self.gateway.pending_on_log();
        on_log.close();
        if tokio::time::timeout_at(deadline, on_log.wait())
            .await
            .is_err()
        {
            tracing::warn!("on-log calls still running after the drain timeout");
        }
        self.shutdown.cancel();
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
        self.workers.take();
        self.gateway.close_access_log();
        tracing::info!("drained");
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
        self.stop_accepting.cancel();
        self.shutdown.cancel();
    }
}

/// Loads the config, binds the listeners and starts serving.
pub async fn start(options: GatewayOptions) -> Result<RunningGateway, StartError> {
    let store_name = match &options.config {
        ConfigSource::File(_) => "file",
        ConfigSource::Etcd(_) => "etcd",
    };
    let gateway = Gateway::new(
        store_name,
        &options.access_log,
        options.module_cache.clone(),
    )?;
    let shutdown = CancellationToken::new();
    let stop_accepting = CancellationToken::new();
    let drain_timeout = Arc::new(std::sync::Mutex::new(SHUTDOWN_TIMEOUT));
    let mut tasks = Vec::new();

    let store: Arc<dyn ConfigStore> = match &options.config {
        ConfigSource::File(path) => {
            Arc::new(FileStore::new(path.clone(), options.max_module_bytes))
        }
        ConfigSource::Etcd(etcd) => Arc::new(EtcdStore::new(EtcdOptions {
            max_module_bytes: options.max_module_bytes,
            ..etcd.clone()
        })),
    };
    store.clone().load().await?;
    let mut reconciler = Reconciler::new(gateway.clone(), store.clone());
    reconciler.apply_current().await;
    tasks.push(tokio::spawn(reconciler.run(shutdown.clone())));
    tasks.push(tokio::spawn(store.clone().watch(shutdown.clone())));
    store.following().await;

    let workers = match options.workers {
        0 | 1 => None,
        count => Some(Workers::start(count).map_err(StartError::Workers)?),
    };
    let proxy_gateway = gateway.clone();
    let proxy_handler =
        move |request, client| proxy::handle(proxy_gateway.clone(), request, client);
    let proxy = ProxyServing {
        gateway: gateway.clone(),
        stop: stop_accepting.clone(),
        drain_timeout: drain_timeout.clone(),
        handler: proxy_handler,
    };
    let (listeners, addr) = listen(options.listen, workers.as_ref()).await?;
    let mut proxies = proxy.spawn(PROXY_LISTENERS[0], listeners, None, workers.as_ref());

    let mut tls_addr = None;
    let tls_listen = options
        .tls_listen
        .or(gateway.snapshot().server.config.tls_listen);
    if let Some(listen_on) = tls_listen {
        let (listeners, bound) = listen(listen_on, workers.as_ref()).await?;
        tls_addr = Some(bound);
        let certs = gateway.clone();
        let resolver = SniResolver(move || certs.snapshot().certs.clone());
        let acceptor = TlsAcceptor::from(tls::server_config(Arc::new(resolver)));
        proxies.extend(proxy.spawn(
            PROXY_LISTENERS[1],
            listeners,
            Some(acceptor),
            workers.as_ref(),
        ));
    }

    let mut admin_addr = None;
    let mut generated_admin_key = None;
    if let Some(listen) = options.admin_listen {
        let listener = bind(listen).await?;
        admin_addr = Some(listener.local_addr().map_err(|source| StartError::Bind {
            addr: listen,
            source,
        })?);
        let (admin, generated) = Admin::prepare(
            &options.admin,
            listen,
            gateway.clone(),
            store.clone(),
            options.max_module_bytes,
        )
        .await?;
        generated_admin_key = generated;
        // The dashboard's charts' history, sampled here on the control runtime, never on the
        // proxy's workers.
        tasks.push(tokio::spawn(admin.clone().record_history(shutdown.clone())));
        let acceptor = options.admin.tls.then(|| {
            let certs = gateway.clone();
            let resolver = SniResolver(move || certs.snapshot().certs.clone());
            TlsAcceptor::from(tls::server_config(Arc::new(resolver)))
        });
        tasks.push(tokio::spawn(serve(
            "admin",
            listener,
            acceptor,
            gateway.clone(),
            shutdown.clone(),
            Arc::new(std::sync::Mutex::new(Duration::ZERO)),
            move |request, peer| admin::handle(admin.clone(), request, peer),
        )));
    }
    tracing::info!(%addr, tls = ?tls_addr, admin = ?admin_addr, "weir is serving");
    Ok(RunningGateway {
        addr,
        tls_addr,
        admin_addr,
        generated_admin_key,
        gateway,
        stop_accepting,
        shutdown,
        drain_timeout,
        proxies,
        tasks,
        workers,
    })
}

/// Lifts the soft limit on open files to the hard one: every client connection is a file,
/// and the usual soft limit (1024) is far below `server.max_connections`.
pub fn raise_open_file_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        let raised = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if let Err(error) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!(%error, "could not raise the open-file limit");
        }
    }
}

/// Waits for ctrl-c or SIGTERM, the two ways a service manager asks a process to stop.
pub async fn stop_signal() -> std::io::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result,
        _ = terminate.recv() => Ok(()),
    }
}

/// What every proxy listener shares.
struct ProxyServing<H> {
    gateway: Arc<Gateway>,
    stop: CancellationToken,
    drain_timeout: Arc<std::sync::Mutex<Duration>>,
    handler: H,
}

impl<H, F, D> ProxyServing<H>
where
    H: Fn(Request<Incoming>, Peer) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ResponseBody<D>>> + Send + 'static,
    D: Send + Unpin + 'static,
{
    /// Serves `listeners`: here, or each socket on its worker's runtime.
    fn spawn(
        &self,
        name: &'static str,
        listeners: Listeners,
        tls: Option<TlsAcceptor>,
        workers: Option<&Workers>,
    ) -> Vec<JoinHandle<()>> {
        let serving = |listener| {
            serve(
                name,
                listener,
                tls.clone(),
                self.gateway.clone(),
                self.stop.clone(),
                self.drain_timeout.clone(),
                self.handler.clone(),
            )
        };
        match workers {
            None => listeners
                .into_iter()
                .map(|l| tokio::spawn(serving(l)))
                .collect(),
            Some(workers) => listeners
                .into_iter()
                .zip(workers.handles())
                .map(|(listener, worker)| worker.spawn(serving(listener)))
                .collect(),
        }
    }
}

/// A listener's sockets, not yet registered with a runtime: `serve` registers each with the
/// runtime it runs on (a worker's, when there are workers).
type Listeners = Vec<std::net::TcpListener>;

/// Binds a proxy listener on `addr` (one socket per worker, when there are workers), and
/// returns the address it got.
async fn listen(
    addr: SocketAddr,
    workers: Option<&Workers>,
) -> Result<(Listeners, SocketAddr), StartError> {
    let bind_error = |source| StartError::Bind { addr, source };
    let sockets = match workers {
        None => vec![bind(addr).await?],
        Some(workers) => {
            workers::shared_listeners(addr, workers.handles().len()).map_err(bind_error)?
        }
    };
    let bound = sockets[0].local_addr().map_err(bind_error)?;
    Ok((sockets, bound))
}

/// A listening socket on `addr`, for [`serve`] to register with the runtime it runs on.
async fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .and_then(TcpListener::into_std)
        .map_err(|source| StartError::Bind { addr, source })
}

/// The proxy listeners' names, as their metrics label them.
const PROXY_LISTENERS: [&str; 2] = ["proxy", "proxy_tls"];

/// Accepts connections until `stop`, serving HTTP/1.1 and HTTP/2 (over TLS when `tls` is
/// set) on each under the live `server` limits, then lets them finish for up to
/// `drain_timeout`.
async fn serve<H, F, D>(
    name: &'static str,
    listener: std::net::TcpListener,
    tls: Option<TlsAcceptor>,
    gateway: Arc<Gateway>,
    stop: CancellationToken,
    drain_timeout: Arc<std::sync::Mutex<Duration>>,
    handler: H,
) where
    H: Fn(Request<Incoming>, Peer) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ResponseBody<D>>> + Send + 'static,
    D: Send + Unpin + 'static,
{
    let listener = match TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(listener = name, %error, "cannot serve on the listener");
            return;
        }
    };
    // Connections close gracefully once `closing` fires, and the tracker waits for them.
    let closing = CancellationToken::new();
    let connections = TaskTracker::new();
    let metrics = gateway.metrics();
    let listener_labels = ListenerLabels { listener: name };
    let open_gauge = metrics
        .connections_open
        .get_or_create_owned(&listener_labels);
    let counts = Arc::new(ConnCounts {
        parked: metrics
            .connections_parked
            .get_or_create_owned(&listener_labels),
        header_too_large: metrics.client_error("header_too_large"),
        protocol: metrics.client_error("protocol"),
        handshake_failures: metrics.handshake_failures.clone(),
    });
    // The proxy listeners, plain and TLS, share one `max_connections`; the admin listener
    // has its own.
    let budget: Vec<Gauge> = if PROXY_LISTENERS.contains(&name) {
        PROXY_LISTENERS
            .iter()
            .map(|listener| {
                let labels = ListenerLabels { listener };
                metrics.connections_open.get_or_create_owned(&labels)
            })
            .collect()
    } else {
        vec![open_gauge.clone()]
    };
    let refused = metrics
        .connections_refused
        .get_or_create_owned(&listener_labels);
    let accepted = metrics
        .connections_accepted
        .get_or_create_owned(&AcceptLabels {
            listener: name,
            worker: workers::index(),
        });
    let counters = TimeoutCounters {
        header: metrics.client_timeout("header"),
        keepalive: metrics.client_timeout("keepalive"),
        send: metrics.client_timeout("send"),
    };
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
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
        let settings = gateway.snapshot().server.clone();
        let limits = &settings.config;
        // The gauges are the count: one per connection alive.
        let open: i64 = budget.iter().map(Gauge::get).sum();
        if usize::try_from(open).unwrap_or(0) >= limits.max_connections {
            refused.inc();
            drop(stream);
            continue;
        }
        accepted.inc();
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().ok();
        // Counted as open for as long as the socket lives, through an upgrade too.
        let activity = Arc::new(ConnectionActivity::counted(&open_gauge));
        let clock = ReadClock {
            header: Duration::from_millis(limits.header_timeout_ms),
            keepalive: Duration::from_millis(limits.keepalive_timeout_ms),
            activity: activity.clone(),
        };
        let io = TimedIo::client(
            stream,
            clock,
            Duration::from_millis(limits.send_timeout_ms),
            counters.clone(),
        );
        let handler = handler.clone();
        let client = Peer {
            addr: peer,
            tls: tls.is_some(),
            local,
        };
        let served = activity.clone();
        let service = service_fn(move |request| {
            let serving = served.begin();
            // Boxed once here, so that hyper moves a pointer rather than the whole request future.
            let response = Box::pin(handler(request, client));
            async move { Ok::<_, Infallible>(response.await.map(|body| body.serving(serving))) }
        });
        connections.spawn(client_conn::serve(ClientConn {
            io,
            activity,
            service,
            settings,
            tls: tls.clone(),
            counts: counts.clone(),
            closing: closing.clone(),
            peer,
        }));
    }
    drop(listener);
    let timeout = *drain_timeout.lock().expect("drain timeout lock");
    closing.cancel();
    connections.close();
    if tokio::time::timeout(timeout, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the drain timeout");
    }
}
