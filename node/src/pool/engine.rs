//! The pool as a sans-IO state machine (quinn-proto / str0m style): the I/O shell feeds it
//! [`Input`]s with the time — neighbours coming and going, pool messages, disk completions,
//! chunks handed to a channel — and calls [`PoolEngine::handle_timeout`] at
//! [`PoolEngine::poll_timeout`]; it answers with [`Output`]s taken by
//! [`PoolEngine::poll_output`]: messages and chunks to send, disk jobs, disconnects and
//! events for the application. No tokio, no filesystem, no lock; deterministic for a seed.
//!
//! Where things live: this file holds the types, the dispatch, neighbours coming and going
//! and the timer; `requests.rs` answers control messages (offers, requests, chunks-missing,
//! cancels, Unavailable: gossip, serving, promising, relaying); `serve.rs` moves chunks
//! (arrivals, disk completions, the per-neighbour send pump); `neighbour.rs`, `gossip.rs`
//! and `relay.rs` hold the bounded state; [`crate::fetch`] decides what to ask whom.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tidepool_protocol::PeerId;
use tidepool_protocol::pool::{ChunkRanges, FileId, FileMeta, PoolMessage};

use super::PoolConfig;
pub use super::events::{
    ChunkData, DiskDone, DiskJob, EngineStats, Input, Keep, Output, ReadFrom, ReadJob,
    StoreFailure, StoreJob, Stored,
};
use super::gossip::Gossip;
use super::neighbour::Neighbour;
use super::relay::Relays;
use crate::Channel;
use crate::fetch::Fetch;

/// How often the engine wants [`PoolEngine::handle_timeout`].
pub const TICK: Duration = Duration::from_millis(100);

/// A whole file shared here.
#[derive(Debug)]
pub(super) struct Whole {
    pub meta: Arc<FileMeta>,
    pub count: u32,
    /// In its initial seeding pass: each chunk to one neighbour before any twice.
    pub super_seed: bool,
    /// Chunks sent at least once.
    pub sent_once: ChunkRanges,
}

/// A download.
#[derive(Debug)]
pub(super) struct Active {
    pub meta: Arc<FileMeta>,
    pub fetch: Fetch<PeerId>,
    /// Chunks it can serve (held, with proofs).
    pub servable: ChunkRanges,
    /// Chunk payload bytes received, duplicates included.
    pub received: u64,
    /// What was last offered to neighbours, and when.
    pub offered: ChunkRanges,
    pub last_offer: Instant,
    /// The final re-hash is running.
    pub finishing: bool,
}

/// The engine. See the module docs.
pub struct PoolEngine {
    pub(super) me: PeerId,
    pub(super) config: PoolConfig,
    pub(super) rng: fastrand::Rng,
    pub(super) now: Instant,
    pub(super) seq: u64,
    pub(super) neighbours: BTreeMap<PeerId, Neighbour>,
    pub(super) gossip: Gossip,
    pub(super) whole: BTreeMap<FileId, Whole>,
    pub(super) downloads: BTreeMap<FileId, Active>,
    /// Files the application asked for whose download is not running yet.
    pub(super) wanted: BTreeSet<FileId>,
    pub(super) opening: BTreeMap<FileId, Arc<FileMeta>>,
    /// What the relay cache holds (as the disk side reported), and what was offered of it.
    pub(super) cache: BTreeMap<FileId, ChunkRanges>,
    pub(super) cache_offered: BTreeMap<FileId, ChunkRanges>,
    pub(super) relays: Relays,
    /// Store jobs out (chunks in memory waiting for the disk).
    pub(super) storing: usize,
    pub(super) out: VecDeque<Output>,
    /// Downloads whose fetch should be polled, and whose progress should be published.
    pub(super) dirty: BTreeSet<FileId>,
    pub(super) last_tick: Instant,
    pub(super) last_full_offer: Option<Instant>,
    pub(super) last_cache_offer: Option<Instant>,
    pub(super) stats: EngineStats,
    /// The next neighbour session number.
    pub(super) next_session: u64,
}

impl std::fmt::Debug for PoolEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolEngine")
            .field("me", &self.me)
            .field("neighbours", &self.neighbours.len())
            .field("downloads", &self.downloads.len())
            .finish_non_exhaustive()
    }
}

impl PoolEngine {
    /// An engine for node `me`; `seed` makes request ids and start points reproducible.
    pub fn new(me: PeerId, config: PoolConfig, now: Instant, seed: u64) -> Self {
        Self {
            me,
            gossip: Gossip::new(config.max_catalog, config.max_catalog * 16),
            relays: Relays::new(config.max_relayed, config.max_relayed_per_peer),
            config,
            rng: fastrand::Rng::with_seed(seed),
            now,
            seq: 1,
            neighbours: BTreeMap::new(),
            whole: BTreeMap::new(),
            downloads: BTreeMap::new(),
            wanted: BTreeSet::new(),
            opening: BTreeMap::new(),
            cache: BTreeMap::new(),
            cache_offered: BTreeMap::new(),
            storing: 0,
            out: VecDeque::new(),
            dirty: BTreeSet::new(),
            last_tick: now,
            last_full_offer: None,
            last_cache_offer: None,
            stats: EngineStats::default(),
            next_session: 1,
        }
    }

    /// This node.
    pub fn peer_id(&self) -> PeerId {
        self.me
    }

    /// The counters.
    pub fn stats(&self) -> EngineStats {
        let mut s = self.stats;
        s.catalog_evicted = self.gossip.evicted;
        let (files, relayed, queued, promises) = self.table_sizes();
        s.catalog_files = files as u64;
        s.relayed_requests = relayed as u64;
        s.queued_chunks = queued;
        s.promises = promises as u64;
        s
    }

    /// Neighbours known.
    pub fn neighbour_count(&self) -> usize {
        self.neighbours.len()
    }

    /// The sizes of every remotely growable table, for tests that push past their bounds:
    /// (catalog files, relayed requests, chunks queued to serve in all, promises in all).
    pub fn table_sizes(&self) -> (usize, usize, u64, usize) {
        (
            self.gossip.len(),
            self.relays.len(),
            self.neighbours.values().map(|n| n.queued).sum(),
            self.neighbours.values().map(|n| n.promises.len()).sum(),
        )
    }

    /// Whether `file_id` is a whole file here.
    pub fn is_whole(&self, file_id: &FileId) -> bool {
        self.whole.contains_key(file_id)
    }

    /// Chunks held of a download in progress (None when there is none).
    pub fn download_have(&self, file_id: &FileId) -> Option<&ChunkRanges> {
        self.downloads.get(file_id).map(|a| a.fetch.have())
    }

    /// When [`PoolEngine::handle_timeout`] is due.
    pub fn poll_timeout(&self) -> Instant {
        self.last_tick + TICK
    }

    /// The next thing to do. Downloads touched by the inputs so far are polled here, once
    /// per batch of inputs, so a burst of chunks makes one round of requests.
    pub fn poll_output(&mut self) -> Option<Output> {
        if self.out.is_empty() && !self.dirty.is_empty() {
            self.poll_downloads(false);
        }
        self.out.pop_front()
    }

    /// Feeds one input.
    pub fn handle(&mut self, now: Instant, input: Input) {
        self.now = self.now.max(now);
        match input {
            Input::PeerUp(peer) => self.peer_up(peer),
            Input::PeerDown(peer) => self.peer_down(peer),
            Input::Message { peer, channel, msg } => {
                if !self.neighbours.contains_key(&peer) {
                    self.stats.from_strangers += 1;
                    return;
                }
                match (channel, msg) {
                    (
                        Channel::Chunks,
                        PoolMessage::Chunk {
                            file_id,
                            request_id,
                            index,
                            proof,
                            data,
                        },
                    ) => self.on_chunk(peer, file_id, request_id, index, ChunkData { data, proof }),
                    (Channel::Control, PoolMessage::Chunk { .. }) | (Channel::Chunks, _) => {
                        self.drop_peer(peer, "pool message on the wrong channel".into())
                    }
                    (Channel::Control, msg) => self.on_control(peer, msg),
                }
            }
            Input::Undecodable { peer, error } => {
                if self.neighbours.contains_key(&peer) {
                    self.drop_peer(peer, format!("undecodable pool message: {error}"));
                }
            }
            Input::Sent { peer, session, ok } => self.on_sent(peer, session, ok),
            Input::Disk(done) => self.on_disk(done),
            Input::Share { meta, super_seed } => self.share(meta, super_seed),
            Input::Get(file_id) => {
                self.gossip_pin(file_id);
                if self.whole.contains_key(&file_id) {
                    // Held whole here already (shared, or fetched before): nothing to fetch,
                    // and the caller hears so rather than waiting.
                    self.out.push_back(Output::Finished {
                        file_id,
                        result: Err("this node already holds the whole file".into()),
                    });
                } else if !self.downloads.contains_key(&file_id) {
                    self.wanted.insert(file_id);
                    self.start_wanted(file_id);
                }
            }
        }
    }

    fn gossip_pin(&mut self, file_id: FileId) {
        self.gossip.pin(file_id);
    }

    /// Starts the download of a wanted file once its metadata is known.
    pub(super) fn start_wanted(&mut self, file_id: FileId) {
        if !self.wanted.contains(&file_id) || self.opening.contains_key(&file_id) {
            return;
        }
        let Some(meta) = self.gossip.meta(&file_id).cloned() else {
            return;
        };
        self.wanted.remove(&file_id);
        self.opening.insert(file_id, meta.clone());
        self.out
            .push_back(Output::Disk(DiskJob::Open { file_id, meta }));
    }

    fn share(&mut self, meta: FileMeta, super_seed: bool) {
        let Ok(count) = meta.chunk_count() else {
            return;
        };
        let meta = self.gossip.learn(&meta);
        let id = meta.file_id();
        self.gossip.pin(id);
        self.wanted.remove(&id);
        self.whole.insert(
            id,
            Whole {
                meta: meta.clone(),
                count,
                super_seed,
                sent_once: ChunkRanges::new(),
            },
        );
        if self.cache.remove(&id).is_some() {
            self.cache_offered.remove(&id);
            self.out
                .push_back(Output::Disk(DiskJob::EvictCache { file_id: id }));
        }
        let offer = self.offer(&meta, ChunkRanges::full(count), self.config.offer_hops);
        self.send_all(&offer, None);
    }

    /// A fresh offer from this node.
    pub(super) fn offer(&mut self, meta: &FileMeta, have: ChunkRanges, hops: u8) -> PoolMessage {
        self.seq += 1;
        PoolMessage::FileOffer {
            origin: self.me,
            seq: self.seq,
            hops,
            meta: meta.clone(),
            have,
        }
    }

    /// A fresh offer of each whole file here, with the full hop budget.
    pub(super) fn whole_offers(&mut self) -> Vec<PoolMessage> {
        let wholes: Vec<(Arc<FileMeta>, u32)> = self
            .whole
            .values()
            .map(|w| (w.meta.clone(), w.count))
            .collect();
        wholes
            .into_iter()
            .map(|(meta, count)| {
                self.offer(&meta, ChunkRanges::full(count), self.config.offer_hops)
            })
            .collect()
    }

    /// Gossips `msg` (an offer or retract) to every neighbour but `except`.
    pub(super) fn send_all(&mut self, msg: &PoolMessage, except: Option<PeerId>) {
        for p in self.neighbours.keys() {
            if Some(*p) != except {
                self.out.push_back(Output::Send {
                    peer: *p,
                    msg: msg.clone(),
                    sheddable: true,
                });
            }
        }
    }

    /// Sends a message `peer` is owed (requests, reports, answers).
    pub(super) fn send(&mut self, peer: PeerId, msg: PoolMessage) {
        self.out.push_back(Output::Send {
            peer,
            msg,
            sheddable: false,
        });
    }

    /// Gossips `msg` to one neighbour.
    fn gossip_to(&mut self, peer: PeerId, msg: PoolMessage) {
        self.out.push_back(Output::Send {
            peer,
            msg,
            sheddable: true,
        });
    }

    /// Tells `peer` that `chunks` of its request will not come from here.
    pub(super) fn unavailable(
        &mut self,
        peer: PeerId,
        file_id: FileId,
        request_id: u64,
        chunks: ChunkRanges,
    ) {
        if !chunks.is_empty() && self.neighbours.contains_key(&peer) {
            self.send(
                peer,
                PoolMessage::Unavailable {
                    request_id,
                    file_id,
                    chunks,
                },
            );
        }
    }

    /// The metadata of a file known here in any way.
    pub(super) fn meta(&self, id: &FileId) -> Option<Arc<FileMeta>> {
        self.whole
            .get(id)
            .map(|w| w.meta.clone())
            .or_else(|| self.downloads.get(id).map(|a| a.meta.clone()))
            .or_else(|| self.gossip.meta(id).cloned())
    }

    fn peer_up(&mut self, peer: PeerId) {
        if self.neighbours.contains_key(&peer) {
            return;
        }
        let session = self.next_session;
        self.next_session += 1;
        self.neighbours.insert(
            peer,
            Neighbour::new(self.now, self.config.offer_burst, session),
        );
        // What this node holds, and what it heard of, so a late neighbour learns it too.
        for o in self.whole_offers() {
            self.gossip_to(peer, o);
        }
        let partial: Vec<(Arc<FileMeta>, ChunkRanges)> = self
            .downloads
            .values()
            .filter(|a| !a.servable.is_empty())
            .map(|a| (a.meta.clone(), a.servable.clone()))
            .chain(
                self.cache
                    .iter()
                    .filter(|(id, _)| {
                        !self.whole.contains_key(id) && !self.downloads.contains_key(id)
                    })
                    .filter_map(|(id, have)| Some((self.gossip.meta(id)?.clone(), have.clone()))),
            )
            .collect();
        for (meta, have) in partial {
            let o = self.offer(&meta, have, 0);
            self.gossip_to(peer, o);
        }
        let whole = &self.whole;
        for m in self
            .gossip
            .recent_heard(self.config.regossip, |id| whole.contains_key(id))
        {
            self.gossip_to(peer, m);
        }
    }

    fn peer_down(&mut self, peer: PeerId) {
        if self.neighbours.remove(&peer).is_none() {
            return;
        }
        for (id, a) in self.downloads.iter_mut() {
            a.fetch.remove_source(&peer);
            self.dirty.insert(*id);
        }
        // Requests relayed for it: nobody waits for them any more.
        for (up_id, r) in self.relays.take_for(peer) {
            self.send(
                r.upstream,
                PoolMessage::Cancel {
                    request_id: up_id,
                    file_id: r.file_id,
                },
            );
        }
        self.recheck_promises();
        // Requests passed on through it go another way at once: the requester only sees
        // this node, busy with its other requests, and would wait for a stall to re-ask.
        for (_, r) in self.relays.take_through(peer) {
            self.reroute(r);
        }
    }

    /// Drops a neighbour that broke the protocol or lied, and forgets it at once.
    pub(super) fn drop_peer(&mut self, peer: PeerId, reason: String) {
        tracing::warn!(?peer, "dropping peer: {reason}");
        self.stats.dropped_peers += 1;
        self.out.push_back(Output::Disconnect { peer, reason });
        self.peer_down(peer);
    }
}

/// Bytes in chunks `range` of a file.
pub(super) fn chunk_bytes(meta: &FileMeta, range: std::ops::Range<u32>) -> u64 {
    let start = u64::from(range.start) * u64::from(meta.chunk_size);
    let end = (u64::from(range.end) * u64::from(meta.chunk_size)).min(meta.size);
    end.saturating_sub(start)
}
