//! How chunks move through the engine: a chunk that arrives goes to the disk side to be
//! verified and kept, and comes back to be counted, passed down a relay path and handed to
//! neighbours it was promised to; each neighbour's pump hands its channel at most
//! `send_window` chunks at a time (reads and sends in progress), chunks in memory first.

use std::collections::BTreeMap;

use tidepool_protocol::PeerId;
use tidepool_protocol::pool::{ChunkRanges, FileId};

use super::engine::{
    Active, ChunkData, DiskDone, DiskJob, Keep, Output, PoolEngine, ReadFrom, ReadJob,
    StoreFailure, StoreJob, Stored, Whole, chunk_bytes,
};
use super::neighbour::{MAX_UNSOLICITED, Ready, Serve};
use crate::fetch::Fetch;

impl PoolEngine {
    /// A chunk arrived on `peer`'s chunk channel.
    pub(super) fn on_chunk(
        &mut self,
        peer: PeerId,
        file_id: FileId,
        request_id: u64,
        index: u32,
        chunk: ChunkData,
    ) {
        let relayed = self
            .relays
            .get(request_id)
            .is_some_and(|r| r.file_id == file_id && r.upstream == peer);
        let download = self.downloads.get(&file_id).filter(|a| !a.finishing);
        let (keep, relay) = if relayed {
            let keep = if self.whole.contains_key(&file_id) {
                Keep::Nowhere
            } else if download.is_some_and(|a| a.fetch.unrequested(index)) {
                Keep::Download
            } else if self.config.cache_bytes > 0 && !self.downloads.contains_key(&file_id) {
                // A file downloaded here is offered as that, never as a cached subset.
                Keep::Cache
            } else {
                Keep::Nowhere
            };
            (keep, Some(request_id))
        } else if download.is_some_and(|a| !a.fetch.have().contains(index)) {
            (Keep::Download, None)
        } else {
            // Nobody here asked for it: a cancelled request's tail, a copy that came
            // another way first — or a peer pushing chunks at us.
            // It is not verified, so it touches no download's state (a source could keep a
            // stalled request looking alive with junk).
            self.stats.chunks_unsolicited += 1;
            let Some(n) = self.neighbours.get_mut(&peer) else {
                return;
            };
            n.unsolicited += 1;
            if n.unsolicited > MAX_UNSOLICITED {
                self.drop_peer(
                    peer,
                    format!("sent {MAX_UNSOLICITED} chunks in a row that nobody asked for"),
                );
            }
            return;
        };
        if let Some(n) = self.neighbours.get_mut(&peer) {
            n.unsolicited = 0;
        }
        let Some(meta) = self.meta(&file_id) else {
            return;
        };
        if self.storing >= self.config.disk_queue {
            // The disk is behind: the requester re-asks for it after a stall.
            self.stats.chunks_dropped_disk_busy += 1;
            return;
        }
        self.storing += 1;
        self.out.push_back(Output::Disk(DiskJob::Store(StoreJob {
            peer,
            file_id,
            meta,
            request_id,
            index,
            chunk,
            keep,
            relay,
        })));
    }

    pub(super) fn on_disk(&mut self, done: DiskDone) {
        match done {
            DiskDone::Stored { job, result } => {
                self.storing = self.storing.saturating_sub(1);
                self.on_stored(job, result);
            }
            DiskDone::Read { job, chunk } => {
                let Some(n) = self
                    .neighbours
                    .get_mut(&job.peer)
                    .filter(|n| n.session == job.session)
                else {
                    // Read for a connection that is gone.
                    return;
                };
                n.reads = n.reads.saturating_sub(1);
                match chunk {
                    Some(chunk) => {
                        n.sending.push_back((job.file_id, job.index, false));
                        self.out.push_back(Output::SendChunk {
                            peer: job.peer,
                            session: job.session,
                            file_id: job.file_id,
                            request_id: job.request_id,
                            index: job.index,
                            chunk,
                            relayed: false,
                        });
                    }
                    None => {
                        tracing::info!(peer = ?job.peer, job.index, "asked for a chunk not held here any more");
                        let one = ChunkRanges::from_range(job.index..job.index + 1);
                        self.unavailable(job.peer, job.file_id, job.request_id, one);
                    }
                }
                self.pump(job.peer);
            }
            DiskDone::Opened { file_id, result } => self.on_opened(file_id, result),
            DiskDone::Finished { file_id, result } => {
                self.publish(file_id);
                let Some(a) = self.downloads.remove(&file_id) else {
                    return;
                };
                // What the relay cache held of it is no longer offered as a subset.
                self.cache.remove(&file_id);
                self.cache_offered.remove(&file_id);
                if result.is_ok()
                    && let Ok(count) = a.meta.chunk_count()
                {
                    self.whole.insert(
                        file_id,
                        Whole {
                            meta: a.meta.clone(),
                            count,
                            super_seed: false,
                            sent_once: ChunkRanges::new(),
                        },
                    );
                    let o = self.offer(&a.meta, ChunkRanges::full(count), self.config.offer_hops);
                    self.send_all(&o, None);
                    self.keep_promises_whole(file_id);
                }
                self.recheck_promises();
                self.out.push_back(Output::Finished { file_id, result });
            }
        }
    }

    fn on_opened(&mut self, file_id: FileId, result: Result<(ChunkRanges, ChunkRanges), String>) {
        let Some(meta) = self.opening.remove(&file_id) else {
            return;
        };
        // The disk side moved what the relay cache held of it into the download.
        self.cache.remove(&file_id);
        self.cache_offered.remove(&file_id);
        let started = result.and_then(|(have, servable)| {
            let first_id = self.rng.u64(1..u64::MAX / 2);
            let mut fetch = Fetch::new(&meta, have, self.config.fetch.clone(), self.now, first_id)
                .map_err(|e| e.to_string())?;
            fetch.start_at(self.rng.u32(..));
            Ok((fetch, servable))
        });
        let (mut fetch, servable) = match started {
            Ok(s) => s,
            Err(e) => {
                self.out.push_back(Output::Finished {
                    file_id,
                    result: Err(e),
                });
                return;
            }
        };
        for (p, n) in &self.neighbours {
            if let Some(r) = n.routes.get(&file_id) {
                fetch.add_relay(*p, r.via.clone());
            }
            if let Some(h) = n.holds.get(&file_id) {
                fetch.add_source(*p, h.clone());
            }
        }
        tracing::debug!(?file_id, sources = fetch.source_count(), "download started");
        self.downloads.insert(
            file_id,
            Active {
                meta,
                fetch,
                servable,
                received: 0,
                offered: ChunkRanges::new(),
                last_offer: self.now,
                finishing: false,
            },
        );
        self.dirty.insert(file_id);
    }

    fn on_stored(&mut self, job: StoreJob, result: Result<Stored, StoreFailure>) {
        let s = match result {
            Ok(s) => s,
            Err(StoreFailure::Bad(e)) => {
                self.stats.bad_chunks += 1;
                if self.neighbours.contains_key(&job.peer) {
                    self.drop_peer(
                        job.peer,
                        format!("sent chunk {} that failed verification: {e}", job.index),
                    );
                }
                return;
            }
            Err(StoreFailure::Io(e)) => {
                // Not kept: the download re-asks for it after a stall.
                tracing::error!("storing chunk {}: {e}", job.index);
                return;
            }
        };
        if let Some(have) = &s.cache {
            self.cache.insert(job.file_id, have.clone());
        }
        for id in &s.evicted {
            self.cache.remove(id);
        }
        let index = job.index;
        if job.keep == Keep::Download
            && let Some(a) = self.downloads.get_mut(&job.file_id)
        {
            a.received += chunk_bytes(&job.meta, index..index + 1);
            if s.kept {
                a.servable.insert(index..index + 1);
            }
            let request_id = if job.relay.is_some() {
                0
            } else {
                job.request_id
            };
            a.fetch.on_chunk(self.now, &job.peer, request_id, index);
            self.dirty.insert(job.file_id);
            if s.new {
                self.fulfil(job.file_id, index, &job.chunk);
            }
        }
        let Some(up_id) = job.relay else {
            return;
        };
        let Some(r) = self.relays.get_mut(up_id) else {
            return;
        };
        r.outstanding.remove(index..index + 1);
        let (down, down_id, empty) = (r.downstream, r.downstream_id, r.outstanding.is_empty());
        if empty {
            self.relays.remove(up_id);
        }
        self.send_ready(down, down_id, job.file_id, index, job.chunk, true, s.kept);
    }

    /// A download became whole: what is still promised of it is served from the file, as
    /// requests (told Unavailable instead, the neighbours would stop asking here until the
    /// next full offer).
    fn keep_promises_whole(&mut self, file_id: FileId) {
        let max = self.config.request_queue;
        let mut refused = Vec::new();
        let peers: Vec<PeerId> = self.neighbours.keys().copied().collect();
        for peer in &peers {
            let Some(n) = self.neighbours.get_mut(peer) else {
                continue;
            };
            let (due, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut n.promises)
                .into_iter()
                .partition(|p| p.file_id == file_id);
            n.promises = keep;
            for p in due {
                let serve = Serve {
                    file_id,
                    request_id: p.request_id,
                    ranges: p.chunks.clone(),
                };
                if !n.queue(serve, max) {
                    refused.push((*peer, p.request_id, p.chunks));
                }
            }
        }
        for (peer, request_id, chunks) in refused {
            self.unavailable(peer, file_id, request_id, chunks);
        }
        for peer in peers {
            self.pump(peer);
        }
    }

    /// Sends chunk `index`, just written to a download, to the neighbours it was promised to.
    fn fulfil(&mut self, file_id: FileId, index: u32, chunk: &ChunkData) {
        let mut due = Vec::new();
        for (peer, n) in self.neighbours.iter_mut() {
            n.promises.retain_mut(|p| {
                if p.file_id == file_id && p.chunks.contains(index) {
                    p.chunks.remove(index..index + 1);
                    due.push((*peer, p.request_id));
                }
                !p.chunks.is_empty()
            });
        }
        for (peer, request_id) in due {
            self.send_ready(peer, request_id, file_id, index, chunk.clone(), false, true);
        }
    }

    /// Queues a verified chunk in memory for `peer`. When its queue is full (the neighbour
    /// is slower than the chunks arrive), a chunk kept on disk goes later as a request of
    /// one chunk (ranges only), and one not kept is dropped and the neighbour told so.
    #[allow(clippy::too_many_arguments)]
    fn send_ready(
        &mut self,
        peer: PeerId,
        request_id: u64,
        file_id: FileId,
        index: u32,
        chunk: ChunkData,
        relayed: bool,
        kept: bool,
    ) {
        let (relay_queue, max) = (self.config.relay_queue, self.config.request_queue);
        let Some(n) = self.neighbours.get_mut(&peer) else {
            return;
        };
        if n.ready.len() < relay_queue {
            n.ready.push_back(Ready {
                file_id,
                request_id,
                index,
                chunk,
                relayed,
            });
        } else {
            let later = Serve {
                file_id,
                request_id,
                ranges: ChunkRanges::from_range(index..index + 1),
            };
            if !kept || !n.queue(later, max) {
                self.stats.ready_dropped += 1;
                tracing::info!(?peer, index, "queues full; dropped a chunk");
                let one = ChunkRanges::from_range(index..index + 1);
                self.unavailable(peer, file_id, request_id, one);
                return;
            }
        }
        self.pump(peer);
    }

    pub(super) fn on_sent(&mut self, peer: PeerId, session: u64, ok: bool) {
        if !ok {
            self.stats.sends_failed += 1;
        }
        // A send of an earlier connection to the same peer returns no credit of this one.
        let Some(n) = self
            .neighbours
            .get_mut(&peer)
            .filter(|n| n.session == session)
        else {
            return;
        };
        let sent = n.sending.pop_front();
        if let Some((file_id, index, relayed)) = sent
            && ok
        {
            // Counted once the channel took it: a chunk queued for a neighbour that left
            // was not uploaded.
            if let Some(m) = self.meta(&file_id) {
                let len = chunk_bytes(&m, index..index + 1);
                if relayed {
                    self.stats.relayed_bytes += len;
                } else {
                    self.stats.served_bytes += len;
                }
                if let Some(w) = self.whole.get_mut(&file_id)
                    && !w.sent_once.contains(index)
                {
                    w.sent_once.insert(index..index + 1);
                    self.stats.served_distinct_bytes += len;
                }
            }
        }
        self.pump(peer);
    }

    /// Hands `peer`'s channel more chunks while it has fewer than `send_window` in
    /// progress: owed chunks in memory first, then reads of requested ones.
    pub(super) fn pump(&mut self, peer: PeerId) {
        let window = self.config.send_window.max(1);
        let mut gone: BTreeMap<(FileId, u64), ChunkRanges> = BTreeMap::new();
        while let Some(n) = self.neighbours.get_mut(&peer) {
            if n.in_progress() >= window {
                break;
            }
            if let Some(r) = n.ready.pop_front() {
                n.sending.push_back((r.file_id, r.index, r.relayed));
                self.out.push_back(Output::SendChunk {
                    peer,
                    session: n.session,
                    file_id: r.file_id,
                    request_id: r.request_id,
                    index: r.index,
                    chunk: r.chunk,
                    relayed: r.relayed,
                });
                continue;
            }
            let Some((file_id, request_id, index)) = n.next_request() else {
                break;
            };
            let from = if self.whole.contains_key(&file_id) {
                if !self.give_once(peer, file_id, index) {
                    None
                } else {
                    Some(ReadFrom::Whole)
                }
            } else if self
                .downloads
                .get(&file_id)
                .is_some_and(|a| a.servable.contains(index))
            {
                Some(ReadFrom::Download)
            } else if self.cache.get(&file_id).is_some_and(|c| c.contains(index)) {
                Some(ReadFrom::Cache)
            } else {
                None
            };
            let Some(from) = from else {
                gone.entry((file_id, request_id))
                    .or_default()
                    .insert(index..index + 1);
                continue;
            };
            let Some(n) = self.neighbours.get_mut(&peer) else {
                break;
            };
            n.reads += 1;
            let session = n.session;
            self.out.push_back(Output::Disk(DiskJob::Read(ReadJob {
                peer,
                session,
                file_id,
                request_id,
                index,
                from,
            })));
        }
        for ((file_id, request_id), chunks) in gone {
            self.unavailable(peer, file_id, request_id, chunks);
        }
    }

    /// Whether chunk `index` of a whole file may go to `peer` now: always, except in the
    /// file's initial seeding pass for a chunk already given to a neighbour still here. The
    /// pass ends when every chunk has been given out; the full offer then goes out again,
    /// so neighbours told Unavailable ask here again.
    fn give_once(&mut self, peer: PeerId, file_id: FileId, index: u32) -> bool {
        let Some(w) = self.whole.get_mut(&file_id) else {
            return true;
        };
        if !w.super_seed {
            return true;
        }
        // The same neighbour may ask again (a chunk lost on its way): nobody else has it.
        let elsewhere = self
            .neighbours
            .iter()
            .any(|(p, n)| *p != peer && n.given.get(&file_id).is_some_and(|g| g.contains(index)));
        if elsewhere {
            return false;
        }
        if let Some(n) = self.neighbours.get_mut(&peer) {
            n.given.entry(file_id).or_default().insert(index..index + 1);
        }
        // A chunk goes to one neighbour only, so the sets are disjoint: their sizes add up.
        let given_out: u64 = self
            .neighbours
            .values()
            .filter_map(|n| n.given.get(&file_id))
            .map(ChunkRanges::len)
            .sum();
        let Some(w) = self.whole.get_mut(&file_id) else {
            return true;
        };
        if given_out >= u64::from(w.count) {
            tracing::info!(?file_id, "initial seeding done: every chunk given out once");
            w.super_seed = false;
            let (meta, count) = (w.meta.clone(), w.count);
            for n in self.neighbours.values_mut() {
                n.given.remove(&file_id);
            }
            let o = self.offer(&meta, ChunkRanges::full(count), self.config.offer_hops);
            self.send_all(&o, None);
        }
        true
    }
}
