//! Many connections and swarms at once: 2,000 WebSocket clients in 200 swarms on 4 socket
//! workers and 2 swarm workers; every offer and every answer must arrive exactly once.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use serde_json::json;

const SWARMS: u32 = 200;
const PER_SWARM: u32 = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_connections_account_for_every_offer_and_answer() {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let tracker = start(config(4, 2));
    let url = tracker.url();
    let offers_seen = Arc::new(AtomicUsize::new(0));
    let answers_seen = Arc::new(AtomicUsize::new(0));
    let mut swarms = Vec::new();
    for s in 0..SWARMS {
        let url = url.clone();
        let offers_seen = offers_seen.clone();
        let answers_seen = answers_seen.clone();
        swarms.push(tokio::spawn(async move {
            let h = num_id(b'h', s);
            let mut peers = Vec::new();
            for i in 0..PER_SWARM {
                let mut c = Client::connect(&url).await;
                let r = c.announce(&h, &num_id(b'p', s * 100 + i), json!({"event": "started"})).await;
                assert_eq!(r["incomplete"], json!(i + 1), "swarm {s}");
                peers.push(c);
            }
            let offerer = num_id(b'p', s * 100);
            peers[0]
                .send(announce_msg(&h, &offerer, json!({"numwant": 9, "offers": offers(9, &format!("s{s}"))})))
                .await;
            assert_eq!(peers[0].recv().await["incomplete"], json!(PER_SWARM));
            for i in 1..PER_SWARM {
                let c = &mut peers[i as usize];
                let offer = c.recv().await;
                assert_eq!(offer["peer_id"], json!(offerer));
                assert!(offer["offer"]["sdp"].as_str().is_some_and(|sdp| sdp.contains(&format!("s{s} "))));
                offers_seen.fetch_add(1, Ordering::Relaxed);
                c.send(announce_msg(&h, &num_id(b'p', s * 100 + i), json!({
                    "to_peer_id": offerer, "offer_id": offer["offer_id"], "answer": {"type": "answer", "sdp": "a"}
                })))
                .await;
            }
            for _ in 1..PER_SWARM {
                let answer = peers[0].recv().await;
                assert_eq!(answer["info_hash"], json!(h));
                answers_seen.fetch_add(1, Ordering::Relaxed);
            }
            peers
        }));
    }
    let mut all = Vec::new();
    for s in swarms {
        all.push(s.await.expect("swarm task"));
    }
    let expected = (SWARMS * (PER_SWARM - 1)) as usize;
    assert_eq!(offers_seen.load(Ordering::Relaxed), expected);
    assert_eq!(answers_seen.load(Ordering::Relaxed), expected);
    let mut probe = Client::connect(&url).await;
    for chunk in (0..SWARMS).collect::<Vec<_>>().chunks(50) {
        let hashes: Vec<String> = chunk.iter().map(|s| num_id(b'h', *s)).collect();
        let scrape = probe.scrape(json!(hashes)).await;
        for h in &hashes {
            assert_eq!(
                scrape["files"][h]["incomplete"],
                json!(PER_SWARM),
                "{scrape}"
            );
        }
    }
    drop(all);
    tracker.shutdown();
}
