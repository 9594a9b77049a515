//! Requests this node forwarded upstream on behalf of a neighbour, indexed both ways: by
//! the id used upstream (chunks and Unavailable come back with it) and by the downstream's
//! (neighbour, request id) (chunks-missing and cancels come with that). Bounded in total
//! and per downstream neighbour; past the bound a request is refused (Unavailable).

use std::collections::{BTreeMap, BTreeSet};

use tidepool_protocol::PeerId;
use tidepool_protocol::pool::{ChunkRanges, FileId};

/// A request forwarded upstream.
#[derive(Debug, Clone)]
pub(super) struct Relayed {
    pub(super) downstream: PeerId,
    pub(super) downstream_id: u64,
    pub(super) file_id: FileId,
    pub(super) upstream: PeerId,
    pub(super) outstanding: ChunkRanges,
    /// Who asked first, and the hops the request had left here (to send it on again).
    pub(super) requester: PeerId,
    pub(super) hops_left: u8,
}

#[derive(Debug)]
pub(super) struct Relays {
    by_up: BTreeMap<u64, Relayed>,
    by_down: BTreeMap<(PeerId, u64), u64>,
    by_upstream: BTreeSet<(PeerId, u64)>,
    per_downstream: BTreeMap<PeerId, usize>,
    max_total: usize,
    max_per_downstream: usize,
}

impl Relays {
    pub(super) fn new(max_total: usize, max_per_downstream: usize) -> Self {
        Self {
            by_up: BTreeMap::new(),
            by_down: BTreeMap::new(),
            by_upstream: BTreeSet::new(),
            per_downstream: BTreeMap::new(),
            max_total,
            max_per_downstream,
        }
    }

    /// Whether `downstream` may have another request relayed.
    pub(super) fn has_room(&self, downstream: &PeerId) -> bool {
        self.by_up.len() < self.max_total
            && self.per_downstream.get(downstream).copied().unwrap_or(0) < self.max_per_downstream
    }

    /// Records a forwarded request under `up_id`. A request already relayed under the same
    /// downstream key is replaced (its old upstream id and entry returned).
    pub(super) fn insert(&mut self, up_id: u64, r: Relayed) -> Option<(u64, Relayed)> {
        let old = self
            .by_down
            .get(&(r.downstream, r.downstream_id))
            .copied()
            .and_then(|id| Some((id, self.remove(id)?)));
        *self.per_downstream.entry(r.downstream).or_default() += 1;
        self.by_down.insert((r.downstream, r.downstream_id), up_id);
        self.by_upstream.insert((r.upstream, up_id));
        self.by_up.insert(up_id, r);
        old
    }

    pub(super) fn get(&self, up_id: u64) -> Option<&Relayed> {
        self.by_up.get(&up_id)
    }

    pub(super) fn get_mut(&mut self, up_id: u64) -> Option<&mut Relayed> {
        self.by_up.get_mut(&up_id)
    }

    /// The upstream id of `downstream`'s request `downstream_id`, if relayed from here.
    pub(super) fn by_downstream(&self, downstream: PeerId, downstream_id: u64) -> Option<u64> {
        self.by_down.get(&(downstream, downstream_id)).copied()
    }

    pub(super) fn remove(&mut self, up_id: u64) -> Option<Relayed> {
        let r = self.by_up.remove(&up_id)?;
        self.by_down.remove(&(r.downstream, r.downstream_id));
        self.by_upstream.remove(&(r.upstream, up_id));
        if let Some(n) = self.per_downstream.get_mut(&r.downstream) {
            *n -= 1;
            if *n == 0 {
                self.per_downstream.remove(&r.downstream);
            }
        }
        Some(r)
    }

    /// Removes and returns every request relayed through `upstream`.
    pub(super) fn take_through(&mut self, upstream: PeerId) -> Vec<(u64, Relayed)> {
        let ids: Vec<u64> = self
            .by_upstream
            .range((upstream, 0)..=(upstream, u64::MAX))
            .map(|(_, id)| *id)
            .collect();
        ids.into_iter()
            .filter_map(|id| Some((id, self.remove(id)?)))
            .collect()
    }

    /// Removes and returns every request relayed for `downstream`.
    pub(super) fn take_for(&mut self, downstream: PeerId) -> Vec<(u64, Relayed)> {
        let ids: Vec<u64> = self
            .by_down
            .range((downstream, 0)..=(downstream, u64::MAX))
            .map(|(_, id)| *id)
            .collect();
        ids.into_iter()
            .filter_map(|id| Some((id, self.remove(id)?)))
            .collect()
    }

    pub(super) fn len(&self) -> usize {
        self.by_up.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(down: u8, down_id: u64, up: u8) -> Relayed {
        Relayed {
            downstream: PeerId([down; 20]),
            downstream_id: down_id,
            file_id: FileId([0; 32]),
            upstream: PeerId([up; 20]),
            outstanding: ChunkRanges::from_range(0..4),
            requester: PeerId([down; 20]),
            hops_left: 2,
        }
    }

    #[test]
    fn relays_are_found_both_ways_and_leave_with_either_neighbour() {
        let mut rs = Relays::new(10, 2);
        rs.insert(100, r(1, 7, 2));
        rs.insert(101, r(1, 8, 3));
        rs.insert(102, r(4, 7, 2));
        assert_eq!(rs.by_downstream(PeerId([1; 20]), 8), Some(101));
        assert!(!rs.has_room(&PeerId([1; 20])), "two per downstream");
        assert!(rs.has_room(&PeerId([4; 20])));
        let through = rs.take_through(PeerId([2; 20]));
        assert_eq!(
            through.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
            vec![100, 102]
        );
        assert_eq!(rs.len(), 1);
        assert!(rs.has_room(&PeerId([1; 20])));
        assert_eq!(rs.take_for(PeerId([1; 20])).len(), 1);
        assert_eq!(rs.len(), 0);
        assert!(rs.per_downstream.is_empty() && rs.by_upstream.is_empty());
    }

    #[test]
    fn the_total_bound_refuses_more() {
        let mut rs = Relays::new(3, 10);
        for i in 0..3 {
            rs.insert(i, r(i as u8, i, 9));
        }
        assert!(!rs.has_room(&PeerId([7; 20])));
        // Re-relaying the same downstream request replaces its entry.
        let old = rs.insert(50, r(0, 0, 8));
        assert_eq!(
            old.map(|(id, r)| (id, r.upstream)),
            Some((0, PeerId([9; 20])))
        );
        assert_eq!(rs.len(), 3);
    }
}
