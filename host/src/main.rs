//! The `weir` command line.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use weir::{AccessLogTarget, ConfigSource, GatewayOptions};

/// Weir: an API gateway whose plugins are sandboxed WebAssembly components.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs a gateway.
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// A YAML config file, watched for changes.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
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

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("WEIR_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Run(args) => run(args),
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(workers) = args.workers {
        runtime.worker_threads(workers);
    }
    let runtime = runtime
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let options = GatewayOptions {
            config: ConfigSource::File(args.config),
            listen: args.listen,
            admin_listen: Some(args.admin_listen),
            access_log: args.access_log,
        };
        let gateway = weir::start(options).await?;
        tokio::signal::ctrl_c()
            .await
            .context("waiting for ctrl-c")?;
        tracing::info!("shutting down");
        gateway.shutdown().await;
        Ok(())
    })
}
