//! Costly-but-cheap requests and honest overload, over real sockets: full scrapes (off by
//! default; when on, one shared snapshot, bounded, rate-limited per connection, and a flood of
//! them does not slow a bystander), and every reply the tracker cannot deliver is counted —
//! offers and scrape parts refused by a full inbox, scrapes whose parts never came back —
//! while close notices still remove their peers.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_scrape_is_refused_by_default_with_a_reason_and_the_connection_stays() {
    let tracker = start(config(1, 1));
    let mut c = Client::connect(&tracker.url()).await;
    let r = c.scrape(Value::Null).await;
    assert_eq!(r["action"], "scrape");
    let reason = r["failure reason"].as_str().unwrap_or_default();
    assert!(reason.contains("disabled"), "{r}");
    let h = num_id(b'h', 0);
    assert!(c.scrape(json!(h)).await["files"][&h].is_object());
    tracker.shutdown();
}

/// Resident memory of this process, in KiB (the tracker runs inside the test process).
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_full_scrapes_over_thousands_of_swarms_does_not_slow_a_bystander() {
    let mut cfg = config_with_metrics();
    cfg.protocol.full_scrape = true;
    cfg.protocol.full_scrape_interval_secs = 1;
    cfg.protocol.full_scrape_max_swarms = 500;
    cfg.protocol.max_swarms_per_connection = 5000;
    cfg.network.max_messages_per_second = 0;
    let tracker = start(cfg);
    let url = tracker.url();
    // 4,000 live swarms, one peer each (swarm i has i % 7 extra seeders... kept simple: one).
    let mut filler = Client::connect(&url).await;
    for i in 0..4000 {
        filler
            .send(announce_msg(&num_id(b'h', i), &num_id(b'f', 0), json!({})))
            .await;
    }
    for _ in 0..4000 {
        filler.recv().await;
    }
    // One bigger swarm, which a bounded snapshot must keep (the largest come first).
    let big = num_id(b'B', 0);
    let mut extra = Vec::new();
    for i in 0..3 {
        let mut c = Client::connect(&url).await;
        c.announce(&big, &num_id(b'x', i), json!({})).await;
        extra.push(c);
    }
    wait_for_sample(&tracker, "tidepool_swarms{shard=\"0\"}", 4001).await;
    // The snapshot is published every half interval; wait for one with the big swarm.
    let mut first = Client::connect(&url).await;
    let deadline = Instant::now() + WAIT;
    let snapshot = loop {
        let s = first.scrape(Value::Null).await;
        if s["files"][&big]["incomplete"] == json!(3) {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "snapshot never showed the big swarm"
        );
        tokio::time::sleep(Duration::from_millis(1100)).await;
    };
    assert_eq!(
        snapshot["files"].as_object().map(|f| f.len()),
        Some(500),
        "bounded"
    );
    assert_eq!(snapshot["flags"]["min_request_interval"], json!(1));
    let rss_before = rss_kib();

    // Eight flooders, each sending full scrapes as fast as it can for two seconds.
    let stop = Instant::now() + Duration::from_secs(2);
    let mut flooders = Vec::new();
    for _ in 0..8 {
        let url = url.clone();
        flooders.push(tokio::spawn(async move {
            let mut f = Client::connect(&url).await;
            let (mut served, mut refused) = (0u32, 0u32);
            while Instant::now() < stop {
                let r = f.scrape(Value::Null).await;
                if r["files"].is_object() {
                    served += 1;
                } else {
                    assert!(
                        r["failure reason"]
                            .as_str()
                            .unwrap_or_default()
                            .contains("at most once"),
                        "{r}"
                    );
                    refused += 1;
                }
            }
            (served, refused)
        }));
    }
    // Meanwhile a bystander announces and scrapes; every reply comes quickly.
    let mut bystander = Client::connect(&url).await;
    let mut worst = Duration::ZERO;
    let h = num_id(b'y', 0);
    while Instant::now() < stop {
        let t = Instant::now();
        bystander.announce(&h, &num_id(b'y', 1), json!({})).await;
        bystander.scrape(json!(h)).await;
        worst = worst.max(t.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (mut served, mut refused) = (0, 0);
    for f in flooders {
        let (s, r) = f.await.expect("flooder");
        served += s;
        refused += r;
    }
    assert!(
        worst < Duration::from_millis(300),
        "bystander waited {worst:?}"
    );
    // At most one served per flooder per interval (2 s of flooding: 2-3 each), the rest
    // refused cheaply.
    assert!(served <= 8 * 3, "{served} served");
    assert!(refused > 100, "{refused} refused");
    let (_, _, text) = http_get(&tracker, "/metrics");
    // One shared snapshot per interval, not one per request.
    assert!(
        sample(&text, "tidepool_full_scrape_rebuilds_total{worker=\"0\"}") <= 6,
        "{text}"
    );
    assert!(
        sample(
            &text,
            "tidepool_errors_total{kind=\"full_scrape_rate_limited\"}"
        ) >= u64::from(refused)
    );
    let grown = rss_kib().saturating_sub(rss_before);
    assert!(
        grown < 64 * 1024,
        "memory grew {grown} KiB during the flood"
    );
    tracker.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_part_refused_by_a_full_inbox_is_counted_and_the_scrape_fails_in_time() {
    let mut cfg = config_with_metrics();
    // An inbox that takes a 150-swarm scrape request (~3.2 KB) but not its reply part
    // (~7 KB): the part can never be delivered.
    cfg.workers.channel_bytes = 4096;
    cfg.workers.reply_timeout_ms = 300;
    cfg.protocol.max_scrape_hashes = 256;
    let tracker = start(cfg);
    let mut c = Client::connect(&tracker.url()).await;
    let hashes: Vec<String> = (0..150).map(|i| num_id(b'h', i)).collect();
    let t = Instant::now();
    let r = c.scrape(json!(hashes)).await;
    assert_eq!(r["action"], "scrape");
    assert!(
        r["failure reason"]
            .as_str()
            .unwrap_or_default()
            .contains("timed out"),
        "{r}"
    );
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    let text = wait_for_sample(
        &tracker,
        "tidepool_replies_dropped_total{shard=\"0\",kind=\"scrape_part\"}",
        1,
    )
    .await;
    assert_eq!(
        sample(&text, "tidepool_errors_total{kind=\"scrape_timeout\"}"),
        1
    );
    // A small scrape on the same connection still works.
    let r = c.scrape(json!(hashes[0])).await;
    assert!(r["files"][&hashes[0]].is_object(), "{r}");
    tracker.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offers_a_full_inbox_refuses_are_counted_so_none_is_lost_silently() {
    let mut cfg = config_with_metrics();
    // Inboxes of four messages: one announce fanning out ten offers overflows the socket
    // worker's inbox within one batch of the swarm worker.
    cfg.workers.channel_capacity = 4;
    let tracker = start(cfg);
    let url = tracker.url();
    let h = num_id(b'h', 0);
    let mut peers = Vec::new();
    for i in 0..10 {
        let mut p = Client::connect(&url).await;
        p.announce(&h, &num_id(b'p', i), json!({})).await;
        peers.push(p);
    }
    let mut sender = Client::connect(&url).await;
    sender
        .send(announce_msg(
            &h,
            &num_id(b's', 0),
            json!({"offers": offers(10, "s"), "numwant": 10}),
        ))
        .await;
    let mut delivered = 0;
    for p in &mut peers {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
        if let Ok(msg) = tokio::time::timeout_at(deadline, p.recv()).await {
            assert!(msg["offer"].is_object(), "{msg}");
            delivered += 1;
        }
    }
    let (_, _, text) = http_get(&tracker, "/metrics");
    let dropped = sample(
        &text,
        "tidepool_replies_dropped_total{shard=\"0\",kind=\"offer\"}",
    );
    assert!(dropped > 0, "the inbox should have refused some: {text}");
    // Every offer either arrived or was counted as dropped.
    assert_eq!(delivered + dropped, 10, "{delivered} delivered");
    tracker.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closes_remove_their_peers_while_request_inboxes_overflow() {
    let mut cfg = config_with_metrics();
    cfg.workers.channel_capacity = 2;
    cfg.network.max_messages_per_second = 0;
    let tracker = start(cfg);
    let url = tracker.url();
    let hashes: Vec<String> = (0..20).map(|i| num_id(b'h', i)).collect();
    // Twenty leavers, each in every swarm.
    let mut leavers = Vec::new();
    for l in 0..20u32 {
        let mut c = Client::connect(&url).await;
        for h in &hashes {
            // Retried: with an inbox of two, some announces are refused as overloaded.
            loop {
                let r = c.announce(h, &num_id(b'l', l), json!({"left": 0})).await;
                if r["interval"].is_u64() {
                    break;
                }
            }
        }
        leavers.push(c);
    }
    wait_for_sample(&tracker, "tidepool_seeders{shard=\"0\"}", 400).await;
    // A flooder keeps the request inbox full while the leavers close.
    let flood_url = url.clone();
    let flooder = tokio::spawn(async move {
        let mut f = Client::connect(&flood_url).await;
        let h = num_id(b'f', 0);
        for i in 0..3000 {
            f.send(announce_msg(&h, &num_id(b'f', i % 4), json!({})))
                .await;
        }
        // Replies the full socket inbox refused never come: read until a quiet second.
        let mut overloaded = 0;
        while let Ok(r) = tokio::time::timeout(Duration::from_secs(1), f.recv()).await {
            if r["failure reason"]
                .as_str()
                .is_some_and(|s| s.contains("overloaded"))
            {
                overloaded += 1;
            }
        }
        overloaded
    });
    leavers.clear();
    let overloaded = flooder.await.expect("flooder");
    let text = wait_for_sample(&tracker, "tidepool_seeders{shard=\"0\"}", 0).await;
    assert!(sample(&text, "tidepool_swarm_closes_total{shard=\"0\"}") >= 20);
    assert!(
        overloaded > 0,
        "the inbox never filled; the test proved nothing"
    );
    tracker.shutdown();
}
