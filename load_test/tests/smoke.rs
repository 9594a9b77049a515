//! Smoke load against a real tracker in-process: a few seconds at low load must deliver every
//! offer and answer (ws and wss), and the JSON result must say so.

use tidepool_load_test::tracker_load::{TrackerLoadConfig, TrackerLoadResult, run};
use tidepool_tracker::{Config, Tracker};

fn tracker(tls: Option<(std::path::PathBuf, std::path::PathBuf)>) -> Tracker {
    let mut c = Config::default();
    c.network.listen = "127.0.0.1:0".parse().expect("addr");
    c.workers.socket_workers = 2;
    c.workers.swarm_workers = 2;
    // A load test sends far more per connection than a real client may.
    c.network.max_messages_per_second = 0;
    if let Some((cert, key)) = tls {
        c.network.tls_cert = Some(cert);
        c.network.tls_key = Some(key);
    }
    Tracker::start(c).expect("tracker starts")
}

fn smoke(url: String, insecure: bool, json_out: Option<std::path::PathBuf>) -> TrackerLoadResult {
    run(TrackerLoadConfig {
        urls: vec![url],
        connections: 32,
        info_hashes: 20,
        duration: 2,
        drain: 1,
        insecure,
        json_out,
        quiet: true,
        ..TrackerLoadConfig::default()
    })
    .expect("load runs")
}

fn assert_nothing_lost(r: &TrackerLoadResult) {
    let t = &r.totals;
    assert_eq!(t.connect_failures, 0);
    assert_eq!(t.errors + t.timeouts, 0, "{t:?}");
    assert!(t.announce_responses > 50, "{t:?}");
    assert!(t.offers_received > 50 && t.answers_received > 10, "{t:?}");
    assert_eq!(r.offers_lost, 0, "{t:?}");
    assert_eq!(r.answers_lost, 0, "{t:?}");
    assert_eq!(
        t.announce_responses, t.announces_sent,
        "every announce answered"
    );
    assert!(r.latency.count == t.announce_responses && r.latency.p50_us > 0);
    assert!(
        !r.answers_get_responses,
        "tidepool, like the reference, does not respond to answers"
    );
}

#[test]
fn ws_smoke_load_loses_no_offer_or_answer() {
    let t = tracker(None);
    let dir = std::env::temp_dir().join(format!("tidepool-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let out = dir.join("result.json");
    let r = smoke(t.url(), false, Some(out.clone()));
    assert_nothing_lost(&r);
    let written: TrackerLoadResult =
        serde_json::from_str(&std::fs::read_to_string(&out).expect("json written"))
            .expect("parses");
    assert_eq!(written.totals, r.totals);
    assert!(!written.samples.is_empty());
    t.shutdown();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn wss_smoke_load_loses_no_offer_or_answer() {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
    let dir = std::env::temp_dir().join(format!("tidepool-smoke-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("c.pem"), cert.cert.pem()).expect("cert");
    std::fs::write(dir.join("k.pem"), cert.signing_key.serialize_pem()).expect("key");
    let t = tracker(Some((dir.join("c.pem"), dir.join("k.pem"))));
    assert!(t.url().starts_with("wss://"));
    let r = smoke(t.url(), true, None);
    assert_nothing_lost(&r);
    t.shutdown();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn paced_load_offers_the_configured_rate() {
    let t = tracker(None);
    let r = run(TrackerLoadConfig {
        urls: vec![t.url()],
        connections: 20,
        info_hashes: 10,
        duration: 2,
        drain: 1,
        pace_ms: 50,
        scrape_fraction: 0.0,
        quiet: true,
        ..TrackerLoadConfig::default()
    })
    .expect("load runs");
    // 20 connections × 20 requests/s × 2 s = 800 announces, give or take start-up.
    let sent = r.totals.announces_sent;
    assert!((500..=900).contains(&sent), "paced to ~800, sent {sent}");
    assert_eq!(r.offers_lost + r.answers_lost, 0);
    t.shutdown();
}

#[test]
fn connections_spread_over_several_urls_and_count_what_crosses_between_them() {
    // One tracker behind two URLs (two socket workers share it): every swarm holds
    // connections of both, so offers and answers cross between the URLs' halves, and nothing
    // is lost. Against separate instances sharing swarms (a cluster) the same counts say
    // how much traffic the bus carried.
    let t = tracker(None);
    let r = run(TrackerLoadConfig {
        urls: vec![t.url(), format!("{}/second", t.url())],
        connections: 32,
        info_hashes: 4,
        duration: 2,
        drain: 1,
        quiet: true,
        ..TrackerLoadConfig::default()
    })
    .expect("load runs");
    assert_nothing_lost(&r);
    let c = &r.totals;
    assert!(
        c.offers_crossed > 0 && c.offers_crossed < c.offers_received,
        "{c:?}"
    );
    assert!(
        c.answers_crossed > 0 && c.answers_crossed < c.answers_received,
        "{c:?}"
    );
    // One URL: nothing counts as crossing.
    let single = smoke(t.url(), false, None);
    assert_eq!(
        single.totals.offers_crossed + single.totals.answers_crossed,
        0
    );
    t.shutdown();
}

/// A `nats-server` on a free loopback port, killed when dropped (CI installs it).
struct Nats(std::process::Child, u16);

impl Nats {
    fn start() -> Nats {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = std::process::Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nats-server runs (apt-get install nats-server)");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "nats-server listens");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Nats(child, port)
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_run_across_three_cluster_instances_delivers_every_offer_and_answer() {
    let nats = Nats::start();
    let trackers: Vec<Tracker> = ["a", "b", "c"]
        .iter()
        .map(|name| {
            let mut c = Config::default();
            c.network.listen = "127.0.0.1:0".parse().expect("addr");
            c.network.max_messages_per_second = 0;
            c.cluster.nats_url = Some(format!("nats://127.0.0.1:{}", nats.1));
            c.cluster.name = Some((*name).to_owned());
            c.cluster.heartbeat_interval_ms = 100;
            c.cluster.heartbeats_missed = 10;
            Tracker::start(c).expect("tracker starts")
        })
        .collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while trackers.iter().any(|t| t.cluster_size() != 3) {
        assert!(std::time::Instant::now() < deadline, "the cluster forms");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let r = run(TrackerLoadConfig {
        urls: trackers.iter().map(Tracker::url).collect(),
        connections: 30,
        info_hashes: 12,
        duration: 2,
        drain: 1,
        quiet: true,
        ..TrackerLoadConfig::default()
    })
    .expect("load runs");
    assert_nothing_lost(&r);
    let c = &r.totals;
    // Each swarm has connections on all three instances: most offers and answers cross.
    assert!(c.offers_crossed * 2 > c.offers_received, "{c:?}");
    assert!(c.answers_crossed * 2 > c.answers_received, "{c:?}");
    // Every offer's delivery time was measured, crossing ones apart.
    assert_eq!(
        r.offer_latency.count + r.offer_latency_crossed.count,
        c.offers_received
    );
    assert_eq!(r.offer_latency_crossed.count, c.offers_crossed);
    assert!(r.offer_latency_crossed.p50_us > 0);
    for t in trackers {
        t.shutdown();
    }
}

#[test]
fn flags_given_on_the_command_line_win_over_the_defaults_and_the_config_file() {
    let dir = std::env::temp_dir().join(format!("tidepool-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("load.toml");
    std::fs::write(
        &file,
        "url = \"ws://file:1\"\nconnections = 7\nduration = 3\n",
    )
    .expect("written");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tidepool-load-test"))
        .args(["tracker", "--config"])
        .arg(&file)
        .args([
            "--url",
            "ws://a:1",
            "--url",
            "ws://b:2",
            "--duration",
            "9",
            "--print-config",
        ])
        .output()
        .expect("runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("url = [\"ws://a:1\", \"ws://b:2\"]"),
        "{text}"
    );
    assert!(text.contains("connections = 7"), "from the file: {text}");
    assert!(text.contains("duration = 9"), "the flag wins: {text}");
    let _ = std::fs::remove_dir_all(&dir);
}
