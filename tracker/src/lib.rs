//! tidepool-tracker: a WebSocket signaling tracker for the WebTorrent protocol, built like
//! aquatic_ws: socket workers (one mio event loop each) own connections; swarm workers own
//! swarms sharded by info hash; bounded channels carry plain messages between them.
//!
//! Where does X live:
//! - [`config`]: every option and limit, with defaults and `--print-config` comments.
//! - [`swarm`]: the sans-IO core — swarms, peer ownership, offer fan-out, answer routing,
//!   cleaning. Unit-tested with an injected clock.
//! - `net`: the socket worker — its event loop (`net/mod.rs`), one connection's state
//!   (`net/connection.rs`), the WebSocket protocol, sans-IO (`net/ws.rs`), the socket, TLS and
//!   pooled buffers (`net/link.rs`), decoding and forwarding requests (`net/requests.rs`), the
//!   batched write path (`net/write.rs`).
//! - [`server`]: binding (SO_REUSEPORT), threads and channels, reloads; [`Tracker`].
//! - `channel`: the count- and byte-bounded channels between workers. `liveness`: when each
//!   connection was last heard from (peer id takeover). `full_scrape`: the shared snapshot.
//! - [`access`]: allow/deny lists of info hashes, swapped whole on reload.
//! - [`auth`]: signed tokens for private pools — keys, claims, verification, issuing.
//! - [`cluster`]: several instances sharing swarms through NATS — membership and shard
//!   ownership, sans-IO (`cluster/mod.rs`), the binary batch format (`cluster/wire.rs`) and
//!   the bridge that carries requests and replies between instances (`cluster/bridge.rs`).
//! - `tls`: certificate loading and hot reload. `proxy`: client addresses behind proxies and
//!   the per-address limit. `metrics`: counters; `stats`: the `/metrics` and `/stats` HTTP
//!   endpoint (axum; the exposition is `prometheus-client`'s).

pub mod access;
pub mod auth;
mod channel;
pub mod cluster;
pub mod config;
mod full_scrape;
mod fuzz_shard;
mod liveness;
mod metrics;
mod net;
pub mod proxy;
pub mod server;
mod stats;
pub mod swarm;
mod tls;

pub use config::Config;

/// Entry points for the fuzz targets (`fuzz/`): the WebSocket layer's parsers on arbitrary
/// bytes, with their invariants asserted. Not an API.
#[doc(hidden)]
pub mod fuzzing {
    use crate::net::ws::{self, Assembler, Frame, Limits};

    /// Any bytes as an upgrade request: never panics; a complete head takes no more bytes
    /// than it was given and parses the same from exactly those bytes.
    pub fn upgrade(data: &[u8]) {
        if let Ok(Some((used, up))) = ws::parse_upgrade(data, true) {
            assert!(used <= data.len());
            assert_eq!(up.accept.len(), 28, "base64 of a SHA-1");
            let again = ws::parse_upgrade(&data[..used], true);
            assert_eq!(
                again.ok().flatten().map(|(n, u)| (n, u.accept)),
                Some((used, up.accept))
            );
        }
    }

    /// Any bytes as what a client sends after the upgrade (the first byte picks whether
    /// binary is allowed): never panics, never holds more than the message limit, and gives
    /// the same frames whether the bytes arrive at once or a few at a time.
    pub fn frames(data: &[u8]) {
        let limits = Limits {
            max_frame: 1024,
            max_message: 4096,
            binary: data.first().is_some_and(|b| b & 1 == 1),
        };
        let input = data.get(1..).unwrap_or_default();
        let whole = decode(input, limits, input.len().max(1));
        for step in [1, 7] {
            assert_eq!(
                decode(input, limits, step),
                whole,
                "fed {step} bytes at a time"
            );
        }
    }

    /// Any bytes as a sequence of operations on one swarm shard (announces with offers,
    /// answers, scrapes, closes, reconnects, silences, time), its invariants checked after
    /// every step: see `fuzz_shard.rs`.
    pub fn shard_ops(data: &[u8]) {
        crate::fuzz_shard::run(data);
    }

    /// Any bytes as a batch from the cluster bus: never panics, and a batch that decodes is
    /// its own canonical encoding (re-encoding its items gives back exactly its bytes).
    pub fn cluster_batch(data: &[u8]) {
        use crate::cluster::wire;
        if let Ok((h, items)) = wire::decode(data) {
            let mut buf = Vec::new();
            wire::begin(&mut buf, h.from, h.shards, h.seq, h.sent_before);
            for item in &items {
                wire::push(&mut buf, item);
            }
            wire::finish(&mut buf, items.len() as u32);
            assert_eq!(buf, data, "re-encoded {items:?}");
        }
    }

    fn decode(input: &[u8], limits: Limits, step: usize) -> Vec<String> {
        let mut assembler = Assembler::default();
        let mut buf = Vec::new();
        let mut out = Vec::new();
        let mut fed = 0;
        loop {
            let upto = (fed + step).min(input.len());
            buf.extend_from_slice(&input[fed..upto]);
            fed = upto;
            loop {
                match assembler.next(&mut buf, limits) {
                    Ok(Some((used, frame))) => {
                        assert!(used <= buf.len());
                        let bytes = |r: std::ops::Range<usize>| {
                            assert!(r.end <= used);
                            buf[r].to_vec()
                        };
                        out.push(match frame {
                            Frame::Text(r) => format!("text {:?}", bytes(r)),
                            Frame::Binary(r) => format!("binary {:?}", bytes(r)),
                            Frame::Ping(r) => format!("ping {:?}", bytes(r)),
                            Frame::Assembled { text } => {
                                let message = assembler.take_message();
                                assert!(message.len() <= limits.max_message);
                                format!("message {text} {message:?}")
                            }
                            other => format!("{other:?}"),
                        });
                        buf.drain(..used);
                    }
                    Ok(None) => break,
                    Err(v) => {
                        out.push(format!("close {} {}", v.code, v.reason));
                        return out;
                    }
                }
            }
            if fed == input.len() {
                return out;
            }
        }
    }
}
pub use server::{StartError, Tracker};
pub use tls::TlsError;
