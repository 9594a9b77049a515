//! Tracker behaviour over real sockets: announce responses, offer delivery and answer routing
//! across socket and swarm workers, scrape counts after every event kind.

mod common;

use common::*;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announce_gets_counts_and_interval() {
    let tracker = start(config(1, 1));
    let mut c = Client::connect(&tracker.url()).await;
    let h = num_id(b'h', 1);
    let r = c
        .announce(
            &h,
            &num_id(b'p', 1),
            json!({"event": "started", "left": 100}),
        )
        .await;
    assert_eq!(
        r,
        json!({"action": "announce", "info_hash": h, "complete": 0, "incomplete": 1, "interval": 120})
    );
    let r = c.announce(&h, &num_id(b'p', 2), json!({"left": 0})).await;
    assert_eq!(
        (r["complete"].clone(), r["incomplete"].clone()),
        (json!(1), json!(1))
    );
    tracker.shutdown();
}

/// Every pair of 8 clients on 4 socket workers and 3 swarm workers exchanges an offer and an
/// answer; each arrives exactly once, carrying the right peer ids and offer id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offers_and_answers_cross_socket_and_swarm_workers() {
    let tracker = start(config(4, 3));
    let url = tracker.url();
    for swarm in 0..3u32 {
        let h = num_id(b'h', swarm);
        let mut clients = Vec::new();
        for i in 0..8u32 {
            let mut c = Client::connect(&url).await;
            let r = c
                .announce(&h, &num_id(b'p', i), json!({"event": "started"}))
                .await;
            assert_eq!(r["incomplete"], json!(i + 1));
            clients.push(c);
        }
        // Client 0 offers to everyone else (numwant 7, 7 offers: each gets exactly one).
        clients[0]
            .send(announce_msg(
                &h,
                &num_id(b'p', 0),
                json!({"numwant": 7, "offers": offers(7, "zero")}),
            ))
            .await;
        let r = clients[0].recv().await;
        assert_eq!(r["incomplete"], json!(8), "announce response first");
        let mut offer_ids = std::collections::BTreeSet::new();
        for (i, c) in clients.iter_mut().enumerate().skip(1) {
            let offer = c.recv().await;
            assert_eq!(offer["peer_id"], json!(num_id(b'p', 0)), "offerer's id");
            assert_eq!(offer["info_hash"], json!(h));
            assert!(
                offer["offer"]["sdp"]
                    .as_str()
                    .is_some_and(|s| s.contains("zero"))
            );
            offer_ids.insert(offer["offer_id"].as_str().expect("offer_id").to_owned());
            // Answer it.
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
        assert_eq!(offer_ids.len(), 7, "one distinct offer per peer");
        let mut answerers = std::collections::BTreeSet::new();
        for _ in 1..8 {
            let a = clients[0].recv().await;
            assert_eq!(a["action"], "announce");
            assert!(offer_ids.contains(a["offer_id"].as_str().expect("offer_id")));
            let from = a["peer_id"].as_str().expect("peer_id").to_owned();
            assert_eq!(
                a["answer"]["sdp"],
                json!(format!(
                    "answer from {}",
                    from.chars().nth(2).map_or(0, |c| c as u32)
                ))
            );
            answerers.insert(from);
        }
        assert_eq!(answerers.len(), 7);
        // Answers get no announce response, and the offerer got no offer of its own.
        for c in clients.iter_mut() {
            c.expect_silence(std::time::Duration::from_millis(100))
                .await;
        }
    }
    tracker.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrape_counts_follow_every_event_kind() {
    let tracker = start(config(2, 2));
    let mut a = Client::connect(&tracker.url()).await;
    let mut b = Client::connect(&tracker.url()).await;
    let h = num_id(b'h', 7);
    let other = num_id(b'h', 8);
    let (pa, pb) = (num_id(b'p', 1), num_id(b'p', 2));
    let counts = |v: &Value, h: &str| {
        let f = &v["files"][h];
        (
            f["complete"].as_u64().unwrap_or(99),
            f["incomplete"].as_u64().unwrap_or(99),
            f["downloaded"].as_u64().unwrap_or(99),
        )
    };
    a.announce(&h, &pa, json!({"event": "started", "left": 10}))
        .await;
    assert_eq!(counts(&b.scrape(json!(h)).await, &h), (0, 1, 0));
    b.announce(&h, &pb, json!({"event": "started", "left": null}))
        .await;
    assert_eq!(
        counts(&b.scrape(json!(h)).await, &h),
        (0, 2, 0),
        "left: null is a leecher"
    );
    a.announce(&h, &pa, json!({"event": "completed", "left": 0}))
        .await;
    assert_eq!(counts(&b.scrape(json!(h)).await, &h), (1, 1, 1));
    b.announce(&h, &pb, json!({"event": "update", "left": -1}))
        .await;
    assert_eq!(
        counts(&b.scrape(json!(h)).await, &h),
        (1, 1, 1),
        "left: -1 is a leecher"
    );
    b.announce(&h, &pb, json!({"event": "paused", "left": 0}))
        .await;
    assert_eq!(counts(&b.scrape(json!(h)).await, &h), (2, 0, 1));
    let r = b.announce(&h, &pb, json!({"event": "stopped"})).await;
    assert_eq!(
        (r["complete"].clone(), r["incomplete"].clone()),
        (json!(1), json!(0)),
        "stopped gets a response"
    );
    // One and many (order kept, unknown swarm as zeros).
    let many = b.scrape(json!([other, h])).await;
    assert_eq!(counts(&many, &other), (0, 0, 0));
    assert_eq!(counts(&many, &h), (1, 0, 1));
    let keys: Vec<&String> = many["files"].as_object().expect("files").keys().collect();
    assert_eq!(keys.len(), 2);
    a.announce(&h, &pa, json!({"event": "stopped"})).await;
    // The emptied swarm is freed, its completion count with it.
    assert_eq!(counts(&b.scrape(json!(h)).await, &h), (0, 0, 0));
    tracker.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_carries_many_swarms_and_peer_ids() {
    // The npm client shares one socket per tracker URL across torrents, and across all
    // clients of a process: two clients in one torrent are two peer ids on one socket.
    let tracker = start(config(1, 2));
    let mut c = Client::connect(&tracker.url()).await;
    let mut d = Client::connect(&tracker.url()).await;
    for s in 0..20u32 {
        let h = num_id(b'h', s);
        c.announce(&h, &num_id(b'p', s), json!({})).await;
        c.announce(&h, &num_id(b'q', s), json!({})).await;
    }
    let h3 = num_id(b'h', 3);
    d.send(announce_msg(
        &h3,
        &num_id(b'd', 0),
        json!({"offers": offers(2, "d")}),
    ))
    .await;
    assert_eq!(d.recv().await["incomplete"], json!(3));
    let first = c.recv().await;
    let second = c.recv().await;
    let mut to: Vec<String> = [first, second]
        .iter()
        .map(|m| m["offer_id"].as_str().expect("id").to_owned())
        .collect();
    to.sort();
    to.dedup();
    assert_eq!(
        to.len(),
        2,
        "both of c's peers got one offer each, on one socket"
    );
    tracker.shutdown();
}

/// Offers and answers are forwarded as the exact bytes the client sent (spacing, escapes and
/// key order included), not re-encoded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offers_and_answers_are_forwarded_byte_for_byte() {
    let tracker = start(config(1, 1));
    let mut a = Client::connect(&tracker.url()).await;
    let mut b = Client::connect(&tracker.url()).await;
    let h = num_id(b'h', 1);
    a.announce(&h, &num_id(b'a', 0), json!({})).await;
    let offer = r#"{ "sdp" : "v=0\u000d\n\u00e9 \"q\"", "type":"offer", "extra": [1, {}, null] }"#;
    let frame = format!(
        r#"{{"action":"announce","info_hash":{},"peer_id":{},"numwant":1,"offers":[{{"offer_id":"id-1","offer":{offer}}}]}}"#,
        serde_json::to_string(&h).expect("json"),
        serde_json::to_string(&num_id(b'b', 0)).expect("json"),
    );
    b.send_text(frame).await;
    assert_eq!(b.recv().await["incomplete"], json!(2));
    let raw = a.recv_text().await;
    assert!(raw.contains(&format!(r#""offer":{offer}"#)), "{raw}");
    let answer = r#"{"type":"answer",   "sdp":"\u0041nswer"}"#;
    a.send_text(format!(
        r#"{{"action":"announce","info_hash":{},"peer_id":{},"to_peer_id":{},"offer_id":"id-1","answer":{answer}}}"#,
        serde_json::to_string(&h).expect("json"),
        serde_json::to_string(&num_id(b'a', 0)).expect("json"),
        serde_json::to_string(&num_id(b'b', 0)).expect("json"),
    ))
    .await;
    let raw = b.recv_text().await;
    assert!(raw.contains(&format!(r#""answer":{answer}"#)), "{raw}");
    tracker.shutdown();
}
