//! `tidepool-load-test`: command-line entry point.

use std::path::PathBuf;

use anyhow::Context;
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use mimalloc::MiMalloc;
use tidepool_load_test::tracker_load::{self, TrackerLoadConfig};

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

/// Load generation for tidepool trackers and pools.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load one tracker with WebSocket peers; count every delivery; report rates and latency.
    Tracker {
        /// TOML file with any of the options below (flags given explicitly win).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print the effective options as TOML and exit.
        #[arg(long)]
        print_config: bool,
        #[command(flatten)]
        options: TrackerLoadConfig,
    },
    /// Open K connections (from several loopback addresses), announce each, hold them with a
    /// fraction active; report the tracker's RSS per connection and the active latency.
    Idle {
        #[command(flatten)]
        options: tidepool_load_test::idle::IdleConfig,
    },
    /// Run a pool campaign: a tracker, seeders and fetchers (release `tidepool-node`
    /// processes) on loopback, optional churn; writes results.json and report.html.
    Pool {
        #[command(flatten)]
        options: tidepool_load_test::pool_run::PoolRunConfig,
    },
    /// Rebuild a pool campaign's report.html and plots from its results.json.
    PoolReport {
        /// The campaign's run directory (its --out).
        dir: PathBuf,
    },
    /// Build the side-by-side table and chart from a campaign's runs file.
    Report {
        /// JSON-lines file written by benchmarks/compare-trackers.
        #[arg(long)]
        runs: PathBuf,
        /// Directory for results.md and throughput.svg.
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches)?;
    match cli.command {
        Command::Tracker {
            config,
            print_config,
            options,
        } => {
            let sub = matches
                .subcommand_matches("tracker")
                .context("tracker arguments")?;
            let mut merged = toml::Table::try_from(TrackerLoadConfig::default())?;
            if let Some(path) = &config {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                let file: toml::Table =
                    toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
                merged.extend(file);
            }
            for (key, value) in toml::Table::try_from(&options)? {
                if sub.value_source(&key) == Some(ValueSource::CommandLine) {
                    merged.insert(key, value);
                }
            }
            let options: TrackerLoadConfig = merged.try_into().context("invalid options")?;
            if print_config {
                print!("{}", toml::to_string(&options)?);
                return Ok(());
            }
            let result = tracker_load::run(options)?;
            if result.totals.connect_failures > 0 && result.totals.responses() == 0 {
                anyhow::bail!("no connection could be opened");
            }
            Ok(())
        }
        Command::Idle { options } => {
            let want = options.connections;
            let opened = tidepool_load_test::idle::run(options)?.opened;
            anyhow::ensure!(
                opened == want,
                "only {opened} of {want} connections announced"
            );
            Ok(())
        }
        Command::Pool { options } => {
            let out = options.out.clone();
            let runtime = tokio::runtime::Runtime::new()?;
            let result = runtime.block_on(tidepool_load_test::pool_run::run(options))?;
            let s = &result.summary;
            println!(
                "{} of {} fetchers verified; completion p50 {:.1?} s, max {:.1?} s; goodput {:.1} MiB/s; duplicates {:.2}%; chunks-missing rounds {}; peak RSS {} MiB; results in {}",
                s.completed,
                s.survivors,
                s.completion_p50,
                s.completion_max,
                s.goodput_mib_s,
                s.duplicate_ratio * 100.0,
                s.missing_rounds,
                s.peak_rss_kib_max / 1024,
                out.display()
            );
            if s.restarts > 0 {
                println!(
                    "churn: {} restarts; slowest never killed {:.1?} s, slowest restarted {:.1?} s",
                    s.restarts, s.completion_max_never_killed, s.completion_max_restarted
                );
            }
            if let Some(b) = &result.raw_baseline {
                println!(
                    "raw data channels, {} pairs at once: {:.1} MiB/s; pool goodput {:.1} MiB/s first chunk to last done ({:.0}% of raw), {:.0}% counting set-up",
                    b.pairs,
                    b.aggregate_mib_s,
                    s.transfer_goodput_mib_s,
                    100.0 * s.transfer_goodput_mib_s / b.aggregate_mib_s.max(1e-9),
                    100.0 * s.goodput_mib_s / b.aggregate_mib_s.max(1e-9)
                );
            }
            if let Some(w) = &result.webtorrent {
                let done: Vec<f64> = w.completion_secs.iter().flatten().copied().collect();
                println!(
                    "npm webtorrent {}: {} of {} fetchers verified; completion max {:.1?} s; goodput {:.1} MiB/s",
                    w.version,
                    done.len(),
                    w.completion_secs.len(),
                    done.iter().copied().reduce(f64::max),
                    w.goodput_mib_s
                );
            }
            println!("report: {}", out.join("report.html").display());
            anyhow::ensure!(
                result.all_verified,
                "not every surviving node finished with a verified file"
            );
            Ok(())
        }
        Command::PoolReport { dir } => tidepool_load_test::pool_report::rebuild(&dir),
        Command::Report { runs, out } => tidepool_load_test::report::write(&runs, &out),
    }
}
