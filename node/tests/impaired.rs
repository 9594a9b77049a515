//! Links that misbehave the way real ones do: a stretch where a peer's data is lost while its
//! acknowledgements get through pushes SCTP's retransmission timer into backoff (1 s, 2 s,
//! 4 s…), so nothing of the peer's arrives for longer than the heartbeat timeout although
//! the peer is alive and acknowledging; the connection must survive it.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tidepool_node::udp::{IMPAIRED_DROPS, Impairment};
use tidepool_node::{Channel, Event};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_lost_for_seconds_while_acks_get_through_outlasts_the_heartbeat_timeout_and_keeps_the_link()
 {
    let tracker = tracker();
    let mut cfg = config(&tracker, "outage");
    cfg.max_peers = 1;
    cfg.heartbeat_interval = Duration::from_millis(500);
    cfg.heartbeat_timeout = Duration::from_secs(5);
    cfg.max_silence = Duration::from_secs(60);
    let receiver = node(cfg.clone()).await;
    // The sender loses every full-size datagram 3 to 6.5 s after it starts: its data (and
    // the retransmissions at +1 s and +3 s) vanish, its acknowledgements do not.
    let mut sender_cfg = cfg.clone();
    sender_cfg.peer_id = tidepool_node::config::random_peer_id();
    let outage_after = Duration::from_secs(3);
    sender_cfg.impairment = Some(Impairment {
        outage_after,
        outage: Duration::from_millis(3500),
        outage_min_bytes: 500,
        ..Impairment::default()
    });
    let started = Instant::now();
    let sender = Arc::new(node(sender_cfg).await);
    let peer = connected_to(&sender).await;
    assert!(
        started.elapsed() < outage_after,
        "connected before the outage ({:?})",
        started.elapsed()
    );
    let drops_before = IMPAIRED_DROPS.load(std::sync::atomic::Ordering::Relaxed);

    // 16 KiB every 5 ms until 14 s after the start; the send waits when the buffer is full.
    let pump = {
        let sender = sender.clone();
        tokio::spawn(async move {
            let payload = vec![7u8; 16 << 10];
            let mut sent = 0u64;
            while started.elapsed() < Duration::from_secs(14) {
                match tokio::time::timeout(
                    Duration::from_secs(1),
                    sender.send(peer, Channel::Chunks, &payload),
                )
                .await
                {
                    Ok(Ok(_)) => sent += 1,
                    Ok(Err(e)) => panic!("send failed: {e}"),
                    Err(_) => {} // waiting for buffer space: the link is stalled
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            sent
        })
    };
    // The receiver notes when each message arrives, and any disconnect.
    let mut arrivals = Vec::new();
    let deadline = started + Duration::from_secs(16);
    while let Ok(event) = tokio::time::timeout_at(deadline.into(), receiver.next_event()).await {
        match event.expect("receiver running") {
            Event::Message { .. } => arrivals.push(started.elapsed()),
            Event::PeerDisconnected { reason, .. } => {
                panic!(
                    "receiver dropped the sender at {:?}: {reason:?}",
                    started.elapsed()
                )
            }
            _ => {}
        }
    }
    let sent = pump.await.expect("pump");
    let longest_gap = arrivals
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    let drops = IMPAIRED_DROPS.load(std::sync::atomic::Ordering::Relaxed) - drops_before;
    eprintln!(
        "sent {sent}, received {}, longest silence {longest_gap:?}, dropped datagrams {drops}",
        arrivals.len()
    );
    assert!(drops > 0, "the outage dropped datagrams");
    // The scenario really outlasted the heartbeat timeout…
    assert!(
        longest_gap > cfg.heartbeat_timeout,
        "the sender's data was silent for longer than the heartbeat timeout ({longest_gap:?})"
    );
    // …and data flowed again over the same connection afterwards.
    assert!(
        arrivals
            .last()
            .is_some_and(|t| *t > Duration::from_secs(11)),
        "data arrived after the outage: last at {:?}",
        arrivals.last()
    );
    assert!(sender.connected_peers().contains(&receiver.peer_id()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_acknowledges_but_never_gets_a_frame_through_is_dropped_after_max_silence() {
    let tracker = tracker();
    let mut cfg = config(&tracker, "mute");
    cfg.max_peers = 1;
    cfg.heartbeat_interval = Duration::from_millis(500);
    cfg.heartbeat_timeout = Duration::from_secs(2);
    cfg.max_silence = Duration::from_secs(6);
    let receiver = node(cfg.clone()).await;
    // From 2 s on the sender's full-size datagrams never arrive again: its acknowledgements
    // keep the link looking alive, but none of its frames gets through.
    let mut sender_cfg = cfg.clone();
    sender_cfg.peer_id = tidepool_node::config::random_peer_id();
    sender_cfg.impairment = Some(Impairment {
        outage_after: Duration::from_secs(2),
        outage: Duration::from_secs(3600),
        outage_min_bytes: 500,
        ..Impairment::default()
    });
    let sender = Arc::new(node(sender_cfg).await);
    let peer = connected_to(&sender).await;
    let pump = {
        let sender = sender.clone();
        tokio::spawn(async move {
            let payload = vec![7u8; 16 << 10];
            // Ends when the connection does.
            while sender.send(peer, Channel::Chunks, &payload).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let mut last_message = Instant::now();
    let reason = expect_event(&receiver, |e| match e {
        Event::Message { .. } => {
            last_message = Instant::now();
            None
        }
        Event::PeerDisconnected { reason, .. } => Some(reason.clone()),
        _ => None,
    })
    .await;
    let silent_for = last_message.elapsed();
    assert_eq!(reason, tidepool_node::DisconnectReason::HeartbeatTimeout);
    // Kept past the heartbeat timeout (its acks counted), dropped at the silence limit.
    assert!(
        silent_for >= cfg.max_silence && silent_for < cfg.max_silence + Duration::from_secs(3),
        "dropped {silent_for:?} after its last message"
    );
    pump.abort();
}
