//! tidepool-tracker: a WebSocket signaling tracker for the WebTorrent protocol, built like
//! aquatic_ws: socket workers (one mio event loop each) own connections; swarm workers own
//! swarms sharded by info hash; bounded channels carry plain messages between them.
//!
//! Where does X live:
//! - [`config`]: every option and limit, with defaults and `--print-config` comments.
//! - [`swarm`]: the sans-IO core — swarms, peer ownership, offer fan-out, answer routing,
//!   cleaning. Unit-tested with an injected clock.
//! - `net`: the socket worker — accept, TLS, WebSocket (tungstenite), decode, limits, writes.
//! - [`server`]: binding (SO_REUSEPORT), TLS loading, threads and channels; [`Tracker`].

pub mod config;
mod net;
pub mod server;
pub mod swarm;

pub use config::Config;
pub use server::{StartError, Tracker};
