//! The chunk pipeline: shares and fetches files through the pool on top of a [`Node`].
//!
//! The decisions live in the sans-IO [`PoolEngine`] (see `engine.rs` for a map of its
//! files); this module is its thin async driver: node events become engine inputs, engine
//! outputs become sends, disk jobs and application events. Each neighbour gets one ordered
//! control outbox bounded in bytes (a neighbour that stops reading its control channel is
//! dropped once it is full) and one chunk outbox the engine keeps to `send_window` chunks.
//! Disk work runs on the disk thread (`disk.rs`) and comes back as inputs, so hashing and
//! writing never hold up the event loop. [`sim`] runs many engines on a simulated network.

mod config;
mod disk;
mod driver;
pub mod engine;
mod events;
#[doc(hidden)]
pub mod fuzz;
mod gossip;
mod neighbour;
mod relay;
mod requests;
mod serve;
pub mod sim;
#[cfg(test)]
mod tests;
mod timer;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Instant;

pub use tidepool_protocol::pool::FileId;
use tidepool_protocol::pool::PoolLimits;
use tokio::sync::{mpsc, oneshot, watch};

pub use config::{MAX_CHUNK_SIZE, PoolConfig};
pub use engine::{EngineStats, Input, Output, PoolEngine};

use crate::Node;
use crate::cache::RelayCache;
use crate::store::{SharedFile, StoreError};

/// What can go wrong in the pipeline.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The node's messages cannot carry a chunk of this size with its proof.
    #[error("node max_message_size {have} cannot carry {chunk}-byte chunks (needs {need})")]
    MessageTooSmall {
        /// The node's limit.
        have: usize,
        /// The chunk size.
        chunk: u32,
        /// What it needs.
        need: usize,
    },
    /// Reading, writing or verifying files.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The download could not finish.
    #[error("download failed: {0}")]
    Failed(String),
    /// The pool stopped before the download finished.
    #[error("the pool stopped")]
    Stopped,
}

/// A download's progress.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    /// Verified bytes held.
    pub have_bytes: u64,
    /// File size.
    pub total_bytes: u64,
    /// Chunk payload bytes received, duplicates included.
    pub received_bytes: u64,
    /// Chunks that arrived twice.
    pub duplicates: u64,
    /// Re-requests after stalls (chunks-missing rounds).
    pub missing_rounds: u64,
    /// Neighbours currently serving the file.
    pub sources: usize,
}

/// Upload counters of one node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Uploaded {
    /// Chunk bytes served from this node's own copies.
    pub served_bytes: u64,
    /// Chunk bytes relayed from upstream to a neighbour.
    pub relayed_bytes: u64,
    /// Bytes of the distinct chunks of whole files sent at least once: one file's size
    /// here means a seeder has put a whole copy into the pool.
    pub served_distinct_bytes: u64,
    /// Chunk bytes held in the relay cache now.
    pub cached_bytes: u64,
}

/// A running download: watch its progress, then await the finished file.
#[derive(Debug)]
pub struct Download {
    /// Live progress.
    pub progress: watch::Receiver<Progress>,
    done: oneshot::Receiver<Result<PathBuf, PoolError>>,
}

impl Download {
    /// Waits for the verified file at its final path.
    pub async fn finished(self) -> Result<PathBuf, PoolError> {
        self.done.await.unwrap_or(Err(PoolError::Stopped))
    }
}

/// What the application asks of the driver.
enum Command {
    Share(tidepool_protocol::pool::FileMeta),
    Get {
        file_id: FileId,
        target: PathBuf,
        reply: oneshot::Sender<Download>,
    },
}

struct Shared {
    node: Node,
    config: PoolConfig,
    stats: Mutex<EngineStats>,
    /// Neighbours dropped because their control outbox filled (they stopped reading).
    slow_readers: std::sync::atomic::AtomicU64,
    /// Gossip messages not sent because the neighbour's outbox was filling.
    gossip_shed: std::sync::atomic::AtomicU64,
    disk_counters: Arc<disk::DiskCounters>,
}

/// The pipeline over one node. Dropping it stops the pipeline (and the node).
pub struct Pool {
    shared: Arc<Shared>,
    commands: mpsc::UnboundedSender<Command>,
    disk: std::sync::mpsc::Sender<disk::DiskMsg>,
    disk_thread: Option<std::thread::JoinHandle<()>>,
    stopping: disk::Stopping,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("peer_id", &self.shared.node.peer_id())
            .finish_non_exhaustive()
    }
}

impl Drop for Pool {
    /// Stops the pipeline and leaves the pool; the disk thread closes the downloads (each
    /// records what it holds, for the next run to resume) before this returns. Queued disk
    /// jobs are skipped, so this waits for the one running at most (a chunk's read or
    /// write) — brief, and what lets a restarted pool resume from what is on disk.
    fn drop(&mut self) {
        self.task.abort();
        self.shared.node.close();
        self.stopping.store(true, Relaxed);
        let _ = self.disk.send(disk::DiskMsg::Stop);
        if let Some(t) = self.disk_thread.take() {
            let _ = t.join();
        }
    }
}

impl Pool {
    /// Runs the pipeline on `node` (which it now owns: its events drive the pipeline).
    pub fn start(node: Node, mut config: PoolConfig) -> Result<Pool, PoolError> {
        let need = Self::message_size_for(config.chunk_size);
        let have = node.config().max_message_size;
        if have < need {
            return Err(PoolError::MessageTooSmall {
                have,
                chunk: config.chunk_size,
                need,
            });
        }
        // The largest chunk a message of the node's size can carry with its proof.
        let carried = have.saturating_sub(Self::message_size_for(0));
        config.max_chunk_size = config.max_chunk_size.min(MAX_CHUNK_SIZE).min(carried);
        let limits = PoolLimits {
            max_chunk: config.max_chunk_size,
            ..PoolLimits::default()
        };
        let cache = if config.cache_bytes > 0 {
            let dir = config.cache_dir.clone().unwrap_or_else(|| {
                std::env::temp_dir().join(format!("tidepool-cache-{}", node.peer_id().to_hex()))
            });
            Some(RelayCache::open(&dir, config.cache_bytes)?)
        } else {
            None
        };
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let counters = Arc::new(disk::DiskCounters::default());
        let stopping = disk::Stopping::default();
        let (disk_tx, disk_thread) = disk::start(
            cache,
            (config.corrupt_outgoing, config.slow_finish),
            done_tx,
            counters.clone(),
            stopping.clone(),
        )
        .map_err(|e| StoreError::Io {
            path: PathBuf::from("<disk thread>"),
            source: e,
        })?;
        // Request ids come from this: unpredictable, so no peer can forge a chunk or a
        // report for another's request (the simulator seeds its engines instead).
        let seed = fastrand::u64(..);
        let engine = PoolEngine::new(node.peer_id(), config.clone(), Instant::now(), seed);
        let shared = Arc::new(Shared {
            node,
            config,
            stats: Mutex::new(EngineStats::default()),
            slow_readers: Default::default(),
            gossip_shed: Default::default(),
            disk_counters: counters,
        });
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let driver = driver::Driver::new(shared.clone(), engine, limits, disk_tx.clone());
        let task = tokio::spawn(driver.run(commands_rx, done_rx));
        Ok(Pool {
            shared,
            commands,
            disk: disk_tx,
            disk_thread: Some(disk_thread),
            stopping,
            task,
        })
    }

    /// The node underneath (peers, stats).
    pub fn node(&self) -> &Node {
        &self.shared.node
    }

    /// The message size a node needs to carry `chunk_size` chunks with their proofs.
    pub fn message_size_for(chunk_size: u32) -> usize {
        chunk_size as usize + 2 + 32 + 8 + 4 + 1 + 32 * 32 + 4
    }

    /// The peak RSS, in bytes, a node running this pipeline stays within with
    /// `connections` peers: 64 MiB for the runtime, the WebRTC stack and the allocator's
    /// arenas; the chunks waiting for the disk (`disk_queue`); and for each connection its
    /// configured buffers — both channels' send limits, the SCTP receive window, the chunks
    /// owed to it in memory (`relay_queue`) and in progress (`send_window`), its control
    /// outbox — with half as much again for allocator slack. Requests queue as ranges, not
    /// data; proofs stay on disk; downloads stream to disk: file size does not appear.
    /// Checked against a relay passing a 64 MiB file to four fetchers in
    /// `load_test/tests/pool.rs`, and against a file of many chunks in the pipeline tests.
    pub fn memory_bound(node: &crate::NodeConfig, pool: &PoolConfig, connections: usize) -> u64 {
        let chunk = Self::message_size_for(pool.chunk_size) as u64;
        let per_connection = 2 * node.send_buffer_limit as u64
            + u64::from(node.sctp_receive_window)
            + (pool.relay_queue + pool.send_window) as u64 * chunk
            + pool.control_outbox_bytes as u64;
        (64 << 20) + pool.disk_queue as u64 * chunk + connections as u64 * per_connection * 3 / 2
    }

    fn stats(&self) -> EngineStats {
        *self.shared.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Everything the engine counted, refusals and drops included.
    pub fn engine_stats(&self) -> EngineStats {
        self.stats()
    }

    /// Chunks received that failed verification (their senders were dropped).
    pub fn bad_chunks(&self) -> u64 {
        self.stats().bad_chunks
    }

    /// Peers this pipeline disconnected for breaking the protocol, sending bad chunks, or
    /// not reading their control channel.
    pub fn dropped_peers(&self) -> u64 {
        self.stats().dropped_peers + self.dropped_slow_readers()
    }

    /// Peers dropped because they stopped reading their control channel (its outbox, of
    /// `control_outbox_bytes`, filled).
    pub fn dropped_slow_readers(&self) -> u64 {
        self.shared.slow_readers.load(Relaxed)
    }

    /// Gossip (offers, retracts) not sent because a neighbour's control outbox was
    /// filling; it is repeated, so this costs freshness, not correctness.
    pub fn gossip_shed(&self) -> u64 {
        self.shared.gossip_shed.load(Relaxed)
    }

    /// What this node has sent: chunk bytes served from its own copies (whole, partial or
    /// cached), and chunk bytes passed on from upstream for others.
    pub fn uploaded(&self) -> Uploaded {
        let s = self.stats();
        Uploaded {
            served_bytes: s.served_bytes,
            relayed_bytes: s.relayed_bytes,
            served_distinct_bytes: s.served_distinct_bytes,
            cached_bytes: self.shared.disk_counters.cached_bytes.load(Relaxed),
        }
    }

    /// Serves `path` to the pool; returns its file id. The file is read once, here, for
    /// its hash tree; chunks are then read on demand by the disk thread.
    pub fn share(&self, path: &Path) -> Result<FileId, PoolError> {
        let shared = Arc::new(SharedFile::open(path, self.shared.config.chunk_size)?);
        let id = shared.id();
        let meta = shared.meta().clone();
        meta.chunk_count().map_err(StoreError::from)?;
        // The disk thread has the file before the engine can ask to read it.
        self.disk
            .send(disk::DiskMsg::Share(shared))
            .map_err(|_| PoolError::Stopped)?;
        self.commands
            .send(Command::Share(meta))
            .map_err(|_| PoolError::Stopped)?;
        Ok(id)
    }

    /// Fetches `file_id` into `target`, resuming from `target.part` if a previous run left
    /// one. Returns once an offer of the file has reached this node and the download runs.
    pub async fn get(&self, file_id: FileId, target: &Path) -> Result<Download, PoolError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Get {
                file_id,
                target: target.to_owned(),
                reply,
            })
            .map_err(|_| PoolError::Stopped)?;
        rx.await.map_err(|_| PoolError::Stopped)
    }
}
