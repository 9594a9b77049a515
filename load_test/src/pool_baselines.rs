//! Baselines a pool campaign is measured against, run on the same machine right after it:
//! (a) bare WebRTC data channels — as many sender/receiver pairs as the pool has fetchers,
//! each moving the file's size at once (`node-bulk raw`, one process per pair), so pool
//! goodput is a ratio of what the stack itself can move; (b) npm `webtorrent` 3.x, one
//! seeder and the same number of fetchers of the same file through the same tracker.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Bare data channels, all pairs at once.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RawBaseline {
    /// Sender/receiver pairs (one process each).
    pub pairs: usize,
    /// MiB each pair moved.
    pub mib_per_pair: u64,
    /// All pairs' bytes over the span from the first transfer's start to the last one's
    /// end, MiB/s.
    pub aggregate_mib_s: f64,
    /// Each pair's own rate, MiB/s.
    pub per_pair_mib_s: Vec<f64>,
}

/// npm webtorrent moving the same file through the same tracker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WebtorrentBaseline {
    /// The installed webtorrent version.
    pub version: String,
    /// Seconds from the fetchers' start to each one's verified file (None: not done).
    pub completion_secs: Vec<Option<f64>>,
    /// Fetched bytes over the time until the last one finished, MiB/s.
    pub goodput_mib_s: f64,
}

/// Runs `pairs` `node-bulk raw` processes at once (the binary sits next to `node_bin`).
pub async fn raw(node_bin: &Path, pairs: usize, mib: u64) -> anyhow::Result<RawBaseline> {
    let bulk = node_bin.with_file_name("node-bulk");
    if !bulk.is_file() {
        bail!(
            "{} not found; build it: cargo build --release -p tidepool-benchmarks --bin node-bulk",
            bulk.display()
        );
    }
    let mut children = Vec::new();
    for _ in 0..pairs {
        children.push(
            Command::new(&bulk)
                .args(["raw", "--mib", &mib.to_string()])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting {}", bulk.display()))?,
        );
    }
    // Each pair reports its own transfer time; its end is when its process exits, so the
    // aggregate counts the wall-clock span from the first transfer's start to the last
    // one's end (pairs whose set-up ran late do not inflate it).
    let waits: Vec<_> = children
        .into_iter()
        .map(|child| {
            tokio::spawn(async move {
                let out = child.wait_with_output().await;
                (out, Instant::now())
            })
        })
        .collect();
    let mut seconds = Vec::new();
    let mut spans = Vec::new();
    for w in waits {
        let (out, end) = tokio::time::timeout(Duration::from_secs(300), w)
            .await
            .context("a raw pair took over 300 s")??;
        let out = out?;
        let text = String::from_utf8_lossy(&out.stdout);
        let v: serde_json::Value = text
            .lines()
            .find_map(|l| serde_json::from_str(l).ok())
            .context("node-bulk printed no result")?;
        let secs = v["seconds"].as_f64().context("seconds")?;
        seconds.push(secs);
        spans.push((end - Duration::from_secs_f64(secs), end));
    }
    let first = spans.iter().map(|s| s.0).min().context("no pairs")?;
    let last = spans.iter().map(|s| s.1).max().context("no pairs")?;
    let wall = (last - first).as_secs_f64().max(1e-9);
    Ok(RawBaseline {
        pairs,
        mib_per_pair: mib,
        aggregate_mib_s: (pairs as u64 * mib) as f64 / wall,
        per_pair_mib_s: seconds.iter().map(|s| mib as f64 / s.max(1e-9)).collect(),
    })
}

/// The webtorrent version installed under `interop`, or why there is none (checked before
/// a campaign starts, so a missing install does not waste the run).
pub fn webtorrent_version(interop: &Path) -> anyhow::Result<String> {
    if !interop.join("webtorrent-transfer.mjs").is_file() {
        bail!("{} holds no webtorrent-transfer.mjs", interop.display());
    }
    std::fs::read_to_string(interop.join("node_modules/webtorrent/package.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["version"].as_str().map(str::to_owned))
        .with_context(|| {
            format!(
                "webtorrent is not installed in {} (npm ci --ignore-scripts there)",
                interop.display()
            )
        })
}

fn webtorrent_process(dir: &Path, args: &[String], log: std::fs::File) -> anyhow::Result<Child> {
    Command::new("node")
        .arg(dir.join("webtorrent-transfer.mjs"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("starting node (Node.js) for the webtorrent baseline")
}

/// One webtorrent seeder of `source` and `fetchers` fetchers through `tracker`; each
/// fetcher keeps seeding after it is done, like a pool node, until all are done or
/// `deadline` passes.
pub async fn webtorrent(
    interop: &Path,
    tracker: &str,
    source: &Path,
    source_hash: blake3::Hash,
    fetchers: usize,
    out: &Path,
    deadline: Duration,
) -> anyhow::Result<WebtorrentBaseline> {
    let version = webtorrent_version(interop)?;
    let dir = out.join("webtorrent");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let secs = deadline.as_secs().max(10).to_string();
    let log = |name: &str| std::fs::File::create(dir.join(format!("{name}.log")));
    let mut seed = webtorrent_process(
        interop,
        &[
            "seed".into(),
            "--tracker".into(),
            tracker.into(),
            "--file".into(),
            source.display().to_string(),
            "--deadline".into(),
            secs.clone(),
        ],
        log("seed")?,
    )?;
    let mut lines = BufReader::new(seed.stdout.take().context("seed stdout")?).lines();
    let magnet = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await? {
            if let Some(m) = line.strip_prefix("MAGNET ") {
                return Ok(m.to_owned());
            }
        }
        bail!("the webtorrent seeder exited without a magnet link")
    })
    .await
    .context("no magnet link within 60 s")??;
    let start = Instant::now();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(usize, PathBuf, f64)>(fetchers.max(1));
    let mut children = vec![seed];
    for i in 0..fetchers {
        let node_dir = dir.join(format!("node-{i}"));
        let mut child = webtorrent_process(
            interop,
            &[
                "fetch".into(),
                "--tracker".into(),
                tracker.into(),
                "--magnet".into(),
                magnet.clone(),
                "--out".into(),
                node_dir.display().to_string(),
                "--deadline".into(),
                secs.clone(),
                "--stay".into(),
            ],
            log(&format!("node-{i}"))?,
        )?;
        let stdout = child.stdout.take().context("fetch stdout")?;
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(rest) = line.strip_prefix("DONE ") {
                    let path = rest.split(' ').next().unwrap_or_default();
                    let _ = tx
                        .send((i, PathBuf::from(path), start.elapsed().as_secs_f64()))
                        .await;
                }
            }
        });
        children.push(child);
    }
    drop(tx);
    let mut completion = vec![None; fetchers];
    let end = tokio::time::Instant::now() + deadline;
    while completion.iter().any(Option::is_none) {
        match tokio::time::timeout_at(end, rx.recv()).await {
            Ok(Some((i, path, t))) => {
                let ok = tokio::task::spawn_blocking(move || {
                    let mut h = blake3::Hasher::new();
                    std::fs::File::open(&path)
                        .and_then(|f| h.update_reader(f).map(|_| ()))
                        .is_ok()
                        && h.finalize() == source_hash
                })
                .await
                .unwrap_or(false);
                if let Some(slot) = completion.get_mut(i) {
                    // A fetcher whose file does not match stays "not done".
                    *slot = ok.then_some(t);
                    if !ok {
                        break;
                    }
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
    for mut c in children {
        // Closing stdin lets each leave the swarm; kill what does not go in a second.
        drop(c.stdin.take());
        let _ = tokio::time::timeout(Duration::from_secs(1), c.wait()).await;
        let _ = c.start_kill();
    }
    let last = completion.iter().flatten().copied().fold(0.0, f64::max);
    let done = completion.iter().flatten().count() as u64;
    let size = std::fs::metadata(source)?.len();
    Ok(WebtorrentBaseline {
        version,
        goodput_mib_s: if last > 0.0 {
            (done * size) as f64 / (1024.0 * 1024.0) / last
        } else {
            0.0
        },
        completion_secs: completion,
    })
}
