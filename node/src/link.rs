//! One WebRTC connection to one peer: building the `PeerConnection` with its two negotiated
//! data channels, waiting for ICE gathering, and the tasks that pump each channel's events
//! into the node (messages, receipts, heartbeats, opens and closes).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rtc::peer_connection::configuration::setting_engine::SctpMaxMessageSize;
use tidepool_protocol::PeerId;
use tokio::sync::{Notify, mpsc};
use webrtc::data_channel::{DataChannel, DataChannelEvent, RTCDataChannelInit};
use webrtc::peer_connection::{
    PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCConfigurationBuilder,
    RTCIceGatheringState, RTCIceServer, RTCPeerConnectionState, SettingEngineBuilder,
};

use crate::node::{CoreMsg, Inner};
use crate::wire::{self, Frame, ReceiptKind, flags};
use crate::{Channel, Event, NodeError};

/// Message and byte counters for one channel of one connection.
#[derive(Debug, Default)]
pub(crate) struct ChannelCounters {
    pub(crate) messages_in: AtomicU64,
    pub(crate) messages_out: AtomicU64,
    pub(crate) bytes_in: AtomicU64,
    pub(crate) bytes_out: AtomicU64,
}

/// A connection and its channels, before or after the peer is known.
pub(crate) struct Link {
    pub(crate) id: u64,
    pub(crate) pc: Arc<dyn PeerConnection>,
    pub(crate) control: Arc<dyn DataChannel>,
    pub(crate) chunks: Arc<dyn DataChannel>,
    pub(crate) gathered: Arc<Notify>,
    pub(crate) created: Instant,
    /// Set once the answer is in (offerer) or the offer accepted (answerer).
    pub(crate) peer: std::sync::OnceLock<PeerId>,
    pub(crate) initiated_by_us: bool,
    /// Channels confirmed so far (a frame from the peer arrived on it; both = established).
    pub(crate) open_channels: AtomicU8,
    /// Per channel: the peer's first frame has arrived.
    pub(crate) confirmed: [AtomicBool; 2],
    pub(crate) established: AtomicBool,
    pub(crate) established_at: std::sync::OnceLock<Instant>,
    /// Milliseconds since the node started at which the peer was last heard from.
    pub(crate) last_heard_ms: AtomicU64,
    /// Most bytes of ours seen acknowledged by the peer's SCTP stack (both channels)…
    pub(crate) acked_bytes: AtomicU64,
    /// …and when that count last grew.
    pub(crate) last_acked_ms: AtomicU64,
    pub(crate) rtt_us: AtomicU64,
    pub(crate) counters: [ChannelCounters; 2],
    pub(crate) closed: AtomicBool,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("id", &self.id)
            .field("peer", &self.peer.get())
            .field("initiated_by_us", &self.initiated_by_us)
            .finish_non_exhaustive()
    }
}

impl Link {
    pub(crate) fn channel(&self, channel: Channel) -> &Arc<dyn DataChannel> {
        match channel {
            Channel::Control => &self.control,
            Channel::Chunks => &self.chunks,
        }
    }

    pub(crate) fn counters(&self, channel: Channel) -> &ChannelCounters {
        &self.counters[channel as usize]
    }

    /// Sends a small control frame if there is room now; a full buffer drops it (heartbeats
    /// are periodic, and a busy channel already proves the peer alive).
    pub(crate) async fn try_send_control(&self, frame: bytes::BytesMut) {
        let len = frame.len() as u64;
        if self.control.try_send(frame).await.is_ok() {
            let c = self.counters(Channel::Control);
            c.messages_out.fetch_add(1, Relaxed);
            c.bytes_out.fetch_add(len, Relaxed);
        }
    }

    /// Notes whether the peer's SCTP stack acknowledged more of our data since the last look:
    /// proof the peer is alive even while its own data waits out SCTP's retransmission
    /// backoff (1 s doubling to 60 s) on a lossy link. Sent counts are read before the
    /// outstanding bytes, so a send racing this look makes the estimate low, never high.
    pub(crate) async fn sample_acks(&self, now_ms: u64) {
        let sent: u64 = self
            .counters
            .iter()
            .map(|c| c.bytes_out.load(Relaxed))
            .sum();
        let (Ok(control), Ok(chunks)) = (
            self.control.outstanding_bytes().await,
            self.chunks.outstanding_bytes().await,
        ) else {
            return;
        };
        let acked = sent.saturating_sub((control + chunks) as u64);
        if self.acked_bytes.fetch_max(acked, Relaxed) < acked {
            self.last_acked_ms.fetch_max(now_ms, Relaxed);
        }
    }

    /// Whether the peer counts as gone: neither a frame from it nor an acknowledgement of
    /// ours within `timeout`, or no frame within `max_silence`.
    pub(crate) fn silent(&self, now_ms: u64, timeout: Duration, max_silence: Duration) -> bool {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let heard = self.last_heard_ms.load(Relaxed);
        let alive = heard.max(self.last_acked_ms.load(Relaxed));
        now_ms.saturating_sub(alive) > ms(timeout)
            || now_ms.saturating_sub(heard) > ms(max_silence.max(timeout))
    }

    /// Sends one already-framed message, waiting for buffer space (back-pressure).
    pub(crate) async fn send_frame(
        &self,
        channel: Channel,
        frame: bytes::BytesMut,
    ) -> Result<(), NodeError> {
        let len = frame.len() as u64;
        self.channel(channel)
            .send(frame)
            .await
            .map_err(|e| NodeError::Send(e.to_string()))?;
        let c = self.counters(channel);
        c.messages_out.fetch_add(1, Relaxed);
        c.bytes_out.fetch_add(len, Relaxed);
        Ok(())
    }
}

/// Reports the connection's state changes and the end of ICE gathering.
struct Handler {
    link_id: u64,
    core: mpsc::UnboundedSender<CoreMsg>,
    gathered: Arc<Notify>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            self.gathered.notify_one();
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        if matches!(
            state,
            RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed
        ) {
            let _ = self.core.send(CoreMsg::LinkDown {
                link_id: self.link_id,
                reason: format!("connection {state}"),
            });
        }
    }
}

/// Builds a connection with the `control` (id 0) and `chunks` (id 1) channels, both
/// negotiated out of band so neither side waits for the other to announce them.
pub(crate) async fn build(
    inner: &Arc<Inner>,
    initiated_by_us: bool,
) -> Result<Arc<Link>, NodeError> {
    let c = &inner.config;
    let link_id = inner.next_link_id.fetch_add(1, Relaxed);
    let gathered = Arc::new(Notify::new());
    let ice_servers = c
        .ice_servers
        .iter()
        .map(|s| RTCIceServer {
            urls: s.urls.clone(),
            username: s.username.clone(),
            credential: s.credential.clone(),
        })
        .collect();
    let addr = if c.loopback_only {
        "127.0.0.1:0"
    } else {
        "0.0.0.0:0"
    };
    let pc = PeerConnectionBuilder::new()
        .with_configuration(
            RTCConfigurationBuilder::new()
                .with_ice_servers(ice_servers)
                .build(),
        )
        .with_setting_engine(
            SettingEngineBuilder::new()
                // Room for a full-size application message plus the frame header.
                .with_sctp_max_message_size(SctpMaxMessageSize::Bounded(
                    (c.max_message_size + wire::DATA_HEADER) as u32,
                ))
                .with_sctp_max_receive_buffer_size(c.sctp_receive_window)
                .build(),
        )
        .with_handler(Arc::new(Handler {
            link_id,
            core: inner.core_tx.clone(),
            gathered: gathered.clone(),
        }))
        .with_runtime(inner.runtime.clone())
        .with_udp_addrs(vec![addr.to_owned()])
        .with_data_channel_send_buffer_limit(c.send_buffer_limit)
        .build()
        .await
        .map_err(|e| NodeError::WebRtc(e.to_string()))?;
    let pc: Arc<dyn PeerConnection> = Arc::new(pc);
    let mut channels = Vec::with_capacity(2);
    for (label, id) in [("control", 0u16), ("chunks", 1u16)] {
        let init = RTCDataChannelInit {
            ordered: true,
            negotiated: Some(id),
            ..Default::default()
        };
        channels.push(
            pc.create_data_channel(label, Some(init))
                .await
                .map_err(|e| NodeError::WebRtc(e.to_string()))?,
        );
    }
    let chunks = channels
        .pop()
        .ok_or(NodeError::WebRtc("no channel".into()))?;
    let control = channels
        .pop()
        .ok_or(NodeError::WebRtc("no channel".into()))?;
    Ok(Arc::new(Link {
        id: link_id,
        pc,
        control,
        chunks,
        gathered,
        created: Instant::now(),
        peer: std::sync::OnceLock::new(),
        initiated_by_us,
        open_channels: AtomicU8::new(0),
        confirmed: Default::default(),
        established: AtomicBool::new(false),
        established_at: std::sync::OnceLock::new(),
        last_heard_ms: AtomicU64::new(inner.now_ms()),
        acked_bytes: AtomicU64::new(0),
        last_acked_ms: AtomicU64::new(inner.now_ms()),
        rtt_us: AtomicU64::new(0),
        counters: Default::default(),
        closed: AtomicBool::new(false),
    }))
}

/// Waits for ICE gathering (bounded) and returns the local SDP with every candidate.
pub(crate) async fn local_sdp(link: &Link, timeout: Duration) -> Result<String, NodeError> {
    // Gathering on loopback or host interfaces takes milliseconds; a STUN server that does
    // not answer must not hold the offer forever.
    let _ = tokio::time::timeout(timeout, link.gathered.notified()).await;
    link.pc
        .local_description()
        .await
        .map(|d| d.sdp)
        .ok_or_else(|| NodeError::WebRtc("no local description".into()))
}

/// Starts one event pump per channel.
pub(crate) fn spawn_pumps(inner: &Arc<Inner>, link: &Arc<Link>) {
    for channel in [Channel::Control, Channel::Chunks] {
        let (inner, link) = (inner.clone(), link.clone());
        tokio::spawn(async move { pump(inner, link, channel).await });
    }
}

async fn pump(inner: Arc<Inner>, link: Arc<Link>, channel: Channel) {
    let dc = link.channel(channel).clone();
    while let Some(event) = dc.poll().await {
        match event {
            DataChannelEvent::OnOpen => {
                // Hello until the peer's first frame shows its end is open too; only then
                // is the channel counted (a message sent earlier can be lost in the stack).
                let (inner, link) = (inner.clone(), link.clone());
                tokio::spawn(async move {
                    let deadline = Instant::now() + inner.config.connect_timeout;
                    while !link.confirmed[channel as usize].load(Relaxed)
                        && !link.closed.load(Relaxed)
                        && Instant::now() < deadline
                    {
                        let _ = link.channel(channel).try_send(wire::hello(false)).await;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                });
            }
            DataChannelEvent::OnMessage(msg) => {
                if let Err(e) = on_message(&inner, &link, channel, msg.data.freeze()).await {
                    let _ = inner.core_tx.send(CoreMsg::LinkDown {
                        link_id: link.id,
                        reason: e,
                    });
                    break;
                }
            }
            DataChannelEvent::OnClose => break,
            _ => {}
        }
    }
    let _ = inner.core_tx.send(CoreMsg::LinkDown {
        link_id: link.id,
        reason: format!("{channel:?} channel closed"),
    });
}

/// Handles one message; an error is a protocol violation that ends the connection.
async fn on_message(
    inner: &Arc<Inner>,
    link: &Arc<Link>,
    channel: Channel,
    data: Bytes,
) -> Result<(), String> {
    let Some(&peer) = link.peer.get() else {
        return Err("message before the peer was known".into());
    };
    let len = data.len() as u64;
    link.last_heard_ms.store(inner.now_ms(), Relaxed);
    let frame = wire::decode(data).map_err(|e| format!("bad frame from peer: {e}"))?;
    // The opening handshake is the library's, not traffic: it is not counted.
    if !matches!(frame, Frame::Hello | Frame::HelloAck) {
        let c = link.counters(channel);
        c.messages_in.fetch_add(1, Relaxed);
        c.bytes_in.fetch_add(len, Relaxed);
    }
    if !link.confirmed[channel as usize].swap(true, Relaxed) {
        let _ = inner
            .core_tx
            .send(CoreMsg::ChannelOpen { link_id: link.id });
    }
    match frame {
        Frame::Hello => {
            let _ = link.channel(channel).try_send(wire::hello(true)).await;
        }
        Frame::HelloAck => {}
        Frame::Data {
            flags: f,
            id,
            payload,
        } => {
            if f & flags::WANT_RECEIVED != 0 {
                let _ = link
                    .send_frame(Channel::Control, wire::receipt(ReceiptKind::Received, id))
                    .await;
            }
            if let Some(stream) = inner.stream_for(peer, channel) {
                let item = if f & flags::END_OF_STREAM != 0 {
                    crate::stream::Item::End(payload)
                } else {
                    crate::stream::Item::Data(payload)
                };
                // A reader that went away just stops getting data.
                let _ = stream.send(item).await;
                return Ok(());
            }
            let delivered = (f & flags::WANT_DELIVERED != 0).then_some(id);
            let _ = inner
                .events_tx
                .send(Event::Message {
                    peer,
                    channel,
                    id,
                    data: payload,
                    delivered_receipt: delivered,
                })
                .await;
        }
        Frame::Receipt { kind, id } => {
            let _ = inner
                .events_tx
                .send(Event::Receipt { peer, id, kind })
                .await;
        }
        Frame::Ping(nonce) => link.try_send_control(wire::heartbeat(true, nonce)).await,
        Frame::Pong(sent_us) => {
            let rtt = inner.now_us().saturating_sub(sent_us);
            link.rtt_us.store(rtt.max(1), Relaxed);
        }
    }
    Ok(())
}
