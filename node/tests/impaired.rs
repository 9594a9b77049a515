//! Links that misbehave the way real ones do: a stretch where a peer's data is lost while its
//! acknowledgements get through pushes SCTP's retransmission timer into backoff (1 s, 2 s,
//! 4 s…), so nothing of the peer's arrives for longer than the heartbeat timeout although
//! the peer is alive and acknowledging; the connection must survive it. A peer whose frames
//! never get through again is still dropped, at `max_silence`.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use common::*;
use tidepool_node::udp::{IMPAIRED_DROPS, Impairment, OutageClock};
use tidepool_node::{Channel, DisconnectReason, Event, Node, NodeConfig, PeerId};

/// The drop counter is process-wide and both tests load the machine: one at a time.
async fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::OnceLock<tokio::sync::Mutex<()>> = std::sync::OnceLock::new();
    LOCK.get_or_init(|| tokio::sync::Mutex::new(()))
        .lock()
        .await
}

/// One connection per node, pings every 500 ms, a 2 s heartbeat timeout.
fn short_heartbeats(
    tracker: &tidepool_tracker::Tracker,
    pool: &str,
    max_silence: Duration,
) -> NodeConfig {
    let mut cfg = config(tracker, pool);
    cfg.max_peers = 1;
    cfg.heartbeat_interval = Duration::from_millis(500);
    cfg.heartbeat_timeout = Duration::from_secs(2);
    cfg.max_silence = max_silence;
    cfg
}

/// A receiver, and a sender whose full-size datagrams (its data; acknowledgements and pings
/// are small) are lost for `outage` once the returned clock is started.
async fn pair(cfg: &NodeConfig, outage: Duration) -> (Node, Arc<Node>, PeerId, OutageClock) {
    let receiver = node(cfg.clone()).await;
    let clock = OutageClock::default();
    let mut sender_cfg = cfg.clone();
    sender_cfg.peer_id = tidepool_node::config::random_peer_id();
    sender_cfg.impairment = Some(Impairment {
        outage,
        outage_min_bytes: 500,
        outage_clock: Some(clock.clone()),
        ..Impairment::default()
    });
    let sender = Arc::new(node(sender_cfg).await);
    let peer = connected_to(&sender).await;
    (receiver, sender, peer, clock)
}

/// Sends 16 KiB every 5 ms until `until` (or the connection ends); each send waits while the
/// buffer is full.
fn pump(sender: Arc<Node>, peer: PeerId, until: Instant) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let payload = vec![7u8; 16 << 10];
        let mut sent = 0u64;
        while Instant::now() < until {
            match tokio::time::timeout(
                Duration::from_secs(1),
                sender.send(peer, Channel::Chunks, &payload),
            )
            .await
            {
                Ok(Ok(_)) => sent += 1,
                Ok(Err(_)) => break,
                Err(_) => {} // the link is stalled
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        sent
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_lost_for_seconds_while_acks_get_through_outlasts_the_heartbeat_timeout_and_keeps_the_link()
 {
    let _serial = one_at_a_time().await;
    let tracker = tracker();
    let cfg = short_heartbeats(&tracker, "outage", Duration::from_secs(60));
    // The outage alone outlasts the heartbeat timeout; SCTP's backoff stretches it further.
    let outage = Duration::from_millis(3500);
    let (receiver, sender, peer, clock) = pair(&cfg, outage).await;
    let end = Instant::now() + Duration::from_secs(40);
    let pump = pump(sender.clone(), peer, end);
    let drops_before = IMPAIRED_DROPS.load(Relaxed);

    // The outage starts once data flows; the receiver notes each arrival, and any disconnect.
    let mut arrivals = Vec::new();
    let mut outage_started = None;
    while let Ok(event) = tokio::time::timeout_at(end.into(), receiver.next_event()).await {
        match event.expect("receiver running") {
            Event::Message { .. } => {
                let now = Instant::now();
                arrivals.push(now);
                if outage_started.is_none() {
                    clock.start();
                    outage_started = Some(now);
                }
                // Done once data has flowed again for a while after the outage (SCTP's
                // backoff decides when: seconds after it ends).
                let after = outage_started
                    .map_or(0, |t| arrivals.iter().filter(|a| **a > t + outage).count());
                if after >= 10 {
                    break;
                }
            }
            Event::PeerDisconnected { reason, .. } => {
                let since = outage_started.map(|t| t.elapsed());
                panic!("receiver dropped the sender {since:?} into the outage: {reason:?}")
            }
            _ => {}
        }
    }
    pump.abort();
    let started = outage_started.expect("data flowed before the outage");
    let longest_gap = arrivals
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    let drops = IMPAIRED_DROPS.load(Relaxed) - drops_before;
    eprintln!(
        "received {}, longest silence {longest_gap:?}, dropped datagrams {drops}",
        arrivals.len()
    );
    assert!(drops > 0, "the outage dropped datagrams");
    // The receiver really heard nothing for longer than its heartbeat timeout…
    assert!(
        longest_gap > cfg.heartbeat_timeout,
        "silent for longer than the heartbeat timeout ({longest_gap:?})"
    );
    // …and data flowed again over the same connection afterwards.
    let after = arrivals.iter().filter(|t| **t > started + outage).count();
    assert!(after >= 10, "{after} messages arrived after the outage");
    assert!(sender.connected_peers().contains(&receiver.peer_id()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_acknowledges_but_never_gets_a_frame_through_is_dropped_after_max_silence() {
    let _serial = one_at_a_time().await;
    let tracker = tracker();
    let cfg = short_heartbeats(&tracker, "mute", Duration::from_secs(6));
    // Once data flows, the sender's full-size datagrams never arrive again: its
    // acknowledgements keep the link looking alive, but none of its frames gets through.
    let (receiver, sender, peer, clock) = pair(&cfg, Duration::from_secs(3600)).await;
    let pump = pump(sender, peer, Instant::now() + Duration::from_secs(60));
    let mut last_message = None;
    let reason = expect_event(&receiver, |e| match e {
        Event::Message { .. } => {
            clock.start();
            last_message = Some(Instant::now());
            None
        }
        Event::PeerDisconnected { reason, .. } => Some(reason.clone()),
        _ => None,
    })
    .await;
    pump.abort();
    let silent_for = last_message.expect("data flowed first").elapsed();
    assert_eq!(reason, DisconnectReason::HeartbeatTimeout);
    // Kept well past the heartbeat timeout (its acknowledgements counted), dropped at the
    // silence limit. The last message was taken from the event queue at most a little after
    // it arrived, so the lower bound leaves room.
    assert!(
        silent_for > cfg.heartbeat_timeout + Duration::from_secs(2)
            && silent_for < cfg.max_silence + Duration::from_secs(3),
        "dropped {silent_for:?} after its last message"
    );
}
