//! The socket worker: one mio event loop owning its connections. This file is the loop —
//! accept, readiness, delivering the swarm workers' replies, timeouts, closing. One
//! connection's state lives in `connection`, its socket, TLS and buffers in `link`, the
//! WebSocket protocol in `ws`, decoding and forwarding requests in `requests`, and the batched
//! write path in `write`.
//!
//! One turn of the loop: poll; deliver at most `DELIVER_PER_TURN` replies from the swarm
//! workers; unless replies are still backed up, read from every ready connection (at most
//! `FRAMES_PER_TURN` frames each); flush every connection that has output queued, once;
//! sweep timeouts every tick. Every step is bounded, so neither side starves the other, and
//! replies are delivered before more requests are read (back-pressure instead of drops).

mod connection;
mod link;
mod requests;
mod write;
pub(crate) mod ws;

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;
use tidepool_protocol::tracker::{Action, Decoder, Limits};
use tidepool_protocol::{InfoHash, PeerId};

use crate::access::{AccessView, View};
use crate::auth::{Refused, Verifier};
use crate::channel::Rx;
use crate::cluster::{Cluster, InstanceId, Outbound, Routes};
use crate::metrics::{CloseReason, ErrorKind, OutKind, RefuseReason, SocketMetrics, bump};
use crate::proxy::{forwarded_client, is_trusted};
use crate::server::{Shared, SwarmLanes};
use crate::swarm::{ConnId, FrameKind, Output, Request};
use connection::{Connection, Memberships, Merged, TokenBucket};
use link::{BufPool, InBuf, Link, Received};
use ws::{Assembler, Frame, close_code};

const LISTENER: Token = Token(usize::MAX - 1);
pub(crate) const WAKER: Token = Token(usize::MAX - 2);
/// Frames read from one connection per loop turn, so a flooding client cannot starve the
/// others on its worker; the rest are read on the next turn.
const FRAMES_PER_TURN: usize = 64;
/// Replies taken from the swarm workers per loop turn; the rest wait one turn, so a burst
/// of fan-out cannot hold off accepts and reads.
const DELIVER_PER_TURN: usize = 4096;
/// Connections accepted per loop turn; more wait a turn, so a connect flood cannot hold off
/// reads and deliveries (the listener is edge-triggered: the loop comes back by itself).
const ACCEPTS_PER_TURN: usize = 256;
/// Sweeps over which every connection's expired swarm records are pruned once.
const PRUNE_SLICES: usize = 40;
/// Loop turns in a row that may skip reads while replies are backed up.
const MAX_DEFERRED_TURNS: u32 = 8;
/// Bytes queued for one connection before they are written mid-turn; below this, a turn's
/// frames go out in one write at the end of the turn.
const WRITE_BATCH_BYTES: usize = 64 * 1024;

/// The swarm worker that owns `info_hash`. Info hashes are hashes already, so their first
/// bytes spread swarms evenly.
pub(crate) fn shard_of(info_hash: &InfoHash, shards: usize) -> usize {
    let h = u32::from_le_bytes([
        info_hash.0[0],
        info_hash.0[1],
        info_hash.0[2],
        info_hash.0[3],
    ]);
    h as usize % shards
}

/// What a socket worker thread is started with.
pub(crate) struct SocketWorker {
    pub(crate) index: u16,
    pub(crate) shared: Arc<Shared>,
    pub(crate) poll: Poll,
    pub(crate) listener: TcpListener,
    pub(crate) tls: Option<Arc<rustls::ServerConfig>>,
    /// One entry per swarm worker: its request inbox and its close-notice lane.
    pub(crate) to_swarms: Vec<SwarmLanes>,
    pub(crate) from_swarms: Rx<(ConnId, Output)>,
    /// The cluster bridge, when `[cluster]` is on: requests for shards other instances own
    /// go there.
    pub(crate) cluster: Option<Arc<Cluster>>,
    /// Echo text and binary messages back instead of speaking the tracker protocol: the
    /// Autobahn conformance harness drives the same connection code through this.
    pub(crate) echo: bool,
    // Kept alive for the loop's lifetime; swarm workers hold clones to wake this loop.
    pub(crate) _waker: Arc<Waker>,
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
        let auth = self.shared.auth.as_ref().map(|a| View::new(&a.verifier));
        let limits = ws::Limits {
            max_frame: n.max_frame_size,
            max_message: n.max_message_size,
            // The protocol is text only; echo mode (Autobahn) sends binary back.
            binary: self.echo,
        };
        let pool = BufPool::new(n.read_buffer_size);
        let routes = self.cluster.as_ref().map(|c| View::new(&c.routes));
        EventLoop {
            routes,
            worker: self,
            conns: Slab::new(),
            next_serial: 0,
            next_request_id: 0,
            decoder,
            limits,
            pool,
            access,
            auth,
            again: Vec::new(),
            dirty: Vec::new(),
            inbox_pending: false,
            deferred_turns: 0,
            prune_slice: 0,
            turn: 0,
            accept_pending: false,
            accept_on_sweep: false,
        }
        .run()
    }
}

/// The running loop of one socket worker.
struct EventLoop {
    worker: SocketWorker,
    /// Who owns which shard, when clustered.
    routes: Option<View<Routes>>,
    conns: Slab<Connection>,
    next_serial: u64,
    next_request_id: u64,
    decoder: Decoder,
    /// Frame and message size limits for what clients send.
    limits: ws::Limits,
    /// Read and write buffers, lent to connections only while they hold bytes.
    pool: BufPool,
    access: AccessView,
    /// The token verifier, when `[auth]` has keys.
    auth: Option<View<Verifier>>,
    /// Connections that hit `FRAMES_PER_TURN` and may have more input buffered. Edge-triggered
    /// polling will not report them again, so the loop revisits them itself.
    again: Vec<usize>,
    /// Connections with frames queued this turn, flushed once at its end.
    dirty: Vec<usize>,
    /// The swarm workers' replies were not all taken last turn.
    inbox_pending: bool,
    /// Turns in a row that skipped reads to deliver replies first.
    deferred_turns: u32,
    /// Which slice of the connections the next sweep prunes.
    prune_slice: usize,
    /// Loop turns so far; a connection is advanced at most once per turn.
    turn: u64,
    /// The listener hit `ACCEPTS_PER_TURN` and may have more connections waiting.
    accept_pending: bool,
    /// Accepting failed (e.g. out of descriptors); connections may be waiting.
    accept_on_sweep: bool,
}

impl EventLoop {
    fn metrics(&self) -> &SocketMetrics {
        &self.worker.shared.metrics.sockets[self.worker.index as usize]
    }

    fn run(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        let tick =
            Duration::from_millis(250).min(self.worker.shared.config.handshake_timeout() / 2);
        let mut next_sweep = Instant::now() + tick;
        while !self.worker.shared.shutting_down() {
            self.turn += 1;
            let timeout = if self.again.is_empty() && !self.inbox_pending && !self.accept_pending {
                next_sweep.saturating_duration_since(Instant::now())
            } else {
                Duration::ZERO
            };
            if let Err(e) = self.worker.poll.poll(&mut events, Some(timeout)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            // After the wait, so frames that arrive after a reload meet the new list.
            self.access.refresh(&self.worker.shared.access);
            if let (Some(routes), Some(cluster)) = (&mut self.routes, &self.worker.cluster) {
                routes.refresh(&cluster.routes);
            }
            self.refresh_auth();
            // Replies first. While they back up, reading more requests would only make more
            // replies to drop: reads wait (TCP pushes back on the clients) until the backlog
            // is delivered, and writable connections are still flushed.
            self.deliver_from_swarms();
            let now = Instant::now();
            // At most a few turns in a row, so replies that other socket workers' clients keep
            // producing for this worker cannot stop its reads for long.
            let defer = self.inbox_pending && self.deferred_turns < MAX_DEFERRED_TURNS;
            self.deferred_turns = if defer { self.deferred_turns + 1 } else { 0 };
            if std::mem::take(&mut self.accept_pending) {
                self.accept();
            }
            if defer {
                for event in events.iter() {
                    match event.token() {
                        LISTENER => self.accept(),
                        WAKER => {}
                        Token(slot) => {
                            self.mark_dirty(slot);
                            self.again.push(slot);
                        }
                    }
                }
                self.again.sort_unstable();
                self.again.dedup();
            } else {
                for slot in std::mem::take(&mut self.again) {
                    self.advance(slot, now);
                }
                for event in events.iter() {
                    match event.token() {
                        LISTENER => self.accept(),
                        WAKER => {}
                        Token(slot) => self.advance(slot, now),
                    }
                }
            }
            let now = Instant::now();
            if now >= next_sweep {
                self.sweep(now);
                next_sweep = now + tick;
                if std::mem::take(&mut self.accept_on_sweep) {
                    self.accept();
                }
            }
            self.flush_dirty();
        }
        let slots: Vec<usize> = self.conns.iter().map(|(slot, _)| slot).collect();
        for slot in slots {
            if let Some(conn) = self.conns.get_mut(slot) {
                conn.close_with(close_code::AWAY, "tracker shutting down", &mut self.pool);
            }
            self.close(slot, CloseReason::Shutdown);
        }
        Ok(())
    }

    fn accept(&mut self) {
        for _ in 0..ACCEPTS_PER_TURN {
            let (mut tcp, addr) = match self.worker.listener.accept() {
                Ok(pair) => pair,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    // Out of descriptors, say: the listener will not report the waiting
                    // connections again by itself, so try again at the next sweep.
                    tracing::warn!(worker = self.worker.index, "accept failed: {e}");
                    self.accept_on_sweep = true;
                    return;
                }
            };
            let shared = self.worker.shared.clone();
            if self.conns.len() >= shared.config.network.max_connections_per_worker {
                // Refused before any per-connection allocation: dropping closes the socket.
                tracing::debug!(%addr, "connection limit reached; refusing");
                bump(
                    &self.metrics().refused[RefuseReason::MaxConnections as usize],
                    1,
                );
                continue;
            }
            let ip = addr.ip().to_canonical();
            let via_proxy = is_trusted(&shared.config.network.trusted_proxies, ip);
            // A proxy's connections are counted against the client it names, after the
            // handshake; everyone else's now, before anything is allocated.
            let counted = if via_proxy {
                None
            } else if shared.ip_limiter.acquire(ip) {
                Some(ip)
            } else {
                tracing::debug!(%addr, "per-address connection limit reached; refusing");
                bump(&self.metrics().refused[RefuseReason::PerIp as usize], 1);
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let entry = self.conns.vacant_entry();
            let slot = entry.key();
            if let Err(e) = self.worker.poll.registry().register(
                &mut tcp,
                Token(slot),
                Interest::READABLE | Interest::WRITABLE,
            ) {
                tracing::warn!("register failed: {e}");
                self.release_ip(counted);
                continue;
            }
            let link = match &self.worker.tls {
                None => Link::plain(tcp),
                Some(tls) => match rustls::server::UnbufferedServerConnection::new(tls.clone()) {
                    Ok(conn) => Link::tls(tcp, conn),
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
                instance: self.worker.shared.instance.0,
                worker: self.worker.index,
                slot: slot as u32,
                serial: self.next_serial,
            };
            entry.insert(Connection {
                id,
                link,
                open: false,
                head_scanned: 0,
                ws: Assembler::default(),
                addr: ip,
                counted,
                via_proxy,
                opened: now,
                last_frame: now,
                ping_sent: false,
                bucket: TokenBucket::full(shared.config.network.message_burst, now),
                swarms: Memberships::new(now),
                scrapes: Vec::new(),
                last_full_scrape: None,
                dirty: false,
                advanced_turn: 0,
                grant: None,
            });
            shared.liveness.opened(id, now);
            let m = self.metrics();
            bump(&m.accepted, 1);
            bump(&m.connections, 1);
            self.advance(slot, now);
        }
        self.accept_pending = true;
    }

    fn release_ip(&self, counted: Option<std::net::IpAddr>) {
        if let Some(ip) = counted {
            self.worker.shared.ip_limiter.release(ip);
        }
    }

    /// Moves a connection forward after a readiness event: the upgrade, then frames.
    /// Whatever this queues (replies, pongs, close frames) is written at the end of the turn.
    fn advance(&mut self, slot: usize, now: Instant) {
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        // Once per turn: a slot both revisited and reported ready reads its budget once.
        if conn.advanced_turn == self.turn {
            return;
        }
        conn.advanced_turn = self.turn;
        if let Err(reason) = self.read_frames(slot, now) {
            self.close(slot, reason);
            return;
        }
        self.mark_dirty(slot);
    }

    /// Checks the token of an upgrade request when tokens are required, counting the outcome;
    /// the grant goes with the connection.
    fn admit(&mut self, slot: usize, token: Option<String>) -> Result<(), Refused> {
        let Some(view) = &self.auth else {
            return Ok(());
        };
        let m = &self.worker.shared.metrics.sockets[self.worker.index as usize];
        let verified = token
            .ok_or(Refused::Missing)
            .and_then(|t| view.get().verify(&t, crate::auth::unix_now()))
            .and_then(|grant| {
                let shared = self.worker.shared.auth.as_ref();
                match shared.is_none_or(|a| a.acquire(&grant)) {
                    true => Ok(grant),
                    false => Err(Refused::PeerLimit),
                }
            });
        match verified {
            Ok(grant) => {
                bump(&m.auth_accepted, 1);
                if let Some(conn) = self.conns.get_mut(slot) {
                    conn.grant = Some(Box::new(grant));
                }
                Ok(())
            }
            Err(refused) => {
                bump(&m.auth_refused[refused.index()], 1);
                let addr = self.conns.get(slot).map(|c| c.addr);
                tracing::debug!(?addr, "upgrade refused: {refused}");
                Err(refused)
            }
        }
    }

    /// Picks up reloaded keys and revocations, closing connections whose token they no
    /// longer admit.
    fn refresh_auth(&mut self) {
        let (Some(view), Some(shared)) = (&mut self.auth, &self.worker.shared.auth) else {
            return;
        };
        if !view.refresh(&shared.verifier) {
            return;
        }
        let verifier = view.get();
        let revoked: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| c.grant.as_ref().is_some_and(|g| !verifier.still_admits(g)))
            .map(|(slot, _)| slot)
            .collect();
        for slot in revoked {
            if let Some(conn) = self.conns.get_mut(slot) {
                conn.close_with(close_code::POLICY, "token revoked", &mut self.pool);
            }
            self.close(slot, CloseReason::TokenRevoked);
        }
    }

    /// After the upgrade: resolves a proxied client's address and applies the per-address
    /// limit to it. False if the connection was refused and closed.
    fn on_open(&mut self, slot: usize, upgrade: ws::Upgrade) -> bool {
        let shared = self.worker.shared.clone();
        let Some(conn) = self.conns.get_mut(slot) else {
            return false;
        };
        if !conn.via_proxy {
            return true;
        }
        if let Some(client) = forwarded_client(
            &shared.config.network.trusted_proxies,
            upgrade.forwarded_for.as_deref(),
            upgrade.real_ip.as_deref(),
        ) {
            conn.addr = client.to_canonical();
        }
        if shared.ip_limiter.acquire(conn.addr) {
            conn.counted = Some(conn.addr);
            return true;
        }
        tracing::debug!(addr = %conn.addr, "per-address connection limit reached; closing");
        conn.close_with(
            close_code::POLICY,
            "too many connections from your address",
            &mut self.pool,
        );
        bump(&self.metrics().refused[RefuseReason::PerIp as usize], 1);
        self.close(slot, CloseReason::PerIpLimit);
        false
    }

    /// Reads and handles what a connection sent: its upgrade request, then at most
    /// `FRAMES_PER_TURN` frames. Its unconsumed input is held out of the connection meanwhile,
    /// so frames are handled where they were read, and goes back only if it holds a partial
    /// frame (else the buffer returns to the pool).
    fn read_frames(&mut self, slot: usize, now: Instant) -> Result<(), CloseReason> {
        let Some(conn) = self.conns.get_mut(slot) else {
            return Ok(());
        };
        let mut input = conn.link.take_input();
        let result = self.read_into(slot, &mut input, now);
        match self.conns.get_mut(slot) {
            Some(conn) => conn.link.restore_input(input, &mut self.pool),
            None => self.pool.give_input(input),
        }
        result
    }

    fn read_into(
        &mut self,
        slot: usize,
        input: &mut InBuf,
        now: Instant,
    ) -> Result<(), CloseReason> {
        let mut frames = 0;
        loop {
            // What is buffered first: a read may have brought several frames.
            if !self.take_frames(slot, input, now, &mut frames)? {
                return Ok(());
            }
            let Some(conn) = self.conns.get_mut(slot) else {
                return Ok(());
            };
            let received = conn.link.receive(input, &mut self.pool);
            if std::mem::take(&mut conn.link.tls_established) {
                let m = &self.worker.shared.metrics.sockets[self.worker.index as usize];
                bump(&m.tls_handshakes, 1);
            }
            match received {
                // Whatever arrived is handled first, even with the peer's close right behind it
                // (a close frame and TLS close_notify may share a segment).
                Ok(received) => {
                    let more = self.take_frames(slot, input, now, &mut frames)?;
                    match received {
                        // A short read emptied the socket: the next edge says when more comes.
                        Received::Data { drained } if more && !drained => {}
                        Received::Data { .. } | Received::WouldBlock => return Ok(()),
                        Received::Closed => return Err(CloseReason::Peer),
                    }
                }
                Err(e) => {
                    tracing::debug!(addr = %conn.addr, "read failed: {e}");
                    return Err(if conn.link.tls_handshaking() || !conn.open {
                        CloseReason::HandshakeFailed
                    } else {
                        CloseReason::Io
                    });
                }
            }
        }
    }

    /// Handles the upgrade request and whole frames in `input`. False when reading should
    /// stop: the frame budget is spent (the slot is revisited next turn) or the connection
    /// is gone; true when more bytes are needed.
    fn take_frames(
        &mut self,
        slot: usize,
        input: &mut InBuf,
        now: Instant,
        frames: &mut usize,
    ) -> Result<bool, CloseReason> {
        loop {
            let Some(conn) = self.conns.get_mut(slot) else {
                return Ok(false);
            };
            if !conn.open {
                // The head is parsed when new bytes end a line (httparse takes bare LF too):
                // a head trickled a byte at a time costs a scan of the new bytes per read, and
                // a parse only per line, not per byte.
                let from = conn.head_scanned.min(input.len());
                let complete = input.data()[from..].contains(&b'\n');
                conn.head_scanned = input.len();
                if !complete && input.len() <= ws::MAX_REQUEST_HEAD {
                    return Ok(true);
                }
                match ws::parse_upgrade(input.data(), conn.via_proxy) {
                    Ok(None) => return Ok(true),
                    Ok(Some((used, mut upgrade))) => {
                        input.consume(used);
                        if let Err(refused) = self.admit(slot, upgrade.token.take()) {
                            let Some(conn) = self.conns.get_mut(slot) else {
                                return Ok(false);
                            };
                            // A full peer limit is temporary (another connection with the
                            // token may close): 429, which clients retry; the rest are final.
                            let status = if refused == Refused::PeerLimit {
                                429
                            } else {
                                401
                            };
                            let refusal = ws::Refusal {
                                status,
                                reason: refused.message(),
                            };
                            let out = conn.link.output(&mut self.pool);
                            out.extend_from_slice(refusal.response().as_bytes());
                            let _ = conn.link.flush(&mut self.pool);
                            return Err(CloseReason::Unauthorized);
                        }
                        let Some(conn) = self.conns.get_mut(slot) else {
                            return Ok(false);
                        };
                        let out = conn.link.output(&mut self.pool);
                        out.extend_from_slice(upgrade.response().as_bytes());
                        conn.open = true;
                        conn.last_frame = now;
                        if !self.on_open(slot, upgrade) {
                            return Ok(false);
                        }
                        continue;
                    }
                    Err(refusal) => {
                        tracing::debug!(addr = %conn.addr, "upgrade refused: {}", refusal.reason);
                        let out = conn.link.output(&mut self.pool);
                        out.extend_from_slice(refusal.response().as_bytes());
                        let _ = conn.link.flush(&mut self.pool);
                        return Err(CloseReason::HandshakeFailed);
                    }
                }
            }
            if *frames >= FRAMES_PER_TURN {
                self.again.push(slot);
                return Ok(false);
            }
            let (used, frame) = match conn.ws.next(input.data_mut(), self.limits) {
                Ok(Some(next)) => next,
                Ok(None) => return Ok(true),
                Err(v) => {
                    // Framing, masking, size or close-code violations: tell the client why
                    // (RFC 6455 §7.4.1), then drop.
                    tracing::debug!(addr = %conn.addr, "protocol violation: {}", v.reason);
                    conn.close_with(v.code, v.reason, &mut self.pool);
                    return Err(match v.code {
                        close_code::SIZE => CloseReason::TooLarge,
                        close_code::UNSUPPORTED => CloseReason::Binary,
                        _ => CloseReason::Protocol,
                    });
                }
            };
            *frames += 1;
            conn.last_frame = now;
            conn.ping_sent = false;
            let id = conn.id;
            self.worker.shared.liveness.heard(id, now);
            let handled = match frame {
                Frame::Text(range) => self.on_message(slot, true, &input.data()[range], now),
                Frame::Binary(range) => self.on_message(slot, false, &input.data()[range], now),
                Frame::Assembled { text } => {
                    let message = conn.ws.take_message();
                    self.on_message(slot, text, &message, now)
                }
                Frame::Fragment | Frame::Pong => Ok(()),
                Frame::Ping(range) => {
                    self.queue_frame(slot, ws::OP_PONG, &input.data()[range]);
                    Ok(())
                }
                Frame::Close(code) => {
                    // Echo the close (RFC 6455 §5.5.1), send it, and drop the connection.
                    let out = conn.link.output(&mut self.pool);
                    match code {
                        Some(code) => ws::write_close(out, code, ""),
                        None => ws::write_frame(out, ws::OP_CLOSE, &[]),
                    }
                    let _ = conn.link.flush(&mut self.pool);
                    Err(CloseReason::Peer)
                }
            };
            input.consume(used);
            handled?;
        }
    }

    /// A whole message: text is checked for UTF-8 once, here, then handled; binary is refused
    /// (echo mode sends both back).
    fn on_message(
        &mut self,
        slot: usize,
        text: bool,
        payload: &[u8],
        now: Instant,
    ) -> Result<(), CloseReason> {
        let echo = self.worker.echo;
        if !text {
            if echo {
                self.queue_frame(slot, ws::OP_BINARY, payload);
                return Ok(());
            }
            // Refused before any JSON parsing: the protocol is text only.
            if let Some(conn) = self.conns.get_mut(slot) {
                conn.close_with(
                    close_code::UNSUPPORTED,
                    "binary frames are not supported",
                    &mut self.pool,
                );
            }
            return Err(CloseReason::Binary);
        }
        let Ok(text) = simdutf8::basic::from_utf8(payload) else {
            if let Some(conn) = self.conns.get_mut(slot) {
                conn.close_with(close_code::INVALID, "invalid UTF-8", &mut self.pool);
            }
            return Err(CloseReason::Protocol);
        };
        if echo {
            self.queue_frame(slot, ws::OP_TEXT, payload);
        } else {
            self.handle_text(slot, text, now);
        }
        Ok(())
    }

    /// Takes at most `DELIVER_PER_TURN` replies from the swarm workers and queues each on
    /// its connection.
    fn deliver_from_swarms(&mut self) {
        let inbox = &self.worker.from_swarms;
        let m = &self.worker.shared.metrics.sockets[self.worker.index as usize];
        set_gauge(&m.inbox_depth, inbox.len() as u64);
        set_gauge(&m.inbox_bytes, inbox.bytes() as u64);
        self.inbox_pending = false;
        for _ in 0..DELIVER_PER_TURN {
            let Ok((id, output)) = self.worker.from_swarms.try_recv() else {
                return;
            };
            let slot = id.slot as usize;
            if !self.conns.get(slot).is_some_and(|c| c.id == id) {
                // The connection closed (and its slot may hold a newer one).
                bump(&self.metrics().replies_orphaned, 1);
                continue;
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
                    self.queue(slot, kind, &frame);
                }
                Output::ScrapePart { request_id, files } => {
                    let merged = self
                        .conns
                        .get_mut(slot)
                        .map(|c| c.merge_scrape(request_id, files));
                    match merged {
                        Some(Merged::Done(frame)) => {
                            self.queue(slot, OutKind::Scrape, frame.as_bytes());
                        }
                        Some(Merged::Waiting) | None => {}
                        // A part of a scrape already answered (timed out, or another part
                        // was refused): nobody waits for it.
                        Some(Merged::Unknown) => bump(&self.metrics().replies_orphaned, 1),
                    }
                }
            }
        }
        self.inbox_pending = !self.worker.from_swarms.is_empty();
    }

    /// Timeouts: unfinished handshakes, pings for quiet connections, idle closes, scrapes
    /// whose parts did not all come back; and the gauge of swarms held.
    fn sweep(&mut self, now: Instant) {
        let config = &self.worker.shared.config;
        let handshake = config.handshake_timeout();
        let ping = Duration::from_secs(config.network.ping_interval_secs);
        let idle = Duration::from_secs(config.network.idle_timeout_secs);
        let record_timeout = config.membership_timeout();
        // Expired swarm records are pruned a slice of the connections per tick (each one
        // every PRUNE_SLICES ticks), so no tick pays for every record at once.
        self.prune_slice = (self.prune_slice + 1) % PRUNE_SLICES;
        let mut to_close = Vec::new();
        let mut expired = Vec::new();
        let unix_now = crate::auth::unix_now();
        let mut pinged = Vec::new();
        let mut timed_out = Vec::new();
        let mut lent = 0;
        let mut memberships = 0;
        for (slot, conn) in self.conns.iter_mut() {
            if slot % PRUNE_SLICES == self.prune_slice {
                conn.swarms.expire(now, record_timeout);
            }
            memberships += conn.swarms.len() as u64;
            lent += conn.link.held() as u64;
            if conn.scrapes.iter().any(|p| now >= p.deadline) {
                let before = conn.scrapes.len();
                conn.scrapes.retain(|p| now < p.deadline);
                timed_out.extend(std::iter::repeat_n(slot, before - conn.scrapes.len()));
            }
            if !conn.open {
                if now.duration_since(conn.opened) > handshake {
                    to_close.push((slot, CloseReason::HandshakeTimeout));
                }
                continue;
            }
            if conn.grant.as_ref().is_some_and(|g| g.expires <= unix_now) {
                expired.push(slot);
                continue;
            }
            let quiet = now.duration_since(conn.last_frame);
            if quiet > idle {
                to_close.push((slot, CloseReason::Idle));
            } else if quiet > ping && !conn.ping_sent {
                conn.ping_sent = true;
                ws::write_frame(conn.link.output(&mut self.pool), ws::OP_PING, &[]);
                pinged.push(slot);
            }
        }
        set_gauge(&self.metrics().memberships, memberships);
        set_gauge(&self.metrics().buffer_bytes_lent, lent);
        set_gauge(
            &self.metrics().buffer_bytes_pooled,
            self.pool.pooled() as u64,
        );
        for slot in pinged {
            self.mark_dirty(slot);
        }
        for slot in timed_out {
            self.failure(
                slot,
                ErrorKind::ScrapeTimeout,
                "scrape timed out (a part was not answered in time: overload, or a cluster member that did not answer); retry later",
                Action::Scrape,
                None,
            );
        }
        for (slot, reason) in to_close {
            self.close(slot, reason);
        }
        for slot in expired {
            if let Some(conn) = self.conns.get_mut(slot) {
                conn.close_with(close_code::POLICY, "token expired", &mut self.pool);
            }
            self.close(slot, CloseReason::TokenExpired);
        }
    }

    /// Drops a connection and tells the swarm workers which peers it held, on the lane that
    /// cannot refuse (one notice per closed connection per swarm worker, so it is bounded by
    /// the connection limit).
    fn close(&mut self, slot: usize, reason: CloseReason) {
        if !self.conns.contains(slot) {
            return;
        }
        let conn = self.conns.remove(slot);
        let shared = self.worker.shared.clone();
        shared.liveness.closed(conn.id);
        let m = &shared.metrics.sockets[self.worker.index as usize];
        bump(&m.closed[reason as usize], 1);
        set_gauge(
            &m.connections,
            m.connections
                .load(std::sync::atomic::Ordering::Relaxed)
                .saturating_sub(1),
        );
        if conn.link.tls_handshaking() {
            // Counted, not logged: scanners and attackers fail TLS handshakes by the thousand.
            bump(&m.tls_handshake_failures, 1);
        }
        self.release_ip(conn.counted);
        if let (Some(grant), Some(auth)) = (&conn.grant, &shared.auth) {
            auth.release(grant);
        }
        tracing::debug!(worker = self.worker.index, slot, addr = %conn.addr, ?reason, "connection closed");
        conn.link.release(&mut self.pool);
        let shards = self.worker.to_swarms.len();
        let mut per_shard: Vec<Vec<(InfoHash, PeerId)>> = vec![Vec::new(); shards];
        let mut remote: Vec<(InstanceId, Vec<(InfoHash, PeerId)>)> = Vec::new();
        for (h, p) in conn.swarms.into_pairs() {
            match self.dest(&h) {
                Dest::Local(shard) => per_shard[shard].push((h, p)),
                Dest::Remote(owner) => match remote.iter_mut().find(|(o, _)| *o == owner) {
                    Some((_, peers)) => peers.push((h, p)),
                    None => remote.push((owner, vec![(h, p)])),
                },
            }
        }
        // At shutdown the goodbye on the bus purges every peer of this instance at once.
        for (owner, peers) in remote.into_iter().filter(|_| !shared.shutting_down()) {
            // A notice the bridge cannot take leaves the peers on their owner until the peer
            // timeout; counted there (`unsent_lane_full`).
            let _ = self.send_remote(owner, conn.id, Request::Closed { peers });
        }
        for (lanes, peers) in self.worker.to_swarms.iter().zip(per_shard) {
            if peers.is_empty() {
                continue;
            }
            // The request lane keeps the notice behind this connection's last requests and
            // wakes the worker; when full, the close lane, which never refuses (sending fails
            // only once the swarm worker has stopped, at shutdown).
            if let Err(e) = lanes
                .requests
                .try_send((conn.id, Request::Closed { peers }))
            {
                bump(&m.closes_overflowed, 1);
                let _ = lanes.closes.send(e.into_inner());
            }
        }
    }
}

/// Where a request for a swarm goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Dest {
    /// This instance's swarm worker with this index.
    Local(usize),
    /// The instance that owns the swarm's shard (clustered only).
    Remote(InstanceId),
}

impl EventLoop {
    /// The swarm worker, or the other instance, that owns `info_hash`.
    pub(super) fn dest(&self, info_hash: &InfoHash) -> Dest {
        if let Some(routes) = &self.routes {
            let owner = routes.get().owner(info_hash);
            if owner != routes.get().me() {
                return Dest::Remote(owner);
            }
        }
        Dest::Local(shard_of(info_hash, self.worker.to_swarms.len()))
    }

    /// Hands a request for another instance's shard to the bridge; false (counted) when its
    /// lane is full.
    pub(super) fn send_remote(&self, to: InstanceId, conn: ConnId, request: Request) -> bool {
        let Some(cluster) = &self.worker.cluster else {
            return false;
        };
        let sent = cluster
            .lane
            .try_send(Outbound::Request { to, conn, request })
            .is_ok();
        if !sent {
            cluster
                .counters
                .unsent_lane_full
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        sent
    }
}

/// Sets a gauge that only this thread writes.
fn set_gauge(gauge: &std::sync::atomic::AtomicU64, value: u64) {
    gauge.store(value, std::sync::atomic::Ordering::Relaxed);
}
