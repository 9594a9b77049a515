//! Pool campaigns: a tracker (in-process, or one given by URL), N `tidepool-node` processes
//! on loopback — k seeders sharing a generated file, the rest fetching it, optional relays
//! that only pass chunks on — a churn schedule that kills and restarts nodes, and the
//! numbers: per-node completion time, goodput over time, duplicates, chunks-missing rounds,
//! bytes served by seeders and by relays, peak RSS and CPU per process, kernel UDP drops,
//! tracker messages. Every finished file is hashed and compared with the source.
//!
//! Each node prints a JSON status line a second (`--json`); this module reads those and
//! `/proc`, and never reaches into a node otherwise, so what it measures is what a user
//! running the binaries would see.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use crate::pool_baselines::{RawBaseline, WebtorrentBaseline};

/// What a campaign runs. Every field is a `pool` flag of `tidepool-load-test`.
#[derive(Debug, Clone, Serialize, Deserialize, clap::Args)]
pub struct PoolRunConfig {
    /// Node processes, seeders included (relays not included).
    #[arg(long, default_value_t = 9)]
    pub nodes: usize,
    /// Size of the generated file, MiB.
    #[arg(long, default_value_t = 64)]
    pub file_mib: u64,
    /// Nodes that start with the whole file.
    #[arg(long, default_value_t = 1)]
    pub seeders: usize,
    /// Extra nodes that hold nothing and only relay and cache (`tidepool-node serve`).
    /// They join right after the seeders, and fetchers start once each relay has a peer,
    /// so with a small `--seeder-max-peers` the seeders' slots go to relays.
    #[arg(long, default_value_t = 0)]
    pub relays: usize,
    /// Percent of the fetching nodes killed (and restarted) each churn round, chosen among
    /// those unfinished and up for at least one round. (Finished ones are left alone:
    /// restarting `get` on a finished file would fetch it anew rather than resume.)
    #[arg(long, default_value_t = 0.0)]
    pub churn: f64,
    /// Seconds between churn rounds (the first comes after this long, too).
    #[arg(long, default_value_t = 5.0)]
    pub churn_every: f64,
    /// Churn rounds at most (0: every `--churn-every` seconds until the end). One round
    /// mid-transfer is the "a quarter of the pool vanishes" scenario.
    #[arg(long, default_value_t = 0)]
    #[serde(default)]
    pub churn_rounds: u32,
    /// Seconds a killed node stays down before it restarts (it resumes from its `.part`).
    #[arg(long, default_value_t = 1.0)]
    pub restart_after: f64,
    /// Kill each seeder for good once it has uploaded one full copy of the file (every
    /// chunk sent at least once); the pool must then finish from the copies spread over
    /// the fetchers. Implies `--super-seed`
    /// (a seeder that leaves early should make its one copy a whole one).
    #[arg(long)]
    pub kill_seeder_after_copy: bool,
    /// Seeders run `share --super-seed`: each chunk to one neighbour until all went out.
    #[arg(long)]
    #[serde(default)]
    pub super_seed: bool,
    /// Kill the fetching node that has relayed the most for good, once it has relayed
    /// this many MiB (0: never). The others must still finish.
    #[arg(long, default_value_t = 0.0)]
    pub kill_top_relay_after_mib: f64,
    /// Where the run directory goes (source file, per-node logs, results, report).
    #[arg(long, default_value = "pool-campaign")]
    pub out: PathBuf,
    /// Seconds before the campaign gives up; exit status is non-zero then.
    #[arg(long, default_value_t = 300.0)]
    pub deadline: f64,
    /// Use this tracker instead of starting one in-process.
    #[arg(long)]
    pub tracker: Option<String>,
    /// The `tidepool-node` binary (default: next to this one, i.e. the same target dir).
    #[arg(long)]
    pub node_bin: Option<PathBuf>,
    /// Connections per node.
    #[arg(long, default_value_t = 8)]
    pub max_peers: usize,
    /// Connections per seeder (default: --max-peers). Small values force relaying.
    #[arg(long)]
    pub seeder_max_peers: Option<usize>,
    /// Seconds a full node waits before making room for a starved peer (node default
    /// when unset; large values keep a seeder's slots with the relays that took them).
    #[arg(long)]
    pub rotate_after: Option<u64>,
    /// Seconds without progress before a node re-requests missing chunks.
    #[arg(long, default_value_t = 5)]
    pub missing_after: u64,
    /// Milliseconds of its delivery rate each source is asked for (node default when unset;
    /// 0: always the most).
    #[arg(long)]
    pub request_queue_ms: Option<u64>,
    /// MiB of relay cache per node.
    #[arg(long, default_value_t = 256)]
    pub cache_mib: u64,
    /// Seed of the generated file's bytes and of the churn choices.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// After the pool, run as many bare data-channel pairs as there are fetchers, each
    /// moving the file's size (needs `node-bulk` next to the node binary).
    #[arg(long)]
    pub raw_baseline: bool,
    /// After the pool, run the same scenario with npm webtorrent through the same tracker;
    /// DIR is the folder holding `webtorrent-transfer.mjs` and its `node_modules`
    /// (`interop/`).
    #[arg(long, value_name = "DIR")]
    pub webtorrent: Option<PathBuf>,
    /// No live progress lines on stderr.
    #[arg(long)]
    pub quiet: bool,
}

impl Default for PoolRunConfig {
    fn default() -> Self {
        use clap::Parser;
        #[derive(Parser)]
        struct Wrap {
            #[command(flatten)]
            c: PoolRunConfig,
        }
        Wrap::parse_from(["pool"]).c
    }
}

/// A node's part in the campaign.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Starts with the file.
    Seeder,
    /// Fetches the file.
    Fetcher,
    /// Holds nothing; relays and caches.
    Relay,
}

/// One node's numbers, summed over its restarts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeResult {
    /// Its place in the campaign (also its directory name).
    pub index: usize,
    /// Its part.
    pub role: Role,
    /// Times it was killed and started again.
    pub restarts: u32,
    /// Killed and not restarted (a seeder after its copy, the top relay).
    pub removed: bool,
    /// Seconds from the campaign start to its verified file.
    pub completion_secs: Option<f64>,
    /// Seconds from the campaign start to its first chunk (its first status line with any).
    #[serde(default)]
    pub first_chunk_secs: Option<f64>,
    /// Whether its finished file hashed the same as the source.
    pub verified: Option<bool>,
    /// Verified bytes held at the end.
    pub have_bytes: u64,
    /// Chunk payload bytes received (duplicates included).
    pub received_bytes: u64,
    /// Chunks that arrived twice.
    pub duplicate_chunks: u64,
    /// Chunks-missing rounds (stalled requests asked again).
    pub missing_rounds: u64,
    /// Chunk bytes served from its own copy.
    pub served_bytes: u64,
    /// Chunk bytes passed on for others.
    pub relayed_bytes: u64,
    /// Peak resident memory of any of its processes, KiB.
    pub peak_rss_kib: u64,
    /// CPU seconds of all its processes.
    pub cpu_secs: f64,
}

/// The pool at one moment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    /// Seconds since the start.
    pub t: f64,
    /// Verified bytes held by fetchers, summed.
    pub have_bytes: u64,
    /// Chunk bytes uploaded by seeders so far.
    pub seeder_bytes: u64,
    /// Chunk bytes uploaded by fetchers and relays so far (own copies and relayed).
    pub peer_bytes: u64,
    /// Fetchers done.
    pub done: usize,
    /// Processes alive.
    pub alive: usize,
}

/// A campaign's outcome.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoolRunResult {
    /// What ran.
    pub config: PoolRunConfig,
    /// The file's size.
    pub file_bytes: u64,
    /// The file id the seeders printed.
    pub file_id: String,
    /// Seconds from the first fetcher's start to the end.
    pub duration_secs: f64,
    /// Whether every fetcher still in the pool finished with a verified file.
    pub all_verified: bool,
    /// Per node.
    pub nodes: Vec<NodeResult>,
    /// Every 250 ms.
    pub timeline: Vec<Sample>,
    /// Kernel UDP receive-buffer drops during the run (whole machine).
    pub udp_drops: Option<u64>,
    /// Frames the tracker received, when it ran in-process.
    pub tracker_messages_in: Option<u64>,
    /// Bare data channels, same number of pairs, same run.
    pub raw_baseline: Option<RawBaseline>,
    /// npm webtorrent, same file, same tracker, same run.
    pub webtorrent: Option<WebtorrentBaseline>,
    /// The summary numbers.
    pub summary: Summary,
}

/// The numbers a report leads with.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Summary {
    /// Fetchers that finished verified / fetchers that stayed in the pool.
    pub completed: usize,
    /// Fetchers that stayed in the pool.
    pub survivors: usize,
    /// Completion time percentiles of the survivors, seconds.
    pub completion_p50: Option<f64>,
    /// 90th percentile.
    pub completion_p90: Option<f64>,
    /// Slowest.
    pub completion_max: Option<f64>,
    /// Slowest of the fetchers churn never killed (what the others' churn cost them).
    #[serde(default)]
    pub completion_max_never_killed: Option<f64>,
    /// Slowest of the fetchers churn killed and restarted.
    #[serde(default)]
    pub completion_max_restarted: Option<f64>,
    /// Fetched bytes over the time until the last fetcher finished, MiB/s.
    pub goodput_mib_s: f64,
    /// Fetched bytes over the time from the first chunk anywhere to the last fetcher
    /// done (set-up excluded, as the bare data-channel baseline measures), MiB/s.
    #[serde(default)]
    pub transfer_goodput_mib_s: f64,
    /// Received bytes beyond the file, over the file, summed over fetchers.
    pub duplicate_ratio: f64,
    /// Chunks-missing rounds, all fetchers.
    pub missing_rounds: u64,
    /// Chunk bytes uploaded by seeders.
    pub seeder_served_bytes: u64,
    /// Chunk bytes uploaded by fetchers and relays (own copies plus relayed).
    pub peer_served_bytes: u64,
    /// Highest peak RSS of any node, KiB.
    pub peak_rss_kib_max: u64,
    /// Node restarts by churn.
    pub restarts: u32,
}

struct Slot {
    role: Role,
    args: Vec<String>,
    child: Option<Child>,
    started: Instant,
    generation: u32,
    down_until: Option<Instant>,
    result: NodeResult,
    /// This process's latest status line, and the totals of earlier processes.
    last: Status,
    base: Status,
    cpu_now: f64,
    done_path: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Status {
    have: u64,
    received: u64,
    duplicates: u64,
    missing_rounds: u64,
    served: u64,
    served_distinct: u64,
    relayed: u64,
}

impl Status {
    fn from_json(v: &serde_json::Value) -> Option<Status> {
        let n = |k: &str| v.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
        v.get("served")?;
        Some(Status {
            have: n("have"),
            received: n("received"),
            duplicates: n("duplicates"),
            missing_rounds: n("missing_rounds"),
            served: n("served"),
            served_distinct: n("served_distinct"),
            relayed: n("relayed"),
        })
    }

    fn plus(self, o: Status) -> Status {
        Status {
            have: o.have,
            received: self.received + o.received,
            duplicates: self.duplicates + o.duplicates,
            missing_rounds: self.missing_rounds + o.missing_rounds,
            served: self.served + o.served,
            served_distinct: self.served_distinct.max(o.served_distinct),
            relayed: self.relayed + o.relayed,
        }
    }
}

enum Msg {
    Line(usize, u32, serde_json::Value),
    Verified(usize, bool),
}

/// Where the `tidepool-node` binary is: the flag, or next to the running executable (a
/// test binary lives one level further down, in `deps/`).
pub fn find_node_bin(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.to_owned());
    }
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join("tidepool-node");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "tidepool-node not found next to {}; build it (cargo build --release -p tidepool-node) or pass --node-bin",
        exe.display()
    )
}

/// Writes `mib` MiB of reproducible random bytes to `path`; returns their BLAKE3 hash.
fn generate(path: &Path, mib: u64, seed: u64) -> anyhow::Result<blake3::Hash> {
    use std::io::Write;
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut hasher = blake3::Hasher::new();
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..mib {
        rng.fill(&mut block);
        hasher.update(&block);
        out.write_all(&block)?;
    }
    out.flush()?;
    Ok(hasher.finalize())
}

fn hash_file(path: &Path) -> std::io::Result<blake3::Hash> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(std::fs::File::open(path)?)?;
    Ok(hasher.finalize())
}

/// Peak RSS (KiB) and CPU seconds of a live process, from `/proc`.
fn proc_usage(pid: u32) -> Option<(u64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hwm = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some((hwm, ticks / 100.0))
}

/// Sum of the tracker's `tidepool_messages_in_total` over kinds, from its `/metrics`.
async fn tracker_messages_in(addr: std::net::SocketAddr) -> Option<u64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).await.ok()?;
    Some(
        text.lines()
            .filter(|l| l.starts_with("tidepool_messages_in_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum(),
    )
}

fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied()
}

/// Runs one campaign to the end (everyone verified, or the deadline) and writes
/// `results.json` into the run directory.
pub async fn run(config: PoolRunConfig) -> anyhow::Result<PoolRunResult> {
    if config.seeders == 0 || config.seeders >= config.nodes {
        bail!("need at least one seeder and one fetcher (--seeders < --nodes)");
    }
    let node_bin = find_node_bin(config.node_bin.as_deref())?;
    if let Some(interop) = &config.webtorrent {
        crate::pool_baselines::webtorrent_version(interop)?;
    }
    let dir = config.out.clone();
    // One campaign per directory: logs are appended to, so start them afresh.
    let _ = std::fs::remove_dir_all(dir.join("nodes"));
    std::fs::create_dir_all(dir.join("nodes"))
        .with_context(|| format!("creating {}", dir.display()))?;
    let source = dir.join("source.bin");
    let (mib, seed) = (config.file_mib, config.seed);
    let src = source.clone();
    let source_hash = tokio::task::spawn_blocking(move || generate(&src, mib, seed)).await??;
    let file_bytes = mib << 20;
    // Start from a quiet disk: write-back of an earlier run's copies (webtorrent's above
    // all) would otherwise take CPU from this one (seen: 63% of raw alone, 42-48% right
    // after a webtorrent baseline).
    let _ = Command::new("sync").status().await;

    let (tracker, tracker_url) = match &config.tracker {
        Some(url) => (None, url.clone()),
        None => {
            let mut c = tidepool_tracker::Config::default();
            c.network.listen = "127.0.0.1:0".parse()?;
            c.metrics.listen = Some("127.0.0.1:0".parse()?);
            let t = tidepool_tracker::Tracker::start(c).context("starting the tracker")?;
            let url = t.url();
            (Some(t), url)
        }
    };
    let pool_name = format!("campaign-{}-{}", std::process::id(), config.seed);
    let udp_at_start = tidepool_node::udp::kernel_udp_rcvbuf_errors();

    let common = |max_peers: usize, index: usize| -> Vec<String> {
        let node_dir = dir.join("nodes").join(format!("node-{index}"));
        let mut args: Vec<String> = config
            .rotate_after
            .map(|s| vec!["--rotate-after-secs".into(), s.to_string()])
            .unwrap_or_default();
        if let Some(ms) = config.request_queue_ms {
            args.extend(["--request-queue-ms".into(), ms.to_string()]);
        }
        args.extend([
            "--tracker".into(),
            tracker_url.clone(),
            "--pool".into(),
            pool_name.clone(),
            "--loopback".into(),
            "--max-peers".into(),
            max_peers.to_string(),
            "--missing-after-secs".into(),
            config.missing_after.to_string(),
            "--cache-mib".into(),
            config.cache_mib.to_string(),
            "--cache-dir".into(),
            node_dir.join("cache").display().to_string(),
            // Four status lines a second: completion and first-chunk times to ±250 ms.
            "--status-every-ms".into(),
            "250".into(),
            "--json".into(),
        ]);
        args
    };
    let (tx, mut rx) = mpsc::channel::<Msg>(1024);
    let mut slots: Vec<Slot> = Vec::new();
    let new_slot = |index: usize, role: Role, args: Vec<String>| Slot {
        role,
        args,
        child: None,
        started: Instant::now(),
        generation: 0,
        down_until: None,
        result: NodeResult {
            index,
            role,
            restarts: 0,
            removed: false,
            completion_secs: None,
            first_chunk_secs: None,
            verified: None,
            have_bytes: 0,
            received_bytes: 0,
            duplicate_chunks: 0,
            missing_rounds: 0,
            served_bytes: 0,
            relayed_bytes: 0,
            peak_rss_kib: 0,
            cpu_secs: 0.0,
        },
        last: Status::default(),
        base: Status::default(),
        cpu_now: 0.0,
        done_path: None,
    };

    // Seeders first; the first one's id line names the file for everyone else.
    let seeder_peers = config.seeder_max_peers.unwrap_or(config.max_peers);
    for i in 0..config.seeders {
        let mut args = vec!["share".into(), source.display().to_string()];
        if config.super_seed || config.kill_seeder_after_copy {
            args.push("--super-seed".into());
        }
        args.extend(common(seeder_peers, i));
        slots.push(new_slot(i, Role::Seeder, args));
        spawn(&node_bin, &dir, &mut slots, i, &tx)?;
    }
    let file_id = loop {
        let msg = tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .context("no seeder printed a file id within 60 s")?
            .context("seeders exited")?;
        if let Msg::Line(_, _, v) = msg
            && let Some(id) = v.get("file_id").and_then(|v| v.as_str())
        {
            break id.to_owned();
        }
    };
    // Relays next, and fetchers once every relay has a peer.
    let relays = config.nodes..config.nodes + config.relays;
    for i in relays.clone() {
        let mut args = vec!["serve".into()];
        args.extend(common(config.max_peers, i));
        slots.push(new_slot(i, Role::Relay, args));
    }
    let mut relay_slots: Vec<Slot> = slots.drain(config.seeders..).collect();
    for k in 0..relay_slots.len() {
        spawn(&node_bin, &dir, &mut relay_slots, k, &tx)?;
    }
    let mut connected = std::collections::HashSet::new();
    while connected.len() < relay_slots.len() {
        let msg = tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .context("relays did not connect within 60 s")?
            .context("relays exited")?;
        if let Msg::Line(i, _, v) = msg
            && relays.contains(&i)
            && v.get("peers").and_then(|p| p.as_u64()).unwrap_or(0) > 0
        {
            connected.insert(i);
        }
    }
    for i in config.seeders..config.nodes {
        let node_dir = dir.join("nodes").join(format!("node-{i}"));
        std::fs::create_dir_all(&node_dir)?;
        let mut args = vec![
            "get".into(),
            file_id.clone(),
            "-o".into(),
            node_dir.join("file.bin").display().to_string(),
            "--stay".into(),
        ];
        args.extend(common(config.max_peers, i));
        slots.push(new_slot(i, Role::Fetcher, args));
    }
    for i in config.seeders..slots.len() {
        spawn(&node_bin, &dir, &mut slots, i, &tx)?;
    }
    slots.extend(relay_slots);

    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(config.deadline);
    // Sampled as often as the nodes report (every 250 ms), so churn, kills and the
    // timeline react within one report.
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut next_churn = start + Duration::from_secs_f64(config.churn_every.max(0.1));
    let mut rng = fastrand::Rng::with_seed(config.seed ^ 0x5eed);
    let mut timeline = Vec::new();
    let mut top_relay_killed = config.kill_top_relay_after_mib <= 0.0;
    let mut churn_rounds = 0u32;
    let finished = loop {
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(Msg::Line(i, generation, v)) => {
                    let Some(slot) = slots.get_mut(i) else { continue };
                    if generation != slot.generation {
                        continue;
                    }
                    if let Some(s) = Status::from_json(&v) {
                        if s.have > slot.base.have && slot.result.first_chunk_secs.is_none() {
                            slot.result.first_chunk_secs = Some(start.elapsed().as_secs_f64());
                        }
                        slot.last = s;
                    }
                    if let Some(path) = v.get("done").and_then(|p| p.as_str())
                        && slot.done_path.is_none()
                    {
                        slot.result.completion_secs = Some(start.elapsed().as_secs_f64());
                        let path = PathBuf::from(path);
                        slot.done_path = Some(path.clone());
                        let tx = tx.clone();
                        tokio::task::spawn_blocking(move || {
                            let ok = hash_file(&path).is_ok_and(|h| h == source_hash);
                            let _ = tx.blocking_send(Msg::Verified(i, ok));
                        });
                    }
                }
                Some(Msg::Verified(i, ok)) => {
                    if let Some(slot) = slots.get_mut(i) {
                        slot.result.verified = Some(ok);
                    }
                }
                None => bail!("all node readers ended"),
            },
            _ = tick.tick() => {
                let now = Instant::now();
                for (i, slot) in slots.iter_mut().enumerate() {
                    observe(slot);
                    if slot.down_until.is_some_and(|t| now >= t) {
                        slot.down_until = None;
                        spawn(&node_bin, &dir, std::slice::from_mut(slot), 0, &tx)
                            .with_context(|| format!("restarting node {i}"))?;
                    }
                }
                let fetchers = || slots.iter().filter(|s| s.role == Role::Fetcher);
                let seeder_bytes = slots.iter().filter(|s| s.role == Role::Seeder)
                    .map(|s| total(s).served).sum();
                let peer_bytes = slots.iter().filter(|s| s.role != Role::Seeder)
                    .map(|s| { let t = total(s); t.served + t.relayed }).sum();
                let sample = Sample {
                    t: start.elapsed().as_secs_f64(),
                    have_bytes: fetchers().map(|s| s.last.have).sum(),
                    seeder_bytes,
                    peer_bytes,
                    done: fetchers().filter(|s| s.result.verified == Some(true)).count(),
                    alive: slots.iter().filter(|s| s.child.is_some()).count(),
                };
                if !config.quiet {
                    let n = fetchers().filter(|s| !s.result.removed).count();
                    eprintln!(
                        "t={:>5.1}s done {}/{} have {:>6.1}/{} MiB  seeders sent {:.1} MiB, peers sent {:.1} MiB, alive {}",
                        sample.t, sample.done, n,
                        sample.have_bytes as f64 / 1048576.0,
                        (file_bytes >> 20) * n as u64,
                        seeder_bytes as f64 / 1048576.0,
                        peer_bytes as f64 / 1048576.0,
                        sample.alive,
                    );
                }
                timeline.push(sample);
                let survivors: Vec<&Slot> = fetchers().filter(|s| !s.result.removed).collect();
                if survivors.iter().any(|s| s.result.verified == Some(false)) {
                    break false;
                }
                if survivors.iter().all(|s| s.result.verified == Some(true)) {
                    break true;
                }
                if now >= deadline {
                    break false;
                }
                // Every unfinished fetcher exited (gave up) and none is due back.
                if fetchers().all(|s| {
                    s.result.removed
                        || s.result.verified.is_some()
                        || (s.child.is_none() && s.down_until.is_none())
                }) {
                    eprintln!("every unfinished fetcher has exited");
                    break false;
                }
                // Churn: kill a share of the unfinished fetchers; they come back later.
                if config.churn > 0.0
                    && now >= next_churn
                    && (config.churn_rounds == 0 || churn_rounds < config.churn_rounds)
                {
                    churn_rounds += 1;
                    let every = Duration::from_secs_f64(config.churn_every.max(0.1));
                    next_churn = now + every;
                    let mut live: Vec<usize> = (0..slots.len())
                        .filter(|&i| {
                            let s = &slots[i];
                            s.role == Role::Fetcher
                                && s.child.is_some()
                                && s.done_path.is_none()
                                && now.duration_since(s.started) >= every
                        })
                        .collect();
                    rng.shuffle(&mut live);
                    let fetching = fetchers().filter(|s| !s.result.removed).count();
                    let n = ((fetching as f64) * config.churn / 100.0).round().max(1.0) as usize;
                    for &i in live.iter().take(n) {
                        let slot = &mut slots[i];
                        kill(slot).await;
                        slot.down_until = Some(now + Duration::from_secs_f64(config.restart_after));
                        slot.result.restarts += 1;
                    }
                }
                if config.kill_seeder_after_copy {
                    for slot in slots.iter_mut().filter(|s| s.role == Role::Seeder && !s.result.removed) {
                        // One whole copy out: every chunk sent at least once.
                        if total(slot).served_distinct >= file_bytes {
                            kill(slot).await;
                            slot.result.removed = true;
                        }
                    }
                }
                if !top_relay_killed {
                    let limit = (config.kill_top_relay_after_mib * 1048576.0) as u64;
                    let top = slots.iter_mut()
                        .filter(|s| s.role != Role::Seeder && s.child.is_some() && s.done_path.is_none())
                        .max_by_key(|s| total(s).relayed)
                        .filter(|s| total(s).relayed >= limit);
                    if let Some(slot) = top {
                        kill(slot).await;
                        slot.result.removed = true;
                        top_relay_killed = true;
                    }
                }
            }
        }
    };
    let duration_secs = start.elapsed().as_secs_f64();
    for slot in &mut slots {
        kill(slot).await;
    }
    let udp_drops = match (tidepool_node::udp::kernel_udp_rcvbuf_errors(), udp_at_start) {
        (Some(b), Some(a)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    let tracker_messages = match &tracker {
        Some(t) => match t.metrics_addr() {
            Some(a) => tracker_messages_in(a).await,
            None => None,
        },
        None => None,
    };
    let fetcher_count = config.nodes - config.seeders;
    // Bare pairs first: webtorrent writes every copy to disk, and its write-back would
    // slow whatever runs next; the pool's own copies are flushed before either starts.
    if config.raw_baseline || config.webtorrent.is_some() {
        let _ = Command::new("sync").status().await;
    }
    let raw_baseline = if config.raw_baseline {
        if !config.quiet {
            eprintln!("raw baseline: {fetcher_count} data-channel pairs");
        }
        Some(crate::pool_baselines::raw(&node_bin, fetcher_count, config.file_mib).await?)
    } else {
        None
    };
    let webtorrent = match &config.webtorrent {
        Some(interop) => {
            if !config.quiet {
                eprintln!("webtorrent baseline: 1 seeder, {fetcher_count} fetchers");
            }
            let deadline = Duration::from_secs_f64(config.deadline);
            Some(
                crate::pool_baselines::webtorrent(
                    interop,
                    &tracker_url,
                    &source,
                    source_hash,
                    fetcher_count,
                    &dir,
                    deadline,
                )
                .await?,
            )
        }
        None => None,
    };
    if let Some(t) = tracker {
        t.shutdown();
    }
    let nodes: Vec<NodeResult> = slots
        .iter()
        .map(|s| {
            let t = total(s);
            NodeResult {
                have_bytes: t.have,
                received_bytes: t.received,
                duplicate_chunks: t.duplicates,
                missing_rounds: t.missing_rounds,
                served_bytes: t.served,
                relayed_bytes: t.relayed,
                ..s.result.clone()
            }
        })
        .collect();
    let summary = summarize(&nodes, file_bytes);
    let result = PoolRunResult {
        config,
        file_bytes,
        file_id,
        duration_secs,
        all_verified: finished,
        nodes,
        timeline,
        udp_drops,
        tracker_messages_in: tracker_messages,
        raw_baseline,
        webtorrent,
        summary,
    };
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&result)?,
    )?;
    crate::pool_report::write(&result, &dir)?;
    Ok(result)
}

fn summarize(nodes: &[NodeResult], file_bytes: u64) -> Summary {
    let survivors: Vec<&NodeResult> = nodes
        .iter()
        .filter(|n| n.role == Role::Fetcher && !n.removed)
        .collect();
    let mut times: Vec<f64> = survivors
        .iter()
        .filter(|n| n.verified == Some(true))
        .filter_map(|n| n.completion_secs)
        .collect();
    times.sort_by(f64::total_cmp);
    let slowest = |restarted: bool| {
        survivors
            .iter()
            .filter(|n| (n.restarts > 0) == restarted && n.verified == Some(true))
            .filter_map(|n| n.completion_secs)
            .reduce(f64::max)
    };
    let fetchers = nodes.iter().filter(|n| n.role == Role::Fetcher);
    let got: u64 = survivors.iter().map(|n| n.have_bytes).sum();
    let received: u64 = fetchers.clone().map(|n| n.received_bytes).sum();
    let wanted = file_bytes * fetchers.clone().count() as u64;
    Summary {
        completed: times.len(),
        survivors: survivors.len(),
        completion_p50: percentile(&times, 0.5),
        completion_p90: percentile(&times, 0.9),
        completion_max: times.last().copied(),
        completion_max_never_killed: slowest(false),
        completion_max_restarted: slowest(true),
        goodput_mib_s: times
            .last()
            .map_or(0.0, |t| got as f64 / 1048576.0 / t.max(0.001)),
        transfer_goodput_mib_s: match (
            times.last(),
            survivors
                .iter()
                .filter_map(|n| n.first_chunk_secs)
                .reduce(f64::min),
        ) {
            (Some(last), Some(first)) => got as f64 / 1048576.0 / (last - first).max(0.001),
            _ => 0.0,
        },
        duplicate_ratio: received.saturating_sub(wanted) as f64 / wanted.max(1) as f64,
        missing_rounds: fetchers.clone().map(|n| n.missing_rounds).sum(),
        seeder_served_bytes: nodes
            .iter()
            .filter(|n| n.role == Role::Seeder)
            .map(|n| n.served_bytes)
            .sum(),
        peer_served_bytes: nodes
            .iter()
            .filter(|n| n.role != Role::Seeder)
            .map(|n| n.served_bytes + n.relayed_bytes)
            .sum(),
        peak_rss_kib_max: nodes.iter().map(|n| n.peak_rss_kib).max().unwrap_or(0),
        restarts: nodes.iter().map(|n| n.restarts).sum(),
    }
}

fn total(slot: &Slot) -> Status {
    slot.base.plus(slot.last)
}

/// Samples a live process's memory and CPU, and notices one that exited on its own.
fn observe(slot: &mut Slot) {
    let Some(child) = slot.child.as_mut() else {
        return;
    };
    if let Some(pid) = child.id()
        && let Some((hwm, cpu)) = proc_usage(pid)
    {
        slot.result.peak_rss_kib = slot.result.peak_rss_kib.max(hwm);
        slot.cpu_now = cpu;
    }
    if let Ok(Some(status)) = child.try_wait() {
        report_exit(slot, status);
        retire(slot);
    }
}

fn report_exit(slot: &Slot, status: std::process::ExitStatus) {
    if slot.done_path.is_none() || !status.success() {
        eprintln!(
            "node {} ({:?}) exited: {status}",
            slot.result.index, slot.role
        );
    }
}

/// Folds a finished process's counters into the node's totals.
fn retire(slot: &mut Slot) {
    slot.child = None;
    slot.base = slot.base.plus(slot.last);
    slot.base.have = slot.last.have;
    slot.last = Status {
        have: slot.last.have,
        ..Status::default()
    };
    slot.result.cpu_secs += slot.cpu_now;
    slot.cpu_now = 0.0;
}

async fn kill(slot: &mut Slot) {
    observe(slot);
    if let Some(child) = slot.child.as_mut() {
        let _ = child.start_kill();
        let _ = child.wait().await;
        retire(slot);
    }
}

/// Starts `slots[i]`'s process (again), its stdout read line by line into `tx`.
fn spawn(
    bin: &Path,
    dir: &Path,
    slots: &mut [Slot],
    i: usize,
    tx: &mpsc::Sender<Msg>,
) -> anyhow::Result<()> {
    let slot = &mut slots[i];
    let index = slot.result.index;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("nodes").join(format!("node-{index}.log")))?;
    slot.generation += 1;
    slot.started = Instant::now();
    let mut child = Command::new(bin)
        .args(&slot.args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let stdout = child.stdout.take().context("node stdout")?;
    let (tx, generation) = (tx.clone(), slot.generation);
    tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Ok(v) = serde_json::from_str(&line)
                && tx.send(Msg::Line(index, generation, v)).await.is_err()
            {
                return;
            }
        }
    });
    slot.child = Some(child);
    Ok(())
}
