//! `tidepool-tracker`: command-line entry point — config, logging, signals, and the `token`
//! commands that make keys and tokens for private pools.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use mimalloc::MiMalloc;
use tidepool_protocol::InfoHash;
use tidepool_tracker::auth::{Claims, Jwk, JwkSet, KeyKind, Role, SigningKey};
use tidepool_tracker::{Config, Tracker};

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

/// WebSocket signaling tracker for WebTorrent-protocol peer pools.
#[derive(Debug, Parser)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// TOML config file (every field optional; see --print-config).
    #[arg(short, long)]
    config: Option<PathBuf>,
    /// Print the effective config as commented TOML and exit.
    #[arg(short = 'p', long)]
    print_config: bool,
    /// Address to listen on (default 127.0.0.1:8000).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Socket worker threads.
    #[arg(long)]
    socket_workers: Option<usize>,
    /// Swarm worker threads.
    #[arg(long)]
    swarm_workers: Option<usize>,
    /// PEM certificate chain (serves wss:// with --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Serve /metrics, /stats and /stats.json on this address (off by default).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// Join a cluster through this NATS server (`[cluster] nats_url`), e.g. nats://127.0.0.1:4222.
    #[arg(long, value_name = "URL")]
    cluster: Option<String>,
    /// This instance's name in the cluster (`[cluster] name`).
    #[arg(long, value_name = "NAME", requires = "cluster")]
    cluster_name: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Keys and tokens for private pools (`[auth]` in the config).
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Make a signing key: writes the private key (a JWK) to --private, and the public key
    /// as a JWK set to stdout, or appended to --keys (the tracker's `auth.keys` file).
    Keygen {
        /// Key id, named in every token it signs (e.g. the month it starts signing).
        #[arg(long)]
        kid: String,
        /// Where the private key goes (created with mode 0600; never overwritten).
        #[arg(long)]
        private: PathBuf,
        /// Add the public key to this JWK set file (created if missing).
        #[arg(long)]
        keys: Option<PathBuf>,
        /// An HMAC-SHA-256 secret instead of an Ed25519 key pair (the tracker then holds the
        /// secret itself).
        #[arg(long)]
        hmac: bool,
    },
    /// Sign a token with a private key from `token keygen`, and print it.
    Issue {
        /// The private key file.
        #[arg(long)]
        key: PathBuf,
        /// A pool the bearer may join, by name (as `tidepool-node --pool` names it).
        #[arg(long)]
        pool: Vec<String>,
        /// A pool the bearer may join, by info hash (40 hex digits, as in a magnet link).
        #[arg(long)]
        info_hash: Vec<String>,
        /// Every pool on the tracker.
        #[arg(long)]
        any_pool: bool,
        /// How long it is valid: 90s, 30m, 1h, 7d.
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// Seed only (announce as a seeder) or fetch only (announce as a leecher).
        #[arg(long, value_parser = ["seed", "fetch"])]
        role: Option<String>,
        /// Most connections open at once with this token.
        #[arg(long)]
        peers: Option<u32>,
        /// Who it is for (recorded in the token).
        #[arg(long)]
        sub: Option<String>,
    },
}

/// Seconds in "90s", "30m", "1h", "7d" (or a bare number of seconds).
fn parse_duration(text: &str) -> anyhow::Result<u64> {
    let text = text.trim();
    let (digits, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = digits
        .parse()
        .with_context(|| format!("{text:?}: expected a number and a unit (s, m, h, d)"))?;
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => anyhow::bail!("{text:?}: the unit is one of s, m, h, d"),
    };
    n.checked_mul(scale).context("duration too long")
}

fn token_command(command: TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::Keygen {
            kid,
            private,
            keys,
            hmac,
        } => {
            let kind = if hmac { KeyKind::Hs256 } else { KeyKind::EdDsa };
            let jwk = Jwk::generate(kind, &kid)?;
            write_private(&private, &serde_json::to_string_pretty(&jwk)?)?;
            eprintln!("private key written to {}", private.display());
            match keys {
                Some(path) => {
                    let mut set = match std::fs::read_to_string(&path) {
                        Ok(text) => serde_json::from_str::<JwkSet>(&text)
                            .with_context(|| format!("{} is not a JWK set", path.display()))?,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => JwkSet::default(),
                        Err(e) => return Err(e).context(format!("reading {}", path.display())),
                    };
                    if set
                        .keys
                        .iter()
                        .any(|k| k.kid.as_deref() == Some(kid.as_str()))
                    {
                        anyhow::bail!("{} already holds key id {kid:?}", path.display());
                    }
                    set.keys.push(jwk.public());
                    set.save(&path)?;
                    eprintln!(
                        "public key {kid:?} added to {} ({} keys; SIGHUP the tracker to load it)",
                        path.display(),
                        set.keys.len()
                    );
                }
                None => println!(
                    "{}",
                    serde_json::to_string_pretty(&JwkSet::public(&[&jwk]))?
                ),
            }
        }
        TokenCommand::Issue {
            key,
            pool,
            info_hash,
            any_pool,
            ttl,
            role,
            peers,
            sub,
        } => {
            let key = SigningKey::load(&key)?;
            let mut pools: Vec<String> =
                pool.iter().map(|p| InfoHash::of_pool(p).to_hex()).collect();
            for hex in &info_hash {
                let hash = InfoHash::from_hex(hex)
                    .with_context(|| format!("--info-hash {hex:?}: expected 40 hex digits"))?;
                pools.push(hash.to_hex());
            }
            if any_pool {
                pools.push("*".into());
            }
            if pools.is_empty() {
                anyhow::bail!("name the pools: --pool NAME, --info-hash HEX or --any-pool");
            }
            let claims = Claims {
                sub,
                role: role.map(|r| if r == "seed" { Role::Seed } else { Role::Fetch }),
                peers,
                ..Claims::new(pools, parse_duration(&ttl)?)
            };
            let token = key.issue(&claims)?;
            // The id goes to stderr, for the operator's records (revocation names it).
            eprintln!(
                "token id (jti): {}",
                claims.jti.as_deref().unwrap_or_default()
            );
            println!("{token}");
        }
    }
    Ok(())
}

/// Creates `path` readable by its owner only, refusing to replace an existing key.
fn write_private(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| {
            format!(
                "creating {} (an existing key is never overwritten)",
                path.display()
            )
        })?;
    file.write_all(text.as_bytes())?;
    file.write_all(b"\n")?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    // A worker thread that panics would leave the process up but its connections, listener
    // and swarms dead: print the panic, then exit so a supervisor restarts a whole tracker.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::exit(101);
    }));
    let cli = Cli::parse();
    if let Some(Command::Token(command)) = cli.command {
        return token_command(command);
    }
    let mut config = match &cli.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            Config::from_toml(&text).with_context(|| format!("in {}", path.display()))?
        }
        None => Config::default(),
    };
    if let Some(listen) = cli.listen {
        config.network.listen = listen;
    }
    if let Some(n) = cli.socket_workers {
        config.workers.socket_workers = n;
    }
    if let Some(n) = cli.swarm_workers {
        config.workers.swarm_workers = n;
    }
    if cli.tls_cert.is_some() {
        config.network.tls_cert = cli.tls_cert;
        config.network.tls_key = cli.tls_key;
    }
    if cli.metrics.is_some() {
        config.metrics.listen = cli.metrics;
    }
    if cli.cluster.is_some() {
        config.cluster.nats_url = cli.cluster;
    }
    if cli.cluster_name.is_some() {
        config.cluster.name = cli.cluster_name;
    }
    config.validate()?;
    if cli.print_config {
        print!("{}", config.to_commented_toml());
        return Ok(());
    }

    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();

    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP, SIGUSR1])
        .context("installing signal handlers")?;
    let tracker = Tracker::start(config.clone())?;
    tracing::info!(
        "tidepool-tracker {} listening on {} ({} socket workers, {} swarm workers)",
        env!("CARGO_PKG_VERSION"),
        tracker.url(),
        config.workers.socket_workers,
        config.workers.swarm_workers,
    );
    if let Some(keys) = &config.auth.keys {
        tracing::info!("tokens required (keys from {})", keys.display());
    }
    if let Some(addr) = tracker.metrics_addr() {
        tracing::info!("metrics on http://{addr}/metrics, stats page on http://{addr}/stats");
    }
    for signal in signals.forever() {
        match signal {
            SIGHUP => {
                match tracker.reload_tls() {
                    Ok(()) => tracing::info!("SIGHUP: certificate reloaded"),
                    Err(e) => tracing::error!("SIGHUP: {e}; keeping the previous certificate"),
                }
                if config.auth.keys.is_some() {
                    match tracker.reload_auth() {
                        Ok(()) => tracing::info!("SIGHUP: token keys and revocations reloaded"),
                        Err(e) => tracing::error!("SIGHUP: {e}; keeping the previous keys"),
                    }
                }
            }
            SIGUSR1 => match tracker.reload_access_list() {
                Ok(n) => tracing::info!("SIGUSR1: access list reloaded ({n} info hashes)"),
                Err(e) => tracing::error!("SIGUSR1: {e}; keeping the previous access list"),
            },
            _ => {
                tracing::info!("signal {signal}: shutting down");
                break;
            }
        }
    }
    tracker.shutdown();
    tracing::info!("stopped");
    Ok(())
}
