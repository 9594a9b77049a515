//! One client connection's state: its link and WebSocket receiver, its rate bucket,
//! the swarms it holds a peer in, and its pending scrapes.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use ahash::AHashMap;
use tidepool_protocol::tracker::{AnnounceEvent, ScrapeResponse, ScrapeStats};
use tidepool_protocol::{InfoHash, PeerId};

use super::link::{BufPool, Link};
use super::ws::{self, Assembler};
use crate::auth::Grant;
use crate::swarm::ConnId;

pub(super) struct Connection {
    pub(super) id: ConnId,
    /// The socket, TLS, and the bytes in and out.
    pub(super) link: Link,
    /// False until the upgrade request has been answered.
    pub(super) open: bool,
    /// Bytes of the upgrade request already searched for its end.
    pub(super) head_scanned: usize,
    /// The message being reassembled from fragments, if any.
    pub(super) ws: Assembler,
    /// The client: the socket's peer, or the address a trusted proxy forwarded.
    pub(super) addr: IpAddr,
    /// The address counted against `max_connections_per_ip` (None until counted).
    pub(super) counted: Option<IpAddr>,
    /// The socket's peer is a trusted proxy: its upgrade request names the client.
    pub(super) via_proxy: bool,
    pub(super) opened: Instant,
    /// The last frame of any kind (pongs included) from the client.
    pub(super) last_frame: Instant,
    pub(super) ping_sent: bool,
    pub(super) bucket: TokenBucket,
    pub(super) swarms: Memberships,
    /// Scrapes split across swarm workers, waiting for their parts (at most
    /// `MAX_PENDING_SCRAPES`, each failed after the reply timeout).
    pub(super) scrapes: Vec<PendingScrape>,
    pub(super) last_full_scrape: Option<Instant>,
    /// Frames were queued since the last flush; the slot is in the loop's dirty list.
    pub(super) dirty: bool,
    /// The loop turn in which this connection was last advanced.
    pub(super) advanced_turn: u64,
    /// What its token allows, when tokens are required (boxed: one pointer when absent).
    pub(super) grant: Option<Box<Grant>>,
}

impl Connection {
    /// Queues a close frame and tries to send it (the caller then drops the connection).
    pub(super) fn close_with(&mut self, code: u16, reason: &'static str, pool: &mut BufPool) {
        if self.open {
            ws::write_close(self.link.output(pool), code, reason);
            let _ = self.link.flush(pool);
        }
    }
}

/// Text frames a connection may send: `rate` per second on average, `burst` at once.
#[derive(Debug, Clone, Copy)]
pub(super) struct TokenBucket {
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    pub(super) fn full(burst: u32, now: Instant) -> Self {
        Self {
            tokens: f64::from(burst),
            at: now,
        }
    }

    /// Takes a token; false when none is left (`rate` 0 = no limit).
    pub(super) fn take(&mut self, rate: u32, burst: u32, now: Instant) -> bool {
        if rate == 0 {
            return true;
        }
        let refill = now.duration_since(self.at).as_secs_f64() * f64::from(rate);
        self.tokens = (self.tokens + refill).min(f64::from(burst));
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The swarms a connection holds peers in, as the socket worker sees them: at most
/// `max_ids` peer ids per swarm and `max_swarms` in all (a new id past that replaces the
/// connection's least recently announced one in that swarm), dropped on `stopped` and after
/// the peer timeout plus a cleaning interval, so never before the swarm worker drops the peer
/// (it stamps its peers when it handles the announce, after this record was stamped, and
/// drops them at its next cleaning after the timeout). A peer the swarm worker refused (its
/// id owned by another live connection) stays recorded until `stopped` or the timeout: that
/// only spends the refused client's own allowance.
#[derive(Debug)]
pub(super) struct Memberships {
    /// Sorted by (info hash, peer id), so a swarm's ids sit together and every lookup is a
    /// binary search; one small allocation for a client in a few swarms (a hash table per
    /// connection cost ~0.25 KiB more per idle connection).
    held: Vec<Held>,
    /// When expired records were last pruned (at most once a second, when at the limit).
    pruned_at: Instant,
}

#[derive(Debug, Clone, Copy)]
struct Held {
    info_hash: InfoHash,
    peer_id: PeerId,
    last_seen: Instant,
}

impl Held {
    fn key(&self) -> ([u8; 20], [u8; 20]) {
        (self.info_hash.0, self.peer_id.0)
    }
}

/// What an announce changed in [`Memberships`], so a request the swarm worker never got
/// (its inbox was full) can be undone.
#[derive(Debug, Clone, Copy)]
pub(super) enum Change {
    /// Nothing recorded changed (or only a timestamp).
    None,
    /// A new swarm was joined.
    Joined,
    /// Another peer id was added in a swarm already joined.
    Added,
    /// The peer id replaced this one (last seen then) in the swarm.
    Replaced(PeerId, Instant),
    /// The peer left with `stopped` (when it was last seen before).
    Left(Instant),
}

/// Limits a connection's announces meet.
#[derive(Debug, Clone, Copy)]
pub(super) struct MembershipLimits {
    /// Most peer ids held at once across swarms (one per swarm, usually).
    pub(super) max_swarms: usize,
    /// Most peer ids in one swarm.
    pub(super) max_ids: usize,
    /// Records silent this long are dropped: the swarm workers' peer timeout plus their
    /// cleaning interval, so a record never goes before its peer does (a close in between
    /// would otherwise not name a peer still in the swarm).
    pub(super) timeout: Duration,
}

/// An announce the connection may not make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct TooManySwarms;

impl Memberships {
    pub(super) fn new(now: Instant) -> Self {
        Self {
            held: Vec::new(),
            pruned_at: now,
        }
    }

    /// Peer ids held now, across swarms (records past the timeout may linger until the next
    /// prune).
    pub(super) fn len(&self) -> usize {
        self.held.len()
    }

    /// Where `info_hash`'s records are.
    fn swarm(&self, info_hash: &InfoHash) -> std::ops::Range<usize> {
        let start = self.held.partition_point(|h| h.info_hash.0 < info_hash.0);
        let len = self.held[start..].partition_point(|h| h.info_hash == *info_hash);
        start..start + len
    }

    fn insert(&mut self, held: Held) {
        if self.held.capacity() == 0 {
            // Most clients are in one swarm or a few: start with exactly one.
            self.held.reserve_exact(1);
        }
        let pos = self.held.partition_point(|h| h.key() < held.key());
        self.held.insert(pos, held);
    }

    fn remove(&mut self, info_hash: InfoHash, peer_id: PeerId) -> Option<Held> {
        let key = (info_hash.0, peer_id.0);
        let pos = self.held.binary_search_by(|h| h.key().cmp(&key)).ok()?;
        Some(self.held.remove(pos))
    }

    /// Records an announce (`answer` = it carries an answer, which joins nothing).
    pub(super) fn announce(
        &mut self,
        info_hash: InfoHash,
        peer_id: PeerId,
        event: AnnounceEvent,
        answer: bool,
        now: Instant,
        limits: MembershipLimits,
    ) -> Result<Change, TooManySwarms> {
        let swarm = self.swarm(&info_hash);
        let joined = !swarm.is_empty();
        if let Some(pos) = self.held[swarm.clone()]
            .iter()
            .position(|h| h.peer_id == peer_id)
            .map(|i| swarm.start + i)
        {
            if event == AnnounceEvent::Stopped && !answer {
                return Ok(Change::Left(self.held.remove(pos).last_seen));
            }
            self.held[pos].last_seen = now;
            return Ok(Change::None);
        }
        if answer || event == AnnounceEvent::Stopped {
            return Ok(Change::None);
        }
        let new = Held {
            info_hash,
            peer_id,
            last_seen: now,
        };
        if joined {
            // A further id in a swarm already joined: added while both bounds allow, else it
            // replaces this connection's least recently announced id there.
            if swarm.len() < limits.max_ids && self.held.len() >= limits.max_swarms {
                self.prune(now, limits.timeout);
            }
            let swarm = self.swarm(&info_hash);
            if swarm.is_empty() {
                // Every id this connection had there expired.
                self.insert(new);
                return Ok(Change::Joined);
            }
            if swarm.len() < limits.max_ids && self.held.len() < limits.max_swarms {
                self.insert(new);
                return Ok(Change::Added);
            }
            let Some(oldest) = self.held[swarm.clone()]
                .iter()
                .min_by_key(|h| h.last_seen)
                .copied()
            else {
                return Ok(Change::None);
            };
            self.remove(info_hash, oldest.peer_id);
            self.insert(new);
            return Ok(Change::Replaced(oldest.peer_id, oldest.last_seen));
        }
        if self.held.len() >= limits.max_swarms {
            self.prune(now, limits.timeout);
            if self.held.len() >= limits.max_swarms {
                return Err(TooManySwarms);
            }
        }
        self.insert(new);
        Ok(Change::Joined)
    }

    /// Reverts what [`Memberships::announce`] recorded for `peer_id`.
    pub(super) fn undo(&mut self, info_hash: InfoHash, peer_id: PeerId, change: Change) {
        match change {
            Change::None => {}
            Change::Joined | Change::Added => {
                self.remove(info_hash, peer_id);
            }
            Change::Replaced(old, last_seen) => {
                self.remove(info_hash, peer_id);
                self.insert(Held {
                    info_hash,
                    peer_id: old,
                    last_seen,
                });
            }
            Change::Left(last_seen) => self.insert(Held {
                info_hash,
                peer_id,
                last_seen,
            }),
        }
    }

    /// Drops records silent past `timeout` when an announce finds the connection at its
    /// limit, at most once a second (a client at its limit cannot make every announce a
    /// scan of a thousand records).
    fn prune(&mut self, now: Instant, timeout: Duration) {
        if now.saturating_duration_since(self.pruned_at) < Duration::from_secs(1) {
            return;
        }
        self.pruned_at = now;
        self.expire(now, timeout);
    }

    /// Drops records silent past `timeout` (their peers have timed out in the swarms), and
    /// gives back memory a connection no longer needs (one that once held a thousand).
    pub(super) fn expire(&mut self, now: Instant, timeout: Duration) {
        self.held
            .retain(|h| now.saturating_duration_since(h.last_seen) <= timeout);
        if self.held.len() < self.held.capacity() / 4 {
            self.held.shrink_to(self.held.len() * 2);
        }
    }

    /// Every (swarm, peer id) held, for the close notice.
    pub(super) fn into_pairs(self) -> impl Iterator<Item = (InfoHash, PeerId)> {
        self.held.into_iter().map(|h| (h.info_hash, h.peer_id))
    }
}

/// Most scrapes one connection may have waiting for swarm workers at once: enough for a
/// client that pipelines its scrapes; at most ~32 × 64 hashes × 68 bytes ≈ 140 KiB held for
/// one connection (the default `max_scrape_hashes`).
pub(super) const MAX_PENDING_SCRAPES: usize = 32;

/// A scrape split across swarm workers, waiting for every part.
pub(super) struct PendingScrape {
    pub(super) request_id: u64,
    /// Hashes not answered yet. Counted in hashes rather than parts: a part from another
    /// instance may come split across its swarm workers, however many it has.
    pub(super) hashes_left: usize,
    pub(super) files: Vec<(InfoHash, ScrapeStats)>,
    /// Requested order, so the reply lists swarms as asked.
    pub(super) requested: Vec<InfoHash>,
    /// Answered with a failure if the parts are not all in by then.
    pub(super) deadline: Instant,
}

/// What a scrape part completed.
pub(super) enum Merged {
    /// Other parts are still out.
    Waiting,
    /// The last part: the encoded reply.
    Done(String),
    /// No scrape of this connection waits for it any more.
    Unknown,
}

impl Connection {
    /// Adds a swarm worker's part to a pending scrape.
    pub(super) fn merge_scrape(
        &mut self,
        request_id: u64,
        files: Vec<(InfoHash, ScrapeStats)>,
    ) -> Merged {
        let Some(pos) = self.scrapes.iter().position(|p| p.request_id == request_id) else {
            return Merged::Unknown;
        };
        let pending = &mut self.scrapes[pos];
        pending.hashes_left = pending.hashes_left.saturating_sub(files.len());
        pending.files.extend(files);
        if pending.hashes_left > 0 {
            return Merged::Waiting;
        }
        let pending = self.scrapes.swap_remove(pos);
        // Answer in the order asked, duplicates removed, as the reference server does.
        let by_hash: AHashMap<InfoHash, ScrapeStats> = pending.files.into_iter().collect();
        let mut files: Vec<(InfoHash, ScrapeStats)> = pending
            .requested
            .iter()
            .map(|h| (*h, by_hash.get(h).copied().unwrap_or_default()))
            .collect();
        files.dedup_by_key(|(h, _)| *h);
        let mut out = Vec::new();
        ScrapeResponse {
            files,
            min_request_interval: None,
        }
        .encode(&mut out);
        Merged::Done(String::from_utf8(out).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: MembershipLimits = MembershipLimits {
        max_swarms: 3,
        max_ids: 2,
        timeout: Duration::from_secs(300),
    };

    fn say(
        m: &mut Memberships,
        h: u8,
        p: u8,
        event: AnnounceEvent,
        now: Instant,
    ) -> Result<Change, TooManySwarms> {
        m.announce(
            InfoHash([h; 20]),
            PeerId([p; 20]),
            event,
            false,
            now,
            LIMITS,
        )
    }

    fn pairs(m: Memberships) -> Vec<(u8, u8)> {
        let mut v: Vec<_> = m.into_pairs().map(|(h, p)| (h.0[0], p.0[0])).collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn the_bound_counts_swarms_held_now_not_ever() {
        let t0 = Instant::now();
        let mut m = Memberships::new(t0);
        for round in 0..80u8 {
            // Join three, leave three: a long life of adding and removing torrents.
            for h in 0..3 {
                let joined = say(&mut m, round * 3 + h, 1, AnnounceEvent::Started, t0);
                assert!(matches!(joined, Ok(Change::Joined)));
            }
            assert_eq!(
                say(&mut m, 255, 1, AnnounceEvent::Started, t0).err(),
                Some(TooManySwarms)
            );
            for h in 0..3 {
                let left = say(&mut m, round * 3 + h, 1, AnnounceEvent::Stopped, t0);
                assert!(matches!(left, Ok(Change::Left(_))));
            }
            assert_eq!(m.len(), 0);
        }
    }

    #[test]
    fn peer_ids_per_swarm_are_bounded_and_the_least_recent_is_replaced() {
        let t0 = Instant::now();
        let t = |s: u64| t0 + Duration::from_secs(s);
        let mut m = Memberships::new(t0);
        say(&mut m, 1, 1, AnnounceEvent::Started, t(0)).expect("room");
        assert!(matches!(
            say(&mut m, 1, 2, AnnounceEvent::Started, t(1)),
            Ok(Change::Added)
        ));
        say(&mut m, 1, 1, AnnounceEvent::None, t(2)).expect("refresh");
        // Peer 2 was announced least recently: peer 3 takes its place.
        let r = say(&mut m, 1, 3, AnnounceEvent::Started, t(3));
        assert!(
            matches!(r, Ok(Change::Replaced(PeerId([2, ..]), _))),
            "{r:?}"
        );
        // A stop for an id the connection no longer holds there changes nothing.
        assert!(matches!(
            say(&mut m, 1, 2, AnnounceEvent::Stopped, t(4)),
            Ok(Change::None)
        ));
        assert_eq!(pairs(m), [(1, 1), (1, 3)]);
    }

    #[test]
    fn extra_ids_count_against_the_same_allowance_as_swarms() {
        let t0 = Instant::now();
        let mut m = Memberships::new(t0);
        say(&mut m, 1, 1, AnnounceEvent::Started, t0).expect("room");
        say(&mut m, 1, 2, AnnounceEvent::Started, t0).expect("second id");
        say(&mut m, 2, 1, AnnounceEvent::Started, t0).expect("room");
        assert_eq!(m.len(), 3);
        assert_eq!(
            say(&mut m, 3, 1, AnnounceEvent::Started, t0).err(),
            Some(TooManySwarms)
        );
        // Swarm 2 is full for the allowance: a second id there replaces, never adds.
        assert!(matches!(
            say(&mut m, 2, 9, AnnounceEvent::Started, t0),
            Ok(Change::Replaced(..))
        ));
        assert_eq!(m.len(), 3);
    }

    #[test]
    fn silent_records_expire() {
        let t0 = Instant::now();
        let mut m = Memberships::new(t0);
        for h in 0..3 {
            say(&mut m, h, 1, AnnounceEvent::Started, t0).expect("room");
        }
        say(&mut m, 0, 1, AnnounceEvent::None, t0 + LIMITS.timeout).expect("refreshed");
        let later = t0 + LIMITS.timeout + Duration::from_secs(2);
        assert!(matches!(
            say(&mut m, 9, 1, AnnounceEvent::Started, later),
            Ok(Change::Joined)
        ));
        assert_eq!(pairs(m), [(0, 1), (9, 1)], "the two silent records expired");
    }

    #[test]
    fn undo_restores_what_an_unsent_announce_changed() {
        let t0 = Instant::now();
        let mut m = Memberships::new(t0);
        let c = say(&mut m, 1, 1, AnnounceEvent::Started, t0).expect("room");
        m.undo(InfoHash([1; 20]), PeerId([1; 20]), c);
        assert_eq!(m.len(), 0);
        say(&mut m, 1, 1, AnnounceEvent::Started, t0).expect("room");
        say(&mut m, 1, 2, AnnounceEvent::Started, t0).expect("room");
        let c = say(&mut m, 1, 3, AnnounceEvent::Started, t0).expect("replace");
        m.undo(InfoHash([1; 20]), PeerId([3; 20]), c);
        let c = say(&mut m, 1, 2, AnnounceEvent::Stopped, t0).expect("stop");
        m.undo(InfoHash([1; 20]), PeerId([2; 20]), c);
        assert_eq!(pairs(m), [(1, 1), (1, 2)]);
    }
}
