//! Nodes over real sockets on loopback, through an in-process tracker: two nodes exchange
//! messages on both channels (with receipts and a byte stream), eight form a bounded mesh,
//! a killed node is replaced, a tracker restart drops no peer connection, glare yields one
//! connection.

mod common;

use std::time::Duration;

use common::*;
use tidepool_node::{Channel, Event, ReceiptKind, Receipts};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_exchange_messages_on_both_channels_with_receipts() {
    let started = std::time::Instant::now();
    let tracker = tracker();
    let a = node(config(&tracker, "two")).await;
    let b = node(config(&tracker, "two")).await;
    let b_id = connected_to(&a).await;
    let a_id = connected_to(&b).await;
    eprintln!("two connected after {:?}", started.elapsed());
    assert_eq!(b_id, b.peer_id());
    assert_eq!(a_id, a.peer_id());

    a.send(b_id, Channel::Control, b"hello on control")
        .await
        .expect("send");
    let big = vec![7u8; 60 * 1024];
    let id = a
        .send_with(b_id, Channel::Chunks, &big, Receipts::Both)
        .await
        .expect("send");
    // The two channels are independent streams: either message may arrive first, and
    // `expect_event` drops what it skips, so both are taken by one loop.
    let (mut control, mut chunks) = (None, None);
    while control.is_none() || chunks.is_none() {
        let (channel, data, receipt) = expect_event(&b, |e| match e {
            Event::Message {
                channel,
                data,
                delivered_receipt,
                ..
            } => Some((*channel, data.clone(), *delivered_receipt)),
            _ => None,
        })
        .await;
        match channel {
            Channel::Control => control = Some(data),
            Channel::Chunks => chunks = Some((data, receipt)),
        }
    }
    assert_eq!(control.as_deref(), Some(&b"hello on control"[..]));
    let Some((got, receipt)) = chunks else {
        unreachable!("the loop ends with both")
    };
    assert_eq!(got.len(), big.len());
    assert!(got.iter().all(|&x| x == 7));
    assert_eq!(receipt, Some(id));
    // Both receipts come back: received (by b's node) and delivered (b's app took it).
    let mut kinds = Vec::new();
    while kinds.len() < 2 {
        let (rid, kind) = expect_event(&a, |e| match e {
            Event::Receipt { id, kind, .. } => Some((*id, *kind)),
            _ => None,
        })
        .await;
        assert_eq!(rid, id);
        kinds.push(kind);
    }
    assert!(kinds.contains(&ReceiptKind::Received) && kinds.contains(&ReceiptKind::Delivered));

    // Oversized messages are refused locally with a clear error.
    let err = a
        .send(b_id, Channel::Chunks, &vec![0u8; 65 * 1024 + 1])
        .await
        .expect_err("too large");
    assert!(err.to_string().contains("over the"), "{err}");

    // Stats count what moved.
    let peers = a.peers().await;
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].chunks.messages_out, 1, "one message on chunks");
    assert_eq!(
        peers[0].chunks.bytes_out,
        big.len() as u64 + 10,
        "payload + header"
    );
    assert!(
        peers[0].control.messages_out >= 1,
        "the hello, plus heartbeats"
    );
    let b_peers = b.peers().await;
    assert_eq!(b_peers[0].chunks.messages_in, 1);
    assert_eq!(b_peers[0].chunks.bytes_in, big.len() as u64 + 10);
    let stats = a.stats();
    assert_eq!(stats.connected_peers, 1);
    assert!(stats.tracker_connected);
    let rmem_max: u64 = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let granted = stats.udp_buffer_granted.expect("sockets were wrapped");
    assert!(
        granted >= (4u64 << 20).min(rmem_max),
        "UDP buffer {granted}"
    );

    // A byte stream over the chunks channel, piped end to end.
    let mut wa = a.open_stream(b_id, Channel::Chunks).expect("stream");
    let mut rb = b.open_stream(a_id, Channel::Chunks).expect("stream");
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let sent = payload.clone();
    let writer = tokio::spawn(async move {
        wa.write_all(&sent).await.expect("write");
        wa.shutdown().await.expect("shutdown");
    });
    let mut received = Vec::new();
    tokio::time::timeout(WAIT, rb.read_to_end(&mut received))
        .await
        .expect("in time")
        .expect("read");
    writer.await.expect("writer");
    assert_eq!(received, payload);

    let t = std::time::Instant::now();
    a.leave().await;
    eprintln!("a.leave took {:?}", t.elapsed());
    let reason = expect_event(&b, |e| match e {
        Event::PeerDisconnected { reason, .. } => Some(reason.clone()),
        _ => None,
    })
    .await;
    eprintln!("b saw a leave: {reason:?} after {:?}", t.elapsed());
    b.leave().await;
    tracker.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_nodes_form_a_connected_mesh_within_max_peers() {
    let started = std::time::Instant::now();
    let tracker = tracker();
    let mut nodes = Vec::new();
    for _ in 0..8 {
        let mut c = config(&tracker, "eight");
        c.max_peers = 4;
        nodes.push(node(c).await);
    }
    // Connected: every node reaches every other through the links it holds.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let links: Vec<Vec<_>> = nodes.iter().map(|n| n.connected_peers()).collect();
        for (n, l) in nodes.iter().zip(&links) {
            assert!(l.len() <= 4, "{:?} holds {} links", n.peer_id(), l.len());
        }
        let ids: Vec<_> = nodes.iter().map(|n| n.peer_id()).collect();
        let mut seen = vec![false; nodes.len()];
        let mut stack = vec![0usize];
        seen[0] = true;
        while let Some(i) = stack.pop() {
            for p in &links[i] {
                if let Some(j) = ids.iter().position(|x| x == p)
                    && !seen[j]
                {
                    seen[j] = true;
                    stack.push(j);
                }
            }
        }
        if seen.iter().all(|&s| s) && links.iter().all(|l| !l.is_empty()) {
            eprintln!(
                "mesh connected after {:?}: {:?}",
                started.elapsed(),
                links.iter().map(Vec::len).collect::<Vec<_>>()
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "mesh never connected: {links:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for n in nodes {
        n.leave().await;
    }
    tracker.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_clique_makes_room_for_a_starved_newcomer() {
    let tracker = tracker();
    let cfg = |t: &tidepool_tracker::Tracker| {
        let mut c = config(t, "clique");
        c.max_peers = 2;
        c.peer_id = tidepool_node::config::random_peer_id();
        c
    };
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(node(cfg(&tracker)).await);
    }
    // Three nodes with two slots each: a triangle, everyone full.
    eventually("a full triangle", || {
        nodes.iter().all(|n| n.connected_peers().len() == 2)
    })
    .await;
    let newcomer = node(cfg(&tracker)).await;
    // Nobody has a free slot; only a rotation can let the newcomer in.
    let first = connected_to(&newcomer).await;
    assert!(nodes.iter().any(|n| n.peer_id() == first));
    let rotations: u64 = nodes.iter().map(|n| n.stats().rotations).sum();
    assert!(rotations >= 1, "a full node made room");
    nodes.push(newcomer);
    eventually("every node within max_peers", || {
        nodes.iter().all(|n| n.connected_peers().len() <= 2)
    })
    .await;
    for n in nodes {
        n.leave().await;
    }
    tracker.shutdown();
}
