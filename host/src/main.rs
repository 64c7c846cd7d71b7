//! The `weir` command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;
use weir::client::{PushSettings, push_plugin};
use weir::config::{FailurePolicy, Grants, ServiceNode, WasiGrant};
use weir::plugin::signature::ModuleSignature;
use weir::store::etcd::EtcdOptions;
use weir::{AccessLogTarget, AdminOptions, ConfigSource, DrainOptions, GatewayOptions};

/// glibc's allocator slows down as the heap grows with many routes; mimalloc stays flat. It is
/// built without transparent huge pages (`no_thp`): with them, each fresh 2 MiB of a sparsely
/// used heap is zeroed whole on first touch, which was most of the start-up and of the first
/// config change after it (bench/results/tuning.md).
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
    /// Makes credentials for the `admin:` section.
    #[command(subcommand)]
    Admin(AdminCommand),
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Reads a password from standard input and prints its argon2id hash, for
    /// `admin.accounts[].password_hash`.
    HashPassword,
    /// Makes a new API key and prints it with its sha256, for `admin.keys[].key_sha256`.
    NewKey,
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Stores a component in etcd and points a plugin entry at it; gateways load it live.
    Push(PushArgs),
    /// Says which world a component implements, what it imports, and whether it would load.
    Check(CheckArgs),
    /// Runs a component against a described request, without a gateway, and prints what it did.
    Test(TestArgs),
    /// Signs a component with an Ed25519 key: writes FILE.sig, which gateways with
    /// `server.trusted_keys` check before they load the module.
    Sign(SignArgs),
}

#[derive(Args)]
struct SignArgs {
    /// The Ed25519 private key, PKCS#8 PEM (`openssl genpkey -algorithm ed25519 -out key.pem`).
    #[arg(long)]
    key: PathBuf,
    /// The component file.
    file: PathBuf,
}

#[derive(Args)]
struct CheckArgs {
    /// The component file.
    file: PathBuf,
    /// Grants to check it against (as for `weir plugin push`).
    #[arg(long = "grant", value_name = "GRANT")]
    grants: Vec<String>,
}

#[derive(Args)]
struct TestArgs {
    /// The component file.
    file: PathBuf,
    /// The route's config for the plugin, as JSON.
    #[arg(long, default_value = "{}")]
    config: String,
    /// The request line: `METHOD /path?query`.
    #[arg(long, default_value = "GET /")]
    request: String,
    /// A request header, `name: value` (repeatable).
    #[arg(short = 'H', long = "header", value_name = "HEADER")]
    headers: Vec<String>,
    /// The request body.
    #[arg(long, default_value = "")]
    body: String,
    /// The client's IP address.
    #[arg(long, default_value = "127.0.0.1")]
    client_ip: std::net::IpAddr,
    /// The status of the pretend upstream's response.
    #[arg(long, default_value_t = 200)]
    upstream_status: u16,
    /// A header of the pretend upstream's response (repeatable).
    #[arg(long = "upstream-header", value_name = "HEADER")]
    upstream_headers: Vec<String>,
    /// The body of the pretend upstream's response.
    #[arg(long, default_value = "upstream body")]
    upstream_body: String,
    /// Grants to run it with (as for `weir plugin push`); by default all of them, with no
    /// outbound host (so every component runs, and reaches nothing).
    #[arg(long = "grant", value_name = "GRANT")]
    grants: Vec<String>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
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
    /// The largest module to store, in MiB (gateways refuse larger ones).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    max_module_mb: u64,
}

impl EtcdArgs {
    fn options(&self) -> EtcdOptions {
        EtcdOptions {
            prefix: self.prefix.clone(),
            max_module_bytes: self.max_module_mb << 20,
            ..EtcdOptions::new(self.etcd.clone())
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
    /// Keeps state here: the last good etcd config and its modules (to start while etcd is
    /// down) and, in file mode, the hash of a generated admin key
    /// (default in file mode: $XDG_STATE_HOME/weir or ~/.local/state/weir).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Admin settings (keys, accounts, open paths) that replace the store's `admin` section.
    #[arg(long, value_name = "FILE")]
    admin_config: Option<PathBuf>,
    /// Where the proxy listens.
    #[arg(long, default_value = "0.0.0.0:9080")]
    listen: SocketAddr,
    /// Where the TLS proxy listener listens (default: the config's `server.tls_listen`, or
    /// none). Certificates come from the store's `ssl` objects.
    #[arg(long, value_name = "ADDR")]
    tls_listen: Option<SocketAddr>,
    /// Where the admin listener (metrics, status) listens.
    #[arg(long, default_value = "127.0.0.1:9180")]
    admin_listen: SocketAddr,
    /// Serve the admin listener over TLS, with the certificates of the `ssl` objects.
    #[arg(long)]
    admin_tls: bool,
    /// Access log: `stdout`, `off`, or a file path.
    #[arg(long, default_value = "stdout")]
    access_log: AccessLogTarget,
    /// Where compiled plugin modules are kept across restarts
    /// (default: $XDG_CACHE_HOME/weir/modules or ~/.cache/weir/modules; `off` for none).
    #[arg(long, value_name = "DIR")]
    module_cache: Option<String>,
    /// Proxy worker threads, each with its own runtime and its own listening socket on the
    /// shared port (default: one per core). With 1, one thread serves everything.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    workers: Option<u16>,
    /// On SIGTERM, how long to keep accepting after /readyz turns 503 (`5s`, `500ms`), so
    /// that load balancers stop sending first.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    drain_delay: std::time::Duration,
    /// On SIGTERM, how long requests in flight may take to finish once the listener closes.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    drain_timeout: std::time::Duration,
    /// The largest plugin module accepted from the store, in MiB.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    max_module_mb: u64,
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
    /// Signs the module with this Ed25519 PKCS#8 PEM key and stores the signature in the entry.
    #[arg(long = "sign", value_name = "KEY")]
    sign: Option<PathBuf>,
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
                "routing" => grants.routing = true,
                "tracing" => grants.tracing = true,
                other => bail!(
                    "--grant {other:?}: expected log, clock, kv, metrics, routing, tracing, \
                     http=HOSTS or wasi=NAME"
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
    // The authoring commands print their own report; info logs would bury it.
    let default_level = match &cli.command {
        Command::Plugin(
            PluginCommand::Check(_) | PluginCommand::Test(_) | PluginCommand::Sign(_),
        )
        | Command::Admin(_) => "warn",
        _ => "info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("WEIR_LOG").unwrap_or_else(|_| EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .init();
    // The control plane (config, admin, health checks) runs on one thread; with more than one
    // worker the proxy listeners run on worker threads of their own (see `weir::workers`).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run(args).await,
            Command::Register(args) => register(args).await,
            Command::Plugin(PluginCommand::Push(args)) => push(args).await,
            Command::Plugin(PluginCommand::Check(args)) => check(args).await,
            Command::Plugin(PluginCommand::Test(args)) => test(args).await,
            Command::Plugin(PluginCommand::Sign(args)) => sign(args),
            Command::Admin(command) => admin_command(command),
        }
    })
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    weir::server::raise_open_file_limit();
    let max_module_bytes = args.max_module_mb << 20;
    let file_mode = args.config.is_some();
    let admin = AdminOptions {
        config_file: args.admin_config,
        env_key: std::env::var("WEIR_ADMIN_KEY").ok(),
        state_dir: match &args.state_dir {
            Some(dir) => Some(dir.clone()),
            None if file_mode => state_home(),
            None => None,
        },
        tls: args.admin_tls,
    };
    let config = match args.config {
        Some(path) => ConfigSource::File(path),
        None => ConfigSource::Etcd(EtcdOptions {
            prefix: args.prefix,
            state_dir: args.state_dir,
            max_module_bytes,
            ..EtcdOptions::new(args.etcd)
        }),
    };
    let options = GatewayOptions {
        config,
        listen: args.listen,
        tls_listen: args.tls_listen,
        admin_listen: Some(args.admin_listen),
        access_log: args.access_log,
        module_cache: module_cache(args.module_cache.as_deref()),
        max_module_bytes,
        admin,
        workers: match args.workers {
            Some(workers) => usize::from(workers),
            None => std::thread::available_parallelism().map_or(1, usize::from),
        },
    };
    let gateway = weir::start(options).await?;
    if let Some(key) = &gateway.generated_admin_key {
        // Shown once: weir keeps only its hash.
        eprintln!(
            "\nweir generated an admin key (it is shown only now; weir keeps its sha256):\n\n    \
             {key}\n\nSend it as X-API-KEY to the admin API on http://{}\n",
            gateway
                .admin_addr
                .map(|a| a.to_string())
                .unwrap_or_default()
        );
    }
    weir::server::stop_signal()
        .await
        .context("listening for stop signals")?;
    gateway
        .drain(DrainOptions {
            delay: args.drain_delay,
            timeout: args.drain_timeout,
        })
        .await;
    Ok(())
}

async fn register(args: RegisterArgs) -> anyhow::Result<()> {
    let (host, port) = split_host_port(&args.addr)?;
    let node = ServiceNode {
        status: Default::default(),
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
        let _ = weir::server::stop_signal().await;
        stop.cancel();
    });
    weir::client::register(
        &args.etcd.options(),
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
    let runtime = weir::plugin::PluginRuntime::new(Arc::new(weir::metrics::Metrics::new()), None)?;
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
        signature: match &args.sign {
            Some(key) => Some(signature_of(key, &module.sha256)?),
            None => None,
        },
    };
    if let Some(grants) = &settings.grants
        && let Err(refused) = weir::plugin::grants::check(&module.imports, grants)
    {
        bail!("{}: {refused}", args.file.display());
    }
    let pushed = push_plugin(&args.etcd.options(), &args.name, &bytes, &settings).await?;
    println!("{pushed}");
    Ok(())
}

/// The signature of the module with `sha256`, made with the private key in `key`.
fn signature_of(key: &std::path::Path, sha256: &str) -> anyhow::Result<ModuleSignature> {
    let pem = std::fs::read(key).with_context(|| format!("reading {}", key.display()))?;
    weir::plugin::signature::sign(&pem, sha256).with_context(|| key.display().to_string())
}

/// `weir plugin sign`: writes FILE.sig beside the component.
fn sign(args: SignArgs) -> anyhow::Result<()> {
    let bytes =
        std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    let sha256 = weir::digest::sha256_hex(&bytes);
    let signature = signature_of(&args.key, &sha256)?;
    let mut out = args.file.clone().into_os_string();
    out.push(".sig");
    let out = PathBuf::from(out);
    let json = serde_json::to_string_pretty(&signature)? + "\n";
    std::fs::write(&out, json).with_context(|| format!("writing {}", out.display()))?;
    println!(
        "signed {} (sha256 {sha256}) with key {}: {}",
        args.file.display(),
        signature.public_key,
        out.display()
    );
    Ok(())
}

/// The user's state folder for weir: $XDG_STATE_HOME/weir or ~/.local/state/weir.
fn state_home() -> Option<PathBuf> {
    std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local/state")))
        .map(|state| state.join("weir"))
}

fn admin_command(command: AdminCommand) -> anyhow::Result<()> {
    match command {
        AdminCommand::HashPassword => {
            let mut password = String::new();
            std::io::stdin()
                .read_line(&mut password)
                .context("reading the password from standard input")?;
            let password = password.trim_end_matches(['\n', '\r']);
            if password.is_empty() {
                bail!("the password is empty");
            }
            println!("{}", weir::admin::auth::hash_password(password));
        }
        AdminCommand::NewKey => {
            let key = weir::admin::auth::new_key();
            println!("key:        {key}");
            println!("key_sha256: {}", weir::digest::sha256_hex(key.as_bytes()));
        }
    }
    Ok(())
}

/// The module cache folder: the flag's, or the user's cache folder, or none for `off`.
fn module_cache(flag: Option<&str>) -> Option<PathBuf> {
    match flag {
        Some("off") => None,
        Some(dir) => Some(PathBuf::from(dir)),
        None => std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
            .map(|cache| cache.join("weir").join("modules")),
    }
}

async fn check(args: CheckArgs) -> anyhow::Result<()> {
    let bytes =
        std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    let grants = parse_grants(&args.grants)?;
    let report = weir::authoring::check(bytes, &grants).await?;
    println!("{}: sha256 {}", args.file.display(), report.sha256);
    println!("{report}");
    if report.loads.is_err() {
        std::process::exit(1);
    }
    Ok(())
}

/// `name: value`.
fn split_header(text: &str) -> anyhow::Result<(String, String)> {
    let (name, value) = text
        .split_once(':')
        .with_context(|| format!("{text:?} is not `name: value`"))?;
    Ok((name.trim().to_owned(), value.trim().to_owned()))
}

async fn test(args: TestArgs) -> anyhow::Result<()> {
    let bytes =
        std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    let grants = if args.grants.is_empty() {
        // Everything, so that any component runs; nothing behind `runtime` or `http=` is reachable.
        let all = [
            "log",
            "clock",
            "kv",
            "metrics",
            "routing",
            "tracing",
            "http=",
            "wasi=clocks",
            "wasi=random",
            "wasi=stdio",
            "wasi=runtime",
        ];
        parse_grants(&all.map(String::from))?
    } else {
        parse_grants(&args.grants)?
    };
    let (method, target) = args
        .request
        .split_once(' ')
        .unwrap_or(("GET", args.request.as_str()));
    let request = weir::authoring::TestRequest {
        method: method.to_owned(),
        target: target.trim().to_owned(),
        headers: args
            .headers
            .iter()
            .map(|h| split_header(h))
            .collect::<anyhow::Result<_>>()?,
        body: args.body.into_bytes(),
        client_ip: args.client_ip,
    };
    let upstream = weir::authoring::TestUpstream {
        status: args.upstream_status,
        headers: args
            .upstream_headers
            .iter()
            .map(|h| split_header(h))
            .collect::<anyhow::Result<_>>()?,
        body: args.upstream_body.into_bytes(),
    };
    let report = weir::authoring::run(bytes, &args.config, grants, request, upstream)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
    }
    if report.failed() {
        std::process::exit(1);
    }
    Ok(())
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
