//! The async runtime handed to `webrtc`: Tokio's, except that every UDP socket it wraps first
//! gets large kernel buffers. With the default ~208 KiB the kernel drops datagrams under a
//! data-channel burst and SCTP spends its time in loss recovery (DESIGN §6: 36 vs 244 MiB/s).
//! Also reads the kernel's UDP receive-buffer drop counter, so the drops can be reported.
//!
//! For tests and benchmarks only, it can impair every datagram its sockets send — a delay,
//! jitter, random loss and outages (`TIDEPOOL_IMPAIR=delay_ms=25,jitter_ms=2,loss=0.01`): this
//! kernel has no `netem`, and loopback has neither delay nor loss, unlike any network a user has.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use webrtc::runtime::{
    AsyncInterval, AsyncTcpListener, AsyncTcpStream, AsyncUdpSocket, JoinHandle, RecvMeta, Runtime,
    TokioRuntime, Transmit,
};

/// Tokio plus buffer sizing for UDP sockets.
#[derive(Debug)]
pub struct BufferedRuntime {
    inner: TokioRuntime,
    buffer: usize,
    /// The smallest receive buffer the kernel actually granted (it may cap the request at
    /// `net.core.rmem_max`); `u64::MAX` until a socket is wrapped.
    granted: AtomicU64,
    /// What every send goes through, when impaired (tests and benchmarks only).
    impairment: Option<Impairment>,
    /// Outages are timed from here.
    created: Instant,
}

impl BufferedRuntime {
    /// Sockets will ask for `buffer` bytes of SO_RCVBUF and SO_SNDBUF. When the environment
    /// sets `TIDEPOOL_IMPAIR` (see [`Impairment::parse`]), their sends are impaired.
    pub fn new(buffer: usize) -> Self {
        let impairment =
            std::env::var("TIDEPOOL_IMPAIR")
                .ok()
                .and_then(|spec| match Impairment::parse(&spec) {
                    Ok(i) => Some(i),
                    Err(e) => {
                        tracing::warn!("ignoring TIDEPOOL_IMPAIR={spec:?}: {e}");
                        None
                    }
                });
        if let Some(i) = &impairment {
            tracing::warn!(
                ?i,
                "UDP sends are impaired (TIDEPOOL_IMPAIR): for tests only"
            );
        }
        Self {
            inner: TokioRuntime,
            buffer,
            granted: AtomicU64::new(u64::MAX),
            impairment,
            created: Instant::now(),
        }
    }

    /// The same, with sends impaired as given (tests and benchmarks).
    pub fn impaired(buffer: usize, impairment: Impairment) -> Self {
        tracing::warn!(?impairment, "UDP sends are impaired: for tests only");
        Self {
            impairment: Some(impairment),
            ..Self::new(buffer)
        }
    }

    /// The receive buffer the kernel granted (Linux reports twice the requested size, its
    /// bookkeeping included), or `None` before the first socket.
    pub fn granted_buffer(&self) -> Option<u64> {
        match self.granted.load(Ordering::Relaxed) {
            u64::MAX => None,
            n => Some(n),
        }
    }
}

impl Runtime for BufferedRuntime {
    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) -> Box<dyn JoinHandle> {
        self.inner.spawn(future)
    }

    fn spawn_reactor(
        &self,
        pool: usize,
        future: Pin<Box<dyn Future<Output = ()> + Send>>,
    ) -> Box<dyn JoinHandle> {
        self.inner.spawn_reactor(pool, future)
    }

    fn wrap_udp_socket(&self, socket: std::net::UdpSocket) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        let s = socket2::SockRef::from(&socket);
        // Best effort: a capped buffer still works, only slower; the granted size is reported.
        let _ = s.set_recv_buffer_size(self.buffer);
        let _ = s.set_send_buffer_size(self.buffer);
        if let Ok(n) = s.recv_buffer_size() {
            self.granted.fetch_min(n as u64, Ordering::Relaxed);
            if n < self.buffer {
                tracing::warn!(
                    requested = self.buffer,
                    granted = n,
                    "UDP receive buffer capped by the kernel; raise net.core.rmem_max"
                );
            }
        }
        let wrapped = self.inner.wrap_udp_socket(socket)?;
        Ok(match &self.impairment {
            Some(link) => ImpairedSocket::start(wrapped, link.clone(), self.created),
            None => wrapped,
        })
    }

    fn wrap_tcp_listener(
        &self,
        listener: std::net::TcpListener,
    ) -> io::Result<Arc<dyn AsyncTcpListener>> {
        self.inner.wrap_tcp_listener(listener)
    }

    fn connect_tcp<'a>(
        &'a self,
        remote_addr: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = io::Result<Arc<dyn AsyncTcpStream>>> + Send + 'a>> {
        self.inner.connect_tcp(remote_addr)
    }

    fn resolve_host<'a>(
        &'a self,
        host: &'a str,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>> {
        self.inner.resolve_host(host)
    }

    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        self.inner.sleep(duration)
    }

    fn interval(&self, period: Duration) -> Box<dyn AsyncInterval> {
        self.inner.interval(period)
    }

    fn block_on(&self, future: Pin<Box<dyn Future<Output = ()> + '_>>) {
        self.inner.block_on(future)
    }

    fn yield_now(&self) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        self.inner.yield_now()
    }

    fn name(&self) -> &'static str {
        "tokio+udp-buffers"
    }
}

/// A link's impairment, applied to every datagram a socket sends: sending both ways through
/// impaired sockets gives a round trip of twice `delay`.
#[derive(Debug, Clone, Default)]
pub struct Impairment {
    /// One-way delay added to every datagram.
    pub delay: Duration,
    /// Up to this much more, uniformly at random (datagrams keep their order, as on a link
    /// with a queue: a datagram never leaves before the one sent ahead of it).
    pub jitter: Duration,
    /// Fraction of datagrams dropped, at random (0.01 = 1%).
    pub loss: f64,
    /// Bytes a socket may hold in flight in its delay line; past it, datagrams are dropped
    /// like a full router queue's (0 = 64 MiB).
    pub queue_bytes: usize,
    /// An outage: every datagram is dropped for `outage` starting `outage_after` after the
    /// runtime was created, or after `outage_clock` was started (a radio handover, a
    /// flapping route)…
    pub outage_after: Duration,
    /// …lasting this long (zero: none)…
    pub outage: Duration,
    /// …and again this long after each start (zero: once).
    pub outage_every: Duration,
    /// During an outage only datagrams at least this big are dropped (0: all). Big ones
    /// carry data, small ones acknowledgements and pings: a link that loses a peer's data
    /// while its acknowledgements get through, as when a queue drops full-size packets.
    pub outage_min_bytes: usize,
    /// When set, outages are timed from its start (none before), not from the runtime's
    /// creation: a test starts it once its connection is up.
    pub outage_clock: Option<OutageClock>,
}

/// The moment outages are timed from, set by a test (see [`Impairment::outage_clock`]).
#[derive(Debug, Clone, Default)]
pub struct OutageClock(Arc<std::sync::OnceLock<Instant>>);

impl OutageClock {
    /// Starts the clock now (later calls change nothing).
    pub fn start(&self) {
        let _ = self.0.set(Instant::now());
    }
}

/// Datagrams dropped by impaired sockets (at random, or by a full delay line), process-wide.
pub static IMPAIRED_DROPS: AtomicU64 = AtomicU64::new(0);

impl Impairment {
    /// Reads `delay_ms=25,jitter_ms=2,loss=0.01,queue_kib=65536,outage_after_ms=5000,
    /// outage_ms=3000,outage_every_ms=20000,outage_min_bytes=500` (any subset, any order).
    pub fn parse(spec: &str) -> Result<Self, String> {
        let mut i = Impairment::default();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?} is not key=value"))?;
            let number: f64 = value
                .parse()
                .map_err(|_| format!("{value:?} is not a number"))?;
            if !number.is_finite() || number < 0.0 {
                return Err(format!("{key} must be a non-negative number"));
            }
            let ms = || {
                Duration::try_from_secs_f64(number / 1000.0)
                    .map_err(|_| format!("{key}={value} is out of range"))
            };
            match key {
                "delay_ms" => i.delay = ms()?,
                "jitter_ms" => i.jitter = ms()?,
                "loss" if number <= 1.0 => i.loss = number,
                "queue_kib" => i.queue_bytes = (number as usize).saturating_mul(1024),
                "outage_after_ms" => i.outage_after = ms()?,
                "outage_ms" => i.outage = ms()?,
                "outage_every_ms" => i.outage_every = ms()?,
                "outage_min_bytes" => i.outage_min_bytes = number as usize,
                other => return Err(format!("unknown or out-of-range key {other:?}")),
            }
        }
        Ok(i)
    }

    /// Whether a datagram sent `since` the outage clock's start (the runtime's creation, or
    /// `outage_clock`) falls in an outage.
    pub fn in_outage(&self, since: Duration) -> bool {
        if self.outage.is_zero() || since < self.outage_after {
            return false;
        }
        let mut into = since - self.outage_after;
        if !self.outage_every.is_zero() {
            into = Duration::from_nanos((into.as_nanos() % self.outage_every.as_nanos()) as u64);
        }
        into < self.outage
    }
}

/// A datagram waiting in a delay line.
struct Delayed {
    at: Instant,
    to: SocketAddr,
    src_ip: Option<std::net::IpAddr>,
    bytes: Vec<u8>,
}

/// A socket whose sends go through a delay line (and lose some on the way); receives are the
/// inner socket's.
#[derive(Debug)]
struct ImpairedSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    link: Impairment,
    line: tokio::sync::mpsc::UnboundedSender<Delayed>,
    /// Bytes in the delay line, bounded by `link.queue_bytes`.
    queued: Arc<AtomicUsize>,
    /// When the last datagram leaves: no later one leaves before it.
    last: Mutex<Instant>,
    /// The runtime's creation, which outages are timed from unless `link.outage_clock` is set.
    epoch: Instant,
}

impl ImpairedSocket {
    fn start(
        inner: Arc<dyn AsyncUdpSocket>,
        link: Impairment,
        epoch: Instant,
    ) -> Arc<dyn AsyncUdpSocket> {
        let (line, mut rx) = tokio::sync::mpsc::unbounded_channel::<Delayed>();
        let queued = Arc::new(AtomicUsize::new(0));
        let (sender, left) = (inner.clone(), queued.clone());
        // Ends when the socket (the only sender) is dropped.
        tokio::spawn(async move {
            while let Some(d) = rx.recv().await {
                tokio::time::sleep_until(d.at.into()).await;
                let transmit = Transmit {
                    destination: d.to,
                    ecn: None,
                    contents: &d.bytes,
                    segment_size: None,
                    src_ip: d.src_ip,
                };
                // A send error is a lost datagram, as on a real link.
                let _ = std::future::poll_fn(|cx| sender.poll_send(cx, &transmit)).await;
                left.fetch_sub(d.bytes.len(), Ordering::Relaxed);
            }
        });
        Arc::new(ImpairedSocket {
            inner,
            link,
            line,
            queued,
            last: Mutex::new(Instant::now()),
            epoch,
        })
    }

    fn in_outage(&self) -> bool {
        let since = match &self.link.outage_clock {
            Some(clock) => clock.0.get().map(Instant::elapsed),
            None => Some(self.epoch.elapsed()),
        };
        since.is_some_and(|d| self.link.in_outage(d))
    }

    fn enqueue(&self, to: SocketAddr, src_ip: Option<std::net::IpAddr>, bytes: &[u8]) {
        let cap = match self.link.queue_bytes {
            0 => 64 << 20,
            n => n,
        };
        if fastrand::f64() < self.link.loss
            || (bytes.len() >= self.link.outage_min_bytes && self.in_outage())
            || self.queued.load(Ordering::Relaxed) + bytes.len() > cap
        {
            IMPAIRED_DROPS.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let jitter = self.link.jitter.mul_f64(fastrand::f64());
        let at = {
            let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            *last = (Instant::now() + self.link.delay + jitter).max(*last);
            *last
        };
        self.queued.fetch_add(bytes.len(), Ordering::Relaxed);
        let delayed = Delayed {
            at,
            to,
            src_ip,
            bytes: bytes.to_vec(),
        };
        if self.line.send(delayed).is_err() {
            IMPAIRED_DROPS.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl AsyncUdpSocket for ImpairedSocket {
    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn poll_send(&self, _cx: &mut Context<'_>, transmit: &Transmit<'_>) -> Poll<io::Result<usize>> {
        // One datagram per segment (GSO is not offered, but honour a segment size anyway).
        let step = transmit
            .segment_size
            .filter(|s| *s > 0)
            .unwrap_or(transmit.contents.len().max(1));
        for segment in transmit.contents.chunks(step) {
            self.enqueue(transmit.destination, transmit.src_ip, segment);
        }
        Poll::Ready(Ok(transmit.contents.len()))
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [io::IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn max_gro_segments(&self) -> usize {
        self.inner.max_gro_segments()
    }
}

/// The kernel's count of UDP datagrams dropped for a full receive buffer (`RcvbufErrors` in
/// `/proc/net/snmp`, all sockets of the host), or `None` where it cannot be read.
pub fn kernel_udp_rcvbuf_errors() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/snmp").ok()?;
    parse_rcvbuf_errors(&text)
}

fn parse_rcvbuf_errors(snmp: &str) -> Option<u64> {
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let names = udp.next()?;
    let values = udp.next()?;
    let at = names.split_whitespace().position(|n| n == "RcvbufErrors")?;
    values.split_whitespace().nth(at)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_rcvbuf_errors_from_the_udp_lines() {
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
                    Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n\
                    Udp: 100 2 7 90 5 0\nUdpLite: InDatagrams\nUdpLite: 0\n";
        assert_eq!(parse_rcvbuf_errors(snmp), Some(5));
        assert_eq!(parse_rcvbuf_errors("Ip: x\nIp: 1\n"), None);
    }

    #[test]
    fn impairment_specs_parse_and_bad_ones_are_refused() {
        let i = Impairment::parse("delay_ms=25, jitter_ms=2.5,loss=0.01").expect("parses");
        assert_eq!(i.delay, Duration::from_millis(25));
        assert_eq!(i.jitter, Duration::from_micros(2500));
        assert_eq!(i.loss, 0.01);
        assert!(Impairment::parse("loss=2").is_err());
        assert!(Impairment::parse("delay_ms=-1").is_err());
        assert!(Impairment::parse("rate=5").is_err());
        assert!(Impairment::parse("delay_ms").is_err());
        assert!(
            Impairment::parse("outage_ms=1e30").is_err(),
            "refused, not a panic"
        );
        let o = Impairment::parse("outage_after_ms=1000,outage_ms=300,outage_every_ms=2000")
            .expect("parses");
        let at = |ms| o.in_outage(Duration::from_millis(ms));
        assert!(!at(999) && at(1000) && at(1299) && !at(1300) && !at(2999));
        assert!(at(3000) && at(5100) && !at(5400));
        let once = Impairment {
            outage_every: Duration::ZERO,
            ..o.clone()
        };
        assert!(once.in_outage(Duration::from_millis(1100)));
        assert!(!once.in_outage(Duration::from_millis(3100)));
        assert!(!Impairment::default().in_outage(Duration::from_secs(5)));
    }

    /// Sends `n` datagrams through an impaired socket to a plain one; returns how many
    /// arrived within `wait` and when the first did.
    async fn through(link: Impairment, n: usize, wait: Duration) -> (usize, Option<Duration>) {
        let rt = BufferedRuntime::impaired(1 << 20, link);
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        sender.set_nonblocking(true).expect("nonblocking");
        let sender = rt.wrap_udp_socket(sender).expect("wraps");
        let receiver = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let to = receiver.local_addr().expect("addr");
        let sent = Instant::now();
        for i in 0..n {
            let bytes = [i as u8; 100];
            sender.send_to(&bytes, to).await.expect("accepted");
        }
        let (mut got, mut first) = (0, None);
        let mut buf = [0u8; 200];
        while let Ok(Ok(_)) = tokio::time::timeout(wait, receiver.recv_from(&mut buf)).await {
            first.get_or_insert(sent.elapsed());
            got += 1;
        }
        (got, first)
    }

    #[tokio::test]
    async fn impaired_sends_arrive_late_and_lossy_ones_not_at_all() {
        let delayed = Impairment {
            delay: Duration::from_millis(40),
            ..Impairment::default()
        };
        let (got, first) = through(delayed, 20, Duration::from_millis(300)).await;
        assert_eq!(got, 20, "delay alone loses nothing");
        assert!(
            first.is_some_and(|t| t >= Duration::from_millis(40)),
            "{first:?}"
        );
        let lossy = Impairment {
            loss: 1.0,
            ..Impairment::default()
        };
        let before = IMPAIRED_DROPS.load(Ordering::Relaxed);
        let (got, _) = through(lossy, 10, Duration::from_millis(100)).await;
        assert_eq!(got, 0);
        assert!(
            IMPAIRED_DROPS.load(Ordering::Relaxed) >= before + 10,
            "drops counted"
        );
        let half = Impairment {
            loss: 0.5,
            ..Impairment::default()
        };
        let (got, _) = through(half, 400, Duration::from_millis(100)).await;
        assert!(
            (100..300).contains(&got),
            "about half of 400 arrived: {got}"
        );
        // A full delay line drops like a router queue, counted: 1 KiB holds ten of these.
        let small = Impairment {
            delay: Duration::from_millis(50),
            queue_bytes: 1024,
            ..Impairment::default()
        };
        let before = IMPAIRED_DROPS.load(Ordering::Relaxed);
        let (got, _) = through(small, 40, Duration::from_millis(300)).await;
        assert_eq!(got, 10, "only what the line holds arrives");
        assert!(IMPAIRED_DROPS.load(Ordering::Relaxed) >= before + 30);
    }

    #[tokio::test]
    async fn wrapped_sockets_get_the_requested_buffers() {
        let rt = BufferedRuntime::new(1 << 20);
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        socket.set_nonblocking(true).expect("nonblocking");
        let _wrapped = rt.wrap_udp_socket(socket).expect("wraps");
        let granted = rt.granted_buffer().expect("recorded");
        // Linux doubles the request; a host with rmem_max below 1 MiB caps it (and warns).
        let cap = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0);
        assert!(
            granted >= (1 << 20).min(cap),
            "granted {granted}, rmem_max {cap}"
        );
    }
}
