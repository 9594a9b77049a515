//! Whole pools of release-built `tidepool-node` processes on loopback, driven by the pool
//! campaign runner: one seeder and five fetchers of a 32 MiB file all verify with few
//! duplicates; fetchers cut off from the seeder finish through a relay whose memory stays
//! within its stated bound; a relay killed mid-transfer leaves everyone else finishing;
//! churn (a quarter of the fetchers killed and restarted) still ends with every file
//! verified; a seeder killed once it has put one whole copy out leaves a pool that
//! finishes from the fetchers' copies. The node binary is built in release mode first (data moves ~7x slower in a
//! debug build), once per test run.

use std::path::PathBuf;
use std::sync::OnceLock;

use tidepool_load_test::pool_run::{PoolRunConfig, PoolRunResult, Role, run};

/// Builds `tidepool-node` with the release profile (a no-op when it is up to date).
fn release_node() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace root")
            .to_owned();
        let status = std::process::Command::new(env!("CARGO"))
            .current_dir(&root)
            .args([
                "build",
                "--release",
                "-p",
                "tidepool-node",
                "--bin",
                "tidepool-node",
            ])
            .status()
            .expect("cargo runs");
        assert!(status.success(), "release build of tidepool-node");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        target.join("release").join("tidepool-node")
    })
    .clone()
}

/// Several node processes each: one campaign at a time keeps the 2-core machine's
/// handshakes and timers honest.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

fn campaign(tag: &str, tweak: impl FnOnce(&mut PoolRunConfig)) -> PoolRunResult {
    let _serial = one_at_a_time();
    let mut config = PoolRunConfig {
        node_bin: Some(release_node()),
        out: std::env::temp_dir().join(format!("tidepool-pool-{tag}-{}", std::process::id())),
        deadline: 90.0,
        quiet: true,
        ..PoolRunConfig::default()
    };
    tweak(&mut config);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let result = runtime.block_on(run(config)).expect("campaign runs");
    eprintln!("{tag}: {:#?}", result.summary);
    result
}

fn fetchers(r: &PoolRunResult) -> impl Iterator<Item = &tidepool_load_test::pool_run::NodeResult> {
    r.nodes.iter().filter(|n| n.role == Role::Fetcher)
}

#[test]
fn one_seeder_five_fetchers_of_32_mib_all_verify_with_under_5_percent_duplicates() {
    let r = campaign("five", |c| {
        c.nodes = 6;
        c.file_mib = 32;
    });
    assert!(r.all_verified, "{:#?}", r.nodes);
    assert_eq!(r.summary.completed, 5);
    for n in fetchers(&r) {
        assert_eq!(n.verified, Some(true), "node {}", n.index);
        assert_eq!(n.have_bytes, r.file_bytes);
        assert!(
            n.received_bytes as f64 <= 1.05 * r.file_bytes as f64,
            "node {} received {} for a {}-byte file ({} duplicate chunks)",
            n.index,
            n.received_bytes,
            r.file_bytes,
            n.duplicate_chunks
        );
    }
    assert_eq!(r.udp_drops.unwrap_or(0), 0, "the 4 MiB socket buffers hold");
    assert!(r.tracker_messages_in.is_some_and(|m| m > 0));
    // The run directory holds the results and a report drawn from them.
    let dir = &r.config.out;
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("results.json")).expect("json"))
            .expect("valid JSON");
    assert_eq!(saved["summary"]["completed"], 5);
    let html = std::fs::read_to_string(dir.join("report.html")).expect("report");
    assert!(html.contains("every surviving fetcher verified the file"));
    for svg in ["completion.svg", "goodput.svg", "bytes.svg"] {
        let text = std::fs::read_to_string(dir.join(svg)).expect("plot");
        assert!(text.contains("<svg") && text.contains("</svg>"), "{svg}");
        assert!(html.contains(svg));
    }
}

#[test]
fn fetchers_cut_off_from_the_seeder_finish_through_a_relay_whose_memory_stays_bounded() {
    // The seeder takes one connection, and the relay joins first and keeps it: every
    // byte the four fetchers get passes through the relay (or its cache).
    let r = campaign("relay", |c| {
        c.nodes = 5;
        c.relays = 1;
        c.file_mib = 64;
        c.seeder_max_peers = Some(1);
        c.max_peers = 5;
        c.rotate_after = Some(3600);
    });
    assert!(r.all_verified, "{:#?}", r.nodes);
    let relay = r
        .nodes
        .iter()
        .find(|n| n.role == Role::Relay)
        .expect("relay");
    let seeder = r
        .nodes
        .iter()
        .find(|n| n.role == Role::Seeder)
        .expect("seeder");
    assert!(
        relay.relayed_bytes + relay.served_bytes >= r.file_bytes,
        "the relay passed on at least one copy: {relay:#?}"
    );
    assert!(seeder.served_bytes >= r.file_bytes);
    let mut node = tidepool_node::NodeConfig::new("ws://unused", "unused");
    node.max_message_size = tidepool_node::pool::Pool::message_size_for(64 * 1024);
    let bound = tidepool_node::pool::Pool::memory_bound(
        &node,
        &tidepool_node::pool::PoolConfig::default(),
        5,
    );
    assert!(
        relay.peak_rss_kib * 1024 <= bound,
        "relay peak RSS {} KiB over its bound {} KiB after relaying {} MiB",
        relay.peak_rss_kib,
        bound / 1024,
        relay.relayed_bytes >> 20
    );
}

#[test]
fn a_relay_killed_mid_transfer_leaves_everyone_else_finishing() {
    // Two relays hold the seeder's two slots; the busier one dies once it has relayed
    // 8 MiB (of the 4 × 64 MiB the fetchers need, so well before the end). The fetchers
    // that went through it re-ask through the other (or the seeder, whose freed slot a
    // fetcher may take).
    let r = campaign("relay-killed", |c| {
        c.nodes = 5;
        c.relays = 2;
        c.file_mib = 64;
        c.seeder_max_peers = Some(2);
        c.rotate_after = Some(3600);
        c.kill_top_relay_after_mib = 8.0;
    });
    let removed: Vec<_> = r.nodes.iter().filter(|n| n.removed).collect();
    assert_eq!(removed.len(), 1, "one relay killed: {:#?}", r.nodes);
    assert_eq!(removed[0].role, Role::Relay);
    assert!(removed[0].relayed_bytes >= 8 << 20);
    assert!(r.all_verified, "{:#?}", r.nodes);
    assert_eq!(r.summary.completed, 4);
}

#[test]
fn churn_kills_and_restarts_a_quarter_of_the_fetchers_and_every_file_still_verifies() {
    let r = campaign("churn", |c| {
        c.nodes = 5;
        c.file_mib = 64;
        c.churn = 25.0;
        // Early: with a faster tracker the 64 MiB transfer ends in ~1.4 s, and a churn
        // schedule that first fires after it would test nothing (and fail the check below).
        c.churn_every = 0.5;
        c.restart_after = 0.5;
        c.missing_after = 2;
    });
    assert!(r.all_verified, "{:#?}", r.nodes);
    assert!(r.summary.restarts >= 1, "churn happened: {:#?}", r.nodes);
    assert_eq!(r.summary.completed, 4);
}

#[test]
fn a_seeder_killed_after_putting_one_copy_out_leaves_a_pool_that_finishes() {
    // Six fetchers, the seeder's slots for three: each chunk goes to one of them first
    // (super-seeding), and the seeder is gone once every chunk has left it once.
    let r = campaign("seeder-killed", |c| {
        c.nodes = 7;
        c.file_mib = 32;
        c.seeder_max_peers = Some(3);
        c.kill_seeder_after_copy = true;
        c.missing_after = 2;
    });
    let seeder = &r.nodes[0];
    assert_eq!(seeder.role, Role::Seeder);
    assert!(seeder.removed, "the seeder was killed: {:#?}", r.nodes);
    assert!(r.all_verified, "{:#?}", r.nodes);
    assert_eq!(r.summary.completed, 6);
}
