//! The full-scrape snapshot: each swarm worker publishes its largest swarms every interval,
//! and the first socket worker to need a stale snapshot merges the parts into one encoded
//! frame that every requester then shares (a reference-counted buffer, no copy per client).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tidepool_protocol::InfoHash;
use tidepool_protocol::tracker::{ScrapeResponse, ScrapeStats};

type Part = Vec<(InfoHash, ScrapeStats)>;

/// Shared by every worker of one tracker.
#[derive(Debug)]
pub(crate) struct FullScrape {
    interval: Duration,
    max_swarms: usize,
    /// One slot per swarm worker: its largest swarms, as last published.
    parts: Vec<Mutex<Part>>,
    /// The encoded reply and when it was built.
    snapshot: Mutex<Option<(Instant, Arc<str>)>>,
}

impl FullScrape {
    pub(crate) fn new(shards: usize, interval: Duration, max_swarms: usize) -> Self {
        Self {
            interval,
            max_swarms,
            parts: (0..shards).map(|_| Mutex::new(Vec::new())).collect(),
            snapshot: Mutex::new(None),
        }
    }

    /// Seconds between rebuilds, and between two full scrapes from one connection.
    pub(crate) fn interval(&self) -> Duration {
        self.interval
    }

    /// Most swarms a part needs to hold (a shard's own top is all the merge can use).
    pub(crate) fn max_swarms(&self) -> usize {
        self.max_swarms
    }

    /// A swarm worker's latest largest swarms.
    pub(crate) fn publish(&self, shard: usize, part: Part) {
        if let Some(slot) = self.parts.get(shard)
            && let Ok(mut slot) = slot.lock()
        {
            *slot = part;
        }
    }

    /// The reply to a full scrape at `now`, rebuilt first when older than the interval.
    /// Second item: whether this call rebuilt it.
    pub(crate) fn frame(&self, now: Instant) -> (Arc<str>, bool) {
        let Ok(mut snapshot) = self.snapshot.lock() else {
            return (Arc::from(r#"{"action":"scrape","files":{}}"#), false);
        };
        if let Some((built, frame)) = snapshot.as_ref()
            && now.saturating_duration_since(*built) < self.interval
        {
            return (frame.clone(), false);
        }
        let mut files: Part = self
            .parts
            .iter()
            .flat_map(|p| p.lock().map(|p| p.clone()).unwrap_or_default())
            .collect();
        files.sort_by_key(|(h, s)| (std::cmp::Reverse(s.complete + s.incomplete), h.0));
        files.truncate(self.max_swarms);
        let mut out = Vec::new();
        ScrapeResponse {
            files,
            min_request_interval: Some(self.interval.as_secs()),
        }
        .encode(&mut out);
        let frame: Arc<str> = String::from_utf8(out).unwrap_or_default().into();
        *snapshot = Some((now, frame.clone()));
        (frame, true)
    }
}
