//! The engine's clock and its downloads: offers repeated now and then, partial and cache
//! re-offers, each download's fetch polled and its outputs turned into messages, progress
//! published, and downloads that fail closed.

use std::sync::Arc;
use std::time::Instant;

use tidepool_protocol::pool::{ChunkRanges, FileId, FileMeta, PoolMessage};

use super::Progress;
use super::engine::{DiskJob, Output, PoolEngine, TICK, chunk_bytes};
use crate::fetch::FetchOutput;

impl PoolEngine {
    /// The timer: offers repeated now and then, downloads' stall checks, partial and cache
    /// re-offers.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = self.now.max(now);
        if now < self.last_tick + TICK {
            return;
        }
        self.last_tick = now;
        let interval = self.config.reoffer_interval;
        if self
            .last_full_offer
            .is_none_or(|t| now.duration_since(t) >= interval * 5)
        {
            self.last_full_offer = Some(now);
            // Offers heard from farther away go again with their original sequence number,
            // so only neighbours that missed them act on them.
            let whole = &self.whole;
            for m in self
                .gossip
                .recent_heard(self.config.regossip, |id| whole.contains_key(id))
            {
                self.send_all(&m, None);
            }
            // Holders re-announce with a fresh sequence number and the full hop budget.
            for o in self.whole_offers() {
                self.send_all(&o, None);
            }
        }
        // Downloaders serve each other: tell neighbours what a download holds now.
        let due: Vec<(Arc<FileMeta>, ChunkRanges)> = self
            .downloads
            .values_mut()
            .filter(|a| now.duration_since(a.last_offer) >= interval && a.servable != a.offered)
            .map(|a| {
                a.last_offer = now;
                a.offered = a.servable.clone();
                (a.meta.clone(), a.offered.clone())
            })
            .collect();
        for (meta, have) in due {
            let o = self.offer(&meta, have, 0);
            self.send_all(&o, None);
        }
        self.offer_cached(now);
        self.poll_downloads(true);
    }

    /// Tells neighbours what the relay cache holds now, and retracts what it evicted.
    fn offer_cached(&mut self, now: Instant) {
        if self
            .last_cache_offer
            .is_some_and(|t| now.duration_since(t) < self.config.reoffer_interval)
        {
            return;
        }
        self.last_cache_offer = Some(now);
        let gone: Vec<FileId> = self
            .cache_offered
            .keys()
            .filter(|id| !self.cache.contains_key(id))
            .copied()
            .collect();
        for file_id in gone {
            self.cache_offered.remove(&file_id);
            self.seq += 1;
            let retract = PoolMessage::FileRetract {
                origin: self.me,
                seq: self.seq,
                hops: 0,
                file_id,
            };
            self.send_all(&retract, None);
        }
        let changed: Vec<(FileId, ChunkRanges)> = self
            .cache
            .iter()
            .filter(|(id, have)| {
                self.cache_offered.get(id) != Some(have)
                    && !self.downloads.contains_key(id)
                    && !self.whole.contains_key(id)
            })
            .map(|(id, have)| (*id, have.clone()))
            .collect();
        for (id, have) in changed {
            let Some(meta) = self.gossip.meta(&id).cloned() else {
                continue;
            };
            self.cache_offered.insert(id, have.clone());
            let o = self.offer(&meta, have, 0);
            self.send_all(&o, None);
        }
    }

    /// Polls the fetch of every dirty download (every download on a tick) and turns its
    /// outputs into messages.
    pub(super) fn poll_downloads(&mut self, all: bool) {
        let ids: Vec<FileId> = if all {
            self.downloads.keys().copied().collect()
        } else {
            std::mem::take(&mut self.dirty).into_iter().collect()
        };
        if all {
            // Progress of touched downloads is published below.
            for id in std::mem::take(&mut self.dirty) {
                self.publish(id);
            }
        }
        let now = self.now;
        let hops = self.config.offer_hops + 1;
        let mut out = Vec::new();
        for id in ids {
            let Some(a) = self.downloads.get_mut(&id) else {
                continue;
            };
            a.fetch.poll(now, &mut out);
            if !all {
                self.publish(id);
            }
            for o in out.drain(..) {
                match o {
                    FetchOutput::Request {
                        source,
                        request_id,
                        ranges,
                        from_origin,
                        attempt,
                    } => {
                        if attempt > 0 {
                            tracing::info!(
                                ?source,
                                attempt,
                                chunks = ranges.len(),
                                "re-requesting after a stall"
                            );
                        }
                        self.send(
                            source,
                            PoolMessage::FileRequest {
                                request_id,
                                requester: self.me,
                                file_id: id,
                                requested: ranges,
                                promised: ChunkRanges::new(),
                                from_origin,
                                // An offer reaches offer_hops + 1 nodes away (the last one does
                                // not forward it), so the route can be that long.
                                hops_left: hops,
                            },
                        )
                    }
                    FetchOutput::Missing {
                        source,
                        request_id,
                        ranges,
                    } => {
                        tracing::info!(
                            ?source,
                            request_id,
                            missing = ranges.len(),
                            "request stalled; chunks missing"
                        );
                        self.send(
                            source,
                            PoolMessage::ChunksMissing {
                                request_id,
                                file_id: id,
                                missing: ranges,
                            },
                        )
                    }
                    FetchOutput::Cancel { source, request_id } => self.send(
                        source,
                        PoolMessage::Cancel {
                            request_id,
                            file_id: id,
                        },
                    ),
                    FetchOutput::Done => {
                        if let Some(a) = self.downloads.get_mut(&id) {
                            a.finishing = true;
                        }
                        self.out
                            .push_back(Output::Disk(DiskJob::Finish { file_id: id }));
                    }
                    FetchOutput::Failed(why) => self.fail_download(id, why),
                }
            }
        }
    }

    /// Ends a download that cannot finish: neighbours promised its chunks ask elsewhere.
    pub(super) fn fail_download(&mut self, id: FileId, why: String) {
        let Some(a) = self.downloads.remove(&id) else {
            return;
        };
        drop(a);
        self.recheck_promises();
        self.out
            .push_back(Output::Disk(DiskJob::Close { file_id: id }));
        self.out.push_back(Output::Finished {
            file_id: id,
            result: Err(why),
        });
    }

    pub(super) fn publish(&mut self, id: FileId) {
        let Some(a) = self.downloads.get(&id) else {
            return;
        };
        let meta = &a.meta;
        let have_bytes = a
            .fetch
            .have()
            .ranges()
            .iter()
            .map(|r| chunk_bytes(meta, r.clone()))
            .sum();
        self.out.push_back(Output::Progress {
            file_id: id,
            progress: Progress {
                have_bytes,
                total_bytes: meta.size,
                received_bytes: a.received,
                duplicates: a.fetch.duplicates,
                missing_rounds: a.fetch.missing_rounds,
                sources: a.fetch.source_count(),
            },
        });
    }
}
