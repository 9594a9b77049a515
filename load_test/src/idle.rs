//! Connection scale: opens K connections (from several loopback source addresses when one
//! address has too few ephemeral ports), announces each into a swarm, and holds them while a
//! fraction stays active, announcing with offers at a set rate; reports the tracker's RSS per
//! connection (given its pid) and the active announces' latency.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use serde_json::json;
use tokio::net::{TcpSocket, lookup_host};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{Connector, client_async_tls_with_config};

/// Ephemeral ports one source address gives toward one tracker address, with a margin:
/// Linux's default range (32768–60999) holds ~28k.
const CONNECTIONS_PER_SOURCE: usize = 25_000;

/// Options for `tidepool-load-test idle`.
#[derive(Debug, Clone, clap::Args)]
pub struct IdleConfig {
    /// Tracker URL (ws:// or wss://).
    #[arg(long, default_value = "ws://127.0.0.1:8000")]
    pub url: String,
    /// Connections to open.
    #[arg(long, default_value_t = 5000)]
    pub connections: usize,
    /// Swarms they announce into.
    #[arg(long, default_value_t = 500)]
    pub swarms: usize,
    /// Seconds to hold them open after all have announced.
    #[arg(long, default_value_t = 5)]
    pub hold: u64,
    /// Accept any TLS certificate.
    #[arg(long, default_value_t = false)]
    pub insecure: bool,
    /// Loopback source addresses to connect from (127.0.0.1, 127.0.0.2, …); 0 = one per
    /// 25,000 connections.
    #[arg(long, default_value_t = 0)]
    pub sources: usize,
    /// Connections opened at once.
    #[arg(long, default_value_t = 200)]
    pub batch: usize,
    /// Fraction of the connections that stay active while held.
    #[arg(long, default_value_t = 0.0)]
    pub active_fraction: f64,
    /// Milliseconds between an active connection's announces.
    #[arg(long, default_value_t = 1000)]
    pub active_interval_ms: u64,
    /// Offers in each active announce (forwarded to held peers of its swarm).
    #[arg(long, default_value_t = 2)]
    pub offers: usize,
    /// Bytes of SDP in each offer.
    #[arg(long, default_value_t = 200)]
    pub sdp_bytes: usize,
    /// The tracker's pid, to read its RSS before and while the connections are held.
    #[arg(long)]
    pub tracker_pid: Option<u32>,
    /// Write the report as JSON here.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct IdleReport {
    pub url: String,
    pub connections: usize,
    pub opened: usize,
    pub sources: usize,
    pub open_secs: f64,
    /// The tracker's RSS before connecting, once all had announced, and at the end of the hold.
    pub rss_before_kib: Option<u64>,
    pub rss_ready_kib: Option<u64>,
    pub rss_end_kib: Option<u64>,
    /// (ready − before) / opened.
    pub rss_per_connection_kib: Option<f64>,
    pub active: usize,
    pub active_announces: u64,
    pub latency_p50_us: u64,
    pub latency_p99_us: u64,
    pub latency_max_us: u64,
    /// The kernel's slab memory (sockets, their files and buffers) per socket, from
    /// /proc/meminfo before and once all had announced; both ends of every loopback
    /// connection are sockets on this machine, so the delta is split over 2 × opened.
    pub kernel_slab_per_socket_kib: Option<f64>,
    /// Offers the held connections received from the active ones.
    pub offers_received: u64,
    /// Connections the tracker closed during the hold.
    pub closed_during_hold: u64,
}

fn slab_kib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("Slab:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

fn rss_kib(pid: Option<u32>) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid?)).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Counters the connections' tasks share.
#[derive(Debug, Default)]
struct Shared {
    offers: AtomicU64,
    closed: AtomicU64,
    announces: AtomicU64,
}

/// Opens, announces, prints `READY <n>` when every connection has its response, holds (the
/// active fraction announcing), prints the report, exits.
pub fn run(config: IdleConfig) -> anyhow::Result<IdleReport> {
    // Every connection is a descriptor here too: take the most the hard limit allows.
    let limit = rlimit::increase_nofile_limit(u64::MAX).context("raising the descriptor limit")?;
    if limit < config.connections as u64 + 64 {
        bail!(
            "{} connections need {} descriptors, but this process may open only {limit} \
             (hard limit; see deploy/README.md for raising it)",
            config.connections,
            config.connections + 64
        );
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("runtime")?;
    let report = runtime.block_on(run_async(config.clone()))?;
    print_report(&report);
    if let Some(path) = &config.json_out {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(report)
}

async fn run_async(config: IdleConfig) -> anyhow::Result<IdleReport> {
    let tls = config.url.starts_with("wss://");
    let connector = if tls {
        Some(Connector::Rustls(Arc::new(crate::tls::client_config(
            config.insecure,
        )?)))
    } else {
        None
    };
    let host_port = config
        .url
        .split_once("://")
        // The authority only: a path or a query (`/?token=…`) follows it.
        .and_then(|(_, rest)| rest.split(['/', '?']).next())
        .context("URL needs a scheme")?;
    let target: SocketAddr = lookup_host(host_port)
        .await
        .with_context(|| format!("resolving {host_port}"))?
        .next()
        .context("no address")?;
    let sources = match config.sources {
        0 => config.connections.div_ceil(CONNECTIONS_PER_SOURCE).max(1),
        n => n,
    };
    if sources > 1 && !target.ip().is_loopback() {
        bail!("several source addresses are for loopback trackers (127.0.0.0/8) only");
    }
    let source = |i: usize| {
        (sources > 1).then(|| {
            IpAddr::V4(Ipv4Addr::from(
                u32::from(Ipv4Addr::LOCALHOST) + (i % sources) as u32,
            ))
        })
    };
    let rss_before = rss_kib(config.tracker_pid);
    let slab_before = slab_kib();
    let shared = Arc::new(Shared::default());

    let (latency_tx, mut latency_rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let (phase_tx, phase_rx) = tokio::sync::watch::channel(Phase::Opening);
    let started = Instant::now();
    let mut opened = 0;
    let mut active = 0;
    let indices: Vec<usize> = (0..config.connections).collect();
    for batch in indices.chunks(config.batch.max(1)) {
        let results = futures_util::future::join_all(batch.iter().map(|&i| {
            let (url, connector) = (config.url.clone(), connector.clone());
            let swarm = i % config.swarms.max(1);
            let from = source(i);
            let open = async move {
                let socket = match target {
                    SocketAddr::V4(_) => TcpSocket::new_v4(),
                    SocketAddr::V6(_) => TcpSocket::new_v6(),
                }
                .ok()?;
                if let Some(ip) = from {
                    socket.bind(SocketAddr::new(ip, 0)).ok()?;
                }
                let tcp = socket.connect(target).await.ok()?;
                let _ = tcp.set_nodelay(true);
                let (mut ws, _) = client_async_tls_with_config(url, tcp, None, connector)
                    .await
                    .ok()?;
                let announce = json!({"action": "announce", "info_hash": format!("{swarm:0>20}"),
                    "peer_id": format!("{i:-<20}"), "event": "started", "left": 1, "numwant": 0});
                ws.send(Message::text(announce.to_string())).await.ok()?;
                // Held only once the tracker has taken it into its swarm.
                match ws.next().await {
                    Some(Ok(Message::Text(reply))) if reply.contains("\"interval\"") => {
                        Some((i, swarm, ws))
                    }
                    _ => None,
                }
            };
            // A tracker that stalls one connection cannot hang the whole batch.
            async move {
                tokio::time::timeout(Duration::from_secs(30), open)
                    .await
                    .ok()
                    .flatten()
            }
        }))
        .await;
        for (i, swarm, ws) in results.into_iter().flatten() {
            opened += 1;
            // Chosen independently of the swarm (`i % swarms`), so the active peers spread over
            // the swarms instead of filling a few of them.
            let is_active = config.active_fraction > 0.0
                && fastrand::Rng::with_seed(i as u64).f64() < config.active_fraction;
            active += usize::from(is_active);
            let shared = shared.clone();
            let phase = phase_rx.clone();
            let latency = latency_tx.clone();
            let plan = is_active.then(|| ActivePlan {
                info_hash: format!("{swarm:0>20}"),
                peer_id: format!("{i:-<20}"),
                every: Duration::from_millis(config.active_interval_ms.max(1)),
                offers: config.offers,
                sdp_bytes: config.sdp_bytes,
            });
            tokio::spawn(hold(ws, plan, shared, phase, latency));
        }
    }
    drop(latency_tx);
    let open_secs = started.elapsed().as_secs_f64();
    println!("READY {opened}");
    // Let the last batch's replies and the allocator settle before reading the RSS.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_ready = rss_kib(config.tracker_pid);
    let slab_ready = slab_kib();
    // Active traffic starts now, not while connections were still opening.
    let _ = phase_tx.send(Phase::Holding);
    let mut hist =
        hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).context("histogram")?;
    let hold_until = tokio::time::Instant::now() + Duration::from_secs(config.hold);
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(hold_until) => break,
            us = latency_rx.recv() => match us {
                Some(us) => { let _ = hist.record(us.max(1)); }
                None => tokio::time::sleep_until(hold_until).await,
            },
        }
    }
    let rss_end = rss_kib(config.tracker_pid);
    let _ = phase_tx.send(Phase::Stopping);
    while let Ok(us) = latency_rx.try_recv() {
        let _ = hist.record(us.max(1));
    }
    let per_connection = match (rss_before, rss_ready) {
        (Some(b), Some(r)) if opened > 0 => Some((r as f64 - b as f64) / opened as f64),
        _ => None,
    };
    Ok(IdleReport {
        url: config.url.clone(),
        connections: config.connections,
        opened,
        sources,
        open_secs,
        rss_before_kib: rss_before,
        rss_ready_kib: rss_ready,
        rss_end_kib: rss_end,
        rss_per_connection_kib: per_connection,
        kernel_slab_per_socket_kib: match (slab_before, slab_ready) {
            (Some(b), Some(r)) if opened > 0 => Some((r as f64 - b as f64) / (2 * opened) as f64),
            _ => None,
        },
        active,
        active_announces: shared.announces.load(Relaxed),
        latency_p50_us: hist.value_at_quantile(0.5),
        latency_p99_us: hist.value_at_quantile(0.99),
        latency_max_us: hist.max(),
        offers_received: shared.offers.load(Relaxed),
        closed_during_hold: shared.closed.load(Relaxed),
    })
}

/// Where the run is: the active connections announce only while holding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Opening,
    Holding,
    Stopping,
}

/// What an active connection sends.
struct ActivePlan {
    info_hash: String,
    peer_id: String,
    every: Duration,
    offers: usize,
    sdp_bytes: usize,
}

/// Holds one connection: reads (and counts) what arrives, and if active announces with
/// offers every `plan.every` while holding, timing each announce to its reply.
async fn hold<S>(
    ws: tokio_tungstenite::WebSocketStream<S>,
    plan: Option<ActivePlan>,
    shared: Arc<Shared>,
    mut phase: tokio::sync::watch::Receiver<Phase>,
    latency: tokio::sync::mpsc::UnboundedSender<u64>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut tx, mut rx) = ws.split();
    let mut sent: std::collections::VecDeque<Instant> = Default::default();
    let mut tick: Option<tokio::time::Interval> = None;
    let mut counter = 0u64;
    loop {
        let next_tick = async {
            match tick.as_mut() {
                Some(t) => {
                    t.tick().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = phase.changed() => {
                let now = *phase.borrow();
                if changed.is_err() || now == Phase::Stopping {
                    return;
                }
                if let (Phase::Holding, Some(p), None) = (now, &plan, &tick) {
                    // A random phase, so the active announces spread over the interval.
                    let first = tokio::time::Instant::now() + p.every.mul_f64(fastrand::f64());
                    let mut t = tokio::time::interval_at(first, p.every);
                    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    tick = Some(t);
                }
            }
            () = next_tick => {
                let Some(p) = &plan else { continue };
                counter += 1;
                let sdp = "x".repeat(p.sdp_bytes);
                let offers: Vec<_> = (0..p.offers)
                    .map(|k| json!({"offer": {"type": "offer", "sdp": sdp},
                                    "offer_id": format!("{counter:0>12}{k:0>8}")}))
                    .collect();
                let announce = json!({"action": "announce", "info_hash": p.info_hash,
                    "peer_id": p.peer_id, "left": 1, "numwant": p.offers, "offers": offers});
                // Timed from before the send: a send that waits on a full socket is latency too.
                sent.push_back(Instant::now());
                if tx.send(Message::text(announce.to_string())).await.is_err() {
                    shared.closed.fetch_add(1, Relaxed);
                    return;
                }
                shared.announces.fetch_add(1, Relaxed);
            }
            msg = rx.next() => match msg {
                Some(Ok(Message::Text(text))) => {
                    if text.contains("\"offer\"") || text.contains("\"answer\"") {
                        shared.offers.fetch_add(u64::from(text.contains("\"offer\"")), Relaxed);
                    } else if let Some(at) = sent.pop_front() {
                        // An announce reply or a failure: either answers the oldest announce.
                        let _ = latency.send(at.elapsed().as_micros() as u64);
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => {
                    if *phase.borrow() == Phase::Holding {
                        shared.closed.fetch_add(1, Relaxed);
                    }
                    return;
                }
            },
        }
    }
}

fn print_report(r: &IdleReport) {
    println!(
        "{} of {} connections open ({} source address(es)) in {:.1} s",
        r.opened, r.connections, r.sources, r.open_secs
    );
    if let (Some(b), Some(ready), Some(per)) =
        (r.rss_before_kib, r.rss_ready_kib, r.rss_per_connection_kib)
    {
        println!(
            "tracker RSS {:.1} MiB -> {:.1} MiB: {per:.2} KiB per connection (end of hold: {:.1} MiB)",
            b as f64 / 1024.0,
            ready as f64 / 1024.0,
            r.rss_end_kib.unwrap_or(0) as f64 / 1024.0
        );
    }
    if let Some(slab) = r.kernel_slab_per_socket_kib {
        println!("kernel slab memory: {slab:.2} KiB per socket (both ends of each connection)");
    }
    if r.active > 0 {
        println!(
            "{} active: {} announces, latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; {} offers delivered to held peers; {} closed during the hold",
            r.active,
            r.active_announces,
            r.latency_p50_us as f64 / 1000.0,
            r.latency_p99_us as f64 / 1000.0,
            r.latency_max_us as f64 / 1000.0,
            r.offers_received,
            r.closed_during_hold
        );
    }
}
