//! tidepool-node: a pool peer. It joins a pool (a swarm on a WebTorrent-protocol tracker),
//! holds WebRTC connections to up to `max_peers` other peers, each with two data channels —
//! `control` for small messages and `chunks` for bulk — and lets the application send
//! messages (with back-pressure and optional receipts) or pipe byte streams over them.
//!
//! Where does X live:
//! - [`config`]: [`NodeConfig`], every limit and timeout with its default.
//! - `node`: the [`Node`] handle and the core task (announce, offers, answers, glare,
//!   heartbeats, timeouts, replacing lost peers).
//! - `link`: one `webrtc` connection, its channels and their event pumps.
//! - `signaling`: the tracker WebSocket with reconnect and backoff.
//! - [`wire`]: the frame header on every data-channel message (sans-IO).
//! - [`udp`]: the runtime that gives WebRTC's UDP sockets large kernel buffers.
//! - `stream`: [`PeerStream`], a channel as `AsyncRead` + `AsyncWrite`.
//! - [`fetch`]: the sans-IO core of one download (which chunks from which source, stalls,
//!   chunks-missing, origin fallback, giving up), for the chunk pipeline.
//! - [`pool`]: the chunk pipeline: [`pool::PoolEngine`], its sans-IO core (neighbours,
//!   gossip, relays, promises, serving), [`pool::Pool`], the thin async driver that shares
//!   and gets files, its disk thread, and [`pool::sim`], a deterministic simulator of
//!   whole pools.
//! - [`store`]: shared files with their hash trees, and downloads verified chunk by chunk
//!   into `NAME.part` with a resumable state file.
//! - [`cache`]: the relay cache, chunks passed on for others kept on disk within a budget.
//!
//! ```no_run
//! # async fn demo() -> Result<(), tidepool_node::NodeError> {
//! use tidepool_node::{Channel, Event, Node, NodeConfig};
//!
//! let node = Node::join(NodeConfig::new("ws://127.0.0.1:8000", "my-pool")).await?;
//! while let Some(event) = node.next_event().await {
//!     match event {
//!         Event::PeerConnected { peer } => {
//!             node.send(peer, Channel::Control, b"hello").await?;
//!         }
//!         Event::Message { peer, data, .. } => println!("{peer:?}: {} bytes", data.len()),
//!         _ => {}
//!     }
//! }
//! # Ok(()) }
//! ```

/// The README's Rust examples compile (and the protocol ones run) as doc tests, so they
/// cannot drift. They live here because this crate can see both `tidepool_protocol` and
/// `tidepool_node`.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;

pub mod cache;
pub mod config;
pub mod fetch;
mod link;
mod node;
pub mod pool;
mod signaling;
pub mod store;
mod stream;
pub mod udp;
pub mod wire;

use std::time::Duration;

pub use bytes::Bytes;
pub use config::{IceServer, NodeConfig};
pub use node::Node;
pub use stream::PeerStream;
pub use tidepool_protocol::{InfoHash, PeerId};
pub use wire::ReceiptKind;

/// The two data channels every connection has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    /// Small messages: requests, offers, state, heartbeats, receipts.
    Control = 0,
    /// Bulk data, so it never delays control messages in the application's queues.
    Chunks = 1,
}

/// Receipts a sender asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Receipts {
    /// None.
    None,
    /// When the peer's node has the message.
    Received,
    /// When the peer's application took it from its event stream.
    Delivered,
    /// Both.
    Both,
}

/// Why a peer went away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DisconnectReason {
    /// Within the heartbeat timeout nothing was heard from the peer and none of our data was
    /// acknowledged by it (or no frame came within `max_silence`).
    HeartbeatTimeout,
    /// The connection never opened both channels in time.
    ConnectTimeout,
    /// A second connection to the same peer won the tie-break.
    Replaced,
    /// Dropped, while full, to make room for a peer with few connections.
    Rotated,
    /// Dropped by the application ([`Node::disconnect`]), with its reason.
    Dropped(String),
    /// The connection failed, closed, or the peer broke the framing.
    Connection(String),
}

/// The tracker connection's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrackerState {
    /// Connected (again).
    Connected,
    /// Lost or not reachable; reconnecting with backoff. Peer connections stay up.
    Disconnected(String),
    /// The tracker answered with a failure reason.
    Refused(String),
    /// The tracker refused the token; it is not contacted again.
    Unauthorized(String),
}

/// What happens in the pool, in order per peer.
#[derive(Debug, Clone)]
pub enum Event {
    /// A peer's two channels are open.
    PeerConnected {
        /// Who.
        peer: PeerId,
    },
    /// A connected peer is gone.
    PeerDisconnected {
        /// Who.
        peer: PeerId,
        /// Why.
        reason: DisconnectReason,
    },
    /// A message from a peer.
    Message {
        /// From whom.
        peer: PeerId,
        /// On which channel.
        channel: Channel,
        /// The sender's message id.
        id: u64,
        /// The payload.
        data: Bytes,
        /// Set when the sender asked for a delivery receipt (sent when this event is taken).
        delivered_receipt: Option<u64>,
    },
    /// A receipt for a message we sent.
    Receipt {
        /// From whom.
        peer: PeerId,
        /// Our message id.
        id: u64,
        /// What happened to it.
        kind: ReceiptKind,
    },
    /// The tracker connection changed.
    Tracker(TrackerState),
}

/// Counters for one channel of one peer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChannelStats {
    /// Messages received.
    pub messages_in: u64,
    /// Messages sent.
    pub messages_out: u64,
    /// Bytes received (frames, headers included).
    pub bytes_in: u64,
    /// Bytes sent.
    pub bytes_out: u64,
    /// Bytes handed to the channel and not yet acknowledged by the peer.
    pub outstanding_bytes: usize,
}

/// A peer's connection state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    /// Offer/answer exchanged, channels not open yet.
    Connecting,
    /// Both channels open.
    Connected,
}

/// One peer, as [`Node::peers`] lists it.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The peer.
    pub peer_id: PeerId,
    /// Connecting or connected.
    pub state: PeerState,
    /// Whether our offer started the connection.
    pub initiated_by_us: bool,
    /// Time since both channels opened.
    pub connected_for: Option<Duration>,
    /// Last heartbeat round trip.
    pub rtt: Option<Duration>,
    /// The `control` channel's counters.
    pub control: ChannelStats,
    /// The `chunks` channel's counters.
    pub chunks: ChannelStats,
}

/// Node-wide numbers.
#[derive(Debug, Clone, Default)]
pub struct NodeStats {
    /// Peers with both channels open.
    pub connected_peers: usize,
    /// Peers still connecting.
    pub connecting_peers: usize,
    /// Offers sent and not answered yet.
    pub pending_offers: usize,
    /// Whether the tracker connection is up.
    pub tracker_connected: bool,
    /// Announces sent.
    pub announces: u64,
    /// Offers sent.
    pub offers_sent: u64,
    /// Answers sent.
    pub answers_sent: u64,
    /// Times two connections to one peer met and the tie-break kept one.
    pub glare_resolved: u64,
    /// Connections dropped to make room for a starved peer (partition healing).
    pub rotations: u64,
    /// UDP datagrams the kernel dropped for full receive buffers since this node started
    /// (host-wide counter; `None` where `/proc/net/snmp` is unreadable).
    pub udp_rcvbuf_errors: Option<u64>,
    /// The UDP receive buffer the kernel granted (Linux reports double the request).
    pub udp_buffer_granted: Option<u64>,
    /// Delivery receipts not sent because too many were being sent at once.
    pub receipts_dropped: u64,
}

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The config cannot work.
    #[error("invalid node config: {0}")]
    Config(String),
    /// No open connection to that peer.
    #[error("not connected to peer {}", .0.to_hex())]
    NotConnected(PeerId),
    /// A message over `max_message_size`.
    #[error("message of {len} bytes is over the {max}-byte limit")]
    TooLarge {
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The data channel refused the message (closed or closing).
    #[error("send failed: {0}")]
    Send(String),
    /// WebRTC setup failed.
    #[error("webrtc: {0}")]
    WebRtc(String),
    /// A stream is already open on that channel.
    #[error("a stream is already open to that peer on that channel")]
    StreamBusy,
}
