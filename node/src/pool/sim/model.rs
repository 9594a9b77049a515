//! The simulator's models of what is not the engine: the disk (instant verification by a
//! token, re-hash at 1 GB/s) and the report of a run.

use bytes::Bytes;

use super::{Node, Sim, SimReport};
use crate::pool::engine::{ChunkData, DiskDone, DiskJob, Keep, ReadFrom, StoreFailure, Stored};

impl Sim {
    /// The disk model: instant verification (a chunk's token says whether it is good),
    /// re-hash at 1 GB/s.
    pub(super) fn disk(&mut self, i: usize, job: DiskJob) -> (Option<DiskDone>, u64) {
        let n = &mut self.nodes[i];
        match job {
            DiskJob::Open { file_id, .. } => (
                Some(DiskDone::Opened {
                    file_id,
                    result: Ok((n.have.clone(), n.have.clone())),
                }),
                0,
            ),
            DiskJob::Store(job) => {
                let result = if job.chunk.data.as_ref() != b"ok" {
                    self.bad_chunks += 1;
                    Err(StoreFailure::Bad("bad token".into()))
                } else {
                    let mut s = Stored {
                        new: false,
                        kept: n.whole,
                        cache: None,
                        evicted: Vec::new(),
                    };
                    if job.keep == Keep::Download && !n.whole {
                        s.new = !n.have.contains(job.index);
                        n.have.insert(job.index..job.index + 1);
                        s.kept = true;
                    }
                    Ok(s)
                };
                (Some(DiskDone::Stored { job, result }), 0)
            }
            DiskJob::Read(job) => {
                let held = match job.from {
                    ReadFrom::Whole => n.whole,
                    ReadFrom::Download => n.whole || n.have.contains(job.index),
                    ReadFrom::Cache => false,
                };
                let chunk = held.then(|| ChunkData {
                    data: Bytes::from_static(b"ok"),
                    proof: Vec::new(),
                });
                (Some(DiskDone::Read { job, chunk }), 0)
            }
            DiskJob::Finish { file_id } => {
                n.whole = true;
                let rehash = self.cfg.file_size; // ns at 1 GB/s
                (
                    Some(DiskDone::Finished {
                        file_id,
                        result: Ok(()),
                    }),
                    rehash,
                )
            }
            DiskJob::Close { .. } | DiskJob::EvictCache { .. } => (None, 0),
        }
    }

    pub(super) fn report(&self) -> SimReport {
        let survivors: Vec<&Node> = self.nodes[1..].iter().filter(|n| !n.gone).collect();
        let completed = survivors
            .iter()
            .filter(|n| n.finished_at.is_some() && n.whole)
            .count();
        let mut times: Vec<u64> = survivors
            .iter()
            .filter_map(|n| Some(n.finished_at?.saturating_sub(n.joined_at)))
            .collect();
        times.sort_unstable();
        let last = survivors
            .iter()
            .filter_map(|n| n.finished_at)
            .max()
            .unwrap_or(self.now);
        let needed = self.cfg.file_size as f64 * survivors.len().max(1) as f64;
        let received: u64 = self.nodes[1..]
            .iter()
            .map(|n| n.progress.received_bytes)
            .sum();
        let dups: u64 = self.nodes[1..].iter().map(|n| n.progress.duplicates).sum();
        let missing_rounds = self.nodes[1..]
            .iter()
            .map(|n| n.progress.missing_rounds)
            .sum();
        SimReport {
            survivors: survivors.len(),
            completed,
            virtual_secs: if completed == survivors.len() {
                last as f64 / 1e9
            } else {
                self.now as f64 / 1e9
            },
            median_secs: times.get(times.len() / 2).map_or(0.0, |t| *t as f64 / 1e9),
            received_ratio: received as f64 / needed,
            duplicate_pct: 100.0 * dups as f64
                / (f64::from(self.count) * survivors.len().max(1) as f64),
            missing_rounds,
            seeder_sent: self.seeder_sent,
            events: self.events,
            digest: self.digest,
            unfinished: self.nodes[1..]
                .iter()
                .enumerate()
                .filter(|(_, n)| !n.gone && n.finished_at.is_none())
                .map(|(i, n)| (i + 1, n.have.len()))
                .collect(),
            bad_chunks: self.bad_chunks,
            timeline: Vec::new(),
        }
    }
}
