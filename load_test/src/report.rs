//! Side-by-side reports: reads a campaign's runs (one JSON object per line) and writes a
//! markdown table of medians with ratios, and an SVG chart of responses per second.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use serde::Deserialize;

/// One measured run, as benchmarks/compare-trackers records it.
#[derive(Debug, Clone, Deserialize)]
pub struct Run {
    /// `tidepool`, `aquatic_ws` or `bittorrent-tracker`.
    pub tracker: String,
    /// `tidepool-load-test` or `aquatic_ws_load_test`.
    pub tester: String,
    /// Round number (trackers alternate within each round).
    pub round: u32,
    /// Frames received by the tester per second.
    pub responses_per_sec: f64,
    /// Requests sent by the tester per second (requests + responses = messages handled).
    #[serde(default)]
    pub requests_per_sec: f64,
    /// Offers delivered per second.
    pub offers_per_sec: f64,
    /// Answers delivered per second.
    pub answers_per_sec: f64,
    /// Announce-response latency, when the tester measures it.
    #[serde(default)]
    pub p50_us: Option<u64>,
    /// 99th percentile announce-response latency.
    #[serde(default)]
    pub p99_us: Option<u64>,
    /// Tracker peak RSS.
    pub peak_rss_kib: u64,
    /// Tracker CPU time during the run.
    pub cpu_seconds: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Reads `runs` and writes `results.md` and `throughput.svg` into `out`.
pub fn write(runs: &Path, out: &Path) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(runs).with_context(|| format!("reading {}", runs.display()))?;
    let runs: Vec<Run> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("bad run line: {l}")))
        .collect::<Result<_, _>>()?;
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("results.md"), table(&runs))?;
    chart(&runs, &out.join("throughput.svg"))?;
    println!(
        "wrote {} and {}",
        out.join("results.md").display(),
        out.join("throughput.svg").display()
    );
    Ok(())
}

/// The markdown table: medians per (tester, tracker), with ratios against tidepool.
pub fn table(runs: &[Run]) -> String {
    let mut groups: BTreeMap<(String, String), Vec<&Run>> = BTreeMap::new();
    for r in runs {
        groups
            .entry((r.tester.clone(), r.tracker.clone()))
            .or_default()
            .push(r);
    }
    let med = |rs: &[&Run], f: &dyn Fn(&Run) -> f64| median(rs.iter().map(|r| f(r)).collect());
    let mut s = String::from(
        "| tester | tracker | rounds | responses/s (median) | spread | messages/s | offers/s | answers/s | p50 µs | p99 µs | peak RSS MiB | CPU s | tidepool ÷ this |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for ((tester, tracker), rs) in &groups {
        let resp = med(rs, &|r| r.responses_per_sec);
        let min = rs
            .iter()
            .map(|r| r.responses_per_sec)
            .fold(f64::INFINITY, f64::min);
        let max = rs.iter().map(|r| r.responses_per_sec).fold(0.0, f64::max);
        let ours = groups
            .get(&(tester.clone(), "tidepool".to_owned()))
            .map(|t| med(t, &|r| r.responses_per_sec));
        let ratio = match ours {
            Some(o) if tracker != "tidepool" && resp > 0.0 => format!("{:.2}×", o / resp),
            _ => "–".into(),
        };
        let lat = |f: &dyn Fn(&Run) -> Option<u64>| {
            let v: Vec<f64> = rs.iter().filter_map(|r| f(r)).map(|x| x as f64).collect();
            if v.is_empty() {
                "–".to_owned()
            } else {
                format!("{:.0}", median(v))
            }
        };
        s.push_str(&format!(
            "| {tester} | {tracker} | {} | {:.0} | {:.0}–{:.0} | {:.0} | {:.0} | {:.0} | {} | {} | {:.1} | {:.1} | {ratio} |\n",
            rs.len(),
            resp,
            min,
            max,
            med(rs, &|r| r.requests_per_sec + r.responses_per_sec),
            med(rs, &|r| r.offers_per_sec),
            med(rs, &|r| r.answers_per_sec),
            lat(&|r| r.p50_us),
            lat(&|r| r.p99_us),
            med(rs, &|r| r.peak_rss_kib as f64) / 1024.0,
            med(rs, &|r| r.cpu_seconds),
        ));
    }
    s
}

fn chart(runs: &[Run], path: &Path) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let mut series: BTreeMap<(String, String), Vec<(u32, f64)>> = BTreeMap::new();
    for r in runs {
        series
            .entry((r.tester.clone(), r.tracker.clone()))
            .or_default()
            .push((r.round, r.responses_per_sec));
    }
    let max_round = runs.iter().map(|r| r.round).max().unwrap_or(1).max(1);
    let max_y = runs.iter().map(|r| r.responses_per_sec).fold(1.0, f64::max) * 1.15;
    let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Tracker responses per second, by round (higher is better)",
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(1u32..max_round, 0.0..max_y)?;
    chart
        .configure_mesh()
        .x_desc("round")
        .y_desc("responses/s")
        .draw()?;
    for (i, ((tester, tracker), points)) in series.into_iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(format!("{tracker} ({tester})"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart.draw_series(
            points
                .into_iter()
                .map(|p| Circle::new(p, 3, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(tracker: &str, round: u32, rps: f64) -> Run {
        Run {
            tracker: tracker.into(),
            tester: "t".into(),
            round,
            responses_per_sec: rps,
            requests_per_sec: rps / 2.0,
            offers_per_sec: rps / 2.0,
            answers_per_sec: rps / 4.0,
            p50_us: Some(100),
            p99_us: None,
            peak_rss_kib: 2048,
            cpu_seconds: 1.0,
        }
    }

    #[test]
    fn table_reports_medians_and_ratios() {
        let runs = vec![
            run("tidepool", 1, 300.0),
            run("tidepool", 2, 100.0),
            run("tidepool", 3, 200.0),
            run("aquatic_ws", 1, 100.0),
            run("aquatic_ws", 2, 50.0),
        ];
        let t = table(&runs);
        assert!(
            t.contains("| t | tidepool | 3 | 200 | 100–300 | 300 |"),
            "{t}"
        );
        assert!(
            t.contains("| t | aquatic_ws | 2 | 75 | 50–100 | 112 |"),
            "{t}"
        );
        assert!(t.contains("2.67×"), "{t}");
    }

    #[test]
    fn chart_is_written() {
        let dir = std::env::temp_dir().join(format!("tidepool-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let runs = vec![
            run("tidepool", 1, 300.0),
            run("tidepool", 2, 100.0),
            run("aquatic_ws", 1, 100.0),
        ];
        chart(&runs, &dir.join("c.svg")).expect("chart");
        let svg = std::fs::read_to_string(dir.join("c.svg")).expect("svg");
        assert!(svg.contains("<svg") && svg.contains("aquatic_ws"));
        let _ = std::fs::remove_dir_all(dir);
    }
}
