//! The chunk pipeline over real nodes on loopback: a seeder and several downloaders of a
//! random file all finish with identical bytes and few duplicates; a peer that corrupts
//! chunks is dropped and the file still verifies; a download stopped halfway resumes from
//! its `.part` file.

mod common;

use std::time::Duration;

use common::pool::*;
use common::*;
use tidepool_node::Node;
use tidepool_node::pool::PoolConfig;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeder_and_three_downloaders_all_finish_identical_with_few_duplicates() {
    let _serial = one_at_a_time().await;
    let tracker = tracker();
    let dir = temp("seed");
    let source = random_file(&dir, 3 * 1024 * 1024 + 12_345);
    let seeder = pool(node_config(&tracker, "pipe"), pool_config()).await;
    let id = seeder.share(&source).expect("shares");
    let mut downloaders = Vec::new();
    for _ in 0..3 {
        downloaders.push(pool(node_config(&tracker, "pipe"), pool_config()).await);
    }
    let mut handles = Vec::new();
    for (i, d) in downloaders.iter().enumerate() {
        let target = dir.join(format!("copy-{i}.bin"));
        handles.push((start_get(d, id, &target).await, target));
    }
    let want = std::fs::read(&source).expect("read");
    for (download, target) in handles {
        let progress = download.progress.clone();
        let path = tokio::time::timeout(WAIT, download.finished())
            .await
            .expect("finishes in time")
            .expect("verified");
        assert_eq!(path, target);
        assert_eq!(std::fs::read(&path).expect("read"), want, "identical bytes");
        let p = progress.borrow().clone();
        assert_eq!(p.have_bytes, want.len() as u64);
        assert!(
            p.received_bytes as f64 <= 1.05 * want.len() as f64,
            "received {} for {} ({} duplicates)",
            p.received_bytes,
            want.len(),
            p.duplicates
        );
        eprintln!("{p:?}");
    }
    tracker.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_sending_corrupted_chunks_is_dropped_and_the_file_still_verifies() {
    let _serial = one_at_a_time().await;
    let tracker = tracker();
    let dir = temp("corrupt");
    let source = random_file(&dir, 1024 * 1024);
    // At first only the liar holds the file, so the downloader must meet its bad chunks.
    let mut liar_cfg = pool_config();
    liar_cfg.corrupt_outgoing = true;
    let liar = pool(node_config(&tracker, "corrupt"), liar_cfg).await;
    let id = liar.share(&source).expect("shares");
    let downloader = pool(node_config(&tracker, "corrupt"), pool_config()).await;
    let target = dir.join("copy.bin");
    let download = start_get(&downloader, id, &target).await;
    eventually("a bad chunk is caught", || downloader.bad_chunks() > 0).await;
    assert!(downloader.dropped_peers() >= 1, "the liar was disconnected");
    assert_eq!(
        download.progress.borrow().have_bytes,
        0,
        "nothing unverified was kept"
    );
    // An honest holder appears; the download completes and verifies.
    let honest = pool(node_config(&tracker, "corrupt"), pool_config()).await;
    assert_eq!(honest.share(&source).expect("shares"), id);
    finishes_identical(download, &source, "verified despite the liar").await;
    tracker.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_stopped_halfway_resumes_from_its_part_file() {
    let _serial = one_at_a_time().await;
    let tracker = tracker();
    let dir = temp("resume");
    let source = random_file(&dir, 2 * 1024 * 1024);
    let seeder = pool(node_config(&tracker, "resume"), pool_config()).await;
    let id = seeder.share(&source).expect("shares");
    let target = dir.join("copy.bin");
    let first = pool(node_config(&tracker, "resume"), pool_config()).await;
    let download = start_get(&first, id, &target).await;
    let mut progress = download.progress.clone();
    let total = std::fs::metadata(&source).expect("stat").len();
    tokio::time::timeout(WAIT, progress.wait_for(|p| p.have_bytes >= total / 3))
        .await
        .expect("progress in time")
        .expect("progress");
    drop(first);
    let part_len = std::fs::metadata(dir.join("copy.bin.part"))
        .expect("part file")
        .len();
    assert_eq!(part_len, total);
    assert!(dir.join("copy.bin.part.state").exists());

    let second = pool(node_config(&tracker, "resume"), pool_config()).await;
    let download = start_get(&second, id, &target).await;
    let resumed_from = download.progress.borrow().have_bytes;
    assert!(
        resumed_from >= total / 3,
        "resumed with {resumed_from} of {total}"
    );
    let progress = download.progress.clone();
    finishes_identical(download, &source, "verified").await;
    let fetched = progress.borrow().received_bytes;
    assert!(
        fetched < total,
        "only the rest was fetched: {fetched} of {total}"
    );
    tracker.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_shares_a_file_and_gets_it_with_json_progress_exiting_zero() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let _serial = one_at_a_time().await;
    let tracker = tracker();
    let dir = temp("cli");
    let source = random_file(&dir, 700_000);
    let bin = env!("CARGO_BIN_EXE_tidepool-node");
    let url = tracker.url();
    let common = ["--tracker", url.as_str(), "--pool", "cli", "--loopback"];
    let mut share = Command::new(bin)
        .arg("share")
        .arg(&source)
        .args(common)
        .arg("--json")
        .stdout(Stdio::piped())
        .spawn()
        .expect("share starts");
    let mut lines = BufReader::new(share.stdout.take().expect("stdout")).lines();
    let first = lines.next().expect("a line").expect("utf-8");
    let id: serde_json::Value = serde_json::from_str(&first).expect("JSON");
    let id = id["file_id"].as_str().expect("file_id").to_owned();
    assert_eq!(id.len(), 64);
    let target = dir.join("fetched.bin");
    let get = tokio::task::spawn_blocking({
        let (bin, target) = (bin.to_owned(), target.clone());
        let common: Vec<String> = common.iter().map(|s| s.to_string()).collect();
        move || {
            Command::new(bin)
                .arg("get")
                .arg(&id)
                .arg("-o")
                .arg(&target)
                .args(&common)
                .arg("--json")
                .output()
                .expect("get runs")
        }
    });
    let out = tokio::time::timeout(WAIT, get)
        .await
        .expect("in time")
        .expect("joined");
    let _ = share.kill();
    let _ = share.wait();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last: serde_json::Value =
        serde_json::from_str(stdout.lines().last().expect("output")).expect("JSON");
    assert_eq!(
        last["done"],
        serde_json::json!(target.display().to_string())
    );
    assert!(
        stdout.lines().any(|l| l.contains("\"have\":700000")),
        "{stdout}"
    );
    assert_eq!(
        std::fs::read(&target).expect("read"),
        std::fs::read(&source).expect("read")
    );
    tracker.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downloader_with_no_holder_among_its_neighbours_fetches_through_a_relay_whose_cache_serves_after_the_seeder_leaves()
 {
    let _serial = one_at_a_time().await;
    let tracker = tracker();
    let dir = temp("relay");
    let source = random_file(&dir, 1_500_000);
    // A chain: seeder (one slot) – relay (two) – downloader (one). Nobody makes room.
    let cfg = |max: usize| {
        let mut c = node_config(&tracker, "relay");
        c.max_peers = max;
        c.rotate_after = Duration::from_secs(600);
        c
    };
    let seeder = pool(cfg(1), pool_config()).await;
    let id = seeder.share(&source).expect("shares");
    let relay = pool(cfg(2), pool_config()).await;
    eventually("seeder and relay connected", || {
        seeder.node().connected_peers().len() == 1
    })
    .await;
    let downloader = pool(cfg(1), pool_config()).await;
    eventually("downloader behind the relay", || {
        downloader.node().connected_peers() == vec![relay.node().peer_id()]
    })
    .await;
    assert!(
        !downloader
            .node()
            .connected_peers()
            .contains(&seeder.node().peer_id())
    );
    let target = dir.join("copy.bin");
    let download = tokio::time::timeout(WAIT, downloader.get(id, &target))
        .await
        .expect("the relay passes the offer on")
        .expect("starts");
    let progress = download.progress.clone();
    finishes_identical(download, &source, "verified").await;
    let p = progress.borrow().clone();
    assert!(
        p.received_bytes as f64 <= 1.05 * p.total_bytes as f64,
        "{p:?}"
    );
    // The relay kept what it passed on. With the seeder and the first copy gone, a new
    // downloader behind the relay gets the whole file from the relay's cache.
    assert_eq!(relay.uploaded().cached_bytes, p.total_bytes);
    drop(seeder);
    drop(downloader);
    eventually("the relay's neighbours are gone", || {
        relay.node().connected_peers().is_empty()
    })
    .await;
    let second = pool(cfg(1), pool_config()).await;
    let target = dir.join("second.bin");
    let download = start_get(&second, id, &target).await;
    finishes_identical(download, &source, "verified from the cache").await;
    assert!(relay.uploaded().served_bytes >= p.total_bytes);
    tracker.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downloader_behind_another_downloader_gets_its_copy_as_promised_with_nothing_relayed_or_fetched_twice()
 {
    let _serial = one_at_a_time().await;
    let tracker = tracker();
    let dir = temp("promise");
    let source = random_file(&dir, 6 * 1024 * 1024 + 777);
    // A chain: seeder (one slot) – middle downloader (two) – end downloader (one).
    let cfg = |max: usize| {
        let mut c = node_config(&tracker, "promise");
        c.max_peers = max;
        c.rotate_after = Duration::from_secs(600);
        c
    };
    let seeder = pool(cfg(1), pool_config()).await;
    let id = seeder.share(&source).expect("shares");
    let middle = pool(cfg(2), pool_config()).await;
    eventually("seeder and middle connected", || {
        seeder.node().connected_peers().len() == 1
    })
    .await;
    let end = pool(cfg(1), pool_config()).await;
    eventually("end behind the middle", || {
        end.node().connected_peers() == vec![middle.node().peer_id()]
    })
    .await;
    // Both download at once: the end asks the middle for chunks the middle does not
    // hold yet, which it promises and sends as they arrive from the seeder.
    let middle_dl = start_get(&middle, id, &dir.join("middle.bin")).await;
    let end_dl = start_get(&end, id, &dir.join("end.bin")).await;
    let want = std::fs::read(&source).expect("read");
    for (who, dl) in [("middle", middle_dl), ("end", end_dl)] {
        let progress = dl.progress.clone();
        let path = tokio::time::timeout(WAIT, dl.finished())
            .await
            .expect("in time")
            .expect("verified");
        assert_eq!(std::fs::read(path).expect("read"), want, "{who}");
        let p = progress.borrow().clone();
        assert!(
            p.received_bytes as f64 <= 1.05 * want.len() as f64,
            "{who} fetched chunks twice: {p:?}"
        );
    }
    let up = middle.uploaded();
    assert_eq!(up.relayed_bytes, 0, "nothing passed through: {up:?}");
    assert!(
        up.served_bytes >= want.len() as u64,
        "the end's copy came from the middle's: {up:?}"
    );
    tracker.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_super_seeding_seeder_sends_no_chunk_twice_in_its_first_copy_and_every_downloader_finishes()
 {
    let _serial = one_at_a_time().await;
    let tracker = tracker();
    let dir = temp("superseed");
    let source = random_file(&dir, 16 * 1024 * 1024 + 99);
    let seeding = PoolConfig {
        super_seed: true,
        ..pool_config()
    };
    let seeder = pool(node_config(&tracker, "superseed"), seeding).await;
    let id = seeder.share(&source).expect("shares");
    let mut fetchers = Vec::new();
    for _ in 0..4 {
        fetchers.push(pool(node_config(&tracker, "superseed"), pool_config()).await);
    }
    eventually("all five connected", || {
        fetchers
            .iter()
            .all(|f| f.node().connected_peers().len() == 4)
    })
    .await;
    // Watch the seeder's counters: until it has sent one copy's worth, everything it
    // sent was a chunk nobody had had from it. (16 MiB and four downloaders: without
    // super-seeding their requests to the seeder overlap, and this fails.)
    let watched = seeder.uploaded();
    assert_eq!(watched.served_bytes, 0);
    let total = 16 * 1024 * 1024 + 99;
    let mut downloads = Vec::new();
    for (i, f) in fetchers.iter().enumerate() {
        downloads.push(start_get(f, id, &dir.join(format!("copy-{i}.bin"))).await);
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let up = seeder.uploaded();
        assert!(
            up.served_distinct_bytes >= up.served_bytes.min(total),
            "a chunk went out twice in the first copy: {up:?}"
        );
        if up.served_bytes >= total {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the seeder never sent a whole copy: {up:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let want = std::fs::read(&source).expect("read");
    for dl in downloads {
        let path = tokio::time::timeout(WAIT, dl.finished())
            .await
            .expect("in time")
            .expect("verified");
        assert_eq!(std::fs::read(path).expect("read"), want);
    }
    assert_eq!(seeder.uploaded().served_distinct_bytes, total);
    tracker.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_for_chunks_past_the_end_of_a_file_is_clipped_and_the_sharer_keeps_serving() {
    use tidepool_node::{Channel, Event};
    use tidepool_protocol::pool::{ChunkRanges, PoolMessage};
    let _serial = one_at_a_time().await;
    // A node pinned by such a request can starve this runtime's timers: a watchdog thread
    // fails the test instead of letting it hang.
    let finished = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    std::thread::spawn({
        let finished = finished.clone();
        move || {
            let start = std::time::Instant::now();
            while !finished.load(std::sync::atomic::Ordering::Relaxed) {
                if start.elapsed() > Duration::from_secs(120) {
                    // Its own handle on stderr and an abort: a pinned process may hold the
                    // locks that printing and a normal exit take.
                    if let Ok(mut err) = std::fs::OpenOptions::new()
                        .write(true)
                        .open("/proc/self/fd/2")
                    {
                        use std::io::Write;
                        let _ = err.write_all(
                            b"a request past the end of a file pinned the sharer for 120 s\n",
                        );
                    }
                    std::process::abort();
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    });
    let tracker = tracker();
    let dir = temp("past-end");
    // Four 64 KiB chunks.
    let source = random_file(&dir, 256 * 1024);
    let sharer = pool(node_config(&tracker, "past-end"), pool_config()).await;
    let id = sharer.share(&source).expect("shares");
    // A hostile peer speaking the pool protocol by hand: it asks for chunks 0..u32::MAX.
    let raw = Node::join(node_config(&tracker, "past-end"))
        .await
        .expect("joins");
    let peer = next_peer(&raw).await;
    let mut frame = Vec::new();
    PoolMessage::FileRequest {
        request_id: 1,
        requester: raw.peer_id(),
        file_id: id,
        requested: ChunkRanges::from_range(0..u32::MAX),
        promised: ChunkRanges::new(),
        from_origin: false,
        hops_left: 3,
    }
    .encode(&mut frame);
    raw.send(peer, Channel::Control, &frame)
        .await
        .expect("request sent");
    // It gets the file's four chunks and no more.
    let mut chunks = 0;
    let (quiet, deadline) = (Duration::from_secs(3), tokio::time::Instant::now() + WAIT);
    while let Ok(Some(event)) = tokio::time::timeout(quiet, raw.next_event()).await {
        if let Event::Message {
            channel: Channel::Chunks,
            ..
        } = event
        {
            chunks += 1;
        }
        // Unclipped, the sharer would go on past the end (or never answer at all).
        if chunks > 4 || tokio::time::Instant::now() > deadline {
            break;
        }
    }
    assert_eq!(chunks, 4, "one message per chunk of the file");
    // And the sharer still serves everyone else at once.
    let downloader = pool(node_config(&tracker, "past-end"), pool_config()).await;
    let target = dir.join("copy.bin");
    let download = start_get(&downloader, id, &target).await;
    finishes_identical(download, &source, "verified").await;
    tracker.shutdown();
    let _ = std::fs::remove_dir_all(dir);
    finished.store(true, std::sync::atomic::Ordering::Relaxed);
}
