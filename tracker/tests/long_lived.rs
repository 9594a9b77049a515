//! Long-lived clients over real sockets, written from the client's side: one socket that
//! joins and leaves hundreds of torrents over its life, one that holds hundreds at once, many
//! peer ids from one socket in one swarm, stop-then-start on one socket, and a client whose
//! network changed reconnecting with its peer id (while a live owner keeps its id).

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

fn counts(scrape: &Value, h: &str) -> (u64, u64) {
    let f = &scrape["files"][h];
    (
        f["complete"].as_u64().unwrap_or(u64::MAX),
        f["incomplete"].as_u64().unwrap_or(u64::MAX),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_that_joins_and_leaves_hundreds_of_torrents_over_its_life_is_never_refused() {
    let mut cfg = config(1, 2);
    cfg.protocol.max_swarms_per_connection = 16;
    cfg.network.max_messages_per_second = 0;
    let tracker = start(cfg);
    let mut c = Client::connect(&tracker.url()).await;
    let me = num_id(b'p', 0);
    // 400 torrents added and removed, never more than 10 at once: 25x the bound over a life.
    for batch in 0..40u32 {
        let hashes: Vec<String> = (0..10).map(|i| num_id(b'h', batch * 10 + i)).collect();
        for h in &hashes {
            let r = c.announce(h, &me, json!({"event": "started"})).await;
            assert!(r["interval"].is_u64(), "batch {batch}: {r}");
        }
        for h in &hashes {
            let r = c.announce(h, &me, json!({"event": "stopped"})).await;
            assert_eq!(r["incomplete"], json!(0), "{r}");
        }
    }
    // Still able to hold its full allowance, and refused one past it.
    for i in 0..16 {
        let r = c.announce(&num_id(b'z', i), &me, json!({})).await;
        assert!(r["interval"].is_u64(), "{r}");
    }
    let r = c.announce(&num_id(b'z', 16), &me, json!({})).await;
    let reason = r["failure reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("too many swarms on one connection (limit 16)"),
        "{r}"
    );
    assert_eq!(r["action"], "announce");
    tracker.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swarms_left_by_silence_free_their_place_after_the_peer_timeout() {
    let mut cfg = config(1, 1);
    cfg.protocol.max_swarms_per_connection = 4;
    cfg.protocol.peer_timeout_secs = 1;
    cfg.protocol.clean_interval_secs = 1;
    let tracker = start(cfg);
    let mut c = Client::connect(&tracker.url()).await;
    let me = num_id(b'p', 0);
    for i in 0..4 {
        c.announce(&num_id(b'h', i), &me, json!({})).await;
    }
    let r = c.announce(&num_id(b'h', 4), &me, json!({})).await;
    assert!(r["failure reason"].is_string(), "{r}");
    // The client stops announcing in those swarms (a torrent removed without `stopped`):
    // once their peers time out, the connection may join others.
    // Records outlive the peer timeout by two cleaning intervals (1 + 2 × 1 s here).
    tokio::time::sleep(Duration::from_millis(3500)).await;
    for i in 10..14 {
        let r = c.announce(&num_id(b'h', i), &me, json!({})).await;
        assert!(r["interval"].is_u64(), "{r}");
    }
    tracker.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_holding_hundreds_of_torrents_at_once_gets_offers_in_each_and_leaves_all_on_close()
{
    let mut cfg = config_with_metrics();
    cfg.network.max_messages_per_second = 0;
    let tracker = start(cfg);
    let mut seedbox = Client::connect(&tracker.url()).await;
    let me = num_id(b's', 0);
    let hashes: Vec<String> = (0..600).map(|i| num_id(b'h', i)).collect();
    // Pipelined, as a client restoring its torrents at start-up does.
    for h in &hashes {
        seedbox
            .send(announce_msg(h, &me, json!({"left": 0, "event": "started"})))
            .await;
    }
    for _ in &hashes {
        assert!(seedbox.recv().await["interval"].is_u64());
    }
    wait_for_sample(&tracker, "tidepool_connection_swarms{worker=\"0\"}", 600).await;
    // A leecher in the last torrent reaches the seedbox with an offer.
    let mut leecher = Client::connect(&tracker.url()).await;
    let last = &hashes[599];
    leecher
        .send(announce_msg(
            last,
            &num_id(b'l', 0),
            json!({"offers": offers(1, "l")}),
        ))
        .await;
    assert_eq!(leecher.recv().await["complete"], json!(1));
    let offer = seedbox.recv().await;
    assert_eq!(offer["info_hash"].as_str(), Some(last.as_str()));
    drop(seedbox);
    wait_for_sample(&tracker, "tidepool_seeders{shard=\"0\"}", 0).await;
    let text = wait_for_sample(&tracker, "tidepool_swarms{shard=\"0\"}", 1).await;
    assert_eq!(sample(&text, "tidepool_swarm_closes_total{shard=\"0\"}"), 1);
    tracker.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_peer_ids_from_one_socket_in_one_swarm_stay_a_few_peers() {
    let mut cfg = config_with_metrics();
    cfg.network.max_messages_per_second = 0;
    cfg.protocol.max_peer_ids_per_swarm = 2;
    let tracker = start(cfg);
    let mut c = Client::connect(&tracker.url()).await;
    let mut watcher = Client::connect(&tracker.url()).await;
    let h = num_id(b'h', 0);
    for i in 0..500 {
        let r = c.announce(&h, &num_id(b'p', i), json!({})).await;
        assert!(r["incomplete"].as_u64().is_some_and(|n| n <= 2), "{r}");
    }
    assert_eq!(counts(&watcher.scrape(json!(h)).await, &h), (0, 2));
    // The two kept are the two most recently announced: offers reach exactly those.
    watcher
        .send(announce_msg(
            &h,
            &num_id(b'w', 0),
            json!({"offers": offers(5, "w")}),
        ))
        .await;
    assert_eq!(watcher.recv().await["incomplete"], json!(3));
    // Two peers on that socket: two offers, no more.
    for _ in 0..2 {
        let offer = c.recv().await;
        assert_eq!(offer["peer_id"].as_str(), Some(num_id(b'w', 0).as_str()));
    }
    c.expect_silence(Duration::from_millis(300)).await;
    let text = wait_for_sample(&tracker, "tidepool_peers_replaced_total{shard=\"0\"}", 498).await;
    assert_eq!(sample(&text, "tidepool_leechers{shard=\"0\"}"), 3);
    // The two kept are the last two announced: announcing them again replaces nothing, and
    // an older one replaces one of them.
    for i in [498, 499, 497] {
        c.announce(&h, &num_id(b'p', i), json!({})).await;
    }
    wait_for_sample(&tracker, "tidepool_peers_replaced_total{shard=\"0\"}", 499).await;
    tracker.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_then_start_on_one_socket_rejoins_and_gets_offers_again() {
    let tracker = start(config(1, 1));
    let mut c = Client::connect(&tracker.url()).await;
    let mut other = Client::connect(&tracker.url()).await;
    let h = num_id(b'h', 0);
    let me = num_id(b'p', 0);
    other
        .announce(&h, &num_id(b'o', 0), json!({"left": 0}))
        .await;
    for round in 0..50 {
        let r = c.announce(&h, &me, json!({"event": "started"})).await;
        assert_eq!(
            (r["complete"].clone(), r["incomplete"].clone()),
            (json!(1), json!(1)),
            "round {round}"
        );
        let r = c.announce(&h, &me, json!({"event": "stopped"})).await;
        assert_eq!(r["incomplete"], json!(0), "round {round}");
    }
    c.announce(&h, &me, json!({"event": "started"})).await;
    other
        .send(announce_msg(
            &h,
            &num_id(b'o', 0),
            json!({"left": 0, "offers": offers(1, "o")}),
        ))
        .await;
    other.recv().await;
    assert_eq!(
        c.recv().await["offer_id"].as_str(),
        Some(num_id(b'o', 0).as_str())
    );
    tracker.shutdown();
}

/// A config where a silent owner loses its peer id quickly.
fn takeover_config() -> tidepool_tracker::Config {
    let mut cfg = config_with_metrics();
    cfg.network.ping_interval_secs = 1;
    cfg.network.takeover_grace_secs = Some(3);
    cfg.network.idle_timeout_secs = 60;
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_network_changed_takes_its_peer_id_back_once_the_old_socket_is_silent() {
    let tracker = start(takeover_config());
    let h = num_id(b'h', 0);
    let me = num_id(b'p', 0);
    // The old socket: it announced, then its network went away (it reads and answers nothing).
    let mut old = Client::connect(&tracker.url()).await;
    old.announce(&h, &me, json!({"left": 0})).await;
    // The old socket's last frame reached the tracker before this.
    let started = Instant::now();
    let mut fresh = Client::connect(&tracker.url()).await;
    let r = fresh.announce(&h, &me, json!({"left": 0})).await;
    assert_eq!(
        r["failure reason"],
        "peer_id is in use by another connection"
    );
    let taken = loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let r = fresh.announce(&h, &me, json!({"left": 0})).await;
        if r["interval"].is_u64() {
            break started.elapsed();
        }
        assert!(started.elapsed() < WAIT, "never taken over: {r}");
    };
    assert!(
        taken >= Duration::from_millis(2500),
        "taken over too early: {taken:?}"
    );
    // The id now answers on the new socket, and the swarm counts it once.
    let mut leecher = Client::connect(&tracker.url()).await;
    leecher
        .send(announce_msg(
            &h,
            &num_id(b'l', 0),
            json!({"offers": offers(1, "l")}),
        ))
        .await;
    assert_eq!(
        (leecher.recv().await["complete"].clone()),
        json!(1),
        "one seeder, not two"
    );
    assert_eq!(
        fresh.recv().await["peer_id"].as_str(),
        Some(num_id(b'l', 0).as_str())
    );
    wait_for_sample(&tracker, "tidepool_peer_takeovers_total{shard=\"0\"}", 1).await;
    // The old socket closing later evicts nobody: once its close notice was handled, the
    // peer is still there.
    drop(old);
    wait_for_sample(&tracker, "tidepool_swarm_closes_total{shard=\"0\"}", 1).await;
    assert_eq!(counts(&leecher.scrape(json!(h)).await, &h), (1, 1));
    tracker.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_owner_that_answers_pings_cannot_be_hijacked() {
    let tracker = start(takeover_config());
    let h = num_id(b'h', 0);
    let me = num_id(b'p', 0);
    let mut owner = Client::connect(&tracker.url()).await;
    owner.announce(&h, &me, json!({})).await;
    // The owner sends nothing but keeps reading, so it answers the tracker's pings.
    let owner = tokio::spawn(async move {
        owner.expect_silence(Duration::from_millis(5000)).await;
        owner
    });
    let mut impostor = Client::connect(&tracker.url()).await;
    let started = Instant::now();
    let mut tries = 0;
    while started.elapsed() < Duration::from_millis(4500) {
        let r = impostor
            .announce(&h, &me, json!({"event": "stopped"}))
            .await;
        assert_eq!(
            r["failure reason"], "peer_id is in use by another connection",
            "{r}"
        );
        tries += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(tries >= 5, "{tries}");
    let mut owner = owner.await.expect("owner task");
    let r = owner.announce(&h, &me, json!({})).await;
    assert_eq!(r["incomplete"], json!(1));
    let text = wait_for_sample(&tracker, "tidepool_peer_takeovers_total{shard=\"0\"}", 0).await;
    assert!(sample(&text, "tidepool_errors_total{kind=\"peer_id_in_use\"}") >= tries);
    tracker.shutdown();
}
