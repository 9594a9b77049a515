//! A deterministic pool simulator: many [`PoolEngine`]s on an in-memory network with
//! virtual time. Each node has an uplink of fixed bandwidth (chunks queue on it in order;
//! control messages skip the queue) and each link a fixed latency; a tracker model hands
//! out neighbours the way the real tracker and node do (a node below `max_peers` announces
//! with a few offers to random members; a full member makes room for a node with no
//! neighbour); the disk verifies instantly and re-hashes at 1 GB/s. Churn kills nodes
//! (noticed after the heartbeat timeout), restarts them with the chunks they held, and lets
//! nodes join late; a super-seeding seeder can leave after one full copy.
//!
//! Same config, same run, byte for byte: one seeded generator, ordered maps, and events
//! ordered by (time, sequence). [`SimReport::digest`] hashes every event to prove it.
//! Chunks carry a two-byte token instead of data, so 1,000 nodes move a 256 MiB file in
//! minutes of CPU. Not modelled: downlink limits, loss, ICE; see DESIGN §5.

mod config;
mod model;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::time::{Duration, Instant};

use tidepool_protocol::PeerId;
use tidepool_protocol::pool::{ChunkRanges, FileId, FileMeta, PoolMessage};

use super::engine::{DiskDone, Input, Output, PoolEngine, TICK};
pub use config::{Churn, SimConfig, SimReport};

use super::Progress;
use crate::Channel;

#[derive(Debug)]
enum Ev {
    Join(usize),
    Announce(usize, u32),
    Connect(usize, usize),
    Deliver {
        to: usize,
        from: usize,
        epoch: u64,
        channel: Channel,
        msg: PoolMessage,
    },
    Sent {
        node: usize,
        peer: usize,
        epoch: u64,
        session: u64,
    },
    Down {
        node: usize,
        peer: usize,
        epoch: u64,
    },
    Disk(usize, u32, DiskDone),
    Timer(usize, u32),
    Kill(usize, bool),
}

struct Queued {
    at: u64,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Queued {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Queued {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

struct Node {
    id: PeerId,
    engine: Option<PoolEngine>,
    /// Bumped on every restart: events of an earlier life are ignored.
    life: u32,
    /// Chunks on this node's disk, and whether the file is whole here.
    have: ChunkRanges,
    whole: bool,
    /// Neighbour → link epoch (messages of an older link are dropped).
    links: BTreeMap<usize, u64>,
    pending: usize,
    uplink_free: u64,
    uplink: u64,
    joined_at: u64,
    finished_at: Option<u64>,
    progress: Progress,
    gone: bool,
}

/// The simulation.
pub struct Sim {
    cfg: SimConfig,
    meta: FileMeta,
    file_id: FileId,
    count: u32,
    nodes: Vec<Node>,
    by_id: BTreeMap<PeerId, usize>,
    queue: BinaryHeap<Reverse<Queued>>,
    seq: u64,
    now: u64,
    base: Instant,
    rng: fastrand::Rng,
    next_epoch: u64,
    digest: u64,
    events: u64,
    bad_chunks: u64,
    /// Joins and kills still queued: the run is not over while any are.
    pending_churn: usize,
    seeder_sent: u64,
    next_copy_check: u64,
}

impl std::fmt::Debug for Sim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sim")
            .field("nodes", &self.nodes.len())
            .field("now_ns", &self.now)
            .field("events", &self.events)
            .finish_non_exhaustive()
    }
}

const SEEDER: usize = 0;

fn ns(d: Duration) -> u64 {
    d.as_nanos() as u64
}

impl Sim {
    /// Builds the pool: node 0 is the seeder, 1..=nodes download.
    pub fn new(cfg: SimConfig) -> Self {
        let chunk = cfg.pool.chunk_size;
        let meta = FileMeta {
            name: "sim.bin".into(),
            size: cfg.file_size,
            chunk_size: chunk,
            root: [7; 32],
        };
        let count = meta.chunk_count().unwrap_or(1);
        let mut rng = fastrand::Rng::with_seed(cfg.seed);
        let mut nodes = Vec::new();
        let mut by_id = BTreeMap::new();
        for i in 0..=cfg.nodes {
            let mut id = [0u8; 20];
            id[..8].copy_from_slice(&rng.u64(..).to_le_bytes());
            id[8..16].copy_from_slice(&(i as u64).to_le_bytes());
            by_id.insert(PeerId(id), i);
            nodes.push(Node {
                id: PeerId(id),
                engine: None,
                life: 0,
                have: ChunkRanges::new(),
                whole: i == SEEDER,
                links: BTreeMap::new(),
                pending: 0,
                uplink_free: 0,
                uplink: if i == SEEDER {
                    cfg.seeder_uplink
                } else {
                    cfg.uplink
                },
                joined_at: 0,
                finished_at: None,
                progress: Progress::default(),
                gone: false,
            });
        }
        let mut sim = Sim {
            file_id: meta.file_id(),
            meta,
            count,
            nodes,
            by_id,
            queue: BinaryHeap::new(),
            seq: 0,
            now: 0,
            base: Instant::now(),
            rng,
            next_epoch: 1,
            digest: 0xcbf2_9ce4_8422_2325,
            events: 0,
            bad_chunks: 0,
            pending_churn: 0,
            seeder_sent: 0,
            next_copy_check: 0,
            cfg,
        };
        sim.schedule(0, Ev::Join(SEEDER));
        let c = sim.cfg.churn.clone();
        let (w0, w1) = (ns(c.window.0), ns(c.window.1).max(ns(c.window.0) + 1));
        for i in 1..=sim.cfg.nodes {
            let at = if sim.rng.f64() < c.late {
                sim.rng.u64(w0..w1)
            } else {
                ns(Duration::from_millis(100)) + sim.rng.u64(..ns(sim.cfg.join_spread).max(1))
            };
            sim.schedule(at, Ev::Join(i));
            let r = sim.rng.f64();
            if r < c.kill {
                let t = sim.rng.u64(w0..w1);
                sim.schedule(t, Ev::Kill(i, false));
            } else if r < c.kill + c.restart {
                let t = sim.rng.u64(w0..w1);
                sim.schedule(t, Ev::Kill(i, true));
            }
        }
        sim
    }

    fn schedule(&mut self, at: u64, ev: Ev) {
        if matches!(ev, Ev::Join(_) | Ev::Kill(..)) {
            self.pending_churn += 1;
        }
        self.seq += 1;
        self.queue.push(Reverse(Queued {
            at,
            seq: self.seq,
            ev,
        }));
    }

    fn instant(&self) -> Instant {
        self.base + Duration::from_nanos(self.now)
    }

    fn mix(&mut self, x: u64) {
        self.digest ^= x;
        self.digest = self.digest.wrapping_mul(0x100_0000_01b3);
    }

    fn latency(&self, a: usize, b: usize) -> u64 {
        // A fixed per-link draw within ±50%, from the pair alone.
        let (lo, hi) = (a.min(b) as u64, a.max(b) as u64);
        let h = (lo.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ hi).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        let base = ns(self.cfg.latency);
        base / 2 + h % base.max(1)
    }

    /// Runs to the end (every survivor complete, or the time limit).
    pub fn run(mut self) -> SimReport {
        let limit = ns(self.cfg.time_limit);
        let mut timeline = Vec::new();
        let mut next_second = 0;
        while let Some(Reverse(q)) = self.queue.pop() {
            while q.at >= next_second * 1_000_000_000 {
                let held = self.nodes[1..].iter().map(|n| n.progress.have_bytes).sum();
                let done = self.nodes[1..]
                    .iter()
                    .filter(|n| n.finished_at.is_some())
                    .count();
                timeline.push((next_second, done, held, self.seeder_sent));
                next_second += 1;
            }
            if q.at > limit {
                self.now = limit;
                break;
            }
            self.now = q.at;
            self.events += 1;
            if matches!(q.ev, Ev::Join(_) | Ev::Kill(..)) {
                self.pending_churn -= 1;
            }
            self.mix(q.at);
            self.step(q.ev);
            if self.events.is_multiple_of(4096) && self.done() {
                break;
            }
        }
        let mut r = self.report();
        r.timeline = timeline;
        r
    }

    fn done(&self) -> bool {
        self.pending_churn == 0
            && self.nodes[1..]
                .iter()
                .all(|n| n.gone || n.finished_at.is_some())
    }

    fn one_copy_in_pool(&self) -> bool {
        let held = self.nodes[1..]
            .iter()
            .filter(|n| n.engine.is_some())
            .fold(ChunkRanges::new(), |acc, n| acc.union(&n.have));
        held.len() >= u64::from(self.count)
    }

    fn alive(&self, i: usize, life: u32) -> bool {
        self.nodes[i].engine.is_some() && self.nodes[i].life == life
    }

    fn step(&mut self, ev: Ev) {
        match ev {
            Ev::Join(i) => self.join(i),
            Ev::Announce(i, life) => {
                if self.alive(i, life) {
                    self.announce(i);
                }
            }
            Ev::Connect(a, b) => self.connect(a, b),
            Ev::Deliver {
                to,
                from,
                epoch,
                channel,
                msg,
            } => {
                if self.nodes[to].links.get(&from) == Some(&epoch) {
                    self.mix(to as u64);
                    let peer = self.nodes[from].id;
                    self.input(to, Input::Message { peer, channel, msg });
                }
            }
            Ev::Sent {
                node,
                peer,
                epoch,
                session,
            } => {
                if node == SEEDER && self.nodes[node].engine.is_some() {
                    self.seeder_sent += self.cfg.pool.chunk_size as u64;
                }
                if self.nodes[node].links.get(&peer) == Some(&epoch) {
                    let p = self.nodes[peer].id;
                    self.input(
                        node,
                        Input::Sent {
                            peer: p,
                            session,
                            ok: true,
                        },
                    );
                }
                if node == SEEDER && self.cfg.seeder_leaves_after_copy {
                    let sent = self.nodes[SEEDER]
                        .engine
                        .as_ref()
                        .map_or(0, |e| e.stats().served_distinct_bytes);
                    // Leaves once its copy has gone out and arrived: every chunk held by a
                    // downloader (a chunk on the wire to a neighbour that just closed the
                    // link is lost, and would be sent again).
                    if sent >= self.cfg.file_size && self.now >= self.next_copy_check {
                        self.next_copy_check = self.now + ns(TICK);
                        if self.one_copy_in_pool() {
                            self.schedule(self.now + 1, Ev::Kill(SEEDER, false));
                        }
                    }
                }
            }
            Ev::Down { node, peer, epoch } => {
                if self.nodes[node].links.get(&peer) == Some(&epoch) {
                    self.nodes[node].links.remove(&peer);
                    let p = self.nodes[peer].id;
                    self.input(node, Input::PeerDown(p));
                    self.schedule_announce(node, 0);
                }
            }
            Ev::Disk(i, life, done) => {
                if self.alive(i, life) {
                    self.input(i, Input::Disk(done));
                }
            }
            Ev::Timer(i, life) => {
                if self.alive(i, life) {
                    let now = self.instant();
                    if let Some(e) = self.nodes[i].engine.as_mut() {
                        e.handle_timeout(now);
                    }
                    self.drain(i);
                    self.schedule(self.now + ns(TICK), Ev::Timer(i, life));
                }
            }
            Ev::Kill(i, restart) => self.kill(i, restart),
        }
    }

    fn join(&mut self, i: usize) {
        if self.nodes[i].engine.is_some() || self.nodes[i].gone {
            return;
        }
        let seed = self.cfg.seed
            ^ (i as u64).wrapping_mul(0x9e37_79b9)
            ^ u64::from(self.nodes[i].life) << 40;
        let mut pool = self.cfg.pool.clone();
        if i == SEEDER {
            pool.super_seed = self.cfg.seeder_leaves_after_copy;
        }
        let now = self.instant();
        let mut e = PoolEngine::new(self.nodes[i].id, pool, now, seed);
        let n = &mut self.nodes[i];
        n.life += 1;
        n.joined_at = self.now;
        if i == SEEDER {
            e.handle(
                now,
                Input::Share {
                    meta: self.meta.clone(),
                    super_seed: self.cfg.seeder_leaves_after_copy,
                },
            );
        } else {
            e.handle(now, Input::Get(self.file_id));
        }
        n.engine = Some(e);
        let life = n.life;
        self.drain(i);
        self.schedule(self.now + ns(TICK), Ev::Timer(i, life));
        self.announce(i);
    }

    fn schedule_announce(&mut self, i: usize, after: u64) {
        let life = self.nodes[i].life;
        self.schedule(self.now + after, Ev::Announce(i, life));
    }

    /// The tracker model: offers go to random members; those with room answer.
    fn announce(&mut self, i: usize) {
        let degree = self.nodes[i].links.len() + self.nodes[i].pending;
        if degree >= self.cfg.max_peers {
            return;
        }
        let members: Vec<usize> = (0..self.nodes.len())
            .filter(|&j| j != i && self.nodes[j].engine.is_some())
            .filter(|j| !self.nodes[i].links.contains_key(j))
            .collect();
        let want = self
            .cfg
            .offers_per_announce
            .min(self.cfg.max_peers - degree);
        for _ in 0..want.min(members.len()) {
            let j = members[self.rng.usize(..members.len())];
            let full = self.nodes[j].links.len() + self.nodes[j].pending >= self.cfg.max_peers;
            if full {
                // A full member makes room for a node with no neighbour (rotation).
                if self.nodes[i].links.is_empty()
                    && self.nodes[i].pending == 0
                    && let Some((&victim, _)) = self.nodes[j].links.iter().next()
                {
                    self.unlink(j, victim, 0);
                } else {
                    continue;
                }
            }
            self.nodes[i].pending += 1;
            self.nodes[j].pending += 1;
            self.schedule(self.now + ns(self.cfg.connect_delay), Ev::Connect(i, j));
        }
        self.schedule_announce(i, ns(self.cfg.announce_interval));
    }

    fn connect(&mut self, a: usize, b: usize) {
        for x in [a, b] {
            self.nodes[x].pending = self.nodes[x].pending.saturating_sub(1);
        }
        if self.nodes[a].engine.is_none()
            || self.nodes[b].engine.is_none()
            || self.nodes[a].links.contains_key(&b)
        {
            return;
        }
        // `b` may still hold a link to an earlier life of `a` it has not noticed is gone:
        // the new connection replaces it, as the node's tie-break does.
        if self.nodes[b].links.remove(&a).is_some() {
            let id = self.nodes[a].id;
            self.input(b, Input::PeerDown(id));
        }
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        self.nodes[a].links.insert(b, epoch);
        self.nodes[b].links.insert(a, epoch);
        let (ia, ib) = (self.nodes[a].id, self.nodes[b].id);
        self.input(a, Input::PeerUp(ib));
        self.input(b, Input::PeerUp(ia));
    }

    /// Closes the link a–b: `a` knows at once, `b` after `after` ns.
    fn unlink(&mut self, a: usize, b: usize, after: u64) {
        let Some(epoch) = self.nodes[a].links.remove(&b) else {
            return;
        };
        if self.nodes[a].engine.is_some() {
            let id = self.nodes[b].id;
            self.input(a, Input::PeerDown(id));
        }
        self.schedule(
            self.now + after,
            Ev::Down {
                node: b,
                peer: a,
                epoch,
            },
        );
    }

    fn kill(&mut self, i: usize, restart: bool) {
        if self.nodes[i].engine.is_none() {
            return;
        }
        self.nodes[i].engine = None;
        let links: Vec<usize> = self.nodes[i].links.keys().copied().collect();
        for j in links {
            let detect = ns(self.cfg.detect_down);
            self.unlink(i, j, detect);
        }
        self.nodes[i].uplink_free = self.now;
        if restart && !self.nodes[i].whole {
            let back = self
                .rng
                .u64(ns(Duration::from_secs(1))..ns(Duration::from_secs(5)));
            self.schedule(self.now + back, Ev::Join(i));
        } else {
            self.nodes[i].gone = true;
        }
    }

    fn input(&mut self, i: usize, input: Input) {
        let now = self.instant();
        let Some(e) = self.nodes[i].engine.as_mut() else {
            return;
        };
        e.handle(now, input);
        self.drain(i);
    }

    fn drain(&mut self, i: usize) {
        let life = self.nodes[i].life;
        loop {
            let Some(o) = self.nodes[i]
                .engine
                .as_mut()
                .and_then(PoolEngine::poll_output)
            else {
                break;
            };
            match o {
                Output::Send { peer, msg, .. } => {
                    let Some(&j) = self.by_id.get(&peer) else {
                        continue;
                    };
                    let Some(&epoch) = self.nodes[i].links.get(&j) else {
                        continue;
                    };
                    let at = self.now + self.latency(i, j);
                    self.schedule(
                        at,
                        Ev::Deliver {
                            to: j,
                            from: i,
                            epoch,
                            channel: Channel::Control,
                            msg,
                        },
                    );
                }
                Output::SendChunk {
                    peer,
                    session,
                    file_id,
                    request_id,
                    index,
                    chunk,
                    ..
                } => {
                    let Some(&j) = self.by_id.get(&peer) else {
                        continue;
                    };
                    let Some(&epoch) = self.nodes[i].links.get(&j) else {
                        let now = self.instant();
                        if let Some(e) = self.nodes[i].engine.as_mut() {
                            e.handle(
                                now,
                                Input::Sent {
                                    peer,
                                    session,
                                    ok: false,
                                },
                            );
                        }
                        continue;
                    };
                    let size = self.meta.chunk_len(index).unwrap_or(0) as u64 + 100;
                    let n = &mut self.nodes[i];
                    let start = n.uplink_free.max(self.now);
                    let departs = start + size * 1_000_000_000 / n.uplink.max(1);
                    n.uplink_free = departs;
                    self.schedule(
                        departs,
                        Ev::Sent {
                            node: i,
                            peer: j,
                            epoch,
                            session,
                        },
                    );
                    let at = departs + self.latency(i, j);
                    self.schedule(
                        at,
                        Ev::Deliver {
                            to: j,
                            from: i,
                            epoch,
                            channel: Channel::Chunks,
                            msg: PoolMessage::Chunk {
                                file_id,
                                request_id,
                                index,
                                proof: chunk.proof,
                                data: chunk.data,
                            },
                        },
                    );
                }
                Output::Disk(job) => {
                    let (done, delay) = self.disk(i, job);
                    if let Some(done) = done {
                        self.schedule(self.now + delay, Ev::Disk(i, life, done));
                    }
                }
                Output::Disconnect { peer, .. } => {
                    if let Some(&j) = self.by_id.get(&peer) {
                        self.nodes[i].links.remove(&j);
                        let epoch = self.nodes[j].links.get(&i).copied().unwrap_or(0);
                        self.schedule(
                            self.now,
                            Ev::Down {
                                node: j,
                                peer: i,
                                epoch,
                            },
                        );
                    }
                }
                Output::Progress { progress, .. } => self.nodes[i].progress = progress,
                Output::Finished { result, .. } => {
                    if result.is_ok() {
                        self.nodes[i].finished_at = Some(self.now);
                    }
                }
            }
        }
    }
}
