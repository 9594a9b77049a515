//! Starting and stopping the tracker: binds the shared port, loads TLS, spawns the socket and
//! swarm worker threads and wires the bounded channels between them.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use mio::{Poll, Waker};
use tidepool_protocol::tracker::{Action, ErrorResponse};

use crate::access::{
    AccessList, AccessListError, AccessListMode, AccessView, SharedAccessList, View,
};
use crate::auth::{KeyError, SharedAuth, Verifier};
use crate::channel::{Rx, Tx};
use crate::cluster::{Cluster, ClusterError, InstanceId, MemberTotals, Outbound, Routes};
use crate::config::{Config, ConfigError};
use crate::full_scrape::FullScrape;
use crate::liveness::LivenessTable;
use crate::metrics::{DropKind, Metrics, Rates, Totals, bump};
use crate::net::{SocketWorker, WAKER};
use crate::proxy::IpLimiter;
use crate::swarm::{ConnId, FrameKind, Liveness, Output, Request, Shard, ShardConfig};
use crate::tls::{CertStore, TlsError};

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
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The access list could not be loaded.
    #[error(transparent)]
    AccessList(#[from] AccessListError),
    /// The token keys or revocation list could not be loaded.
    #[error(transparent)]
    Auth(#[from] KeyError),
    /// The cluster bridge could not start.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// The process may not open as many descriptors as the config asks connections for.
    #[error(
        "network.max_connections_per_worker = {per_worker} with {workers} socket worker(s) needs \
         {needed} file descriptors, but this process may open only {limit} (hard limit): raise it \
         (systemd LimitNOFILE=, `ulimit -n`, see deploy/README.md) or lower the setting \
         (0 = as many as the limit allows)"
    )]
    Descriptors {
        /// The configured per-worker connection limit.
        per_worker: usize,
        /// Socket workers.
        workers: usize,
        /// Descriptors that limit needs, with the reserve.
        needed: u64,
        /// The hard limit.
        limit: u64,
    },
}

/// Descriptors kept for listeners, pollers, wakers, the metrics server, logs and reloads.
const RESERVED_DESCRIPTORS: u64 = 256;
/// Connections in all that the automatic limit stops at: a container whose descriptor limit is
/// "infinity" (2^30) must not size per-connection tables for a billion connections.
const AUTO_MAX_CONNECTIONS: u64 = 1 << 21;

/// Raises the descriptor limit to its hard maximum and resolves the per-worker connection
/// limit against it (0 = what it allows). Refuses a configured limit it cannot hold.
fn resolve_connection_limit(config: &mut Config) -> Result<(), StartError> {
    let limit = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(e) => {
            tracing::warn!("could not read or raise the descriptor limit: {e}");
            rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft)
        }
    };
    let workers = config.workers.socket_workers;
    let n = &mut config.network;
    let usable = limit
        .saturating_sub(RESERVED_DESCRIPTORS)
        .min(AUTO_MAX_CONNECTIONS);
    if n.max_connections_per_worker == 0 {
        n.max_connections_per_worker = (usable / workers as u64).max(1) as usize;
        tracing::info!(
            descriptors = limit,
            per_worker = n.max_connections_per_worker,
            "connection limit set from the descriptor limit"
        );
        return Ok(());
    }
    let needed = (n.max_connections_per_worker as u64)
        .saturating_mul(workers as u64)
        .saturating_add(RESERVED_DESCRIPTORS);
    if needed > limit {
        return Err(StartError::Descriptors {
            per_worker: n.max_connections_per_worker,
            workers,
            needed,
            limit,
        });
    }
    Ok(())
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> StartError {
    move |source| StartError::Io {
        what: what.into(),
        source,
    }
}

/// State every thread of one tracker reads.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) metrics: Metrics,
    pub(crate) access: SharedAccessList,
    /// Token verification, when `[auth]` has keys.
    pub(crate) auth: Option<SharedAuth>,
    pub(crate) ip_limiter: IpLimiter,
    /// When each connection was last heard from (for peer id takeover).
    pub(crate) liveness: LivenessTable,
    pub(crate) full_scrape: FullScrape,
    /// This process: random per boot, in every connection id (see [`crate::cluster`]).
    pub(crate) instance: InstanceId,
    /// The cluster bridge, when `[cluster]` is on (set once, right after the channels exist).
    pub(crate) cluster: OnceLock<Arc<Cluster>>,
    shutdown: AtomicBool,
}

/// How a socket worker reaches one swarm worker.
#[derive(Debug, Clone)]
pub(crate) struct SwarmLanes {
    /// Requests, bounded by count and bytes: a full inbox refuses with a failure reply.
    pub(crate) requests: Tx<(ConnId, Request)>,
    /// Close notices that found `requests` full: they must never be lost (lost ones would
    /// leave ghost peers owning their ids). Unbounded, but bounded by construction: one
    /// notice per closed connection per swarm worker, each naming at most
    /// `max_swarms_per_connection` peers (the peers it held, which exist anyway).
    pub(crate) closes: Sender<(ConnId, Request)>,
}

impl Shared {
    pub(crate) fn shutting_down(&self) -> bool {
        self.shutdown.load(Ordering::Relaxed)
    }

    /// Loads the access list file and swaps it in; the old list stays on error.
    fn reload_access_list(&self) -> Result<usize, AccessListError> {
        let c = &self.config.access_list;
        let (AccessListMode::Allow | AccessListMode::Deny, Some(path)) = (c.mode, &c.path) else {
            return Ok(0);
        };
        match AccessList::load(c.mode, path) {
            Ok(list) => {
                let n = list.len();
                self.access.replace(list);
                self.metrics
                    .access_list_entries
                    .store(n as u64, Ordering::Relaxed);
                self.metrics
                    .access_list_reloads
                    .fetch_add(1, Ordering::Relaxed);
                Ok(n)
            }
            Err(e) => {
                self.metrics
                    .access_list_reload_failures
                    .fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }
}

impl Shared {
    /// Loads the token keys and revocation list and swaps them in; the old ones stay on error.
    fn reload_auth(&self) -> Result<(), KeyError> {
        let (Some(auth), Some(keys)) = (&self.auth, &self.config.auth.keys) else {
            return Ok(());
        };
        let m = &self.metrics;
        let c = &self.config.auth;
        // Unchanged files are not swapped in: a swap makes every socket worker re-check its
        // connections.
        let contents = |p: &std::path::Path| std::fs::read(p).unwrap_or_default();
        let mut hasher = std::hash::DefaultHasher::new();
        std::hash::Hash::hash(&contents(keys), &mut hasher);
        std::hash::Hash::hash(&c.revoked.as_deref().map(contents), &mut hasher);
        let stamp = std::hash::Hasher::finish(&hasher);
        if auth.loaded.swap(stamp, Ordering::Relaxed) == stamp {
            return Ok(());
        }
        match Verifier::load(keys, c.revoked.as_deref(), c.leeway_secs) {
            Ok(v) => {
                m.auth_keys.store(v.key_count() as u64, Ordering::Relaxed);
                m.auth_revoked
                    .store(v.revoked_count() as u64, Ordering::Relaxed);
                m.auth_reloads.fetch_add(1, Ordering::Relaxed);
                auth.verifier.replace(v);
                Ok(())
            }
            Err(e) => {
                auth.loaded.store(0, Ordering::Relaxed);
                m.auth_reload_failures.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }
}

/// A running tracker. Dropping it without [`Tracker::shutdown`] leaves the threads running.
#[derive(Debug)]
pub struct Tracker {
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    certs: Option<Arc<CertStore>>,
    shared: Arc<Shared>,
    wakers: Vec<Arc<Waker>>,
    stop_control: Option<Sender<()>>,
    threads: Vec<JoinHandle<()>>,
    /// The runtime of the metrics endpoint and the cluster bridge, when either is on.
    runtime: Option<tokio::runtime::Runtime>,
    stop_stats: Option<tokio::sync::oneshot::Sender<()>>,
    /// The cluster's `cluster-out` thread: stopped after the workers, before the goodbye.
    cluster_out: Option<JoinHandle<()>>,
}

impl Tracker {
    /// Validates `config`, binds, and starts every worker.
    pub fn start(config: Config) -> Result<Tracker, StartError> {
        Self::start_inner(config, false)
    }

    /// Starts the same socket workers as [`Tracker::start`], but every text or binary message
    /// is echoed back instead of being handled as tracker protocol. For WebSocket conformance
    /// testing (Autobahn) of the connection code only; never for serving clients.
    #[doc(hidden)]
    pub fn start_echo(config: Config) -> Result<Tracker, StartError> {
        Self::start_inner(config, true)
    }

    fn start_inner(mut config: Config, echo: bool) -> Result<Tracker, StartError> {
        config.validate()?;
        resolve_connection_limit(&mut config)?;
        let certs = match (&config.network.tls_cert, &config.network.tls_key) {
            (Some(cert), Some(key)) => Some(CertStore::load(cert, key)?),
            _ => None,
        };
        let tls = certs.as_ref().map(CertStore::server_config).transpose()?;
        let listeners = bind_reuseport(config.network.listen, config.workers.socket_workers)?;
        let addr = listeners[0]
            .local_addr()
            .map_err(io_err("reading the bound address"))?;
        let metrics_listener = config
            .metrics
            .listen
            .map(|a| {
                std::net::TcpListener::bind(a).map_err(io_err(format!("binding metrics on {a}")))
            })
            .transpose()?;
        let metrics_addr = metrics_listener
            .as_ref()
            .map(|l| l.local_addr())
            .transpose()
            .map_err(io_err("reading the metrics address"))?;

        // Loaded by the first reload below.
        let auth = config
            .auth
            .keys
            .as_ref()
            .map(|_| SharedAuth::new(Verifier::default()));
        let shared = Arc::new(Shared {
            metrics: Metrics::new(config.workers.socket_workers, config.workers.swarm_workers),
            access: SharedAccessList::new(AccessList::default()),
            auth,
            ip_limiter: IpLimiter::new(config.network.max_connections_per_ip),
            liveness: LivenessTable::new(
                config.workers.socket_workers,
                config.network.max_connections_per_worker,
            ),
            full_scrape: FullScrape::new(
                config.workers.swarm_workers,
                Duration::from_secs(config.protocol.full_scrape_interval_secs),
                config.protocol.full_scrape_max_swarms,
            ),
            instance: InstanceId(fastrand::u64(1..)),
            cluster: OnceLock::new(),
            shutdown: AtomicBool::new(false),
            config,
        });
        shared.reload_access_list()?;
        shared.reload_auth()?;
        let config = &shared.config;
        let (cap, bytes) = (
            config.workers.channel_capacity,
            config.workers.channel_bytes,
        );

        let mut to_swarms = Vec::new();
        let mut swarm_rxs = Vec::new();
        for _ in 0..config.workers.swarm_workers {
            let (requests, requests_rx) = crate::channel::bounded(cap, bytes);
            let (closes, closes_rx) = crossbeam_channel::unbounded();
            to_swarms.push(SwarmLanes { requests, closes });
            swarm_rxs.push((requests_rx, closes_rx));
        }
        let (to_sockets, socket_rxs): (Vec<Tx<(ConnId, Output)>>, Vec<_>) =
            (0..config.workers.socket_workers)
                .map(|_| crate::channel::bounded(cap, bytes))
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
        // One small runtime for the metrics endpoint and the cluster bridge, only when either
        // is on: the workers never run on it.
        let runtime = if config.cluster.nats_url.is_some() || metrics_listener.is_some() {
            Some(
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .thread_name("tidepool-io")
                    .enable_all()
                    .build()
                    .map_err(io_err("starting the runtime for metrics and the cluster"))?,
            )
        } else {
            None
        };
        let mut cluster_out = None;
        if let (Some(url), Some(rt)) = (&config.cluster.nats_url, &runtime) {
            let name = config
                .cluster
                .name
                .clone()
                .unwrap_or_else(|| default_name(addr));
            let weak = Arc::downgrade(&shared);
            let totals = Box::new(move || {
                weak.upgrade()
                    .map_or_else(MemberTotals::default, |s| own_totals(&s))
            });
            let local = crate::cluster::Local {
                to_swarms: to_swarms.clone(),
                to_sockets: to_sockets.clone(),
                wakers: wakers.clone(),
            };
            let (cluster, sender) = Cluster::start(
                rt,
                shared.instance,
                &config.cluster,
                url,
                name,
                (cap, bytes),
                local,
                totals,
            )?;
            let _ = shared.cluster.set(cluster);
            cluster_out = Some(sender);
        }
        let cluster = shared.cluster.get().cloned();
        for (index, (rx, closes)) in swarm_rxs.into_iter().enumerate() {
            let worker = SwarmWorker {
                index,
                shard: Shard::new(
                    ShardConfig {
                        announce_interval: config.protocol.announce_interval_secs,
                        peer_timeout: Duration::from_secs(config.protocol.peer_timeout_secs),
                        max_offers: config.protocol.max_offers,
                        default_numwant: config.protocol.default_numwant,
                        takeover_grace: config.takeover_grace(),
                    },
                    fastrand::u64(..),
                ),
                access: AccessView::new(&shared.access),
                rx,
                closes,
                to_sockets: to_sockets.clone(),
                wakers: wakers.clone(),
                routes: cluster.as_ref().map(|c| View::new(&c.routes)),
                cluster: cluster.clone(),
                shared: shared.clone(),
            };
            threads.push(spawn(format!("swarm-{index}"), move || worker.run())?);
        }
        drop(to_sockets);

        for (index, ((poll, listener), rx)) in
            polls.into_iter().zip(listeners).zip(socket_rxs).enumerate()
        {
            let worker = SocketWorker {
                index: index as u16,
                shared: shared.clone(),
                poll,
                listener,
                tls: tls.clone(),
                to_swarms: to_swarms.clone(),
                from_swarms: rx,
                cluster: cluster.clone(),
                echo,
                _waker: wakers[index].clone(),
            };
            threads.push(spawn(format!("socket-{index}"), move || {
                if let Err(e) = worker.run() {
                    tracing::error!("socket worker {index} stopped: {e}");
                }
            })?);
        }

        let (stop_control, stop_rx) = crossbeam_channel::bounded(1);
        let control = shared.clone();
        threads.push(spawn("control".into(), move || {
            run_control(&control, &stop_rx)
        })?);
        let mut stop_stats = None;
        if let (Some(listener), Some(rt)) = (metrics_listener, &runtime) {
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            stop_stats = Some(tx);
            rt.spawn(crate::stats::serve(listener, shared.clone(), async move {
                let _ = rx.await;
            }));
        }

        Ok(Tracker {
            addr,
            metrics_addr,
            certs,
            shared,
            wakers,
            stop_control: Some(stop_control),
            threads,
            runtime,
            stop_stats,
            cluster_out,
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// This process's instance id: random per start, in every connection id, and its name
    /// on the cluster bus.
    pub fn instance(&self) -> u64 {
        self.shared.instance.0
    }

    /// Live cluster members as this instance sees them, itself included (1 when not
    /// clustered, or alone on the bus).
    pub fn cluster_size(&self) -> usize {
        self.shared
            .cluster
            .get()
            .map_or(1, |c| c.routes.current().member_count())
    }

    /// The address of `/metrics` and `/stats`, when enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The URL clients announce to.
    pub fn url(&self) -> String {
        let scheme = if self.certs.is_some() { "wss" } else { "ws" };
        format!("{scheme}://{}", self.addr)
    }

    /// Re-reads the access list file (what SIGUSR1 does). Swarms the new list refuses are
    /// emptied of their peers; connections stay open. On error the old list stays in force.
    /// Returns the number of info hashes loaded.
    pub fn reload_access_list(&self) -> Result<usize, AccessListError> {
        self.shared.reload_access_list()
    }

    /// Re-reads the token keys and revocation list (what SIGHUP does). New connections are
    /// checked against them, and open connections whose token they no longer admit (revoked,
    /// or its key removed) are closed with 1008. On error the old ones stay in force.
    pub fn reload_auth(&self) -> Result<(), KeyError> {
        self.shared.reload_auth()
    }

    /// Re-reads the certificate and key (what SIGHUP does). New handshakes use them; live
    /// connections are untouched. On error the old certificate stays in use.
    pub fn reload_tls(&self) -> Result<(), TlsError> {
        let Some(certs) = &self.certs else {
            return Ok(());
        };
        let m = &self.shared.metrics;
        match certs.reload() {
            Ok(()) => {
                m.tls_reloads.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                m.tls_reload_failures.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// Closes every connection with a close frame and stops all threads.
    pub fn shutdown(mut self) {
        self.shared.shutdown.store(true, Ordering::Relaxed);
        for waker in &self.wakers {
            let _ = waker.wake();
        }
        drop(self.stop_control.take());
        if let Some(stop) = self.stop_stats.take() {
            let _ = stop.send(());
        }
        for thread in self.threads {
            let _ = thread.join();
        }
        // In this order: the workers are done, so what they handed the bridge is published;
        // then the goodbye, after which nothing more is sent (the others refuse this
        // instance for a while, and purge its peers at once).
        if let Some(cluster) = self.shared.cluster.get() {
            cluster.stop_sending();
            if let Some(out) = self.cluster_out.take() {
                let _ = out.join();
            }
            cluster.leave();
        }
        if let Some(runtime) = self.runtime.take() {
            // On a thread of its own: the caller may be inside another runtime, where
            // dropping one panics.
            let _ =
                std::thread::spawn(move || runtime.shutdown_timeout(Duration::from_secs(1))).join();
        }
    }
}

/// `[cluster] name` when unset: the host name and the port.
fn default_name(addr: SocketAddr) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host = host.trim();
    format!(
        "{}:{}",
        if host.is_empty() { "tracker" } else { host },
        addr.port()
    )
}

/// What this instance tells the others when asked for its totals.
fn own_totals(shared: &Shared) -> MemberTotals {
    let t = shared.metrics.totals();
    MemberTotals {
        name: shared
            .cluster
            .get()
            .map(|c| c.name.clone())
            .unwrap_or_default(),
        connections: t.connections,
        swarms: t.swarms,
        seeders: t.seeders,
        leechers: t.leechers,
        shards_owned: shared
            .cluster
            .get()
            .map_or(0, |c| c.routes.current().owned() as u64),
    }
}

fn spawn(name: String, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, StartError> {
    std::thread::Builder::new()
        .name(name.clone())
        .spawn(f)
        .map_err(io_err(format!("spawning thread {name}")))
}

/// Timed chores: message rates for the stats page, and the access list and token key reload
/// intervals.
fn run_control(shared: &Shared, stop: &Receiver<()>) {
    let tick = Duration::from_millis(shared.config.metrics.stats_interval_ms);
    let reload_every = Duration::from_secs(shared.config.access_list.reload_interval_secs);
    let mut next_reload = Instant::now() + reload_every;
    let auth_every = Duration::from_secs(shared.config.auth.reload_interval_secs);
    let mut next_auth = Instant::now() + auth_every;
    // Samples over the last five seconds; rates are the slope across them.
    let mut samples: VecDeque<(Instant, Totals)> = VecDeque::new();
    samples.push_back((Instant::now(), shared.metrics.totals()));
    loop {
        match stop.recv_timeout(tick) {
            Err(RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        let now = Instant::now();
        samples.push_back((now, shared.metrics.totals()));
        while samples.len() > 2
            && samples
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) > Duration::from_secs(5))
        {
            samples.pop_front();
        }
        if let (Some((t0, a)), Some((t1, b))) = (samples.front(), samples.back()) {
            let dt = t1.duration_since(*t0).as_secs_f64();
            if dt > 0.0 {
                let rate = |x: u64, y: u64| y.saturating_sub(x) as f64 / dt;
                if let Ok(mut r) = shared.metrics.rates.lock() {
                    *r = Rates {
                        messages_in: rate(a.messages_in, b.messages_in),
                        messages_out: rate(a.messages_out, b.messages_out),
                        announces: rate(a.announces, b.announces),
                        offers: rate(a.offers, b.offers),
                    };
                }
            }
        }
        if !reload_every.is_zero() && now >= next_reload {
            next_reload = now + reload_every;
            if let Err(e) = shared.reload_access_list() {
                tracing::warn!("{e}; keeping the previous access list");
            }
        }
        if !auth_every.is_zero() && now >= next_auth {
            next_auth = now + auth_every;
            if let Err(e) = shared.reload_auth() {
                tracing::warn!("{e}; keeping the previous keys and revocation list");
            }
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

/// The I/O shell around one [`Shard`]: receives requests and close notices, delivers
/// outputs (counting what a full socket inbox refuses), cleans, enforces access list changes
/// and publishes its gauges and its part of the full-scrape snapshot.
struct SwarmWorker {
    index: usize,
    shard: Shard,
    access: AccessView,
    rx: Rx<(ConnId, Request)>,
    closes: Receiver<(ConnId, Request)>,
    to_sockets: Vec<Tx<(ConnId, Output)>>,
    wakers: Vec<Arc<Waker>>,
    /// The cluster bridge and this worker's view of the shard owners, when clustered.
    cluster: Option<Arc<Cluster>>,
    routes: Option<View<Routes>>,
    shared: Arc<Shared>,
}

/// Replies pushed to one socket worker between two wakes of it, within a batch.
const WAKE_EVERY: usize = 1024;
/// Requests handled per batch before the outputs are delivered.
const REQUESTS_PER_BATCH: usize = 1024;

impl SwarmWorker {
    fn run(mut self) {
        let shared = self.shared.clone();
        let m = &shared.metrics.swarms[self.index];
        let clean_interval = Duration::from_secs(shared.config.protocol.clean_interval_secs);
        let stats_interval = Duration::from_millis(shared.config.metrics.stats_interval_ms);
        let publish_top = shared.config.metrics.listen.is_some();
        let full_scrape = shared.config.protocol.full_scrape;
        let mut out = Vec::new();
        let mut unwoken = vec![0usize; self.to_sockets.len()];
        let mut next_clean = Instant::now() + clean_interval;
        let mut next_stats = Instant::now();
        let mut next_full_scrape = Instant::now();
        while !shared.shutting_down() {
            let wait = next_clean
                .min(next_stats)
                .saturating_duration_since(Instant::now())
                // Close notices on the overflow lane wake nobody: look at least this often.
                .min(Duration::from_millis(100));
            // One blocking receiver: waiting on two channels at once (select) cost a futex
            // wake per request. Close notices come on the request lane too; only when it is
            // full do they take the close lane, and then this worker is busy and drains that
            // lane on its next turn.
            let first = match self.rx.recv_timeout(wait) {
                Ok(request) => Some(request),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            // After the wait, so requests that arrive after a reload meet the new list.
            if self.access.refresh(&shared.access) {
                let list = self.access.get();
                let purged = self.shard.retain_swarms(|h| list.allows(h));
                bump(&m.peers_purged, purged as u64);
            }
            if let (Some(routes), Some(cluster)) = (&mut self.routes, &self.cluster)
                && routes.refresh(&cluster.routes)
            {
                // Shards that moved to another instance leave with their peers (the new
                // owner fills from re-announces), and so do the peers of members that died.
                let r = routes.get();
                let mut purged = self.shard.retain_swarms(|h| r.owns(h));
                purged += self.shard.remove_peers_of(|c| !r.is_member(c.instance));
                bump(&m.peers_purged, purged as u64);
            }
            let now = Instant::now();
            let clustered;
            let liveness: &dyn Liveness = match &self.routes {
                Some(routes) => {
                    clustered = ClusterLiveness {
                        local: &shared.liveness,
                        routes: routes.get(),
                    };
                    &clustered
                }
                None => &shared.liveness,
            };
            // Close notices that overflowed first: they are few, and an announce that
            // overtook its connection's close is ignored by the shard (the connection reads
            // as closed in the liveness table).
            let (mut handled, mut closes) = (0u64, 0u64);
            let mut count = |request: &Request| match request {
                Request::Closed { .. } => closes += 1,
                _ => handled += 1,
            };
            // At most a batch per turn, so a mass close cannot hold off requests.
            let mut overflowed = 0;
            while overflowed < REQUESTS_PER_BATCH
                && let Ok((conn, notice)) = self.closes.try_recv()
            {
                overflowed += 1;
                count(&notice);
                self.shard.handle(now, conn, notice, liveness, &mut out);
            }
            m.close_lane_depth
                .store(self.closes.len() as u64, Ordering::Relaxed);
            if let Some(first) = first {
                m.inbox_depth.store(self.rx.len() as u64, Ordering::Relaxed);
                m.inbox_bytes
                    .store(self.rx.bytes() as u64, Ordering::Relaxed);
                let mut next = Some(first);
                let mut taken = 0;
                while let Some((conn, request)) = next.take() {
                    count(&request);
                    handle(
                        &mut self.shard,
                        &self.access,
                        now,
                        conn,
                        request,
                        liveness,
                        &mut out,
                    );
                    taken += 1;
                    if taken < REQUESTS_PER_BATCH {
                        next = self.rx.try_recv().ok();
                    }
                }
            }
            bump(&m.requests, handled);
            bump(&m.closes, closes);
            let now = Instant::now();
            if now >= next_clean {
                self.shard.clean(now);
                if let Some(routes) = &self.routes {
                    // Swarms created here by requests sent under an older view of the owners.
                    let r = routes.get();
                    let purged = self.shard.retain_swarms(|h| r.owns(h));
                    bump(&m.peers_purged, purged as u64);
                }
                next_clean = now + clean_interval;
            }
            if now >= next_stats {
                let (swarms, seeders, leechers) = self.shard.totals();
                m.swarms.store(swarms, Ordering::Relaxed);
                m.seeders.store(seeders, Ordering::Relaxed);
                m.leechers.store(leechers, Ordering::Relaxed);
                let c = self.shard.counters();
                m.takeovers.store(c.takeovers, Ordering::Relaxed);
                m.replaced.store(c.replaced, Ordering::Relaxed);
                m.timed_out.store(c.timed_out, Ordering::Relaxed);
                if publish_top && let Ok(mut top) = m.top.lock() {
                    *top = self.shard.top_swarms(shared.config.metrics.top_swarms);
                }
                next_stats = now + stats_interval;
            }
            if full_scrape && now >= next_full_scrape {
                let part = self.shard.top_swarms(shared.full_scrape.max_swarms());
                shared.full_scrape.publish(self.index, part);
                next_full_scrape = now + shared.full_scrape.interval() / 2;
            }
            for (conn, output) in out.drain(..) {
                if let Some(cluster) = &self.cluster
                    && conn.instance != shared.instance.0
                {
                    // For a connection on another instance: through the bridge.
                    if cluster
                        .lane
                        .try_send(Outbound::Output { conn, output })
                        .is_err()
                    {
                        cluster
                            .counters
                            .unsent_lane_full
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    continue;
                }
                let w = conn.worker as usize;
                let kind = drop_kind(&output);
                // Never block on a socket worker (it may be blocked on us): a full inbox
                // drops the reply, counted; the client sees a lost offer or a scrape timeout.
                match self.to_sockets[w].try_send((conn, output)) {
                    Ok(()) => {
                        unwoken[w] += 1;
                        // A large batch wakes its socket worker every WAKE_EVERY replies, so
                        // it drains while the rest is pushed instead of overflowing asleep.
                        if unwoken[w] >= WAKE_EVERY {
                            unwoken[w] = 0;
                            let _ = self.wakers[w].wake();
                        }
                    }
                    Err(_) => bump(&m.dropped[kind as usize], 1),
                }
            }
            // And once the batch is out, for whatever came after the last wake.
            for (w, pending) in unwoken.iter_mut().enumerate() {
                if std::mem::take(pending) > 0 {
                    let _ = self.wakers[w].wake();
                }
            }
        }
    }
}

/// Liveness in a cluster: a local connection as the socket workers report it; one on another
/// instance counts as live while that instance is a member (its close notice removes its
/// peers) and as closed once it is not. So a peer owned through another instance cannot be
/// taken over by silence, only freed by its close or its instance's death.
struct ClusterLiveness<'a> {
    local: &'a LivenessTable,
    routes: &'a Routes,
}

impl Liveness for ClusterLiveness<'_> {
    fn quiet_for(&self, conn: ConnId, now: Instant) -> Duration {
        if conn.instance == self.routes.me().0 {
            self.local.quiet_for(conn, now)
        } else if self.routes.is_member(conn.instance) {
            Duration::ZERO
        } else {
            Duration::MAX
        }
    }
}

fn drop_kind(output: &Output) -> DropKind {
    match output {
        Output::Frame(FrameKind::AnnounceResponse, _) => DropKind::AnnounceResponse,
        Output::Frame(FrameKind::Offer, _) => DropKind::Offer,
        Output::Frame(FrameKind::Answer, _) => DropKind::Answer,
        Output::Frame(FrameKind::Error | FrameKind::Denied, _) => DropKind::Error,
        Output::ScrapePart { .. } => DropKind::ScrapePart,
    }
}

/// Hands a request to the shard, refusing announces into swarms the access list denies. The
/// socket workers check too; this closes the race with a reload in between.
fn handle(
    shard: &mut Shard,
    access: &AccessView,
    now: Instant,
    conn: ConnId,
    request: Request,
    liveness: &dyn Liveness,
    out: &mut Vec<(ConnId, Output)>,
) {
    if let Request::Announce(a) = &request
        && !access.get().allows(&a.info_hash)
    {
        let mut frame = Vec::new();
        ErrorResponse {
            failure_reason: "info_hash is not allowed on this tracker".into(),
            action: Some(Action::Announce),
            info_hash: Some(a.info_hash),
        }
        .encode(&mut frame);
        out.push((conn, Output::Frame(FrameKind::Denied, frame)));
        return;
    }
    shard.handle(now, conn, request, liveness, out);
}
