//! The socket worker: one mio event loop owning its connections — accept, TLS, WebSocket
//! handshake and framing (tungstenite), decoding, limits, keep-alive and writing. Requests go
//! to the swarm workers over bounded channels; their replies come back the same way.

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;
use tidepool_protocol::InfoHash;
use tidepool_protocol::tracker::{
    Action, ClientMessage, Decoder, ErrorResponse, Limits, ScrapeHashes, ScrapeResponse,
    ScrapeStats,
};
use tungstenite::handshake::server::{NoCallback, ServerHandshake};
use tungstenite::handshake::{HandshakeError, MidHandshake};
use tungstenite::protocol::WebSocketConfig;
use tungstenite::protocol::frame::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

use crate::config::Config;
use crate::swarm::{Announce, AnswerPart, ConnId, Output, Request};

const LISTENER: Token = Token(usize::MAX - 1);
/// The reply to a frame over the connection's rate limit (sent without reading the frame).
const RATE_LIMITED: &str = r#"{"failure reason":"rate limit exceeded: slow down"}"#;
/// Frames read from one connection per loop turn, so a flooding client cannot starve the
/// others on its worker; the rest are read on the next turn.
const FRAMES_PER_TURN: usize = 64;
pub(crate) const WAKER: Token = Token(usize::MAX - 2);

/// The swarm worker that owns `info_hash`. Info hashes are hashes already, so their first
/// bytes spread swarms evenly.
fn shard_of(info_hash: &InfoHash, shards: usize) -> usize {
    let h = u32::from_le_bytes([
        info_hash.0[0],
        info_hash.0[1],
        info_hash.0[2],
        info_hash.0[3],
    ]);
    h as usize % shards
}

/// A client byte stream: plain TCP or TLS over TCP.
pub(crate) enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ServerConnection, TcpStream>>),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

enum State {
    Handshaking(Box<MidHandshake<ServerHandshake<Stream, NoCallback>>>),
    Open(Box<WebSocket<Stream>>),
    /// Transitional: taken out while being advanced.
    Gone,
}

/// A scrape split across swarm workers, waiting for every part.
struct PendingScrape {
    request_id: u64,
    parts_left: usize,
    files: Vec<(InfoHash, ScrapeStats)>,
    /// Requested order, so the reply lists swarms as asked (empty for a scrape of all).
    requested: Vec<InfoHash>,
}

struct Connection {
    id: ConnId,
    state: State,
    opened: Instant,
    last_frame: Instant,
    ping_sent: bool,
    /// Token bucket for text frames: tokens left, as of `tokens_at`.
    tokens: f64,
    tokens_at: Instant,
    /// Swarms this connection joined (bounded by `max_swarms_per_connection`). A set: clients
    /// like aquatic's load tester announce into thousands of swarms on one connection.
    swarms: ahash::AHashSet<InfoHash>,
    scrapes: Vec<PendingScrape>,
}

/// Why a connection is being closed (for logs now, metrics later).
#[derive(Debug, Clone, Copy)]
enum CloseReason {
    Peer,
    Error,
    SlowReader,
    HandshakeTimeout,
    Idle,
    Binary,
    TooLarge,
}

pub(crate) struct SocketWorker {
    pub(crate) index: u16,
    pub(crate) config: Arc<Config>,
    pub(crate) poll: Poll,
    pub(crate) listener: TcpListener,
    pub(crate) tls: Option<Arc<rustls::ServerConfig>>,
    pub(crate) to_swarms: Vec<Sender<(ConnId, Request)>>,
    pub(crate) from_swarms: Receiver<(ConnId, Output)>,
    pub(crate) shutdown: Arc<AtomicBool>,
    // Kept alive for the loop's lifetime; swarm workers hold clones to wake this loop.
    pub(crate) _waker: Arc<Waker>,
}

struct Loop {
    w: SocketWorker,
    conns: Slab<Connection>,
    next_serial: u64,
    next_request_id: u64,
    decoder: Decoder,
    ws_config: WebSocketConfig,
    /// Connections that hit `FRAMES_PER_TURN` and may have more input buffered. Edge-triggered
    /// polling will not report them again, so the loop revisits them itself.
    again: Vec<usize>,
}

impl SocketWorker {
    pub(crate) fn run(mut self) -> io::Result<()> {
        self.poll
            .registry()
            .register(&mut self.listener, LISTENER, Interest::READABLE)?;
        let p = &self.config.protocol;
        let decoder = Decoder::new(Limits {
            max_offers: p.max_offers,
            max_scrape_hashes: p.max_scrape_hashes,
            ..Limits::default()
        });
        let n = &self.config.network;
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(n.read_buffer_size)
            .write_buffer_size(0)
            .max_write_buffer_size(n.max_outgoing_queue)
            .max_message_size(Some(n.max_message_size))
            .max_frame_size(Some(n.max_frame_size));
        let mut lp = Loop {
            w: self,
            conns: Slab::new(),
            next_serial: 0,
            next_request_id: 0,
            decoder,
            ws_config,
            again: Vec::new(),
        };
        lp.run()
    }
}

impl Loop {
    fn run(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        let tick = Duration::from_millis(250).min(self.w.config.handshake_timeout() / 2);
        let mut next_sweep = Instant::now() + tick;
        while !self.w.shutdown.load(Ordering::Relaxed) {
            let timeout = if self.again.is_empty() {
                next_sweep.saturating_duration_since(Instant::now())
            } else {
                Duration::ZERO
            };
            if let Err(e) = self.w.poll.poll(&mut events, Some(timeout)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            for slot in std::mem::take(&mut self.again) {
                self.advance(slot);
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(),
                    WAKER => {}
                    Token(slot) => self.advance(slot),
                }
            }
            self.deliver_from_swarms();
            if Instant::now() >= next_sweep {
                self.sweep();
                next_sweep = Instant::now() + tick;
            }
        }
        let slots: Vec<usize> = self.conns.iter().map(|(slot, _)| slot).collect();
        for slot in slots {
            if let Some(Connection {
                state: State::Open(ws),
                ..
            }) = self.conns.get_mut(slot)
            {
                let _ = ws.close(Some(CloseFrame {
                    code: CloseCode::Away,
                    reason: "tracker shutting down".into(),
                }));
                let _ = ws.flush();
            }
            self.close(slot, CloseReason::Peer);
        }
        Ok(())
    }

    fn accept(&mut self) {
        loop {
            let (mut tcp, addr) = match self.w.listener.accept() {
                Ok(pair) => pair,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!(worker = self.w.index, "accept failed: {e}");
                    return;
                }
            };
            if self.conns.len() >= self.w.config.network.max_connections_per_worker {
                // Refused before any per-connection allocation: dropping closes the socket.
                tracing::debug!(%addr, "connection limit reached; refusing");
                continue;
            }
            let _ = tcp.set_nodelay(true);
            let entry = self.conns.vacant_entry();
            let slot = entry.key();
            if let Err(e) = self.w.poll.registry().register(
                &mut tcp,
                Token(slot),
                Interest::READABLE | Interest::WRITABLE,
            ) {
                tracing::warn!("register failed: {e}");
                continue;
            }
            let stream = match &self.w.tls {
                None => Stream::Plain(tcp),
                Some(tls) => match rustls::ServerConnection::new(tls.clone()) {
                    Ok(conn) => Stream::Tls(Box::new(rustls::StreamOwned::new(conn, tcp))),
                    Err(e) => {
                        tracing::warn!("TLS session setup failed: {e}");
                        continue;
                    }
                },
            };
            self.next_serial += 1;
            let now = Instant::now();
            let id = ConnId {
                worker: self.w.index,
                slot: slot as u32,
                serial: self.next_serial,
            };
            let state = match tungstenite::accept_with_config(stream, Some(self.ws_config)) {
                Ok(ws) => State::Open(Box::new(ws)),
                Err(HandshakeError::Interrupted(mid)) => State::Handshaking(Box::new(mid)),
                Err(HandshakeError::Failure(e)) => {
                    tracing::debug!(%addr, "handshake failed: {e}");
                    continue;
                }
            };
            entry.insert(Connection {
                id,
                state,
                opened: now,
                last_frame: now,
                ping_sent: false,
                tokens: f64::from(self.w.config.network.message_burst),
                tokens_at: now,
                swarms: ahash::AHashSet::new(),
                scrapes: Vec::new(),
            });
        }
    }

    /// Moves a connection forward after a readiness event: handshake, reads, flush.
    fn advance(&mut self, slot: usize) {
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        if let State::Handshaking(_) = conn.state {
            let State::Handshaking(mid) = std::mem::replace(&mut conn.state, State::Gone) else {
                return;
            };
            match mid.handshake() {
                Ok(ws) => conn.state = State::Open(Box::new(ws)),
                Err(HandshakeError::Interrupted(mid)) => {
                    conn.state = State::Handshaking(Box::new(mid));
                    return;
                }
                Err(HandshakeError::Failure(e)) => {
                    tracing::debug!("handshake failed: {e}");
                    self.close(slot, CloseReason::Error);
                    return;
                }
            }
        }
        if let Err(reason) = self.read_frames(slot) {
            self.close(slot, reason);
            return;
        }
        self.flush(slot);
    }

    fn read_frames(&mut self, slot: usize) -> Result<(), CloseReason> {
        for _ in 0..FRAMES_PER_TURN {
            let Some(Connection {
                state: State::Open(ws),
                last_frame,
                ping_sent,
                ..
            }) = self.conns.get_mut(slot)
            else {
                return Ok(());
            };
            let msg = match ws.read() {
                Ok(msg) => msg,
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Ok(());
                }
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                    return Err(CloseReason::Peer);
                }
                Err(tungstenite::Error::Capacity(e)) => {
                    tracing::debug!("message over limit: {e}");
                    let _ = ws.close(Some(CloseFrame {
                        code: CloseCode::Size,
                        reason: "message too large".into(),
                    }));
                    let _ = ws.flush();
                    return Err(CloseReason::TooLarge);
                }
                Err(e) => {
                    tracing::debug!("read failed: {e}");
                    return Err(CloseReason::Error);
                }
            };
            *last_frame = Instant::now();
            *ping_sent = false;
            match msg {
                Message::Text(text) => {
                    if self.take_token(slot) {
                        self.handle_request(slot, text.as_str());
                    } else {
                        // Not decoded at all: a flooder costs a refill check and a reply.
                        self.send(slot, RATE_LIMITED.to_owned());
                    }
                }
                Message::Binary(_) => {
                    // Refused before any JSON parsing: the protocol is text only.
                    let _ = ws.close(Some(CloseFrame {
                        code: CloseCode::Unsupported,
                        reason: "binary frames are not supported".into(),
                    }));
                    let _ = ws.flush();
                    return Err(CloseReason::Binary);
                }
                // tungstenite queues the pong / close reply itself; flush sends it.
                Message::Ping(_) | Message::Pong(_) | Message::Close(_) | Message::Frame(_) => {}
            }
        }
        self.again.push(slot);
        Ok(())
    }

    /// Takes one token from the connection's bucket; false when it is empty.
    fn take_token(&mut self, slot: usize) -> bool {
        let n = &self.w.config.network;
        if n.max_messages_per_second == 0 {
            return true;
        }
        let Some(conn) = self.conns.get_mut(slot) else {
            return false;
        };
        let now = Instant::now();
        let refill =
            now.duration_since(conn.tokens_at).as_secs_f64() * f64::from(n.max_messages_per_second);
        conn.tokens = (conn.tokens + refill).min(f64::from(n.message_burst));
        conn.tokens_at = now;
        if conn.tokens >= 1.0 {
            conn.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Decodes a text frame and acts on it. Offers and answers keep their exact bytes from
    /// the frame (verbatim decoding), so forwarding them copies instead of re-encoding.
    fn handle_request(&mut self, slot: usize, frame: &str) {
        enum Step {
            Reply(String),
            Announce(Announce),
            Scrape(ScrapeHashes),
        }
        let step = self.decoder.decode_client_verbatim(frame, |msg| match msg {
            Err(e) => {
                let mut out = Vec::new();
                e.to_response().encode(&mut out);
                Step::Reply(String::from_utf8(out).unwrap_or_default())
            }
            Ok(ClientMessage::Scrape(s)) => Step::Scrape(s.info_hashes),
            Ok(ClientMessage::Announce(a)) => Step::Announce(Announce {
                info_hash: a.info_hash,
                peer_id: a.peer_id,
                event: a.event,
                numwant: a.numwant,
                seeder: a.left.is_some_and(|l| l.is_zero()),
                offers: a
                    .offers
                    .iter()
                    .map(|o| (o.offer_id, o.offer.to_json_string().into_boxed_str()))
                    .collect(),
                answer: a.answer.map(|ans| AnswerPart {
                    to_peer_id: ans.to_peer_id,
                    offer_id: ans.offer_id,
                    answer: ans.answer.to_json_string().into_boxed_str(),
                }),
            }),
        });
        match step {
            Step::Reply(frame) => self.send(slot, frame),
            Step::Announce(a) => self.forward_announce(slot, a),
            Step::Scrape(hashes) => self.forward_scrape(slot, hashes),
        }
    }

    fn failure(&mut self, slot: usize, reason: &str, action: Action, info_hash: Option<InfoHash>) {
        let mut out = Vec::new();
        ErrorResponse {
            failure_reason: reason.into(),
            action: Some(action),
            info_hash,
        }
        .encode(&mut out);
        self.send(slot, String::from_utf8(out).unwrap_or_default());
    }

    fn shard_of(&self, info_hash: &InfoHash) -> usize {
        shard_of(info_hash, self.w.to_swarms.len())
    }

    fn forward_announce(&mut self, slot: usize, a: Announce) {
        let max = self.w.config.protocol.max_swarms_per_connection;
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        let id = conn.id;
        if !conn.swarms.contains(&a.info_hash) {
            if conn.swarms.len() >= max {
                let reason = format!("too many swarms on one connection (limit {max})");
                self.failure(slot, &reason, Action::Announce, Some(a.info_hash));
                return;
            }
            conn.swarms.insert(a.info_hash);
        }
        let info_hash = a.info_hash;
        let shard = self.shard_of(&info_hash);
        if let Err(e) = self.w.to_swarms[shard].try_send((id, Request::Announce(a))) {
            let reason = match e {
                TrySendError::Full(_) => "tracker is overloaded; retry later",
                TrySendError::Disconnected(_) => "tracker is shutting down",
            };
            self.failure(slot, reason, Action::Announce, Some(info_hash));
        }
    }

    fn forward_scrape(&mut self, slot: usize, hashes: ScrapeHashes) {
        let shards = self.w.to_swarms.len();
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        let id = conn.id;
        self.next_request_id += 1;
        let request_id = self.next_request_id;
        let mut per_shard: Vec<Vec<InfoHash>> = vec![Vec::new(); shards];
        let (all, requested) = match &hashes {
            ScrapeHashes::All => (true, Vec::new()),
            other => (false, other.as_slice().to_vec()),
        };
        for h in &requested {
            per_shard[shard_of(h, shards)].push(*h);
        }
        let targets: Vec<usize> = (0..shards)
            .filter(|&s| all || !per_shard[s].is_empty())
            .collect();
        if targets.is_empty() {
            // A scrape of an empty list: answer at once.
            let mut out = Vec::new();
            ScrapeResponse::default().encode(&mut out);
            self.send(slot, String::from_utf8(out).unwrap_or_default());
            return;
        }
        conn.scrapes.push(PendingScrape {
            request_id,
            parts_left: targets.len(),
            files: Vec::new(),
            requested,
        });
        for s in targets {
            let req = Request::Scrape {
                request_id,
                info_hashes: std::mem::take(&mut per_shard[s]),
                all,
            };
            if self.w.to_swarms[s].try_send((id, req)).is_err() {
                if let Some(conn) = self.conns.get_mut(slot) {
                    conn.scrapes.retain(|p| p.request_id != request_id);
                }
                self.failure(
                    slot,
                    "tracker is overloaded; retry later",
                    Action::Scrape,
                    None,
                );
                return;
            }
        }
    }

    fn deliver_from_swarms(&mut self) {
        let mut touched = Vec::new();
        while let Ok((id, output)) = self.w.from_swarms.try_recv() {
            let slot = id.slot as usize;
            match self.conns.get(slot) {
                Some(conn) if conn.id == id => {}
                // The connection closed (and its slot may hold a newer one): drop the reply.
                _ => continue,
            }
            match output {
                Output::Frame(frame) => {
                    if self.queue(slot, frame) {
                        touched.push(slot);
                    }
                }
                Output::ScrapePart { request_id, files } => {
                    if let Some(frame) = self.merge_scrape(slot, request_id, files)
                        && self.queue(slot, frame)
                    {
                        touched.push(slot);
                    }
                }
            }
        }
        touched.sort_unstable();
        touched.dedup();
        for slot in touched {
            self.flush(slot);
        }
    }

    fn merge_scrape(
        &mut self,
        slot: usize,
        request_id: u64,
        files: Vec<(InfoHash, ScrapeStats)>,
    ) -> Option<String> {
        let conn = self.conns.get_mut(slot)?;
        let pos = conn
            .scrapes
            .iter()
            .position(|p| p.request_id == request_id)?;
        let pending = &mut conn.scrapes[pos];
        pending.files.extend(files);
        pending.parts_left -= 1;
        if pending.parts_left > 0 {
            return None;
        }
        let mut pending = conn.scrapes.swap_remove(pos);
        if !pending.requested.is_empty() {
            // Answer in the order asked, duplicates included, as the reference server does.
            let by_hash: ahash::AHashMap<InfoHash, ScrapeStats> = pending.files.drain(..).collect();
            pending.files = pending
                .requested
                .iter()
                .map(|h| (*h, by_hash.get(h).copied().unwrap_or_default()))
                .collect();
            pending.files.dedup_by_key(|(h, _)| *h);
        }
        let mut out = Vec::new();
        ScrapeResponse {
            files: pending.files,
            min_request_interval: None,
        }
        .encode(&mut out);
        Some(String::from_utf8(out).unwrap_or_default())
    }

    /// Queues a frame and flushes what the socket takes now.
    fn send(&mut self, slot: usize, frame: String) {
        if self.queue(slot, frame) {
            self.flush(slot);
        }
    }

    /// Queues a frame; closes a reader whose queue is full. True if still open.
    fn queue(&mut self, slot: usize, frame: String) -> bool {
        let Some(Connection {
            state: State::Open(ws),
            ..
        }) = self.conns.get_mut(slot)
        else {
            return false;
        };
        match ws.write(Message::text(frame)) {
            Ok(()) => true,
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => true,
            Err(tungstenite::Error::WriteBufferFull(_)) => {
                self.close(slot, CloseReason::SlowReader);
                false
            }
            Err(e) => {
                tracing::debug!("write failed: {e}");
                self.close(slot, CloseReason::Error);
                false
            }
        }
    }

    fn flush(&mut self, slot: usize) {
        let Some(Connection {
            state: State::Open(ws),
            ..
        }) = self.conns.get_mut(slot)
        else {
            return;
        };
        match ws.flush() {
            Ok(()) => {}
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(tungstenite::Error::ConnectionClosed) => self.close(slot, CloseReason::Peer),
            Err(e) => {
                tracing::debug!("flush failed: {e}");
                self.close(slot, CloseReason::Error);
            }
        }
    }

    /// Timeouts: unfinished handshakes, pings for quiet connections, idle closes.
    fn sweep(&mut self) {
        let now = Instant::now();
        let n = &self.w.config.network;
        let handshake = self.w.config.handshake_timeout();
        let ping = Duration::from_secs(n.ping_interval_secs);
        let idle = Duration::from_secs(n.idle_timeout_secs);
        let mut to_close = Vec::new();
        let mut to_flush = Vec::new();
        for (slot, conn) in self.conns.iter_mut() {
            match &mut conn.state {
                State::Handshaking(_) | State::Gone => {
                    if now.duration_since(conn.opened) > handshake {
                        to_close.push((slot, CloseReason::HandshakeTimeout));
                    }
                }
                State::Open(ws) => {
                    let quiet = now.duration_since(conn.last_frame);
                    if quiet > idle {
                        to_close.push((slot, CloseReason::Idle));
                    } else if quiet > ping && !conn.ping_sent {
                        conn.ping_sent = true;
                        if ws.write(Message::Ping(Default::default())).is_ok() {
                            to_flush.push(slot);
                        }
                    }
                }
            }
        }
        for slot in to_flush {
            self.flush(slot);
        }
        for (slot, reason) in to_close {
            self.close(slot, reason);
        }
    }

    /// Drops a connection and tells the swarm workers, which remove the peers it owned.
    fn close(&mut self, slot: usize, reason: CloseReason) {
        if !self.conns.contains(slot) {
            return;
        }
        let conn = self.conns.remove(slot);
        tracing::debug!(worker = self.w.index, slot, ?reason, "connection closed");
        let shards = self.w.to_swarms.len();
        let mut per_shard: Vec<Vec<InfoHash>> = vec![Vec::new(); shards];
        for h in conn.swarms {
            per_shard[self.shard_of(&h)].push(h);
        }
        for (s, info_hashes) in per_shard.into_iter().enumerate() {
            if info_hashes.is_empty() {
                continue;
            }
            // Cleanup must not be lost to a full channel: block briefly rather than leak peers
            // (they would otherwise linger until the peer timeout).
            let _ = self.w.to_swarms[s].send_timeout(
                (conn.id, Request::Closed { info_hashes }),
                Duration::from_millis(100),
            );
        }
    }
}
