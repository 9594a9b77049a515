//! Fuzz target: any bytes as a batch another tracker instance published on the cluster bus.
//! The decoder never panics, and what decodes re-encodes to exactly the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tidepool_tracker::fuzzing::cluster_batch(data));
