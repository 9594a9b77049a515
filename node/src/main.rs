//! `tidepool-node`: command-line entry point. `join` connects to a pool and prints peers as
//! they come and go, and the node's stats on an interval (the chunk commands come with the
//! chunk pipeline).

use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use mimalloc::MiMalloc;
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

#[derive(Debug, Subcommand)]
enum Command {
    /// Join a pool; print peers as they come and go, and stats every interval.
    Join {
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
        /// Seconds between stats lines (0 = none).
        #[arg(long, default_value_t = 10)]
        stats_every: u64,
        /// STUN/TURN server URL (repeatable).
        #[arg(long = "ice-server")]
        ice_servers: Vec<String>,
        /// Seconds full and unchanged before making room for a starved peer.
        #[arg(long)]
        rotate_after_secs: Option<u64>,
    },
}

fn short(p: &PeerId) -> String {
    String::from_utf8_lossy(&p.0).into_owned()
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
    let Command::Join {
        tracker,
        pool,
        loopback,
        max_peers,
        stats_every,
        ice_servers,
        rotate_after_secs,
    } = Cli::parse().command;
    let mut config = NodeConfig::new(tracker, &pool);
    if loopback {
        config = config.for_loopback();
    }
    config.max_peers = max_peers;
    if let Some(secs) = rotate_after_secs {
        config.rotate_after = Duration::from_secs(secs);
    }
    config.ice_servers = ice_servers
        .into_iter()
        .map(|url| tidepool_node::IceServer {
            urls: vec![url],
            ..Default::default()
        })
        .collect();
    let node = Node::join(config).await.context("joining the pool")?;
    println!(
        "joined pool {pool:?} as {} (info hash {})",
        short(&node.peer_id()),
        tidepool_node::config::pool_info_hash(&pool).to_hex()
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
