//! Cluster membership and shard ownership, sans-IO: which tracker instances are alive (from
//! their heartbeats, with the time passed in) and which one owns each virtual shard of the
//! info-hash space (rendezvous hashing over the live members). The bus that carries the
//! heartbeats and the requests is the I/O shell's; this is the part every instance must
//! compute identically, so it uses only fixed hash functions, never per-process seeds.
//!
//! Rendezvous (highest random weight) hashing: a shard belongs to the member whose
//! `weight(shard, member)` is highest. When a member leaves, only its shards move (each to its
//! runner-up); when one joins, it takes about `1/n` of the shards, from every other member.

mod bridge;
pub(crate) mod wire;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tidepool_protocol::InfoHash;

pub use bridge::ClusterError;
pub(crate) use bridge::{Cluster, Local, MemberReply, MemberTotals, MemberView, Outbound};

/// A tracker instance: random per boot, so a restarted instance is a new member (its old
/// connections are gone; nothing may be routed to them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InstanceId(pub u64);

/// What a heartbeat changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heard {
    /// A member not known before (or known as expired): ownership may move.
    Joined,
    /// A known member, still alive.
    Alive,
    /// Refused: the member table is full (the caller counts it).
    Full,
    /// Refused: this member said it was leaving, less than a timeout ago (a batch it sent
    /// before its goodbye must not bring it back).
    Departed,
}

/// One live member as last heard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The operator's name for it (`[cluster] name`), for `/stats`.
    pub name: String,
    /// When its last heartbeat arrived.
    pub last_heard: Instant,
}

/// The live members and who owns what, as one instance sees them.
#[derive(Debug, Clone)]
pub struct Membership {
    me: InstanceId,
    shards: u32,
    /// A member unheard this long is taken for dead (a few heartbeat intervals).
    timeout: Duration,
    /// Every live member but this instance (this one is always alive to itself).
    others: BTreeMap<InstanceId, Member>,
    /// Bound on `others`, so a flood of forged heartbeats cannot grow the table.
    max_members: usize,
    /// Members that said goodbye, and when: refused for a timeout (bounded like `others`).
    departed: BTreeMap<InstanceId, Instant>,
}

impl Membership {
    /// This instance alone, with `shards` virtual shards (at least 1) and members expiring
    /// after `timeout` of silence; at most `max_members` others are tracked.
    pub fn new(me: InstanceId, shards: u32, timeout: Duration, max_members: usize) -> Self {
        Self {
            me,
            shards: shards.max(1),
            timeout,
            others: BTreeMap::new(),
            max_members,
            departed: BTreeMap::new(),
        }
    }

    /// This instance.
    pub fn me(&self) -> InstanceId {
        self.me
    }

    /// Virtual shards.
    pub fn shards(&self) -> u32 {
        self.shards
    }

    /// A heartbeat (or a batch) from `from` at `now`. A name given fills in one not known yet
    /// (a member first heard through a batch has none).
    pub fn heard(&mut self, from: InstanceId, name: &str, now: Instant) -> Heard {
        if from == self.me {
            return Heard::Alive;
        }
        if let Some(m) = self.others.get_mut(&from) {
            m.last_heard = now;
            if m.name.is_empty() && !name.is_empty() {
                m.name = name.chars().take(64).collect();
            }
            return Heard::Alive;
        }
        if let Some(at) = self.departed.get(&from) {
            if now.saturating_duration_since(*at) <= self.timeout {
                return Heard::Departed;
            }
            self.departed.remove(&from);
        }
        if self.others.len() >= self.max_members {
            return Heard::Full;
        }
        self.others.insert(
            from,
            Member {
                name: name.chars().take(64).collect(),
                last_heard: now,
            },
        );
        Heard::Joined
    }

    /// Drops members silent past the timeout; returns them (their peers must be purged and
    /// their shards have moved).
    pub fn expire(&mut self, now: Instant) -> Vec<InstanceId> {
        let gone: Vec<InstanceId> = self
            .others
            .iter()
            .filter(|(_, m)| now.saturating_duration_since(m.last_heard) > self.timeout)
            .map(|(id, _)| *id)
            .collect();
        for id in &gone {
            self.others.remove(id);
        }
        let timeout = self.timeout;
        self.departed
            .retain(|_, at| now.saturating_duration_since(*at) <= timeout);
        gone
    }

    /// A member that said it is leaving (a clean shutdown): gone at once, and not taken back
    /// for a timeout. True when it was a member.
    pub fn left(&mut self, id: InstanceId, now: Instant) -> bool {
        if id == self.me {
            return false;
        }
        if self.departed.len() < self.max_members {
            self.departed.insert(id, now);
        }
        self.others.remove(&id).is_some()
    }

    /// Live members, this instance included, in id order.
    pub fn members(&self) -> Vec<InstanceId> {
        let mut all: Vec<InstanceId> = self.others.keys().copied().collect();
        all.push(self.me);
        all.sort_unstable();
        all
    }

    /// A live member's record (none for this instance).
    pub fn member(&self, id: InstanceId) -> Option<&Member> {
        self.others.get(&id)
    }

    /// The virtual shard of an info hash.
    pub fn shard_of(&self, info_hash: &InfoHash) -> u32 {
        shard_of(info_hash, self.shards)
    }

    /// The live member that owns `shard`.
    pub fn owner(&self, shard: u32) -> InstanceId {
        self.others
            .keys()
            .copied()
            .chain(std::iter::once(self.me))
            .max_by_key(|id| (weight(shard, *id), *id))
            .unwrap_or(self.me)
    }

    /// Whether this instance owns `shard`.
    pub fn owns(&self, shard: u32) -> bool {
        self.owner(shard) == self.me
    }

    /// Shards each live member owns, in id order (for `/stats`).
    pub fn ownership(&self) -> Vec<(InstanceId, u32)> {
        let mut counts: BTreeMap<InstanceId, u32> =
            self.members().into_iter().map(|id| (id, 0)).collect();
        for shard in 0..self.shards {
            *counts.entry(self.owner(shard)).or_default() += 1;
        }
        counts.into_iter().collect()
    }
}

/// Who owns each virtual shard and which members are alive, as the bus last told this
/// instance: computed by the bridge on every membership change and read by the socket
/// workers (where to send a request) and the swarm workers (what to keep, whose peers to
/// purge) through a [`crate::access::View`].
#[derive(Debug, Clone)]
pub(crate) struct Routes {
    me: InstanceId,
    shards: u32,
    /// The owner of each virtual shard.
    owners: Vec<InstanceId>,
    /// Live members, this one included, sorted.
    members: Vec<InstanceId>,
}

impl Routes {
    /// The routes of `membership` now.
    pub(crate) fn of(membership: &Membership) -> Self {
        Self {
            me: membership.me(),
            shards: membership.shards(),
            owners: (0..membership.shards())
                .map(|s| membership.owner(s))
                .collect(),
            members: membership.members(),
        }
    }

    /// This instance.
    pub(crate) fn me(&self) -> InstanceId {
        self.me
    }

    /// The instance that owns `info_hash`'s shard.
    pub(crate) fn owner(&self, info_hash: &InfoHash) -> InstanceId {
        self.owners
            .get(shard_of(info_hash, self.shards) as usize)
            .copied()
            .unwrap_or(self.me)
    }

    /// Whether this instance owns `info_hash`'s shard.
    pub(crate) fn owns(&self, info_hash: &InfoHash) -> bool {
        self.owner(info_hash) == self.me
    }

    /// Whether `instance` is a live member (this one always is).
    pub(crate) fn is_member(&self, instance: u64) -> bool {
        self.members.binary_search(&InstanceId(instance)).is_ok()
    }

    /// Live members, this one included.
    pub(crate) fn member_count(&self) -> usize {
        self.members.len()
    }

    /// Shards this instance owns.
    pub(crate) fn owned(&self) -> usize {
        self.owners.iter().filter(|o| **o == self.me).count()
    }
}

/// The virtual shard of an info hash: its bytes 4..8 (the first four pick the swarm worker
/// inside an instance, so the two choices stay independent).
pub fn shard_of(info_hash: &InfoHash, shards: u32) -> u32 {
    let h = u32::from_le_bytes([
        info_hash.0[4],
        info_hash.0[5],
        info_hash.0[6],
        info_hash.0[7],
    ]);
    h % shards.max(1)
}

/// Rendezvous weight of `member` for `shard`: splitmix64 of both, the same on every instance.
pub fn weight(shard: u32, member: InstanceId) -> u64 {
    let mut z = member.0 ^ u64::from(shard).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHARDS: u32 = 1024;

    fn cluster(me: u64, others: &[u64], now: Instant) -> Membership {
        let mut m = Membership::new(InstanceId(me), SHARDS, Duration::from_secs(3), 64);
        for o in others {
            assert_eq!(m.heard(InstanceId(*o), "x", now), Heard::Joined);
        }
        m
    }

    #[test]
    fn every_instance_computes_the_same_owners() {
        let now = Instant::now();
        let ids = [0x1111, 0x2222_3333, 0xdead_beef_0000_0001];
        let views: Vec<Membership> = ids
            .iter()
            .map(|me| {
                let others: Vec<u64> = ids.iter().copied().filter(|o| o != me).collect();
                cluster(*me, &others, now)
            })
            .collect();
        for shard in 0..SHARDS {
            let owner = views[0].owner(shard);
            assert!(
                views.iter().all(|v| v.owner(shard) == owner),
                "shard {shard}"
            );
            assert_eq!(views.iter().filter(|v| v.owns(shard)).count(), 1);
        }
    }

    #[test]
    fn shards_spread_evenly_and_a_departure_moves_only_the_departed_members_shards() {
        let now = Instant::now();
        let others: Vec<u64> = (1..8).map(|i| i * 0x0101_0101_0101).collect();
        let full = cluster(7, &others, now);
        let share = f64::from(SHARDS) / 8.0;
        for (id, owned) in full.ownership() {
            let off = (f64::from(owned) - share).abs() / share;
            assert!(off < 0.25, "{id:?} owns {owned} of {SHARDS}");
        }
        let mut fewer = full.clone();
        let leaver = InstanceId(others[2]);
        assert!(fewer.left(leaver, now));
        for shard in 0..SHARDS {
            if full.owner(shard) != leaver {
                assert_eq!(fewer.owner(shard), full.owner(shard), "shard {shard} moved");
            } else {
                assert_ne!(fewer.owner(shard), leaver);
            }
        }
    }

    #[test]
    fn silent_members_expire_and_heartbeats_keep_them() {
        let t0 = Instant::now();
        let mut m = cluster(1, &[2, 3], t0);
        let t1 = t0 + Duration::from_secs(2);
        assert_eq!(m.heard(InstanceId(2), "b", t1), Heard::Alive);
        assert!(m.expire(t1).is_empty());
        let t2 = t0 + Duration::from_secs(4);
        assert_eq!(m.expire(t2), vec![InstanceId(3)]);
        assert_eq!(m.members(), vec![InstanceId(1), InstanceId(2)]);
        // A member back after expiring is a join (its shards come back to it).
        assert_eq!(m.heard(InstanceId(3), "c", t2), Heard::Joined);
        // Alone, an instance owns everything.
        let alone = cluster(9, &[], t0);
        assert!((0..SHARDS).all(|s| alone.owns(s)));
    }

    #[test]
    fn forged_heartbeats_cannot_grow_the_table_past_its_bound() {
        let now = Instant::now();
        let mut m = Membership::new(InstanceId(1), SHARDS, Duration::from_secs(3), 4);
        let refused = (2..1000)
            .filter(|i| m.heard(InstanceId(*i), &"n".repeat(10_000), now) == Heard::Full)
            .count();
        assert_eq!(m.members().len(), 5);
        assert_eq!(refused, 1000 - 2 - 4);
        assert!(m.member(InstanceId(2)).is_some_and(|r| r.name.len() == 64));
    }

    #[test]
    fn a_member_that_left_is_not_taken_back_until_a_timeout_has_passed() {
        let t0 = Instant::now();
        let mut m = cluster(1, &[2], t0);
        assert!(m.left(InstanceId(2), t0));
        assert_eq!(m.heard(InstanceId(2), "b", t0), Heard::Departed);
        assert_eq!(m.members(), vec![InstanceId(1)]);
        let later = t0 + Duration::from_secs(4);
        assert!(m.expire(later).is_empty());
        assert_eq!(m.heard(InstanceId(2), "b", later), Heard::Joined);
        // A name learnt late fills in one heard without it.
        assert_eq!(m.heard(InstanceId(7), "", later), Heard::Joined);
        assert_eq!(m.heard(InstanceId(7), "g", later), Heard::Alive);
        assert!(m.member(InstanceId(7)).is_some_and(|r| r.name == "g"));
    }

    #[test]
    fn shard_and_swarm_worker_choices_use_different_bytes() {
        let mut a = InfoHash([0; 20]);
        a.0[4] = 1;
        assert_eq!(shard_of(&a, SHARDS), 1);
        assert_eq!(crate::net::shard_of(&a, 4), 0);
    }
}
