//! Several tracker instances sharing swarms through a real `nats-server` on loopback: the
//! conformance checks with clients spread over instances, peer id binding across them,
//! scrapes merged from every owner (and failed in time when an owner is silent), a member
//! killed with SIGKILL, and NATS restarted under load.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use tidepool_protocol::InfoHash;
use tidepool_tracker::Tracker;
use tidepool_tracker::cluster::{InstanceId, Membership, shard_of};

/// Which of `ids` owns `info_hash` (as every instance computes it).
fn owner_of(ids: &[u64], info_hash: &str) -> u64 {
    let mut m = Membership::new(InstanceId(ids[0]), 1024, Duration::from_secs(60), 64);
    for id in &ids[1..] {
        m.heard(InstanceId(*id), "x", std::time::Instant::now());
    }
    let bytes: Vec<u8> = info_hash.chars().map(|c| c as u8).collect();
    let h = InfoHash(bytes.try_into().expect("20 bytes"));
    m.owner(shard_of(&h, 1024)).0
}

/// An info hash whose shard bytes (4..8) vary with `n`, so hashes spread over owners.
fn spread(tag: u8, n: u32) -> String {
    let mut b = [0x41u8; 20];
    b[0] = tag;
    b[4..8].copy_from_slice(&n.wrapping_mul(2_654_435_761).to_le_bytes());
    id(b)
}

async fn trio(nats: &Nats) -> Vec<Tracker> {
    let trackers: Vec<Tracker> = ["a", "b", "c"]
        .iter()
        .map(|n| start(cluster_config(&nats.url(), n)))
        .collect();
    wait_for_cluster(&trackers.iter().collect::<Vec<_>>(), 3).await;
    trackers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offers_answers_and_counts_cross_three_instances() {
    let nats = Nats::start();
    let trackers = trio(&nats).await;
    let ids: Vec<u64> = trackers.iter().map(Tracker::instance).collect();
    let mut remote_owned = 0;
    for swarm in 0..4u32 {
        let h = spread(b'h', swarm);
        let owner = owner_of(&ids, &h);
        let mut clients = Vec::new();
        for i in 0..6u32 {
            // Round robin: every swarm has members on every instance.
            let t = &trackers[i as usize % 3];
            remote_owned += u32::from(t.instance() != owner);
            let mut c = Client::connect(&t.url()).await;
            let r = c
                .announce(
                    &h,
                    &num_id(b'p', i),
                    json!({"event": "started", "left": if i == 0 { 0 } else { 10 }}),
                )
                .await;
            assert_eq!(r["complete"], json!(1), "swarm {swarm} client {i}: {r}");
            assert_eq!(r["incomplete"], json!(i), "swarm {swarm} client {i}: {r}");
            clients.push(c);
        }
        clients[0]
            .send(announce_msg(
                &h,
                &num_id(b'p', 0),
                json!({"numwant": 5, "left": 0, "offers": offers(5, "zero")}),
            ))
            .await;
        let r = clients[0].recv().await;
        assert_eq!(r["incomplete"], json!(5), "announce response first");
        for (i, c) in clients.iter_mut().enumerate().skip(1) {
            let offer = c.recv().await;
            assert_eq!(offer["peer_id"], json!(num_id(b'p', 0)));
            assert!(
                offer["offer"]["sdp"]
                    .as_str()
                    .is_some_and(|s| s.contains("zero"))
            );
            c.send(announce_msg(
                &h,
                &num_id(b'p', i as u32),
                json!({
                    "to_peer_id": num_id(b'p', 0),
                    "offer_id": offer["offer_id"],
                    "answer": {"type": "answer", "sdp": format!("answer from {i}")},
                }),
            ))
            .await;
        }
        let mut answerers = std::collections::BTreeSet::new();
        for _ in 1..6 {
            let a = clients[0].recv().await;
            assert!(
                a["answer"]["sdp"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("answer from"))
            );
            answerers.insert(a["peer_id"].as_str().expect("peer_id").to_owned());
        }
        assert_eq!(answerers.len(), 5, "every answer came back");
        for c in clients.iter_mut() {
            c.expect_silence(Duration::from_millis(100)).await;
        }
        // Leaving, from a remote instance, is counted by the owner.
        let r = clients[4]
            .announce(
                &h,
                &num_id(b'p', 4),
                json!({"event": "stopped", "left": 10}),
            )
            .await;
        assert_eq!(r["incomplete"], json!(4), "{r}");
    }
    assert!(remote_owned >= 8, "most members were remote to their owner");
    for t in trackers {
        t.shutdown();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_id_binding_holds_across_instances_and_an_impostors_close_evicts_nothing() {
    let nats = Nats::start();
    let trackers = trio(&nats).await;
    let ids: Vec<u64> = trackers.iter().map(Tracker::instance).collect();
    // A swarm owned by c, its peer held through a, the impostor on b.
    let h = (0..)
        .map(|n| spread(b'i', n))
        .find(|h| owner_of(&ids, h) == ids[2])
        .expect("some swarm is owned by c");
    let peer = num_id(b'p', 1);
    let mut owner = Client::connect(&trackers[0].url()).await;
    let r = owner.announce(&h, &peer, json!({"event": "started"})).await;
    assert_eq!(r["incomplete"], json!(1));
    let mut impostor = Client::connect(&trackers[1].url()).await;
    let r = impostor
        .announce(&h, &peer, json!({"event": "started"}))
        .await;
    assert_eq!(
        r["failure reason"],
        json!("peer_id is in use by another connection"),
        "{r}"
    );
    let r = impostor
        .announce(&h, &peer, json!({"event": "stopped"}))
        .await;
    assert!(r.get("failure reason").is_some(), "cannot stop it: {r}");
    drop(impostor);
    let mut watcher = Client::connect(&trackers[2].url()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = watcher.scrape(json!(h)).await;
    assert_eq!(r["files"][&h]["incomplete"], json!(1), "still there: {r}");
    // The owner's own close removes it, through the bus.
    drop(owner);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let r = watcher.scrape(json!(h)).await;
        if r["files"][&h]["incomplete"] == json!(0) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never removed: {r}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for t in trackers {
        t.shutdown();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_merges_counts_from_every_owner() {
    let nats = Nats::start();
    let trackers = trio(&nats).await;
    let ids: Vec<u64> = trackers.iter().map(Tracker::instance).collect();
    let hashes: Vec<String> = (0..30).map(|n| spread(b's', n)).collect();
    let owners: std::collections::BTreeSet<u64> =
        hashes.iter().map(|h| owner_of(&ids, h)).collect();
    assert_eq!(owners.len(), 3, "the hashes span every owner");
    let mut clients = Vec::new();
    for (i, h) in hashes.iter().enumerate() {
        let mut c = Client::connect(&trackers[i % 3].url()).await;
        // Swarm i holds i % 4 seeders' worth of announces: one peer, seeder when i is even.
        let left = if i % 2 == 0 { 0 } else { 5 };
        c.announce(h, &num_id(b'p', i as u32), json!({"left": left}))
            .await;
        clients.push(c);
    }
    let mut scraper = Client::connect(&trackers[1].url()).await;
    let r = scraper.scrape(json!(hashes)).await;
    let files = r["files"].as_object().expect("files");
    assert_eq!(files.len(), 30, "{r}");
    for (i, h) in hashes.iter().enumerate() {
        let seeder = i % 2 == 0;
        assert_eq!(
            files[h],
            json!({"complete": u8::from(seeder), "incomplete": u8::from(!seeder), "downloaded": 0}),
            "swarm {i}"
        );
    }
    for t in trackers {
        t.shutdown();
    }
}
