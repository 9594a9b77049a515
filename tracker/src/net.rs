//! The socket worker: one mio event loop owning its connections — accept, TLS, WebSocket
//! handshake and framing (tungstenite), decoding, limits, keep-alive and writing. Requests go
//! to the swarm workers over bounded channels; their replies come back the same way.

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;
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
use tungstenite::handshake::server::{Callback, ErrorResponse as HttpError, ServerHandshake};
use tungstenite::handshake::{HandshakeError, MidHandshake};
use tungstenite::protocol::WebSocketConfig;
use tungstenite::protocol::frame::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

use crate::access::AccessView;
use crate::metrics::{CloseReason, ErrorKind, InKind, OutKind, RefuseReason, SocketMetrics, bump};
use crate::proxy::{forwarded_client, is_trusted};
use crate::server::Shared;
use crate::swarm::{Announce, AnswerPart, ConnId, FrameKind, Output, Request};

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

impl Stream {
    /// True while a TLS session has not finished its handshake.
    fn tls_handshaking(&self) -> bool {
        matches!(self, Stream::Tls(s) if s.conn.is_handshaking())
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

/// The forwarding headers of a request from a trusted proxy, kept for after the handshake.
type Forwarded = Rc<RefCell<Option<(Option<String>, Option<String>)>>>;

/// Captures `X-Forwarded-For` / `X-Real-IP`, only for connections from trusted proxies.
struct ForwardedHeaders(Option<Forwarded>);

impl Callback for ForwardedHeaders {
    fn on_request(
        self,
        request: &tungstenite::handshake::server::Request,
        response: tungstenite::handshake::server::Response,
    ) -> Result<tungstenite::handshake::server::Response, HttpError> {
        if let Some(slot) = self.0 {
            let header = |name: &str| {
                request
                    .headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            *slot.borrow_mut() = Some((header("x-forwarded-for"), header("x-real-ip")));
        }
        Ok(response)
    }
}

enum State {
    Handshaking(Box<MidHandshake<ServerHandshake<Stream, ForwardedHeaders>>>),
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
    /// The client: the socket's peer, or the address a trusted proxy forwarded.
    addr: IpAddr,
    /// The address counted against `max_connections_per_ip` (None until counted).
    counted: Option<IpAddr>,
    /// Headers captured from a trusted proxy's upgrade request.
    forwarded: Option<Forwarded>,
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

pub(crate) struct SocketWorker {
    pub(crate) index: u16,
    pub(crate) shared: Arc<Shared>,
    pub(crate) poll: Poll,
    pub(crate) listener: TcpListener,
    pub(crate) tls: Option<Arc<rustls::ServerConfig>>,
    pub(crate) to_swarms: Vec<Sender<(ConnId, Request)>>,
    pub(crate) from_swarms: Receiver<(ConnId, Output)>,
    /// Echo text and binary messages back instead of speaking the tracker protocol: the
    /// Autobahn conformance harness drives the same connection code through this.
    pub(crate) echo: bool,
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
    access: AccessView,
    /// Connections that hit `FRAMES_PER_TURN` and may have more input buffered. Edge-triggered
    /// polling will not report them again, so the loop revisits them itself.
    again: Vec<usize>,
}

impl SocketWorker {
    pub(crate) fn run(mut self) -> io::Result<()> {
        self.poll
            .registry()
            .register(&mut self.listener, LISTENER, Interest::READABLE)?;
        let p = &self.shared.config.protocol;
        let decoder = Decoder::new(Limits {
            max_offers: p.max_offers,
            max_scrape_hashes: p.max_scrape_hashes,
            ..Limits::default()
        });
        let n = &self.shared.config.network;
        let access = AccessView::new(&self.shared.access);
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
            access,
            again: Vec::new(),
        };
        lp.run()
    }
}

impl Loop {
    fn m(&self) -> &SocketMetrics {
        &self.w.shared.metrics.sockets[self.w.index as usize]
    }

    fn run(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        let tick = Duration::from_millis(250).min(self.w.shared.config.handshake_timeout() / 2);
        let mut next_sweep = Instant::now() + tick;
        while !self.w.shared.shutting_down() {
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
            // After the wait, so frames that arrive after a reload meet the new list.
            self.access.refresh(&self.w.shared.access);
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
            self.close(slot, CloseReason::Shutdown);
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
            if self.conns.len() >= self.w.shared.config.network.max_connections_per_worker {
                // Refused before any per-connection allocation: dropping closes the socket.
                tracing::debug!(%addr, "connection limit reached; refusing");
                bump(&self.m().refused[RefuseReason::MaxConnections as usize], 1);
                continue;
            }
            let ip = addr.ip().to_canonical();
            let via_proxy = is_trusted(&self.w.shared.config.network.trusted_proxies, ip);
            // A proxy's connections are counted against the client it names, after the
            // handshake; everyone else's now, before anything is allocated.
            let counted = if via_proxy {
                None
            } else if self.w.shared.ip_limiter.acquire(ip) {
                Some(ip)
            } else {
                tracing::debug!(%addr, "per-address connection limit reached; refusing");
                bump(&self.m().refused[RefuseReason::PerIp as usize], 1);
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let entry = self.conns.vacant_entry();
            let slot = entry.key();
            if let Err(e) = self.w.poll.registry().register(
                &mut tcp,
                Token(slot),
                Interest::READABLE | Interest::WRITABLE,
            ) {
                tracing::warn!("register failed: {e}");
                self.release_ip(counted);
                continue;
            }
            let stream = match &self.w.tls {
                None => Stream::Plain(tcp),
                Some(tls) => match rustls::ServerConnection::new(tls.clone()) {
                    Ok(conn) => Stream::Tls(Box::new(rustls::StreamOwned::new(conn, tcp))),
                    Err(e) => {
                        tracing::warn!("TLS session setup failed: {e}");
                        self.release_ip(counted);
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
            bump(
                &self.w.shared.metrics.sockets[self.w.index as usize].accepted,
                1,
            );
            let forwarded: Option<Forwarded> = via_proxy.then(Default::default);
            let callback = ForwardedHeaders(forwarded.clone());
            // Whatever the first read brings is handled by the first readiness event.
            let state = State::Handshaking(Box::new(ServerHandshake::start(
                stream,
                callback,
                Some(self.ws_config),
            )));
            entry.insert(Connection {
                id,
                state,
                addr: ip,
                counted,
                forwarded,
                opened: now,
                last_frame: now,
                ping_sent: false,
                tokens: f64::from(self.w.shared.config.network.message_burst),
                tokens_at: now,
                swarms: ahash::AHashSet::new(),
                scrapes: Vec::new(),
            });
            bump(&self.m().connections, 1);
            self.advance(slot);
        }
    }

    fn release_ip(&self, counted: Option<IpAddr>) {
        if let Some(ip) = counted {
            self.w.shared.ip_limiter.release(ip);
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
            let tls_pending = mid.get_ref().get_ref().tls_handshaking();
            match mid.handshake() {
                Ok(ws) => {
                    if matches!(ws.get_ref(), Stream::Tls(_)) {
                        bump(
                            &self.w.shared.metrics.sockets[self.w.index as usize].tls_handshakes,
                            1,
                        );
                    }
                    conn.state = State::Open(Box::new(ws));
                    if !self.on_open(slot) {
                        return;
                    }
                }
                Err(HandshakeError::Interrupted(mid)) => {
                    conn.state = State::Handshaking(Box::new(mid));
                    return;
                }
                Err(HandshakeError::Failure(e)) => {
                    // An I/O error before TLS finished is a TLS failure (rustls reports bad
                    // records as I/O errors); HTTP upgrade errors come as other kinds.
                    if tls_pending && matches!(e, tungstenite::Error::Io(_)) {
                        bump(
                            &self.w.shared.metrics.sockets[self.w.index as usize]
                                .tls_handshake_failures,
                            1,
                        );
                    }
                    tracing::debug!(addr = %conn.addr, "handshake failed: {e}");
                    self.close(slot, CloseReason::HandshakeFailed);
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

    /// After the upgrade: resolves a proxied client's address and applies the per-address
    /// limit to it. False if the connection was refused and closed.
    fn on_open(&mut self, slot: usize) -> bool {
        let shared = self.w.shared.clone();
        let Some(conn) = self.conns.get_mut(slot) else {
            return false;
        };
        let Some(forwarded) = conn.forwarded.take() else {
            return true;
        };
        let headers = forwarded.borrow_mut().take();
        if let Some((xff, real_ip)) = headers
            && let Some(client) = forwarded_client(
                &shared.config.network.trusted_proxies,
                xff.as_deref(),
                real_ip.as_deref(),
            )
        {
            conn.addr = client.to_canonical();
        }
        if shared.ip_limiter.acquire(conn.addr) {
            conn.counted = Some(conn.addr);
            return true;
        }
        tracing::debug!(addr = %conn.addr, "per-address connection limit reached; closing");
        if let State::Open(ws) = &mut conn.state {
            let _ = ws.close(Some(CloseFrame {
                code: CloseCode::Policy,
                reason: "too many connections from your address".into(),
            }));
            let _ = ws.flush();
        }
        bump(&self.m().refused[RefuseReason::PerIp as usize], 1);
        self.close(slot, CloseReason::PerIpLimit);
        false
    }

    fn read_frames(&mut self, slot: usize) -> Result<(), CloseReason> {
        let echo = self.w.echo;
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
                    // Message too big for us: close code 1009.
                    let _ = ws.close(Some(CloseFrame {
                        code: CloseCode::Size,
                        reason: "message too large".into(),
                    }));
                    let _ = ws.flush();
                    return Err(CloseReason::TooLarge);
                }
                Err(tungstenite::Error::Io(e)) => {
                    tracing::debug!("read failed: {e}");
                    return Err(CloseReason::Io);
                }
                Err(e) => {
                    // Framing, masking, UTF-8 or close-code violations: tell the client why
                    // (RFC 6455 §7.4.1: 1007 for bad UTF-8, 1002 otherwise), then drop.
                    tracing::debug!("protocol violation: {e}");
                    let (code, reason) = match e {
                        tungstenite::Error::Utf8(_) => (CloseCode::Invalid, "invalid UTF-8"),
                        _ => (CloseCode::Protocol, "WebSocket protocol violation"),
                    };
                    let _ = ws.close(Some(CloseFrame {
                        code,
                        reason: reason.into(),
                    }));
                    let _ = ws.flush();
                    return Err(CloseReason::Protocol);
                }
            };
            *last_frame = Instant::now();
            *ping_sent = false;
            match msg {
                Message::Text(text) if echo => {
                    let _ = ws.write(Message::Text(text));
                }
                Message::Binary(data) if echo => {
                    let _ = ws.write(Message::Binary(data));
                }
                Message::Text(text) => {
                    bump(&self.m().bytes_in, text.len() as u64);
                    if self.take_token(slot) {
                        self.handle_request(slot, text.as_str());
                    } else {
                        // Not decoded at all: a flooder costs a refill check and a reply.
                        self.count_in(InKind::RateLimited);
                        self.count_error(ErrorKind::RateLimited);
                        self.send(slot, OutKind::Error, RATE_LIMITED.to_owned());
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

    fn count_in(&self, kind: InKind) {
        bump(&self.m().messages_in[kind as usize], 1);
    }

    fn count_error(&self, kind: ErrorKind) {
        bump(&self.m().errors[kind as usize], 1);
    }

    /// Takes one token from the connection's bucket; false when it is empty.
    fn take_token(&mut self, slot: usize) -> bool {
        let n = &self.w.shared.config.network;
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
            Step::Reply(frame) => {
                self.count_in(InKind::Invalid);
                self.count_error(ErrorKind::InvalidRequest);
                self.send(slot, OutKind::Error, frame);
            }
            Step::Announce(a) => {
                self.count_in(if a.answer.is_some() {
                    InKind::Answer
                } else {
                    InKind::Announce
                });
                self.forward_announce(slot, a);
            }
            Step::Scrape(hashes) => {
                self.count_in(InKind::Scrape);
                self.forward_scrape(slot, hashes);
            }
        }
    }

    fn failure(
        &mut self,
        slot: usize,
        kind: ErrorKind,
        reason: &str,
        action: Action,
        info_hash: Option<InfoHash>,
    ) {
        self.count_error(kind);
        let mut out = Vec::new();
        ErrorResponse {
            failure_reason: reason.into(),
            action: Some(action),
            info_hash,
        }
        .encode(&mut out);
        self.send(
            slot,
            OutKind::Error,
            String::from_utf8(out).unwrap_or_default(),
        );
    }

    fn shard_of(&self, info_hash: &InfoHash) -> usize {
        shard_of(info_hash, self.w.to_swarms.len())
    }

    fn forward_announce(&mut self, slot: usize, a: Announce) {
        if !self.access.list().allows(&a.info_hash) {
            let reason = "info_hash is not allowed on this tracker";
            self.failure(
                slot,
                ErrorKind::AccessDenied,
                reason,
                Action::Announce,
                Some(a.info_hash),
            );
            return;
        }
        let max = self.w.shared.config.protocol.max_swarms_per_connection;
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        let id = conn.id;
        if !conn.swarms.contains(&a.info_hash) {
            if conn.swarms.len() >= max {
                let reason = format!("too many swarms on one connection (limit {max})");
                self.failure(
                    slot,
                    ErrorKind::SwarmLimit,
                    &reason,
                    Action::Announce,
                    Some(a.info_hash),
                );
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
            self.failure(
                slot,
                ErrorKind::Overloaded,
                reason,
                Action::Announce,
                Some(info_hash),
            );
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
            self.send(
                slot,
                OutKind::Scrape,
                String::from_utf8(out).unwrap_or_default(),
            );
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
                    ErrorKind::Overloaded,
                    "tracker is overloaded; retry later",
                    Action::Scrape,
                    None,
                );
                return;
            }
        }
    }

    fn deliver_from_swarms(&mut self) {
        set_gauge(&self.m().inbox_depth, self.w.from_swarms.len() as u64);
        let mut touched = Vec::new();
        while let Ok((id, output)) = self.w.from_swarms.try_recv() {
            let slot = id.slot as usize;
            match self.conns.get(slot) {
                Some(conn) if conn.id == id => {}
                // The connection closed (and its slot may hold a newer one): drop the reply.
                _ => continue,
            }
            match output {
                Output::Frame(kind, frame) => {
                    let kind = match kind {
                        FrameKind::AnnounceResponse => OutKind::Announce,
                        FrameKind::Offer => OutKind::Offer,
                        FrameKind::Answer => OutKind::Answer,
                        FrameKind::Error => {
                            self.count_error(ErrorKind::PeerIdInUse);
                            OutKind::Error
                        }
                        FrameKind::Denied => {
                            self.count_error(ErrorKind::AccessDenied);
                            OutKind::Error
                        }
                    };
                    if self.queue(slot, kind, frame) {
                        touched.push(slot);
                    }
                }
                Output::ScrapePart { request_id, files } => {
                    if let Some(frame) = self.merge_scrape(slot, request_id, files)
                        && self.queue(slot, OutKind::Scrape, frame)
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
    fn send(&mut self, slot: usize, kind: OutKind, frame: String) {
        if self.queue(slot, kind, frame) {
            self.flush(slot);
        }
    }

    /// Queues a frame; closes a reader whose queue is full. True if still open.
    fn queue(&mut self, slot: usize, kind: OutKind, frame: String) -> bool {
        let m = &self.w.shared.metrics.sockets[self.w.index as usize];
        bump(&m.messages_out[kind as usize], 1);
        bump(&m.bytes_out, frame.len() as u64);
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
                self.close(slot, CloseReason::Io);
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
                self.close(slot, CloseReason::Io);
            }
        }
    }

    /// Timeouts: unfinished handshakes, pings for quiet connections, idle closes.
    fn sweep(&mut self) {
        let now = Instant::now();
        let n = &self.w.shared.config.network;
        let handshake = self.w.shared.config.handshake_timeout();
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
        let m = &self.w.shared.metrics.sockets[self.w.index as usize];
        bump(&m.closed[reason as usize], 1);
        set_gauge(
            &m.connections,
            m.connections
                .load(std::sync::atomic::Ordering::Relaxed)
                .saturating_sub(1),
        );
        if let State::Handshaking(mid) = &conn.state
            && mid.get_ref().get_ref().tls_handshaking()
        {
            // Counted, not logged: scanners and attackers fail TLS handshakes by the thousand.
            bump(&m.tls_handshake_failures, 1);
        }
        self.release_ip(conn.counted);
        tracing::debug!(worker = self.w.index, slot, addr = %conn.addr, ?reason, "connection closed");
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

/// Sets a gauge that only this thread writes.
fn set_gauge(gauge: &std::sync::atomic::AtomicU64, value: u64) {
    gauge.store(value, std::sync::atomic::Ordering::Relaxed);
}
