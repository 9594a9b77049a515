//! The I/O shell of the cluster: one NATS connection, heartbeats in and out, batches of
//! requests and outputs out to other instances and in from them, and the cross-instance
//! stats request. Workers never touch NATS: socket and swarm workers push [`Outbound`]
//! messages into one bounded lane that the `cluster-out` thread drains, groups per
//! destination and publishes; what arrives is handed to the local workers' channels by one
//! task on a one-thread tokio runtime. Every message that cannot be sent, delivered or
//! decoded is counted in [`BusCounters`].
//!
//! Subjects (`P` = `cluster.subject_prefix`): `P.hb` heartbeats (JSON), `P.i.<id>` batches
//! for instance `<id>` (see `wire`), `P.stats.<id>` stats requests (JSON reply).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::connection::State;
use crossbeam_channel::RecvTimeoutError;
use futures_util::StreamExt;
use mio::Waker;
use serde::{Deserialize, Serialize};

use super::wire::{self, Item};
use super::{Heard, InstanceId, Membership, Routes};
use crate::access::Swap;
use crate::channel::{Rx, Tx, Weigh};
use crate::config::ClusterConfig;
use crate::server::SwarmLanes;
use crate::swarm::{ConnId, Output, Request};

/// What a worker hands the bridge.
#[derive(Debug)]
pub(crate) enum Outbound {
    /// A request for a shard instance `to` owns.
    Request {
        to: InstanceId,
        conn: ConnId,
        request: Request,
    },
    /// An output for a connection on another instance (`conn.instance`).
    Output { conn: ConnId, output: Output },
}

impl Weigh for Outbound {
    fn weight(&self) -> usize {
        match self {
            Outbound::Request { request, .. } => request.weight(),
            Outbound::Output { output, .. } => output.weight(),
        }
    }
}

/// Why the cluster could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The runtime or a thread could not be made.
    #[error("starting the cluster bridge: {0}")]
    Io(#[from] std::io::Error),
    /// The NATS URL or options were refused.
    #[error("connecting to NATS at {url}: {source}")]
    Connect {
        /// The URL given.
        url: String,
        /// What the client said.
        source: async_nats::ConnectError,
    },
    /// A subscription was refused.
    #[error("subscribing on NATS: {0}")]
    Subscribe(#[from] async_nats::SubscribeError),
}

/// What the bus did, for `/metrics`. Written by the bridge threads only.
#[derive(Debug, Default)]
pub(crate) struct BusCounters {
    pub(crate) batches_sent: AtomicU64,
    pub(crate) items_sent: AtomicU64,
    pub(crate) bytes_sent: AtomicU64,
    pub(crate) batches_received: AtomicU64,
    pub(crate) items_received: AtomicU64,
    pub(crate) bytes_received: AtomicU64,
    /// Offers among the items sent (for the bytes-per-offer figure).
    pub(crate) offers_forwarded: AtomicU64,
    /// Items a worker could not hand the bridge: its lane was full.
    pub(crate) unsent_lane_full: AtomicU64,
    /// Items not published: NATS was unreachable, or refused them.
    pub(crate) unsent_disconnected: AtomicU64,
    /// Requests and outputs for an instance that is no longer a member.
    pub(crate) unsent_gone: AtomicU64,
    /// Items larger than a batch may be (`max_batch_bytes`, or the server's `max_payload`).
    pub(crate) unsent_too_large: AtomicU64,
    /// Items the receiver never saw: gaps in a sender's sequence.
    pub(crate) lost_on_bus: AtomicU64,
    /// Items received that a local worker's channel refused (full).
    pub(crate) undelivered: AtomicU64,
    /// Batches that did not decode, came from an instance with a different shard count, or
    /// items naming connections their sender does not hold (or nothing at all).
    pub(crate) malformed: AtomicU64,
    /// Requests received for a shard this instance does not own (the sender's view of the
    /// members differed, briefly, during a change): served here anyway, and dropped with
    /// their swarm at the next cleaning.
    pub(crate) misrouted: AtomicU64,
    /// Heartbeats that could not be published (NATS away or slow).
    pub(crate) heartbeats_unsent: AtomicU64,
    /// Heartbeats refused: a full member table or a different shard count.
    pub(crate) heartbeats_refused: AtomicU64,
    pub(crate) heartbeats_sent: AtomicU64,
    /// Members that joined, and members that expired (missed heartbeats) or left.
    pub(crate) joins: AtomicU64,
    pub(crate) departures: AtomicU64,
    /// 1 while connected to NATS.
    pub(crate) connected: AtomicU64,
    pub(crate) reconnects: AtomicU64,
}

/// A member as `/stats` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct MemberView {
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) shards_owned: u32,
    /// Milliseconds since its last heartbeat (0 for this instance).
    pub(crate) last_heard_ms: u64,
    pub(crate) me: bool,
}

/// One member's own totals, as it answers a stats request.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct MemberTotals {
    pub(crate) name: String,
    pub(crate) connections: u64,
    pub(crate) swarms: u64,
    pub(crate) seeders: u64,
    pub(crate) leechers: u64,
    pub(crate) shards_owned: u64,
}

/// A member's answer to a stats request, or why there is none.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct MemberReply {
    pub(crate) id: String,
    #[serde(flatten)]
    pub(crate) totals: Option<MemberTotals>,
    pub(crate) error: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Heartbeat {
    /// Format version.
    v: u8,
    /// The instance id, hex.
    id: String,
    name: String,
    shards: u32,
    /// A clean shutdown: drop this member now rather than after missed heartbeats.
    #[serde(default)]
    leaving: bool,
}

/// What the workers and the stats endpoint share with the bridge.
pub(crate) struct Cluster {
    me: InstanceId,
    pub(crate) name: String,
    /// Shard owners and live members; replaced on every membership change.
    pub(crate) routes: Swap<Routes>,
    /// Into the `cluster-out` thread.
    pub(crate) lane: Tx<Outbound>,
    pub(crate) counters: BusCounters,
    members: Mutex<Vec<MemberView>>,
    client: async_nats::Client,
    prefix: String,
    shards: u32,
    request_timeout: Duration,
    runtime: tokio::runtime::Handle,
    /// Set by [`Cluster::leave`]: the receiving and heartbeat loops end.
    stop: tokio::sync::watch::Sender<bool>,
    /// Set by [`Cluster::stop_sending`]: `cluster-out` ends once its lane is empty.
    stop_out: std::sync::atomic::AtomicBool,
    /// The batch limit: `max_batch_bytes`, or less when the server's `max_payload` is.
    max_batch: usize,
    /// This instance's own totals for stats requests, filled by the tracker.
    pub(crate) totals: Box<dyn Fn() -> MemberTotals + Send + Sync>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("me", &self.me)
            .field("name", &self.name)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// The local channels that items from the bus are delivered into.
pub(crate) struct Local {
    pub(crate) to_swarms: Vec<SwarmLanes>,
    pub(crate) to_sockets: Vec<Tx<(ConnId, Output)>>,
    pub(crate) wakers: Vec<Arc<Waker>>,
}

/// Items a turn of the out thread takes before publishing, so a burst is cut into batches
/// of bounded size and latency.
const ITEMS_PER_TURN: usize = 4096;
/// Batches the receiver takes from the bus in one turn before it looks at its other subjects.
const DRAIN_PER_TURN: usize = 256;
/// Longest a publish may wait for room in the NATS client's queue before it is counted lost.
const PUBLISH_WAIT: Duration = Duration::from_millis(200);

fn subject_of(prefix: &str, id: InstanceId) -> String {
    format!("{prefix}.i.{:016x}", id.0)
}

/// A counter family with one label, for `/metrics`: name, help, the label's name ("" for
/// none), and each value of the label with its counter.
type LabelledFamily<'a> = (
    &'static str,
    &'static str,
    &'static str,
    &'a [(&'static str, &'a AtomicU64)],
);

impl Cluster {
    /// Connects to NATS (retrying in the background if it is not up yet: the instance serves
    /// alone until it is), subscribes, and starts the heartbeat, receive and send loops.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn start(
        runtime: &tokio::runtime::Runtime,
        me: InstanceId,
        config: &ClusterConfig,
        url: &str,
        name: String,
        lane_capacity: (usize, usize),
        local: Local,
        totals: Box<dyn Fn() -> MemberTotals + Send + Sync>,
    ) -> Result<(Arc<Cluster>, std::thread::JoinHandle<()>), ClusterError> {
        let connected = Arc::new(AtomicU64::new(0));
        let reconnects = Arc::new(AtomicU64::new(0));
        let (c2, r2) = (connected.clone(), reconnects.clone());
        let client = block_on(
            runtime.handle(),
            async_nats::ConnectOptions::new()
                    .name(format!("tidepool-tracker {name}"))
                    .retry_on_initial_connect()
                    .max_reconnects(None)
                    .connection_timeout(Duration::from_secs(2))
                    // Reconnect fast: while NATS is away, this instance serves alone.
                    .reconnect_delay_callback(|attempts| {
                        Duration::from_millis((100 * attempts as u64).min(2000))
                    })
                    .event_callback(move |event| {
                        let (c, r) = (c2.clone(), r2.clone());
                        async move {
                            match event {
                                async_nats::Event::Connected => {
                                    c.store(1, Relaxed);
                                    r.fetch_add(1, Relaxed);
                                    tracing::info!("connected to NATS");
                                }
                                async_nats::Event::Disconnected => {
                                    c.store(0, Relaxed);
                                    tracing::warn!(
                                        "lost NATS; serving the swarms this instance owns alone until it returns"
                                    );
                                }
                                other => tracing::debug!("NATS: {other}"),
                            }
                        }
                    })
                    .connect(url),
        )
        .map_err(|source| ClusterError::Connect {
                url: url.to_owned(),
                source,
            })?;
        let prefix = config.subject_prefix.clone();
        let (data, beats, stats) = block_on(runtime.handle(), async {
            Ok::<_, async_nats::SubscribeError>((
                client.subscribe(subject_of(&prefix, me)).await?,
                client.subscribe(format!("{prefix}.hb")).await?,
                client
                    .subscribe(format!("{prefix}.stats.{:016x}", me.0))
                    .await?,
            ))
        })?;
        let membership = Membership::new(
            me,
            config.shards,
            Duration::from_millis(
                config
                    .heartbeat_interval_ms
                    .saturating_mul(u64::from(config.heartbeats_missed)),
            ),
            config.max_members,
        );
        let (lane, lane_rx) = crate::channel::bounded(lane_capacity.0, lane_capacity.1);
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let cluster = Arc::new(Cluster {
            stop,
            stop_out: std::sync::atomic::AtomicBool::new(false),
            max_batch: config.max_batch_bytes,
            me,
            name,
            routes: Swap::new(Routes::of(&membership)),
            lane,
            counters: BusCounters::default(),
            members: Mutex::new(Vec::new()),
            client,
            prefix,
            shards: config.shards,
            request_timeout: Duration::from_millis(config.request_timeout_ms),
            runtime: runtime.handle().clone(),
            totals,
        });
        tracing::info!(
            instance = format!("{:016x}", me.0),
            name = cluster.name,
            "joining the cluster at {url}"
        );
        let receiver = Receiver {
            cluster: cluster.clone(),
            membership,
            local,
            streams: HashMap::new(),
            connected,
            reconnects,
            heartbeat: Duration::from_millis(config.heartbeat_interval_ms),
            shards: config.shards,
            warned: std::collections::HashSet::new(),
        };
        // Heartbeats on a task of their own: a busy receiver (a flood of batches, a slow
        // stats request) must not delay them, or the others would take this one for dead.
        runtime.spawn(beat_loop(
            cluster.clone(),
            Duration::from_millis(config.heartbeat_interval_ms),
            config.shards,
            stopped.clone(),
        ));
        runtime.spawn(receiver.run(data, beats, stats, stopped));
        let out = cluster.clone();
        let sender = std::thread::Builder::new()
            .name("cluster-out".into())
            .spawn(move || out.send_loop(&lane_rx))?;
        Ok((cluster, sender))
    }

    /// Members as last heard, for `/stats`.
    pub(crate) fn members(&self) -> Vec<MemberView> {
        self.members.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Asks every other member for its totals, each within the request timeout; a member
    /// that does not answer in time is listed with the failure.
    pub(crate) async fn gather(&self) -> Vec<MemberReply> {
        let ids: Vec<String> = self
            .members()
            .into_iter()
            .filter(|m| !m.me)
            .map(|m| m.id)
            .collect();
        let client = self.client.clone();
        let (prefix, timeout) = (self.prefix.clone(), self.request_timeout);
        let asks = ids.into_iter().map(|id| {
            let client = client.clone();
            let subject = format!("{prefix}.stats.{id}");
            async move {
                let asked = tokio::time::timeout(timeout, client.request(subject, "".into()));
                let (totals, error) = match asked.await {
                    Ok(Ok(reply)) => match serde_json::from_slice::<MemberTotals>(&reply.payload) {
                        Ok(t) => (Some(t), None),
                        Err(e) => (None, Some(format!("unreadable reply: {e}"))),
                    },
                    Ok(Err(e)) => (None, Some(format!("request failed: {e}"))),
                    Err(_) => (
                        None,
                        Some(format!("no answer within {} ms", timeout.as_millis())),
                    ),
                };
                MemberReply { id, totals, error }
            }
        });
        futures_util::future::join_all(asks).await
    }

    /// The bus's counters and the membership gauges, for `/metrics`.
    pub(crate) fn families(&self) -> Vec<crate::metrics::Family> {
        use crate::metrics::{family, sample};
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Relaxed);
        let routes = self.routes.current();
        let mut out = Vec::new();
        let single: [(&str, &str, &str, u64); 9] = [
            (
                "tidepool_cluster_members",
                "Live cluster members as this instance sees them, itself included.",
                "gauge",
                routes.member_count() as u64,
            ),
            (
                "tidepool_cluster_shards_owned",
                "Virtual shards this instance owns.",
                "gauge",
                routes.owned() as u64,
            ),
            (
                "tidepool_cluster_connected",
                "1 while connected to NATS.",
                "gauge",
                get(&c.connected),
            ),
            (
                "tidepool_cluster_connects_total",
                "Connections made to NATS (the first, then every reconnect).",
                "counter",
                get(&c.reconnects),
            ),
            (
                "tidepool_cluster_batches_sent_total",
                "Batches published to other instances.",
                "counter",
                get(&c.batches_sent),
            ),
            (
                "tidepool_cluster_bytes_sent_total",
                "Bytes of the batches published.",
                "counter",
                get(&c.bytes_sent),
            ),
            (
                "tidepool_cluster_offers_forwarded_total",
                "Offers among the items published (forwarded to a connection on another instance).",
                "counter",
                get(&c.offers_forwarded),
            ),
            (
                "tidepool_cluster_batches_received_total",
                "Batches received from other instances.",
                "counter",
                get(&c.batches_received),
            ),
            (
                "tidepool_cluster_bytes_received_total",
                "Bytes of the batches received.",
                "counter",
                get(&c.bytes_received),
            ),
        ];
        for (name, help, kind, value) in single {
            family(&mut out, name, help, kind);
            sample(&mut out, &[], value);
        }
        // Counter families with one label: (name, help, label, [(value of the label, counter)]).
        let labelled: [LabelledFamily<'_>; 6] = [
            (
                "tidepool_cluster_items_total",
                "Requests and outputs that crossed the bus, by direction.",
                "direction",
                &[("sent", &c.items_sent), ("received", &c.items_received)],
            ),
            (
                "tidepool_cluster_lost_total",
                "Requests and outputs that did not reach their instance, by where they were lost.",
                "reason",
                &[
                    ("lane_full", &c.unsent_lane_full),
                    ("disconnected", &c.unsent_disconnected),
                    ("member_gone", &c.unsent_gone),
                    ("too_large", &c.unsent_too_large),
                    ("on_bus", &c.lost_on_bus),
                    ("inbox_full", &c.undelivered),
                ],
            ),
            (
                "tidepool_cluster_malformed_total",
                "Batches or items from the bus refused as malformed, or naming connections their sender does not hold.",
                "",
                &[("", &c.malformed)],
            ),
            (
                "tidepool_cluster_misrouted_total",
                "Requests received for a shard this instance does not own (views of the members differed during a change); served here, dropped at the next cleaning.",
                "",
                &[("", &c.misrouted)],
            ),
            (
                "tidepool_cluster_heartbeats_total",
                "Heartbeats sent, refused (unreadable, another shard count, a full member table, a member that left) and not sent (NATS away).",
                "kind",
                &[
                    ("sent", &c.heartbeats_sent),
                    ("refused", &c.heartbeats_refused),
                    ("unsent", &c.heartbeats_unsent),
                ],
            ),
            (
                "tidepool_cluster_membership_changes_total",
                "Members that joined, and members that left or missed their heartbeats.",
                "kind",
                &[("joined", &c.joins), ("departed", &c.departures)],
            ),
        ];
        for (name, help, label, samples) in labelled {
            family(&mut out, name, help, "counter");
            for (value, counter) in samples {
                let labels = if label.is_empty() {
                    vec![]
                } else {
                    vec![(label, (*value).to_owned())]
                };
                sample(&mut out, &labels, get(counter));
            }
        }
        out
    }

    /// Tells `cluster-out` to end once what the workers handed it is published (join its
    /// thread, then [`Cluster::leave`]).
    pub(crate) fn stop_sending(&self) {
        self.stop_out.store(true, Relaxed);
    }

    /// Says goodbye on the bus (members drop this one at once instead of after missed
    /// heartbeats, and refuse anything it sent before for a timeout), flushes, and ends the
    /// loops. Called last at shutdown, once nothing else will be published.
    pub(crate) fn leave(&self) {
        self.stop.send_replace(true);
        let beat = Heartbeat {
            v: 1,
            id: format!("{:016x}", self.me.0),
            name: self.name.clone(),
            shards: 0,
            leaving: true,
        };
        let Ok(payload) = serde_json::to_vec(&beat) else {
            return;
        };
        let client = self.client.clone();
        let subject = format!("{}.hb", self.prefix);
        let _ = block_on(&self.runtime, async {
            tokio::time::timeout(Duration::from_millis(500), async {
                let _ = client.publish(subject, payload.into()).await;
                let _ = client.flush().await;
            })
            .await
        });
    }

    /// The `cluster-out` thread: drains the lane, groups items per destination into batches
    /// of at most `max_batch` bytes and publishes them, until told to stop.
    fn send_loop(&self, lane: &Rx<Outbound>) {
        let mut streams: HashMap<InstanceId, Stream> = HashMap::new();
        let mut routes = crate::access::View::new(&self.routes);
        loop {
            let first = match lane.recv_timeout(Duration::from_millis(100)) {
                Ok(item) => item,
                Err(RecvTimeoutError::Timeout) if self.stop_out.load(Relaxed) => return,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            routes.refresh(&self.routes);
            // The server's limit, once known (a batch over it would be refused whole).
            let limit = match self.client.server_info().max_payload {
                0 => self.max_batch,
                server => self.max_batch.min(server.saturating_sub(1024)),
            };
            let mut next = Some(first);
            let mut taken = 0;
            while let Some(outbound) = next.take() {
                taken += 1;
                let (to, item, offer) = match outbound {
                    Outbound::Request { to, conn, request } => {
                        (to, Item::Request(conn, request), false)
                    }
                    Outbound::Output { conn, output } => {
                        let offer =
                            matches!(output, Output::Frame(crate::swarm::FrameKind::Offer, _));
                        (InstanceId(conn.instance), Item::Output(conn, output), offer)
                    }
                };
                if !routes.get().is_member(to.0) {
                    self.counters.unsent_gone.fetch_add(1, Relaxed);
                } else {
                    let stream = streams.entry(to).or_insert_with(|| Stream {
                        subject: subject_of(&self.prefix, to),
                        seq: 0,
                        sent: 0,
                        buf: Vec::new(),
                        count: 0,
                        offers: 0,
                    });
                    if stream.count == 0 {
                        wire::begin(
                            &mut stream.buf,
                            self.me,
                            self.shards,
                            stream.seq + 1,
                            stream.sent,
                        );
                    }
                    let start = stream.buf.len();
                    wire::push(&mut stream.buf, &item);
                    let size = stream.buf.len() - start;
                    if wire::HEADER_BYTES + size > limit {
                        stream.buf.truncate(start);
                        self.counters.unsent_too_large.fetch_add(1, Relaxed);
                    } else {
                        if stream.buf.len() > limit {
                            // This item would take the batch over: the batch goes without
                            // it, and it starts the next.
                            let item = stream.buf.split_off(start);
                            self.publish(stream);
                            wire::begin(
                                &mut stream.buf,
                                self.me,
                                self.shards,
                                stream.seq + 1,
                                stream.sent,
                            );
                            stream.buf.extend_from_slice(&item);
                        }
                        stream.count += 1;
                        stream.offers += u64::from(offer);
                    }
                }
                if taken < ITEMS_PER_TURN {
                    next = lane.try_recv().ok();
                }
            }
            for stream in streams.values_mut() {
                if stream.count > 0 {
                    self.publish(stream);
                }
            }
            // Streams to members that left are dropped, so the map stays bounded by the
            // member table.
            streams.retain(|id, _| routes.get().is_member(id.0));
        }
    }
}

/// What the `cluster-out` thread keeps per destination: its subject, its sequence, and the
/// batch being filled.
struct Stream {
    subject: String,
    seq: u64,
    sent: u64,
    buf: Vec<u8>,
    count: u32,
    offers: u64,
}

impl Stream {
    fn reset(&mut self) {
        self.count = 0;
        self.offers = 0;
    }
}

impl Cluster {
    /// Publishes a stream's batch; counts it sent, or unsent when NATS is away.
    fn publish(&self, stream: &mut Stream) {
        let c = &self.counters;
        let count = u64::from(stream.count);
        wire::finish(&mut stream.buf, stream.count);
        if self.client.connection_state() != State::Connected {
            c.unsent_disconnected.fetch_add(count, Relaxed);
            stream.reset();
            return;
        }
        // The buffer itself goes out (no copy); the stream starts its next batch in a new one.
        let payload = bytes::Bytes::from(std::mem::take(&mut stream.buf));
        let len = payload.len() as u64;
        let client = &self.client;
        let subject = stream.subject.clone();
        let published = self.runtime.block_on(async {
            tokio::time::timeout(PUBLISH_WAIT, client.publish(subject, payload)).await
        });
        if matches!(published, Ok(Ok(()))) {
            stream.seq += 1;
            stream.sent += count;
            c.batches_sent.fetch_add(1, Relaxed);
            c.items_sent.fetch_add(count, Relaxed);
            c.bytes_sent.fetch_add(len, Relaxed);
            c.offers_forwarded.fetch_add(stream.offers, Relaxed);
        } else {
            c.unsent_disconnected.fetch_add(count, Relaxed);
        }
        stream.reset();
    }
}

/// Publishes a heartbeat every `interval` until told to stop.
async fn beat_loop(
    cluster: Arc<Cluster>,
    interval: Duration,
    shards: u32,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let beat = Heartbeat {
        v: 1,
        id: format!("{:016x}", cluster.me.0),
        name: cluster.name.clone(),
        shards,
        leaving: false,
    };
    let payload = bytes::Bytes::from(serde_json::to_vec(&beat).unwrap_or_default());
    let subject = format!("{}.hb", cluster.prefix);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopped.changed() => return,
        }
        let c = &cluster.counters;
        if cluster.client.connection_state() != State::Connected {
            bump(&c.heartbeats_unsent, 1);
            continue;
        }
        let sent = cluster.client.publish(subject.clone(), payload.clone());
        match tokio::time::timeout(PUBLISH_WAIT, sent).await {
            Ok(Ok(())) => bump(&c.heartbeats_sent, 1),
            _ => bump(&c.heartbeats_unsent, 1),
        }
    }
}

/// The receiving side: one task owning the membership table.
struct Receiver {
    cluster: Arc<Cluster>,
    membership: Membership,
    local: Local,
    /// Per sender: the next sequence number expected and the items received so far.
    streams: HashMap<InstanceId, (u64, u64)>,
    connected: Arc<AtomicU64>,
    reconnects: Arc<AtomicU64>,
    heartbeat: Duration,
    shards: u32,
    /// Members warned about for another shard count (at most 64, so a flood of forged
    /// heartbeats cannot flood the log).
    warned: std::collections::HashSet<InstanceId>,
}

impl Receiver {
    async fn run(
        mut self,
        mut data: async_nats::Subscriber,
        mut beats: async_nats::Subscriber,
        mut stats: async_nats::Subscriber,
        mut stopped: tokio::sync::watch::Receiver<bool>,
    ) {
        let cluster = self.cluster.clone();
        let mut tick = tokio::time::interval(self.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut touched = vec![false; self.local.to_sockets.len()];
        self.publish_routes();
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let gone = self.membership.expire(Instant::now());
                    if !gone.is_empty() {
                        for id in &gone {
                            tracing::warn!(
                                instance = format!("{:016x}", id.0),
                                "cluster member missed its heartbeats: its shards move and its peers are purged"
                            );
                        }
                        bump(&cluster.counters.departures, gone.len() as u64);
                        self.publish_routes();
                    } else {
                        self.publish_members();
                    }
                    let c = &cluster.counters;
                    c.connected.store(self.connected.load(Relaxed), Relaxed);
                    c.reconnects.store(self.reconnects.load(Relaxed), Relaxed);
                }
                Some(message) = beats.next() => self.heard(&message.payload),
                Some(message) = data.next() => {
                    self.receive(&message.payload, &mut touched);
                    // Whatever else is already here goes in the same turn, then one wake
                    // per socket worker.
                    // (Bounded, so a flood cannot hold off the ticks and the other subjects.)
                    for _ in 0..DRAIN_PER_TURN {
                        match futures_util::FutureExt::now_or_never(data.next()) {
                            Some(Some(message)) => self.receive(&message.payload, &mut touched),
                            _ => break,
                        }
                    }
                    for (w, t) in touched.iter_mut().enumerate() {
                        if std::mem::take(t)
                            && let Some(waker) = self.local.wakers.get(w)
                        {
                            let _ = waker.wake();
                        }
                    }
                }
                Some(message) = stats.next() => {
                    if let Some(reply) = message.reply {
                        let totals = (cluster.totals)();
                        let body = serde_json::to_vec(&totals).unwrap_or_default();
                        let reply = cluster.client.publish(reply, body.into());
                        let _ = tokio::time::timeout(PUBLISH_WAIT, reply).await;
                    }
                }
                _ = stopped.changed() => return,
                else => return,
            }
        }
    }

    fn heard(&mut self, payload: &[u8]) {
        let c = &self.cluster.counters;
        let Ok(beat) = serde_json::from_slice::<Heartbeat>(payload) else {
            bump(&c.heartbeats_refused, 1);
            return;
        };
        let Ok(id) = u64::from_str_radix(&beat.id, 16).map(InstanceId) else {
            bump(&c.heartbeats_refused, 1);
            return;
        };
        if id == self.cluster.me {
            return;
        }
        let name: String = beat.name.chars().take(64).collect();
        let now = Instant::now();
        if beat.leaving {
            if self.membership.left(id, now) {
                tracing::info!(name, "cluster member left");
                bump(&c.departures, 1);
                self.publish_routes();
            }
            return;
        }
        if beat.shards != self.shards {
            // Two shard counts would disagree on every owner: refuse it, loudly, once per
            // instance (a bounded memory of whom we warned about).
            bump(&c.heartbeats_refused, 1);
            if self.warned.len() < 64 && self.warned.insert(id) {
                tracing::warn!(
                    name,
                    shards = beat.shards,
                    "ignoring a cluster member with another cluster.shards (ours: {})",
                    self.shards
                );
            }
            return;
        }
        match self.membership.heard(id, &name, now) {
            Heard::Joined => {
                tracing::info!(instance = beat.id, name, "cluster member joined");
                bump(&c.joins, 1);
                self.publish_routes();
            }
            Heard::Alive => {}
            Heard::Full | Heard::Departed => bump(&c.heartbeats_refused, 1),
        }
    }

    /// One batch from the bus: counts gaps in its sender's sequence and delivers its items.
    fn receive(&mut self, payload: &[u8], touched: &mut [bool]) {
        let cluster = self.cluster.clone();
        let c = &cluster.counters;
        let (header, items) = match wire::decode(payload) {
            Ok(decoded) if decoded.0.shards == self.shards => decoded,
            Ok(_) => {
                bump(&c.malformed, 1);
                return;
            }
            Err(e) => {
                bump(&c.malformed, 1);
                tracing::debug!("dropping a batch from the bus: {e}");
                return;
            }
        };
        bump(&c.batches_received, 1);
        bump(&c.bytes_received, payload.len() as u64);
        bump(&c.items_received, u64::from(header.count));
        if header.from == self.cluster.me {
            bump(&c.malformed, 1);
            return;
        }
        // A batch proves its sender alive, like a heartbeat; one from a member not heard
        // yet makes it one (without this, its first requests would name connections this
        // instance takes for closed). A member that said goodbye stays gone.
        match self.membership.heard(header.from, "", Instant::now()) {
            Heard::Alive => {}
            Heard::Joined => {
                bump(&c.joins, 1);
                self.publish_routes();
            }
            Heard::Full | Heard::Departed => {
                bump(&c.undelivered, u64::from(header.count));
                return;
            }
        }
        // Gaps in a stream are losses. The first batch seen from a sender (or the first of a
        // stream it restarted) sets the baseline: what it sent before is not ours to count.
        let count = u64::from(header.count);
        match self.streams.get_mut(&header.from) {
            Some((expected, received)) if header.seq >= *expected => {
                bump(&c.lost_on_bus, header.sent_before.saturating_sub(*received));
                *received = header.sent_before.max(*received).saturating_add(count);
                *expected = header.seq.saturating_add(1);
            }
            Some((_, received)) if header.seq > 1 => {
                // Reordered or replayed: delivered, counted as received.
                *received = received.saturating_add(count);
            }
            _ => {
                self.streams.insert(
                    header.from,
                    (
                        header.seq.saturating_add(1),
                        header.sent_before.saturating_add(count),
                    ),
                );
            }
        }
        let routes = self.cluster.routes.current();
        let l = &self.local;
        for item in items {
            let delivered = match item {
                Item::Request(conn, request) => {
                    if conn.instance != header.from.0 {
                        // An instance speaks only for its own connections.
                        bump(&c.malformed, 1);
                        continue;
                    }
                    let info_hash = match &request {
                        Request::Announce(a) => Some(a.info_hash),
                        Request::Scrape { info_hashes, .. } => info_hashes.first().copied(),
                        Request::Closed { peers } => peers.first().map(|(h, _)| *h),
                    };
                    let Some(info_hash) = info_hash else {
                        bump(&c.malformed, 1);
                        continue;
                    };
                    if !routes.owns(&info_hash) {
                        bump(&c.misrouted, 1);
                    }
                    match request {
                        // The sender grouped these per owner, not per local swarm worker:
                        // split them the way a local socket worker would.
                        Request::Scrape { .. } | Request::Closed { .. } => {
                            split_and_send(&l.to_swarms, conn, request)
                        }
                        announce => {
                            let w = crate::net::shard_of(&info_hash, l.to_swarms.len());
                            l.to_swarms[w].requests.try_send((conn, announce)).is_ok()
                        }
                    }
                }
                Item::Output(conn, output) => {
                    if conn.instance != self.cluster.me.0 {
                        bump(&c.malformed, 1);
                        continue;
                    }
                    let w = conn.worker as usize;
                    match l.to_sockets.get(w) {
                        Some(tx) => {
                            let ok = tx.try_send((conn, output)).is_ok();
                            if ok {
                                touched[w] = true;
                            }
                            ok
                        }
                        None => false,
                    }
                }
            };
            if !delivered {
                bump(&c.undelivered, 1);
            }
        }
    }

    fn publish_routes(&mut self) {
        self.cluster.routes.replace(Routes::of(&self.membership));
        let members = self.membership.members();
        self.streams.retain(|id, _| members.contains(id));
        self.publish_members();
    }

    fn publish_members(&self) {
        let now = Instant::now();
        let owned: HashMap<InstanceId, u32> = self.membership.ownership().into_iter().collect();
        let views = self
            .membership
            .members()
            .into_iter()
            .map(|id| {
                let record = self.membership.member(id);
                MemberView {
                    id: format!("{:016x}", id.0),
                    name: record.map_or_else(|| self.cluster.name.clone(), |m| m.name.clone()),
                    shards_owned: owned.get(&id).copied().unwrap_or(0),
                    last_heard_ms: record.map_or(0, |m| {
                        now.saturating_duration_since(m.last_heard).as_millis() as u64
                    }),
                    me: id == self.cluster.me,
                }
            })
            .collect();
        if let Ok(mut m) = self.cluster.members.lock() {
            *m = views;
        }
    }
}

/// Splits a scrape or close notice from another instance per local swarm worker, as a
/// socket worker here would have; false when a part was refused (a scrape part refused is
/// answered by the scraper's timeout).
fn split_and_send(to_swarms: &[SwarmLanes], conn: ConnId, request: Request) -> bool {
    let n = to_swarms.len();
    match request {
        Request::Scrape {
            request_id,
            info_hashes,
        } => {
            let mut parts: Vec<Vec<_>> = vec![Vec::new(); n];
            for h in info_hashes {
                parts[crate::net::shard_of(&h, n)].push(h);
            }
            // The scraper counts answered hashes, not parts: each worker answers its own.
            let mut all = true;
            for (lanes, info_hashes) in to_swarms.iter().zip(parts) {
                if info_hashes.is_empty() {
                    continue;
                }
                let part = Request::Scrape {
                    request_id,
                    info_hashes,
                };
                all &= lanes.requests.try_send((conn, part)).is_ok();
            }
            all
        }
        Request::Closed { peers } => {
            let mut all = true;
            let mut parts: Vec<Vec<_>> = vec![Vec::new(); n];
            for (h, p) in peers {
                parts[crate::net::shard_of(&h, n)].push((h, p));
            }
            for (lanes, peers) in to_swarms.iter().zip(parts) {
                if peers.is_empty() {
                    continue;
                }
                // Not the close lane that never refuses: its bound holds for this instance's
                // own connections, not for what others publish. A notice refused here leaves
                // its peers until the peer timeout, counted.
                all &= lanes
                    .requests
                    .try_send((conn, Request::Closed { peers }))
                    .is_ok();
            }
            all
        }
        announce => to_swarms[0].requests.try_send((conn, announce)).is_ok(),
    }
}

/// Runs `future` to completion on `handle`'s runtime from synchronous code, which may itself
/// be running inside some other tokio runtime (a library user's, a test's): there, blocking
/// in place would panic, so it blocks a short-lived thread instead.
fn block_on<F>(handle: &tokio::runtime::Handle, future: F) -> F::Output
where
    F: Future + Send,
    F::Output: Send,
{
    if tokio::runtime::Handle::try_current().is_err() {
        return handle.block_on(future);
    }
    std::thread::scope(|scope| {
        scope
            .spawn(|| handle.block_on(future))
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

fn bump(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Relaxed);
}
