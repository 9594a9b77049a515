//! A WebSocket echo server on the tracker's own connection code (the same accept, TLS,
//! handshake, framing, UTF-8 and close handling, limits and write path), for the Autobahn
//! conformance cases: `kosoku -m fuzzingclient 127.0.0.1:PORT`. Size limits are raised to
//! the 16 MiB the cases send; nothing else differs from the tracker.
//!
//! Usage: `cargo run --release -p tidepool-tracker --example echo -- [ADDR]`. Prints the
//! address, then serves until stdin closes.

use std::io::Read;

use anyhow::Context;
use tidepool_tracker::{Config, Tracker};

fn main() -> anyhow::Result<()> {
    let mut config = Config::default();
    config.network.listen = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9001".into())
        .parse()
        .context("ADDR must be host:port")?;
    config.network.max_message_size = 64 << 20;
    config.network.max_frame_size = 16 << 20;
    config.network.max_outgoing_queue = 128 << 20;
    config.network.read_buffer_size = 64 << 10;
    // The channels to swarm workers must hold two of the largest messages (echo uses none).
    config.workers.channel_bytes = 128 << 20;
    // The cases send thousands of frames back to back.
    config.network.max_messages_per_second = 0;
    let tracker = Tracker::start_echo(config)?;
    println!("echo server on {}", tracker.url());
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    tracker.shutdown();
    Ok(())
}
