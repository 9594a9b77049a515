//! The node: the public [`Node`] handle and the core task behind it, which owns the
//! connection table — announcing with offers, answering offers, matching answers, resolving
//! glare, heartbeats, timeouts, and replacing lost peers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tidepool_protocol::tracker::{AnnounceEvent, AnnounceRequest, Answer, Offer, OpaqueJson};
use tidepool_protocol::{Number, OfferId, PeerId};
use tokio::sync::{mpsc, oneshot};
use webrtc::peer_connection::RTCSessionDescription;

use crate::link::{self, Link};
use crate::signaling::{self, TrackerIn};
use crate::udp::{BufferedRuntime, kernel_udp_rcvbuf_errors};
use crate::wire::{self, ReceiptKind, flags};
use crate::{
    Channel, ChannelStats, DisconnectReason, Event, NodeConfig, NodeError, NodeStats, PeerInfo,
    PeerState, Receipts, TrackerState,
};

/// What the core task is told.
#[derive(Debug)]
pub(crate) enum CoreMsg {
    Tracker(TrackerIn),
    ChannelOpen {
        link_id: u64,
    },
    LinkDown {
        link_id: u64,
        reason: String,
    },
    OffersReady(Vec<(OfferId, Arc<Link>, String)>),
    /// A connection answering a peer's offer exists (its answer is on the way).
    Accepted(Arc<Link>),
    /// Answering that peer's offer failed before a connection existed.
    AnswerFailed(PeerId),
    /// The application drops a peer (it misbehaved).
    Disconnect(PeerId, String),
    Leave(oneshot::Sender<()>),
}

/// Connections by peer and offers waiting for an answer.
#[derive(Debug, Default)]
pub(crate) struct Table {
    pub(crate) by_peer: HashMap<PeerId, Arc<Link>>,
    pub(crate) pending: HashMap<OfferId, Arc<Link>>,
}

/// State shared by the handle, the core task and the channel pumps.
pub(crate) struct Inner {
    pub(crate) config: NodeConfig,
    pub(crate) runtime: Arc<BufferedRuntime>,
    pub(crate) core_tx: mpsc::UnboundedSender<CoreMsg>,
    pub(crate) events_tx: mpsc::Sender<Event>,
    /// Connects, disconnects and tracker changes: never dropped, so they have a lane of
    /// their own (a few per connection's life, bounded by the connection churn).
    pub(crate) lifecycle_tx: mpsc::UnboundedSender<Event>,
    /// Delivery-receipt tasks running, and receipts dropped past their bound.
    pub(crate) receipt_tasks: std::sync::atomic::AtomicUsize,
    pub(crate) receipts_dropped: AtomicU64,
    pub(crate) table: Mutex<Table>,
    pub(crate) streams: Mutex<HashMap<(PeerId, Channel), mpsc::Sender<crate::stream::Item>>>,
    pub(crate) next_link_id: AtomicU64,
    next_message_id: AtomicU64,
    started: Instant,
    drops_at_start: Option<u64>,
    tracker_up: AtomicBool,
    /// Set once the tracker refuses the token: the node then works without a tracker.
    unauthorized: tokio::sync::watch::Sender<Option<String>>,
    announces: AtomicU64,
    offers_sent: AtomicU64,
    answers_sent: AtomicU64,
    glare_resolved: AtomicU64,
    rotations: AtomicU64,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("peer_id", &self.config.peer_id)
            .finish_non_exhaustive()
    }
}

impl Inner {
    pub(crate) fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    pub(crate) fn now_us(&self) -> u64 {
        self.started.elapsed().as_micros() as u64
    }

    pub(crate) fn stream_for(
        &self,
        peer: PeerId,
        channel: Channel,
    ) -> Option<mpsc::Sender<crate::stream::Item>> {
        self.streams.lock().ok()?.get(&(peer, channel)).cloned()
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn established(&self, peer: &PeerId) -> Result<Arc<Link>, NodeError> {
        self.table()
            .by_peer
            .get(peer)
            .filter(|l| l.established.load(Relaxed))
            .cloned()
            .ok_or(NodeError::NotConnected(*peer))
    }
}

/// Delivery receipts being sent at once; more are dropped (and counted).
const MAX_RECEIPT_TASKS: usize = 64;

/// A pool peer. Create with [`Node::join`]; read what happens with [`Node::next_event`];
/// send with [`Node::send`] and friends; leave with [`Node::leave`].
#[derive(Debug)]
pub struct Node {
    inner: Arc<Inner>,
    events: tokio::sync::Mutex<(mpsc::Receiver<Event>, mpsc::UnboundedReceiver<Event>)>,
}

impl Node {
    /// Connects to the tracker (in the background, reconnecting as needed) and starts
    /// forming connections with the pool's peers. Must be called inside a Tokio runtime.
    pub async fn join(config: NodeConfig) -> Result<Node, NodeError> {
        config.validate()?;
        let (core_tx, core_rx) = mpsc::unbounded_channel();
        let (events_tx, events_rx) = mpsc::channel(config.event_queue);
        let (lifecycle_tx, lifecycle_rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            runtime: Arc::new(match config.impairment.clone() {
                Some(i) => BufferedRuntime::impaired(config.udp_socket_buffer, i),
                None => BufferedRuntime::new(config.udp_socket_buffer),
            }),
            core_tx,
            events_tx,
            lifecycle_tx,
            receipt_tasks: Default::default(),
            receipts_dropped: AtomicU64::new(0),
            table: Mutex::new(Table::default()),
            streams: Mutex::new(HashMap::new()),
            next_link_id: AtomicU64::new(1),
            next_message_id: AtomicU64::new(1),
            started: Instant::now(),
            drops_at_start: kernel_udp_rcvbuf_errors(),
            tracker_up: AtomicBool::new(false),
            unauthorized: tokio::sync::watch::Sender::new(None),
            announces: AtomicU64::new(0),
            offers_sent: AtomicU64::new(0),
            answers_sent: AtomicU64::new(0),
            glare_resolved: AtomicU64::new(0),
            rotations: AtomicU64::new(0),
            config,
        });
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let (tracker_tx, mut tracker_rx) = mpsc::unbounded_channel();
        let c = &inner.config;
        tokio::spawn(signaling::run(
            c.tracker_url.clone(),
            c.token.as_ref().map(|t| t.0.clone()),
            c.reconnect_min,
            c.reconnect_max,
            out_rx,
            tracker_tx,
        ));
        let core_tx = inner.core_tx.clone();
        tokio::spawn(async move {
            while let Some(m) = tracker_rx.recv().await {
                if core_tx.send(CoreMsg::Tracker(m)).is_err() {
                    return;
                }
            }
        });
        let core = Core {
            inner: inner.clone(),
            out: out_tx,
            next_announce: Instant::now(),
            announce_in_flight: false,
            tracker_interval: Duration::from_secs(120),
            first_announce: true,
            last_ping: Instant::now(),
            answering: Default::default(),
            unconfirmed: Default::default(),
            swarm_size: None,
            in_swarm: false,
            full_since: None,
            last_rotation: None,
        };
        tokio::spawn(core.run(core_rx));
        Ok(Node {
            inner,
            events: tokio::sync::Mutex::new((events_rx, lifecycle_rx)),
        })
    }

    /// The config the node runs with.
    pub fn config(&self) -> &NodeConfig {
        &self.inner.config
    }

    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.inner.config.peer_id
    }

    /// Resolves when the tracker refuses this node's token (HTTP 401/403), with the reason;
    /// the node does not retry. Pending forever while the tracker accepts it.
    pub async fn unauthorized(&self) -> String {
        let mut rx = self.inner.unauthorized.subscribe();
        match rx.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            // The sender lives as long as the node: never reached while it runs.
            Err(_) => std::future::pending().await,
        }
    }

    /// The next event, or `None` after [`Node::leave`]. Taking a message that asked for a
    /// delivery receipt sends that receipt.
    pub async fn next_event(&self) -> Option<Event> {
        let mut lanes = self.events.lock().await;
        let (messages, lifecycle) = &mut *lanes;
        // Lifecycle first: a peer's connect is seen before any message that came after it.
        let event = tokio::select! {
            biased;
            Some(e) = lifecycle.recv() => Some(e),
            e = messages.recv() => e,
        }?;
        drop(lanes);
        if let Event::Message {
            peer,
            id,
            delivered_receipt: Some(_),
            ..
        } = &event
            && let Ok(link) = self.inner.established(peer)
        {
            // Sent by a task, so taking the event is never cut short by an await; at most
            // MAX_RECEIPT_TASKS at once (a peer asking a receipt for each of a flood would
            // pile them up), past that the receipt is dropped and counted.
            let tasks = &self.inner.receipt_tasks;
            if tasks.fetch_add(1, Relaxed) < MAX_RECEIPT_TASKS {
                let (inner, id) = (self.inner.clone(), *id);
                tokio::spawn(async move {
                    let _ = link
                        .send_frame(Channel::Control, wire::receipt(ReceiptKind::Delivered, id))
                        .await;
                    inner.receipt_tasks.fetch_sub(1, Relaxed);
                });
            } else {
                tasks.fetch_sub(1, Relaxed);
                self.inner.receipts_dropped.fetch_add(1, Relaxed);
            }
        }
        Some(event)
    }

    /// Sends `data` to `peer` on `channel`, waiting while the channel's send buffer is full.
    /// Returns the message id (echoed in receipts).
    pub async fn send(
        &self,
        peer: PeerId,
        channel: Channel,
        data: &[u8],
    ) -> Result<u64, NodeError> {
        self.send_with(peer, channel, data, Receipts::None).await
    }

    /// [`Node::send`], asking the peer for receipts.
    pub async fn send_with(
        &self,
        peer: PeerId,
        channel: Channel,
        data: &[u8],
        receipts: Receipts,
    ) -> Result<u64, NodeError> {
        let max = self.inner.config.max_message_size;
        if data.len() > max {
            return Err(NodeError::TooLarge {
                len: data.len(),
                max,
            });
        }
        let link = self.inner.established(&peer)?;
        let id = self.inner.next_message_id.fetch_add(1, Relaxed);
        let f = match receipts {
            Receipts::None => 0,
            Receipts::Received => flags::WANT_RECEIVED,
            Receipts::Delivered => flags::WANT_DELIVERED,
            Receipts::Both => flags::WANT_RECEIVED | flags::WANT_DELIVERED,
        };
        link.send_frame(channel, wire::data(f, id, data)).await?;
        Ok(id)
    }

    /// Sends the same message to several peers at once; one result per peer. A slow peer
    /// delays only its own send.
    pub async fn send_many(
        &self,
        peers: &[PeerId],
        channel: Channel,
        data: &[u8],
    ) -> Vec<(PeerId, Result<u64, NodeError>)> {
        let sends = peers
            .iter()
            .map(|p| async move { (*p, self.send(*p, channel, data).await) });
        futures_util::future::join_all(sends).await
    }

    /// Sends to every connected peer.
    pub async fn broadcast(
        &self,
        channel: Channel,
        data: &[u8],
    ) -> Vec<(PeerId, Result<u64, NodeError>)> {
        let peers: Vec<PeerId> = self.connected_peers();
        self.send_many(&peers, channel, data).await
    }

    /// Peers with both channels open.
    pub fn connected_peers(&self) -> Vec<PeerId> {
        let mut v: Vec<PeerId> = self
            .inner
            .table()
            .by_peer
            .iter()
            .filter(|(_, l)| l.established.load(Relaxed))
            .map(|(p, _)| *p)
            .collect();
        v.sort_unstable_by_key(|p| p.0);
        v
    }

    /// Every peer with a connection, established or still connecting, with its stats.
    pub async fn peers(&self) -> Vec<PeerInfo> {
        let links: Vec<Arc<Link>> = self.inner.table().by_peer.values().cloned().collect();
        let mut out = Vec::with_capacity(links.len());
        for l in links {
            let Some(&peer) = l.peer.get() else { continue };
            let stats = |c: Channel, outstanding: usize| {
                let k = l.counters(c);
                ChannelStats {
                    messages_in: k.messages_in.load(Relaxed),
                    messages_out: k.messages_out.load(Relaxed),
                    bytes_in: k.bytes_in.load(Relaxed),
                    bytes_out: k.bytes_out.load(Relaxed),
                    outstanding_bytes: outstanding,
                }
            };
            let control_out = l.control.outstanding_bytes().await.unwrap_or(0);
            let chunks_out = l.chunks.outstanding_bytes().await.unwrap_or(0);
            let rtt = l.rtt_us.load(Relaxed);
            out.push(PeerInfo {
                peer_id: peer,
                state: if l.established.load(Relaxed) {
                    PeerState::Connected
                } else {
                    PeerState::Connecting
                },
                initiated_by_us: l.initiated_by_us,
                connected_for: l.established_at.get().map(|t| t.elapsed()),
                rtt: (rtt > 0).then(|| Duration::from_micros(rtt)),
                control: stats(Channel::Control, control_out),
                chunks: stats(Channel::Chunks, chunks_out),
            });
        }
        out.sort_unstable_by_key(|p| p.peer_id.0);
        out
    }

    /// Node-wide numbers.
    pub fn stats(&self) -> NodeStats {
        let i = &self.inner;
        let t = i.table();
        let established = t
            .by_peer
            .values()
            .filter(|l| l.established.load(Relaxed))
            .count();
        NodeStats {
            connected_peers: established,
            connecting_peers: t.by_peer.len() - established,
            pending_offers: t.pending.len(),
            tracker_connected: i.tracker_up.load(Relaxed),
            announces: i.announces.load(Relaxed),
            offers_sent: i.offers_sent.load(Relaxed),
            answers_sent: i.answers_sent.load(Relaxed),
            glare_resolved: i.glare_resolved.load(Relaxed),
            rotations: i.rotations.load(Relaxed),
            udp_rcvbuf_errors: match (kernel_udp_rcvbuf_errors(), i.drops_at_start) {
                (Some(now), Some(then)) => Some(now.saturating_sub(then)),
                _ => None,
            },
            udp_buffer_granted: i.runtime.granted_buffer(),
            receipts_dropped: i.receipts_dropped.load(Relaxed),
        }
    }

    /// Closes the connection to `peer` (for example after it sent data that failed
    /// verification); the slot is refilled from new offers like any other.
    pub fn disconnect(&self, peer: PeerId, reason: impl Into<String>) {
        let _ = self
            .inner
            .core_tx
            .send(CoreMsg::Disconnect(peer, reason.into()));
    }

    /// A byte stream over `channel` to `peer` ([`crate::PeerStream`]: `AsyncRead` +
    /// `AsyncWrite`). While it exists, that channel's messages from the peer feed the stream
    /// instead of the event stream.
    pub fn open_stream(
        &self,
        peer: PeerId,
        channel: Channel,
    ) -> Result<crate::PeerStream, NodeError> {
        let link = self.inner.established(&peer)?;
        crate::stream::open(&self.inner, link, peer, channel)
    }

    /// Sends `stopped` to the tracker, closes every connection and stops the node.
    pub async fn leave(self) {
        let (tx, rx) = oneshot::channel();
        if self.inner.core_tx.send(CoreMsg::Leave(tx)).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(5), rx).await;
        }
    }
}

impl Node {
    /// Leaves the pool in the background without giving up the handle (for owners that
    /// share it with tasks, like the chunk pipeline): connections close and sends fail
    /// from then on.
    pub fn close(&self) {
        let (tx, _) = oneshot::channel();
        let _ = self.inner.core_tx.send(CoreMsg::Leave(tx));
    }
}

impl Drop for Node {
    /// Dropping a node leaves the pool too (in the background), so no task outlives it.
    fn drop(&mut self) {
        self.close();
    }
}

/// The core task's own state (everything else is in [`Inner`]).
struct Core {
    inner: Arc<Inner>,
    out: mpsc::UnboundedSender<Vec<u8>>,
    next_announce: Instant,
    announce_in_flight: bool,
    tracker_interval: Duration,
    first_announce: bool,
    last_ping: Instant,
    /// Peers whose offers we are answering (slots reserved until the link exists).
    answering: std::collections::HashSet<PeerId>,
    /// Offer ids of each announce awaiting its response, oldest first.
    unconfirmed: std::collections::VecDeque<Vec<OfferId>>,
    /// Swarm size from the last announce response (us included), if known.
    swarm_size: Option<usize>,
    /// Whether the tracker counts us in the swarm (we leave it while full).
    in_swarm: bool,
    /// Since when every slot has been taken (reset by any change).
    full_since: Option<Instant>,
    last_rotation: Option<Instant>,
}

impl Core {
    /// Connections held or being set up by answering, against `max_peers`.
    fn slots_used(&self) -> usize {
        self.inner.table().by_peer.len() + self.answering.len()
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<CoreMsg>) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(CoreMsg::Leave(done)) => {
                        self.leave().await;
                        let _ = done.send(());
                        return;
                    }
                    Some(msg) => self.handle(msg),
                    None => return,
                },
                _ = tick.tick() => self.housekeeping(),
            }
        }
    }

    fn emit(&self, event: Event) {
        // Lifecycle events never block the core and are never dropped: a lost
        // disconnect would leave a dead peer in the application's state.
        let _ = self.inner.lifecycle_tx.send(event);
    }

    fn handle(&mut self, msg: CoreMsg) {
        match msg {
            CoreMsg::Tracker(t) => self.on_tracker(t),
            CoreMsg::ChannelOpen { link_id } => self.on_channel_open(link_id),
            CoreMsg::LinkDown { link_id, reason } => {
                self.close_link(link_id, DisconnectReason::Connection(reason));
            }
            CoreMsg::OffersReady(offers) => self.send_announce(offers),
            CoreMsg::Accepted(link) => self.on_accepted(link),
            CoreMsg::AnswerFailed(peer) => {
                self.answering.remove(&peer);
            }
            CoreMsg::Disconnect(peer, why) => {
                let id = self.inner.table().by_peer.get(&peer).map(|l| l.id);
                if let Some(id) = id {
                    self.close_link(id, DisconnectReason::Dropped(why));
                }
            }
            CoreMsg::Leave(_) => {}
        }
    }

    fn on_tracker(&mut self, t: TrackerIn) {
        match t {
            TrackerIn::Up => {
                self.inner.tracker_up.store(true, Relaxed);
                self.first_announce = true;
                self.announce_in_flight = false;
                self.unconfirmed.clear();
                self.swarm_size = None;
                self.in_swarm = false;
                self.next_announce = Instant::now();
                self.emit(Event::Tracker(TrackerState::Connected));
            }
            TrackerIn::Down(reason) => {
                let was_up = self.inner.tracker_up.swap(false, Relaxed);
                if was_up {
                    tracing::info!("tracker connection lost: {reason}");
                }
                self.emit(Event::Tracker(TrackerState::Disconnected(reason)));
            }
            TrackerIn::AnnounceResponse { interval, peers } => {
                self.tracker_interval = Duration::from_secs(interval.clamp(5, 3600));
                self.swarm_size = Some(peers as usize);
                // The tracker forwards offers, in order, to at most (swarm size - 1) peers;
                // the rest reached nobody and would only hold slots until they expire.
                if let Some(offers) = self.unconfirmed.pop_front() {
                    let delivered = (peers.saturating_sub(1) as usize).min(offers.len());
                    let undelivered: Vec<u64> = {
                        let t = self.inner.table();
                        offers[delivered..]
                            .iter()
                            .filter_map(|o| t.pending.get(o).map(|l| l.id))
                            .collect()
                    };
                    for id in undelivered {
                        self.close_link(id, DisconnectReason::ConnectTimeout);
                    }
                }
                // Connected to everyone: newcomers will offer to us, so the next announce can
                // wait for the tracker's interval. Everyone else holds an offer of ours: wait
                // for those to be answered or expire (an expiry brings the announce forward).
                let others = (peers as usize).saturating_sub(1);
                let connected = self.slots_used();
                let pending = self.inner.table().pending.len();
                let now = Instant::now();
                if others <= connected {
                    // A starved node keeps looking: full peers rejoin the swarm once settled
                    // and make room for it, but never offer to it themselves.
                    let starved = connected <= self.inner.config.max_peers / 2;
                    let wait = if starved {
                        (self.inner.config.min_announce_interval * 4).min(self.tracker_interval)
                    } else {
                        self.tracker_interval
                    };
                    self.next_announce = now + wait;
                } else if others <= connected + pending {
                    self.next_announce = now + self.inner.config.offer_timeout;
                }
            }
            TrackerIn::Unauthorized(reason) => {
                self.inner.tracker_up.store(false, Relaxed);
                tracing::error!("{reason}");
                self.inner.unauthorized.send_replace(Some(reason.clone()));
                self.emit(Event::Tracker(TrackerState::Unauthorized(reason)));
            }
            TrackerIn::Failure(reason) => {
                tracing::warn!("tracker refused: {reason}");
                self.emit(Event::Tracker(TrackerState::Refused(reason)));
            }
            TrackerIn::Offer {
                from,
                offer_id,
                sdp,
            } => self.on_offer(from, offer_id, sdp),
            TrackerIn::Answer {
                from,
                offer_id,
                sdp,
            } => self.on_answer(from, offer_id, sdp),
        }
    }

    /// Glare rule, applied identically on both sides: when two connections to the same peer
    /// exist, the one initiated by the smaller peer id survives. A second offer from the
    /// initiator of the existing connection is a duplicate, not glare, and never wins.
    fn wins_over_existing(&self, initiator: &PeerId, existing: &Link) -> bool {
        // A working connection is never torn down for a new one: later offers from a
        // connected peer are its re-announces reaching us at random, not glare.
        if existing.established.load(Relaxed) {
            return false;
        }
        let me = self.inner.config.peer_id;
        let existing_initiator = if existing.initiated_by_us {
            me
        } else {
            existing.peer.get().copied().unwrap_or(me)
        };
        if *initiator == existing_initiator {
            return false;
        }
        self.inner.glare_resolved.fetch_add(1, Relaxed);
        initiator.0 < existing_initiator.0
    }

    fn on_offer(&mut self, from: PeerId, offer_id: OfferId, sdp: String) {
        let me = self.inner.config.peer_id;
        if from == me || self.answering.contains(&from) {
            return;
        }
        let existing = self.inner.table().by_peer.get(&from).cloned();
        match existing {
            Some(existing) if !self.wins_over_existing(&from, &existing) => return,
            Some(_) => {}
            None if self.slots_used() >= self.inner.config.max_peers
                && !self.make_room_for(offer_degree(&sdp)) =>
            {
                return;
            }
            None => {}
        }
        self.answering.insert(from);
        let replaced = self.inner.table().by_peer.get(&from).map(|l| l.id);
        if let Some(old) = replaced {
            self.close_link(old, DisconnectReason::Replaced);
        }
        let inner = self.inner.clone();
        let out = self.out.clone();
        // Reserve the slot now so a second offer from the same peer is not answered twice.
        let (ready_tx, ready_rx) = oneshot::channel::<Arc<Link>>();
        tokio::spawn(async move {
            match answer_offer(&inner, from, offer_id, sdp, ready_tx).await {
                Ok(frame) => {
                    inner.answers_sent.fetch_add(1, Relaxed);
                    let _ = out.send(frame);
                }
                Err(e) => tracing::debug!("answering an offer failed: {e}"),
            }
        });
        let core = self.inner.core_tx.clone();
        tokio::spawn(async move {
            let _ = core.send(match ready_rx.await {
                Ok(link) => CoreMsg::Accepted(link),
                Err(_) => CoreMsg::AnswerFailed(from),
            });
        });
    }

    fn on_accepted(&mut self, link: Arc<Link>) {
        let Some(&from) = link.peer.get() else { return };
        self.answering.remove(&from);
        let existing = self.inner.table().by_peer.get(&from).cloned();
        if let Some(existing) = existing {
            // Our own offer to this peer was answered while we were answering theirs.
            if self.wins_over_existing(&from, &existing) {
                self.close_link(existing.id, DisconnectReason::Replaced);
            } else {
                close_pc(&link);
                return;
            }
        }
        self.inner.table().by_peer.insert(from, link.clone());
        link::spawn_pumps(&self.inner, &link);
    }

    /// A full node makes room for a starved offerer (at most half of `max_peers`
    /// connections) by dropping its newest connection — but only after being full and
    /// unchanged for `rotate_after`, and once per `rotate_after`. Without this, a pool can
    /// settle into full cliques that never reach each other.
    fn make_room_for(&mut self, offerer_degree: Option<usize>) -> bool {
        let c = &self.inner.config;
        let starved = offerer_degree.is_some_and(|d| d <= c.max_peers / 2);
        let now = Instant::now();
        let settled = self
            .full_since
            .is_some_and(|t| now.duration_since(t) >= c.rotate_after);
        let rested = self
            .last_rotation
            .is_none_or(|t| now.duration_since(t) >= c.rotate_after);
        if !(starved && settled && rested && self.answering.is_empty()) {
            return false;
        }
        let newest = self
            .inner
            .table()
            .by_peer
            .values()
            .filter(|l| l.established.load(Relaxed))
            .max_by_key(|l| l.established_at.get().copied())
            .map(|l| l.id);
        let Some(id) = newest else { return false };
        self.last_rotation = Some(now);
        self.inner.rotations.fetch_add(1, Relaxed);
        self.close_link(id, DisconnectReason::Rotated);
        true
    }

    fn on_answer(&mut self, from: PeerId, offer_id: OfferId, sdp: String) {
        let Some(link) = self.inner.table().pending.remove(&offer_id) else {
            return;
        };
        let existing = self.inner.table().by_peer.get(&from).cloned();
        let me = self.inner.config.peer_id;
        // Glare with an answer still being prepared for this peer's own offer: same rule.
        // If ours wins, the answering connection is dropped when it is accepted.
        let answering = self.answering.contains(&from);
        if answering && existing.is_none() {
            self.inner.glare_resolved.fetch_add(1, Relaxed);
            if from.0 < me.0 {
                close_pc(&link);
                return;
            }
        }
        let used = self.slots_used() - usize::from(answering);
        let over_limit = used >= self.inner.config.max_peers;
        match existing {
            Some(existing) if !self.wins_over_existing(&me, &existing) => {
                close_pc(&link);
                return;
            }
            Some(existing) => self.close_link(existing.id, DisconnectReason::Replaced),
            None if over_limit => {
                close_pc(&link);
                return;
            }
            None => {}
        }
        let _ = link.peer.set(from);
        self.inner.table().by_peer.insert(from, link.clone());
        link::spawn_pumps(&self.inner, &link);
        tokio::spawn(async move {
            let desc = match RTCSessionDescription::answer(sdp) {
                Ok(d) => d,
                Err(e) => {
                    tracing::debug!("bad answer SDP: {e}");
                    close_pc(&link);
                    return;
                }
            };
            if let Err(e) = link.pc.set_remote_description(desc).await {
                tracing::debug!("applying an answer failed: {e}");
                close_pc(&link);
            }
        });
    }

    fn on_channel_open(&mut self, link_id: u64) {
        let link = self
            .inner
            .table()
            .by_peer
            .values()
            .find(|l| l.id == link_id)
            .cloned();
        let Some(link) = link else { return };
        if link.open_channels.fetch_add(1, Relaxed) + 1 == 2 {
            link.established.store(true, Relaxed);
            let _ = link.established_at.set(Instant::now());
            link.last_heard_ms.store(self.inner.now_ms(), Relaxed);
            if let Some(&peer) = link.peer.get() {
                tracing::debug!(?peer, "peer connected");
                self.emit(Event::PeerConnected { peer });
            }
        }
    }

    /// Closes a link (by id) if it is still in the table, telling the application.
    fn close_link(&mut self, link_id: u64, reason: DisconnectReason) {
        let removed = {
            let mut t = self.inner.table();
            let peer = t
                .by_peer
                .iter()
                .find(|(_, l)| l.id == link_id)
                .map(|(p, _)| *p);
            match peer {
                Some(p) => t.by_peer.remove(&p),
                None => {
                    let offer = t
                        .pending
                        .iter()
                        .find(|(_, l)| l.id == link_id)
                        .map(|(o, _)| *o);
                    offer.and_then(|o| t.pending.remove(&o))
                }
            }
        };
        let Some(link) = removed else { return };
        if link.established.load(Relaxed)
            && let Some(&peer) = link.peer.get()
        {
            if let Ok(mut s) = self.inner.streams.lock() {
                s.remove(&(peer, Channel::Control));
                s.remove(&(peer, Channel::Chunks));
            }
            tracing::debug!(?peer, ?reason, "peer disconnected");
            self.emit(Event::PeerDisconnected { peer, reason });
        }
        close_pc(&link);
        // A lost peer is replaced from new offers: announce again soon.
        let soon = Instant::now() + self.inner.config.min_announce_interval;
        self.next_announce = self.next_announce.min(soon);
    }

    fn housekeeping(&mut self) {
        let now = Instant::now();
        let c = &self.inner.config;
        let now_ms = self.inner.now_ms();
        let mut expired = Vec::new();
        let mut to_close = Vec::new();
        let mut ping = Vec::new();
        let ping_due = now.duration_since(self.last_ping) >= c.heartbeat_interval;
        {
            let t = self.inner.table();
            for l in t.pending.values() {
                if now.duration_since(l.created) > c.offer_timeout {
                    expired.push(l.id);
                }
            }
            for l in t.by_peer.values() {
                if !l.established.load(Relaxed) {
                    if now.duration_since(l.created) > c.connect_timeout {
                        to_close.push((l.id, DisconnectReason::ConnectTimeout));
                    }
                } else if l.silent(now_ms, c.heartbeat_timeout, c.max_silence) {
                    to_close.push((l.id, DisconnectReason::HeartbeatTimeout));
                } else if ping_due {
                    ping.push(l.clone());
                }
            }
        }
        for id in expired {
            self.close_link(id, DisconnectReason::ConnectTimeout);
        }
        for (id, reason) in to_close {
            self.close_link(id, reason);
        }
        if ping_due {
            self.last_ping = now;
            for l in ping {
                let inner = self.inner.clone();
                tokio::spawn(async move {
                    // Acknowledgements of what we sent, the last ping included, count as
                    // signs of life: looked at once per interval, just before the next ping.
                    l.sample_acks(now_ms).await;
                    // Stamped after the look (which waits for the connection's lock), so the
                    // round trip measures the network, not our lock.
                    let nonce = inner.now_us();
                    // try_send: a full control channel means the peer is alive but busy.
                    l.try_send_control(wire::heartbeat(false, nonce)).await;
                });
            }
        }
        self.follow_capacity();
        if self.inner.tracker_up.load(Relaxed)
            && !self.announce_in_flight
            && now >= self.next_announce
        {
            self.start_announce();
        }
    }

    /// Builds offers for the free slots (in the background), then announces with them.
    fn start_announce(&mut self) {
        let c = &self.inner.config;
        let pending = self.inner.table().pending.len();
        let used = self.slots_used();
        // One offer per free slot: full peers leave the swarm (`follow_capacity`), so offers
        // reach peers that can answer. Offers beyond the peers we are not connected to would
        // only reach connected peers, who ignore them.
        let free = c.max_peers.saturating_sub(used + pending);
        let budget = c.offers_per_announce;
        let strangers = self
            .swarm_size
            .map_or(usize::MAX, |n| n.saturating_sub(1 + used + pending));
        let want = free.min(budget).min(strangers);
        self.announce_in_flight = true;
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let builds = (0..want).map(|_| make_offer(&inner));
            let offers: Vec<_> = futures_util::future::join_all(builds)
                .await
                .into_iter()
                .filter_map(|r| r.map_err(|e| tracing::debug!("offer failed: {e}")).ok())
                .collect();
            let _ = inner.core_tx.send(CoreMsg::OffersReady(offers));
        });
    }

    fn send_announce(&mut self, offers: Vec<(OfferId, Arc<Link>, String)>) {
        self.announce_in_flight = false;
        let c = &self.inner.config;
        let event = if self.first_announce {
            AnnounceEvent::Started
        } else {
            AnnounceEvent::Update
        };
        let mut frame = Vec::with_capacity(1024 + offers.iter().map(|o| o.2.len()).sum::<usize>());
        AnnounceRequest {
            info_hash: c.info_hash,
            peer_id: c.peer_id,
            event,
            numwant: Some(offers.len() as u32),
            uploaded: Some(Number::UInt(0)),
            downloaded: Some(Number::UInt(0)),
            left: Some(Number::UInt(0)),
            offers: offers
                .iter()
                .map(|(id, _, sdp)| Offer {
                    offer_id: *id,
                    offer: OpaqueJson::Sdp { kind: "offer", sdp },
                })
                .collect(),
            answer: None,
        }
        .encode(&mut frame);
        if !self.inner.tracker_up.load(Relaxed) || self.out.send(frame).is_err() {
            for (_, link, _) in offers {
                close_pc(&link);
            }
            return;
        }
        self.first_announce = false;
        self.in_swarm = true;
        self.unconfirmed
            .push_back(offers.iter().map(|(id, _, _)| *id).collect());
        self.inner.announces.fetch_add(1, Relaxed);
        self.inner
            .offers_sent
            .fetch_add(offers.len() as u64, Relaxed);
        {
            let mut t = self.inner.table();
            for (id, link, _) in offers {
                t.pending.insert(id, link);
            }
        }
        let short = self.inner.table().by_peer.len() < c.max_peers;
        let wait = if short {
            c.min_announce_interval.max(Duration::from_millis(100))
        } else {
            self.tracker_interval
        };
        self.next_announce = Instant::now() + wait;
    }

    /// An announce with `event: stopped`: the tracker forgets us (and stops sending us
    /// offers); peer connections are unaffected.
    fn stopped_frame(&self) -> Vec<u8> {
        let c = &self.inner.config;
        let mut frame = Vec::new();
        AnnounceRequest {
            info_hash: c.info_hash,
            peer_id: c.peer_id,
            event: AnnounceEvent::Stopped,
            numwant: Some(0),
            uploaded: Some(Number::UInt(0)),
            downloaded: Some(Number::UInt(0)),
            left: Some(Number::UInt(0)),
            offers: Vec::new(),
            answer: None,
        }
        .encode(&mut frame);
        frame
    }

    /// A full node leaves the tracker's swarm so other peers' offers go to nodes that can
    /// answer them, and rejoins (with offers) as soon as a slot frees up.
    fn follow_capacity(&mut self) {
        if !self.inner.tracker_up.load(Relaxed) || self.announce_in_flight {
            return;
        }
        let full = self.slots_used() >= self.inner.config.max_peers;
        let now = Instant::now();
        if !full {
            self.full_since = None;
        } else if self.full_since.is_none() {
            self.full_since = Some(now);
        }
        // Full and settled: back into the swarm, reachable by starved peers only
        // (`make_room_for`).
        let settled = self
            .full_since
            .is_some_and(|t| now.duration_since(t) >= self.inner.config.rotate_after);
        if full && !settled && self.in_swarm {
            if self.out.send(self.stopped_frame()).is_ok() {
                self.in_swarm = false;
                self.unconfirmed.push_back(Vec::new());
            }
        } else if (!full || settled) && !self.in_swarm {
            self.first_announce = true;
            self.next_announce = self.next_announce.min(now);
        }
    }

    async fn leave(&mut self) {
        let _ = self.out.send(self.stopped_frame());
        let links: Vec<Arc<Link>> = {
            let mut t = self.inner.table();
            let mut v: Vec<_> = t.by_peer.drain().map(|(_, l)| l).collect();
            v.extend(t.pending.drain().map(|(_, l)| l));
            v
        };
        for l in links {
            l.closed.store(true, Relaxed);
            let _ = l.pc.close().await;
        }
        // Closing the frame queue ends the signaling task after it sent `stopped`.
        let (dead, _) = mpsc::unbounded_channel();
        self.out = dead;
    }
}

/// SDP attribute carrying the offerer's connection count.
const DEGREE_ATTR: &str = "a=x-tidepool-degree:";

/// The offerer's connection count, when the offer came from a tidepool node.
fn offer_degree(sdp: &str) -> Option<usize> {
    sdp.lines()
        .find_map(|l| l.strip_prefix(DEGREE_ATTR))
        .and_then(|d| d.trim().parse().ok())
}

fn close_pc(link: &Arc<Link>) {
    if link.closed.swap(true, Relaxed) {
        return;
    }
    let link = link.clone();
    tokio::spawn(async move {
        let _ = link.pc.close().await;
    });
}

/// A fresh connection with its offer SDP (ICE gathered).
async fn make_offer(inner: &Arc<Inner>) -> Result<(OfferId, Arc<Link>, String), NodeError> {
    let link = link::build(inner, true).await?;
    let offer = link
        .pc
        .create_offer(None)
        .await
        .map_err(|e| NodeError::WebRtc(e.to_string()))?;
    link.pc
        .set_local_description(offer)
        .await
        .map_err(|e| NodeError::WebRtc(e.to_string()))?;
    let mut sdp = link::local_sdp(&link, inner.config.ice_gathering_timeout).await?;
    // Our connection count rides in the offer, so a full peer can tell a starved offerer
    // (whom it makes room for, healing partitions) from one that is merely looking.
    let degree = inner.table().by_peer.len();
    if !sdp.ends_with("\r\n") {
        sdp.push_str("\r\n");
    }
    sdp.push_str(&format!("{DEGREE_ATTR}{degree}\r\n"));
    let mut id = [0u8; 20];
    id.iter_mut()
        .for_each(|b| *b = fastrand::alphanumeric() as u8);
    Ok((OfferId::from_bytes20(&id), link, sdp))
}

/// Answers `from`'s offer; hands the link to the core as soon as it exists and returns the
/// announce frame carrying the answer.
async fn answer_offer(
    inner: &Arc<Inner>,
    from: PeerId,
    offer_id: OfferId,
    sdp: String,
    ready: oneshot::Sender<Arc<Link>>,
) -> Result<Vec<u8>, NodeError> {
    let link = link::build(inner, false).await?;
    let _ = link.peer.set(from);
    let desc = RTCSessionDescription::offer(sdp).map_err(|e| NodeError::WebRtc(e.to_string()))?;
    let fail = |e: webrtc::error::Error| NodeError::WebRtc(e.to_string());
    link.pc.set_remote_description(desc).await.map_err(fail)?;
    let answer = link.pc.create_answer(None).await.map_err(fail)?;
    link.pc.set_local_description(answer).await.map_err(fail)?;
    let sdp = link::local_sdp(&link, inner.config.ice_gathering_timeout).await?;
    if ready.send(link).is_err() {
        return Err(NodeError::WebRtc("node stopped".into()));
    }
    let c = &inner.config;
    let mut frame = Vec::with_capacity(sdp.len() + 512);
    AnnounceRequest {
        info_hash: c.info_hash,
        peer_id: c.peer_id,
        event: AnnounceEvent::Update,
        numwant: None,
        uploaded: None,
        downloaded: None,
        left: None,
        offers: Vec::new(),
        answer: Some(Answer {
            to_peer_id: from,
            offer_id,
            answer: OpaqueJson::Sdp {
                kind: "answer",
                sdp: &sdp,
            },
        }),
    }
    .encode(&mut frame);
    Ok(frame)
}
