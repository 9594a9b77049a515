//! The async runtime handed to `webrtc`: Tokio's, except that every UDP socket it wraps first
//! gets large kernel buffers. With the default ~208 KiB the kernel drops datagrams under a
//! data-channel burst and SCTP spends its time in loss recovery (DESIGN §6: 36 vs 244 MiB/s).
//! Also reads the kernel's UDP receive-buffer drop counter, so the drops can be reported.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use webrtc::runtime::{
    AsyncInterval, AsyncTcpListener, AsyncTcpStream, AsyncUdpSocket, JoinHandle, Runtime,
    TokioRuntime,
};

/// Tokio plus buffer sizing for UDP sockets.
#[derive(Debug)]
pub struct BufferedRuntime {
    inner: TokioRuntime,
    buffer: usize,
    /// The smallest receive buffer the kernel actually granted (it may cap the request at
    /// `net.core.rmem_max`); `u64::MAX` until a socket is wrapped.
    granted: AtomicU64,
}

impl BufferedRuntime {
    /// Sockets will ask for `buffer` bytes of SO_RCVBUF and SO_SNDBUF.
    pub fn new(buffer: usize) -> Self {
        Self {
            inner: TokioRuntime,
            buffer,
            granted: AtomicU64::new(u64::MAX),
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
        self.inner.wrap_udp_socket(socket)
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
