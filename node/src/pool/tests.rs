//! Unit tests of the pool engine, driven input by input: what a hostile or unlucky
//! neighbour can make it do, and that every table it can grow stays within its bound.

use std::time::{Duration, Instant};

use tidepool_protocol::PeerId;
use tidepool_protocol::pool::{ChunkRanges, FileId, FileMeta, PoolMessage};

use super::PoolConfig;
use super::engine::{ChunkData, DiskDone, DiskJob, Input, Output, PoolEngine, StoreFailure};
use crate::Channel;

const ME: PeerId = PeerId([0; 20]);
const A: PeerId = PeerId([1; 20]);
const B: PeerId = PeerId([2; 20]);
const C: PeerId = PeerId([3; 20]);

fn meta(chunks: u32, tag: u8) -> FileMeta {
    FileMeta {
        name: format!("f{tag}"),
        size: u64::from(chunks) * 1024,
        chunk_size: 1024,
        root: [tag; 32],
    }
}

fn engine(config: PoolConfig) -> (PoolEngine, Instant) {
    let t = Instant::now();
    (PoolEngine::new(ME, config, t, 7), t)
}

fn drain(e: &mut PoolEngine) -> Vec<Output> {
    std::iter::from_fn(|| e.poll_output()).collect()
}

fn msg(e: &mut PoolEngine, t: Instant, peer: PeerId, m: PoolMessage) -> Vec<Output> {
    e.handle(
        t,
        Input::Message {
            peer,
            channel: Channel::Control,
            msg: m,
        },
    );
    drain(e)
}

fn request(file_id: FileId, id: u64, requested: ChunkRanges) -> PoolMessage {
    PoolMessage::FileRequest {
        request_id: id,
        requester: A,
        file_id,
        requested,
        promised: ChunkRanges::new(),
        from_origin: false,
        hops_left: 3,
    }
}

fn reads(out: &[Output]) -> Vec<u32> {
    out.iter()
        .filter_map(|o| match o {
            Output::Disk(DiskJob::Read(r)) => Some(r.index),
            _ => None,
        })
        .collect()
}

fn unavailable_to(out: &[Output], to: PeerId) -> u64 {
    out.iter()
        .filter_map(|o| match o {
            Output::Send {
                peer,
                msg: PoolMessage::Unavailable { chunks, .. },
                ..
            } if *peer == to => Some(chunks.len()),
            _ => None,
        })
        .sum()
}

fn offer(origin: PeerId, seq: u64, hops: u8, m: &FileMeta) -> PoolMessage {
    let have = ChunkRanges::full(m.chunk_count().expect("shape"));
    PoolMessage::FileOffer {
        origin,
        seq,
        hops,
        meta: m.clone(),
        have,
    }
}

#[test]
fn a_request_for_every_possible_chunk_index_is_clipped_to_the_file_and_read_a_window_at_a_time() {
    let (mut e, t) = engine(PoolConfig::default());
    let m = meta(10, 1);
    e.handle(
        t,
        Input::Share {
            meta: m.clone(),
            super_seed: false,
        },
    );
    e.handle(t, Input::PeerUp(A));
    drain(&mut e);
    let out = msg(
        &mut e,
        t,
        A,
        request(m.file_id(), 9, ChunkRanges::from_range(0..u32::MAX)),
    );
    let first = reads(&out);
    assert_eq!(first.len(), PoolConfig::default().send_window.min(10));
    assert!(first.iter().all(|i| *i < 10));
    assert!(e.table_sizes().2 <= 10, "queued only the file's chunks");
    // Each read that comes back is sent, and its credit returns when sent: the rest follow.
    let mut all = first;
    let mut pending: Vec<DiskDone> = Vec::new();
    let mut session = 0;
    for o in out {
        if let Output::Disk(DiskJob::Read(job)) = o {
            session = job.session;
            pending.push(DiskDone::Read {
                job,
                chunk: Some(ChunkData {
                    data: bytes::Bytes::from_static(b"x"),
                    proof: vec![],
                }),
            });
        }
    }
    for d in pending {
        e.handle(t, Input::Disk(d));
        e.handle(
            t,
            Input::Sent {
                peer: A,
                session,
                ok: true,
            },
        );
        // A send of another session of A returns no credit.
        e.handle(
            t,
            Input::Sent {
                peer: A,
                session: session + 1,
                ok: true,
            },
        );
        all.extend(reads(&drain(&mut e)));
    }
    all.sort_unstable();
    assert_eq!(all, (0..10).collect::<Vec<u32>>());
}

#[test]
fn a_request_past_the_queue_bound_is_answered_unavailable_and_counted() {
    let (mut e, t) = engine(PoolConfig {
        request_queue: 16,
        send_window: 1,
        ..PoolConfig::default()
    });
    let m = meta(100, 2);
    e.handle(
        t,
        Input::Share {
            meta: m.clone(),
            super_seed: false,
        },
    );
    e.handle(t, Input::PeerUp(A));
    drain(&mut e);
    let out = msg(
        &mut e,
        t,
        A,
        request(m.file_id(), 1, ChunkRanges::full(100)),
    );
    assert_eq!(
        unavailable_to(&out, A),
        100,
        "refused whole, the requester asks elsewhere"
    );
    assert_eq!(e.stats().requests_refused, 100);
    let out = msg(&mut e, t, A, request(m.file_id(), 2, ChunkRanges::full(10)));
    assert_eq!(unavailable_to(&out, A), 0);
    assert_eq!(reads(&out).len(), 1);
    // Cancelled: its queued chunks go, and nothing more is read for it.
    drain(&mut e);
    msg(
        &mut e,
        t,
        A,
        PoolMessage::Cancel {
            request_id: 2,
            file_id: m.file_id(),
        },
    );
    assert_eq!(e.table_sizes().2, 0);
}

#[test]
fn a_neighbour_offering_a_hundred_thousand_files_is_rate_limited_and_the_catalog_stays_bounded() {
    let config = PoolConfig::default();
    let (mut e, t) = engine(config.clone());
    e.handle(t, Input::PeerUp(A));
    e.handle(t, Input::PeerUp(B));
    drain(&mut e);
    let mut forwarded = 0;
    for i in 0..100_000u32 {
        let mut m = meta(4, 0);
        m.name = format!("spam-{i}");
        // Spread over 10 s: the rate refills, so more than the burst gets through.
        let at = t + Duration::from_micros(u64::from(i) * 100);
        e.handle(
            at,
            Input::Message {
                peer: A,
                channel: Channel::Control,
                msg: offer(A, u64::from(i), 2, &m),
            },
        );
        forwarded += drain(&mut e)
            .iter()
            .filter(|o| matches!(o, Output::Send { peer, .. } if *peer == B))
            .count();
    }
    let s = e.stats();
    let allowed = u64::from(config.offer_burst) + 10 * u64::from(config.offer_rate) + 1;
    assert!(100_000 - s.offers_ignored <= allowed, "{s:?}");
    assert!(forwarded as u64 <= allowed);
    assert!(e.table_sizes().0 <= config.max_catalog);
    // An honest neighbour's offer still counts.
    let good = meta(4, 9);
    e.handle(t + Duration::from_secs(11), Input::Get(good.file_id()));
    let out = msg(
        &mut e,
        t + Duration::from_secs(11),
        B,
        offer(B, 1, 2, &good),
    );
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::Disk(DiskJob::Open { file_id, .. }) if *file_id == good.file_id())),
        "the wanted file starts"
    );
}

#[test]
fn chunks_nobody_asked_for_are_ignored_then_their_sender_is_dropped() {
    let (mut e, t) = engine(PoolConfig::default());
    e.handle(t, Input::PeerUp(A));
    drain(&mut e);
    let chunk = |i: u32| PoolMessage::Chunk {
        file_id: FileId([5; 32]),
        request_id: 1,
        index: i,
        proof: vec![],
        data: bytes::Bytes::from_static(b"x"),
    };
    let mut dropped = false;
    for i in 0..=super::neighbour::MAX_UNSOLICITED as u32 {
        e.handle(
            t,
            Input::Message {
                peer: A,
                channel: Channel::Chunks,
                msg: chunk(i),
            },
        );
        let out = drain(&mut e);
        assert!(
            out.iter().all(|o| !matches!(o, Output::Disk(_))),
            "nothing stored"
        );
        dropped |= out
            .iter()
            .any(|o| matches!(o, Output::Disconnect { peer, .. } if *peer == A));
    }
    assert!(dropped);
    assert_eq!(e.neighbour_count(), 0);
    assert!(e.stats().chunks_unsolicited > 1000);
    // A chunk on the control channel is a protocol error at once.
    e.handle(t, Input::PeerUp(B));
    drain(&mut e);
    e.handle(
        t,
        Input::Message {
            peer: B,
            channel: Channel::Control,
            msg: chunk(0),
        },
    );
    assert!(
        drain(&mut e)
            .iter()
            .any(|o| matches!(o, Output::Disconnect { peer, .. } if *peer == B))
    );
}

#[test]
fn a_relayed_request_goes_another_way_when_its_upstream_leaves_and_a_bad_chunk_drops_its_sender() {
    let (mut e, t) = engine(PoolConfig::default());
    let m = meta(8, 3);
    for p in [A, B, C] {
        e.handle(t, Input::PeerUp(p));
    }
    drain(&mut e);
    msg(&mut e, t, B, offer(B, 1, 1, &m));
    msg(&mut e, t, C, offer(C, 1, 1, &m));
    let out = msg(&mut e, t, A, request(m.file_id(), 42, ChunkRanges::full(8)));
    let up = out
        .iter()
        .find_map(|o| match o {
            Output::Send {
                peer,
                msg: PoolMessage::FileRequest { request_id, .. },
                ..
            } => Some((*peer, *request_id)),
            _ => None,
        })
        .expect("forwarded toward a holder");
    assert_eq!(e.table_sizes().1, 1);
    e.handle(t, Input::PeerDown(up.0));
    let out = drain(&mut e);
    let other = if up.0 == B { C } else { B };
    let (next, next_id) = out
        .iter()
        .find_map(|o| match o {
            Output::Send {
                peer,
                msg: PoolMessage::FileRequest { request_id, .. },
                ..
            } => Some((*peer, *request_id)),
            _ => None,
        })
        .expect("rerouted");
    assert_eq!(next, other);
    assert_eq!(e.table_sizes().1, 1, "the old path is forgotten");
    // The new upstream sends a chunk that fails verification: it is dropped, and with no
    // holder left the requester hears Unavailable at once.
    e.handle(
        t,
        Input::Message {
            peer: next,
            channel: Channel::Chunks,
            msg: PoolMessage::Chunk {
                file_id: m.file_id(),
                request_id: next_id,
                index: 0,
                proof: vec![],
                data: bytes::Bytes::from_static(b"bad"),
            },
        },
    );
    let job = drain(&mut e)
        .into_iter()
        .find_map(|o| match o {
            Output::Disk(DiskJob::Store(j)) => Some(j),
            _ => None,
        })
        .expect("a relayed chunk is verified before it is passed on");
    e.handle(
        t,
        Input::Disk(DiskDone::Stored {
            job,
            result: Err(StoreFailure::Bad("mismatch".into())),
        }),
    );
    let out = drain(&mut e);
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::Disconnect { peer, .. } if *peer == next))
    );
    assert_eq!(unavailable_to(&out, A), 8);
    assert_eq!(e.stats().bad_chunks, 1);
    assert_eq!(e.table_sizes().1, 0);
}

#[test]
fn forwarded_offers_are_whole_files_only_with_hops_capped_and_tiny_chunks_are_refused() {
    let (mut e, t) = engine(PoolConfig::default());
    e.handle(t, Input::PeerUp(A));
    e.handle(t, Input::PeerUp(B));
    drain(&mut e);
    let forwarded = |out: &[Output]| -> Vec<u8> {
        out.iter()
            .filter_map(|o| match o {
                Output::Send {
                    peer,
                    msg: PoolMessage::FileOffer { hops, .. },
                    ..
                } if *peer == B => Some(*hops),
                _ => None,
            })
            .collect()
    };
    // A partial copy, said to be C's, with hops to spare: not passed on.
    let m = meta(8, 4);
    let partial = PoolMessage::FileOffer {
        origin: C,
        seq: 1,
        hops: 3,
        meta: m.clone(),
        have: ChunkRanges::from_range(0..4),
    };
    assert!(forwarded(&msg(&mut e, t, A, partial)).is_empty());
    // A whole copy claiming 255 hops goes on with this node's budget, less one.
    let out = msg(&mut e, t, A, offer(C, 2, 255, &m));
    assert_eq!(forwarded(&out), vec![PoolConfig::default().offer_hops - 1]);
    // A file of one-byte chunks (billions of them) is not taken at all.
    let before = e.stats().offers_ignored;
    let tiny = PoolMessage::FileOffer {
        origin: C,
        seq: 3,
        hops: 2,
        meta: FileMeta {
            name: "tiny".into(),
            size: 1 << 31,
            chunk_size: 1,
            root: [1; 32],
        },
        have: ChunkRanges::from_range(0..1 << 31),
    };
    let out = msg(&mut e, t, A, tiny);
    assert!(forwarded(&out).is_empty());
    assert_eq!(e.stats().offers_ignored, before + 1);
}

#[test]
fn a_junk_duplicate_chunk_does_not_keep_a_stalled_request_alive() {
    let mut config = PoolConfig::default();
    config.fetch.missing_after = Duration::from_secs(2);
    let (mut e, t) = engine(config);
    let m = meta(8, 5);
    e.handle(t, Input::Get(m.file_id()));
    e.handle(t, Input::PeerUp(A));
    e.handle(t, Input::PeerUp(B));
    drain(&mut e);
    msg(&mut e, t, A, offer(A, 1, 0, &m));
    msg(&mut e, t, B, offer(B, 1, 0, &m));
    e.handle(
        t,
        Input::Disk(DiskDone::Opened {
            file_id: m.file_id(),
            result: Ok((ChunkRanges::from_range(0..1), ChunkRanges::from_range(0..1))),
        }),
    );
    let requests: Vec<(PeerId, u64)> = drain(&mut e)
        .iter()
        .filter_map(|o| match o {
            Output::Send {
                peer,
                msg: PoolMessage::FileRequest { request_id, .. },
                ..
            } => Some((*peer, *request_id)),
            _ => None,
        })
        .collect();
    assert!(!requests.is_empty());
    // Every second the silent source sends junk tagged with its request, for a chunk
    // already held: it is not stored, and the request still stalls and goes elsewhere.
    let (liar, id) = requests[0];
    let mut reasked = false;
    for s in 1..=4u64 {
        let at = t + Duration::from_secs(s);
        e.handle(
            at,
            Input::Message {
                peer: liar,
                channel: Channel::Chunks,
                msg: PoolMessage::Chunk {
                    file_id: m.file_id(),
                    request_id: id,
                    index: 0,
                    proof: vec![],
                    data: bytes::Bytes::from_static(b"junk"),
                },
            },
        );
        e.handle_timeout(at);
        reasked |= drain(&mut e).iter().any(|o| {
            matches!(o, Output::Send { peer, msg: PoolMessage::Cancel { request_id, .. }, .. }
                if *peer == liar && *request_id == id)
        });
    }
    assert!(
        reasked,
        "the stalled request was cancelled and asked elsewhere"
    );
}
