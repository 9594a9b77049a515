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
use tidepool_protocol::pool::{ChunkRanges, FileMeta, PoolLimits, PoolMessage};
use tokio::sync::{mpsc, oneshot, watch};

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
    /// Requests queued per neighbour; more are dropped (the requester re-asks on a stall).
    pub request_queue: usize,
    /// A download re-announces what it holds this often, so downloaders serve each other.
    pub reoffer_interval: Duration,
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
            request_queue: 64,
            reoffer_interval: Duration::from_secs(1),
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
    /// A chunk relayed from upstream, already encoded for this neighbour.
    relayed: Option<Vec<u8>>,
}

/// A request this node forwarded upstream on behalf of a neighbour.
struct Relayed {
    downstream: PeerId,
    downstream_id: u64,
    file_id: FileId,
    upstream: PeerId,
    outstanding: ChunkRanges,
}

#[derive(Default)]
struct State {
    complete: HashMap<FileId, Arc<SharedFile>>,
    active: HashMap<FileId, Active>,
    catalog: HashMap<FileId, FileMeta>,
    /// What each neighbour holds of each file (from its own offers).
    holders: HashMap<FileId, HashMap<PeerId, ChunkRanges>>,
    /// What each neighbour can fetch for us: offers it forwarded from farther holders.
    routes: HashMap<FileId, HashMap<PeerId, ChunkRanges>>,
    /// Requests forwarded upstream, by the id used upstream.
    relayed: HashMap<u64, Relayed>,
    /// The latest offer heard for each file held elsewhere, ready to pass on (hops already
    /// spent), so a neighbour that connects later still learns where files are.
    heard: HashMap<FileId, PoolMessage>,
    seen: HashSet<(PeerId, u64)>,
    senders: HashMap<PeerId, mpsc::Sender<Serve>>,
    cancelled: HashSet<(PeerId, u64)>,
    waiting: Vec<(FileId, PathBuf, oneshot::Sender<Download>)>,
    last_complete_offer: Option<Instant>,
}

struct Inner {
    node: Node,
    config: PoolConfig,
    limits: PoolLimits,
    state: Mutex<State>,
    seq: AtomicU64,
    bad_chunks: AtomicU64,
    dropped_peers: AtomicU64,
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
            let _ = inner.node.send(peer, Channel::Control, &buf).await;
        });
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
    fn drop(&mut self) {
        self.task.abort();
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
        let inner = Arc::new(Inner {
            node,
            config,
            limits,
            state: Mutex::new(State::default()),
            seq: AtomicU64::new(1),
            bad_chunks: AtomicU64::new(0),
            dropped_peers: AtomicU64::new(0),
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

    /// Chunks received that failed verification (their senders were dropped).
    pub fn bad_chunks(&self) -> u64 {
        self.inner.bad_chunks.load(Relaxed)
    }

    /// Peers this pipeline disconnected for breaking the protocol or sending bad chunks.
    pub fn dropped_peers(&self) -> u64 {
        self.inner.dropped_peers.load(Relaxed)
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
                        .filter(|a| !a.part.have().is_empty())
                        .map(|a| inner.offer(a.part.meta(), a.part.have().clone())),
                );
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
                holders, routes, ..
            } = &mut *st;
            for h in holders.values_mut().chain(routes.values_mut()) {
                h.remove(&peer);
            }
            st.relayed
                .retain(|_, r| r.downstream != peer && r.upstream != peer);
            for a in st.active.values_mut() {
                a.fetch.remove_source(&peer);
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
    } else if let (false, Some(a)) = (from_origin, st.active.get(&file_id)) {
        wanted.intersection(a.part.have())
    } else {
        ChunkRanges::new()
    };
    if !held.is_empty() {
        let _ = sender_for(inner, st, peer).try_send(Serve {
            file_id,
            request_id,
            ranges: held.clone(),
            relayed: None,
        });
    }
    held
}

/// The neighbour to forward a request to: one that holds some of `rest` itself, else one
/// that relays for a holder; never the neighbour the request came from or its requester.
fn pick_upstream(
    st: &State,
    file_id: FileId,
    from: PeerId,
    requester: PeerId,
    rest: &ChunkRanges,
) -> Option<PeerId> {
    let usable = |m: Option<&HashMap<PeerId, ChunkRanges>>| -> Option<PeerId> {
        m?.iter()
            .filter(|(p, have)| {
                **p != from && **p != requester && !have.intersection(rest).is_empty()
            })
            .max_by_key(|(_, have)| have.intersection(rest).len())
            .map(|(p, _)| *p)
    };
    usable(st.holders.get(&file_id)).or_else(|| usable(st.routes.get(&file_id)))
}

/// The queue of `peer`'s serving task, started on first use (a request can arrive before
/// the connection's hello is seen here) and restarted if it ended.
fn sender_for(inner: &Arc<Inner>, st: &mut State, peer: PeerId) -> mpsc::Sender<Serve> {
    if let Some(tx) = st.senders.get(&peer)
        && !tx.is_closed()
    {
        return tx.clone();
    }
    let (tx, rx) = mpsc::channel(inner.config.request_queue);
    tokio::spawn(serve_peer(inner.clone(), peer, rx));
    st.senders.insert(peer, tx.clone());
    tx
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
                    *known = known.union(&have);
                    let via = known.clone();
                    let direct = st.holders.get(&id).is_some_and(|h| h.contains_key(&peer));
                    if !direct && let Some(a) = st.active.get_mut(&id) {
                        a.fetch.add_source(peer, via);
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
                if let Some(a) = st.active.get_mut(&file_id) {
                    a.fetch.remove_source(&peer);
                }
            }
        }
        PoolMessage::FileRequest {
            request_id,
            requester,
            file_id,
            requested,
            promised,
            from_origin,
            hops_left,
        } => {
            tracing::debug!(?peer, request_id, ?requested, hops_left, "file request");
            let mut st = inner.state();
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
            if rest.is_empty() || hops_left == 0 {
                return;
            }
            // The rest goes one hop toward a holder (never back where it came from); this
            // node promised what it serves itself, so the origin skips those chunks.
            let next = pick_upstream(&st, file_id, peer, requester, &rest);
            let Some(next) = next else { return };
            let upstream_id = fastrand::u64(1..u64::MAX / 2);
            st.relayed.insert(
                upstream_id,
                Relayed {
                    downstream: peer,
                    downstream_id: request_id,
                    file_id,
                    upstream: next,
                    outstanding: rest.clone(),
                },
            );
            drop(st);
            inner.send_control(
                next,
                &PoolMessage::FileRequest {
                    request_id: upstream_id,
                    requester,
                    file_id,
                    requested: rest,
                    promised: promised.union(&held),
                    from_origin,
                    hops_left: hops_left - 1,
                },
            );
        }
        PoolMessage::ChunksMissing {
            request_id,
            file_id,
            missing,
        } => {
            let mut st = inner.state();
            serve_held(inner, &mut st, peer, file_id, request_id, &missing, false);
        }
        PoolMessage::Cancel {
            request_id,
            file_id,
        } => {
            let upstream: Vec<(u64, PeerId)> = {
                let mut st = inner.state();
                st.cancelled.insert((peer, request_id));
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
        let Some(r) = st.relayed.get_mut(&request_id) else {
            return;
        };
        r.outstanding.remove(index..index + 1);
        let (downstream, downstream_id) = (r.downstream, r.downstream_id);
        if r.outstanding.is_empty() {
            st.relayed.remove(&request_id);
        }
        let mut buf = Vec::with_capacity(data.len() + 64 + 32 * proof.len());
        PoolMessage::Chunk {
            file_id,
            request_id: downstream_id,
            index,
            proof,
            data,
        }
        .encode(&mut buf);
        // Through the neighbour's bounded queue: a slow downstream drops relayed chunks
        // (it re-asks for exactly those) instead of growing memory here.
        let _ = sender_for(inner, &mut st, downstream).try_send(Serve {
            file_id,
            request_id: downstream_id,
            ranges: ChunkRanges::new(),
            relayed: Some(buf),
        });
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
                        ..
                    } => sends.push((
                        source,
                        PoolMessage::FileRequest {
                            request_id,
                            requester: inner.me(),
                            file_id: *id,
                            requested: ranges,
                            promised: ChunkRanges::new(),
                            from_origin,
                            hops_left: inner.config.offer_hops,
                        },
                    )),
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
            // Downloaders serve each other: tell neighbours what we hold now.
            if now.duration_since(a.last_offer) >= inner.config.reoffer_interval
                && a.part.have() != &a.offered
            {
                a.last_offer = now;
                a.offered = a.part.have().clone();
                let mut offer = inner.offer(a.part.meta(), a.offered.clone());
                if let PoolMessage::FileOffer { hops, .. } = &mut offer {
                    *hops = 0;
                }
                for p in &neighbours {
                    sends.push((*p, offer.clone()));
                }
            }
        }
    }
    for (peer, msg) in sends {
        inner.send_control(peer, &msg);
    }
    for id in finished {
        finish(inner, id);
    }
    for (id, why) in failed {
        if let Some(mut a) = inner.state().active.remove(&id)
            && let Some(done) = a.done.take()
        {
            let _ = done.send(Err(PoolError::Failed(why)));
        }
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
        let started = PartialFile::open(&target, &meta).and_then(|part| {
            let fetch = Fetch::new(
                &meta,
                part.have().clone(),
                inner.config.fetch.clone(),
                Instant::now(),
                fastrand::u64(1..u64::MAX / 2),
            )?;
            Ok((part, fetch))
        });
        match started {
            Ok((part, mut fetch)) => {
                if let Some(r) = st.routes.get(&id) {
                    for (p, via) in r {
                        fetch.add_source(*p, via.clone());
                    }
                }
                // Direct holders last, so they replace what was known as a route.
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

/// Moves a complete download into place and starts serving it as a whole file.
fn finish(inner: &Arc<Inner>, id: FileId) {
    let Some(mut a) = inner.state().active.remove(&id) else {
        return;
    };
    publish(&a);
    let done = a.done.take();
    let meta = a.part.meta().clone();
    let result = a
        .part
        .finish()
        .and_then(|path| Ok((SharedFile::open_as(&path, &meta)?, path)));
    let reply = match result {
        Ok((shared, path)) => {
            let meta = shared.meta().clone();
            let peers: Vec<PeerId> = {
                let mut st = inner.state();
                st.complete.insert(id, Arc::new(shared));
                st.senders.keys().copied().collect()
            };
            if let Ok(n) = meta.chunk_count() {
                let offer = inner.offer(&meta, ChunkRanges::full(n));
                for p in peers {
                    inner.send_control(p, &offer);
                }
            }
            Ok(path)
        }
        Err(e) => Err(e.into()),
    };
    if let Some(done) = done {
        let _ = done.send(reply);
    }
}

/// Serves one neighbour's requests in order, one chunk at a time; each send waits for room
/// in the channel, so a slow peer slows only its own task.
async fn serve_peer(inner: Arc<Inner>, peer: PeerId, mut rx: mpsc::Receiver<Serve>) {
    let mut buf = Vec::with_capacity(inner.config.chunk_size as usize + 2048);
    while let Some(req) = rx.recv().await {
        if let Some(frame) = req.relayed {
            if inner
                .node
                .send(peer, Channel::Chunks, &frame)
                .await
                .is_err()
            {
                return;
            }
            continue;
        }
        for index in req.ranges.iter() {
            let chunk = {
                let mut st = inner.state();
                if st.cancelled.remove(&(peer, req.request_id)) {
                    break;
                }
                if let Some(f) = st.complete.get(&req.file_id).cloned() {
                    drop(st);
                    f.read_chunk(index).ok()
                } else if let Some(a) = st.active.get(&req.file_id) {
                    a.part.read_chunk(index).ok().flatten()
                } else {
                    None
                }
            };
            let Some((mut data, proof)) = chunk else {
                continue;
            };
            if inner.config.corrupt_outgoing
                && let Some(b) = data.first_mut()
            {
                *b ^= 0xff;
            }
            buf.clear();
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
        }
    }
}
