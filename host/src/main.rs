//! The `weir` command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;
use weir::config::{FailurePolicy, Grants, ServiceNode, WasiGrant};
use weir::store::etcd::{self, EtcdOptions, PushSettings};
use weir::{AccessLogTarget, ConfigSource, GatewayOptions};

/// glibc's allocator slows down as the heap grows with many routes; mimalloc stays flat.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Weir: an API gateway whose plugins are sandboxed WebAssembly components.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs a gateway, from a YAML file or from etcd.
    Run(RunArgs),
    /// Registers a backend in etcd under a lease and keeps it alive until stopped.
    Register(RegisterArgs),
    /// Manages plugin modules in etcd.
    #[command(subcommand)]
    Plugin(PluginCommand),
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Stores a component in etcd and points a plugin entry at it; gateways load it live.
    Push(PushArgs),
}

/// Where etcd is.
#[derive(Args)]
struct EtcdArgs {
    /// etcd client URLs, comma-separated.
    #[arg(long, value_name = "URL", value_delimiter = ',', required = true)]
    etcd: Vec<String>,
    /// The key prefix.
    #[arg(long, default_value = "/weir")]
    prefix: String,
}

impl EtcdArgs {
    fn options(&self, state_dir: Option<PathBuf>) -> EtcdOptions {
        EtcdOptions {
            endpoints: self.etcd.clone(),
            prefix: self.prefix.clone(),
            state_dir,
        }
    }
}

#[derive(Args)]
#[command(group = clap::ArgGroup::new("store").required(true).args(["config", "etcd"]))]
struct RunArgs {
    /// A YAML config file, watched for changes.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// etcd client URLs, comma-separated, instead of a file.
    #[arg(long, value_name = "URL", value_delimiter = ',')]
    etcd: Vec<String>,
    /// The etcd key prefix.
    #[arg(long, default_value = "/weir", requires = "etcd")]
    prefix: String,
    /// Keeps the last good etcd config and its modules here, to start while etcd is down.
    #[arg(long, value_name = "DIR", requires = "etcd")]
    state_dir: Option<PathBuf>,
    /// Where the proxy listens.
    #[arg(long, default_value = "0.0.0.0:9080")]
    listen: SocketAddr,
    /// Where the admin listener (metrics, status) listens.
    #[arg(long, default_value = "127.0.0.1:9180")]
    admin_listen: SocketAddr,
    /// Access log: `stdout`, `off`, or a file path.
    #[arg(long, default_value = "stdout")]
    access_log: AccessLogTarget,
    /// Worker threads for the runtime (default: one per core).
    #[arg(long)]
    workers: Option<usize>,
}

#[derive(Args)]
struct RegisterArgs {
    #[command(flatten)]
    etcd: EtcdArgs,
    /// The service name routes use (`service: NAME`).
    #[arg(long)]
    service: String,
    /// The backend's address, HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    addr: String,
    /// The lease's time to live, in seconds: the node goes this long after the last keep-alive.
    #[arg(long, default_value_t = 10)]
    ttl: i64,
    /// The node's id under the service (default: HOST:PORT).
    #[arg(long)]
    node_id: Option<String>,
    /// The node's share of the service's traffic.
    #[arg(long, default_value_t = 1)]
    weight: u32,
}

#[derive(Args)]
struct PushArgs {
    #[command(flatten)]
    etcd: EtcdArgs,
    /// The plugin entry's name (routes refer to it).
    name: String,
    /// The component file.
    file: PathBuf,
    /// Linear memory per instance, in MiB.
    #[arg(long)]
    memory_mb: Option<u32>,
    /// CPU deadline per call, in ms.
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// The largest body buffered for the plugin.
    #[arg(long)]
    max_body_bytes: Option<u64>,
    /// What a failure does: `closed` answers 500, `open` skips the plugin.
    #[arg(long, value_parser = parse_failure)]
    failure: Option<FailurePolicy>,
    /// A host function the plugin may import: `log`, `clock`, `kv`, `metrics`,
    /// `http=HOST[:PORT],..` (GET only), or `wasi=clocks|random|stdio`. Repeat for several;
    /// when given, they replace the entry's grants.
    #[arg(long = "grant", value_name = "GRANT")]
    grants: Vec<String>,
}

/// Builds grants from `--grant` values.
fn parse_grants(values: &[String]) -> anyhow::Result<Grants> {
    let mut grants = Grants::default();
    for value in values {
        match value.split_once('=') {
            None => match value.as_str() {
                "log" => grants.log = true,
                "clock" => grants.clock = true,
                "kv" => grants.kv = true,
                "metrics" => grants.metrics = true,
                other => bail!(
                    "--grant {other:?}: expected log, clock, kv, metrics, http=HOSTS or wasi=NAME"
                ),
            },
            Some(("http", hosts)) => {
                let hosts: Vec<String> = hosts
                    .split(',')
                    .filter(|h| !h.is_empty())
                    .map(str::to_owned)
                    .collect();
                grants.http = Some(serde_json::from_value(
                    serde_json::json!({ "hosts": hosts }),
                )?);
            }
            Some(("wasi", name)) => {
                let grant: WasiGrant = serde_json::from_value(serde_json::Value::String(
                    name.to_owned(),
                ))
                .map_err(|_| {
                    anyhow::anyhow!("--grant wasi={name}: expected clocks, random or stdio")
                })?;
                grants.wasi.push(grant);
            }
            Some((other, _)) => bail!("--grant {other}=..: expected http=HOSTS or wasi=NAME"),
        }
    }
    Ok(grants)
}

fn parse_failure(text: &str) -> Result<FailurePolicy, String> {
    match text {
        "open" => Ok(FailurePolicy::Open),
        "closed" => Ok(FailurePolicy::Closed),
        other => Err(format!("{other:?} is not open or closed")),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("WEIR_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let workers = match &cli.command {
        Command::Run(args) => args.workers,
        _ => Some(1),
    };
    // One worker needs no work stealing: a current-thread runtime saves its synchronisation.
    let mut runtime = match workers {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(workers) => {
            let mut runtime = tokio::runtime::Builder::new_multi_thread();
            runtime.worker_threads(workers);
            runtime
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = runtime
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run(args).await,
            Command::Register(args) => register(args).await,
            Command::Plugin(PluginCommand::Push(args)) => push(args).await,
        }
    })
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let config = match args.config {
        Some(path) => ConfigSource::File(path),
        None => ConfigSource::Etcd(EtcdOptions {
            endpoints: args.etcd,
            prefix: args.prefix,
            state_dir: args.state_dir,
        }),
    };
    let options = GatewayOptions {
        config,
        listen: args.listen,
        admin_listen: Some(args.admin_listen),
        access_log: args.access_log,
    };
    let gateway = weir::start(options).await?;
    stop_signal().await?;
    tracing::info!("shutting down");
    gateway.shutdown().await;
    Ok(())
}

async fn register(args: RegisterArgs) -> anyhow::Result<()> {
    let (host, port) = split_host_port(&args.addr)?;
    let node = ServiceNode {
        host,
        port,
        weight: args.weight,
        meta: Default::default(),
    };
    let node_id = args.node_id.unwrap_or_else(|| args.addr.clone());
    if args.ttl < 1 {
        bail!("--ttl must be at least 1 second");
    }
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = stop_signal().await;
        stop.cancel();
    });
    etcd::register(
        &args.etcd.options(None),
        &args.service,
        &node_id,
        &node,
        args.ttl,
        shutdown,
    )
    .await?;
    Ok(())
}

async fn push(args: PushArgs) -> anyhow::Result<()> {
    let bytes =
        std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    // Refuse a module the gateways would refuse, before it reaches them.
    let runtime = weir::plugin::PluginRuntime::new(Arc::new(weir::metrics::Metrics::new()))?;
    let module = runtime
        .load(bytes.clone())
        .await
        .with_context(|| format!("{} is not a weir plugin", args.file.display()))?;
    let settings = PushSettings {
        memory_mb: args.memory_mb,
        timeout_ms: args.timeout_ms,
        max_body_bytes: args.max_body_bytes,
        failure: args.failure,
        grants: if args.grants.is_empty() {
            None
        } else {
            Some(parse_grants(&args.grants)?)
        },
    };
    if let Some(grants) = &settings.grants
        && let Err(refused) = weir::plugin::grants::check(&module.imports, grants)
    {
        bail!("{}: {refused}", args.file.display());
    }
    let pushed = etcd::push_plugin(&args.etcd.options(None), &args.name, &bytes, &settings).await?;
    let stored = if pushed.already_stored {
        "already stored"
    } else {
        "stored"
    };
    println!(
        "plugin {} -> sha256 {} ({} bytes in {} chunks, {stored})",
        args.name,
        pushed.sha256,
        bytes.len(),
        pushed.chunks
    );
    println!("{}", serde_json::to_string(&pushed.entry)?);
    Ok(())
}

/// Waits for ctrl-c or SIGTERM, the two ways a service manager asks a process to stop.
async fn stop_signal() -> anyhow::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("listening for SIGTERM")?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.context("listening for ctrl-c"),
        _ = terminate.recv() => Ok(()),
    }
}

/// Splits `host:port` or `[v6]:port`.
fn split_host_port(addr: &str) -> anyhow::Result<(String, u16)> {
    let (host, port) = addr
        .rsplit_once(':')
        .with_context(|| format!("--addr {addr:?} is not HOST:PORT"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = port
        .parse()
        .with_context(|| format!("--addr {addr:?}: bad port"))?;
    if host.is_empty() {
        bail!("--addr {addr:?} has no host");
    }
    Ok((host.to_owned(), port))
}
