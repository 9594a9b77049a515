//! tidepool-load-test: load generation and reports for the tracker (and, later, whole pools).
//!
//! - [`tracker_load`]: C WebSocket connections against one tracker, counting every delivery.
//! - [`pool_run`]: whole pools of `tidepool-node` processes against a tracker, with churn.
//! - [`idle`]: connection cost — K idle connections, each announced once.
//! - [`report`]: turns result files from side-by-side runs into a markdown table and a chart.
//! - [`tls`]: client TLS settings for wss targets.

pub mod idle;
pub mod pool_run;
pub mod report;
pub mod tls;
pub mod tracker_load;
