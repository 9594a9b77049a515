//! The swarm `Shard` driven by arbitrary operation sequences (for the `shard_ops` fuzz target
//! and a test): announces, answers, scrapes, closes, reconnects, silences and clock advances,
//! with the shard's invariants checked after every step.

use std::time::{Duration, Instant};

use tidepool_protocol::tracker::{AnnounceEvent, Decoder, ServerMessage};
use tidepool_protocol::{InfoHash, OfferId, PeerId};

use crate::swarm::{
    Announce, AnswerPart, ConnId, FrameKind, Liveness, Output, Request, Shard, ShardConfig,
};

const CONNS: usize = 6;
const SWARMS: u8 = 3;
const PEERS: u8 = 8;
/// Peer ids one connection may hold in one swarm (the socket worker's bound, small here).
const IDS_PER_SWARM: usize = 2;
const MAX_OFFERS: usize = 3;
const DEFAULT_NUMWANT: usize = 2;

/// One connection as the socket worker would see it.
#[derive(Debug, Clone, Default)]
struct Conn {
    serial: u64,
    closed: bool,
    quiet: Duration,
    /// (swarm, peer) pairs this connection announced and did not stop, in order.
    held: Vec<(u8, u8)>,
}

struct Model {
    conns: Vec<Conn>,
}

impl Liveness for Model {
    fn quiet_for(&self, conn: ConnId, _now: Instant) -> Duration {
        match self.conns.get(conn.slot as usize) {
            Some(c) if c.serial == conn.serial && !c.closed => c.quiet,
            _ => Duration::MAX,
        }
    }
}

impl Model {
    fn id(&self, c: usize) -> ConnId {
        ConnId {
            instance: 1,
            worker: 0,
            slot: c as u32,
            serial: self.conns[c].serial,
        }
    }

    fn open(&self, conn: ConnId) -> bool {
        self.quiet_for(conn, Instant::now()) != Duration::MAX
    }
}

fn hash(s: u8) -> InfoHash {
    InfoHash([s.wrapping_add(1); 20])
}

fn peer(p: u8) -> PeerId {
    PeerId([p.wrapping_add(0x41); 20])
}

/// Reads operation parameters; zeros once the input runs out.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn next(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
}

/// Runs the operations `data` spells and checks the invariants after each.
pub(crate) fn run(data: &[u8]) {
    let config = ShardConfig {
        announce_interval: 120,
        peer_timeout: Duration::from_secs(300),
        max_offers: MAX_OFFERS,
        default_numwant: DEFAULT_NUMWANT,
        takeover_grace: Duration::from_secs(30),
    };
    let mut shard = Shard::new(config, 7);
    let mut model = Model {
        conns: vec![Conn::default(); CONNS],
    };
    let mut now = Instant::now();
    let mut out = Vec::new();
    let mut decoder = Decoder::default();
    let mut b = Bytes(data);
    let mut steps = 0;
    while !b.0.is_empty() && steps < 512 {
        steps += 1;
        let op = b.next() % 7;
        let c = usize::from(b.next()) % CONNS;
        let id = model.id(c);
        out.clear();
        match op {
            0 | 1 => {
                let s = b.next() % SWARMS;
                let p = b.next() % PEERS;
                let answer = op == 1;
                let event = match b.next() % 6 {
                    0 => AnnounceEvent::Started,
                    1 => AnnounceEvent::Stopped,
                    2 => AnnounceEvent::Completed,
                    3 => AnnounceEvent::Update,
                    4 => AnnounceEvent::Paused,
                    _ => AnnounceEvent::None,
                };
                let flags = b.next();
                let offers = usize::from(flags >> 1) % 5;
                let numwant = match b.next() % 6 {
                    0 => None,
                    n => Some(u32::from(n - 1)),
                };
                let to = b.next() % PEERS;
                // What the socket worker records, and which id a new one replaces.
                let mut replaces = None;
                let conn = &mut model.conns[c];
                if !answer && !conn.closed {
                    let here: Vec<usize> = (0..conn.held.len())
                        .filter(|&i| conn.held[i].0 == s)
                        .collect();
                    let held = here.iter().any(|&i| conn.held[i].1 == p);
                    if event == AnnounceEvent::Stopped {
                        conn.held.retain(|h| *h != (s, p));
                    } else if !held {
                        if here.len() >= IDS_PER_SWARM {
                            let (_, old) = conn.held.remove(here[0]);
                            replaces = Some(peer(old));
                        }
                        conn.held.push((s, p));
                    }
                }
                let request = Request::Announce(Announce {
                    info_hash: hash(s),
                    peer_id: peer(p),
                    event,
                    numwant,
                    seeder: flags & 1 == 1,
                    offers: (0..offers)
                        .map(|i| {
                            let offer_id = OfferId::from_bytes20(&[i as u8; 20]);
                            (offer_id, r#"{"type":"offer","sdp":"x"}"#.into())
                        })
                        .collect(),
                    answer: answer.then(|| AnswerPart {
                        to_peer_id: peer(to),
                        offer_id: OfferId::from_bytes20(&[0; 20]),
                        answer: r#"{"type":"answer","sdp":"y"}"#.into(),
                    }),
                    replaces,
                });
                shard.handle(now, id, request, &model, &mut out);
                // Offers: at most what was asked and allowed, each to a connection that holds
                // another peer of the swarm, never the offering peer itself.
                let mut offered = 0;
                for (to_conn, o) in &out {
                    let Output::Frame(kind, frame) = o else {
                        continue;
                    };
                    let mut bytes = frame.clone();
                    let decoded = decoder.decode_server(&mut bytes, |m| match m {
                        Ok(ServerMessage::Offer(o)) => Some((true, o.peer_id, o.info_hash)),
                        Ok(ServerMessage::Answer(a)) => Some((false, a.peer_id, a.info_hash)),
                        Ok(_) => None,
                        Err(e) => panic!("the shard encoded a frame that does not decode: {e}"),
                    });
                    match (kind, decoded) {
                        (FrameKind::Offer, Some((true, from, h))) => {
                            offered += 1;
                            assert_eq!((from, h), (peer(p), hash(s)), "offer names its sender");
                            assert!(
                                (0..PEERS)
                                    .any(|q| q != p && shard.owner(&h, &peer(q)) == Some(*to_conn)),
                                "offer to {to_conn:?}, which holds no other peer of the swarm"
                            );
                        }
                        (FrameKind::Answer, Some((false, from, h))) => {
                            assert!(answer && from == peer(p) && h == hash(s));
                            assert_eq!(
                                shard.owner(&h, &peer(to)),
                                Some(*to_conn),
                                "answer to the offerer's owner"
                            );
                        }
                        (FrameKind::Offer | FrameKind::Answer, other) => {
                            panic!("{kind:?} frame decoded as {other:?}")
                        }
                        _ => {}
                    }
                }
                let allowed = numwant
                    .map_or(DEFAULT_NUMWANT, |n| n as usize)
                    .min(offers)
                    .min(MAX_OFFERS);
                assert!(
                    offered <= allowed,
                    "{offered} offers forwarded, {allowed} allowed"
                );
            }
            2 => {
                let mask = b.next();
                let info_hashes: Vec<InfoHash> = (0..SWARMS)
                    .filter(|s| mask >> s & 1 == 1)
                    .map(hash)
                    .collect();
                let n = info_hashes.len();
                shard.handle(
                    now,
                    id,
                    Request::Scrape {
                        request_id: 9,
                        info_hashes,
                    },
                    &model,
                    &mut out,
                );
                match out.as_slice() {
                    [
                        (
                            to,
                            Output::ScrapePart {
                                request_id: 9,
                                files,
                            },
                        ),
                    ] => {
                        assert_eq!((*to, files.len()), (id, n), "one part, every swarm named");
                    }
                    other => panic!("scrape answered with {other:?}"),
                }
            }
            3 => {
                // The connection closes; its notice names what it held.
                let conn = &mut model.conns[c];
                if !conn.closed {
                    conn.closed = true;
                    let peers = conn
                        .held
                        .drain(..)
                        .map(|(s, p)| (hash(s), peer(p)))
                        .collect();
                    shard.handle(now, id, Request::Closed { peers }, &model, &mut out);
                    assert!(out.is_empty(), "a close notice is answered by nothing");
                }
            }
            4 => {
                now += Duration::from_secs(u64::from(b.next()) * 4);
                shard.clean(now);
            }
            5 => {
                // The slot is reused by a new connection (after its close notice went out).
                let conn = &mut model.conns[c];
                if conn.closed {
                    *conn = Conn {
                        serial: conn.serial + 1,
                        ..Conn::default()
                    };
                }
            }
            _ => model.conns[c].quiet = Duration::from_secs(u64::from(b.next()) / 4),
        }
        // Invariants after every step.
        if let Err(e) = shard.check() {
            panic!("step {steps}: {e}");
        }
        let (swarms, seeders, leechers) = shard.totals();
        assert_eq!(swarms as usize, shard.swarm_count());
        assert_eq!((seeders + leechers) as usize, shard.peer_count());
        assert!(shard.peer_count() <= usize::from(SWARMS) * usize::from(PEERS));
        // Every peer is owned by one open connection: a closed connection whose notice was
        // handled owns nothing, and nothing it sent after closing joined.
        for s in 0..SWARMS {
            for p in 0..PEERS {
                if let Some(owner) = shard.owner(&hash(s), &peer(p)) {
                    assert!(
                        model.open(owner),
                        "step {steps}: {owner:?} is closed but owns peer {p} in swarm {s}"
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// A few thousand random sequences on every `cargo test` (the fuzz target runs millions).
    #[test]
    fn random_operation_sequences_keep_every_invariant() {
        let mut rng = fastrand::Rng::with_seed(1);
        for _ in 0..2000 {
            let len = rng.usize(1..600);
            let data: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
            super::run(&data);
        }
    }
}
