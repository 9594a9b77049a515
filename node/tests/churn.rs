//! Peers that vanish and trackers that restart: a node killed with SIGKILL is noticed by the
//! heartbeat and its slot refilled from new offers; a tracker restart drops no peer
//! connection; glare (both sides offering at once) settles on one working connection.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use tidepool_node::{Channel, DisconnectReason, Event, TrackerState};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_is_noticed_by_heartbeat_and_replaced_from_new_offers() {
    let tracker = tracker();
    let mut cfg = config(&tracker, "churn");
    cfg.max_peers = 1;
    // This test is about the heartbeat: no node makes room for the waiting one.
    cfg.rotate_after = Duration::from_secs(600);
    let heartbeat_timeout = cfg.heartbeat_timeout;
    let a = node(cfg.clone()).await;
    // The victim is a real process, so SIGKILL leaves no goodbye on the wire.
    let mut victim = Command::new(env!("CARGO_BIN_EXE_tidepool-node"))
        .args([
            "join",
            "--tracker",
            &tracker.url(),
            "--pool",
            "churn",
            "--loopback",
        ])
        .args([
            "--max-peers",
            "1",
            "--stats-every",
            "0",
            "--rotate-after-secs",
            "600",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("node binary starts");
    let mut lines = BufReader::new(victim.stdout.take().expect("stdout")).lines();
    let first = lines.next().expect("a line").expect("utf-8");
    assert!(first.starts_with("joined pool"), "{first}");
    let victim_id = connected_to(&a).await;
    // A third node finds both full and keeps offering.
    let mut c3 = cfg.clone();
    c3.peer_id = tidepool_node::config::random_peer_id();
    let b = node(c3).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(b.connected_peers().is_empty(), "both others are full");

    victim.kill().expect("SIGKILL");
    let _ = victim.wait();
    let killed_at = Instant::now();
    let (peer, reason) = expect_event(&a, |e| match e {
        Event::PeerDisconnected { peer, reason } => Some((*peer, reason.clone())),
        _ => None,
    })
    .await;
    let noticed = killed_at.elapsed();
    assert_eq!(peer, victim_id);
    assert_eq!(reason, DisconnectReason::HeartbeatTimeout);
    assert!(
        noticed < heartbeat_timeout + Duration::from_millis(1500),
        "noticed after {noticed:?}"
    );
    let replacement = connected_to(&a).await;
    assert_eq!(replacement, b.peer_id());
    eprintln!(
        "victim noticed after {noticed:?}, replaced after {:?}",
        killed_at.elapsed()
    );
    a.send(replacement, Channel::Control, b"still here")
        .await
        .expect("send");
    let got = next_message(&b).await;
    assert_eq!(&got[..], b"still here");
    a.leave().await;
    b.leave().await;
    tracker.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tracker_restart_drops_no_peer_connection() {
    let first = tracker();
    let addr = first.local_addr();
    let a = node(config(&first, "restart")).await;
    let b = node(config(&first, "restart")).await;
    let b_id = connected_to(&a).await;
    let a_id = connected_to(&b).await;

    first.shutdown();
    expect_event(&a, |e| {
        matches!(e, Event::Tracker(TrackerState::Disconnected(_))).then_some(())
    })
    .await;
    // With the tracker gone, the peers still talk.
    a.send(b_id, Channel::Chunks, b"during the outage")
        .await
        .expect("send");
    let got = next_message(&b).await;
    assert_eq!(&got[..], b"during the outage");

    let second = tracker_on(&addr.to_string());
    for n in [&a, &b] {
        expect_event(n, |e| match e {
            Event::Tracker(TrackerState::Connected) => Some(()),
            Event::PeerDisconnected { .. } => panic!("peer dropped across the restart"),
            _ => None,
        })
        .await;
    }
    b.send(a_id, Channel::Control, b"after the restart")
        .await
        .expect("send");
    let got = next_message(&a).await;
    assert_eq!(&got[..], b"after the restart");
    assert_eq!(a.connected_peers(), vec![b_id]);
    assert!(a.stats().tracker_connected && b.stats().tracker_connected);
    a.leave().await;
    b.leave().await;
    second.shutdown();
}

/// A scripted tracker that forces glare: it holds the first offer from each of two peers
/// and then delivers both at once, crosswise, so each side answers the other's offer while
/// its own is being answered. Answers are routed like a real tracker.
async fn glare_tracker(listener: tokio::net::TcpListener) {
    use futures_util::{SinkExt, StreamExt};
    use serde_json::{Value, json};
    use tokio_tungstenite::tungstenite::Message;

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Value)>();
    let mut outs = Vec::new();
    for conn in 0..2 {
        let (stream, _) = listener.accept().await.expect("accept");
        let ws = tokio_tungstenite::accept_async(stream)
            .await
            .expect("upgrade");
        let (mut sink, mut source) = ws.split();
        let (out_tx, mut out_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        outs.push(out_tx);
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(Ok(Message::Text(t))) = source.next().await {
                if let Ok(v) = serde_json::from_str(t.as_str()) {
                    let _ = tx.send((conn, v));
                }
            }
        });
        tokio::spawn(async move {
            while let Some(t) = out_rx.recv().await {
                if sink.send(Message::text(t)).await.is_err() {
                    return;
                }
            }
        });
    }
    let mut peer_ids: [Option<Value>; 2] = [None, None];
    let mut held: [Option<Value>; 2] = [None, None];
    let mut crossed = false;
    while let Some((conn, msg)) = rx.recv().await {
        peer_ids[conn] = Some(msg["peer_id"].clone());
        if let Some(to) = msg.get("to_peer_id") {
            // An answer: route it to the offerer.
            let target = if peer_ids[0].as_ref() == Some(to) {
                0
            } else {
                1
            };
            let fwd = json!({"action": "announce", "info_hash": msg["info_hash"],
                "peer_id": msg["peer_id"], "offer_id": msg["offer_id"], "answer": msg["answer"]});
            let _ = outs[target].send(fwd.to_string());
            continue;
        }
        let reply = json!({"action": "announce", "info_hash": msg["info_hash"],
            "complete": 0, "incomplete": 2, "interval": 120});
        let _ = outs[conn].send(reply.to_string());
        if !crossed
            && held[conn].is_none()
            && msg["offers"].as_array().is_some_and(|o| !o.is_empty())
        {
            held[conn] = Some(msg);
        }
        if !crossed && let (Some(m0), Some(m1)) = (&held[0], &held[1]) {
            crossed = true;
            for (from, to) in [(m0, 1), (m1, 0)] {
                let offer = &from["offers"][0];
                let fwd = json!({"action": "announce", "info_hash": from["info_hash"],
                    "peer_id": from["peer_id"], "offer_id": offer["offer_id"], "offer": offer["offer"]});
                let _ = outs[to].send(fwd.to_string());
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn glare_both_offering_at_once_settles_on_one_working_connection() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("ws://{}", listener.local_addr().expect("addr"));
    tokio::spawn(glare_tracker(listener));
    let mut cfg = tidepool_node::NodeConfig::new(url, "glare").for_loopback();
    cfg.max_peers = 1;
    cfg.offers_per_announce = 1;
    let mut cfg_b = cfg.clone();
    cfg_b.peer_id = tidepool_node::config::random_peer_id();
    let (a, b) = tokio::join!(node(cfg), node(cfg_b));
    let b_id = connected_to(&a).await;
    let a_id = connected_to(&b).await;
    // Let the losing connection be torn down, then check the survivor on both sides.
    eventually("both sides settle", || {
        a.stats().connecting_peers == 0 && b.stats().connecting_peers == 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(a.connected_peers(), vec![b_id]);
    assert_eq!(b.connected_peers(), vec![a_id]);
    assert!(
        a.stats().glare_resolved >= 1 && b.stats().glare_resolved >= 1,
        "glare was forced"
    );
    let (pa, pb) = (a.peers().await, b.peers().await);
    assert_eq!((pa.len(), pb.len()), (1, 1), "one connection each");
    assert_ne!(
        pa[0].initiated_by_us, pb[0].initiated_by_us,
        "both sides kept the same connection"
    );
    // The survivor is the one the smaller peer id initiated.
    let smaller_is_a = a.peer_id().0 < b.peer_id().0;
    assert_eq!(pa[0].initiated_by_us, smaller_is_a);
    a.send(b_id, Channel::Control, b"one connection")
        .await
        .expect("send");
    let got = next_message(&b).await;
    assert_eq!(&got[..], b"one connection");
    a.leave().await;
    b.leave().await;
}
