//! The pipeline's tunables, each with its default and the bound it puts on what a peer
//! can make this node hold.

use std::path::PathBuf;
use std::time::Duration;

use crate::fetch::FetchConfig;

/// The largest chunk this pipeline accepts from peers (a file's chunk size travels in its
/// metadata; files with bigger chunks are not fetched, and their offers are ignored).
pub const MAX_CHUNK_SIZE: usize = 1024 * 1024;

/// Tunables of the pipeline. Every queue a peer can fill has its bound here.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Bytes per chunk for files this node shares (64 KiB measured best, DESIGN §6).
    pub chunk_size: u32,
    /// Request timing and bounds of every download.
    pub fetch: FetchConfig,
    /// How far file offers are gossiped, in hops.
    pub offer_hops: u8,
    /// Chunks queued to serve per neighbour (as ranges, no data); a request past it is
    /// answered Unavailable and the requester asks elsewhere.
    pub request_queue: u64,
    /// Chunks in memory owed to a neighbour (relayed or promised), per neighbour.
    pub relay_queue: usize,
    /// Chunks being read or sent per neighbour: the disk and channel work one neighbour
    /// can have in progress.
    pub send_window: usize,
    /// Bytes of control messages queued per neighbour; a neighbour that lets it fill (it
    /// stopped reading) is dropped.
    pub control_outbox_bytes: usize,
    /// Chunks waiting for the disk to verify and keep them; past it an arriving chunk is
    /// dropped (and counted) and re-asked after a stall.
    pub disk_queue: usize,
    /// Files known from offers (least recently heard evicted first), and files remembered
    /// per neighbour as held or relayable.
    pub max_catalog: usize,
    /// Offers heard from farther away passed on to each new neighbour and every
    /// `5 × reoffer_interval`, newest first.
    pub regossip: usize,
    /// Requests relayed for neighbours, in all and per neighbour.
    pub max_relayed: usize,
    /// See `max_relayed`.
    pub max_relayed_per_peer: usize,
    /// File offers accepted per neighbour per second, and in a burst; more are ignored.
    pub offer_rate: u32,
    /// See `offer_rate`.
    pub offer_burst: u32,
    /// The largest chunk accepted from peers (at most [`MAX_CHUNK_SIZE`], and what the
    /// node's `max_message_size` can carry).
    pub max_chunk_size: usize,
    /// A download re-announces what it holds this often, so downloaders serve each other.
    pub reoffer_interval: Duration,
    /// Bytes of relayed chunks kept on disk to serve again (0: no relay cache).
    pub cache_bytes: u64,
    /// Where the relay cache lives; by default a per-node directory under the system's
    /// temp dir, removed when the pool stops.
    pub cache_dir: Option<PathBuf>,
    /// Initial seeding ("super-seeding"): a file this node shares goes out one chunk to one
    /// neighbour at a time until every chunk has gone out once; asked again for a chunk
    /// already given out, it answers Unavailable and the asker gets it from whoever has it.
    /// Chunks given to a neighbour that left count as not given.
    pub super_seed: bool,
    /// Test hook: corrupt every chunk this node serves from disk (to test that peers drop it).
    #[doc(hidden)]
    pub corrupt_outgoing: bool,
    /// Test hook: a finished download's re-hash takes this much longer (to test that a
    /// slow finish holds up nothing).
    #[doc(hidden)]
    pub slow_finish: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            chunk_size: 64 * 1024,
            fetch: FetchConfig::default(),
            offer_hops: 3,
            request_queue: 4096,
            relay_queue: 64,
            send_window: 16,
            control_outbox_bytes: 1 << 20,
            disk_queue: 256,
            max_catalog: 1024,
            regossip: 64,
            max_relayed: 4096,
            max_relayed_per_peer: 256,
            offer_rate: 200,
            offer_burst: 1000,
            max_chunk_size: MAX_CHUNK_SIZE,
            reoffer_interval: Duration::from_secs(1),
            cache_bytes: 256 * 1024 * 1024,
            cache_dir: None,
            super_seed: false,
            corrupt_outgoing: false,
            slow_finish: Duration::ZERO,
        }
    }
}
