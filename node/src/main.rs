//! `tidepool-node`: command-line entry point. `join` holds connections and prints peers and
//! stats; `share` serves a file to the pool; `get` fetches one with a progress bar (or JSON
//! lines with `--json`) and exits 0 once the file is complete and verified; `serve` only
//! relays and caches. With `--json` every command prints a status line each second, which
//! is what the pool load test reads.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use mimalloc::MiMalloc;
use tidepool_node::pool::{Pool, PoolConfig};
use tidepool_node::{Event, Node, NodeConfig, PeerId, TrackerState};

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
    /// Token for a private pool (`tidepool-tracker token issue`); sent as a bearer header,
    /// never logged. A refused token ends the command with the tracker's reason.
    #[arg(long, env = "TIDEPOOL_TOKEN", hide_env_values = true)]
    token: Option<String>,
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
    /// MiB of relayed chunks kept on disk to serve again (0: no relay cache).
    #[arg(long, default_value_t = 256)]
    cache_mib: u64,
    /// Directory of the relay cache (default: a per-node directory under the temp dir).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Seconds without progress before a request's missing chunks are asked again.
    #[arg(long, default_value_t = 5)]
    missing_after_secs: u64,
    /// Seconds without any chunk before a download gives up.
    #[arg(long, default_value_t = 120)]
    give_up_after_secs: u64,
    /// Each source is asked for about this many milliseconds of what it delivers, so a
    /// slow or lossy link holds few chunks (0: always the most, 64 chunks).
    #[arg(long, default_value_t = 3000)]
    request_queue_ms: u64,
    /// Milliseconds between `--json` status lines.
    #[arg(long, default_value_t = 1000)]
    status_every_ms: u64,
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
        /// Initial seeding: give each chunk to one neighbour only until every chunk has
        /// gone out once, so one copy's worth of upload leaves a whole copy in the pool
        /// (for a seeder that will leave early).
        #[arg(long)]
        super_seed: bool,
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
        /// After the file is complete, keep serving it until interrupted.
        #[arg(long)]
        stay: bool,
    },
    /// Relay requests and cache relayed chunks for the pool, holding no file of its own.
    Serve {
        #[command(flatten)]
        join: PoolArgs,
        /// Print JSON lines instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// One status line: the download's progress (if any), what this node uploaded, and its
/// connections.
fn status_json(pool: &Pool, p: Option<&tidepool_node::pool::Progress>) -> serde_json::Value {
    let up = pool.uploaded();
    let node = pool.node().stats();
    let mut v = serde_json::json!({
        "served": up.served_bytes,
        "served_distinct": up.served_distinct_bytes,
        "relayed": up.relayed_bytes,
        "cached": up.cached_bytes,
        "peers": node.connected_peers,
        "udp_drops": node.udp_rcvbuf_errors,
        "bad_chunks": pool.bad_chunks(),
    });
    if let (Some(p), Some(o)) = (p, v.as_object_mut()) {
        o.insert("have".into(), p.have_bytes.into());
        o.insert("total".into(), p.total_bytes.into());
        o.insert("received".into(), p.received_bytes.into());
        o.insert("duplicates".into(), p.duplicates.into());
        o.insert("missing_rounds".into(), p.missing_rounds.into());
        o.insert("sources".into(), p.sources.into());
    }
    v
}

/// Serves until Ctrl-C (or SIGTERM), printing a status line every `status_every_ms` with
/// `--json`.
async fn serve_until_interrupted(
    pool: &Pool,
    json: bool,
    j: &PoolArgs,
    last: Option<tidepool_node::pool::Progress>,
) -> anyhow::Result<()> {
    let mut every = status_interval(j);
    let stop = interrupted();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = every.tick(), if json => println!("{}", status_json(pool, last.as_ref())),
            r = &mut stop => return r,
            reason = pool.node().unauthorized() => anyhow::bail!("{reason}"),
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM. Handled rather than left to the default action so the
/// pool is dropped on the way out, which records a download's held chunks for resuming.
async fn interrupted() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => Ok(r?),
        _ = term.recv() => Ok(()),
    }
}

fn short(p: &PeerId) -> String {
    String::from_utf8_lossy(&p.0).into_owned()
}

fn node_config(j: &PoolArgs) -> NodeConfig {
    let mut config = NodeConfig::new(j.tracker.clone(), &j.pool);
    config.token = j.token.clone().map(tidepool_node::config::BearerToken);
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

fn status_interval(j: &PoolArgs) -> tokio::time::Interval {
    tokio::time::interval(Duration::from_millis(j.status_every_ms.max(10)))
}

async fn start_pool(j: &PoolArgs, super_seed: bool) -> anyhow::Result<Pool> {
    let mut pool_config = PoolConfig {
        cache_bytes: j.cache_mib * 1024 * 1024,
        cache_dir: j.cache_dir.clone(),
        super_seed,
        ..PoolConfig::default()
    };
    pool_config.fetch.missing_after = Duration::from_secs(j.missing_after_secs.max(1));
    pool_config.fetch.give_up_after = Duration::from_secs(j.give_up_after_secs.max(1));
    pool_config.fetch.request_queue_time = Duration::from_millis(j.request_queue_ms);
    let mut config = node_config(j);
    config.max_message_size = Pool::message_size_for(pool_config.chunk_size);
    let node = Node::join(config).await.context("joining the pool")?;
    Ok(Pool::start(node, pool_config)?)
}

/// `RUST_LOG` (or quiet defaults), with tungstenite held at debug: at trace it logs whole
/// upgrade requests, the token's header included.
fn env_filter() -> tracing_subscriber::EnvFilter {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        // The WebRTC stack warns about benign ICE and SCTP events during setup.
        "warn,rtc=error,rtc_ice=error,rtc_dtls=error,rtc_sctp=error,webrtc=error".into()
    });
    match "tungstenite=debug".parse() {
        Ok(ceiling) => filter.add_directive(ceiling),
        Err(_) => filter,
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        // tungstenite logs whole upgrade requests (tokens included) at trace: never below debug.
        .with_env_filter(env_filter())
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Join { join, stats_every } => run_join(&join, stats_every).await,
        Command::Share {
            file,
            join,
            json,
            super_seed,
        } => {
            let pool = start_pool(&join, super_seed).await?;
            let id = pool
                .share(&file)
                .with_context(|| format!("sharing {}", file.display()))?;
            if json {
                println!("{}", serde_json::json!({ "file_id": id.to_hex() }));
            } else {
                println!("sharing {} as {}", file.display(), id.to_hex());
            }
            serve_until_interrupted(&pool, json, &join, None).await
        }
        Command::Serve { join, json } => {
            let pool = start_pool(&join, false).await?;
            let me = pool.node().peer_id();
            if json {
                println!("{}", serde_json::json!({ "serving": short(&me) }));
            } else {
                println!("relaying for pool {:?} as {}", join.pool, short(&me));
            }
            serve_until_interrupted(&pool, json, &join, None).await
        }
        Command::Get {
            file_id,
            output,
            join,
            json,
            stay,
        } => {
            let id = tidepool_node::pool::FileId::from_hex(&file_id)
                .context("FILE_ID must be 64 hex digits")?;
            let pool = start_pool(&join, false).await?;
            // A download first needs the file's metadata from a peer, found through the
            // tracker: a refused token must end the wait there too.
            let download = tokio::select! {
                d = pool.get(id, &output) => d?,
                reason = pool.node().unauthorized() => anyhow::bail!("{reason}"),
            };
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
            let last = download.progress.clone();
            let result = if let Some(bar) = bar {
                let watcher = tokio::spawn(async move {
                    while progress.changed().await.is_ok() {
                        let p = progress.borrow_and_update().clone();
                        bar.set_length(p.total_bytes);
                        bar.set_position(p.have_bytes);
                        bar.set_message(format!("{} peers", p.sources));
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    bar.finish();
                });
                let result = tokio::select! {
                    r = download.finished() => r,
                    reason = pool.node().unauthorized() => anyhow::bail!("{reason}"),
                    r = interrupted() => {
                        r?;
                        anyhow::bail!("interrupted; run the same command again to resume");
                    }
                };
                watcher.abort();
                result
            } else {
                let mut every = status_interval(&join);
                let finished = download.finished();
                tokio::pin!(finished);
                let stop = interrupted();
                tokio::pin!(stop);
                loop {
                    tokio::select! {
                        r = &mut finished => break r,
                        reason = pool.node().unauthorized() => anyhow::bail!("{reason}"),
                        r = &mut stop => {
                            r?;
                            anyhow::bail!("interrupted; run the same command again to resume");
                        }
                        _ = every.tick() => {
                            // Cloned first: a held borrow blocks the pipeline's publishing,
                            // which happens under the lock `status_json` takes.
                            let p = last.borrow().clone();
                            println!("{}", status_json(&pool, Some(&p)));
                        }
                    }
                }
            };
            let path = result?;
            if json {
                // The final state, then the verdict.
                let p = last.borrow().clone();
                println!("{}", status_json(&pool, Some(&p)));
                println!(
                    "{}",
                    serde_json::json!({ "done": path.display().to_string() })
                );
            } else {
                println!("verified and saved to {}", path.display());
            }
            if stay {
                serve_until_interrupted(&pool, json, &join, Some(last.borrow().clone())).await?;
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
                Some(Event::Tracker(TrackerState::Unauthorized(reason))) => {
                    node.leave().await;
                    anyhow::bail!("{reason}");
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
