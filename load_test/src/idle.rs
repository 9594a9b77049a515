//! Connection cost: opens K connections that each announce once, then hold them idle so the
//! tracker's memory per connection can be read (the side-by-side script samples its RSS).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::Connector;
use tokio_tungstenite::tungstenite::Message;

/// Options for `tidepool-load-test idle`.
#[derive(Debug, Clone, clap::Args)]
pub struct IdleConfig {
    /// Tracker URL (ws:// or wss://).
    #[arg(long, default_value = "ws://127.0.0.1:8000")]
    pub url: String,
    /// Connections to open.
    #[arg(long, default_value_t = 5000)]
    pub connections: usize,
    /// Swarms they announce into.
    #[arg(long, default_value_t = 500)]
    pub swarms: usize,
    /// Seconds to hold them open after all have announced.
    #[arg(long, default_value_t = 5)]
    pub hold: u64,
    /// Accept any TLS certificate.
    #[arg(long, default_value_t = false)]
    pub insecure: bool,
}

/// Opens, announces, prints `READY <n>` when every connection has its response, holds, exits.
pub fn run(config: IdleConfig) -> anyhow::Result<usize> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("runtime")?;
    runtime.block_on(async move {
        let connector = if config.url.starts_with("wss://") {
            Some(Connector::Rustls(Arc::new(crate::tls::client_config(config.insecure)?)))
        } else {
            None
        };
        let mut held = Vec::with_capacity(config.connections);
        for batch in (0..config.connections).collect::<Vec<_>>().chunks(200) {
            let opened = futures_util::future::join_all(batch.iter().map(|&i| {
                let (url, connector) = (config.url.clone(), connector.clone());
                let swarm = i % config.swarms.max(1);
                async move {
                    let (mut ws, _) = tokio_tungstenite::connect_async_tls_with_config(&url, None, true, connector).await.ok()?;
                    let announce = json!({"action": "announce", "info_hash": format!("{swarm:0>20}"),
                        "peer_id": format!("{i:-<20}"), "event": "started", "left": 1, "numwant": 0});
                    ws.send(Message::text(announce.to_string())).await.ok()?;
                    match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
                        Ok(Some(Ok(Message::Text(_)))) => Some(ws),
                        _ => None,
                    }
                }
            }))
            .await;
            held.extend(opened.into_iter().flatten());
        }
        println!("READY {}", held.len());
        tokio::time::sleep(Duration::from_secs(config.hold)).await;
        Ok(held.len())
    })
}
