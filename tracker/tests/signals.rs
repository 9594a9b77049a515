//! The tracker binary under operations: SIGUSR1 reloads the access list and SIGHUP the
//! certificate and token keys without dropping live connections; failed TLS handshakes are
//! counted; SIGTERM stops it cleanly; `token keygen`/`token issue` make keys and tokens it
//! accepts, and its debug log never shows a token.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::json;

fn hex(id: &str) -> String {
    id.chars().map(|c| format!("{:02x}", c as u32)).collect()
}

/// A fresh self-signed certificate for localhost: (cert PEM, key PEM, cert DER).
fn new_cert() -> (String, String, Vec<u8>) {
    let c = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("certificate");
    (
        c.cert.pem(),
        c.signing_key.serialize_pem(),
        c.cert.der().to_vec(),
    )
}

/// The running binary, killed on drop if a test fails half way.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn signal(p: &Proc, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &p.0.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
}

/// Starts the binary and reads its log until it names both addresses; the log lines that
/// follow arrive on the receiver.
fn spawn(
    config: &std::path::Path,
    log: &str,
) -> (
    Proc,
    SocketAddr,
    SocketAddr,
    std::sync::mpsc::Receiver<String>,
) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tidepool-tracker"))
        .arg("--config")
        .arg(config)
        .env("NO_COLOR", "1")
        .env("RUST_LOG", log)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("binary starts");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            eprintln!("tracker: {line}");
            let _ = tx.send(line);
        }
    });
    let proc = Proc(child);
    let (mut ws, mut metrics) = (None, None);
    while ws.is_none() || metrics.is_none() {
        let line = rx.recv_timeout(WAIT).expect("startup log lines");
        let addr_after = |marker: &str| -> Option<SocketAddr> {
            let rest = &line[line.find(marker)? + marker.len()..];
            rest.split([' ', '/']).next()?.parse().ok()
        };
        ws = ws.or(addr_after("wss://"));
        metrics = metrics.or(addr_after("metrics on http://"));
    }
    (proc, ws.expect("ws"), metrics.expect("metrics"), rx)
}

/// Connects over wss trusting `roots`; returns the client and the certificate it was shown.
async fn wss(port: u16, roots: &[&[u8]]) -> (Client, Vec<u8>) {
    let client = Client::connect_wss(&format!("wss://localhost:{port}"), roots).await;
    let shown = client.server_certificate();
    (client, shown)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr1_reloads_access_list_and_sighup_reloads_certificate_without_dropping_clients() {
    let dir = temp_dir("signals");
    let (cert1, key1, der1) = new_cert();
    let (cert2, key2, der2) = new_cert();
    std::fs::write(dir.join("cert.pem"), &cert1).expect("write");
    std::fs::write(dir.join("key.pem"), &key1).expect("write");
    let (a, b) = (num_id(b'h', 1), num_id(b'h', 2));
    std::fs::write(dir.join("allow.txt"), hex(&a)).expect("write");
    let toml = format!(
        "[network]\nlisten = \"127.0.0.1:0\"\ntls_cert = {:?}\ntls_key = {:?}\n\
         [access_list]\nmode = \"allow\"\npath = {:?}\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\nstats_interval_ms = 100\n",
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("allow.txt"),
    );
    std::fs::write(dir.join("tracker.toml"), toml).expect("write");
    let (proc, addr, metrics, _log) = spawn(&dir.join("tracker.toml"), "info");

    let (mut old, shown) = wss(addr.port(), &[&der1, &der2]).await;
    assert_eq!(shown, der1);
    assert_eq!(
        old.announce(&a, &num_id(b'p', 1), json!({})).await["incomplete"],
        json!(1)
    );
    assert!(old.announce(&b, &num_id(b'p', 1), json!({})).await["failure reason"].is_string());

    // SIGUSR1: b becomes allowed on the same, still-open connection.
    std::fs::write(dir.join("allow.txt"), format!("{}\n{}\n", hex(&a), hex(&b))).expect("write");
    signal(&proc, "-USR1");
    let deadline = tokio::time::Instant::now() + WAIT;
    while old.announce(&b, &num_id(b'p', 1), json!({})).await["incomplete"] != json!(1) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "SIGUSR1 reload never took effect"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // SIGHUP: new handshakes see the new certificate; the old connection keeps working.
    std::fs::write(dir.join("cert.pem"), &cert2).expect("write");
    std::fs::write(dir.join("key.pem"), &key2).expect("write");
    signal(&proc, "-HUP");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, shown) = wss(addr.port(), &[&der1, &der2]).await;
        if shown == der2 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "SIGHUP reload never took effect"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        old.announce(&a, &num_id(b'p', 1), json!({})).await["incomplete"],
        json!(1)
    );

    // A broken certificate file is refused and the current one stays in use.
    std::fs::write(dir.join("cert.pem"), "garbage").expect("write");
    signal(&proc, "-HUP");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, _, text) = http_get_at(metrics, "/metrics");
        if sample(&text, "tidepool_tls_reload_failures_total") == 1 {
            assert_eq!(sample(&text, "tidepool_tls_reloads_total"), 1);
            assert_eq!(sample(&text, "tidepool_access_list_reloads_total"), 2);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "failed reload not counted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, shown) = wss(addr.port(), &[&der1, &der2]).await;
    assert_eq!(shown, der2);

    // Plain-text and garbage clients on the TLS port: counted, and nobody else notices.
    let before = sample(
        &http_get_at(metrics, "/metrics").2,
        "tidepool_tls_handshake_failures_total{worker=\"0\"}",
    );
    for garbage in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        b"\x16\x03\x01\x00\x05hello",
    ] {
        for _ in 0..3 {
            let mut s = std::net::TcpStream::connect(addr).expect("connect");
            let _ = s.write_all(garbage);
            let _ = s.set_read_timeout(Some(WAIT));
            let _ = std::io::Read::read(&mut s, &mut [0u8; 512]);
        }
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, _, text) = http_get_at(metrics, "/metrics");
        let failures = sample(&text, "tidepool_tls_handshake_failures_total{worker=\"0\"}");
        if failures == before + 6 {
            assert!(sample(&text, "tidepool_tls_handshakes_total{worker=\"0\"}") >= 3);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{failures} failures counted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        old.announce(&a, &num_id(b'p', 1), json!({})).await["incomplete"],
        json!(1)
    );

    // SIGTERM: a close frame for the client and a clean exit.
    signal(&proc, "-TERM");
    assert_eq!(old.closed().await, Some(1001));
    let mut proc = proc;
    let deadline = std::time::Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = proc.0.try_wait().expect("wait") {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
}

/// Runs `tidepool-tracker token …` and returns its stdout.
fn token_cli(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tidepool-tracker"))
        .arg("token")
        .args(args)
        .output()
        .expect("binary runs");
    assert!(
        out.status.success(),
        "token {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_cli_keys_work_over_wss_sighup_rotates_them_and_the_debug_log_never_shows_a_token() {
    let dir = temp_dir("token-cli");
    let path = |name: &str| dir.join(name).to_str().expect("utf-8 path").to_owned();
    let (cert, key, der) = new_cert();
    std::fs::write(dir.join("cert.pem"), &cert).expect("write");
    std::fs::write(dir.join("key.pem"), &key).expect("write");
    token_cli(&[
        "keygen",
        "--kid",
        "k1",
        "--private",
        &path("k1.jwk"),
        "--keys",
        &path("keys.jwks"),
    ]);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.join("k1.jwk"))
            .expect("private key")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "the private key is private");
    // keygen never overwrites a key.
    let again = Command::new(env!("CARGO_BIN_EXE_tidepool-tracker"))
        .args([
            "token",
            "keygen",
            "--kid",
            "k9",
            "--private",
            &path("k1.jwk"),
        ])
        .output()
        .expect("runs");
    assert!(!again.status.success());
    let t1 = token_cli(&[
        "issue",
        "--key",
        &path("k1.jwk"),
        "--pool",
        "team",
        "--ttl",
        "1h",
    ]);
    let toml = format!(
        "[network]\nlisten = \"127.0.0.1:0\"\ntls_cert = {:?}\ntls_key = {:?}\n\
         [auth]\nkeys = {:?}\n[metrics]\nlisten = \"127.0.0.1:0\"\nstats_interval_ms = 100\n",
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("keys.jwks"),
    );
    std::fs::write(dir.join("tracker.toml"), toml).expect("write");
    let (proc, addr, metrics, log) = spawn(&dir.join("tracker.toml"), "debug");
    let team = id(tidepool_protocol::InfoHash::of_pool("team").0);
    let url = format!("wss://localhost:{}", addr.port());

    let mut c1 = Client::connect_wss(&format!("{url}/?token={t1}"), &[&der]).await;
    assert_eq!(
        c1.announce(&team, &num_id(b'p', 1), json!({})).await["incomplete"],
        json!(1)
    );
    // A token for another pool is refused on the announce; a forged one before the upgrade.
    let other = token_cli(&[
        "issue",
        "--key",
        &path("k1.jwk"),
        "--pool",
        "other",
        "--ttl",
        "1h",
    ]);
    let mut c2 = Client::connect_wss(&format!("{url}/?token={other}"), &[&der]).await;
    assert!(c2.announce(&team, &num_id(b'p', 2), json!({})).await["failure reason"].is_string());
    let mut forged = t1.clone();
    forged.replace_range(forged.len() - 4.., "AAAA");
    match Client::try_connect_wss(&format!("{url}/?token={forged}"), &[&der]).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 401);
        }
        Err(e) => panic!("expected a 401, got {e}"),
        Ok(_) => panic!("a forged token was admitted"),
    }

    // Rotation: k2 added with SIGHUP signs tokens that work; k1's live connection stays.
    token_cli(&[
        "keygen",
        "--kid",
        "k2",
        "--private",
        &path("k2.jwk"),
        "--keys",
        &path("keys.jwks"),
    ]);
    let t2 = token_cli(&[
        "issue",
        "--key",
        &path("k2.jwk"),
        "--pool",
        "team",
        "--ttl",
        "10m",
    ]);
    signal(&proc, "-HUP");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, _, text) = http_get_at(metrics, "/metrics");
        if sample(&text, "tidepool_auth_keys") == 2 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "SIGHUP never loaded k2"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut c3 = Client::connect_wss(&format!("{url}/?token={t2}"), &[&der]).await;
    assert_eq!(
        c3.announce(&team, &num_id(b'p', 3), json!({})).await["incomplete"],
        json!(2)
    );
    assert_eq!(
        c1.announce(&team, &num_id(b'p', 1), json!({})).await["incomplete"],
        json!(2)
    );
    signal(&proc, "-TERM");
    let mut lines = Vec::new();
    while let Ok(line) = log.recv_timeout(WAIT) {
        lines.push(line);
    }
    let text = lines.join("\n");
    assert!(
        text.contains("upgrade") || text.contains("connection"),
        "debug log: {text}"
    );
    for (name, token) in [
        ("t1", &t1),
        ("t2", &t2),
        ("other", &other),
        ("forged", &forged),
    ] {
        let signature = token.rsplit('.').next().expect("three parts");
        assert!(!text.contains(signature), "{name} appears in the log");
    }
}
