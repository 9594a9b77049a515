//! Live counters the workers bump with relaxed atomics, rendered as Prometheus text for
//! `/metrics` and as the numbers behind `/stats` and `/stats.json`.
//!
//! Each worker owns its own block of counters (one writer per counter), so bumping one is a
//! plain load and store, not a locked read-modify-write; readers sum across workers.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use tidepool_protocol::InfoHash;

use crate::auth::Refused;
use tidepool_protocol::tracker::ScrapeStats;

/// Declares a kind enum with its Prometheus label values, in index order.
macro_rules! kinds {
    ($(#[$doc:meta])* $name:ident { $($variant:ident => $label:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub(crate) enum $name { $($variant),+ }
        impl $name {
            pub(crate) const LABELS: &'static [&'static str] = &[$($label),+];
            pub(crate) const COUNT: usize = Self::LABELS.len();
        }
    };
}

kinds!(
    /// Text frames received, by what they turned out to be.
    InKind {
        Announce => "announce",
        Answer => "answer",
        Scrape => "scrape",
        Invalid => "invalid",
        RateLimited => "rate_limited",
    }
);

kinds!(
    /// Text frames sent, by message type.
    OutKind {
        Announce => "announce",
        Offer => "offer",
        Answer => "answer",
        Scrape => "scrape",
        Error => "error",
    }
);

kinds!(
    /// Failure replies sent, by cause.
    ErrorKind {
        InvalidRequest => "invalid_request",
        RateLimited => "rate_limited",
        Overloaded => "overloaded",
        SwarmLimit => "swarm_limit",
        AccessDenied => "access_denied",
        PeerIdInUse => "peer_id_in_use",
        FullScrapeDisabled => "full_scrape_disabled",
        FullScrapeRateLimited => "full_scrape_rate_limited",
        ScrapeTimeout => "scrape_timeout",
        ScrapesInFlight => "scrapes_in_flight",
        TokenPool => "token_pool",
        TokenRole => "token_role",
    }
);

kinds!(
    /// Replies a swarm worker could not hand to a socket worker (its inbox was full by
    /// count or bytes), by what they were.
    DropKind {
        AnnounceResponse => "announce_response",
        Offer => "offer",
        Answer => "answer",
        Error => "error",
        ScrapePart => "scrape_part",
    }
);

kinds!(
    /// Why connections were closed.
    CloseReason {
        Peer => "peer",
        Io => "io_error",
        Protocol => "protocol",
        SlowReader => "slow_reader",
        HandshakeTimeout => "handshake_timeout",
        HandshakeFailed => "handshake_failed",
        Idle => "idle",
        Binary => "binary",
        TooLarge => "too_large",
        PerIpLimit => "per_ip_limit",
        Shutdown => "shutdown",
        Unauthorized => "unauthorized",
        TokenExpired => "token_expired",
        TokenRevoked => "token_revoked",
    }
);

kinds!(
    /// Connections refused before any per-connection state was allocated.
    RefuseReason {
        MaxConnections => "max_connections",
        PerIp => "per_ip",
    }
);

/// Adds to a counter that only one thread writes (no locked instruction needed).
#[inline]
pub(crate) fn bump(counter: &AtomicU64, n: u64) {
    counter.store(counter.load(Relaxed).wrapping_add(n), Relaxed);
}

fn counters<const N: usize>() -> [AtomicU64; N] {
    std::array::from_fn(|_| AtomicU64::new(0))
}

/// One socket worker's counters. Aligned so two workers' blocks never share a cache line.
#[derive(Debug)]
#[repr(align(128))]
pub(crate) struct SocketMetrics {
    pub(crate) connections: AtomicU64,
    pub(crate) accepted: AtomicU64,
    pub(crate) refused: [AtomicU64; RefuseReason::COUNT],
    /// Upgrade requests refused with 401, indexed by `auth::Refused::index`.
    pub(crate) auth_refused: [AtomicU64; Refused::ALL.len()],
    /// Tokens verified at upgrade.
    pub(crate) auth_accepted: AtomicU64,
    pub(crate) messages_in: [AtomicU64; InKind::COUNT],
    pub(crate) messages_out: [AtomicU64; OutKind::COUNT],
    pub(crate) bytes_in: AtomicU64,
    pub(crate) bytes_out: AtomicU64,
    pub(crate) errors: [AtomicU64; ErrorKind::COUNT],
    pub(crate) closed: [AtomicU64; CloseReason::COUNT],
    /// Replies waiting in this worker's inbox from the swarm workers.
    pub(crate) inbox_depth: AtomicU64,
    /// Bytes those replies hold.
    pub(crate) inbox_bytes: AtomicU64,
    /// Replies nobody waits for any more: their connection closed, or their scrape was
    /// already answered (timed out, or another part was refused).
    pub(crate) replies_orphaned: AtomicU64,
    /// Peers (swarm, peer id pairs) the connections of this worker hold, as of the last sweep.
    pub(crate) memberships: AtomicU64,
    /// Heap bytes in the connections' read/write buffers, as of the last sweep.
    pub(crate) buffer_bytes_lent: AtomicU64,
    /// Heap bytes the worker keeps for reuse, as of the last sweep.
    pub(crate) buffer_bytes_pooled: AtomicU64,
    /// Full-scrape snapshots this worker rebuilt.
    pub(crate) full_scrape_rebuilds: AtomicU64,
    /// Close notices that found a swarm worker's request inbox full and took the close lane.
    pub(crate) closes_overflowed: AtomicU64,
    pub(crate) tls_handshakes: AtomicU64,
    pub(crate) tls_handshake_failures: AtomicU64,
}

impl Default for SocketMetrics {
    fn default() -> Self {
        Self {
            connections: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            refused: counters(),
            auth_refused: counters(),
            auth_accepted: AtomicU64::new(0),
            messages_in: counters(),
            messages_out: counters(),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            errors: counters(),
            closed: counters(),
            inbox_depth: AtomicU64::new(0),
            inbox_bytes: AtomicU64::new(0),
            replies_orphaned: AtomicU64::new(0),
            memberships: AtomicU64::new(0),
            buffer_bytes_lent: AtomicU64::new(0),
            buffer_bytes_pooled: AtomicU64::new(0),
            full_scrape_rebuilds: AtomicU64::new(0),
            closes_overflowed: AtomicU64::new(0),
            tls_handshakes: AtomicU64::new(0),
            tls_handshake_failures: AtomicU64::new(0),
        }
    }
}

/// One swarm worker's gauges, published every stats interval.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct SwarmMetrics {
    pub(crate) swarms: AtomicU64,
    pub(crate) seeders: AtomicU64,
    pub(crate) leechers: AtomicU64,
    /// Requests waiting in this worker's inbox from the socket workers.
    pub(crate) inbox_depth: AtomicU64,
    /// Bytes those requests hold.
    pub(crate) inbox_bytes: AtomicU64,
    pub(crate) requests: AtomicU64,
    /// Closed-connection notices handled.
    pub(crate) closes: AtomicU64,
    /// Close notices waiting on the close lane (those that found the request inbox full).
    pub(crate) close_lane_depth: AtomicU64,
    pub(crate) peers_purged: AtomicU64,
    /// Replies dropped because a socket worker's inbox was full, by kind.
    pub(crate) dropped: [AtomicU64; DropKind::COUNT],
    pub(crate) takeovers: AtomicU64,
    pub(crate) replaced: AtomicU64,
    pub(crate) timed_out: AtomicU64,
    /// This shard's largest swarms, biggest first.
    pub(crate) top: Mutex<Vec<(InfoHash, ScrapeStats)>>,
}

/// Messages per second over the last few seconds, sampled by the control thread.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Rates {
    pub(crate) messages_in: f64,
    pub(crate) messages_out: f64,
    pub(crate) announces: f64,
    pub(crate) offers: f64,
}

/// Every counter of one tracker.
#[derive(Debug)]
pub(crate) struct Metrics {
    pub(crate) started: Instant,
    pub(crate) sockets: Vec<SocketMetrics>,
    pub(crate) swarms: Vec<SwarmMetrics>,
    pub(crate) access_list_entries: AtomicU64,
    pub(crate) access_list_reloads: AtomicU64,
    pub(crate) access_list_reload_failures: AtomicU64,
    pub(crate) tls_reloads: AtomicU64,
    pub(crate) tls_reload_failures: AtomicU64,
    pub(crate) auth_keys: AtomicU64,
    pub(crate) auth_revoked: AtomicU64,
    pub(crate) auth_reloads: AtomicU64,
    pub(crate) auth_reload_failures: AtomicU64,
    pub(crate) rates: Mutex<Rates>,
}

/// A point-in-time sum over workers, for rates and the stats page.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub(crate) struct Totals {
    pub(crate) connections: u64,
    pub(crate) swarms: u64,
    pub(crate) seeders: u64,
    pub(crate) leechers: u64,
    pub(crate) messages_in: u64,
    pub(crate) messages_out: u64,
    pub(crate) announces: u64,
    pub(crate) offers: u64,
}

impl Metrics {
    pub(crate) fn new(socket_workers: usize, swarm_workers: usize) -> Self {
        Self {
            started: Instant::now(),
            sockets: (0..socket_workers)
                .map(|_| SocketMetrics::default())
                .collect(),
            swarms: (0..swarm_workers)
                .map(|_| SwarmMetrics::default())
                .collect(),
            access_list_entries: AtomicU64::new(0),
            access_list_reloads: AtomicU64::new(0),
            access_list_reload_failures: AtomicU64::new(0),
            tls_reloads: AtomicU64::new(0),
            tls_reload_failures: AtomicU64::new(0),
            auth_keys: AtomicU64::new(0),
            auth_revoked: AtomicU64::new(0),
            auth_reloads: AtomicU64::new(0),
            auth_reload_failures: AtomicU64::new(0),
            rates: Mutex::new(Rates::default()),
        }
    }

    pub(crate) fn totals(&self) -> Totals {
        let mut t = Totals::default();
        for s in &self.sockets {
            t.connections += s.connections.load(Relaxed);
            t.messages_in += s.messages_in.iter().map(|c| c.load(Relaxed)).sum::<u64>();
            t.messages_out += s.messages_out.iter().map(|c| c.load(Relaxed)).sum::<u64>();
            t.announces += s.messages_in[InKind::Announce as usize].load(Relaxed);
            t.offers += s.messages_out[OutKind::Offer as usize].load(Relaxed);
        }
        for s in &self.swarms {
            t.swarms += s.swarms.load(Relaxed);
            t.seeders += s.seeders.load(Relaxed);
            t.leechers += s.leechers.load(Relaxed);
        }
        t
    }

    /// The `n` largest swarms across shards, biggest first.
    pub(crate) fn top_swarms(&self, n: usize) -> Vec<(InfoHash, ScrapeStats)> {
        let mut all: Vec<(InfoHash, ScrapeStats)> = self
            .swarms
            .iter()
            .flat_map(|s| s.top.lock().map(|t| t.clone()).unwrap_or_default())
            .collect();
        all.sort_by_key(|(h, s)| (std::cmp::Reverse(s.complete + s.incomplete), h.0));
        all.truncate(n);
        all
    }

    /// The Prometheus text exposition format, version 0.0.4.
    /// Every metric family with its samples, read from the counters now (for the exposition,
    /// which `prometheus-client` encodes: see [`Exposition`]).
    pub(crate) fn families(&self) -> Vec<Family> {
        let mut out: Vec<Family> = Vec::with_capacity(96);
        let sockets = &self.sockets;
        let per_worker = |out: &mut Vec<Family>,
                          name: &str,
                          help: &str,
                          kind: &str,
                          f: &dyn Fn(&SocketMetrics) -> u64| {
            family(out, name, help, kind);
            for (w, s) in sockets.iter().enumerate() {
                sample(out, &[("worker", w.to_string())], f(s));
            }
        };
        per_worker(
            &mut out,
            "tidepool_connections",
            "Open connections, by socket worker.",
            "gauge",
            &|s| s.connections.load(Relaxed),
        );
        per_worker(
            &mut out,
            "tidepool_connections_accepted_total",
            "Connections accepted.",
            "counter",
            &|s| s.accepted.load(Relaxed),
        );
        per_worker(
            &mut out,
            "tidepool_message_bytes_in_total",
            "Payload bytes of text frames received.",
            "counter",
            &|s| s.bytes_in.load(Relaxed),
        );
        per_worker(
            &mut out,
            "tidepool_message_bytes_out_total",
            "Payload bytes of text frames sent.",
            "counter",
            &|s| s.bytes_out.load(Relaxed),
        );
        per_worker(
            &mut out,
            "tidepool_socket_inbox_depth",
            "Replies queued from swarm workers to this socket worker.",
            "gauge",
            &|s| s.inbox_depth.load(Relaxed),
        );
        per_worker(
            &mut out,
            "tidepool_socket_inbox_bytes",
            "Bytes of the replies queued from swarm workers to this socket worker.",
            "gauge",
            &|s| s.inbox_bytes.load(Relaxed),
        );
        per_worker(
            &mut out,
            "tidepool_replies_orphaned_total",
            "Replies dropped because their connection closed or their scrape was already answered.",
            "counter",
            &|s| s.replies_orphaned.load(Relaxed),
        );
        per_worker(
            &mut out,
            "tidepool_connection_swarms",
            "Peers (swarm, peer id pairs) the open connections hold (refreshed each sweep).",
            "gauge",
            &|s| s.memberships.load(Relaxed),
        );
        per_worker(
            &mut out,
            "tidepool_connection_buffer_bytes",
            "Heap bytes in connections' read and write buffers (idle connections hold none; refreshed each sweep).",
            "gauge",
            &|s| s.buffer_bytes_lent.load(Relaxed),
        );
        per_worker(
            &mut out,
            "tidepool_pooled_buffer_bytes",
            "Heap bytes the socket worker keeps for reuse as buffers (refreshed each sweep).",
            "gauge",
            &|s| s.buffer_bytes_pooled.load(Relaxed),
        );
        per_worker(
            &mut out,
            "tidepool_full_scrape_rebuilds_total",
            "Full-scrape snapshots rebuilt by this socket worker.",
            "counter",
            &|s| s.full_scrape_rebuilds.load(Relaxed),
        );
        per_worker(
            &mut out,
            "tidepool_close_notices_overflowed_total",
            "Close notices that found a swarm worker's inbox full and took the lane that never refuses.",
            "counter",
            &|s| s.closes_overflowed.load(Relaxed),
        );
        per_worker(
            &mut out,
            "tidepool_tls_handshakes_total",
            "TLS handshakes completed.",
            "counter",
            &|s| s.tls_handshakes.load(Relaxed),
        );
        per_worker(
            &mut out,
            "tidepool_tls_handshake_failures_total",
            "TLS handshakes that failed or were abandoned (counted, not logged per client).",
            "counter",
            &|s| s.tls_handshake_failures.load(Relaxed),
        );

        let labelled = |out: &mut Vec<Family>,
                        name: &str,
                        help: &str,
                        label: &'static str,
                        labels: &[&str],
                        f: &dyn Fn(&SocketMetrics, usize) -> u64| {
            family(out, name, help, "counter");
            for (i, l) in labels.iter().enumerate() {
                let sum: u64 = sockets.iter().map(|s| f(s, i)).sum();
                sample(out, &[(label, (*l).to_owned())], sum);
            }
        };
        labelled(
            &mut out,
            "tidepool_connections_refused_total",
            "Connections refused at accept, by limit.",
            "reason",
            RefuseReason::LABELS,
            &|s, i| s.refused[i].load(Relaxed),
        );
        labelled(
            &mut out,
            "tidepool_auth_refusals_total",
            "Upgrade requests refused with HTTP 401, by what was wrong with the token.",
            "reason",
            &Refused::ALL.map(Refused::label),
            &|s, i| s.auth_refused[i].load(Relaxed),
        );
        family(
            &mut out,
            "tidepool_auth_accepted_total",
            "Tokens verified at upgrade.",
            "counter",
        );
        let accepted: u64 = sockets.iter().map(|s| s.auth_accepted.load(Relaxed)).sum();
        sample(&mut out, &[], accepted);
        labelled(
            &mut out,
            "tidepool_messages_in_total",
            "Text frames received, by kind.",
            "kind",
            InKind::LABELS,
            &|s, i| s.messages_in[i].load(Relaxed),
        );
        labelled(
            &mut out,
            "tidepool_messages_out_total",
            "Text frames sent, by kind.",
            "kind",
            OutKind::LABELS,
            &|s, i| s.messages_out[i].load(Relaxed),
        );
        labelled(
            &mut out,
            "tidepool_errors_total",
            "Failure replies sent, by cause.",
            "kind",
            ErrorKind::LABELS,
            &|s, i| s.errors[i].load(Relaxed),
        );
        labelled(
            &mut out,
            "tidepool_connections_closed_total",
            "Connections closed, by reason.",
            "reason",
            CloseReason::LABELS,
            &|s, i| s.closed[i].load(Relaxed),
        );

        let shards = &self.swarms;
        let per_shard = |out: &mut Vec<Family>,
                         name: &str,
                         help: &str,
                         kind: &str,
                         f: &dyn Fn(&SwarmMetrics) -> u64| {
            family(out, name, help, kind);
            for (w, s) in shards.iter().enumerate() {
                sample(out, &[("shard", w.to_string())], f(s));
            }
        };
        per_shard(
            &mut out,
            "tidepool_swarms",
            "Swarms with at least one peer.",
            "gauge",
            &|s| s.swarms.load(Relaxed),
        );
        per_shard(
            &mut out,
            "tidepool_seeders",
            "Peers that have the whole torrent.",
            "gauge",
            &|s| s.seeders.load(Relaxed),
        );
        per_shard(
            &mut out,
            "tidepool_leechers",
            "Peers still downloading.",
            "gauge",
            &|s| s.leechers.load(Relaxed),
        );
        per_shard(
            &mut out,
            "tidepool_swarm_inbox_depth",
            "Requests queued from socket workers to this swarm worker.",
            "gauge",
            &|s| s.inbox_depth.load(Relaxed),
        );
        per_shard(
            &mut out,
            "tidepool_swarm_inbox_bytes",
            "Bytes of the requests queued from socket workers to this swarm worker.",
            "gauge",
            &|s| s.inbox_bytes.load(Relaxed),
        );
        per_shard(
            &mut out,
            "tidepool_swarm_closes_total",
            "Closed-connection notices handled (this instance's are never dropped; one from another cluster instance that finds the inbox full is counted in tidepool_cluster_lost_total).",
            "counter",
            &|s| s.closes.load(Relaxed),
        );
        per_shard(
            &mut out,
            "tidepool_close_lane_depth",
            "Close notices waiting on the overflow lane.",
            "gauge",
            &|s| s.close_lane_depth.load(Relaxed),
        );
        per_shard(
            &mut out,
            "tidepool_peer_takeovers_total",
            "Peer ids claimed by a new connection after their owner went silent or closed.",
            "counter",
            &|s| s.takeovers.load(Relaxed),
        );
        per_shard(
            &mut out,
            "tidepool_peers_replaced_total",
            "Peers replaced by a new peer id announced from the same connection.",
            "counter",
            &|s| s.replaced.load(Relaxed),
        );
        per_shard(
            &mut out,
            "tidepool_peers_timed_out_total",
            "Peers dropped after the peer timeout.",
            "counter",
            &|s| s.timed_out.load(Relaxed),
        );
        family(
            &mut out,
            "tidepool_replies_dropped_total",
            "Replies a swarm worker dropped because a socket worker's inbox was full.",
            "counter",
        );
        for (w, s) in shards.iter().enumerate() {
            for (i, l) in DropKind::LABELS.iter().enumerate() {
                sample(
                    &mut out,
                    &[("shard", w.to_string()), ("kind", (*l).to_owned())],
                    s.dropped[i].load(Relaxed),
                );
            }
        }
        per_shard(
            &mut out,
            "tidepool_swarm_requests_total",
            "Requests handled by this swarm worker.",
            "counter",
            &|s| s.requests.load(Relaxed),
        );
        per_shard(
            &mut out,
            "tidepool_access_list_peers_purged_total",
            "Peers removed because their swarm became denied.",
            "counter",
            &|s| s.peers_purged.load(Relaxed),
        );

        let single = |out: &mut Vec<Family>, name: &str, help: &str, kind: &str, v: u64| {
            family(out, name, help, kind);
            sample(out, &[], v);
        };
        single(
            &mut out,
            "tidepool_access_list_entries",
            "Info hashes in the loaded access list.",
            "gauge",
            self.access_list_entries.load(Relaxed),
        );
        single(
            &mut out,
            "tidepool_access_list_reloads_total",
            "Access list loads that succeeded.",
            "counter",
            self.access_list_reloads.load(Relaxed),
        );
        single(
            &mut out,
            "tidepool_access_list_reload_failures_total",
            "Access list loads that failed (the previous list stays).",
            "counter",
            self.access_list_reload_failures.load(Relaxed),
        );
        single(
            &mut out,
            "tidepool_auth_keys",
            "Token verification keys loaded.",
            "gauge",
            self.auth_keys.load(Relaxed),
        );
        single(
            &mut out,
            "tidepool_auth_revoked_tokens",
            "Token ids in the loaded revocation list.",
            "gauge",
            self.auth_revoked.load(Relaxed),
        );
        single(
            &mut out,
            "tidepool_auth_reloads_total",
            "Key set and revocation list loads that succeeded.",
            "counter",
            self.auth_reloads.load(Relaxed),
        );
        single(
            &mut out,
            "tidepool_auth_reload_failures_total",
            "Key set and revocation list loads that failed (the previous ones stay).",
            "counter",
            self.auth_reload_failures.load(Relaxed),
        );
        single(
            &mut out,
            "tidepool_tls_reloads_total",
            "Certificate reloads that succeeded.",
            "counter",
            self.tls_reloads.load(Relaxed),
        );
        single(
            &mut out,
            "tidepool_tls_reload_failures_total",
            "Certificate reloads that failed (the previous certificate stays).",
            "counter",
            self.tls_reload_failures.load(Relaxed),
        );
        single(
            &mut out,
            "tidepool_uptime_seconds",
            "Seconds since the tracker started.",
            "gauge",
            self.started.elapsed().as_secs(),
        );
        out
    }
}

/// One metric family as gathered: its name (counters with their `_total`), help, kind and
/// samples.
#[derive(Debug)]
pub(crate) struct Family {
    pub(crate) name: String,
    pub(crate) help: String,
    pub(crate) counter: bool,
    pub(crate) samples: Vec<(Vec<(&'static str, String)>, u64)>,
}

/// Starts a family ("counter" or "gauge").
pub(crate) fn family(out: &mut Vec<Family>, name: &str, help: &str, kind: &str) {
    out.push(Family {
        name: name.to_owned(),
        help: help.to_owned(),
        counter: kind == "counter",
        samples: Vec::new(),
    });
}

/// Adds a sample to the family started last.
pub(crate) fn sample(out: &mut [Family], labels: &[(&'static str, String)], value: u64) {
    if let Some(f) = out.last_mut() {
        f.samples.push((labels.to_vec(), value));
    }
}

/// The families as a `prometheus-client` collector: it writes the OpenMetrics text, the
/// tracker only reads its counters (kept per worker and unlocked, so the hot path pays
/// nothing for the exposition).
#[derive(Debug)]
pub(crate) struct Exposition(pub(crate) Vec<Family>);

impl prometheus_client::collector::Collector for Exposition {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        use prometheus_client::metrics::{MetricType, TypedMetric};
        for f in &self.0 {
            // OpenMetrics names a counter family without its `_total`; the samples keep it.
            let (name, kind) = if f.counter {
                (
                    f.name.strip_suffix("_total").unwrap_or(&f.name),
                    ConstCounter::<u64>::TYPE,
                )
            } else {
                (f.name.as_str(), MetricType::Gauge)
            };
            let mut family = encoder.encode_descriptor(name, &f.help, None, kind)?;
            for (labels, value) in &f.samples {
                let labels: Vec<(&str, &str)> =
                    labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
                let sample = family.encode_family(&labels)?;
                if f.counter {
                    ConstCounter::new(*value).encode(sample)?;
                } else {
                    ConstGauge::new(*value as i64).encode(sample)?;
                }
            }
        }
        Ok(())
    }
}

/// The whole `/metrics` body in the OpenMetrics text format, with `labels` on every sample
/// (the cluster member, when clustered).
pub(crate) fn render(families: Vec<Family>, labels: &[(String, String)]) -> String {
    let mut registry = prometheus_client::registry::Registry::with_labels(
        labels
            .iter()
            .map(|(k, v)| (k.clone().into(), v.clone().into())),
    );
    registry.register_collector(Box::new(Exposition(families)));
    let mut out = String::with_capacity(16 * 1024);
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_sums_workers_and_labels_every_kind() {
        let m = Metrics::new(2, 1);
        bump(&m.sockets[0].messages_in[InKind::Announce as usize], 3);
        bump(&m.sockets[1].messages_in[InKind::Announce as usize], 4);
        bump(&m.sockets[1].connections, 5);
        bump(&m.sockets[0].closed[CloseReason::SlowReader as usize], 1);
        let text = render(m.families(), &[]);
        assert!(
            text.contains("tidepool_messages_in_total{kind=\"announce\"} 7\n"),
            "{text}"
        );
        assert!(
            text.contains("tidepool_connections{worker=\"1\"} 5\n"),
            "{text}"
        );
        assert!(text.contains("tidepool_connections_closed_total{reason=\"slow_reader\"} 1\n"));
        assert!(text.contains("tidepool_connections_closed_total{reason=\"idle\"} 0\n"));
        assert!(text.ends_with("# EOF\n"), "OpenMetrics");
        // Every sample line belongs to a declared family (a counter's without `_total`) and
        // carries the registry's labels.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            let counter = name.strip_suffix("_total").unwrap_or(name);
            assert!(
                text.contains(&format!("# TYPE {name} gauge"))
                    || text.contains(&format!("# TYPE {counter} counter")),
                "{line}"
            );
        }
        let labelled = render(m.families(), &[("cluster_member".into(), "a".into())]);
        assert!(
            labelled
                .contains("tidepool_messages_in_total{cluster_member=\"a\",kind=\"announce\"} 7\n"),
            "{labelled}"
        );
        assert!(labelled.contains("tidepool_uptime_seconds{cluster_member=\"a\"} "));
    }
}
