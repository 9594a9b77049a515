//! node-bulk: one peer streams a payload to another over a data channel in 64 KiB messages,
//! through the tidepool-node library (`library`) and through two bare webrtc
//! `PeerConnection`s with the same settings (`raw`), each in its own process so CPU time
//! and peak RSS are its own. `compare` runs both, alternating, and prints the ratio.
//!
//! Usage: node-bulk compare [--mib 256] [--rounds 3]
//!        node-bulk library|raw [--mib 256]      (one run; prints one JSON line)
//! Either takes `--window-kib K` (SCTP receive window) and `--send-kib K` (send-buffer
//! limit) to try other settings than the node's defaults (4 MiB each).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use mimalloc::MiMalloc;
use rtc::peer_connection::configuration::setting_engine::SctpMaxMessageSize;
use tidepool_node::{Channel, Event, Node, NodeConfig};
use webrtc::data_channel::{DataChannel, DataChannelEvent, RTCDataChannelInit};
use webrtc::peer_connection::{
    PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCConfigurationBuilder,
    RTCIceGatheringState, SettingEngineBuilder,
};

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

const MESSAGE: usize = 64 * 1024;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The node's config for these runs, with the window and send-buffer limit overridden.
fn bulk_config(tracker_url: String) -> NodeConfig {
    let mut c = NodeConfig::new(tracker_url, "bulk").for_loopback();
    let kib = |name, default: u64| arg(name, default).saturating_mul(1024);
    let window = kib("--window-kib", u64::from(c.sctp_receive_window) >> 10);
    c.sctp_receive_window = u32::try_from(window).unwrap_or(u32::MAX);
    let send = kib("--send-kib", c.send_buffer_limit as u64 >> 10);
    c.send_buffer_limit = usize::try_from(send).unwrap_or(usize::MAX);
    c
}

/// CPU seconds (user + system) and peak RSS in KiB of this process, from /proc.
fn usage() -> (f64, u64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 (1-based), i.e. 11 and 12 after the ')'.
    let cpu = (ticks(11) + ticks(12)) / 100.0;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let hwm = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    (cpu, hwm)
}

fn report(mode: &str, bytes: u64, elapsed: Duration, drops: Option<u64>) {
    let (cpu, rss) = usage();
    let mib = bytes as f64 / (1024.0 * 1024.0);
    println!(
        "{{\"mode\":\"{mode}\",\"mib\":{mib:.0},\"seconds\":{:.3},\"mib_per_s\":{:.1},\"cpu_seconds\":{cpu:.2},\"peak_rss_mib\":{:.1},\"udp_rcvbuf_errors\":{}}}",
        elapsed.as_secs_f64(),
        mib / elapsed.as_secs_f64(),
        rss as f64 / 1024.0,
        drops.map_or("null".into(), |d| d.to_string()),
    );
}

async fn library(total: u64) -> anyhow::Result<()> {
    let mut tc = tidepool_tracker::Config::default();
    tc.network.listen = "127.0.0.1:0".parse()?;
    let tracker = tidepool_tracker::Tracker::start(tc)?;
    let config = bulk_config(tracker.url());
    let sender = Node::join(config.clone()).await?;
    let mut rc = config;
    rc.peer_id = tidepool_node::config::random_peer_id();
    let receiver = Node::join(rc).await?;
    let peer = loop {
        match sender.next_event().await {
            Some(Event::PeerConnected { peer }) => break peer,
            Some(_) => {}
            None => bail!("sender stopped"),
        }
    };
    let drops_before = tidepool_node::udp::kernel_udp_rcvbuf_errors();
    let start = Instant::now();
    let recv = tokio::spawn(async move {
        let mut got = 0u64;
        while got < total {
            match receiver.next_event().await {
                Some(Event::Message { data, .. }) => got += data.len() as u64,
                Some(e) => eprintln!("receiver event: {e:?}"),
                None => break,
            }
        }
        got
    });
    let buf = vec![0x5au8; MESSAGE];
    for i in 0..total / MESSAGE as u64 {
        if let Err(e) = sender.send(peer, Channel::Chunks, &buf).await {
            eprintln!("send {i} failed after {:?}: {e}", start.elapsed());
            while let Ok(Some(ev)) =
                tokio::time::timeout(Duration::from_millis(200), sender.next_event()).await
            {
                eprintln!("sender event: {ev:?}");
            }
            return Err(e.into());
        }
    }
    let got = tokio::time::timeout(Duration::from_secs(300), recv).await??;
    let elapsed = start.elapsed();
    if got != total {
        bail!("received {got} of {total} bytes");
    }
    let drops = match (tidepool_node::udp::kernel_udp_rcvbuf_errors(), drops_before) {
        (Some(a), Some(b)) => Some(a - b),
        _ => None,
    };
    report("library", got, elapsed, drops);
    Ok(())
}

#[derive(Clone)]
struct Gathered(Arc<tokio::sync::Notify>);

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Gathered {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            self.0.notify_one();
        }
    }
}

/// A bare connection with the library's settings: same runtime (UDP buffers), SCTP message
/// size and window, send-buffer limit, one negotiated ordered channel.
async fn bare(
    config: &NodeConfig,
    runtime: Arc<tidepool_node::udp::BufferedRuntime>,
) -> anyhow::Result<(
    Arc<dyn PeerConnection>,
    Arc<dyn DataChannel>,
    Arc<tokio::sync::Notify>,
)> {
    let gathered = Arc::new(tokio::sync::Notify::new());
    let pc = PeerConnectionBuilder::new()
        .with_configuration(RTCConfigurationBuilder::new().build())
        .with_setting_engine(
            SettingEngineBuilder::new()
                .with_sctp_max_message_size(SctpMaxMessageSize::Bounded(
                    (config.max_message_size + tidepool_node::wire::DATA_HEADER) as u32,
                ))
                .with_sctp_max_receive_buffer_size(config.sctp_receive_window)
                .build(),
        )
        .with_handler(Arc::new(Gathered(gathered.clone())))
        .with_runtime(runtime)
        .with_udp_addrs(vec!["127.0.0.1:0".to_owned()])
        .with_data_channel_send_buffer_limit(config.send_buffer_limit)
        .build()
        .await?;
    let pc: Arc<dyn PeerConnection> = Arc::new(pc);
    let dc = pc
        .create_data_channel(
            "chunks",
            Some(RTCDataChannelInit {
                ordered: true,
                negotiated: Some(1),
                ..Default::default()
            }),
        )
        .await?;
    Ok((pc, dc, gathered))
}

async fn raw(total: u64) -> anyhow::Result<()> {
    let config = bulk_config("ws://unused".into());
    let runtime = Arc::new(tidepool_node::udp::BufferedRuntime::new(
        config.udp_socket_buffer,
    ));
    let (a, a_dc, a_gathered) = bare(&config, runtime.clone()).await?;
    let (b, b_dc, b_gathered) = bare(&config, runtime).await?;
    let offer = a.create_offer(None).await?;
    a.set_local_description(offer).await?;
    let _ = tokio::time::timeout(Duration::from_secs(5), a_gathered.notified()).await;
    b.set_remote_description(a.local_description().await.context("offer")?)
        .await?;
    let answer = b.create_answer(None).await?;
    b.set_local_description(answer).await?;
    let _ = tokio::time::timeout(Duration::from_secs(5), b_gathered.notified()).await;
    a.set_remote_description(b.local_description().await.context("answer")?)
        .await?;
    let received = Arc::new(AtomicU64::new(0));
    let (opened_tx, opened_rx) = tokio::sync::oneshot::channel();
    let r = received.clone();
    let recv = tokio::spawn(async move {
        while let Some(ev) = b_dc.poll().await {
            if let DataChannelEvent::OnMessage(m) = ev
                && r.fetch_add(m.data.len() as u64, Ordering::Relaxed) + m.data.len() as u64
                    >= total
            {
                break;
            }
        }
    });
    let pump = tokio::spawn({
        let a_dc = a_dc.clone();
        async move {
            let mut opened = Some(opened_tx);
            while let Some(ev) = a_dc.poll().await {
                if matches!(ev, DataChannelEvent::OnOpen)
                    && let Some(tx) = opened.take()
                {
                    let _ = tx.send(());
                }
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(20), opened_rx)
        .await
        .context("channel open")??;
    let drops_before = tidepool_node::udp::kernel_udp_rcvbuf_errors();
    let start = Instant::now();
    // Same frames as the library sends: its 10-byte header on a 64 KiB payload.
    let frame = tidepool_node::wire::data(0, 0, &vec![0x5au8; MESSAGE]);
    for _ in 0..total / MESSAGE as u64 {
        a_dc.send(frame.clone()).await?;
    }
    tokio::time::timeout(Duration::from_secs(300), recv).await??;
    let elapsed = start.elapsed();
    let drops = match (tidepool_node::udp::kernel_udp_rcvbuf_errors(), drops_before) {
        (Some(x), Some(y)) => Some(x - y),
        _ => None,
    };
    let got = received.load(Ordering::Relaxed);
    let payload = got / (MESSAGE as u64 + 10) * MESSAGE as u64;
    report("raw", payload, elapsed, drops);
    pump.abort();
    let _ = a.close().await;
    let _ = b.close().await;
    Ok(())
}

fn compare(mib: u64, rounds: u64) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let mut results: Vec<(String, String)> = Vec::new();
    for round in 0..rounds {
        // Alternate the order so neither mode always runs on a warmer machine.
        let order = if round % 2 == 0 {
            ["raw", "library"]
        } else {
            ["library", "raw"]
        };
        for mode in order {
            let out = std::process::Command::new(&exe)
                .args([mode, "--mib", &mib.to_string()])
                .output()?;
            if !out.status.success() {
                bail!("{mode} failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            let line = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            println!("{line}");
            results.push((mode.to_owned(), line));
        }
    }
    let rate = |mode: &str| -> Vec<f64> {
        results
            .iter()
            .filter(|(m, _)| m == mode)
            .filter_map(|(_, l)| {
                l.split("\"mib_per_s\":")
                    .nth(1)?
                    .split(',')
                    .next()?
                    .parse()
                    .ok()
            })
            .collect()
    };
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let (lib, raw) = (median(rate("library")), median(rate("raw")));
    println!(
        "median over {rounds} rounds: library {lib:.1} MiB/s, raw webrtc {raw:.1} MiB/s, ratio {:.1}%",
        100.0 * lib / raw
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let mode = std::env::args().nth(1).unwrap_or_else(|| "compare".into());
    let total = arg("--mib", 256) * 1024 * 1024;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match mode.as_str() {
        "library" => rt.block_on(library(total)),
        "raw" => rt.block_on(raw(total)),
        "compare" => compare(arg("--mib", 256), arg("--rounds", 3)),
        other => bail!("unknown mode {other}: library, raw or compare"),
    }
}
