//! What a node can be told: the tracker and pool, limits and timeouts. Every field has a
//! default fit for the public internet; tests shorten the timeouts and use loopback only.

use std::time::Duration;

use tidepool_protocol::{InfoHash, PeerId};

/// A STUN or TURN server.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IceServer {
    /// `stun:host:port` or `turn:host:port?transport=udp` URLs.
    pub urls: Vec<String>,
    /// TURN user name (empty for STUN).
    pub username: String,
    /// TURN credential (empty for STUN).
    pub credential: String,
}

/// A bearer token; its `Debug` hides it, so a logged config never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct BearerToken(pub String);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(…)")
    }
}

/// Everything a [`Node`](crate::Node) needs.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Tracker URL, `ws://` or `wss://`.
    pub tracker_url: String,
    /// Bearer token for a private pool, sent in the upgrade's `Authorization` header (never
    /// logged). A tracker that refuses it ends the node's tracker connection for good.
    pub token: Option<BearerToken>,
    /// The pool: a swarm on the tracker. [`NodeConfig::new`] hashes a pool name into it.
    pub info_hash: InfoHash,
    /// This node's id in the pool (random by default, `-TP0001-` then 12 random characters).
    pub peer_id: PeerId,
    /// Most peer connections held at once, established and connecting together.
    pub max_peers: usize,
    /// Offers sent with each announce (each reaches a different peer), capped by free slots.
    pub offers_per_announce: usize,
    /// An offer nobody answered within this is withdrawn and its connection closed.
    pub offer_timeout: Duration,
    /// How long to wait for ICE gathering before sending an offer or answer with what was
    /// gathered (signaling is non-trickle: the SDP carries every candidate).
    pub ice_gathering_timeout: Duration,
    /// A connection whose two channels are not open this long after the answer is dropped.
    pub connect_timeout: Duration,
    /// Announce again this soon when below `max_peers` (otherwise at the tracker's interval).
    pub min_announce_interval: Duration,
    /// A node full and unchanged this long may drop its newest connection, once per this
    /// interval, to accept an offer from a peer holding at most half of `max_peers`
    /// connections. Heals pools that settled into full cliques unreachable from each other.
    pub rotate_after: Duration,
    /// Ping on the `control` channel this often.
    pub heartbeat_interval: Duration,
    /// A peer is disconnected when, for this long, no frame arrived from it and its SCTP
    /// stack acknowledged none of our data (a peer whose data waits out SCTP's retransmission
    /// backoff on a lossy link still acknowledges our pings, and is kept). Acknowledgements
    /// are looked at once per `heartbeat_interval`, so a dead peer goes within this plus one
    /// interval.
    pub heartbeat_timeout: Duration,
    /// A peer whose stack acknowledges our data but that sends no frame for this long (its
    /// pongs never come) is disconnected all the same (never sooner than `heartbeat_timeout`):
    /// three heartbeat timeouts, past which a link is no use to a pool even if SCTP's backoff
    /// (up to 60 s) would bring its data back later; a new neighbour serves sooner.
    pub max_silence: Duration,
    /// Gather loopback candidates only (tests, a laptop without a network).
    pub loopback_only: bool,
    /// STUN/TURN servers; empty means host candidates only.
    pub ice_servers: Vec<IceServer>,
    /// SO_RCVBUF and SO_SNDBUF for every WebRTC UDP socket. The kernel default (~208 KiB)
    /// drops datagrams under load and SCTP throughput collapses (DESIGN §6).
    pub udp_socket_buffer: usize,
    /// Outstanding bytes per data channel before a send waits (back-pressure).
    pub send_buffer_limit: usize,
    /// Largest application message, in bytes (SCTP messages are limited to 256 KiB; 64 KiB
    /// is the size measured best). The 10-byte frame header comes on top.
    pub max_message_size: usize,
    /// SCTP receive window per connection, in bytes (DESIGN §6: 4 MiB lifts loopback
    /// throughput from 244 to 290 MiB/s; memory per connection grows only under load).
    pub sctp_receive_window: u32,
    /// Events buffered for the application; when full, receiving stops (back-pressure reaches
    /// the senders through the SCTP window).
    pub event_queue: usize,
    /// First delay before reconnecting to the tracker; doubles up to `reconnect_max`.
    pub reconnect_min: Duration,
    /// Longest delay between tracker reconnects.
    pub reconnect_max: Duration,
    /// Test and benchmark hook: impair what this node's UDP sockets send (otherwise read
    /// from `TIDEPOOL_IMPAIR`, see [`Impairment::parse`](crate::udp::Impairment::parse)).
    #[doc(hidden)]
    pub impairment: Option<crate::udp::Impairment>,
}

impl NodeConfig {
    /// A config for `pool` (hashed with SHA-1 into the info hash) on `tracker_url`.
    pub fn new(tracker_url: impl Into<String>, pool: &str) -> Self {
        Self {
            tracker_url: tracker_url.into(),
            token: None,
            info_hash: pool_info_hash(pool),
            peer_id: random_peer_id(),
            max_peers: 8,
            offers_per_announce: 4,
            offer_timeout: Duration::from_secs(30),
            ice_gathering_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(20),
            min_announce_interval: Duration::from_secs(10),
            rotate_after: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(2),
            heartbeat_timeout: Duration::from_secs(10),
            max_silence: Duration::from_secs(30),
            loopback_only: false,
            ice_servers: Vec::new(),
            udp_socket_buffer: 4 << 20,
            send_buffer_limit: 4 << 20,
            max_message_size: 64 << 10,
            sctp_receive_window: 4 << 20,
            event_queue: 256,
            reconnect_min: Duration::from_millis(500),
            reconnect_max: Duration::from_secs(30),
            impairment: None,
        }
    }

    /// Short timeouts and loopback only, for tests and demos on one machine.
    pub fn for_loopback(mut self) -> Self {
        self.loopback_only = true;
        self.offer_timeout = Duration::from_secs(4);
        self.connect_timeout = Duration::from_secs(5);
        self.min_announce_interval = Duration::from_millis(500);
        self.rotate_after = Duration::from_secs(1);
        self.heartbeat_interval = Duration::from_millis(250);
        self.heartbeat_timeout = Duration::from_secs(2);
        self.max_silence = Duration::from_secs(10);
        self.reconnect_min = Duration::from_millis(100);
        self.reconnect_max = Duration::from_secs(2);
        self
    }

    /// Checks the values can work together.
    pub fn validate(&self) -> Result<(), crate::NodeError> {
        let fail = |m: &str| Err(crate::NodeError::Config(m.to_owned()));
        if !(self.tracker_url.starts_with("ws://") || self.tracker_url.starts_with("wss://")) {
            return fail("tracker_url must start with ws:// or wss://");
        }
        if self.max_peers == 0 {
            return fail("max_peers must be at least 1");
        }
        if self.max_message_size == 0
            || self.max_message_size + crate::wire::DATA_HEADER > 256 * 1024
        {
            return fail(
                "max_message_size must be 1..=262134 (SCTP allows 256 KiB with the header)",
            );
        }
        if (self.sctp_receive_window as usize) < self.max_message_size + crate::wire::DATA_HEADER {
            return fail("sctp_receive_window must hold one full message");
        }
        if self.heartbeat_timeout <= self.heartbeat_interval {
            return fail("heartbeat_timeout must exceed heartbeat_interval");
        }
        if self.event_queue == 0 || self.send_buffer_limit < self.max_message_size {
            return fail("event_queue must be ≥ 1 and send_buffer_limit ≥ max_message_size");
        }
        Ok(())
    }
}

/// The info hash of a pool name (see [`InfoHash::of_pool`]).
pub fn pool_info_hash(pool: &str) -> InfoHash {
    InfoHash::of_pool(pool)
}

/// `-TP0001-` and 12 random alphanumerics, in the Azureus style WebTorrent clients use.
pub fn random_peer_id() -> PeerId {
    const ALNUM: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    let mut id = [0u8; 20];
    id[..8].copy_from_slice(b"-TP0001-");
    for b in &mut id[8..] {
        *b = ALNUM[fastrand::usize(..ALNUM.len())];
    }
    PeerId(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_logged_config_never_shows_its_token() {
        let mut c = NodeConfig::new("ws://127.0.0.1:1", "p");
        c.token = Some(BearerToken("secret.jwt.value".into()));
        let shown = format!("{c:?}");
        assert!(shown.contains("BearerToken(…)"), "{shown}");
        assert!(!shown.contains("secret.jwt.value"), "{shown}");
    }

    #[test]
    fn pool_names_hash_stably_and_peer_ids_are_azureus_style() {
        assert_eq!(
            pool_info_hash("demo").to_hex(),
            "89e495e7941cf9e40e6980d14a16bf023ccd4c91"
        );
        let id = random_peer_id();
        assert!(id.0.starts_with(b"-TP0001-"));
        assert_ne!(random_peer_id(), id);
    }

    #[test]
    fn bad_configs_are_refused() {
        let ok = NodeConfig::new("ws://127.0.0.1:1", "p");
        assert!(ok.validate().is_ok());
        let mut c = ok.clone();
        c.tracker_url = "http://x".into();
        assert!(c.validate().is_err());
        let mut c = ok.clone();
        c.max_message_size = 300_000;
        assert!(c.validate().is_err());
        let mut c = ok;
        c.heartbeat_timeout = c.heartbeat_interval;
        assert!(c.validate().is_err());
    }
}
