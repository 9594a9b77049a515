//! What goes into the pool engine and what comes out of it: inputs (neighbours, messages,
//! disk completions), outputs (sends, disk jobs, events), the disk jobs and their results,
//! and the counters. Plain data, shared by the engine, its driver and the simulator.

use std::sync::Arc;

use bytes::Bytes;
use tidepool_protocol::PeerId;
use tidepool_protocol::pool::{ChunkRanges, FileId, FileMeta, Hash, PoolMessage};

use super::Progress;
use crate::Channel;

/// A chunk's bytes and the sibling hashes that prove it. The engine never reads the bytes:
/// the disk side verifies them, so a simulator can pass tokens instead of data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkData {
    /// The chunk.
    pub data: Bytes,
    /// Its proof.
    pub proof: Vec<Hash>,
}

/// What happens to the engine.
#[derive(Debug)]
pub enum Input {
    /// A neighbour's channels are open.
    PeerUp(PeerId),
    /// A neighbour is gone.
    PeerDown(PeerId),
    /// A pool message from a neighbour, on the channel it came on.
    Message {
        /// From whom.
        peer: PeerId,
        /// Which channel.
        channel: Channel,
        /// The message.
        msg: PoolMessage,
    },
    /// A neighbour sent something that does not decode as a pool message.
    Undecodable {
        /// From whom.
        peer: PeerId,
        /// Why it did not decode.
        error: String,
    },
    /// A chunk handed over by [`Output::SendChunk`] left (or could not: `ok == false`).
    Sent {
        /// To whom.
        peer: PeerId,
        /// The neighbour's session the chunk was handed to (from [`Output::SendChunk`]).
        session: u64,
        /// Whether the channel took it.
        ok: bool,
    },
    /// A disk job finished.
    Disk(DiskDone),
    /// The application shares a whole file, already on disk.
    Share {
        /// What it is.
        meta: FileMeta,
        /// Give each chunk out once before any twice (initial seeding).
        super_seed: bool,
    },
    /// The application wants a file; it starts once the file's metadata is heard.
    Get(FileId),
}

/// What the engine wants done.
#[derive(Debug)]
pub enum Output {
    /// Send a control message.
    Send {
        /// To whom.
        peer: PeerId,
        /// What.
        msg: PoolMessage,
        /// Gossip (offers, retracts): dropped rather than queued when the neighbour's
        /// outbox is filling, since it is repeated anyway. Everything else is owed.
        sheddable: bool,
    },
    /// Send a verified chunk on the neighbour's chunk channel; answer with [`Input::Sent`].
    SendChunk {
        /// To whom.
        peer: PeerId,
        /// The neighbour's session: echoed in [`Input::Sent`], so a send of an earlier
        /// connection to the same peer cannot return this one's credit.
        session: u64,
        /// The chunk message's fields.
        file_id: FileId,
        /// The request it answers.
        request_id: u64,
        /// Chunk number.
        index: u32,
        /// Bytes and proof.
        chunk: ChunkData,
        /// Passed on from upstream (else served from this node's copy).
        relayed: bool,
    },
    /// A disk job; answer with [`Input::Disk`].
    Disk(DiskJob),
    /// Drop a neighbour (it broke the protocol or sent bad data).
    Disconnect {
        /// Whom.
        peer: PeerId,
        /// Why.
        reason: String,
    },
    /// A download's progress changed.
    Progress {
        /// Which file.
        file_id: FileId,
        /// Where it stands.
        progress: Progress,
    },
    /// A download ended: the file is in place and shared, or it failed.
    Finished {
        /// Which file.
        file_id: FileId,
        /// What happened.
        result: Result<(), String>,
    },
}

/// Where a verified chunk that arrived should be kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// In this node's download of the file.
    Download,
    /// In the relay cache.
    Cache,
    /// Nowhere (verify it only: it is passed on).
    Nowhere,
}

/// Verify a chunk and keep it.
#[derive(Debug)]
pub struct StoreJob {
    /// Who sent it.
    pub peer: PeerId,
    /// The file.
    pub file_id: FileId,
    /// What the file is (the proof is checked against it).
    pub meta: Arc<FileMeta>,
    /// The request it answered.
    pub request_id: u64,
    /// Chunk number.
    pub index: u32,
    /// Bytes and proof.
    pub chunk: ChunkData,
    /// Where to keep it.
    pub keep: Keep,
    /// Set when it answers a request relayed from here (the id used upstream).
    pub relay: Option<u64>,
}

/// Where a chunk to serve is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadFrom {
    /// A whole file shared here.
    Whole,
    /// A download in progress.
    Download,
    /// The relay cache.
    Cache,
}

/// Read a chunk to send to a neighbour.
#[derive(Debug)]
pub struct ReadJob {
    /// For whom.
    pub peer: PeerId,
    /// The neighbour's session it was read for.
    pub session: u64,
    /// The file.
    pub file_id: FileId,
    /// The request it answers.
    pub request_id: u64,
    /// Chunk number.
    pub index: u32,
    /// From where.
    pub from: ReadFrom,
}

/// Work for the disk side.
#[derive(Debug)]
pub enum DiskJob {
    /// Open (or resume) the download of a file the application asked for.
    Open {
        /// Which.
        file_id: FileId,
        /// What it is.
        meta: Arc<FileMeta>,
    },
    /// Verify and keep a chunk.
    Store(StoreJob),
    /// Read a chunk.
    Read(ReadJob),
    /// Every chunk is in: re-hash, flush, move into place, serve as a whole file.
    Finish {
        /// Which.
        file_id: FileId,
    },
    /// The download failed: close it, keeping what it holds for a later run.
    Close {
        /// Which.
        file_id: FileId,
    },
    /// Drop what the relay cache holds of a file (it is held here another way now).
    EvictCache {
        /// Which.
        file_id: FileId,
    },
}

/// What a store did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// The chunk was new to the download.
    pub new: bool,
    /// The chunk is on disk here and can be served later.
    pub kept: bool,
    /// The relay cache's chunks of the file now, when it was kept there.
    pub cache: Option<ChunkRanges>,
    /// Files the cache evicted to make room.
    pub evicted: Vec<FileId>,
}

/// Why a store failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreFailure {
    /// The chunk does not verify: its sender lied.
    Bad(String),
    /// The disk failed.
    Io(String),
}

/// A finished disk job.
#[derive(Debug)]
pub enum DiskDone {
    /// A download opened: the chunks on disk, and those of them that can be served.
    Opened {
        /// Which.
        file_id: FileId,
        /// `(have, servable)`, or why it could not open.
        result: Result<(ChunkRanges, ChunkRanges), String>,
    },
    /// A store finished.
    Stored {
        /// The job, handed back.
        job: StoreJob,
        /// What happened.
        result: Result<Stored, StoreFailure>,
    },
    /// A read finished; `None` when the chunk is not held there any more.
    Read {
        /// The job, handed back.
        job: ReadJob,
        /// The chunk.
        chunk: Option<ChunkData>,
    },
    /// A finish finished.
    Finished {
        /// Which.
        file_id: FileId,
        /// Whether the file is now whole and in place.
        result: Result<(), String>,
    },
}

/// Counters: what the engine did, and everything it refused or dropped, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Chunk bytes served from this node's own copies.
    pub served_bytes: u64,
    /// Chunk bytes relayed from upstream to a neighbour.
    pub relayed_bytes: u64,
    /// Bytes of the distinct chunks of whole files sent at least once.
    pub served_distinct_bytes: u64,
    /// Chunks received that failed verification.
    pub bad_chunks: u64,
    /// Neighbours dropped for breaking the protocol or sending bad chunks.
    pub dropped_peers: u64,
    /// Offers received.
    pub offers_heard: u64,
    /// Offers ignored: over a neighbour's rate, or of impossible or too-large-chunk files.
    pub offers_ignored: u64,
    /// Chunks of requests refused for a full request queue (answered Unavailable).
    pub requests_refused: u64,
    /// Requests not relayed: no room in the relay table (answered Unavailable).
    pub relays_refused: u64,
    /// Chunks that arrived for no request here (ignored).
    pub chunks_unsolicited: u64,
    /// Chunks dropped because the disk was behind (re-asked after a stall).
    pub chunks_dropped_disk_busy: u64,
    /// Chunks in memory owed to a neighbour, dropped for a full queue (answered
    /// Unavailable).
    pub ready_dropped: u64,
    /// Messages from a peer that is not (or no longer) a neighbour, ignored.
    pub from_strangers: u64,
    /// Chunk sends the channel refused (the connection was closing).
    pub sends_failed: u64,
    /// Catalog entries evicted to stay within the bound.
    pub catalog_evicted: u64,
    /// Now: files in the catalog.
    pub catalog_files: u64,
    /// Now: requests relayed for neighbours.
    pub relayed_requests: u64,
    /// Now: chunks queued to serve, all neighbours together.
    pub queued_chunks: u64,
    /// Now: promises to neighbours.
    pub promises: u64,
}
