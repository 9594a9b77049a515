//! Fuzz target: any bytes as inputs to a node's pool engine (neighbours, offers, requests,
//! chunks good and bad, reports, disk completions in any order, sends, the clock), its
//! invariants checked after every step, then an honest source that must complete the file.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tidepool_node::pool::fuzz::run(data);
});
