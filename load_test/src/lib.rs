//! tidepool-load-test: load generation and reports for the tracker (and, later, whole pools).
//!
//! - [`tracker_load`]: C WebSocket connections against one tracker, counting every delivery.
//! - [`pool_run`]: whole pools of `tidepool-node` processes against a tracker, with churn.
//! - [`pool_baselines`]: what a pool is measured against — bare data channels, npm webtorrent.
//! - [`pool_report`]: a campaign's HTML report and plots.
//! - [`idle`]: connection cost — K idle connections, each announced once.
//! - [`report`]: turns result files from side-by-side runs into a markdown table and a chart.
//! - [`tls`]: client TLS settings for wss targets.

pub mod idle;
pub mod pool_baselines;
pub mod pool_report;
pub mod pool_run;
pub mod report;
pub mod tls;
pub mod tracker_load;
