//! Helpers for the node's real-socket tests: an in-process tracker on 127.0.0.1:0, nodes on
//! loopback with short timeouts, and bounded waits for events.
#![allow(dead_code, unreachable_pub)]

pub mod pool;

use std::time::Duration;

use tidepool_node::{Event, Node, NodeConfig, PeerId};
use tidepool_tracker::{Config, Tracker};

/// Longest any single wait may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(30);

pub fn tracker() -> Tracker {
    tracker_on("127.0.0.1:0")
}

/// Logs to stderr when `RUST_LOG` is set (e.g. `RUST_LOG=tidepool_node=debug`).
pub fn init_logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

pub fn tracker_on(addr: &str) -> Tracker {
    init_logs();
    let mut c = Config::default();
    c.network.listen = addr.parse().expect("address");
    Tracker::start(c).expect("tracker starts")
}

pub fn config(tracker: &Tracker, pool: &str) -> NodeConfig {
    NodeConfig::new(tracker.url(), pool).for_loopback()
}

pub async fn node(config: NodeConfig) -> Node {
    Node::join(config).await.expect("node joins")
}

/// Waits for the first event `pick` accepts, skipping others; panics after `WAIT`.
pub async fn expect_event<T>(node: &Node, mut pick: impl FnMut(&Event) -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let event = tokio::time::timeout_at(deadline, node.next_event())
            .await
            .expect("event in time")
            .expect("node running");
        if let Some(t) = pick(&event) {
            return t;
        }
    }
}

/// The next message's payload; a disconnect meanwhile fails the test.
pub async fn next_message(node: &Node) -> tidepool_node::Bytes {
    expect_event(node, |e| match e {
        Event::Message { data, .. } => Some(data.clone()),
        Event::PeerDisconnected { peer, reason } => {
            panic!("peer {peer:?} dropped while waiting for a message: {reason:?}")
        }
        _ => None,
    })
    .await
}

pub async fn connected_to(node: &Node) -> PeerId {
    expect_event(node, |e| match e {
        Event::PeerConnected { peer } => Some(*peer),
        _ => None,
    })
    .await
}

/// Polls `cond` until it holds; panics after `WAIT` with `what`.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
