//! tidepool-tracker: a WebSocket signaling tracker for the WebTorrent protocol, built like
//! aquatic_ws: socket workers (one mio event loop each) own connections; swarm workers own
//! swarms sharded by info hash; bounded channels carry plain messages between them.
//!
//! Where does X live:
//! - [`config`]: every option and limit, with defaults and `--print-config` comments.
//! - [`swarm`]: the sans-IO core — swarms, peer ownership, offer fan-out, answer routing,
//!   cleaning. Unit-tested with an injected clock.
//! - `net`: the socket worker — accept, TLS, WebSocket (tungstenite), decode, limits, writes.
//! - [`server`]: binding (SO_REUSEPORT), threads and channels, reloads; [`Tracker`].
//! - [`access`]: allow/deny lists of info hashes, swapped whole on reload.
//! - `tls`: certificate loading and hot reload. `proxy`: client addresses behind proxies and
//!   the per-address limit. `metrics`: counters; `stats`: the `/metrics` and `/stats` HTTP
//!   endpoint.

pub mod access;
pub mod config;
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
