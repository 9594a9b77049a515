//! Hostile peers against real nodes on loopback: a scripted peer speaks the pool protocol
//! by hand — it floods offers, floods requests and cancels, stops reading, announces
//! chunks it never sends, pushes chunks nobody asked for. Each time an honest download
//! from the same seeder still completes, the process stays within the pipeline's memory
//! bound, and the hostile peer is dropped or ignored with a counter that says so. Also: a
//! download whose final re-hash outlasts the heartbeat timeout keeps its connections.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::pool::*;
use common::*;
use tidepool_node::pool::{FileId, Pool, PoolConfig};
use tidepool_node::{Channel, Event, Node, PeerId};
use tidepool_protocol::pool::{ChunkRanges, PoolMessage};

struct Scene {
    tracker: tidepool_tracker::Tracker,
    dir: PathBuf,
    source: PathBuf,
    id: FileId,
    seeder: Pool,
    raw: std::sync::Arc<Node>,
    seeder_peer: PeerId,
    tag: &'static str,
}

/// A seeder sharing 1 MiB, and a raw node connected to it that the test scripts (`tune`
/// applies to both nodes' configs).
async fn scene(
    tag: &'static str,
    seeder: PoolConfig,
    tune: impl Fn(&mut tidepool_node::NodeConfig),
) -> Scene {
    let tracker = tracker();
    let dir = temp(tag);
    let source = random_file(&dir, 1 << 20);
    let mut c = node_config(&tracker, tag);
    tune(&mut c);
    let seeder = pool(c, seeder).await;
    let id = seeder.share(&source).expect("shares");
    let mut c = node_config(&tracker, tag);
    tune(&mut c);
    let raw = std::sync::Arc::new(Node::join(c).await.expect("joins"));
    let seeder_peer = next_peer(&raw).await;
    Scene {
        tracker,
        dir,
        source,
        id,
        seeder,
        raw,
        seeder_peer,
        tag,
    }
}

async fn send(raw: &Node, peer: PeerId, channel: Channel, msg: &PoolMessage) -> bool {
    let mut frame = Vec::new();
    msg.encode(&mut frame);
    raw.send(peer, channel, &frame).await.is_ok()
}

/// Keeps the raw node's events flowing (a peer that reads what it is sent).
fn keep_reading(raw: std::sync::Arc<Node>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move { while raw.next_event().await.is_some() {} })
}

fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

impl Scene {
    /// An honest downloader gets the file from the seeder; returns it for more checks.
    async fn honest_download(&self) -> Pool {
        let downloader = pool(node_config(&self.tracker, self.tag), pool_config()).await;
        let target = self.dir.join("copy.bin");
        let download = start_get(&downloader, self.id, &target).await;
        finishes_identical(download, &self.source, "the honest download").await;
        downloader
    }

    /// The test process holds the seeder, the raw node and a downloader: each within the
    /// pipeline's bound for its connections (the raw node is counted as a pool node too).
    fn within_memory_bound(&self) {
        let c = node_config(&self.tracker, self.tag);
        let bound = 3 * Pool::memory_bound(&c, &PoolConfig::default(), 2);
        let now = rss();
        assert!(now < bound, "RSS {now} over the bound {bound}");
    }

    fn finish(self) {
        self.tracker.shutdown();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn offer(origin: PeerId, seq: u64, name: String, have: ChunkRanges) -> PoolMessage {
    PoolMessage::FileOffer {
        origin,
        seq,
        hops: 2,
        meta: tidepool_protocol::pool::FileMeta {
            name,
            size: 1 << 20,
            chunk_size: 64 * 1024,
            root: [seq as u8; 32],
        },
        have,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_offering_a_hundred_thousand_files_is_rate_limited_and_an_honest_download_completes()
{
    let _serial = one_at_a_time().await;
    let s = scene("offer-flood", pool_config(), |_| {}).await;
    let raw = s.raw.clone();
    let reader = keep_reading(raw.clone());
    let started = Instant::now();
    let mut sent = 0u64;
    for i in 0..100_000u64 {
        let m = offer(raw.peer_id(), i, format!("spam-{i}"), ChunkRanges::full(16));
        if !send(&raw, s.seeder_peer, Channel::Control, &m).await {
            break;
        }
        sent += 1;
    }
    // Until the seeder has read them all, or its reading stopped moving (the data channel
    // may hold the tail of such a flood back for long: webrtc's receive back-pressure).
    let (deadline, mut last, mut still) = (Instant::now() + WAIT, 0, 0);
    while Instant::now() < deadline && still < 20 {
        let heard = s.seeder.engine_stats().offers_heard;
        if heard >= sent {
            break;
        }
        still = if heard == last { still + 1 } else { 0 };
        last = heard;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stats = s.seeder.engine_stats();
    assert!(
        stats.offers_heard > 50_000,
        "most of the flood arrived: {stats:?}"
    );
    let took = started.elapsed().as_secs_f64();
    let c = PoolConfig::default();
    let allowed = f64::from(c.offer_burst) + took * f64::from(c.offer_rate) + 1.0;
    let stats = s.seeder.engine_stats();
    let taken = stats.offers_heard - stats.offers_ignored;
    assert!(
        taken as f64 <= allowed,
        "{taken} offers taken in {took:.1} s: {stats:?}"
    );
    assert!(stats.catalog_files <= c.max_catalog as u64, "{stats:?}");
    s.honest_download().await;
    s.within_memory_bound();
    reader.abort();
    s.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_requests_and_cancels_stays_bounded_and_an_honest_download_completes() {
    let _serial = one_at_a_time().await;
    let s = scene("request-flood", pool_config(), |_| {}).await;
    let raw = s.raw.clone();
    let reader = keep_reading(raw.clone());
    for i in 1..=20_000u64 {
        let req = PoolMessage::FileRequest {
            request_id: i,
            requester: raw.peer_id(),
            file_id: s.id,
            requested: ChunkRanges::full(16),
            promised: ChunkRanges::new(),
            from_origin: i % 2 == 0,
            hops_left: 3,
        };
        let cancel = PoolMessage::Cancel {
            request_id: i,
            file_id: s.id,
        };
        if !send(&raw, s.seeder_peer, Channel::Control, &req).await
            || !send(&raw, s.seeder_peer, Channel::Control, &cancel).await
        {
            break;
        }
    }
    // Its tables stay within their bounds.
    let stats = s.seeder.engine_stats();
    let c = PoolConfig::default();
    assert!(stats.queued_chunks <= c.request_queue, "{stats:?}");
    assert!(stats.relayed_requests <= c.max_relayed as u64, "{stats:?}");
    // The seeder keeps serving everyone else meanwhile.
    s.honest_download().await;
    s.within_memory_bound();
    reader.abort();
    s.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_reads_its_control_channel_is_dropped_once_its_outbox_fills() {
    let _serial = one_at_a_time().await;
    let seeder = PoolConfig {
        control_outbox_bytes: 64 * 1024,
        ..pool_config()
    };
    // Only the full outbox may end the connection: heartbeats on both sides are given all
    // the time they want (the raw node, not reading, does not see the seeder's pings).
    let s = scene("never-reads", seeder, |c| {
        c.heartbeat_timeout = Duration::from_secs(120);
    })
    .await;
    // Requests for a file the seeder does not know are answered Unavailable with the same
    // ranges: 4,000 ranges make each answer ~32 KiB. The raw node takes no event from here
    // on, so its channels stop reading once its event queue is full.
    let many: ChunkRanges = (0..4000u32).fold(ChunkRanges::new(), |mut r, i| {
        r.insert(2 * i..2 * i + 1);
        r
    });
    let deadline = Instant::now() + WAIT;
    let mut sent = 0;
    while s.seeder.dropped_slow_readers() == 0 && Instant::now() < deadline {
        let req = PoolMessage::FileRequest {
            request_id: sent,
            requester: s.raw.peer_id(),
            file_id: FileId([9; 32]),
            requested: many.clone(),
            promised: ChunkRanges::new(),
            from_origin: false,
            hops_left: 0,
        };
        let ok = tokio::time::timeout(
            Duration::from_secs(1),
            send(&s.raw, s.seeder_peer, Channel::Control, &req),
        )
        .await;
        if !matches!(ok, Ok(true)) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        sent += 1;
    }
    assert!(
        s.seeder.dropped_slow_readers() >= 1,
        "dropped after {sent} requests; seeder sees {:?}; {:?}",
        s.seeder.node().peers().await,
        s.seeder.engine_stats()
    );
    s.honest_download().await;
    s.within_memory_bound();
    s.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_announcing_chunks_it_never_sends_costs_a_stall_and_the_download_completes() {
    let _serial = one_at_a_time().await;
    let s = scene("liar", pool_config(), |_| {}).await;
    // A few chunks per request, so both sources are asked.
    let mut spread = pool_config();
    spread.fetch.max_in_flight = 4;
    let downloader = pool(node_config(&s.tracker, s.tag), spread).await;
    let liar_sees = next_peer(&s.raw).await;
    assert_eq!(liar_sees, downloader.node().peer_id());
    // "I hold every chunk", as the file's holder — then silence.
    let meta = tidepool_node::store::SharedFile::open(&s.source, 64 * 1024)
        .expect("meta")
        .meta()
        .clone();
    let lie = PoolMessage::FileOffer {
        origin: s.raw.peer_id(),
        seq: 1,
        hops: 0,
        meta,
        have: ChunkRanges::full(16),
    };
    assert!(send(&s.raw, liar_sees, Channel::Control, &lie).await);
    // The liar reads (and counts) what it is asked, and answers nothing.
    let asked = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let reader = tokio::spawn({
        let (raw, asked) = (s.raw.clone(), asked.clone());
        async move {
            while let Some(e) = raw.next_event().await {
                if let Event::Message { data, .. } = e
                    && let Ok(PoolMessage::FileRequest { requested, .. }) =
                        PoolMessage::decode(&data, &Default::default())
                {
                    asked.fetch_add(requested.len(), std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
    });
    let target = s.dir.join("copy.bin");
    let download = start_get(&downloader, s.id, &target).await;
    let progress = download.progress.clone();
    finishes_identical(download, &s.source, "around the liar").await;
    let p = progress.borrow().clone();
    let asked = asked.load(std::sync::atomic::Ordering::Relaxed);
    assert!(asked > 0, "the liar was asked for chunks");
    // Each chunk it was asked for came from the seeder after one stall, not from it.
    assert!(p.missing_rounds >= 1, "{p:?}");
    assert!(
        asked <= 16,
        "never asked again for chunks it did not send: {asked}"
    );
    s.within_memory_bound();
    reader.abort();
    s.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_pushing_chunks_nobody_asked_for_is_dropped_and_an_honest_download_completes() {
    let _serial = one_at_a_time().await;
    let s = scene("unsolicited", pool_config(), |_| {}).await;
    let raw = s.raw.clone();
    let reader = keep_reading(raw.clone());
    let data = bytes::Bytes::from(vec![7u8; 64 * 1024]);
    for i in 0..1100u32 {
        let chunk = PoolMessage::Chunk {
            file_id: FileId([8; 32]),
            request_id: u64::from(i),
            index: i,
            proof: vec![],
            data: data.clone(),
        };
        if !send(&raw, s.seeder_peer, Channel::Chunks, &chunk).await {
            break;
        }
    }
    eventually("the pusher is dropped", || s.seeder.dropped_peers() >= 1).await;
    assert!(s.seeder.engine_stats().chunks_unsolicited >= 1024);
    s.honest_download().await;
    s.within_memory_bound();
    reader.abort();
    s.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finishing_a_file_whose_rehash_outlasts_the_heartbeat_timeout_keeps_every_connection() {
    let _serial = one_at_a_time().await;
    let tracker = tracker();
    let dir = temp("rehash");
    let source = random_file(&dir, 16 << 20);
    // The re-hash is made to take three heartbeat timeouts (a test hook: hashing a file
    // that big for real would not fit a test).
    let timeout = Duration::from_secs(2);
    let config = || {
        let mut c = node_config(&tracker, "rehash");
        c.heartbeat_timeout = timeout;
        c
    };
    let seeder = pool(config(), pool_config()).await;
    let id = seeder.share(&source).expect("shares");
    let slow = PoolConfig {
        slow_finish: 3 * timeout,
        ..pool_config()
    };
    let downloader = pool(config(), slow).await;
    let download = start_get(&downloader, id, &dir.join("copy.bin")).await;
    // Running: the connection that carries the file is up.
    let started = Instant::now();
    finishes_identical(download, &source, "large file").await;
    assert!(started.elapsed() > 3 * timeout, "the finish was slow");
    // The connection that carried the file is the one still up: never dropped and redone.
    let peers = downloader.node().peers().await;
    assert_eq!(peers.len(), 1, "{peers:?}");
    let up_for = peers[0].connected_for.expect("connected");
    assert!(up_for >= started.elapsed(), "reconnected: {up_for:?}");
    tracker.shutdown();
    let _ = std::fs::remove_dir_all(dir);
}
