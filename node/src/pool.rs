//! The chunk pipeline's I/O shell: shares and fetches files through the pool on top of a
//! [`Node`]. File offers are gossiped through the mesh (de-duplicated by origin and sequence
//! number, with a hop budget); requests go to neighbours that hold the chunks, spread by the
//! sans-IO [`Fetch`] core; every chunk is verified against the file's hash tree before it is
//! written, served on, or counted, and a peer that sends a bad one is dropped. Each
//! neighbour is served by its own task from a bounded request queue, so one slow peer does
//! not stall the others, and a send waits for room in the channel (back-pressure).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tidepool_protocol::PeerId;
pub use tidepool_protocol::pool::FileId;
use tidepool_protocol::pool::{ChunkRanges, FileMeta, Hash, PoolLimits, PoolMessage};
use tokio::sync::{mpsc, oneshot, watch};

use crate::cache::RelayCache;
use crate::fetch::{Fetch, FetchConfig, FetchOutput};
use crate::store::{PartialFile, SharedFile, StoreError};
use crate::{Channel, Event, Node};

/// Tunables of the pipeline.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Bytes per chunk for files this node shares (64 KiB measured best, DESIGN §6).
    pub chunk_size: u32,
    /// Request timing and bounds of every download.
    pub fetch: FetchConfig,
    /// How far file offers are gossiped, in hops.
    pub offer_hops: u8,
    /// Requests queued per neighbour (ranges only, no data); more are dropped and the
    /// requester re-asks on a stall. Requests are often one chunk each (one per chunk that
    /// arrived), so this is well above `fetch.max_in_flight`.
    pub request_queue: usize,
    /// Chunks relayed from upstream queued per neighbour (this many chunk buffers at most).
    /// A requester keeps at most `fetch.max_in_flight` chunks outstanding per source, so
    /// the same bound here means a relay drops a chunk only past that.
    pub relay_queue: usize,
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
    /// The first copy's worth of upload is then a whole copy in the pool, so a seeder that
    /// leaves after uploading one copy leaves a pool that can finish. Chunks given to a
    /// neighbour that left count as not given.
    pub super_seed: bool,
    /// Test hook: corrupt every chunk this node sends (to test that peers drop it).
    #[doc(hidden)]
    pub corrupt_outgoing: bool,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            chunk_size: 64 * 1024,
            fetch: FetchConfig::default(),
            offer_hops: 3,
            request_queue: 1024,
            relay_queue: 64,
            reoffer_interval: Duration::from_secs(1),
            cache_bytes: 256 * 1024 * 1024,
            cache_dir: None,
            super_seed: false,
            corrupt_outgoing: false,
        }
    }
}

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
    /// Live progress. Clone what you need out of a borrow before calling into the pool:
    /// the pipeline publishes under its own lock, so a borrow held across a pool call can
    /// deadlock.
    pub progress: watch::Receiver<Progress>,
    done: oneshot::Receiver<Result<PathBuf, PoolError>>,
}

impl Download {
    /// Waits for the verified file at its final path.
    pub async fn finished(self) -> Result<PathBuf, PoolError> {
        self.done.await.unwrap_or(Err(PoolError::Stopped))
    }
}

struct Active {
    part: PartialFile,
    fetch: Fetch<PeerId>,
    done: Option<oneshot::Sender<Result<PathBuf, PoolError>>>,
    progress: watch::Sender<Progress>,
    received: u64,
    offered: ChunkRanges,
    last_offer: Instant,
}

/// A request to serve, queued for one neighbour's sender task.
struct Serve {
    file_id: FileId,
    request_id: u64,
    ranges: ChunkRanges,
}

/// The queues of one neighbour's sender task: requests to serve from held chunks, and
/// chunks already in memory and encoded for this neighbour (relayed from upstream, or
/// promised and just arrived).
#[derive(Clone)]
struct PeerQueues {
    requests: mpsc::Sender<Serve>,
    ready: mpsc::Sender<Ready>,
}

/// An encoded chunk message waiting in a neighbour's queue.
struct Ready {
    frame: Vec<u8>,
    /// Chunk payload bytes, for the upload counters.
    payload: u64,
    /// Passed on from upstream (else served from this node's own copy).
    relayed: bool,
}

/// Chunks a downloading node promised a neighbour that asked before they arrived here:
/// sent from this download as they come in. Forwarding such requests upstream instead
/// brought each chunk over two hops while the relay fetched its own copy over a third
/// (a quarter of a 16-node pool's bytes, measured).
struct Promise {
    peer: PeerId,
    request_id: u64,
    chunks: ChunkRanges,
}

/// Open promises kept per neighbour and file; a requester keeps a few requests per source
/// open, and one that asks for more gets the newest kept (it re-asks for the rest).
const MAX_PROMISES_PER_PEER: usize = 64;

/// Cancelled request ids remembered, all neighbours together.
const MAX_CANCELLED: usize = 4096;

/// What a neighbour can fetch for us, learned from the offers it forwarded.
#[derive(Debug, Default, Clone)]
struct Route {
    via: ChunkRanges,
    /// The most hops left on an offer it forwarded: higher means nearer a holder.
    hops: u8,
}

/// A request this node forwarded upstream on behalf of a neighbour.
struct Relayed {
    downstream: PeerId,
    downstream_id: u64,
    file_id: FileId,
    upstream: PeerId,
    outstanding: ChunkRanges,
    /// Who asked first, and the hops the request had left here (to send it on again).
    requester: PeerId,
    hops_left: u8,
}

#[derive(Default)]
struct State {
    complete: HashMap<FileId, Arc<SharedFile>>,
    active: HashMap<FileId, Active>,
    catalog: HashMap<FileId, FileMeta>,
    /// What each neighbour holds of each file (from its own offers).
    holders: HashMap<FileId, HashMap<PeerId, ChunkRanges>>,
    /// What each neighbour can fetch for us: offers it forwarded from farther holders.
    /// With the most hops left of any offer it passed on: the higher, the nearer a holder.
    routes: HashMap<FileId, HashMap<PeerId, Route>>,
    /// Requests forwarded upstream, by the id used upstream.
    relayed: HashMap<u64, Relayed>,
    /// The latest offer heard for each file held elsewhere, ready to pass on (hops already
    /// spent), so a neighbour that connects later still learns where files are.
    heard: HashMap<FileId, PoolMessage>,
    seen: HashSet<(PeerId, u64)>,
    senders: HashMap<PeerId, PeerQueues>,
    cancelled: HashSet<(PeerId, u64)>,
    waiting: Vec<(FileId, PathBuf, oneshot::Sender<Download>)>,
    last_complete_offer: Option<Instant>,
    /// Chunks relayed for others, kept to serve again.
    cache: Option<RelayCache>,
    /// Chunks of active downloads promised to neighbours, by file.
    promises: HashMap<FileId, Vec<Promise>>,
    /// Chunks of each whole file sent at least once.
    sent_once: HashMap<FileId, ChunkRanges>,
    /// Shared files in their initial seeding pass: the chunks given to each neighbour.
    super_seeding: HashMap<FileId, HashMap<PeerId, ChunkRanges>>,
    /// What was last offered of each cached file, and when.
    cache_offered: HashMap<FileId, ChunkRanges>,
    last_cache_offer: Option<Instant>,
}

struct Inner {
    node: Node,
    config: PoolConfig,
    limits: PoolLimits,
    state: Mutex<State>,
    seq: AtomicU64,
    bad_chunks: AtomicU64,
    dropped_peers: AtomicU64,
    served_bytes: AtomicU64,
    relayed_bytes: AtomicU64,
    served_distinct_bytes: AtomicU64,
}

impl Inner {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn me(&self) -> PeerId {
        self.node.peer_id()
    }

    /// Sends a control message without blocking the caller.
    fn send_control(self: &Arc<Self>, peer: PeerId, msg: &PoolMessage) {
        let mut buf = Vec::new();
        msg.encode(&mut buf);
        let inner = self.clone();
        tokio::spawn(async move {
            if let Err(e) = inner.node.send(peer, Channel::Control, &buf).await {
                tracing::info!(?peer, "control message not sent: {e}");
            }
        });
    }

    /// An offer of a partial copy (a download's or the relay cache's): neighbours only,
    /// since it changes too often to gossip further.
    fn neighbour_offer(&self, meta: &FileMeta, have: ChunkRanges) -> PoolMessage {
        let mut offer = self.offer(meta, have);
        if let PoolMessage::FileOffer { hops, .. } = &mut offer {
            *hops = 0;
        }
        offer
    }

    fn offer(&self, meta: &FileMeta, have: ChunkRanges) -> PoolMessage {
        PoolMessage::FileOffer {
            origin: self.me(),
            seq: self.seq.fetch_add(1, Relaxed),
            hops: self.config.offer_hops,
            meta: meta.clone(),
            have,
        }
    }
}

/// The pipeline over one node. Dropping it stops the pipeline (and the node).
pub struct Pool {
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("peer_id", &self.inner.me())
            .finish_non_exhaustive()
    }
}

impl Drop for Pool {
    /// Stops the pipeline and leaves the pool: the serving tasks hold the pipeline's state
    /// (and so the node) alive, so the node is closed and their queues are dropped here.
    fn drop(&mut self) {
        self.task.abort();
        self.inner.node.close();
        let mut st = self.inner.state();
        st.senders.clear();
        st.waiting.clear();
        // Dropping the downloads records what each holds, for the next run to resume.
        st.active.clear();
    }
}

impl Pool {
    /// Runs the pipeline on `node` (which it now owns: its events drive the pipeline).
    pub fn start(node: Node, config: PoolConfig) -> Result<Pool, PoolError> {
        // Header, ids, index, proof of up to 32 hashes, length.
        let need = config.chunk_size as usize + 2 + 32 + 8 + 4 + 1 + 32 * 32 + 4;
        let have = node.config().max_message_size;
        if have < need {
            return Err(PoolError::MessageTooSmall {
                have,
                chunk: config.chunk_size,
                need,
            });
        }
        let limits = PoolLimits {
            max_chunk: config.chunk_size as usize,
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
        let inner = Arc::new(Inner {
            node,
            config,
            limits,
            state: Mutex::new(State {
                cache,
                ..State::default()
            }),
            seq: AtomicU64::new(1),
            bad_chunks: AtomicU64::new(0),
            dropped_peers: AtomicU64::new(0),
            served_bytes: AtomicU64::new(0),
            relayed_bytes: AtomicU64::new(0),
            served_distinct_bytes: AtomicU64::new(0),
        });
        let task = tokio::spawn(run(inner.clone()));
        Ok(Pool { inner, task })
    }

    /// The node underneath (peers, stats).
    pub fn node(&self) -> &Node {
        &self.inner.node
    }

    /// The message size a node needs to carry `chunk_size` chunks with their proofs.
    pub fn message_size_for(chunk_size: u32) -> usize {
        chunk_size as usize + 2 + 32 + 8 + 4 + 1 + 32 * 32 + 4
    }

    /// The peak RSS, in bytes, a node running this pipeline stays within with
    /// `connections` peers: 64 MiB for the runtime, the WebRTC stack and the allocator's
    /// arenas, plus for each connection its configured buffers — both channels' send
    /// limits, the SCTP receive window and the relay queue's chunk buffers — with half as
    /// much again for allocator slack. Requests queue as ranges, not data, and downloads
    /// stream to disk, so file size does not appear. Checked against a relay passing a
    /// 64 MiB file to four fetchers in `load_test/tests/pool.rs`.
    pub fn memory_bound(node: &crate::NodeConfig, pool: &PoolConfig, connections: usize) -> u64 {
        let per_connection = 2 * node.send_buffer_limit as u64
            + u64::from(node.sctp_receive_window)
            + pool.relay_queue as u64 * Self::message_size_for(pool.chunk_size) as u64;
        (64 << 20) + connections as u64 * per_connection * 3 / 2
    }

    /// Chunks received that failed verification (their senders were dropped).
    pub fn bad_chunks(&self) -> u64 {
        self.inner.bad_chunks.load(Relaxed)
    }

    /// Peers this pipeline disconnected for breaking the protocol or sending bad chunks.
    pub fn dropped_peers(&self) -> u64 {
        self.inner.dropped_peers.load(Relaxed)
    }

    /// What this node has sent: chunk bytes served from its own copies (whole, partial or
    /// cached), and chunk bytes passed on from upstream for others.
    pub fn uploaded(&self) -> Uploaded {
        let st = self.inner.state();
        Uploaded {
            served_bytes: self.inner.served_bytes.load(Relaxed),
            relayed_bytes: self.inner.relayed_bytes.load(Relaxed),
            served_distinct_bytes: self.inner.served_distinct_bytes.load(Relaxed),
            cached_bytes: st.cache.as_ref().map_or(0, RelayCache::used),
        }
    }

    /// Serves `path` to the pool; returns its file id. The file is read once for its hash
    /// tree, then chunks are read on demand.
    pub fn share(&self, path: &Path) -> Result<FileId, PoolError> {
        let shared = Arc::new(SharedFile::open(path, self.inner.config.chunk_size)?);
        let id = shared.id();
        let meta = shared.meta().clone();
        let count = meta.chunk_count().map_err(StoreError::from)?;
        let peers = {
            let mut st = self.inner.state();
            st.catalog.insert(id, meta.clone());
            st.complete.insert(id, shared);
            if self.inner.config.super_seed {
                st.super_seeding.insert(id, HashMap::new());
            }
            if let Some(c) = st.cache.as_mut() {
                c.evict(&id);
            }
            st.senders.keys().copied().collect::<Vec<_>>()
        };
        let offer = self.inner.offer(&meta, ChunkRanges::full(count));
        for p in peers {
            self.inner.send_control(p, &offer);
        }
        Ok(id)
    }

    /// Fetches `file_id` into `target`, resuming from `target.part` if a previous run left
    /// one. Waits until an offer of the file has reached this node.
    pub async fn get(&self, file_id: FileId, target: &Path) -> Result<Download, PoolError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut st = self.inner.state();
            st.waiting.push((file_id, target.to_owned(), tx));
        }
        // The tick starts it as soon as the metadata is known.
        rx.await.map_err(|_| PoolError::Stopped)
    }
}

async fn run(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            event = inner.node.next_event() => match event {
                Some(e) => on_event(&inner, e),
                None => return,
            },
            _ = tick.tick() => on_tick(&inner),
        }
    }
}

fn on_event(inner: &Arc<Inner>, event: Event) {
    match event {
        Event::PeerConnected { peer } => {
            let offers: Vec<PoolMessage> = {
                let mut st = inner.state();
                sender_for(inner, &mut st, peer);
                let mut v: Vec<PoolMessage> = st
                    .complete
                    .values()
                    .filter_map(|f| {
                        let n = f.meta().chunk_count().ok()?;
                        Some(inner.offer(f.meta(), ChunkRanges::full(n)))
                    })
                    .collect();
                v.extend(
                    st.active
                        .values()
                        .filter(|a| !a.part.servable().is_empty())
                        .map(|a| inner.neighbour_offer(a.part.meta(), a.part.servable().clone())),
                );
                if let Some(c) = &st.cache {
                    v.extend(
                        c.held()
                            .map(|(meta, have)| inner.neighbour_offer(meta, have.clone())),
                    );
                }
                v.extend(
                    st.heard
                        .iter()
                        .filter(|(id, _)| !st.complete.contains_key(id))
                        .map(|(_, m)| m.clone()),
                );
                v
            };
            for o in &offers {
                inner.send_control(peer, o);
            }
        }
        Event::PeerDisconnected { peer, .. } => {
            // A replaced connection's goodbye can come after its successor's hello.
            if inner.node.connected_peers().contains(&peer) {
                return;
            }
            let mut st = inner.state();
            st.senders.remove(&peer);
            let State {
                holders,
                routes,
                promises,
                ..
            } = &mut *st;
            for list in promises.values_mut() {
                list.retain(|p| p.peer != peer);
            }
            for h in holders.values_mut() {
                h.remove(&peer);
            }
            for r in routes.values_mut() {
                r.remove(&peer);
            }
            st.relayed.retain(|_, r| r.downstream != peer);
            st.cancelled.retain(|(p, _)| *p != peer);
            for given in st.super_seeding.values_mut() {
                given.remove(&peer);
            }
            let orphaned: Vec<u64> = st
                .relayed
                .iter()
                .filter(|(_, r)| r.upstream == peer)
                .map(|(id, _)| *id)
                .collect();
            let orphaned: Vec<Relayed> = orphaned
                .iter()
                .filter_map(|id| st.relayed.remove(id))
                .collect();
            for a in st.active.values_mut() {
                a.fetch.remove_source(&peer);
            }
            recheck_promises(inner, &mut st);
            drop(st);
            // Requests passed on through the peer that left go another way at once: the
            // requester only sees this node, busy with its other requests, and would
            // wait until it went quiet to re-ask.
            for r in orphaned {
                reroute(inner, r);
            }
        }
        Event::Message {
            peer,
            channel,
            data,
            ..
        } => {
            let msg = match PoolMessage::decode(&data, &inner.limits) {
                Ok(m) => m,
                Err(e) => {
                    drop_peer(inner, peer, &format!("undecodable pool message: {e}"));
                    return;
                }
            };
            match (channel, msg) {
                (Channel::Chunks, chunk @ PoolMessage::Chunk { .. }) => {
                    on_chunk(inner, peer, chunk)
                }
                (Channel::Control, PoolMessage::Chunk { .. }) | (Channel::Chunks, _) => {
                    drop_peer(inner, peer, "pool message on the wrong channel");
                }
                (Channel::Control, m) => on_control(inner, peer, m),
            }
        }
        Event::Receipt { .. } | Event::Tracker(_) => {}
    }
}

/// Queues for `peer` the chunks of `wanted` this node holds, and returns them. Asked for
/// the origin, only a complete copy answers (a partial one leaves it to the relay path). A
/// full queue drops the work; the requester re-asks when it stalls.
/// Every chunk of `file_id`, when this node knows the file (held, downloading or offered to
/// it): all a request may name. Chunks past the end (a peer asking for 0..u32::MAX, say)
/// would otherwise have the serving loop walk four billion indexes under the state lock,
/// and be forwarded to other peers.
fn existing_chunks(st: &State, file_id: &FileId) -> Option<ChunkRanges> {
    let meta = st
        .complete
        .get(file_id)
        .map(|f| f.meta())
        .or_else(|| st.active.get(file_id).map(|a| a.part.meta()))
        .or_else(|| st.catalog.get(file_id))?;
    meta.chunk_count().ok().map(ChunkRanges::full)
}

fn serve_held(
    inner: &Arc<Inner>,
    st: &mut State,
    peer: PeerId,
    file_id: FileId,
    request_id: u64,
    wanted: &ChunkRanges,
    from_origin: bool,
) -> ChunkRanges {
    let held = if st.complete.contains_key(&file_id) {
        wanted.clone()
    } else if from_origin {
        ChunkRanges::new()
    } else if let Some(a) = st.active.get(&file_id) {
        wanted.intersection(a.part.servable())
    } else if let Some(have) = st.cache.as_ref().and_then(|c| c.have(&file_id)) {
        wanted.intersection(have)
    } else {
        ChunkRanges::new()
    };
    if !held.is_empty()
        && sender_for(inner, st, peer)
            .requests
            .try_send(Serve {
                file_id,
                request_id,
                ranges: held.clone(),
            })
            .is_err()
    {
        tracing::info!(?peer, request_id, "request queue full; dropped a request");
        tell_unavailable(inner, peer, file_id, request_id, held.clone());
    }
    held
}

/// The neighbour to forward a request to: one that holds some of `rest` itself, else the
/// relay nearest a holder (so requests move toward holders and do not wander in circles
/// until their hops run out); never the neighbour the request came from or its requester.
fn pick_upstream(
    st: &State,
    file_id: FileId,
    from: PeerId,
    requester: PeerId,
    rest: &ChunkRanges,
) -> Option<PeerId> {
    let allowed = |p: &PeerId| *p != from && *p != requester;
    let holder = st.holders.get(&file_id).and_then(|m| {
        m.iter()
            .filter(|(p, have)| allowed(p) && !have.intersection(rest).is_empty())
            .max_by_key(|(_, have)| have.intersection(rest).len())
            .map(|(p, _)| *p)
    });
    holder.or_else(|| {
        st.routes
            .get(&file_id)?
            .iter()
            .filter(|(p, r)| allowed(p) && !r.via.intersection(rest).is_empty())
            .max_by_key(|(_, r)| (r.hops, r.via.intersection(rest).len()))
            .map(|(p, _)| *p)
    })
}

/// What a forwarded request carries upstream.
struct Upstream {
    requester: PeerId,
    file_id: FileId,
    promised: ChunkRanges,
    from_origin: bool,
    hops_left: u8,
}

/// Sends `rest` of a request from `from` one hop toward a holder (never back where it came
/// from), remembering the path so chunks and chunks-missing reports can follow it.
fn forward(
    inner: &Arc<Inner>,
    mut st: std::sync::MutexGuard<'_, State>,
    from: PeerId,
    downstream_id: u64,
    rest: ChunkRanges,
    up: Upstream,
) {
    let Some(next) = pick_upstream(&st, up.file_id, from, up.requester, &rest) else {
        tracing::info!(?from, downstream_id, ?rest, "no upstream for a request");
        drop(st);
        tell_unavailable(inner, from, up.file_id, downstream_id, rest);
        return;
    };
    let upstream_id = fastrand::u64(1..u64::MAX / 2);
    st.relayed.insert(
        upstream_id,
        Relayed {
            downstream: from,
            downstream_id,
            file_id: up.file_id,
            upstream: next,
            outstanding: rest.clone(),
            requester: up.requester,
            hops_left: up.hops_left,
        },
    );
    drop(st);
    inner.send_control(
        next,
        &PoolMessage::FileRequest {
            request_id: upstream_id,
            requester: up.requester,
            file_id: up.file_id,
            requested: rest,
            promised: up.promised,
            from_origin: up.from_origin,
            hops_left: up.hops_left,
        },
    );
}

/// Sends what a forwarded request still waits for another way after its upstream left:
/// promised from this node's download where it can be, else forwarded to a new upstream.
fn reroute(inner: &Arc<Inner>, r: Relayed) {
    let mut st = inner.state();
    let rest = promise(
        inner,
        &mut st,
        r.file_id,
        r.downstream,
        r.downstream_id,
        &r.outstanding,
    );
    if rest.is_empty() {
        return;
    }
    let upstream = Upstream {
        requester: r.requester,
        file_id: r.file_id,
        promised: r.outstanding.difference(&rest),
        from_origin: false,
        hops_left: r.hops_left,
    };
    forward(inner, st, r.downstream, r.downstream_id, rest, upstream);
}

/// Tells `peer` that `chunks` of its request will not come from here, so it asks
/// elsewhere now instead of after a stall.
fn tell_unavailable(
    inner: &Arc<Inner>,
    peer: PeerId,
    file_id: FileId,
    request_id: u64,
    chunks: ChunkRanges,
) {
    if chunks.is_empty() {
        return;
    }
    inner.send_control(
        peer,
        &PoolMessage::Unavailable {
            request_id,
            file_id,
            chunks,
        },
    );
}

/// The queue of `peer`'s serving task, started on first use (a request can arrive before
/// the connection's hello is seen here) and restarted if it ended.
fn sender_for(inner: &Arc<Inner>, st: &mut State, peer: PeerId) -> PeerQueues {
    if let Some(q) = st.senders.get(&peer)
        && !q.requests.is_closed()
    {
        return q.clone();
    }
    let (requests, requests_rx) = mpsc::channel(inner.config.request_queue.max(1));
    let (ready, ready_rx) = mpsc::channel(inner.config.relay_queue.max(1));
    tokio::spawn(serve_peer(inner.clone(), peer, requests_rx, ready_rx));
    let q = PeerQueues { requests, ready };
    st.senders.insert(peer, q.clone());
    q
}

fn drop_peer(inner: &Arc<Inner>, peer: PeerId, why: &str) {
    tracing::warn!(?peer, "dropping peer: {why}");
    inner.dropped_peers.fetch_add(1, Relaxed);
    inner.node.disconnect(peer, why);
    let mut st = inner.state();
    for a in st.active.values_mut() {
        a.fetch.remove_source(&peer);
    }
}

fn on_control(inner: &Arc<Inner>, peer: PeerId, msg: PoolMessage) {
    match msg {
        PoolMessage::FileOffer {
            origin,
            seq,
            hops,
            meta,
            have,
        } => {
            let id = meta.file_id();
            let forward: Vec<PeerId> = {
                let mut st = inner.state();
                // A holder's own offer always counts, even if a forwarded copy came first.
                if origin == peer && meta.chunk_count().is_ok() {
                    st.holders.entry(id).or_default().insert(peer, have.clone());
                    if let Some(a) = st.active.get_mut(&id) {
                        a.fetch.add_source(peer, have.clone());
                    }
                }
                if origin != peer && meta.chunk_count().is_ok() {
                    // The neighbour forwarded someone else's offer: it can relay requests.
                    let known = st.routes.entry(id).or_default().entry(peer).or_default();
                    known.via = known.via.union(&have);
                    known.hops = known.hops.max(hops);
                    let via = known.via.clone();
                    if let Some(a) = st.active.get_mut(&id) {
                        a.fetch.add_relay(peer, via);
                    }
                }
                tracing::debug!(?peer, ?origin, seq, hops, "file offer");
                if origin == inner.me() || !st.seen.insert((origin, seq)) {
                    return;
                }
                if st.seen.len() > 100_000 {
                    // Old entries only matter while their offers circulate.
                    st.seen.clear();
                }
                st.catalog.entry(id).or_insert_with(|| meta.clone());
                if hops == 0 {
                    return;
                }
                st.senders.keys().filter(|p| **p != peer).copied().collect()
            };
            let fwd = PoolMessage::FileOffer {
                origin,
                seq,
                hops: hops - 1,
                meta,
                have,
            };
            inner.state().heard.insert(id, fwd.clone());
            for p in forward {
                inner.send_control(p, &fwd);
            }
        }
        PoolMessage::FileRetract {
            origin, file_id, ..
        } => {
            let mut st = inner.state();
            if origin == peer {
                if let Some(h) = st.holders.get_mut(&file_id) {
                    h.remove(&peer);
                }
                // It no longer holds the file; it may still relay it.
                if let Some(a) = st.active.get_mut(&file_id) {
                    a.fetch.add_source(peer, ChunkRanges::new());
                }
            }
        }
        PoolMessage::FileRequest {
            request_id,
            requester,
            file_id,
            mut requested,
            promised,
            from_origin,
            hops_left,
        } => {
            tracing::debug!(?peer, request_id, ?requested, hops_left, "file request");
            let mut st = inner.state();
            if let Some(all) = existing_chunks(&st, &file_id) {
                requested = requested.intersection(&all);
            }
            let held = serve_held(
                inner,
                &mut st,
                peer,
                file_id,
                request_id,
                &requested,
                from_origin,
            );
            let rest = requested.difference(&held).difference(&promised);
            if rest.is_empty() {
                return;
            }
            // Downloading the file too: what it will get from a holder it sends then.
            // Asked for the origin, it forwards (only a whole copy answers those).
            let (mine, rest) = if from_origin {
                (ChunkRanges::new(), rest)
            } else {
                let left = promise(inner, &mut st, file_id, peer, request_id, &rest);
                (rest.difference(&left), left)
            };
            if rest.is_empty() {
                return;
            }
            if hops_left == 0 {
                tracing::info!(?peer, request_id, ?rest, "request out of hops");
                drop(st);
                tell_unavailable(inner, peer, file_id, request_id, rest);
                return;
            }
            // This node promised what it serves itself, so the origin skips those chunks.
            let upstream = Upstream {
                requester,
                file_id,
                promised: promised.union(&held).union(&mine),
                from_origin,
                hops_left: hops_left - 1,
            };
            forward(inner, st, peer, request_id, rest, upstream);
        }
        PoolMessage::ChunksMissing {
            request_id,
            file_id,
            mut missing,
        } => {
            let mut st = inner.state();
            if let Some(all) = existing_chunks(&st, &file_id) {
                missing = missing.intersection(&all);
            }
            let held = serve_held(inner, &mut st, peer, file_id, request_id, &missing, false);
            let rest = missing.difference(&held);
            if rest.is_empty() {
                return;
            }
            // Promised from a download here (again, if the promise was dropped).
            let left = promise(inner, &mut st, file_id, peer, request_id, &rest);
            let promised = held.union(&rest.difference(&left));
            let rest = left;
            if rest.is_empty() {
                return;
            }
            // A request relayed from here: the report goes up the same path.
            let relayed = st
                .relayed
                .iter_mut()
                .find(|(_, r)| r.downstream == peer && r.downstream_id == request_id);
            if let Some((&up_id, r)) = relayed {
                r.outstanding = r.outstanding.union(&rest);
                let up = r.upstream;
                drop(st);
                inner.send_control(
                    up,
                    &PoolMessage::ChunksMissing {
                        request_id: up_id,
                        file_id,
                        missing: rest,
                    },
                );
                return;
            }
            // The path was lost (its upstream left): start a new one.
            let upstream = Upstream {
                requester: peer,
                file_id,
                promised,
                from_origin: false,
                hops_left: inner.config.offer_hops.saturating_sub(1),
            };
            forward(inner, st, peer, request_id, rest, upstream);
        }
        PoolMessage::Unavailable {
            request_id,
            file_id,
            chunks,
        } => {
            let mut st = inner.state();
            // A request forwarded from here: the word goes down the same path (not to
            // another upstream, which could send it around in circles).
            if let Some(r) = st.relayed.get_mut(&request_id)
                && r.upstream == peer
                && r.file_id == file_id
            {
                let lost = r.outstanding.intersection(&chunks);
                r.outstanding = r.outstanding.difference(&lost);
                let (down, down_id) = (r.downstream, r.downstream_id);
                if r.outstanding.is_empty() {
                    st.relayed.remove(&request_id);
                }
                drop(st);
                tell_unavailable(inner, down, file_id, down_id, lost);
                return;
            }
            if let Some(a) = st.active.get_mut(&file_id) {
                a.fetch.unavailable(&peer, request_id, &chunks);
            }
            recheck_promises(inner, &mut st);
        }
        PoolMessage::Cancel {
            request_id,
            file_id,
        } => {
            let upstream: Vec<(u64, PeerId)> = {
                let mut st = inner.state();
                // Entries go when the serving task reaches the request; cancels of requests
                // already served would pile up (a peer could send them forever), so the set
                // is bounded: past the bound a few chunks may go out needlessly.
                if st.cancelled.len() >= MAX_CANCELLED {
                    st.cancelled.clear();
                }
                st.cancelled.insert((peer, request_id));
                if let Some(list) = st.promises.get_mut(&file_id) {
                    list.retain(|p| p.peer != peer || p.request_id != request_id);
                }
                let ids: Vec<(u64, PeerId)> = st
                    .relayed
                    .iter()
                    .filter(|(_, r)| r.downstream == peer && r.downstream_id == request_id)
                    .map(|(id, r)| (*id, r.upstream))
                    .collect();
                for (id, _) in &ids {
                    st.relayed.remove(id);
                }
                ids
            };
            for (id, up) in upstream {
                inner.send_control(
                    up,
                    &PoolMessage::Cancel {
                        request_id: id,
                        file_id,
                    },
                );
            }
        }
        PoolMessage::Chunk { .. } => {}
    }
}

fn on_chunk(inner: &Arc<Inner>, peer: PeerId, msg: PoolMessage) {
    let PoolMessage::Chunk {
        file_id,
        request_id,
        index,
        proof,
        data,
    } = msg
    else {
        return;
    };
    let mut st = inner.state();
    if st
        .relayed
        .get(&request_id)
        .is_some_and(|r| r.file_id == file_id && r.upstream == peer)
    {
        let Some(meta) = st.catalog.get(&file_id).cloned() else {
            return;
        };
        // Relays verify too: a bad chunk stops here, and its sender is dropped.
        if let Err(e) = meta.verify_chunk(index, &data, &proof) {
            drop(st);
            inner.bad_chunks.fetch_add(1, Relaxed);
            drop_peer(
                inner,
                peer,
                &format!("relayed chunk {index} failed verification: {e}"),
            );
            return;
        }
        let kept = keep_relayed(&mut st, &meta, index, &data, &proof);
        if kept {
            fulfil(inner, &mut st, file_id, index, &data, &proof);
        }
        let Some(r) = st.relayed.get_mut(&request_id) else {
            return;
        };
        r.outstanding.remove(index..index + 1);
        let (downstream, downstream_id) = (r.downstream, r.downstream_id);
        if r.outstanding.is_empty() {
            st.relayed.remove(&request_id);
        }
        let chunk = ChunkRef {
            file_id,
            index,
            data: &data,
            proof: &proof,
        };
        send_ready(
            inner,
            &mut st,
            downstream,
            downstream_id,
            &chunk,
            true,
            kept,
        );
        return;
    }
    let Some(a) = st.active.get_mut(&file_id) else {
        return;
    };
    a.received += data.len() as u64;
    match a.part.write_chunk(index, &data, &proof) {
        Ok(_) => {
            a.fetch.on_chunk(Instant::now(), request_id, index);
            publish(a);
            fulfil(inner, &mut st, file_id, index, &data, &proof);
        }
        Err(StoreError::Verify(e)) => {
            drop(st);
            inner.bad_chunks.fetch_add(1, Relaxed);
            drop_peer(
                inner,
                peer,
                &format!("sent chunk {index} that failed verification: {e}"),
            );
        }
        Err(e) => {
            tracing::error!("writing chunk {index}: {e}");
        }
    }
}

/// A verified chunk in memory, about to be sent on.
struct ChunkRef<'a> {
    file_id: FileId,
    index: u32,
    data: &'a Bytes,
    proof: &'a [Hash],
}

/// Queues `chunk` for `peer` as part of its request `request_id`, through the neighbour's
/// bounded queue: when that is full (the neighbour is slower than the chunks arrive), a
/// chunk kept on disk goes later as a request of one chunk (ranges only, no buffer held),
/// and one not kept is dropped (the neighbour re-asks for exactly those).
fn send_ready(
    inner: &Arc<Inner>,
    st: &mut State,
    peer: PeerId,
    request_id: u64,
    chunk: &ChunkRef<'_>,
    relayed: bool,
    kept: bool,
) {
    let mut frame = Vec::with_capacity(chunk.data.len() + 64 + 32 * chunk.proof.len());
    PoolMessage::Chunk {
        file_id: chunk.file_id,
        request_id,
        index: chunk.index,
        proof: chunk.proof.to_vec(),
        data: chunk.data.clone(),
    }
    .encode(&mut frame);
    let ready = Ready {
        frame,
        payload: chunk.data.len() as u64,
        relayed,
    };
    let queues = sender_for(inner, st, peer);
    if queues.ready.try_send(ready).is_err() {
        let index = chunk.index;
        let later = Serve {
            file_id: chunk.file_id,
            request_id,
            ranges: ChunkRanges::from_range(index..index + 1),
        };
        if !kept || queues.requests.try_send(later).is_err() {
            tracing::info!(?peer, index, "queues full; dropped a chunk");
            let lost = ChunkRanges::from_range(index..index + 1);
            tell_unavailable(inner, peer, chunk.file_id, request_id, lost);
        }
    }
}

/// Promises `peer` those of `chunks` that this node's download of the file will get from a
/// holder: they are sent as they arrive, and asked for first. Returns what is left to
/// forward (everything when there is no such download).
fn promise(
    inner: &Arc<Inner>,
    st: &mut State,
    file_id: FileId,
    peer: PeerId,
    request_id: u64,
    chunks: &ChunkRanges,
) -> ChunkRanges {
    let Some(a) = st.active.get_mut(&file_id) else {
        return chunks.clone();
    };
    let promised = a.fetch.promisable(chunks);
    if promised.is_empty() {
        return chunks.clone();
    }
    a.fetch.prioritize(&promised);
    let rest = chunks.difference(&promised);
    let chunks = &promised;
    let list = st.promises.entry(file_id).or_default();
    match list
        .iter_mut()
        .find(|p| p.peer == peer && p.request_id == request_id)
    {
        Some(p) => p.chunks = p.chunks.union(chunks),
        None => {
            if list.iter().filter(|p| p.peer == peer).count() >= MAX_PROMISES_PER_PEER
                && let Some(oldest) = list.iter().position(|p| p.peer == peer)
            {
                let old = list.remove(oldest);
                tell_unavailable(inner, peer, file_id, old.request_id, old.chunks);
            }
            list.push(Promise {
                peer,
                request_id,
                chunks: chunks.clone(),
            });
        }
    }
    rest
}

/// Withdraws promises this node can no longer keep for sure (the holder it was getting
/// those chunks from left, or will not send them): the neighbours are told Unavailable
/// and ask elsewhere, rather than wait on a chunk that may come only after a stall here.
fn recheck_promises(inner: &Arc<Inner>, st: &mut State) {
    let State {
        promises, active, ..
    } = st;
    for (file_id, list) in promises.iter_mut() {
        let Some(a) = active.get(file_id) else {
            continue;
        };
        list.retain_mut(|p| {
            let keep = a.fetch.promisable(&p.chunks);
            let dropped = p.chunks.difference(&keep);
            if !dropped.is_empty() {
                tell_unavailable(inner, p.peer, *file_id, p.request_id, dropped);
            }
            p.chunks = keep;
            !p.chunks.is_empty()
        });
    }
    promises.retain(|_, list| !list.is_empty());
}

/// Sends chunk `index`, just written to a download, to the neighbours it was promised to.
fn fulfil(
    inner: &Arc<Inner>,
    st: &mut State,
    file_id: FileId,
    index: u32,
    data: &Bytes,
    proof: &[Hash],
) {
    let Some(list) = st.promises.get_mut(&file_id) else {
        return;
    };
    let mut due = Vec::new();
    list.retain_mut(|p| {
        if p.chunks.contains(index) {
            p.chunks.remove(index..index + 1);
            due.push((p.peer, p.request_id));
        }
        !p.chunks.is_empty()
    });
    if list.is_empty() {
        st.promises.remove(&file_id);
    }
    let chunk = ChunkRef {
        file_id,
        index,
        data,
        proof,
    };
    for (peer, request_id) in due {
        send_ready(inner, st, peer, request_id, &chunk, false, true);
    }
}

/// Keeps a verified chunk that passed through: in this node's own download of the file if
/// it wants it, else in the relay cache. Returns whether this node can serve it later.
fn keep_relayed(st: &mut State, meta: &FileMeta, index: u32, data: &[u8], proof: &[Hash]) -> bool {
    let id = meta.file_id();
    if st.complete.contains_key(&id) {
        return true;
    }
    if let Some(a) = st.active.get_mut(&id) {
        // Only if not asked for already: that copy is on its way and would be a duplicate.
        if a.fetch.unrequested(index) && a.part.write_chunk(index, data, proof).is_ok() {
            a.fetch.on_chunk(Instant::now(), 0, index);
            publish(a);
            return true;
        }
    }
    let Some(cache) = st.cache.as_mut() else {
        return false;
    };
    match cache.insert(meta, index, data, proof) {
        Ok(_) => cache.have(&id).is_some_and(|h| h.contains(index)),
        Err(e) => {
            tracing::warn!("relay cache: {e}");
            false
        }
    }
}

fn publish(a: &Active) {
    let meta = a.part.meta();
    let have_bytes = a
        .part
        .have()
        .iter()
        .map(|i| meta.chunk_len(i).unwrap_or(0) as u64)
        .sum();
    a.progress.send_replace(Progress {
        have_bytes,
        total_bytes: meta.size,
        received_bytes: a.received,
        duplicates: a.fetch.duplicates,
        missing_rounds: a.fetch.missing_rounds,
        sources: a.fetch.source_count(),
    });
}

fn on_tick(inner: &Arc<Inner>) {
    let now = Instant::now();
    let mut sends: Vec<(PeerId, PoolMessage)> = Vec::new();
    let mut finished: Vec<FileId> = Vec::new();
    let mut failed: Vec<(FileId, String)> = Vec::new();
    {
        let mut st = inner.state();
        start_waiting(inner, &mut st);
        let neighbours: Vec<PeerId> = st.senders.keys().copied().collect();
        // Offers are repeated now and then, so one that was lost is not lost for good.
        if st
            .last_complete_offer
            .is_none_or(|t| now.duration_since(t) >= inner.config.reoffer_interval * 5)
        {
            st.last_complete_offer = Some(now);
            // Offers heard from farther away too: re-sent with their original sequence
            // number, so only neighbours that missed them act on them.
            for (id, m) in &st.heard {
                if !st.complete.contains_key(id) {
                    for p in &neighbours {
                        sends.push((*p, m.clone()));
                    }
                }
            }
            // Holders re-announce with a fresh sequence number and the full hop budget, so
            // the offer spreads again past relays (seen: an offer sent the moment a channel
            // opened did not arrive).
            for f in st.complete.values() {
                if let Ok(n) = f.meta().chunk_count() {
                    let offer = inner.offer(f.meta(), ChunkRanges::full(n));
                    for p in &neighbours {
                        sends.push((*p, offer.clone()));
                    }
                }
            }
        }
        let mut out = Vec::new();
        for (id, a) in st.active.iter_mut() {
            out.clear();
            a.fetch.poll(now, &mut out);
            for o in out.drain(..) {
                match o {
                    FetchOutput::Request {
                        source,
                        request_id,
                        ranges,
                        from_origin,
                        attempt,
                    } => {
                        if attempt > 0 {
                            tracing::info!(
                                ?source,
                                attempt,
                                chunks = ranges.len(),
                                "re-requesting after a stall"
                            );
                        }
                        sends.push((
                            source,
                            PoolMessage::FileRequest {
                                request_id,
                                requester: inner.me(),
                                file_id: *id,
                                requested: ranges,
                                promised: ChunkRanges::new(),
                                from_origin,
                                // An offer reaches offer_hops + 1 nodes away (the last one
                                // does not forward it), so the route can be that long.
                                hops_left: inner.config.offer_hops + 1,
                            },
                        ))
                    }
                    FetchOutput::Missing {
                        source,
                        request_id,
                        ranges,
                    } => {
                        tracing::info!(
                            ?source,
                            request_id,
                            missing = ranges.len(),
                            "request stalled; chunks missing"
                        );
                        sends.push((
                            source,
                            PoolMessage::ChunksMissing {
                                request_id,
                                file_id: *id,
                                missing: ranges,
                            },
                        ))
                    }
                    FetchOutput::Cancel { source, request_id } => sends.push((
                        source,
                        PoolMessage::Cancel {
                            request_id,
                            file_id: *id,
                        },
                    )),
                    FetchOutput::Done => finished.push(*id),
                    FetchOutput::Failed(why) => failed.push((*id, why)),
                }
            }
            if let Err(e) = a.part.save_state_if_due() {
                tracing::warn!("saving download state: {e}");
            }
            // Downloaders serve each other: tell neighbours what we hold now.
            if now.duration_since(a.last_offer) >= inner.config.reoffer_interval
                && a.part.servable() != &a.offered
            {
                a.last_offer = now;
                a.offered = a.part.servable().clone();
                let offer = inner.neighbour_offer(a.part.meta(), a.offered.clone());
                for p in &neighbours {
                    sends.push((*p, offer.clone()));
                }
            }
        }
    }
    offer_cached(inner, now, &mut sends);
    for (peer, msg) in sends {
        inner.send_control(peer, &msg);
    }
    for id in finished {
        finish(inner, id);
    }
    for (id, why) in failed {
        let mut st = inner.state();
        for p in st.promises.remove(&id).unwrap_or_default() {
            tell_unavailable(inner, p.peer, id, p.request_id, p.chunks);
        }
        if let Some(mut a) = st.active.remove(&id)
            && let Some(done) = a.done.take()
        {
            let _ = done.send(Err(PoolError::Failed(why)));
        }
    }
}

/// Tells neighbours what the relay cache holds now, and retracts what it evicted, so
/// requests come here for cached chunks and stop coming for evicted ones. At most once per
/// `reoffer_interval`, like a download's offers.
fn offer_cached(inner: &Arc<Inner>, now: Instant, sends: &mut Vec<(PeerId, PoolMessage)>) {
    let mut st = inner.state();
    if st
        .last_cache_offer
        .is_some_and(|t| now.duration_since(t) < inner.config.reoffer_interval)
    {
        return;
    }
    st.last_cache_offer = Some(now);
    let State {
        cache: Some(cache),
        cache_offered: offered,
        senders,
        active,
        complete,
        ..
    } = &mut *st
    else {
        return;
    };
    let gone: Vec<FileId> = offered
        .keys()
        .filter(|id| cache.have(id).is_none())
        .copied()
        .collect();
    for file_id in gone {
        offered.remove(&file_id);
        let retract = PoolMessage::FileRetract {
            origin: inner.me(),
            seq: inner.seq.fetch_add(1, Relaxed),
            hops: 0,
            file_id,
        };
        sends.extend(senders.keys().map(|p| (*p, retract.clone())));
    }
    for (meta, have) in cache.held() {
        let id = meta.file_id();
        // A file held here as a download or whole is offered as that.
        if offered.get(&id) == Some(have) || active.contains_key(&id) || complete.contains_key(&id)
        {
            continue;
        }
        offered.insert(id, have.clone());
        let offer = inner.neighbour_offer(meta, have.clone());
        sends.extend(senders.keys().map(|p| (*p, offer.clone())));
    }
}

/// Starts downloads whose metadata is now known.
fn start_waiting(inner: &Arc<Inner>, st: &mut State) {
    let mut still = Vec::new();
    for (id, target, reply) in std::mem::take(&mut st.waiting) {
        let Some(meta) = st.catalog.get(&id).cloned() else {
            still.push((id, target, reply));
            continue;
        };
        let (done_tx, done_rx) = oneshot::channel();
        let (progress_tx, progress_rx) = watch::channel(Progress {
            total_bytes: meta.size,
            ..Progress::default()
        });
        let cache = &mut st.cache;
        let started = PartialFile::open(&target, &meta).and_then(|mut part| {
            if let Some(c) = cache.as_mut() {
                adopt_cached(c, &mut part);
            }
            let mut fetch = Fetch::new(
                &meta,
                part.have().clone(),
                inner.config.fetch.clone(),
                Instant::now(),
                fastrand::u64(1..u64::MAX / 2),
            )?;
            fetch.start_at(fastrand::u32(..));
            Ok((part, fetch))
        });
        // Adopted, not evicted: the download's own offers replace the cache's.
        st.cache_offered.remove(&id);
        match started {
            Ok((part, mut fetch)) => {
                if let Some(r) = st.routes.get(&id) {
                    for (p, route) in r {
                        fetch.add_relay(*p, route.via.clone());
                    }
                }
                if let Some(h) = st.holders.get(&id) {
                    for (p, have) in h {
                        fetch.add_source(*p, have.clone());
                    }
                }
                let a = Active {
                    part,
                    fetch,
                    done: Some(done_tx),
                    progress: progress_tx,
                    received: 0,
                    offered: ChunkRanges::new(),
                    last_offer: Instant::now(),
                };
                tracing::debug!(?id, sources = a.fetch.source_count(), "download started");
                publish(&a);
                st.active.insert(id, a);
            }
            Err(e) => {
                let _ = done_tx.send(Err(e.into()));
            }
        }
        let _ = reply.send(Download {
            progress: progress_rx,
            done: done_rx,
        });
    }
    st.waiting = still;
}

/// Moves chunks the relay cache holds of a file into its new download, and drops them
/// from the cache.
fn adopt_cached(cache: &mut RelayCache, part: &mut PartialFile) {
    let id = part.meta().file_id();
    let Some(held) = cache.have(&id).map(|h| h.difference(part.have())) else {
        return;
    };
    for index in held.iter() {
        if let Some((data, proof)) = cache.read_chunk(&id, index)
            && let Err(e) = part.write_chunk(index, &data, &proof)
        {
            tracing::warn!("adopting cached chunk {index}: {e}");
        }
    }
    cache.evict(&id);
}

/// Moves a complete download into place and starts serving it as a whole file. The
/// whole-file view is built first and swapped in under the lock, so requests that arrive
/// meanwhile are served (seen: chunks skipped in that gap cost a 5 s stall downstream).
fn finish(inner: &Arc<Inner>, id: FileId) {
    let Some((part_path, target, meta)) = inner.state().active.get(&id).map(|a| {
        (
            a.part.part_path().to_owned(),
            a.part.target().to_owned(),
            a.part.meta().clone(),
        )
    }) else {
        return;
    };
    // Read through the `.part` file's handle, which stays valid across the rename.
    let shared = SharedFile::open_as(&part_path, &meta).map(|f| Arc::new(f.at(&target)));
    let (mut a, peers) = {
        let mut st = inner.state();
        let Some(a) = st.active.remove(&id) else {
            return;
        };
        st.promises.remove(&id);
        if let Ok(shared) = &shared {
            st.complete.insert(id, shared.clone());
            st.cache_offered.remove(&id);
            if let Some(c) = st.cache.as_mut() {
                c.evict(&id);
            }
        }
        (a, st.senders.keys().copied().collect::<Vec<PeerId>>())
    };
    publish(&a);
    let done = a.done.take();
    let reply = match shared {
        Ok(_) => a.part.finish().map_err(PoolError::from),
        Err(e) => Err(e.into()),
    };
    if reply.is_err() {
        inner.state().complete.remove(&id);
    } else if let Ok(n) = meta.chunk_count() {
        let offer = inner.offer(&meta, ChunkRanges::full(n));
        for p in peers {
            inner.send_control(p, &offer);
        }
    }
    if let Some(done) = done {
        let _ = done.send(reply);
    }
}

/// Whether chunk `index` of a complete file may go to `peer` now: always, except in the
/// file's initial seeding pass for a chunk already given to a neighbour still here. The
/// pass ends when every chunk has been given out; the full offer then goes out again, so
/// neighbours told Unavailable ask here again.
fn give_once(
    inner: &Arc<Inner>,
    st: &mut State,
    peer: PeerId,
    file_id: FileId,
    index: u32,
) -> bool {
    let Some(given) = st.super_seeding.get_mut(&file_id) else {
        return true;
    };
    // The same neighbour may ask again (a chunk lost on its way): nobody else has it.
    if given.iter().any(|(p, g)| *p != peer && g.contains(index)) {
        return false;
    }
    given.entry(peer).or_default().insert(index..index + 1);
    // A chunk goes to one neighbour only, so the sets are disjoint: their sizes add up.
    let given_out: u64 = given.values().map(ChunkRanges::len).sum();
    let Some(meta) = st.catalog.get(&file_id) else {
        return true;
    };
    let Ok(n) = meta.chunk_count() else {
        return true;
    };
    if given_out >= u64::from(n) {
        tracing::info!(?file_id, "initial seeding done: every chunk given out once");
        st.super_seeding.remove(&file_id);
        let offer = inner.offer(meta, ChunkRanges::full(n));
        for p in st.senders.keys() {
            inner.send_control(*p, &offer);
        }
    }
    true
}

/// Serves one neighbour's requests in order, one chunk at a time; each send waits for room
/// in the channel, so a slow peer slows only its own task.
async fn serve_peer(
    inner: Arc<Inner>,
    peer: PeerId,
    mut requests: mpsc::Receiver<Serve>,
    mut ready: mpsc::Receiver<Ready>,
) {
    let send_ready = async |r: Ready| {
        let ok = inner
            .node
            .send(peer, Channel::Chunks, &r.frame)
            .await
            .is_ok();
        if ok {
            let counter = if r.relayed {
                &inner.relayed_bytes
            } else {
                &inner.served_bytes
            };
            counter.fetch_add(r.payload, Relaxed);
        }
        ok
    };
    let mut buf = Vec::with_capacity(inner.config.chunk_size as usize + 2048);
    loop {
        let req = tokio::select! {
            biased;
            Some(r) = ready.recv() => {
                if !send_ready(r).await {
                    return;
                }
                continue;
            }
            req = requests.recv() => match req {
                Some(req) => req,
                None => return,
            },
        };
        let mut gone = ChunkRanges::new();
        for index in req.ranges.iter() {
            // Chunks in memory first: they are owed already, and their queue is short.
            while let Ok(r) = ready.try_recv() {
                if !send_ready(r).await {
                    return;
                }
            }
            let chunk = {
                let mut st = inner.state();
                if st.cancelled.remove(&(peer, req.request_id)) {
                    break;
                }
                if let Some(f) = st.complete.get(&req.file_id).cloned() {
                    if !give_once(&inner, &mut st, peer, req.file_id, index) {
                        gone.insert(index..index + 1);
                        continue;
                    }
                    let sent = st.sent_once.entry(req.file_id).or_default();
                    if !sent.contains(index) {
                        sent.insert(index..index + 1);
                        let len = f.meta().chunk_len(index).unwrap_or(0) as u64;
                        inner.served_distinct_bytes.fetch_add(len, Relaxed);
                    }
                    drop(st);
                    f.read_chunk(index).ok()
                } else {
                    let own = match st.active.get(&req.file_id) {
                        Some(a) => a.part.read_chunk(index).ok().flatten(),
                        None => None,
                    };
                    own.or_else(|| {
                        st.cache
                            .as_mut()
                            .and_then(|c| c.read_chunk(&req.file_id, index))
                    })
                }
            };
            let Some((mut data, proof)) = chunk else {
                tracing::info!(?peer, index, "asked for a chunk not held here any more");
                gone.insert(index..index + 1);
                continue;
            };
            if inner.config.corrupt_outgoing
                && let Some(b) = data.first_mut()
            {
                *b ^= 0xff;
            }
            buf.clear();
            let len = data.len() as u64;
            PoolMessage::Chunk {
                file_id: req.file_id,
                request_id: req.request_id,
                index,
                proof,
                data: Bytes::from(data),
            }
            .encode(&mut buf);
            if inner.node.send(peer, Channel::Chunks, &buf).await.is_err() {
                return;
            }
            inner.served_bytes.fetch_add(len, Relaxed);
        }
        tell_unavailable(&inner, peer, req.file_id, req.request_id, gone);
    }
}
