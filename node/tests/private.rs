//! A private pool from the command line: the tracker requires tokens; `share` and `get` with
//! a token (flag or `TIDEPOOL_TOKEN`) move a file, and a `get` without one, or with a forged
//! one, ends at once with the tracker's reason and a non-zero status instead of retrying.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::pool::*;
use common::*;
use tidepool_protocol::InfoHash;
use tidepool_tracker::auth::{Claims, Jwk, JwkSet, KeyKind, SigningKey};

fn token(key: &SigningKey, pool: &str) -> String {
    key.issue(&Claims::new(vec![InfoHash::of_pool(pool).to_hex()], 600))
        .expect("issue")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_nodes_with_tokens_move_a_file_and_a_missing_or_forged_token_ends_get_with_the_reason()
{
    let _serial = one_at_a_time().await;
    init_logs();
    let dir = temp("private");
    let jwk = Jwk::generate(KeyKind::EdDsa, "k1").expect("keygen");
    let keys = dir.join("keys.jwks");
    JwkSet::public(&[&jwk]).save(&keys).expect("write keys");
    let mut cfg = tidepool_tracker::Config::default();
    cfg.network.listen = "127.0.0.1:0".parse().expect("address");
    cfg.auth.keys = Some(keys);
    let tracker = tidepool_tracker::Tracker::start(cfg).expect("tracker starts");
    let key = SigningKey::from_jwk(&jwk).expect("signing key");

    let source = random_file(&dir, 300_000);
    let bin = env!("CARGO_BIN_EXE_tidepool-node");
    let url = tracker.url();
    let common = ["--tracker", url.as_str(), "--pool", "team", "--loopback"];
    let mut share = Command::new(bin)
        .arg("share")
        .arg(&source)
        .args(common)
        .arg("--json")
        .env("TIDEPOOL_TOKEN", token(&key, "team"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("share starts");
    let mut lines = BufReader::new(share.stdout.take().expect("stdout")).lines();
    let first = lines.next().expect("a line").expect("utf-8");
    let id: serde_json::Value = serde_json::from_str(&first).expect("JSON");
    let id = id["file_id"].as_str().expect("file_id").to_owned();

    let get = |target: &std::path::Path, token: Option<String>| {
        let mut cmd = Command::new(bin);
        cmd.arg("get")
            .arg(&id)
            .arg("-o")
            .arg(target)
            .args(common)
            .arg("--json")
            .env_remove("TIDEPOOL_TOKEN");
        if let Some(t) = token {
            cmd.args(["--token", &t]);
        }
        cmd
    };
    // Runs a command, killed if it outlives the wait (so a hang fails the test, not CI).
    let run = |mut cmd: Command| {
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let mut child = cmd
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("get runs");
            while child.try_wait().expect("wait").is_none() {
                if started.elapsed() > WAIT - Duration::from_secs(5) {
                    let _ = child.kill();
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let out = child.wait_with_output().expect("output");
            (out, started.elapsed())
        })
    };

    // With a token: the file arrives and verifies.
    let target = dir.join("fetched.bin");
    let (out, _) = tokio::time::timeout(WAIT, run(get(&target, Some(token(&key, "team")))))
        .await
        .expect("in time")
        .expect("joined");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(&target).expect("read"),
        std::fs::read(&source).expect("read")
    );

    // Without one, and with one signed by a key the tracker does not hold: a clear error,
    // at once, not a retry loop.
    let stranger = SigningKey::from_jwk(&Jwk::generate(KeyKind::EdDsa, "k1").expect("keygen"))
        .expect("signing key");
    for (token, reason) in [
        (None, "a token is required"),
        (Some(token(&stranger, "team")), "signature is invalid"),
    ] {
        let (out, took) = tokio::time::timeout(WAIT, run(get(&dir.join("no.bin"), token)))
            .await
            .expect("in time")
            .expect("joined");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "a refused get must fail");
        assert!(stderr.contains("refused the token (HTTP 401)"), "{stderr}");
        assert!(stderr.contains(reason), "{stderr}");
        assert!(took < Duration::from_secs(15), "took {took:?}");
    }
    let _ = share.kill();
    let _ = share.wait();
    tracker.shutdown();
}
