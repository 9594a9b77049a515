//! What the engine knows of files held elsewhere, bounded: the catalog of file metadata
//! (least recently heard evicted first; files held, downloaded or wanted here are pinned),
//! the latest offer heard for each (passed on to neighbours that connect later), and the
//! (origin, seq) pairs already seen, in two generations so old ones age out.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use tidepool_protocol::PeerId;
use tidepool_protocol::pool::{FileId, FileMeta, PoolMessage};

#[derive(Debug)]
struct Known {
    meta: Arc<FileMeta>,
    /// The latest offer heard from farther away, with its hops already spent.
    heard: Option<PoolMessage>,
    /// When it was last heard of (a counter, not a clock: only the order matters).
    touched: u64,
}

/// The catalog and the seen set.
#[derive(Debug)]
pub(super) struct Gossip {
    known: BTreeMap<FileId, Known>,
    /// `touched` → file, to find the least recently heard in O(log n).
    by_age: BTreeMap<u64, FileId>,
    pinned: BTreeSet<FileId>,
    clock: u64,
    max_files: usize,
    seen: BTreeSet<(PeerId, u64)>,
    seen_old: BTreeSet<(PeerId, u64)>,
    max_seen: usize,
    /// Catalog entries evicted to stay within `max_files`.
    pub(super) evicted: u64,
}

impl Gossip {
    pub(super) fn new(max_files: usize, max_seen: usize) -> Self {
        Self {
            known: BTreeMap::new(),
            by_age: BTreeMap::new(),
            pinned: BTreeSet::new(),
            clock: 0,
            max_files: max_files.max(1),
            seen: BTreeSet::new(),
            seen_old: BTreeSet::new(),
            max_seen: max_seen.max(1),
            evicted: 0,
        }
    }

    /// Whether (origin, seq) is new; records it. Two generations of `max_seen` each: an
    /// offer circulates for a few hops, so forgetting it after that many newer ones is safe.
    pub(super) fn first_sight(&mut self, origin: PeerId, seq: u64) -> bool {
        let key = (origin, seq);
        if self.seen.contains(&key) || self.seen_old.contains(&key) {
            return false;
        }
        if self.seen.len() >= self.max_seen {
            self.seen_old = std::mem::take(&mut self.seen);
        }
        self.seen.insert(key);
        true
    }

    /// The metadata of `id`, if known.
    pub(super) fn meta(&self, id: &FileId) -> Option<&Arc<FileMeta>> {
        self.known.get(id).map(|k| &k.meta)
    }

    /// Learns (or refreshes) `meta`; evicts the least recently heard unpinned file past
    /// the bound. Returns the shared metadata.
    pub(super) fn learn(&mut self, meta: &FileMeta) -> Arc<FileMeta> {
        let id = meta.file_id();
        self.clock += 1;
        let clock = self.clock;
        if let Some(k) = self.known.get_mut(&id) {
            self.by_age.remove(&k.touched);
            k.touched = clock;
            self.by_age.insert(clock, id);
            return k.meta.clone();
        }
        while self.known.len() >= self.max_files {
            let victim = self
                .by_age
                .values()
                .copied()
                .find(|id| !self.pinned.contains(id));
            let Some(victim) = victim else { break };
            self.forget(&victim);
            self.evicted += 1;
        }
        let meta = Arc::new(meta.clone());
        self.known.insert(
            id,
            Known {
                meta: meta.clone(),
                heard: None,
                touched: clock,
            },
        );
        self.by_age.insert(clock, id);
        meta
    }

    fn forget(&mut self, id: &FileId) {
        if let Some(k) = self.known.remove(id) {
            self.by_age.remove(&k.touched);
        }
    }

    /// Keeps `id` in the catalog whatever else is heard (held, downloading or wanted).
    /// Pinned files are at most the files this node's application shares or gets.
    pub(super) fn pin(&mut self, id: FileId) {
        self.pinned.insert(id);
    }

    /// Records the latest offer heard of a known file, ready to pass on.
    pub(super) fn set_heard(&mut self, id: &FileId, offer: PoolMessage) {
        if let Some(k) = self.known.get_mut(id) {
            k.heard = Some(offer);
        }
    }

    /// The most recently heard offers, newest first, at most `n`, skipping `except`.
    pub(super) fn recent_heard(
        &self,
        n: usize,
        except: impl Fn(&FileId) -> bool,
    ) -> Vec<PoolMessage> {
        self.by_age
            .iter()
            .rev()
            .filter(|(_, id)| !except(id))
            .filter_map(|(_, id)| self.known.get(id)?.heard.clone())
            .take(n)
            .collect()
    }

    /// Files known.
    pub(super) fn len(&self) -> usize {
        self.known.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(i: u32) -> FileMeta {
        FileMeta {
            name: format!("f{i}"),
            size: 1000,
            chunk_size: 100,
            root: [i as u8; 32],
        }
    }

    #[test]
    fn the_catalog_evicts_the_least_recently_heard_but_never_a_pinned_file() {
        let mut g = Gossip::new(3, 10);
        let pinned = meta(0).file_id();
        g.learn(&meta(0));
        g.pin(pinned);
        for i in 1..100 {
            g.learn(&meta(i));
        }
        assert_eq!(g.len(), 3);
        assert!(g.meta(&pinned).is_some(), "the pinned file stays");
        assert!(g.meta(&meta(99).file_id()).is_some());
        assert!(g.meta(&meta(1).file_id()).is_none());
        assert_eq!(g.evicted, 97);
        // Hearing of a file again makes it the newest.
        g.learn(&meta(98));
        g.learn(&meta(100));
        assert!(g.meta(&meta(98).file_id()).is_some());
        assert!(g.meta(&meta(99).file_id()).is_none());
    }

    #[test]
    fn seen_pairs_are_remembered_for_two_generations_then_forgotten() {
        let mut g = Gossip::new(3, 4);
        let p = PeerId([1; 20]);
        assert!(g.first_sight(p, 0));
        assert!(!g.first_sight(p, 0));
        for s in 1..8 {
            assert!(g.first_sight(p, s));
        }
        assert!(!g.first_sight(p, 0), "still in the old generation");
        for s in 8..13 {
            assert!(g.first_sight(p, s));
        }
        assert!(g.first_sight(p, 0), "aged out: memory stays bounded");
    }
}
