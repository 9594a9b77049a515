//! Runs the deterministic pool simulator from the command line, e.g. the 1,000-node
//! scenario: `cargo run --release -p tidepool-node --example pool_sim -- --nodes 1000
//! --file-mib 256`. Prints the report and the CPU time the simulation took.

use std::time::Duration;

use clap::Parser;
use tidepool_node::pool::sim::{Churn, Sim, SimConfig};

#[derive(Parser, Debug)]
struct Args {
    /// Downloading nodes (one seeder besides).
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// File size in MiB.
    #[arg(long, default_value_t = 256)]
    file_mib: u64,
    /// Seed of the run.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Share of downloaders killed for good during the churn window.
    #[arg(long, default_value_t = 0.0)]
    kill: f64,
    /// Share of downloaders killed and restarted from their partial files.
    #[arg(long, default_value_t = 0.0)]
    restart: f64,
    /// Share of downloaders joining late (during the churn window).
    #[arg(long, default_value_t = 0.0)]
    late: f64,
    /// Churn window, virtual seconds from the start: `FROM,TO`.
    #[arg(long, default_value = "5,30")]
    window: String,
    /// The seeder super-seeds and leaves after one full copy.
    #[arg(long)]
    seeder_leaves: bool,
    /// Uplink of every node, Mbit/s.
    #[arg(long, default_value_t = 100)]
    uplink_mbit: u64,
    /// Print, each virtual second: downloaders complete, MiB held, MiB the seeder sent.
    #[arg(long)]
    timeline: bool,
    /// How often a download re-offers what it holds, ms.
    #[arg(long, default_value_t = 1000)]
    reoffer_ms: u64,
    /// One-way link latency, ms.
    #[arg(long, default_value_t = 20)]
    latency_ms: u64,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let (from, to) = a
        .window
        .split_once(',')
        .and_then(|(f, t)| Some((f.trim().parse::<u64>().ok()?, t.trim().parse::<u64>().ok()?)))
        .ok_or_else(|| anyhow::anyhow!("--window wants FROM,TO in seconds"))?;
    let mut cfg = SimConfig::new(a.nodes, a.file_mib << 20, a.seed);
    cfg.uplink = a.uplink_mbit * 1_000_000 / 8;
    cfg.seeder_uplink = cfg.uplink;
    cfg.latency = Duration::from_millis(a.latency_ms);
    cfg.seeder_leaves_after_copy = a.seeder_leaves;
    cfg.pool.reoffer_interval = Duration::from_millis(a.reoffer_ms);
    cfg.churn = Churn {
        kill: a.kill,
        restart: a.restart,
        late: a.late,
        window: (Duration::from_secs(from), Duration::from_secs(to)),
    };
    let cpu = cpu_seconds();
    let wall = std::time::Instant::now();
    let r = Sim::new(cfg).run();
    println!("{r}");
    println!(
        "seeder sent {:.2} copies; {:.1} s CPU, {:.1} s wall",
        r.seeder_sent as f64 / (a.file_mib << 20) as f64,
        cpu_seconds() - cpu,
        wall.elapsed().as_secs_f64()
    );
    if a.timeline {
        for (t, done, held, seeder) in &r.timeline {
            println!(
                "t={t:>4}s complete={done:>5} held={:>9} MiB seeder_sent={:>7} MiB",
                held >> 20,
                seeder >> 20
            );
        }
    }
    if !r.unfinished.is_empty() {
        println!("unfinished (node, chunks held): {:?}", r.unfinished);
    }
    Ok(())
}

/// This process's user + system CPU time, from /proc (0 where unreadable).
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}
