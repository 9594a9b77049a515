//! `tidepool-node`: command-line entry point. `join` holds connections and prints peers and
//! stats; `share` serves a file to the pool; `get` fetches one with a progress bar (or JSON
//! lines with `--json`) and exits 0 once the file is complete and verified.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use mimalloc::MiMalloc;
use tidepool_node::pool::{Pool, PoolConfig};
use tidepool_node::{Event, Node, NodeConfig, PeerId};

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

/// A pool peer: joins a pool through a WebTorrent-protocol tracker over WebRTC.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where and how to join.
#[derive(Debug, Args)]
struct PoolArgs {
    /// Tracker URL (ws:// or wss://).
    #[arg(long)]
    tracker: String,
    /// Pool name (hashed into the swarm's info hash).
    #[arg(long)]
    pool: String,
    /// Gather loopback candidates only (tests, a machine without a network).
    #[arg(long)]
    loopback: bool,
    /// Most peer connections.
    #[arg(long, default_value_t = 8)]
    max_peers: usize,
    /// STUN/TURN server URL (repeatable).
    #[arg(long = "ice-server")]
    ice_servers: Vec<String>,
    /// Seconds full and unchanged before making room for a starved peer.
    #[arg(long)]
    rotate_after_secs: Option<u64>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Join a pool; print peers as they come and go, and stats every interval.
    Join {
        #[command(flatten)]
        join: PoolArgs,
        /// Seconds between stats lines (0 = none).
        #[arg(long, default_value_t = 10)]
        stats_every: u64,
    },
    /// Serve FILE to the pool; prints its file id, then serves until interrupted.
    Share {
        /// The file.
        file: PathBuf,
        #[command(flatten)]
        join: PoolArgs,
        /// Print JSON lines instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Fetch FILE_ID from the pool into PATH; exits 0 when complete and verified.
    Get {
        /// The file id `share` printed (64 hex digits).
        file_id: String,
        /// Where to write it (a partial download resumes from PATH.part).
        #[arg(short, long)]
        output: PathBuf,
        #[command(flatten)]
        join: PoolArgs,
        /// Print JSON lines instead of a progress bar.
        #[arg(long)]
        json: bool,
    },
}

fn progress_json(p: &tidepool_node::pool::Progress) -> serde_json::Value {
    serde_json::json!({
        "have": p.have_bytes,
        "total": p.total_bytes,
        "received": p.received_bytes,
        "duplicates": p.duplicates,
        "missing_rounds": p.missing_rounds,
        "sources": p.sources,
    })
}

fn short(p: &PeerId) -> String {
    String::from_utf8_lossy(&p.0).into_owned()
}

fn node_config(j: &PoolArgs) -> NodeConfig {
    let mut config = NodeConfig::new(j.tracker.clone(), &j.pool);
    if j.loopback {
        config = config.for_loopback();
    }
    config.max_peers = j.max_peers;
    if let Some(secs) = j.rotate_after_secs {
        config.rotate_after = Duration::from_secs(secs);
    }
    config.ice_servers = j
        .ice_servers
        .iter()
        .map(|url| tidepool_node::IceServer {
            urls: vec![url.clone()],
            ..Default::default()
        })
        .collect();
    config
}

async fn start_pool(j: &PoolArgs) -> anyhow::Result<Pool> {
    let pool_config = PoolConfig::default();
    let mut config = node_config(j);
    config.max_message_size = Pool::message_size_for(pool_config.chunk_size);
    let node = Node::join(config).await.context("joining the pool")?;
    Ok(Pool::start(node, pool_config)?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                // The WebRTC stack warns about benign ICE and SCTP events during setup.
                "warn,rtc=error,rtc_ice=error,rtc_dtls=error,rtc_sctp=error,webrtc=error".into()
            }),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Join { join, stats_every } => run_join(&join, stats_every).await,
        Command::Share { file, join, json } => {
            let pool = start_pool(&join).await?;
            let id = pool
                .share(&file)
                .with_context(|| format!("sharing {}", file.display()))?;
            if json {
                println!("{}", serde_json::json!({ "file_id": id.to_hex() }));
            } else {
                println!("sharing {} as {}", file.display(), id.to_hex());
            }
            tokio::signal::ctrl_c().await?;
            Ok(())
        }
        Command::Get {
            file_id,
            output,
            join,
            json,
        } => {
            let id = tidepool_node::pool::FileId::from_hex(&file_id)
                .context("FILE_ID must be 64 hex digits")?;
            let pool = start_pool(&join).await?;
            let download = pool.get(id, &output).await?;
            let mut progress = download.progress.clone();
            let bar = (!json).then(|| {
                let bar = indicatif::ProgressBar::new(progress.borrow().total_bytes);
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} {msg} ETA {eta}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
                bar
            });
            let watcher = tokio::spawn(async move {
                while progress.changed().await.is_ok() {
                    let p = progress.borrow_and_update().clone();
                    match &bar {
                        Some(bar) => {
                            bar.set_length(p.total_bytes);
                            bar.set_position(p.have_bytes);
                            bar.set_message(format!("{} peers", p.sources));
                        }
                        None => println!("{}", progress_json(&p)),
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                if let Some(bar) = bar {
                    bar.finish();
                }
            });
            let last = download.progress.clone();
            let result = download.finished().await;
            watcher.abort();
            let path = result?;
            if json {
                // The watcher may not have printed the final state before it was stopped.
                println!("{}", progress_json(&last.borrow()));
                println!(
                    "{}",
                    serde_json::json!({ "done": path.display().to_string() })
                );
            } else {
                println!("verified and saved to {}", path.display());
            }
            Ok(())
        }
    }
}

async fn run_join(join: &PoolArgs, stats_every: u64) -> anyhow::Result<()> {
    let node = Node::join(node_config(join))
        .await
        .context("joining the pool")?;
    println!(
        "joined pool {:?} as {} (info hash {})",
        join.pool,
        short(&node.peer_id()),
        tidepool_node::config::pool_info_hash(&join.pool).to_hex()
    );
    let mut stats = tokio::time::interval(Duration::from_secs(stats_every.max(1)));
    stats.tick().await;
    loop {
        tokio::select! {
            event = node.next_event() => match event {
                Some(Event::PeerConnected { peer }) => println!("+ peer {}", short(&peer)),
                Some(Event::PeerDisconnected { peer, reason }) => {
                    println!("- peer {} ({reason:?})", short(&peer));
                }
                Some(Event::Tracker(state)) => println!("tracker: {state:?}"),
                Some(_) => {}
                None => break,
            },
            _ = stats.tick(), if stats_every > 0 => {
                let s = node.stats();
                println!(
                    "stats: {} connected, {} connecting, {} offers pending, tracker {}, {} announces, udp drops {}",
                    s.connected_peers,
                    s.connecting_peers,
                    s.pending_offers,
                    if s.tracker_connected { "up" } else { "down" },
                    s.announces,
                    s.udp_rcvbuf_errors.map_or("n/a".into(), |d| d.to_string()),
                );
                for p in node.peers().await {
                    println!(
                        "  {} {:?} rtt {:?} control {}/{} B chunks {}/{} B",
                        short(&p.peer_id),
                        p.state,
                        p.rtt,
                        p.control.bytes_in,
                        p.control.bytes_out,
                        p.chunks.bytes_in,
                        p.chunks.bytes_out,
                    );
                }
            }
            _ = tokio::signal::ctrl_c() => {
                println!("leaving");
                break;
            }
        }
    }
    node.leave().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
