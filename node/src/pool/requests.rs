//! The engine's answers to control messages: offers (gossip, holders and routes), requests
//! and chunks-missing reports (served from copies here, promised from a download here, or
//! relayed one hop toward a holder), Unavailable and cancels. Every range a peer sends is
//! clipped to the file's chunks before anything walks it.

use tidepool_protocol::PeerId;
use tidepool_protocol::pool::{ChunkRanges, FileId, FileMeta, PoolMessage};

use super::engine::PoolEngine;
use super::neighbour::{MAX_FILES_PER_NEIGHBOUR, NEW_FILES_BURST, NEW_FILES_RATE, Serve};
use super::relay::Relayed;

/// The smallest chunk accepted in an offer: smaller ones make files of billions of
/// chunks, whose range sets are large to keep and to pass on.
pub(super) const MIN_CHUNK_SIZE: u32 = 1024;

/// The most chunks a file offered by a peer may have (4 TiB of 64 KiB chunks).
pub(super) const MAX_CHUNKS: u32 = 1 << 26;

/// What a forwarded request carries upstream.
pub(super) struct Upstream {
    pub requester: PeerId,
    pub file_id: FileId,
    pub promised: ChunkRanges,
    pub from_origin: bool,
    pub hops_left: u8,
}

impl PoolEngine {
    pub(super) fn on_control(&mut self, peer: PeerId, msg: PoolMessage) {
        match msg {
            PoolMessage::FileOffer {
                origin,
                seq,
                hops,
                meta,
                have,
            } => self.on_offer(peer, origin, seq, hops, meta, have),
            PoolMessage::FileRetract {
                origin, file_id, ..
            } => {
                if origin == peer
                    && let Some(n) = self.neighbours.get_mut(&peer)
                {
                    n.holds.remove(&file_id);
                    // It no longer holds the file; it may still relay it.
                    if let Some(a) = self.downloads.get_mut(&file_id) {
                        a.fetch.add_source(peer, ChunkRanges::new());
                    }
                    self.recheck_promises();
                }
            }
            PoolMessage::FileRequest {
                request_id,
                requester,
                file_id,
                requested,
                promised,
                from_origin,
                hops_left,
            } => self.on_request(
                peer,
                request_id,
                file_id,
                requested,
                Upstream {
                    requester,
                    file_id,
                    promised,
                    from_origin,
                    hops_left,
                },
            ),
            PoolMessage::ChunksMissing {
                request_id,
                file_id,
                missing,
            } => self.on_missing(peer, request_id, file_id, missing),
            PoolMessage::Unavailable {
                request_id,
                file_id,
                chunks,
            } => self.on_unavailable(peer, request_id, file_id, chunks),
            PoolMessage::Cancel {
                request_id,
                file_id,
            } => {
                if let Some(n) = self.neighbours.get_mut(&peer) {
                    n.cancel(file_id, request_id);
                }
                if let Some(up_id) = self.relays.by_downstream(peer, request_id)
                    && let Some(r) = self.relays.remove(up_id)
                {
                    self.send(
                        r.upstream,
                        PoolMessage::Cancel {
                            request_id: up_id,
                            file_id,
                        },
                    );
                }
            }
            PoolMessage::Chunk { .. } => {}
        }
    }

    fn on_offer(
        &mut self,
        peer: PeerId,
        origin: PeerId,
        seq: u64,
        hops: u8,
        meta: FileMeta,
        have: ChunkRanges,
    ) {
        let (rate, burst) = (self.config.offer_rate, self.config.offer_burst);
        let now = self.now;
        let Some(n) = self.neighbours.get_mut(&peer) else {
            return;
        };
        self.stats.offers_heard += 1;
        if !n.offers.take(now, rate, burst) {
            n.offers_ignored += 1;
            self.stats.offers_ignored += 1;
            if n.offers_ignored.is_power_of_two() {
                tracing::warn!(
                    ?peer,
                    ignored = n.offers_ignored,
                    "ignoring file offers over {rate}/s"
                );
            }
            return;
        }
        let count = match meta.chunk_count() {
            Ok(c)
                if meta.chunk_size as usize <= self.config.max_chunk_size
                    && meta.chunk_size >= MIN_CHUNK_SIZE
                    && c <= MAX_CHUNKS =>
            {
                c
            }
            _ => {
                self.stats.offers_ignored += 1;
                tracing::info!(
                    ?peer,
                    chunk_size = meta.chunk_size,
                    size = meta.size,
                    "ignoring an offer of a file this node cannot carry"
                );
                return;
            }
        };
        let full = ChunkRanges::full(count);
        let have = have.intersection(&full);
        let id = meta.file_id();
        // A flood of new files would evict the honest ones from the catalog: files not
        // known yet have a rate of their own.
        if self.gossip.meta(&id).is_none()
            && !n.new_files.take(now, NEW_FILES_RATE, NEW_FILES_BURST)
        {
            self.stats.offers_ignored += 1;
            return;
        }
        // Only whole copies are gossiped past a neighbour (partial ones go out with no hops
        // left), so a forwarded offer is small: one range. A peer's word about hops is
        // capped at this node's own budget.
        let hops = if have == full {
            hops.min(self.config.offer_hops)
        } else {
            0
        };
        let max_files = MAX_FILES_PER_NEIGHBOUR;
        if origin == peer {
            // A holder's own offer always counts, even if a forwarded copy came first.
            n.set_holds(id, have.clone(), max_files);
            if let Some(a) = self.downloads.get_mut(&id) {
                a.fetch.add_source(peer, have.clone());
                self.dirty.insert(id);
            }
        } else if have == full {
            // The neighbour forwarded someone else's whole copy: it can relay requests.
            n.add_route(id, &have, hops, max_files);
            let via = n.routes.get(&id).map(|r| r.via.clone()).unwrap_or_default();
            if let Some(a) = self.downloads.get_mut(&id) {
                a.fetch.add_relay(peer, via);
                self.dirty.insert(id);
            }
        }
        if origin == self.me || !self.gossip.first_sight(origin, seq) {
            return;
        }
        self.gossip.learn(&meta);
        self.start_wanted(id);
        if hops == 0 {
            return;
        }
        let fwd = PoolMessage::FileOffer {
            origin,
            seq,
            hops: hops - 1,
            meta,
            have,
        };
        self.gossip.set_heard(&id, fwd.clone());
        self.send_all(&fwd, Some(peer));
    }

    /// Every chunk of `file_id` when this node knows the file: all a request may name.
    /// Chunks past the end (a peer asking for `0..u32::MAX`) would otherwise be walked.
    fn clip(&self, file_id: &FileId, ranges: ChunkRanges) -> Option<ChunkRanges> {
        let count = self.meta(file_id)?.chunk_count().ok()?;
        Some(ranges.intersection(&ChunkRanges::full(count)))
    }

    fn on_request(
        &mut self,
        peer: PeerId,
        request_id: u64,
        file_id: FileId,
        requested: ChunkRanges,
        up: Upstream,
    ) {
        tracing::debug!(?peer, request_id, ?requested, up.hops_left, "file request");
        // No longer than an offer can travel (a peer's 255 would send it in circles).
        let up = Upstream {
            hops_left: up.hops_left.min(self.config.offer_hops + 1),
            ..up
        };
        let Some(requested) = self.clip(&file_id, requested.clone()) else {
            // Not a file known here: nothing to serve or route.
            self.unavailable(peer, file_id, request_id, requested);
            return;
        };
        let held = self.serve_held(peer, file_id, request_id, &requested, up.from_origin);
        let rest = requested.difference(&held).difference(&up.promised);
        if rest.is_empty() {
            return;
        }
        // Downloading the file too: what it will get from a holder it sends then. Asked
        // for the origin, it forwards (only a whole copy answers those).
        let (mine, rest) = if up.from_origin {
            (ChunkRanges::new(), rest)
        } else {
            let left = self.promise(file_id, peer, request_id, &rest);
            (rest.difference(&left), left)
        };
        if rest.is_empty() {
            return;
        }
        if up.hops_left == 0 {
            tracing::info!(?peer, request_id, "request out of hops");
            self.unavailable(peer, file_id, request_id, rest);
            return;
        }
        // This node promised what it serves itself, so the origin skips those chunks.
        let up = Upstream {
            promised: up.promised.union(&held).union(&mine),
            hops_left: up.hops_left - 1,
            ..up
        };
        self.forward(peer, request_id, rest, up);
    }

    fn on_missing(&mut self, peer: PeerId, request_id: u64, file_id: FileId, missing: ChunkRanges) {
        let Some(missing) = self.clip(&file_id, missing.clone()) else {
            self.unavailable(peer, file_id, request_id, missing);
            return;
        };
        let held = self.serve_held(peer, file_id, request_id, &missing, false);
        let rest = missing.difference(&held);
        if rest.is_empty() {
            return;
        }
        // Promised from a download here (again, if the promise was dropped).
        let left = self.promise(file_id, peer, request_id, &rest);
        let promised = held.union(&rest.difference(&left));
        let rest = left;
        if rest.is_empty() {
            return;
        }
        // A request relayed from here: the report goes up the same path.
        if let Some(up_id) = self.relays.by_downstream(peer, request_id)
            && let Some(r) = self.relays.get_mut(up_id)
        {
            r.outstanding = r.outstanding.union(&rest);
            let up = r.upstream;
            self.send(
                up,
                PoolMessage::ChunksMissing {
                    request_id: up_id,
                    file_id,
                    missing: rest,
                },
            );
            return;
        }
        // The path was lost (its upstream left): start a new one.
        let up = Upstream {
            requester: peer,
            file_id,
            promised,
            from_origin: false,
            hops_left: self.config.offer_hops.saturating_sub(1),
        };
        self.forward(peer, request_id, rest, up);
    }

    fn on_unavailable(
        &mut self,
        peer: PeerId,
        request_id: u64,
        file_id: FileId,
        chunks: ChunkRanges,
    ) {
        // A request forwarded from here: the word goes down the same path (not to another
        // upstream, which could send it around in circles).
        if let Some(r) = self.relays.get_mut(request_id)
            && r.upstream == peer
            && r.file_id == file_id
        {
            let lost = r.outstanding.intersection(&chunks);
            r.outstanding = r.outstanding.difference(&lost);
            let (down, down_id, empty) = (r.downstream, r.downstream_id, r.outstanding.is_empty());
            if empty {
                self.relays.remove(request_id);
            }
            self.unavailable(down, file_id, down_id, lost);
            return;
        }
        if let Some(a) = self.downloads.get_mut(&file_id)
            && a.fetch.unavailable(&peer, request_id, &chunks)
        {
            self.dirty.insert(file_id);
            self.recheck_promises();
        }
    }

    /// Queues for `peer` the chunks of `wanted` this node holds, and returns them. Asked
    /// for the origin, only a whole copy answers. A full queue refuses them (Unavailable).
    fn serve_held(
        &mut self,
        peer: PeerId,
        file_id: FileId,
        request_id: u64,
        wanted: &ChunkRanges,
        from_origin: bool,
    ) -> ChunkRanges {
        let held = if self.whole.contains_key(&file_id) {
            wanted.clone()
        } else if from_origin {
            ChunkRanges::new()
        } else if let Some(a) = self.downloads.get(&file_id) {
            wanted.intersection(&a.servable)
        } else if let Some(have) = self.cache.get(&file_id) {
            wanted.intersection(have)
        } else {
            ChunkRanges::new()
        };
        if held.is_empty() {
            return held;
        }
        let max = self.config.request_queue;
        let Some(n) = self.neighbours.get_mut(&peer) else {
            return ChunkRanges::new();
        };
        let serve = Serve {
            file_id,
            request_id,
            ranges: held.clone(),
        };
        if !n.queue(serve, max) {
            self.stats.requests_refused += held.len();
            if n.requests_refused.is_power_of_two() {
                tracing::info!(
                    ?peer,
                    refused = n.requests_refused,
                    "request queue full; refusing requests"
                );
            }
            self.unavailable(peer, file_id, request_id, held.clone());
        }
        self.pump(peer);
        held
    }

    /// The neighbour to forward a request to: one that holds some of `rest` itself, else
    /// the relay nearest a holder; never the neighbour it came from or its requester.
    fn pick_upstream(
        &self,
        file_id: FileId,
        from: PeerId,
        requester: PeerId,
        rest: &ChunkRanges,
    ) -> Option<PeerId> {
        let allowed = |p: &PeerId| *p != from && *p != requester;
        let holder = self
            .neighbours
            .iter()
            .filter(|(p, _)| allowed(p))
            .filter_map(|(p, n)| Some((p, n.holds.get(&file_id)?.intersection(rest).len())))
            .filter(|(_, k)| *k > 0)
            .max_by_key(|(_, k)| *k)
            .map(|(p, _)| *p);
        holder.or_else(|| {
            self.neighbours
                .iter()
                .filter(|(p, _)| allowed(p))
                .filter_map(|(p, n)| {
                    let r = n.routes.get(&file_id)?;
                    Some((p, r.hops, r.via.intersection(rest).len()))
                })
                .filter(|(_, _, k)| *k > 0)
                .max_by_key(|(_, hops, k)| (*hops, *k))
                .map(|(p, ..)| *p)
        })
    }

    /// Sends `rest` of a request from `from` one hop toward a holder, remembering the path
    /// so chunks and chunks-missing reports can follow it.
    pub(super) fn forward(
        &mut self,
        from: PeerId,
        downstream_id: u64,
        rest: ChunkRanges,
        up: Upstream,
    ) {
        let Some(next) = self.pick_upstream(up.file_id, from, up.requester, &rest) else {
            tracing::debug!(?from, downstream_id, "no upstream for a request");
            self.unavailable(from, up.file_id, downstream_id, rest);
            return;
        };
        if !self.relays.has_room(&from) {
            self.stats.relays_refused += 1;
            self.unavailable(from, up.file_id, downstream_id, rest);
            return;
        }
        let up_id = self.rng.u64(1..u64::MAX / 2);
        let replaced = self.relays.insert(
            up_id,
            Relayed {
                downstream: from,
                downstream_id,
                file_id: up.file_id,
                upstream: next,
                outstanding: rest.clone(),
                requester: up.requester,
                hops_left: up.hops_left,
            },
        );
        if let Some((old_id, old)) = replaced {
            // Re-asked on a new path: the old path stops.
            self.send(
                old.upstream,
                PoolMessage::Cancel {
                    request_id: old_id,
                    file_id: old.file_id,
                },
            );
        }
        self.send(
            next,
            PoolMessage::FileRequest {
                request_id: up_id,
                requester: up.requester,
                file_id: up.file_id,
                requested: rest,
                promised: up.promised,
                from_origin: up.from_origin,
                hops_left: up.hops_left,
            },
        );
    }

    /// Sends what a forwarded request still waits for another way after its upstream left.
    pub(super) fn reroute(&mut self, r: Relayed) {
        let rest = self.promise(r.file_id, r.downstream, r.downstream_id, &r.outstanding);
        if rest.is_empty() {
            return;
        }
        let up = Upstream {
            requester: r.requester,
            file_id: r.file_id,
            promised: r.outstanding.difference(&rest),
            from_origin: false,
            hops_left: r.hops_left,
        };
        self.forward(r.downstream, r.downstream_id, rest, up);
    }

    /// Promises `peer` those of `chunks` that this node's download will get from a holder:
    /// sent as they arrive, and asked for first. Returns what is left to forward.
    pub(super) fn promise(
        &mut self,
        file_id: FileId,
        peer: PeerId,
        request_id: u64,
        chunks: &ChunkRanges,
    ) -> ChunkRanges {
        let Some(a) = self.downloads.get_mut(&file_id) else {
            return chunks.clone();
        };
        let promised = a.fetch.promisable(chunks);
        if promised.is_empty() {
            return chunks.clone();
        }
        a.fetch.prioritize(&promised);
        self.dirty.insert(file_id);
        let rest = chunks.difference(&promised);
        let Some(n) = self.neighbours.get_mut(&peer) else {
            return chunks.clone();
        };
        if let Some(old) = n.promise(file_id, request_id, &promised) {
            self.unavailable(peer, old.file_id, old.request_id, old.chunks);
        }
        rest
    }

    /// Withdraws promises this node can no longer keep for sure (the holder it was getting
    /// those chunks from left or will not send them): the neighbours ask elsewhere.
    pub(super) fn recheck_promises(&mut self) {
        let files: std::collections::BTreeSet<FileId> = self
            .neighbours
            .values()
            .flat_map(|n| n.promises.iter().map(|p| p.file_id))
            .collect();
        if files.is_empty() {
            return;
        }
        let allowed: std::collections::BTreeMap<FileId, ChunkRanges> = files
            .into_iter()
            .map(|id| {
                let ok = self
                    .downloads
                    .get(&id)
                    .map(|a| a.fetch.promisable_all())
                    .unwrap_or_default();
                (id, ok)
            })
            .collect();
        let mut dropped = Vec::new();
        for (peer, n) in self.neighbours.iter_mut() {
            n.promises.retain_mut(|p| {
                let keep = allowed
                    .get(&p.file_id)
                    .map(|ok| p.chunks.intersection(ok))
                    .unwrap_or_default();
                let lost = p.chunks.difference(&keep);
                if !lost.is_empty() {
                    dropped.push((*peer, p.file_id, p.request_id, lost));
                }
                p.chunks = keep;
                !p.chunks.is_empty()
            });
        }
        for (peer, file_id, request_id, lost) in dropped {
            self.unavailable(peer, file_id, request_id, lost);
        }
    }
}
