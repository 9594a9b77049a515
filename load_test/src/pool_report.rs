//! The pool campaign's report: `report.html` in the run directory, with three SVG plots
//! beside it — completion CDF, goodput over time, bytes in and out per node — and the
//! summary, the baselines and a per-node table. Everything is drawn from `results.json`,
//! so a report can be rebuilt from an old run.

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;

use crate::pool_run::{NodeResult, PoolRunResult, Role};

const MIB: f64 = 1024.0 * 1024.0;

/// Which of a node's byte counters a bar shows.
type NodeBytes = fn(&NodeResult) -> u64;

/// Rebuilds the report of the run in `dir` from its `results.json`.
pub fn rebuild(dir: &Path) -> anyhow::Result<()> {
    let path = dir.join("results.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    write(&serde_json::from_str(&text)?, dir)
}

/// Writes `completion.svg`, `goodput.svg`, `bytes.svg` and `report.html` into `dir`.
pub fn write(result: &PoolRunResult, dir: &Path) -> anyhow::Result<()> {
    completion_cdf(result, &dir.join("completion.svg"))?;
    goodput(result, &dir.join("goodput.svg"))?;
    bytes_per_node(result, &dir.join("bytes.svg"))?;
    std::fs::write(dir.join("report.html"), html(result))?;
    Ok(())
}

fn completion_cdf(r: &PoolRunResult, path: &Path) -> anyhow::Result<()> {
    let mut times: Vec<f64> = r
        .nodes
        .iter()
        .filter(|n| n.role == Role::Fetcher && n.verified == Some(true))
        .filter_map(|n| n.completion_secs)
        .collect();
    times.sort_by(f64::total_cmp);
    let total = r
        .nodes
        .iter()
        .filter(|n| n.role == Role::Fetcher && !n.removed)
        .count()
        .max(1) as f64;
    let web: Vec<f64> = r
        .webtorrent
        .as_ref()
        .map(|w| {
            let mut t: Vec<f64> = w.completion_secs.iter().flatten().copied().collect();
            t.sort_by(f64::total_cmp);
            t
        })
        .unwrap_or_default();
    let max_x = times
        .iter()
        .chain(&web)
        .fold(1.0f64, |a, b| a.max(*b))
        .max(r.duration_secs.min(1e6))
        * 1.05;
    let root = SVGBackend::new(path, (800, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Completion time CDF (fetchers)", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..max_x, 0.0..1.05)?;
    chart
        .configure_mesh()
        .x_desc("seconds since the fetchers started")
        .y_desc("fraction done")
        .draw()?;
    let steps = |times: &[f64], n: f64| -> Vec<(f64, f64)> {
        let mut pts = vec![(0.0, 0.0)];
        for (i, t) in times.iter().enumerate() {
            pts.push((*t, i as f64 / n));
            pts.push((*t, (i + 1) as f64 / n));
        }
        pts
    };
    chart
        .draw_series(LineSeries::new(steps(&times, total), BLUE.stroke_width(2)))?
        .label("tidepool-node")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    if let Some(w) = &r.webtorrent {
        let n = w.completion_secs.len().max(1) as f64;
        chart
            .draw_series(LineSeries::new(steps(&web, n), RED.stroke_width(2)))?
            .label("npm webtorrent (same tracker, same file)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

fn goodput(r: &PoolRunResult, path: &Path) -> anyhow::Result<()> {
    // Rates between consecutive samples, MiB/s.
    let rate = |f: &dyn Fn(&crate::pool_run::Sample) -> u64| -> Vec<(f64, f64)> {
        r.timeline
            .windows(2)
            .map(|w| {
                let dt = (w[1].t - w[0].t).max(1e-3);
                (w[1].t, f(&w[1]).saturating_sub(f(&w[0])) as f64 / MIB / dt)
            })
            .collect()
    };
    let have = rate(&|s| s.have_bytes);
    let seeders = rate(&|s| s.seeder_bytes);
    let peers = rate(&|s| s.peer_bytes);
    let raw = r.raw_baseline.as_ref().map_or(0.0, |b| b.aggregate_mib_s);
    let max_y = have
        .iter()
        .chain(&seeders)
        .chain(&peers)
        .map(|p| p.1)
        .fold(raw, f64::max)
        * 1.15;
    let max_x = r.timeline.last().map_or(1.0, |s| s.t.max(1.0));
    let root = SVGBackend::new(path, (800, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Pool goodput and uploads over time", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..max_x, 0.0..max_y)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("MiB/s")
        .draw()?;
    for (points, label, color) in [
        (have, "verified bytes gained (goodput)", BLUE),
        (seeders, "uploaded by seeders", GREEN),
        (peers, "uploaded by fetchers and relays", RED),
    ] {
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    if let Some(b) = &r.raw_baseline {
        let y = b.aggregate_mib_s;
        chart
            .draw_series(LineSeries::new(
                vec![(0.0, y), (max_x, y)],
                BLACK.mix(0.5).stroke_width(1),
            ))?
            .label(format!("bare data channels, {} pairs at once", b.pairs))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.5)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

fn bytes_per_node(r: &PoolRunResult, path: &Path) -> anyhow::Result<()> {
    let n = r.nodes.len().max(1);
    let max_y = r
        .nodes
        .iter()
        .map(|x| x.received_bytes.max(x.served_bytes + x.relayed_bytes))
        .max()
        .unwrap_or(1) as f64
        / MIB
        * 1.15
        + 1.0;
    let root = SVGBackend::new(path, (800, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Chunk bytes in and out per node", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..n as f64, 0.0..max_y)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_desc("node (S seeder, F fetcher, R relay)")
        .x_labels(n.min(40))
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            r.nodes.get(i).map_or(String::new(), |node| {
                let tag = match node.role {
                    Role::Seeder => "S",
                    Role::Fetcher => "F",
                    Role::Relay => "R",
                };
                format!("{tag}{i}")
            })
        })
        .y_desc("MiB")
        .draw()?;
    let series: [(&str, RGBColor, NodeBytes); 3] = [
        ("received (own requests)", BLUE, |n| n.received_bytes),
        ("served from own copy", GREEN, |n| n.served_bytes),
        ("relayed for others", RED, |n| n.relayed_bytes),
    ];
    for (k, (label, color, bytes)) in series.into_iter().enumerate() {
        let offset = 0.1 + 0.27 * k as f64;
        chart
            .draw_series(r.nodes.iter().enumerate().map(|(i, n)| {
                let x0 = i as f64 + offset;
                let mib = bytes(n) as f64 / MIB;
                Rectangle::new([(x0, 0.0), (x0 + 0.27, mib)], color.filled())
            }))?
            .label(label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

fn opt(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{v:.2}"))
}

fn html(r: &PoolRunResult) -> String {
    let s = &r.summary;
    let c = &r.config;
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>tidepool pool campaign</title>\
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}}\
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}\
th{{background:#f4f4f4}}.bad{{color:#b00;font-weight:bold}}.good{{color:#070;font-weight:bold}}</style></head><body>\
<h1>Pool campaign: {} nodes, {} MiB</h1>\
<p>{} seeder(s), {} fetchers, {} relay(s); churn {}% every {} s; max peers {}; file id <code>{}</code>; \
tracker {}.</p>",
        c.nodes,
        c.file_mib,
        c.seeders,
        c.nodes - c.seeders,
        c.relays,
        c.churn,
        c.churn_every,
        c.max_peers,
        r.file_id,
        c.tracker
            .as_deref()
            .unwrap_or("in-process tidepool-tracker"),
    );
    let verdict = if r.all_verified {
        "<span class=\"good\">every surviving fetcher verified the file</span>"
    } else {
        "<span class=\"bad\">NOT every surviving fetcher verified the file</span>"
    };
    let _ = write!(
        h,
        "<p>{verdict}: {} of {} in {:.1} s.</p><table>\
<tr><th>completion p50</th><th>p90</th><th>max</th><th>goodput</th><th>duplicates</th>\
<th>chunks-missing rounds</th><th>restarts</th><th>seeders sent</th><th>peers sent</th>\
<th>peak RSS (max)</th><th>UDP drops</th><th>tracker frames in</th></tr>\
<tr><td>{} s</td><td>{} s</td><td>{} s</td><td>{:.1} MiB/s</td><td>{:.2}%</td><td>{}</td><td>{}</td>\
<td>{:.1} MiB</td><td>{:.1} MiB</td><td>{} MiB</td><td>{}</td><td>{}</td></tr></table>",
        s.completed,
        s.survivors,
        r.duration_secs,
        opt(s.completion_p50),
        opt(s.completion_p90),
        opt(s.completion_max),
        s.goodput_mib_s,
        s.duplicate_ratio * 100.0,
        s.missing_rounds,
        s.restarts,
        s.seeder_served_bytes as f64 / MIB,
        s.peer_served_bytes as f64 / MIB,
        s.peak_rss_kib_max / 1024,
        r.udp_drops.map_or("n/a".into(), |d| d.to_string()),
        r.tracker_messages_in
            .map_or("n/a".into(), |d| d.to_string()),
    );
    if s.restarts > 0 {
        let _ = write!(
            h,
            "<p>Churn: {} restarts. Slowest fetcher never killed: {} s; slowest restarted \
one: {} s.</p>",
            s.restarts,
            opt(s.completion_max_never_killed),
            opt(s.completion_max_restarted),
        );
    }
    h.push_str("<h2>Baselines (same machine, same run)</h2><ul>");
    match &r.raw_baseline {
        Some(b) => {
            let _ = write!(
                h,
                "<li>Raw WebRTC data channels, {} pairs each moving {} MiB at once: {:.1} MiB/s \
aggregate (transfer time only). Pool goodput from the first chunk to the last node done: \
{:.1} MiB/s, <b>{:.0}%</b> of it; counting the pool's set-up (joining, WebRTC, offers): \
{:.0}%.</li>",
                b.pairs,
                c.file_mib,
                b.aggregate_mib_s,
                s.transfer_goodput_mib_s,
                100.0 * s.transfer_goodput_mib_s / b.aggregate_mib_s.max(1e-9),
                100.0 * s.goodput_mib_s / b.aggregate_mib_s.max(1e-9)
            );
        }
        None => {
            h.push_str("<li>Raw data-channel baseline not run (<code>--raw-baseline</code>).</li>")
        }
    }
    match &r.webtorrent {
        Some(w) => {
            let done = w.completion_secs.iter().flatten().count();
            let _ = write!(
                h,
                "<li>npm webtorrent {}: {} of {} fetchers verified; completion max {} s; goodput \
{:.1} MiB/s.</li>",
                w.version,
                done,
                w.completion_secs.len(),
                opt(w.completion_secs.iter().flatten().copied().reduce(f64::max)),
                w.goodput_mib_s
            );
        }
        None => h.push_str("<li>webtorrent baseline not run (<code>--webtorrent DIR</code>).</li>"),
    }
    h.push_str(
        "</ul><h2>Plots</h2><img src=\"completion.svg\" alt=\"completion CDF\">\
<img src=\"goodput.svg\" alt=\"goodput over time\"><img src=\"bytes.svg\" alt=\"bytes per node\">\
<h2>Nodes</h2><table><tr><th>node</th><th>role</th><th>done (s)</th><th>verified</th>\
<th>restarts</th><th>received MiB</th><th>dup chunks</th><th>missing rounds</th>\
<th>served MiB</th><th>relayed MiB</th><th>peak RSS MiB</th><th>CPU s</th></tr>",
    );
    for n in &r.nodes {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{:?}{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.1}</td><td>{}</td>\
<td>{}</td><td>{:.1}</td><td>{:.1}</td><td>{}</td><td>{:.2}</td></tr>",
            n.index,
            n.role,
            if n.removed { " (removed)" } else { "" },
            opt(n.completion_secs),
            match n.verified {
                Some(true) => "yes",
                Some(false) => "<span class=\"bad\">NO</span>",
                None => "–",
            },
            n.restarts,
            n.received_bytes as f64 / MIB,
            n.duplicate_chunks,
            n.missing_rounds,
            n.served_bytes as f64 / MIB,
            n.relayed_bytes as f64 / MIB,
            n.peak_rss_kib / 1024,
            n.cpu_secs,
        );
    }
    h.push_str("</table><p>Raw numbers: <a href=\"results.json\">results.json</a>; node logs in <code>nodes/</code>.</p></body></html>\n");
    h
}
