//! The tracker's configuration: every limit in one place, each with a safe default. The doc
//! comments on these fields are the only documentation of them: `build.rs` reads this file
//! and `--print-config` writes each field's doc comment above it (a line `Example: VALUE`
//! in the doc of an optional field is printed as a commented-out setting).

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
    /// Signed tokens: who may connect, and to which pools (off by default).
    pub auth: AuthConfig,
    /// The `/metrics`, `/stats` and `/stats.json` endpoint.
    pub metrics: MetricsConfig,
    /// Several instances sharing swarms through NATS (off by default: one process).
    pub cluster: ClusterConfig,
}

/// Sockets, TLS and WebSocket limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    /// Address to listen on. Loopback by default: binding publicly is a deliberate choice.
    pub listen: SocketAddr,
    /// PEM certificate chain; with `tls_key`, serves wss:// instead of ws://.
    /// Example: "/etc/tidepool/cert.pem"
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    /// Example: "/etc/tidepool/key.pem"
    pub tls_key: Option<PathBuf>,
    /// Most open connections per socket worker; more are closed at accept. 0 = as many as
    /// the descriptor limit allows (raised to its hard maximum at start, less a reserve,
    /// shared among the socket workers). A value the limit cannot hold stops the start with
    /// a message naming both (`deploy/README.md` says how to raise the limit).
    pub max_connections_per_worker: usize,
    /// Largest WebSocket message, in bytes (a frame carrying 10 offers is about 12 KiB).
    pub max_message_size: usize,
    /// Largest WebSocket frame, in bytes.
    pub max_frame_size: usize,
    /// Bytes read from a socket at once. Read buffers come from a per-worker pool and stay
    /// with a connection only while it has sent part of a frame; an idle one holds none.
    pub read_buffer_size: usize,
    /// Outgoing bytes queued per connection before it counts as a slow reader and is closed.
    pub max_outgoing_queue: usize,
    /// Milliseconds a client has to complete the WebSocket handshake (slowloris defence).
    pub handshake_timeout_ms: u64,
    /// Seconds without any frame from a client before it is sent a ping.
    pub ping_interval_secs: u64,
    /// Seconds without any frame from a client (pongs included) before it is closed.
    pub idle_timeout_secs: u64,
    /// A peer id whose connection has sent nothing (no frame, no pong) for this many seconds
    /// may be claimed by a new connection: a client whose network changed reconnects and
    /// keeps its id. Unset: 1.5 × `ping_interval_secs` (30 s by default). When set, at
    /// least 1.5 × `ping_interval_secs` and more than `ping_interval_secs` + 1, so a live
    /// owner has answered a ping in time and cannot be hijacked.
    /// Example: 30
    pub takeover_grace_secs: Option<u64>,
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
            max_connections_per_worker: 0,
            max_message_size: 64 * 1024,
            max_frame_size: 64 * 1024,
            read_buffer_size: 16 * 1024,
            max_outgoing_queue: 256 * 1024,
            handshake_timeout_ms: 10_000,
            ping_interval_secs: 20,
            idle_timeout_secs: 180,
            takeover_grace_secs: None,
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
    /// Most peers one connection may hold at once, across swarms: one per swarm it joined,
    /// plus any further peer ids in a swarm (npm clients share one socket per tracker for
    /// every torrent they have). Leaving (`stopped`, or silence past `peer_timeout_secs`)
    /// frees a place. About 100 bytes of tracker memory each.
    pub max_swarms_per_connection: usize,
    /// Most peer ids one connection may hold in one swarm; a new id past this replaces the
    /// connection's least recently announced one there. More than one because the npm
    /// client shares one socket among every client of a process, so two clients of one
    /// process in one torrent are two peers on one socket; small, so a socket that invents
    /// ids cannot fill a swarm.
    pub max_peer_ids_per_swarm: usize,
    /// Answer a scrape without `info_hash` (every swarm). Off: such scrapes get a failure
    /// reply. On: they are served from one snapshot shared by all clients.
    pub full_scrape: bool,
    /// Seconds between rebuilds of the full-scrape snapshot, and the least time between two
    /// full scrapes from one connection.
    pub full_scrape_interval_secs: u64,
    /// Most swarms in a full scrape (the largest ones); at most 240 bytes each on the wire,
    /// and the whole reply must fit in half of `network.max_outgoing_queue`.
    pub full_scrape_max_swarms: usize,
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
            max_swarms_per_connection: 1024,
            max_peer_ids_per_swarm: 4,
            full_scrape: false,
            full_scrape_interval_secs: 30,
            full_scrape_max_swarms: 500,
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
    /// Bytes the messages in each channel between workers may hold (offers included), so a
    /// burst of large announces cannot fill memory. A message that does not fit is refused
    /// (a request gets a failure reply; a reply is dropped and counted). At least two
    /// largest messages and the largest scrape reply part.
    pub channel_bytes: usize,
    /// Milliseconds a scrape waits for every swarm worker's part before it is answered with
    /// a failure (a part can be dropped under overload).
    pub reply_timeout_ms: u64,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            socket_workers: 1,
            swarm_workers: 1,
            channel_capacity: 16 * 1024,
            channel_bytes: 32 * 1024 * 1024,
            reply_timeout_ms: 5_000,
        }
    }
}

/// Which swarms are served.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct AccessListConfig {
    /// `off`, `allow` (only listed swarms) or `deny` (all but listed swarms).
    pub mode: AccessListMode,
    /// File of info hashes, 40 hex digits per line; `#` starts a comment. Required for allow
    /// and deny. Reloaded on SIGUSR1.
    /// Example: "/etc/tidepool/access-list.txt"
    pub path: Option<PathBuf>,
    /// Also reload the file this often, in seconds (0 = only on SIGUSR1).
    pub reload_interval_secs: u64,
}

/// Signed tokens (JWTs, EdDSA or HMAC) for private pools. With a key set, every connection
/// must present a token in its upgrade request (`?token=…` in the URL, as browsers can, or
/// `Authorization: Bearer …`); one that is missing or invalid gets HTTP 401 before the
/// upgrade. Announces and scrapes are limited to the token's pools, and the connection is
/// closed (1008) when the token expires. `tidepool-tracker token keygen` makes keys and
/// `tidepool-tracker token issue` tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// JWK set of verification keys (Ed25519 public keys, HMAC secrets), each with its `kid`.
    /// Unset: no token is asked for. Reloaded on SIGHUP; connections whose key is gone are
    /// closed.
    /// Example: "/etc/tidepool/keys.jwks"
    pub keys: Option<PathBuf>,
    /// Revoked token ids (`jti`), one per line, `#` comments. Reloaded on SIGHUP and every
    /// `reload_interval_secs`; open connections holding a revoked token are closed.
    /// Example: "/etc/tidepool/revoked.txt"
    pub revoked: Option<PathBuf>,
    /// Also reload the keys and the revocation list this often, in seconds (0 = SIGHUP only).
    pub reload_interval_secs: u64,
    /// Seconds of clock skew tolerated between token issuer and tracker (`exp`, `nbf`).
    pub leeway_secs: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            keys: None,
            revoked: None,
            reload_interval_secs: 0,
            leeway_secs: 5,
        }
    }
}

/// Several tracker instances sharing swarms through a NATS bus (core NATS, no JetStream).
/// Info hashes fall into `shards` virtual shards; each shard is owned by one live instance
/// (rendezvous hashing over the members heard on the bus), and requests for a shard another
/// instance owns travel there over NATS, replies coming back the same way. Without
/// `nats_url` the tracker is one process and nothing here costs anything.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// The NATS server (or a comma-separated list of a NATS cluster's servers); or
    /// `--cluster URL`. Unset: no cluster.
    /// Example: "nats://127.0.0.1:4222"
    pub nats_url: Option<String>,
    /// This instance's name on `/stats` and in metric labels (default: the host name and
    /// the listen port). Instances are told apart by a random id drawn at every start.
    /// Example: "tracker-a"
    pub name: Option<String>,
    /// Subject prefix on the bus: clusters sharing one NATS need different prefixes.
    pub subject_prefix: String,
    /// Virtual shards of the info-hash space. Every instance of a cluster must use the same
    /// number (an instance announcing another is ignored, and counted).
    pub shards: u32,
    /// Milliseconds between heartbeats; a member missing `heartbeats_missed` of them in a
    /// row is taken for dead: its shards move and its peers are purged.
    pub heartbeat_interval_ms: u64,
    /// Heartbeats a member may miss before it counts as dead.
    pub heartbeats_missed: u32,
    /// Most members tracked (a bound against forged heartbeats).
    pub max_members: usize,
    /// Milliseconds a cross-instance request for `/stats` waits for each member.
    pub request_timeout_ms: u64,
    /// Largest batch published at once, in bytes (the NATS server's `max_payload`, 1 MiB by
    /// default, lowers it further when smaller; an item too large for either is counted
    /// lost as `too_large`).
    pub max_batch_bytes: usize,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            nats_url: None,
            name: None,
            subject_prefix: "tidepool".into(),
            shards: 1024,
            heartbeat_interval_ms: 500,
            heartbeats_missed: 4,
            max_members: 256,
            request_timeout_ms: 1000,
            max_batch_bytes: 512 * 1024,
        }
    }
}

/// The `/metrics`, `/stats` and `/stats.json` endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address for /metrics, /stats and /stats.json (off unless set; or --metrics ADDR).
    /// Keep it private: it names swarms.
    /// Example: "127.0.0.1:9000"
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
        if self.auth.revoked.is_some() && self.auth.keys.is_none() {
            return fail("auth.revoked needs auth.keys");
        }
        let c = &self.cluster;
        if c.nats_url.is_some() {
            if c.shards == 0 || c.shards > 1 << 16 {
                return fail("cluster.shards must be 1..=65536");
            }
            if c.heartbeat_interval_ms == 0 || c.heartbeats_missed < 2 {
                return fail(
                    "cluster.heartbeat_interval_ms must be positive and cluster.heartbeats_missed at least 2",
                );
            }
            if c.subject_prefix.is_empty()
                || !c
                    .subject_prefix
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
                || c.subject_prefix.starts_with('.')
                || c.subject_prefix.ends_with('.')
            {
                return fail("cluster.subject_prefix must be letters, digits, '_', '-' or '.'");
            }
            if c.max_batch_bytes < n.max_message_size.saturating_add(4096) {
                return fail(
                    "cluster.max_batch_bytes must hold a max-size message (network.max_message_size) and 4 KiB more",
                );
            }
        }
        if self.auth.leeway_secs > 600 {
            return fail("auth.leeway_secs must be at most 600");
        }
        if n.tls_cert.is_some() != n.tls_key.is_some() {
            return fail("network.tls_cert and network.tls_key must be given together");
        }
        if n.max_message_size > 1 << 30 {
            return fail("network.max_message_size must be at most 1 GiB");
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
        if let Some(grace) = n.takeover_grace_secs
            && (grace.saturating_mul(2) < n.ping_interval_secs.saturating_mul(3)
                || grace <= n.ping_interval_secs.saturating_add(1))
        {
            return fail(
                "network.takeover_grace_secs must be at least 1.5 × network.ping_interval_secs and more than it + 1",
            );
        }
        let largest_part = self.protocol.max_scrape_hashes * SCRAPE_PART_BYTES_PER_HASH + 1024;
        if self.workers.channel_bytes < (2 * n.max_message_size).max(largest_part) {
            return fail(
                "workers.channel_bytes must hold two network.max_message_size messages and a scrape part (protocol.max_scrape_hashes × 48 bytes)",
            );
        }
        if self.workers.reply_timeout_ms == 0 {
            return fail("workers.reply_timeout_ms must be at least 1");
        }
        let p = &self.protocol;
        if p.full_scrape_interval_secs == 0 {
            return fail("protocol.full_scrape_interval_secs must be at least 1");
        }
        if p.full_scrape
            && p.full_scrape_max_swarms
                .saturating_mul(FULL_SCRAPE_BYTES_PER_SWARM)
                > n.max_outgoing_queue / 2
        {
            return fail(
                "protocol.full_scrape_max_swarms × 240 bytes must fit in half of network.max_outgoing_queue",
            );
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
        if self.protocol.max_peer_ids_per_swarm == 0 || self.protocol.max_peer_ids_per_swarm > 64 {
            return fail("protocol.max_peer_ids_per_swarm must be 1..=64");
        }
        if self.protocol.max_swarms_per_connection > 65_536 {
            return fail("protocol.max_swarms_per_connection must be at most 65536");
        }
        // Durations beyond a day are mistakes, and would overflow the clock arithmetic.
        const DAY: u64 = 86_400;
        let secs = [
            ("network.ping_interval_secs", n.ping_interval_secs),
            ("network.idle_timeout_secs", n.idle_timeout_secs),
            (
                "network.takeover_grace_secs",
                n.takeover_grace_secs.unwrap_or(0),
            ),
            (
                "network.handshake_timeout_ms",
                n.handshake_timeout_ms / 1000,
            ),
            (
                "protocol.peer_timeout_secs",
                self.protocol.peer_timeout_secs,
            ),
            (
                "protocol.clean_interval_secs",
                self.protocol.clean_interval_secs,
            ),
            (
                "protocol.full_scrape_interval_secs",
                self.protocol.full_scrape_interval_secs,
            ),
            (
                "workers.reply_timeout_ms",
                self.workers.reply_timeout_ms / 1000,
            ),
            (
                "access_list.reload_interval_secs",
                self.access_list.reload_interval_secs,
            ),
        ];
        if let Some((name, _)) = secs.iter().find(|(_, v)| *v > DAY) {
            return Err(ConfigError::Invalid(format!(
                "{name} must be at most one day"
            )));
        }
        if n.ping_interval_secs == 0 {
            return fail("network.ping_interval_secs must be at least 1");
        }
        if n.handshake_timeout_ms < 100 {
            return fail("network.handshake_timeout_ms must be at least 100");
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

    /// This config as TOML, each field preceded by its doc comment from this file; optional
    /// fields left unset are shown commented out with their example.
    pub fn to_commented_toml(&self) -> String {
        let table = toml::Table::try_from(self).unwrap_or_default();
        let mut out = String::from(
            "# tidepool-tracker configuration. Every field is optional; unset fields take the\n# defaults (which `--print-config` alone prints).\n",
        );
        let comment = |out: &mut String, doc: &str| {
            for line in doc.lines().filter(|l| !l.starts_with("Example: ")) {
                out.push_str(&format!("# {line}\n").replace("# \n", "#\n"));
            }
        };
        for (section, section_type, section_doc) in docs::fields("Config") {
            out.push_str(&format!("\n[{section}]\n"));
            comment(&mut out, section_doc);
            let values = table.get(section).and_then(toml::Value::as_table);
            for (key, _, doc) in docs::fields(section_type) {
                out.push('\n');
                comment(&mut out, doc);
                match values.and_then(|v| v.get(key)) {
                    Some(value) => out.push_str(&format!("{key} = {value}\n")),
                    None => {
                        let example = doc.lines().find_map(|l| l.strip_prefix("Example: "));
                        out.push_str(&format!("# {key} = {}\n", example.unwrap_or("")));
                    }
                }
            }
        }
        out
    }

    /// How long a peer id's owner must be silent before another connection may claim it.
    pub fn takeover_grace(&self) -> Duration {
        let n = &self.network;
        Duration::from_secs(
            n.takeover_grace_secs.unwrap_or(
                (n.ping_interval_secs * 3)
                    .div_ceil(2)
                    .max(n.ping_interval_secs + 2),
            ),
        )
    }

    /// How long a connection's record of a peer it holds outlives the peer's last announce:
    /// past the peer timeout, a whole cleaning interval more than the swarm worker's next
    /// cleaning can take (its cleanings drift by a batch), so the record never goes before
    /// the peer does (a close in between would not name it).
    pub(crate) fn membership_timeout(&self) -> Duration {
        let p = &self.protocol;
        Duration::from_secs(p.peer_timeout_secs + 2 * p.clean_interval_secs)
    }

    pub(crate) fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.network.handshake_timeout_ms)
    }
}

/// Worst-case bytes of one swarm in a full-scrape reply: the id with every byte escaped
/// (122), the keys (~45) and three counts at their widest (60).
pub(crate) const FULL_SCRAPE_BYTES_PER_SWARM: usize = 240;
/// Bytes a scrape reply part holds per info hash in a channel (`(InfoHash, ScrapeStats)`).
pub(crate) const SCRAPE_PART_BYTES_PER_HASH: usize = 48;

/// The doc comments of this file's structs, collected by `build.rs`.
mod docs {
    include!(concat!(env!("OUT_DIR"), "/config_docs.rs"));

    /// (field, type name, doc) of each field of `ty`, in declaration order.
    pub(super) fn fields(
        ty: &str,
    ) -> impl Iterator<Item = (&'static str, &'static str, &'static str)> {
        let ty = ty.to_owned();
        FIELDS
            .iter()
            .filter(move |(t, ..)| *t == ty)
            .map(|&(_, field, field_type, doc)| (field, field_type, doc))
    }
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
        let mut settings = 0;
        for (i, line) in lines.iter().enumerate() {
            if line.contains(" = ") && !line.starts_with("# ") || line.starts_with("# tls_") {
                settings += 1;
                assert!(
                    lines[i - 1].starts_with("# ") && lines[i - 1].len() > 10,
                    "no comment above {line}"
                );
            }
        }
        // Every field of every section is printed, the unset optional ones commented out.
        let fields: usize = docs::fields("Config")
            .map(|(_, ty, _)| docs::fields(ty).count())
            .sum();
        assert!(fields >= 30, "{fields}");
        assert!(settings >= 2);
        for (section, ty, _) in docs::fields("Config") {
            for (key, _, doc) in docs::fields(ty) {
                assert!(!doc.trim().is_empty(), "{section}.{key} has no doc comment");
                assert!(
                    text.contains(&format!("\n{key} = "))
                        || text.contains(&format!("\n# {key} = ")),
                    "{section}.{key} not printed"
                );
            }
        }
        assert!(text.contains("# tls_cert = \"/etc/tidepool/cert.pem\""));
        assert!(
            text.contains("# Address to listen on. Loopback by default"),
            "doc comments reach the output"
        );
    }

    #[test]
    fn an_edited_template_parses_with_its_commented_settings_enabled() {
        let text = Config::default().to_commented_toml().replace(
            "# listen = \"127.0.0.1:9000\"",
            "listen = \"127.0.0.1:9000\"",
        );
        let c = Config::from_toml(&text).expect("parses");
        assert_eq!(
            c.metrics.listen,
            Some("127.0.0.1:9000".parse().expect("addr"))
        );
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
