//! Real browsers through the tracker: headless Debian Chromium loads `interop/browser/peer.html`
//! with the browser bundle the `webtorrent` npm package ships, from a loopback HTTP server in
//! this test. Two browser pages move a file by magnet over ws and over wss (self-signed
//! certificate); a browser page and a Node `webtorrent` process exchange a file; in a private
//! pool a page with a token gets the file and one without is refused (401, counted).
//!
//! Chromium flags, and why:
//! - `--disable-features=WebRtcHideLocalIpsWithMdns`: by default Chromium hides host
//!   candidates behind mDNS names (`….local`), which would need multicast to resolve; with it
//!   they carry this machine's own address, so the connection never leaves the machine.
//! - `--ignore-certificate-errors`: only for the wss test, whose certificate is self-signed.
//! - `--no-sandbox` and `--disable-dev-shm-usage`: running as root in a container.
//! - no STUN/TURN server is configured in the page, so only host candidates exist.
//!
//! `.ci/run` installs Chromium and sets `TIDEPOOL_REQUIRE_CHROMIUM=1`, so a missing browser
//! fails there; elsewhere these tests say they were skipped.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use serde_json::Value;

/// Longest a browser transfer may take before the test fails.
const BROWSER_WAIT: Duration = Duration::from_secs(60);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Chromium, or `None` (the test is skipped) unless CI requires it; with the guard that runs
/// browser tests one at a time (each starts two or three browsers; this machine has 2 cores).
fn browser() -> Option<(PathBuf, std::sync::MutexGuard<'static, ()>)> {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let guard = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let bundle = repo().join("interop/node_modules/webtorrent/dist/webtorrent.min.js");
    match (chromium(), bundle.exists()) {
        (Some(bin), true) => Some((bin, guard)),
        (bin, bundle) => {
            assert!(
                std::env::var_os("TIDEPOOL_REQUIRE_CHROMIUM").is_none(),
                "required here: chromium {:?}, webtorrent bundle {bundle} (cd interop && npm ci)",
                bin
            );
            eprintln!("skipped: chromium {bin:?}, webtorrent bundle present: {bundle}");
            None
        }
    }
}

/// A loopback HTTP server for the page and the bundle; reports POSTed by pages arrive on the
/// receiver as JSON.
fn page_server() -> (SocketAddr, mpsc::Receiver<Value>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            let tx = tx.clone();
            std::thread::spawn(move || serve_one(stream, &tx));
        }
    });
    (addr, rx)
}

fn serve_one(stream: TcpStream, reports: &mpsc::Sender<Value>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let mut length = 0usize;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).is_err() || header.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = header.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse().unwrap_or(0).min(1 << 20);
        }
    }
    let path = target.split('?').next().unwrap_or("");
    let (status, kind, body) = match (method, path) {
        ("GET", "/peer.html") => (
            "200 OK",
            "text/html",
            std::fs::read(repo().join("interop/browser/peer.html")).unwrap_or_default(),
        ),
        ("GET", "/webtorrent.min.js") => (
            "200 OK",
            "text/javascript",
            std::fs::read(repo().join("interop/node_modules/webtorrent/dist/webtorrent.min.js"))
                .unwrap_or_default(),
        ),
        ("POST", "/report") => {
            let mut body = vec![0; length];
            if reader.read_exact(&mut body).is_ok()
                && let Ok(v) = serde_json::from_slice::<Value>(&body)
            {
                eprintln!("page report: {v}");
                let _ = reports.send(v);
            }
            ("204 No Content", "text/plain", Vec::new())
        }
        _ => ("404 Not Found", "text/plain", Vec::new()),
    };
    let mut stream = reader.into_inner();
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(&body);
}

/// A headless Chromium showing one page; killed (and its profile removed) on drop.
struct Page {
    child: Child,
    profile: PathBuf,
}

impl Drop for Page {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

fn open_page(bin: &Path, server: SocketAddr, query: &[(&str, &str)], tls: bool) -> Page {
    let profile = temp_dir("browser-profile");
    let query: Vec<String> = query
        .iter()
        .map(|(k, v)| format!("{k}={}", encode(v)))
        .collect();
    let url = format!("http://{server}/peer.html?{}", query.join("&"));
    let mut cmd = Command::new(bin);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-features=WebRtcHideLocalIpsWithMdns",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    if tls {
        cmd.arg("--ignore-certificate-errors");
    }
    let child = cmd.arg(url).spawn().expect("chromium starts");
    Page { child, profile }
}

/// Percent-encodes a query value.
fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The next report from pages with `role` that has `key`; other reports are skipped (and
/// printed). Panics after `BROWSER_WAIT`.
fn expect_report(rx: &mpsc::Receiver<Value>, role: &str, key: &str) -> Value {
    let deadline = std::time::Instant::now() + BROWSER_WAIT;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let v = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no {key:?} report from the {role} page in time"));
        assert!(
            v["role"] != "refused" || v["done"].is_null(),
            "a page without a token got the file: {v}"
        );
        if v["role"] == role && !v[key].is_null() {
            return v;
        }
        assert!(v["error"].is_null(), "page error: {v}");
    }
}

/// A seeding page and a fetching page through `tracker`; the fetched bytes must hash alike.
fn two_pages_transfer(bin: &Path, tracker: &str, tls: bool) {
    let (server, rx) = page_server();
    let size = "300000";
    let _seed = open_page(
        bin,
        server,
        &[("role", "seed"), ("tracker", tracker), ("size", size)],
        tls,
    );
    let seeded = expect_report(&rx, "seed", "magnet");
    let magnet = seeded["magnet"].as_str().expect("magnet");
    let _fetch = open_page(
        bin,
        server,
        &[("role", "fetch"), ("tracker", tracker), ("magnet", magnet)],
        tls,
    );
    let done = expect_report(&rx, "fetch", "done");
    assert_eq!(done["bytes"], serde_json::json!(300_000));
    assert_eq!(done["sha256"], seeded["sha256"], "bytes differ");
}

#[test]
fn two_browser_pages_move_a_file_by_magnet_over_ws() {
    let Some((bin, _one)) = browser() else { return };
    let tracker = start(config(1, 1));
    two_pages_transfer(&bin, &tracker.url(), false);
    tracker.shutdown();
}

#[test]
fn two_browser_pages_move_a_file_by_magnet_over_wss_with_a_self_signed_certificate() {
    let Some((bin, _one)) = browser() else { return };
    let dir = temp_dir("browser-wss");
    let c = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("certificate");
    std::fs::write(dir.join("cert.pem"), c.cert.pem()).expect("write");
    std::fs::write(dir.join("key.pem"), c.signing_key.serialize_pem()).expect("write");
    let mut cfg = config(1, 1);
    cfg.network.tls_cert = Some(dir.join("cert.pem"));
    cfg.network.tls_key = Some(dir.join("key.pem"));
    let tracker = start(cfg);
    assert!(tracker.url().starts_with("wss://"));
    two_pages_transfer(&bin, &tracker.url(), true);
    tracker.shutdown();
}

#[test]
fn a_browser_page_seeds_to_a_node_webtorrent_process() {
    let Some((bin, _one)) = browser() else { return };
    let tracker = start(config(1, 1));
    let url = tracker.url();
    let (server, rx) = page_server();
    let _seed = open_page(
        &bin,
        server,
        &[("role", "seed"), ("tracker", &url), ("size", "200000")],
        false,
    );
    let seeded = expect_report(&rx, "seed", "magnet");
    let out = temp_dir("browser-node");
    // Node's side binds this machine's own address too, so the two share a network.
    let fetch = Command::new("node")
        .arg(repo().join("interop/webtorrent-transfer.mjs"))
        .args(["fetch", "--tracker", &url, "--magnet"])
        .arg(seeded["magnet"].as_str().expect("magnet"))
        .arg("--out")
        .arg(&out)
        .args(["--bind", "any", "--deadline", "60"])
        .stdin(Stdio::null())
        .output()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&fetch.stdout);
    assert!(
        fetch.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&fetch.stderr)
    );
    let path = stdout
        .lines()
        .find_map(|l| l.strip_prefix("DONE "))
        .and_then(|rest| rest.split(' ').next())
        .expect("DONE line");
    let bytes = std::fs::read(path).expect("fetched file");
    use sha2_digest::digest_hex;
    assert_eq!(
        digest_hex(&bytes),
        seeded["sha256"].as_str().expect("sha256")
    );
    tracker.shutdown();
}

#[test]
fn in_a_private_pool_a_browser_with_a_token_gets_the_file_and_one_without_is_refused() {
    use tidepool_tracker::auth::{Claims, Jwk, JwkSet, KeyKind, SigningKey};
    let Some((bin, _one)) = browser() else { return };
    let dir = temp_dir("browser-private");
    let jwk = Jwk::generate(KeyKind::EdDsa, "k1").expect("keygen");
    let keys = dir.join("keys.jwks");
    JwkSet::public(&[&jwk]).save(&keys).expect("write keys");
    let mut cfg = config_with_metrics();
    cfg.auth.keys = Some(keys);
    let tracker = start(cfg);
    // Browsers cannot set headers on a WebSocket: the token rides in the announce URL.
    let token = SigningKey::from_jwk(&jwk)
        .expect("signing key")
        .issue(&Claims::new(vec!["*".into()], 600))
        .expect("token");
    let with_token = format!("{}/?token={token}", tracker.url());
    let (server, rx) = page_server();
    let _seed = open_page(
        &bin,
        server,
        &[
            ("role", "seed"),
            ("tracker", &with_token),
            ("size", "100000"),
        ],
        false,
    );
    let seeded = expect_report(&rx, "seed", "magnet");
    // The magnet names the seeder's announce URL (token included) in `tr=`, and webtorrent
    // adds a page's own announce URLs to those: strip it, so each page uses only its own.
    let magnet = seeded["magnet"]
        .as_str()
        .expect("magnet")
        .split('&')
        .filter(|p| !p.starts_with("tr="))
        .collect::<Vec<_>>()
        .join("&");

    // Without a token: the tracker refuses the upgrade, the page hears a tracker warning and
    // never gets the file (checked again after the page with a token got it).
    let _refused = open_page(
        &bin,
        server,
        &[
            ("role", "fetch"),
            ("label", "refused"),
            ("tracker", &tracker.url()),
            ("magnet", &magnet),
        ],
        false,
    );
    let warned = expect_report(&rx, "refused", "warning");
    assert!(warned["warning"].is_string());
    wait_refused(&tracker);

    let _fetch = open_page(
        &bin,
        server,
        &[
            ("role", "fetch"),
            ("tracker", &with_token),
            ("magnet", &magnet),
        ],
        false,
    );
    let done = expect_report(&rx, "fetch", "done");
    assert_eq!(done["sha256"], seeded["sha256"]);
    // The refused page had as long as the admitted one, and more: it got nothing.
    std::thread::sleep(Duration::from_secs(2));
    while let Ok(report) = rx.try_recv() {
        assert!(
            report["role"] != "refused" || report["done"].is_null(),
            "a page without a token got the file: {report}"
        );
    }
    let (_, _, text) = http_get(&tracker, "/metrics");
    assert!(sample(&text, "tidepool_auth_accepted_total") >= 2);
    tracker.shutdown();
}

/// Waits until the tracker counted a refusal for a missing token.
fn wait_refused(tracker: &tidepool_tracker::Tracker) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (_, _, text) = http_get(tracker, "/metrics");
        if sample(&text, "tidepool_auth_refusals_total{reason=\"missing\"}") >= 1 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no refusal counted:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// SHA-256 for comparing with what the page computed (via ring, which the tracker has).
mod sha2_digest {
    pub(super) fn digest_hex(bytes: &[u8]) -> String {
        ring::digest::digest(&ring::digest::SHA256, bytes)
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}
