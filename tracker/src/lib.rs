//! tidepool-tracker: a WebSocket signaling tracker for the WebTorrent protocol, built like
//! aquatic_ws: socket workers (one mio event loop each) own connections; swarm workers own
//! swarms sharded by info hash; bounded channels carry plain messages between them.
//!
//! Where does X live:
//! - [`config`]: every option and limit, with defaults and `--print-config` comments.
//! - [`swarm`]: the sans-IO core — swarms, peer ownership, offer fan-out, answer routing,
//!   cleaning. Unit-tested with an injected clock.
//! - `net`: the socket worker — its event loop (`net/mod.rs`), one connection's state
//!   (`net/connection.rs`), decoding and forwarding requests (`net/requests.rs`), the batched
//!   write path (`net/write.rs`), plain/TLS streams (`net/stream.rs`).
//! - [`server`]: binding (SO_REUSEPORT), threads and channels, reloads; [`Tracker`].
//! - `channel`: the count- and byte-bounded channels between workers. `liveness`: when each
//!   connection was last heard from (peer id takeover). `full_scrape`: the shared snapshot.
//! - [`access`]: allow/deny lists of info hashes, swapped whole on reload.
//! - `tls`: certificate loading and hot reload. `proxy`: client addresses behind proxies and
//!   the per-address limit. `metrics`: counters; `stats`: the `/metrics` and `/stats` HTTP
//!   endpoint.

pub mod access;
mod channel;
pub mod config;
mod full_scrape;
mod liveness;
mod metrics;
mod net;
pub mod proxy;
pub mod server;
mod stats;
pub mod swarm;
mod tls;

pub use config::Config;
pub use server::{StartError, Tracker};
pub use tls::TlsError;
