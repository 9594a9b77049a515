//! The metrics HTTP endpoint: `/metrics` (Prometheus text), `/stats` (a page for people) and
//! `/stats.json`, on their own address so the public port never serves them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;

use crate::cluster::{MemberReply, MemberView};
use crate::metrics::{CloseReason, ErrorKind, Metrics};
use crate::server::Shared;

/// The OpenMetrics text format `prometheus-client` writes (Prometheus reads it natively).
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves until `stop` resolves, on the runtime the caller runs it on.
pub(crate) async fn serve(
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    stop: impl Future<Output = ()> + Send + 'static,
) {
    let listener = match listener
        .set_nonblocking(true)
        .and_then(|()| tokio::net::TcpListener::from_std(listener))
    {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("metrics endpoint: {e}");
            return;
        }
    };
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/stats.json", get(stats_json))
        .route("/", get(stats_html))
        .route("/stats", get(stats_html))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
        .with_state(shared);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await
    {
        tracing::error!("metrics endpoint stopped: {e}");
    }
}

fn no_store(kind: &'static str, body: String) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

async fn metrics(axum::extract::State(shared): axum::extract::State<Arc<Shared>>) -> Response {
    let mut families = shared.metrics.families();
    let mut labels = Vec::new();
    if let Some(cluster) = shared.cluster.get() {
        families.extend(cluster.families());
        labels.push(("cluster_member".to_owned(), cluster.name.clone()));
    }
    no_store(OPENMETRICS, crate::metrics::render(families, &labels))
}

async fn stats_json(axum::extract::State(shared): axum::extract::State<Arc<Shared>>) -> Response {
    let snap = snapshot(&shared).await;
    no_store(
        "application/json",
        serde_json::to_string(&snap).unwrap_or_default(),
    )
}

async fn stats_html(axum::extract::State(shared): axum::extract::State<Arc<Shared>>) -> Response {
    let snap = snapshot(&shared).await;
    no_store("text/html; charset=utf-8", render_html(&snap))
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
    /// The cluster, when this instance is in one.
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster: Option<ClusterSnapshot>,
}

/// The members as this instance sees them, and each other member's own totals (asked over
/// the bus, each within the request timeout; a silent member is listed with the failure).
#[derive(Debug, Serialize)]
struct ClusterSnapshot {
    name: String,
    members: Vec<MemberView>,
    replies: Vec<MemberReply>,
}

#[derive(Debug, Serialize)]
struct TopSwarm {
    info_hash: String,
    seeders: u64,
    leechers: u64,
}

async fn snapshot(shared: &Shared) -> Snapshot {
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
    let cluster = match shared.cluster.get() {
        Some(c) => Some(ClusterSnapshot {
            name: c.name.clone(),
            members: c.members(),
            replies: c.gather().await,
        }),
        None => None,
    };
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
        cluster,
    }
}

/// Member names come from the bus: escaped before they reach the page.
fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
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
    let cluster = s.cluster.as_ref().map_or_else(String::new, |c| {
        let replies: std::collections::HashMap<&str, &MemberReply> =
            c.replies.iter().map(|r| (r.id.as_str(), r)).collect();
        let rows: String = c
            .members
            .iter()
            .map(|m| {
                let reply = replies.get(m.id.as_str());
                let (peers, status) = match reply {
                    _ if m.me => (
                        (s.seeders + s.leechers).to_string(),
                        "this instance".to_owned(),
                    ),
                    Some(MemberReply {
                        totals: Some(t), ..
                    }) => ((t.seeders + t.leechers).to_string(), "answered".to_owned()),
                    Some(MemberReply { error: Some(e), .. }) => (String::new(), e.clone()),
                    _ => (String::new(), String::new()),
                };
                format!(
                    "<tr><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    html_escape(&m.name),
                    m.id,
                    m.shards_owned,
                    m.last_heard_ms,
                    peers,
                    html_escape(&status)
                )
            })
            .collect();
        format!(
            "<h2>Cluster</h2><table><thead><tr><th>member</th><th>instance</th><th>shards owned</th><th>last heard (ms)</th><th>peers</th><th>stats request</th></tr></thead><tbody>{rows}</tbody></table>"
        )
    });
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
{cluster}
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
