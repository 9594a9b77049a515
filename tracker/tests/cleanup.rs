//! Cleaning over real sockets: closed connections leave their swarms, silent peers time out,
//! idle connections are pinged and then closed.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

/// Polls a scrape until `pred` holds or the wait runs out.
async fn eventually(c: &mut Client, h: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let s = c.scrape(json!(h)).await;
        if pred(&s["files"][h]) || start.elapsed() > WAIT {
            return s["files"][h].clone();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_connection_leaves_every_swarm_it_joined() {
    let mut cfg = config_with_metrics();
    cfg.workers.socket_workers = 2;
    cfg.workers.swarm_workers = 3;
    let tracker = start(cfg);
    let mut leaver = Client::connect(&tracker.url()).await;
    let mut watcher = Client::connect(&tracker.url()).await;
    let hashes: Vec<String> = (0..6).map(|i| num_id(b'h', i)).collect();
    for (i, h) in hashes.iter().enumerate() {
        leaver
            .announce(h, &num_id(b'l', i as u32), json!({"left": 0}))
            .await;
    }
    watcher
        .announce(&hashes[0], &num_id(b'w', 0), json!({}))
        .await;
    drop(leaver);
    for h in &hashes {
        let f = eventually(&mut watcher, h, |f| f["complete"] == json!(0)).await;
        assert_eq!(f["complete"], json!(0), "{f}");
    }
    assert_eq!(
        watcher.scrape(json!(hashes[0])).await["files"][&hashes[0]]["incomplete"],
        json!(1)
    );
    // Empty swarms are freed: only the watcher's is left.
    let mut swarms = 0;
    for _ in 0..100 {
        let (_, _, text) = http_get(&tracker, "/metrics");
        swarms = (0..3)
            .map(|s| sample(&text, &format!("tidepool_swarms{{shard=\"{s}\"}}")))
            .sum::<u64>();
        if swarms == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(swarms, 1, "empty swarms freed");
    tracker.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_peers_time_out_but_announcing_peers_stay() {
    let mut cfg = config(1, 1);
    cfg.protocol.peer_timeout_secs = 1;
    cfg.protocol.clean_interval_secs = 1;
    let tracker = start(cfg);
    let mut quiet = Client::connect(&tracker.url()).await;
    let mut busy = Client::connect(&tracker.url()).await;
    let h = num_id(b'h', 1);
    quiet.announce(&h, &num_id(b'q', 0), json!({})).await;
    busy.announce(&h, &num_id(b'b', 0), json!({})).await;
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(3500) {
        busy.announce(&h, &num_id(b'b', 0), json!({})).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let f = eventually(&mut busy, &h, |f| f["incomplete"] == json!(1)).await;
    assert_eq!(
        f["incomplete"],
        json!(1),
        "only the announcing peer is left: {f}"
    );
    tracker.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_pinged_then_closed() {
    let mut cfg = config(1, 1);
    cfg.network.ping_interval_secs = 1;
    cfg.network.idle_timeout_secs = 2;
    let tracker = start(cfg);
    // A raw TCP client completes the handshake and then never answers anything.
    let mut raw = tokio::net::TcpStream::connect(tracker.local_addr())
        .await
        .expect("connect");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    raw.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").await.expect("write");
    // A live client reads (tokio-tungstenite answers pings while reading).
    let mut live = Client::connect(&tracker.url()).await;
    let live_reader = tokio::spawn(async move {
        live.expect_silence(Duration::from_millis(4000)).await;
        live
    });
    let started = Instant::now();
    let mut got_ping = false;
    let mut buf = vec![0u8; 4096];
    loop {
        let n = tokio::time::timeout(WAIT, raw.read(&mut buf))
            .await
            .expect("bounded")
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        // 0x89 is an unmasked ping frame from the server.
        got_ping |= buf[..n].contains(&0x89);
    }
    let elapsed = started.elapsed();
    assert!(got_ping, "pinged before being closed");
    assert!(
        elapsed >= Duration::from_millis(1500) && elapsed < Duration::from_secs(6),
        "{elapsed:?}"
    );
    // The reading client answered its pings and is still served.
    let mut live = live_reader.await.expect("live reader");
    let r = live
        .announce(&num_id(b'h', 0), &num_id(b'p', 0), json!({}))
        .await;
    assert!(r["interval"].is_u64());
    tracker.shutdown();
}
