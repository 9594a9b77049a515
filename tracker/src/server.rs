//! Starting and stopping the tracker: binds the shared port, loads TLS, spawns the socket and
//! swarm worker threads and wires the bounded channels between them.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use mio::{Poll, Waker};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{Config, ConfigError};
use crate::net::{SocketWorker, WAKER};
use crate::swarm::{ConnId, Output, Request, Shard, ShardConfig};

/// Why the tracker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The config is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Binding, polling or spawning failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: io::Error,
    },
    /// The certificate or key could not be loaded.
    #[error("TLS: {0}")]
    Tls(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> StartError {
    move |source| StartError::Io {
        what: what.into(),
        source,
    }
}

/// A running tracker. Dropping it without [`Tracker::shutdown`] leaves the threads running.
#[derive(Debug)]
pub struct Tracker {
    addr: SocketAddr,
    tls: bool,
    shutdown: Arc<AtomicBool>,
    wakers: Vec<Arc<Waker>>,
    threads: Vec<JoinHandle<()>>,
}

impl Tracker {
    /// Validates `config`, binds, and starts every worker.
    pub fn start(config: Config) -> Result<Tracker, StartError> {
        config.validate()?;
        let config = Arc::new(config);
        let tls = match (&config.network.tls_cert, &config.network.tls_key) {
            (Some(cert), Some(key)) => Some(load_tls(cert, key)?),
            _ => None,
        };
        let listeners = bind_reuseport(config.network.listen, config.workers.socket_workers)?;
        let addr = listeners[0]
            .local_addr()
            .map_err(io_err("reading the bound address"))?;
        let shutdown = Arc::new(AtomicBool::new(false));
        let cap = config.workers.channel_capacity;

        let (to_swarms, swarm_rxs): (Vec<Sender<(ConnId, Request)>>, Vec<_>) =
            (0..config.workers.swarm_workers)
                .map(|_| crossbeam_channel::bounded(cap))
                .unzip();
        let (to_sockets, socket_rxs): (Vec<Sender<(ConnId, Output)>>, Vec<_>) =
            (0..config.workers.socket_workers)
                .map(|_| crossbeam_channel::bounded(cap))
                .unzip();

        let mut polls = Vec::new();
        let mut wakers = Vec::new();
        for _ in 0..config.workers.socket_workers {
            let poll = Poll::new().map_err(io_err("creating an event loop"))?;
            let waker =
                Arc::new(Waker::new(poll.registry(), WAKER).map_err(io_err("creating a waker"))?);
            polls.push(poll);
            wakers.push(waker);
        }

        let mut threads = Vec::new();
        for (index, rx) in swarm_rxs.into_iter().enumerate() {
            let worker = SwarmWorker {
                shard: Shard::new(
                    ShardConfig {
                        announce_interval: config.protocol.announce_interval_secs,
                        peer_timeout: Duration::from_secs(config.protocol.peer_timeout_secs),
                        max_offers: config.protocol.max_offers,
                        default_numwant: config.protocol.default_numwant,
                    },
                    fastrand::u64(..),
                ),
                clean_interval: Duration::from_secs(config.protocol.clean_interval_secs),
                rx,
                to_sockets: to_sockets.clone(),
                wakers: wakers.clone(),
                shutdown: shutdown.clone(),
            };
            threads.push(
                std::thread::Builder::new()
                    .name(format!("swarm-{index}"))
                    .spawn(move || worker.run())
                    .map_err(io_err("spawning a swarm worker"))?,
            );
        }
        drop(to_sockets);

        for (index, ((poll, listener), rx)) in
            polls.into_iter().zip(listeners).zip(socket_rxs).enumerate()
        {
            let worker = SocketWorker {
                index: index as u16,
                config: config.clone(),
                poll,
                listener,
                tls: tls.clone(),
                to_swarms: to_swarms.clone(),
                from_swarms: rx,
                shutdown: shutdown.clone(),
                _waker: wakers[index].clone(),
            };
            threads.push(
                std::thread::Builder::new()
                    .name(format!("socket-{index}"))
                    .spawn(move || {
                        if let Err(e) = worker.run() {
                            tracing::error!("socket worker {index} stopped: {e}");
                        }
                    })
                    .map_err(io_err("spawning a socket worker"))?,
            );
        }

        Ok(Tracker {
            addr,
            tls: tls.is_some(),
            shutdown,
            wakers,
            threads,
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URL clients announce to.
    pub fn url(&self) -> String {
        format!("{}://{}", if self.tls { "wss" } else { "ws" }, self.addr)
    }

    /// Closes every connection with a close frame and stops all threads.
    pub fn shutdown(self) {
        self.shutdown.store(true, Ordering::Relaxed);
        for waker in &self.wakers {
            let _ = waker.wake();
        }
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

/// One listener per socket worker on the same port, the kernel spreading connections.
fn bind_reuseport(addr: SocketAddr, n: usize) -> Result<Vec<mio::net::TcpListener>, StartError> {
    use socket2::{Domain, Socket, Type};
    let mut listeners = Vec::with_capacity(n);
    let mut bound = addr;
    for _ in 0..n {
        let socket = Socket::new(Domain::for_address(bound), Type::STREAM, None)
            .map_err(io_err("creating a socket"))?;
        socket
            .set_reuse_address(true)
            .and_then(|()| socket.set_reuse_port(true))
            .and_then(|()| socket.set_nonblocking(true))
            .map_err(io_err("setting socket options"))?;
        socket
            .bind(&bound.into())
            .map_err(io_err(format!("binding {bound}")))?;
        socket.listen(1024).map_err(io_err("listening"))?;
        let std: std::net::TcpListener = socket.into();
        // With port 0 the first bind picks the port; the rest join it.
        bound = std
            .local_addr()
            .map_err(io_err("reading the bound address"))?;
        listeners.push(mio::net::TcpListener::from_std(std));
    }
    Ok(listeners)
}

fn load_tls(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, StartError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| StartError::Tls(format!("reading {}: {e}", cert.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| StartError::Tls(format!("parsing {}: {e}", cert.display())))?;
    if certs.is_empty() {
        return Err(StartError::Tls(format!(
            "no certificate in {}",
            cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| StartError::Tls(format!("reading key {}: {e}", key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StartError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| StartError::Tls(e.to_string()))?;
    Ok(Arc::new(config))
}

/// The I/O shell around one [`Shard`]: receives requests, delivers outputs, cleans.
struct SwarmWorker {
    shard: Shard,
    clean_interval: Duration,
    rx: Receiver<(ConnId, Request)>,
    to_sockets: Vec<Sender<(ConnId, Output)>>,
    wakers: Vec<Arc<Waker>>,
    shutdown: Arc<AtomicBool>,
}

impl SwarmWorker {
    fn run(mut self) {
        let mut out = Vec::new();
        let mut wake = vec![false; self.to_sockets.len()];
        let mut next_clean = Instant::now() + self.clean_interval;
        while !self.shutdown.load(Ordering::Relaxed) {
            let wait = next_clean
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(500));
            match self.rx.recv_timeout(wait) {
                Ok((conn, request)) => {
                    let now = Instant::now();
                    self.shard.handle(now, conn, request, &mut out);
                    // Drain what else is queued before delivering, so wakes are batched.
                    for (conn, request) in self.rx.try_iter().take(1024) {
                        self.shard.handle(now, conn, request, &mut out);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            let now = Instant::now();
            if now >= next_clean {
                self.shard.clean(now);
                next_clean = now + self.clean_interval;
            }
            for (conn, output) in out.drain(..) {
                let w = conn.worker as usize;
                // Never block on a socket worker (it may be blocked on us): a full channel
                // drops the message, which the client sees as a lost offer.
                if self.to_sockets[w].try_send((conn, output)).is_ok() {
                    wake[w] = true;
                }
            }
            for (w, flag) in wake.iter_mut().enumerate() {
                if std::mem::take(flag) {
                    let _ = self.wakers[w].wake();
                }
            }
        }
    }
}
