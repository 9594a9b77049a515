//! Helpers for tests of the chunk pipeline over real nodes: random source files, temp
//! dirs, pool configs with short timeouts, and waits for downloads.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tidepool_node::pool::{Pool, PoolConfig};
use tidepool_node::{Node, NodeConfig};

use super::{WAIT, config};

pub fn random_file(dir: &Path, len: usize) -> PathBuf {
    let path = dir.join("source.bin");
    let mut data = vec![0u8; len];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for b in &mut data {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(&path, &data).expect("write source");
    path
}

pub fn temp(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tidepool-pipe-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

pub fn node_config(tracker: &tidepool_tracker::Tracker, pool: &str) -> NodeConfig {
    let mut c = config(tracker, pool);
    c.max_message_size = Pool::message_size_for(64 * 1024);
    c.peer_id = tidepool_node::config::random_peer_id();
    c
}

/// These tests move megabytes through debug-build WebRTC stacks; run one at a time so a
/// 2-core machine keeps handshakes and heartbeats inside their timeouts.
pub async fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::OnceLock<tokio::sync::Mutex<()>> = std::sync::OnceLock::new();
    LOCK.get_or_init(|| tokio::sync::Mutex::new(()))
        .lock()
        .await
}

pub fn pool_config() -> PoolConfig {
    let mut p = PoolConfig::default();
    p.fetch.missing_after = Duration::from_secs(2);
    p.fetch.give_up_after = Duration::from_secs(25);
    p
}

/// Waits for `download` to finish verified (`what` names the failure) and checks its bytes
/// equal `source`'s.
pub async fn finishes_identical(
    download: tidepool_node::pool::Download,
    source: &Path,
    what: &str,
) {
    let path = tokio::time::timeout(WAIT, download.finished())
        .await
        .expect("finishes in time")
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(
        std::fs::read(path).expect("read"),
        std::fs::read(source).expect("read")
    );
}

/// Starts a download, failing the test if no offer of the file arrives in time.
pub async fn start_get(
    pool: &Pool,
    id: tidepool_node::pool::FileId,
    target: &Path,
) -> tidepool_node::pool::Download {
    tokio::time::timeout(WAIT, pool.get(id, target))
        .await
        .expect("an offer of the file arrives")
        .expect("the download starts")
}

pub async fn pool(c: NodeConfig, p: PoolConfig) -> Pool {
    Pool::start(Node::join(c).await.expect("joins"), p).expect("pool starts")
}

/// Waits for `raw`'s next connected peer.
pub async fn next_peer(raw: &Node) -> tidepool_node::PeerId {
    tokio::time::timeout(WAIT, async {
        loop {
            match raw.next_event().await {
                Some(tidepool_node::Event::PeerConnected { peer }) => return peer,
                Some(_) => continue,
                None => panic!("node stopped"),
            }
        }
    })
    .await
    .expect("a peer connects")
}
