//! `tidepool-tracker`: command-line entry point — config, logging, signals.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use mimalloc::MiMalloc;
use tidepool_tracker::{Config, Tracker};

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

/// WebSocket signaling tracker for WebTorrent-protocol peer pools.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// TOML config file (every field optional; see --print-config).
    #[arg(short, long)]
    config: Option<PathBuf>,
    /// Print the effective config as commented TOML and exit.
    #[arg(short = 'p', long)]
    print_config: bool,
    /// Address to listen on (default 127.0.0.1:8000).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Socket worker threads.
    #[arg(long)]
    socket_workers: Option<usize>,
    /// Swarm worker threads.
    #[arg(long)]
    swarm_workers: Option<usize>,
    /// PEM certificate chain (serves wss:// with --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Serve /metrics, /stats and /stats.json on this address (off by default).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
}

fn main() -> anyhow::Result<()> {
    // A worker thread that panics would leave the process up but its connections, listener
    // and swarms dead: print the panic, then exit so a supervisor restarts a whole tracker.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::exit(101);
    }));
    let cli = Cli::parse();
    let mut config = match &cli.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            Config::from_toml(&text).with_context(|| format!("in {}", path.display()))?
        }
        None => Config::default(),
    };
    if let Some(listen) = cli.listen {
        config.network.listen = listen;
    }
    if let Some(n) = cli.socket_workers {
        config.workers.socket_workers = n;
    }
    if let Some(n) = cli.swarm_workers {
        config.workers.swarm_workers = n;
    }
    if cli.tls_cert.is_some() {
        config.network.tls_cert = cli.tls_cert;
        config.network.tls_key = cli.tls_key;
    }
    if cli.metrics.is_some() {
        config.metrics.listen = cli.metrics;
    }
    config.validate()?;
    if cli.print_config {
        print!("{}", config.to_commented_toml());
        return Ok(());
    }

    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();

    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP, SIGUSR1])
        .context("installing signal handlers")?;
    let tracker = Tracker::start(config.clone())?;
    tracing::info!(
        "tidepool-tracker {} listening on {} ({} socket workers, {} swarm workers)",
        env!("CARGO_PKG_VERSION"),
        tracker.url(),
        config.workers.socket_workers,
        config.workers.swarm_workers,
    );
    if let Some(addr) = tracker.metrics_addr() {
        tracing::info!("metrics on http://{addr}/metrics, stats page on http://{addr}/stats");
    }
    for signal in signals.forever() {
        match signal {
            SIGHUP => match tracker.reload_tls() {
                Ok(()) => tracing::info!("SIGHUP: certificate reloaded"),
                Err(e) => tracing::error!("SIGHUP: {e}; keeping the previous certificate"),
            },
            SIGUSR1 => match tracker.reload_access_list() {
                Ok(n) => tracing::info!("SIGUSR1: access list reloaded ({n} info hashes)"),
                Err(e) => tracing::error!("SIGUSR1: {e}; keeping the previous access list"),
            },
            _ => {
                tracing::info!("signal {signal}: shutting down");
                break;
            }
        }
    }
    tracker.shutdown();
    tracing::info!("stopped");
    Ok(())
}
