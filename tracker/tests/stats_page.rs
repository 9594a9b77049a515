//! The `/stats` page in a real browser: headless Debian Chromium loads it, runs its script
//! (which refreshes from `/stats.json`), and must show the tracker's live numbers; a
//! screenshot is written to `target/tmp/stats-page.png` for people to look at.
//!
//! Chromium is installed by `.ci/run`, which sets `TIDEPOOL_REQUIRE_CHROMIUM=1` so that a
//! missing browser fails there; elsewhere the test says it was skipped.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::json;

/// Runs headless Chromium with the flags that work as root in a container, plus `args`.
fn run_chromium(bin: &PathBuf, args: &[String]) -> String {
    let profile = temp_dir("chromium-profile");
    let out = Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .output()
        .expect("chromium runs");
    let _ = std::fs::remove_dir_all(&profile);
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The text of the element with `id`, from a dumped DOM.
fn text_of(dom: &str, id: &str) -> String {
    let marker = format!("id=\"{id}\">");
    let start = dom
        .find(&marker)
        .unwrap_or_else(|| panic!("no #{id} in {dom}"))
        + marker.len();
    dom[start..]
        .split('<')
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_page_shows_live_numbers_in_headless_chromium() {
    let Some(bin) = chromium() else {
        assert!(
            std::env::var_os("TIDEPOOL_REQUIRE_CHROMIUM").is_none(),
            "chromium is required here but not installed"
        );
        eprintln!("skipped: no chromium (apt install chromium)");
        return;
    };
    let tracker = start(config_with_metrics());
    let url = tracker.url();
    let swarm = num_id(b'h', 1);
    let mut clients = Vec::new();
    for i in 0..3 {
        let mut c = Client::connect(&url).await;
        c.announce(&swarm, &num_id(b'p', i), json!({"left": i}))
            .await;
        clients.push(c);
    }
    wait_for_sample(&tracker, "tidepool_leechers{shard=\"0\"}", 2).await;
    let page = format!("http://{}/stats", tracker.metrics_addr().expect("metrics"));

    let dump = |page: String| {
        let bin = bin.clone();
        tokio::task::spawn_blocking(move || {
            run_chromium(
                &bin,
                &[
                    "--virtual-time-budget=3000".into(),
                    "--dump-dom".into(),
                    page,
                ],
            )
        })
    };
    let dom = dump(page.clone()).await.expect("dump");
    assert!(!dom.contains("data-error"), "script failed: {dom}");
    assert!(
        !dom.contains("data-refreshes=\"0\""),
        "the script never refreshed from stats.json: {dom}"
    );
    assert_eq!(text_of(&dom, "peers"), "3");
    assert_eq!(text_of(&dom, "seeders"), "1");
    assert_eq!(text_of(&dom, "swarms"), "1");
    assert_eq!(text_of(&dom, "connections"), "3");
    let hex: String = swarm.chars().map(|c| format!("{:02x}", c as u32)).collect();
    assert!(dom.contains(&hex), "top swarm listed");

    // The numbers follow the tracker: a fourth peer in a second swarm shows up.
    let mut d = Client::connect(&url).await;
    d.announce(&num_id(b'h', 2), &num_id(b'p', 9), json!({}))
        .await;
    wait_for_sample(&tracker, "tidepool_swarms{shard=\"0\"}", 2).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let dom = dump(page.clone()).await.expect("dump");
    assert_eq!(text_of(&dom, "peers"), "4");
    assert_eq!(text_of(&dom, "swarms"), "2");
    assert_eq!(text_of(&dom, "connections"), "4");

    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("stats-page.png");
    let _ = std::fs::remove_file(&shot);
    let args = vec![
        format!("--screenshot={}", shot.display()),
        "--window-size=1100,700".into(),
        "--virtual-time-budget=3000".into(),
        page,
    ];
    tokio::task::spawn_blocking(move || run_chromium(&bin, &args))
        .await
        .expect("screenshot");
    let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
    assert!(
        size > 10_000,
        "screenshot {} is {size} bytes",
        shot.display()
    );
    eprintln!("screenshot: {}", shot.display());
    drop(d);
    tracker.shutdown();
}
