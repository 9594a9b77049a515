//! tidepool-tracker: a WebSocket signaling tracker for the WebTorrent protocol.
//!
//! Layout: [`swarm`] is the sans-IO core (swarms, peers, offer fan-out, answer routing);
//! the I/O shell around it is in progress.

pub mod swarm;
