//! The pool engine proven on simulated pools (deterministic, virtual time): every
//! survivor completes, few bytes come twice, churn and a departing seeder are survived,
//! and the same seed replays the same run.

use std::time::Duration;

use tidepool_node::pool::sim::{Churn, Sim, SimConfig};

const MIB: u64 = 1024 * 1024;

fn run(cfg: SimConfig) -> tidepool_node::pool::sim::SimReport {
    let t = std::time::Instant::now();
    let r = Sim::new(cfg).run();
    eprintln!("{r} ({:.1} s CPU)", t.elapsed().as_secs_f64());
    r
}

#[test]
fn a_small_pool_completes_with_few_duplicates() {
    let r = run(SimConfig::new(30, 4 * MIB, 1));
    assert_eq!(r.completed, r.survivors, "{r:?}");
    assert_eq!(r.survivors, 30);
    assert!(r.duplicate_pct <= 2.0, "{r}");
    assert_eq!(r.bad_chunks, 0);
}

#[test]
fn the_same_seed_replays_the_same_run_and_another_seed_does_not() {
    let a = run(SimConfig::new(12, 2 * MIB, 7));
    let b = run(SimConfig::new(12, 2 * MIB, 7));
    let c = run(SimConfig::new(12, 2 * MIB, 8));
    assert_eq!(a.digest, b.digest);
    assert_eq!(a.events, b.events);
    assert_ne!(a.digest, c.digest);
}

#[test]
fn survivors_complete_when_a_quarter_is_killed_and_a_tenth_restarts_mid_transfer() {
    let mut cfg = SimConfig::new(40, 8 * MIB, 3);
    cfg.churn = Churn {
        kill: 0.25,
        restart: 0.10,
        late: 0.1,
        window: (Duration::from_secs(1), Duration::from_secs(4)),
    };
    let r = run(cfg);
    assert!(r.survivors < 40 && r.survivors >= 20, "{r:?}");
    assert_eq!(r.completed, r.survivors, "{r:?}");
}

#[test]
fn every_node_completes_after_a_super_seeding_seeder_leaves_with_one_copy_sent() {
    let mut cfg = SimConfig::new(30, 4 * MIB, 5);
    cfg.seeder_leaves_after_copy = true;
    let r = run(cfg);
    assert_eq!(r.completed, r.survivors, "{r:?}");
    assert!(
        r.seeder_sent <= 4 * MIB + 64 * 1024 * 4,
        "seeder sent {} bytes",
        r.seeder_sent
    );
}
