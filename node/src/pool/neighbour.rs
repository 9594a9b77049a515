//! Everything the engine knows about one connected neighbour, in one place: what it holds
//! and can relay, the chunks it asked for (a bounded queue of ranges), chunks in memory
//! waiting to go to it, what was promised to it, its super-seed share and its send credits.
//! A disconnect drops one entry.

use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

use tidepool_protocol::pool::{ChunkRanges, FileId};

use super::engine::ChunkData;

/// What a neighbour can fetch for us, learned from the offers it forwarded.
#[derive(Debug, Default, Clone)]
pub(super) struct Route {
    pub(super) via: ChunkRanges,
    /// The most hops left on an offer it forwarded: higher means nearer a holder.
    pub(super) hops: u8,
}

/// Chunks of one request, queued to be served from this node's copies.
#[derive(Debug)]
pub(super) struct Serve {
    pub(super) file_id: FileId,
    pub(super) request_id: u64,
    pub(super) ranges: ChunkRanges,
}

/// A verified chunk in memory, owed to this neighbour (relayed or promised).
#[derive(Debug)]
pub(super) struct Ready {
    pub(super) file_id: FileId,
    pub(super) request_id: u64,
    pub(super) index: u32,
    pub(super) chunk: ChunkData,
    /// Passed on from upstream (else served from this node's own download).
    pub(super) relayed: bool,
}

/// Chunks promised to this neighbour from a download here: sent as they arrive.
#[derive(Debug)]
pub(super) struct Promise {
    pub(super) file_id: FileId,
    pub(super) request_id: u64,
    pub(super) chunks: ChunkRanges,
}

/// A token bucket: `rate` per second, up to `burst`.
#[derive(Debug)]
pub(super) struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    pub(super) fn new(now: Instant, burst: u32) -> Self {
        Self {
            tokens: f64::from(burst),
            last: now,
        }
    }

    /// Takes one token if there is one.
    pub(super) fn take(&mut self, now: Instant, rate: u32, burst: u32) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * f64::from(rate)).min(f64::from(burst));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// One neighbour.
#[derive(Debug)]
pub(super) struct Neighbour {
    /// This connection's session number: sends and reads carry it back.
    pub(super) session: u64,
    /// Offers of files not in the catalog yet (a flood of new files would evict the
    /// honest ones), rate-limited apart from offers in general.
    pub(super) new_files: Bucket,
    /// What it holds of each file, from its own offers. Bounded by `max_files`.
    pub(super) holds: BTreeMap<FileId, ChunkRanges>,
    /// What it can fetch for us, from offers it forwarded. Bounded by `max_files`.
    pub(super) routes: BTreeMap<FileId, Route>,
    /// Requests to serve from held chunks, in order. `queued` chunks in all.
    pub(super) requests: VecDeque<Serve>,
    pub(super) queued: u64,
    /// Chunks in memory owed to it; at most `relay_queue`.
    pub(super) ready: VecDeque<Ready>,
    /// Promises of chunks from downloads here; at most `MAX_PROMISES` (the newest kept).
    pub(super) promises: Vec<Promise>,
    /// Chunks of files in their initial seeding pass given to it.
    pub(super) given: BTreeMap<FileId, ChunkRanges>,
    /// Disk reads for it not back yet, and chunks handed to its channel not yet sent.
    pub(super) reads: usize,
    /// In order, as the channel takes them: (file, chunk, relayed).
    pub(super) sending: VecDeque<(FileId, u32, bool)>,
    /// Offers it sent (rate-limited), and how many were ignored for the rate.
    pub(super) offers: Bucket,
    pub(super) offers_ignored: u64,
    /// Chunks it sent that nobody asked for, since the last one somebody did.
    pub(super) unsolicited: u64,
    /// Requests it sent that were refused for a full queue (logged on the first).
    pub(super) requests_refused: u64,
}

/// Promises kept per neighbour; a requester keeps a few requests per source open, and one
/// that asks for more gets the newest kept (the oldest is told Unavailable and re-asked).
pub(super) const MAX_PROMISES: usize = 64;

impl Neighbour {
    pub(super) fn new(now: Instant, offer_burst: u32, session: u64) -> Self {
        Self {
            session,
            new_files: Bucket::new(now, NEW_FILES_BURST),
            holds: BTreeMap::new(),
            routes: BTreeMap::new(),
            requests: VecDeque::new(),
            queued: 0,
            ready: VecDeque::new(),
            promises: Vec::new(),
            given: BTreeMap::new(),
            reads: 0,
            sending: VecDeque::new(),
            offers: Bucket::new(now, offer_burst),
            offers_ignored: 0,
            unsolicited: 0,
            requests_refused: 0,
        }
    }

    /// Records what it holds of `file_id`; a neighbour offering more than `max_files`
    /// files loses its oldest-keyed entry that is not this one (bounded, and an honest
    /// neighbour holds few files).
    pub(super) fn set_holds(&mut self, file_id: FileId, have: ChunkRanges, max_files: usize) {
        if !self.holds.contains_key(&file_id) && self.holds.len() >= max_files {
            self.holds.pop_first();
        }
        self.holds.insert(file_id, have);
    }

    /// Adds to what it can relay of `file_id`; bounded like `set_holds`.
    pub(super) fn add_route(
        &mut self,
        file_id: FileId,
        via: &ChunkRanges,
        hops: u8,
        max_files: usize,
    ) {
        if !self.routes.contains_key(&file_id) && self.routes.len() >= max_files {
            self.routes.pop_first();
        }
        // The latest word replaces the last (a union would grow with every offer).
        let r = self.routes.entry(file_id).or_default();
        r.via = via.clone();
        r.hops = r.hops.max(hops);
    }

    /// Queues `ranges` of a request to serve, if the queue has room for them; returns
    /// whether it did.
    pub(super) fn queue(&mut self, serve: Serve, max_chunks: u64) -> bool {
        let n = serve.ranges.len();
        if self.queued + n > max_chunks {
            self.requests_refused += 1;
            return false;
        }
        self.queued += n;
        self.requests.push_back(serve);
        true
    }

    /// Takes the next chunk to serve from the request queue.
    pub(super) fn next_request(&mut self) -> Option<(FileId, u64, u32)> {
        loop {
            let front = self.requests.front_mut()?;
            let Some(index) = front.ranges.first() else {
                self.requests.pop_front();
                continue;
            };
            front.ranges.remove(index..index + 1);
            self.queued = self.queued.saturating_sub(1);
            let item = (front.file_id, front.request_id, index);
            if front.ranges.is_empty() {
                self.requests.pop_front();
            }
            return Some(item);
        }
    }

    /// Drops a cancelled request's queued chunks and promises.
    pub(super) fn cancel(&mut self, file_id: FileId, request_id: u64) {
        let mut dropped = 0;
        self.requests.retain(|s| {
            let hit = s.request_id == request_id && s.file_id == file_id;
            if hit {
                dropped += s.ranges.len();
            }
            !hit
        });
        self.queued = self.queued.saturating_sub(dropped);
        self.ready
            .retain(|r| r.request_id != request_id || r.file_id != file_id);
        self.promises
            .retain(|p| p.request_id != request_id || p.file_id != file_id);
    }

    /// Adds `chunks` to the promise for `request_id`; returns the promise dropped to stay
    /// within the bound, if any.
    pub(super) fn promise(
        &mut self,
        file_id: FileId,
        request_id: u64,
        chunks: &ChunkRanges,
    ) -> Option<Promise> {
        if let Some(p) = self
            .promises
            .iter_mut()
            .find(|p| p.request_id == request_id && p.file_id == file_id)
        {
            p.chunks = p.chunks.union(chunks);
            return None;
        }
        let dropped = (self.promises.len() >= MAX_PROMISES).then(|| self.promises.remove(0));
        self.promises.push(Promise {
            file_id,
            request_id,
            chunks: chunks.clone(),
        });
        dropped
    }

    /// Chunks (reads and sends) in progress for it.
    pub(super) fn in_progress(&self) -> usize {
        self.reads + self.sending.len()
    }
}

/// New files a neighbour may introduce to the catalog per second, and in a burst.
pub(super) const NEW_FILES_RATE: u32 = 10;
/// See [`NEW_FILES_RATE`].
pub(super) const NEW_FILES_BURST: u32 = 100;

/// Files remembered per neighbour as held or relayable (a few in honest use).
pub(super) const MAX_FILES_PER_NEIGHBOUR: usize = 64;

/// How long a neighbour may keep sending chunks nobody asked for before it is dropped, in
/// chunks: a source may still be sending a cancelled request's tail (at most the
/// requester's in-flight bound), so only far past that is it hostile.
pub(super) const MAX_UNSOLICITED: u64 = 1024;
