//! The tracker's configuration: every limit in one place, each with a safe default and a
//! comment that `--print-config` writes out as TOML.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::access::AccessListMode;
use crate::proxy::IpNet;

/// Everything the tracker can be told. Load with [`Config::from_toml`]; every field has a
/// default, so an empty file is a valid config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Sockets, TLS and WebSocket limits.
    pub network: NetworkConfig,
    /// Tracker protocol behaviour.
    pub protocol: ProtocolConfig,
    /// Threads and the channels between them.
    pub workers: WorkerConfig,
    /// Which swarms are served.
    pub access_list: AccessListConfig,
    /// The `/metrics`, `/stats` and `/stats.json` endpoint.
    pub metrics: MetricsConfig,
}

/// Sockets, TLS and WebSocket limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    /// Address to listen on. Loopback by default: binding publicly is a deliberate choice.
    pub listen: SocketAddr,
    /// PEM certificate chain; with `tls_key`, serves `wss://` instead of `ws://`.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Most open connections per socket worker; more are closed at accept.
    pub max_connections_per_worker: usize,
    /// Largest WebSocket message, in bytes (a frame carrying 10 offers is about 12 KiB).
    pub max_message_size: usize,
    /// Largest WebSocket frame, in bytes.
    pub max_frame_size: usize,
    /// Read buffer per connection, in bytes. Memory per idle connection is dominated by this.
    pub read_buffer_size: usize,
    /// Outgoing bytes queued per connection before it counts as a slow reader and is closed.
    pub max_outgoing_queue: usize,
    /// Milliseconds a client has to complete the WebSocket handshake (slowloris defence).
    pub handshake_timeout_ms: u64,
    /// Seconds without any frame from a client before it is sent a ping.
    pub ping_interval_secs: u64,
    /// Seconds without any frame from a client (pongs included) before it is closed.
    pub idle_timeout_secs: u64,
    /// Text frames per second one connection may send, on average (token bucket; 0 = no
    /// limit). Frames over the limit get a failure reply and are not processed.
    pub max_messages_per_second: u32,
    /// Frames a connection may send in a burst above the average rate.
    pub message_burst: u32,
    /// Most open connections from one client address across all workers (0 = no limit).
    /// Behind a trusted proxy the limit applies to the forwarded client address.
    pub max_connections_per_ip: u32,
    /// Reverse proxies (addresses or CIDR blocks) whose `X-Forwarded-For` / `X-Real-IP`
    /// headers name the client. Headers from anyone else are ignored.
    pub trusted_proxies: Vec<IpNet>,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8000)),
            tls_cert: None,
            tls_key: None,
            max_connections_per_worker: 50_000,
            max_message_size: 64 * 1024,
            max_frame_size: 64 * 1024,
            read_buffer_size: 4 * 1024,
            max_outgoing_queue: 256 * 1024,
            handshake_timeout_ms: 10_000,
            ping_interval_secs: 60,
            idle_timeout_secs: 180,
            max_messages_per_second: 200,
            message_burst: 400,
            max_connections_per_ip: 0,
            trusted_proxies: Vec::new(),
        }
    }
}

/// Tracker protocol behaviour.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProtocolConfig {
    /// Seconds clients are told to wait between announces.
    pub announce_interval_secs: u64,
    /// Peers that have not announced for this many seconds are dropped.
    pub peer_timeout_secs: u64,
    /// Seconds between sweeps for timed-out peers.
    pub clean_interval_secs: u64,
    /// Most offers accepted in one announce (more is an error) and forwarded (fan-out cap).
    pub max_offers: usize,
    /// Offers forwarded when the client sends no `numwant`.
    pub default_numwant: usize,
    /// Most info hashes in one scrape.
    pub max_scrape_hashes: usize,
    /// Most swarms one connection may join (npm clients share one socket for many torrents).
    pub max_swarms_per_connection: usize,
}

impl Default for ProtocolConfig {
    fn default() -> Self {
        Self {
            announce_interval_secs: 120,
            peer_timeout_secs: 300,
            clean_interval_secs: 30,
            max_offers: 10,
            default_numwant: 10,
            max_scrape_hashes: 64,
            max_swarms_per_connection: 128,
        }
    }
}

/// Threads and the channels between them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// Socket worker threads (each its own event loop; they share the port via SO_REUSEPORT).
    pub socket_workers: usize,
    /// Swarm worker threads (swarms are sharded across them by info hash).
    pub swarm_workers: usize,
    /// Capacity of each channel between workers, in messages. When one is full the request
    /// is answered with a failure rather than queued without bound.
    pub channel_capacity: usize,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            socket_workers: 1,
            swarm_workers: 1,
            channel_capacity: 16 * 1024,
        }
    }
}

/// Which swarms are served.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct AccessListConfig {
    /// `off`, `allow` (only listed swarms) or `deny` (all but listed swarms).
    pub mode: AccessListMode,
    /// File of info hashes, 40 hex digits per line; `#` starts a comment. Reloaded on SIGUSR1.
    pub path: Option<PathBuf>,
    /// Also reload the file this often, in seconds (0 = only on SIGUSR1).
    pub reload_interval_secs: u64,
}

/// The `/metrics`, `/stats` and `/stats.json` endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address for the HTTP endpoint; unset = off. Keep it private: it names swarms.
    pub listen: Option<SocketAddr>,
    /// Milliseconds between refreshes of swarm counts and rates.
    pub stats_interval_ms: u64,
    /// Swarms listed on the stats page.
    pub top_swarms: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: None,
            stats_interval_ms: 1000,
            top_swarms: 10,
        }
    }
}

/// A config that cannot run, with the reason.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The TOML did not parse or named an unknown field.
    #[error("invalid config: {0}")]
    Toml(#[from] toml::de::Error),
    /// A value is out of range.
    #[error("invalid config: {0}")]
    Invalid(String),
}

impl Config {
    /// Parses and validates a TOML config.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks that the values can work together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |msg: &str| Err(ConfigError::Invalid(msg.to_owned()));
        let n = &self.network;
        if self.workers.socket_workers == 0 || self.workers.socket_workers > 256 {
            return fail("workers.socket_workers must be 1..=256");
        }
        if self.workers.swarm_workers == 0 || self.workers.swarm_workers > 256 {
            return fail("workers.swarm_workers must be 1..=256");
        }
        if self.workers.channel_capacity == 0 {
            return fail("workers.channel_capacity must be at least 1");
        }
        if n.tls_cert.is_some() != n.tls_key.is_some() {
            return fail("network.tls_cert and network.tls_key must be given together");
        }
        if n.max_frame_size < 1024 || n.max_message_size < n.max_frame_size {
            return fail("network.max_frame_size must be ≥ 1024 and ≤ network.max_message_size");
        }
        if n.read_buffer_size < 512 {
            return fail("network.read_buffer_size must be at least 512");
        }
        if n.max_outgoing_queue < n.max_message_size {
            return fail("network.max_outgoing_queue must hold at least one max-size message");
        }
        if n.idle_timeout_secs <= n.ping_interval_secs {
            return fail("network.idle_timeout_secs must exceed network.ping_interval_secs");
        }
        if n.max_messages_per_second > 0 && n.message_burst == 0 {
            return fail("network.message_burst must be at least 1 when rate limiting is on");
        }
        if self.protocol.max_offers == 0 || self.protocol.max_offers > 64 {
            return fail("protocol.max_offers must be 1..=64");
        }
        if self.protocol.max_scrape_hashes == 0 || self.protocol.max_scrape_hashes > 256 {
            return fail("protocol.max_scrape_hashes must be 1..=256");
        }
        if self.protocol.max_swarms_per_connection == 0 {
            return fail("protocol.max_swarms_per_connection must be at least 1");
        }
        if self.access_list.mode != AccessListMode::Off && self.access_list.path.is_none() {
            return fail("access_list.path is required when access_list.mode is allow or deny");
        }
        if self.metrics.stats_interval_ms < 100 {
            return fail("metrics.stats_interval_ms must be at least 100");
        }
        if self.protocol.clean_interval_secs == 0 {
            return fail("protocol.clean_interval_secs must be at least 1");
        }
        Ok(())
    }

    /// The defaults as TOML, each field preceded by its documentation.
    pub fn to_commented_toml(&self) -> String {
        let plain = toml::to_string(self).unwrap_or_default();
        let mut out = String::from(
            "# tidepool-tracker configuration. Every field is optional; these are the defaults.\n",
        );
        let mut section = "";
        for line in plain.lines() {
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = match name {
                    "network" => "network",
                    "protocol" => "protocol",
                    "access_list" => "access_list",
                    "metrics" => "metrics",
                    _ => "workers",
                };
                out.push('\n');
            } else if let Some((key, _)) = line.split_once(" = ")
                && let Some(doc) = field_doc(section, key)
            {
                out.push_str(&format!("\n# {doc}\n"));
            }
            out.push_str(line);
            out.push('\n');
        }
        // Optional fields without a value are left out by TOML; show them commented.
        out = out.replace(
            "[network]\n",
            "[network]\n# PEM certificate chain and key; with both set, serves wss:// instead of ws://.\n# tls_cert = \"/etc/tidepool/cert.pem\"\n# tls_key = \"/etc/tidepool/key.pem\"\n",
        );
        out = out.replace(
            "\n[access_list]\n",
            "\n[access_list]\n# File of info hashes (40 hex digits a line); required for allow and deny.\n# path = \"/etc/tidepool/access-list.txt\"\n",
        );
        out = out.replace(
            "\n[metrics]\n",
            "\n[metrics]\n# Address for /metrics, /stats and /stats.json (off unless set; or --metrics ADDR).\n# listen = \"127.0.0.1:9000\"\n",
        );
        out
    }

    pub(crate) fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.network.handshake_timeout_ms)
    }
}

/// The doc comments above, for `--print-config` (kept next to the fields they describe).
fn field_doc(section: &str, key: &str) -> Option<&'static str> {
    Some(match (section, key) {
        ("network", "listen") => {
            "Address to listen on. Loopback by default: binding publicly is a deliberate choice."
        }
        ("network", "tls_cert") | ("network", "tls_key") => {
            "PEM certificate chain / private key (both, or neither)."
        }
        ("network", "max_connections_per_worker") => {
            "Most open connections per socket worker; more are closed at accept."
        }
        ("network", "max_message_size") => {
            "Largest WebSocket message, in bytes (a frame with 10 offers is about 12 KiB)."
        }
        ("network", "max_frame_size") => "Largest WebSocket frame, in bytes.",
        ("network", "read_buffer_size") => {
            "Read buffer per connection, in bytes; dominates memory per idle connection."
        }
        ("network", "max_outgoing_queue") => {
            "Outgoing bytes queued per connection before it counts as a slow reader and is closed."
        }
        ("network", "handshake_timeout_ms") => {
            "Milliseconds a client has to complete the WebSocket handshake (slowloris defence)."
        }
        ("network", "ping_interval_secs") => {
            "Seconds without any frame from a client before it is sent a ping."
        }
        ("network", "idle_timeout_secs") => {
            "Seconds without any frame from a client (pongs included) before it is closed."
        }
        ("network", "max_messages_per_second") => {
            "Text frames per second one connection may send on average (token bucket; 0 = no limit)."
        }
        ("network", "message_burst") => {
            "Frames a connection may send in a burst above the average rate."
        }
        ("network", "max_connections_per_ip") => {
            "Most open connections from one client address (0 = no limit); behind a trusted proxy, the forwarded address."
        }
        ("network", "trusted_proxies") => {
            "Reverse proxies (addresses or CIDR blocks) whose X-Forwarded-For / X-Real-IP name the client."
        }
        ("access_list", "mode") => {
            "off, allow (only listed swarms are served) or deny (listed swarms are refused)."
        }
        ("access_list", "reload_interval_secs") => {
            "Reload the file this often, in seconds, as well as on SIGUSR1 (0 = on SIGUSR1 only)."
        }
        ("metrics", "stats_interval_ms") => {
            "Milliseconds between refreshes of swarm counts and rates."
        }
        ("metrics", "top_swarms") => "Swarms listed on the stats page.",
        ("protocol", "announce_interval_secs") => {
            "Seconds clients are told to wait between announces."
        }
        ("protocol", "peer_timeout_secs") => {
            "Peers that have not announced for this many seconds are dropped."
        }
        ("protocol", "clean_interval_secs") => "Seconds between sweeps for timed-out peers.",
        ("protocol", "max_offers") => {
            "Most offers accepted in one announce (more is an error) and forwarded."
        }
        ("protocol", "default_numwant") => "Offers forwarded when the client sends no numwant.",
        ("protocol", "max_scrape_hashes") => "Most info hashes in one scrape.",
        ("protocol", "max_swarms_per_connection") => {
            "Most swarms one connection may join (npm clients share one socket for many torrents)."
        }
        ("workers", "socket_workers") => {
            "Socket worker threads, each its own event loop, sharing the port via SO_REUSEPORT."
        }
        ("workers", "swarm_workers") => {
            "Swarm worker threads; swarms are sharded across them by info hash."
        }
        ("workers", "channel_capacity") => {
            "Capacity of each channel between workers; when full, requests get a failure reply."
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printed_defaults_parse_back_to_the_defaults() {
        let text = Config::default().to_commented_toml();
        assert_eq!(Config::from_toml(&text).expect("parses"), Config::default());
        assert!(text.contains("# Address to listen on."));
        assert!(text.contains("listen = \"127.0.0.1:8000\""));
    }

    #[test]
    fn deploy_config_reference_is_what_print_config_prints() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/tracker.toml");
        let committed = std::fs::read_to_string(path).expect("deploy/tracker.toml exists");
        assert_eq!(
            committed,
            Config::default().to_commented_toml(),
            "regenerate with: cargo run -p tidepool-tracker -- --print-config > deploy/tracker.toml"
        );
    }

    #[test]
    fn every_field_has_a_printed_comment() {
        let text = Config::default().to_commented_toml();
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            if line.contains(" = ") && !line.starts_with('#') {
                assert!(lines[i - 1].starts_with('#'), "no comment above {line}");
            }
        }
    }

    #[test]
    fn empty_and_partial_files_fill_in_defaults() {
        assert_eq!(
            Config::from_toml("").expect("empty is fine"),
            Config::default()
        );
        let c = Config::from_toml("[workers]\nsocket_workers = 4\n").expect("valid");
        assert_eq!(c.workers.socket_workers, 4);
        assert_eq!(c.workers.swarm_workers, 1);
    }

    #[test]
    fn bad_configs_get_clear_errors() {
        let err = Config::from_toml("[network]\nlisen = \"x\"\n").expect_err("typo");
        assert!(err.to_string().contains("unknown field `lisen`"), "{err}");
        let err = Config::from_toml("[workers]\nsocket_workers = 0\n").expect_err("zero");
        assert!(
            err.to_string().contains("socket_workers must be 1..=256"),
            "{err}"
        );
        let err = Config::from_toml("[network]\ntls_cert = \"a.pem\"\n").expect_err("half TLS");
        assert!(err.to_string().contains("together"), "{err}");
        let err = Config::from_toml("[network]\nlisten = \"nowhere\"\n").expect_err("bad addr");
        assert!(err.to_string().contains("invalid"), "{err}");
    }
}
