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
        .map(|n| start(with_metrics(nats, n)))
        .collect();
    wait_for_cluster(&trackers.iter().collect::<Vec<_>>(), 3).await;
    trackers
}

/// The sum of every sample of a family on `tracker`'s `/metrics`.
fn total(tracker: &Tracker, family: &str) -> u64 {
    let (_, _, text) = http_get(tracker, "/metrics");
    text.lines()
        .filter(|l| l.starts_with(&format!("{family}{{")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
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
    // Claims it again, so its connection holds the pair and its close names it.
    let r = impostor
        .announce(&h, &peer, json!({"event": "started"}))
        .await;
    assert!(r.get("failure reason").is_some(), "{r}");
    let closes = total(&trackers[2], "tidepool_swarm_closes_total");
    drop(impostor);
    // Wait until the owner has handled the impostor's close notice, then look.
    let deadline = tokio::time::Instant::now() + WAIT;
    while total(&trackers[2], "tidepool_swarm_closes_total") == closes {
        assert!(
            tokio::time::Instant::now() < deadline,
            "close never handled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut watcher = Client::connect(&trackers[2].url()).await;
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

/// Publishes heartbeats for a member that takes its requests and never answers, until
/// dropped.
struct Ghost(tokio::task::JoinHandle<()>);

impl Ghost {
    async fn start(nats: &Nats, id: u64) -> Ghost {
        let client = async_nats::connect(nats.url()).await.expect("test client");
        // Subscribed, so NATS has a responder for its subjects: requests go unanswered
        // rather than failing fast with "no responders".
        let silent = [
            client.subscribe(format!("tidepool.stats.{id:016x}")).await,
            client.subscribe(format!("tidepool.i.{id:016x}")).await,
        ];
        Ghost(tokio::spawn(async move {
            let _silent = silent;
            loop {
                let beat =
                    json!({"v": 1, "id": format!("{id:016x}"), "name": "ghost", "shards": 1024});
                let _ = client.publish("tidepool.hb", beat.to_string().into()).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }))
    }
}

impl Drop for Ghost {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_never_answers_fails_scrapes_in_time_and_shows_on_stats() {
    let nats = Nats::start();
    let mut config = cluster_config(&nats.url(), "a");
    config.workers.reply_timeout_ms = 500;
    config.metrics.listen = Some("127.0.0.1:0".parse().expect("addr"));
    let a = start(config);
    let ghost_id = 0x00aa_00bb_00cc_00dd;
    let _ghost = Ghost::start(&nats, ghost_id).await;
    wait_for_cluster(&[&a], 2).await;
    let ids = [a.instance(), ghost_id];
    let ghostly = (0..)
        .map(|n| spread(b'g', n))
        .find(|h| owner_of(&ids, h) == ghost_id)
        .expect("the ghost owns some shard");
    let own = (0..)
        .map(|n| spread(b'o', n))
        .find(|h| owner_of(&ids, h) == ids[0])
        .expect("a owns some shard");
    let mut c = Client::connect(&a.url()).await;
    c.announce(&own, &num_id(b'p', 1), json!({})).await;
    let asked = std::time::Instant::now();
    let r = c.scrape(json!([own, ghostly])).await;
    let reason = r["failure reason"].as_str().unwrap_or_default();
    assert!(reason.starts_with("scrape timed out"), "{r}");
    assert!(asked.elapsed() < Duration::from_secs(3), "failed in time");
    // Its own swarms still answer at once.
    let r = c.scrape(json!(own)).await;
    assert_eq!(r["files"][&own]["incomplete"], json!(1), "{r}");
    let (status, _, body) = http_get(&a, "/stats.json");
    assert_eq!(status, 200);
    let stats: serde_json::Value = serde_json::from_str(&body).expect("json");
    let members = stats["cluster"]["members"].as_array().expect("members");
    assert_eq!(members.len(), 2, "{stats}");
    assert!(members.iter().any(|m| m["name"] == "ghost"));
    let replies = stats["cluster"]["replies"].as_array().expect("replies");
    assert!(
        replies[0]["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("no answer within")),
        "{stats}"
    );
    let (_, _, metrics) = http_get(&a, "/metrics");
    assert_eq!(
        sample(&metrics, "tidepool_cluster_members{cluster_member=\"a\"}"),
        2
    );
    assert!(
        sample(
            &metrics,
            "tidepool_cluster_items_total{cluster_member=\"a\",direction=\"sent\"}"
        ) >= 1,
        "the scrape part went out: {metrics}"
    );
    a.shutdown();
}

/// A tracker process (so it can be killed with SIGKILL) in the cluster on `nats`.
struct Process {
    child: std::process::Child,
    url: String,
    dir: std::path::PathBuf,
}

impl Process {
    fn start(nats: &Nats, name: &str) -> Process {
        use std::io::BufRead;
        let dir = temp_dir(name);
        let config = dir.join("tracker.toml");
        std::fs::write(
            &config,
            format!(
                "[network]\nlisten = \"127.0.0.1:0\"\n[cluster]\nnats_url = \"{}\"\nname = \"{name}\"\nheartbeat_interval_ms = 100\nheartbeats_missed = 10\n",
                nats.url()
            ),
        )
        .expect("config written");
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tidepool-tracker"))
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("tracker binary runs");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if let Some(url) = line.split_whitespace().find(|w| w.starts_with("ws://")) {
                    let _ = tx.send(url.to_owned());
                }
            }
        });
        let url = rx
            .recv_timeout(WAIT)
            .expect("the tracker says where it listens");
        Process { child, url, dir }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_killed_with_sigkill_vanishes_from_every_swarm_and_its_shards_move() {
    let nats = Nats::start();
    let a = start(cluster_config(&nats.url(), "a"));
    let b = start(cluster_config(&nats.url(), "b"));
    let mut c = Process::start(&nats, "c");
    wait_for_cluster(&[&a, &b], 3).await;
    let hashes: Vec<String> = (0..12).map(|n| spread(b'k', n)).collect();
    let mut on_a = Vec::new();
    let mut on_c = Vec::new();
    for (i, h) in hashes.iter().enumerate() {
        let mut x = Client::connect(&a.url()).await;
        x.announce(h, &num_id(b'a', i as u32), json!({"left": 0}))
            .await;
        on_a.push(x);
        let mut y = Client::connect(&c.url).await;
        let r = y
            .announce(h, &num_id(b'c', i as u32), json!({"left": 9}))
            .await;
        assert_eq!(r["complete"], json!(1), "{r}");
        assert_eq!(r["incomplete"], json!(1), "{r}");
        on_c.push(y);
    }
    c.child.kill().expect("SIGKILL");
    let killed = std::time::Instant::now();
    // Stated time: heartbeats_missed × heartbeat_interval (1 s here) plus a heartbeat.
    wait_for_cluster(&[&a, &b], 2).await;
    let mut watcher = Client::connect(&b.url()).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let r = watcher.scrape(json!(hashes)).await;
        let files = r["files"].as_object().cloned().unwrap_or_default();
        let gone = hashes.iter().all(|h| {
            files.get(h) == Some(&json!({"complete": 1, "incomplete": 0, "downloaded": 0}))
        });
        if gone {
            break;
        }
        // Swarms c owned start empty on their new owner and fill from re-announces.
        for (i, (x, h)) in on_a.iter_mut().zip(&hashes).enumerate() {
            x.announce(h, &num_id(b'a', i as u32), json!({"left": 0}))
                .await;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "c's peers stayed: {r}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        killed.elapsed() < Duration::from_secs(4),
        "took {:?}",
        killed.elapsed()
    );
    // Every swarm is served by the survivors: a leecher on b reaches the seeder on a.
    for (i, h) in hashes.iter().enumerate() {
        let mut l = Client::connect(&b.url()).await;
        let r = l
            .announce(
                h,
                &num_id(b'l', i as u32),
                json!({"left": 9, "numwant": 1, "offers": offers(1, "late")}),
            )
            .await;
        assert_eq!(r["complete"], json!(1), "{r}");
        let offer = on_a[i].recv().await;
        assert_eq!(offer["peer_id"], json!(num_id(b'l', i as u32)), "{offer}");
    }
    drop(on_c);
    a.shutdown();
    b.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restarted_under_load_crashes_nothing_counts_losses_and_service_resumes() {
    let nats = Nats::start();
    let url = nats.url();
    let mut configs: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|n| cluster_config(&url, n))
        .collect();
    for c in &mut configs {
        c.metrics.listen = Some("127.0.0.1:0".parse().expect("addr"));
    }
    let trackers: Vec<Tracker> = configs.into_iter().map(start).collect();
    wait_for_cluster(&trackers.iter().collect::<Vec<_>>(), 3).await;
    // Load: a client per instance announcing with offers into shared swarms, unpaced
    // (replies are read by a task per client and counted).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let replies = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut load = Vec::new();
    for (i, t) in trackers.iter().enumerate() {
        let (url, stop, replies) = (t.url(), stop.clone(), replies.clone());
        load.push(tokio::spawn(async move {
            use futures_util::{SinkExt, StreamExt};
            let c = Client::connect(&url).await;
            let (mut tx, mut rx) = c.ws.split();
            let reader = tokio::spawn(async move {
                while let Some(Ok(_)) = rx.next().await {
                    replies.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            });
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let h = spread(b'r', n % 16);
                let msg = announce_msg(
                    &h,
                    &num_id(b'p', i as u32),
                    json!({"numwant": 2, "offers": offers(2, "load")}),
                );
                let text = tokio_tungstenite::tungstenite::Message::text(msg.to_string());
                if tx.send(text).await.is_err() {
                    break;
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            reader.abort();
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    let port = nats.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let during = replies.load(std::sync::atomic::Ordering::Relaxed);
    let _nats = Nats::start_on(port);
    wait_for_cluster(&trackers.iter().collect::<Vec<_>>(), 3).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for l in load {
        l.await.expect("load task");
    }
    assert!(
        replies.load(std::sync::atomic::Ordering::Relaxed) > during,
        "replies kept coming after NATS returned"
    );
    // Cross-instance offers flow again: a seeder on a, a leecher on c, in a swarm b owns.
    let ids: Vec<u64> = trackers.iter().map(Tracker::instance).collect();
    let h = (0..)
        .map(|n| spread(b'z', n))
        .find(|h| owner_of(&ids, h) == ids[1])
        .expect("b owns some shard");
    let mut seeder = Client::connect(&trackers[0].url()).await;
    seeder
        .announce(&h, &num_id(b's', 0), json!({"left": 0}))
        .await;
    let mut leecher = Client::connect(&trackers[2].url()).await;
    let r = leecher
        .announce(
            &h,
            &num_id(b'l', 0),
            json!({"left": 5, "numwant": 1, "offers": offers(1, "after")}),
        )
        .await;
    assert_eq!(r["complete"], json!(1), "{r}");
    let offer = seeder.recv().await;
    assert_eq!(offer["peer_id"], json!(num_id(b'l', 0)));
    // What could not cross while NATS was away was counted, as such, on some instance.
    let lost: u64 = trackers
        .iter()
        .map(|t| {
            let (_, _, text) = http_get(t, "/metrics");
            let name = text
                .lines()
                .find_map(|l| l.strip_prefix("tidepool_cluster_members{cluster_member=\""))
                .and_then(|l| l.split('"').next())
                .unwrap_or_default()
                .to_owned();
            sample(
                &text,
                &format!(
                    "tidepool_cluster_lost_total{{cluster_member=\"{name}\",reason=\"disconnected\"}}"
                ),
            )
        })
        .sum();
    assert!(lost > 0, "losses during the outage were counted");
    for t in trackers {
        t.shutdown();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_started_before_nats_serves_alone_then_joins_when_nats_comes() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let url = format!("nats://127.0.0.1:{port}");
    let a = start(cluster_config(&url, "a"));
    let mut c = Client::connect(&a.url()).await;
    let h = spread(b'e', 1);
    let r = c.announce(&h, &num_id(b'p', 1), json!({})).await;
    assert_eq!(r["incomplete"], json!(1), "served alone: {r}");
    let _nats = Nats::start_on(port);
    let b = start(cluster_config(&url, "b"));
    wait_for_cluster(&[&a, &b], 2).await;
    a.shutdown();
    b.shutdown();
}

fn with_metrics(nats: &Nats, name: &str) -> tidepool_tracker::Config {
    let mut c = cluster_config(&nats.url(), name);
    c.metrics.listen = Some("127.0.0.1:0".parse().expect("addr"));
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_shuts_down_is_dropped_at_once_with_its_peers_and_stays_gone() {
    let nats = Nats::start();
    let a = start(with_metrics(&nats, "a"));
    let b = start(with_metrics(&nats, "b"));
    wait_for_cluster(&[&a, &b], 2).await;
    let ids = [a.instance(), b.instance()];
    let h = (0..)
        .map(|n| spread(b'q', n))
        .find(|h| owner_of(&ids, h) == ids[0])
        .expect("a owns some shard");
    let mut on_a = Client::connect(&a.url()).await;
    on_a.announce(&h, &num_id(b'a', 0), json!({})).await;
    let mut on_b = Client::connect(&b.url()).await;
    let r = on_b.announce(&h, &num_id(b'b', 0), json!({})).await;
    assert_eq!(r["incomplete"], json!(2), "{r}");
    let left = std::time::Instant::now();
    b.shutdown();
    wait_for_cluster(&[&a], 1).await;
    assert!(
        left.elapsed() < Duration::from_millis(900),
        "dropped on its goodbye, before the 1 s heartbeat timeout: {:?}",
        left.elapsed()
    );
    let r = on_a.scrape(json!(h)).await;
    assert_eq!(
        r["files"][&h]["incomplete"],
        json!(1),
        "b's peer purged: {r}"
    );
    // Nothing it sent before its goodbye brings it back.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(a.cluster_size(), 1);
    let (_, _, text) = http_get(&a, "/metrics");
    assert_eq!(
        sample(
            &text,
            "tidepool_cluster_membership_changes_total{cluster_member=\"a\",kind=\"departed\"}"
        ),
        1,
        "{text}"
    );
    a.shutdown();
}

/// A batch header as `cluster/wire.rs` writes it.
fn header(from: u64, shards: u32, seq: u64, sent_before: u64, count: u32) -> Vec<u8> {
    let mut b = vec![1u8];
    b.extend_from_slice(&from.to_le_bytes());
    b.extend_from_slice(&shards.to_le_bytes());
    b.extend_from_slice(&seq.to_le_bytes());
    b.extend_from_slice(&sent_before.to_le_bytes());
    b.extend_from_slice(&count.to_le_bytes());
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_extreme_sequence_numbers_and_forged_senders_on_the_bus_are_counted_and_change_nothing()
 {
    let nats = Nats::start();
    let a = start(with_metrics(&nats, "a"));
    let b = start(with_metrics(&nats, "b"));
    wait_for_cluster(&[&a, &b], 2).await;
    let (ia, ib) = (a.instance(), b.instance());
    let bus = async_nats::connect(nats.url()).await.expect("test client");
    let subject = format!("tidepool.i.{ia:016x}");
    let forged: Vec<Vec<u8>> = vec![
        b"not a batch".to_vec(),
        vec![],
        header(ib, 1024, 1, 0, 1_000_000), // a count its bytes cannot hold
        header(ib, 7, 1, 0, 0),            // another shard count
        header(ia, 1024, 1, 0, 0),         // a's own id
        {
            // An output for a connection on b, sent to a.
            let mut x = header(ib, 1024, 2, 0, 1);
            x.push(1);
            x.extend_from_slice(&ib.to_le_bytes());
            x.extend_from_slice(&[0; 2 + 4 + 8]);
            x.extend_from_slice(&[0, 1]);
            x.extend_from_slice(&2u32.to_le_bytes());
            x.extend_from_slice(b"{}");
            x
        },
    ];
    for payload in &forged {
        bus.publish(subject.clone(), payload.clone().into())
            .await
            .expect("published");
    }
    // The largest sequence numbers there are, from a real member: no overflow anywhere.
    bus.publish(
        subject.clone(),
        header(ib, 1024, u64::MAX, u64::MAX, 0).into(),
    )
    .await
    .expect("published");
    bus.flush().await.expect("flushed");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, _, text) = http_get(&a, "/metrics");
        if sample(
            &text,
            "tidepool_cluster_malformed_total{cluster_member=\"a\"}",
        ) >= 6
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Still one cluster of two, still serving across it.
    assert_eq!((a.cluster_size(), b.cluster_size()), (2, 2));
    let h = (0..)
        .map(|n| spread(b'f', n))
        .find(|h| owner_of(&[ia, ib], h) == ib)
        .expect("b owns some shard");
    let mut seeder = Client::connect(&b.url()).await;
    seeder
        .announce(&h, &num_id(b's', 0), json!({"left": 0}))
        .await;
    let mut leecher = Client::connect(&a.url()).await;
    let r = leecher
        .announce(
            &h,
            &num_id(b'l', 0),
            json!({"left": 1, "numwant": 1, "offers": offers(1, "after")}),
        )
        .await;
    assert_eq!(r["complete"], json!(1), "{r}");
    assert_eq!(seeder.recv().await["peer_id"], json!(num_id(b'l', 0)));
    a.shutdown();
    b.shutdown();
}
