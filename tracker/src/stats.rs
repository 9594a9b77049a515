//! The metrics HTTP endpoint: `/metrics` (Prometheus text), `/stats` (a page for people) and
//! `/stats.json`, on their own address so the public port never serves them.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde::Serialize;

use crate::metrics::{CloseReason, ErrorKind, Metrics};
use crate::server::Shared;

/// Requests served at once; more wait in the listen backlog.
const MAX_CONCURRENT: usize = 16;
const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// Accepts until shutdown (the tracker wakes this accept by connecting once).
pub(crate) fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let busy = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        if shared.shutting_down() {
            return;
        }
        let Ok(stream) = stream else { continue };
        if busy.fetch_add(1, Ordering::AcqRel) >= MAX_CONCURRENT {
            busy.fetch_sub(1, Ordering::AcqRel);
            continue;
        }
        let (shared, busy) = (shared.clone(), busy.clone());
        let spawned = std::thread::Builder::new()
            .name("stats-http".into())
            .spawn(move || {
                respond(stream, &shared);
                busy.fetch_sub(1, Ordering::AcqRel);
            });
        if spawned.is_err() {
            tracing::warn!("could not spawn a stats request thread");
        }
    }
}

fn respond(mut stream: TcpStream, shared: &Shared) {
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let mut buf = [0u8; 8192];
    let mut len = 0;
    // Only the request line matters; read until the end of the headers or the buffer.
    while len < buf.len() && !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf[len..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => len += n,
        }
    }
    let head = String::from_utf8_lossy(&buf[..len]);
    let mut parts = head.lines().next().unwrap_or_default().split_whitespace();
    let (method, target) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or("/"),
    );
    let path = target.split('?').next().unwrap_or_default();
    let (status, kind, body) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            shared.metrics.render_prometheus(),
        ),
        ("GET", "/stats.json") => (
            "200 OK",
            "application/json",
            serde_json::to_string(&snapshot(shared)).unwrap_or_default(),
        ),
        ("GET", "/" | "/stats") => (
            "200 OK",
            "text/html; charset=utf-8",
            render_html(&snapshot(shared)),
        ),
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".into()),
        _ => ("405 Method Not Allowed", "text/plain", "only GET\n".into()),
    };
    let header = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(header.as_bytes());
    let _ = stream.write_all(body.as_bytes());
}

/// What `/stats.json` returns and `/stats` shows.
#[derive(Debug, Serialize)]
pub(crate) struct Snapshot {
    version: &'static str,
    uptime_secs: u64,
    connections: u64,
    swarms: u64,
    peers: u64,
    seeders: u64,
    leechers: u64,
    messages_in_per_sec: f64,
    messages_out_per_sec: f64,
    announces_per_sec: f64,
    offers_per_sec: f64,
    messages_in: u64,
    messages_out: u64,
    closed: BTreeMap<&'static str, u64>,
    errors: BTreeMap<&'static str, u64>,
    top_swarms: Vec<TopSwarm>,
}

#[derive(Debug, Serialize)]
struct TopSwarm {
    info_hash: String,
    seeders: u64,
    leechers: u64,
}

fn snapshot(shared: &Shared) -> Snapshot {
    let m: &Metrics = &shared.metrics;
    let t = m.totals();
    let rates = m.rates.lock().map(|r| *r).unwrap_or_default();
    let sum = |f: &dyn Fn(&crate::metrics::SocketMetrics) -> u64| -> u64 {
        m.sockets.iter().map(f).sum()
    };
    let labelled = |labels: &'static [&'static str],
                    f: &dyn Fn(&crate::metrics::SocketMetrics, usize) -> u64| {
        labels
            .iter()
            .enumerate()
            .map(|(i, l)| (*l, sum(&|s| f(s, i))))
            .collect()
    };
    let round = |x: f64| (x * 10.0).round() / 10.0;
    Snapshot {
        version: env!("CARGO_PKG_VERSION"),
        uptime_secs: m.started.elapsed().as_secs(),
        connections: t.connections,
        swarms: t.swarms,
        peers: t.seeders + t.leechers,
        seeders: t.seeders,
        leechers: t.leechers,
        messages_in_per_sec: round(rates.messages_in),
        messages_out_per_sec: round(rates.messages_out),
        announces_per_sec: round(rates.announces),
        offers_per_sec: round(rates.offers),
        messages_in: t.messages_in,
        messages_out: t.messages_out,
        closed: labelled(CloseReason::LABELS, &|s, i| {
            s.closed[i].load(Ordering::Relaxed)
        }),
        errors: labelled(ErrorKind::LABELS, &|s, i| {
            s.errors[i].load(Ordering::Relaxed)
        }),
        top_swarms: m
            .top_swarms(shared.config.metrics.top_swarms)
            .into_iter()
            .map(|(h, s)| TopSwarm {
                info_hash: h.0.iter().map(|b| format!("{b:02x}")).collect(),
                seeders: s.complete,
                leechers: s.incomplete,
            })
            .collect(),
    }
}

fn uptime(secs: u64) -> String {
    format!(
        "{}d {:02}h {:02}m {:02}s",
        secs / 86400,
        secs / 3600 % 24,
        secs / 60 % 60,
        secs % 60
    )
}

/// The page renders complete on the server (readable without scripts), then refreshes its
/// numbers from `/stats.json` every two seconds.
fn render_html(s: &Snapshot) -> String {
    let rows: String = s
        .top_swarms
        .iter()
        .map(|t| {
            format!(
                "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td></tr>",
                t.info_hash,
                t.seeders,
                t.leechers,
                t.seeders + t.leechers
            )
        })
        .collect();
    let card = |id: &str, label: &str, value: String| {
        format!(
            "<div class=card><div class=label>{label}</div><div class=value id={id}>{value}</div></div>"
        )
    };
    let cards = [
        card("connections", "connections", s.connections.to_string()),
        card("swarms", "swarms", s.swarms.to_string()),
        card("peers", "peers", s.peers.to_string()),
        card("seeders", "seeders", s.seeders.to_string()),
        card("leechers", "leechers", s.leechers.to_string()),
        card(
            "messages_in_per_sec",
            "messages in / s",
            s.messages_in_per_sec.to_string(),
        ),
        card(
            "messages_out_per_sec",
            "messages out / s",
            s.messages_out_per_sec.to_string(),
        ),
        card(
            "announces_per_sec",
            "announces / s",
            s.announces_per_sec.to_string(),
        ),
        card(
            "offers_per_sec",
            "offers relayed / s",
            s.offers_per_sec.to_string(),
        ),
    ]
    .concat();
    format!(
        r#"<!doctype html>
<html lang=en><head><meta charset=utf-8><title>tidepool tracker</title>
<meta name=viewport content="width=device-width, initial-scale=1">
<style>
body{{font-family:system-ui,sans-serif;margin:2rem;background:#f6f8fa;color:#1f2328}}
h1{{font-size:1.4rem;margin:0 0 .3rem}} .sub{{color:#59636e;margin-bottom:1.2rem}}
.cards{{display:grid;grid-template-columns:repeat(auto-fill,minmax(10rem,1fr));gap:.8rem}}
.card{{background:#fff;border:1px solid #d1d9e0;border-radius:8px;padding:.8rem}}
.label{{color:#59636e;font-size:.85rem}} .value{{font-size:1.6rem;font-variant-numeric:tabular-nums}}
table{{border-collapse:collapse;margin-top:1.2rem;background:#fff}}
td,th{{border:1px solid #d1d9e0;padding:.3rem .7rem;text-align:right}} td:first-child,th:first-child{{text-align:left}}
</style></head>
<body data-refreshes=0>
<h1>tidepool tracker</h1>
<div class=sub>version {version} · up <span id=uptime>{uptime}</span> · refreshed every 2 s from <a href=stats.json>stats.json</a> · <a href=metrics>metrics</a></div>
<div class=cards>{cards}</div>
<h2>Largest swarms</h2>
<table><thead><tr><th>info hash</th><th>seeders</th><th>leechers</th><th>peers</th></tr></thead>
<tbody id=top>{rows}</tbody></table>
<script>
function uptime(s){{const p=n=>String(n).padStart(2,'0');return Math.floor(s/86400)+'d '+p(Math.floor(s/3600)%24)+'h '+p(Math.floor(s/60)%60)+'m '+p(s%60)+'s'}}
async function refresh(){{
  try{{
    const s=await (await fetch('stats.json',{{cache:'no-store'}})).json();
    for(const k of ['connections','swarms','peers','seeders','leechers','messages_in_per_sec','messages_out_per_sec','announces_per_sec','offers_per_sec'])
      document.getElementById(k).textContent=s[k];
    document.getElementById('uptime').textContent=uptime(s.uptime_secs);
    const tb=document.getElementById('top');tb.textContent='';
    for(const t of s.top_swarms){{const tr=tb.insertRow();
      for(const v of [t.info_hash,t.seeders,t.leechers,t.seeders+t.leechers]){{const td=tr.insertCell();td.textContent=v}}
      tr.cells[0].style.fontFamily='monospace'}}
    document.body.dataset.refreshes=Number(document.body.dataset.refreshes)+1;
  }}catch(e){{document.body.dataset.error=String(e)}}
}}
refresh();setInterval(refresh,2000);
</script>
</body></html>
"#,
        version = s.version,
        uptime = uptime(s.uptime_secs),
    )
}
