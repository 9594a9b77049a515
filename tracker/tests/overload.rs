//! Costly-but-cheap requests and honest overload, over real sockets: full scrapes (off by
//! default; when on, one shared snapshot, bounded, rate-limited per connection, and a flood of
//! them does not slow a bystander), and every reply the tracker cannot deliver is counted —
//! offers and scrape parts refused by a full inbox, scrapes whose parts never came back —
//! while close notices still remove their peers.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// These tests flood the tracker and measure the process: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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
    let _serial = SERIAL.lock().await;
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
        worst < Duration::from_millis(500),
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

/// Reads frames until `quiet` passes without one; returns them.
async fn drain(c: &mut Client, quiet: Duration) -> Vec<Value> {
    let mut got = Vec::new();
    while let Ok(msg) = tokio::time::timeout(quiet, c.recv()).await {
        got.push(msg);
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelined_flood_past_the_inboxes_loses_no_offer_and_no_scrape_without_a_count() {
    let _serial = SERIAL.lock().await;
    let mut cfg = config_with_metrics();
    cfg.workers.channel_capacity = 64;
    cfg.workers.reply_timeout_ms = 500;
    cfg.network.max_messages_per_second = 0;
    let tracker = start(cfg);
    let url = tracker.url();
    let h = num_id(b'h', 0);
    let mut receivers = Vec::new();
    for i in 0..10 {
        let mut r = Client::connect(&url).await;
        r.announce(&h, &num_id(b'r', i), json!({})).await;
        receivers.push(r);
    }
    // Sixty announces fanning out ten offers each, each followed by a scrape, sent without
    // waiting: one swarm-worker batch makes far more replies than the 64-message inbox holds.
    const ROUNDS: u64 = 60;
    let mut sender = Client::connect(&url).await;
    for _ in 0..ROUNDS {
        sender
            .send(announce_msg(
                &h,
                &num_id(b's', 0),
                json!({"offers": offers(10, "s"), "numwant": 10}),
            ))
            .await;
        sender
            .send(json!({"action": "scrape", "info_hash": h}))
            .await;
    }
    let replies = drain(&mut sender, Duration::from_secs(2)).await;
    let reason = |r: &Value| r["failure reason"].as_str().unwrap_or_default().to_owned();
    let scrapes = replies
        .iter()
        .filter(|r| r["action"] == "scrape" || r["files"].is_object())
        .count() as u64;
    let announce_refused = replies
        .iter()
        .filter(|r| r["action"] == "announce" && reason(r).contains("overloaded"))
        .count() as u64;
    let responses = replies.iter().filter(|r| r["interval"].is_u64()).count() as u64;
    let mut delivered = 0;
    for r in &mut receivers {
        delivered += drain(r, Duration::from_millis(500))
            .await
            .iter()
            .filter(|m| m["offer"].is_object())
            .count() as u64;
    }
    let (_, _, text) = http_get(&tracker, "/metrics");
    let dropped = |kind: &str| {
        sample(
            &text,
            &format!("tidepool_replies_dropped_total{{shard=\"0\",kind=\"{kind}\"}}"),
        )
    };
    let accepted = ROUNDS - announce_refused;
    eprintln!(
        "{accepted} announces accepted; dropped: {} offers, {} responses, {} scrape parts",
        dropped("offer"),
        dropped("announce_response"),
        dropped("scrape_part")
    );
    assert!(
        dropped("offer") + dropped("announce_response") > 0,
        "the inboxes never overflowed: {text}"
    );
    assert_eq!(
        scrapes, ROUNDS,
        "every scrape answered exactly once (counts or a failure)"
    );
    assert_eq!(
        delivered + dropped("offer"),
        accepted * 10,
        "every offer delivered or counted"
    );
    assert_eq!(
        responses + dropped("announce_response"),
        accepted,
        "every response delivered or counted"
    );
    // A dropped scrape part fails its scrape at the timeout; one arriving after it is orphaned.
    assert_eq!(
        sample(&text, "tidepool_errors_total{kind=\"scrape_timeout\"}"),
        dropped("scrape_part") + sample(&text, "tidepool_replies_orphaned_total{worker=\"0\"}")
    );
    tracker.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closes_during_an_inbox_overflow_still_remove_every_peer() {
    use futures_util::{SinkExt, StreamExt};
    let _serial = SERIAL.lock().await;
    let mut cfg = config_with_metrics();
    cfg.workers.channel_capacity = 4;
    cfg.network.max_messages_per_second = 0;
    let tracker = start(cfg);
    let url = tracker.url();
    let hashes: Vec<String> = (0..20).map(|i| num_id(b'h', i)).collect();
    let mut leavers = Vec::new();
    for l in 0..20u32 {
        let mut c = Client::connect(&url).await;
        for h in &hashes {
            // Retried: a small inbox refuses some announces as overloaded.
            while !c.announce(h, &num_id(b'l', l), json!({"left": 0})).await["interval"].is_u64() {}
        }
        leavers.push(c);
    }
    wait_for_sample(&tracker, "tidepool_seeders{shard=\"0\"}", 400).await;
    // A flooder keeps the request inbox full: it sends without waiting and reads on the side.
    let (ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .expect("flooder connects");
    let (mut sink, mut stream) = ws.split();
    let overloaded = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let reader = tokio::spawn({
        let overloaded = overloaded.clone();
        async move {
            while let Some(Ok(msg)) = stream.next().await {
                if msg.to_text().is_ok_and(|t| t.contains("overloaded")) {
                    overloaded.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
    });
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = tokio::spawn({
        let stop = stop.clone();
        async move {
            let h = num_id(b'f', 0);
            let mut i = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let m = announce_msg(&h, &num_id(b'f', i % 4), json!({})).to_string();
                if sink.send(Message::text(m)).await.is_err() {
                    break;
                }
                i += 1;
                if i.is_multiple_of(64) {
                    tokio::task::yield_now().await;
                }
            }
            sink
        }
    });
    let deadline = Instant::now() + WAIT;
    while overloaded.load(std::sync::atomic::Ordering::Relaxed) < 100 {
        assert!(
            Instant::now() < deadline,
            "the flood never filled the inbox"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The leavers close while the inbox is full; whether a notice finds it full at that
    // instant is up to the scheduler, so more leavers join and close until one has.
    let overflowed = "tidepool_close_notices_overflowed_total{worker=\"0\"}";
    let mut closed = 0;
    loop {
        closed += leavers.len();
        leavers.clear();
        tokio::time::sleep(Duration::from_millis(50)).await;
        if sample(&http_get(&tracker, "/metrics").2, overflowed) > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no close notice ever found the inbox full"
        );
        for l in 0..10u32 {
            let mut c = Client::connect(&url).await;
            for h in &hashes[..5] {
                while !c.announce(h, &num_id(b'm', l), json!({"left": 0})).await["interval"]
                    .is_u64()
                {}
            }
            leavers.push(c);
        }
    }
    let text = wait_for_sample(&tracker, "tidepool_seeders{shard=\"0\"}", 0).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sink = writer.await.expect("writer");
    drop(sink);
    reader.abort();
    assert!(sample(&text, "tidepool_swarm_closes_total{shard=\"0\"}") >= closed as u64);
    assert!(sample(&text, overflowed) > 0);
    tracker.shutdown();
}
