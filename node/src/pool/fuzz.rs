//! The pool engine driven by arbitrary inputs (the `pool_ops` fuzz target and a test):
//! neighbours coming and going, offers, requests, chunks good and bad, cancels and reports
//! from them, disk jobs finishing in any order, sends completing or failing, and the clock.
//! After every step: nothing is requested outside the file, no chunk is held, served or
//! passed on that the disk did not verify, the remotely growable tables stay in their bounds,
//! and a download only finishes whole. At the end an honest neighbour offers the whole file:
//! the download must then finish.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tidepool_protocol::PeerId;
use tidepool_protocol::pool::{ChunkRanges, FileId, FileMeta, PoolMessage};

use super::PoolConfig;
use super::engine::TICK;
use super::engine::{ChunkData, DiskDone, DiskJob, Input, Output, PoolEngine, Stored};
use crate::Channel;

const GOOD: &[u8] = b"ok";

fn peer(k: u8) -> PeerId {
    PeerId([k; 20])
}

/// Reads operation parameters; zeros once the input runs out.
struct Ops<'a>(&'a [u8]);

impl Ops<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }

    fn u32(&mut self, below: u32) -> u32 {
        u32::from(self.byte()) % below.max(1)
    }

    /// Up to two ranges below `limit` (which may be past the file's end).
    fn ranges(&mut self, limit: u32) -> ChunkRanges {
        let mut r = ChunkRanges::new();
        for _ in 0..1 + self.byte() % 2 {
            let a = self.u32(limit);
            let b = a + 1 + self.u32(8);
            r.insert(a..b.min(limit.max(a + 1)));
        }
        r
    }
}

/// What the harness knows: the file, the chunks its disk verified, its queued jobs.
struct Harness {
    meta: FileMeta,
    file_id: FileId,
    chunks: u32,
    config: PoolConfig,
    verified: ChunkRanges,
    disk: VecDeque<DiskJob>,
    /// Sessions the engine handed chunks to, per neighbour byte.
    sessions: Vec<(u8, u64)>,
    /// Request ids the engine sent, most recent last (at most 64).
    requests: VecDeque<u64>,
    finished: bool,
    now: Instant,
}

impl Harness {
    /// Takes every output and checks it.
    fn drain(&mut self, e: &mut PoolEngine) {
        while let Some(out) = e.poll_output() {
            match out {
                Output::Send { msg, .. } => {
                    if let PoolMessage::FileRequest {
                        request_id,
                        file_id,
                        requested,
                        promised,
                        ..
                    } = &msg
                        && *file_id == self.file_id
                    {
                        for r in requested.ranges().iter().chain(promised.ranges()) {
                            assert!(
                                r.end <= self.chunks,
                                "asked for {r:?} of {} chunks",
                                self.chunks
                            );
                        }
                        if self.requests.len() == 64 {
                            self.requests.pop_front();
                        }
                        self.requests.push_back(*request_id);
                    }
                }
                Output::SendChunk {
                    peer,
                    session,
                    file_id,
                    index,
                    chunk,
                    ..
                } => {
                    if file_id == self.file_id {
                        assert!(
                            index < self.chunks,
                            "served chunk {index} of {}",
                            self.chunks
                        );
                        assert!(
                            self.verified.contains(index),
                            "served chunk {index}, never verified"
                        );
                    }
                    assert_eq!(
                        chunk.data.as_ref(),
                        GOOD,
                        "served or passed on unverified bytes"
                    );
                    if self.sessions.len() < 64 {
                        self.sessions.push((peer.0[0], session));
                    }
                }
                Output::Disk(job) => {
                    self.disk.push_back(job);
                    assert!(
                        self.disk.len() <= 4 * self.config.disk_queue + 64,
                        "{} disk jobs queued",
                        self.disk.len()
                    );
                }
                Output::Finished { file_id, result } => {
                    if file_id == self.file_id && result.is_ok() {
                        assert!(
                            self.verified.contains_all(&ChunkRanges::full(self.chunks)),
                            "finished with {:?} of {} chunks verified",
                            self.verified,
                            self.chunks
                        );
                        self.finished = true;
                    }
                }
                Output::Disconnect { .. } | Output::Progress { .. } => {}
            }
        }
        if let Some(have) = e.download_have(&self.file_id) {
            assert!(
                self.verified.contains_all(have),
                "holds {have:?}, verified {:?}",
                self.verified
            );
        }
        let (catalog, relayed, _, _) = e.table_sizes();
        assert!(catalog <= self.config.max_catalog, "catalog {catalog}");
        assert!(relayed <= self.config.max_relayed, "relayed {relayed}");
    }

    /// The disk finishes its oldest job: a chunk verifies when its bytes are the good token
    /// and it is inside the file.
    fn disk_done(&mut self, e: &mut PoolEngine) {
        let Some(job) = self.disk.pop_front() else {
            return;
        };
        let done = match job {
            DiskJob::Open { file_id, .. } => DiskDone::Opened {
                file_id,
                result: Ok((ChunkRanges::new(), ChunkRanges::new())),
            },
            DiskJob::Store(job) => {
                let good = job.file_id == self.file_id
                    && job.index < self.chunks
                    && job.chunk.data.as_ref() == GOOD;
                let result = if good {
                    let new = !self.verified.contains(job.index);
                    self.verified.insert(job.index..job.index + 1);
                    Ok(Stored {
                        new,
                        kept: true,
                        cache: None,
                        evicted: Vec::new(),
                    })
                } else {
                    Err(super::engine::StoreFailure::Bad("does not verify".into()))
                };
                DiskDone::Stored { job, result }
            }
            DiskJob::Read(job) => {
                let held = job.file_id == self.file_id && self.verified.contains(job.index);
                let chunk = held.then(|| ChunkData {
                    data: Bytes::from_static(GOOD),
                    proof: Vec::new(),
                });
                DiskDone::Read { job, chunk }
            }
            DiskJob::Finish { file_id } => DiskDone::Finished {
                file_id,
                result: Ok(()),
            },
            DiskJob::Close { .. } | DiskJob::EvictCache { .. } => return,
        };
        e.handle(self.now, Input::Disk(done));
    }

    fn message(&mut self, e: &mut PoolEngine, from: u8, channel: Channel, msg: PoolMessage) {
        e.handle(
            self.now,
            Input::Message {
                peer: peer(from),
                channel,
                msg,
            },
        );
    }
}

/// Runs the inputs `data` spells, checking after every step; then the honest epilogue.
/// Returns the steps taken and whether the file was whole before the epilogue.
pub fn run(data: &[u8]) -> (usize, bool) {
    let mut ops = Ops(data);
    let config = PoolConfig {
        chunk_size: 16 * 1024,
        ..PoolConfig::default()
    };
    let chunks = 1 + ops.u32(24);
    let meta = FileMeta {
        name: "f".into(),
        size: u64::from(chunks) * u64::from(config.chunk_size) - u64::from(ops.u32(100)),
        chunk_size: config.chunk_size,
        root: [7; 32],
    };
    let now = Instant::now();
    let mut h = Harness {
        file_id: meta.file_id(),
        meta,
        chunks,
        config: config.clone(),
        verified: ChunkRanges::new(),
        disk: VecDeque::new(),
        sessions: Vec::new(),
        requests: VecDeque::new(),
        finished: false,
        now,
    };
    let mut e = PoolEngine::new(peer(0), config, now, 3);
    let mut steps = 0;
    while !ops.0.is_empty() && steps < 400 {
        steps += 1;
        let op = ops.byte() % 12;
        let from = 1 + ops.byte() % 5;
        match op {
            0 => e.handle(h.now, Input::PeerUp(peer(from))),
            1 => e.handle(h.now, Input::PeerDown(peer(from))),
            2 => {
                let mut meta = h.meta.clone();
                if ops.byte() % 4 == 0 {
                    meta.size += 1; // another file, or a lie about this one
                }
                let have = h.ranges(&mut ops, chunks + 2);
                let msg = PoolMessage::FileOffer {
                    origin: peer(ops.byte() % 7),
                    seq: u64::from(ops.byte()),
                    hops: ops.byte() % 4,
                    meta,
                    have,
                };
                h.message(&mut e, from, Channel::Control, msg);
            }
            3 => {
                let msg = PoolMessage::FileRequest {
                    request_id: u64::from(ops.byte()),
                    requester: peer(from),
                    file_id: h.file_id,
                    requested: ops.ranges(chunks + 2),
                    promised: if ops.byte() % 3 == 0 {
                        ops.ranges(chunks)
                    } else {
                        ChunkRanges::new()
                    },
                    from_origin: ops.byte() % 2 == 1,
                    hops_left: ops.byte() % 3,
                };
                h.message(&mut e, from, Channel::Control, msg);
            }
            4 => {
                let pick = usize::from(ops.byte());
                let request_id = match h.requests.len() {
                    0 => u64::from(ops.byte()),
                    n => h.requests[pick % n],
                };
                let data = if ops.byte() % 4 == 0 {
                    &b"bad"[..]
                } else {
                    GOOD
                };
                let msg = PoolMessage::Chunk {
                    file_id: h.file_id,
                    request_id,
                    index: ops.u32(chunks + 2),
                    proof: Vec::new(),
                    data: Bytes::from_static(data),
                };
                h.message(&mut e, from, Channel::Chunks, msg);
            }
            5 => {
                let request_id = h.requests.back().copied().unwrap_or_default();
                let msg = match ops.byte() % 4 {
                    0 => PoolMessage::ChunksMissing {
                        request_id,
                        file_id: h.file_id,
                        missing: ops.ranges(chunks + 2),
                    },
                    1 => PoolMessage::Cancel {
                        request_id,
                        file_id: h.file_id,
                    },
                    2 => PoolMessage::Unavailable {
                        request_id,
                        file_id: h.file_id,
                        chunks: ops.ranges(chunks + 2),
                    },
                    _ => PoolMessage::FileRetract {
                        origin: peer(ops.byte() % 7),
                        seq: u64::from(ops.byte()),
                        hops: ops.byte() % 3,
                        file_id: h.file_id,
                    },
                };
                h.message(&mut e, from, Channel::Control, msg);
            }
            6 => e.handle(h.now, Input::Get(h.file_id)),
            7 => {
                h.now += Duration::from_millis(u64::from(ops.byte()) * 20);
                e.handle_timeout(h.now);
            }
            8 | 9 => {
                for _ in 0..1 + ops.byte() % 4 {
                    h.disk_done(&mut e);
                }
            }
            10 => {
                let (p, session) = match h.sessions.pop() {
                    Some(s) => s,
                    None => (from, u64::from(ops.byte())),
                };
                let ok = ops.byte() % 5 != 0;
                e.handle(
                    h.now,
                    Input::Sent {
                        peer: peer(p),
                        session,
                        ok,
                    },
                );
            }
            _ => e.handle(
                h.now,
                Input::Undecodable {
                    peer: peer(from),
                    error: "fuzz".into(),
                },
            ),
        }
        h.drain(&mut e);
    }
    let whole_before = h.finished || e.is_whole(&h.file_id);
    honest_epilogue(&mut h, &mut e);
    assert!(
        e.is_whole(&h.file_id) || h.finished,
        "the epilogue returned without the file"
    );
    (steps, whole_before)
}

/// An honest neighbour that holds the whole file appears; the download must finish.
fn honest_epilogue(h: &mut Harness, e: &mut PoolEngine) {
    if h.finished || e.is_whole(&h.file_id) {
        return;
    }
    let honest = 9;
    e.handle(h.now, Input::PeerUp(peer(honest)));
    e.handle(h.now, Input::Get(h.file_id));
    let offer = PoolMessage::FileOffer {
        origin: peer(honest),
        seq: 1 << 40,
        hops: 0,
        meta: h.meta.clone(),
        have: ChunkRanges::full(h.chunks),
    };
    h.message(e, honest, Channel::Control, offer);
    // Ten simulated minutes at most: the honest source answers every request it gets.
    for _ in 0..6000 {
        let mut asked = Vec::new();
        while let Some(out) = e.poll_output() {
            match out {
                Output::Send {
                    peer: to,
                    msg:
                        PoolMessage::FileRequest {
                            request_id,
                            file_id,
                            requested,
                            promised,
                            ..
                        },
                    ..
                } if to == peer(honest) && file_id == h.file_id => {
                    let mut want = requested.clone();
                    for r in promised.ranges() {
                        want.insert(r.clone());
                    }
                    asked.extend(want.iter().map(|i| (request_id, i)));
                }
                Output::Disk(job) => h.disk.push_back(job),
                Output::Finished { file_id, result } if file_id == h.file_id => {
                    if result.is_ok() {
                        assert!(h.verified.contains_all(&ChunkRanges::full(h.chunks)));
                        return;
                    }
                    // A failed download is asked for again: the source is still there.
                    e.handle(h.now, Input::Get(h.file_id));
                }
                _ => {}
            }
        }
        for (request_id, index) in asked {
            let msg = PoolMessage::Chunk {
                file_id: h.file_id,
                request_id,
                index,
                proof: Vec::new(),
                data: Bytes::from_static(GOOD),
            };
            h.message(e, honest, Channel::Chunks, msg);
        }
        while !h.disk.is_empty() {
            h.disk_done(e);
        }
        h.now += TICK;
        e.handle_timeout(h.now);
        if e.is_whole(&h.file_id) {
            return;
        }
    }
    panic!(
        "no progress with an honest source: {:?} of {} chunks verified, {:?} held",
        h.verified,
        h.chunks,
        e.download_have(&h.file_id)
    );
}

impl Harness {
    fn ranges(&self, ops: &mut Ops<'_>, limit: u32) -> ChunkRanges {
        ops.ranges(limit)
    }
}

#[cfg(test)]
mod tests {
    /// Random input sequences on every `cargo test` (the fuzz target runs millions).
    #[test]
    fn random_input_sequences_keep_every_invariant_and_an_honest_source_completes_the_file() {
        let mut rng = fastrand::Rng::with_seed(5);
        let (mut steps, mut whole) = (0, 0);
        for _ in 0..300 {
            let len = rng.usize(1..800);
            let data: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
            let (s, w) = super::run(&data);
            steps += s;
            whole += usize::from(w);
        }
        // The sequences do something: thousands of steps, and some downloads finish from
        // the fuzzed neighbours alone.
        assert!(steps > 10_000, "{steps} steps");
        assert!(whole > 0, "no download finished before the epilogue");
    }
}
