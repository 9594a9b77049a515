//! The sans-IO core of one download: which chunks to ask which source for, when a request
//! has stalled, when to ask the origin directly, when to give up. Inputs are sources coming
//! and going, chunks arriving (already verified) and the time; outputs are pushed into the
//! caller's buffer. No sockets, no clocks: the I/O shell drives it.
//!
//! Policy (DESIGN §5): requests are spread over every source that holds the chunks, at most
//! `max_in_flight` chunks per source, so a download uses the mesh rather than one path; each
//! source is asked for about `request_queue_time` of what it delivers (libtorrent's request
//! queue time), so a slow or lossy link holds few chunks and the rest go to faster ones. A
//! request that makes no progress for `missing_after`, from a source that sent nothing else
//! meanwhile either (a busy source serves requests in order), is re-requested — exactly its missing
//! ranges: from another source when one holds them, else from the same source with a
//! chunks-missing report on the same request; after `origin_after` misses in a row the
//! re-request asks the origin directly; with no progress at all for `give_up_after` the
//! download fails with a clear error.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tidepool_protocol::pool::{ChunkRanges, FileMeta};

/// Tunables of a download.
#[derive(Debug, Clone)]
pub struct FetchConfig {
    /// A request silent this long is re-requested (chunksMissing).
    pub missing_after: Duration,
    /// Misses in a row before a re-request asks the origin directly.
    pub origin_after: u32,
    /// No chunk at all for this long fails the download.
    pub give_up_after: Duration,
    /// Chunks outstanding per source, at most.
    pub max_in_flight: u64,
    /// Each source is asked for what it delivers in about this long (its measured rate),
    /// within `min_in_flight..=max_in_flight`; before a rate is known, a quarter of
    /// `max_in_flight` (at least `min_in_flight`). Zero: always `max_in_flight`.
    pub request_queue_time: Duration,
    /// Chunks outstanding per source, at least (unless `request_queue_time` is zero).
    pub min_in_flight: u64,
    /// Relays are asked only after nothing missing has been held by a direct source for
    /// this long. A relay's upstream queue is shared by everyone it relays for, so relayed
    /// requests wait long and stall; a neighbour that holds chunks is soon offered.
    pub relay_after: Duration,
}

impl Default for FetchConfig {
    fn default() -> Self {
        Self {
            missing_after: Duration::from_secs(5),
            origin_after: 3,
            give_up_after: Duration::from_secs(120),
            max_in_flight: 64,
            request_queue_time: Duration::from_secs(3),
            min_in_flight: 2,
            relay_after: Duration::from_secs(2),
        }
    }
}

/// What the shell should do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchOutput<P> {
    /// Send a file request for `ranges` to `source`.
    Request {
        /// Where to.
        source: P,
        /// Fresh id for this request.
        request_id: u64,
        /// The chunks.
        ranges: ChunkRanges,
        /// Ask the origin directly (after repeated misses).
        from_origin: bool,
        /// Which re-request this is (0 for the first ask).
        attempt: u32,
    },
    /// Tell `source` which chunks of `request_id` have not arrived (chunksMissing); the
    /// request stays open with it.
    Missing {
        /// Where to.
        source: P,
        /// The stalled request.
        request_id: u64,
        /// Exactly the chunks still outstanding.
        ranges: ChunkRanges,
    },
    /// Tell `source` to stop sending for `request_id` (its chunks were reassigned).
    Cancel {
        /// Where to.
        source: P,
        /// The request.
        request_id: u64,
    },
    /// Every chunk is in.
    Done,
    /// The download cannot finish.
    Failed(String),
}

/// How fast one source delivers: chunks over stretches of at least `PACE_PERIOD` while it
/// owes us chunks. A stretch opens at the first chunk after we gave an idle source work, so
/// the wait for that chunk is not counted (else a source far away would be asked for less
/// and less); gaps while it still owes us count, as slowness. A stall — a request silent for
/// `missing_after` — halves the rate, once until the source delivers again.
#[derive(Debug, Clone, Copy, Default)]
struct Pace {
    /// Chunks per second, smoothed; `None` until a stretch was measured or a stall seen.
    rate: Option<f64>,
    /// The chunk that opened the current stretch (`None`: none open).
    since: Option<Instant>,
    /// Chunks since `since`.
    count: u64,
    /// Stalled, and nothing delivered since.
    stalled: bool,
}

/// Shortest stretch a delivery rate is measured over.
const PACE_PERIOD: Duration = Duration::from_millis(500);

impl Pace {
    fn on_chunk(&mut self, now: Instant) {
        self.stalled = false;
        let Some(since) = self.since else {
            self.since = Some(now);
            self.count = 0;
            return;
        };
        self.count += 1;
        let elapsed = now.duration_since(since);
        if elapsed >= PACE_PERIOD {
            let sample = self.count as f64 / elapsed.as_secs_f64();
            self.rate = Some(self.rate.map_or(sample, |r| (r + sample) / 2.0));
            self.since = Some(now);
            self.count = 0;
        }
    }

    /// We gave work to a source that had none of ours: what it does next opens a stretch.
    fn on_idle_request(&mut self) {
        self.since = None;
    }

    /// A request to it stalled. With no rate yet it gets the floor's rate (`floor` chunks
    /// per `request_queue_time`), not zero, so its first real sample is not halved away.
    fn on_stall(&mut self, c: &FetchConfig) {
        if self.stalled {
            return;
        }
        self.stalled = true;
        let floor = c.min_in_flight.max(1) as f64 / c.request_queue_time.as_secs_f64().max(1e-3);
        self.rate = Some(self.rate.map_or(floor, |r| r / 2.0));
        self.since = None;
    }

    /// Chunks to keep outstanding at this source.
    fn allowance(&self, c: &FetchConfig) -> u64 {
        let max = c.max_in_flight.max(1);
        if c.request_queue_time.is_zero() {
            return max;
        }
        match self.rate {
            None => (max / 4).max(c.min_in_flight).clamp(1, max),
            Some(r) => ((r * c.request_queue_time.as_secs_f64()).ceil() as u64)
                .clamp(c.min_in_flight.clamp(1, max), max),
        }
    }
}

#[derive(Debug)]
struct InFlight<P> {
    source: P,
    outstanding: ChunkRanges,
    last_progress: Instant,
    attempt: u32,
}

/// One download's state. `P` identifies a source (a peer id in the node).
#[derive(Debug)]
pub struct Fetch<P> {
    config: FetchConfig,
    all: ChunkRanges,
    have: ChunkRanges,
    /// Each source, the chunks it holds itself, and the chunks it can fetch from farther
    /// away on our behalf (a relay). A neighbour can be both.
    sources: Vec<(P, ChunkRanges, ChunkRanges)>,
    /// When a chunk last arrived from each source: a request queued behind others at a
    /// busy source is waiting, not stalled.
    heard_from: Vec<(P, Instant)>,
    /// Each source's delivery rate (at most one entry per source in `sources`, made when
    /// it is first asked, removed with it).
    pace: Vec<(P, Pace)>,
    in_flight: BTreeMap<u64, InFlight<P>>,
    /// Chunks waiting for a source.
    waiting: Waiting,
    next_request_id: u64,
    last_progress: Instant,
    next_source: usize,
    /// Since when no direct source has held anything missing (relays wait for this).
    direct_dry_since: Option<Instant>,
    finished: bool,
    /// Chunks that arrived twice (a cost the pipeline should keep low).
    pub duplicates: u64,
    /// Re-requests made after a stall.
    pub missing_rounds: u64,
}

impl<P: Clone + Eq + std::fmt::Debug> Fetch<P> {
    /// A download of `meta`, resuming with the chunks in `have`.
    pub fn new(
        meta: &FileMeta,
        have: ChunkRanges,
        config: FetchConfig,
        now: Instant,
        first_request_id: u64,
    ) -> Result<Self, tidepool_protocol::pool::VerifyError> {
        let all = ChunkRanges::full(meta.chunk_count()?);
        let want = all.difference(&have);
        Ok(Self {
            config,
            waiting: Waiting {
                all: want,
                ..Waiting::default()
            },
            all,
            have,
            sources: Vec::new(),
            heard_from: Vec::new(),
            pace: Vec::new(),
            in_flight: BTreeMap::new(),
            next_request_id: first_request_id,
            last_progress: now,
            next_source: 0,
            direct_dry_since: None,
            finished: false,
            duplicates: 0,
            missing_rounds: 0,
        })
    }

    /// Chunks held.
    pub fn have(&self) -> &ChunkRanges {
        &self.have
    }

    /// Sources known.
    pub fn source_count(&self) -> usize {
        self.sources.len()
    }

    /// Whether chunk `index` is neither held nor asked of anyone yet (a copy that passes
    /// through this node for someone else is worth keeping then).
    pub fn unrequested(&self, index: u32) -> bool {
        // A missing chunk is either waiting or in flight.
        self.waiting.all.contains(index)
    }

    /// Whether every chunk is in.
    pub fn is_complete(&self) -> bool {
        self.have == self.all
    }

    /// `source` holds `ranges` itself. Replaces what was known it holds.
    pub fn add_source(&mut self, source: P, ranges: ChunkRanges) {
        match self.sources.iter_mut().find(|(s, ..)| *s == source) {
            Some(entry) => entry.1 = ranges,
            None => self.sources.push((source, ranges, ChunkRanges::new())),
        }
    }

    /// `source` can fetch `ranges` from farther away for us. It is asked for those only
    /// when no source holds them itself: a relay adds a path, not a copy, and every byte
    /// it passes on costs the pool twice. Replaces what was known it relays.
    pub fn add_relay(&mut self, source: P, ranges: ChunkRanges) {
        match self.sources.iter_mut().find(|(s, ..)| *s == source) {
            Some(entry) => entry.2 = ranges,
            None => self.sources.push((source, ChunkRanges::new(), ranges)),
        }
    }

    /// Starts handing out chunks at `index` rather than at the first missing one (wrapping
    /// around), so downloads that start together fetch different chunks first and have
    /// something to trade.
    pub fn start_at(&mut self, index: u32) {
        let n = self.all.len() as u32;
        if n > 0 {
            self.waiting.start = index % n;
            self.waiting.count = n;
        }
    }

    /// Of `ranges`, the chunks this download will get from a source that holds them
    /// itself: missing here, held by a source, and not in flight through a relay. Only
    /// those may be promised to a neighbour: a promise that waits on a relay can wait on
    /// another promise, and promises around a cycle would wait on each other for good.
    pub fn promisable(&self, ranges: &ChunkRanges) -> ChunkRanges {
        ranges.intersection(&self.promisable_all())
    }

    /// Every chunk [`Fetch::promisable`] would allow: checking many promises against this
    /// once is cheaper than asking for each.
    pub fn promisable_all(&self) -> ChunkRanges {
        let direct = self
            .sources
            .iter()
            .fold(ChunkRanges::new(), |acc, (_, holds, _)| acc.union(holds));
        let mut out = direct.difference(&self.have);
        for f in self.in_flight.values() {
            let relayed = match self.sources.iter().find(|(s, ..)| *s == f.source) {
                Some((_, holds, _)) => f.outstanding.difference(holds),
                None => f.outstanding.clone(),
            };
            if !relayed.is_empty() {
                out = out.difference(&relayed);
            }
        }
        out
    }

    /// Moves `ranges` (those still waiting) to the front of the queue: a neighbour asked
    /// this node for them, and is served from this download's copy as they arrive.
    pub fn prioritize(&mut self, ranges: &ChunkRanges) {
        let urgent = self.waiting.all.intersection(ranges);
        if !urgent.is_empty() {
            self.waiting.urgent = self.waiting.urgent.union(&urgent);
        }
    }

    /// `source` will not send `chunks` of `request_id` after all: they go back to the
    /// waiting list at once, and that source is not asked for them again until it offers
    /// them anew.
    /// Returns whether anything changed.
    pub fn unavailable(&mut self, source: &P, request_id: u64, chunks: &ChunkRanges) -> bool {
        let Some(f) = self.in_flight.get_mut(&request_id) else {
            return false;
        };
        if f.source != *source {
            return false;
        }
        let lost = f.outstanding.intersection(chunks);
        if lost.is_empty() {
            return false;
        }
        f.outstanding = f.outstanding.difference(&lost);
        let attempt = f.attempt;
        if let Some((_, holds, via)) = self.sources.iter_mut().find(|(s, ..)| s == source) {
            *holds = holds.difference(&lost);
            *via = via.difference(&lost);
        }
        self.waiting.push(&lost, attempt);
        true
    }

    /// `source` is gone: what it owed goes back to the waiting list at once.
    pub fn remove_source(&mut self, source: &P) {
        self.sources.retain(|(s, ..)| s != source);
        self.heard_from.retain(|(s, _)| s != source);
        self.pace.retain(|(s, _)| s != source);
        let lost: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, f)| f.source == *source)
            .map(|(id, _)| *id)
            .collect();
        for id in lost {
            if let Some(f) = self.in_flight.remove(&id)
                && !f.outstanding.is_empty()
            {
                self.waiting.push(&f.outstanding, f.attempt);
            }
        }
    }

    /// A verified chunk arrived from `from` for `request_id`. Returns false for a duplicate.
    /// Only the source asked under that id gets credit for it (progress, its rate).
    pub fn on_chunk(&mut self, now: Instant, from: &P, request_id: u64, index: u32) -> bool {
        if let Some(f) = self.in_flight.get_mut(&request_id)
            && f.source == *from
        {
            f.outstanding.remove(index..index + 1);
            f.last_progress = now;
            match self.heard_from.iter_mut().find(|(s, _)| *s == f.source) {
                Some(entry) => entry.1 = now,
                None => self.heard_from.push((f.source.clone(), now)),
            }
            if let Some((_, pace)) = self.pace.iter_mut().find(|(s, _)| *s == f.source) {
                pace.on_chunk(now);
            }
            if f.outstanding.is_empty() {
                self.in_flight.remove(&request_id);
            }
        }
        if self.have.contains(index) || !self.all.contains(index) {
            self.duplicates += 1;
            return false;
        }
        self.have.insert(index..index + 1);
        self.last_progress = now;

        // A chunk that came another way is no longer wanted from anyone.
        self.waiting.remove_one(index);
        for f in self.in_flight.values_mut() {
            f.outstanding.remove(index..index + 1);
        }
        true
    }

    /// Advances timers and hands out work; call after every input and on a tick.
    pub fn poll(&mut self, now: Instant, out: &mut Vec<FetchOutput<P>>) {
        if self.finished {
            return;
        }
        if self.is_complete() {
            self.finished = true;
            for (id, f) in std::mem::take(&mut self.in_flight) {
                out.push(FetchOutput::Cancel {
                    source: f.source,
                    request_id: id,
                });
            }
            out.push(FetchOutput::Done);
            return;
        }
        if now.duration_since(self.last_progress) >= self.config.give_up_after {
            self.finished = true;
            let missing = self.all.difference(&self.have);
            out.push(FetchOutput::Failed(format!(
                "no chunk arrived for {:?}; {} of {} chunks still missing ({:?}), {} sources known",
                self.config.give_up_after,
                missing.len(),
                self.all.len(),
                missing.take_first(64),
                self.sources.len(),
            )));
            return;
        }
        self.in_flight.retain(|_, f| !f.outstanding.is_empty());
        let quiet = |source: &P| {
            self.heard_from
                .iter()
                .find(|(s, _)| s == source)
                .is_none_or(|(_, t)| now.duration_since(*t) >= self.config.missing_after)
        };
        let stalled: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, f)| {
                now.duration_since(f.last_progress) >= self.config.missing_after && quiet(&f.source)
            })
            .map(|(id, _)| *id)
            .collect();
        // A stalled source is asked for less: its rate halves once per silence, however many
        // of its requests stall in it.
        let mut slowed: Vec<P> = Vec::new();
        for id in &stalled {
            if let Some(f) = self.in_flight.get(id)
                && !slowed.contains(&f.source)
            {
                slowed.push(f.source.clone());
            }
        }
        for source in &slowed {
            if let Some((_, pace)) = self.pace.iter_mut().find(|(s, _)| s == source) {
                pace.on_stall(&self.config);
            }
        }
        for id in stalled {
            let Some(f) = self.in_flight.get_mut(&id) else {
                continue;
            };
            self.missing_rounds += 1;
            let attempt = f.attempt + 1;
            // Nobody else holds these chunks: tell the same source exactly what is missing
            // (chunksMissing keeps the request and its relay path), until it is time to ask
            // the origin with a fresh request.
            let source = f.source.clone();
            let elsewhere = self.sources.iter().any(|(s, holds, via)| {
                *s != source && !holds.union(via).intersection(&f.outstanding).is_empty()
            });
            let still_source = self.sources.iter().any(|(s, ..)| *s == source);
            if attempt < self.config.origin_after && still_source && !elsewhere {
                f.attempt = attempt;
                f.last_progress = now;
                out.push(FetchOutput::Missing {
                    source,
                    request_id: id,
                    ranges: f.outstanding.clone(),
                });
                continue;
            }
            if let Some(f) = self.in_flight.remove(&id) {
                out.push(FetchOutput::Cancel {
                    source: f.source.clone(),
                    request_id: id,
                });
                // Prefer someone else next time: rotate past the silent source, and stop
                // counting on it for chunks another source holds until it offers them anew
                // (a peer that announces chunks it never sends is asked for each once).
                if let Some(pos) = self.sources.iter().position(|(s, ..)| *s == f.source) {
                    self.next_source = pos + 1;
                    if elsewhere {
                        let (_, holds, via) = &mut self.sources[pos];
                        *holds = holds.difference(&f.outstanding);
                        *via = via.difference(&f.outstanding);
                    }
                }
                self.waiting.push(&f.outstanding, f.attempt + 1);
            }
        }
        self.assign(now, out);
    }

    /// Gives waiting ranges to sources with room, round robin, so chunks come over several
    /// paths at once.
    fn assign(&mut self, now: Instant, out: &mut Vec<FetchOutput<P>>) {
        if self.sources.is_empty() {
            return;
        }
        let n = self.sources.len();
        let direct = self
            .sources
            .iter()
            .fold(ChunkRanges::new(), |acc, (_, holds, _)| acc.union(holds));
        let direct_in_flight = self.in_flight.values().any(|f| {
            self.sources
                .iter()
                .any(|(s, holds, _)| *s == f.source && holds.contains_all(&f.outstanding))
        });
        let relays = if direct_in_flight || !direct.intersection(&self.waiting.all).is_empty() {
            self.direct_dry_since = None;
            false
        } else {
            let since = *self.direct_dry_since.get_or_insert(now);
            now.duration_since(since) >= self.config.relay_after
        };
        // What every source but one holds, for each one: unions before and after it.
        let mut prefix = vec![ChunkRanges::new(); n + 1];
        let mut suffix = vec![ChunkRanges::new(); n + 1];
        for i in 0..n {
            prefix[i + 1] = prefix[i].union(&self.sources[i].1);
            suffix[n - 1 - i] = suffix[n - i].union(&self.sources[n - 1 - i].1);
        }
        let mut busy: Vec<u64> = vec![0; n];
        for f in self.in_flight.values() {
            if let Some(i) = self.sources.iter().position(|(s, ..)| *s == f.source) {
                busy[i] += f.outstanding.len();
            }
        }
        let mut idle_rounds = 0;
        while !self.waiting.all.is_empty() && idle_rounds < n {
            let i = self.next_source % n;
            self.next_source = i + 1;
            let pace = match self.pace.iter().position(|(s, _)| *s == self.sources[i].0) {
                Some(p) => p,
                None => {
                    self.pace.push((self.sources[i].0.clone(), Pace::default()));
                    self.pace.len() - 1
                }
            };
            let allowance = self.pace[pace].1.allowance(&self.config);
            let room = allowance.saturating_sub(busy[i]);
            // A source with a deep queue gets more once a quarter of it has drained, not a
            // request per chunk that arrived: one request then carries many chunks, and
            // every hop on its path does its work once for them.
            let min_batch = (allowance / 4).max(1);
            if room == 0 || (busy[i] > 0 && room < min_batch) {
                idle_rounds += 1;
                continue;
            }
            let (source, holds, via) = &self.sources[i];
            // Rarest first, roughly: what only this source holds goes first, so a source
            // many share (a seeder) spends its upload on chunks nobody else can give.
            let others = prefix[i].union(&suffix[i + 1]);
            let prefer = holds.difference(&others);
            let holds = if relays {
                holds.union(&via.difference(&direct))
            } else {
                holds.clone()
            };
            let Some((ranges, attempt)) = self.waiting.take(&holds, &prefer, room) else {
                idle_rounds += 1;
                continue;
            };
            idle_rounds = 0;
            let source = source.clone();
            if busy[i] == 0 {
                self.pace[pace].1.on_idle_request();
            }
            busy[i] += ranges.len();
            let request_id = self.next_request_id;
            self.next_request_id += 1;
            self.in_flight.insert(
                request_id,
                InFlight {
                    source: source.clone(),
                    outstanding: ranges.clone(),
                    last_progress: now,
                    attempt,
                },
            );
            out.push(FetchOutput::Request {
                source,
                request_id,
                ranges,
                from_origin: attempt >= self.config.origin_after,
                attempt,
            });
        }
    }
}

/// The chunks waiting for a source: one set, the urgent ones (a neighbour waits for them
/// here) asked for first, the rest from a start point on (wrapping), with the attempt
/// count of those re-requested after a stall. Sets, not a list of pieces, so the cost of
/// handing out work does not grow with the number of stalls and promises.
#[derive(Debug, Default)]
struct Waiting {
    all: ChunkRanges,
    urgent: ChunkRanges,
    /// Attempt count → chunks with it (attempt 0, the common case, is not stored).
    retried: BTreeMap<u32, ChunkRanges>,
    start: u32,
    count: u32,
}

impl Waiting {
    fn push(&mut self, r: &ChunkRanges, attempt: u32) {
        if r.is_empty() {
            return;
        }
        self.all = self.all.union(r);
        if attempt > 0 {
            let e = self.retried.entry(attempt).or_default();
            *e = e.union(r);
        }
    }

    fn remove_one(&mut self, index: u32) {
        self.all.remove(index..index + 1);
        self.urgent.remove(index..index + 1);
        for set in self.retried.values_mut() {
            set.remove(index..index + 1);
        }
        self.retried.retain(|_, set| !set.is_empty());
    }

    fn remove(&mut self, r: &ChunkRanges) {
        self.all = self.all.difference(r);
        if !self.urgent.is_empty() {
            self.urgent = self.urgent.difference(r);
        }
        if !self.retried.is_empty() {
            for set in self.retried.values_mut() {
                *set = set.difference(r);
            }
            self.retried.retain(|_, set| !set.is_empty());
        }
    }

    /// Takes up to `room` chunks held in `holds`: urgent ones first, then from the start
    /// point on. Returns them with the highest attempt count among them.
    fn take(
        &mut self,
        holds: &ChunkRanges,
        prefer: &ChunkRanges,
        room: u64,
    ) -> Option<(ChunkRanges, u32)> {
        let candidates = self.all.intersection(holds);
        if candidates.is_empty() {
            return None;
        }
        let mut taken = self.urgent.intersection(&candidates).take_first(room);
        let from_start = ChunkRanges::from_range(self.start..self.count.max(self.start));
        for pool in [candidates.intersection(prefer), candidates] {
            if taken.len() >= room {
                break;
            }
            let rest = pool.difference(&taken);
            let after = rest.intersection(&from_start);
            let before = rest.difference(&after);
            for part in [after, before] {
                let more = part.take_first(room - taken.len());
                taken = taken.union(&more);
                if taken.len() >= room {
                    break;
                }
            }
        }
        let attempt = self
            .retried
            .iter()
            .rev()
            .find(|(_, set)| !set.intersection(&taken).is_empty())
            .map_or(0, |(a, _)| *a);
        self.remove(&taken);
        Some((taken, attempt))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(chunks: u32) -> FileMeta {
        FileMeta {
            name: "f".into(),
            size: u64::from(chunks) * 10,
            chunk_size: 10,
            root: [0; 32],
        }
    }

    fn config() -> FetchConfig {
        FetchConfig {
            missing_after: Duration::from_secs(5),
            origin_after: 3,
            give_up_after: Duration::from_secs(60),
            max_in_flight: 4,
            request_queue_time: Duration::ZERO,
            min_in_flight: 1,
            relay_after: Duration::ZERO,
        }
    }

    /// The default pacing: 3 s of each source's rate, 2..=64 chunks.
    fn paced() -> FetchConfig {
        FetchConfig {
            max_in_flight: 64,
            request_queue_time: Duration::from_secs(3),
            min_in_flight: 2,
            ..config()
        }
    }

    /// A chunk arriving from whoever was asked for `request_id`.
    fn chunk(f: &mut Fetch<u8>, now: Instant, request_id: u64, index: u32) -> bool {
        let from = f.in_flight.get(&request_id).map_or(0, |r| r.source);
        f.on_chunk(now, &from, request_id, index)
    }

    fn requests(out: &[FetchOutput<u8>]) -> Vec<(u8, u64, Vec<u32>, bool)> {
        out.iter()
            .filter_map(|o| match o {
                FetchOutput::Request {
                    source,
                    request_id,
                    ranges,
                    from_origin,
                    ..
                } => Some((*source, *request_id, ranges.iter().collect(), *from_origin)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn requests_spread_over_sources_within_the_in_flight_bound() {
        let t = Instant::now();
        let mut f = Fetch::new(&meta(10), ChunkRanges::new(), config(), t, 1).expect("shape");
        f.add_source(1u8, ChunkRanges::full(10));
        f.add_source(2u8, ChunkRanges::full(10));
        let mut out = Vec::new();
        f.poll(t, &mut out);
        let r = requests(&out);
        assert_eq!(r.len(), 2, "4 chunks to each source, 2 kept back: {r:?}");
        assert!(r.iter().any(|x| x.0 == 1) && r.iter().any(|x| x.0 == 2));
        assert!(r.iter().all(|x| x.2.len() == 4 && !x.3));
        // Room frees as chunks arrive; the rest goes out then, every chunk asked once.
        let first = r[0].clone();
        for i in &first.2 {
            assert!(chunk(&mut f, t, first.1, *i));
        }
        out.clear();
        f.poll(t, &mut out);
        let more = requests(&out);
        assert_eq!(more.len(), 1);
        let asked: ChunkRanges = r.iter().chain(&more).flat_map(|x| x.2.clone()).collect();
        assert_eq!(asked, ChunkRanges::full(10));
    }

    #[test]
    fn prioritized_chunks_are_asked_for_first() {
        let t = Instant::now();
        let mut f = Fetch::new(&meta(20), ChunkRanges::new(), config(), t, 1).expect("shape");
        f.prioritize(&ChunkRanges::from_range(12..14));
        f.add_source(1u8, ChunkRanges::full(20));
        let mut out = Vec::new();
        f.poll(t, &mut out);
        let mut r = requests(&out);
        let first: Vec<u32> = r.iter().flat_map(|x| x.2.clone()).collect();
        assert!(
            first.contains(&12) && first.contains(&13),
            "asked-for chunks go in the first request: {r:?}"
        );
        assert_eq!(first.len(), 4, "within the in-flight bound");
        // Every chunk is still asked for exactly once in the end.
        let mut asked = first;
        while asked.len() < 20 {
            for (_, id, chunks, _) in &r {
                for i in chunks {
                    assert!(chunk(&mut f, t, *id, *i));
                }
            }
            out.clear();
            f.poll(t, &mut out);
            r = requests(&out);
            assert!(!r.is_empty());
            asked.extend(r.iter().flat_map(|x| x.2.clone()));
        }
        asked.sort_unstable();
        assert_eq!(asked, (0..20).collect::<Vec<u32>>());
    }

    #[test]
    fn chunks_a_source_says_will_not_come_are_asked_of_another_at_once() {
        let t = Instant::now();
        let mut f = Fetch::new(&meta(4), ChunkRanges::new(), config(), t, 1).expect("shape");
        f.add_relay(1u8, ChunkRanges::full(4));
        let mut out = Vec::new();
        f.poll(t, &mut out);
        let r = requests(&out);
        assert_eq!(r.len(), 1);
        f.add_relay(2u8, ChunkRanges::full(4));
        // The relay lost its path to 2..4; another relay is asked right away, no stall.
        f.unavailable(&1u8, r[0].1, &ChunkRanges::from_range(2..4));
        out.clear();
        f.poll(t, &mut out);
        let again = requests(&out);
        assert_eq!(again.len(), 1, "{again:?}");
        assert_eq!((again[0].0, again[0].2.clone()), (2u8, vec![2, 3]));
        // From another source (or a stale id) it changes nothing.
        f.unavailable(&1u8, again[0].1, &ChunkRanges::from_range(2..4));
        out.clear();
        f.poll(t, &mut out);
        assert!(requests(&out).is_empty());
    }

    #[test]
    fn only_chunks_coming_from_a_holder_are_promisable() {
        let t = Instant::now();
        let mut f =
            Fetch::new(&meta(12), ChunkRanges::from_range(0..2), config(), t, 1).expect("shape");
        // Source 1 holds 2..6 itself; source 2 only relays 6..12 from farther away.
        f.add_source(1u8, ChunkRanges::from_range(2..6));
        f.add_relay(2u8, ChunkRanges::from_range(6..12));
        let all = ChunkRanges::full(12);
        assert_eq!(f.promisable(&all), ChunkRanges::from_range(2..6));
        let mut out = Vec::new();
        f.poll(t, &mut out);
        // The relay waits while a holder has chunks to give.
        let r = requests(&out);
        assert_eq!(r, vec![(1, 1, vec![2, 3, 4, 5], false)]);
        assert_eq!(f.promisable(&all), ChunkRanges::from_range(2..6));
        for i in 2..6 {
            assert!(chunk(&mut f, t, 1, i));
        }
        out.clear();
        f.poll(t, &mut out);
        assert_eq!(requests(&out), vec![(2, 2, vec![6, 7, 8, 9], false)]);
        assert!(f.promisable(&all).is_empty());
        // Source 1 comes to hold 6..12: 6..10 are in flight through the relay, so they
        // wait on it and are not promisable; 10..12 are.
        f.add_source(1u8, ChunkRanges::from_range(2..12));
        assert_eq!(f.promisable(&all), ChunkRanges::from_range(10..12));
    }

    #[test]
    fn only_sources_holding_a_chunk_are_asked_for_it() {
        let t = Instant::now();
        let mut f =
            Fetch::new(&meta(6), ChunkRanges::from_range(0..2), config(), t, 1).expect("shape");
        f.add_source(1u8, ChunkRanges::from_range(0..4));
        f.add_source(2u8, ChunkRanges::from_range(4..6));
        let mut out = Vec::new();
        f.poll(t, &mut out);
        let mut r = requests(&out);
        r.sort();
        assert_eq!(
            r.iter().map(|x| (x.0, x.2.clone())).collect::<Vec<_>>(),
            vec![(1, vec![2, 3]), (2, vec![4, 5])]
        );
    }

    #[test]
    fn stalls_re_request_exactly_the_missing_chunks_elsewhere_then_from_origin() {
        let t = Instant::now();
        let mut cfg = config();
        cfg.max_in_flight = 10;
        let mut f = Fetch::new(&meta(4), ChunkRanges::new(), cfg, t, 1).expect("shape");
        f.add_source(1u8, ChunkRanges::full(4));
        let mut out = Vec::new();
        f.poll(t, &mut out);
        let first = requests(&out);
        assert_eq!(first, vec![(1, 1, vec![0, 1, 2, 3], false)]);
        assert!(chunk(&mut f, t + Duration::from_secs(1), 1, 0));
        assert!(chunk(&mut f, t + Duration::from_secs(1), 1, 2));
        f.add_source(2u8, ChunkRanges::full(4));
        // Silent for missing_after since the last chunk: chunks 1 and 3 go to source 2.
        out.clear();
        f.poll(t + Duration::from_secs(6), &mut out);
        assert!(out.contains(&FetchOutput::Cancel {
            source: 1,
            request_id: 1
        }));
        assert_eq!(requests(&out), vec![(2, 2, vec![1, 3], false)]);
        // Two more silent rounds, then the re-request asks the origin.
        let mut now = t + Duration::from_secs(6);
        let mut last = Vec::new();
        for _ in 0..2 {
            now += Duration::from_secs(5);
            out.clear();
            f.poll(now, &mut out);
            last = requests(&out);
        }
        assert_eq!(last.len(), 1);
        assert_eq!(last[0].2, vec![1, 3]);
        assert!(last[0].3, "third miss in a row asks from_origin");
        assert_eq!(f.missing_rounds, 3);
    }

    #[test]
    fn a_lone_source_gets_chunks_missing_on_the_same_request_then_an_origin_request() {
        let t = Instant::now();
        let mut cfg = config();
        cfg.max_in_flight = 10;
        let mut f = Fetch::new(&meta(4), ChunkRanges::new(), cfg, t, 1).expect("shape");
        f.add_source(1u8, ChunkRanges::full(4));
        let mut out = Vec::new();
        f.poll(t, &mut out);
        assert!(chunk(&mut f, t, 1, 1));
        let mut now = t;
        for round in 1..=2 {
            now += Duration::from_secs(5);
            out.clear();
            f.poll(now, &mut out);
            assert_eq!(
                out,
                vec![FetchOutput::Missing {
                    source: 1,
                    request_id: 1,
                    ranges: [0, 2, 3].into_iter().collect(),
                }],
                "round {round}"
            );
        }
        // A chunk on the open request still counts.
        assert!(chunk(&mut f, now, 1, 2));
        now += Duration::from_secs(5);
        out.clear();
        f.poll(now, &mut out);
        assert!(out.contains(&FetchOutput::Cancel {
            source: 1,
            request_id: 1
        }));
        assert_eq!(requests(&out), vec![(1, 2, vec![0, 3], true)]);
        assert_eq!(f.missing_rounds, 3);
    }

    #[test]
    fn relays_wait_while_a_holder_has_chunks_then_get_what_no_holder_has() {
        let t = Instant::now();
        let mut cfg = config();
        cfg.max_in_flight = 10;
        cfg.relay_after = Duration::from_secs(2);
        let mut f = Fetch::new(&meta(6), ChunkRanges::new(), cfg, t, 1).expect("shape");
        f.start_at(4);
        f.add_relay(1u8, ChunkRanges::full(6));
        f.add_source(2u8, ChunkRanges::from_range(0..3));
        // A neighbour can hold some chunks and relay others.
        f.add_source(3u8, ChunkRanges::from_range(5..6));
        f.add_relay(3u8, ChunkRanges::full(6));
        let mut out = Vec::new();
        f.poll(t, &mut out);
        let mut r: Vec<(u8, Vec<u32>)> = requests(&out).into_iter().map(|x| (x.0, x.2)).collect();
        r.sort();
        // Holders first; relays wait while a holder has something to give.
        assert_eq!(r, vec![(2, vec![0, 1, 2]), (3, vec![5])]);
        for (_, id, chunks, _) in requests(&out) {
            for i in chunks {
                chunk(&mut f, t, id, i);
            }
        }
        // Nothing left at a holder: the relays get 3 and 4 once `relay_after` has passed.
        out.clear();
        f.poll(t + Duration::from_secs(1), &mut out);
        assert!(requests(&out).is_empty(), "too soon for relays");
        f.poll(t + Duration::from_secs(3), &mut out);
        let r: Vec<(u8, Vec<u32>)> = requests(&out).into_iter().map(|x| (x.0, x.2)).collect();
        assert_eq!(
            r.iter().flat_map(|x| x.1.clone()).collect::<Vec<_>>().len(),
            2
        );
        assert!(r.iter().all(|(s, _)| *s == 1 || *s == 3), "{r:?}");
    }

    #[test]
    fn a_request_queued_behind_others_at_a_busy_source_is_not_a_stall() {
        let t = Instant::now();
        let mut cfg = config();
        cfg.max_in_flight = 2;
        let mut f = Fetch::new(&meta(6), ChunkRanges::new(), cfg, t, 1).expect("shape");
        f.add_source(1u8, ChunkRanges::full(6));
        let mut out = Vec::new();
        f.poll(t, &mut out);
        assert_eq!(requests(&out), vec![(1, 1, vec![0, 1], false)]);
        let s = Duration::from_secs;
        assert!(chunk(&mut f, t + s(1), 1, 0));
        out.clear();
        f.poll(t + s(1), &mut out);
        assert_eq!(requests(&out), vec![(1, 2, vec![2], false)]);
        // Request 2 has seen nothing for 6 s, but the source sent request 1's chunk 1 s ago.
        assert!(chunk(&mut f, t + s(6), 1, 1));
        out.clear();
        f.poll(t + s(7), &mut out);
        assert!(
            !out.iter()
                .any(|o| matches!(o, FetchOutput::Missing { .. } | FetchOutput::Cancel { .. })),
            "{out:?}"
        );
        // Silent as a whole for missing_after: now it is a stall.
        out.clear();
        f.poll(t + s(11), &mut out);
        assert!(out.contains(&FetchOutput::Missing {
            source: 1,
            request_id: 2,
            ranges: [2].into_iter().collect(),
        }));
    }

    #[test]
    fn a_lost_source_returns_its_chunks_and_duplicates_are_counted() {
        let t = Instant::now();
        let mut f = Fetch::new(&meta(4), ChunkRanges::new(), config(), t, 1).expect("shape");
        f.add_source(1u8, ChunkRanges::full(4));
        let mut out = Vec::new();
        f.poll(t, &mut out);
        f.remove_source(&1);
        f.add_source(2u8, ChunkRanges::full(4));
        out.clear();
        f.poll(t, &mut out);
        assert_eq!(requests(&out), vec![(2, 2, vec![0, 1, 2, 3], false)]);
        for i in 0..4 {
            assert!(chunk(&mut f, t, 2, i));
        }
        assert!(!chunk(&mut f, t, 2, 1), "duplicate");
        assert_eq!(f.duplicates, 1);
        out.clear();
        f.poll(t, &mut out);
        assert_eq!(out, vec![FetchOutput::Done]);
        out.clear();
        f.poll(t, &mut out);
        assert!(out.is_empty(), "Done once");
    }

    #[test]
    fn no_progress_for_the_budget_fails_with_what_is_missing() {
        let t = Instant::now();
        let mut f: Fetch<u8> =
            Fetch::new(&meta(3), ChunkRanges::new(), config(), t, 1).expect("shape");
        let mut out = Vec::new();
        f.poll(t + Duration::from_secs(61), &mut out);
        match out.as_slice() {
            [FetchOutput::Failed(msg)] => {
                assert!(msg.contains("3 of 3 chunks still missing"), "{msg}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_slow_source_is_asked_for_a_few_seconds_of_its_rate_and_a_fast_one_for_the_most() {
        let cfg = paced();
        let t0 = Instant::now();
        let mut f = Fetch::new(&meta(100_000), ChunkRanges::new(), cfg, t0, 1).expect("shape");
        f.add_source(1u8, ChunkRanges::full(100_000));
        f.add_source(2u8, ChunkRanges::full(100_000));
        // Chunks asked of each source, in the order it serves them.
        let mut queues: [std::collections::VecDeque<(u64, u32)>; 2] = Default::default();
        let mut out = Vec::new();
        let outstanding =
            |q: &[std::collections::VecDeque<(u64, u32)>; 2]| [q[0].len(), q[1].len()];
        let (mut first, mut last, mut slow_most) = (None, [0, 0], 0);
        // 30 s in 10 ms steps: source 1 delivers 20 chunks a step (2,000/s), source 2 one
        // every 600 ms (1.7/s: chunks come further apart than a measuring period).
        for step in 0..3000u32 {
            let base = t0 + Duration::from_millis(10 * u64::from(step));
            // Like the engine: a poll after every input, and on the tick.
            let mut poll =
                |f: &mut Fetch<u8>,
                 now,
                 queues: &mut [std::collections::VecDeque<(u64, u32)>; 2]| {
                    out.clear();
                    f.poll(now, &mut out);
                    for (source, id, ranges, _) in requests(&out) {
                        queues[usize::from(source - 1)].extend(ranges.into_iter().map(|i| (id, i)));
                    }
                };
            poll(&mut f, base, &mut queues);
            first.get_or_insert(outstanding(&queues));
            last = outstanding(&queues);
            if step >= 2000 {
                slow_most = slow_most.max(last[1]);
            }
            for k in 0..20u64 {
                let now = base + Duration::from_micros(500 * k);
                if let Some((id, i)) = queues[0].pop_front() {
                    chunk(&mut f, now, id, i);
                    poll(&mut f, now, &mut queues);
                }
            }
            if step % 60 == 0
                && let Some((id, i)) = queues[1].pop_front()
            {
                chunk(&mut f, base, id, i);
                poll(&mut f, base, &mut queues);
            }
        }
        // Before any rate is known each gets a quarter of the most.
        assert_eq!(first, Some([16, 16]));
        // What each holds right after the last round of requests.
        let [fast, slow] = last;
        assert!(fast > 16 && fast <= 64, "fast source holds {fast}");
        // 1.7 chunks/s for 3 s: 5 (6 with rounding) over the last 10 s, never the 16 it
        // started with, nor the 64 the fast one may hold.
        assert!(slow >= 2, "slow source holds {slow}");
        assert!(
            slow_most <= 6,
            "slow source held up to {slow_most} in the last 10 s"
        );
        assert!(f.duplicates == 0 && f.missing_rounds == 0);
    }

    #[test]
    fn a_zero_request_queue_time_keeps_the_fixed_bound() {
        let p = Pace {
            rate: Some(0.1),
            ..Pace::default()
        };
        let fixed = config();
        assert_eq!(p.allowance(&fixed), fixed.max_in_flight);
        let paced = paced();
        assert_eq!(p.allowance(&paced), 2, "never below the floor");
        assert_eq!(Pace::default().allowance(&paced), 16);
        let fast = Pace {
            rate: Some(1e6),
            ..Pace::default()
        };
        assert_eq!(fast.allowance(&paced), 64, "never above the most");
    }

    #[test]
    fn a_stall_halves_a_sources_rate_once_and_the_wait_for_a_first_chunk_is_not_counted() {
        let paced = paced();
        let t = Instant::now();
        let ms = |n| t + Duration::from_millis(n);
        let near = |p: &Pace, r: f64| p.rate.is_some_and(|x| (x - r).abs() < 0.01);
        let mut p = Pace::default();
        // A long wait, then 10 chunks/s: the wait opens nothing, the stretch measures 10/s.
        p.on_idle_request();
        for i in 0..=10 {
            p.on_chunk(ms(5_000 + 100 * i));
        }
        assert!(near(&p, 10.0), "{:?}", p.rate);
        assert_eq!(p.allowance(&paced), 30);
        // Idle, given work again 3 s later: the wait for its first chunk is not counted…
        p.on_idle_request();
        for i in 0..=5 {
            p.on_chunk(ms(9_000 + 100 * i));
        }
        assert!(near(&p, 10.0), "{:?}", p.rate);
        // …but a gap while it owes us chunks is slowness: 1 chunk in 1 s.
        p.on_chunk(ms(10_500));
        assert!(near(&p, 5.5), "{:?}", p.rate);
        // A stall halves the rate once, however many requests stall before it delivers.
        p.on_stall(&paced);
        p.on_stall(&paced);
        assert!(near(&p, 2.75), "{:?}", p.rate);
        p.on_chunk(ms(20_000));
        p.on_stall(&paced);
        assert!(near(&p, 1.375), "{:?}", p.rate);
        assert_eq!(p.allowance(&paced), 5);
        // With no rate yet a stall gives the floor, which a delivery then raises.
        let mut never = Pace::default();
        never.on_stall(&paced);
        assert_eq!(
            never.allowance(&paced),
            2,
            "a source that stalled first gets the least"
        );
        never.on_chunk(ms(0));
        never.on_chunk(ms(500));
        assert!(
            never.allowance(&paced) > 2,
            "and gets more once it delivers"
        );
    }

    #[test]
    fn a_chunk_sent_under_another_sources_request_id_does_not_keep_that_request_alive() {
        let t = Instant::now();
        let mut f = Fetch::new(&meta(10), ChunkRanges::new(), config(), t, 1).expect("shape");
        f.add_source(1u8, ChunkRanges::full(10));
        let mut out = Vec::new();
        f.poll(t, &mut out);
        assert_eq!(requests(&out), vec![(1, 1, vec![0, 1, 2, 3], false)]);
        // Peer 2 hands over chunk 0 tagged with source 1's request: the chunk is kept, but
        // source 1 has still sent nothing.
        assert!(f.on_chunk(t + Duration::from_secs(3), &2, 1, 0));
        out.clear();
        f.poll(t + Duration::from_millis(5_500), &mut out);
        assert!(
            out.iter().any(|o| matches!(
                o,
                FetchOutput::Missing { source: 1, request_id: 1, ranges } if ranges.iter().collect::<Vec<_>>() == vec![1, 2, 3]
            )),
            "request 1 counts as stalled 5 s after it was sent: {out:?}"
        );
    }
}
