//! Fuzz target: any bytes as a WebSocket upgrade request. The tracker's parser never panics
//! and a complete head parses the same from exactly the bytes it took.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tidepool_tracker::fuzzing::upgrade(data));
