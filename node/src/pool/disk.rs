//! The disk side of the pool's I/O shell: one thread that owns the files (whole files
//! shared here, downloads in progress, the relay cache) and runs the engine's disk jobs —
//! verify and store, read, open, finish — off the event loop. A finish re-hashes and
//! flushes the file on a thread of its own, so neither the event loop nor other disk jobs
//! wait for a large file. Results go back to the event loop as [`DiskDone`]s.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use tidepool_protocol::pool::FileId;
use tokio::sync::mpsc;

use super::engine::{
    ChunkData, DiskDone, DiskJob, Keep, ReadFrom, ReadJob, StoreFailure, StoreJob, Stored,
};
use crate::cache::RelayCache;
use crate::store::{PartialFile, SharedFile, StoreError};

/// What the disk thread is told.
pub(super) enum DiskMsg {
    /// A job from the engine.
    Job(DiskJob),
    /// Where a wanted file goes (sent before the engine can ask to open it).
    Target(FileId, PathBuf),
    /// A whole file to serve (sent before the engine hears of it).
    Share(Arc<SharedFile>),
    /// A finish's re-hash is done.
    Rehashed(FileId, Result<SharedFile, StoreError>),
    /// A download's files are open (its held chunks' proofs checked).
    Opened(FileId, Result<PartialFile, StoreError>),
    /// Close everything (saving downloads' state) and stop.
    Stop,
}

/// Numbers the pool reads from outside.
#[derive(Debug, Default)]
pub(super) struct DiskCounters {
    pub cached_bytes: AtomicU64,
}

pub(super) struct Disk {
    whole: HashMap<FileId, Arc<SharedFile>>,
    partial: HashMap<FileId, PartialFile>,
    targets: HashMap<FileId, PathBuf>,
    cache: Option<RelayCache>,
    corrupt_outgoing: bool,
    slow_finish: Duration,
    done: mpsc::UnboundedSender<DiskDone>,
    me: std_mpsc::Sender<DiskMsg>,
    counters: Arc<DiskCounters>,
}

/// Set when the pool stops: queued jobs are skipped, so stopping waits for one job at most.
pub(super) type Stopping = Arc<std::sync::atomic::AtomicBool>;

/// Starts the disk thread. `done` carries results to the event loop; its queue is bounded
/// by the engine, which has at most `disk_queue` stores, `send_window` reads per neighbour
/// and one open or finish per download out at once.
pub(super) fn start(
    cache: Option<RelayCache>,
    (corrupt_outgoing, slow_finish): (bool, Duration),
    done: mpsc::UnboundedSender<DiskDone>,
    counters: Arc<DiskCounters>,
    stopping: Stopping,
) -> std::io::Result<(std_mpsc::Sender<DiskMsg>, std::thread::JoinHandle<()>)> {
    let (tx, rx) = std_mpsc::channel();
    let disk = Disk {
        whole: HashMap::new(),
        partial: HashMap::new(),
        targets: HashMap::new(),
        cache,
        corrupt_outgoing,
        slow_finish,
        done,
        me: tx.clone(),
        counters,
    };
    let handle = std::thread::Builder::new()
        .name("tidepool-disk".into())
        .spawn(move || disk.run(rx, stopping))?;
    Ok((tx, handle))
}

impl Disk {
    fn run(mut self, rx: std_mpsc::Receiver<DiskMsg>, stopping: Stopping) {
        loop {
            if stopping.load(Relaxed) {
                return;
            }
            let msg = match rx.recv_timeout(Duration::from_millis(250)) {
                Ok(m) => Some(m),
                Err(std_mpsc::RecvTimeoutError::Timeout) => None,
                Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
            };
            match msg {
                Some(DiskMsg::Stop) => return,
                Some(m) => self.handle(m),
                None => {}
            }
            // A download gone quiet still records its last chunks.
            for p in self.partial.values_mut() {
                if let Err(e) = p.save_state_if_due() {
                    tracing::warn!("saving download state: {e}");
                }
            }
        }
    }

    fn reply(&self, d: DiskDone) {
        // The event loop is gone only when the pool is stopping.
        let _ = self.done.send(d);
    }

    fn handle(&mut self, msg: DiskMsg) {
        match msg {
            DiskMsg::Target(id, path) => {
                self.targets.entry(id).or_insert(path);
            }
            DiskMsg::Share(f) => {
                let id = f.id();
                if let Some(c) = self.cache.as_mut() {
                    c.evict(&id);
                }
                self.whole.insert(id, f);
            }
            DiskMsg::Rehashed(file_id, result) => self.finished(file_id, result),
            DiskMsg::Opened(file_id, result) => {
                let result = result
                    .map(|mut part| {
                        if let Some(c) = self.cache.as_mut() {
                            adopt_cached(c, &mut part);
                        }
                        let r = (part.have().clone(), part.servable().clone());
                        self.partial.insert(file_id, part);
                        r
                    })
                    .map_err(|e| e.to_string());
                self.reply(DiskDone::Opened { file_id, result });
            }
            DiskMsg::Job(job) => self.job(job),
            DiskMsg::Stop => {}
        }
        if let Some(c) = &self.cache {
            self.counters.cached_bytes.store(c.used(), Relaxed);
        }
    }

    fn job(&mut self, job: DiskJob) {
        match job {
            DiskJob::Open { file_id, meta } => {
                let Some(target) = self.targets.get(&file_id).cloned() else {
                    self.reply(DiskDone::Opened {
                        file_id,
                        result: Err("no target path for the download".into()),
                    });
                    return;
                };
                // Resuming checks every held chunk against its proof: on a thread of its
                // own, so reads and stores for everyone else go on meanwhile.
                let me = self.me.clone();
                let spawned = std::thread::Builder::new()
                    .name("tidepool-open".into())
                    .spawn(move || {
                        let _ =
                            me.send(DiskMsg::Opened(file_id, PartialFile::open(&target, &meta)));
                    });
                if let Err(e) = spawned {
                    self.reply(DiskDone::Opened {
                        file_id,
                        result: Err(e.to_string()),
                    });
                }
            }
            DiskJob::Store(job) => {
                let result = self.store(&job);
                self.reply(DiskDone::Stored { job, result });
            }
            DiskJob::Read(job) => {
                let chunk = self.read(&job);
                self.reply(DiskDone::Read { job, chunk });
            }
            DiskJob::Finish { file_id } => {
                let Some(part) = self.partial.get(&file_id) else {
                    self.reply(DiskDone::Finished {
                        file_id,
                        result: Err("no such download".into()),
                    });
                    return;
                };
                let (path, meta) = (part.part_path().to_owned(), part.meta().clone());
                let (me, slow) = (self.me.clone(), self.slow_finish);
                // Re-hashing a large file takes a while: on its own thread, reading through
                // its own handle, while this thread keeps serving from the `.part` file.
                let spawned = std::thread::Builder::new()
                    .name("tidepool-rehash".into())
                    .spawn(move || {
                        std::thread::sleep(slow);
                        let f =
                            SharedFile::open_as(&path, &meta).and_then(|f| f.sync().map(|()| f));
                        let _ = me.send(DiskMsg::Rehashed(file_id, f));
                    });
                if let Err(e) = spawned {
                    self.finished(file_id, Err(crate::store::io_err(&PathBuf::new())(e)));
                }
            }
            DiskJob::Close { file_id } => {
                // Dropping it records what it holds for the next run.
                self.partial.remove(&file_id);
                self.targets.remove(&file_id);
            }
            DiskJob::EvictCache { file_id } => {
                if let Some(c) = self.cache.as_mut() {
                    c.evict(&file_id);
                }
            }
        }
    }

    /// The re-hash of a complete download is done: move it into place, serve it whole.
    fn finished(&mut self, file_id: FileId, rehashed: Result<SharedFile, StoreError>) {
        self.targets.remove(&file_id);
        let Some(part) = self.partial.remove(&file_id) else {
            return;
        };
        let target = part.target().to_owned();
        let result = rehashed.and_then(|shared| {
            part.finish()?;
            Ok(shared.at(&target))
        });
        let result = match result {
            Ok(shared) => {
                if let Some(c) = self.cache.as_mut() {
                    c.evict(&file_id);
                }
                self.whole.insert(file_id, Arc::new(shared));
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        };
        self.reply(DiskDone::Finished { file_id, result });
    }

    fn store(&mut self, job: &StoreJob) -> Result<Stored, StoreFailure> {
        let (index, data, proof) = (job.index, &job.chunk.data, &job.chunk.proof);
        let verify = || {
            job.meta
                .verify_chunk(index, data, proof)
                .map_err(|e| StoreFailure::Bad(e.to_string()))
        };
        let mut stored = Stored {
            new: false,
            kept: false,
            cache: None,
            evicted: Vec::new(),
        };
        match job.keep {
            Keep::Download => match self.partial.get_mut(&job.file_id) {
                Some(part) => match part.write_chunk(index, data, proof) {
                    Ok(new) => {
                        stored.new = new;
                        stored.kept = part.servable().contains(index);
                    }
                    Err(StoreError::Verify(e)) => return Err(StoreFailure::Bad(e.to_string())),
                    Err(e) => return Err(StoreFailure::Io(e.to_string())),
                },
                None => {
                    verify()?;
                    stored.kept = self.whole.contains_key(&job.file_id);
                }
            },
            Keep::Cache => {
                verify()?;
                if let Some(c) = self.cache.as_mut() {
                    match c.insert(&job.meta, index, data, proof) {
                        Ok(evicted) => stored.evicted = evicted,
                        Err(e) => tracing::warn!("relay cache: {e}"),
                    }
                    stored.cache = c.have(&job.file_id).cloned();
                    stored.kept = stored.cache.as_ref().is_some_and(|h| h.contains(index));
                }
            }
            Keep::Nowhere => {
                verify()?;
                stored.kept = self.whole.contains_key(&job.file_id);
            }
        }
        Ok(stored)
    }

    fn read(&mut self, job: &ReadJob) -> Option<ChunkData> {
        let (id, index) = (&job.file_id, job.index);
        let read = match job.from {
            ReadFrom::Whole => self.whole.get(id).and_then(|f| f.read_chunk(index).ok()),
            ReadFrom::Download => match self.partial.get(id) {
                Some(p) => p.read_chunk(index).ok().flatten(),
                // Finished meanwhile: it is whole now.
                None => self.whole.get(id).and_then(|f| f.read_chunk(index).ok()),
            },
            ReadFrom::Cache => self.cache.as_mut().and_then(|c| c.read_chunk(id, index)),
        };
        let (mut data, proof) = read?;
        if self.corrupt_outgoing
            && let Some(b) = data.first_mut()
        {
            *b ^= 0xff;
        }
        Some(ChunkData {
            data: data.into(),
            proof,
        })
    }
}

/// Moves chunks the relay cache holds of a file into its new download, and drops them
/// from the cache.
fn adopt_cached(cache: &mut RelayCache, part: &mut PartialFile) {
    let id = part.meta().file_id();
    let Some(held) = cache.have(&id).map(|h| h.difference(part.have())) else {
        return;
    };
    for index in held.iter() {
        if let Some((data, proof)) = cache.read_chunk(&id, index)
            && let Err(e) = part.write_chunk(index, &data, &proof)
        {
            tracing::warn!("adopting cached chunk {index}: {e}");
        }
    }
    cache.evict(&id);
}
