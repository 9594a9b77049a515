//! Tracker load: C WebSocket connections announcing with offers into skewed swarms, answering
//! offers they receive and scraping, while every request and delivery is counted so losses
//! show. Latency is measured from an announce to its announce response.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tidepool_protocol::tracker::{
    AnnounceEvent, AnnounceRequest, Answer, Decoder, Offer, OpaqueJson, ScrapeHashes,
    ScrapeRequest, ServerMessage,
};
use tidepool_protocol::{InfoHash, Number, OfferId, PeerId};
use tokio_tungstenite::Connector;
use tokio_tungstenite::tungstenite::Message;

/// What to run. Every field has a default; a TOML file (`--config`) and flags override them.
#[derive(Debug, Clone, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct TrackerLoadConfig {
    /// Tracker URL (ws:// or wss://). Repeat it to spread the connections over several
    /// tracker instances (connection i uses URL i mod n); offers and answers that cross from
    /// one URL's connections to another's are counted apart.
    // The id is the config key, so a flag given on the command line is seen to win over
    // the config file (main.rs looks flags up by their config key).
    #[arg(id = "url", long = "url", default_value = "ws://127.0.0.1:8000")]
    #[serde(rename = "url", deserialize_with = "one_or_many")]
    pub urls: Vec<String>,
    /// WebSocket connections to open.
    #[arg(long, default_value_t = 256)]
    pub connections: usize,
    /// Threads driving them.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Distinct swarms (info hashes).
    #[arg(long, default_value_t = 1000)]
    pub info_hashes: usize,
    /// Popularity skew: swarm i is picked with weight 1/(i+1)^skew (0 = uniform).
    #[arg(long, default_value_t = 1.1)]
    pub skew: f64,
    /// Swarms each connection joins (its peer announces to one of them per request).
    #[arg(long, default_value_t = 2)]
    pub swarms_per_connection: usize,
    /// Offers per announce (also its numwant).
    #[arg(long, default_value_t = 5)]
    pub offers: usize,
    /// Bytes of SDP per offer and answer.
    #[arg(long, default_value_t = 900)]
    pub sdp_bytes: usize,
    /// Fraction of received offers that are answered.
    #[arg(long, default_value_t = 0.5)]
    pub answer_fraction: f64,
    /// Fraction of requests that are scrapes.
    #[arg(long, default_value_t = 0.05)]
    pub scrape_fraction: f64,
    /// Milliseconds between one connection's requests (0 = send the next as soon as the
    /// response arrives). Fixes the offered rate at connections × 1000 / pace_ms per second,
    /// for latency at a given load rather than at saturation.
    #[arg(long, default_value_t = 0)]
    pub pace_ms: u64,
    /// Seconds of load.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Seconds to keep reading after the load stops, so in-flight deliveries are counted.
    #[arg(long, default_value_t = 2)]
    pub drain: u64,
    /// Accept any TLS certificate (self-signed benchmark certificates).
    #[arg(long, default_value_t = false)]
    pub insecure: bool,
    /// Write the result as JSON here.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
    /// Print no per-second progress line.
    #[arg(long, default_value_t = false)]
    pub quiet: bool,
}

impl Default for TrackerLoadConfig {
    fn default() -> Self {
        Self {
            urls: vec!["ws://127.0.0.1:8000".into()],
            connections: 256,
            workers: 1,
            info_hashes: 1000,
            skew: 1.1,
            swarms_per_connection: 2,
            offers: 5,
            sdp_bytes: 900,
            answer_fraction: 0.5,
            scrape_fraction: 0.05,
            pace_ms: 0,
            duration: 10,
            drain: 2,
            insecure: false,
            json_out: None,
            quiet: false,
        }
    }
}

/// Counters shared by every connection.
#[derive(Debug, Default)]
struct Counters {
    announces_sent: AtomicU64,
    scrapes_sent: AtomicU64,
    answers_sent: AtomicU64,
    announce_responses: AtomicU64,
    offers_expected: AtomicU64,
    offers_received: AtomicU64,
    answers_received: AtomicU64,
    offers_crossed: AtomicU64,
    answers_crossed: AtomicU64,
    scrape_responses: AtomicU64,
    errors: AtomicU64,
    connect_failures: AtomicU64,
    timeouts: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> Totals {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Totals {
            announces_sent: g(&self.announces_sent),
            scrapes_sent: g(&self.scrapes_sent),
            answers_sent: g(&self.answers_sent),
            announce_responses: g(&self.announce_responses),
            offers_expected: g(&self.offers_expected),
            offers_received: g(&self.offers_received),
            answers_received: g(&self.answers_received),
            offers_crossed: g(&self.offers_crossed),
            answers_crossed: g(&self.answers_crossed),
            scrape_responses: g(&self.scrape_responses),
            errors: g(&self.errors),
            connect_failures: g(&self.connect_failures),
            timeouts: g(&self.timeouts),
        }
    }
}

/// Totals at one instant.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Totals {
    /// Announces sent (with offers).
    pub announces_sent: u64,
    /// Scrapes sent.
    pub scrapes_sent: u64,
    /// Answers sent (to offers received).
    pub answers_sent: u64,
    /// Announce responses received.
    pub announce_responses: u64,
    /// Offers the tracker should have forwarded: min(offers, swarm size − 1) per announce.
    pub offers_expected: u64,
    /// Offers received.
    pub offers_received: u64,
    /// Answers received.
    pub answers_received: u64,
    /// Offers received from a connection on another tracker URL (several `--url`s only).
    pub offers_crossed: u64,
    /// Answers received from a connection on another tracker URL.
    pub answers_crossed: u64,
    /// Scrape responses received.
    pub scrape_responses: u64,
    /// Failure replies received.
    pub errors: u64,
    /// Connections that could not be opened.
    pub connect_failures: u64,
    /// Requests whose response did not come within 10 s.
    pub timeouts: u64,
}

impl Totals {
    /// Every frame received from the tracker.
    pub fn responses(&self) -> u64 {
        self.announce_responses
            + self.offers_received
            + self.answers_received
            + self.scrape_responses
            + self.errors
    }

    /// Every request sent to the tracker.
    pub fn requests(&self) -> u64 {
        self.announces_sent + self.scrapes_sent + self.answers_sent
    }

    fn minus(&self, o: &Totals) -> Totals {
        Totals {
            announces_sent: self.announces_sent - o.announces_sent,
            scrapes_sent: self.scrapes_sent - o.scrapes_sent,
            answers_sent: self.answers_sent - o.answers_sent,
            announce_responses: self.announce_responses - o.announce_responses,
            offers_expected: self.offers_expected - o.offers_expected,
            offers_received: self.offers_received - o.offers_received,
            answers_received: self.answers_received - o.answers_received,
            offers_crossed: self.offers_crossed - o.offers_crossed,
            answers_crossed: self.answers_crossed - o.answers_crossed,
            scrape_responses: self.scrape_responses - o.scrape_responses,
            errors: self.errors - o.errors,
            connect_failures: self.connect_failures - o.connect_failures,
            timeouts: self.timeouts - o.timeouts,
        }
    }
}

/// Announce → response latency percentiles, in microseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Latency {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Slowest.
    pub max_us: u64,
}

/// A whole run's result, as written to `--json-out`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrackerLoadResult {
    /// The tester that produced it.
    pub tester: String,
    /// What ran.
    pub config: TrackerLoadConfig,
    /// Seconds of load (excluding the drain).
    pub seconds: f64,
    /// Totals after the drain.
    pub totals: Totals,
    /// Frames received per second of load.
    pub responses_per_sec: f64,
    /// Requests sent per second of load.
    pub requests_per_sec: f64,
    /// Offers delivered per second of load.
    pub offers_per_sec: f64,
    /// Answers delivered per second of load.
    pub answers_per_sec: f64,
    /// Offers expected but never delivered.
    pub offers_lost: u64,
    /// Answers sent but never delivered.
    pub answers_lost: u64,
    /// Announce → announce response latency.
    pub latency: Latency,
    /// Offer delivery latency (the offerer sends its announce → the recipient reads the
    /// offer), for offers between connections of the same tracker URL.
    #[serde(default)]
    pub offer_latency: Latency,
    /// The same for offers that crossed from one tracker URL's connections to another's
    /// (several `--url`s: against a cluster, what crossing instances costs).
    #[serde(default)]
    pub offer_latency_crossed: Latency,
    /// Whether the tracker answers an answer with an announce response (probed at start).
    pub answers_get_responses: bool,
    /// Per-second deltas during the load.
    pub samples: Vec<Totals>,
}

/// Picks swarm indexes with a Zipf-like skew: a few hot swarms, a long tail.
struct Popularity {
    cumulative: Vec<f64>,
}

impl Popularity {
    fn new(n: usize, skew: f64) -> Self {
        let mut acc = 0.0;
        let cumulative = (0..n.max(1))
            .map(|i| {
                acc += 1.0 / ((i + 1) as f64).powf(skew);
                acc
            })
            .collect();
        Self { cumulative }
    }

    fn pick(&self, rng: &mut fastrand::Rng) -> usize {
        let total = self.cumulative.last().copied().unwrap_or(1.0);
        let x = rng.f64() * total;
        self.cumulative
            .partition_point(|&c| c < x)
            .min(self.cumulative.len() - 1)
    }
}

fn id20(prefix: u8, n: u64) -> String {
    let mut b = [b'0'; 20];
    b[0] = prefix;
    let digits = format!("{n:019}");
    b[1..].copy_from_slice(&digits.as_bytes()[digits.len() - 19..]);
    b.iter().map(|&c| c as char).collect()
}

fn sdp(bytes: usize, tag: &str) -> String {
    let mut s = format!("v=0\r\no=- {tag} 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n");
    while s.len() < bytes {
        s.push_str("a=candidate:1 1 UDP 2114977791 127.0.0.1 46280 typ host\r\n");
    }
    s.truncate(bytes.max(16));
    s
}

/// Runs the load and returns the result (also printed, and written when `json_out` is set).
pub fn run(config: TrackerLoadConfig) -> anyhow::Result<TrackerLoadResult> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.workers.max(1))
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(run_async(config))
}

async fn run_async(config: TrackerLoadConfig) -> anyhow::Result<TrackerLoadResult> {
    let config = Arc::new(config);
    let counters = Arc::new(Counters::default());
    let stop = Arc::new(AtomicBool::new(false));
    anyhow::ensure!(!config.urls.is_empty(), "at least one --url");
    let connector = if config.urls.iter().any(|u| u.starts_with("wss://")) {
        Some(Connector::Rustls(Arc::new(crate::tls::client_config(
            config.insecure,
        )?)))
    } else {
        None
    };
    let answers_acked = probe_answer_acks(&config.urls[0], connector.clone())
        .await
        .context("probing the tracker (announce, offer, answer)")?;
    let started = Instant::now();
    let epoch = started;
    let load_end = started + Duration::from_secs(config.duration);
    let drain_end = load_end + Duration::from_secs(config.drain);

    let shared = Arc::new(Shared {
        config: config.clone(),
        counters: counters.clone(),
        stop: stop.clone(),
        popularity: Popularity::new(config.info_hashes, config.skew),
        connector,
        drain_end,
        answers_acked,
        epoch,
    });
    let mut tasks = Vec::with_capacity(config.connections);
    for i in 0..config.connections {
        tasks.push(tokio::spawn(connection(i, shared.clone())));
        // Open connections in waves so the tracker's accept queue is not the first thing measured.
        if i % 64 == 63 {
            tokio::task::yield_now().await;
        }
    }

    let mut samples = Vec::new();
    let mut last = counters.snapshot();
    while Instant::now() < load_end {
        tokio::time::sleep(
            Duration::from_secs(1).min(load_end.saturating_duration_since(Instant::now())),
        )
        .await;
        let now = counters.snapshot();
        let d = now.minus(&last);
        if !config.quiet {
            eprintln!(
                "[{:>4.0}s] req/s {:>7} resp/s {:>7} | announce {:>6} offers {:>6} answers {:>6} scrapes {:>5} errors {:>4}",
                started.elapsed().as_secs_f64(),
                d.requests(),
                d.responses(),
                d.announce_responses,
                d.offers_received,
                d.answers_received,
                d.scrape_responses,
                d.errors + d.timeouts,
            );
        }
        samples.push(d);
        last = now;
    }
    stop.store(true, Ordering::Relaxed);
    let seconds = started.elapsed().as_secs_f64();

    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).context("histogram")?;
    let mut offer_hist = hist.clone();
    let mut crossed_hist = hist.clone();
    for t in tasks {
        if let Ok(h) = t.await {
            let _ = hist.add(&h.announce);
            let _ = offer_hist.add(&h.offer);
            let _ = crossed_hist.add(&h.offer_crossed);
        }
    }
    let latency = |hist: &Histogram<u64>| Latency {
        count: hist.len(),
        p50_us: hist.value_at_quantile(0.5),
        p90_us: hist.value_at_quantile(0.9),
        p99_us: hist.value_at_quantile(0.99),
        p999_us: hist.value_at_quantile(0.999),
        max_us: hist.max(),
    };
    let totals = counters.snapshot();
    let result = TrackerLoadResult {
        tester: "tidepool-load-test".into(),
        config: (*config).clone(),
        seconds,
        totals,
        responses_per_sec: totals.responses() as f64 / seconds,
        requests_per_sec: totals.requests() as f64 / seconds,
        offers_per_sec: totals.offers_received as f64 / seconds,
        answers_per_sec: totals.answers_received as f64 / seconds,
        offers_lost: totals
            .offers_expected
            .saturating_sub(totals.offers_received),
        answers_lost: totals.answers_sent.saturating_sub(totals.answers_received),
        latency: latency(&hist),
        offer_latency: latency(&offer_hist),
        offer_latency_crossed: latency(&crossed_hist),
        samples,
        answers_get_responses: answers_acked,
    };
    print_summary(&result);
    if let Some(path) = &config.json_out {
        std::fs::write(path, serde_json::to_string_pretty(&result)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(result)
}

fn print_summary(r: &TrackerLoadResult) {
    let t = &r.totals;
    println!(
        "tidepool-load-test tracker: {} for {:.1} s ({} connections, {} swarms)",
        r.config.urls.join(" "),
        r.seconds,
        r.config.connections,
        r.config.info_hashes
    );
    println!(
        "  requests   {:>10} ({:.0}/s): announces {}, answers {}, scrapes {}",
        t.requests(),
        r.requests_per_sec,
        t.announces_sent,
        t.answers_sent,
        t.scrapes_sent
    );
    println!(
        "  responses  {:>10} ({:.0}/s): announce {}, offers {}, answers {}, scrapes {}, errors {}",
        t.responses(),
        r.responses_per_sec,
        t.announce_responses,
        t.offers_received,
        t.answers_received,
        t.scrape_responses,
        t.errors
    );
    println!(
        "  offers     expected {} delivered {} lost {}",
        t.offers_expected, t.offers_received, r.offers_lost
    );
    println!(
        "  answers    sent {} delivered {} lost {}",
        t.answers_sent, t.answers_received, r.answers_lost
    );
    if r.config.urls.len() > 1 {
        println!(
            "  crossing   offers {} and answers {} came from another URL's connections",
            t.offers_crossed, t.answers_crossed
        );
    }
    println!(
        "  latency    announce→response p50 {} µs, p90 {} µs, p99 {} µs, p99.9 {} µs, max {} µs ({} samples)",
        r.latency.p50_us,
        r.latency.p90_us,
        r.latency.p99_us,
        r.latency.p999_us,
        r.latency.max_us,
        r.latency.count
    );
    for (what, l) in [
        ("offer sent→delivered", &r.offer_latency),
        ("  …crossing URLs", &r.offer_latency_crossed),
    ] {
        if l.count > 0 {
            println!(
                "  latency    {what} p50 {} µs, p90 {} µs, p99 {} µs, p99.9 {} µs ({} samples)",
                l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.count
            );
        }
    }
    println!(
        "  tracker    {} announce responses to answers",
        if r.answers_get_responses {
            "sends"
        } else {
            "sends no"
        }
    );
    if t.connect_failures + t.timeouts > 0 {
        println!(
            "  problems   connect failures {}, timeouts {}",
            t.connect_failures, t.timeouts
        );
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// What every connection task shares.
struct Shared {
    config: Arc<TrackerLoadConfig>,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    popularity: Popularity,
    connector: Option<Connector>,
    drain_end: Instant,
    answers_acked: bool,
    /// Time zero for the send times offer ids carry.
    epoch: Instant,
}

/// One connection's latency samples.
struct Histograms {
    announce: Histogram<u64>,
    offer: Histogram<u64>,
    offer_crossed: Histogram<u64>,
}

impl Histograms {
    /// An offer's delivery time, from the send time its id carries, as seen by connection
    /// `me` (crossing URLs or not).
    fn record_offer(&mut self, kind: &Kind, epoch: Instant, me: usize, urls: usize) {
        if let Kind::Offer(from, offer_id, _) = kind
            && let Some(sent) = offer_sent_us(offer_id)
        {
            let took = (epoch.elapsed().as_micros() as u64)
                .saturating_sub(sent)
                .max(1);
            let h = if crossed(from, me, urls) {
                &mut self.offer_crossed
            } else {
                &mut self.offer
            };
            let _ = h.record(took);
        }
    }
}

/// Offer ids carry their send time: microseconds since the run's epoch, times 64, plus the
/// offer's index in its announce (so ids stay distinct per connection).
fn offer_number(sent_us: u64, i: usize) -> u64 {
    sent_us * 64 + i as u64
}

/// The send time an offer id carries, if it is one of ours.
fn offer_sent_us(offer_id: &OfferId) -> Option<u64> {
    let bytes = offer_id.to_bytes20()?;
    Some(std::str::from_utf8(&bytes[1..]).ok()?.parse::<u64>().ok()? / 64)
}

async fn connection(index: usize, shared: Arc<Shared>) -> Histograms {
    let Shared {
        config,
        counters,
        stop,
        popularity,
        connector,
        drain_end,
        answers_acked,
        epoch,
    } = &*shared;
    let (connector, drain_end, answers_acked, epoch) =
        (connector.clone(), *drain_end, *answers_acked, *epoch);
    let new = || {
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
            .unwrap_or_else(|_| unreachable!("valid bounds"))
    };
    let mut hists = Histograms {
        announce: new(),
        offer: new(),
        offer_crossed: new(),
    };

    let url = &config.urls[index % config.urls.len()];
    let connect = tokio_tungstenite::connect_async_tls_with_config(url, None, true, connector);
    let mut ws: Ws = match tokio::time::timeout(Duration::from_secs(10), connect).await {
        Ok(Ok((ws, _))) => ws,
        _ => {
            counters.connect_failures.fetch_add(1, Ordering::Relaxed);
            return hists;
        }
    };
    let mut rng = fastrand::Rng::with_seed(index as u64 * 7919 + 1);
    let peer_id = PeerId(id_bytes(b'-', index as u64));
    let swarms: Vec<InfoHash> = (0..config.swarms_per_connection.max(1))
        .map(|_| InfoHash(id_bytes(b'h', popularity.pick(&mut rng) as u64)))
        .collect();
    let offer_sdp = sdp(config.sdp_bytes, &format!("{index}"));
    let answer_sdp = sdp(config.sdp_bytes, &format!("a{index}"));
    // The tester must be cheaper than what it tests: requests are encoded and responses
    // decoded with the protocol crate (simd-json), not through serde_json trees.
    let mut decoder = Decoder::default();
    let mut buf = Vec::with_capacity(16 * 1024);
    let mut round = 0u64;
    // Some trackers (aquatic_ws) send an announce response for every answer, others (the npm
    // reference, tidepool) none. Responses come back in request order, so answer acks due
    // before the pending request's response are skipped, not mistaken for it.
    let mut acks_before = 0u64;
    let mut acks_after = 0u64;

    'requests: while !stop.load(Ordering::Relaxed) {
        round += 1;
        let info_hash = swarms[rng.usize(..swarms.len())];
        let scrape = rng.f64() < config.scrape_fraction;
        buf.clear();
        if scrape {
            counters.scrapes_sent.fetch_add(1, Ordering::Relaxed);
            ScrapeRequest {
                info_hashes: ScrapeHashes::One(info_hash),
            }
            .encode(&mut buf);
        } else {
            counters.announces_sent.fetch_add(1, Ordering::Relaxed);
            let sent_us = epoch.elapsed().as_micros() as u64;
            AnnounceRequest {
                info_hash,
                peer_id,
                event: if round == 1 {
                    AnnounceEvent::Started
                } else {
                    AnnounceEvent::Update
                },
                numwant: Some(config.offers as u32),
                uploaded: Some(Number::UInt(0)),
                downloaded: Some(Number::UInt(0)),
                left: Some(Number::UInt(1)),
                offers: (0..config.offers)
                    .map(|i| Offer {
                        offer_id: OfferId::from_bytes20(&id_bytes(b'o', offer_number(sent_us, i))),
                        offer: OpaqueJson::Sdp {
                            kind: "offer",
                            sdp: &offer_sdp,
                        },
                    })
                    .collect(),
                answer: None,
            }
            .encode(&mut buf);
        }
        if ws
            .send(Message::text(String::from_utf8_lossy(&buf).into_owned()))
            .await
            .is_err()
        {
            break;
        }
        let sent_at = Instant::now();
        // With pacing, keep serving offers and answers until the next request is due.
        let next_send = sent_at + Duration::from_millis(config.pace_ms);
        let mut done = false;
        loop {
            let wait = if done {
                match next_send.checked_duration_since(Instant::now()) {
                    Some(d) if !d.is_zero() => d,
                    _ => break,
                }
            } else {
                Duration::from_secs(10)
            };
            let mut frame = match next_frame(&mut ws, wait).await {
                Next::Frame(f) => f,
                Next::Timeout if done => break,
                Next::Timeout => {
                    counters.timeouts.fetch_add(1, Ordering::Relaxed);
                    break 'requests;
                }
                Next::Closed => break 'requests,
            };
            let kind = decoder.decode_server(&mut frame, |m| classify(m.ok().as_ref()));
            count(&kind, counters);
            hists.record_offer(&kind, epoch, index, config.urls.len());
            count_crossed(&kind, counters, index, config.urls.len());
            match kind {
                Kind::Offer(from, offer_id, offer_hash)
                    if rng.f64() < config.answer_fraction && !stop.load(Ordering::Relaxed) =>
                {
                    buf.clear();
                    AnnounceRequest {
                        info_hash: offer_hash,
                        peer_id,
                        event: AnnounceEvent::None,
                        numwant: None,
                        uploaded: None,
                        downloaded: None,
                        left: None,
                        offers: Vec::new(),
                        answer: Some(Answer {
                            to_peer_id: from,
                            offer_id,
                            answer: OpaqueJson::Sdp {
                                kind: "answer",
                                sdp: &answer_sdp,
                            },
                        }),
                    }
                    .encode(&mut buf);
                    let text = String::from_utf8_lossy(&buf).into_owned();
                    if ws.send(Message::text(text)).await.is_err() {
                        break 'requests;
                    }
                    counters.answers_sent.fetch_add(1, Ordering::Relaxed);
                    if answers_acked {
                        acks_after += 1;
                    }
                }
                Kind::AnnounceResponse(_) if acks_before > 0 => acks_before -= 1,
                Kind::AnnounceResponse(_) if scrape || done => {
                    acks_after = acks_after.saturating_sub(1)
                }
                Kind::AnnounceResponse(size) => {
                    let _ = hists
                        .announce
                        .record(sent_at.elapsed().as_micros().max(1) as u64);
                    let forwarded = (config.offers as u64).min(size.saturating_sub(1));
                    counters
                        .offers_expected
                        .fetch_add(forwarded, Ordering::Relaxed);
                    done = true;
                }
                Kind::Scrape if scrape => done = true,
                Kind::Failure => done = true,
                _ => {}
            }
        }
        acks_before += std::mem::take(&mut acks_after);
    }
    // Drain: count deliveries still in flight, answer nothing new.
    while let Some(wait) = drain_end.checked_duration_since(Instant::now()) {
        match next_frame(&mut ws, wait).await {
            Next::Frame(mut frame) => {
                let kind = decoder.decode_server(&mut frame, |m| classify(m.ok().as_ref()));
                count(&kind, counters);
                count_crossed(&kind, counters, index, config.urls.len());
                hists.record_offer(&kind, epoch, index, config.urls.len());
            }
            _ => break,
        }
    }
    let _ = ws.close(None).await;
    hists
}

/// The connection index a tester peer id encodes (`id_bytes(b'-', index)`).
fn index_of(peer: &PeerId) -> Option<usize> {
    std::str::from_utf8(&peer.0[1..]).ok()?.parse().ok()
}

/// Whether a message from `from` to connection `me` crossed between tracker URLs.
fn crossed(from: &PeerId, me: usize, urls: usize) -> bool {
    urls > 1 && index_of(from).is_some_and(|i| i % urls != me % urls)
}

/// A TOML `url` may be one string or a list.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(u) => vec![u],
        OneOrMany::Many(us) => us,
    })
}

fn id_bytes(prefix: u8, n: u64) -> [u8; 20] {
    let mut b = [0u8; 20];
    b.copy_from_slice(id20(prefix, n).as_bytes());
    b
}

/// Finds out whether the tracker sends an announce response for an answer: one peer offers,
/// the other answers and listens briefly for anything else.
async fn probe_answer_acks(url: &str, connector: Option<Connector>) -> anyhow::Result<bool> {
    let connect =
        || tokio_tungstenite::connect_async_tls_with_config(url, None, true, connector.clone());
    let (mut a, _) = tokio::time::timeout(Duration::from_secs(10), connect()).await??;
    let (mut b, _) = tokio::time::timeout(Duration::from_secs(10), connect()).await??;
    let info_hash = id20(b'P', fastrand::u64(..));
    let (pa, pb) = (id20(b'A', fastrand::u64(..)), id20(b'B', fastrand::u64(..)));
    a.send(Message::text(json!({"action": "announce", "info_hash": info_hash, "peer_id": pa, "left": 1, "numwant": 0}).to_string())).await?;
    recv(&mut a).await.context("no announce response")?;
    let offer = json!({"offer_id": id20(b'o', 1), "offer": {"type": "offer", "sdp": "probe"}});
    b.send(Message::text(json!({"action": "announce", "info_hash": info_hash, "peer_id": pb, "left": 1, "numwant": 1, "offers": [offer]}).to_string())).await?;
    let offered = loop {
        let v = recv(&mut a).await.context("the offer was not forwarded")?;
        if v.get("offer").is_some() {
            break v;
        }
    };
    a.send(Message::text(json!({"action": "announce", "info_hash": info_hash, "peer_id": pa,
        "to_peer_id": offered["peer_id"], "offer_id": offered["offer_id"], "answer": {"type": "answer", "sdp": "probe"}}).to_string())).await?;
    let acked = matches!(
        tokio::time::timeout(Duration::from_millis(500), recv(&mut a)).await,
        Ok(Some(v)) if v.get("interval").is_some() || v.get("complete").is_some()
    );
    let _ = a.close(None).await;
    let _ = b.close(None).await;
    Ok(acked)
}

/// The next text frame as JSON within 5 s, uncounted (probe traffic).
async fn recv(ws: &mut Ws) -> Option<Value> {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return serde_json::from_str::<Value>(&t).ok(),
            Ok(Some(Ok(_))) => continue,
            _ => return None,
        }
    }
}

enum Kind {
    AnnounceResponse(u64),
    /// Offerer, offer id and swarm, to answer it.
    Offer(PeerId, OfferId, InfoHash),
    /// From whom.
    Answer(PeerId),
    Scrape,
    Failure,
    Other,
}

fn classify(m: Option<&ServerMessage<'_>>) -> Kind {
    match m {
        Some(ServerMessage::Announce(r)) => Kind::AnnounceResponse(r.complete + r.incomplete),
        Some(ServerMessage::Offer(o)) => Kind::Offer(o.peer_id, o.offer_id, o.info_hash),
        Some(ServerMessage::Answer(a)) => Kind::Answer(a.peer_id),
        Some(ServerMessage::Scrape(_)) => Kind::Scrape,
        Some(ServerMessage::Error(_)) => Kind::Failure,
        None => Kind::Other,
    }
}

fn count(kind: &Kind, c: &Counters) {
    let counter = match kind {
        Kind::AnnounceResponse(_) => &c.announce_responses,
        Kind::Offer(..) => &c.offers_received,
        Kind::Answer(_) => &c.answers_received,
        Kind::Scrape => &c.scrape_responses,
        Kind::Failure => &c.errors,
        Kind::Other => return,
    };
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Counts offers and answers that came from another URL's connection.
fn count_crossed(kind: &Kind, c: &Counters, me: usize, urls: usize) {
    match kind {
        Kind::Offer(from, ..) if crossed(from, me, urls) => {
            c.offers_crossed.fetch_add(1, Ordering::Relaxed);
        }
        Kind::Answer(from) if crossed(from, me, urls) => {
            c.answers_crossed.fetch_add(1, Ordering::Relaxed);
        }
        _ => {}
    }
}

enum Next {
    Frame(Vec<u8>),
    Timeout,
    Closed,
}

/// The next text frame's bytes, waiting at most `wait`.
async fn next_frame(ws: &mut Ws, wait: Duration) -> Next {
    loop {
        match tokio::time::timeout(wait, ws.next()).await {
            Err(_) => return Next::Timeout,
            Ok(Some(Ok(Message::Text(t)))) => return Next::Frame(t.as_bytes().to_vec()),
            Ok(Some(Ok(_))) => continue,
            Ok(_) => return Next::Closed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn popularity_is_skewed_toward_the_first_swarms() {
        let p = Popularity::new(1000, 1.1);
        let mut rng = fastrand::Rng::with_seed(1);
        let picks: Vec<usize> = (0..10_000).map(|_| p.pick(&mut rng)).collect();
        let hot = picks.iter().filter(|&&i| i < 10).count();
        let tail = picks.iter().filter(|&&i| i >= 500).count();
        assert!(hot > 3000, "hot swarms get a large share: {hot}");
        assert!(tail > 300, "the tail is still visited: {tail}");
        assert!(picks.iter().all(|&i| i < 1000));
        let uniform = Popularity::new(10, 0.0);
        let picks: Vec<usize> = (0..10_000).map(|_| uniform.pick(&mut rng)).collect();
        assert!(picks.iter().filter(|&&i| i == 0).count() < 1300);
    }

    #[test]
    fn a_config_file_names_one_url_or_several_and_peer_ids_give_back_their_connection() {
        let one: TrackerLoadConfig = toml::from_str("url = \"ws://a:1\"").expect("toml");
        assert_eq!(one.urls, vec!["ws://a:1"]);
        let two: TrackerLoadConfig =
            toml::from_str("url = [\"ws://a:1\", \"ws://b:2\"]").expect("toml");
        assert_eq!(two.urls.len(), 2);
        let peer = PeerId(id_bytes(b'-', 12345));
        assert_eq!(index_of(&peer), Some(12345));
        assert!(crossed(&peer, 12344, 2) && !crossed(&peer, 12347, 2));
        assert!(!crossed(&peer, 12344, 1));
    }

    #[test]
    fn offer_ids_carry_their_send_time() {
        let id = OfferId::from_bytes20(&id_bytes(b'o', offer_number(123_456_789, 5)));
        assert_eq!(offer_sent_us(&id), Some(123_456_789));
        assert_eq!(offer_sent_us(&OfferId::new("foreign").expect("fits")), None);
    }

    #[test]
    fn ids_are_20_code_points_and_distinct() {
        assert_eq!(id20(b'h', 5).chars().count(), 20);
        assert_ne!(id20(b'h', 5), id20(b'h', 6));
        assert_eq!(sdp(900, "x").len(), 900);
    }
}
