//! Shared helpers for the tracker's real-socket tests: start a tracker on 127.0.0.1:0 and
//! talk to it with tokio-tungstenite clients, with every wait bounded.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tidepool_tracker::{Config, Tracker};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long any single wait in a test may take before it fails.
pub const WAIT: Duration = Duration::from_secs(10);

/// A config bound to an ephemeral loopback port.
pub fn config(socket_workers: usize, swarm_workers: usize) -> Config {
    let mut c = Config::default();
    c.network.listen = "127.0.0.1:0".parse().expect("valid address");
    c.workers.socket_workers = socket_workers;
    c.workers.swarm_workers = swarm_workers;
    c
}

pub fn start(config: Config) -> Tracker {
    Tracker::start(config).expect("tracker starts")
}

/// A latin1 JSON string for 20 bytes.
pub fn id(bytes: [u8; 20]) -> String {
    bytes.iter().map(|&b| b as char).collect()
}

/// A distinct 20-byte id from a number (includes bytes that need JSON escaping).
pub fn num_id(prefix: u8, n: u32) -> String {
    let mut b = [0x22u8; 20];
    b[0] = prefix;
    b[1] = 0xFF;
    b[2..6].copy_from_slice(&n.to_le_bytes());
    id(b)
}

pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Client {
    pub async fn connect(url: &str) -> Client {
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .expect("connect in time")
            .expect("connects");
        Client { ws }
    }

    /// Connects with extra request headers; a refused handshake (an HTTP status) is returned.
    pub async fn try_connect_with(
        url: &str,
        headers: &[(&'static str, &str)],
    ) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
        let mut req = url.into_client_request()?;
        for (k, v) in headers {
            req.headers_mut()
                .insert(*k, v.parse().expect("header value"));
        }
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
            .await
            .expect("in time")?;
        Ok(Client { ws })
    }

    pub async fn send(&mut self, v: Value) {
        self.send_text(v.to_string()).await;
    }

    pub async fn send_text(&mut self, text: String) {
        self.ws.send(Message::text(text)).await.expect("send");
    }

    /// The next text frame as JSON; panics on timeout or close.
    pub async fn recv(&mut self) -> Value {
        serde_json::from_str(&self.recv_text().await).expect("tracker sends JSON")
    }

    /// The next text frame, as sent.
    pub async fn recv_text(&mut self) -> String {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a frame in time")
                .expect("stream open")
                .expect("frame ok");
            match msg {
                Message::Text(t) => return t.as_str().to_owned(),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }

    /// No text frame arrives within `d` (pings are answered meanwhile, as reading does).
    pub async fn expect_silence(&mut self, d: Duration) {
        let deadline = tokio::time::Instant::now() + d;
        while let Ok(next) = tokio::time::timeout_at(deadline, self.ws.next()).await {
            match next {
                Some(Ok(Message::Text(t))) => panic!("unexpected frame {t}"),
                Some(Ok(_)) => continue,
                other => panic!("connection ended: {other:?}"),
            }
        }
    }

    /// Waits for the tracker to close the connection; returns the close code if any.
    pub async fn closed(&mut self) -> Option<u16> {
        loop {
            match tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("closed in time")
            {
                None | Some(Err(_)) => return None,
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Connects over wss to `url`, trusting only the DER certificates in `roots`.
    pub async fn connect_wss(url: &str, roots: &[&[u8]]) -> Client {
        Self::try_connect_wss(url, roots)
            .await
            .expect("wss handshake")
    }

    /// Connects over wss; a refused handshake (an HTTP status) is returned.
    pub async fn try_connect_wss(
        url: &str,
        roots: &[&[u8]],
    ) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
        let mut store = rustls::RootCertStore::empty();
        for der in roots {
            store.add(der.to_vec().into()).expect("root added");
        }
        let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(store)
        .with_no_client_auth();
        let (ws, _) = tokio::time::timeout(
            WAIT,
            tokio_tungstenite::connect_async_tls_with_config(
                url,
                None,
                false,
                Some(tokio_tungstenite::Connector::Rustls(std::sync::Arc::new(
                    config,
                ))),
            ),
        )
        .await
        .expect("in time")?;
        Ok(Client { ws })
    }

    /// The certificate the server showed, for a wss client.
    pub fn server_certificate(&self) -> Vec<u8> {
        match self.ws.get_ref() {
            MaybeTlsStream::Rustls(tls) => tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.to_vec())
                .expect("a certificate"),
            _ => panic!("not TLS"),
        }
    }

    pub async fn announce(&mut self, info_hash: &str, peer_id: &str, extra: Value) -> Value {
        self.send(announce_msg(info_hash, peer_id, extra)).await;
        self.recv().await
    }

    pub async fn scrape(&mut self, info_hash: Value) -> Value {
        self.send(json!({"action": "scrape", "info_hash": info_hash}))
            .await;
        self.recv().await
    }
}

pub fn announce_msg(info_hash: &str, peer_id: &str, extra: Value) -> Value {
    let mut m = json!({"action": "announce", "info_hash": info_hash, "peer_id": peer_id});
    if let (Some(m), Value::Object(extra)) = (m.as_object_mut(), extra) {
        m.extend(extra);
    }
    m
}

/// Offers as the npm client sends them.
pub fn offers(n: usize, tag: &str) -> Value {
    Value::Array(
        (0..n)
            .map(|i| {
                json!({
                    "offer_id": num_id(b'o', i as u32),
                    "offer": {"type": "offer", "sdp": format!("v=0\r\no={tag} {i}\r\n")}
                })
            })
            .collect(),
    )
}

/// GETs `path` from the metrics address with a real HTTP client; (status, content type, body).
pub fn http_get(tracker: &Tracker, path: &str) -> (u16, String, String) {
    http_get_at(tracker.metrics_addr().expect("metrics enabled"), path)
}

/// GETs `path` from `addr`; (status, content type, body).
pub fn http_get_at(addr: std::net::SocketAddr, path: &str) -> (u16, String, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(WAIT))
        .http_status_as_error(false)
        .build()
        .into();
    let mut resp = agent
        .get(&format!("http://{addr}{path}"))
        .call()
        .expect("HTTP request");
    let kind = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = resp.body_mut().read_to_string().expect("body");
    (resp.status().as_u16(), kind, body)
}

/// One sample from Prometheus text: `series` is the name with its labels, as printed.
pub fn sample(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
        .parse()
        .expect("integer sample")
}

/// Scrapes `/metrics` until `series` reaches `want` (gauges lag by one stats interval).
pub async fn wait_for_sample(tracker: &Tracker, series: &str, want: u64) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, _, text) = http_get(tracker, "/metrics");
        if sample(&text, series) == want {
            return text;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("{series} never reached {want}:\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A config with the metrics endpoint on an ephemeral port and fast stats refreshes.
pub fn config_with_metrics() -> Config {
    let mut c = config(1, 1);
    c.metrics.listen = Some("127.0.0.1:0".parse().expect("valid address"));
    c.metrics.stats_interval_ms = 100;
    c
}

/// A temporary directory unique to this test process and call.
pub fn temp_dir(tag: &str) -> std::path::PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("tidepool-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// Debian's Chromium (or `$CHROMIUM`), if installed.
pub fn chromium() -> Option<std::path::PathBuf> {
    let candidates = [
        std::env::var("CHROMIUM").unwrap_or_default(),
        "/usr/bin/chromium".into(),
        "/usr/bin/chromium-browser".into(),
    ];
    candidates
        .into_iter()
        .filter(|c| !c.is_empty())
        .map(std::path::PathBuf::from)
        .find(|p| p.exists())
}

/// A `nats-server` on a free loopback port, killed when dropped. CI installs it (Debian's
/// `nats-server`); a machine without it fails these tests rather than skipping them.
pub struct Nats {
    pub port: u16,
    child: std::process::Child,
}

impl Nats {
    pub fn start() -> Nats {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        Self::start_on(port)
    }

    /// On a given port (to restart one in the same place).
    pub fn start_on(port: u16) -> Nats {
        let child = std::process::Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nats-server runs (apt-get install nats-server)");
        let deadline = std::time::Instant::now() + WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "nats-server never listened"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Nats { port, child }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills it at once (SIGKILL): the bus vanishes mid-flight.
    pub fn kill(mut self) -> u16 {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.port
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A config for one member of a cluster on `nats`, with fast heartbeats.
pub fn cluster_config(nats: &str, name: &str) -> Config {
    let mut c = config(2, 2);
    c.cluster.nats_url = Some(nats.to_owned());
    c.cluster.name = Some(name.to_owned());
    c.cluster.heartbeat_interval_ms = 100;
    // A second: short enough for the failure tests, long enough that a busy two-core CI
    // machine does not take a live member for dead.
    c.cluster.heartbeats_missed = 10;
    c
}

/// Waits until every tracker sees `n` members.
pub async fn wait_for_cluster(trackers: &[&Tracker], n: usize) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while trackers.iter().any(|t| t.cluster_size() != n) {
        let sizes: Vec<usize> = trackers.iter().map(|t| t.cluster_size()).collect();
        assert!(
            tokio::time::Instant::now() < deadline,
            "cluster never formed: sizes {sizes:?}, want {n}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
