//! The sans-IO swarm core: one shard of swarms, driven by requests and the time, pushing
//! encoded frames for connections into a caller's reused buffer. No sockets, no clocks.
//!
//! Call order for a driver: [`Shard::handle`] for each request as it arrives, [`Shard::clean`]
//! every cleaning interval. Each call appends to `out`; the driver delivers and clears it.
//!
//! Membership rules (what a long-lived client relies on):
//! - one connection holds at most a few peers per swarm (`max_peer_ids_per_swarm`, 4 by
//!   default, counted by the socket worker): a new `peer_id` past that replaces the
//!   connection's least recently announced one there, which the socket worker names in
//!   [`Announce::replaces`]. Not one: the npm client shares one socket among all clients of
//!   a process, so two clients of one process in one torrent are two peers on one socket;
//!   a few, so a socket that invents a fresh id per announce stays a few peers;
//! - a `peer_id` belongs to the connection that announced it; another connection may take it
//!   over only when the owner has been silent (no frame, no pong) for longer than
//!   [`ShardConfig::takeover_grace`], or is gone — a client whose network changed reconnects
//!   and keeps its id, while a live owner cannot be hijacked;
//! - a closed connection names the (swarm, peer) pairs it held in [`Request::Closed`], so
//!   teardown costs O(its peers), and only peers it still owns are removed.

use std::time::{Duration, Instant};

use ahash::AHashMap;
use tidepool_protocol::tracker::{
    Action, AnnounceEvent, AnnounceResponse, AnswerMessage, ErrorResponse, OfferMessage,
    OpaqueJson, ScrapeStats,
};
use tidepool_protocol::{InfoHash, OfferId, PeerId};

/// A connection, unique across all socket workers for the life of the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnId {
    /// The tracker instance that holds the socket: random per boot, so a connection id is
    /// unique across a cluster and across restarts (see [`crate::cluster`]).
    pub instance: u64,
    /// The socket worker that owns it.
    pub worker: u16,
    /// Its slot in that worker's connection table (reused after close).
    pub slot: u32,
    /// Never reused within a worker, so a stale reply for a closed connection's slot is
    /// recognised and dropped instead of reaching the slot's next occupant.
    pub serial: u64,
}

/// An announce, decoded by a socket worker and owned so it can cross threads.
#[derive(Debug, Clone)]
pub struct Announce {
    /// The swarm.
    pub info_hash: InfoHash,
    /// The announcing peer.
    pub peer_id: PeerId,
    /// Lifecycle event.
    pub event: AnnounceEvent,
    /// Offers wanted; `None` means the configured default.
    pub numwant: Option<u32>,
    /// `left == 0`.
    pub seeder: bool,
    /// Offers, each already encoded once as JSON so forwarding only splices.
    pub offers: Vec<(OfferId, Box<str>)>,
    /// The answer part, when this announce answers an offer.
    pub answer: Option<AnswerPart>,
    /// A peer id of this connection in this swarm that the announced one replaces (the
    /// connection already held as many ids there as it may): that peer leaves.
    pub replaces: Option<PeerId>,
}

/// The answer carried by an announce.
#[derive(Debug, Clone)]
pub struct AnswerPart {
    /// The offerer.
    pub to_peer_id: PeerId,
    /// The offer answered.
    pub offer_id: OfferId,
    /// The answer object, encoded once as JSON.
    pub answer: Box<str>,
}

/// What a shard is asked to do.
#[derive(Debug, Clone)]
pub enum Request {
    /// An announce (possibly carrying offers or an answer).
    Announce(Announce),
    /// Counts for these swarms (zeros for unknown ones). Scrapes of every swarm are served
    /// from a snapshot built from [`Shard::top_swarms`], never through here.
    Scrape {
        /// Echoed in the reply so the socket worker can merge parts from several shards.
        request_id: u64,
        /// The swarms.
        info_hashes: Vec<InfoHash>,
    },
    /// The connection closed: drop the peers it owns among these (and only those).
    Closed {
        /// The (swarm, peer id) pairs it held in this shard.
        peers: Vec<(InfoHash, PeerId)>,
    },
}

impl Request {
    /// Bytes this request holds, for byte-bounded channels (an estimate that never
    /// undercounts what a client controls: the offers, the answer, the hashes).
    pub fn weight(&self) -> usize {
        const BASE: usize = size_of::<Request>() + 32;
        match self {
            Request::Announce(a) => {
                BASE + a.offers.iter().map(|(_, o)| o.len() + 64).sum::<usize>()
                    + a.answer.as_ref().map_or(0, |x| x.answer.len() + 64)
            }
            Request::Scrape { info_hashes, .. } => BASE + info_hashes.len() * 20,
            Request::Closed { peers } => BASE + peers.len() * 40,
        }
    }
}

/// How long ago a connection was last heard from (any frame or pong), as the socket
/// workers see it. The shard asks only when another connection claims a peer id.
pub trait Liveness {
    /// Time since `conn` was last heard from at `now`; `Duration::MAX` when it is closed.
    fn quiet_for(&self, conn: ConnId, now: Instant) -> Duration;
}

/// Every connection counts as live: no takeover ever happens (for tests and tools).
#[derive(Debug, Clone, Copy, Default)]
pub struct AlwaysLive;

impl Liveness for AlwaysLive {
    fn quiet_for(&self, _conn: ConnId, _now: Instant) -> Duration {
        Duration::ZERO
    }
}

/// What kind of message a frame from the shard is (for the metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// The reply to an announce.
    AnnounceResponse,
    /// An offer forwarded to a peer.
    Offer,
    /// An answer routed back to the offerer.
    Answer,
    /// A failure reply.
    Error,
    /// A failure reply refusing a swarm the access list denies (sent by the worker that
    /// drives the shard, which holds the list).
    Denied,
}

/// What a shard produces for a connection.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// A text frame to send: JSON this tracker encoded (UTF-8 by construction, so not
    /// validated again on its way out).
    Frame(FrameKind, Vec<u8>),
    /// One shard's part of a scrape reply.
    ScrapePart {
        /// The scrape it answers.
        request_id: u64,
        /// Counts per swarm.
        files: Vec<(InfoHash, ScrapeStats)>,
    },
}

impl Output {
    /// Bytes this output holds, for byte-bounded channels.
    pub fn weight(&self) -> usize {
        const BASE: usize = size_of::<(ConnId, Output)>();
        match self {
            Output::Frame(_, frame) => BASE + frame.len(),
            Output::ScrapePart { files, .. } => {
                BASE + files.len() * size_of::<(InfoHash, ScrapeStats)>()
            }
        }
    }
}

/// Tunables the shard needs (a slice of the tracker config).
#[derive(Debug, Clone)]
pub struct ShardConfig {
    /// Seconds clients are told to wait between announces.
    pub announce_interval: u64,
    /// Peers silent longer than this are dropped by [`Shard::clean`].
    pub peer_timeout: Duration,
    /// Most offers forwarded per announce, whatever `numwant` says.
    pub max_offers: usize,
    /// `numwant` when the client sends none.
    pub default_numwant: usize,
    /// A peer id whose owning connection has been silent this long may be claimed by
    /// another connection (a client that reconnected after its network changed).
    pub takeover_grace: Duration,
}

/// Counters a shard keeps about itself, for the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShardCounters {
    /// Peer ids claimed by a new connection after their owner went silent or closed.
    pub takeovers: u64,
    /// Peers replaced by a new peer id announced from the same connection.
    pub replaced: u64,
    /// Peers dropped by [`Shard::clean`] after the peer timeout.
    pub timed_out: u64,
}

#[derive(Debug)]
struct Peer {
    conn: ConnId,
    /// Position in `Swarm::order`, kept so removal is O(1).
    idx: usize,
    seeder: bool,
    last_seen: Instant,
}

#[derive(Debug, Default)]
struct Swarm {
    peers: AHashMap<PeerId, Peer>,
    /// Peer ids in insertion order, for uniform random choice without collecting the map.
    order: Vec<PeerId>,
    seeders: u64,
    downloaded: u64,
}

impl Swarm {
    fn stats(&self) -> ScrapeStats {
        ScrapeStats {
            complete: self.seeders,
            incomplete: self.peers.len() as u64 - self.seeders,
            downloaded: self.downloaded,
        }
    }

    fn remove(&mut self, peer_id: &PeerId) {
        if let Some(peer) = self.peers.remove(peer_id) {
            if peer.seeder {
                self.seeders -= 1;
            }
            self.order.swap_remove(peer.idx);
            if let Some(moved) = self.order.get(peer.idx)
                && let Some(moved) = self.peers.get_mut(moved)
            {
                moved.idx = peer.idx;
            }
        }
    }
}

/// One shard's swarms.
#[derive(Debug)]
pub struct Shard {
    config: ShardConfig,
    swarms: AHashMap<InfoHash, Swarm>,
    rng: fastrand::Rng,
    counters: ShardCounters,
}

impl Shard {
    /// An empty shard. `seed` makes offer recipients reproducible in tests.
    pub fn new(config: ShardConfig, seed: u64) -> Self {
        Self {
            config,
            swarms: AHashMap::default(),
            rng: fastrand::Rng::with_seed(seed),
            counters: ShardCounters::default(),
        }
    }

    /// What the shard has counted since it started.
    pub fn counters(&self) -> ShardCounters {
        self.counters
    }

    /// The connection that owns `peer_id` in `info_hash`, if that peer is held.
    pub fn owner(&self, info_hash: &InfoHash, peer_id: &PeerId) -> Option<ConnId> {
        self.swarms
            .get(info_hash)?
            .peers
            .get(peer_id)
            .map(|p| p.conn)
    }

    /// Checks the shard's internal bookkeeping (for the fuzz targets and tests): every swarm
    /// non-empty, its order list and peer map describing the same peers, each peer's index
    /// right, the seeder count equal to the seeders held.
    #[doc(hidden)]
    pub fn check(&self) -> Result<(), String> {
        for (h, swarm) in &self.swarms {
            if swarm.peers.is_empty() {
                return Err(format!("empty swarm {h:?} kept"));
            }
            if swarm.order.len() != swarm.peers.len() {
                return Err(format!(
                    "{h:?}: order {} vs peers {}",
                    swarm.order.len(),
                    swarm.peers.len()
                ));
            }
            for (i, id) in swarm.order.iter().enumerate() {
                match swarm.peers.get(id) {
                    Some(p) if p.idx == i => {}
                    _ => return Err(format!("{h:?}: order[{i}] = {id:?} has a wrong index")),
                }
            }
            let seeders = swarm.peers.values().filter(|p| p.seeder).count() as u64;
            if seeders != swarm.seeders {
                return Err(format!(
                    "{h:?}: {seeders} seeders held, {} counted",
                    swarm.seeders
                ));
            }
        }
        Ok(())
    }

    /// Number of swarms held.
    pub fn swarm_count(&self) -> usize {
        self.swarms.len()
    }

    /// Number of peers across all swarms held.
    pub fn peer_count(&self) -> usize {
        self.swarms.values().map(|s| s.peers.len()).sum()
    }

    /// Swarms, seeders and leechers held (walks every swarm: call it once a stats interval,
    /// not per request).
    pub fn totals(&self) -> (u64, u64, u64) {
        let (mut seeders, mut leechers) = (0, 0);
        for swarm in self.swarms.values() {
            let stats = swarm.stats();
            seeders += stats.complete;
            leechers += stats.incomplete;
        }
        (self.swarms.len() as u64, seeders, leechers)
    }

    /// The `n` swarms with the most peers, biggest first.
    pub fn top_swarms(&self, n: usize) -> Vec<(InfoHash, ScrapeStats)> {
        let mut all: Vec<(InfoHash, ScrapeStats)> =
            self.swarms.iter().map(|(h, s)| (*h, s.stats())).collect();
        let key =
            |(h, s): &(InfoHash, ScrapeStats)| (std::cmp::Reverse(s.complete + s.incomplete), h.0);
        if all.len() > n && n > 0 {
            all.select_nth_unstable_by_key(n - 1, key);
            all.truncate(n);
        }
        all.sort_by_key(key);
        all.truncate(n);
        all
    }

    /// Drops every peer whose connection `gone` names (the connections of a cluster member
    /// that died), and the swarms that empties. Walks every peer: for rare events only.
    /// Returns the number of peers removed.
    pub fn remove_peers_of(&mut self, gone: impl Fn(&ConnId) -> bool) -> usize {
        let mut removed = 0;
        self.swarms.retain(|_, swarm| {
            let doomed: Vec<PeerId> = swarm
                .peers
                .iter()
                .filter(|(_, p)| gone(&p.conn))
                .map(|(id, _)| *id)
                .collect();
            removed += doomed.len();
            for peer_id in doomed {
                swarm.remove(&peer_id);
            }
            !swarm.peers.is_empty()
        });
        removed
    }

    /// Drops every swarm `keep` refuses, with its peers (used when an access list changes).
    /// Returns the number of peers removed.
    pub fn retain_swarms(&mut self, keep: impl Fn(&InfoHash) -> bool) -> usize {
        let mut removed = 0;
        self.swarms.retain(|h, swarm| {
            let kept = keep(h);
            if !kept {
                removed += swarm.peers.len();
            }
            kept
        });
        removed
    }

    /// Handles one request from `conn` at time `now`; `liveness` tells how long a peer's
    /// owner has been silent when another connection claims its id.
    pub fn handle(
        &mut self,
        now: Instant,
        conn: ConnId,
        request: Request,
        liveness: &dyn Liveness,
        out: &mut Vec<(ConnId, Output)>,
    ) {
        match request {
            Request::Announce(a) => self.announce(now, conn, a, liveness, out),
            Request::Scrape {
                request_id,
                info_hashes,
            } => {
                let files = info_hashes
                    .iter()
                    .map(|h| (*h, self.swarms.get(h).map(Swarm::stats).unwrap_or_default()))
                    .collect();
                out.push((conn, Output::ScrapePart { request_id, files }));
            }
            Request::Closed { peers } => {
                for (info_hash, peer_id) in peers {
                    self.remove_if_owned(&info_hash, &peer_id, conn);
                }
            }
        }
    }

    /// Removes `peer_id` from `info_hash` if `conn` owns it (an impostor's disconnect or
    /// replacement evicts no one), and frees the swarm when it empties. True if removed.
    fn remove_if_owned(&mut self, info_hash: &InfoHash, peer_id: &PeerId, conn: ConnId) -> bool {
        let Some(swarm) = self.swarms.get_mut(info_hash) else {
            return false;
        };
        if swarm.peers.get(peer_id).is_none_or(|p| p.conn != conn) {
            return false;
        }
        swarm.remove(peer_id);
        if swarm.peers.is_empty() {
            self.swarms.remove(info_hash);
        }
        true
    }

    /// Drops peers silent past the timeout and frees empty swarms.
    pub fn clean(&mut self, now: Instant) {
        let timeout = self.config.peer_timeout;
        let timed_out = &mut self.counters.timed_out;
        self.swarms.retain(|_, swarm| {
            let stale: Vec<PeerId> = swarm
                .peers
                .iter()
                .filter(|(_, p)| now.saturating_duration_since(p.last_seen) > timeout)
                .map(|(id, _)| *id)
                .collect();
            *timed_out += stale.len() as u64;
            for peer_id in stale {
                swarm.remove(&peer_id);
            }
            !swarm.peers.is_empty()
        });
    }

    fn announce(
        &mut self,
        now: Instant,
        conn: ConnId,
        a: Announce,
        liveness: &dyn Liveness,
        out: &mut Vec<(ConnId, Output)>,
    ) {
        // The connection's previous id in this swarm leaves first, whatever becomes of the
        // new one: the client has moved on from it, and the socket worker now records only
        // the new id for this swarm (so a close could not name the old one).
        if let Some(old) = a.replaces
            && old != a.peer_id
            && self.remove_if_owned(&a.info_hash, &old, conn)
        {
            self.counters.replaced += 1;
        }
        if liveness.quiet_for(conn, now) == Duration::MAX {
            // The connection closed after sending this, and its close notice may already
            // have been handled (it no longer names a peer this request stopped or
            // replaced). Leaving still happens; joining, refreshing or taking over would
            // leave a ghost that owns its id until the peer timeout. An answer is still
            // routed: the offerer can use it. Nobody reads a reply.
            if a.event == AnnounceEvent::Stopped && a.answer.is_none() {
                self.remove_if_owned(&a.info_hash, &a.peer_id, conn);
            }
            if let Some(answer) = a.answer
                && self
                    .owner(&a.info_hash, &a.peer_id)
                    .is_none_or(|o| o == conn || liveness.quiet_for(o, now) == Duration::MAX)
            {
                self.route_answer(conn, &a.info_hash, &a.peer_id, answer, out);
            }
            return;
        }
        let refuse = |out: &mut Vec<(ConnId, Output)>, reason: &'static str| {
            let mut frame = Vec::new();
            ErrorResponse {
                failure_reason: reason.into(),
                action: Some(Action::Announce),
                info_hash: Some(a.info_hash),
            }
            .encode(&mut frame);
            out.push((conn, Output::Frame(FrameKind::Error, frame)));
        };

        let owner = self.owner(&a.info_hash, &a.peer_id);
        if let Some(current) = owner
            && current != conn
        {
            // The owner keeps its peer_id while it is live. A silent or closed owner's id
            // passes to a claimant that announces (same seeder state, counts unchanged);
            // never to an answer, which joins nothing, so its connection's close notice
            // could not name the peer.
            let silent = liveness.quiet_for(current, now) > self.config.takeover_grace;
            if !silent {
                refuse(out, "peer_id is in use by another connection");
                return;
            }
            if let Some(answer) = a.answer {
                self.route_answer(conn, &a.info_hash, &a.peer_id, answer, out);
                return;
            }
            if let Some(peer) = self
                .swarms
                .get_mut(&a.info_hash)
                .and_then(|s| s.peers.get_mut(&a.peer_id))
            {
                peer.conn = conn;
                self.counters.takeovers += 1;
            }
        }

        if let Some(answer) = a.answer {
            self.route_answer(conn, &a.info_hash, &a.peer_id, answer, out);
            if owner == Some(conn)
                && let Some(peer) = self
                    .swarms
                    .get_mut(&a.info_hash)
                    .and_then(|s| s.peers.get_mut(&a.peer_id))
            {
                peer.last_seen = now;
            }
            // The reference server sends no announce response for answers.
            return;
        }

        let swarm = self.swarms.entry(a.info_hash).or_default();
        if a.event == AnnounceEvent::Stopped {
            swarm.remove(&a.peer_id);
        } else {
            let seeder = a.seeder || a.event == AnnounceEvent::Completed;
            match swarm.peers.get_mut(&a.peer_id) {
                Some(peer) => {
                    if a.event == AnnounceEvent::Completed && !peer.seeder {
                        swarm.downloaded += 1;
                    }
                    if peer.seeder != seeder {
                        if seeder {
                            swarm.seeders += 1;
                        } else {
                            swarm.seeders -= 1;
                        }
                    }
                    peer.seeder = seeder;
                    peer.last_seen = now;
                }
                None => {
                    if a.event == AnnounceEvent::Completed {
                        swarm.downloaded += 1;
                    }
                    if seeder {
                        swarm.seeders += 1;
                    }
                    swarm.peers.insert(
                        a.peer_id,
                        Peer {
                            conn,
                            idx: swarm.order.len(),
                            seeder,
                            last_seen: now,
                        },
                    );
                    swarm.order.push(a.peer_id);
                }
            }
        }

        let stats = swarm.stats();
        let mut frame = Vec::with_capacity(128);
        AnnounceResponse {
            info_hash: a.info_hash,
            complete: stats.complete,
            incomplete: stats.incomplete,
            interval: self.config.announce_interval,
        }
        .encode(&mut frame);
        out.push((conn, Output::Frame(FrameKind::AnnounceResponse, frame)));

        if !a.offers.is_empty() && a.event != AnnounceEvent::Stopped {
            let want = a
                .numwant
                .map_or(self.config.default_numwant, |n| n as usize)
                .min(a.offers.len())
                .min(self.config.max_offers);
            self.forward_offers(&a.info_hash, &a.peer_id, &a.offers[..want], out);
        }
        if self
            .swarms
            .get(&a.info_hash)
            .is_some_and(|s| s.peers.is_empty())
        {
            self.swarms.remove(&a.info_hash);
        }
    }

    /// Sends each offer to a different random peer of the swarm, never the sender.
    fn forward_offers(
        &mut self,
        info_hash: &InfoHash,
        sender: &PeerId,
        offers: &[(OfferId, Box<str>)],
        out: &mut Vec<(ConnId, Output)>,
    ) {
        let Some(swarm) = self.swarms.get(info_hash) else {
            return;
        };
        let candidates = swarm.order.len().saturating_sub(1);
        let take = offers.len().min(candidates);
        if take == 0 {
            return;
        }
        // Distinct random peers other than the sender. Large swarms: rejection sampling, O(take)
        // instead of O(swarm). Small swarms: a partial shuffle of every candidate.
        let mut picked: Vec<usize> = Vec::with_capacity(take);
        if swarm.order.len() > 4 * take + 1 {
            while picked.len() < take {
                let i = self.rng.usize(..swarm.order.len());
                if swarm.order[i] != *sender && !picked.contains(&i) {
                    picked.push(i);
                }
            }
        } else {
            picked.extend((0..swarm.order.len()).filter(|&i| swarm.order[i] != *sender));
            for i in 0..take {
                let j = self.rng.usize(i..picked.len());
                picked.swap(i, j);
            }
        }
        for ((offer_id, offer), &idx) in offers.iter().zip(&picked[..take]) {
            let recipient = swarm.order[idx];
            let Some(peer) = swarm.peers.get(&recipient) else {
                continue;
            };
            // Sized once by the encoder.
            let mut frame = Vec::new();
            OfferMessage {
                info_hash: *info_hash,
                peer_id: *sender,
                offer_id: *offer_id,
                offer: OpaqueJson::Encoded(offer),
            }
            .encode(&mut frame);
            out.push((peer.conn, Output::Frame(FrameKind::Offer, frame)));
        }
    }

    fn route_answer(
        &mut self,
        conn: ConnId,
        info_hash: &InfoHash,
        answerer: &PeerId,
        answer: AnswerPart,
        out: &mut Vec<(ConnId, Output)>,
    ) {
        let Some(to) = self
            .swarms
            .get(info_hash)
            .and_then(|s| s.peers.get(&answer.to_peer_id))
        else {
            // Like the reference server: an answer to a peer that left goes nowhere.
            return;
        };
        if to.conn == conn && answer.to_peer_id == *answerer {
            return;
        }
        let mut frame = Vec::new();
        AnswerMessage {
            info_hash: *info_hash,
            peer_id: *answerer,
            offer_id: answer.offer_id,
            answer: OpaqueJson::Encoded(&answer.answer),
        }
        .encode(&mut frame);
        out.push((to.conn, Output::Frame(FrameKind::Answer, frame)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidepool_protocol::tracker::{Decoder, ServerMessage};

    const T: Duration = Duration::from_secs(300);

    impl Shard {
        /// `handle` with every connection live.
        fn h(&mut self, now: Instant, conn: ConnId, r: Request, out: &mut Vec<(ConnId, Output)>) {
            self.handle(now, conn, r, &AlwaysLive, out);
        }
    }

    fn shard() -> Shard {
        Shard::new(
            ShardConfig {
                announce_interval: 120,
                peer_timeout: T,
                max_offers: 10,
                default_numwant: 50,
                takeover_grace: Duration::from_secs(30),
            },
            7,
        )
    }

    fn conn(n: u32) -> ConnId {
        ConnId {
            instance: 0,
            worker: 0,
            slot: n,
            serial: n as u64,
        }
    }

    fn announce(peer: u8, event: AnnounceEvent, seeder: bool, offers: usize) -> Request {
        Request::Announce(Announce {
            info_hash: InfoHash([1; 20]),
            peer_id: PeerId([peer; 20]),
            event,
            numwant: None,
            seeder,
            offers: (0..offers)
                .map(|i| {
                    (
                        OfferId::from_bytes20(&[i as u8; 20]),
                        r#"{"type":"offer","sdp":"x"}"#.into(),
                    )
                })
                .collect(),
            answer: None,
            replaces: None,
        })
    }

    fn counts(complete: u64, incomplete: u64, downloaded: u64) -> ScrapeStats {
        ScrapeStats {
            complete,
            incomplete,
            downloaded,
        }
    }

    /// `peer` (on connection number `peer`) announces `event` into swarm 1.
    fn act(
        s: &mut Shard,
        now: Instant,
        peer: u8,
        event: AnnounceEvent,
        seeder: bool,
        offers: usize,
        out: &mut Vec<(ConnId, Output)>,
    ) {
        s.h(
            now,
            conn(peer as u32),
            announce(peer, event, seeder, offers),
            out,
        );
    }

    /// Decodes every frame in `out` for `to` into (kind, complete, incomplete).
    fn frames_for(out: &[(ConnId, Output)], to: ConnId) -> Vec<String> {
        let mut decoder = Decoder::default();
        out.iter()
            .filter(|(c, _)| *c == to)
            .filter_map(|(_, o)| match o {
                Output::Frame(_, f) => Some(f.clone()),
                Output::ScrapePart { .. } => None,
            })
            .map(|f| {
                let mut bytes = f;
                decoder.decode_server(&mut bytes, |m| match m {
                    Ok(ServerMessage::Announce(r)) => {
                        format!("announce {}/{}", r.complete, r.incomplete)
                    }
                    Ok(ServerMessage::Offer(o)) => format!("offer from {}", o.peer_id.0[0]),
                    Ok(ServerMessage::Answer(a)) => format!("answer from {}", a.peer_id.0[0]),
                    Ok(ServerMessage::Error(e)) => format!("error {}", e.failure_reason),
                    other => format!("{other:?}"),
                })
            })
            .collect()
    }

    fn stats(s: &mut Shard, now: Instant) -> ScrapeStats {
        let mut out = Vec::new();
        s.h(
            now,
            conn(99),
            Request::Scrape {
                request_id: 1,
                info_hashes: vec![InfoHash([1; 20])],
            },
            &mut out,
        );
        match &out[0].1 {
            Output::ScrapePart { files, .. } => files[0].1,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn counts_follow_every_event_kind() {
        let mut s = shard();
        let now = Instant::now();
        let mut out = Vec::new();
        act(&mut s, now, 1, AnnounceEvent::Started, false, 0, &mut out);
        act(&mut s, now, 2, AnnounceEvent::Started, true, 0, &mut out);
        assert_eq!(stats(&mut s, now), counts(1, 1, 0));
        act(&mut s, now, 1, AnnounceEvent::Completed, false, 0, &mut out);
        assert_eq!(stats(&mut s, now), counts(2, 0, 1));
        // A repeated `completed` is not another download.
        act(&mut s, now, 1, AnnounceEvent::Completed, true, 0, &mut out);
        assert_eq!(stats(&mut s, now).downloaded, 1);
        act(&mut s, now, 2, AnnounceEvent::Paused, false, 0, &mut out);
        assert_eq!(stats(&mut s, now), counts(1, 1, 1));
        act(&mut s, now, 2, AnnounceEvent::Update, true, 0, &mut out);
        assert_eq!(stats(&mut s, now).complete, 2);
        out.clear();
        act(&mut s, now, 2, AnnounceEvent::Stopped, true, 0, &mut out);
        // `stopped` still gets a response, with the peer already gone.
        assert_eq!(frames_for(&out, conn(2)), ["announce 1/0"]);
        act(&mut s, now, 1, AnnounceEvent::Stopped, true, 0, &mut out);
        assert_eq!(s.swarm_count(), 0, "empty swarm freed");
    }

    #[test]
    fn offers_go_to_distinct_other_peers_and_never_the_sender() {
        let mut s = shard();
        let now = Instant::now();
        let mut out = Vec::new();
        for p in 1..=5u8 {
            act(&mut s, now, p, AnnounceEvent::Started, false, 0, &mut out);
        }
        out.clear();
        act(&mut s, now, 1, AnnounceEvent::None, false, 10, &mut out);
        assert_eq!(frames_for(&out, conn(1)), ["announce 0/5"]);
        let recipients: Vec<ConnId> = out
            .iter()
            .map(|(c, _)| *c)
            .filter(|c| *c != conn(1))
            .collect();
        assert_eq!(recipients.len(), 4, "min(offers, other peers)");
        let unique: std::collections::HashSet<_> = recipients.iter().collect();
        assert_eq!(unique.len(), 4, "one offer per peer");
        // numwant bounds the fan-out.
        out.clear();
        let Request::Announce(mut a) = announce(1, AnnounceEvent::None, false, 10) else {
            unreachable!()
        };
        a.numwant = Some(2);
        s.h(now, conn(1), Request::Announce(a), &mut out);
        assert_eq!(out.len(), 3);
    }

    #[test]
    fn large_swarms_fan_out_to_distinct_peers_and_survive_removals() {
        let mut s = shard();
        let now = Instant::now();
        let mut out = Vec::new();
        let peer_of = |p: u32| {
            let mut id = [1u8; 20];
            id[0] = (p % 256) as u8;
            id[1] = (p / 256) as u8;
            id
        };
        for p in 0..200u32 {
            let Request::Announce(mut a) = announce(0, AnnounceEvent::Started, false, 0) else {
                unreachable!()
            };
            a.peer_id = PeerId(peer_of(p));
            s.h(now, conn(p), Request::Announce(a), &mut out);
        }
        // Remove every third peer; the order index must stay consistent.
        for p in (0..200u32).step_by(3) {
            s.h(
                now,
                conn(p),
                Request::Closed {
                    peers: vec![(InfoHash([1; 20]), PeerId(peer_of(p)))],
                },
                &mut out,
            );
        }
        assert_eq!(s.peer_count(), 133);
        out.clear();
        let Request::Announce(mut a) = announce(0, AnnounceEvent::None, false, 10) else {
            unreachable!()
        };
        a.peer_id = PeerId([1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]);
        s.h(now, conn(1), Request::Announce(a), &mut out);
        let recipients: std::collections::HashSet<ConnId> = out
            .iter()
            .map(|(c, _)| *c)
            .filter(|c| *c != conn(1))
            .collect();
        assert_eq!(recipients.len(), 10);
        assert!(
            recipients.iter().all(|c| c.slot % 3 != 0),
            "no removed peer is picked"
        );
    }

    #[test]
    fn answers_route_to_the_offerer_without_an_announce_response() {
        let mut s = shard();
        let now = Instant::now();
        let mut out = Vec::new();
        act(&mut s, now, 1, AnnounceEvent::Started, false, 0, &mut out);
        act(&mut s, now, 2, AnnounceEvent::Started, false, 0, &mut out);
        out.clear();
        let Request::Announce(mut a) = announce(2, AnnounceEvent::None, false, 0) else {
            unreachable!()
        };
        a.answer = Some(AnswerPart {
            to_peer_id: PeerId([1; 20]),
            offer_id: OfferId::from_bytes20(&[9; 20]),
            answer: r#"{"type":"answer","sdp":"y"}"#.into(),
        });
        s.h(now, conn(2), Request::Announce(a), &mut out);
        assert_eq!(frames_for(&out, conn(1)), ["answer from 2"]);
        assert!(frames_for(&out, conn(2)).is_empty());
    }

    #[test]
    fn impostors_are_refused_and_their_disconnect_evicts_nobody() {
        let mut s = shard();
        let now = Instant::now();
        let mut out = Vec::new();
        act(&mut s, now, 1, AnnounceEvent::Started, false, 0, &mut out);
        out.clear();
        // Another connection announcing, stopping or answering as peer 1.
        s.h(
            now,
            conn(666),
            announce(1, AnnounceEvent::Started, true, 0),
            &mut out,
        );
        s.h(
            now,
            conn(666),
            announce(1, AnnounceEvent::Stopped, true, 0),
            &mut out,
        );
        let errors = frames_for(&out, conn(666));
        assert_eq!(errors, ["error peer_id is in use by another connection"; 2]);
        s.h(
            now,
            conn(666),
            Request::Closed {
                peers: vec![(InfoHash([1; 20]), PeerId([1; 20]))],
            },
            &mut out,
        );
        assert_eq!(s.peer_count(), 1, "owner still there");
        assert_eq!(stats(&mut s, now).incomplete, 1);
        s.h(
            now,
            conn(1),
            Request::Closed {
                peers: vec![(InfoHash([1; 20]), PeerId([1; 20]))],
            },
            &mut out,
        );
        assert_eq!(s.peer_count(), 0);
        assert_eq!(s.swarm_count(), 0);
    }

    #[test]
    fn silent_peers_time_out_and_active_ones_stay() {
        let mut s = shard();
        let t0 = Instant::now();
        let mut out = Vec::new();
        act(&mut s, t0, 1, AnnounceEvent::Started, false, 0, &mut out);
        act(&mut s, t0, 2, AnnounceEvent::Started, true, 0, &mut out);
        act(
            &mut s,
            t0 + T / 2,
            2,
            AnnounceEvent::None,
            true,
            0,
            &mut out,
        );
        s.clean(t0 + T + Duration::from_secs(1));
        assert_eq!(s.peer_count(), 1);
        assert_eq!(stats(&mut s, t0 + T).complete, 1);
        s.clean(t0 + T * 2);
        assert_eq!(s.swarm_count(), 0);
    }

    #[test]
    fn scrape_of_unknown_swarm_is_zeros() {
        let mut s = shard();
        let now = Instant::now();
        let mut out = Vec::new();
        act(&mut s, now, 1, AnnounceEvent::Started, false, 0, &mut out);
        out.clear();
        s.h(
            now,
            conn(1),
            Request::Scrape {
                request_id: 5,
                info_hashes: vec![InfoHash([2; 20]), InfoHash([1; 20])],
            },
            &mut out,
        );
        assert_eq!(
            out,
            [(
                conn(1),
                Output::ScrapePart {
                    request_id: 5,
                    files: vec![
                        (InfoHash([2; 20]), ScrapeStats::default()),
                        (InfoHash([1; 20]), counts(0, 1, 0))
                    ]
                }
            )]
        );
    }

    /// Liveness the test sets: connections listed are silent that long; others are live.
    #[derive(Default)]
    struct Quiet(std::cell::RefCell<Vec<(ConnId, Duration)>>);

    impl Liveness for Quiet {
        fn quiet_for(&self, conn: ConnId, _now: Instant) -> Duration {
            self.0
                .borrow()
                .iter()
                .find(|(c, _)| *c == conn)
                .map_or(Duration::ZERO, |(_, d)| *d)
        }
    }

    fn announce_as(peer: u8, event: AnnounceEvent, replaces: Option<u8>) -> Request {
        let Request::Announce(mut a) = announce(peer, event, false, 0) else {
            unreachable!()
        };
        a.replaces = replaces.map(|r| PeerId([r; 20]));
        Request::Announce(a)
    }

    #[test]
    fn a_new_peer_id_from_the_same_connection_replaces_the_old_one() {
        let mut s = shard();
        let now = Instant::now();
        let mut out = Vec::new();
        s.h(
            now,
            conn(1),
            announce_as(1, AnnounceEvent::Started, None),
            &mut out,
        );
        s.h(
            now,
            conn(2),
            announce_as(2, AnnounceEvent::Started, None),
            &mut out,
        );
        // Connection 1 comes back into the swarm as peer 3: peer 1 leaves.
        s.h(
            now,
            conn(1),
            announce_as(3, AnnounceEvent::Started, Some(1)),
            &mut out,
        );
        assert_eq!(s.peer_count(), 2);
        assert_eq!(s.owner(&InfoHash([1; 20]), &PeerId([1; 20])), None);
        assert_eq!(s.owner(&InfoHash([1; 20]), &PeerId([3; 20])), Some(conn(1)));
        // Naming another connection's peer as replaced removes nobody.
        s.h(
            now,
            conn(1),
            announce_as(4, AnnounceEvent::Started, Some(2)),
            &mut out,
        );
        assert_eq!(s.owner(&InfoHash([1; 20]), &PeerId([2; 20])), Some(conn(2)));
        assert_eq!(s.counters().replaced, 1);
        // A hundred fresh ids from one connection leave one peer, not a hundred.
        for p in 10..110u8 {
            s.h(
                now,
                conn(7),
                announce_as(p, AnnounceEvent::None, Some(p - 1)),
                &mut out,
            );
        }
        let held: Vec<_> = (10..110u8)
            .filter(|p| s.owner(&InfoHash([1; 20]), &PeerId([*p; 20])).is_some())
            .collect();
        assert_eq!(held, [109]);
    }

    #[test]
    fn a_silent_owners_peer_id_passes_to_a_new_connection_but_a_live_owner_keeps_it() {
        let mut s = shard();
        let now = Instant::now();
        let mut out = Vec::new();
        let quiet = Quiet::default();
        s.handle(
            now,
            conn(1),
            announce_as(1, AnnounceEvent::Completed, None),
            &quiet,
            &mut out,
        );
        out.clear();
        // Live (heard 29 s ago, grace 30 s): the claim is refused.
        quiet
            .0
            .borrow_mut()
            .push((conn(1), Duration::from_secs(29)));
        s.handle(
            now,
            conn(2),
            announce_as(1, AnnounceEvent::Started, None),
            &quiet,
            &mut out,
        );
        assert_eq!(
            frames_for(&out, conn(2)),
            ["error peer_id is in use by another connection"]
        );
        assert_eq!(s.owner(&InfoHash([1; 20]), &PeerId([1; 20])), Some(conn(1)));
        // Silent past the grace: the new connection takes the id, the counts stay.
        quiet.0.borrow_mut()[0].1 = Duration::from_secs(31);
        out.clear();
        s.handle(
            now,
            conn(2),
            announce_as(1, AnnounceEvent::None, None),
            &quiet,
            &mut out,
        );
        assert_eq!(frames_for(&out, conn(2)), ["announce 0/1"]);
        assert_eq!(s.owner(&InfoHash([1; 20]), &PeerId([1; 20])), Some(conn(2)));
        assert_eq!(s.counters().takeovers, 1);
        assert_eq!(stats(&mut s, now).downloaded, 1, "no new download counted");
        // The old connection's close, arriving late, evicts nobody.
        s.h(
            now,
            conn(1),
            Request::Closed {
                peers: vec![(InfoHash([1; 20]), PeerId([1; 20]))],
            },
            &mut out,
        );
        assert_eq!(s.peer_count(), 1);
        // A closed owner (its close notice lost or late) is gone at once.
        quiet.0.borrow_mut().push((conn(2), Duration::MAX));
        s.handle(
            now,
            conn(3),
            announce_as(1, AnnounceEvent::None, None),
            &quiet,
            &mut out,
        );
        assert_eq!(s.owner(&InfoHash([1; 20]), &PeerId([1; 20])), Some(conn(3)));
    }

    /// A shard where peers 1 and 2 (on connections 1 and 2) announced.
    fn two_live_peers(now: Instant, quiet: &Quiet) -> Shard {
        let mut s = shard();
        let mut out = Vec::new();
        for p in [1, 2] {
            let started = announce_as(p as u8, AnnounceEvent::Started, None);
            s.handle(now, conn(p), started, quiet, &mut out);
        }
        s
    }

    /// Peer 1 answers peer 2's offer.
    fn answer_from_1_to_2() -> Request {
        let Request::Announce(mut a) = announce_as(1, AnnounceEvent::None, None) else {
            unreachable!()
        };
        a.answer = Some(AnswerPart {
            to_peer_id: PeerId([2; 20]),
            offer_id: OfferId::from_bytes20(&[9; 20]),
            answer: r#"{"type":"answer","sdp":"y"}"#.into(),
        });
        Request::Announce(a)
    }

    #[test]
    fn a_request_that_overtook_its_connections_close_leaves_but_never_joins() {
        let now = Instant::now();
        let mut out = Vec::new();
        let quiet = Quiet::default();
        let mut s = two_live_peers(now, &quiet);
        out.clear();
        // Connection 1 sent `stopped` and closed; its close notice, handled first, no longer
        // named peer 1. The stop still removes it.
        quiet.0.borrow_mut().push((conn(1), Duration::MAX));
        s.handle(
            now,
            conn(1),
            announce_as(1, AnnounceEvent::Stopped, None),
            &quiet,
            &mut out,
        );
        assert_eq!(s.owner(&InfoHash([1; 20]), &PeerId([1; 20])), None);
        // A join, a replacing id or a takeover from a closed connection adds nothing.
        s.handle(
            now,
            conn(1),
            announce_as(3, AnnounceEvent::Started, Some(1)),
            &quiet,
            &mut out,
        );
        assert_eq!(s.peer_count(), 1);
        // Its last answer still reaches the offerer.
        let a = answer_from_1_to_2();
        s.handle(now, conn(1), a, &quiet, &mut out);
        assert_eq!(frames_for(&out, conn(2)), ["answer from 1"]);
        assert!(frames_for(&out, conn(1)).is_empty(), "nobody to reply to");
    }

    #[test]
    fn an_answer_never_takes_over_a_silent_owners_id() {
        let now = Instant::now();
        let mut out = Vec::new();
        let quiet = Quiet::default();
        let mut s = two_live_peers(now, &quiet);
        quiet
            .0
            .borrow_mut()
            .push((conn(1), Duration::from_secs(60)));
        out.clear();
        let a = answer_from_1_to_2();
        s.handle(now, conn(3), a, &quiet, &mut out);
        assert_eq!(frames_for(&out, conn(2)), ["answer from 1"], "routed");
        assert_eq!(
            s.owner(&InfoHash([1; 20]), &PeerId([1; 20])),
            Some(conn(1)),
            "not taken"
        );
        assert_eq!(s.counters().takeovers, 0);
    }

    #[test]
    fn a_dead_instances_peers_are_purged_and_no_one_elses() {
        let mut s = shard();
        let now = Instant::now();
        let mut out = Vec::new();
        let remote = |n: u32| ConnId {
            instance: 42,
            ..conn(n)
        };
        s.h(
            now,
            conn(1),
            announce(1, AnnounceEvent::Started, true, 0),
            &mut out,
        );
        s.h(
            now,
            remote(2),
            announce(2, AnnounceEvent::Started, false, 0),
            &mut out,
        );
        s.h(
            now,
            remote(3),
            announce(3, AnnounceEvent::Started, false, 0),
            &mut out,
        );
        assert_eq!(s.totals(), (1, 1, 2));
        // Slot 1 on the dead instance is not slot 1 here.
        assert_eq!(s.remove_peers_of(|c| c.instance == 42), 2);
        assert_eq!(s.totals(), (1, 1, 0));
        assert_eq!(s.owner(&InfoHash([1; 20]), &PeerId([1; 20])), Some(conn(1)));
        assert_eq!(s.remove_peers_of(|c| c.instance == 0), 1);
        assert_eq!(s.swarm_count(), 0, "an emptied swarm is freed");
    }

    #[test]
    fn totals_top_swarms_and_access_list_purges() {
        let mut s = shard();
        let now = Instant::now();
        let mut out = Vec::new();
        for peer in 1..=3 {
            act(
                &mut s,
                now,
                peer,
                AnnounceEvent::Started,
                peer == 1,
                0,
                &mut out,
            );
        }
        let mut other = announce(9, AnnounceEvent::Started, false, 0);
        if let Request::Announce(a) = &mut other {
            a.info_hash = InfoHash([2; 20]);
        }
        s.h(now, conn(9), other, &mut out);
        assert_eq!(s.totals(), (2, 1, 3), "(swarms, seeders, leechers)");
        let top = s.top_swarms(1);
        assert_eq!(top, vec![(InfoHash([1; 20]), counts(1, 2, 0))]);
        assert_eq!(s.top_swarms(10).len(), 2);
        assert_eq!(s.retain_swarms(|h| *h != InfoHash([1; 20])), 3);
        assert_eq!(s.totals(), (1, 0, 1));
        assert_eq!(stats(&mut s, now), counts(0, 0, 0));
    }
}
