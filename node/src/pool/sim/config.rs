//! What a simulation runs (pool size, file, links, churn) and what it reports.

use std::time::Duration;

use crate::pool::PoolConfig;

/// What to simulate.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Downloading nodes.
    pub nodes: usize,
    /// File size in bytes.
    pub file_size: u64,
    /// The pipeline's config on every node (its `chunk_size` is the file's).
    pub pool: PoolConfig,
    /// Uplink of every downloader, bytes per second.
    pub uplink: u64,
    /// Uplink of the seeder, bytes per second.
    pub seeder_uplink: u64,
    /// One-way latency of a link; each link draws its own within ±50%.
    pub latency: Duration,
    /// Neighbours per node, as `NodeConfig::max_peers`.
    pub max_peers: usize,
    /// Offers per announce, as `NodeConfig::offers_per_announce`.
    pub offers_per_announce: usize,
    /// How often a node below `max_peers` announces again.
    pub announce_interval: Duration,
    /// Offer to open channels.
    pub connect_delay: Duration,
    /// How long a neighbour takes to notice a killed node (the heartbeat timeout).
    pub detect_down: Duration,
    /// Downloaders join spread over this long.
    pub join_spread: Duration,
    /// Churn.
    pub churn: Churn,
    /// The seeder super-seeds and leaves once it has sent one full copy and that copy has
    /// arrived (every chunk held by some downloader).
    pub seeder_leaves_after_copy: bool,
    /// Give up at this virtual time.
    pub time_limit: Duration,
    /// The seed of everything random.
    pub seed: u64,
}

/// Nodes killed, restarted and joining late.
#[derive(Debug, Clone, Default)]
pub struct Churn {
    /// Share of downloaders killed for good, at a random time in `window`.
    pub kill: f64,
    /// Share of downloaders killed and restarted (from their partial file) 1–5 s later.
    pub restart: f64,
    /// Share of downloaders that join at a random time in `window` instead of at the start.
    pub late: f64,
    /// When churn happens (virtual time from the start).
    pub window: (Duration, Duration),
}

impl SimConfig {
    /// `nodes` downloaders and one seeder, a file of `file_size` bytes, 100 Mbit/s links
    /// with 20 ms latency, and the node's and pipeline's defaults.
    pub fn new(nodes: usize, file_size: u64, seed: u64) -> Self {
        Self {
            nodes,
            file_size,
            pool: PoolConfig {
                cache_bytes: 0,
                ..PoolConfig::default()
            },
            uplink: 12_500_000,
            seeder_uplink: 12_500_000,
            latency: Duration::from_millis(20),
            max_peers: 8,
            offers_per_announce: 4,
            announce_interval: Duration::from_secs(10),
            connect_delay: Duration::from_millis(200),
            detect_down: Duration::from_secs(10),
            join_spread: Duration::from_secs(2),
            churn: Churn::default(),
            seeder_leaves_after_copy: false,
            time_limit: Duration::from_secs(3600),
            seed,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct SimReport {
    /// Downloaders alive at the end.
    pub survivors: usize,
    /// Of those, how many hold the whole, verified file.
    pub completed: usize,
    /// Virtual seconds until the last survivor completed (or the limit).
    pub virtual_secs: f64,
    /// Median completion time of survivors, virtual seconds from their (last) join.
    pub median_secs: f64,
    /// Chunk bytes received by all downloaders, over the bytes they needed.
    pub received_ratio: f64,
    /// Chunks that arrived twice, over chunks needed, as a percentage.
    pub duplicate_pct: f64,
    /// Chunks-missing rounds, all nodes together.
    pub missing_rounds: u64,
    /// Chunk bytes that left the seeder's uplink (whole chunks).
    pub seeder_sent: u64,
    /// Events processed.
    pub events: u64,
    /// A hash of every event: equal for equal configs.
    pub digest: u64,
    /// Nodes alive at the end that did not complete, with what they held.
    pub unfinished: Vec<(usize, u64)>,
    /// Chunks that failed verification (none in an honest pool).
    pub bad_chunks: u64,
    /// Each virtual second: (seconds, downloaders complete, bytes held by all downloaders,
    /// bytes the seeder sent).
    pub timeline: Vec<(u64, usize, u64, u64)>,
}

impl std::fmt::Display for SimReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{} survivors complete in {:.1} virtual s (median {:.1} s); received {:.3}x the \
             bytes needed, duplicates {:.2}%, chunks-missing rounds {}, {} events, digest {:016x}",
            self.completed,
            self.survivors,
            self.virtual_secs,
            self.median_secs,
            self.received_ratio,
            self.duplicate_pct,
            self.missing_rounds,
            self.events,
            self.digest
        )
    }
}
