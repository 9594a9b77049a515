//! The pool's async driver: node events become engine inputs, engine outputs become sends
//! (per-neighbour outboxes and their sender tasks), disk jobs and application events.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Instant;

use tidepool_protocol::PeerId;
use tidepool_protocol::pool::{FileId, PoolLimits, PoolMessage};
use tokio::sync::{mpsc, oneshot, watch};

use super::engine::{DiskDone, Input, Output, PoolEngine};
use super::{Command, Download, PoolError, Progress, Shared, disk};
use crate::{Channel, Event};

/// One neighbour's outboxes: control messages (ordered, bounded in bytes) and chunks
/// (bounded by the engine's `send_window`).
pub(super) struct Outbox {
    control: mpsc::UnboundedSender<Vec<u8>>,
    control_bytes: Arc<AtomicUsize>,
    chunks: mpsc::UnboundedSender<(Vec<u8>, u64)>,
}

/// A download the application waits on.
pub(super) struct Waiting {
    progress: Option<watch::Sender<Progress>>,
    replies: Vec<oneshot::Sender<Download>>,
    done: Vec<oneshot::Sender<Result<PathBuf, PoolError>>>,
}

pub(super) struct Driver {
    shared: Arc<Shared>,
    engine: PoolEngine,
    limits: PoolLimits,
    disk: std::sync::mpsc::Sender<disk::DiskMsg>,
    outboxes: HashMap<PeerId, Outbox>,
    downloads: HashMap<FileId, Waiting>,
    targets: HashMap<FileId, PathBuf>,
    /// Sessions opened by a message that overtook its connection's hello.
    fresh: std::collections::HashSet<PeerId>,
    /// Messages from peers whose connection the node has not confirmed yet.
    early: HashMap<PeerId, Vec<(Channel, bytes::Bytes)>>,
    /// Chunk sends that finished: (peer, whether the channel took it).
    sent: (
        mpsc::UnboundedSender<SentChunk>,
        mpsc::UnboundedReceiver<SentChunk>,
    ),
}

/// Messages kept per peer whose connection is not confirmed yet, and such peers at once.
const EARLY_PER_PEER: usize = 64;
const EARLY_PEERS: usize = 16;

/// A chunk send that finished: to whom, in which of its sessions, and whether the channel
/// took it.
pub(super) type SentChunk = (PeerId, u64, bool);

/// Inputs taken from a ready queue before the outputs are drained, so a burst of chunks
/// makes one round of requests rather than one per chunk.
const BATCH: usize = 64;

impl Driver {
    pub(super) fn new(
        shared: Arc<Shared>,
        engine: PoolEngine,
        limits: PoolLimits,
        disk: std::sync::mpsc::Sender<disk::DiskMsg>,
    ) -> Self {
        Self {
            shared,
            engine,
            limits,
            disk,
            outboxes: HashMap::new(),
            downloads: HashMap::new(),
            targets: HashMap::new(),
            fresh: Default::default(),
            early: HashMap::new(),
            sent: mpsc::unbounded_channel(),
        }
    }

    pub(super) async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<Command>,
        mut disk_done: mpsc::UnboundedReceiver<DiskDone>,
    ) {
        loop {
            let deadline = tokio::time::Instant::from_std(self.engine.poll_timeout());
            tokio::select! {
                Some(d) = disk_done.recv() => {
                    self.engine.handle(Instant::now(), Input::Disk(d));
                    for _ in 0..BATCH {
                        let Ok(d) = disk_done.try_recv() else { break };
                        self.engine.handle(Instant::now(), Input::Disk(d));
                    }
                }
                Some((peer, session, ok)) = self.sent.1.recv() => {
                    self.engine.handle(Instant::now(), Input::Sent { peer, session, ok });
                    for _ in 0..BATCH {
                        let Ok((peer, session, ok)) = self.sent.1.try_recv() else { break };
                        self.engine.handle(Instant::now(), Input::Sent { peer, session, ok });
                    }
                }
                Some(cmd) = commands.recv() => self.command(cmd),
                event = self.shared.node.next_event() => match event {
                    Some(e) => self.event(e),
                    None => return,
                },
                _ = tokio::time::sleep_until(deadline) => self.engine.handle_timeout(Instant::now()),
            }
            self.drain();
        }
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Share(meta) => self.engine.handle(
                Instant::now(),
                Input::Share {
                    meta,
                    super_seed: self.shared.config.super_seed,
                },
            ),
            Command::Get {
                file_id,
                target,
                reply,
            } => {
                let _ = self
                    .disk
                    .send(disk::DiskMsg::Target(file_id, target.clone()));
                // A second get of the same file keeps the first target: the download is
                // already written there.
                self.targets.entry(file_id).or_insert(target);
                let w = self.downloads.entry(file_id).or_insert_with(|| Waiting {
                    progress: None,
                    replies: Vec::new(),
                    done: Vec::new(),
                });
                match &w.progress {
                    // Already running: another handle on it.
                    Some(p) => {
                        let (done_tx, done_rx) = oneshot::channel();
                        w.done.push(done_tx);
                        let _ = reply.send(Download {
                            progress: p.subscribe(),
                            done: done_rx,
                        });
                    }
                    None => w.replies.push(reply),
                }
                self.engine.handle(Instant::now(), Input::Get(file_id));
            }
        }
    }

    fn event(&mut self, event: Event) {
        let now = Instant::now();
        match event {
            Event::PeerConnected { peer } => {
                // A new connection to a peer already here replaced the old one: a new
                // session, with nothing carried over from the old (unless the session was
                // opened just now by a message that overtook this hello).
                if self.outboxes.contains_key(&peer) {
                    if self.fresh.remove(&peer) {
                        return;
                    }
                    self.engine.handle(now, Input::PeerDown(peer));
                }
                self.open_outbox(peer);
                self.engine.handle(now, Input::PeerUp(peer));
                for (channel, data) in self.early.remove(&peer).unwrap_or_default() {
                    self.message(now, peer, channel, data);
                }
            }
            Event::PeerDisconnected { peer, .. } => {
                // A replaced connection's goodbye can come after its successor's hello.
                if self.shared.node.connected_peers().contains(&peer) {
                    return;
                }
                self.outboxes.remove(&peer);
                self.fresh.remove(&peer);
                self.early.remove(&peer);
                self.engine.handle(now, Input::PeerDown(peer));
            }
            Event::Message {
                peer,
                channel,
                data,
                ..
            } => {
                // A message can overtake its connection's hello (the node confirms a channel
                // open on its first frame): a peer the node holds as connected is one.
                if !self.outboxes.contains_key(&peer) {
                    if self.shared.node.connected_peers().contains(&peer) {
                        self.open_outbox(peer);
                        self.fresh.insert(peer);
                        self.engine.handle(now, Input::PeerUp(peer));
                    } else {
                        // Not confirmed yet: kept (a few) until its hello comes.
                        self.early(peer, channel, data);
                        return;
                    }
                }
                self.message(now, peer, channel, data);
            }
            Event::Receipt { .. } | Event::Tracker(_) => {}
        }
    }

    fn message(&mut self, now: Instant, peer: PeerId, channel: Channel, data: bytes::Bytes) {
        let input = match PoolMessage::decode(&data, &self.limits) {
            Ok(msg) => Input::Message { peer, channel, msg },
            Err(e) => Input::Undecodable {
                peer,
                error: e.to_string(),
            },
        };
        self.engine.handle(now, input);
    }

    /// Keeps a message from a peer whose connection the node has not confirmed yet, to feed
    /// it in when it is (`EARLY_PER_PEER` per peer, `EARLY_PEERS` peers; past that it is
    /// dropped, and the engine counts it as from a stranger).
    fn early(&mut self, peer: PeerId, channel: Channel, data: bytes::Bytes) {
        let room = self.early.len() < EARLY_PEERS || self.early.contains_key(&peer);
        let list = if room {
            Some(self.early.entry(peer).or_default())
        } else {
            None
        };
        match list {
            Some(l) if l.len() < EARLY_PER_PEER => l.push((channel, data)),
            _ => {
                // Fed as it is: the engine ignores (and counts) a stranger's message.
                if let Ok(msg) = PoolMessage::decode(&data, &self.limits) {
                    self.engine
                        .handle(Instant::now(), Input::Message { peer, channel, msg });
                }
            }
        }
    }

    /// Starts a neighbour's two sender tasks. Each ends when its outbox is dropped.
    fn open_outbox(&mut self, peer: PeerId) {
        let (control, mut control_rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let (chunks, mut chunks_rx) = mpsc::unbounded_channel::<(Vec<u8>, u64)>();
        let control_bytes = Arc::new(AtomicUsize::new(0));
        let (shared, bytes) = (self.shared.clone(), control_bytes.clone());
        tokio::spawn(async move {
            while let Some(buf) = control_rx.recv().await {
                let sent = shared.node.send(peer, Channel::Control, &buf).await;
                bytes.fetch_sub(buf.len(), Relaxed);
                if let Err(e) = sent {
                    tracing::debug!(?peer, "control message not sent: {e}");
                }
            }
        });
        let (shared, sent) = (self.shared.clone(), self.sent.0.clone());
        tokio::spawn(async move {
            while let Some((frame, session)) = chunks_rx.recv().await {
                let ok = shared
                    .node
                    .send(peer, Channel::Chunks, &frame)
                    .await
                    .is_ok();
                // Every chunk handed over gets its credit back, sent or not.
                if sent.send((peer, session, ok)).is_err() {
                    return;
                }
            }
        });
        self.outboxes.insert(
            peer,
            Outbox {
                control,
                control_bytes,
                chunks,
            },
        );
    }

    /// Carries out everything the engine wants done, until it wants nothing more.
    fn drain(&mut self) {
        loop {
            let dropped = self.drain_once();
            if dropped.is_empty() {
                break;
            }
            for peer in dropped {
                if self.outboxes.remove(&peer).is_some() {
                    tracing::warn!(
                        ?peer,
                        "dropping peer: its control outbox is full (it stopped reading)"
                    );
                    self.shared.slow_readers.fetch_add(1, Relaxed);
                    self.shared
                        .node
                        .disconnect(peer, "control outbox full: not reading");
                    self.engine.handle(Instant::now(), Input::PeerDown(peer));
                }
            }
        }
        *self.shared.stats.lock().unwrap_or_else(|p| p.into_inner()) = self.engine.stats();
    }

    /// One pass over the engine's outputs; returns the neighbours whose control outbox
    /// overflowed with messages they are owed.
    fn drain_once(&mut self) -> Vec<PeerId> {
        let mut dropped = Vec::new();
        let mut buf = Vec::new();
        let limit = self.shared.config.control_outbox_bytes;
        while let Some(o) = self.engine.poll_output() {
            match o {
                Output::Send {
                    peer,
                    msg,
                    sheddable,
                } => {
                    let Some(ob) = self.outboxes.get(&peer) else {
                        continue;
                    };
                    buf.clear();
                    msg.encode(&mut buf);
                    let queued = ob.control_bytes.load(Relaxed) + buf.len();
                    // Gossip is repeated anyway: it gives way before the outbox is half
                    // full, so only a neighbour that stopped reading what it is owed is
                    // ever dropped.
                    if sheddable && queued > limit / 2 {
                        self.shared.gossip_shed.fetch_add(1, Relaxed);
                        continue;
                    }
                    if queued > limit {
                        dropped.push(peer);
                        continue;
                    }
                    ob.control_bytes.fetch_add(buf.len(), Relaxed);
                    let _ = ob.control.send(std::mem::take(&mut buf));
                }
                Output::SendChunk {
                    peer,
                    session,
                    file_id,
                    request_id,
                    index,
                    chunk,
                    ..
                } => {
                    let mut frame =
                        Vec::with_capacity(chunk.data.len() + 64 + 32 * chunk.proof.len());
                    PoolMessage::Chunk {
                        file_id,
                        request_id,
                        index,
                        proof: chunk.proof,
                        data: chunk.data,
                    }
                    .encode(&mut frame);
                    let handed = self
                        .outboxes
                        .get(&peer)
                        .is_some_and(|ob| ob.chunks.send((frame, session)).is_ok());
                    if !handed {
                        // Gone meanwhile: the credit comes back at once.
                        let _ = self.sent.0.send((peer, session, false));
                    }
                }
                Output::Disk(job) => {
                    if self.disk.send(disk::DiskMsg::Job(job)).is_err() {
                        tracing::warn!("disk thread gone; a disk job was not run");
                    }
                }
                Output::Disconnect { peer, reason } => {
                    self.outboxes.remove(&peer);
                    self.shared.node.disconnect(peer, reason);
                }
                Output::Progress { file_id, progress } => self.progress(file_id, progress),
                Output::Finished { file_id, result } => self.finished(file_id, result),
            }
        }
        dropped
    }

    fn progress(&mut self, file_id: FileId, progress: Progress) {
        let Some(w) = self.downloads.get_mut(&file_id) else {
            return;
        };
        match &w.progress {
            Some(p) => {
                p.send_replace(progress);
            }
            None => {
                let (tx, _) = watch::channel(progress);
                for reply in w.replies.drain(..) {
                    let (done_tx, done_rx) = oneshot::channel();
                    w.done.push(done_tx);
                    let _ = reply.send(Download {
                        progress: tx.subscribe(),
                        done: done_rx,
                    });
                }
                w.progress = Some(tx);
            }
        }
    }

    fn finished(&mut self, file_id: FileId, result: Result<(), String>) {
        let Some(mut w) = self.downloads.remove(&file_id) else {
            return;
        };
        let target = self.targets.remove(&file_id).unwrap_or_default();
        // A download that never started (it could not open) still answers its callers.
        let (tx, _) = watch::channel(Progress::default());
        for reply in w.replies.drain(..) {
            let (done_tx, done_rx) = oneshot::channel();
            w.done.push(done_tx);
            let _ = reply.send(Download {
                progress: w.progress.as_ref().unwrap_or(&tx).subscribe(),
                done: done_rx,
            });
        }
        for done in w.done {
            let _ = done.send(match &result {
                Ok(()) => Ok(target.clone()),
                Err(e) => Err(PoolError::Failed(e.clone())),
            });
        }
    }
}
